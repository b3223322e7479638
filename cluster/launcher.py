"""A local N-node floe cluster under one data directory (`floe cluster up/down/...`).

Theory of operation. Node i of a local cluster is `nI`; it binds 127.0.0.I with the
same Raft and API ports as every other node, so the nodes look like separate hosts
(DESIGN.md §10) and a real deployment's config differs only in the addresses. The
layout on disk is the whole state of the launcher; nothing lives in memory between
commands:

    DATA/cluster.toml      the node list and the tenant token (written once, mode 0600)
    DATA/.launcher.lock    flock()ed while nodes are started or stopped
    DATA/nI/node.toml      node nI's NodeConfig (cluster/config.py), mode 0600
    DATA/nI/data/          node nI's own state (NodeConfig.data_dir)
    DATA/nI/node.log       the node's stdout and stderr, appended across restarts
    DATA/nI/node.pid       the pid of the running node, removed by `down`

`up` creates the layout if cluster.toml is missing and otherwise reuses it, so a
restart brings the same cluster back with its data. Each node runs detached
(its own session) as `python -m cluster.cli node run --config DATA/nI/node.toml`.
A pid file is trusted only while /proc/PID/cmdline still names that config file:
a node that died, or whose pid was reused by another process, counts as down.

Every wait is bounded (`wait_s`, STOP_WAIT_S) and every failure names the node and
shows the tail of its log, because a cluster that does not come up is debugged
from its logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import tomli_w

from cluster import config as node_config
from kv.errors import KVError

CLUSTER_FILE = "cluster.toml"
LOCK_FILE = ".launcher.lock"
NODE_CONFIG_FILE = "node.toml"
NODE_PID_FILE = "node.pid"
NODE_LOG_FILE = "node.log"
NODE_STATE_DIR = "data"
LAYOUT_FORMAT = 1
DEFAULT_TENANT = "default"

# etcd's FAQ recommends at most 7 voting members: more only slows every commit
# down. The bound also keeps every node on its own 127.0.0.I address.
NODES_MAX = 7

# `down` gives nodes this long to exit on SIGTERM before it sends SIGKILL.
STOP_WAIT_S = 10.0
# After SIGKILL the kernel tears the process down promptly; this only bounds the
# wait for a process stuck in uninterruptible I/O.
KILL_WAIT_S = 5.0
# How long one status probe waits for a node; a healthy node answers in ms.
PROBE_TIMEOUT_S = 1.0
PROBE_INTERVAL_S = 0.2
# A node log longer than this at start is moved to node.log.1 (one generation
# kept), so a long-lived try-out cluster does not fill the disk.
NODE_LOG_BYTES_MAX = 64 * 1024 * 1024
# Lines of a node's log shown when it fails to come up.
LOG_TAIL_LINES = 20
LOG_TAIL_BYTES_MAX = 16 * 1024

_START_MARK = "event=launcher_start"
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_ROOT = Path(__file__).resolve().parent.parent


class StatusClient(Protocol):
    """The part of kv.client.KVClient the launcher uses."""

    def status(self, server: str, *, timeout_s: float = ...) -> dict[str, Any]: ...

    def close(self) -> None: ...


def kv_client_class() -> Any:
    """kv.client.KVClient, imported on first use.

    Imported by name so that the layout code needs no gRPC, and so that type
    checking this module checks its calls against the Protocols declared here
    (the KVClient contract) rather than re-checking all of kv/ and proto/.
    """
    return importlib.import_module("kv.client").KVClient


class ClusterError(Exception):
    """The local cluster could not do what was asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class LocalNode:
    """One node of the local cluster and where its files live."""

    id: str
    host: str
    raft_port: int
    api_port: int
    dir: Path

    @property
    def api_address(self) -> str:
        return f"{self.host}:{self.api_port}"

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def config_path(self) -> Path:
        return self.dir / NODE_CONFIG_FILE

    @property
    def pid_path(self) -> Path:
        return self.dir / NODE_PID_FILE

    @property
    def log_path(self) -> Path:
        return self.dir / NODE_LOG_FILE

    @property
    def state_dir(self) -> Path:
        return self.dir / NODE_STATE_DIR


