"""The blob service (objstore/service.py) and its clients (objstore/remote.py)
on an in-process gRPC server bound to an ephemeral port.

Every byte from the network is untrusted (DESIGN.md §9): each malformed
request gets a clean gRPC status, nothing wrong is ever stored, and the server
keeps serving. The store behind the service is the real LocalStore
(objstore/pack.py) in tmp_path, and again an in-memory fake with the same
methods, which can also be told to corrupt a copy or to fail; the coordinator
is a fake that records what it was asked.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from objstore import api
from objstore.api import (
    BLOB_BYTES_MAX,
    CHUNK_BYTES,
    HAS_BATCH_MAX,
    LIST_LIMIT_MAX,
    BlobCorrupt,
    BlobInfo,
    BlobNotFound,
    InvalidBlob,
    NotEnoughReplicas,
    PutResult,
    ReplicaUnavailable,
    VerifyResult,
    blob_hash,
)
from objstore.pack import LocalStore
from objstore.remote import BlobClient, RemoteReplica, ReplicaTokenRejected, TokenRejected
from objstore.service import TOKEN_METADATA, BlobService, StreamWatchdog, serve_blobs, start_blob_server
from proto import blob_pb2, blob_pb2_grpc

TOKEN = "admin-secret"
MD = ((TOKEN_METADATA, TOKEN),)
CALL_S = 10.0
Code = grpc.StatusCode
# Every service test runs over the real pack store and over the fake, so the
# service relies on nothing but the store's documented behaviour.
STORES = ["pack", "fake"]


# ---------------------------------------------------------------- fakes


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """LocalStore's methods over a dict; `corrupt(h)` makes reads of h fail
    their checksum, `fail` makes every call raise it (an unexpected error)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.blobs: dict[bytes, tuple[bytes, float]] = {}
        self.corrupted: set[bytes] = set()
        self.fail: Exception | None = None
        self.lock = threading.Lock()
        self.put_many_calls: list[int] = []

    def _check(self) -> None:
        if self.fail is not None:
            raise type(self.fail)(*self.fail.args)  # a fresh one each time, as a real failure would be

    def put(self, data: bytes, h: bytes) -> bool:
        self._check()
        api.check_hash(h)
        if len(data) > BLOB_BYTES_MAX or blob_hash(data) != h:
            raise InvalidBlob("data does not match its hash")
        with self.lock:
            existed = h in self.blobs
            self.blobs[h] = (bytes(data), self.clock())
            return existed

    def put_many(self, items: list[tuple[bytes, bytes]]) -> list[bool]:
        """Every item checked before any is stored, as LocalStore does; the
        sizes of the calls are kept in put_many_calls."""
        self._check()
        for data, h in items:
            api.check_hash(h)
            if len(data) > BLOB_BYTES_MAX or blob_hash(data) != h:
                raise InvalidBlob("data does not match its hash")
        self.put_many_calls.append(len(items))
        return [self.put(data, h) for data, h in items]

    def put_many_encoded(self, items: list[Any]) -> list[bool]:
        """Encoded blobs checked as LocalStore checks them (objstore.pack.check_encoded),
        every one before any is stored, then kept decoded."""
        from objstore.pack import COMPRESSION_ZSTD, check_encoded

        self._check()
        for b in items:
            check_encoded(b, verified=False)
        self.put_many_calls.append(len(items))
        return [self.put(zstandard.ZstdDecompressor().decompress(b.stored, max_output_size=b.size)
                         if b.compression == COMPRESSION_ZSTD else b.stored, b.hash) for b in items]

    def put_file(self, f: BinaryIO, h: bytes, size: int) -> bool:
        buf = io.BytesIO()
        left = size
        while left:
            piece = f.read(min(left, CHUNK_BYTES))
            if not piece:
                break
            buf.write(piece)
            left -= len(piece)
        return self.put(buf.getvalue(), h)

    def _data(self, h: bytes) -> bytes:
        self._check()
        if h not in self.blobs:
            raise BlobNotFound(h.hex())
        if h in self.corrupted:
            raise BlobCorrupt(h.hex())
        return self.blobs[h][0]

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> bytes:
        data = self._data(h)
        if offset > len(data) or (length and offset + length > len(data)):
            raise InvalidBlob("range beyond the blob")
        return data[offset:offset + length] if length else data[offset:]

    def read_iter(self, h: bytes, offset: int = 0, length: int = 0,
                  chunk: int = CHUNK_BYTES) -> tuple[int, Iterator[bytes]]:
        data = self.get(h, offset, length)
        return len(self.blobs[h][0]), iter([data[i:i + chunk] for i in range(0, len(data), chunk)])

    def has(self, hashes: Iterable[bytes]) -> list[bool]:
        self._check()
        return [h in self.blobs for h in hashes]

    def touch(self, h: bytes) -> bool:
        if h in self.blobs:
            self.blobs[h] = (self.blobs[h][0], self.clock())
            return True
        return False

    def delete(self, h: bytes, min_age_s: float = 0.0) -> bool:
        self._check()
        with self.lock:
            if h in self.blobs and self.clock() - self.blobs[h][1] >= min_age_s:
                del self.blobs[h]
                return True
            return False

    def info(self, h: bytes) -> BlobInfo | None:
        self._check()
        if h not in self.blobs:
            return None
        data, t = self.blobs[h]
        return BlobInfo(h, len(data), len(data), "none", self.clock() - t)

    def list(self, after: bytes = b"", limit: int = 1000) -> list[BlobInfo]:
        self._check()
        return [i for i in (self.info(h) for h in sorted(self.blobs) if h > after)][:limit]  # type: ignore[misc]

    def verify(self, h: bytes) -> VerifyResult:
        info = self.info(h)
        if info is None:
            return VerifyResult(False, False, None)
        if h in self.corrupted:
            return VerifyResult(True, False, info, "checksum mismatch")
        return VerifyResult(True, True, info)

    def stats(self) -> dict[str, int]:
        self._check()
        n = sum(len(d) for d, _ in self.blobs.values())
        return {"blobs": len(self.blobs), "bytes": n, "stored_bytes": n, "pack_bytes": n, "packs": 1,
                "compactions": 3, "puts": 5}

    def compact(self, dead_fraction: float = 0.5) -> int:
        return 0

    def close(self) -> None:
        pass


class FakeCoordinator:
    """The cluster calls over a store of its own (the 'cluster'). `gate`, when
    cleared, holds puts so tests can count how many are in flight."""

    node_id = "n1"

    def __init__(self) -> None:
        self.store = FakeStore()
        self.fail_puts = False
        self.tamper = False
        self.gate = threading.Event()
        self.gate.set()
        self.inflight = 0
        self.inflight_max = 0
        self.lock = threading.Lock()
        self.gc_calls: list[tuple[bool, float | None]] = []

    def put(self, data: bytes, h: bytes) -> PutResult:
        if self.fail_puts:
            raise NotEnoughReplicas("1 of 2 replicas acknowledged")
        with self.lock:
            self.inflight += 1
            self.inflight_max = max(self.inflight_max, self.inflight)
        try:
            self.gate.wait(CALL_S)
            existed = self.store.put(data, h)
        finally:
            with self.lock:
                self.inflight -= 1
        return PutResult(h, ["n1", "n2"], ["n3"], existed)

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> tuple[bytes, int, str]:
        data = self.store.get(h, offset, length)
        if self.tamper:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data, len(self.store.blobs[h][0]), "n2"

    def locate(self, h: bytes) -> api.LocateResult:
        info = self.store.info(h)
        if info is None:
            raise BlobNotFound(h.hex())
        return api.LocateResult(h, info.size, [
            api.CopyInfo("n1", True, True, True, info.size, "none"),
            api.CopyInfo("n2", True, False, False, error="missing")])

    def scrub(self, all_nodes: bool = False) -> api.ScrubResult:
        return api.ScrubResult(checked=len(self.store.blobs) * (3 if all_nodes else 1), corrupt=1, repaired=1)

    def gc(self, dry_run: bool = False, grace_s: float | None = None) -> api.GcResult:
        self.gc_calls.append((dry_run, grace_s))
        return api.GcResult(live=2, examined=6, young=1, deleted=3, deleted_bytes=300, unreachable=["n3"])

    def repair_backlog(self) -> int:
        return 7

    def counters(self) -> dict[str, int]:
        return {"puts": 11, "read_repairs": 2}


