"""`floe bench blob`: the object tier's put/get throughput against the disk's floor.

For each blob size (4 KiB, 64 KiB, 1 MiB) on a local three-node cluster:
  floe put   16 clients in flight, each putting fresh random blobs through a
             node (spread over the three) with replicate=True: R=3 copies, the
             put returns once W=2 are fsynced.
  floe get   16 clients reading random blobs of that set back (verified).
  floor      the physical floor on the same disk, in the same run: a Python
             writer with 16 threads appends the same bytes, three times (one
             file per replica, as three nodes on one disk write them), with as
             many fsyncs as floe's pack stores did for the put phase (read from
             their `syncs` + `index_syncs` counters), i.e. the same fsync
             cadence.
  rpc        the ceiling of the transport alone: empty Has calls/s with 16
             in flight, the cheapest round trip the blob service answers (a
             replicated put is three round trips: client to coordinator,
             coordinator to each other replica).
The report gives blobs/s and MB/s for each and the ratio floe/floor.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from cluster import launcher

RAFT_PORT = 7140
API_PORT = 7240
SIZES = (4 * 1024, 64 * 1024, 1024 * 1024)
IN_FLIGHT = 16


def _clients(layout: launcher.Layout) -> list[Any]:
    from objstore.remote import BlobClient

    addrs = [layout.node_config(n).blob_address for n in layout.nodes]
    return [BlobClient(addrs[i % len(addrs)], layout.admin_token, timeout_s=60) for i in range(IN_FLIGHT)]


def _syncs(clients: list[Any], nodes: int) -> int:
    """Pack fsyncs plus synced index writes of every node's store: all of its fsyncs."""
    total = 0
    for c in clients[:nodes]:
        counters = c.stats()["counters"]
        total += int(counters.get("syncs", 0)) + int(counters.get("index_syncs", 0))
    return total


def _run(threads: int, seconds: float, fn: Any) -> tuple[int, float, list[str]]:
    """Run fn(i) in a loop on `threads` threads for `seconds`; (ops, elapsed, errors)."""
    stop = threading.Event()
    counts = [0] * threads
    errors: list[str] = []

    def loop(i: int) -> None:
        while not stop.is_set():
            try:
                fn(i)
                counts[i] += 1
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(f"{type(e).__name__}: {e}")
                return

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return sum(counts), time.monotonic() - t0, errors


def floor_write(directory: Path, size: int, count: int, syncs: int) -> tuple[int, float]:
    """Write `count` blobs of `size` bytes x3 replicas with `syncs` fsyncs, 16 threads. (bytes, seconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = [os.open(directory / f"replica{i}.dat", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
             for i in range(3)]
    data = os.urandom(size)
    writes = count * 3
    every = max(1, writes // max(1, syncs))
    lock = threading.Lock()
    state = {"n": 0}

    def one(i: int) -> None:
        fd = files[i % 3]
        os.write(fd, data)
        with lock:
            state["n"] += 1
            do_sync = state["n"] % every == 0
        if do_sync:
            os.fdatasync(fd)

    per_thread = writes // IN_FLIGHT
    t0 = time.monotonic()

    def loop(i: int) -> None:
        for k in range(per_thread):
            one(i + k)

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(IN_FLIGHT)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for fd in files:
        os.fdatasync(fd)
        os.close(fd)
    return per_thread * IN_FLIGHT * size, time.monotonic() - t0


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    data_dir = Path(args.data_dir).resolve()
    if data_dir.exists():
        if launcher.layout_exists(data_dir):
            launcher.down(data_dir, stop_wait_s=5)
        shutil.rmtree(data_dir)
    launcher.ensure_layout(data_dir, 3, RAFT_PORT, API_PORT)
    layout = launcher.load_layout(data_dir)
    for node in layout.nodes:  # background repair/scrub off: measure the data path only
        doc = tomllib.loads(node.config_path.read_text())
        doc["blob"] = {"repair_interval_s": 0.0, "scrub_interval_s": 0.0, "gc_interval_s": 0.0}
        node.config_path.write_text(tomli_w.dumps(doc))
    results: list[dict[str, Any]] = []
    try:
        launcher.up(data_dir, 3, RAFT_PORT, API_PORT, wait_s=60)
        clients = _clients(layout)
        for size in SIZES:
            print(f"bench blob: {size} B blobs, {IN_FLIGHT} in flight, {args.seconds:.0f} s per phase ...",
                  file=sys.stderr)
            put_hashes: list[bytes] = []
            rnd = os.urandom(size + 4096)

            def put(i: int, size: int = size, rnd: bytes = rnd, put_hashes: list[bytes] = put_hashes) -> None:
                # Fresh content each time (no dedup): random offset + a counter.
                off = random.randrange(4096)
                blob = rnd[off:off + size - 16] + os.urandom(16)
                res = clients[i].put(blob, replicate=True)
                put_hashes.append(res.hash)

            s0 = _syncs(clients, 3)
            n_put, t_put, err_put = _run(IN_FLIGHT, args.seconds, put)
            syncs = _syncs(clients, 3) - s0

            def get(i: int, put_hashes: list[bytes] = put_hashes) -> None:
                clients[i].get(random.choice(put_hashes))

            n_get, t_get, err_get = _run(IN_FLIGHT, args.seconds, get)
            fb, ft = floor_write(data_dir / "floor", size, n_put, syncs)
            floor_bps = fb / ft
            put_bps = n_put * size / t_put
            row = {
                "size": size, "put_blobs_per_s": n_put / t_put, "put_mb_per_s": put_bps / 1e6,
                "get_blobs_per_s": n_get / t_get, "get_mb_per_s": n_get * size / t_get / 1e6,
                "floor_mb_per_s": floor_bps / 1e6, "floor_blobs_per_s": floor_bps / size,
                "put_vs_floor": put_bps / floor_bps, "pack_syncs": syncs, "puts": n_put,
                "errors": (err_put + err_get)[:5],
            }
            results.append(row)
        probe = os.urandom(32)
        n_has, t_has, _ = _run(IN_FLIGHT, min(args.seconds, 4.0), lambda i: clients[i].has([probe]))
        rpc_per_s = n_has / t_has
        for c in clients:
            c.close()
    finally:
        launcher.down(data_dir, stop_wait_s=5)
    if args.json:
        out.write(json.dumps({"benchmark": "blob", "seconds": args.seconds, "in_flight": IN_FLIGHT,
                              "rpc_calls_per_s": rpc_per_s, "results": results}, indent=1) + "\n")
        return 0
    out.write(f"floe bench blob: 3 nodes on one disk, {IN_FLIGHT} in flight, {args.seconds:.0f} s per phase\n\n")
    out.write("| blob | floe put blobs/s | floe put MB/s | floor MB/s (same bytes x3, same fsyncs) | put/floor "
              "| floe get blobs/s | floe get MB/s | store fsyncs |\n|--:|--:|--:|--:|--:|--:|--:|--:|\n")
    for r in results:
        out.write(f"| {r['size'] // 1024} KiB | {r['put_blobs_per_s']:,.0f} | {r['put_mb_per_s']:.1f} "
                  f"| {r['floor_mb_per_s']:.1f} | {r['put_vs_floor']:.2f} | {r['get_blobs_per_s']:,.0f} "
                  f"| {r['get_mb_per_s']:.1f} | {r['pack_syncs']} |\n")
        if r["errors"]:
            out.write(f"  errors: {r['errors']}\n")
    out.write(f"\nrpc ceiling: {rpc_per_s:,.0f} empty Has calls/s with {IN_FLIGHT} in flight "
              "(a replicated put is 3 round trips)\n")
    return 0
