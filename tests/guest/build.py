"""Build the test guest: a Debian kernel and a small initramfs whose /init is init.sh.

Everything comes from Debian packages installed on this machine (.ci/run installs
them): the kernel from linux-image-cloud-amd64 (/boot/vmlinuz-VER), the drivers it
has as modules (virtio_pci, virtio_blk and what they need, read from
/lib/modules/VER/modules.dep; ext4 is built into Debian's kernels, and a module that
is built in is skipped), busybox from busybox-static, and mke2fs and e2fsck from
e2fsprogs with the shared libraries `ldd` names and the dynamic loader. The archive
is written here (cpio "newc", gzip), so no cpio tool and no root rights are needed:
device nodes are entries in the archive, not files on the host.

Nothing is downloaded and nothing built is kept in the repository: the test builds
into a temporary directory once per session. `python -m tests.guest.build OUTDIR`
does the same by hand and prints the paths and the qemu line's -kernel/-initrd.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"

# The drivers /init needs before /dev/vda appears. Their dependencies come from
# modules.dep; ext4, jbd2, mbcache and crc32c are built into Debian's 6.1 kernels.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "ext4")

# The e2fsprogs tools /init runs, with their libraries.
DYNAMIC_TOOLS = ("mke2fs", "e2fsck")

# What to apt-get install when something is missing (the skip message names it).
PACKAGES = "qemu-system-x86 busybox-static linux-image-cloud-amd64 tiny-initramfs e2fsprogs"

# cpio "newc" (the only format the kernel's initramfs unpacker reads), see
# Documentation/driver-api/early-userspace/buffer-format.rst.
_CPIO_MAGIC = b"070701"
_CPIO_TRAILER = "TRAILER!!!"


class GuestUnavailable(Exception):
    """A tool or file the guest needs is not installed here; the message names the package."""


@dataclass(frozen=True, slots=True)
class Guest:
    kernel: Path
    initrd: Path
    kernel_version: str
    modules: tuple[str, ...]
    initrd_bytes: int


class _Cpio:
    """Writes a cpio newc archive: directories before what they contain, a trailer last."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._names: set[str] = set()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self._names:
            return
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = _CPIO_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        self._parts += [header, encoded, b"\0" * (-(len(header) + len(encoded)) % 4), data,
                        b"\0" * (-len(data) % 4)]

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry(_CPIO_TRAILER, 0)
        return b"".join(self._parts)


