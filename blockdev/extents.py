"""Segment records: which blob bytes make up each segment of a volume (DESIGN.md §5).

Theory of operation. A volume's address space is cut into segments of
SEGMENT_BYTES. The record of one segment is a list of extents, each saying "these
`length` bytes at `offset` in the segment are the bytes at `blob_offset` in the
blob whose SHA-256 is `blob`". Bytes no extent covers are a hole and read as
zeros, so a new volume is all holes and costs nothing (thin provisioning).

The invariant of a record, checked on every encode, every decode and after
every edit here: extents are sorted by offset, none overlap, every one lies
inside the segment and has a positive length, every blob hash is 32 bytes and
every blob range lies inside BLOB_BYTES_MAX. Edits (`overlay`, `punch`) also
return records in normal form: two neighbours that touch and continue the same
blob contiguously are one extent, so sequential writes into one blob stay one
extent and a record's length measures its real fragmentation.

This module is pure: no I/O, no clock, no threads. Records come back from the
KV, which stores what some owner wrote, so `decode` treats its input as
untrusted: it bounds the size before parsing, checks types exactly (a msgpack
`true` is not the integer 1), and accepts only the one canonical encoding of a
record (it re-encodes and compares), so a record has exactly one byte form and
a compare-and-set on its bytes compares its meaning.

Errors say whose fault it is: `RecordError` means the stored bytes are bad (the
caller should treat the segment map as corrupt and stop serving it);
`ExtentError` means this process built or passed an invalid extent list or
range (a bug here or in the caller).

Encoding (format 1): the msgpack array `[1, [[offset, length, blob, blob_offset], ...]]`
with minimal-width integers and the blob as msgpack bin.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

# One segment is 1 MiB of the volume's address space (DESIGN.md §5): large enough
# that a 1 TiB volume has a million records, small enough that rewriting a whole
# fragmented segment as one blob is cheap.
SEGMENT_BYTES = 1 << 20

# A record with more extents than this is fragmented: the next flush of the
# segment rewrites it as one blob (DESIGN.md §5).
EXTENTS_MAX = 64

# decode accepts records up to four times the fragmentation bound, so a record
# written just before a rewrite (or by a flush that added many runs to an already
# fragmented segment) still loads; encode refuses to write more than that.
RECORD_EXTENTS_MAX = EXTENTS_MAX * 4

# An encoded record must fit one KV value (kv/limits.py VALUE_BYTES_MAX, 16 KiB).
# The largest extent encodes in 54 bytes (fixarray 1 + uint32 5 + uint32 5 +
# bin8 34 + uint64 9), so RECORD_EXTENTS_MAX extents take at most 13,829 bytes.
RECORD_BYTES_MAX = 16 * 1024

# Blobs are named by SHA-256.
BLOB_HASH_BYTES = 32

# A flush writes at most one segment's bytes per blob; this bound leaves room for
# packing several segments into one blob later while keeping every blob range
# small enough to check and to encode in a uint64.
BLOB_BYTES_MAX = 1 << 32

RECORD_FORMAT = 1

# (dst_offset relative to the read's start, length, blob hash or None for a hole, blob_offset)
ReadPiece = tuple[int, int, bytes | None, int]


class ExtentError(ValueError):
    """An extent list or range built or passed by this process breaks an invariant (a local bug)."""


class RecordError(ValueError):
    """An encoded segment record is malformed; the bytes came from storage and are rejected, not repaired."""


@dataclass(frozen=True, slots=True)
class Extent:
    """`length` bytes at `offset` in the segment are the bytes at `blob_offset` in blob `blob`.

    Invariant (checked on construction against the full SEGMENT_BYTES; lists are
    checked against their segment size by `validate`): 0 <= offset, 0 < length,
    offset + length <= SEGMENT_BYTES, blob is 32 bytes, 0 <= blob_offset and
    blob_offset + length <= BLOB_BYTES_MAX.
    """

    offset: int
    length: int
    blob: bytes
    blob_offset: int

    def __post_init__(self) -> None:
        problem = _extent_problem(self.offset, self.length, self.blob, self.blob_offset, SEGMENT_BYTES)
        if problem is not None:
            raise ExtentError(problem)

    @property
    def end(self) -> int:
        """One past the extent's last byte in the segment."""
        return self.offset + self.length


def _extent_problem(
    offset: object, length: object, blob: object, blob_offset: object, segment_bytes: int
) -> str | None:
    """What is wrong with one extent's fields, or None. Types are checked exactly: bool is not int."""
    if type(offset) is not int or type(length) is not int or type(blob_offset) is not int:
        return "offset, length and blob_offset must be integers"
    if type(blob) is not bytes or len(blob) != BLOB_HASH_BYTES:
        return f"blob must be a {BLOB_HASH_BYTES}-byte SHA-256 hash"
    if not 0 <= offset < segment_bytes:
        return f"offset {offset} is outside the segment [0, {segment_bytes})"
    if length <= 0 or offset + length > segment_bytes:
        return f"extent at {offset} of length {length} is empty or runs past the segment end {segment_bytes}"
    if blob_offset < 0 or blob_offset + length > BLOB_BYTES_MAX:
        return f"blob range at {blob_offset} of length {length} is outside [0, {BLOB_BYTES_MAX})"
    return None


