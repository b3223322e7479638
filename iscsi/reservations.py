"""Persistent reservations (SPC-4 r37 §5.12): the state, its pure transition function, its store.

Theory of operation. ``PrState`` is an immutable value: the registrations (one
reservation key per I_T nexus, or per initiator port with ALL_TG_PT), the reservation
if any, the PRgeneration counter and the last APTPL bit. ``persistent_reserve_out``
is a pure function from (state, issuing I_T nexus, PERSISTENT RESERVE OUT service
action, parameters) to a ``PrOutcome``: the next state plus the unit attentions SPC-4
says the change establishes (§5.12.11). It does no I/O and takes no locks; the
logical unit (iscsi/scsi.py) serialises PERSISTENT RESERVE OUT commands, saves the
new state through a ``ReservationStore`` and only then swaps it in and queues the
unit attentions, so a failed save leaves everything as it was.

``access_conflict`` is SPC-4 §5.12.1 Table 51 / SBC-3 §4.17 Table 13 reduced to
command classes: which commands a reservation forbids from which I_T nexus.

Persistence. The store is the cluster KV (DESIGN.md §1), so the state outlives the
node serving the volume: after a failover the new owner's logical unit loads it and
the reservations stand, whatever APTPL said. (APTPL is still recorded and reported as
PTPL_A.) Registrations name I_T nexuses by initiator port and target port strings, so
every node serving a volume should present the same target portal group tag for the
registrations to match the reconnected nexuses.
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from iscsi.device import Unavailable
from iscsi.sense import (
    INSUFFICIENT_REGISTRATION_RESOURCES,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    FieldPointer,
    SenseCode,
)

# An I_T nexus as persistent reservations name it: (initiator port, target port),
# the strings of Nexus.initiator_port and Nexus.target_port (iscsi/types.py).
NexusId = tuple[str, str]

# How many registrations the logical unit keeps. Past it REGISTER fails with
# INSUFFICIENT REGISTRATION RESOURCES (SPC-4 §5.12.7). Clusters register one key per
# host and path; 256 leaves room for a large cluster with multipath, and bounds the
# PRIN READ FULL STATUS answer (about 300 bytes a registration) under 80 KiB.
PR_REGISTRATIONS_MAX = 256

PR_OUT_PARAMETER_LIST_BYTES = 24  # SPC-4 §6.15.3 Table 172, without SPEC_I_PT TransportIDs
SCOPE_LU = 0x0
_KEY_MAX = (1 << 64) - 1
_GENERATION_MODULUS = 1 << 32
_STATE_FORMAT_VERSION = 1


class ServiceAction(enum.IntEnum):
    """PERSISTENT RESERVE OUT service actions (SPC-4 §6.15.2 Table 168)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06


class InService(enum.IntEnum):
    """PERSISTENT RESERVE IN service actions (SPC-4 §6.14.1 Table 160)."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrType(enum.IntEnum):
    """Persistent reservation types (SPC-4 §6.15.4 Table 171)."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8


class Holders(enum.Enum):
    """Who holds a reservation of a type, and who may access through it."""

    ONE = "one"  # the reservation holder alone (WE, EA)
    REGISTRANTS_ONLY = "registrants_only"  # one holder; every registrant has access (RO)
    ALL_REGISTRANTS = "all_registrants"  # every registrant is a holder (AR)


@dataclass(frozen=True, slots=True)
class TypeRule:
    exclusive_access: bool  # non-holders may not even read
    holders: Holders
    report_mask: int  # bit in the PERSISTENT RESERVATION TYPE MASK (SPC-4 §6.14.4 Table 165)


PR_TYPE_RULES: Mapping[PrType, TypeRule] = {
    PrType.WRITE_EXCLUSIVE: TypeRule(False, Holders.ONE, 0x0200),
    PrType.EXCLUSIVE_ACCESS: TypeRule(True, Holders.ONE, 0x0800),
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: TypeRule(False, Holders.REGISTRANTS_ONLY, 0x2000),
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: TypeRule(True, Holders.REGISTRANTS_ONLY, 0x4000),
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: TypeRule(False, Holders.ALL_REGISTRANTS, 0x8000),
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: TypeRule(True, Holders.ALL_REGISTRANTS, 0x0001),
}


