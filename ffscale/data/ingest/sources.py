"""Where the images to shard come from: a `Source` of (locator, label) items.

A locator is a file path, a `Span` (bytes at an offset of a file: a member of an uncompressed tar,
read without unpacking it) or a callable returning bytes (generated images). Items are read only by
the process writing their shard. Sources here: Debian's Fashion-MNIST IDX files, a class-folder tree
(`root/<class>/<image>`) and a flat folder with a labels file; ImageNet's own layouts are in
`imagenet.py`.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ffscale.data.ingest.images import to_jpeg
from ffscale.data.manifest import DataError

# Debian's dataset-fashion-mnist; FFSCALE_FASHION_MNIST_DIR points elsewhere (a host without it)
FASHION_MNIST_DIR = Path(os.environ.get("FFSCALE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]  # fmt: skip
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class Span(NamedTuple):
    """`size` bytes at `offset` of `path`: a member of an uncompressed tar."""

    path: str
    offset: int
    size: int
    name: str  # for messages: archive.tar:member


Locator = Path | Span | Callable[[], bytes]


@dataclass
class Source:
    description: str  # recorded in the manifest as `source`
    classes: list[str]  # names; label k is classes[k]
    items: list[tuple[Locator, int]]
    class_ids: list[str] | None = None  # e.g. WordNet synsets, where names are not identifiers

    def __post_init__(self):
        if not self.items:
            raise DataError(f"{self.description}: no images found")


def read(loc: Locator, fds: dict) -> tuple[bytes, str]:
    """(bytes, name) of one item; `fds` caches open archives for this process."""
    if isinstance(loc, Span):
        fd = fds.get(loc.path)
        if fd is None:
            fd = fds[loc.path] = os.open(loc.path, os.O_RDONLY)
        data = os.pread(fd, loc.size, loc.offset)
        if len(data) != loc.size:
            raise DataError(f"{loc.name}: archive ended early (truncated download?)")
        return data, loc.name
    if isinstance(loc, Path):
        try:
            return loc.read_bytes(), str(loc)
        except OSError as e:
            raise DataError(f"{loc}: cannot read ({e.strerror})") from e
    return loc(), "generated image"


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(
            f"{path} not found: install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist)"
        )
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist_arrays(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and labels [N] of split 'train' (60k) or 'val' (10k)."""
    prefix = {"train": "train", "val": "t10k"}[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels for {split}")
    return images, labels


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> Source:
    """Split 'train' (60k) or 'val' (10k) as JPEGs."""
    images, labels = fashion_mnist_arrays(split, root)
    items = [(lambda im=im: to_jpeg(Image.fromarray(im, "L")), int(y)) for im, y in zip(images, labels)]
    return Source(f"fashion-mnist:{split}", FASHION_MNIST_CLASSES, items)


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())


def image_folder(root: Path, names: dict[str, str] | None = None) -> Source:
    """`root/<class>/<image>`; class k is the k-th directory name in sorted order (as timm and
    torchvision number ImageNet's synsets); `names` maps a directory name to a class name (the
    directory names are then kept as class ids)."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not dirs:
        raise DataError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    items = [(f, y) for y, c in enumerate(dirs) for f in _images_in(root / c)]
    classes = [names.get(c, c) for c in dirs] if names is not None else dirs
    return Source(f"folder:{root}", classes, items, dirs if names is not None else None)


def read_labels(path: Path) -> list[tuple[str, str]]:
    """(file, label) rows of a `file,label` CSV (a header row is skipped) or `file label` text."""
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r]
    else:
        rows = [line.split(maxsplit=1) for line in text.splitlines() if line.strip()]
    bad = next((n for n, r in enumerate(rows, 1) if len(r) < 2), None)
    if bad is not None:
        raise DataError(f"{path}:{bad}: expected `file,label` (csv) or `file label`")
    out = [(r[0].strip(), r[1].strip()) for r in rows]
    if out and not (out[0][0].lower().endswith(tuple(IMAGE_EXTS)) or (path.parent / out[0][0]).exists()):
        out = out[1:]  # a header row
    return out


def numbered_classes(labels: list[str]) -> tuple[list[str], dict[str, int]]:
    """Integer labels keep their value (names "0".."K-1"); names are numbered in sorted order."""
    if all(v.isdigit() for v in labels):
        k = max(int(v) for v in labels) + 1
        return [str(i) for i in range(k)], {v: int(v) for v in set(labels)}
    classes = sorted(set(labels))
    return classes, {c: i for i, c in enumerate(classes)}


def flat_folder(root: Path, labels: Path) -> Source:
    """Images in one folder (or below it), labelled by a labels file naming them relative to it."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    rows = read_labels(labels)
    classes, index = numbered_classes([y for _, y in rows])
    items = []
    for n, (f, y) in enumerate(rows, 1):
        p = root / f
        if not p.is_file():
            raise DataError(f"{labels}:{n}: {p} does not exist")
        items.append((p, index[y]))
    return Source(f"flat:{root}:{labels.name}", classes, items)
