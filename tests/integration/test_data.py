"""Both loaders through the same checks: coverage, disjoint ranks, resume, bad data, augmentation."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.ids import decode_id, make_id_folder
from helpers.loaders import bad_shards, collect, plain_cfg

from ffscale.data.ingest import sources as shards
from ffscale.data.ingest.writer import write_shards
from ffscale.data.loader import build_loader
from ffscale.data.manifest import DataError, load_manifest, verify
from ffscale.data.samples import iter_samples

N, CLASSES = 300, 7


LOADERS = ["webdataset", "dali"]


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory) -> Path:
    root = make_id_folder(tmp_path_factory.mktemp("ids") / "src", N, CLASSES)
    out = root.parent / "shards"
    write_shards(shards.image_folder(root), out, "ids", shard_size=40)
    return out


def test_fashion_mnist_shards_round_trip(fm_shards):
    m, files = load_manifest(fm_shards / "train")
    assert m.num_samples == 2048 and m.num_classes == 10 and len(files) == 8
    verify(fm_shards / "train")
    raw = list(iter_samples(files))
    assert len(raw) == 2048 and len({s["__key__"] for s in raw}) == 2048
    labels = np.bincount([int(s["cls"]) for s in raw], minlength=10)
    assert labels.min() > 120  # shuffled at write time: every class present in a 2k prefix


def test_folder_shards_hold_every_image_once_with_its_label(id_shards):
    m, files = load_manifest(id_shards)
    assert m.num_samples == N and m.classes == [f"class{c:03d}" for c in range(CLASSES)]
    seen = {}
    import io

    from PIL import Image

    for s in iter_samples(files):
        img = np.array(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        i = decode_id(torch.from_numpy(img).permute(2, 0, 1))
        assert int(s["cls"]) == i % CLASSES
        seen[i] = seen.get(i, 0) + 1
    assert sorted(seen) == list(range(N)) and set(seen.values()) == {1}


@pytest.mark.parametrize("kind", LOADERS)
def test_two_ranks_train_disjoint_and_labels_right(id_shards, kind):
    per_rank = []
    for rank in (0, 1):
        loader, _ = build_loader(
            plain_cfg(kind), str(id_shards), True, rank, 2, 16, 0, None, torch.device("cpu")
        )
        ids, labels, sizes = collect(loader)
        assert len(sizes) == loader.steps_per_epoch and set(sizes) == {16}
        assert all(y == i % CLASSES for i, y in zip(ids, labels))
        assert len(set(ids)) == len(ids)  # no sample twice in an epoch
        per_rank.append(set(ids))
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0]) == len(per_rank[1])  # same number of steps on every rank


@pytest.mark.parametrize("kind", LOADERS)
def test_eval_covers_every_sample_exactly_once_over_ranks(id_shards, kind):
    all_ids, batches = [], []
    for rank in (0, 1):
        loader, _ = build_loader(
            plain_cfg(kind), str(id_shards), False, rank, 2, 16, 0, None, torch.device("cpu")
        )
        ids, labels, sizes = collect(loader)
        all_ids += ids
        batches.append(len(sizes))
        assert loader.num_samples == N
        assert set(sizes) == {16}  # every batch micro-batch rows (padded): a compiled model sees one shape
    assert sorted(all_ids) == list(range(N))
    assert batches[0] == batches[1]  # padded so ZeRO-3 ranks run equal forwards


def test_dali_builds_the_val_pipeline_once_for_every_evaluation(id_shards):
    """The model's and the EMA's evaluations, epoch after epoch, run through one pipeline reset
    between them; one abandoned midway cannot be reset, so the next builds it again."""
    loader, _ = build_loader(plain_cfg("dali"), str(id_shards), False, 0, 2, 16, 0, None, torch.device("cpu"))
    first = collect(loader)
    assert all(collect(loader) == first for _ in range(3)) and loader.builds == 1
    abandoned = loader.epoch(0)
    next(abandoned)
    abandoned.close()
    assert collect(loader) == first and loader.builds == 2
    loader.close()


@pytest.mark.parametrize("rand_augment", [False, True])
def test_dali_builds_the_training_graph_once_and_each_epoch_draws_as_a_fresh_build(id_shards, rand_augment):
    """Each epoch's pipeline is made from the graph serialized once per loader, with the epoch's seed,
    and draws as a pipeline DALI builds afresh with that seed: crops, flips and colour jitter (resized
    on the host), and RandAugment's graph of conditionals."""
    from ffscale.data import dali

    cfg = plain_cfg("dali", scale=[0.2, 1.0], ratio=[0.75, 1.33], hflip=0.5, color_jitter=0.4,
                    rand_augment=rand_augment)  # fmt: skip
    loader = build_loader(cfg, str(id_shards), True, 0, 1, 16, 0, None, torch.device("cpu"))[0]
    epochs = [torch.cat([x.clone() for x, _ in loader.epoch(e)]) for e in (0, 1)]
    assert (loader.graph_builds, loader.builds) == (1, 2) and not torch.equal(*epochs)

    ids, host, seed = loader.plan.epoch_ids(1, True, 16), loader._host_resize(), 1234

    def first_iteration(make):
        feed = loader._feed(ids)
        pipe = make(feed)
        try:
            return [[np.array(out[i]) for i in range(len(out))] for out in pipe.run()]
        finally:
            dali._release(pipe)
            feed.drain()

    def fresh(feed):  # DALI's own build of the graph, seeded
        pipe = dali._pipeline(True, cfg, rand_augment, "cpu", host)(**loader._params(seed))
        pipe.iter_setup = lambda: pipe.feed_input(dali.ROWS, feed())
        pipe.build()
        return pipe

    made = first_iteration(lambda feed: loader._build(feed, seed, host))
    built = first_iteration(fresh)
    assert len(made[0]) == loader.run_batch and all(
        np.array_equal(a, b) for got, want in zip(made, built) for a, b in zip(got, want)
    )
    loader.close()