# ---------------------------------------------------------------- a node in this process


@dataclass
class Node:
    address: str
    store: Any
    coordinator: FakeCoordinator | None
    service: BlobService
    tmp_dir: str
    clock: Clock
    channels: list[grpc.Channel] = field(default_factory=list)

    def stub(self) -> blob_pb2_grpc.BlobServiceStub:
        ch = grpc.insecure_channel(self.address, options=[("grpc.enable_retries", 0)])
        self.channels.append(ch)
        return blob_pb2_grpc.BlobServiceStub(ch)

    def hashes(self) -> set[bytes]:
        """Every blob on the node's store and in the fake cluster."""
        out = {i.hash for i in self.store.list(b"", LIST_LIMIT_MAX)}
        if self.coordinator is not None:
            out |= set(self.coordinator.store.blobs)
        return out


@contextmanager
def running_node(tmp: Path, kind: str = "fake", *, coordinator: bool = True, threads: int = 16,
                 watchdog: StreamWatchdog | None = None, large_put_wait_s: float = 30.0) -> Iterator[Node]:
    clock = Clock()
    store: Any = FakeStore(clock) if kind == "fake" else LocalStore(str(tmp / "store"), "n1", clock=clock)
    coord = FakeCoordinator() if coordinator else None
    tmp_dir = str(tmp / "tmp")
    service = BlobService(store, coord, TOKEN, "n1", tmp_dir, watchdog=watchdog,
                          large_put_wait_s=large_put_wait_s)
    server, port = start_blob_server(service, "127.0.0.1:0", threads)
    node = Node(f"127.0.0.1:{port}", store, coord, service, tmp_dir, clock)
    try:
        yield node
    finally:
        for ch in node.channels:
            ch.close()
        server.stop(0).wait(5)
        service.close()
        store.close()


@pytest.fixture(params=STORES)
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    with running_node(tmp_path, request.param) as n:
        yield n


