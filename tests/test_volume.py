"""Volumes (blockdev/volume.py) over an in-memory KV and object tier.

The state machine test holds the durability contract of DESIGN.md §2 against
a reference model: a bytearray of what the initiator last wrote, and one of
what the last acknowledged flush made durable. An owner crash loses the
buffer (unflushed writes may vanish), never a flushed block.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from blockdev import extents as ext
from blockdev import snapshots
from blockdev.errors import Fenced, InvalidRequest, Miscompare, OutOfRange, Unavailable
from blockdev.registry import Registry
from blockdev.volume import Volume
from tests.volutil import MemBlobs, MemKV

BS = 512
SIZE = 3 * ext.SEGMENT_BYTES  # three segments: writes cross boundaries
BLOCKS = SIZE // BS
LEASE_S = 0.05


def open_volume(kv: MemKV, blobs: MemBlobs, node: str = "n1", name: str = "v") -> Volume:
    reg = Registry(kv)
    try:
        info = reg.get(name)
    except Exception:
        info = reg.create(name, SIZE, BS)
    v = Volume(kv, info, blobs, node, lease_s=LEASE_S)
    v.open(wait_s=5, background=False)
    return v


class VolumeModel(RuleBasedStateMachine):
    """Volumes, snapshots and clones against bytearrays: per volume what reads
    must return (`current`) and what the last flush made durable; per snapshot
    its frozen bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.kv, self.blobs = MemKV(), MemBlobs()
        self.reg = Registry(self.kv)
        self.vols: dict[str, Volume] = {"v": open_volume(self.kv, self.blobs)}
        self.current: dict[str, bytearray] = {"v": bytearray(SIZE)}
        self.durable: dict[str, bytearray] = {"v": bytearray(SIZE)}
        self.snaps: dict[tuple[str, str], bytes] = {}
        self.clone_of: dict[str, tuple[str, str]] = {}
        self.unflushed: dict[str, bool] = {"v": False}  # acknowledged writes no flush covered yet
        self.n = 0

    def _pick(self, i: int) -> str:
        names = sorted(self.vols)
        return names[i % len(names)]

    def _apply(self, name: str, lba: int, data: bytes) -> None:
        self.current[name][lba * BS:lba * BS + len(data)] = data

    @rule(i=st.integers(0, 9), lba=st.integers(0, BLOCKS - 1), blocks=st.integers(1, 2100),
          seed=st.integers(0, 255), zero=st.booleans(), fua=st.booleans())
    def write(self, i: int, lba: int, blocks: int, seed: int, zero: bool, fua: bool) -> None:
        name = self._pick(i)
        blocks = min(blocks, BLOCKS - lba)
        data = bytes(blocks * BS) if zero else bytes((seed + k) % 251 for k in range(blocks * BS))
        self.vols[name].write(lba, data, fua=fua)
        self._apply(name, lba, data)
        self.unflushed[name] = not fua
        if fua:
            self.durable[name][:] = self.current[name]  # a FUA write flushes everything before it too

    @rule(i=st.integers(0, 9))
    def flush(self, i: int) -> None:
        name = self._pick(i)
        dirty = bool(self.vols[name].buffer.dirty_segments())
        before = self.kv.applied
        self.vols[name].flush()
        self.durable[name][:] = self.current[name]
        self.unflushed[name] = False
        # DESIGN.md §5: a flush is ONE Raft command (none when nothing is dirty).
        assert self.kv.applied - before == (1 if dirty else 0)

    @rule(i=st.integers(0, 9), lba=st.integers(0, BLOCKS - 1), blocks=st.integers(1, 3000))
    def unmap(self, i: int, lba: int, blocks: int) -> None:
        name = self._pick(i)
        blocks = min(blocks, BLOCKS - lba)
        self.vols[name].unmap([(lba, blocks)])
        self._apply(name, lba, bytes(blocks * BS))
        self.unflushed[name] = True

    @rule(i=st.integers(0, 9), lba=st.integers(0, BLOCKS - 1), blocks=st.integers(1, 3000),
          byte=st.sampled_from([0, 7]), unmap=st.booleans())
    def write_same(self, i: int, lba: int, blocks: int, byte: int, unmap: bool) -> None:
        name = self._pick(i)
        blocks = min(blocks, BLOCKS - lba)
        self.vols[name].write_same(lba, blocks, bytes([byte]) * BS, unmap=unmap)
        self._apply(name, lba, bytes([byte]) * (blocks * BS))
        self.unflushed[name] = True

    @rule(i=st.integers(0, 9))
    def owner_crash_and_takeover(self, i: int) -> None:
        name = self._pick(i)
        old = self.vols[name]
        old.crash()
        node = "n2" if old.node_id == "n1" else "n1"
        self.vols[name] = open_volume(self.kv, self.blobs, node, name)
        self.current[name][:] = self.durable[name]  # unflushed writes vanish; flushed ones never
        # ...and the new owner knows exactly when acknowledged writes may have vanished.
        assert self.vols[name].writes_lost == self.unflushed[name]
        self.unflushed[name] = False

    @rule(i=st.integers(0, 9))
    def snapshot(self, i: int) -> None:
        name = self._pick(i)
        self.n += 1
        snap = f"s{self.n}"
        self.vols[name].snapshot(snap)  # flushes first
        self.durable[name][:] = self.current[name]
        self.unflushed[name] = False
        self.snaps[(name, snap)] = bytes(self.current[name])

    @rule(i=st.integers(0, 9))
    def snapshot_from_outside(self, i: int) -> None:
        """An operator's snapshot while the owner runs: it holds what is flushed."""
        name = self._pick(i)
        self.n += 1
        snap = f"x{self.n}"
        snapshots.create(self.kv, self.reg.get(name), snap)
        self.snaps[(name, snap)] = bytes(self.durable[name])

    @rule(k=st.integers(0, 99))
    def clone(self, k: int) -> None:
        if not self.snaps or len(self.vols) >= 3:
            return
        vol, snap = sorted(self.snaps)[k % len(self.snaps)]
        self.n += 1
        new = f"c{self.n}"
        snapshots.clone(self.kv, self.reg, self.reg.get(vol), snap, new)
        self.vols[new] = open_volume(self.kv, self.blobs, "n1", new)
        self.current[new] = bytearray(self.snaps[(vol, snap)])
        self.durable[new] = bytearray(self.snaps[(vol, snap)])
        self.unflushed[new] = False
        self.clone_of[new] = (vol, snap)

    @rule(k=st.integers(0, 99))
    def delete_snapshot(self, k: int) -> None:
        free = sorted(s for s in self.snaps if s not in self.clone_of.values())
        if not free:
            return
        vol, snap = free[k % len(free)]
        snapshots.delete(self.kv, self.reg, self.reg.get(vol), snap)
        del self.snaps[(vol, snap)]

    @rule(k=st.integers(0, 99))
    def read_snapshot(self, k: int) -> None:
        if not self.snaps:
            return
        vol, snap = sorted(self.snaps)[k % len(self.snaps)]
        self._check_snapshot(vol, snap)

    def _check_snapshot(self, vol: str, snap: str) -> None:
        info = self.reg.get(vol)
        view = Volume(self.kv, info, self.blobs, "reader", snapshot_gen=snapshots.get(self.kv, info, snap))
        assert view.read(0, BLOCKS) == self.snaps[(vol, snap)], f"snapshot {vol}@{snap}"

    @rule(i=st.integers(0, 9), lba=st.integers(0, BLOCKS - 1), blocks=st.integers(1, 2100))
    def read_range(self, i: int, lba: int, blocks: int) -> None:
        name = self._pick(i)
        blocks = min(blocks, BLOCKS - lba)
        assert self.vols[name].read(lba, blocks) == bytes(self.current[name][lba * BS:(lba + blocks) * BS])

    @invariant()
    def records_stay_bounded(self) -> None:
        for v in self.vols.values():
            for rec in v._records.values():
                assert not ext.fragmented(rec)

    def teardown(self) -> None:
        for name, v in self.vols.items():
            assert v.read(0, BLOCKS) == bytes(self.current[name]), f"volume {name}"
        for vol, snap in self.snaps:
            self._check_snapshot(vol, snap)


