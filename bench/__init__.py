"""Benchmarks: `floe bench kv` (bench/kv.py) and its Raft-only worker process (bench/raftbench.py)."""