def test_dali_iterations_of_several_micro_batches_hand_them_on_in_the_plans_order(id_shards):
    """An iteration of 5 micro-batches (the epoch's last of 3, eval's of 4, filled with padding) gives
    the batches one micro-batch per iteration gives: in training, resumed inside an iteration, and
    in every evaluation through the one pipeline."""

    def loader(train, images):
        cfg = plain_cfg("dali", dali_batch=images)
        return build_loader(cfg, str(id_shards), train, 0, 1, 16, 0, None, torch.device("cpu"))[0]

    for train, runs in ((True, [5, 5, 5, 3]), (False, [5, 5, 5, 4])):
        one, five = loader(train, 16), loader(train, 80)
        assert (one.per_run, five.per_run) == (1, 5)
        assert [len(p) for p in five._parts()] == runs
        want = collect(one)
        assert collect(five) == want and len(want[2]) == sum(runs)
        if train:
            assert collect(five, skip=7)[0] == want[0][7 * 16 :]
        else:
            assert collect(five) == want and five.builds == 1
        one.close(), five.close()
    # with RandAugment the batches come through DALI's own outputs (no host resize): the same labels
    cfg = {"rand_augment": True}
    ra = [build_loader(plain_cfg("dali", dali_batch=k, **cfg), str(id_shards), True, 0, 1, 16, 0, None,
                       torch.device("cpu"))[0] for k in (16, 80)]  # fmt: skip
    labels = [[y.tolist() for _, y in loader.epoch(0, skip)] for loader in ra for skip in (0, 7)]
    assert labels[2] == labels[0] and labels[3] == labels[0][7:] == labels[1] and len(labels[0]) == 18
    for loader in ra:
        loader.close()


