"""Linearizability checker for histories of per-key registers.

Theory of operation
-------------------
A chaos run records, for every client request, when it was invoked, when (and
whether) it completed, and what it read. The store is linearizable if every key
behaves like a single register: there is one total order of the operations
that respects real time (an operation that completed before another started
comes first) and in which every read returns the value of the latest write.

Linearizability is local (Herlihy & Wing 1990; "P-compositionality" in Horn &
Kroening 2015, as Porcupine uses it), so each key is checked on its own.

Within a key, a cheap pass comes first: a read can be impossible on its own
(a value nobody wrote, a value written only after the read completed, a value
certainly overwritten before the read began). Those are the usual bugs, they
are found in O(n log n), and the message names exactly what was wrong.

Then the search of Wing & Gong (1993) as improved by Lowe (2017) and used by
Knossos and Porcupine: the history becomes a time-ordered list of call and
return entries; a depth-first search repeatedly linearizes some pending call
that the register accepts, removing the call and its return from the list (a
"lift"), and backtracks when it reaches the return of an operation it has not
linearized. Every configuration, (set of linearized operations, register
value), is memoized, so none is explored twice. On top of that, exact
reductions for registers keep the search narrow when 16 clients hammer one key
(see `_search`); with them a linearizable history costs one or two
configurations per operation. Proving a violation needs every configuration
before it explored, which can take far more, so the search is bounded and
reports "unknown" when the bound is hit.

Indeterminate operations (outcome "info": a timeout or a crash) may have taken
effect at any instant after they started, or never. The search may linearize
an indeterminate write anywhere after its start and succeeds once every
completed operation is linearized, which is the same as placing the rest at the
very end, where they change nothing anyone observed. An indeterminate write
that no read observed is dropped, and one still unplaced after the last read of
its value is omitted (see `_useful_ops`).

Equal timestamps count as concurrent (calls sort before returns at the same
instant, as in Porcupine): with a coarse clock we cannot tell which came
first, and a checker must not report a violation that the clock invented.

This module does no I/O; it takes a history and returns a verdict.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

Kind: TypeAlias = Literal["read", "write", "delete"]
Outcome: TypeAlias = Literal["ok", "fail", "info"]

_KINDS: frozenset[str] = frozenset(("read", "write", "delete"))
_OUTCOMES: frozenset[str] = frozenset(("ok", "fail", "info"))

# Each cached configuration costs about 100 bytes (one small int in a set, plus
# the search stack), and CPython explores about 200,000 a second, so the
# default bounds one key near 200 MB and ten seconds. Measured on simulated
# histories of 2,000 ops with 16 clients all busy on one key: a linearizable
# one needs a few thousand configurations; proving a violation near its end,
# which means exhausting every configuration before it, about a million.
MAX_STATES_PER_KEY_DEFAULT = 2_000_000

# How many concurrent operations and possible values a violation message lists
# before it summarizes; the full history is in Violation.ops.
_MESSAGE_OPS_MAX = 16
_MESSAGE_VALUES_MAX = 8
# Values are printed with repr, cut to this many bytes.
_VALUE_PRINT_BYTES_MAX = 32


class HistoryError(ValueError):
    """The history handed to the checker is malformed: the caller's fault, not the store's."""


class CheckerInvariantError(RuntimeError):
    """The checker broke one of its own invariants: a bug in this module, never in the store."""


@dataclass(frozen=True, slots=True)
class Op:
    """One client request against one key, as the client saw it.

    `value` is what a write wrote or what a read observed (None means the key
    was absent); it is ignored for deletes, which write None. `end` may be None
    only when the outcome is indeterminate. Outcome "fail" means the request
    definitely did not take effect; "info" means it may have taken effect at any
    time after `start`, even after `end` if one was recorded, or never.
    """

    process: int
    key: str
    kind: Kind
    value: bytes | None
    start: float
    end: float | None
    outcome: Outcome

    def __post_init__(self) -> None:
        # Checked here so a bad record fails where it was made, not deep inside a search.
        if self.kind not in _KINDS:
            raise HistoryError(f"op kind must be one of {sorted(_KINDS)}, got {self.kind!r}")
        if self.outcome not in _OUTCOMES:
            raise HistoryError(f"op outcome must be one of {sorted(_OUTCOMES)}, got {self.outcome!r}")
        if not (self.value is None or isinstance(self.value, bytes)):
            raise HistoryError(f"op value must be bytes or None, got {type(self.value).__name__}")
        if self.kind == "write" and self.value is None:
            raise HistoryError("a write must carry the bytes it wrote (use kind='delete' to write None)")
        if not math.isfinite(self.start):
            raise HistoryError(f"op start must be a finite time, got {self.start!r}")
        if self.outcome == "ok" and self.end is None:
            raise HistoryError("a completed (outcome 'ok') op must have an end time")
        if self.end is not None and not (math.isfinite(self.end) and self.end >= self.start):
            raise HistoryError(f"op end {self.end!r} must be a finite time no earlier than its start {self.start!r}")


@dataclass(frozen=True, slots=True)
class Violation:
    """A key whose history has no linearization."""

    key: str
    message: str
    ops: tuple[Op, ...]


@dataclass(frozen=True, slots=True)
class Result:
    """The verdict on a whole history.

    `ok` is True only when every key was proven linearizable: a key whose
    search ran out of budget is listed in `unknown_keys` and makes `ok` False
    without being a violation.
    """

    ok: bool
    violations: tuple[Violation, ...]
    keys_checked: int
    ops_checked: int
    unknown_keys: tuple[str, ...]


def check(history: Iterable[Op], *, max_states_per_key: int = MAX_STATES_PER_KEY_DEFAULT) -> Result:
    """Check that every key of `history` behaves as a linearizable register starting absent.

    `ops_checked` counts the operations that carry information: failed
    operations and reads that did not complete are dropped first. A key whose
    search explores more than `max_states_per_key` configurations is reported
    in `unknown_keys` rather than searched on.
    """
    if not max_states_per_key >= 1:
        raise ValueError(f"max_states_per_key must be at least 1, got {max_states_per_key}")
    by_key: dict[str, list[Op]] = {}
    for op in history:
        if not isinstance(op, Op):
            raise HistoryError(f"history entries must be Op, got {type(op).__name__}")
        by_key.setdefault(op.key, []).append(op)

    violations: list[Violation] = []
    unknown: list[str] = []
    ops_checked = 0
    for key in sorted(by_key):
        ops = sorted(by_key[key], key=_time_order)
        verdict = _check_key(key, ops, max_states_per_key)
        ops_checked += verdict.ops_checked
        if verdict.violation is not None:
            violations.append(verdict.violation)
        elif verdict.unknown:
            unknown.append(key)
    return Result(
        ok=not violations and not unknown,
        violations=tuple(violations),
        keys_checked=len(by_key),
        ops_checked=ops_checked,
        unknown_keys=tuple(unknown),
    )


def describe(op: Op) -> str:
    """One line for a human: what the op did, who did it, when, and how it ended."""
    end = "inf" if op.end is None or op.outcome == "info" else f"{op.end:.6f}"
    if op.kind == "read":
        what = f"read observed {_show(op.value)}" if op.outcome == "ok" else "read"
    elif op.kind == "write":
        what = f"write {_show(op.value)}"
    else:
        what = "delete"
    return f"{what} by process {op.process} over [{op.start:.6f}, {end}] ({op.outcome})"


# -- per-key check -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _KeyVerdict:
    ops_checked: int
    violation: Violation | None
    unknown: bool


@dataclass(frozen=True, slots=True)
class _Dead:
    """The search proved no linearization exists; it never got past the return of `op`."""

    op: int
    values: tuple[str, ...]  # what the register could hold there, printed


@dataclass(frozen=True, slots=True)
class _Linearizable:
    pass


@dataclass(frozen=True, slots=True)
class _OutOfBudget:
    pass


def _time_order(op: Op) -> tuple[float, float, int]:
    return (op.start, _effective_end(op), op.process)


def _effective_end(op: Op) -> float:
    # An indeterminate op may take effect arbitrarily late, even if the client gave up at op.end.
    if op.outcome == "info" or op.end is None:
        return math.inf
    return op.end


def _check_key(key: str, ops: list[Op], max_states: int, *, prechecks: bool = True) -> _KeyVerdict:
    """Check one key's ops, sorted by start. Tests turn `prechecks` off to hold the search alone to account."""
    # Failed ops never took effect, and a read that did not complete observed nothing.
    informative = [op for op in ops if op.outcome != "fail" and (op.kind != "read" or op.outcome == "ok")]
    if prechecks:
        found = _impossible_read(informative)
        if found is not None:
            read, why = found
            message = f"key {key!r}: {describe(read)}, but {why}.{_concurrent_text(read, informative)}"
            return _KeyVerdict(len(informative), Violation(key, message, tuple(ops)), False)

    searched, expiries = _useful_ops(informative)
    outcome = _search(searched, expiries, max_states)
    if isinstance(outcome, _Linearizable):
        return _KeyVerdict(len(informative), None, False)
    if isinstance(outcome, _OutOfBudget):
        return _KeyVerdict(len(informative), None, True)
    return _KeyVerdict(len(informative), Violation(key, _dead_message(key, searched, outcome), tuple(ops)), False)


