"""One binary index per split: where every sample's image and label members lie in the split's shards,
as one `.npy` file beside the manifest (`sample-index.npy`), written when the shards are made and
opened memory-mapped at every start.

A record per sample: shard number, image member (data offset, size) and label member (data offset,
size), -1 where the member is absent; 36 bytes, 46 MB for ImageNet's 1.28M training images. Parsing
DALI's text `.idx` files instead costs every rank seconds and ~100 MB of reads per start on ImageNet;
the mapped file is shared by a node's ranks through the page cache. Its sha256 is in the manifest
(`index_sha256`): an index that differs is never used, the loaders then build the same arrays in
memory from the `.idx` files or the tars' headers (`parse`), as before the index existed.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tarfile
from pathlib import Path

import numpy as np
from numpy.lib import format as fmt

from ffscale.data.manifest import Manifest, Members, load_manifest
from ffscale.data.manifest import verify as verify_shards
from ffscale.errors import DataError

INDEX = "sample-index.npy"
# packed (36 bytes a record); "img" and "lab" are (n, 2) views of (data offset, size)
DTYPE = np.dtype([("shard", "<i4"), ("img", "<i8", (2,)), ("lab", "<i8", (2,))])
HEADER = tarfile.BLOCKSIZE  # 512

Found = list[dict[str, tuple[int, int]]]  # per sample: member extension (lower case) -> (offset, size)


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def from_idx(path: Path) -> Found | None:
    """DALI's index (wds2idx v1.2: `ext offset size name` per member, a line per sample)."""
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2"):
        return None
    out = []
    for ln in lines[1:]:
        t = ln.split()
        out.append({t[k].lower(): (int(t[k + 1]), int(t[k + 2])) for k in range(0, len(t) - 3, 4)})
    return out


def from_tar(path: Path) -> Found:
    """The same from the tar's headers (seeks over the data: reads 512 bytes a member); tarfile
    checks each header's checksum, so a damaged tar is named here."""
    out, key = [], None
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = split_name(m.name)
                if k != key:
                    out.append({})
                    key = k
                out[-1][ext.lower()] = (m.offset_data, m.size)
            # tarfile ends its iteration without a word at a bad header past the first member
            # (TarFile.next: InvalidHeaderError is raised only at offset 0); a whole tar ends in zeros
            tf.fileobj.seek(tf.offset)
            if tf.fileobj.read(HEADER).strip(b"\0"):
                raise DataError(
                    f"shard {path}: not a readable tar (no valid header at byte {tf.offset}; damaged?)"
                )
    except tarfile.TarError as e:
        raise DataError(f"shard {path}: not a readable tar ({e})") from e
    return out


def records(found: Found, shard: int, members: Members) -> np.ndarray:
    t = np.zeros(len(found), dtype=DTYPE)
    t["shard"] = shard
    t["img"] = t["lab"] = -1
    label = members.label_member.lower()
    for i, s in enumerate(found):
        img = next((s[e] for e in members.lower_exts if e in s), None)
        if img is not None:
            t["img"][i] = img
        if label in s:
            t["lab"][i] = s[label]
    return t


def checked(f: Path, found: Found, count: int, where: str) -> Found:
    if len(found) != count:
        raise DataError(
            f"shard {f}: {len(found)} samples in its {where}, the manifest says {count}; "
            f"rewrite the index with `ffscale shard index {f.parent}`"
        )
    return found


def parse(files: list[Path], indexes: list[Path], counts: list[int], members: Members) -> np.ndarray:
    """The table built in memory from DALI's `.idx` files (the tar's headers where a shard has none):
    what a split without a usable binary index costs every rank at every start."""
    parts = []
    for k, (f, ix, count) in enumerate(zip(files, indexes, counts)):
        has_idx = ix.is_file() and ix.stat().st_size > 0
        found = (from_idx(ix) if has_idx else None) or from_tar(f)
        parts.append(records(checked(f, found, count, f"index {ix}" if ix.is_file() else "tar"), k, members))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=DTYPE)


