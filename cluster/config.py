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

# A node's blob service listens on api_port + this unless blob_port is set.
BLOB_PORT_OFFSET = 500
# A node's iSCSI portal defaults to api_port + ISCSI_PORT_OFFSET: 3260, the
# IANA iSCSI port, for the default api port 7200 (the local cluster gives each
# node its own address, so all three listen on 3260); tests on 7220 get 3280.
ISCSI_PORT_OFFSET = 3260 - 7200


@dataclass(frozen=True, slots=True)
class Peer:
    id: str
    host: str
    raft_port: int
    api_port: int
    blob_port: int = 0  # 0 = api_port + BLOB_PORT_OFFSET
    iscsi_port: int = 0  # 0 = api_port + ISCSI_PORT_OFFSET

    @property
    def iscsi_address(self) -> str:
        return f"{self.host}:{self.iscsi_port or self.api_port + ISCSI_PORT_OFFSET}"

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def blob_address(self) -> str:
        return f"{self.host}:{self.blob_port or self.api_port + BLOB_PORT_OFFSET}"

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
class BlobSettings:
    """The object tier (objstore/). Intervals of 0 turn a background worker off.

    r / w: copies per blob, and how many must be fsynced before a put returns.
    hedge_after_s: a read asks a second replica when the first is this slow.
    hint_interval_s: how often owed copies (hints) are delivered.
    repair_interval_s: how often the local store is walked to restore R copies.
    scrub_interval_s: how often every local copy is re-verified at rest.
    gc_interval_s / gc_grace_s: mark-and-sweep GC period (run by the Raft
    leader) and the age under which an unreferenced blob is never deleted.
    *_bytes_per_s: rate limits of repair copying and scrub reading.
    compact_interval_s / compact_dead_fraction: how often packs are checked,
    and the dead fraction past which one is rewritten.
    """

    r: int = 3
    w: int = 2
    hedge_after_s: float = 0.05
    hint_interval_s: float = 1.0
    repair_interval_s: float = 60.0
    scrub_interval_s: float = 86_400.0
    gc_interval_s: float = 3_600.0
    gc_grace_s: float = 3_600.0
    repair_bytes_per_s: int = 64 << 20
    scrub_bytes_per_s: int = 32 << 20
    compact_interval_s: float = 600.0
    compact_dead_fraction: float = 0.5


