"""DeiT's distillation: the loss on a distilled student's two heads, with a frozen teacher.

As DeiT's `DistillationLoss` (facebookresearch/deit @ 2f76ec6, losses.py lines 10-64): the class
head learns the labels (the run's criterion: soft targets after mixup/cutmix and label smoothing,
line 38), the distillation head learns the teacher's prediction on the same augmented images
(line 48; DeiT's engine.py line 39 passes the mixed batch), and the two are weighed by `alpha`
(line 63). `hard`: cross-entropy with the teacher's argmax, no smoothing (line 61; what DeiT's
README trains with, README.md:229-231); `soft`: KL divergence at temperature `tau`, times tau^2,
over the batch's logits (lines 50-59). DeiT's defaults: alpha 0.5, tau 1.0 (main.py lines 131-133).

The teacher is a plain module outside DeepSpeed on every rank (whole, also under ZeRO-3), in eval
mode with no gradients, in the run's dtype; its forward time is counted per progress line.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from ffscale.engine.engine import soft_cross_entropy


def hard_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))


def soft_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    kl = F.kl_div(
        F.log_softmax(dist_logits / tau, dim=1),
        F.log_softmax(teacher_logits / tau, dim=1),
        reduction="sum",
        log_target=True,
    )
    return kl * (tau * tau) / dist_logits.numel()


def frozen(teacher: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The teacher as it runs: on the device, in the run's dtype, eval mode, no gradients."""
    teacher = teacher.to(device, dtype).eval()
    teacher.requires_grad_(False)
    return teacher


class Distiller:
    """The criterion of a distilled stage: `(images, (cls, dist) logits, targets) -> loss`."""

    def __init__(self, teacher: nn.Module, mode: str = "hard", alpha: float = 0.5, tau: float = 1.0):
        self.teacher, self.mode, self.alpha, self.tau = teacher, mode, alpha, tau
        self._clock = _Clock(next(teacher.parameters()).device)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()  # stays frozen whatever a caller did to it
        with self._clock:
            return self.teacher(x).float()

    def __call__(self, x: torch.Tensor, outputs, target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            raise TypeError(
                "a distilled stage's model returns (cls, dist) logits in training (no dist token?)"
            )
        cls, dist = (o.float() for o in outputs)
        base = soft_cross_entropy(cls, target)
        t = self.teacher_logits(x)
        kd = hard_distillation(dist, t) if self.mode == "hard" else soft_distillation(dist, t, self.tau)
        return base * (1 - self.alpha) + kd * self.alpha

    @torch.no_grad()
    def rate(self, x: torch.Tensor, rounds: int = 3) -> float:
        """The teacher's forward alone on batches like `x`, img/s (one warm-up round first)."""
        self.teacher_logits(x)
        self._clock.take()
        for _ in range(rounds):
            self.teacher_logits(x)
        seconds, _ = self._clock.take()
        return rounds * len(x) / max(seconds, 1e-9)

    def share(self) -> dict:
        """The teacher's share of the wall time since the last call (for the progress line)."""
        seconds, wall = self._clock.take()
        return {"teacher_share": 100 * seconds / wall} if wall > 0 else {}


class _Clock:
    """Seconds inside `with` blocks and wall seconds between `take()`s. CUDA work is timed with
    events read at `take()`, which a progress line calls once the step's loss is on the host anyway."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.seconds, self.last = 0.0, time.perf_counter()

    def __enter__(self):
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self._t0

    def take(self) -> tuple[float, float]:
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000
            self.events.clear()
        now = time.perf_counter()
        out = (self.seconds, now - self.last)
        self.seconds, self.last = 0.0, now
        return out
