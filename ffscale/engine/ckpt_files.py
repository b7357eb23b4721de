"""A checkpoint's files: synced, listed with their sizes and sha256, and checked before anything
loads them. Pure file work (no DeepSpeed import), so `ffscale verify` runs it anywhere.

DeepSpeed writes its files with `torch.save` and no fsync (deepspeed 0.19.8,
runtime/checkpoint_engine/torch_checkpoint_engine.py:30-33): a node that dies while the storage
still caches them leaves files truncated, or empty, under their final names. Every rank syncs and
hashes what it wrote; rank 0 lists them in the checkpoint's ffscale.json, written last
(ffscale/engine/checkpoint.py). Resume checks the newest checkpoint against that list and falls
back to an older one when a file is missing, of another size or another hash.

A checkpoint file is a pickle, and whoever can write to a shared runs volume could plant one that
runs code when unpickled. Every file is scanned (`torch.serialization.get_unsafe_globals_in_checkpoint`
reads the pickle's opcodes without running them) against torch's weights-only types and the few
DeepSpeed types below; anything else stops the resume naming the file and the type.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

LATEST = "latest"  # in a stage's checkpoints/: the newest complete checkpoint's tag

# The globals DeepSpeed 0.19.8 pickles into its checkpoint files besides tensors and containers,
# measured by saving ZeRO 0-3 in fp32 and bf16 and scanning every file:
# the loss scaler (also with bf16, as a constant scale of 1), the ZeRO stage enum in the optimizer
# states, and the fp32 fragment addresses of the bf16 and ZeRO-1/2 optimizers. DynamicLossScaler:
# the fp16 scaler (deepspeed.precision=fp16), same module.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
CHUNK = 8 * 2**20
META = "ffscale.json"  # files, versions, world size, ZeRO stage and shapes; read before DeepSpeed loads
FORMAT = 2  # 2: files and versions recorded (format 1 recorded neither and is no longer read)
DAMAGED = ".damaged"  # a checkpoint that failed its check, moved aside (never deleted)


def versions() -> dict[str, str]:
    """The versions that write (or would read) a checkpoint here, from the installed packages'
    metadata (no import of DeepSpeed: `ffscale verify` runs without its start-up)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("ffscale")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        ours = "0+unknown"
    return {"ffscale": ours, "deepspeed": version("deepspeed"), "torch": version("torch").split("+")[0]}


def incompatible(saved: dict, here: dict | None = None) -> str | None:
    """Why a checkpoint written with `saved` versions cannot be loaded here (None: it can). DeepSpeed
    changes its checkpoint layout between minor releases and promises nothing across them, so the
    rule is the same DeepSpeed major.minor, the same torch major, and this ffscale's format."""
    here = here or versions()
    if saved.get("format", FORMAT) > FORMAT:
        return (
            f"ffscale {saved.get('ffscale', '?')} wrote it in a newer checkpoint format ({saved['format']})"
        )
    minor = lambda v: ".".join(str(v).split(".")[:2])  # noqa: E731
    ds, th = saved.get("deepspeed"), saved.get("torch")
    if ds is None or th is None:
        return "it is in checkpoint format 1 (no versions or files recorded), which ffscale no longer reads"
    if minor(ds) != minor(here["deepspeed"]):
        return f"deepspeed {ds} wrote it, this is deepspeed {here['deepspeed']}"
    if str(th).split(".")[0] != here["torch"].split(".")[0]:
        return f"torch {th} wrote it, this is torch {here['torch']}"
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def sync(path: Path) -> None:
    """fsync a file, or a directory's entries."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record(path: Path, root: Path) -> dict:
    """{relative path: {size, sha256}} of a file this rank wrote, after syncing it."""
    sync(path)
    return {str(path.relative_to(root)): {"size": path.stat().st_size, "sha256": sha256(path)}}


@dataclass
class Problem:
    file: str
    what: str
    untrusted: bool = False  # a planted pickle, not storage damage

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


def unsafe_globals(path: Path) -> list[str]:
    """The globals a pickle file names beyond torch's weights-only types and DEEPSPEED_GLOBALS."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # torch's zip reader raises OSError, RuntimeError, ... on a cut file
        raise ValueError(f"not a readable torch file ({type(e).__name__}: {str(e)[:120]})") from None
    return sorted(set(found) - set(DEEPSPEED_GLOBALS))


