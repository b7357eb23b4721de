"""DeepSpeed checkpoints that are never half-written and checked before they are loaded (a
stage's final weights: ffscale/engine/export.py).

DeepSpeed writes every rank's shards into `<dir>/<tag>/`. We pass save_latest=False; every rank
syncs and hashes the files it wrote (ckpt_engine, ckpt_files), and once every rank's files are on
disk (a barrier), rank 0 writes `<tag>/ffscale.json` listing them with their sizes and sha256, the
versions that wrote them, and the model's shapes, then moves the `latest` pointer (both atomic
renames). A checkpoint is complete when its ffscale.json exists.

Resume (`select`, every rank) takes the newest complete checkpoint whose files are all there with
their recorded sizes and hashes (the ranks split the hashing) and whose pickles name only
DeepSpeed's types. A damaged one is moved aside to `<tag>.damaged` (never deleted: nothing proves
it worthless) and the next older one is tried, saying which and why; a planted pickle or a
checkpoint of an incompatible DeepSpeed or torch stops with one line and exit 2. A kill mid-save
leaves the previous checkpoint; a `latest` that is missing or names a removed directory (a lost
file on shared storage) costs nothing. `latest` is kept for DeepSpeed's own tools (zero_to_fp32.py
reads it). Only a directory without ffscale.json newer than the newest complete one is deleted:
ffscale.json is written after every other file, so that is provably an interrupted write.
"""

from __future__ import annotations

import errno
import functools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ffscale.engine import ckpt_files
from ffscale.engine.dist import all_gather_object, broadcast_object, on_rank0
from ffscale.errors import (
    CheckpointDamaged,
    CheckpointMismatch,
    CheckpointWriteError,
    Preempted,
    UntrustedFile,
)
from ffscale.util.atomic import atomic_path, write_atomic

LATEST = ckpt_files.LATEST
META, FORMAT, DAMAGED = ckpt_files.META, ckpt_files.FORMAT, ckpt_files.DAMAGED
versions, incompatible = ckpt_files.versions, ckpt_files.incompatible


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint (its ffscale.json written), None when there is none."""
    done = _complete(Path(ckpt_dir))
    return done[0] if done else None


def _complete(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints, newest first."""
    if not ckpt_dir.is_dir():
        return []
    done = [x.name for x in ckpt_dir.iterdir() if _step(x.name) >= 0 and (x / META).is_file()]
    return sorted(done, key=_step, reverse=True)


def _set_aside(ckpt_dir: Path) -> list[str]:
    """Checkpoints a resume found damaged and moved aside (never deleted: nothing proves them worthless)."""
    return sorted(x.name for x in ckpt_dir.iterdir() if DAMAGED in x.name) if ckpt_dir.is_dir() else []


def pointer_note(ckpt_dir: Path, tag: str | None = None) -> str | None:
    """Why `latest` was not followed, when it names something else than the checkpoint resumed
    (`tag`; by default the newest complete one)."""
    p, tag = Path(ckpt_dir) / LATEST, tag or latest_tag(ckpt_dir)
    named = p.read_text().strip() if p.is_file() else None
    if tag is None or named == tag:
        return None
    what = "is missing" if named is None else f"names {named}, which is {_state_of(Path(ckpt_dir), named)}"
    return f"{p} {what}: resuming from {tag}, the newest complete checkpoint"


_step = ckpt_files.step_of


def _state_of(ckpt_dir: Path, tag: str) -> str:
    if (ckpt_dir / tag).is_dir():
        return "incomplete"
    return "damaged (set aside)" if any(n.startswith(tag + DAMAGED) for n in _set_aside(ckpt_dir)) else "gone"