@pytest.fixture
def fake_node(tmp_path: Path) -> Iterator[Node]:
    with running_node(tmp_path, "fake") as n:
        yield n


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status a raw stub call ends with (streams are drained)."""
    try:
        r = call()
        if isinstance(r, Iterator):
            for _ in r:
                pass
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return Code.OK


def put_msgs(stub: blob_pb2_grpc.BlobServiceStub, msgs: list[Any], md: Any = MD) -> Any:
    return stub.Put(iter(msgs), timeout=CALL_S, metadata=md)


def put_stream(data: bytes, *, h: bytes | None = None, size: int | None = None, replicate: bool = False,
               piece: int = CHUNK_BYTES) -> list[Any]:
    pieces = [data[i:i + piece] for i in range(0, len(data), piece)] or [b""]
    msgs = [blob_pb2.PutRequest(data=p) for p in pieces]
    msgs[0].hash = blob_hash(data) if h is None else h
    msgs[0].size = len(data) if size is None else size
    msgs[0].replicate = replicate
    return msgs


def assert_healthy(node: Node) -> None:
    """A good put and get still work, and every stored blob matches its hash."""
    with RemoteReplica("n1", node.address, TOKEN, timeout_s=CALL_S) as r:
        data = os.urandom(1000)
        r.put(data, blob_hash(data))
        assert r.get(blob_hash(data)) == data
    for info in node.store.list(b"", LIST_LIMIT_MAX):
        assert blob_hash(node.store.get(info.hash)) == info.hash
    if node.coordinator is not None:
        for h, (d, _t) in node.coordinator.store.blobs.items():
            assert blob_hash(d) == h


# ---------------------------------------------------------------- round trips


def test_replica_calls_round_trip_through_remote_replica(node: Node) -> None:
    with RemoteReplica("n1", node.address, TOKEN, timeout_s=CALL_S) as r:
        small, big, empty = b"hello blob", os.urandom(CHUNK_BYTES * 3 + 17), b""
        for data in (small, big, empty):
            assert r.put(data, blob_hash(data)) is False
        assert r.put(small, blob_hash(small)) is True  # deduplicated
        assert node.store.get(blob_hash(big)) == big
        assert r.get(blob_hash(big)) == big
        assert r.get(blob_hash(empty)) == b""
        assert r.get(blob_hash(big), CHUNK_BYTES - 5, 10) == big[CHUNK_BYTES - 5:CHUNK_BYTES + 5]
        assert r.get(blob_hash(big), len(big) - 3) == big[-3:]
        assert r.get(blob_hash(big), len(big)) == b""
        missing = blob_hash(b"never stored")
        # More than one Has batch: the client splits, the server checks each.
        asked = [blob_hash(small), missing] * (HAS_BATCH_MAX // 2 + 5)
        assert r.has(asked) == [True, False] * (HAS_BATCH_MAX // 2 + 5)
        with pytest.raises(BlobNotFound):
            r.get(missing)

        listed = r.list()
        assert [i.hash for i in listed] == sorted(blob_hash(d) for d in (small, big, empty))
        assert {i.hash: i.size for i in listed}[blob_hash(big)] == len(big)
        assert [i.hash for i in r.list(listed[0].hash, 1)] == [listed[1].hash]
        assert [i.hash for i in api.iter_all(r, page=1)] == [i.hash for i in listed]

        v = r.verify(blob_hash(big))
        assert v.present and v.verified and v.info is not None and v.info.size == len(big)
        v = r.verify(missing)
        assert (v.present, v.verified, v.info) == (False, False, None)

        s = r.stats()
        assert s["blobs"] == 3 and s["bytes"] == len(small) + len(big)
        assert s["repair_backlog"] == 7 and s["puts"] == 11

        node.clock.now += 100
        assert r.delete(blob_hash(small), min_age_s=1000) is False  # too young: GC's grace
        assert r.delete(blob_hash(small), min_age_s=50) is True
        assert r.delete(blob_hash(small)) is False
        assert r.has([blob_hash(small)]) == [False]


def test_put_many_and_get_range_round_trip_through_remote_replica(node: Node) -> None:
    with RemoteReplica("n1", node.address, TOKEN, timeout_s=CALL_S) as r:
        small = [os.urandom(100 + i) for i in range(20)]
        big = os.urandom(api.SMALL_BYTES_MAX + 10)  # too big for PutMany: streamed alone
        items = [(d, blob_hash(d)) for d in (*small, big, b"", small[3])]
        assert r.put_many(items) == [False] * 22 + [True]  # the repeat of an earlier item is a dedup
        assert r.put_many(items[:2]) == [True, True]
        assert r.put_many([]) == []
        assert all(node.store.get(h) == d for d, h in items)
        assert r.get_range(blob_hash(big), 4096, 4096) == (big[4096:8192], len(big))
        assert r.get_range(blob_hash(small[0])) == (small[0], 100)
        assert r.get_range(blob_hash(b"")) == (b"", 0)
        with pytest.raises(BlobNotFound):
            r.get_range(blob_hash(b"never stored"), 0, 10)
        with pytest.raises(InvalidBlob):
            r.get_range(blob_hash(small[0]), 101)  # the offset is past the end
        with pytest.raises(InvalidBlob):
            r.put_many([(b"a", blob_hash(b"a")), (b"b", blob_hash(b"c"))])
        assert blob_hash(b"a") not in node.hashes()
    assert_healthy(node)


def test_remote_put_many_splits_into_calls_within_the_bounds(fake_node: Node) -> None:
    store = fake_node.store
    with RemoteReplica("n1", fake_node.address, TOKEN, timeout_s=CALL_S) as r:
        tiny = [(d, blob_hash(d)) for d in (i.to_bytes(2, "big") for i in range(600))]
        assert r.put_many(tiny) == [False] * 600
        assert sorted(store.put_many_calls) == [88, 256, 256]  # PUT_MANY_BLOBS_MAX per call (calls overlap)
        store.put_many_calls.clear()
        mib = [(d, blob_hash(d)) for d in (bytes([i]) * api.SMALL_BYTES_MAX for i in range(9))]
        assert r.put_many(mib) == [False] * 9
        assert sorted(store.put_many_calls) == [1, 4, 4]  # PUT_MANY_BYTES_MAX per call
    assert_healthy(fake_node)


def test_put_many_to_a_store_that_refuses_service_is_replica_unavailable(fake_node: Node) -> None:
    fake_node.store.fail = StoreDown("writer stopped after EIO")
    with RemoteReplica("n1", fake_node.address, TOKEN, timeout_s=CALL_S) as r:
        with pytest.raises(ReplicaUnavailable, match="StoreDown"):
            r.put_many([(b"abc", blob_hash(b"abc"))])
    fake_node.store.fail = None
    assert fake_node.hashes() == set()
    assert_healthy(fake_node)


def test_cluster_calls_round_trip_through_blob_client(node: Node, tmp_path: Path) -> None:
    coord = node.coordinator
    assert coord is not None
    with BlobClient(node.address, TOKEN, timeout_s=CALL_S) as c:
        data = os.urandom(CHUNK_BYTES + 1)
        res = c.put(data)
        assert res == PutResult(blob_hash(data), ["n1", "n2"], ["n3"], False)
        assert c.put(data).existed is True
        assert coord.store.get(blob_hash(data)) == data and node.store.has([blob_hash(data)]) == [False]
        local = c.put(b"local only", replicate=False)
        assert local == PutResult(blob_hash(b"local only"), ["n1"], [], False)
        assert c.put(b"local only", replicate=False).existed is True

        assert c.get(blob_hash(data)) == data
        assert c.get(blob_hash(data), 7, 9) == data[7:16]
        assert c.get(blob_hash(b"local only"), local_only=True) == b"local only"
        with pytest.raises(BlobNotFound):
            c.get(blob_hash(b"local only"))  # not in the cluster's store
        out = io.BytesIO()
        assert c.get_to(blob_hash(data), out) == len(data) and out.getvalue() == data
        out = io.BytesIO()
        assert c.get_to(blob_hash(b"local only"), out, local_only=True) == 10
        assert c.has([blob_hash(b"local only"), blob_hash(data)]) == [True, False]

        loc = c.locate(blob_hash(data))
        assert loc.hash == blob_hash(data) and loc.size == len(data)
        assert [(x.node, x.present, x.error) for x in loc.copies] == [("n1", True, ""), ("n2", False, "missing")]
        assert c.scrub() == api.ScrubResult(checked=3, corrupt=1, repaired=1)
        assert c.scrub(all_nodes=False).checked == 1
        assert c.gc(dry_run=True) == api.GcResult(2, 6, 1, 3, 300, ["n3"])
        c.gc(dry_run=False, grace_s=60.0)
        assert coord.gc_calls == [(True, None), (False, 60.0)]

        s = c.stats()
        assert s["node"] == "n1" and s["blobs"] == 1 and s["bytes"] == 10 and s["packs"] >= 1
        assert s["repair_backlog"] == 7
        # The coordinator's counters keep their names; the store's colliding ones become store_<name>.
        assert s["counters"]["puts"] == 11 and s["counters"]["read_repairs"] == 2
        assert s["counters"]["store_puts"] >= 1 and s["counters"]["compactions"] >= 0

        assert c.verify(blob_hash(b"local only")).verified
        assert [i.hash for i in c.list()] == [blob_hash(b"local only")]
        assert c.delete(blob_hash(b"local only")) is True


@pytest.mark.parametrize("replicate", [False, True], ids=["local", "replicated"])
def test_a_blob_over_4_mib_is_spooled_to_a_temp_file_that_does_not_outlive_the_put(
        node: Node, tmp_path: Path, replicate: bool) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    with BlobClient(node.address, TOKEN, timeout_s=CALL_S) as c:
        res = c.put_file(str(path), replicate=replicate)
        assert res.hash == blob_hash(data)
        out = io.BytesIO()
        assert c.get_to(res.hash, out, local_only=not replicate) == len(data)
        assert out.getvalue() == data
    assert os.listdir(node.tmp_dir) == []


def test_put_file_of_an_empty_file_stores_the_empty_blob(node: Node, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with BlobClient(node.address, TOKEN, timeout_s=CALL_S) as c:
        assert c.put_file(str(tmp_path / "empty"), replicate=False).hash == blob_hash(b"")
        assert c.get(blob_hash(b""), local_only=True) == b""


def test_get_streams_pieces_of_at_most_chunk_bytes_with_size_and_server_first(node: Node) -> None:
    data = os.urandom(CHUNK_BYTES * 2 + 5)
    node.store.put(data, blob_hash(data))
    assert node.coordinator is not None
    node.coordinator.store.put(data, blob_hash(data))
    stub = node.stub()
    for local_only, served_by in ((True, "n1"), (False, "n2")):
        msgs = list(stub.Get(blob_pb2.GetRequest(hash=blob_hash(data), local_only=local_only),
                             timeout=CALL_S, metadata=MD))
        assert [len(m.data) for m in msgs] == [CHUNK_BYTES, CHUNK_BYTES, 5]
        assert (msgs[0].size, msgs[0].served_by) == (len(data), served_by)
        assert all(m.size == 0 and m.served_by == "" for m in msgs[1:])
    empty = list(stub.Get(blob_pb2.GetRequest(hash=blob_hash(data), offset=len(data), local_only=True),
                          timeout=CALL_S, metadata=MD))
    assert [(m.size, m.data, m.served_by) for m in empty] == [(len(data), b"", "n1")]


# ---------------------------------------------------------------- refusals


def test_every_call_without_the_admin_token_is_refused(node: Node) -> None:
    stub = node.stub()
    h = blob_hash(b"x")
    calls: list[Callable[[Any], Any]] = [
        lambda md: stub.Put(iter(put_stream(b"x")), timeout=CALL_S, metadata=md),
        lambda md: stub.Get(blob_pb2.GetRequest(hash=h, local_only=True), timeout=CALL_S, metadata=md),
        lambda md: stub.Has(blob_pb2.HasRequest(hashes=[h]), timeout=CALL_S, metadata=md),
        lambda md: stub.Delete(blob_pb2.DeleteRequest(hash=h), timeout=CALL_S, metadata=md),
        lambda md: stub.List(blob_pb2.ListRequest(), timeout=CALL_S, metadata=md),
        lambda md: stub.Verify(blob_pb2.VerifyRequest(hash=h), timeout=CALL_S, metadata=md),
        lambda md: stub.Stats(blob_pb2.StatsRequest(), timeout=CALL_S, metadata=md),
        lambda md: stub.Locate(blob_pb2.LocateRequest(hash=h), timeout=CALL_S, metadata=md),
        lambda md: stub.Scrub(blob_pb2.ScrubRequest(), timeout=CALL_S, metadata=md),
        lambda md: stub.Gc(blob_pb2.GcRequest(dry_run=True), timeout=CALL_S, metadata=md),
        lambda md: stub.PutSmall(blob_pb2.PutRequest(hash=h, size=1, data=b"x"), timeout=CALL_S, metadata=md),
        lambda md: stub.GetSmall(blob_pb2.GetRequest(hash=h, local_only=True), timeout=CALL_S, metadata=md),
        lambda md: stub.PutMany(put_many_msg([b"x", b"y"]), timeout=CALL_S, metadata=md),
    ]
    for md in ((), ((TOKEN_METADATA, "wrong"),), ((TOKEN_METADATA, TOKEN + "x"),), ((TOKEN_METADATA, ""),)):
        for call in calls:
            assert code_of(functools.partial(call, md)) == Code.UNAUTHENTICATED
    assert node.hashes() == set()
    assert node.coordinator is not None and node.coordinator.gc_calls == []
    with BlobClient(node.address, "wrong", timeout_s=CALL_S) as c, pytest.raises(TokenRejected) as e:
        c.put(b"x")
    # The CLI tells a wrong token (PermissionError) apart from a node that is down (BlobError).
    assert isinstance(e.value, PermissionError) and not isinstance(e.value, api.BlobError)
    assert "token is wrong" in str(e.value)
    with RemoteReplica("n1", node.address, "wrong", timeout_s=CALL_S) as r, pytest.raises(ReplicaTokenRejected):
        r.has([h])  # to a coordinator: a replica it cannot use (ReplicaUnavailable)
    with RemoteReplica("n1", node.address, "wrong", timeout_s=CALL_S) as r, pytest.raises(ReplicaTokenRejected):
        r.put_many([(b"x", h)])
    assert_healthy(node)


def test_cluster_calls_need_a_coordinator(tmp_path: Path) -> None:
    with running_node(tmp_path, coordinator=False) as node:
        stub = node.stub()
        h = blob_hash(b"x")
        assert code_of(lambda: put_msgs(stub, put_stream(b"x", replicate=True))) == Code.FAILED_PRECONDITION
        assert code_of(lambda: stub.Get(blob_pb2.GetRequest(hash=h), timeout=CALL_S, metadata=MD)) \
            == Code.FAILED_PRECONDITION
        assert code_of(lambda: stub.Locate(blob_pb2.LocateRequest(hash=h), timeout=CALL_S, metadata=MD)) \
            == Code.FAILED_PRECONDITION
        assert code_of(lambda: stub.Scrub(blob_pb2.ScrubRequest(), timeout=CALL_S, metadata=MD)) \
            == Code.FAILED_PRECONDITION
        assert code_of(lambda: stub.Gc(blob_pb2.GcRequest(), timeout=CALL_S, metadata=MD)) \
            == Code.FAILED_PRECONDITION
        with BlobClient(node.address, TOKEN, timeout_s=CALL_S) as c:
            s = c.stats()
            assert s["repair_backlog"] == 0 and s["counters"]["puts"] == 5 and "store_puts" not in s["counters"]
            with pytest.raises(ReplicaUnavailable):
                c.scrub()
        assert node.hashes() == set()
        assert_healthy(node)


GOOD = b"the one good blob" * 50
GOOD_H = blob_hash(GOOD)
H = blob_hash(b"some other content")


def _get(stub: Any, **kw: Any) -> Any:
    return stub.Get(blob_pb2.GetRequest(**kw), timeout=CALL_S, metadata=MD)


def _unary(method: str, request: Any) -> Callable[[Any], Any]:
    return lambda stub: getattr(stub, method)(request, timeout=CALL_S, metadata=MD)


def put_many_msg(datas: list[bytes], *, h: dict[int, bytes] | None = None, size: dict[int, int] | None = None,
                 replicate: frozenset[int] | set[int] = frozenset()) -> Any:
    """A PutManyRequest of `datas`, with the hash or size of some blobs
    (by index) replaced and replicate set on others."""
    h, size = h or {}, size or {}
    return blob_pb2.PutManyRequest(blobs=[
        blob_pb2.PutRequest(hash=h.get(i, blob_hash(d)), size=size.get(i, len(d)), data=d, replicate=i in replicate)
        for i, d in enumerate(datas)])


ZSTD_5000_ZEROS = zstandard.ZstdCompressor().compress(bytes(5000))
ZSTD_BOMB = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # a small frame of 64 MiB of zeros


# (what is wrong, the call on a raw stub, the status it must get). The node
# holds GOOD (locally and in the fake cluster) before each one.
GARBAGE: list[tuple[str, Callable[[Any], Any], grpc.StatusCode]] = [
    ("put: empty stream", lambda s: put_msgs(s, []), Code.INVALID_ARGUMENT),
    ("put: no hash", lambda s: put_msgs(s, put_stream(b"abc", h=b"")), Code.INVALID_ARGUMENT),
    ("put: 31-byte hash", lambda s: put_msgs(s, put_stream(b"abc", h=blob_hash(b"abc")[:31])),
     Code.INVALID_ARGUMENT),
    ("put: 33-byte hash", lambda s: put_msgs(s, put_stream(b"abc", h=blob_hash(b"abc") + b"\0")),
     Code.INVALID_ARGUMENT),
    ("put: 10 MB hash is over the message cap", lambda s: put_msgs(s, put_stream(b"abc", h=bytes(10_000_000))),
     Code.RESOURCE_EXHAUSTED),
    ("put: size 2**63", lambda s: put_msgs(s, put_stream(b"abc", size=2**63)), Code.INVALID_ARGUMENT),
    ("put: size 2**64-1", lambda s: put_msgs(s, put_stream(b"abc", size=2**64 - 1)), Code.INVALID_ARGUMENT),
    ("put: size one over the blob limit",
     lambda s: put_msgs(s, put_stream(b"abc", size=BLOB_BYTES_MAX + 1)), Code.INVALID_ARGUMENT),
    ("put: size 0 with data", lambda s: put_msgs(s, put_stream(b"abc", h=blob_hash(b""), size=0)),
     Code.INVALID_ARGUMENT),
    ("put: data longer than size", lambda s: put_msgs(s, put_stream(b"abcd", h=blob_hash(b"abc"), size=3)),
     Code.INVALID_ARGUMENT),
    ("put: data shorter than size (truncated stream)",
     lambda s: put_msgs(s, put_stream(b"ab", h=blob_hash(b"abc"), size=3)), Code.INVALID_ARGUMENT),
    ("put: truncated stream of a spooled blob",
     lambda s: put_msgs(s, put_stream(bytes(5 << 20), h=blob_hash(bytes(6 << 20)), size=6 << 20)),
     Code.INVALID_ARGUMENT),
    ("put: wrong hash for the data", lambda s: put_msgs(s, put_stream(b"abc", h=blob_hash(b"abd"))),
     Code.INVALID_ARGUMENT),
    ("put: wrong hash for spooled data",
     lambda s: put_msgs(s, put_stream(bytes(5 << 20), h=blob_hash(bytes(5 << 20) + b"x"), size=5 << 20)),
     Code.INVALID_ARGUMENT),
    ("put: replicated, wrong hash", lambda s: put_msgs(s, put_stream(b"abc", h=H, replicate=True)),
     Code.INVALID_ARGUMENT),
    ("put: chunk one byte over CHUNK_BYTES",
     lambda s: put_msgs(s, put_stream(bytes(CHUNK_BYTES + 1), piece=CHUNK_BYTES + 1)), Code.INVALID_ARGUMENT),
    ("put: chunk over the message cap",
     lambda s: put_msgs(s, put_stream(bytes(CHUNK_BYTES * 20), piece=CHUNK_BYTES * 20)), Code.RESOURCE_EXHAUSTED),
    ("put: chunk over CHUNK_BYTES, under the cap",
     lambda s: put_msgs(s, put_stream(bytes(CHUNK_BYTES * 2), piece=CHUNK_BYTES * 2)), Code.INVALID_ARGUMENT),
    ("put_small: over SMALL_BYTES_MAX",
     lambda s: s.PutSmall(blob_pb2.PutRequest(hash=blob_hash(bytes(api.SMALL_BYTES_MAX + 1)),
                                              size=api.SMALL_BYTES_MAX + 1, data=bytes(api.SMALL_BYTES_MAX + 1)),
                          metadata=MD, timeout=CALL_S), Code.INVALID_ARGUMENT),
    ("put_small: size does not match data",
     lambda s: s.PutSmall(blob_pb2.PutRequest(hash=GOOD_H, size=len(GOOD) + 1, data=GOOD),
                          metadata=MD, timeout=CALL_S), Code.INVALID_ARGUMENT),
    ("put_small: wrong hash",
     lambda s: s.PutSmall(blob_pb2.PutRequest(hash=bytes(32), size=len(GOOD), data=GOOD),
                          metadata=MD, timeout=CALL_S), Code.INVALID_ARGUMENT),
    ("put_small: short hash",
     lambda s: s.PutSmall(blob_pb2.PutRequest(hash=b"x" * 31, size=len(GOOD), data=GOOD),
                          metadata=MD, timeout=CALL_S), Code.INVALID_ARGUMENT),
    ("put_many: one blob over the count limit",
     _unary("PutMany", put_many_msg([bytes([i % 256, i // 256]) for i in range(api.PUT_MANY_BLOBS_MAX + 1)])),
     Code.INVALID_ARGUMENT),
    ("put_many: data one byte over the byte limit, the message under the cap",
     _unary("PutMany", put_many_msg([bytes([i]) * api.SMALL_BYTES_MAX
                                     for i in range(api.PUT_MANY_BYTES_MAX // api.SMALL_BYTES_MAX)] + [b"x"])),
     Code.INVALID_ARGUMENT),
    ("put_many: data over the message cap",
     _unary("PutMany", put_many_msg([bytes([i]) * api.SMALL_BYTES_MAX for i in range(5)])),
     Code.RESOURCE_EXHAUSTED),
    ("put_many: a blob over SMALL_BYTES_MAX",
     _unary("PutMany", put_many_msg([b"a", bytes(api.SMALL_BYTES_MAX + 1)])), Code.INVALID_ARGUMENT),
    ("put_many: a size that does not match the data",
     _unary("PutMany", put_many_msg([b"a", b"bc"], size={1: 3})), Code.INVALID_ARGUMENT),
    ("put_many: a size of 2**64-1", _unary("PutMany", put_many_msg([b"a"], size={0: 2**64 - 1})),
     Code.INVALID_ARGUMENT),
    ("put_many: a wrong hash among good blobs",
     _unary("PutMany", put_many_msg([b"a", b"b", b"c"], h={1: blob_hash(b"B")})), Code.INVALID_ARGUMENT),
    ("put_many: a 31-byte hash", _unary("PutMany", put_many_msg([b"a", b"b"], h={1: blob_hash(b"b")[:31]})),
     Code.INVALID_ARGUMENT),
    ("put_many: a missing hash", _unary("PutMany", put_many_msg([b"a"], h={0: b""})), Code.INVALID_ARGUMENT),
    ("put_many: replicate asked for", _unary("PutMany", put_many_msg([b"a", b"b"], replicate={1})),
     Code.INVALID_ARGUMENT),
    ("put_many: an unknown compression",
     _unary("PutMany", blob_pb2.PutManyRequest(blobs=[blob_pb2.PutRequest(
         hash=GOOD_H, size=len(GOOD), data=GOOD, compression=2)])), Code.INVALID_ARGUMENT),
    ("put_many: compression 1 on bytes that are no zstd frame",
     _unary("PutMany", blob_pb2.PutManyRequest(blobs=[blob_pb2.PutRequest(
         hash=GOOD_H, size=len(GOOD), data=GOOD, compression=1)])), Code.INVALID_ARGUMENT),
    ("put_many: a zstd frame that decodes to more than its size",
     _unary("PutMany", blob_pb2.PutManyRequest(blobs=[blob_pb2.PutRequest(
         hash=blob_hash(bytes(5000)), size=4999, data=ZSTD_5000_ZEROS, compression=1)])), Code.INVALID_ARGUMENT),
    ("put_many: a zstd frame of other content than its hash",
     _unary("PutMany", blob_pb2.PutManyRequest(blobs=[blob_pb2.PutRequest(
         hash=GOOD_H, size=5000, data=ZSTD_5000_ZEROS, compression=1)])), Code.INVALID_ARGUMENT),
    ("put_many: a compressed blob whose content is over SMALL_BYTES_MAX",
     _unary("PutMany", blob_pb2.PutManyRequest(blobs=[blob_pb2.PutRequest(
         hash=GOOD_H, size=api.SMALL_BYTES_MAX + 1, data=ZSTD_5000_ZEROS, compression=1)])), Code.INVALID_ARGUMENT),
    ("put_many: a zstd bomb (a small frame of 64 MiB of zeros declared 5000 bytes)",
     _unary("PutMany", blob_pb2.PutManyRequest(blobs=[blob_pb2.PutRequest(
         hash=blob_hash(bytes(5000)), size=5000, data=ZSTD_BOMB, compression=1)])), Code.INVALID_ARGUMENT),
    ("put_small: compression set",
     lambda s: s.PutSmall(blob_pb2.PutRequest(hash=GOOD_H, size=len(GOOD), data=GOOD, compression=1),
                          metadata=MD, timeout=CALL_S), Code.INVALID_ARGUMENT),
    ("put: compression set",
     lambda s: put_msgs(s, [blob_pb2.PutRequest(hash=GOOD_H, size=len(GOOD), data=GOOD, compression=1)]),
     Code.INVALID_ARGUMENT),
    ("get_small: offset beyond the end",
     lambda s: s.GetSmall(blob_pb2.GetRequest(hash=GOOD_H, offset=len(GOOD) + 1, local_only=True),
                          metadata=MD, timeout=CALL_S), Code.OUT_OF_RANGE),
    ("get_small: unknown blob",
     lambda s: s.GetSmall(blob_pb2.GetRequest(hash=bytes(32), local_only=True),
                          metadata=MD, timeout=CALL_S), Code.NOT_FOUND),
    ("put: hash changed mid-stream",
     lambda s: put_msgs(s, put_stream(b"abcdef", piece=3)[:1] + [blob_pb2.PutRequest(hash=H, data=b"def")]),
     Code.INVALID_ARGUMENT),
    ("put: size changed mid-stream",
     lambda s: put_msgs(s, put_stream(b"abcdef", piece=3)[:1] + [blob_pb2.PutRequest(size=7, data=b"def")]),
     Code.INVALID_ARGUMENT),
    ("put: replicate turned on mid-stream",
     lambda s: put_msgs(s, put_stream(b"abcdef", piece=3)[:1] + [blob_pb2.PutRequest(replicate=True,
                                                                                       data=b"def")]),
     Code.INVALID_ARGUMENT),
    ("put: an empty message after the first",
     lambda s: put_msgs(s, put_stream(b"abcdef", piece=3) + [blob_pb2.PutRequest()]), Code.INVALID_ARGUMENT),
    ("get: empty hash", lambda s: _get(s, hash=b"", local_only=True), Code.INVALID_ARGUMENT),
    ("get: 33-byte hash", lambda s: _get(s, hash=GOOD_H + b"\0", local_only=True), Code.INVALID_ARGUMENT),
    ("get: unknown blob", lambda s: _get(s, hash=H, local_only=True), Code.NOT_FOUND),
    ("get: unknown blob in the cluster", lambda s: _get(s, hash=H), Code.NOT_FOUND),
    ("get: offset one past the end", lambda s: _get(s, hash=GOOD_H, offset=len(GOOD) + 1, local_only=True),
     Code.OUT_OF_RANGE),
    ("get: offset 2**64-1", lambda s: _get(s, hash=GOOD_H, offset=2**64 - 1, local_only=True), Code.OUT_OF_RANGE),
    ("get: length one past the end", lambda s: _get(s, hash=GOOD_H, length=len(GOOD) + 1, local_only=True),
     Code.OUT_OF_RANGE),
    ("get: offset+length past the end",
     lambda s: _get(s, hash=GOOD_H, offset=len(GOOD) - 1, length=2, local_only=True), Code.OUT_OF_RANGE),
    ("get: offset+length overflowing uint64",
     lambda s: _get(s, hash=GOOD_H, offset=2**63, length=2**64 - 1, local_only=True), Code.OUT_OF_RANGE),
    ("get: cluster read, offset past the end", lambda s: _get(s, hash=GOOD_H, offset=len(GOOD) + 1),
     Code.OUT_OF_RANGE),
    ("get: cluster read, length past the end", lambda s: _get(s, hash=GOOD_H, offset=1, length=len(GOOD)),
     Code.OUT_OF_RANGE),
    ("has: 31-byte hash among good ones", _unary("Has", blob_pb2.HasRequest(hashes=[GOOD_H, GOOD_H[:31]])),
     Code.INVALID_ARGUMENT),
    ("has: one over the batch limit", _unary("Has", blob_pb2.HasRequest(hashes=[GOOD_H] * (HAS_BATCH_MAX + 1))),
     Code.INVALID_ARGUMENT),
    ("has: 200k hashes are over the message cap",
     _unary("Has", blob_pb2.HasRequest(hashes=[GOOD_H] * 200_000)), Code.RESOURCE_EXHAUSTED),
    ("delete: 0-byte hash", _unary("Delete", blob_pb2.DeleteRequest(hash=b"")), Code.INVALID_ARGUMENT),
    ("delete: negative min_age_s", _unary("Delete", blob_pb2.DeleteRequest(hash=GOOD_H, min_age_s=-1.0)),
     Code.INVALID_ARGUMENT),
    ("delete: NaN min_age_s", _unary("Delete", blob_pb2.DeleteRequest(hash=GOOD_H, min_age_s=math.nan)),
     Code.INVALID_ARGUMENT),
    ("delete: infinite min_age_s", _unary("Delete", blob_pb2.DeleteRequest(hash=GOOD_H, min_age_s=math.inf)),
     Code.INVALID_ARGUMENT),
    ("list: limit 2**32-1", _unary("List", blob_pb2.ListRequest(limit=2**32 - 1)), Code.INVALID_ARGUMENT),
    ("list: limit one over the maximum", _unary("List", blob_pb2.ListRequest(limit=LIST_LIMIT_MAX + 1)),
     Code.INVALID_ARGUMENT),
    ("list: 5-byte after", _unary("List", blob_pb2.ListRequest(after=b"12345")), Code.INVALID_ARGUMENT),
    ("verify: 31-byte hash", _unary("Verify", blob_pb2.VerifyRequest(hash=GOOD_H[:31])), Code.INVALID_ARGUMENT),
    ("locate: 33-byte hash", _unary("Locate", blob_pb2.LocateRequest(hash=GOOD_H + b"x")), Code.INVALID_ARGUMENT),
    ("locate: unknown blob", _unary("Locate", blob_pb2.LocateRequest(hash=H)), Code.NOT_FOUND),
    ("gc: negative grace_s", _unary("Gc", blob_pb2.GcRequest(grace_s=-5.0)), Code.INVALID_ARGUMENT),
    ("gc: NaN grace_s", _unary("Gc", blob_pb2.GcRequest(grace_s=math.nan)), Code.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("what,call,expected", GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_gets_a_clean_status_and_stores_nothing(
        node: Node, what: str, call: Callable[[Any], Any], expected: grpc.StatusCode) -> None:
    node.store.put(GOOD, GOOD_H)
    assert node.coordinator is not None
    node.coordinator.store.put(GOOD, GOOD_H)
    stub = node.stub()
    assert code_of(lambda: call(stub)) == expected, what
    assert node.hashes() == {GOOD_H}
    assert node.coordinator.gc_calls == []
    assert os.listdir(node.tmp_dir) == []
    assert_healthy(node)


def test_list_pages_carry_next_after_only_when_full(node: Node) -> None:
    blobs = sorted(blob_hash(bytes([i])) for i in range(5))
    for i in range(5):
        node.store.put(bytes([i]), blob_hash(bytes([i])))
    stub = node.stub()
    r = stub.List(blob_pb2.ListRequest(limit=2), timeout=CALL_S, metadata=MD)
    assert [b.hash for b in r.blobs] == blobs[:2] and r.next_after == blobs[1]
    r = stub.List(blob_pb2.ListRequest(after=r.next_after, limit=3), timeout=CALL_S, metadata=MD)
    assert [b.hash for b in r.blobs] == blobs[2:] and r.next_after == blobs[4]
    r = stub.List(blob_pb2.ListRequest(after=r.next_after, limit=3), timeout=CALL_S, metadata=MD)
    assert list(r.blobs) == [] and r.next_after == b""
    r = stub.List(blob_pb2.ListRequest(), timeout=CALL_S, metadata=MD)  # limit 0 = 1000
    assert len(r.blobs) == 5 and r.next_after == b""


# ---------------------------------------------------------------- errors across the wire


def test_a_corrupt_local_copy_is_data_loss_and_never_served(fake_node: Node) -> None:
    fake_node.store.put(GOOD, GOOD_H)
    fake_node.store.corrupted.add(GOOD_H)
    assert code_of(lambda: _get(fake_node.stub(), hash=GOOD_H, local_only=True)) == Code.DATA_LOSS
    with RemoteReplica("n1", fake_node.address, TOKEN, timeout_s=CALL_S) as r:
        with pytest.raises(BlobCorrupt):
            r.get(GOOD_H)
        v = r.verify(GOOD_H)
        assert v.present and not v.verified and v.error == "checksum mismatch"


def test_a_copy_corrupted_on_disk_is_data_loss_then_gone(tmp_path: Path) -> None:
    with running_node(tmp_path, "pack") as node:
        node.store.put(GOOD, GOOD_H)
        loc = node.store.locate(GOOD_H)
        with open(loc.path, "r+b") as f:  # flip one stored byte, past the 64-byte record header
            f.seek(loc.offset + 64 + 3)
            b = f.read(1)
            f.seek(loc.offset + 64 + 3)
            f.write(bytes([b[0] ^ 0x40]))
        with RemoteReplica("n1", node.address, TOKEN, timeout_s=CALL_S) as r:
            with pytest.raises(BlobCorrupt):
                r.get(GOOD_H)
            with pytest.raises(BlobNotFound):  # quarantined: never served again
                r.get(GOOD_H)
            assert r.has([GOOD_H]) == [False]
            assert r.put(GOOD, GOOD_H) is False  # a fresh copy can be written
            assert r.get(GOOD_H) == GOOD
        assert_healthy(node)


def test_the_client_hashes_what_it_reads_and_refuses_wrong_bytes(fake_node: Node) -> None:
    coord = fake_node.coordinator
    assert coord is not None
    coord.store.put(GOOD, GOOD_H)
    coord.tamper = True  # a coordinator that failed to verify: the reader checks again
    with BlobClient(fake_node.address, TOKEN, timeout_s=CALL_S) as c:
        with pytest.raises(BlobCorrupt):
            c.get(GOOD_H)
        with pytest.raises(BlobCorrupt):
            c.get_to(GOOD_H, io.BytesIO())
        # A range cannot be checked against the whole blob's hash: that check is the coordinator's.
        assert len(c.get(GOOD_H, 1, 5)) == 5


def test_not_enough_replicas_reaches_the_client_as_itself(fake_node: Node) -> None:
    assert fake_node.coordinator is not None
    fake_node.coordinator.fail_puts = True
    assert code_of(lambda: put_msgs(fake_node.stub(), put_stream(b"abc", replicate=True))) == Code.UNAVAILABLE
    with BlobClient(fake_node.address, TOKEN, timeout_s=CALL_S) as c, pytest.raises(NotEnoughReplicas):
        c.put(b"abc")


def test_an_unexpected_store_error_is_internal_and_logged_and_the_server_keeps_serving(
        fake_node: Node, caplog: pytest.LogCaptureFixture) -> None:
    fake_node.store.fail = RuntimeError("disk on fire")
    with caplog.at_level(logging.ERROR, logger="floe.objstore.service"):
        assert code_of(lambda: _unary("Has", blob_pb2.HasRequest(hashes=[GOOD_H]))(fake_node.stub())) \
            == Code.INTERNAL
        assert code_of(lambda: _get(fake_node.stub(), hash=GOOD_H, local_only=True)) == Code.INTERNAL
    assert "disk on fire" in caplog.text and "Traceback" in caplog.text
    with RemoteReplica("n1", fake_node.address, TOKEN, timeout_s=CALL_S) as r, pytest.raises(ReplicaUnavailable):
        r.stats()
    fake_node.store.fail = None
    assert_healthy(fake_node)


class StoreDown(api.BlobError):
    """Like pack.StoreFailed: the store's writer stopped after an I/O error."""


