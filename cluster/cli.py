"""`floe`, the single command line of floe (DESIGN.md §10).

Theory of operation. `main` parses argv into one handler per command (the
parser is built from data-like `add_parser` calls; each leaf sets `func`), runs
it, and turns the errors a user can cause or meet into one `floe: error: ...`
line on stderr: exit 1 for a failed operation (a kv.errors.KVError, a cluster
that does not come up, a bad config), exit 2 for a usage error. Anything else is
a bug in floe and keeps its traceback.

Heavy modules (the node, the KV client and its gRPC, the benchmark) are
imported only by the commands that need them, so `floe --help` and
`floe cluster status` stay fast and the parser works before those modules exist.

Keys and values are UTF-8 strings on the command line. JSON output shows bytes
as a string when they are valid UTF-8 and as {"base64": "..."} otherwise, so
every value round-trips exactly; the human form is for reading only.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol, TextIO, cast

from cluster import blobcli, launcher, volcli
from cluster.config import ConfigError
from kv.errors import KVError
from kv.limits import SCAN_LIMIT_MAX

DEFAULT_DATA_DIR = ".floe"
DEFAULT_BENCH_DATA_DIR = ".floe-bench"
DEFAULT_RAFT_PORT = 7100
DEFAULT_API_PORT = 7200
DEFAULT_NODES = 3
TOKEN_ENV = "FLOE_TOKEN"

# Signals `floe cluster kill --signal` accepts: kill, stop gracefully, pause, resume.
KILL_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT,
                "STOP": signal.SIGSTOP, "CONT": signal.SIGCONT}


class KVClientAPI(Protocol):
    """The kv.client.KVClient calls the CLI makes (the contract, not the implementation)."""

    def create_store(self, store: str) -> int: ...
    def drop_store(self, store: str) -> int: ...
    def list_stores(self, *, stale: bool = False) -> list[tuple[str, int, list[str]]]: ...
    def create_keyspace(self, store: str, keyspace: str) -> int: ...
    def list_keyspaces(self, store: str, *, stale: bool = False) -> list[str]: ...
    def get(self, store: str, keyspace: str, key: bytes, *, stale: bool = False) -> tuple[bytes, int] | None: ...
    def put(self, store: str, keyspace: str, key: bytes, value: bytes) -> int: ...
    def delete(self, store: str, keyspace: str, key: bytes) -> int: ...
    def scan(self, store: str, keyspace: str, *, prefix: bytes = b"", start: bytes = b"", end: bytes = b"",
             limit: int = 0, continuation: bytes = b"", stale: bool = False
             ) -> tuple[list[tuple[bytes, bytes, int]], bytes]: ...
    def close(self) -> None: ...


class CLIError(Exception):
    """A failed command; main prints the message and exits 1."""


class UsageError(CLIError):
    """The command line is inconsistent in a way argparse cannot see; exit 2."""


# ---------------------------------------------------------------- encoding


def encode_bytes(data: bytes) -> str | dict[str, str]:
    """Bytes for JSON: the string if `data` is valid UTF-8, else {"base64": ...}."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def display_bytes(data: bytes) -> str:
    """Bytes for a human: printable UTF-8 as is, other UTF-8 JSON-quoted, anything else as base64:..."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode("ascii")
    return text if text.isprintable() else json.dumps(text)


def arg_bytes(text: str) -> bytes:
    """A key or value from argv as bytes. surrogateescape gives back the exact bytes
    of an argument that was not valid UTF-8 (Python decodes argv that way)."""
    return text.encode("utf-8", "surrogateescape")


def _print_json(obj: Any, out: TextIO | None = None) -> None:
    print(json.dumps(obj), file=out or sys.stdout)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


# ---------------------------------------------------------------- argument types


def _server_arg(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


# ---------------------------------------------------------------- node, bench


def _import_optional(module: str, what: str) -> Any:
    """Import `module`; if it (not one of its dependencies) is missing, a clear CLIError."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == module or module.startswith(e.name + ".")):
            raise CLIError(f"{what} is not available in this installation (no module {module})") from None
        raise


def _cmd_node_run(args: argparse.Namespace) -> int:
    node = _import_optional("cluster.node", "the node process")
    try:
        rc = node.main(args.config)
    except ConfigError as e:
        raise CLIError(f"{args.config}: {e}") from None
    return 0 if rc is None else int(rc)


