"""Login phase of the iSCSI target (iscsi/keys.py, iscsi/login.py; RFC 7143 §6, §11.12-13, §12, §13).

The transcripts replay what real initiators send (libiscsi lib/login.c, open-iscsi's
iscsid) and compare the target's whole answer, so a behaviour change shows up as a
readable diff. CHAP responses are computed here with hashlib, independently of the
code under test. The rule tables cover one RFC rule per row; the fuzzers feed random
request sequences and random Continue splits.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi import keys
from iscsi.keys import BadValue, TextError
from iscsi.login import (
    CHAP_CHALLENGE_BYTES,
    DEFAULT_LIMITS,
    LOGIN_REQUESTS_MAX,
    ChapSecrets,
    LoginMachine,
    LoginStep,
    SessionParams,
    Status,
    TargetLimits,
    TargetPolicy,
)
from iscsi.pdu import LoginRequest, LoginResponse

# The machine is shared with other test runs: judge correctness, not speed.
SLOW_OK = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

ISID = bytes.fromhex("400001370000")
INITIATOR = "iqn.2004-10.com.ubuntu:01:5e7d1f9a3b2c"
TARGET = "iqn.2026-11.io.floe:acme.vol1"
CHAP_TARGET = "iqn.2026-11.io.floe:acme.secure"
MUTUAL_TARGET = "iqn.2026-11.io.floe:acme.mutual"
MOVED_TARGET = "iqn.2026-11.io.floe:acme.moved"
ACL_TARGET = "iqn.2026-11.io.floe:acme.acl"

SECRETS = ChapSecrets(user="alice", secret=b"alice-secret-12")
MUTUAL = ChapSecrets(user="alice", secret=b"alice-secret-12",
                     mutual_user="floe-target", mutual_secret=b"target-secret-99")
POLICIES = {
    TARGET: TargetPolicy(TARGET),
    CHAP_TARGET: TargetPolicy(CHAP_TARGET, chap=SECRETS, tpgt=2),
    MUTUAL_TARGET: TargetPolicy(MUTUAL_TARGET, chap=MUTUAL),
    MOVED_TARGET: TargetPolicy(MOVED_TARGET, redirect="10.0.0.2:3260", tpgt=3),
    ACL_TARGET: TargetPolicy(ACL_TARGET, allowed_initiators=frozenset({"iqn.1991-05.com.microsoft:host1"})),
}
TSIH = 7
STATSN0 = 0x11223344  # the first StatSN, from FixedRandom's first 4 bytes


class FixedRandom:
    """random_bytes for tests: a StatSN of STATSN0 first, then seeded bytes; remembers what it gave."""

    def __init__(self, seed: int = 1) -> None:
        self._rng = random.Random(seed)
        self.given: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        data = STATSN0.to_bytes(4, "big") if not self.given and n == 4 else self._rng.randbytes(n)
        self.given.append(data)
        return data


def machine(*, random_bytes: Callable[[int], bytes] | None = None, limits: TargetLimits = DEFAULT_LIMITS,
            discovery_chap: ChapSecrets | None = None) -> LoginMachine:
    return LoginMachine(POLICIES.get, limits=limits, tsih_alloc=lambda: TSIH,
                        random_bytes=random_bytes or FixedRandom(), discovery_chap=discovery_chap)


def text(*pairs: tuple[str, str]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def req(data: bytes = b"", *, csg: int, nsg: int = 0, transit: bool = False, cont: bool = False,
        itt: int = 0x1234, isid: bytes = ISID, tsih: int = 0, cid: int = 0, cmdsn: int = 100,
        vmax: int = 0, vmin: int = 0) -> LoginRequest:
    return LoginRequest(itt=itt, isid=isid, tsih=tsih, cid=cid, cmdsn=cmdsn, transit=transit, cont=cont, csg=csg,
                        nsg=nsg, version_max=vmax, version_min=vmin, data=data)


def answers(step: LoginStep) -> list[tuple[str, str]]:
    return keys.parse(step.response.data)


def status(step: LoginStep) -> int:
    return step.response.status_class << 8 | step.response.status_detail


def ok(step: LoginStep) -> LoginStep:
    if status(step) != 0 or step.close:
        raise AssertionError(f"login failed: {step.reason} {answers(step)}")
    return step


def failed(step: LoginStep, expected: Status) -> LoginStep:
    assert step.close, step
    assert status(step) == expected, f"{status(step):#06x} != {expected:#06x}: {step.reason}"
    assert not step.done and step.params is None
    return step


def md5(ident: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes([ident]) + secret + challenge).digest()


IDENTITY = (("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"))

# What libiscsi's iscsi_login_async sends in its operational stage (lib/login.c), in its order.
LIBISCSI_OPERATIONAL = (
    ("HeaderDigest", "None,CRC32C"), ("DataDigest", "None"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"), ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"), ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0"), ("IFMarker", "No"),
    ("OFMarker", "No"), ("MaxConnections", "1"), ("MaxRecvDataSegmentLength", "262144"),
    ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
)
LIBISCSI_ANSWERS = [
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0"), ("IFMarker", "No"), ("OFMarker", "No"),
    ("MaxConnections", "1"), ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"), ("FirstBurstLength", "65536"),
]

# What open-iscsi (iscsid) sends in its operational stage with default settings.
OPEN_ISCSI_OPERATIONAL = (
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
    ("IFMarker", "No"), ("OFMarker", "No"), ("ErrorRecoveryLevel", "0"), ("InitialR2T", "No"),
    ("ImmediateData", "Yes"), ("MaxBurstLength", "16776192"), ("FirstBurstLength", "262144"),
    ("MaxConnections", "1"), ("MaxRecvDataSegmentLength", "262144"), ("MaxOutstandingR2T", "1"),
    ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
)


# ================================================================ transcripts of real initiators


def test_libiscsi_one_shot_login_without_auth() -> None:
    """libiscsi without a user name starts in the operational stage and asks for full feature at once."""
    m = machine()
    step = ok(m.receive(req(text(*IDENTITY, *LIBISCSI_OPERATIONAL), csg=1, nsg=3, transit=True)))
    assert answers(step) == [*LIBISCSI_ANSWERS, ("TargetPortalGroupTag", "1"), ("MaxRecvDataSegmentLength", "262144")]
    r = step.response
    assert (r.transit, r.cont, r.csg, r.nsg, r.tsih) == (True, False, 1, 3, TSIH)
    assert (r.statsn, r.expcmdsn, r.maxcmdsn) == (STATSN0, 100, 100 + 127)
    assert (r.itt, r.isid, r.version_max, r.version_active) == (0x1234, ISID, 0, 0)
    assert step.done and m.stage == 3
    assert step.params == SessionParams(
        session_type="Normal", initiator_name=INITIATOR, initiator_alias=None, target_name=TARGET, isid=ISID,
        tsih=TSIH, cid=0, tpgt=1, header_digest=False, data_digest=False,
        max_recv_data_segment_length_target=262144, max_recv_data_segment_length_initiator=262144,
        max_burst_length=262144, first_burst_length=65536, initial_r2t=False, immediate_data=True,
        max_outstanding_r2t=1, data_pdu_in_order=True, data_sequence_in_order=True, error_recovery_level=0,
        default_time2wait=2, default_time2retain=0, exp_cmdsn=100, statsn=STATSN0 + 1,
    )


def test_open_iscsi_security_none_then_operational() -> None:
    """open-iscsi with no CHAP: AuthMethod=None in the security stage, then operational, then full feature."""
    m = machine()
    first = ok(m.receive(req(text(("InitiatorName", INITIATOR), ("InitiatorAlias", "host1"), ("TargetName", TARGET),
                                  ("SessionType", "Normal"), ("AuthMethod", "None")), csg=0, nsg=1, transit=True)))
    assert answers(first) == [("AuthMethod", "None"), ("TargetPortalGroupTag", "1")]
    assert (first.response.transit, first.response.csg, first.response.nsg, first.response.tsih) == (True, 0, 1, 0)
    assert m.stage == 1 and not first.done
    final = ok(m.receive(req(text(*OPEN_ISCSI_OPERATIONAL), csg=1, nsg=3, transit=True)))
    assert answers(final) == [
        ("HeaderDigest", "None"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"), ("OFMarker", "No"), ("ErrorRecoveryLevel", "0"), ("InitialR2T", "No"),
        ("ImmediateData", "Yes"), ("MaxBurstLength", "1048576"), ("MaxConnections", "1"),
        ("MaxOutstandingR2T", "1"), ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
        ("FirstBurstLength", "65536"), ("MaxRecvDataSegmentLength", "262144"),
    ]
    assert final.done and final.response.statsn == STATSN0 + 1 and final.response.tsih == TSIH
    assert final.params is not None
    assert (final.params.initiator_alias, final.params.max_burst_length, final.params.statsn) == (
        "host1", 1 << 20, STATSN0 + 2)


def chap_login_to_challenge(m: LoginMachine, target: str = CHAP_TARGET) -> tuple[int, bytes]:
    """libiscsi's first two security PDUs; returns the target's CHAP_I and CHAP_C."""
    first = ok(m.receive(req(text(("InitiatorName", INITIATOR), ("TargetName", target), ("SessionType", "Normal"),
                                  ("AuthMethod", "CHAP,None")), csg=0, nsg=1, transit=True)))
    tpgt = str(POLICIES[target].tpgt)
    assert answers(first) == [("AuthMethod", "CHAP"), ("TargetPortalGroupTag", tpgt)]
    assert not first.response.transit, "CHAP is not done: the target must not leave the security stage"
    second = ok(m.receive(req(text(("CHAP_A", "5")), csg=0)))
    got = dict(answers(second))
    assert list(got) == ["CHAP_A", "CHAP_I", "CHAP_C"] and got["CHAP_A"] == "5"
    challenge = keys.parse_binary(got["CHAP_C"])
    assert got["CHAP_C"].startswith("0x") and len(challenge) == CHAP_CHALLENGE_BYTES
    assert second.response.statsn == STATSN0 + 1
    return int(got["CHAP_I"]), challenge


def test_libiscsi_chap_security_then_operational_then_full_feature() -> None:
    m = machine()
    ident, challenge = chap_login_to_challenge(m)
    response = md5(ident, SECRETS.secret, challenge)
    third = ok(m.receive(req(text(("CHAP_N", "alice"), ("CHAP_R", "0x" + response.hex().upper())),
                             csg=0, nsg=1, transit=True)))
    assert answers(third) == []
    assert (third.response.transit, third.response.csg, third.response.nsg) == (True, 0, 1)
    # libiscsi repeats its identity keys in the operational stage: identical repeats are fine.
    final = ok(m.receive(req(text(*[(k, v.replace(TARGET, CHAP_TARGET)) for k, v in IDENTITY], *LIBISCSI_OPERATIONAL),
                             csg=1, nsg=3, transit=True)))
    assert answers(final) == [*LIBISCSI_ANSWERS, ("MaxRecvDataSegmentLength", "262144")]
    assert final.done and final.params is not None and final.params.tpgt == 2
    assert final.params.statsn == STATSN0 + 4


def test_chap_response_in_base64_is_accepted() -> None:
    m = machine()
    ident, challenge = chap_login_to_challenge(m)
    b64 = "0b" + base64.b64encode(md5(ident, SECRETS.secret, challenge)).decode()
    ok(m.receive(req(text(("CHAP_N", "alice"), ("CHAP_R", b64)), csg=0, nsg=1, transit=True)))


@pytest.mark.parametrize("initiator_thinks_target_secret, target_authenticated", [
    (b"target-secret-99", True),   # the initiator's copy of the target secret matches
    (b"target-secret-00", False),  # a wrong target secret: the initiator must refuse the target
])
def test_mutual_chap(initiator_thinks_target_secret: bytes, target_authenticated: bool) -> None:
    m = machine()
    ident, challenge = chap_login_to_challenge(m, MUTUAL_TARGET)
    my_ident, my_challenge = 42, bytes(range(32))
    step = ok(m.receive(req(text(("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(ident, MUTUAL.secret, challenge).hex()),
                                 ("CHAP_I", str(my_ident)), ("CHAP_C", "0x" + my_challenge.hex())),
                            csg=0, nsg=1, transit=True)))
    got = dict(answers(step))
    assert got["CHAP_N"] == "floe-target"
    expected = md5(my_ident, initiator_thinks_target_secret, my_challenge)
    assert (keys.parse_binary(got["CHAP_R"]) == expected) is target_authenticated
    assert step.response.transit and step.response.nsg == 1


def test_mutual_chap_refuses_a_reflected_challenge() -> None:
    """RFC 7143 §12.1.3: the initiator's CHAP_C must not be the challenge we sent."""
    m = machine()
    ident, challenge = chap_login_to_challenge(m, MUTUAL_TARGET)
    step = m.receive(req(text(("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(ident, MUTUAL.secret, challenge).hex()),
                              ("CHAP_I", str(ident)), ("CHAP_C", "0x" + challenge.hex())), csg=0, nsg=1, transit=True))
    failed(step, Status.AUTHENTICATION_FAILURE)
    assert "reflection" in step.reason and answers(step) == []


CHAP_FAILURES: list[tuple[str, Callable[[int, bytes], tuple[tuple[str, str], ...]], str]] = [
    ("wrong secret", lambda i, c: (("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(i, b"guess", c).hex())), CHAP_TARGET),
    ("wrong name", lambda i, c: (("CHAP_N", "mallory"), ("CHAP_R", "0x" + md5(i, SECRETS.secret, c).hex())),
     CHAP_TARGET),
    ("wrong identifier", lambda i, c: (("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(i ^ 1, SECRETS.secret, c).hex())),
     CHAP_TARGET),
    ("response not binary", lambda i, c: (("CHAP_N", "alice"), ("CHAP_R", "hello")), CHAP_TARGET),
    ("response truncated", lambda i, c: (("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(i, SECRETS.secret, c)[:8].hex())),
     CHAP_TARGET),
    ("no CHAP_N", lambda i, c: (("CHAP_R", "0x" + md5(i, SECRETS.secret, c).hex()),), CHAP_TARGET),
    ("mutual asked, none configured",
     lambda i, c: (("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(i, SECRETS.secret, c).hex()), ("CHAP_I", "1"),
                   ("CHAP_C", "0x0102030405060708")), CHAP_TARGET),
    ("mutual with CHAP_C only",
     lambda i, c: (("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(i, MUTUAL.secret, c).hex()),
                   ("CHAP_C", "0x0102030405060708")), MUTUAL_TARGET),
    ("mutual identifier not one octet",
     lambda i, c: (("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(i, MUTUAL.secret, c).hex()), ("CHAP_I", "256"),
                   ("CHAP_C", "0x0102030405060708")), MUTUAL_TARGET),
    ("mutual challenge over 1024 bytes",
     lambda i, c: (("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(i, MUTUAL.secret, c).hex()), ("CHAP_I", "9"),
                   ("CHAP_C", "0x" + "ab" * 1025)), MUTUAL_TARGET),
    ("mutual challenge not binary",
     lambda i, c: (("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(i, MUTUAL.secret, c).hex()), ("CHAP_I", "9"),
                   ("CHAP_C", "0xZZ")), MUTUAL_TARGET),
    ("CHAP_A again", lambda i, c: (("CHAP_A", "5"), ("CHAP_N", "alice")), CHAP_TARGET),
]


@pytest.mark.parametrize("name, keys_for, target", CHAP_FAILURES, ids=[c[0] for c in CHAP_FAILURES])
def test_chap_failures_are_authentication_failures(
        name: str, keys_for: Callable[[int, bytes], tuple[tuple[str, str], ...]], target: str) -> None:
    m = machine()
    ident, challenge = chap_login_to_challenge(m, target)
    step = failed(m.receive(req(text(*keys_for(ident, challenge)), csg=0, nsg=1, transit=True)),
                  Status.AUTHENTICATION_FAILURE if name != "CHAP_A again" else Status.INVALID_DURING_LOGIN)
    assert m.closed and step.response.transit is False


SECURITY_FAILURES = [
    ("skips security for a CHAP target", req(text(("InitiatorName", INITIATOR), ("TargetName", CHAP_TARGET)),
                                             csg=1, nsg=3, transit=True), [], Status.AUTHENTICATION_FAILURE),
    ("offers only None to a CHAP target",
     req(text(("InitiatorName", INITIATOR), ("TargetName", CHAP_TARGET), ("AuthMethod", "None")), csg=0, nsg=1,
         transit=True), [("AuthMethod", "Reject")], Status.AUTHENTICATION_FAILURE),
    ("offers only CHAP to a no-auth target",
     req(text(("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "CHAP")), csg=0, nsg=1,
         transit=True), [("AuthMethod", "Reject")], Status.AUTHENTICATION_FAILURE),
    ("leaves security without AuthMethod",
     req(text(("InitiatorName", INITIATOR), ("TargetName", CHAP_TARGET)), csg=0, nsg=1, transit=True), [],
     Status.AUTHENTICATION_FAILURE),
    ("CHAP keys before AuthMethod", req(text(("InitiatorName", INITIATOR), ("TargetName", CHAP_TARGET),
                                             ("CHAP_A", "5")), csg=0), [], Status.AUTHENTICATION_FAILURE),
    ("AuthMethod in the operational stage",
     req(text(("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "None")), csg=1, nsg=3,
         transit=True), [], Status.INVALID_DURING_LOGIN),
]


@pytest.mark.parametrize("name, request_, data, expected", SECURITY_FAILURES, ids=[c[0] for c in SECURITY_FAILURES])
def test_security_stage_failures(name: str, request_: LoginRequest, data: list[tuple[str, str]],
                                 expected: Status) -> None:
    step = failed(machine().receive(request_), expected)
    assert answers(step) == data


def test_chap_without_md5_is_refused() -> None:
    m = machine()
    ok(m.receive(req(text(("InitiatorName", INITIATOR), ("TargetName", CHAP_TARGET), ("AuthMethod", "CHAP")),
                     csg=0, nsg=1, transit=True)))
    step = failed(m.receive(req(text(("CHAP_A", "7,6")), csg=0)), Status.AUTHENTICATION_FAILURE)
    assert answers(step) == [("CHAP_A", "Reject")]


def test_malformed_chap_a_is_refused() -> None:
    m = machine()
    ok(m.receive(req(text(("InitiatorName", INITIATOR), ("TargetName", CHAP_TARGET), ("AuthMethod", "CHAP")),
                     csg=0, nsg=1, transit=True)))
    step = failed(m.receive(req(text(("CHAP_A", "5,,7")), csg=0)), Status.AUTHENTICATION_FAILURE)
    assert answers(step) == [("CHAP_A", "Reject")]


def test_auth_method_and_chap_a_in_one_request() -> None:
    m = machine()
    step = ok(m.receive(req(text(("InitiatorName", INITIATOR), ("TargetName", CHAP_TARGET), ("AuthMethod", "CHAP"),
                                 ("CHAP_A", "5")), csg=0, nsg=1, transit=True)))
    assert [k for k, _ in answers(step)] == ["AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "TargetPortalGroupTag"]
    assert not step.response.transit


def test_chap_a_list_picks_md5_among_unknown_algorithms() -> None:
    m = machine()
    ok(m.receive(req(text(("InitiatorName", INITIATOR), ("TargetName", CHAP_TARGET), ("AuthMethod", "CHAP")),
                     csg=0, nsg=1, transit=True)))
    assert dict(answers(ok(m.receive(req(text(("CHAP_A", "7,sha,0x5")), csg=0)))))["CHAP_A"] == "5"


def test_target_directed_security_negotiation() -> None:
    """§6.3.1: an initiator that proposes nothing (T=0) gets AuthMethod=CHAP offered by the target."""
    m = machine()
    step = ok(m.receive(req(text(("InitiatorName", INITIATOR), ("TargetName", CHAP_TARGET)), csg=0)))
    assert answers(step) == [("TargetPortalGroupTag", "2"), ("AuthMethod", "CHAP")]
    ok(m.receive(req(text(("AuthMethod", "CHAP")), csg=0)))
    assert list(dict(answers(ok(m.receive(req(text(("CHAP_A", "5")), csg=0)))))) == ["CHAP_A", "CHAP_I", "CHAP_C"]


def test_security_stage_without_auth_method_on_a_no_auth_target() -> None:
    """No AuthMethod offered and none required: the security stage may end at once; a
    late InitiatorAlias and the target's alias are declared along the way."""
    aliased = {**POLICIES, TARGET: TargetPolicy(TARGET, alias="vol1 on floe")}
    m = LoginMachine(aliased.get, tsih_alloc=lambda: TSIH, random_bytes=FixedRandom())
    first = ok(m.receive(req(text(("InitiatorName", INITIATOR), ("TargetName", TARGET)), csg=0, nsg=1, transit=True)))
    assert answers(first) == [("TargetPortalGroupTag", "1"), ("TargetAlias", "vol1 on floe")]
    assert first.response.transit and first.response.nsg == 1
    final = ok(m.receive(req(text(("InitiatorAlias", "late")), csg=1, nsg=3, transit=True)))
    assert answers(final) == [("MaxRecvDataSegmentLength", "262144")]
    assert final.params is not None and final.params.initiator_alias == "late"


def test_security_stage_straight_to_full_feature() -> None:
    """0 -> 3 is legal; without an operational stage nothing was declared, so defaults hold."""
    m = machine()
    step = ok(m.receive(req(text(*IDENTITY, ("AuthMethod", "None")), csg=0, nsg=3, transit=True)))
    assert step.done and step.params is not None
    assert step.params.max_recv_data_segment_length_target == 8192
    assert step.params.max_recv_data_segment_length_initiator == 8192
    assert step.params.max_burst_length == 262144 and step.params.default_time2retain == 20


def test_chap_on_discovery_when_configured() -> None:
    m = machine(discovery_chap=SECRETS)
    disc = (("InitiatorName", INITIATOR), ("SessionType", "Discovery"))
    failed(m.receive(req(text(*disc), csg=1, nsg=3, transit=True)), Status.AUTHENTICATION_FAILURE)
    m = machine(discovery_chap=SECRETS)
    step = ok(m.receive(req(text(*disc, ("AuthMethod", "CHAP,None")), csg=0, nsg=1, transit=True)))
    assert answers(step) == [("AuthMethod", "CHAP")]  # no TargetPortalGroupTag: no TargetName


# ================================================================ leading login: who and where


LEADING_FAILURES = [
    ("no InitiatorName", text(("TargetName", TARGET)), Status.MISSING_PARAMETER, []),
    ("empty InitiatorName", text(("InitiatorName", ""), ("TargetName", TARGET)), Status.MISSING_PARAMETER, []),
    ("no TargetName for Normal", text(("InitiatorName", INITIATOR)), Status.MISSING_PARAMETER, []),
    ("unknown target", text(("InitiatorName", INITIATOR), ("TargetName", "iqn.2026-11.io.floe:nope")),
     Status.NOT_FOUND, []),
    ("redirect", text(("InitiatorName", INITIATOR), ("TargetName", MOVED_TARGET)), Status.TARGET_MOVED_TEMPORARILY,
     [("TargetAddress", "10.0.0.2:3260,3")]),
    ("initiator not in ACL", text(("InitiatorName", INITIATOR), ("TargetName", ACL_TARGET)),
     Status.AUTHORIZATION_FAILURE, []),
    ("session type unknown", text(("InitiatorName", INITIATOR), ("SessionType", "Boot")),
     Status.SESSION_TYPE_NOT_SUPPORTED, []),
    ("InitiatorName too long", text(("InitiatorName", "iqn." + "a" * 220), ("TargetName", TARGET)),
     Status.INVALID_DURING_LOGIN, []),
]


@pytest.mark.parametrize("name, data, expected, reply", LEADING_FAILURES, ids=[c[0] for c in LEADING_FAILURES])
def test_leading_login_failures(name: str, data: bytes, expected: Status, reply: list[tuple[str, str]]) -> None:
    m = machine()
    step = failed(m.receive(req(data, csg=1, nsg=3, transit=True)), expected)
    assert answers(step) == reply
    assert step.response.status_class == expected >> 8  # class 1 for the redirect, 2 otherwise
    # Whatever comes next is answered with close too.
    failed(m.receive(req(text(*IDENTITY), csg=1, nsg=3, transit=True)), Status.INVALID_DURING_LOGIN)


def test_acl_names_compare_case_insensitively() -> None:
    step = machine().receive(req(text(("InitiatorName", "iqn.1991-05.com.Microsoft:HOST1"), ("TargetName", ACL_TARGET)),
                                 csg=1, nsg=3, transit=True))
    assert ok(step).done


def test_discovery_session() -> None:
    m = machine()
    step = ok(m.receive(req(text(("InitiatorName", INITIATOR), ("SessionType", "Discovery"),
                                 ("HeaderDigest", "CRC32C,None"), ("DataDigest", "None"),
                                 ("MaxBurstLength", "262144"), ("InitialR2T", "No"), ("MaxConnections", "1"),
                                 ("ErrorRecoveryLevel", "0"), ("MaxRecvDataSegmentLength", "32768")),
                            csg=1, nsg=3, transit=True)))
    assert answers(step) == [
        ("HeaderDigest", "CRC32C"), ("DataDigest", "None"), ("MaxBurstLength", "Irrelevant"),
        ("InitialR2T", "Irrelevant"), ("MaxConnections", "Irrelevant"), ("ErrorRecoveryLevel", "0"),
        ("MaxRecvDataSegmentLength", "262144"),
    ]
    params = step.params
    assert params is not None and params.session_type == "Discovery" and params.target_name is None
    assert params.header_digest and not params.data_digest and params.max_recv_data_segment_length_initiator == 32768


def test_discovery_ignores_a_target_name() -> None:
    step = ok(machine().receive(req(text(("InitiatorName", INITIATOR), ("SessionType", "Discovery"),
                                         ("TargetName", "iqn.2026-11.io.floe:nope")), csg=1, nsg=3, transit=True)))
    assert step.params is not None and step.params.target_name is None


# ================================================================ PDU header rules


def started(csg: int = 1) -> LoginMachine:
    """A machine one request into a no-auth login, still in stage `csg`."""
    m = machine()
    pairs = IDENTITY if csg == 1 else (*IDENTITY, ("AuthMethod", "None"))
    ok(m.receive(req(text(*pairs), csg=csg)))
    return m


HEADER_RULES = [
    ("T and C both set", None, req(text(*IDENTITY), csg=1, nsg=3, transit=True, cont=True),
     Status.INVALID_DURING_LOGIN),
    ("starts in stage 3", None, req(text(*IDENTITY), csg=3), Status.INVALID_DURING_LOGIN),
    ("starts in reserved stage 2", None, req(text(*IDENTITY), csg=2), Status.INVALID_DURING_LOGIN),
    ("NSG not above CSG", None, req(text(*IDENTITY), csg=1, nsg=1, transit=True), Status.INVALID_DURING_LOGIN),
    ("NSG reserved", None, req(text(*IDENTITY), csg=0, nsg=2, transit=True), Status.INVALID_DURING_LOGIN),
    ("NSG back to security", None, req(text(*IDENTITY), csg=1, nsg=0, transit=True), Status.INVALID_DURING_LOGIN),
    ("VersionMin above 0", None, req(text(*IDENTITY), csg=1, vmax=2, vmin=1), Status.UNSUPPORTED_VERSION),
    ("TSIH of a session to join", None, req(text(*IDENTITY), csg=1, tsih=5), Status.SESSION_DOES_NOT_EXIST),
    ("ITT changes", 1, req(csg=1, itt=0x9999), Status.INVALID_DURING_LOGIN),
    ("ISID changes", 1, req(csg=1, isid=bytes(6)), Status.INVALID_DURING_LOGIN),
    ("CID changes", 1, req(csg=1, cid=1), Status.INVALID_DURING_LOGIN),
    ("TSIH changes", 1, req(csg=1, tsih=3), Status.INVALID_DURING_LOGIN),
    ("VersionMax changes", 1, req(csg=1, vmax=1), Status.INVALID_DURING_LOGIN),
    ("CSG is not the current stage", 1, req(csg=0), Status.INVALID_DURING_LOGIN),
    ("back to security after leaving it", 0, None, Status.INVALID_DURING_LOGIN),
]


@pytest.mark.parametrize("name, stage, request_, expected", HEADER_RULES, ids=[c[0] for c in HEADER_RULES])
def test_header_rules(name: str, stage: int | None, request_: LoginRequest | None, expected: Status) -> None:
    if stage is None:
        m = machine()
    elif request_ is None:  # go to operational, then claim security again
        m = started(0)
        ok(m.receive(req(csg=0, nsg=1, transit=True)))
        request_ = req(csg=0)
    else:
        m = started(stage)
    assert request_ is not None
    failed(m.receive(request_), expected)


def test_sequence_numbers_wrap_and_track_every_response() -> None:
    m = machine(random_bytes=FixedRandom(), limits=TargetLimits(cmd_window=16))
    cmdsn = 0xFFFFFFFE
    steps = [ok(m.receive(req(text(*IDENTITY, ("AuthMethod", "None")), csg=0, cmdsn=cmdsn))),
             ok(m.receive(req(text(("X-com.example.Wide", "1")), csg=0, cont=True, cmdsn=cmdsn))),
             ok(m.receive(req(csg=0, nsg=1, transit=True, cmdsn=cmdsn))),
             ok(m.receive(req(csg=1, nsg=3, transit=True, cmdsn=cmdsn)))]
    assert [s.response.statsn for s in steps] == [STATSN0 + i for i in range(4)]
    assert all(s.response.expcmdsn == cmdsn and s.response.maxcmdsn == (cmdsn + 15) % (1 << 32) for s in steps)
    assert steps[-1].params is not None
    assert (steps[-1].params.exp_cmdsn, steps[-1].params.statsn) == (cmdsn, STATSN0 + 4)


def test_statsn_wraps_at_2_to_the_32() -> None:
    m = machine(random_bytes=lambda n: b"\xff" * n)
    a = ok(m.receive(req(text(*IDENTITY), csg=1)))
    b = ok(m.receive(req(csg=1, nsg=3, transit=True)))
    assert (a.response.statsn, b.response.statsn) == (0xFFFFFFFF, 0)
    assert b.params is not None and b.params.statsn == 1


def test_after_full_feature_a_login_request_closes() -> None:
    m = machine()
    assert ok(m.receive(req(text(*IDENTITY), csg=1, nsg=3, transit=True))).done
    failed(m.receive(req(text(*IDENTITY), csg=1, nsg=3, transit=True)), Status.INVALID_DURING_LOGIN)


def test_a_login_that_never_ends_is_cut_off() -> None:
    m = started(1)
    for _ in range(LOGIN_REQUESTS_MAX - 1):
        ok(m.receive(req(csg=1)))
    failed(m.receive(req(csg=1)), Status.INITIATOR_ERROR)


# ================================================================ Continue PDUs (RFC 7143 §6.1)


def test_continued_text_is_answered_empty_then_negotiated_whole() -> None:
    whole = text(*IDENTITY, *LIBISCSI_OPERATIONAL)
    cut = [whole[:7], whole[7:100], whole[100:]]  # the first cut falls inside "InitiatorName"
    m = machine()
    for part in cut[:-1]:
        step = ok(m.receive(req(part, csg=1, cont=True)))
        r = step.response
        assert (r.data, r.transit, r.cont, r.nsg, r.csg) == (b"", False, False, 0, 1)
    final = ok(m.receive(req(cut[-1], csg=1, nsg=3, transit=True)))
    assert answers(final) == [*LIBISCSI_ANSWERS, ("TargetPortalGroupTag", "1"), ("MaxRecvDataSegmentLength", "262144")]
    assert final.response.statsn == STATSN0 + 2


@settings(SLOW_OK, max_examples=60)
@given(st.lists(st.integers(min_value=0, max_value=600), max_size=6))
def test_random_continue_splits_change_nothing(cuts: list[int]) -> None:
    whole = text(*IDENTITY, *OPEN_ISCSI_OPERATIONAL, ("X-com.example.Note", "n" * 200))
    bounds = sorted({min(c, len(whole)) for c in cuts} | {0, len(whole)})
    parts = [whole[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    reference = ok(machine().receive(req(whole, csg=1, nsg=3, transit=True)))
    m = machine()
    for part in parts[:-1]:
        assert ok(m.receive(req(part, csg=1, cont=True))).response.data == b""
    final = ok(m.receive(req(parts[-1], csg=1, nsg=3, transit=True)))
    assert reference.params is not None and final.params is not None
    assert final.response.data == reference.response.data
    # Each Continue PDU got a response, so only the StatSN moved on.
    assert final.params == replace(reference.params, statsn=final.params.statsn)
    assert final.params.statsn == reference.params.statsn + len(parts) - 1


def test_continued_text_is_bounded() -> None:
    m = machine()
    chunk = b"X-a=" + b"b" * 8000
    for _ in range(keys.TEXT_BYTES_MAX // len(chunk)):
        ok(m.receive(req(chunk, csg=1, cont=True)))
    failed(m.receive(req(chunk, csg=1, cont=True)), Status.INVALID_DURING_LOGIN)


# ================================================================ negotiation rules (RFC 7143 §6.2, §13)


def negotiate_once(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    """One-shot operational login with these keys; the answers minus our own declarations."""
    step = ok(machine().receive(req(text(*IDENTITY, *pairs), csg=1, nsg=3, transit=True)))
    return [a for a in answers(step) if a[0] not in ("TargetPortalGroupTag", "MaxRecvDataSegmentLength")
            or a in pairs or a[1] in ("Reject", "Irrelevant")]


NEGOTIATION = [
    # list: the first value of the offer that we accept
    (("HeaderDigest", "CRC32C,None"), ("HeaderDigest", "CRC32C")),
    (("HeaderDigest", "None,CRC32C"), ("HeaderDigest", "None")),
    (("DataDigest", "MD5,CRC32C"), ("DataDigest", "CRC32C")),
    (("HeaderDigest", "MD5"), ("HeaderDigest", "Reject")),
    (("HeaderDigest", "CRC32C,,None"), ("HeaderDigest", "Reject")),
    (("TaskReporting", "FastAbort,RFC3720"), ("TaskReporting", "RFC3720")),
    (("TaskReporting", "FastAbort"), ("TaskReporting", "Reject")),
    # boolean
    (("InitialR2T", "Yes"), ("InitialR2T", "Yes")),
    (("ImmediateData", "No"), ("ImmediateData", "No")),
    (("DataPDUInOrder", "No"), ("DataPDUInOrder", "Yes")),
    (("InitialR2T", "yes"), ("InitialR2T", "Reject")),
    (("IFMarker", "Yes"), ("IFMarker", "No")),
    # numerical, with ranges
    (("MaxBurstLength", "16776192"), ("MaxBurstLength", "1048576")),
    (("MaxBurstLength", "0x10000"), ("MaxBurstLength", "65536")),
    (("MaxBurstLength", "511"), ("MaxBurstLength", "Reject")),
    (("MaxBurstLength", "16777216"), ("MaxBurstLength", "Reject")),
    (("MaxBurstLength", "-1"), ("MaxBurstLength", "Reject")),
    (("ErrorRecoveryLevel", "2"), ("ErrorRecoveryLevel", "0")),
    (("ErrorRecoveryLevel", "3"), ("ErrorRecoveryLevel", "Reject")),
    (("MaxOutstandingR2T", "16"), ("MaxOutstandingR2T", "4")),
    (("MaxOutstandingR2T", "0"), ("MaxOutstandingR2T", "Reject")),
    (("DefaultTime2Wait", "0"), ("DefaultTime2Wait", "2")),
    (("DefaultTime2Wait", "20"), ("DefaultTime2Wait", "20")),
    (("DefaultTime2Wait", "3601"), ("DefaultTime2Wait", "Reject")),
    (("DefaultTime2Retain", "abc"), ("DefaultTime2Retain", "Reject")),
    (("MaxConnections", "8"), ("MaxConnections", "1")),
    (("iSCSIProtocolLevel", "2"), ("iSCSIProtocolLevel", "1")),
    # declarative: no answer unless the value is illegal
    (("MaxRecvDataSegmentLength", "511"), ("MaxRecvDataSegmentLength", "Reject")),
    (("X#NodeArchitecture", "Linux,open-iscsi"), None),
    (("InitiatorAlias", "db1"), None),
    # unknown and extension keys
    (("X-com.example.Frobnicate", "Yes"), ("X-com.example.Frobnicate", "NotUnderstood")),
    (("X#Unregistered", "1"), ("X#Unregistered", "NotUnderstood")),
    (("MadeUpKey", "1"), ("MadeUpKey", "NotUnderstood")),
    # markers (RFC 3720) are never on, so their intervals are irrelevant
    (("OFMarkInt", "2048~8192"), ("OFMarkInt", "Irrelevant")),
]


@pytest.mark.parametrize("offer, answer", NEGOTIATION, ids=[f"{o[0]}={o[1]}" for o, _ in NEGOTIATION])
def test_negotiation(offer: tuple[str, str], answer: tuple[str, str] | None) -> None:
    assert negotiate_once(offer) == ([answer] if answer else [])


def test_first_burst_length_is_irrelevant_without_unsolicited_data() -> None:
    # The key comes before the two that make it irrelevant: relevance is judged on the whole text.
    got = negotiate_once(("FirstBurstLength", "65536"), ("InitialR2T", "Yes"), ("ImmediateData", "No"))
    assert got == [("InitialR2T", "Yes"), ("ImmediateData", "No"), ("FirstBurstLength", "Irrelevant")]


def test_first_burst_length_never_exceeds_max_burst_length() -> None:
    got = negotiate_once(("MaxBurstLength", "4096"), ("FirstBurstLength", "65536"))
    assert got == [("MaxBurstLength", "4096"), ("FirstBurstLength", "4096")]


def test_rejected_values_keep_the_default() -> None:
    step = ok(machine().receive(req(text(*IDENTITY, ("MaxBurstLength", "1"), ("MaxRecvDataSegmentLength", "1")),
                                    csg=1, nsg=3, transit=True)))
    assert step.params is not None
    assert (step.params.max_burst_length, step.params.max_recv_data_segment_length_initiator) == (262144, 8192)


KEY_PROTOCOL_ERRORS = [
    ("key twice in one request", [text(*IDENTITY, ("HeaderDigest", "None"), ("HeaderDigest", "CRC32C"))]),
    ("unknown key twice in one request", [text(*IDENTITY, ("X-a", "1"), ("X-a", "1"))]),
    ("renegotiation in a later request", [text(*IDENTITY, ("HeaderDigest", "None")), text(("HeaderDigest", "None"))]),
    ("TargetName changes", [text(*IDENTITY), text(("TargetName", CHAP_TARGET))]),
    ("SessionType changes", [text(*IDENTITY), text(("SessionType", "Discovery"))]),
    ("InitiatorName changes", [text(*IDENTITY), text(("InitiatorName", INITIATOR + "x"))]),
    ("TargetName first sent late", [text(("InitiatorName", INITIATOR), ("SessionType", "Discovery")),
                                    text(("TargetName", TARGET))]),
    ("target-only key", [text(*IDENTITY, ("TargetAlias", "x"))]),
    ("TargetPortalGroupTag from the initiator", [text(*IDENTITY, ("TargetPortalGroupTag", "1"))]),
    ("SendTargets during login", [text(*IDENTITY, ("SendTargets", "All"))]),
    ("CHAP key in the operational stage", [text(*IDENTITY, ("CHAP_A", "5"))]),
]


@pytest.mark.parametrize("name, texts", KEY_PROTOCOL_ERRORS, ids=[c[0] for c in KEY_PROTOCOL_ERRORS])
def test_key_protocol_errors(name: str, texts: list[bytes]) -> None:
    m = machine()
    for data in texts[:-1]:
        ok(m.receive(req(data, csg=1)))
    failed(m.receive(req(texts[-1], csg=1)), Status.INVALID_DURING_LOGIN)


def test_operational_key_in_the_security_stage_is_refused() -> None:
    step = machine().receive(req(text(*IDENTITY, ("AuthMethod", "None"), ("MaxBurstLength", "65536")), csg=0))
    failed(step, Status.INVALID_DURING_LOGIN)


MALFORMED = [
    ("pair without '='", text(*IDENTITY) + b"HeaderDigest\0"),
    ("bad UTF-8", text(*IDENTITY) + b"InitiatorAlias=\xff\xfe\0"),
    ("empty key", text(*IDENTITY) + b"=None\0"),
    ("no final NUL", text(*IDENTITY) + b"HeaderDigest=None"),
    ("empty pair in the middle", text(*IDENTITY) + b"\0HeaderDigest=None\0"),
    ("key name of 64 bytes", text(*IDENTITY, ("X-" + "k" * 62, "1"))),
    ("value of 256 bytes", text(*IDENTITY, ("InitiatorAlias", "v" * 256))),
    ("key with a space", text(*IDENTITY, ("Header Digest", "None"))),
]


@pytest.mark.parametrize("name, data", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_text_is_an_initiator_error(name: str, data: bytes) -> None:
    step = failed(machine().receive(req(data, csg=1, nsg=3, transit=True)), Status.INVALID_DURING_LOGIN)
    assert "malformed" in step.reason


def test_trailing_nul_padding_is_tolerated() -> None:
    assert ok(machine().receive(req(text(*IDENTITY) + b"\0\0\0", csg=1, nsg=3, transit=True))).done


def test_an_answer_too_big_for_one_pdu_is_out_of_resources() -> None:
    many = [(f"X-{i:03d}" + "k" * 58, "1") for i in range(200)]
    step = failed(machine().receive(req(text(*IDENTITY, *many), csg=1, nsg=3, transit=True)), Status.OUT_OF_RESOURCES)
    assert step.response.status_class == 3


# ================================================================ keys.py: text and values


def test_parse_and_encode_round_trip() -> None:
    pairs = [("InitiatorName", INITIATOR), ("HeaderDigest", "CRC32C,None"), ("InitiatorAlias", ""),
             ("X-com.example.k", "ünïcode=ok")]
    data = keys.encode(pairs)
    assert data.count(b"\0") == 4 and keys.parse(data) == pairs
    assert keys.parse(b"") == []


TEXT_BOUNDS = [
    ("key of 63 bytes", [("K" * 63, "v")], True),
    ("key of 64 bytes", [("K" * 64, "v")], False),
    ("value of 255 bytes", [("InitiatorAlias", "v" * 255)], True),
    ("value of 256 bytes", [("InitiatorAlias", "v" * 256)], False),
    ("CHAP_C of 8192 bytes", [("CHAP_C", "0x" + "a" * 8190)], True),
    ("CHAP_C of 8193 bytes", [("CHAP_C", "0x" + "a" * 8191)], False),
    ("256 pairs", [(f"X-{i}", "") for i in range(256)], True),
    ("257 pairs", [(f"X-{i}", "") for i in range(257)], False),
]


@pytest.mark.parametrize("name, pairs, legal", TEXT_BOUNDS, ids=[c[0] for c in TEXT_BOUNDS])
def test_text_bounds_hold_both_ways(name: str, pairs: list[tuple[str, str]], legal: bool) -> None:
    raw = b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)
    if legal:
        assert keys.parse(raw) == pairs and keys.encode(pairs) == raw
    else:
        with pytest.raises(TextError):
            keys.parse(raw)
        with pytest.raises(ValueError):
            keys.encode(pairs)


def test_text_over_64_kib_is_refused() -> None:
    with pytest.raises(TextError):
        keys.parse(b"X-a=b\0" * (keys.TEXT_BYTES_MAX // 6 + 1))


VALUES: list[tuple[Callable[[str], object], str, object]] = [
    (keys.parse_number, "0", 0),
    (keys.parse_number, "8192", 8192),
    (keys.parse_number, "0x2000", 8192),
    (keys.parse_number, "0XfF", 255),
    (keys.parse_number, "18446744073709551615", (1 << 64) - 1),
    (keys.parse_number, "18446744073709551616", BadValue),
    (keys.parse_number, "", BadValue),
    (keys.parse_number, "0x", BadValue),
    (keys.parse_number, "+1", BadValue),
    (keys.parse_number, "1e3", BadValue),
    (keys.parse_number, "١٢", BadValue),  # Arabic-Indic digits are digits to str.isdigit, not to RFC 7143
    (keys.parse_bool, "Yes", True),
    (keys.parse_bool, "No", False),
    (keys.parse_bool, "YES", BadValue),
    (keys.parse_list, "CRC32C,None", ("CRC32C", "None")),
    (keys.parse_list, "None", ("None",)),
    (keys.parse_list, "", BadValue),
    (keys.parse_list, "a,", BadValue),
    (keys.parse_binary, "0x0102ff", b"\x01\x02\xff"),
    (keys.parse_binary, "0X102", b"\x01\x02"),  # odd digit count: implicit leading zero
    (keys.parse_binary, "0b" + base64.b64encode(b"\x00\x01\xfe").decode(), b"\x00\x01\xfe"),
    (keys.parse_binary, "0BAAE=", b"\x00\x01"),
    (keys.parse_binary, "0b!!", BadValue),
    (keys.parse_binary, "0bAAE", BadValue),  # missing padding
    (keys.parse_binary, "0x0g", BadValue),
    (keys.parse_binary, "0102", BadValue),
    (keys.parse_binary, "0x", BadValue),
    (keys.parse_binary, "0b", BadValue),
]


@pytest.mark.parametrize("parse, text_, expected", VALUES, ids=[f"{p.__name__}({t[:16]!r})" for p, t, _ in VALUES])
def test_value_codecs(parse: Callable[[str], object], text_: str, expected: object) -> None:
    if expected is BadValue:
        with pytest.raises(BadValue):
            parse(text_)
    else:
        assert parse(text_) == expected


def test_value_formats_round_trip() -> None:
    assert keys.parse_binary(keys.format_binary(b"\x00\xab")) == b"\x00\xab"
    assert keys.parse_number(keys.format_number(65536)) == 65536
    assert keys.parse_bool(keys.format_bool(False)) is False
    assert keys.parse_list(keys.format_list(["CRC32C", "None"])) == ("CRC32C", "None")
    with pytest.raises(ValueError):
        keys.format_number(-1)
    with pytest.raises(ValueError):
        keys.format_list([])
    with pytest.raises(ValueError):
        keys.format_list(["a,b"])


RFC_7143_KEYS = {
    "HeaderDigest", "DataDigest", "MaxConnections", "SendTargets", "TargetName", "InitiatorName", "TargetAlias",
    "InitiatorAlias", "TargetAddress", "TargetPortalGroupTag", "InitialR2T", "ImmediateData",
    "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
    "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel", "SessionType",
    "TaskReporting", "iSCSIProtocolLevel", "X#NodeArchitecture", "AuthMethod",
    "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R",
}


def test_key_table_covers_rfc_7143_and_its_defaults_are_legal() -> None:
    assert RFC_7143_KEYS <= set(keys.KEYS)
    for spec in keys.KEYS.values():
        assert spec.rfc, spec.name
        if spec.default is None:
            continue
        if spec.kind in (keys.Kind.MIN, keys.Kind.MAX):
            assert spec.low <= keys.parse_number(spec.default) <= spec.high, spec.name
        elif spec.kind in (keys.Kind.AND, keys.Kind.OR):
            keys.parse_bool(spec.default)
        elif spec.values:
            assert spec.default in spec.values, spec.name


def test_declarations_are_checked_against_the_table() -> None:
    assert keys.check_declaration(keys.KEYS["MaxRecvDataSegmentLength"], "0x2000") == "8192"
    assert keys.check_declaration(keys.KEYS["SessionType"], "Discovery") == "Discovery"
    with pytest.raises(BadValue):
        keys.check_declaration(keys.KEYS["SessionType"], "Boot")
    with pytest.raises(BadValue):
        keys.check_declaration(keys.KEYS["MaxRecvDataSegmentLength"], "16777216")


def test_negotiate_is_not_for_declarations() -> None:
    with pytest.raises(ValueError):
        keys.negotiate(keys.KEYS["InitiatorName"], "x", "y")
    with pytest.raises(ValueError):
        keys.check_declaration(keys.KEYS["MaxBurstLength"], "512")


# ================================================================ configuration errors are ours


@pytest.mark.parametrize("build", [
    lambda: ChapSecrets(user="", secret=b"s"),
    lambda: ChapSecrets(user="u", secret=b""),
    lambda: ChapSecrets(user="u", secret=b"s", mutual_user="t"),
    lambda: ChapSecrets(user="u", secret=b"same", mutual_user="t", mutual_secret=b"same"),
    lambda: ChapSecrets(user="u", secret=b"s", mutual_user="t", mutual_secret=b""),
    lambda: ChapSecrets(user="u\0", secret=b"s"),
    lambda: TargetPolicy("t", tpgt=70000),
    lambda: TargetPolicy(""),
    lambda: TargetPolicy("t", redirect=""),
    lambda: TargetLimits(max_outstanding_r2t=0),
    lambda: TargetLimits(default_time2retain=3601),
    lambda: TargetLimits(max_burst_length=256),
    lambda: TargetLimits(first_burst_length=1 << 21),
    lambda: TargetLimits(max_connections=2),
    lambda: TargetLimits(error_recovery_level=1),
    lambda: TargetLimits(cmd_window=0),
    lambda: TargetLimits(digests=("MD5",)),
])
def test_bad_configuration_is_refused_at_construction(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="configuration error"):
        build()


def test_local_bugs_raise() -> None:
    m = LoginMachine(POLICIES.get, tsih_alloc=lambda: 0, random_bytes=FixedRandom())
    with pytest.raises(ValueError, match="local bug"):
        m.receive(req(text(*IDENTITY), csg=1, nsg=3, transit=True))
    m = LoginMachine(POLICIES.get, tsih_alloc=lambda: 1, random_bytes=lambda n: b"")
    with pytest.raises(ValueError, match="local bug"):
        m.receive(req(text(*IDENTITY), csg=1, nsg=3, transit=True))


# ================================================================ fuzz


KEY_NAMES = sorted(keys.KEYS) + ["X-com.example.k", "X#Other", "Bogus", "k" * 63]
VALUE_TEXT = st.one_of(
    st.sampled_from(["Yes", "No", "None", "CRC32C", "CRC32C,None", "CHAP,None", "CHAP", "5", "0", "512", "8192",
                     "262144", "16777215", "0x10", "0bAAE=", "Normal", "Discovery", INITIATOR, TARGET, CHAP_TARGET,
                     MOVED_TARGET, ACL_TARGET, "alice", "Reject", "Irrelevant", "", "-1", "0x", ",", "\u00e9"]),
    st.text(max_size=12),
)
PAIR_TEXT = st.tuples(st.sampled_from(KEY_NAMES), VALUE_TEXT).map(lambda kv: f"{kv[0]}={kv[1]}".encode() + b"\0")
DATA = st.one_of(
    st.lists(PAIR_TEXT, max_size=8).map(b"".join),
    st.binary(max_size=64),
    st.lists(PAIR_TEXT, max_size=8).map(b"".join).map(lambda d: text(*IDENTITY) + d),
)
REQUESTS = st.builds(
    LoginRequest,
    itt=st.sampled_from([0x1234, 0x1234, 0x1234, 1]),
    isid=st.sampled_from([ISID, ISID, bytes(6)]),
    tsih=st.sampled_from([0, 0, 0, 9]),
    cid=st.sampled_from([0, 0, 1]),
    cmdsn=st.sampled_from([0, 100, 0xFFFFFFFF]),
    expstatsn=st.integers(min_value=0, max_value=0xFFFFFFFF),
    transit=st.booleans(),
    cont=st.booleans(),
    csg=st.integers(min_value=0, max_value=3),
    nsg=st.integers(min_value=0, max_value=3),
    version_max=st.sampled_from([0, 0, 0, 1]),
    version_min=st.sampled_from([0, 0, 0, 1]),
    data=DATA,
)


def check_step(request_: LoginRequest, step: LoginStep) -> None:
    assert isinstance(step, LoginStep) and isinstance(step.response, LoginResponse)
    r = step.response
    assert r.itt == request_.itt and r.isid == request_.isid
    assert (r.status_class == 0) == (not step.close), step
    assert step.done == (step.params is not None)
    assert not (step.done and step.close)
    assert r.status_class in (0, 1, 2, 3)
    keys.parse(r.data)  # whatever we send parses by our own rules
    assert len(r.data) <= 8192
    if step.done:
        assert r.transit and r.nsg == 3 and r.tsih == TSIH


@settings(SLOW_OK, max_examples=400)
@given(st.lists(REQUESTS, min_size=1, max_size=12), st.integers(min_value=0, max_value=2**32 - 1),
       st.sampled_from([None, SECRETS]))
def test_fuzz_any_request_sequence_yields_steps_and_close_is_final(
        requests: list[LoginRequest], seed: int, discovery_chap: ChapSecrets | None) -> None:
    m = machine(random_bytes=random.Random(seed).randbytes, discovery_chap=discovery_chap)
    closed = finished = False
    statsn: int | None = None
    for request_ in requests:
        step = m.receive(request_)
        check_step(request_, step)
        if closed or finished:
            assert step.close, "after a failed or finished login every request is answered with close"
        if step.response.status_class == 0 and statsn is not None:
            assert step.response.statsn == (statsn + 1) % (1 << 32)
        statsn = step.response.statsn
        closed = closed or step.close
        finished = finished or step.done
    assert m.closed == closed


@settings(SLOW_OK, max_examples=200)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=4))
def test_fuzz_text_whole_and_split(data: bytes, cuts: list[int]) -> None:
    """Any bytes, whole or cut into Continue PDUs, give the same verdict."""
    whole = machine().receive(req(data, csg=1, nsg=3, transit=True))
    check_step(req(data, csg=1), whole)
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    parts = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] or [b""]
    m = machine()
    for part in parts[:-1]:
        assert not m.receive(req(part, csg=1, cont=True)).close
    split = m.receive(req(parts[-1], csg=1, nsg=3, transit=True))
    assert (status(split), split.response.data, split.done) == (status(whole), whole.response.data, whole.done)