def test_a_store_that_refuses_service_makes_the_node_unavailable(fake_node: Node) -> None:
    fake_node.store.fail = StoreDown("writer stopped after EIO")
    with RemoteReplica("n1", fake_node.address, TOKEN, timeout_s=CALL_S) as r:
        with pytest.raises(ReplicaUnavailable, match="StoreDown: writer stopped"):
            r.put(b"abc", blob_hash(b"abc"))
        with pytest.raises(ReplicaUnavailable):
            r.get(GOOD_H)
    fake_node.store.fail = None
    assert fake_node.hashes() == set()
    assert_healthy(fake_node)


def test_an_unreachable_node_is_replica_unavailable(tmp_path: Path) -> None:
    with running_node(tmp_path) as node:
        address = node.address
    with RemoteReplica("n1", address, TOKEN, timeout_s=2.0) as r, pytest.raises(ReplicaUnavailable):
        r.has([GOOD_H])


def test_a_second_server_on_the_same_port_fails_to_bind(fake_node: Node, tmp_path: Path) -> None:
    other = BlobService(FakeStore(), None, TOKEN, "n2", str(tmp_path / "tmp2"))
    try:
        with pytest.raises(OSError):
            serve_blobs(other, fake_node.address)
    finally:
        other.close()
    assert_healthy(fake_node)