@dataclass(frozen=True, slots=True)
class Layout:
    """What cluster.toml says: the nodes (ordered by id), the default tenant's
    token and the Raft group's shared secret (empty for clusters made before
    floe generated one)."""

    data_dir: Path
    nodes: tuple[LocalNode, ...]
    token: str
    raft_secret: str = ""
    admin_token: str = ""

    def node(self, node_id: str) -> LocalNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        known = ", ".join(n.id for n in self.nodes)
        raise ClusterError(f"no node {node_id!r} in the cluster in {self.data_dir} (nodes: {known})")

    def node_config(self, node: LocalNode) -> node_config.NodeConfig:
        """The NodeConfig that node.toml holds for `node`: peers are all the other nodes."""
        peers = tuple(node_config.Peer(p.id, p.host, p.raft_port, p.api_port) for p in self.nodes if p.id != node.id)
        return node_config.NodeConfig(
            node_id=node.id,
            data_dir=str(node.state_dir),
            host=node.host,
            raft_port=node.raft_port,
            api_port=node.api_port,
            peers=peers,
            tenants=(node_config.Tenant(DEFAULT_TENANT, self.token),),
            raft_secret=self.raft_secret,
            admin_token=self.admin_token,
        )


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What `up` returns: the running cluster, its leader and what this call started."""

    data_dir: Path
    token: str
    nodes: tuple[LocalNode, ...]
    leader: str  # node id of the leader when up() returned
    started: tuple[str, ...]  # ids of the nodes this call started; the others were running

    @property
    def servers(self) -> list[str]:
        return [n.api_address for n in self.nodes]


# ---------------------------------------------------------------- layout


def _cluster_file(data_dir: str | Path) -> Path:
    return Path(data_dir).resolve() / CLUSTER_FILE


def layout_exists(data_dir: str | Path) -> bool:
    return _cluster_file(data_dir).exists()


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file + rename), readable by the owner only.

    The files hold the tenant token, so they are not world-readable.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_node_config(layout: Layout, node: LocalNode) -> None:
    cfg = layout.node_config(node)
    node.dir.mkdir(parents=True, exist_ok=True)
    _write_private(node.config_path, cfg.to_toml())
    # Check the fact twice: what the node will read back is what we meant to write.
    if node_config.load(node.config_path) != cfg:
        raise ClusterError(f"{node.config_path} does not read back as written")


def write_layout(
    data_dir: str | Path,
    nodes: int = 3,
    base_raft_port: int = 7100,
    base_api_port: int = 7200,
    *,
    token: str | None = None,
) -> Layout:
    """Create (or overwrite) the layout of a new local cluster; starts nothing.

    Node files are written before cluster.toml, so a crash half-way leaves no
    cluster.toml and the next `up` writes the whole layout again.
    """
    if not 1 <= nodes <= NODES_MAX:
        raise ClusterError(f"--nodes must be between 1 and {NODES_MAX}, got {nodes}")
    for name, port in (("raft port", base_raft_port), ("api port", base_api_port)):
        if not 1 <= port <= 65535:
            raise ClusterError(f"{name} must be between 1 and 65535, got {port}")
    if base_raft_port == base_api_port:
        raise ClusterError(f"the raft and api ports must differ, both are {base_raft_port}")
    root = Path(data_dir).resolve()
    layout = Layout(
        data_dir=root,
        nodes=tuple(
            LocalNode(f"n{i}", f"127.0.0.{i}", base_raft_port, base_api_port, root / f"n{i}")
            for i in range(1, nodes + 1)
        ),
        token=token if token is not None else secrets.token_hex(16),
        raft_secret=secrets.token_hex(16),
        admin_token=secrets.token_hex(16),
    )
    root.mkdir(parents=True, exist_ok=True)
    for node in layout.nodes:
        _write_node_config(layout, node)
        node.state_dir.mkdir(exist_ok=True)
    _write_cluster_file(layout)
    return layout


def _write_cluster_file(layout: Layout) -> None:
    root = layout.data_dir
    doc = {
        "format": LAYOUT_FORMAT,
        "nodes": [{"id": n.id, "host": n.host, "raft_port": n.raft_port, "api_port": n.api_port} for n in layout.nodes],
        "tenants": [{"name": DEFAULT_TENANT, "token": layout.token}],
        "raft_secret": layout.raft_secret,
        "admin_token": layout.admin_token,
    }
    header = (
        "# A local floe cluster, written by `floe cluster up`. The launcher reads the node\n"
        "# list from here; each node reads its own settings from <id>/node.toml.\n"
    )
    _write_private(root / CLUSTER_FILE, header + tomli_w.dumps(doc))
    if load_layout(root) != layout:
        raise ClusterError(f"{root / CLUSTER_FILE} does not read back as written")


def load_layout(data_dir: str | Path) -> Layout:
    """Read cluster.toml; ClusterError if there is no cluster or the file is invalid."""
    path = _cluster_file(data_dir)
    root = path.parent
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        hint = f"start one with `floe cluster up --data-dir {data_dir}`"
        raise ClusterError(f"no local cluster in {root} ({hint})") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ClusterError(f"cannot read {path}: {e}") from e
    try:
        if raw.get("format") != LAYOUT_FORMAT:
            raise ClusterError(f"{path}: unsupported format {raw.get('format')!r} (expected {LAYOUT_FORMAT})")
        nodes = []
        for entry in raw["nodes"]:
            node_id = str(entry["id"])
            if not _NODE_ID_RE.match(node_id):
                raise ClusterError(f"{path}: bad node id {node_id!r}")
            nodes.append(LocalNode(node_id, str(entry["host"]), int(entry["raft_port"]), int(entry["api_port"]),
                                   root / node_id))
        tokens = [str(t["token"]) for t in raw["tenants"] if t.get("name") == DEFAULT_TENANT]
    except (KeyError, TypeError, ValueError) as e:
        raise ClusterError(f"{path}: invalid cluster file ({type(e).__name__}: {e})") from e
    ids = [n.id for n in nodes]
    if not nodes or len(set(ids)) != len(ids):
        raise ClusterError(f"{path}: the node list must be non-empty with unique ids, got {ids}")
    if len(tokens) != 1:
        raise ClusterError(f"{path}: expected exactly one [[tenants]] entry named {DEFAULT_TENANT!r}")
    return Layout(root, tuple(sorted(nodes, key=lambda n: n.id)), tokens[0], str(raw.get("raft_secret", "")),
                  str(raw.get("admin_token", "")))


def ensure_layout(
    data_dir: str | Path, nodes: int = 3, base_raft_port: int = 7100, base_api_port: int = 7200
) -> Layout:
    """Reuse the layout in `data_dir` if there is one, else write a new one.

    A reused layout must match what was asked for: silently starting a 3-node
    cluster when 5 were asked for would be a surprise found much later.
    Node files that went missing are written again from cluster.toml.
    """
    if not layout_exists(data_dir):
        return write_layout(data_dir, nodes, base_raft_port, base_api_port)
    layout = load_layout(data_dir)
    first = layout.nodes[0]
    if (len(layout.nodes), first.raft_port, first.api_port) != (nodes, base_raft_port, base_api_port):
        raise ClusterError(
            f"{layout.data_dir} holds a {len(layout.nodes)}-node cluster on raft port {first.raft_port} and "
            f"api port {first.api_port}, not the {nodes} nodes on ports {base_raft_port}/{base_api_port} asked "
            "for; use another --data-dir, or `floe cluster down` and remove the directory to start afresh"
        )
    if not layout.admin_token:
        # A cluster made before the object tier: give it its admin token now.
        layout = dataclasses.replace(layout, admin_token=secrets.token_hex(16))
        for node in layout.nodes:
            _write_node_config(layout, node)
        _write_cluster_file(layout)
    for node in layout.nodes:
        if not node.config_path.exists():
            _write_node_config(layout, node)
        node.state_dir.mkdir(parents=True, exist_ok=True)
    return layout


def admin_token(data_dir: str | Path) -> str:
    """The cluster's admin token (blob service, `floe blob`)."""
    return load_layout(data_dir).admin_token


