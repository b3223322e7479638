"""The full feature phase of one iSCSI connection, which at MaxConnections=1 is one session (RFC 7143).

This file owns the state machine of a session after login, and does no I/O: the
asyncio server hands it decoded PDUs, SCSI completions and clock ticks, and gets
back a list of actions (send this PDU, execute this CDB, reset this LU, close).
ErrorRecoveryLevel is 0, so every error the initiator can cause ends in a Reject,
a SCSI status, or a closed connection; nothing is retransmitted.

Theory of operation.

Command numbering (RFC 7143 §3.2.2.1). Every non-immediate command (SCSI Command,
NOP-Out with a valid ITT, Task Management, Text, Logout) carries a CmdSN and is
delivered in CmdSN order: one that arrives ahead of a gap is held in `_held` until
the gap fills. A non-immediate command outside [ExpCmdSN, MaxCmdSN] (serial
arithmetic, RFC 1982) or a duplicate of one already held is silently ignored, as
§3.2.2.1 requires. Immediate commands (I bit) are processed at once and do not
move ExpCmdSN. A command this session refuses with a Reject still consumes its
CmdSN, so the window never stalls behind it. MaxCmdSN is ExpCmdSN - 1 + cmd_window
minus the tasks the window still holds (delivered, unfinished SCSI tasks and
pending task management requests), so at most cmd_window of them exist at once;
it never moves backwards (an initiator ignores a smaller MaxCmdSN, §3.2.2.1) and it
stops opening while the session's Data-Out buffers are over budget.

Status numbering (§3.2.2.2). Every PDU carries the current StatSN, ExpCmdSN and
MaxCmdSN (`_send` stamps them); StatSN advances after each PDU that carries status:
SCSI Response, Data-In with the S bit, Task Management/Text/Logout Response,
Reject, and a NOP-In answering a ping. R2T (§11.8), Data-In without status
(§11.7) and a target-initiated NOP-In (ITT 0xffffffff, §11.19) carry it without
advancing it.

A SCSI task moves through the phases in `_TASK_TRANSITIONS`: HELD (waiting for its
CmdSN turn), UNSOLICITED (delivered; immediate data came with the command and
unsolicited Data-Out may still follow, §11.7, when InitialR2T=No), QUEUED (waiting
for Data-Out budget to solicit the rest), TRANSFER (R2Ts outstanding, at most
MaxOutstandingR2T, each at most MaxBurstLength, §11.8), EXECUTING (an Execute
action is out; the server calls `completed`), DONE. Immediate and unsolicited
data may arrive while the task is still HELD, so tasks are registered by ITT on
arrival, not on delivery. With DataPDUInOrder=Yes and DataSequenceInOrder=Yes
every burst arrives in order: each Data-Out must continue its burst exactly
(offset, DataSN), stay inside it, and set F on its last PDU; a Data-Out that
breaks this is a protocol error and the connection closes (ERL 0 cannot recover
a data stream). One that names an unknown ITT or TTT is rejected and ignored.

Data-Out budget. Unsolicited data cannot be refused (the initiator sends it on
its own, up to FirstBurstLength per command), so it is charged as it arrives.
Solicited data is charged when a task is admitted to TRANSFER, for its whole
remaining length at once, so an admitted task never waits for budget again and
two half-transferred tasks can never starve each other. Tasks are admitted in
arrival order while the charge fits the budget; the head task is admitted
regardless when no admitted (TRANSFER or EXECUTING) task holds budget, because
then nothing else could ever free it. A task's charge is released when it ends.

Reads. The result is cut to the Expected Data Transfer Length and sent as Data-In
PDUs of at most MaxRecvDataSegmentLength (the initiator's) bytes, in sequences of
at most MaxBurstLength with F on the last PDU of each (§11.7); a GOOD result
without sense rides in the last Data-In (S bit, phase collapse, §11.7); anything
else gets a separate SCSI Response with the sense (§11.4). Residuals follow
§11.4.5: Underflow when less than EDTL moved, Overflow when the command wanted
more, Residual Count the difference. For writes the command's need (what the LU
says the CDB transfers) is compared against EDTL.

Task management (§11.5, §4.2.3). Aborting a task that is not executing ends it
at once; an executing one is marked and the response waits for its completion,
whose result is discarded: no status is ever sent for an aborted task, and the
TMF response always follows everything the aborted tasks sent. A task with R2Ts
outstanding is waited for until each such burst ends (the initiator keeps
answering R2Ts of aborted tasks, §4.2.3). LUN RESET and TARGET WARM/COLD RESET
also go to the server (a TaskManagement action) and wait for `tmf_done`. The
standard multi-task abort semantics (§4.2.3) also have the target wait for the
initiator to acknowledge (ExpStatSN) every status sent before the TMF response;
with one connection over TCP the response already follows those statuses in
the byte stream, so that wait is not implemented.

Logout (§11.14): tasks not yet executing end at once (ERL 0 ends every task of a
closing session), executing ones finish and are answered, then come the Logout
Response and Close(logout=True); commands after a Logout Request are ignored.
Pings (§11.19): after nop_interval_s with nothing received, a NOP-In with a TTT
asks for an echo; none within nop_timeout_s closes the connection.

Faults: `RemoteProtocolError` is the initiator's fault and becomes a Reject
(and a Close when the connection cannot go on); `SessionUsageError` is the
server adapter's bug and propagates. Nothing the initiator sends may raise out
of `receive`.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NoReturn

from iscsi.pdu import (
    OP_DATA_OUT,
    OP_LOGIN_REQ,
    OP_LOGOUT_REQ,
    OP_NOP_OUT,
    OP_SCSI_CMD,
    OP_SNACK_REQ,
    OP_TASK_MGMT_REQ,
    OP_TEXT_REQ,
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
from iscsi.types import CHECK_CONDITION, GOOD, MAX_TRANSFER_BYTES, Nexus, ScsiResult

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- protocol constants

SN_MASK = 0xFFFFFFFF  # sequence numbers are unsigned 32-bit (RFC 7143 §3.2.2.1)
_SN_HALF = 1 << 31  # RFC 1982 serial comparison is defined within half the space

# Reject reasons (RFC 7143 §11.17.1).
REJECT_PROTOCOL_ERROR = 0x04
REJECT_COMMAND_NOT_SUPPORTED = 0x05
REJECT_IMMEDIATE_COMMAND = 0x06  # "too many immediate commands"
REJECT_TASK_IN_PROGRESS = 0x07
REJECT_INVALID_PDU_FIELD = 0x09

# Task management functions (§11.5.1) and responses (§11.6.1).
TMF_ABORT_TASK = 1
TMF_ABORT_TASK_SET = 2
TMF_CLEAR_ACA = 3
TMF_CLEAR_TASK_SET = 4
TMF_LUN_RESET = 5
TMF_TARGET_WARM_RESET = 6
TMF_TARGET_COLD_RESET = 7
TMF_TASK_REASSIGN = 8
TMF_RSP_COMPLETE = 0
TMF_RSP_NO_TASK = 1
TMF_RSP_NO_LUN = 2
TMF_RSP_REASSIGN_NOT_SUPPORTED = 4
TMF_RSP_NOT_SUPPORTED = 5

# Logout reasons (§11.14) and responses (§11.15.1).
LOGOUT_CLOSE_SESSION = 0
LOGOUT_CLOSE_CONNECTION = 1
LOGOUT_REMOVE_FOR_RECOVERY = 2
LOGOUT_RSP_OK = 0
LOGOUT_RSP_RECOVERY_NOT_SUPPORTED = 2

# floe serves one LU per target, LUN 0 (DESIGN.md §7); LUN fields are the raw
# 8-byte structure (iscsi/pdu.py), and LUN 0 is 0 in every addressing method.
LUN_ZERO = 0

# ---------------------------------------------------------------- bounds

# The largest cmd_window accepted. Every window slot may hold a task plus up to
# FirstBurstLength of unsolicited data, so the window is this session's memory
# bound; 4096 is 32 times the default and far inside RFC 1982's half space.
CMD_WINDOW_MAX = 4096

# Immediate SCSI commands in progress at once, outside the CmdSN window. RFC 7143
# §3.2.2.1 makes a target take at least one immediate non-TMF request per
# connection; open-iscsi sends none, so a handful is generous. More: Reject 0x06.
IMMEDIATE_TASKS_MAX = 4

# Immediate task management requests pending at once (§3.2.2.1 asks for one).
IMMEDIATE_TMFS_MAX = 4

# A Text Response in all its Continue PDUs (SendTargets=All for every portal of
# every node of a cluster is a few KiB); bounds what one request can make us hold.
TEXT_RESPONSE_BYTES_MAX = 64 << 10

# The text of one Text Request across its C-bit PDUs. RFC 7143 §6.1 limits keys
# to 63 bytes and most values to 255, and SendTargets is the one key we answer.
TEXT_REQUEST_BYTES_MAX = 8 << 10

# key=value pairs in one Text Request.
TEXT_KEYS_MAX = 64

# ITTs of tasks ended while the initiator may still send Data-Out for them
# (aborted, dropped at logout, answered early): their late Data-Out is dropped
# silently instead of rejected. Twice the default window of aborted tasks.
DISCARDED_ITTS_MAX = 256

# Per-PDU data segment limits RFC 7143 §13.12 allows (512 to 2**24 - 1), also
# used for MaxBurstLength/FirstBurstLength (§13.13, §13.14).
_SEGMENT_BYTES_MIN = 512
_SEGMENT_BYTES_MAX = (1 << 24) - 1

# RFC 7143 keys (§13) a Text Request may name in full feature phase. We
# renegotiate none of them: each gets "Reject" (§6.2); other keys "NotUnderstood".
_KNOWN_TEXT_KEYS = frozenset({
    "HeaderDigest", "DataDigest", "MaxConnections", "TargetName", "InitiatorName", "TargetAlias",
    "InitiatorAlias", "TargetAddress", "TargetPortalGroupTag", "InitialR2T", "ImmediateData",
    "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait",
    "DefaultTime2Retain", "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder",
    "ErrorRecoveryLevel", "SessionType", "AuthMethod", "TaskReporting", "iSCSIProtocolLevel",
    "OFMarker", "IFMarker", "OFMarkInt", "IFMarkInt",
})


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """Fixed-format sense data, current error (SPC-4 §4.5.3): 18 bytes, response code 70h."""
    return bytes([0x70, 0, key & 0x0F, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


# ILLEGAL REQUEST (5h), INVALID FIELD IN CDB (24h/00h): what SPC-4 names for a
# transfer longer than the target takes and for a bidirectional command.
SENSE_INVALID_FIELD_IN_CDB = fixed_sense(0x05, 0x24, 0x00)


# ---------------------------------------------------------------- serial arithmetic (RFC 1982)


def sn_add(sn: int, n: int) -> int:
    return (sn + n) & SN_MASK


def sn_lt(a: int, b: int) -> bool:
    """a < b in 32-bit serial arithmetic (RFC 1982 §3.2); undefined (False) at distance 2**31."""
    d = (b - a) & SN_MASK
    return 0 < d < _SN_HALF


def sn_in_window(sn: int, lo: int, hi: int) -> bool:
    """lo <= sn <= hi, the window being empty when hi == lo - 1 (RFC 7143 §3.2.2.1)."""
    width = (hi - lo + 1) & SN_MASK
    if width >= _SN_HALF:
        return False
    return ((sn - lo) & SN_MASK) < width


# ---------------------------------------------------------------- configuration and actions


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What the login phase settled for this session (RFC 7143 §13 keys) and local limits."""

    nexus: Nexus  # the I_T nexus
    discovery: bool  # SessionType=Discovery: only Text (SendTargets), NOP-Out and Logout
    exp_cmdsn: int  # from the login phase
    statsn: int  # the StatSN of the first full-feature-phase response
    max_send_data_segment: int  # the initiator's MaxRecvDataSegmentLength: our PDUs' data limit
    max_recv_data_segment: int  # ours: the initiator's PDUs may carry this much
    max_burst_length: int
    first_burst_length: int
    initial_r2t: bool
    immediate_data: bool
    max_outstanding_r2t: int
    cmd_window: int = 128  # MaxCmdSN - ExpCmdSN + 1; open-iscsi queues 128 commands per session by default
    data_out_budget_bytes: int = 64 << 20  # Data-Out bytes buffered per session (R2Ts wait for room)
    nop_interval_s: float = 10.0  # ping an initiator idle this long; 0 disables pings
    nop_timeout_s: float = 30.0  # close when a ping has no echo this long
    # SendTargets: (target name, ["host:port,tpgt", ...]) for every target this initiator may see.
    targets: Callable[[], list[tuple[str, list[str]]]] | None = None

    def __post_init__(self) -> None:
        """Raise ValueError for a configuration the session cannot run with (a local bug)."""
        if not 1 <= self.cmd_window <= CMD_WINDOW_MAX:
            raise ValueError(f"cmd_window {self.cmd_window} outside 1..{CMD_WINDOW_MAX}")
        for name in ("max_send_data_segment", "max_recv_data_segment", "max_burst_length",
                     "first_burst_length"):
            value = getattr(self, name)
            if not _SEGMENT_BYTES_MIN <= value <= _SEGMENT_BYTES_MAX:
                raise ValueError(f"{name} {value} outside RFC 7143's {_SEGMENT_BYTES_MIN}..{_SEGMENT_BYTES_MAX}")
        if self.first_burst_length > self.max_burst_length:
            raise ValueError("FirstBurstLength exceeds MaxBurstLength (RFC 7143 §13.14)")
        if not 1 <= self.max_outstanding_r2t <= 65535:
            raise ValueError(f"max_outstanding_r2t {self.max_outstanding_r2t} outside 1..65535 (RFC 7143 §13.17)")
        if self.data_out_budget_bytes < 1:
            raise ValueError("data_out_budget_bytes must be positive")
        if self.nop_timeout_s <= 0:
            raise ValueError("nop_timeout_s must be positive")


