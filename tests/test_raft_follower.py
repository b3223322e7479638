"""A Raft follower driven message by message (Raft §5.3): stale, duplicate and
overlapping AppendEntries never remove an acknowledged entry; a real term
conflict still truncates.

The follower is a real RaftNode (pysyncobj + floe's journal and transport)
with its tick thread off; messages are handed to the transport's receive path
exactly as the socket layer would, and its replies are read from the
transport's outgoing queue.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pysyncobj.node import TCPNode

from kv.raft import RaftNode, conflict_only

NOOP = b"\x01"  # pysyncobj's NO_OP command byte


class FakeState:
    """Only what RaftNode touches when no entry is applied."""

    applied_index = 0

    def apply(self, index: int, command: bytes) -> bytes:  # pragma: no cover - no ticks run
        raise AssertionError("nothing is applied in these tests")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_follower(path: Any) -> tuple[RaftNode, Any]:
    conf = {"autoTick": False, "raftMinTimeout": 1000.0, "raftMaxTimeout": 2000.0, "appendEntriesPeriod": 1.0,
            "connectionTimeout": 3000.0, "leaderFallbackTimeout": 100.0}
    node = RaftNode(f"127.0.0.1:{free_port()}", ["127.0.0.1:9", "127.0.0.1:10"], str(path), FakeState(), conf)  # type: ignore[arg-type]
    return node, node._SyncObj__transport


def leader_log(terms: list[int]) -> list[tuple[bytes, int, int]]:
    """Index 1 is pysyncobj's initial no-op (term 0) on every node."""
    return [(NOOP, 1, 0)] + [(b"\x00cmd-%d-%d" % (i, t), i, t) for i, t in enumerate(terms, start=2)]


def append_entries(log: list[tuple[bytes, int, int]], term: int, prev: int, count: int, commit: int) -> dict:
    return {"type": "append_entries", "term": term, "commit_index": commit, "prevLogIdx": prev,
            "prevLogTerm": log[prev - 1][2], "entries": log[prev: prev + count]}


def follower_log(node: RaftNode) -> list[tuple[bytes, int, int]]:
    j = node.floe_journal
    return [(bytes(j[i][0]), j[i][1], j[i][2]) for i in range(len(j))]


def acks(transport: Any) -> list[int]:
    out = [m["next_node_idx"] - 1 for _n, m in transport._queue
           if m["type"] == "next_node_idx" and m["success"]]
    transport._queue.clear()
    return out


messages = st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000)),
                    min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(3, 25), msgs=messages)
def test_stale_and_duplicate_append_entries_never_drop_acknowledged_entries(tmp_path_factory, n, msgs):
    node, transport = make_follower(tmp_path_factory.mktemp("raft"))
    try:
        log = leader_log([1] * n)
        leader = TCPNode("127.0.0.1:9")
        acked = 0
        for a, b, c in msgs:
            prev = 1 + a % (len(log) - 1)
            count = b % (len(log) - prev + 1)
            commit = c % (len(log) + 1)
            transport._onMessageReceived(leader, append_entries(log, 1, prev, count, commit))
            got = acks(transport)
            acked = max([acked, *got])
            mine = follower_log(node)
            assert mine == log[: len(mine)], "the follower holds something the leader never sent"
            assert len(mine) >= acked, f"acknowledged entry {acked} was removed (log ends at {len(mine)})"
            assert node.raftCommitIndex <= len(mine)
    finally:
        node._destroy()


def test_real_term_conflict_truncates(tmp_path):
    node, transport = make_follower(tmp_path)
    try:
        old = leader_log([1, 1, 1])  # indexes 2..4 in term 1, never committed
        transport._onMessageReceived(TCPNode("127.0.0.1:9"), append_entries(old, 1, 1, 3, 1))
        assert [e[2] for e in follower_log(node)] == [0, 1, 1, 1]
        new = leader_log([1, 2, 2, 2])  # the term-2 leader kept index 2 only
        transport._onMessageReceived(TCPNode("127.0.0.1:10"), append_entries(new, 2, 2, 3, 2))
        assert follower_log(node) == new
        assert acks(transport)[-1] == 5
    finally:
        node._destroy()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shared=st.integers(0, 5), old_extra=st.integers(1, 6), new_extra=st.integers(1, 6),
       msgs=messages, interleave=st.lists(st.booleans(), min_size=1, max_size=40))
