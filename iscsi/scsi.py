"""The SCSI target for one logical unit (LUN 0) of a floe volume: a CDB and Data-Out in, a ScsiResult out.

Theory of operation. ``LogicalUnit.execute`` runs one command to completion on the
caller's (worker) thread. Every command the unit knows is one row of ``COMMANDS``, the
dispatch table: operation code, service action, the CDB USAGE DATA bitmap (SPC-4 r37
§6.35.3), the handler, how the command stands against reservations, how much Data-Out
it takes, and whether it reports unit attentions. The table is the single source of
truth: ``execute`` dispatches through it, rejects CDB bits the bitmap calls reserved,
``expected_data_out`` sizes Data-Out from it, and REPORT SUPPORTED OPERATION CODES
reports exactly its rows, so what the unit advertises cannot drift from what it does.

Every command goes through the same gate, in SAM-5/SPC-4 order:
  1. unit attention (SAM-5 §5.14, SPC-4 §5.9): a nexus seen for the first time gets
     POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h) on its first command,
     because a LogicalUnit is created whenever a node takes the volume over and the
     write-back cache may have been lost (DESIGN.md §2 point 6). INQUIRY, REPORT LUNS
     and REQUEST SENSE neither report nor clear a unit attention (SPC-4 §5.9).
  2. unknown operation code / service action;
  3. reservation conflict (SPC-2 RESERVE(6) and persistent reservations, see
     iscsi/reservations.py for the access rules);
  4. reserved CDB bits and NACA (SAM-5 §5.2), then the command's own field checks,
     transfer length, LBA range and Data-Out size, then the device call.

Device errors are typed (iscsi/device.py) and mapped to the sense SBC-3 names;
``Fenced`` becomes ``LunFenced`` so the session drops the connection and the initiator
is redirected to the new owner; anything unexpected is logged and answered with
HARDWARE ERROR / INTERNAL TARGET FAILURE, never raised to the caller.

Durability (DESIGN.md §2). The unit advertises a volatile write-back cache (caching
mode page WCE=1, not changeable). GOOD for SYNCHRONIZE CACHE, a FUA write, a WRITE AND
VERIFY, a FUA COMPARE AND WRITE and a flushing STOP goes out only after the device's
durability barrier returned, through ``_flush_barrier`` and ``_write_blocks``.

Concurrency. Commands of many sessions run at once. Reads and writes go to the
(thread-safe) device without holding any lock of the unit; the unit attention queues
and the SPC-2 reservation live under ``_lock``; PERSISTENT RESERVE OUT (and
RESERVE/RELEASE(6)) are serialised by ``_pr_lock`` across the store's save, and the
persistent reservation state itself is an immutable value swapped in one assignment,
so a reservation check reads a consistent state without locking.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from iscsi import reservations as pr
from iscsi.device import BlockDevice, Fenced, InvalidField, Miscompare, OutOfRange, SpaceExhausted, Unavailable
from iscsi.reservations import Access, NexusId, PrRejected, PrState, ReservationConflict, ReservationStore
from iscsi.sense import (
    BUS_DEVICE_RESET_FUNCTION_OCCURRED,
    CAPACITY_DATA_HAS_CHANGED,
    INTERNAL_TARGET_FAILURE,
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    MISCOMPARE_DURING_VERIFY_OPERATION,
    NO_SENSE,
    PARAMETER_LIST_LENGTH_ERROR,
    POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    THIN_PROVISIONING_SOFT_THRESHOLD_REACHED,
    WRITE_ERROR,
    FieldPointer,
    SenseCode,
    fixed_sense,
)
from iscsi.types import BUSY, CHECK_CONDITION, GOOD, MAX_TRANSFER_BYTES, RESERVATION_CONFLICT, Nexus, ScsiResult

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- bounds and advertised limits

# One segment of the volume (DESIGN.md §5): a transfer of this size is one blob per flush.
OPTIMAL_TRANSFER_BYTES = 1 << 20
# Writes in multiples of 4 KiB avoid read-modify-write in the write-back buffer's intervals.
OPTIMAL_TRANSFER_GRANULARITY_BYTES = 4096
# COMPARE AND WRITE is atomic against every other write of the volume: the device
# serialises writes for its duration and holds twice the data. VMware ATS, the main
# user, compares one block; 128 KiB keeps that exclusive section short. The CDB's
# NUMBER OF LOGICAL BLOCKS is one byte, so the advertised limit is also at most 255.
COMPARE_AND_WRITE_BYTES_MAX = 128 << 10
COMPARE_AND_WRITE_BLOCKS_FIELD_MAX = 0xFF
# WRITE SAME sends one block and the device writes (or unmaps) many: bound the work of
# one command to that of two of the largest WRITEs. Linux splits larger zeroing
# requests by this limit. (Below 65536 blocks at 512 B, libiscsi's WriteSame16.Unmap
# then expects its 65536-block WRITE SAME to be refused instead of preparing it with
# a 32 MiB WRITE(16), which MAX_TRANSFER_BYTES refuses.)
WRITE_SAME_BYTES_MAX = 2 * MAX_TRANSFER_BYTES
# UNMAP punches holes in segment maps. libiscsi's Block Limits test calls an explicit
# limit above 2^20 blocks insane; 2^20 blocks is 512 MiB at 512 B, 4 GiB at 4 KiB.
UNMAP_BLOCKS_MAX = 1 << 20
# Descriptors in one UNMAP parameter list: libiscsi sends up to 256, Windows batches;
# 1024 keeps the list under 16 KiB.
UNMAP_DESCRIPTORS_MAX = 1024
# GET LBA STATUS answers with at most this many descriptors (each one device call).
GET_LBA_STATUS_DESCRIPTORS_MAX = 64
# I_T nexuses whose unit attention queues the unit remembers. A forgotten nexus is
# treated as new (it gets 29h/00h again), which is harmless; the bound keeps a
# long-lived unit's memory flat while sessions come and go.
NEXUS_TABLE_MAX = 1024
# Unit attentions queued per I_T nexus; duplicates are merged, resets replace the queue.
UNIT_ATTENTION_QUEUE_MAX = 16

# Standard INQUIRY data (SPC-4 §6.6.2 Table 142): 36 bytes of base data plus the
# version descriptors at 58..73, padded to 96 as most targets do.
STANDARD_INQUIRY_BYTES = 96
INQUIRY_VERSION_SPC4 = 0x06
VERSION_DESCRIPTORS = (
    0x00A0,  # SAM-5 (no version claimed)
    0x0960,  # iSCSI (no version claimed)
    0x0460,  # SPC-4 (no version claimed)
    0x04C0,  # SBC-3 (no version claimed); libiscsi keys its SBC-3 checks on it
)
_VPD_PAGE_LENGTH_SBC3 = 0x3C  # Block Limits and Block Device Characteristics, SBC-3 §6.5.3, §6.5.2

# Operation codes (SPC-4 Annex E, SBC-3 Table 14).
OP_TEST_UNIT_READY = 0x00
OP_REQUEST_SENSE = 0x03
OP_READ6 = 0x08
OP_WRITE6 = 0x0A
OP_INQUIRY = 0x12
OP_MODE_SELECT6 = 0x15
OP_RESERVE6 = 0x16
OP_RELEASE6 = 0x17
OP_MODE_SENSE6 = 0x1A
OP_START_STOP_UNIT = 0x1B
OP_PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
OP_READ_CAPACITY10 = 0x25
OP_READ10 = 0x28
OP_WRITE10 = 0x2A
OP_WRITE_AND_VERIFY10 = 0x2E
OP_VERIFY10 = 0x2F
OP_SYNCHRONIZE_CACHE10 = 0x35
OP_WRITE_SAME10 = 0x41
OP_UNMAP = 0x42
OP_MODE_SELECT10 = 0x55
OP_MODE_SENSE10 = 0x5A
OP_PERSISTENT_RESERVE_IN = 0x5E
OP_PERSISTENT_RESERVE_OUT = 0x5F
OP_READ16 = 0x88
OP_COMPARE_AND_WRITE = 0x89
OP_WRITE16 = 0x8A
OP_WRITE_AND_VERIFY16 = 0x8E
OP_VERIFY16 = 0x8F
OP_SYNCHRONIZE_CACHE16 = 0x91
OP_WRITE_SAME16 = 0x93
OP_SERVICE_ACTION_IN16 = 0x9E
OP_REPORT_LUNS = 0xA0
OP_MAINTENANCE_IN = 0xA3
OP_READ12 = 0xA8
OP_WRITE12 = 0xAA
OP_WRITE_AND_VERIFY12 = 0xAE
OP_VERIFY12 = 0xAF

SA_READ_CAPACITY16 = 0x10
SA_GET_LBA_STATUS = 0x12
SA_REPORT_SUPPORTED_OPERATION_CODES = 0x0C

# Operation codes whose byte 1 bits 4..0 are a SERVICE ACTION field.
SERVICE_ACTION_OPCODES = frozenset(
    {OP_SERVICE_ACTION_IN16, OP_MAINTENANCE_IN, OP_PERSISTENT_RESERVE_IN, OP_PERSISTENT_RESERVE_OUT}
)
_SA_MASK = 0x1F
_NACA = 0x04  # CONTROL byte (SAM-5 §5.2); NormACA=0, so NACA=1 is refused


class LunFenced(Exception):
    """The device reported that this node no longer owns the volume (iscsi.device.Fenced).

    The session must drop the connection so the initiator logs in again and is
    redirected to the new owner; no status is sent for the command.
    """


class CheckCondition(Exception):
    """The command cannot be performed as given: answer CHECK CONDITION with this sense."""

    def __init__(self, code: SenseCode, *, field: FieldPointer | None = None, information: int | None = None) -> None:
        super().__init__(code.name)
        self.code = code
        self.field = field
        self.information = information


def check_condition(
    code: SenseCode, *, field: FieldPointer | None = None, information: int | None = None
) -> ScsiResult:
    return ScsiResult(CHECK_CONDITION, b"", fixed_sense(code, information=information, field=field))


def nexus_id(nexus: Nexus) -> NexusId:
    """How persistent reservations and unit attentions name an I_T nexus."""
    return (nexus.initiator_port, nexus.target_port)


def _be(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _ascii_field(text: str, width: int, what: str) -> bytes:
    raw = text.encode("ascii", errors="strict")
    if len(raw) > width or any(not 0x20 <= b <= 0x7E for b in raw):
        raise ValueError(f"{what} {text!r} must be at most {width} printable ASCII characters (SPC-4 §4.4.1)")
    return raw.ljust(width, b" ")


@dataclass(frozen=True, slots=True, kw_only=True)
class LunIdentity:
    """What the logical unit says it is (INQUIRY standard data and VPD 80h/83h)."""

    vendor: str = "FLOE"
    product: str = "VOLUME"
    revision: str = "0001"
    serial: str  # VPD 80h unit serial number
    naa: bytes  # 16-byte NAA IEEE Registered Extended (type 6) designator for VPD 83h
    target_name: str  # the iSCSI target name, for the SCSI name string designators
    tpgt: int = 1  # relative target port identifier and target port group

    def __post_init__(self) -> None:
        _ascii_field(self.vendor, 8, "vendor")
        _ascii_field(self.product, 16, "product")
        _ascii_field(self.revision, 4, "revision")
        if not 1 <= len(self.serial) <= 252:
            raise ValueError("serial must be 1..252 characters (VPD 80h page length is one byte)")
        _ascii_field(self.serial, len(self.serial), "serial")
        if len(self.naa) != 16 or self.naa[0] >> 4 != 6:
            raise ValueError("naa must be a 16-byte NAA type 6 (IEEE Registered Extended) designator")
        if not 1 <= len(self.target_name.encode()) <= 223:
            raise ValueError("target_name must be 1..223 bytes (RFC 7143 §4.2.7.1)")
        if not 1 <= self.tpgt <= 0xFFFF:
            raise ValueError("tpgt must be 1..65535: relative target port identifier 0 is reserved (SPC-4 §7.8.6.7)")


@dataclass(frozen=True, slots=True)
class Request:
    """One command as a handler sees it: the CDB cut to its length, and the Data-Out."""

    nexus: Nexus
    nexus_id: NexusId
    cdb: bytes
    data_out: bytes


Handler = Callable[["LogicalUnit", Request], ScsiResult]
DataOutSize = Callable[[bytes, int], int]  # (CDB cut to its length, block size) -> bytes of Data-Out


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One row of the dispatch table."""

    name: str
    usage: bytes  # CDB USAGE DATA (SPC-4 §6.35.3): byte 0 the opcode, byte 1 the service action if any
    handler: Handler
    access: Access
    data_out: DataOutSize
    service_action: int | None = None
    ua_exempt: bool = False  # INQUIRY, REPORT LUNS, REQUEST SENSE (SPC-4 §5.9)
    maps_blocks: bool = False  # may allocate: check the thin-provisioning soft threshold afterwards
    access_of: Callable[[bytes], Access] | None = None  # when the access class depends on the CDB
    timeout_s: int = 30  # RECOMMENDED COMMAND TIMEOUT for REPORT SUPPORTED OPERATION CODES with RCTD

    def __post_init__(self) -> None:
        if self.usage[0] in SERVICE_ACTION_OPCODES:
            if self.service_action is None or self.usage[1] != self.service_action:
                raise ValueError(f"{self.name}: service action missing from its usage data")
        elif self.service_action is not None:
            raise ValueError(f"{self.name}: opcode {self.usage[0]:#x} has no service action field")

    @property
    def opcode(self) -> int:
        return self.usage[0]

    @property
    def cdb_length(self) -> int:
        return len(self.usage)