@dataclass(frozen=True, slots=True)
class VolumeSettings:
    """Volumes this node serves (blockdev/volume.py; DESIGN.md §5, §6).

    lease_s: the owner's lease; another node takes a volume over once the
    lease has gone unrenewed this long.
    high_water_bytes / max_dirty_segments: the write-back buffer's bounds
    (writers past either wait for a flush; the segment bound keeps one flush
    one Raft command, so it is at most 250).
    flush_after_s / flush_dirty_bytes: the background flush's age and size
    triggers.
    cache_bytes: the read cache of immutable blob bytes, per volume.
    soft_threshold_pct: mapped bytes, as a percent of the volume's size, past
    which initiators get the thin-provisioning soft threshold UNIT ATTENTION.
    pool_hard_limit_bytes: mapped bytes of all volumes past which writes to
    unmapped blocks fail with SPACE ALLOCATION FAILED (0 = no limit).
    compact_idle_s: idle time after which cold fragmented segments are
    rewritten.
    """

    lease_s: float = 5.0
    high_water_bytes: int = 64 << 20
    max_dirty_segments: int = 240
    flush_after_s: float = 5.0
    flush_dirty_bytes: int = 16 << 20
    cache_bytes: int = 64 << 20
    soft_threshold_pct: float = 80.0
    pool_hard_limit_bytes: int = 0
    compact_idle_s: float = 30.0


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
    # The cluster's own credential: node-to-node blob calls and operators'
    # `floe blob` commands present it; it is also the KV tenant `_floe`
    # (objstore pins). Empty = this node runs no blob service (logged).
    admin_token: str = ""
    blob_port: int = 0  # 0 = api_port + BLOB_PORT_OFFSET
    iscsi_port: int = 0  # 0 = api_port + ISCSI_PORT_OFFSET
    blob: BlobSettings = field(default_factory=BlobSettings)
    volume: VolumeSettings = field(default_factory=VolumeSettings)

    @property
    def raft_address(self) -> str:
        return self.self_peer().raft_address

    @property
    def blob_address(self) -> str:
        return self.self_peer().blob_address

    @property
    def api_address(self) -> str:
        return self.self_peer().api_address

    @property
    def iscsi_address(self) -> str:
        return self.self_peer().iscsi_address

    def self_peer(self) -> Peer:
        return Peer(self.node_id, self.host, self.raft_port, self.api_port, self.blob_port, self.iscsi_port)

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
        "admin_token": cfg.admin_token,
        "blob_port": cfg.blob_port,
        "iscsi_port": cfg.iscsi_port,
        "blob": dataclasses.asdict(cfg.blob),
        "volume": dataclasses.asdict(cfg.volume),
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
        peers = tuple(Peer(str(p["id"]), str(p["host"]), int(p["raft_port"]), int(p["api_port"]),
                           int(p.get("blob_port", 0)), int(p.get("iscsi_port", 0)))
                      for p in raw.get("peers", []))
        tenants = tuple(Tenant(str(t["name"]), str(t["token"])) for t in raw.get("tenants", []))
        timing_fields = {f.name for f in dataclasses.fields(RaftTiming)}
        unknown = set(raw.get("raft", {})) - timing_fields
        if unknown:
            raise ConfigError(f"unknown [raft] keys: {sorted(unknown)}")
        _check_raft_types(raw.get("raft", {}))
        raft = RaftTiming(**raw.get("raft", {}))
        blob = _settings("blob", BlobSettings, raw.get("blob", {}))
        volume = _settings("volume", VolumeSettings, raw.get("volume", {}))
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
            admin_token=str(raw.get("admin_token", "")),
            blob_port=int(raw.get("blob_port", 0)),
            iscsi_port=int(raw.get("iscsi_port", 0)),
            blob=blob,
            volume=volume,
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
    if not 0 < cfg.blob.compact_dead_fraction <= 1:
        raise ConfigError(f"blob.compact_dead_fraction must be in (0, 1], got {cfg.blob.compact_dead_fraction}")
    if not 1 <= cfg.blob.w <= cfg.blob.r:
        raise ConfigError(f"blob.w must be between 1 and blob.r, got w={cfg.blob.w} r={cfg.blob.r}")
    v = cfg.volume
    if not 1 <= v.max_dirty_segments <= 250:
        raise ConfigError(f"volume.max_dirty_segments must be in [1, 250] (one flush is one KV batch), "
                          f"got {v.max_dirty_segments}")
    if not 0 < v.soft_threshold_pct <= 100:
        raise ConfigError(f"volume.soft_threshold_pct must be in (0, 100], got {v.soft_threshold_pct}")
    for name in ("lease_s", "high_water_bytes", "flush_after_s", "flush_dirty_bytes", "cache_bytes"):
        if getattr(v, name) <= 0:
            raise ConfigError(f"volume.{name} must be positive, got {getattr(v, name)}")
    if not (0 < cfg.raft.election_min_s < cfg.raft.election_max_s):
        raise ConfigError("raft.election_min_s must be > 0 and < election_max_s")
    if cfg.raft.election_min_s <= 3 * cfg.raft.append_entries_period_s:
        raise ConfigError("raft.election_min_s must exceed 3 x append_entries_period_s")
    return cfg


def _settings(section: str, cls: Any, raw_section: dict[str, Any]) -> Any:
    """A [section] of non-negative numbers, each of its default's type."""
    defaults = cls()
    out: dict[str, Any] = {}
    for name, value in raw_section.items():
        if not hasattr(defaults, name):
            raise ConfigError(f"unknown [{section}] key {name!r}")
        want = type(getattr(defaults, name))
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (want is int and not isinstance(value, int)) or value < 0:
            raise ConfigError(f"[{section}] {name} must be a non-negative {want.__name__}, got {value!r}")
        out[name] = want(value)
    return cls(**out)


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
