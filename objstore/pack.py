"""One node's local blob store: append-only pack files, a LevelDB index, group commit.

Theory of operation (DESIGN.md §4, Haystack-style). Blobs are immutable and
named by the SHA-256 of their content, so a node keeps them as *records*
appended to a few large pack files (`<dir>/packs/pack-000001.dat`, ...; a new
pack is started once the current one would pass `pack_max_bytes`) instead of
one file per blob, and finds them through an index in a local LevelDB
(`<dir>/index`). Nothing is rewritten in place: a delete only drops the index
entry, and the record's bytes become *dead* until compaction copies the live
records of a mostly-dead pack forward and unlinks it.

Record format (little endian, 64-byte header then the stored bytes)::

    offset size  field
         0    4  magic b"FLPK"
         4    1  format version (1)
         5    1  compression: 0 none, 1 zstd (one frame, content size in it)
         6    2  flags, must be 0
         8   32  content hash: SHA-256 of the uncompressed content
        40    8  logical size (uncompressed bytes)
        48    8  stored length (bytes that follow the header)
        56    4  crc32c of the stored bytes
        60    4  crc32c of header bytes 0..59
        64    -  stored bytes (the content, or its zstd frame)

The header holds no location, so a record is copied verbatim when compaction
moves it. Its own checksum lets recovery tell a whole header from a torn or
corrupt one before trusting its lengths, and the magic lets it find the next
record after a corrupt one. A pack file is nothing but records back to back.

Index (LevelDB, one ordered keyspace):

    b"h" + hash  -> pack id u32, offset u64, record length u64, size u64,
                    stored size u64, compression u8, touched time f64
    b"c"         -> checkpoint: pack id u32, offset u64. Every record before
                    it has been indexed (or found dead or corrupt).
    b"m"         -> index format marker, written last when the index is built.

Group commit (the durability barrier of a put). `put` checks SHA-256(data) ==
h, compresses in the caller's thread (zstd level 3, kept only when it saves at
least 10%), and queues a request for the single writer thread. The writer
takes every queued request (up to BATCH_REQUESTS_MAX / BATCH_BYTES_MAX),
appends their records to the current pack, calls `kv.durable.sync_file` once
for the batch, then writes all their index entries and the new checkpoint in
one LevelDB WriteBatch with sync=True, and only then wakes the callers. So
when `put` returns, the record is on disk *and* the index entry that finds it
is; sixty-four concurrent puts cost a handful of fsyncs, not sixty-four.
`put_many` queues all its requests at once, so sixty-four blobs from one
caller (a volume flush, through the PutMany RPC) share a single batch.
Dedup is decided by the writer under the index lock: content already indexed
(and not quarantined) writes no record, its touched time is reset in the same
synced batch, and the put returns True. `put_file` streams a large blob
through temp files in `<dir>/tmp` (raw and zstd, hashed and checksummed as they
are written) and the writer copies the chosen one into the pack in
CHUNK_BYTES pieces, re-checking its crc as it copies.

Why the order is safe: the pack is synced before the index batch that points
into it, so an index entry never points at bytes that are not durable. A crash
between the two leaves durable records after the checkpoint that no entry
points to; recovery indexes them. A crash before the pack sync leaves at most
a torn tail after the checkpoint; recovery cuts it. No put that returned is in
either window. When a batch rolls to a new pack, the old pack is synced first,
so only the last pack can ever have a torn tail.

Recovery at open. If `<dir>/index` is missing, has no CURRENT file (a power
loss dropped LevelDB's unsynced files), is corrupt, or lacks the format
marker, it is rebuilt from scratch: the checkpoint is then (0, 0) and every
pack is scanned. Otherwise only the packs from the checkpoint on are scanned.
The scan reads record after record and checks each fully (header crc, stored
crc, decompression, SHA-256). A record whose header is bad is skipped by
searching for the next magic whose header and record check out; a record
whose stored bytes fail is skipped by its (header-checked) length. Skipped
records in the middle of a pack are counted in `corrupt_found` and left as
dead bytes. Whatever follows the last valid record of the *last* pack is a
torn write (partial header, bad header, short or failing stored bytes at the
very end): the file is truncated there and the truncation synced
(`torn_tails_cut`). Index entries that point into a missing pack, past a
pack's end, or into the scanned range where no valid record starts are
dropped; valid scanned records not yet indexed are indexed with touched time =
now (young, so a GC sweep does not take them before their segment map could
have committed); a second copy of an indexed hash is dead. The new
checkpoint, and for a rebuild the format marker, go in the last synced batch,
so a crash during recovery just repeats it.

Reads. Every read looks the hash up, opens the pack and checks the record
header against the index entry, then the crc32c of all stored bytes before it
returns any data, and the SHA-256 of the content when the whole blob is read.
Blobs up to SMALL_BLOB_BYTES_MAX are read in one piece; larger ones in
CHUNK_BYTES pieces (two passes for `read_iter`: verify, then stream, so no
unverified byte is ever handed out). A copy that fails is *quarantined*: its
index entry is removed in a synced write, `corrupt_found` counts it, and
`BlobCorrupt` is raised; it is never served again, and a later put of the
same content writes a fresh copy. A quarantined copy stays out after a
rebuild too, because the rebuild scan applies the same checks.

Space accounting. Per pack, live bytes are the record bytes that index
entries point into; dead bytes are the pack's size minus that. They are
derived from the index at open and kept in memory with every index change
(same lock), never persisted, so they cannot drift from the index. (Deletes
are written with sync=False: a delete lost in a power failure only resurrects
garbage that GC deletes again.)

Compaction. `compact` picks sealed packs (never the one being appended) whose
dead fraction is at least the threshold, scans their records, and sends each
record the index still points at to the writer as a *move*. The writer, under
the index lock, copies the record to the current pack only if the entry still
names that copy (a blob deleted or quarantined meanwhile is not moved), checks
the crc as it copies, syncs, and repoints the entries (touched time kept) in
its synced batch. A re-put of the blob meanwhile is just a dedup touch of
whichever copy the entry names. When the pack's live bytes reach zero it is
unlinked and the directory synced. Readers are never blocked: each read opens
the pack itself, and if the pack was unlinked since the lookup, the index
entry has moved and the read looks it up again.

Bounds: batches (requests and bytes), the writer queue, read pieces, the move
groups of compaction and the recovery scan buffers are all bounded; no code
path reads a whole pack or holds a blob larger than SMALL_BLOB_BYTES_MAX in
memory except `get` of a whole blob, which returns it.

Failure: if the writer hits an I/O error it stops (after a failed fsync the
page cache can no longer be trusted) and fails every queued put with
`StoreFailed`, whose outcome is indeterminate; reads keep working; the store
must be closed and reopened, and recovery sorts out the tail.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import IO, BinaryIO, Final, TypeVar, cast

import crc32c as _crc32c
import plyvel
import zstandard

from kv import durable
from objstore import api
from objstore.api import (
    BlobCorrupt,
    BlobError,
    BlobInfo,
    BlobNotFound,
    InvalidBlob,
    VerifyResult,
)

log = logging.getLogger("floe.objstore.pack")

T = TypeVar("T")

# --- record format -------------------------------------------------------------

MAGIC: Final = b"FLPK"
FORMAT_VERSION: Final = 1
COMPRESSION_NONE: Final = 0
COMPRESSION_ZSTD: Final = 1
COMPRESSION_NAMES: Final = {COMPRESSION_NONE: "none", COMPRESSION_ZSTD: "zstd"}
_HEADER_BODY = struct.Struct("<4sBBH32sQQI")
_HEADER_CRC = struct.Struct("<I")
HEADER_BYTES: Final = _HEADER_BODY.size + _HEADER_CRC.size  # 64

# zstd level 3 is zstd's own default: ~300 MB/s per core, most of the ratio of
# the higher levels on block data.
ZSTD_LEVEL: Final = 3
# Compression is kept only if it saves at least 1/10 of the size; below that the
# CPU spent decompressing every read is not worth the space.
COMPRESSION_GAIN_MIN_DIVISOR: Final = 10

# --- bounds ----------------------------------------------------------------------

# A batch is what one fsync covers. 1024 requests or 32 MiB of records (one
# larger record goes alone) keeps the fsync and the index batch short enough
# that puts arriving meanwhile wait at most one batch.
BATCH_REQUESTS_MAX: Final = 1024
BATCH_BYTES_MAX: Final = 32 * 1024 * 1024
# Puts queued for the writer beyond this wait for room (each caller holds its
# own data; this bounds the queue, not the callers).
QUEUE_REQUESTS_MAX: Final = 4096
# Blobs up to this size are read and verified in one piece (a volume segment
# is 1 MiB); larger ones are streamed in api.CHUNK_BYTES pieces.
SMALL_BLOB_BYTES_MAX: Final = 4 * 1024 * 1024
# Compaction hands the writer moves in groups of at most this many bytes or
# requests, so puts interleave with a compaction instead of waiting it out.
MOVE_GROUP_BYTES_MAX: Final = 8 * 1024 * 1024
MOVE_GROUP_REQUESTS_MAX: Final = 256
# Recovery writes rebuilt index entries in batches of this many.
RECOVERY_BATCH_ENTRIES: Final = 4096
# The resynchronising search after a corrupt header reads this much at a time.
RESYNC_READ_BYTES: Final = 1024 * 1024
# A read whose copy keeps moving (compaction) retries the lookup this often.
READ_ATTEMPTS_MAX: Final = 8

_PACK_NAME = re.compile(r"^pack-(\d{6,})\.dat$")
_INDEX_MARKER: Final = b"floe-pack-index-1"
_KEY_BLOB: Final = b"h"
_KEY_BLOB_END: Final = b"i"
_KEY_CHECKPOINT: Final = b"c"
_KEY_MARKER: Final = b"m"
_ENTRY = struct.Struct("<IQQQQBd")
_CHECKPOINT = struct.Struct("<IQ")


class StoreFailed(BlobError):
    """The pack writer hit an I/O error and stopped. A put that got this may or
    may not be on disk (indeterminate); nothing more is written until the store
    is reopened."""


class StoreClosed(BlobError):
    """The store was closed; the request was not applied."""


class PackInvariantError(RuntimeError):
    """The index and the packs disagree in a way no crash can cause (a bug or
    outside tampering). Deleting `<dir>/index` makes the next open rebuild it."""


def _crc(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


@dataclass(frozen=True, slots=True)
class RecordHeader:
    compression: int
    hash: bytes
    size: int
    stored_len: int
    data_crc: int

    @property
    def record_len(self) -> int:
        return HEADER_BYTES + self.stored_len

    def check(self) -> str:
        """'' if the fields are consistent, else what is wrong."""
        if self.compression not in COMPRESSION_NAMES:
            return f"unknown compression {self.compression}"
        if len(self.hash) != api.HASH_BYTES:
            return "bad hash length"
        if not 0 <= self.size <= api.BLOB_BYTES_MAX:
            return f"size {self.size} out of range"
        if self.compression == COMPRESSION_NONE and self.stored_len != self.size:
            return "raw record whose stored length is not its size"
        # zstd is kept only when it saves 10%, so a compressed record is smaller.
        if self.compression == COMPRESSION_ZSTD and not 0 < self.stored_len <= self.size:
            return "compressed record not smaller than its content"
        return ""

    def encode(self) -> bytes:
        problem = self.check()
        if problem:
            raise PackInvariantError(f"refusing to write a bad record header: {problem}")
        body = _HEADER_BODY.pack(
            MAGIC, FORMAT_VERSION, self.compression, 0, self.hash, self.size, self.stored_len, self.data_crc
        )
        return body + _HEADER_CRC.pack(_crc(body))


def decode_header(buf: bytes | memoryview) -> RecordHeader | None:
    """The header at the start of buf, or None if it is short, torn or corrupt."""
    if len(buf) < HEADER_BYTES:
        return None
    body = bytes(buf[: _HEADER_BODY.size])
    (stored_crc,) = _HEADER_CRC.unpack_from(buf, _HEADER_BODY.size)
    if _crc(body) != stored_crc:
        return None
    magic, version, compression, flags, h, size, stored_len, data_crc = _HEADER_BODY.unpack(body)
    if magic != MAGIC or version != FORMAT_VERSION or flags != 0:
        return None
    hdr = RecordHeader(compression, h, size, stored_len, data_crc)
    return None if hdr.check() else hdr


@dataclass(frozen=True, slots=True)
class RecordLocation:
    """Where a blob's indexed copy is (for scrub tools, tests and operators)."""

    pack_id: int
    offset: int
    record_len: int
    path: str


