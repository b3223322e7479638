"""Volumes (blockdev/volume.py) over an in-memory KV and object tier.

The state machine test holds the durability contract of DESIGN.md §2 against
a reference model: a bytearray of what the initiator last wrote, and one of
what the last acknowledged flush made durable. An owner crash loses the
buffer (unflushed writes may vanish), never a flushed block.
"""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from blockdev import extents as ext
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
    def __init__(self) -> None:
        super().__init__()
        self.kv, self.blobs = MemKV(), MemBlobs()
        self.vol = open_volume(self.kv, self.blobs)
        self.current = bytearray(SIZE)   # what reads must return
        self.durable = bytearray(SIZE)   # what the last acknowledged flush covers

    def _apply(self, lba: int, data: bytes) -> None:
        self.current[lba * BS:lba * BS + len(data)] = data

    @rule(lba=st.integers(0, BLOCKS - 1), blocks=st.integers(1, 2100), seed=st.integers(0, 255),
          zero=st.booleans(), fua=st.booleans())
    def write(self, lba: int, blocks: int, seed: int, zero: bool, fua: bool) -> None:
        blocks = min(blocks, BLOCKS - lba)
        data = bytes(blocks * BS) if zero else bytes((seed + i) % 251 for i in range(blocks * BS))
        self.vol.write(lba, data, fua=fua)
        self._apply(lba, data)
        if fua:
            self.durable[:] = self.current  # a FUA write flushes everything before it too

    @rule()
    def flush(self) -> None:
        self.vol.flush()
        self.durable[:] = self.current

    @rule(lba=st.integers(0, BLOCKS - 1), blocks=st.integers(1, 3000))
    def unmap(self, lba: int, blocks: int) -> None:
        blocks = min(blocks, BLOCKS - lba)
        self.vol.unmap([(lba, blocks)])
        self._apply(lba, bytes(blocks * BS))

    @rule(lba=st.integers(0, BLOCKS - 1), blocks=st.integers(1, 3000), byte=st.sampled_from([0, 7]),
          unmap=st.booleans())
    def write_same(self, lba: int, blocks: int, byte: int, unmap: bool) -> None:
        blocks = min(blocks, BLOCKS - lba)
        self.vol.write_same(lba, blocks, bytes([byte]) * BS, unmap=unmap)
        self._apply(lba, bytes([byte]) * (blocks * BS))

    @rule()
    def owner_crash_and_takeover(self) -> None:
        self.vol.crash()
        node = "n2" if self.vol.node_id == "n1" else "n1"
        self.vol = open_volume(self.kv, self.blobs, node)
        self.current[:] = self.durable  # unflushed writes vanish; flushed ones never

    @rule(lba=st.integers(0, BLOCKS - 1), blocks=st.integers(1, 2100))
    def read_range(self, lba: int, blocks: int) -> None:
        blocks = min(blocks, BLOCKS - lba)
        assert self.vol.read(lba, blocks) == bytes(self.current[lba * BS:(lba + blocks) * BS])

    @invariant()
    def records_stay_bounded(self) -> None:
        for rec in self.vol._records.values():
            assert not ext.fragmented(rec)

    def teardown(self) -> None:
        assert self.vol.read(0, BLOCKS) == bytes(self.current)


TestVolumeModel = VolumeModel.TestCase
TestVolumeModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
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