def test_new_leader_overrides_uncommitted_tail_in_any_delivery_order(tmp_path_factory, shared, old_extra,
                                                                       new_extra, msgs, interleave):
    node, transport = make_follower(tmp_path_factory.mktemp("raft"))
    try:
        old = leader_log([1] * (shared + old_extra))
        new = leader_log([1] * shared + [2] * new_extra)
        l1, l2 = TCPNode("127.0.0.1:9"), TCPNode("127.0.0.1:10")
        # The old leader's whole log arrives first (nothing beyond `shared` was committed).
        transport._onMessageReceived(l1, append_entries(old, 1, 1, len(old) - 1, 1 + shared))
        acks(transport)
        acked2 = 0
        for (a, b, c), from_old in zip(msgs, interleave, strict=False):
            log, term, sender = (old, 1, l1) if from_old else (new, 2, l2)
            prev = 1 + a % (len(log) - 1)
            count = b % (len(log) - prev + 1)
            # The old leader committed only the shared prefix; the new one may
            # have committed its whole log with other followers.
            commit = min(c % (len(log) + 1), 1 + shared) if from_old else c % (len(log) + 1)
            transport._onMessageReceived(sender, append_entries(log, term, prev, count, commit))
            got = acks(transport)
            mine = follower_log(node)
            if not from_old:
                acked2 = max([acked2, *got])
            if acked2:
                assert mine[:acked2] == new[:acked2], "an entry acknowledged to the new leader was lost"
            committed = node.raftCommitIndex
            assert mine[:committed] == new[:committed], "committed an entry the leader does not have"
        # Finally the new leader sends everything: the follower converges on its log.
        transport._onMessageReceived(l2, append_entries(new, 2, 1, len(new) - 1, len(new)))
        assert follower_log(node) == new
    finally:
        node._destroy()


@pytest.mark.parametrize(
    ("mine", "msg", "expect_prev", "expect_entries", "cap"),
    [
        # Exactly extends the log: untouched.
        ([1, 1], (2, [3]), 2, [3], None),
        # Fully duplicated and shorter than our log: heartbeat at our end, ack capped.
        ([1, 1, 1, 1], (1, [2, 3]), 4, [], 4),
        # Partially duplicated: skip the known entries, append the rest.
        ([1, 1, 1], (1, [2, 3, 4, 5]), 3, [4, 5], None),
    ],
)
def test_conflict_only_rewrite_table(mine, msg, expect_prev, expect_entries, cap):
    log = [(NOOP, 1, 0)] + [(b"c", i, t) for i, t in enumerate(mine[1:], start=2)]
    prev, idxs = msg
    m = {"type": "append_entries", "term": 1, "commit_index": 99, "prevLogIdx": prev, "prevLogTerm": log[prev - 1][2],
         "entries": [(b"c", i, 1) for i in idxs]}
    out, got_cap = conflict_only(log, m)
    assert out["prevLogIdx"] == expect_prev
    assert [e[1] for e in out["entries"]] == expect_entries
    assert got_cap == cap
    if cap is not None:
        assert out["commit_index"] == cap - 1  # never commit past what the leader vouched for


def test_barrier_syncs_the_journal_before_any_message_leaves(tmp_path, monkeypatch):
    """The persistence barrier (Raft §5.1): an acknowledgement is sent only
    after the entries it acknowledges are fsynced."""
    from pysyncobj.transport import TCPTransport

    node, transport = make_follower(tmp_path)
    seen: list[tuple[str, bool]] = []
    monkeypatch.setattr(TCPTransport, "send",
                        lambda self, n, m: seen.append((m["type"], node.floe_journal.dirty)) or True)
    try:
        log = leader_log([1, 1, 1])
        syncs = node.floe_journal.syncs
        transport._onMessageReceived(TCPNode("127.0.0.1:9"), append_entries(log, 1, 1, 3, 1))
        assert node.floe_journal.dirty and not seen  # appended, not yet durable, nothing sent
        transport.barrier()
        assert seen == [("next_node_idx", False)]
        assert node.floe_journal.syncs == syncs + 1
    finally:
        node._destroy()


