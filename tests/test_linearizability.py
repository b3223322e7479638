"""The linearizability checker against hand-made histories, a simulated register, and a large run."""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from dataclasses import dataclass, replace

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from chaos.history import Handle, HistoryRecorder, RecorderFullError
from chaos.linearizability import HistoryError, Op, Result, _check_key, _time_order, check

# -- helpers -----------------------------------------------------------------


def w(process: int, value: bytes, start: float, end: float | None, outcome: str = "ok", key: str = "k") -> Op:
    return Op(process, key, "write", value, start, end, outcome)  # type: ignore[arg-type]


def d(process: int, start: float, end: float | None, outcome: str = "ok", key: str = "k") -> Op:
    return Op(process, key, "delete", None, start, end, outcome)  # type: ignore[arg-type]


def r(process: int, value: bytes | None, start: float, end: float | None, outcome: str = "ok", key: str = "k") -> Op:
    return Op(process, key, "read", value, start, end, outcome)  # type: ignore[arg-type]


INFO = "info"
FAIL = "fail"

# -- hand-written table ------------------------------------------------------

# (name, history, linearizable). Names read like the scenario they describe.
CASES: list[tuple[str, list[Op], bool]] = [
    ("empty history", [], True),
    ("read of a never-written key sees absent", [r(1, None, 0, 1)], True),
    ("read of a value nobody wrote", [r(1, b"x", 0, 1)], False),
    ("read after completed write sees it", [w(1, b"a", 0, 1), r(2, b"a", 2, 3)], True),
    ("stale read: absent after a completed write", [w(1, b"a", 0, 1), r(2, None, 2, 3)], False),
    (
        "stale read: old value after a second completed write",
        [w(1, b"a", 0, 1), w(1, b"b", 2, 3), r(2, b"a", 4, 5)],
        False,
    ),
    ("read concurrent with a write may see the old value", [w(1, b"a", 0, 10), r(2, None, 1, 2)], True),
    ("read concurrent with a write may see the new value", [w(1, b"a", 0, 10), r(2, b"a", 1, 2)], True),
    (
        "new value then old value, both during one write",
        [w(1, b"a", 0, 10), r(2, b"a", 1, 2), r(2, None, 3, 4)],
        False,
    ),
    ("read from the future: sees a write invoked after it completed", [r(1, b"a", 0, 1), w(2, b"a", 2, 3)], False),
    (
        "two concurrent writes, later reads agree on the winner",
        [w(1, b"a", 0, 5), w(2, b"b", 0, 5), r(3, b"b", 6, 7), r(4, b"b", 8, 9)],
        True,
    ),
    (
        "two concurrent writes, later reads disagree on the winner",
        [w(1, b"a", 0, 5), w(2, b"b", 0, 5), r(3, b"a", 6, 7), r(4, b"b", 8, 9)],
        False,
    ),
    (
        "two concurrent writes, two readers see the same order",
        [
            w(1, b"a", 0, 10),
            w(2, b"b", 0, 10),
            r(3, b"a", 1, 2),
            r(3, b"b", 3, 4),
            r(4, b"a", 1, 2),
            r(4, b"b", 3, 4),
        ],
        True,
    ),
    (
        "two concurrent writes, two readers see opposite orders",
        [
            w(1, b"a", 0, 10),
            w(2, b"b", 0, 10),
            r(3, b"a", 1, 2),
            r(3, b"b", 3, 4),
            r(4, b"b", 1, 2),
            r(4, b"a", 3, 4),
        ],
        False,
    ),
    (
        "concurrent reads of both values while both writes are in flight",
        [w(1, b"a", 0, 10), w(2, b"b", 0, 10), r(3, b"a", 1, 9), r(4, b"b", 1, 9)],
        True,
    ),
    ("indeterminate write later observed", [w(1, b"a", 0, None, INFO), r(2, b"a", 5, 6)], True),
    ("indeterminate write never observed", [w(1, b"a", 0, None, INFO), r(2, None, 5, 6)], True),
    (
        "indeterminate write observed, then gone without another write",
        [w(1, b"a", 0, None, INFO), r(2, b"a", 5, 6), r(2, None, 7, 8)],
        False,
    ),
    ("indeterminate write observed before it was invoked", [r(2, b"a", 0, 1), w(1, b"a", 2, None, INFO)], False),
    (
        "indeterminate write takes effect long after its client gave up",
        [w(1, b"a", 0, 1, INFO), w(2, b"b", 2, 3), r(3, b"b", 4, 5), r(3, b"a", 6, 7)],
        True,
    ),
    (
        "indeterminate write applied at most once",
        [w(1, b"a", 0, None, INFO), r(2, b"a", 1, 2), w(2, b"b", 3, 4), r(2, b"a", 5, 6)],
        False,
    ),
    (
        "indeterminate write observed between two completed writes",
        [w(1, b"a", 0, 1), w(2, b"b", 2, None, INFO), w(1, b"c", 3, 4), r(3, b"b", 5, 6)],
        True,
    ),
    ("delete then read sees absent", [w(1, b"a", 0, 1), d(1, 2, 3), r(2, None, 4, 5)], True),
    ("delete then read still sees the value", [w(1, b"a", 0, 1), d(1, 2, 3), r(2, b"a", 4, 5)], False),
    ("indeterminate delete observed", [w(1, b"a", 0, 1), d(1, 2, None, INFO), r(2, None, 4, 5)], True),
    ("failed delete never took effect", [w(1, b"a", 0, 1), d(1, 2, 3, FAIL), r(2, None, 4, 5)], False),
    ("failed write never observed", [w(1, b"a", 0, 1, FAIL), r(2, None, 2, 3)], True),
    ("failed write observed", [w(1, b"a", 0, 1, FAIL), r(2, b"a", 2, 3)], False),
    (
        "failed write observed even though another write wrote something else",
        [w(1, b"a", 0, 1, FAIL), w(2, b"b", 0, 1), r(2, b"a", 2, 3)],
        False,
    ),
    (
        "reads that failed or timed out carry no information",
        [w(1, b"a", 0, 1), r(2, b"junk", 2, 3, FAIL), r(2, b"junk", 4, None, INFO)],
        True,
    ),
    (
        "the same value written twice explains a read after a different write",
        [w(1, b"a", 0, 1), w(1, b"b", 2, 3), w(2, b"a", 4, 10), r(3, b"a", 5, 6)],
        True,
    ),
    (
        "equal timestamps count as concurrent",
        [w(1, b"a", 0, 1), r(2, None, 1, 2)],
        True,
    ),
    (
        "a read overlapping nothing must see the latest completed write",
        [w(1, b"a", 0, 1), w(2, b"b", 0.5, 1.5), r(3, b"a", 2, 3), r(3, b"b", 4, 5)],
        False,
    ),
]


