"""Node config, the local-cluster layout, stale pid files and the `floe` CLI, without a running cluster.

The CLI's output tests put a scripted stand-in for KVClient behind
`cluster.cli._make_client`; the one test that talks to a real KVClient points
it at an address where nothing listens.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from cluster import cli, launcher
from cluster.config import ConfigError, NodeConfig, Peer, RaftTiming, Tenant, load, parse
from kv.errors import NotFound

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = 'node_id = "n1"\ndata_dir = "/var/lib/floe/n1"\n'


# ---------------------------------------------------------------- config


def _full_config() -> NodeConfig:
    return NodeConfig(
        node_id="n2",
        data_dir="/srv/floe/n2",
        host="10.0.0.2",
        raft_port=7101,
        api_port=7201,
        peers=(Peer("n1", "10.0.0.1", 7101, 7201), Peer("n3", "10.0.0.3", 7101, 7201)),
        tenants=(Tenant("default", "t0k"), Tenant("other", "t1k")),
        raft=RaftTiming(tick_s=0.002, use_batch=True, election_min_s=0.5, election_max_s=1.5,
                        compaction_min_entries=1000),
        log_level="DEBUG",
    )


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = _full_config()
    assert parse(cfg.to_toml()) == cfg
    cfg.write(tmp_path / "node.toml")
    assert load(tmp_path / "node.toml") == cfg


def test_config_defaults_fill_everything_but_identity() -> None:
    cfg = parse(MINIMAL)
    assert (cfg.host, cfg.raft_port, cfg.api_port, cfg.peers, cfg.raft) == ("127.0.0.1", 7100, 7200, (), RaftTiming())
    assert [p.id for p in cfg.all_peers()] == ["n1"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('data_dir = "/x"\n', "node_id"),
        ('node_id = "n1"\n', "data_dir"),
        (MINIMAL + '[[peers]]\nid = "n1"\nhost = "h"\nraft_port = 1\napi_port = 2\n', "duplicate node ids"),
        (MINIMAL + '[[peers]]\nid = "n2"\nhost = "a"\nraft_port = 1\napi_port = 2\n'
                   '[[peers]]\nid = "n2"\nhost = "b"\nraft_port = 1\napi_port = 2\n', "duplicate node ids"),
        (MINIMAL + '[[peers]]\nid = "n2"\nhost = "a"\n', "raft_port"),
        (MINIMAL + "[raft]\nelection_min_s = 0.8\nelection_max_s = 0.4\n", "election_min_s"),
        (MINIMAL + "[raft]\nelection_min_s = 0.8\nelection_max_s = 0.8\n", "election_min_s"),
        (MINIMAL + "[raft]\nelection_min_s = 0.1\nappend_entries_period_s = 0.05\n", "3 x append_entries_period_s"),
        (MINIMAL + '[raft]\nelection_min_s = "fast"\n', "raft.election_min_s must be of type float"),
        (MINIMAL + '[raft]\nuse_batch = "no"\n', "raft.use_batch must be of type bool"),
        (MINIMAL + "[raft]\ncompaction_min_entries = 1.5\n", "raft.compaction_min_entries must be of type int"),
        (MINIMAL + "[raft]\ntick_s = -0.001\n", "raft.tick_s must be > 0"),
        (MINIMAL + "[raft]\ntick_ms = 1\n", "unknown [raft] keys: ['tick_ms']"),
        (MINIMAL + 'raft_port = "seventy"\n', "bad value"),
        ("node_id = \n", "invalid TOML"),
    ],
    ids=["missing node_id", "missing data_dir", "peer has own id", "two peers share an id", "peer missing port",
         "election min above max", "election min equals max", "election within 3 heartbeats",
         "timing is a string", "use_batch is a string", "int field is a float", "negative tick",
         "unknown raft key", "port not a number", "broken toml"],
)
def test_config_errors_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert fragment in str(e.value)


def test_config_error_is_a_value_error() -> None:
    # Callers that catch ValueError for bad input keep working.
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- layout


def test_layout_writes_one_config_per_node_on_its_own_address(tmp_path: Path) -> None:
    layout = launcher.write_layout(tmp_path / "c", nodes=3, base_raft_port=7100, base_api_port=7200)
    root = (tmp_path / "c").resolve()
    configs = [load(root / f"n{i}" / "node.toml") for i in (1, 2, 3)]
    assert [c.node_id for c in configs] == ["n1", "n2", "n3"]
    assert [c.host for c in configs] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert {(c.raft_port, c.api_port) for c in configs} == {(7100, 7200)}
    for c in configs:
        assert sorted(p.id for p in c.peers) == sorted({"n1", "n2", "n3"} - {c.node_id})
        assert {p.api_address for p in c.peers} == {n.api_address for n in layout.nodes if n.id != c.node_id}
        assert c.data_dir == str(root / c.node_id / "data")
        assert Path(c.data_dir).is_dir()
    tokens = {t.token for c in configs for t in c.tenants}
    assert tokens == {layout.token} and [t.name for t in configs[0].tenants] == ["default"]
    assert len(layout.token) == 32 and int(layout.token, 16) >= 0  # secrets.token_hex(16)
    assert launcher.token(root) == layout.token
    assert launcher.servers(root) == ["127.0.0.1:7200", "127.0.0.2:7200", "127.0.0.3:7200"]
    # The files hold the token: owner-only.
    for path in [root / "cluster.toml", *(root / f"n{i}" / "node.toml" for i in (1, 2, 3))]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_layout_is_reused_not_rewritten(tmp_path: Path) -> None:
    first = launcher.ensure_layout(tmp_path, 3, 7100, 7200)
    (tmp_path / "n2" / "node.toml").unlink()  # a lost node file is written again from cluster.toml
    again = launcher.ensure_layout(tmp_path, 3, 7100, 7200)
    assert again == first
    assert load(tmp_path / "n2" / "node.toml") == first.node_config(first.node("n2"))


@pytest.mark.parametrize("asked", [(5, 7100, 7200), (3, 7300, 7200), (3, 7100, 7400)],
                         ids=["other node count", "other raft port", "other api port"])
def test_layout_refuses_a_mismatched_reuse(tmp_path: Path, asked: tuple[int, int, int]) -> None:
    launcher.write_layout(tmp_path, 3, 7100, 7200)
    with pytest.raises(launcher.ClusterError, match="holds a 3-node cluster"):
        launcher.ensure_layout(tmp_path, *asked)


@pytest.mark.parametrize("nodes", [0, launcher.NODES_MAX + 1])
def test_layout_bounds_node_count(tmp_path: Path, nodes: int) -> None:
    with pytest.raises(launcher.ClusterError, match="--nodes must be between"):
        launcher.write_layout(tmp_path, nodes)


def test_no_cluster_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(launcher.ClusterError, match="floe cluster up --data-dir"):
        launcher.load_layout(tmp_path)


def test_unknown_node_lists_the_known_ones(tmp_path: Path) -> None:
    launcher.write_layout(tmp_path, 2)
    with pytest.raises(launcher.ClusterError, match=r"no node 'n9'.*n1, n2"):
        launcher.kill(tmp_path, "n9")


def test_log_tail_shows_only_the_latest_run(tmp_path: Path) -> None:
    layout = launcher.write_layout(tmp_path, 1)
    node = layout.nodes[0]
    node.log_path.write_text("event=launcher_start node=n1\nold run\nevent=launcher_start node=n1\nnew run\n")
    assert launcher.log_tail(node) == ["event=launcher_start node=n1", "new run"]


# ---------------------------------------------------------------- stale pid files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pid_file_states_that_count_as_down(tmp_path: Path) -> None:
    node = launcher.write_layout(tmp_path, 1).nodes[0]
    assert launcher.running_pid(node) is None  # no pid file
    for content in ["", "garbage\n", "-5\n", f"{_dead_pid()}\n", f"{os.getpid()}\n"]:
        # empty, not a number, not a pid, a process that exited, a live process that is not this node
        node.pid_path.write_text(content)
        assert launcher.running_pid(node) is None, content


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to read a process's command line")
def test_pid_file_of_a_live_node_process_counts_as_running(tmp_path: Path) -> None:
    node = launcher.write_layout(tmp_path, 1).nodes[0]
    # Anything whose command line names the node's config file is that node.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--config", str(node.config_path)])
    try:
        node.pid_path.write_text(f"{proc.pid}\n")
        assert launcher.running_pid(node) == proc.pid
        other = launcher.write_layout(tmp_path / "other", 1).nodes[0]
        other.pid_path.write_text(f"{proc.pid}\n")  # same pid, another cluster's config: not that node
        assert launcher.running_pid(other) is None
    finally:
        proc.kill()
        proc.wait()
    assert launcher.running_pid(node) is None


def test_status_and_down_treat_stale_pid_files_as_down(tmp_path: Path) -> None:
    layout = launcher.write_layout(tmp_path, 3)
    layout.nodes[0].pid_path.write_text(f"{_dead_pid()}\n")
    layout.nodes[1].pid_path.write_text(f"{os.getpid()}\n")
    rows = launcher.status(tmp_path)
    assert [tuple(r) for r in rows] == [launcher.STATUS_KEYS] * 3
    assert launcher.STATUS_KEYS == ("id", "pid", "address", "role", "term", "commit_index", "applied_index",
                                    "healthy", "raft_address")
    assert [(r["id"], r["pid"], r["role"], r["healthy"], r["term"]) for r in rows] == [
        (n, None, "down", False, None) for n in ("n1", "n2", "n3")]
    assert rows[1]["address"] == "127.0.0.2:7200" and rows[1]["raft_address"] == "127.0.0.2:7100"
    with pytest.raises(launcher.ClusterError, match="n1 is not running"):
        launcher.kill(tmp_path, "n1")
    assert launcher.down(tmp_path) == []
    assert not any(n.pid_path.exists() for n in layout.nodes)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def test_up_fails_fast_naming_the_node_that_exited_with_its_log(tmp_path: Path) -> None:
    # Every node gets a broken config, so each process exits at once: no cluster runs.
    raft_port, api_port = _free_port(), _free_port()
    layout = launcher.write_layout(tmp_path, 3, raft_port, api_port)
    for node in layout.nodes:
        node.config_path.write_text("node_id = \n")
    with pytest.raises(launcher.ClusterError) as e:
        launcher.up(tmp_path, 3, raft_port, api_port, wait_s=20)
    message = str(e.value)
    assert "exited while starting" in message and "exited with code 1" in message
    assert "invalid TOML" in message  # the tail of the node's log
    assert all(n.id in message for n in layout.nodes)
    launcher.down(tmp_path)


# ---------------------------------------------------------------- CLI parsing


def test_parser_reads_each_command_group() -> None:
    p = cli.build_parser()
    a = p.parse_args(["node", "run", "--config", "n1.toml"])
    assert (a.func, a.config) == (cli._cmd_node_run, "n1.toml")
    a = p.parse_args(["cluster", "up"])
    assert (a.data_dir, a.nodes, a.wait) == (".floe", None, 30.0)
    a = p.parse_args(["cluster", "status", "--json", "--data-dir", "/d"])
    assert (a.func, a.json, a.data_dir) == (cli._cmd_cluster_status, True, "/d")
    a = p.parse_args(["cluster", "kill", "n2", "--signal", "STOP"])
    assert (a.node, a.signal) == ("n2", "STOP")
    a = p.parse_args(["kv", "put", "s", "ks", "k", "v", "--server", "h:1", "--server", "h:2", "--token", "t"])
    assert (a.store, a.keyspace, a.key, a.value, a.server, a.token) == ("s", "ks", "k", "v", ["h:1", "h:2"], "t")
    a = p.parse_args(["kv", "scan", "s", "ks", "--prefix", "p", "--limit", "5", "--stale", "--json"])
    assert (a.prefix, a.start, a.end, a.limit, a.stale, a.json, a.data_dir) == ("p", "", "", 5, True, True, None)
    a = p.parse_args(["bench", "kv"])
    assert (a.data_dir, a.seconds, a.json) == (".floe-bench", 10.0, False)


@pytest.mark.parametrize(
    "argv",
    [[], ["cluster"], ["kv", "get", "s", "ks"], ["kv", "put", "s", "ks", "k", "v", "--stale"],
     ["kv", "ls", "--server", "nohost"], ["kv", "ls", "--server", "h:1", "--data-dir", "d"],
     ["kv", "scan", "s", "ks", "--limit", "-1"], ["cluster", "up", "--nodes", "0"],
     ["cluster", "kill", "n1", "--signal", "HUP"], ["node", "run"]],
    ids=["no command", "no action", "missing key", "stale on a write", "server without port",
         "server and data dir", "negative limit", "zero nodes", "unsupported signal", "node without config"],
)
def test_usage_errors_exit_2_with_floe_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("floe: error: ") and "Traceback" not in err


def test_server_without_token_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    assert cli.main(["kv", "ls", "--server", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err == f"floe: error: --server needs --token TOKEN or {cli.TOKEN_ENV} in the environment\n"


def test_kv_target_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = launcher.write_layout(tmp_path, 2)
    p = cli.build_parser()
    monkeypatch.setenv(cli.TOKEN_ENV, "from-env")
    assert cli.kv_target(p.parse_args(["kv", "ls", "--server", "h:1"])) == (["h:1"], "from-env")
    assert cli.kv_target(p.parse_args(["kv", "ls", "--server", "h:1", "--token", "t"])) == (["h:1"], "t")
    # The local cluster's own token wins over the environment; --token wins over both.
    local = ["127.0.0.1:7200", "127.0.0.2:7200"]
    assert cli.kv_target(p.parse_args(["kv", "ls", "--data-dir", str(tmp_path)])) == (local, layout.token)
    assert cli.kv_target(p.parse_args(["kv", "ls", "--data-dir", str(tmp_path), "--token", "t"])) == (local, "t")


# ---------------------------------------------------------------- bytes in JSON and on screen


@pytest.mark.parametrize(
    ("data", "as_json", "shown"),
    [
        (b"", "", ""),
        (b"hello", "hello", "hello"),
        ("h\u00e9llo \u2603".encode(), "h\u00e9llo \u2603", "h\u00e9llo \u2603"),
        (b"two\nlines", "two\nlines", '"two\\nlines"'),
        (b"\xff\x00", {"base64": "/wA="}, "base64:/wA="),
        (b"\xc3", {"base64": "ww=="}, "base64:ww=="),  # a truncated UTF-8 sequence
    ],
    ids=["empty", "ascii", "non-ascii utf-8", "control characters", "not utf-8", "truncated utf-8"],
)
def test_bytes_encoding(data: bytes, as_json: Any, shown: str) -> None:
    assert cli.encode_bytes(data) == as_json
    assert cli.display_bytes(data) == shown
    assert json.loads(json.dumps(cli.encode_bytes(data))) == as_json


def test_argv_bytes_that_are_not_utf8_survive() -> None:
    # Python hands such argv over surrogate-escaped; the key must be the original bytes.
    arg = b"k\xff".decode("utf-8", "surrogateescape")
    assert cli.arg_bytes(arg) == b"k\xff"


# ---------------------------------------------------------------- CLI output, scripted client


class ScriptedClient:
    """Stands in for KVClient: serves a sorted key list in pages of `page` items."""

    def __init__(self, items: list[tuple[bytes, bytes, int]], page: int = 2) -> None:
        self.items = items
        self.page = page
        self.scans: list[dict[str, Any]] = []
        self.closed = False

    def get(self, store: str, keyspace: str, key: bytes, *, stale: bool = False) -> tuple[bytes, int] | None:
        if store != "s":
            raise NotFound(f"store {store!r} does not exist")
        return next(((v, ver) for k, v, ver in self.items if k == key), None)

    def scan(self, store: str, keyspace: str, *, prefix: bytes = b"", start: bytes = b"", end: bytes = b"",
             limit: int = 0, continuation: bytes = b"", stale: bool = False
             ) -> tuple[list[tuple[bytes, bytes, int]], bytes]:
        self.scans.append({"limit": limit, "continuation": continuation, "prefix": prefix, "stale": stale})
        at = int(continuation or b"0")
        n = min(self.page, limit or self.page)
        chunk = [i for i in self.items if i[0].startswith(prefix)][at:at + n]
        more = at + n < len([i for i in self.items if i[0].startswith(prefix)])
        return chunk, (str(at + n).encode() if more else b"")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> ScriptedClient:
    client = ScriptedClient([(b"a1", b"x", 3), (b"a2", b"\xff\xfe", 4), (b"b1", b"y", 5), (b"b\x80", b"z", 6),
                             (b"c1", b"w", 7)])
    monkeypatch.setattr(cli, "_make_client", lambda servers, token, timeout_s, attempts: client)
    return client


SERVER = ["--server", "127.0.0.1:1", "--token", "t"]


def test_get_json_shows_non_utf8_value_as_base64(scripted: ScriptedClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kv", "get", "s", "ks", "a2", "--json", *SERVER]) == 0
    assert json.loads(capsys.readouterr().out) == {"key": "a2", "found": True, "value": {"base64": "//4="},
                                                   "version": 4}
    assert scripted.closed


def test_get_missing_key_exits_1(scripted: ScriptedClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kv", "get", "s", "ks", "zz", "--json", *SERVER]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"key": "zz", "found": False}
    assert err == "floe: error: key zz not found in s/ks\n"


def test_kv_error_prints_its_message_without_traceback(scripted: ScriptedClient,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kv", "get", "nostore", "ks", "k", *SERVER]) == 1
    assert capsys.readouterr().err == "floe: error: store 'nostore' does not exist\n"


def test_scan_follows_continuations_to_the_end(scripted: ScriptedClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kv", "scan", "s", "ks", "--json", "--stale", *SERVER]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [i["key"] for i in doc["items"]] == ["a1", "a2", "b1", {"base64": "YoA="}, "c1"]
    assert doc["items"][1] == {"key": "a2", "value": {"base64": "//4="}, "version": 4}
    assert doc["truncated"] is False
    assert [s["continuation"] for s in scripted.scans] == [b"", b"2", b"4"]
    assert all(s["limit"] == 0 and s["stale"] for s in scripted.scans)


def test_scan_stops_at_limit_and_says_so(scripted: ScriptedClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kv", "scan", "s", "ks", "--limit", "3", *SERVER]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["a1\t3\tx", "a2\t4\tbase64://4=", "b1\t5\ty"]
    assert "stopped at --limit 3" in err
    assert [s["limit"] for s in scripted.scans] == [3, 1]


def test_scan_with_prefix_json_not_truncated_at_exact_end(scripted: ScriptedClient,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kv", "scan", "s", "ks", "--prefix", "b", "--limit", "2", "--json", *SERVER]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [i["key"] for i in doc["items"]] == ["b1", {"base64": "YoA="}] and doc["truncated"] is False


def test_scan_refuses_a_continuation_that_does_not_advance(scripted: ScriptedClient, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(scripted, "scan", lambda *a, **kw: ([], b"same"))
    assert cli.main(["kv", "scan", "s", "ks", *SERVER]) == 1
    assert "same scan continuation token twice" in capsys.readouterr().err


def test_cluster_status_json_has_exactly_the_documented_keys(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    launcher.write_layout(tmp_path, 2)
    assert cli.main(["cluster", "status", "--json", "--data-dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == ["nodes"]
    assert [set(n) for n in doc["nodes"]] == [{"id", "pid", "address", "role", "term", "commit_index",
                                               "applied_index", "healthy", "raft_address", "blobs"}] * 2
    assert doc["nodes"][0]["role"] == "down" and doc["nodes"][0]["pid"] is None
    assert doc["nodes"][0]["blobs"] is None  # a down node has no blob stats


def test_cluster_command_without_cluster_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cluster", "down", "--data-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"floe: error: no local cluster in {tmp_path.resolve()}")


def test_bench_and_node_are_wired_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def bench_main(args: Any) -> int:
        seen["bench"] = args
        return 0

    def node_main(path: str) -> int:
        seen["node"] = path
        return 7

    bench = types.ModuleType("bench.kv")
    bench.main = bench_main  # type: ignore[attr-defined]
    node = types.ModuleType("cluster.node")
    node.main = node_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.kv", bench)
    monkeypatch.setitem(sys.modules, "cluster.node", node)
    assert cli.main(["bench", "kv", "--seconds", "2.5", "--json"]) == 0
    assert (seen["bench"].data_dir, seen["bench"].seconds, seen["bench"].json) == (".floe-bench", 2.5, True)
    assert cli.main(["node", "run", "--config", "x.toml"]) == 7 and seen["node"] == "x.toml"


# ---------------------------------------------------------------- the real client, nothing listening


@pytest.mark.skipif(not (ROOT / "kv" / "client.py").exists(), reason="kv/client.py (KVClient) is not written yet")
def test_kv_get_against_unreachable_server_exits_1_with_one_line() -> None:
    port = _free_port()  # bound and released: nothing listens there
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "kv", "get", "s", "ks", "k", "--server", f"127.0.0.1:{port}",
         "--token", "t", "--timeout", "1", "--attempts", "2"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("floe: error: "), proc.stderr
    assert f"127.0.0.1:{port}" in lines[0]


def test_signal_names_cover_pause_and_resume() -> None:
    assert cli.KILL_SIGNALS["STOP"] == signal.SIGSTOP and cli.KILL_SIGNALS["CONT"] == signal.SIGCONT


@pytest.mark.parametrize("blob, message", [
    ("w = 4", "blob.w must be between 1 and blob.r"),
    ("r = 2\nw = 3", "blob.w must be between 1 and blob.r"),
    ("hedge_after_s = -1", "non-negative"),
    ("bogus = 1", "unknown [blob] key"),
    ("compact_dead_fraction = 1.5", "compact_dead_fraction"),
    ("repair_bytes_per_s = 1.5", "non-negative int"),
])
def test_blob_section_is_checked(blob: str, message: str) -> None:
    from cluster.config import ConfigError, parse

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(f'node_id = "n1"\ndata_dir = "/d"\n[blob]\n{blob}\n')


@pytest.mark.parametrize("volume, message", [
    ("max_dirty_segments = 300", "volume.max_dirty_segments must be in [1, 250]"),
    ("max_dirty_segments = 0", "volume.max_dirty_segments must be in [1, 250]"),
    ("soft_threshold_pct = 120.0", "volume.soft_threshold_pct"),
    ("lease_s = 0", "volume.lease_s must be positive"),
    ("high_water_bytes = 1.5", "non-negative int"),
    ("bogus = 1", "unknown [volume] key"),
])
def test_volume_section_is_checked(volume: str, message: str) -> None:
    from cluster.config import ConfigError, parse

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(f'node_id = "n1"\ndata_dir = "/d"\n[volume]\n{volume}\n')


def test_volume_section_round_trips() -> None:
    from cluster.config import parse

    cfg = parse('node_id = "n1"\ndata_dir = "/d"\n[volume]\nsoft_threshold_pct = 90\n'
                'pool_hard_limit_bytes = 1099511627776\n')
    assert cfg.volume.soft_threshold_pct == 90.0 and cfg.volume.pool_hard_limit_bytes == 1 << 40
    assert parse(cfg.to_toml()) == cfg


def test_volume_settings_are_volume_parameters_with_the_same_defaults() -> None:
    # The node opens volumes with Volume(..., **asdict(cfg.volume)).
    import dataclasses
    import inspect

    from blockdev.volume import Volume
    from cluster.config import VolumeSettings

    params = inspect.signature(Volume).parameters
    for f in dataclasses.fields(VolumeSettings):
        assert f.name in params, f.name
        assert params[f.name].default == f.default, f.name


def test_blob_addresses_default_to_api_port_plus_500() -> None:
    from cluster.config import parse

    cfg = parse('node_id = "n1"\ndata_dir = "/d"\napi_port = 7220\n'
                '[[peers]]\nid = "n2"\nhost = "127.0.0.2"\nraft_port = 1\napi_port = 7220\n'
                '[[peers]]\nid = "n3"\nhost = "127.0.0.3"\nraft_port = 1\napi_port = 7220\nblob_port = 9000\n')
    assert cfg.blob_address == "127.0.0.1:7720"
    assert [p.blob_address for p in cfg.peers] == ["127.0.0.2:7720", "127.0.0.3:9000"]
