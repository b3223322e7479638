"""KV client: finds the leader, retries boundedly, and says what happened.

Every call has a total deadline (`timeout_s`) and at most `attempts` tries
(backoff is capped at BACKOFF_S_MAX, so the default attempts outlast a leader
election; the deadline is what bounds a call).
Writes carry a request_id chosen once per call, so a retry after an unknown
outcome can never apply twice (the state machine deduplicates by it).

What an exception means:
  NotLeader / Unavailable  definitely not applied (safe to retry anything)
  Indeterminate            a write may or may not have applied (at least one
                           attempt may have reached the leader and no attempt
                           gave a definite answer)
  NotFound, AlreadyExists, InvalidArgument, PermissionDenied: the request's fault.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc

from kv.errors import (
    AlreadyExists,
    Indeterminate,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from kv.server import APPLIED_METADATA, LEADER_METADATA, TOKEN_METADATA
from proto import kv_pb2, kv_pb2_grpc

# Per-attempt deadline cap: long enough for a commit during a leader change.
ATTEMPT_TIMEOUT_S = 2.0
BACKOFF_S_MIN = 0.02
BACKOFF_S_MAX = 0.3


class KVClient:
    def __init__(self, servers: Sequence[str], token: str, *, timeout_s: float = 5.0, attempts: int = 60) -> None:
        if not servers:
            raise ValueError("no KV servers given")
        self._servers = list(servers)
        self._token = token
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._leader: str | None = None
        self._lock = threading.Lock()
        self._stubs: dict[str, kv_pb2_grpc.KVStub] = {}
        self._channels: list[grpc.Channel] = []
        self._rr = random.randrange(len(self._servers))

    # ---------------------------------------------------------------- plumbing

    def _stub(self, server: str) -> kv_pb2_grpc.KVStub:
        with self._lock:
            stub = self._stubs.get(server)
            if stub is None:
                ch = grpc.insecure_channel(server, options=[("grpc.max_receive_message_length", 16 * 1024 * 1024),
                                                            ("grpc.enable_retries", 0)])
                self._channels.append(ch)
                stub = self._stubs[server] = kv_pb2_grpc.KVStub(ch)
            return stub

    def _next_server(self) -> str:
        with self._lock:
            if self._leader:
                return self._leader
            self._rr = (self._rr + 1) % len(self._servers)
            return self._servers[self._rr]

    def _call(self, method: str, request: Any, *, write: bool) -> Any:
        deadline = time.monotonic() + self._timeout_s
        maybe_applied = False
        last: str = "no attempt made"
        backoff = BACKOFF_S_MIN
        for _attempt in range(self._attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            server = self._next_server()
            try:
                return getattr(self._stub(server), method)(
                    request, timeout=min(ATTEMPT_TIMEOUT_S, remaining),
                    metadata=((TOKEN_METADATA, self._token),))
            except grpc.RpcError as e:
                code = e.code()
                trailing = dict(e.trailing_metadata() or ())
                details = e.details() or str(code)
                last = f"{server}: {details}"
                if code == grpc.StatusCode.FAILED_PRECONDITION and LEADER_METADATA in trailing:
                    leader = trailing[LEADER_METADATA]
                    with self._lock:
                        self._leader = leader or None
                    if not leader:
                        time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                        backoff = min(BACKOFF_S_MAX, backoff * 2)
                    continue
                if code == grpc.StatusCode.NOT_FOUND:
                    raise NotFound(details) from None
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    raise AlreadyExists(details) from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(details) from None
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise PermissionDenied(details) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger" in details.lower():
                    raise InvalidArgument(details) from None
                # Anything else: try another node. Decide what we know.
                definite = code == grpc.StatusCode.UNAVAILABLE and (
                    trailing.get(APPLIED_METADATA) == "no" or "failed to connect" in details.lower()
                    or "connection refused" in details.lower())
                if write and not definite:
                    maybe_applied = True
                with self._lock:
                    self._leader = None
                time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff = min(BACKOFF_S_MAX, backoff * 2)
        if maybe_applied:
            raise Indeterminate(f"outcome unknown after retries; last error: {last}")
        raise Unavailable(f"no node could serve the request; last error: {last}")

    @staticmethod
    def _rid() -> bytes:
        return os.urandom(16)

    @staticmethod
    def _consistency(stale: bool) -> Any:
        return kv_pb2.STALE if stale else kv_pb2.LINEARIZABLE

    # ---------------------------------------------------------------- API

    def create_store(self, store: str) -> int:
        return int(self._call("CreateStore", kv_pb2.CreateStoreRequest(store=store, request_id=self._rid()),
                              write=True).index)

    def drop_store(self, store: str) -> int:
        return int(self._call("DropStore", kv_pb2.DropStoreRequest(store=store, request_id=self._rid()),
                              write=True).index)

    def list_stores(self, *, stale: bool = False) -> list[tuple[str, int, list[str]]]:
        r = self._call("ListStores", kv_pb2.ListStoresRequest(consistency=self._consistency(stale)), write=False)
        return [(s.name, s.id, list(s.keyspaces)) for s in r.stores]

    def create_keyspace(self, store: str, keyspace: str) -> int:
        req = kv_pb2.CreateKeyspaceRequest(store=store, keyspace=keyspace, request_id=self._rid())
        return int(self._call("CreateKeyspace", req, write=True).index)

    def list_keyspaces(self, store: str, *, stale: bool = False) -> list[str]:
        req = kv_pb2.ListKeyspacesRequest(store=store, consistency=self._consistency(stale))
        return list(self._call("ListKeyspaces", req, write=False).keyspaces)

    def get(self, store: str, keyspace: str, key: bytes, *, stale: bool = False) -> tuple[bytes, int] | None:
        req = kv_pb2.GetRequest(store=store, keyspace=keyspace, key=key, consistency=self._consistency(stale))
        r = self._call("Get", req, write=False)
        return (bytes(r.value), int(r.version)) if r.found else None

    def put(self, store: str, keyspace: str, key: bytes, value: bytes) -> int:
        req = kv_pb2.PutRequest(store=store, keyspace=keyspace, key=key, value=value, request_id=self._rid())
        return int(self._call("Put", req, write=True).index)

    def delete(self, store: str, keyspace: str, key: bytes) -> int:
        req = kv_pb2.DeleteRequest(store=store, keyspace=keyspace, key=key, request_id=self._rid())
        return int(self._call("Delete", req, write=True).index)

    def scan(self, store: str, keyspace: str, *, prefix: bytes = b"", start: bytes = b"", end: bytes = b"",
             limit: int = 0, continuation: bytes = b"", stale: bool = False
             ) -> tuple[list[tuple[bytes, bytes, int]], bytes]:
        req = kv_pb2.ScanRequest(store=store, keyspace=keyspace, prefix=prefix, start=start, end=end, limit=limit,
                                 continuation=continuation, consistency=self._consistency(stale))
        r = self._call("Scan", req, write=False)
        return [(bytes(i.key), bytes(i.value), int(i.version)) for i in r.items], bytes(r.continuation)

    def batch(self, store: str, *, conditions: Sequence[kv_pb2.Condition] = (),
              mutations: Sequence[kv_pb2.Mutation] = ()) -> tuple[bool, int, int]:
        """Atomic conditional batch. Returns (applied, index, failed_condition)."""
        req = kv_pb2.BatchRequest(batch=kv_pb2.BatchCmd(store=store, conditions=conditions, mutations=mutations),
                                  request_id=self._rid())
        r = self._call("Batch", req, write=True)
        return bool(r.applied), int(r.index), int(r.failed_condition)

    def status(self, server: str, *, timeout_s: float = 1.0) -> dict[str, Any]:
        try:
            r = self._stub(server).Status(kv_pb2.StatusRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise Unavailable(f"{server}: {e.details() or e.code()}") from None
        return {"node_id": r.node_id, "role": r.role, "term": r.term, "commit_index": r.commit_index,
                "applied_index": r.applied_index, "leader": r.leader, "ready": r.ready, "log_len": r.log_len,
                "connected": list(r.raft_peers_connected)}

    def close(self) -> None:
        with self._lock:
            for ch in self._channels:
                ch.close()
            self._channels.clear()
            self._stubs.clear()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

