"""The split's binary sample index (ffscale/data/sampleindex.py) written from the tars' own headers:
by the sharder once its shard list is final, by `ffscale shard index` once the members are known, and
by `ffscale shard reindex` for sets made before the index existed.

The tars' headers, not DALI's `.idx` files: tarfile checks each header's checksum as it reads it, so a
damaged tar is named here, once, in one line (`wds2idx` indexes a truncated tar without a word).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ffscale.data.ingest.forked import forked_map
from ffscale.data.manifest import Manifest, Members, load_manifest, sha256_file
from ffscale.data.sampleindex import INDEX, checked, from_tar, records
from ffscale.errors import DataError
from ffscale.util.atomic import atomic_path

_BUILD: tuple[list[Path], list[int], Members] | None = None  # a forked worker's inputs, inherited


def _build_one(k: int) -> tuple[int, np.ndarray]:
    files, counts, members = _BUILD
    return k, records(checked(files[k], from_tar(files[k]), counts[k], "tar"), k, members)


def build(files: list[Path], counts: list[int], members: Members, workers: int = 1) -> np.ndarray:
    """The table, a process per shard at a time (reads 512 bytes a member, seeks over the data)."""
    global _BUILD
    _BUILD = (files, counts, members)
    parts = dict(forked_map(_build_one, range(len(files)), workers))
    return np.concatenate([parts[k] for k in range(len(files))])


def write(root: Path, files: list[Path], counts: list[int], members: Members, workers: int = 1) -> str:
    """`root/sample-index.npy`, flushed and renamed into place; its sha256, for the manifest's
    `index_sha256` (saved after it, so a manifest never names an index that is not there)."""
    table = build(files, counts, members, workers)
    try:
        with atomic_path(root / INDEX) as tmp, open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
    except OSError as e:
        raise DataError(f"{root}: cannot write {INDEX} there ({e.strerror})") from None
    return sha256_file(root / INDEX)


def reindex(root: Path, workers: int = 1) -> Manifest:
    """`ffscale shard reindex`: the index of a set written before it existed (or whose index changed),
    and its sha256 in the manifest; the shards, their `.idx` files and the set's digest stay."""
    m, files = load_manifest(root)
    m.index_sha256 = write(root, files, [s.count for s in m.shards], m.members, workers)
    m.save(root)
    return m
