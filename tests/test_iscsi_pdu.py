"""The iSCSI PDU codec (iscsi/pdu.py) against RFC 7143 §11.

Three kinds of test, as for every parser in floe:
  - tables of bytes and values: one hand-written byte vector per PDU type,
    laid out word by word from the RFC 7143 §11 figures, decoded and compared
    with the dataclass it must give, and encoded back to the same bytes; the
    CRC32C examples of RFC 3720 Appendix B.4 pin down the digest and its byte
    order on the wire;
  - round trips: hypothesis builds every dataclass, encode then decode (with
    and without digests) must give it back;
  - fuzzing: streams of PDUs fed whole, byte by byte and in random splits;
    garbage, header-shaped garbage and corrupted streams, after which only
    ProtocolError may escape and the decoder's buffer must stay bounded.
"""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc
from collections.abc import Sequence

import crc32c
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from iscsi import pdu as P

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wire(text: str) -> bytes:
    """Hex bytes written out by hand, one BHS word per line; '#' starts a comment."""
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in text.splitlines()))


def feed_in_pieces(decoder: P.Decoder, data: bytes, sizes: Sequence[int]) -> list[P.PDU | P.Invalid]:
    """Feed data in pieces of the given sizes (cycled; 0 means an empty feed), checking the buffer bound."""
    if not any(sizes):
        sizes = [1]  # pieces of nothing but empty feeds would never get anywhere
    out: list[P.PDU | P.Invalid] = []
    offset = 0
    i = 0
    while offset < len(data):
        size = sizes[i % len(sizes)]
        i += 1
        out.extend(decoder.feed(data[offset:offset + size]))
        offset += size
        assert decoder.buffered <= P.pdu_bytes_max(decoder.max_data_segment)
    return out


# ---------------------------------------------------------------- CRC32C (RFC 3720 Appendix B.4)

# The examples as RFC 3720 Appendix B.4 prints them: the data, then the CRC
# bytes in the order they go on the wire.
CRC_EXAMPLES = [
    ("32 bytes of zeroes", bytes(32), "aa 36 91 8a"),
    ("32 bytes of ones", b"\xff" * 32, "43 ab a8 62"),
    ("32 bytes of incrementing 00..1f", bytes(range(32)), "4e 79 dd 46"),
    ("32 bytes of decrementing 1f..00", bytes(range(31, -1, -1)), "5c db 3f 11"),
]

# RFC 3720 Appendix B.4, "An iSCSI - SCSI Read (10) Command PDU", and its CRC.
RFC3720_READ10 = wire("""
    01 c0 00 00   # 0: opcode 0x01 SCSI Command; F=1 R=1 W=0 ATTR=0
    00 00 00 00   # 4: TotalAHSLength 0, DataSegmentLength 0
    00 00 00 00   # 8: LUN 0
    00 00 00 00
    14 00 00 00   # 16: ITT
    00 00 04 00   # 20: Expected Data Transfer Length 1024
    00 00 00 14   # 24: CmdSN 20
    00 00 00 18   # 28: ExpStatSN 24
    28 00 00 00   # 32: CDB: READ(10)
    00 00 00 00
    02 00 00 00
    00 00 00 00
""")
RFC3720_READ10_DIGEST = bytes.fromhex("56 3a 96 d9")


@pytest.mark.parametrize(("name", "data", "on_wire"), CRC_EXAMPLES, ids=[c[0] for c in CRC_EXAMPLES])
def test_crc32c_examples_of_rfc3720_appendix_b4(name: str, data: bytes, on_wire: str) -> None:
    assert P._digest(data) == bytes.fromhex(on_wire)
    # The CRC register goes out least significant byte first (little-endian),
    # as libiscsi sends and checks it.
    assert crc32c.crc32c(data).to_bytes(4, "little") == bytes.fromhex(on_wire)


def test_rfc3720_read10_command_with_header_digest() -> None:
    cmd = P.ScsiCommand(itt=0x14000000, cdb=bytes.fromhex("28000000 00000000 02000000 00000000"), edtl=1024,
                        cmdsn=20, expstatsn=24, read=True)
    assert P.encode(cmd) == RFC3720_READ10
    assert P.encode(cmd, header_digest=True) == RFC3720_READ10 + RFC3720_READ10_DIGEST
    assert P.decode(RFC3720_READ10 + RFC3720_READ10_DIGEST, header_digest=True) == cmd


# ---------------------------------------------------------------- one vector per PDU type (RFC 7143 §11)

NOP_OUT_HEADER = wire("""
    40 80 00 00   # 0: I=1, opcode 0x00 NOP-Out; byte 1 is always 0x80 (§11.18)
    00 00 00 04   # 4: TotalAHSLength 0, DataSegmentLength 4
    00 00 00 00   # 8: LUN 0
    00 00 00 00
    00 00 00 07   # 16: ITT
    ff ff ff ff   # 20: TTT (none: this is a ping, not an answer)
    00 00 00 11   # 24: CmdSN
    00 00 00 22   # 28: ExpStatSN
    00 00 00 00   # 32-47: reserved
    00 00 00 00
    00 00 00 00
    00 00 00 00
""")

LOGIN_TEXT = b"InitiatorName=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test\0SessionType=Normal\0"