def check_file(root: Path, name: str, want: dict | None, deep: bool = True) -> Problem | None:
    """One file: its pickle's globals first (a planted file is named as such, whatever its size),
    then its size and, when `deep`, its sha256 against the record. `want` None: a file no record
    lists (a universal checkpoint, which ffscale converts and never records)."""
    p = root / name
    if not p.is_file():
        return Problem(name, "missing")
    unreadable = None
    if p.suffix in (".pt", ".pth"):
        try:
            bad = unsafe_globals(p)
        except ValueError as e:
            bad, unreadable = [], Problem(name, str(e))
        if bad:
            return Problem(
                name,
                f"the pickle holds {', '.join(bad)}, which loading could run as code (a checkpoint holds "
                "only tensors, containers and DeepSpeed's own types)",
                untrusted=True,
            )
    if want is not None:
        try:  # EIO or a file vanishing under us is the storage damage this looks for: a problem, not a crash
            size = p.stat().st_size
            if size != want["size"]:
                return Problem(name, f"{size:,} bytes, {want['size']:,} recorded (truncated or replaced)")
            if deep and sha256(p) != want["sha256"]:
                return Problem(name, "sha256 differs from the one recorded (damaged or replaced)")
        except OSError as e:
            return Problem(name, f"unreadable ({e})")
    return unreadable


def pickles(root: Path) -> list[str]:
    """Every torch file under `root` (relative paths, sorted): what a load could unpickle."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.suffix in (".pt", ".pth"))


def check(root: Path, files: dict | None, mine=lambda i: True, deep: bool = True) -> list[Problem]:
    """The problems of the files at positions `mine(i)` of the checkpoint's sorted file list (ranks
    split the work). `files` None: the pickles on disk, unhashed (a universal checkpoint)."""
    names = sorted(files) if files is not None else pickles(root)
    out = []
    for i, name in enumerate(names):
        if mine(i) and (p := check_file(root, name, files[name] if files else None, deep)):
            out.append(p)
    return out


def step_of(tag: str) -> int:
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else -1


def verify_tree(root: Path, say=print) -> tuple[int, int]:
    """`ffscale verify RUN_DIR`: every complete checkpoint under `root` (a run, a stage or a checkpoints
    directory), all files hashed; damaged ones set aside and incomplete ones are listed too.
    (checkpoint directories found, how many of them failed)."""
    import json
    import time

    bad, found = 0, 0
    root = Path(root)
    # by their folder too, not only by a finished META: a run whose one checkpoint write was killed
    # holds an incomplete checkpoint and nothing else, and that is to be listed, not missed
    dirs = {m.parent.parent for m in root.rglob(f"step*/{META}")}
    dirs |= {d for d in [root, *root.rglob("checkpoints")] if d.name == "checkpoints" and d.is_dir()}
    for ckpt_dir in sorted(dirs):
        for d in sorted(ckpt_dir.iterdir(), key=lambda x: (step_of(x.name.split(".")[0]), x.name)):
            found += d.is_dir() and step_of(d.name.split(".")[0]) >= 0
            if DAMAGED in d.name:
                say(f"{d}: set aside by a resume as damaged")
                continue
            if step_of(d.name) < 0:
                continue
            if not (d / META).is_file():
                say(f"{d}: incomplete (no {META}: a write that was interrupted)")
                continue
            t0 = time.perf_counter()
            try:
                m = json.loads((d / META).read_text())
            except ValueError as e:
                bad += 1
                say(f"{d}: DAMAGED: {META} unreadable ({e})")
                continue
            why = incompatible(m)
            problems = check(d, m.get("files", {}))  # a format without a file list: `why` says so
            if problems or why:
                bad += 1
                say(f"{d}: {'UNTRUSTED' if any(p.untrusted for p in problems) else 'DAMAGED'}: "
                    + "; ".join([str(p) for p in problems] + ([f"cannot be resumed here: {why}"] if why else [])))  # fmt: skip
                continue
            files = m["files"]
            size = sum(f["size"] for f in files.values())
            say(
                f"{d}: {len(files)} files, {size / 2**20:,.1f} MiB, sizes and sha256 as recorded "
                f"(deepspeed {m['deepspeed']}; checked in {time.perf_counter() - t0:.2f} s)"
            )
    return found, bad
