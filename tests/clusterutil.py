"""Helpers for tests that run real node processes on 127.0.0.1-3."""

from __future__ import annotations

import re
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import tomli_w

from cluster import launcher
from kv.client import KVClient
from kv.errors import KVError

# Tests use their own ports so a user's `make up` cluster (7100/7200) is not disturbed.
RAFT_PORT = 7120
API_PORT = 7220


def configure(data_dir: Path, top: dict[str, Any] | None = None, **raft: Any) -> None:
    """Write the layout of a 3-node cluster and override [raft] settings (and
    top-level keys) in every node.toml."""
    layout = launcher.ensure_layout(data_dir, 3, RAFT_PORT, API_PORT)
    for node in layout.nodes:
        doc = tomllib.loads(node.config_path.read_text())
        doc.setdefault("raft", {}).update(raft)
        doc.update(top or {})
        node.config_path.write_text(tomli_w.dumps(doc))


def up(data_dir: Path) -> launcher.ClusterInfo:
    return launcher.up(data_dir, 3, RAFT_PORT, API_PORT, wait_s=30)


def client(data_dir: Path, timeout_s: float = 5.0) -> KVClient:
    return KVClient(launcher.servers(data_dir), launcher.token(data_dir), timeout_s=timeout_s)


def leader_id(data_dir: Path, wait_s: float = 10.0) -> str:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        leaders = [n["id"] for n in launcher.status(data_dir) if n["role"] == "leader"]
        if len(leaders) == 1:
            return str(leaders[0])
        time.sleep(0.1)
    raise AssertionError(f"no single leader within {wait_s}s: {launcher.status(data_dir)}")


def node_dir(data_dir: Path, node_id: str) -> Path:
    return launcher.load_layout(data_dir).node(node_id).state_dir


def logs(data_dir: Path) -> dict[str, str]:
    layout = launcher.load_layout(data_dir)
    return {n.id: n.log_path.read_text(errors="replace") if n.log_path.exists() else "" for n in layout.nodes}


_LEADER_RE = re.compile(r"node=(\S+) .*event=became_leader term=(\d+)")
_VOTE_RE = re.compile(r"node=(\S+) .*event=vote_granted term=(\d+) candidate=(\S+)")


def election_safety(data_dir: Path) -> tuple[dict[int, set[str]], list[str]]:
    """From every node's log (all restarts): leaders per term, and a list of
    violations — a term with two leaders, or a node that voted for two
    candidates in one term."""
    leaders: dict[int, set[str]] = defaultdict(set)
    votes: dict[tuple[str, int], set[str]] = defaultdict(set)
    for text in logs(data_dir).values():
        for m in _LEADER_RE.finditer(text):
            leaders[int(m.group(2))].add(m.group(1))
        for m in _VOTE_RE.finditer(text):
            votes[(m.group(1), int(m.group(2)))].add(m.group(3))
    bad = [f"term {t}: leaders {sorted(ns)}" for t, ns in leaders.items() if len(ns) > 1]
    bad += [f"{n} voted for {sorted(cs)} in term {t}" for (n, t), cs in votes.items() if len(cs) > 1]
    return dict(leaders), bad


def wait_applied(data_dir: Path, node_id: str, index: int, wait_s: float = 30.0) -> None:
    deadline = time.monotonic() + wait_s
    last: Any = None
    while time.monotonic() < deadline:
        for n in launcher.status(data_dir):
            if n["id"] == node_id:
                last = n
                if n["applied_index"] is not None and n["applied_index"] >= index:
                    return
        time.sleep(0.2)
    raise AssertionError(f"{node_id} did not reach applied index {index} in {wait_s}s: {last}")


def put_until_ok(c: KVClient, store: str, ks: str, key: bytes, value: bytes, wait_s: float = 20.0) -> int:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return c.put(store, ks, key, value)
        except KVError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