def _impossible_read(ops: Sequence[Op]) -> tuple[Op, str] | None:
    """The first read that no linearization can explain on its own, and why; O(n log n).

    A read of v needs a write X of v (or the initial absence, for None) to be the
    last write before it. X must be invoked before the read completes, and it
    must not be overwritten for certain first: no completed write Y may satisfy
    X.end < Y.start and Y.end < read.start, because Y would then sit between X
    and the read in every linearization. These are the classic failures (a
    value from nowhere, a read from the future, a stale read) and catching them
    here spares the search, which must exhaust every configuration before it can
    report one, and names the culprit exactly.
    """
    # Writers of each value by start, with the latest end among each prefix of them.
    by_value: dict[bytes | None, list[Op]] = {}
    for op in ops:
        if op.kind != "read":
            by_value.setdefault(_written(op), []).append(op)
    starts: dict[bytes | None, list[float]] = {}
    latest_end: dict[bytes | None, list[tuple[float, Op]]] = {}
    for v, writers in by_value.items():
        writers.sort(key=lambda o: o.start)
        starts[v] = [o.start for o in writers]
        best: tuple[float, Op] | None = None
        prefix: list[tuple[float, Op]] = []
        for o in writers:
            if best is None or _effective_end(o) > best[0]:
                best = (_effective_end(o), o)
            prefix.append(best)
        latest_end[v] = prefix
    # Completed writes by end, with the latest start among each prefix of them.
    completed = sorted((o for o in ops if o.kind != "read" and o.outcome == "ok"), key=_effective_end)
    ends = [_effective_end(o) for o in completed]
    latest_start: list[Op] = []
    for o in completed:
        latest_start.append(o if not latest_start or o.start > latest_start[-1].start else latest_start[-1])

    for read in ops:
        if read.kind != "read":
            continue
        v = read.value
        done_before = bisect.bisect_left(ends, read.start)
        overwriter = latest_start[done_before - 1] if done_before else None
        if v is None and overwriter is None:
            continue  # the key may still be absent from the start
        if v not in by_value:
            if v is None and overwriter is not None:
                # Only the initial absence could explain it, and a completed write ended that.
                return read, f"{describe(overwriter)} completed before it began and no delete could follow"
            return read, "no write of this key (completed or indeterminate) wrote that value"
        invoked_in_time = bisect.bisect_right(starts[v], _effective_end(read))
        if invoked_in_time == 0:
            first = by_value[v][0]
            return read, f"every write of that value was invoked after it completed, the first being {describe(first)}"
        end, writer = latest_end[v][invoked_in_time - 1]
        if overwriter is not None and end < overwriter.start:
            return read, (
                f"that value was overwritten before it began: {describe(overwriter)} started after every "
                f"write of the value had completed (the last being {describe(writer)}) and completed before "
                "the read began"
            )
    return None


