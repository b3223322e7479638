"""The object tier's interfaces: what a replica offers, and the errors.

Everything above a single node's pack store (placement, the coordinator,
repair, scrub, GC) talks to replicas through `Replica`, so the same code runs
over an in-process `LocalStore` (tests) and over gRPC to another node
(objstore/remote.py). The pack store is one implementation of the storage
behind it; an S3 backend would be another (DESIGN.md §4).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

HASH_BYTES = 32
# The largest blob the tier accepts. Volumes write at most one 1 MiB segment
# per blob; the margin is for operators' `floe blob put`.
BLOB_BYTES_MAX = 64 * 1024 * 1024
# Data pieces on the wire (gRPC messages) and in streaming reads.
CHUNK_BYTES = 256 * 1024
# PutSmall/GetSmall carry a blob (range) of at most this in one message.
SMALL_BYTES_MAX = 1024 * 1024
# PutMany carries at most this many blobs (each at most SMALL_BYTES_MAX) and
# this many data bytes in one message. 256 blobs covers the small blobs of a
# volume flush in one call; 4 MiB is four 1 MiB segments, the same as the
# service's in-memory put bound, so one call holds no more than a Put may.
PUT_MANY_BLOBS_MAX = 256
PUT_MANY_BYTES_MAX = 4 * 1024 * 1024
# Has() and List() page sizes.
HAS_BATCH_MAX = 4096
LIST_LIMIT_MAX = 4096


def blob_hash(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def check_hash(h: bytes) -> None:
    if not isinstance(h, bytes | bytearray) or len(h) != HASH_BYTES:
        raise InvalidBlob(f"a blob hash is {HASH_BYTES} bytes (SHA-256), got {len(h) if h is not None else 0}")


class BlobError(Exception):
    """Base of the object tier's errors."""


class BlobNotFound(BlobError):
    """No (readable) copy of the blob where it was looked for."""


class BlobCorrupt(BlobError):
    """A stored copy failed its checksum or its content hash; it is never served."""


class InvalidBlob(BlobError):
    """The request itself is wrong: bad hash length, data not matching its hash, too large."""


class ReplicaUnavailable(BlobError):
    """A replica could not be reached or did not answer in time."""


