"""iSCSI PDUs (RFC 7143 §11): one dataclass per PDU type, and the codec.

The dataclasses are plain data: semantic fields, no framing. Digests, padding,
the TotalAHSLength/DataSegmentLength fields and the opcode are the codec's
business. Field names follow RFC 7143's (lower case): itt = Initiator Task
Tag, ttt = Target Transfer Tag, cmdsn / expcmdsn / maxcmdsn / statsn /
expstatsn, edtl = Expected Data Transfer Length, datasn, r2tsn.

Sequence numbers are unsigned 32-bit (serial arithmetic, RFC 1982, is the
session's business, not the codec's); LUN fields are the raw 8-byte LUN
structure as an int (SAM-5 §4.7: LUN 0 is 0, and a flat-space LUN n < 256 is
n << 48).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import crc32c

# Opcodes, initiator to target (RFC 7143 §11.1.1).
OP_NOP_OUT = 0x00
OP_SCSI_CMD = 0x01
OP_TASK_MGMT_REQ = 0x02
OP_LOGIN_REQ = 0x03
OP_TEXT_REQ = 0x04
OP_DATA_OUT = 0x05
OP_LOGOUT_REQ = 0x06
OP_SNACK_REQ = 0x10
# Target to initiator.
OP_NOP_IN = 0x20
OP_SCSI_RSP = 0x21
OP_TASK_MGMT_RSP = 0x22
OP_LOGIN_RSP = 0x23
OP_TEXT_RSP = 0x24
OP_DATA_IN = 0x25
OP_LOGOUT_RSP = 0x26
OP_R2T = 0x31
OP_ASYNC_MSG = 0x32
OP_REJECT = 0x3F

RESERVED_TAG = 0xFFFFFFFF  # "no tag" in ITT/TTT fields


# ---------------------------------------------------------------- initiator to target


@dataclass(frozen=True, slots=True)
class NopOut:  # §11.18
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    lun: int = 0
    immediate: bool = False
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ScsiCommand:  # §11.3
    itt: int
    cdb: bytes  # the whole CDB: the 16 bytes of the BHS plus an Extended CDB AHS if any
    edtl: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    lun: int = 0
    immediate: bool = False
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = 0  # task attribute, 3 bits (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA)
    bidi_read_length: int | None = None  # Bidirectional Read Expected Data-Transfer Length AHS
    data: bytes = b""  # immediate data


@dataclass(frozen=True, slots=True)
class TaskMgmtRequest:  # §11.5
    itt: int
    function: int  # 7 bits: 1 ABORT TASK, 2 ABORT TASK SET, 3 CLEAR ACA, 4 CLEAR TASK SET, 5 LUN RESET,
    #               6 TARGET WARM RESET, 7 TARGET COLD RESET, 8 TASK REASSIGN
    rtt: int = RESERVED_TAG  # Referenced Task Tag
    cmdsn: int = 0
    expstatsn: int = 0
    refcmdsn: int = 0
    expdatasn: int = 0
    lun: int = 0
    immediate: bool = False


@dataclass(frozen=True, slots=True)
class LoginRequest:  # §11.12
    itt: int
    isid: bytes  # 6 bytes
    tsih: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    transit: bool = False  # T
    cont: bool = False  # C
    csg: int = 0  # current stage: 0 security, 1 operational, 3 full feature
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    data: bytes = b""  # text keys


@dataclass(frozen=True, slots=True)
class TextRequest:  # §11.10
    itt: int
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    lun: int = 0
    immediate: bool = False
    final: bool = True
    cont: bool = False
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class DataOut:  # §11.7
    itt: int
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    lun: int = 0
    final: bool = False
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class LogoutRequest:  # §11.14
    itt: int
    reason: int = 0  # 0 close session, 1 close connection, 2 remove connection for recovery
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    immediate: bool = False


@dataclass(frozen=True, slots=True)
class SnackRequest:  # §11.16 (floe runs ErrorRecoveryLevel 0: answered with Reject)
    itt: int
    type: int = 0
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    begrun: int = 0
    runlength: int = 0
    lun: int = 0


# ---------------------------------------------------------------- target to initiator


@dataclass(frozen=True, slots=True)
class NopIn:  # §11.19
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    lun: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ScsiResponse:  # §11.4
    itt: int
    status: int = 0  # SAM status byte
    response: int = 0  # 0 command completed at target, 1 target failure
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    expdatasn: int = 0
    overflow: bool = False  # O
    underflow: bool = False  # U
    bidi_overflow: bool = False  # o
    bidi_underflow: bool = False  # u
    residual: int = 0
    bidi_residual: int = 0
    sense: bytes = b""  # sense data; the codec adds the 2-byte SenseLength in front
    data: bytes = b""  # response data after the sense (rare); the codec appends it


@dataclass(frozen=True, slots=True)
class TaskMgmtResponse:  # §11.6
    itt: int
    response: int = 0  # 0 complete, 1 task does not exist, 2 LUN does not exist, 3 task still allegiant,
    #                   4 reassignment not supported, 5 function not supported, 255 rejected
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0


@dataclass(frozen=True, slots=True)
class LoginResponse:  # §11.13
    itt: int
    isid: bytes  # 6 bytes
    tsih: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class TextResponse:  # §11.11
    itt: int
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    lun: int = 0
    final: bool = True
    cont: bool = False
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class DataIn:  # §11.7
    itt: int
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    residual: int = 0
    lun: int = 0
    final: bool = False
    ack: bool = False  # A
    overflow: bool = False  # O (only with status)
    underflow: bool = False  # U (only with status)
    status_present: bool = False  # S: phase-collapsed status, only with final
    status: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class LogoutResponse:  # §11.15
    itt: int
    response: int = 0  # 0 closed successfully, 1 CID not found, 2 recovery not supported, 3 cleanup failed
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0


@dataclass(frozen=True, slots=True)
class R2T:  # §11.8
    itt: int
    ttt: int
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2tsn: int = 0
    buffer_offset: int = 0
    desired_length: int = 0
    lun: int = 0


@dataclass(frozen=True, slots=True)
class AsyncMessage:  # §11.9
    event: int  # 0 SCSI async event (sense in data), 1 logout request, 2 drop connection, 3 drop all, 4 renegotiate
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    lun: int = 0
    vcode: int = 0
    param1: int = 0
    param2: int = 0
    param3: int = 0
    sense: bytes = b""  # for event 0; the codec adds the 2-byte SenseLength
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Reject:  # §11.17
    reason: int  # 0x02 data digest error, 0x04 protocol error, 0x05 command not supported,
    #             0x06 immediate command reject, 0x07 task in progress, 0x09 invalid PDU field,
    #             0x0A long operation reject, 0x0C waiting for logout
    bhs: bytes  # the rejected PDU's 48-byte header (the data segment of the Reject)
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn_r2tsn: int = 0


# What the codec hands up when a PDU is framed correctly (its lengths could be
# read and its bytes consumed) but its content cannot be accepted: an unknown
# opcode, a reserved field set, a field out of range. The connection answers
# with Reject(reason, bhs) and goes on.
@dataclass(frozen=True, slots=True)
class Invalid:
    bhs: bytes  # the 48-byte header as received
    reason: int  # the Reject reason to answer with
    why: str  # for the log


InitiatorPDU = (NopOut | ScsiCommand | TaskMgmtRequest | LoginRequest | TextRequest | DataOut | LogoutRequest
                | SnackRequest)
TargetPDU = (NopIn | ScsiResponse | TaskMgmtResponse | LoginResponse | TextResponse | DataIn | LogoutResponse | R2T
             | AsyncMessage | Reject)
PDU = InitiatorPDU | TargetPDU


# ================================================================ the codec
#
# Theory of operation. On the wire a PDU (RFC 7143 §11.2) is a 48-byte Basic
# Header Segment (BHS); TotalAHSLength 4-byte words of Additional Header
# Segments (AHS); a 4-byte header digest over BHS+AHS if HeaderDigest=CRC32C;
# DataSegmentLength bytes of data, padded with zeros to a multiple of 4; and a
# 4-byte data digest over data+padding if DataDigest=CRC32C and there is data.
# Only the BHS says how long the rest is, so the Decoder takes a PDU in three
# steps: the BHS, whose lengths it bounds before it buffers anything more; the
# AHS and header digest, which it checks; then the data segment and its digest.
#
# Errors say what is left of the framing:
#   - ProtocolError: the stream cannot be split into PDUs any more (the header
#     digest is wrong, so no length in the header can be trusted; a length is
#     over the bound). The connection must be closed; the Decoder stays failed.
#   - Invalid: the PDU was framed and its bytes consumed, but its content
#     cannot be accepted (an unknown or wrong-direction opcode, a bad data
#     digest, a malformed AHS or sense segment). The session answers with a
#     Reject carrying Invalid.reason and goes on with the next PDU.
#   - ValueError from encode(): a dataclass holding a value that does not fit
#     its wire field. That is a bug on our side, never the peer's.
#
# Reserved fields and bits are sent as 0 and ignored on receipt (RFC 7143 §11:
# "Any compliant receiver MUST ignore any bit not defined and all reserved
# fields"). Fields with defined ranges (CSG/NSG, versions, TMF function codes)
# are decoded as received: judging them is the login and session layers' job.

# Reject reason codes (RFC 7143 §11.17.1) that the codec itself produces.
REJECT_DATA_DIGEST_ERROR = 0x02
REJECT_PROTOCOL_ERROR = 0x04
REJECT_COMMAND_NOT_SUPPORTED = 0x05
REJECT_INVALID_PDU_FIELD = 0x09

BHS_BYTES = 48  # RFC 7143 §11.2.1
DIGEST_BYTES = 4  # a CRC32C, RFC 7143 §13.1
# TotalAHSLength is one byte counting 4-byte words (RFC 7143 §11.2.1), so no
# AHS can be longer than this and the codec needs no smaller limit of its own.
AHS_BYTES_MAX = 255 * 4
# DataSegmentLength is a 3-byte field (RFC 7143 §11.2.1).
DATA_SEGMENT_BYTES_MAX = 0xFFFFFF
# The Decoder's default bound on one data segment: 256 KiB is open-iscsi's
# default MaxRecvDataSegmentLength. The session sets the negotiated value
# (RFC 7143 §13.12: 512 to 2**24-1, default 8192) after login.
DEFAULT_DATA_SEGMENT_BYTES_MAX = 262144
SENSE_BYTES_MAX = 0xFFFF  # SenseLength is a 2-byte field (RFC 7143 §11.4.7)

# AHS types (RFC 7143 §11.2.2.1).
AHS_EXTENDED_CDB = 1  # §11.2.2.3
AHS_BIDI_READ_LENGTH = 2  # §11.2.2.4
CDB_BHS_BYTES = 16  # the CDB field of the SCSI Command BHS (RFC 7143 §11.3.5)

# Byte 0 (RFC 7143 §11.2.1): bit 6 is the immediate delivery marker of
# initiator PDUs, the low 6 bits are the opcode.
_I = 0x40
_OPCODE_MASK = 0x3F
_F = 0x80  # byte 1 bit 7: Final (or a fixed 1 in PDUs that are always final)


class ProtocolError(Exception):
    """The byte stream cannot be framed any more (bad header digest, a data segment longer than allowed,
    an AHS longer than allowed): the connection must be closed. .reason is the Reject reason code (RFC 7143 §11.17.1)
    the target may send first (0x02 data digest, 0x04 protocol error, 0x09 invalid PDU field)."""

    def __init__(self, message: str, reason: int = REJECT_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


def pdu_bytes_max(max_data_segment: int) -> int:
    """The most bytes one PDU can take on the wire with data segments bounded by max_data_segment.

    This is also the most a Decoder ever buffers: BHS, the largest AHS, header
    digest, the padded data segment and the data digest.
    """
    data_bytes = min(max(max_data_segment, 0), DATA_SEGMENT_BYTES_MAX)
    return BHS_BYTES + AHS_BYTES_MAX + DIGEST_BYTES + _pad4(data_bytes) + DIGEST_BYTES


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _crc32c(data: bytes | bytearray | memoryview) -> int:
    return crc32c.crc32c(data)


def _digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest as it goes on the wire: the CRC32C register least significant byte first.

    RFC 7143 §13.1 names CRC32C; the worked examples of RFC 3720 Appendix B.4
    list 32 zero bytes as giving the wire bytes aa 36 91 8a, which is the CRC
    0x8a9136aa in little-endian order, and libiscsi (lib/socket.c, lib/pdu.c)
    writes and checks the header digest in that order.
    """
    return _crc32c(data).to_bytes(DIGEST_BYTES, "little")