INITIATOR_VECTORS: list[tuple[str, bytes, P.PDU]] = [
    ("nop-out (§11.18)", NOP_OUT_HEADER + b"ping",
     P.NopOut(itt=7, ttt=0xFFFFFFFF, cmdsn=0x11, expstatsn=0x22, lun=0, immediate=True, data=b"ping")),
    ("scsi command, write(10) with immediate data (§11.3)", wire("""
        01 a1 00 00   # 0: opcode 0x01; F=1 R=0 W=1 ATTR=1 (simple)
        00 00 00 06   # 4: TotalAHSLength 0, DataSegmentLength 6
        00 01 00 00   # 8: LUN 1 (SAM flat addressing: 1 << 48)
        00 00 00 00
        00 00 00 2a   # 16: ITT
        00 00 02 00   # 20: Expected Data Transfer Length 512
        00 00 00 03   # 24: CmdSN
        00 00 00 04   # 28: ExpStatSN
        2a 08 00 00   # 32: CDB: WRITE(10) FUA, LBA 0x10, 1 block
        00 10 00 00
        01 00 00 00
        00 00 00 00
        de ad be ef 01 02 00 00  # immediate data, 2 bytes of padding
    """), P.ScsiCommand(itt=0x2A, cdb=bytes.fromhex("2a080000 00100000 01000000 00000000"), edtl=512, cmdsn=3,
                        expstatsn=4, lun=1 << 48, write=True, attr=1, data=bytes.fromhex("deadbeef0102"))),
    ("task management function request, abort task (§11.5)", wire("""
        42 81 00 00   # 0: I=1, opcode 0x02; byte 1: 1, function 1 ABORT TASK
        00 00 00 00   # 4: no AHS, no data
        00 01 00 00   # 8: LUN 1
        00 00 00 00
        00 00 00 30   # 16: ITT
        00 00 00 2a   # 20: Referenced Task Tag
        00 00 00 05   # 24: CmdSN
        00 00 00 06   # 28: ExpStatSN
        00 00 00 04   # 32: RefCmdSN
        00 00 00 09   # 36: ExpDataSN
        00 00 00 00   # 40-47: reserved
        00 00 00 00
    """), P.TaskMgmtRequest(itt=0x30, function=1, rtt=0x2A, cmdsn=5, expstatsn=6, refcmdsn=4, expdatasn=9,
                            lun=1 << 48, immediate=True)),
    ("login request, operational stage to full feature, libiscsi-style (§11.12)", wire("""
        43 87 00 00   # 0: I=1 (always, §11.12), opcode 0x03; T=1 C=0 CSG=1 NSG=3; Version-max 0, Version-min 0
        00 00 00 55   # 4: TotalAHSLength 0, DataSegmentLength 85
        80 12 34 56   # 8: ISID 80 12 34 56 78 9a (type 2, random)
        78 9a 00 00   # 14: TSIH 0 (new session)
        00 00 00 01   # 16: ITT
        00 00 00 00   # 20: CID 0, reserved
        00 00 00 01   # 24: CmdSN
        00 00 00 00   # 28: ExpStatSN
        00 00 00 00   # 32-47: reserved
        00 00 00 00
        00 00 00 00
        00 00 00 00
    """) + LOGIN_TEXT + b"\0\0\0", P.LoginRequest(itt=1, isid=bytes.fromhex("80123456789a"), cmdsn=1, transit=True,
                                                  csg=1, nsg=3, data=LOGIN_TEXT)),
    ("text request, SendTargets (§11.10)", wire("""
        44 80 00 00   # 0: I=1, opcode 0x04; F=1 C=0
        00 00 00 10   # 4: DataSegmentLength 16
        00 00 00 00   # 8: LUN 0
        00 00 00 00
        00 00 00 02   # 16: ITT
        ff ff ff ff   # 20: TTT (a new request)
        00 00 00 02   # 24: CmdSN
        00 00 00 01   # 28: ExpStatSN
        00 00 00 00   # 32-47: reserved
        00 00 00 00
        00 00 00 00
        00 00 00 00
    """) + b"SendTargets=All\0", P.TextRequest(itt=2, cmdsn=2, expstatsn=1, immediate=True, data=b"SendTargets=All\0")),
    ("scsi data-out (§11.7)", wire("""
        05 80 00 00   # 0: opcode 0x05; F=1
        00 00 00 05   # 4: DataSegmentLength 5
        00 00 00 00   # 8: LUN 0
        00 00 00 00
        00 00 00 10   # 16: ITT
        00 00 12 34   # 20: TTT (from the R2T)
        00 00 00 00   # 24: reserved
        00 00 00 03   # 28: ExpStatSN
        00 00 00 00   # 32: reserved
        00 00 00 01   # 36: DataSN
        00 00 20 00   # 40: Buffer Offset
        00 00 00 00   # 44: reserved
        68 65 6c 6c   # data "hello" and 3 bytes of padding
        6f 00 00 00
    """), P.DataOut(itt=0x10, ttt=0x1234, expstatsn=3, datasn=1, buffer_offset=0x2000, final=True, data=b"hello")),
    ("logout request (§11.14)", wire("""
        46 80 00 00   # 0: I=1, opcode 0x06; byte 1: 1, reason 0 (close the session)
        00 00 00 00
        00 00 00 00   # 8-15: reserved
        00 00 00 00
        00 00 00 09   # 16: ITT
        00 01 00 00   # 20: CID 1, reserved
        00 00 00 07   # 24: CmdSN
        00 00 00 08   # 28: ExpStatSN
        00 00 00 00   # 32-47: reserved
        00 00 00 00
        00 00 00 00
        00 00 00 00
    """), P.LogoutRequest(itt=9, reason=0, cid=1, cmdsn=7, expstatsn=8, immediate=True)),
    ("snack request (§11.16)", wire("""
        10 81 00 00   # 0: opcode 0x10; byte 1: 1, Type 1 (status SNACK)
        00 00 00 00
        00 00 00 00   # 8: LUN 0
        00 00 00 00
        ff ff ff ff   # 16: ITT
        00 00 00 0b   # 20: TTT or SNACK Tag
        00 00 00 00   # 24: reserved
        00 00 00 44   # 28: ExpStatSN
        00 00 00 00   # 32-39: reserved
        00 00 00 00
        00 00 00 03   # 40: BegRun
        00 00 00 02   # 44: RunLength
    """), P.SnackRequest(itt=0xFFFFFFFF, type=1, ttt=0x0B, expstatsn=0x44, begrun=3, runlength=2)),
]

REJECTED_HEADER = NOP_OUT_HEADER
FIXED_SENSE_INVALID_OPCODE = bytes.fromhex("70 00 05 00 00 00 00 0a 00 00 00 00 20 00 00 00 00 00")
UNIT_ATTENTION_SENSE = bytes.fromhex("70 00 06 00 00 00 00 0a 00 00 00 00 2a 09 00 00 00 00")