@pytest.mark.parametrize(("name", "history", "linearizable"), CASES, ids=[c[0] for c in CASES])
def test_table(name: str, history: list[Op], linearizable: bool) -> None:
    result = check(history)
    assert result.ok is linearizable, _explain(result)
    assert bool(result.violations) is not linearizable
    assert result.unknown_keys == ()
    # The checker must not depend on the order the history was handed over in.
    assert check(list(reversed(history))).ok is linearizable
    assert _search_alone(history) is linearizable
    assert _brute_force(history) is linearizable


def test_keys_are_checked_independently() -> None:
    history = [
        w(1, b"a", 0, 1, key="x"),
        r(2, None, 2, 3, key="x"),  # stale
        w(1, b"a", 0, 1, key="y"),
        r(2, b"a", 2, 3, key="y"),
        r(3, b"a", 2, 3, key="z"),  # z was never written with a
    ]
    result = check(history)
    assert not result.ok
    assert [v.key for v in result.violations] == ["x", "z"]
    assert result.keys_checked == 3
    assert result.ops_checked == 5
    assert all(op.key == "x" for op in result.violations[0].ops)


def test_ops_checked_skips_uninformative_ops() -> None:
    history = [w(1, b"a", 0, 1), w(1, b"b", 2, 3, FAIL), r(2, None, 0, None, INFO), r(2, b"a", 4, 5)]
    result = check(history)
    assert result.ok and result.ops_checked == 2 and result.keys_checked == 1