@dataclass(frozen=True, slots=True)
class Send:
    """Send this PDU (sequence numbers already stamped), in list order."""

    pdu: TargetPDU


@dataclass(frozen=True, slots=True)
class Execute:
    """Run a CDB on the LU (in a worker thread) and call `Session.completed(task, result)`.

    lun is the raw 8-byte LUN field (SAM-5 §4.7) as iscsi/pdu.py carries it; data_out
    holds the Data-Out bytes received for the command, cut to what the CDB needs."""

    task: int
    lun: int
    cdb: bytes
    data_out: bytes


@dataclass(frozen=True, slots=True)
class TaskManagement:
    """Perform a LUN RESET / TARGET WARM RESET / TARGET COLD RESET (function, RFC 7143 §11.5.1)
    on the LU(s), then call `Session.tmf_done(task)`. referenced lists the ids of this
    session's executing tasks that the function aborts; their completions are still
    expected (and discarded)."""

    task: int
    function: int
    lun: int
    referenced: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after sending every action before this one; then call Session.close().
    logout: the initiator logged out (a clean end), not an error."""

    reason: str
    logout: bool = False


Action = Send | Execute | TaskManagement | Close


# ---------------------------------------------------------------- errors


class RemoteProtocolError(Exception):
    """The initiator broke RFC 7143: answer with Reject(reason); close when the connection cannot go on."""

    def __init__(self, reason: int, why: str, *, close: bool = False) -> None:
        super().__init__(why)
        self.reason = reason
        self.why = why
        self.close = close


class SessionUsageError(Exception):
    """The server adapter called the session wrongly (a local bug): completing a task that is not
    executing, finishing a TMF that waits for nothing."""


class SessionInvariantError(Exception):
    """A broken internal invariant: a bug here. Stop rather than answer wrongly."""


# ---------------------------------------------------------------- task state


class Phase(enum.Enum):
    HELD = "held"  # arrived ahead of its CmdSN turn (§3.2.2.1)
    UNSOLICITED = "unsolicited"  # delivered; unsolicited Data-Out may still come
    QUEUED = "queued"  # waiting for Data-Out budget before soliciting the rest
    TRANSFER = "transfer"  # R2Ts outstanding (§11.8)
    EXECUTING = "executing"  # Execute is out
    DONE = "done"


class Event(enum.Enum):
    DELIVER = "deliver"
    UNSOLICITED_DONE = "unsolicited_done"
    ADMIT = "admit"
    DATA_DONE = "data_done"
    FINISH = "finish"  # completed, aborted, failed here, or dropped at logout


_LIVE = (Phase.HELD, Phase.UNSOLICITED, Phase.QUEUED, Phase.TRANSFER, Phase.EXECUTING)

_TASK_TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.HELD, Event.DELIVER): Phase.UNSOLICITED,
    (Phase.UNSOLICITED, Event.UNSOLICITED_DONE): Phase.QUEUED,
    (Phase.QUEUED, Event.ADMIT): Phase.TRANSFER,
    (Phase.TRANSFER, Event.DATA_DONE): Phase.EXECUTING,
    **{(phase, Event.FINISH): Phase.DONE for phase in _LIVE},
}


@dataclass(slots=True, eq=False)
class _Burst:
    """One R2T's data sequence (§11.8): Data-Out must fill [next_offset, end) in order."""

    end: int
    next_offset: int
    datasn: int = 0