class NotEnoughReplicas(BlobError):
    """Fewer than W replicas acknowledged a put; the put did not succeed."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    hash: bytes
    size: int            # uncompressed bytes
    stored_size: int     # bytes of the stored record's payload
    compression: str     # "none" or "zstd"
    age_s: float         # seconds since the copy was written or last touched


@dataclass(frozen=True, slots=True)
class VerifyResult:
    present: bool
    verified: bool
    info: BlobInfo | None
    error: str = ""


class Replica(Protocol):
    """One node's copy store, local or remote.

    What a read verifies: every get checks the stored record's checksum
    (crc32c over the whole record, so a range read catches a flip anywhere in
    it) before returning a byte. Only a whole-blob read can be checked
    against the content hash; the coordinator does that as the reader
    (DESIGN.md §4), and a replica whose whole-blob get already checks
    SHA-256(content) == h itself says so with a class attribute
    `checks_content_hash = True` (the pack store does), so its own node does
    not hash the blob twice. A range read is not hashed: hashing would need
    the whole blob, and DESIGN.md §5 has volumes fetch only the ranges they
    need; the record crc32c is what protects it.

    Simple replicas (test fakes) may implement only put and get: callers use
    the module functions put_many() and get_range(), which fall back to them.
    """

    node_id: str

    def put(self, data: bytes, h: bytes) -> bool:
        """Store `data` (whose SHA-256 is h) durably; returns True if it was
        already there (its age is reset either way). Raises InvalidBlob when
        the data does not match h."""
        ...

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """put() of every (data, hash) pair, durable together (one group
        commit when they fit one); per blob True if it was already there.
        Raises InvalidBlob if any pair is wrong (then nothing is stored)."""
        ...

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> bytes:
        """The byte range [offset, offset+length) (length 0 = to the end) of
        the blob, from a copy whose record checksum held. Raises BlobNotFound,
        BlobCorrupt (and the copy is set aside, never served again)."""
        ...

    def get_range(self, h: bytes, offset: int = 0, length: int = 0) -> tuple[bytes, int]:
        """(get(h, offset, length), the whole blob's size), from one copy."""
        ...

    def has(self, hashes: Iterable[bytes]) -> list[bool]: ...

    def delete(self, h: bytes, min_age_s: float = 0.0) -> bool:
        """Delete the copy if it is older than min_age_s; True if deleted."""
        ...

    def list(self, after: bytes = b"", limit: int = 1000) -> list[BlobInfo]:
        """Blobs in hash order strictly after `after`."""
        ...

    def verify(self, h: bytes) -> VerifyResult: ...

    def stats(self) -> dict[str, int]: ...


def put_many(replica: Replica, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
    """replica.put_many(items) when the replica has it, else one put per item
    (a simple replica: the same outcome, without the shared commit)."""
    many = getattr(replica, "put_many", None)
    if many is None:
        return [bool(replica.put(data, h)) for data, h in items]
    out = [bool(x) for x in many(items)]
    if len(out) != len(items):
        raise ReplicaUnavailable(f"{replica.node_id} answered {len(out)} results for {len(items)} blobs")
    return out


def get_range(replica: Replica, h: bytes, offset: int = 0, length: int = 0) -> tuple[bytes, int]:
    """(bytes [offset, offset+length) of the blob (cut short at its end), the
    whole blob's size): replica.get_range when the replica has it; else a
    ranged get plus info() for the size; else (the simplest fakes) the whole
    blob, sliced. InvalidBlob when offset is past the end."""
    ranged = getattr(replica, "get_range", None)
    if ranged is not None:
        data, size = ranged(h, offset, length)
        return bytes(data), int(size)
    info = getattr(replica, "info", None)
    if info is not None:
        found = info(h)
        if found is None:
            raise BlobNotFound(f"{h.hex()} not on {replica.node_id}")
        return replica.get(h, offset, length), int(found.size)
    whole = replica.get(h)
    if offset > len(whole):
        raise InvalidBlob(f"offset {offset} past the end of a {len(whole)}-byte blob")
    return whole[offset:offset + length] if length else whole[offset:], len(whole)


def iter_all(replica: Replica, page: int = 1000) -> Iterator[BlobInfo]:
    """Every blob of a replica, paging through list()."""
    after = b""
    while True:
        batch = replica.list(after, page)
        yield from batch
        if len(batch) < page:
            return
        after = batch[-1].hash


# ---------------------------------------------------------------- cluster-level results


@dataclass(frozen=True, slots=True)
class PutResult:
    hash: bytes
    stored_on: list[str]   # replicas holding a durable copy when put() returned
    pending: list[str]     # replicas owed a copy (durable hints; completed in the background)
    existed: bool          # some replica already held it


@dataclass(frozen=True, slots=True)
class CopyInfo:
    node: str
    placed: bool           # one of the blob's R replicas by placement
    present: bool
    verified: bool
    stored_size: int = 0
    compression: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class LocateResult:
    hash: bytes
    size: int
    copies: list[CopyInfo]


@dataclass(frozen=True, slots=True)
class ScrubResult:
    checked: int = 0
    corrupt: int = 0
    repaired: int = 0
    unrepaired: int = 0


@dataclass(frozen=True, slots=True)
class GcResult:
    live: int = 0
    examined: int = 0
    young: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    unreachable: list[str] | None = None


class Coordinator(Protocol):
    """The cluster calls of the blob service (objstore/cluster.py implements it)."""

    node_id: str

    def put(self, data: bytes, h: bytes) -> PutResult: ...

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> tuple[bytes, int, str]:
        """(data of the range, whole blob size, node that served it). A whole
        blob is checked against its SHA-256 end to end; a smaller range is
        read alone from one replica and checked by that copy's record crc32c
        (DESIGN.md §5: fetch only the blob ranges needed), and a copy found
        missing or corrupt on the way sends the read down the whole-blob
        path, which verifies and repairs."""
        ...

    def locate(self, h: bytes) -> LocateResult: ...

    def scrub(self, all_nodes: bool = False) -> ScrubResult: ...

    def gc(self, dry_run: bool = False, grace_s: float | None = None) -> GcResult: ...

    def repair_backlog(self) -> int: ...

    def counters(self) -> dict[str, int]: ...