@dataclass(frozen=True, slots=True)
class _Entry:
    """An index entry: where the one served copy of a blob is."""

    pack: int
    offset: int
    record_len: int
    size: int
    stored_size: int
    compression: int
    touched: float

    def encode(self) -> bytes:
        return _ENTRY.pack(
            self.pack, self.offset, self.record_len, self.size, self.stored_size, self.compression, self.touched
        )

    @staticmethod
    def decode(raw: bytes) -> _Entry:
        if len(raw) != _ENTRY.size:
            raise PackInvariantError(f"index entry of {len(raw)} bytes, expected {_ENTRY.size}")
        e = _Entry(*_ENTRY.unpack(raw))
        if e.record_len != HEADER_BYTES + e.stored_size or e.compression not in COMPRESSION_NAMES:
            raise PackInvariantError(f"inconsistent index entry {e}")
        return e

    def same_copy(self, other: _Entry | None) -> bool:
        return other is not None and (self.pack, self.offset) == (other.pack, other.offset)

    def matches(self, h: bytes, hdr: RecordHeader) -> bool:
        return (
            hdr.hash == h
            and hdr.size == self.size
            and hdr.stored_len == self.stored_size
            and hdr.compression == self.compression
        )


def _blob_key(h: bytes) -> bytes:
    return _KEY_BLOB + h


class _Corrupt(Exception):
    """A copy failed a check (internal: turned into quarantine + BlobCorrupt)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- small I/O helpers ---------------------------------------------------------------


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes")
        view = view[n:]
        offset += n


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Up to n bytes at offset (fewer only at end of file)."""
    out = os.pread(fd, n, offset)
    if len(out) == n or not out:
        return out
    parts = [out]
    got = len(out)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _Region:
    """A read-only file-like view of [start, start+length) of a file, computing
    the crc32c of every byte handed out (the source of zstd's stream_reader)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self._fd = fd
        self._pos = start
        self._left = length
        self.crc = 0
        self.short = False

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > api.CHUNK_BYTES:
            n = api.CHUNK_BYTES
        n = min(n, self._left)
        if n == 0:
            return b""
        piece = _pread_exact(self._fd, n, self._pos)
        if len(piece) < n:
            self.short = True
            self._left = 0
        else:
            self._left -= n
        self._pos += len(piece)
        self.crc = _crc(piece, self.crc)
        return piece

    def drain(self) -> None:
        while self.read(api.CHUNK_BYTES):
            pass


class _CrcWriter:
    """Writes to a file descriptor, counting bytes and their crc32c (the sink
    of zstd's stream_writer in put_file)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.n = 0
        self.crc = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        while view:
            k = os.write(self._fd, view)
            if k <= 0:
                raise OSError(f"write wrote {k} bytes")
            view = view[k:]
        self.crc = _crc(data, self.crc)
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _content_pieces(region: _Region, compression: int, size: int) -> Iterator[bytes]:
    """The content of a record in pieces of at most CHUNK_BYTES, decompressing
    as it goes; raises _Corrupt if it does not decode to exactly `size` bytes."""
    n = 0
    if compression == COMPRESSION_NONE:
        while piece := region.read(api.CHUNK_BYTES):
            n += len(piece)
            yield piece
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], region), read_size=api.CHUNK_BYTES, closefd=False
        )
        try:
            while True:
                try:
                    piece = reader.read(api.CHUNK_BYTES)
                except zstandard.ZstdError as exc:
                    raise _Corrupt(f"zstd: {exc}") from None
                if not piece:
                    break
                n += len(piece)
                if n > size:
                    raise _Corrupt("record decompresses to more than its size")
                yield piece
        finally:
            _close(reader)
    if n != size:
        raise _Corrupt(f"record content is {n} bytes, header says {size}")


def _check_stored(fd: int, offset: int, hdr: RecordHeader, content: bool) -> str:
    """Stream through a record's stored bytes: crc32c always, and with
    `content` also decompression and SHA-256. '' if it all holds."""
    region = _Region(fd, offset + HEADER_BYTES, hdr.stored_len)
    problem = ""
    sha = hashlib.sha256()
    if content:
        try:
            for piece in _content_pieces(region, hdr.compression, hdr.size):
                sha.update(piece)
        except _Corrupt as exc:
            problem = exc.reason
    region.drain()
    # A crc failure is the most specific diagnosis, so it wins.
    if region.short:
        return "record runs past the end of the pack"
    if region.crc != hdr.data_crc:
        return "stored bytes fail their crc32c"
    if problem:
        return problem
    if content and sha.digest() != hdr.hash:
        return "content does not match its SHA-256"
    return ""


def _read_header(fd: int, offset: int) -> tuple[RecordHeader | None, bytes]:
    raw = _pread_exact(fd, HEADER_BYTES, offset)
    return decode_header(raw), raw