@dataclass(slots=True, eq=False)
class _Task:
    id: int
    itt: int
    lun: int
    cdb: bytes
    cmdsn: int
    immediate: bool
    read: bool
    write: bool
    edtl: int
    need: int | None  # Data-Out bytes the CDB needs (the LU says); None: unknown opcode
    xfer_len: int  # Data-Out bytes we keep and solicit: min(EDTL, need), 0 when not writing
    unsol_limit: int  # the unsolicited stream may reach min(EDTL, FirstBurstLength) (§13.14)
    failure: bytes | None  # sense of a CHECK CONDITION decided here without executing
    unsol_open: bool  # F was 0 on the command and no unsolicited Data-Out with F yet
    stream_offset: int  # bytes of the unsolicited stream (immediate data included) seen
    buffer: bytearray  # kept Data-Out bytes: a prefix until admission, then xfer_len long
    phase: Phase = Phase.HELD
    unsol_datasn: int = 0
    charged: int = 0  # bytes charged against the session's Data-Out budget
    solicited: int = 0  # of which reserved at admission for R2T-solicited data
    r2t_offset: int = 0  # where the next R2T starts
    r2tsn: int = 0
    bursts: dict[int, _Burst] = field(default_factory=dict)  # by TTT
    aborted: bool = False
    in_window: bool = False  # counts against cmd_window (delivered, non-immediate)
    waiters: set[int] = field(default_factory=set)  # ids of TMFs waiting for this task to end


@dataclass(slots=True, eq=False)
class _PendingTmf:
    id: int
    itt: int
    response: int
    immediate: bool
    waiting: set[int] = field(default_factory=set)  # task ids still to end
    server_pending: bool = False  # TaskManagement action out, tmf_done not yet called
    close_after: bool = False


@dataclass(frozen=True, slots=True)
class _HeldPdu:
    """A non-SCSI command waiting for its CmdSN turn, with its header for a later Reject."""

    pdu: NopOut | TextRequest | TaskMgmtRequest | LogoutRequest
    bhs: bytes


_Held = _Task | _HeldPdu | None  # None: a consumed CmdSN (refused, aborted, or TMF RefCmdSN)


@dataclass(slots=True, eq=False)
class _TextExchange:
    """One Text Request/Response exchange (§11.10, §11.11) spread over C-bit PDUs either way."""

    itt: int
    ttt: int = RESERVED_TAG
    request: bytearray = field(default_factory=bytearray)
    pending: bytes | None = None  # response bytes not yet sent; None while the request is incomplete


# ---------------------------------------------------------------- task management rules


class _Scope(enum.Enum):
    TASK = "task"  # the task named by the Referenced Task Tag
    LUN = "lun"  # this session's tasks on the addressed LU
    TARGET = "target"  # all of this session's tasks


@dataclass(frozen=True, slots=True)
class _TmfRule:
    scope: _Scope | None  # None: not performed, answered with `refuse`
    refuse: int = TMF_RSP_COMPLETE
    lun_checked: bool = False  # answer "LUN does not exist" for a LUN we do not serve
    server: bool = False  # the server acts too (TaskManagement action, tmf_done)
    close_after: bool = False


# RFC 7143 §11.5.1. CLEAR TASK SET acts on this session's tasks only: with a task
# set shared by all I_T nexuses (TST=000b) other sessions' tasks would be cleared
# too, which needs the server, and the server only hears of LU/target resets.
# TARGET COLD RESET is a warm reset plus "a power on event, thus terminating all
# of its TCP connections", so the connection closes after the response.
# TASK REASSIGN needs ErrorRecoveryLevel 2: "Task allegiance reassignment not supported".
_TMF_RULES: dict[int, _TmfRule] = {
    TMF_ABORT_TASK: _TmfRule(_Scope.TASK),
    TMF_ABORT_TASK_SET: _TmfRule(_Scope.LUN, lun_checked=True),
    TMF_CLEAR_ACA: _TmfRule(None, refuse=TMF_RSP_NOT_SUPPORTED),
    TMF_CLEAR_TASK_SET: _TmfRule(_Scope.LUN, lun_checked=True),
    TMF_LUN_RESET: _TmfRule(_Scope.LUN, lun_checked=True, server=True),
    TMF_TARGET_WARM_RESET: _TmfRule(_Scope.TARGET, server=True),
    TMF_TARGET_COLD_RESET: _TmfRule(_Scope.TARGET, server=True, close_after=True),
    TMF_TASK_REASSIGN: _TmfRule(None, refuse=TMF_RSP_REASSIGN_NOT_SUPPORTED),
}
_TMF_UNKNOWN = _TmfRule(None, refuse=TMF_RSP_NOT_SUPPORTED)


def _carries_status(pdu: TargetPDU) -> bool:
    """Whether sending `pdu` advances StatSN (RFC 7143 §3.2.2.2)."""
    match pdu:
        case DataIn():
            return pdu.status_present  # §11.7: StatSN only valid with S
        case NopIn():
            return pdu.itt != RESERVED_TAG  # §11.19: not advanced for a target-initiated NOP-In
        case R2T():
            return False  # §11.8: "the StatSN for this connection is not advanced"
        case _:
            return True


# Opcodes of the PDUs that carry a CmdSN (byte 24 of the BHS, RFC 7143 §11.3).
_COMMAND_OPCODES = frozenset({OP_NOP_OUT, OP_SCSI_CMD, OP_TASK_MGMT_REQ, OP_TEXT_REQ, OP_LOGOUT_REQ})
_OPCODE_OF: dict[type, int] = {
    NopOut: OP_NOP_OUT, ScsiCommand: OP_SCSI_CMD, TaskMgmtRequest: OP_TASK_MGMT_REQ, LoginRequest: OP_LOGIN_REQ,
    TextRequest: OP_TEXT_REQ, DataOut: OP_DATA_OUT, LogoutRequest: OP_LOGOUT_REQ, SnackRequest: OP_SNACK_REQ,
}


def _header_stub(pdu: InitiatorPDU) -> bytes:
    """A stand-in for a rejected PDU's BHS when the adapter did not pass the received one: the
    fields an initiator needs to find what was rejected (opcode, I bit, ITT, CmdSN)."""
    bhs = bytearray(48)
    bhs[0] = _OPCODE_OF[type(pdu)] | (0x40 if getattr(pdu, "immediate", False) else 0)
    bhs[1] = 0x80
    bhs[16:20] = (getattr(pdu, "itt", RESERVED_TAG) & SN_MASK).to_bytes(4, "big")
    if isinstance(pdu, (NopOut, ScsiCommand, TaskMgmtRequest, TextRequest, LogoutRequest)):
        bhs[24:28] = (pdu.cmdsn & SN_MASK).to_bytes(4, "big")
    return bytes(bhs)