TestVolumeModel = VolumeModel.TestCase
TestVolumeModel.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


def test_a_fenced_owner_cannot_commit_and_its_writes_never_show():
    kv, blobs = MemKV(), MemBlobs()
    a = open_volume(kv, blobs, "n1")
    a.write(0, b"A" * BS)
    a.flush()
    a.write(1, b"a" * BS)  # buffered on the old owner only
    b = open_volume(kv, blobs, "n2")  # a stopped renewing: its lease expires, b takes over (epoch 2)
    assert b.epoch == a.epoch + 1
    a.write(2, b"x" * BS)
    with pytest.raises(Fenced):
        a.flush()
    with pytest.raises(Fenced):
        a.read(0, 1)  # the old owner stops serving
    assert b.read(0, 3) == b"A" * BS + bytes(2 * BS)
    assert a.buffer.dirty_bytes == 0  # dropped


def test_renewal_notices_a_takeover():
    kv, blobs = MemKV(), MemBlobs()
    a = open_volume(kv, blobs, "n1")
    open_volume(kv, blobs, "n2")
    with pytest.raises(Fenced):
        a.renew()


def test_a_live_owner_keeps_its_volume():
    kv, blobs = MemKV(), MemBlobs()
    a = open_volume(kv, blobs, "n1")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_S / 4):
            a.renew()

    t = threading.Thread(target=renew)
    t.start()
    try:
        reg = Registry(kv)
        b = Volume(kv, reg.get("v"), blobs, "n2", lease_s=LEASE_S)
        with pytest.raises(Unavailable, match="owned by n1"):
            b.open(wait_s=0.3, background=False)
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize("fault", ["blobs", "kv"])
def test_a_flush_that_cannot_complete_keeps_everything_buffered(fault):
    kv, blobs = MemKV(), MemBlobs()
    v = open_volume(kv, blobs)
    data = os.urandom(8 * BS)
    v.write(10, data)
    if fault == "blobs":
        blobs.fail = True
    else:
        real_batch = kv.batch

        def failing_batch(store, **kw):
            if any(m.keyspace == "segments" for m in kw.get("mutations", ())):
                from kv.errors import Unavailable as KVUnavailable
                raise KVUnavailable("no quorum (test)")
            return real_batch(store, **kw)

        kv.batch = failing_batch  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        v.flush()
    assert v.read(10, 8) == data  # still readable from the buffer
    v.write(12, b"n" * BS)  # a newer write on top of the returned data
    blobs.fail = False
    kv.batch = MemKV.batch.__get__(kv)  # type: ignore[method-assign]
    v.flush()
    v.crash()
    w = open_volume(kv, blobs, "n2")
    assert w.read(10, 8) == data[:2 * BS] + b"n" * BS + data[3 * BS:]