def test_an_empty_admin_token_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BlobService(FakeStore(), None, "", "n1", str(tmp_path))


# ---------------------------------------------------------------- streams that go wrong


class Feed:
    """A request iterator the test feeds by hand; None ends it."""

    def __init__(self) -> None:
        self.q: queue.Queue[Any] = queue.Queue()

    def __iter__(self) -> Iterator[Any]:
        while True:
            m = self.q.get(timeout=CALL_S)
            if m is None:
                return
            yield m


@pytest.mark.parametrize("size", [3 * CHUNK_BYTES, 6 << 20], ids=["in-memory", "spooled"])
@pytest.mark.parametrize("replicate", [False, True], ids=["local", "replicated"])
def test_a_client_that_cancels_mid_put_stores_nothing(node: Node, size: int, replicate: bool) -> None:
    data = os.urandom(size)
    feed = Feed()
    fut = node.stub().Put.future(iter(feed), timeout=CALL_S, metadata=MD)
    msgs = put_stream(data, replicate=replicate)
    for m in msgs[:2]:
        feed.q.put(m)
    time.sleep(0.2)  # let the server take the pieces
    fut.cancel()
    feed.q.put(None)
    with pytest.raises(grpc.FutureCancelledError):
        fut.result(timeout=CALL_S)
    assert node.hashes() == set()
    assert os.listdir(node.tmp_dir) == []
    assert_healthy(node)


