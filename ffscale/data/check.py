"""A stage's data, checked before any rank starts: one line naming the key, exit 2.

Reads only manifests and file sizes (`load_manifest`) and imports no torch, so it costs
milliseconds per split; the shards' content is checked by `ffscale verify` and, sample by sample,
by the loaders.
"""

from __future__ import annotations

from ffscale.config import StageCfg
from ffscale.data.counts import train_steps
from ffscale.data.manifest import Manifest, load_manifest
from ffscale.errors import DataError
from ffscale.util.secrets import redact


def check_stage_data(stage_cfg: StageCfg, world: int, prefix: str = "") -> None:
    """`s` with its micro-batch resolved for `world` ranks; `p` prefixes keys (stages.<name>.)."""
    found = {}
    for split in ("train", "val"):
        root = getattr(stage_cfg.data, split)
        try:
            m, _ = load_manifest(root)
            if split == "train":
                # a batch per rank, counted as the loaders count
                train_steps(m.num_samples, world, stage_cfg.data.repeats, stage_cfg.optim.micro_batch, root)
        except DataError as e:
            raise DataError(f"{prefix}data.{split}={redact(root)}: {e}") from None
        found[split] = m
    train = found["train"]
    same_classes(train, found["val"], stage_cfg.data.train, stage_cfg.data.val, prefix)
    if stage_cfg.model.num_classes and train.num_classes > stage_cfg.model.num_classes:
        raise DataError(
            f"{prefix}model.num_classes={stage_cfg.model.num_classes} but {stage_cfg.data.train} has {train.num_classes} classes"
        )


def same_classes(train: Manifest, val: Manifest, train_root: str, val_root: str, prefix: str = "") -> None:
    """Label k means the same class in both splits (synset ids where known, else names)."""
    if train.identity != val.identity:
        raise DataError(
            f"{prefix}data.val={val_root} has other classes than {prefix}data.train={train_root} "
            f"({val.num_classes} vs {train.num_classes}, or named differently)"
        )