def test_the_dali_feed_hands_over_whole_batches_the_same_from_forked_and_spawned_workers(
    id_shards, tmp_path, monkeypatch
):
    """The feed's workers start by spawn once CUDA is up in the rank: they must write the same rows,
    lengths and labels as forked ones, epoch after epoch; the slots' files are gone once mapped, so a
    killed rank leaves nothing in shared memory."""
    import numpy as np

    from ffscale.data import feed
    from ffscale.data.loader import open_index

    monkeypatch.setattr(feed, "_shm_dir", lambda: str(tmp_path))
    index, _ = open_index(str(id_shards))
    ids = np.random.default_rng(0).permutation(len(index))[:48]
    got = {}
    for method in ("fork", "spawn"):
        workers = feed.FeedWorkers(index, CLASSES, 16, 2, slots=4, start_method=method)
        assert not list(tmp_path.iterdir())
        batches = feed.BatchFeed(workers, ids, 40, ahead=1)  # the last 8 positions: padding
        got[method] = []
        for _ in range(2):  # after StopIteration the feed starts over (an evaluation's reset)
            with pytest.raises(StopIteration):
                while True:
                    rows = batches()
                    lengths, labels = feed.header(rows)
                    images = [bytes(r[feed.HEADER : feed.HEADER + n]) for r, n in zip(rows, lengths)]
                    got[method].append((images, labels.tolist()))
        workers.close()
    assert got["fork"] == got["spawn"] and len(got["fork"]) == 6
    first = got["fork"][0]
    assert first[0][0] == feed.image_bytes(index.read(int(ids[0])), index.members)
    assert got["fork"][2][1][-8:] == [feed.PAD_LABEL] * 8


def test_the_dali_feed_raises_a_workers_bad_sample_and_serves_the_next_epoch(tmp_path):
    """Two batches holding one bad sample fail in two workers, in either order: the first failure is
    raised naming it, the feed drains the other, and the same workers serve a good epoch after."""
    import numpy as np

    from ffscale.data import feed
    from ffscale.data.loader import open_index

    index, _ = open_index(str(bad_shards(tmp_path, "label_range")))  # sample 5's label is 42 of 3 classes
    workers = feed.FeedWorkers(index, 3, 4, 2, slots=5, start_method="fork")
    try:
        bad = feed.BatchFeed(workers, np.array([5, 0, 1, 2, 5, 3, 4, 6, 7, 8, 9, 10]), 12, ahead=2)
        with pytest.raises(DataError, match=r"s-000000\.tar sample 0005: label 42"):
            bad()
        bad.drain()
        good = feed.BatchFeed(workers, np.arange(16, 24), 8, ahead=2)
        labels = [feed.header(good())[1].tolist() for _ in range(2)]
        assert labels == [[i % 3 for i in range(16, 20)], [i % 3 for i in range(20, 24)]]
    finally:
        workers.close()


@pytest.mark.parametrize("kind", LOADERS)
def test_epochs_reshuffle_and_resume_replays_the_same_batches(id_shards, kind):
    loader, _ = build_loader(plain_cfg(kind), str(id_shards), True, 0, 1, 16, 0, None, torch.device("cpu"))
    e0, _, _ = collect(loader, 0)
    e1, _, _ = collect(loader, 1)
    assert e0 != e1
    resumed, _, _ = collect(loader, 1, skip=3)
    assert resumed == e1[3 * 16 :]