def test_a_client_that_cancels_mid_get_frees_the_server(tmp_path: Path) -> None:
    with running_node(tmp_path, threads=2) as node:
        data = os.urandom(8 * CHUNK_BYTES)
        node.store.put(data, blob_hash(data))
        stub = node.stub()
        for _ in range(6):  # more cancelled reads than server threads
            it = stub.Get(blob_pb2.GetRequest(hash=blob_hash(data), local_only=True), timeout=CALL_S, metadata=MD)
            assert len(next(it).data) == CHUNK_BYTES
            it.cancel()
        assert_healthy(node)


@pytest.mark.parametrize("sent", [0, 1], ids=["before-the-header", "after-the-first-piece"])
def test_a_stalled_put_is_cancelled_by_the_watchdog(tmp_path: Path, sent: int) -> None:
    watchdog = StreamWatchdog(idle_s=0.3, total_s=30.0)
    with running_node(tmp_path, threads=2, watchdog=watchdog) as node:
        feed = Feed()
        fut = node.stub().Put.future(iter(feed), timeout=CALL_S, metadata=MD)
        for m in put_stream(bytes(1000), piece=100)[:sent]:  # then nothing, and no end of stream
            feed.q.put(m)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            fut.result(timeout=CALL_S)
        assert e.value.code() == Code.CANCELLED and time.monotonic() - t0 < 5
        feed.q.put(None)
        assert node.hashes() == set()
        with BlobClient(node.address, TOKEN, timeout_s=CALL_S) as c:
            assert c.stats()["counters"]["streams_cancelled"] == 1
        assert_healthy(node)


