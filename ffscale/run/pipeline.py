"""Stages in order: skip finished ones, resume the running one, chain weights between them."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ffscale import config, tracking
from ffscale.engine import dist as distributed
from ffscale.engine import preempt
from ffscale.errors import LockLost, Preempted
from ffscale.inference.stagedir import CONFIG, WEIGHTS, StageDir
from ffscale.run import preflight, runlock, verdict
from ffscale.run.loop import log, run_stage
from ffscale.run.runlock import ENV, RunLock
from ffscale.util import startup
from ffscale.util.weights import file_digest


def init_weights_for(stage: config.Stage, previous: list[config.Stage]) -> tuple[Path | None, str]:
    """The weights a stage starts from (config.starting_weights) and its lineage, as it happens:
    'scratch', 'stage:<name>', 'package:<dir>@<digest>' or 'file:<path>@<digest>'."""
    kind, ref = config.starting_weights(stage.cfg, [s.name for s in previous])
    if kind == "scratch":
        return None, "scratch"
    if kind == "stage":
        named = {s.name: s for s in previous}
        return named[ref].dir / WEIGHTS, f"stage:{ref}"
    path = Path(ref)
    if path.is_dir():  # a finished stage, a run directory or `ffscale import` output
        from ffscale.inference.card import find_package

        weights = find_package(path) / WEIGHTS
        return weights, f"package:{path.resolve()}@{file_digest(weights)}"
    if not path.is_file():
        raise config.ConfigError(
            f"stages.{stage.name}.init_from={ref!r}: neither an earlier stage nor a file"
        )
    return path, f"file:{path.resolve()}@{file_digest(path)}"


def run(cfg: config.Config) -> int:
    """Run every unfinished stage; 0 when all are done or a stage stopped at schedule.stop_at_step."""
    run_dir = Path(cfg.run.dir) / cfg.run.name
    preempt.install()
    dist = distributed.init(cfg.run.collective_timeout_s)
    startup.mark("distributed_initialised")
    lock = _lock(run_dir, cfg.run, dist)
    try:
        verdict.await_verdict()  # `ffscale train`'s checks that need torch, run beside this start-up
        # started by a plain launcher: the job is checked here, once, by rank 0 (every rank joins in)
        distributed.on_rank0(
            dist.rank,
            lambda: None if preflight.done_by_launcher() else preflight.check_job(cfg, 1, dist.world),
        )
        if dist.rank == 0:
            config.save(cfg, run_dir / CONFIG)
            tracking.ensure_store(cfg, run_dir)
        tracker = tracking.create(cfg, run_dir, dist.rank)
        tracker.pipeline_started(cfg)
        # before every checkpoint rank 0 checks that the run is still this job's (runlock.fence)
        token = lock.me.token if lock is not None else os.environ.get(ENV)
        fence = functools.partial(runlock.fence, run_dir, token if dist.rank == 0 else None)
        status: str | None = "FAILED"
        try:
            status = run_stages(cfg, dist, tracker, fence)
            return 0
        except Preempted:
            status = "KILLED"
            raise
        except LockLost:  # the runs are the new holder's now: end none of them, touch nothing
            status = None
            raise
        finally:
            if status is not None:
                tracker.pipeline_ended(status)
    finally:
        if lock is not None:
            lock.release()


def _lock(run_dir: Path, run: config.RunCfg, dist: distributed.DistInfo) -> RunLock | None:
    """Rank 0 takes the run directory's lock unless `ffscale train` (its launcher) holds it. Every
    rank takes part in the collective, whatever its node's launcher did."""

    def take() -> RunLock | None:
        if os.environ.get(ENV) is not None:
            return None
        return RunLock(run_dir, run.lock_stale_s, say=lambda m: log(dist, m)).acquire()

    return distributed.on_rank0(dist.rank, take)


def run_stages(cfg: config.Config, dist: distributed.DistInfo, tracker, fence=lambda: None) -> str:
    """FINISHED when every stage is done, RUNNING when one stopped at schedule.stop_at_step."""
    done: list[config.Stage] = []
    for stage in config.stages(cfg):
        if StageDir(stage.dir).finished():
            log(dist, f"stage {stage.name}: already finished ({StageDir(stage.dir).done}), skipping")
            done.append(stage)
            continue
        weights, lineage = init_weights_for(stage, done)
        result = run_stage(stage, dist, tracker, cfg.run, weights, lineage, fence)
        if not result["finished"]:
            tracker.stage_ended(stage, "RUNNING")
            return "RUNNING"
        if dist.rank == 0:  # the lineage too: `ffscale track sync` tags a replayed stage run with it
            StageDir(stage.dir).finish({**result, "init_from": lineage})
        tracker.stage_ended(stage, "FINISHED", result)
        distributed.barrier()
        done.append(stage)
    tracker.model_ready(done[-1], done)  # rank 0's tracker; the others' do nothing
    final = StageDir(done[-1].dir)
    top1 = final.summary().get("last_eval", {}).get("val_top1")
    if top1 is not None:
        weights = final.weights
        log(dist, f"pipeline {cfg.run.name}: done; final test top-1 {top1:.2f}% ({weights})")
    return "FINISHED"
