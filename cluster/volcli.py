"""`floe volume ...`: create, list, show, resize, remove, import and export volumes.

  create NAME --size 10G [--block-size 512] [--tenant T]
  ls | show NAME | resize NAME --size S [--force] | rm NAME
  import NAME FILE [--size S] [--block-size B]   raw image in; zero runs skipped; flushed at the end
  export NAME[@SNAP] FILE                        raw image out
  clone VOL@SNAP NEWNAME                         a writable volume from a snapshot, no data copied
  acl NAME [--allow IQN] [--deny IQN] [--any-initiator] [--chap USER:SECRET]
           [--mutual-chap USER:SECRET] [--no-chap]   who may log in to the volume's iSCSI target
  attach-info NAME                               the iscsi:// URL, portals, QEMU and iscsiadm lines
and `floe snapshot create VOL NAME | ls VOL | rm VOL NAME`.

Target: the local cluster in --data-dir (default .floe), or --server HOST:PORT
(a node's KV API address, repeatable) with --token (the tenant's) and, for
import/export, --admin-token (the blob service's; $FLOE_ADMIN_TOKEN).
Import and export open the volume from this process, as its owner for the
duration (a volume served by a node is taken over: its lease must expire).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from cluster import launcher
from cluster.blobcli import ADMIN_TOKEN_ENV, add_target_args
from cluster.config import BLOB_PORT_OFFSET, ISCSI_PORT_OFFSET
from cluster.config import load as load_node_config

TOKEN_ENV = "FLOE_TOKEN"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
IO_BYTES = 4 << 20  # import/export piece


class VolumeCLIError(Exception):
    pass


def parse_size(text: str) -> int:
    """'10G', '512M', '4096', '1TiB' -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 10G, 512M or 4096, got {text!r}")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


def human(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n}B"


def _kv(args: argparse.Namespace) -> Any:
    from kv.client import KVClient

    if args.server:
        tok = args.token or os.environ.get(TOKEN_ENV, "")
        if not tok:
            raise VolumeCLIError(f"--server needs --token TOKEN or {TOKEN_ENV} in the environment")
        return KVClient(list(args.server), tok, timeout_s=args.timeout)
    layout = launcher.load_layout(args.data_dir)
    tok = args.token or layout.token
    if getattr(args, "tenant", None):
        cfg = load_node_config(layout.nodes[0].config_path)
        named = {t.name: t.token for t in cfg.tenants}
        if args.tenant not in named:
            raise VolumeCLIError(f"no tenant {args.tenant!r} in {layout.nodes[0].config_path} "
                                 f"(tenants: {', '.join(sorted(named))})")
        tok = named[args.tenant]
    return KVClient([n.api_address for n in layout.nodes], tok, timeout_s=args.timeout)


