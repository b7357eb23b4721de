"""How many samples and batches each rank takes per epoch: the arithmetic of DeiT's samplers, from
the split's size alone. `plan.SamplePlan` (which samples, in which order) counts with it, and so does
the data check before launch (ffscale/data/check.py), which must not import torch to do so.
"""

from __future__ import annotations

import math

from ffscale.errors import DataError

RA_ROUND = 256  # DeiT samplers.py:32 rounds N down to a multiple of 256 before splitting


def train_per_rank(n: int, world: int, repeats: int = 1) -> int:
    """Train samples each rank takes per epoch (before whole batches are cut)."""
    if repeats == 1:
        return math.ceil(n / world)
    padded = math.ceil(n * repeats / world)
    if n >= RA_ROUND:
        selected = n // RA_ROUND * RA_ROUND // world
    else:  # timm's rule for sets smaller than the rounding (DeiT's would select none)
        selected = math.ceil(n / world)
    return min(selected, padded)


def train_steps(n: int, world: int, repeats: int, batch: int, where: str = "data") -> int:
    """Full batches every rank yields per epoch (DeiT's train loader drops the last partial one,
    main.py:221); `where` names the split in the error when there is not one."""
    per_rank = train_per_rank(n, world, repeats)
    steps = per_rank // batch
    if steps == 0:
        raise DataError(
            f"{where}: {n} samples give {per_rank} per rank for {world} ranks, fewer than one batch of {batch}"
        )
    return steps


def eval_steps(n: int, world: int, batch: int) -> int:
    """Eval batches of the rank with the most (rank 0; every rank pads to it)."""
    return math.ceil(math.ceil(n / world) / batch)
