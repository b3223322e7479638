"""The object tier across nodes: placement, quorum puts, verified reads,
read repair, hinted handoff, the repair scanner, the scrubber and GC.

One `BlobCluster` runs in every node, over a `Replica` per node (its own
LocalStore and a RemoteReplica for each peer; tests use LocalStores only).

Put. The blob's R replicas come from rendezvous hashing (placement.py). The
coordinator sends the blob to all of them at once and returns when W have
fsynced it (after a grace of up to 20 ms for the rest, which usually answer a
fraction of a millisecond later). Replicas that have not acknowledged by then get a durable hint
(hints.py) before put() returns, so the third copy is owed even if this node
restarts; a late acknowledgement removes the hint, and the hint worker delivers
the rest. Fewer than W acknowledgements: NotEnoughReplicas, nothing promised
(copies that did land are unreferenced garbage for GC).

put_many gives every blob of a batch (a volume flush) exactly those
guarantees, but makes ONE call per node carrying all the blobs placed on it
(the local store's put_many, a PutMany RPC to each peer), so a flush of 64
segments costs three group commits and two RPCs instead of 64 puts and 128
RPCs: Python gRPC's cost per call, not the bytes, dominated. Hints owed by
the batch are written in one synced batch too. Any blob short of W fails the
whole call.

Get. Local copy first when this node is a replica; otherwise the replicas in
placement order, with a hedged second request when the first has not answered
within `hedge_after_s`, failing over to the next on an error. What is checked
depends on what is read:
  whole blob  the coordinator checks its SHA-256 end to end (the store checks
              its record checksum too; this node's own pack store checks the
              SHA-256 as it reads, so that copy is not hashed twice). A
              replica that answered NotFound, Corrupt or wrong bytes gets the
              good copy written back (read repair).
  a range     only the range is read, from one replica, whose store checks
              the copy's record crc32c (over the whole record) before
              answering; the coordinator cannot hash a part. DESIGN.md §5:
              volumes fetch only the blob ranges they need, so a random
              4 KiB read must not move and hash a 1 MiB blob. A placed
              replica that answers NotFound or Corrupt sends the read down the
              whole-blob path, which verifies the hash and repairs the copy.

Background (each rate-limited, each counted in `counters()`):
  hints     deliver owed copies; a target that fails is retried later.
  repair    walk the local store; for each blob ask its other placed replicas
            (batched Has) and copy it to any that lack it. After a node is
            replaced by an empty one, the survivors refill it this way.
  scrub     re-verify every local copy at rest; a corrupt copy is quarantined
            by the store and replaced from a good replica.
  gc        mark and sweep: the live set (every hash the provider names) is
            taken FIRST, then each node's copies are listed; a copy is deleted
            only when its hash is not live and the copy is older than the grace
            period on its own node's clock (the delete is conditional on that
            age, so a put or touch racing the sweep saves it). A blob
            referenced after the mark was put after (grace - flush time) ago,
            so it is young when swept. Runs on one node at a time (the caller
            decides; the node runs its periodic GC only while Raft leader).
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from objstore import api, placement
from objstore.api import (
    BLOB_BYTES_MAX,
    HAS_BATCH_MAX,
    BlobCorrupt,
    BlobError,
    BlobNotFound,
    CopyInfo,
    GcResult,
    InvalidBlob,
    LocateResult,
    NotEnoughReplicas,
    PutResult,
    Replica,
    ReplicaUnavailable,
    ScrubResult,
    blob_hash,
    check_hash,
    iter_all,
)
from objstore.hints import HintLog
from objstore.pack import EncodedBlob

log = logging.getLogger("floe.objstore")

# Read repairs waiting at once (each holds a whole blob in memory).
REPAIRS_QUEUED_MAX = 64

T = TypeVar("T")


class LiveSetProvider(Protocol):
    """Names every blob something still references (volumes, snapshots, clones, pins)."""

    def live_blobs(self) -> Iterable[bytes]: ...


class RateLimiter:
    """Token bucket: `take(n)` blocks until n units fit under `rate` per second."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._tokens = self.burst
        self._t = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: float, stop: threading.Event | None = None) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
            self._t = now
            self._tokens -= n
            wait_s = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait_s > 0:
            if stop is not None:
                stop.wait(wait_s)
            else:
                time.sleep(wait_s)


@dataclass(slots=True)
class _Reads(Generic[T]):
    """What a hedged read found: the first good answer, and the replicas
    that had no good copy (bad) or could not be asked (unreachable)."""

    found: bool = False
    value: T | None = None
    node: str = ""
    bad: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)
    stopped: bool = False  # a bad answer ended the search (a ranged read falls back)


