"""A real guest on a floe volume: QEMU boots Linux with the volume as its virtio disk
(DESIGN.md §2, §7, §11).

The guest (tests/guest/: a Debian kernel and a busybox initramfs built at test time)
runs in one of two modes, chosen on its kernel command line. A write boot makes an
ext4 filesystem on /dev/vda, writes files of random bytes (each fsynced: a journal
commit and a SYNCHRONIZE CACHE through QEMU's iSCSI driver), prints each file's
SHA-256, syncs, unmounts and powers off. A check boot runs `e2fsck -fn`, mounts the
filesystem read-only and prints every file's SHA-256. The test holds the check boot
against the write boot: e2fsck exits 0 and every file reads back with the hash the
write boot printed. Everything the write boot printed was synced before it powered
off, so by the durability contract (§2 points 2 and 3) all of it must be there, also
when the Raft leader was SIGKILLed while the guest wrote.

QEMU runs under TCG (no KVM), so each boot takes seconds; every wait is bounded, and
the test prints its timings: boot, write phase, the longest gap between two files
written (the stall the guest saw while Raft elected a new leader).

CI installs qemu-system-x86, busybox-static, linux-image-cloud-amd64 (with
tiny-initramfs, so the kernel install pulls in no initramfs-tools), qemu-block-extra
and e2fsprogs (.ci/run); locally a test skips, naming the package that is missing.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster import launcher
from tests import clusterutil as cu
from tests.guest import build as guest_build

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent

# Our own ports (not clusterutil's 7120/7220 nor the benchmark's 7160/7260), so this
# module can run beside other cluster tests. iSCSI portals are 127.0.0.N:3330.
RAFT_PORT = 7170
API_PORT = 7270

VOLUME_SIZE = "64M"
# Under TCG on two busy cores a boot to /init takes 3-10 s; a write boot of 48 files
# through floe under 30 s. The bounds leave room for a loaded CI machine and an election.
BOOT_S_MAX = 120.0
WRITE_BOOT_S_MAX = 300.0
CHECK_BOOT_S_MAX = 180.0
QEMU_EXIT_S_MAX = 30.0

MARK = "FLOE-GUEST "

# The leader-kill boots write KILL_FILES files of up to 256 KiB, each fsynced (10-25 s of
# writes here), and the kill comes after KILL_AFTER_FILES of them: well inside the stream.
KILL_FILES = 48
KILL_AFTER_FILES = 6
# Then a random wait of up to this long (one file takes 100-300 ms), so over many runs the
# kill lands in every phase of a file: dd's writes, the fsync's flush, hashing. Seeded:
# FLOE_GUEST_SEED=N replays a run, and every run prints its seed.
KILL_JITTER_S_MAX = 0.3


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> guest_build.Guest:
    """The kernel and initramfs, built once per test session into a temporary directory."""
    try:
        return guest_build.build(tmp_path_factory.mktemp("guest"))
    except guest_build.GuestUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, guest: guest_build.Guest):
    d = tmp_path_factory.mktemp("guest-cluster") / "cluster"
    launcher.ensure_layout(d, 3, RAFT_PORT, API_PORT)
    launcher.up(d, 3, RAFT_PORT, API_PORT, wait_s=30)
    yield d
    launcher.down(d, stop_wait_s=10)


def floe(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"floe {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def create(d: Path, name: str) -> str:
    floe("volume", "create", name, "--size", VOLUME_SIZE, "--data-dir", str(d))
    return str(json.loads(floe("volume", "attach-info", name, "--json", "--data-dir", str(d)))["target"])


def owner_of(d: Path, name: str) -> str | None:
    info = json.loads(floe("volume", "show", name, "--json", "--data-dir", str(d)))
    return info["owner"]["node"] if info["owner"] else None


def portal_of(d: Path, node_id: str) -> str:
    layout = launcher.load_layout(d)
    return layout.node_config(layout.node(node_id)).iscsi_address


@dataclass(frozen=True, slots=True)
class Line:
    at_s: float  # host monotonic clock when the line arrived
    text: str


class GuestBoot:
    """One boot of the guest under QEMU, its console read line by line on a thread and
    each line stamped with the host's clock; written to log_path as it comes."""

    def __init__(self, guest: guest_build.Guest, disk_url: str, mode: str, log_path: Path, files: int = 0,
                 kib: int = 0) -> None:
        append = f"console=ttyS0 panic=-1 quiet floe.mode={mode} floe.files={files} floe.kib={kib}"
        self.args = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "256M", "-smp", "1",
                     "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
                     "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", append,
                     "-drive", f"file={disk_url},format=raw,if=virtio,cache=writeback"]
        self.mode = mode
        self.log_path = log_path
        self.lines: list[Line] = []
        self._cond = threading.Condition()
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, name=f"qemu-{mode}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w") as log:
            for raw in self.proc.stdout:
                text = raw.decode(errors="replace").rstrip("\r\n")
                log.write(text + "\n")
                log.flush()
                with self._cond:
                    self.lines.append(Line(time.monotonic(), text))
                    self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float, count: int = 1) -> Line:
        """The count-th console line matching pattern (a regex), waiting up to timeout_s."""
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        with self._cond:
            while True:
                hits = [ln for ln in self.lines if rx.search(ln.text)]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{self.mode} boot: no {pattern!r} (x{count}) within {timeout_s:g} s; "
                                         f"qemu rc={self.proc.poll()}\n{self.tail()}")
                self._cond.wait(min(left, 1.0))

    def finish(self, timeout_s: float) -> str:
        """Wait for the RESULT line and for QEMU to exit; returns what follows RESULT."""
        line = self.wait_for(MARK + "RESULT ", timeout_s)
        try:
            self.proc.wait(QEMU_EXIT_S_MAX)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{self.mode} boot: qemu did not exit after RESULT\n{self.tail()}") from e
        self._reader.join(5)
        return line.text.split("RESULT ", 1)[1].strip()

    def marks(self, word: str) -> list[Line]:
        with self._cond:
            return [ln for ln in self.lines if ln.text.startswith(MARK + word)]

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(ln.text for ln in self.lines[-n:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)


def hashes(boot: GuestBoot, word: str) -> dict[str, str]:
    """{file name: sha256} from the 'wrote NAME HASH' or 'file NAME HASH' lines."""
    out: dict[str, str] = {}
    for ln in boot.marks(word + " "):
        _, _, name, digest = ln.text.split()[:4]
        out[name] = digest
    return out


@dataclass(frozen=True, slots=True)
class WriteRun:
    """One write boot, timed on the host's clock from the console lines."""

    boot_s: float  # QEMU started -> /init's first line
    write_s: float  # "writing files" -> "synced"
    total_s: float  # QEMU started -> QEMU exited
    gap_s_max: float  # the longest wait between two files finished (or the last one and "synced")
    written: dict[str, str]  # file name -> sha256, as the guest printed them


def write_boot(guest: guest_build.Guest, disk_url: str, log_path: Path, files: int, kib: int,
               during_writes: Callable[[GuestBoot], None] | None = None) -> WriteRun:
    """Boot in write mode; call during_writes(boot) once the guest writes files; return timings."""
    boot = GuestBoot(guest, disk_url, "write", log_path, files, kib)
    try:
        booted = boot.wait_for(MARK + "boot ", BOOT_S_MAX)
        start = boot.wait_for(MARK + "writing files", WRITE_BOOT_S_MAX)
        if during_writes is not None:
            during_writes(boot)
        result = boot.finish(WRITE_BOOT_S_MAX)
        assert result == "ok", f"write boot: {result}\n{boot.tail()}"
        synced = boot.wait_for(MARK + "synced", 1)
        wrote = [start, *boot.marks("wrote "), synced]
        gaps = [b.at_s - a.at_s for a, b in zip(wrote, wrote[1:], strict=False)]
        written = hashes(boot, "wrote")
        assert len(written) == files, f"write boot wrote {len(written)} of {files} files\n{boot.tail()}"
        return WriteRun(booted.at_s - boot.started_s, synced.at_s - start.at_s, time.monotonic() - boot.started_s,
                        max(gaps), written)
    finally:
        boot.close()


def check_boot(guest: guest_build.Guest, disk_url: str, log_path: Path, written: dict[str, str]) -> float:
    """Boot in check mode: e2fsck clean, every written file present with its hash. Returns seconds taken."""
    boot = GuestBoot(guest, disk_url, "check", log_path)
    try:
        result = boot.finish(CHECK_BOOT_S_MAX)
        fsck = boot.wait_for(MARK + "e2fsck rc=", 1).text
        assert fsck.endswith("rc=0"), f"e2fsck not clean: {fsck}\n{boot.tail(80)}"
        found = hashes(boot, "file")
        missing = sorted(set(written) - set(found))
        wrong = sorted(n for n in written if n in found and found[n] != written[n])
        assert not missing and not wrong, f"missing {missing}, changed {wrong}\n{boot.tail(80)}"
        assert result == "ok", f"check boot: {result}\n{boot.tail(80)}"
        return time.monotonic() - boot.started_s
    finally:
        boot.close()


def url(portal: str, target: str) -> str:
    return f"iscsi://{portal}/{target}/0"


@pytest.mark.timeout(600)
def test_an_ext4_guest_on_a_floe_volume_finds_its_synced_files_after_a_reboot(cluster, guest, tmp_path, capsys):
    """Write boot, then check boot: e2fsck clean, every file intact."""
    target = create(cluster, "guest")
    u = url(portal_of(cluster, "n1"), target)
    t0 = time.monotonic()
    w = write_boot(guest, u, tmp_path / "write.log", files=12, kib=256)
    check_s = check_boot(guest, u, tmp_path / "check.log", w.written)
    with capsys.disabled():
        print(f"\nguest on floe ({guest.kernel_version}, initrd {guest.initrd_bytes >> 10} KiB): "
              f"write boot {w.total_s:.1f} s (to /init {w.boot_s:.1f} s, 12 files fsynced {w.write_s:.1f} s, "
              f"longest gap {w.gap_s_max:.1f} s), check boot {check_s:.1f} s, total {time.monotonic() - t0:.1f} s")


@dataclass(slots=True)
class KillRun:
    """What happened around one SIGKILL: who held which role, when, and the guest's stall."""

    leader: str = ""
    owner: str | None = None
    seed: int = 0
    wrote_before: int = 0
    killed_at_s: float = 0.0
    restarted_at_s: float = 0.0
    stall_s: float = 0.0  # from the kill to the next file the guest finished


def kill_leader_mid_write(cluster: Path, guest: guest_build.Guest, tmp_path: Path, name: str, files: int,
                          owner_is_leader: bool, restart_after_s: float | None
                          ) -> tuple[KillRun, WriteRun, float, str]:
    """Write boot with the Raft leader SIGKILLed after the guest has written KILL_AFTER_FILES
    files, then a check boot through a live node. Returns the kill, the write boot, the check
    boot's seconds and who led and owned afterwards."""
    leader = cu.leader_id(cluster, wait_s=30)
    nodes = [n.id for n in launcher.load_layout(cluster).nodes]
    # The node a fresh volume is first logged in through becomes its owner (cluster/targets.py).
    via = leader if owner_is_leader else next(n for n in nodes if n != leader)
    target = create(cluster, name)
    k = KillRun(seed=int(os.environ.get("FLOE_GUEST_SEED") or random.randrange(1 << 32)))
    print(f"kill scenario {name}: seed {k.seed} (FLOE_GUEST_SEED={k.seed} replays it)")
    jitter_s = random.Random(k.seed).uniform(0, KILL_JITTER_S_MAX)

    def kill_leader(boot: GuestBoot) -> None:
        k.owner = owner_of(cluster, name)
        k.leader = cu.leader_id(cluster, wait_s=10)
        if (k.owner == k.leader) != owner_is_leader:
            raise AssertionError(f"leadership moved before the kill: leader {k.leader}, owner {k.owner}")
        boot.wait_for(MARK + "wrote ", WRITE_BOOT_S_MAX, count=KILL_AFTER_FILES)
        time.sleep(jitter_s)
        k.wrote_before = len(boot.marks("wrote "))
        k.killed_at_s = time.monotonic()
        launcher.kill(cluster, k.leader)
        if restart_after_s is not None:
            time.sleep(restart_after_s)
            launcher.start(cluster, k.leader)
            k.restarted_at_s = time.monotonic()
        next_line = boot.wait_for(MARK + "(wrote |synced)", WRITE_BOOT_S_MAX, count=k.wrote_before + 1)
        k.stall_s = next_line.at_s - k.killed_at_s

    try:
        w = write_boot(guest, url(portal_of(cluster, via), target), tmp_path / "write.log", files=files, kib=256,
                       during_writes=kill_leader)
        alive = next(n for n in nodes if n != k.leader)
        check_s = check_boot(guest, url(portal_of(cluster, alive), target), tmp_path / "check.log", w.written)
        after = f"then leader {cu.leader_id(cluster, wait_s=10)}, owner {owner_of(cluster, name)}"
    finally:
        if k.killed_at_s and not k.restarted_at_s:
            launcher.start(cluster, k.leader)
    return k, w, check_s, after


@pytest.mark.timeout(600)
def test_an_ext4_guest_keeps_every_synced_file_when_the_raft_leader_is_killed_mid_write(
        cluster, guest, tmp_path, capsys):
    """SIGKILL the Raft leader (the volume's owner is a follower) while the guest writes:
    writes go on into the owner's buffer, flushes resume after the election, the write
    boot completes, and a check boot with the killed node still down (DESIGN.md §2 point 3:
    one node down) finds the filesystem clean and every file intact."""
    t0 = time.monotonic()
    k, w, check_s, after = kill_leader_mid_write(cluster, guest, tmp_path, "guestkill", KILL_FILES,
                                                 owner_is_leader=False, restart_after_s=None)
    with capsys.disabled():
        print(f"\nRaft leader killed under a guest (seed {k.seed}): leader {k.leader}, owner {k.owner} "
              f"at the kill (after {k.wrote_before} of {KILL_FILES} files), {after}; guest stalled "
              f"{k.stall_s:.1f} s from the kill to its next file. Write boot {w.total_s:.1f} s (to /init "
              f"{w.boot_s:.1f} s, writes {w.write_s:.1f} s, longest gap between files {w.gap_s_max:.1f} s); "
              f"check boot with the killed node down {check_s:.1f} s; total {time.monotonic() - t0:.1f} s")
