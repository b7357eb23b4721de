#!/usr/bin/env bash
# Set up, lint, and run the test suite (real DeepSpeed, DALI, WebDataset, MLflow; CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Each process writes the bytecode of what it imports first, and the suite's later processes read it
# (scripts/setup.sh says why bytecode matters here).
export PYTHONDONTWRITEBYTECODE=
ruff check ffscale tests
ruff format --check ffscale tests
# Two workers, each taking whole test files (--dist loadfile: a module's scenario fixtures run once),
# the longest files first (tests/conftest.py). A launch leaves a core idle for much of its life (one
# process imports and spawns, ranks wait on each other, servers start, timeouts run out), which the
# other worker's files fill. The slowest 15 tests are printed, so a slower suite shows where.
exec python -m pytest -q -n "${FFSCALE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
