"""Durable hints: copies a coordinator still owes to replicas.

A put returns once W replicas have fsynced the blob. Before it returns, every
placed replica that has not acknowledged yet gets a hint here, written with
sync=True, so the promise to make the third copy survives a restart of the
writer (hinted handoff, as in Dynamo and Cassandra). The hint worker in
objstore/cluster.py delivers hints in the background and removes each one once
its replica has the blob; a removal need not be durable (a hint delivered
twice is a no-op: puts are idempotent).

Key: target node id, NUL, 32-byte blob hash. Value: creation time (float64).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterable

import plyvel


class HintLog:
    def __init__(self, directory: str) -> None:
        self._db = plyvel.DB(directory, create_if_missing=True)
        self._lock = threading.Lock()
        self._count = sum(1 for _ in self._db.iterator(include_value=False))

    def add(self, blob_hash: bytes, targets: Iterable[str]) -> None:
        """Record, durably, that each target is owed a copy of the blob."""
        self.add_many([(blob_hash, targets)])

    def add_many(self, owed: Iterable[tuple[bytes, Iterable[str]]]) -> None:
        """add() for many blobs in one synced write: a put_many that owes
        copies of sixty-four blobs pays one fsync here, not sixty-four."""
        now = struct.pack("<d", time.time())
        with self._lock:
            keys: set[bytes] = set()
            added = 0
            with self._db.write_batch(sync=True) as wb:
                for blob_hash, targets in owed:
                    for t in targets:
                        k = t.encode() + b"\0" + blob_hash
                        if k not in keys and self._db.get(k) is None:
                            added += 1
                        keys.add(k)
                        wb.put(k, now)
            self._count += added

    def remove(self, blob_hash: bytes, target: str) -> None:
        k = target.encode() + b"\0" + blob_hash
        with self._lock:
            if self._db.get(k) is not None:
                self._db.delete(k)
                self._count -= 1

    def pending(self, limit: int = 1000, skip_targets: Iterable[str] = ()) -> list[tuple[str, bytes, float]]:
        """Up to `limit` hints: (target, blob hash, created), leaving out the
        targets in skip_targets (a down node's backlog must not hide the
        hints owed to the others)."""
        skip = {t.encode() for t in skip_targets}
        out: list[tuple[str, bytes, float]] = []
        with self._db.snapshot() as snap:
            it = snap.iterator()
            try:
                for k, v in it:
                    target, _, h = k.partition(b"\0")
                    if target in skip:
                        it.seek(target + b"\x01")  # past every key of this target
                        continue
                    out.append((target.decode(), h, struct.unpack("<d", v)[0]))
                    if len(out) >= limit:
                        break
            finally:
                it.close()
        return out

    def count(self) -> int:
        return self._count

    def close(self) -> None:
        self._db.close()
