"""One member of a three-process Raft benchmark group (bench/kv.py starts three).

Theory of operation. bench/kv.py compares floe's Raft layer with the library it
is built on. Each of its two in-process rows runs three of these processes on
127.0.0.1-3 (the same port on each address):

  --mode bare   a plain pysyncobj SyncObj holding a replicated dict, with
                pysyncobj's in-memory journal and its default TCP transport:
                the floor floe cannot beat;
  --mode floe   kv.raft.RaftNode with a KVState, its durable journal and its
                persistence barrier (every message waits for an fdatasync),
                committing serialized kv_pb2.Command puts, as the gRPC server does.

Both modes get the same pysyncobj settings (cluster.node.raft_conf of the
RaftTiming passed as --timing-json) and the same load code; only the object
behind `Target.submit` differs. Every process waits until it is the leader with
both peers connected, or forever as a follower. The leader alone runs the load
in-process, so no client transport is measured:

  throughput  64 commands in flight: each completion callback (it runs on the
              Raft tick thread) submits the next; completions are counted in a
              window of --seconds after a 1 s warm-up;
  latency     one command at a time (submit, wait on an Event), for --seconds
              or LATENCY_SAMPLES_MAX samples, whichever ends first.

It then prints one JSON line ({"event": "result", ...}) on stdout and idles
until bench/kv.py terminates the group. A process also exits on its own when
its stdin reaches EOF (the parent died) or after a bounded lifetime, so a
crashed benchmark leaves nothing running.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

from cluster.config import RaftTiming

# Commands kept in flight by the throughput phase (the figure: what a
# busy gRPC server with 64 handler threads keeps queued in Raft).
IN_FLIGHT = 64
# Completions before the window opens are not counted: connections, the first
# log growth and the first LevelDB writes are settling.
WARMUP_S = 1.0
# The latency phase stops after this many samples even if time remains.
LATENCY_SAMPLES_MAX = 2000
# Value size of every put: small, like floe's segment records.
VALUE_BYTES = 100
# Keys cycle through this many names, so the bare dict and the LevelDB stay bounded.
KEYS_MAX = 100_000
# One command that takes longer than this is counted as failed.
COMMAND_TIMEOUT_S = 10.0
# After the window closes, in-flight commands get this long to finish.
DRAIN_S_MAX = 30.0
# A leader with both peers connected must appear within this long.
LEADER_WAIT_S = 30.0
# Extra lifetime beyond the expected run before a process gives up on its own.
LIFETIME_SLACK_S = 120.0

STORE = "bench"
KEYSPACE = "kv"
TENANT = "bench"

VALUE = bytes(range(VALUE_BYTES))
_ROLE_LEADER = 2  # pysyncobj's _RAFT_STATE.LEADER

log = logging.getLogger("floe.bench.raft")


def floe_module(name: str) -> Any:
    """Import one of floe's Raft, KV or proto modules by name.

    The benchmark only drives these modules; importing them by name keeps
    `mypy bench` to the benchmark's own code instead of re-checking kv/ and the
    generated proto stubs (cluster/launcher.py does the same with kv.client).
    """
    return importlib.import_module(name)


def key_of(seq: int) -> bytes:
    return b"bench-%08d" % (seq % KEYS_MAX)


class Target(Protocol):
    """What the load needs from the replicated object under test."""

    syncobj: Any  # the SyncObj, for role and connection checks

    def setup(self) -> None:
        """Anything that must be committed before the load (the store and keyspace)."""

    def submit(self, seq: int, done: Callable[[str | None], None]) -> None:
        """Propose put number `seq`; `done(error)` runs on the Raft thread once it commits
        (error None) or fails (error names why: a pysyncobj FAIL_REASON or a CommandResult code)."""


# ---------------------------------------------------------------- bare pysyncobj


class BareKV(SyncObj):  # type: ignore[misc]
    """The floor: pysyncobj's replicated-dict example, nothing of floe."""

    def __init__(self, self_address: str, peers: list[str], conf_kwargs: dict[str, Any]) -> None:
        # pysyncobj binds 0.0.0.0 by default; three nodes on 127.0.0.1-3 share one port number.
        conf = SyncObjConf(bindAddress=self_address, **conf_kwargs)
        super().__init__(self_address, peers, conf)
        self._data: dict[bytes, bytes] = {}

    @replicated  # type: ignore[untyped-decorator]
    def set(self, key: bytes, value: bytes) -> None:
        self._data[key] = value


class BareTarget:
    def __init__(self, self_address: str, peers: list[str], conf_kwargs: dict[str, Any]) -> None:
        self.syncobj = BareKV(self_address, peers, conf_kwargs)

    def setup(self) -> None:
        pass

    def submit(self, seq: int, done: Callable[[str | None], None]) -> None:
        def cb(_result: Any, err: int) -> None:
            done(None if err == FAIL_REASON.SUCCESS else fail_reason_name(err))

        self.syncobj.set(key_of(seq), VALUE, callback=cb)


