"""The login phase of one iSCSI target connection (RFC 7143 §6.3, §11.12, §11.13, §12, §13).

Theory of operation. This file owns the login state machine and nothing else; it
does no I/O. The connection hands every Login Request to `LoginMachine.receive`
and sends the one Login Response in the returned `LoginStep`; when the step says
`done`, full feature phase begins with the negotiated `SessionParams`; when it
says `close`, the connection is closed after the response is sent.

A login moves through stages (§6.3): security (0), where the initiator and the
target agree on AuthMethod and run CHAP (§12.1.3); operational (1), where the
operational keys of §13 are negotiated; and full feature phase (3). Which stage
changes are legal is the table `STAGE_TRANSITIONS`; the CHAP exchange is the
table `CHAP_STEPS`; what each key means is the table `iscsi.keys.KEYS`.

One request's text may span several PDUs (C=1 on all but the last). Each partial
PDU is answered with an empty response (RFC 7143 §6.1) and the text is joined,
bounded, and negotiated once it is complete. The first complete text identifies
the login: InitiatorName, SessionType and (for a Normal session) TargetName,
which the server's `lookup` turns into a `TargetPolicy` (not found, redirect,
ACL, CHAP or not).

Every failure is a `LoginResponse` with a status of class 1 (redirect), 2 (the
initiator's fault) or 3 (ours), after which the machine answers anything with
close=True. `receive` raises only for local bugs (a broken `tsih_alloc` or
`random_bytes`, an answer we could not encode).

Sequence numbers (§11.13): the first response's StatSN is random, and every
response, partial ones included, carries the next. A random start is what TCP
does with its initial sequence number: a blind third party cannot guess the
StatSN of a session it did not see, and initiators' serial-number arithmetic
(RFC 1982) gets exercised across the 2**32 wrap instead of only near 0. Login
requests are immediate, so the CmdSN of the login is the CmdSN the first
non-immediate command will carry: ExpCmdSN echoes it and MaxCmdSN opens a
window of `TargetLimits.cmd_window` commands.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from iscsi import keys as k
from iscsi.pdu import LoginRequest, LoginResponse

# ---------------------------------------------------------------- stages (RFC 7143 §6.3, §11.12.3)

SECURITY = 0  # SecurityNegotiation
OPERATIONAL = 1  # LoginOperationalNegotiation
FULL_FEATURE = 3  # FullFeaturePhase; stage 2 is reserved

STAGE_NAMES: Mapping[int, str] = {SECURITY: "security", OPERATIONAL: "operational", FULL_FEATURE: "full feature"}

# The stages a login may start in: security, or operational when the initiator
# skips authentication (§6.3.2: "starting with the first Login Request if the
# initiator does not propose any security/integrity option").
FIRST_STAGES = frozenset({SECURITY, OPERATIONAL})

# For each stage, the next stages a request with T=1 may ask for (§11.12.3: the
# NSG is higher than the CSG). A request with T=0 stays in its stage.
STAGE_TRANSITIONS: Mapping[int, frozenset[int]] = {
    SECURITY: frozenset({OPERATIONAL, FULL_FEATURE}),
    OPERATIONAL: frozenset({FULL_FEATURE}),
}

VERSION = 0x00  # §11.12.4: the only iSCSI version there is

SERIAL_MOD = 1 << 32  # StatSN / CmdSN are 32-bit serial numbers (RFC 1982)

# ---------------------------------------------------------------- bounds

# At most this many Login Requests in one login. A CHAP login takes four; a
# 64 KiB text split into 512-byte Continue PDUs (the smallest legal
# MaxRecvDataSegmentLength) takes 128. libiscsi gives up after 10 attempts.
LOGIN_REQUESTS_MAX = 128
# Our responses must fit one PDU at the 8192-byte MaxRecvDataSegmentLength that
# holds during login (§13.12, the default); we never split them over Continue PDUs.
LOGIN_RESPONSE_BYTES_MAX = 8192
# §4.2.7.1: an iSCSI name is at most 223 bytes.
ISCSI_NAME_BYTES_MAX = 223
# RFC 1994 / RFC 7143 §12.1.3: CHAP with MD5 is algorithm 5, the one every
# initiator offers and the only one RFC 7143 defines.
CHAP_MD5 = 5
CHAP_DIGEST_BYTES = 16  # an MD5 digest
# The challenge we send. 16 random bytes (one MD5 block's worth of entropy) is
# what Linux LIO sends; RFC 7143 §12.1.3 only bounds it above.
CHAP_CHALLENGE_BYTES = 16
# §12.1.3: "the binary length of CHAP_C and CHAP_R MUST NOT exceed 1024 bytes".
CHAP_BINARY_BYTES_MAX = 1024
CHAP_ID_MAX = 255  # CHAP_I is one octet

# RFC 7143 §13.12: what a side that has not declared MaxRecvDataSegmentLength can receive.
DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH = 8192

# Keys the initiator may repeat, unchanged, in a later request of the same login.
# libiscsi (lib/login.c) sends InitiatorName, InitiatorAlias, TargetName and
# SessionType again in the first request of the operational stage. An identical
# repeat changes nothing; a different value is renegotiation, which §6.2
# forbids.
REPEATABLE_KEYS = frozenset({"InitiatorName", "InitiatorAlias", "TargetName", "SessionType"})


class TargetUnavailable(Exception):
    """Raised by a lookup that cannot serve the target now (its volume cannot be opened: no
    quorum, another owner's lease still running): the login is answered with 0301h SERVICE
    UNAVAILABLE, which initiators retry."""


class Status(enum.IntEnum):
    """Login Response Status-Class and Status-Detail, as one number (RFC 7143 §11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200  # miscellaneous
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


# ---------------------------------------------------------------- authentication (RFC 7143 §12.1.3)


class Auth(enum.Enum):
    PENDING = "AuthMethod not agreed yet"
    NONE = "no authentication (AuthMethod=None)"
    CHAP_WAIT_A = "AuthMethod=CHAP agreed, waiting for CHAP_A"
    CHAP_WAIT_R = "challenge sent, waiting for CHAP_N and CHAP_R"
    DONE = "initiator authenticated"


@dataclass(frozen=True, slots=True)
class ChapStep:
    required: frozenset[str]  # CHAP keys the initiator's text must carry in this state
    allowed: frozenset[str]  # ... and those it may carry
    next: Auth


# The CHAP exchange as a table: in each state, which CHAP keys the initiator may
# send and the state that follows. Initiator: CHAP_A=<A1,A2..>; target:
# CHAP_A, CHAP_I, CHAP_C; initiator: CHAP_N, CHAP_R, and for mutual CHAP also
# CHAP_I, CHAP_C; target (mutual): CHAP_N, CHAP_R. CHAP keys in any other state
# are an authentication failure.
CHAP_STEPS: Mapping[Auth, ChapStep] = {
    Auth.CHAP_WAIT_A: ChapStep(frozenset({"CHAP_A"}), frozenset({"CHAP_A"}), Auth.CHAP_WAIT_R),
    Auth.CHAP_WAIT_R: ChapStep(frozenset({"CHAP_N", "CHAP_R"}), frozenset({"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}),
                               Auth.DONE),
}
# The states in which the security stage may end.
AUTH_COMPLETE = frozenset({Auth.NONE, Auth.DONE})


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 §4.1 with MD5: MD5(identifier octet + secret + challenge)."""
    return hashlib.md5(bytes([ident]) + secret + challenge).digest()


# ---------------------------------------------------------------- configuration and results


@dataclass(frozen=True, slots=True)
class ChapSecrets:
    user: str  # the name the initiator must present (CHAP_N)
    secret: bytes  # its secret; RFC 7143 §12.1.3 recommends 12+ bytes, we accept >= 1
    mutual_user: str | None = None  # the target's CHAP_N for mutual CHAP
    mutual_secret: bytes | None = None

    def __post_init__(self) -> None:
        for name in (self.user, self.mutual_user):
            if name is None:
                continue
            # It travels as a CHAP_N value: 1..255 bytes, no NUL (RFC 7143 §6.1).
            if not 0 < len(name.encode("utf-8")) <= k.VALUE_BYTES_MAX or "\0" in name:
                raise ValueError(f"configuration error: CHAP user name {name!r} is empty, too long or has a NUL")
        if not self.secret:
            raise ValueError("configuration error: empty CHAP secret")
        if (self.mutual_user is None) != (self.mutual_secret is None):
            raise ValueError("configuration error: mutual CHAP needs both mutual_user and mutual_secret")
        if self.mutual_secret is not None:
            if not self.mutual_secret:
                raise ValueError("configuration error: empty mutual CHAP secret")
            # §12.1.3: a secret that authenticates initiators MUST NOT authenticate targets,
            # or a reflected challenge would let an impostor learn a valid response.
            if hmac.compare_digest(self.mutual_secret, self.secret):
                raise ValueError("configuration error: the mutual CHAP secret equals the initiator's secret")


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """What the server says about a target name."""

    name: str
    allowed_initiators: frozenset[str] | None = None  # None: any initiator name
    chap: ChapSecrets | None = None  # None: AuthMethod=None; set: CHAP required
    redirect: str | None = None  # "host:port": answer 0x0101 with TargetAddress=host:port,tpgt
    tpgt: int = 1
    alias: str | None = None  # TargetAlias sent in the first response, if set

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("configuration error: empty target name")
        if not 0 <= self.tpgt <= 0xFFFF:
            raise ValueError(f"configuration error: TargetPortalGroupTag {self.tpgt} is not 16-bit (RFC 7143 §13.9)")
        if self.redirect is not None and not self.redirect:
            raise ValueError("configuration error: empty redirect address")


@dataclass(frozen=True, slots=True)
class TargetLimits:
    """What this target declares and accepts in negotiation."""

    # What initiators may send us in one PDU's data segment. 256 KiB is what
    # open-iscsi declares for itself and the largest Linux LIO accepts by default;
    # one receive buffer of this size per connection.
    max_recv_data_segment_length: int = 256 * 1024
    # The most data in one burst (one R2T's Data-Out sequence, or one Data-In
    # sequence). 1 MiB is one volume segment (DESIGN.md §5), so a burst touches at
    # most two segments, and with max_outstanding_r2t it bounds the solicited
    # write data buffered per command at 4 MiB, half of MAX_TRANSFER_BYTES.
    max_burst_length: int = 1 << 20
    # Unsolicited data (immediate plus unsolicited Data-Out) per command: the RFC
    # default. Over a full command window that is 128 x 64 KiB = 8 MiB of
    # unsolicited data a session can make us buffer before any R2T.
    first_burst_length: int = 64 * 1024
    # R2Ts in flight per command. 4 lets a large write (8 MiB at 1 MiB bursts)
    # overlap the round trips of its bursts; open-iscsi and libiscsi offer 1, so
    # the result there is 1 anyway.
    max_outstanding_r2t: int = 4
    # One connection per session: adding connections (MC/S) needs a login with a
    # non-zero TSIH, which this machine refuses (0x020a).
    max_connections: int = 1
    # ErrorRecoveryLevel 0 (DESIGN.md §7): a failed connection fails the session.
    error_recovery_level: int = 0
    # Logout/reconnect timing (§13.15, §13.16). Time2Retain 0: with ERL 0 there is
    # no connection recovery, so nothing is kept for a reconnect.
    default_time2wait: int = 2
    default_time2retain: int = 0
    # MaxCmdSN - ExpCmdSN + 1 granted: commands an initiator may have queued. 128
    # is open-iscsi's default queue depth (node.session.cmds_max).
    cmd_window: int = 128
    # Our preferences for the boolean keys (§13.10, §13.11, §13.18, §13.19): accept
    # unsolicited and immediate data; keep Data PDUs and sequences in order, which
    # keeps the full feature phase's reassembly a simple append.
    initial_r2t: bool = False
    immediate_data: bool = True
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    # The digests we accept (§13.1); the PDU codec computes CRC32C.
    digests: tuple[str, ...] = ("CRC32C", "None")

    def __post_init__(self) -> None:
        lengths = (self.max_recv_data_segment_length, self.max_burst_length, self.first_burst_length)
        if not all(k.LENGTH_MIN <= n <= k.LENGTH_MAX for n in lengths):
            raise ValueError(f"configuration error: lengths {lengths} outside {k.LENGTH_MIN}..{k.LENGTH_MAX}")
        if self.first_burst_length > self.max_burst_length:
            raise ValueError("configuration error: FirstBurstLength exceeds MaxBurstLength (RFC 7143 §13.14)")
        if not 1 <= self.max_outstanding_r2t <= 65535:
            raise ValueError(f"configuration error: MaxOutstandingR2T {self.max_outstanding_r2t} outside 1..65535")
        if self.max_connections != 1 or self.error_recovery_level != 0:
            raise ValueError("configuration error: floe supports MaxConnections=1 and ErrorRecoveryLevel=0 only")
        if not (0 <= self.default_time2wait <= 3600 and 0 <= self.default_time2retain <= 3600):
            raise ValueError("configuration error: DefaultTime2Wait/Retain outside 0..3600 (RFC 7143 §13.15)")
        # RFC 1982: a window must stay below half the serial number space.
        if not 1 <= self.cmd_window < (1 << 31):
            raise ValueError(f"configuration error: command window {self.cmd_window} outside 1..2**31-1")
        if not self.digests or not set(self.digests) <= {"CRC32C", "None"}:
            raise ValueError(f"configuration error: digests {self.digests} (CRC32C and None are supported)")


@dataclass(frozen=True, slots=True)
class SessionParams:
    """Everything the full feature phase needs, as negotiated."""

    session_type: str  # "Normal" | "Discovery"
    initiator_name: str
    initiator_alias: str | None
    target_name: str | None  # None for discovery
    isid: bytes
    tsih: int
    cid: int
    tpgt: int
    header_digest: bool
    data_digest: bool
    max_recv_data_segment_length_target: int  # what the initiator may send us per PDU (as we declared)
    max_recv_data_segment_length_initiator: int  # what we may send per PDU (as the initiator declared)
    max_burst_length: int
    first_burst_length: int
    initial_r2t: bool
    immediate_data: bool
    max_outstanding_r2t: int
    data_pdu_in_order: bool
    data_sequence_in_order: bool
    error_recovery_level: int
    default_time2wait: int
    default_time2retain: int
    exp_cmdsn: int  # the next CmdSN expected: the login's CmdSN (login requests are immediate)
    statsn: int  # the StatSN of the first full feature response: one past the final login response's


@dataclass(frozen=True, slots=True)
class LoginStep:
    response: LoginResponse  # always one response per request
    done: bool = False  # the final response: full feature phase begins once it is sent
    close: bool = False  # the login failed (status class != 0, a redirect too): close after sending
    params: SessionParams | None = None  # with done
    reason: str = ""  # with close: what went wrong, for the log


class _Failed(Exception):
    """The login cannot go on: answered with `status` (and `data`), then the connection closes."""

    def __init__(self, status: Status, why: str, data: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(why)
        self.status = status
        self.why = why
        self.data = data


def _initiator_fault(why: str) -> _Failed:
    return _Failed(Status.INVALID_DURING_LOGIN, why)


def _auth_failure(why: str, data: tuple[tuple[str, str], ...] = ()) -> _Failed:
    return _Failed(Status.AUTHENTICATION_FAILURE, why, data)


DEFAULT_LIMITS = TargetLimits()


def _our_values(limits: TargetLimits) -> dict[str, str]:
    """What we would pick, given a free choice, for every key we negotiate (AuthMethod aside)."""
    b, n = k.format_bool, k.format_number
    return {
        "HeaderDigest": k.format_list(limits.digests),
        "DataDigest": k.format_list(limits.digests),
        "MaxConnections": n(limits.max_connections),
        "InitialR2T": b(limits.initial_r2t),
        "ImmediateData": b(limits.immediate_data),
        "MaxBurstLength": n(limits.max_burst_length),
        "FirstBurstLength": n(limits.first_burst_length),
        "DefaultTime2Wait": n(limits.default_time2wait),
        "DefaultTime2Retain": n(limits.default_time2retain),
        "MaxOutstandingR2T": n(limits.max_outstanding_r2t),
        "DataPDUInOrder": b(limits.data_pdu_in_order),
        "DataSequenceInOrder": b(limits.data_sequence_in_order),
        "ErrorRecoveryLevel": n(limits.error_recovery_level),
        "TaskReporting": "RFC3720",  # no FastAbort / ResponseFence semantics in the session layer
        "iSCSIProtocolLevel": "1",  # RFC 7143 (§13.24); 2 would promise RFC 7144's features
        "IFMarker": k.NO,
        "OFMarker": k.NO,
    }


_NEGOTIATED_KINDS = frozenset({k.Kind.LIST, k.Kind.AND, k.Kind.OR, k.Kind.MIN, k.Kind.MAX})


class LoginMachine:
    """The target side of one connection's login. Feed it every Login Request in order."""

    def __init__(
        self,
        lookup: Callable[[str], TargetPolicy | None],
        *,
        limits: TargetLimits = DEFAULT_LIMITS,
        tsih_alloc: Callable[[], int],
        random_bytes: Callable[[int], bytes] = os.urandom,
        discovery_chap: ChapSecrets | None = None,
        discovery_tpgt: int = 1,
    ) -> None:
        self._lookup = lookup
        self._limits = limits
        self._tsih_alloc = tsih_alloc
        self._random_bytes = random_bytes
        self._discovery_chap = discovery_chap
        self._discovery_tpgt = discovery_tpgt
        if not 0 <= discovery_tpgt <= 0xFFFF:
            raise ValueError(f"configuration error: TargetPortalGroupTag {discovery_tpgt} is not 16-bit (§13.9)")
        self._ours = _our_values(limits)
        negotiated = {s.name for s in k.KEYS.values() if s.kind in _NEGOTIATED_KINDS} - {"AuthMethod"}
        if set(self._ours) != negotiated:
            raise ValueError(f"local bug: our values do not cover the negotiated keys: {set(self._ours) ^ negotiated}")

        self._stage = SECURITY
        self._closed = False
        self._done = False
        self._ids: tuple[int, bytes, int, int, int, int] | None = None  # ITT, ISID, TSIH, CID, VersionMax/Min
        self._statsn: int | None = None  # the next StatSN; drawn at random for the first response
        self._requests = 0
        self._text = bytearray()  # the text of a request still arriving in Continue PDUs
        self._texts = 0  # complete texts negotiated so far
        self._received: dict[str, str] = {}  # every key the initiator sent, for the renegotiation rule
        self._values: dict[str, str] = {
            s.name: s.default for s in k.KEYS.values() if s.kind in _NEGOTIATED_KINDS and s.default is not None
        }
        self._initiator_mrdsl = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
        self._declared_mrdsl = False

        self._session_type = "Normal"
        self._initiator_name = ""
        self._initiator_alias: str | None = None
        self._target_name: str | None = None
        self._policy: TargetPolicy | None = None
        self._tpgt = discovery_tpgt
        self._chap: ChapSecrets | None = None
        self._auth = Auth.PENDING
        self._offered_auth = False  # we proposed AuthMethod ourselves (target-directed, §6.3.1)
        self._chap_id = 0
        self._chap_challenge = b""

    # ------------------------------------------------------------ public

    @property
    def stage(self) -> int:
        """The current stage: 0 security, 1 operational, 3 full feature (after the final response)."""
        return self._stage

    @property
    def closed(self) -> bool:
        return self._closed

    def receive(self, req: LoginRequest) -> LoginStep:
        if self._closed:
            return self._fail(req, _initiator_fault("login request after the login failed"))
        if self._done:
            return self._fail(req, _initiator_fault("login request in full feature phase"))
        try:
            return self._receive(req)
        except _Failed as failure:
            return self._fail(req, failure)

    # ------------------------------------------------------------ one request

    def _receive(self, req: LoginRequest) -> LoginStep:
        self._requests += 1
        if self._requests > LOGIN_REQUESTS_MAX:
            raise _Failed(Status.INITIATOR_ERROR, f"login still going after {LOGIN_REQUESTS_MAX} requests")
        self._check_header(req)

        if len(self._text) + len(req.data) > k.TEXT_BYTES_MAX:
            raise _initiator_fault(f"login text over {k.TEXT_BYTES_MAX} bytes")
        self._text += req.data
        if req.cont:
            # RFC 7143 §6.1: a PDU with C=1 is answered with an empty PDU, and the
            # text is negotiated once its last PDU (C=0) arrives.
            return LoginStep(self._respond(req, b"", transit=False, nsg=0))
        try:
            pairs = k.parse(bytes(self._text))
        except k.TextError as e:
            raise _initiator_fault(f"malformed login text: {e.why}") from e
        self._text.clear()

        first = self._texts == 0
        self._texts += 1
        if first:
            self._identify(pairs)
        answers = self._negotiate(pairs, first=first)
        answers += self._declarations(first=first)
        transit = req.transit and self._may_leave_stage()
        if not req.transit:
            answers += self._propose_auth()

        data = k.encode(answers)
        if len(data) > LOGIN_RESPONSE_BYTES_MAX:
            # Reachable only by offering hundreds of long unknown keys; we do not split
            # our answers over Continue PDUs.
            raise _Failed(Status.OUT_OF_RESOURCES, f"answer of {len(data)} bytes does not fit one login PDU")
        if not transit:
            return LoginStep(self._respond(req, data, transit=False, nsg=0))
        if req.nsg != FULL_FEATURE:
            response = self._respond(req, data, transit=True, nsg=req.nsg)
            self._stage = req.nsg
            return LoginStep(response)
        tsih = self._tsih_alloc()
        if not 1 <= tsih <= 0xFFFF:
            raise ValueError(f"local bug: tsih_alloc returned {tsih}, not a 16-bit non-zero TSIH")
        response = self._respond(req, data, transit=True, nsg=FULL_FEATURE, tsih=tsih)
        self._stage = FULL_FEATURE
        self._done = True
        return LoginStep(response, done=True, params=self._params(req, tsih, response.statsn))

    def _check_header(self, req: LoginRequest) -> None:
        ids = (req.itt, req.isid, req.tsih, req.cid, req.version_max, req.version_min)
        if self._ids is None:
            if not req.version_min <= VERSION <= req.version_max:
                raise _Failed(Status.UNSUPPORTED_VERSION,
                              f"initiator supports versions {req.version_min}..{req.version_max}, we speak {VERSION}")
            if req.tsih != 0:
                # Adding a connection to a session, or reinstating a connection by TSIH,
                # needs an existing session to join. With MaxConnections=1 and ERL 0 there is
                # none that could take it; the initiator falls back to a leading login
                # (TSIH 0), which reinstates a session by ISID (§6.3.5).
                raise _Failed(Status.SESSION_DOES_NOT_EXIST, f"TSIH {req.tsih}: sessions have one connection")
            if req.csg not in FIRST_STAGES:
                raise _initiator_fault(f"login starts in stage {req.csg} (RFC 7143 §6.3: security or operational)")
            self._ids = ids
            self._stage = req.csg
        else:
            names = ("ITT", "ISID", "TSIH", "CID", "VersionMax", "VersionMin")
            for name, was, now in zip(names, self._ids, ids, strict=True):
                if was != now:
                    raise _initiator_fault(f"{name} changed from {was!r} to {now!r} within one login (§11.12)")
            if req.csg != self._stage:
                raise _initiator_fault(f"request for stage {req.csg} while in the {STAGE_NAMES[self._stage]} stage")
        if req.transit and req.cont:
            raise _initiator_fault("T and C both set (RFC 7143 §11.12.2)")
        if req.transit and req.nsg not in STAGE_TRANSITIONS.get(self._stage, frozenset()):
            raise _initiator_fault(f"no transition from stage {self._stage} to {req.nsg} (§11.12.3)")

    # ------------------------------------------------------------ identification (first complete text)

    def _identify(self, pairs: list[tuple[str, str]]) -> None:
        first: dict[str, str] = {}
        for key, value in pairs:
            first.setdefault(key, value)  # a repeated key is refused later, in _negotiate
        name = first.get("InitiatorName", "")
        if not name:
            raise _Failed(Status.MISSING_PARAMETER, "no InitiatorName in the first login request (RFC 7143 §13.5)")
        if len(name.encode("utf-8")) > ISCSI_NAME_BYTES_MAX:
            raise _initiator_fault(f"InitiatorName over {ISCSI_NAME_BYTES_MAX} bytes")
        session_type = first.get("SessionType", "Normal")
        if session_type not in ("Normal", "Discovery"):
            raise _Failed(Status.SESSION_TYPE_NOT_SUPPORTED, f"SessionType={session_type}")
        target_name = first.get("TargetName")
        self._initiator_name = name
        self._session_type = session_type
        self._received.update({"InitiatorName": name, "SessionType": session_type})
        for key in ("TargetName", "InitiatorAlias"):
            if key in first:
                self._received[key] = first[key]
        if "InitiatorAlias" in first:
            self._initiator_alias = first["InitiatorAlias"]

        if session_type == "Discovery":
            self._chap = self._discovery_chap  # a TargetName, if any, means nothing here
            self._tpgt = self._discovery_tpgt
        else:
            if not target_name:
                raise _Failed(Status.MISSING_PARAMETER, "Normal session without TargetName (RFC 7143 §13.4)")
            try:
                policy = self._lookup(target_name)
            except TargetUnavailable as e:
                raise _Failed(Status.SERVICE_UNAVAILABLE, f"target {target_name!r} unavailable: {e}") from e
            if policy is None:
                raise _Failed(Status.NOT_FOUND, f"no target {target_name!r}")
            if policy.redirect is not None:
                address = f"{policy.redirect},{policy.tpgt}"
                raise _Failed(Status.TARGET_MOVED_TEMPORARILY, f"moved to {address}", (("TargetAddress", address),))
            # iSCSI names compare case-insensitively (RFC 3722 normalizes them to lower case).
            allowed = policy.allowed_initiators
            if allowed is not None and name.lower() not in {a.lower() for a in allowed}:
                raise _Failed(Status.AUTHORIZATION_FAILURE, f"initiator {name!r} may not use target {target_name!r}")
            self._policy = policy
            self._target_name = target_name
            self._chap = policy.chap
            self._tpgt = policy.tpgt
        if self._chap is not None and self._stage != SECURITY:
            raise _auth_failure("login skips the security stage but the target requires CHAP")

    # ------------------------------------------------------------ negotiation

    def _negotiate(self, pairs: list[tuple[str, str]], *, first: bool) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        deferred: list[tuple[k.KeySpec, str]] = []
        auth: dict[str, str] = {}
        now: set[str] = set()
        for key, value in pairs:
            if key in now:
                raise _initiator_fault(f"{key} offered twice in one request (RFC 7143 §6.2)")
            now.add(key)
            spec = k.KEYS.get(key)
            if spec is None:
                answers.append((key, k.NOT_UNDERSTOOD))  # unknown keys, X- and X# extensions (§6.2, §13.5)
                continue
            if k.Sender.INITIATOR not in spec.sender:
                raise _initiator_fault(f"{key} is sent by targets only (RFC {spec.rfc})")
            if self._stage not in spec.stages:
                stage = STAGE_NAMES[self._stage]
                raise _initiator_fault(f"{key} may not be sent in the {stage} stage (RFC {spec.rfc})")
            earlier = self._received.get(key)
            if earlier is not None:
                if (first and key in REPEATABLE_KEYS) or (key in REPEATABLE_KEYS and earlier == value):
                    continue  # applied by _identify, or an identical repeat
                raise _initiator_fault(f"{key} sent again in this login (RFC 7143 §6.2 forbids renegotiation)")
            if spec.use is k.Use.IALL and not first:
                raise _initiator_fault(f"{key} may only be sent in the first login request (RFC {spec.rfc})")
            self._received[key] = value
            if spec.use is k.Use.SECURITY:
                auth[key] = value
            elif k.Irrelevance.NO_UNSOLICITED_DATA in spec.irrelevant_when:
                deferred.append((spec, value))  # its relevance hangs on InitialR2T/ImmediateData in this text
            else:
                answers += self._answer(spec, value)
        for spec, value in deferred:
            answers += self._answer(spec, value)
        answers += self._authenticate(auth)
        return answers

    def _irrelevant(self, spec: k.KeySpec) -> bool:
        conditions = {
            k.Irrelevance.DISCOVERY: self._session_type == "Discovery",
            k.Irrelevance.NO_UNSOLICITED_DATA: (
                self._values["InitialR2T"] == k.YES and self._values["ImmediateData"] == k.NO
            ),
            k.Irrelevance.NO_MARKERS: True,
        }
        return any(conditions[c] for c in spec.irrelevant_when)

    def _answer(self, spec: k.KeySpec, value: str) -> list[tuple[str, str]]:
        if self._irrelevant(spec):
            return [(spec.name, k.IRRELEVANT)]
        if spec.kind is k.Kind.DECLARATIVE:
            try:
                declared = k.check_declaration(spec, value)
            except k.BadValue:
                return [(spec.name, k.REJECT)]
            if spec.name == "MaxRecvDataSegmentLength":
                self._initiator_mrdsl = int(declared)
            elif spec.name == "InitiatorAlias":
                self._initiator_alias = declared
            return []  # declarations are not answered; X#NodeArchitecture is noted and ignored
        ours = self._ours[spec.name]
        if spec.name == "FirstBurstLength":  # §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength
            ours = k.format_number(min(int(ours), int(self._values["MaxBurstLength"])))
        outcome = k.negotiate(spec, value, ours)
        if outcome.value is not None:
            self._values[spec.name] = outcome.value
        return [(spec.name, outcome.answer)]

    def _declarations(self, *, first: bool) -> list[tuple[str, str]]:
        """What we state on our own: TargetPortalGroupTag (and TargetAlias) in the response
        to the first complete request of a Normal session (§13.9), and our
        MaxRecvDataSegmentLength in the first response of the operational stage (§13.12)."""
        out: list[tuple[str, str]] = []
        if first and self._policy is not None:
            out.append(("TargetPortalGroupTag", k.format_number(self._tpgt)))
            if self._policy.alias is not None:
                out.append(("TargetAlias", self._policy.alias))
        if self._stage == OPERATIONAL and not self._declared_mrdsl:
            out.append(("MaxRecvDataSegmentLength", k.format_number(self._limits.max_recv_data_segment_length)))
            self._declared_mrdsl = True
        return out

    def _may_leave_stage(self) -> bool:
        """Whether a request with T=1 gets T=1 back. Only the security stage has work that
        must finish first: we never offer operational keys, so nothing waits for an answer."""
        if self._stage != SECURITY or self._auth in AUTH_COMPLETE:
            return True
        if self._auth is Auth.PENDING:
            if self._chap is None:
                return True  # no AuthMethod offered, none required
            raise _auth_failure("initiator leaves the security stage without AuthMethod; the target requires CHAP")
        return False  # CHAP under way: answer T=0 until it is done (§6.3.1)

    # ------------------------------------------------------------ authentication

    def _propose_auth(self) -> list[tuple[str, str]]:
        """§6.3.1: "the negotiation might also be directed by the target if the initiator does
        support security but is not ready to direct the negotiation (propose options)". When
        a CHAP target gets a security-stage request with T=0 and no AuthMethod, it offers
        AuthMethod=CHAP, once; the initiator's answer is negotiated like an offer."""
        if self._stage != SECURITY or self._auth is not Auth.PENDING or self._chap is None or self._offered_auth:
            return []
        self._offered_auth = True
        return [("AuthMethod", "CHAP")]

    def _authenticate(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if "AuthMethod" in keys:
            acceptable = "CHAP" if self._chap is not None else "None"
            outcome = k.negotiate(k.KEYS["AuthMethod"], keys["AuthMethod"], acceptable)
            if outcome.value is None:
                # §6.3.1: the target answers Reject when it supports none of the offered methods.
                raise _auth_failure(f"AuthMethod={keys['AuthMethod']}: we require {acceptable}",
                                    (("AuthMethod", k.REJECT),))
            out.append(("AuthMethod", outcome.answer))
            self._auth = Auth.NONE if outcome.value == "None" else Auth.CHAP_WAIT_A
        chap = {key: value for key, value in keys.items() if key != "AuthMethod"}
        if not chap:
            return out
        step = CHAP_STEPS.get(self._auth)
        if step is None:
            raise _auth_failure(f"CHAP keys {sorted(chap)} while {self._auth.value}")
        if not step.required <= set(chap) <= step.allowed:
            raise _auth_failure(f"CHAP keys {sorted(chap)} while {self._auth.value} (RFC 7143 §12.1.3)")
        if self._auth is Auth.CHAP_WAIT_A:
            out += self._send_challenge(chap["CHAP_A"])
        else:
            out += self._chap_verify(chap)
        self._auth = step.next
        return out

    def _random(self, n: int) -> bytes:
        data = self._random_bytes(n)
        if len(data) != n:
            raise ValueError(f"local bug: random_bytes({n}) returned {len(data)} bytes")
        return data

    def _send_challenge(self, offered: str) -> list[tuple[str, str]]:
        try:
            algorithms = k.parse_list(offered)
        except k.BadValue as e:
            raise _auth_failure(f"CHAP_A={offered!r}: {e}", (("CHAP_A", k.REJECT),)) from e
        numbers = set()
        for a in algorithms:  # values we do not know are ignored (§6.2.1)
            try:
                numbers.add(k.parse_number(a))
            except k.BadValue:
                continue
        if CHAP_MD5 not in numbers:
            raise _auth_failure(f"CHAP_A={offered}: we support only {CHAP_MD5} (MD5)", (("CHAP_A", k.REJECT),))
        self._chap_id = self._random(1)[0]
        self._chap_challenge = self._random(CHAP_CHALLENGE_BYTES)
        return [("CHAP_A", str(CHAP_MD5)), ("CHAP_I", k.format_number(self._chap_id)),
                ("CHAP_C", k.format_binary(self._chap_challenge))]

    def _chap_verify(self, chap: dict[str, str]) -> list[tuple[str, str]]:
        secrets = self._chap
        if secrets is None:
            raise ValueError("local bug: CHAP exchange without CHAP secrets")
        try:
            response = k.parse_binary(chap["CHAP_R"])
        except k.BadValue as e:
            raise _auth_failure(f"CHAP_R: {e}") from e
        expected = chap_response(self._chap_id, secrets.secret, self._chap_challenge)
        # Both compared in constant time, and both always, so timing tells nothing about which failed.
        name_ok = hmac.compare_digest(chap["CHAP_N"].encode("utf-8"), secrets.user.encode("utf-8"))
        response_ok = hmac.compare_digest(response, expected)
        if not (name_ok and response_ok):
            raise _auth_failure(f"CHAP_N={chap['CHAP_N']!r}: wrong name or response")
        if "CHAP_I" not in chap and "CHAP_C" not in chap:
            return []
        # Mutual CHAP: the initiator authenticates us in turn.
        if "CHAP_I" not in chap or "CHAP_C" not in chap:
            raise _auth_failure("mutual CHAP needs both CHAP_I and CHAP_C")
        if secrets.mutual_user is None or secrets.mutual_secret is None:
            raise _auth_failure("initiator asks for mutual CHAP; no target secret is configured")
        try:
            ident = k.parse_number(chap["CHAP_I"])
            challenge = k.parse_binary(chap["CHAP_C"])
        except k.BadValue as e:
            raise _auth_failure(f"mutual CHAP: {e}") from e
        if ident > CHAP_ID_MAX:
            raise _auth_failure(f"CHAP_I={ident} is not one octet")
        if not 1 <= len(challenge) <= CHAP_BINARY_BYTES_MAX:
            raise _auth_failure(f"CHAP_C of {len(challenge)} bytes (1..{CHAP_BINARY_BYTES_MAX}, §12.1.3)")
        if hmac.compare_digest(challenge, self._chap_challenge):
            # §12.1.3: a reflected challenge would make us compute the answer to our own question.
            raise _auth_failure("initiator's CHAP_C repeats our challenge (reflection)")
        answer = chap_response(ident, secrets.mutual_secret, challenge)
        return [("CHAP_N", secrets.mutual_user), ("CHAP_R", k.format_binary(answer))]

    # ------------------------------------------------------------ responses

    def _next_statsn(self) -> int:
        if self._statsn is None:
            self._statsn = int.from_bytes(self._random(4), "big")
        statsn = self._statsn
        self._statsn = (statsn + 1) % SERIAL_MOD
        return statsn

    def _respond(self, req: LoginRequest, data: bytes, *, transit: bool, nsg: int, tsih: int = 0) -> LoginResponse:
        cmdsn = req.cmdsn % SERIAL_MOD
        return LoginResponse(
            itt=req.itt, isid=req.isid, tsih=tsih, statsn=self._next_statsn(), expcmdsn=cmdsn,
            maxcmdsn=(cmdsn + self._limits.cmd_window - 1) % SERIAL_MOD, status_class=0, status_detail=0,
            transit=transit, cont=False, csg=self._stage, nsg=nsg if transit else 0,
            version_max=VERSION, version_active=VERSION, data=data,
        )

    def _fail(self, req: LoginRequest, failure: _Failed) -> LoginStep:
        self._closed = True
        self._text.clear()
        cmdsn = req.cmdsn % SERIAL_MOD
        # StatSN, ExpCmdSN and MaxCmdSN mean nothing unless Status-Class is 0 (§11.13.4);
        # they are filled consistently anyway.
        response = LoginResponse(
            itt=req.itt, isid=req.isid, tsih=req.tsih, statsn=self._next_statsn(), expcmdsn=cmdsn,
            maxcmdsn=(cmdsn + self._limits.cmd_window - 1) % SERIAL_MOD,
            status_class=failure.status >> 8, status_detail=failure.status & 0xFF,
            transit=False, cont=False, csg=self._stage if self._stage != FULL_FEATURE else OPERATIONAL, nsg=0,
            version_max=VERSION, version_active=VERSION, data=k.encode(failure.data),
        )
        return LoginStep(response, close=True, reason=f"{failure.status.name}: {failure.why}")

    def _params(self, req: LoginRequest, tsih: int, last_statsn: int) -> SessionParams:
        v = self._values
        max_burst = int(v["MaxBurstLength"])
        return SessionParams(
            session_type=self._session_type,
            initiator_name=self._initiator_name,
            initiator_alias=self._initiator_alias,
            target_name=self._target_name,
            isid=req.isid,
            tsih=tsih,
            cid=req.cid,
            tpgt=self._tpgt,
            header_digest=v["HeaderDigest"] == "CRC32C",
            data_digest=v["DataDigest"] == "CRC32C",
            max_recv_data_segment_length_target=(
                self._limits.max_recv_data_segment_length if self._declared_mrdsl
                else DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH  # a login that skipped the operational stage
            ),
            max_recv_data_segment_length_initiator=self._initiator_mrdsl,
            max_burst_length=max_burst,
            # Offered in separate requests, FirstBurstLength could have been answered before a
            # smaller MaxBurstLength; §13.14 bounds it by MaxBurstLength either way.
            first_burst_length=min(int(v["FirstBurstLength"]), max_burst),
            initial_r2t=v["InitialR2T"] == k.YES,
            immediate_data=v["ImmediateData"] == k.YES,
            max_outstanding_r2t=int(v["MaxOutstandingR2T"]),
            data_pdu_in_order=v["DataPDUInOrder"] == k.YES,
            data_sequence_in_order=v["DataSequenceInOrder"] == k.YES,
            error_recovery_level=int(v["ErrorRecoveryLevel"]),
            default_time2wait=int(v["DefaultTime2Wait"]),
            default_time2retain=int(v["DefaultTime2Retain"]),
            exp_cmdsn=req.cmdsn % SERIAL_MOD,
            statsn=(last_statsn + 1) % SERIAL_MOD,
        )