def _useful_ops(ops: Sequence[Op]) -> tuple[list[Op], list[float]]:
    """The ops worth searching, and for each the time after which it no longer matters.

    A completed op matters until it returns. An indeterminate write matters
    only until the last read of its value completes: placed any later it could
    only set a value that nobody reads, so omitting it is as good. If no read
    of its value completes after it starts, it is dropped altogether. Dropping
    or expiring these early keeps a crashed client's write from doubling the
    search space for the rest of the history.
    """
    last_read_end: dict[bytes | None, float] = {}
    for op in ops:
        if op.kind == "read":
            last_read_end[op.value] = max(last_read_end.get(op.value, -math.inf), _effective_end(op))
    useful: list[Op] = []
    expiries: list[float] = []
    for op in ops:
        if op.outcome == "ok":
            useful.append(op)
            expiries.append(_effective_end(op))
            continue
        if not (op.outcome == "info" and op.kind != "read"):
            raise CheckerInvariantError(f"only completed ops and indeterminate writes can be searched: {describe(op)}")
        expiry = last_read_end.get(_written(op), -math.inf)
        if expiry >= op.start:
            useful.append(op)
            expiries.append(expiry)
    return useful, expiries


def _written(op: Op) -> bytes | None:
    return None if op.kind == "delete" else op.value


