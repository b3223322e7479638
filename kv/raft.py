"""Raft for the KV: pysyncobj with floe's journal, a persistence barrier and conflict-only truncation.

Theory of operation. pysyncobj runs Raft in one thread (the "tick" thread): each
tick it computes the commit index, applies committed entries, sends
AppendEntries, takes queued client commands into the log, then polls sockets,
whose handlers process incoming messages. floe adds three things, each in its
own small piece, without changing pysyncobj's code:

1. FloeJournal (kv/journal.py) is the log and the term/vote store; appends are
   buffered and made durable by `sync()`.

2. The persistence barrier (PersistBarrierTransport). Every message pysyncobj
   sends is queued and released by `barrier()`, which runs at the start of
   each tick and again after the tick's work, before the poll. It first sends
   the leader's AppendEntries (consecutive ones to a follower merged into one,
   `merge_append_entries`), then calls `journal.sync()` — one fdatasync for
   the whole batch of entries — and only then releases every other message
   (acknowledgements, votes, everything a follower says). Raft §5.1 requires
   that a server persists before it responds: a follower's acknowledgement of
   entry i leaves only after entry i is on its disk. The leader's own copy need
   not be durable before it is sent (Ongaro's thesis §10.2.1: the leader may
   write its log in parallel with replicating it), only before the leader
   counts itself toward a majority. pysyncobj computes the commit index at the
   start of a tick, right after the tick-start barrier has synced everything
   appended so far, so the leader only ever counts entries on its disk; the
   apply step checks the same fact (`synced_index`) before it applies. Term
   and vote are persisted synchronously inside setCurrentTerm, before the call
   returns to the code that sends a vote or any message of that term.

3. Conflict-only truncation (`conflict_only`). pysyncobj's follower deletes
   every entry after prevLogIdx whenever an AppendEntries overlaps its log.
   Stale or duplicated AppendEntries (which short heartbeat periods produce all
   the time) would then drop entries the follower already acknowledged, and a
   committed entry could fall below a majority. Raft §5.3 step 3 deletes only
   from the first entry whose term conflicts. The transport rewrites each
   incoming AppendEntries before pysyncobj sees it: entries it already holds
   with the same index and term are skipped; if nothing new remains, the
   message becomes a heartbeat at the follower's last index, its commit index
   is capped at the last entry the leader actually vouched for, and the
   acknowledgement pysyncobj sends back is capped the same way (so the
   follower never claims entries the leader did not send it). A real conflict
   still reaches pysyncobj's truncation path unchanged. The journal refuses to
   truncate an applied entry: it raises, the tick fails loudly in the log, and
   the entry stays (never a silent divergence).

Applying commands: a replicated method `_kv_apply(command)` runs on every node
in log order; the entry's index is `raftLastApplied + 1` while it runs
(pysyncobj increments raftLastApplied after the call; tests/test_kv_api.py
checks it against the journal). KVState.apply is idempotent by index, so
replay after restart is safe.

Snapshots (log compaction): pysyncobj's custom-serializer hooks. The
serializer takes a LevelDB snapshot synchronously (cheap) and streams it to a
file in a background thread; `serializeChecker` reports SUCCESS only after the
file is fsynced and renamed into place (durable.replace), and only then does
pysyncobj drop journal entries. A follower that is behind the compacted log
receives the file in 64 KiB chunks and loads it by streaming into a new
LevelDB. Neither side holds the database in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import pickle
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pysyncobj.syncobj as _pso
import pysyncobj.tcp_connection as _tcp_connection
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.transport import TCPTransport

from kv import durable
from kv.journal import FloeJournal, JournalInvariantError
from kv.state import KVState

log = logging.getLogger("floe.raft")

# ---------------------------------------------------------------- journal hook

_orig_create_journal = _pso.createJournal


def _create_journal(journal_file: Any) -> Any:
    """pysyncobj builds its journal with createJournal(conf.journalFile); a
    FloeJournal passed as journalFile is used as is."""
    if isinstance(journal_file, FloeJournal):
        return journal_file
    return _orig_create_journal(journal_file)


_pso.createJournal = _create_journal


# ---------------------------------------------------------------- untrusted bytes on the Raft port

# pysyncobj's wire format is zlib-compressed pickle. Unpickling attacker bytes
# runs arbitrary code, and a small zlib bomb can inflate to gigabytes, so floe
# replaces the two functions its connection code calls: messages may contain
# only plain data (dicts, lists, tuples, bytes, str, numbers, bools, None —
# everything pysyncobj sends), never a reference to a class or function, and
# a message inflates to at most RAFT_MESSAGE_BYTES_MAX.
RAFT_MESSAGE_BYTES_MAX = 64 * 1024 * 1024


class _PlainDataUnpickler(pickle.Unpickler):
    # Pickle protocol 2 (pysyncobj's) spells a bytes object as a call of
    # _codecs.encode(str, "latin1"), and an empty one as bytes(); those pure
    # data constructors are the only callables a message may name.
    _ALLOWED = frozenset({("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        # pysyncobj closes the connection without a word; say why.
        log.warning("event=raft_message_refused reason=global name=%s.%s", module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a Raft message")


class _SafeWire:
    """Stands in for the `pickle` and `zlib` modules inside pysyncobj.tcp_connection.

    With a Raft secret set (`set_raft_secret`), every message also carries an
    HMAC-SHA256 tag of its compressed bytes, checked before anything is
    inflated or unpickled: a host without the secret cannot speak Raft to the
    node. (pysyncobj's own `password` option does the same with Fernet, but
    costs ~70 us per message round trip in Python and measured +1-2 ms on the
    end-to-end p50 here; an HMAC is ~2 us.) Messages are not encrypted, and a
    captured message could be replayed; Raft tolerates duplicated and stale
    messages, and writes are deduplicated by request_id.
    """

    key: bytes | None = None

    @staticmethod
    def loads(data: bytes) -> Any:
        return _PlainDataUnpickler(io.BytesIO(data)).load()

    @staticmethod
    def dumps(obj: Any, protocol: int | None = None) -> bytes:
        return pickle.dumps(obj, 2)

    @classmethod
    def compress(cls, data: bytes, level: int = -1) -> bytes:
        out = zlib.compress(data, level)
        if cls.key is not None:
            out += hmac.new(cls.key, out, hashlib.sha256).digest()
        return out

    @classmethod
    def decompress(cls, data: bytes) -> bytes:
        if cls.key is not None:
            body, tag = data[:-_TAG_BYTES], data[-_TAG_BYTES:]
            if len(data) < _TAG_BYTES or not hmac.compare_digest(
                    tag, hmac.new(cls.key, body, hashlib.sha256).digest()):
                log.warning("event=raft_message_refused reason=bad_hmac bytes=%d", len(data))
                raise ValueError("Raft message without a valid HMAC")
            data = body
        d = zlib.decompressobj()
        out = d.decompress(data, RAFT_MESSAGE_BYTES_MAX)
        if d.unconsumed_tail:
            raise ValueError("Raft message inflates past RAFT_MESSAGE_BYTES_MAX")
        return out


_TAG_BYTES = 32


def set_raft_secret(secret: str) -> None:
    """Authenticate every Raft message of this process with `secret` (empty: none).
    One secret per process: a node process belongs to one Raft group."""
    _SafeWire.key = hashlib.sha256(b"floe raft link v1\0" + secret.encode()).digest() if secret else None


_tcp_connection.pickle = _SafeWire  # type: ignore[assignment]
_tcp_connection.zlib = _SafeWire  # type: ignore[assignment]


# ---------------------------------------------------------------- conflict-only truncation


class LogView(Protocol):
    """What conflict_only reads of a log: entries (command, index, term) by position."""

    def __getitem__(self, position: int) -> tuple[Any, int, int]: ...

    def __len__(self) -> int: ...


def conflict_only(log_entries: LogView,
                  msg: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Rewrite one AppendEntries so that applying it with pysyncobj's follower
    code removes no entry unless a term conflicts (Raft §5.3).

    Returns (message to process, ack cap): when the ack cap is not None, the
    `next_node_idx` acknowledgement sent in reply must not exceed it.
    Messages this function does not need to change are returned as they are.
    """
    if not log_entries or msg.get("prevLogIdx") is None or msg.get("transmission") is not None:
        return msg, None
    first, last = log_entries[0][1], log_entries[-1][1]
    prev_idx, prev_term = msg["prevLogIdx"], msg["prevLogTerm"]
    if prev_idx < first or prev_idx > last or log_entries[prev_idx - first][2] != prev_term:
        return msg, None  # pysyncobj rejects it and asks the leader to back up
    entries = msg.get("entries", [])
    skip = 0
    for e in entries:
        idx, term = e[1], e[2]
        if idx < first or (idx <= last and log_entries[idx - first][2] == term):
            skip += 1  # compacted (so committed and applied) or the same entry
        else:
            break
    if skip == 0 and (prev_idx == last or entries):
        # Nothing duplicated: either it extends our log exactly where it ends,
        # or its first entry conflicts and pysyncobj must truncate there.
        return msg, None
    if skip:
        prev_idx, prev_term = entries[skip - 1][1], entries[skip - 1][2]
    rest = list(entries[skip:])
    out = dict(msg)
    if rest:
        out.update(prevLogIdx=prev_idx, prevLogTerm=prev_term, entries=rest)
        return out, None
    # Everything the leader sent is already here. Raft: commitIndex =
    # min(leaderCommit, index of last new entry); our entries after prev_idx
    # are not vouched for by this message.
    out.update(prevLogIdx=last, prevLogTerm=log_entries[-1][2], entries=[],
               commit_index=min(msg["commit_index"], prev_idx))
    return out, prev_idx + 1


