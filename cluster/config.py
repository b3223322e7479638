"""Node configuration (TOML).

One file per node. Everything has a working default except the node's identity
and its peers; `floe cluster up` writes these files for a local cluster.

    node_id = "n1"
    data_dir = "/var/lib/floe/n1"
    host = "127.0.0.1"        # this node's address: Raft and the gRPC API bind here
    raft_port = 7100
    api_port = 7200

    [[peers]]                 # every other voting member
    id = "n2"
    host = "127.0.0.2"
    raft_port = 7100
    api_port = 7200

    [[tenants]]               # tokens that KV and admin requests present
    name = "default"
    token = "..."

    [raft]                    # timing; see README "Performance" for why these values
    tick_s = 0.001
    ...
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


@dataclass(frozen=True, slots=True)
class Peer:
    id: str
    host: str
    raft_port: int
    api_port: int

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def api_address(self) -> str:
        return f"{self.host}:{self.api_port}"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    token: str


@dataclass(frozen=True, slots=True)
class RaftTiming:
    """pysyncobj timing. The defaults were chosen by measurement (README, Performance).

    tick_s: autoTickPeriod, the longest the Raft thread sleeps in poll().
    append_entries_period_s: heartbeat period (and, in batch mode, batching delay).
    use_batch: False sends AppendEntries as soon as a command is queued.
    election_min_s / election_max_s: randomized election timeout range.
    connection_timeout_s: a silent peer connection is dropped after this long.
    leader_fallback_s: a leader that hears from no majority for this long steps down.
    """

    tick_s: float = 0.001
    append_entries_period_s: float = 0.05
    use_batch: bool = False
    election_min_s: float = 0.4
    election_max_s: float = 0.8
    connection_timeout_s: float = 1.0
    leader_fallback_s: float = 1.0
    # Log compaction: snapshot after this many entries (or this long) since the last one.
    compaction_min_entries: int = 20_000
    compaction_min_s: float = 600.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    data_dir: str
    host: str = "127.0.0.1"
    raft_port: int = 7100
    api_port: int = 7200
    peers: tuple[Peer, ...] = ()
    tenants: tuple[Tenant, ...] = ()
    raft: RaftTiming = field(default_factory=RaftTiming)
    log_level: str = "INFO"
    # Shared secret of the Raft group. When set, every node-to-node Raft
    # message carries an HMAC-SHA256 tag (kv/raft.py); a host without the
    # secret cannot send Raft messages. Empty = unauthenticated links.
    raft_secret: str = ""

    @property
    def raft_address(self) -> str:
        return self.self_peer().raft_address

    @property
    def api_address(self) -> str:
        return self.self_peer().api_address

    def self_peer(self) -> Peer:
        return Peer(self.node_id, self.host, self.raft_port, self.api_port)

    def all_peers(self) -> tuple[Peer, ...]:
        """Every voting member including this node, ordered by id."""
        return tuple(sorted((self.self_peer(), *self.peers), key=lambda p: p.id))

    def to_toml(self) -> str:
        return tomli_w.dumps(_to_plain(self))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())


def _to_plain(cfg: NodeConfig) -> dict[str, Any]:
    d: dict[str, Any] = {
        "node_id": cfg.node_id,
        "data_dir": cfg.data_dir,
        "host": cfg.host,
        "raft_port": cfg.raft_port,
        "api_port": cfg.api_port,
        "log_level": cfg.log_level,
        "raft_secret": cfg.raft_secret,
        "peers": [dataclasses.asdict(p) for p in cfg.peers],
        "tenants": [dataclasses.asdict(t) for t in cfg.tenants],
        "raft": dataclasses.asdict(cfg.raft),
    }
    return d


class ConfigError(ValueError):
    """The configuration file is invalid; the message names the field."""


def parse(text: str) -> NodeConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}") from e
    try:
        peers = tuple(Peer(str(p["id"]), str(p["host"]), int(p["raft_port"]), int(p["api_port"]))
                      for p in raw.get("peers", []))
        tenants = tuple(Tenant(str(t["name"]), str(t["token"])) for t in raw.get("tenants", []))
        timing_fields = {f.name for f in dataclasses.fields(RaftTiming)}
        unknown = set(raw.get("raft", {})) - timing_fields
        if unknown:
            raise ConfigError(f"unknown [raft] keys: {sorted(unknown)}")
        _check_raft_types(raw.get("raft", {}))
        raft = RaftTiming(**raw.get("raft", {}))
        cfg = NodeConfig(
            node_id=str(raw["node_id"]),
            data_dir=str(raw["data_dir"]),
            host=str(raw.get("host", "127.0.0.1")),
            raft_port=int(raw.get("raft_port", 7100)),
            api_port=int(raw.get("api_port", 7200)),
            peers=peers,
            tenants=tenants,
            raft=raft,
            log_level=str(raw.get("log_level", "INFO")),
            raft_secret=str(raw.get("raft_secret", "")),
        )
    except KeyError as e:
        raise ConfigError(f"missing required key {e}") from e
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"bad value: {e}") from e
    ids = [p.id for p in cfg.all_peers()]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"duplicate node ids: {ids}")
    if not (0 < cfg.raft.election_min_s < cfg.raft.election_max_s):
        raise ConfigError("raft.election_min_s must be > 0 and < election_max_s")
    if cfg.raft.election_min_s <= 3 * cfg.raft.append_entries_period_s:
        raise ConfigError("raft.election_min_s must exceed 3 x append_entries_period_s")
    return cfg


def _check_raft_types(raw_raft: dict[str, Any]) -> None:
    """Each [raft] value has its default's type and every number is positive.

    Without this a string slipped through to the range checks below as a bare
    TypeError, and `use_batch = "no"` was accepted as a truthy string.
    """
    defaults = RaftTiming()
    for name, value in raw_raft.items():
        want = type(getattr(defaults, name))
        if want is bool:
            ok = isinstance(value, bool)
        elif want is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"raft.{name} must be of type {want.__name__}, got {value!r}")
        if want is not bool and value <= 0:
            raise ConfigError(f"raft.{name} must be > 0, got {value!r}")


def load(path: str | Path) -> NodeConfig:
    return parse(Path(path).read_text())
