"""`floe bench volume`: a volume driven in-process against a local three-node cluster.

No iSCSI yet: the benchmark opens the volume in this process (as its owner),
with the KV through gRPC and blobs through the nodes' blob services, exactly
as `floe volume import` does. Workloads, each for --seconds:
  randwrite  4 KiB writes at random offsets, a flush every 64 writes
  seqwrite   1 MiB sequential writes, a flush every 16
  randread   4 KiB reads at random offsets of flushed data (the blob cache
             holds 64 MiB of a 1 GiB volume: mostly misses)
Reported: IOPS, MB/s, and flush latency p50/p99 (a flush is what a guest's
fsync waits for: blobs W=2 of 3 fsynced, then one Raft commit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from cluster import launcher

RAFT_PORT = 7150
API_PORT = 7250
VOLUME_BYTES = 1 << 30
BS = 4096


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _timed_flush(v: Any, flushes: list[float]) -> None:
    t = time.perf_counter()
    v.flush()
    flushes.append((time.perf_counter() - t) * 1000)


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from blockdev.registry import Registry
    from blockdev.tiers import ClientBlobs
    from blockdev.volume import Volume
    from kv.client import KVClient
    from objstore.remote import BlobClient

    out = out or sys.stdout
    data_dir = Path(args.data_dir).resolve()
    if data_dir.exists():
        if launcher.layout_exists(data_dir):
            launcher.down(data_dir, stop_wait_s=5)
        shutil.rmtree(data_dir)
    results: dict[str, dict[str, float]] = {}
    try:
        launcher.ensure_layout(data_dir, 3, RAFT_PORT, API_PORT)
        launcher.up(data_dir, 3, RAFT_PORT, API_PORT, wait_s=60)
        layout = launcher.load_layout(data_dir)
        kv = KVClient(launcher.servers(data_dir), layout.token, timeout_s=30)
        blobs = ClientBlobs([BlobClient(layout.node_config(n).blob_address, layout.admin_token)
                             for n in layout.nodes])
        info = Registry(kv).create("bench", VOLUME_BYTES, BS)
        v = Volume(kv, info, blobs, "bench", lease_s=10.0, flush_dirty_bytes=1 << 40, flush_after_s=1e9)
        v.open(background=True)
        blocks = info.blocks
        rnd = os.urandom(1 << 20)

        print(f"bench volume: randwrite {args.seconds:.0f} s ...", file=sys.stderr)
        flushes: list[float] = []
        n = 0
        written: list[int] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            lba = random.randrange(blocks)
            off = random.randrange(0, len(rnd) - BS)
            v.write(lba, rnd[off:off + BS - 8] + n.to_bytes(8, "big"))
            written.append(lba)
            n += 1
            if n % 64 == 0:
                _timed_flush(v, flushes)
        _timed_flush(v, flushes)
        el = time.perf_counter() - t0
        results["randwrite"] = {"iops": n / el, "mb_s": n * BS / el / 1e6, "flushes": len(flushes),
                                "flush_p50_ms": _pct(flushes, 0.5), "flush_p99_ms": _pct(flushes, 0.99)}

        print(f"bench volume: seqwrite {args.seconds:.0f} s ...", file=sys.stderr)
        flushes = []
        n = 0
        mib_blocks = (1 << 20) // BS
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            lba = (n * mib_blocks) % blocks
            v.write(lba, os.urandom(1 << 20))
            n += 1
            if n % 16 == 0:
                _timed_flush(v, flushes)
        _timed_flush(v, flushes)
        el = time.perf_counter() - t0
        results["seqwrite"] = {"iops": n / el, "mb_s": n * (1 << 20) / el / 1e6, "flushes": len(flushes),
                               "flush_p50_ms": _pct(flushes, 0.5), "flush_p99_ms": _pct(flushes, 0.99)}

        print(f"bench volume: randread {args.seconds:.0f} s ...", file=sys.stderr)
        n = 0
        lat: list[float] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            lba = random.choice(written)  # flushed data, spread over ~all segments
            t = time.perf_counter()
            v.read(lba, 1)
            lat.append((time.perf_counter() - t) * 1000)
            n += 1
        el = time.perf_counter() - t0
        results["randread"] = {"iops": n / el, "mb_s": n * BS / el / 1e6, "read_p50_ms": _pct(lat, 0.5),
                               "read_p99_ms": _pct(lat, 0.99), "cache_hits": v.cache.hits,
                               "cache_misses": v.cache.misses}
        v.close()
        kv.close()
    finally:
        if launcher.layout_exists(data_dir):
            launcher.down(data_dir, stop_wait_s=5)
    if args.json:
        out.write(json.dumps({"benchmark": "volume", "seconds": args.seconds, "results": results}, indent=1) + "\n")
        return 0
    out.write("floe bench volume: 1 GiB volume, 4 KiB blocks, in-process owner, 3 nodes, "
              f"{args.seconds:.0f} s each\n\n")
    out.write("| workload | IOPS | MB/s | flush p50 ms | flush p99 ms |\n|---|--:|--:|--:|--:|\n")
    for name in ("randwrite", "seqwrite"):
        r = results[name]
        out.write(f"| {name} | {r['iops']:,.0f} | {r['mb_s']:.1f} | {r['flush_p50_ms']:.1f} "
                  f"| {r['flush_p99_ms']:.1f} |\n")
    r = results["randread"]
    out.write(f"| randread | {r['iops']:,.0f} | {r['mb_s']:.1f} | (read p50 {r['read_p50_ms']:.2f} ms, "
              f"p99 {r['read_p99_ms']:.2f}) | |\n")
    return 0