# ---------------------------------------------------------------------- CDB field helpers


def _lba_and_length(cdb: bytes) -> tuple[int, int]:
    """LOGICAL BLOCK ADDRESS and TRANSFER (or VERIFICATION, NUMBER OF BLOCKS) LENGTH.

    Layouts per SBC-3 §5.x: 6-byte (READ/WRITE(6): 21-bit LBA, length 0 means 256),
    10-byte (LBA 2..5, length 7..8), 12-byte (LBA 2..5, length 6..9), 16-byte (LBA
    2..9, length 10..13). COMPARE AND WRITE is handled by its own handler.
    """
    n = len(cdb)
    if n == 6:
        return ((cdb[1] & 0x1F) << 16) | _be(cdb[2:4]), cdb[4] or 256
    if n == 10:
        return _be(cdb[2:6]), _be(cdb[7:9])
    if n == 12:
        return _be(cdb[2:6]), _be(cdb[6:10])
    return _be(cdb[2:10]), _be(cdb[10:14])


def _bytchk(cdb: bytes) -> int:
    """BYTCHK of VERIFY / WRITE AND VERIFY (SBC-3 §5.28, §5.37): 00b range only, 01b compare
    with the Data-Out; 10b and 11b are refused (INVALID FIELD IN CDB)."""
    bytchk = (cdb[1] >> 1) & 0x3
    if bytchk not in (0b00, 0b01):
        raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(1, 2))
    return bytchk


def _length_field(cdb: bytes) -> FieldPointer:
    return FieldPointer({6: 4, 10: 7, 12: 6, 16: 10}[len(cdb)])


def _lba_field(cdb: bytes) -> FieldPointer:
    return FieldPointer(1 if len(cdb) == 6 else 2)


def _no_data(cdb: bytes, block_size: int) -> int:
    return 0


def _block_data(cdb: bytes, block_size: int) -> int:
    return _lba_and_length(cdb)[1] * block_size


def _verify_data(cdb: bytes, block_size: int) -> int:
    bytchk = (cdb[1] >> 1) & 0x3
    blocks = _lba_and_length(cdb)[1]
    if bytchk == 0b01:
        return blocks * block_size
    if bytchk == 0b11 and blocks:  # one block compared with each (SBC-4); refused, but sized
        return block_size
    return 0


def _write_same_data(cdb: bytes, block_size: int) -> int:
    if cdb[0] == OP_WRITE_SAME16 and cdb[1] & 0x01:  # NDOB: no Data-Out, the block is zeros
        return 0
    return block_size


def _compare_and_write_data(cdb: bytes, block_size: int) -> int:
    blocks = cdb[13]
    if blocks == 0:
        # Zero blocks transfers nothing, but an initiator that asked for 256 blocks in the
        # 8-bit field sent 0 with 512 blocks of Data-Out (libiscsi CompareAndWrite.Simple).
        # Accepting up to one block more than the largest COMPARE AND WRITE lets the
        # handler tell that apart from a true no-op (libiscsi CompareAndWrite.DpoFua).
        return 2 * _max_compare_and_write_blocks(block_size) * block_size + block_size
    return 2 * blocks * block_size