@pytest.mark.parametrize("kind", LOADERS)
def test_repeated_augmentation_puts_each_image_on_every_rank_augmented_apart(id_shards, fm_shards, kind):
    """data.repeats=3 (DeiT's RASampler) on 2 ranks: an epoch as long as without repeats, about
    N / 3 distinct images each seen 3 times, copies on both ranks; one rank's copies of an image are
    cropped differently; a resumed epoch gives the same batches."""
    per_rank, loaders = [], []
    for rank in (0, 1):
        loader, _ = build_loader(plain_cfg(kind, repeats=3), str(id_shards), True, rank, 2, 16, 0, None,
                                 torch.device("cpu"))  # fmt: skip
        ids, labels, sizes = collect(loader)
        assert all(y == i % CLASSES for i, y in zip(ids, labels))
        assert len(sizes) == loader.steps_per_epoch == N // 256 * 256 // 2 // 16  # DeiT's epoch length
        per_rank.append(ids)
        loaders.append(loader)
    counts = Counter(per_rank[0] + per_rank[1])
    assert max(counts.values()) == 3 and len(counts) == pytest.approx(256 / 3, abs=2)
    assert sum(1 for i in counts if i in per_rank[0] and i in per_rank[1]) >= len(counts) - 2
    assert collect(loaders[1], 0, skip=3)[0] == per_rank[1][3 * 16 :]
    cropped = plain_cfg(kind, repeats=3, scale=[0.2, 0.6], hflip=0.5)  # real images: Fashion-MNIST
    loader, _ = build_loader(cropped, str(fm_shards / "val"), True, 0, 1, 16, 0, None, torch.device("cpu"))
    x = torch.cat([b for b, _ in loader.epoch(0)])
    order = loader.plan.train_indices(0)[: len(x)].tolist()  # the plan is held to timm's in test_plan.py
    pairs = [(k, k + 1) for k in range(len(order) - 1) if order[k] == order[k + 1]]
    differ = sum(not torch.equal(x[a], x[b]) for a, b in pairs)
    assert len(pairs) > 50 and differ == len(pairs), (differ, len(pairs))


def shard_of_each_id(root: Path) -> dict[int, int]:
    import io

    from PIL import Image

    out = {}
    for k, f in enumerate(sorted(root.glob("*.tar"))):
        for s in iter_samples([f]):
            img = np.array(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
            out[decode_id(torch.from_numpy(img).permute(2, 0, 1))] = k
    return out


@pytest.mark.parametrize("kind", LOADERS)
def test_each_epoch_reads_the_shards_in_another_order(id_shards, kind):
    """Beyond the shuffle buffer: epochs start in different shards (a reader fed the same file order
    every epoch starts each in the same neighbourhood)."""
    cfg = plain_cfg(kind)
    loader, _ = build_loader(cfg, str(id_shards), True, 0, 1, 16, 0, None, torch.device("cpu"))
    shard_of = shard_of_each_id(id_shards)
    first = [frozenset(shard_of[i] for i in collect(loader, epoch)[0][:16]) for epoch in range(6)]
    assert len(set(first)) >= 3, first


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("case", ["label_range", "no_label", "corrupt_jpeg", "empty_jpeg"])
def test_bad_samples_raise_naming_shard_and_key_or_are_skipped(tmp_path, kind, case):
    d = bad_shards(tmp_path, case)
    # DALI: iterations of 2 micro-batches of 2, the bad sample (5) in the second; under 32 images, as
    # nvidia-dali 2.4.0's CPU image decoder crashes (SIGSEGV) on an image it cannot decode in an
    # iteration of 32 or more (docs/data.md, "DALI iterations")
    batch = 2 if kind == "dali" else 8
    loader, _ = build_loader(
        plain_cfg(kind, dali_batch=4), str(d), False, 0, 1, batch, 0, None, torch.device("cpu")
    )
    with pytest.raises(DataError, match=r"s-000000\.tar.*0005"):
        collect(loader)
    skip_cfg = plain_cfg(kind, on_error="skip")
    if kind == "dali":  # DALI cannot drop a sample inside its graph: said plainly, up front
        with pytest.raises(DataError, match="on_error=skip needs data.loader=webdataset"):
            build_loader(skip_cfg, str(d), False, 0, 1, 8, 0, None, torch.device("cpu"))
        return
    loader, _ = build_loader(skip_cfg, str(d), False, 0, 1, 8, 0, None, torch.device("cpu"))
    ids, labels, _ = collect(loader)
    assert sorted(ids) == [i for i in range(64) if i != 5]
    assert all(y == i % 3 for i, y in zip(ids, labels))


def test_manifest_problems_are_named(tmp_path, id_shards):
    with pytest.raises(DataError, match="no shard manifest"):
        load_manifest(tmp_path)
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(id_shards, d)
    tar = sorted(d.glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:5000])  # truncated: caught by size at every start
    with pytest.raises(DataError, match=rf"{tar.name}: 5000 bytes, .* says \d+ \(truncated or replaced\)"):
        load_manifest(d)
    with pytest.raises(DataError, match=tar.name):
        verify(d)
    tar.unlink()
    with pytest.raises(DataError, match="missing on disk"):
        load_manifest(d)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "shards": m["shards"][:1]}))
    with pytest.raises(DataError, match="digest does not match"):
        load_manifest(d)


