"""The write-back buffer of one volume: written-but-not-flushed bytes (DESIGN.md §2 point 1, §5).

Theory of operation. A WRITE lands here and completes; the bytes are volatile,
like a disk's cache with WCE=1, until a flush makes them durable. The buffer
keeps, per segment, a sorted list of runs. A run is either data (bytes written)
or a hole (a range UNMAP or WRITE SAME with UNMAP punched, which reads as zeros
and which the flush must punch in the segment record); holes hold no bytes in
memory. Newer writes replace older bytes, so a byte is in at most one run.

Invariants of the runs of one segment, checked around every edit and in full by
`check_invariants`: sorted by start, non-overlapping, inside [0, segment_bytes),
non-empty, a data run holds exactly end - start bytes, and two runs that touch
are of different kinds (touching runs of the same kind are always merged, so
sequential writes stay one run and the run count measures real fragmentation).

Flushing. `freeze` moves every live run into a `Frozen` set (immutable bytes)
and leaves an empty live buffer, so writes go on while the flush builds blobs
and commits. Reads see both: the frozen set first, then the live buffer over
it. There is at most one frozen set (flushes of a volume are ordered). The
flush ends in exactly one of three ways: it committed (`release_frozen` drops
the set), it failed (`unfreeze` merges the set back *under* the live runs, so
bytes written since the freeze stay newer and nothing is lost), or the owner
lost its lease (`drop_all` forgets live and frozen; a flush still running with
that frozen set may then release or unfreeze it, which does nothing, so lost
data can never come back).

Backpressure (DESIGN.md §5: writers are slowed, never failed). Memory is
charged as data bytes plus HOLE_RUN_CHARGE_BYTES per hole run, live plus
frozen. A write (or zero) that would take the charge past high_water_bytes
waits on a condition until a flush releases memory; writers that had to wait
proceed in arrival order, so a large write is not starved by small ones. A
write larger than high_water_bytes proceeds once the buffer is empty, so
progress is always possible.

Dirty segments are bounded too, because one flush commits every changed
segment record in ONE Raft command (DESIGN.md §5) and a Raft entry is small
(kv/limits.py). At most max_segments segments are dirty at any time, counting
live and frozen together (a segment in both counts once): a write that would
dirty more waits like one over the byte mark. Counting the union keeps the
bound across a failed flush too (unfreeze merges frozen back into live). A
write spanning more segments than max_segments is admitted max_segments
segments at a time, each piece waiting its turn; every piece is whole blocks,
since segments are.

The buffer never starts a flush itself: the volume's flusher watches
`flush_wanted` (or blocks in `wait_flush_wanted`), which turns true when a
writer is waiting, the live charge reaches flush_start_bytes, or the live
buffer holds flush_start_segments segments.

Threads: every method takes one lock (a Condition over a Lock); nothing here
does I/O or calls out while holding it. Returned bytes are copies.
"""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from blockdev.extents import SEGMENT_BYTES

# DESIGN.md §5: the buffer is bounded. 64 MiB is a few seconds of writes at the
# rates a loopback cluster commits and keeps a flush's blob puts well inside an
# initiator's default 30 s command timeout.
HIGH_WATER_BYTES_DEFAULT = 64 << 20

# What a hole run is charged against the high-water mark: about the Python
# objects it costs (a run object and its list slots). Without a charge an UNMAP
# storm over a large volume would grow the buffer without any bound.
HOLE_RUN_CHARGE_BYTES = 64

# Dirty segments (live and frozen together) at most: one flush's records must
# fit one KV batch of at most kv/limits.py BATCH_OPS_MAX (256) operations, of
# which a flush needs six for its fence and bookkeeping.
MAX_SEGMENTS_DEFAULT = 240

# (offset, length, data bytes or None for a hole). In a Frozen set offsets are
# within the segment; from read_overlay they are relative to the read's start.
Piece = tuple[int, int, bytes | bytearray | None]

