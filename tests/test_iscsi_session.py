"""The full feature phase of an iSCSI session (iscsi/session.py) against RFC 7143.

Three layers, as the house style asks:

* scripted transcripts: one initiator PDU (or completion, or tick) at a time, and the
  exact actions the session answers with, rendered one per line by `fmt` so that a
  behaviour change shows up as a readable diff. Each test cites the RFC section whose
  rule it pins down;
* a model-based run: a well-behaved initiator (`Initiator`) drives random reads and
  writes through random negotiated parameters, answers R2Ts in random order and the
  LU completes in random order; every byte written must reach Execute unchanged and
  every read must reassemble, each command gets exactly one status;
* a hypothesis state machine feeding random, often absurd, initiator PDUs, completions,
  TMF completions and clock ticks: the session never raises, keeps its own invariants
  (`check_invariants`), never overruns the CmdSN window or the Data-Out budget, numbers
  StatSN consecutively and never sends a status nobody asked for.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields, replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from iscsi.pdu import (
    R2T,
    RESERVED_TAG,
    DataIn,
    DataOut,
    InitiatorPDU,
    Invalid,
    LoginRequest,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TargetPDU,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
)
from iscsi.session import (
    IMMEDIATE_TASKS_MAX,
    SENSE_INVALID_FIELD_IN_CDB,
    TEXT_RESPONSE_BYTES_MAX,
    Action,
    Close,
    Execute,
    Send,
    Session,
    SessionConfig,
    SessionUsageError,
    TaskManagement,
    sn_add,
    sn_in_window,
    sn_lt,
)
from iscsi.types import CHECK_CONDITION, GOOD, MAX_TRANSFER_BYTES, Nexus, ScsiResult

BLOCK = 512
NEXUS = Nexus("iqn.1994-05.com.example:host", b"\x00\x02\x3d\x00\x00\x01", "iqn.2026-11.io.floe:t1.vol1")
EXP = 10  # ExpCmdSN at the end of login
STAT = 100  # StatSN of the first full-feature response
UNIT_ATTENTION_LIKE = bytes([0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0x00, 0, 0, 0, 0])  # MEDIUM ERROR


def cdb10(opcode: int, lba: int, blocks: int) -> bytes:
    return bytes([opcode, 0]) + lba.to_bytes(4, "big") + b"\x00" + blocks.to_bytes(2, "big") + bytes(7)


def read10(blocks: int, lba: int = 0) -> bytes:
    return cdb10(0x28, lba, blocks)


def write10(blocks: int, lba: int = 0) -> bytes:
    return cdb10(0x2A, lba, blocks)


INQUIRY = bytes([0x12, 0, 0, 0, 96, 0]) + bytes(10)
TEST_UNIT_READY = bytes(16)
UNKNOWN_OPCODE = bytes([0xC7]) + bytes(15)


def need(cdb: bytes) -> int | None:
    """The LU's answer to 'how many Data-Out bytes does this CDB need' for the CDBs above."""
    if cdb[0] == 0x2A:
        return int.from_bytes(cdb[7:9], "big") * BLOCK
    if cdb[0] in (0x28, 0x12, 0x00):
        return 0
    return None


def config(**kw: object) -> SessionConfig:
    base: dict[str, object] = dict(
        nexus=NEXUS, discovery=False, exp_cmdsn=EXP, statsn=STAT, max_send_data_segment=512,
        max_recv_data_segment=512, max_burst_length=1024, first_burst_length=1024, initial_r2t=True,
        immediate_data=True, max_outstanding_r2t=1, cmd_window=8,
    )
    base.update(kw)
    return SessionConfig(**base)  # type: ignore[arg-type]


def session(**kw: object) -> Session:
    return Session(config(**kw), expected_data_out=need, now=0.0)


def fmt(action: Action) -> str:
    """One line per action: the PDU type and every field that differs from its default."""
    if isinstance(action, Send):
        pdu = action.pdu
        parts = [type(pdu).__name__]
        blobs = []
        for f in fields(pdu):
            value = getattr(pdu, f.name)
            if f.name in ("data", "sense", "bhs"):
                if value:
                    blobs.append(f"{f.name}[{len(value)}]")
                continue
            if f.default is not MISSING and value == f.default:
                continue
            parts.append(f"{f.name}={value:#x}" if f.name in ("itt", "ttt") else f"{f.name}={value}")
        return " ".join(parts + blobs)
    if isinstance(action, Execute):
        return f"Execute task={action.task} cdb={action.cdb[:1].hex()} data_out[{len(action.data_out)}]"
    if isinstance(action, TaskManagement):
        return f"TaskManagement task={action.task} function={action.function} referenced={list(action.referenced)}"
    return f"Close reason={action.reason!r} logout={action.logout}"


def lines(actions: Sequence[Action]) -> list[str]:
    return [fmt(a) for a in actions]


def pdus(actions: Sequence[Action]) -> list[TargetPDU]:
    return [a.pdu for a in actions if isinstance(a, Send)]


def executes(actions: Sequence[Action]) -> list[Execute]:
    return [a for a in actions if isinstance(a, Execute)]


def only_execute(actions: Sequence[Action]) -> Execute:
    ex = executes(actions)
    assert len(ex) == 1, lines(actions)
    return ex[0]


# ---------------------------------------------------------------- serial arithmetic


def test_serial_arithmetic_wraps_per_rfc_1982() -> None:
    assert sn_lt(0xFFFFFFFF, 0)
    assert not sn_lt(0, 0xFFFFFFFF)
    assert sn_lt(5, 6) and not sn_lt(6, 5) and not sn_lt(5, 5)
    assert not sn_lt(0, 1 << 31) and not sn_lt(1 << 31, 0)  # undefined at half the space
    assert sn_add(0xFFFFFFFF, 2) == 1
    assert sn_in_window(0, 0xFFFFFFFE, 1)
    assert not sn_in_window(2, 0xFFFFFFFE, 1)
    assert not sn_in_window(7, 7, 6)  # MaxCmdSN = ExpCmdSN - 1: the window is empty (§3.2.2.1)


def test_config_refuses_what_rfc_7143_forbids() -> None:
    with pytest.raises(ValueError):
        config(first_burst_length=2048, max_burst_length=1024)  # §13.14
    with pytest.raises(ValueError):
        Session(config(max_recv_data_segment=100), expected_data_out=need, now=0)  # §13.12: at least 512
    with pytest.raises(ValueError):
        Session(config(cmd_window=0), expected_data_out=need, now=0)


# ---------------------------------------------------------------- reads (§11.7, §11.4)


def test_read_multi_pdu_data_in_with_phase_collapsed_status() -> None:
    """§11.7: Data-In PDUs of at most MaxRecvDataSegmentLength, F on the last PDU of every
    MaxBurstLength sequence; §11.7: GOOD status rides in the last Data-In (S=1), the only
    one that advances StatSN (§11.7)."""
    s = session()
    out = s.receive(ScsiCommand(itt=0x10, cdb=read10(3), edtl=1536, cmdsn=EXP, read=True), 0)
    ex = only_execute(out)
    assert lines(out) == ["Execute task=1 cdb=28 data_out[0]"]
    out = s.completed(ex.task, ScsiResult(GOOD, bytes(range(256)) * 6), 0)
    assert lines(out) == [
        "DataIn itt=0x10 statsn=100 expcmdsn=11 maxcmdsn=18 data[512]",
        "DataIn itt=0x10 statsn=100 expcmdsn=11 maxcmdsn=18 datasn=1 buffer_offset=512 final=True data[512]",
        "DataIn itt=0x10 statsn=100 expcmdsn=11 maxcmdsn=18 datasn=2 buffer_offset=1024 final=True "
        "status_present=True data[512]",
    ]
    assert b"".join(p.data for p in pdus(out) if isinstance(p, DataIn)) == bytes(range(256)) * 6
    assert s.statsn == STAT + 1


def test_read_with_check_condition_sends_data_then_separate_response_with_sense() -> None:
    """§11.7: status is phase-collapsed only for GOOD without sense; a CHECK CONDITION is a
    SCSI Response carrying the sense (§11.4), ExpDataSN = Data-In PDUs sent (§11.4), and the
    Data-In before it carries StatSN without advancing it."""
    s = session()
    ex = only_execute(s.receive(ScsiCommand(itt=0x11, cdb=read10(2), edtl=1024, cmdsn=EXP, read=True), 0))
    out = s.completed(ex.task, ScsiResult(CHECK_CONDITION, bytes(512), UNIT_ATTENTION_LIKE), 0)
    assert lines(out) == [
        "DataIn itt=0x11 statsn=100 expcmdsn=11 maxcmdsn=18 final=True data[512]",
        "ScsiResponse itt=0x11 status=2 statsn=100 expcmdsn=11 maxcmdsn=18 expdatasn=1 underflow=True "
        "residual=512 sense[18]",
    ]
    rsp = pdus(out)[-1]
    assert isinstance(rsp, ScsiResponse) and rsp.sense == UNIT_ATTENTION_LIKE


def test_read_check_condition_without_data() -> None:
    s = session()
    ex = only_execute(s.receive(ScsiCommand(itt=0x12, cdb=read10(1), edtl=512, cmdsn=EXP, read=True), 0))
    out = s.completed(ex.task, ScsiResult(CHECK_CONDITION, b"", UNIT_ATTENTION_LIKE), 0)
    assert lines(out) == [
        "ScsiResponse itt=0x12 status=2 statsn=100 expcmdsn=11 maxcmdsn=18 underflow=True residual=512 sense[18]",
    ]


