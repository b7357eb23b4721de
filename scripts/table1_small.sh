#!/usr/bin/env bash
# Table 1 in small, the whole matrix (docs/recipe.md, "Table 1 in small"): the cluttered Fashion-MNIST
# benchmark, then one after another on this host's ranks
#   - FF-only, ViT, attention-only (configs/table1_small.yaml), seeds 0 1 2;
#   - FF distilled from the ViT of its own seed (configs/table1_small_distill.yaml), seeds 0 1 2;
#   - FF without repeated augmentation / drop path / RandAugment (configs/table1_small_recipe.yaml), seeds 0 1 2;
#   - the three families without repeated augmentation and RandAugment (configs/table1_small_lean.yaml), seeds 0 1 2;
#   - the three families with the whole recipe at 12 epochs (configs/table1_small_12ep.yaml), seeds 0 1 2;
#   - FF over 3 epochs alone and taught by the 12-epoch FF of seed 0, a teacher stronger than the
#     student (configs/table1_small_distill_strong.yaml), seeds 0 1 2;
# then the table (mean, spread and each seed's final top-1 per row) and the curves of seed 0.
# Rerunning skips every finished stage and resumes an interrupted one. SEEDS="0" runs one seed;
# NICE (default 10) is the training jobs' niceness on a shared host; extra arguments go to every job.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then  # an active venv with ffscale installed is used as it is
    bash scripts/setup.sh
    . .venv/bin/activate
fi
SEEDS=${SEEDS:-"0 1 2"}
DATA=data/cluttered-fashion-mnist
[ -f $DATA/val/manifest.json ] || ffscale shard cluttered-fashion-mnist --out $DATA

train() {  # a free port each time: another job on this host may hold DeepSpeed's default
    local port
    port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    nice -n "${NICE:-10}" ffscale train --nproc "${NPROC:-2}" --master-port "$port" "$@"
}

for s in $SEEDS; do
    train --config configs/table1_small.yaml run.seed="$s" run.name="table1-small-s$s" "$@"
done
for s in $SEEDS; do
    train --config configs/table1_small_distill.yaml run.seed="$s" run.name="table1-small-distill-s$s" \
        stages.ff_distilled.distill.teacher="runs/table1-small-s$s/vit" "$@"
done
for s in $SEEDS; do
    train --config configs/table1_small_recipe.yaml run.seed="$s" run.name="table1-small-recipe-s$s" "$@"
done
for s in $SEEDS; do
    train --config configs/table1_small_lean.yaml run.seed="$s" run.name="table1-small-lean-s$s" "$@"
done
for s in $SEEDS; do
    train --config configs/table1_small_12ep.yaml run.seed="$s" run.name="table1-small-12ep-s$s" "$@"
done
[ -f runs/table1-small-12ep-s0/ff/DONE ] ||  # the teacher alone where SEEDS left seed 0 out
    train --config configs/table1_small_teacher.yaml run.seed=0 run.name=table1-small-12ep-s0 "$@"
for s in $SEEDS; do
    train --config configs/table1_small_distill_strong.yaml run.seed="$s" run.name="table1-small-strong-s$s" "$@"
done

python - <<'EOF'
import json, re, statistics
from pathlib import Path

rows = {}  # pipeline/stage -> seed -> (final top-1, best top-1); `ffscale compare` shows the best
for done in sorted(Path("runs").glob("table1-small*-s*/*/DONE")):
    m = re.fullmatch(r"table1-small(?:-([\w-]+?))?-s(\d+)", done.parent.parent.name)
    if m is None:  # another run whose name only starts the same way
        continue
    pipeline, seed = m.groups()
    d = json.loads(done.read_text())
    row = f"{pipeline}/{done.parent.name}" if pipeline else done.parent.name  # lean/ff beside ff
    rows.setdefault(row, {})[int(seed)] = (d["last_eval"]["val_top1"], d["best"]["val_top1"])
print(f"{'stage':<24} {'seeds':<5} {'final top-1: mean':>18} {'spread':>7} {'best: mean':>11}  final top-1 by seed")
for stage, by_seed in rows.items():
    final, best = [v[0] for v in by_seed.values()], [v[1] for v in by_seed.values()]
    print(f"{stage:<24} {len(final):<5} {statistics.mean(final):18.2f} {max(final) - min(final):7.2f} "
          f"{statistics.mean(best):11.2f}  " + ", ".join(f"s{k} {v[0]:.2f}" for k, v in sorted(by_seed.items())))
EOF
ffscale compare --filter "tags.\`ffscale.pipeline\` LIKE 'table1-small%-s0' AND tags.\`ffscale.pipeline\` != 'table1-small-lean-s0' \
    AND tags.\`ffscale.pipeline\` != 'table1-small-12ep-s0'" \
    --plot docs/table1-small-curves.png
ffscale compare --filter "tags.\`ffscale.pipeline\` = 'table1-small-lean-s0'" --plot docs/table1-small-lean-curves.png
ffscale compare --filter "tags.\`ffscale.pipeline\` = 'table1-small-12ep-s0'" --plot docs/table1-small-12ep-curves.png
