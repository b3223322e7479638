"""Text key=value data (RFC 7143 §6) and the table of every login/text key (§12, §13).

Theory of operation. Login and Text PDUs carry a data segment of `key=value`
pairs, each ended by one NUL (§6.1). A set of pairs may span several PDUs (the
sender sets C=1 on all but the last); the receiver joins the data segments into
one logical text data segment (LTDS) and parses it only when it is complete,
because a pair may be cut anywhere. `parse` turns a complete LTDS into an
ordered list of (key, value) pairs and `encode` turns pairs back into bytes.
Both are bounded (key and value lengths, pair count, total size) and both
check the same rules, so what we send is what we would accept.

What a key means lives in `KEYS`, a table (data, not code) with one `KeySpec`
per key the RFC defines: how its value is negotiated (`Kind`), its default, its
legal range or values, when it may be sent (`Use`, and the login stages it may
appear in), who may send it (`Sender`), and when it is answered "Irrelevant".
`negotiate` applies the RFC's result function for one offered value against
the value we would choose ourselves, both as text, and says what to answer.
Context (which stage we are in, whether a key was already negotiated, session
type) is the login layer's business (iscsi/login.py).

Errors say whose fault they are: `TextError` is malformed text from the peer
(the login layer answers Status 0x020b and closes); `BadValue` is a well-formed
pair whose value the key cannot take (answered "Reject", §6.2); a `ValueError`
from `encode` or `negotiate` misuse is a local bug.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# ---------------------------------------------------------------- bounds

# RFC 7143 §6.1: "A key-name ... MUST NOT exceed 63 bytes."
KEY_NAME_BYTES_MAX = 63
# RFC 7143 §6.1: unless a key says otherwise, a value is at most 255 bytes.
VALUE_BYTES_MAX = 255
# The large binary values of CHAP (RFC 7143 §12.1.3: CHAP_C and CHAP_R are
# large-binary-values). 8192 characters of encoded text is what the RFC allows a
# large value; it holds a 1024-byte binary (the CHAP limit) in hex or base64
# with room to spare.
LARGE_VALUE_BYTES_MAX = 8192
LARGE_VALUE_KEYS = frozenset({"CHAP_C", "CHAP_R"})
# At most this many pairs in one LTDS. A full login offers about 25 keys
# (open-iscsi sends 21 in its operational stage); 256 leaves room for vendor
# X- keys while bounding the answer we build for them.
PAIRS_MAX = 256
# At most this many bytes in one LTDS, across all its Continue PDUs. The largest
# legal pair is a CHAP value of about 8 KiB; 64 KiB is eight full login PDUs at
# the 8192-byte MaxRecvDataSegmentLength that holds during login (§13.12).
TEXT_BYTES_MAX = 64 * 1024
# RFC 7143 §6.1: a numerical value is an unsigned integer "always less than 2**64".
NUMBER_MAX = (1 << 64) - 1

# RFC 7143 §6.1 key-name characters: letters, digits, '.', '-', '+', '@', '_',
# plus '#' for the "X#" IANA-registered extension keys (§13.5.2).
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-+@_#")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

# The answers that are not values (RFC 7143 §6.2).
NOT_UNDERSTOOD = "NotUnderstood"
REJECT = "Reject"
IRRELEVANT = "Irrelevant"

YES = "Yes"
NO = "No"


class TextError(ValueError):
    """The peer sent malformed key=value text (RFC 7143 §6.1): the initiator's fault.

    The login layer answers Status-Class 2 (0x020b, invalid during login) and closes
    the connection; a text exchange in full feature phase answers Reject.
    """

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class BadValue(ValueError):
    """A well-formed pair whose value the key cannot take: wrong syntax for its type or
    outside its legal range. The acceptor answers "Reject" for that key (RFC 7143 §6.2)
    and the key keeps its previous (default) value."""


# ---------------------------------------------------------------- text data segments


def _check_key(key: str, raw_len: int) -> None:
    if not key:
        raise TextError("empty key name")
    if raw_len > KEY_NAME_BYTES_MAX:
        raise TextError(f"key name of {raw_len} bytes (at most {KEY_NAME_BYTES_MAX}, RFC 7143 §6.1)")
    bad = set(key) - _KEY_CHARS
    if bad:
        raise TextError(f"key name {key[:KEY_NAME_BYTES_MAX]!r} has characters RFC 7143 §6.1 does not allow")


def _value_bytes_max(key: str) -> int:
    return LARGE_VALUE_BYTES_MAX if key in LARGE_VALUE_KEYS else VALUE_BYTES_MAX


def parse(data: bytes) -> list[tuple[str, str]]:
    """Parse one complete LTDS into its (key, value) pairs, in order.

    Every pair must end with a NUL (RFC 7143 §6.1). NULs after the last pair are
    taken as padding and ignored; an empty pair anywhere else is malformed.
    Duplicate keys are returned as they are: whether a repeat is legal is the
    negotiation's business. Raises TextError.
    """
    if len(data) > TEXT_BYTES_MAX:
        raise TextError(f"text of {len(data)} bytes (at most {TEXT_BYTES_MAX})")
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise TextError("text does not end with a NUL (RFC 7143 §6.1: every pair is NUL-terminated)")
    chunks = data.split(b"\0")[:-1]
    while chunks and not chunks[-1]:
        chunks.pop()  # trailing NULs: padding some senders include in the segment length
    if len(chunks) > PAIRS_MAX:
        raise TextError(f"{len(chunks)} key=value pairs (at most {PAIRS_MAX})")
    pairs: list[tuple[str, str]] = []
    for chunk in chunks:
        if not chunk:
            raise TextError("empty key=value pair (two NULs in a row)")
        raw_key, eq, raw_value = chunk.partition(b"=")
        if not eq:
            raise TextError(f"pair without '=': {chunk[:KEY_NAME_BYTES_MAX]!r}")
        try:
            key = raw_key.decode("utf-8")
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextError(f"pair is not UTF-8: {chunk[:KEY_NAME_BYTES_MAX]!r}") from e
        _check_key(key, len(raw_key))
        if len(raw_value) > _value_bytes_max(key):
            raise TextError(f"value of {key} is {len(raw_value)} bytes (at most {_value_bytes_max(key)})")
        pairs.append((key, value))
    return pairs


def encode(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as NUL-terminated key=value text. Checks what `parse` checks: a pair
    that would not parse back is a local bug and raises ValueError."""
    out = bytearray()
    count = 0
    for key, value in pairs:
        raw_key, raw_value = key.encode("utf-8"), value.encode("utf-8")
        try:
            _check_key(key, len(raw_key))
        except TextError as e:
            raise ValueError(f"local bug: cannot encode key {key!r}: {e.why}") from e
        if b"\0" in raw_value or len(raw_value) > _value_bytes_max(key):
            raise ValueError(f"local bug: cannot encode value of {key} ({len(raw_value)} bytes or a NUL)")
        out += raw_key + b"=" + raw_value + b"\0"
        count += 1
    if count > PAIRS_MAX or len(out) > TEXT_BYTES_MAX:
        raise ValueError(f"local bug: {count} pairs / {len(out)} bytes exceed the text bounds")
    return bytes(out)


