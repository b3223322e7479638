"""One floe node: the KV's Raft member and its gRPC API, run until SIGTERM.

Layout of a node's data directory:
  raft/journal, raft/term_vote   the durable Raft state (kv/journal.py)
  raft/snapshot                  the last log-compaction snapshot
  state/                         the LevelDB state machine (rebuilt from the
                                 snapshot and the journal if lost)
  blobs/store/                   the object tier's local pack store (objstore/pack.py)
  blobs/hints/                   copies this node owes other replicas (objstore/hints.py)
  blobs/tmp/                     spool files of large incoming blobs
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from cluster import config as cfgmod
from kv.raft import RaftNode, set_raft_secret
from kv.server import KVService, serve
from kv.state import KVState
from objstore.cluster import BlobCluster
from objstore.hints import HintLog
from objstore.pack import LocalStore
from objstore.pins import KVPins, Union
from objstore.remote import BlobClient, RemoteReplica
from objstore.service import BlobService, serve_blobs

log = logging.getLogger("floe.node")


def raft_conf(t: cfgmod.RaftTiming) -> dict[str, Any]:
    """pysyncobj settings from floe's timing section."""
    return {
        "autoTickPeriod": t.tick_s,
        "appendEntriesPeriod": t.append_entries_period_s,
        "appendEntriesUseBatch": t.use_batch,
        "raftMinTimeout": t.election_min_s,
        "raftMaxTimeout": t.election_max_s,
        "connectionTimeout": max(t.connection_timeout_s, t.election_max_s),
        "leaderFallbackTimeout": t.leader_fallback_s,
        "logCompactionMinEntries": t.compaction_min_entries,
        "logCompactionMinTime": t.compaction_min_s,
        "connectionRetryTime": 0.2,
    }


def setup_logging(node_id: str, level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
        format=f"%(asctime)s node={node_id} level=%(levelname)s logger=%(name)s %(message)s")


# The KV tenant the node itself uses (blob pins), authenticated by the admin token.
SYSTEM_TENANT = "_floe"


class ObjectTier:
    """The node's blob server, its coordinator and their background workers."""

    def __init__(self, cfg: cfgmod.NodeConfig, raft: RaftNode, state: KVState) -> None:
        from blockdev.liveset import VolumeLiveSet
        from kv.client import KVClient
        from proto import kv_pb2

        b = cfg.blob
        base = os.path.join(cfg.data_dir, "blobs")
        os.makedirs(os.path.join(base, "tmp"), exist_ok=True)
        self.store = LocalStore(os.path.join(base, "store"), cfg.node_id)
        self.hints = HintLog(os.path.join(base, "hints"))
        peers = {p.id: p for p in cfg.peers}
        self.remotes = {pid: RemoteReplica(pid, p.blob_address, cfg.admin_token, timeout_s=10.0)
                        for pid, p in peers.items()}
        self.kv = KVClient([p.api_address for p in cfg.all_peers()], cfg.admin_token, timeout_s=10.0)
        self.pins = KVPins(self.kv)
        barrier = kv_pb2.Command(tenant=SYSTEM_TENANT, barrier=kv_pb2.BarrierCmd()).SerializeToString()
        # GC's live set: operators' pins and every blob a volume's segment map names.
        self.live_set = Union([self.pins, VolumeLiveSet(raft, state, lambda: raft.commit(barrier, timeout_s=10.0))])

        def peer_scrub(node_id: str) -> object:
            client = BlobClient(peers[node_id].blob_address, cfg.admin_token, timeout_s=3600.0)
            try:
                return client.scrub(all_nodes=False)
            finally:
                client.close()

        replicas: dict[str, Any] = {cfg.node_id: self.store, **self.remotes}
        self.cluster = BlobCluster(cfg.node_id, replicas, self.hints, r=b.r, w=b.w, hedge_after_s=b.hedge_after_s,
                                   live_set=self.live_set, gc_grace_s=b.gc_grace_s, peer_scrub=peer_scrub,  # type: ignore[arg-type]
                                   repair_bytes_per_s=b.repair_bytes_per_s, scrub_bytes_per_s=b.scrub_bytes_per_s)
        self.service = BlobService(self.store, self.cluster, cfg.admin_token, cfg.node_id, os.path.join(base, "tmp"))
        self.server = serve_blobs(self.service, cfg.blob_address)
        self.cluster.start(hint_interval_s=b.hint_interval_s, repair_interval_s=b.repair_interval_s,
                           scrub_interval_s=b.scrub_interval_s, gc_interval_s=b.gc_interval_s,
                           gc_allowed=raft.is_leader, compact_interval_s=b.compact_interval_s,
                           compact_dead_fraction=b.compact_dead_fraction)
        log.info("event=blob_server_started node=%s address=%s blobs=%d", cfg.node_id, cfg.blob_address,
                 self.store.stats().get("blobs", 0))

    def stop(self) -> None:
        self.server.stop(grace=1.0).wait()
        self.service.close()
        self.cluster.stop()
        for r in self.remotes.values():
            r.close()
        self.kv.close()
        self.hints.close()
        self.store.close()