def _parse_text(data: bytes) -> list[tuple[str, str]] | None:
    """key=value pairs, each NUL-terminated (RFC 7143 §6.1); None when malformed or too many."""
    pairs: list[tuple[str, str]] = []
    for item in data.split(b"\x00"):
        if not item:
            continue
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            return None
        key, sep, value = text.partition("=")
        if not sep or not key:
            return None
        pairs.append((key, value))
        if len(pairs) > TEXT_KEYS_MAX:
            return None
    return pairs


# ---------------------------------------------------------------- the session


class Session:
    """One connection's full feature phase. Single-threaded: the adapter serialises all calls."""

    def __init__(self, config: SessionConfig, *, expected_data_out: Callable[[bytes], int | None],
                 now: float) -> None:
        self._cfg = config
        self._expected_data_out = expected_data_out
        self._exp_cmdsn = config.exp_cmdsn & SN_MASK
        # The login response advertised the same window (the login phase uses cmd_window too).
        self._max_cmdsn = sn_add(self._exp_cmdsn, config.cmd_window - 1)
        self._statsn = config.statsn & SN_MASK
        self._adv_exp = self._exp_cmdsn  # what the initiator last saw
        self._adv_max = self._max_cmdsn
        self._held: dict[int, _Held] = {}  # by CmdSN, each within [ExpCmdSN, MaxCmdSN]
        self._advancing = False
        self._tasks: dict[int, _Task] = {}  # by task id
        self._by_itt: dict[int, _Task] = {}
        self._window_used = 0  # delivered non-immediate tasks and TMFs not yet answered
        self._immediate_tasks = 0
        self._immediate_tmfs = 0
        self._in_flight = 0
        self._admission: collections.deque[_Task] = collections.deque()
        self._charged = 0  # Data-Out bytes buffered or reserved, all tasks
        self._next_id = 1
        self._next_ttt = 1
        self._tmfs: dict[int, _PendingTmf] = {}
        self._text: _TextExchange | None = None
        self._ping: tuple[int, float] | None = None  # (TTT, sent at) of our unanswered NOP-In
        self._last_rx = now
        self._logout: LogoutRequest | None = None
        self._closed = False
        self._discarded: collections.OrderedDict[int, None] = collections.OrderedDict()

    # ------------------------------------------------------------ public surface

    @property
    def in_flight(self) -> int:
        """Tasks executing: Execute actions whose completion has not arrived."""
        return self._in_flight

    @property
    def exp_cmdsn(self) -> int:
        return self._exp_cmdsn

    @property
    def max_cmdsn(self) -> int:
        return self._max_cmdsn

    @property
    def statsn(self) -> int:
        """The StatSN the next status-carrying PDU will bear."""
        return self._statsn

    @property
    def data_out_bytes(self) -> int:
        """Data-Out bytes buffered or reserved for solicitation, all tasks."""
        return self._charged

    @property
    def closed(self) -> bool:
        return self._closed

    def receive(self, pdu: InitiatorPDU | Invalid, now: float, *, bhs: bytes = b"") -> list[Action]:
        """One PDU from the initiator. bhs: its 48-byte header as received, which a Reject
        must carry (§11.17); without it the Reject carries a stub naming the opcode, ITT, CmdSN."""
        if self._closed:
            return []
        out: list[Action] = []
        self._last_rx = now
        try:
            self._dispatch(pdu, bhs, out)
        except RemoteProtocolError as e:
            self._refuse(pdu, bhs, e, out)
        self._after(out)
        return out

    def completed(self, task: int, result: ScsiResult, now: float) -> list[Action]:
        """The LU finished an Execute'd task. Aborted tasks' results are discarded."""
        if self._closed:
            return []
        t = self._tasks.get(task)
        if t is None or t.phase is not Phase.EXECUTING:
            raise SessionUsageError(f"completed({task}): no such executing task")
        out: list[Action] = []
        self._detach(t)  # first, so the status carries the window this task frees
        if not t.aborted:
            self._respond(t, result, out)
        self._settle(t, out)
        self._after(out)
        return out

    def tmf_done(self, task: int, now: float) -> list[Action]:
        """The server finished a TaskManagement action."""
        if self._closed:
            return []
        tmf = self._tmfs.get(task)
        if tmf is None or not tmf.server_pending:
            raise SessionUsageError(f"tmf_done({task}): no TaskManagement action outstanding")
        out: list[Action] = []
        tmf.server_pending = False
        self._maybe_answer_tmf(tmf, out)
        self._after(out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Ping an idle initiator (NOP-In with a TTT, §11.19) and close when a ping goes unanswered."""
        if self._closed:
            return []
        out: list[Action] = []
        cfg = self._cfg
        if self._ping is not None:
            if now - self._ping[1] >= cfg.nop_timeout_s:
                self._close(out, f"no NOP-Out echo within {cfg.nop_timeout_s} s")
        elif (cfg.nop_interval_s > 0 and self._logout is None
              and now - self._last_rx >= cfg.nop_interval_s):
            ttt = self._new_ttt()
            self._ping = (ttt, now)
            self._send(out, NopIn(itt=RESERVED_TAG, ttt=ttt, lun=LUN_ZERO))
        self._after(out)
        return out

    def close(self) -> None:
        """The connection is gone: forget everything; later calls do nothing."""
        self._closed = True
        self._tasks.clear()
        self._by_itt.clear()
        self._held.clear()
        self._admission.clear()
        self._tmfs.clear()
        self._text = None
        self._discarded.clear()
        self._in_flight = 0
        self._charged = 0

    def check_invariants(self) -> None:
        """The full consistency check (O(tasks)); tests call it after every step."""
        if self._closed:
            return
        if sum(t.charged for t in self._tasks.values()) != self._charged:
            raise SessionInvariantError("budget charge differs from the tasks' charges")
        executing = sum(1 for t in self._tasks.values() if t.phase is Phase.EXECUTING)
        if executing != self._in_flight:
            raise SessionInvariantError("in_flight differs from the executing tasks")
        windowed = sum(1 for t in self._tasks.values() if t.in_window)
        windowed += sum(1 for m in self._tmfs.values() if not m.immediate)
        if windowed != self._window_used:
            raise SessionInvariantError("window accounting differs from the tasks and TMFs")
        held_tasks = sum(1 for e in self._held.values() if isinstance(e, _Task))
        if held_tasks != sum(1 for t in self._tasks.values() if t.phase is Phase.HELD):
            raise SessionInvariantError("held tasks differ from tasks in phase HELD")
        for sn in self._held:
            if not sn_in_window(sn, self._exp_cmdsn, self._max_cmdsn):
                raise SessionInvariantError(f"held CmdSN {sn} outside the window")
        # The admission rule: two admitted tasks never hold more solicited bytes than the budget
        # (one alone may, or nothing could ever run).
        solicited = [t.solicited for t in self._tasks.values() if t.solicited]
        if len(solicited) > 1 and sum(solicited) > self._cfg.data_out_budget_bytes:
            raise SessionInvariantError(f"solicited reservations {solicited} exceed the Data-Out budget")
        for t in self._tasks.values():
            if self._by_itt.get(t.itt) is not t:
                raise SessionInvariantError(f"task {t.id} not found by its ITT")
            if len(t.bursts) > self._cfg.max_outstanding_r2t:
                raise SessionInvariantError(f"task {t.id} has more R2Ts outstanding than MaxOutstandingR2T")
        self._check_window()

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, pdu: InitiatorPDU | Invalid, bhs: bytes, out: list[Action]) -> None:
        match pdu:
            case Invalid():
                self._on_invalid(pdu, out)
            case ScsiCommand():
                self._on_scsi_command(pdu, out)
            case DataOut():
                self._on_data_out(pdu, out)
            case NopOut():
                self._on_nop_out(pdu, bhs, out)
            case TextRequest():
                self._on_text(pdu, bhs, out)
            case TaskMgmtRequest():
                self._on_tmf(pdu, bhs, out)
            case LogoutRequest():
                self._on_logout(pdu, bhs, out)
            case SnackRequest():
                raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "SNACK at ErrorRecoveryLevel 0 (RFC 7143 §11.16)")
            case LoginRequest():
                raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "Login Request in full feature phase", close=True)

    def _admissible(self, pdu: ScsiCommand | NopOut | TextRequest | TaskMgmtRequest | LogoutRequest) -> bool:
        """False when a command must be silently ignored: after a Logout Request, or a non-immediate
        one outside the CmdSN window or a duplicate of one held (RFC 7143 §3.2.2.1)."""
        if self._logout is not None:
            log.info("event=iscsi_command_after_logout itt=%#x", pdu.itt)
            return False
        if pdu.immediate:
            return True
        if not sn_in_window(pdu.cmdsn, self._exp_cmdsn, self._max_cmdsn) or pdu.cmdsn in self._held:
            log.info("event=iscsi_cmdsn_ignored cmdsn=%d exp_cmdsn=%d max_cmdsn=%d",
                     pdu.cmdsn, self._exp_cmdsn, self._max_cmdsn)
            return False
        return True

    def _hold(self, cmdsn: int, entry: _Held, out: list[Action]) -> None:
        self._held[cmdsn] = entry
        self._advance(out)

    def _advance(self, out: list[Action]) -> None:
        """Deliver held commands while the next CmdSN is here (§3.2.2.1: in-order delivery)."""
        if self._advancing:
            return  # the outer loop picks up what this call would have delivered
        self._advancing = True
        try:
            while not self._closed and self._exp_cmdsn in self._held:
                entry = self._held.pop(self._exp_cmdsn)
                self._exp_cmdsn = sn_add(self._exp_cmdsn, 1)
                if isinstance(entry, _Task):
                    self._deliver_task(entry, out)
                elif isinstance(entry, _HeldPdu):
                    self._deliver_pdu(entry, out)
        finally:
            self._advancing = False

    def _deliver_pdu(self, entry: _HeldPdu, out: list[Action]) -> None:
        pdu = entry.pdu
        match pdu:
            case NopOut():
                self._answer_nop(pdu, out)
            case TextRequest():
                self._process_text(pdu, entry.bhs, out)
            case TaskMgmtRequest():
                self._process_tmf(pdu, out)
            case LogoutRequest():
                self._process_logout(pdu, out)

    def _refuse(self, pdu: InitiatorPDU | Invalid, bhs: bytes, e: RemoteProtocolError, out: list[Action]) -> None:
        log.warning("event=iscsi_reject reason=%#x close=%s why=%s", e.reason, e.close, e.why)
        header = bhs or (pdu.bhs if isinstance(pdu, Invalid) else _header_stub(pdu))
        if e.close:
            self._send(out, Reject(reason=e.reason, bhs=header))
            self._close(out, f"protocol error: {e.why}")
            return
        # A refused non-immediate command still consumes its CmdSN, or ExpCmdSN would stall; the
        # Reject then already shows the ExpCmdSN past it.
        if isinstance(pdu, (ScsiCommand, TaskMgmtRequest, TextRequest, LogoutRequest)) or (
                isinstance(pdu, NopOut) and pdu.itt != RESERVED_TAG):
            if not pdu.immediate:
                self._consume(pdu.cmdsn, out)
        self._send(out, Reject(reason=e.reason, bhs=header))

    def _consume(self, cmdsn: int, out: list[Action]) -> None:
        if (self._logout is None and sn_in_window(cmdsn, self._exp_cmdsn, self._max_cmdsn)
                and cmdsn not in self._held):
            self._hold(cmdsn, None, out)

    def _on_invalid(self, pdu: Invalid, out: list[Action]) -> None:
        """The codec could frame the PDU but not accept it: Reject with its reason (§11.17), and
        consume its CmdSN when it was a non-immediate command."""
        log.warning("event=iscsi_invalid_pdu reason=%#x why=%s", pdu.reason, pdu.why)
        bhs = pdu.bhs
        if len(bhs) >= 28:
            opcode, immediate = bhs[0] & 0x3F, bool(bhs[0] & 0x40)
            itt = int.from_bytes(bhs[16:20], "big")
            if opcode in _COMMAND_OPCODES and not immediate and not (opcode == OP_NOP_OUT and itt == RESERVED_TAG):
                self._consume(int.from_bytes(bhs[24:28], "big"), out)
        self._send(out, Reject(reason=pdu.reason, bhs=bhs))

    # ------------------------------------------------------------ SCSI commands (§11.3)

    def _on_scsi_command(self, cmd: ScsiCommand, out: list[Action]) -> None:
        if not self._admissible(cmd):
            return
        task = self._new_task(cmd)
        self._tasks[task.id] = task
        self._by_itt[task.itt] = task
        self._discarded.pop(task.itt, None)
        if task.immediate:
            self._immediate_tasks += 1
            self._deliver_task(task, out)
        else:
            self._hold(cmd.cmdsn, task, out)

    def _new_task(self, cmd: ScsiCommand) -> _Task:
        """Check a SCSI Command against the negotiated data rules and build its task; raises
        RemoteProtocolError before changing anything."""
        cfg = self._cfg
        if cfg.discovery:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "SCSI Command on a discovery session (RFC 7143 §3.3)")
        if len(cmd.data) > cfg.max_recv_data_segment:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "immediate data past MaxRecvDataSegmentLength",
                                      close=True)
        if cmd.itt == RESERVED_TAG:
            raise RemoteProtocolError(REJECT_INVALID_PDU_FIELD, "SCSI Command with the reserved ITT")
        if not cmd.cdb:
            raise RemoteProtocolError(REJECT_INVALID_PDU_FIELD, "SCSI Command without a CDB")
        if cmd.itt in self._by_itt:
            # The ITT must name one task session-wide while it exists (the BHS ITT, §11.2).
            raise RemoteProtocolError(REJECT_TASK_IN_PROGRESS, f"ITT {cmd.itt:#x} already names a task")
        if cmd.immediate and self._immediate_tasks >= IMMEDIATE_TASKS_MAX:
            raise RemoteProtocolError(REJECT_IMMEDIATE_COMMAND, "too many immediate commands (§3.2.2.1)")
        write = cmd.write
        unsol_limit = min(cmd.edtl, cfg.first_burst_length) if write else 0
        if cmd.data:
            if not write:
                raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "immediate data without the W bit", close=True)
            if not cfg.immediate_data:
                raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "immediate data with ImmediateData=No",
                                          close=True)
            if len(cmd.data) > unsol_limit:
                raise RemoteProtocolError(REJECT_PROTOCOL_ERROR,
                                          "immediate data past FirstBurstLength or EDTL (§13.14)", close=True)
        if not cmd.final and (not write or cfg.initial_r2t):
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR,
                                      "F=0 announces unsolicited Data-Out the session does not allow (§13.10)",
                                      close=True)
        need = self._expected_data_out(cmd.cdb)
        if need is not None and need < 0:
            raise SessionUsageError(f"expected_data_out returned {need}")
        failure: bytes | None = None
        if cmd.read and write:
            failure = SENSE_INVALID_FIELD_IN_CDB  # bidirectional commands are not supported
        elif write and cmd.edtl > MAX_TRANSFER_BYTES:
            failure = SENSE_INVALID_FIELD_IN_CDB  # refused before buffering any of its data
        xfer_len = min(cmd.edtl, need) if (write and need is not None and failure is None) else 0
        kept = cmd.data[:xfer_len]
        task = _Task(
            id=self._new_id(), itt=cmd.itt, lun=cmd.lun, cdb=cmd.cdb, cmdsn=cmd.cmdsn, immediate=cmd.immediate,
            read=cmd.read, write=write, edtl=cmd.edtl, need=need, xfer_len=xfer_len, unsol_limit=unsol_limit,
            failure=failure, unsol_open=not cmd.final, stream_offset=len(cmd.data), buffer=bytearray(kept),
        )
        self._charge(task, len(kept))
        return task

    def _deliver_task(self, task: _Task, out: list[Action]) -> None:
        self._fire(task, Event.DELIVER)
        if not task.immediate:
            task.in_window = True
            self._window_used += 1
        self._progress(task, out)

    def _progress(self, task: _Task, out: list[Action]) -> None:
        """Move a delivered task as far as it can go now."""
        if task.phase is Phase.UNSOLICITED and not task.unsol_open:
            if task.failure is not None:
                # Answered only after its unsolicited data ended (the initiator sends all of it anyway).
                self._detach(task)
                self._respond(task, ScsiResult(CHECK_CONDITION, b"", task.failure), out)
                self._settle(task, out)
                return
            self._fire(task, Event.UNSOLICITED_DONE)
            if len(task.buffer) < task.xfer_len:
                self._admission.append(task)  # _after admits it when the budget allows
                return
            self._fire(task, Event.ADMIT)
            task.r2t_offset = task.xfer_len
        if task.phase is Phase.TRANSFER:
            self._issue_r2ts(task, out)

    def _admit(self, out: list[Action]) -> None:
        """Admit queued tasks to TRANSFER in arrival order while the Data-Out budget allows."""
        budget = self._cfg.data_out_budget_bytes
        while self._admission and not self._closed:
            head = self._admission[0]
            if head.phase is not Phase.QUEUED or head.aborted:
                self._admission.popleft()
                continue
            extra = head.xfer_len - head.charged
            if self._charged + extra > budget and self._budget_holders() > 0:
                return
            self._admission.popleft()
            self._charge(head, extra)
            head.solicited = extra
            head.r2t_offset = len(head.buffer)
            head.buffer.extend(bytes(head.xfer_len - len(head.buffer)))
            self._fire(head, Event.ADMIT)
            self._issue_r2ts(head, out)

    def _budget_holders(self) -> int:
        """Admitted tasks holding budget: they free it on their own, so others may wait for them."""
        return sum(1 for t in self._tasks.values()
                   if t.charged and t.phase in (Phase.TRANSFER, Phase.EXECUTING))

    def _issue_r2ts(self, task: _Task, out: list[Action]) -> None:
        """Keep up to MaxOutstandingR2T R2Ts of at most MaxBurstLength out (§11.8, §13.17); execute
        when every byte is in."""
        cfg = self._cfg
        while (not task.aborted and len(task.bursts) < cfg.max_outstanding_r2t
               and task.r2t_offset < task.xfer_len):
            length = min(cfg.max_burst_length, task.xfer_len - task.r2t_offset)
            ttt = self._new_ttt()
            task.bursts[ttt] = _Burst(end=task.r2t_offset + length, next_offset=task.r2t_offset)
            self._send(out, R2T(itt=task.itt, ttt=ttt, r2tsn=task.r2tsn, buffer_offset=task.r2t_offset,
                                desired_length=length, lun=task.lun))
            task.r2tsn += 1
            task.r2t_offset += length
        if not task.aborted and not task.bursts and task.r2t_offset >= task.xfer_len:
            self._fire(task, Event.DATA_DONE)
            self._in_flight += 1
            data = bytes(task.buffer) if task.write else b""
            task.buffer = bytearray()  # the Execute holds the bytes; the charge stays until completion
            out.append(Execute(task=task.id, lun=task.lun, cdb=task.cdb, data_out=data))

    # ------------------------------------------------------------ Data-Out (§11.7)

    def _on_data_out(self, d: DataOut, out: list[Action]) -> None:
        if self._cfg.discovery:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "Data-Out on a discovery session")
        if len(d.data) > self._cfg.max_recv_data_segment:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "Data-Out past MaxRecvDataSegmentLength", close=True)
        task = self._by_itt.get(d.itt)
        if task is None:
            if d.itt in self._discarded:
                return  # late data of a task that ended early (aborted, logged out, refused)
            raise RemoteProtocolError(REJECT_INVALID_PDU_FIELD, f"Data-Out for unknown ITT {d.itt:#x}")
        if d.ttt == RESERVED_TAG:
            self._unsolicited_data(task, d, out)
        else:
            self._solicited_data(task, d, out)

    def _unsolicited_data(self, task: _Task, d: DataOut, out: list[Action]) -> None:
        end = d.buffer_offset + len(d.data)
        if not task.unsol_open:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "unsolicited Data-Out not announced by F=0",
                                      close=True)
        if d.datasn != task.unsol_datasn or d.buffer_offset != task.stream_offset:
            self._fail_sequence(task, "unsolicited Data-Out out of order (DataPDUInOrder=Yes)")
        if end > task.unsol_limit:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR,
                                      "unsolicited data past FirstBurstLength or EDTL (§13.14)", close=True)
        if end == task.unsol_limit and not d.final:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "last unsolicited Data-Out without F", close=True)
        if d.buffer_offset < task.xfer_len:
            kept = d.data[:task.xfer_len - d.buffer_offset]
            task.buffer += kept
            self._charge(task, len(kept))
        task.stream_offset = end
        task.unsol_datasn += 1
        if d.final:
            task.unsol_open = False
            self._progress(task, out)

    def _fail_sequence(self, task: _Task, why: str) -> NoReturn:
        """A Data-Out with the wrong DataSN or Buffer Offset (§11.7.3, §11.7.5). At
        ErrorRecoveryLevel 0 the command cannot be recovered, but the connection can: the
        task ends here without a status (the Reject fails it at the initiator, which finds
        it by the ITT in the rejected header), its later Data-Out is discarded, and the
        session goes on. libiscsi's iSCSIDataSnInvalid sends four such writes in a row and
        expects each to fail, not the connection to drop."""
        if task.phase is not Phase.EXECUTING:
            task.aborted = True
            self._detach(task)
        raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, why)

    def _solicited_data(self, task: _Task, d: DataOut, out: list[Action]) -> None:
        burst = task.bursts.get(d.ttt)
        if burst is None:
            raise RemoteProtocolError(REJECT_INVALID_PDU_FIELD, f"Data-Out TTT {d.ttt:#x} names no outstanding R2T")
        end = d.buffer_offset + len(d.data)
        if d.datasn != burst.datasn or d.buffer_offset != burst.next_offset:
            self._fail_sequence(task, "Data-Out out of order within its R2T burst")
        if end > burst.end:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "Data-Out past its R2T's Desired Data Transfer Length",
                                      close=True)
        if d.final != (end == burst.end):
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "F bit not on exactly the last Data-Out of a burst",
                                      close=True)
        if not task.aborted:
            task.buffer[d.buffer_offset:end] = d.data
        burst.next_offset = end
        burst.datasn += 1
        if not d.final:
            return
        del task.bursts[d.ttt]
        if task.aborted:
            if not task.bursts:
                self._finish(task, out)
            return
        self._issue_r2ts(task, out)

    # ------------------------------------------------------------ responses (§11.4, §11.7)

    def _respond(self, task: _Task, result: ScsiResult, out: list[Action]) -> None:
        data = result.data[:task.edtl] if task.read and not task.write else b""
        overflow, underflow, residual = self._residual(task, len(result.data))
        collapse = result.status == GOOD and not result.sense and bool(data)
        cfg = self._cfg
        burst = cfg.max_burst_length
        offset = datasn = 0
        while offset < len(data):
            burst_end = min(len(data), (offset // burst + 1) * burst)
            end = min(offset + cfg.max_send_data_segment, burst_end)
            with_status = collapse and end == len(data)
            self._send(out, DataIn(
                itt=task.itt, datasn=datasn, buffer_offset=offset, final=end == burst_end,
                status_present=with_status, status=result.status if with_status else 0,
                overflow=overflow and with_status, underflow=underflow and with_status,
                residual=residual if with_status else 0, data=data[offset:end]))
            offset = end
            datasn += 1
        if not collapse:
            self._send(out, ScsiResponse(
                itt=task.itt, status=result.status, response=0, expdatasn=datasn, overflow=overflow,
                underflow=underflow, residual=residual, sense=result.sense))

    @staticmethod
    def _residual(task: _Task, result_len: int) -> tuple[bool, bool, int]:
        """(overflow, underflow, count) per RFC 7143 §11.4.5: what the command moved (writes: what
        the CDB needs; reads: what the LU returned) against the Expected Data Transfer Length."""
        if task.failure is not None:
            return False, False, 0
        if task.write:
            expected, moved = task.edtl, task.need or 0
        else:
            expected, moved = (task.edtl if task.read else 0), result_len
        if moved > expected:
            return True, False, min(moved - expected, SN_MASK)
        if moved < expected:
            return False, True, expected - moved
        return False, False, 0

    # ------------------------------------------------------------ task ends

    def _finish(self, task: _Task, out: list[Action]) -> None:
        self._detach(task)
        self._settle(task, out)

    def _detach(self, task: _Task) -> None:
        """Take an ending task out of every index and release its window slot and budget."""
        was = task.phase
        self._fire(task, Event.FINISH)
        self._charged -= task.charged
        task.charged = 0
        del self._tasks[task.id]
        if self._by_itt.get(task.itt) is task:
            del self._by_itt[task.itt]
        if task.in_window:
            task.in_window = False
            self._window_used -= 1
        if task.immediate:
            self._immediate_tasks -= 1
        if was is Phase.EXECUTING:
            self._in_flight -= 1
        if was is Phase.HELD and self._held.get(task.cmdsn) is task:
            self._held[task.cmdsn] = None  # its CmdSN stays consumed
        if task.aborted or task.unsol_open or task.bursts:
            self._discarded[task.itt] = None
            while len(self._discarded) > DISCARDED_ITTS_MAX:
                self._discarded.popitem(last=False)
        task.bursts.clear()
        task.buffer = bytearray()

    def _settle(self, task: _Task, out: list[Action]) -> None:
        """Tell the TMFs waiting for an ended task."""
        for tmf_id in sorted(task.waiters):
            tmf = self._tmfs.get(tmf_id)
            if tmf is not None:
                tmf.waiting.discard(task.id)
                self._maybe_answer_tmf(tmf, out)
        task.waiters.clear()

    # ------------------------------------------------------------ NOP (§11.18, §11.19)

    def _on_nop_out(self, n: NopOut, bhs: bytes, out: list[Action]) -> None:
        if len(n.data) > self._cfg.max_recv_data_segment:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "NOP-Out past MaxRecvDataSegmentLength", close=True)
        if n.ttt != RESERVED_TAG and self._ping is not None and n.ttt == self._ping[0]:
            self._ping = None  # the echo of our ping
        if n.itt == RESERVED_TAG:
            # An echo or a one-way keepalive: never answered, never numbered (§11.18: the I bit
            # MUST be set; a missing one is treated as set, since nothing else is meant).
            return
        if not self._admissible(n):
            return
        if n.immediate:
            self._answer_nop(n, out)
        else:
            self._hold(n.cmdsn, _HeldPdu(n, bhs), out)

    def _answer_nop(self, n: NopOut, out: list[Action]) -> None:
        self._send(out, NopIn(itt=n.itt, ttt=RESERVED_TAG, lun=n.lun,
                              data=n.data[:self._cfg.max_send_data_segment]))

    # ------------------------------------------------------------ Text (§11.10, §11.11)

    def _on_text(self, r: TextRequest, bhs: bytes, out: list[Action]) -> None:
        if len(r.data) > self._cfg.max_recv_data_segment:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "Text Request past MaxRecvDataSegmentLength",
                                      close=True)
        if not self._admissible(r):
            return
        if r.immediate:
            self._process_text(r, bhs, out)
        else:
            self._hold(r.cmdsn, _HeldPdu(r, bhs), out)

    def _process_text(self, r: TextRequest, bhs: bytes, out: list[Action]) -> None:
        ex = self._text
        if r.ttt != RESERVED_TAG:
            if ex is None or ex.itt != r.itt or ex.ttt != r.ttt:
                self._text = None
                self._send(out, Reject(reason=REJECT_INVALID_PDU_FIELD, bhs=bhs or _header_stub(r)))
                return
            if ex.pending is not None:
                self._text_chunk(ex, r.final, out)  # the initiator asks for the next part of our answer
                return
        else:
            # A new exchange; one left unfinished is abandoned (one Text Request outstanding, §11.10).
            ex = _TextExchange(itt=r.itt)
            self._text = ex
        ex.request += r.data
        if len(ex.request) > TEXT_REQUEST_BYTES_MAX:
            self._text = None
            self._send(out, Reject(reason=REJECT_INVALID_PDU_FIELD, bhs=bhs or _header_stub(r)))
            return
        if r.cont:
            # The initiator's text continues: acknowledge with an empty response (§11.10).
            ex.ttt = self._new_ttt()
            self._send(out, TextResponse(itt=r.itt, ttt=ex.ttt, final=False, data=b""))
            return
        pairs = _parse_text(bytes(ex.request))
        if pairs is None:
            self._text = None
            self._send(out, Reject(reason=REJECT_INVALID_PDU_FIELD, bhs=bhs or _header_stub(r)))
            return
        ex.pending = self._answer_text(pairs)
        self._text_chunk(ex, r.final, out)

    def _text_chunk(self, ex: _TextExchange, request_final: bool, out: list[Action]) -> None:
        """Send the next part of a Text Response: C=1 and a TTT while more follows (§11.11); F=1
        only when all is sent and the request had F=1 (§11.11)."""
        pending = ex.pending or b""
        seg = self._cfg.max_send_data_segment
        chunk, rest = pending[:seg], pending[seg:]
        if rest or not request_final:
            ex.ttt = self._new_ttt()
            ex.pending = rest
            self._send(out, TextResponse(itt=ex.itt, ttt=ex.ttt, final=False, cont=bool(rest), data=chunk))
            return
        self._text = None
        self._send(out, TextResponse(itt=ex.itt, ttt=RESERVED_TAG, final=True, cont=False, data=chunk))

    def _answer_text(self, pairs: list[tuple[str, str]]) -> bytes:
        answer = bytearray()
        for key, value in pairs:
            if key == "SendTargets":
                lines = self._send_targets(value, TEXT_RESPONSE_BYTES_MAX - len(answer))
            elif key in _KNOWN_TEXT_KEYS:
                lines = [f"{key}=Reject"]  # no renegotiation in full feature phase
            else:
                lines = [f"{key}=NotUnderstood"]
            for line in lines:
                encoded = line.encode("utf-8") + b"\x00"
                if len(answer) + len(encoded) > TEXT_RESPONSE_BYTES_MAX:
                    log.warning("event=iscsi_text_truncated bytes=%d", len(answer))
                    return bytes(answer)
                answer += encoded
        return bytes(answer)

    def _send_targets(self, value: str, room: int) -> list[str]:
        """SendTargets (RFC 7143 §13.3, Appendix C): All, one name, or (normal sessions) the
        session's own target; whole targets only, as many as fit in `room` bytes."""
        visible = self._cfg.targets() if self._cfg.targets is not None else []
        if value == "All":
            chosen = visible
        elif value == "":
            if self._cfg.discovery:
                return []
            own = self._cfg.nexus.target_name
            chosen = [t for t in visible if t[0] == own] or [(own, [])]
        else:
            chosen = [t for t in visible if t[0] == value]
        lines: list[str] = []
        used = 0
        for name, addresses in chosen:
            block = [f"TargetName={name}"] + [f"TargetAddress={a}" for a in addresses]
            size = sum(len(b.encode("utf-8")) + 1 for b in block)
            if used + size > room:
                log.warning("event=iscsi_sendtargets_truncated targets=%d shown=%d", len(chosen),
                            sum(1 for line in lines if line.startswith("TargetName=")))
                break
            lines += block
            used += size
        return lines

    # ------------------------------------------------------------ task management (§11.5, §11.6)

    def _on_tmf(self, r: TaskMgmtRequest, bhs: bytes, out: list[Action]) -> None:
        if not self._admissible(r):
            return
        if self._cfg.discovery:
            raise RemoteProtocolError(REJECT_PROTOCOL_ERROR, "Task Management on a discovery session")
        if r.immediate and self._immediate_tmfs >= IMMEDIATE_TMFS_MAX:
            raise RemoteProtocolError(REJECT_IMMEDIATE_COMMAND, "too many immediate TMF requests (§3.2.2.1)")
        if r.immediate:
            self._process_tmf(r, out)
        else:
            self._hold(r.cmdsn, _HeldPdu(r, bhs), out)

    def _process_tmf(self, r: TaskMgmtRequest, out: list[Action]) -> None:
        rule = _TMF_RULES.get(r.function, _TMF_UNKNOWN)
        tmf = _PendingTmf(id=self._new_id(), itt=r.itt, response=TMF_RSP_COMPLETE, immediate=r.immediate,
                          close_after=rule.close_after)
        if r.immediate:
            self._immediate_tmfs += 1
        else:
            self._window_used += 1
        self._tmfs[tmf.id] = tmf
        log.info("event=iscsi_tmf function=%d itt=%#x rtt=%#x lun=%#x", r.function, r.itt, r.rtt, r.lun)
        if rule.scope is None:
            tmf.response = rule.refuse
            tmf.close_after = False
        elif rule.lun_checked and r.lun != LUN_ZERO:
            tmf.response = TMF_RSP_NO_LUN
            tmf.close_after = False
        else:
            affected = self._affected(rule.scope, r, tmf, out)
            for t in affected:
                t.aborted = True
            for t in affected:
                if t.phase is Phase.EXECUTING or t.bursts:
                    tmf.waiting.add(t.id)
                    t.waiters.add(tmf.id)
            if rule.server:
                tmf.server_pending = True
                out.append(TaskManagement(
                    task=tmf.id, function=r.function, lun=r.lun,
                    referenced=tuple(t.id for t in affected if t.phase is Phase.EXECUTING)))
            for t in affected:
                if t.id not in tmf.waiting:
                    self._finish(t, out)
        self._maybe_answer_tmf(tmf, out)

    def _affected(self, scope: _Scope, r: TaskMgmtRequest, tmf: _PendingTmf, out: list[Action]) -> list[_Task]:
        if scope is not _Scope.TASK:
            # Tasks issued before the TMF: a non-immediate one with a later CmdSN (held ahead of a
            # gap) was sent after it and is not affected (§4.2.3 orders TMFs by CmdSN).
            return [t for t in self._tasks.values()
                    if (scope is _Scope.TARGET or t.lun == r.lun) and (t.immediate or sn_lt(t.cmdsn, r.cmdsn))]
        task = self._by_itt.get(r.rtt)
        if task is not None:
            return [task]
        # §11.6.1 ABORT TASK: no such task, but RefCmdSN inside the window and before the TMF's
        # own CmdSN: "consider the CmdSN as received" (it must never run) and answer "Function
        # complete"; RefCmdSN outside the window: "Task does not exist".
        if sn_in_window(r.refcmdsn, self._exp_cmdsn, self._max_cmdsn) and sn_lt(r.refcmdsn, r.cmdsn):
            self._consume(r.refcmdsn, out)
        else:
            tmf.response = TMF_RSP_NO_TASK
        return []

    def _maybe_answer_tmf(self, tmf: _PendingTmf, out: list[Action]) -> None:
        """Answer once every affected task ended and the server is done (§4.2.3: the response
        follows everything the aborted tasks sent)."""
        if tmf.waiting or tmf.server_pending or self._tmfs.get(tmf.id) is not tmf:
            return
        del self._tmfs[tmf.id]
        if tmf.immediate:
            self._immediate_tmfs -= 1
        else:
            self._window_used -= 1
        self._send(out, TaskMgmtResponse(itt=tmf.itt, response=tmf.response))
        if tmf.close_after:
            self._close(out, "TARGET COLD RESET")

    # ------------------------------------------------------------ logout (§11.14, §11.15)

    def _on_logout(self, r: LogoutRequest, bhs: bytes, out: list[Action]) -> None:
        if not self._admissible(r):
            return
        if r.reason not in (LOGOUT_CLOSE_SESSION, LOGOUT_CLOSE_CONNECTION, LOGOUT_REMOVE_FOR_RECOVERY):
            raise RemoteProtocolError(REJECT_INVALID_PDU_FIELD, f"Logout reason {r.reason}")
        if r.immediate:
            self._process_logout(r, out)
        else:
            self._hold(r.cmdsn, _HeldPdu(r, bhs), out)

    def _process_logout(self, r: LogoutRequest, out: list[Action]) -> None:
        if r.reason == LOGOUT_REMOVE_FOR_RECOVERY:
            # Connection recovery needs ErrorRecoveryLevel 2 (§11.15.1 response 2); the session goes on.
            self._send(out, LogoutResponse(itt=r.itt, response=LOGOUT_RSP_RECOVERY_NOT_SUPPORTED))
            return
        # Close session / close connection (the same at MaxConnections=1; the CID is not checked,
        # since there is one connection). Executing tasks finish and are answered; the rest end
        # now, as ERL 0 ends every task of a closing session.
        self._logout = r
        self._text = None
        self._ping = None
        for t in [t for t in self._tasks.values() if t.phase is not Phase.EXECUTING]:
            self._finish(t, out)
        self._held.clear()  # commands after the gap are never delivered

    def _maybe_finish_logout(self, out: list[Action]) -> None:
        if self._logout is None or self._tasks or self._closed:
            return
        self._send(out, LogoutResponse(itt=self._logout.itt, response=LOGOUT_RSP_OK, time2wait=0, time2retain=0))
        self._close(out, "logout", logout=True)

    # ------------------------------------------------------------ plumbing

    def _after(self, out: list[Action]) -> None:
        """End of every entry point: deliver, admit, finish a logout, and reopen a closed window."""
        if self._closed:
            return
        self._advance(out)
        self._admit(out)
        self._maybe_finish_logout(out)
        if self._closed or any(isinstance(a, Send) for a in out):
            return
        self._refresh_window()
        if sn_lt(self._adv_max, self._adv_exp) and self._max_cmdsn != self._adv_max:
            # The initiator's window was shut and nothing else would tell it that it reopened: an
            # unsolicited NOP-In with both tags reserved carries the new MaxCmdSN (§11.19).
            self._send(out, NopIn(itt=RESERVED_TAG, ttt=RESERVED_TAG, lun=LUN_ZERO))

    def _send(self, out: list[Action], pdu: TargetPDU) -> None:
        """Stamp StatSN/ExpCmdSN/MaxCmdSN and queue the PDU; nothing is sent after a Close."""
        if self._closed:
            return
        self._refresh_window()
        stamped = replace(pdu, statsn=self._statsn, expcmdsn=self._exp_cmdsn, maxcmdsn=self._max_cmdsn)
        if _carries_status(pdu):
            self._statsn = sn_add(self._statsn, 1)
        self._adv_exp, self._adv_max = self._exp_cmdsn, self._max_cmdsn
        out.append(Send(stamped))

    def _refresh_window(self) -> None:
        """MaxCmdSN = ExpCmdSN - 1 + cmd_window - slots in use; never backwards, and not opened while
        the Data-Out budget is spent (unsolicited data of new commands could not be refused)."""
        self._check_window()
        if self._charged >= self._cfg.data_out_budget_bytes:
            return
        candidate = sn_add(self._exp_cmdsn, self._cfg.cmd_window - 1 - self._window_used)
        if sn_lt(self._max_cmdsn, candidate):
            self._max_cmdsn = candidate

    def _check_window(self) -> None:
        promised = (self._max_cmdsn - self._exp_cmdsn + 1) & SN_MASK
        if not 0 <= self._window_used <= self._cfg.cmd_window or promised + self._window_used > self._cfg.cmd_window:
            raise SessionInvariantError(
                f"window overrun: used={self._window_used} exp={self._exp_cmdsn} max={self._max_cmdsn}")

    def _close(self, out: list[Action], reason: str, *, logout: bool = False) -> None:
        if self._closed:
            return
        log.info("event=iscsi_session_close initiator=%s target=%s reason=%s",
                 self._cfg.nexus.initiator_port, self._cfg.nexus.target_name, reason)
        out.append(Close(reason=reason, logout=logout))
        self._closed = True

    def _fire(self, task: _Task, event: Event) -> None:
        nxt = _TASK_TRANSITIONS.get((task.phase, event))
        if nxt is None:
            raise SessionInvariantError(f"task {task.id}: no transition from {task.phase.name} on {event.name}")
        task.phase = nxt

    def _charge(self, task: _Task, n: int) -> None:
        task.charged += n
        self._charged += n

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _new_ttt(self) -> int:
        """Target Transfer Tags for R2Ts, pings and Text continuations; never the reserved value."""
        ttt = self._next_ttt
        self._next_ttt = ttt + 1 if ttt + 1 < RESERVED_TAG else 1
        return ttt
