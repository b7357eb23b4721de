#!/usr/bin/env bash
# Set up, lint, and run the test suite (real DeepSpeed, DALI, WebDataset, MLflow; CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check ffscale tests
ruff format --check ffscale tests
exec python -m pytest -q --durations=15 "$@"  # the slowest 15 tests, so a slower suite shows where
