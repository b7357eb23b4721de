"""A split copied once per node into `data.stage_dir` (node-local NVMe or RAM), then read locally.

The copy holds the manifest, the binary sample index and every shard, whole: DeiT's sampler gives every
rank samples of every shard each epoch, so a node reads the whole split anyway, and afterwards its ranks
read at local-disk latency with no request per sample. Shards are copied in parallel by byte ranges
(ffscale/data/remote.py; a local or shared-filesystem root is copied the same way) into `<file>.part`,
hashed as they arrive and renamed into place only when size and sha256 equal the manifest's. A part
left by an interrupted copy is rehashed and continued; one whose result differs from the manifest is
removed and copied again from the start once, then the job stops naming the shard. A shard in place
was checked before its rename and is kept while the source's manifest gives it the same sha256. The
split is complete when `.staged` (the sha256 of the manifest it was copied from) is written; a changed
manifest at the source stages the split again.

One copy serves the node's ranks: whoever stages holds an exclusive `flock` on the split's lock file
(the kernel releases it when the process dies, so an interrupted staging never blocks the next), the
others wait on it and then find `.staged`. `ffscale train` stages before it starts the ranks; ranks
started by a plain launcher stage here on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from ffscale.data.manifest import MANIFEST, Manifest, parse_manifest, sha256_file
from ffscale.errors import DataError
from ffscale.util.atomic import write_atomic

STAGED = ".staged"
STAGING = ".staging.json"  # the source manifest the shards in place were checked against
INDEX = "sample-index.npy"  # sampleindex.INDEX (that module imports numpy; this one stays light)
CHUNK = 16 << 20  # bytes per ranged request: few requests per shard, a resumed part loses at most this
WORKERS = 8  # shards copied at once: enough to fill a link whose single streams are latency-bound


def local_root(stage_dir: str | Path, root: str) -> Path:
    """Where `root` (a URL or a path) is staged: a folder named after it, readable and unique. A URL's
    credentials (`user:password@`, a signed query) are no part of the name: it is printed and listed."""
    if "://" in root:
        u = urlsplit(root)
        root = f"{u.scheme}_{u.netloc.rpartition('@')[2]}{u.path}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", root)
    return Path(stage_dir) / name.strip("_")[-200:]


def _src(root: str, rel: str) -> str:
    from ffscale.data import remote

    if remote.is_remote(root):
        return remote.join(root, rel)
    return os.path.normpath(os.path.join(os.path.abspath(root), rel))


def _local_name(rel: str) -> str:
    """A shard's path inside the copy: the manifest's, with `..` (shards indexed in place) kept inside."""
    return posixpath.normpath(rel).replace("../", "__/")


def staged(stage_dir: str | Path, root: str) -> Path | None:
    """The staged copy when it is complete (the check every rank makes: one small file read)."""
    dest = local_root(stage_dir, root)
    try:
        mark = json.loads((dest / STAGED).read_text())
    except (OSError, ValueError):
        return None
    return dest if mark.get("root") == _masked(root) else None


def ensure(stage_dir: str | Path, root: str, say=print) -> Path:
    """The node's copy of `root`, staged now unless it is there; other processes of the node staging
    the same split are waited for. Raises DataError (StorageError) naming the shard and its URL."""
    dest = local_root(stage_dir, root)
    dest.mkdir(parents=True, exist_ok=True)
    text = _manifest_text(root)
    if _complete(dest, text):  # the ranks after `ffscale train` staged: no lock, no line
        return dest
    with open(dest.with_name(dest.name + ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"ffscale: waiting for another process of this node staging {_masked(root)}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _complete(dest, text):  # staged by another process of this node while this one waited
                return dest
            return _stage(root, dest, text, say)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _complete(dest: Path, manifest_text: str) -> bool:
    """`.staged` says the copy was finished from this very manifest."""
    try:
        mark = json.loads((dest / STAGED).read_text())
    except (OSError, ValueError):
        return False
    return mark.get("manifest_sha256") == hashlib.sha256(manifest_text.encode()).hexdigest()


def _masked(root: str) -> str:
    from ffscale.util.secrets import redact

    return redact(root)


def _read(src: str, start: int, end: int) -> bytes:
    from ffscale.data import remote

    if remote.is_remote(src):
        return remote.read_range(src, start, end)
    with open(src, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _size(src: str) -> int:
    from ffscale.data import remote

    return remote.size(src) if remote.is_remote(src) else os.path.getsize(src)


def _manifest_text(root: str) -> str:
    from ffscale.data import remote

    if remote.is_remote(root):
        return remote.read_file(remote.join(root, MANIFEST)).decode()
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"no shard manifest at {path}")
    return path.read_text()


def _stage(root: str, dest: Path, text: str, say) -> Path:
    sha = hashlib.sha256(text.encode()).hexdigest()
    mark = dest / STAGED
    mark.unlink(missing_ok=True)  # from here on the copy is incomplete until proven otherwise
    m, d = parse_manifest(text, f"{_masked(root)}/{MANIFEST}")
    t0, jobs = time.monotonic(), []
    for s in m.shards:
        jobs.append((s.file, _local_name(s.file), s.size, s.sha256))
    if m.index_sha256:
        jobs.append((INDEX, INDEX, 0, m.index_sha256))
    _forget_other_versions(dest, {name: digest for _, name, _, digest in jobs}, text)
    total = sum(size for *_, size, _ in jobs)
    have = sum(_on_disk(dest / name) for _, name, *_ in jobs)
    free = shutil.disk_usage(dest).free
    if total - have > free:  # found now, not after an hour of copying
        raise DataError(
            f"data.stage_dir {dest.parent}: {_mb(free)} free, staging {_masked(root)} needs {_mb(total - have)} more"
        )
    say(
        f"ffscale: staging {_masked(root)} -> {dest}: {len(m.shards)} shards"
        + (f", {_mb(total)}" if total else "")
    )
    progress = _Progress(f"ffscale: staging {_masked(root)}", total - have)
    with ThreadPoolExecutor(min(WORKERS, len(jobs))) as pool:
        futures = [
            pool.submit(copy_checked, _src(root, rel), dest / name, size, digest, progress)
            for rel, name, size, digest in jobs
        ]
        try:
            copied = sum(f.result() for f in futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    for s in m.shards:  # DALI's text indexes, where the set has them: only read without the binary index
        idx = Path(s.file).stem + ".idx"
        if not m.index_sha256 and not (dest / idx).is_file():
            try:
                write_atomic(dest / idx, _read(_src(root, idx), 0, 1 << 40))
            except (DataError, OSError):
                pass  # none at the source: the tars' headers are parsed instead, as for any such set
    write_atomic(dest / MANIFEST, json.dumps(_relocated(d), indent=1))
    write_atomic(mark, json.dumps({"root": _masked(root), "manifest_sha256": sha, "staged": time.time()}))
    dt = time.monotonic() - t0
    say(
        f"ffscale: staged {_masked(root)}: {_mb(copied)} copied in {dt:.1f} s ({copied / 1e6 / max(dt, 1e-9):.0f} MB/s)"
    )
    return dest


def _forget_other_versions(dest: Path, digests: dict[str, str], text: str) -> None:
    """Shards in place were checked against the manifest of the staging that copied them, kept in
    `.staging.json`; where the source's manifest has changed since, those whose sha256 it changed go."""
    pending = dest / STAGING
    try:
        old = json.loads(pending.read_text())
        before = {_local_name(s["file"]): s["sha256"] for s in old["shards"]}
        before |= {INDEX: old.get("index_sha256", "")}
    except (OSError, ValueError, KeyError, TypeError):
        before = {}
    for name, digest in digests.items():
        if before.get(name) != digest:
            (dest / name).unlink(missing_ok=True)
    write_atomic(pending, text)


