"""The object tier on three real node processes: faults while blobs are written.

- a replica SIGKILLed in the middle of puts: every put still succeeds (W=2)
  and the third copies appear once the replica is back (hinted handoff);
- power loss of a node (unsynced bytes dropped): every blob it acknowledged is
  there and verifies after restart, the pack is recovered;
- bytes flipped in stored records: a read is served from another copy and the
  bad one repaired; the scrubber finds and repairs cold corruption;
- a node's store lost for good and replaced by an empty one: the repair scanner
  brings every blob back to 3 copies;
- `floe blob` put/get/stat/gc through the CLI, with pins keeping blobs live.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster import launcher
from kv import durable
from objstore.api import BlobError, blob_hash
from objstore.remote import BlobClient, RemoteReplica
from tests import clusterutil as cu

pytestmark = pytest.mark.cluster

FAST_BLOB = {"hint_interval_s": 0.5, "repair_interval_s": 1.0, "scrub_interval_s": 0.0, "gc_interval_s": 0.0}


@pytest.fixture
def cluster_dir(tmp_path: Path):
    d = tmp_path / "cluster"
    yield d
    if launcher.layout_exists(d):
        launcher.down(d, stop_wait_s=5)
        for node, text in cu.logs(d).items():
            assert "Traceback" not in text, f"{node} logged a traceback:\n{text[-3000:]}"


def start(d: Path, **blob: float) -> None:
    cu.configure(d, top={"blob": {**FAST_BLOB, **blob}})
    cu.up(d)


def blob_addr(d: Path, node_id: str) -> str:
    layout = launcher.load_layout(d)
    return layout.node_config(layout.node(node_id)).blob_address


def client(d: Path, node_id: str = "n1", timeout_s: float = 30.0) -> BlobClient:
    return BlobClient(blob_addr(d, node_id), launcher.admin_token(d), timeout_s=timeout_s)


def replica(d: Path, node_id: str) -> RemoteReplica:
    return RemoteReplica(node_id, blob_addr(d, node_id), launcher.admin_token(d), timeout_s=10.0)


def copies_everywhere(d: Path, hashes: list[bytes], skip: str = "") -> dict[str, int]:
    """Per node (but `skip`), how many of `hashes` it holds."""
    out = {}
    for n in ("n1", "n2", "n3"):
        if n == skip:
            continue
        r = replica(d, n)
        try:
            out[n] = sum(r.has(hashes))
        finally:
            r.close()
    return out


def wait_for(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = pred()
            if last is True:
                return
        except BlobError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout}s (last: {last})")


def test_put_survives_sigkill_of_a_replica_mid_put_and_third_copy_follows(cluster_dir):
    start(cluster_dir)
    c = client(cluster_dir, "n1")
    acked: list[bytes] = []
    failures: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            data = os.urandom(512 * 1024) + i.to_bytes(4, "big")
            try:
                res = c.put(data, replicate=True)
                assert res.hash == blob_hash(data)
                acked.append(res.hash)
            except BlobError as e:
                failures.append(str(e))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    while len(acked) < 10:
        time.sleep(0.01)
    launcher.kill(cluster_dir, "n3")  # SIGKILL while puts stream to it
    n_at_kill = len(acked)
    while len(acked) < n_at_kill + 15:
        time.sleep(0.05)
    stop.set()
    t.join()
    assert failures == []  # W=2 of the other two: nothing failed
    held = copies_everywhere(cluster_dir, acked, skip="n3")
    assert held == {"n1": len(acked), "n2": len(acked)}
    st = c.stats()
    assert st["repair_backlog"] >= 15  # owed to n3, as durable hints
    launcher.start(cluster_dir, "n3")
    wait_for(lambda: copies_everywhere(cluster_dir, acked)["n3"] == len(acked), 60, "third copies on n3")
    for h in acked[::7]:
        loc = c.locate(h)
        assert sum(x.verified for x in loc.copies) == 3
    wait_for(lambda: c.stats()["counters"].get("hints_pending", 0) == 0, 30, "hints delivered")
    c.close()


def test_power_loss_of_a_node_loses_only_unacknowledged_blobs(cluster_dir, monkeypatch):
    monkeypatch.setenv(durable.SIM_ENV, "1")  # inherited by the node processes
    start(cluster_dir, repair_interval_s=0.0)
    r2 = replica(cluster_dir, "n2")
    acked: list[bytes] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        i = 0
        while not stop.is_set():
            data = os.urandom(20_000) + bytes([seed]) + i.to_bytes(4, "big")
            try:
                r2.put(data, blob_hash(data))
                acked.append(blob_hash(data))
            except BlobError:
                return  # the node is gone
            i += 1

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    while len(acked) < 100:
        time.sleep(0.01)
    launcher.kill(cluster_dir, "n2")
    stop.set()
    for t in threads:
        t.join()
    report = durable.power_loss(cu.node_dir(cluster_dir, "n2"))
    assert report["removed"] > 0  # the unsynced index files (and any unsynced pack) went
    launcher.start(cluster_dir, "n2")
    r2.close()
    r2 = replica(cluster_dir, "n2")
    assert all(r2.has(acked)), "an acknowledged blob was lost"
    for h in acked[::10]:
        assert r2.verify(h).verified
    st = r2.stats()
    assert st["blobs"] >= len(acked)
    log = cu.logs(cluster_dir)["n2"]
    assert "event=blob_server_started" in log
    r2.close()


def flip_in_pack(node_dir: Path, needle: bytes) -> None:
    """Flip one byte of `needle` (raw content of a stored, uncompressed record) in the node's packs."""
    for p in sorted((node_dir / "blobs" / "store").rglob("*.dat")):
        buf = bytearray(p.read_bytes())
        at = buf.find(needle)
        if at >= 0:
            buf[at + len(needle) // 2] ^= 0x5A
            p.write_bytes(bytes(buf))
            return
    raise AssertionError("record not found in any pack")


def test_flipped_bytes_are_detected_served_from_another_copy_and_repaired(cluster_dir):
    start(cluster_dir, repair_interval_s=0.0)
    c = client(cluster_dir, "n1")
    hot, cold = os.urandom(100_000), os.urandom(100_000)  # random: stored uncompressed
    for data in (hot, cold):
        c.put(data, replicate=True)
    wait_for(lambda: copies_everywhere(cluster_dir, [blob_hash(hot), blob_hash(cold)]) ==
             {"n1": 2, "n2": 2, "n3": 2}, 30, "three copies")
    n1 = cu.node_dir(cluster_dir, "n1")
    flip_in_pack(n1, hot[5000:5100])
    flip_in_pack(n1, cold[5000:5100])
    # A read through n1 (which prefers its own copy) detects the flip and is
    # served from another replica; the bad copy is rewritten.
    assert c.get(blob_hash(hot)) == hot
    wait_for(lambda: all(x.verified for x in c.locate(blob_hash(hot)).copies), 30, "hot copy repaired")
    # The cold blob is found by the scrubber.
    res = c.scrub(all_nodes=True)
    assert res.corrupt == 1 and res.repaired == 1 and res.unrepaired == 0
    assert all(x.verified for x in c.locate(blob_hash(cold)).copies)
    assert c.scrub(all_nodes=True).corrupt == 0
    counters = c.stats()["counters"]
    assert counters.get("read_repairs", 0) >= 1 and counters.get("scrub_repaired", 0) >= 1
    c.close()


def test_replaced_node_is_refilled_to_three_copies(cluster_dir):
    start(cluster_dir)
    c = client(cluster_dir, "n1")
    hashes = [c.put(os.urandom(4000) + bytes([i]), replicate=True).hash for i in range(150)]
    wait_for(lambda: copies_everywhere(cluster_dir, hashes)["n3"] == 150, 30, "three copies")
    launcher.kill(cluster_dir, "n3")
    # n3's disk is lost for good; an empty one takes its place.
    shutil.rmtree(cu.node_dir(cluster_dir, "n3") / "blobs")
    launcher.start(cluster_dir, "n3")
    assert copies_everywhere(cluster_dir, hashes)["n3"] < 150
    wait_for(lambda: copies_everywhere(cluster_dir, hashes) == {"n1": 150, "n2": 150, "n3": 150}, 90,
             "every blob back to 3 copies")
    c.close()


def floe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)


