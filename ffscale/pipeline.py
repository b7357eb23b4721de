"""Stages in order: skip finished ones, resume the running one, chain weights between them."""

from __future__ import annotations

import json
from pathlib import Path

from . import config as C
from . import preempt, tracking
from .engine import dist as D
from .loop import log, run_stage

DONE = "DONE"


def init_weights_for(stage: C.Stage, previous: list[C.Stage]) -> Path | None:
    """A stage starts from the previous stage's weights unless init_from says otherwise:
    'scratch', another stage's name, or a path to a .safetensors file."""
    ref = stage.cfg.init_from
    if ref == "scratch" or (ref is None and not previous):
        return None
    if ref is None:
        return previous[-1].dir / "weights.safetensors"
    named = {s.name: s for s in previous}
    if ref in named:
        return named[ref].dir / "weights.safetensors"
    path = Path(ref)
    if not path.is_file():
        raise C.ConfigError(f"stages.{stage.name}.init_from={ref!r}: neither an earlier stage nor a file")
    return path


def run(cfg: C.Config) -> int:
    """Run every unfinished stage; 0 when all are done or a stage stopped at schedule.stop_at_step."""
    stages = C.stages(cfg)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    preempt.install()
    dist = D.init()
    if dist.rank == 0:
        C.save(cfg, run_dir / "config.yaml")
        tracking.ensure_store(cfg, run_dir)
    tracker = tracking.create(cfg, run_dir, dist.rank)
    tracker.pipeline_started(cfg)
    done: list[C.Stage] = []
    status = "FAILED"
    try:
        for stage in stages:
            if (stage.dir / DONE).is_file():
                log(dist, f"stage {stage.name}: already finished ({stage.dir / DONE}), skipping")
                done.append(stage)
                continue
            init = init_weights_for(stage, done)
            result = run_stage(
                stage, dist, tracker, cfg.run.seed, cfg.run.log_every, cfg.run.eval_every, init
            )
            if not result["finished"]:
                tracker.stage_ended(stage, "RUNNING")
                status = "RUNNING"
                return 0
            if dist.rank == 0:
                (stage.dir / DONE).write_text(json.dumps(result, indent=1))
            tracker.stage_ended(stage, "FINISHED", result)
            D.barrier()
            done.append(stage)
        status = "FINISHED"
        last = done[-1]
        summary = json.loads((last.dir / DONE).read_text())
        top1 = summary.get("last_eval", {}).get("val_top1")
        if top1 is not None:
            log(
                dist,
                f"pipeline {cfg.run.name}: done; final test top-1 {top1:.2f}% ({last.dir / 'weights.safetensors'})",
            )
        return 0
    except preempt.Preempted:
        status = "KILLED"
        return preempt.EXIT_CODE
    finally:
        tracker.pipeline_ended(status)
