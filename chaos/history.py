"""Record what clients did, for the linearizability checker.

Each client thread calls `invoke` just before it sends a request and
`complete` once it knows the outcome. The recorded interval must contain the
instant the store applied the request, so `invoke` reads the clock before the
request leaves and `complete` after the answer arrived; both read it under the
recorder's lock, so an injected fake clock needs no locking of its own and
recorded starts follow invocation order.

A request that never completes (its client crashed or hung) becomes an
indeterminate op, outcome "info" with no end, when `history` is called: it may
have taken effect at any time after it started, or never.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from chaos.linearizability import HistoryError, Kind, Op, Outcome

# A chaos run of a few minutes at a few thousand requests per second records a
# few hundred thousand ops; past this the checker would take too long anyway.
RECORDED_OPS_MAX = 2_000_000


class RecorderFullError(RuntimeError):
    """The recorder already holds its maximum number of ops; the request was not recorded."""


@dataclass(frozen=True, slots=True)
class Handle:
    """Names one invoked op; pass it back to `HistoryRecorder.complete`."""

    index: int


@dataclass(slots=True)
class _Pending:
    process: int
    key: str
    kind: Kind
    value: bytes | None
    start: float
    end: float | None = None
    outcome: Outcome | None = None


class HistoryRecorder:
    """A thread-safe log of invocations and completions that yields `Op`s."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, ops_max: int = RECORDED_OPS_MAX) -> None:
        if not ops_max >= 1:
            raise ValueError(f"ops_max must be at least 1, got {ops_max}")
        self._clock = clock
        self._ops_max = ops_max
        self._lock = threading.Lock()
        self._records: list[_Pending] = []

    def invoke(self, process: int, key: str, kind: Kind, value: bytes | None = None) -> Handle:
        """Record that `process` is about to send a request; call it before sending.

        `value` is the bytes a write will write; reads and deletes pass None.
        """
        if kind == "write":
            if not isinstance(value, bytes):
                raise HistoryError("a write must be invoked with the bytes it writes")
        elif kind in ("read", "delete"):
            if value is not None:
                raise HistoryError(f"a {kind} is invoked without a value")
        else:
            raise HistoryError(f"unknown op kind {kind!r}")
        with self._lock:
            if not len(self._records) < self._ops_max:
                raise RecorderFullError(f"history already holds {self._ops_max} ops")
            self._records.append(_Pending(process, key, kind, value, self._clock()))
            return Handle(len(self._records) - 1)

    def complete(self, handle: Handle, outcome: Outcome, observed_value: bytes | None = None) -> None:
        """Record how the request ended; call it after the answer (or the timeout) arrived.

        outcome "ok": it took effect, and a read observed `observed_value` (None
        means absent). "fail": it definitely did not take effect. "info": the
        client cannot tell (a timeout), so it may take effect at any later time.
        """
        if outcome not in ("ok", "fail", "info"):
            raise HistoryError(f"unknown outcome {outcome!r}")
        if not (observed_value is None or isinstance(observed_value, bytes)):
            raise HistoryError(f"an observed value is bytes or None, got {type(observed_value).__name__}")
        with self._lock:
            if not 0 <= handle.index < len(self._records):
                raise HistoryError(f"handle {handle.index} was not issued by this recorder")
            record = self._records[handle.index]
            if record.outcome is not None:
                raise HistoryError(f"op {handle.index} was already completed with {record.outcome!r}")
            if record.kind != "read" and observed_value is not None:
                raise HistoryError(f"a {record.kind} observes no value")
            now = self._clock()
            if not now >= record.start:
                raise HistoryError(f"clock went backwards: op {handle.index} started at {record.start}, ended {now}")
            record.outcome = outcome
            # An indeterminate op has no meaningful end: it may still take effect later.
            record.end = None if outcome == "info" else now
            if record.kind == "read" and outcome == "ok":
                record.value = observed_value

    def history(self) -> list[Op]:
        """Every op so far, in invocation order; ops not yet completed become indeterminate."""
        with self._lock:
            return [
                Op(
                    process=r.process,
                    key=r.key,
                    kind=r.kind,
                    value=r.value,
                    start=r.start,
                    end=r.end,
                    outcome=r.outcome if r.outcome is not None else "info",
                )
                for r in self._records
            ]
