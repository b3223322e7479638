"""The one place where floe's local files become durable, and its power-loss simulator.

Theory. A write is durable when the file's data is fsynced and, for a file that
was created or renamed, the directory holding its name is fsynced too. Every
durable file floe writes (the Raft journal, the term/vote file, snapshots) goes
through `sync_file`, `replace` and `sync_dir` here, so there is one barrier to
audit.

Power loss is what SIGKILL does not simulate: the page cache survives a killed
process, so a test that only kills processes never sees an unsynced write lost.
With FLOE_POWERLOSS_SIM=1 in the environment, each durable operation also keeps
a *shadow* of the file as of its last sync (`<name>.plsim`). `power_loss(dir)`
(called by a test on a stopped node's data directory) then puts back exactly
what a machine that lost power would find: every shadowed file rolled back to
its shadow, every file under the directory that was never synced removed, and
the LevelDB state directory dropped whole (it is written with sync=False and
rebuilt from the snapshot and the journal, so dropping it is the harshest
legal outcome). The shadow of an append-only file is updated incrementally from
the lowest offset changed since the last sync, so simulation costs little more
than the writes themselves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SIM_ENV = "FLOE_POWERLOSS_SIM"
SHADOW_SUFFIX = ".plsim"

# Directories (relative to a node's data dir) that hold state rebuilt on start:
# dropped whole on a simulated power loss.
VOLATILE_DIRS = ("state",)


def simulating() -> bool:
    return os.environ.get(SIM_ENV) == "1"


def sync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that names created, renamed or removed in it persist."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: str, fd: int, dirty_from: int = 0, dirty_to: int | None = None) -> None:
    """fdatasync an open file. [dirty_from, dirty_to) covers every byte written
    or truncated since the previous sync (default: the whole file): the
    simulator copies that range into the shadow."""
    os.fdatasync(fd)
    if simulating():
        _update_shadow(path, dirty_from, dirty_to)


def write_file(path: str, data: bytes) -> None:
    """Write a whole small file durably: temp file, fsync, rename, fsync dir."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        sync_file(tmp, fd)
    finally:
        os.close(fd)
    replace(tmp, path)


def replace(src: str, dst: str) -> None:
    """Atomically rename a synced file over `dst` and make the rename durable."""
    os.replace(src, dst)
    if simulating() and os.path.exists(src + SHADOW_SUFFIX):
        os.replace(src + SHADOW_SUFFIX, dst + SHADOW_SUFFIX)
    sync_dir(os.path.dirname(os.path.abspath(dst)))


def _update_shadow(path: str, dirty_from: int, dirty_to: int | None) -> None:
    shadow = path + SHADOW_SUFFIX
    size = os.path.getsize(path)
    if not os.path.exists(shadow):
        dirty_from, dirty_to = 0, None
    start = min(dirty_from, size)
    end = size if dirty_to is None else min(dirty_to, size)
    with open(path, "rb") as src, open(shadow, "r+b" if os.path.exists(shadow) else "w+b") as dst:
        src.seek(start)
        dst.seek(start)
        dst.write(src.read(max(0, end - start)))
        dst.truncate(size)


def power_loss(data_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Roll a stopped node's data directory back to what survives a power loss.

    Returns counts of what was done, so tests can show what they exercised.
    """
    root = Path(data_dir)
    rolled = removed = 0
    for name in VOLATILE_DIRS:
        if (root / name).exists():
            shutil.rmtree(root / name)
            removed += 1
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.endswith(SHADOW_SUFFIX) or p.suffix in (".log", ".pid", ".toml"):
            continue
        shadow = Path(str(p) + SHADOW_SUFFIX)
        if shadow.exists():
            if p.read_bytes() != shadow.read_bytes():
                rolled += 1
            shutil.copyfile(shadow, p)
        else:
            p.unlink()
            removed += 1
    return {"rolled_back": rolled, "removed": removed}
