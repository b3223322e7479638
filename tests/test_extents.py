"""Segment records (blockdev/extents.py, DESIGN.md §5): codec tables, fuzzing, and a cell model.

The model is a segment of SEG cells, each None (a hole) or (blob, byte index in
that blob). Every edit is applied to both, and the record must always equal the
one canonical record of the cells (maximal runs that continue one blob), which
checks trimming, splitting and merging at once.
"""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockdev import extents as ext
from blockdev.extents import Extent, ExtentError, RecordError

SEG = 64  # a small segment so the model and hypothesis stay fast
BLOBS = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
A, B, C = BLOBS

Cell = tuple[bytes, int] | None

# The machine is shared with other test runs: judge correctness, not speed.
SLOW_OK = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


@st.composite
def extent_lists(
    draw: st.DrawFn,
    segment_bytes: int = SEG,
    max_size: int = 8,
    blob_offset_max: int = 2 * SEG,
    blobs: list[bytes] = BLOBS,
) -> list[Extent]:
    """Valid records: sorted, non-overlapping, inside the segment."""
    out: list[Extent] = []
    pos = 0
    for _ in range(draw(st.integers(0, max_size))):
        gap = draw(st.one_of(st.integers(0, 4), st.integers(0, segment_bytes)))
        start = pos + gap
        if start >= segment_bytes:
            break
        room = segment_bytes - start
        length = draw(st.one_of(st.integers(1, min(8, room)), st.integers(1, room)))
        blob_offset = draw(st.integers(0, blob_offset_max - length))
        out.append(Extent(start, length, draw(st.sampled_from(blobs)), blob_offset))
        pos = start + length
    return out


@st.composite
def ranges(draw: st.DrawFn, segment_bytes: int = SEG) -> tuple[int, int]:
    offset = draw(st.integers(0, segment_bytes))
    return offset, draw(st.integers(0, segment_bytes - offset))


def canonical(cells: list[Cell]) -> list[Extent]:
    """The one normal-form record of a cell array: maximal runs that continue one blob."""
    out: list[Extent] = []
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        blob, idx = cell
        if out:
            p = out[-1]
            if p.offset + p.length == i and p.blob == blob and p.blob_offset + p.length == idx:
                out[-1] = Extent(p.offset, p.length + 1, blob, p.blob_offset)
                continue
        out.append(Extent(i, 1, blob, idx))
    return out


def apply_extents(cells: list[Cell], extents: list[Extent]) -> None:
    for e in extents:
        for k in range(e.length):
            cells[e.offset + k] = (e.blob, e.blob_offset + k)


def check_plan(cells: list[Cell], extents: list[Extent], offset: int, length: int) -> None:
    plan = ext.read_plan(extents, offset, length, segment_bytes=SEG)
    pos = 0
    for dst, plen, blob, boff in plan:
        assert dst == pos and plen > 0  # in order, no gaps, no overlaps, no empty pieces
        for k in range(plen):
            want = cells[offset + dst + k]
            if blob is None:
                assert want is None and boff == 0
            else:
                assert want == (blob, boff + k)
        pos += plen
    assert pos == length


# ------------------------------------------------------------------ codec tables

ONE = [Extent(0, 4096, b"\x11" * 32, 0)]
ONE_BYTES = bytes.fromhex("92 01 91 94 00 cd1000 c420" + "11" * 32 + "00")

ENCODINGS = [
    ("empty record", [], bytes.fromhex("92 01 90")),
    ("one extent", ONE, ONE_BYTES),
    (
        "two extents, wide integers",
        [Extent(0, 1, A, 0), Extent(70000, 10, B, 1 << 31)],
        bytes.fromhex("92 01 92 94 00 01 c420" + A.hex() + "00 94 ce00011170 0a c420" + B.hex() + "ce80000000"),
    ),
]