def _cmd_bench_kv(args: argparse.Namespace) -> int:
    bench = _import_optional("bench.kv", "the KV benchmark")
    rc = bench.main(args)
    return 0 if rc is None else int(rc)


def _cmd_bench_blob(args: argparse.Namespace) -> int:
    bench = _import_optional("bench.blob", "the blob benchmark")
    rc = bench.main(args)
    return 0 if rc is None else int(rc)


def _cmd_bench_volume(args: argparse.Namespace) -> int:
    bench = _import_optional("bench.volume", "the volume benchmark")
    rc = bench.main(args)
    return 0 if rc is None else int(rc)


def _cmd_bench_iscsi(args: argparse.Namespace) -> int:
    bench = _import_optional("bench.iscsi", "the iSCSI benchmark")
    try:
        rc = bench.main(args)
    except bench.BenchError as e:
        raise CLIError(str(e)) from None
    return 0 if rc is None else int(rc)


# ---------------------------------------------------------------- cluster


def _short_path(path: Path) -> str:
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _dir_flag(data_dir: str) -> str:
    return "" if data_dir == DEFAULT_DATA_DIR else f" --data-dir {data_dir}"


def _cmd_cluster_up(args: argparse.Namespace) -> int:
    nodes, raft_port, api_port = args.nodes, args.raft_port, args.api_port
    if launcher.layout_exists(args.data_dir):
        # Flags not given mean "as the existing cluster was created".
        existing = launcher.load_layout(args.data_dir)
        nodes = nodes or len(existing.nodes)
        raft_port = raft_port or existing.nodes[0].raft_port
        api_port = api_port or existing.nodes[0].api_port
    info = launcher.up(args.data_dir, nodes or DEFAULT_NODES, raft_port or DEFAULT_RAFT_PORT,
                       api_port or DEFAULT_API_PORT, wait_s=args.wait)
    rows = {r["id"]: r for r in launcher.status(args.data_dir)}
    started = ", ".join(info.started) if info.started else "none; all were running"
    print(f"floe: {len(info.nodes)}-node cluster up in {info.data_dir} (started: {started}); leader {info.leader}")
    print()
    layout = launcher.load_layout(args.data_dir)
    print(_table(["ID", "ROLE", "PID", "API", "RAFT", "BLOB", "ISCSI", "LOG"],
                 [[n.id, rows[n.id]["role"], rows[n.id]["pid"], n.api_address, n.raft_address,
                   layout.node_config(n).blob_address, layout.node_config(n).iscsi_address,
                   _short_path(n.log_path)] for n in info.nodes]))
    flag = _dir_flag(args.data_dir)
    attach = ""
    if args.volume:
        attach = _ensure_volume(args, layout, info.servers)
    server_flags = " ".join(f"--server {s}" for s in info.servers)
    print(f"""
Use it (servers and token are read from {args.data_dir}):
  floe kv create-store demo{flag}
  floe kv create-keyspace demo main{flag}
  floe kv put demo main hello world{flag}
  floe kv get demo main hello{flag}
  floe blob put FILE{flag}      (the object tier: prints the blob's SHA-256; see floe blob --help)
From another directory or machine, or from Python (kv.client.KVClient(servers, token)):
  export {TOKEN_ENV}={info.token}
  floe kv ls {server_flags}
Status: floe cluster status{flag}    Stop: floe cluster down{flag}  (data and config stay in {args.data_dir})""")
    if attach:
        print(attach)
    return 0


def _ensure_volume(args: argparse.Namespace, layout: Any, servers: list[str]) -> str:
    """The volume `make up` promises: created on the first up, kept after; returns how to attach it."""
    from blockdev.errors import NoSuchVolume
    from blockdev.registry import Registry
    from cluster.targets import target_name
    from kv.client import KVClient

    kv = KVClient(servers, layout.token, timeout_s=30.0)
    try:
        reg = Registry(kv)
        try:
            info = reg.get(args.volume)
            made = "exists"
        except NoSuchVolume:
            info = reg.create(args.volume, args.volume_size, 512)
            made = "created"
    finally:
        kv.close()
    portals = [layout.node_config(n).iscsi_address for n in layout.nodes]
    url = f"iscsi://{portals[0]}/{target_name(launcher.DEFAULT_TENANT, info.name)}/0"
    return (f"\nVolume {info.name} ({volcli.human(info.size)}, thin; {made}) is ready to attach:\n"
            f"  {url}\n"
            f"  qemu-system-x86_64 ... -drive file={url},format=raw,if=virtio,cache=writeback\n"
            f"  qemu-io -c 'write -P 0xab 0 1M' -c 'flush' {url}\n"
            f"  floe volume attach-info {info.name}{_dir_flag(args.data_dir)}   (all portals, iscsiadm lines)")


