"""The KV gRPC API on a one-node Raft group in this process: tenants, limits,
bad input, idempotency. Every byte from the network is untrusted: garbage gets
a gRPC error and the node keeps serving."""

from __future__ import annotations

import socket
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import RaftTiming
from cluster.node import raft_conf
from kv import limits
from kv.client import KVClient
from kv.errors import InvalidArgument, NotFound, PermissionDenied
from kv.raft import RaftNode
from kv.server import TOKEN_METADATA, KVService, serve
from kv.state import KVState
from proto import kv_pb2, kv_pb2_grpc

TOKENS = {"tok-a": "alice", "tok-b": "bob"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


node_fixture_raft: list[RaftNode] = []


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = tmp_path_factory.mktemp("node")
    state = KVState(str(d / "state"))
    raft_addr = f"127.0.0.1:{free_port()}"
    raft = RaftNode(raft_addr, [], str(d / "raft"), state, raft_conf(RaftTiming()))
    api = f"127.0.0.1:{free_port()}"
    server = serve(KVService(raft, state, TOKENS, {raft_addr: api}, "n1"), api)
    deadline = time.monotonic() + 10
    while raft.role() != "leader":
        if time.monotonic() > deadline:
            raise RuntimeError("single node did not become leader")
        time.sleep(0.05)
    node_fixture_raft.append(raft)
    yield api
    node_fixture_raft.clear()
    server.stop(0)
    raft.destroy_synchronous()
    state.close()


@pytest.fixture
def alice(node):
    with KVClient([node], "tok-a", timeout_s=3) as c:
        yield c


@pytest.fixture
def bob(node):
    with KVClient([node], "tok-b", timeout_s=3) as c:
        yield c


def test_tenants_never_see_each_other(alice, bob):
    alice.create_store("shared-name")
    alice.create_keyspace("shared-name", "k")
    alice.put("shared-name", "k", b"secret", b"alice's")
    assert "shared-name" not in [s[0] for s in bob.list_stores()]
    with pytest.raises(NotFound):
        bob.get("shared-name", "k", b"secret")
    with pytest.raises(NotFound):
        bob.put("shared-name", "k", b"secret", b"bob's")
    with pytest.raises(NotFound):
        bob.scan("shared-name", "k")
    bob.create_store("shared-name")  # bob's own store of the same name
    bob.create_keyspace("shared-name", "k")
    assert bob.get("shared-name", "k", b"secret") is None
    bob.put("shared-name", "k", b"secret", b"bob's")
    assert alice.get("shared-name", "k", b"secret")[0] == b"alice's"
    bob.drop_store("shared-name")
    assert alice.get("shared-name", "k", b"secret")[0] == b"alice's"


def test_unknown_or_missing_token_is_refused(node):
    with KVClient([node], "nope", timeout_s=2) as c, pytest.raises(PermissionDenied):
        c.list_stores()
    stub = kv_pb2_grpc.KVStub(grpc.insecure_channel(node))
    with pytest.raises(grpc.RpcError) as e:
        stub.ListStores(kv_pb2.ListStoresRequest(), timeout=2)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_limits_give_clear_errors(alice):
    alice.create_store("lim")
    alice.create_keyspace("lim", "k")
    with pytest.raises(InvalidArgument, match="key must be"):
        alice.put("lim", "k", b"x" * (limits.KEY_BYTES_MAX + 1), b"v")
    with pytest.raises(InvalidArgument, match="key must be"):
        alice.put("lim", "k", b"", b"v")
    with pytest.raises(InvalidArgument, match="value is"):
        alice.put("lim", "k", b"k", b"v" * (limits.VALUE_BYTES_MAX + 1))
    big = [kv_pb2.Mutation(keyspace="k", key=b"k%d" % i, put=b"v" * limits.VALUE_BYTES_MAX) for i in range(4)]
    with pytest.raises(InvalidArgument, match="Raft entry"):
        alice.batch("lim", mutations=big)
    many = [kv_pb2.Mutation(keyspace="k", key=b"k%d" % i, put=b"") for i in range(limits.BATCH_OPS_MAX + 1)]
    with pytest.raises(InvalidArgument, match="at most"):
        alice.batch("lim", mutations=many)
    with pytest.raises(InvalidArgument):
        alice.create_store("x" * (limits.NAME_BYTES_MAX + 1))
    with pytest.raises(NotFound):
        alice.put("no-such-store", "k", b"k", b"v")
    with pytest.raises(NotFound):
        alice.put("lim", "no-such-keyspace", b"k", b"v")


def test_conditional_batch_and_versions(alice):
    alice.create_store("cas")
    alice.create_keyspace("cas", "k")
    v1 = alice.put("cas", "k", b"a", b"1")
    ok, _, _ = alice.batch("cas", conditions=[kv_pb2.Condition(keyspace="k", key=b"a", version_equals=v1)],
                           mutations=[kv_pb2.Mutation(keyspace="k", key=b"a", put=b"2")])
    assert ok
    ok, _, failed = alice.batch("cas", conditions=[
        kv_pb2.Condition(keyspace="k", key=b"b", absent=True),
        kv_pb2.Condition(keyspace="k", key=b"a", version_equals=v1)],
        mutations=[kv_pb2.Mutation(keyspace="k", key=b"a", put=b"3")])
    assert (ok, failed) == (False, 1)
    assert alice.get("cas", "k", b"a")[0] == b"2"


def test_retry_with_the_same_request_id_applies_once(node, alice):
    alice.create_store("idem")
    alice.create_keyspace("idem", "k")
    stub = kv_pb2_grpc.KVStub(grpc.insecure_channel(node))
    md = ((TOKEN_METADATA, "tok-a"),)
    cond = kv_pb2.Condition(keyspace="k", key=b"once", absent=True)
    req = kv_pb2.BatchRequest(batch=kv_pb2.BatchCmd(store="idem", conditions=[cond], mutations=[
        kv_pb2.Mutation(keyspace="k", key=b"once", put=b"x")]), request_id=b"r" * 16)
    first = stub.Batch(req, metadata=md, timeout=3)
    again = stub.Batch(req, metadata=md, timeout=3)  # a retry: the condition would now fail
    assert first.applied and again.applied and first.index == again.index


def test_oversize_grpc_message_is_refused_before_parsing(node):
    stub = kv_pb2_grpc.KVStub(grpc.insecure_channel(node))
    with pytest.raises(grpc.RpcError) as e:
        stub.Put(kv_pb2.PutRequest(store="s", keyspace="k", key=b"k", value=b"v" * (1 << 20)),
                 metadata=((TOKEN_METADATA, "tok-a"),), timeout=3)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


METHODS = ["CreateStore", "DropStore", "ListStores", "CreateKeyspace", "ListKeyspaces", "Get", "Put", "Delete",
           "Scan", "Batch", "Status"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=300))