def test_read_residual_underflow_and_overflow() -> None:
    """§11.4.5: Underflow with Residual Count = EDTL - bytes moved; Overflow with the bytes that
    did not fit, and the data cut at EDTL."""
    s = session()
    ex = only_execute(s.receive(ScsiCommand(itt=1, cdb=INQUIRY, edtl=96, cmdsn=EXP, read=True), 0))
    assert lines(s.completed(ex.task, ScsiResult(GOOD, bytes(36)), 0)) == [
        "DataIn itt=0x1 statsn=100 expcmdsn=11 maxcmdsn=18 residual=60 final=True underflow=True "
        "status_present=True data[36]",
    ]
    ex = only_execute(s.receive(ScsiCommand(itt=2, cdb=INQUIRY, edtl=96, cmdsn=EXP + 1, read=True), 0))
    out = s.completed(ex.task, ScsiResult(GOOD, bytes(200)), 0)
    assert lines(out) == [
        "DataIn itt=0x2 statsn=101 expcmdsn=12 maxcmdsn=19 residual=104 final=True overflow=True "
        "status_present=True data[96]",
    ]


def test_non_data_command_gets_a_plain_response() -> None:
    s = session()
    ex = only_execute(s.receive(ScsiCommand(itt=3, cdb=TEST_UNIT_READY, cmdsn=EXP), 0))
    assert lines(s.completed(ex.task, ScsiResult(GOOD), 0)) == [
        "ScsiResponse itt=0x3 statsn=100 expcmdsn=11 maxcmdsn=18",
    ]


def test_bidirectional_command_is_check_condition_invalid_field_in_cdb() -> None:
    s = session()
    out = s.receive(ScsiCommand(itt=4, cdb=write10(1), edtl=512, cmdsn=EXP, read=True, write=True,
                                bidi_read_length=512), 0)
    assert lines(out) == ["ScsiResponse itt=0x4 status=2 statsn=100 expcmdsn=11 maxcmdsn=18 sense[18]"]
    rsp = pdus(out)[0]
    assert isinstance(rsp, ScsiResponse) and rsp.sense == SENSE_INVALID_FIELD_IN_CDB
    assert rsp.sense[:3] == b"\x70\x00\x05" and rsp.sense[12:14] == b"\x24\x00" and len(rsp.sense) == 18


# ---------------------------------------------------------------- writes (§11.3, §11.7, §11.8)


def test_write_with_immediate_data_only() -> None:
    """ImmediateData=Yes (§13.11): the whole transfer rides in the command; no R2T."""
    s = session()
    out = s.receive(ScsiCommand(itt=5, cdb=write10(1), edtl=512, cmdsn=EXP, write=True, data=b"w" * 512), 0)
    assert lines(out) == ["Execute task=1 cdb=2a data_out[512]"]
    assert only_execute(out).data_out == b"w" * 512
    assert lines(s.completed(1, ScsiResult(GOOD), 0)) == ["ScsiResponse itt=0x5 statsn=100 expcmdsn=11 maxcmdsn=18"]


def data_outs(itt: int, ttt: int, offset: int, payload: bytes, seg: int) -> list[DataOut]:
    """The Data-Out PDUs answering one burst (or the unsolicited burst when ttt is reserved)."""
    pieces = [payload[i:i + seg] for i in range(0, len(payload), seg)] or [b""]
    return [DataOut(itt=itt, ttt=ttt, datasn=n, buffer_offset=offset + n * seg, final=n == len(pieces) - 1, data=p)
            for n, p in enumerate(pieces)]


def test_write_immediate_unsolicited_then_r2ts_one_outstanding() -> None:
    """InitialR2T=No: immediate data plus unsolicited Data-Out (TTT 0xffffffff, DataSN from 0) up
    to FirstBurstLength (§13.10, §13.14), F ending the unsolicited burst; then one R2T at a time
    (MaxOutstandingR2T=1, §13.17) of at most MaxBurstLength (§13.13), R2TSN counting from 0
    (§11.8), each carrying StatSN without advancing it (§11.8)."""
    s = session(initial_r2t=False, max_burst_length=1024, first_burst_length=1024)
    payload = bytes(range(256)) * 12  # 3072 bytes: 6 blocks
    out = s.receive(ScsiCommand(itt=7, cdb=write10(6), edtl=3072, cmdsn=EXP, write=True, final=False,
                                data=payload[:512]), 0)
    assert lines(out) == []  # unsolicited data still to come
    out = s.receive(DataOut(itt=7, datasn=0, buffer_offset=512, final=True, data=payload[512:1024]), 0)
    assert lines(out) == [
        "R2T itt=0x7 ttt=0x1 statsn=100 expcmdsn=11 maxcmdsn=17 buffer_offset=1024 desired_length=1024",
    ]
    out = []
    for d in data_outs(7, 1, 1024, payload[1024:2048], 512):
        out += s.receive(d, 0)
    assert lines(out) == [
        "R2T itt=0x7 ttt=0x2 statsn=100 expcmdsn=11 maxcmdsn=17 r2tsn=1 buffer_offset=2048 desired_length=1024",
    ]
    out = []
    for d in data_outs(7, 2, 2048, payload[2048:], 512):
        out += s.receive(d, 0)
    ex = only_execute(out)
    assert ex.data_out == payload
    assert s.data_out_bytes == 3072  # held until the write completes
    assert lines(s.completed(ex.task, ScsiResult(GOOD), 0)) == [
        "ScsiResponse itt=0x7 statsn=100 expcmdsn=11 maxcmdsn=18",
    ]
    assert s.data_out_bytes == 0


def test_write_r2ts_four_outstanding_small_bursts() -> None:
    """MaxOutstandingR2T=4 (§13.17): four R2Ts go out at once; a finished burst lets the next out."""
    s = session(max_outstanding_r2t=4, max_burst_length=512, first_burst_length=512, immediate_data=False)
    payload = bytes(i % 251 for i in range(5 * 512))
    out = s.receive(ScsiCommand(itt=8, cdb=write10(5), edtl=len(payload), cmdsn=EXP, write=True), 0)
    assert [(p.ttt, p.r2tsn, p.buffer_offset, p.desired_length) for p in pdus(out) if isinstance(p, R2T)] == [
        (1, 0, 0, 512), (2, 1, 512, 512), (3, 2, 1024, 512), (4, 3, 1536, 512)]
    # Bursts may be answered in any order; each one's PDUs in order (DataPDUInOrder=Yes).
    out = s.receive(DataOut(itt=8, ttt=3, buffer_offset=1024, final=True, data=payload[1024:1536]), 0)
    assert lines(out) == [
        "R2T itt=0x8 ttt=0x5 statsn=100 expcmdsn=11 maxcmdsn=17 r2tsn=4 buffer_offset=2048 desired_length=512",
    ]
    for ttt, off in ((1, 0), (2, 512), (4, 1536), (5, 2048)):
        out = s.receive(DataOut(itt=8, ttt=ttt, buffer_offset=off, final=True, data=payload[off:off + 512]), 0)
    assert only_execute(out).data_out == payload


def test_write_residuals_against_what_the_cdb_needs() -> None:
    """§11.4.5 for writes: EDTL above the CDB's need is Underflow (and only the need is
    solicited); below it is Overflow, and the command runs with what was sent."""
    s = session(max_outstanding_r2t=2)
    out = s.receive(ScsiCommand(itt=1, cdb=write10(1), edtl=1024, cmdsn=EXP, write=True), 0)
    assert lines(out) == [
        "R2T itt=0x1 ttt=0x1 statsn=100 expcmdsn=11 maxcmdsn=17 desired_length=512",
    ]
    ex = only_execute(s.receive(DataOut(itt=1, ttt=1, final=True, data=bytes(512)), 0))
    assert lines(s.completed(ex.task, ScsiResult(GOOD), 0)) == [
        "ScsiResponse itt=0x1 statsn=100 expcmdsn=11 maxcmdsn=18 underflow=True residual=512",
    ]
    ex = only_execute(s.receive(ScsiCommand(itt=2, cdb=write10(2), edtl=512, cmdsn=EXP + 1, write=True,
                                            data=bytes(512)), 0))
    assert len(ex.data_out) == 512  # the LU sees the short data and judges it
    assert lines(s.completed(ex.task, ScsiResult(GOOD), 0)) == [
        "ScsiResponse itt=0x2 statsn=101 expcmdsn=12 maxcmdsn=19 overflow=True residual=512",
    ]


def test_write_with_edtl_zero_runs_with_empty_data_and_reports_overflow() -> None:
    s = session()
    ex = only_execute(s.receive(ScsiCommand(itt=9, cdb=write10(1), edtl=0, cmdsn=EXP, write=True), 0))
    assert ex.data_out == b""
    out = s.completed(ex.task, ScsiResult(CHECK_CONDITION, b"", SENSE_INVALID_FIELD_IN_CDB), 0)
    assert lines(out) == [
        "ScsiResponse itt=0x9 status=2 statsn=100 expcmdsn=11 maxcmdsn=18 overflow=True residual=512 sense[18]",
    ]


