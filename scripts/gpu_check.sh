#!/usr/bin/env bash
# The GPU proof (docs/performance.md, "GPU"): on one GPU, in under 8 minutes, every figure into $OUT.
#   bash scripts/gpu_check.sh                    # on a GPU host where `python -m ffscale.cli` imports
#   GPU_CHECK_SMALL=1 bash scripts/gpu_check.sh  # the same steps, small, on a CPU host (plumbing)
# Needs Fashion-MNIST's t10k IDX files (Debian's dataset-fashion-mnist, or FFSCALE_FASHION_MNIST_DIR)
# to write the ImageNet-like JPEG shards. Steps that fail are recorded and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
ff() { "$PY" -m ffscale.cli "$@"; }

if [ "${GPU_CHECK_SMALL:-0}" = 1 ]; then
  IMAGES=256 WORKERS=2 BATCH=16 DALI_BATCH=64 MODEL=configs/demo.yaml SIZE=28 PATCH=7 MB=32 ZEROS=2 STEPS=2 COMPILE=0 EPOCHS=4
else
  IMAGES=3000 WORKERS=8 BATCH=64 DALI_BATCH=512 MODEL=configs/ff_base.yaml SIZE=224 PATCH=16 MB=128 ZEROS=1,2,3 STEPS=10 COMPILE=1 EPOCHS=2
fi
SHARDS=data/bench-imagenet-like-$IMAGES
: > "$OUT/steps.jsonl"

step() {  # step NAME command...: its output in $OUT/NAME.log, its exit code and time in steps.jsonl
  local name=$1 t0 rc
  shift
  echo "== $name"
  t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" | tee -a "$OUT/steps.jsonl"
}

# 1. ImageNet-like shards; DALI (mixed decode on the GPU) against the webdataset loader on them
step bench_data ff bench data --shards "$SHARDS" --images "$IMAGES" --workers "$WORKERS" --batch "$BATCH" \
  --dali-batch "$DALI_BATCH" --rounds 2 --json
# 1b. the feed per GPU: the loaders' reads alone (no decode: the feed's ceiling) beside decode +
#     RandAugment (DALI: mixed decode and RandAugment on the device), one rank on one GPU, so its img/s
#     are per GPU; summarised into $OUT/feed.json. DALI must be installed: without it the step fails.
step feed ff bench data --shards "$SHARDS" --images "$IMAGES" --workers "$WORKERS" --batch "$BATCH" \
  --dali-batch "$DALI_BATCH" --rounds 1 --require-dali --json
# 2. the preflight on those shards, tracking off
step doctor ff doctor --config "$MODEL" "data.train=$SHARDS" "data.val=$SHARDS" "data.img_size=$SIZE" \
  tracking.enabled=false "run.dir=$OUT/runs" --json "$OUT/doctor.json" --burst-steps 3
# 3. the training step against plain PyTorch per ZeRO stage (bf16 is `auto` on a GPU), eager and compiled
step bench_train ff bench train --config "$MODEL" --nproc 1 --zero "$ZEROS" --steps "$STEPS" --warmup 3 \
  --rounds 2 "optim.micro_batch=$MB" "data.img_size=$SIZE" tracking.enabled=false --json
if [ "$COMPILE" = 1 ]; then
  step bench_train_compiled ff bench train --config "$MODEL" --nproc 1 --zero 2 --steps "$STEPS" --warmup 3 \
    --rounds 2 "optim.micro_batch=$MB" model.compile=true tracking.enabled=false --json
fi
# 4. end to end on the JPEG shards: a NaN step skipped, a checkpoint, a stop, a resume to the end
E2E=(--config configs/ff_tiny.yaml "data.train=$SHARDS" "data.val=$SHARDS" "data.img_size=$SIZE" "model.patch_size=$PATCH"
  "run.dir=$OUT/runs" run.name=e2e tracking.enabled=false optim.global_batch=64 "schedule.epochs=$EPOCHS"
  schedule.warmup_epochs=0.2 optim.nonfinite=skip checkpoint.every_steps=5 run.log_every=5)
launch() { "$PY" -c 'from deepspeed.launcher.runner import main; main()' -q --num_gpus 1 --master_port 29511 "$@"; }
FFSCALE_FAULT_NAN_STEPS=3 step e2e_stop launch tests/entries/nan_train.py "${E2E[@]}" schedule.stop_at_step=6
step e2e_resume launch ffscale/train.py "${E2E[@]}"
# 5. the same shards through two decode paths: labels identical, pixel differences
step decode_check ff bench decode "$SHARDS" --img-size "$SIZE" --images 1000
# 6. optional: Table 1 from the paper's released weights. PAPER_CHECKPOINTS: a folder holding
#    linear-tiny-checkpoint.pth and linear-base-checkpoint.pth; IMAGENET_VAL: val shards
#    (`ffscale shard imagenet`). The paper's README gives 61.4% and 74.9% top-1.
if [ -n "${PAPER_CHECKPOINTS:-}" ] && [ -n "${IMAGENET_VAL:-}" ]; then
  for size in tiny base; do
    step "paper_${size}_import" ff import "$PAPER_CHECKPOINTS/linear-$size-checkpoint.pth" --out "$OUT/paper-$size" \
      "data.val=$IMAGENET_VAL" data.workers="$WORKERS"
    step "paper_${size}_eval" ff eval --run "$OUT/paper-$size" --json
  done
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def last_json(name):
    text = (out / f"{name}.log").read_text() if (out / f"{name}.log").is_file() else ""
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except ValueError:
        return None