def test_garbage_requests_get_errors_and_the_node_keeps_serving(node, method, payload):
    ch = grpc.insecure_channel(node)
    call = ch.unary_unary(f"/floe.kv.KV/{method}", request_serializer=None, response_deserializer=None)
    try:
        call(payload, metadata=((TOKEN_METADATA, "tok-a"),), timeout=3)
    except grpc.RpcError as e:
        # Malformed protobuf, wrong field types, unknown store, bad limits: an
        # error status, never a hang (DEADLINE_EXCEEDED) or a dead server.
        assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, e.details()
        assert e.code() != grpc.StatusCode.UNAVAILABLE, e.details()
    stub = kv_pb2_grpc.KVStub(ch)
    assert stub.Status(kv_pb2.StatusRequest(), timeout=3).role == "leader"
    ch.close()


def test_bad_read_arguments_are_invalid_argument_not_unknown(alice):
    alice.create_store("reads")
    alice.create_keyspace("reads", "k")
    with pytest.raises(InvalidArgument):
        alice.scan("reads", "k", continuation=b"\xfe not a token")
    with pytest.raises(InvalidArgument):
        alice.scan("reads", "k", prefix=b"p" * (limits.KEY_BYTES_MAX + 1))
    with pytest.raises(InvalidArgument):
        alice.list_keyspaces("bad/name")


def test_the_applied_entry_index_is_raft_last_applied_plus_one(node, alice):
    """pysyncobj 0.3.17 increments raftLastApplied after a replicated method
    returns, so inside it the entry's index is raftLastApplied + 1. The index
    the state machine stored (the put's result and the key's version) must be
    the index of the entry in the Raft journal holding that command."""
    raft = node_fixture_raft[0]
    alice.create_store("idx")
    alice.create_keyspace("idx", "k")
    for i in range(5):
        index = alice.put("idx", "k", b"key%d" % i, b"v%d" % i)
        journal = raft.floe_journal
        entry = next(journal[p] for p in range(len(journal)) if journal[p][1] == index)
        assert b"key%d" % i in bytes(entry[0]), "the result's index names another entry"
        assert alice.get("idx", "k", b"key%d" % i) == (b"v%d" % i, index)
