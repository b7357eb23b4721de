"""Evaluate exported weights without DeepSpeed: `ffscale eval --run runs/NAME [--stage S]`."""

from __future__ import annotations

from pathlib import Path

import torch

from . import config as C
from .data.augment import DeviceOps
from .data.loader import build_loader
from .engine.checkpoint import load_weights
from .loop import model_kwargs


def find_stage(run_dir: Path, stage_name: str | None) -> C.Stage:
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise C.ConfigError(f"{run_dir}: no config.yaml (not an ffscale run directory)")
    cfg = C.load([str(cfg_file)], [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}"])
    stages = C.stages(cfg)
    if stage_name is None:
        finished = [s for s in stages if (s.dir / "weights.safetensors").is_file()]
        if not finished:
            raise C.ConfigError(f"{run_dir}: no stage has exported weights yet")
        return finished[-1]
    for s in stages:
        if s.name == stage_name:
            return s
    raise C.ConfigError(f"{run_dir}: no stage {stage_name!r} (have {[s.name for s in stages]})")


@torch.no_grad()
def evaluate(
    stage: C.Stage, weights: Path | None = None, data: str | None = None, device: str = "cpu"
) -> dict:
    s = stage.cfg
    weights = weights or stage.dir / "weights.safetensors"
    state = load_weights(weights)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else s.model.num_classes
    from .models import create_model

    model = create_model(s.model.name, **model_kwargs(stage, num_classes))
    model.load_state_dict(state)
    dev = torch.device(device)
    model.to(dev).eval()
    loader, manifest = build_loader(
        s.data, data or s.data.val, False, 0, 1, s.optim.micro_batch, 0, num_classes, dev
    )
    ops = DeviceOps(s.data, num_classes, dev, torch.float32)
    n = top1 = top5 = 0
    for x, y in loader.epoch(0):
        x, y = ops.eval_batch(x, y)
        logits = model(x)
        real = y >= 0
        top = logits[real].topk(min(5, num_classes), dim=1).indices
        yy = y[real]
        n += int(real.sum())
        top1 += int((top[:, 0] == yy).sum())
        top5 += int((top == yy[:, None]).any(dim=1).sum())
    return {
        "samples": n,
        "top1": 100 * top1 / max(n, 1),
        "top5": 100 * top5 / max(n, 1),
        "weights": str(weights),
    }
