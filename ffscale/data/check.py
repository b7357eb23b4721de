"""Every stage's data, checked before any rank starts: one line naming the key, exit 2.

Reads only manifests and file sizes (`load_manifest`), so it costs milliseconds per split; the
shards' content is checked by `ffscale verify` and, sample by sample, by the loaders.
"""

from __future__ import annotations

from ..config import Config, for_world, stages
from ..errors import DataError
from .manifest import Manifest, load_manifest
from .plan import ShardPlan


def check_stages(cfg: Config, world: int) -> None:
    for stage in stages(cfg):
        p = f"stages.{stage.name}." if cfg.stages else ""
        s = for_world(stage.cfg, world, p)
        found = {}
        for split in ("train", "val"):
            root = getattr(s.data, split)
            try:
                m, files = load_manifest(root)
                plan = ShardPlan(files, [x.count for x in m.shards], 0, world, 0)
                if split == "train":
                    plan.train_steps(s.optim.micro_batch, held_back=0)
            except DataError as e:
                raise DataError(f"{p}data.{split}={root}: {e}") from None
            found[split] = m
        train = found["train"]
        same_classes(train, found["val"], s.data.train, s.data.val, p)
        if s.model.num_classes and train.num_classes > s.model.num_classes:
            raise DataError(
                f"{p}model.num_classes={s.model.num_classes} but {s.data.train} has {train.num_classes} classes"
            )


def same_classes(train: Manifest, val: Manifest, train_root: str, val_root: str, p: str = "") -> None:
    """Label k means the same class in both splits (synset ids where known, else names)."""
    if train.identity != val.identity:
        raise DataError(
            f"{p}data.val={val_root} has other classes than {p}data.train={train_root} "
            f"({val.num_classes} vs {train.num_classes}, or named differently)"
        )