def open_table(root: Path, m: Manifest) -> tuple[np.ndarray | None, str]:
    """(the split's table mapped read-only, "") when its index is there and its sha256 is the manifest's;
    else (None, why not). One mapping serves both the hash and the arrays, so what is hashed is what is
    read (a file renamed over it meanwhile is not mixed in), and nothing is copied into this process:
    the pages stay the page cache's, shared by every rank of the node."""
    if not m.index_sha256:
        return None, "its manifest names no binary sample index"
    try:
        f = open(root / INDEX, "rb")
    except FileNotFoundError:
        return None, f"{INDEX} is missing (its manifest names one)"
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            return None, f"{INDEX} is empty"
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hashlib.sha256(mm).hexdigest() != m.index_sha256:
            mm.close()
            return (
                None,
                f"{INDEX} differs from its manifest's sha256 (changed since it was written): not trusted",
            )
        try:  # the .npy header, parsed as a literal: never unpickled
            version = fmt.read_magic(f)
            header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = header(f)
        except ValueError as e:
            mm.close()
            return None, f"{INDEX} is not a readable .npy file ({e})"
        if dtype != DTYPE or fortran or shape != (m.num_samples,):
            mm.close()
            return None, f"{INDEX} holds {shape} of {dtype}, not {m.num_samples} records of this format"
        # a view of the mapping (np.frombuffer copies nothing); the mapping lives as long as the array
        return np.frombuffer(mm, dtype=DTYPE, count=m.num_samples, offset=f.tell()), ""


def verify(root: str | Path) -> Manifest:
    """`ffscale verify` of a shard set: every shard's sha256 (manifest.verify), then the binary index
    where the manifest names one (`check_headers`)."""
    m = verify_shards(root)
    if m.index_sha256:
        check_headers(Path(root), m, load_manifest(root)[1])
    return m


def check_headers(root: Path, m: Manifest, files: list[Path]) -> None:
    """`ffscale verify`: the index's sha256 is the manifest's and every entry points at a tar header
    naming a member of the right kind and size, image and label of one key. Raises DataError naming the
    shard and sample."""
    table, why = open_table(root, m)
    if table is None:
        raise DataError(f"{root}: {why}; `ffscale shard reindex {root}` rewrites it")
    counts = np.array([s.count for s in m.shards], dtype=np.int64)
    if not np.array_equal(table["shard"], np.repeat(np.arange(len(files), dtype=np.int32), counts)):
        raise DataError(f"{root / INDEX}: its shard numbers do not follow the manifest's shard counts")
    start = 0
    for f, count in zip(files, counts.tolist()):
        img, lab = (table[c][start : start + count].tolist() for c in ("img", "lab"))
        fd = os.open(f, os.O_RDONLY)
        try:
            for j in range(count):
                _check_sample(fd, img[j], lab[j], m.members, f"shard {f} sample {j}", root)
        finally:
            os.close(fd)
        start += count


def _check_sample(fd: int, img: list, lab: list, members: Members, where: str, root: Path) -> None:
    keys = []
    for (off, size), kinds in ((img, members.lower_exts), (lab, (members.label_member.lower(),))):
        if size < 0:
            continue
        say = f"{where}: {INDEX} says a {size}-byte .{'/.'.join(kinds)} member at byte {off}"
        try:
            info = tarfile.TarInfo.frombuf(os.pread(fd, HEADER, off - HEADER), "utf-8", "surrogateescape")
        except (tarfile.HeaderError, OSError):
            raise DataError(f"{say}, the tar has no header there (`ffscale shard reindex {root}`)") from None
        # a name too long for the header's field is carried by a record before it (GNU's ././@LongLink,
        # or a pax header) and the field holds its first 99 characters (tarfile.py, _create_gnu_long_header)
        whole = len(info.name) < tarfile.LENGTH_NAME - 1
        key, ext = split_name(info.name)
        if info.size != size or (whole and ext.lower() not in kinds):
            raise DataError(
                f"{say}, the tar has {info.name} ({info.size} bytes) (`ffscale shard reindex {root}`)"
            )
        if whole:
            keys.append(key)
    if len(set(keys)) > 1:
        raise DataError(f"{where}: {INDEX} pairs members of two samples ({', '.join(keys)})")