def _cmd_cluster_down(args: argparse.Namespace) -> int:
    stopped = launcher.down(args.data_dir)
    print(f"stopped {', '.join(stopped)}" if stopped else "no node was running")
    return 0


def _cmd_cluster_status(args: argparse.Namespace) -> int:
    rows = launcher.status(args.data_dir)
    blob_stats = blobcli.node_blob_stats(args.data_dir)
    for r in rows:
        st = blob_stats.get(r["id"])
        r["blobs"] = None if st is None else {k: st.get(k) for k in ("blobs", "bytes", "stored_bytes",
                                                                     "repair_backlog", "counters")}
    if args.json:
        _print_json({"nodes": [{k: r[k] for k in (*launcher.STATUS_KEYS, "blobs")} for r in rows]})
        return 0

    def blob_cell(r: dict[str, Any], key: str) -> Any:
        return "-" if r["blobs"] is None else r["blobs"][key]

    print(_table(["ID", "ROLE", "PID", "API", "RAFT", "TERM", "COMMIT", "APPLIED", "HEALTHY", "BLOBS", "BYTES",
                  "REPAIR BACKLOG"],
                 [[r["id"], r["role"], r["pid"], r["address"], r["raft_address"], r["term"], r["commit_index"],
                   r["applied_index"], "yes" if r["healthy"] else "no", blob_cell(r, "blobs"),
                   blob_cell(r, "bytes"), blob_cell(r, "repair_backlog")] for r in rows]))
    leaders = [r["id"] for r in rows if r["role"] == "leader"]
    healthy = sum(1 for r in rows if r["healthy"])
    print(f"\n{healthy} of {len(rows)} nodes healthy; leader: {', '.join(leaders) or 'none'}")
    return 0


def _cmd_cluster_kill(args: argparse.Namespace) -> int:
    sig = KILL_SIGNALS[args.signal]
    pid = launcher.kill(args.data_dir, args.node, sig)
    print(f"sent SIG{args.signal} to {args.node} (pid {pid})")
    return 0


def _cmd_cluster_start(args: argparse.Namespace) -> int:
    pid = launcher.start(args.data_dir, args.node, wait_s=args.wait)
    print(f"{args.node} is up (pid {pid})")
    return 0


# ---------------------------------------------------------------- kv


def _make_client(servers: Sequence[str], token: str, timeout_s: float, attempts: int) -> KVClientAPI:
    """A KVClient (the tests replace this function to check output without a cluster)."""
    _import_optional("kv.client", "the KV client")
    return cast(KVClientAPI, launcher.kv_client_class()(servers, token, timeout_s=timeout_s, attempts=attempts))


def kv_target(args: argparse.Namespace) -> tuple[list[str], str]:
    """The servers and token a kv command talks to.

    --server (repeatable) needs --token or $FLOE_TOKEN. Otherwise the servers and
    token of the local cluster in --data-dir (default .floe), where --token, if
    given, overrides the cluster's token; $FLOE_TOKEN is deliberately ignored
    there, so a token exported for a remote cluster does not leak into local use.
    """
    if args.server:
        tok = args.token or os.environ.get(TOKEN_ENV, "")
        if not tok:
            raise UsageError(f"--server needs --token TOKEN or {TOKEN_ENV} in the environment")
        return list(args.server), tok
    layout = launcher.load_layout(args.data_dir or DEFAULT_DATA_DIR)
    return [n.api_address for n in layout.nodes], args.token or layout.token


def _kv_ls(c: KVClientAPI, args: argparse.Namespace) -> int:
    stores = c.list_stores(stale=args.stale)
    if args.json:
        _print_json({"stores": [{"name": n, "id": i, "keyspaces": ks} for n, i, ks in stores]})
    elif stores:
        print(_table(["STORE", "ID", "KEYSPACES"], [[n, i, ", ".join(ks)] for n, i, ks in stores]))
    else:
        print("(no stores)")
    return 0


def _kv_create_store(c: KVClientAPI, args: argparse.Namespace) -> int:
    index = c.create_store(args.store)
    _report(args, {"store": args.store, "index": index}, f"created store {args.store} (index {index})")
    return 0