def test_search_violation_message_names_the_op_the_values_and_the_concurrent_ops() -> None:
    # Readers 3 and 4 see the two concurrent writes in opposite orders: no single read is
    # impossible on its own, so only the search can refute this history.
    history = [
        w(1, b"a", 0, 10),
        w(2, b"b", 0, 10),
        r(3, b"a", 1, 2),
        r(3, b"b", 3, 4),
        r(4, b"b", 1, 2),
        r(4, b"a", 3, 4),
    ]
    (violation,) = check(history).violations
    message = violation.message
    assert message.startswith("key 'k': no linearization reaches the completion of read observed b'"), message
    assert "the register could only hold {" in message
    assert "Concurrent ops:\n  write b'a' by process 1 over [0.000000, 10.000000] (ok)" in message
    assert violation.ops == tuple(sorted(history, key=lambda op: (op.start, op.end, op.process)))


@pytest.mark.parametrize(
    ("history", "complaint"),
    [
        ([r(1, b"zz", 1, 2)], "no write of this key (completed or indeterminate) wrote that value"),
        ([r(1, b"a", 1, 2), w(2, b"a", 3, 4)], "every write of that value was invoked after it completed"),
        ([w(1, b"a", 0, 1), w(2, b"b", 2, 3), r(3, b"a", 4, 5)], "that value was overwritten before it began"),
        ([w(1, b"a", 0, 1), r(3, None, 4, 5)], "completed before it began and no delete could follow"),
        ([d(1, 0, 1), w(1, b"a", 2, 3), r(3, None, 4, 5)], "that value was overwritten before it began"),
    ],
    ids=["value from nowhere", "read from the future", "stale read", "absent after a write", "absent after delete"],
)
def test_impossible_reads_are_named_without_a_search(history: list[Op], complaint: str) -> None:
    (violation,) = check(history).violations
    assert complaint in violation.message, violation.message
    # The search, on its own, must agree.
    assert not _search_alone(history)


def test_budget_exhaustion_is_unknown_not_a_violation() -> None:
    # Two reads after eight concurrent writes disagree about which write came last. No read is
    # impossible on its own, and refuting the history takes the search far more than five
    # configurations.
    history = [w(p, bytes([p]), 0, 10) for p in range(8)]
    history += [r(9, bytes([0]), 11, 12), r(9, bytes([1]), 13, 14)]
    result = check(history, max_states_per_key=5)
    assert not result.ok
    assert result.violations == ()
    assert result.unknown_keys == ("k",)
    assert not check(history).unknown_keys and check(history).violations


@pytest.mark.parametrize(
    ("make", "complaint"),
    [
        (lambda: Op(1, "k", "write", None, 0, 1, "ok"), "write must carry"),
        (lambda: Op(1, "k", "read", None, 0, None, "ok"), "must have an end"),
        (lambda: Op(1, "k", "read", None, 2, 1, "ok"), "no earlier than its start"),
        (lambda: Op(1, "k", "read", None, float("nan"), 1, "ok"), "finite"),
        (lambda: Op(1, "k", "scan", None, 0, 1, "ok"), "kind"),  # type: ignore[arg-type]
        (lambda: Op(1, "k", "read", None, 0, 1, "maybe"), "outcome"),  # type: ignore[arg-type]
        (lambda: Op(1, "k", "write", "text", 0, 1, "ok"), "bytes"),  # type: ignore[arg-type]
    ],
)
def test_malformed_ops_are_the_callers_fault(make: object, complaint: str) -> None:
    with pytest.raises(HistoryError, match=complaint):
        make()  # type: ignore[operator]


def _explain(result: Result) -> str:
    return "\n".join(v.message for v in result.violations) or repr(result)