class _PackScanner:
    """Walks a pack's records from `start`, yielding (offset, header) of each
    valid one; `check_content` also verifies stored crc, decompression and
    hash (recovery), else only headers (compaction, which crc-checks as it
    copies). Afterwards `valid_end` is the end of the last valid record and
    `corrupt` the skipped regions."""

    def __init__(self, fd: int, start: int, size: int, check_content: bool) -> None:
        self._fd = fd
        self.start = start
        self.size = size
        self._check = check_content
        self.valid_end = start
        self.corrupt: builtins.list[tuple[int, int]] = []

    def _record_ok(self, off: int, hdr: RecordHeader) -> bool:
        if off + hdr.record_len > self.size:
            return False
        return not self._check or not _check_stored(self._fd, off, hdr, content=True)

    def _resync(self, pos: int) -> int | None:
        """The offset of the next valid record at or after pos, if any."""
        overlap = len(MAGIC) - 1
        while pos + HEADER_BYTES <= self.size:
            chunk = _pread_exact(self._fd, min(RESYNC_READ_BYTES, self.size - pos), pos)
            i = chunk.find(MAGIC)
            while i != -1:
                cand = pos + i
                hdr, _ = _read_header(self._fd, cand)
                if hdr is not None and self._record_ok(cand, hdr):
                    return cand
                i = chunk.find(MAGIC, i + 1)
            if len(chunk) <= overlap:
                return None
            pos += len(chunk) - overlap
        return None

    def records(self) -> Iterator[tuple[int, RecordHeader]]:
        off = self.start
        while off < self.size:
            hdr, _ = _read_header(self._fd, off)
            if hdr is not None and off + hdr.record_len > self.size:
                break  # runs past the end: a torn tail, nothing valid can follow
            if hdr is None:
                nxt = self._resync(off + 1)
                if nxt is None:
                    break
                self.corrupt.append((off, nxt))
                off = nxt
                continue
            if not self._record_ok(off, hdr):
                self.corrupt.append((off, off + hdr.record_len))
                off += hdr.record_len
                continue
            yield off, hdr
            off += hdr.record_len
            self.valid_end = off

    def corrupt_before_end(self) -> int:
        """Skipped regions that lie before the last valid record (mid-pack)."""
        return sum(1 for _, end in self.corrupt if end <= self.valid_end)


# --- the writer's unit of work ----------------------------------------------------------

_PUT: Final = 1
_MOVE: Final = 2


@dataclass(slots=True, eq=False)
class _Request:
    kind: int
    h: bytes
    nbytes: int  # record bytes this request may append (batch bound)
    data: bytes | None = None  # PUT: the content, to encode late if the blob vanished
    header: RecordHeader | None = None  # PUT: the encoded record's header
    stored: bytes | None = None  # PUT from memory: the stored bytes
    src_path: str | None = None  # PUT from put_file: temp file holding the stored bytes
    move_from: _Entry | None = None  # MOVE: the copy to move
    done: threading.Event = field(default_factory=threading.Event)
    result: bool = False
    error: BaseException | None = None


class _Txn:
    """Index changes being prepared under the index lock: `base` is what the
    index held before, `overlay` what it will hold (None = absent)."""

    __slots__ = ("_load", "base", "overlay")

    def __init__(self, load: Callable[[bytes], _Entry | None]) -> None:
        self._load = load
        self.base: dict[bytes, _Entry | None] = {}
        self.overlay: dict[bytes, _Entry | None] = {}

    def get(self, h: bytes) -> _Entry | None:
        if h in self.overlay:
            return self.overlay[h]
        if h not in self.base:
            self.base[h] = self._load(h)
        return self.base[h]

    def set(self, h: bytes, e: _Entry | None) -> None:
        self.get(h)
        self.overlay[h] = e


_tls = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """A per-thread compressor (ZstdCompressor is not safe to share)."""
    cctx = getattr(_tls, "cctx", None)
    if cctx is None:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        _tls.cctx = cctx
    return cast(zstandard.ZstdCompressor, cctx)


def _pays(size: int, stored: int) -> bool:
    return size > 0 and COMPRESSION_GAIN_MIN_DIVISOR * (size - stored) >= size


# A put of content already stored re-verifies the stored copy first when it is
# at most this big (larger ones are trusted to the scrubber).
DEDUP_VERIFY_BYTES_MAX = 4 * 1024 * 1024
# encode_blob tries zstd on a sample this big before compressing a large blob.
COMPRESSION_SAMPLE_BYTES = 64 * 1024
# A zstd frame from elsewhere may be at most this much longer than its content
# (zstd's worst case for incompressible input is far less; encode_blob never
# keeps a frame that does not save 10%).
COMPRESSED_OVERHEAD_MAX = 1024


def encode_blob(data: bytes, h: bytes) -> tuple[RecordHeader, bytes]:
    """The record header and stored bytes for `data` (zstd if it pays)."""
    stored = data
    compression = COMPRESSION_NONE
    if len(data) > 2 * COMPRESSION_SAMPLE_BYTES:
        # Try a sample from the middle first: content that does not compress
        # (random, encrypted, already compressed) then costs 1/16 of a full
        # attempt. A sample that pays says nothing final; the whole is tried.
        mid = len(data) // 2
        sample = data[mid:mid + COMPRESSION_SAMPLE_BYTES]
        if not _pays(len(sample), len(_compressor().compress(sample))):
            return RecordHeader(compression, h, len(data), len(stored), _crc(stored)), stored
    if data:
        z = _compressor().compress(data)
        if _pays(len(data), len(z)):
            stored, compression = z, COMPRESSION_ZSTD
    return RecordHeader(compression, h, len(data), len(stored), _crc(stored)), stored


@dataclass(frozen=True, slots=True)
class EncodedBlob:
    """A blob as a record's payload: `stored` is its content (compression
    COMPRESSION_NONE) or one zstd frame of it (COMPRESSION_ZSTD), `size` the
    content's length. A coordinator encodes a blob once and ships this to
    every replica (LocalStore.put_many_encoded, PutMany's `compression`), so
    compressible data is compressed once, not by each replica, and crosses
    the network compressed."""

    hash: bytes
    size: int
    compression: int
    stored: bytes

    @staticmethod
    def of(data: bytes, h: bytes) -> EncodedBlob:
        """Encoded as a store would (zstd when it pays)."""
        hdr, stored = encode_blob(data, h)
        return EncodedBlob(h, hdr.size, hdr.compression, stored)


