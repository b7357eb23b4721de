#!/usr/bin/env bash
# Idempotent setup: Debian's Fashion-MNIST, a .venv with ffscale and its dependencies.
# CPU machines get the CPU torch wheel pinned; GPU machines (nvidia-smi present) keep pip's CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
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
# Packages install through uv where it can be had (pip installs it into the .venv): it downloads and unpacks
# in parallel, and docs/results/suite.json holds the set-up's time. uv does not read pip's configuration, so
# the indexes, find-links, constraints and certificate pip is configured with are passed on, and uv weighs
# every index's versions as pip does (--index-strategy unsafe-best-match; uv's default takes the first index
# that has a package). Without uv, pip installs. --no-compile for pip: it writes no bytecode for every
# installed file (most are never imported); bytecode is handled below. A flag, not PIP_NO_COMPILE=1, which
# pip reads as --compile (the value becomes the dest `compile`: pip 23.2).
uv_args=(--python "$PWD/.venv/bin/python" --index-strategy unsafe-best-match)
declare -A pip_set=()
while IFS= read -r line; do  # `pip config list`: scope.key='value', environment first, which pip prefers
  key=${line%%=*}; key=${key#*.}; val=${line#*=}; val=${val#\'}; val=${val%\'}
  [ -n "${pip_set[$key]:-}" ] && continue
  pip_set[$key]=1
  case $key in
    index-url) uv_args+=(--index-url "$val") ;;
    extra-index-url) for url in $val; do uv_args+=(--extra-index-url "$url"); done ;;
    find-links) for url in $val; do uv_args+=(--find-links "$url"); done ;;
    constraint) for file in $val; do uv_args+=(--constraint "$file"); done ;;
    cert) export SSL_CERT_FILE=$val ;;
    default-timeout|timeout) export UV_HTTP_TIMEOUT=$val ;;
  esac
done < <(pip config list 2>/dev/null)
[ -x .venv/bin/uv ] || pip install -q --no-compile uv >/dev/null 2>&1 || echo "setup: uv not installed; pip installs"
install() {
  if [ -x .venv/bin/uv ]; then .venv/bin/uv pip install -q "${uv_args[@]}" "$@"; else pip install -q --no-compile "$@"; fi
}
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    install "torch>=2.4"
  else
    install "${FFSCALE_CPU_TORCH:-torch==2.13.0}"  # CPU wheel (local disk here)
  fi
fi
# The extras: dali,dev for the tests (scripts/test.sh), dali alone for the demo (scripts/demo.sh), which needs
# neither the test tools nor PostgreSQL (`ffscale bench demo` times the demo's whole command). A marker
# per set of extras, so the tests after a demo still install theirs.
extras=${FFSCALE_EXTRAS:-dali,dev}
marker=.venv/.ffscale-installed-${extras//,/-}
case ",${extras}," in *,dev,*)
  # PostgreSQL for the test suite's MLflow server (tests/helpers/mlflow_server.py starts its own cluster in a
  # temporary directory; without it those tests fall back to SQLite and say so).
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    { $SUDO apt-get install -y -qq postgresql || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq postgresql; }; } \
      >/dev/null 2>&1 || echo "setup: postgresql not installed (the MLflow server tests use SQLite instead)"
  fi
  # strace counts the shard opens of a real read (tests/integration/test_data.py)
  if ! command -v strace >/dev/null; then
    { $SUDO apt-get install -y -qq strace || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq strace; }; } \
      >/dev/null 2>&1 || echo "setup: strace not installed"
  fi
  # nginx: the remote-shard tests' HTTP server with range requests (tests/helpers/storage.py)
  if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    { $SUDO apt-get install -y -qq nginx || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nginx; }; } \
      >/dev/null 2>&1 || echo "setup: nginx not installed (the remote-shard tests need it)"
  fi
esac
imports="ffscale, deepspeed, mlflow"
case ",${extras}," in *,dali,*) imports="$imports, nvidia.dali" ;; esac
if ! python -c "import $imports" 2>/dev/null || [ ! -f "$marker" ] || [ pyproject.toml -nt "$marker" ]; then
  install -e ".[${extras}]"
  # timm's RandAugment definitions for tests/integration/test_randaug.py; without its dependencies, whose
  # torchvision would replace the CPU torch wheel
  case ",${extras}," in *,dev,*) install --no-deps "timm>=1.0" ;; esac
  touch "$marker"
  rm -f .venv/.ffscale-bytecode
fi
# Bytecode for what the processes import. Machines and images that set PYTHONDONTWRITEBYTECODE=1 (as
# these do, and many containers) never write it, and the installs above write none: without it every
# process (ffscale train, the launcher, each rank) compiles torch, DeepSpeed and MLflow from source at every
# start (docs/results/startup.json holds the time to the first step). Once per install, what a rank
# imports is compiled by importing it (a quarter of the environment's files, before the first job, so
# that its processes do not all compile the same files at once), and the rest of the environment in the
# background at the lowest priority, where it takes only the cores its caller leaves idle (a lock keeps
# it to one at a time). scripts/test.sh and scripts/demo.sh also let their processes write the bytecode
# of what they import first. compileall's errors are files of other Python versions (torch's py312 test
# helpers), which nothing imports.
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -f .venv/.ffscale-bytecode ]; then
  # two processes, one per half of the stack (torch's side, and what imports no torch), so both cores compile
  warm() {
    PYTHONDONTWRITEBYTECODE= python -c '
import importlib, sys

for name in sys.argv[1:]:
    try:  # each on its own: a module another version of a package lacks is skipped
        importlib.import_module(name)
    except Exception:
        pass
' "$@" >/dev/null 2>&1 || true
  }
  warm torch torch.optim torch._dynamo torch._inductor.compile_fx deepspeed deepspeed.runtime.engine \
    ffscale.train ffscale.cli &
  warm mlflow mlflow.store.tracking.sqlalchemy_store nvidia.dali.fn nvidia.dali.plugin.pytorch networkx \
    webdataset omegaconf PIL.Image
  wait
  setsid nice -n 19 bash -c 'flock -n 9 || exit 0; python -m compileall -q -j 0 "$1" >/dev/null 2>&1
    touch .venv/.ffscale-bytecode' compile "$site" 9>.venv/.ffscale-bytecode.lock </dev/null >/dev/null 2>&1 &
fi
python -m compileall -q -j 0 ffscale tests >/dev/null 2>&1 || true