# ---------------------------------------------------------------- encoding


def _check(value: int, bits: int, name: str) -> int:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value!r} does not fit an unsigned {bits}-bit field")
    return value


def _put8(h: bytearray, offset: int, value: int, name: str) -> None:
    h[offset] = _check(value, 8, name)


def _put16(h: bytearray, offset: int, value: int, name: str) -> None:
    struct.pack_into(">H", h, offset, _check(value, 16, name))


def _put32(h: bytearray, offset: int, value: int, name: str) -> None:
    struct.pack_into(">I", h, offset, _check(value, 32, name))


def _put_lun(h: bytearray, value: int) -> None:
    # The LUN field is the 8-byte SAM LUN structure (RFC 7143 §11.2.1).
    struct.pack_into(">Q", h, 8, _check(value, 64, "lun"))


def _immediate(flag: bool) -> int:
    return _I if flag else 0


def _sense_segment(sense: bytes, data: bytes) -> bytes:
    # RFC 7143 §11.4.7: SenseLength (2 bytes), the sense data, then response
    # data. With neither there is no data segment at all.
    if not sense and not data:
        return b""
    if len(sense) > SENSE_BYTES_MAX:
        raise ValueError(f"sense is {len(sense)} bytes, SenseLength holds at most {SENSE_BYTES_MAX}")
    return struct.pack(">H", len(sense)) + sense + data


