"""Evaluate exported weights without DeepSpeed: `ffscale eval --run runs/NAME [--stage S]`."""

from __future__ import annotations

from pathlib import Path

import torch

from ffscale import config
from ffscale.data.augment import DeviceOps
from ffscale.data.loader import build_loader
from ffscale.inference.build import build_model
from ffscale.inference.stagedir import CONFIG, StageDir
from ffscale.util.topk import summarize, topk_counts
from ffscale.util.weights import load_weights

EVAL_BATCH = 64  # one process evaluates: the config's micro-batch when set (it fit in training), else this


def find_stage(run_dir: Path, stage_name: str | None) -> config.Stage:
    cfg_file = run_dir / CONFIG
    if not cfg_file.is_file():
        raise config.ConfigError(f"{run_dir}: no {CONFIG} (not an ffscale run directory)")
    cfg = config.load([str(cfg_file)], [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}"])
    stages = config.stages(cfg)
    if stage_name is None:
        # a stage trained to its end, or an `ffscale import` (a package that trained nothing)
        finished = [s for s in stages if StageDir(s.dir).finished() or StageDir(s.dir).holds_package()]
        if not finished:
            raise config.ConfigError(f"{run_dir}: no stage has exported weights yet")
        return finished[-1]
    for s in stages:
        if s.name == stage_name:
            return s
    raise config.ConfigError(f"{run_dir}: no stage {stage_name!r} (have {[s.name for s in stages]})")


@torch.no_grad()
def evaluate_weights(
    stage: config.Stage, weights: Path | None = None, data: str | None = None, device: str = "cpu"
) -> dict:
    """Top-1/top-5 of a stage's exported weights (or `weights`) on its val shards (or `data`)."""
    s = stage.cfg
    weights = weights or StageDir(stage.dir).weights
    state = load_weights(weights)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else s.model.num_classes
    # a distilled model from its weights, as the class count: an imported distilled DeiT's config has no teacher
    model = build_model(s, num_classes, "dist_token" in state)
    model.load_state_dict(state)
    dev = torch.device(device)
    model.to(dev).eval()
    loader, _ = build_loader(
        s.data, data or s.data.val, False, 0, 1, s.optim.micro_batch or EVAL_BATCH, 0, num_classes, dev
    )
    ops = DeviceOps(s.data, num_classes, dev, torch.float32)
    sums = torch.zeros(4, dtype=torch.float64, device=dev)
    for x, y in loader.epoch(0):
        x, y = ops.eval_batch(x, y)
        sums += topk_counts(model(x), y)
    res = summarize(sums, prefix="")
    return {"samples": res["samples"], "top1": res["top1"], "top5": res["top5"], "weights": str(weights)}