def _rank_file(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"ffscale_rank{rank}.pt"


def save(
    ds,
    ckpt_dir,
    tag: str,
    client_state: dict,
    keep: int,
    rank_state: dict | None = None,
    fence=lambda: None,
    previous: str | None = None,
) -> None:
    """`rank_state`: tensors only this rank holds (its EMA shard), written beside DeepSpeed's files.
    `fence()`: rank 0 calls it again right before the record that completes the checkpoint (a run
    taken over meanwhile gets no complete checkpoint and loses no old one to the rotation).
    `previous`: the newest complete checkpoint before this one (named when the write fails)."""
    ckpt_dir = Path(ckpt_dir)
    root = ckpt_dir / tag
    try:
        ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        written = ds.checkpoint_engine.take_written()
        if rank_state:
            with atomic_path(_rank_file(ckpt_dir, tag, ds.global_rank)) as tmp:
                torch.save(rank_state, tmp)
            written.append(_rank_file(ckpt_dir, tag, ds.global_rank))
        files = {}
        for f in written:  # synced by the engine; hashed here, each rank its own files
            files |= ckpt_files.record(f, root)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as RuntimeError
        # This rank stops; the launcher (or the peers' collective timeouts) stops the others.
        free = shutil.disk_usage(ckpt_dir).free if ckpt_dir.is_dir() else 0
        full = getattr(e, "errno", None) == errno.ENOSPC or free < 64 * 2**20
        raise CheckpointWriteError(
            errno.ENOSPC if full else getattr(e, "errno", None) or errno.EIO,
            f"writing checkpoint {ckpt_dir / tag} failed on rank {ds.global_rank}: "
            f"{'no space left on the device' if full else e} ({free / 2**20:.1f} MiB free there). "
            f"`latest` still names {previous or 'no checkpoint'}, which is complete; "
            "free space and rerun to resume from it",
        ) from e
    every = all_gather_object(files)  # also the barrier: every rank's files are written and synced

    def commit():
        fence()
        meta = {
            "format": FORMAT,
            **versions(),
            "world_size": _world(),
            "zero_stage": ds.zero_optimization_stage(),
        }
        meta["files"] = {k: v for part in every for k, v in sorted(part.items())}
        meta["params"] = model_signature(ds.module)
        ckpt_files.sync(root)  # the files' directory entries before the record that vouches for them
        write_atomic(root / META, json.dumps(meta))
        write_atomic(ckpt_dir / LATEST, tag)
        tags = sorted(
            (d for d in ckpt_dir.iterdir() if d.is_dir() and _step(d.name) >= 0), key=lambda d: _step(d.name)
        )
        for old in tags[: max(0, len(tags) - keep)]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(ckpt_dir / f"{old.name}_universal", ignore_errors=True)

    on_rank0(ds.global_rank, commit)  # rank 0 completes it; every rank leaves together


def remove_partial(ckpt_dir) -> list[str]:
    """Delete incomplete checkpoint directories (no ffscale.json) newer than the newest complete one:
    writes a kill or a full disk interrupted. Rank 0 only; nothing can have loaded them."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    cur = _step(latest_tag(ckpt_dir) or "step-1")
    gone = [d for d in ckpt_dir.iterdir() if d.is_dir() and _step(d.name) > cur and not (d / META).is_file()]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return sorted(d.name for d in gone)


def meta_of(ckpt_dir, tag: str) -> dict:
    """The record (ffscale.json) of checkpoint `tag`: files, versions, world size, ZeRO stage, shapes."""
    return json.loads((Path(ckpt_dir) / tag / META).read_text())


def model_signature(module) -> dict[str, list[int]]:
    """Parameter names and full shapes (ZeRO-3 keeps them in ds_shape)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}


def check_model(record: dict, where: Path, module) -> None:
    """Stop, naming the first differing tensor, when the checkpoint at `where` (its `record`) was
    written by another model."""
    saved, here = record["params"], model_signature(module)
    for name in sorted(set(saved) | set(here)):
        if saved.get(name) != here.get(name):
            raise CheckpointMismatch(
                f"checkpoint {where} holds another model: {name} is "
                f"{saved.get(name, 'absent')} there and {here.get(name, 'absent')} here. A changed model or "
                "image size needs its own run.name (or init_from the old weights)"
            )


def needs_reshard(record: dict, world: int) -> bool:
    """ZeRO-1/2/3 shards (a checkpoint's `record`) written by another number of ranks than `world`."""
    return record["zero_stage"] > 0 and record["world_size"] != world