def _search_alone(history: list[Op]) -> bool:
    """The verdict of the search with the pre-checks off, so each fact is established twice."""
    by_key: dict[str, list[Op]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
    verdicts = [
        _check_key(key, sorted(ops, key=_time_order), 10_000_000, prechecks=False) for key, ops in by_key.items()
    ]
    if any(v.unknown for v in verdicts):
        raise AssertionError("search ran out of budget on a small history")
    return all(v.violation is None for v in verdicts)


def _brute_force(history: list[Op]) -> bool:
    """Linearizability by enumerating every order, for histories of a handful of ops per key.

    Straight from the definition: some choice of the indeterminate writes, and
    some order of those and the completed ops that respects real time, makes
    every read return the latest write (None before the first).
    """
    by_key: dict[str, list[Op]] = {}
    for op in history:
        if op.outcome == "fail" or (op.kind == "read" and op.outcome != "ok"):
            continue
        by_key.setdefault(op.key, []).append(op)

    def end(op: Op) -> float:
        return op.end if op.outcome == "ok" and op.end is not None else math.inf

    def orderable(remaining: list[Op], state: bytes | None) -> bool:
        if not remaining:
            return True
        for x in remaining:
            # x may go next only if nothing left had to complete before x began.
            if any(end(y) < x.start for y in remaining if y is not x):
                continue
            if x.kind == "read":
                if x.value != state:
                    continue
                after = state
            else:
                after = None if x.kind == "delete" else x.value
            if orderable([y for y in remaining if y is not x], after):
                return True
        return False

    for ops in by_key.values():
        required = [op for op in ops if op.outcome == "ok"]
        optional = [op for op in ops if op.outcome == "info"]
        if not any(
            orderable(required + list(chosen), None)
            for k in range(len(optional) + 1)
            for chosen in itertools.combinations(optional, k)
        ):
            return False
    return True


# -- a simulated linearizable register ---------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """One request of a simulated client: what it does and how the run treats it."""

    process: int
    kind: str  # read | write | delete
    gap: int  # idle time before the request, after the process's previous one
    duration: int
    effect_at: float  # where in [start, end] the register applies it, as a fraction
    fate: str  # ok | fail | info-applied | info-lost


def simulate(specs: list[Spec], key: str = "k") -> list[Op]:
    """Run `specs` against a real atomic register and record what clients saw.

    Each process issues its requests one after another. Each request takes
    effect at one instant inside its interval (or never, if it failed or was
    lost), so the history is linearizable by construction. Written values are
    unique, which the mutation tests rely on.
    """
    clock: dict[int, int] = {}
    planned: list[tuple[float, int, int, int, Spec]] = []
    for index, spec in enumerate(specs):
        start = clock.get(spec.process, 0) + spec.gap
        end = start + spec.duration
        clock[spec.process] = end
        planned.append((start + spec.effect_at * spec.duration, index, start, end, spec))

    observed: dict[int, bytes | None] = {}
    register: bytes | None = None
    for _, index, _, _, spec in sorted(planned):
        if spec.fate in ("fail", "info-lost"):
            continue
        if spec.kind == "read":
            observed[index] = register
        elif spec.kind == "write":
            register = f"{key}:{index}".encode()
        else:
            register = None

    ops: list[Op] = []
    for _, index, start, end, spec in planned:
        outcome = "info" if spec.fate.startswith("info") else spec.fate
        if spec.kind == "read":
            value = observed.get(index) if outcome == "ok" else None
        elif spec.kind == "write":
            value = f"{key}:{index}".encode()
        else:
            value = None
        ops.append(
            Op(
                process=spec.process,
                key=key,
                kind=spec.kind,  # type: ignore[arg-type]
                value=value,
                start=float(start),
                end=None if outcome == "info" else float(end),
                outcome=outcome,  # type: ignore[arg-type]
            )
        )
    return ops


spec_strategy = st.builds(
    Spec,
    process=st.integers(0, 4),
    kind=st.sampled_from(["read", "read", "write", "write", "delete"]),
    gap=st.integers(0, 3),
    duration=st.integers(0, 8),
    effect_at=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    fate=st.sampled_from(["ok"] * 8 + ["fail", "info-applied", "info-lost"]),
)
specs_strategy = st.lists(spec_strategy, max_size=40)
# Small enough for the brute-force oracle, which tries every order.
small_specs = st.lists(spec_strategy, max_size=7)


@settings(max_examples=300, deadline=None)
@given(specs_strategy)
def test_simulated_register_histories_are_linearizable(specs: list[Spec]) -> None:
    history = simulate(specs)
    result = check(history)
    assert result.ok, _explain(result)
    assert _search_alone(history)


@settings(max_examples=300, deadline=None)
@given(specs_strategy, st.data())
def test_a_read_of_a_value_never_written_is_caught(specs: list[Spec], data: st.DataObject) -> None:
    history = simulate(specs)
    reads = [i for i, op in enumerate(history) if op.kind == "read" and op.outcome == "ok"]
    if not reads:
        return
    victim = data.draw(st.sampled_from(reads), label="mutated read")
    history[victim] = replace(history[victim], value=b"never written")
    result = check(history)
    assert not result.ok and len(result.violations) == 1
    assert "b'never written'" in result.violations[0].message
    assert not _search_alone(history)


@settings(max_examples=300, deadline=None)
@given(specs_strategy, st.data())
def test_a_read_from_the_future_is_caught(specs: list[Spec], data: st.DataObject) -> None:
    history = simulate(specs)
    pairs = [
        (i, j)
        for i, read in enumerate(history)
        if read.kind == "read" and read.outcome == "ok" and read.end is not None
        for j, write in enumerate(history)
        if write.kind == "write" and write.outcome != "fail" and write.start > read.end
    ]
    if not pairs:
        return
    i, j = data.draw(st.sampled_from(pairs), label="read, later write")
    history[i] = replace(history[i], value=history[j].value)
    result = check(history)
    assert not result.ok and len(result.violations) == 1, _explain(result)
    assert not _search_alone(history)


@settings(max_examples=300, deadline=None)
@given(specs_strategy, st.data())
def test_a_stale_read_is_caught(specs: list[Spec], data: st.DataObject) -> None:
    # The read sees a write X although a completed write Y began after X completed and
    # completed before the read began.
    history = simulate(specs)
    # (start, end, value) of every completed write or delete.
    done: list[tuple[float, float, bytes | None]] = []
    for op in history:
        if op.kind != "read" and op.outcome == "ok" and op.end is not None:
            done.append((op.start, op.end, op.value))
    stale = [
        (i, x_value)
        for i, read in enumerate(history)
        if read.kind == "read" and read.outcome == "ok"
        for _, x_end, x_value in done
        if x_value is not None and any(x_end < y_start and y_end < read.start for y_start, y_end, _ in done)
    ]
    if not stale:
        return
    i, value = data.draw(st.sampled_from(stale), label="read, overwritten value")
    history[i] = replace(history[i], value=value)
    result = check(history)
    assert not result.ok and len(result.violations) == 1, _explain(result)
    assert not _search_alone(history)


@settings(max_examples=1000, deadline=None)
@given(small_specs, st.data())
def test_verdict_matches_brute_force(specs: list[Spec], data: st.DataObject) -> None:
    # Mutations that may or may not break linearizability: some reads get another written
    # value, or absent. The checker, with and without its pre-checks, must agree with
    # enumerating every order.
    history = simulate(specs)
    choices: list[bytes | None] = [None, *(op.value for op in history if op.kind == "write")]
    for i, op in enumerate(history):
        if op.kind == "read" and op.outcome == "ok" and data.draw(st.booleans(), label=f"mutate read {i}"):
            history[i] = replace(op, value=data.draw(st.sampled_from(choices), label=f"value of read {i}"))
    expected = _brute_force(history)
    event(f"linearizable: {expected}")
    result = check(history)
    assert result.ok is expected, _explain(result)
    assert result.unknown_keys == ()
    assert _search_alone(history) is expected


# -- performance -------------------------------------------------------------


def random_specs(rng: random.Random, ops: int, processes: int, info_ops: int) -> list[Spec]:
    fates = ["ok"] * ops
    for i in rng.sample(range(ops), info_ops):
        fates[i] = rng.choice(["info-applied", "info-lost"])
    for i in rng.sample(range(ops), ops // 50):
        if fates[i] == "ok":
            fates[i] = "fail"
    return [
        Spec(
            process=rng.randrange(processes),
            kind=rng.choice(["read", "read", "read", "write", "write", "delete"]),
            gap=rng.randrange(3),
            duration=rng.randrange(1, 20),
            effect_at=rng.random(),
            fate=fates[i],
        )
        for i in range(ops)
    ]


def test_twenty_busy_keys_check_in_reasonable_time() -> None:
    seed = 20240611
    rng = random.Random(seed)
    history: list[Op] = []
    for k in range(20):
        history += simulate(random_specs(rng, ops=2000, processes=16, info_ops=5), key=f"key-{k}")
    rng.shuffle(history)
    began = time.perf_counter()
    result = check(history)
    elapsed = time.perf_counter() - began
    print(f"seed={seed} checked {result.ops_checked} ops on {result.keys_checked} keys in {elapsed:.2f}s")
    assert result.ok, f"seed={seed}: {_explain(result)}"
    assert result.keys_checked == 20


# -- the recorder ------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_recorder_produces_ops_and_crashed_ops_become_indeterminate() -> None:
    recorder = HistoryRecorder(clock=FakeClock())
    h_write = recorder.invoke(1, "k", "write", b"a")
    h_read = recorder.invoke(2, "k", "read")
    h_lost = recorder.invoke(3, "k", "write", b"b")
    h_timeout = recorder.invoke(4, "k", "delete")
    recorder.complete(h_write, "ok")
    recorder.complete(h_read, "ok", b"a")
    recorder.complete(h_timeout, "info")
    assert recorder.history() == [
        Op(1, "k", "write", b"a", 1.0, 5.0, "ok"),
        Op(2, "k", "read", b"a", 2.0, 6.0, "ok"),
        Op(3, "k", "write", b"b", 3.0, None, "info"),
        Op(4, "k", "delete", None, 4.0, None, "info"),
    ]
    assert check(recorder.history()).ok
    # A crashed op stays open: completing it later still works.
    recorder.complete(h_lost, "fail")
    assert recorder.history()[2] == Op(3, "k", "write", b"b", 3.0, 8.0, "fail")


def test_recorder_rejects_misuse() -> None:
    recorder = HistoryRecorder(clock=FakeClock(), ops_max=2)
    handle = recorder.invoke(1, "k", "read")
    with pytest.raises(HistoryError):
        recorder.invoke(1, "k", "write", None)
    with pytest.raises(HistoryError):
        recorder.complete(Handle(7), "ok")
    recorder.complete(handle, "ok", None)
    with pytest.raises(HistoryError, match="already completed"):
        recorder.complete(handle, "ok", None)
    write = recorder.invoke(1, "k", "write", b"x")
    with pytest.raises(HistoryError, match="observes no value"):
        recorder.complete(write, "ok", b"x")
    with pytest.raises(RecorderFullError):
        recorder.invoke(1, "k", "read")


def test_recorder_is_thread_safe() -> None:
    recorder = HistoryRecorder()
    register_lock = threading.Lock()
    register: list[bytes | None] = [None]

    def client(process: int) -> None:
        for i in range(200):
            if i % 2:
                handle = recorder.invoke(process, "k", "write", f"{process}:{i}".encode())
                with register_lock:
                    register[0] = f"{process}:{i}".encode()
                recorder.complete(handle, "ok")
            else:
                handle = recorder.invoke(process, "k", "read")
                with register_lock:
                    seen = register[0]
                recorder.complete(handle, "ok", seen)

    threads = [threading.Thread(target=client, args=(p,)) for p in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = recorder.history()
    assert len(history) == 1600
    assert [op.start for op in history] == sorted(op.start for op in history)
    result = check(history)
    assert result.ok, _explain(result)