TARGET_VECTORS: list[tuple[str, bytes, P.PDU]] = [
    ("nop-in, a target ping (§11.19)", wire("""
        20 80 00 00   # 0: opcode 0x20; byte 1 is always 0x80
        00 00 00 00
        00 00 00 00   # 8: LUN 0
        00 00 00 00
        ff ff ff ff   # 16: ITT (unsolicited)
        00 00 0a bc   # 20: TTT (answer expected)
        00 00 00 10   # 24: StatSN
        00 00 00 11   # 28: ExpCmdSN
        00 00 00 30   # 32: MaxCmdSN
        00 00 00 00   # 36-47: reserved
        00 00 00 00
        00 00 00 00
    """), P.NopIn(itt=0xFFFFFFFF, ttt=0xABC, statsn=0x10, expcmdsn=0x11, maxcmdsn=0x30)),
    ("scsi response, check condition with sense (§11.4)", wire("""
        21 80 00 02   # 0: opcode 0x21; byte 1: 1, no o/u/O/U; Response 0; Status 0x02 CHECK CONDITION
        00 00 00 14   # 4: DataSegmentLength 20 = 2 + 18
        00 00 00 00   # 8-15: reserved
        00 00 00 00
        00 00 00 30   # 16: ITT
        00 00 00 00   # 20: SNACK Tag
        00 00 00 05   # 24: StatSN
        00 00 00 06   # 28: ExpCmdSN
        00 00 00 25   # 32: MaxCmdSN
        00 00 00 00   # 36: ExpDataSN
        00 00 00 00   # 40: Bidirectional Read Residual Count
        00 00 00 00   # 44: Residual Count
        00 12         # SenseLength 18, then fixed-format sense: ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE
        70 00 05 00 00 00 00 0a 00 00 00 00 20 00 00 00 00 00
    """), P.ScsiResponse(itt=0x30, status=0x02, statsn=5, expcmdsn=6, maxcmdsn=0x25,
                         sense=FIXED_SENSE_INVALID_OPCODE)),
    ("scsi response, underflow and bidi overflow (§11.4)", wire("""
        21 92 01 00   # 0: byte 1: 1, o=1 (0x10), U=1 (0x02); Response 1 (target failure); Status 0
        00 00 00 00
        00 00 00 00
        00 00 00 00
        00 00 00 31   # 16: ITT
        00 00 00 00   # 20: SNACK Tag
        00 00 00 07   # 24: StatSN
        00 00 00 08   # 28: ExpCmdSN
        00 00 00 27   # 32: MaxCmdSN
        00 00 00 02   # 36: ExpDataSN
        00 00 00 40   # 40: Bidirectional Read Residual Count
        00 00 02 00   # 44: Residual Count
    """), P.ScsiResponse(itt=0x31, response=1, statsn=7, expcmdsn=8, maxcmdsn=0x27, expdatasn=2, underflow=True,
                         bidi_overflow=True, residual=0x200, bidi_residual=0x40)),
    ("task management function response (§11.6)", wire("""
        22 80 01 00   # 0: opcode 0x22; byte 1 always 0x80; Response 1 (task does not exist)
        00 00 00 00
        00 00 00 00   # 8-15: reserved
        00 00 00 00
        00 00 00 30   # 16: ITT
        00 00 00 00   # 20: reserved
        00 00 00 0c   # 24: StatSN
        00 00 00 0d   # 28: ExpCmdSN
        00 00 00 2c   # 32: MaxCmdSN
        00 00 00 00   # 36-47: reserved
        00 00 00 00
        00 00 00 00
    """), P.TaskMgmtResponse(itt=0x30, response=1, statsn=0x0C, expcmdsn=0x0D, maxcmdsn=0x2C)),
    ("login response, redirect (§11.13)", wire("""
        23 81 00 00   # 0: opcode 0x23; T=1 C=0 CSG=0 NSG=1; Version-max 0, Version-active 0
        00 00 00 1e   # 4: DataSegmentLength 30
        80 12 34 56   # 8: ISID
        78 9a 00 05   # 14: TSIH 5
        00 00 00 01   # 16: ITT
        00 00 00 00   # 20: reserved
        00 00 00 00   # 24: StatSN
        00 00 00 01   # 28: ExpCmdSN
        00 00 00 01   # 32: MaxCmdSN
        01 01 00 00   # 36: Status-Class 1 (redirection), Status-Detail 1 (moved temporarily)
        00 00 00 00   # 40-47: reserved
        00 00 00 00
    """) + b"TargetAddress=10.0.0.2:3260,1\0" + b"\0\0",
     P.LoginResponse(itt=1, isid=bytes.fromhex("80123456789a"), tsih=5, expcmdsn=1, maxcmdsn=1, status_class=1,
                     status_detail=1, transit=True, csg=0, nsg=1, data=b"TargetAddress=10.0.0.2:3260,1\0")),
    ("text response, SendTargets (§11.11)", wire("""
        24 80 00 00   # 0: opcode 0x24; F=1 C=0
        00 00 00 42   # 4: DataSegmentLength 66
        00 00 00 00   # 8: LUN 0
        00 00 00 00
        00 00 00 02   # 16: ITT
        ff ff ff ff   # 20: TTT (no continuation)
        00 00 00 01   # 24: StatSN
        00 00 00 03   # 28: ExpCmdSN
        00 00 00 22   # 32: MaxCmdSN
        00 00 00 00   # 36-47: reserved
        00 00 00 00
        00 00 00 00
    """) + b"TargetName=iqn.2026-11.io.floe:t.v\0TargetAddress=127.0.0.1:3260,1\0" + b"\0\0",
     P.TextResponse(itt=2, statsn=1, expcmdsn=3, maxcmdsn=0x22,
                    data=b"TargetName=iqn.2026-11.io.floe:t.v\0TargetAddress=127.0.0.1:3260,1\0")),
    ("scsi data-in with phase-collapsed status and underflow (§11.7)", wire("""
        25 83 00 00   # 0: opcode 0x25; F=1 A=0 O=0 U=1 S=1; reserved; Status 0 GOOD
        00 00 00 08   # 4: DataSegmentLength 8
        00 00 00 00   # 8: LUN 0
        00 00 00 00
        00 00 00 30   # 16: ITT
        ff ff ff ff   # 20: TTT
        00 00 00 05   # 24: StatSN
        00 00 00 06   # 28: ExpCmdSN
        00 00 00 25   # 32: MaxCmdSN
        00 00 00 02   # 36: DataSN
        00 00 10 00   # 40: Buffer Offset
        00 00 01 f8   # 44: Residual Count
        01 02 03 04   # data
        05 06 07 08
    """), P.DataIn(itt=0x30, statsn=5, expcmdsn=6, maxcmdsn=0x25, datasn=2, buffer_offset=0x1000, residual=0x1F8,
                   final=True, underflow=True, status_present=True, status=0, data=bytes(range(1, 9)))),
    ("scsi data-in, not final, ack requested (§11.7)", wire("""
        25 40 00 00   # 0: F=0 A=1 O=0 U=0 S=0
        00 00 00 01   # 4: DataSegmentLength 1
        00 02 00 00   # 8: LUN 2
        00 00 00 00
        00 00 00 33   # 16: ITT
        00 00 00 44   # 20: TTT
        00 00 00 00   # 24: StatSN (reserved without S)
        00 00 00 06   # 28: ExpCmdSN
        00 00 00 25   # 32: MaxCmdSN
        00 00 00 00   # 36: DataSN
        00 00 00 00   # 40: Buffer Offset
        00 00 00 00   # 44: Residual Count
        ff 00 00 00   # data and 3 bytes of padding
    """), P.DataIn(itt=0x33, ttt=0x44, expcmdsn=6, maxcmdsn=0x25, lun=2 << 48, ack=True, data=b"\xff")),
    ("logout response (§11.15)", wire("""
        26 80 00 00   # 0: opcode 0x26; byte 1 always 0x80; Response 0 (closed successfully)
        00 00 00 00
        00 00 00 00   # 8-15: reserved
        00 00 00 00
        00 00 00 09   # 16: ITT
        00 00 00 00   # 20: reserved
        00 00 00 08   # 24: StatSN
        00 00 00 08   # 28: ExpCmdSN
        00 00 00 27   # 32: MaxCmdSN
        00 00 00 00   # 36: reserved
        00 02 00 14   # 40: Time2Wait 2, Time2Retain 20
        00 00 00 00   # 44: reserved
    """), P.LogoutResponse(itt=9, statsn=8, expcmdsn=8, maxcmdsn=0x27, time2wait=2, time2retain=20)),
    ("ready to transfer (§11.8)", wire("""
        31 80 00 00   # 0: opcode 0x31; byte 1 always 0x80
        00 00 00 00
        00 01 00 00   # 8: LUN 1
        00 00 00 00
        00 00 00 31   # 16: ITT
        00 00 00 05   # 20: TTT
        00 00 00 07   # 24: StatSN
        00 00 00 08   # 28: ExpCmdSN
        00 00 00 09   # 32: MaxCmdSN
        00 00 00 01   # 36: R2TSN
        00 00 10 00   # 40: Buffer Offset
        00 00 20 00   # 44: Desired Data Transfer Length
    """), P.R2T(itt=0x31, ttt=5, statsn=7, expcmdsn=8, maxcmdsn=9, r2tsn=1, buffer_offset=0x1000,
                desired_length=0x2000, lun=1 << 48)),
    ("asynchronous message, logout requested (§11.9)", wire("""
        32 80 00 00   # 0: opcode 0x32; byte 1 always 0x80
        00 00 00 00
        00 00 00 00   # 8: LUN 0
        00 00 00 00
        ff ff ff ff   # 16: 0xffffffff
        00 00 00 00   # 20: reserved
        00 00 00 0a   # 24: StatSN
        00 00 00 0b   # 28: ExpCmdSN
        00 00 00 2b   # 32: MaxCmdSN
        01 00 00 00   # 36: AsyncEvent 1, AsyncVCode 0, Parameter1 0
        00 00 00 05   # 40: Parameter2 0, Parameter3 5 (seconds to log out in)
        00 00 00 00   # 44: reserved
    """), P.AsyncMessage(event=1, statsn=0x0A, expcmdsn=0x0B, maxcmdsn=0x2B, param3=5)),
    ("asynchronous message, scsi async event with sense (§11.9)", wire("""
        32 80 00 00
        00 00 00 14   # 4: DataSegmentLength 20 = 2 + 18
        00 03 00 00   # 8: LUN 3
        00 00 00 00
        ff ff ff ff
        00 00 00 00
        00 00 00 0a
        00 00 00 0b
        00 00 00 2b
        00 07 00 01   # 36: AsyncEvent 0, AsyncVCode 7, Parameter1 1
        00 02 00 03   # 40: Parameter2 2, Parameter3 3
        00 00 00 00
        00 12         # SenseLength 18: UNIT ATTENTION, CAPACITY DATA HAS CHANGED
        70 00 06 00 00 00 00 0a 00 00 00 00 2a 09 00 00 00 00
    """), P.AsyncMessage(event=0, statsn=0x0A, expcmdsn=0x0B, maxcmdsn=0x2B, lun=3 << 48, vcode=7, param1=1,
                         param2=2, param3=3, sense=UNIT_ATTENTION_SENSE)),
    ("reject (§11.17)", wire("""
        3f 80 09 00   # 0: opcode 0x3f; byte 1 always 0x80; Reason 0x09 invalid PDU field
        00 00 00 30   # 4: DataSegmentLength 48: the rejected header
        00 00 00 00   # 8-15: reserved
        00 00 00 00
        ff ff ff ff   # 16: 0xffffffff
        00 00 00 00   # 20: reserved
        00 00 00 0e   # 24: StatSN
        00 00 00 0f   # 28: ExpCmdSN
        00 00 00 2f   # 32: MaxCmdSN
        00 00 00 00   # 36: DataSN/R2TSN
        00 00 00 00   # 40-47: reserved
        00 00 00 00
    """) + REJECTED_HEADER, P.Reject(reason=0x09, bhs=REJECTED_HEADER, statsn=0x0E, expcmdsn=0x0F, maxcmdsn=0x2F)),
]