def check_encoded(b: EncodedBlob, verified: bool) -> RecordHeader:
    """The record header for an encoded blob from elsewhere, once its fields
    are sane and (unless the caller has just encoded it itself) its content
    decodes to exactly `size` bytes whose SHA-256 is its hash."""
    api.check_hash(b.hash)
    if not 0 <= b.size <= api.BLOB_BYTES_MAX:
        raise InvalidBlob(f"blob of {b.size} bytes outside [0, {api.BLOB_BYTES_MAX}]")
    stored = b.stored
    if b.compression == COMPRESSION_NONE:
        if len(stored) != b.size:
            raise InvalidBlob(f"an uncompressed blob of {len(stored)} bytes declared {b.size}")
        if not verified and api.blob_hash(stored) != b.hash:
            raise InvalidBlob("data does not match its hash")
    elif b.compression == COMPRESSION_ZSTD:
        if len(stored) > b.size + COMPRESSED_OVERHEAD_MAX:
            raise InvalidBlob(f"a zstd frame of {len(stored)} bytes for {b.size} bytes of content")
        if not verified:
            try:
                content = zstandard.ZstdDecompressor().decompress(stored, max_output_size=b.size,
                                                                  allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise InvalidBlob(f"the zstd frame does not decode: {exc}") from None
            if len(content) != b.size or api.blob_hash(content) != b.hash:
                raise InvalidBlob("the decoded content does not match its size and hash")
    else:
        raise InvalidBlob(f"unknown compression {b.compression}")
    return RecordHeader(b.compression, b.hash, b.size, len(stored), _crc(stored))


class BlobStream:
    """The content pieces of one blob read; owns a file descriptor, closed when
    the pieces run out, on close(), or when the stream is collected."""

    def __init__(self, fd: int, pieces: Iterator[bytes]) -> None:
        self._fd = fd
        self._pieces = pieces

    def __iter__(self) -> BlobStream:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._pieces)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalStore:
    """One node's blob store (satisfies api.Replica). Thread-safe."""

    # A whole-blob get() checks the content's SHA-256 against the hash asked
    # for (see Reads above), so a coordinator reading its own copy need not
    # hash it again (api.Replica).
    checks_content_hash: Final = True

    def __init__(
        self,
        directory: str,
        node_id: str = "local",
        *,
        pack_max_bytes: int = 256 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if pack_max_bytes < HEADER_BYTES:
            raise ValueError(f"pack_max_bytes must be at least {HEADER_BYTES}")
        self.node_id = node_id
        self.directory = directory
        self.pack_max_bytes = pack_max_bytes
        self._clock = clock
        self._packs_dir = os.path.join(directory, "packs")
        self._tmp_dir = os.path.join(directory, "tmp")
        self._index_dir = os.path.join(directory, "index")
        for d in (directory, self._packs_dir, self._tmp_dir):
            os.makedirs(d, exist_ok=True)
        durable.sync_dir(directory)
        for name in os.listdir(self._tmp_dir):  # temp files of put_file calls a crash interrupted
            os.unlink(os.path.join(self._tmp_dir, name))

        # _mu guards every index change and the space accounting below; the
        # writer holds it for a whole batch. Reads of the index need no lock.
        self._mu = threading.Lock()
        self._ctr_mu = threading.Lock()
        self._compact_mu = threading.Lock()
        self._q_cv = threading.Condition(threading.Lock())
        self._queue: deque[_Request] = deque()
        self._closing = False
        self._closed = False
        self._failed: StoreFailed | None = None
        self._ctr: dict[str, int] = dict.fromkeys(
            (
                "puts", "dedup_hits", "gets", "deletes", "touches", "corrupt_found", "compactions",
                "torn_tails_cut", "syncs", "index_syncs", "batches", "moves", "rebuilds",
            ),
            0,
        )  # fmt: skip
        # Space accounting: pack id -> file size / live record bytes; blob totals.
        self._sizes: dict[int, int] = {}
        self._live: dict[int, int] = {}
        self._blobs = 0
        self._bytes = 0
        self._stored = 0
        # The pack being appended to; only the writer thread touches these
        # after open (under _mu).
        self._cur_id = 0
        self._cur_fd = -1
        self._end = 0
        self._dirty_from = 0
        self._dirty = False

        self._rebuilding = False
        self._db = self._open_index()
        try:
            self._recover()
        except BaseException:
            self._db.close()
            if self._cur_fd >= 0:
                os.close(self._cur_fd)
            raise
        self._writer = threading.Thread(target=self._writer_main, name=f"floe-pack-writer-{node_id}", daemon=True)
        self._writer.start()

    # --- public API -----------------------------------------------------------------

    @property
    def syncs(self) -> int:
        """Pack fsyncs so far (kv.durable.sync_file calls on pack files)."""
        with self._ctr_mu:
            return self._ctr["syncs"]

    def put(self, data: bytes, h: bytes, *, verified: bool = False) -> bool:
        """Store `data` (SHA-256 = h) durably. Returns after the record and its
        index entry are synced (group commit, see the module docstring); True
        if the blob was already here (its touched time is reset, durably).
        verified=True: the caller has just checked SHA-256(data) == h itself
        (the coordinator does, objstore/cluster.py), so it is not hashed twice."""
        data = _checked_put(data, h, verified)
        self._check_writable()
        req = self._put_request(data, h)
        self._submit([req])
        return req.result

    def put_many(self, items: Sequence[tuple[bytes, bytes]], *, verified: bool = False) -> builtins.list[bool]:
        """put() of every (data, hash) pair, committed together: all requests
        reach the writer's queue at once, so they share one group commit (one
        pack fsync and one synced index batch) whenever they fit in one batch
        (BATCH_REQUESTS_MAX / BATCH_BYTES_MAX; more take several, in order).
        Per blob the rules of put(): hash, size and (unless verified) content
        are checked for every item before anything is queued, so one bad item
        stores nothing; compression is decided per blob; the result is True
        where the blob was already here, an earlier item of the same call
        included. A volume flush stores its segments' blobs this way, one
        round instead of one per blob. If the writer fails part way the error
        is raised and some items may be stored (harmless, as for put)."""
        checked = [(_checked_put(data, h, verified), h) for data, h in items]
        if not checked:
            return []
        self._check_writable()
        reqs = [self._put_request(data, h) for data, h in checked]
        self._submit(reqs)
        return [r.result for r in reqs]

    def put_many_encoded(self, items: Sequence[EncodedBlob], *, verified: bool = False) -> builtins.list[bool]:
        """put_many() of blobs already encoded as record payloads (a
        coordinator encoded them once for every replica): stored as given.
        Unless `verified` (the caller encoded them itself, just now), each is
        decoded and its size and SHA-256 checked first; one bad item stores
        nothing."""
        items = [b if isinstance(b.stored, bytes) else replace(b, stored=bytes(b.stored)) for b in items]
        headers = [check_encoded(b, verified) for b in items]
        if not headers:
            return []
        self._check_writable()
        reqs: builtins.list[_Request] = []
        for b, hdr in zip(items, headers, strict=True):
            self._count("puts")
            self._dedup_copy(b.hash)  # a bad copy is quarantined: the writer then writes this one
            reqs.append(_Request(_PUT, b.hash, nbytes=hdr.record_len, header=hdr, stored=b.stored))
        self._submit(reqs)
        return [r.result for r in reqs]

    def _put_request(self, data: bytes, h: bytes) -> _Request:
        """The writer request for a checked put: the record is encoded here,
        in the caller's thread, unless the blob looks like a dedup."""
        self._count("puts")
        existing = self._dedup_copy(h)
        if existing is not None:
            # Probably a dedup: leave the encoding to the writer in the rare
            # case the blob is gone by the time it decides.
            req = _Request(_PUT, h, nbytes=HEADER_BYTES + len(data), data=data)
        else:
            hdr, stored = encode_blob(data, h)
            req = _Request(_PUT, h, nbytes=hdr.record_len, data=data, header=hdr, stored=stored)
        return req

    def put_file(self, f: BinaryIO, h: bytes, size: int) -> bool:
        """put() for exactly `size` bytes read from f, in bounded memory: the
        content is streamed through temp files in <dir>/tmp (raw and zstd),
        hashed on the way, and the writer copies the chosen one in pieces."""
        api.check_hash(h)
        if not 0 <= size <= api.BLOB_BYTES_MAX:
            raise InvalidBlob(f"blob of {size} bytes outside [0, {api.BLOB_BYTES_MAX}]")
        if size <= SMALL_BLOB_BYTES_MAX:
            data = _read_exact(f, size)
            if len(data) != size or f.read(1):
                raise InvalidBlob(f"the file does not hold exactly {size} bytes")
            return self.put(data, h)
        self._check_writable()
        raw_fd, raw_path = tempfile.mkstemp(dir=self._tmp_dir, prefix="put-", suffix=".raw")
        z_fd, z_path = tempfile.mkstemp(dir=self._tmp_dir, prefix="put-", suffix=".zst")
        try:
            raw = _CrcWriter(raw_fd)
            z = _CrcWriter(z_fd)
            sha = hashlib.sha256()
            zw = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(cast(IO[bytes], z), size=size, closefd=False)
            n = 0
            while n < size:
                piece = f.read(min(api.CHUNK_BYTES, size - n))
                if not piece:
                    raise InvalidBlob(f"the file ended after {n} of {size} bytes")
                sha.update(piece)
                raw.write(piece)
                zw.write(piece)
                n += len(piece)
            if f.read(1):
                raise InvalidBlob(f"the file holds more than {size} bytes")
            zw.flush(zstandard.FLUSH_FRAME)
            if sha.digest() != h:
                raise InvalidBlob("data does not match its hash")
            _close(zw)
            if raw.n != size:
                raise PackInvariantError(f"wrote {raw.n} bytes of a {size}-byte blob to the temp file")
            if _pays(size, z.n):
                chosen, path, comp = z, z_path, COMPRESSION_ZSTD
            else:
                chosen, path, comp = raw, raw_path, COMPRESSION_NONE
            hdr = RecordHeader(comp, h, size, chosen.n, chosen.crc)
            self._count("puts")
            req = _Request(_PUT, h, nbytes=hdr.record_len, header=hdr, src_path=path)
            self._submit([req])
            return req.result
        finally:
            os.close(raw_fd)
            os.close(z_fd)
            os.unlink(raw_path)
            os.unlink(z_path)

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> bytes:
        """Bytes [offset, offset+length) of the blob (length 0: to the end; a
        range past the end is cut short). Every byte is crc-checked first,
        and a whole-blob read is checked against h (SHA-256) too."""
        return self.get_range(h, offset, length)[0]

    def get_range(self, h: bytes, offset: int = 0, length: int = 0) -> tuple[bytes, int]:
        """(get(h, offset, length), the whole blob's size), both from the same
        copy: a ranged reader learns the size without a second lookup."""
        api.check_hash(h)
        _check_range(offset, length)
        self._count("gets")

        def read(fd: int, e: _Entry) -> tuple[bytes, int]:
            start, end = _clamp(e, offset, length)
            if e.size <= SMALL_BLOB_BYTES_MAX:
                return self._read_small(fd, e, h, start, end), e.size
            whole = start == 0 and end == e.size
            self._verify_copy(fd, e, h, content=whole)
            return b"".join(self._iter_range(fd, e, h, start, end, whole)), e.size

        return self._on_copy(h, read)

    def read_iter(
        self, h: bytes, offset: int = 0, length: int = 0, chunk: int = api.CHUNK_BYTES
    ) -> tuple[int, Iterator[bytes]]:
        """(blob size, pieces of at most `chunk` bytes of the range). The copy
        is verified (crc; SHA-256 too when the whole blob is asked for) before
        this returns; the pieces are then streamed from disk in bounded memory.
        Close the iterator (or exhaust it) to release its file descriptor."""
        api.check_hash(h)
        _check_range(offset, length)
        if not 0 < chunk <= api.CHUNK_BYTES:
            raise InvalidBlob(f"chunk must be in (0, {api.CHUNK_BYTES}]")
        self._count("gets")

        def open_stream(fd: int, e: _Entry) -> tuple[int, Iterator[bytes]]:
            start, end = _clamp(e, offset, length)
            if e.size <= SMALL_BLOB_BYTES_MAX:
                data = self._read_small(fd, e, h, start, end)
                return e.size, BlobStream(-1, (data[i : i + chunk] for i in range(0, len(data), chunk)))
            whole = start == 0 and end == e.size
            self._verify_copy(fd, e, h, content=whole)
            own = os.dup(fd)
            return e.size, BlobStream(own, _rechunk(self._iter_range(own, e, h, start, end, whole), chunk))

        return self._on_copy(h, open_stream)

    def has(self, hashes: Iterable[bytes]) -> builtins.list[bool]:
        self._check_open()
        hs = builtins.list(hashes)
        if len(hs) > api.HAS_BATCH_MAX:
            raise InvalidBlob(f"has() takes at most {api.HAS_BATCH_MAX} hashes")
        out = []
        for h in hs:
            api.check_hash(h)
            out.append(self._db.get(_blob_key(h)) is not None)
        return out

    def touch(self, h: bytes) -> bool:
        """Reset the blob's age (durably); False if it is not here."""
        api.check_hash(h)
        self._check_writable()
        with self._mu:
            txn = self._txn()
            e = txn.get(h)
            if e is None:
                return False
            txn.set(h, replace(e, touched=self._clock()))
            self._commit_txn(txn, sync=True)
        self._count("touches")
        return True

    def delete(self, h: bytes, min_age_s: float = 0.0) -> bool:
        """Drop the blob if its age (since written or touched) is more than
        min_age_s (min_age_s 0: unconditionally). True if it was deleted. The
        index write is not synced: a delete lost to a power failure only
        brings back garbage that the next GC sweep deletes again."""
        api.check_hash(h)
        self._check_writable()
        with self._mu:
            txn = self._txn()
            e = txn.get(h)
            if e is None:
                return False
            if min_age_s > 0 and self._clock() - e.touched <= min_age_s:
                return False
            txn.set(h, None)
            self._commit_txn(txn, sync=False)
        self._count("deletes")
        return True

    def list(self, after: bytes = b"", limit: int = 1000) -> builtins.list[BlobInfo]:
        """Blobs in hash order strictly after `after`, at most
        min(limit, LIST_LIMIT_MAX) of them."""
        self._check_open()
        limit = min(limit, api.LIST_LIMIT_MAX)
        out: builtins.list[BlobInfo] = []
        if limit <= 0:
            return out
        now = self._clock()
        with self._db.iterator(start=_blob_key(after), stop=_KEY_BLOB_END) as it:
            for key, value in it:
                h = bytes(key[len(_KEY_BLOB) :])
                if h == after:
                    continue
                out.append(_info(h, _Entry.decode(value), now))
                if len(out) >= limit:
                    break
        return out

    def info(self, h: bytes) -> BlobInfo | None:
        api.check_hash(h)
        self._check_open()
        e = self._load_entry(h)
        return None if e is None else _info(h, e, self._clock())

    def locate(self, h: bytes) -> RecordLocation | None:
        """Where the served copy of h is on disk."""
        api.check_hash(h)
        e = self._load_entry(h)
        return None if e is None else RecordLocation(e.pack, e.offset, e.record_len, self._pack_path(e.pack))

    def verify(self, h: bytes) -> VerifyResult:
        """Check the copy end to end: header, crc32c, decompression, SHA-256.
        A failing copy is quarantined."""
        api.check_hash(h)

        def check(fd: int, e: _Entry) -> VerifyResult:
            self._verify_copy(fd, e, h, content=True)
            return VerifyResult(present=True, verified=True, info=_info(h, e, self._clock()))

        e0 = self._load_entry(h)
        if e0 is None:
            return VerifyResult(present=False, verified=False, info=None, error="not present")
        try:
            return self._on_copy(h, check)
        except BlobNotFound:
            return VerifyResult(present=False, verified=False, info=None, error="not present")
        except BlobCorrupt as exc:
            return VerifyResult(present=True, verified=False, info=_info(h, e0, self._clock()), error=str(exc))

    def _dedup_copy(self, h: bytes) -> _Entry | None:
        """The indexed copy a put of h would dedup onto, or None. A dedup counts
        as a durable copy (the coordinator counts it toward W), so the copy it
        relies on must be good: it is checked now, and a bad one quarantined
        (a fresh record is then written). The record's header and crc32c catch
        rot; its content hash was checked when it was written, so it is not
        decompressed and hashed again here (the same content put again and
        again, a guest writing one pattern, paid a full verify per put)."""
        existing = self._load_entry(h)
        if existing is not None and existing.stored_size <= DEDUP_VERIFY_BYTES_MAX \
                and not self._stored_copy_ok(h):
            return None
        return existing

    def _stored_copy_ok(self, h: bytes) -> bool:
        """The copy's header and crc32c hold (a failing copy is quarantined)."""

        def check(fd: int, e: _Entry) -> bool:
            self._verify_copy(fd, e, h, content=False)
            return True

        try:
            return self._on_copy(h, check)
        except (BlobNotFound, BlobCorrupt):
            return False

    def stats(self) -> dict[str, int]:
        with self._mu:
            out = {
                "blobs": self._blobs,
                "bytes": self._bytes,
                "stored_bytes": self._stored,
                "pack_bytes": sum(self._sizes.values()),
                "packs": len(self._sizes),
                "dead_bytes": sum(self._sizes[p] - self._live[p] for p in self._sizes),
                "queued": len(self._queue),
            }
        with self._ctr_mu:
            out.update(self._ctr)
        return out

    def compact(self, dead_fraction: float = 0.5) -> int:
        """Rewrite every sealed pack whose dead bytes are at least
        `dead_fraction` of its size; returns how many packs were rewritten
        (and unlinked). Reads and puts go on meanwhile."""
        if not 0.0 <= dead_fraction <= 1.0:
            raise ValueError("dead_fraction must be in [0, 1]")
        self._check_writable()
        with self._compact_mu:
            with self._mu:
                candidates = [
                    pid
                    for pid, size in sorted(self._sizes.items())
                    if pid != self._cur_id and (size == 0 or size - self._live[pid] >= dead_fraction * size)
                ]
            done = sum(1 for pid in candidates if self._compact_pack(pid))
        self._count("compactions", done)
        return done

    def close(self) -> None:
        """Stop the writer (after it has finished what is queued) and close the
        index. Writes nothing that was not already durable."""
        with self._q_cv:
            if self._closing:
                already = True
            else:
                already = False
                self._closing = True
                self._q_cv.notify_all()
        if already:
            self._writer.join()
            return
        self._writer.join()
        with self._mu:
            if self._cur_fd >= 0:
                os.close(self._cur_fd)
                self._cur_fd = -1
            self._db.close()
            self._closed = True

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------

    def _on_copy(self, h: bytes, fn: Callable[[int, _Entry], T]) -> T:
        """Run fn(fd, entry) on the indexed copy of h. If the copy fails a check
        it is quarantined and BlobCorrupt raised; if it moved under us
        (compaction) the lookup is repeated."""
        self._check_open()
        for _ in range(READ_ATTEMPTS_MAX):
            e = self._load_entry(h)
            if e is None:
                raise BlobNotFound(f"{h.hex()} not on {self.node_id}")
            try:
                fd = os.open(self._pack_path(e.pack), os.O_RDONLY)
            except FileNotFoundError:
                now = self._load_entry(h)
                if now is None:
                    raise BlobNotFound(f"{h.hex()} not on {self.node_id} (deleted while being read)") from None
                if not e.same_copy(now):
                    continue  # compaction moved it and unlinked the pack
                if self._quarantine(h, e, "pack file missing"):
                    raise BlobCorrupt(f"{h.hex()} on {self.node_id}: pack {e.pack} is missing") from None
                continue
            try:
                return fn(fd, e)
            except _Corrupt as exc:
                if self._quarantine(h, e, exc.reason):
                    raise BlobCorrupt(f"{h.hex()} on {self.node_id}: {exc.reason} (quarantined)") from None
            finally:
                os.close(fd)
        raise BlobError(f"{h.hex()} kept moving during {READ_ATTEMPTS_MAX} read attempts")

    def _check_header(self, fd: int, e: _Entry, h: bytes) -> RecordHeader:
        hdr, _ = _read_header(fd, e.offset)
        if hdr is None:
            raise _Corrupt("record header torn or corrupt")
        if not e.matches(h, hdr):
            raise _Corrupt("record header does not match the index entry")
        return hdr

    def _verify_copy(self, fd: int, e: _Entry, h: bytes, content: bool) -> None:
        hdr = self._check_header(fd, e, h)
        problem = _check_stored(fd, e.offset, hdr, content)
        if problem:
            raise _Corrupt(problem)

    def _read_small(self, fd: int, e: _Entry, h: bytes, start: int, end: int) -> bytes:
        """Read a record in one piece; check header and crc, and the SHA-256
        when the whole blob is asked for; return content[start:end]."""
        raw = _pread_exact(fd, e.record_len, e.offset)
        if len(raw) != e.record_len:
            raise _Corrupt("record runs past the end of the pack")
        hdr = decode_header(raw)
        if hdr is None:
            raise _Corrupt("record header torn or corrupt")
        if not e.matches(h, hdr):
            raise _Corrupt("record header does not match the index entry")
        stored = memoryview(raw)[HEADER_BYTES:]
        if _crc(stored) != hdr.data_crc:
            raise _Corrupt("stored bytes fail their crc32c")
        if hdr.compression == COMPRESSION_NONE:
            if start == 0 and end == e.size and api.blob_hash(stored) != h:
                raise _Corrupt("content does not match its SHA-256")
            return bytes(stored[start:end])
        try:
            content = zstandard.ZstdDecompressor().decompress(stored, max_output_size=hdr.size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise _Corrupt(f"zstd: {exc}") from None
        if len(content) != hdr.size:
            raise _Corrupt(f"record content is {len(content)} bytes, header says {hdr.size}")
        if start == 0 and end == e.size:
            if api.blob_hash(content) != h:
                raise _Corrupt("content does not match its SHA-256")
            return content
        return content[start:end]

    def _iter_range(self, fd: int, e: _Entry, h: bytes, start: int, end: int, whole: bool) -> Iterator[bytes]:
        """Pass two of a large read: the content pieces in [start, end). The
        copy was verified just before; for a whole-blob read the SHA-256 is
        computed again and a difference (the disk changed under us) ends the
        stream with BlobCorrupt rather than a quiet success."""
        if e.compression == COMPRESSION_NONE:
            region = _Region(fd, e.offset + HEADER_BYTES + start, end - start)
            pieces: Iterator[bytes] = iter(lambda: region.read(api.CHUNK_BYTES), b"")
            skip = 0
        else:
            region = _Region(fd, e.offset + HEADER_BYTES, e.stored_size)
            pieces = _content_pieces(region, e.compression, e.size)
            skip = start
        sha = hashlib.sha256()
        pos = 0
        want = end - start
        try:
            for piece in pieces:
                if skip:
                    if len(piece) <= skip:
                        skip -= len(piece)
                        continue
                    piece = piece[skip:]
                    skip = 0
                if pos + len(piece) > want:
                    piece = piece[: want - pos]
                if whole:
                    sha.update(piece)
                pos += len(piece)
                if piece:
                    yield piece
                if pos >= want:
                    break
        except _Corrupt as exc:
            self._quarantine(h, e, exc.reason)
            raise BlobCorrupt(f"{h.hex()} on {self.node_id}: {exc.reason} (quarantined)") from None
        if pos != want or (whole and sha.digest() != h):
            self._quarantine(h, e, "copy changed between verification and read")
            raise BlobCorrupt(f"{h.hex()} on {self.node_id}: copy changed while being read (quarantined)")

    # --- the index ------------------------------------------------------------------

    def _load_entry(self, h: bytes) -> _Entry | None:
        raw = self._db.get(_blob_key(h))
        return None if raw is None else _Entry.decode(raw)

    def _txn(self) -> _Txn:
        return _Txn(self._load_entry)

    def _commit_txn(self, txn: _Txn, sync: bool, checkpoint: tuple[int, int] | None = None) -> None:
        """Write a transaction's changes (and the checkpoint) in one LevelDB
        batch, then apply them to the space accounting. Caller holds _mu."""
        wb = self._db.write_batch(sync=sync)
        for h, e in txn.overlay.items():
            if e is None:
                if txn.base[h] is not None:
                    wb.delete(_blob_key(h))
            else:
                wb.put(_blob_key(h), e.encode())
        if checkpoint is not None:
            wb.put(_KEY_CHECKPOINT, _CHECKPOINT.pack(*checkpoint))
        wb.write()
        if sync:
            self._count("index_syncs")
        for h, e in txn.overlay.items():
            old = txn.base[h]
            if old is not None:
                self._account(old, -1)
            if e is not None:
                self._account(e, +1)

    def _account(self, e: _Entry, sign: int) -> None:
        self._blobs += sign
        self._bytes += sign * e.size
        self._stored += sign * e.stored_size
        if e.pack not in self._live:
            if sign > 0:
                raise PackInvariantError(f"index entry into unknown pack {e.pack}")
            return  # dropping an entry whose pack vanished
        live = self._live[e.pack] + sign * e.record_len
        if not 0 <= live <= self._sizes[e.pack]:
            raise PackInvariantError(f"pack {e.pack}: live bytes {live} outside [0, {self._sizes[e.pack]}]")
        self._live[e.pack] = live

    def _quarantine(self, h: bytes, e: _Entry, reason: str) -> bool:
        """Set a failing copy aside: drop its index entry (synced) so it is
        never served again. False if the entry names another copy by now (it
        moved: the caller should read that one)."""
        with self._mu:
            txn = self._txn()
            cur = txn.get(h)
            if cur is None:
                return True  # already set aside (or deleted) by someone else
            if not e.same_copy(cur):
                return False
            txn.set(h, None)
            self._commit_txn(txn, sync=True)
        self._count("corrupt_found")
        log.error(
            "blob_quarantined node=%s hash=%s pack=%d offset=%d reason=%r",
            self.node_id, h.hex(), e.pack, e.offset, reason,
        )  # fmt: skip
        return True

    # --- the writer -------------------------------------------------------------------

    def _check_writable(self) -> None:
        failed = self._failed
        if failed is not None:
            raise StoreFailed(str(failed)) from failed.__cause__
        if self._closing:
            raise StoreClosed("store is closed")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("store is closed")

    def _submit(self, reqs: builtins.list[_Request]) -> None:
        """Queue requests for the writer and wait until each is durable (or failed)."""
        with self._q_cv:
            for r in reqs:
                while len(self._queue) >= QUEUE_REQUESTS_MAX and not self._closing and self._failed is None:
                    self._q_cv.wait()
                if self._failed is not None or self._closing:
                    self._check_writable()
                self._queue.append(r)
                self._q_cv.notify_all()
        for r in reqs:
            r.done.wait()
        for r in reqs:
            if r.error is not None:
                raise r.error

    def _take_batch(self) -> builtins.list[_Request]:
        with self._q_cv:
            while not self._queue and not self._closing:
                self._q_cv.wait()
            batch: builtins.list[_Request] = []
            nbytes = 0
            while self._queue and len(batch) < BATCH_REQUESTS_MAX:
                r = self._queue[0]
                if batch and nbytes + r.nbytes > BATCH_BYTES_MAX:
                    break
                batch.append(self._queue.popleft())
                nbytes += r.nbytes
            self._q_cv.notify_all()
            return batch

    def _writer_main(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return  # closing, and everything queued is done
            try:
                self._commit_batch(batch)
            except BaseException as exc:
                log.exception("pack_writer_failed node=%s pack=%d", self.node_id, self._cur_id)
                failure = StoreFailed(f"pack writer on {self.node_id} failed ({exc!r}); reopen the store")
                failure.__cause__ = exc
                with self._q_cv:
                    self._failed = failure
                    rest = builtins.list(self._queue)
                    self._queue.clear()
                    self._q_cv.notify_all()
                for r in batch + rest:
                    if not r.done.is_set():
                        r.error = failure
                        r.done.set()
                return
            for r in batch:
                r.done.set()

    def _commit_batch(self, batch: builtins.list[_Request]) -> None:
        """The group commit: append every record of the batch, sync the pack
        once, then write all index entries and the checkpoint in one synced
        LevelDB batch. Only after this returns are the puts woken."""
        now = self._clock()
        with self._mu:
            txn = self._txn()
            self._dirty_from = self._end
            for req in batch:
                try:
                    if req.kind == _PUT:
                        self._apply_put(req, txn, now)
                    else:
                        self._apply_move(req, txn)
                except (BlobError, _Corrupt) as exc:
                    req.error = exc if isinstance(exc, BlobError) else BlobError(exc.reason)
            if self._dirty:
                self._sync_current()
            if txn.overlay:
                self._commit_txn(txn, sync=True, checkpoint=(self._cur_id, self._end))
        self._count("batches")

    def _apply_put(self, req: _Request, txn: _Txn, now: float) -> None:
        cur = txn.get(req.h)
        if cur is not None:
            txn.set(req.h, replace(cur, touched=now))
            req.result = True
            self._count("dedup_hits")
            return
        if req.header is None:
            if req.data is None:
                raise PackInvariantError("put request without data or record")
            req.header, req.stored = encode_blob(req.data, req.h)
        hdr = req.header
        start = self._begin_record(hdr.record_len)
        header_bytes = hdr.encode()
        if req.stored is not None:
            if len(req.stored) != hdr.stored_len or _crc(req.stored) != hdr.data_crc:
                raise PackInvariantError("stored bytes do not match their header")
            _pwrite_all(self._cur_fd, header_bytes, start)
            _pwrite_all(self._cur_fd, req.stored, start + HEADER_BYTES)
        else:
            if req.src_path is None:
                raise PackInvariantError("put request without stored bytes")
            src = os.open(req.src_path, os.O_RDONLY)
            try:
                if not self._copy_in(src, 0, header_bytes, hdr, start):
                    raise BlobError("temp file changed before it was copied into the pack; put not applied")
            finally:
                os.close(src)
        self._end_record(start, hdr.record_len)
        txn.set(req.h, _Entry(self._cur_id, start, hdr.record_len, hdr.size, hdr.stored_len, hdr.compression, now))
        req.result = False

    def _apply_move(self, req: _Request, txn: _Txn) -> None:
        src = req.move_from
        if src is None:
            raise PackInvariantError("move request without a source")
        cur = txn.get(req.h)
        if cur is None or not src.same_copy(cur):
            return  # deleted, quarantined or re-pointed since compaction looked
        fd = os.open(self._pack_path(src.pack), os.O_RDONLY)
        start = -1
        try:
            hdr, header_bytes = _read_header(fd, src.offset)
            if hdr is not None and src.matches(req.h, hdr):
                start = self._begin_record(hdr.record_len)
                if self._copy_in(fd, src.offset + HEADER_BYTES, header_bytes, hdr, start):
                    self._end_record(start, hdr.record_len)
                else:
                    start = -1
        finally:
            os.close(fd)
        if start < 0:
            txn.set(req.h, None)  # quarantine: the copy is bad, do not carry it forward
            self._count("corrupt_found")
            log.error(
                "blob_quarantined node=%s hash=%s pack=%d offset=%d reason=%r",
                self.node_id, req.h.hex(), src.pack, src.offset, "failed its check while compaction moved it",
            )  # fmt: skip
            return
        # From `cur`, not `src`: a dedup touch since compaction looked must keep its age.
        txn.set(req.h, replace(cur, pack=self._cur_id, offset=start))
        req.result = True
        self._count("moves")

    def _copy_in(self, src_fd: int, src_off: int, header_bytes: bytes, hdr: RecordHeader, start: int) -> bool:
        """Write header_bytes at `start` of the current pack and copy the
        stored bytes after it in pieces, checking their crc. On a mismatch the
        pack is cut back to `start` and False returned."""
        _pwrite_all(self._cur_fd, header_bytes, start)
        crc = 0
        copied = 0
        while copied < hdr.stored_len:
            piece = _pread_exact(src_fd, min(api.CHUNK_BYTES, hdr.stored_len - copied), src_off + copied)
            if not piece:
                break
            crc = _crc(piece, crc)
            _pwrite_all(self._cur_fd, piece, start + HEADER_BYTES + copied)
            copied += len(piece)
        if copied == hdr.stored_len and crc == hdr.data_crc:
            return True
        os.ftruncate(self._cur_fd, start)
        return False

    def _begin_record(self, record_len: int) -> int:
        """Offset for the next record, rolling to a new pack if this one would
        pass pack_max_bytes (a lone record larger than that gets its own pack)."""
        if self._end > 0 and self._end + record_len > self.pack_max_bytes:
            if self._dirty:
                self._sync_current()  # so that only the last pack can have a torn tail
            os.close(self._cur_fd)
            self._cur_fd = -1
            self._open_current(self._cur_id + 1, create=True)
        self._dirty = True
        return self._end

    def _end_record(self, start: int, record_len: int) -> None:
        if start != self._end:
            raise PackInvariantError("records must be appended in order")
        self._end = start + record_len
        self._sizes[self._cur_id] = self._end

    def _sync_current(self) -> None:
        durable.sync_file(self._pack_path(self._cur_id), self._cur_fd, self._dirty_from, None)
        self._dirty = False
        self._dirty_from = self._end
        self._count("syncs")

    def _open_current(self, pack_id: int, create: bool) -> None:
        path = self._pack_path(pack_id)
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                durable.sync_file(path, fd, 0, 0)
                durable.sync_dir(self._packs_dir)
            except BaseException:
                os.close(fd)
                raise
            self._count("syncs")
            size = 0
            log.info("pack_created node=%s pack=%d", self.node_id, pack_id)
        else:
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
        self._cur_id = pack_id
        self._cur_fd = fd
        self._end = size
        self._dirty_from = size
        self._dirty = False
        self._sizes[pack_id] = size
        self._live.setdefault(pack_id, 0)

    def _pack_path(self, pack_id: int) -> str:
        return os.path.join(self._packs_dir, f"pack-{pack_id:06d}.dat")

    # --- compaction -----------------------------------------------------------------

    def _compact_pack(self, pid: int) -> bool:
        try:
            fd = os.open(self._pack_path(pid), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            scanner = _PackScanner(fd, 0, os.fstat(fd).st_size, check_content=False)
            group: builtins.list[_Request] = []
            group_bytes = 0
            for off, hdr in scanner.records():
                e = self._load_entry(hdr.hash)
                if e is None or (e.pack, e.offset) != (pid, off):
                    continue
                group.append(_Request(_MOVE, hdr.hash, nbytes=e.record_len, move_from=e))
                group_bytes += e.record_len
                if group_bytes >= MOVE_GROUP_BYTES_MAX or len(group) >= MOVE_GROUP_REQUESTS_MAX:
                    self._submit(group)
                    group, group_bytes = [], 0
            if group:
                self._submit(group)
        finally:
            os.close(fd)
        if self._retire(pid):
            return True
        # Something still points into the pack that the scan did not reach (a
        # record inside a region whose header is corrupt): move those by the
        # index instead; the writer checks each as it copies.
        stragglers = [_Request(_MOVE, h, nbytes=e.record_len, move_from=e) for h, e in self._entries_in(pid)]
        for i in range(0, len(stragglers), MOVE_GROUP_REQUESTS_MAX):
            self._submit(stragglers[i : i + MOVE_GROUP_REQUESTS_MAX])
        if self._retire(pid):
            return True
        log.warning("pack_not_compacted node=%s pack=%d reason=live_records_remain", self.node_id, pid)
        return False

    def _entries_in(self, pid: int) -> builtins.list[tuple[bytes, _Entry]]:
        out = []
        with self._db.iterator(prefix=_KEY_BLOB) as it:
            for key, value in it:
                e = _Entry.decode(value)
                if e.pack == pid:
                    out.append((bytes(key[len(_KEY_BLOB) :]), e))
                    if len(out) >= QUEUE_REQUESTS_MAX:
                        break
        return out

    def _retire(self, pid: int) -> bool:
        """Unlink a compacted pack once nothing in the index points into it."""
        with self._mu:
            if pid == self._cur_id:
                raise PackInvariantError("the current pack cannot be retired")
            if self._live.get(pid, 0) != 0:
                return False
            size = self._sizes.pop(pid, 0)
            self._live.pop(pid, None)
            os.unlink(self._pack_path(pid))
            durable.sync_dir(self._packs_dir)
        log.info("pack_compacted node=%s pack=%d bytes_reclaimed=%d", self.node_id, pid, size)
        return True

    # --- opening ------------------------------------------------------------------------

    def _open_index(self) -> plyvel.DB:
        """Open the index, or start an empty one to be rebuilt from the packs
        (self._rebuilding) when it is missing or damaged."""
        reason = ""
        if not os.path.isdir(self._index_dir):
            reason = "missing"
        elif not os.path.exists(os.path.join(self._index_dir, "CURRENT")):
            reason = "no CURRENT file (lost in a power failure)"
        else:
            try:
                db = plyvel.DB(self._index_dir, create_if_missing=False)
            except plyvel.CorruptionError as exc:
                reason = f"corrupt ({exc})"
            else:
                if db.get(_KEY_MARKER) == _INDEX_MARKER:
                    self._rebuilding = False
                    return db
                db.close()
                reason = "not completely built"
        if reason == "missing" and not self._list_pack_ids():
            log.info("pack_store_created node=%s dir=%s", self.node_id, self.directory)
        else:
            log.warning("pack_index_rebuild node=%s reason=%r", self.node_id, reason)
            self._count("rebuilds")
        shutil.rmtree(self._index_dir, ignore_errors=True)
        self._rebuilding = True
        return plyvel.DB(self._index_dir, create_if_missing=True, error_if_exists=True)

    def _list_pack_ids(self) -> builtins.list[int]:
        ids = []
        for name in os.listdir(self._packs_dir):
            m = _PACK_NAME.match(name)
            if m:
                ids.append(int(m.group(1)))
        return sorted(ids)

    def _recover(self) -> None:
        """Reconcile the index with the packs (see the module docstring)."""
        rebuild = self._rebuilding
        ckpt_pack, ckpt_off = 0, 0
        raw = None if rebuild else self._db.get(_KEY_CHECKPOINT)
        if raw is not None:
            ckpt_pack, ckpt_off = _CHECKPOINT.unpack(raw)
        ids = self._list_pack_ids()
        sizes = {pid: os.path.getsize(self._pack_path(pid)) for pid in ids}
        now = self._clock()
        scanned: builtins.list[tuple[int, int, builtins.list[tuple[int, RecordHeader]]]] = []
        for pid in ids:
            if pid < ckpt_pack:
                continue
            start = ckpt_off if pid == ckpt_pack else 0
            if start > sizes[pid]:
                log.warning("pack_shorter_than_checkpoint node=%s pack=%d size=%d", self.node_id, pid, sizes[pid])
                start = 0
            records, sizes[pid] = self._scan_for_recovery(pid, start, sizes[pid], is_last=pid == ids[-1])
            if rebuild:
                self._index_scanned(pid, records, now)  # nothing stale to drop first
            else:
                scanned.append((pid, start, records))
        if not rebuild:
            self._drop_stale(sizes, scanned)
            for pid, _, records in scanned:
                self._index_scanned(pid, records, now)
        self._sizes = sizes
        self._live = dict.fromkeys(sizes, 0)
        if ids and ids[-1] >= ckpt_pack:
            self._open_current(ids[-1], create=False)
        else:
            # No pack, or the checkpoint's pack is gone: start a fresh one
            # after every id ever used, so no name is reused.
            self._open_current(max([ckpt_pack, *ids]) + 1, create=True)
        wb = self._db.write_batch(sync=True)
        wb.put(_KEY_CHECKPOINT, _CHECKPOINT.pack(self._cur_id, self._end))
        wb.put(_KEY_MARKER, _INDEX_MARKER)
        wb.write()
        self._count("index_syncs")
        with self._db.iterator(prefix=_KEY_BLOB) as it:
            for _, value in it:
                self._account(_Entry.decode(value), +1)
        log.info(
            "pack_store_opened node=%s blobs=%d packs=%d rebuilt=%s torn_tails_cut=%d corrupt_found=%d",
            self.node_id, self._blobs, len(self._sizes), rebuild,
            self._ctr["torn_tails_cut"], self._ctr["corrupt_found"],
        )  # fmt: skip

    def _scan_for_recovery(
        self, pid: int, start: int, size: int, is_last: bool
    ) -> tuple[builtins.list[tuple[int, RecordHeader]], int]:
        """Scan pack `pid` from `start`; cut a torn tail if it is the last pack.
        Returns the valid records and the pack's size afterwards."""
        path = self._pack_path(pid)
        fd = os.open(path, os.O_RDWR if is_last else os.O_RDONLY)
        try:
            scanner = _PackScanner(fd, start, size, check_content=True)
            records = builtins.list(scanner.records())
            mid = scanner.corrupt_before_end()
            if mid:
                self._count("corrupt_found", mid)
                log.error("pack_corrupt_records_skipped node=%s pack=%d count=%d", self.node_id, pid, mid)
            if scanner.valid_end < size:
                if is_last:
                    os.ftruncate(fd, scanner.valid_end)
                    durable.sync_file(path, fd, scanner.valid_end, None)
                    self._count("syncs")
                    self._count("torn_tails_cut")
                    log.warning(
                        "pack_torn_tail_cut node=%s pack=%d from=%d to=%d",
                        self.node_id, pid, size, scanner.valid_end,
                    )  # fmt: skip
                    size = scanner.valid_end
                else:
                    # A sealed pack was synced whole before the next one was
                    # started, so a bad tail here is corruption, not a torn write.
                    self._count("corrupt_found")
                    log.error(
                        "pack_corrupt_tail node=%s pack=%d from=%d to=%d", self.node_id, pid, scanner.valid_end, size
                    )
            return records, size
        finally:
            os.close(fd)

    def _drop_stale(
        self, sizes: dict[int, int], scanned: builtins.list[tuple[int, int, builtins.list[tuple[int, RecordHeader]]]]
    ) -> None:
        """Drop index entries that point into a missing pack, past a pack's
        end, or into a scanned range where no valid record starts."""
        starts = {pid: start for pid, start, _ in scanned}
        valid = {(pid, off) for pid, _, records in scanned for off, _ in records}
        drops: builtins.list[bytes] = []
        with self._db.iterator(prefix=_KEY_BLOB) as it:
            for key, value in it:
                e = _Entry.decode(value)
                size = sizes.get(e.pack)
                if (
                    size is None
                    or e.offset + e.record_len > size
                    or (e.pack in starts and e.offset >= starts[e.pack] and (e.pack, e.offset) not in valid)
                ):
                    drops.append(bytes(key))
        if drops:
            log.warning("pack_index_entries_dropped node=%s count=%d", self.node_id, len(drops))
            for i in range(0, len(drops), RECOVERY_BATCH_ENTRIES):
                wb = self._db.write_batch()
                for key in drops[i : i + RECOVERY_BATCH_ENTRIES]:
                    wb.delete(key)
                wb.write()

    def _index_scanned(self, pid: int, records: builtins.list[tuple[int, RecordHeader]], now: float) -> None:
        """Index valid records of pack `pid` found by the scan that no entry
        names; a record whose hash is indexed elsewhere is a dead second copy."""
        pending: dict[bytes, bytes] = {}
        for off, hdr in records:
            key = _blob_key(hdr.hash)
            if key in pending or self._db.get(key) is not None:
                continue
            e = _Entry(pid, off, hdr.record_len, hdr.size, hdr.stored_len, hdr.compression, now)
            pending[key] = e.encode()
            if len(pending) >= RECOVERY_BATCH_ENTRIES:
                self._write_entries(pending)
        self._write_entries(pending)

    def _write_entries(self, pending: dict[bytes, bytes]) -> None:
        if pending:
            wb = self._db.write_batch()
            for key, value in pending.items():
                wb.put(key, value)
            wb.write()
            pending.clear()

    # --- counters -----------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._ctr_mu:
            self._ctr[name] += n


def _checked_put(data: bytes, h: bytes, verified: bool) -> bytes:
    """The data of a put, as bytes, once its hash, size and (unless the
    caller has just checked it) content hash are right."""
    api.check_hash(h)
    if len(data) > api.BLOB_BYTES_MAX:
        raise InvalidBlob(f"blob of {len(data)} bytes exceeds {api.BLOB_BYTES_MAX}")
    data = bytes(data)
    if not verified and api.blob_hash(data) != h:
        raise InvalidBlob("data does not match its hash")
    return data


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise InvalidBlob(f"bad range offset={offset} length={length}")


def _clamp(e: _Entry, offset: int, length: int) -> tuple[int, int]:
    if offset > e.size:
        raise InvalidBlob(f"offset {offset} past the end of a {e.size}-byte blob")
    end = e.size if length == 0 else min(e.size, offset + length)
    return offset, end


def _info(h: bytes, e: _Entry, now: float) -> BlobInfo:
    return BlobInfo(
        hash=h,
        size=e.size,
        stored_size=e.stored_size,
        compression=COMPRESSION_NAMES[e.compression],
        age_s=max(0.0, now - e.touched),
    )


def _close(stream: IO[bytes]) -> None:
    """Close a zstandard stream through the typed IO interface (the stubs
    leave its own close() untyped)."""
    stream.close()


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to n bytes from f (fewer only at its end), however it splits reads."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        piece = f.read(n - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _rechunk(pieces: Iterator[bytes], chunk: int) -> Iterator[bytes]:
    for piece in pieces:
        for i in range(0, len(piece), chunk):
            yield piece[i : i + chunk]