@pytest.mark.parametrize(("name", "extents", "data"), ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_encoding_table(name: str, extents: list[Extent], data: bytes) -> None:
    assert ext.encode(extents) == data
    assert ext.decode(data) == extents


def _pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


REJECTED = [
    ("no bytes", b""),
    ("not msgpack", b"\xc1"),
    ("truncated", ONE_BYTES[:-1]),
    ("trailing byte", ONE_BYTES + b"\x00"),
    ("a map", _pack({"extents": []})),
    ("a bare list of extents", _pack([[0, 10, A, 0]])),
    ("format 2", _pack([2, []])),
    ("format true", _pack([True, []])),
    ("format missing", _pack([1])),
    ("extents not an array", _pack([1, b"x"])),
    ("extent of 3 fields", _pack([1, [[0, 10, A]]])),
    ("extent of 5 fields", _pack([1, [[0, 10, A, 0, 0]]])),
    ("offset is a bool", _pack([1, [[False, 10, A, 0]]])),
    ("length is a bool", _pack([1, [[0, True, A, 0]]])),
    ("offset is a float", _pack([1, [[0.0, 10, A, 0]]])),
    ("blob is a str", _pack([1, [[0, 10, "x" * 32, 0]]])),
    ("blob of 31 bytes", _pack([1, [[0, 10, A[:31], 0]]])),
    ("blob of 33 bytes", _pack([1, [[0, 10, A + b"x", 0]]])),
    ("empty extent", _pack([1, [[0, 0, A, 0]]])),
    ("negative offset", _pack([1, [[-1, 10, A, 0]]])),
    ("past the segment end", _pack([1, [[ext.SEGMENT_BYTES - 5, 10, A, 0]]])),
    ("offset at the segment end", _pack([1, [[ext.SEGMENT_BYTES, 1, A, 0]]])),
    ("negative blob offset", _pack([1, [[0, 10, A, -1]]])),
    ("past the blob bound", _pack([1, [[0, 10, A, ext.BLOB_BYTES_MAX - 5]]])),
    ("overlapping", _pack([1, [[0, 10, A, 0], [5, 10, B, 0]]])),
    ("unsorted", _pack([1, [[20, 5, A, 0], [0, 5, B, 0]]])),
    ("duplicate", _pack([1, [[0, 5, A, 0], [0, 5, A, 0]]])),
    ("too many extents", _pack([1, [[i, 1, A, i] for i in range(ext.RECORD_EXTENTS_MAX + 1)]])),
    ("over the size bound", b"\x00" * (ext.RECORD_BYTES_MAX + 1)),
    ("padded integer", bytes.fromhex("92 01 91 94 cc00 cd1000 c420" + "11" * 32 + "00")),
    ("wide array header", bytes.fromhex("dc0002 01 91 94 00 cd1000 c420" + "11" * 32 + "00")),
    ("deep nesting", b"\x91" * 10_000),
    ("ext type", _pack(msgpack.ExtType(5, b"abc"))),
    ("bad timestamp", bytes.fromhex("d5ff0000")),
    ("huge declared array", bytes.fromhex("ddffffffff")),
    ("huge declared bin", bytes.fromhex("c6ffffffff")),
]


@pytest.mark.parametrize(("name", "data"), REJECTED, ids=[r[0] for r in REJECTED])
def test_decode_rejects(name: str, data: bytes) -> None:
    with pytest.raises(RecordError):
        ext.decode(data)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(RecordError):
        ext.decode("not bytes")  # type: ignore[arg-type]


def test_every_prefix_of_a_record_is_rejected() -> None:
    data = ext.encode([Extent(0, 10, A, 0), Extent(100, 4000, B, 77), Extent(70000, 1, C, 1 << 20)])
    for k in range(len(data)):
        with pytest.raises(RecordError):
            ext.decode(data[:k])


def test_largest_record_fits_the_bound() -> None:
    # RECORD_EXTENTS_MAX extents with the widest fields the bounds allow.
    n = ext.RECORD_EXTENTS_MAX
    step = (ext.SEGMENT_BYTES - 65536) // n
    extents = [Extent(65536 + i * step, step - 1, A, ext.BLOB_BYTES_MAX - step) for i in range(n)]
    data = ext.encode(extents)
    assert len(data) <= ext.RECORD_BYTES_MAX
    assert ext.decode(data) == extents
    with pytest.raises(ExtentError):
        ext.encode([*extents, Extent(ext.SEGMENT_BYTES - 1, 1, A, 0)])


# ------------------------------------------------------------------ local faults

@pytest.mark.parametrize(
    "fields",
    [(0, 0, A, 0), (-1, 5, A, 0), (0, 5, A[:5], 0), (0, 5, A, -1), (ext.SEGMENT_BYTES - 1, 2, A, 0), (True, 5, A, 0)],
)
def test_invalid_extent_is_refused(fields: tuple[int, int, bytes, int]) -> None:
    with pytest.raises(ExtentError):
        Extent(*fields)


def test_invalid_lists_are_refused() -> None:
    overlapping = [Extent(0, 10, A, 0), Extent(5, 10, B, 0)]
    with pytest.raises(ExtentError):
        ext.encode(overlapping)
    with pytest.raises(ExtentError):
        ext.overlay([], overlapping)
    with pytest.raises(ExtentError):
        ext.overlay(overlapping, [])
    with pytest.raises(ExtentError):
        ext.read_plan([Extent(60, 10, A, 0)], 0, 10, segment_bytes=SEG)  # past a 64-byte segment
    with pytest.raises(ExtentError):
        ext.punch([], 60, 10, segment_bytes=SEG)
    with pytest.raises(ExtentError):
        ext.read_plan([], -1, 1)
    with pytest.raises(ExtentError):
        ext.validate([], segment_bytes=ext.SEGMENT_BYTES + 1)
    with pytest.raises(ExtentError):
        ext.validate([Extent(0, 10, A, 0), Extent(9, 5, B, 0)])  # one byte of overlap
    ext.validate([Extent(0, 10, A, 0), Extent(10, 5, B, 0)])  # touching is fine


# ------------------------------------------------------------------ edits, by example

def test_overlay_splits_and_trims_with_blob_offsets() -> None:
    base = [Extent(0, 64, A, 100)]
    assert ext.overlay(base, [Extent(10, 10, B, 0)], segment_bytes=SEG) == [
        Extent(0, 10, A, 100),
        Extent(10, 10, B, 0),
        Extent(20, 44, A, 120),
    ]
    # A trimmed head advances its blob offset; a trimmed tail keeps it.
    assert ext.overlay(base, [Extent(0, 5, B, 0), Extent(60, 4, C, 0)], segment_bytes=SEG) == [
        Extent(0, 5, B, 0),
        Extent(5, 55, A, 105),
        Extent(60, 4, C, 0),
    ]


def test_punch_and_read_plan() -> None:
    rec = ext.punch([Extent(0, 64, A, 0)], 16, 32, segment_bytes=SEG)
    assert rec == [Extent(0, 16, A, 0), Extent(48, 16, A, 48)]
    assert ext.read_plan(rec, 8, 48, segment_bytes=SEG) == [(0, 8, A, 8), (8, 32, None, 0), (40, 8, A, 48)]
    assert ext.read_plan(rec, 20, 0, segment_bytes=SEG) == []
    assert ext.read_plan([], 0, SEG, segment_bytes=SEG) == [(0, SEG, None, 0)]
    assert ext.punch(rec, 0, 0, segment_bytes=SEG) == rec
    # Punching the gap between two pieces of one blob run does not reunite them (they are not adjacent).
    assert ext.allocated(rec) == 32 and ext.blobs(rec) == {A}


def test_sequential_writes_into_one_blob_stay_one_extent() -> None:
    rec: list[Extent] = []
    for i in range(256):  # 256 writes of 4 KiB fill the real 1 MiB segment
        rec = ext.overlay(rec, [Extent(i * 4096, 4096, A, i * 4096)])
        assert len(rec) == 1
    assert rec == [Extent(0, ext.SEGMENT_BYTES, A, 0)]
    # Backwards order merges too.
    rec = []
    for i in reversed(range(16)):
        rec = ext.overlay(rec, [Extent(i * 4, 4, B, 1000 + i * 4)], segment_bytes=SEG)
    assert rec == [Extent(0, SEG, B, 1000)]
    # New extents that continue each other are merged with one another as well.
    new = [Extent(0, 8, C, 0), Extent(8, 8, C, 8), Extent(16, 8, C, 99)]
    assert ext.overlay([], new, segment_bytes=SEG) == [Extent(0, 16, C, 0), Extent(16, 8, C, 99)]


def test_non_contiguous_blob_offsets_do_not_merge() -> None:
    rec = ext.overlay([Extent(0, 4, A, 0)], [Extent(4, 4, A, 5)], segment_bytes=SEG)
    assert len(rec) == 2


def test_fragmentation_bound() -> None:
    rec = [Extent(i * 2, 1, BLOBS[i % 2], 0) for i in range(ext.EXTENTS_MAX)]
    assert not ext.fragmented(rec)
    rec = ext.overlay(rec, [Extent(ext.EXTENTS_MAX * 2, 1, C, 0)])
    assert ext.fragmented(rec)


# ------------------------------------------------------------------ property tests

# Records up to the fragmentation bound; test_largest_record_fits_the_bound covers the
# decode bound (RECORD_EXTENTS_MAX) without making generation slow.
full_records = extent_lists(
    segment_bytes=ext.SEGMENT_BYTES, max_size=ext.EXTENTS_MAX, blob_offset_max=ext.BLOB_BYTES_MAX
)


@given(full_records)
@settings(max_examples=200, **SLOW_OK)
def test_round_trip(extents: list[Extent]) -> None:
    data = ext.encode(extents)
    assert len(data) <= ext.RECORD_BYTES_MAX
    assert ext.decode(data) == extents


def _check_decoded_or_rejected(data: bytes) -> None:
    try:
        got = ext.decode(data)
    except RecordError:
        return
    ext.validate(got)  # a returned record is always valid...
    assert ext.encode(got) == data  # ...and in the one canonical encoding


@given(st.binary(max_size=300))
@settings(max_examples=500, **SLOW_OK)
def test_decode_random_bytes(data: bytes) -> None:
    _check_decoded_or_rejected(data)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), st.integers(0, 10_000), st.integers(0, 255)
    ),
    min_size=1,
    max_size=4,
)