@pytest.mark.parametrize(("name", "raw", "expected"), INITIATOR_VECTORS, ids=[v[0] for v in INITIATOR_VECTORS])
def test_initiator_pdu_vectors(name: str, raw: bytes, expected: P.PDU) -> None:
    assert P.decode(raw, target=True) == expected
    assert P.encode(expected) == raw


@pytest.mark.parametrize(("name", "raw", "expected"), TARGET_VECTORS, ids=[v[0] for v in TARGET_VECTORS])
def test_target_pdu_vectors(name: str, raw: bytes, expected: P.PDU) -> None:
    assert P.decode(raw, target=False) == expected
    assert P.encode(expected) == raw


def test_every_pdu_type_has_a_vector() -> None:
    covered = {type(v[2]) for v in INITIATOR_VECTORS + TARGET_VECTORS}
    assert covered == set(P._ENCODERS)


def test_login_request_i_bit_is_always_set_and_ignored_on_receipt() -> None:
    raw = bytearray(P.encode(P.LoginRequest(itt=1, isid=bytes(6))))
    assert raw[0] == 0x43
    raw[0] = 0x03
    assert P.decode(bytes(raw)) == P.LoginRequest(itt=1, isid=bytes(6))


def test_reserved_fields_are_ignored_on_receipt() -> None:
    # RFC 7143 §11: receivers ignore reserved fields and undefined bits.
    # Byte 0 bit 7, byte 1 bits 6-0 and bytes 32-47 of a NOP-Out are reserved.
    raw = bytearray(NOP_OUT_HEADER + b"ping")
    raw[0] |= 0x80
    raw[1] |= 0x7F
    raw[2] = 0xAA
    raw[32:48] = b"\xee" * 16
    assert P.decode(bytes(raw)) == INITIATOR_VECTORS[0][2]


# ---------------------------------------------------------------- AHS (RFC 7143 §11.2.2)

# A 32-byte variable-length CDB (opcode 0x7f, additional CDB length 0x18).
CDB32 = bytes.fromhex("7f 00 00 00 00 00 00 18 00 09 00 00 00 00 00 00"
                      "00 00 00 00 00 00 00 10 00 00 00 00 00 00 00 08")


def test_extended_cdb_and_bidi_read_length_ahs() -> None:
    cmd = P.ScsiCommand(itt=5, cdb=CDB32, edtl=4096, read=True, write=True, bidi_read_length=0x1000)
    raw = wire("""
        01 e0 00 00   # 0: F=1 R=1 W=1
        07 00 00 00   # 4: TotalAHSLength 7 words (20 + 8 bytes), DataSegmentLength 0
        00 00 00 00
        00 00 00 00
        00 00 00 05   # 16: ITT
        00 00 10 00   # 20: Expected Data Transfer Length
        00 00 00 00
        00 00 00 00
        7f 00 00 00   # 32: the first 16 bytes of the CDB
        00 00 00 18
        00 09 00 00
        00 00 00 00
        00 11 01 00   # AHS: AHSLength 17 (= CDBLength - 15), AHSType 1 Extended CDB, reserved
        00 00 00 00   # the other 16 CDB bytes
        00 00 00 10
        00 00 00 00
        00 00 00 08
        00 05 02 00   # AHS: AHSLength 5, AHSType 2 Bidirectional Read Expected Data Transfer Length, reserved
        00 00 10 00   # 4096
    """)
    assert P.encode(cmd) == raw
    assert P.decode(raw) == cmd
    assert P.decode(P.encode(cmd, header_digest=True, data_digest=True), header_digest=True, data_digest=True) == cmd


def test_extended_cdb_ahs_is_padded() -> None:
    cdb17 = bytes(range(1, 18))
    raw = P.encode(P.ScsiCommand(itt=1, cdb=cdb17))
    assert raw[4] == 2  # 3 + AHSLength 2 = 5 bytes, padded to 8
    assert raw[48:56] == bytes.fromhex("00 02 01 00 11 00 00 00")
    assert P.decode(raw) == P.ScsiCommand(itt=1, cdb=cdb17)