# ---------------------------------------------------------------- value codecs (RFC 7143 §6.1)


def parse_number(text: str) -> int:
    """A numerical value: decimal-constant or hex-constant (0x / 0X), below 2**64."""
    if text[:2] in ("0x", "0X"):
        digits = text[2:]
        if not digits or not set(digits) <= _HEX_DIGITS:
            raise BadValue(f"not a hex-constant: {text!r}")
        n = int(digits, 16)
    else:
        if not text or not text.isascii() or not text.isdigit():
            raise BadValue(f"not a decimal-constant: {text!r}")
        n = int(text)
    if n > NUMBER_MAX:
        raise BadValue(f"number {text!r} is not below 2**64")
    return n


def format_number(n: int) -> str:
    if not 0 <= n <= NUMBER_MAX:
        raise ValueError(f"local bug: {n} is not a numerical value")
    return str(n)


def parse_bool(text: str) -> bool:
    """A boolean value: exactly "Yes" or "No" (RFC 7143 §6.1, case matters)."""
    if text == YES:
        return True
    if text == NO:
        return False
    raise BadValue(f"not Yes or No: {text!r}")


def format_bool(b: bool) -> str:
    return YES if b else NO


def parse_list(text: str) -> tuple[str, ...]:
    """A list-of-values: comma-separated, none empty (RFC 7143 §6.1)."""
    items = tuple(text.split(","))
    if any(not item for item in items):
        raise BadValue(f"list with an empty value: {text!r}")
    return items


def format_list(values: Iterable[str]) -> str:
    items = tuple(values)
    if not items or any(not v or "," in v for v in items):
        raise ValueError(f"local bug: cannot encode list {items!r}")
    return ",".join(items)


