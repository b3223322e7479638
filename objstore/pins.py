"""Pins: blobs an operator stored with `floe blob put`, kept live for GC.

The pins live in the KV (tenant `_floe`, store `blob-pins`, keyspace `pins`,
key = the 32-byte blob hash), so every node sees the same set and it survives
anything the KV survives. `live_blobs()` reads them linearizably. The volume
layer adds its own provider (every blob any segment record references); the
node unions them (`Union`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from kv.errors import AlreadyExists
from objstore.api import check_hash

STORE = "blob-pins"
KEYSPACE = "pins"


class KVPins:
    def __init__(self, kv: Any) -> None:
        """kv: a kv.client.KVClient authenticated as the cluster's admin (tenant `_floe`)."""
        self._kv = kv
        self._ready = False

    def _ensure(self) -> None:
        if self._ready:
            return
        try:
            self._kv.create_store(STORE)
        except AlreadyExists:
            pass
        try:
            self._kv.create_keyspace(STORE, KEYSPACE)
        except AlreadyExists:
            pass
        self._ready = True

    def pin(self, h: bytes) -> None:
        check_hash(h)
        self._ensure()
        self._kv.put(STORE, KEYSPACE, h, b"")

    def unpin(self, h: bytes) -> None:
        """Idempotent: unpinning a blob that is not pinned does nothing."""
        check_hash(h)
        self._ensure()
        self._kv.delete(STORE, KEYSPACE, h)

    def live_blobs(self) -> Iterator[bytes]:
        self._ensure()
        cont = b""
        while True:
            rows, cont = self._kv.scan(STORE, KEYSPACE, limit=1000, continuation=cont)
            for key, _value, _version in rows:
                yield key
            if not cont:
                return


class Union:
    """The live set of several providers."""

    def __init__(self, providers: Sequence[Any]) -> None:
        self.providers = list(providers)

    def live_blobs(self) -> Iterable[bytes]:
        for p in self.providers:
            yield from p.live_blobs()