def test_short_cdb_is_zero_filled_to_16_bytes() -> None:
    raw = P.encode(P.ScsiCommand(itt=1, cdb=bytes.fromhex("00 00 00 00 00 00")))  # TEST UNIT READY
    assert raw[32:48] == bytes(16)
    decoded = P.decode(raw)
    assert isinstance(decoded, P.ScsiCommand)
    assert decoded.cdb == bytes(16)


def _command_with_ahs(ahs: bytes) -> bytes:
    raw = bytearray(P.encode(P.ScsiCommand(itt=1, cdb=bytes(16))))
    raw[4] = len(ahs) // 4
    return bytes(raw) + ahs


def test_unknown_ahs_types_are_ignored() -> None:
    decoded = P.decode(_command_with_ahs(bytes.fromhex("00 05 3c 00 01 02 03 04")))
    assert decoded == P.ScsiCommand(itt=1, cdb=bytes(16))


@pytest.mark.parametrize(("name", "ahs"), [
    ("extended CDB AHS with no CDB bytes", "00 01 01 00"),
    ("AHS overrunning TotalAHSLength", "00 09 01 00 01 02 03 04"),
    ("bidi read length AHS of the wrong length", "00 04 02 00 00 00 10 00"),
    ("two bidi read length AHS", "00 05 02 00 00 00 10 00 00 05 02 00 00 00 10 00"),
    ("two extended CDB AHS", "00 02 01 00 11 00 00 00 00 02 01 00 12 00 00 00"),
])
def test_malformed_ahs_is_an_invalid_pdu_field(name: str, ahs: str) -> None:
    raw = _command_with_ahs(bytes.fromhex(ahs))
    decoded = P.decode(raw)
    assert isinstance(decoded, P.Invalid)
    assert decoded.reason == P.REJECT_INVALID_PDU_FIELD
    assert decoded.bhs == raw[:48]


# ---------------------------------------------------------------- padding and data segments


@pytest.mark.parametrize("length", range(9))
def test_data_segment_padding(length: int) -> None:
    data = bytes(range(0x61, 0x61 + length))
    nop = P.NopOut(itt=1, data=data)
    raw = P.encode(nop)
    padded = (length + 3) // 4 * 4
    assert len(raw) == 48 + padded
    assert int.from_bytes(raw[5:8], "big") == length  # DataSegmentLength does not count the padding
    assert raw[48 + length:] == bytes(padded - length)
    assert P.decode(raw) == nop
    # The data digest covers the padding (RFC 7143 §11.2.3) and is absent without data.
    raw = P.encode(nop, data_digest=True)
    if length:
        assert raw[-4:] == crc32c.crc32c(data + bytes(padded - length)).to_bytes(4, "little")
        assert len(raw) == 48 + padded + 4
    else:
        assert len(raw) == 48
    assert P.decode(raw, data_digest=True) == nop


def test_padding_bytes_are_ignored_on_receipt() -> None:
    raw = bytearray(P.encode(P.NopOut(itt=1, data=b"a")))
    raw[49:52] = b"xyz"
    assert P.decode(bytes(raw)) == P.NopOut(itt=1, data=b"a")


def test_sense_data_with_response_data_after_it() -> None:
    rsp = P.ScsiResponse(itt=1, status=2, sense=b"\x70" + bytes(17), data=b"extra")
    raw = P.encode(rsp)
    assert raw[48:50] == b"\x00\x12"
    assert raw[50:68] == rsp.sense
    assert raw[68:73] == b"extra"
    assert P.decode(raw, target=False) == rsp
    # Response data without sense still gets a SenseLength of 0 in front.
    rsp = P.ScsiResponse(itt=1, data=b"xy")
    assert P.encode(rsp)[48:52] == b"\x00\x00xy"
    assert P.decode(P.encode(rsp), target=False) == rsp


@pytest.mark.parametrize(("opcode", "segment"), [
    (P.OP_SCSI_RSP, b"\x00"),  # no room for SenseLength
    (P.OP_SCSI_RSP, b"\x00\x0a" + bytes(5)),  # SenseLength 10, only 5 bytes follow
    (P.OP_ASYNC_MSG, b"\xff\xff" + bytes(6)),
])
def test_sense_length_overrunning_the_segment_is_invalid(opcode: int, segment: bytes) -> None:
    header = bytearray(48)
    header[0] = opcode
    header[1] = 0x80
    header[5:8] = len(segment).to_bytes(3, "big")
    padded = segment + bytes(-len(segment) % 4)
    decoded = P.decode(bytes(header) + padded, target=False)
    assert isinstance(decoded, P.Invalid)
    assert decoded.reason == P.REJECT_INVALID_PDU_FIELD
    assert decoded.bhs == bytes(header)


@pytest.mark.parametrize(("pdu", "target"), [
    (P.TaskMgmtRequest(itt=1, function=1), True),
    (P.LogoutRequest(itt=1), True),
    (P.SnackRequest(itt=1), True),
    (P.TaskMgmtResponse(itt=1), False),
    (P.LogoutResponse(itt=1), False),
    (P.R2T(itt=1, ttt=2), False),
])
def test_data_segment_on_a_pdu_that_has_none_is_invalid(pdu: P.PDU, target: bool) -> None:
    raw = bytearray(P.encode(pdu))
    raw[7] = 4
    decoded = P.decode(bytes(raw) + b"abcd", target=target)
    assert isinstance(decoded, P.Invalid)
    assert decoded.reason == P.REJECT_INVALID_PDU_FIELD


def test_reject_must_carry_a_whole_header() -> None:
    raw = bytearray(P.encode(P.Reject(reason=4, bhs=bytes(48))))
    raw[5:8] = (44).to_bytes(3, "big")
    decoded = P.decode(bytes(raw[:48 + 44]), target=False)
    assert isinstance(decoded, P.Invalid)
    assert decoded.reason == P.REJECT_INVALID_PDU_FIELD


def test_data_in_is_decoded_faithfully_even_with_s_but_not_f() -> None:
    raw = bytearray(P.encode(P.DataIn(itt=1, final=True, status_present=True, status=2, residual=3)))
    raw[1] = 0x01  # S without F: not legal, but the initiator's to judge
    assert P.decode(bytes(raw), target=False) == P.DataIn(itt=1, status_present=True, status=2, residual=3)


# ---------------------------------------------------------------- opcodes and direction


def test_unknown_initiator_opcode_is_command_not_supported_and_decoding_goes_on() -> None:
    header = bytearray(48)
    header[0] = 0x1C  # vendor specific
    header[7] = 3
    stream = bytes(header) + b"abc\0" + P.encode(P.NopOut(itt=9))
    decoder = P.Decoder(target=True)
    out = decoder.feed(stream)
    assert len(out) == 2
    assert isinstance(out[0], P.Invalid)
    assert (out[0].bhs, out[0].reason) == (bytes(header), P.REJECT_COMMAND_NOT_SUPPORTED)
    assert out[1] == P.NopOut(itt=9)
    assert decoder.buffered == 0


