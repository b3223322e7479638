# The two set-up commands of the README, and the checks CI runs.
PY ?= python3

.PHONY: deps up down test lint proto

deps:
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'

# Start a local three-node cluster on 127.0.0.1-3 with its data in .floe/.
up: deps
	$(PY) -m cluster.cli cluster up --nodes 3 --data-dir .floe

down:
	$(PY) -m cluster.cli cluster down --data-dir .floe

lint:
	$(PY) -m ruff check .
	$(PY) -m mypy kv objstore blockdev iscsi cluster chaos bench proto/gen.py
	# The pure cores (no I/O of their own) are held to --strict.
	$(PY) -m mypy --strict kv/state.py kv/journal.py kv/limits.py kv/errors.py chaos/linearizability.py chaos/history.py \
		objstore/api.py objstore/placement.py objstore/pack.py objstore/hints.py \
		blockdev/extents.py blockdev/wbuffer.py blockdev/errors.py iscsi/

proto:
	$(PY) -m proto.gen

# Everything CI runs: lint, type checks, the whole test suite.
test: deps lint
	$(PY) -m pytest -q -ra
