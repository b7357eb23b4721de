"""The Table-1 benchmark: Fashion-MNIST objects at random scale and position among fragments of other
Fashion-MNIST images, written by `ffscale shard cluttered-fashion-mnist` as the same bytes on every
run and with any number of workers; val made from the test images alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ffscale.cli import main
from ffscale.data.ingest import cluttered
from ffscale.data.ingest.sources import FASHION_MNIST_DIR, fashion_mnist_arrays
from ffscale.data.manifest import DataError, load_manifest
from ffscale.data.samples import iter_samples


def test_the_same_digest_on_every_run_and_with_one_or_two_workers(tmp_path, capsys):
    from ffscale.data.ingest.writer import write_shards

    argv = ["shard", "cluttered-fashion-mnist", "--out", str(tmp_path / "cli"), "--limit", "48"]
    assert main([*argv, "--shard-size", "24", "--workers", "2"]) == 0
    m, files = load_manifest(tmp_path / "cli" / "val")
    assert f"digest {m.digest}" in capsys.readouterr().out
    src = cluttered.cluttered_fashion_mnist("val")
    for run in ("a", "b"):  # one worker, twice: the bytes of two workers, and the same binary index
        one = write_shards(src, tmp_path / run, "val", shard_size=24, limit=48, workers=1)
        assert (one.digest, one.index_sha256) == (m.digest, m.index_sha256) and m.index_sha256
    assert m.num_samples == 48 and m.classes[0] == "t-shirt"
    assert (
        m.source
        == "cluttered-fashion-mnist:val:v1:canvas=56,scale=(1.0,1.5),fragments=4,fragment=(8,16),seed=0"
    )
    sample = next(iter_samples(files, [s.count for s in m.shards]))
    assert Image.open(io.BytesIO(sample["jpg"])).size == (56, 56)


def test_objects_sit_at_varying_positions_and_scales_among_clutter():
    objects, _ = fashion_mnist_arrays("val")
    params = cluttered.Clutter()
    where = []
    for i in range(200):
        canvas, w = cluttered.compose(i, objects, params, 0, "val")
        y, x, side = w["y"], w["x"], w["side"]
        sprite = cluttered._resized(objects[i], side)
        assert (canvas[y : y + side, x : x + side] >= sprite).all()  # the object, added over the clutter
        outside = canvas.copy()
        outside[y : y + side, x : x + side] = 0
        where.append((y, x, side, outside.any()))  # fragments of other images around it
    ys, xs, sides, cluttered_around = np.array(where).T
    assert cluttered_around.mean() > 0.9  # the rest: fragments under the object, or cut from its background
    assert 28 <= sides.min() < 31 and 39 < sides.max() <= 42  # 28 px x U(1.0, 1.5)
    assert ys.min() < 3 and ys.max() > 20 and xs.min() < 3 and xs.max() > 20
    again, _ = cluttered.compose(7, objects, params, 0, "val")
    assert np.array_equal(again, cluttered.compose(7, objects, params, 0, "val")[0])
    assert not np.array_equal(again, cluttered.compose(7, objects, params, 1, "val")[0])


def test_val_is_made_from_the_test_images_alone(tmp_path):
    only_test = tmp_path / "fm"  # a copy of the data without the training images
    only_test.mkdir()
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (only_test / f).symlink_to(FASHION_MNIST_DIR / f)
    src = cluttered.cluttered_fashion_mnist("val", root=only_test)
    loc, _ = src.items[3]
    assert Image.open(io.BytesIO(loc())).size == (56, 56)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz not found"):
        cluttered.cluttered_fashion_mnist("train", root=only_test)