_Data = bytes | bytearray | memoryview


class WriteBufferError(RuntimeError):
    """Base of the buffer's errors."""


class FlushInProgress(WriteBufferError):
    """freeze was called while a frozen set exists: the caller must release or unfreeze it first."""


class FrozenMismatch(WriteBufferError):
    """release_frozen or unfreeze got a frozen set that is not this buffer's current one (a caller bug)."""


class BufferInvariantError(WriteBufferError):
    """The buffer's runs broke an invariant: a bug here; stop rather than serve wrong data."""


@dataclass(frozen=True, slots=True, eq=False)
class Frozen:
    """The dirty set of one flush: what the live buffer held at `freeze`.

    segments maps segment index -> runs (offset_in_segment, length, data or None
    for a hole), with the same invariants as live runs (sorted, non-overlapping,
    in bounds, touching runs of different kinds). bytes is the data bytes held,
    hole_runs the number of hole runs. generation identifies the buffer's life
    between drop_alls, so a frozen set from before a drop_all is recognised.
    Treat it as read-only: the buffer reads it until it is released.
    """

    segments: dict[int, list[Piece]]
    bytes: int
    hole_runs: int
    segment_bytes: int
    generation: int

    def __post_init__(self) -> None:
        # Checked once more on the way out: these runs become segment records.
        data_bytes = 0
        hole_runs = 0
        for seg, runs in self.segments.items():
            if type(seg) is not int or seg < 0 or not runs:
                raise BufferInvariantError(f"frozen segment {seg!r} is not a non-negative index with runs")
            prev: Piece | None = None
            for off, length, data in runs:
                if not (0 <= off and 0 < length and off + length <= self.segment_bytes):
                    raise BufferInvariantError(f"frozen run at {off} of length {length} is outside segment {seg}")
                if data is None:
                    hole_runs += 1
                elif len(data) != length:
                    raise BufferInvariantError(f"frozen run at {off} holds {len(data)} bytes, not {length}")
                else:
                    data_bytes += length
                if prev is not None:
                    p_end = prev[0] + prev[1]
                    if p_end > off or (p_end == off and (prev[2] is None) == (data is None)):
                        raise BufferInvariantError(f"frozen runs at {prev[0]} and {off} overlap or are not merged")
                prev = (off, length, data)
        if data_bytes != self.bytes or hole_runs != self.hole_runs:
            raise BufferInvariantError(
                f"frozen set holds {data_bytes} bytes and {hole_runs} holes, not {self.bytes} and {self.hole_runs}"
            )

    @property
    def charge_bytes(self) -> int:
        """What the set counts against the high-water mark."""
        return self.bytes + HOLE_RUN_CHARGE_BYTES * self.hole_runs


class _Run:
    """[start, end) of a segment: data (exactly end - start bytes, owned by this run) or a hole (None)."""

    __slots__ = ("start", "end", "data")

    def __init__(self, start: int, end: int, data: bytearray | None) -> None:
        self.start = start
        self.end = end
        self.data = data