def test_a_vote_survives_power_loss_so_no_second_vote_in_that_term(tmp_path, monkeypatch):
    """Raft §5.1/§5.2: votedFor is persisted before the vote is sent. A node
    that granted its vote in term 5 and then lost power (unsynced writes
    dropped) must refuse another candidate in term 5."""
    from kv import durable

    monkeypatch.setenv(durable.SIM_ENV, "1")
    raft_dir = tmp_path / "raft"

    def vote_request(candidate: str, term: int) -> tuple[TCPNode, dict]:
        return TCPNode(candidate), {"type": "request_vote", "term": term, "last_log_index": 1, "last_log_term": 0}

    node, transport = make_follower(raft_dir)
    transport._onMessageReceived(*vote_request("127.0.0.1:9", 5))
    assert [m["type"] for _n, m in transport._queue] == ["response_vote"]
    node._destroy()
    durable.power_loss(tmp_path)

    node, transport = make_follower(raft_dir)
    try:
        assert (node.raftCurrentTerm, node.floe_journal.getVotedForNodeId()) == (5, "127.0.0.1:9")
        transport._onMessageReceived(*vote_request("127.0.0.1:10", 5))
        assert not [m for _n, m in transport._queue if m["type"] == "response_vote"], "voted twice in term 5"
    finally:
        node._destroy()


def test_raft_port_refuses_pickled_code_and_zlib_bombs(tmp_path):
    """Every byte from the network is untrusted: a pickle that names a callable
    is refused (no code runs), an oversized inflation is refused, and the node
    keeps serving its Raft port."""
    import os
    import pickle
    import struct
    import zlib

    node, transport = make_follower(tmp_path / "raft")
    try:
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        host, port = node.selfNode.address.rsplit(":", 1)
        payloads = [zlib.compress(pickle.dumps(Evil(), 2)),
                    zlib.compress(b"\x00" * (70 * 1024 * 1024), 9),
                    b"garbage that is not zlib"]
        for payload in payloads:
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(struct.pack("i", len(payload)) + payload)
                for _ in range(50):
                    node.doTick(0.01)
                s.settimeout(1)
                assert s.recv(1) == b"", "the node should close the connection"
        assert not marker.exists(), "unpickling ran attacker code"
        # Plain data still flows: a vote request is answered.
        transport._onMessageReceived(TCPNode("127.0.0.1:9"), {"type": "request_vote", "term": 3,
                                                               "last_log_index": 1, "last_log_term": 0})
        assert [m["type"] for _n, m in transport._queue] == ["response_vote"]
    finally:
        node._destroy()


def test_safe_wire_round_trips_every_message_shape():
    from kv.raft import _SafeWire

    for msg in [{"type": "append_entries", "term": 3, "commit_index": 5, "prevLogIdx": 4, "prevLogTerm": 2,
                 "entries": [(b"\x00cmd", 5, 3)]},
                {"type": "append_entries", "term": 1, "commit_index": 1, "serialized": (b"chunk", True, False)},
                {"type": "append_entries", "term": 1, "commit_index": 1, "serialized": (b"", False, True)},
                {"type": "append_entries", "term": 1, "commit_index": 1, "entries": [(b"", 2, 1)]},
                {"type": "next_node_idx", "next_node_idx": 7, "reset": False, "success": True},
                "127.0.0.1:7100", ["status", "x"], None]:
        assert _SafeWire.loads(_SafeWire.decompress(_SafeWire.compress(_SafeWire.dumps(msg), 3))) == msg


