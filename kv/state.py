"""The KV state machine: Raft log entries in, one LevelDB out (DESIGN.md §3).

Theory of operation. A Raft adapter (written elsewhere) hands every committed log
entry that carries a command to `KVState.apply(index, command)`. `command` is a
serialized `kv_pb2.Command`; the answer is a serialized `kv_pb2.CommandResult`.
Apply does no networking, reads no clock and draws no randomness: its result and
its effect on the database depend only on the database's contents and the entry,
so every replica that applies the same log reaches the same bytes.

Every effect of one entry, the idempotency record it leaves and the new applied
index go into ONE plyvel write batch. After a crash the database therefore holds
either all of an entry or none of it, and `applied_index` says which; entries at or
below it are skipped when Raft replays its journal. The batch is written with
sync=False: the Raft journal, not LevelDB, is the durable record of a committed
command, and it replays whatever LevelDB lost.

A command the state machine cannot accept (unparseable, over a limit, naming a
store that does not exist) is not an exception: it becomes a CommandResult code,
because every replica must reach the same verdict and Raft cannot un-commit it.
Exceptions from apply mean a caller bug (a bad index) or a broken invariant of the
stored data (`StateCorrupt`), and the process should stop rather than diverge.

Layout: key = store_id (8 bytes BE) | keyspace_id (4 bytes BE) | user key, value =
version (8 bytes BE, the Raft index that wrote it) | user value. Store 0 is the
system store; its "keyspaces" below hold the name->id maps, id counters, the
applied index and the idempotency table. Store names are scoped per tenant by
putting the tenant in the name-map key, and every user-facing method resolves a
store through (tenant, name), so no call made for one tenant can reach another
tenant's store. Store ids are never reused, so a dropped store's id cannot alias
a new store.

Snapshots stream a plyvel snapshot (a consistent point-in-time view that apply can
run beside) to a file of length-prefixed records with a CRC trailer. Loading one
builds a complete new LevelDB next to the live one, fsyncs it, and swaps the two
directories with renames; `__init__` finishes or undoes a swap a crash interrupted.

Threads: apply, reads, load_snapshot and close serialize on one lock (plyvel
itself is thread-safe; the lock protects the DB handle that load_snapshot
replaces). `StateSnapshot.write_to` runs without it, on its own plyvel snapshot.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import plyvel
from google.protobuf import message as pb_message

from kv import limits
from kv.errors import InvalidArgument, NotFound
from proto import kv_pb2

# plyvel ships no type stubs; its DB, Snapshot and WriteBatch objects are Any here
# and every value read from them is given a type where it is read.
_Plyvel = Any

_OK = kv_pb2.CommandResult.OK
_NOT_FOUND = kv_pb2.CommandResult.NOT_FOUND
_ALREADY_EXISTS = kv_pb2.CommandResult.ALREADY_EXISTS
_CONDITION_FAILED = kv_pb2.CommandResult.CONDITION_FAILED
_INVALID = kv_pb2.CommandResult.INVALID

# ---------------------------------------------------------------- key layout

SYSTEM_STORE_ID = 0
_U64_MAX = 2**64 - 1

# Keyspaces of the system store. The numbers are part of the on-disk format.
_SYS_META = 1  # b"applied_index" -> u64; b"next_store_id" -> u64
_SYS_STORE_BY_NAME = 2  # tenant | store name -> store_id u64
_SYS_STORE_COUNT = 3  # tenant -> number of stores u64 (absent = 0)
_SYS_KEYSPACE_BY_NAME = 4  # store_id | keyspace name -> keyspace_id u32
_SYS_KEYSPACE_NEXT = 5  # store_id -> next keyspace_id u32
_SYS_IDEM = 6  # tenant | request_id -> index u64 | CommandResult
_SYS_IDEM_BY_INDEX = 7  # index u64 | tenant | request_id -> b"" (eviction order)


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _data_prefix(store_id: int, keyspace_id: int) -> bytes:
    return _u64(store_id) + _u32(keyspace_id)


def _sys_key(keyspace: int, suffix: bytes = b"") -> bytes:
    return _data_prefix(SYSTEM_STORE_ID, keyspace) + suffix


def _tenant_bytes(tenant: str) -> bytes:
    # Length-prefixed so that (tenant, name) pairs cannot collide: tenant "ab" +
    # store "c" and tenant "a" + store "bc" encode differently. Tenants are names,
    # at most NAME_BYTES_MAX (< 256) bytes, so one length byte suffices.
    raw = tenant.encode("ascii")
    if not len(raw) <= 255:
        raise StateCorrupt(f"tenant of {len(raw)} bytes passed validation")
    return bytes([len(raw)]) + raw


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


_APPLIED_INDEX_KEY = _sys_key(_SYS_META, b"applied_index")
_NEXT_STORE_ID_KEY = _sys_key(_SYS_META, b"next_store_id")

# ---------------------------------------------------------------- bounds of this module

# Idempotency records evicted per apply at most. Each apply adds at most one record,
# so removing up to 16 keeps the table draining even after the index jumps (Raft
# no-ops, or a snapshot install) and leaves many records expired at once; a record
# that is expired but not yet evicted is ignored on lookup, so eviction lag never
# changes a result.
IDEMPOTENCY_EVICT_PER_APPLY_MAX = 16

# load_snapshot writes the new database in batches of about this many bytes, so
# loading holds one batch in memory, never the database.
_LOAD_BATCH_BYTES_MAX = 4 * 1024 * 1024

# Bounds on one snapshot record, checked before reading it so a corrupt length
# cannot make the loader allocate gigabytes. Real keys are at most ~1.2 KiB
# (12-byte prefix + KEY_BYTES_MAX) and values ~16 KiB (VALUE_BYTES_MAX + version);
# the bounds leave room for limits to grow without a format change.
_SNAPSHOT_KEY_BYTES_MAX = 64 * 1024
_SNAPSHOT_VALUE_BYTES_MAX = 1024 * 1024

# Snapshot file format, version 1 (all integers big-endian):
#   header:  magic "FLOESNAP" | format u32 | applied index u64
#   records: 0x01 | key length u32 | value length u32 | key | value   (in key order)
#   trailer: 0x02 | record count u64 | crc32 u32 of every byte before the crc
_SNAPSHOT_MAGIC = b"FLOESNAP"
_SNAPSHOT_FORMAT = 1
_SNAPSHOT_HEADER = struct.Struct(">8sIQ")
_RECORD_HEADER = struct.Struct(">II")
_TRAILER_COUNT = struct.Struct(">Q")
_TRAILER_CRC = struct.Struct(">I")
_TAG_RECORD = 0x01
_TAG_TRAILER = 0x02
_FILE_BUFFER_BYTES = 1024 * 1024


class StateCorrupt(Exception):
    """The stored state breaks an invariant of this module: stop, do not serve it."""


# ---------------------------------------------------------------- validation

def _name_problem(kind: str, name: str) -> str | None:
    """Why `name` is not a valid tenant/store/keyspace name, or None if it is."""
    if not name:
        return f"{kind} name is empty"
    if len(name) > limits.NAME_BYTES_MAX:  # ASCII-only below, so chars == bytes
        return f"{kind} name is {len(name)} bytes, over NAME_BYTES_MAX={limits.NAME_BYTES_MAX}"
    for ch in name:
        if not (0x20 <= ord(ch) <= 0x7E) or ch == "/":
            return f"{kind} name {name!r} has {ch!r}: names are printable ASCII without '/'"
    return None


def _key_problem(what: str, key: bytes) -> str | None:
    if not key:
        return f"{what} is empty"
    if len(key) > limits.KEY_BYTES_MAX:
        return f"{what} is {len(key)} bytes, over KEY_BYTES_MAX={limits.KEY_BYTES_MAX}"
    return None


def _check_read_name(kind: str, name: str) -> None:
    problem = _name_problem(kind, name)
    if problem is not None:
        raise InvalidArgument(problem)


def _check_read_bytes(what: str, value: bytes) -> None:
    if len(value) > limits.KEY_BYTES_MAX:
        raise InvalidArgument(f"{what} is {len(value)} bytes, over KEY_BYTES_MAX={limits.KEY_BYTES_MAX}")


# ---------------------------------------------------------------- typed plyvel reads

def _get(reader: _Plyvel, key: bytes) -> bytes | None:
    value: bytes | None = reader.get(key)
    return value


def _get_u64(reader: _Plyvel, key: bytes, default: int) -> int:
    raw = _get(reader, key)
    if raw is None:
        return default
    if not len(raw) == 8:
        raise StateCorrupt(f"u64 at {key!r} is {len(raw)} bytes")
    return int.from_bytes(raw, "big")


def _get_u32(reader: _Plyvel, key: bytes) -> int | None:
    raw = _get(reader, key)
    if raw is None:
        return None
    if not len(raw) == 4:
        raise StateCorrupt(f"u32 at {key!r} is {len(raw)} bytes")
    return int.from_bytes(raw, "big")


def _iter_items(reader: _Plyvel, start: bytes, stop: bytes | None) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) for start <= key < stop, in key order (stop None: to the end)."""
    items: Iterator[tuple[bytes, bytes]] = reader.iterator(start=start, stop=stop)
    return items