# A merged AppendEntries carries at most this many bytes of commands, well under
# RAFT_MESSAGE_BYTES_MAX and pysyncobj's own 64 KiB batching of catch-up sends.
MERGED_ENTRIES_BYTES_MAX = 1024 * 1024


def merge_append_entries(queue: Sequence[tuple[Any, dict[str, Any]]]) -> list[tuple[Any, dict[str, Any]]]:
    """Merge consecutive AppendEntries to the same follower into one message.

    In non-batch mode pysyncobj sends one AppendEntries per command, each
    starting where the previous one ended (it advances nextIndex as it sends).
    Two such messages of the same term, the second's prevLogIdx equal to the
    first's last index, say exactly what one message with both entry lists and
    the later commit index says; the follower then parses, handles and
    acknowledges once instead of once per command. Anything else (snapshot
    chunks, a message that restarts at another index) is left as it is.
    """
    out: list[tuple[Any, dict[str, Any]]] = []
    last_for: dict[Any, int] = {}  # node -> position in out of its last message
    for node, msg in queue:
        pos = last_for.get(node)
        prev = out[pos][1] if pos is not None else None
        if (pos is not None and prev is not None and "prevLogIdx" in msg and "transmission" not in msg
                and "prevLogIdx" in prev and "transmission" not in prev and prev["term"] == msg["term"]):
            entries = prev.get("entries") or []
            end = entries[-1][1] if entries else prev["prevLogIdx"]
            size = sum(len(e[0]) for e in entries) + sum(len(e[0]) for e in msg.get("entries") or [])
            if msg["prevLogIdx"] == end and size <= MERGED_ENTRIES_BYTES_MAX:
                out[pos] = (node, dict(prev, entries=list(entries) + list(msg.get("entries") or []),
                                       commit_index=msg["commit_index"]))
                continue
        last_for[node] = len(out)
        out.append((node, msg))
    return out