def _list_problem(extents: Sequence[Extent], segment_bytes: int) -> str | None:
    """What breaks the record invariant (sorted, non-overlapping, in bounds), or None."""
    prev_end = 0
    for i, e in enumerate(extents):
        if not isinstance(e, Extent):
            return f"item {i} is a {type(e).__name__}, not an Extent"
        problem = _extent_problem(e.offset, e.length, e.blob, e.blob_offset, segment_bytes)
        if problem is not None:
            return f"extent {i}: {problem}"
        if e.offset < prev_end:
            return f"extent {i} at {e.offset} overlaps or precedes the extent ending at {prev_end}"
        prev_end = e.offset + e.length
    return None


def _check_segment_bytes(segment_bytes: int) -> None:
    # Tests use small segments; nothing may use larger ones than the format allows.
    if type(segment_bytes) is not int or not 0 < segment_bytes <= SEGMENT_BYTES:
        raise ExtentError(f"segment_bytes {segment_bytes!r} is not in (0, {SEGMENT_BYTES}]")


def _check_range(offset: int, length: int, segment_bytes: int) -> None:
    if type(offset) is not int or type(length) is not int:
        raise ExtentError("offset and length must be integers")
    if offset < 0 or length < 0 or offset + length > segment_bytes:
        raise ExtentError(f"range at {offset} of length {length} is outside the segment [0, {segment_bytes})")


def validate(extents: Sequence[Extent], *, segment_bytes: int = SEGMENT_BYTES) -> None:
    """Raise ExtentError unless `extents` is a valid record: sorted, non-overlapping, inside the segment."""
    _check_segment_bytes(segment_bytes)
    problem = _list_problem(extents, segment_bytes)
    if problem is not None:
        raise ExtentError(problem)


def encode(extents: Sequence[Extent], *, segment_bytes: int = SEGMENT_BYTES) -> bytes:
    """The canonical msgpack bytes of a record (format 1); ExtentError if the record is invalid or too big."""
    validate(extents, segment_bytes=segment_bytes)
    if len(extents) > RECORD_EXTENTS_MAX:
        raise ExtentError(f"record has {len(extents)} extents, more than {RECORD_EXTENTS_MAX}")
    data: bytes = msgpack.packb(
        [RECORD_FORMAT, [[e.offset, e.length, e.blob, e.blob_offset] for e in extents]],
        use_bin_type=True,
    )
    # The size follows from the bounds above (see RECORD_BYTES_MAX); checked anyway,
    # because a record decode would refuse must never be written.
    if len(data) > RECORD_BYTES_MAX:
        raise ExtentError(f"encoded record is {len(data)} bytes, more than {RECORD_BYTES_MAX}")
    return data


