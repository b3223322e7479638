"""The committed protobuf modules match proto/*.proto (run `make proto` after editing a .proto)."""

from __future__ import annotations

from proto import gen


def test_generated_modules_are_fresh(capsys):
    assert gen.main(["--check"]) == 0, capsys.readouterr().out
