"""Translated-and-cluttered Fashion-MNIST: each Fashion-MNIST image at a random scale and position on
a larger black canvas, among fragments of other Fashion-MNIST images.

The construction is that of cluttered MNIST (Mnih et al. 2014, arXiv 1406.6247; Jaderberg et al.
2015, arXiv 1506.02025), as DeepMind's generator writes it (google-deepmind/mnist-cluttered @ c3c30fc,
mnist_cluttered.lua): distractors are square crops (`dist_w`, default 8 px, line 164) taken at a
random place of random other images and added at random places of the canvas (`placeDistractors`,
lines 82-96), then the object is added at a random place (`placeSpriteRandomly`, lines 57-80; in
that order, lines 191-201), every sum clipped to white. Two changes for Fashion-MNIST, whose objects are solid
shapes rather than thin strokes: the object and the image each fragment comes from are resized by a
random factor (position *and* scale vary, as in ImageNet), and fragments are 8-16 px rather than
8 px, so that they carry edges and texture, not a flat patch of fabric.

Every sample is a function of (seed, split, index) alone: sample i holds image i of the split, and
its scale, position and clutter come from a generator seeded with `derive(seed, "cluttered", split,
i)`, so any process writes the same bytes for it (`ffscale shard cluttered-fashion-mnist --workers
N` gives the digest of one worker). The val split is built from the test images alone, its clutter
included, so no pixel of a training image appears in val.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ffscale.data.ingest.images import to_jpeg
from ffscale.data.ingest.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, Source, fashion_mnist_arrays
from ffscale.errors import ConfigError
from ffscale.util.seeds import derive

VERSION = 1  # part of every manifest's `source`: a change of the construction changes the digest


@dataclass(frozen=True)
class Clutter:
    """The construction's parameters (docs/recipe.md, "The benchmark", measures the canvas)."""

    canvas: int = 56  # side of the square image
    scale: tuple[float, float] = (1.0, 1.5)  # object side = 28 px x U(scale): 28-42 px
    fragments: int = 4  # distractors per image (mnist-cluttered's README example: 8 on 100x100)
    fragment: tuple[int, int] = (8, 16)  # distractor side, uniform in [lo, hi] px

    def __post_init__(self):
        lo, hi = self.scale
        if (
            self.canvas < 28
            or not 0 < lo <= hi
            or self.fragments < 0
            or not 1 <= self.fragment[0] <= self.fragment[1]
        ):
            raise ConfigError(
                f"cluttered-fashion-mnist: size {self.canvas} (>= 28), scale {lo}-{hi} (0 < lo <= hi), "
                f"{self.fragments} fragments (>= 0) of {self.fragment[0]}-{self.fragment[1]} px: out of range"
            )

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in asdict(self).items()).replace(" ", "")


def _resized(img: np.ndarray, side: int) -> np.ndarray:
    """A 28x28 image at side x side px (bicubic: the interpolation every resize of ffscale uses)."""
    if side == img.shape[0]:
        return img
    return np.asarray(Image.fromarray(img, "L").resize((side, side), Image.Resampling.BICUBIC))


def _add(canvas: np.ndarray, sprite: np.ndarray, y: int, x: int) -> None:
    """Add `sprite` at (y, x), clipped to white (mnist_cluttered.lua adds and clips alike)."""
    h, w = sprite.shape
    region = canvas[y : y + h, x : x + w]
    np.minimum(region.astype(np.int16) + sprite, 255, out=region, casting="unsafe")


def compose(
    index: int, objects: np.ndarray, params: Clutter, seed: int, split: str
) -> tuple[np.ndarray, dict]:
    """Sample `index`: a uint8 canvas, and where its object went (y, x, side) for tests and docs.
    Clutter comes from the other images of `objects` (the same split)."""
    rng = np.random.default_rng(derive(seed, "cluttered", split, index))
    n, c = len(objects), params.canvas
    canvas = np.zeros((c, c), np.uint8)
    lo, hi = params.scale
    for _ in range(params.fragments):
        other = objects[(index + 1 + int(rng.integers(n - 1))) % n]  # any image but this one
        src = _resized(other, round(28 * rng.uniform(lo, hi)))
        f = min(int(rng.integers(params.fragment[0], params.fragment[1] + 1)), src.shape[0])
        sy, sx = rng.integers(src.shape[0] - f + 1, size=2)
        ty, tx = rng.integers(c - f + 1, size=2)
        _add(canvas, src[sy : sy + f, sx : sx + f], int(ty), int(tx))
    side = min(round(28 * rng.uniform(lo, hi)), c)
    y, x = (int(v) for v in rng.integers(c - side + 1, size=2))
    _add(canvas, _resized(objects[index], side), y, x)
    return canvas, {"y": y, "x": x, "side": side}


def cluttered_fashion_mnist(
    split: str, params: Clutter = Clutter(), seed: int = 0, root: Path = FASHION_MNIST_DIR
) -> Source:
    """Split 'train' (from the 60k training images) or 'val' (from the 10k test images) as JPEGs."""
    objects, labels = fashion_mnist_arrays(split, root)

    def item(i: int):
        return lambda: to_jpeg(Image.fromarray(compose(i, objects, params, seed, split)[0], "L"))

    items = [(item(i), int(y)) for i, y in enumerate(labels)]
    desc = f"cluttered-fashion-mnist:{split}:v{VERSION}:{params.describe()},seed={seed}"
    return Source(desc, FASHION_MNIST_CLASSES, items)
