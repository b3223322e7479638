"""The pure parts of `floe bench iscsi` (bench/iscsi.py): tool command lines, parsing
the tools' output, calibration, the table and ratio, /proc parsing, py-spy summaries.
Nothing here starts a cluster, tgtd or an initiator; the benchmark itself is run by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import iscsi as B

W = {w.name: w for w in B.WORKLOADS}

# iscsi-perf 0.1 as Debian's libiscsi-bin prints it (tgt, 3 s): a status line rewritten
# with '\r' every second, then the final average on its own.
PERF_OUT = (
    "iscsi-perf version 0.1 - (c) 2014-2015 by Peter Lieven <pl@\u0138amp.de>\n\n"
    "connected to iscsi://127.0.0.1:3340/iqn.2026-11.io.floe.bench:tgt/1\n"
    "capacity is 131072 blocks or 67108864 byte (64 MB)\n"
    "performing RANDOM READ with 32 parallel requests\n"
    "FIXED transfer size of 8 blocks (4096 byte)\n"
    "will run for 3 seconds.\n\n"
    "\r00:00:02 - lba 67934, iops current 17132 (66 MB/s), iops average 17132 (66 MB/s), in_flight 32, busy 0  "
    "\r00:00:01 - lba 28497, iops current 19482 (76 MB/s), iops average 18307 (71 MB/s), in_flight 32, busy 0  "
    "\riops average 18268 (71 MB/s)                                   \n\nfinished.\n"
)

QEMU_OUT = (
    "Sending 2000 write requests, 4096 bytes each, 32 in parallel (starting at offset 0, step size 1052672)\n"
    "Sending flush every 64 requests\n"
    "Run completed in 0.376 seconds.\n"
)


def test_iscsi_perf_output_gives_the_final_average_transfer_size_and_mode():
    p = B.parse_iscsi_perf(PERF_OUT)
    assert (p.iops, p.transfer_bytes, p.random) == (18268, 4096, True)


def test_iscsi_perf_cut_short_still_gives_the_last_running_average():
    cut = PERF_OUT[:PERF_OUT.index("\riops average 18268")]
    assert B.parse_iscsi_perf(cut).iops == 18307
    seq = cut.replace("RANDOM", "SEQUENTIAL")
    assert B.parse_iscsi_perf(seq).random is False


@pytest.mark.parametrize("text", ["", "Login Failed. connection refused\n", PERF_OUT.replace("iops average", "x")])
def test_iscsi_perf_output_without_a_measurement_is_an_error(text):
    with pytest.raises(B.ToolOutputError):
        B.parse_iscsi_perf(text)


def test_qemu_img_bench_output():
    q = B.parse_qemu_bench(QEMU_OUT)
    assert (q.count, q.io_bytes, q.depth, q.write, q.seconds) == (2000, 4096, 32, True, 0.376)
    with pytest.raises(B.ToolOutputError):
        B.parse_qemu_bench(QEMU_OUT.replace("Run completed", "Run aborted"))


def test_command_lines_follow_the_workload_table():
    url = "iscsi://h:1/iqn.x/0"
    assert B.iscsi_perf_args(W["randread-4k"], url, 4096, 10) == \
        ["iscsi-perf", "-m", "32", "-b", "1", "-t", "10", "-r", url]
    assert B.iscsi_perf_args(W["seqread-1m"], url, 512, 10) == \
        ["iscsi-perf", "-m", "32", "-b", "2048", "-t", "10", url]
    assert B.qemu_bench_args(W["randwrite-4k"], url, 640) == \
        ["qemu-img", "bench", "-f", "raw", "-w", "-c", "640", "-d", "32", "-s", "4096", "-S", "1052672",
         "--flush-interval=64", f"--pattern={0xA5}", url]
    assert B.qemu_bench_args(W["seqwrite-1m"], url, 32) == \
        ["qemu-img", "bench", "-f", "raw", "-w", "-c", "32", "-d", "8", "-s", "1048576", "--flush-interval=16",
         f"--pattern={0xA5}", url]
    with pytest.raises(ValueError):
        B.qemu_bench_args(W["seqwrite-1m"], url, 33)  # not whole flush intervals
    with pytest.raises(ValueError):
        B.iscsi_perf_args(W["randwrite-4k"], url, 4096, 10)
    with pytest.raises(ValueError):
        B.iscsi_perf_args(W["randread-4k"], url, 8192, 10)


@pytest.mark.parametrize("probe_ops, probe_s, seconds, interval, want", [
    (256, 1.0, 10, 64, 2560),  # 256/s for 10 s
    (256, 1.3, 10, 64, 1984),  # 1969.2 rounded up to a whole interval
    (64, 10.0, 1, 16, 64),  # never fewer than the probe's 4 intervals
    (256, 0.0, 10, 64, 9984),  # a probe that took no time: the cap, in whole intervals
    (256, 0.01, 10, 64, 9984),
])
def test_calibrated_count(probe_ops, probe_s, seconds, interval, want):
    got = B.calibrated_count(probe_ops, probe_s, seconds, interval, count_max=10_000)
    assert got == want and got % interval == 0
    assert B.calibrated_count(probe_ops, probe_s, seconds, interval) <= B.QEMU_BENCH_COUNT_MAX


def test_results_table_ratio_and_units():
    rr = W["randread-4k"]
    sw = W["seqwrite-1m"]
    results = [B.result_from_rate(rr, "floe", 500.0, 10.0), B.result_from_rate(rr, "tgt", 20_000.0, 10.0),
               B.result_from_count(sw, "floe", 320, 8.0), B.result_from_count(sw, "tgt", 1600, 10.0)]
    f = results[2]
    assert f.iops == 40.0 and f.mb_s == pytest.approx(40 * 1048576 / 1e6)  # MB = 10^6 bytes
    assert B.ratio(results[0], results[1]) == 0.025
    table = B.markdown_table(results).splitlines()
    assert table[0] == "| workload | floe IOPS | floe MB/s | tgt IOPS | tgt MB/s | floe/tgt |"
    assert table[2] == "| random 4 KiB reads, 32 in flight | 500 | 2.0 | 20,000 | 81.9 | 0.03 |"
    assert table[3] == "| 1 MiB writes, depth 8, flush every 16 | 40 | 41.9 | 160 | 167.8 | 0.25 |"
    assert len(table) == 4  # workloads without both results are left out
    with pytest.raises(B.ToolOutputError):
        B.result_from_count(sw, "floe", 320, 0.0)


def test_cpu_table_and_proc_parsing():
    # A command name with spaces and a ')' must not shift the fields.
    stat = "1234 (python -m x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 9 0 100 0 0"
    assert B.pid_cpu_ticks(stat) == 300
    assert B.machine_cpu_ticks("cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 1 2 3 4\n") == (161, 981)
    with pytest.raises(ValueError):
        B.machine_cpu_ticks("intr 1 2 3\n")
    r = B.Result("randread-4k", "floe", 1.0, 1.0, 1.0, 0, (("n1", 0.9), ("machine", 1.8)))
    assert B.cpu_table([r], ["n1", "n2", "machine"]).splitlines()[2] == "| randread-4k | floe | 0.90 |  | 1.80 |"


REPO = Path("/srv/floe")
RAW = (
    "<module> (/srv/floe/cluster/cli.py:662);main (/srv/floe/cluster/node.py:155);"
    "Event.wait (/usr/lib/python3.11/threading.py:629) 5\n"
    "Thread.run (/usr/lib/python3.11/threading.py:982);_worker (/usr/lib/python3.11/concurrent/futures/thread.py:83);"
    "BlobCluster._put_to (/srv/floe/objstore/cluster.py:238);"
    "_UnaryUnaryMultiCallable._blocking (/venv/lib/python3.11/site-packages/grpc/_channel.py:1132) 30\n"
    "Thread.run (/usr/lib/python3.11/threading.py:982);"
    "Volume.read_bytes (/srv/floe/blockdev/volume.py:400) 65\n"
    "not a stack line\n"
)


def test_component_of_a_frame():
    assert B.component_of("/srv/floe/objstore/cluster.py", REPO) == "floe:objstore"
    assert B.component_of("/venv/lib/python3.11/site-packages/grpc/_channel.py", REPO) == "grpc"
    assert B.component_of("/usr/lib/python3.11/concurrent/futures/thread.py", REPO) == "stdlib:concurrent"
    assert B.component_of("/usr/lib/python3.11/threading.py", REPO) == "stdlib:threading"
    assert B.component_of("<frozen runpy>", REPO) == "<frozen runpy>"


def test_pyspy_raw_summary_counts_self_time_components_and_time_under_floe_functions():
    p = B.summarise_pyspy_raw(RAW, repo=REPO)
    assert p.samples == 100
    assert p.self_top[0] == ("Volume.read_bytes (blockdev/volume.py)", 65)
    assert ("_UnaryUnaryMultiCallable._blocking (_channel.py)", 30) in p.self_top
    assert dict(p.components) == {"floe:blockdev": 65, "grpc": 30, "stdlib:threading": 5}
    assert dict(p.floe_total_top) == {"Volume.read_bytes (blockdev/volume.py)": 65,
                                      "BlobCluster._put_to (objstore/cluster.py)": 30,
                                      "<module> (cluster/cli.py)": 5, "main (cluster/node.py)": 5}
    text = B.format_profile(p, "n1 (volume owner)", 2.0, 0.75)
    assert text.splitlines()[0] == "  n1 (volume owner): 0.75 cores, GIL held 50% of 2.0 s (100 samples)"
    assert "      65%  Volume.read_bytes (blockdev/volume.py)" in text
    brief = B.format_profile(p, "n2", 2.0, None, top=2, brief=True)
    assert brief == "  n2: GIL held 50% of 2.0 s (100 samples); by component: floe:blockdev 65%, grpc 30%"
