"""LocalStore (objstore/pack.py): record format, group commit, dedup, compression,
verification and quarantine, recovery after torn writes and simulated power loss,
compaction under concurrent I/O, bounded memory, and a model-based random test."""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import os
import random
import shutil
import struct
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kv import durable
from objstore import api
from objstore.api import BlobCorrupt, BlobNotFound, InvalidBlob
from objstore.pack import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    HEADER_BYTES,
    MAGIC,
    LocalStore,
    RecordHeader,
    StoreFailed,
    decode_header,
    encode_blob,
)

SEED = int(os.environ.get("FLOE_TEST_SEED", "20240611"))


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def blob(data: bytes) -> tuple[bytes, bytes]:
    return data, hashlib.sha256(data).digest()


def rand_bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


@pytest.fixture
def rng() -> random.Random:
    print(f"seed={SEED} (set FLOE_TEST_SEED to replay)")
    return random.Random(SEED)


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(durable.SIM_ENV, "1")


def packs(d: str) -> list[str]:
    return sorted(glob.glob(os.path.join(d, "packs", "pack-*.dat")))


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# --- record format -------------------------------------------------------------------


def test_header_layout_is_the_documented_one():
    h = bytes(range(32))
    hdr = RecordHeader(COMPRESSION_ZSTD, h, 5000, 23, 0xDEADBEEF)
    raw = hdr.encode()
    assert len(raw) == HEADER_BYTES == 64
    assert raw[0:4] == MAGIC == b"FLPK"
    assert raw[4] == 1 and raw[5] == COMPRESSION_ZSTD and raw[6:8] == b"\0\0"
    assert raw[8:40] == h
    assert struct.unpack_from("<QQII", raw, 40)[:3] == (5000, 23, 0xDEADBEEF)
    import crc32c

    assert struct.unpack_from("<I", raw, 60)[0] == crc32c.crc32c(raw[:60])
    assert decode_header(raw) == hdr


def test_every_single_byte_flip_or_cut_of_a_header_is_detected():
    hdr, _ = encode_blob(b"x" * 1000, hashlib.sha256(b"x" * 1000).digest())
    raw = hdr.encode()
    for i in range(HEADER_BYTES):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        assert decode_header(bytes(bad)) is None, i
    for n in range(HEADER_BYTES):
        assert decode_header(raw[:n]) is None


def test_inconsistent_headers_are_refused_before_writing():
    h = bytes(32)
    with pytest.raises(RuntimeError):
        RecordHeader(COMPRESSION_NONE, h, 10, 9, 0).encode()  # raw but lengths differ
    with pytest.raises(RuntimeError):
        RecordHeader(COMPRESSION_ZSTD, h, 10, 11, 0).encode()  # "compressed" but bigger
    with pytest.raises(RuntimeError):
        RecordHeader(7, h, 10, 10, 0).encode()


# --- the basic API ------------------------------------------------------------------


def test_put_get_ranges_has_info(tmp_path, rng):
    with LocalStore(str(tmp_path)) as s:
        a, ha = blob(rand_bytes(rng, 3000))
        b, hb = blob(b"")
        c, hc = blob(b"compress me " * 500)
        assert s.put(a, ha) is False
        assert s.put(b, hb) is False
        assert s.put(c, hc) is False
        assert s.get(ha) == a and s.get(hb) == b"" and s.get(hc) == c
        assert s.get(ha, 100, 50) == a[100:150]
        assert s.get(hc, 7, 100) == c[7:107]  # range of a compressed blob
        assert s.get(ha, 2990, 100) == a[2990:]  # cut short at the end
        assert s.get(ha, 3000) == b""
        assert s.get(ha, 1000) == a[1000:]
        with pytest.raises(InvalidBlob):
            s.get(ha, 3001)
        with pytest.raises(InvalidBlob):
            s.get(ha, -1)
        size, it = s.read_iter(ha, 10, 2000, chunk=256)
        pieces = list(it)
        assert size == 3000 and b"".join(pieces) == a[10:2010] and max(map(len, pieces)) == 256
        assert s.has([ha, hb, hc, bytes(32)]) == [True, True, True, False]
        info = s.info(hc)
        assert info is not None and info.size == len(c) and info.compression == "zstd"
        assert s.info(bytes(32)) is None
        with pytest.raises(BlobNotFound):
            s.get(bytes(32))
        assert s.verify(ha).verified and not s.verify(bytes(32)).present
        required = "blobs bytes stored_bytes pack_bytes packs dead_bytes puts dedup_hits gets corrupt_found"
        assert set(required.split()) | {"compactions", "torn_tails_cut", "syncs"} <= set(s.stats())
        st_ = s.stats()
        assert st_["blobs"] == 3 and st_["bytes"] == 3000 + len(c) and st_["puts"] == 3


def test_put_refuses_bad_input(tmp_path):
    with LocalStore(str(tmp_path)) as s:
        data, h = blob(b"abc")
        with pytest.raises(InvalidBlob):
            s.put(data, hashlib.sha256(b"abd").digest())  # data does not match its hash
        with pytest.raises(InvalidBlob):
            s.put(data, h[:31])
        big = bytes(api.BLOB_BYTES_MAX + 1)
        with pytest.raises(InvalidBlob):
            s.put(big, bytes(32))
        with pytest.raises(InvalidBlob):
            s.put_file(io.BytesIO(b""), h, api.BLOB_BYTES_MAX + 1)
        with pytest.raises(InvalidBlob):
            s.put_file(io.BytesIO(b"ab"), h, 3)  # short file
        with pytest.raises(InvalidBlob):
            s.put_file(io.BytesIO(b"abcd"), h, 3)  # longer than declared
        with pytest.raises(InvalidBlob):
            s.has([bytes(32)] * (api.HAS_BATCH_MAX + 1))
        assert s.stats()["blobs"] == 0
        assert s.put_file(io.BytesIO(b"abc"), h, 3) is False and s.get(h) == b"abc"