def _kv_drop_store(c: KVClientAPI, args: argparse.Namespace) -> int:
    index = c.drop_store(args.store)
    _report(args, {"store": args.store, "index": index}, f"dropped store {args.store} (index {index})")
    return 0


def _kv_create_keyspace(c: KVClientAPI, args: argparse.Namespace) -> int:
    index = c.create_keyspace(args.store, args.keyspace)
    _report(args, {"store": args.store, "keyspace": args.keyspace, "index": index},
            f"created keyspace {args.store}/{args.keyspace} (index {index})")
    return 0


def _kv_keyspaces(c: KVClientAPI, args: argparse.Namespace) -> int:
    keyspaces = c.list_keyspaces(args.store, stale=args.stale)
    if args.json:
        _print_json({"store": args.store, "keyspaces": keyspaces})
    else:
        for ks in keyspaces:
            print(ks)
    return 0


def _kv_put(c: KVClientAPI, args: argparse.Namespace) -> int:
    key = arg_bytes(args.key)
    index = c.put(args.store, args.keyspace, key, arg_bytes(args.value))
    _report(args, {"key": encode_bytes(key), "version": index}, f"stored {display_bytes(key)} (version {index})")
    return 0


def _kv_get(c: KVClientAPI, args: argparse.Namespace) -> int:
    key = arg_bytes(args.key)
    found = c.get(args.store, args.keyspace, key, stale=args.stale)
    if found is None:
        if args.json:
            _print_json({"key": encode_bytes(key), "found": False})
        raise CLIError(f"key {display_bytes(key)} not found in {args.store}/{args.keyspace}")
    value, version = found
    if args.json:
        _print_json({"key": encode_bytes(key), "found": True, "value": encode_bytes(value), "version": version})
    else:
        print(display_bytes(value))
    return 0


def _kv_delete(c: KVClientAPI, args: argparse.Namespace) -> int:
    key = arg_bytes(args.key)
    index = c.delete(args.store, args.keyspace, key)
    _report(args, {"key": encode_bytes(key), "index": index}, f"deleted {display_bytes(key)} (index {index})")
    return 0


