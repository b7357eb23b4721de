"""Classification counts that sum across batches and ranks: the one top-k counter."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def topk_counts(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 [n, top-1 hits, top-5 hits, summed loss] over the real samples (label -1 = padding)."""
    real = y >= 0
    out = torch.zeros(4, dtype=torch.float64, device=logits.device)
    if real.any():
        lg, yy = logits[real].float(), y[real]
        top = lg.topk(min(5, lg.shape[1]), dim=1).indices
        out[0] += real.sum()
        out[1] += (top[:, 0] == yy).sum()
        out[2] += (top == yy[:, None]).any(dim=1).sum()
        out[3] += F.cross_entropy(lg, yy, reduction="sum")
    return out


def summarize(sums: torch.Tensor, prefix: str = "val_") -> dict:
    """Counts -> {val_samples, val_top1 (%), val_top5 (%), val_loss (mean)}."""
    n = max(sums[0].item(), 1.0)
    return {
        f"{prefix}samples": int(sums[0].item()),
        f"{prefix}top1": 100 * sums[1].item() / n,
        f"{prefix}top5": 100 * sums[2].item() / n,
        f"{prefix}loss": sums[3].item() / n,
    }
