"""`floe bench iscsi`: floe over iSCSI against tgt, the Linux user-space target, side by side.

Theory of operation. One run on one machine measures both targets with the same
initiators, one after the other for each workload (DESIGN.md §11: same run,
ratios, never numbers from different days):

  floe  a three-node cluster (raft port 7160, KV API 7260, so the nodes' iSCSI
        portals are 127.0.0.{1,2,3}:3320) in a fresh --data-dir; one thin volume
        with 4096-byte blocks, served by the node the first login reaches
        (127.0.0.1, node n1): the volume owner. Every flush puts the dirty
        segments to the object tier (W=2 of R=3 replicas fsynced) and commits
        one Raft entry.
  tgt   tgtd 1.0.x (Debian package `tgt`) on 127.0.0.1:3340, its own control
        socket (-C 3340, so a system tgtd is untouched), LUN 1 backed by a
        regular file of the same size and block size, bs_rdwr: the page cache,
        and fdatasync for SYNCHRONIZE CACHE. One unreplicated copy.

Both devices are first written whole with the same seeded pseudo-random image
(`qemu-img convert -t writeback`, which flushes at the end), so every read
below hits real data on both targets, no workload reads a hole or allocates a
file block, and nothing compresses. tgt's backing file is created sparse and
made whole by that fill: preallocating it would only change what the fill
costs, and the fill is not measured.

Workloads (WORKLOADS, data): libiscsi's `iscsi-perf` for reads (it keeps a
fixed number of READ(16)s in flight for --seconds and prints its average
IOPS), QEMU's `qemu-img bench` for writes (the hypervisor's block layer:
COUNT writes at a depth, draining and flushing every N; it prints the run's
time). qemu-img bench takes a count, not a time, so each write workload is
calibrated per target: a probe of 4 flush intervals gives a rate, and the
measured run gets the count that takes about --seconds at that rate.
qemu-img bench writes one byte pattern; we ask for 0xa5 because its default,
zeros, would become holes in floe (nothing stored). A pattern still
compresses, so floe's 1 MiB writes store small zstd blobs where tgt writes
every byte to disk: read the sequential-write ratio with that in mind.

Units: MB = 10^6 bytes, KiB/MiB = 2^10/2^20 bytes. The PNG shows IOPS of both
targets on a log scale and the floe/tgt ratio against the 0.5 goal.

Every measured run also records the CPU each process used (from /proc), in
cores: the three nodes, tgtd, the initiator tool and the whole machine.

--profile runs each workload once more on floe (not measured: sampling costs
CPU on a 2-core machine) with py-spy on the volume owner, and prints where its
Python time goes: by leaf function (self time), by component (floe package,
library or stdlib module of the leaf frame) and the floe functions with the
most samples under them, with the CPU every node used meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from cluster import launcher

RAFT_PORT = 7160
API_PORT = 7260
ISCSI_PORT = 3320  # API_PORT + cluster.config's ISCSI_PORT_OFFSET, on 127.0.0.1 (node n1)
TGT_HOST = "127.0.0.1"
TGT_PORT = 3340  # 3330 belongs to another test cluster (api 7270) on this machine
TGT_CONTROL_PORT = 3340  # tgtd -C: its IPC socket is /var/run/tgtd/socket.3340
TGT_TID = 1
TGT_LUN = 1  # LUN 0 is tgt's controller
TGT_IQN = "iqn.2026-11.io.floe.bench:tgt"
VOLUME = "bench"
BLOCK_BYTES = 4096
DEFAULT_SIZE = "1G"
DEFAULT_PNG = "docs/bench-iscsi.png"
GOAL_RATIO = 0.5  # the goal: floe at least half of tgt on each workload

KiB = 1024
MiB = 1024 * KiB

# Timeouts (seconds). Every subprocess has one; the run as a whole has no other bound.
TOOL_TIMEOUT_S = 60.0  # tgtadm, a short tool call
FILL_TIMEOUT_S = 1800.0  # writing 1 GiB at the slowest rate seen here (~10 MB/s) takes 100 s
PROBE_TIMEOUT_S = 600.0
RUN_TIMEOUT_SLACK_S = 120.0  # on top of the expected duration of a measured run
TGTD_START_WAIT_S = 15.0
TGTD_STOP_WAIT_S = 10.0

# qemu-img bench counts: a calibration gone wrong (a probe that ran in no time)
# must not turn into an hour-long run. qemu-img bench's own default count is 75,000.
QEMU_BENCH_COUNT_MAX = 1_000_000
PROBE_FLUSH_INTERVALS = 4

PROFILE_RATE_HZ = 100  # py-spy's default sampling rate
PROFILE_TOP = 12


class BenchError(Exception):
    """The benchmark could not run: a tool is missing, failed or printed what we cannot read.
    The message says which tool, with its command line and the tail of its output."""


class ToolOutputError(BenchError):
    """A tool exited 0 but its output does not have the line we measure by (a version
    we do not know, or a run cut short)."""


# ---------------------------------------------------------------- workloads (data)


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    label: str
    tool: str  # "iscsi-perf" (reads, timed) or "qemu-img" (qemu-img bench writes, counted)
    io_bytes: int
    depth: int  # commands in flight
    random: bool = False
    write: bool = False
    step_bytes: int = 0  # qemu-img bench -S; 0 = io_bytes (sequential)
    flush_interval: int = 0  # qemu-img bench --flush-interval


WORKLOADS: tuple[Workload, ...] = (
    Workload("randread-4k", "random 4 KiB reads, 32 in flight", "iscsi-perf", 4 * KiB, 32, random=True),
    # iscsi-perf's default depth (32); the issue names none for this one.
    Workload("seqread-1m", "sequential 1 MiB reads, 32 in flight", "iscsi-perf", MiB, 32),
    # A step of 1 MiB + 4 KiB puts every write in another 1 MiB segment: 64 dirty segments per flush.
    Workload("randwrite-4k", "4 KiB writes, step 1 MiB + 4 KiB, depth 32, flush every 64", "qemu-img", 4 * KiB,
             32, write=True, step_bytes=MiB + 4 * KiB, flush_interval=64),
    Workload("seqwrite-1m", "1 MiB writes, depth 8, flush every 16", "qemu-img", MiB, 8, write=True,
             flush_interval=16),
)
TARGETS = ("floe", "tgt")
WRITE_PATTERN = 0xA5


@dataclass(frozen=True, slots=True)
class Result:
    workload: str
    target: str
    iops: float
    mb_s: float  # MB = 10^6 bytes
    seconds: float  # how long the measured run took
    ops: int  # 0 when the tool reports only a rate (iscsi-perf)
    cpu: tuple[tuple[str, float], ...] = ()  # (process, cores it used on average during the run)


def result_from_rate(w: Workload, target: str, iops: float, seconds: float) -> Result:
    return Result(w.name, target, iops, iops * w.io_bytes / 1e6, seconds, 0)


def result_from_count(w: Workload, target: str, ops: int, seconds: float) -> Result:
    if seconds <= 0 or ops <= 0:
        raise ToolOutputError(f"{w.name} on {target}: {ops} ops in {seconds} s is not a measurement")
    return Result(w.name, target, ops / seconds, ops * w.io_bytes / seconds / 1e6, seconds, ops)


# ---------------------------------------------------------------- tool command lines and output (pure)


def iscsi_perf_args(w: Workload, url: str, block_bytes: int, seconds: int) -> list[str]:
    if w.tool != "iscsi-perf" or w.write:
        raise ValueError(f"{w.name} is not an iscsi-perf read workload")
    if w.io_bytes % block_bytes:
        raise ValueError(f"{w.name}: {w.io_bytes} bytes is not a whole number of {block_bytes}-byte blocks")
    args = ["iscsi-perf", "-m", str(w.depth), "-b", str(w.io_bytes // block_bytes), "-t", str(seconds)]
    return [*args, *(["-r"] if w.random else []), url]


def qemu_bench_args(w: Workload, url: str, count: int) -> list[str]:
    if w.tool != "qemu-img" or not w.write:
        raise ValueError(f"{w.name} is not a qemu-img bench write workload")
    if w.flush_interval and count % w.flush_interval:
        raise ValueError(f"count {count} is not a multiple of the flush interval {w.flush_interval}")
    args = ["qemu-img", "bench", "-f", "raw", "-w", "-c", str(count), "-d", str(w.depth), "-s", str(w.io_bytes)]
    if w.step_bytes:
        args += ["-S", str(w.step_bytes)]
    if w.flush_interval:
        args.append(f"--flush-interval={w.flush_interval}")
    return [*args, f"--pattern={WRITE_PATTERN}", url]


@dataclass(frozen=True, slots=True)
class PerfOutput:
    iops: int  # the last "iops average" iscsi-perf printed: the whole run's average
    transfer_bytes: int
    random: bool


_PERF_AVG = re.compile(r"iops average (\d+)")
_PERF_XFER = re.compile(r"fixed transfer size of (\d+) blocks \((\d+) byte\)", re.IGNORECASE)
_PERF_MODE = re.compile(r"performing (random|sequential) read", re.IGNORECASE)


def parse_iscsi_perf(text: str) -> PerfOutput:
    """iscsi-perf rewrites one status line with '\\r' every second ("... iops average N
    (M MB/s) ...") and prints "iops average N (M MB/s)" alone when the run ends; its MB/s
    are MiB/s rounded down, so only the IOPS are taken."""
    averages = _PERF_AVG.findall(text)
    xfer = _PERF_XFER.search(text)
    mode = _PERF_MODE.search(text)
    if not averages or xfer is None or mode is None:
        raise ToolOutputError("iscsi-perf printed no 'iops average' / transfer size / mode line: "
                              + _tail(text))
    return PerfOutput(int(averages[-1]), int(xfer.group(2)), mode.group(1).lower() == "random")


@dataclass(frozen=True, slots=True)
class QemuBenchOutput:
    count: int
    io_bytes: int
    depth: int
    write: bool
    seconds: float


_QB_SENDING = re.compile(r"Sending (\d+) (read|write) requests, (\d+) bytes each, (\d+) in parallel")
_QB_DONE = re.compile(r"Run completed in ([0-9.]+) seconds")


def parse_qemu_bench(text: str) -> QemuBenchOutput:
    sending = _QB_SENDING.search(text)
    done = _QB_DONE.search(text)
    if sending is None or done is None:
        raise ToolOutputError("qemu-img bench printed no 'Sending ...' / 'Run completed in' line: " + _tail(text))
    return QemuBenchOutput(int(sending.group(1)), int(sending.group(3)), int(sending.group(4)),
                           sending.group(2) == "write", float(done.group(1)))


def calibrated_count(probe_ops: int, probe_s: float, seconds: float, flush_interval: int,
                     count_max: int = QEMU_BENCH_COUNT_MAX) -> int:
    """The count that takes about `seconds` at the probe's rate: a whole number of flush
    intervals, at least the probe's, at most count_max (rounded down to an interval)."""
    if probe_ops <= 0 or flush_interval <= 0 or seconds <= 0:
        raise ValueError("probe ops, flush interval and seconds must be positive")
    floor = PROBE_FLUSH_INTERVALS * flush_interval
    ceiling = max(floor, count_max // flush_interval * flush_interval)
    if probe_s <= 0:
        return ceiling
    want = math.ceil(probe_ops / probe_s * seconds / flush_interval) * flush_interval
    return min(ceiling, max(floor, want))


def ratio(floe: Result, tgt: Result) -> float:
    return floe.iops / tgt.iops if tgt.iops > 0 else math.inf


def markdown_table(results: Sequence[Result]) -> str:
    """workload | floe IOPS | floe MB/s | tgt IOPS | tgt MB/s | floe/tgt, one row per
    workload of WORKLOADS that has both results, in WORKLOADS order. Both targets do the
    same I/O size, so the ratio of IOPS is also the ratio of MB/s."""
    by = {(r.workload, r.target): r for r in results}
    rows = ["| workload | floe IOPS | floe MB/s | tgt IOPS | tgt MB/s | floe/tgt |",
            "|---|--:|--:|--:|--:|--:|"]
    for w in WORKLOADS:
        f, t = by.get((w.name, "floe")), by.get((w.name, "tgt"))
        if f is None or t is None:
            continue
        rows.append(f"| {w.label} | {f.iops:,.0f} | {f.mb_s:,.1f} | {t.iops:,.0f} | {t.mb_s:,.1f} "
                    f"| {ratio(f, t):.2f} |")
    return "\n".join(rows) + "\n"


def cpu_table(results: Sequence[Result], columns: Sequence[str]) -> str:
    """Cores each process used during each measured run (CPU seconds / wall seconds)."""
    rows = ["| workload | target | " + " | ".join(columns) + " |", "|---|---|" + "--:|" * len(columns)]
    for r in results:
        got = dict(r.cpu)
        rows.append(f"| {r.workload} | {r.target} | "
                    + " | ".join(f"{got[c]:.2f}" if c in got else "" for c in columns) + " |")
    return "\n".join(rows) + "\n"


def pid_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/PID/stat. The command name
    (field 2) is in parentheses and may hold spaces, so fields are counted after the last ')'."""
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5)


def machine_cpu_ticks(stat: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from the text of /proc/stat ("cpu" line:
    user nice system idle iowait irq softirq steal ...); idle and iowait are not busy."""
    for line in stat.splitlines():
        f = line.split()
        if f and f[0] == "cpu":
            ticks = [int(x) for x in f[1:9]]
            return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    raise ValueError("no 'cpu' line in /proc/stat")


# ---------------------------------------------------------------- py-spy summary (pure)


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    samples: int
    self_top: list[tuple[str, int]]  # leaf function -> samples
    components: list[tuple[str, int]]  # component of the leaf frame -> samples
    floe_total_top: list[tuple[str, int]]  # floe function -> samples with it anywhere on the stack


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
REPO = Path(__file__).resolve().parent.parent


def _frame_parts(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame "func (/path/to/file.py:123)"."""
    m = _FRAME.match(frame.strip())
    return (m.group("func"), m.group("file")) if m else (frame.strip(), "")


def component_of(file: str, repo: Path = REPO) -> str:
    """Where a frame's code comes from: a floe package ("floe:blockdev"), a third-party
    package ("grpc"), or a stdlib module ("stdlib:asyncio"). Needs py-spy's full file names."""
    parts = Path(file).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            rest = parts[len(parts) - parts[::-1].index(marker):]
            return rest[0].removesuffix(".py") if rest else marker
    root = str(repo).rstrip("/") + "/"
    if file.startswith(root):
        rel = Path(file[len(root):]).parts
        return f"floe:{rel[0].removesuffix('.py')}" if rel else "floe"
    m = re.search(r"/python3\.\d+/(.+)$", file)
    if m:
        return "stdlib:" + m.group(1).split("/")[0].removesuffix(".py")
    return file or "?"


def _short_frame(func: str, file: str, repo: Path) -> str:
    comp = component_of(file, repo)
    name = Path(file).name if file else ""
    if comp.startswith("floe:"):
        name = f"{comp[5:]}/{name}"
    return f"{func} ({name})" if name else func


def summarise_pyspy_raw(text: str, top: int = PROFILE_TOP, repo: Path = REPO) -> ProfileSummary:
    """py-spy's raw (collapsed) format: one line per distinct stack, root first,
    frames separated by ';', then a space and the number of samples."""
    self_t: Counter[str] = Counter()
    comps: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, n_text = line.rstrip().rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        frames = [_frame_parts(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += n
        func, file = frames[-1]
        self_t[_short_frame(func, file, repo)] += n
        comps[component_of(file, repo)] += n
        for name in {_short_frame(f, p, repo) for f, p in frames if component_of(p, repo).startswith("floe:")}:
            total[name] += n
    return ProfileSummary(samples, self_t.most_common(top), comps.most_common(top), total.most_common(top))


def format_profile(p: ProfileSummary, who: str, duration_s: float, cores: float | None, top: int = PROFILE_TOP,
                   brief: bool = False) -> str:
    """One process's profile. Percentages are of its GIL samples: of the time it ran Python
    code. `cores` is the CPU it used meanwhile (Python and C, with or without the GIL)."""
    def pct(n: int) -> str:
        return f"{100 * n / p.samples:4.0f}%" if p.samples else "   -"

    held = p.samples / (PROFILE_RATE_HZ * duration_s) if duration_s > 0 else math.nan
    used = f"{cores:.2f} cores, " if cores is not None else ""
    head = f"  {who}: {used}GIL held {100 * held:.0f}% of {duration_s:.1f} s ({p.samples} samples)"
    if brief:
        return head + "; by component: " + ", ".join(f"{name} {pct(n).strip()}" for name, n in p.components[:top])
    out = [head]
    for title, rows in (("self time by function", p.self_top), ("self time by component", p.components),
                        ("floe functions, time spent under them", p.floe_total_top)):
        out.append(f"    {title}:")
        out += [f"      {pct(n)}  {name}" for name, n in rows[:top]]
    return "\n".join(out)


# ---------------------------------------------------------------- processes


def _tail(text: str, lines: int = 15) -> str:
    text = text.replace("\r", "\n")
    kept = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n  ".join(["", *kept]) if kept else "(no output)"


# Which Debian package provides each tool, for the error that says it is missing.
TOOL_PACKAGES = {"tgtd": "tgt", "tgtadm": "tgt", "iscsi-perf": "libiscsi-bin", "qemu-img": "qemu-utils",
                 "py-spy": "py-spy (pip install py-spy)"}


def check_tools(profile: bool) -> None:
    tools = ["tgtd", "tgtadm", "iscsi-perf", "qemu-img"] + (["py-spy"] if profile else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = sorted({TOOL_PACKAGES[t] for t in missing})
        raise BenchError(f"missing {', '.join(missing)}: install {', '.join(pkgs)} "
                         "(apt-get install tgt libiscsi-bin qemu-utils qemu-block-extra)")


def run_tool(args: list[str], timeout_s: float, what: str) -> str:
    """Run a tool to completion; its combined output, or a BenchError naming it."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise BenchError(f"{what}: no result after {timeout_s:.0f} s: {' '.join(args)}{_tail(out)}") from None
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        hint = ""
        if "Unknown protocol 'iscsi'" in out or "Unknown driver 'iscsi'" in out:
            hint = " (QEMU's iSCSI driver is in qemu-block-extra: apt-get install qemu-block-extra)"
        raise BenchError(f"{what} failed (exit {proc.returncode}){hint}: {' '.join(args)}{_tail(out)}")
    return out


def run_iscsi_perf(w: Workload, target: str, url: str, seconds: int) -> Result:
    """iscsi-perf -t runs for `seconds`; if it overruns (its countdown can skip its last
    second and run on), SIGINT makes it stop and print, and the last average counts."""
    args = iscsi_perf_args(w, url, BLOCK_BYTES, seconds)
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=seconds + RUN_TIMEOUT_SLACK_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise BenchError(f"iscsi-perf on {target} failed (exit {proc.returncode}): {' '.join(args)}{_tail(out)}")
    parsed = parse_iscsi_perf(out)
    if parsed.transfer_bytes != w.io_bytes or parsed.random != w.random:
        raise ToolOutputError(f"iscsi-perf on {target} did {parsed.transfer_bytes}-byte "
                              f"{'random' if parsed.random else 'sequential'} reads, not {w.label}")
    return result_from_rate(w, target, float(parsed.iops), elapsed)


def run_qemu_bench(w: Workload, target: str, url: str, count: int, timeout_s: float) -> Result:
    out = run_tool(qemu_bench_args(w, url, count), timeout_s, f"qemu-img bench ({w.name}) on {target}")
    parsed = parse_qemu_bench(out)
    if (parsed.count, parsed.io_bytes, parsed.depth, parsed.write) != (count, w.io_bytes, w.depth, True):
        raise ToolOutputError(f"qemu-img bench on {target} ran {parsed}, not {count} x {w.label}")
    return result_from_count(w, target, parsed.count, parsed.seconds)


def calibrate(w: Workload, target: str, url: str, seconds: float) -> int:
    probe = PROBE_FLUSH_INTERVALS * w.flush_interval
    r = run_qemu_bench(w, target, url, probe, PROBE_TIMEOUT_S)
    return calibrated_count(r.ops, r.seconds, seconds, w.flush_interval)


def write_image(path: Path, size: int, seed: int) -> None:
    """`size` bytes from a seeded PRNG: the same image for both targets, incompressible."""
    rng = random.Random(seed)
    chunk = 4 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n


class Tgt:
    """One tgtd of our own (foreground child, own control socket and portal) with one
    target and one file-backed LUN. stop() always leaves no tgtd of ours running."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.pid_path = work_dir / "tgtd.pid"
        self.log_path = work_dir / "tgtd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"iscsi://{TGT_HOST}:{TGT_PORT}/{TGT_IQN}/{TGT_LUN}"

    def _adm(self, *args: str, check: bool = True) -> str:
        cmd = ["tgtadm", "-C", str(TGT_CONTROL_PORT), "--lld", "iscsi", *args]
        if check:
            return run_tool(cmd, TOOL_TIMEOUT_S, "tgtadm")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
        return proc.stdout + proc.stderr if proc.returncode == 0 else ""

    def start(self, backing: Path, block_bytes: int) -> None:
        if launcher.port_in_use(TGT_HOST, TGT_PORT):
            raise BenchError(f"{TGT_HOST}:{TGT_PORT} is in use (tgt's portal for this benchmark): "
                             "stop whatever listens there")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["tgtd", "-f", "-C", str(TGT_CONTROL_PORT), "--iscsi", f"portal={TGT_HOST}:{TGT_PORT}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_path.write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + TGTD_START_WAIT_S
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"tgtd exited at start (exit {self.proc.returncode}); {self.log_path}:"
                                 + _tail(self.log_path.read_text(errors="replace")))
            try:
                if self._adm("--op", "show", "--mode", "target", check=False) != "" or \
                        launcher.port_in_use(TGT_HOST, TGT_PORT):
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"tgtd did not answer tgtadm within {TGTD_START_WAIT_S:.0f} s; {self.log_path}:"
                                 + _tail(self.log_path.read_text(errors="replace")))
            time.sleep(0.1)
        self._adm("--op", "new", "--mode", "target", "--tid", str(TGT_TID), "-T", TGT_IQN)
        self._adm("--op", "new", "--mode", "logicalunit", "--tid", str(TGT_TID), "--lun", str(TGT_LUN),
                  "-b", str(backing), f"--blocksize={block_bytes}")
        self._adm("--op", "bind", "--mode", "target", "--tid", str(TGT_TID), "-I", "ALL")

    def stop(self) -> None:
        """tgtd ignores SIGTERM; `--op delete --mode system` (after deleting the target)
        makes it exit. SIGKILL if it does not."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._adm("--op", "delete", "--mode", "target", "--tid", str(TGT_TID), "--force", check=False)
                subprocess.run(["tgtadm", "-C", str(TGT_CONTROL_PORT), "--op", "delete", "--mode", "system"],
                               capture_output=True, timeout=TOOL_TIMEOUT_S)
            try:
                self.proc.wait(TGTD_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TGTD_STOP_WAIT_S)
        self.pid_path.unlink(missing_ok=True)
        self.proc = None


def _stop_stale_tgtd(pid_path: Path) -> None:
    """A tgtd left by an earlier run of this benchmark (its pid file in our data dir, and
    the process is still a tgtd): stop it, so its portal and control socket are free."""
    try:
        pid = int(pid_path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if not cmdline or Path(cmdline[0].decode(errors="replace")).name != "tgtd" or \
            f"-C\0{TGT_CONTROL_PORT}".encode() not in b"\0".join(cmdline):
        return
    subprocess.run(["tgtadm", "-C", str(TGT_CONTROL_PORT), "--lld", "iscsi", "--op", "delete", "--mode", "target",
                    "--tid", str(TGT_TID), "--force"], capture_output=True, timeout=TOOL_TIMEOUT_S)
    subprocess.run(["tgtadm", "-C", str(TGT_CONTROL_PORT), "--op", "delete", "--mode", "system"],
                   capture_output=True, timeout=TOOL_TIMEOUT_S)
    deadline = time.monotonic() + TGTD_STOP_WAIT_S
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- floe


@dataclass(frozen=True, slots=True)
class FloeVolume:
    url: str
    iqn: str
    size: int


def create_volume(data_dir: Path, size: int) -> FloeVolume:
    from blockdev.registry import Registry
    from cluster.targets import target_name
    from kv.client import KVClient

    kv = KVClient(launcher.servers(data_dir), launcher.token(data_dir), timeout_s=30)
    try:
        info = Registry(kv).create(VOLUME, size, BLOCK_BYTES)
    finally:
        kv.close()
    iqn = target_name(launcher.DEFAULT_TENANT, info.name)
    return FloeVolume(f"iscsi://127.0.0.1:{ISCSI_PORT}/{iqn}/0", iqn, info.size)


def volume_owner(data_dir: Path) -> tuple[str, int] | None:
    """(node id, pid) of the node holding the volume's lease, if any."""
    import msgpack

    from blockdev.registry import LEASE_KEY, Registry
    from kv.client import KVClient

    kv = KVClient(launcher.servers(data_dir), launcher.token(data_dir), timeout_s=30)
    try:
        info = Registry(kv).get(VOLUME)
        lease = kv.get(info.store, "meta", LEASE_KEY)
    finally:
        kv.close()
    if not lease:
        return None
    node_id = str(msgpack.unpackb(lease[0], raw=False)["node"])
    pid = launcher.read_pid(launcher.load_layout(data_dir).node(node_id))
    return (node_id, pid) if pid is not None else None


class CpuMeter:
    """CPU used by some processes, by this process's reaped children (the initiator tools)
    and by the whole machine between start() and stop(), in cores (CPU s / wall s)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start_ticks: dict[str, int] = {}
        self.t0 = 0.0
        self.children0 = 0.0
        self.machine0 = (0, 0)

    @staticmethod
    def _children_s() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    def _ticks(self) -> dict[str, int]:
        out = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[name] = pid_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
        return out

    def start(self) -> None:
        self.start_ticks = self._ticks()
        self.children0 = self._children_s()
        self.machine0 = machine_cpu_ticks(Path("/proc/stat").read_text())
        self.t0 = time.monotonic()

    def stop(self) -> tuple[tuple[str, float], ...]:
        wall = max(1e-9, time.monotonic() - self.t0)
        end = self._ticks()
        busy, total = machine_cpu_ticks(Path("/proc/stat").read_text())
        cpus = os.cpu_count() or 1
        used = [(n, (end[n] - self.start_ticks[n]) / self.hz / wall) for n in self.pids
                if n in end and n in self.start_ticks]
        used.append(("initiator", (self._children_s() - self.children0) / wall))
        d_total = total - self.machine0[1]
        machine = cpus * (busy - self.machine0[0]) / d_total if d_total > 0 else math.nan
        # The rest: kernel work charged to no process of ours (loopback TCP softirqs) and
        # whatever else runs on the machine. A large value means the run was not alone.
        used.append(("other", max(0.0, machine - sum(c for _n, c in used))))
        used.append(("machine", machine))
        return tuple(used)


@contextlib.contextmanager
def pyspy_gil(pids: dict[str, int], out_dir: Path, bound_s: float) -> Iterator[dict[str, tuple[Path, float]]]:
    """py-spy record --gil on each process for the duration of the with-block (SIGINT at its
    end makes py-spy stop and write), never longer than bound_s. Yields, filled in at the
    end: name -> (raw stacks file, seconds sampled).

    --gil keeps only the thread holding the GIL in each sample: the time the process runs
    Python code. py-spy's default "active threads" filter counts runnable and just-woken
    threads on this overloaded 2-core machine (idle executor workers showed up as 40% of
    the samples), so it does not say where the CPU goes; the GIL does, for Python.
    --nonblocking: pausing the process for each sample (py-spy's default) cut floe's
    4 KiB write rate from 190 to 78 IOPS here; a rare torn stack is the lesser evil."""
    procs: dict[str, tuple[subprocess.Popen[str], Path, list[str]]] = {}
    got: dict[str, tuple[Path, float]] = {}
    for name, pid in pids.items():
        path = out_dir / f"pyspy-{name}.txt"
        args = ["py-spy", "record", "--pid", str(pid), "--gil", "--nonblocking", "--format", "raw", "--full-filenames",
                "-o", str(path), "--rate", str(PROFILE_RATE_HZ), "-d", str(max(1, math.ceil(bound_s)))]
        procs[name] = (subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                       path, args)
    t0 = time.monotonic()  # samples are counted from here: the GIL share includes this wait
    time.sleep(0.5)  # attaching takes a moment; the load starts after it
    try:
        yield got
    finally:
        elapsed = time.monotonic() - t0
        for proc, _path, _args in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for name, (proc, path, args) in procs.items():
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if not path.exists():
                raise BenchError(f"py-spy wrote no profile (exit {proc.returncode}): {' '.join(args)}{_tail(out)}")
            got[name] = (path, elapsed)


# ---------------------------------------------------------------- chart


def write_png(results: Sequence[Result], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise BenchError("the PNG needs matplotlib: pip install -e '.[bench]' (or pass --png '')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.workload, r.target): r for r in results}
    ws = [w for w in WORKLOADS if (w.name, "floe") in by and (w.name, "tgt") in by]
    xs = list(range(len(ws)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    for k, (target, color) in enumerate((("floe", "#2a7ab0"), ("tgt", "#c0c0c0"))):
        vals = [by[(w.name, target)].iops for w in ws]
        bars = ax1.bar([x + (k - 0.5) * width for x in xs], vals, width, label=target, color=color,
                       edgecolor="#333333", linewidth=0.5)
        for b, w in zip(bars, ws, strict=True):
            r = by[(w.name, target)]
            ax1.annotate(f"{r.iops:,.0f}\n{r.mb_s:,.1f} MB/s", (b.get_x() + b.get_width() / 2, b.get_height()),
                         ha="center", va="bottom", fontsize=7)
    ax1.set_yscale("log")
    top = max((r.iops for r in by.values()), default=1.0)
    ax1.set_ylim(top=top * 4)  # room for the labels above the tallest bar
    ax1.set_ylabel("IOPS (log scale)")
    ax1.set_xticks(xs, [w.name for w in ws])
    ax1.legend(loc="upper right")
    ax1.set_title("IOPS, same machine, same run")
    ratios = [ratio(by[(w.name, "floe")], by[(w.name, "tgt")]) for w in ws]
    bars = ax2.bar(xs, ratios, 0.6, color=["#2a7ab0" if r >= GOAL_RATIO else "#d9822b" for r in ratios],
                   edgecolor="#333333", linewidth=0.5)
    for b, q in zip(bars, ratios, strict=True):
        ax2.annotate(f"{q:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                     fontsize=8)
    ax2.axhline(GOAL_RATIO, color="#b03030", linestyle="--", linewidth=1, label=f"goal {GOAL_RATIO}")
    ax2.set_xticks(xs, [w.name for w in ws])
    ax2.set_ylabel("floe / tgt")
    ax2.set_ylim(0, max(1.05, max(ratios, default=1.0) * 1.15))
    ax2.legend(loc="upper right")
    ax2.set_title("ratio (IOPS = MB/s ratio)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def _say(msg: str) -> None:
    print(f"bench iscsi: {msg}", file=sys.stderr, flush=True)


def _wipe(data_dir: Path) -> None:
    if not data_dir.exists():
        return
    _stop_stale_tgtd(data_dir / "tgtd.pid")
    if launcher.layout_exists(data_dir):
        launcher.down(data_dir, stop_wait_s=5)
    shutil.rmtree(data_dir)


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from cluster.volcli import parse_size

    out = out or sys.stdout
    seconds = max(1, round(float(args.seconds)))
    size = parse_size(str(getattr(args, "size", DEFAULT_SIZE)))
    if size % MiB:
        raise BenchError(f"--size must be a whole number of MiB, not {size} bytes")
    png = str(getattr(args, "png", DEFAULT_PNG) or "")
    profile = bool(getattr(args, "profile", False))
    seed = int(getattr(args, "seed", None) or random.randrange(1 << 32))
    check_tools(profile)
    if png:
        try:
            import matplotlib  # noqa: F401 - fail before a long run, not after it
        except ModuleNotFoundError:
            raise BenchError("the PNG needs matplotlib: pip install -e '.[bench]' (or pass --png '')") from None

    data_dir = Path(args.data_dir).resolve()
    load_1m = os.getloadavg()[0]
    _wipe(data_dir)
    data_dir.mkdir(parents=True)
    image, backing = data_dir / "image.raw", data_dir / "tgt-lun1.img"
    tgt = Tgt(data_dir)
    results: list[Result] = []
    notes: list[str] = [f"load average (1 min) when the benchmark started: {load_1m:.2f} on {os.cpu_count()} CPUs"]
    profiles: list[str] = []
    try:
        _say(f"starting a 3-node floe cluster in {data_dir} (raft {RAFT_PORT}, api {API_PORT}, "
             f"iSCSI 127.0.0.1-3:{ISCSI_PORT}) ...")
        launcher.ensure_layout(data_dir, 3, RAFT_PORT, API_PORT)
        launcher.up(data_dir, 3, RAFT_PORT, API_PORT, wait_s=60)
        vol = create_volume(data_dir, size)
        with open(backing, "wb") as f:
            f.truncate(size)
        _say(f"starting tgtd on {TGT_HOST}:{TGT_PORT} (control port {TGT_CONTROL_PORT}), LUN {TGT_LUN} = {backing}")
        tgt.start(backing, BLOCK_BYTES)
        urls = {"floe": vol.url, "tgt": tgt.url}

        _say(f"writing a {size >> 20} MiB pseudo-random image (seed {seed}) ...")
        notes.append(f"fill image: {size >> 20} MiB from random.Random({seed}) (--seed {seed} repeats it)")
        write_image(image, size, seed)
        for target in TARGETS:
            _say(f"filling {target} with it (qemu-img convert, flushed) ...")
            t0 = time.monotonic()
            run_tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-t", "writeback", str(image),
                      urls[target]], FILL_TIMEOUT_S, f"filling {target}")
            el = time.monotonic() - t0
            notes.append(f"fill {target}: {size >> 20} MiB in {el:.1f} s ({size / el / 1e6:.1f} MB/s, "
                         "qemu-img convert, 8 in flight, one flush at the end)")
        image.unlink()
        owner = volume_owner(data_dir)
        if owner:
            notes.append(f"floe volume owner: {owner[0]} (pid {owner[1]}); initiators log in to 127.0.0.1:"
                         f"{ISCSI_PORT}")
        pids = node_pids(data_dir)
        if tgt.proc is not None:
            pids["tgtd"] = tgt.proc.pid

        for w in WORKLOADS:
            for target in TARGETS:
                if w.tool == "iscsi-perf":
                    _say(f"{w.name} on {target}: iscsi-perf {seconds} s ...")
                    meter = CpuMeter(pids)
                    meter.start()
                    r = run_iscsi_perf(w, target, urls[target], seconds)
                else:
                    count = calibrate(w, target, urls[target], seconds)
                    _say(f"{w.name} on {target}: qemu-img bench -c {count} ...")
                    meter = CpuMeter(pids)
                    meter.start()
                    r = run_qemu_bench(w, target, urls[target], count, seconds * 10 + RUN_TIMEOUT_SLACK_S)
                r = dataclasses.replace(r, cpu=meter.stop())
                _say(f"  {r.iops:,.0f} IOPS, {r.mb_s:,.1f} MB/s; cores used: "
                     + ", ".join(f"{n} {c:.2f}" for n, c in r.cpu))
                results.append(r)
            if profile:
                profiles.append(_profile(data_dir, w, vol.url, seconds, results, pids, owner[0] if owner else ""))
    finally:
        tgt.stop()
        if launcher.layout_exists(data_dir):
            launcher.down(data_dir, stop_wait_s=10)
        image.unlink(missing_ok=True)
        backing.unlink(missing_ok=True)

    title = (f"floe bench iscsi: floe (3 nodes, R=3) vs tgt (1 file), {size >> 20} MiB volume, "
             f"{BLOCK_BYTES}-byte blocks, ~{seconds} s per run")
    if png:
        write_png(results, Path(png), title)
    if args.json:
        out.write(json.dumps({"benchmark": "iscsi", "seconds": seconds, "size": size, "block_bytes": BLOCK_BYTES,
                              "seed": seed, "results": [asdict(r) for r in results],
                              "ratios": {w.name: _ratio_of(results, w.name) for w in WORKLOADS},
                              "png": png or None, "notes": notes, "profiles": profiles}, indent=1) + "\n")
        return 0
    out.write(f"{title}\n\n")
    out.write(markdown_table(results))
    columns = [*node_names(results), "tgtd", "initiator", "other", "machine"]
    out.write(f"\nCPU during each run, in cores (this machine has {os.cpu_count()}; 'initiator' is iscsi-perf or "
              "qemu-img; 'other' is the machine's busy time charged to none of these: kernel work such as "
              "loopback TCP, and other users of the machine):\n\n")
    out.write(cpu_table(results, columns))
    below = [w.name for w in WORKLOADS if _ratio_of(results, w.name) < GOAL_RATIO]
    out.write(f"\ngoal floe/tgt >= {GOAL_RATIO} on each workload: "
              f"{'met' if not below else 'not met on ' + ', '.join(below)}\n")
    out.write("MB = 10^6 bytes. Both devices were filled with the same pseudo-random image first (tgt's file: "
              "sparse, then written whole by the fill), so reads hit data on both and no write allocates.\n"
              f"qemu-img bench writes the byte 0x{WRITE_PATTERN:02x} (compressible: floe stores small zstd blobs "
              "for the 1 MiB writes; tgt writes every byte).\n")
    for n in notes:
        out.write(f"- {n}\n")
    if png:
        out.write(f"chart: {png}\n")
    if profiles:
        out.write("\nWhere floe's time goes: each workload once more on floe, with py-spy --gil --nonblocking on "
                  "the volume owner (the thread holding the GIL in each sample, i.e. Python code running; C code that "
                  "releases the GIL, such as hashing, zstd, gRPC's core and syscalls, is in 'cores' but not in "
                  "the samples). Percentages are of each node's GIL samples.\n\n")
        out.write("\n".join(profiles))
    return 0


def _ratio_of(results: Sequence[Result], name: str) -> float:
    by = {(r.workload, r.target): r for r in results}
    f, t = by.get((name, "floe")), by.get((name, "tgt"))
    return ratio(f, t) if f is not None and t is not None else math.nan


def node_pids(data_dir: Path) -> dict[str, int]:
    layout = launcher.load_layout(data_dir)
    return {n.id: pid for n in layout.nodes if (pid := launcher.read_pid(n)) is not None}


def node_names(results: Sequence[Result]) -> list[str]:
    names = {n for r in results for n, _ in r.cpu}
    return sorted(names - {"tgtd", "initiator", "other", "machine"})


def _profile(data_dir: Path, w: Workload, url: str, seconds: int, results: Sequence[Result],
             pids: dict[str, int], owner_id: str) -> str:
    """One extra floe run of `w`, as long as the measured one, with py-spy --gil on the volume
    owner, where the iSCSI target, the volume and the flush run. Only there: three profilers
    on this 2-core machine took random reads from 325 to 67 IOPS (the owner's local blob
    reads slowed past the 50 ms hedge, which then sent every read to a second replica too).
    The other nodes' share is in the CPU table."""
    nodes = {n: p for n, p in pids.items() if n == owner_id} or {n: p for n, p in pids.items() if n != "tgtd"}
    measured = next(r for r in results if r.workload == w.name and r.target == "floe")
    bound_s = seconds * 10 + RUN_TIMEOUT_SLACK_S
    _say(f"{w.name} on floe again, under py-spy --gil on {', '.join(nodes)} (not measured) ...")
    out_dir = data_dir / f"pyspy-{w.name}"
    out_dir.mkdir(exist_ok=True)
    meter = CpuMeter({n: p for n, p in pids.items() if n != "tgtd"})
    meter.start()
    with pyspy_gil(nodes, out_dir, bound_s) as got:
        if w.tool == "iscsi-perf":
            r = run_iscsi_perf(w, "floe", url, seconds)
        else:
            r = run_qemu_bench(w, "floe", url, measured.ops, bound_s)
    cores = dict(meter.stop())
    used = ", ".join(f"{n} {c:.2f}" for n, c in cores.items() if n not in ("initiator", "other", "machine"))
    parts = [f"{w.name} ({w.label}) on floe under py-spy: {r.iops:,.0f} IOPS (measured without it: "
             f"{measured.iops:,.0f}); cores: {used}, py-spy + initiator {cores['initiator']:.2f}, "
             f"machine {cores['machine']:.2f}; raw stacks in {out_dir}/"]
    for name in sorted(got, key=lambda n: (n != owner_id, n)):
        path, duration_s = got[name]
        summary = summarise_pyspy_raw(path.read_text(errors="replace"))
        if name == owner_id:
            parts.append(format_profile(summary, f"{name} (volume owner)", duration_s, cores.get(name)))
        else:
            parts.append(format_profile(summary, name, duration_s, cores.get(name), top=4, brief=True))
    return "\n".join(parts) + "\n"
