"""Regenerate the protobuf/gRPC modules from the .proto sources.

Run `python -m proto.gen` from the repository root. `--check` regenerates into
a temporary directory and exits 1 if the committed modules differ (the test
suite runs it, so stale generated code fails CI).
"""

from __future__ import annotations

import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "proto").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}"]
    if protoc.main(args + PROTOS) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "proto").glob("*_pb2*.py*"))


def main(argv: list[str]) -> int:
    if "--check" in argv:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(pathlib.Path(tmp))
            stale = [f.name for f in fresh if not (ROOT / "proto" / f.name).exists()
                     or not filecmp.cmp(f, ROOT / "proto" / f.name, shallow=False)]
            if stale:
                print("stale generated protobuf modules (run `python -m proto.gen`):", ", ".join(stale))
                return 1
            return 0
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(pathlib.Path(tmp)):
            shutil.copyfile(f, ROOT / "proto" / f.name)
            print("wrote", (ROOT / "proto" / f.name).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