@pytest.mark.parametrize(("pdu", "target"), [
    (P.NopIn(), True),
    (P.R2T(itt=1, ttt=1), True),
    (P.NopOut(), False),
    (P.LoginRequest(itt=1, isid=bytes(6)), False),
])
def test_wrong_direction_opcode_is_a_protocol_error_reject(pdu: P.PDU, target: bool) -> None:
    decoder = P.Decoder(target=target)
    out = decoder.feed(P.encode(pdu) + P.encode(pdu))
    assert len(out) == 2
    for item in out:
        assert isinstance(item, P.Invalid)
        assert item.reason == P.REJECT_PROTOCOL_ERROR
        assert item.bhs == P.encode(pdu)[:48]


def test_unknown_target_opcode_seen_by_an_initiator() -> None:
    header = bytearray(48)
    header[0] = 0x3C
    decoded = P.decode(bytes(header), target=False)
    assert isinstance(decoded, P.Invalid)
    assert decoded.reason == P.REJECT_COMMAND_NOT_SUPPORTED


# ---------------------------------------------------------------- digests


def test_wrong_header_digest_is_a_protocol_error_and_the_decoder_stays_failed() -> None:
    raw = bytearray(P.encode(P.NopOut(itt=1, data=b"abcd"), header_digest=True))
    raw[48] ^= 0x01
    decoder = P.Decoder(header_digest=True)
    with pytest.raises(P.ProtocolError):
        decoder.feed(bytes(raw))
    with pytest.raises(P.ProtocolError):
        decoder.feed(P.encode(P.NopOut(itt=2), header_digest=True))


def test_header_digest_is_checked_before_the_data_segment_arrives() -> None:
    raw = bytearray(P.encode(P.NopOut(itt=1, data=bytes(4000)), header_digest=True))
    raw[20] ^= 0xFF  # corrupt the TTT
    decoder = P.Decoder(header_digest=True)
    with pytest.raises(P.ProtocolError):
        decoder.feed(bytes(raw[:52]))


def test_byte_order_of_the_header_digest_matters() -> None:
    raw = bytearray(RFC3720_READ10 + RFC3720_READ10_DIGEST[::-1])
    with pytest.raises(P.ProtocolError):
        P.decode(bytes(raw), header_digest=True)


def test_wrong_data_digest_is_rejected_and_the_next_pdu_still_decodes() -> None:
    bad = bytearray(P.encode(P.DataOut(itt=1, ttt=2, data=b"hello"), header_digest=True, data_digest=True))
    bad[-1] ^= 0x80
    good = P.encode(P.DataOut(itt=3, ttt=4, data=b"world"), header_digest=True, data_digest=True)
    decoder = P.Decoder(header_digest=True, data_digest=True)
    out = decoder.feed(bytes(bad) + good)
    assert len(out) == 2
    assert isinstance(out[0], P.Invalid)
    assert out[0].reason == P.REJECT_DATA_DIGEST_ERROR
    assert out[0].bhs == bad[:48]
    assert out[1] == P.DataOut(itt=3, ttt=4, data=b"world")


def test_corrupt_data_under_a_good_data_digest_field_is_caught() -> None:
    bad = bytearray(P.encode(P.NopOut(itt=1, data=b"abcdefgh"), data_digest=True))
    bad[50] ^= 0x01
    decoded = P.decode(bytes(bad), data_digest=True)
    assert isinstance(decoded, P.Invalid)
    assert decoded.reason == P.REJECT_DATA_DIGEST_ERROR


def test_digest_settings_apply_from_the_next_pdu() -> None:
    # The session turns digests on after the final Login Response.
    decoder = P.Decoder()
    login = P.LoginRequest(itt=1, isid=bytes(6), transit=True, csg=1, nsg=3)
    assert decoder.feed(P.encode(login)) == [login]
    decoder.header_digest = decoder.data_digest = True
    nop = P.NopOut(itt=2, data=b"ping")
    raw = P.encode(nop, header_digest=True, data_digest=True)
    assert decoder.feed(raw[:20]) == []
    assert decoder.feed(raw[20:]) == [nop]


# ---------------------------------------------------------------- bounds


def test_absurd_data_segment_length_is_refused_before_buffering() -> None:
    header = bytearray(P.encode(P.NopOut(itt=1)))
    header[5:8] = b"\xff\xff\xff"
    stream = bytes(header) + bytes(1 << 20)
    decoder = P.Decoder(max_data_segment=8192)
    tracemalloc.start()
    try:
        with pytest.raises(P.ProtocolError) as caught:
            decoder.feed(stream)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason == P.REJECT_PROTOCOL_ERROR
    assert decoder.buffered == 48
    # The input (1 MiB) was allocated before tracing; the decoder itself must
    # not have copied it.
    assert peak_bytes < 64 * 1024


def test_data_segment_at_the_limit_is_accepted() -> None:
    nop = P.NopOut(itt=1, data=bytes(8192))
    assert P.decode(P.encode(nop), max_data_segment=8192) == nop
    with pytest.raises(P.ProtocolError):
        P.decode(P.encode(P.NopOut(itt=1, data=bytes(8193))), max_data_segment=8192)


def test_pdu_bytes_max() -> None:
    assert P.pdu_bytes_max(8192) == 48 + 1020 + 4 + 8192 + 4
    assert P.pdu_bytes_max(8190) == 48 + 1020 + 4 + 8192 + 4
    assert P.pdu_bytes_max(1 << 30) == 48 + 1020 + 4 + 0x1000000 + 4


def test_decode_wants_exactly_one_pdu() -> None:
    one = P.encode(P.NopOut(itt=1))
    with pytest.raises(P.ProtocolError):
        P.decode(one + one)
    with pytest.raises(P.ProtocolError):
        P.decode(one[:47])
    with pytest.raises(P.ProtocolError):
        P.decode(b"")


# ---------------------------------------------------------------- encode refuses what does not fit


@pytest.mark.parametrize("pdu", [
    P.NopOut(itt=1 << 32),
    P.NopOut(cmdsn=-1),
    P.NopOut(lun=1 << 64),
    P.ScsiCommand(itt=1, cdb=bytes(16), attr=8),
    P.ScsiCommand(itt=1, cdb=bytes(16), edtl=1 << 32),
    P.ScsiCommand(itt=1, cdb=bytes(16), bidi_read_length=-1),
    P.ScsiCommand(itt=1, cdb=bytes(16 + 1020)),  # the Extended CDB AHS would not fit TotalAHSLength
    P.TaskMgmtRequest(itt=1, function=128),
    P.LoginRequest(itt=1, isid=bytes(5)),
    P.LoginRequest(itt=1, isid=bytes(6), csg=4),
    P.LoginRequest(itt=1, isid=bytes(6), version_max=256),
    P.LoginRequest(itt=1, isid=bytes(6), tsih=1 << 16),
    P.LogoutRequest(itt=1, reason=128),
    P.SnackRequest(itt=1, type=16),
    P.ScsiResponse(itt=1, status=256),
    P.ScsiResponse(itt=1, sense=bytes(1 << 16)),
    P.LoginResponse(itt=1, isid=bytes(6), status_class=256),
    P.DataIn(itt=1, status_present=True),  # S without F
    P.DataIn(itt=1, final=True, residual=5),  # a residual without S
    P.LogoutResponse(itt=1, time2wait=1 << 16),
    P.AsyncMessage(event=256),
    P.Reject(reason=4, bhs=bytes(47)),
    P.R2T(itt=1, ttt=1 << 32),
], ids=repr)
def test_encode_refuses_values_that_do_not_fit(pdu: P.PDU) -> None:
    with pytest.raises(ValueError):
        P.encode(pdu)