def token(data_dir: str | Path) -> str:
    """The default tenant's token of the local cluster in `data_dir`."""
    return load_layout(data_dir).token


def servers(data_dir: str | Path) -> list[str]:
    """The API (gRPC) addresses of every node of the local cluster in `data_dir`."""
    return [n.api_address for n in load_layout(data_dir).nodes]


# ---------------------------------------------------------------- processes

# Nodes started by this process. They are our children, so we must reap them
# (Popen.poll) or a dead node lingers as a zombie; the exit codes of reaped
# ones are kept for error messages, the most recent CHILD_EXITS_KEPT of them.
_children: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
_child_exits: dict[int, int] = {}
_children_lock = threading.Lock()
CHILD_EXITS_KEPT = 256


def _have_proc() -> bool:
    return Path("/proc/self/cmdline").exists()


# For a few ms while a process execs, /proc/PID/cmdline reads empty, as it does
# for a zombie or a kernel thread; an empty read of a live process is retried
# this many times, CMDLINE_RETRY_S apart, before it counts as not our node.
CMDLINE_RETRIES = 10
CMDLINE_RETRY_S = 0.005


def _is_node_process(pid: int, config_path: Path) -> bool:
    """True if `pid` is alive and is the floe node started with `config_path`."""
    with _children_lock:
        child = _children.get(pid)
        if child is not None:
            proc, child_config = child
            if proc.poll() is None:
                return child_config == config_path
            del _children[pid]
            _child_exits[pid] = proc.returncode
            while len(_child_exits) > CHILD_EXITS_KEPT:
                del _child_exits[next(iter(_child_exits))]
            return False
    if not _have_proc():  # no /proc (macOS): trust that the pid is alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for _ in range(CMDLINE_RETRIES):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if cmdline:
                return os.fsencode(str(config_path)) in cmdline.split(b"\0")
            # The state follows the parenthesized command name, which may itself hold spaces.
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):  # gone, or not ours to read
            return False
        if state in ("Z", "X"):  # exited, not yet reaped by its parent
            return False
        time.sleep(CMDLINE_RETRY_S)
    return False