def _blobs(args: argparse.Namespace) -> Any:
    from blockdev.tiers import ClientBlobs
    from objstore.remote import BlobClient

    if args.server:
        tok = args.admin_token or os.environ.get(ADMIN_TOKEN_ENV, "")
        if not tok:
            raise VolumeCLIError(f"import/export with --server needs --admin-token or {ADMIN_TOKEN_ENV}")
        addrs = [f"{h}:{int(p) + BLOB_PORT_OFFSET}" for h, p in (a.rsplit(":", 1) for a in args.server)]
    else:
        layout = launcher.load_layout(args.data_dir)
        tok = layout.admin_token
        addrs = [layout.node_config(n).blob_address for n in layout.nodes]
    return ClientBlobs([BlobClient(a, tok, timeout_s=args.timeout) for a in addrs])


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True) if args.json else text)


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, unless forced)."""

    def __init__(self, what: str, total: int, enabled: bool) -> None:
        self.what, self.total, self.enabled = what, max(total, 1), enabled
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < 0.2):
            return
        self.last = now
        frac = min(1.0, done / self.total)
        rate = done / max(now - self.t0, 1e-6) / (1 << 20)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.what} [{bar:<30}] {frac * 100:5.1f}% {human(done)}/{human(self.total)} "
                         f"{rate:.1f} MiB/s")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_create(args: argparse.Namespace) -> int:
    from blockdev.registry import Registry

    info = Registry(_kv(args)).create(args.name, args.size, args.block_size)
    _out(args, info.to_json(), f"created volume {info.name}: {human(info.size)}, {info.block_size}-byte blocks")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from blockdev.registry import Registry

    reg = Registry(_kv(args))
    vols = reg.list()
    pool = reg.usage()
    if args.json:
        _out(args, {"volumes": [v.to_json() for v in vols], "pool": pool}, "")
    elif not vols:
        print("(no volumes)")
    else:
        print(f"{'NAME':<24} {'SIZE':>8} {'BLOCK':>6}  ID")
        for v in vols:
            print(f"{v.name:<24} {human(v.size):>8} {v.block_size:>6}  {v.id}")
        print(f"\npool: {human(pool['provisioned'])} provisioned, {pool['allocated']} bytes allocated")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from blockdev.registry import ALLOCATED_KEY, FLUSH_SEQ_KEY, LEASE_KEY, Registry, from_u64

    kv = _kv(args)
    info = Registry(kv).get(args.name)
    d = info.to_json()
    lease = kv.get(info.store, "meta", LEASE_KEY)
    seq = kv.get(info.store, "meta", FLUSH_SEQ_KEY)
    import msgpack

    d["owner"] = msgpack.unpackb(lease[0], raw=False) if lease else None
    d["flush_seq"] = from_u64(seq[0]) if seq else 0
    alloc = kv.get(info.store, "meta", ALLOCATED_KEY)
    d["allocated"] = from_u64(alloc[0]) if alloc else 0
    owner = f"{d['owner']['node']} (epoch {d['owner']['epoch']})" if d["owner"] else "none"
    _out(args, d, f"volume {info.name}\n  id          {info.id}\n  size        {human(info.size)} ({info.size} bytes)"
                  f"\n  block size  {info.block_size}\n  allocated   {d['allocated']} bytes (as of the last flush)"
                  f"\n  owner       {owner}\n  flushes     {d['flush_seq']}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from blockdev.registry import Registry

    info = Registry(_kv(args)).resize(args.name, args.size, force=args.force)
    _out(args, info.to_json(), f"resized {info.name} to {human(info.size)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from blockdev.registry import Registry

    info = Registry(_kv(args)).delete(args.name)
    _out(args, {"name": info.name, "deleted": True}, f"removed volume {info.name} (its blobs go at the next GC)")
    return 0


def _open(args: argparse.Namespace, kv: Any, info: Any) -> Any:
    from blockdev.volume import Volume

    v = Volume(kv, info, _blobs(args), f"cli-{os.uname().nodename}-{os.getpid()}", lease_s=5.0)
    v.open(background=True)
    return v


def cmd_import(args: argparse.Namespace) -> int:
    from blockdev.errors import NoSuchVolume
    from blockdev.registry import Registry

    size = os.path.getsize(args.file)
    kv = _kv(args)
    reg = Registry(kv)
    try:
        info = reg.get(args.name)
        created = False
    except NoSuchVolume:
        vsize = args.size or -(-size // args.block_size) * args.block_size
        info = reg.create(args.name, vsize, args.block_size)
        created = True
    if size > info.size:
        raise VolumeCLIError(f"{args.file} is {size} bytes; volume {info.name} holds {info.size}")
    v = _open(args, kv, info)
    progress = Progress(f"import {info.name}", size, args.progress or sys.stderr.isatty())
    skipped = written = 0
    try:
        with open(args.file, "rb") as f:
            off = 0
            while off < size:
                piece = f.read(IO_BYTES)
                if len(piece) % info.block_size:
                    piece += bytes(info.block_size - len(piece) % info.block_size)
                if not any(piece) and created:
                    skipped += len(piece)  # a new volume reads zeros there already
                else:
                    v.write(off // info.block_size, piece)
                    written += len(piece)
                off += IO_BYTES
                progress.update(min(off, size))
        v.flush()
        progress.update(size, final=True)
    finally:
        v.close(flush=False)
    _out(args, {"name": info.name, "bytes": size, "written": written, "zero_skipped": skipped, "flushed": True},
         f"imported {human(size)} into {info.name} ({human(skipped)} of zeros skipped), flushed")
    return 0


def _split_at(text: str) -> tuple[str, str]:
    vol, sep, snap = text.partition("@")
    if not sep or not vol or not snap:
        raise VolumeCLIError(f"expected VOLUME@SNAPSHOT, got {text!r}")
    return vol, snap


def cmd_export(args: argparse.Namespace) -> int:
    from blockdev import snapshots
    from blockdev.registry import Registry
    from blockdev.volume import Volume

    kv = _kv(args)
    if "@" in args.name:
        vol, snap = _split_at(args.name)
        info = Registry(kv).get(vol)
        # A snapshot is read without taking the volume: no lease, read-only.
        v = Volume(kv, info, _blobs(args), "cli-export", snapshot_gen=snapshots.get(kv, info, snap))
    else:
        info = Registry(kv).get(args.name)
        v = _open(args, kv, info)
    progress = Progress(f"export {info.name}", info.size, args.progress or sys.stderr.isatty())
    tmp = args.file + ".part"
    try:
        with open(tmp, "wb") as f:
            off = 0
            while off < info.size:
                n = min(IO_BYTES, info.size - off)
                f.write(v.read(off // info.block_size, n // info.block_size))
                off += n
                progress.update(off)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.file)
        progress.update(info.size, final=True)
    finally:
        if not v.read_only:
            v.close(flush=False)
        if os.path.exists(tmp):
            os.unlink(tmp)
    _out(args, {"name": info.name, "bytes": info.size, "file": args.file},
         f"exported {info.name} ({human(info.size)}) to {args.file}")
    return 0


def _volume(args: argparse.Namespace, name: str) -> tuple[Any, Any, Any]:
    """(KV client, registry, VolumeInfo of `name`)."""
    from blockdev.registry import Registry

    kv = _kv(args)
    reg = Registry(kv)
    return kv, reg, reg.get(name)


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    from blockdev import snapshots

    kv, _reg, info = _volume(args, args.volume)
    gen = snapshots.create(kv, info, args.name)
    _out(args, {"volume": info.name, "snapshot": args.name, "gen": gen},
         f"created snapshot {info.name}@{args.name} (it holds what the volume's owner has flushed)")
    return 0


def cmd_snapshot_ls(args: argparse.Namespace) -> int:
    from blockdev import snapshots

    kv, _reg, info = _volume(args, args.volume)
    snaps = snapshots.list_(kv, info)
    if args.json:
        _out(args, {"volume": info.name, "snapshots": snaps}, "")
    elif not snaps:
        print("(no snapshots)")
    else:
        for sn in snaps:
            print(f"{info.name}@{sn['name']}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(sn['created']))}")
    return 0


def cmd_snapshot_rm(args: argparse.Namespace) -> int:
    from blockdev import snapshots

    kv, reg, info = _volume(args, args.volume)
    pruned = snapshots.delete(kv, reg, info, args.name)
    _out(args, {"volume": info.name, "snapshot": args.name, "deleted": True, "records_pruned": pruned},
         f"removed snapshot {info.name}@{args.name} ({pruned} record versions pruned; blobs go at the next GC)")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    from blockdev import snapshots

    vol, snap = _split_at(args.source)
    kv, reg, origin = _volume(args, vol)
    info = snapshots.clone(kv, reg, origin, snap, args.new_name)
    _out(args, info.to_json(), f"created volume {info.name}, a clone of {vol}@{snap} (no data copied)")
    return 0


def _chap_pair(text: str) -> tuple[str, str]:
    user, sep, secret = text.partition(":")
    if not sep or not user or not secret:
        raise argparse.ArgumentTypeError("expected USER:SECRET")
    return user, secret


def cmd_acl(args: argparse.Namespace) -> int:
    from blockdev.registry import Registry

    reg = Registry(_kv(args))
    acl = reg.get_acl(args.name)
    changed = False
    if args.any_initiator:
        acl.pop("initiators", None)
        changed = True
    if args.allow or args.deny:
        names = list(acl.get("initiators") or [])
        names += [n for n in args.allow if n not in names]
        names = [n for n in names if n not in args.deny]
        acl["initiators"] = names
        changed = True
    if args.no_chap:
        acl.pop("chap", None)
        changed = True
    if args.chap:
        acl["chap"] = {"user": args.chap[0], "secret": args.chap[1]}
        changed = True
    if args.mutual_chap:
        if "chap" not in acl:
            raise VolumeCLIError("mutual CHAP needs --chap USER:SECRET (the initiator's) too")
        acl["chap"] = {**acl["chap"], "mutual_user": args.mutual_chap[0], "mutual_secret": args.mutual_chap[1]}
        changed = True
    if changed:
        acl = reg.set_acl(args.name, acl)
    shown = {k: v for k, v in acl.items() if k != "chap"}
    if "chap" in acl:
        shown["chap"] = {"user": acl["chap"]["user"], "mutual": bool(acl["chap"].get("mutual_user")),
                         **({"mutual_user": acl["chap"]["mutual_user"]} if acl["chap"].get("mutual_user") else {})}
    inits = acl.get("initiators")
    text = (f"volume {args.name}\n  initiators  "
            + ("any" if inits is None else (", ".join(inits) if inits else "none (nobody may log in)"))
            + "\n  CHAP        "
            + ("none" if "chap" not in acl else f"user {acl['chap']['user']}"
               + (f", mutual (target user {acl['chap']['mutual_user']})" if acl["chap"].get("mutual_user") else "")))
    _out(args, shown, text)
    return 0


def _portals(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(node id or address, iSCSI portal) of every node."""
    if args.server:
        out = []
        for a in args.server:
            h, p = a.rsplit(":", 1)
            out.append((a, f"{h}:{int(p) + ISCSI_PORT_OFFSET}"))
        return out
    layout = launcher.load_layout(args.data_dir)
    return [(n.id, layout.node_config(n).iscsi_address) for n in layout.nodes]


