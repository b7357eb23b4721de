"""One stage's training: set up, run epochs, evaluate and checkpoint at each epoch's end, export.

Sees plain tensors and the small Engine interface; knows nothing of DeepSpeed, DALI or MLflow.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ffscale.config import RunCfg, Stage, StageCfg
from ffscale.data.augment import DeviceOps
from ffscale.data.check import same_classes
from ffscale.data.loader import build_loader
from ffscale.engine import lr
from ffscale.engine.dist import DistInfo
from ffscale.engine.engine import Engine, EvalInterrupted
from ffscale.inference.build import build_model, model_kwargs
from ffscale.inference.card import trained_on, write_card
from ffscale.inference.stagedir import StageDir
from ffscale.models.resize import adapt_state_dict
from ffscale.run import changes, nonfinite, teacher
from ffscale.run.progress import Meter, eval_line, train_line
from ffscale.run.record import Recorder
from ffscale.run.schedule import plan_steps
from ffscale.run.world import for_world
from ffscale.util import flops, startup
from ffscale.util.cadence import itstime
from ffscale.util.hostenv import allocator
from ffscale.util.seeds import derive
from ffscale.util.weights import load_weights


def log(dist: DistInfo, msg: str) -> None:
    if dist.rank == 0:
        print(msg, flush=True)


@dataclass
class Progress:
    """The loop's own state, registered with the checkpointer: saved with every checkpoint (its
    keys are the checkpoint's client state, kept stable) and restored on resume. (epoch,
    micro_in_epoch) is also the train loader's position: a loader's epoch is a function of both."""

    epoch: int = 0
    micro_in_epoch: int = 0  # micro-steps done in this epoch, counted in `accum` per optimizer step
    accum: int = 1
    best: dict = field(default_factory=dict)
    skipped: int = 0  # non-finite steps skipped (optim.nonfinite=skip)
    eval_pending: bool = False  # SIGTERM stopped the epoch's evaluation: run it first on resume
    carried_eval_pending: bool = False  # SIGTERM stopped the carried weights' evaluation: the same

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """A checkpoint's client state (DeepSpeed adds keys of its own: only ours are read). The
        micro-steps done are counted again in this run's accumulation (the rank count may differ)."""
        for f in fields(self):
            if f.name in saved and f.name != "accum":
                setattr(self, f.name, saved[f.name])
        self.micro_in_epoch = self.micro_in_epoch // saved["accum"] * self.accum


def run_stage(
    stage: Stage,
    dist: DistInfo,
    tracker,
    run: RunCfg,
    init_weights: Path | None,
    lineage: str = "scratch",
    fence=lambda: None,
) -> dict:
    """Train one stage to its end (or to schedule.stop_at_step); the stage summary. `fence()` raises
    when the run is no longer this job's (ffscale/run/runlock.py), checked before every checkpoint."""
    r = StageRun(stage, dist, tracker, run, init_weights, lineage, fence)
    try:
        return _run(r, init_weights)
    finally:  # the val loader's pipeline and workers, kept between evaluations, end with the stage
        r.train.close()
        r.val.close()


def _run(r: StageRun, init_weights: Path | None) -> dict:
    if init_weights is not None and (r.fresh or r.progress.carried_eval_pending):
        r.evaluate_carried(init_weights)
    r.engine.stop_if_requested(agree=True)  # SIGTERM during start-up
    if r.progress.eval_pending:  # the evaluation a SIGTERM stopped
        r.end_epoch()
        if r.stopped_at_epoch():
            return {"finished": False}
    while r.progress.epoch < r.stage_cfg.schedule.epochs:
        if not r.train_epoch():
            return {"finished": False}
        r.end_epoch()
        if r.stopped_at_epoch():
            return {"finished": False}
    return r.finish()