# ---------------------------------------------------------------- floe's Raft layer


class FloeTarget:
    """RaftNode + KVState with a real journal in `directory`, as a node runs them."""

    def __init__(self, self_address: str, peers: list[str], conf_kwargs: dict[str, Any], directory: str) -> None:
        # Imported here so that --mode bare loads nothing of floe's Raft layer.
        raft, state, kv_pb2 = floe_module("kv.raft"), floe_module("kv.state"), floe_module("proto.kv_pb2")
        self._pb = kv_pb2
        os.makedirs(directory, exist_ok=True)
        self.state = state.KVState(os.path.join(directory, "state"))
        self.syncobj = raft.RaftNode(self_address, peers, os.path.join(directory, "raft"), self.state, conf_kwargs)
        self._ok = kv_pb2.CommandResult.OK

    def _commit_setup(self, cmd: Any) -> None:
        raw = self.syncobj.commit(cmd.SerializeToString(), COMMAND_TIMEOUT_S)
        result = self._pb.CommandResult.FromString(raw)
        if result.code not in (self._ok, self._pb.CommandResult.ALREADY_EXISTS):
            raise RuntimeError(f"benchmark setup failed: {result.code} {result.message}")

    def setup(self) -> None:
        pb = self._pb
        self._commit_setup(pb.Command(tenant=TENANT, request_id=os.urandom(16),
                                      create_store=pb.CreateStoreCmd(name=STORE)))
        self._commit_setup(pb.Command(tenant=TENANT, request_id=os.urandom(16),
                                      create_keyspace=pb.CreateKeyspaceCmd(store=STORE, keyspace=KEYSPACE)))

    def command(self, seq: int) -> bytes:
        """The Command the gRPC server proposes for one Put (kv/server.py), with a fresh request_id."""
        pb = self._pb
        batch = pb.BatchCmd(store=STORE, mutations=[pb.Mutation(keyspace=KEYSPACE, key=key_of(seq), put=VALUE)])
        return bytes(pb.Command(tenant=TENANT, request_id=os.urandom(16), batch=batch).SerializeToString())

    def submit(self, seq: int, done: Callable[[str | None], None]) -> None:
        def cb(result: bytes | None, err: int) -> None:
            if err != FAIL_REASON.SUCCESS or result is None:
                done(fail_reason_name(err))
                return
            code = self._pb.CommandResult.FromString(result).code
            done(None if code == self._ok else "CommandResult." + self._pb.CommandResult.Code.Name(code))

        self.syncobj.submit(self.command(seq), cb)


# ---------------------------------------------------------------- the load (identical for both modes)


def fail_reason_name(err: int) -> str:
    """pysyncobj's FAIL_REASON number as its name, for the report."""
    for name in dir(FAIL_REASON):
        if not name.startswith("_") and getattr(FAIL_REASON, name) == err:
            return f"FAIL_REASON.{name}"
    return f"FAIL_REASON.{err}"


