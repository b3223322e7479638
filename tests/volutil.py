"""In-memory stand-ins for the KV client and the object tier, for volume tests.

MemKV keeps the kv.client.KVClient contract the volume layer uses: stores,
keyspaces, get/put/delete, scan (start/end/prefix, limit, continuation) and
the atomic conditional batch, with per-key versions from one global counter
(the Raft index). `fail` makes every call raise Unavailable (no quorum).
A batch is held to the real limits of one Raft entry (kv/limits.py: operations
and serialized bytes) and refused with InvalidArgument past them, as the
server does; `applied` counts the batches that applied, `batch_ops` records
each one's operation count.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from typing import Any

from kv import limits
from kv.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable


class MemKV:
    def __init__(self) -> None:
        self.stores: dict[str, dict[str, dict[bytes, tuple[bytes, int]]]] = {}
        self.index = 0
        self.lock = threading.Lock()
        self.fail = False
        self.batches = 0
        self.applied = 0
        self.batch_ops: list[int] = []

    def _check(self) -> None:
        if self.fail:
            raise Unavailable("no quorum (test)")

    def _ks(self, store: str, keyspace: str) -> dict[bytes, tuple[bytes, int]]:
        if store not in self.stores:
            raise NotFound(f"no store {store}")
        if keyspace not in self.stores[store]:
            raise NotFound(f"no keyspace {keyspace}")
        return self.stores[store][keyspace]

    def create_store(self, store: str) -> int:
        self._check()
        with self.lock:
            if store in self.stores:
                raise AlreadyExists(store)
            self.stores[store] = {}
            self.index += 1
            return self.index

    def drop_store(self, store: str) -> int:
        self._check()
        with self.lock:
            if store not in self.stores:
                raise NotFound(store)
            del self.stores[store]
            self.index += 1
            return self.index

    def create_keyspace(self, store: str, keyspace: str) -> int:
        self._check()
        with self.lock:
            if store not in self.stores:
                raise NotFound(store)
            if keyspace in self.stores[store]:
                raise AlreadyExists(keyspace)
            self.stores[store][keyspace] = {}
            self.index += 1
            return self.index

    def get(self, store: str, keyspace: str, key: bytes, *, stale: bool = False) -> tuple[bytes, int] | None:
        self._check()
        with self.lock:
            return self._ks(store, keyspace).get(key)

    def put(self, store: str, keyspace: str, key: bytes, value: bytes) -> int:
        self._check()
        with self.lock:
            self.index += 1
            self._ks(store, keyspace)[key] = (value, self.index)
            return self.index

    def delete(self, store: str, keyspace: str, key: bytes) -> int:
        self._check()
        with self.lock:
            self.index += 1
            self._ks(store, keyspace).pop(key, None)
            return self.index

    def scan(self, store: str, keyspace: str, *, prefix: bytes = b"", start: bytes = b"", end: bytes = b"",
             limit: int = 0, continuation: bytes = b"", stale: bool = False
             ) -> tuple[list[tuple[bytes, bytes, int]], bytes]:
        self._check()
        with self.lock:
            ks = self._ks(store, keyspace)
            keys = sorted(ks)
            lo = max(start, continuation, prefix)
            i = bisect.bisect_left(keys, lo)
            if continuation and i < len(keys) and keys[i] == continuation:
                i += 1
            out = []
            while i < len(keys):
                k = keys[i]
                if (end and k >= end) or (prefix and not k.startswith(prefix)):
                    break
                out.append((k, ks[k][0], ks[k][1]))
                i += 1
                if limit and len(out) >= limit:
                    more = i < len(keys) and (not end or keys[i] < end)
                    return out, (k if more else b"")
            return out, b""

    def batch(self, store: str, *, conditions: Any = (), mutations: Any = ()) -> tuple[bool, int, int]:
        self._check()
        from proto import kv_pb2

        cmd = kv_pb2.BatchCmd(store=store, conditions=conditions, mutations=mutations)
        ops = len(conditions) + len(mutations)
        if ops > limits.BATCH_OPS_MAX or cmd.ByteSize() + 64 > limits.COMMAND_BYTES_MAX:
            raise InvalidArgument(f"batch of {ops} operations and {cmd.ByteSize()} bytes is over one Raft entry")
        with self.lock:
            self.batches += 1
            for n, c in enumerate(conditions):
                cur = self._ks(store, c.keyspace).get(c.key)
                which = c.WhichOneof("check")
                ok = ((which == "absent" and cur is None)
                      or (which == "value_equals" and cur is not None and cur[0] == c.value_equals)
                      or (which == "version_equals" and ((cur[1] if cur else 0) == c.version_equals)))
                if not ok:
                    return False, self.index, n + 1
            self.index += 1
            for m in mutations:
                ks = self._ks(store, m.keyspace)
                if m.WhichOneof("op") == "put":
                    ks[m.key] = (m.put, self.index)
                else:
                    ks.pop(m.key, None)
            self.applied += 1
            self.batch_ops.append(ops)
            return True, self.index, 0


class MemBlobs:
    """The object tier as a dict; `fail` makes puts raise (no write quorum)."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.fail = False
        self.puts = 0

    def put(self, data: bytes) -> bytes:
        if self.fail:
            from objstore.api import NotEnoughReplicas

            raise NotEnoughReplicas("test: no write quorum")
        h = hashlib.sha256(data).digest()
        self.blobs[h] = bytes(data)
        self.puts += 1
        return h

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> bytes:
        data = self.blobs[h]
        return data[offset:offset + length] if length else data[offset:]
