"""The KV gRPC service (proto/kv.proto) on top of a RaftNode and its KVState.

Every request is checked before anything is proposed: the tenant token (gRPC
metadata `x-floe-token`) must name a tenant, names, keys, values and batch
sizes must be within kv/limits.py, and the serialized command must fit one
small Raft entry. Writes are proposed only on the leader; a follower answers
FAILED_PRECONDITION with the leader's API address in the trailing metadata
`x-floe-leader`, and the client retries there.

Outcomes map to gRPC status codes so the client can tell what happened:
  OK                   applied (durable on a majority, applied on this node)
  FAILED_PRECONDITION  not the leader — not applied (x-floe-leader: where to go)
  UNAVAILABLE          no quorum / no leader — not applied (x-floe-applied: no)
  ABORTED              outcome unknown (timeout after proposing); retry with
                       the same request_id is safe
  NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT, UNAUTHENTICATED: as named.

Linearizable reads go through the log: the server commits a Barrier command
and reads its local state once the barrier is applied, so the read sees every
write that completed before it started (Raft §8, "read through the log"). Stale
reads serve the local state of whichever node is asked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent import futures
from typing import Any

import grpc

from kv import limits
from kv.errors import InvalidArgument, NotFound
from kv.raft import RaftError, RaftNode
from kv.state import KVState
from proto import kv_pb2, kv_pb2_grpc

log = logging.getLogger("floe.kv.server")

TOKEN_METADATA = "x-floe-token"
LEADER_METADATA = "x-floe-leader"
APPLIED_METADATA = "x-floe-applied"

# gRPC messages larger than this are refused by the transport before parsing:
# the largest legal request (a full batch) is under COMMAND_BYTES_MAX.
GRPC_MESSAGE_BYTES_MAX = 256 * 1024
# Concurrent RPCs served; more queue in gRPC (bounded by its own limits).
SERVER_THREADS = 64
# Longest a write waits for its commit when the client gives no deadline.
COMMIT_TIMEOUT_S = 5.0

_RESULT_STATUS = {
    kv_pb2.CommandResult.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    kv_pb2.CommandResult.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    kv_pb2.CommandResult.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.metadata = code, message, metadata


def _check_name(what: str, name: str) -> None:
    raw = name.encode()
    if not raw or len(raw) > limits.NAME_BYTES_MAX:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} name must be 1..{limits.NAME_BYTES_MAX} bytes")


def _check_key(key: bytes) -> None:
    if not key or len(key) > limits.KEY_BYTES_MAX:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"key must be 1..{limits.KEY_BYTES_MAX} bytes (got {len(key)})")


def _check_value(value: bytes) -> None:
    if len(value) > limits.VALUE_BYTES_MAX:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"value is {len(value)} bytes; the limit is {limits.VALUE_BYTES_MAX}")


def _check_request_id(rid: bytes) -> bytes:
    if len(rid) > limits.REQUEST_ID_BYTES_MAX:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id longer than {limits.REQUEST_ID_BYTES_MAX} bytes")
    return rid or os.urandom(16)


class KVService(kv_pb2_grpc.KVServicer):  # type: ignore[misc]
    def __init__(self, raft: RaftNode, state: KVState, tenants: Mapping[str, str],
                 api_of_raft: Mapping[str, str], node_id: str) -> None:
        self._node_id = node_id
        self._raft = raft
        self._state = state
        self._tenants = dict(tenants)  # token -> tenant
        self._api_of_raft = dict(api_of_raft)

    # ---------------------------------------------------------------- plumbing

    def _tenant(self, context: grpc.ServicerContext) -> str:
        token = dict(context.invocation_metadata()).get(TOKEN_METADATA, "")
        tenant = self._tenants.get(token)
        if tenant is None:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown tenant token")
        return tenant

    def _require_leader(self) -> None:
        if not self._raft.is_leader():
            leader = self._raft.status()["leader_raft"]
            api = self._api_of_raft.get(leader, "")
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"not the leader (leader: {api or 'unknown'})",
                         ((LEADER_METADATA, api),))

    def _commit(self, cmd: kv_pb2.Command, context: grpc.ServicerContext) -> kv_pb2.CommandResult:
        raw = cmd.SerializeToString()
        if len(raw) > limits.COMMAND_BYTES_MAX:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"command is {len(raw)} bytes; one Raft entry holds at most {limits.COMMAND_BYTES_MAX}")
        self._require_leader()
        remaining = context.time_remaining()
        timeout = COMMIT_TIMEOUT_S if remaining is None else max(0.01, min(COMMIT_TIMEOUT_S, remaining - 0.05))
        try:
            out = self._raft.commit(raw, timeout)
        except RaftError as e:
            if e.applied is False:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"not applied: {e}", ((APPLIED_METADATA, "no"),)) from e
            raise _Abort(grpc.StatusCode.ABORTED, f"indeterminate: {e}") from e
        result = kv_pb2.CommandResult.FromString(out)
        return result

    def _write(self, cmd: kv_pb2.Command, context: grpc.ServicerContext) -> kv_pb2.CommandResult:
        result = self._commit(cmd, context)
        status = _RESULT_STATUS.get(result.code)
        if status is not None:
            raise _Abort(status, result.message)
        return result

    def _read_barrier(self, consistency: int, tenant: str, context: grpc.ServicerContext) -> int:
        if consistency == kv_pb2.STALE:
            return self._state.applied_index
        return int(self._commit(kv_pb2.Command(tenant=tenant, barrier=kv_pb2.BarrierCmd()), context).index)

    @staticmethod
    def _run(fn: Any) -> Any:
        def handler(self: KVService, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return fn(self, request, context)
            except _Abort as e:
                if e.metadata:
                    context.set_trailing_metadata(e.metadata)
                context.abort(e.code, e.message)
            except NotFound as e:
                context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            except (InvalidArgument, ValueError, TypeError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise AssertionError("unreachable")  # context.abort raises
        handler.__name__ = fn.__name__
        return handler

    # ---------------------------------------------------------------- RPCs

    @_run
    def CreateStore(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        _check_name("store", request.store)
        cmd = kv_pb2.Command(tenant=tenant, request_id=_check_request_id(request.request_id),
                             create_store=kv_pb2.CreateStoreCmd(name=request.store))
        return kv_pb2.WriteResponse(index=self._write(cmd, context).index)

    @_run
    def DropStore(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        _check_name("store", request.store)
        cmd = kv_pb2.Command(tenant=tenant, request_id=_check_request_id(request.request_id),
                             drop_store=kv_pb2.DropStoreCmd(name=request.store))
        return kv_pb2.WriteResponse(index=self._write(cmd, context).index)

    @_run
    def ListStores(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        self._read_barrier(request.consistency, tenant, context)
        return kv_pb2.ListStoresResponse(stores=[kv_pb2.StoreInfo(name=n, id=i, keyspaces=ks)
                                                 for n, i, ks in self._state.list_stores(tenant)])

    @_run
    def CreateKeyspace(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        _check_name("store", request.store)
        _check_name("keyspace", request.keyspace)
        cmd = kv_pb2.Command(tenant=tenant, request_id=_check_request_id(request.request_id),
                             create_keyspace=kv_pb2.CreateKeyspaceCmd(store=request.store, keyspace=request.keyspace))
        return kv_pb2.WriteResponse(index=self._write(cmd, context).index)

    @_run
    def ListKeyspaces(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        self._read_barrier(request.consistency, tenant, context)
        return kv_pb2.ListKeyspacesResponse(keyspaces=self._state.list_keyspaces(tenant, request.store))

    @_run
    def Get(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        _check_key(request.key)
        index = self._read_barrier(request.consistency, tenant, context)
        found = self._state.get(tenant, request.store, request.keyspace, request.key)
        if found is None:
            return kv_pb2.GetResponse(found=False, read_index=index)
        return kv_pb2.GetResponse(found=True, value=found[0], version=found[1], read_index=index)

    @_run
    def Put(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        _check_key(request.key)
        _check_value(request.value)
        batch = kv_pb2.BatchCmd(store=request.store, mutations=[
            kv_pb2.Mutation(keyspace=request.keyspace, key=request.key, put=request.value)])
        cmd = kv_pb2.Command(tenant=tenant, request_id=_check_request_id(request.request_id), batch=batch)
        return kv_pb2.WriteResponse(index=self._write(cmd, context).index)

    @_run
    def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        _check_key(request.key)
        batch = kv_pb2.BatchCmd(store=request.store, mutations=[
            kv_pb2.Mutation(keyspace=request.keyspace, key=request.key, delete=True)])
        cmd = kv_pb2.Command(tenant=tenant, request_id=_check_request_id(request.request_id), batch=batch)
        return kv_pb2.WriteResponse(index=self._write(cmd, context).index)

    @_run
    def Scan(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        index = self._read_barrier(request.consistency, tenant, context)
        items, cont = self._state.scan(tenant, request.store, request.keyspace, prefix=request.prefix,
                                       start=request.start, end=request.end, limit=request.limit,
                                       continuation=request.continuation)
        return kv_pb2.ScanResponse(items=[kv_pb2.KeyValue(key=k, value=v, version=ver) for k, v, ver in items],
                                   continuation=cont, read_index=index)

    @_run
    def Batch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        tenant = self._tenant(context)
        b = request.batch
        _check_name("store", b.store)
        if len(b.conditions) + len(b.mutations) > limits.BATCH_OPS_MAX:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"a batch holds at most {limits.BATCH_OPS_MAX} operations")
        for c in b.conditions:
            _check_key(c.key)
        for m in b.mutations:
            _check_key(m.key)
            _check_value(m.put)
        cmd = kv_pb2.Command(tenant=tenant, request_id=_check_request_id(request.request_id), batch=b)
        result = self._commit(cmd, context)
        if result.code == kv_pb2.CommandResult.CONDITION_FAILED:
            return kv_pb2.BatchResponse(applied=False, index=result.index, failed_condition=result.failed_condition)
        status = _RESULT_STATUS.get(result.code)
        if status is not None:
            raise _Abort(status, result.message)
        return kv_pb2.BatchResponse(applied=True, index=result.index)

    @_run
    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        s = self._raft.status()
        return kv_pb2.StatusResponse(
            node_id=self._node_id, role=s["role"], term=s["term"],
            commit_index=s["commit_index"], applied_index=s["applied_index"],
            leader=self._api_of_raft.get(s["leader_raft"], ""), log_len=s["log_len"], ready=s["ready"],
            raft_peers_connected=s["connected"])


def serve(service: KVService, address: str) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="kv-grpc"),
        # so_reuseport 0: a second server on the same address:port must fail to
        # bind, not silently share the port (gRPC enables SO_REUSEPORT on Linux).
        options=[("grpc.so_reuseport", 0),
                 ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
                 ("grpc.max_send_message_length", 16 * 1024 * 1024)],
        maximum_concurrent_rpcs=4 * SERVER_THREADS,
    )
    kv_pb2_grpc.add_KVServicer_to_server(service, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot bind the KV API to {address}")
    server.start()
    return server