@given(extent_lists(segment_bytes=ext.SEGMENT_BYTES, max_size=6, blob_offset_max=ext.BLOB_BYTES_MAX), mutations)
@settings(max_examples=500, **SLOW_OK)
def test_decode_mutated_records(extents: list[Extent], muts: list[tuple[str, int, int]]) -> None:
    data = bytearray(ext.encode(extents))
    for kind, where, value in muts:
        i = where % (len(data) + 1)
        if kind == "flip" and i < len(data):
            data[i] ^= 1 << (value % 8)
        elif kind == "set" and i < len(data):
            data[i] = value
        elif kind == "insert":
            data.insert(i, value)
        elif kind == "delete" and i < len(data):
            del data[i]
        elif kind == "truncate":
            del data[i:]
    _check_decoded_or_rejected(bytes(data))


class RecordMachine(RuleBasedStateMachine):
    """overlay and punch held against a cell model; read_plan checked over random ranges."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[Cell] = [None] * SEG
        self.record: list[Extent] = []

    @rule(new=extent_lists())
    def overlay(self, new: list[Extent]) -> None:
        self.record = ext.overlay(self.record, new, segment_bytes=SEG)
        apply_extents(self.cells, new)

    @rule(new=extent_lists(blobs=[A], max_size=3))
    def overlay_one_blob(self, new: list[Extent]) -> None:
        # One blob only, so continuations (and merges) are frequent.
        self.overlay(new)

    @rule(r=ranges())
    def punch(self, r: tuple[int, int]) -> None:
        offset, length = r
        self.record = ext.punch(self.record, offset, length, segment_bytes=SEG)
        for k in range(offset, offset + length):
            self.cells[k] = None

    @rule(r=ranges())
    def read(self, r: tuple[int, int]) -> None:
        check_plan(self.cells, self.record, *r)

    @precondition(lambda self: bool(self.record))
    @rule()
    def record_round_trips(self) -> None:
        assert ext.decode(ext.encode(self.record, segment_bytes=SEG), segment_bytes=SEG) == self.record

    @invariant()
    def record_is_the_canonical_record_of_the_cells(self) -> None:
        ext.validate(self.record, segment_bytes=SEG)
        assert self.record == canonical(self.cells)
        assert ext.allocated(self.record) == sum(c is not None for c in self.cells)
        assert ext.blobs(self.record) == {c[0] for c in self.cells if c is not None}
        check_plan(self.cells, self.record, 0, SEG)


RecordMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, **SLOW_OK)
TestRecordMachine = RecordMachine.TestCase