def test_unknown_opcode_runs_without_data_and_its_data_is_dropped() -> None:
    """expected_data_out None: execute anyway (the LU answers with sense) but accept no data."""
    s = session()
    ex = only_execute(s.receive(ScsiCommand(itt=9, cdb=UNKNOWN_OPCODE, edtl=512, cmdsn=EXP, write=True,
                                            data=bytes(512)), 0))
    assert ex.data_out == b"" and s.data_out_bytes == 0
    out = s.completed(ex.task, ScsiResult(CHECK_CONDITION, b"", SENSE_INVALID_FIELD_IN_CDB), 0)
    assert lines(out) == [
        "ScsiResponse itt=0x9 status=2 statsn=100 expcmdsn=11 maxcmdsn=18 underflow=True residual=512 sense[18]",
    ]


def test_write_past_max_transfer_is_refused_without_buffering_and_its_unsolicited_data_dropped() -> None:
    """EDTL > MAX_TRANSFER_BYTES: CHECK CONDITION, ILLEGAL REQUEST / INVALID FIELD IN CDB, nothing
    buffered; the response waits for the unsolicited burst's F bit, which the initiator sends anyway."""
    s = session(initial_r2t=False)
    edtl = MAX_TRANSFER_BYTES + BLOCK
    out = s.receive(ScsiCommand(itt=0x20, cdb=write10(0xFFFF), edtl=edtl, cmdsn=EXP, write=True, final=False,
                                data=bytes(512)), 0)
    assert lines(out) == [] and s.data_out_bytes == 0
    out = s.receive(DataOut(itt=0x20, datasn=0, buffer_offset=512, final=True, data=bytes(512)), 0)
    assert lines(out) == ["ScsiResponse itt=0x20 status=2 statsn=100 expcmdsn=11 maxcmdsn=18 sense[18]"]
    assert s.data_out_bytes == 0 and s.in_flight == 0


def test_data_out_budget_second_task_waits_for_room_then_proceeds() -> None:
    """data_out_budget_bytes: a task is admitted to R2Ts only when its whole remaining transfer
    fits; the second waits until the first completes, then gets its R2T."""
    s = session(data_out_budget_bytes=4096, max_burst_length=4096, first_burst_length=512,
                max_outstanding_r2t=1, immediate_data=False, max_recv_data_segment=4096)
    out = s.receive(ScsiCommand(itt=1, cdb=write10(6), edtl=3072, cmdsn=EXP, write=True), 0)
    assert lines(out) == ["R2T itt=0x1 ttt=0x1 statsn=100 expcmdsn=11 maxcmdsn=17 desired_length=3072"]
    out = s.receive(ScsiCommand(itt=2, cdb=write10(4), edtl=2048, cmdsn=EXP + 1, write=True), 0)
    assert lines(out) == []  # 3072 + 2048 > 4096: waits
    ex = only_execute(s.receive(DataOut(itt=1, ttt=1, final=True, data=bytes(3072)), 0))
    assert s.data_out_bytes == 3072
    out = s.completed(ex.task, ScsiResult(GOOD), 0)
    assert lines(out) == [
        "ScsiResponse itt=0x1 statsn=100 expcmdsn=12 maxcmdsn=18",
        "R2T itt=0x2 ttt=0x2 statsn=101 expcmdsn=12 maxcmdsn=18 desired_length=2048",
    ]
    assert s.data_out_bytes == 2048


def test_data_out_budget_a_lone_task_larger_than_the_budget_proceeds() -> None:
    """Never deadlock: when no admitted task holds budget, the head task goes regardless."""
    s = session(data_out_budget_bytes=1024, max_burst_length=4096, first_burst_length=512, immediate_data=False,
                max_recv_data_segment=4096)
    out = s.receive(ScsiCommand(itt=1, cdb=write10(8), edtl=4096, cmdsn=EXP, write=True), 0)
    assert lines(out) == ["R2T itt=0x1 ttt=0x1 statsn=100 expcmdsn=11 maxcmdsn=17 desired_length=4096"]
    # Over budget now: MaxCmdSN stops opening until the write is done.
    ex = only_execute(s.receive(DataOut(itt=1, ttt=1, final=True, data=bytes(4096)), 0))
    assert lines(s.completed(ex.task, ScsiResult(GOOD), 0)) == [
        "ScsiResponse itt=0x1 statsn=100 expcmdsn=11 maxcmdsn=18",
    ]


# ---------------------------------------------------------------- bad Data-Out (§11.7, ERL 0)


def started_write(**kw: object) -> Session:
    s = session(max_burst_length=1024, **kw)
    out = s.receive(ScsiCommand(itt=0x30, cdb=write10(2), edtl=1024, cmdsn=EXP, write=True), 0)
    assert lines(out) == ["R2T itt=0x30 ttt=0x1 statsn=100 expcmdsn=11 maxcmdsn=17 desired_length=1024"]
    return s


def test_data_out_with_wrong_offset_fails_the_task_not_the_connection() -> None:
    """ERL 0 cannot recover the command, but the connection goes on: the Reject fails the task
    at the initiator (libiscsi's iSCSIDataSnInvalid sends four such writes in a row)."""
    s = started_write()
    out = s.receive(DataOut(itt=0x30, ttt=1, buffer_offset=512, data=bytes(512)), 0)
    assert lines(out) == ["Reject reason=4 statsn=100 expcmdsn=11 maxcmdsn=18 bhs[48]"]
    assert not s.closed and s.in_flight == 0 and s.data_out_bytes == 0
    # The rest of its data is dropped quietly; the session serves the next command.
    assert s.receive(DataOut(itt=0x30, ttt=1, buffer_offset=0, data=bytes(512), final=True), 0) == []
    assert lines(s.receive(NopOut(itt=7, cmdsn=EXP + 1), 0)) == [
        "NopIn itt=0x7 statsn=101 expcmdsn=12 maxcmdsn=19"]


def test_data_out_with_wrong_datasn_fails_the_task() -> None:
    s = started_write()
    out = s.receive(DataOut(itt=0x30, ttt=1, datasn=27, data=bytes(512)), 0)
    assert lines(out) == ["Reject reason=4 statsn=100 expcmdsn=11 maxcmdsn=18 bhs[48]"]
    assert not s.closed


def test_data_out_past_its_burst_closes() -> None:
    s = started_write(max_recv_data_segment=2048)
    out = s.receive(DataOut(itt=0x30, ttt=1, final=True, data=bytes(1536)), 0)
    assert [type(p).__name__ for p in pdus(out)] == ["Reject"] and isinstance(out[-1], Close)


def test_data_out_with_wrong_datasn_fails_the_task_and_missing_f_closes() -> None:
    s = started_write()
    out = s.receive(DataOut(itt=0x30, ttt=1, datasn=1, data=bytes(512)), 0)
    assert isinstance(out[-1], Send) and isinstance(out[-1].pdu, Reject) and not s.closed
    s = started_write()
    s.receive(DataOut(itt=0x30, ttt=1, data=bytes(512)), 0)
    # In order, but the last PDU of the burst lacks F: the framing of the burst is broken.
    assert isinstance(s.receive(DataOut(itt=0x30, ttt=1, datasn=1, buffer_offset=512, data=bytes(512)), 0)[-1],
                      Close)


def test_data_out_with_unknown_ttt_or_itt_is_rejected_and_the_session_goes_on() -> None:
    """Reject 0x09 "Invalid PDU field" (§11.17.1), carrying the header the adapter passed."""
    s = started_write()
    header = bytes([0x05, 0x80]) + bytes(46)
    out = s.receive(DataOut(itt=0x30, ttt=9, final=True, data=bytes(512)), 0, bhs=header)
    assert lines(out) == ["Reject reason=9 statsn=100 expcmdsn=11 maxcmdsn=17 bhs[48]"]
    rej = pdus(out)[0]
    assert isinstance(rej, Reject) and rej.bhs == header
    assert lines(s.receive(DataOut(itt=0x99, ttt=1, final=True, data=bytes(512)), 0)) == [
        "Reject reason=9 statsn=101 expcmdsn=11 maxcmdsn=17 bhs[48]",
    ]
    out = []
    for d in data_outs(0x30, 1, 0, bytes(1024), 512):
        out += s.receive(d, 0)
    assert len(executes(out)) == 1 and not s.closed


def test_unsolicited_data_out_when_initial_r2t_yes_closes() -> None:
    s = session()
    out = s.receive(ScsiCommand(itt=1, cdb=write10(2), edtl=1024, cmdsn=EXP, write=True, final=False), 0)
    assert [type(p).__name__ for p in pdus(out)] == ["Reject"] and isinstance(out[-1], Close)


def test_immediate_data_rules_are_protocol_errors() -> None:
    """Immediate data past FirstBurstLength, or with ImmediateData=No (§13.11, §13.14)."""
    s = session(max_recv_data_segment=2048)
    out = s.receive(ScsiCommand(itt=1, cdb=write10(4), edtl=2048, cmdsn=EXP, write=True, data=bytes(1536)), 0)
    assert isinstance(out[-1], Close)
    s = session(immediate_data=False)
    out = s.receive(ScsiCommand(itt=1, cdb=write10(1), edtl=512, cmdsn=EXP, write=True, data=bytes(512)), 0)
    assert isinstance(out[-1], Close)


# ---------------------------------------------------------------- command numbering (§3.2.2.1)