class _Segment:
    """The live runs of one segment, with `starts` kept parallel to `runs` for bisection."""

    __slots__ = ("starts", "runs", "data_bytes", "hole_runs")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.runs: list[_Run] = []
        self.data_bytes = 0
        self.hole_runs = 0

    @classmethod
    def from_pieces(cls, pieces: list[Piece]) -> _Segment:
        seg = cls()
        for off, length, data in pieces:
            seg.starts.append(off)
            seg.runs.append(_Run(off, off + length, None if data is None else bytearray(data)))
            if data is None:
                seg.hole_runs += 1
            else:
                seg.data_bytes += length
        return seg

    def put(self, s: int, e: int, data: _Data | None) -> None:
        """Make [s, e) hold `data` (e - s bytes) or a hole, replacing what was there and
        merging with every run of the same kind that it overlaps or touches."""
        starts, runs = self.starts, self.runs
        i = bisect.bisect_left(starts, s)
        if i > 0 and runs[i - 1].end >= s:
            i -= 1
        j = bisect.bisect_right(starts, e)
        # runs[i:j] are exactly the runs that overlap or touch [s, e).
        affected = runs[i:j]
        removed_bytes = sum(len(r.data) for r in affected if r.data is not None)
        removed_holes = sum(1 for r in affected if r.data is None)
        is_hole = data is None
        new_start, new_end = s, e
        left_same: _Run | None = None
        right_same: _Run | None = None
        keep_left: _Run | None = None
        keep_right: _Run | None = None
        if affected:
            first, last = affected[0], affected[-1]
            # Only the first run can start before s and only the last can end after e.
            if (last.data is None) == is_hole:
                if last.end > e:
                    right_same, new_end = last, last.end
            elif last.end > e:
                if last.start >= e:
                    keep_right = last
                else:
                    tail = None if last.data is None else bytearray(memoryview(last.data)[e - last.start :])
                    keep_right = _Run(e, last.end, tail)
            if (first.data is None) == is_hole:
                if first.start <= s:
                    left_same, new_start = first, first.start
            elif first.start < s:
                # keep_right was cut from `first` already if it is also `last`, so truncating in place is safe.
                if first.end > s and first.data is not None:
                    del first.data[s - first.start :]
                first.end = min(first.end, s)
                keep_left = first
        if data is None:
            new = _Run(new_start, new_end, None)
        else:
            if left_same is not None and left_same.data is not None:
                buf, base = left_same.data, left_same.start
                if right_same is left_same:
                    buf[s - base : e - base] = data  # a write inside one run: same length, in place
                else:
                    del buf[s - base :]
                    buf += data  # the sequential-write case: amortised append
            else:
                buf = bytearray(data)
            if right_same is not None and right_same is not left_same and right_same.data is not None:
                buf += memoryview(right_same.data)[e - right_same.start :]
            new = _Run(new_start, new_end, buf)
        repl = [r for r in (keep_left, new, keep_right) if r is not None]
        runs[i:j] = repl
        starts[i:j] = [r.start for r in repl]
        self.data_bytes += sum(len(r.data) for r in repl if r.data is not None) - removed_bytes
        self.hole_runs += sum(1 for r in repl if r.data is None) - removed_holes
        self._check_window(max(0, i - 1), min(len(runs), i + len(repl) + 1))

    def _check_window(self, lo: int, hi: int) -> None:
        """Check the run invariants over runs[lo:hi] and their joins."""
        runs = self.runs
        for k in range(lo, hi):
            r = runs[k]
            if not r.start < r.end or self.starts[k] != r.start:
                raise BufferInvariantError(f"run {k} [{r.start}, {r.end}) is empty or misindexed")
            if r.data is not None and len(r.data) != r.end - r.start:
                raise BufferInvariantError(f"run {k} [{r.start}, {r.end}) holds {len(r.data)} bytes")
            if k > lo:
                p = runs[k - 1]
                if p.end > r.start or (p.end == r.start and (p.data is None) == (r.data is None)):
                    raise BufferInvariantError(f"runs [{p.start}, {p.end}) and [{r.start}, {r.end}) overlap or touch")

    def check(self, segment_bytes: int) -> None:
        self._check_window(0, len(self.runs))
        if len(self.starts) != len(self.runs) or not self.runs:
            raise BufferInvariantError("segment index is out of step with its runs, or empty")
        if self.runs[0].start < 0 or self.runs[-1].end > segment_bytes:
            raise BufferInvariantError("runs lie outside the segment")
        if self.data_bytes != sum(len(r.data) for r in self.runs if r.data is not None):
            raise BufferInvariantError("segment byte count is wrong")
        if self.hole_runs != sum(1 for r in self.runs if r.data is None):
            raise BufferInvariantError("segment hole count is wrong")

    def clip(self, s: int, e: int) -> Iterator[tuple[int, int, int, bytes | bytearray | None]]:
        """(start, end, run start, run data) for each run's part inside [s, e), in order."""
        i = max(0, bisect.bisect_right(self.starts, s) - 1)
        runs = self.runs
        while i < len(runs) and runs[i].start < e:
            r = runs[i]
            if r.end > s:
                yield max(s, r.start), min(e, r.end), r.start, r.data
            i += 1

    def pieces(self, *, copy: bool = True) -> list[Piece]:
        """The runs as (start, length, data). copy=False hands over the run
        buffers themselves: only for a segment that is dropped right after
        (freeze), so nothing can change them later."""
        if not copy:
            return [(r.start, r.end - r.start, r.data) for r in self.runs]
        return [(r.start, r.end - r.start, None if r.data is None else bytes(r.data)) for r in self.runs]