def _enc_nop_out(p: NopOut, h: bytearray) -> tuple[bytes, bytes]:  # §11.18
    h[0] = OP_NOP_OUT | _immediate(p.immediate)
    h[1] = _F
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.ttt, "ttt")
    _put32(h, 24, p.cmdsn, "cmdsn")
    _put32(h, 28, p.expstatsn, "expstatsn")
    return b"", p.data


def _enc_scsi_command(p: ScsiCommand, h: bytearray) -> tuple[bytes, bytes]:  # §11.3
    h[0] = OP_SCSI_CMD | _immediate(p.immediate)
    h[1] = (_F if p.final else 0) | (0x40 if p.read else 0) | (0x20 if p.write else 0) | _check(p.attr, 3, "attr")
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.edtl, "edtl")
    _put32(h, 24, p.cmdsn, "cmdsn")
    _put32(h, 28, p.expstatsn, "expstatsn")
    # A CDB shorter than 16 bytes is zero-filled (as libiscsi and Linux do);
    # the rest of a longer one goes into an Extended CDB AHS.
    h[32:48] = p.cdb[:CDB_BHS_BYTES].ljust(CDB_BHS_BYTES, b"\0")
    ahs = b""
    extended = p.cdb[CDB_BHS_BYTES:]
    if extended:
        # §11.2.2.3: AHSLength = CDBLength - 15, counting the reserved byte.
        ahs += struct.pack(">HBB", len(extended) + 1, AHS_EXTENDED_CDB, 0) + extended
        ahs = ahs.ljust(_pad4(len(ahs)), b"\0")
    if p.bidi_read_length is not None:
        # §11.2.2.4: AHSLength 5, then the 4-byte length.
        ahs += struct.pack(">HBBI", 5, AHS_BIDI_READ_LENGTH, 0, _check(p.bidi_read_length, 32, "bidi_read_length"))
    return ahs, p.data


def _enc_task_mgmt_request(p: TaskMgmtRequest, h: bytearray) -> tuple[bytes, bytes]:  # §11.5
    h[0] = OP_TASK_MGMT_REQ | _immediate(p.immediate)
    h[1] = _F | _check(p.function, 7, "function")
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.rtt, "rtt")
    _put32(h, 24, p.cmdsn, "cmdsn")
    _put32(h, 28, p.expstatsn, "expstatsn")
    _put32(h, 32, p.refcmdsn, "refcmdsn")
    _put32(h, 36, p.expdatasn, "expdatasn")
    return b"", b""


def _login_flags(transit: bool, cont: bool, csg: int, nsg: int) -> int:
    # §11.12: |T|C|.|.|CSG|NSG|
    return (0x80 if transit else 0) | (0x40 if cont else 0) | _check(csg, 2, "csg") << 2 | _check(nsg, 2, "nsg")


def _put_isid(h: bytearray, isid: bytes) -> None:
    if len(isid) != 6:
        raise ValueError(f"isid is {len(isid)} bytes, not 6")
    h[8:14] = isid


def _enc_login_request(p: LoginRequest, h: bytearray) -> tuple[bytes, bytes]:  # §11.12
    h[0] = OP_LOGIN_REQ | _I  # §11.12: the I bit is always 1 in a Login Request
    h[1] = _login_flags(p.transit, p.cont, p.csg, p.nsg)
    _put8(h, 2, p.version_max, "version_max")
    _put8(h, 3, p.version_min, "version_min")
    _put_isid(h, p.isid)
    _put16(h, 14, p.tsih, "tsih")
    _put32(h, 16, p.itt, "itt")
    _put16(h, 20, p.cid, "cid")
    _put32(h, 24, p.cmdsn, "cmdsn")
    _put32(h, 28, p.expstatsn, "expstatsn")
    return b"", p.data