def test_out_of_order_cmdsn_is_held_until_the_gap_fills_and_outside_window_dropped() -> None:
    s = session(cmd_window=4)
    assert s.receive(ScsiCommand(itt=3, cdb=TEST_UNIT_READY, cmdsn=EXP + 2), 0) == []
    assert s.receive(ScsiCommand(itt=2, cdb=TEST_UNIT_READY, cmdsn=EXP + 1), 0) == []
    # Outside [ExpCmdSN, MaxCmdSN] = [10, 13], and a duplicate inside it: silently ignored.
    assert s.receive(ScsiCommand(itt=5, cdb=TEST_UNIT_READY, cmdsn=EXP + 4), 0) == []
    assert s.receive(ScsiCommand(itt=6, cdb=TEST_UNIT_READY, cmdsn=EXP - 1), 0) == []
    assert s.receive(ScsiCommand(itt=7, cdb=TEST_UNIT_READY, cmdsn=EXP + 2), 0) == []
    out = s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP), 0)
    assert lines(out) == [
        "Execute task=3 cdb=00 data_out[0]", "Execute task=2 cdb=00 data_out[0]", "Execute task=1 cdb=00 data_out[0]",
    ]
    assert s.exp_cmdsn == EXP + 3
    # Three tasks run: the window is ExpCmdSN - 1 + 4 - 3, i.e. one more command.
    assert lines(s.completed(3, ScsiResult(GOOD), 0)) == ["ScsiResponse itt=0x1 statsn=100 expcmdsn=13 maxcmdsn=14"]


def test_window_closes_while_tasks_run_and_reopens_as_they_finish() -> None:
    """At most cmd_window commands in flight: MaxCmdSN = ExpCmdSN - 1 means a shut window."""
    s = session(cmd_window=2)
    s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP), 0)
    s.receive(ScsiCommand(itt=2, cdb=TEST_UNIT_READY, cmdsn=EXP + 1), 0)
    assert s.receive(ScsiCommand(itt=3, cdb=TEST_UNIT_READY, cmdsn=EXP + 2), 0) == []  # past MaxCmdSN 11
    out = s.receive(NopOut(itt=0x40, immediate=True, cmdsn=EXP + 2), 0)
    assert lines(out) == ["NopIn itt=0x40 statsn=100 expcmdsn=12 maxcmdsn=11"]
    assert lines(s.completed(1, ScsiResult(GOOD), 0)) == ["ScsiResponse itt=0x1 statsn=101 expcmdsn=12 maxcmdsn=12"]


def test_cmdsn_window_wraps_around_zero() -> None:
    s = Session(config(exp_cmdsn=0xFFFFFFFE, cmd_window=4), expected_data_out=need, now=0)
    s.receive(ScsiCommand(itt=2, cdb=TEST_UNIT_READY, cmdsn=0), 0)
    s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=0xFFFFFFFF), 0)
    out = s.receive(ScsiCommand(itt=0, cdb=TEST_UNIT_READY, cmdsn=0xFFFFFFFE), 0)
    assert len(executes(out)) == 3 and s.exp_cmdsn == 1


def test_immediate_commands_run_at_once_and_do_not_advance_exp_cmdsn() -> None:
    """§3.2.2.1: the I bit: delivered at once, CmdSN not advanced; too many → Reject 0x06."""
    s = session()
    out = s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP + 3, immediate=True), 0)
    assert lines(out) == ["Execute task=1 cdb=00 data_out[0]"]
    assert s.exp_cmdsn == EXP
    for itt in range(2, IMMEDIATE_TASKS_MAX + 1):
        s.receive(ScsiCommand(itt=itt, cdb=TEST_UNIT_READY, cmdsn=EXP, immediate=True), 0)
    out = s.receive(ScsiCommand(itt=99, cdb=TEST_UNIT_READY, cmdsn=EXP, immediate=True), 0)
    assert lines(out) == ["Reject reason=6 statsn=100 expcmdsn=10 maxcmdsn=17 bhs[48]"]
    assert lines(s.completed(1, ScsiResult(GOOD), 0)) == ["ScsiResponse itt=0x1 statsn=101 expcmdsn=10 maxcmdsn=17"]


def test_duplicate_itt_is_rejected_task_in_progress_and_its_cmdsn_consumed() -> None:
    s = session()
    s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP), 0)
    out = s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP + 1), 0)
    assert lines(out) == ["Reject reason=7 statsn=100 expcmdsn=12 maxcmdsn=18 bhs[48]"]
    rej = pdus(out)[0]
    assert isinstance(rej, Reject) and rej.bhs[0] == 0x01 and rej.bhs[16:20] == b"\x00\x00\x00\x01"
    assert lines(s.receive(ScsiCommand(itt=2, cdb=TEST_UNIT_READY, cmdsn=EXP + 2), 0)) == [
        "Execute task=2 cdb=00 data_out[0]",  # the refused command made no task
    ]


# ---------------------------------------------------------------- NOP (§11.18, §11.19)


def test_initiator_ping_is_answered_with_its_data_and_advances_statsn() -> None:
    s = session()
    out = s.receive(NopOut(itt=0x50, cmdsn=EXP, data=b"ping"), 0)
    assert lines(out) == ["NopIn itt=0x50 statsn=100 expcmdsn=11 maxcmdsn=18 data[4]"]
    nop = pdus(out)[0]
    assert isinstance(nop, NopIn) and nop.data == b"ping"
    assert s.receive(NopOut(immediate=True), 0) == []  # ITT 0xffffffff: nothing to answer


def test_target_pings_an_idle_initiator_and_the_echo_keeps_the_session() -> None:
    """§11.19: a target NOP-In with a valid TTT asks for an echo and does not advance StatSN."""
    s = session(nop_interval_s=10.0, nop_timeout_s=30.0)
    assert s.tick(9.0) == []
    out = s.tick(10.0)
    assert lines(out) == ["NopIn ttt=0x1 statsn=100 expcmdsn=10 maxcmdsn=17"]
    assert s.tick(20.0) == []  # one ping at a time
    assert s.receive(NopOut(ttt=1, immediate=True), 21.0) == []
    assert s.tick(30.0) == []
    assert lines(s.tick(31.0)) == ["NopIn ttt=0x2 statsn=100 expcmdsn=10 maxcmdsn=17"]


def test_unanswered_ping_closes_the_connection() -> None:
    s = session(nop_interval_s=10.0, nop_timeout_s=30.0)
    s.tick(10.0)
    s.receive(NopOut(itt=5, cmdsn=EXP), 15.0)  # other traffic is not an echo
    assert s.tick(39.9) == []
    assert lines(s.tick(40.0)) == ["Close reason='no NOP-Out echo within 30.0 s' logout=False"]


# ---------------------------------------------------------------- Text (§11.10, §11.11)


def targets() -> list[tuple[str, list[str]]]:
    return [(f"iqn.2026-11.io.floe:tenant{i}.volume-with-a-long-name-{i:04d}",
             [f"10.0.0.{n}:3260,{n}" for n in range(1, 4)]) for i in range(8)]


def expected_send_targets(items: list[tuple[str, list[str]]]) -> bytes:
    out = b""
    for name, addresses in items:
        out += f"TargetName={name}\x00".encode()
        for a in addresses:
            out += f"TargetAddress={a}\x00".encode()
    return out


def test_send_targets_all_continues_over_several_pdus() -> None:
    """§11.11: a long answer goes in PDUs of at most MaxRecvDataSegmentLength with C=1 and a TTT;
    the initiator asks for each next part with that TTT; the last has F=1 and TTT 0xffffffff."""
    s = session(discovery=True, targets=targets)
    cmdsn = EXP
    out = s.receive(TextRequest(itt=0x60, cmdsn=cmdsn, data=b"SendTargets=All\x00"), 0)
    got = b""
    rounds = 0
    while True:
        rsp = pdus(out)[0]
        assert isinstance(rsp, TextResponse) and len(rsp.data) <= 512
        got += rsp.data
        if rsp.final:
            assert rsp.ttt == RESERVED_TAG and not rsp.cont
            break
        assert rsp.cont and rsp.ttt != RESERVED_TAG
        cmdsn += 1
        rounds += 1
        out = s.receive(TextRequest(itt=0x60, ttt=rsp.ttt, cmdsn=cmdsn), 0)
    assert got == expected_send_targets(targets())
    assert rounds == len(got) // 512
    assert s.statsn == STAT + rounds + 1  # every Text Response advances StatSN


def test_send_targets_first_lines_transcript() -> None:
    s = session(discovery=True, targets=targets)
    out = s.receive(TextRequest(itt=0x60, cmdsn=EXP, immediate=True, data=b"SendTargets=All\x00"), 0)
    assert lines(out) == [
        "TextResponse itt=0x60 ttt=0x1 statsn=100 expcmdsn=10 maxcmdsn=17 final=False cont=True data[512]",
    ]


def test_send_targets_on_a_normal_session_and_unknown_keys() -> None:
    """Empty SendTargets in a normal session: the session's own target (RFC 7143 Appendix C);
    a named one; unknown keys NotUnderstood; RFC keys cannot be renegotiated here: Reject."""
    own = [(NEXUS.target_name, ["10.0.0.1:3260,1"])]
    s = session(targets=lambda: targets() + own)
    out = s.receive(TextRequest(itt=1, cmdsn=EXP, data=b"SendTargets=\x00X-floe-thing=1\x00MaxBurstLength=512\x00"),
                    0)
    rsp = pdus(out)[0]
    assert isinstance(rsp, TextResponse) and rsp.final
    assert rsp.data == expected_send_targets(own) + b"X-floe-thing=NotUnderstood\x00MaxBurstLength=Reject\x00"
    name = targets()[3][0]
    rsp = pdus(s.receive(TextRequest(itt=2, cmdsn=EXP + 1, data=f"SendTargets={name}\x00".encode()), 0))[0]
    assert isinstance(rsp, TextResponse) and rsp.data == expected_send_targets([targets()[3]])


