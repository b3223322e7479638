"""An in-memory Replica for the object tier's cluster-logic tests, with faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from objstore.api import BlobCorrupt, BlobInfo, BlobNotFound, InvalidBlob, ReplicaUnavailable, VerifyResult, blob_hash


class MemReplica:
    def __init__(self, node_id: str, clock: Callable[[], float] = time.time) -> None:
        self.node_id = node_id
        self.clock = clock
        self.blobs: dict[bytes, tuple[bytes, float]] = {}
        self.down = False
        self.delay_s = 0.0
        self.puts = 0
        self.reads: list[tuple[int, int]] = []  # (offset, length) of every get
        self.lock = threading.Lock()

    def _check(self) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.down:
            raise ReplicaUnavailable(f"{self.node_id} is down")

    def corrupt(self, h: bytes) -> None:
        data, t = self.blobs[h]
        self.blobs[h] = (bytes([data[0] ^ 0xFF]) + data[1:], t)

    def put(self, data: bytes, h: bytes) -> bool:
        self._check()
        if blob_hash(data) != h:
            raise InvalidBlob("hash mismatch")
        with self.lock:
            self.puts += 1
            return self._store(data, h)

    def _store(self, data: bytes, h: bytes) -> bool:
        old = self.blobs.get(h)
        existed = old is not None and blob_hash(old[0]) == h
        self.blobs[h] = (data if not existed else old[0], self.clock())  # type: ignore[index]
        return existed

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> bytes:
        self._check()
        self.reads.append((offset, length))
        if h not in self.blobs:
            raise BlobNotFound(h.hex())
        data = self.blobs[h][0]
        return data[offset:offset + length] if length else data[offset:]

    def has(self, hashes: Iterable[bytes]) -> list[bool]:
        self._check()
        return [h in self.blobs for h in hashes]

    def delete(self, h: bytes, min_age_s: float = 0.0) -> bool:
        self._check()
        with self.lock:
            if h in self.blobs and self.clock() - self.blobs[h][1] > min_age_s:
                del self.blobs[h]
                return True
            return False

    def list(self, after: bytes = b"", limit: int = 1000) -> list[BlobInfo]:
        self._check()
        keys = sorted(k for k in self.blobs if k > after)[:limit]
        now = self.clock()
        return [BlobInfo(k, len(self.blobs[k][0]), len(self.blobs[k][0]), "none", now - self.blobs[k][1])
                for k in keys]

    def verify(self, h: bytes) -> VerifyResult:
        self._check()
        if h not in self.blobs:
            return VerifyResult(False, False, None)
        data, t = self.blobs[h]
        info = BlobInfo(h, len(data), len(data), "none", self.clock() - t)
        if blob_hash(data) != h:
            del self.blobs[h]  # quarantined, as LocalStore does
            return VerifyResult(True, False, info, "content hash mismatch")
        return VerifyResult(True, True, info)

    def stats(self) -> dict[str, int]:
        return {"blobs": len(self.blobs)}


def raise_corrupt(*_a: object) -> None:
    raise BlobCorrupt("x")


class MemBatchReplica(MemReplica):
    """A MemReplica that also has the batch and ranged calls of LocalStore and
    RemoteReplica: put_many (every hash checked before any is stored; the
    size of each call kept in put_many_calls) and get_range (each kept in
    range_reads). Like a store's record crc, a copy in `rotten` fails every
    read with BlobCorrupt and is then set aside."""

    def __init__(self, node_id: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__(node_id, clock)
        self.put_many_calls: list[int] = []
        self.range_reads: list[tuple[int, int]] = []
        self.rotten: set[bytes] = set()

    def put_many(self, items: list[tuple[bytes, bytes]]) -> list[bool]:
        self._check()
        if any(blob_hash(data) != h for data, h in items):
            raise InvalidBlob("hash mismatch")
        with self.lock:
            self.put_many_calls.append(len(items))
            return [self._store(data, h) for data, h in items]

    def _copy(self, h: bytes) -> bytes:
        if h in self.rotten:
            self.rotten.discard(h)
            self.blobs.pop(h, None)
            raise BlobCorrupt(f"{h.hex()} on {self.node_id} fails its checksum (quarantined)")
        if h not in self.blobs:
            raise BlobNotFound(h.hex())
        return self.blobs[h][0]

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> bytes:
        self._check()
        self.reads.append((offset, length))
        data = self._copy(h)
        return data[offset:offset + length] if length else data[offset:]

    def get_range(self, h: bytes, offset: int = 0, length: int = 0) -> tuple[bytes, int]:
        self._check()
        self.range_reads.append((offset, length))
        data = self._copy(h)
        if offset > len(data):
            raise InvalidBlob(f"offset {offset} past the end")
        return (data[offset:offset + length] if length else data[offset:]), len(data)