class BlobCluster:
    def __init__(self, node_id: str, replicas: dict[str, Replica], hints: HintLog, *,
                 r: int = 3, w: int = 2, hedge_after_s: float = 0.05,
                 live_set: LiveSetProvider | None = None, gc_grace_s: float = 3600.0,
                 peer_scrub: Callable[[str], ScrubResult] | None = None,
                 repair_bytes_per_s: float = 64 << 20, scrub_bytes_per_s: float = 32 << 20,
                 gc_deletes_per_s: float = 2000.0, late_ack_grace_s: float = 0.02,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= w <= r:
            raise ValueError(f"need 1 <= w <= r, got w={w} r={r}")
        self.node_id = node_id
        self.replicas = replicas
        self.nodes = sorted(replicas)
        self.local: Replica | None = replicas.get(node_id)
        self.hints = hints
        self.r, self.w = r, w
        self.hedge_after_s = hedge_after_s
        self.late_ack_grace_s = late_ack_grace_s
        self._monotonic = monotonic  # GC's sweep clock (tests pass the replicas' fake clock)
        self._local_put_verified = self.local is not None and "verified" in inspect.signature(
            self.local.put).parameters
        self._local_checks_hash = bool(getattr(self.local, "checks_content_hash", False))
        local_put_many = getattr(self.local, "put_many", None)
        self._local_put_many_verified = local_put_many is not None and "verified" in inspect.signature(
            local_put_many).parameters
        local_encoded = getattr(self.local, "put_many_encoded", None)
        self._local_encoded_verified = callable(local_encoded) and "verified" in inspect.signature(
            local_encoded).parameters
        self.live_set = live_set
        self.gc_grace_s = gc_grace_s
        self.peer_scrub = peer_scrub
        self.repair_limit = RateLimiter(repair_bytes_per_s, burst=max(repair_bytes_per_s, 4 << 20))
        self.scrub_limit = RateLimiter(scrub_bytes_per_s, burst=max(scrub_bytes_per_s, 4 << 20))
        self.gc_limit = RateLimiter(gc_deletes_per_s)
        self._pool = ThreadPoolExecutor(max_workers=24, thread_name_prefix="blob-io")
        self._repair_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="blob-repair")
        self._counters: collections.Counter[str] = collections.Counter()
        self._repairs_queued = 0
        self._scrub_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._repair_owed = 0
        self._down_until: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gc_lock = threading.Lock()

    # ---------------------------------------------------------------- helpers

    def count(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self._counters[name] += n

    def counters(self) -> dict[str, int]:
        with self._counter_lock:
            out = dict(self._counters)
        out["hints_pending"] = self.hints.count()
        return out

    def repair_backlog(self) -> int:
        return self.hints.count() + self._repair_owed

    def placement(self, h: bytes) -> list[str]:
        return placement.replicas(h, self.nodes, self.r)

    def _mark_down(self, node: str, seconds: float = 2.0) -> None:
        self._down_until[node] = time.monotonic() + seconds

    def _is_down(self, node: str) -> bool:
        return self._down_until.get(node, 0.0) > time.monotonic()

    # ---------------------------------------------------------------- put

    def put(self, data: bytes, h: bytes) -> PutResult:
        check_hash(h)
        if len(data) > BLOB_BYTES_MAX:
            raise InvalidBlob(f"blob of {len(data)} bytes exceeds the limit of {BLOB_BYTES_MAX}")
        if blob_hash(data) != h:
            raise InvalidBlob("data does not match its SHA-256")
        targets = self.placement(h)
        need = min(self.w, len(targets))
        # A replica that failed moments ago is not sent to (so a hung node does
        # not pin pool threads); it is owed a copy by hint, unless skipping it
        # would leave too few to reach W.
        up = [t for t in targets if not self._is_down(t)]
        if len(up) < need:
            up = list(targets)
        errors: dict[str, str] = {t: "marked down; owed by hint" for t in targets if t not in up}
        futs: dict[Future[bool], str] = {self._pool.submit(self._put_to, t, data, h): t for t in up}
        stored: list[str] = []
        existed = False
        pending_futs = set(futs)
        while pending_futs and len(stored) < need:
            done, pending_futs = wait(pending_futs, return_when=FIRST_COMPLETED)
            for f in done:
                node = futs[f]
                try:
                    existed = f.result() or existed
                    stored.append(node)
                except Exception as e:  # noqa: BLE001 - any replica failure counts against W
                    errors[node] = f"{type(e).__name__}: {e}"
                    if isinstance(e, ReplicaUnavailable):
                        self._mark_down(node)
        if pending_futs and len(stored) >= need and self.late_ack_grace_s > 0:
            # The others are usually a fraction of a millisecond behind; a
            # short wait for them is cheaper than a synced hint write.
            done, pending_futs = wait(pending_futs, timeout=self.late_ack_grace_s)
            for f in done:
                node = futs[f]
                try:
                    existed = f.result() or existed
                    stored.append(node)
                except Exception as e:  # noqa: BLE001 - owed, below
                    errors[node] = f"{type(e).__name__}: {e}"
                    if isinstance(e, ReplicaUnavailable):
                        self._mark_down(node)
        if len(stored) < need:
            self.count("put_failed")
            detail = "; ".join(f"{n}: {m}" for n, m in sorted(errors.items()))
            raise NotEnoughReplicas(
                f"blob stored on {len(stored)} of {len(targets)} replicas, need {need} ({detail})")
        owed = [futs[f] for f in pending_futs] + [n for n in errors]
        if owed:
            # Durable before we acknowledge: the copies still owed survive a restart.
            self.hints.add(h, owed)
            self.count("hints_written", len(owed))
            for f in pending_futs:
                f.add_done_callback(functools.partial(self._late_ack, h=h, node=futs[f]))
        self.count("puts")
        return PutResult(hash=h, stored_on=stored, pending=owed, existed=existed)

    def put_many(self, items: Sequence[tuple[bytes, bytes]], *, hashed: bool = False) -> list[PutResult]:
        """put() of every (data, hash) pair, with put()'s guarantees per blob
        (hash and size checked, placed on its own R replicas, stored durably on
        W of them before this returns, the others owed by durable hints) but
        one replica call per node: each node gets one put_many carrying every
        blob placed on it, all nodes at once. A volume flush of 64 segments is
        then 3 calls (the local one and one PutMany per peer) and 3 group
        commits, not 64 puts and 128 RPCs. If any blob misses W the whole
        call fails with NotEnoughReplicas naming it (blobs that did land are
        unreferenced garbage for GC, as after a failed put). `hashed=True`: the
        caller in this process computed each hash from its data just now (a
        volume flush), so it is not computed a second time; the replicas that
        receive the bytes over the network still check it."""
        items = list(items)
        for data, h in items:
            check_hash(h)
            if len(data) > BLOB_BYTES_MAX:
                raise InvalidBlob(f"blob of {len(data)} bytes exceeds the limit of {BLOB_BYTES_MAX}")
            if not hashed and blob_hash(data) != h:
                raise InvalidBlob(f"data does not match its SHA-256 {h.hex()}")
        if not items:
            return []
        targets = [self.placement(h) for _data, h in items]
        need = [min(self.w, len(t)) for t in targets]
        down = {n for n in self.nodes if self._is_down(n)}
        # Per blob as in put(): a replica that failed moments ago is skipped
        # and owed by hint, unless skipping it would leave too few for W.
        by_node: dict[str, list[int]] = collections.defaultdict(list)
        errors: list[dict[str, str]] = []
        for i, placed in enumerate(targets):
            up = [t for t in placed if t not in down]
            if len(up) < need[i]:
                up = list(placed)
            errors.append({t: "marked down; owed by hint" for t in placed if t not in up})
            for t in up:
                by_node[t].append(i)
        # Encoded once here (zstd where it pays; in parallel, zstd releases the GIL)
        # for the replicas that take encoded blobs: compressible data is compressed
        # once instead of by each replica, and crosses the network compressed.
        encoded = (list(self._pool.map(lambda it: EncodedBlob.of(*it), items))
                   if any(callable(getattr(self.replicas[n], "put_many_encoded", None)) for n in by_node)
                   else None)
        futs: dict[Future[list[bool]], str] = {
            self._pool.submit(self._put_many_to, node, [items[i] for i in idxs],
                              [encoded[i] for i in idxs] if encoded is not None else None): node
            for node, idxs in by_node.items()}
        stored: list[list[str]] = [[] for _ in items]
        existed = [False] * len(items)

        def take(done: Iterable[Future[list[bool]]]) -> None:
            for f in done:
                node = futs[f]
                idxs = by_node[node]
                try:
                    flags = f.result()
                except Exception as e:  # noqa: BLE001 - a replica failure counts against W for its blobs
                    for i in idxs:
                        errors[i][node] = f"{type(e).__name__}: {e}"
                    if isinstance(e, ReplicaUnavailable):
                        self._mark_down(node)
                    continue
                for i, flag in zip(idxs, flags, strict=True):
                    stored[i].append(node)
                    existed[i] = existed[i] or flag

        def short() -> bool:
            return any(len(stored[i]) < need[i] for i in range(len(items)))

        pending_futs = set(futs)
        while pending_futs and short():
            done, pending_futs = wait(pending_futs, return_when=FIRST_COMPLETED)
            take(done)
        if pending_futs and not short() and self.late_ack_grace_s > 0:
            done, pending_futs = wait(pending_futs, timeout=self.late_ack_grace_s)
            take(done)
        failed = [i for i in range(len(items)) if len(stored[i]) < need[i]]
        if failed:
            self.count("put_failed", len(failed))
            i = failed[0]
            detail = "; ".join(f"{n}: {m}" for n, m in sorted(errors[i].items()))
            raise NotEnoughReplicas(
                f"{len(failed)} of {len(items)} blobs did not reach {self.w} replicas; blob {items[i][1].hex()} "
                f"stored on {len(stored[i])} of {len(targets[i])} replicas, need {need[i]} ({detail})")
        late = [(n, set(by_node[n])) for n in sorted(futs[f] for f in pending_futs)]
        owed = [[n for n, idxs in late if i in idxs] + list(errors[i]) for i in range(len(items))]
        if any(owed):
            # Durable before we acknowledge, in one synced write for every blob.
            self.hints.add_many((items[i][1], owed[i]) for i in range(len(items)) if owed[i])
            self.count("hints_written", sum(len(o) for o in owed))
            for f in pending_futs:
                node = futs[f]
                f.add_done_callback(functools.partial(
                    self._late_acks, hashes=[items[i][1] for i in by_node[node]], node=node))
        self.count("puts", len(items))
        return [PutResult(hash=h, stored_on=stored[i], pending=owed[i], existed=existed[i])
                for i, (_data, h) in enumerate(items)]

    def _put_many_to(self, node: str, items: list[tuple[bytes, bytes]],
                     encoded: list[EncodedBlob] | None = None) -> list[bool]:
        """One node's share of a put_many, in one call to it, encoded when the
        replica takes encoded blobs (the local store skips the checks:
        put_many checked the hashes and encoded the blobs itself)."""
        rep = self.replicas[node]
        many_encoded = getattr(rep, "put_many_encoded", None)
        if encoded is not None and callable(many_encoded):
            if node == self.node_id and self._local_encoded_verified:
                flags = [bool(x) for x in many_encoded(encoded, verified=True)]
            else:
                flags = [bool(x) for x in many_encoded(encoded)]
        elif node == self.node_id and self._local_put_many_verified:
            flags = [bool(x) for x in rep.put_many(items, verified=True)]  # type: ignore[call-arg]
        elif getattr(rep, "put_many", None) is None:
            flags = [self._put_to(node, data, h) for data, h in items]  # a simple replica: put by put
        else:
            flags = api.put_many(rep, items)
        if len(flags) != len(items):
            raise BlobError(f"{node} answered {len(flags)} results for {len(items)} blobs")
        return flags

    def _late_acks(self, fut: Future[list[bool]], *, hashes: list[bytes], node: str) -> None:
        exc = fut.exception()
        if exc is None:
            for h in hashes:
                self.hints.remove(h, node)
        elif isinstance(exc, ReplicaUnavailable):
            self._mark_down(node)

    def _put_to(self, node: str, data: bytes, h: bytes) -> bool:
        rep = self.replicas[node]
        if node == self.node_id and self._local_put_verified:
            return bool(rep.put(data, h, verified=True))  # type: ignore[call-arg]
        return rep.put(data, h)

    def _late_ack(self, fut: Future[bool], *, h: bytes, node: str) -> None:
        if fut.exception() is None:
            self.hints.remove(h, node)
        elif isinstance(fut.exception(), ReplicaUnavailable):
            self._mark_down(node)

    # ---------------------------------------------------------------- get

    def _read_candidates(self, h: bytes) -> list[str]:
        placed = self.placement(h)
        order = [n for n in placed if n == self.node_id] + [n for n in placed if n != self.node_id]
        up = [n for n in order if not self._is_down(n)] + [n for n in order if self._is_down(n)]
        return up + [n for n in self.nodes if n not in placed]

    def _checks_own_hash(self, node: str) -> bool:
        """True when `node` is this node and its store's whole-blob get checks
        the content hash itself (api.Replica.checks_content_hash)."""
        return node == self.node_id and self._local_checks_hash

    def _wrong_content(self, node: str, h: bytes) -> BlobCorrupt:
        """The store's record checksum held but the content is wrong: have
        the replica verify (and quarantine) its copy; the copy is corrupt."""
        try:
            self.replicas[node].verify(h)
        except BlobError:
            pass
        return BlobCorrupt(f"copy on {node} does not match its SHA-256")

    def _fetch(self, node: str, h: bytes) -> bytes:
        data = self.replicas[node].get(h)
        if self._checks_own_hash(node):
            return data  # this node's store compared SHA-256(data) with h as it read the copy
        if blob_hash(data) != h:
            raise self._wrong_content(node, h)
        return data

    def _fetch_range(self, node: str, h: bytes, offset: int, length: int) -> tuple[bytes, int]:
        """(the range, the blob's size) from one replica, checked there by the
        copy's record crc32c. A range that turns out to be the whole blob is
        checked against h as well, like any whole read."""
        data, size = api.get_range(self.replicas[node], h, offset, length)
        if offset > size or (length and offset + length > size):
            raise InvalidBlob(f"range {offset}+{length} is beyond the blob's {size} bytes")
        want = length or size - offset
        if len(data) != want:
            raise BlobCorrupt(f"{node} served {len(data)} bytes for a {want}-byte range of {h.hex()}")
        if offset == 0 and want == size and not self._checks_own_hash(node) and blob_hash(data) != h:
            raise self._wrong_content(node, h)
        return data, size

    def _hedged(self, h: bytes, read: Callable[[str], T], *, exclude: Iterable[str] = (),
                stop_on_bad: Callable[[str], bool] | None = None, invalid_is_final: bool = False) -> _Reads[T]:
        """Ask the read candidates in order, one at a time, with a hedged
        second request when one has not answered within hedge_after_s, until
        one answers. NotFound/Corrupt answers are `bad` (and end the search
        when stop_on_bad says so); any other failure is `unreachable`, and a
        ReplicaUnavailable marks the node down. InvalidBlob (a wrong range)
        ends the search and is raised when invalid_is_final.

        This node's own copy, when it is the first candidate, is read in the
        calling thread, not hedged: a pread from the local pack store costs
        less than the hand-off to a pool thread and back (a third of a random
        4 KiB read's time), and a local disk that hangs stalls this node's
        writes anyway. If it fails, the others are asked as above."""
        skip = set(exclude)
        candidates = [n for n in self._read_candidates(h) if n not in skip]
        out: _Reads[T] = _Reads()

        def settle(node: str, answer: Callable[[], T]) -> None:
            try:
                value = answer()
            except (BlobNotFound, BlobCorrupt) as e:
                out.bad.append(node)
                out.errors[node] = f"{type(e).__name__}: {e}"
                if isinstance(e, BlobCorrupt):
                    self.count("corrupt_found")
                if stop_on_bad is not None and stop_on_bad(node):
                    out.stopped = True
            except Exception as e:  # noqa: BLE001 - unreachable replica: try the next
                if invalid_is_final and isinstance(e, InvalidBlob):
                    raise
                out.errors[node] = f"{type(e).__name__}: {e}"
                out.unreachable.append(node)
                if isinstance(e, ReplicaUnavailable):
                    self._mark_down(node)
            else:
                if not out.found:
                    out.found, out.value, out.node = True, value, node

        if candidates and candidates[0] == self.node_id and self.local is not None \
                and not self._is_down(self.node_id):
            node = candidates.pop(0)
            settle(node, lambda: read(node))
            if out.found or out.stopped:
                return out
        it = iter(candidates)
        futs: dict[Future[T], str] = {}
        pending: set[Future[T]] = set()

        def launch() -> bool:
            for node in it:
                f = self._pool.submit(read, node)
                futs[f] = node
                pending.add(f)
                return True
            return False

        launch()
        while pending and not out.found and not out.stopped:
            done, _ = wait(set(pending), timeout=self.hedge_after_s, return_when=FIRST_COMPLETED)
            if not done:
                if launch():  # the hedge: ask the next replica too
                    self.count("hedged_reads")
                continue
            for f in done:
                pending.discard(f)
                settle(futs[f], f.result)
            if not out.found and not out.stopped and not pending:
                launch()
        return out

    def fetch_verified(self, h: bytes, exclude: Iterable[str] = ()) -> tuple[bytes, str]:
        """The whole blob from the best replica (hedged), repairing bad copies
        met on the way. BlobNotFound only when every replica asked answered
        that it has no good copy; ReplicaUnavailable when some could not be
        asked (the blob may well exist)."""
        check_hash(h)
        r = self._hedged(h, lambda node: self._fetch(node, h), exclude=exclude)
        if not r.found or r.value is None:
            raise self._no_copy(h, r)
        data = r.value
        placed = set(self.placement(h))
        for node in r.bad:
            if node in placed:
                self._submit_repair(node, data, h)
        return data, r.node

    @staticmethod
    def _no_copy(h: bytes, r: _Reads[Any]) -> BlobError:
        detail = "; ".join(f"{n}: {m}" for n, m in sorted(r.errors.items())) or "no replicas"
        if r.unreachable:
            return ReplicaUnavailable(f"no good copy of {h.hex()} reachable ({detail})")
        return BlobNotFound(f"no good copy of {h.hex()} ({detail})")

    def _submit_repair(self, node: str, data: bytes, h: bytes) -> None:
        """Queue a read repair, unless too many are queued (each holds a blob);
        what is dropped here the repair scanner finds later."""
        with self._counter_lock:
            if self._repairs_queued >= REPAIRS_QUEUED_MAX:
                self._counters["read_repairs_dropped"] += 1
                return
            self._repairs_queued += 1

        def run() -> None:
            try:
                self._repair_copy(node, data, h, "read_repairs")
            finally:
                with self._counter_lock:
                    self._repairs_queued -= 1

        self._repair_pool.submit(run)

    def _repair_copy(self, node: str, data: bytes, h: bytes, counter: str) -> bool:
        try:
            self.replicas[node].put(data, h)
        except Exception as e:  # noqa: BLE001 - repair is retried by the repair scanner
            log.warning("event=repair_copy_failed node=%s hash=%s error=%s", node, h.hex(), e)
            return False
        self.count(counter)
        log.info("event=%s node=%s hash=%s", counter.rstrip("s"), node, h.hex())
        return True

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> tuple[bytes, int, str]:
        """(the range [offset, offset+length) (length 0: to the end), the
        blob's size, the node that served it). The whole blob (offset 0,
        length 0) is read and checked against its SHA-256; any other range
        is read alone, see _read_range."""
        check_hash(h)
        if offset < 0 or length < 0:
            raise InvalidBlob(f"bad range offset={offset} length={length}")
        if offset or length:
            ranged = self._read_range(h, offset, length)
            if ranged is not None:
                self.count("gets")
                return ranged
        data, served_by = self.fetch_verified(h)
        size = len(data)
        if offset > size or (length and offset + length > size):
            raise InvalidBlob(f"range {offset}+{length} is beyond the blob's {size} bytes")
        self.count("gets")
        end = offset + length if length else size
        return (data if offset == 0 and end == size else data[offset:end]), size, served_by

    def _read_range(self, h: bytes, offset: int, length: int) -> tuple[bytes, int, str] | None:
        """Just the range, from the best replica (local first, hedged, failing
        over like fetch_verified), verified there by the copy's record crc32c
        and not hashed here: DESIGN.md §5 has volumes fetch only the blob
        ranges they need, and a 4 KiB read must not pull and hash a 1 MiB
        blob. (A range that is the whole blob is hashed.) None when a
        placed replica answered that its copy is missing or corrupt: the
        caller then takes the whole-blob path, which verifies the content
        hash and repairs that copy. Raises ReplicaUnavailable when no replica
        could be asked, BlobNotFound when none holds it, InvalidBlob for a
        range beyond the blob."""
        placed = set(self.placement(h))
        r = self._hedged(h, lambda node: self._fetch_range(node, h, offset, length),
                         stop_on_bad=lambda node: node in placed, invalid_is_final=True)
        if r.found and r.value is not None:
            data, size = r.value
            self.count("ranged_gets")
            return data, size, r.node
        if r.stopped:
            self.count("ranged_fallbacks")
            log.info("event=ranged_read_fallback hash=%s errors=%s", h.hex(),
                     "; ".join(f"{n}: {m}" for n, m in sorted(r.errors.items())))
            return None
        raise self._no_copy(h, r)

    # ---------------------------------------------------------------- locate

    def locate(self, h: bytes) -> LocateResult:
        check_hash(h)
        placed = set(self.placement(h))
        futs = {n: self._pool.submit(self.replicas[n].verify, h) for n in self.nodes}
        copies: list[CopyInfo] = []
        size = 0
        for n in self.nodes:
            try:
                v = futs[n].result()
            except Exception as e:  # noqa: BLE001 - reported per copy
                copies.append(CopyInfo(node=n, placed=n in placed, present=False, verified=False,
                                       error=f"{type(e).__name__}: {e}"))
                continue
            if v.info is not None:
                size = size or v.info.size
            copies.append(CopyInfo(node=n, placed=n in placed, present=v.present, verified=v.verified,
                                   stored_size=v.info.stored_size if v.info else 0,
                                   compression=v.info.compression if v.info else "", error=v.error))
        if not any(c.present for c in copies):
            raise BlobNotFound(f"no node holds {h.hex()}")
        return LocateResult(hash=h, size=size, copies=copies)

    # ---------------------------------------------------------------- scrub

    def scrub(self, all_nodes: bool = False) -> ScrubResult:
        res = self._scrub_local()
        if all_nodes and self.peer_scrub is not None:
            for n in self.nodes:
                if n == self.node_id:
                    continue
                try:
                    p = self.peer_scrub(n)
                except Exception as e:  # noqa: BLE001 - a down node is reported, not fatal
                    log.warning("event=scrub_peer_failed node=%s error=%s", n, e)
                    continue
                res = ScrubResult(res.checked + p.checked, res.corrupt + p.corrupt,
                                  res.repaired + p.repaired, res.unrepaired + p.unrepaired)
        return res

    def _scrub_local(self) -> ScrubResult:
        if self.local is None:
            return ScrubResult()
        if not self._scrub_lock.acquire(blocking=False):
            raise BlobError(f"a scrub is already running on {self.node_id}; try again when it is done")
        try:
            return self._scrub_pass()
        finally:
            self._scrub_lock.release()

    def _scrub_pass(self) -> ScrubResult:
        if self.local is None:
            return ScrubResult()
        checked = corrupt = repaired = unrepaired = 0
        for info in iter_all(self.local):
            if self._stop.is_set():
                break
            self.scrub_limit.take(max(info.stored_size, 1), self._stop)
            v = self.local.verify(info.hash)
            checked += 1
            self.count("scrubbed")
            if not v.present or v.verified:
                continue
            corrupt += 1
            self.count("scrub_corrupt")
            log.warning("event=scrub_corrupt node=%s hash=%s error=%s", self.node_id, info.hash.hex(), v.error)
            try:
                data, src = self.fetch_verified(info.hash, exclude=[self.node_id])
            except BlobError as e:
                unrepaired += 1
                log.error("event=scrub_unrepairable node=%s hash=%s error=%s", self.node_id, info.hash.hex(), e)
                continue
            if self._repair_copy(self.node_id, data, info.hash, "scrub_repaired"):
                repaired += 1
                log.info("event=scrub_repaired hash=%s from=%s", info.hash.hex(), src)
            else:
                unrepaired += 1
        return ScrubResult(checked, corrupt, repaired, unrepaired)

    # ---------------------------------------------------------------- hints and repair

    def deliver_hints(self, limit: int = 256) -> int:
        """Deliver owed copies; returns how many were delivered.

        Delivery is always a put, never a `has` check: a put of content the
        target already holds refreshes that copy's age, which GC relies on (a
        blob put again is young everywhere it is owed)."""
        delivered = 0
        down = [t for t in self.nodes if self._is_down(t)]
        for target, h, _created in self.hints.pending(limit, skip_targets=down):
            if self._stop.is_set():
                break
            if target not in self.replicas:
                self.hints.remove(h, target)  # no longer a member
                continue
            if self._is_down(target):
                continue
            try:
                data, _src = self.fetch_verified(h, exclude=[target])
            except BlobNotFound:
                # Every other replica answered and none has a good copy.
                log.error("event=hint_dropped target=%s hash=%s reason=no_copy_anywhere", target, h.hex())
                self.hints.remove(h, target)
                continue
            except BlobError as e:
                log.info("event=hint_deferred target=%s hash=%s reason=%s", target, h.hex(), e)
                continue  # no source reachable now; try again next pass
            self.repair_limit.take(len(data), self._stop)
            if self._repair_copy(target, data, h, "hints_delivered"):
                self.hints.remove(h, target)
                delivered += 1
            else:
                self._mark_down(target)
        return delivered

    def repair_pass(self) -> int:
        """One walk of the local store: copy each blob to placed replicas that
        lack it. Returns copies made."""
        if self.local is None:
            return 0
        copied = 0
        owed_seen = 0
        page: list[bytes] = []

        def flush_page() -> None:
            nonlocal copied, owed_seen
            by_target: dict[str, list[bytes]] = collections.defaultdict(list)
            for h in page:
                for t in self.placement(h):
                    if t != self.node_id:
                        by_target[t].append(h)
            for t, hashes in by_target.items():
                if self._stop.is_set():
                    return
                if self._is_down(t):
                    continue  # counted as owed on the next pass that reaches it
                try:
                    present = self.replicas[t].has(hashes)
                except BlobError:
                    self._mark_down(t)
                    continue
                missing = [h for h, p in zip(hashes, present, strict=True) if not p]
                owed_seen += len(missing)
                self._repair_owed = max(self._repair_owed, owed_seen - copied)
                for h in missing:
                    if self._stop.is_set():
                        return
                    try:
                        data = self.local.get(h) if self.local is not None else b""
                    except BlobError:
                        continue  # deleted or corrupt here; the scrubber handles it
                    self.repair_limit.take(len(data), self._stop)
                    if self._repair_copy(t, data, h, "repair_copied"):
                        copied += 1
                    else:
                        self._mark_down(t)
                        break

        for info in iter_all(self.local):
            if self._stop.is_set():
                break
            page.append(info.hash)
            self.count("repair_checked")
            if len(page) >= min(HAS_BATCH_MAX, 512):
                flush_page()
                page = []
        if page:
            flush_page()
        self._repair_owed = max(0, owed_seen - copied)
        return copied

    # ---------------------------------------------------------------- gc

    def gc(self, dry_run: bool = False, grace_s: float | None = None) -> GcResult:
        """One mark-and-sweep pass (module doc). `grace_s` may only lengthen
        the configured grace period, never shorten it: a shorter one could
        take blobs a flush has written but not yet committed."""
        if self.live_set is None:
            raise BlobError("no live-set provider is configured on this node; GC refuses to guess")
        grace = max(self.gc_grace_s, grace_s or 0.0)
        if not self._gc_lock.acquire(blocking=False):
            raise BlobError("a GC is already running on this node; try again when it is done")
        try:
            return self._gc(dry_run, grace)
        finally:
            self._gc_lock.release()

    def _gc(self, dry_run: bool, grace: float) -> GcResult:
        live = set(self.live_set.live_blobs()) if self.live_set is not None else set()  # mark first
        marked = self._monotonic()
        examined = young = deleted = deleted_bytes = 0
        unreachable: list[str] = []
        for node in self.nodes:
            rep = self.replicas[node]
            try:
                for info in iter_all(rep):
                    if self._stop.is_set():
                        raise BlobError("node stopping")
                    examined += 1
                    if info.hash in live:
                        continue
                    # A blob referenced after the mark was put (refreshed) at
                    # most a flush's time before it, so it is younger than
                    # grace + (time since the mark): a sweep that runs long
                    # must not outlast the grace period it relies on.
                    min_age = grace + (self._monotonic() - marked)
                    if info.age_s <= min_age:
                        young += 1
                        continue
                    if dry_run:
                        deleted += 1
                        deleted_bytes += info.stored_size
                        continue
                    self.gc_limit.take(1, self._stop)
                    if self._stop.is_set():
                        raise BlobError("node stopping")
                    if rep.delete(info.hash, min_age_s=grace + (self._monotonic() - marked)):
                        deleted += 1
                        deleted_bytes += info.stored_size
                        self.count("gc_deleted")
                    else:
                        young += 1
            except BlobError as e:
                log.warning("event=gc_node_unreachable node=%s error=%s", node, e)
                unreachable.append(node)
        self.count("gc_runs")
        log.info("event=gc_done dry_run=%s live=%d examined=%d young=%d deleted=%d bytes=%d unreachable=%s",
                 dry_run, len(live), examined, young, deleted, deleted_bytes, ",".join(unreachable))
        return GcResult(live=len(live), examined=examined, young=young, deleted=deleted,
                        deleted_bytes=deleted_bytes, unreachable=unreachable)

    # ---------------------------------------------------------------- background loops

    def start(self, *, hint_interval_s: float = 1.0, repair_interval_s: float = 60.0,
              scrub_interval_s: float = 86400.0, gc_interval_s: float = 0.0,
              gc_allowed: Callable[[], bool] = lambda: False,
              compact_interval_s: float = 0.0, compact_dead_fraction: float = 0.5) -> None:
        """Run the background workers (interval 0 = that worker off)."""
        def loop(name: str, interval: float, fn: Callable[[], object]) -> None:
            while not self._stop.wait(interval):
                try:
                    fn()
                except Exception:
                    log.exception("event=background_failed worker=%s", name)

        def gc_if_allowed() -> None:
            if gc_allowed() and self.live_set is not None:
                self.gc()

        def compact() -> None:
            compact_fn = getattr(self.local, "compact", None)
            if compact_fn is not None:
                n = compact_fn(compact_dead_fraction)
                if n:
                    self.count("packs_compacted", n)

        for name, interval, fn in (("hints", hint_interval_s, self.deliver_hints),
                                   ("compact", compact_interval_s, compact),
                                   ("repair", repair_interval_s, self.repair_pass),
                                   ("scrub", scrub_interval_s, lambda: self.scrub(all_nodes=False)),
                                   ("gc", gc_interval_s, gc_if_allowed)):
            if interval > 0:
                t = threading.Thread(target=loop, args=(name, interval, fn), name=f"blob-{name}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._repair_pool.shutdown(wait=False, cancel_futures=True)