def test_encode_refuses_a_data_segment_longer_than_its_length_field() -> None:
    with pytest.raises(ValueError):
        P.encode(P.DataOut(itt=1, data=bytes(P.DATA_SEGMENT_BYTES_MAX + 1)))


def test_encode_refuses_what_is_not_a_pdu() -> None:
    with pytest.raises(TypeError):
        P.encode(P.Invalid(bytes(48), 4, "no"))  # type: ignore[arg-type]


# ---------------------------------------------------------------- hypothesis strategies

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
lun = st.integers(0, (1 << 64) - 1)
data = st.binary(max_size=70)
isid = st.binary(min_size=6, max_size=6)
two_bits = st.integers(0, 3)


@st.composite
def data_ins(draw: st.DrawFn) -> P.DataIn:
    # RFC 7143 §11.7: S only with F; status, O, U and the residual only with S.
    status_present = draw(st.booleans())
    pdu = P.DataIn(itt=draw(u32), ttt=draw(u32), statsn=draw(u32), expcmdsn=draw(u32), maxcmdsn=draw(u32),
                   datasn=draw(u32), buffer_offset=draw(u32), lun=draw(lun), ack=draw(st.booleans()),
                   final=draw(st.booleans()), data=draw(data))
    if status_present:
        pdu = dataclasses.replace(pdu, final=True, status_present=True, status=draw(u8), residual=draw(u32),
                                  overflow=draw(st.booleans()), underflow=draw(st.booleans()))
    return pdu


initiator_pdus: st.SearchStrategy[P.PDU] = st.one_of(
    st.builds(P.NopOut, itt=u32, ttt=u32, cmdsn=u32, expstatsn=u32, lun=lun, immediate=st.booleans(), data=data),
    st.builds(P.ScsiCommand, itt=u32, cdb=st.binary(min_size=16, max_size=16 + 260), edtl=u32, cmdsn=u32,
              expstatsn=u32, lun=lun, immediate=st.booleans(), final=st.booleans(), read=st.booleans(),
              write=st.booleans(), attr=st.integers(0, 7), bidi_read_length=st.none() | u32, data=data),
    st.builds(P.TaskMgmtRequest, itt=u32, function=st.integers(0, 127), rtt=u32, cmdsn=u32, expstatsn=u32,
              refcmdsn=u32, expdatasn=u32, lun=lun, immediate=st.booleans()),
    st.builds(P.LoginRequest, itt=u32, isid=isid, tsih=u16, cid=u16, cmdsn=u32, expstatsn=u32,
              transit=st.booleans(), cont=st.booleans(), csg=two_bits, nsg=two_bits, version_max=u8,
              version_min=u8, data=data),
    st.builds(P.TextRequest, itt=u32, ttt=u32, cmdsn=u32, expstatsn=u32, lun=lun, immediate=st.booleans(),
              final=st.booleans(), cont=st.booleans(), data=data),
    st.builds(P.DataOut, itt=u32, ttt=u32, expstatsn=u32, datasn=u32, buffer_offset=u32, lun=lun,
              final=st.booleans(), data=data),
    st.builds(P.LogoutRequest, itt=u32, reason=st.integers(0, 127), cid=u16, cmdsn=u32, expstatsn=u32,
              immediate=st.booleans()),
    st.builds(P.SnackRequest, itt=u32, type=st.integers(0, 15), ttt=u32, expstatsn=u32, begrun=u32,
              runlength=u32, lun=lun),
)

target_pdus: st.SearchStrategy[P.PDU] = st.one_of(
    st.builds(P.NopIn, itt=u32, ttt=u32, statsn=u32, expcmdsn=u32, maxcmdsn=u32, lun=lun, data=data),
    st.builds(P.ScsiResponse, itt=u32, status=u8, response=u8, statsn=u32, expcmdsn=u32, maxcmdsn=u32,
              expdatasn=u32, overflow=st.booleans(), underflow=st.booleans(), bidi_overflow=st.booleans(),
              bidi_underflow=st.booleans(), residual=u32, bidi_residual=u32, sense=data, data=data),
    st.builds(P.TaskMgmtResponse, itt=u32, response=u8, statsn=u32, expcmdsn=u32, maxcmdsn=u32),
    st.builds(P.LoginResponse, itt=u32, isid=isid, tsih=u16, statsn=u32, expcmdsn=u32, maxcmdsn=u32,
              status_class=u8, status_detail=u8, transit=st.booleans(), cont=st.booleans(), csg=two_bits,
              nsg=two_bits, version_max=u8, version_active=u8, data=data),
    st.builds(P.TextResponse, itt=u32, ttt=u32, statsn=u32, expcmdsn=u32, maxcmdsn=u32, lun=lun,
              final=st.booleans(), cont=st.booleans(), data=data),
    data_ins(),
    st.builds(P.LogoutResponse, itt=u32, response=u8, statsn=u32, expcmdsn=u32, maxcmdsn=u32, time2wait=u16,
              time2retain=u16),
    st.builds(P.R2T, itt=u32, ttt=u32, statsn=u32, expcmdsn=u32, maxcmdsn=u32, r2tsn=u32, buffer_offset=u32,
              desired_length=u32, lun=lun),
    st.builds(P.AsyncMessage, event=u8, statsn=u32, expcmdsn=u32, maxcmdsn=u32, lun=lun, vcode=u8, param1=u16,
              param2=u16, param3=u16, sense=data, data=data),
    st.builds(P.Reject, reason=u8, bhs=st.binary(min_size=48, max_size=48), statsn=u32, expcmdsn=u32,
              maxcmdsn=u32, datasn_r2tsn=u32),
)

digests = st.booleans()
splits = st.lists(st.integers(0, 97), min_size=1, max_size=20)


# ---------------------------------------------------------------- round trips


@FAST
@given(pdu=initiator_pdus, header_digest=digests, data_digest=digests)
def test_initiator_pdus_round_trip(pdu: P.PDU, header_digest: bool, data_digest: bool) -> None:
    raw = P.encode(pdu, header_digest=header_digest, data_digest=data_digest)
    assert len(raw) % 4 == 0
    assert P.decode(raw, target=True, header_digest=header_digest, data_digest=data_digest) == pdu


