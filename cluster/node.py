"""One floe node: the KV's Raft member and its gRPC API, run until SIGTERM.

Layout of a node's data directory:
  raft/journal, raft/term_vote   the durable Raft state (kv/journal.py)
  raft/snapshot                  the last log-compaction snapshot
  state/                         the LevelDB state machine (rebuilt from the
                                 snapshot and the journal if lost)
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


def main(config_path: str) -> int:
    cfg = cfgmod.load(config_path)
    setup_logging(cfg.node_id, cfg.log_level)
    os.makedirs(cfg.data_dir, exist_ok=True)
    state = KVState(os.path.join(cfg.data_dir, "state"))
    set_raft_secret(cfg.raft_secret)  # HMAC-authenticated Raft links (kv/raft.py)
    raft = RaftNode(cfg.raft_address, [p.raft_address for p in cfg.peers], os.path.join(cfg.data_dir, "raft"),
                    state, raft_conf(cfg.raft))
    api_of_raft = {p.raft_address: p.api_address for p in cfg.all_peers()}
    service = KVService(raft, state, {t.token: t.name for t in cfg.tenants}, api_of_raft, cfg.node_id)
    server = serve(service, cfg.api_address)
    log.info("event=node_started node=%s raft=%s api=%s pid=%d", cfg.node_id, cfg.raft_address, cfg.api_address,
             os.getpid())
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("event=node_stopping signal=%d", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
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
