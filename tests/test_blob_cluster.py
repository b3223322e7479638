"""The object tier's cluster logic (objstore/cluster.py) over in-memory replicas."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objstore.api import BlobNotFound, InvalidBlob, NotEnoughReplicas, ReplicaUnavailable, blob_hash
from objstore.cluster import BlobCluster
from objstore.hints import HintLog
from objstore.pack import HEADER_BYTES, LocalStore
from tests.blobutil import MemBatchReplica, MemReplica

NODES = ["n1", "n2", "n3"]


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class Pins:
    def __init__(self) -> None:
        self.live: set[bytes] = set()

    def live_blobs(self) -> set[bytes]:
        return set(self.live)


def make(tmp: str, clock: Clock | None = None, **kw: object) -> tuple[BlobCluster, dict[str, MemReplica]]:
    reps = {n: MemReplica(n, clock or time.time) for n in NODES}
    c = BlobCluster("n1", dict(reps), HintLog(os.path.join(tmp, "hints")), **kw)  # type: ignore[arg-type]
    return c, reps


def wait_for(pred, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_put_reaches_all_three_and_get_verifies(tmp_path):
    c, reps = make(str(tmp_path))
    data = os.urandom(5000)
    h = blob_hash(data)
    res = c.put(data, h)
    assert len(res.stored_on) >= 2
    wait_for(lambda: all(h in r.blobs for r in reps.values()))
    wait_for(lambda: c.hints.count() == 0)
    assert c.get(h) == (data, 5000, "n1")  # local copy first
    assert c.get(h, 10, 20)[0] == data[10:30]
    c.stop()


def test_put_with_one_replica_down_succeeds_and_hint_completes_it(tmp_path):
    c, reps = make(str(tmp_path))
    reps["n3"].down = True
    data = b"x" * 1000
    h = blob_hash(data)
    res = c.put(data, h)
    assert sorted(res.stored_on) == ["n1", "n2"] and res.pending == ["n3"]
    assert c.hints.count() == 1 and c.repair_backlog() == 1
    assert c.deliver_hints() == 0  # still down
    reps["n3"].down = False
    c._down_until.clear()
    assert c.deliver_hints() == 1
    assert h in reps["n3"].blobs and c.hints.count() == 0
    c.stop()


def test_hints_survive_a_restart_of_the_writer(tmp_path):
    c, reps = make(str(tmp_path))
    reps["n2"].down = True
    data = b"hinted"
    c.put(data, blob_hash(data))
    c.stop()
    c.hints.close()
    reps["n2"].down = False
    c2 = BlobCluster("n1", dict(reps), HintLog(os.path.join(tmp_path, "hints")))  # type: ignore[arg-type]
    assert c2.hints.count() == 1
    assert c2.deliver_hints() == 1
    assert blob_hash(data) in reps["n2"].blobs
    c2.stop()


def test_put_fails_without_a_write_quorum(tmp_path):
    c, reps = make(str(tmp_path))
    reps["n2"].down = reps["n3"].down = True
    with pytest.raises(NotEnoughReplicas):
        c.put(b"nope", blob_hash(b"nope"))
    assert c.hints.count() == 0
    c.stop()


def test_slow_replica_does_not_hold_up_the_put_and_its_late_ack_clears_the_hint(tmp_path):
    c, reps = make(str(tmp_path))
    reps["n3"].delay_s = 0.3
    data = b"slow" * 100
    h = blob_hash(data)
    res = c.put(data, h)
    assert sorted(res.stored_on) == ["n1", "n2"]
    wait_for(lambda: h in reps["n3"].blobs and c.hints.count() == 0)
    c.stop()


def test_corrupt_copy_is_detected_served_from_another_and_repaired(tmp_path):
    c, reps = make(str(tmp_path))
    data = os.urandom(3000)
    h = blob_hash(data)
    c.put(data, h)
    wait_for(lambda: all(h in r.blobs for r in reps.values()))
    reps["n1"].corrupt(h)
    got, size, served_by = c.get(h)
    assert got == data and served_by != "n1"
    wait_for(lambda: h in reps["n1"].blobs and blob_hash(reps["n1"].blobs[h][0]) == h)
    assert c.counters()["read_repairs"] >= 1 and c.counters()["corrupt_found"] >= 1
    c.stop()


def test_missing_copy_is_read_repaired(tmp_path):
    c, reps = make(str(tmp_path))
    data = b"m" * 333
    h = blob_hash(data)
    c.put(data, h)
    wait_for(lambda: all(h in r.blobs for r in reps.values()))
    del reps["n1"].blobs[h]
    assert c.get(h)[0] == data
    wait_for(lambda: h in reps["n1"].blobs)
    c.stop()


def test_slow_first_replica_is_hedged(tmp_path):
    reps = {n: MemReplica(n) for n in NODES}
    c = BlobCluster("client", dict(reps), HintLog(os.path.join(tmp_path, "hints")),  # type: ignore[arg-type]
                    hedge_after_s=0.02)
    data = b"hedge" * 50
    h = blob_hash(data)
    c.put(data, h)
    wait_for(lambda: all(h in r.blobs for r in reps.values()))
    first = c.placement(h)[0]
    reps[first].delay_s = 1.0
    t = time.monotonic()
    got, _, served_by = c.get(h)
    assert got == data and served_by != first
    assert time.monotonic() - t < 0.9
    assert c.counters()["hedged_reads"] >= 1
    c.stop()


def test_not_found_anywhere(tmp_path):
    c, _ = make(str(tmp_path))
    with pytest.raises(BlobNotFound):
        c.get(blob_hash(b"never"))
    c.stop()


def test_replaced_node_is_refilled_by_repair(tmp_path):
    c, reps = make(str(tmp_path))
    hashes = []
    for i in range(200):
        d = os.urandom(100) + bytes([i])
        hashes.append(blob_hash(d))
        c.put(d, hashes[-1])
    wait_for(lambda: all(len(r.blobs) == 200 for r in reps.values()))
    # n2 is lost for good and replaced by an empty node with the same id.
    reps["n2"] = MemReplica("n2")
    c.replicas["n2"] = reps["n2"]
    assert c.repair_pass() == 200
    assert all(h in reps["n2"].blobs for h in hashes)
    assert c.repair_pass() == 0 and c.repair_backlog() == 0
    c.stop()


def test_scrub_finds_and_repairs_cold_corruption(tmp_path):
    c, reps = make(str(tmp_path))
    blobs = [os.urandom(500) for _ in range(20)]
    for d in blobs:
        c.put(d, blob_hash(d))
    wait_for(lambda: all(len(r.blobs) == 20 for r in reps.values()))
    bad = [blob_hash(blobs[3]), blob_hash(blobs[7])]
    for h in bad:
        reps["n1"].corrupt(h)
    res = c.scrub()
    assert (res.checked, res.corrupt, res.repaired, res.unrepaired) == (20, 2, 2, 0)
    assert all(blob_hash(reps["n1"].blobs[h][0]) == h for h in bad)
    assert c.scrub().corrupt == 0
    c.stop()


def test_gc_refuses_without_a_live_set_provider(tmp_path):
    c, _ = make(str(tmp_path))
    with pytest.raises(Exception, match="live-set"):
        c.gc()
    c.stop()


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 7)),
    st.tuples(st.just("ref"), st.integers(0, 7)),
    st.tuples(st.just("unref"), st.integers(0, 7)),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 30.0, 61.0, 200.0])),
    st.tuples(st.just("gc"), st.booleans()),
), max_size=40)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_gc_never_deletes_live_or_young_and_deletes_old_garbage(seq):
    grace = 60.0
    clock = Clock()
    pins = Pins()
    with tempfile.TemporaryDirectory() as tmp:
        c, reps = make(tmp, clock, live_set=pins, gc_grace_s=grace)
        data = {i: f"blob-{i}".encode() * 10 for i in range(8)}
        last_put: dict[int, float] = {}
        try:
            for op, arg in seq:
                if op == "put":
                    c.put(data[arg], blob_hash(data[arg]))
                    last_put[arg] = clock.t
                elif op == "ref" and arg in last_put:
                    pins.live.add(blob_hash(data[arg]))  # only what exists can be referenced
                elif op == "unref":
                    pins.live.discard(blob_hash(data[arg]))
                elif op == "tick":
                    clock.t += arg
                elif op == "gc":
                    live = set(pins.live)
                    res = c.gc(dry_run=arg)
                    for i, t in last_put.items():
                        h = blob_hash(data[i])
                        copies = sum(h in r.blobs for r in reps.values())
                        if h in live or clock.t - t <= grace:
                            assert copies == 3, (i, "live or young blob lost a copy")
                        elif not arg:
                            assert copies == 0, (i, "old unreferenced blob survived GC")
                    if arg:
                        assert res.deleted == sum(
                            3 for i, t in last_put.items()
                            if blob_hash(data[i]) not in live and clock.t - t > grace
                            and blob_hash(data[i]) in reps["n1"].blobs)
                    else:
                        for i in [i for i, t in last_put.items()
                                  if blob_hash(data[i]) not in live and clock.t - t > grace]:
                            del last_put[i]
        finally:
            c.stop()
            c.hints.close()


def test_background_compaction_runs_on_the_local_store(tmp_path):
    c, reps = make(str(tmp_path))
    calls: list[float] = []
    reps["n1"].compact = lambda fraction: calls.append(fraction) or 1  # type: ignore[attr-defined]
    c.start(hint_interval_s=0, repair_interval_s=0, scrub_interval_s=0, compact_interval_s=0.05,
            compact_dead_fraction=0.4)
    wait_for(lambda: len(calls) >= 2)
    c.stop()
    assert calls[0] == 0.4 and c.counters()["packs_compacted"] >= 2


# ---------------------------------------------------------------- review findings, each held by a test


class SteppingReplica(MemReplica):
    """Its clock moves forward by `step` on every list(): a sweep that takes long."""

    def __init__(self, node_id: str, clock: Clock, step: float) -> None:
        super().__init__(node_id, clock)
        self._clock, self._step = clock, step

    def list(self, after: bytes = b"", limit: int = 1000):
        self._clock.t += self._step
        return super().list(after, limit)


def test_a_sweep_longer_than_the_grace_period_spares_blobs_referenced_after_the_mark(tmp_path):
    clock, pins = Clock(), Pins()
    reps = {n: SteppingReplica(n, clock, 40.0) for n in NODES}
    c = BlobCluster("n1", dict(reps), HintLog(os.path.join(tmp_path, "hints")),  # type: ignore[arg-type]
                    live_set=pins, gc_grace_s=60.0, monotonic=clock)
    data = b"referenced after the mark"
    h = blob_hash(data)
    original = pins.live_blobs

    def mark_then_reference() -> set[bytes]:
        live = original()
        c.put(data, h)  # put and referenced right after the mark was taken
        pins.live.add(h)
        return live

    pins.live_blobs = mark_then_reference  # type: ignore[method-assign]
    c.gc()
    # Each node's listing took 40 s, so the last sweep ran 120 s after the mark:
    # every copy (age up to 120 s > grace 60 s) must still be there.
    wait_for(lambda: all(h in r.blobs for r in reps.values()))
    c.stop()


def test_gc_grace_override_cannot_shorten_the_configured_grace(tmp_path):
    clock, pins = Clock(), Pins()
    c, reps = make(str(tmp_path), clock, live_set=pins, gc_grace_s=60.0)
    data = b"in flight"
    c.put(data, blob_hash(data))
    clock.t += 30
    assert c.gc(grace_s=1.0).deleted == 0
    assert c.gc(grace_s=120.0).deleted == 0
    clock.t += 31
    assert c.gc().deleted == 3
    c.stop()


def test_unreachable_replicas_are_unavailable_not_missing_and_keep_their_hint(tmp_path):
    c, reps = make(str(tmp_path))
    data = b"owed"
    h = blob_hash(data)
    reps["n3"].down = True
    c.put(data, h)  # n3 owed a copy
    for r in ("n1", "n2"):
        reps[r].down = True
    with pytest.raises(ReplicaUnavailable):
        c.get(h)
    reps["n3"].down = False
    c._down_until.clear()
    assert c.deliver_hints() == 0 and c.hints.count() == 1  # no source reachable: kept, not dropped
    for r in ("n1", "n2"):
        reps[r].down = False
    c._down_until.clear()
    assert c.deliver_hints() == 1 and h in reps["n3"].blobs
    c.stop()


def test_a_down_node_backlog_does_not_starve_hints_owed_to_others(tmp_path):
    c, reps = make(str(tmp_path))
    reps["n2"].down = True
    for i in range(300):  # 300 hints for n2 sort before n3's
        d = b"n2 owes %d" % i
        c.put(d, blob_hash(d))
    reps["n2"].down = False
    c._down_until.clear()
    reps["n3"].down = True
    d3 = b"n3 owes this"
    c.put(d3, blob_hash(d3))
    reps["n3"].down = False
    reps["n2"].down = True
    c._down_until.clear()
    c._mark_down("n2", 60)
    c.deliver_hints(limit=256)
    assert blob_hash(d3) in reps["n3"].blobs
    c.stop()


def test_hint_delivery_refreshes_the_age_of_a_copy_the_target_already_has(tmp_path):
    clock = Clock()
    c, reps = make(str(tmp_path), clock)
    data = b"old garbage put again"
    h = blob_hash(data)
    reps["n3"].blobs[h] = (data, clock.t - 10_000)  # an old copy from long ago
    reps["n3"].down = True
    c.put(data, h)
    reps["n3"].down = False
    c._down_until.clear()
    assert c.deliver_hints() == 1
    assert reps["n3"].blobs[h][1] == clock.t  # touched: young again, GC spares it
    c.stop()


def test_a_replica_marked_down_is_not_sent_to_and_is_owed_by_hint(tmp_path):
    c, reps = make(str(tmp_path))
    c._mark_down("n3", 60)
    before = reps["n3"].puts
    data = b"skip the down one"
    res = c.put(data, blob_hash(data))
    assert reps["n3"].puts == before and res.pending == ["n3"] and c.hints.count() == 1
    c.stop()


def test_a_second_gc_or_scrub_while_one_runs_is_refused_at_once(tmp_path):
    from objstore.api import BlobError

    c, reps = make(str(tmp_path), live_set=Pins())
    assert c._gc_lock.acquire()
    with pytest.raises(BlobError, match="already running"):
        c.gc()
    c._gc_lock.release()
    assert c._scrub_lock.acquire()
    with pytest.raises(BlobError, match="already running"):
        c.scrub()
    c._scrub_lock.release()
    c.stop()


# ---------------------------------------------------------------- put_many: one call per replica node


def make_batch(tmp: str, nodes: list[str] | None = None, me: str = "n1",
               **kw: object) -> tuple[BlobCluster, dict[str, MemBatchReplica]]:
    reps = {n: MemBatchReplica(n) for n in (nodes or NODES)}
    c = BlobCluster(me, dict(reps), HintLog(os.path.join(tmp, "hints")), **kw)  # type: ignore[arg-type]
    return c, reps


def blobs_of(n: int, tag: bytes = b"") -> list[tuple[bytes, bytes]]:
    datas = [tag + b"segment %d " % i + os.urandom(200) for i in range(n)]
    return [(d, blob_hash(d)) for d in datas]


def test_put_many_makes_one_call_per_replica_node_and_stores_every_blob(tmp_path):
    c, reps = make_batch(str(tmp_path))
    items = blobs_of(64)
    res = c.put_many(items)
    assert [r.hash for r in res] == [h for _d, h in items]
    assert all(len(r.stored_on) >= 2 and not r.existed for r in res)
    for r in reps.values():  # R = 3 of 3 nodes: every node gets all 64, in one call
        assert r.put_many_calls == [64] and r.puts == 0
    wait_for(lambda: all(len(r.blobs) == 64 for r in reps.values()))
    wait_for(lambda: c.hints.count() == 0)
    assert c.counters()["puts"] == 64
    assert all(r.existed for r in c.put_many(items))
    assert c.put_many([]) == []
    c.stop()


def test_put_many_places_each_blob_on_its_own_replicas(tmp_path):
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    c, reps = make_batch(str(tmp_path), nodes, late_ack_grace_s=1.0)
    items = blobs_of(100)
    res = c.put_many(items)
    for (_d, h), r in zip(items, res, strict=True):
        assert sorted(r.stored_on) == sorted(c.placement(h)) and r.pending == []
    for n, rep in reps.items():
        placed_here = {h for _d, h in items if n in c.placement(h)}
        assert set(rep.blobs) == placed_here
        assert rep.put_many_calls == [len(placed_here)]  # one call, carrying exactly its blobs
    c.stop()


def test_put_many_with_one_replica_down_succeeds_and_hints_complete_it(tmp_path):
    c, reps = make_batch(str(tmp_path))
    reps["n3"].down = True
    hint_writes: list[int] = []
    add_many = c.hints.add_many
    c.hints.add_many = lambda owed: (hint_writes.append(1), add_many(owed))  # type: ignore[method-assign]
    items = blobs_of(40)
    res = c.put_many(items)
    assert all(sorted(r.stored_on) == ["n1", "n2"] and r.pending == ["n3"] for r in res)
    assert c.hints.count() == 40 and hint_writes == [1]  # every owed copy, durable, in one synced write
    reps["n3"].down = False
    c._down_until.clear()
    assert c.deliver_hints() == 40
    assert all(h in reps["n3"].blobs for _d, h in items) and c.hints.count() == 0
    c.stop()


def test_put_many_with_two_replicas_down_fails_naming_a_blob(tmp_path):
    c, reps = make_batch(str(tmp_path))
    reps["n2"].down = reps["n3"].down = True
    items = blobs_of(10)
    with pytest.raises(NotEnoughReplicas) as e:
        c.put_many(items)
    assert "10 of 10 blobs" in str(e.value) and items[0][1].hex() in str(e.value)
    assert c.hints.count() == 0 and c.counters().get("puts", 0) == 0
    c.stop()


def test_put_many_refuses_a_bad_blob_before_sending_anything(tmp_path):
    c, reps = make_batch(str(tmp_path))
    items = blobs_of(5)
    items[3] = (items[3][0] + b"!", items[3][1])
    with pytest.raises(InvalidBlob):
        c.put_many(items)
    with pytest.raises(InvalidBlob):
        c.put_many([(b"x", b"short")])
    assert all(r.put_many_calls == [] and not r.blobs for r in reps.values())
    c.stop()


def test_put_many_skips_a_replica_marked_down_and_owes_it_by_hint(tmp_path):
    c, reps = make_batch(str(tmp_path))
    c._mark_down("n3", 60)
    res = c.put_many(blobs_of(8))
    assert reps["n3"].put_many_calls == [] and all(r.pending == ["n3"] for r in res)
    assert c.hints.count() == 8
    c.stop()


def test_put_many_slow_replica_does_not_hold_it_up_and_its_late_ack_clears_the_hints(tmp_path):
    c, reps = make_batch(str(tmp_path))
    reps["n3"].delay_s = 0.3
    items = blobs_of(16)
    res = c.put_many(items)  # n3 answers after 0.3 s, well past the grace: owed, not waited for
    assert all(sorted(r.stored_on) == ["n1", "n2"] and r.pending == ["n3"] for r in res)
    wait_for(lambda: c.hints.count() == 0 and all(h in reps["n3"].blobs for _d, h in items))
    c.stop()


def test_put_many_results_equal_one_put_per_blob(tmp_path):
    """The same replicas' states, the same blobs: put_many answers what put
    answers, blob by blob (placement, stored_on, pending, existed)."""
    items = blobs_of(30)
    outcomes = []
    for name, many in (("puts", False), ("many", True)):
        os.makedirs(tmp_path / name)
        c, reps = make_batch(str(tmp_path / name), late_ack_grace_s=1.0)
        for d, h in items[:10]:
            reps["n2"].blobs[h] = (d, time.time())  # some already stored on one replica
        reps["n3"].down = True
        res = c.put_many(items) if many else [c.put(d, h) for d, h in items]
        outcomes.append([(r.hash, sorted(r.stored_on), sorted(r.pending), r.existed) for r in res])
        outcomes.append(c.hints.count())
        c.stop()
    assert outcomes[0] == outcomes[2] and outcomes[1] == outcomes[3] == 30


def test_hint_add_many_counts_each_owed_copy_once(tmp_path):
    hints = HintLog(os.path.join(tmp_path, "hints"))
    h1, h2 = blob_hash(b"one"), blob_hash(b"two")
    hints.add_many([(h1, ["n2", "n3"]), (h1, ["n2"]), (h2, ["n3"])])
    assert hints.count() == 3
    hints.add(h1, ["n2"])
    assert hints.count() == 3 and sorted((t, h) for t, h, _c in hints.pending()) == sorted(
        [("n2", h1), ("n3", h1), ("n3", h2)])
    hints.close()


def test_put_many_over_replicas_without_it_puts_blob_by_blob(tmp_path):
    c, reps = make(str(tmp_path))  # plain MemReplicas: put and get only
    items = blobs_of(12)
    res = c.put_many(items)
    assert all(len(r.stored_on) >= 2 for r in res)
    wait_for(lambda: all(r.puts == 12 for r in reps.values()))
    c.stop()


# ---------------------------------------------------------------- ranged reads


def make_stores(tmp: str, **kw: object) -> tuple[BlobCluster, dict[str, LocalStore]]:
    stores = {n: LocalStore(os.path.join(tmp, n), n) for n in NODES}
    c = BlobCluster("n1", dict(stores), HintLog(os.path.join(tmp, "hints")), **kw)  # type: ignore[arg-type]
    return c, stores


def close_stores(c: BlobCluster, stores: dict[str, LocalStore]) -> None:
    c.stop()
    for s in stores.values():
        s.close()


class HashCount:
    """Counts SHA-256 computations by the coordinator and by the stores
    (both call objstore.api.blob_hash; the coordinator by its own import)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import objstore.api
        import objstore.cluster

        self.sizes: list[int] = []
        real = objstore.api.blob_hash

        def counted(data: bytes) -> bytes:
            self.sizes.append(len(data))
            return real(data)

        self.counted = counted
        monkeypatch.setattr(objstore.api, "blob_hash", counted)
        monkeypatch.setattr(objstore.cluster, "blob_hash", counted)