def read_pid(node: LocalNode) -> int | None:
    """The pid in node.pid, or None if there is no pid file or it does not hold a pid."""
    try:
        text = node.pid_path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        pid = int(text)
    except ValueError:
        return None
    return pid if pid > 0 else None


def running_pid(node: LocalNode) -> int | None:
    """The pid of the running node, or None if it is down.

    A stale pid file (the process exited, or its pid now belongs to some other
    process) counts as down; the file is left for `up`, `start` or `down` to replace.
    """
    pid = read_pid(node)
    if pid is None or not _is_node_process(pid, node.config_path):
        return None
    return pid


def _remove_pid_file(node: LocalNode) -> None:
    with contextlib.suppress(FileNotFoundError):
        node.pid_path.unlink()


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """Serialize starting and stopping nodes of one cluster across processes."""
    with open(layout.data_dir / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def port_in_use(host: str, port: int) -> bool:
    """True if something listens on host:port (so a node there would fail to bind).

    SO_REUSEADDR makes TIME_WAIT leftovers of a stopped node not count; on Linux
    the bind still fails while any socket listens on the port, even one that
    set SO_REUSEADDR or SO_REUSEPORT itself.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    # The node must import this very checkout of floe, whatever its working
    # directory and whether or not floe is installed.
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), path]) if path else str(_ROOT)
    env["PYTHONUNBUFFERED"] = "1"  # so node.log is current when we show its tail
    return env


def _check_ports_free(nodes: Sequence[LocalNode]) -> None:
    """Fail before starting anything if a node's address is taken: better than a node log full of bind errors."""
    for node in nodes:
        for kind, port in (("raft", node.raft_port), ("api", node.api_port)):
            if port_in_use(node.host, port):
                raise ClusterError(
                    f"cannot start {node.id}: its {kind} address {node.host}:{port} is already in use by another "
                    "process (another floe cluster? stop it with `floe cluster down --data-dir ITS_DIR`)"
                )


def _spawn(node: LocalNode) -> int:
    """Start `node` as a detached process; the caller holds the lock and checked its ports. Returns the pid."""
    node.dir.mkdir(parents=True, exist_ok=True)
    node.state_dir.mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if node.log_path.stat().st_size > NODE_LOG_BYTES_MAX:
            os.replace(node.log_path, node.log_path.with_name(NODE_LOG_FILE + ".1"))
    argv = [sys.executable, "-m", "cluster.cli", "node", "run", "--config", str(node.config_path)]
    with open(node.log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.write(f"{_START_MARK} node={node.id} time={stamp} config={node.config_path}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=node.dir,
            env=_node_env(),
            start_new_session=True,
            close_fds=True,
        )
    with _children_lock:
        _children[proc.pid] = (proc, node.config_path)
    _write_private(node.pid_path, f"{proc.pid}\n")
    return proc.pid


def _signal(pid: int, sig: int) -> None:
    """Send `sig` to the node and anything it started (its process group), if it leads one."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(procs: dict[LocalNode, int], timeout_s: float) -> dict[LocalNode, int]:
    """Wait up to `timeout_s` for the processes to exit; returns the ones still running."""
    deadline = time.monotonic() + timeout_s
    alive = dict(procs)
    while alive:
        alive = {n: pid for n, pid in alive.items() if _is_node_process(pid, n.config_path)}
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return alive


def _exit_description(pid: int) -> str:
    with _children_lock:
        code = _child_exits.get(pid)
    if code is None:  # not our child: its exit code went to whoever started it
        return f"process {pid} exited"
    if code < 0:
        return f"process {pid} died of {signal.Signals(-code).name}"
    return f"process {pid} exited with code {code}"


def log_tail(node: LocalNode, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines the node's latest run wrote to its log (bounded read).

    The log is appended across restarts; the launcher marks each start, and
    only what follows the last mark is about the run that just failed.
    """
    try:
        with open(node.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_BYTES_MAX))
            data = f.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    starts = [i for i, line in enumerate(text) if line.startswith(_START_MARK)]
    return text[starts[-1] if starts else 0:][-lines:]


# ---------------------------------------------------------------- status probes


class _Prober:
    """Asks nodes for their Raft status in parallel, one KVClient per node."""

    def __init__(self, layout: Layout, nodes: Sequence[LocalNode]) -> None:
        client_class = kv_client_class()
        self._nodes = tuple(nodes)
        self._clients = {
            n.id: cast(StatusClient, client_class([n.api_address], layout.token, timeout_s=PROBE_TIMEOUT_S, attempts=1))
            for n in self._nodes
        }
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self._nodes)), thread_name_prefix="floe-probe")

    def probe(self, nodes: Sequence[LocalNode]) -> dict[str, dict[str, Any] | KVError]:
        def one(node: LocalNode) -> dict[str, Any] | KVError:
            try:
                return dict(self._clients[node.id].status(node.api_address, timeout_s=PROBE_TIMEOUT_S))
            except KVError as e:
                return e

        futures = {n.id: self._pool.submit(one, n) for n in nodes}
        return {node_id: f.result() for node_id, f in futures.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self._clients.values():
            client.close()


def _describe_error(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _wait_until_up(layout: Layout, watch: Sequence[LocalNode], pids: dict[str, int], wait_s: float,
                   *, need_leader: bool) -> str:
    """Poll until every node in `watch` answers status (and, if asked, one is leader).

    Returns the leader's id ("" if none is known). Fails at once if a watched
    process exits, and at the deadline otherwise, naming each node that is not
    up and showing the tail of its log.
    """
    if wait_s <= 0:
        raise ClusterError(f"wait_s must be > 0, got {wait_s}")
    deadline = time.monotonic() + wait_s
    prober = _Prober(layout, watch)
    try:
        while True:
            results = prober.probe(watch)
            exited = {n.id: _exit_description(pids[n.id]) for n in watch
                      if not _is_node_process(pids[n.id], n.config_path)}
            answered = {i: r for i, r in results.items() if isinstance(r, dict)}
            leaders = [i for i, r in answered.items() if r.get("role") == "leader"]
            if not exited and len(answered) == len(watch) and (leaders or not need_leader):
                return leaders[0] if leaders else ""
            if exited or time.monotonic() >= deadline:
                raise ClusterError(_not_up_message(layout, watch, results, exited, wait_s, need_leader and not leaders))
            time.sleep(PROBE_INTERVAL_S)
    finally:
        prober.close()


def _not_up_message(layout: Layout, watch: Sequence[LocalNode], results: dict[str, dict[str, Any] | KVError],
                    exited: dict[str, str], wait_s: float, no_leader: bool) -> str:
    if exited:
        head = f"{', '.join(sorted(exited))} of the cluster in {layout.data_dir} exited while starting:"
    else:
        head = f"the cluster in {layout.data_dir} did not come up within {wait_s:g} s:"
    lines = [head]
    silent: list[LocalNode] = []
    for node in watch:
        r = results[node.id]
        if node.id in exited:
            state = exited[node.id]
        elif isinstance(r, dict):
            state = f"up, role {r.get('role')}, term {r.get('term')}"
        else:
            state = f"not answering status ({_describe_error(r)})"
            silent.append(node)
        lines.append(f"  {node.id} ({node.api_address}): {state}")
    if no_leader and not exited:
        lines.append("  no leader was elected")
    # The logs worth reading: a node that exited explains itself; otherwise the
    # ones that do not answer; otherwise (no leader) all of them.
    if exited:
        to_show = [n for n in watch if n.id in exited]
    else:
        to_show = silent or list(watch)
    for node in to_show:
        lines.append(f"last lines of {node.log_path}:")
        lines.extend(f"  | {line}" for line in log_tail(node) or ["(empty)"])
    lines.append("nodes that did start are still running: see `floe cluster status`, "
                 "stop them with `floe cluster down`")
    return "\n".join(lines)


# ---------------------------------------------------------------- commands


def up(
    data_dir: str | Path,
    nodes: int = 3,
    base_raft_port: int = 7100,
    base_api_port: int = 7200,
    wait_s: float = 30,
) -> ClusterInfo:
    """Bring the local cluster in `data_dir` up, creating it on first use.

    Starts every node that is not running, then returns once every node answers
    status and a leader is elected, or raises ClusterError naming the nodes that
    are not up, with the tail of their logs. Nodes are left running on failure.
    """
    layout = ensure_layout(data_dir, nodes, base_raft_port, base_api_port)
    started: list[str] = []
    pids: dict[str, int] = {}
    with _locked(layout):
        for node in layout.nodes:
            pid = running_pid(node)
            if pid is not None:
                pids[node.id] = pid
        to_start = [n for n in layout.nodes if n.id not in pids]
        _check_ports_free(to_start)
        for node in to_start:
            pids[node.id] = _spawn(node)
            started.append(node.id)
    leader = _wait_until_up(layout, layout.nodes, pids, wait_s, need_leader=True)
    return ClusterInfo(layout.data_dir, layout.token, layout.nodes, leader, tuple(started))


def down(data_dir: str | Path, *, stop_wait_s: float = STOP_WAIT_S) -> list[str]:
    """Stop every node: SIGTERM, up to `stop_wait_s` to exit, then SIGKILL.

    Removes every pid file (stale ones too). Returns the ids of the nodes that
    were running.
    """
    layout = load_layout(data_dir)
    with _locked(layout):
        running = {n: pid for n in layout.nodes if (pid := running_pid(n)) is not None}
        for pid in running.values():
            _signal(pid, signal.SIGTERM)
        survivors = _wait_gone(running, stop_wait_s)
        for pid in survivors.values():
            _signal(pid, signal.SIGKILL)
        stuck = _wait_gone(survivors, KILL_WAIT_S)
        for node in layout.nodes:
            if node not in stuck:
                _remove_pid_file(node)
    if stuck:
        names = ", ".join(f"{n.id} (pid {pid})" for n, pid in stuck.items())
        raise ClusterError(f"{names} did not exit {KILL_WAIT_S:g} s after SIGKILL")
    return [n.id for n in running]


# Signals after which the launcher waits for the node to be gone.
_FATAL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT})


