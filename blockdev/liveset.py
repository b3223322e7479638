"""The volumes' part of the object tier's GC live set (DESIGN.md §4).

Every blob any segment record of any volume references is live. The node
reads them from its own replica of the KV state, after committing a Barrier
through Raft on the leader, so the set includes every flush acknowledged
before the mark (a linearizable read). Records of all generations are read,
so blobs that only a snapshot still sees stay live too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from blockdev import extents as ext
from kv.errors import NotFound

VOLUME_STORE_PREFIX = "vol."


class VolumeLiveSet:
    def __init__(self, raft: Any, state: Any, barrier: Any) -> None:
        """raft: kv.raft.RaftNode; state: kv.state.KVState; barrier: a callable
        that commits a Barrier command through Raft (raises if it cannot)."""
        self.raft = raft
        self.state = state
        self.barrier = barrier

    def live_blobs(self) -> Iterator[bytes]:
        if not self.raft.is_leader():
            from objstore.api import BlobError

            raise BlobError("GC reads the volumes' live set on the Raft leader; this node is not it "
                            "(run `floe blob gc` again: it tries the other nodes)")
        self.barrier()
        for tenant, store in self.state.all_stores(VOLUME_STORE_PREFIX):
            cont = b""
            while True:
                try:
                    rows, cont = self.state.scan(tenant, store, "segments", continuation=cont)
                except NotFound:  # dropped meanwhile (or never had segments): nothing live
                    break
                for _key, value, _version in rows:
                    yield from ext.blobs(ext.decode(value))
                if not cont:
                    break