def test_send_targets_answer_is_bounded() -> None:
    many = [(f"iqn.2026-11.io.floe:t.v{i:05d}", ["10.0.0.1:3260,1"]) for i in range(5000)]
    s = session(discovery=True, targets=lambda: many, max_send_data_segment=(1 << 24) - 1)
    rsp = pdus(s.receive(TextRequest(itt=1, cmdsn=EXP, data=b"SendTargets=All\x00"), 0))[0]
    assert isinstance(rsp, TextResponse) and rsp.final
    assert len(rsp.data) <= TEXT_RESPONSE_BYTES_MAX
    assert rsp.data.endswith(b"TargetAddress=10.0.0.1:3260,1\x00")  # whole targets only


def test_text_request_continued_by_the_initiator_and_malformed_text() -> None:
    s = session(discovery=True, targets=targets)
    out = s.receive(TextRequest(itt=1, cmdsn=EXP, final=False, cont=True, data=b"SendTar"), 0)
    assert lines(out) == ["TextResponse itt=0x1 ttt=0x1 statsn=100 expcmdsn=11 maxcmdsn=18 final=False"]
    out = s.receive(TextRequest(itt=1, ttt=1, cmdsn=EXP + 1, data=b"gets=" + targets()[0][0].encode() + b"\x00"), 0)
    rsp = pdus(out)[0]
    assert isinstance(rsp, TextResponse) and rsp.final and rsp.data == expected_send_targets(targets()[:1])
    out = s.receive(TextRequest(itt=2, cmdsn=EXP + 2, data=b"no-equals-sign\x00"), 0)
    assert lines(out) == ["Reject reason=9 statsn=102 expcmdsn=13 maxcmdsn=20 bhs[48]"]
    out = s.receive(TextRequest(itt=3, ttt=77, cmdsn=EXP + 3), 0)  # no exchange with that TTT
    assert lines(out) == ["Reject reason=9 statsn=103 expcmdsn=14 maxcmdsn=21 bhs[48]"]


# ---------------------------------------------------------------- discovery sessions


def test_discovery_session_allows_only_text_nop_and_logout() -> None:
    s = session(discovery=True, targets=targets)
    out = s.receive(ScsiCommand(itt=1, cdb=INQUIRY, edtl=96, cmdsn=EXP, read=True), 0)
    assert lines(out) == ["Reject reason=4 statsn=100 expcmdsn=11 maxcmdsn=18 bhs[48]"]  # its CmdSN consumed
    out = s.receive(TaskMgmtRequest(itt=2, function=5, cmdsn=EXP + 1, immediate=True), 0)
    assert lines(out) == ["Reject reason=4 statsn=101 expcmdsn=11 maxcmdsn=18 bhs[48]"]
    assert lines(s.receive(NopOut(itt=3, cmdsn=EXP + 1), 0)) == ["NopIn itt=0x3 statsn=102 expcmdsn=12 maxcmdsn=19"]
    out = s.receive(LogoutRequest(itt=4, cmdsn=EXP + 2, immediate=True), 0)
    assert lines(out) == [
        "LogoutResponse itt=0x4 statsn=103 expcmdsn=12 maxcmdsn=19",
        "Close reason='logout' logout=True",
    ]


# ---------------------------------------------------------------- task management (§11.5, §11.6)


def test_abort_task_of_a_queued_task_drops_it_and_its_cmdsn() -> None:
    """A task still held for a CmdSN gap never runs; the response is Function complete."""
    s = session()
    assert s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP + 1), 0) == []
    out = s.receive(TaskMgmtRequest(itt=0x70, function=1, rtt=1, refcmdsn=EXP + 1, cmdsn=EXP, immediate=True), 0)
    assert lines(out) == ["TaskMgmtResponse itt=0x70 statsn=100 expcmdsn=10 maxcmdsn=17"]
    out = s.receive(ScsiCommand(itt=2, cdb=TEST_UNIT_READY, cmdsn=EXP), 0)
    assert lines(out) == ["Execute task=3 cdb=00 data_out[0]"]  # task 1 never runs
    assert s.exp_cmdsn == EXP + 2


def test_abort_task_of_an_executing_task_answers_after_its_completion_and_discards_the_result() -> None:
    """§4.2.3: the TMF response follows everything the aborted task sent; the aborted task gets
    no SCSI Response ever."""
    s = session()
    ex = only_execute(s.receive(ScsiCommand(itt=1, cdb=read10(1), edtl=512, cmdsn=EXP, read=True), 0))
    out = s.receive(TaskMgmtRequest(itt=0x71, function=1, rtt=1, refcmdsn=EXP, cmdsn=EXP + 1, immediate=True), 0)
    assert lines(out) == []
    out = s.completed(ex.task, ScsiResult(GOOD, bytes(512)), 0)
    assert lines(out) == ["TaskMgmtResponse itt=0x71 statsn=100 expcmdsn=11 maxcmdsn=18"]


def test_abort_task_of_unknown_task() -> None:
    """§11.6.1: RefCmdSN outside the window: Task does not exist (1); inside it and before the
    TMF's CmdSN: Function complete, and the CmdSN counts as received (it never runs)."""
    s = session()
    out = s.receive(TaskMgmtRequest(itt=0x72, function=1, rtt=9, refcmdsn=EXP - 1, cmdsn=EXP, immediate=True), 0)
    assert lines(out) == ["TaskMgmtResponse itt=0x72 response=1 statsn=100 expcmdsn=10 maxcmdsn=17"]
    out = s.receive(TaskMgmtRequest(itt=0x73, function=1, rtt=9, refcmdsn=EXP, cmdsn=EXP + 1, immediate=True), 0)
    assert lines(out) == ["TaskMgmtResponse itt=0x73 statsn=101 expcmdsn=11 maxcmdsn=18"]
    assert s.receive(ScsiCommand(itt=9, cdb=TEST_UNIT_READY, cmdsn=EXP), 0) == []  # late: ignored


def test_abort_task_waits_for_outstanding_r2t_bursts() -> None:
    """§4.2.3: the target waits for the Data-Out answering R2Ts of the aborted task; later
    Data-Out for it is dropped silently."""
    s = session(max_burst_length=1024)
    s.receive(ScsiCommand(itt=1, cdb=write10(2), edtl=1024, cmdsn=EXP, write=True), 0)
    out = s.receive(TaskMgmtRequest(itt=0x74, function=1, rtt=1, refcmdsn=EXP, cmdsn=EXP + 1, immediate=True), 0)
    assert lines(out) == []
    assert s.receive(DataOut(itt=1, ttt=1, data=bytes(512)), 0) == []
    out = s.receive(DataOut(itt=1, ttt=1, datasn=1, buffer_offset=512, final=True, data=bytes(512)), 0)
    assert lines(out) == ["TaskMgmtResponse itt=0x74 statsn=100 expcmdsn=11 maxcmdsn=18"]
    assert s.receive(DataOut(itt=1, ttt=1, datasn=2, buffer_offset=1024, final=True, data=b""), 0) == []
    assert s.data_out_bytes == 0


def test_lun_reset_goes_to_the_server_and_answers_after_tasks_and_tmf_done() -> None:
    s = session()
    s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP), 0)
    s.receive(ScsiCommand(itt=2, cdb=read10(1), edtl=512, cmdsn=EXP + 1, read=True), 0)
    s.receive(ScsiCommand(itt=3, cdb=TEST_UNIT_READY, cmdsn=EXP + 3), 0)  # sent after the TMF: unaffected
    out = s.receive(TaskMgmtRequest(itt=0x75, function=5, cmdsn=EXP + 2, immediate=True), 0)
    assert lines(out) == ["TaskManagement task=4 function=5 referenced=[1, 2]"]
    assert s.tmf_done(4, 0) == []
    assert s.completed(2, ScsiResult(GOOD, bytes(512)), 0) == []  # aborted: no status, ever
    assert lines(s.completed(1, ScsiResult(GOOD), 0)) == [
        "TaskMgmtResponse itt=0x75 statsn=100 expcmdsn=12 maxcmdsn=19",
    ]
    with pytest.raises(SessionUsageError):
        s.tmf_done(4, 0)
    out = s.receive(ScsiCommand(itt=4, cdb=TEST_UNIT_READY, cmdsn=EXP + 2), 0)
    assert lines(out) == ["Execute task=5 cdb=00 data_out[0]", "Execute task=3 cdb=00 data_out[0]"]


def test_lun_reset_of_a_lun_we_do_not_serve() -> None:
    s = session()
    out = s.receive(TaskMgmtRequest(itt=0x76, function=5, lun=1 << 48, cmdsn=EXP, immediate=True), 0)
    assert lines(out) == ["TaskMgmtResponse itt=0x76 response=2 statsn=100 expcmdsn=10 maxcmdsn=17"]


def test_abort_task_set_and_clear_task_set_abort_this_sessions_tasks() -> None:
    for function in (2, 4):
        s = session()
        s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP), 0)
        s.receive(ScsiCommand(itt=2, cdb=write10(1), edtl=512, cmdsn=EXP + 1, write=True), 0)  # awaiting R2T data
        out = s.receive(TaskMgmtRequest(itt=0x77, function=function, cmdsn=EXP + 2), 0)
        assert lines(out) == []
        s.receive(DataOut(itt=2, ttt=1, final=True, data=bytes(512)), 0)
        assert lines(s.completed(1, ScsiResult(GOOD), 0)) == [
            "TaskMgmtResponse itt=0x77 statsn=100 expcmdsn=13 maxcmdsn=20",
        ]