@pytest.mark.parametrize("kind", LOADERS)
def test_garbage_inside_a_tar_is_named_by_both_loaders_and_by_verify(tmp_path, id_shards, kind, capsys):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(id_shards, d)
    tar = sorted(d.glob("*.tar"))[2]
    b = bytearray(tar.read_bytes())
    b[10240 : 10240 + 4096] = b"\x13" * 4096  # same size: only content checks can see it
    tar.write_bytes(bytes(b))
    load_manifest(d)  # sizes agree
    loader, _ = build_loader(plain_cfg(kind), str(d), False, 0, 1, 8, 0, None, torch.device("cpu"))
    with pytest.raises(DataError, match=rf"shard .*{tar.name} sample \d+: not a readable tar"):
        collect(loader)
    from ffscale.cli import main

    assert main(["verify", str(d)]) == 2  # sha256 differs
    capsys.readouterr()
    assert main(["shard", "reindex", str(d)]) == 2  # the binary index is built from checked headers
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"shard {tar}: not a readable tar (no valid header at byte 10240" in err[0], err


def test_dali_colour_jitter_changes_pixels_not_labels(id_shards):
    def first(jitter):
        cfg = plain_cfg("dali", color_jitter=jitter)
        loader, _ = build_loader(cfg, str(id_shards), True, 0, 1, 16, 0, None, torch.device("cpu"))
        return next(iter(loader.epoch(0)))

    (x0, y0), (x1, y1) = first(0.0), first(0.4)
    assert torch.equal(y0, y1) and x0.shape == x1.shape
    assert (x0.float() - x1.float()).abs().mean() > 2  # brightness/contrast/saturation moved


def test_webdataset_rand_augment_changes_pixels_not_labels_and_replays_on_resume(id_shards):
    def batches(ra, skip=0):
        loader, _ = build_loader(plain_cfg("webdataset", rand_augment=ra), str(id_shards), True, 0, 1, 16, 0,
                                 None, torch.device("cpu"))  # fmt: skip
        return list(loader.epoch(0, skip))

    plain, augmented = batches(False), batches(True)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, augmented))
    assert (plain[0][0].float() - augmented[0][0].float()).abs().mean() > 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(augmented[2:], batches(True, skip=2)))


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    from ffscale.data.augment import mix

    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    t = torch.eye(4)
    torch.manual_seed(0)
    xm, tm = mix(x, t, mixup=0.8, cutmix=0.0, prob=1.0, switch=0.5)
    lam = float(tm[0, 0])
    assert 0 < lam < 1 and torch.allclose(tm.sum(1), torch.ones(4))
    assert torch.allclose(xm[0], torch.full((3, 8, 8), 0 * lam + 3 * (1 - lam)))
    xc, tc = mix(x, t, mixup=0.0, cutmix=1.0, prob=1.0, switch=0.5)
    pasted = float((xc[0] == 3.0).float().mean())  # sample 0 is paired with sample 3
    assert tc[0, 3] == pytest.approx(pasted) and tc[0, 0] == pytest.approx(1 - pasted)
    same, tsame = mix(x, t, mixup=0.8, cutmix=1.0, prob=0.0, switch=0.5)
    assert torch.equal(same, x) and torch.equal(tsame, t)