def _max_compare_and_write_blocks(block_size: int) -> int:
    return min(COMPARE_AND_WRITE_BLOCKS_FIELD_MAX, COMPARE_AND_WRITE_BYTES_MAX // block_size)


def _param_list_6(cdb: bytes, block_size: int) -> int:
    return cdb[4]


def _param_list_10(cdb: bytes, block_size: int) -> int:
    return _be(cdb[7:9])


def _pr_out_param_list(cdb: bytes, block_size: int) -> int:
    return _be(cdb[5:9])


# ---------------------------------------------------------------------- mode pages


@dataclass(frozen=True, slots=True)
class ModePage:
    """A mode page: current values, the changeable bitmap, defaults (SPC-4 §7.5)."""

    code: int
    current: bytes
    changeable: bytes
    default: bytes

    def __post_init__(self) -> None:
        if not (len(self.current) == len(self.changeable) == len(self.default) == self.current[1] + 2):
            raise ValueError(f"mode page {self.code:#x}: inconsistent lengths")
        if self.current[0] != self.code:
            raise ValueError(f"mode page {self.code:#x}: page code byte disagrees")

    def for_pc(self, pc: int) -> bytes:
        return {0: self.current, 1: self.changeable, 2: self.default}[pc]


def _page(code: int, body: bytes) -> bytes:
    return bytes([code, len(body)]) + body


def _unchangeable(code: int, body: bytes) -> ModePage:
    page = _page(code, body)
    return ModePage(code, page, _page(code, bytes(len(body))), page)


# Caching (SBC-3 §6.4.5): WCE=1, RCD=0. The write-back cache is the node's buffer
# (DESIGN.md §2 point 1). WCE is not changeable: a write-through setting would be lost
# with the LogicalUnit on failover while the initiator kept skipping SYNCHRONIZE CACHE.
_CACHING = _unchangeable(0x08, bytes([0x04]) + bytes(17))
# Control (SPC-4 §7.5.7): TST=0, QUEUE ALGORITHM MODIFIER=1 (unrestricted reordering),
# QERR=0, D_SENSE=0 (fixed sense only), SWP=0, BUSY TIMEOUT PERIOD=FFFFh (unlimited:
# BUSY is what the unit answers while the cluster is unavailable).
_CONTROL = _unchangeable(0x0A, bytes([0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00]))
# Informational Exceptions Control (SPC-4 §7.5.11): DEXCPT=1, MRIE=0: none reported.
_INFORMATIONAL_EXCEPTIONS = _unchangeable(0x1C, bytes([0x08, 0x00]) + bytes(8))
MODE_PAGES: Mapping[int, ModePage] = {p.code: p for p in (_CACHING, _CONTROL, _INFORMATIONAL_EXCEPTIONS)}
_ALL_PAGES = 0x3F
_DEVICE_SPECIFIC_DPOFUA = 0x10  # SBC-3 §6.4.1: DPO and FUA bits are supported

# Power conditions START STOP UNIT accepts (SBC-3 §5.25 Table 87); all are no-ops here.
_POWER_CONDITIONS = frozenset({0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB})


class _Select(enum.IntEnum):
    """REPORT LUNS SELECT REPORT values (SPC-4 §6.33 Table 288)."""

    ALL_EXCEPT_WELL_KNOWN = 0x00
    WELL_KNOWN_ONLY = 0x01
    ALL = 0x02


class LogicalUnit:
    """LUN 0 of a floe volume over a BlockDevice. Thread-safe; ``execute`` never raises
    for anything the initiator sends (only LunFenced, when the volume moved away)."""

    def __init__(
        self, device: BlockDevice, identity: LunIdentity, *, reservations: ReservationStore | None = None
    ) -> None:
        """Load the persistent reservation state from `reservations` (an in-memory store
        if None). Raises iscsi.device.Unavailable if the store cannot answer and
        ValueError if what it holds is corrupt: the volume must not be served without
        its reservations, or with reservations it cannot read."""
        self._device = device
        self._identity = identity
        self._store: ReservationStore = reservations if reservations is not None else pr.MemReservationStore()
        saved = self._store.load()  # may raise Unavailable: the volume cannot be served without it
        self._pr: PrState = PrState.from_bytes(saved) if saved is not None else PrState()
        self._lock = threading.Lock()  # unit attention queues, SPC-2 reservation
        self._lost_writes_reported: set[str] = set()  # initiators told of writes lost at takeover
        self._pr_lock = threading.Lock()  # serialises reservation changes across the store's save
        self._nexuses: OrderedDict[NexusId, deque[SenseCode]] = OrderedDict()
        self._spc2_holder: NexusId | None = None
        log.info(
            "event=lun_created target=%s registrations=%d reserved=%s",
            identity.target_name,
            len(self._pr.registrations),
            self._pr.reservation is not None,
        )

    # ------------------------------------------------------------------ public API

    def execute(self, nexus: Nexus, cdb: bytes, data_out: bytes = b"") -> ScsiResult:
        """Run one command to completion. Blocking; never raises except LunFenced."""
        try:
            return self._execute(nexus, bytes(cdb), bytes(data_out))
        except LunFenced:
            raise
        except Exception:
            log.exception("event=internal_target_failure opcode=%s", cdb[:1].hex() or "none")
            return check_condition(INTERNAL_TARGET_FAILURE)

    def expected_data_out(self, cdb: bytes) -> int | None:
        """Bytes of Data-Out the CDB transfers: 0 for none, None for an unknown or short CDB."""
        try:
            spec = lookup(cdb)
            if spec is None or len(cdb) < spec.cdb_length:
                return None
            return spec.data_out(bytes(cdb[: spec.cdb_length]), self._device.block_size)
        except Exception:
            log.exception("event=expected_data_out_failed opcode=%s", bytes(cdb[:1]).hex())
            return None

    def nexus_lost(self, nexus: Nexus) -> None:
        """A session ended (logout or connection loss, SAM-5 I_T nexus loss).

        Its SPC-2 reservation is released; persistent reservation registrations stay.
        The nexus's unit attention state is dropped, so if it comes back it is a new
        nexus and gets 29h/00h, the generic code that covers I_T nexus loss.
        """
        nid = nexus_id(nexus)
        with self._lock:
            self._nexuses.pop(nid, None)
            if self._spc2_holder == nid:
                self._spc2_holder = None
                log.info("event=spc2_released reason=nexus_loss nexus=%s", nid)

    def lun_reset(self, by: Nexus) -> None:
        """LOGICAL UNIT RESET (SAM-5 §7.7): unit attention BUS DEVICE RESET FUNCTION
        OCCURRED (29h/03h) for every I_T nexus, the issuer included; SPC-2 reservations
        are released (SPC-2 §5.5.3), persistent reservations are not (SPC-4 §5.12.1)."""
        self._reset("lun_reset", by)

    def target_reset(self, by: Nexus) -> None:
        """TARGET WARM RESET (RFC 7143 §11.5.1, the SAM-2 TARGET RESET): the same effects
        on this unit as a LUN reset, with the same 29h/03h (a target reset is a bus
        device reset function; LIO and tape libraries report it so too)."""
        self._reset("target_reset", by)

    def capacity_changed(self) -> None:
        """After a resize: CAPACITY DATA HAS CHANGED (2Ah/09h) for every I_T nexus (SBC-3 §4.11)."""
        self._establish(CAPACITY_DATA_HAS_CHANGED, None)

    # ------------------------------------------------------------------ the gate

    def _execute(self, nexus: Nexus, cdb: bytes, data_out: bytes) -> ScsiResult:
        nid = nexus_id(nexus)
        spec = lookup(cdb)
        pending = self._unit_attention(nid, consume=spec is None or not spec.ua_exempt)
        if pending is not None:
            return check_condition(pending)
        if spec is None:
            if cdb and cdb[0] in _OPCODES and len(cdb) > 1:
                # A known operation code with a service action the unit does not have.
                return check_condition(INVALID_FIELD_IN_CDB, field=FieldPointer(1, 4))
            return check_condition(INVALID_COMMAND_OPERATION_CODE, field=FieldPointer(0, 7))
        if len(cdb) < spec.cdb_length:
            return check_condition(INVALID_FIELD_IN_CDB, field=FieldPointer(len(cdb) - 1 if cdb else 0))
        cdb = cdb[: spec.cdb_length]
        if self._conflicts(spec, nid, cdb):
            log.info("event=reservation_conflict command=%s nexus=%s", spec.name, nid)
            return ScsiResult(RESERVATION_CONFLICT)
        try:
            _check_reserved_bits(spec, cdb)
            return spec.handler(self, Request(nexus, nid, cdb, data_out))
        except CheckCondition as cc:
            return check_condition(cc.code, field=cc.field, information=cc.information)
        except ReservationConflict as exc:
            log.info("event=reservation_conflict command=%s nexus=%s why=%s", spec.name, nid, exc)
            return ScsiResult(RESERVATION_CONFLICT)
        except PrRejected as rej:
            return check_condition(rej.code, field=rej.field)
        except OutOfRange:
            return check_condition(LBA_OUT_OF_RANGE)
        except InvalidField:
            return check_condition(INVALID_FIELD_IN_CDB)
        except SpaceExhausted:
            return check_condition(SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
        except Miscompare as mis:
            return check_condition(MISCOMPARE_DURING_VERIFY_OPERATION, information=mis.offset)
        except Unavailable as exc:
            # BUSY (SAM-5 §5.3.1: "temporarily unable to process the command") is the one
            # answer every initiator floe serves retries without failing I/O: QEMU's iSCSI
            # driver retries BUSY with exponential backoff but turns NOT READY (04h/01h)
            # into EINPROGRESS for the guest; Linux requeues BUSY until the command times
            # out; libiscsi and Windows retry it. The device kept the data buffered.
            log.warning("event=device_unavailable command=%s nexus=%s why=%s", spec.name, nid, exc)
            return ScsiResult(BUSY)
        except Fenced as exc:
            log.warning("event=lun_fenced command=%s nexus=%s why=%s", spec.name, nid, exc)
            raise LunFenced(str(exc)) from exc
        finally:
            if spec.maps_blocks:
                self._check_soft_threshold()

    def _conflicts(self, spec: CommandSpec, nid: NexusId, cdb: bytes) -> bool:
        access = spec.access_of(cdb) if spec.access_of is not None else spec.access
        holder = self._spc2_holder
        if holder is not None and holder != nid and access not in (Access.ALWAYS, Access.SPC2):
            return True  # SPC-2 §5.5.1: only INQUIRY, REPORT LUNS, REQUEST SENSE, RELEASE pass
        return pr.access_conflict(self._pr, nid, access)

    # ------------------------------------------------------------------ unit attentions

    def _unit_attention(self, nid: NexusId, *, consume: bool) -> SenseCode | None:
        """Register the nexus (a new one gets 29h/00h) and take its next unit attention."""
        with self._lock:
            queue = self._nexuses.get(nid)
            if queue is None:
                queue = deque([POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED])
                self._nexuses[nid] = queue
                while len(self._nexuses) > NEXUS_TABLE_MAX:
                    forgotten, _ = self._nexuses.popitem(last=False)
                    log.info("event=nexus_forgotten nexus=%s bound=%d", forgotten, NEXUS_TABLE_MAX)
            else:
                self._nexuses.move_to_end(nid)
            if consume and queue:
                return queue.popleft()
            return None

    def _establish(self, code: SenseCode, targets: Iterable[NexusId] | None) -> None:
        """Queue a unit attention for the given known nexuses (None: every known nexus)."""
        with self._lock:
            for nid in list(self._nexuses) if targets is None else list(targets):
                queue = self._nexuses.get(nid)
                if queue is None:
                    continue  # never seen: it will get 29h/00h, which supersedes this
                if code.asc == POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED.asc:
                    queue.clear()  # a reset supersedes every pending unit attention (SAM-5 §5.14)
                elif code in queue:
                    continue
                elif len(queue) >= UNIT_ATTENTION_QUEUE_MAX:
                    log.warning("event=unit_attention_dropped nexus=%s sense=%s", nid, code.name)
                    continue
                queue.append(code)
        log.info("event=unit_attention sense=%s targets=%s", code.name, "all" if targets is None else "some")

    def _reset(self, kind: str, by: Nexus) -> None:
        with self._lock:
            released = self._spc2_holder
            self._spc2_holder = None
        self._establish(BUS_DEVICE_RESET_FUNCTION_OCCURRED, None)
        log.info("event=%s by=%s spc2_released=%s", kind, nexus_id(by), released)

    def _check_soft_threshold(self) -> None:
        try:
            crossed = self._device.soft_threshold_event()
        except Exception:
            log.exception("event=soft_threshold_check_failed")
            return
        if crossed:
            self._establish(THIN_PROVISIONING_SOFT_THRESHOLD_REACHED, None)

    # ------------------------------------------------------------------ durability barrier

    def _flush_barrier(self) -> None:
        """The durability barrier of the SCSI layer (STYLE.md rule 8, DESIGN.md §2 point 2).

        BlockDevice.flush returns only when every write that completed before the call
        is durable: its blobs fsynced on at least 2 of 3 replicas and the segment-map
        change committed by a Raft majority. Every GOOD that promises durability of
        cached writes (SYNCHRONIZE CACHE, FUA COMPARE AND WRITE, STOP with NO_FLUSH=0)
        is sent only after this returns; an error here fails the command.
        """
        self._device.flush()

    def _write_blocks(self, lba: int, data: bytes, *, fua: bool) -> None:
        """Write whole blocks. Without fua they land in the volatile write-back cache
        (DESIGN.md §2 point 1); with fua, BlockDevice.write returns only when these
        blocks are durable as a flush would make them, so GOOD follows durability."""
        self._device.write(lba, data, fua=fua)

    # ------------------------------------------------------------------ common checks

    def _capacity(self) -> int:
        return self._device.capacity_blocks

    def _block_size(self) -> int:
        return self._device.block_size

    def _max_transfer_blocks(self) -> int:
        return MAX_TRANSFER_BYTES // self._block_size()

    def _max_compare_and_write_blocks(self) -> int:
        return _max_compare_and_write_blocks(self._block_size())

    def _max_write_same_blocks(self) -> int:
        return WRITE_SAME_BYTES_MAX // self._block_size()

    def _check_range(self, cdb: bytes, lba: int, blocks: int) -> None:
        """SBC-3 §4.5: LBA + length past the capacity is LOGICAL BLOCK ADDRESS OUT OF RANGE
        (with zero blocks, an LBA past the capacity is too)."""
        if lba + blocks > self._capacity():
            raise CheckCondition(LBA_OUT_OF_RANGE, information=lba)

    def _check_transfer(self, cdb: bytes, blocks: int) -> None:
        if blocks > self._max_transfer_blocks():
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=_length_field(cdb))

    def _check_data_out(self, cdb: bytes, data_out: bytes, expected: int) -> None:
        """Data-Out of any other size than the CDB asks for is refused: the initiator and
        the CDB disagree about a command that cannot be done in part (a compare, a
        WRITE SAME pattern)."""
        if len(data_out) != expected:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=_length_field(cdb))

    def _whole_blocks_received(self, data_out: bytes, blocks: int) -> bytes:
        """The Data-Out of a WRITE cut to the whole blocks that arrived.

        When the iSCSI Expected Data Transfer Length is shorter than the CDB's transfer
        length, the session hands over only what the initiator sent; the unit writes
        those whole blocks, answers GOOD and the session reports the residual overflow
        (RFC 7143 §11.4.5.2, SAM-5 §5.4.3; libiscsi iSCSIResiduals checks that exactly
        the first EDTL bytes are written and the rest of the range is untouched)."""
        bs = self._block_size()
        whole = min(blocks, len(data_out) // bs)
        return data_out[: whole * bs]

    @staticmethod
    def _check_protect(cdb: bytes) -> None:
        """RDPROTECT/WRPROTECT/VRPROTECT must be 0: no protection information (PROTECT=0)."""
        if cdb[1] & 0xE0:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(1, 7))

    # ------------------------------------------------------------------ SPC commands

    def _cmd_test_unit_ready(self, req: Request) -> ScsiResult:
        return ScsiResult(GOOD)

    def _cmd_request_sense(self, req: Request) -> ScsiResult:
        """REQUEST SENSE (SPC-4 §6.29): reports and clears the next unit attention, else NO SENSE."""
        if req.cdb[1] & 0x01:  # DESC: descriptor format sense is not supported
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(1, 0))
        pending = self._unit_attention(req.nexus_id, consume=True)
        data = fixed_sense(pending if pending is not None else NO_SENSE)
        return ScsiResult(GOOD, data[: req.cdb[4]])

    def _cmd_inquiry(self, req: Request) -> ScsiResult:
        """INQUIRY (SPC-4 §6.6): standard data or a VPD page, cut to the ALLOCATION LENGTH."""
        evpd = req.cdb[1] & 0x01
        page = req.cdb[2]
        alloc = _be(req.cdb[3:5])
        if not evpd:
            if page:
                raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(2))
            return ScsiResult(GOOD, self._standard_inquiry()[:alloc])
        builder = _VPD_PAGES.get(page)
        if builder is None:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(2))
        return ScsiResult(GOOD, builder(self)[:alloc])

    def _standard_inquiry(self) -> bytes:
        ident = self._identity
        out = bytearray(STANDARD_INQUIRY_BYTES)
        out[0] = 0x00  # PERIPHERAL QUALIFIER 000b, DEVICE TYPE 00h direct access block
        out[1] = 0x00  # RMB=0: not removable
        out[2] = INQUIRY_VERSION_SPC4
        out[3] = 0x10 | 0x02  # HISUP=1, RESPONSE DATA FORMAT=2 (NORMACA=0)
        out[4] = STANDARD_INQUIRY_BYTES - 5  # ADDITIONAL LENGTH
        out[5] = 0x00  # SCCS ACC TPGS=00b 3PC PROTECT=0
        out[6] = 0x00  # ENCSERV MULTIP
        out[7] = 0x02  # CMDQUE=1
        out[8:16] = _ascii_field(ident.vendor, 8, "vendor")
        out[16:32] = _ascii_field(ident.product, 16, "product")
        out[32:36] = _ascii_field(ident.revision, 4, "revision")
        for i, descriptor in enumerate(VERSION_DESCRIPTORS):
            out[58 + 2 * i : 60 + 2 * i] = descriptor.to_bytes(2, "big")
        return bytes(out)

    def _vpd_supported_pages(self) -> bytes:
        pages = bytes(sorted(_VPD_PAGES))
        return bytes([0x00, 0x00, 0x00, len(pages)]) + pages

    def _vpd_unit_serial_number(self) -> bytes:
        serial = self._identity.serial.encode("ascii")
        return bytes([0x00, 0x80, 0x00, len(serial)]) + serial

    def _vpd_device_identification(self) -> bytes:
        """Device Identification (SPC-4 §7.8.6): NAA, relative target port, target port
        group and SCSI name strings for the target port and the target device."""
        ident = self._identity
        iscsi_binary = (0x5 << 4) | 0x1  # PROTOCOL IDENTIFIER iSCSI, CODE SET binary
        iscsi_utf8 = (0x5 << 4) | 0x3  # PROTOCOL IDENTIFIER iSCSI, CODE SET UTF-8
        piv, lu, port, device = 0x80, 0x00, 0x10, 0x20

        def designator(code_set: int, flags: int, body: bytes) -> bytes:
            return bytes([code_set, flags, 0x00, len(body)]) + body

        def name_string(text: str) -> bytes:
            raw = text.encode("utf-8") + b"\0"  # null terminated, padded to 4 (SPC-4 §7.8.6.11)
            return raw + b"\0" * (-len(raw) % 4)

        port_id = ident.tpgt.to_bytes(4, "big")
        body = b"".join(
            (
                designator(0x01, lu | 0x3, ident.naa),  # NAA, associated with the logical unit
                designator(iscsi_binary, piv | port | 0x4, port_id),  # relative target port
                designator(iscsi_binary, piv | port | 0x5, port_id),  # target port group
                designator(iscsi_utf8, piv | port | 0x8, name_string(f"{ident.target_name},t,0x{ident.tpgt:04x}")),
                designator(iscsi_utf8, piv | device | 0x8, name_string(ident.target_name)),
            )
        )
        return bytes([0x00, 0x83]) + len(body).to_bytes(2, "big") + body

    def _vpd_block_limits(self) -> bytes:
        """Block Limits (SBC-3 §6.5.3, page length 3Ch)."""
        bs = self._block_size()
        out = bytearray(4 + _VPD_PAGE_LENGTH_SBC3)
        out[1] = 0xB0
        out[3] = _VPD_PAGE_LENGTH_SBC3
        out[4] = 0x01  # WSNZ: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is refused
        out[5] = self._max_compare_and_write_blocks()
        out[6:8] = max(1, OPTIMAL_TRANSFER_GRANULARITY_BYTES // bs).to_bytes(2, "big")
        out[8:12] = self._max_transfer_blocks().to_bytes(4, "big")
        out[12:16] = (OPTIMAL_TRANSFER_BYTES // bs).to_bytes(4, "big")
        out[20:24] = UNMAP_BLOCKS_MAX.to_bytes(4, "big")
        out[24:28] = UNMAP_DESCRIPTORS_MAX.to_bytes(4, "big")
        out[28:32] = (1).to_bytes(4, "big")  # OPTIMAL UNMAP GRANULARITY: any block can be a hole
        out[36:44] = self._max_write_same_blocks().to_bytes(8, "big")
        # Atomic write fields (44..63) stay 0: WRITE ATOMIC is not supported.
        return bytes(out)

    def _vpd_block_device_characteristics(self) -> bytes:
        """Block Device Characteristics (SBC-3 §6.5.2): MEDIUM ROTATION RATE 1, non-rotating."""
        out = bytearray(4 + _VPD_PAGE_LENGTH_SBC3)
        out[1] = 0xB1
        out[3] = _VPD_PAGE_LENGTH_SBC3
        out[4:6] = (1).to_bytes(2, "big")
        return bytes(out)

    def _vpd_logical_block_provisioning(self) -> bytes:
        """Logical Block Provisioning (SBC-3 §6.5.4): thin; UNMAP and both WRITE SAMEs
        unmap; unmapped blocks read as zeros. THRESHOLD EXPONENT 0: no threshold mode
        page; the soft threshold unit attention is still raised (DESIGN.md §5)."""
        out = bytearray(8)
        out[1] = 0xB2
        out[3] = 0x04
        out[5] = 0x80 | 0x40 | 0x20 | 0x04  # LBPU, LBPWS, LBPWS10, LBPRZ; ANC_SUP=0, DP=0
        out[6] = 0x02  # PROVISIONING TYPE: thin
        return bytes(out)

    def _cmd_report_luns(self, req: Request) -> ScsiResult:
        """REPORT LUNS (SPC-4 §6.33): LUN 0 alone; no well-known logical units."""
        alloc = _be(req.cdb[6:10])
        if alloc < 16:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(6))
        try:
            select = _Select(req.cdb[2])
        except ValueError:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(2)) from None
        luns = b"" if select is _Select.WELL_KNOWN_ONLY else bytes(8)
        data = len(luns).to_bytes(4, "big") + bytes(4) + luns
        return ScsiResult(GOOD, data[:alloc])

    def _cmd_mode_sense(self, req: Request) -> ScsiResult:
        """MODE SENSE(6)/(10) (SPC-4 §6.11, §6.12) with the SBC-3 §6.4.2 block descriptor."""
        cdb = req.cdb
        ten = cdb[0] == OP_MODE_SENSE10
        dbd = bool(cdb[1] & 0x08)
        long_lba = ten and bool(cdb[1] & 0x10)
        pc, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = _be(cdb[7:9]) if ten else cdb[4]
        if pc == 0b11:
            raise CheckCondition(SAVING_PARAMETERS_NOT_SUPPORTED, field=FieldPointer(2, 7))
        if subpage not in (0x00, 0xFF):
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(3))
        if code == _ALL_PAGES:
            pages = [MODE_PAGES[c] for c in sorted(MODE_PAGES)]
        elif code in MODE_PAGES:
            pages = [MODE_PAGES[code]]
        else:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(2, 5))
        body = b"".join(p.for_pc(pc) for p in pages)
        descriptor = b"" if dbd else self._block_descriptor(long_lba, changeable=pc == 0b01)
        if ten:
            header = bytearray(8)
            header[0:2] = (6 + len(descriptor) + len(body)).to_bytes(2, "big")
            header[3] = _DEVICE_SPECIFIC_DPOFUA
            header[4] = 0x01 if long_lba and descriptor else 0x00  # LONGLBA
            header[6:8] = len(descriptor).to_bytes(2, "big")
        else:
            header = bytearray([3 + len(descriptor) + len(body), 0x00, _DEVICE_SPECIFIC_DPOFUA, len(descriptor)])
        return ScsiResult(GOOD, (bytes(header) + descriptor + body)[:alloc])

    def _block_descriptor(self, long_lba: bool, *, changeable: bool) -> bytes:
        """Short (8-byte) or long (16-byte) LBA mode parameter block descriptor (SBC-3 §6.4.2)."""
        if changeable:
            return bytes(16 if long_lba else 8)  # neither count nor length is changeable
        blocks, bs = self._capacity(), self._block_size()
        if long_lba:
            return blocks.to_bytes(8, "big") + bytes(4) + bs.to_bytes(4, "big")
        return min(blocks, 0xFFFF_FFFF).to_bytes(4, "big") + b"\0" + bs.to_bytes(3, "big")

    def _cmd_mode_select(self, req: Request) -> ScsiResult:
        """MODE SELECT(6)/(10) (SPC-4 §6.9, §6.10). Nothing is changeable, so the unit
        accepts a parameter list that restates the current values and refuses any
        change with INVALID FIELD IN PARAMETER LIST pointing at the first changed bit."""
        cdb = req.cdb
        ten = cdb[0] == OP_MODE_SELECT10
        if cdb[1] & 0x01:  # SP: saved pages are not supported
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(1, 0))
        length = _be(cdb[7:9]) if ten else cdb[4]
        if length == 0:
            return ScsiResult(GOOD)
        data = req.data_out[:length]
        header = 8 if ten else 4
        if len(data) < length or length < header:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        bd_length = _be(data[6:8]) if ten else data[3]
        long_lba = ten and bool(data[4] & 0x01)
        pos = header
        if bd_length:
            if bd_length != (16 if long_lba else 8):
                raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(6 if ten else 3, in_cdb=False))
            if pos + bd_length > len(data):
                raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
            self._check_block_descriptor(data[pos : pos + bd_length], pos)
            pos += bd_length
        while pos < len(data):
            pos = self._check_mode_page(data, pos)
        return ScsiResult(GOOD)

    def _check_block_descriptor(self, bd: bytes, at: int) -> None:
        if len(bd) == 16:
            blocks, bs, bs_at = _be(bd[0:8]), _be(bd[12:16]), at + 12
            current = self._capacity()
        else:
            blocks, bs, bs_at = _be(bd[0:4]), _be(bd[5:8]), at + 5
            current = min(self._capacity(), 0xFFFF_FFFF)
        if blocks not in (0, current):
            raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(at, in_cdb=False))
        if bs != self._block_size():
            raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(bs_at, in_cdb=False))

    @staticmethod
    def _check_mode_page(data: bytes, pos: int) -> int:
        if len(data) - pos < 2:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        head = data[pos]
        if head & 0x80:  # PS is reserved in MODE SELECT
            raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(pos, 7, in_cdb=False))
        page = MODE_PAGES.get(head & 0x3F)
        if page is None or head & 0x40:  # unknown page, or a subpage (none exist)
            raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(pos, 5, in_cdb=False))
        if data[pos + 1] != len(page.current) - 2:
            raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(pos + 1, in_cdb=False))
        end = pos + len(page.current)
        if end > len(data):
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        for i in range(2, len(page.current)):
            changed = (data[pos + i] ^ page.current[i]) & ~page.changeable[i] & 0xFF
            if changed:
                bit = changed.bit_length() - 1
                raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(pos + i, bit, in_cdb=False))
        return end

    def _cmd_report_supported_operation_codes(self, req: Request) -> ScsiResult:
        """REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35), straight from COMMANDS."""
        cdb = req.cdb
        rctd = bool(cdb[2] & 0x80)
        option = cdb[2] & 0x07
        opcode, sa = cdb[3], _be(cdb[4:6])
        alloc = _be(cdb[6:10])
        if option == 0b000:
            descriptors = b"".join(_command_descriptor(s, rctd) for s in COMMANDS)
            data = len(descriptors).to_bytes(4, "big") + descriptors
        elif option in (0b001, 0b010, 0b011):
            has_sa = opcode in SERVICE_ACTION_OPCODES
            if (option == 0b001 and has_sa) or (option == 0b010 and not has_sa):
                raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(2, 2))
            if has_sa:
                spec = _BY_KEY.get((opcode, sa)) if sa <= _SA_MASK else None
            else:
                spec = _BY_KEY.get((opcode, None)) if sa == 0 else None
            data = _one_command(spec, rctd)
        else:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(2, 2))
        return ScsiResult(GOOD, data[:alloc])

    # ------------------------------------------------------------------ reservations

    def _cmd_persistent_reserve_in(self, req: Request) -> ScsiResult:
        """PERSISTENT RESERVE IN (SPC-4 §6.14)."""
        alloc = _be(req.cdb[7:9])
        state = self._pr
        sa = pr.InService(req.cdb[1] & _SA_MASK)
        if sa is pr.InService.READ_KEYS:
            data = pr.read_keys(state)
        elif sa is pr.InService.READ_RESERVATION:
            data = pr.read_reservation(state)
        elif sa is pr.InService.REPORT_CAPABILITIES:
            data = pr.report_capabilities(state)
        else:
            data = pr.read_full_status(state, self._identity.tpgt)
        return ScsiResult(GOOD, data[:alloc])

    def _cmd_persistent_reserve_out(self, req: Request) -> ScsiResult:
        """PERSISTENT RESERVE OUT (SPC-4 §6.15). The new state is saved before it takes
        effect: if the store is unavailable the command answers BUSY and nothing changed."""
        cdb = req.cdb
        length = _be(cdb[5:9])
        if length != pr.PR_OUT_PARAMETER_LIST_BYTES or len(req.data_out) < length:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        params = pr.PrOutParameters.parse(req.data_out[:length])
        with self._pr_lock:
            state = self._pr
            outcome = pr.persistent_reserve_out(
                state, req.nexus_id, cdb[1] & _SA_MASK, cdb[2] >> 4, cdb[2] & 0x0F, params
            )
            if not outcome.changed:
                return ScsiResult(GOOD)
            self._store.save(outcome.state.to_bytes())
            self._pr = outcome.state
            with self._lock:
                known = list(self._nexuses)
            for target, code in pr.unit_attention_targets(outcome, known):
                self._establish(code, (target,))
        log.info(
            "event=persistent_reserve_out action=%s nexus=%s generation=%d registrations=%d reservation=%s",
            pr.ServiceAction(cdb[1] & _SA_MASK).name,
            req.nexus_id,
            outcome.state.generation,
            len(outcome.state.registrations),
            None if outcome.state.reservation is None else outcome.state.reservation.type.name,
        )
        if outcome.preempted and cdb[1] & _SA_MASK == pr.ServiceAction.PREEMPT_AND_ABORT:
            # Aborting the preempted nexuses' tasks is the session layer's business; every
            # command of theirs that starts from now on meets the new reservation state.
            log.info("event=preempt_and_abort preempted=%d", len(outcome.preempted))
        return ScsiResult(GOOD)

    def _cmd_reserve6(self, req: Request) -> ScsiResult:
        """RESERVE(6) (SPC-2 §7.21). CRH=0: any persistent registration makes it conflict."""
        with self._pr_lock, self._lock:
            if self._pr.registrations:
                raise ReservationConflict("RESERVE(6) while persistent reservation keys are registered")
            if self._spc2_holder is not None and self._spc2_holder != req.nexus_id:
                raise ReservationConflict(f"RESERVE(6) while reserved by {self._spc2_holder}")
            self._spc2_holder = req.nexus_id
        return ScsiResult(GOOD)

    def _cmd_release6(self, req: Request) -> ScsiResult:
        """RELEASE(6) (SPC-2 §7.19): releases the nexus's own reservation; anything else is a no-op."""
        with self._pr_lock, self._lock:
            if self._pr.registrations:
                raise ReservationConflict("RELEASE(6) while persistent reservation keys are registered")
            if self._spc2_holder == req.nexus_id:
                self._spc2_holder = None
        return ScsiResult(GOOD)

    # ------------------------------------------------------------------ SBC commands

    def _cmd_read_capacity10(self, req: Request) -> ScsiResult:
        """READ CAPACITY(10) (SBC-3 §5.15): RETURNED LBA is FFFFFFFFh when too large."""
        cdb = req.cdb
        if not cdb[8] & 0x01 and _be(cdb[2:6]):  # PMI=0 requires LBA=0
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(2))
        last = max(self._capacity() - 1, 0)
        returned = last if last <= 0xFFFF_FFFE else 0xFFFF_FFFF
        return ScsiResult(GOOD, returned.to_bytes(4, "big") + self._block_size().to_bytes(4, "big"))

    def _cmd_read_capacity16(self, req: Request) -> ScsiResult:
        """READ CAPACITY(16) (SBC-3 §5.16): LBPME=1, LBPRZ=1, one logical block per physical."""
        alloc = _be(req.cdb[10:14])
        out = bytearray(32)
        out[0:8] = max(self._capacity() - 1, 0).to_bytes(8, "big")
        out[8:12] = self._block_size().to_bytes(4, "big")
        out[13] = 0x00  # P_I_EXPONENT 0, LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 0
        out[14] = 0x80 | 0x40  # LBPME, LBPRZ; LOWEST ALIGNED LBA 0
        return ScsiResult(GOOD, bytes(out[:alloc]))

    def _cmd_read(self, req: Request) -> ScsiResult:
        """READ(6/10/12/16) (SBC-3 §5.8–§5.11). DPO and FUA need no action: a read sees
        the write-back cache, which is the newest data."""
        cdb = req.cdb
        if len(cdb) != 6:
            self._check_protect(cdb)
        lba, blocks = _lba_and_length(cdb)
        self._check_transfer(cdb, blocks)
        self._check_range(cdb, lba, blocks)
        if blocks == 0:
            return ScsiResult(GOOD)
        data = self._device.read(lba, blocks)
        if len(data) != blocks * self._block_size():
            raise RuntimeError(f"device read {len(data)} bytes for {blocks} blocks")
        return ScsiResult(GOOD, data)

    def _cmd_write(self, req: Request) -> ScsiResult:
        """WRITE(6/10/12/16) (SBC-3 §5.32–§5.35). FUA → a durable write; DPO ignored.
        A Data-Out shorter than the transfer length writes the whole blocks received."""
        cdb = req.cdb
        fua = False
        if len(cdb) != 6:
            self._check_protect(cdb)
            fua = bool(cdb[1] & 0x08)
        lba, blocks = _lba_and_length(cdb)
        self._check_transfer(cdb, blocks)
        self._check_range(cdb, lba, blocks)
        data = self._whole_blocks_received(req.data_out, blocks)
        if data:
            self._write_blocks(lba, data, fua=fua)
        return ScsiResult(GOOD)

    def _cmd_write_and_verify(self, req: Request) -> ScsiResult:
        """WRITE AND VERIFY(10/12/16) (SBC-3 §5.37–§5.39). The verify is "from the medium",
        so the write is durable (FUA) before the blocks are read back; BYTCHK=01b then
        compares them with the Data-Out."""
        cdb = req.cdb
        self._check_protect(cdb)
        bytchk = _bytchk(cdb)
        lba, blocks = _lba_and_length(cdb)
        self._check_transfer(cdb, blocks)
        self._check_range(cdb, lba, blocks)
        data = self._whole_blocks_received(req.data_out, blocks)
        if not data:
            return ScsiResult(GOOD)
        self._write_blocks(lba, data, fua=True)
        if bytchk:
            self._compare(self._device.read(lba, len(data) // self._block_size()), data)
        return ScsiResult(GOOD)

    def _cmd_verify(self, req: Request) -> ScsiResult:
        """VERIFY(10/12/16) (SBC-3 §5.28–§5.30): BYTCHK=00b checks the range only;
        BYTCHK=01b compares the blocks with the Data-Out (MISCOMPARE, INFORMATION = the
        offset of the first differing byte)."""
        cdb = req.cdb
        self._check_protect(cdb)
        bytchk = _bytchk(cdb)
        lba, blocks = _lba_and_length(cdb)
        self._check_transfer(cdb, blocks)
        self._check_range(cdb, lba, blocks)
        if blocks == 0 or not bytchk:
            return ScsiResult(GOOD)
        self._check_data_out(cdb, req.data_out, blocks * self._block_size())
        self._compare(self._device.read(lba, blocks), req.data_out)
        return ScsiResult(GOOD)

    @staticmethod
    def _compare(medium: bytes, expected: bytes) -> None:
        if medium != expected:
            offset = next((i for i, (a, b) in enumerate(zip(medium, expected, strict=False)) if a != b), len(medium))
            raise CheckCondition(MISCOMPARE_DURING_VERIFY_OPERATION, information=offset)

    def _cmd_synchronize_cache(self, req: Request) -> ScsiResult:
        """SYNCHRONIZE CACHE(10/16) (SBC-3 §5.22, §5.23). NUMBER OF BLOCKS 0 means to the
        end. The whole cache is flushed, which covers any range. IMMED=1 allows GOOD
        before the flush; floe still answers only after it (DESIGN.md §2: GOOD is never
        sent for a flush that is not durable yet)."""
        cdb = req.cdb
        lba, blocks = _lba_and_length(cdb)
        self._check_range(cdb, lba, blocks)
        self._flush_barrier()
        if self._device.writes_lost:
            # The previous owner died holding acknowledged, unflushed writes: GOOD would
            # claim them durable. Each initiator (by name: a reconnecting initiator comes
            # back as a new I_T nexus) hears it once, on its first flush here, as a write
            # error (MEDIUM ERROR 0Ch/00h), which initiators report instead of retrying
            # (QEMU retries the reset UNIT ATTENTION silently).
            with self._lock:
                first = req.nexus.initiator_name not in self._lost_writes_reported
                self._lost_writes_reported.add(req.nexus.initiator_name)
            if first:
                log.warning("event=flush_reports_lost_writes nexus=%s", req.nexus_id)
                raise CheckCondition(WRITE_ERROR)
        return ScsiResult(GOOD)

    def _cmd_pre_fetch(self, req: Request) -> ScsiResult:
        """PRE-FETCH(10/16) (SBC-3 §5.10, §5.11): a hint to read blocks into the cache. floe
        keeps no per-LBA cache to fill ahead, so after the range check the answer is GOOD,
        which SBC-3 allows when the blocks are not guaranteed to be cached (CONDITION MET
        would promise they are). PREFETCH LENGTH 0 means to the end of the medium."""
        cdb = req.cdb
        lba, blocks = _lba_and_length(cdb)
        self._check_range(cdb, lba, blocks)
        return ScsiResult(GOOD)

    def _cmd_write_same(self, req: Request) -> ScsiResult:
        """WRITE SAME(10/16) (SBC-3 §5.41, §5.42). UNMAP=1 with the zero block punches
        holes (LBPRZ=1); NDOB=1 (16 only) means a zero block without Data-Out. ANCHOR is
        not supported (ANC_SUP=0), and WSNZ=1: zero blocks is refused."""
        cdb = req.cdb
        self._check_protect(cdb)
        anchor, unmap = bool(cdb[1] & 0x10), bool(cdb[1] & 0x08)
        ndob = cdb[0] == OP_WRITE_SAME16 and bool(cdb[1] & 0x01)
        if anchor:  # ANCHOR without UNMAP is invalid; with UNMAP it needs ANC_SUP
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(1, 4))
        lba, blocks = _lba_and_length(cdb)
        self._check_range(cdb, lba, blocks)
        if blocks == 0 or blocks > self._max_write_same_blocks():
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=_length_field(cdb))
        bs = self._block_size()
        self._check_data_out(cdb, req.data_out, 0 if ndob else bs)
        block = bytes(bs) if ndob else req.data_out
        self._device.write_same(lba, blocks, block, unmap=unmap)
        return ScsiResult(GOOD)

    def _cmd_unmap(self, req: Request) -> ScsiResult:
        """UNMAP (SBC-3 §5.28): every descriptor is checked before any block is unmapped."""
        cdb = req.cdb
        if cdb[1] & 0x01:  # ANCHOR, ANC_SUP=0
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(1, 0))
        length = _be(cdb[7:9])
        if length == 0:
            return ScsiResult(GOOD)  # no parameter list: not an error
        params = req.data_out[:length]
        if length < 8 or len(params) < length:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        # A BLOCK DESCRIPTOR DATA LENGTH past the list is clipped to it, and an
        # incomplete last descriptor is ignored (SBC-3 §5.28.2).
        descriptor_bytes = min(_be(params[2:4]), len(params) - 8)
        count = descriptor_bytes // 16
        if count > UNMAP_DESCRIPTORS_MAX:
            raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(2, in_cdb=False))
        capacity = self._capacity()
        ranges: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            at = 8 + 16 * i
            lba, blocks = _be(params[at : at + 8]), _be(params[at + 8 : at + 12])
            if lba + blocks > capacity:
                raise CheckCondition(LBA_OUT_OF_RANGE, information=lba)
            total += blocks
            if blocks:
                ranges.append((lba, blocks))
        if total > UNMAP_BLOCKS_MAX:
            raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(8, in_cdb=False))
        if ranges:
            self._device.unmap(ranges)
        return ScsiResult(GOOD)

    def _cmd_compare_and_write(self, req: Request) -> ScsiResult:
        """COMPARE AND WRITE (SBC-3 §5.2): the Data-Out is the compare data then the write
        data; the device makes the pair atomic. NUMBER OF LOGICAL BLOCKS 0 is a no-op."""
        cdb = req.cdb
        self._check_protect(cdb)
        fua = bool(cdb[1] & 0x08)
        lba, blocks = _be(cdb[2:10]), cdb[13]
        if blocks > self._max_compare_and_write_blocks():
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(13))
        if lba + blocks > self._capacity():
            raise CheckCondition(LBA_OUT_OF_RANGE, information=lba)
        if blocks == 0:
            if len(req.data_out) > 2 * self._max_compare_and_write_blocks() * self._block_size():
                # More Data-Out than any COMPARE AND WRITE carries: the initiator's
                # NUMBER OF LOGICAL BLOCKS overflowed its 8 bits (see _compare_and_write_data).
                raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(13))
            return ScsiResult(GOOD)
        half = blocks * self._block_size()
        if len(req.data_out) != 2 * half:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(13))
        self._device.compare_and_write(lba, req.data_out[:half], req.data_out[half:])
        if fua:
            self._flush_barrier()
        return ScsiResult(GOOD)

    def _cmd_get_lba_status(self, req: Request) -> ScsiResult:
        """GET LBA STATUS (SBC-3 §5.5): runs from the STARTING LBA, 0 mapped, 1 deallocated."""
        lba, alloc = _be(req.cdb[2:10]), _be(req.cdb[10:14])
        capacity = self._capacity()
        if lba >= capacity:
            raise CheckCondition(LBA_OUT_OF_RANGE, information=lba)
        wanted = max(1, min(GET_LBA_STATUS_DESCRIPTORS_MAX, (alloc - 8) // 16))
        descriptors = bytearray()
        while lba < capacity and len(descriptors) < 16 * wanted:
            start, run, mapped = self._device.lba_status(lba)
            if start != lba or run < 1:
                raise RuntimeError(f"device lba_status({lba}) answered ({start}, {run})")
            run = min(run, capacity - lba, 0xFFFF_FFFF)
            descriptors += lba.to_bytes(8, "big") + run.to_bytes(4, "big") + bytes([0 if mapped else 1]) + bytes(3)
            lba += run
        data = (4 + len(descriptors)).to_bytes(4, "big") + bytes(4) + bytes(descriptors)
        return ScsiResult(GOOD, data[:alloc])

    def _cmd_start_stop_unit(self, req: Request) -> ScsiResult:
        """START STOP UNIT (SBC-3 §5.25): the medium is not removable (LOEJ=1 is refused),
        and a volume cannot stop; a STOP with NO_FLUSH=0 flushes the cache first."""
        cdb = req.cdb
        power_condition, no_flush, loej, start = cdb[4] >> 4, cdb[4] & 0x04, cdb[4] & 0x02, cdb[4] & 0x01
        if power_condition not in _POWER_CONDITIONS:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(4, 7))
        if loej:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(4, 1))
        if power_condition == 0 and not start and not no_flush:
            self._flush_barrier()
        return ScsiResult(GOOD)

    def _cmd_prevent_allow_medium_removal(self, req: Request) -> ScsiResult:
        """PREVENT ALLOW MEDIUM REMOVAL (SBC-3 §5.7): nothing to lock on a fixed medium."""
        if req.cdb[4] & 0x03 > 0b01:  # 10b and 11b are obsolete
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(4, 1))
        return ScsiResult(GOOD)


