"""Config changes on resume are explicit: a stage resumed with a resolved config other than the one
it started with stops with the differences, unless the user allows them (`--allow-change KEY`).

Each stage keeps `config-history.jsonl`: its config when it started, then one line per allowed
change with the optimizer step it applied from. Keys that do not change what is trained (FREE) may
differ silently; keys that cannot change mid-stage (FIXED: the model's shape, the data, the batch
and schedule the step count and checkpoint depend on) are refused even when allowed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ffscale.config import RunCfg, Stage, StageCfg, dotted
from ffscale.errors import ConfigError, DataError
from ffscale.inference.stagedir import StageDir
from ffscale.util import jsonl

# data.loader and data.workers are not free: they set the steps per epoch (the webdataset loader
# holds back a batch per worker), so the schedule's length
FREE = ("schedule.stop_at_step", "schedule.stop_at_epoch", "checkpoint.", "deepspeed.bucket_mb", "deepspeed.prefetch_mb", "model.compile",
        "model.grad_ckpt", "optim.micro_batch",
        # where the shards are read from, not which: a staged copy is checked against the same manifest
        "data.stage_dir", "data.remote_cache_mb")  # fmt: skip
# distill.teacher: a teacher or none sets the student's shape (its distillation token)
FIXED = ("model.", "data.train", "data.val", "data.img_size", "data.mean", "data.std", "optim.global_batch",
         "optim.lr_batch_base", "optim.ema_decay", "schedule.epochs", "schedule.warmup_epochs", "schedule.lr_per",
         "deepspeed.zero_stage", "deepspeed.precision", "init_from", "run.seed",
         "distill.teacher")  # fmt: skip


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def policy(key: str) -> str:
    """What a resumed stage does with another value of `key`: "free" (differs silently), "fixed"
    (refused even when allowed), "allow" (needs `--allow-change`), or "ignored" for keys outside the
    stage's config that `flat` leaves out (run.* but run.seed, tracking.*, stages). docs/config.md
    shows it per key (ffscale/tools/config_ref.py)."""
    if key != "run.seed" and key.split(".")[0] not in StageCfg.__dataclass_fields__:
        return "ignored"
    if _matches(key, FREE):
        return "free"
    return "fixed" if _matches(key, FIXED) else "allow"


def flat(stage: Stage, run: RunCfg) -> dict:
    return {"run.seed": run.seed, **dotted(dataclasses.asdict(stage.cfg))}


def history(stage_dir: Path) -> list[dict]:
    """The stage's history; a line cut short by a kill mid-append is skipped (it never applied:
    ffscale/util/jsonl.py)."""
    return StageDir(stage_dir).history_rows()


def effective(rows: list[dict]) -> dict:
    """The config the stage trains with: its start, with every recorded change applied."""
    cfg = dict(rows[0]["config"])
    for r in rows[1:]:
        cfg.update({k: new for k, (_, new) in r["changes"].items()})
    return cfg


def resuming(stage: Stage) -> bool:
    """The stage has a complete checkpoint to continue from and has not finished."""
    return StageDir(stage.dir).resumable()


def pending(stage: Stage, run: RunCfg) -> dict:
    """{key: [old, new]} of every difference a resumed stage would apply (empty: none, or not
    resuming), free keys left out."""
    rows = history(stage.dir)
    if not rows or not resuming(stage):
        return {}
    old, new = effective(rows), flat(stage, run)
    # keys both know: a key a newer ffscale added (or dropped) is not a change of this run's
    diff = {
        k: [old[k], new[k]] for k in sorted(set(old) & set(new)) if old[k] != new[k] and policy(k) != "free"
    }
    started_on = rows[0].get("digests", {})
    for k in ("data.train", "data.val"):  # the same shards at a new path (a moved mount) are no change
        if k in diff and started_on.get(k) is not None and started_on[k] == _digest(new[k]):
            del diff[k]
    return diff


def check(stage: Stage, run: RunCfg, allowed: set[str], where: str = "") -> dict:
    """The allowed changes a resumed stage applies (`pending`); ConfigError naming every refused
    difference. Run once per job, before any rank trains (ffscale/run/preflight.py)."""
    diff = pending(stage, run)
    if not diff:
        return {}
    fixed = [k for k in diff if policy(k) == "fixed"]
    if fixed:
        raise ConfigError(
            f"{where}stage {stage.name} resumes with {describe({k: diff[k] for k in fixed})}: cannot change mid-stage (model shape, "
            "data, batch and schedule); start another run.name, or a new stage with init_from"
        )
    refused = [k for k in diff if k not in allowed]
    if refused:
        flags = " ".join(f"--allow-change {k}" for k in refused)
        raise ConfigError(
            f"{where}stage {stage.name} resumes with another config: {describe({k: diff[k] for k in refused})}; run with {flags} "
            "to apply it from the resumed step, or resume with the values it started with"
        )
    return diff


def _digest(root: str) -> str | None:
    from ffscale.data.manifest import load_manifest

    try:
        return load_manifest(root)[0].digest
    except DataError:
        return None


def started(stage: Stage, run: RunCfg, lineage: str) -> None:
    """A fresh stage: its history begins with the config it starts with, its data's digests and
    where its weights came from (`lineage`: ffscale/run/pipeline.py's init_weights_for) (rank 0)."""
    cfg = flat(stage, run)
    row = {
        "step": 0,
        "time": time.time(),
        "config": cfg,
        "digests": {k: _digest(cfg[k]) for k in ("data.train", "data.val")},
        "init_from": lineage,
    }
    jsonl.rewrite(StageDir(stage.dir).history, [row])


def record(stage: Stage, step: int, diff: dict) -> None:
    """An allowed change, from optimizer step `step` on (rank 0)."""
    jsonl.append(StageDir(stage.dir).history, {"step": step, "time": time.time(), "changes": diff})


def describe(diff: dict) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
