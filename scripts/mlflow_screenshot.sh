#!/usr/bin/env bash
# Render the MLflow UI's comparison of the stage runs to docs/mlflow-compare.png (headless Chromium).
# Needs Debian's chromium (apt-get install chromium).
# Usage: bash scripts/mlflow_screenshot.sh RUNS_DIR PIPELINE [PIPELINE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
RUNS=${1:?runs dir}
shift
PIPELINES="$*"
PORT=${PORT:-5055}
mlflow server --backend-store-uri "sqlite:///$PWD/$RUNS/mlflow.db" --host 127.0.0.1 --port "$PORT" --workers 1 \
  >/tmp/ffscale-mlflow-ui.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
URL=$(python - "$PORT" "$RUNS" $PIPELINES <<'PY'
import json, os, sys
from mlflow import MlflowClient
port, runs, pipelines = sys.argv[1], sys.argv[2], sys.argv[3:]
c = MlflowClient(f"sqlite:///{os.path.abspath(runs)}/mlflow.db")
exp = c.get_experiment_by_name("ffscale")
ids = []
for p in pipelines:  # the stage runs of these pipelines, as their run directories record them
    ids += json.load(open(os.path.join(runs, p, "mlflow_runs.json")))["stages"].values()
print(f"http://127.0.0.1:{port}/#/compare-runs?runs={json.dumps(list(ids))}&experiments={json.dumps([exp.experiment_id])}")
PY
)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
  --window-size=1600,1100 --virtual-time-budget=15000 --screenshot=docs/mlflow-compare.png "$URL"
echo "docs/mlflow-compare.png <- $URL"
