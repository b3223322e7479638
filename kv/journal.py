"""floe's Raft journal for pysyncobj: durable, checksummed, and conflict-only.

pysyncobj 0.3.17 keeps its log in an mmap that is never msynced and writes the
term and vote with a rename that is never fsynced (DESIGN.md §3), so a power
loss can silently drop entries a node acknowledged or let it vote twice in one
term. This journal replaces its FileJournal (SyncObj uses whatever
`pysyncobj.syncobj.createJournal` returns; kv/raft.py installs ours).

Persistence contract (Raft §5.1 "Persistent state on all servers: updated on
stable storage before responding to RPCs"):

* currentTerm and votedFor are written durably (temp file, fsync, rename, fsync
  directory) inside `setCurrentTerm`, before pysyncobj can send the vote or any
  message of the new term, because pysyncobj sends only after the call returns.
* Log entries are appended to an in-memory list and a pending write buffer.
  `sync()` writes the buffer and fdatasyncs the file. The transport
  (kv/raft.py, PersistBarrierTransport) calls `sync()` before it lets any
  acknowledgement (or other non-AppendEntries message) leave the node, so a
  follower acknowledges only entries on its disk. The Raft thread also calls
  `sync()` at the start of every tick, before the leader computes the commit
  index (where it counts itself toward the majority) and before any node
  applies entries: the leader counts only entries durable on its own disk, and
  nothing is applied that is not durable locally (`synced_index` lets the apply
  step check this).
* A truncation (a real term conflict) zeroes the cut records, then the same sync.

The file is preallocated with zeros in PREALLOC_BYTES chunks, and records
overwrite the zeros. An fdatasync that changes no file size (no metadata) is a
plain data flush: on ext4 it does not force a journal commit, which would also
flush every other file's pending data (the LevelDB state) and made each sync
take 0.6-0.7 ms instead of ~0.1 ms in the benchmark. A header of zeros is the
clean end of the journal.

Record format (little endian): u32 payload length, u32 crc32 of the payload,
payload = u64 index, u64 term, command bytes. On open, a record that is short
or fails its checksum ends the journal: it is the torn tail of a write that was
never synced (anything synced was written whole before the fsync returned),
and the file is cut there.

Conflict-only truncation is enforced in `add()`: pysyncobj's follower path
calls deleteEntriesFrom(prevLogIdx + 1) and then add() for every entry of an
AppendEntries, even when they duplicate entries the follower has. Here
deleteEntriesFrom() does nothing; add() of an
entry whose index and term match the one already stored keeps it (Raft §5.3:
"If an existing entry conflicts with a new one (same index but different
terms), delete the existing entry and all that follow it" — and only then),
and the first entry that conflicts cuts the log there. kv/raft.py also rewrites
such messages so that pysyncobj never takes that path for duplicates at all;
this is the second line of defence.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

from kv import durable

log = logging.getLogger("floe.journal")

MAGIC = b"FLOEJRNL\x00\x00\x00\x01"
# Preallocation chunk: one metadata-changing fsync per 4 MiB of log (about
# 20,000 small entries); the rest are data-only syncs.
PREALLOC_BYTES = 4 * 1024 * 1024
_ZEROS = bytes(1024 * 1024)
_HDR = struct.Struct("<II")
_ENTRY = struct.Struct("<QQ")

Entry = tuple[bytes, int, int]  # (command, index, term), pysyncobj's shape


class JournalInvariantError(RuntimeError):
    """The journal was asked to do something Raft forbids (a bug, not bad input)."""


def _encode(entry: Entry) -> bytes:
    command, idx, term = entry
    payload = _ENTRY.pack(idx, term) + bytes(command)
    return _HDR.pack(len(payload), zlib.crc32(payload)) + payload


class FloeJournal:
    """A pysyncobj Journal (duck-typed: pysyncobj has no abstract interface to
    register with) whose appends become durable at `sync()`."""

    def __init__(self, directory: str, *, protected_index: Callable[[], int] = lambda: 0) -> None:
        os.makedirs(directory, exist_ok=True)
        self._dir = directory
        self._path = os.path.join(directory, "journal")
        self._meta_path = os.path.join(directory, "term_vote")
        # Entries at or below this index were applied to the state machine;
        # removing one would mean a committed entry is lost (a bug).
        self._protected_index = protected_index
        self._entries: list[Entry] = []
        self._offsets: list[int] = []  # file offset of each entry's record
        self._pending = bytearray()  # encoded records not yet written
        self._end = 0  # end of the records once pending is written
        self._allocated = 0  # file size (zeros past _end)
        self._dirty_from: int | None = None
        self._dirty_to = 0
        # Every entry at or below this index is durable (fsynced) here.
        self.synced_index = 0
        self._term = 0
        self._voted_for: Any = None
        self.syncs = 0  # fsyncs of the journal file, for metrics and tests
        self._load_meta()
        self._fd = self._open()

    # ---------------------------------------------------------------- loading

    def _load_meta(self) -> None:
        try:
            with open(self._meta_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        if len(raw) < 12 or zlib.crc32(raw[4:]) != struct.unpack("<I", raw[:4])[0]:
            raise JournalInvariantError(f"{self._meta_path}: corrupt term/vote file (it is only ever replaced whole)")
        self._term = struct.unpack("<Q", raw[4:12])[0]
        voted = raw[12:]
        self._voted_for = voted.decode() if voted else None

    def _open(self) -> int:
        new = not os.path.exists(self._path)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        if new:
            os.write(fd, MAGIC)
            _zero_fill(fd, len(MAGIC), PREALLOC_BYTES)
            durable.sync_file(self._path, fd)
            durable.sync_dir(self._dir)
        with open(self._path, "rb") as f:
            data = f.read()
        if data[: len(MAGIC)] != MAGIC:
            os.close(fd)
            raise JournalInvariantError(f"{self._path}: not a floe journal")
        pos = len(MAGIC)
        while pos + _HDR.size <= len(data):
            length, crc = _HDR.unpack_from(data, pos)
            payload = data[pos + _HDR.size : pos + _HDR.size + length]
            if length < _ENTRY.size or len(payload) != length or zlib.crc32(payload) != crc:
                break
            idx, term = _ENTRY.unpack_from(payload)
            if self._entries and idx != self._entries[-1][1] + 1:
                break
            self._entries.append((payload[_ENTRY.size :], idx, term))
            self._offsets.append(pos)
            pos += _HDR.size + length
        tail = data[pos:].rstrip(b"\0")
        if tail:
            # The torn tail of a write that was never synced (or records cut
            # by a truncation whose zeroing was not synced): zero it so it can
            # never be read back as records.
            log.warning("event=journal_torn_tail path=%s kept_bytes=%d dropped_bytes=%d entries=%d",
                        self._path, pos, len(tail), len(self._entries))
            _zero_fill(fd, pos, pos + len(tail))
            durable.sync_file(self._path, fd, pos, pos + len(tail))
        self._end = pos
        self._allocated = len(data)
        self.synced_index = self._entries[-1][1] if self._entries else 0
        return fd

    # ---------------------------------------------------------------- pysyncobj Journal interface

    def add(self, command: bytes, idx: int, term: int) -> None:
        if self._entries and idx <= self._entries[-1][1]:
            first = self._entries[0][1]
            pos = idx - first
            if pos < 0:
                return  # below our log (compacted): already applied, nothing to do
            existing = self._entries[pos]
            if existing[2] == term:
                # Same index and term: by the Log Matching Property it is the same entry.
                if bytes(existing[0]) != bytes(command):
                    raise JournalInvariantError(f"entry {idx} term {term}: same term, different command")
                return
            self._cut(pos)  # a real conflict: delete this entry and all that follow
        if self._entries and idx != self._entries[-1][1] + 1:
            raise JournalInvariantError(f"append of index {idx} after {self._entries[-1][1]}")
        self._append((command, idx, term))

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 (pysyncobj's name)
        # Nothing to do here: add() truncates only at the first entry whose term
        # conflicts, which is all Raft allows (§5.3).
        pass

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802
        """Drop entries before position entryTo (log compaction, after a durable snapshot)."""
        self._rewrite(self._entries[entryTo:])

    def clear(self) -> None:
        """Drop every entry (a snapshot replaced the state); pysyncobj adds the
        snapshot's two boundary entries right after."""
        self._rewrite([])

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        self.sync()
        os.close(self._fd)

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802
        # The commit index is volatile state in Raft (§5, Figure 2); a restarted
        # node learns it from the leader. Not persisting it is always safe.
        pass

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return 1

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:  # noqa: N802
        if term < self._term:
            raise JournalInvariantError(f"term going back from {self._term} to {term}")
        if term == self._term and self._voted_for is not None and votedForNodeId != self._voted_for:
            raise JournalInvariantError(f"second vote in term {term}: {self._voted_for} then {votedForNodeId}")
        voted = b"" if votedForNodeId is None else str(votedForNodeId).encode()
        body = struct.pack("<Q", term) + voted
        durable.write_file(self._meta_path, struct.pack("<I", zlib.crc32(body)) + body)
        self._term, self._voted_for = term, votedForNodeId

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self._term

    def getVotedForNodeId(self) -> Any:  # noqa: N802
        return self._voted_for

    def onOneSecondTimer(self) -> None:  # noqa: N802
        pass

    # ---------------------------------------------------------------- durability

    @property
    def dirty(self) -> bool:
        return self._dirty_from is not None

    def sync(self) -> bool:
        """Make every appended entry and truncation durable. Returns True if it fsynced."""
        if self._dirty_from is None:
            return False
        self._write_pending()
        durable.sync_file(self._path, self._fd, self._dirty_from, self._dirty_to)
        self._dirty_from = None
        self._dirty_to = 0
        self.synced_index = self._entries[-1][1] if self._entries else 0
        self.syncs += 1
        return True

    def _mark(self, start: int, end: int) -> None:
        self._dirty_from = start if self._dirty_from is None else min(self._dirty_from, start)
        self._dirty_to = max(self._dirty_to, end)

    def _write_pending(self) -> None:
        if not self._pending:
            return
        if self._end > self._allocated:
            # Grow by whole chunks of zeros; this one sync changes metadata.
            new_size = (self._end // PREALLOC_BYTES + 1) * PREALLOC_BYTES
            _zero_fill(self._fd, self._allocated, new_size)
            self._mark(self._allocated, new_size)
            self._allocated = new_size
        os.pwrite(self._fd, self._pending, self._end - len(self._pending))
        self._pending.clear()

    def _append(self, entry: Entry) -> None:
        rec = _encode(entry)
        self._entries.append(entry)
        self._offsets.append(self._end)
        self._mark(self._end, self._end + len(rec))
        self._pending += rec
        self._end += len(rec)

    def _cut(self, pos: int) -> None:
        idx = self._entries[pos][1]
        if idx <= self._protected_index():
            raise JournalInvariantError(
                f"refusing to delete entry {idx}: entries up to {self._protected_index()} are applied (committed)")
        log.warning("event=journal_conflict_truncate from_index=%d dropped=%d", idx, len(self._entries) - pos)
        # Write out what is pending first so offsets and the file agree, then
        # zero the cut records.
        self._write_pending()
        offset = self._offsets[pos]
        _zero_fill(self._fd, offset, self._end)
        self._mark(offset, self._end)
        del self._entries[pos:]
        del self._offsets[pos:]
        self._end = offset
        self.synced_index = min(self.synced_index, idx - 1)

    def _rewrite(self, entries: list[Entry]) -> None:
        """Replace the journal with `entries`, durably (new file, fsync, rename, fsync dir)."""
        tmp = self._path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        offsets = []
        buf = bytearray(MAGIC)
        for e in entries:
            offsets.append(len(buf))
            buf += _encode(e)
        allocated = (len(buf) // PREALLOC_BYTES + 1) * PREALLOC_BYTES
        try:
            os.write(fd, buf)
            _zero_fill(fd, len(buf), allocated)
            durable.sync_file(tmp, fd)
        finally:
            os.close(fd)
        os.close(self._fd)
        durable.replace(tmp, self._path)
        self._fd = os.open(self._path, os.O_RDWR)
        self._entries = list(entries)
        self._offsets = offsets
        self._pending.clear()
        self._end = len(buf)
        self._allocated = allocated
        self._dirty_from = None
        self._dirty_to = 0
        self.synced_index = entries[-1][1] if entries else 0


def _zero_fill(fd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = min(len(_ZEROS), end - pos)
        os.pwrite(fd, _ZEROS[:n], pos)
        pos += n
