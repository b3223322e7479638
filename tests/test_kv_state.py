"""Tests of kv/state.py, the deterministic KV state machine (DESIGN.md §3).

1. Tables of commands and the CommandResult each must produce, each checked for
   "a failed command applies nothing"; tenant isolation through every method;
   idempotency (request_id) and Raft replay (index at or below applied_index),
   across a close and reopen; limits.
2. A hypothesis state machine holding KVState against a plain dict model.
3. Snapshots: round trip, and torn or corrupted files rejected before the live
   database is touched; recovery from a swap a crash interrupted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kv import limits, state
from kv.errors import InvalidArgument, NotFound
from kv.state import KVState
from proto import kv_pb2

R = kv_pb2.CommandResult
OK, NOT_FOUND, ALREADY_EXISTS, CONDITION_FAILED, INVALID = (
    R.OK, R.NOT_FOUND, R.ALREADY_EXISTS, R.CONDITION_FAILED, R.INVALID)
TENANTS = ("t1", "t2")

# ---------------------------------------------------------------- command builders


def command(tenant: str = "t1", rid: bytes = b"", **cmd: object) -> bytes:
    return kv_pb2.Command(tenant=tenant, request_id=rid, **cmd).SerializeToString()  # type: ignore[arg-type]


def create_store(name: str, tenant: str = "t1", rid: bytes = b"") -> bytes:
    return command(tenant, rid, create_store=kv_pb2.CreateStoreCmd(name=name))


def drop_store(name: str, tenant: str = "t1", rid: bytes = b"") -> bytes:
    return command(tenant, rid, drop_store=kv_pb2.DropStoreCmd(name=name))


def create_keyspace(store: str, keyspace: str, tenant: str = "t1", rid: bytes = b"") -> bytes:
    return command(tenant, rid, create_keyspace=kv_pb2.CreateKeyspaceCmd(store=store, keyspace=keyspace))


def batch(store: str, *ops: kv_pb2.Condition | kv_pb2.Mutation, tenant: str = "t1", rid: bytes = b"") -> bytes:
    conditions = [op for op in ops if isinstance(op, kv_pb2.Condition)]
    mutations = [op for op in ops if isinstance(op, kv_pb2.Mutation)]
    return command(tenant, rid, batch=kv_pb2.BatchCmd(store=store, conditions=conditions, mutations=mutations))


def barrier(tenant: str = "t1", rid: bytes = b"") -> bytes:
    return command(tenant, rid, barrier=kv_pb2.BarrierCmd())


def put(keyspace: str, key: bytes, value: bytes) -> kv_pb2.Mutation:
    return kv_pb2.Mutation(keyspace=keyspace, key=key, put=value)


def delete(keyspace: str, key: bytes) -> kv_pb2.Mutation:
    return kv_pb2.Mutation(keyspace=keyspace, key=key, delete=True)


def if_version(keyspace: str, key: bytes, version: int) -> kv_pb2.Condition:
    return kv_pb2.Condition(keyspace=keyspace, key=key, version_equals=version)


def if_value(keyspace: str, key: bytes, value: bytes) -> kv_pb2.Condition:
    return kv_pb2.Condition(keyspace=keyspace, key=key, value_equals=value)


def if_absent(keyspace: str, key: bytes, absent: bool = True) -> kv_pb2.Condition:
    return kv_pb2.Condition(keyspace=keyspace, key=key, absent=absent)


class Driver:
    """Feeds commands to a KVState at increasing Raft indexes, as the Raft adapter does."""

    def __init__(self, kv: KVState) -> None:
        self.kv = kv
        self.index = kv.applied_index

    def run(self, cmd: bytes, gap: int = 1) -> kv_pb2.CommandResult:
        self.index += gap
        result = kv_pb2.CommandResult.FromString(self.kv.apply(self.index, cmd))
        assert self.kv.applied_index == self.index
        return result

    def ok(self, cmd: bytes) -> int:
        result = self.run(cmd)
        assert result.code == OK, result
        return result.index


Dump = dict[str, list[tuple[str, int, list[str], dict[str, list[tuple[bytes, bytes, int]]]]]]


def dump(kv: KVState) -> Dump:
    """Everything a client of either tenant can see."""
    out: Dump = {}
    for tenant in TENANTS:
        out[tenant] = []
        for name, store_id, keyspaces in kv.list_stores(tenant):
            contents = {ks: scan_all(kv, tenant, name, ks) for ks in keyspaces}
            out[tenant].append((name, store_id, keyspaces, contents))
    return out


def scan_all(kv: KVState, tenant: str, store: str, keyspace: str, token: bytes = b"",
             **kw: object) -> list[tuple[bytes, bytes, int]]:
    """Every page of a scan from `token` on, joined."""
    items: list[tuple[bytes, bytes, int]] = []
    for _ in range(10_000):
        page, token = kv.scan(tenant, store, keyspace, continuation=token, **kw)  # type: ignore[arg-type]
        items.extend(page)
        if not token:
            return items
    raise AssertionError("scan did not finish")


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[KVState]:
    s = KVState(str(tmp_path / "db"))
    yield s
    s.close()


@pytest.fixture
def base(kv: KVState) -> Driver:
    """Tenant t1 with store "s", keyspaces "k" and "k2", key a = b"1" written at index 4."""
    d = Driver(kv)
    d.ok(create_store("s"))
    d.ok(create_keyspace("s", "k"))
    d.ok(create_keyspace("s", "k2"))
    assert d.ok(batch("s", put("k", b"a", b"1"))) == 4
    return d


# ---------------------------------------------------------------- 1. command table

V = 4  # version of key a in the `base` fixture
CASES: list[tuple[str, bytes, int, int]] = [
    # (case, command, expected code, expected failed_condition)
    ("create a new store", create_store("new"), OK, 0),
    ("create a store of NAME_BYTES_MAX bytes", create_store("n" * limits.NAME_BYTES_MAX), OK, 0),
    ("create an existing store", create_store("s"), ALREADY_EXISTS, 0),
    ("create a store with an empty name", create_store(""), INVALID, 0),
    ("create a store with a slash", create_store("a/b"), INVALID, 0),
    ("create a store with a control char", create_store("a\nb"), INVALID, 0),
    ("create a store with non-ASCII", create_store("caf\u00e9"), INVALID, 0),
    ("create a store over NAME_BYTES_MAX", create_store("n" * (limits.NAME_BYTES_MAX + 1)), INVALID, 0),
    ("drop a store", drop_store("s"), OK, 0),
    ("drop a missing store", drop_store("nope"), NOT_FOUND, 0),
    ("drop a store with an invalid name", drop_store("a/b"), INVALID, 0),
    ("create a keyspace", create_keyspace("s", "k3"), OK, 0),
    ("create an existing keyspace", create_keyspace("s", "k"), ALREADY_EXISTS, 0),
    ("create a keyspace in a missing store", create_keyspace("nope", "k"), NOT_FOUND, 0),
    ("create a keyspace with an invalid name", create_keyspace("s", ""), INVALID, 0),
    ("batch on a missing store", batch("nope", put("k", b"a", b"2")), NOT_FOUND, 0),
    ("batch put to a missing keyspace", batch("s", put("k", b"b", b"2"), put("zz", b"a", b"2")), NOT_FOUND, 0),
    ("batch condition on a missing keyspace", batch("s", if_absent("zz", b"a"), put("k", b"b", b"2")), NOT_FOUND, 0),
    ("batch with no ops", batch("s"), OK, 0),
    ("batch put and delete", batch("s", put("k", b"b", b"2"), delete("k", b"a")), OK, 0),
    ("batch delete of an absent key", batch("s", delete("k", b"zzz")), OK, 0),
    ("batch with an empty key", batch("s", put("k", b"", b"2")), INVALID, 0),
    ("batch with a key of KEY_BYTES_MAX", batch("s", put("k", b"x" * limits.KEY_BYTES_MAX, b"2")), OK, 0),
    ("batch with a key over KEY_BYTES_MAX", batch("s", put("k", b"x" * (limits.KEY_BYTES_MAX + 1), b"")), INVALID, 0),
    ("batch with a value of VALUE_BYTES_MAX", batch("s", put("k", b"b", b"v" * limits.VALUE_BYTES_MAX)), OK, 0),
    ("batch with a value over VALUE_BYTES_MAX",
     batch("s", put("k", b"b", b"v" * (limits.VALUE_BYTES_MAX + 1))), INVALID, 0),
    ("batch of BATCH_OPS_MAX ops", batch("s", *[put("k", b"b", b"2")] * limits.BATCH_OPS_MAX), OK, 0),
    ("batch over BATCH_OPS_MAX ops",
     batch("s", if_absent("k", b"b"), *[put("k", b"b", b"2")] * limits.BATCH_OPS_MAX), INVALID, 0),
    ("batch with an empty mutation", batch("s", kv_pb2.Mutation(keyspace="k", key=b"a")), INVALID, 0),
    ("batch with delete=false", batch("s", kv_pb2.Mutation(keyspace="k", key=b"a", delete=False)), INVALID, 0),
    ("batch with a condition without check", batch("s", kv_pb2.Condition(keyspace="k", key=b"a")), INVALID, 0),
    ("batch with an invalid keyspace name", batch("s", put("k/x", b"a", b"2")), INVALID, 0),
    ("batch with an empty condition key", batch("s", if_absent("k", b"")), INVALID, 0),
    ("version_equals holds", batch("s", if_version("k", b"a", V), put("k", b"a", b"2")), OK, 0),
    ("version_equals differs", batch("s", if_version("k", b"a", V + 1), put("k", b"a", b"2")), CONDITION_FAILED, 0),
    ("version_equals 0 on an absent key", batch("s", if_version("k", b"b", 0), put("k", b"b", b"2")), OK, 0),
    ("version_equals 0 on a present key", batch("s", if_version("k", b"a", 0), put("k", b"a", b"2")),
     CONDITION_FAILED, 0),
    ("value_equals holds", batch("s", if_value("k", b"a", b"1"), put("k", b"a", b"2")), OK, 0),
    ("value_equals differs", batch("s", if_value("k", b"a", b"9"), put("k", b"a", b"2")), CONDITION_FAILED, 0),
    ("value_equals on an absent key", batch("s", if_value("k", b"b", b""), put("k", b"a", b"2")), CONDITION_FAILED, 0),
    ("absent on an absent key", batch("s", if_absent("k", b"b"), put("k", b"b", b"2")), OK, 0),
    ("absent on a present key", batch("s", if_absent("k", b"a"), put("k", b"b", b"2")), CONDITION_FAILED, 0),
    ("absent=false on a present key", batch("s", if_absent("k", b"a", False), put("k", b"b", b"2")), OK, 0),
    ("absent=false on an absent key", batch("s", if_absent("k", b"b", False), put("k", b"b", b"2")),
     CONDITION_FAILED, 0),
    ("absent in another keyspace", batch("s", if_absent("k2", b"a"), put("k2", b"a", b"2")), OK, 0),
    ("the first failing condition is reported",
     batch("s", if_version("k", b"a", V), if_absent("k", b"zz"), if_absent("k", b"a"), if_absent("k", b"a"),
           put("k", b"b", b"2")), CONDITION_FAILED, 2),
    ("conditions see the state before the batch", batch("s", put("k", b"b", b"2"), if_absent("k", b"b")), OK, 0),
    ("barrier", barrier(), OK, 0),
    ("barrier with a request_id", barrier(rid=b"r" * limits.REQUEST_ID_BYTES_MAX), OK, 0),
    ("request_id over REQUEST_ID_BYTES_MAX", barrier(rid=b"r" * (limits.REQUEST_ID_BYTES_MAX + 1)), INVALID, 0),
    ("an empty tenant", create_store("new", tenant=""), INVALID, 0),
    ("a tenant with a slash", create_store("new", tenant="a/b"), INVALID, 0),
    ("bytes that do not parse", b"\xff\xff\xff\xff", INVALID, 0),
    ("a command naming no operation", command(), INVALID, 0),
    ("a command over COMMAND_BYTES_MAX", barrier(rid=b"r") + b"\x00" * limits.COMMAND_BYTES_MAX, INVALID, 0),
]


@pytest.mark.parametrize(("case", "cmd", "code", "failed"), CASES, ids=[c[0] for c in CASES])
def test_command_table(base: Driver, case: str, cmd: bytes, code: int, failed: int) -> None:
    before = dump(base.kv)
    result = base.run(cmd, gap=3)  # a gap, as Raft no-ops leave
    assert (result.code, result.failed_condition) == (code, failed), result.message
    assert result.index == base.index
    if code != OK:
        assert result.message
        assert dump(base.kv) == before, "a failed command changed the state"
    elif case.startswith("barrier") or case.startswith("batch with no ops"):
        assert dump(base.kv) == before


def test_batch_mutations_apply_in_order_with_the_entry_index_as_version(base: Driver) -> None:
    index = base.ok(batch("s", put("k", b"b", b"1"), put("k", b"b", b"2"), delete("k", b"a"),
                          put("k", b"c", b"3"), delete("k", b"c")))
    assert base.kv.get("t1", "s", "k", b"b") == (b"2", index)
    assert base.kv.get("t1", "s", "k", b"a") is None
    assert base.kv.get("t1", "s", "k", b"c") is None
    assert base.kv.get("t1", "s", "k2", b"b") is None


def test_create_store_and_keyspace_allocate_ids_and_list_sorted(kv: KVState) -> None:
    d = Driver(kv)
    for name in ("b", "a", "c"):
        d.ok(create_store(name))
    for keyspace in ("z", "x", "y"):
        d.ok(create_keyspace("a", keyspace))
    assert kv.list_stores("t1") == [("a", 2, ["x", "y", "z"]), ("b", 1, []), ("c", 3, [])]
    assert kv.list_keyspaces("t1", "a") == ["x", "y", "z"]
    assert kv.list_keyspaces("t1", "b") == []
    with pytest.raises(NotFound):
        kv.list_keyspaces("t1", "nope")


def test_drop_store_deletes_its_keys_and_names_and_ids_are_not_reused(base: Driver) -> None:
    base.ok(batch("s", put("k2", b"b", b"2")))
    base.ok(create_store("other"))
    base.ok(create_keyspace("other", "k"))
    base.ok(batch("other", put("k", b"a", b"keep")))
    (old_id,) = [sid for name, sid, _ in base.kv.list_stores("t1") if name == "s"]
    base.ok(drop_store("s"))
    assert [name for name, _, _ in base.kv.list_stores("t1")] == ["other"]
    with pytest.raises(NotFound):
        base.kv.get("t1", "s", "k", b"a")
    base.ok(create_store("s"))
    (new_id,) = [sid for name, sid, _ in base.kv.list_stores("t1") if name == "s"]
    assert new_id > old_id
    assert base.kv.list_keyspaces("t1", "s") == []
    base.ok(create_keyspace("s", "k"))
    assert scan_all(base.kv, "t1", "s", "k") == []
    assert base.kv.get("t1", "other", "k", b"a") is not None


def test_drop_store_over_drop_store_keys_max_is_refused(base: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "DROP_STORE_KEYS_MAX", 3)
    base.ok(batch("s", put("k", b"b", b"2"), put("k2", b"c", b"3"), put("k2", b"d", b"4")))  # 4 keys
    before = dump(base.kv)
    result = base.run(drop_store("s"))
    assert result.code == INVALID and "DROP_STORE_KEYS_MAX" in result.message
    assert dump(base.kv) == before
    base.ok(batch("s", delete("k2", b"d")))
    base.ok(drop_store("s"))
    assert base.kv.list_stores("t1") == []


def test_stores_per_tenant_and_keyspaces_per_store_limits(kv: KVState, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "STORES_PER_TENANT_MAX", 2)
    monkeypatch.setattr(limits, "KEYSPACES_PER_STORE_MAX", 2)
    d = Driver(kv)
    d.ok(create_store("a"))
    d.ok(create_store("b"))
    assert d.run(create_store("c")).code == INVALID
    d.ok(create_store("c", tenant="t2"))  # the limit is per tenant
    d.ok(drop_store("b"))
    d.ok(create_store("c"))  # dropping frees a slot
    d.ok(create_keyspace("a", "x"))
    d.ok(create_keyspace("a", "y"))
    assert d.run(create_keyspace("a", "z")).code == INVALID
    d.ok(create_keyspace("c", "z"))  # the limit is per store


# ---------------------------------------------------------------- tenant isolation


def test_tenant_b_never_sees_or_changes_tenant_a(base: Driver) -> None:
    kv = base.kv
    a_before = dump(kv)["t1"]
    # Every read of t1's store through t2 says it does not exist.
    assert kv.list_stores("t2") == []
    for read in (lambda: kv.get("t2", "s", "k", b"a"), lambda: kv.scan("t2", "s", "k"),
                 lambda: kv.list_keyspaces("t2", "s")):
        with pytest.raises(NotFound):
            read()
    # Every write to it through t2 finds nothing.
    for cmd in (drop_store("s", tenant="t2"), create_keyspace("s", "k9", tenant="t2"),
                batch("s", put("k", b"a", b"evil"), tenant="t2"),
                batch("s", if_absent("k", b"zz"), tenant="t2")):
        assert base.run(cmd).code == NOT_FOUND
    # t2's own store of the same name is a different store.
    base.ok(create_store("s", tenant="t2"))
    base.ok(create_keyspace("s", "k", tenant="t2"))
    base.ok(batch("s", put("k", b"a", b"t2 value"), put("k", b"z", b"t2 only"), tenant="t2"))
    assert kv.get("t2", "s", "k", b"a") == (b"t2 value", base.index)
    assert dump(kv)["t1"] == a_before
    (t1_id,) = [sid for _, sid, _ in kv.list_stores("t1")]
    (t2_id,) = [sid for _, sid, _ in kv.list_stores("t2")]
    assert t1_id != t2_id
    base.ok(drop_store("s", tenant="t2"))
    assert dump(kv)["t1"] == a_before
    # request_ids are per tenant: the same id in another tenant is another request.
    first = base.run(batch("s", put("k", b"r", b"1"), rid=b"same"))
    assert base.run(create_store("s", tenant="t2", rid=b"same")).code == OK
    assert base.run(batch("s", put("k", b"r", b"1"), rid=b"same")) == first


def test_tenant_names_cannot_alias_by_concatenation(kv: KVState) -> None:
    d = Driver(kv)
    d.ok(create_store("bc", tenant="a"))
    assert kv.list_stores("ab") == []
    d.ok(create_store("c", tenant="ab"))
    assert [n for n, _, _ in kv.list_stores("a")] == ["bc"]
    assert [n for n, _, _ in kv.list_stores("ab")] == ["c"]


# ---------------------------------------------------------------- idempotency and replay


def test_same_request_id_applies_once_and_returns_the_first_result(base: Driver) -> None:
    cmd = batch("s", if_absent("k", b"n"), put("k", b"n", b"1"), rid=b"req-1")
    first = base.kv.apply(base.index + 1, cmd)
    base.index += 1
    after_first = dump(base.kv)
    again = base.kv.apply(base.index + 5, cmd)  # a client retry, committed later
    base.index += 5
    assert again == first
    assert kv_pb2.CommandResult.FromString(again).index == base.index - 5
    assert base.kv.applied_index == base.index
    assert dump(base.kv) == after_first
    # A failed first application is remembered just the same.
    failing = batch("s", if_absent("k", b"a"), put("k", b"a", b"x"), rid=b"req-2")
    r1 = base.run(failing)
    assert r1.code == CONDITION_FAILED
    base.ok(batch("s", delete("k", b"a")))
    assert base.run(failing) == r1
    assert base.kv.get("t1", "s", "k", b"a") is None


def test_idempotency_records_expire_after_the_window(base: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "IDEMPOTENCY_WINDOW_ENTRIES", 100)
    cmd = batch("s", put("k", b"n", b"1"), rid=b"req")
    first = base.run(cmd)
    assert base.run(cmd, gap=100) == first  # 100 entries later: still inside the window
    second = base.run(cmd, gap=1)  # 101 later: expired, so it applies again
    assert second.code == OK and second.index == first.index + 101
    assert base.kv.get("t1", "s", "k", b"n") == (b"1", second.index)
    assert base.run(cmd, gap=50) == second


def idempotency_record_count(kv: KVState) -> int:
    """Count records in the system keyspaces of the idempotency table (white-box)."""
    db = kv._db
    records = sum(1 for _ in db.iterator(prefix=state._sys_key(state._SYS_IDEM)))
    by_index = sum(1 for _ in db.iterator(prefix=state._sys_key(state._SYS_IDEM_BY_INDEX)))
    assert records == by_index
    return records


def test_eviction_is_bounded_per_apply_and_lagging_records_are_ignored(
        base: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "IDEMPOTENCY_WINDOW_ENTRIES", 100)
    per_apply = state.IDEMPOTENCY_EVICT_PER_APPLY_MAX
    firsts = [base.run(barrier(rid=b"r%d" % i)) for i in range(per_apply + 4)]
    assert idempotency_record_count(base.kv) == per_apply + 4
    base.run(barrier(), gap=200)  # every record is now expired; one apply evicts only per_apply
    assert idempotency_record_count(base.kv) == 4
    # A lingering expired record is no answer: r{per_apply} applies again...
    lingering = barrier(rid=b"r%d" % per_apply)
    again = base.run(lingering)
    assert again.index == base.index != firsts[per_apply].index
    # ...and the eviction of its old record does not remove its new one.
    assert idempotency_record_count(base.kv) == 1
    assert base.run(lingering) == again


def test_replayed_index_applies_nothing(base: Driver) -> None:
    before = dump(base.kv)
    for index in (base.index, base.index - 1, 1):
        raw = base.kv.apply(index, batch("s", put("k", b"a", b"replayed!")))
        result = kv_pb2.CommandResult.FromString(raw)
        assert (result.code, result.message) == (OK, "replayed")
    assert dump(base.kv) == before
    assert base.kv.applied_index == base.index
    with pytest.raises(ValueError):
        base.kv.apply(0, barrier())
    with pytest.raises(ValueError):
        base.kv.apply(-1, barrier())


def test_replay_after_reopen_is_a_no_op(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    kv = KVState(path)
    log = [create_store("s"), create_keyspace("s", "k"), batch("s", put("k", b"a", b"1")),
           batch("s", put("k", b"a", b"2"), put("k", b"b", b"3")), create_store("s")]
    results = [kv.apply(i + 1, cmd) for i, cmd in enumerate(log)]
    before = dump(kv)
    kv.close()
    with pytest.raises(RuntimeError):
        kv.get("t1", "s", "k", b"a")
    kv = KVState(path)
    assert kv.applied_index == len(log)
    assert dump(kv) == before
    for i, cmd in enumerate(log):  # Raft replays its whole journal
        assert kv_pb2.CommandResult.FromString(kv.apply(i + 1, cmd)).message == "replayed"
    assert dump(kv) == before
    # A fresh replica applying the same log gives byte-identical results.
    fresh = KVState(str(tmp_path / "fresh"))
    assert [fresh.apply(i + 1, cmd) for i, cmd in enumerate(log)] == results
    assert dump(fresh) == before
    fresh.close()
    kv.close()


# ---------------------------------------------------------------- reads


def test_reads_of_unknown_names_raise_not_found_and_malformed_ones_invalid(base: Driver) -> None:
    kv = base.kv
    with pytest.raises(NotFound, match="store 'nope'"):
        kv.get("t1", "nope", "k", b"a")
    with pytest.raises(NotFound, match="keyspace 'nope'"):
        kv.get("t1", "s", "nope", b"a")
    with pytest.raises(NotFound):
        kv.scan("t1", "s", "nope")
    assert kv.get("t1", "s", "k", b"absent") is None
    for bad in (lambda: kv.get("t1", "s", "k", b""), lambda: kv.get("t1", "s/", "k", b"a"),
                lambda: kv.get("", "s", "k", b"a"), lambda: kv.scan("t1", "s", "k", limit=-1),
                lambda: kv.scan("t1", "s", "k", continuation=b"\x07junk"),
                lambda: kv.scan("t1", "s", "k", prefix=b"p" * (limits.KEY_BYTES_MAX + 1)),
                lambda: kv.list_stores("")):
        with pytest.raises(InvalidArgument):
            bad()


def test_scan_prefix_range_limit_and_continuation(base: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [b"\x00", b"a", b"ab", b"abc", b"abd", b"ac", b"b", b"\xff", b"\xff\xff", b"\xff\xff\x00"]
    base.ok(batch("s", *[put("k", key, b"v" + key) for key in keys]))
    kv, index = base.kv, base.index

    def scan_keys(**kw: object) -> list[bytes]:
        return [key for key, _, _ in scan_all(kv, "t1", "s", "k", **kw)]

    assert scan_keys() == keys
    assert scan_keys(prefix=b"ab") == [b"ab", b"abc", b"abd"]
    assert scan_keys(prefix=b"\xff") == [b"\xff", b"\xff\xff", b"\xff\xff\x00"]
    assert scan_keys(prefix=b"\xff\xff") == [b"\xff\xff", b"\xff\xff\x00"]
    assert scan_keys(start=b"ab", end=b"ac") == [b"ab", b"abc", b"abd"]
    assert scan_keys(start=b"abd") == [b"abd", b"ac", b"b", b"\xff", b"\xff\xff", b"\xff\xff\x00"]
    assert scan_keys(end=b"a") == [b"\x00"]
    assert scan_keys(prefix=b"ab", start=b"abc", end=b"abd") == [b"abc"]
    assert scan_keys(prefix=b"ab", start=b"b") == []
    assert scan_keys(start=b"b", end=b"a") == []
    for limit in (1, 2, 3, 9, 10, 11):
        assert scan_keys(limit=limit) == keys
        assert scan_keys(limit=limit, prefix=b"a", end=b"b") == [b"a", b"ab", b"abc", b"abd", b"ac"]
    page, token = kv.scan("t1", "s", "k", limit=3)
    assert page == [(b"\x00", b"v\x00", index), (b"a", b"va", index), (b"ab", b"vab", index)] and token
    page, token = kv.scan("t1", "s", "k", limit=len(keys))
    assert len(page) == len(keys) and token == b""  # no empty last page
    monkeypatch.setattr(limits, "SCAN_LIMIT_MAX", 4)
    for limit in (0, 5, 1000):
        page, token = kv.scan("t1", "s", "k", limit=limit)
        assert len(page) == 4 and token
    assert scan_keys(limit=0) == keys
    assert [key for key, _, _ in scan_all(kv, "t1", "s", "k2")] == []


def test_scan_sees_one_state_while_writes_continue(base: Driver) -> None:
    base.ok(batch("s", *[put("k", b"%03d" % i, b"old") for i in range(50)]))
    page, token = base.kv.scan("t1", "s", "k", limit=10)
    base.ok(batch("s", *[put("k", b"%03d" % i, b"new") for i in range(50)]))
    assert {v for _, v, _ in page} == {b"old"}
    rest = scan_all(base.kv, "t1", "s", "k", token)
    assert {v for _, v, _ in rest} == {b"new", b"1"} and len(page) + len(rest) == 51


# ---------------------------------------------------------------- 2. model-based


class Model:
    """What a KVState must hold: tenant -> store -> (id, keyspace -> key -> (value, version))."""

    def __init__(self) -> None:
        self.stores: dict[str, dict[str, tuple[int, dict[str, dict[bytes, tuple[bytes, int]]]]]] = {
            t: {} for t in TENANTS}
        self.next_store_id = 1

    def apply(self, index: int, cmd: kv_pb2.Command) -> tuple[int, int]:
        """(code, failed_condition) the command must produce; applies it if it succeeds."""
        stores = self.stores[cmd.tenant]
        kind = cmd.WhichOneof("cmd")
        if kind == "create_store":
            if cmd.create_store.name in stores:
                return ALREADY_EXISTS, 0
            stores[cmd.create_store.name] = (self.next_store_id, {})
            self.next_store_id += 1
        elif kind == "drop_store":
            if cmd.drop_store.name not in stores:
                return NOT_FOUND, 0
            del stores[cmd.drop_store.name]
        elif kind == "create_keyspace":
            c = cmd.create_keyspace
            if c.store not in stores:
                return NOT_FOUND, 0
            if c.keyspace in stores[c.store][1]:
                return ALREADY_EXISTS, 0
            stores[c.store][1][c.keyspace] = {}
        elif kind == "batch":
            b = cmd.batch
            if b.store not in stores:
                return NOT_FOUND, 0
            keyspaces = stores[b.store][1]
            if any(op.keyspace not in keyspaces for op in [*b.conditions, *b.mutations]):
                return NOT_FOUND, 0
            for i, cond in enumerate(b.conditions):
                current = keyspaces[cond.keyspace].get(cond.key)
                check = cond.WhichOneof("check")
                if check == "version_equals":
                    holds = (current[1] if current else 0) == cond.version_equals
                elif check == "value_equals":
                    holds = current is not None and current[0] == cond.value_equals
                else:
                    holds = (current is None) == cond.absent
                if not holds:
                    return CONDITION_FAILED, i
            for mut in b.mutations:
                if mut.WhichOneof("op") == "put":
                    keyspaces[mut.keyspace][mut.key] = (mut.put, index)
                else:
                    keyspaces[mut.keyspace].pop(mut.key, None)
        return OK, 0


STORE_NAMES = ("a", "b", "c")
KEYSPACE_NAMES = ("x", "y")
KEYS = (b"a", b"ab", b"abc", b"b", b"ba", b"\x00", b"\xff", b"\xff\xff")
VALUES = (b"", b"1", b"2", b"long" * 10)
REQUEST_IDS = (b"", b"", b"r1", b"r2", b"r3")


class KVStateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvstate-")
        self.path = os.path.join(self.dir, "db")
        self.kv = KVState(self.path)
        self.model = Model()
        self.index = 0
        self.sent: dict[tuple[str, bytes], tuple[bytes, bytes]] = {}  # (tenant, rid) -> (command, result)

    def teardown(self) -> None:
        self.kv.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def send(self, cmd: kv_pb2.Command, gap: int) -> None:
        self.index += gap
        raw = cmd.SerializeToString()
        key = (cmd.tenant, cmd.request_id)
        if cmd.request_id and key in self.sent:
            assert self.kv.apply(self.index, raw) == self.sent[key][1]
            return
        code, failed = self.model.apply(self.index, cmd)
        result_raw = self.kv.apply(self.index, raw)
        result = kv_pb2.CommandResult.FromString(result_raw)
        assert (result.code, result.failed_condition, result.index) == (code, failed, self.index), result.message
        event(f"{cmd.WhichOneof('cmd')} -> {R.Code.Name(code)}")
        if cmd.request_id:
            self.sent[key] = (raw, result_raw)

    @rule(tenant=st.sampled_from(TENANTS), name=st.sampled_from(STORE_NAMES),
          rid=st.sampled_from(REQUEST_IDS), gap=st.integers(1, 3))
    def create_store(self, tenant: str, name: str, rid: bytes, gap: int) -> None:
        self.send(kv_pb2.Command(tenant=tenant, request_id=rid, create_store=kv_pb2.CreateStoreCmd(name=name)), gap)

    @rule(tenant=st.sampled_from(TENANTS), name=st.sampled_from(STORE_NAMES), rid=st.sampled_from(REQUEST_IDS))
    def drop_store(self, tenant: str, name: str, rid: bytes) -> None:
        self.send(kv_pb2.Command(tenant=tenant, request_id=rid, drop_store=kv_pb2.DropStoreCmd(name=name)), 1)

    @rule(tenant=st.sampled_from(TENANTS), store=st.sampled_from(STORE_NAMES),
          keyspace=st.sampled_from(KEYSPACE_NAMES), rid=st.sampled_from(REQUEST_IDS))
    def create_keyspace(self, tenant: str, store: str, keyspace: str, rid: bytes) -> None:
        self.send(kv_pb2.Command(tenant=tenant, request_id=rid, create_keyspace=kv_pb2.CreateKeyspaceCmd(
            store=store, keyspace=keyspace)), 1)

    @initialize(keys=st.lists(st.tuples(st.sampled_from(TENANTS), st.sampled_from(KEYSPACE_NAMES),
                                        st.sampled_from(KEYS)), max_size=8))
    def same_names_in_both_tenants(self, keys: list[tuple[str, str, bytes]]) -> None:
        """Start with store "a" (keyspaces "x", "y") in both tenants, holding a few keys."""
        for tenant in TENANTS:
            self.create_store(tenant, "a", b"", 1)
            self.create_keyspace(tenant, "a", "x", b"")
            self.create_keyspace(tenant, "a", "y", b"")
        for tenant, keyspace, key in keys:
            self.send(kv_pb2.Command(tenant=tenant, batch=kv_pb2.BatchCmd(
                store="a", mutations=[put(keyspace, key, tenant.encode())])), 1)

    @rule(data=st.data(), count=st.integers(1, 4))
    def batches(self, data: st.DataObject, count: int) -> None:
        for _ in range(count):
            self.batch(data, data.draw(st.sampled_from(TENANTS)), data.draw(st.sampled_from(REQUEST_IDS)),
                       data.draw(st.integers(1, 2)))

    def batch(self, data: st.DataObject, tenant: str, rid: bytes, gap: int) -> None:
        stores = self.model.stores[tenant]
        # Mostly a store and keyspaces that exist, so that conditions sometimes hold; "zz" exists nowhere.
        store = data.draw(st.sampled_from([*sorted(stores), "zz"]))
        existing = stores.get(store, (0, {}))[1]
        keyspaces = st.sampled_from(sorted(existing) or ["zz"])
        versions = sorted({v for ks in existing.values() for _, v in ks.values()} | {0, 1})
        keys = st.sampled_from(KEYS)
        conditions = data.draw(st.lists(st.one_of(
            st.builds(kv_pb2.Condition, keyspace=keyspaces, key=keys, version_equals=st.sampled_from(versions)),
            st.builds(kv_pb2.Condition, keyspace=keyspaces, key=keys, value_equals=st.sampled_from(VALUES)),
            st.builds(kv_pb2.Condition, keyspace=keyspaces, key=keys, absent=st.booleans())), max_size=2))
        mutations = data.draw(st.lists(st.one_of(
            st.builds(kv_pb2.Mutation, keyspace=keyspaces, key=keys, put=st.sampled_from(VALUES)),
            st.builds(kv_pb2.Mutation, keyspace=keyspaces, key=keys, delete=st.just(True))),
            min_size=1, max_size=5))
        if data.draw(st.sampled_from([False] * 7 + [True])):  # now and then, a keyspace that does not exist
            mutations.insert(data.draw(st.integers(0, len(mutations))), put("zz", b"a", b""))
        self.send(kv_pb2.Command(tenant=tenant, request_id=rid, batch=kv_pb2.BatchCmd(
            store=store, conditions=conditions, mutations=mutations)), gap)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """A client retries a request it sent before: the first result, no second application."""
        (tenant, rid) = data.draw(st.sampled_from(sorted(self.sent)))
        raw, result = self.sent[(tenant, rid)]
        self.index += 1
        assert self.kv.apply(self.index, raw) == result

    @precondition(lambda self: self.index > 0)
    @rule(data=st.data())
    def replay_old_entry(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(1, self.index))
        raw = kv_pb2.CommandResult.FromString(self.kv.apply(index, b"anything at all"))
        assert raw.message == "replayed"

    @rule()
    def reopen(self) -> None:
        self.kv.close()
        self.kv = KVState(self.path)
        assert self.kv.applied_index == self.index

    @rule(data=st.data(), tenant=st.sampled_from(TENANTS), prefix=st.sampled_from([b"", b"", b"a", b"ab", b"\xff"]),
          start=st.sampled_from([b"", b"", b"a", b"ab", b"b"]), end=st.sampled_from([b"", b"", b"ab", b"b", b"c"]),
          limit=st.integers(0, 3))
    def scan_pages(self, data: st.DataObject, tenant: str, prefix: bytes, start: bytes, end: bytes,
                   limit: int) -> None:
        present = [(s, k) for s, (_, kss) in self.model.stores[tenant].items() for k in kss]
        if not present:
            return
        store, keyspace = data.draw(st.sampled_from(sorted(present)))
        contents = self.model.stores[tenant][store][1][keyspace]
        want = [(k, v, ver) for k, (v, ver) in sorted(contents.items())
                if k.startswith(prefix) and k >= start and (not end or k < end)]
        got = scan_all(self.kv, tenant, store, keyspace, prefix=prefix, start=start, end=end, limit=limit)
        assert got == want
        event("scan: several pages" if limit and len(want) > limit else "scan: one page" if want else "scan: empty")

    @invariant()
    def matches_model(self) -> None:
        assert self.kv.applied_index == self.index
        for tenant in TENANTS:
            stores = self.model.stores[tenant]
            assert self.kv.list_stores(tenant) == [
                (name, sid, sorted(kss)) for name, (sid, kss) in sorted(stores.items())]
            for name, (_, kss) in stores.items():
                for keyspace, contents in kss.items():
                    assert scan_all(self.kv, tenant, name, keyspace, limit=2) == [
                        (k, v, ver) for k, (v, ver) in sorted(contents.items())]
                    for key in KEYS[:3]:
                        assert self.kv.get(tenant, name, keyspace, key) == contents.get(key)


KVStateMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestKVStateModel = KVStateMachine.TestCase


# ---------------------------------------------------------------- 3. snapshots


def populated(path: str) -> KVState:
    kv = KVState(path)
    d = Driver(kv)
    for tenant in TENANTS:
        d.ok(create_store("s", tenant=tenant))
        d.ok(create_store("other", tenant=tenant))
        d.ok(create_keyspace("s", "k", tenant=tenant))
        d.ok(create_keyspace("s", "k2", tenant=tenant))
        d.ok(batch("s", *[put("k", b"key%04d" % i, tenant.encode() + b"%d" % i) for i in range(200)],
                   tenant=tenant, rid=b"big"))
        d.ok(batch("s", put("k2", b"\xff", b"x" * limits.VALUE_BYTES_MAX), tenant=tenant))
    return kv


def test_snapshot_round_trip(tmp_path: Path) -> None:
    src = populated(str(tmp_path / "src"))
    snap = src.begin_snapshot()
    assert snap.index == src.applied_index
    file = str(tmp_path / "snap")
    snap.write_to(file)
    snap.release()
    assert KVState.snapshot_index(file) == src.applied_index

    dst = KVState(str(tmp_path / "dst"))
    Driver(dst).ok(create_store("doomed"))
    dst.load_snapshot(file)
    assert dst.applied_index == src.applied_index
    assert dump(dst) == dump(src)
    assert sorted(os.listdir(tmp_path)) == ["dst", "snap", "src"]  # no .loading or .old left
    # Both replicas go on to apply the same entries identically, idempotency table included.
    later = [batch("s", put("k", b"key0000", b"again"), rid=b"big"), batch("s", put("k", b"new", b"v")),
             drop_store("other", tenant="t2")]
    first = src.applied_index + 1
    results = [[kv.apply(first + i, cmd) for i, cmd in enumerate(later)] for kv in (src, dst)]
    assert results[0] == results[1]
    assert kv_pb2.CommandResult.FromString(results[0][0]).index == 5  # t1's "big" batch, remembered
    assert dump(dst) == dump(src)
    dst.close()
    reopened = KVState(str(tmp_path / "dst"))
    assert dump(reopened) == dump(src) and reopened.applied_index == src.applied_index
    reopened.close()
    src.close()


def test_snapshot_is_a_point_in_time_while_apply_continues(tmp_path: Path) -> None:
    src = populated(str(tmp_path / "src"))
    at_snapshot = dump(src)
    snap = src.begin_snapshot()
    file = str(tmp_path / "snap")
    writer = threading.Thread(target=snap.write_to, args=(file,))
    writer.start()
    d = Driver(src)
    for i in range(50):
        d.ok(batch("s", put("k", b"key%04d" % i, b"changed")))
    d.ok(drop_store("s", tenant="t2"))
    writer.join()
    snap.release()
    snap.release()  # idempotent
    dst = KVState(str(tmp_path / "dst"))
    dst.load_snapshot(file)
    assert dst.applied_index == snap.index < src.applied_index
    assert dump(dst) == at_snapshot
    dst.close()
    src.close()


def test_empty_database_snapshot(tmp_path: Path) -> None:
    src = KVState(str(tmp_path / "src"))
    file = str(tmp_path / "snap")
    src.begin_snapshot().write_to(file)
    assert KVState.snapshot_index(file) == 0
    dst = KVState(str(tmp_path / "dst"))
    Driver(dst).ok(create_store("doomed"))
    dst.load_snapshot(file)
    assert dst.applied_index == 0 and dump(dst) == dump(src)
    assert KVState.snapshot_index(file) == 0
    src.close()
    dst.close()


@pytest.fixture
def snapshot_file(tmp_path: Path) -> bytes:
    src = KVState(str(tmp_path / "src"))
    d = Driver(src)
    d.ok(create_store("s"))
    d.ok(create_keyspace("s", "k"))
    d.ok(batch("s", put("k", b"a", b"1"), put("k", b"b", b"2"), rid=b"r"))
    snap = src.begin_snapshot()
    snap.write_to(str(tmp_path / "good"))
    snap.release()
    src.close()
    return (tmp_path / "good").read_bytes()


def damaged_copies(good: bytes) -> Iterator[tuple[str, bytes]]:
    header = 20
    for cut in sorted({0, 1, 7, header - 1, header, header + 1, len(good) // 2, len(good) - 5, len(good) - 1}):
        yield f"truncated to {cut} bytes", good[:cut]
    for pos in sorted({0, 9, 12, 19, header, header + 2, header + 7, len(good) // 2, len(good) - 13,
                       len(good) - 5, len(good) - 1}):
        for bit in (0, 7):
            flipped = bytearray(good)
            flipped[pos] ^= 1 << bit
            yield f"bit {bit} of byte {pos} flipped", bytes(flipped)
    yield "a byte appended", good + b"\x00"


def test_damaged_snapshot_is_rejected_and_leaves_the_live_database_untouched(
        tmp_path: Path, snapshot_file: bytes) -> None:
    target_path = str(tmp_path / "target")
    target = KVState(target_path)
    d = Driver(target)
    d.ok(create_store("mine"))
    d.ok(create_keyspace("mine", "k"))
    d.ok(batch("mine", put("k", b"x", b"precious")))
    before, index = dump(target), target.applied_index
    bad = str(tmp_path / "bad")
    cases = list(damaged_copies(snapshot_file))
    for case, contents in cases:
        Path(bad).write_bytes(contents)
        with pytest.raises(ValueError):
            target.load_snapshot(bad)
        assert (dump(target), target.applied_index) == (before, index), case
        assert not os.path.exists(target_path + ".loading"), case
    # The target still works, and still loads a good snapshot.
    d.ok(batch("mine", put("k", b"y", b"more")))
    Path(bad).write_bytes(snapshot_file)
    target.load_snapshot(bad)
    assert [n for n, _, _ in target.list_stores("t1")] == ["s"]
    target.close()


def test_snapshot_index_rejects_a_foreign_file(tmp_path: Path, snapshot_file: bytes) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"NOTASNAP" + snapshot_file[8:])
    with pytest.raises(ValueError, match="magic"):
        KVState.snapshot_index(str(path))
    path.write_bytes(snapshot_file[:10])
    with pytest.raises(ValueError, match="truncated"):
        KVState.snapshot_index(str(path))
    path.write_bytes(snapshot_file)
    assert KVState.snapshot_index(str(path)) == 3


def test_a_swap_interrupted_between_the_renames_is_finished_on_open(tmp_path: Path, snapshot_file: bytes) -> None:
    live = str(tmp_path / "db")
    kv = KVState(live)
    Driver(kv).ok(create_store("old state"))
    kv.close()
    (tmp_path / "snap").write_bytes(snapshot_file)
    state._build_from_snapshot(str(tmp_path / "snap"), live + ".loading")
    os.rename(live, live + ".old")  # the crash falls here, before .loading -> live
    kv = KVState(live)
    assert kv.applied_index == 3 and [n for n, _, _ in kv.list_stores("t1")] == ["s"]
    assert not os.path.exists(live + ".old") and not os.path.exists(live + ".loading")
    kv.close()


def test_an_unfinished_build_is_discarded_on_open(tmp_path: Path, snapshot_file: bytes) -> None:
    live = str(tmp_path / "db")
    kv = KVState(live)
    Driver(kv).ok(create_store("old state"))
    kv.close()
    os.mkdir(live + ".loading")
    (Path(live + ".loading") / "000001.log").write_bytes(b"half")
    kv = KVState(live)
    assert kv.applied_index == 1 and [n for n, _, _ in kv.list_stores("t1")] == ["old state"]
    assert not os.path.exists(live + ".loading")
    kv.close()
