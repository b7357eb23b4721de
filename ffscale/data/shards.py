"""Write shuffled WebDataset tar shards (`<key>.jpg` + `<key>.cls`) with a manifest.

Sources: an ImageNet-style class-folder tree (`root/<class>/<image>`) and Debian's Fashion-MNIST
IDX files. Samples are shuffled at write time, since DALI's reader only shuffles inside a buffer.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from ..atomic import atomic_path
from .manifest import DataError, Manifest, ShardInfo, broken_tar, sha256_file

# Debian's dataset-fashion-mnist; FFSCALE_FASHION_MNIST_DIR points elsewhere (a host without it)
FASHION_MNIST_DIR = Path(os.environ.get("FFSCALE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]  # fmt: skip
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


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


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[list[str], list, str]:
    """(classes, [(load_jpeg_bytes, label)], source) for split 'train' (60k) or 'val' (10k)."""
    images, labels = fashion_mnist_arrays(split, root)
    items = [(lambda im=im: _jpeg(Image.fromarray(im, "L")), int(y)) for im, y in zip(images, labels)]
    return FASHION_MNIST_CLASSES, items, f"fashion-mnist:{split}"


def image_folder(root: Path) -> tuple[list[str], list, str]:
    """(classes, items, source) from `root/<class>/<image>`; classes sorted as ImageNet tools do."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    items = []
    for y, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                items.append((lambda f=f: _load_image_file(f), y))
    if not items:
        raise DataError(f"{root}: no images found under its class directories")
    return classes, items, f"folder:{root}"


def _load_image_file(f: Path) -> bytes:
    data = f.read_bytes()
    try:
        img = Image.open(io.BytesIO(data))
        img.verify()  # catch corrupt files here, at sharding time, naming the file
    except Exception as e:
        raise DataError(f"{f}: not a readable image ({e})") from e
    if img.format == "JPEG":
        return data  # keep original bytes: no second lossy encode
    return _jpeg(Image.open(io.BytesIO(data)))


def write_shards(
    items: list,
    classes: list[str],
    out: Path,
    name: str,
    source: str = "",
    shard_size: int = 1000,
    seed: int = 0,
    limit: int = 0,
) -> Manifest:
    """Shuffle, then write `out/<name>-%06d.tar` and `out/manifest.json` (+ DALI .idx if present)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}-*.tar"):
        old.unlink()
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if limit:
        order = order[:limit]
    pattern = str(out / f"{name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i, idx in enumerate(order):
            load, label = items[idx]
            sink.write({"__key__": f"{i:08d}", "jpg": load(), "cls": str(label).encode()})
    files = sorted(out.glob(f"{name}-*.tar"))
    counts = [min(shard_size, len(order) - i * shard_size) for i in range(len(files))]
    m = Manifest(
        name=name,
        classes=classes,
        shards=[ShardInfo(f.name, n, sha256_file(f), f.stat().st_size) for f, n in zip(files, counts)],
        source=source,
    )
    write_dali_indexes(files)
    m.save(out)
    return m


def write_dali_indexes(files: list[Path]) -> None:
    """DALI's reader wants an index per tar; `wds2idx` ships with the DALI wheel."""
    # on PATH, or beside this interpreter (a venv used without activating it)
    tool = shutil.which("wds2idx") or shutil.which("wds2idx", path=str(Path(sys.executable).parent))
    if tool is None:
        return
    for f in files:
        # wds2idx ignores tar's exit status, so the tar was checked by writing it ourselves.
        with atomic_path(f.with_suffix(".idx")) as tmp:
            subprocess.run([tool, str(f), str(tmp)], check=True, capture_output=True)


def iter_samples(files: list[Path]) -> Iterator[dict]:
    """Raw samples of the given shards, in order; a broken tar raises DataError naming it."""
    yield from wds.DataPipeline(
        wds.SimpleShardList([str(f) for f in files]), wds.tarfile_to_samples(handler=broken_tar)
    )