def test_list_pages_in_hash_order(tmp_path):
    clock = FakeClock()
    with LocalStore(str(tmp_path), clock=clock) as s:
        hashes = []
        for i in range(25):
            data, h = blob(b"blob %d" % i)
            s.put(data, h)
            hashes.append(h)
        clock.advance(5.0)
        hashes.sort()
        page1 = s.list(limit=10)
        assert [i.hash for i in page1] == hashes[:10]
        page2 = s.list(after=page1[-1].hash, limit=10)
        assert [i.hash for i in page2] == hashes[10:20]
        assert [i.hash for i in s.list(after=page2[-1].hash, limit=10)] == hashes[20:]
        assert [i.hash for i in api.iter_all(s, page=7)] == hashes
        assert s.list(limit=0) == [] and len(s.list(limit=10**9)) == 25  # limit capped, not refused
        assert all(i.age_s == pytest.approx(5.0) for i in page1)
        assert s.list(after=hashes[-1]) == []


def test_delete_only_when_old_enough_and_touch_resets_age(tmp_path):
    clock = FakeClock()
    with LocalStore(str(tmp_path), clock=clock) as s:
        data, h = blob(b"garbage soon")
        s.put(data, h)
        clock.advance(30)
        assert s.delete(h, min_age_s=60) is False
        clock.advance(31)
        assert s.touch(h) is True  # age back to 0
        clock.advance(59)
        assert s.delete(h, min_age_s=60) is False
        clock.advance(2)
        assert s.delete(h, min_age_s=60) is True
        assert s.has([h]) == [False] and s.delete(h) is False and s.touch(h) is False
        with pytest.raises(BlobNotFound):
            s.get(h)
        st_ = s.stats()
        assert st_["blobs"] == 0 and st_["dead_bytes"] == st_["pack_bytes"] > 0
        d2, h2 = blob(b"no age condition")
        s.put(d2, h2)
        assert s.delete(h2) is True  # min_age_s 0: unconditional


def test_dedup_writes_nothing_and_resets_age(tmp_path, rng):
    clock = FakeClock()
    with LocalStore(str(tmp_path), clock=clock) as s:
        data, h = blob(rand_bytes(rng, 10_000))
        assert s.put(data, h) is False
        before = s.stats()
        clock.advance(100)
        assert s.put(data, h) is True
        assert s.put_file(io.BytesIO(data), h, len(data)) is True
        after = s.stats()
        assert after["pack_bytes"] == before["pack_bytes"] and after["blobs"] == 1
        assert after["dedup_hits"] == 2 and after["syncs"] == before["syncs"]  # no pack fsync for a dedup
        info = s.info(h)
        assert info is not None and info.age_s == 0.0


def test_zstd_is_kept_only_when_it_saves_ten_percent(tmp_path, rng):
    with LocalStore(str(tmp_path)) as s:
        cases = {
            "text": (b"the quick brown fox jumps over the lazy dog. " * 300, "zstd"),
            "random": (rand_bytes(rng, 20_000), "none"),
            "half zeros": (rand_bytes(rng, 10_000) + bytes(10_000), "zstd"),  # saves ~50%
            "5% zeros": (rand_bytes(rng, 19_000) + bytes(1_000), "none"),  # saves ~5%
            "empty": (b"", "none"),
            # Large blobs are sampled first (64 KiB from the middle):
            "1 MiB random": (rand_bytes(rng, 1 << 20), "none"),
            "1 MiB text": (b"segment of a volume, mostly text. " * 31_000, "zstd"),
            "1 MiB, random middle only": (bytes(400_000) + rand_bytes(rng, 248_576) + bytes(400_000), "none"),
        }
        for name, (data, want) in cases.items():
            d, h = blob(data)
            s.put(d, h)
            info = s.info(h)
            assert info is not None and info.compression == want, name
            if want == "zstd":
                assert 10 * (info.size - info.stored_size) >= info.size, name
            else:
                assert info.stored_size == info.size, name
            assert s.get(h) == data and s.verify(h).verified, name


# --- group commit ---------------------------------------------------------------------


def test_group_commit_many_concurrent_puts_share_fsyncs(tmp_path, rng, monkeypatch):
    # A real disk's fsync takes about a millisecond or more; model it so the
    # test does not depend on how fast this machine's disk is.
    real_sync = durable.sync_file

    def slow_sync(path: str, fd: int, dirty_from: int = 0, dirty_to: int | None = None) -> None:
        time.sleep(0.005)
        real_sync(path, fd, dirty_from, dirty_to)

    monkeypatch.setattr(durable, "sync_file", slow_sync)
    with LocalStore(str(tmp_path)) as s:
        blobs = [blob(rand_bytes(rng, 4096)) for _ in range(64)]
        syncs_before = s.syncs
        start = threading.Barrier(64)
        results: list[bool | BaseException] = [False] * 64

        def worker(i: int) -> None:
            start.wait()
            try:
                results[i] = s.put(*blobs[i])
            except BaseException as exc:  # pragma: no cover - reported below
                results[i] = exc

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [False] * 64
        syncs = s.syncs - syncs_before
        print(f"64 concurrent puts took {syncs} pack fsyncs in {s.stats()['batches']} batches")
        assert 1 <= syncs <= 16
        assert all(s.get(h) == d for d, h in blobs)