def test_target_warm_reset_keeps_the_session_and_cold_reset_closes_it() -> None:
    """§11.5.1: only TARGET COLD RESET is "a power on event, thus terminating all of its TCP
    connections"."""
    s = session()
    out = s.receive(TaskMgmtRequest(itt=0x78, function=6, cmdsn=EXP, immediate=True), 0)
    assert lines(out) == ["TaskManagement task=1 function=6 referenced=[]"]
    assert lines(s.tmf_done(1, 0)) == ["TaskMgmtResponse itt=0x78 statsn=100 expcmdsn=10 maxcmdsn=17"]
    assert not s.closed
    out = s.receive(TaskMgmtRequest(itt=0x79, function=7, cmdsn=EXP, immediate=True), 0)
    assert lines(out) == ["TaskManagement task=2 function=7 referenced=[]"]
    assert lines(s.tmf_done(2, 0)) == [
        "TaskMgmtResponse itt=0x79 statsn=101 expcmdsn=10 maxcmdsn=17",
        "Close reason='TARGET COLD RESET' logout=False",
    ]


def test_unsupported_task_management_functions() -> None:
    """CLEAR ACA: not supported (5); TASK REASSIGN at ERL 0: allegiance reassignment not
    supported (4); an undefined function: not supported (5)."""
    s = session()
    got = [pdus(s.receive(TaskMgmtRequest(itt=f, function=f, cmdsn=EXP, immediate=True), 0))[0] for f in (3, 8, 42)]
    assert [p.response for p in got if isinstance(p, TaskMgmtResponse)] == [5, 4, 5]


# ---------------------------------------------------------------- logout (§11.14, §11.15)


def test_logout_waits_for_running_tasks_then_closes() -> None:
    s = session()
    s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP), 0)
    s.receive(ScsiCommand(itt=2, cdb=TEST_UNIT_READY, cmdsn=EXP + 1), 0)
    assert s.receive(LogoutRequest(itt=0x80, cmdsn=EXP + 2, immediate=True), 0) == []
    assert s.receive(ScsiCommand(itt=3, cdb=TEST_UNIT_READY, cmdsn=EXP + 2), 0) == []  # after the logout
    assert lines(s.completed(2, ScsiResult(GOOD), 0)) == ["ScsiResponse itt=0x2 statsn=100 expcmdsn=12 maxcmdsn=18"]
    assert lines(s.completed(1, ScsiResult(GOOD), 0)) == [
        "ScsiResponse itt=0x1 statsn=101 expcmdsn=12 maxcmdsn=19",
        "LogoutResponse itt=0x80 statsn=102 expcmdsn=12 maxcmdsn=19",
        "Close reason='logout' logout=True",
    ]
    assert s.completed(1, ScsiResult(GOOD), 0) == []  # closed: ignored


def test_logout_for_recovery_is_not_supported_at_erl_0() -> None:
    s = session()
    out = s.receive(LogoutRequest(itt=0x81, reason=2, cmdsn=EXP), 0)
    assert lines(out) == ["LogoutResponse itt=0x81 response=2 statsn=100 expcmdsn=11 maxcmdsn=18"]
    assert not s.closed


def test_completions_after_close_are_ignored_and_unknown_completions_are_local_bugs() -> None:
    s = session()
    ex = only_execute(s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP), 0))
    with pytest.raises(SessionUsageError):
        s.completed(ex.task + 1, ScsiResult(GOOD), 0)
    s.close()
    assert s.completed(ex.task, ScsiResult(GOOD), 0) == [] and s.in_flight == 0


# ---------------------------------------------------------------- Reject (§11.17)


def test_snack_login_and_invalid_pdus_are_rejected() -> None:
    s = session()
    assert lines(s.receive(SnackRequest(itt=1), 0)) == ["Reject reason=4 statsn=100 expcmdsn=10 maxcmdsn=17 bhs[48]"]
    bad = bytes([0x01, 0x80]) + bytes(14) + (7).to_bytes(4, "big") + bytes(4) + EXP.to_bytes(4, "big") + bytes(20)
    out = s.receive(Invalid(bhs=bad, reason=0x09, why="reserved field set"), 0)
    assert lines(out) == ["Reject reason=9 statsn=101 expcmdsn=11 maxcmdsn=18 bhs[48]"]  # its CmdSN consumed
    rej = pdus(out)[0]
    assert isinstance(rej, Reject) and rej.bhs == bad
    out = s.receive(LoginRequest(itt=1, isid=bytes(6)), 0)
    assert [type(a).__name__ for a in out] == ["Send", "Close"]


def test_window_update_nop_in_when_a_shut_window_reopens_silently() -> None:
    """ABORT TASK SET over a running task and a write with an R2T out: the write's last burst ends
    it and frees a window slot while the TMF still waits, so nothing else would tell the
    initiator; an unsolicited NOP-In with both tags reserved carries the new MaxCmdSN (§11.19)
    without advancing StatSN."""
    s = session(cmd_window=2)
    s.receive(ScsiCommand(itt=1, cdb=TEST_UNIT_READY, cmdsn=EXP), 0)
    out = s.receive(ScsiCommand(itt=2, cdb=write10(1), edtl=512, cmdsn=EXP + 1, write=True), 0)
    assert lines(out) == ["R2T itt=0x2 ttt=0x1 statsn=100 expcmdsn=12 maxcmdsn=11 desired_length=512"]  # shut
    assert s.receive(TaskMgmtRequest(itt=0x90, function=2, cmdsn=EXP + 2, immediate=True), 0) == []
    out = s.receive(DataOut(itt=2, ttt=1, final=True, data=bytes(512)), 0)
    assert lines(out) == ["NopIn statsn=100 expcmdsn=12 maxcmdsn=12"]
    assert lines(s.completed(1, ScsiResult(GOOD), 0)) == [
        "TaskMgmtResponse itt=0x90 statsn=100 expcmdsn=12 maxcmdsn=13",
    ]


# ---------------------------------------------------------------- a model initiator


