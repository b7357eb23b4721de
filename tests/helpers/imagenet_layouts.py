"""Small ILSVRC2012 look-alikes in every layout `ffscale shard imagenet` reads, from real
Fashion-MNIST pictures, with the devkit's files laid out as the real ones are (meta.mat's synsets
struct array with non-leaf synsets, ILSVRC2012_IDs in another order than the sorted synsets)."""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ffscale.data.ingest.sources import fashion_mnist_arrays

# real synsets and words; devkit ILSVRC2012_IDs deliberately not in sorted-synset order
SYNSETS = {
    "n01440764": ("tench, Tinca tinca", 3),
    "n01443537": ("goldfish, Carassius auratus", 1),
    "n01484850": ("great white shark", 5),
    "n01491361": ("tiger shark, Galeocerdo cuvieri", 2),
    "n01494475": ("hammerhead, hammerhead shark", 4),
}
TRAIN_PER_CLASS, VAL = 4, 10


def pictures(n: int, offset: int = 0) -> list[bytes]:
    images, _ = fashion_mnist_arrays("val")
    out = []
    for i in range(offset, offset + n):
        buf = io.BytesIO()
        Image.fromarray(images[i], "L").convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Plan:
    """Which picture is which image, and its synset."""

    def __init__(self):
        wnids = sorted(SYNSETS)
        pics = pictures(len(wnids) * TRAIN_PER_CLASS + VAL)
        self.train = {w: pics[k * TRAIN_PER_CLASS : (k + 1) * TRAIN_PER_CLASS] for k, w in enumerate(wnids)}
        self.val = [
            (pics[len(wnids) * TRAIN_PER_CLASS + i], wnids[(3 * i + 1) % len(wnids)]) for i in range(VAL)
        ]

    def expected(self, split: str) -> dict[str, str]:
        if split == "train":
            return {digest(p): w for w, ps in self.train.items() for p in ps}
        return {digest(p): w for p, w in self.val}


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            _add(tf, name, data)
    return buf.getvalue()


def meta_mat() -> bytes:
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]  # fmt: skip
    rows = [(i, w, words, "gloss", 0, np.zeros(0), 0, TRAIN_PER_CLASS) for w, (words, i) in SYNSETS.items()]
    rows += [(1001, "n00001740", "entity", "gloss", 2, np.array([1, 2]), 18, 0),
             (1002, "n01471682", "vertebrate", "gloss", 3, np.array([3, 4, 5]), 10, 0)]  # fmt: skip
    arr = np.empty((len(rows), 1), dtype=[(f, "O") for f in fields])
    for r, row in enumerate(rows):
        arr[r, 0] = row
    buf = io.BytesIO()
    savemat(buf, {"synsets": arr})
    return buf.getvalue()


def ground_truth(plan: Plan) -> str:
    return "".join(f"{SYNSETS[w][1]}\n" for _, w in plan.val)


def val_name(n: int) -> str:
    return f"ILSVRC2012_val_{n:08d}.JPEG"


def devkit_tgz(path: Path, plan: Plan) -> None:
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat())
        _add(
            tf,
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
            ground_truth(plan).encode(),
        )
        _add(tf, "ILSVRC2012_devkit_t12/COPYING", b"devkit")


def official_archives(root: Path, plan: Plan) -> Path:
    """ILSVRC2012_img_train.tar (per-class tars), ILSVRC2012_img_val.tar, the devkit .tar.gz."""
    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as tf:
        for w, ps in plan.train.items():
            _add(tf, f"{w}.tar", _tar_bytes({f"{w}_{k + 10}.JPEG": p for k, p in enumerate(ps)}))
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tf:
        for n, (p, _) in enumerate(plan.val, 1):
            _add(tf, val_name(n), p)
    devkit_tgz(root / "ILSVRC2012_devkit_t12.tar.gz", plan)
    return root


def _folders(train: Path, plan: Plan) -> None:
    for w, ps in plan.train.items():
        (train / w).mkdir(parents=True)
        for k, p in enumerate(ps):
            (train / w / f"{w}_{k + 10}.JPEG").write_bytes(p)


def _flat_val(val: Path, plan: Plan) -> None:
    val.mkdir(parents=True)
    for n, (p, _) in enumerate(plan.val, 1):
        (val / val_name(n)).write_bytes(p)


def unpacked_with_devkit(root: Path, plan: Plan) -> Path:
    """train/<synset>/, a flat val/ and the devkit unpacked."""
    _folders(root / "train", plan)
    _flat_val(root / "val", plan)
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "meta.mat").write_bytes(meta_mat())
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(ground_truth(plan))
    return root


def class_folders(root: Path, plan: Plan) -> Path:
    """train/<synset>/ and val/<synset>/, no devkit (names are then the synset ids)."""
    _folders(root / "train", plan)
    for n, (p, w) in enumerate(plan.val, 1):
        (root / "val" / w).mkdir(parents=True, exist_ok=True)
        (root / "val" / w / val_name(n)).write_bytes(p)
    return root


def kaggle(root: Path, plan: Plan) -> Path:
    """ILSVRC/Data/CLS-LOC/{train,val}, LOC_synset_mapping.txt, LOC_val_solution.csv."""
    base = root / "ILSVRC" / "Data" / "CLS-LOC"
    _folders(base / "train", plan)
    _flat_val(base / "val", plan)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {SYNSETS[w][0]}\n" for w in sorted(SYNSETS)))
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["ImageId", "PredictionString"])
        for n, (_, w) in reversed(list(enumerate(plan.val, 1))):  # not in file order, as Kaggle's
            out.writerow([val_name(n)[:-5], f"{w} 10 12 200 180 {w} 1 2 30 40"])
    return root


LAYOUTS = {"archives": official_archives, "unpacked": unpacked_with_devkit, "folders": class_folders,
           "kaggle": kaggle}  # fmt: skip


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
