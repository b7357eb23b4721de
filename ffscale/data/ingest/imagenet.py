"""ImageNet (ILSVRC2012) as people have it -> `Source`s for train and val, layout found by itself.

Layouts, under one root (any mix of them):
- the official archives: `ILSVRC2012_img_train.tar` (1,000 per-class tars, read in place: no 1.28M
  files unpacked), `ILSVRC2012_img_val.tar` (50,000 flat JPEGs) with the devkit
  `ILSVRC2012_devkit_t12.tar.gz` (or unpacked): `data/meta.mat` (synsets: ILSVRC2012_ID, WNID, words)
  and `data/ILSVRC2012_validation_ground_truth.txt` (the ILSVRC2012_ID of val image n on line n);
- unpacked: `train/<synset>/*.JPEG`, `val/` flat (labels from the devkit) or `val/<synset>/`;
- Kaggle's: `ILSVRC/Data/CLS-LOC/{train,val}`, `LOC_synset_mapping.txt`, `LOC_val_solution.csv`.

Class k is the k-th synset id in sorted order, as in timm's and torchvision's checkpoints (the
devkit's ILSVRC2012_IDs number them differently); class names are the synsets' words.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ffscale.data.ingest.sources import IMAGE_EXTS, Source, Span, image_folder
from ffscale.data.manifest import DataError

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12"
GROUND_TRUTH, META = "ILSVRC2012_validation_ground_truth.txt", "meta.mat"
KAGGLE = Path("ILSVRC/Data/CLS-LOC")
SYNSET = re.compile(r"n\d{8}$")


@dataclass
class Synsets:
    """Sorted WordNet ids with their words; `by_ilsvrc_id` from the devkit (1-based ILSVRC2012_ID)."""

    ids: list[str]
    words: dict[str, str]
    by_ilsvrc_id: dict[int, str] = field(default_factory=dict)
    origin: str = ""

    def index(self) -> dict[str, int]:
        return {s: k for k, s in enumerate(self.ids)}

    def names(self) -> list[str]:
        return [self.words.get(s, s) for s in self.ids]


def shard_sources(root: Path) -> tuple[Source | None, Source | None, list[str]]:
    """(train, val, what was found), from whatever layout `root` holds."""
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    devkit = _devkit(root)
    synsets = devkit[0] if devkit else _loc_synsets(root)
    found = [f"classes from {synsets.origin}"] if synsets else []
    train = _train(root, synsets, found)
    if synsets is None and train is not None:
        synsets = Synsets(train.class_ids, {})
    val = _val(root, synsets, devkit[1] if devkit else None, found)
    if train is None and val is None:
        raise DataError(
            f"{root}: no ImageNet layout found: expected {TRAIN_TAR} / {VAL_TAR} with {DEVKIT}.tar.gz, "
            f"train/ and val/ folders, or Kaggle's {KAGGLE} with LOC_val_solution.csv"
        )
    if train is not None and val is not None and train.class_ids != val.class_ids:
        missing = sorted(set(train.class_ids) ^ set(val.class_ids))[:3]
        raise DataError(f"{root}: train and val have different classes (e.g. {', '.join(missing)})")
    return train, val, found


def _first(root: Path, *names: str | Path) -> Path | None:
    return next((root / n for n in names if (root / n).exists()), None)


# --- classes ---------------------------------------------------------------------------------


def _devkit(root: Path) -> tuple[Synsets, list[int]] | None:
    """(synsets, val ground truth as ILSVRC2012_IDs) from the devkit archive or its unpacked folder."""
    path = _first(root, f"{DEVKIT}.tar.gz", f"{DEVKIT}.tar", DEVKIT)
    if path is None:
        return None
    try:
        if path.is_dir():
            meta, gt = (path / "data" / META).read_bytes(), (path / "data" / GROUND_TRUTH).read_text()
        else:
            with tarfile.open(path) as tf:
                members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
                if META not in members or GROUND_TRUTH not in members:
                    raise DataError(f"{path}: no data/{META} or data/{GROUND_TRUTH} in it")
                meta = tf.extractfile(members[META]).read()
                gt = tf.extractfile(members[GROUND_TRUTH]).read().decode()
        truth = [int(v) for v in gt.split()]
    except (OSError, EOFError, tarfile.TarError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable ILSVRC2012 devkit ({e})") from None
    return _read_meta(meta, path), truth


def _read_meta(data: bytes, where: Path) -> Synsets:
    """meta.mat's `synsets` struct array: the 1,000 leaves (num_children 0) are the classes."""
    from scipy.io import loadmat

    try:
        syn = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        rows = [(int(i), str(w), str(words)) for i, w, words, n in
                zip(syn["ILSVRC2012_ID"], syn["WNID"], syn["words"], syn["num_children"]) if n == 0]  # fmt: skip
    except Exception as e:
        raise DataError(f"{where}: {META} is not the devkit's synset table ({e})") from e
    return Synsets(
        sorted(w for _, w, _ in rows), {w: words for _, w, words in rows},
        {i: w for i, w, _ in rows}, f"{where.name}/data/{META}",
    )  # fmt: skip