def _enc_text_request(p: TextRequest, h: bytearray) -> tuple[bytes, bytes]:  # §11.10
    h[0] = OP_TEXT_REQ | _immediate(p.immediate)
    h[1] = (_F if p.final else 0) | (0x40 if p.cont else 0)
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.ttt, "ttt")
    _put32(h, 24, p.cmdsn, "cmdsn")
    _put32(h, 28, p.expstatsn, "expstatsn")
    return b"", p.data


def _enc_data_out(p: DataOut, h: bytearray) -> tuple[bytes, bytes]:  # §11.7
    h[0] = OP_DATA_OUT
    h[1] = _F if p.final else 0
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.ttt, "ttt")
    _put32(h, 28, p.expstatsn, "expstatsn")
    _put32(h, 36, p.datasn, "datasn")
    _put32(h, 40, p.buffer_offset, "buffer_offset")
    return b"", p.data


def _enc_logout_request(p: LogoutRequest, h: bytearray) -> tuple[bytes, bytes]:  # §11.14
    h[0] = OP_LOGOUT_REQ | _immediate(p.immediate)
    h[1] = _F | _check(p.reason, 7, "reason")
    _put32(h, 16, p.itt, "itt")
    _put16(h, 20, p.cid, "cid")
    _put32(h, 24, p.cmdsn, "cmdsn")
    _put32(h, 28, p.expstatsn, "expstatsn")
    return b"", b""


def _enc_snack_request(p: SnackRequest, h: bytearray) -> tuple[bytes, bytes]:  # §11.16
    h[0] = OP_SNACK_REQ
    h[1] = _F | _check(p.type, 4, "type")
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.ttt, "ttt")
    _put32(h, 28, p.expstatsn, "expstatsn")
    _put32(h, 40, p.begrun, "begrun")
    _put32(h, 44, p.runlength, "runlength")
    return b"", b""


def _put_target_sns(h: bytearray, statsn: int, expcmdsn: int, maxcmdsn: int) -> None:
    # Target PDUs carry StatSN, ExpCmdSN and MaxCmdSN at bytes 24, 28 and 32
    # (the same place in every target PDU of RFC 7143 §11).
    _put32(h, 24, statsn, "statsn")
    _put32(h, 28, expcmdsn, "expcmdsn")
    _put32(h, 32, maxcmdsn, "maxcmdsn")


def _enc_nop_in(p: NopIn, h: bytearray) -> tuple[bytes, bytes]:  # §11.19
    h[0] = OP_NOP_IN
    h[1] = _F
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.ttt, "ttt")
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    return b"", p.data


def _enc_scsi_response(p: ScsiResponse, h: bytearray) -> tuple[bytes, bytes]:  # §11.4
    h[0] = OP_SCSI_RSP
    # §11.4: |1|.|.|o|u|O|U|.|
    h[1] = (_F | (0x10 if p.bidi_overflow else 0) | (0x08 if p.bidi_underflow else 0)
            | (0x04 if p.overflow else 0) | (0x02 if p.underflow else 0))
    _put8(h, 2, p.response, "response")
    _put8(h, 3, p.status, "status")
    _put32(h, 16, p.itt, "itt")
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    _put32(h, 36, p.expdatasn, "expdatasn")
    _put32(h, 40, p.bidi_residual, "bidi_residual")
    _put32(h, 44, p.residual, "residual")
    return b"", _sense_segment(p.sense, p.data)


def _enc_task_mgmt_response(p: TaskMgmtResponse, h: bytearray) -> tuple[bytes, bytes]:  # §11.6
    h[0] = OP_TASK_MGMT_RSP
    h[1] = _F
    _put8(h, 2, p.response, "response")
    _put32(h, 16, p.itt, "itt")
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    return b"", b""


def _enc_login_response(p: LoginResponse, h: bytearray) -> tuple[bytes, bytes]:  # §11.13
    h[0] = OP_LOGIN_RSP
    h[1] = _login_flags(p.transit, p.cont, p.csg, p.nsg)
    _put8(h, 2, p.version_max, "version_max")
    _put8(h, 3, p.version_active, "version_active")
    _put_isid(h, p.isid)
    _put16(h, 14, p.tsih, "tsih")
    _put32(h, 16, p.itt, "itt")
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    _put8(h, 36, p.status_class, "status_class")
    _put8(h, 37, p.status_detail, "status_detail")
    return b"", p.data


def _enc_text_response(p: TextResponse, h: bytearray) -> tuple[bytes, bytes]:  # §11.11
    h[0] = OP_TEXT_RSP
    h[1] = (_F if p.final else 0) | (0x40 if p.cont else 0)
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.ttt, "ttt")
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    return b"", p.data


def _enc_data_in(p: DataIn, h: bytearray) -> tuple[bytes, bytes]:  # §11.7
    # §11.7: S (status in this PDU) only with F; O, U, the status
    # byte and the residual count are only defined when S is set.
    if p.status_present and not p.final:
        raise ValueError("DataIn with status_present must be final (RFC 7143 §11.7)")
    if not p.status_present and (p.status or p.overflow or p.underflow or p.residual):
        raise ValueError("DataIn status, overflow, underflow and residual need status_present (RFC 7143 §11.7)")
    h[0] = OP_DATA_IN
    # §11.7: |F|A|0|0|0|O|U|S|
    h[1] = ((_F if p.final else 0) | (0x40 if p.ack else 0) | (0x04 if p.overflow else 0)
            | (0x02 if p.underflow else 0) | (0x01 if p.status_present else 0))
    _put8(h, 3, p.status, "status")
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.ttt, "ttt")
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    _put32(h, 36, p.datasn, "datasn")
    _put32(h, 40, p.buffer_offset, "buffer_offset")
    _put32(h, 44, p.residual, "residual")
    return b"", p.data


def _enc_logout_response(p: LogoutResponse, h: bytearray) -> tuple[bytes, bytes]:  # §11.15
    h[0] = OP_LOGOUT_RSP
    h[1] = _F
    _put8(h, 2, p.response, "response")
    _put32(h, 16, p.itt, "itt")
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    _put16(h, 40, p.time2wait, "time2wait")
    _put16(h, 42, p.time2retain, "time2retain")
    return b"", b""