class Initiator:
    """A well-behaved initiator over one session: it numbers commands, sends immediate and
    unsolicited data as negotiated, answers R2Ts, and checks everything it receives."""

    def __init__(self, cfg: SessionConfig, rnd: random.Random) -> None:
        self.cfg = cfg
        self.rnd = rnd
        self.session = Session(cfg, expected_data_out=need, now=0.0)
        self.cmdsn = cfg.exp_cmdsn
        self.max_cmdsn = sn_add(cfg.exp_cmdsn, cfg.cmd_window - 1)
        self.statsn = cfg.statsn
        self.r2ts: list[R2T] = []
        self.written: dict[int, bytes] = {}  # itt -> payload of a write
        self.read_len: dict[int, int] = {}  # itt -> EDTL of a read
        self.read_data: dict[int, bytearray] = {}
        self.read_results: dict[int, bytes] = {}
        self.statuses: dict[int, int] = {}
        self.executing: dict[int, int] = {}  # task -> itt
        self.max_buffered = 0

    def feed(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Execute):
                itt = int.from_bytes(a.cdb[2:6], "big")  # the LBA carries the ITT
                if itt in self.written:
                    assert a.data_out == self.written[itt]
                self.executing[a.task] = itt
            elif isinstance(a, Send):
                self.check(a.pdu)
            else:
                raise AssertionError(f"unexpected {a}")
        self.max_buffered = max(self.max_buffered, self.session.data_out_bytes)
        self.session.check_invariants()

    def check(self, pdu: TargetPDU) -> None:
        assert pdu.statsn == self.statsn, pdu
        if isinstance(pdu, (ScsiResponse, TaskMgmtResponse, LogoutResponse, TextResponse)) or (
                isinstance(pdu, DataIn) and pdu.status_present) or (
                isinstance(pdu, NopIn) and pdu.itt != RESERVED_TAG):
            self.statsn = sn_add(self.statsn, 1)
        if sn_lt(self.max_cmdsn, pdu.maxcmdsn):
            self.max_cmdsn = pdu.maxcmdsn
        assert not sn_lt(pdu.maxcmdsn, sn_add(pdu.expcmdsn, -1))
        if isinstance(pdu, R2T):
            assert pdu.desired_length <= self.cfg.max_burst_length
            self.r2ts.append(pdu)
            assert sum(1 for r in self.r2ts if r.itt == pdu.itt) <= self.cfg.max_outstanding_r2t
        elif isinstance(pdu, DataIn):
            assert len(pdu.data) <= self.cfg.max_send_data_segment
            buf = self.read_data.setdefault(pdu.itt, bytearray())
            assert pdu.buffer_offset == len(buf)
            buf += pdu.data
            if pdu.status_present:
                self.status(pdu.itt, pdu.status, pdu.underflow, pdu.overflow, pdu.residual)
        elif isinstance(pdu, ScsiResponse):
            self.status(pdu.itt, pdu.status, pdu.underflow, pdu.overflow, pdu.residual)
        else:
            raise AssertionError(f"unexpected {pdu}")

    def status(self, itt: int, status: int, under: bool, over: bool, residual: int) -> None:
        assert itt not in self.statuses, f"second status for {itt:#x}"
        self.statuses[itt] = status
        if itt in self.read_len:
            edtl, result = self.read_len[itt], self.read_results[itt]
            assert bytes(self.read_data.get(itt, b"")) == result[:edtl]
            assert (under, over, residual) == (len(result) < edtl, len(result) > edtl, abs(len(result) - edtl))

    def can_send(self) -> bool:
        return sn_in_window(self.cmdsn, self.cmdsn, self.max_cmdsn)

    def send_read(self, itt: int, blocks: int, edtl: int) -> None:
        self.read_len[itt] = edtl
        self.command(ScsiCommand(itt=itt, cdb=cdb10(0x28, itt, blocks), edtl=edtl, read=True, cmdsn=self.cmdsn))

    def send_write(self, itt: int, blocks: int) -> None:
        cfg = self.cfg
        payload = self.rnd.randbytes(blocks * BLOCK)
        self.written[itt] = payload
        unsolicited = 0 if cfg.initial_r2t else min(len(payload), cfg.first_burst_length)
        immediate = min(len(payload), cfg.first_burst_length, cfg.max_recv_data_segment) if cfg.immediate_data else 0
        more = max(unsolicited - immediate, 0)
        self.command(ScsiCommand(itt=itt, cdb=cdb10(0x2A, itt, blocks), edtl=len(payload), write=True,
                                 final=more == 0, cmdsn=self.cmdsn, data=payload[:immediate]))
        for n, off in enumerate(range(immediate, immediate + more, cfg.max_recv_data_segment)):
            end = min(off + cfg.max_recv_data_segment, immediate + more)
            self.feed(self.session.receive(DataOut(itt=itt, datasn=n, buffer_offset=off, final=end == immediate + more,
                                                   data=payload[off:end]), 0))

    def command(self, cmd: ScsiCommand) -> None:
        self.cmdsn = sn_add(self.cmdsn, 1)
        self.feed(self.session.receive(cmd, 0))

    def answer_r2t(self) -> None:
        r2t = self.r2ts.pop(self.rnd.randrange(len(self.r2ts)))
        payload = self.written[r2t.itt][r2t.buffer_offset:r2t.buffer_offset + r2t.desired_length]
        for d in data_outs(r2t.itt, r2t.ttt, r2t.buffer_offset, payload, self.cfg.max_recv_data_segment):
            self.feed(self.session.receive(d, 0))

    def complete(self) -> None:
        task = self.rnd.choice(sorted(self.executing))
        itt = self.executing.pop(task)
        result = ScsiResult(GOOD)
        if itt in self.read_len:
            result = ScsiResult(GOOD, self.rnd.randbytes(self.rnd.choice([0, 100, self.read_len[itt], 3000])))
            self.read_results[itt] = result.data
        self.feed(self.session.completed(task, result, 0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), seg=st.sampled_from([512, 1024, 8192]),
       send_seg=st.sampled_from([512, 4096]), burst=st.sampled_from([512, 1536, 4096]),
       first=st.sampled_from([512, 1024, 4096]), initial_r2t=st.booleans(), immediate_data=st.booleans(),
       outstanding=st.integers(1, 4), window=st.integers(1, 6), budget=st.sampled_from([1024, 8192, 64 << 20]))
def test_model_initiator_every_byte_arrives_and_every_command_gets_one_status(
        seed: int, seg: int, send_seg: int, burst: int, first: int, initial_r2t: bool, immediate_data: bool,
        outstanding: int, window: int, budget: int) -> None:
    print(f"seed={seed}")
    rnd = random.Random(seed)
    cfg = config(max_recv_data_segment=seg, max_send_data_segment=send_seg, max_burst_length=burst,
                 first_burst_length=min(first, burst), initial_r2t=initial_r2t, immediate_data=immediate_data,
                 max_outstanding_r2t=outstanding, cmd_window=window, data_out_budget_bytes=budget,
                 exp_cmdsn=rnd.choice([EXP, 0xFFFFFFFD]))
    ini = Initiator(cfg, rnd)
    todo = list(range(1, 25))
    for _ in range(10_000):
        choices: list[Callable[[], None]] = []
        if todo and ini.can_send():
            choices.append(lambda: ini.send_write(todo.pop(0), rnd.randint(1, 12)) if rnd.random() < 0.6
                           else ini.send_read(todo.pop(0), rnd.randint(1, 8), rnd.choice([512, 2048, 4096])))
        if ini.r2ts:
            choices.append(ini.answer_r2t)
        if ini.executing:
            choices.append(ini.complete)
        if not choices:
            break
        rnd.choice(choices)()
    assert not todo and not ini.executing and not ini.r2ts
    assert sorted(ini.statuses) == list(range(1, 25))
    assert set(ini.statuses.values()) == {GOOD}
    assert ini.session.in_flight == 0 and ini.session.data_out_bytes == 0
    if budget >= 64 << 10:
        assert ini.max_buffered <= budget


# ---------------------------------------------------------------- hypothesis fuzz


TAGS = st.sampled_from([1, 2, 3, 7, RESERVED_TAG])
U32 = st.one_of(st.integers(0, 16), st.sampled_from([0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]))
LENGTHS = st.sampled_from([0, 1, 511, 512, 513, 1024, 4096, MAX_TRANSFER_BYTES, MAX_TRANSFER_BYTES + 1,
                           0xFFFFFFFF])
CDBS = st.sampled_from([read10(1), read10(8), write10(1), write10(2), write10(8), INQUIRY, TEST_UNIT_READY,
                        UNKNOWN_OPCODE, b"", b"\x2a"])
DATA = st.one_of(st.just(b""), st.binary(max_size=64), st.integers(0, 2100).map(bytes))
TEXT = st.sampled_from([b"", b"SendTargets=All\x00", b"SendTargets=\x00", b"SendTargets=iqn.x\x00", b"Foo=bar\x00",
                        b"\xff\xfe=\x00", b"novalue\x00", b"A=" + b"x" * 600 + b"\x00"])


@st.composite
def initiator_pdus(draw: st.DrawFn, exp_cmdsn: int, window: int, ttts: Sequence[int]) -> InitiatorPDU | Invalid:
    """Plausible (mostly) and absurd PDUs of every InitiatorPDU type; CmdSNs mostly near ExpCmdSN,
    sometimes anywhere; Data-Out TTTs mostly of R2Ts the session really sent."""
    near = st.integers(-2, window + 2).map(lambda d: sn_add(exp_cmdsn, d))
    cmdsn = draw(st.one_of(st.just(exp_cmdsn), st.just(exp_cmdsn), near, U32))
    kind = draw(st.sampled_from(["scsi"] * 5 + ["data"] * 4 + ["nop", "nop", "text", "tmf", "tmf", "logout",
                                                               "snack", "login", "invalid"]))
    immediate = draw(st.sampled_from([False, False, False, True]))
    if kind == "scsi":
        itt, lun, attr = draw(TAGS), draw(st.sampled_from([0, 0, 1 << 48])), draw(st.integers(0, 7))
        shape = draw(st.sampled_from(["read", "write", "write", "absurd"]))
        if shape == "read":
            blocks = draw(st.integers(1, 8))
            return ScsiCommand(itt=itt, cdb=read10(blocks), edtl=draw(st.sampled_from([blocks * 512, 512, 4096])),
                               cmdsn=cmdsn, lun=lun, immediate=immediate, read=True, attr=attr)
        if shape == "write":
            blocks = draw(st.integers(1, 8))
            edtl = draw(st.sampled_from([blocks * 512, blocks * 512, 512, 4096]))
            immediate_bytes = draw(st.sampled_from([0, 0, 512, 1024]))
            return ScsiCommand(itt=itt, cdb=write10(blocks), edtl=edtl, cmdsn=cmdsn, lun=lun, immediate=immediate,
                               write=True, final=draw(st.sampled_from([True, True, False])), attr=attr,
                               data=bytes(min(immediate_bytes, edtl)))
        return ScsiCommand(itt=itt, cdb=draw(CDBS), edtl=draw(LENGTHS), cmdsn=cmdsn, lun=lun, immediate=immediate,
                           final=draw(st.booleans()), read=draw(st.booleans()), write=draw(st.booleans()), attr=attr,
                           bidi_read_length=draw(st.sampled_from([None, 512])), data=draw(DATA))
    if kind == "data":
        ttt = draw(st.one_of(st.sampled_from(list(ttts) or [1]), st.just(RESERVED_TAG), st.integers(1, 8)))
        return DataOut(itt=draw(TAGS), ttt=ttt, datasn=draw(st.integers(0, 4)),
                       buffer_offset=draw(st.sampled_from([0, 512, 1024, 1536, 4096, 7])),
                       final=draw(st.booleans()), data=draw(st.one_of(st.just(bytes(512)), DATA)))
    if kind == "nop":
        return NopOut(itt=draw(TAGS), ttt=draw(st.one_of(st.integers(1, 8), st.just(RESERVED_TAG))), cmdsn=cmdsn,
                      immediate=immediate, data=draw(DATA))
    if kind == "text":
        return TextRequest(itt=draw(TAGS), ttt=draw(st.one_of(st.integers(1, 8), st.just(RESERVED_TAG))),
                           cmdsn=cmdsn, immediate=immediate, final=draw(st.booleans()), cont=draw(st.booleans()),
                           data=draw(TEXT))
    if kind == "tmf":
        return TaskMgmtRequest(itt=draw(TAGS), function=draw(st.integers(0, 9)), rtt=draw(TAGS), cmdsn=cmdsn,
                               refcmdsn=draw(st.integers(-2, window).map(lambda d: sn_add(exp_cmdsn, d))),
                               lun=draw(st.sampled_from([0, 0, 1 << 48])), immediate=immediate)
    if kind == "logout":
        return LogoutRequest(itt=draw(TAGS), reason=draw(st.integers(0, 4)), cmdsn=cmdsn, immediate=immediate)
    if kind == "snack":
        return SnackRequest(itt=draw(TAGS), type=draw(st.integers(0, 3)))
    if kind == "login":
        return LoginRequest(itt=draw(TAGS), isid=bytes(6))
    return Invalid(bhs=draw(st.binary(min_size=48, max_size=48)), reason=draw(st.sampled_from([4, 5, 9])), why="fuzz")