def flip_stored_byte(store: LocalStore, h: bytes, at: int) -> None:
    loc = store.locate(h)
    assert loc is not None
    with open(loc.path, "r+b") as f:
        f.seek(loc.offset + HEADER_BYTES + at)
        b = f.read(1)
        f.seek(loc.offset + HEADER_BYTES + at)
        f.write(bytes([b[0] ^ 0x40]))


def test_a_ranged_get_reads_only_the_range_and_hashes_nothing(tmp_path, monkeypatch):
    c, stores = make_stores(str(tmp_path), late_ack_grace_s=1.0)
    data = os.urandom(1 << 20)
    h = blob_hash(data)
    c.put(data, h)
    gets = {n: s.stats()["gets"] for n, s in stores.items()}
    hashes = HashCount(monkeypatch)
    assert c.get(h, 4096, 4096) == (data[4096:8192], 1 << 20, "n1")
    assert c.get(h, (1 << 20) - 10) == (data[-10:], 1 << 20, "n1")  # to the end
    assert c.get(h, 1 << 20) == (b"", 1 << 20, "n1")
    assert hashes.sizes == []  # checked by the record crc32c, never hashed
    assert {n: s.stats()["gets"] - gets[n] for n, s in stores.items()} == {"n1": 3, "n2": 0, "n3": 0}
    with pytest.raises(InvalidBlob):
        c.get(h, 4096, 1 << 20)  # beyond the end
    with pytest.raises(InvalidBlob):
        c.get(h, (1 << 20) + 1)
    # A "range" that is the whole blob is a whole read: hashed once, by the store that read it.
    assert c.get(h, 0, 1 << 20) == (data, 1 << 20, "n1") and hashes.sizes == [1 << 20]
    assert c.counters()["ranged_gets"] == 4
    close_stores(c, stores)


