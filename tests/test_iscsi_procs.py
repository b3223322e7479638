"""Real initiators against a real three-node floe cluster (DESIGN.md §7, §11).

libiscsi's conformance suite (iscsi-test-cu), QEMU's block layer (qemu-img,
qemu-io with iscsi:// URLs), CHAP and ACLs through libiscsi URLs, logins
redirected by non-owner nodes, and a Raft leader SIGKILLed while QEMU writes.
One cluster serves every test of this module (starting one takes seconds).

CI installs libiscsi-bin, qemu-utils and qemu-block-extra (.ci/run); locally a
test skips, saying which tool is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import launcher
from iscsi.testing import MiniInitiator, parse_text
from tests import clusterutil as cu

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install libiscsi-bin qemu-utils qemu-block-extra)")


def floe(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"floe {' '.join(args)} failed: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("iscsi") / "cluster"
    cu.configure(d)
    cu.up(d)
    yield d
    launcher.down(d, stop_wait_s=10)


def portals(d: Path) -> list[str]:
    layout = launcher.load_layout(d)
    return [layout.node_config(n).iscsi_address for n in layout.nodes]


def create(d: Path, name: str, size: str) -> str:
    floe("volume", "create", name, "--size", size, "--data-dir", str(d))
    info = json.loads(floe("volume", "attach-info", name, "--json", "--data-dir", str(d)).stdout)
    return str(info["target"])


def url(portal: str, target: str, auth: str = "") -> str:
    return f"iscsi://{auth}{portal}/{target}/0"


def owner_of(d: Path, name: str) -> str | None:
    info = json.loads(floe("volume", "show", name, "--json", "--data-dir", str(d)).stdout)
    return info["owner"]["node"] if info["owner"] else None


def test_attach_info_prints_url_and_every_portal(cluster):
    target = create(cluster, "info", "64M")
    info = json.loads(floe("volume", "attach-info", "info", "--json", "--data-dir", str(cluster)).stdout)
    assert info["url"] == f"iscsi://{info['portals'][0]}/{target}/0"
    assert sorted(info["portals"]) == sorted(portals(cluster))
    assert target == "iqn.2026-11.io.floe:default.info"
    text = floe("volume", "attach-info", "info", "--data-dir", str(cluster)).stdout
    assert "qemu-system-x86_64" in text and "iscsiadm -m discovery" in text


def test_libiscsi_conformance_suite_passes_on_a_floe_volume(cluster, capsys):
    """iscsi-test-cu -d -t ALL, two initiators, and a second portal (another node) for the
    multipath tests: 0 failures. Skips are optional features floe does not offer (README)."""
    need("iscsi-test-cu")
    target = create(cluster, "cu", "128M")
    ps = portals(cluster)
    proc = subprocess.run(["iscsi-test-cu", "-d", "-t", "ALL", url(ps[0], target), url(ps[2], target)],
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    m = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert m, out[-3000:]
    total, ran, passed, failed, _inactive = map(int, m.groups())
    skipped = sorted(set(re.findall(r"\[SKIPPED\] ([^\n.]*)", out)))
    with capsys.disabled():
        print(f"\niscsi-test-cu ALL on a floe volume: {total} tests, {ran} ran, {passed} passed, {failed} failed; "
              f"skipped features: {'; '.join(skipped)}")
    failures = re.findall(r"Test: (\S+) \.\.\.[^\n]*\n(?:[^\n]*\n){0,3}?FAILED", out)
    assert failed == 0 and ran == total == passed, f"failed: {failures}\n{out[-4000:]}"


def test_qemu_img_convert_a_1gib_random_image_in_and_out_is_byte_identical(cluster, tmp_path):
    need("qemu-img")
    target = create(cluster, "img", "1G")
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(256):
            chunk = os.urandom(4 << 20)
            h.update(chunk)
            f.write(chunk)
    u = url(portals(cluster)[1], target)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), u], check=True, timeout=600,
                   capture_output=True)
    src.unlink()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", u, str(back)], check=True, timeout=600,
                   capture_output=True)
    got = hashlib.sha256()
    with open(back, "rb") as f:
        while chunk := f.read(4 << 20):
            got.update(chunk)
    assert back.stat().st_size == 1 << 30 and got.hexdigest() == h.hexdigest()


def qemu_io(u: str, *cmds: str, timeout: float = 300) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    proc = subprocess.run([*args, u], capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "Pattern verification failed" in out or "error" in out.lower():
        raise AssertionError(f"qemu-io {cmds}: rc={proc.returncode}\n{out}")
    return out


def qemu_io_when_reachable(u: str, *cmds: str, wait_s: float = 60) -> str:
    """qemu-io, retried while the target cannot be opened yet (a login refused with 0301h
    SERVICE UNAVAILABLE while the KV elects a leader, or a takeover in progress); a data
    mismatch is never retried."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return qemu_io(u, *cmds)
        except AssertionError as e:
            if "can't open device" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_qemu_io_patterns_flushes_and_qemu_img_bench(cluster):
    need("qemu-io", "qemu-img")
    target = create(cluster, "qio", "256M")
    u = url(portals(cluster)[0], target)
    qemu_io(u, "write -P 0x11 0 1M", "write -P 0x22 1M 64k", "aio_write -P 0x33 8M 4k", "aio_flush",
            "flush", "write -z 2M 1M", "writev -P 0x44 100M 4k 8k 512")
    # A new connection (a new session) sees exactly what was flushed.
    qemu_io(u, "read -P 0x11 0 1M", "read -P 0x22 1M 64k", "read -P 0x33 8M 4k", "read -P 0 2M 1M",
            "read -P 0x44 100M 12800")
    for args in (["-w", "-c", "2000", "-d", "32", "-s", "4096", "-S", "1052672", "--flush-interval=64"],
                 ["-w", "-c", "64", "-d", "8", "-s", "1M", "--flush-interval=16"],
                 ["-c", "4000", "-d", "32", "-s", "4096"]):
        proc = subprocess.run(["qemu-img", "bench", "-f", "raw", *args, u], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "Run completed" in proc.stdout, proc.stdout + proc.stderr


def test_a_login_through_a_non_owner_portal_is_redirected_to_the_owner(cluster):
    need("iscsi-inq")
    target = create(cluster, "redir", "64M")
    ps = portals(cluster)
    subprocess.run(["iscsi-inq", url(ps[0], target)], check=True, capture_output=True, timeout=60)
    owner = owner_of(cluster, "redir")
    layout = launcher.load_layout(cluster)
    owner_portal = layout.node_config(layout.node(owner)).iscsi_address
    for p in ps:
        if p == owner_portal:
            continue
        host, port = p.rsplit(":", 1)
        m = MiniInitiator(host, int(port))
        try:
            rsp = m.login(target)
        finally:
            m.close()
        assert (rsp.status_class, rsp.status_detail) == (1, 1)
        assert parse_text(rsp.data)["TargetAddress"] == f"{owner_portal},1"
        # libiscsi follows the redirect: attaching through this portal just works.
        out = subprocess.run(["iscsi-inq", url(p, target)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "DIRECT_ACCESS" in out.stdout, out.stderr
    assert owner_of(cluster, "redir") == owner  # nobody took the volume over


def test_chap_one_way_and_mutual_and_acls_through_libiscsi_urls(cluster):
    need("iscsi-inq")
    target = create(cluster, "sec", "64M")
    p = portals(cluster)[0]
    d = str(cluster)

    def inq(u: str, initiator: str | None = None) -> subprocess.CompletedProcess[str]:
        args = ["iscsi-inq", *(["-i", initiator] if initiator else []), u]
        return subprocess.run(args, capture_output=True, text=True, timeout=60)

    assert inq(url(p, target)).returncode == 0
    floe("volume", "acl", "sec", "--chap", "alice:alice-secret-1", "--data-dir", d)
    assert inq(url(p, target, "alice%alice-secret-1@")).returncode == 0
    bad = inq(url(p, target, "alice%wrong-secret-1@"))
    assert bad.returncode != 0 and "Authentication failure" in bad.stdout + bad.stderr
    assert inq(url(p, target)).returncode != 0  # no credentials at all
    floe("volume", "acl", "sec", "--mutual-chap", "floe:target-secret-2", "--data-dir", d)
    mutual = url(p, target, "alice%alice-secret-1@") + "?target_user=floe&target_password=target-secret-2"
    assert inq(mutual).returncode == 0
    wrong_target = url(p, target, "alice%alice-secret-1@") + "?target_user=floe&target_password=not-the-secret"
    assert inq(wrong_target).returncode != 0  # the initiator refuses a target that cannot prove itself
    floe("volume", "acl", "sec", "--no-chap", "--allow", "iqn.2026-11.test:allowed", "--data-dir", d)
    assert inq(url(p, target), "iqn.2026-11.test:allowed").returncode == 0
    refused = inq(url(p, target), "iqn.2026-11.test:someone-else")
    assert refused.returncode != 0 and "Authorization failure" in refused.stdout + refused.stderr
    shown = json.loads(floe("volume", "acl", "sec", "--json", "--data-dir", d).stdout)
    assert shown == {"initiators": ["iqn.2026-11.test:allowed"]}
    bad_cli = floe("volume", "acl", "sec", "--chap", "bob:short", "--data-dir", d, check=False)
    assert bad_cli.returncode != 0 and "12-255 bytes" in bad_cli.stderr


def test_flushed_writes_survive_a_raft_leader_sigkill_during_qemu_io(cluster):
    """Writes and flushes through QEMU's iSCSI driver while the Raft leader is SIGKILLed:
    every flushed pattern reads back (DESIGN.md §2 points 2 and 3)."""
    need("qemu-io")
    target = create(cluster, "kill", "128M")
    ps = portals(cluster)
    layout = launcher.load_layout(cluster)
    leader = cu.leader_id(cluster)
    # The first login opens the volume on that node: make the owner a follower, so the kill
    # takes the Raft leader only (QEMU reconnects to the portal it logged in to).
    via = next(p for n, p in zip(layout.nodes, ps, strict=True) if n.id != leader)
    ps = [via, *[p for p in ps if p != via]]
    qemu_io(url(ps[0], target), "write -P 0x5a 0 4M", "flush")
    owner = owner_of(cluster, "kill")
    assert owner != leader
    # Write through QEMU while the leader dies; the flush at the end must succeed
    # (after the election) and cover everything.
    proc = subprocess.Popen(["qemu-io", "-f", "raw", *sum((["-c", f"write -P {0x60 + i} {4 + i}M 1M"]
                                                           for i in range(16)), []), "-c", "flush",
                             url(ps[0], target)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.3)
    launcher.kill(cluster, leader)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "error" not in out.lower(), out
    try:
        if owner != leader:
            # The volume's owner survived: read through it.
            checks = ["read -P 0x5a 0 4M"] + [f"read -P {0x60 + i} {4 + i}M 1M" for i in range(16)]
            alive = [p for n, p in zip(layout.nodes, portals(cluster), strict=True) if n.id != leader]
            qemu_io_when_reachable(url(alive[0], target), *checks)
    finally:
        launcher.start(cluster, leader)
        cu.leader_id(cluster, wait_s=30)
    checks = ["read -P 0x5a 0 4M"] + [f"read -P {0x60 + i} {4 + i}M 1M" for i in range(16)]
    qemu_io_when_reachable(url(ps[0], target), *checks)


def test_a_volume_whose_owner_dies_is_taken_over_and_keeps_its_flushed_data(cluster):
    """SIGKILL the volume's owner: the next login (through any portal) is served by a new owner
    after the lease runs out, with everything that was flushed."""
    need("qemu-io")
    target = create(cluster, "own", "64M")
    ps = portals(cluster)
    qemu_io(url(ps[1], target), "write -P 0x77 0 2M", "flush", "write -P 0x78 2M 1M")  # the second: unflushed
    owner = owner_of(cluster, "own")
    layout = launcher.load_layout(cluster)
    launcher.kill(cluster, owner)
    try:
        alive = [p for n, p in zip(layout.nodes, ps, strict=True) if n.id != owner]
        t0 = time.monotonic()
        deadline = t0 + 60
        while True:
            try:
                qemu_io(url(alive[0], target), "read -P 0x77 0 2M", timeout=60)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert owner_of(cluster, "own") not in (None, owner)
    finally:
        launcher.start(cluster, owner)
        cu.leader_id(cluster, wait_s=30)


def test_discovery_lists_every_portal(cluster):
    need("iscsi-ls")
    create(cluster, "disc", "64M")
    out = subprocess.run(["iscsi-ls", "-s", f"iscsi://{portals(cluster)[0]}"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "iqn.2026-11.io.floe:default.disc" in out.stdout
    for p in portals(cluster):
        assert p in out.stdout


def _pr_out(m: MiniInitiator, sa: int, key: int, sa_key: int, rtype: int = 0) -> int:
    """PERSISTENT RESERVE OUT (SPC-4 §6.17): 24-byte parameter list."""
    params = key.to_bytes(8, "big") + sa_key.to_bytes(8, "big") + bytes(8)
    cdb = bytes([0x5F, sa, rtype & 0x0F, 0, 0, 0, 0, 0, len(params), 0])
    status, _data, sense = m.command(cdb, data=params)
    assert status == 0, f"PR OUT sa={sa}: status {status} sense {sense.hex()}"
    return status


def _pr_in(m: MiniInitiator, sa: int) -> bytes:
    cdb = bytes([0x5E, sa, 0, 0, 0, 0, 0, 0x10, 0x00, 0])
    status, data, sense = m.command(cdb, read_len=4096)
    assert status == 0, f"PR IN sa={sa}: status {status} sense {sense.hex()}"
    return data


def _login_clearing_ua(portal: str, target: str, deadline_s: float = 60.0) -> MiniInitiator:
    """Log in (following no redirect: `portal` must serve the volume) and take the first
    command's unit attention; retried while the volume is being taken over."""
    host, port = portal.rsplit(":", 1)
    deadline = time.monotonic() + deadline_s
    while True:
        m = MiniInitiator(host, int(port), timeout_s=30)
        rsp = m.login(target)
        if rsp.status_class == 0:
            status, _d, sense = m.command(bytes(6))  # TEST UNIT READY
            if status == 2:
                assert sense[2] & 0x0F == 6 and sense[12] == 0x29, sense.hex()  # power on/reset UA
            return m
        m.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"login to {portal} kept failing: {rsp.status_class:#x}/{rsp.status_detail:#x}")
        time.sleep(0.5)


def test_persistent_reservations_survive_an_owner_failover(cluster):
    """PR state lives in the KV (DESIGN.md §7): after the owner is SIGKILLed and another node
    takes the volume over, the same I_T nexus still holds its registration and reservation,
    and every nexus first gets the reset UNIT ATTENTION (§2 point 6)."""
    target = create(cluster, "pr", "64M")
    layout = launcher.load_layout(cluster)
    ps = portals(cluster)
    m = _login_clearing_ua(ps[0], target)
    owner = owner_of(cluster, "pr")
    assert owner == layout.nodes[0].id
    _pr_out(m, 0, 0, 0x1234ABCD)  # REGISTER
    _pr_out(m, 1, 0x1234ABCD, 0, rtype=1)  # RESERVE, Write Exclusive
    m.close()
    launcher.kill(cluster, owner)
    try:
        m2 = _login_clearing_ua(ps[1], target)  # waits out the lease, takes over with epoch+1
        keys = _pr_in(m2, 0)
        assert int.from_bytes(keys[4:8], "big") == 8 and int.from_bytes(keys[8:16], "big") == 0x1234ABCD
        res = _pr_in(m2, 1)
        assert int.from_bytes(res[4:8], "big") == 16
        assert int.from_bytes(res[8:16], "big") == 0x1234ABCD and res[21] & 0x0F == 1
        m2.close()
        assert owner_of(cluster, "pr") == layout.nodes[1].id
    finally:
        launcher.start(cluster, owner)
        cu.leader_id(cluster, wait_s=30)