def _loc_synsets(root: Path) -> Synsets | None:
    path = _first(root, "LOC_synset_mapping.txt")
    if path is None:
        return None
    words = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        wnid, _, name = line.strip().partition(" ")
        if line.strip() and not SYNSET.match(wnid):
            raise DataError(f"{path}:{n}: expected `<synset id> <words>`, got {line[:40]!r}")
        if wnid:
            words[wnid] = name.strip()
    return Synsets(sorted(words), words, origin=path.name)


# --- train -----------------------------------------------------------------------------------


def _train(root: Path, synsets: Synsets | None, found: list[str]) -> Source | None:
    tar = _first(root, TRAIN_TAR)
    if tar is not None:
        found.append(f"train: {tar.name} (per-class tars, read in place)")
        return _train_tar(tar, synsets)
    folder = _first(root, "train", KAGGLE / "train")
    return None if folder is None else _class_folders(folder, synsets, "train", found)


def _class_folders(folder: Path, synsets: Synsets | None, split: str, found: list[str]) -> Source:
    """`folder/<synset>/<image>`, named by the synsets' words when known."""
    found.append(f"{split}: {folder} (class folders)")
    src = image_folder(folder, synsets.words if synsets else {})
    _known(src.class_ids, synsets, folder)
    return Source(f"imagenet:{folder}", src.classes, src.items, src.class_ids)


def _known(ids: list[str], synsets: Synsets | None, where: Path) -> None:
    if synsets and ids != synsets.ids:
        odd = sorted(set(ids) ^ set(synsets.ids))[:3]
        raise DataError(
            f"{where}: its classes differ from {synsets.origin}'s {len(synsets.ids)} ({', '.join(odd)})"
        )


def _train_tar(path: Path, synsets: Synsets | None) -> Source:
    """Spans of every image inside every per-class tar, found by reading headers only."""
    per_class: dict[str, list[Span]] = {}
    with open(path, "rb") as f:
        try:
            outer = tarfile.open(fileobj=f, mode="r:")
            members = [m for m in outer.getmembers() if m.isfile()]
        except tarfile.TarError as e:
            raise DataError(f"{path}: not a readable tar ({e})") from e
        for m in members:
            wnid = Path(m.name).stem
            if not (m.name.endswith(".tar") and SYNSET.match(wnid)):
                raise DataError(f"{path}: member {m.name} is not a per-class tar (<synset>.tar)")
            f.seek(m.offset_data)
            try:
                inner = tarfile.open(fileobj=f, mode="r:")
                per_class[wnid] = [
                    Span(str(path), x.offset_data, x.size, f"{path.name}:{m.name}:{x.name}")
                    for x in inner.getmembers()
                    if x.isfile() and Path(x.name).suffix.lower() in IMAGE_EXTS
                ]
            except tarfile.TarError as e:
                raise DataError(f"{path}: {m.name} is not a readable tar ({e})") from e
            if any(s.offset + s.size > m.offset_data + m.size for s in per_class[wnid]):
                raise DataError(f"{path}: {m.name} reaches past its own end (damaged archive)")
    ids = sorted(per_class)
    _known(ids, synsets, path)
    names = synsets.names() if synsets else ids
    items = [(s, k) for k, w in enumerate(ids) for s in sorted(per_class[w], key=lambda s: s.name)]
    return Source(f"imagenet:{path}", names, items, ids)