# ---------------------------------------------------------------------- reserved bits


def _check_reserved_bits(spec: CommandSpec, cdb: bytes) -> None:
    """Bits outside the command's CDB USAGE DATA are reserved: INVALID FIELD IN CDB
    (SPC-4 §2.4.1 "reserved"), pointing at the highest offending bit. NACA=1 is refused
    because the unit does not support ACA (SAM-5 §5.2, NormACA=0)."""
    last = len(cdb) - 1
    for i in range(1, last + 1):
        mask = spec.usage[i]
        if i == 1 and spec.service_action is not None:
            mask = _SA_MASK
        bad = cdb[i] & ~mask & 0xFF
        if i == last:
            bad |= cdb[i] & _NACA
        if bad:
            raise CheckCondition(INVALID_FIELD_IN_CDB, field=FieldPointer(i, bad.bit_length() - 1))


def _start_stop_access(cdb: bytes) -> Access:
    """SBC-3 Table 13: START STOP UNIT with START=1 and POWER CONDITION=0 passes every
    reservation; any other form conflicts like a write."""
    return Access.UNRESTRICTED if cdb[4] & 0x01 and not cdb[4] >> 4 else Access.WRITE


def _prevent_allow_access(cdb: bytes) -> Access:
    """SPC-4 Table 51: PREVENT ALLOW MEDIUM REMOVAL with PREVENT=0 passes; PREVENT≠0 conflicts."""
    return Access.UNRESTRICTED if not cdb[4] & 0x03 else Access.WRITE


