"""A volume on a real three-node cluster: its segment map in the Raft KV,
its blobs in the object tier, while the Raft leader is SIGKILLed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from blockdev.errors import Unavailable
from blockdev.registry import Registry
from blockdev.tiers import ClientBlobs
from blockdev.volume import Volume
from cluster import launcher
from objstore.remote import BlobClient
from tests import clusterutil as cu

pytestmark = pytest.mark.cluster

BS = 4096


@pytest.fixture
def cluster_dir(tmp_path: Path):
    d = tmp_path / "cluster"
    yield d
    if launcher.layout_exists(d):
        launcher.down(d, stop_wait_s=5)


def flush_until_ok(v: Volume, wait_s: float = 20.0) -> float:
    """Flush, retrying while the KV elects a new leader; returns seconds taken."""
    t0 = time.monotonic()
    while True:
        try:
            v.flush()
            return time.monotonic() - t0
        except Unavailable:
            if time.monotonic() - t0 > wait_s:
                raise
            time.sleep(0.1)


def test_flushed_blocks_survive_a_raft_leader_sigkill(cluster_dir):
    cu.configure(cluster_dir)
    cu.up(cluster_dir)
    kv = cu.client(cluster_dir, timeout_s=10)
    layout = launcher.load_layout(cluster_dir)
    blob_addrs = [layout.node_config(n).blob_address for n in layout.nodes]
    blobs = ClientBlobs([BlobClient(a, launcher.admin_token(cluster_dir)) for a in blob_addrs])
    info = Registry(kv).create("vol1", 64 << 20, BS)
    v = Volume(kv, info, blobs, "tester", lease_s=5.0)
    v.open(background=False)
    expect: dict[int, bytes] = {}
    for i in range(200):
        lba = (i * 7919) % info.blocks
        data = os.urandom(BS)
        v.write(lba, data)
        expect[lba] = data
    flush_until_ok(v)
    leader = cu.leader_id(cluster_dir)
    launcher.kill(cluster_dir, leader)  # SIGKILL the Raft leader
    for i in range(200):
        lba = (i * 104729 + 5) % info.blocks
        data = os.urandom(BS)
        v.write(lba, data)  # writes keep landing in the buffer meanwhile
        expect[lba] = data
    took = flush_until_ok(v)
    print(f"flush after leader SIGKILL took {took:.2f} s")
    assert took < 10
    v.crash()  # the owner's buffer is gone: only what was flushed remains
    w = Volume(kv, Registry(kv).get("vol1"), blobs, "tester2", lease_s=5.0)
    w.open(wait_s=30, background=False)
    for lba, data in expect.items():
        assert w.read(lba, 1) == data, f"block {lba}"
    launcher.start(cluster_dir, leader)
    w.close()


def test_gc_after_a_volume_delete_keeps_every_block_of_the_others(cluster_dir):
    cu.configure(cluster_dir, top={"blob": {"gc_grace_s": 1.0, "gc_interval_s": 0.0, "repair_interval_s": 0.0}})
    cu.up(cluster_dir)
    kv = cu.client(cluster_dir, timeout_s=10)
    layout = launcher.load_layout(cluster_dir)
    token = launcher.admin_token(cluster_dir)
    clients = [BlobClient(layout.node_config(n).blob_address, token) for n in layout.nodes]
    blobs = ClientBlobs(clients)
    reg = Registry(kv)
    shared = os.urandom(BS)  # the same content in both volumes: one blob, deduplicated
    contents: dict[str, dict[int, bytes]] = {"keep": {}, "drop": {}}
    for name in contents:
        v = Volume(kv, reg.create(name, 16 << 20, BS), blobs, "tester", lease_s=5.0)
        v.open(background=False)
        v.write(0, shared)
        contents[name][0] = shared
        for lba in range(1, 64, 3):
            data = os.urandom(BS)
            v.write(lba, data)
            contents[name][lba] = data
            v.flush()  # many flushes: many blobs
        v.close()
    # keep@s freezes the kept volume; then every block is overwritten, and a
    # clone of keep@s gets writes of its own.
    from blockdev import snapshots

    v = Volume(kv, reg.get("keep"), blobs, "tester", lease_s=5.0)
    v.open(background=False)
    v.snapshot("s")
    frozen = dict(contents["keep"])
    for lba in list(contents["keep"]):
        data = os.urandom(BS)
        v.write(lba, data)
        contents["keep"][lba] = data
    v.close()
    clone_info = snapshots.clone(kv, reg, reg.get("keep"), "s", "kclone")
    c = Volume(kv, clone_info, blobs, "tester", lease_s=5.0)
    c.open(background=False)
    cloned = dict(frozen)
    cloned[1] = os.urandom(BS)
    c.write(1, cloned[1])
    c.close()
    reg.delete("drop")
    time.sleep(1.5)  # past the grace period
    gc = None
    for c in clients:  # the live set is read on the Raft leader
        try:
            gc = c.gc(dry_run=False)
            break
        except Exception:  # noqa: BLE001 - not the leader: the next
            continue
    assert gc is not None and gc.deleted > 0, gc
    v = Volume(kv, reg.get("keep"), blobs, "tester", lease_s=5.0)
    v.open(background=False)
    for lba, data in contents["keep"].items():
        assert v.read(lba, 1) == data, f"block {lba} of the kept volume"
    v.close()
    info = reg.get("keep")
    snap = Volume(kv, info, blobs, "reader", snapshot_gen=snapshots.get(kv, info, "s"))
    for lba, data in frozen.items():
        assert snap.read(lba, 1) == data, f"block {lba} of keep@s"
    c = Volume(kv, reg.get("kclone"), blobs, "tester", lease_s=5.0)
    c.open(background=False)
    for lba, data in cloned.items():
        assert c.read(lba, 1) == data, f"block {lba} of the clone"
    c.close()


def floe(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent.parent)


def test_volume_cli_create_import_export_round_trip(cluster_dir, tmp_path):
    import json

    cu.configure(cluster_dir)
    cu.up(cluster_dir)
    d = ["--data-dir", str(cluster_dir)]
    r = floe("volume", "create", "disk", "--size", "64M", "--block-size", "4096", "--json", *d)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["size"] == 64 << 20
    r = floe("volume", "create", "disk", "--size", "1G", *d)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = floe("volume", "create", "x", "--size", "lots", *d)
    assert r.returncode == 2 and "size like 10G" in r.stderr
    image = tmp_path / "image.raw"
    content = bytearray(os.urandom(24 << 20))
    content[4 << 20:12 << 20] = bytes(8 << 20)  # a zero run
    image.write_bytes(bytes(content) + bytes(40 << 20))  # the rest of the 64 MiB is zeros
    r = floe("volume", "import", "img", str(image), "--json", *d)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["flushed"] and rep["zero_skipped"] >= 40 << 20
    out = tmp_path / "out.raw"
    r = floe("volume", "export", "img", str(out), *d)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == image.read_bytes()
    r = floe("volume", "ls", "--json", *d)
    assert sorted(v["name"] for v in json.loads(r.stdout)["volumes"]) == ["disk", "img"]
    r = floe("volume", "show", "img", "--json", *d)
    shown = json.loads(r.stdout)
    assert shown["flush_seq"] >= 1
    assert shown["allocated"] == 16 << 20  # 24 MiB of data less the 8 MiB zero run: thin
    r = floe("volume", "ls", "--json", *d)
    assert json.loads(r.stdout)["pool"] == {"provisioned": 128 << 20, "allocated": 16 << 20}
    # Snapshot, overwrite, clone, export the snapshot and the clone.
    assert floe("volume", "import", "img", str(tmp_path / "out.raw"), *d).returncode == 0  # no-op rewrite
    r = floe("snapshot", "create", "img", "before", "--json", *d)
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(64 << 20))
    assert floe("volume", "import", "img", str(other), *d).returncode == 0
    assert floe("volume", "clone", "img@before", "img2", *d).returncode == 0
    snap_out, clone_out, head_out = tmp_path / "snap.raw", tmp_path / "clone.raw", tmp_path / "head.raw"
    assert floe("volume", "export", "img@before", str(snap_out), *d).returncode == 0
    assert floe("volume", "export", "img2", str(clone_out), *d).returncode == 0
    assert floe("volume", "export", "img", str(head_out), *d).returncode == 0
    assert snap_out.read_bytes() == image.read_bytes() == clone_out.read_bytes()
    assert head_out.read_bytes() == other.read_bytes()
    r = floe("snapshot", "ls", "img", "--json", *d)
    assert [x["name"] for x in json.loads(r.stdout)["snapshots"]] == ["before"]
    r = floe("snapshot", "rm", "img", "before", *d)
    assert r.returncode == 1 and "clones" in r.stderr
    assert floe("volume", "rm", "img2", *d).returncode == 0
    assert floe("snapshot", "rm", "img", "before", *d).returncode == 0
    r = floe("volume", "clone", "img", "x", *d)
    assert r.returncode == 1 and "VOLUME@SNAPSHOT" in r.stderr
    r = floe("volume", "resize", "img", "--size", "32M", *d)
    assert r.returncode == 1 and "force" in r.stderr
    assert floe("volume", "resize", "img", "--size", "128M", *d).returncode == 0
    assert floe("volume", "rm", "disk", *d).returncode == 0
    r = floe("volume", "show", "disk", *d)
    assert r.returncode == 1 and "no volume" in r.stderr