def test_compare_and_write():
    kv, blobs = MemKV(), MemBlobs()
    v = open_volume(kv, blobs)
    v.write(5, b"o" * BS)
    v.compare_and_write(5, b"o" * BS, b"N" * BS)
    assert v.read(5, 1) == b"N" * BS
    with pytest.raises(Miscompare) as e:
        v.compare_and_write(5, b"N" * 100 + b"?" + b"N" * (BS - 101), b"Z" * BS)
    assert e.value.offset == 100
    assert v.read(5, 1) == b"N" * BS


def test_zeros_are_holes_and_lba_status_reports_mapping():
    kv, blobs = MemKV(), MemBlobs()
    v = open_volume(kv, blobs)
    v.write(0, os.urandom(16 * BS))
    v.write(16, bytes(32 * BS))  # zeros: stored as a hole
    v.flush()
    rec = v._records[0]
    assert ext.allocated(rec) == 16 * BS
    assert v.lba_status(0) == (0, 16, True)
    lba, count, mapped = v.lba_status(16)
    assert lba == 16 and not mapped and count >= 32
    v.unmap([(4, 4)])
    assert v.lba_status(4) == (4, 4, False)
    v.flush()
    assert ext.allocated(v._records[0]) == 12 * BS


def test_many_small_flushes_keep_a_segment_unfragmented():
    kv, blobs = MemKV(), MemBlobs()
    v = open_volume(kv, blobs)
    expect = bytearray(ext.SEGMENT_BYTES)
    for i in range(3 * ext.EXTENTS_MAX):
        lba = (i * 37) % 2000
        data = bytes([i % 256]) * BS
        v.write(lba, data)
        expect[lba * BS:(lba + 1) * BS] = data
        v.flush()
    assert not ext.fragmented(v._records[0]) and v.stats["segments_rewritten"] >= 1
    assert v.read(0, 2048) == bytes(expect)


