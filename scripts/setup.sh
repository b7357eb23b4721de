#!/usr/bin/env bash
# Idempotent setup: Debian's Fashion-MNIST, a .venv with ffscale and its dependencies.
# CPU machines get the CPU torch wheel pinned; GPU machines (nvidia-smi present) keep pip's CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
# PostgreSQL for the test suite's MLflow server (tests/helpers/mlflow_server.py starts its own cluster in a
# temporary directory; without it those tests fall back to SQLite and say so).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  { $SUDO apt-get install -y -qq postgresql || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq postgresql; }; } \
    >/dev/null 2>&1 || echo "setup: postgresql not installed (the MLflow server tests use SQLite instead)"
fi
# jemalloc for CPU ranks (ffscale/util/hostenv.py); optional: without it CPU steps are a few % slower.
if ! ldconfig -p | grep -q libjemalloc.so; then
  { $SUDO apt-get install -y -qq libjemalloc2 || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libjemalloc2; }; } \
    >/dev/null 2>&1 || echo "setup: libjemalloc2 not installed (optional)"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "torch>=2.4"
  else
    pip install -q "${FFSCALE_CPU_TORCH:-torch==2.13.0}"  # CPU wheel (local disk here)
  fi
fi
extras=${FFSCALE_EXTRAS:-dali,dev}
if ! python -c "import ffscale, deepspeed, mlflow, nvidia.dali" 2>/dev/null || [ pyproject.toml -nt .venv/.ffscale-installed ]; then
  pip install -q -e ".[${extras}]"
  # timm's RandAugment definitions for tests/unit/test_randaug.py; without its dependencies, whose
  # torchvision would replace the CPU torch wheel
  case ",${extras}," in *,dev,*) pip install -q --no-deps "timm>=1.0" ;; esac
  touch .venv/.ffscale-installed
fi