def find_kernel(boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> tuple[Path, str]:
    """The newest readable /boot/vmlinuz-VER whose modules are installed; a cloud
    kernel first (it boots faster: fewer drivers probe)."""
    found: list[tuple[bool, str, Path]] = []
    for vmlinuz in boot.glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if (modules_root / version / "modules.dep").is_file() and os.access(vmlinuz, os.R_OK):
            found.append(("cloud" in version, version, vmlinuz))
    if not found:
        raise GuestUnavailable(f"no kernel in {boot} with modules in {modules_root} "
                               "(apt-get install linux-image-cloud-amd64 tiny-initramfs)")
    _, version, vmlinuz = max(found)
    return vmlinuz, version


def module_load_order(modules_dir: Path, wanted: tuple[str, ...] = WANTED_MODULES) -> list[Path]:
    """The .ko files to insmod, each after everything it depends on (modules.dep lists
    each module's whole dependency closure). Built-in modules are left out."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {_module_name(p): p for p in deps}
    builtin_path = modules_dir / "modules.builtin"
    builtin = {_module_name(p) for p in builtin_path.read_text().split()} if builtin_path.exists() else set()
    order: list[str] = []

    def visit(path: str, depth: int) -> None:
        if depth > len(deps):
            raise RuntimeError(f"dependency cycle at {path}")
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep, depth + 1)
        order.append(path)

    for name in wanted:
        if name in builtin:
            continue
        if name not in by_name:
            raise GuestUnavailable(f"kernel module {name} is neither built in nor in {modules_dir}")
        visit(by_name[name], 0)
    return [modules_dir / p for p in order]


def _module_name(path: str) -> str:
    return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", os.path.basename(path)).replace("-", "_")


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries and the dynamic loader `ldd` names for binary."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30, check=True).stdout
    libs: list[Path] = []
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    if not any("ld-linux" in p.name for p in libs):
        raise RuntimeError(f"ldd {binary}: no dynamic loader in {out!r}")
    return libs


def which(tool: str, package: str) -> Path:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise GuestUnavailable(f"needs {tool} (apt-get install {package})")
    return Path(found)


def build(out_dir: Path) -> Guest:
    """Write out_dir/vmlinuz and out_dir/initrd.img (gzip'd cpio) and return them."""
    qemu_missing = shutil.which("qemu-system-x86_64") is None
    if qemu_missing:
        raise GuestUnavailable("needs qemu-system-x86_64 (apt-get install qemu-system-x86 qemu-block-extra)")
    busybox = Path("/bin/busybox")
    if not busybox.exists() or "statically linked" not in _file_kind(busybox):
        raise GuestUnavailable("needs a static /bin/busybox (apt-get install busybox-static)")
    tools = [which(t, "e2fsprogs") for t in DYNAMIC_TOOLS]
    vmlinuz, version = find_kernel()
    modules = module_load_order(Path("/lib/modules") / version)

    archive = _Cpio()
    for d in ("dev", "proc", "sys", "mnt", "tmp", "bin", "sbin", "etc", "modules"):
        archive.dir(d)
    # The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    archive.chardev("dev/console", 5, 1)
    archive.file("init", INIT_SCRIPT.read_bytes())
    archive.file("bin/busybox", busybox.read_bytes())
    archive.symlink("bin/sh", "busybox")
    libs: dict[str, Path] = {}
    for tool in tools:
        archive.file(f"sbin/{tool.name}", tool.read_bytes())
        for lib in shared_libraries(tool):
            libs[str(lib)] = lib
    for name, lib in sorted(libs.items()):
        archive.file(name, lib.resolve().read_bytes())
    if Path("/etc/mke2fs.conf").exists():
        archive.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes(), 0o644)
    names = [_module_name(str(m)) for m in modules]
    for name, path in zip(names, modules, strict=True):
        if path.suffix != ".ko":
            raise GuestUnavailable(f"{path}: compressed modules need a decompressing insmod")
        archive.file(f"modules/{name}.ko", path.read_bytes(), 0o644)
    archive.file("modules/order", "".join(f"{n}\n" for n in names).encode(), 0o644)

    out_dir.mkdir(parents=True, exist_ok=True)
    kernel = out_dir / "vmlinuz"
    shutil.copyfile(vmlinuz, kernel)
    initrd = out_dir / "initrd.img"
    initrd.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    return Guest(kernel, initrd, version, tuple(names), initrd.stat().st_size)


def _file_kind(path: Path) -> str:
    """'statically linked' or 'dynamically linked', from the ELF program headers
    (a PT_INTERP header means a dynamic loader is needed), without the `file` tool."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return "not a 64-bit ELF"
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize:i * phentsize + 4], "little") == pt_interp:
            return "dynamically linked"
    return "statically linked"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.guest.build OUTDIR", file=sys.stderr)
        return 2
    guest = build(Path(argv[0]))
    print(f"kernel {guest.kernel_version}: {guest.kernel} ({guest.kernel.stat().st_size} bytes)")
    print(f"initrd: {guest.initrd} ({guest.initrd_bytes} bytes), modules: {' '.join(guest.modules)}")
    print(f"qemu-system-x86_64 -machine accel=tcg -m 256M -nodefaults -display none -serial stdio -no-reboot "
          f"-kernel {guest.kernel} -initrd {guest.initrd} -append 'console=ttyS0 panic=-1 floe.mode=write' "
          "-drive file=DISK,format=raw,if=virtio,cache=writeback")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