def kill(data_dir: str | Path, node_id: str, sig: int = signal.SIGKILL) -> int:
    """Send `sig` to one node and return its pid.

    After SIGKILL, SIGTERM or SIGINT this waits (bounded) until the process is
    gone and removes its pid file; other signals (SIGSTOP, SIGCONT) return at once.
    """
    layout = load_layout(data_dir)
    node = layout.node(node_id)
    with _locked(layout):
        pid = running_pid(node)
        if pid is None:
            raise ClusterError(f"{node_id} is not running")
        _signal(pid, sig)
        if sig in _FATAL_SIGNALS:
            wait_s = KILL_WAIT_S if sig == signal.SIGKILL else STOP_WAIT_S
            if _wait_gone({node: pid}, wait_s):
                name = signal.Signals(sig).name
                raise ClusterError(f"{node_id} (pid {pid}) is still running {wait_s:g} s after {name}")
            _remove_pid_file(node)
    return pid


def start(data_dir: str | Path, node_id: str, wait_s: float = 30) -> int:
    """Start one node (if it is not running) and wait until it answers status; returns its pid."""
    layout = load_layout(data_dir)
    node = layout.node(node_id)
    if not node.config_path.exists():
        ensure_layout(data_dir, len(layout.nodes), node.raft_port, node.api_port)
    with _locked(layout):
        pid = running_pid(node)
        if pid is None:
            _check_ports_free([node])
            pid = _spawn(node)
    _wait_until_up(layout, [node], {node.id: pid}, wait_s, need_leader=False)
    return pid