def select(ckpt_dir, rank: int, world: int) -> str | None:
    """Every rank, before the engine is built: the checkpoint to resume (None: none, start afresh),
    checked as the module docstring says. Damaged checkpoints newer than the one resumed are moved
    aside; when none is intact nothing is moved and the resume stops (exit 2), so a rerun never
    starts the stage afresh over checkpoints it could not read."""
    ckpt_dir = Path(ckpt_dir)

    def remove_partial_saying():
        for name in remove_partial(ckpt_dir):
            print(f"removed {ckpt_dir / name}: an interrupted checkpoint write", flush=True)

    on_rank0(rank, remove_partial_saying)
    damaged: list[tuple[str, str]] = []  # (tag, why), newest first
    for tag in broadcast_object(_complete(ckpt_dir) if rank == 0 else None):
        root = ckpt_dir / tag
        m = broadcast_object(_read_meta(root) if rank == 0 else None)  # one view of it on every rank
        if isinstance(m, str):
            problems = [ckpt_files.Problem(META, m)]
        else:
            if why := incompatible(m):
                raise CheckpointMismatch(
                    f"checkpoint {root}: {why}; DeepSpeed checkpoints load only within the versions that wrote "
                    "them. Resume with those versions, or start a new run.name (init_from its exported weights)"
                )
            problems = checked(root, m["files"], rank, world)
        if untrusted := [p for p in problems if p.untrusted]:
            raise UntrustedFile(f"{root / untrusted[0].file}: {untrusted[0].what.split(' (')[0]}; resume refused. "
                                "Move the file away if nobody trusted wrote it")  # fmt: skip
        if not problems:
            on_rank0(rank, functools.partial(_resumed_past, ckpt_dir, tag, damaged))
            return tag
        more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
        damaged.append((tag, f"{problems[0]}{more}"))
    if damaged or (aside := _set_aside(ckpt_dir)):
        what = "; ".join(f"{t}: {why}" for t, why in damaged) or f"only {', '.join(aside)} (set aside) remain"
        raise CheckpointDamaged(
            f"no intact checkpoint in {ckpt_dir}: {what}. If the storage was failing, rerun once it is healthy; "
            "otherwise move the damaged checkpoints (or the checkpoints directory) away to go on from an older "
            "one (or start the stage afresh)"
        )
    return None


def checked(root: Path, files: dict | None, rank: int, world: int, deep: bool = True) -> list:
    """Every rank checks its share (by position in the sorted file list) of a checkpoint's files;
    every rank gets all the problems."""
    mine = ckpt_files.check(root, files, lambda i: i % world == rank, deep)
    return [p for part in all_gather_object(mine) for p in part]


