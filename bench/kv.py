"""`floe bench kv`: what floe's durability and API cost on top of the Raft library it is built on.

Theory of operation. One run measures three layers, each a three-node group on
127.0.0.1-3, one after the other (never two at once: they share the CPUs):

  (a) bare        pysyncobj 0.3.17 replicating a dict, in-memory log, default TCP
                  transport. The floor: nothing floe does can be faster.
  (b) floe_raft   floe's Raft layer in-process: kv.raft.RaftNode + kv.state.KVState
                  with the durable journal and the persistence barrier (fsyncs
                  on), committing serialized kv_pb2.Command puts as the gRPC
                  server does.
  (c) end_to_end  a real local cluster (cluster.launcher on --data-dir, Raft port
                  7300 and API port 7400 so it never meets a user's default
                  cluster on 7100/7200), driven over gRPC with the tenant token.

(a) and (b) use the same pysyncobj settings (cluster.node.raft_conf of one
RaftTiming: the defaults, or --timing overrides) and the same load code
(bench/raftbench.py runs in each of the three processes; the leader runs the
load in-process). (c) uses whatever timing the cluster's node.toml holds, and
the report says which.

Figures, per layer: committed puts/s of 100-byte values with 64 in flight over
--seconds after a 1 s warm-up; one-at-a-time put latency p50/p99 over --seconds
or 2000 puts. For (c) also the failover gap: SIGKILL the leader, put in a loop
with a short deadline per call until one commits, report the seconds from the
kill to that commit, then restart the node. The report gives (b) and (c)
against (a): throughput ratios and p50 differences.

`--sweep` runs only (a) and (b) for a grid of timings, a shorter time each, one
row per timing: it is how floe's RaftTiming defaults were chosen.

Every process this module starts is stopped in a `finally` (the raftbench
group with SIGTERM then SIGKILL, the cluster with launcher.down), also on
Ctrl-C; a raftbench process also exits by itself when this process dies (its
stdin closes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc

from bench import raftbench
from cluster import launcher
from cluster.config import RaftTiming
from kv.errors import AlreadyExists, KVError

# ---------------------------------------------------------------- limits and ports

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
# The raftbench groups take one port from this range per run (the same port on
# every address); a fresh port per run keeps a lingering socket of the previous
# group from mattering. 7100/7200 belong to a user's default cluster.
GROUP_PORTS = range(7500, 7600)
# The end-to-end cluster's ports.
CLUSTER_RAFT_PORT = 7300
CLUSTER_API_PORT = 7400
CLUSTER_NODES = 3
CLUSTER_UP_WAIT_S = 30.0
# A raftbench group must report within this long beyond its planned run time
# (election, connections, setup commits, drain of the last commands).
GROUP_SLACK_S = raftbench.LEADER_WAIT_S + raftbench.DRAIN_S_MAX
# A raftbench process gets this long to exit on SIGTERM before SIGKILL.
STOP_WAIT_S = 5.0
# Lines of a failed member's stderr shown in the error.
STDERR_TAIL_LINES = 15
# gRPC deadline of one put in the end-to-end throughput phase, and the longest
# the loop waits for any one of its 64 puts to finish.
RPC_TIMEOUT_S = 5.0
COMPLETION_WAIT_S_MAX = 2 * RPC_TIMEOUT_S
# Failover: the whole-call deadline of one put while the cluster has no leader
# (short, so a put to a dead or deposed node does not hide the new leader),
# and the longest the benchmark waits for a commit after the kill.
FAILOVER_PUT_TIMEOUT_S = 0.5
FAILOVER_PUT_ATTEMPTS = 3
FAILOVER_WAIT_S_MAX = 30.0
# Sweep runs are shorter: a third of --seconds, but at least this long.
SWEEP_SECONDS_MIN = 2.0

# The timings `--sweep` compares: batching on and off, a 1 ms and a 5 ms tick,
# and three AppendEntries periods (pysyncobj's batching delay in batch mode).
SWEEP_GRID: tuple[dict[str, Any], ...] = tuple(
    {"use_batch": batch, "tick_s": tick, "append_entries_period_s": period}
    for batch in (False, True)
    for tick in (0.001, 0.005)
    for period in (0.002, 0.01, 0.05)
)

# Report rows (the JSON keys) and how the table names them.
ROW_NAMES = {
    "bare": "(a) pysyncobj 0.3.17, bare (in-memory log)",
    "floe_raft": "(b) floe Raft layer (RaftNode + KVState, fsync)",
    "end_to_end": "(c) floe end to end (3 nodes, gRPC)",
}
# bench/raftbench.py --mode of the two in-process rows.
RAFTBENCH_MODE = {"bare": "bare", "floe_raft": "floe"}

_REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The benchmark could not run; the message says which layer and why."""