def test_a_reader_that_stops_reading_a_get_is_cancelled_by_the_watchdog(tmp_path: Path) -> None:
    watchdog = StreamWatchdog(idle_s=0.3, total_s=30.0)
    with running_node(tmp_path, threads=2, watchdog=watchdog) as node:
        data = os.urandom(48 << 20)  # far more than the transport's flow-control windows hold
        node.store.put(data, blob_hash(data))
        it = node.stub().Get(blob_pb2.GetRequest(hash=blob_hash(data), local_only=True),
                             timeout=CALL_S, metadata=MD)
        next(it)
        time.sleep(1.5)  # the server blocks on a full window, makes no progress, and is cancelled
        with pytest.raises(grpc.RpcError) as e:
            for _ in it:
                pass
        assert e.value.code() == Code.CANCELLED
        assert watchdog.cancelled == 1
        assert_healthy(node)


def test_the_watchdog_ends_a_stream_that_progresses_but_runs_too_long() -> None:
    watchdog = StreamWatchdog(idle_s=5.0, total_s=0.3)
    cancelled = threading.Event()
    try:
        with watchdog.watch(cancelled.set) as w:
            deadline = time.monotonic() + CALL_S
            while not cancelled.is_set() and time.monotonic() < deadline:
                watchdog.touch(w)
                time.sleep(0.01)
        assert cancelled.is_set() and watchdog.cancelled == 1
    finally:
        watchdog.close()
    with pytest.raises(RuntimeError), watchdog.watch(cancelled.set):
        pass


