"""One open volume: the block device the iSCSI target serves (DESIGN.md §5, §6).

Theory of operation.

Ownership. Exactly one node serves a volume: the holder of its lease in the
KV (`meta/lease`, with the owner epoch in `meta/epoch`). `open()` takes the
lease: a new volume's first owner gets epoch 1; a node finding another
owner's lease waits until that lease has not changed for `lease_s` by its own
clock (no clock is compared across nodes), then takes it over with epoch+1
in one conditional batch. The owner renews every lease_s/3 with a batch
conditional on its epoch; a renew that finds another epoch means the volume
was taken over: the owner drops its buffer and stops (Fenced).

Writes land in the write-back buffer (blockdev/wbuffer.py) and complete:
DESIGN.md §2 point 1, a disk's volatile cache. FUA writes flush before they
complete.

Lost-write detection. A disk that loses its cache reports it; so must we. Before
the first write of a dirty period completes, the owner writes meta/dirty
(fenced); once a flush leaves the buffer empty it deletes it. A new owner takes
the volume over in a batch that also deletes meta/dirty, conditional on having
read it, and sets `writes_lost` when it was there: the previous owner died with
acknowledged writes no flush covered. The iSCSI layer then fails the first
SYNCHRONIZE CACHE of every I_T nexus with a write error instead of a GOOD that
would claim those writes durable (QEMU retries the reset UNIT ATTENTION of
DESIGN.md §2 point 6 without telling the guest, so that alone is not enough).

Flush (§2 point 2, §5). Under the flush lock (flushes are ordered; one that
arrives while another runs waits, then covers what came after): freeze the
buffer; per dirty segment, build one blob from its dirty runs (a segment whose
record would pass EXTENTS_MAX is rewritten whole, as one blob; all-zero runs
become holes), put the blobs to the object tier (W=2 of R=3 fsynced; all of
them in one put_many, i.e. one call per replica, when the tier offers it), then
commit ONE conditional KV batch (one Raft entry): every changed segment
record, flush_seq+1 and a changelog entry, applied only if meta/epoch still
holds our epoch. Only then is the frozen buffer released and the flush
acknowledged. If a put or the commit fails the frozen data goes back under the
live buffer and the flush reports Unavailable: nothing is reported durable
that is not. A failed epoch condition means fenced: the buffer is dropped,
Fenced is raised.

Why one batch always suffices: the buffer never holds more than
max_dirty_segments dirty segments (blockdev/wbuffer.py), so a flush changes at
most that many records, and the batch has room for them (kv/limits.py
BATCH_OPS_MAX); and if the records together pass RECORD_BYTES_PER_FLUSH (many
fragmented segments), the largest are rewritten whole as one extent each
until they fit, which a one-extent record per segment always does. A record
that comes out equal to the stored one (a hole punched where nothing was
stored) is not written again.

Compaction. A flush rewrites a segment whose record would pass EXTENTS_MAX
as one blob; when the volume has been idle (no dirty data) for
compact_idle_s, the flusher also rewrites cold segments with more than
COMPACT_MIN_EXTENTS extents, 32 at a time, committed like a flush.

Reads take, under the map lock, the committed segment records and the
buffer's overlay (frozen, then live) in one consistent view, then fetch only
the blob ranges they need, outside the lock, through a bounded cache of
immutable blob bytes (no invalidation: blobs never change). A miss of a
large or sequential read (one starting where a recent read ended) fetches the
whole blob, checks its SHA-256 and caches it for the reads that follow; a miss
of a small random read (at most RANGED_READ_MAX) fetches only its range, which
the replica serves after checking the record's crc32c, and caches nothing.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import msgpack

from blockdev import extents as ext
from blockdev import wbuffer
from blockdev.errors import Fenced, InvalidRequest, Miscompare, OutOfRange, SpaceExhausted, Unavailable
from blockdev.registry import (
    ALLOCATED_KEY,
    DIRTY_KEY,
    EPOCH_KEY,
    FLUSH_SEQ_KEY,
    GEN_KEY,
    LEASE_KEY,
    VolumeInfo,
    from_u64,
    parse_segment_key,
    segment_key,
    u64,
)
from blockdev.wbuffer import WriteBuffer
from kv import limits
from kv.errors import KVError

log = logging.getLogger("floe.volume")

SEG = ext.SEGMENT_BYTES
# Segment records (keys and values) of one flush's commit at most: with the
# fence, the bookkeeping and the envelope the batch stays well under the 48 KiB
# Raft entry limit (kv/limits.py COMMAND_BYTES_MAX). A one-extent record with
# its key and mutation envelope takes about 100 bytes, so max_dirty_segments
# (240) records of one extent each take about 24 KiB: shrinking always works.
RECORD_BYTES_PER_FLUSH = 36 * 1024
# Operations of a flush's batch besides the records: epoch and generation
# conditions, flush_seq, allocated bytes, the changelog entry and the dirty
# marker's delete.
FLUSH_FIXED_OPS = 6
# A segment mutation's protobuf envelope at most: field tags and length prefixes.
RECORD_ENVELOPE_BYTES = 12
ZERO_CHUNK = 4096
# The background compactor rewrites idle segments with more extents than this.
COMPACT_MIN_EXTENTS = 16
# ... once the volume has had no dirty data for this long.
COMPACT_IDLE_S = 30.0
# A volume whose segments keyspace holds more versions than this is read lazily.
MAP_PRELOAD_MAX = 200_000
# Blob puts in flight per flush (a tier without put_many, and whole-segment rewrites).
PUT_PARALLELISM = 16
# A read of at most this many bytes of a blob that is not cached, and not part
# of a sequential stream, fetches just its range (verified by the replica's
# record checksum) and caches nothing: a random 4 KiB read must not pull and
# hash a whole 1 MiB blob. Larger or sequential reads fetch the whole blob,
# verify its SHA-256, and cache it for the reads that follow.
RANGED_READ_MAX = 64 * 1024
# How many recent read ends the volume remembers to recognise sequential streams.
READ_STREAMS = 8


class BlobTier(Protocol):
    """What a volume needs of the object tier. A tier may also offer
    `put_many(datas) -> hashes`, storing every blob durably (W of R) in one
    round per replica; a flush uses it when it is there (see `put_all`)."""

    def put(self, data: bytes) -> bytes:
        """Store durably (W of R replicas); returns the SHA-256."""
        ...

    def get(self, h: bytes, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the blob (length 0: the whole blob,
        verified against its SHA-256)."""
        ...


