"""The teacher of a distilled stage (`distill.teacher`): found, held to the student before launch,
and loaded frozen on every rank.

A teacher is an earlier stage of the pipeline (by name), a directory holding `model.json` (a
finished stage, a run directory, `ffscale import` output) or a registered model (`models:/NAME/V`,
downloaded through ffscale/tracking/store.py). It must see the student's images and predict the
student's classes: the same image size and class count (and class names, where the teacher's card
names them), checked by the job's preflight (ffscale/run/preflight.py) with one line naming both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ffscale import config
from ffscale.data.manifest import load_manifest
from ffscale.engine.distill import Distiller, frozen
from ffscale.engine.ds_config import DTYPES, resolve_precision
from ffscale.errors import ConfigError, FfscaleError
from ffscale.inference.card import CARD, find_package, read_card
from ffscale.inference.stagedir import StageDir
from ffscale.tracking.store import REGISTRY_URIS
from ffscale.util.weights import file_digest


@dataclass
class Fit:
    """What a model sees and predicts: enough to tell whether a teacher fits a student."""

    model: str
    classes: list[str]
    img_size: int

    def __str__(self) -> str:
        return f"{self.model}, {len(self.classes)} classes, {self.img_size} px"


def _named(classes: list[str]) -> bool:
    """Cards of models that never saw class names (an import) list the indices."""
    return classes != [str(k) for k in range(len(classes))]


def _of_stage(stage_cfg: config.StageCfg) -> Fit:
    classes = load_manifest(stage_cfg.data.train)[0].classes
    k = stage_cfg.model.num_classes or len(classes)
    return Fit(
        stage_cfg.model.name,
        classes if len(classes) == k else [str(i) for i in range(k)],
        config.image_size(stage_cfg),
    )


def _of_card(card: dict) -> Fit:
    return Fit(card["model"], card["classes"], card["preprocessing"]["img_size"])


def package(ref: str, run_dir: Path) -> tuple[Path, str]:
    """The teacher's directory (model.json + weights) and what it is, for the log."""
    if ref.startswith(REGISTRY_URIS):  # a teacher kept in MLflow: downloaded
        from ffscale.tracking.store import download_model

        return download_model(ref), ref
    stage_dir = run_dir / ref
    if "/" not in ref and StageDir(stage_dir).holds_package():  # an earlier stage: finished before this one
        return stage_dir, f"stage {ref}"
    path = Path(ref)
    if not path.is_dir():
        raise ConfigError(
            f"distill.teacher={ref}: neither an earlier stage, a directory holding {CARD}, nor models:/NAME/VERSION"
        )
    return find_package(path), str(path)


def check(cfg: config.Config) -> None:
    """Every distilled stage's teacher fits its student; one line naming both, exit 2."""
    stages = config.stages(cfg)
    by_name = {s.name: s for s in stages}
    for stage in stages:
        ref = stage.cfg.distill.teacher
        if not ref:
            continue
        p = f"stages.{stage.name}." if cfg.stages else ""
        try:
            # an earlier stage not trained yet: its config says what it will be
            if ref in by_name and not StageDir(by_name[ref].dir).holds_package():
                teacher = _of_stage(by_name[ref].cfg)
            else:
                teacher = _of_card(read_card(package(ref, Path(cfg.run.dir) / cfg.run.name)[0]))
        except FfscaleError as e:
            raise type(e)(
                f"{p}distill.teacher={ref}: {str(e).removeprefix(f'distill.teacher={ref}: ')}"
            ) from None
        student = _of_stage(stage.cfg)
        named = _named(teacher.classes) and _named(student.classes)
        if (
            len(teacher.classes) != len(student.classes)
            or (named and teacher.classes != student.classes)
            or teacher.img_size != student.img_size
        ):
            raise ConfigError(
                f"{p}distill.teacher={ref}: the teacher ({teacher}) does not fit the student {stage.name} "
                f"({student}): a teacher sees the student's images and predicts its classes"
                + (
                    " (the same names, in order)"
                    if named and len(teacher.classes) == len(student.classes)
                    else ""
                )
            )


@dataclass
class Teacher:
    distiller: Distiller
    line: str  # which teacher, how it runs
    dtype: torch.dtype

    def announce(self, stage_cfg: config.StageCfg) -> str:
        """The stage log's line: the teacher, and its forward rate alone on a micro-batch of this stage."""
        img, device = config.image_size(stage_cfg), next(self.distiller.teacher.parameters()).device
        x = torch.randn(
            stage_cfg.optim.micro_batch or 1,
            stage_cfg.model.in_chans,
            img,
            img,
            device=device,
            dtype=self.dtype,
        )
        return f"{self.line}; teacher forward alone {self.distiller.rate(x):,.0f} img/s per rank"


def load(stage_cfg: config.StageCfg, run_dir: Path, device: torch.device) -> Teacher | None:
    """The stage's teacher, frozen on this rank in the run's dtype (None: not a distilled stage)."""
    d = stage_cfg.distill
    if not d.teacher:
        return None
    from ffscale.inference.predict import load_model

    dtype = DTYPES[resolve_precision(stage_cfg.deepspeed.precision, device)]
    where, what = package(d.teacher, run_dir)
    model, card, weights = load_model(where)
    distiller = Distiller(frozen(model, device, dtype), d.mode, d.alpha, d.tau)
    how = f"{d.mode}, alpha {d.alpha}" + (f", tau {d.tau}" if d.mode == "soft" else "")
    line = (
        f"distilling from {card['model']} ({what}: {weights}, digest {file_digest(weights)}), frozen in eval "
        f"mode without gradients, {str(dtype).removeprefix('torch.')}, on every rank; {how}"
    )
    return Teacher(distiller, line, dtype)