def test_large_replicated_puts_hold_memory_two_at_a_time(tmp_path: Path) -> None:
    with running_node(tmp_path, large_put_wait_s=0.5) as node:
        coord = node.coordinator
        assert coord is not None
        coord.gate.clear()
        blobs = [os.urandom((4 << 20) + 1 + i) for i in range(3)]
        results: dict[int, Any] = {}

        def put(i: int) -> None:
            with BlobClient(node.address, TOKEN, timeout_s=CALL_S) as c:
                try:
                    results[i] = c.put(blobs[i])
                except api.BlobError as e:
                    results[i] = e

        threads = [threading.Thread(target=put, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + CALL_S
        # Two hold the slots (inside the coordinator); the third is refused after waiting 0.5 s.
        while (len(results) < 1 or coord.inflight < 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert coord.inflight == 2 and len(results) == 1
        coord.gate.set()
        for t in threads:
            t.join(CALL_S)
        assert coord.inflight_max == 2
        refused = [r for r in results.values() if isinstance(r, Exception)]
        assert len(refused) == 1 and isinstance(refused[0], ReplicaUnavailable)
        assert "large replicated puts" in str(refused[0])
        assert sum(isinstance(r, PutResult) for r in results.values()) == 2
        assert_healthy(node)


# ---------------------------------------------------------------- random put streams


@st.composite
def put_streams(draw: st.DrawFn) -> tuple[list[Any], bytes | None]:
    """(messages, the blob if the stream is a valid put of it, else None)."""
    data = draw(st.binary(max_size=300))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=4))) & set(range(1, len(data))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]  # later ones non-empty
    replicate = draw(st.booleans())
    msgs = [blob_pb2.PutRequest(data=p) for p in pieces]
    msgs[0].hash, msgs[0].size, msgs[0].replicate = blob_hash(data), len(data), replicate
    if draw(st.integers(0, 3)) == 0:
        return msgs, data
    # Break it: any field of any message, or the message list itself.
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["hash", "size", "data", "replicate", "drop", "extra", "garbage"]))
        i = draw(st.integers(0, len(msgs) - 1)) if msgs else 0
        if kind == "hash" and msgs:
            msgs[i].hash = draw(st.sampled_from([b"", bytes(31), bytes(33), blob_hash(b"x"), blob_hash(data)])
                                | st.binary(max_size=40))
        elif kind == "size" and msgs:
            msgs[i].size = draw(st.sampled_from([0, 1, len(data) + 1, max(0, len(data) - 1), BLOB_BYTES_MAX,
                                                 BLOB_BYTES_MAX + 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
        elif kind == "data" and msgs:
            msgs[i].data = draw(st.binary(max_size=300))
        elif kind == "replicate" and msgs:
            msgs[i].replicate = not msgs[i].replicate
        elif kind == "drop" and msgs:
            del msgs[i]
        elif kind == "extra":
            msgs.insert(i, blob_pb2.PutRequest(hash=draw(st.binary(max_size=33)), size=draw(st.integers(0, 2**64 - 1)),
                                               replicate=draw(st.booleans()), data=draw(st.binary(max_size=50))))
        elif kind == "garbage":
            msgs = [blob_pb2.PutRequest(hash=draw(st.binary(max_size=40)), size=draw(st.integers(0, 2**64 - 1)),
                                        replicate=draw(st.booleans()), data=draw(st.binary(max_size=100)))
                    for _ in range(draw(st.integers(0, 4)))]
    return msgs, None


def test_random_put_streams_get_a_status_and_never_store_a_wrong_blob(tmp_path: Path) -> None:
    with running_node(tmp_path, "pack") as node:
        stub = node.stub()

        @settings(max_examples=300, deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(put_streams())
        def check(case: tuple[list[Any], bytes | None]) -> None:
            msgs, valid = case
            try:
                r = stub.Put(iter(msgs), timeout=CALL_S, metadata=MD)
                code = Code.OK
            except grpc.RpcError as e:
                code = e.code()
            event(f"{code.name}{' replicated' if msgs and msgs[0].replicate else ''}")
            if valid is not None:
                assert code == Code.OK
            assert code in (Code.OK, Code.INVALID_ARGUMENT), code
            if code == Code.OK:
                # What the server accepted is exactly a blob that matches its hash.
                data = b"".join(m.data for m in msgs)
                assert r.hash == msgs[0].hash == blob_hash(data) and msgs[0].size == len(data)
                if msgs[0].replicate:
                    assert node.coordinator is not None and node.coordinator.store.get(r.hash) == data
                else:
                    assert node.store.get(r.hash) == data and list(r.stored_on) == ["n1"]

        check()
        assert_healthy(node)


_PUT_MANY_SIZES = st.sampled_from([0, 1, 127, 128, 129, 16383, 16384, 16385, 2_097_151, 2_097_152])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_PUT_MANY_SIZES, st.binary(min_size=32, max_size=32), st.sampled_from([0, 1, 200])),
                max_size=6))
def test_hand_encoded_put_many_is_byte_for_byte_protobufs_encoding(blobs: list[tuple[int, bytes, int]]) -> None:
    # RemoteReplica sends PutMany encoded by hand (one copy of each blob); the server parses it
    # with protobuf, so the two encodings must agree exactly, at every varint length boundary,
    # with and without the compression field.
    from objstore.pack import EncodedBlob
    from objstore.remote import encode_put_many

    items = [EncodedBlob(h, n + (7 if c else 0), c, os.urandom(n) if n < 20_000 else bytes([n % 251]) * n)
             for n, h, c in blobs]
    want = blob_pb2.PutManyRequest(blobs=[
        blob_pb2.PutRequest(hash=b.hash, size=b.size, data=b.stored, compression=b.compression)
        for b in items]).SerializeToString()
    got = encode_put_many(items)
    assert got == want
    back = blob_pb2.PutManyRequest.FromString(got)
    assert [(bytes(b.data), bytes(b.hash), b.size, b.replicate, b.compression) for b in back.blobs] == \
        [(b.stored, b.hash, b.size, False, b.compression) for b in items]


def test_a_compressed_put_many_is_stored_as_the_frame_it_came_in(node: Node) -> None:
    # A coordinator compresses once and ships the zstd frame; the replica decodes and checks
    # it, then keeps the frame as its record.
    from objstore.pack import COMPRESSION_ZSTD, EncodedBlob

    texty = b" ".join(b"block %d of a volume" % i for i in range(40_000))[:300_000]
    plain = os.urandom(5000)
    encoded = [EncodedBlob.of(texty, blob_hash(texty)), EncodedBlob.of(plain, blob_hash(plain))]
    assert encoded[0].compression == COMPRESSION_ZSTD and len(encoded[0].stored) < len(texty) // 4
    with RemoteReplica("n1", node.address, TOKEN, timeout_s=CALL_S) as r:
        assert r.put_many_encoded(encoded) == [False, False]
        assert r.put_many_encoded(encoded[:1]) == [True]
        assert r.get(blob_hash(texty)) == texty and r.get(blob_hash(plain)) == plain
    if isinstance(node.store, LocalStore):  # (the fake store keeps content, not records)
        info = node.store.info(blob_hash(texty))
        assert info is not None and info.compression == "zstd" and info.stored_size == len(encoded[0].stored)
        assert node.store.verify(blob_hash(texty)).verified
    assert_healthy(node)