def put_all(tier: BlobTier, datas: list[bytes], pool: ThreadPoolExecutor) -> list[bytes]:
    """Every blob stored durably; their hashes, in order. One put_many when the
    tier has it (a flush of 64 segments is then one call per replica, not 64),
    else the puts in parallel."""
    if not datas:
        return []
    many = getattr(tier, "put_many", None)
    if many is not None:
        hashes = list(many(datas))
        if len(hashes) != len(datas):
            raise RuntimeError(f"put_many returned {len(hashes)} hashes for {len(datas)} blobs")
        return hashes
    return list(pool.map(lambda d: tier.put(d if isinstance(d, bytes) else bytes(d)), datas))


class BlobCache:
    """LRU of whole immutable blobs, bounded in bytes. A miss fetches the whole
    blob (SHA-256 verified) and caches it, unless the caller asks for just the
    range (`ranged=True`: a small random read), which is fetched alone and not
    cached."""

    def __init__(self, tier: BlobTier, max_bytes: int = 64 << 20) -> None:
        self.tier = tier
        self.max_bytes = max_bytes
        self._lru: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.ranged = 0

    def read(self, h: bytes, offset: int, length: int, *, ranged: bool = False) -> bytes:
        with self._lock:
            data = self._lru.get(h)
            if data is not None:
                self._lru.move_to_end(h)
                self.hits += 1
                return data[offset:offset + length]
            self.misses += 1
        if ranged and length > 0:
            with self._lock:
                self.ranged += 1
            return self.tier.get(h, offset, length)
        data = self.tier.get(h, 0, 0)  # whole blob: verified end to end, cached for neighbours
        self.prime(h, data)
        return data[offset:offset + length]

    def prime(self, h: bytes, data: bytes) -> None:
        """Cache a blob (one just read, or one this node just wrote, so reads of fresh data are local)."""
        with self._lock:
            if h not in self._lru and len(data) <= self.max_bytes // 4:
                self._lru[h] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, old = self._lru.popitem(last=False)
                    self._bytes -= len(old)


def _kv_pb2() -> Any:
    from proto import kv_pb2

    return kv_pb2


