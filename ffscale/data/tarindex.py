"""Random access to the samples of WebDataset shards: sample i of the split -> its members' bytes,
read with one `pread` per member at the offsets of the split's binary index (ffscale/data/sampleindex.py,
mapped read-only), or, for a split without a usable one, of DALI's `.idx` files or the tars' headers
parsed in memory. Both loaders read through it, so a rank reads exactly its samples.

Each member is read with the 512-byte tar header before it, and the header is checked (checksum,
size) before the bytes are trusted: a damaged shard is named, as a sequential tar reader would
name it, and never decoded as some other member's bytes. The sample's key comes from that header,
so no per-sample strings are held: the index costs 36 bytes a sample (46 MB for ImageNet's train).

Each process opens a shard once and keeps its descriptor (`_Descriptors`, a bounded LRU; the soft
RLIMIT_NOFILE raised toward the hard limit the first time), so its opens per epoch grow with the
shards it touches, not with its samples: on NFS or Lustre an open is a metadata round trip, and
one per image would make the cluster's metadata rate its image rate.
"""

from __future__ import annotations

import functools
import os
import resource
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ffscale.data import sampleindex
from ffscale.data.manifest import Manifest, Members
from ffscale.data.sampleindex import HEADER, split_name
from ffscale.errors import DataError

# Descriptors a process may hold per index: a quarter of its (raised) soft limit, at most this many,
# which covers ImageNet's 1,025 train shards where the limit allows it.
MAX_OPEN_SHARDS = 4096
NOFILE_TARGET = 65536  # the soft limit asked for (no higher: some tools walk every possible fd)


@functools.cache
def raise_nofile_limit() -> int:
    """Once per process: the soft RLIMIT_NOFILE raised toward the hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, NOFILE_TARGET)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):  # a sandbox may refuse: the cache is then smaller
            pass
    return NOFILE_TARGET if soft == resource.RLIM_INFINITY else soft


def open_shard_capacity() -> int:
    return max(8, min(MAX_OPEN_SHARDS, raise_nofile_limit() // 4))


class _Descriptors:
    """Shard -> open read-only descriptor, least recently used closed beyond `capacity`. Reads use
    `pread`, which keeps no file offset, so one descriptor serves every reader. A forked child
    (DataLoader or DALI worker) opens its own: the table it inherited is dropped (its copies
    closed) the first time it reads (TarIndex.descriptors), so no descriptor is shared across
    processes."""

    def __init__(self, files: list[str]):
        self.files = files
        self.capacity = open_shard_capacity()
        self.lock = threading.Lock()  # held for a whole sample's reads: eviction never closes a busy fd
        self.pid = os.getpid()
        self.open: OrderedDict[int, int] = OrderedDict()
        self.opens = 0  # by this process (the tests and `ffscale bench data` count them)

    def get(self, k: int) -> int:
        """The descriptor of shard k (call with `lock` held)."""
        fd = self.open.get(k)
        if fd is not None:
            self.open.move_to_end(k)
            return fd
        while len(self.open) >= self.capacity:
            os.close(self.open.popitem(last=False)[1])
        fd = os.open(self.files[k], os.O_RDONLY | os.O_CLOEXEC)
        self.opens += 1
        self.open[k] = fd
        return fd

    def drop_inherited(self) -> None:
        """In a forked child, without the lock (a parent's thread may have held it at the fork)."""
        for fd in self.open.values():
            try:
                os.close(fd)  # this process's copy; the parent's stays open
            except OSError:
                pass
        self.open.clear()

    def close(self) -> None:
        if self.pid != os.getpid():
            self.drop_inherited()
            return
        with self.lock:
            for fd in self.open.values():
                os.close(fd)
            self.open.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class TarIndex:
    """Where each sample's image and label members lie in the split's shards."""

    def __init__(
        self,
        files: list[Path],
        counts: list[int],
        members: Members,
        table: np.ndarray,
        mapped: tuple[Path, Manifest] | None = None,
    ):
        """`table`: a record per sample (sampleindex.DTYPE), mapped or in memory; kept as views.
        `mapped`: the split it was mapped from, to map it again in a process this one is pickled to."""
        self.files, self.members, self.mapped = [str(f) for f in files], members, mapped
        self.counts = np.asarray(counts, dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self._use(table)
        self.bytes_read = 0  # by this process (counted for the tests and `ffscale bench plan`)
        self.fds = _Descriptors(self.files)

    def _use(self, table: np.ndarray) -> None:
        self.table = table
        self.shard = table["shard"]
        self.img, self.lab = table["img"], table["lab"]  # (n, 2): (data offset, size); -1: member absent

    def __getstate__(self) -> dict:
        """DataLoader workers started by spawn or forkserver (Python 3.14's default on Linux) get the
        index pickled: a mapped table travels as where it lies, not as a copy of it per worker."""
        state = dict(self.__dict__)
        del state["fds"]  # descriptors are per process: the receiver opens its own
        if self.mapped is not None:
            for k in ("table", "shard", "img", "lab"):
                del state[k]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.fds = _Descriptors(self.files)
        if self.mapped is not None:
            root, m = self.mapped
            table, why = sampleindex.open_table(root, m)
            if table is None:
                raise DataError(f"{root}: {why} (since this job opened it)")
            self._use(table)

    @classmethod
    def of_split(
        cls, root: str | Path, m: Manifest, files: list[Path], say: Callable[[str], None] | None = None
    ) -> TarIndex:
        """The split's binary index, mapped; where it has none it can trust, the table parsed as before
        the index existed, and `say(why)` (the caller words the line and decides who says it)."""
        root = Path(root)
        counts = [s.count for s in m.shards]
        table, why = sampleindex.open_table(root, m)
        if table is not None:
            return cls(files, counts, m.members, table, (root, m))
        table = sampleindex.parse(files, [m.index_file(root, s) for s in m.shards], counts, m.members)
        if say is not None:
            say(why)
        return cls(files, counts, m.members, table)

    def __len__(self) -> int:
        return len(self.shard)

    def descriptors(self) -> _Descriptors:
        """This process's open shards (a new table in a forked child)."""
        if self.fds.pid != os.getpid():
            self.fds.drop_inherited()
            self.fds = _Descriptors(self.files)
        return self.fds

    def where(self, i: int) -> str:
        k = int(self.shard[i])
        return f"shard {self.files[k]} sample {int(i - self.start[k])}"

    def _member(self, i: int, fd: int, off: int, size: int, sample: dict) -> bytes:
        buf = self._pread(fd, size + HEADER, off - HEADER)
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
        fds = self.descriptors()
        with fds.lock:
            fd = fds.get(k)
            for (off, size), name in (
                (self.img[i], self.members.lower_exts[0]),
                (self.lab[i], self.members.label_member),
            ):
                if size >= 0:
                    sample[name] = self._member(i, fd, int(off), int(size), sample)
        sample.setdefault("__key__", f"#{int(i - self.start[k])}")
        return sample

    def _pread(self, fd: int, size: int, offset: int) -> bytes:
        """Where a shard's bytes come from: a local file here; ranged requests to remote storage in
        ffscale/data/ranged.py, which overrides this and `descriptors` and nothing else."""
        return os.pread(fd, size, offset)

    def sample_bytes(self, i: int) -> int:
        """What `read(i)` reads: its members with their headers."""
        return int(sum(s + HEADER for s in (self.img[i, 1], self.lab[i, 1]) if s >= 0))