lines = ["# GPU check", ""]
for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines()):
    lines.append(f"- {s['step']}: {'ok' if s['rc'] == 0 else 'FAILED rc ' + str(s['rc'])} ({s['seconds']} s)")
data = last_json("bench_data")
if data:
    lines += ["", f"bench data: webdataset {data['webdataset']['img_per_s']:,.0f} img/s, "
              f"DALI ({data.get('dali', {}).get('device')}) {data.get('dali', {}).get('img_per_s', 0):,.0f} img/s"]
feed = last_json("feed")
if feed:  # one rank on one device: its img/s are per GPU (per CPU rank on a CPU host)
    per = {k: {"device": feed[k]["device"], "feed_img_per_s": feed[k]["feed_img_per_s"],
               "decode_augment_img_per_s": feed[k]["img_per_s"],
               "rank_py_us_per_img": feed[k]["py_threads_us_per_img"] - feed[k]["host_resize_us_per_img"],
               "rank_py_us_per_img_ahead": feed[k]["ahead_py_threads_us_per_img"],
               **({"iteration_images": feed[k]["iteration_images"],
                   "rank_py_us_per_img_ahead_one_batch": feed[k]["ahead_one_batch_py_threads_us_per_img"],
                   "graph_build_cpu_s": feed[k]["graph_build_cpu_s"], "pipeline_cpu_ms": feed[k]["pipeline_cpu_ms"]}
                  if k == "dali" else {})}
           for k in ("dali", "webdataset") if k in feed}
    (out / "feed.json").write_text(json.dumps({"img_per_s_of": "one rank on one device (per GPU on a GPU host)",
                                               "rand_augment": feed["rand_augment"], "images": feed["input_images"],
                                               "kb_per_image": feed["input_kb_per_image"], **per}, indent=1) + "\n")
    for k, r in per.items():
        unit = "per GPU" if r["device"] == "cuda" else "per CPU rank"
        lines.append(f"feed {k} on {r['device']}: reads alone {r['feed_img_per_s']:,.0f} img/s {unit}, "
                     f"decode + RandAugment {r['decode_augment_img_per_s']:,.0f} img/s {unit}, "
                     f"rank's Python {r['rank_py_us_per_img']:.1f} us/img, "
                     f"{r['rank_py_us_per_img_ahead']:.1f} with the loader ahead of a step"
                     + (f" ({r['iteration_images']} images per DALI iteration; "
                        f"{r['rank_py_us_per_img_ahead_one_batch']:.1f} at one batch per iteration); its graph built "
                        f"once in {r['graph_build_cpu_s']:.2f} CPU-s, an epoch's pipeline made from it in "
                        f"{r['pipeline_cpu_ms']:.0f} CPU-ms" if k == "dali" else ""))
for name in ("bench_train", "bench_train_compiled"):
    res = last_json(name)
    for r in (res or {}).get("runs", []):
        lines.append(f"{name}: {r['model']} ZeRO-{r['zero']} {r['precision']} mb {r['micro_batch']} on {r['device']}: "
                     f"{r['img_per_s']:,.0f} img/s, MFU {r['mfu_pct'] or 0:.1f}%, {r['ratio']:.2f}x plain, "
                     f"peak {r['peak_mem_gib'] or 0:.1f} GiB, compiled {r['compiled']}")
if (out / "doctor.json").is_file():
    for c in json.loads((out / "doctor.json").read_text()):
        lines.append(f"doctor {'ok' if c['ok'] else 'FAIL'} {c['name']}: {c['figure']}")
stop = (out / "e2e_stop.log").read_text() if (out / "e2e_stop.log").is_file() else ""
resume = (out / "e2e_resume.log").read_text() if (out / "e2e_resume.log").is_file() else ""
lines.append(f"e2e: NaN step skipped {'step skipped' in stop}, stopped {'stop_at_step' in stop}, "
             f"resumed {'resumed from' in resume}, finished {'pipeline e2e: done' in resume}")
check = last_json("decode_check")
if check:
    lines.append(f"decode check: {check}")
for size, paper in (("tiny", 61.4), ("base", 74.9)):
    res = last_json(f"paper_{size}_eval")
    if res:
        lines.append(f"paper FF-{size} from its released weights: top-1 {res['top1']:.2f}% (paper {paper}%) on {res['samples']} images")
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