class StageRun:
    def __init__(
        self,
        stage: Stage,
        dist: DistInfo,
        tracker,
        run: RunCfg,
        init_weights: Path | None,
        lineage: str,
        fence=lambda: None,
    ):
        # the stage with its micro-batch resolved for this world: the one copy of its config here
        self.stage = dataclasses.replace(stage, cfg=for_world(stage.cfg, dist.world, f"stages.{stage.name}."))
        self.dist, self.run, self.lineage = dist, run, lineage
        self.where = f"stage {stage.name}"
        files = StageDir(stage.dir)
        self.changes = changes.pending(self.stage, run)  # allowed: the job's preflight refused the rest
        startup.mark("stage_started")  # `ffscale bench startup` times the job's first stage set-up
        self._loaders()
        self.steps = plan_steps(self.stage_cfg, dist.world, self.train.steps_per_epoch, stage.name)
        model = self._model(init_weights)
        startup.mark("model_built")
        self.teacher = teacher.load(
            self.stage_cfg, Path(run.dir) / run.name, dist.device
        )  # None: not distilled
        self.engine = Engine(
            model,
            self.stage_cfg,
            dist,
            accum=self.steps.accum,
            lr_at=lr.for_stage(self.stage_cfg, self.steps.per_epoch),
            ckpt_dir=files.checkpoints,
            run=run,
            fence=fence,
            criterion=self.teacher.distiller if self.teacher else None,
        )
        startup.mark("engine_built")
        self.ops = DeviceOps(self.stage_cfg.data, self.num_classes, dist.device, self.engine.dtype)
        self.checkpoints = self.engine.checkpointer  # the loop saves through it, never the files
        stage.dir.mkdir(parents=True, exist_ok=True)
        self.progress = self._resume()
        self.meter = self._meter()
        self._announce()
        if self.teacher:
            log(dist, f"{self.where}: {self.teacher.announce(self.stage_cfg)}")
        tracker.stage_started(stage, self.train_m, self.val_m, self.engine.num_params, lineage)
        self.record = Recorder(files.metrics, tracker, dist.rank, self.engine.global_step)
        self._config_history(tracker, lineage)
        self.last_eval: dict = {}

    @property
    def stage_cfg(self) -> StageCfg:
        return self.stage.cfg

    # -- set-up ------------------------------------------------------------------------------
    def _loaders(self) -> None:
        s, d = self.stage_cfg, self.dist
        args = (d.rank, d.world, s.optim.micro_batch, self.run.seed)
        self.train, self.train_m = build_loader(
            s.data, s.data.train, True, *args, s.model.num_classes, d.device
        )
        self.num_classes = s.model.num_classes or self.train_m.num_classes
        self.val, self.val_m = build_loader(s.data, s.data.val, False, *args, self.num_classes, d.device)
        same_classes(self.train_m, self.val_m, s.data.train, s.data.val, f"stages.{self.stage.name}.")
        startup.mark("loaders_built")

    def _model(self, init_weights: Path | None) -> torch.nn.Module:
        torch.manual_seed(derive(self.run.seed, "init"))  # same initial weights on every rank
        model = build_model(self.stage_cfg, self.num_classes)
        if init_weights is not None:
            say = lambda m: log(self.dist, m)  # noqa: E731
            state = adapt_state_dict(
                load_weights(init_weights), model, say, self.stage_cfg.model.carry_token_mlp
            )
            model.load_state_dict(state)
        return model

    def _resume(self) -> Progress:
        prog = Progress(accum=self.steps.accum)
        self.checkpoints.register("progress", prog)
        note = self.engine.resume()
        self.fresh = note is None
        if note is not None:
            step = self.engine.global_step
            log(
                self.dist,
                f"{self.where}: resumed from {self.checkpoints.last} (epoch {prog.epoch}, step {step}){note}",
            )
        return prog

    def _config_history(self, tracker, lineage: str) -> None:
        """A fresh stage starts its config history; a resumed one records the changes it applies."""
        step = self.engine.global_step
        if self.dist.rank == 0 and (self.fresh or not changes.history(self.stage.dir)):
            changes.started(self.stage, self.run, lineage)
        if not self.changes:
            return
        if self.dist.rank == 0:
            changes.record(self.stage, step, self.changes)
        what = changes.describe(self.changes)
        self.record({"step": step, "config_change": what})
        tracker.config_changed(self.stage, step, self.changes, what, StageDir(self.stage.dir).history)
        log(self.dist, f"{self.where}: from step {step}: {what} (allowed; config-history.jsonl)")

    def _meter(self) -> Meter:
        kw = model_kwargs(self.stage_cfg, self.num_classes)
        self.flops_per_image = flops.train_flops_per_image(
            lambda: build_model(self.stage_cfg, self.num_classes), kw["img_size"], kw["in_chans"]
        )
        peak = flops.rank_peak(self.dist, self.engine.precision)
        meter = Meter(
            self.steps.total, self.stage_cfg.optim.global_batch, self.flops_per_image, peak * self.dist.world
        )
        meter.update(self.engine.global_step)
        return meter

    def _announce(self) -> None:
        s, d, e = self.stage_cfg, self.dist, self.engine
        alloc = f" ({allocator()})" if d.device.type == "cpu" else ""
        asked = s.deepspeed.zero_stage
        zero_note = f" (asked: {asked})" if asked != e.zero_stage else ""
        log(
            d,
            f"{self.where}: {s.model.name} {e.num_params / 1e6:.2f}M params, "
            f"{self.flops_per_image / 3e9:.3f} GFLOPs/img fwd, {self.train_m.num_samples} train / "
            f"{self.val_m.num_samples} val images, {self.num_classes} classes, {d.world} rank(s) on "
            f"{d.device.type}{alloc}, {e.precision}, ZeRO-{e.zero_stage}{zero_note}, {self.steps.per_epoch} "
            f"steps/epoch x {s.schedule.epochs} epochs, accum {self.steps.accum}, lr {e.lr:.2e}; "
            f"{self.train.choice}{self._scratch_student_note()}",
        )

    def _scratch_student_note(self) -> str:
        """A fresh student that starts from scratch by the pipeline's rule (config.starting_weights),
        not by its own init_from, says so."""
        s = self.stage_cfg
        if not self.fresh or self.lineage != "scratch" or s.init_from is not None or not s.distill.teacher:
            return ""
        return "; starts from scratch, as DeiT trains its students (init_from names weights to start from)"

    def evaluate_carried(self, init_weights: Path) -> None:
        """What the carried weights are worth before any training."""
        try:
            ev = self.engine.validate(self._val_batches())
        except EvalInterrupted:  # checkpoints step 0 saying so, stops; the rerun evaluates first
            self.progress.carried_eval_pending = True
            self.engine.stop_if_requested()
            raise
        self.progress.carried_eval_pending = False
        self.record({"step": 0, "init_val_top1": ev["val_top1"], "init_val_top5": ev["val_top5"]})
        log(
            self.dist,
            f"{self.where}: weights from {init_weights}: top-1 {ev['val_top1']:.2f}% before training",
        )
        self.meter.new_window(before_training=True)

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when the stage stopped at stop_at_step."""
        prog, st, e = self.progress, self.steps, self.engine
        e.long_waits()  # the epoch's loader starts: its first batch may take long on every rank
        loss = Mean(self.dist.device)
        for i, (x, y) in enumerate(
            self.train.epoch(prog.epoch, prog.micro_in_epoch), start=prog.micro_in_epoch
        ):
            if i >= st.micro_per_epoch:
                break
            # Seeded per micro-step: drop path and augmentation replay exactly after a resume.
            torch.manual_seed(derive(self.run.seed, "step", self.dist.rank, prog.epoch, i))
            x, target = self.ops.train_batch(x, y, self.stage_cfg.optim.label_smoothing)
            loss.add_micro(e.train_step(x, target))
            if (i + 1) % st.accum:
                continue
            prog.micro_in_epoch = i + 1
            loss.end_step(e.step_finite, st.accum)
            startup.mark("first_step")  # once per process; on a GPU the step may still be queued
            if not e.step_finite:
                self._skip_step()
            if loss.n and (itstime(e.global_step, self.run.log_every) or i + 1 == st.micro_per_epoch):
                self._log_progress(loss.take())
            e.stop_if_requested()
            if self.checkpoints.maybe_save(e.global_step, "step"):
                e.stop_if_requested(agree=True)  # SIGTERM during the write: stop, no second
            if self.stage_cfg.schedule.stop_at_step and e.global_step >= self.stage_cfg.schedule.stop_at_step:
                self.checkpoints.maybe_save(e.global_step, "stop")
                log(
                    self.dist,
                    f"{self.where}: stopped at schedule.stop_at_step={e.global_step}; rerun to continue",
                )
                return False
        prog.epoch, prog.micro_in_epoch = prog.epoch + 1, 0
        return True

    def _skip_step(self) -> None:
        """Nothing was applied, so no checkpoint can hold NaN weights; stop past the limit."""
        prog, step = self.progress, self.engine.global_step
        prog.skipped += 1
        self.record({"step": step, "skipped_steps": prog.skipped})
        nonfinite.check(self.stage_cfg.optim, step, prog.skipped, self.checkpoints.last, self.where)
        log(
            self.dist,
            f"{self.where}: loss not finite at step {step}: step skipped ({prog.skipped}/{self.stage_cfg.optim.max_skipped})",
        )

    def _log_progress(self, loss: float) -> None:
        e, prog = self.engine, self.progress
        perf = self.meter.update(e.global_step) | (self.teacher.distiller.share() if self.teacher else {})
        epoch = prog.epoch + self.steps.epoch_of(prog.micro_in_epoch)
        self.record({"step": e.global_step, "epoch": epoch, "loss": loss, "lr": e.lr, **perf})
        epochs = self.stage_cfg.schedule.epochs
        log(
            self.dist,
            train_line(
                self.stage.name, prog.epoch, epochs, e.global_step, self.steps.total, loss, e.lr, perf
            ),
        )

    # -- end of an epoch, end of the stage -----------------------------------------------------
    def end_epoch(self) -> None:
        prog, epochs, e = self.progress, self.stage_cfg.schedule.epochs, self.engine
        if prog.eval_pending or itstime(prog.epoch, self.run.eval_every, last=epochs):
            self._evaluate()
        self.checkpoints.maybe_save(e.global_step, "epoch", epoch=prog.epoch)
        e.stop_if_requested(agree=True)  # SIGTERM during the evaluation or the write
        self.meter.new_window()

    def stopped_at_epoch(self) -> bool:
        """schedule.stop_at_epoch reached before the schedule's end: checkpointed, rerun to continue."""
        stop, prog = self.stage_cfg.schedule.stop_at_epoch, self.progress
        if not stop or prog.epoch < stop or prog.epoch >= self.stage_cfg.schedule.epochs:
            return False
        self.checkpoints.maybe_save(self.engine.global_step, "stop")
        log(
            self.dist,
            f"{self.where}: stopped after epoch {prog.epoch} (schedule.stop_at_epoch); rerun to continue",
        )
        return True

    def _evaluate(self) -> None:
        t0, prog, e = time.perf_counter(), self.progress, self.engine
        try:
            ev = e.validate(self._val_batches())
            if e.ema is not None:  # beside the trained model, whose top-1 is the headline (DeiT's main.py
                # never evaluates its EMA)
                ev |= e.validate_ema(
                    self._val_batches(), lambda: build_model(self.stage_cfg, self.num_classes)
                )
        except EvalInterrupted:  # SIGTERM: the checkpoint says to evaluate first on resume
            prog.eval_pending = True
            e.stop_if_requested()
            raise
        prog.eval_pending = False
        ev["epoch"] = prog.epoch
        self.last_eval = ev
        if ev["val_top1"] >= prog.best.get("val_top1", -1):
            prog.best = {"val_top1": ev["val_top1"], "val_top5": ev["val_top5"], "epoch": prog.epoch}
        self.record({"step": e.global_step, **ev})
        log(self.dist, eval_line(self.stage.name, prog.epoch, ev, time.perf_counter() - t0))

    def _val_batches(self):
        return (self.ops.eval_batch(x, y) for x, y in self.val.epoch(0))

    def finish(self) -> dict:
        e, files = self.engine, StageDir(self.stage.dir)
        digest = e.export(files.weights)
        ema = {"ema_digest": e.export_ema(files.ema_weights)} if e.ema else {}
        if self.dist.rank == 0:  # what `ffscale predict` and the registered model read
            m = self.train_m
            write_card(
                files.card,
                self.stage_cfg,
                self.num_classes,
                m.classes,
                m.class_ids,
                trained_on(self.stage_cfg, m, self.val_m),
            )
        return {
            **ema,
            "finished": True,
            "best": self.progress.best,
            "last_eval": self.last_eval,
            "steps": e.global_step,
            "weights_digest": digest,
            "ranks": self.dist.world,
        }


class Mean:
    """Mean training loss over the finite steps since the last progress line, kept on the device
    so reading it costs one host sync per progress line, not per step."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), device=device)
        self.step = torch.zeros((), device=device)
        self.n = 0

    def add_micro(self, loss: torch.Tensor) -> None:
        self.step += loss

    def end_step(self, finite: bool, accum: int) -> None:
        if finite:
            self.sum += self.step
            self.n += accum
        self.step.zero_()

    def take(self) -> float:
        value = self.sum.item() / self.n
        self.sum.zero_()
        self.n = 0
        return value