def _read_meta(root: Path) -> dict | str:
    """A checkpoint's ffscale.json, or why it cannot be read."""
    try:
        return json.loads((root / META).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"


def _resumed_past(ckpt_dir: Path, tag: str, damaged: list[tuple[str, str]]) -> None:
    """Rank 0, once `tag` is chosen: the newer damaged checkpoints set aside, and the notes said."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for bad, why in damaged:
        aside = ckpt_dir / f"{bad}{DAMAGED}-{stamp}"
        (ckpt_dir / bad).rename(aside)
        shutil.rmtree(ckpt_dir / f"{bad}_universal", ignore_errors=True)  # derived from it
        print(f"ffscale: warning: checkpoint {ckpt_dir / bad} is damaged ({why}): moved to {aside.name}",
              flush=True)  # fmt: skip
    note = pointer_note(ckpt_dir, tag)
    if note:
        print(f"ffscale: warning: {note}", flush=True)
    if damaged:
        print(f"ffscale: resuming from {ckpt_dir / tag}, the newest intact checkpoint", flush=True)


SOURCE = "source.json"  # in a universal checkpoint: the ffscale.json sha256 of the checkpoint it came from


def _to_universal(ckpt_dir: Path, tag: str, fresh: bool = False) -> str:
    """Convert with DeepSpeed's ds_to_universal (rank 0, once per source checkpoint), its torch.load
    calls weights-only (ffscale/engine/to_universal.py); written aside, renamed into place. A
    conversion of another checkpoint of the same name, or `fresh`, is redone. SIGTERM stops it: the
    source checkpoint stays the one to resume."""
    import tempfile

    from ffscale.engine import preempt

    out, source = ckpt_dir / f"{tag}_universal", ckpt_files.sha256(ckpt_dir / tag / META)
    if out.is_dir() and (fresh or _read_meta_file(out / SOURCE) != source):
        shutil.rmtree(out)
    if not out.is_dir():
        with atomic_path(out) as tmp, tempfile.TemporaryFile("w+") as log:
            cmd = [sys.executable, "-m", "ffscale.engine.to_universal", "--input_folder"]
            cmd += [str(ckpt_dir / tag), "--output_folder", str(tmp), "--inject_missing_state"]
            # its progress bars go to a file: a pipe nobody reads would fill and block it
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
            while p.poll() is None:
                if preempt.requested():
                    p.kill()
                    p.wait()
                    raise Preempted(
                        f"SIGTERM during the conversion of {ckpt_dir / tag}; it is still the checkpoint to resume"
                    )
                time.sleep(0.2)
            if p.returncode:
                log.seek(0)
                raise CheckpointMismatch(
                    f"converting {ckpt_dir / tag} to a universal checkpoint failed:\n{log.read()[-2000:]}"
                )
            (tmp / SOURCE).write_text(source)
    return out.name


def _read_meta_file(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def load(ds, ckpt_dir, tag: str, record: dict, reshard: bool = True) -> dict:
    """Load checkpoint `tag` (the one `select` chose; `record` its ffscale.json): DeepSpeed's client
    state. Shards of another rank count are converted to a universal checkpoint first (the engine
    must have been built with load_universal), or, with reshard=False, stop with the command that
    converts them."""
    ckpt_dir = Path(ckpt_dir)
    check_model(record, ckpt_dir / tag, ds.module)
    if needs_reshard(record, _world()):
        ranks = record["world_size"]
        what = f"checkpoint {ckpt_dir}/{tag} holds ZeRO-{record['zero_stage']} shards of {ranks} ranks, this run has {_world()}"
        if not reshard:
            raise CheckpointMismatch(
                f"{what}. Resume with {ranks} ranks, or convert it first: python -m "
                f"ffscale.engine.to_universal --input_folder {ckpt_dir}/{tag} "
                f"--output_folder {ckpt_dir}/{tag}_universal --inject_missing_state, then rerun with "
                "checkpoint.reshard=true"
            )
        tag = _universal(ckpt_dir, tag, what, ds.global_rank)
    path, client = ds.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {ckpt_dir}/{tag} could not be loaded")
    return client


def _universal(ckpt_dir: Path, tag: str, what: str, rank: int) -> str:
    """The universal checkpoint of `tag`, converted by rank 0 if needed, its pickles checked on every
    rank (they load it with torch.load forced weights-only; this names a bad file first). It is
    derived data: an unreadable one is converted again, once."""

    def convert(fresh: bool):
        print(f"{what}: converting to a universal checkpoint", flush=True)
        _to_universal(ckpt_dir, tag, fresh)

    for attempt in (0, 1):
        on_rank0(rank, functools.partial(convert, attempt > 0))
        problems = checked(ckpt_dir / f"{tag}_universal", None, rank, _world(), deep=False)
        if untrusted := [p for p in problems if p.untrusted]:
            raise UntrustedFile(f"{ckpt_dir / f'{tag}_universal' / untrusted[0].file}: {untrusted[0].what}")
        if not problems:
            return f"{tag}_universal"
    raise CheckpointDamaged(f"{ckpt_dir / f'{tag}_universal'}: {problems[0]} after converting it twice")


def load_rank_state(ckpt_dir, tag: str, rank: int) -> dict:
    """This rank's own file of checkpoint `tag` (written when it holds rank states, and then listed
    in its record: `select` found it there)."""
    return torch.load(_rank_file(Path(ckpt_dir), tag, rank), map_location="cpu", weights_only=True)
