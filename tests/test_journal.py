"""FloeJournal: durability, torn tails, simulated power loss, conflict-only truncation."""

from __future__ import annotations

import os

import pytest

from kv import durable
from kv.journal import MAGIC, FloeJournal, JournalInvariantError


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(durable.SIM_ENV, "1")


def entries(j: FloeJournal) -> list[tuple[bytes, int, int]]:
    return [(bytes(c), i, t) for c, i, t in (j[k] for k in range(len(j)))]


def test_append_sync_reopen(tmp_path):
    j = FloeJournal(str(tmp_path))
    for i in range(1, 6):
        j.add(b"cmd%d" % i, i, 1)
    assert j.dirty
    assert j.sync() is True
    assert j.sync() is False  # nothing new: no second fsync
    j._destroy()
    j2 = FloeJournal(str(tmp_path))
    assert entries(j2) == [(b"cmd%d" % i, i, 1) for i in range(1, 6)]


def test_torn_tail_is_cut_on_open(tmp_path):
    j = FloeJournal(str(tmp_path))
    j.add(b"a", 1, 1)
    j.add(b"b", 2, 1)
    j._destroy()
    path = tmp_path / "journal"
    end = j._end
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(b"\x30\x00\x00\x00garbage")  # a record header promising 48 bytes, then too few
    j2 = FloeJournal(str(tmp_path))
    assert entries(j2) == [(b"a", 1, 1), (b"b", 2, 1)]
    assert path.read_bytes()[end:].strip(b"\0") == b""  # the torn bytes were zeroed
    j2.add(b"c", 3, 1)
    j2.sync()
    j2._destroy()
    assert [e[1] for e in entries(FloeJournal(str(tmp_path)))] == [1, 2, 3]


def test_bit_flip_in_last_record_drops_it(tmp_path):
    j = FloeJournal(str(tmp_path))
    for i in range(1, 4):
        j.add(b"x" * 10, i, 1)
    j._destroy()
    path = tmp_path / "journal"
    data = bytearray(path.read_bytes())
    data[j._end - 1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert [e[1] for e in entries(FloeJournal(str(tmp_path)))] == [1, 2]


def test_power_loss_drops_exactly_the_unsynced_entries(tmp_path, sim):
    d = tmp_path / "raft"
    j = FloeJournal(str(d))
    for i in range(1, 11):
        j.add(b"e%d" % i, i, 1)
    j.sync()
    for i in range(11, 16):
        j.add(b"e%d" % i, i, 1)
    # Written to the page cache (as a SIGKILLed process would leave it) but never fsynced.
    os.pwrite(j._fd, bytes(j._pending), j._end - len(j._pending))
    report = durable.power_loss(tmp_path)
    assert report["rolled_back"] >= 1
    j2 = FloeJournal(str(d))
    assert [e[1] for e in entries(j2)] == list(range(1, 11))


def test_power_loss_keeps_term_and_vote(tmp_path, sim):
    d = tmp_path / "raft"
    j = FloeJournal(str(d))
    j.setCurrentTerm(7, "127.0.0.2:7100")
    durable.power_loss(tmp_path)
    j2 = FloeJournal(str(d))
    assert (j2.getCurrentTerm(), j2.getVotedForNodeId()) == (7, "127.0.0.2:7100")


def test_never_votes_twice_in_a_term(tmp_path):
    j = FloeJournal(str(tmp_path))
    j.setCurrentTerm(3, "a")
    with pytest.raises(JournalInvariantError):
        j.setCurrentTerm(3, "b")
    with pytest.raises(JournalInvariantError):
        j.setCurrentTerm(2, None)
    j.setCurrentTerm(4, None)
    j.setCurrentTerm(4, "b")


def test_duplicate_entries_are_kept_and_conflicts_truncate(tmp_path):
    j = FloeJournal(str(tmp_path))
    for i in range(1, 6):
        j.add(b"t1-%d" % i, i, 1)
    j.sync()
    # pysyncobj's follower path: deleteEntriesFrom then add the leader's entries.
    j.deleteEntriesFrom(1)
    j.add(b"t1-2", 2, 1)
    j.add(b"t1-3", 3, 1)
    assert [e[1] for e in entries(j)] == [1, 2, 3, 4, 5]  # duplicates removed nothing
    j.deleteEntriesFrom(3)
    j.add(b"t2-4", 4, 2)  # term conflict at 4: cut 4.. and append
    assert entries(j)[-2:] == [(b"t1-3", 3, 1), (b"t2-4", 4, 2)]
    j.sync()
    j._destroy()
    assert [(e[1], e[2]) for e in entries(FloeJournal(str(tmp_path)))] == [(1, 1), (2, 1), (3, 1), (4, 2)]


def test_refuses_to_truncate_applied_entries(tmp_path):
    j = FloeJournal(str(tmp_path), protected_index=lambda: 3)
    for i in range(1, 6):
        j.add(b"t1", i, 1)
    with pytest.raises(JournalInvariantError):
        j.add(b"t2", 3, 2)
    j.add(b"t2", 4, 2)  # above the applied index a conflict is legal


def test_compaction_rewrite_and_clear(tmp_path):
    j = FloeJournal(str(tmp_path))
    for i in range(1, 11):
        j.add(b"c", i, 1)
    j.sync()
    j.deleteEntriesTo(7)  # keep entries from position 7 (index 8)
    assert [e[1] for e in entries(j)] == [8, 9, 10]
    j.add(b"c", 11, 1)
    j.sync()
    j._destroy()
    j2 = FloeJournal(str(tmp_path))
    assert [e[1] for e in entries(j2)] == [8, 9, 10, 11]
    j2.clear()
    assert len(j2) == 0
    data = (tmp_path / "journal").read_bytes()
    assert data.startswith(MAGIC) and data[len(MAGIC):].strip(b"\0") == b""


def test_sync_without_growth_changes_no_file_size(tmp_path):
    """Records overwrite preallocated zeros, so a data-only fdatasync suffices."""
    j = FloeJournal(str(tmp_path))
    size = (tmp_path / "journal").stat().st_size
    for i in range(1, 200):
        j.add(b"x" * 100, i, 1)
        j.sync()
    assert (tmp_path / "journal").stat().st_size == size


def test_growth_past_the_preallocation_and_cut_across_it(tmp_path):
    from kv.journal import PREALLOC_BYTES

    j = FloeJournal(str(tmp_path))
    big = b"y" * 40_000
    n = PREALLOC_BYTES // len(big) + 5
    for i in range(1, n + 1):
        j.add(big, i, 1)
    j.sync()
    assert (tmp_path / "journal").stat().st_size > PREALLOC_BYTES
    j.add(b"other", n - 3, 2)  # a conflict: cut the last 4 entries, append one of term 2
    j.sync()
    j._destroy()
    got = entries(FloeJournal(str(tmp_path)))
    assert [e[1] for e in got] == list(range(1, n - 2))
    assert got[-1] == (b"other", n - 3, 2)
