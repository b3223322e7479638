"""The write-back buffer (blockdev/wbuffer.py, DESIGN.md §2 point 1, §5) against a byte model.

The model keeps three layers of cells over a small volume: the store (bytes
committed by released freezes), the frozen cells and the live cells; a cell is
None (the buffer does not know it), a byte value, or HOLE. What a reader must
see is the store overlaid with frozen then live cells. Segments are 64 bytes so
that writes cross segments often.

Backpressure tests use threads, small limits, and no timing assertions: a
writer is "blocked" when the buffer reports it waiting, and "proceeded" when
its thread finishes within a generous timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockdev import extents
from blockdev.wbuffer import (
    HOLE_RUN_CHARGE_BYTES,
    FlushInProgress,
    Frozen,
    FrozenMismatch,
    Piece,
    WriteBuffer,
)

SEG = 64
NSEG = 6
VOL = SEG * NSEG
HOLE = -1
Cell = int | None  # None: unknown to the buffer; 0..255: a written byte; HOLE: punched


@st.composite
def ranges(draw: st.DrawFn, length_max: int = 3 * SEG) -> tuple[int, int]:
    offset = draw(st.integers(0, VOL - 1))
    return offset, draw(st.integers(0, min(length_max, VOL - offset)))


@st.composite
def writes(draw: st.DrawFn) -> tuple[int, bytes]:
    offset, length = draw(ranges())
    return offset, draw(st.binary(min_size=length, max_size=length))


def model_runs(cells: list[Cell]) -> dict[int, list[Piece]]:
    """The minimal runs of a layer per segment: maximal stretches of one kind, data joined."""
    out: dict[int, list[Piece]] = {}
    for seg in range(NSEG):
        runs: list[Piece] = []
        start: int | None = None
        start_kind: bool | None = None
        for i in range(SEG + 1):
            cell = cells[seg * SEG + i] if i < SEG else None
            kind = None if cell is None else (cell == HOLE)
            if start is not None and (i == SEG or kind != start_kind):
                chunk = cells[seg * SEG + start : seg * SEG + i]
                data = None if start_kind else bytes(c for c in chunk if c is not None)
                runs.append((start, i - start, data))
                start = None
            if start is None and kind is not None:
                start, start_kind = i, kind
        if runs:
            out[seg] = runs
    return out


def visible(frozen: list[Cell] | None, live: list[Cell]) -> list[Cell]:
    below = frozen if frozen is not None else [None] * VOL
    return [lv if lv is not None else fz for lv, fz in zip(live, below, strict=True)]


def apply_cells(store: bytearray, cells: list[Cell]) -> None:
    for i, c in enumerate(cells):
        if c is not None:
            store[i] = 0 if c == HOLE else c


def check_read(buf: WriteBuffer, store: bytes, cells: list[Cell], offset: int, length: int) -> None:
    """read_overlay lists exactly the known cells of the range, in order, with the right values,
    and laid over the store gives what the model says a reader sees."""
    pieces = buf.read_overlay(offset, length)
    out = bytearray(store[offset : offset + length])
    listed = [False] * length
    pos = 0
    for dst, plen, data in pieces:
        assert dst >= pos and plen > 0 and dst + plen <= length  # sorted, non-overlapping, in range
        pos = dst + plen
        for k in range(plen):
            cell = cells[offset + dst + k]
            assert cell is not None, "a piece covers a byte the buffer should not know"
            assert cell == (HOLE if data is None else data[k])
            listed[dst + k] = True
        out[dst : dst + plen] = bytes(plen) if data is None else data
    assert listed == [cells[offset + k] is not None for k in range(length)], "a known byte is missing"
    want = bytearray(store)
    apply_cells(want, cells)
    assert out == want[offset : offset + length]


class BufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.buf = WriteBuffer(high_water_bytes=1 << 30, segment_bytes=SEG)
        self.store = bytearray(VOL)
        self.live: list[Cell] = [None] * VOL
        self.frozen_cells: list[Cell] | None = None
        self.frozen: Frozen | None = None
        self.dropped: list[Frozen] = []  # frozen sets a drop_all forgot

    @rule(w=writes())
    def write(self, w: tuple[int, bytes]) -> None:
        offset, data = w
        self.buf.write(offset, data)
        self.live[offset : offset + len(data)] = list(data)

    @rule(w=writes())
    def write_bytearray(self, w: tuple[int, bytes]) -> None:
        # Callers may pass any byte buffer; later changes to it must not reach the buffer.
        offset, data = w
        arr = bytearray(data)
        self.buf.write(offset, arr)
        arr[:] = b"\xee" * len(arr)
        self.live[offset : offset + len(data)] = list(data)

    @rule(r=ranges())
    def zero(self, r: tuple[int, int]) -> None:
        offset, length = r
        self.buf.zero(offset, length)
        self.live[offset : offset + length] = [HOLE] * length

    @precondition(lambda self: self.frozen is None)
    @rule()
    def freeze(self) -> None:
        frozen = self.buf.freeze()
        assert frozen.segments == model_runs(self.live)  # exactly the minimal runs
        assert list(frozen.segments) == sorted(frozen.segments)
        assert frozen.bytes == sum(c is not None and c != HOLE for c in self.live)
        assert frozen.segment_bytes == SEG
        self.frozen, self.frozen_cells = frozen, self.live
        self.live = [None] * VOL

    @precondition(lambda self: self.frozen is not None)
    @rule()
    def freeze_twice_is_refused(self) -> None:
        with pytest.raises(FlushInProgress):
            self.buf.freeze()

    @precondition(lambda self: self.frozen is not None)
    @rule()
    def release(self) -> None:
        assert self.frozen is not None and self.frozen_cells is not None
        self.buf.release_frozen(self.frozen)
        apply_cells(self.store, self.frozen_cells)
        self.frozen = self.frozen_cells = None

    @precondition(lambda self: self.frozen is not None)
    @rule()
    def unfreeze(self) -> None:
        assert self.frozen is not None
        self.buf.unfreeze(self.frozen)
        self.live = visible(self.frozen_cells, self.live)  # frozen goes under; live stays on top
        self.frozen = self.frozen_cells = None

    @rule()
    def drop_all(self) -> None:
        self.buf.drop_all()
        if self.frozen is not None:
            self.dropped.append(self.frozen)
        self.live = [None] * VOL
        self.frozen = self.frozen_cells = None

    @precondition(lambda self: bool(self.dropped))
    @rule(data=st.data())
    def a_dropped_flush_ends(self, data: st.DataObject) -> None:
        # A flush that was running when the lease was lost ends: whatever it calls changes nothing.
        old = data.draw(st.sampled_from(self.dropped))
        if data.draw(st.booleans()):
            self.buf.release_frozen(old)
        else:
            self.buf.unfreeze(old)

    @rule(r=ranges())
    def read(self, r: tuple[int, int]) -> None:
        check_read(self.buf, bytes(self.store), visible(self.frozen_cells, self.live), *r)

    @invariant()
    def matches_model(self) -> None:
        self.buf.check_invariants()
        assert self.buf.live_runs() == model_runs(self.live)  # intervals stay coalesced
        live_bytes = sum(c is not None and c != HOLE for c in self.live)
        frozen_bytes = 0 if self.frozen is None else self.frozen.bytes
        assert (self.buf.live_bytes, self.buf.frozen_bytes, self.buf.dirty_bytes) == (
            live_bytes,
            frozen_bytes,
            live_bytes + frozen_bytes,
        )
        assert self.buf.frozen is self.frozen
        layers = [self.live] + ([self.frozen_cells] if self.frozen_cells is not None else [])
        want_segs = sorted({i // SEG for layer in layers for i, c in enumerate(layer) if c is not None})
        assert self.buf.dirty_segments() == want_segs
        check_read(self.buf, bytes(self.store), visible(self.frozen_cells, self.live), 0, VOL)


BufferMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBufferMachine = BufferMachine.TestCase


# ------------------------------------------------------------------ coalescing, by example

def test_sequential_writes_stay_one_run_per_segment() -> None:
    buf = WriteBuffer()
    seg = extents.SEGMENT_BYTES
    for i in range(2 * seg // 4096 + 4):  # two full segments and a bit of a third
        buf.write(i * 4096, bytes([i % 251]) * 4096)
    runs = buf.live_runs()
    assert sorted(runs) == [0, 1, 2]
    assert [len(r) for r in runs.values()] == [1, 1, 1]
    assert runs[0][0][:2] == (0, seg) and runs[2][0][:2] == (0, 4 * 4096)
    assert buf.live_bytes == 2 * seg + 4 * 4096


def test_backwards_and_overlapping_writes_coalesce() -> None:
    buf = WriteBuffer(segment_bytes=SEG)
    for i in reversed(range(8)):
        buf.write(i * 8, bytes([i]) * 8)
    buf.write(4, b"\xff" * 8)  # overwrite across a join
    want = bytes([0] * 4 + [255] * 8 + [1] * 4) + b"".join(bytes([i]) * 8 for i in range(2, 8))
    assert buf.live_runs() == {0: [(0, 64, want)]}
    buf.zero(8, 8)
    buf.zero(16, 8)
    assert [(o, n, d is None) for o, n, d in buf.live_runs()[0]] == [(0, 8, False), (8, 16, True), (24, 40, False)]
    buf.write(8, b"\x01" * 16)  # filling the hole joins all three
    assert len(buf.live_runs()[0]) == 1


def test_unfreeze_keeps_newer_writes_on_top() -> None:
    buf = WriteBuffer(segment_bytes=SEG)
    buf.write(0, b"a" * 100)
    frozen = buf.freeze()
    buf.write(10, b"b" * 10)
    buf.zero(90, 20)
    buf.unfreeze(frozen)
    assert buf.frozen is None
    got = bytearray(120)
    for dst, n, data in buf.read_overlay(0, 120):
        got[dst : dst + n] = bytes(n) if data is None else data
    assert got == b"a" * 10 + b"b" * 10 + b"a" * 70 + bytes(30)
    assert buf.live_bytes == 90


def test_release_of_a_foreign_frozen_set_is_a_bug() -> None:
    one, other = WriteBuffer(segment_bytes=SEG), WriteBuffer(segment_bytes=SEG)
    other.write(0, b"x")
    foreign = other.freeze()
    with pytest.raises(FrozenMismatch):
        one.release_frozen(foreign)
    with pytest.raises(FrozenMismatch):
        one.unfreeze(foreign)


def test_bad_arguments() -> None:
    buf = WriteBuffer(segment_bytes=SEG)
    with pytest.raises(ValueError):
        buf.write(-1, b"x")
    with pytest.raises(ValueError):
        buf.zero(0, -1)
    with pytest.raises(ValueError):
        WriteBuffer(high_water_bytes=0)
    with pytest.raises(ValueError):
        WriteBuffer(segment_bytes=extents.SEGMENT_BYTES + 1)
    with pytest.raises(ValueError):
        WriteBuffer(max_segments=0)
    with pytest.raises(ValueError):
        WriteBuffer(max_segments=4, flush_start_segments=5)
    buf.write(0, b"")
    buf.zero(0, 0)
    assert buf.dirty_segments() == [] and buf.read_overlay(0, 0) == []


# ------------------------------------------------------------------ backpressure

WAIT_S = 10.0  # generous: only a hang takes this long


def wait_until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


def start(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)  # daemon: a hang fails the test, not the run
    t.start()
    return t


def finished(t: threading.Thread) -> bool:
    t.join(WAIT_S)
    return not t.is_alive()


def test_writer_blocks_past_high_water_and_proceeds_after_release() -> None:
    buf = WriteBuffer(high_water_bytes=100, segment_bytes=SEG)
    buf.write(0, b"a" * 80)
    frozen = buf.freeze()
    assert not buf.flush_wanted
    writer = start(lambda: buf.write(200, b"b" * 40))
    wait_until(lambda: buf.waiting_writers == 1)
    assert writer.is_alive() and buf.flush_wanted
    assert buf.read_overlay(200, 40) == []  # the blocked write is not visible yet
    buf.release_frozen(frozen)
    assert finished(writer)
    assert buf.waiting_writers == 0
    assert buf.read_overlay(200, 40) == [(0, 40, b"b" * 40)]


def test_unfreeze_does_not_release_memory() -> None:
    buf = WriteBuffer(high_water_bytes=100, segment_bytes=SEG)
    buf.write(0, b"a" * 80)
    frozen = buf.freeze()
    writer = start(lambda: buf.write(200, b"b" * 40))
    wait_until(lambda: buf.waiting_writers == 1)
    buf.unfreeze(frozen)  # the flush failed: the 80 bytes are still owed
    assert writer.is_alive() and buf.waiting_writers == 1
    buf.release_frozen(buf.freeze())  # the retry succeeded
    assert finished(writer)
    assert buf.live_bytes == 40


def test_oversized_write_into_empty_buffer_proceeds() -> None:
    buf = WriteBuffer(high_water_bytes=16, segment_bytes=SEG)
    writer = start(lambda: buf.write(0, b"x" * 1000))
    assert finished(writer)
    assert buf.live_bytes == 1000
    # Oversized writes wait for an empty buffer, then proceed.
    writer = start(lambda: buf.write(2000, b"y" * 500))
    wait_until(lambda: buf.waiting_writers == 1)
    buf.release_frozen(buf.freeze())
    assert finished(writer)
    assert buf.live_bytes == 500


def test_drop_all_wakes_writers() -> None:
    buf = WriteBuffer(high_water_bytes=50, segment_bytes=SEG)
    buf.write(0, b"a" * 50)
    writers = [start(lambda i=i: buf.write(100 + 10 * i, b"b" * 10)) for i in range(3)]  # type: ignore[misc]
    wait_until(lambda: buf.waiting_writers == 3)
    buf.drop_all()
    assert all(finished(w) for w in writers)
    assert buf.live_bytes == 30


def test_waiting_writers_go_in_arrival_order() -> None:
    # A large write that needs an empty buffer is not overtaken by a small one that would fit.
    buf = WriteBuffer(high_water_bytes=100, segment_bytes=SEG)
    buf.write(0, b"a" * 90)
    frozen = buf.freeze()
    big = start(lambda: buf.write(1000, b"B" * 100))
    wait_until(lambda: buf.waiting_writers == 1)
    small = start(lambda: buf.write(2000, b"s" * 5))
    wait_until(lambda: buf.waiting_writers == 2)
    buf.release_frozen(frozen)
    assert finished(big)
    wait_until(lambda: buf.waiting_writers == 1)  # 100 + 5 > 100: the small one waits behind it
    assert small.is_alive()
    buf.release_frozen(buf.freeze())
    assert finished(small)
    assert buf.read_overlay(2000, 5) == [(0, 5, b"sssss")]


def test_holes_are_charged_against_high_water() -> None:
    buf = WriteBuffer(high_water_bytes=3 * HOLE_RUN_CHARGE_BYTES, segment_bytes=SEG)
    buf.zero(0, 3 * SEG)  # one hole run in each of three segments: the buffer is full
    assert buf.dirty_bytes == 0 and buf.dirty_segments() == [0, 1, 2]
    writer = start(lambda: buf.zero(10 * SEG, 1))
    wait_until(lambda: buf.waiting_writers == 1)
    buf.release_frozen(buf.freeze())
    assert finished(writer)


def test_flusher_is_told_when_a_flush_is_wanted() -> None:
    buf = WriteBuffer(high_water_bytes=100, segment_bytes=SEG, flush_start_bytes=50)
    assert not buf.wait_flush_wanted(0.01)
    buf.write(0, b"a" * 49)
    assert not buf.flush_wanted
    seen: list[bool] = []
    flusher = start(lambda: seen.append(buf.wait_flush_wanted(WAIT_S)))
    buf.write(49, b"a")  # reaches flush_start_bytes
    assert finished(flusher) and seen == [True]


# ------------------------------------------------------------------ the dirty-segment bound


def test_writer_blocks_past_max_segments_counting_frozen_ones() -> None:
    buf = WriteBuffer(segment_bytes=SEG, max_segments=3)
    buf.write(0, b"a" * (3 * SEG))  # segments 0, 1, 2
    buf.write(SEG + 5, b"b")  # an already dirty segment: no new one
    writer = start(lambda: buf.write(3 * SEG, b"c"))  # a fourth segment must wait
    wait_until(lambda: buf.waiting_writers == 1)
    assert buf.flush_wanted
    frozen = buf.freeze()  # still three dirty (frozen) segments: live and frozen count together
    assert writer.is_alive() and buf.waiting_writers == 1
    buf.release_frozen(frozen)
    assert finished(writer)
    assert buf.dirty_segments() == [3]


def test_failed_flush_keeps_the_segment_bound() -> None:
    buf = WriteBuffer(segment_bytes=SEG, max_segments=3)
    buf.write(0, b"a" * (2 * SEG))
    frozen = buf.freeze()
    buf.write(0, b"z")  # frozen segment 0 written again: still two dirty segments
    buf.write(2 * SEG, b"c")  # a third
    writer = start(lambda: buf.write(5 * SEG, b"d"))
    wait_until(lambda: buf.waiting_writers == 1)
    buf.unfreeze(frozen)  # the flush failed: everything is live again, three segments
    assert writer.is_alive() and buf.dirty_segments() == [0, 1, 2]
    again = buf.freeze()
    assert len(again.segments) == 3
    buf.release_frozen(again)
    assert finished(writer)
    assert buf.read_overlay(5 * SEG, 1) == [(0, 1, b"d")]


def test_a_write_across_more_segments_than_the_bound_goes_in_pieces() -> None:
    # Every frozen set a flusher takes stays within the bound, and the whole write arrives.
    buf = WriteBuffer(segment_bytes=SEG, max_segments=2)
    data = bytes(range(256)) * 2  # 512 bytes: 8 segments
    seen: list[int] = []
    done = threading.Event()
    store = bytearray(len(data))

    def flusher() -> None:
        while not done.is_set() or buf.dirty_segments():
            if not buf.wait_flush_wanted(0.01) and not (done.is_set() and buf.dirty_segments()):
                continue
            frozen = buf.freeze()
            seen.append(len(frozen.segments))
            for seg, pieces in frozen.segments.items():
                for off, length, piece in pieces:
                    assert piece is not None
                    store[seg * SEG + off:seg * SEG + off + length] = piece
            buf.release_frozen(frozen)

    f = start(flusher)
    writer = start(lambda: buf.write(0, data))
    assert finished(writer)
    done.set()
    assert finished(f)
    assert bytes(store) == data
    assert seen and max(seen) <= 2 and sum(seen) >= 4


def test_a_large_unmap_goes_in_pieces_too() -> None:
    buf = WriteBuffer(segment_bytes=SEG, max_segments=2)
    zeroer = start(lambda: buf.zero(0, 5 * SEG))
    wait_until(lambda: buf.waiting_writers == 1)
    assert buf.dirty_segments() == [0, 1]
    for expect in ([0, 1], [2, 3], [4]):
        wait_until(lambda: buf.dirty_segments() == expect)  # noqa: B023 - evaluated at once
        buf.release_frozen(buf.freeze())
    assert finished(zeroer)
    assert buf.dirty_segments() == []


def test_flush_is_wanted_at_flush_start_segments() -> None:
    buf = WriteBuffer(segment_bytes=SEG, max_segments=8, flush_start_segments=3)
    buf.write(0, b"a" * (2 * SEG))
    assert not buf.flush_wanted
    buf.write(2 * SEG, b"b")
    assert buf.flush_wanted
