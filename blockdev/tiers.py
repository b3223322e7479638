"""Adapters from the object tier's clients to the volume layer's BlobTier."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from objstore.api import ReplicaUnavailable, blob_hash

T = TypeVar("T")


class ClientBlobs:
    """Through the nodes' blob services (objstore.remote.BlobClient each): for
    tools and tests outside the node process. A node that cannot be reached
    is passed over for the next one (any node coordinates a put or a get)."""

    def __init__(self, clients: Sequence[Any]) -> None:
        if not clients:
            raise ValueError("need at least one blob client")
        self.clients = list(clients)
        self._first = 0
        self._lock = threading.Lock()

    def _call(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            start = self._first
        errors: list[str] = []
        for i in range(len(self.clients)):
            k = (start + i) % len(self.clients)
            try:
                out = fn(self.clients[k])
            except ReplicaUnavailable as e:
                errors.append(str(e))
                continue
            if k != start:
                with self._lock:
                    self._first = k
            return out
        raise ReplicaUnavailable("no blob service answered: " + "; ".join(errors))

    def put(self, data: bytes) -> bytes:
        return self._call(lambda c: bytes(c.put(data, replicate=True).hash))

    def get(self, h: bytes, offset: int, length: int) -> bytes:
        return self._call(lambda c: bytes(c.get(h, offset, length)))


class ClusterBlobs:
    """Inside a node: straight to its coordinator (objstore.cluster.BlobCluster)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def put(self, data: bytes) -> bytes:
        h = blob_hash(data)
        self.cluster.put(data, h)
        return h

    def put_many(self, datas: Sequence[bytes]) -> list[bytes]:
        """All of a flush's blobs in one call per replica (BlobCluster.put_many):
        returns when every one is durable on W of R, like put."""
        items = [(d, blob_hash(d)) for d in datas]
        self.cluster.put_many(items, hashed=True)  # the hashes were computed from these bytes just above
        return [h for _d, h in items]

    def get(self, h: bytes, offset: int, length: int) -> bytes:
        data, _size, _node = self.cluster.get(h, offset, length)
        return bytes(data)