def floe_module(name: str) -> Any:
    """Import kv.client, proto or cluster.node by name (see raftbench.floe_module for why)."""
    return importlib.import_module(name)


def _progress(text: str) -> None:
    print(f"bench: {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- timing


def parse_timing(text: str | None, base: RaftTiming | None = None) -> RaftTiming:
    """`tick_s=0.001,use_batch=false` -> RaftTiming with those fields replaced."""
    timing = base or RaftTiming()
    if not text:
        return timing
    defaults = RaftTiming()
    fields = {f.name for f in dataclasses.fields(RaftTiming)}
    changes: dict[str, Any] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or name not in fields:
            raise BenchError(f"--timing: {item!r} is not FIELD=VALUE with FIELD one of {sorted(fields)}")
        want = type(getattr(defaults, name))
        try:
            if want is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                changes[name] = raw.lower() in ("true", "1", "yes", "on")
            else:
                changes[name] = want(raw)
        except ValueError:
            raise BenchError(f"--timing: {name} must be a {want.__name__}, got {raw!r}") from None
        if want is not bool and changes[name] <= 0:
            raise BenchError(f"--timing: {name} must be > 0, got {raw!r}")
    timing = dataclasses.replace(timing, **changes)
    check_timing(timing)
    return timing


def check_timing(t: RaftTiming) -> None:
    """The same range rules as a node's config (cluster/config.py parse)."""
    if not 0 < t.election_min_s < t.election_max_s:
        raise BenchError("timing: election_min_s must be > 0 and < election_max_s")
    if t.election_min_s <= 3 * t.append_entries_period_s:
        raise BenchError("timing: election_min_s must exceed 3 x append_entries_period_s")


def timing_label(t: RaftTiming) -> str:
    return (f"batch={'on' if t.use_batch else 'off'} tick={t.tick_s * 1000:g}ms "
            f"ae={t.append_entries_period_s * 1000:g}ms")


def raft_conf(t: RaftTiming) -> dict[str, Any]:
    conf: dict[str, Any] = floe_module("cluster.node").raft_conf(t)
    return conf


# ---------------------------------------------------------------- machine facts


def _filesystem_of(path: str) -> str:
    """The type of the filesystem holding `path` (fsync cost depends on it), from /proc/mounts."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def machine_facts(data_dir: str) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "pysyncobj": _version("pysyncobj"),
        "grpcio": _version("grpcio"),
        "data_dir_filesystem": _filesystem_of(data_dir),
    }


# ---------------------------------------------------------------- (a), (b): a raftbench group


class _PortPicker:
    """Hands out GROUP_PORTS in turn, skipping ports something listens on."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> int:
        for _ in range(len(GROUP_PORTS)):
            port = GROUP_PORTS[self._next % len(GROUP_PORTS)]
            self._next += 1
            if not any(floe_module("cluster.launcher").port_in_use(h, port) for h in HOSTS):
                return port
        raise BenchError(f"no free port in {GROUP_PORTS.start}-{GROUP_PORTS.stop - 1} on {', '.join(HOSTS)}")


def _stderr_tail(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-STDERR_TAIL_LINES:]
    except OSError:
        return []


class RaftGroup:
    """Three `python -m bench.raftbench` processes; `wait_result` returns the leader's result line."""

    def __init__(self, row: str, timing: RaftTiming, seconds: float, port: int, work_dir: Path) -> None:
        self.row, self.mode = row, RAFTBENCH_MODE[row]
        self.timing, self.seconds, self.port, self.work_dir = timing, seconds, port, work_dir
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lines: queue.Queue[tuple[int, bytes | None]] = queue.Queue()

    def _argv(self, i: int) -> list[str]:
        me = f"{HOSTS[i]}:{self.port}"
        peers = ",".join(f"{h}:{self.port}" for h in HOSTS if h != HOSTS[i])
        return [sys.executable, "-m", "bench.raftbench", "--mode", self.mode, "--self", me, "--peers", peers,
                "--seconds", repr(self.seconds), "--dir", str(self.work_dir / f"m{i + 1}"),
                "--timing-json", json.dumps(dataclasses.asdict(self.timing))]

    def _read(self, i: int, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            self._lines.put((i, line))
        self._lines.put((i, None))

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        for i in range(len(HOSTS)):
            with open(self.work_dir / f"m{i + 1}.stderr", "wb") as err:
                proc = subprocess.Popen(self._argv(i), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                        cwd=self.work_dir, env=env, start_new_session=True, close_fds=True)
            self._procs.append(proc)
            threading.Thread(target=self._read, args=(i, proc.stdout), name=f"raftbench-out-{i}", daemon=True).start()

    def wait_result(self) -> dict[str, Any]:
        planned_s = raftbench.WARMUP_S + 2 * self.seconds
        deadline = time.monotonic() + planned_s + GROUP_SLACK_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure(f"no result within {planned_s + GROUP_SLACK_S:.0f} s")
            try:
                i, line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:  # its stdout closed: the member is exiting
                try:
                    code: int | None = self._procs[i].wait(timeout=STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    code = None
                raise self._failure(f"member {i + 1} closed its stdout (exit code {code}) before a result")
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # not ours (a library printing to stdout)
            if msg.get("event") == "result":
                return dict(msg)
            if msg.get("event") == "error":
                raise self._failure(f"the leader's load failed: {msg.get('error')}")

    def _failure(self, what: str) -> BenchError:
        lines = [f"{ROW_NAMES[self.row]} on port {self.port}: {what}"]
        for i in range(len(self._procs)):
            path = self.work_dir / f"m{i + 1}.stderr"
            tail = _stderr_tail(path)
            if tail:
                lines.append(f"member {i + 1} ({HOSTS[i]}:{self.port}), last lines of its stderr:")
                lines.extend(f"  | {t}" for t in tail)
        return BenchError("\n".join(lines))

    def stop(self) -> None:
        """SIGTERM every member's process group, SIGKILL what is left after STOP_WAIT_S."""
        for proc in self._procs:
            if proc.poll() is None:
                _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_WAIT_S)
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session made each member its own group leader
    except ProcessLookupError:
        pass


def run_group(row: str, timing: RaftTiming, seconds: float, data_dir: str, ports: _PortPicker) -> dict[str, Any]:
    """Run one raftbench group to its result; every process is gone when this returns."""
    os.makedirs(data_dir, exist_ok=True)
    # Journals go under --data-dir, not /tmp: the fsync cost is the disk's the
    # cluster of row (c) uses, and /tmp is a tmpfs on many systems.
    work_dir = Path(tempfile.mkdtemp(prefix=f"raftbench-{row}-", dir=data_dir))
    group = RaftGroup(row, timing, seconds, ports.take(), work_dir)
    try:
        group.start()
        result = group.wait_result()
    finally:
        group.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    return _row(result["throughput"], result["latency"],
                {k: v for k, v in result.items() if k not in ("throughput", "latency", "event")})


def _row(throughput: dict[str, Any], latency: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One layer's figures, flat, in the JSON report's shape."""
    return {"puts_per_s": throughput["puts_per_s"], "latency_ms_p50": latency["latency_ms_p50"],
            "latency_ms_p99": latency["latency_ms_p99"], "throughput": throughput, "latency": latency, **extra}


# ---------------------------------------------------------------- (c): the local cluster over gRPC


def grpc_throughput(address: str, token: str, seconds: float, *, in_flight: int = raftbench.IN_FLIGHT,
                    warmup_s: float = raftbench.WARMUP_S) -> dict[str, Any]:
    """64 Put futures in flight from this one thread, each completion refilled at once."""
    kv_pb2, kv_pb2_grpc = floe_module("proto.kv_pb2"), floe_module("proto.kv_pb2_grpc")
    metadata = ((floe_module("kv.server").TOKEN_METADATA, token),)
    channel = grpc.insecure_channel(address)
    done: queue.Queue[Any] = queue.Queue()
    try:
        stub = kv_pb2_grpc.KVStub(channel)
        seq = 0

        def issue() -> None:
            nonlocal seq
            req = kv_pb2.PutRequest(store=raftbench.STORE, keyspace=raftbench.KEYSPACE, key=raftbench.key_of(seq),
                                    value=raftbench.VALUE, request_id=os.urandom(16))
            seq += 1
            stub.Put.future(req, metadata=metadata, timeout=RPC_TIMEOUT_S).add_done_callback(done.put)

        ok = failed = completed = 0
        errors: dict[str, int] = {}
        t_open = time.monotonic() + warmup_s
        t_close = t_open + seconds
        outstanding = in_flight
        wall0, cpu0 = time.monotonic(), time.process_time()
        for _ in range(in_flight):
            issue()
        while outstanding:
            try:
                fut = done.get(timeout=COMPLETION_WAIT_S_MAX)
            except queue.Empty:
                raise BenchError(f"{outstanding} gRPC puts to {address} did not finish within "
                                 f"{COMPLETION_WAIT_S_MAX:g} s (deadline {RPC_TIMEOUT_S:g} s)") from None
            now = time.monotonic()
            completed += 1
            code = fut.code()
            if t_open <= now < t_close:
                if code == grpc.StatusCode.OK:
                    ok += 1
                else:
                    failed += 1
                    errors[str(code)] = errors.get(str(code), 0) + 1
            if now < t_close:
                issue()
            else:
                outstanding -= 1
        # The client's own CPU per wall second: near 1.0 would mean this one
        # Python thread, not the cluster, limits the figure.
        cpu_per_wall_s = (time.process_time() - cpu0) / max(1e-9, time.monotonic() - wall0)
    finally:
        channel.close()
    return {"puts_per_s": ok / seconds, "committed": ok, "failed": failed, "errors": errors, "in_flight": in_flight,
            "window_s": seconds, "warmup_s": warmup_s, "completed_total": completed, "drained": True, "stuck": 0,
            "client_cpu_per_wall_s": cpu_per_wall_s}


def client_latency(client: Any, seconds: float, *, samples_max: int = raftbench.LATENCY_SAMPLES_MAX) -> dict[str, Any]:
    """KVClient.put one at a time (the client has found the leader already)."""
    samples_ms: list[float] = []
    failed = 0
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < deadline and len(samples_ms) < samples_max:
        t0 = time.perf_counter()
        try:
            client.put(raftbench.STORE, raftbench.KEYSPACE, raftbench.key_of(seq), raftbench.VALUE)
        except KVError as e:
            failed += 1
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        else:
            samples_ms.append((time.perf_counter() - t0) * 1000.0)
        seq += 1
    samples_ms.sort()
    return {"samples": len(samples_ms), "failed": failed, "errors": errors,
            "latency_ms_p50": raftbench.percentile(samples_ms, 0.50),
            "latency_ms_p99": raftbench.percentile(samples_ms, 0.99),
            "latency_ms_mean": sum(samples_ms) / len(samples_ms) if samples_ms else math.nan,
            "latency_ms_max": samples_ms[-1] if samples_ms else math.nan}


def _leader(data_dir: str, wait_s: float = 10.0) -> dict[str, Any]:
    """The status entry of the node that says it leads (bounded wait: one may be electing)."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = launcher.status(data_dir)
        leaders = [n for n in nodes if n["role"] == "leader"]
        if len(leaders) == 1:
            return leaders[0]
        if time.monotonic() >= deadline:
            raise BenchError(f"no single leader in {data_dir} after {wait_s:g} s: "
                             + ", ".join(f"{n['id']}={n['role']}" for n in nodes))
        time.sleep(0.1)


def leader_failover(data_dir: str, servers: Sequence[str], token: str) -> dict[str, Any]:
    """SIGKILL the leader; seconds from the kill to the next committed put. Restarts the node after."""
    client = floe_module("kv.client").KVClient(servers, token, timeout_s=FAILOVER_PUT_TIMEOUT_S,
                                               attempts=FAILOVER_PUT_ATTEMPTS)
    try:
        old = _leader(data_dir)
        client.put(raftbench.STORE, raftbench.KEYSPACE, b"failover-warm", raftbench.VALUE)  # finds the leader
        t_kill = time.monotonic()
        launcher.kill(data_dir, old["id"])
        t_dead = time.monotonic()
        tries = 0
        errors: dict[str, int] = {}
        while True:
            tries += 1
            try:
                client.put(raftbench.STORE, raftbench.KEYSPACE, b"failover-%d" % tries, raftbench.VALUE)
                break
            except KVError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                if time.monotonic() - t_kill > FAILOVER_WAIT_S_MAX:
                    raise BenchError(f"no put committed within {FAILOVER_WAIT_S_MAX:g} s after killing the "
                                     f"leader {old['id']}; last error: {e}") from e
        t_commit = time.monotonic()
    finally:
        client.close()
    new = _leader(data_dir)
    launcher.start(data_dir, old["id"], wait_s=CLUSTER_UP_WAIT_S)
    return {"kill_to_commit_s": t_commit - t_kill, "kill_call_s": t_dead - t_kill, "killed": old["id"],
            "new_leader": new["id"], "put_calls": tries, "errors": errors,
            "put_timeout_s": FAILOVER_PUT_TIMEOUT_S}


def run_end_to_end(data_dir: str, seconds: float) -> dict[str, Any]:
    """Row (c): bring the cluster up, measure, kill the leader, restart it; always `down` at the end."""
    # Checked before anything starts: a directory holding some other cluster
    # (other ports or size) is refused here, and we do not stop its nodes.
    launcher.ensure_layout(data_dir, CLUSTER_NODES, CLUSTER_RAFT_PORT, CLUSTER_API_PORT)
    try:
        info = launcher.up(data_dir, nodes=CLUSTER_NODES, base_raft_port=CLUSTER_RAFT_PORT,
                           base_api_port=CLUSTER_API_PORT, wait_s=CLUSTER_UP_WAIT_S)
        layout = launcher.load_layout(data_dir)
        node_timing = floe_module("cluster.config").load(layout.nodes[0].config_path).raft
        with floe_module("kv.client").KVClient(info.servers, info.token) as client:
            for create in (lambda: client.create_store(raftbench.STORE),
                           lambda: client.create_keyspace(raftbench.STORE, raftbench.KEYSPACE)):
                try:
                    create()
                except AlreadyExists:
                    pass  # a cluster reused from an earlier run
            leader = _leader(data_dir)
            _progress(f"(c) 64 in flight against {leader['id']} ({leader['address']}) for {seconds:g} s")
            throughput = grpc_throughput(leader["address"], info.token, seconds)
            _progress(f"(c) one at a time for {seconds:g} s")
            client.put(raftbench.STORE, raftbench.KEYSPACE, b"latency-warm", raftbench.VALUE)
            latency = client_latency(client, seconds)
        _progress("(c) SIGKILL the leader, put until one commits")
        failover = leader_failover(data_dir, info.servers, info.token)
    finally:
        launcher.down(data_dir)
    return _row(throughput, latency, {"failover": failover, "timing": dataclasses.asdict(node_timing),
                                      "leader": leader["id"], "data_dir": str(info.data_dir)})


# ---------------------------------------------------------------- report


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    bare = results["bare"]
    out: dict[str, float] = {}
    for name in ("floe_raft", "end_to_end"):
        if name in results:
            out[f"{name}_vs_bare_throughput"] = _ratio(results[name]["puts_per_s"], bare["puts_per_s"])
            out[f"{name}_minus_bare_p50_ms"] = results[name]["latency_ms_p50"] - bare["latency_ms_p50"]
    return out


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """Failed or stuck commands make a row suspect; say so under the table."""
    notes = []
    for name, r in results.items():
        t, lat = r["throughput"], r["latency"]
        if t["failed"] or lat["failed"] or t["stuck"]:
            why = {**t.get("errors", {}), **{f"{k} (one at a time)": v for k, v in lat.get("errors", {}).items()}}
            notes.append(f"{ROW_NAMES[name]}: {t['failed']} failed puts under load, {lat['failed']} failed "
                         f"one-at-a-time puts, {t['stuck']} never completed; errors {why}")
    return notes


def render_markdown(report: dict[str, Any]) -> str:
    results, r = report["results"], report["ratios"]
    lines = ["| layer | puts/s, 64 in flight | vs (a) | p50 ms | p99 ms | p50 − (a) ms |",
             "|---|--:|--:|--:|--:|--:|"]
    for name, row in results.items():
        vs = "1.00×" if name == "bare" else f"{_fmt(r[f'{name}_vs_bare_throughput'])}×"
        diff = "—" if name == "bare" else f"{r[f'{name}_minus_bare_p50_ms']:+.2f}"
        lines.append(f"| {ROW_NAMES[name]} | {row['puts_per_s']:,.0f} | {vs} | {_fmt(row['latency_ms_p50'])} | "
                     f"{_fmt(row['latency_ms_p99'])} | {diff} |")
    lines.append("")
    if "end_to_end" in results:
        f = results["end_to_end"]["failover"]
        lines.append(f"Leader SIGKILL → next committed put: **{f['kill_to_commit_s']:.2f} s** "
                     f"({f['killed']} killed, {f['new_leader']} took over, {f['put_calls']} put calls of at most "
                     f"{f['put_timeout_s']:g} s).")
        lines.append("")
    m, t = report["machine"], report["timing"]
    lines.append(f"{report['seconds']:g} s per figure after a {raftbench.WARMUP_S:g} s warm-up; latency: one put at a "
                 f"time for {report['seconds']:g} s or {raftbench.LATENCY_SAMPLES_MAX} puts; "
                 f"{raftbench.VALUE_BYTES}-byte values.")
    lines.append(f"Timing of (a) and (b): {_timing_text(t['raft_layer'])}"
                 + (f"; of (c): {_timing_text(t['end_to_end'])}" if t.get("end_to_end") else "") + ".")
    lines.append(f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, pysyncobj {m['pysyncobj']}, "
                 f"{m['platform']}, journals on {m['data_dir_filesystem']}.")
    for note in _notes(results):
        lines.append(f"Note: {note}.")
    return "\n".join(lines)


def _timing_text(t: dict[str, Any]) -> str:
    return (f"tick {t['tick_s'] * 1000:g} ms, AppendEntries period {t['append_entries_period_s'] * 1000:g} ms, "
            f"batch {'on' if t['use_batch'] else 'off'}, election {t['election_min_s']:g}–{t['election_max_s']:g} s")


def render_sweep(report: dict[str, Any]) -> str:
    lines = ["| timing | (a) puts/s | (b) puts/s | (b)/(a) | (a) p50 ms | (a) p99 ms | (b) p50 ms | (b) p99 ms |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for row in report["sweep"]:
        a, b = row["results"]["bare"], row["results"]["floe_raft"]
        lines.append(f"| {row['label']} | {a['puts_per_s']:,.0f} | {b['puts_per_s']:,.0f} | "
                     f"{_fmt(row['ratios']['floe_raft_vs_bare_throughput'])} | {_fmt(a['latency_ms_p50'])} | "
                     f"{_fmt(a['latency_ms_p99'])} | {_fmt(b['latency_ms_p50'])} | {_fmt(b['latency_ms_p99'])} |")
    m = report["machine"]
    lines.append("")
    lines.append(f"{report['seconds']:g} s per figure; other timing fields at their defaults. "
                 f"Machine: {m['nproc']} CPUs, Python {m['python']}, journals on {m['data_dir_filesystem']}.")
    for row in report["sweep"]:
        for note in _notes(row["results"]):
            lines.append(f"Note ({row['label']}): {note}.")
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """NaN is not JSON; a figure that could not be measured is null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------- entry points


def run_full(data_dir: str, seconds: float, timing: RaftTiming) -> dict[str, Any]:
    ports = _PortPicker()
    results: dict[str, dict[str, Any]] = {}
    _progress(f"(a) bare pysyncobj, {seconds:g} s + {seconds:g} s")
    results["bare"] = run_group("bare", timing, seconds, data_dir, ports)
    _progress(f"(b) floe Raft layer, {seconds:g} s + {seconds:g} s")
    results["floe_raft"] = run_group("floe_raft", timing, seconds, data_dir, ports)
    _progress(f"(c) floe end to end in {data_dir} (ports {CLUSTER_RAFT_PORT}/{CLUSTER_API_PORT})")
    results["end_to_end"] = run_end_to_end(data_dir, seconds)
    return {"benchmark": "kv", "seconds": seconds, "value_bytes": raftbench.VALUE_BYTES,
            "in_flight": raftbench.IN_FLIGHT, "warmup_s": raftbench.WARMUP_S,
            "latency_samples_max": raftbench.LATENCY_SAMPLES_MAX,
            "machine": machine_facts(data_dir),
            "timing": {"raft_layer": dataclasses.asdict(timing), "pysyncobj_kwargs": raft_conf(timing),
                       "end_to_end": results["end_to_end"]["timing"]},
            "results": results, "ratios": ratios(results)}


def run_sweep(data_dir: str, seconds: float, base: RaftTiming) -> dict[str, Any]:
    ports = _PortPicker()
    rows = []
    for i, point in enumerate(SWEEP_GRID):
        timing = dataclasses.replace(base, **point)
        check_timing(timing)
        _progress(f"sweep {i + 1}/{len(SWEEP_GRID)}: {timing_label(timing)}")
        results = {"bare": run_group("bare", timing, seconds, data_dir, ports),
                   "floe_raft": run_group("floe_raft", timing, seconds, data_dir, ports)}
        rows.append({"label": timing_label(timing), "timing": dataclasses.asdict(timing),
                     "pysyncobj_kwargs": raft_conf(timing), "results": results, "ratios": ratios(results)})
    return {"benchmark": "kv-sweep", "seconds": seconds, "value_bytes": raftbench.VALUE_BYTES,
            "in_flight": raftbench.IN_FLIGHT, "warmup_s": raftbench.WARMUP_S,
            "latency_samples_max": raftbench.LATENCY_SAMPLES_MAX, "machine": machine_facts(data_dir),
            "sweep": rows}


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`floe bench kv`. args: data_dir, seconds, json; optional timing (str) and sweep (bool)."""
    out = out or sys.stdout
    seconds = float(args.seconds)
    data_dir = str(args.data_dir)
    try:
        if not seconds > 0:
            raise BenchError(f"--seconds must be > 0, got {seconds:g}")
        timing = parse_timing(getattr(args, "timing", None))
        os.makedirs(data_dir, exist_ok=True)
        if getattr(args, "sweep", False):
            report = run_sweep(data_dir, max(SWEEP_SECONDS_MIN, round(seconds / 3, 1)), timing)
            render: Callable[[dict[str, Any]], str] = render_sweep
        else:
            report = run_full(data_dir, seconds, timing)
            render = render_markdown
    except (BenchError, launcher.ClusterError, KVError) as e:
        print(f"floe: error: bench kv: {e}", file=sys.stderr)
        return 1
    if args.json:
        out.write(json.dumps(_json_safe(report), indent=2) + "\n")
    else:
        out.write(render(report) + "\n")
    out.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=".floe-bench", help="the benchmark's directory (default .floe-bench)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each measurement (default 10)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--timing", default=None, metavar="FIELD=VALUE,...",
                   help="override RaftTiming fields for (a) and (b), e.g. tick_s=0.001,use_batch=false")
    p.add_argument("--sweep", action="store_true", help="only (a) and (b), for a grid of timings")
    return p


if __name__ == "__main__":
    try:
        sys.exit(main(build_parser().parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