def _enc_r2t(p: R2T, h: bytearray) -> tuple[bytes, bytes]:  # §11.8
    h[0] = OP_R2T
    h[1] = _F
    _put_lun(h, p.lun)
    _put32(h, 16, p.itt, "itt")
    _put32(h, 20, p.ttt, "ttt")
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    _put32(h, 36, p.r2tsn, "r2tsn")
    _put32(h, 40, p.buffer_offset, "buffer_offset")
    _put32(h, 44, p.desired_length, "desired_length")
    return b"", b""


def _enc_async_message(p: AsyncMessage, h: bytearray) -> tuple[bytes, bytes]:  # §11.9
    h[0] = OP_ASYNC_MSG
    h[1] = _F
    _put_lun(h, p.lun)
    _put32(h, 16, RESERVED_TAG, "itt")  # §11.9: the ITT field is 0xffffffff
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    _put8(h, 36, p.event, "event")
    _put8(h, 37, p.vcode, "vcode")
    _put16(h, 38, p.param1, "param1")
    _put16(h, 40, p.param2, "param2")
    _put16(h, 42, p.param3, "param3")
    return b"", _sense_segment(p.sense, p.data)


def _enc_reject(p: Reject, h: bytearray) -> tuple[bytes, bytes]:  # §11.17
    if len(p.bhs) != BHS_BYTES:
        raise ValueError(f"Reject.bhs is {len(p.bhs)} bytes, not the {BHS_BYTES} of a header")
    h[0] = OP_REJECT
    h[1] = _F
    _put8(h, 2, p.reason, "reason")
    _put32(h, 16, RESERVED_TAG, "itt")  # §11.17: the ITT field is 0xffffffff
    _put_target_sns(h, p.statsn, p.expcmdsn, p.maxcmdsn)
    _put32(h, 36, p.datasn_r2tsn, "datasn_r2tsn")
    return b"", p.bhs


# One encoder per dataclass; each fills in the BHS it is given and returns the
# AHS and the unpadded data segment.
_ENCODERS: dict[type, Callable[[Any, bytearray], tuple[bytes, bytes]]] = {
    NopOut: _enc_nop_out,
    ScsiCommand: _enc_scsi_command,
    TaskMgmtRequest: _enc_task_mgmt_request,
    LoginRequest: _enc_login_request,
    TextRequest: _enc_text_request,
    DataOut: _enc_data_out,
    LogoutRequest: _enc_logout_request,
    SnackRequest: _enc_snack_request,
    NopIn: _enc_nop_in,
    ScsiResponse: _enc_scsi_response,
    TaskMgmtResponse: _enc_task_mgmt_response,
    LoginResponse: _enc_login_response,
    TextResponse: _enc_text_response,
    DataIn: _enc_data_in,
    LogoutResponse: _enc_logout_response,
    R2T: _enc_r2t,
    AsyncMessage: _enc_async_message,
    Reject: _enc_reject,
}