class Access(enum.Enum):
    """How a command stands against reservations (SPC-4 Table 51, SBC-3 Table 13)."""

    ALWAYS = "always"  # INQUIRY, REPORT LUNS, REQUEST SENSE: allowed even under a foreign SPC-2 reservation
    UNRESTRICTED = "unrestricted"  # allowed under any persistent reservation, not under a foreign SPC-2 one
    READ = "read"  # conflicts for non-holders of Exclusive Access types
    WRITE = "write"  # conflicts for non-holders of every type
    SPC2 = "spc2"  # RESERVE(6)/RELEASE(6): the command decides


# ---------------------------------------------------------------------- errors


class ReservationConflict(Exception):
    """The I_T nexus may not do this: answer with RESERVATION CONFLICT status (no sense)."""


class PrRejected(Exception):
    """The initiator's request is malformed: CHECK CONDITION with this sense."""

    def __init__(self, code: SenseCode, field: FieldPointer | None = None) -> None:
        super().__init__(code.name)
        self.code = code
        self.field = field


# ---------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Registration:
    """A reservation key registered by an I_T nexus; target_port None means ALL_TG_PT."""

    initiator_port: str
    target_port: str | None
    key: int

    def matches(self, nexus: NexusId) -> bool:
        return self.initiator_port == nexus[0] and (self.target_port is None or self.target_port == nexus[1])


@dataclass(frozen=True, slots=True)
class Reservation:
    """The persistent reservation (scope is always LU_SCOPE, SPC-4 §6.15.4).

    ``holder`` is the holding I_T nexus; None for all-registrants types, whose
    holders are all the registrants. The reservation key is not stored: it is the
    holder's registration key (SPC-4 §6.14.3), which follows re-registrations.
    """

    type: PrType
    holder: NexusId | None