# (start, end, source run start, source data) while composing read_overlay.
_Span = tuple[int, int, int, bytes | bytearray | None]


def _clip_frozen(runs: list[Piece], s: int, e: int) -> list[_Span]:
    i = max(0, bisect.bisect_right(runs, s, key=lambda p: p[0]) - 1)
    out: list[_Span] = []
    while i < len(runs) and runs[i][0] < e:
        off, length, data = runs[i]
        if off + length > s:
            out.append((max(s, off), min(e, off + length), off, data))
        i += 1
    return out


def _minus(spans: list[_Span], cover: list[_Span]) -> list[_Span]:
    """The parts of `spans` not covered by `cover` (both sorted and non-overlapping)."""
    out: list[_Span] = []
    k = 0
    for a, b, src_start, src in spans:
        pos = a
        while k < len(cover) and cover[k][1] <= pos:
            k += 1
        kk = k
        while pos < b:
            if kk < len(cover) and cover[kk][0] < b:
                ca, cb = cover[kk][0], cover[kk][1]
                if ca > pos:
                    out.append((pos, ca, src_start, src))
                pos = max(pos, cb)
                kk += 1
            else:
                out.append((pos, b, src_start, src))
                break
    return out


class WriteBuffer:
    """Written-but-not-flushed bytes of one volume (module docstring: runs, freezing, backpressure)."""

    def __init__(
        self,
        *,
        high_water_bytes: int = HIGH_WATER_BYTES_DEFAULT,
        segment_bytes: int = SEGMENT_BYTES,
        flush_start_bytes: int | None = None,
        max_segments: int = MAX_SEGMENTS_DEFAULT,
        flush_start_segments: int | None = None,
    ) -> None:
        if high_water_bytes <= 0:
            raise ValueError(f"high_water_bytes {high_water_bytes} must be positive")
        if not 0 < segment_bytes <= SEGMENT_BYTES:
            raise ValueError(f"segment_bytes {segment_bytes} is not in (0, {SEGMENT_BYTES}]")
        if flush_start_bytes is None:
            flush_start_bytes = high_water_bytes // 2  # start flushing well before writers must wait
        if not 0 < flush_start_bytes <= high_water_bytes:
            raise ValueError(f"flush_start_bytes {flush_start_bytes} is not in (0, high_water_bytes]")
        if max_segments <= 0:
            raise ValueError(f"max_segments {max_segments} must be positive")
        if flush_start_segments is None:
            flush_start_segments = max(1, max_segments // 2)
        if not 0 < flush_start_segments <= max_segments:
            raise ValueError(f"flush_start_segments {flush_start_segments} is not in (0, max_segments]")
        self.high_water_bytes = high_water_bytes
        self.segment_bytes = segment_bytes
        self.flush_start_bytes = flush_start_bytes
        self.max_segments = max_segments
        self.flush_start_segments = flush_start_segments
        self._cond = threading.Condition(threading.Lock())
        self._live: dict[int, _Segment] = {}
        self._live_bytes = 0  # sum of data_bytes over _live
        self._live_holes = 0  # sum of hole_runs over _live
        self._frozen: Frozen | None = None
        self._frozen_only = 0  # frozen segments with no live runs (the segment bound counts them)
        self._generation = 0  # bumped by drop_all
        self._waiters: collections.deque[int] = collections.deque()  # tickets of waiting writers, oldest first
        self._next_ticket = 0

    # ------------------------------------------------------------ accounting

    @property
    def live_bytes(self) -> int:
        """Data bytes written since the last freeze."""
        with self._cond:
            return self._live_bytes

    @property
    def frozen_bytes(self) -> int:
        """Data bytes of the frozen set (0 when there is none)."""
        with self._cond:
            return 0 if self._frozen is None else self._frozen.bytes

    @property
    def dirty_bytes(self) -> int:
        """Data bytes not yet durable: live plus frozen."""
        with self._cond:
            return self._live_bytes + (0 if self._frozen is None else self._frozen.bytes)

    @property
    def frozen(self) -> Frozen | None:
        """The frozen set of the flush in progress, if any."""
        with self._cond:
            return self._frozen

    @property
    def waiting_writers(self) -> int:
        """Writers blocked by backpressure right now."""
        with self._cond:
            return len(self._waiters)

    @property
    def flush_wanted(self) -> bool:
        """True when a writer waits for memory or the live charge reached flush_start_bytes."""
        with self._cond:
            return self._flush_wanted()

    def dirty_segments(self) -> list[int]:
        """Sorted indexes of segments with live or frozen runs (data or holes)."""
        with self._cond:
            segs = set(self._live)
            if self._frozen is not None:
                segs.update(self._frozen.segments)
            return sorted(segs)

    def wait_flush_wanted(self, timeout_s: float | None) -> bool:
        """For the flusher: block until flush_wanted or timeout; returns flush_wanted."""
        with self._cond:
            return self._cond.wait_for(self._flush_wanted, timeout_s)

    def _live_charge(self) -> int:
        return self._live_bytes + HOLE_RUN_CHARGE_BYTES * self._live_holes

    def _charge(self) -> int:
        return self._live_charge() + (0 if self._frozen is None else self._frozen.charge_bytes)

    def _flush_wanted(self) -> bool:
        return (bool(self._waiters) or self._live_charge() >= self.flush_start_bytes
                or len(self._live) >= self.flush_start_segments)

    def _dirty_segment_count(self) -> int:
        """Live and frozen segments, each once: O(1), since every write asks."""
        return len(self._live) + self._frozen_only

    def _new_segments(self, segs: list[int]) -> int:
        """How many of `segs` are not dirty yet (live or frozen)."""
        frozen = {} if self._frozen is None else self._frozen.segments
        return sum(1 for seg in segs if seg not in self._live and seg not in frozen)

    # ------------------------------------------------------------ writes

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(segment, offset in segment, length) pieces of a volume range, in order."""
        pos, end = offset, offset + length
        while pos < end:
            seg, s_off = divmod(pos, self.segment_bytes)
            n = min(self.segment_bytes - s_off, end - pos)
            yield seg, s_off, n
            pos += n

    def _fits(self, need: int, segs: list[int]) -> bool:
        """`need` more bytes of charge and the segments `segs` fit under both marks. An empty buffer
        (charge 0, so no dirty segment) admits anything: write and zero admit pieces of at most
        max_segments segments, so progress is always possible and the segment bound always holds."""
        return (
            (self._charge() == 0 or self._charge() + need <= self.high_water_bytes)
            and self._dirty_segment_count() + self._new_segments(segs) <= self.max_segments
        )

    def _admit(self, need: int, segs: list[int]) -> None:
        """Wait (lock held) until `need` more bytes of charge and the segments `segs` fit (_fits);
        writers that had to wait go in arrival order."""
        if not self._waiters and self._fits(need, segs):
            return
        ticket = self._next_ticket
        self._next_ticket += 1
        self._waiters.append(ticket)
        self._cond.notify_all()  # flush_wanted just turned true
        try:
            while not (self._waiters[0] == ticket and self._fits(need, segs)):
                self._cond.wait()
        finally:
            self._waiters.remove(ticket)
            self._cond.notify_all()  # the next writer in line may fit now

    def _put(self, offset: int, length: int, data: memoryview | None) -> None:
        pos = 0
        for seg, s_off, n in self._spans(offset, length):
            segment = self._live.get(seg)
            if segment is None:
                segment = self._live[seg] = _Segment()
                if self._frozen is not None and seg in self._frozen.segments:
                    self._frozen_only -= 1
            before_bytes, before_holes = segment.data_bytes, segment.hole_runs
            segment.put(s_off, s_off + n, None if data is None else data[pos : pos + n])
            self._live_bytes += segment.data_bytes - before_bytes
            self._live_holes += segment.hole_runs - before_holes
            pos += n
        if self._live_charge() >= self.flush_start_bytes or len(self._live) >= self.flush_start_segments:
            self._cond.notify_all()  # wake the flusher

    @staticmethod
    def _check_range(offset: int, length: int) -> None:
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise ValueError(f"range at {offset!r} of length {length!r} is not a non-negative range")

    def write(self, offset: int, data: _Data) -> None:
        """Buffer `data` at volume byte `offset` (may cross segments); newer bytes replace older ones.
        Blocks while the buffer is over its high-water mark (module docstring); never fails for that."""
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        self._check_range(offset, view.nbytes)
        for start, length, segs in self._pieces(offset, view.nbytes):
            piece = view[start - offset : start - offset + length]
            with self._cond:
                self._admit(length, segs)
                self._put(start, length, piece)

    def zero(self, offset: int, length: int) -> None:
        """Record a hole-punch of [offset, offset + length): it reads as zeros and the flush punches it.
        Holes hold no bytes; each segment touched may add one hole run to the charge."""
        self._check_range(offset, length)
        for start, n, segs in self._pieces(offset, length):
            with self._cond:
                self._admit(HOLE_RUN_CHARGE_BYTES * len(segs), segs)
                self._put(start, n, None)

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, list[int]]]:
        """(offset, length, segments) pieces of a range of at most max_segments segments each."""
        pos, end = offset, offset + length
        while pos < end:
            first = pos // self.segment_bytes
            stop = min(end, (first + self.max_segments) * self.segment_bytes)
            yield pos, stop - pos, list(range(first, (stop - 1) // self.segment_bytes + 1))
            pos = stop

    # ------------------------------------------------------------ reads

    def read_overlay(self, offset: int, length: int) -> list[Piece]:
        """What the buffer knows of [offset, offset + length): sorted, non-overlapping pieces
        (dst_offset relative to `offset`, length, bytes or None for a punched hole). The frozen
        set shows where the live buffer has nothing; live runs win. Gaps are not listed (the
        caller reads them from the store)."""
        self._check_range(offset, length)
        out: list[Piece] = []
        with self._cond:
            for seg, s_off, n in self._spans(offset, length):
                s, e = s_off, s_off + n
                live = self._live.get(seg)
                live_spans: list[_Span] = [] if live is None else list(live.clip(s, e))
                frozen_runs = None if self._frozen is None else self._frozen.segments.get(seg)
                spans = live_spans
                if frozen_runs:
                    shown = _minus(_clip_frozen(frozen_runs, s, e), live_spans)
                    spans = sorted(shown + live_spans, key=lambda sp: sp[0])
                dst_base = seg * self.segment_bytes - offset
                for a, b, src_start, src in spans:
                    piece = None if src is None else bytes(memoryview(src)[a - src_start : b - src_start])
                    out.append((dst_base + a, b - a, piece))
        return out

    # ------------------------------------------------------------ flush protocol

    def freeze(self) -> Frozen:
        """Move everything live into a new frozen set and return it (reads still see it).
        Raises FlushInProgress if a frozen set exists: one flush at a time."""
        with self._cond:
            if self._frozen is not None:
                raise FlushInProgress("a frozen set exists; release or unfreeze it before freezing again")
            frozen = Frozen(
                # The live segments are dropped just below, so their buffers are handed
                # over, not copied (a copy of every dirty MiB at each flush).
                segments={seg: self._live[seg].pieces(copy=False) for seg in sorted(self._live)},
                bytes=self._live_bytes,
                hole_runs=self._live_holes,
                segment_bytes=self.segment_bytes,
                generation=self._generation,
            )
            self._frozen = frozen
            self._frozen_only = len(frozen.segments)
            self._live = {}
            self._live_bytes = 0
            self._live_holes = 0
            return frozen

    def _take(self, frozen: Frozen, what: str) -> bool:
        """True if `frozen` is the current set; False if a drop_all forgot it; else FrozenMismatch."""
        if frozen is self._frozen:
            return True
        if frozen.generation < self._generation:
            return False  # the owner lost its lease meanwhile: the set is gone and must stay gone
        raise FrozenMismatch(f"{what} of a frozen set that is not this buffer's current one")

    def release_frozen(self, frozen: Frozen) -> None:
        """The flush committed: drop the frozen set and wake blocked writers."""
        with self._cond:
            if self._take(frozen, "release"):
                self._frozen = None
                self._frozen_only = 0
                self._cond.notify_all()

    def unfreeze(self, frozen: Frozen) -> None:
        """The flush failed: merge the frozen set back under the live runs (bytes written after
        the freeze stay on top) so nothing is lost, and allow the next freeze."""
        with self._cond:
            if not self._take(frozen, "unfreeze"):
                return
            for seg, pieces in frozen.segments.items():
                merged = _Segment.from_pieces(pieces)
                live = self._live.get(seg)
                if live is not None:
                    for r in live.runs:
                        merged.put(r.start, r.end, r.data)
                self._live[seg] = merged
            self._live_bytes = sum(s.data_bytes for s in self._live.values())
            self._live_holes = sum(s.hole_runs for s in self._live.values())
            self._frozen = None
            self._frozen_only = 0
            self._cond.notify_all()

    def drop_all(self) -> None:
        """The owner lost its lease: forget live and frozen runs and wake blocked writers. A flush
        still holding the old frozen set may release or unfreeze it afterwards; both do nothing.
        Woken writers complete into the now empty buffer: refusing I/O after a lost lease is the
        volume's job, and a new owner's epoch fences any flush of what they wrote (DESIGN.md §2.5)."""
        with self._cond:
            self._live = {}
            self._live_bytes = 0
            self._live_holes = 0
            self._frozen = None
            self._frozen_only = 0
            self._generation += 1
            self._cond.notify_all()

    # ------------------------------------------------------------ checking

    def check_invariants(self) -> None:
        """Check every run of every live segment and the counters; BufferInvariantError if broken."""
        with self._cond:
            for seg, segment in self._live.items():
                if seg < 0:
                    raise BufferInvariantError(f"negative segment index {seg}")
                segment.check(self.segment_bytes)
            if self._live_bytes != sum(s.data_bytes for s in self._live.values()):
                raise BufferInvariantError("live byte count is wrong")
            if self._live_holes != sum(s.hole_runs for s in self._live.values()):
                raise BufferInvariantError("live hole count is wrong")
            frozen_only = 0 if self._frozen is None else sum(1 for g in self._frozen.segments if g not in self._live)
            if self._frozen_only != frozen_only:
                raise BufferInvariantError("frozen-only segment count is wrong")

    def live_runs(self) -> dict[int, list[Piece]]:
        """A copy of the live runs per segment, as a freeze would return them (for tests and tools)."""
        with self._cond:
            return {seg: self._live[seg].pieces() for seg in sorted(self._live)}