def _on_disk(path: Path) -> int:
    """Bytes of a shard already here, whole or as a part."""
    for p in (path, path.with_name(path.name + ".part")):
        if p.is_file():
            return p.stat().st_size
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _relocated(values: dict) -> dict:
    """The manifest as the copy holds it: shard files under its folder (the digest is the shards'
    sha256s, unchanged)."""
    return {**values, "shards": [{**s, "file": _local_name(s["file"])} for s in values["shards"]]}


class _Progress:
    """Bytes copied by the staging's threads, as util/bar.py's line (MB, MB/s, ETA) every 10 s."""

    def __init__(self, what: str, total: int):
        from ffscale.util.bar import Bar

        self.bar, self.bytes, self.lock = Bar(what, max(1, total // 10**6), unit="MB"), 0, threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            before, self.bytes = self.bytes // 10**6, self.bytes + n
            if self.bytes // 10**6 > before:
                self.bar.update(self.bytes // 10**6 - before)


def copy_checked(src: str, dst: Path, size: int, sha256: str, progress=lambda n: None) -> int:
    """`src` copied to `dst` with its size (0: unknown) and sha256 checked; the bytes copied now."""
    if dst.is_file() and (not size or dst.stat().st_size == size):
        return 0  # renamed into place only after its check
    part = dst.with_name(dst.name + ".part")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for _ in (0, 1):  # a part that fails its check is copied again from its first byte, once
        got = _fill(src, part, size, progress)
        if sha256 == sha256_file(part):
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(part, dst)
            return got
        part.unlink()  # never trusted: the next attempt copies it from its first byte
    raise DataError(
        f"shard {_masked(src)}: its sha256 differs from the manifest's after copying it twice "
        f"(the object was replaced or the manifest is stale); {dst} removed"
    )


def _fill(src: str, part: Path, size: int, progress=lambda n: None) -> int:
    """Append to `part` from where it stopped to the object's end; the bytes fetched."""
    size = size or _size(src)
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    fetched = 0
    with open(part, "ab") as f:
        while have < size:
            end = min(have + CHUNK, size)
            chunk = _read(src, have, end)
            if not chunk:
                raise DataError(
                    f"shard {_masked(src)}: ends at byte {have}, its manifest says {size} (truncated object)"
                )
            f.write(chunk)
            progress(len(chunk))
            have += len(chunk)
            fetched += len(chunk)
    return fetched


def manifest_of(dest: Path) -> Manifest:
    return parse_manifest((dest / MANIFEST).read_text(), dest / MANIFEST)[0]


def stage_job(cfg, say=print, pending: set[str] | None = None) -> None:
    """Every stage's splits that name a `data.stage_dir`, staged on this node (`ffscale train`, before
    it starts the node's ranks: a long copy then runs outside any collective's timeout). `pending`:
    the names of the stages still to train (None: all); a finished stage's shards are not needed."""
    from ffscale.config import stages

    seen = set()
    for st in stages(cfg):
        if pending is not None and st.name not in pending:
            continue
        d = st.cfg.data
        for split in ("train", "val"):
            root = getattr(d, split)
            if d.stage_dir and (d.stage_dir, root) not in seen:
                seen.add((d.stage_dir, root))
                try:
                    ensure(d.stage_dir, root, say)
                except DataError as e:
                    p = f"stages.{st.name}." if cfg.stages else ""
                    raise type(e)(f"{p}data.{split}={_masked(root)}: {e}") from None
