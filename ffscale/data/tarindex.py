"""Random access to the samples of WebDataset shards: sample i of the split -> its members' bytes,
read with one `pread` per member at the offsets DALI's `.idx` files give (the tar's own headers
where a shard has no index). Both loaders read through it, so a rank reads exactly its samples.

Each member is read with the 512-byte tar header before it, and the header is checked (checksum,
size) before the bytes are trusted: a damaged shard is named, as a sequential tar reader would
name it, and never decoded as some other member's bytes. The sample's key comes from that header,
so no per-sample strings are held: the index costs 36 bytes a sample (46 MB for ImageNet's train).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from ffscale.data.manifest import Members
from ffscale.errors import DataError

HEADER = tarfile.BLOCKSIZE  # 512


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def _from_idx(path: Path) -> list[dict[str, tuple[int, int]]] | None:
    """DALI's index (wds2idx v1.2: `ext offset size name` per member, a line per sample)."""
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2"):
        return None
    out = []
    for ln in lines[1:]:
        t = ln.split()
        out.append({t[k].lower(): (int(t[k + 1]), int(t[k + 2])) for k in range(0, len(t) - 3, 4)})
    return out


def _from_tar(path: Path) -> list[dict[str, tuple[int, int]]]:
    """The same from the tar's headers (seeks over the data: reads 512 bytes a member)."""
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
    except tarfile.TarError as e:
        raise DataError(f"shard {path}: not a readable tar ({e})") from e
    return out


class TarIndex:
    """Where each sample's image and label members lie in the split's shards."""

    def __init__(self, files: list[Path], indexes: list[Path], counts: list[int], members: Members):
        self.files, self.members = [str(f) for f in files], members
        self.counts = np.asarray(counts, dtype=np.int64)
        n = int(self.counts.sum())
        self.shard = np.repeat(np.arange(len(files), dtype=np.int32), self.counts)
        self.img = np.full((n, 2), -1, dtype=np.int64)  # (data offset, size); -1: member absent
        self.lab = np.full((n, 2), -1, dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        image_exts = members.lower_exts
        label = members.label_member.lower()
        i = 0
        for f, ix, count in zip(files, indexes, counts):
            found = (_from_idx(ix) if ix.is_file() and ix.stat().st_size else None) or _from_tar(f)
            if len(found) != count:
                raise DataError(
                    f"shard {f}: {len(found)} samples in its {'index ' + str(ix) if ix.is_file() else 'tar'}, "
                    f"the manifest says {count}; rewrite the index with `ffscale shard index {f.parent}`"
                )
            for s in found:
                img = next((s[e] for e in image_exts if e in s), None)
                if img is not None:
                    self.img[i] = img
                if label in s:
                    self.lab[i] = s[label]
                i += 1
        self.bytes_read = 0  # by this process (counted for the tests and `ffscale bench plan`)

    def __len__(self) -> int:
        return len(self.shard)

    def where(self, i: int) -> str:
        k = int(self.shard[i])
        return f"shard {self.files[k]} sample {int(i - self.start[k])}"

    def _member(self, i: int, fd: int, off: int, size: int, sample: dict) -> bytes:
        buf = os.pread(fd, size + HEADER, off - HEADER)
        self.bytes_read += len(buf)
        try:
            info = tarfile.TarInfo.frombuf(buf[:HEADER], "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise DataError(f"{self.where(i)}: not a readable tar here ({e}; damaged?)") from None
        if info.size != size or len(buf) != size + HEADER:
            raise DataError(f"{self.where(i)}: not a readable tar here (member size differs; damaged?)")
        sample.setdefault("__key__", split_name(info.name)[0])
        return buf[HEADER:]

    def read(self, i: int) -> dict:
        """Sample `i` as webdataset gives it: {__key__, __url__, <image ext>, <label member>}, only
        the members the loaders use. Raises DataError naming the shard where the tar is damaged."""
        k = int(self.shard[i])
        sample: dict = {"__url__": self.files[k]}
        # opened per sample, as DeiT's ImageFolder opens a file per image: descriptors kept open per
        # shard would pass the usual 1,024-file limit on ImageNet's 1,025 train shards
        fd = os.open(self.files[k], os.O_RDONLY)
        try:
            for (off, size), name in (
                (self.img[i], self.members.lower_exts[0]),
                (self.lab[i], self.members.label_member),
            ):
                if size >= 0:
                    sample[name] = self._member(i, fd, int(off), int(size), sample)
        finally:
            os.close(fd)
        sample.setdefault("__key__", f"#{int(i - self.start[k])}")
        return sample

    def sample_bytes(self, i: int) -> int:
        """What `read(i)` reads: its members with their headers."""
        return int(sum(s + HEADER for s in (self.img[i, 1], self.lab[i, 1]) if s >= 0))