def cmd_attach_info(args: argparse.Namespace) -> int:
    import msgpack

    from blockdev.registry import LEASE_KEY, Registry
    from cluster.targets import target_name

    kv = _kv(args)
    info = Registry(kv).get(args.name)
    tenant = args.tenant or launcher.DEFAULT_TENANT
    iqn = target_name(tenant, info.name)
    portals = _portals(args)
    lease = kv.get(info.store, "meta", LEASE_KEY)
    owner = msgpack.unpackb(lease[0], raw=False).get("node") if lease else None
    portals.sort(key=lambda np: np[0] != owner)  # the owner's portal first: no redirect needed
    addrs = [p for _n, p in portals]
    url = f"iscsi://{addrs[0]}/{iqn}/0"
    qemu = f"qemu-system-x86_64 ... -drive file={url},format=raw,if=virtio,cache=writeback"
    iscsiadm = (f"iscsiadm -m discovery -t sendtargets -p {addrs[0]} && "
                f"iscsiadm -m node -T {iqn} -p {addrs[0]} --login")
    d = {"url": url, "portals": addrs, "target": iqn, "lun": 0, "owner": owner, "qemu": qemu, "iscsiadm": iscsiadm,
         "block_size": info.block_size, "size": info.size}
    text = (f"volume {info.name} ({human(info.size)}, {info.block_size}-byte blocks)\n"
            f"  target   {iqn}\n  LUN      0\n  portals  {', '.join(addrs)}"
            f"{'' if owner else '  (no owner yet: the first login opens it)'}\n"
            f"  url      {url}\n\nQEMU:\n  {qemu}\nLinux (open-iscsi):\n  {iscsiadm}\n"
            f"qemu-img / qemu-io:\n  qemu-img info {url}")
    _out(args, d, text)
    return 0