@FAST
@given(pdu=target_pdus, header_digest=digests, data_digest=digests)
def test_target_pdus_round_trip(pdu: P.PDU, header_digest: bool, data_digest: bool) -> None:
    raw = P.encode(pdu, header_digest=header_digest, data_digest=data_digest)
    assert len(raw) % 4 == 0
    assert P.decode(raw, target=False, header_digest=header_digest, data_digest=data_digest) == pdu


# ---------------------------------------------------------------- fuzz: streams


@FAST
@given(pdus=st.lists(initiator_pdus, min_size=1, max_size=6), header_digest=digests, data_digest=digests,
       sizes=splits)
def test_initiator_stream_whole_bytewise_and_split(pdus: list[P.PDU], header_digest: bool, data_digest: bool,
                                                   sizes: list[int]) -> None:
    stream = b"".join(P.encode(p, header_digest=header_digest, data_digest=data_digest) for p in pdus)
    for pieces in ([len(stream)], [1], sizes):
        decoder = P.Decoder(target=True, header_digest=header_digest, data_digest=data_digest)
        assert feed_in_pieces(decoder, stream, pieces) == pdus
        assert decoder.buffered == 0


@FAST
@given(pdus=st.lists(target_pdus, min_size=1, max_size=6), header_digest=digests, data_digest=digests,
       sizes=splits)
def test_target_stream_whole_bytewise_and_split(pdus: list[P.PDU], header_digest: bool, data_digest: bool,
                                                sizes: list[int]) -> None:
    stream = b"".join(P.encode(p, header_digest=header_digest, data_digest=data_digest) for p in pdus)
    for pieces in ([len(stream)], [1], sizes):
        decoder = P.Decoder(target=False, header_digest=header_digest, data_digest=data_digest)
        assert feed_in_pieces(decoder, stream, pieces) == pdus
        assert decoder.buffered == 0


# ---------------------------------------------------------------- fuzz: garbage


def re_encodable(item: P.PDU) -> bool:
    # A DataIn is decoded as received even when its S, F, status and residual
    # disagree (RFC 7143 §11.7), which encode() refuses to send.
    if isinstance(item, P.DataIn):
        if item.status_present:
            return item.final
        return not (item.status or item.overflow or item.underflow or item.residual)
    return True


def check_garbage(stream: bytes, sizes: list[int], *, target: bool, header_digest: bool, data_digest: bool,
                  max_data_segment: int) -> None:
    """Feed bytes whole and in pieces: only ProtocolError may escape, and both ways must agree."""
    results = []
    for pieces in ([len(stream) or 1], sizes):
        decoder = P.Decoder(target=target, header_digest=header_digest, data_digest=data_digest,
                            max_data_segment=max_data_segment)
        try:
            items = feed_in_pieces(decoder, stream, pieces)
            failed = False
        except P.ProtocolError:
            items = None
            failed = True
            event("ProtocolError")
        assert decoder.buffered <= P.pdu_bytes_max(max_data_segment)
        if items is not None:
            for item in items:
                # What the fuzzer reached (pytest --hypothesis-show-statistics).
                event(f"Invalid {item.reason:#04x}" if isinstance(item, P.Invalid) else type(item).__name__)
                if isinstance(item, P.Invalid):
                    assert len(item.bhs) == 48
                    assert item.reason in (P.REJECT_DATA_DIGEST_ERROR, P.REJECT_PROTOCOL_ERROR,
                                           P.REJECT_COMMAND_NOT_SUPPORTED, P.REJECT_INVALID_PDU_FIELD)
                elif re_encodable(item):
                    # Whatever was decoded has every field in range: it encodes, and decodes to itself.
                    assert P.decode(P.encode(item), target=target) == item
        results.append((failed, items))
    whole, split = results
    if not whole[0] and not split[0]:
        assert whole == split


@FAST
@given(stream=st.binary(max_size=700) | st.binary(min_size=48, max_size=700), sizes=splits, target=st.booleans(),
       header_digest=digests, data_digest=digests,
       max_data_segment=st.sampled_from([64, P.DEFAULT_DATA_SEGMENT_BYTES_MAX, P.DATA_SEGMENT_BYTES_MAX]))
def test_random_bytes_only_raise_protocol_error(stream: bytes, sizes: list[int], target: bool,
                                                header_digest: bool, data_digest: bool,
                                                max_data_segment: int) -> None:
    check_garbage(stream, sizes, target=target, header_digest=header_digest, data_digest=data_digest,
                  max_data_segment=max_data_segment)


@st.composite
def header_shaped_garbage(draw: st.DrawFn) -> bytes:
    """PDUs with random headers whose lengths are small enough to be framed, and random bodies.

    Random bytes almost always fail at DataSegmentLength; these get through
    framing and reach every decoder, the AHS parser and the sense splitter.
    """
    out = []
    for _ in range(draw(st.integers(1, 5))):
        header = bytearray(draw(st.binary(min_size=48, max_size=48)))
        header[0] = draw(st.integers(0, 0xFF))
        header[4] = draw(st.integers(0, 4))
        data_length = draw(st.integers(0, 80))
        header[5:8] = data_length.to_bytes(3, "big")
        body = draw(st.binary(min_size=header[4] * 4 + (data_length + 3) // 4 * 4,
                              max_size=header[4] * 4 + (data_length + 3) // 4 * 4 + 8))
        out.append(bytes(header) + body)
    return b"".join(out)


@FAST
@given(stream=header_shaped_garbage(), sizes=splits, target=st.booleans(), header_digest=digests,
       data_digest=digests)
def test_header_shaped_garbage_only_raises_protocol_error(stream: bytes, sizes: list[int], target: bool,
                                                          header_digest: bool, data_digest: bool) -> None:
    check_garbage(stream, sizes, target=target, header_digest=header_digest, data_digest=data_digest,
                  max_data_segment=128)


@FAST
@given(pdus=st.lists(initiator_pdus | target_pdus, min_size=1, max_size=4), header_digest=digests,
       data_digest=digests, flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), min_size=1,
                                            max_size=4), sizes=splits, target=st.booleans())
def test_corrupted_streams_only_raise_protocol_error(pdus: list[P.PDU], header_digest: bool, data_digest: bool,
                                                     flips: list[tuple[int, int]], sizes: list[int],
                                                     target: bool) -> None:
    stream = bytearray(b"".join(P.encode(p, header_digest=header_digest, data_digest=data_digest) for p in pdus))
    for position, mask in flips:
        stream[position % len(stream)] ^= mask
    check_garbage(bytes(stream), sizes, target=target, header_digest=header_digest, data_digest=data_digest,
                  max_data_segment=512)


def test_struct_sanity_of_the_vectors() -> None:
    # Every hand-written vector is a whole number of words and its
    # DataSegmentLength agrees with the bytes that follow the header.
    for _, raw, _ in INITIATOR_VECTORS + TARGET_VECTORS:
        assert len(raw) % 4 == 0
        (data_length,) = struct.unpack(">I", b"\0" + raw[5:8])
        assert len(raw) == 48 + raw[4] * 4 + (data_length + 3) // 4 * 4