def test_a_whole_get_from_the_local_store_hashes_the_blob_once(tmp_path, monkeypatch):
    c, stores = make_stores(str(tmp_path), late_ack_grace_s=1.0)
    data = os.urandom(300_000)
    h = blob_hash(data)
    c.put(data, h)
    hashes = HashCount(monkeypatch)
    assert c.get(h) == (data, len(data), "n1")
    assert hashes.sizes == [len(data)]  # LocalStore.get checked it; the coordinator trusts that
    close_stores(c, stores)


def test_a_whole_get_from_a_replica_that_does_not_check_is_hashed_by_the_coordinator(tmp_path, monkeypatch):
    c, reps = make_batch(str(tmp_path), me="client")  # not a replica itself: every read is remote
    data = os.urandom(5000)
    h = blob_hash(data)
    c.put(data, h)
    hashes = HashCount(monkeypatch)
    assert c.get(h)[0] == data and hashes.sizes == [5000]
    c.stop()


@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_a_ranged_get_that_meets_a_bad_local_copy_falls_back_and_repairs_it(tmp_path, fault):
    c, stores = make_stores(str(tmp_path), late_ack_grace_s=1.0)
    data = os.urandom(200_000)
    h = blob_hash(data)
    c.put(data, h)
    if fault == "corrupt":
        flip_stored_byte(stores["n1"], h, 150_000)  # outside the range read: the record crc still catches it
    else:
        stores["n1"].delete(h)
    got, size, served_by = c.get(h, 100, 50)
    assert (got, size) == (data[100:150], len(data)) and served_by != "n1"
    # Read repair put a good copy back (and counted it, just after).
    wait_for(lambda: stores["n1"].verify(h).verified and c.counters().get("read_repairs", 0) == 1)
    counters = c.counters()
    assert counters["ranged_fallbacks"] == 1
    assert counters.get("corrupt_found", 0) == (1 if fault == "corrupt" else 0)
    assert c.get(h, 100, 50) == (data[100:150], len(data), "n1")
    close_stores(c, stores)


