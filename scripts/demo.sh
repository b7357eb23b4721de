#!/usr/bin/env bash
# The main job on the embedded default: shard Fashion-MNIST (real, offline) and train an FF-only
# ViT under the DeepSpeed launcher: one rank per GPU, or 2 CPU ranks when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
FFSCALE_EXTRAS=${FFSCALE_EXTRAS:-dali} bash scripts/setup.sh  # without the test tools
. .venv/bin/activate
export PYTHONDONTWRITEBYTECODE=  # the launcher and the ranks write the bytecode they import (scripts/setup.sh)
[ -f data/fashion-mnist/val/manifest.json ] || ffscale shard fashion-mnist --out data/fashion-mnist --shard-size 2000
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
exec ffscale train --nproc "${NPROC:-$([ "$ngpu" -gt 0 ] && echo "$ngpu" || echo 2)}" --config configs/demo.yaml "$@"
