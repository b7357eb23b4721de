"""The shard manifest: what a shard directory holds, checked before training trusts it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ffscale.errors import DataError
from ffscale.util.atomic import write_atomic

MANIFEST = "manifest.json"
# folder names that say which split, not which dataset (data/pets/train: the dataset is "pets")
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "eval", "shards", "images", "imgs"}


@dataclass
class ShardInfo:
    file: str  # relative to the manifest's directory
    count: int
    sha256: str
    size: int = 0  # bytes; 0 in manifests written before sizes were recorded


@dataclass(frozen=True)
class Members:
    """Which tar members of a sample hold its image and its label, as the loaders read them."""

    image_exts: tuple[str, ...] = ("jpg",)
    label: str = "cls"  # or "json:<field>"

    @property
    def label_member(self) -> str:
        return self.label.partition(":")[0]

    @property
    def label_key(self) -> str:
        """The .json field holding the label ("" for .cls)."""
        return self.label.partition(":")[2]

    @property
    def lower_exts(self) -> tuple[str, ...]:
        return tuple(e.lower() for e in self.image_exts)  # webdataset lower-cases member extensions


@dataclass
class Manifest:
    name: str
    classes: list[str]
    shards: list[ShardInfo] = field(default_factory=list)
    source: str = ""
    class_ids: list[str] | None = None  # e.g. WordNet synsets; names (`classes`) need not be unique
    # how a sample is stored: image member extensions, the label member ("cls", or "json:<field>")
    image_exts: list[str] = field(default_factory=lambda: ["jpg"])
    label: str = "cls"
    converted: dict[str, int] = field(default_factory=dict)  # re-encoded to RGB JPEG, by reason
    max_side: int = 0  # images downscaled to this longer side at sharding time (0: not)
    # sha256 of the split's binary sample index (sampleindex.INDEX) beside the manifest; "" where none
    # was written (sets made before it existed, or by an interrupted run). Not part of `digest`: the
    # index is derived from the shards, and a set's digest (runs' tags, model cards) names its content
    index_sha256: str = ""

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def digest(self) -> str:
        """Content digest of the whole set: a hash of the shards' hashes, in order."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.sha256.encode())
        return h.hexdigest()[:16]

    @property
    def dataset(self) -> str:
        """The name tables show: the named source's (fashion-mnist, imagenet, ...), or for a source that is
        a path (folder, flat, indexed) its last folder that is not a split's name; else the split's name."""
        return dataset_name(self.source, self.name)

    @property
    def tag(self) -> str:
        """The set as "dataset:digest": what a stage run is tagged with and a model card records."""
        return f"{self.dataset}:{self.digest}"

    @property
    def members(self) -> Members:
        return Members(tuple(self.image_exts), self.label)

    @property
    def identity(self) -> list[str]:
        """What makes two splits' labels mean the same classes."""
        return self.class_ids or self.classes

    def index_file(self, root: Path, shard: ShardInfo) -> Path:
        """DALI's index of a shard: beside the manifest (shards indexed in place may live elsewhere)."""
        return root / (Path(shard.file).stem + ".idx")

    def save(self, root: Path) -> None:
        d = asdict(self) | {"num_samples": self.num_samples, "digest": self.digest}
        write_atomic(root / MANIFEST, json.dumps(d, indent=1))


def broken_tar(error: Exception) -> bool:
    """webdataset's handler for tar-level errors (its args end with the shard's URL): name the shard."""
    where = error.args[-1] if len(error.args) > 1 else "?"
    raise DataError(
        f"shard {where}: not a readable tar ({error.args[0] if error.args else error})"
    ) from error


def dataset_name(source: str, fallback: str) -> str:
    """See `Manifest.dataset`; `fallback` (a split's name or a shard folder's path) where the source says
    nothing."""
    kind, _, rest = source.partition(":")
    if kind in ("folder", "flat", "indexed"):
        path = Path(rest.split(":")[0])  # flat:ROOT:LABELS, indexed:DIR/PATTERN
        return _not_a_split(path.parent if kind == "indexed" else path) or fallback
    return kind or _not_a_split(Path(fallback)) or Path(fallback).name or fallback


def _not_a_split(path: Path) -> str:
    """The last part of `path` that names something: not a split, not a glob, not / . or ..."""
    return next((p for p in reversed(path.parts) if p.lower() not in SPLIT_NAMES and _a_name(p)), "")