def parse_binary(text: str) -> bytes:
    """A binary value: hex-constant (0x / 0X) or base64-constant (0b / 0B, RFC 4648
    with padding). A hex-constant of n digits is (n + 1) // 2 bytes: an odd digit
    count has an implicit leading zero (RFC 7143 §6.1)."""
    prefix, body = text[:2], text[2:]
    if prefix in ("0x", "0X"):
        if not body or not set(body) <= _HEX_DIGITS:
            raise BadValue(f"not a hex-constant: {text[:32]!r}")
        if len(body) % 2:
            body = "0" + body
        return bytes.fromhex(body)
    if prefix in ("0b", "0B"):
        if not body:
            raise BadValue("empty base64-constant")
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadValue(f"not a base64-constant: {text[:32]!r}") from e
    raise BadValue(f"binary value without 0x or 0b: {text[:32]!r}")


def format_binary(data: bytes) -> str:
    return "0x" + data.hex()


# ---------------------------------------------------------------- the key table (RFC 7143 §12, §13)


class Kind(enum.Enum):
    """How a key's value is settled (RFC 7143 §6.2)."""

    LIST = "list"  # the acceptor answers the first value of the offer it supports, else Reject
    AND = "boolean-and"  # result is offer AND ours
    OR = "boolean-or"  # result is offer OR ours
    MIN = "numerical-min"  # result is min(offer, ours)
    MAX = "numerical-max"  # result is max(offer, ours)
    DECLARATIVE = "declarative"  # the sender states a fact about itself; no answer
    AUTH = "authentication"  # a step of the CHAP exchange (§12.1.3), handled by the login layer


class Use(enum.Enum):
    """When a key may be sent: the "Use:" line of its RFC 7143 §13 entry."""

    LO = "leading only"  # in the leading login of a session (TSIH 0)
    IALL = "initialize, all connections"  # in the first login request of every connection
    ALL = "any time"  # during login, and in Text negotiation in full feature phase
    IO = "initialize only"  # during login only, per connection
    FFPO = "full feature phase only"  # never during login
    SECURITY = "security negotiation"  # authentication keys, security stage only (§12)


class Sender(enum.Flag):
    INITIATOR = enum.auto()
    TARGET = enum.auto()
    BOTH = INITIATOR | TARGET


class Irrelevance(enum.Enum):
    """Conditions under which an acceptor answers a key with "Irrelevant" (RFC 7143 §6.2)."""

    DISCOVERY = "SessionType=Discovery"
    NO_UNSOLICITED_DATA = "InitialR2T=Yes and ImmediateData=No"
    NO_MARKERS = "IFMarker/OFMarker=No"  # markers were dropped in RFC 7143; floe never uses them


SECURITY_STAGE = 0
OPERATIONAL_STAGE = 1
_SEC = frozenset({SECURITY_STAGE})
_OP = frozenset({OPERATIONAL_STAGE})
_LOGIN = frozenset({SECURITY_STAGE, OPERATIONAL_STAGE})
_NEVER: frozenset[int] = frozenset()
_DISC = frozenset({Irrelevance.DISCOVERY})

LENGTH_MIN = 512  # RFC 7143 §13.12-§13.14: the smallest legal MaxRecvDataSegmentLength / burst
LENGTH_MAX = (1 << 24) - 1  # ... and the largest


@dataclass(frozen=True, slots=True)
class KeySpec:
    name: str
    kind: Kind
    use: Use
    sender: Sender
    stages: frozenset[int]  # login stages it may appear in (0 security, 1 operational)
    default: str | None = None  # the RFC default, as text; None: no default
    low: int = 0  # numerical keys: the legal range, inclusive
    high: int = 0
    values: tuple[str, ...] = ()  # list and enumerated keys: the values the RFC defines
    irrelevant_when: frozenset[Irrelevance] = frozenset()
    rfc: str = ""  # where the key is defined

    def __post_init__(self) -> None:
        numeric = self.kind in (Kind.MIN, Kind.MAX)
        if numeric and not 0 <= self.low <= self.high <= NUMBER_MAX:
            raise ValueError(f"local bug: key {self.name} has range {self.low}..{self.high}")


def _k(*specs: KeySpec) -> Mapping[str, KeySpec]:
    table = {s.name: s for s in specs}
    if len(table) != len(specs):
        raise ValueError("local bug: a key is listed twice in KEYS")
    return table


_B, _I, _T = Sender.BOTH, Sender.INITIATOR, Sender.TARGET

