"""Write a `Source` as shuffled WebDataset shards (`<key>.jpg` + `<key>.cls`) with a manifest.

Samples are shuffled at write time (DALI's reader only shuffles inside a buffer). Shard j holds
positions [j*S, (j+1)*S) of one seeded permutation and sample i is keyed by its position, so a shard's
bytes depend only on (source, seed, shard size, max side): `--workers N` processes writing whole
shards give the same files as one, and a rerun after a kill keeps the shards already finished
(renamed into place with a `.done` record beside them) and writes only the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ffscale.data.ingest import reindex
from ffscale.data.ingest.forked import forked_map
from ffscale.data.ingest.images import prepare
from ffscale.data.ingest.sources import Source, Span, read
from ffscale.data.manifest import Manifest, ShardInfo, sha256_file
from ffscale.util.atomic import atomic_path, write_atomic
from ffscale.util.bar import Bar

STATE = ".ffscale-shard"  # per-output: the job's fingerprint and one record per finished shard


@dataclass
class Job:
    source: Source
    out: Path
    name: str
    order: list[int]
    shard_size: int
    max_side: int

    def positions(self, j: int) -> range:
        return range(j * self.shard_size, min(len(self.order), (j + 1) * self.shard_size))

    @property
    def num_shards(self) -> int:
        return -(-len(self.order) // self.shard_size)

    def file(self, j: int) -> Path:
        return self.out / f"{self.name}-{j:06d}.tar"

    def record(self, j: int) -> Path:
        return self.out / STATE / f"{self.name}-{j:06d}.done"


def fingerprint(src: Source, name: str, seed: int, shard_size: int, limit: int, max_side: int) -> str:
    """What the shards' bytes depend on; generated items are identified by the source's description."""
    h = hashlib.sha256(json.dumps([src.description, src.classes, name, seed, shard_size, limit, max_side,
                                   len(src.items)]).encode())  # fmt: skip
    for loc, y in src.items:
        if isinstance(loc, (Path, Span)):
            h.update(f"{loc}\0{y}\n".encode())
    return h.hexdigest()[:16]


def write_shards(
    src: Source,
    out: Path,
    name: str,
    shard_size: int = 1000,
    seed: int = 0,
    limit: int = 0,
    workers: int = 1,
    max_side: int = 0,
    progress: bool = False,
) -> Manifest:
    """Write (or finish writing) `out/<name>-%06d.tar`, DALI's `.idx` beside each, the split's binary
    sample index `out/sample-index.npy` and `out/manifest.json`."""
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(src.items)))
    random.Random(seed).shuffle(order)
    job = Job(src, out, name, order[:limit] if limit else order, shard_size, max_side)
    todo = _resume(job, fingerprint(src, name, seed, shard_size, limit, max_side))
    bar = Bar(f"{out}", len(job.order), len(job.order) - sum(len(job.positions(j)) for j in todo), progress)
    global _JOB
    _JOB = job
    for n in forked_map(_write_one, todo, workers):
        bar.update(n)
    bar.close()
    _index_missing(job)
    return _manifest(job, workers)


def _resume(job: Job, fp: str) -> list[int]:
    """Shards still to write; everything of another job (or an older ffscale) under `name` goes."""
    state = job.out / STATE
    plan = state / f"{job.name}.json"
    same = plan.is_file() and json.loads(plan.read_text()).get("fingerprint") == fp
    ours = re.compile(rf"{re.escape(job.name)}-\d{{6}}\.(tar|idx|done|tar\.tmp|idx\.tmp)$")
    for old in [*job.out.iterdir(), *(state.iterdir() if state.is_dir() else [])]:
        if ours.match(old.name) and (not same or old.name.endswith(".tmp")):  # another job's, or half-written
            old.unlink()
    if not same:
        write_atomic(plan, json.dumps({"fingerprint": fp}))
    return [j for j in range(job.num_shards) if not (job.record(j).is_file() and job.file(j).is_file())]


def _index_missing(job: Job) -> None:
    """Shards finished on a host without DALI's wds2idx get their index once it is there."""
    if wds2idx() is None:
        return
    for j in range(job.num_shards):
        idx = job.file(j).with_suffix(".idx")
        if not idx.is_file() or idx.stat().st_size == 0:
            write_dali_indexes([job.file(j)])


_JOB: Job | None = None  # the job of a forked worker (inherited, not pickled: items may be lambdas)


def _write_one(j: int) -> int:
    """Write shard j atomically, then its `.done` record (count, sha256, size, conversions)."""
    job, fds, converted = _JOB, {}, Counter()
    try:
        with atomic_path(job.file(j)) as tmp:
            with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for i in job.positions(j):
                    loc, label = job.source.items[job.order[i]]
                    data, why = prepare(*read(loc, fds), job.max_side)
                    if why:
                        converted[why] += 1
                    _add(tf, f"{i:08d}.jpg", data)
                    _add(tf, f"{i:08d}.cls", str(label).encode())
            write_dali_indexes([tmp], job.file(j).with_suffix(".idx"))
    finally:
        for fd in fds.values():  # archives opened for this shard (1,000 class tars would exhaust fds)
            os.close(fd)
    f = job.file(j)
    rec = {"count": len(job.positions(j)), "sha256": sha256_file(f), "size": f.stat().st_size,
           "converted": dict(converted)}  # fmt: skip
    write_atomic(job.record(j), json.dumps(rec))
    return rec["count"]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner, mode and time: the same bytes on every run
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tf.addfile(info, io.BytesIO(data))


def _manifest(job: Job, workers: int) -> Manifest:
    """The manifest of the finished shard list, with the split's binary sample index written first
    (from the tars' headers), so a manifest never names an index that is not there."""
    shards, converted = [], Counter()
    for j in range(job.num_shards):
        rec = json.loads(job.record(j).read_text())
        shards.append(ShardInfo(job.file(j).name, rec["count"], rec["sha256"], rec["size"]))
        converted.update(rec["converted"])
    src = job.source
    m = Manifest(job.name, src.classes, shards, src.description, class_ids=src.class_ids,
                 converted=dict(sorted(converted.items())), max_side=job.max_side)  # fmt: skip
    files = [job.file(j) for j in range(job.num_shards)]
    m.index_sha256 = reindex.write(job.out, files, [s.count for s in shards], m.members, workers)
    m.save(job.out)
    return m


def wds2idx() -> str | None:
    """DALI's index tool (ships with the DALI wheel): on PATH, or beside this interpreter."""
    return shutil.which("wds2idx") or shutil.which("wds2idx", path=str(Path(sys.executable).parent))


def write_dali_indexes(files: list[Path], dest: Path | None = None) -> None:
    """DALI's reader wants an index per tar (`<shard>.idx`, or `dest` for one file)."""
    tool = wds2idx()
    if tool is None:
        return
    for f in files:
        # wds2idx ignores tar's exit status: the tar was checked by writing or indexing it ourselves
        with atomic_path(dest or f.with_suffix(".idx")) as tmp:
            subprocess.run([tool, str(f), str(tmp)], check=True, capture_output=True)