def test_put_many_of_64_blobs_is_one_group_commit(tmp_path, rng, monkeypatch):
    real_sync = durable.sync_file

    def slow_sync(path: str, fd: int, dirty_from: int = 0, dirty_to: int | None = None) -> None:
        time.sleep(0.005)  # a real disk's fsync, as above
        real_sync(path, fd, dirty_from, dirty_to)

    monkeypatch.setattr(durable, "sync_file", slow_sync)
    with LocalStore(str(tmp_path)) as s:
        blobs = [blob(rand_bytes(rng, 4096)) for _ in range(63)] + [blob(b"compressible " * 400)]
        before = s.stats()
        assert s.put_many(blobs) == [False] * 64
        after = s.stats()
        syncs, index_syncs = after["syncs"] - before["syncs"], after["index_syncs"] - before["index_syncs"]
        print(f"put_many of 64 blobs: {syncs} pack fsyncs, {index_syncs} index syncs")
        assert 1 <= syncs <= 2 and 1 <= index_syncs <= 2 and after["batches"] - before["batches"] <= 2
        assert after["puts"] - before["puts"] == 64 and after["blobs"] == 64
        assert all(s.get(h) == d for d, h in blobs)
        info = s.info(blobs[-1][1])
        assert info is not None and info.compression == "zstd"  # decided per blob, as put does
        assert s.put_many([]) == []


def test_put_many_reports_dedup_per_blob_and_resets_ages(tmp_path, rng):
    clock = FakeClock()
    with LocalStore(str(tmp_path), clock=clock) as s:
        old = [blob(rand_bytes(rng, 1000)) for _ in range(3)]
        new = [blob(rand_bytes(rng, 1000)) for _ in range(2)]
        s.put_many(old)
        clock.advance(100)
        pack_before = s.stats()["pack_bytes"]
        # An item repeated within the call is a dedup of the earlier one, as two puts in a row would be.
        assert s.put_many([*old, *new, new[0]]) == [True, True, True, False, False, True]
        st_ = s.stats()
        assert st_["blobs"] == 5 and st_["pack_bytes"] == pack_before + 2 * (HEADER_BYTES + 1000)
        assert all(s.info(h).age_s == 0.0 for _d, h in old)  # type: ignore[union-attr]


def test_put_many_with_one_bad_item_stores_nothing(tmp_path, rng):
    with LocalStore(str(tmp_path)) as s:
        good = [blob(rand_bytes(rng, 500)) for _ in range(4)]
        for bad in ((b"abc", hashlib.sha256(b"abd").digest()), (b"abc", bytes(31))):
            with pytest.raises(InvalidBlob):
                s.put_many([*good[:2], bad, *good[2:]])
        assert s.stats()["blobs"] == 0 and s.stats()["puts"] == 0
        assert s.put_many(good) == [False] * 4