def test_raft_secret_tags_messages_and_refuses_untagged_or_forged_ones():
    from kv.raft import _SafeWire, set_raft_secret

    msg = {"type": "request_vote", "term": 3, "last_log_index": 1, "last_log_term": 0}
    try:
        set_raft_secret("s3cret")
        wire = _SafeWire.compress(_SafeWire.dumps(msg), 3)
        assert _SafeWire.loads(_SafeWire.decompress(wire)) == msg
        set_raft_secret("other")
        with pytest.raises(ValueError):
            _SafeWire.decompress(wire)  # tagged with another group's secret
        set_raft_secret("")
        untagged = _SafeWire.compress(_SafeWire.dumps(msg), 3)
        set_raft_secret("s3cret")
        for bad in (untagged, wire[:-1] + bytes([wire[-1] ^ 1]), b"", b"x"):
            with pytest.raises(ValueError):
                _SafeWire.decompress(bad)
    finally:
        set_raft_secret("")


def _ae(term: int, prev: int, idxs: list[int], commit: int, size: int = 1) -> dict:
    return {"type": "append_entries", "term": term, "commit_index": commit, "prevLogIdx": prev,
            "prevLogTerm": term, "entries": [(b"c" * size, i, term) for i in idxs]}


def test_merge_append_entries_table():
    from kv.raft import MERGED_ENTRIES_BYTES_MAX, merge_append_entries

    a, b = TCPNode("127.0.0.1:9"), TCPNode("127.0.0.1:10")
    # Consecutive messages to one follower become one, with the later commit index.
    out = merge_append_entries([(a, _ae(2, 4, [5], 3)), (a, _ae(2, 5, [6], 4)), (a, _ae(2, 6, [7, 8], 5))])
    assert len(out) == 1
    assert [e[1] for e in out[0][1]["entries"]] == [5, 6, 7, 8]
    assert (out[0][1]["prevLogIdx"], out[0][1]["commit_index"]) == (4, 5)
    # Interleaved followers merge separately and keep their own order.
    out = merge_append_entries([(a, _ae(2, 4, [5], 3)), (b, _ae(2, 1, [2], 3)), (a, _ae(2, 5, [6], 3)),
                                (b, _ae(2, 2, [3], 3))])
    assert [(n.address, [e[1] for e in m["entries"]]) for n, m in out] == [
        ("127.0.0.1:9", [5, 6]), ("127.0.0.1:10", [2, 3])]
    # A gap, a restart at another index, or a new term is never merged.
    for second in (_ae(2, 6, [7], 3), _ae(2, 2, [3], 3), _ae(3, 5, [6], 3)):
        assert len(merge_append_entries([(a, _ae(2, 4, [5], 3)), (a, second)])) == 2
    # A heartbeat right after entries merges (it only moves the commit index).
    out = merge_append_entries([(a, _ae(2, 4, [5], 3)), (a, _ae(2, 5, [], 5))])
    assert len(out) == 1 and out[0][1]["commit_index"] == 5
    # Snapshot chunks pass untouched.
    snap = {"type": "append_entries", "term": 2, "commit_index": 3, "serialized": (b"x", True, False)}
    assert merge_append_entries([(a, snap), (a, _ae(2, 4, [5], 3))]) == [(a, snap), (a, _ae(2, 4, [5], 3))]
    # Merged messages stay bounded.
    big = MERGED_ENTRIES_BYTES_MAX // 2 + 1
    assert len(merge_append_entries([(a, _ae(2, 4, [5], 3, big)), (a, _ae(2, 5, [6], 3, big))])) == 2


def test_a_merged_append_entries_is_what_the_follower_would_have_built_from_the_parts(tmp_path):
    from kv.raft import merge_append_entries

    node, transport = make_follower(tmp_path)
    try:
        log = leader_log([1] * 6)
        leader = TCPNode("127.0.0.1:9")
        parts = [(leader, append_entries(log, 1, p, 1, 1)) for p in range(1, 7)]
        (merged,) = merge_append_entries(parts)
        transport._onMessageReceived(leader, merged[1])
        assert follower_log(node) == log
        assert acks(transport) == [7]
    finally:
        node._destroy()