# ---------------------------------------------------------------- transport with the barrier


class PersistBarrierTransport(TCPTransport):  # type: ignore[misc]
    """TCPTransport whose sends wait for the journal's sync (see module doc)."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803
        self._journal: FloeJournal = syncObj.floe_journal
        self._queue: list[tuple[Any, Any]] = []
        self._ae_queue: list[tuple[Any, Any]] = []
        self._ack_cap: int | None = None
        self.barriers = 0
        self.rewrites = 0
        super().__init__(syncObj, selfNode, otherNodes)
        syncObj.addOnTickCallback(self.barrier)

    def send(self, node: Any, message: Any) -> bool:
        if message.get("type") == "append_entries":
            # Only a leader sends these; they do not depend on its own log
            # being durable yet (see the module doc), so they leave first at
            # the next barrier, merged (merge_append_entries).
            self._ae_queue.append((node, message))
            return True
        if self._ack_cap is not None and message.get("type") == "next_node_idx" and message.get("success"):
            if message["next_node_idx"] > self._ack_cap:
                message = dict(message, next_node_idx=self._ack_cap)
        self._queue.append((node, message))
        return True

    def barrier(self) -> None:
        """Send the leader's AppendEntries, make the journal durable, then
        release every other queued message."""
        if self._ae_queue:
            ae_queue, self._ae_queue = self._ae_queue, []
            for node, message in merge_append_entries(ae_queue):
                super().send(node, message)
        self._journal.sync()
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        self.barriers += 1
        for node, message in queue:
            if message.get("type") == "response_vote":
                log.info("event=vote_granted term=%d candidate=%s", message["term"], node.id)
            super().send(node, message)

    def _onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        if message.get("type") == "append_entries" and "prevLogIdx" in message:
            rewritten, cap = conflict_only(self._journal, message)
            if rewritten is not message:
                self.rewrites += 1
            self._ack_cap = cap
            try:
                super()._onMessageReceived(node, rewritten)
            finally:
                self._ack_cap = None
            return
        super()._onMessageReceived(node, message)


# ---------------------------------------------------------------- the Raft node

ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}

SNAPSHOT_MAGIC = b"FLOESNP1"


class RaftError(Exception):
    """A command could not be committed. `applied` says what is known:
    False = definitely not applied, None = unknown (indeterminate)."""

    def __init__(self, message: str, applied: bool | None) -> None:
        super().__init__(message)
        self.applied = applied


_NOT_APPLIED = {FAIL_REASON.QUEUE_FULL: "command queue full", FAIL_REASON.MISSING_LEADER: "no leader",
                FAIL_REASON.DISCARDED: "discarded by a new leader", FAIL_REASON.NOT_LEADER: "not the leader",
                FAIL_REASON.REQUEST_DENIED: "request denied"}


class RaftNode(SyncObj):  # type: ignore[misc]
    """One member of the KV's Raft group, applying commands to a KVState."""

    def __init__(self, self_address: str, peer_addresses: Sequence[str], raft_dir: str, state: KVState,
                 conf_kwargs: dict[str, Any]) -> None:
        os.makedirs(raft_dir, exist_ok=True)
        self.floe_state = state
        self.floe_journal = FloeJournal(raft_dir, protected_index=lambda: state.applied_index)
        self._raft_dir = raft_dir
        self._snapshot_path = os.path.join(raft_dir, "snapshot")
        self._snap_thread: threading.Thread | None = None
        self._snap_result: str | None = None  # None running/idle, "ok", "failed"
        self._yield_gil = False
        self._address = self_address
        conf = SyncObjConf(
            journalFile=self.floe_journal,
            fullDumpFile=self._snapshot_path,
            serializer=self._serialize,
            deserializer=self._deserialize,
            serializeChecker=self._check_serialize,
            onStateChanged=self._state_changed,
            dynamicMembershipChange=False,
            # Bind the Raft port to this node's own address only (pysyncobj
            # would bind 0.0.0.0), so nodes on 127.0.0.1-3 share a port number.
            bindAddress=self_address,
            **conf_kwargs,
        )
        super().__init__(self_address, list(peer_addresses), conf, transportClass=PersistBarrierTransport)

    # pysyncobj's tick, with the barrier first (see module doc).
    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803
        transport = self._SyncObj__transport
        if isinstance(transport, PersistBarrierTransport):
            transport.barrier()
        super()._onTick(timeToWait)

    @replicated
    def _kv_apply(self, command: bytes) -> bytes:
        index = self.raftLastApplied + 1
        if index > self.floe_journal.synced_index:
            # The tick-start barrier makes this impossible; if it ever happens,
            # refuse to apply (pysyncobj retries the tick after the next sync).
            log.critical("event=apply_before_sync index=%d synced_index=%d", index, self.floe_journal.synced_index)
            raise JournalInvariantError(f"entry {index} applied before it was durable")
        return self.floe_state.apply(index, command)

    def submit(self, command: bytes, callback: Callable[[bytes | None, int], None]) -> None:
        """Queue a serialized kv_pb2.Command; callback(result, fail_reason) runs on the Raft thread."""

        def done(result: bytes | None, err: int) -> None:
            callback(result, err)
            self._yield_gil = True

        self._kv_apply(command, callback=done)

    def _checkCommandsToApply(self) -> None:  # noqa: N802
        # pysyncobj calls this right after applying committed entries. If a
        # result was handed to a waiting thread, let it take the GIL now, once
        # per tick, instead of after the rest of the tick (pysyncobj's own
        # sends would have released it at their first syscall; floe's wait for
        # the end-of-tick barrier). A waiter that submits its next command at
        # once is then picked up by this very call. Measured: p50 -0.3 ms.
        if self._yield_gil:
            self._yield_gil = False
            time.sleep(0)
        super()._checkCommandsToApply()

    def commit(self, command: bytes, timeout_s: float) -> bytes:
        """Replicate and apply one command; return its serialized CommandResult.

        Returns only after a majority holds the entry durably and this node has
        applied it. Raises RaftError with `applied` False (definitely not
        applied) or None (unknown: timed out, or the leader changed after the
        command was forwarded)."""
        done = threading.Event()
        box: list[Any] = []

        def cb(result: bytes | None, err: int) -> None:
            box.append((result, err))
            done.set()

        self.submit(command, cb)
        if not done.wait(timeout_s):
            raise RaftError(f"no commit within {timeout_s:.1f}s", applied=None)
        result, err = box[0]
        if err == FAIL_REASON.SUCCESS:
            return bytes(result)
        if err in _NOT_APPLIED:
            raise RaftError(_NOT_APPLIED[err], applied=False)
        raise RaftError(f"outcome unknown (pysyncobj reason {err})", applied=None)

    # ---------------------------------------------------------------- status

    def role(self) -> str:
        return ROLE_NAMES[self.getStatus()["state"]]

    def is_leader(self) -> bool:
        """Cheap check for the request path (getStatus() builds a dict of everything)."""
        return bool(self._isLeader())

    def status(self) -> dict[str, Any]:
        s = self.getStatus()
        leader = s["leader"]
        return {"role": ROLE_NAMES[s["state"]], "term": s["raft_term"], "commit_index": s["commit_idx"],
                "applied_index": max(s["last_applied"], self.floe_state.applied_index),
                "leader_raft": leader.address if leader is not None else "", "log_len": s["log_len"],
                "ready": self.isReady(), "has_quorum": s["has_quorum"],
                "connected": [n.address for n in self.otherNodes if self.isNodeConnected(n)],
                "journal_syncs": self.floe_journal.syncs}

    def stats(self) -> dict[str, int]:
        """Counters of floe's additions, logged when the node stops: how often
        the barrier released messages and how often an AppendEntries had to be
        rewritten so that only a real conflict truncates."""
        transport = self._SyncObj__transport
        return {"journal_syncs": self.floe_journal.syncs, "barriers": transport.barriers,
                "append_entries_rewritten": transport.rewrites}

    def _state_changed(self, old: int, new: int) -> None:
        term = self.raftCurrentTerm
        if new == 2:
            log.info("event=became_leader term=%d node=%s", term, self._address)

    # ---------------------------------------------------------------- snapshots

    def _serialize(self, tmp_path: str, data: Any) -> None:
        # data = (last applied entry, the entry before it, cluster nodes).
        last_entry, prev_entry, _cluster = data
        if self._snap_thread is not None:
            raise RuntimeError("snapshot already running")
        snap = self.floe_state.begin_snapshot()
        raft_meta = pickle.dumps((tuple(last_entry), tuple(prev_entry)))
        out = self._snapshot_path + ".floe-tmp"
        self._snap_result = None

        def run() -> None:
            try:
                state_tmp = out + ".state"
                snap.write_to(state_tmp)
                with open(out, "wb") as f, open(state_tmp, "rb") as src:
                    f.write(SNAPSHOT_MAGIC + struct.pack("<I", len(raft_meta)) + raft_meta)
                    shutil.copyfileobj(src, f, 1 << 20)
                    f.flush()
                    durable.sync_file(out, f.fileno())
                os.unlink(state_tmp)
                durable.replace(out, self._snapshot_path)
                log.info("event=snapshot_written index=%d raft_index=%d bytes=%d", snap.index, last_entry[1],
                         os.path.getsize(self._snapshot_path))
                self._snap_result = "ok"
            except Exception:
                log.exception("event=snapshot_failed")
                self._snap_result = "failed"
            finally:
                snap.release()

        self._snap_thread = threading.Thread(target=run, name="floe-snapshot", daemon=True)
        self._snap_thread.start()

    def _check_serialize(self) -> int:
        if self._snap_thread is None:
            return SERIALIZER_STATE.NOT_SERIALIZING
        if self._snap_thread.is_alive():
            return SERIALIZER_STATE.SERIALIZING
        self._snap_thread = None
        return SERIALIZER_STATE.SUCCESS if self._snap_result == "ok" else SERIALIZER_STATE.FAILED

    def _deserialize(self, path: str) -> tuple[Any, Any, Any]:
        with open(path, "rb") as f:
            head = f.read(len(SNAPSHOT_MAGIC) + 4)
            if head[: len(SNAPSHOT_MAGIC)] != SNAPSHOT_MAGIC:
                raise ValueError(f"{path}: not a floe snapshot")
            (n,) = struct.unpack("<I", head[len(SNAPSHOT_MAGIC):])
            # The file may have come from the leader over the network: plain data only.
            last_entry, prev_entry = _SafeWire.loads(f.read(n))
            state_tmp = path + ".load"
            with open(state_tmp, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
        try:
            snap_index = KVState.snapshot_index(state_tmp)
            if snap_index > self.floe_state.applied_index:
                # A snapshot received from the leader (or our own, after the
                # state was lost): make the file durable before the journal is
                # cleared, then load it.
                fd = os.open(path, os.O_RDONLY)
                try:
                    durable.sync_file(path, fd)
                finally:
                    os.close(fd)
                durable.sync_dir(self._raft_dir)
                t0 = time.monotonic()
                self.floe_state.load_snapshot(state_tmp)
                log.info("event=snapshot_loaded index=%d seconds=%.3f", snap_index, time.monotonic() - t0)
        finally:
            os.unlink(state_tmp)
        return last_entry, prev_entry, None