@dataclass(frozen=True, slots=True)
class PrState:
    generation: int = 0
    registrations: tuple[Registration, ...] = ()
    reservation: Reservation | None = None
    aptpl: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.generation < _GENERATION_MODULUS:
            raise ValueError(f"PRgeneration {self.generation} out of range")
        if len(self.registrations) > PR_REGISTRATIONS_MAX:
            raise ValueError(f"{len(self.registrations)} registrations, bound is {PR_REGISTRATIONS_MAX}")
        seen: set[tuple[str, str | None]] = set()
        for reg in self.registrations:
            if not 0 < reg.key <= _KEY_MAX:
                raise ValueError(f"registration key {reg.key} is zero or wider than 64 bits")
            ident = (reg.initiator_port, reg.target_port)
            if ident in seen:
                raise ValueError(f"two registrations for {ident}")
            seen.add(ident)
        res = self.reservation
        if res is not None:
            holders = PR_TYPE_RULES[res.type].holders
            if holders is Holders.ALL_REGISTRANTS:
                if res.holder is not None or not self.registrations:
                    raise ValueError("all-registrants reservation with a holder or without registrants")
            elif res.holder is None or self.registration_of(res.holder) is None:
                raise ValueError(f"reservation holder {res.holder} is not registered")

    def registration_of(self, nexus: NexusId) -> Registration | None:
        exact = [r for r in self.registrations if r.target_port == nexus[1] and r.initiator_port == nexus[0]]
        if exact:
            return exact[0]
        return next((r for r in self.registrations if r.matches(nexus)), None)

    def is_holder(self, nexus: NexusId) -> bool:
        res = self.reservation
        if res is None:
            return False
        if res.holder is None:
            return self.registration_of(nexus) is not None
        holder_reg = self.registration_of(res.holder)
        return holder_reg is not None and holder_reg.matches(nexus)

    def reservation_key(self) -> int:
        """The RESERVATION KEY READ RESERVATION reports: zero for all-registrants types."""
        res = self.reservation
        if res is None or res.holder is None:
            return 0
        reg = self.registration_of(res.holder)
        if reg is None:
            raise ValueError("reservation holder is not registered")
        return reg.key

    # ------------------------------------------------------------ serialization

    def to_bytes(self) -> bytes:
        """The persistent form kept in the ReservationStore (JSON; keys as hex strings)."""
        doc = {
            "version": _STATE_FORMAT_VERSION,
            "generation": self.generation,
            "aptpl": self.aptpl,
            "registrations": [[r.initiator_port, r.target_port, f"{r.key:016x}"] for r in self.registrations],
            "reservation": None
            if self.reservation is None
            else {
                "type": int(self.reservation.type),
                "holder": None if self.reservation.holder is None else list(self.reservation.holder),
            },
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PrState:
        """Parse the persistent form; raise ValueError on anything malformed or inconsistent."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("version") != _STATE_FORMAT_VERSION:
                raise ValueError("unknown persistent reservation state version")
            regs = []
            for item in doc["registrations"]:
                i_port, t_port, key_hex = item
                if not isinstance(i_port, str) or not (t_port is None or isinstance(t_port, str)):
                    raise ValueError("registration ports must be strings")
                regs.append(Registration(i_port, t_port, int(key_hex, 16)))
            res_doc = doc["reservation"]
            reservation = None
            if res_doc is not None:
                holder = res_doc["holder"]
                if holder is not None:
                    if not (len(holder) == 2 and all(isinstance(p, str) for p in holder)):
                        raise ValueError("reservation holder must be two port names")
                    holder = (holder[0], holder[1])
                reservation = Reservation(PrType(res_doc["type"]), holder)
            generation = doc["generation"]
            aptpl = doc["aptpl"]
            if not isinstance(generation, int) or not isinstance(aptpl, bool):
                raise ValueError("generation must be an integer and aptpl a boolean")
            return cls(generation, tuple(regs), reservation, aptpl)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"corrupt persistent reservation state: {exc}") from exc


# ---------------------------------------------------------------------- access


def access_conflict(state: PrState, nexus: NexusId, access: Access) -> bool:
    """True when the persistent reservation forbids `access` from `nexus` (RESERVATION CONFLICT)."""
    res = state.reservation
    if res is None or access in (Access.ALWAYS, Access.UNRESTRICTED, Access.SPC2):
        return False
    rule = PR_TYPE_RULES[res.type]
    if state.is_holder(nexus):
        return False
    if rule.holders is not Holders.ONE and state.registration_of(nexus) is not None:
        return False
    if access is Access.READ:
        return rule.exclusive_access
    return True


# ---------------------------------------------------------------------- PERSISTENT RESERVE OUT


@dataclass(frozen=True, slots=True)
class PrOutParameters:
    """The basic PERSISTENT RESERVE OUT parameter list (SPC-4 §6.15.3 Table 172)."""

    reservation_key: int
    service_action_key: int
    spec_i_pt: bool = False
    all_tg_pt: bool = False
    aptpl: bool = False

    @classmethod
    def parse(cls, data: bytes) -> PrOutParameters:
        if len(data) < PR_OUT_PARAMETER_LIST_BYTES:
            raise ValueError(f"{len(data)}-byte parameter list, need {PR_OUT_PARAMETER_LIST_BYTES}")
        flags = data[20]
        return cls(
            reservation_key=int.from_bytes(data[0:8], "big"),
            service_action_key=int.from_bytes(data[8:16], "big"),
            spec_i_pt=bool(flags & 0x08),
            all_tg_pt=bool(flags & 0x04),
            aptpl=bool(flags & 0x01),
        )

    def to_bytes(self) -> bytes:
        flags = (0x08 if self.spec_i_pt else 0) | (0x04 if self.all_tg_pt else 0) | (0x01 if self.aptpl else 0)
        out = bytearray(PR_OUT_PARAMETER_LIST_BYTES)
        out[0:8] = self.reservation_key.to_bytes(8, "big")
        out[8:16] = self.service_action_key.to_bytes(8, "big")
        out[20] = flags
        return bytes(out)


@dataclass(frozen=True, slots=True)
class UnitAttentionTo:
    """Establish `code` for every I_T nexus of `registrations`, except `exclude`."""

    code: SenseCode
    registrations: tuple[Registration, ...]
    exclude: NexusId | None = None

    def applies_to(self, nexus: NexusId) -> bool:
        return nexus != self.exclude and any(r.matches(nexus) for r in self.registrations)


@dataclass(frozen=True, slots=True)
class PrOutcome:
    state: PrState
    unit_attentions: tuple[UnitAttentionTo, ...] = ()
    changed: bool = True  # False: nothing to save, nothing to announce
    preempted: tuple[Registration, ...] = ()  # PREEMPT AND ABORT: whose tasks to abort


def _bump(generation: int) -> int:
    return (generation + 1) % _GENERATION_MODULUS


def _cdb_type(type_code: int) -> PrType:
    try:
        return PrType(type_code)
    except ValueError:
        raise PrRejected(INVALID_FIELD_IN_CDB, FieldPointer(2, 3)) from None


def _check_scope(scope: int) -> None:
    if scope != SCOPE_LU:
        raise PrRejected(INVALID_FIELD_IN_CDB, FieldPointer(2, 7))


def _registered_with(state: PrState, nexus: NexusId, key: int) -> Registration:
    """The nexus's registration, if its RESERVATION KEY matches; otherwise RESERVATION CONFLICT."""
    reg = state.registration_of(nexus)
    if reg is None or reg.key != key:
        raise ReservationConflict(f"{nexus} not registered with key {key:#x}")
    return reg


def persistent_reserve_out(
    state: PrState,
    nexus: NexusId,
    service_action: int,
    scope: int,
    type_code: int,
    params: PrOutParameters,
) -> PrOutcome:
    """Apply one PERSISTENT RESERVE OUT command (SPC-4 §5.12.7–§5.12.11, §6.15).

    Raises ReservationConflict or PrRejected; otherwise returns the outcome. Scope and
    type are checked before the registration (as LIO does), so a malformed CDB is
    reported as such whoever sends it.
    """
    if params.spec_i_pt:
        # SIP_C=0 in REPORT CAPABILITIES: TransportID lists are not supported.
        raise PrRejected(INVALID_FIELD_IN_PARAMETER_LIST, FieldPointer(20, 3, in_cdb=False))
    try:
        sa = ServiceAction(service_action)
    except ValueError:
        raise PrRejected(INVALID_FIELD_IN_CDB, FieldPointer(1, 4)) from None
    if sa in (ServiceAction.REGISTER, ServiceAction.REGISTER_AND_IGNORE_EXISTING_KEY):
        return _register(state, nexus, params, ignore_existing=sa is ServiceAction.REGISTER_AND_IGNORE_EXISTING_KEY)
    if sa is ServiceAction.RESERVE:
        _check_scope(scope)
        return _reserve(state, nexus, _cdb_type(type_code), params)
    if sa is ServiceAction.RELEASE:
        return _release(state, nexus, scope, type_code, params)
    if sa is ServiceAction.CLEAR:
        reg = _registered_with(state, nexus, params.reservation_key)
        others = tuple(r for r in state.registrations if r != reg)
        return PrOutcome(
            PrState(_bump(state.generation), (), None, state.aptpl),
            (UnitAttentionTo(RESERVATIONS_PREEMPTED, others, exclude=nexus),),
        )
    _check_scope(scope)
    return _preempt(state, nexus, _cdb_type(type_code), params)


def _register(state: PrState, nexus: NexusId, params: PrOutParameters, *, ignore_existing: bool) -> PrOutcome:
    """REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.12.7 Table 52)."""
    reg = state.registration_of(nexus)
    if not ignore_existing:
        expected = 0 if reg is None else reg.key
        if params.reservation_key != expected:
            raise ReservationConflict(f"{nexus} REGISTER with key {params.reservation_key:#x}, holds {expected:#x}")
    sark = params.service_action_key
    if sark == 0:
        if reg is None:
            return PrOutcome(state, changed=False)  # unregistering an unregistered nexus: no change
        return _unregister(state, nexus, reg, aptpl=params.aptpl)
    if reg is None:
        if len(state.registrations) >= PR_REGISTRATIONS_MAX:
            raise PrRejected(INSUFFICIENT_REGISTRATION_RESOURCES)
        new = Registration(nexus[0], None if params.all_tg_pt else nexus[1], sark)
        regs = (*state.registrations, new)
    else:
        regs = tuple(replace(r, key=sark) if r == reg else r for r in state.registrations)
    return PrOutcome(PrState(_bump(state.generation), regs, state.reservation, params.aptpl))


def _unregister(state: PrState, nexus: NexusId, reg: Registration, *, aptpl: bool) -> PrOutcome:
    """Remove the nexus's registration, and the reservation it held (SPC-4 §5.12.11.2)."""
    remaining = tuple(r for r in state.registrations if r != reg)
    reservation = state.reservation
    uas: tuple[UnitAttentionTo, ...] = ()
    if reservation is not None:
        holders = PR_TYPE_RULES[reservation.type].holders
        if holders is Holders.ALL_REGISTRANTS:
            if not remaining:
                reservation = None
        elif reservation.holder is not None and reg.matches(reservation.holder):
            reservation = None
            if holders is Holders.REGISTRANTS_ONLY:
                uas = (UnitAttentionTo(RESERVATIONS_RELEASED, remaining, exclude=nexus),)
    return PrOutcome(PrState(_bump(state.generation), remaining, reservation, aptpl), uas)


def _reserve(state: PrState, nexus: NexusId, pr_type: PrType, params: PrOutParameters) -> PrOutcome:
    """RESERVE (SPC-4 §5.12.9)."""
    _registered_with(state, nexus, params.reservation_key)
    current = state.reservation
    if current is not None:
        if state.is_holder(nexus) and current.type == pr_type:
            return PrOutcome(state, changed=False)
        raise ReservationConflict(f"{nexus} RESERVE {pr_type.name} while {current.type.name} is held")
    holder = None if PR_TYPE_RULES[pr_type].holders is Holders.ALL_REGISTRANTS else nexus
    # RESERVE does not change PRgeneration (SPC-4 §6.14.2; libiscsi ProutClear checks it).
    return PrOutcome(replace(state, reservation=Reservation(pr_type, holder)))


def _release(state: PrState, nexus: NexusId, scope: int, type_code: int, params: PrOutParameters) -> PrOutcome:
    """RELEASE (SPC-4 §5.12.11.2)."""
    _registered_with(state, nexus, params.reservation_key)
    current = state.reservation
    if current is None or not state.is_holder(nexus):
        return PrOutcome(state, changed=False)  # not the holder: GOOD, no effect
    if scope != SCOPE_LU or type_code != current.type:
        raise PrRejected(INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    uas: tuple[UnitAttentionTo, ...] = ()
    if PR_TYPE_RULES[current.type].holders is not Holders.ONE:
        others = tuple(r for r in state.registrations if not r.matches(nexus))
        uas = (UnitAttentionTo(RESERVATIONS_RELEASED, others, exclude=nexus),)
    return PrOutcome(replace(state, reservation=None), uas)


def _preempt(state: PrState, nexus: NexusId, pr_type: PrType, params: PrOutParameters) -> PrOutcome:
    """PREEMPT and PREEMPT AND ABORT (SPC-4 §5.12.11.4).

    As in LIO, the issuing I_T nexus's own registration is never removed, even when
    its key equals the SERVICE ACTION RESERVATION KEY (libiscsi ProutPreempt relies on
    this: both of its initiators usually register the same random key).
    """
    issuer = _registered_with(state, nexus, params.reservation_key)
    sark = params.service_action_key
    current = state.reservation
    new_reservation = current
    if current is not None and PR_TYPE_RULES[current.type].holders is Holders.ALL_REGISTRANTS and sark == 0:
        victims = tuple(r for r in state.registrations if r != issuer)
        new_reservation = _reservation_for(pr_type, nexus)
    elif current is not None and current.holder is not None and sark == state.reservation_key():
        victims = tuple(r for r in state.registrations if r.key == sark and r != issuer)
        new_reservation = _reservation_for(pr_type, nexus)
    else:
        if sark == 0:
            raise PrRejected(INVALID_FIELD_IN_PARAMETER_LIST, FieldPointer(8, in_cdb=False))
        victims = tuple(r for r in state.registrations if r.key == sark and r != issuer)
        if not victims:
            raise ReservationConflict(f"no registration with key {sark:#x} to preempt")
    remaining = tuple(r for r in state.registrations if r not in victims)
    uas = [UnitAttentionTo(REGISTRATIONS_PREEMPTED, victims)]
    if current is not None and new_reservation is not None and new_reservation.type != current.type:
        survivors = tuple(r for r in remaining if r != issuer)
        uas.append(UnitAttentionTo(RESERVATIONS_RELEASED, survivors, exclude=nexus))
    return PrOutcome(
        PrState(_bump(state.generation), remaining, new_reservation, state.aptpl),
        tuple(uas),
        preempted=victims,
    )


def _reservation_for(pr_type: PrType, nexus: NexusId) -> Reservation:
    holder = None if PR_TYPE_RULES[pr_type].holders is Holders.ALL_REGISTRANTS else nexus
    return Reservation(pr_type, holder)


# ---------------------------------------------------------------------- PERSISTENT RESERVE IN


def read_keys(state: PrState) -> bytes:
    """READ KEYS parameter data (SPC-4 §6.14.2 Table 162)."""
    keys = b"".join(r.key.to_bytes(8, "big") for r in state.registrations)
    return state.generation.to_bytes(4, "big") + len(keys).to_bytes(4, "big") + keys


def read_reservation(state: PrState) -> bytes:
    """READ RESERVATION parameter data (SPC-4 §6.14.3 Tables 163, 164)."""
    head = state.generation.to_bytes(4, "big")
    res = state.reservation
    if res is None:
        return head + (0).to_bytes(4, "big")
    body = bytearray(16)
    body[0:8] = state.reservation_key().to_bytes(8, "big")
    body[13] = (SCOPE_LU << 4) | int(res.type)
    return head + len(body).to_bytes(4, "big") + bytes(body)


def report_capabilities(state: PrState) -> bytes:
    """REPORT CAPABILITIES parameter data (SPC-4 §6.14.4 Table 165).

    CRH=0 (RESERVE/RELEASE(6) conflict with any registration), SIP_C=0 (no
    SPEC_I_PT), ATP_C=1 (ALL_TG_PT honoured), PTPL_C=1 (the state always persists),
    TMV=1 with every type, ALLOW COMMANDS=001b (TEST UNIT READY passes every type).
    """
    mask = 0
    for rule in PR_TYPE_RULES.values():
        mask |= rule.report_mask
    out = bytearray(8)
    out[0:2] = (8).to_bytes(2, "big")
    out[2] = 0x04 | 0x01  # ATP_C, PTPL_C
    out[3] = 0x80 | (0b001 << 4) | (0x01 if state.aptpl else 0)  # TMV, ALLOW COMMANDS, PTPL_A
    out[4:6] = mask.to_bytes(2, "big")
    return bytes(out)


def iscsi_transport_id(initiator_port: str) -> bytes:
    """The iSCSI TransportID of an initiator port, format 01b (SPC-4 §7.6.4.6 Table 508)."""
    name = initiator_port.encode("utf-8") + b"\0"
    name += b"\0" * (-len(name) % 4)
    if len(name) < 20:  # the ISCSI NAME field is at least 20 bytes, SPC-4 Table 508
        name += b"\0" * (20 - len(name))
    return bytes([0x40 | 0x05, 0]) + len(name).to_bytes(2, "big") + name


def read_full_status(state: PrState, relative_target_port: int) -> bytes:
    """READ FULL STATUS parameter data (SPC-4 §6.14.5 Tables 166, 167)."""
    res = state.reservation
    descriptors = bytearray()
    for reg in state.registrations:
        holder = res is not None and (res.holder is None or reg.matches(res.holder))
        tid = iscsi_transport_id(reg.initiator_port)
        desc = bytearray(24)
        desc[0:8] = reg.key.to_bytes(8, "big")
        desc[12] = (0x02 if reg.target_port is None else 0) | (0x01 if holder else 0)
        if holder and res is not None:
            desc[13] = (SCOPE_LU << 4) | int(res.type)
        desc[18:20] = relative_target_port.to_bytes(2, "big")
        desc[20:24] = len(tid).to_bytes(4, "big")
        descriptors += desc + tid
    return state.generation.to_bytes(4, "big") + len(descriptors).to_bytes(4, "big") + bytes(descriptors)


def unit_attention_targets(
    outcome: PrOutcome, nexuses: Iterable[NexusId]
) -> list[tuple[NexusId, SenseCode]]:
    """Pair every known I_T nexus with the unit attentions the outcome establishes for it."""
    pending = list(nexuses)
    return [(n, ua.code) for ua in outcome.unit_attentions for n in pending if ua.applies_to(n)]


# ---------------------------------------------------------------------- the store


class ReservationStore(Protocol):
    """Where a logical unit keeps its persistent reservation state.

    The contract: ``save`` returns only once the state is durable (the cluster's
    adapter commits it to the Raft-replicated KV), and raises iscsi.device.Unavailable
    when it cannot say so; the PERSISTENT RESERVE OUT that asked then fails with a
    retryable status and the logical unit keeps the previous state. ``load`` returns
    the last saved bytes, or None if the volume never had any.
    """

    def load(self) -> bytes | None: ...

    def save(self, state: bytes) -> None: ...


class MemReservationStore:
    """An in-process ReservationStore for tests and demos; ``unavailable`` makes save fail."""

    def __init__(self, initial: bytes | None = None) -> None:
        self._lock = threading.Lock()
        self._state = initial
        self.saves = 0
        self.unavailable = False

    def load(self) -> bytes | None:
        with self._lock:
            return self._state

    def save(self, state: bytes) -> None:
        with self._lock:
            if self.unavailable:
                raise Unavailable("reservation store unavailable (test)")
            self._state = bytes(state)
            self.saves += 1