def test_bad_requests():
    kv, blobs = MemKV(), MemBlobs()
    v = open_volume(kv, blobs)
    with pytest.raises(OutOfRange):
        v.read(BLOCKS, 1)
    with pytest.raises(OutOfRange):
        v.write(BLOCKS - 1, bytes(2 * BS))
    with pytest.raises(InvalidRequest):
        v.write(0, bytes(BS + 1))
    with pytest.raises(InvalidRequest):
        v.write_same(0, 1, bytes(10))


def test_registry():
    kv = MemKV()
    reg = Registry(kv)
    a = reg.create("a", 10 << 20, 4096)
    assert reg.get("a") == a and [i.name for i in reg.list()] == ["a"]
    with pytest.raises(Exception, match="already exists"):
        reg.create("a", 1 << 20)
    with pytest.raises(InvalidRequest):
        reg.create("b", 1000, 512)  # not whole blocks
    with pytest.raises(InvalidRequest):
        reg.create("c", 1 << 20, 1024)
    with pytest.raises(InvalidRequest):
        reg.create("bad/name", 1 << 20)
    assert reg.resize("a", 20 << 20).size == 20 << 20
    with pytest.raises(InvalidRequest, match="force"):
        reg.resize("a", 5 << 20)
    assert reg.resize("a", 5 << 20, force=True).size == 5 << 20
    reg.delete("a")
    assert reg.list() == [] and a.store not in kv.stores