def encode(pdu: PDU, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
    """The wire bytes of one PDU (RFC 7143 §11.2), with CRC32C digests if asked for.

    Sets the opcode, the I bit, TotalAHSLength and DataSegmentLength, pads the
    data segment with zeros to a multiple of 4 bytes, and appends the header
    digest (over BHS+AHS) and, when there is a data segment, the data digest
    (over data+padding). Raises ValueError for a field that does not fit.
    """
    encoder = _ENCODERS.get(type(pdu))
    if encoder is None:
        raise TypeError(f"cannot encode {type(pdu).__name__}: not an iSCSI PDU dataclass")
    h = bytearray(BHS_BYTES)
    ahs, data = encoder(pdu, h)
    if len(ahs) % 4 != 0 or len(ahs) > AHS_BYTES_MAX:
        raise ValueError(f"AHS of {len(ahs)} bytes does not fit TotalAHSLength (at most {AHS_BYTES_MAX}, in words)")
    if len(data) > DATA_SEGMENT_BYTES_MAX:
        raise ValueError(f"data segment of {len(data)} bytes does not fit DataSegmentLength")
    h[4] = len(ahs) // 4
    h[5:8] = len(data).to_bytes(3, "big")
    header = bytes(h) + ahs
    parts = [header]
    if header_digest:
        parts.append(_digest(header))
    if data:
        padded = data + b"\0" * (_pad4(len(data)) - len(data))
        parts.append(padded)
        if data_digest:
            parts.append(_digest(padded))
    return b"".join(parts)


# ---------------------------------------------------------------- decoding
#
# Each decoder takes the 48-byte BHS, the AHS and the unpadded data segment of
# a framed PDU whose digests have been checked, and returns the dataclass or
# an Invalid. Nothing in here can fail on a short buffer: the BHS is always 48
# bytes, and the AHS and data are exactly what the header said.


def _u16(b: bytes, offset: int) -> int:
    return int.from_bytes(b[offset:offset + 2], "big")


def _u32(b: bytes, offset: int) -> int:
    return int.from_bytes(b[offset:offset + 4], "big")


def _lun(h: bytes) -> int:
    return int.from_bytes(h[8:16], "big")


def _invalid_field(h: bytes, why: str) -> Invalid:
    return Invalid(h, REJECT_INVALID_PDU_FIELD, why)


def _no_data(h: bytes, data: bytes, name: str) -> Invalid | None:
    # These PDUs have no data segment in RFC 7143; one that arrives with a
    # data segment is framed fine, but there is nowhere to put it.
    if data:
        return _invalid_field(h, f"{name} with a {len(data)}-byte data segment")
    return None


def _split_sense(h: bytes, data: bytes, name: str) -> tuple[bytes, bytes] | Invalid:
    # RFC 7143 §11.4.7: SenseLength (2 bytes), sense data, response data.
    if not data:
        return b"", b""
    if len(data) < 2:
        return _invalid_field(h, f"{name} data segment of {len(data)} byte(s) has no room for SenseLength")
    sense_bytes = _u16(data, 0)
    if 2 + sense_bytes > len(data):
        return _invalid_field(h, f"{name} SenseLength {sense_bytes} overruns its {len(data)}-byte data segment")
    return data[2:2 + sense_bytes], data[2 + sense_bytes:]


def _parse_command_ahs(ahs: bytes) -> tuple[bytes, int | None] | str:
    """The extended CDB bytes and the bidirectional read length of a SCSI Command's AHS, or why it is malformed.

    RFC 7143 §11.2.2: each AHS is AHSLength (2 bytes, counting from the
    AHS-specific byte on, without padding), AHSType (1 byte) and its body,
    padded to a 4-byte boundary. Unknown types are skipped.
    """
    extended: bytes | None = None
    bidi: int | None = None
    offset = 0
    while offset < len(ahs):
        if len(ahs) - offset < 4:
            return f"AHS truncated at offset {offset}"
        length, kind = struct.unpack_from(">HB", ahs, offset)
        end = offset + 3 + length
        if end > len(ahs):
            return f"AHS at offset {offset} (AHSLength {length}) overruns TotalAHSLength {len(ahs) // 4}"
        body = ahs[offset + 3:end]  # starts with the AHS-specific (reserved) byte
        if kind == AHS_EXTENDED_CDB:
            # §11.2.2.3: only used for CDBs longer than 16 bytes, so at least
            # one CDB byte follows the reserved byte.
            if extended is not None:
                return "two Extended CDB AHS"
            if length < 2:
                return f"Extended CDB AHS with AHSLength {length}"
            extended = body[1:]
        elif kind == AHS_BIDI_READ_LENGTH:
            if bidi is not None:
                return "two Bidirectional Read Expected Data Transfer Length AHS"
            if length != 5:
                return f"Bidirectional Read Expected Data Transfer Length AHS with AHSLength {length}, not 5"
            bidi = _u32(body, 1)
        offset += _pad4(3 + length)
    return extended or b"", bidi


def _dec_nop_out(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.18
    return NopOut(itt=_u32(h, 16), ttt=_u32(h, 20), cmdsn=_u32(h, 24), expstatsn=_u32(h, 28), lun=_lun(h),
                  immediate=bool(h[0] & _I), data=data)


def _dec_scsi_command(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.3
    parsed = _parse_command_ahs(ahs)
    if isinstance(parsed, str):
        return _invalid_field(h, parsed)
    extended, bidi = parsed
    flags = h[1]
    return ScsiCommand(itt=_u32(h, 16), cdb=h[32:48] + extended, edtl=_u32(h, 20), cmdsn=_u32(h, 24),
                       expstatsn=_u32(h, 28), lun=_lun(h), immediate=bool(h[0] & _I), final=bool(flags & _F),
                       read=bool(flags & 0x40), write=bool(flags & 0x20), attr=flags & 0x07,
                       bidi_read_length=bidi, data=data)


def _dec_task_mgmt_request(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.5
    return _no_data(h, data, "Task Management Function Request") or TaskMgmtRequest(
        itt=_u32(h, 16), function=h[1] & 0x7F, rtt=_u32(h, 20), cmdsn=_u32(h, 24), expstatsn=_u32(h, 28),
        refcmdsn=_u32(h, 32), expdatasn=_u32(h, 36), lun=_lun(h), immediate=bool(h[0] & _I))


def _dec_login_request(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.12
    flags = h[1]
    return LoginRequest(itt=_u32(h, 16), isid=h[8:14], tsih=_u16(h, 14), cid=_u16(h, 20), cmdsn=_u32(h, 24),
                        expstatsn=_u32(h, 28), transit=bool(flags & 0x80), cont=bool(flags & 0x40),
                        csg=(flags >> 2) & 0x03, nsg=flags & 0x03, version_max=h[2], version_min=h[3], data=data)


def _dec_text_request(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.10
    return TextRequest(itt=_u32(h, 16), ttt=_u32(h, 20), cmdsn=_u32(h, 24), expstatsn=_u32(h, 28), lun=_lun(h),
                       immediate=bool(h[0] & _I), final=bool(h[1] & _F), cont=bool(h[1] & 0x40), data=data)


def _dec_data_out(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.7
    return DataOut(itt=_u32(h, 16), ttt=_u32(h, 20), expstatsn=_u32(h, 28), datasn=_u32(h, 36),
                   buffer_offset=_u32(h, 40), lun=_lun(h), final=bool(h[1] & _F), data=data)


def _dec_logout_request(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.14
    return _no_data(h, data, "Logout Request") or LogoutRequest(
        itt=_u32(h, 16), reason=h[1] & 0x7F, cid=_u16(h, 20), cmdsn=_u32(h, 24), expstatsn=_u32(h, 28),
        immediate=bool(h[0] & _I))


def _dec_snack_request(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.16
    return _no_data(h, data, "SNACK Request") or SnackRequest(
        itt=_u32(h, 16), type=h[1] & 0x0F, ttt=_u32(h, 20), expstatsn=_u32(h, 28), begrun=_u32(h, 40),
        runlength=_u32(h, 44), lun=_lun(h))


def _dec_nop_in(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.19
    return NopIn(itt=_u32(h, 16), ttt=_u32(h, 20), statsn=_u32(h, 24), expcmdsn=_u32(h, 28), maxcmdsn=_u32(h, 32),
                 lun=_lun(h), data=data)


def _dec_scsi_response(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.4
    split = _split_sense(h, data, "SCSI Response")
    if isinstance(split, Invalid):
        return split
    sense, rest = split
    flags = h[1]
    return ScsiResponse(itt=_u32(h, 16), status=h[3], response=h[2], statsn=_u32(h, 24), expcmdsn=_u32(h, 28),
                        maxcmdsn=_u32(h, 32), expdatasn=_u32(h, 36), overflow=bool(flags & 0x04),
                        underflow=bool(flags & 0x02), bidi_overflow=bool(flags & 0x10),
                        bidi_underflow=bool(flags & 0x08), residual=_u32(h, 44), bidi_residual=_u32(h, 40),
                        sense=sense, data=rest)


def _dec_task_mgmt_response(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.6
    return _no_data(h, data, "Task Management Function Response") or TaskMgmtResponse(
        itt=_u32(h, 16), response=h[2], statsn=_u32(h, 24), expcmdsn=_u32(h, 28), maxcmdsn=_u32(h, 32))


def _dec_login_response(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.13
    flags = h[1]
    return LoginResponse(itt=_u32(h, 16), isid=h[8:14], tsih=_u16(h, 14), statsn=_u32(h, 24),
                         expcmdsn=_u32(h, 28), maxcmdsn=_u32(h, 32), status_class=h[36], status_detail=h[37],
                         transit=bool(flags & 0x80), cont=bool(flags & 0x40), csg=(flags >> 2) & 0x03,
                         nsg=flags & 0x03, version_max=h[2], version_active=h[3], data=data)


def _dec_text_response(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.11
    return TextResponse(itt=_u32(h, 16), ttt=_u32(h, 20), statsn=_u32(h, 24), expcmdsn=_u32(h, 28),
                        maxcmdsn=_u32(h, 32), lun=_lun(h), final=bool(h[1] & _F), cont=bool(h[1] & 0x40),
                        data=data)


def _dec_data_in(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.7
    # Decoded as received, S without F included: what that means is the
    # initiator's business.
    flags = h[1]
    return DataIn(itt=_u32(h, 16), ttt=_u32(h, 20), statsn=_u32(h, 24), expcmdsn=_u32(h, 28), maxcmdsn=_u32(h, 32),
                  datasn=_u32(h, 36), buffer_offset=_u32(h, 40), residual=_u32(h, 44), lun=_lun(h),
                  final=bool(flags & _F), ack=bool(flags & 0x40), overflow=bool(flags & 0x04),
                  underflow=bool(flags & 0x02), status_present=bool(flags & 0x01), status=h[3], data=data)


def _dec_logout_response(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.15
    return _no_data(h, data, "Logout Response") or LogoutResponse(
        itt=_u32(h, 16), response=h[2], statsn=_u32(h, 24), expcmdsn=_u32(h, 28), maxcmdsn=_u32(h, 32),
        time2wait=_u16(h, 40), time2retain=_u16(h, 42))


def _dec_r2t(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.8
    return _no_data(h, data, "R2T") or R2T(
        itt=_u32(h, 16), ttt=_u32(h, 20), statsn=_u32(h, 24), expcmdsn=_u32(h, 28), maxcmdsn=_u32(h, 32),
        r2tsn=_u32(h, 36), buffer_offset=_u32(h, 40), desired_length=_u32(h, 44), lun=_lun(h))


def _dec_async_message(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.9
    split = _split_sense(h, data, "Asynchronous Message")
    if isinstance(split, Invalid):
        return split
    sense, rest = split
    return AsyncMessage(event=h[36], statsn=_u32(h, 24), expcmdsn=_u32(h, 28), maxcmdsn=_u32(h, 32), lun=_lun(h),
                        vcode=h[37], param1=_u16(h, 38), param2=_u16(h, 40), param3=_u16(h, 42), sense=sense,
                        data=rest)


def _dec_reject(h: bytes, ahs: bytes, data: bytes) -> PDU | Invalid:  # §11.17
    if len(data) != BHS_BYTES:
        return _invalid_field(h, f"Reject carries {len(data)} bytes, not the {BHS_BYTES}-byte rejected header")
    return Reject(reason=h[2], bhs=data, statsn=_u32(h, 24), expcmdsn=_u32(h, 28), maxcmdsn=_u32(h, 32),
                  datasn_r2tsn=_u32(h, 36))


_Decode = Callable[[bytes, bytes, bytes], "PDU | Invalid"]

# What each end accepts, by opcode (RFC 7143 §11.1.1). A target decodes what
# initiators send, an initiator what targets send.
_INITIATOR_DECODERS: dict[int, _Decode] = {
    OP_NOP_OUT: _dec_nop_out,
    OP_SCSI_CMD: _dec_scsi_command,
    OP_TASK_MGMT_REQ: _dec_task_mgmt_request,
    OP_LOGIN_REQ: _dec_login_request,
    OP_TEXT_REQ: _dec_text_request,
    OP_DATA_OUT: _dec_data_out,
    OP_LOGOUT_REQ: _dec_logout_request,
    OP_SNACK_REQ: _dec_snack_request,
}
_TARGET_DECODERS: dict[int, _Decode] = {
    OP_NOP_IN: _dec_nop_in,
    OP_SCSI_RSP: _dec_scsi_response,
    OP_TASK_MGMT_RSP: _dec_task_mgmt_response,
    OP_LOGIN_RSP: _dec_login_response,
    OP_TEXT_RSP: _dec_text_response,
    OP_DATA_IN: _dec_data_in,
    OP_LOGOUT_RSP: _dec_logout_response,
    OP_R2T: _dec_r2t,
    OP_ASYNC_MSG: _dec_async_message,
    OP_REJECT: _dec_reject,
}
_FIRST_TARGET_OPCODE = 0x20  # §11.1.1: 0x00-0x1f are initiator opcodes, 0x20-0x3f target opcodes


def _decode_framed(bhs: bytes, ahs: bytes, data: bytes, target: bool) -> PDU | Invalid:
    opcode = bhs[0] & _OPCODE_MASK
    decoders = _INITIATOR_DECODERS if target else _TARGET_DECODERS
    decoder = decoders.get(opcode)
    if decoder is not None:
        return decoder(bhs, ahs, data)
    from_target = opcode >= _FIRST_TARGET_OPCODE
    if from_target == target:
        # A target opcode sent to a target (or the reverse): the peer is
        # confused about its role, which is a protocol error.
        return Invalid(bhs, REJECT_PROTOCOL_ERROR, f"opcode {opcode:#04x} goes the other way")
    return Invalid(bhs, REJECT_COMMAND_NOT_SUPPORTED, f"unknown opcode {opcode:#04x}")


@dataclass(frozen=True, slots=True)
class _Frame:
    """Where the parts of the PDU being received end, fixed when its BHS came in."""

    ahs_end: int  # BHS + AHS
    header_end: int  # ... + header digest
    data_length: int  # DataSegmentLength, unpadded
    end: int  # ... + padded data segment + data digest
    data_digest: bool


class Decoder:
    """Incremental: feed bytes as they arrive, get whole PDUs out. Holds at most one PDU's bytes.

    header_digest, data_digest and max_data_segment are public: the session
    sets them after login, and they apply from the next PDU whose BHS has not
    been completely received yet. (A conforming initiator sends nothing after
    its final Login Request until the final Login Response has come back, so
    the switch cannot fall in the middle of a PDU that was already framed.)

    The buffer never holds more than pdu_bytes_max(max_data_segment) bytes,
    and nothing past the BHS is buffered before its lengths are bounded.
    After a ProtocolError the decoder stays failed: every later feed raises.
    """

    def __init__(self, *, target: bool = True, max_data_segment: int = DEFAULT_DATA_SEGMENT_BYTES_MAX,
                 header_digest: bool = False, data_digest: bool = False) -> None:
        self.target = target
        self.max_data_segment = max_data_segment
        self.header_digest = header_digest
        self.data_digest = data_digest
        self._buffer = bytearray()
        self._frame: _Frame | None = None  # set once the BHS of the current PDU is in
        self._header_checked = False  # the AHS and header digest of the current PDU are in and good
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a PDU."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[PDU | Invalid]:
        """Take the next bytes of the stream; return the PDUs (and Invalids) they complete, in order.

        Raises ProtocolError when the stream cannot be framed any more.
        """
        if self._failed is not None:
            raise ProtocolError(f"decoder failed earlier: {self._failed}", self._failed.reason)
        out: list[PDU | Invalid] = []
        view = memoryview(data).cast("B")
        offset = 0
        while True:
            want = self._want()
            take = min(want - len(self._buffer), len(view) - offset)
            if take > 0:
                self._buffer += view[offset:offset + take]
                offset += take
            if len(self._buffer) < want:
                return out
            try:
                self._step(out)
            except ProtocolError as e:
                self._failed = e
                raise

    def _want(self) -> int:
        """How many bytes the buffer must hold before the next step can run."""
        if self._frame is None:
            return BHS_BYTES
        if not self._header_checked:
            return self._frame.header_end
        return self._frame.end

    def _step(self, out: list[PDU | Invalid]) -> None:
        if self._frame is None:
            self._frame = self._frame_bhs()
        elif not self._header_checked:
            self._check_header(self._frame)
            self._header_checked = True
        else:
            out.append(self._finish(self._frame))

    def _frame_bhs(self) -> _Frame:
        bhs = self._buffer
        data_length = int.from_bytes(bhs[5:8], "big")
        if data_length > self.max_data_segment:
            # Bounded before a byte of the data is buffered: a peer cannot
            # make us hold more than we agreed to (RFC 7143 §13.12).
            raise ProtocolError(f"DataSegmentLength {data_length} is over the limit of {self.max_data_segment} "
                                f"(opcode {bhs[0] & _OPCODE_MASK:#04x})", REJECT_PROTOCOL_ERROR)
        ahs_end = BHS_BYTES + bhs[4] * 4
        header_end = ahs_end + (DIGEST_BYTES if self.header_digest else 0)
        data_digest = self.data_digest and data_length > 0
        end = header_end + _pad4(data_length) + (DIGEST_BYTES if data_digest else 0)
        if end > pdu_bytes_max(self.max_data_segment):
            raise RuntimeError(f"framing bug: a {end}-byte PDU is over pdu_bytes_max")
        return _Frame(ahs_end=ahs_end, header_end=header_end, data_length=data_length, end=end,
                      data_digest=data_digest)

    def _check_header(self, frame: _Frame) -> None:
        if frame.header_end == frame.ahs_end:
            return
        with memoryview(self._buffer) as view:
            expected = _digest(view[:frame.ahs_end])
            received = bytes(view[frame.ahs_end:frame.header_end])
        if received != expected:
            # RFC 7143 §7.8: a header digest error leaves nothing trustworthy
            # to frame by; at ErrorRecoveryLevel 0 the connection is closed.
            raise ProtocolError(f"header digest {received.hex()} does not match {expected.hex()}",
                                REJECT_PROTOCOL_ERROR)

    def _finish(self, frame: _Frame) -> PDU | Invalid:
        raw = bytes(self._buffer)
        self._buffer = bytearray()
        self._frame = None
        self._header_checked = False
        bhs = raw[:BHS_BYTES]
        data_start = frame.header_end
        padded_end = data_start + _pad4(frame.data_length)
        if frame.data_digest:
            expected = _digest(raw[data_start:padded_end])
            received = raw[padded_end:padded_end + DIGEST_BYTES]
            if received != expected:
                # The header was good, so the framing holds: Reject this PDU
                # (RFC 7143 §7.8, reason 0x02) and go on with the next.
                return Invalid(bhs, REJECT_DATA_DIGEST_ERROR,
                               f"data digest {received.hex()} does not match {expected.hex()}")
        return _decode_framed(bhs, raw[BHS_BYTES:frame.ahs_end], raw[data_start:data_start + frame.data_length],
                              self.target)


def decode(buf: bytes, *, target: bool = True, header_digest: bool = False, data_digest: bool = False,
           max_data_segment: int = DEFAULT_DATA_SEGMENT_BYTES_MAX) -> PDU | Invalid:
    """Decode exactly one whole PDU; anything else (a partial PDU, more than one) is a ProtocolError."""
    decoder = Decoder(target=target, max_data_segment=max_data_segment, header_digest=header_digest,
                      data_digest=data_digest)
    items = decoder.feed(buf)
    if len(items) != 1 or decoder.buffered:
        raise ProtocolError(f"expected exactly one whole PDU in {len(buf)} bytes, "
                            f"got {len(items)} and {decoder.buffered} bytes left over")
    return items[0]