def test_random_erasing_is_per_sample_and_seeded():
    from ffscale.data.augment import random_erase

    x = torch.zeros(64, 3, 16, 16)
    torch.manual_seed(1)
    a = random_erase(x, 0.25)
    torch.manual_seed(1)
    b = random_erase(x, 0.25)
    erased = (a.flatten(1).abs().sum(1) > 0).sum().item()
    assert torch.equal(a, b) and 5 <= erased <= 30
    for image in a:  # each erased image: one rectangle, the same in every channel, inside the image
        changed = image != 0
        if changed.any():
            rows, cols = changed.any(0).any(1).nonzero(), changed.any(0).any(0).nonzero()
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert int(changed.sum()) == 3 * box and torch.equal(changed[0], changed[1])
            assert box >= 0.02 * 16 * 16 / 2 and box <= 16 * 16 / 3 * 1.5


def test_dali_rand_augment_pipeline_runs(id_shards):
    loader, _ = build_loader(
        plain_cfg("dali").__class__(**{**plain_cfg("dali").__dict__, "rand_augment": True}),
        str(id_shards), True, 0, 1, 16, 0, None, torch.device("cpu"),
    )  # fmt: skip
    x, y = next(iter(loader.epoch(0)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8 and y.min() >= 0


def test_a_dali_failure_is_said_at_once_not_searched_for_in_the_data(id_shards, capsys):
    """No GPU here: a DALI pipeline on cuda:0 fails as it would with no driver or one too old."""
    from ffscale.errors import DaliFailure

    loader, _ = build_loader(
        plain_cfg("dali"), str(id_shards), True, 0, 1, 16, 0, None, torch.device("cuda", 0)
    )
    with pytest.raises(
        DaliFailure, match=r"DALI failed on cuda:0 \(not a data error\): .*CUDA is not available"
    ):
        next(loader.epoch(0))
    from ffscale.data.loader import choose

    kind, why = choose(plain_cfg("auto"), torch.device("cuda", 0))  # auto: checked at start, falls back
    assert kind == "webdataset" and "DALI cannot run on cuda:0" in why and "CUDA is not available" in why
    assert capsys.readouterr().out.count("warning: DALI cannot run on cuda:0") == 1


def test_dali_errors_are_told_apart_by_the_operator_that_failed():
    from ffscale.data.dali import dali_error_line, is_data_error

    decode = (
        "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image_random_crop`,\n"
        "which was used ...\nencountered:\n\nnvImageCodec failure: '#3'\nCurrent pipeline object is no longer valid."
    )
    reader = (
        "Error in CPU operator `nvidia.dali.fn.readers.webdataset`,\nencountered:\nUnderful sample detected"
    )
    oom = "Error in MIXED operator `nvidia.dali.fn.decoders.image`,\nencountered:\nCUDA error: out of memory"
    build = 'Assert on "cuInitChecked()" failed: You are trying to create a GPU DALI pipeline while CUDA is not available.'
    assert is_data_error(decode) and is_data_error(reader)
    assert not is_data_error(oom) and not is_data_error(build)
    assert dali_error_line(decode) == "nvImageCodec failure: '#3'"
    assert dali_error_line(oom) == "CUDA error: out of memory"


def _old_parser(root: Path, idx: bool = True) -> np.ndarray:
    """The table as every start built it before the binary index: DALI's .idx files, or the tars."""
    from ffscale.data.sampleindex import parse

    m, files = load_manifest(root)
    indexes = [m.index_file(root, s) if idx else root / "none.idx" for s in m.shards]
    return parse(files, indexes, [s.count for s in m.shards], m.members)


def test_the_binary_index_sharding_writes_is_what_the_shards_own_indexes_give(fm_shards):
    import dataclasses
    import mmap

    from ffscale.data.manifest import sha256_file
    from ffscale.data.sampleindex import INDEX, open_table
    from ffscale.data.tarindex import TarIndex

    for split in ("train", "val"):
        root = fm_shards / split
        m, files = load_manifest(root)
        assert m.index_sha256 == sha256_file(root / INDEX)
        table, why = open_table(root, m)
        assert why == "" and len(table) == m.num_samples
        assert np.array_equal(table, _old_parser(root)) and np.array_equal(
            table, _old_parser(root, idx=False)
        )
        # mapped, not copied: read-only views of the file's mapping, shared by the node's ranks
        assert isinstance(table.base, memoryview) and isinstance(table.base.obj, mmap.mmap)
        assert not table.flags.owndata and not table.flags.writeable
        index = TarIndex.of_split(root, m, files)
        assert all(np.shares_memory(col, index.table) for col in (index.shard, index.img, index.lab))
        # pickled to a spawned DataLoader worker: mapped there again, not sent as a copy
        import pickle

        sent = pickle.dumps(index)
        assert len(sent) < table.nbytes / 10
        again = pickle.loads(sent)
        assert isinstance(again.table.base.obj, mmap.mmap) and np.array_equal(again.table, table)
        # the set's digest (runs' tags, model cards) is the shards' alone
        assert dataclasses.replace(m, index_sha256="").digest == m.digest


def _copy_of(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_set_without_the_binary_index_trains_as_before_and_reindex_writes_it(tmp_path, fm_shards, capsys):
    from ffscale.cli import main
    from ffscale.data.loader import open_index
    from ffscale.data.sampleindex import INDEX

    d = _copy_of(fm_shards / "val", tmp_path / "old")
    (d / INDEX).unlink()
    written = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({k: v for k, v in written.items() if k != "index_sha256"}))
    capsys.readouterr()
    for rank in (0, 0, 1):  # once per process, by rank 0
        loader, m = build_loader(
            plain_cfg("webdataset"), str(d), False, rank, 2, 8, 0, None, torch.device("cpu")
        )
    out = capsys.readouterr().out.splitlines()
    said = [ln for ln in out if "binary sample index" in ln]
    assert said == [
        f"ffscale: data.val={d}: its manifest names no binary sample index; built the sample index in memory "
        f"from the shards' indexes (`ffscale shard reindex {d}` writes it)"
    ], out
    assert m.index_sha256 == "" and m.digest == written["digest"]
    assert np.array_equal(loader.index.table, _old_parser(fm_shards / "val"))
    new, _ = open_index(str(fm_shards / "val"))
    assert [loader.index.read(i) | {"__url__": ""} for i in range(0, 512, 37)] == [
        new.read(i) | {"__url__": ""} for i in range(0, 512, 37)
    ]
    assert main(["verify", str(d)]) == 0
    assert "no binary sample index (`ffscale shard reindex" in capsys.readouterr().out
    assert main(["shard", "reindex", str(d), "--workers", "2"]) == 0
    m, _ = load_manifest(d)
    assert m.index_sha256 == written["index_sha256"] and m.digest == written["digest"]
    assert (d / INDEX).read_bytes() == (fm_shards / "val" / INDEX).read_bytes()
    assert main(["verify", str(d)]) == 0
    assert "binary sample index checked against the tars' headers" in capsys.readouterr().out


def test_a_changed_binary_index_is_never_trusted(tmp_path, fm_shards, capsys):
    from ffscale.cli import main
    from ffscale.data.manifest import sha256_file
    from ffscale.data.sampleindex import INDEX, verify

    d = _copy_of(fm_shards / "val", tmp_path / "changed")
    good = (d / INDEX).read_bytes()
    header = len(good) - 512 * 36  # the .npy header, then 36 bytes a record
    rec = 300
    bad = bytearray(good)
    bad[header + rec * 36 + 4 : header + rec * 36 + 12] = (1024).to_bytes(
        8, "little"
    )  # sample 300's image offset
    (d / INDEX).write_bytes(bytes(bad))
    capsys.readouterr()
    assert main(["verify", str(d)]) == 2
    assert f"{d}: {INDEX} differs from its manifest's sha256" in capsys.readouterr().err
    loader, _ = build_loader(plain_cfg("dali"), str(d), False, 0, 1, 8, 0, None, torch.device("cpu"))
    assert f"ffscale: data.val={d}: {INDEX} differs from its manifest's sha256" in capsys.readouterr().out
    assert np.array_equal(loader.index.table, _old_parser(fm_shards / "val"))  # built from the shards instead
    # changed with its manifest's sha256 (by hand): verify reads every entry's tar header
    written = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**written, "index_sha256": sha256_file(d / INDEX)}))
    m, files = load_manifest(d)
    shard, j = files[rec // 128], rec % 128
    with pytest.raises(
        DataError, match=rf"shard {shard} sample {j}: {INDEX} says a \d+-byte .jpg member at byte 1024"
    ):
        verify(d)
    (d / INDEX).unlink()
    with pytest.raises(DataError, match=f"{INDEX} is missing"):
        verify(d)


OPEN_COUNT = """
import sys, torch
sys.path.insert(0, {helpers!r})
from helpers.loaders import collect, plain_cfg
from ffscale.data.loader import build_loader
for kind in {kinds!r}:
    for train in (True, False):
        loader, _ = build_loader(plain_cfg(kind, workers=2), {root!r}, train, 0, 1, 16, 0, None, torch.device("cpu"))
        for epoch in range(2):
            collect(loader, epoch)
        loader.close()
"""


def _tar_opens_per_process(tmp_path: Path, root: Path) -> dict[str, int]:
    """Opens of the split's tars by each process of a real run (two epochs of each loader, train and
    eval, in one process), counted by strace."""
    import subprocess
    import sys

    script = OPEN_COUNT.format(helpers=str(Path(__file__).parents[1]), kinds=LOADERS, root=str(root))
    log = tmp_path / "opens"
    cmd = [
        "strace",
        "-f",
        "--seccomp-bpf",
        "-e",
        "trace=openat",
        "-o",
        str(log),
        sys.executable,
        "-c",
        script,
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    per_pid: Counter = Counter()
    for line in log.read_text().splitlines():
        if '.tar"' in line and str(root) in line and "= -1" not in line:
            per_pid[line.split()[0]] += 1
    return per_pid


def test_file_opens_grow_with_the_shards_touched_not_the_samples(tmp_path, id_shards):
    """Two epochs of 300 samples in 8 shards, by each loader, train and eval: a process opens a shard
    at most once per index it reads through (its descriptor is kept), where one open per sample made
    300 per epoch."""
    shards = len(list(id_shards.glob("*.tar")))
    per_pid = _tar_opens_per_process(tmp_path, id_shards)
    loaders = 2 * len(LOADERS)  # this process holds one index per loader built
    assert per_pid and max(per_pid.values()) <= loaders * shards, per_pid
    # workers are started per epoch (two per train epoch here; DALI's eval ones are kept)
    assert sum(per_pid.values()) <= loaders * 2 * 2 * shards < loaders * 2 * N, per_pid


def test_descriptors_are_per_process_and_bounded(id_shards, monkeypatch):
    """A forked child opens its own descriptors (none shared with the parent); beyond the bound the
    least recently used is closed."""
    import multiprocessing
    import os

    from ffscale.data import tarindex
    from ffscale.data.loader import open_index

    index, _ = open_index(str(id_shards))
    assert index.read(0) and index.descriptors().opens == 1
    parent_fds = dict(index.descriptors().open)

    def child(conn):
        index.read(1)
        index.read(2)
        fds = index.descriptors()
        conn.send((fds.pid == os.getpid(), fds.opens, set(fds.open)))

    a, b = multiprocessing.get_context("fork").Pipe()
    p = multiprocessing.get_context("fork").Process(target=child, args=(b,))
    p.start()
    own, opens, open_shards = a.recv()
    p.join()
    assert own and opens == len(open_shards) and index.descriptors().open == parent_fds
    assert index.read(0) and index.descriptors().opens == 1  # the parent's descriptor still serves
    monkeypatch.setattr(tarindex, "open_shard_capacity", lambda: 2)
    small = tarindex._Descriptors(index.files)
    for k in (0, 1, 0, 2, 3):
        small.get(k)
    assert list(small.open) == [2, 3] and small.opens == 4
    small.close()