def test_writers_past_the_high_water_mark_slow_down_and_never_fail():
    kv, blobs = MemKV(), MemBlobs()
    info = Registry(kv).create("big", 16 << 20, BS)
    v = Volume(kv, info, blobs, "n1", lease_s=5.0, high_water_bytes=2 << 20, flush_dirty_bytes=64 << 20,
               flush_after_s=3600)
    v.open(background=True)  # only the high-water mark can start a flush here
    chunks = [os.urandom(1 << 20) for _ in range(12)]
    done = threading.Event()

    def writer() -> None:
        for i, c in enumerate(chunks):
            v.write(i * (1 << 20) // BS, c)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    assert done.wait(30), "a writer past the high-water mark was never let through"
    t.join()
    assert v.stats["flushes"] >= 1 and v.buffer.dirty_bytes <= 3 << 20
    assert v.read(0, (12 << 20) // BS) == b"".join(chunks)
    v.close()


def test_deleting_a_snapshot_prunes_only_versions_no_one_sees():
    kv, blobs = MemKV(), MemBlobs()
    reg = Registry(kv)
    v = open_volume(kv, blobs)
    states = []
    for k in range(4):
        v.write(0, bytes([k + 1]) * (4 * BS))
        v.write(3000, bytes([k + 1]) * BS)  # the second segment too
        v.snapshot(f"s{k}")
        states.append(v.read(0, BLOCKS))
    v.write(1, b"h" * BS)
    v.flush()
    head = v.read(0, BLOCKS)
    info = reg.get("v")

    def view(name: str) -> bytes:
        return Volume(kv, info, blobs, "r", snapshot_gen=snapshots.get(kv, info, name)).read(0, BLOCKS)

    assert snapshots.delete(kv, reg, info, "s1") == 2  # s1's versions of both segments
    assert [view(n) for n in ("s0", "s2", "s3")] == [states[0], states[2], states[3]]
    assert snapshots.delete(kv, reg, info, "s0") == 2
    assert snapshots.delete(kv, reg, info, "s3") == 1  # the head still sees s3's version of segment 1
    assert view("s2") == states[2] and v.read(0, BLOCKS) == head
    clone = snapshots.clone(kv, reg, info, "s2", "c")
    with pytest.raises(InvalidRequest, match="clones"):
        snapshots.delete(kv, reg, info, "s2")
    with pytest.raises(InvalidRequest, match="clones"):
        reg.delete("v")
    c = Volume(kv, clone, blobs, "n1", lease_s=LEASE_S)
    c.open(background=False)
    assert c.read(0, BLOCKS) == states[2]
    c.write(2, b"c" * BS)
    c.flush()
    assert view("s2") == states[2] and v.read(0, BLOCKS) == head  # the clone's writes go nowhere else


def test_thin_accounting_soft_threshold_and_hard_limit():
    from blockdev.errors import SpaceExhausted

    kv, blobs = MemKV(), MemBlobs()
    reg = Registry(kv)
    info = reg.create("thin", 1 << 20, BS)
    pool = {"used": 0}
    v = Volume(kv, info, blobs, "n1", lease_s=LEASE_S, soft_threshold_pct=50, pool_hard_limit_bytes=768 << 10,
               pool_allocated=lambda: pool["used"])
    v.open(background=False)
    assert v.allocated == 0 and reg.usage() == {"provisioned": 1 << 20, "allocated": 0}
    v.write(0, os.urandom(256 << 10))
    v.write(1024, bytes(128 << 10))  # zeros: allocate nothing
    v.flush()
    assert v.allocated == 256 << 10 and not v.soft_threshold_event()
    assert reg.usage()["allocated"] == 256 << 10
    v.write(512, os.urandom(300 << 10))
    v.flush()
    assert v.soft_threshold_event() and not v.soft_threshold_event()  # once per crossing
    pool["used"] = v.allocated + (300 << 10)  # the pool (other volumes too) passed the hard limit
    with pytest.raises(SpaceExhausted):
        v.write(1500, os.urandom(BS))  # a new block: refused
    v.write(0, os.urandom(BS))  # an overwrite of a mapped block: allowed
    assert len(v.read(0, 2048)) == 1 << 20  # everything stays readable
    v.unmap([(0, 512)])
    v.flush()
    assert v.allocated == 300 << 10
    v.crash()
    w = open_volume(kv, blobs, "n2", "thin")
    assert w.allocated == 300 << 10  # recomputed from the map at open


def test_idle_volume_compacts_cold_fragmented_segments():
    kv, blobs = MemKV(), MemBlobs()
    info = Registry(kv).create("frag", 2 << 20, BS)
    v = Volume(kv, info, blobs, "n1", lease_s=5.0, compact_idle_s=0.2, flush_after_s=3600)
    v.open(background=True)
    expect = bytearray(2 << 20)
    for i in range(40):  # 40 flushes of scattered blocks: ~40 extents in segment 0
        lba = (i * 53) % 2000
        data = bytes([i + 1]) * BS
        v.write(lba, data)
        expect[lba * BS:(lba + 1) * BS] = data
        v.flush()
    assert len(v._records[0]) > 16
    deadline = time.monotonic() + 10
    while v.stats["segments_compacted"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert v.stats["segments_compacted"] == 1 and len(v._records[0]) == 1
    assert v.read(0, 4096) == bytes(expect)
    v.crash()
    w = open_volume(kv, blobs, "n2", "frag")
    assert len(w._records[0]) == 1 and w.read(0, 4096) == bytes(expect)


def _fragment(v: Volume, segments: int, runs: int, expect: bytearray) -> None:
    """Write `runs` separate 512-byte runs into each of the first `segments` segments."""
    per_seg = ext.SEGMENT_BYTES // BS
    for seg in range(segments):
        for r in range(runs):
            lba = seg * per_seg + 2 * r * (per_seg // (2 * runs))
            data = bytes([(seg + r) % 250 + 1]) * BS
            v.write(lba, data)
            expect[lba * BS:(lba + 1) * BS] = data


def test_a_flush_of_many_fragmented_segments_is_one_raft_command():
    # 240 segments of 60 runs each: their records together are ~800 KB, far
    # over one Raft entry. The flush rewrites the largest whole until they fit
    # and commits them all in one batch.
    kv, blobs = MemKV(), MemBlobs()
    segments, runs = 240, 60
    info = Registry(kv).create("frag", segments * ext.SEGMENT_BYTES, BS)
    v = Volume(kv, info, blobs, "n1", lease_s=5.0)
    v.open(background=False)
    expect = bytearray(info.size)
    _fragment(v, segments, runs, expect)
    assert len(v.buffer.dirty_segments()) == segments
    before = kv.applied
    v.flush()
    assert kv.applied - before == 1 and kv.batch_ops[-1] == segments + 6
    assert v.stats["segments_rewritten_to_fit"] >= 1
    assert v.read(0, info.blocks) == bytes(expect)
    v.crash()
    w = Volume(kv, Registry(kv).get("frag"), blobs, "n2", lease_s=0.05)
    w.open(wait_s=5, background=False)
    assert w.read(0, info.blocks) == bytes(expect)


def test_dirty_segments_are_bounded_so_every_flush_fits_one_command():
    # Writers touching many segments slow down; the background flusher keeps
    # up, each flush one batch of at most max_dirty_segments records.
    kv, blobs = MemKV(), MemBlobs()
    info = Registry(kv).create("wide", 64 * ext.SEGMENT_BYTES, BS)
    v = Volume(kv, info, blobs, "n1", lease_s=5.0, max_dirty_segments=8, flush_after_s=3600)
    v.open(background=True)
    expect = bytearray(info.size)
    done = threading.Event()

    def writer() -> None:
        _fragment(v, 64, 3, expect)
        data = os.urandom(40 * ext.SEGMENT_BYTES)
        v.write(0, data)  # one write across 40 segments
        expect[:len(data)] = data
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    assert done.wait(60), "a writer past the segment bound was never let through"
    t.join()
    assert len(v.buffer.dirty_segments()) <= 8
    v.flush()
    assert v.stats["flushes"] >= 64 // 8
    flush_batches = [n for n in kv.batch_ops if n >= 5]  # lease batches have 2 or 3 operations
    assert flush_batches and max(flush_batches) <= 8 + 6
    assert v.read(0, info.blocks) == bytes(expect)
    v.close()
    with pytest.raises(ValueError):
        Volume(kv, info, blobs, "n1", max_dirty_segments=252)


def test_punching_holes_where_nothing_is_stored_writes_no_records():
    kv, blobs = MemKV(), MemBlobs()
    v = open_volume(kv, blobs)
    v.unmap([(0, BLOCKS)])
    before = kv.applied
    v.flush()
    assert kv.applied - before == 1  # the fenced flush_seq/changelog commit, with no records
    assert kv.batch_ops[-1] == 6  # with the dirty marker's delete
    assert v.read(0, BLOCKS) == bytes(SIZE)


class CountingBlobs(MemBlobs):
    """MemBlobs that records every get's range and offers put_many."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: list[tuple[int, int]] = []
        self.put_many_calls: list[int] = []

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> bytes:
        self.gets.append((offset, length))
        return super().get(h, offset, length)

    def put_many(self, datas: list[bytes]) -> list[bytes]:
        self.put_many_calls.append(len(datas))
        return [self.put(d) for d in datas]


def _cold_volume(blobs: CountingBlobs) -> tuple[Volume, bytes]:
    """A volume whose three segments are flushed (one blob each), reopened on
    another node so nothing is cached."""
    kv = MemKV()
    v = open_volume(kv, blobs)
    data = os.urandom(SIZE)
    v.write(0, data)
    v.flush()
    v.close()
    time.sleep(LEASE_S * 3)
    w = open_volume(kv, blobs, node="n2")
    blobs.gets.clear()
    return w, data


def test_a_small_random_read_fetches_only_its_range_and_a_sequential_one_the_whole_blob():
    blobs = CountingBlobs()
    v, data = _cold_volume(blobs)
    # Random 4 KiB reads: each fetches its 4 KiB, nothing is cached.
    for lba in (1000, 24, 3000, 517):
        assert v.read(lba, 8) == data[lba * BS:(lba + 8) * BS]
    assert blobs.gets and all(length == 8 * BS for _o, length in blobs.gets)
    assert v.cache.ranged == 4 and v.cache.hits == 0
    # A stream: the read right after the last one fetches the whole blob and
    # caches it, so the rest of the stream is served from the cache.
    blobs.gets.clear()
    for i in range(1, 6):
        lba = 517 + 8 * i
        assert v.read(lba, 8) == data[lba * BS:(lba + 8) * BS]
    assert blobs.gets == [(0, 0)]
    assert v.cache.hits == 4
    # A large read fetches whole blobs.
    blobs.gets.clear()
    assert v.read(BLOCKS - 512, 512) == data[-512 * BS:]
    assert blobs.gets == [(0, 0)]
    v.close()


def test_a_flush_puts_all_its_blobs_in_one_put_many():
    blobs = CountingBlobs()
    v = open_volume(MemKV(), blobs)
    expect = bytearray(SIZE)
    for seg in range(3):
        lba = seg * ext.SEGMENT_BYTES // BS + 8
        d = os.urandom(4096)
        v.write(lba, d)
        expect[lba * BS:lba * BS + len(d)] = d
    v.flush()
    assert blobs.put_many_calls == [3]
    d = os.urandom(BS)
    v.write(0, d)
    expect[:BS] = d
    v.flush()
    assert blobs.put_many_calls == [3, 1]
    assert blobs.puts == 4
    v.close()
    time.sleep(LEASE_S * 3)
    w = open_volume(v.kv, blobs, node="n2")
    assert w.read(0, BLOCKS) == bytes(expect)
    w.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([1, 50, 4095, 4096, 4099, 8192])), min_size=1, max_size=12),
       st.booleans())
def test_split_zero_runs_finds_exactly_the_all_zero_chunks(parts: list[tuple[bool, int]], as_bytearray: bool) -> None:
    # A flush stores all-zero ZERO_CHUNK pieces (counted from the run's start) as holes and the
    # rest as data; the fast paths (no zero chunk at all / all zeros) must agree with the walk.
    from blockdev.volume import ZERO_CHUNK, _split_zero_runs

    data = b"".join(bytes(n) if zero else bytes([7]) * n for zero, n in parts)
    z = ZERO_CHUNK
    if data.count(0) == len(data):
        want: tuple[list[tuple[int, int]], list[tuple[int, bytes]]] = ([(9, len(data))], [])
    elif len(data) < 2 * z:
        want = ([], [(9, data)])
    else:
        kinds: list[tuple[bool, int, int]] = []
        for i in range(0, len(data), z):
            j = min(i + z, len(data))
            is_zero = data[i:j].count(0) == j - i
            if kinds and kinds[-1][0] == is_zero:
                kinds[-1] = (is_zero, kinds[-1][1], j)
            else:
                kinds.append((is_zero, i, j))
        want = ([(9 + a, b - a) for k, a, b in kinds if k], [(9 + a, data[a:b]) for k, a, b in kinds if not k])
    holes, runs = _split_zero_runs(9, bytearray(data) if as_bytearray else data)
    assert (holes, [(o, bytes(d)) for o, d in runs]) == want