def test_a_ranged_get_of_an_unknown_blob_is_not_found(tmp_path):
    c, stores = make_stores(str(tmp_path))
    with pytest.raises(BlobNotFound):
        c.get(blob_hash(b"never"), 10, 10)
    close_stores(c, stores)


def test_a_ranged_get_with_every_replica_unreachable_is_unavailable(tmp_path):
    c, reps = make_batch(str(tmp_path))
    data = os.urandom(3000)
    h = blob_hash(data)
    c.put(data, h)
    for r in reps.values():
        r.down = True
    with pytest.raises(ReplicaUnavailable):
        c.get(h, 10, 10)
    reps["n3"].down = False  # one reachable copy is enough
    c._down_until.clear()
    assert c.get(h, 10, 10) == (data[10:20], 3000, "n3")
    c.stop()


def test_a_ranged_get_fails_over_and_is_hedged_like_a_whole_one(tmp_path):
    c, reps = make_batch(str(tmp_path), me="client", hedge_after_s=0.02)
    data = os.urandom(4000)
    h = blob_hash(data)
    c.put(data, h)
    wait_for(lambda: all(h in r.blobs for r in reps.values()))
    first, second = c.placement(h)[:2]
    reps[first].delay_s = 1.0
    t = time.monotonic()
    got, size, served_by = c.get(h, 1000, 100)
    assert (got, size) == (data[1000:1100], 4000) and served_by != first and time.monotonic() - t < 0.9
    assert c.counters()["hedged_reads"] >= 1
    reps[first].delay_s, reps[first].down = 0.0, True
    assert c.get(h, 0, 10)[2] != first  # failed over
    assert all(r.reads == [] for r in reps.values())  # never a whole-blob read
    c.stop()