# ---------------------------------------------------------------------- the dispatch table


def _u(hex_usage: str) -> bytes:
    return bytes.fromhex(hex_usage.replace(" ", ""))


_RW10 = "fa ffffffff 1f ffff 04"  # READ/WRITE(10): xPROTECT DPO FUA FUA_NV | LBA | GROUP | LENGTH | CONTROL
_RW12 = "fa ffffffff ffffffff 1f 04"
_RW16 = "fa ffffffffffffffff ffffffff 1f 04"
_V10 = "f6 ffffffff 1f ffff 04"  # VERIFY, WRITE AND VERIFY: xPROTECT DPO BYTCHK
_V12 = "f6 ffffffff ffffffff 1f 04"
_V16 = "f6 ffffffffffffffff ffffffff 1f 04"

LU = LogicalUnit
COMMANDS: tuple[CommandSpec, ...] = (
    # SPC-4
    CommandSpec("TEST UNIT READY", _u("00 00000000 04"), LU._cmd_test_unit_ready, Access.UNRESTRICTED, _no_data),
    CommandSpec(
        "REQUEST SENSE", _u("03 01 0000 ff 04"), LU._cmd_request_sense, Access.ALWAYS, _no_data, ua_exempt=True
    ),
    CommandSpec("INQUIRY", _u("12 01 ff ffff 04"), LU._cmd_inquiry, Access.ALWAYS, _no_data, ua_exempt=True),
    CommandSpec("MODE SELECT(6)", _u("15 11 0000 ff 04"), LU._cmd_mode_select, Access.WRITE, _param_list_6),
    CommandSpec("RESERVE(6)", _u("16 00000000 04"), LU._cmd_reserve6, Access.SPC2, _no_data),
    CommandSpec("RELEASE(6)", _u("17 00000000 04"), LU._cmd_release6, Access.SPC2, _no_data),
    CommandSpec("MODE SENSE(6)", _u("1a 08 ff ff ff 04"), LU._cmd_mode_sense, Access.READ, _no_data),
    CommandSpec("MODE SELECT(10)", _u("55 11 0000000000 ffff 04"), LU._cmd_mode_select, Access.WRITE, _param_list_10),
    CommandSpec("MODE SENSE(10)", _u("5a 18 ff ff 000000 ffff 04"), LU._cmd_mode_sense, Access.READ, _no_data),
    *(
        CommandSpec(
            f"PERSISTENT RESERVE IN/{sa.name}",
            _u(f"5e {sa:02x} 0000000000 ffff 04"),
            LU._cmd_persistent_reserve_in,
            Access.UNRESTRICTED,
            _no_data,
            service_action=sa,
        )
        for sa in pr.InService
    ),
    *(
        CommandSpec(
            f"PERSISTENT RESERVE OUT/{sa.name}",
            _u(f"5f {sa:02x} ff 0000 ffffffff 04"),
            LU._cmd_persistent_reserve_out,
            Access.UNRESTRICTED,
            _pr_out_param_list,
            service_action=sa,
        )
        for sa in pr.ServiceAction
    ),
    CommandSpec(
        "REPORT LUNS",
        _u("a0 00 ff 000000 ffffffff 00 04"),
        LU._cmd_report_luns,
        Access.ALWAYS,
        _no_data,
        ua_exempt=True,
    ),
    CommandSpec(
        "REPORT SUPPORTED OPERATION CODES",
        _u(f"a3 {SA_REPORT_SUPPORTED_OPERATION_CODES:02x} 87 ff ffff ffffffff 00 04"),
        LU._cmd_report_supported_operation_codes,
        Access.UNRESTRICTED,
        _no_data,
        service_action=SA_REPORT_SUPPORTED_OPERATION_CODES,
    ),
    # SBC-3
    CommandSpec("READ(6)", _u("08 1f ffff ff 04"), LU._cmd_read, Access.READ, _no_data),
    CommandSpec("WRITE(6)", _u("0a 1f ffff ff 04"), LU._cmd_write, Access.WRITE, _block_data, maps_blocks=True),
    CommandSpec(
        "START STOP UNIT",
        _u("1b 01 00 0f f7 04"),
        LU._cmd_start_stop_unit,
        Access.WRITE,
        _no_data,
        access_of=_start_stop_access,
        timeout_s=60,
    ),
    CommandSpec(
        "PREVENT ALLOW MEDIUM REMOVAL",
        _u("1e 000000 03 04"),
        LU._cmd_prevent_allow_medium_removal,
        Access.WRITE,
        _no_data,
        access_of=_prevent_allow_access,
    ),
    CommandSpec(
        "READ CAPACITY(10)", _u("25 00 ffffffff 0000 01 04"), LU._cmd_read_capacity10, Access.UNRESTRICTED, _no_data
    ),
    CommandSpec("READ(10)", _u("28" + _RW10), LU._cmd_read, Access.READ, _no_data),
    CommandSpec("WRITE(10)", _u("2a" + _RW10), LU._cmd_write, Access.WRITE, _block_data, maps_blocks=True),
    CommandSpec(
        "WRITE AND VERIFY(10)", _u("2e" + _V10), LU._cmd_write_and_verify, Access.WRITE, _block_data, maps_blocks=True
    ),
    CommandSpec("VERIFY(10)", _u("2f" + _V10), LU._cmd_verify, Access.READ, _verify_data),
    CommandSpec("PRE-FETCH(10)", _u("34 02 ffffffff 1f ffff 04"), LU._cmd_pre_fetch, Access.READ, _no_data),
    CommandSpec(
        "SYNCHRONIZE CACHE(10)",
        _u("35 06 ffffffff 1f ffff 04"),
        LU._cmd_synchronize_cache,
        Access.WRITE,
        _no_data,
        timeout_s=60,
    ),
    CommandSpec(
        "WRITE SAME(10)",
        _u("41 f8 ffffffff 1f ffff 04"),
        LU._cmd_write_same,
        Access.WRITE,
        _write_same_data,
        maps_blocks=True,
    ),
    CommandSpec("UNMAP", _u("42 01 00000000 1f ffff 04"), LU._cmd_unmap, Access.WRITE, _param_list_10),
    CommandSpec("READ(16)", _u("88" + _RW16), LU._cmd_read, Access.READ, _no_data),
    CommandSpec(
        "COMPARE AND WRITE",
        _u("89 fa ffffffffffffffff 000000 ff 1f 04"),
        LU._cmd_compare_and_write,
        Access.WRITE,
        _compare_and_write_data,
        maps_blocks=True,
    ),
    CommandSpec("WRITE(16)", _u("8a" + _RW16), LU._cmd_write, Access.WRITE, _block_data, maps_blocks=True),
    CommandSpec(
        "WRITE AND VERIFY(16)", _u("8e" + _V16), LU._cmd_write_and_verify, Access.WRITE, _block_data, maps_blocks=True
    ),
    CommandSpec("VERIFY(16)", _u("8f" + _V16), LU._cmd_verify, Access.READ, _verify_data),
    CommandSpec("PRE-FETCH(16)", _u("90 02 ffffffffffffffff ffffffff 1f 04"), LU._cmd_pre_fetch, Access.READ,
                _no_data),
    CommandSpec(
        "SYNCHRONIZE CACHE(16)",
        _u("91 06 ffffffffffffffff ffffffff 1f 04"),
        LU._cmd_synchronize_cache,
        Access.WRITE,
        _no_data,
        timeout_s=60,
    ),
    CommandSpec(
        "WRITE SAME(16)",
        _u("93 f9 ffffffffffffffff ffffffff 1f 04"),
        LU._cmd_write_same,
        Access.WRITE,
        _write_same_data,
        maps_blocks=True,
    ),
    CommandSpec(
        "READ CAPACITY(16)",
        _u(f"9e {SA_READ_CAPACITY16:02x} ffffffffffffffff ffffffff 01 04"),
        LU._cmd_read_capacity16,
        Access.UNRESTRICTED,
        _no_data,
        service_action=SA_READ_CAPACITY16,
    ),
    CommandSpec(
        "GET LBA STATUS",
        _u(f"9e {SA_GET_LBA_STATUS:02x} ffffffffffffffff ffffffff 00 04"),
        LU._cmd_get_lba_status,
        Access.READ,
        _no_data,
        service_action=SA_GET_LBA_STATUS,
    ),
    CommandSpec("READ(12)", _u("a8" + _RW12), LU._cmd_read, Access.READ, _no_data),
    CommandSpec("WRITE(12)", _u("aa" + _RW12), LU._cmd_write, Access.WRITE, _block_data, maps_blocks=True),
    CommandSpec(
        "WRITE AND VERIFY(12)", _u("ae" + _V12), LU._cmd_write_and_verify, Access.WRITE, _block_data, maps_blocks=True
    ),
    CommandSpec("VERIFY(12)", _u("af" + _V12), LU._cmd_verify, Access.READ, _verify_data),
)