def test_cli_put_get_stat_and_gc_with_pins(cluster_dir, tmp_path):
    start(cluster_dir, repair_interval_s=0.0, gc_grace_s=1.0)
    d = str(cluster_dir)
    src = tmp_path / "in.bin"
    src.write_bytes(b"floe blob " * 50_000)  # compressible
    r = floe("blob", "put", str(src), "--data-dir", d)
    assert r.returncode == 0, r.stderr
    h = r.stdout.strip()
    assert h == blob_hash(src.read_bytes()).hex()
    out = tmp_path / "out.bin"
    r = floe("blob", "get", h, "-o", str(out), "--data-dir", d)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
    r = floe("blob", "stat", h, "--json", "--data-dir", d)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["hash"] == h and sorted(x["node"] for x in st["copies"]) == ["n1", "n2", "n3"]
    assert all(x["verified"] is True for x in st["copies"])
    assert all(x["compression"] == "zstd" for x in st["copies"])
    # An unpinned blob, then GC with a tiny grace period: it goes, the pinned one stays.
    loose = tmp_path / "loose.bin"
    loose.write_bytes(os.urandom(3000))
    r = floe("blob", "put", str(loose), "--no-pin", "--data-dir", d)
    assert r.returncode == 0, r.stderr
    loose_h = r.stdout.strip()
    time.sleep(1.2)
    r = floe("blob", "gc", "--dry-run", "--grace", "1", "--json", "--data-dir", d)
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    assert dry["deleted"] == 3 and dry["live"] == 1
    assert floe("blob", "stat", loose_h, "--data-dir", d).returncode == 0  # dry run deleted nothing
    r = floe("blob", "gc", "--grace", "1", "--json", "--data-dir", d)
    assert json.loads(r.stdout)["deleted"] == 3
    r = floe("blob", "stat", loose_h, "--data-dir", d)
    assert r.returncode == 1 and "BlobNotFound" in r.stderr
    assert floe("blob", "stat", h, "--data-dir", d).returncode == 0
    # Bad input gets a clean error.
    r = floe("blob", "get", "abc", "--data-dir", d)
    assert r.returncode == 2 and "64 hex digits" in r.stderr
    r = floe("cluster", "status", "--json", "--data-dir", d)
    nodes = json.loads(r.stdout)["nodes"]
    assert all(n["blobs"]["blobs"] >= 1 for n in nodes)
    assert sum(n["blobs"]["counters"].get("gc_deleted", 0) for n in nodes) == 3
    # A remote cluster: --server (a node's API address) and the admin token.
    remote = ["--server", launcher.servers(cluster_dir)[1]]
    r = floe("blob", "stat", h, "--json", *remote, "--token", launcher.admin_token(cluster_dir))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["hash"] == h
    r = floe("blob", "stat", h, *remote, "--token", "wrong")
    assert r.returncode == 1 and "token" in r.stderr.lower()
    r = floe("blob", "stat", h, *remote)
    assert r.returncode == 1 and "FLOE_ADMIN_TOKEN" in r.stderr