STATUS_KEYS = ("id", "pid", "address", "role", "term", "commit_index", "applied_index", "healthy", "raft_address")


def status(data_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per node with the keys in STATUS_KEYS.

    role is "down" for a node whose process is not running or does not answer;
    term and the indexes are then None. healthy means the node answers, reports
    ready, and is the leader or knows one.
    """
    layout = load_layout(data_dir)
    pids = {n.id: running_pid(n) for n in layout.nodes}
    live = [n for n in layout.nodes if pids[n.id] is not None]
    results: dict[str, dict[str, Any] | KVError] = {}
    if live:
        prober = _Prober(layout, live)
        try:
            results = prober.probe(live)
        finally:
            prober.close()
    out = []
    for node in layout.nodes:
        entry: dict[str, Any] = {
            "id": node.id, "pid": pids[node.id], "address": node.api_address, "role": "down", "term": None,
            "commit_index": None, "applied_index": None, "healthy": False, "raft_address": node.raft_address,
        }
        r = results.get(node.id)
        if isinstance(r, dict):
            role = str(r.get("role", "")) or "unknown"
            entry.update(
                role=role,
                term=r.get("term"),
                commit_index=r.get("commit_index"),
                applied_index=r.get("applied_index"),
                healthy=bool(r.get("ready")) and (role == "leader" or bool(r.get("leader"))),
            )
        out.append(entry)
    return out