def main(config_path: str) -> int:
    cfg = cfgmod.load(config_path)
    setup_logging(cfg.node_id, cfg.log_level)
    os.makedirs(cfg.data_dir, exist_ok=True)
    state = KVState(os.path.join(cfg.data_dir, "state"))
    set_raft_secret(cfg.raft_secret)  # HMAC-authenticated Raft links (kv/raft.py)
    raft = RaftNode(cfg.raft_address, [p.raft_address for p in cfg.peers], os.path.join(cfg.data_dir, "raft"),
                    state, raft_conf(cfg.raft))
    api_of_raft = {p.raft_address: p.api_address for p in cfg.all_peers()}
    tenants = {t.token: t.name for t in cfg.tenants}
    if cfg.admin_token:
        tenants[cfg.admin_token] = SYSTEM_TENANT
    service = KVService(raft, state, tenants, api_of_raft, cfg.node_id)
    server = serve(service, cfg.api_address)
    blobs = ObjectTier(cfg, raft, state) if cfg.admin_token else None
    if blobs is None:
        log.error("event=blob_service_disabled reason=no_admin_token "
                  "hint='set admin_token in the node config (the same on every node)'")
    targets = iscsi_server = None
    if blobs is not None:
        # Volumes need the object tier; every node serves the iSCSI targets of
        # the volumes it owns and redirects logins for the others.
        from blockdev.tiers import ClusterBlobs
        from cluster.targets import VolumeCatalog
        from iscsi.server import IscsiServer

        targets = VolumeCatalog(cfg, ClusterBlobs(blobs.cluster))
        host, port = cfg.iscsi_address.rsplit(":", 1)
        iscsi_server = IscsiServer(targets, host=host, port=int(port))
        iscsi_server.start_in_thread()
    log.info("event=node_started node=%s raft=%s api=%s iscsi=%s pid=%d", cfg.node_id, cfg.raft_address,
             cfg.api_address, cfg.iscsi_address if iscsi_server else "off", os.getpid())
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("event=node_stopping signal=%d", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    if iscsi_server is not None:
        iscsi_server.stop_thread()
    if targets is not None:
        targets.close()  # flush and release owned volumes: a clean stop hands them over at once
    if blobs is not None:
        blobs.stop()
    server.stop(grace=1.0).wait()
    # Stops the tick thread, which syncs and closes the journal on its way out;
    # only then is it safe to close the state it applies to.
    raft.destroy_synchronous()
    log.info("event=raft_stats node=%s %s", cfg.node_id, " ".join(f"{k}={v}" for k, v in raft.stats().items()))
    state.close()
    log.info("event=node_stopped node=%s", cfg.node_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
