"""What a step whose loss was NaN/inf on some rank means for the run (optim.nonfinite). Pure."""

from __future__ import annotations

from pathlib import Path

from ffscale.config import OptimCfg
from ffscale.errors import NonFiniteLoss


def check(optim: OptimCfg, step: int, skipped: int, last_checkpoint: Path | None, where: str) -> None:
    """Raise NonFiniteLoss naming the step, unless optim.nonfinite=skip and no more than
    optim.max_skipped steps were skipped. The step itself was never applied."""
    if optim.nonfinite == "skip" and skipped <= optim.max_skipped:
        return
    why = (
        f"{skipped} steps skipped, more than optim.max_skipped={optim.max_skipped}"
        if optim.nonfinite == "skip"
        else "optim.nonfinite=stop"
    )
    raise NonFiniteLoss(
        f"{where}: loss is NaN or inf at step {step} ({why}). The step was not applied; the last "
        f"checkpoint is {last_checkpoint or 'none yet'}. Lower optim.base_lr or set optim.clip_grad"
        + ("" if optim.nonfinite == "skip" else ", or skip such steps with optim.nonfinite=skip")
    )