_BY_KEY: Mapping[tuple[int, int | None], CommandSpec] = {(s.opcode, s.service_action): s for s in COMMANDS}
_OPCODES = frozenset(s.opcode for s in COMMANDS)
if len(_BY_KEY) != len(COMMANDS):
    raise RuntimeError("two rows of the dispatch table share an operation code and service action")

_VPD_PAGES: Mapping[int, Callable[[LogicalUnit], bytes]] = {
    0x00: LU._vpd_supported_pages,
    0x80: LU._vpd_unit_serial_number,
    0x83: LU._vpd_device_identification,
    0xB0: LU._vpd_block_limits,
    0xB1: LU._vpd_block_device_characteristics,
    0xB2: LU._vpd_logical_block_provisioning,
}


def lookup(cdb: bytes) -> CommandSpec | None:
    """The dispatch table row for a CDB, or None for an unknown opcode or service action."""
    if not cdb:
        return None
    opcode = cdb[0]
    if opcode in SERVICE_ACTION_OPCODES:
        if len(cdb) < 2:
            return None
        return _BY_KEY.get((opcode, cdb[1] & _SA_MASK))
    return _BY_KEY.get((opcode, None))


# ---------------------------------------------------------------------- REPORT SUPPORTED OPERATION CODES data


def _timeouts_descriptor(spec: CommandSpec) -> bytes:
    """Command timeouts descriptor (SPC-4 §6.35.4 Table 299): nominal 0 (not given), recommended."""
    return (0x0A).to_bytes(2, "big") + bytes(2) + (0).to_bytes(4, "big") + spec.timeout_s.to_bytes(4, "big")


def _command_descriptor(spec: CommandSpec, rctd: bool) -> bytes:
    """All-commands command descriptor (SPC-4 §6.35.3 Table 297)."""
    flags = (0x02 if rctd else 0) | (0x01 if spec.service_action is not None else 0)  # CTDP, SERVACTV
    out = bytes([spec.opcode, 0]) + (spec.service_action or 0).to_bytes(2, "big")
    out += bytes([0, flags]) + spec.cdb_length.to_bytes(2, "big")
    return out + (_timeouts_descriptor(spec) if rctd else b"")


def _one_command(spec: CommandSpec | None, rctd: bool) -> bytes:
    """One-command parameter data (SPC-4 §6.35.4 Table 298): SUPPORT 011b or 001b."""
    if spec is None:
        return bytes([0x00, 0b001, 0x00, 0x00])
    head = bytes([0x00, (0x80 if rctd else 0) | 0b011]) + spec.cdb_length.to_bytes(2, "big")
    return head + spec.usage + (_timeouts_descriptor(spec) if rctd else b"")