class Volume:
    def __init__(self, kv: Any, info: VolumeInfo, blobs: BlobTier, node_id: str, *, lease_s: float = 5.0,
                 high_water_bytes: int = 64 << 20, cache_bytes: int = 64 << 20,
                 flush_after_s: float = 5.0, flush_dirty_bytes: int = 16 << 20,
                 snapshot_gen: int | None = None, soft_threshold_pct: float = 80.0,
                 pool_hard_limit_bytes: int = 0, pool_allocated: Any = None,
                 compact_idle_s: float = COMPACT_IDLE_S,
                 max_dirty_segments: int = wbuffer.MAX_SEGMENTS_DEFAULT) -> None:
        self.kv = kv
        self.info = info
        self.node_id = node_id
        self.lease_s = lease_s
        self.cache = BlobCache(blobs, cache_bytes)
        self.blobs = blobs
        if not 0 < max_dirty_segments <= limits.BATCH_OPS_MAX - FLUSH_FIXED_OPS:
            raise ValueError(f"max_dirty_segments {max_dirty_segments} must be in "
                             f"[1, {limits.BATCH_OPS_MAX - FLUSH_FIXED_OPS}]: one flush is one KV batch")
        self.buffer = WriteBuffer(high_water_bytes=high_water_bytes, max_segments=max_dirty_segments)
        self.epoch = 0
        self.gen = 0
        self.flush_seq = 0
        self._records: dict[int, list[ext.Extent]] = {}
        self._last_flush = time.monotonic()
        # Where recent reads ended: a read starting at (or just past) one is sequential.
        self._read_ends: collections.deque[int] = collections.deque(maxlen=READ_STREAMS)
        self._compacted_since_flush = False
        self.compact_idle_s = compact_idle_s
        self._map_complete = False  # every own record is in _records (loaded at open, kept by our flushes)
        self._map_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._fenced = False
        self._closed = False
        self.writes_lost = False  # the previous owner died holding unflushed acknowledged writes
        self._dirty_marked = False  # meta/dirty is set by us (under _write_lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.flush_after_s = flush_after_s
        self.flush_dirty_bytes = flush_dirty_bytes
        self._dirty_since: float | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        # Thin provisioning: bytes mapped at the head (holes excluded), the
        # soft threshold (percent of the volume's size) and the pool's hard
        # limit (0 = none) with a callable giving the pool's allocated bytes.
        self.allocated = 0
        self.soft_threshold_pct = soft_threshold_pct
        self._soft_reported = False
        self.pool_hard_limit_bytes = pool_hard_limit_bytes
        self._pool_allocated = pool_allocated
        # Blob puts of one flush run in parallel (DESIGN.md §5).
        self._pool = ThreadPoolExecutor(max_workers=PUT_PARALLELISM, thread_name_prefix=f"vol-{info.name}-put")
        # A read-only view of a snapshot: reads at its generation, no lease, no writes.
        self.read_only = snapshot_gen is not None
        if snapshot_gen is not None:
            self.gen = snapshot_gen

    # ---------------------------------------------------------------- geometry

    @property
    def block_size(self) -> int:
        return self.info.block_size

    @property
    def capacity_blocks(self) -> int:
        return self.info.blocks

    def _range(self, lba: int, count: int) -> tuple[int, int]:
        if lba < 0 or count < 0 or lba + count > self.capacity_blocks:
            raise OutOfRange(f"blocks {lba}+{count} beyond the volume's {self.capacity_blocks}")
        return lba * self.block_size, count * self.block_size

    def _check_serving(self) -> None:
        if self._fenced:
            raise Fenced(f"volume {self.info.name}: this node ({self.node_id}) no longer owns it")
        if self._closed:
            raise Unavailable(f"volume {self.info.name} is closed")

    # ---------------------------------------------------------------- ownership

    def _meta(self, key: bytes) -> tuple[bytes, int] | None:
        found: tuple[bytes, int] | None = self.kv.get(self.info.store, "meta", key)
        return found

    def open(self, *, wait_s: float | None = None, background: bool = True) -> None:
        """Take ownership (waiting out another owner's lease if need be) and
        load the volume's state; then start the lease renewer and the
        background flusher."""
        kv_pb2 = _kv_pb2()
        deadline = time.monotonic() + (wait_s if wait_s is not None else 3 * self.lease_s)
        seen: tuple[bytes, int] | None = None
        seen_at = 0.0
        while True:
            lease = self._meta(LEASE_KEY)
            epoch_raw = self._meta(EPOCH_KEY)
            epoch = from_u64(epoch_raw[0]) if epoch_raw else 0
            dirty = self._meta(DIRTY_KEY)
            if lease is None:
                cond = [kv_pb2.Condition(keyspace="meta", key=LEASE_KEY, absent=True)]
            else:
                holder = msgpack.unpackb(lease[0], raw=False)
                expired = seen is not None and seen[1] == lease[1] and time.monotonic() - seen_at >= self.lease_s
                if holder.get("node") != self.node_id and not expired:
                    if seen is None or seen[1] != lease[1]:
                        seen, seen_at = lease, time.monotonic()
                    if time.monotonic() > deadline:
                        raise Unavailable(f"volume {self.info.name} is owned by {holder.get('node')} "
                                          f"(epoch {holder.get('epoch')}) and its lease is being renewed")
                    time.sleep(min(0.2, self.lease_s / 5))
                    continue
                cond = [kv_pb2.Condition(keyspace="meta", key=LEASE_KEY, version_equals=lease[1])]
            new_epoch = epoch + 1
            # The dirty marker as we read it: a stale owner marking it meanwhile makes this fail and retry.
            cond.append(kv_pb2.Condition(keyspace="meta", key=DIRTY_KEY, absent=True) if dirty is None
                        else kv_pb2.Condition(keyspace="meta", key=DIRTY_KEY, version_equals=dirty[1]))
            muts = [kv_pb2.Mutation(keyspace="meta", key=EPOCH_KEY, put=u64(new_epoch)),
                    kv_pb2.Mutation(keyspace="meta", key=LEASE_KEY, put=self._lease_value(new_epoch))]
            if dirty is not None:
                muts.append(kv_pb2.Mutation(keyspace="meta", key=DIRTY_KEY, delete=True))
            applied, _index, _failed = self.kv.batch(self.info.store, conditions=cond, mutations=muts)
            if applied:
                self.epoch = new_epoch
                self.writes_lost = dirty is not None
                if dirty is not None:
                    log.warning("event=volume_writes_lost volume=%s node=%s epoch=%d previous=%s",
                                self.info.name, self.node_id, new_epoch, msgpack.unpackb(dirty[0], raw=False))
                break
            if time.monotonic() > deadline:
                raise Unavailable(f"could not take volume {self.info.name}: its lease kept changing")
        seq = self._meta(FLUSH_SEQ_KEY)
        self.flush_seq = from_u64(seq[0]) if seq else 0
        gen = self._meta(GEN_KEY)
        self.gen = from_u64(gen[0]) if gen else 0
        self._load_map()
        log.info("event=volume_opened volume=%s node=%s epoch=%d flush_seq=%d", self.info.name, self.node_id,
                 self.epoch, self.flush_seq)
        if background:
            for name, fn in (("lease", self._lease_loop), ("flusher", self._flush_loop)):
                t = threading.Thread(target=fn, name=f"vol-{self.info.name}-{name}", daemon=True)
                t.start()
                self._threads.append(t)

    def _epoch_condition(self) -> Any:
        """The fence of every commit: meta/epoch still holds our epoch."""
        return _kv_pb2().Condition(keyspace="meta", key=EPOCH_KEY, value_equals=u64(self.epoch))

    def _lease_value(self, epoch: int) -> bytes:
        return bytes(msgpack.packb({"node": self.node_id, "epoch": epoch, "renewed": time.time()}))

    def renew(self) -> None:
        """Renew the lease; Fenced (and the buffer dropped) if another node took over."""
        kv_pb2 = _kv_pb2()
        applied, _i, _f = self.kv.batch(
            self.info.store, conditions=[self._epoch_condition()],
            mutations=[kv_pb2.Mutation(keyspace="meta", key=LEASE_KEY, put=self._lease_value(self.epoch))])
        if not applied:
            self._fence("lease renewal found another epoch")

    def _fence(self, why: str) -> None:
        if not self._fenced:
            log.warning("event=volume_fenced volume=%s node=%s epoch=%d reason=%s dropped_bytes=%d",
                        self.info.name, self.node_id, self.epoch, why, self.buffer.dirty_bytes)
        self._fenced = True
        self.buffer.drop_all()
        raise Fenced(f"volume {self.info.name}: {why}; this node no longer owns it")

    def _lease_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
                last_ok = time.monotonic()
            except Fenced:
                return
            except KVError as e:
                if time.monotonic() - last_ok > self.lease_s:
                    # Another node may take over any time now; serving on
                    # would risk reads of data the new owner has replaced.
                    log.error("event=lease_lost volume=%s error=%s", self.info.name, e)
                    self._fenced = True
                    self.buffer.drop_all()
                    return

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            # Wake at once when writers wait for memory or the buffer passed
            # its flush-start mark; else check the age every 0.2 s.
            wanted = self.buffer.wait_flush_wanted(0.2)
            if self._stop.is_set():
                return
            dirty = self.buffer.dirty_bytes
            if not dirty:
                self._dirty_since = None
                idle_for = time.monotonic() - self._last_flush
                if idle_for >= self.compact_idle_s and not self._compacted_since_flush:
                    try:
                        if self.compact_cold() == 0:
                            self._compacted_since_flush = True
                    except Fenced:
                        return
                    except Exception as e:  # noqa: BLE001 - a later idle period tries again
                        log.warning("event=compaction_failed volume=%s error=%s", self.info.name, e)
                        self._compacted_since_flush = True
                continue
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            if (wanted or dirty >= self.flush_dirty_bytes
                    or time.monotonic() - self._dirty_since >= self.flush_after_s):
                try:
                    self.flush()
                    self._dirty_since = None
                except Fenced:
                    return
                except Exception as e:  # noqa: BLE001 - retried on the next round; data stays buffered
                    log.warning("event=background_flush_failed volume=%s error=%s", self.info.name, e)

    def close(self, *, flush: bool = True) -> None:
        """Flush (unless told not to), stop the background threads, release the lease."""
        if flush and not self._fenced:
            self.flush()
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._closed = True
        self._pool.shutdown(wait=False)
        if not self._fenced and self.epoch:
            kv_pb2 = _kv_pb2()
            try:
                self.kv.batch(self.info.store, conditions=[self._epoch_condition()],
                              mutations=[kv_pb2.Mutation(keyspace="meta", key=LEASE_KEY, delete=True)])
            except KVError as e:
                log.warning("event=lease_release_failed volume=%s error=%s", self.info.name, e)

    def crash(self) -> None:
        """Test hook: stop as a killed owner would (buffer lost, lease left to expire)."""
        self._stop.set()
        self._closed = True
        self.buffer.drop_all()
        self._pool.shutdown(wait=False)

    # ---------------------------------------------------------------- the segment map

    def _record(self, seg: int) -> list[ext.Extent]:
        rec = self._records.get(seg)
        if rec is not None:
            return rec
        rec = []
        # Our own newest version visible at our generation; else, for a clone,
        # the version its origin snapshot saw (and so on up the chain). When
        # the whole map was loaded at open, a segment missing from it has no
        # version of our own.
        chain = ((self.info.store, self.gen), *self.info.ancestors)
        if self._map_complete:
            chain = self.info.ancestors
        for store, gen in chain:
            rows, _cont = self.kv.scan(store, "segments", start=segment_key(seg, gen), end=u64(seg + 1), limit=1)
            if rows:
                rec = ext.decode(rows[0][1])
                break
        self._records[seg] = rec
        return rec

    def _load_map(self) -> None:
        """Read every segment record visible at our generation in one paged
        scan (a few round trips instead of one per segment). Volumes with
        more versions than MAP_PRELOAD_MAX are read lazily instead."""
        latest: dict[int, tuple[int, bytes]] = {}
        cont = b""
        seen = 0
        while True:
            rows, cont = self.kv.scan(self.info.store, "segments", limit=1000, continuation=cont)
            for key, value, _version in rows:
                seg, gen = parse_segment_key(key)
                seen += 1
                if gen <= self.gen and (seg not in latest or gen > latest[seg][0]):
                    latest[seg] = (gen, value)
            if seen > MAP_PRELOAD_MAX:
                return
            if not cont:
                break
        with self._map_lock:
            for seg, (_gen, value) in latest.items():
                self._records[seg] = ext.decode(value)
            self._map_complete = True
            self.allocated = sum(ext.allocated(r) for r in self._records.values())
        self.stats["map_preloaded"] = len(latest)

    # ---------------------------------------------------------------- reads

    def read(self, lba: int, count: int) -> bytes:
        self._check_serving()
        off, length = self._range(lba, count)
        return self.read_bytes(off, length)

    def read_bytes(self, off: int, length: int) -> bytes:
        out = bytearray(length)
        fetches: list[tuple[int, int, bytes, int]] = []
        try:
            with self._map_lock:
                pos = off
                while pos < off + length:
                    seg, s_off = divmod(pos, SEG)
                    n = min(SEG - s_off, off + length - pos)
                    for dst, plen, h, boff in ext.read_plan(self._record(seg), s_off, n):
                        if h is not None:
                            fetches.append((pos - off + dst, plen, h, boff))
                    pos += n
                overlay = self.buffer.read_overlay(off, length)
        except KVError as e:
            raise Unavailable(f"reading the segment map: {e}") from e
        ends = tuple(self._read_ends)  # a C-level copy: safe while readers append
        sequential = any(0 <= off - e <= RANGED_READ_MAX for e in ends)
        self._read_ends.append(off + length)
        ranged = length <= RANGED_READ_MAX and not sequential
        if not overlay and len(fetches) == 1 and fetches[0][:2] == (0, length):
            # One extent covers the whole read (a segment read in one piece): the
            # cache's bytes as they are, without assembling a copy.
            _dst, plen, h, boff = fetches[0]
            try:
                whole = self.cache.read(h, boff, plen, ranged=ranged)
            except Exception as e:
                raise Unavailable(f"reading blob data: {e}") from e
            self.stats["reads"] += 1
            return whole
        try:
            for dst, plen, h, boff in fetches:
                out[dst:dst + plen] = self.cache.read(h, boff, plen, ranged=ranged)
        except Exception as e:
            raise Unavailable(f"reading blob data: {e}") from e
        for dst, plen, data in overlay:
            out[dst:dst + plen] = data if data is not None else bytes(plen)
        self.stats["reads"] += 1
        return bytes(out)

    # ---------------------------------------------------------------- writes

    def _check_writable(self) -> None:
        self._check_serving()
        if self.read_only:
            raise InvalidRequest(f"{self.info.name} is a snapshot view: read-only")

    def _check_space(self, lba: int, count: int) -> None:
        """Past the pool's hard limit, a write that would map new blocks fails
        (SPACE ALLOCATION FAILED); overwrites of mapped blocks and reads go on."""
        if not self.pool_hard_limit_bytes or self._pool_allocated is None:
            return
        if int(self._pool_allocated()) + self.buffer.dirty_bytes < self.pool_hard_limit_bytes:
            return
        pos, end = lba, lba + count
        while pos < end:
            start, run, mapped = self.lba_status(pos)
            if not mapped:
                raise SpaceExhausted(f"the pool is at its hard limit of {self.pool_hard_limit_bytes} bytes; "
                                     f"block {pos} of {self.info.name} is not allocated")
            pos = start + max(run, 1)

    def soft_threshold_event(self) -> bool:
        """True once when the volume's mapped bytes pass its soft threshold
        (the target turns it into the thin-provisioning UNIT ATTENTION)."""
        over = self.allocated * 100 >= self.soft_threshold_pct * self.info.size
        if over and not self._soft_reported:
            self._soft_reported = True
            return True
        if not over:
            self._soft_reported = False
        return False

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        self._check_writable()
        if len(data) % self.block_size:
            raise InvalidRequest(f"write of {len(data)} bytes is not whole {self.block_size}-byte blocks")
        off, _ = self._range(lba, len(data) // self.block_size)
        self._check_space(lba, len(data) // self.block_size)
        with self._write_lock:
            self._mark_dirty()
            self.buffer.write(off, bytes(data))
        self.stats["writes"] += 1
        if fua:
            self.flush()

    def _mark_dirty(self) -> None:
        """Before the first write of a dirty period completes: set meta/dirty (fenced), so a
        new owner learns if we die before a flush covers it (module doc). Caller holds
        _write_lock."""
        if self._dirty_marked:
            return
        t_mark = time.monotonic()
        kv_pb2 = _kv_pb2()
        value = msgpack.packb({"node": self.node_id, "epoch": self.epoch})
        try:
            applied, _i, _f = self.kv.batch(self.info.store, conditions=[self._epoch_condition()],
                                            mutations=[kv_pb2.Mutation(keyspace="meta", key=DIRTY_KEY, put=value)])
        except KVError as e:
            raise Unavailable(f"marking {self.info.name} dirty: {e}") from e
        if not applied:
            self._fence("marking dirty found another epoch")
        self._dirty_marked = True
        self.stats["dirty_marks"] += 1
        self.stats["dirty_mark_ms_total"] += int((time.monotonic() - t_mark) * 1000)

    def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        self._check_writable()
        spans = [self._range(lba, count) for lba, count in ranges]
        with self._write_lock:
            self._mark_dirty()
            for off, length in spans:
                if length:
                    self.buffer.zero(off, length)

    def write_same(self, lba: int, count: int, block: bytes, *, unmap: bool = False) -> None:
        self._check_writable()
        if len(block) != self.block_size:
            raise InvalidRequest(f"WRITE SAME needs one {self.block_size}-byte block, got {len(block)}")
        off, length = self._range(lba, count)
        with self._write_lock:
            self._mark_dirty()
            if not any(block) and unmap:
                self.buffer.zero(off, length)
                return
            step = max(1, (4 << 20) // self.block_size)
            for i in range(0, count, step):
                n = min(step, count - i)
                self.buffer.write(off + i * self.block_size, block * n)

    def compare_and_write(self, lba: int, compare: bytes, data: bytes) -> None:
        """Atomic against other writes: the compare and the write happen under the write lock."""
        self._check_writable()
        if len(compare) != len(data) or len(data) % self.block_size:
            raise InvalidRequest("COMPARE AND WRITE needs equal, whole-block compare and write buffers")
        off, length = self._range(lba, len(data) // self.block_size)
        with self._write_lock:
            current = self.read_bytes(off, length)
            if current != compare:
                first = next(i for i, (a, b) in enumerate(zip(current, compare, strict=True)) if a != b)
                raise Miscompare(first)
            self._mark_dirty()
            self.buffer.write(off, bytes(data))

    def lba_status(self, lba: int) -> tuple[int, int, bool]:
        """(lba, blocks, mapped) for the run of blocks from `lba` that share one
        state, within its segment: mapped = holds data (written or stored)."""
        self._check_serving()
        off, _ = self._range(lba, 1)
        seg, s_off = divmod(off, SEG)
        end = min(SEG, (self.capacity_blocks * self.block_size) - seg * SEG)
        with self._map_lock:
            plan = ext.read_plan(self._record(seg), 0, end)
            overlay = self.buffer.read_overlay(seg * SEG, end)
        state = bytearray(end)  # 1 = mapped
        for dst, plen, h, _boff in plan:
            if h is not None:
                state[dst:dst + plen] = b"\x01" * plen
        for dst, plen, d in overlay:
            state[dst:dst + plen] = (b"\x01" if d is not None else b"\x00") * plen
        first = state[s_off]
        run_end = s_off
        while run_end < end and state[run_end] == first:
            run_end += self.block_size
        return lba, (min(run_end, end) - s_off) // self.block_size, bool(first)

    # ---------------------------------------------------------------- flush

    def flush(self) -> None:
        """Make every write that completed before this call durable (module doc)."""
        self._check_serving()
        t0 = time.monotonic()
        with self._flush_lock:
            t_locked = time.monotonic()
            self._check_serving()
            frozen = self.buffer.freeze()
            if not frozen.segments:
                self.buffer.release_frozen(frozen)
                return
            # When no writer is active and nothing is live, the same batch deletes meta/dirty:
            # holding _write_lock (never waiting for it: a writer may be waiting for this flush)
            # keeps writers out until the commit, so no write completes unmarked.
            clearing = self._dirty_marked and self._write_lock.acquire(blocking=False)
            try:
                changed = self._build(frozen)
                if clearing and self.buffer.live_bytes == 0 and not self.buffer.live_runs():
                    alloc_delta = self._commit(changed, clear_dirty=True)
                    self._dirty_marked = False
                else:
                    alloc_delta = self._commit(changed)
            except Fenced:
                raise
            except Exception as e:
                self.buffer.unfreeze(frozen)
                self.stats["flush_failed"] += 1
                if isinstance(e, Unavailable):
                    raise
                raise Unavailable(f"flush of {self.info.name} failed, data kept buffered: "
                                  f"{type(e).__name__}: {e}") from e
            finally:
                if clearing:
                    self._write_lock.release()
            with self._map_lock:
                self.allocated += alloc_delta
                self._records.update(changed)
                self.buffer.release_frozen(frozen)
        self._last_flush = time.monotonic()
        self._compacted_since_flush = False
        self.stats["flushes"] += 1
        self.stats["flush_ms_total"] += int((time.monotonic() - t0) * 1000)
        log.debug("event=volume_flushed volume=%s segments=%d waited_ms=%.1f ms=%.1f", self.info.name,
                  len(frozen.segments), (t_locked - t0) * 1000, (time.monotonic() - t0) * 1000)

    def _build(self, frozen: Any) -> dict[int, list[ext.Extent]]:
        """New records for every frozen segment, with their blobs put (W of R),
        all segments' blobs in parallel."""
        plans: dict[int, tuple[list[tuple[int, int]], list[tuple[int, bytes]]]] = {}
        for seg, pieces in sorted(frozen.segments.items()):
            holes: list[tuple[int, int]] = []
            runs: list[tuple[int, bytes]] = []
            for s_off, length, data in pieces:
                if data is None:
                    holes.append((s_off, length))
                else:
                    holes_in, data_runs = _split_zero_runs(s_off, data)
                    holes.extend(holes_in)
                    runs.extend(data_runs)
            plans[seg] = (holes, runs)
        # A segment written as one run (a whole-segment write) is its own blob: the frozen
        # buffer is handed over, not joined into a copy (it is never changed again: the
        # buffer dropped its live segments at freeze, and the cache may keep it).
        blobs = {seg: runs[0][1] if len(runs) == 1 else b"".join(d for _o, d in runs)
                 for seg, (_h, runs) in plans.items() if runs}
        t_put = time.monotonic()
        hashes = dict(zip(blobs, put_all(self.blobs, list(blobs.values()), self._pool), strict=True))
        self.stats["flush_put_ms_total"] += int((time.monotonic() - t_put) * 1000)
        changed: dict[int, list[ext.Extent]] = {}
        for seg, (holes, runs) in plans.items():
            rec = list(self._record(seg))
            for h_off, h_len in holes:
                rec = ext.punch(rec, h_off, h_len)
            if runs:
                h = hashes[seg]
                self.cache.prime(h, blobs[seg])
                new: list[ext.Extent] = []
                pos = 0
                for r_off, d in runs:
                    new.append(ext.Extent(r_off, len(d), h, pos))
                    pos += len(d)
                rec = ext.overlay(rec, new)
            if ext.fragmented(rec):
                rec = self._rewrite_whole(seg, rec)
            if rec != self._record(seg):
                changed[seg] = rec
        return self._fit_one_batch(changed)

    def _fit_one_batch(self, changed: dict[int, list[ext.Extent]]) -> dict[int, list[ext.Extent]]:
        """Rewrite the largest records whole (one extent each, in parallel) until
        all of them fit RECORD_BYTES_PER_FLUSH (module doc: one Raft command)."""
        sizes = {seg: _record_bytes(seg, rec) for seg, rec in changed.items()}
        total = sum(sizes.values())
        todo: list[int] = []
        for seg in sorted(sizes, key=lambda sg: -sizes[sg]):
            if total <= RECORD_BYTES_PER_FLUSH or len(changed[seg]) <= 1:
                break
            todo.append(seg)
            total -= sizes[seg] - _record_bytes(seg, [ext.Extent(0, SEG, bytes(32), 0)])
        if todo:
            rewritten = self._pool.map(lambda sg: self._rewrite_whole(sg, changed[sg]), todo)
            changed.update(zip(todo, rewritten, strict=True))
            self.stats["segments_rewritten_to_fit"] += len(todo)
        return changed

    def _rewrite_whole(self, seg: int, rec: list[ext.Extent]) -> list[ext.Extent]:
        """A fragmented segment becomes one blob and one extent, from its first
        to its last mapped byte (gaps in between are stored as zeros: a bounded
        record is worth a little space)."""
        plan = [p for p in ext.read_plan(rec, 0, SEG) if p[2] is not None]
        if not plan:
            return []
        first, last = plan[0][0], plan[-1][0] + plan[-1][1]
        buf = bytearray(last - first)
        for dst, plen, h, boff in plan:
            if h is not None:
                buf[dst - first:dst - first + plen] = self.cache.read(h, boff, plen)
        blob = bytes(buf)
        h = self.blobs.put(blob)
        self.cache.prime(h, blob)
        self.stats["segments_rewritten"] += 1
        return [ext.Extent(first, len(blob), h, 0)]

    def _commit(self, changed: dict[int, list[ext.Extent]], *, clear_dirty: bool = False) -> int:
        """Commit the changed records (fenced); returns the change in mapped bytes."""
        alloc_delta = sum(ext.allocated(rec) - ext.allocated(self._record(seg)) for seg, rec in changed.items())
        for _attempt in range(5):
            if self._commit_at_gen(changed, self.allocated + alloc_delta, clear_dirty=clear_dirty):
                return alloc_delta
            # A snapshot moved the volume to a new generation: the same records
            # go in at the new generation, leaving the snapshot's versions be.
            found = self._meta(GEN_KEY)
            self.gen = from_u64(found[0]) if found else 0
        raise Unavailable(f"flush of {self.info.name}: the generation kept changing")

    def _commit_at_gen(self, changed: dict[int, list[ext.Extent]], allocated: int, *,
                       clear_dirty: bool = False) -> bool:
        """ONE fenced KV batch (one Raft entry) with every changed record (module doc)."""
        kv_pb2 = _kv_pb2()
        fence = [self._epoch_condition(), kv_pb2.Condition(keyspace="meta", key=GEN_KEY, value_equals=u64(self.gen))]
        muts = [kv_pb2.Mutation(keyspace="segments", key=segment_key(seg, self.gen), put=ext.encode(rec))
                for seg, rec in sorted(changed.items())]
        record_bytes = sum(len(m.key) + len(m.put) + len(m.keyspace) + RECORD_ENVELOPE_BYTES for m in muts)
        seq = self.flush_seq + 1
        log_entry = msgpack.packb({"segments": sorted(changed), "gen": self.gen, "epoch": self.epoch})
        muts.append(kv_pb2.Mutation(keyspace="meta", key=FLUSH_SEQ_KEY, put=u64(seq)))
        muts.append(kv_pb2.Mutation(keyspace="meta", key=ALLOCATED_KEY, put=u64(max(0, allocated))))
        muts.append(kv_pb2.Mutation(keyspace="changelog", key=u64(seq), put=log_entry))
        if clear_dirty:
            muts.append(kv_pb2.Mutation(keyspace="meta", key=DIRTY_KEY, delete=True))
        if len(fence) + len(muts) > limits.BATCH_OPS_MAX or record_bytes > RECORD_BYTES_PER_FLUSH:
            # The buffer's segment bound and _fit_one_batch make this impossible;
            # refuse (the data stays buffered) rather than split a flush.
            raise RuntimeError(f"flush of {len(changed)} records ({record_bytes} bytes) does not fit one "
                               "KV batch: a bug in the dirty-segment bound")
        try:
            applied, _index, failed = self.kv.batch(self.info.store, conditions=fence, mutations=muts)
        except KVError as e:
            raise Unavailable(f"committing the segment map: {e}") from e
        if not applied:
            if failed == 2:
                return False
            self._fence("flush commit refused: the owner epoch changed (taken over)")
        self.flush_seq = seq
        self.stats["flush_commits"] += 1
        return True

    # ---------------------------------------------------------------- compaction

    def compact_cold(self, min_extents: int = COMPACT_MIN_EXTENTS, max_segments: int = 32) -> int:
        """Rewrite up to `max_segments` cold fragmented segments (more than
        `min_extents` extents, nothing of them buffered) as one blob each, and
        commit the new records like a flush (fenced). Returns how many."""
        self._check_writable()
        with self._flush_lock:
            self._check_serving()
            dirty = set(self.buffer.dirty_segments())
            with self._map_lock:
                todo = [seg for seg, rec in self._records.items()
                        if len(rec) > min_extents and seg not in dirty][:max_segments]
            if not todo:
                return 0
            changed = {seg: self._rewrite_whole(seg, self._records[seg]) for seg in todo}
            alloc_delta = self._commit(changed)
            with self._map_lock:
                self.allocated += alloc_delta
                self._records.update(changed)
        self.stats["segments_compacted"] += len(todo)
        log.info("event=segments_compacted volume=%s count=%d", self.info.name, len(todo))
        return len(todo)

    # ---------------------------------------------------------------- snapshots

    def snapshot(self, name: str) -> int:
        """Flush, then snapshot what is now durable (fenced by our epoch).
        Returns the snapshot's generation; this volume moves to the next."""
        from blockdev import snapshots

        self.flush()
        with self._flush_lock:
            self._check_serving()
            gen = snapshots.create(self.kv, self.info, name, extra_conditions=(self._epoch_condition(),))
            with self._map_lock:
                self.gen = gen + 1
        return gen


def _record_bytes(seg: int, rec: list[ext.Extent]) -> int:
    """What a record takes in a flush's batch, at most: its key, its value and
    the protobuf envelope of the mutation (tags and length prefixes, <= 12 bytes)."""
    return len(segment_key(seg, 0)) + len(ext.encode(rec)) + len("segments") + RECORD_ENVELOPE_BYTES


def _split_zero_runs(s_off: int, data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, bytes]]]:
    """Split a dirty run into holes (all-zero ZERO_CHUNK pieces, counted from
    the run's start) and data runs; neighbouring pieces of a kind merge."""
    if not data or (not data[0] and data.count(0) == len(data)):  # all zeros (the first byte rules most out)
        return [(s_off, len(data))], []
    if len(data) < 2 * ZERO_CHUNK:
        return [], [(s_off, data)]
    zero = bytes(ZERO_CHUNK)
    tail = len(data) % ZERO_CHUNK
    if zero not in data and (not tail or any(data[-tail:])):
        return [], [(s_off, data)]  # no zero chunk anywhere (one C-speed search, not a chunk walk)
    kinds: list[tuple[bool, int, int]] = []  # (is zero, start, end) within data
    for i in range(0, len(data), ZERO_CHUNK):
        j = min(i + ZERO_CHUNK, len(data))
        is_zero = data[i:j] == zero[:j - i]
        if kinds and kinds[-1][0] == is_zero:
            kinds[-1] = (is_zero, kinds[-1][1], j)
        else:
            kinds.append((is_zero, i, j))
    holes = [(s_off + a, b - a) for z, a, b in kinds if z]
    runs = [(s_off + a, data[a:b]) for z, a, b in kinds if not z]
    return holes, runs
