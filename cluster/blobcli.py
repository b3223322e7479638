"""`floe blob ...`: the object tier for operators (like `rados` for Ceph).

  put FILE            store a file as a blob (R copies, W fsynced), print its hash; pinned so GC keeps it
  get HASH [-o FILE]  read a blob (verified end to end) to stdout or FILE
  stat HASH           which nodes hold it, stored size, compression, whether each copy verifies
  unpin HASH          let GC collect it (once older than the grace period)
  scrub               re-verify every copy on every node now, repairing bad ones
  gc [--dry-run]      one mark-and-sweep collection across the cluster

Target: the local cluster in --data-dir (default .floe), or --server HOST:PORT
(a node's KV API address, as for `floe kv`; the blob service is on
api port + 500 unless --blob-server says otherwise) with --token or
$FLOE_ADMIN_TOKEN (the cluster's admin token, `admin_token` in cluster.toml).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from cluster import launcher
from cluster.config import BLOB_PORT_OFFSET

ADMIN_TOKEN_ENV = "FLOE_ADMIN_TOKEN"


class BlobCLIError(Exception):
    pass


def _targets(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """(blob addresses, KV API addresses, admin token)."""
    if args.server:
        tok = args.token or os.environ.get(ADMIN_TOKEN_ENV, "")
        if not tok:
            raise BlobCLIError(f"--server needs --token ADMIN_TOKEN or {ADMIN_TOKEN_ENV} in the environment")
        apis = list(args.server)
        blobs = list(args.blob_server) if args.blob_server else [
            f"{h}:{int(p) + BLOB_PORT_OFFSET}" for h, p in (a.rsplit(":", 1) for a in apis)]
        return blobs, apis, tok
    layout = launcher.load_layout(args.data_dir)
    if not layout.admin_token:
        raise BlobCLIError(f"the cluster in {args.data_dir} has no admin token yet; run `floe cluster up` once")
    cfgs = [layout.node_config(n) for n in layout.nodes]
    return [c.blob_address for c in cfgs], [c.api_address for c in cfgs], args.token or layout.admin_token


def _client(args: argparse.Namespace) -> Any:
    """A BlobClient on the first node that answers Stats."""
    from objstore.api import BlobError
    from objstore.remote import BlobClient

    blobs, _apis, tok = _targets(args)
    errors = []
    for addr in blobs:
        c = BlobClient(addr, tok, timeout_s=args.timeout)
        try:
            c.stats()
            return c
        except BlobError as e:
            errors.append(f"{addr}: {e}")
            c.close()
        except PermissionError:
            c.close()
            raise
    raise BlobCLIError("no blob server answered: " + "; ".join(errors))


def _pins(args: argparse.Namespace) -> Any:
    from kv.client import KVClient
    from objstore.pins import KVPins

    _blobs, apis, tok = _targets(args)
    return KVPins(KVClient(apis, tok, timeout_s=args.timeout))


def _hash_arg(text: str) -> bytes:
    try:
        h = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 64 hex digits (SHA-256), got {text!r}") from None
    if len(h) != 32:
        raise argparse.ArgumentTypeError(f"expected 64 hex digits (SHA-256), got {len(text)} characters")
    return h


def _out(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(obj, indent=2, sort_keys=True))
    else:
        print(text)


def cmd_put(args: argparse.Namespace) -> int:
    c = _client(args)
    try:
        res = c.put_file(args.file, replicate=True)
    finally:
        c.close()
    if not args.no_pin:
        _pins(args).pin(res.hash)
    _out(args, {"hash": res.hash.hex(), "stored_on": res.stored_on, "pending": res.pending,
                "existed": res.existed, "pinned": not args.no_pin},
         res.hash.hex() if not args.verbose else
         f"{res.hash.hex()}  stored on {', '.join(res.stored_on)}"
         + (f"; owed to {', '.join(res.pending)} (background)" if res.pending else ""))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    c = _client(args)
    try:
        if args.output and args.output != "-":
            tmp = args.output + ".part"
            with open(tmp, "wb") as f:
                n = c.get_to(args.hash, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, args.output)
            print(f"wrote {n} bytes to {args.output}", file=sys.stderr)
        else:
            c.get_to(args.hash, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    finally:
        c.close()
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    c = _client(args)
    try:
        loc = c.locate(args.hash)
    finally:
        c.close()
    copies = [{"node": x.node, "placed": x.placed, "present": x.present, "verified": x.verified,
               "stored_size": x.stored_size, "compression": x.compression, "error": x.error} for x in loc.copies]
    good = sum(1 for x in loc.copies if x.verified)
    lines = [f"hash {loc.hash.hex()}  size {loc.size}  verified copies {good}"]
    lines += [f"  {x['node']:<6} {'placed' if x['placed'] else 'extra ':<7} "
              + (("ok      " if x["verified"] else "CORRUPT ") + f"stored {x['stored_size']} {x['compression']}"
                 if x["present"] else "missing" + (f" ({x['error']})" if x["error"] else ""))
              for x in copies]
    _out(args, {"hash": loc.hash.hex(), "size": loc.size, "copies": copies}, "\n".join(lines))
    return 0 if good else 1


def cmd_unpin(args: argparse.Namespace) -> int:
    _pins(args).unpin(args.hash)
    _out(args, {"hash": args.hash.hex(), "pinned": False}, f"unpinned {args.hash.hex()}")
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    c = _client(args)
    try:
        r = c.scrub(all_nodes=True)
    finally:
        c.close()
    _out(args, {"checked": r.checked, "corrupt": r.corrupt, "repaired": r.repaired, "unrepaired": r.unrepaired},
         f"checked {r.checked} copies: {r.corrupt} corrupt, {r.repaired} repaired, {r.unrepaired} not repairable")
    return 0 if r.unrepaired == 0 else 1


def cmd_gc(args: argparse.Namespace) -> int:
    # GC reads the volumes' live set on the Raft leader: ask each node in turn.
    from objstore.api import BlobError
    from objstore.remote import BlobClient

    blobs, _apis, tok = _targets(args)
    errors: list[str] = []
    r = None
    for addr in blobs:
        c = BlobClient(addr, tok, timeout_s=args.timeout)
        try:
            r = c.gc(dry_run=args.dry_run, grace_s=args.grace)
            break
        except BlobError as e:
            errors.append(f"{addr}: {e}")
        finally:
            c.close()
    if r is None:
        raise BlobCLIError("no node could run GC: " + "; ".join(errors))
    verb = "would delete" if args.dry_run else "deleted"
    _out(args, {"dry_run": args.dry_run, "live": r.live, "examined": r.examined, "young": r.young,
                "deleted": r.deleted, "deleted_bytes": r.deleted_bytes, "unreachable": r.unreachable or []},
         f"live set {r.live} blobs; examined {r.examined} copies; {r.young} unreferenced but young; "
         f"{verb} {r.deleted} copies ({r.deleted_bytes} bytes)"
         + (f"; could not sweep {', '.join(r.unreachable)}" if r.unreachable else ""))
    return 0


def add_target_args(p: argparse.ArgumentParser, default_data_dir: str, server_arg: Callable[[str], str],
                    token_env: str) -> None:
    """--json and the cluster to talk to (--data-dir or --server), shared by `floe blob` and `floe volume`."""
    p.add_argument("--json", action="store_true", help="machine-readable output")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--data-dir", default=default_data_dir, metavar="DIR",
                        help=f"use the local cluster in DIR (default {default_data_dir})")
    target.add_argument("--server", action="append", type=server_arg, metavar="HOST:PORT",
                        help=f"a node's API address (repeatable); needs --token or {token_env}")


def add_parser(top: Any, server_arg: Callable[[str], str], positive_float: Callable[[str], float],
               default_data_dir: str) -> None:
    blob = top.add_parser("blob", help="the object tier: put, get, stat, scrub, gc")
    sub = blob.add_subparsers(dest="blob_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        add_target_args(p, default_data_dir, server_arg, ADMIN_TOKEN_ENV)
        p.add_argument("--blob-server", action="append", type=server_arg, metavar="HOST:PORT",
                       help="a node's blob address, when not API port + 500")
        p.add_argument("--token", default=None, help="the cluster's admin token")
        p.add_argument("--timeout", type=positive_float, default=60.0, metavar="SECONDS",
                       help="give up after this long (default 60)")

    p = sub.add_parser("put", help="store FILE as a blob and print its SHA-256")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--no-pin", action="store_true", help="do not pin it (GC may collect it after the grace period)")
    p.add_argument("-v", "--verbose", action="store_true", help="say where the copies went")
    common(p)
    p.set_defaults(func=cmd_put)
    p = sub.add_parser("get", help="read a blob (verified) to stdout or -o FILE")
    p.add_argument("hash", type=_hash_arg, metavar="HASH")
    p.add_argument("-o", "--output", default=None, metavar="FILE")
    common(p)
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("stat", help="where a blob's copies are and whether each verifies")
    p.add_argument("hash", type=_hash_arg, metavar="HASH")
    common(p)
    p.set_defaults(func=cmd_stat)
    p = sub.add_parser("unpin", help="let GC collect a blob put with `floe blob put`")
    p.add_argument("hash", type=_hash_arg, metavar="HASH")
    common(p)
    p.set_defaults(func=cmd_unpin)
    p = sub.add_parser("scrub", help="re-verify every copy on every node now, repairing bad ones")
    common(p)
    p.set_defaults(func=cmd_scrub)
    p = sub.add_parser("gc", help="one mark-and-sweep garbage collection across the cluster")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    p.add_argument("--grace", type=positive_float, default=None, metavar="SECONDS",
                   help="never delete blobs younger than this; only lengthens the nodes' gc_grace_s")
    common(p)
    p.set_defaults(func=cmd_gc)


def node_blob_stats(data_dir: str, timeout_s: float = 2.0) -> dict[str, dict[str, Any] | None]:
    """Each node's blob Stats (None for a node that does not answer), for `floe cluster status`."""
    from concurrent.futures import ThreadPoolExecutor

    layout = launcher.load_layout(data_dir)
    if not layout.admin_token:
        return {n.id: None for n in layout.nodes}

    def one(addr: str) -> dict[str, Any] | None:
        try:
            from objstore.remote import BlobClient

            c = BlobClient(addr, layout.admin_token, timeout_s=timeout_s)
            try:
                return dict(c.stats())
            finally:
                c.close()
        except Exception:  # noqa: BLE001 - a down node shows as "-"
            return None

    cfgs = {n.id: layout.node_config(n) for n in layout.nodes}
    with ThreadPoolExecutor(max_workers=len(cfgs)) as pool:
        futs = {nid: pool.submit(one, c.blob_address) for nid, c in cfgs.items()}
        return {nid: f.result() for nid, f in futs.items()}