def _search(ops: Sequence[Op], expiries: Sequence[float], max_states: int) -> _Linearizable | _Dead | _OutOfBudget:
    """WGL depth-first search over the call/return entries of one key's ops.

    `ops` must be sorted by start and hold only completed ops and indeterminate
    writes; `expiries` are their return times, or for an indeterminate write
    the time after which it is omitted (see _useful_ops).

    A configuration is (t, w, li, state): completed ops are numbered in start
    order, t of them form a fully linearized prefix, w is the bitset of
    linearized ones past that prefix (bit 0 is op t), and li is the bitset of
    indeterminate ops linearized or omitted. Because the search linearizes
    roughly in start order, w stays about as wide as the concurrency, so a
    cached configuration is a few machine words instead of one bit per op of
    the history.

    Three moves keep the search narrow under heavy concurrency; all are exact.
    A read that matches the register is linearized at once without branching
    (see the loop), and a configuration is abandoned as soon as a pending read
    wants a value that the register does not hold and that no unplaced write
    can still produce. An indeterminate write still pending at its expiry is
    omitted, without branching, so configurations that differ only in whether it
    took effect meet in the cache from then on.
    """
    if not len(expiries) == len(ops):
        raise CheckerInvariantError("every searched op needs an expiry")
    n = len(ops)
    # Values become small ints, so comparisons and cache keys stay cheap whatever the value
    # size. Every value that no read observed shares id 0: once the register holds such a
    # value, the only possible next move is another write, whichever of these values it is,
    # so configurations that differ only there are one configuration. Different orders of
    # blind writes then meet in the cache instead of being explored one by one.
    value_id: dict[bytes | None, int] = {}
    for op in ops:
        if op.kind == "read":
            value_id.setdefault(op.value, len(value_id) + 1)
    shown = ["a value no read observed", *(_show(v) for v in value_id)]
    # Unplaced writes of each value: once none is left, a read of that value can only be
    # placed while the register still holds it.
    writers_left = [0] * len(shown)

    ok_id = [-1] * n
    info_bit = [0] * n
    required = 0
    info_count = 0
    for i, op in enumerate(ops):
        if op.kind != "read":
            writers_left[value_id.get(_written(op), 0)] += 1
        if op.outcome == "ok":
            ok_id[i] = required
            required += 1
        else:
            if not (op.outcome == "info" and op.kind != "read"):
                raise CheckerInvariantError(f"search given an op it cannot place: {describe(op)}")
            info_bit[i] = 1 << info_count
            info_count += 1
    if required == 0:
        return _Linearizable()

    # Entry positions 0..2n-1 in time order; then a head and a tail sentinel.
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        if not expiries[i] >= op.start:
            raise CheckerInvariantError(f"op expires before it starts: {describe(op)}")
        events.append((op.start, 0, i))
        # An expiry sorts after the returns at its instant: it follows the last read it serves.
        events.append((expiries[i], 1 if op.outcome == "ok" else 2, i))
    # Calls sort before returns at equal times, so equal timestamps mean "concurrent".
    events.sort()
    head = 2 * n
    tail = 2 * n + 1
    size = 2 * n + 2

    is_call = [False] * size
    is_expiry = [False] * size
    is_write = [False] * size
    value = [0] * size
    e_ok_id = [-1] * size
    e_info_bit = [0] * size
    mate = [-1] * size
    op_of = [-1] * size
    call_pos = [-1] * n
    for pos, (_, kind, i) in enumerate(events):
        op_of[pos] = i
        if kind == 0:
            call_pos[i] = pos
            is_call[pos] = True
            is_write[pos] = ops[i].kind != "read"
            value[pos] = value_id.get(_written(ops[i]), 0) if is_write[pos] else value_id[ops[i].value]
            e_ok_id[pos] = ok_id[i]
            e_info_bit[pos] = info_bit[i]
        else:
            is_expiry[pos] = kind == 2
            if not call_pos[i] >= 0:
                raise CheckerInvariantError("an op's return sorted before its call")
            mate[call_pos[i]] = pos
            mate[pos] = call_pos[i]

    # The order in which the search tries pending writes. It cannot change the verdict, only
    # how soon the search finds a linearization; measured on simulated histories with 16
    # clients on one key it makes the difference between ~15 and ~1.5 configurations per op.
    # Blind writes (no read observed their value) go first: one is always followed by another
    # write, so placing it early rarely costs anything and takes it out of later branching.
    # Then earliest return first, like earliest-deadline scheduling: the op that must be
    # placed soonest is placed first. Trying writes in call order, as WGL does, loses to both.
    rank = [0] * size
    for pos in range(2 * n):
        if is_write[pos]:
            rank[pos] = mate[pos] + (0 if value[pos] == 0 else size)

    nxt = [0] * size
    prv = [0] * size
    chain = [head, *range(2 * n), tail]
    for a, b in zip(chain, chain[1:], strict=False):
        nxt[a] = b
        prv[b] = a

    state = value_id.get(None, 0)  # every key starts absent
    t = 0
    w = 0
    li = 0
    # Configurations are packed into one int: a tuple of four ints costs three times the
    # memory, and a full search may hold max_states of them.
    li_bits = info_count
    state_bits = len(shown).bit_length()
    t_bits = required.bit_length()
    cache: set[int] = set()
    # One frame per linearized op: the configuration before it, the moves that were open
    # there, which of them was taken, and where that configuration dies once they are spent.
    stack: list[tuple[int, int, int, int, list[int], int, int]] = []
    # The furthest return the search could not get past, and the values seen there: the diagnosis.
    best_pos = -1
    best_states: set[int] = set()

    moves: list[int] = []
    move = 0
    dead_at = -1
    fresh = True
    while True:
        if fresh:
            # A new configuration: collect the moves, the calls before the first return.
            #
            # A read that matches the register is the only move taken: if any linearization
            # from here exists, one exists with this read first, because a read changes no
            # state and every op not yet placed returns after this read's call, so moving the
            # read ahead of them breaks no real-time order. Without this the search would try
            # every subset of the pending reads that agree with the register.
            #
            # A read that wants a value the register does not hold, when no unplaced write
            # can still produce it, can never be placed: the configuration is dead.
            #
            # Otherwise the moves are the pending writes, in the order of `rank`.
            fresh = False
            move = 0
            writes: list[int] = []
            entry = nxt[head]
            while is_call[entry]:
                if is_write[entry]:
                    writes.append(entry)
                elif value[entry] == state:
                    break
                elif writers_left[value[entry]] == 0:
                    break
                entry = nxt[entry]
            if is_expiry[entry]:
                # An indeterminate write reached its expiry unplaced: omit it.
                moves = [entry]
            elif not is_call[entry]:
                # No read decides: branch over the writes.
                moves = sorted(writes, key=rank.__getitem__)
            elif value[entry] == state:
                moves = [entry]
            else:
                moves = []
            # If the moves run out, this configuration never gets past the first return in
            # the list, which lies at or after `entry` (found only then: it is rarely needed).
            dead_at = entry

        # Take the first open move that leads somewhere not yet explored.
        while move < len(moves):
            chosen = moves[move]
            # A move is a call to linearize, or the expiry (a return entry) of one to omit.
            call = chosen if is_call[chosen] else mate[chosen]
            oid = e_ok_id[call]
            if oid < 0:
                nt, nw, nli = t, w, li | e_info_bit[call]
            elif oid == t:
                nw = w | 1
                # Slide the window past the run of linearized ops now at its bottom.
                shift = (~nw & (nw + 1)).bit_length() - 1
                nt, nw, nli = t + shift, nw >> shift, li
            else:
                nt, nw, nli = t, w | (1 << (oid - t)), li
            # is_write is set on call entries only, so reads and expiries keep the state.
            new_state = value[call] if is_write[chosen] else state
            config = ((((nw << li_bits) | nli) << state_bits | new_state) << t_bits) | nt
            if config not in cache:
                break
            # Explored before and it led nowhere (success would have ended the search).
            move += 1
        else:
            chosen = -1

        if chosen >= 0:
            cache.add(config)
            if len(cache) > max_states:
                return _OutOfBudget()
            stack.append((state, t, w, li, moves, move, dead_at))
            state, t, w, li = new_state, nt, nw, nli
            if is_write[call]:
                writers_left[value[call]] -= 1
            ret = mate[call]
            p, q = prv[call], nxt[call]
            nxt[p] = q
            prv[q] = p
            p, q = prv[ret], nxt[ret]
            nxt[p] = q
            prv[q] = p
            if t == required:
                # Every completed op is placed; pending indeterminate writes are omitted.
                return _Linearizable()
            fresh = True
            continue

        # Dead end: no move from here gets past the first return in the list.
        while is_call[dead_at]:
            dead_at = nxt[dead_at]
        if dead_at == tail:
            # Only returns stop the scan, and reaching the tail means every completed op
            # returned, so was placed: t == required, which returned above.
            raise CheckerInvariantError("search reached the end of the history with ops unplaced")
        if is_expiry[dead_at]:
            pass  # omitting the write led to a configuration already explored and diagnosed
        elif dead_at > best_pos:
            best_pos = dead_at
            best_states = {state}
        elif dead_at == best_pos:
            best_states.add(state)
        if not stack:
            # The first dead end of a search is never an expiry: that needs a cache hit.
            if not best_pos >= 0:
                raise CheckerInvariantError("search failed without reaching any return")
            return _Dead(op_of[best_pos], tuple(shown[v] for v in sorted(best_states)))
        state, t, w, li, moves, move, dead_at = stack.pop()
        chosen = moves[move]
        call = chosen if is_call[chosen] else mate[chosen]
        if is_write[call]:
            writers_left[value[call]] += 1
        ret = mate[call]
        p, q = prv[ret], nxt[ret]
        nxt[p] = ret
        prv[q] = ret
        p, q = prv[call], nxt[call]
        nxt[p] = call
        prv[q] = call
        move += 1