def add_parser(top: Any, server_arg: Callable[[str], str], positive_float: Callable[[str], float],
               default_data_dir: str) -> None:
    vol = top.add_parser("volume", help="volumes: create, ls, show, resize, rm, import, export")
    sub = vol.add_subparsers(dest="volume_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        add_target_args(p, default_data_dir, server_arg, TOKEN_ENV)
        p.add_argument("--token", default=None, help="the tenant's token")
        p.add_argument("--tenant", default=None, help="with --data-dir: act as this tenant of the cluster")
        p.add_argument("--timeout", type=positive_float, default=30.0, metavar="SECONDS",
                       help="per call (default 30)")

    def block_size(text: str) -> int:
        if text not in ("512", "4096"):
            raise argparse.ArgumentTypeError("block size is 512 or 4096")
        return int(text)

    p = sub.add_parser("create", help="create a thin volume (nothing is allocated until written)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", type=parse_size, required=True, help="e.g. 10G, 512M (binary units)")
    p.add_argument("--block-size", type=block_size, default=512, help="logical block size: 512 (default) or 4096")
    common(p)
    p.set_defaults(func=cmd_create)
    p = sub.add_parser("ls", help="list volumes")
    common(p)
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("show", help="a volume's size, block size, owner and flush count")
    p.add_argument("name", metavar="NAME")
    common(p)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("resize", help="grow a volume (shrinking needs --force)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", type=parse_size, required=True)
    p.add_argument("--force", action="store_true", help="allow shrinking (data past the new end is lost)")
    common(p)
    p.set_defaults(func=cmd_resize)
    p = sub.add_parser("rm", help="delete a volume (its blobs are reclaimed by GC)")
    p.add_argument("name", metavar="NAME")
    common(p)
    p.set_defaults(func=cmd_rm)
    for name, fn, help_text in (("import", cmd_import, "copy a raw image FILE into a volume (created if needed)"),
                                ("export", cmd_export, "copy a volume to a raw image FILE")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("name", metavar="NAME" if name == "import" else "NAME[@SNAPSHOT]")
        p.add_argument("file", metavar="FILE")
        if name == "import":
            p.add_argument("--size", type=parse_size, default=0, help="size of a new volume (default: the file's)")
            p.add_argument("--block-size", type=block_size, default=512)
        p.add_argument("--admin-token", default=None, help=f"with --server: the blob service's token "
                                                           f"(or {ADMIN_TOKEN_ENV})")
        p.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
        common(p)
        p.set_defaults(func=fn)
    p = sub.add_parser("acl", help="who may log in to the volume's iSCSI target: initiator names and CHAP")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--allow", action="append", default=[], metavar="IQN", help="let this initiator in (repeatable)")
    p.add_argument("--deny", action="append", default=[], metavar="IQN", help="remove an allowed initiator")
    p.add_argument("--any-initiator", action="store_true", help="drop the initiator list: any initiator may log in")
    p.add_argument("--chap", type=_chap_pair, metavar="USER:SECRET",
                   help="require CHAP: the initiator's user name and secret (12-255 bytes)")
    p.add_argument("--mutual-chap", type=_chap_pair, metavar="USER:SECRET",
                   help="mutual CHAP: the target's user name and secret, which the initiator checks")
    p.add_argument("--no-chap", action="store_true", help="stop requiring CHAP")
    common(p)
    p.set_defaults(func=cmd_acl)
    p = sub.add_parser("attach-info", help="the iscsi:// URL, portals and ready-to-paste QEMU and iscsiadm lines")
    p.add_argument("name", metavar="NAME")
    common(p)
    p.set_defaults(func=cmd_attach_info)
    p = sub.add_parser("clone", help="a new writable volume from VOLUME@SNAPSHOT (no data copied)")
    p.add_argument("source", metavar="VOLUME@SNAPSHOT")
    p.add_argument("new_name", metavar="NEWNAME")
    common(p)
    p.set_defaults(func=cmd_clone)

    snap = top.add_parser("snapshot", help="snapshots: create, ls, rm")
    ssub = snap.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    p = ssub.add_parser("create", help="snapshot a volume (what its owner has flushed; no data copied)")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("name", metavar="NAME")
    common(p)
    p.set_defaults(func=cmd_snapshot_create)
    p = ssub.add_parser("ls", help="a volume's snapshots")
    p.add_argument("volume", metavar="VOLUME")
    common(p)
    p.set_defaults(func=cmd_snapshot_ls)
    p = ssub.add_parser("rm", help="delete a snapshot (refused while clones use it)")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("name", metavar="NAME")
    common(p)
    p.set_defaults(func=cmd_snapshot_rm)