def _a_name(part: str) -> bool:
    return part not in ("/", ".", "..") and not any(c in part for c in "*?[")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(root: str | Path) -> tuple[Manifest, list[Path]]:
    """Read `root/manifest.json` and return it with the shard paths, all of which must exist. A URL
    root (https://, s3://, gs://: ffscale/data/remote.py) gives the shards' URLs, as strings."""
    if _is_url(root):
        return _load_remote(str(root))
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if any(root.glob("*.tar")):
            raise DataError(
                f"no shard manifest at {path}: shards written by another tool? "
                f"`ffscale shard index {root}` describes them without rewriting them"
            )
        hint = " (create shards with `ffscale shard ...`)" if root.exists() else ""
        raise DataError(f"no shard manifest at {path}{hint}")
    m, d = parse_manifest(path.read_text(), path)
    files = [Path(os.path.normpath(root / s.file)) for s in m.shards]  # indexed shards: ../x.tar
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{path}: shard(s) missing on disk: {', '.join(missing[:3])}")
    for info, f in zip(m.shards, files):  # cheap, every start: catches truncated or replaced shards
        if info.size and f.stat().st_size != info.size:
            raise DataError(
                f"shard {f}: {f.stat().st_size} bytes, {path} says {info.size} (truncated or replaced); "
                f"rewrite it with `ffscale shard`, or check every shard with `ffscale verify {root}`"
            )
    return m, files


def parse_manifest(text: str, path: str | Path) -> tuple[Manifest, dict]:
    """A manifest's text, checked (`path` names it in errors); with the raw dict."""
    try:
        d = json.loads(text)
        known = set(Manifest.__dataclass_fields__)
        m = Manifest(**{k: v for k, v in d.items() if k in known})
        m.shards = [ShardInfo(**s) for s in d["shards"]]
        if not isinstance(m.classes, list) or not m.classes:
            raise ValueError("no class list")
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a valid ffscale shard manifest ({e})") from e
    if not m.shards:
        raise DataError(f"{path}: lists no shards")
    if "digest" in d and d["digest"] != m.digest:
        raise DataError(f"{path}: digest does not match its shard list (edited by hand?)")
    return m, d


def _is_url(root: str | Path) -> bool:
    return isinstance(root, str) and "://" in root  # fsspec is imported only for such a root


def _load_remote(root: str) -> tuple[Manifest, list]:
    """The manifest under a URL, and its shards' URLs; where the storage lists folders (S3, GCS, an
    http index page) each shard is found there with its recorded size, else when it is read."""
    from ffscale.data import remote

    if not remote.is_remote(root):
        raise DataError(f"{root}: not a local path nor a URL ffscale reads ({', '.join(remote.SCHEMES)})")
    url = remote.join(root, MANIFEST)
    try:
        text = remote.read_file(url).decode()
    except DataError as e:
        if "(404)" in str(e):
            raise DataError(f"no shard manifest at {remote.masked(url)}") from None
        raise
    m, _ = parse_manifest(text, remote.masked(url))
    files = [remote.join(root, s.file) for s in m.shards]
    listed: dict[str, dict[str, int] | None] = {}
    for info, f in zip(m.shards, files):
        folder, name = f.rsplit("/", 1)
        if folder not in listed:
            listed[folder] = remote.listing(folder)
        found = listed[folder]
        if found is None:
            continue
        if name not in found:
            raise DataError(f"{remote.masked(url)}: shard missing in storage: {remote.masked(f)}")
        if info.size and found[name] is not None and found[name] != info.size:
            raise DataError(
                f"shard {remote.masked(f)}: {found[name]} bytes, {remote.masked(url)} says {info.size} "
                "(truncated or replaced)"
            )
    return m, files


def verify(root: str | Path) -> Manifest:
    """Full check: each shard's size and sha256 equal the manifest's (catches swapped/truncated).
    `ffscale verify` also checks the binary sample index (sampleindex.verify)."""
    m, files = load_manifest(root)
    for info, f in zip(m.shards, files):
        if sha256_file(f) != info.sha256:
            raise DataError(f"shard {f}: content differs from {Path(root) / MANIFEST} (sha256)")
    return m