# -- messages ----------------------------------------------------------------


def _dead_message(key: str, ops: Sequence[Op], dead: _Dead) -> str:
    op = ops[dead.op]
    values = ", ".join(dead.values[:_MESSAGE_VALUES_MAX])
    if len(dead.values) > _MESSAGE_VALUES_MAX:
        values += f", and {len(dead.values) - _MESSAGE_VALUES_MAX} more"
    if op.kind == "read":
        why = f"the register could only hold {{{values}}} when it completed"
    else:
        why = f"no order of it and the ops concurrent with it fits the reads; the register could hold {{{values}}}"
    return f"key {key!r}: no linearization reaches the completion of {describe(op)}: {why}.{_concurrent_text(op, ops)}"


def _concurrent_text(op: Op, ops: Sequence[Op]) -> str:
    start, end = op.start, _effective_end(op)
    concurrent = [o for o in ops if o is not op and o.start <= end and _effective_end(o) >= start]
    if not concurrent:
        return " No op was concurrent with it."
    lines = [f"\n  {describe(o)}" for o in concurrent[:_MESSAGE_OPS_MAX]]
    if len(concurrent) > _MESSAGE_OPS_MAX:
        lines.append(f"\n  ... and {len(concurrent) - _MESSAGE_OPS_MAX} more")
    return " Concurrent ops:" + "".join(lines)


def _show(value: bytes | None) -> str:
    if value is None:
        return "absent"
    if len(value) > _VALUE_PRINT_BYTES_MAX:
        return f"{value[:_VALUE_PRINT_BYTES_MAX]!r}... ({len(value)} bytes)"
    return repr(value)