def test_put_many_verified_skips_the_hash_and_huge_inputs_take_several_batches(tmp_path, rng, monkeypatch):
    from objstore.pack import BATCH_REQUESTS_MAX

    with LocalStore(str(tmp_path)) as s:
        n = BATCH_REQUESTS_MAX + 200
        blobs = [blob(rand_bytes(rng, 64) + i.to_bytes(4, "little")) for i in range(n)]
        hashed: list[int] = []
        real = api.blob_hash
        monkeypatch.setattr(api, "blob_hash", lambda d: hashed.append(len(d)) or real(d))
        before = s.stats()
        assert s.put_many(blobs, verified=True) == [False] * n
        assert hashed == []  # the caller checked; the store does not hash again
        monkeypatch.setattr(api, "blob_hash", real)
        after = s.stats()
        assert 2 <= after["batches"] - before["batches"] <= 4 and after["blobs"] == n
        assert all(s.get(h) == d for d, h in blobs[:: n // 16])


def test_get_range_returns_the_range_and_the_whole_size_without_hashing(tmp_path, rng, monkeypatch):
    with LocalStore(str(tmp_path)) as s:
        raw, hr = blob(rand_bytes(rng, 100_000))
        z, hz = blob(b"a volume segment " * 6000)
        s.put_many([(raw, hr), (z, hz)])
        hashed: list[int] = []
        real = api.blob_hash
        monkeypatch.setattr(api, "blob_hash", lambda d: hashed.append(len(d)) or real(d))
        assert s.get_range(hr, 4096, 4096) == (raw[4096:8192], len(raw))
        assert s.get_range(hz, 10, 5) == (z[10:15], len(z))
        assert s.get_range(hr, len(raw)) == (b"", len(raw))
        assert hashed == []  # a range is checked by the record's crc32c alone
        assert s.get_range(hr) == (raw, len(raw)) and hashed == [len(raw)]  # the whole blob: SHA-256 too
        loc = s.locate(hr)
        assert loc is not None
        flip(loc.path, loc.offset + HEADER_BYTES + 50_000)
        with pytest.raises(BlobCorrupt):
            s.get_range(hr, 0, 10)  # the crc covers the whole record, not just the range
        with pytest.raises(BlobNotFound):
            s.get_range(hr, 0, 10)


def test_concurrent_puts_of_the_same_content_store_one_copy(tmp_path, rng):
    with LocalStore(str(tmp_path)) as s:
        data, h = blob(rand_bytes(rng, 5000))
        out: list[bool] = []
        threads = [threading.Thread(target=lambda: out.append(s.put(data, h))) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(out) == [False] + [True] * 15
        st_ = s.stats()
        assert st_["blobs"] == 1 and st_["pack_bytes"] == HEADER_BYTES + 5000


# --- verification and quarantine -------------------------------------------------------


def test_flipped_stored_byte_is_caught_quarantined_and_never_served(tmp_path, rng):
    with LocalStore(str(tmp_path)) as s:
        blobs = [blob(rand_bytes(rng, 2000)) for _ in range(4)] + [blob(b"zz" * 4000)]
        for d, h in blobs:
            s.put(d, h)
        (a, ha), (b, hb), (c, hc), (e, he), (z, hz) = blobs
        for h in (hb, hc, hz):
            loc = s.locate(h)
            assert loc is not None
            flip(loc.path, loc.offset + HEADER_BYTES + 7)
        with pytest.raises(BlobCorrupt):
            s.get(hb, 0, 10)  # even a range read checks the whole record's crc
        assert s.has([hb]) == [False]
        with pytest.raises(BlobNotFound):
            s.get(hb)
        v = s.verify(hc)
        assert v.present and not v.verified and "crc" in v.error
        assert s.has([hc]) == [False]
        with pytest.raises(BlobCorrupt):
            s.read_iter(hz)  # compressed copy
        assert s.get(ha) == a and s.get(he) == e and s.verify(ha).verified
        st_ = s.stats()
        assert st_["corrupt_found"] == 3 and st_["blobs"] == 2
        # A fresh copy can be written again (dedup ignores the quarantined one).
        assert s.put(b, hb) is False and s.get(hb) == b


def test_header_that_does_not_match_the_index_is_corrupt(tmp_path):
    d = str(tmp_path)
    with LocalStore(d) as s:
        blobs = [blob(b"record %d " % i * 50) for i in range(3)]
        for x, h in blobs:
            s.put(x, h)
        loc = s.locate(blobs[1][1])
        assert loc is not None
        flip(loc.path, loc.offset + 42)  # inside the size field
        with pytest.raises(BlobCorrupt):
            s.get(blobs[1][1])
        assert s.get(blobs[0][1]) == blobs[0][0] and s.get(blobs[2][1]) == blobs[2][0]


def test_large_corrupt_blob_is_caught_before_any_byte_is_streamed(tmp_path, rng):
    with LocalStore(str(tmp_path)) as s:
        data, h = blob(rand_bytes(rng, 5 << 20))
        s.put_file(io.BytesIO(data), h, len(data))
        loc = s.locate(h)
        assert loc is not None
        flip(loc.path, loc.offset + loc.record_len - 1)  # the very last byte
        with pytest.raises(BlobCorrupt):
            s.read_iter(h, 0, 100)
        assert s.has([h]) == [False]


# --- recovery --------------------------------------------------------------------------


@pytest.mark.parametrize("index_fate", ["removed", "as_power_loss_left_it"])
def test_power_loss_keeps_acknowledged_puts_and_cuts_the_torn_tail(tmp_path, rng, sim, monkeypatch, index_fate):
    d = str(tmp_path / "node")
    s = LocalStore(d, pack_max_bytes=16 << 10)
    acked = dict((h, x) for x, h in (blob(rand_bytes(rng, rng.randrange(500, 3000))) for _ in range(30)))
    for h, x in acked.items():
        s.put(x, h)
    # The next put's record reaches the pack but power fails before its fsync.
    real_sync = durable.sync_file

    def power_cut(path: str, fd: int, dirty_from: int = 0, dirty_to: int | None = None) -> None:
        raise OSError("simulated power cut before fsync")

    monkeypatch.setattr(durable, "sync_file", power_cut)
    lost, h_lost = blob(b"never acknowledged " * 10)
    with pytest.raises(StoreFailed):
        s.put(lost, h_lost)
    with pytest.raises(StoreFailed):
        s.put(*blob(b"after the failure"))  # the writer stopped
    first = next(iter(acked))
    assert s.get(first) == acked[first]  # reads keep working
    monkeypatch.setattr(durable, "sync_file", real_sync)
    s.close()

    report = durable.power_loss(d)
    print("power_loss:", report)
    # A later write that partly reached the platter: half a record at the end.
    last = packs(d)[-1]
    synced_size = os.path.getsize(last)
    torn, h_torn = blob(rand_bytes(rng, 3000))
    hdr, stored = encode_blob(torn, h_torn)
    with open(last, "ab") as f:
        f.write(hdr.encode() + stored[:1000])
    if index_fate == "removed":
        shutil.rmtree(os.path.join(d, "index"))

    s = LocalStore(d, pack_max_bytes=16 << 10)
    st_ = s.stats()
    assert st_["torn_tails_cut"] == 1 and st_["rebuilds"] == 1
    assert os.path.getsize(last) == synced_size
    assert st_["blobs"] == len(acked)
    for h, x in acked.items():
        assert s.get(h) == x and s.verify(h).verified
    assert s.has([h_lost, h_torn]) == [False, False]
    assert all(i.age_s < 5 for i in s.list())  # rebuilt entries are young: safe from GC
    more, h_more = blob(b"life goes on")
    s.put(more, h_more)
    s.close()
    s = LocalStore(d, pack_max_bytes=16 << 10)
    assert s.stats()["torn_tails_cut"] == 0 and s.get(h_more) == more and s.stats()["rebuilds"] == 0
    s.close()


@pytest.mark.parametrize("where", ["header", "stored bytes"])
def test_corrupt_record_mid_pack_is_skipped_when_the_index_is_rebuilt(tmp_path, rng, where):
    d = str(tmp_path)
    with LocalStore(d) as s:
        blobs = [blob(rand_bytes(rng, 1500)) for _ in range(5)]
        for x, h in blobs:
            s.put(x, h)
        loc = s.locate(blobs[2][1])
        assert loc is not None and loc.pack_id == 1
    flip(loc.path, loc.offset + (20 if where == "header" else HEADER_BYTES + 100))
    shutil.rmtree(os.path.join(d, "index"))
    with LocalStore(d) as s:
        st_ = s.stats()
        assert st_["corrupt_found"] == 1 and st_["torn_tails_cut"] == 0
        assert st_["blobs"] == 4 and st_["dead_bytes"] == loc.record_len
        assert s.has([blobs[2][1]]) == [False]
        for i in (0, 1, 3, 4):
            assert s.get(blobs[i][1]) == blobs[i][0]


def test_corrupt_header_mid_pack_with_the_index_intact_is_caught_at_read(tmp_path, rng):
    d = str(tmp_path)
    with LocalStore(d) as s:
        blobs = [blob(rand_bytes(rng, 1500)) for _ in range(3)]
        for x, h in blobs:
            s.put(x, h)
        loc = s.locate(blobs[1][1])
        assert loc is not None
    flip(loc.path, loc.offset + 3)  # the magic
    with LocalStore(d) as s:
        with pytest.raises(BlobCorrupt):
            s.get(blobs[1][1])
        assert s.get(blobs[0][1]) == blobs[0][0] and s.get(blobs[2][1]) == blobs[2][0]


def test_bad_last_record_is_a_torn_tail_and_is_cut(tmp_path, rng):
    d = str(tmp_path)
    with LocalStore(d) as s:
        blobs = [blob(rand_bytes(rng, 1500)) for _ in range(3)]
        for x, h in blobs:
            s.put(x, h)
        loc = s.locate(blobs[2][1])
        assert loc is not None
    flip(loc.path, loc.offset + loc.record_len - 1)  # crc fails at the very end
    shutil.rmtree(os.path.join(d, "index"))
    with LocalStore(d) as s:
        assert s.stats()["torn_tails_cut"] == 1 and os.path.getsize(loc.path) == loc.offset
        assert s.has([h for _, h in blobs]) == [True, True, False]


def test_records_after_the_checkpoint_are_indexed_at_open(tmp_path, rng):
    # A crash after the pack fsync but before the index batch: the records are
    # durable, no entry names them. Recovery indexes them (young), and a second
    # copy of an indexed blob is only dead bytes.
    d = str(tmp_path)
    clock = FakeClock()
    with LocalStore(d, clock=clock) as s:
        old, h_old = blob(rand_bytes(rng, 1000))
        s.put(old, h_old)
    clock.advance(500)
    new, h_new = blob(rand_bytes(rng, 1000))
    with open(packs(d)[-1], "ab") as f:
        for x, h in ((new, h_new), (old, h_old)):
            hdr, stored = encode_blob(x, h)
            f.write(hdr.encode() + stored)
    with LocalStore(d, clock=clock) as s:
        assert s.get(h_new) == new and s.get(h_old) == old
        st_ = s.stats()
        assert st_["blobs"] == 2 and st_["dead_bytes"] == HEADER_BYTES + 1000 and st_["rebuilds"] == 0
        i_new, i_old = s.info(h_new), s.info(h_old)
        assert i_new is not None and i_new.age_s == 0.0
        assert i_old is not None and i_old.age_s == 500.0  # touched time kept across a clean reopen


def test_index_entries_past_a_packs_end_are_dropped(tmp_path, rng):
    d = str(tmp_path)
    with LocalStore(d) as s:
        blobs = [blob(rand_bytes(rng, 1000)) for _ in range(3)]
        for x, h in blobs:
            s.put(x, h)
        loc = s.locate(blobs[2][1])
        assert loc is not None
    with open(loc.path, "r+b") as f:
        f.truncate(loc.offset + 10)  # the pack lost its last record (disk lied about fsync)
    with LocalStore(d) as s:
        assert s.has([h for _, h in blobs]) == [True, True, False]
        assert s.stats()["blobs"] == 2 and os.path.getsize(loc.path) == loc.offset


def test_lost_index_is_rebuilt_from_every_pack(tmp_path, rng):
    d = str(tmp_path)
    clock = FakeClock()
    with LocalStore(d, pack_max_bytes=8 << 10, clock=clock) as s:
        blobs = dict((h, x) for x, h in (blob(rand_bytes(rng, 1500)) for _ in range(20)))
        for h, x in blobs.items():
            s.put(x, h)
        gone = next(iter(blobs))
        s.delete(gone)
        before = s.stats()
        assert before["packs"] >= 3
    clock.advance(10_000)
    shutil.rmtree(os.path.join(d, "index"))
    with LocalStore(d, pack_max_bytes=8 << 10, clock=clock) as s:
        st_ = s.stats()
        assert st_["rebuilds"] == 1 and st_["packs"] == before["packs"]
        # The deleted blob's record was still in its pack: it comes back as
        # (young) garbage, which is safe; GC deletes it again.
        assert st_["blobs"] == 20 and st_["dead_bytes"] == 0
        for h, x in blobs.items():
            assert s.get(h) == x
        assert all(i.age_s == 0.0 for i in s.list())


# --- compaction -------------------------------------------------------------------------


def test_compaction_reclaims_space_while_reads_and_puts_go_on(tmp_path, rng):
    d = str(tmp_path)
    s = LocalStore(d, pack_max_bytes=32 << 10)
    blobs = dict((h, x) for x, h in (blob(rand_bytes(rng, rng.randrange(1000, 2000))) for _ in range(150)))
    for h, x in blobs.items():
        s.put(x, h)
    hashes = list(blobs)
    dead = [h for i, h in enumerate(hashes) if i % 3 != 0]
    live = [h for i, h in enumerate(hashes) if i % 3 == 0]
    for h in dead:
        assert s.delete(h)
    before = s.stats()
    stop = threading.Event()
    errors: list[BaseException] = []
    written: dict[bytes, bytes] = {}
    wrng = random.Random(SEED + 1)

    def reader() -> None:
        while not stop.is_set():
            for h in live:
                try:
                    if s.get(h) != blobs[h]:
                        errors.append(AssertionError("wrong bytes"))
                except BaseException as exc:
                    errors.append(exc)

    def writer() -> None:
        while not stop.is_set():
            x, h = blob(rand_bytes(wrng, 1500))
            try:
                s.put(x, h)
                written[h] = x
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=reader), threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    try:
        n = s.compact(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    after = s.stats()
    print(f"compacted {n} packs: pack bytes {before['pack_bytes']} -> {after['pack_bytes']}, {after['moves']} moves")
    assert n >= 3 and after["compactions"] == n
    assert after["dead_bytes"] < before["dead_bytes"] // 3
    assert after["pack_bytes"] - sum(HEADER_BYTES + len(x) for x in written.values()) < before["pack_bytes"] // 2
    for h in live:
        assert s.get(h) == blobs[h] and s.verify(h).verified
    for h, x in written.items():
        assert s.get(h) == x
    assert not any(s.has(dead))
    s.close()
    with LocalStore(d, pack_max_bytes=32 << 10) as s2:
        st2 = s2.stats()
        for k in ("blobs", "bytes", "stored_bytes", "pack_bytes", "dead_bytes", "packs"):
            assert st2[k] == after[k], k
        for h in live:
            assert s2.get(h) == blobs[h]


def test_compaction_racing_deletes_and_re_puts_moves_nothing_deleted(tmp_path, rng):
    d = str(tmp_path)
    with LocalStore(d, pack_max_bytes=16 << 10) as s:
        blobs = dict((h, x) for x, h in (blob(rand_bytes(rng, 1200)) for _ in range(120)))
        for h, x in blobs.items():
            s.put(x, h)
        hashes = list(blobs)
        for h in hashes[::2]:
            s.delete(h)
        rest = hashes[1::2]
        deleted: list[bytes] = []

        def churn() -> None:
            for i, h in enumerate(rest):
                if i % 2 == 0:
                    if s.delete(h):
                        deleted.append(h)
                else:
                    s.put(blobs[h], h)  # a dedup touch of whichever copy is indexed

        t = threading.Thread(target=churn)
        t.start()
        s.compact(0.3)
        t.join()
        s.compact(0.3)
        assert deleted and not any(s.has(deleted))
        for h in rest:
            if h not in deleted:
                assert s.get(h) == blobs[h]
        before = s.stats()
    with LocalStore(d, pack_max_bytes=16 << 10) as s:
        after = s.stats()
        for k in ("blobs", "bytes", "pack_bytes", "dead_bytes"):
            assert after[k] == before[k], k


def test_blob_deleted_or_re_put_between_compaction_scan_and_move(tmp_path, rng, monkeypatch):
    # Deterministic version of the race: the deletes and dedup puts land after
    # compaction picked the records to move and before the writer moves them.
    clock = FakeClock()
    s = LocalStore(str(tmp_path), pack_max_bytes=8 << 10, clock=clock)
    blobs = dict((h, x) for x, h in (blob(rand_bytes(rng, 1000)) for _ in range(24)))
    for h, x in blobs.items():
        s.put(x, h)
    hashes = list(blobs)
    for h in hashes[::2]:
        s.delete(h)
    deleted: list[bytes] = []
    re_put: list[bytes] = []
    real_submit = s._submit

    touched_at: dict[bytes, float] = {}

    def submit(reqs: list) -> None:
        if reqs and reqs[0].move_from is not None:
            clock.advance(100)
            for i, r in enumerate(reqs):
                touched_at[r.h] = clock.t
                if i % 2 == 0:
                    assert s.delete(r.h)
                    deleted.append(r.h)
                else:
                    assert s.put(blobs[r.h], r.h) is True
                    re_put.append(r.h)
        real_submit(reqs)

    monkeypatch.setattr(s, "_submit", submit)
    assert s.compact(0.4) >= 1
    assert deleted and re_put
    assert not any(s.has(deleted))  # a deleted blob is not brought back by its move
    for h in re_put:
        info = s.info(h)
        # The touch survived the move (the moved entry is not the stale one compaction saw).
        assert s.get(h) == blobs[h] and info is not None and info.age_s == clock.t - touched_at[h] < 1000
    s.close()


def test_compaction_does_not_carry_a_corrupt_copy_forward(tmp_path, rng):
    with LocalStore(str(tmp_path), pack_max_bytes=8 << 10) as s:
        blobs = [blob(rand_bytes(rng, 1000)) for _ in range(20)]
        for x, h in blobs:
            s.put(x, h)
        for _, h in blobs[1:6]:
            s.delete(h)
        loc = s.locate(blobs[0][1])
        assert loc is not None and loc.pack_id == 1
        flip(loc.path, loc.offset + HEADER_BYTES + 1)
        assert s.compact(0.1) >= 1
        assert not os.path.exists(loc.path)
        assert s.has([blobs[0][1]]) == [False] and s.stats()["corrupt_found"] == 1
        for x, h in blobs[6:]:
            assert s.get(h) == x


# --- bounded memory -----------------------------------------------------------------------


def _stream_file(path: str, n: int, make: Callable[[int], bytes]) -> bytes:
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        left = n
        while left:
            piece = make(min(1 << 20, left))
            f.write(piece)
            sha.update(piece)
            left -= len(piece)
    return sha.digest()


@pytest.mark.parametrize("kind", ["random", "compressible"])
def test_large_blob_put_file_and_read_iter_in_bounded_memory(tmp_path, kind):
    size = 40 << 20 if kind == "random" else 24 << 20
    src = str(tmp_path / "big.bin")
    if kind == "random":
        h = _stream_file(src, size, os.urandom)
    else:
        h = _stream_file(src, size, lambda n: (b"floe block %08d " % n) * (n // 20) + bytes(n % 20))
    with LocalStore(str(tmp_path / "store")) as s:
        tracemalloc.start()
        try:
            with open(src, "rb") as f:
                assert s.put_file(f, h, size) is False
            got_size, it = s.read_iter(h)
            sha = hashlib.sha256()
            n = 0
            for piece in it:
                assert len(piece) <= api.CHUNK_BYTES
                sha.update(piece)
                n += len(piece)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        print(f"{kind} {size >> 20} MiB: peak traced memory {peak / 2**20:.2f} MiB")
        assert got_size == size == n and sha.digest() == h
        assert peak < 8 << 20
        info = s.info(h)
        assert info is not None and info.compression == ("none" if kind == "random" else "zstd")
        assert os.listdir(tmp_path / "store" / "tmp") == []
        assert s.get(h, size - 10, 100) == open(src, "rb").read()[size - 10 :]


# --- model-based ------------------------------------------------------------------------

_POOL_RNG = random.Random(SEED)
POOL = [blob(rand_bytes(_POOL_RNG, _POOL_RNG.randrange(0, 2500))) for _ in range(8)] + [
    blob(b"compressible %d " % i * (40 * i + 1)) for i in range(6)
]
pool_index = st.integers(0, len(POOL) - 1)
# What the model test exercised, printed at its end (rare paths report that they ran).
MODEL_COVERAGE: collections.Counter[str] = collections.Counter()


class PackStoreModel(RuleBasedStateMachine):
    """LocalStore against a dict: put/get/delete/touch/compact/reopen, and
    power loss with the index dropped, after which deleted blobs whose records
    were not compacted away may come back (garbage, never wrong bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="floe-pack-model-")
        self.clock = FakeClock()
        self.store = self._open()
        self.present: dict[bytes, bytes] = {}
        self.maybe_back: dict[bytes, bytes] = {}

    def _open(self) -> LocalStore:
        return LocalStore(self.dir, pack_max_bytes=4 << 10, clock=self.clock)

    @rule(ixs=st.lists(pool_index, min_size=1, max_size=6))
    def put(self, ixs: list[int]) -> None:
        for i in ixs:
            x, h = POOL[i]
            already = self.store.put(x, h)
            assert already == (h in self.present)
            MODEL_COVERAGE["put dedup" if already else "put new"] += 1
            self.present[h] = x
            self.maybe_back.pop(h, None)

    @rule(i=pool_index, off=st.integers(0, 3000), length=st.integers(0, 3000))
    def get(self, i: int, off: int, length: int) -> None:
        x, h = POOL[i]
        if h in self.present:
            off = min(off, len(x))
            assert self.store.get(h, off, length) == (x[off : off + length] if length else x[off:])
        else:
            with pytest.raises(BlobNotFound):
                self.store.get(h)

    @rule(ixs=st.lists(pool_index, min_size=1, max_size=3))
    def delete(self, ixs: list[int]) -> None:
        for i in ixs:
            x, h = POOL[i]
            assert self.store.delete(h) == (h in self.present)
            MODEL_COVERAGE["delete"] += h in self.present
            if self.present.pop(h, None) is not None:
                self.maybe_back[h] = x

    @rule(i=pool_index)
    def touch(self, i: int) -> None:
        assert self.store.touch(POOL[i][1]) == (POOL[i][1] in self.present)

    @rule(s=st.floats(0, 100))
    def tick(self, s: float) -> None:
        self.clock.advance(s)

    @rule(f=st.sampled_from([0.0, 0.3, 0.9]))
    def compact(self, f: float) -> None:
        MODEL_COVERAGE["packs compacted"] += self.store.compact(f)

    @rule(power_loss=st.booleans())
    def restart(self, power_loss: bool) -> None:
        if power_loss and durable.simulating():
            self._power_loss()
            return
        before = self.store.stats()
        self.store.close()
        self.store = self._open()
        MODEL_COVERAGE["reopen"] += 1
        after = self.store.stats()
        for k in ("blobs", "bytes", "stored_bytes", "pack_bytes", "dead_bytes", "packs"):
            assert after[k] == before[k], k

    def _power_loss(self) -> None:
        self.store.close()
        durable.power_loss(self.dir)
        self.store = self._open()
        MODEL_COVERAGE["power loss"] += 1
        for h, x in list(self.maybe_back.items()):
            if self.store.has([h]) == [True]:
                MODEL_COVERAGE["deleted blob back after power loss"] += 1
                assert self.store.get(h) == x
                self.present[h] = x
                del self.maybe_back[h]

    @invariant()
    def listing_matches_the_model(self) -> None:
        assert {i.hash for i in api.iter_all(self.store, page=5)} == set(self.present)
        st_ = self.store.stats()
        assert st_["blobs"] == len(self.present)
        assert st_["bytes"] == sum(len(x) for x in self.present.values())
        assert st_["corrupt_found"] == 0 and 0 <= st_["dead_bytes"] <= st_["pack_bytes"]

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_store_matches_a_dict_model(sim):
    run_state_machine_as_test(
        PackStoreModel,
        settings=settings(max_examples=40, stateful_step_count=40, deadline=None, database=None, print_blob=True),
    )
    print("model coverage:", dict(MODEL_COVERAGE))
    assert MODEL_COVERAGE["power loss"] and MODEL_COVERAGE["packs compacted"] and MODEL_COVERAGE["put dedup"]


def test_a_put_never_dedups_onto_a_rotten_copy(tmp_path, rng):
    # The coordinator counts "already here" as a durable copy toward W, so the
    # copy a dedup relies on must be checked first.
    with LocalStore(str(tmp_path)) as s:
        d, h = blob(rand_bytes(rng, 5000))
        assert s.put(d, h) is False
        assert s.put(d, h) is True  # a real dedup
        loc = s.locate(h)
        assert loc is not None
        flip(loc.path, loc.offset + HEADER_BYTES + 100)
        assert s.put(d, h) is False  # the rotten copy was set aside and a fresh one written
        assert s.get(h) == d and s.verify(h).verified
        assert s.stats()["corrupt_found"] == 1


def test_a_dedup_checks_the_stored_crc_without_decompressing_or_hashing(tmp_path, rng, monkeypatch):
    # The same content put again and again (a guest writing one pattern) costs a crc
    # check of the stored copy, not a full verify; rot is still caught (the test above).
    import objstore.pack as pack

    with LocalStore(str(tmp_path)) as s:
        d, h = blob(bytes([0xA5]) * 300_000)  # compressible: a full verify would decompress
        assert s.put(d, h) is False

        def forbidden(*_a: object, **_k: object) -> None:
            raise AssertionError("a dedup decompressed or hashed the stored copy")

        monkeypatch.setattr(pack, "_content_pieces", forbidden)
        assert s.put(d, h) is True
        assert s.put_many([(d, h), (d, h)]) == [True, True]
        monkeypatch.undo()
        assert s.verify(h).verified and s.get(h) == d


def test_put_many_encoded_checks_every_frame_before_storing_any(tmp_path, monkeypatch):
    import zstandard

    from objstore.pack import EncodedBlob

    texty = b"".join(b"line %d\n" % i for i in range(30_000))
    good = EncodedBlob.of(texty, hashlib.sha256(texty).digest())
    assert good.compression == 1
    other = b"x" * 10_000
    with LocalStore(str(tmp_path)) as s:
        frame_of_other = zstandard.ZstdCompressor().compress(other)
        bad = [
            EncodedBlob(hashlib.sha256(texty).digest(), len(other), 1, frame_of_other),  # another content
            EncodedBlob(good.hash, good.size - 1, 1, good.stored),  # decodes to more than its size
            EncodedBlob(good.hash, good.size, 1, good.stored[:-5]),  # a cut frame
            EncodedBlob(good.hash, good.size, 7, good.stored),  # an unknown compression
            EncodedBlob(good.hash, good.size, 0, good.stored),  # uncompressed of the wrong length
        ]
        for b in bad:
            with pytest.raises(InvalidBlob):
                s.put_many_encoded([good, b])
            assert s.info(good.hash) is None  # nothing stored
        assert s.put_many_encoded([good]) == [False]
        info = s.info(good.hash)
        assert info is not None and info.compression == "zstd" and info.stored_size == len(good.stored)
        assert s.get(good.hash) == texty and s.verify(good.hash).verified
        # verified=True (the caller encoded it itself) skips the decode.
        def no_decode(*_a: object, **_k: object) -> None:
            raise AssertionError("decoded a blob the caller had encoded")

        monkeypatch.setattr(zstandard.ZstdDecompressor, "decompress", no_decode)
        again = b"".join(b"row %d\n" % i for i in range(30_000))
        assert s.put_many_encoded([EncodedBlob.of(again, hashlib.sha256(again).digest())], verified=True) == [False]
        monkeypatch.undo()
        assert s.get(hashlib.sha256(again).digest()) == again
