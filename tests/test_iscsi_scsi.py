"""The SCSI command set of one logical unit (iscsi/scsi.py) over the in-memory device.

Tests follow the standards: CDBs are built from the SPC-4 r37 / SBC-3 r36 layouts and
the answers checked field by field (section numbers at each test). The libiscsi
conformance behaviours the target must match (iscsi-test-cu -t ALL) are covered by
name where a test mirrors one. A hypothesis fuzzer sends random CDBs from the
dispatch table and checks that every answer is a well-formed ScsiResult.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi import reservations as pr
from iscsi import scsi
from iscsi import sense as S
from iscsi.device import Fenced, Miscompare, OutOfRange, SpaceExhausted, Unavailable
from iscsi.memdev import MemDevice
from iscsi.reservations import MemReservationStore, PrOutParameters, PrState, PrType
from iscsi.scsi import COMMANDS, LogicalUnit, LunFenced, LunIdentity
from iscsi.sense import parse_fixed_sense
from iscsi.types import BUSY, CHECK_CONDITION, GOOD, MAX_TRANSFER_BYTES, RESERVATION_CONFLICT, Nexus, ScsiResult

TARGET = "iqn.2026-11.io.floe:tenant.vol"
NAA = bytes.fromhex("6001405f10e0a1b2c3d4e5f60718293a")
IDENTITY = LunIdentity(serial="f10e0a1b2c3d", naa=NAA, target_name=TARGET, tpgt=1)
BLOCKS = 4096
A = Nexus("iqn.2026-11.io.floe.test:alpha", bytes.fromhex("800000000001"), TARGET)
B = Nexus("iqn.2026-11.io.floe.test:beta", bytes.fromhex("800000000002"), TARGET)


# ---------------------------------------------------------------------- helpers


def make_lu(
    blocks: int = BLOCKS, block_size: int = 512, store: MemReservationStore | None = None, **dev: int
) -> tuple[LogicalUnit, MemDevice]:
    device = MemDevice(blocks, block_size, **dev)  # type: ignore[arg-type]
    return LogicalUnit(device, IDENTITY, reservations=store), device


def ready(lu: LogicalUnit, *nexuses: Nexus) -> None:
    """Consume the power-on unit attention every new nexus gets first."""
    for n in nexuses or (A,):
        assert lu.execute(n, tur()).status == CHECK_CONDITION
        assert lu.execute(n, tur()).status == GOOD


def fresh(blocks: int = BLOCKS, block_size: int = 512, **dev: int) -> tuple[LogicalUnit, MemDevice]:
    lu, device = make_lu(blocks, block_size, **dev)
    ready(lu, A)
    return lu, device


def sense_of(result: ScsiResult) -> S.ParsedSense:
    assert result.status == CHECK_CONDITION, result
    return parse_fixed_sense(result.sense)


def assert_sense(result: ScsiResult, code: S.SenseCode) -> S.ParsedSense:
    parsed = sense_of(result)
    assert parsed.is_(code), (parsed, code.name)
    return parsed


def tur() -> bytes:
    return bytes(6)


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def rw6(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBHBB", op, (lba >> 16) & 0x1F, lba & 0xFFFF, blocks & 0xFF, 0)


def rw10(op: int, lba: int, blocks: int, flags: int = 0, group: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, group, blocks, 0)


def rw12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, blocks, 0, 0)


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def caw(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, blocks, 0, 0)


def sai16(sa: int, lba: int = 0, alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, sa, lba, alloc, 0, 0)


def unmap_cdb(length: int, anchor: int = 0) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, anchor, 0, length, 0)


def unmap_params(ranges: Sequence[tuple[int, int]]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def mode_sense6(page: int = 0x3F, pc: int = 0, dbd: int = 0, subpage: int = 0, alloc: int = 255) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0])


def mode_sense10(page: int = 0x3F, pc: int = 0, dbd: int = 0, llbaa: int = 0, alloc: int = 1024) -> bytes:
    return struct.pack(">BBBB3xHB", 0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0), (pc << 6) | page, 0, alloc, 0)


def rsoc(options: int = 0, opcode: int = 0, sa: int = 0, rctd: bool = False, alloc: int = 65535) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | options, opcode, sa, alloc, 0, 0)


def prin(sa: int, alloc: int = 8192) -> bytes:
    return struct.pack(">BB5xHB", 0x5E, sa, alloc, 0)


def prout(sa: int, pr_type: int = 0, scope: int = 0, length: int = 24) -> bytes:
    return struct.pack(">BBB2xIB", 0x5F, sa, (scope << 4) | pr_type, length, 0)


def register(lu: LogicalUnit, n: Nexus, key: int, *, old: int = 0, aptpl: bool = False) -> ScsiResult:
    return lu.execute(n, prout(pr.ServiceAction.REGISTER), PrOutParameters(old, key, aptpl=aptpl).to_bytes())


def reserve(lu: LogicalUnit, n: Nexus, key: int, pr_type: int) -> ScsiResult:
    return lu.execute(n, prout(pr.ServiceAction.RESERVE, pr_type), PrOutParameters(key, 0).to_bytes())


def release(lu: LogicalUnit, n: Nexus, key: int, pr_type: int) -> ScsiResult:
    return lu.execute(n, prout(pr.ServiceAction.RELEASE, pr_type), PrOutParameters(key, 0).to_bytes())


def read_keys(lu: LogicalUnit, n: Nexus) -> tuple[int, list[int]]:
    r = lu.execute(n, prin(pr.InService.READ_KEYS))
    assert r.status == GOOD
    gen, length = struct.unpack(">II", r.data[:8])
    return gen, [int.from_bytes(r.data[8 + i : 16 + i], "big") for i in range(0, length, 8)]


def read_reservation(lu: LogicalUnit, n: Nexus) -> tuple[int, int, int] | None:
    r = lu.execute(n, prin(pr.InService.READ_RESERVATION))
    assert r.status == GOOD
    if struct.unpack(">I", r.data[4:8])[0] == 0:
        return None
    return struct.unpack(">Q", r.data[8:16])[0], r.data[21] >> 4, r.data[21] & 0x0F


def block(fill: int, size: int = 512) -> bytes:
    return bytes([fill]) * size


# ---------------------------------------------------------------------- sense codec


def test_fixed_sense_layout_matches_spc4_table_27() -> None:
    """SPC-4 §4.5.3: 70h, key in byte 2, INFORMATION with VALID, ADDITIONAL LENGTH 10, ASC/ASCQ 12/13, SKSV."""
    data = S.fixed_sense(S.INVALID_FIELD_IN_CDB, information=0x01020304, field=S.FieldPointer(2, 5))
    assert data.hex() == "f0000501020304" + "0a" + "00000000" + "2400" + "00" + "cd" + "0002"
    assert len(data) == S.FIXED_SENSE_LENGTH
    parsed = parse_fixed_sense(data)
    assert parsed.is_(S.INVALID_FIELD_IN_CDB) and parsed.information == 0x01020304
    assert parsed.field == S.FieldPointer(2, 5, in_cdb=True)
    plain = S.fixed_sense(S.LBA_OUT_OF_RANGE, information=1 << 40)  # too wide: VALID stays 0
    assert plain[0] == 0x70 and parse_fixed_sense(plain).information is None


def test_sense_table_rows_unpack_as_key_asc_ascq() -> None:
    assert tuple(S.LOGICAL_UNIT_NOT_SUPPORTED) == (0x5, 0x25, 0x00)
    assert S.fixed(*S.LOGICAL_UNIT_NOT_SUPPORTED) == S.fixed_sense(S.LOGICAL_UNIT_NOT_SUPPORTED)
    assert S.SENSE_CODES["SPACE_ALLOCATION_FAILED_WRITE_PROTECT"].asc_ascq == 0x2707
    with pytest.raises(ValueError):
        parse_fixed_sense(b"\x72" + bytes(17))  # descriptor format is not fixed format


# ---------------------------------------------------------------------- unit attentions


def test_first_command_of_a_new_nexus_gets_power_on_reset_unit_attention() -> None:
    """DESIGN.md §2 point 6 / SAM-5 §5.14: a LogicalUnit created on takeover announces the reset."""
    lu, _ = make_lu()
    assert_sense(lu.execute(A, rw10(0x28, 0, 1)), S.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED)
    assert lu.execute(A, rw10(0x28, 0, 1)).status == GOOD
    assert_sense(lu.execute(B, tur()), S.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED)


def test_inquiry_report_luns_request_sense_do_not_consume_the_unit_attention() -> None:
    """SPC-4 §5.9: INQUIRY and REPORT LUNS neither report nor clear it; REQUEST SENSE reports and clears it."""
    lu, _ = make_lu()
    assert lu.execute(A, inquiry()).status == GOOD
    assert lu.execute(A, struct.pack(">BB4xIBB", 0xA0, 0, 16, 0, 0)).status == GOOD
    r = lu.execute(A, bytes([0x03, 0, 0, 0, 18, 0]))
    assert r.status == GOOD and parse_fixed_sense(r.data).is_(S.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED)
    r = lu.execute(A, bytes([0x03, 0, 0, 0, 18, 0]))
    assert parse_fixed_sense(r.data).is_(S.NO_SENSE)
    assert lu.execute(A, tur()).status == GOOD


def test_unknown_opcode_still_reports_the_pending_unit_attention_first() -> None:
    lu, _ = make_lu()
    assert_sense(lu.execute(A, bytes([0xC0]) + bytes(5)), S.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED)
    assert_sense(lu.execute(A, bytes([0xC0]) + bytes(5)), S.INVALID_COMMAND_OPERATION_CODE)


def test_lun_reset_sets_bus_device_reset_for_every_nexus_and_releases_reserve6() -> None:
    """SAM-5 §7.7 (libiscsi MultipathIO.Reset: every path, the issuer included, sees 29h/03h)."""
    lu, _ = make_lu()
    ready(lu, A, B)
    assert lu.execute(A, bytes([0x16, 0, 0, 0, 0, 0])).status == GOOD
    lu.lun_reset(A)
    for n in (A, B):
        assert_sense(lu.execute(n, tur()), S.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
        assert lu.execute(n, tur()).status == GOOD
    assert lu.execute(B, bytes([0x16, 0, 0, 0, 0, 0])).status == GOOD  # the reservation is gone


def test_target_warm_reset_raises_the_same_unit_attention() -> None:
    lu, _ = make_lu()
    ready(lu, A, B)
    lu.target_reset(B)
    assert_sense(lu.execute(A, tur()), S.BUS_DEVICE_RESET_FUNCTION_OCCURRED)


def test_reset_supersedes_pending_unit_attentions() -> None:
    lu, _ = make_lu()
    ready(lu, A)
    lu.capacity_changed()
    lu.lun_reset(A)
    assert_sense(lu.execute(A, tur()), S.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
    assert lu.execute(A, tur()).status == GOOD


def test_capacity_changed_after_resize_reports_2a09_then_the_new_capacity() -> None:
    lu, dev = fresh()
    dev.resize(BLOCKS * 2)
    lu.capacity_changed()
    assert_sense(lu.execute(A, bytes([0x25]) + bytes(9)), S.CAPACITY_DATA_HAS_CHANGED)
    r = lu.execute(A, bytes([0x25]) + bytes(9))
    assert struct.unpack(">II", r.data) == (BLOCKS * 2 - 1, 512)


def test_duplicate_unit_attentions_are_merged() -> None:
    lu, _ = fresh()
    lu.capacity_changed()
    lu.capacity_changed()
    assert_sense(lu.execute(A, tur()), S.CAPACITY_DATA_HAS_CHANGED)
    assert lu.execute(A, tur()).status == GOOD


def test_soft_threshold_crossing_raises_38h_07h_for_every_nexus_once() -> None:
    lu, _ = make_lu(soft_threshold_blocks=4)
    ready(lu, A, B)
    assert lu.execute(A, rw10(0x2A, 0, 4), block(1) * 4).status == GOOD
    assert_sense(lu.execute(A, tur()), S.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)
    assert_sense(lu.execute(B, tur()), S.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)
    assert lu.execute(A, rw10(0x2A, 8, 1), block(1)).status == GOOD
    assert lu.execute(A, tur()).status == GOOD  # reported once per crossing


def test_hard_limit_is_data_protect_space_allocation_failed() -> None:
    lu, _ = fresh(hard_limit_blocks=2)
    assert lu.execute(A, rw10(0x2A, 0, 2), block(7) * 2).status == GOOD
    assert_sense(lu.execute(A, rw10(0x2A, 2, 1), block(7)), S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    assert lu.execute(A, rw10(0x2A, 1, 1), block(8)).status == GOOD  # overwriting mapped blocks still works
    assert lu.execute(A, rw10(0x28, 0, 2)).data == block(7) + block(8)


def test_nexus_loss_forgets_the_nexus_and_releases_its_reserve6() -> None:
    lu, _ = make_lu()
    ready(lu, A, B)
    assert lu.execute(A, bytes([0x16]) + bytes(5)).status == GOOD
    assert lu.execute(B, tur()).status == RESERVATION_CONFLICT
    lu.nexus_lost(A)
    assert lu.execute(B, tur()).status == GOOD
    assert_sense(lu.execute(A, tur()), S.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED)


# ---------------------------------------------------------------------- INQUIRY and VPD


def test_standard_inquiry_fields() -> None:
    """SPC-4 §6.6.2 Table 142 (libiscsi Inquiry.Standard, VersionDescriptors)."""
    lu, _ = fresh()
    r = lu.execute(A, inquiry(alloc=260))
    d = r.data
    assert r.status == GOOD and len(d) == 96
    assert d[0] == 0x00  # qualifier 0, direct access block device
    assert d[1] == 0x00  # RMB=0
    assert d[2] == 0x06  # SPC-4
    assert d[3] == 0x12  # HISUP, response data format 2; AERC/TRMTSK/NORMACA clear
    assert d[4] == len(d) - 5
    assert d[5] == 0x00  # no TPGS, no 3PC, no PROTECT
    assert d[7] == 0x02  # CMDQUE
    assert d[8:16] == b"FLOE    " and d[16:32] == b"VOLUME          " and d[32:36] == b"0001"
    descriptors = struct.unpack(">8H", d[58:74])
    assert descriptors[:4] == (0x00A0, 0x0960, 0x0460, 0x04C0)  # SAM-5, iSCSI, SPC-4, SBC-3


@pytest.mark.parametrize("alloc", [0, 1, 5, 36, 95, 96, 255, 256, 4096])
def test_inquiry_allocation_length_truncates_without_error(alloc: int) -> None:
    """SPC-4 §4.2.5.6 (libiscsi Inquiry.AllocLength)."""
    lu, _ = fresh()
    r = lu.execute(A, inquiry(alloc=alloc))
    assert r.status == GOOD and len(r.data) == min(alloc, 96)


def test_inquiry_page_code_without_evpd_is_invalid_field() -> None:
    """SPC-4 §6.6.1 (libiscsi Inquiry.EVPD)."""
    lu, _ = fresh()
    parsed = assert_sense(lu.execute(A, inquiry(evpd=0, page=0x80)), S.INVALID_FIELD_IN_CDB)
    assert parsed.field == S.FieldPointer(2)
    assert_sense(lu.execute(A, inquiry(evpd=1, page=0x99)), S.INVALID_FIELD_IN_CDB)
    assert_sense(lu.execute(A, inquiry(evpd=3)), S.INVALID_FIELD_IN_CDB)  # CMDDT (obsolete) set


def test_vpd_supported_pages_lists_readable_pages() -> None:
    lu, _ = fresh()
    d = lu.execute(A, inquiry(1, 0x00)).data
    assert d[:4] == bytes([0, 0, 0, 6]) and list(d[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    for page in d[4:]:
        r = lu.execute(A, inquiry(1, page))
        assert r.status == GOOD and r.data[1] == page
        assert int.from_bytes(r.data[2:4], "big") == len(r.data) - 4


def test_vpd_80_unit_serial_number() -> None:
    lu, _ = fresh()
    assert lu.execute(A, inquiry(1, 0x80)).data == bytes([0, 0x80, 0, 12]) + b"f10e0a1b2c3d"


def test_vpd_83_designators() -> None:
    """SPC-4 §7.8.6: NAA (LU), relative target port, target port group, SCSI name strings."""
    lu, _ = fresh()
    d = lu.execute(A, inquiry(1, 0x83)).data
    designators = []
    pos = 4
    while pos < len(d):
        length = d[pos + 3]
        designators.append((d[pos], d[pos + 1], d[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    assert pos == len(d)
    naa, rel_port, group, port_name, device_name = designators
    assert naa == (0x01, 0x03, NAA)
    assert rel_port == (0x51, 0x94, bytes([0, 0, 0, 1]))
    assert group == (0x51, 0x95, bytes([0, 0, 0, 1]))
    assert port_name[:2] == (0x53, 0x98) and port_name[2].rstrip(b"\0") == f"{TARGET},t,0x0001".encode()
    assert device_name[:2] == (0x53, 0xA8) and device_name[2].rstrip(b"\0") == TARGET.encode()
    assert all(len(body) % 4 == 0 for _, _, body in (port_name, device_name))


def test_vpd_b0_block_limits() -> None:
    """SBC-3 §6.5.3 (libiscsi Inquiry.BlockLimits: page length 3Ch, sane unmap limits)."""
    lu, _ = fresh()
    d = lu.execute(A, inquiry(1, 0xB0)).data
    assert len(d) == 64 and d[3] == 0x3C
    assert d[4] & 0x01  # WSNZ
    assert d[5] == 255  # MAXIMUM COMPARE AND WRITE LENGTH
    (gran, max_xfer, opt_xfer, _prefetch, max_unmap, max_desc, unmap_gran, ugavalid) = struct.unpack(
        ">HIIIIIII", d[6:36]
    )
    assert gran == 8 and max_xfer == MAX_TRANSFER_BYTES // 512 and opt_xfer == 2048
    assert max_unmap == scsi.UNMAP_BLOCKS_MAX <= 1024 * 1024 and max_desc == scsi.UNMAP_DESCRIPTORS_MAX >= 256
    assert unmap_gran == 1 and ugavalid == 0
    assert struct.unpack(">Q", d[36:44])[0] == scsi.WRITE_SAME_BYTES_MAX // 512 < 65536
    assert d[44:64] == bytes(20)  # no atomic writes (libiscsi WriteAtomic16.VPD)


def test_vpd_b0_limits_scale_with_4k_blocks() -> None:
    lu, _ = fresh(block_size=4096)
    d = lu.execute(A, inquiry(1, 0xB0)).data
    assert d[5] == scsi.COMPARE_AND_WRITE_BYTES_MAX // 4096
    assert struct.unpack(">H", d[6:8])[0] == 1
    assert struct.unpack(">I", d[8:12])[0] == MAX_TRANSFER_BYTES // 4096


def test_vpd_b1_b2_characteristics_and_provisioning() -> None:
    lu, _ = fresh()
    b1 = lu.execute(A, inquiry(1, 0xB1)).data
    assert b1[3] == 0x3C and struct.unpack(">H", b1[4:6])[0] == 1  # non-rotating
    b2 = lu.execute(A, inquiry(1, 0xB2)).data
    assert b2 == bytes([0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0])  # LBPU LBPWS LBPWS10 LBPRZ, thin


def test_lun_identity_validation() -> None:
    with pytest.raises(ValueError):
        LunIdentity(serial="x", naa=bytes(16), target_name=TARGET)  # not NAA type 6
    with pytest.raises(ValueError):
        LunIdentity(serial="x", naa=NAA, target_name=TARGET, vendor="TOO LONG VENDOR")
    with pytest.raises(ValueError):
        LunIdentity(serial="x", naa=NAA, target_name=TARGET, tpgt=0)


# ---------------------------------------------------------------------- capacity


def test_read_capacity_10_and_16() -> None:
    """SBC-3 §5.15, §5.16: LBPME and LBPRZ set, no protection, exponent 0."""
    lu, _ = fresh()
    assert lu.execute(A, bytes([0x25]) + bytes(9)).data == struct.pack(">II", BLOCKS - 1, 512)
    d = lu.execute(A, sai16(0x10, alloc=32)).data
    assert struct.unpack(">QI", d[:12]) == (BLOCKS - 1, 512)
    assert d[12] == 0 and d[13] == 0 and d[14] == 0xC0 and d[15] == 0
    for alloc in range(16):  # libiscsi ReadCapacity16.Alloclen
        r = lu.execute(A, sai16(0x10, alloc=alloc))
        assert r.status == GOOD and len(r.data) == alloc


def test_read_capacity_10_reports_ffffffff_for_a_huge_volume() -> None:
    lu, _ = fresh(blocks=(1 << 32) + 5)
    assert lu.execute(A, bytes([0x25]) + bytes(9)).data[:4] == b"\xff\xff\xff\xff"
    assert struct.unpack(">Q", lu.execute(A, sai16(0x10)).data[:8])[0] == (1 << 32) + 4


def test_read_capacity_10_pmi_zero_with_lba_is_invalid() -> None:
    lu, _ = fresh()
    assert_sense(lu.execute(A, struct.pack(">BBIHBB", 0x25, 0, 10, 0, 0, 0)), S.INVALID_FIELD_IN_CDB)
    assert lu.execute(A, struct.pack(">BBIHBB", 0x25, 0, 10, 0, 1, 0)).status == GOOD


# ---------------------------------------------------------------------- READ / WRITE

RW_VARIANTS = [
    ("6", lambda op, lba, n, f=0: rw6({0x28: 0x08, 0x2A: 0x0A}[op], lba, n)),
    ("10", lambda op, lba, n, f=0: rw10(op, lba, n, f)),
    ("12", lambda op, lba, n, f=0: rw12({0x28: 0xA8, 0x2A: 0xAA}[op], lba, n, f)),
    ("16", lambda op, lba, n, f=0: rw16({0x28: 0x88, 0x2A: 0x8A}[op], lba, n, f)),
]


@pytest.mark.parametrize(("name", "cdb"), RW_VARIANTS, ids=[v[0] for v in RW_VARIANTS])
def test_write_then_read_back_each_cdb_size(name: str, cdb) -> None:  # type: ignore[no-untyped-def]
    lu, dev = fresh()
    data = bytes(range(256)) * 6
    assert lu.execute(A, cdb(0x2A, 100, 3), data).status == GOOD
    r = lu.execute(A, cdb(0x28, 100, 3))
    assert r.status == GOOD and r.data == data
    assert lu.expected_data_out(cdb(0x2A, 100, 3)) == len(data)
    assert lu.expected_data_out(cdb(0x28, 100, 3)) == 0


def test_read6_and_write6_length_zero_means_256_blocks() -> None:
    """SBC-3 §5.8: a TRANSFER LENGTH of 0 in the 6-byte CDB is 256 blocks."""
    lu, _ = fresh()
    data = bytes([5]) * (256 * 512)
    assert lu.expected_data_out(rw6(0x0A, 0, 0)) == len(data)
    assert lu.execute(A, rw6(0x0A, 0, 0), data).status == GOOD
    assert lu.execute(A, rw6(0x08, 0, 0)).data == data


@pytest.mark.parametrize("op", [0x28, 0x2A])
def test_transfer_length_zero_is_good_without_transfer(op: int) -> None:
    lu, dev = fresh()
    r = lu.execute(A, rw10(op, 5, 0))
    assert r == ScsiResult(GOOD) and dev.writes == 0


@pytest.mark.parametrize(
    ("lba", "blocks"),
    [(BLOCKS, 1), (BLOCKS - 1, 2), (BLOCKS + 1, 0), (0x80000000, 1), (0xFFFFFFFF, 0), (BLOCKS - 256, 257)],
)
def test_reads_and_writes_past_the_end_are_lba_out_of_range(lba: int, blocks: int) -> None:
    """SBC-3 §4.5 (libiscsi Read10.BeyondEol, ZeroBlocks)."""
    lu, _ = fresh()
    assert_sense(lu.execute(A, rw10(0x28, lba, blocks)), S.LBA_OUT_OF_RANGE)
    assert_sense(lu.execute(A, rw10(0x2A, lba, blocks), block(1) * blocks), S.LBA_OUT_OF_RANGE)
    assert_sense(lu.execute(A, rw16(0x88, 0xFFFF_FFFF_FFFF_FFFF, 1)), S.LBA_OUT_OF_RANGE)


@pytest.mark.parametrize("protect", range(1, 8))
def test_rdprotect_wrprotect_nonzero_is_invalid_field(protect: int) -> None:
    """No protection information (libiscsi Read10.ReadProtect, Write10.WriteProtect)."""
    lu, _ = fresh()
    parsed = assert_sense(lu.execute(A, rw10(0x28, 0, 1, protect << 5)), S.INVALID_FIELD_IN_CDB)
    assert parsed.field == S.FieldPointer(1, 7)
    assert_sense(lu.execute(A, rw16(0x8A, 0, 1, protect << 5), block(0)), S.INVALID_FIELD_IN_CDB)


def test_fua_write_is_durable_and_dpo_is_accepted() -> None:
    """SBC-3 §5.33: FUA=1 → device.write(fua=True); DPOFUA=1 in MODE SENSE, so DPO/FUA are accepted."""
    lu, dev = fresh()
    assert lu.execute(A, rw10(0x2A, 0, 1, 0x08), block(1)).status == GOOD
    assert dev.fua_writes == 1
    assert lu.execute(A, rw10(0x2A, 0, 1, 0x10), block(1)).status == GOOD
    assert lu.execute(A, rw10(0x28, 0, 1, 0x18)).status == GOOD
    assert dev.fua_writes == 1


def test_transfer_longer_than_the_maximum_is_invalid_field() -> None:
    lu, _ = fresh(blocks=1 << 20)
    too_many = MAX_TRANSFER_BYTES // 512 + 1
    parsed = assert_sense(lu.execute(A, rw16(0x88, 0, too_many)), S.INVALID_FIELD_IN_CDB)
    assert parsed.field == S.FieldPointer(10)


def test_write_with_short_data_out_writes_the_whole_blocks_received() -> None:
    """EDTL < CDB transfer length: the first EDTL bytes are written, GOOD (libiscsi iSCSIResiduals)."""
    lu, _ = fresh()
    assert lu.execute(A, rw10(0x2A, 0, 2), block(ord("a")) * 2).status == GOOD
    assert lu.execute(A, rw10(0x2A, 0, 2), block(ord("b"))).status == GOOD
    assert lu.execute(A, rw10(0x28, 0, 2)).data == block(ord("b")) + block(ord("a"))
    assert lu.execute(A, rw10(0x2A, 0, 1), b"x" * 200).status == GOOD  # no whole block: nothing written
    assert lu.execute(A, rw10(0x28, 0, 1)).data == block(ord("b"))


def test_reserved_bits_and_naca_are_invalid_field_with_pointer() -> None:
    """Bits outside the CDB usage data are reserved (SPC-4 §2.4.1); NACA=1 without NormACA (SAM-5 §5.2)."""
    lu, _ = fresh()
    parsed = assert_sense(lu.execute(A, rw10(0x28, 0, 1, flags=0x04)), S.INVALID_FIELD_IN_CDB)
    assert parsed.field == S.FieldPointer(1, 2)
    naca = rw10(0x28, 0, 1)[:9] + b"\x04"
    assert assert_sense(lu.execute(A, naca), S.INVALID_FIELD_IN_CDB).field == S.FieldPointer(9, 2)
    assert_sense(lu.execute(A, rw10(0x28, 0, 1, group=0x20)), S.INVALID_FIELD_IN_CDB)
    assert lu.execute(A, rw10(0x28, 0, 1, group=0x1F)).status == GOOD  # group number is accepted


def test_cdb_padded_to_16_bytes_by_the_session_is_accepted() -> None:
    lu, _ = fresh()
    assert lu.execute(A, rw6(0x08, 0, 1).ljust(16, b"\0")).status == GOOD
    assert lu.expected_data_out(rw6(0x0A, 0, 2).ljust(16, b"\0")) == 1024


def test_short_cdb_is_invalid_field_and_unknown_expected_data_out() -> None:
    lu, _ = fresh()
    assert_sense(lu.execute(A, bytes([0x28, 0, 0])), S.INVALID_FIELD_IN_CDB)
    assert lu.expected_data_out(bytes([0x2A, 0])) is None
    assert lu.expected_data_out(bytes([0xC1] * 16)) is None
    assert lu.expected_data_out(b"") is None


# ---------------------------------------------------------------------- VERIFY, WRITE AND VERIFY


VERIFY_VARIANTS = [
    lambda lba, n, f: rw10(0x2F, lba, n, f),
    lambda lba, n, f: rw12(0xAF, lba, n, f),
    lambda lba, n, f: rw16(0x8F, lba, n, f),
]


@pytest.mark.parametrize("cdb", VERIFY_VARIANTS, ids=["10", "12", "16"])
def test_verify_bytchk_compares_and_reports_the_miscompare_offset(cdb) -> None:  # type: ignore[no-untyped-def]
    """SBC-3 §5.30: BYTCHK=01b compares; MISCOMPARE 1Dh/00h with INFORMATION = offset (libiscsi Verify*.Mismatch)."""
    lu, _ = fresh()
    data = bytes(range(256)) * 4
    assert lu.execute(A, rw10(0x2A, 10, 2), data).status == GOOD
    assert lu.execute(A, cdb(10, 2, 0x02), data).status == GOOD
    bad = bytearray(data)
    bad[700] ^= 0x58
    parsed = assert_sense(lu.execute(A, cdb(10, 2, 0x02), bytes(bad)), S.MISCOMPARE_DURING_VERIFY_OPERATION)
    assert parsed.information == 700
    assert lu.execute(A, cdb(10, 2, 0x00), bytes(bad)).status == GOOD  # BYTCHK=0: no compare (MismatchNoCmp)
    assert lu.execute(A, cdb(10, 2, 0x10), b"").status == GOOD  # DPO
    assert_sense(lu.execute(A, cdb(BLOCKS, 1, 0)), S.LBA_OUT_OF_RANGE)
    assert_sense(lu.execute(A, cdb(0, 1, 0x20)), S.INVALID_FIELD_IN_CDB)  # VRPROTECT
    assert_sense(lu.execute(A, cdb(0, 1, 0x04)), S.INVALID_FIELD_IN_CDB)  # BYTCHK=10b reserved
    assert lu.execute(A, cdb(0, 0, 0x02)).status == GOOD
    assert lu.expected_data_out(cdb(0, 3, 0x02)) == 1536 and lu.expected_data_out(cdb(0, 3, 0)) == 0


def test_write_and_verify_is_durable_and_compares_with_bytchk() -> None:
    lu, dev = fresh()
    assert lu.execute(A, rw10(0x2E, 0, 1, 0x02), block(9)).status == GOOD
    assert lu.execute(A, rw16(0x8E, 1, 1, 0x10), block(8)).status == GOOD
    assert lu.execute(A, rw12(0xAE, 2, 1), block(7)).status == GOOD
    assert dev.fua_writes == 3
    assert lu.execute(A, rw10(0x28, 0, 3)).data == block(9) + block(8) + block(7)
    assert_sense(lu.execute(A, rw10(0x2E, 0, 1, 0x20), block(1)), S.INVALID_FIELD_IN_CDB)


# ---------------------------------------------------------------------- SYNCHRONIZE CACHE


def test_synchronize_cache_flushes_even_with_immed() -> None:
    """SBC-3 §5.22/§5.23 and DESIGN.md §2: GOOD only after the flush, IMMED or not."""
    lu, dev = fresh()
    assert lu.execute(A, struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0)).status == GOOD
    assert lu.execute(A, struct.pack(">BBIBHB", 0x35, 0x02, 10, 0, 5, 0)).status == GOOD
    assert lu.execute(A, struct.pack(">BBQIBB", 0x91, 0x02, 0, 0, 0, 0)).status == GOOD
    assert dev.flushes == 3
    assert_sense(lu.execute(A, struct.pack(">BBIBHB", 0x35, 0, BLOCKS - 1, 0, 2, 0)), S.LBA_OUT_OF_RANGE)
    assert dev.flushes == 3


# ---------------------------------------------------------------------- UNMAP, WRITE SAME, GET LBA STATUS


def lba_status(lu: LogicalUnit, lba: int, alloc: int = 24) -> list[tuple[int, int, int]]:
    r = lu.execute(A, sai16(0x12, lba, alloc))
    assert r.status == GOOD, r
    if len(r.data) < alloc:  # not truncated: PARAMETER DATA LENGTH covers every descriptor
        assert struct.unpack(">I", r.data[:4])[0] == len(r.data) - 4
    return [struct.unpack(">QIB", r.data[i : i + 13]) for i in range(8, len(r.data) - 15, 16)]


def test_unmap_punches_holes_that_read_as_zeros_and_get_lba_status_sees_them() -> None:
    """SBC-3 §5.28 and §5.5 (libiscsi Unmap.Simple, GetLBAStatus.UnmapSingle)."""
    lu, dev = fresh()
    assert lu.execute(A, rw10(0x2A, 0, 8), block(0xAA) * 8).status == GOOD
    params = unmap_params([(2, 3)])
    assert lu.expected_data_out(unmap_cdb(len(params))) == len(params)
    assert lu.execute(A, unmap_cdb(len(params)), params).status == GOOD
    assert lu.execute(A, rw10(0x28, 0, 8)).data == block(0xAA) * 2 + bytes(1536) + block(0xAA) * 3
    assert lba_status(lu, 0, 8 + 16 * 4)[:3] == [(0, 2, 0), (2, 3, 1), (5, 3, 0)]
    assert lba_status(lu, 3) == [(3, 2, 1)]
    assert dev.mapped_blocks == 5


def test_unmap_parameter_list_checks() -> None:
    """libiscsi Unmap.ZeroBlocks and SBC-3 §5.28 error cases."""
    lu, _ = fresh()
    assert lu.execute(A, unmap_cdb(0)).status == GOOD  # no parameter list
    assert lu.execute(A, unmap_cdb(8), unmap_params([])).status == GOOD  # no descriptors
    zero = unmap_params([(i, 0) for i in range(256)] + [(BLOCKS, 0)])
    assert lu.execute(A, unmap_cdb(len(zero)), zero).status == GOOD
    assert_sense(lu.execute(A, unmap_cdb(6), bytes(6)), S.PARAMETER_LIST_LENGTH_ERROR)
    past = unmap_params([(BLOCKS - 1, 2)])
    assert_sense(lu.execute(A, unmap_cdb(len(past)), past), S.LBA_OUT_OF_RANGE)
    many = unmap_params([(i, 1) for i in range(scsi.UNMAP_DESCRIPTORS_MAX + 1)])
    assert_sense(lu.execute(A, unmap_cdb(len(many)), many), S.INVALID_FIELD_IN_PARAMETER_LIST)
    big = unmap_params([(0, scsi.UNMAP_BLOCKS_MAX), (0, 1)])
    lu2, _ = fresh(blocks=scsi.UNMAP_BLOCKS_MAX + 8)
    assert_sense(lu2.execute(A, unmap_cdb(len(big)), big), S.INVALID_FIELD_IN_PARAMETER_LIST)
    one = unmap_params([(0, 1)])
    assert_sense(lu.execute(A, unmap_cdb(len(one), anchor=1), one), S.INVALID_FIELD_IN_CDB)  # ANC_SUP=0
    truncated = unmap_params([(0, 1), (1, 1)])[:-5]  # incomplete last descriptor is ignored
    assert lu.execute(A, unmap_cdb(len(truncated)), truncated).status == GOOD


def write_same(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    if op == 0x41:
        return struct.pack(">BBIBHB", 0x41, flags, lba, 0, blocks, 0)
    return struct.pack(">BBQIBB", 0x93, flags, lba, blocks, 0, 0)


@pytest.mark.parametrize("op", [0x41, 0x93])
def test_write_same_writes_the_pattern_and_unmaps_with_the_unmap_bit(op: int) -> None:
    """SBC-3 §5.41/§5.42 (libiscsi WriteSame*.Simple, Check, Unmap)."""
    lu, dev = fresh()
    assert lu.execute(A, write_same(op, 10, 4), block(0x5A)).status == GOOD
    assert lu.execute(A, rw10(0x28, 10, 4)).data == block(0x5A) * 4
    assert lu.execute(A, write_same(op, 10, 4, 0x08), bytes(512)).status == GOOD
    assert lu.execute(A, rw10(0x28, 10, 4)).data == bytes(2048) and dev.mapped_blocks == 0
    assert lu.expected_data_out(write_same(op, 0, 7)) == 512


@pytest.mark.parametrize("op", [0x41, 0x93])
def test_write_same_field_checks(op: int) -> None:
    lu, _ = fresh()
    assert_sense(lu.execute(A, write_same(op, 0, 0), bytes(512)), S.INVALID_FIELD_IN_CDB)  # WSNZ=1
    assert_sense(lu.execute(A, write_same(op, BLOCKS + 1, 0), bytes(512)), S.LBA_OUT_OF_RANGE)
    assert_sense(lu.execute(A, write_same(op, BLOCKS - 1, 2), bytes(512)), S.LBA_OUT_OF_RANGE)
    assert_sense(lu.execute(A, write_same(op, 0, 1, 0x10), bytes(512)), S.INVALID_FIELD_IN_CDB)  # ANCHOR
    assert_sense(lu.execute(A, write_same(op, 0, 1, 0x18), bytes(512)), S.INVALID_FIELD_IN_CDB)  # no ANC_SUP
    assert_sense(lu.execute(A, write_same(op, 0, 1, 0x20), bytes(512)), S.INVALID_FIELD_IN_CDB)  # WRPROTECT
    assert_sense(lu.execute(A, write_same(op, 0, 1, 0x02), bytes(512)), S.INVALID_FIELD_IN_CDB)  # LBDATA
    assert_sense(lu.execute(A, write_same(op, 0, 1), bytes(256)), S.INVALID_FIELD_IN_CDB)  # short Data-Out
    lu2, _ = fresh(blocks=1 << 20)
    too_many = scsi.WRITE_SAME_BYTES_MAX // 512 + 1
    assert_sense(lu2.execute(A, write_same(op, 0, too_many), bytes(512)), S.INVALID_FIELD_IN_CDB)


def test_write_same_16_ndob_writes_zeros_without_data_out() -> None:
    lu, dev = fresh()
    lu.execute(A, rw10(0x2A, 0, 2), block(1) * 2)
    cdb = write_same(0x93, 0, 2, 0x01 | 0x08)
    assert lu.expected_data_out(cdb) == 0
    assert lu.execute(A, cdb).status == GOOD and dev.mapped_blocks == 0


def test_get_lba_status_beyond_end_and_descriptor_bounds() -> None:
    """libiscsi GetLBAStatus.BeyondEol; descriptors are bounded by allocation length and the cap."""
    lu, _ = fresh()
    for lba in (BLOCKS, BLOCKS + 1, 1 << 63, (1 << 64) - 1):
        assert_sense(lu.execute(A, sai16(0x12, lba, 24)), S.LBA_OUT_OF_RANGE)
    for i in range(0, 400, 2):
        lu.execute(A, rw10(0x2A, i, 1), block(1))
    statuses = lba_status(lu, 0, 8 + 16 * 1000)
    assert len(statuses) == scsi.GET_LBA_STATUS_DESCRIPTORS_MAX
    assert statuses[0] == (0, 1, 0) and statuses[1] == (1, 1, 1)
    assert lu.execute(A, sai16(0x12, BLOCKS - 1, 24)).status == GOOD
    assert lu.execute(A, sai16(0x12, 0, 4)).data == struct.pack(">I", 20)


# ---------------------------------------------------------------------- COMPARE AND WRITE


def test_compare_and_write_writes_when_equal_and_reports_miscompare_offset() -> None:
    """SBC-3 §5.2 (libiscsi CompareAndWrite.Simple, Miscompare, Unwritten)."""
    lu, dev = fresh()
    lu.execute(A, rw10(0x2A, 5, 2), block(ord("A")) * 2)
    assert lu.expected_data_out(caw(5, 2)) == 2048
    assert lu.execute(A, caw(5, 2), block(ord("A")) * 2 + block(ord("B")) * 2).status == GOOD
    assert lu.execute(A, rw10(0x28, 5, 2)).data == block(ord("B")) * 2
    compare = bytearray(block(ord("B")) * 2)
    compare[1024 - 27] = ord("C")
    parsed = assert_sense(
        lu.execute(A, caw(5, 2), bytes(compare) + block(ord("D")) * 2), S.MISCOMPARE_DURING_VERIFY_OPERATION
    )
    assert parsed.information == 1024 - 27
    assert lu.execute(A, rw10(0x28, 5, 2)).data == block(ord("B")) * 2
    assert_sense(lu.execute(A, caw(100, 1), block(ord("%")) + block(ord("B"))), S.MISCOMPARE_DURING_VERIFY_OPERATION)
    assert lu.execute(A, caw(5, 1, 0x08), block(ord("B")) + block(ord("E"))).status == GOOD
    assert dev.flushes == 1  # FUA


def test_compare_and_write_limits_and_zero_blocks() -> None:
    lu, _ = fresh()
    assert lu.execute(A, caw(0, 0, 0x18), block(0)).status == GOOD  # zero blocks is a no-op (DpoFua)
    assert_sense(lu.execute(A, caw(BLOCKS - 1, 2), bytes(2048)), S.LBA_OUT_OF_RANGE)
    assert_sense(lu.execute(A, caw(0, 1), bytes(512)), S.INVALID_FIELD_IN_CDB)  # Data-Out too short
    assert_sense(lu.execute(A, caw(0, 1, 0x40), bytes(1024)), S.INVALID_FIELD_IN_CDB)  # WRPROTECT
    lu4k, _ = fresh(block_size=4096)
    assert_sense(lu4k.execute(A, caw(0, 33), bytes(2 * 33 * 4096)), S.INVALID_FIELD_IN_CDB)  # > 32 blocks
    # A 256-block request wraps the 8-bit field to 0 with 512 blocks of Data-Out: refused, not a no-op.
    wrapped = lu.expected_data_out(caw(0, 0))
    assert wrapped is not None and wrapped > 2 * 255 * 512
    assert_sense(lu.execute(A, caw(0, 0), bytes(wrapped)), S.INVALID_FIELD_IN_CDB)


# ---------------------------------------------------------------------- MODE SENSE / MODE SELECT


def pages_of(data: bytes, header: int, bd_length: int) -> dict[int, bytes]:
    pages = {}
    pos = header + bd_length
    while pos < len(data):
        pages[data[pos] & 0x3F] = data[pos : pos + 2 + data[pos + 1]]
        pos += 2 + data[pos + 1]
    assert pos == len(data)
    return pages


def test_mode_sense6_all_pages_with_block_descriptor() -> None:
    """SPC-4 §6.11, SBC-3 §6.4 (libiscsi ModeSense6.AllPages, Control, DPO/FUA tests)."""
    lu, _ = fresh()
    d = lu.execute(A, mode_sense6()).data
    assert d[0] == len(d) - 1 and d[1] == 0 and d[2] == 0x10 and d[3] == 8  # DPOFUA, WP=0
    assert struct.unpack(">IB", d[4:9]) == (BLOCKS, 0) and int.from_bytes(d[9:12], "big") == 512
    pages = pages_of(d, 4, 8)
    assert sorted(pages) == [0x08, 0x0A, 0x1C]
    assert pages[0x08][2] & 0x04 and not pages[0x08][2] & 0x01  # WCE=1, RCD=0
    control = pages[0x0A]
    assert control[2] & 0x04 == 0  # D_SENSE=0
    assert control[3] >> 4 == 1 and (control[3] >> 1) & 3 != 2  # QAM 1, QERR valid
    assert control[4] & 0x08 == 0  # SWP=0
    assert pages[0x1C][2] & 0x08  # DEXCPT
    direct = lu.execute(A, mode_sense6(page=0x0A)).data
    assert pages_of(direct, 4, 8) == {0x0A: control}
    assert lu.execute(A, mode_sense6(alloc=4)).data == d[:4]  # libiscsi ModeSense6.Residuals


def test_mode_sense_changeable_default_dbd_and_errors() -> None:
    lu, _ = fresh()
    changeable = lu.execute(A, mode_sense6(page=0x0A, pc=1, dbd=1)).data
    assert changeable[3] == 0 and changeable[4:] == bytes([0x0A, 0x0A]) + bytes(10)  # SWP not changeable
    default = lu.execute(A, mode_sense6(pc=2, dbd=1)).data
    assert default[4:] == lu.execute(A, mode_sense6(dbd=1)).data[4:]
    assert_sense(lu.execute(A, mode_sense6(pc=3)), S.SAVING_PARAMETERS_NOT_SUPPORTED)
    assert_sense(lu.execute(A, mode_sense6(page=0x01)), S.INVALID_FIELD_IN_CDB)
    assert_sense(lu.execute(A, mode_sense6(subpage=1)), S.INVALID_FIELD_IN_CDB)
    assert lu.execute(A, mode_sense6(subpage=0xFF)).status == GOOD


def test_mode_sense10_long_lba_descriptor() -> None:
    lu, _ = fresh()
    d = lu.execute(A, mode_sense10(llbaa=1)).data
    assert struct.unpack(">H", d[:2])[0] == len(d) - 2 and d[3] == 0x10 and d[4] & 1
    assert struct.unpack(">H", d[6:8])[0] == 16 and struct.unpack(">Q", d[8:16])[0] == BLOCKS
    assert struct.unpack(">I", d[20:24])[0] == 512
    short = lu.execute(A, mode_sense10()).data
    assert struct.unpack(">H", short[6:8])[0] == 8 and not short[4] & 1
    assert sorted(pages_of(short, 8, 8)) == [0x08, 0x0A, 0x1C]


def test_mode_select_accepts_current_values_and_refuses_changes() -> None:
    """Nothing is changeable: restating the current page is GOOD, changing WCE is refused (SPC-4 §6.9)."""
    lu, _ = fresh()
    current = lu.execute(A, mode_sense6(page=0x08)).data
    params = bytes([0, 0, 0, 8]) + current[4:]
    cdb = bytes([0x15, 0x10, 0, 0, len(params), 0])
    assert lu.expected_data_out(cdb) == len(params)
    assert lu.execute(A, cdb, params).status == GOOD
    changed = bytearray(params)
    changed[12 + 2] &= ~0x04  # clear WCE
    parsed = assert_sense(lu.execute(A, cdb, bytes(changed)), S.INVALID_FIELD_IN_PARAMETER_LIST)
    assert parsed.field == S.FieldPointer(14, 2, in_cdb=False)
    assert_sense(lu.execute(A, bytes([0x15, 0x11, 0, 0, len(params), 0]), params), S.INVALID_FIELD_IN_CDB)  # SP
    assert_sense(lu.execute(A, cdb, params[:-3]), S.PARAMETER_LIST_LENGTH_ERROR)
    other_bs = bytearray(params)
    other_bs[9:12] = (4096).to_bytes(3, "big")
    assert_sense(lu.execute(A, cdb, bytes(other_bs)), S.INVALID_FIELD_IN_PARAMETER_LIST)
    ten = lu.execute(A, mode_sense10(page=0x1C, dbd=1)).data
    params10 = bytes(8) + ten[8:]
    cdb10 = struct.pack(">BB5xHB", 0x55, 0x10, len(params10), 0)
    assert lu.execute(A, cdb10, params10).status == GOOD
    assert lu.execute(A, bytes([0x15, 0x10, 0, 0, 0, 0])).status == GOOD


# ---------------------------------------------------------------------- REPORT LUNS, REQUEST SENSE, misc


def test_report_luns_select_report_and_allocation_length() -> None:
    """SPC-4 §6.33: one LUN 0; allocation length < 16 is INVALID FIELD IN CDB."""
    lu, _ = fresh()

    def report(select: int, alloc: int = 64) -> ScsiResult:
        return lu.execute(A, struct.pack(">BBB3xIBB", 0xA0, 0, select, alloc, 0, 0))

    assert report(0).data == struct.pack(">II", 8, 0) + bytes(8)
    assert report(2).data == report(0).data
    assert report(1).data == struct.pack(">II", 0, 0)
    assert_sense(report(0, 15), S.INVALID_FIELD_IN_CDB)
    assert_sense(report(3), S.INVALID_FIELD_IN_CDB)


def test_request_sense_desc_and_allocation_length() -> None:
    lu, _ = fresh()
    assert_sense(lu.execute(A, bytes([0x03, 0x01, 0, 0, 18, 0])), S.INVALID_FIELD_IN_CDB)
    assert lu.execute(A, bytes([0x03, 0, 0, 0, 8, 0])).data == bytes([0x70, 0, 0, 0, 0, 0, 0, 10])


def test_start_stop_unit_and_prevent_allow_on_a_fixed_medium() -> None:
    """libiscsi StartStopUnit.Simple: LOEJ on a non-removable unit fails; STOP flushes the cache."""
    lu, dev = fresh()
    assert_sense(lu.execute(A, bytes([0x1B, 1, 0, 0, 0x02, 0])), S.INVALID_FIELD_IN_CDB)
    assert lu.execute(A, bytes([0x1B, 0, 0, 0, 0x01, 0])).status == GOOD
    assert lu.execute(A, bytes([0x1B, 0, 0, 0, 0x00, 0])).status == GOOD and dev.flushes == 1
    assert lu.execute(A, bytes([0x1B, 0, 0, 0, 0x04, 0])).status == GOOD and dev.flushes == 1  # NO_FLUSH
    assert_sense(lu.execute(A, bytes([0x1B, 0, 0, 0, 0x50, 0])), S.INVALID_FIELD_IN_CDB)
    assert lu.execute(A, bytes([0x1E, 0, 0, 0, 1, 0])).status == GOOD
    assert lu.execute(A, bytes([0x1E, 0, 0, 0, 0, 0])).status == GOOD
    assert_sense(lu.execute(A, bytes([0x1E, 0, 0, 0, 2, 0])), S.INVALID_FIELD_IN_CDB)


@pytest.mark.parametrize("opcode", [0x04, 0x07, 0x2B, 0x3B, 0x83, 0x84, 0x9F, 0xC0, 0xFF])
def test_unsupported_opcodes_are_invalid_command_operation_code(opcode: int) -> None:
    lu, _ = fresh()
    assert_sense(lu.execute(A, bytes([opcode]) + bytes(15)), S.INVALID_COMMAND_OPERATION_CODE)


def test_unsupported_service_action_is_invalid_field_at_byte_1() -> None:
    """libiscsi status_is_invalid_opcode accepts this for SERVICE ACTION IN / MAINTENANCE IN."""
    lu, _ = fresh()
    parsed = assert_sense(lu.execute(A, sai16(0x13)), S.INVALID_FIELD_IN_CDB)
    assert parsed.field == S.FieldPointer(1, 4)
    for sa in range(4, 0x20):  # libiscsi PrinServiceactionRange
        assert lu.execute(A, prin(sa)).status == CHECK_CONDITION


# ---------------------------------------------------------------------- REPORT SUPPORTED OPERATION CODES


def parse_all_commands(data: bytes) -> list[tuple[int, int, bool, bool, int]]:
    length = struct.unpack(">I", data[:4])[0]
    assert length == len(data) - 4
    out, pos = [], 4
    while pos < len(data):
        opcode, sa, flags, cdb_len = data[pos], struct.unpack(">H", data[pos + 2 : pos + 4])[0], data[pos + 5], 0
        cdb_len = struct.unpack(">H", data[pos + 6 : pos + 8])[0]
        ctdp = bool(flags & 0x02)
        out.append((opcode, sa, bool(flags & 0x01), ctdp, cdb_len))
        pos += 8
        if ctdp:
            assert struct.unpack(">H", data[pos : pos + 2])[0] == 0x0A
            pos += 12
    return out


def test_report_supported_opcodes_lists_exactly_the_dispatch_table() -> None:
    lu, _ = fresh()
    reported = parse_all_commands(lu.execute(A, rsoc()).data)
    expected = [(s.opcode, s.service_action or 0, s.service_action is not None, False, s.cdb_length) for s in COMMANDS]
    assert reported == expected
    assert all(r[3] for r in parse_all_commands(lu.execute(A, rsoc(rctd=True)).data))  # libiscsi RCTD
    names = {s.name for s in COMMANDS}
    assert "PERSISTENT RESERVE OUT/REGISTER_AND_IGNORE_EXISTING_KEY" in names and "GET LBA STATUS" in names


def test_report_supported_opcodes_one_command_forms() -> None:
    """SPC-4 §6.35.2 (libiscsi ReportSupportedOpcodes.OneCommand, DPO/FUA usage bits)."""
    lu, _ = fresh()
    for spec in COMMANDS:
        has_sa = spec.service_action is not None
        good = rsoc(2 if has_sa else 1, spec.opcode, spec.service_action or 0)
        bad = rsoc(1 if has_sa else 2, spec.opcode, spec.service_action or 0)
        r = lu.execute(A, good)
        assert r.data[1] == 0x03 and struct.unpack(">H", r.data[2:4])[0] == spec.cdb_length
        assert r.data[4 : 4 + spec.cdb_length] == spec.usage and r.data[4] == spec.opcode
        assert_sense(lu.execute(A, bad), S.INVALID_FIELD_IN_CDB)
    read10 = lu.execute(A, rsoc(1, 0x28)).data
    assert read10[5] & 0x18 == 0x18
    assert lu.execute(A, rsoc(1, 0x2F)).data[5] & 0x10  # VERIFY(10) DPO
    assert lu.execute(A, rsoc(1, 0xC5)).data == bytes([0, 1, 0, 0])  # not supported
    with_timeouts = lu.execute(A, rsoc(1, 0x35, rctd=True)).data
    assert with_timeouts[1] == 0x83 and with_timeouts[14:16] == b"\x00\x0a"
    assert lu.execute(A, rsoc(3, 0x9E, 0x10)).data[1] == 0x03
    assert_sense(lu.execute(A, rsoc(4)), S.INVALID_FIELD_IN_CDB)


# ---------------------------------------------------------------------- device errors


class FaultyDevice(MemDevice):
    """A MemDevice whose next call raises the given exception."""

    def __init__(self) -> None:
        super().__init__(BLOCKS)
        self.fault: Exception | None = None

    def _maybe_fail(self) -> None:
        fault, self.fault = self.fault, None
        if fault is not None:
            raise fault

    def read(self, lba: int, count: int) -> bytes:
        self._maybe_fail()
        return super().read(lba, count)

    def flush(self) -> None:
        self._maybe_fail()
        super().flush()


def test_device_errors_map_to_the_sense_the_standard_names() -> None:
    dev = FaultyDevice()
    lu = LogicalUnit(dev, IDENTITY)
    ready(lu, A)
    dev.fault = Unavailable("no quorum")
    assert lu.execute(A, rw10(0x28, 0, 1)) == ScsiResult(BUSY)  # retried by QEMU, Linux, Windows
    dev.fault = RuntimeError("bug")
    assert_sense(lu.execute(A, rw10(0x28, 0, 1)), S.INTERNAL_TARGET_FAILURE)
    dev.fault = Fenced("epoch 7 < 8")
    with pytest.raises(LunFenced):
        lu.execute(A, struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0))
    assert lu.execute(A, rw10(0x28, 0, 1)).status == GOOD


# ---------------------------------------------------------------------- persistent reservations

KEY_A, KEY_B = 0xA1A1A1A1, 0xB2B2B2B2


def two_registered(pr_type: int) -> LogicalUnit:
    lu, _ = make_lu()
    ready(lu, A, B)
    assert register(lu, A, KEY_A).status == GOOD
    assert register(lu, B, KEY_B).status == GOOD
    assert reserve(lu, A, KEY_A, pr_type).status == GOOD
    return lu


# (type, registered B reads, registered B writes, unregistered reads, unregistered writes): SPC-4 Table 51
ACCESS_TABLE = [
    (PrType.EXCLUSIVE_ACCESS, False, False, False, False),
    (PrType.WRITE_EXCLUSIVE, True, False, True, False),
    (PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, True, True, False, False),
    (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, True, True, True, False),
    (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, True, True, False, False),
    (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, True, True, True, False),
]


@pytest.mark.parametrize(("pr_type", "reg_read", "reg_write", "unreg_read", "unreg_write"), ACCESS_TABLE)
def test_reservation_types_grant_access_per_spc4(
    pr_type: PrType, reg_read: bool, reg_write: bool, unreg_read: bool, unreg_write: bool
) -> None:
    """libiscsi ProutReserve.Access*: holder always; others per type, registered or not."""
    lu = two_registered(pr_type)
    expected_key = 0 if pr_type in (7, 8) else KEY_A
    assert read_reservation(lu, B) == (expected_key, 0, pr_type)

    def status(ok: bool) -> int:
        return GOOD if ok else RESERVATION_CONFLICT

    assert lu.execute(A, rw10(0x28, 1, 1)).status == GOOD
    assert lu.execute(A, rw10(0x2A, 1, 1), block(1)).status == GOOD
    assert lu.execute(B, rw10(0x28, 1, 1)).status == status(reg_read)
    assert lu.execute(B, rw10(0x2A, 1, 1), block(2)).status == status(reg_write)
    assert register(lu, B, 0, old=KEY_B).status == GOOD  # unregister B
    assert lu.execute(B, rw10(0x28, 1, 1)).status == status(unreg_read)
    assert lu.execute(B, rw10(0x2A, 1, 1), block(2)).status == status(unreg_write)
    for always in (inquiry(), tur(), prin(0), bytes([0x25]) + bytes(9), rsoc()):
        assert lu.execute(B, always).status == GOOD
    assert release(lu, A, KEY_A, pr_type).status == GOOD
    assert register(lu, A, 0, old=KEY_A).status == GOOD
    assert read_reservation(lu, A) is None


@pytest.mark.parametrize("pr_type", list(PrType))
def test_unregistering_the_holder_ends_the_reservation_unless_all_registrants(pr_type: PrType) -> None:
    """libiscsi ProutReserve.Ownership*."""
    lu = two_registered(pr_type)
    assert register(lu, A, 0, old=KEY_A).status == GOOD
    shared = pr_type in (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    assert (read_reservation(lu, A) is not None) == shared
    if pr_type == PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY or pr_type == PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY:
        assert_sense(lu.execute(B, tur()), S.RESERVATIONS_RELEASED)
    if shared:
        assert release(lu, B, KEY_B, pr_type).status == GOOD
    assert register(lu, B, 0, old=KEY_B).status == GOOD
    assert read_keys(lu, A)[1] == [] and read_reservation(lu, A) is None


def test_register_rules_and_generation() -> None:
    """SPC-4 §5.12.7 (libiscsi ProutRegister.Simple)."""
    lu, _ = fresh()
    gen0, keys = read_keys(lu, A)
    assert keys == []
    assert register(lu, A, KEY_A, old=5).status == RESERVATION_CONFLICT  # unregistered, RK != 0
    assert register(lu, A, KEY_A).status == GOOD
    assert register(lu, A, KEY_A + 1).status == RESERVATION_CONFLICT  # registered, RK mismatch
    assert register(lu, A, KEY_A + 1, old=KEY_A).status == GOOD  # change key
    ignore = PrOutParameters(0, KEY_A + 2).to_bytes()
    assert lu.execute(A, prout(pr.ServiceAction.REGISTER_AND_IGNORE_EXISTING_KEY), ignore).status == GOOD
    gen, keys = read_keys(lu, A)
    assert keys == [KEY_A + 2] and gen == gen0 + 3
    assert reserve(lu, A, KEY_A + 2, PrType.WRITE_EXCLUSIVE).status == GOOD
    assert read_keys(lu, A)[0] == gen  # RESERVE does not change PRgeneration
    assert register(lu, A, 0, old=KEY_A + 2).status == GOOD
    assert read_keys(lu, A) == (gen + 1, []) and read_reservation(lu, A) is None
    truncated = lu.execute(A, prin(0, alloc=8))  # libiscsi PrinReadKeys.Truncate
    assert len(truncated.data) == 8


def test_reserve_release_conflicts_and_errors() -> None:
    lu = two_registered(PrType.EXCLUSIVE_ACCESS)
    assert reserve(lu, A, KEY_A, PrType.EXCLUSIVE_ACCESS).status == GOOD  # same type again: no-op
    assert reserve(lu, A, KEY_A, PrType.WRITE_EXCLUSIVE).status == RESERVATION_CONFLICT
    assert reserve(lu, B, KEY_B, PrType.EXCLUSIVE_ACCESS).status == RESERVATION_CONFLICT
    assert reserve(lu, B, KEY_A, PrType.EXCLUSIVE_ACCESS).status == RESERVATION_CONFLICT  # wrong key
    assert_sense(reserve(lu, A, KEY_A, 2), S.INVALID_FIELD_IN_CDB)  # type 2 is obsolete
    bad_scope = lu.execute(A, prout(pr.ServiceAction.RESERVE, 3, scope=1), PrOutParameters(KEY_A, 0).to_bytes())
    assert_sense(bad_scope, S.INVALID_FIELD_IN_CDB)
    assert release(lu, B, KEY_B, PrType.EXCLUSIVE_ACCESS).status == GOOD  # not the holder: no-op
    assert read_reservation(lu, A) is not None
    assert_sense(release(lu, A, KEY_A, PrType.WRITE_EXCLUSIVE), S.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    assert release(lu, A, KEY_A, PrType.EXCLUSIVE_ACCESS).status == GOOD
    assert_sense(lu.execute(A, prout(0, length=23), bytes(23)), S.PARAMETER_LIST_LENGTH_ERROR)
    spec_i_pt = PrOutParameters(KEY_A, KEY_A, spec_i_pt=True).to_bytes()
    assert_sense(lu.execute(A, prout(0), spec_i_pt), S.INVALID_FIELD_IN_PARAMETER_LIST)
    assert_sense(lu.execute(A, prout(7), bytes(24)), S.INVALID_FIELD_IN_CDB)  # REGISTER AND MOVE


def test_clear_removes_everything_and_notifies_the_others() -> None:
    """libiscsi ProutClear.Simple: PRgeneration +1 for CLEAR, not for RESERVE."""
    lu = two_registered(PrType.WRITE_EXCLUSIVE)
    gen = read_keys(lu, A)[0]
    assert lu.execute(B, prout(pr.ServiceAction.CLEAR), PrOutParameters(KEY_B, 0).to_bytes()).status == GOOD
    assert read_keys(lu, B) == (gen + 1, []) and read_reservation(lu, B) is None
    assert_sense(lu.execute(A, tur()), S.RESERVATIONS_PREEMPTED)
    assert lu.execute(B, tur()).status == GOOD


def test_preempt_removes_registrations_and_takes_the_reservation() -> None:
    lu = two_registered(PrType.WRITE_EXCLUSIVE)
    gen = read_keys(lu, A)[0]
    params = PrOutParameters(KEY_B, KEY_A).to_bytes()
    assert lu.execute(B, prout(pr.ServiceAction.PREEMPT, PrType.EXCLUSIVE_ACCESS), params).status == GOOD
    assert read_keys(lu, B) == (gen + 1, [KEY_B])
    assert read_reservation(lu, B) == (KEY_B, 0, PrType.EXCLUSIVE_ACCESS)
    assert_sense(lu.execute(A, tur()), S.REGISTRATIONS_PREEMPTED)
    assert lu.execute(A, rw10(0x28, 0, 1)).status == RESERVATION_CONFLICT


def test_preempt_without_reservation_keeps_the_issuers_own_registration() -> None:
    """libiscsi ProutPreempt.RemoveRegistration: both initiators often register the same key."""
    lu, _ = make_lu()
    ready(lu, A, B)
    register(lu, A, KEY_A)
    register(lu, B, KEY_A)
    params = PrOutParameters(KEY_A, KEY_A).to_bytes()
    assert lu.execute(B, prout(pr.ServiceAction.PREEMPT, PrType.EXCLUSIVE_ACCESS), params).status == GOOD
    assert read_keys(lu, B)[1] == [KEY_A]
    assert_sense(
        lu.execute(B, prout(pr.ServiceAction.PREEMPT, 3), PrOutParameters(KEY_A, 0).to_bytes()),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
    )
    assert lu.execute(B, prout(pr.ServiceAction.PREEMPT, 3), PrOutParameters(KEY_A, 99).to_bytes()).status == (
        RESERVATION_CONFLICT
    )


def test_preempt_and_abort_of_an_all_registrants_reservation_with_zero_key() -> None:
    lu = two_registered(PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    params = PrOutParameters(KEY_B, 0).to_bytes()
    assert lu.execute(B, prout(pr.ServiceAction.PREEMPT_AND_ABORT, PrType.EXCLUSIVE_ACCESS), params).status == GOOD
    assert read_reservation(lu, B) == (KEY_B, 0, PrType.EXCLUSIVE_ACCESS)
    assert read_keys(lu, B)[1] == [KEY_B]
    assert_sense(lu.execute(A, tur()), S.REGISTRATIONS_PREEMPTED)


def test_report_capabilities_and_read_full_status() -> None:
    """SPC-4 §6.14.4, §6.14.5 (libiscsi PrinReportCapabilities.Simple)."""
    lu = two_registered(PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    caps = lu.execute(A, prin(pr.InService.REPORT_CAPABILITIES)).data
    assert caps == bytes([0, 8, 0x05, 0x90, 0xEA, 0x01, 0, 0])
    full = lu.execute(A, prin(pr.InService.READ_FULL_STATUS)).data
    length = struct.unpack(">I", full[4:8])[0]
    assert length == len(full) - 8
    first = full[8:]
    assert struct.unpack(">Q", first[:8])[0] == KEY_A and first[12] == 0x01 and first[13] == 0x05
    assert struct.unpack(">H", first[18:20])[0] == 1
    tid_len = struct.unpack(">I", first[20:24])[0]
    tid = first[24 : 24 + tid_len]
    assert tid[0] == 0x45 and tid[4:].rstrip(b"\0") == A.initiator_port.encode() and len(tid) % 4 == 0


def test_all_tg_pt_registration_matches_every_target_port() -> None:
    lu, _ = make_lu()
    other_port = Nexus(A.initiator_name, A.isid, TARGET, tpgt=2)
    ready(lu, A, other_port)
    params = PrOutParameters(0, KEY_A, all_tg_pt=True).to_bytes()
    assert lu.execute(A, prout(0), params).status == GOOD
    assert reserve(lu, other_port, KEY_A, PrType.EXCLUSIVE_ACCESS).status == GOOD
    assert lu.execute(A, rw10(0x28, 0, 1)).status == GOOD


def test_reservation_state_survives_a_new_logical_unit_on_the_same_store() -> None:
    """The store is the cluster KV: a node taking the volume over sees the reservation (APTPL or not)."""
    store = MemReservationStore()
    lu, _ = make_lu(store=store)
    ready(lu, A, B)
    assert register(lu, A, KEY_A, aptpl=True).status == GOOD
    assert reserve(lu, A, KEY_A, PrType.EXCLUSIVE_ACCESS).status == GOOD
    successor, _ = make_lu(store=store)
    ready(successor, A, B)
    assert read_reservation(successor, B) == (KEY_A, 0, PrType.EXCLUSIVE_ACCESS)
    assert successor.execute(B, rw10(0x28, 0, 1)).status == RESERVATION_CONFLICT
    assert successor.execute(A, rw10(0x28, 0, 1)).status == GOOD
    assert successor.execute(A, prin(2)).data[3] & 0x01  # PTPL_A


def test_store_unavailable_fails_pr_out_with_busy_and_keeps_the_state() -> None:
    store = MemReservationStore()
    lu, _ = make_lu(store=store)
    ready(lu, A)
    assert register(lu, A, KEY_A).status == GOOD
    store.unavailable = True
    assert register(lu, A, KEY_A + 1, old=KEY_A) == ScsiResult(BUSY)
    assert read_keys(lu, A)[1] == [KEY_A]
    store.unavailable = False
    assert register(lu, A, KEY_A + 1, old=KEY_A).status == GOOD
    assert PrState.from_bytes(store.load() or b"").registrations[0].key == KEY_A + 1


def test_corrupt_stored_state_is_refused_at_creation() -> None:
    with pytest.raises(ValueError):
        make_lu(store=MemReservationStore(b'{"version": 1}'))
    with pytest.raises(ValueError):
        PrState.from_bytes(b"not json")
    state = PrState(3, (pr.Registration("i", "t", 5),), pr.Reservation(PrType.EXCLUSIVE_ACCESS, ("i", "t")), True)
    assert PrState.from_bytes(state.to_bytes()) == state
    with pytest.raises(ValueError):
        PrState(0, (), pr.Reservation(PrType.EXCLUSIVE_ACCESS, ("i", "t")))  # holder not registered


def test_reserve6_release6_between_two_initiators() -> None:
    """SPC-2 §7.21 (libiscsi Reserve6.2Initiators)."""
    lu, _ = make_lu()
    ready(lu, A, B)
    res6, rel6 = bytes([0x16]) + bytes(5), bytes([0x17]) + bytes(5)
    assert lu.execute(A, res6).status == GOOD
    assert lu.execute(A, res6).status == GOOD
    assert lu.execute(B, res6).status == RESERVATION_CONFLICT
    assert lu.execute(B, rel6).status == GOOD  # not the holder: no-op
    assert lu.execute(A, mode_sense6()).status == GOOD
    assert lu.execute(B, mode_sense6()).status == RESERVATION_CONFLICT
    assert lu.execute(B, inquiry()).status == GOOD
    assert lu.execute(B, prin(0)).status == RESERVATION_CONFLICT
    assert lu.execute(A, rel6).status == GOOD
    assert lu.execute(B, res6).status == GOOD
    assert lu.execute(B, rel6).status == GOOD


def test_reserve6_conflicts_with_persistent_registrations() -> None:
    """CRH=0 (SPC-4 §5.12.3): RESERVE/RELEASE(6) conflict while any key is registered."""
    lu, _ = fresh()
    register(lu, A, KEY_A)
    assert lu.execute(A, bytes([0x16]) + bytes(5)).status == RESERVATION_CONFLICT
    assert lu.execute(A, bytes([0x17]) + bytes(5)).status == RESERVATION_CONFLICT


# ---------------------------------------------------------------------- expected_data_out table


@pytest.mark.parametrize(
    ("cdb", "expected"),
    [
        (tur(), 0),
        (inquiry(), 0),
        (rw10(0x2A, 0, 8), 4096),
        (rw12(0xAA, 0, 2), 1024),
        (rw16(0x8A, 0, 1), 512),
        (caw(0, 3), 3072),
        (unmap_cdb(24), 24),
        (bytes([0x15, 0x10, 0, 0, 28, 0]), 28),
        (struct.pack(">BB5xHB", 0x55, 0x10, 300, 0), 300),
        (prout(0), 24),
        (rw10(0x2E, 0, 2), 1024),
        (bytes([0x16]) + bytes(5), 0),
    ],
)
def test_expected_data_out(cdb: bytes, expected: int) -> None:
    lu, _ = make_lu()
    assert lu.expected_data_out(cdb) == expected


# ---------------------------------------------------------------------- MemDevice


def test_memdevice_semantics() -> None:
    dev = MemDevice(16, 512, hard_limit_blocks=4, soft_threshold_blocks=2)
    dev.write(0, block(1) + bytes(512), fua=True)
    assert dev.mapped_blocks == 1 and dev.fua_writes == 1
    assert dev.lba_status(0) == (0, 1, True) and dev.lba_status(1) == (1, 15, False)
    dev.write_same(2, 2, block(3))
    assert dev.soft_threshold_event() and not dev.soft_threshold_event()
    with pytest.raises(SpaceExhausted):
        dev.write(8, block(4) * 2)
    dev.unmap([(2, 1)])
    dev.compare_and_write(3, block(3), block(5))
    with pytest.raises(Miscompare) as mis:
        dev.compare_and_write(3, block(3), block(6))
    assert mis.value.offset == 0
    assert dev.read(0, 4) == block(1) + bytes(1024) + block(5)
    with pytest.raises(OutOfRange):
        dev.read(15, 2)


# ---------------------------------------------------------------------- concurrency


def test_concurrent_sessions_read_and_write_without_corruption() -> None:
    lu, _ = make_lu(blocks=1024)
    nexuses = [Nexus(f"iqn.2026-11.io.floe.test:n{i}", bytes([0x80, 0, 0, 0, 0, i]), TARGET) for i in range(6)]
    ready(lu, *nexuses)
    errors: list[str] = []

    def run(n: Nexus, cdb: bytes, data: bytes = b"") -> ScsiResult:
        result = lu.execute(n, cdb, data)
        if result.status == CHECK_CONDITION and sense_of(result).is_(S.CAPACITY_DATA_HAS_CHANGED):
            result = lu.execute(n, cdb, data)  # the unit attention raised meanwhile, once
        return result

    def worker(i: int, n: Nexus) -> None:
        for round_ in range(40):
            lba = i * 100 + round_ % 50
            data = bytes([(i * 40 + round_) % 251 + 1]) * 1024
            if run(n, rw10(0x2A, lba, 2), data).status != GOOD:
                errors.append("write")
            if run(n, rw10(0x28, lba, 2)).data != data:
                errors.append("read")
            run(n, prin(0))

    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(nexuses)]
    for t in threads:
        t.start()
    lu.capacity_changed()
    for t in threads:
        t.join()
    assert errors == []


# ---------------------------------------------------------------------- fuzz


@st.composite
def random_command(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """A row of the dispatch table with random CDB bytes. Half the time the bytes are
    masked with the row's CDB usage data and about half of them zeroed, so reserved-bit
    checks pass and LBAs and lengths are often small enough to reach the device."""
    spec = draw(st.sampled_from(COMMANDS))
    body = bytearray(draw(st.binary(min_size=spec.cdb_length - 1, max_size=spec.cdb_length + 8)))
    if draw(st.booleans()):
        zeroed = draw(st.lists(st.booleans(), min_size=len(body), max_size=len(body)))
        for i in range(len(body)):
            usage = spec.usage[i + 1] if i + 1 < spec.cdb_length else 0xFF
            body[i] = 0 if zeroed[i] else body[i] & usage
    if spec.service_action is not None and draw(st.booleans()):
        body[0] = spec.service_action | (body[0] & 0xE0)
    data = draw(st.binary(max_size=2048))
    return bytes([spec.opcode]) + bytes(body), data, draw(st.integers(0, 2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=st.lists(random_command(), min_size=1, max_size=6))
def test_fuzz_random_cdbs_always_answer_with_a_well_formed_result(commands: list[tuple[bytes, bytes, int]]) -> None:
    lu, _ = make_lu(blocks=64, soft_threshold_blocks=8, hard_limit_blocks=32)
    for cdb, data, who in commands:
        nexus = (A, B, Nexus("iqn.fuzz", bytes(6), TARGET))[who]
        result = lu.execute(nexus, cdb, data)
        assert isinstance(result, ScsiResult)
        assert result.status in (GOOD, CHECK_CONDITION, RESERVATION_CONFLICT, BUSY)
        if result.status == CHECK_CONDITION:
            parsed = parse_fixed_sense(result.sense)
            assert not parsed.is_(S.INTERNAL_TARGET_FAILURE), cdb.hex()
        else:
            assert result.sense == b""
        expected = lu.expected_data_out(cdb)
        assert expected is None or expected >= 0


@settings(max_examples=200, deadline=None)
@given(cdb=st.binary(max_size=20), data=st.binary(max_size=64))
def test_fuzz_arbitrary_bytes_never_raise(cdb: bytes, data: bytes) -> None:
    lu, _ = make_lu(blocks=64)
    result = lu.execute(A, cdb, data)
    if result.status == CHECK_CONDITION:
        parse_fixed_sense(result.sense)


def test_a_takeover_that_lost_cached_writes_fails_each_nexus_first_flush() -> None:
    """DESIGN.md §2 point 2: GOOD for SYNCHRONIZE CACHE only if every write that completed
    before it is durable. When the device took over from an owner that died holding
    acknowledged, unflushed writes, each initiator's next flush says so (MEDIUM ERROR, WRITE
    ERROR 0Ch/00h) instead of a GOOD that initiators retrying the reset UNIT ATTENTION would
    take as 'durable'; after that, flushes are GOOD again."""
    lu, device = make_lu()
    ready(lu, A, B)
    sync10 = bytes([0x35]) + bytes(9)
    assert lu.execute(A, sync10).status == GOOD  # nothing was lost
    device.writes_lost = True
    assert_sense(lu.execute(A, sync10), S.WRITE_ERROR)
    assert lu.execute(A, sync10).status == GOOD
    sync16 = bytes([0x91]) + bytes(15)
    assert_sense(lu.execute(B, sync16), S.WRITE_ERROR)
    assert lu.execute(B, sync16).status == GOOD
    # A reconnecting initiator is a new nexus (another ISID) of the same initiator: told once only.
    a2 = Nexus(A.initiator_name, bytes.fromhex("800000000009"), TARGET)
    ready(lu, a2)
    assert lu.execute(a2, sync10).status == GOOD
    assert device.flushes >= 6  # the flush itself still ran every time


def test_pre_fetch_checks_its_range_and_answers_good() -> None:
    """PRE-FETCH(10/16) (SBC-3 §5.10, §5.11): GOOD in range (with IMMED and a group number
    too), LBA OUT OF RANGE past the end."""
    lu, _device = fresh()
    pf10 = bytes([0x34, 0x02]) + (0).to_bytes(4, "big") + bytes([3]) + (8).to_bytes(2, "big") + b"\0"
    assert lu.execute(A, pf10).status == GOOD
    past = bytes([0x34, 0]) + (BLOCKS - 1).to_bytes(4, "big") + b"\0" + (2).to_bytes(2, "big") + b"\0"
    assert_sense(lu.execute(A, past), S.LBA_OUT_OF_RANGE)
    pf16 = bytes([0x90, 0]) + (0).to_bytes(8, "big") + (BLOCKS).to_bytes(4, "big") + b"\0\0"
    assert lu.execute(A, pf16).status == GOOD
    past16 = bytes([0x90, 0]) + (BLOCKS).to_bytes(8, "big") + (1).to_bytes(4, "big") + b"\0\0"
    assert_sense(lu.execute(A, past16), S.LBA_OUT_OF_RANGE)
