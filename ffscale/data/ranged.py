"""Remote shards read in place, without staging: each sample's members fetched by ranged requests
(ffscale/data/remote.py) through a bounded cache of aligned blocks.

A sample's image and label members lie next to each other in its tar, so one block request usually
returns both; the cache (LRU, `data.remote_cache_mb` per reading process) keeps what a block holds
beyond the sample for its neighbours. DeiT's sampler visits samples in a random order, so expect
about one request per sample: staging (ffscale/data/stage.py) is the fast path, this one is for sets
a node cannot hold. The split's binary index (required here: parsing remote tars' headers at every
start would read every shard) is fetched once per node into a cache folder, checked against the
manifest's sha256 and mapped as for a local split.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from ffscale.data import remote, sampleindex
from ffscale.data.manifest import Manifest
from ffscale.data.stage import local_root
from ffscale.data.tarindex import TarIndex
from ffscale.errors import DataError

BLOCK = 256 << 10  # bytes per request: an ImageNet sample (~110 KB, members and headers) in one or two


def meta_dir(root: str) -> Path:
    """This node's folder for a remote split's index ($FFSCALE_CACHE_DIR, else the temp folder)."""
    base = os.environ.get("FFSCALE_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"ffscale-{os.getuid()}"
    )
    return local_root(base, root)


class BlockCache:
    """Blocks of the split's shards, least recently used dropped past `limit` bytes; thread-safe (the
    DALI feed reads on a thread pool)."""

    def __init__(self, files: list[str], sizes: list[int], limit: int):
        self.files, self.sizes, self.limit = files, sizes, limit
        self.blocks: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.held, self.requests = 0, 0
        self.lock = threading.Lock()

    def pread(self, k: int, size: int, offset: int) -> bytes:
        first, last = offset // BLOCK, (offset + size - 1) // BLOCK
        parts = []
        fetched: dict[int, bytes] = {}  # this read's own blocks: the cache may drop them at once
        b = first
        while b <= last:
            got = fetched[b] if b in fetched else self._get(k, b)
            if got is None:  # fetch the missing run of blocks in one request
                run = b
                while run + 1 <= last and self._peek(k, run + 1) is None:
                    run += 1
                fetched.update(self._fetch(k, b, run))
                got = fetched[b]
            parts.append(got)
            if len(got) < BLOCK:  # the object's end
                break
            b += 1
        data = b"".join(parts)[offset - first * BLOCK :][:size]
        if len(data) < size:
            url = self.files[k]
            raise DataError(
                f"shard {remote.masked(url)}: ends before byte {offset + size} (truncated object; "
                f"its manifest says {self.sizes[k] or '?'} bytes)"
            )
        return data

    def _peek(self, k: int, b: int) -> bytes | None:
        with self.lock:
            return self.blocks.get((k, b))

    def _get(self, k: int, b: int) -> bytes | None:
        with self.lock:
            got = self.blocks.get((k, b))
            if got is not None:
                self.blocks.move_to_end((k, b))
            return got

    def _fetch(self, k: int, b0: int, b1: int) -> dict[int, bytes]:
        """Blocks b0..b1 of shard k in one request, kept (as far as the limit allows) and returned."""
        start, end = b0 * BLOCK, (b1 + 1) * BLOCK
        if self.sizes[k]:
            end = min(end, self.sizes[k])
        data = remote.read_range(self.files[k], start, end) if start < end else b""
        pieces = {b: data[(b - b0) * BLOCK : (b - b0 + 1) * BLOCK] for b in range(b0, b1 + 1)}
        with self.lock:
            self.requests += 1
            for b, piece in pieces.items():
                if (k, b) not in self.blocks:
                    self.blocks[(k, b)] = piece
                    self.held += len(piece)
            while self.held > self.limit and len(self.blocks) > 1:
                _, old = self.blocks.popitem(last=False)
                self.held -= len(old)
        return pieces


class _Shards:
    """What TarIndex.read holds while it reads a sample: no descriptor (a shard is its number) and no
    lock (BlockCache serialises itself; the DALI feed's threads read at once)."""

    lock = contextlib.nullcontext()  # reusable: its __enter__ and __exit__ keep no state

    @staticmethod
    def get(k: int) -> int:
        return k


_SHARDS = _Shards()


class RangedTarIndex(TarIndex):
    """TarIndex whose shard reads are ranged requests through a BlockCache (its only difference)."""

    cache: BlockCache | None = None
    cache_limit: int = 64 << 20
    cache_pid: int = -1
    sizes: list[int] = []

    def descriptors(self) -> _Shards:
        """In place of TarIndex's open files: `get(k)` is the shard's number, which `_pread` reads by."""
        if self.cache is None or self.cache_pid != os.getpid():  # a forked worker: its own cache
            self.cache, self.cache_pid = BlockCache(self.files, self.sizes, self.cache_limit), os.getpid()
        return _SHARDS

    def _pread(self, fd: int, size: int, offset: int) -> bytes:
        return self.cache.pread(fd, size, offset)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["cache"] = None  # a worker process fills its own
        return state

    @classmethod
    def of_url(cls, root: str, m: Manifest, files: list[str], cache_mb: int) -> RangedTarIndex:
        meta = meta_dir(root)
        fetch_index(root, m, meta)
        table, why = sampleindex.open_table(meta, m)
        if table is None:
            raise DataError(f"{remote.masked(root)}: {why}")
        index = cls(files, [s.count for s in m.shards], m.members, table, (meta, m))
        index.sizes, index.cache_limit = [s.size for s in m.shards], cache_mb << 20
        return index


def fetch_index(root: str, m: Manifest, meta: Path) -> None:
    """The split's binary index copied into `meta` unless an intact copy is there."""
    if not m.index_sha256:
        raise DataError(
            f"{remote.masked(root)}: its manifest names no binary sample index ({sampleindex.INDEX}), which "
            "remote shards are read by; stage the split (data.stage_dir) or write one with "
            "`ffscale shard reindex` before uploading it"
        )
    table, _ = sampleindex.open_table(meta, m)
    if table is not None:
        return
    data = remote.read_file(remote.join(root, sampleindex.INDEX))
    meta.mkdir(parents=True, exist_ok=True)
    tmp = meta / f"{sampleindex.INDEX}.{os.getpid()}.tmp"  # several ranks of a node may: each rename is whole
    tmp.write_bytes(data)
    os.replace(tmp, meta / sampleindex.INDEX)
