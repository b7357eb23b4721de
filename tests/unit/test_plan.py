"""SamplePlan: which samples each rank reads per epoch, held to DeiT's samplers (timm's
RepeatAugSampler, torch's DistributedSampler); TarIndex: each rank reads only its samples' bytes."""

from __future__ import annotations

import importlib.util
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.ids import make_id_folder

from ffscale import errors
from ffscale.data.plan import SamplePlan, pad_batch, pad_eval


def timm_repeat_aug_sampler():
    """timm's RepeatAugSampler (DeiT's RASampler, generalised), loaded alone from its file."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed (scripts/setup.sh installs it without dependencies)")
    path = Path(spec.origin).parent / "data" / "distributed_sampler.py"
    mod_spec = importlib.util.spec_from_file_location("timm_distributed_sampler", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.RepeatAugSampler


@pytest.mark.parametrize("n", [300, 1000, 200])  # 200: below DeiT's rounding to 256
@pytest.mark.parametrize("world", [1, 2, 4])
def test_repeated_augmentation_lists_equal_timm_repeat_aug_sampler(n, world):
    RepeatAugSampler = timm_repeat_aug_sampler()
    for epoch in (0, 3):
        for rank in range(world):
            plan = SamplePlan(n, rank, world, seed=5, repeats=3)
            ref = RepeatAugSampler(range(n), num_replicas=world, rank=rank, num_repeats=3)
            ref.set_epoch(plan.order_seed(epoch))  # timm seeds its generator with the epoch alone
            assert plan.train_indices(epoch).tolist() == list(ref)
            assert plan.per_rank == len(ref)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_no_repeats_lists_equal_torch_distributed_sampler(world):
    """DeiT without --repeated-aug: DistributedSampler, shuffled, padded by wrapping (main.py:200)."""
    n = 301
    for rank in range(world):
        plan = SamplePlan(n, rank, world, seed=5)
        ref = torch.utils.data.DistributedSampler(
            range(n), world, rank, shuffle=True, seed=plan.order_seed(0)
        )
        ref.set_epoch(2)
        assert plan.train_indices(2).tolist() == list(ref)


def test_repeated_copies_go_to_different_ranks_in_the_same_or_next_step():
    n, world, batch, r = 2048, 4, 16, 3
    plans = [SamplePlan(n, rank, world, seed=0, repeats=r) for rank in range(world)]
    lists = [p.train_indices(1) for p in plans]
    steps = plans[0].train_steps(batch)
    assert steps == n // world // batch  # as many steps as an epoch without repeats
    seen = {}  # image -> [(rank, step)]
    for rank, ids in enumerate(lists):
        for k, i in enumerate(ids[: steps * batch].tolist()):
            seen.setdefault(i, []).append((rank, k // batch))
    full = [v for v in seen.values() if len(v) == r]
    assert len(full) >= len(seen) - 2 * world  # only the epoch's cut can split an image's copies
    assert len(seen) == pytest.approx(n / r, abs=world)  # about N / repeats distinct images
    for copies in full:
        assert len({rank for rank, _ in copies}) == r  # on three different ranks
        assert max(s for _, s in copies) - min(s for _, s in copies) <= 1
    assert lists[0].tolist() != plans[0].train_indices(2).tolist()  # a new order every epoch


@pytest.mark.parametrize("world", [1, 7, 40, 64, 512, 4096])
def test_any_world_size_evaluates_imagenet_val_in_40_shards_exactly_once(world):
    """docs/data.md shards ImageNet val into 40 files of 1,250: every world size works, each image
    once, ranks within one batch of each other and padded to the same number of forwards."""
    n, batch = 50_000, 64
    plans = [SamplePlan(n, rank, world, seed=0) for rank in range(world)]
    got = np.concatenate([p.eval_indices() for p in plans])
    assert len(got) == n and np.array_equal(np.sort(got), np.arange(n))
    sizes = [len(p.eval_indices()) for p in plans]
    assert max(sizes) - min(sizes) <= 1
    assert {p.eval_steps(batch) for p in plans} == {-(-max(sizes) // batch)}


@pytest.mark.parametrize("world", [8, 512, 1026, 4096])
def test_any_world_size_trains_imagenet_once_per_epoch_times_repeats(world):
    """ImageNet train (1,281,167 images in 1,025 shards, as docs/data.md writes them) on more ranks
    than files."""
    n = 1_281_167
    for repeats in (1, 3):
        plans = [SamplePlan(n, rank, world, seed=0, repeats=repeats) for rank in range(world)]
        order = plans[0].positions(0)
        lists = [p.train_indices(0, order) for p in plans]
        counts = np.bincount(np.concatenate(lists), minlength=n)
        if repeats == 1:  # each image once; the <= world - 1 padding samples twice
            assert (counts >= 1).all() and (counts > 1).sum() <= world - 1
        else:  # the epoch's first floor(N // 256 * 256 / W) * W positions: each image <= 3 times
            assert counts.max() == 3 and counts.sum() == n // 256 * 256 // world * world
        assert {len(x) for x in lists} == {plans[0].per_rank}  # the same on every rank


def test_too_few_samples_for_a_batch_is_named():
    with pytest.raises(errors.DataError, match="data/x: 10 samples give 3 per rank for 4 ranks"):
        SamplePlan(10, 0, 4, 0, where="data/x").train_steps(8)
    pads = list(
        pad_eval(2, 5, 4, 8, torch.device("cpu"))
    )  # micro-batch rows: no new shape for a compiled model
    assert len(pads) == 3 and all(y.tolist() == [-1] * 4 and x.shape == (4, 3, 8, 8) for x, y in pads)
    x, y = pad_batch(torch.ones(3, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2]), 4)
    assert y.tolist() == [0, 1, 2, -1] and x.shape == (4, 3, 8, 8) and not x[3].any() and x[:3].all()


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    from ffscale.data.ingest import sources
    from ffscale.data.ingest.writer import write_shards

    root = make_id_folder(tmp_path_factory.mktemp("plan") / "src", 120, 3)
    out = root.parent / "shards"
    write_shards(sources.image_folder(root), out, "ids", shard_size=25)
    return out


def _index(root: Path):
    from ffscale.data.manifest import load_manifest
    from ffscale.data.tarindex import TarIndex

    m, files = load_manifest(root)
    return TarIndex.of_split(root, m, files)


def test_a_rank_reads_the_bytes_of_its_samples_and_no_more(small_shards):
    read = []
    for rank in (0, 1):
        index = _index(small_shards)
        ids = SamplePlan(len(index), rank, 2, seed=0).train_indices(0)
        for i in ids.tolist():
            index.read(i)
        assert index.bytes_read == sum(index.sample_bytes(i) for i in ids.tolist())
        read.append(index.bytes_read)
    everything = sum(index.sample_bytes(i) for i in range(len(index)))
    assert read[0] + read[1] == everything  # 120 samples over 2 ranks: each read once, by one rank
    assert abs(read[0] - read[1]) < 0.1 * read[0]


def test_shards_without_dali_indexes_read_the_same_from_their_tar_headers(small_shards, tmp_path):
    from ffscale.data.sampleindex import INDEX

    d = tmp_path / "noidx"
    shutil.copytree(small_shards, d)
    for f in [*d.glob("*.idx"), d / INDEX]:  # no index of any kind: the tar headers are read
        f.unlink()
    a, b = _index(small_shards), _index(d)
    assert [a.read(i)["jpg"] for i in range(len(a))] == [b.read(i)["jpg"] for i in range(len(b))]
    assert Counter(a.read(i)["cls"] for i in range(len(a))) == Counter(
        b.read(i)["cls"] for i in range(len(b))
    )
    assert {a.read(i)["__key__"] for i in range(len(a))} == {b.read(i)["__key__"] for i in range(len(b))}