def _kv_scan(c: KVClientAPI, args: argparse.Namespace) -> int:
    """Follow continuation tokens until --limit items (0: no limit) or the end.

    Items are written as they arrive, JSON included, so memory stays bounded by
    one page (SCAN_LIMIT_MAX) however many keys the scan covers.
    """
    out = sys.stdout
    remaining = args.limit
    continuation = b""
    first = True
    if args.json:
        out.write('{"items": [')
    while True:
        page_limit = min(remaining, SCAN_LIMIT_MAX) if args.limit else 0
        items, next_continuation = c.scan(
            args.store, args.keyspace, prefix=arg_bytes(args.prefix), start=arg_bytes(args.start),
            end=arg_bytes(args.end), limit=page_limit, continuation=continuation, stale=args.stale)
        if args.limit:
            items = items[:remaining]
            remaining -= len(items)
        for key, value, version in items:
            if args.json:
                item = {"key": encode_bytes(key), "value": encode_bytes(value), "version": version}
                out.write(("" if first else ", ") + json.dumps(item))
            else:
                out.write(f"{display_bytes(key)}\t{version}\t{display_bytes(value)}\n")
            first = False
        truncated = bool(next_continuation) and bool(args.limit) and remaining == 0
        if not next_continuation or truncated:
            break
        if next_continuation == continuation:
            raise CLIError("the server returned the same scan continuation token twice; stopping")
        continuation = next_continuation
    if args.json:
        out.write(f'], "truncated": {json.dumps(truncated)}}}\n')
    elif truncated:
        print(f"(stopped at --limit {args.limit}; more keys follow)", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if args.json:
        _print_json(obj)
    else:
        print(text)


KVHandler = Callable[[KVClientAPI, argparse.Namespace], int]


def _cmd_kv(args: argparse.Namespace) -> int:
    servers, tok = kv_target(args)
    client = _make_client(servers, tok, args.timeout, args.attempts)
    try:
        handler: KVHandler = args.kv_handler
        return handler(client, args)
    finally:
        client.close()


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with floe's error line: usage, then `floe: error: ...`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"floe: error: {message}\n")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                   help=f"the local cluster's directory (default {DEFAULT_DATA_DIR})")


# name, help, positional arguments, is a read (takes --stale), handler
_KV_COMMANDS: tuple[tuple[str, str, tuple[str, ...], bool, KVHandler], ...] = (
    ("ls", "list stores and their keyspaces", (), True, _kv_ls),
    ("create-store", "create a store", ("store",), False, _kv_create_store),
    ("drop-store", "drop a store and every key in it", ("store",), False, _kv_drop_store),
    ("create-keyspace", "create a keyspace in a store", ("store", "keyspace"), False, _kv_create_keyspace),
    ("keyspaces", "list a store's keyspaces", ("store",), True, _kv_keyspaces),
    ("put", "write a key", ("store", "keyspace", "key", "value"), False, _kv_put),
    ("get", "read a key (exit 1 if it does not exist)", ("store", "keyspace", "key"), True, _kv_get),
    ("delete", "delete a key", ("store", "keyspace", "key"), False, _kv_delete),
    ("scan", "list keys in order, following pages", ("store", "keyspace"), True, _kv_scan),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="floe", description="floe: a Raft-replicated block store.")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = top.add_parser("node", help="run one node of a cluster")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    run = node_sub.add_parser("run", help="run a node in the foreground until SIGTERM or SIGINT")
    run.add_argument("--config", required=True, metavar="FILE", help="the node's TOML config")
    run.set_defaults(func=_cmd_node_run)

    cluster = top.add_parser("cluster", help="a local N-node cluster on 127.0.0.1, 127.0.0.2, ...")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    p = cluster_sub.add_parser("up", help="create (first time) and start the local cluster")
    _add_data_dir(p)
    p.add_argument("--nodes", type=_int_in(1, launcher.NODES_MAX), default=None,
                   help=f"number of nodes (default {DEFAULT_NODES}, or as the existing cluster was created)")
    p.add_argument("--raft-port", type=_int_in(1, 65535), default=None,
                   help=f"Raft port on every node address (default {DEFAULT_RAFT_PORT})")
    p.add_argument("--api-port", type=_int_in(1, 65535), default=None,
                   help=f"KV API port on every node address (default {DEFAULT_API_PORT})")
    p.add_argument("--wait", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="how long to wait for a leader (default 30)")
    p.add_argument("--volume", default="vol0", metavar="NAME",
                   help="create this volume if it does not exist, ready to attach (default vol0; '' for none)")
    p.add_argument("--volume-size", type=volcli.parse_size, default=10 << 30, metavar="SIZE",
                   help="its size when created (default 10G; thin: nothing is allocated until written)")
    p.set_defaults(func=_cmd_cluster_up)
    p = cluster_sub.add_parser("down", help="stop every node (SIGTERM, then SIGKILL after 10 s)")
    _add_data_dir(p)
    p.set_defaults(func=_cmd_cluster_down)
    p = cluster_sub.add_parser("status", help="each node's role, term and indexes")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_cluster_status)
    p = cluster_sub.add_parser("kill", help="send a signal to one node (default SIGKILL)")
    _add_data_dir(p)
    p.add_argument("node", metavar="NODE", help="node id, e.g. n2")
    p.add_argument("--signal", choices=sorted(KILL_SIGNALS), default="KILL", help="signal name (default KILL)")
    p.set_defaults(func=_cmd_cluster_kill)
    p = cluster_sub.add_parser("start", help="start one node and wait until it answers")
    _add_data_dir(p)
    p.add_argument("node", metavar="NODE", help="node id, e.g. n2")
    p.add_argument("--wait", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="how long to wait for it to answer (default 30)")
    p.set_defaults(func=_cmd_cluster_start)

    kv = top.add_parser("kv", help="stores, keyspaces and keys")
    kv_sub = kv.add_subparsers(dest="kv_command", required=True, metavar="ACTION")
    for name, help_text, positionals, is_read, handler in _KV_COMMANDS:
        p = kv_sub.add_parser(name, help=help_text, description=help_text)
        for pos in positionals:
            p.add_argument(pos, metavar=pos.upper())
        if name == "scan":
            p.add_argument("--prefix", default="", help="only keys starting with this")
            p.add_argument("--start", default="", help="first key (inclusive)")
            p.add_argument("--end", default="", help="end key (exclusive)")
            p.add_argument("--limit", type=_int_in(0, 2**63 - 1), default=0, metavar="N",
                           help="stop after N keys (default 0: all)")
        if is_read:
            p.add_argument("--stale", action="store_true",
                           help="read the answering node's local state (may be behind) instead of through Raft")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        target = p.add_mutually_exclusive_group()
        target.add_argument("--data-dir", default=None, metavar="DIR",
                            help=f"use the local cluster in DIR (default {DEFAULT_DATA_DIR})")
        target.add_argument("--server", action="append", type=_server_arg, metavar="HOST:PORT",
                            help=f"a node's API address (repeatable); needs --token or {TOKEN_ENV}")
        p.add_argument("--token", default=None, help="tenant token")
        p.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                       help="give up after this long (default 5)")
        p.add_argument("--attempts", type=_int_in(1, 100), default=60, metavar="N",
                       help="tries across nodes before giving up (default 60; the --timeout deadline bounds the call)")
        p.set_defaults(func=_cmd_kv, kv_handler=handler)

    blobcli.add_parser(top, _server_arg, _positive_float, DEFAULT_DATA_DIR)
    volcli.add_parser(top, _server_arg, _positive_float, DEFAULT_DATA_DIR)

    bench = top.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WORKLOAD")
    p = bench_sub.add_parser("kv", help="KV throughput and latency (bench/kv.py)")
    p.add_argument("--data-dir", default=DEFAULT_BENCH_DATA_DIR, metavar="DIR",
                   help=f"the benchmark cluster's directory (default {DEFAULT_BENCH_DATA_DIR})")
    p.add_argument("--seconds", type=_positive_float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timing", default=None, metavar="FIELD=VALUE,...",
                   help="override Raft timing fields for the in-process rows, e.g. tick_s=0.001,use_batch=false")
    p.add_argument("--sweep", action="store_true",
                   help="only the in-process rows (bare pysyncobj vs floe's Raft layer), for a grid of timings")
    p.set_defaults(func=_cmd_bench_kv)
    p = bench_sub.add_parser("blob", help="object tier put/get throughput vs the disk's floor (bench/blob.py)")
    p.add_argument("--data-dir", default=".floe-bench-blob", metavar="DIR",
                   help="the benchmark cluster's directory (default .floe-bench-blob; wiped first)")
    p.add_argument("--seconds", type=_positive_float, default=8.0, help="length of each phase (default 8)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_bench_blob)
    p = bench_sub.add_parser("volume", help="a volume's write/flush/read performance, in-process (bench/volume.py)")
    p.add_argument("--data-dir", default=".floe-bench-volume", metavar="DIR",
                   help="the benchmark cluster's directory (default .floe-bench-volume; wiped first)")
    p.add_argument("--seconds", type=_positive_float, default=10.0, help="length of each workload (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_bench_volume)
    p = bench_sub.add_parser("iscsi", help="floe vs tgt over iSCSI: iscsi-perf reads, qemu-img bench writes "
                             "(bench/iscsi.py)")
    p.add_argument("--data-dir", default=".floe-bench-iscsi", metavar="DIR",
                   help="the benchmark's directory: floe cluster, tgt backing file (default .floe-bench-iscsi; "
                        "wiped first)")
    p.add_argument("--seconds", type=_positive_float, default=10.0, help="length of each run (default 10)")
    p.add_argument("--size", default="1G", help="volume and tgt LUN size, e.g. 1G, 512M (default 1G)")
    p.add_argument("--png", default="docs/bench-iscsi.png", metavar="PATH",
                   help="bar chart to write (default docs/bench-iscsi.png; '' for none)")
    p.add_argument("--profile", action="store_true",
                   help="run each workload once more on floe under py-spy (the volume owner) and print where the "
                        "time goes")
    p.add_argument("--seed", type=int, default=None, help="seed of the fill image (default random, printed)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_bench_iscsi)
    return parser


# ---------------------------------------------------------------- main


def _error(message: str, code: int) -> int:
    print(f"floe: error: {message}", file=sys.stderr)
    return code


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or (type(e).__doc__ or type(e).__name__).strip().splitlines()[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as e:
        return _error(str(e), 2)
    except KVError as e:
        return _error(_one_line(e), 1)
    except (CLIError, launcher.ClusterError, ConfigError, blobcli.BlobCLIError, volcli.VolumeCLIError,
            PermissionError) as e:
        return _error(str(e), 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`floe kv scan ... | head`): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:
        return _error(str(e) if not e.filename else f"{e.strerror}: {Path(e.filename)}", 1)
    except Exception as e:
        # The object tier's errors (objstore.api.BlobError), without importing it here.
        if any(c.__name__ in ("BlobError", "VolumeError") for c in type(e).__mro__):
            return _error(f"{type(e).__name__}: {_one_line(e)}", 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