KEYS: Mapping[str, KeySpec] = _k(
    # Security (§12): AuthMethod picks the method; the CHAP_* keys are the CHAP exchange itself.
    KeySpec("AuthMethod", Kind.LIST, Use.SECURITY, _B, _SEC, None, values=("KRB5", "SRP", "CHAP", "None"),
            rfc="7143 §12.1"),
    KeySpec("CHAP_A", Kind.AUTH, Use.SECURITY, _B, _SEC, rfc="7143 §12.1.3"),
    KeySpec("CHAP_I", Kind.AUTH, Use.SECURITY, _B, _SEC, rfc="7143 §12.1.3"),
    KeySpec("CHAP_C", Kind.AUTH, Use.SECURITY, _B, _SEC, rfc="7143 §12.1.3"),
    KeySpec("CHAP_N", Kind.AUTH, Use.SECURITY, _B, _SEC, rfc="7143 §12.1.3"),
    KeySpec("CHAP_R", Kind.AUTH, Use.SECURITY, _B, _SEC, rfc="7143 §12.1.3"),
    # Operational (§13).
    KeySpec("HeaderDigest", Kind.LIST, Use.IO, _B, _OP, "None", values=("CRC32C", "None"), rfc="7143 §13.1"),
    KeySpec("DataDigest", Kind.LIST, Use.IO, _B, _OP, "None", values=("CRC32C", "None"), rfc="7143 §13.1"),
    KeySpec("MaxConnections", Kind.MIN, Use.LO, _B, _OP, "1", 1, 65535, irrelevant_when=_DISC, rfc="7143 §13.2"),
    KeySpec("SendTargets", Kind.DECLARATIVE, Use.FFPO, _I, _NEVER, rfc="7143 §13.3"),
    KeySpec("TargetName", Kind.DECLARATIVE, Use.IALL, _B, _LOGIN, rfc="7143 §13.4"),
    KeySpec("InitiatorName", Kind.DECLARATIVE, Use.IALL, _I, _LOGIN, rfc="7143 §13.5"),
    KeySpec("TargetAlias", Kind.DECLARATIVE, Use.ALL, _T, _LOGIN, rfc="7143 §13.6"),
    KeySpec("InitiatorAlias", Kind.DECLARATIVE, Use.ALL, _I, _LOGIN, rfc="7143 §13.7"),
    KeySpec("TargetAddress", Kind.DECLARATIVE, Use.ALL, _T, _LOGIN, rfc="7143 §13.8"),
    KeySpec("TargetPortalGroupTag", Kind.DECLARATIVE, Use.IO, _T, _LOGIN, low=0, high=65535, rfc="7143 §13.9"),
    KeySpec("InitialR2T", Kind.OR, Use.LO, _B, _OP, YES, irrelevant_when=_DISC, rfc="7143 §13.10"),
    KeySpec("ImmediateData", Kind.AND, Use.LO, _B, _OP, YES, irrelevant_when=_DISC, rfc="7143 §13.11"),
    # Declarative and per direction: each side states what it can receive (§13.12).
    KeySpec("MaxRecvDataSegmentLength", Kind.DECLARATIVE, Use.ALL, _B, _OP, "8192", LENGTH_MIN, LENGTH_MAX,
            rfc="7143 §13.12"),
    KeySpec("MaxBurstLength", Kind.MIN, Use.LO, _B, _OP, "262144", LENGTH_MIN, LENGTH_MAX, irrelevant_when=_DISC,
            rfc="7143 §13.13"),
    KeySpec("FirstBurstLength", Kind.MIN, Use.LO, _B, _OP, "65536", LENGTH_MIN, LENGTH_MAX,
            irrelevant_when=frozenset({Irrelevance.DISCOVERY, Irrelevance.NO_UNSOLICITED_DATA}), rfc="7143 §13.14"),
    KeySpec("DefaultTime2Wait", Kind.MAX, Use.LO, _B, _OP, "2", 0, 3600, rfc="7143 §13.15"),
    KeySpec("DefaultTime2Retain", Kind.MIN, Use.LO, _B, _OP, "20", 0, 3600, rfc="7143 §13.16"),
    KeySpec("MaxOutstandingR2T", Kind.MIN, Use.LO, _B, _OP, "1", 1, 65535, irrelevant_when=_DISC, rfc="7143 §13.17"),
    KeySpec("DataPDUInOrder", Kind.OR, Use.LO, _B, _OP, YES, irrelevant_when=_DISC, rfc="7143 §13.18"),
    KeySpec("DataSequenceInOrder", Kind.OR, Use.LO, _B, _OP, YES, irrelevant_when=_DISC, rfc="7143 §13.19"),
    KeySpec("ErrorRecoveryLevel", Kind.MIN, Use.LO, _B, _OP, "0", 0, 2, rfc="7143 §13.20"),
    KeySpec("SessionType", Kind.DECLARATIVE, Use.LO, _I, _LOGIN, "Normal", values=("Discovery", "Normal"),
            rfc="7143 §13.21"),
    KeySpec("TaskReporting", Kind.LIST, Use.LO, _B, _OP, "RFC3720", values=("RFC3720", "ResponseFence", "FastAbort"),
            irrelevant_when=_DISC, rfc="7143 §13.23"),
    KeySpec("iSCSIProtocolLevel", Kind.MIN, Use.LO, _B, _OP, "1", 0, 31, rfc="7143 §13.24"),
    # Declared by initiators (Linux, Windows) to name their software; accepted and ignored.
    KeySpec("X#NodeArchitecture", Kind.DECLARATIVE, Use.ALL, _B, _LOGIN, rfc="7143 §13.26"),
    # RFC 3720 §A.3.2 markers, removed by RFC 7143 but still offered (as No) by open-iscsi and
    # libiscsi. Answering "No" is always legal for a boolean-AND; the intervals are then irrelevant.
    KeySpec("IFMarker", Kind.AND, Use.IO, _B, _OP, NO, rfc="3720 §A.3.2"),
    KeySpec("OFMarker", Kind.AND, Use.IO, _B, _OP, NO, rfc="3720 §A.3.2"),
    KeySpec("IFMarkInt", Kind.DECLARATIVE, Use.IO, _B, _OP, irrelevant_when=frozenset({Irrelevance.NO_MARKERS}),
            rfc="3720 §A.3.2"),
    KeySpec("OFMarkInt", Kind.DECLARATIVE, Use.IO, _B, _OP, irrelevant_when=frozenset({Irrelevance.NO_MARKERS}),
            rfc="3720 §A.3.2"),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    answer: str  # the value to answer with: the result, or Reject
    value: str | None  # the negotiated value; None when rejected (the key keeps its previous value)


_REJECTED = Outcome(REJECT, None)


def negotiate(spec: KeySpec, offered: str, ours: str) -> Outcome:
    """Answer one offered value (RFC 7143 §6.2). `ours` is the value we would pick given a
    free choice: for a list, the values we accept (in any order: the offerer's order wins);
    for a boolean, Yes or No; for a number, our limit. An offer we cannot parse, or a
    number outside the key's range, is answered Reject."""
    if spec.kind is Kind.LIST:
        acceptable = set(parse_list(ours))
        try:
            offer = parse_list(offered)
        except BadValue:
            return _REJECTED
        for item in offer:  # values we do not know are ignored (§6.2.1)
            if item in acceptable and (not spec.values or item in spec.values):
                return Outcome(item, item)
        return _REJECTED
    if spec.kind in (Kind.AND, Kind.OR):
        try:
            theirs = parse_bool(offered)
        except BadValue:
            return _REJECTED
        mine = parse_bool(ours)
        result = (theirs and mine) if spec.kind is Kind.AND else (theirs or mine)
        text = format_bool(result)
        return Outcome(text, text)
    if spec.kind in (Kind.MIN, Kind.MAX):
        try:
            n = parse_number(offered)
        except BadValue:
            return _REJECTED
        if not spec.low <= n <= spec.high:
            return _REJECTED
        limit = parse_number(ours)
        text = format_number(min(n, limit) if spec.kind is Kind.MIN else max(n, limit))
        return Outcome(text, text)
    raise ValueError(f"local bug: {spec.name} ({spec.kind.value}) is not negotiated")


def check_declaration(spec: KeySpec, value: str) -> str:
    """Validate a declarative value against the key's range or enumeration; raises BadValue."""
    if spec.kind is not Kind.DECLARATIVE:
        raise ValueError(f"local bug: {spec.name} is not declarative")
    if spec.high:
        n = parse_number(value)
        if not spec.low <= n <= spec.high:
            raise BadValue(f"{spec.name}={value} is outside {spec.low}..{spec.high}")
        return format_number(n)
    if spec.values and value not in spec.values:
        raise BadValue(f"{spec.name}={value!r} is not one of {spec.values}")
    return value
