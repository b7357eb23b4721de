"""Describe WebDataset shards written by other tools (timm's, webdataset's, img2dataset's): count
their samples, find their image and label members, hash them and write DALI's indexes, the split's
binary sample index and an ffscale manifest, without rewriting a tar. The tars may be read-only: the
manifest, the `.idx` files and the index go to `out` (default: beside them), naming the tars by
relative path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ffscale.data.ingest import reindex
from ffscale.data.ingest.forked import forked_map
from ffscale.data.ingest.writer import write_dali_indexes
from ffscale.data.manifest import DataError, Manifest, ShardInfo
from ffscale.data.sampleindex import split_name
from ffscale.util.bar import Bar

IMAGE_MEMBERS = {"jpg", "jpeg", "png", "webp"}
LABEL_FIELDS = ("label", "cls", "class", "target", "class_id")  # tried in order in a .json member


@dataclass
class Scan:
    """What one tar holds."""

    file: Path
    count: int = 0
    sha256: str = ""
    size: int = 0
    exts: Counter = field(default_factory=Counter)  # image member extension -> samples
    cls: int = 0  # samples with an integer .cls
    json_fields: Counter = field(default_factory=Counter)  # integer field of .json -> samples
    labels: set = field(default_factory=set)  # values of the label members (cls, else each field)
    json_labels: dict = field(default_factory=dict)  # field -> set of values


class _Hashing:
    """A file read once: hashed while tarfile streams through it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.h.update(b)
        self.n += len(b)
        return b


def scan(path: Path) -> Scan:
    s = Scan(path)
    with open(path, "rb") as raw:
        f = _Hashing(raw)
        key, sample = None, {}
        try:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    k, ext = split_name(m.name)
                    if k != key:
                        _sample(s, key, sample)
                        key, sample = k, {}
                    sample[ext] = tf.extractfile(m).read()
        except tarfile.TarError as e:
            raise DataError(f"shard {path}: not a readable tar ({e})") from e
        _sample(s, key, sample)
        while f.read(1 << 20):  # past the end-of-archive blocks: the digest covers the whole file
            pass
        s.sha256, s.size = f.h.hexdigest(), f.n
    return s


def _sample(scan: Scan, key: str | None, sample: dict) -> None:
    if key is None:
        return
    img = [e for e in sample if e.lower() in IMAGE_MEMBERS]
    if not img:
        raise DataError(f"shard {scan.file} sample {key}: no image member (.jpg/.jpeg/.png/.webp)")
    scan.count += 1
    scan.exts[img[0]] += 1
    if "cls" in sample:
        v = sample["cls"].decode(errors="replace").strip()
        if not v.isdigit():
            raise DataError(f"shard {scan.file} sample {key}: .cls {sample['cls'][:20]!r} is not an integer")
        scan.cls += 1
        scan.labels.add(int(v))
    if "json" in sample:
        try:
            d = json.loads(sample["json"])
        except ValueError as e:
            raise DataError(f"shard {scan.file} sample {key}: .json is not JSON ({e})") from e
        for k in LABEL_FIELDS:
            if isinstance(d, dict) and isinstance(d.get(k), int):
                scan.json_fields[k] += 1
                scan.json_labels.setdefault(k, set()).add(d[k])


def _scan_and_index(args: tuple[Path, Path]) -> Scan:
    tar, idx = args
    s = scan(tar)
    if s.count == 0:
        raise DataError(f"shard {tar}: holds no samples")
    try:
        write_dali_indexes([tar], idx)
    except OSError as e:
        raise DataError(
            f"{idx.parent}: cannot write DALI's index there ({e.strerror}); give --out DIR"
        ) from None
    if idx.is_file():  # DALI must see the samples this scan counted (names both split alike)
        head = idx.read_text().split("\n", 1)[0].split()
        if len(head) == 2 and head[1].isdigit() and int(head[1]) != s.count:
            raise DataError(f"shard {tar}: DALI's wds2idx finds {head[1]} samples, ffscale {s.count}: "
                            "members without an extension, hidden files or keys split across the tar?")  # fmt: skip
    return s


def index_shards(
    root: Path,
    out: Path | None = None,
    pattern: str = "*.tar",
    classes_file: Path | None = None,
    label_field: str | None = None,
    num_classes: int = 0,
    workers: int = 1,
    progress: bool = False,
) -> Manifest:
    files = sorted(root.glob(pattern))
    if not files:
        raise DataError(f"{root}: no shards match {pattern!r}")
    out = out or root
    if out.resolve() == root.resolve() and len(files) < len(list(root.glob("*.tar"))):
        raise DataError(
            f"{root}: {pattern!r} picks {len(files)} of its tars (several splits): give --out DIR "
            "for this split's manifest and DALI indexes"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create it ({e.strerror}); give --out DIR") from None
    jobs = [(f, out / (f.stem + ".idx")) for f in files]
    bar, scans = Bar(f"index {root}", len(files), enabled=progress, unit="shards"), {}
    for s in forked_map(_scan_and_index, jobs, workers):
        scans[s.file] = s
        bar.update(1)
    bar.close()
    m = _manifest([scans[f] for f in files], out, pattern, classes_file, label_field, num_classes)
    # the binary sample index once the members are known (which image extension, which label member)
    m.index_sha256 = reindex.write(out, files, [s.count for s in m.shards], m.members, workers)
    m.save(out)
    return m


def _label(scans: list[Scan], label_field: str | None) -> tuple[str, set]:
    """('cls' or 'json:<field>', label values) that every sample has."""
    n = sum(s.count for s in scans)
    if label_field is None and sum(s.cls for s in scans) == n:
        return "cls", set().union(*(s.labels for s in scans))
    fields = [label_field] if label_field else list(LABEL_FIELDS)
    for k in fields:
        if sum(s.json_fields[k] for s in scans) == n:
            return f"json:{k}", set().union(*(s.json_labels.get(k, set()) for s in scans))
    short = next(s for s in scans if s.cls < s.count and not any(s.json_fields[k] == s.count for k in fields))
    want = f"an integer `{label_field}` in .json" if label_field else "a .cls or an integer label in .json"
    raise DataError(f"shard {short.file}: not every sample has {want} (give --label-field)")


def read_classes(path: Path) -> tuple[list[str], list[str] | None]:
    """(names, ids): one class per line, `<synset> <words>` (LOC_synset_mapping.txt) or a name."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    pairs = [line.partition(" ") for line in lines]
    if all(a.startswith("n") and a[1:].isdigit() for a, _, _ in pairs):
        return [w.strip() or a for a, _, w in pairs], [a for a, _, _ in pairs]
    return lines, None


def _manifest(scans, out, pattern, classes_file, label_field, num_classes) -> Manifest:
    label, values = _label(scans, label_field)
    if min(values) < 0:
        raise DataError(f"{scans[0].file.parent}: negative label {min(values)}")
    if classes_file:
        names, ids = read_classes(classes_file)
    else:
        names, ids = [str(k) for k in range(max(num_classes, max(values) + 1))], None
    if max(values) >= len(names):
        raise DataError(f"{scans[0].file.parent}: label {max(values)} but {len(names)} classes")
    stems = [s.file.stem for s in scans]
    name = os.path.commonprefix(stems).rstrip("-_0123456789") or scans[0].file.parent.name
    exts = sorted(set().union(*(s.exts for s in scans)))
    m = Manifest(
        name, names,
        [ShardInfo(os.path.relpath(s.file, out), s.count, s.sha256, s.size) for s in scans],
        f"indexed:{scans[0].file.parent}/{pattern}", class_ids=ids, image_exts=exts, label=label,
    )  # fmt: skip
    return m
