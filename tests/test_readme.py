"""The README's examples stay true: its node config parses as a NodeConfig."""

from __future__ import annotations

import pathlib
import re

from cluster.config import parse

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_config_example_parses():
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no TOML example"
    for block in blocks:
        cfg = parse(block)
        assert cfg.peers and cfg.tenants and cfg.raft_secret
