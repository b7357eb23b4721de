"""`build_loader`: the configured loader for one split of a shard directory."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from ffscale.config import DataCfg
from ffscale.data.manifest import Manifest, load_manifest
from ffscale.data.plan import Loader, SamplePlan
from ffscale.data.remote import is_remote
from ffscale.data.tarindex import TarIndex
from ffscale.util.secrets import redact


def build_loader(
    cfg: DataCfg,
    root: str,
    train: bool,
    rank: int,
    world: int,
    micro_batch: int,
    seed: int,
    num_classes: int | None,
    device: torch.device,
) -> tuple[Loader, Manifest]:
    """The loader `choose` picks; its choice and reason in `loader.choice`. Labels are checked
    against `num_classes` (default: the manifest's class count)."""
    where = f"data.{'train' if train else 'val'}={redact(root)}"
    index, manifest = open_index(
        root, cfg, (lambda why: say_unindexed(where, root, why)) if rank == 0 else None
    )
    num_classes = num_classes or manifest.num_classes
    plan = SamplePlan(manifest.num_samples, rank, world, seed, cfg.repeats if train else 1, root)
    kind, why = choose(cfg, device)
    if kind == "dali":
        from ffscale.data.dali import DaliLoader

        loader = DaliLoader(cfg, plan, index, train, micro_batch, num_classes, device)
    else:
        from ffscale.data.wds import WdsLoader

        loader = WdsLoader(cfg, plan, index, train, micro_batch, num_classes, device)
    loader.choice = f"{kind} loader ({why})"
    return loader, manifest


def open_index(root: str, cfg: DataCfg | None = None, say=...) -> tuple[TarIndex, Manifest]:
    """The split's manifest (checked) and where each of its samples lies: its node-local copy under
    `data.stage_dir` (staged now unless it is there: ffscale/data/stage.py), a remote split read by
    ranged requests (ffscale/data/ranged.py), or the shards where they are."""
    if say is ...:
        say = lambda why: say_unindexed(root, root, why)  # noqa: E731
    if cfg is not None and cfg.stage_dir:
        from ffscale.data import stage

        local = str(stage.ensure(cfg.stage_dir, root, lambda m: print(m, flush=True)))
        manifest, files = load_manifest(local)
        return TarIndex.of_split(local, manifest, files, say), manifest
    manifest, files = load_manifest(root)
    if is_remote(root):
        from ffscale.data.ranged import RangedTarIndex

        return RangedTarIndex.of_url(root, manifest, files, cfg.remote_cache_mb if cfg else 64), manifest
    return TarIndex.of_split(root, manifest, files, say), manifest


_SAID: set[str] = set()


def say_unindexed(where: str, root: str | Path, why: str) -> None:
    """One line per split and process (rank 0's): a set without a usable binary index still trains, at
    the old start-up cost, until `ffscale shard reindex` writes one."""
    key = os.path.realpath(root)
    if key in _SAID:
        return
    _SAID.add(key)
    print(
        f"ffscale: {where}: {why}; built the sample index in memory from the shards' indexes "
        f"(`ffscale shard reindex {root}` writes it)",
        flush=True,
    )


def choose(cfg: DataCfg, device: torch.device) -> tuple[str, str]:
    """(loader, why) for data.loader; `auto` decides by what each loader can do and how fast it is."""
    if cfg.loader != "auto":
        return cfg.loader, f"data.loader={cfg.loader}"
    from ffscale.data.dali import available

    if not available():
        return "webdataset", "data.loader=auto: DALI is not installed"
    if cfg.on_error == "skip":
        return "webdataset", "data.loader=auto: data.on_error=skip drops samples, which DALI cannot"
    if device.type == "cuda":
        kind, why = "dali", "data.loader=auto: DALI decodes on the GPU"
    elif cfg.rand_augment:
        kind, why = "webdataset", f"data.loader=auto: {CPU_RAND_AUGMENT}"
    elif cfg.color_jitter > 0:
        kind, why = "dali", "data.loader=auto: colour jitter is DALI's"
    else:
        kind, why = "dali", f"data.loader=auto: {CPU_PLAIN}"
    if kind == "dali":
        failed = _dali_probe(device)
        if failed:  # one warning, then the run goes on without DALI
            return (
                "webdataset",
                f"data.loader=auto: DALI cannot run on {device} ({failed}); webdataset instead",
            )
    return kind, why


@functools.cache
def _dali_probe(device: torch.device) -> str | None:
    from ffscale.data.dali import probe

    reason = probe(device)
    if reason:
        print(
            f"ffscale: warning: DALI cannot run on {device}: {reason}; using the webdataset loader",
            flush=True,
        )
    return reason


# Which loader is faster on a CPU host, and where the measurement that says so lives: the figure
# itself belongs to the bench's record (docs/performance.md#input-pipeline), not to a log line.
CPU_RAND_AUGMENT = (
    "with RandAugment on a CPU host the webdataset loader, whose PIL RandAugment is timm's pixel for pixel "
    "(DALI's takes about as much CPU per image: docs/performance.md#input-pipeline)"
)
CPU_PLAIN = (
    "without RandAugment on a CPU host DALI is the faster "
    "(`ffscale bench data --no-rand-augment`, docs/performance.md#input-pipeline)"
)