def test_a_ranged_get_that_meets_a_corrupt_remote_copy_falls_back_and_repairs_it(tmp_path):
    c, reps = make_batch(str(tmp_path), me="client")
    data = os.urandom(4000)
    h = blob_hash(data)
    c.put(data, h)
    wait_for(lambda: all(h in r.blobs for r in reps.values()))
    first = c.placement(h)[0]
    reps[first].rotten.add(h)
    got, size, served_by = c.get(h, 5, 5)
    assert (got, size) == (data[5:10], 4000) and served_by != first
    wait_for(lambda: h in reps[first].blobs)  # repaired by the whole-blob path
    assert c.counters()["ranged_fallbacks"] == 1 and c.counters()["corrupt_found"] == 1
    c.stop()


def test_a_volume_flush_through_cluster_blobs_hashes_each_blob_once(tmp_path, monkeypatch):
    # blockdev.tiers.ClusterBlobs hashes the flush's blobs to name them and passes
    # hashed=True: neither the coordinator nor the local store hashes them again.
    import blockdev.tiers

    c, stores = make_stores(str(tmp_path), late_ack_grace_s=1.0)
    hashes = HashCount(monkeypatch)
    monkeypatch.setattr(blockdev.tiers, "blob_hash", hashes.counted)
    datas = [os.urandom(3000 + i) for i in range(5)]
    got = blockdev.tiers.ClusterBlobs(c).put_many(datas)
    assert got == [blob_hash(d) for d in datas]
    # Three times each: by ClusterBlobs, and by the two peer stores that received the bytes
    # (in-process here, on other nodes in a cluster); not by the coordinator or the local store.
    assert sorted(hashes.sizes) == sorted(len(d) for d in datas * 3)
    for d, h in zip(datas, got, strict=True):
        for s in stores.values():
            assert s.get(h) == d
    # Without the flag the coordinator checks what it is given.
    hashes.sizes.clear()
    c.put_many([(datas[0], got[0])])
    assert hashes.sizes == [len(datas[0])] * 3  # the coordinator, then the two peers
    close_stores(c, stores)