def decode(data: bytes, *, segment_bytes: int = SEGMENT_BYTES) -> list[Extent]:
    """The extents of an encoded record. Untrusted input: any malformed, oversized or
    non-canonical input raises RecordError, and nothing else is raised for any bytes."""
    _check_segment_bytes(segment_bytes)
    if not isinstance(data, bytes):
        raise RecordError(f"a record is bytes, not {type(data).__name__}")
    if len(data) > RECORD_BYTES_MAX:
        raise RecordError(f"record is {len(data)} bytes, more than {RECORD_BYTES_MAX}")
    try:
        # The limits make the parser refuse strings, maps, ext types and long bins or
        # arrays before allocating them; data is already bounded to 16 KiB.
        obj = msgpack.unpackb(
            data,
            use_list=True,
            raw=False,
            strict_map_key=True,
            max_str_len=0,
            max_bin_len=BLOB_HASH_BYTES,
            max_array_len=RECORD_EXTENTS_MAX,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise RecordError(f"record is not valid msgpack: {exc}") from exc
    if type(obj) is not list or len(obj) != 2:
        raise RecordError("a record is the array [format, extents]")
    fmt, items = obj
    if type(fmt) is not int or fmt != RECORD_FORMAT:
        raise RecordError(f"record format {fmt!r} is not {RECORD_FORMAT}")
    if type(items) is not list:
        raise RecordError("a record's extents are an array")
    if len(items) > RECORD_EXTENTS_MAX:
        raise RecordError(f"record has {len(items)} extents, more than {RECORD_EXTENTS_MAX}")
    extents: list[Extent] = []
    prev_end = 0
    for i, item in enumerate(items):
        if type(item) is not list or len(item) != 4:
            raise RecordError(f"extent {i} is not the array [offset, length, blob, blob_offset]")
        offset, length, blob, blob_offset = item
        problem = _extent_problem(offset, length, blob, blob_offset, segment_bytes)
        if problem is not None:
            raise RecordError(f"extent {i}: {problem}")
        if offset < prev_end:
            raise RecordError(f"extent {i} at {offset} overlaps or precedes the extent ending at {prev_end}")
        extents.append(Extent(offset, length, blob, blob_offset))
        prev_end = offset + length
    # One record, one byte form: reject padded integers, wide array headers and the like.
    # Re-encoding also re-checks every invariant the loop above just checked.
    if encode(extents, segment_bytes=segment_bytes) != data:
        raise RecordError("record is not in canonical encoding")
    return extents


def _slice(e: Extent, start: int, end: int) -> Extent:
    """The part [start, end) of extent e (segment offsets inside e), pointing at the same blob bytes."""
    if start == e.offset and end == e.offset + e.length:
        return e
    return Extent(start, end - start, e.blob, e.blob_offset + (start - e.offset))


def _subtract(base: Sequence[Extent], cuts: Sequence[tuple[int, int]]) -> list[Extent]:
    """The parts of `base` outside every [start, end) in `cuts` (sorted, non-overlapping)."""
    out: list[Extent] = []
    for e in base:
        pos, end = e.offset, e.offset + e.length
        i = bisect.bisect_right(cuts, pos, key=lambda c: c[1])  # first cut ending after pos
        while pos < end:
            if i < len(cuts) and cuts[i][0] < end:
                cut_start, cut_end = cuts[i]
                if cut_start > pos:
                    out.append(_slice(e, pos, cut_start))
                pos = max(pos, cut_end)
                i += 1
            else:
                out.append(_slice(e, pos, end))
                break
    return out


def _coalesce(extents: Sequence[Extent]) -> list[Extent]:
    """Merge neighbours that touch and continue the same blob contiguously (input sorted, non-overlapping)."""
    out: list[Extent] = []
    for e in extents:
        if out:
            p = out[-1]
            if p.offset + p.length == e.offset and p.blob == e.blob and p.blob_offset + p.length == e.blob_offset:
                out[-1] = Extent(p.offset, p.length + e.length, p.blob, p.blob_offset)
                continue
        out.append(e)
    return out


def _checked(extents: list[Extent], segment_bytes: int) -> list[Extent]:
    # An edit that produced an invalid record is a bug here; stop before it is stored.
    problem = _list_problem(extents, segment_bytes)
    if problem is not None:
        raise ExtentError(f"edit produced an invalid record: {problem}")
    return extents


def overlay(base: Sequence[Extent], new: Sequence[Extent], *, segment_bytes: int = SEGMENT_BYTES) -> list[Extent]:
    """The record after writing `new` over `base`: where they overlap `new` wins, base extents are
    trimmed or split (a trimmed head advances its blob_offset), and the result is in normal form."""
    validate(base, segment_bytes=segment_bytes)
    validate(new, segment_bytes=segment_bytes)
    kept = _subtract(base, [(n.offset, n.offset + n.length) for n in new])
    # kept and new are disjoint, so sorting by offset gives a non-overlapping list.
    merged = sorted([*kept, *new], key=lambda e: e.offset)
    return _checked(_coalesce(merged), segment_bytes)


def punch(base: Sequence[Extent], offset: int, length: int, *, segment_bytes: int = SEGMENT_BYTES) -> list[Extent]:
    """The record after making [offset, offset + length) a hole; the result is in normal form."""
    validate(base, segment_bytes=segment_bytes)
    _check_range(offset, length, segment_bytes)
    kept = _subtract(base, [(offset, offset + length)] if length else [])
    return _checked(_coalesce(kept), segment_bytes)


def read_plan(
    extents: Sequence[Extent], offset: int, length: int, *, segment_bytes: int = SEGMENT_BYTES
) -> list[ReadPiece]:
    """How to read [offset, offset + length) of the segment: pieces (dst_offset relative to `offset`,
    length, blob hash or None for a hole, blob_offset; 0 for holes), in order, covering the range
    exactly once. A zero-length read has no pieces."""
    validate(extents, segment_bytes=segment_bytes)
    _check_range(offset, length, segment_bytes)
    plan: list[ReadPiece] = []
    pos, end = offset, offset + length
    i = bisect.bisect_right(extents, offset, key=lambda e: e.offset + e.length)  # first extent ending after offset
    while pos < end:
        if i < len(extents) and extents[i].offset < end:
            e = extents[i]
            if e.offset > pos:
                plan.append((pos - offset, e.offset - pos, None, 0))
                pos = e.offset
            piece_end = min(end, e.offset + e.length)
            plan.append((pos - offset, piece_end - pos, e.blob, e.blob_offset + (pos - e.offset)))
            pos = piece_end
            i += 1
        else:
            plan.append((pos - offset, end - pos, None, 0))
            pos = end
    return plan


def blobs(extents: Sequence[Extent]) -> set[bytes]:
    """The blob hashes the record references (what GC's mark phase must keep)."""
    return {e.blob for e in extents}


def allocated(extents: Sequence[Extent]) -> int:
    """Bytes of the segment backed by blob data (not holes), for thin-provisioning accounting."""
    return sum(e.length for e in extents)


def fragmented(extents: Sequence[Extent]) -> bool:
    """True when the record has more than EXTENTS_MAX extents and the next flush should rewrite it whole."""
    return len(extents) > EXTENTS_MAX