class SessionFuzz(RuleBasedStateMachine):
    """Random PDUs, completions, TMF completions and ticks against the session's invariants. A
    Close starts a new connection, so a run covers several sessions."""

    def __init__(self) -> None:
        super().__init__()
        self.s: Session
        self.cfg: SessionConfig
        self.statsn = STAT
        self.max_cmdsn = 0
        self.executing: list[int] = []
        self.tmfs: list[int] = []
        self.r2ts: list[R2T] = []
        self.allowed_statuses: dict[int, int] = {}  # ITT -> statuses a sent SCSI Command still allows
        self.now = 0.0

    @initialize(window=st.integers(1, 6), budget=st.sampled_from([600, 4096, 64 << 20]),
                initial_r2t=st.booleans(), immediate_data=st.booleans(), outstanding=st.integers(1, 3),
                discovery=st.sampled_from([False, False, False, True]), exp=st.sampled_from([EXP, 0xFFFFFFFE]))
    def start(self, window: int, budget: int, initial_r2t: bool, immediate_data: bool, outstanding: int,
              discovery: bool, exp: int) -> None:
        self.cfg = config(cmd_window=window, data_out_budget_bytes=budget, initial_r2t=initial_r2t,
                          immediate_data=immediate_data, max_outstanding_r2t=outstanding, discovery=discovery,
                          max_recv_data_segment=1024, max_burst_length=1024, first_burst_length=1024,
                          exp_cmdsn=exp, targets=targets)
        self.connect()

    def connect(self) -> None:
        self.s = Session(self.cfg, expected_data_out=need, now=self.now)
        self.statsn = self.cfg.statsn
        self.max_cmdsn = sn_add(self.cfg.exp_cmdsn, self.cfg.cmd_window - 1)
        self.executing.clear()
        self.tmfs.clear()
        self.r2ts.clear()
        self.allowed_statuses.clear()

    def take(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            event(type(a.pdu).__name__ if isinstance(a, Send) else type(a).__name__)
            if isinstance(a, Execute):
                self.executing.append(a.task)
            elif isinstance(a, TaskManagement):
                self.tmfs.append(a.task)
            elif isinstance(a, Send):
                p = a.pdu
                assert p.statsn == self.statsn, (p, self.statsn)
                if not isinstance(p, R2T) and not (isinstance(p, DataIn) and not p.status_present) and not (
                        isinstance(p, NopIn) and p.itt == RESERVED_TAG):
                    self.statsn = sn_add(self.statsn, 1)
                assert not sn_lt(p.maxcmdsn, self.max_cmdsn), "MaxCmdSN went backwards"
                self.max_cmdsn = p.maxcmdsn
                assert ((p.maxcmdsn - p.expcmdsn + 1) & 0xFFFFFFFF) <= self.cfg.cmd_window
                if isinstance(p, (DataIn, TextResponse, NopIn)):
                    assert len(p.data) <= self.cfg.max_send_data_segment
                if isinstance(p, R2T):
                    assert 0 < p.desired_length <= self.cfg.max_burst_length
                    self.r2ts = (self.r2ts + [p])[-8:]
                if isinstance(p, ScsiResponse) or (isinstance(p, DataIn) and p.status_present):
                    left = self.allowed_statuses.get(p.itt, 0)
                    assert left > 0, f"status for ITT {p.itt:#x} that no command asked for"
                    self.allowed_statuses[p.itt] = left - 1
        closes = [i for i, a in enumerate(actions) if isinstance(a, Close)]
        assert not closes or closes == [len(actions) - 1], "nothing may follow a Close"
        if self.s.closed:
            assert closes, "closed without a Close action"
            self.s.check_invariants()
            self.s.close()
            self.connect()  # the initiator logs in again
        return actions

    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        pdu = data.draw(initiator_pdus(self.s.exp_cmdsn, self.cfg.cmd_window, [r.ttt for r in self.r2ts]))
        if isinstance(pdu, ScsiCommand):
            self.allowed_statuses[pdu.itt] = self.allowed_statuses.get(pdu.itt, 0) + 1
        self.take(self.s.receive(pdu, self.now))

    @precondition(lambda self: bool(self.r2ts))
    @rule(data=st.data())
    def answer_r2t(self, data: st.DataObject) -> None:
        """A correct answer to an R2T the session sent (it may have ended since: then it is late)."""
        r2t = self.r2ts.pop(data.draw(st.integers(0, len(self.r2ts) - 1)))
        for d in data_outs(r2t.itt, r2t.ttt, r2t.buffer_offset, bytes(r2t.desired_length),
                           self.cfg.max_recv_data_segment):
            self.take(self.s.receive(d, self.now))

    @precondition(lambda self: bool(self.executing))
    @rule(data=st.data(), status=st.sampled_from([GOOD, CHECK_CONDITION, 0x08]), size=st.sampled_from([0, 36, 3000]))
    def complete(self, data: st.DataObject, status: int, size: int) -> None:
        task = self.executing.pop(data.draw(st.integers(0, len(self.executing) - 1)))
        sense = UNIT_ATTENTION_LIKE if status == CHECK_CONDITION else b""
        out = self.take(self.s.completed(task, ScsiResult(status, bytes(size), sense), self.now))
        statuses = [a for a in out if isinstance(a, Send) and (isinstance(a.pdu, ScsiResponse) or (
            isinstance(a.pdu, DataIn) and a.pdu.status_present))]
        assert len(statuses) <= 1

    @precondition(lambda self: bool(self.tmfs))
    @rule()
    def tmf_done(self) -> None:
        self.take(self.s.tmf_done(self.tmfs.pop(0), self.now))

    @rule(dt=st.sampled_from([0.5, 0.5, 10.0, 31.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.take(self.s.tick(self.now))

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "s"):
            return
        self.s.check_invariants()
        assert self.s.in_flight <= self.cfg.cmd_window + IMMEDIATE_TASKS_MAX


SessionFuzz.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_session_fuzz = SessionFuzz.TestCase


def test_fuzz_pdus_whole_and_replayed_never_raise() -> None:
    """A seeded plain-random soak (prints its seed): many PDUs in a row, no hypothesis shrinking."""
    seed = random.randrange(1 << 32)
    print(f"seed={seed}")
    rnd = random.Random(seed)
    s = Session(config(initial_r2t=False, max_outstanding_r2t=2, cmd_window=4, data_out_budget_bytes=2048),
                expected_data_out=need, now=0.0)
    executing: list[int] = []
    for step in range(3000):
        r = rnd.random()
        if r < 0.15 and executing:
            s.completed(executing.pop(rnd.randrange(len(executing))), ScsiResult(GOOD, bytes(rnd.choice([0, 600]))),
                        step)
            continue
        cmdsn = sn_add(s.exp_cmdsn, rnd.randint(-1, 4))
        itt = rnd.choice([1, 2, 3, 4])
        choices: list[InitiatorPDU] = [
            ScsiCommand(itt=itt, cdb=write10(rnd.randint(1, 4)), edtl=rnd.choice([512, 1024, 2048]), cmdsn=cmdsn,
                        write=True, final=rnd.random() < 0.5, data=bytes(rnd.choice([0, 512]))),
            ScsiCommand(itt=itt, cdb=read10(1), edtl=512, cmdsn=cmdsn, read=True),
            DataOut(itt=itt, ttt=rnd.choice([RESERVED_TAG, 1, 2, 3, 4, 5]), datasn=rnd.randint(0, 1),
                    buffer_offset=rnd.choice([0, 512, 1024]), final=rnd.random() < 0.5, data=bytes(512)),
            TaskMgmtRequest(itt=9, function=rnd.randint(1, 6), rtt=itt, cmdsn=cmdsn, immediate=True),
        ]
        pdu = rnd.choice(choices)
        pending = s.receive(pdu, step)
        while pending:
            a = pending.pop(0)
            if isinstance(a, Execute):
                executing.append(a.task)
            elif isinstance(a, TaskManagement):
                pending += s.tmf_done(a.task, step)
        s.check_invariants()
        if s.closed:
            s = Session(config(initial_r2t=False, max_outstanding_r2t=2, cmd_window=4, data_out_budget_bytes=2048),
                        expected_data_out=need, now=step)
            executing = []


def test_reject_without_adapter_header_carries_a_stub_naming_the_pdu() -> None:
    s = session()
    out = s.receive(replace(SnackRequest(itt=0x1234), type=1), 0)
    rej = pdus(out)[0]
    assert isinstance(rej, Reject) and len(rej.bhs) == 48 and rej.bhs[0] == 0x10 and rej.bhs[16:20] == bytes(
        [0, 0, 0x12, 0x34])