# --- val -------------------------------------------------------------------------------------


def _val(root: Path, synsets: Synsets | None, truth: list[int] | None, found: list[str]) -> Source | None:
    tar, folder = _first(root, VAL_TAR), _first(root, "val", KAGGLE / "val")
    if tar is None and folder is None:
        return None
    if folder is not None and any(SYNSET.match(p.name) and p.is_dir() for p in folder.iterdir()):
        return _class_folders(folder, synsets, "val", found)
    images = _val_tar(tar) if tar is not None else _val_folder(folder)
    where = tar or folder
    if synsets is None:
        raise _unlabelled(where)
    labels, origin = _val_labels(root, synsets, truth, where)
    found.append(f"val: {where} (flat) labelled by {origin}")
    index, items = synsets.index(), []
    for name, loc in sorted(images.items()):
        wnid = labels.get(name)
        if wnid is None:
            raise DataError(f"{where}: {name} has no label in {origin}")
        items.append((loc, index[wnid]))
    if len(items) != len(labels):
        raise DataError(f"{origin} labels {len(labels)} val images, {where} holds {len(items)}")
    return Source(f"imagenet:{where}", synsets.names(), items, synsets.ids)


def _unlabelled(where: Path) -> DataError:
    return DataError(f"{where}: flat val images but no labels: add {DEVKIT}.tar.gz or LOC_val_solution.csv")


def _val_tar(path: Path) -> dict[str, Span]:
    with open(path, "rb") as f:
        try:
            members = [m for m in tarfile.open(fileobj=f, mode="r:").getmembers() if m.isfile()]
        except tarfile.TarError as e:
            raise DataError(f"{path}: not a readable tar ({e})") from e
    return {Path(m.name).stem: Span(str(path), m.offset_data, m.size, f"{path.name}:{m.name}")
            for m in members if Path(m.name).suffix.lower() in IMAGE_EXTS}  # fmt: skip


def _val_folder(folder: Path) -> dict[str, Path]:
    return {f.stem: f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS}


def _val_labels(
    root: Path, synsets: Synsets, truth: list[int] | None, where: Path
) -> tuple[dict[str, str], str]:
    """{image stem: synset} from the devkit's ground truth, else LOC_val_solution.csv."""
    if truth is not None:
        bad = next((i for i in truth if i not in synsets.by_ilsvrc_id), None)
        if bad is not None:
            raise DataError(f"{GROUND_TRUTH}: ILSVRC2012_ID {bad} is not a class in {META}")
        return {
            f"ILSVRC2012_val_{n:08d}": synsets.by_ilsvrc_id[i] for n, i in enumerate(truth, 1)
        }, GROUND_TRUTH
    sol = _first(root, "LOC_val_solution.csv")
    if sol is None:
        raise _unlabelled(where)
    out, known = {}, set(synsets.ids)
    rows = list(csv.reader(sol.read_text().splitlines()))
    for n, row in enumerate(rows[1:], 2):
        wnid = row[1].split()[0] if len(row) > 1 and row[1].split() else ""
        if wnid not in known:
            raise DataError(f"{sol}:{n}: {wnid or 'no synset'} is not one of the {len(known)} classes")
        out[row[0]] = wnid
    return out, sol.name