def _iter_prefix(reader: _Plyvel, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    return _iter_items(reader, prefix, _prefix_end(prefix))


def _decode_value(full_key: bytes, raw: bytes) -> tuple[bytes, int]:
    """(user value, version) of a stored data value."""
    if not len(raw) >= 8:
        raise StateCorrupt(f"value at {full_key!r} is {len(raw)} bytes, shorter than its version")
    version = int.from_bytes(raw[:8], "big")
    if not version >= 1:
        raise StateCorrupt(f"value at {full_key!r} has version 0")
    return raw[8:], version


def _store_id(reader: _Plyvel, tenant: str, store: str) -> int | None:
    key = _sys_key(_SYS_STORE_BY_NAME, _tenant_bytes(tenant) + store.encode("ascii"))
    raw = _get(reader, key)
    if raw is None:
        return None
    if not len(raw) == 8:
        raise StateCorrupt(f"store id of {tenant!r}/{store!r} is {len(raw)} bytes")
    store_id = int.from_bytes(raw, "big")
    if not store_id > SYSTEM_STORE_ID:
        raise StateCorrupt(f"store {tenant!r}/{store!r} maps to the system store")
    return store_id


def _keyspace_id(reader: _Plyvel, store_id: int, keyspace: str) -> int | None:
    keyspace_id = _get_u32(reader, _sys_key(_SYS_KEYSPACE_BY_NAME, _u64(store_id) + keyspace.encode("ascii")))
    if keyspace_id is not None and not keyspace_id >= 1:
        raise StateCorrupt(f"keyspace {keyspace!r} of store {store_id} has id 0")
    return keyspace_id


def _keyspaces(reader: _Plyvel, store_id: int) -> list[str]:
    prefix = _sys_key(_SYS_KEYSPACE_BY_NAME, _u64(store_id))
    return [key[len(prefix):].decode("ascii") for key, _ in _iter_prefix(reader, prefix)]


def _result(
    code: kv_pb2.CommandResult.Code, message: str = "", *, index: int, failed_condition: int = 0,
) -> kv_pb2.CommandResult:
    return kv_pb2.CommandResult(code=code, message=message, index=index, failed_condition=failed_condition)


# ---------------------------------------------------------------- the state machine

class KVState:
    """The deterministic KV state machine over one LevelDB directory.

    Persistence contract: after `apply(i, c)` returns, the effects of entry i and
    applied_index == i are in LevelDB's memtable and write-ahead log, but NOT
    fsynced. A crash may lose a suffix of applied entries; applied_index then
    names the last one that survived, and the Raft journal must replay every
    entry after it. Never acknowledge a client from LevelDB's durability.
    """

    def __init__(self, path: str) -> None:
        self._path = os.path.abspath(path)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load_snapshot at a time
        _recover_swap(self._path)
        self._db: _Plyvel | None = plyvel.DB(self._path, create_if_missing=True)
        self._applied_index = _get_u64(self._db, _APPLIED_INDEX_KEY, 0)

    # ------------------------------------------------------------ lifecycle

    @property
    def applied_index(self) -> int:
        """The Raft index of the last applied entry (0 for a new database)."""
        return self._applied_index

    def close(self) -> None:
        """Close the database. A StateSnapshot still writing fails with RuntimeError."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _live(self) -> _Plyvel:
        if self._db is None:
            raise RuntimeError(f"KVState at {self._path} is closed")
        return self._db

    # ------------------------------------------------------------ apply

    def apply(self, index: int, command: bytes) -> bytes:
        """Apply the command of Raft entry `index`; return a serialized CommandResult.

        An index at or below applied_index is a replay: nothing is applied and the
        answer is OK with message "replayed". Otherwise the command's effects, its
        idempotency record and the new applied index are written in one batch.
        """
        if not (isinstance(index, int) and 1 <= index <= _U64_MAX):
            raise ValueError(f"Raft index {index!r} is not in [1, 2**64)")
        with self._lock:
            db = self._live()
            if index <= self._applied_index:
                replayed: bytes = _result(_OK, "replayed", index=index).SerializeToString()
                return replayed
            batch = db.write_batch()
            result = self._apply_entry(db, batch, index, command)
            # The fact written and the fact cached are checked against each other.
            if not result.index >= 1:
                raise StateCorrupt(f"result of entry {index} has no index")
            batch.put(_APPLIED_INDEX_KEY, _u64(index))
            batch.write()
            if not _get_u64(db, _APPLIED_INDEX_KEY, 0) == index:
                raise StateCorrupt(f"applied index did not persist as {index}")
            self._applied_index = index
            encoded: bytes = result.SerializeToString()
            return encoded

    def _apply_entry(self, db: _Plyvel, batch: _Plyvel, index: int, command: bytes) -> kv_pb2.CommandResult:
        """Decide entry `index`'s result and put its effects (not the applied index) in `batch`."""
        if len(command) > limits.COMMAND_BYTES_MAX:
            return _result(_INVALID, f"command is {len(command)} bytes, over COMMAND_BYTES_MAX="
                           f"{limits.COMMAND_BYTES_MAX}", index=index)
        try:
            cmd = kv_pb2.Command.FromString(command)
        except pb_message.DecodeError:
            # A fixed message: the parser's own wording may differ between protobuf
            # versions, and this result is state (idempotency records, snapshots).
            return _result(_INVALID, "command does not parse as a floe.kv.Command", index=index)
        problem = _name_problem("tenant", cmd.tenant)
        if problem is not None:
            return _result(_INVALID, problem, index=index)
        request_id = cmd.request_id
        if len(request_id) > limits.REQUEST_ID_BYTES_MAX:
            return _result(_INVALID, f"request_id is {len(request_id)} bytes, over REQUEST_ID_BYTES_MAX="
                           f"{limits.REQUEST_ID_BYTES_MAX}", index=index)

        idem_suffix = _tenant_bytes(cmd.tenant) + request_id
        previous: int | None = None  # index of an expired record this entry replaces
        if request_id:
            found = self._idempotency_lookup(db, idem_suffix, index)
            if isinstance(found, kv_pb2.CommandResult):
                self._evict_idempotency(db, batch, index)
                return found
            previous = found

        result = self._dispatch(db, batch, index, cmd)
        if result.code != _OK:
            batch.clear()  # a failed command applies nothing (drop_store may have queued deletes)
        self._evict_idempotency(db, batch, index)
        if request_id:
            # After eviction, so that a delete eviction queued for this key's expired
            # record is overridden by this put (later operations in a batch win).
            if previous is not None:
                batch.delete(_sys_key(_SYS_IDEM_BY_INDEX, _u64(previous) + idem_suffix))
            batch.put(_sys_key(_SYS_IDEM, idem_suffix), _u64(index) + result.SerializeToString())
            batch.put(_sys_key(_SYS_IDEM_BY_INDEX, _u64(index) + idem_suffix), b"")
        return result

    def _idempotency_lookup(self, db: _Plyvel, idem_suffix: bytes, index: int) -> kv_pb2.CommandResult | int | None:
        """The live stored result for this request, else the index of an expired record, else None."""
        raw = _get(db, _sys_key(_SYS_IDEM, idem_suffix))
        if raw is None:
            return None
        if not len(raw) >= 8:
            raise StateCorrupt(f"idempotency record {idem_suffix!r} is {len(raw)} bytes")
        written = int.from_bytes(raw[:8], "big")
        if not 1 <= written < index:
            raise StateCorrupt(f"idempotency record {idem_suffix!r} written at {written}, now applying {index}")
        if written + limits.IDEMPOTENCY_WINDOW_ENTRIES < index:
            return written  # expired: not yet evicted, but no longer an answer
        try:
            stored: kv_pb2.CommandResult = kv_pb2.CommandResult.FromString(raw[8:])
        except pb_message.DecodeError as e:
            raise StateCorrupt(f"idempotency record {idem_suffix!r} does not parse: {e}") from e
        if not stored.index == written:
            raise StateCorrupt(f"idempotency record {idem_suffix!r}: result index {stored.index} != {written}")
        return stored

    def _evict_idempotency(self, db: _Plyvel, batch: _Plyvel, index: int) -> None:
        """Queue deletes of up to IDEMPOTENCY_EVICT_PER_APPLY_MAX expired records, oldest first."""
        threshold = index - limits.IDEMPOTENCY_WINDOW_ENTRIES  # records written before it are expired
        if threshold <= 1:
            return
        prefix = _sys_key(_SYS_IDEM_BY_INDEX)
        evicted = 0
        for key, _ in _iter_items(db, prefix, prefix + _u64(threshold)):
            if evicted >= IDEMPOTENCY_EVICT_PER_APPLY_MAX:
                break
            written = int.from_bytes(key[len(prefix):len(prefix) + 8], "big")
            idem_suffix = key[len(prefix) + 8:]
            batch.delete(key)
            record_key = _sys_key(_SYS_IDEM, idem_suffix)
            record = _get(db, record_key)
            # The record may since have been replaced by a newer one for the same
            # request_id (its index differs); only the one this entry indexes goes.
            if record is not None and int.from_bytes(record[:8], "big") == written:
                batch.delete(record_key)
            evicted += 1

    def _dispatch(self, db: _Plyvel, batch: _Plyvel, index: int, cmd: kv_pb2.Command) -> kv_pb2.CommandResult:
        kind = cmd.WhichOneof("cmd")
        if kind == "create_store":
            return _create_store(db, batch, index, cmd.tenant, cmd.create_store.name)
        if kind == "drop_store":
            return _drop_store(db, batch, index, cmd.tenant, cmd.drop_store.name)
        if kind == "create_keyspace":
            return _create_keyspace(db, batch, index, cmd.tenant, cmd.create_keyspace)
        if kind == "batch":
            return _batch(db, batch, index, cmd.tenant, cmd.batch)
        if kind == "barrier":
            return _result(_OK, index=index)
        return _result(_INVALID, "command names no operation", index=index)

    # ------------------------------------------------------------ reads

    def get(self, tenant: str, store: str, keyspace: str, key: bytes) -> tuple[bytes, int] | None:
        """(value, version) of `key`, or None if absent. NotFound for an unknown store or keyspace."""
        problem = _key_problem("key", key)
        if problem is not None:
            raise InvalidArgument(problem)
        with self._lock:
            db = self._live()
            prefix = _resolve(db, tenant, store, keyspace)
            raw = _get(db, prefix + key)
            if raw is None:
                return None
            return _decode_value(prefix + key, raw)

    def scan(
        self, tenant: str, store: str, keyspace: str, *, prefix: bytes = b"", start: bytes = b"", end: bytes = b"",
        limit: int = 0, continuation: bytes = b"",
    ) -> tuple[list[tuple[bytes, bytes, int]], bytes]:
        """One page of (key, value, version) in key order, and the token for the next page.

        The keys are those with `prefix` AND in [start, end) (empty end: no bound).
        `limit` 0 or over SCAN_LIMIT_MAX means SCAN_LIMIT_MAX. The returned token is
        empty when nothing follows the page; pass a non-empty one back, with the same
        other arguments, for the next page. Pages are read from different states if
        commands apply between them; each page alone is one state.
        """
        _check_read_bytes("prefix", prefix)
        _check_read_bytes("start", start)
        _check_read_bytes("end", end)
        if limit < 0:
            raise InvalidArgument(f"scan limit {limit} is negative")
        page_max = limits.SCAN_LIMIT_MAX if limit == 0 or limit > limits.SCAN_LIMIT_MAX else limit
        lower = max(prefix, start)
        if continuation:
            lower = max(lower, _decode_continuation(continuation) + b"\x00")
        uppers = [u for u in (end or None, _prefix_end(prefix) if prefix else None) if u is not None]
        upper = min(uppers) if uppers else None
        if upper is not None and lower >= upper:
            return [], b""
        with self._lock:
            snap = self._live().snapshot()
        try:
            base = _resolve(snap, tenant, store, keyspace)
            stop = base + upper if upper is not None else _prefix_end(base)
            items: list[tuple[bytes, bytes, int]] = []
            for full_key, raw in _iter_items(snap, base + lower, stop):
                if len(items) == page_max:
                    return items, _encode_continuation(items[-1][0])
                value, version = _decode_value(full_key, raw)
                items.append((full_key[len(base):], value, version))
            return items, b""
        finally:
            snap.close()

    def list_stores(self, tenant: str) -> list[tuple[str, int, list[str]]]:
        """(name, store_id, keyspace names sorted) of every store of `tenant`, sorted by name."""
        _check_read_name("tenant", tenant)
        with self._lock:
            snap = self._live().snapshot()
        try:
            prefix = _sys_key(_SYS_STORE_BY_NAME, _tenant_bytes(tenant))
            stores: list[tuple[str, int, list[str]]] = []
            for key, raw in _iter_prefix(snap, prefix):
                if not len(raw) == 8:
                    raise StateCorrupt(f"store id at {key!r} is {len(raw)} bytes")
                store_id = int.from_bytes(raw, "big")
                stores.append((key[len(prefix):].decode("ascii"), store_id, _keyspaces(snap, store_id)))
            return stores
        finally:
            snap.close()

    def all_stores(self, name_prefix: str = "") -> list[tuple[str, str]]:
        """(tenant, store name) of every store of every tenant whose name starts
        with `name_prefix`. For the node's own bookkeeping (the object tier's
        live set), never for a tenant's request."""
        with self._lock:
            snap = self._live().snapshot()
        try:
            out: list[tuple[str, str]] = []
            for key, _raw in _iter_prefix(snap, _sys_key(_SYS_STORE_BY_NAME)):
                rest = key[len(_sys_key(_SYS_STORE_BY_NAME)):]
                tenant = rest[1:1 + rest[0]].decode("ascii")
                name = rest[1 + rest[0]:].decode("ascii")
                if name.startswith(name_prefix):
                    out.append((tenant, name))
            return out
        finally:
            snap.close()

    def list_keyspaces(self, tenant: str, store: str) -> list[str]:
        """Keyspace names of a store, sorted. NotFound for an unknown store."""
        _check_read_name("tenant", tenant)
        _check_read_name("store", store)
        with self._lock:
            db = self._live()
            store_id = _store_id(db, tenant, store)
            if store_id is None:
                raise NotFound(f"store {store!r} does not exist for tenant {tenant!r}")
            return _keyspaces(db, store_id)

    # ------------------------------------------------------------ snapshots

    def begin_snapshot(self) -> StateSnapshot:
        """A point-in-time view at the current applied index, to write out in the background."""
        with self._lock:
            snap = self._live().snapshot()
            index = _get_u64(snap, _APPLIED_INDEX_KEY, 0)
            if not index == self._applied_index:
                snap.close()
                raise StateCorrupt(f"snapshot sees applied index {index}, state says {self._applied_index}")
            return StateSnapshot(snap, index)

    @staticmethod
    def snapshot_index(path: str) -> int:
        """The applied index in a snapshot file's header (the file is not verified)."""
        with open(path, "rb") as f:
            return _read_header(_CrcReader(f))

    def load_snapshot(self, path: str) -> None:
        """Replace the whole database with the snapshot file at `path`.

        The file is streamed into a new LevelDB directory beside the live one and
        verified (CRC, record count, key order, applied index) before the live
        database is touched; a torn or corrupt file raises ValueError and changes
        nothing. The new directory is fsynced, then swapped in by renaming (live ->
        .old, new -> live) with the parent directory fsynced, and reopened. A crash
        at any point leaves either the old or the new database (see _recover_swap).
        StateSnapshots of the old database stop working.
        """
        with self._load_lock:
            self._live()
            loading, old = _sibling(self._path, "loading"), _sibling(self._path, "old")
            for leftover in (loading, old):
                if os.path.exists(leftover):
                    shutil.rmtree(leftover)
            try:
                index = _build_from_snapshot(path, loading)
            except BaseException:
                shutil.rmtree(loading, ignore_errors=True)
                raise
            with self._lock:
                self._live().close()
                self._db = None
                os.rename(self._path, old)
                os.rename(loading, self._path)
                _fsync_dir(os.path.dirname(self._path))
                self._db = plyvel.DB(self._path)
                self._applied_index = _get_u64(self._db, _APPLIED_INDEX_KEY, 0)
                if not self._applied_index == index:
                    raise StateCorrupt(f"loaded database has applied index {self._applied_index}, "
                                       f"snapshot header says {index}")
            shutil.rmtree(old)
            _fsync_dir(os.path.dirname(self._path))


class StateSnapshot:
    """A plyvel snapshot of the state at applied index `index`, to stream to a file."""

    def __init__(self, snapshot: _Plyvel, index: int) -> None:
        self.index = index
        self._snapshot = snapshot

    def write_to(self, path: str) -> None:
        """Stream every key/value to `path` in the snapshot format, then fsync the file.

        Safe to run in a background thread while apply continues. Memory is one
        record plus the file buffer. Raises RuntimeError if the snapshot was
        released or its database closed meanwhile; the file is then incomplete
        (and load_snapshot would reject it).
        """
        with open(path, "wb", buffering=_FILE_BUFFER_BYTES) as f:
            out = _CrcWriter(f)
            out.write(_SNAPSHOT_HEADER.pack(_SNAPSHOT_MAGIC, _SNAPSHOT_FORMAT, self.index))
            count = 0
            seen_index = 0  # a database that never applied an entry has no applied-index key
            for key, value in _iter_items(self._snapshot, b"", None):
                if key == _APPLIED_INDEX_KEY:
                    seen_index = int.from_bytes(value, "big")
                out.write(bytes([_TAG_RECORD]) + _RECORD_HEADER.pack(len(key), len(value)))
                out.write(key)
                out.write(value)
                count += 1
            if not seen_index == self.index:
                raise StateCorrupt(f"snapshot holds applied index {seen_index}, expected {self.index}")
            out.write(bytes([_TAG_TRAILER]) + _TRAILER_COUNT.pack(count))
            f.write(_TRAILER_CRC.pack(out.crc))
            f.flush()
            os.fsync(f.fileno())

    def release(self) -> None:
        """Let LevelDB drop the versions this snapshot pins. Idempotent."""
        self._snapshot.close()


# ---------------------------------------------------------------- command handlers

def _create_store(db: _Plyvel, batch: _Plyvel, index: int, tenant: str, name: str) -> kv_pb2.CommandResult:
    problem = _name_problem("store", name)
    if problem is not None:
        return _result(_INVALID, problem, index=index)
    if _store_id(db, tenant, name) is not None:
        return _result(_ALREADY_EXISTS, f"store {name!r} exists", index=index)
    count_key = _sys_key(_SYS_STORE_COUNT, _tenant_bytes(tenant))
    count = _get_u64(db, count_key, 0)
    if count >= limits.STORES_PER_TENANT_MAX:
        return _result(_INVALID, f"tenant has {count} stores, the STORES_PER_TENANT_MAX", index=index)
    store_id = _get_u64(db, _NEXT_STORE_ID_KEY, 1)
    if not store_id > SYSTEM_STORE_ID:
        raise StateCorrupt(f"next store id is {store_id}")
    batch.put(_NEXT_STORE_ID_KEY, _u64(store_id + 1))
    batch.put(_sys_key(_SYS_STORE_BY_NAME, _tenant_bytes(tenant) + name.encode("ascii")), _u64(store_id))
    batch.put(count_key, _u64(count + 1))
    batch.put(_sys_key(_SYS_KEYSPACE_NEXT, _u64(store_id)), _u32(1))
    return _result(_OK, index=index)


def _drop_store(db: _Plyvel, batch: _Plyvel, index: int, tenant: str, name: str) -> kv_pb2.CommandResult:
    problem = _name_problem("store", name)
    if problem is not None:
        return _result(_INVALID, problem, index=index)
    store_id = _store_id(db, tenant, name)
    if store_id is None:
        return _result(_NOT_FOUND, f"store {name!r} does not exist", index=index)
    deleted = 0
    for key, _ in _iter_prefix(db, _u64(store_id)):
        deleted += 1
        if deleted > limits.DROP_STORE_KEYS_MAX:  # the caller clears the batch
            return _result(_INVALID, f"store {name!r} has more than DROP_STORE_KEYS_MAX="
                           f"{limits.DROP_STORE_KEYS_MAX} keys", index=index)
        batch.delete(key)
    for key, _ in _iter_prefix(db, _sys_key(_SYS_KEYSPACE_BY_NAME, _u64(store_id))):
        batch.delete(key)
    batch.delete(_sys_key(_SYS_KEYSPACE_NEXT, _u64(store_id)))
    batch.delete(_sys_key(_SYS_STORE_BY_NAME, _tenant_bytes(tenant) + name.encode("ascii")))
    count_key = _sys_key(_SYS_STORE_COUNT, _tenant_bytes(tenant))
    count = _get_u64(db, count_key, 0)
    if not count >= 1:
        raise StateCorrupt(f"tenant {tenant!r} owns store {name!r} but counts {count} stores")
    if count == 1:
        batch.delete(count_key)
    else:
        batch.put(count_key, _u64(count - 1))
    return _result(_OK, index=index)


def _create_keyspace(db: _Plyvel, batch: _Plyvel, index: int, tenant: str,
                     cmd: kv_pb2.CreateKeyspaceCmd) -> kv_pb2.CommandResult:
    for kind, name in (("store", cmd.store), ("keyspace", cmd.keyspace)):
        problem = _name_problem(kind, name)
        if problem is not None:
            return _result(_INVALID, problem, index=index)
    store_id = _store_id(db, tenant, cmd.store)
    if store_id is None:
        return _result(_NOT_FOUND, f"store {cmd.store!r} does not exist", index=index)
    if _keyspace_id(db, store_id, cmd.keyspace) is not None:
        return _result(_ALREADY_EXISTS, f"keyspace {cmd.keyspace!r} exists in store {cmd.store!r}", index=index)
    count = len(_keyspaces(db, store_id))
    if count >= limits.KEYSPACES_PER_STORE_MAX:
        return _result(_INVALID, f"store {cmd.store!r} has {count} keyspaces, the KEYSPACES_PER_STORE_MAX",
                       index=index)
    next_key = _sys_key(_SYS_KEYSPACE_NEXT, _u64(store_id))
    keyspace_id = _get_u32(db, next_key)
    if keyspace_id is None or not keyspace_id >= 1:
        raise StateCorrupt(f"store {store_id} has next keyspace id {keyspace_id}")
    batch.put(next_key, _u32(keyspace_id + 1))
    batch.put(_sys_key(_SYS_KEYSPACE_BY_NAME, _u64(store_id) + cmd.keyspace.encode("ascii")), _u32(keyspace_id))
    return _result(_OK, index=index)


def _batch(db: _Plyvel, batch: _Plyvel, index: int, tenant: str, cmd: kv_pb2.BatchCmd) -> kv_pb2.CommandResult:
    """Check every condition against the state before the batch; if all hold, apply the mutations in order."""
    # Shape and limits first, so INVALID never depends on what the database holds.
    problem = _name_problem("store", cmd.store)
    if problem is not None:
        return _result(_INVALID, problem, index=index)
    ops = len(cmd.conditions) + len(cmd.mutations)
    if ops > limits.BATCH_OPS_MAX:
        return _result(_INVALID, f"batch has {ops} conditions and mutations, over BATCH_OPS_MAX="
                       f"{limits.BATCH_OPS_MAX}", index=index)
    for i, cond in enumerate(cmd.conditions):
        check = cond.WhichOneof("check")
        problem = (_name_problem("keyspace", cond.keyspace) or _key_problem(f"condition {i} key", cond.key)
                   or (f"condition {i} has no check" if check is None else None)
                   or (f"condition {i} value is over VALUE_BYTES_MAX={limits.VALUE_BYTES_MAX}"
                       if check == "value_equals" and len(cond.value_equals) > limits.VALUE_BYTES_MAX else None))
        if problem is not None:
            return _result(_INVALID, problem, index=index)
    for i, mut in enumerate(cmd.mutations):
        op = mut.WhichOneof("op")
        problem = (_name_problem("keyspace", mut.keyspace) or _key_problem(f"mutation {i} key", mut.key)
                   or (f"mutation {i} has no operation" if op is None else None)
                   or (f"mutation {i} has delete=false" if op == "delete" and not mut.delete else None)
                   or (f"mutation {i} value is {len(mut.put)} bytes, over VALUE_BYTES_MAX={limits.VALUE_BYTES_MAX}"
                       if op == "put" and len(mut.put) > limits.VALUE_BYTES_MAX else None))
        if problem is not None:
            return _result(_INVALID, problem, index=index)

    store_id = _store_id(db, tenant, cmd.store)
    if store_id is None:
        return _result(_NOT_FOUND, f"store {cmd.store!r} does not exist", index=index)
    prefixes: dict[str, bytes] = {}
    for name in [c.keyspace for c in cmd.conditions] + [m.keyspace for m in cmd.mutations]:
        if name not in prefixes:
            keyspace_id = _keyspace_id(db, store_id, name)
            if keyspace_id is None:
                return _result(_NOT_FOUND, f"keyspace {name!r} does not exist in store {cmd.store!r}", index=index)
            prefixes[name] = _data_prefix(store_id, keyspace_id)

    for i, cond in enumerate(cmd.conditions):
        full_key = prefixes[cond.keyspace] + cond.key
        raw = _get(db, full_key)
        current = None if raw is None else _decode_value(full_key, raw)
        check = cond.WhichOneof("check")
        if check == "version_equals":
            holds = (0 if current is None else current[1]) == cond.version_equals
        elif check == "value_equals":
            holds = current is not None and current[0] == cond.value_equals
        else:  # absent: true = the key does not exist, false = it does
            holds = (current is None) == cond.absent
        if not holds:
            return _result(_CONDITION_FAILED, f"condition {i} ({check} on {cond.keyspace!r}/{cond.key!r}) "
                           "does not hold", index=index, failed_condition=i)

    version = _u64(index)
    for mut in cmd.mutations:
        full_key = prefixes[mut.keyspace] + mut.key
        if mut.WhichOneof("op") == "put":
            batch.put(full_key, version + mut.put)
        else:
            batch.delete(full_key)
    return _result(_OK, index=index)


# ---------------------------------------------------------------- read helpers

def _resolve(reader: _Plyvel, tenant: str, store: str, keyspace: str) -> bytes:
    """The data prefix of (tenant, store, keyspace); InvalidArgument or NotFound otherwise."""
    _check_read_name("tenant", tenant)
    _check_read_name("store", store)
    _check_read_name("keyspace", keyspace)
    store_id = _store_id(reader, tenant, store)
    if store_id is None:
        raise NotFound(f"store {store!r} does not exist for tenant {tenant!r}")
    keyspace_id = _keyspace_id(reader, store_id, keyspace)
    if keyspace_id is None:
        raise NotFound(f"keyspace {keyspace!r} does not exist in store {store!r}")
    return _data_prefix(store_id, keyspace_id)


# A continuation token is a format byte and the last key returned. It is opaque to
# callers; the format byte lets it change without misreading old tokens.
_CONTINUATION_FORMAT = 0x01


def _encode_continuation(last_key: bytes) -> bytes:
    return bytes([_CONTINUATION_FORMAT]) + last_key


def _decode_continuation(token: bytes) -> bytes:
    last_key = token[1:]
    if token[0] != _CONTINUATION_FORMAT or _key_problem("continuation key", last_key) is not None:
        raise InvalidArgument("scan continuation token is malformed")
    return last_key


# ---------------------------------------------------------------- snapshot files

class _CrcWriter:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.crc = 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self.crc = zlib.crc32(data, self.crc)


class _CrcReader:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.crc = 0

    def read(self, n: int, what: str) -> bytes:
        data = self.read_raw(n, what)
        self.crc = zlib.crc32(data, self.crc)
        return data

    def read_raw(self, n: int, what: str) -> bytes:
        data = self._f.read(n)
        if not len(data) == n:
            raise ValueError(f"snapshot file is truncated in the {what}")
        return data


def _read_header(reader: _CrcReader) -> int:
    magic, fmt, index = _SNAPSHOT_HEADER.unpack(reader.read(_SNAPSHOT_HEADER.size, "header"))
    if magic != _SNAPSHOT_MAGIC:
        raise ValueError("not a floe KV snapshot file (bad magic)")
    if fmt != _SNAPSHOT_FORMAT:
        raise ValueError(f"snapshot format {fmt} is not supported (expected {_SNAPSHOT_FORMAT})")
    index_int: int = index
    return index_int


def _build_from_snapshot(path: str, target: str) -> int:
    """Stream the snapshot file into a new LevelDB at `target`, verify it, fsync it; return its index.

    Raises ValueError if the file is torn or corrupt; `target` is then partial and
    the caller removes it.
    """
    db = plyvel.DB(target, create_if_missing=True, error_if_exists=True)
    try:
        with open(path, "rb", buffering=_FILE_BUFFER_BYTES) as f:
            reader = _CrcReader(f)
            index = _read_header(reader)
            count = 0
            previous_key: bytes | None = None
            applied = 0  # absent when the snapshot was taken before any entry applied
            batch = db.write_batch()
            batch_bytes = 0
            while True:
                tag = reader.read(1, "record tag")[0]
                if tag == _TAG_TRAILER:
                    break
                if tag != _TAG_RECORD:
                    raise ValueError(f"snapshot record {count} has tag {tag}")
                key_len, value_len = _RECORD_HEADER.unpack(reader.read(_RECORD_HEADER.size, "record header"))
                if key_len > _SNAPSHOT_KEY_BYTES_MAX or value_len > _SNAPSHOT_VALUE_BYTES_MAX:
                    raise ValueError(f"snapshot record {count} claims a {key_len}-byte key, {value_len}-byte value")
                key = reader.read(key_len, "record key")
                value = reader.read(value_len, "record value")
                if previous_key is not None and not key > previous_key:
                    raise ValueError(f"snapshot record {count} is out of key order")
                if key == _APPLIED_INDEX_KEY:
                    applied = int.from_bytes(value, "big")
                previous_key = key
                batch.put(key, value)
                batch_bytes += key_len + value_len
                count += 1
                if batch_bytes >= _LOAD_BATCH_BYTES_MAX:
                    batch.write()
                    batch = db.write_batch()
                    batch_bytes = 0
            (trailer_count,) = _TRAILER_COUNT.unpack(reader.read(_TRAILER_COUNT.size, "trailer"))
            expected_crc = reader.crc
            (stored_crc,) = _TRAILER_CRC.unpack(reader.read_raw(_TRAILER_CRC.size, "trailer"))
            if stored_crc != expected_crc:
                raise ValueError("snapshot file CRC does not match its contents")
            if trailer_count != count:
                raise ValueError(f"snapshot trailer counts {trailer_count} records, file holds {count}")
            if f.read(1):
                raise ValueError("snapshot file has bytes after its trailer")
            if not applied == index:
                raise ValueError(f"snapshot holds applied index {applied}, header says {index}")
            batch.write()
    finally:
        db.close()
    _fsync_tree(target)
    return index


def _sibling(path: str, suffix: str) -> str:
    return f"{path}.{suffix}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """fsync every file of a (closed) LevelDB directory and the directory itself."""
    for name in os.listdir(path):
        file_path = os.path.join(path, name)
        if os.path.isfile(file_path):
            fd = os.open(file_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _recover_swap(path: str) -> None:
    """Finish or undo a load_snapshot swap that a crash interrupted.

    load_snapshot's order is: build and fsync `.loading`; rename live -> `.old`;
    rename `.loading` -> live; fsync the parent; remove `.old`. So:
    - live and `.old` both exist: the swap finished; remove `.old`.
    - `.old` exists, live does not: the crash fell between the renames, and
      `.loading` is complete (it was fsynced before the first rename): finish.
    - `.loading` exists beside a live database: the build never finished; remove it.
    """
    loading, old = _sibling(path, "loading"), _sibling(path, "old")
    parent = os.path.dirname(path)
    if os.path.exists(old) and not os.path.exists(path):
        os.rename(loading if os.path.exists(loading) else old, path)
        _fsync_dir(parent)
    for leftover in (loading, old):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)
            _fsync_dir(parent)