def leader_ready(obj: Any) -> bool:
    """This node leads, has applied what it committed, and hears both peers."""
    if obj.getStatus()["state"] != _ROLE_LEADER or not obj.isReady():
        return False
    return all(obj.isNodeConnected(n) for n in obj.otherNodes)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in (0, 1])."""
    if not sorted_values:
        return float("nan")
    rank = math.ceil(q * len(sorted_values) - 1e-9)  # the epsilon absorbs float error in q * n
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def run_throughput(target: Target, seconds: float, seq: itertools.count[int],
                   in_flight: int = IN_FLIGHT, warmup_s: float = WARMUP_S) -> dict[str, Any]:
    """Keep `in_flight` commands outstanding; count completions inside the window."""
    lock = threading.Lock()
    drained = threading.Event()
    counts = {"ok": 0, "failed": 0, "outstanding": 0, "completed_total": 0}
    errors: dict[str, int] = {}
    t_open = time.monotonic() + warmup_s
    t_close = t_open + seconds

    def on_done(error: str | None) -> None:
        now = time.monotonic()
        with lock:
            counts["completed_total"] += 1
            if t_open <= now < t_close:
                counts["ok" if error is None else "failed"] += 1
            if error is not None:
                errors[error] = errors.get(error, 0) + 1
            if now < t_close:
                again = True
            else:
                again = False
                counts["outstanding"] -= 1
                if counts["outstanding"] == 0:
                    drained.set()
        if again:
            target.submit(next(seq), on_done)

    with lock:
        counts["outstanding"] = in_flight
    wall0, cpu0 = time.monotonic(), time.process_time()
    for _ in range(in_flight):
        target.submit(next(seq), on_done)
    finished = drained.wait(warmup_s + seconds + DRAIN_S_MAX)
    # CPU seconds this process (Raft thread + load) used per wall second: near
    # 1.0 means the GIL-bound leader, not the disk or the network, is the limit.
    cpu_per_wall_s = (time.process_time() - cpu0) / max(1e-9, time.monotonic() - wall0)
    with lock:
        result = {"puts_per_s": counts["ok"] / seconds, "committed": counts["ok"], "failed": counts["failed"],
                  "errors": dict(errors), "in_flight": in_flight, "window_s": seconds, "warmup_s": warmup_s,
                  "completed_total": counts["completed_total"], "drained": finished,
                  "stuck": counts["outstanding"], "process_cpu_per_wall_s": cpu_per_wall_s}
    return result


def run_latency(target: Target, seconds: float, seq: itertools.count[int],
                samples_max: int = LATENCY_SAMPLES_MAX) -> dict[str, Any]:
    """One command at a time; the time from submit to the commit callback."""
    samples_ms: list[float] = []
    failed = 0
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(samples_ms) < samples_max:
        event = threading.Event()
        box: list[str | None] = []

        def done(error: str | None, box: list[str | None] = box, event: threading.Event = event) -> None:
            box.append(error)
            event.set()

        t0 = time.perf_counter()
        target.submit(next(seq), done)
        if not event.wait(COMMAND_TIMEOUT_S):
            failed += 1
            errors["timeout"] = errors.get("timeout", 0) + 1
            break  # something is wrong with the group; do not wait again
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        if box[0] is None:
            samples_ms.append(elapsed_ms)
        else:
            failed += 1
            errors[box[0]] = errors.get(box[0], 0) + 1
    samples_ms.sort()
    return {"samples": len(samples_ms), "failed": failed, "errors": errors,
            "latency_ms_p50": percentile(samples_ms, 0.50), "latency_ms_p99": percentile(samples_ms, 0.99),
            "latency_ms_mean": sum(samples_ms) / len(samples_ms) if samples_ms else float("nan"),
            "latency_ms_max": samples_ms[-1] if samples_ms else float("nan")}


# ---------------------------------------------------------------- process entry


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _exit_on_stdin_eof() -> None:
    """The parent holds our stdin open; EOF means it is gone, and so should we be."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.raftbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("bare", "floe"), required=True)
    p.add_argument("--self", dest="self_address", required=True, metavar="HOST:PORT")
    p.add_argument("--peers", required=True, metavar="HOST:PORT,HOST:PORT")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--dir", required=True, help="this member's journal and state (floe mode)")
    p.add_argument("--timing-json", required=True, help="cluster.config.RaftTiming fields as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s member={args.self_address} level=%(levelname)s %(name)s %(message)s")
    timing = RaftTiming(**json.loads(args.timing_json))
    conf: dict[str, Any] = floe_module("cluster.node").raft_conf(timing)
    peers = [p for p in args.peers.split(",") if p]
    if len(peers) != 2 or args.self_address in peers:
        raise SystemExit(f"need exactly two peers other than {args.self_address}, got {peers}")
    if args.seconds <= 0:
        raise SystemExit("--seconds must be > 0")
    threading.Thread(target=_exit_on_stdin_eof, name="stdin-watch", daemon=True).start()

    target: Target
    if args.mode == "bare":
        target = BareTarget(args.self_address, peers, conf)
    else:
        target = FloeTarget(args.self_address, peers, conf, args.dir)
    lifetime_end = time.monotonic() + LEADER_WAIT_S + WARMUP_S + 2 * args.seconds + DRAIN_S_MAX + LIFETIME_SLACK_S
    ran = False
    while time.monotonic() < lifetime_end:
        if not ran and leader_ready(target.syncobj):
            ran = True
            try:
                t0 = time.monotonic()
                target.setup()
                seq = itertools.count()
                throughput = run_throughput(target, args.seconds, seq)
                latency = run_latency(target, args.seconds, seq)
                extra: dict[str, Any] = {}
                if isinstance(target, FloeTarget):
                    extra["journal_syncs"] = target.syncobj.floe_journal.syncs
                _emit({"event": "result", "mode": args.mode, "member": args.self_address,
                       "throughput": throughput, "latency": latency, "pysyncobj_kwargs": conf,
                       "run_s": time.monotonic() - t0, **extra})
            except Exception as e:
                log.exception("event=load_failed")
                _emit({"event": "error", "mode": args.mode, "member": args.self_address,
                       "error": f"{type(e).__name__}: {e}"})
        time.sleep(0.02)
    log.warning("event=lifetime_over member=%s", args.self_address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