def test_the_local_copy_is_read_in_the_callers_thread_and_a_bad_one_still_fails_over(tmp_path, monkeypatch):
    c, stores = make_stores(str(tmp_path), late_ack_grace_s=1.0)
    data = os.urandom(100_000)
    h = blob_hash(data)
    c.put(data, h)
    threads: list[int] = []
    real = LocalStore.get_range

    def traced(self: LocalStore, *a: object, **kw: object) -> tuple[bytes, int]:
        threads.append(threading.get_ident())
        return real(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalStore, "get_range", traced)
    assert c.get(h, 10, 4096)[0] == data[10:4106]
    assert threads == [threading.get_ident()]  # no pool hand-off for the local copy
    stores["n1"].delete(h)
    threads.clear()
    # Missing locally: the whole-blob path finds another copy and repairs this one.
    assert c.get(h, 10, 4096)[0] == data[10:4106]
    deadline = time.monotonic() + 5
    while stores["n1"].info(h) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stores["n1"].get(h) == data
    close_stores(c, stores)


def test_put_many_compresses_once_and_every_replica_keeps_the_same_frame(tmp_path, monkeypatch):
    import objstore.pack as pack

    c, stores = make_stores(str(tmp_path), late_ack_grace_s=1.0)
    datas = [b"".join(b"sector %d of segment %d\n" % (i, k) for i in range(20_000)) for k in range(4)]
    items = [(d, blob_hash(d)) for d in datas]
    calls: list[int] = []
    real = pack.encode_blob

    def counted(data: bytes, h: bytes) -> tuple[pack.RecordHeader, bytes]:
        calls.append(len(data))
        return real(data, h)

    monkeypatch.setattr(pack, "encode_blob", counted)
    c.put_many(items)
    assert sorted(calls) == sorted(len(d) for d in datas)  # once per blob, not once per replica
    for d, h in items:
        frames = set()
        for s in stores.values():
            info = s.info(h)
            assert info is not None and info.compression == "zstd"
            assert s.get(h) == d and s.verify(h).verified
            loc = s.locate(h)
            assert loc is not None
            with open(loc.path, "rb") as f:
                f.seek(loc.offset)
                frames.add(f.read(loc.record_len))
        assert len(frames) == 1  # the same record bytes on every replica
    close_stores(c, stores)
