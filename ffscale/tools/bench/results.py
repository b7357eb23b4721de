"""Bench figures kept as data: `ffscale bench <name> --record` appends one record to
docs/results/<name>.json, and `ffscale bench report` writes the docs' tables from those files
(ffscale/tools/bench/report.py), so no figure in the docs is copied by hand.

Each file is one JSON list of records, oldest first, indented: any JSON tool reads it whole, and a
review sees each new record as its own block of lines. Records are added rarely (by hand, on a quiet
machine), so rewriting the whole file on append costs nothing; it is written atomically.

A record: `command` (the argv as a shell line), `commit` (git HEAD, `+dirty` when the tree differs
from it outside docs/results), `date` (UTC, ISO 8601), `machine` (no hostname: CPU, cores, memory,
GPUs, versions of the software the figures depend on) and `result` (the bench's --json output).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # the checkout whose code ran the bench
RESULTS = REPO / "docs" / "results"


def path(bench: str, results: Path = RESULTS) -> Path:
    return results / f"{bench}.json"


def load(bench: str, results: Path = RESULTS) -> list[dict]:
    """The bench's records, oldest first; none when it was never recorded."""
    p = path(bench, results)
    return json.loads(p.read_text()) if p.is_file() else []


def append(bench: str, argv: list[str], result, results: Path = RESULTS) -> dict:
    """Add one record of `result` to the bench's file; returns the record."""
    from ffscale.util.atomic import write_atomic

    rec = record(argv, result)
    write_atomic(path(bench, results), json.dumps([*load(bench, results), rec], indent=1) + "\n")
    return rec


def record(argv: list[str], result) -> dict:
    # a bench that ran in a fresh clone names the commit it cloned (CLONED in its result): the
    # checkout's own files, and any commit made while it ran, were no part of it
    cloned = None
    if isinstance(result, dict) and CLONED in result:
        result = dict(result)
        cloned = result.pop(CLONED)
    return {
        "command": shlex.join(["ffscale", *argv]),
        "commit": cloned or commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "result": result,
    }


CLONED = "cloned_commit"


def commit() -> str:
    """HEAD of the checkout, `+dirty` when its files differ from HEAD (docs/results aside: the
    records of earlier runs waiting to be committed are no change to the code)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as e:
            raise RuntimeError(f"--record needs a git checkout of ffscale ({REPO}): {e}") from None

    dirty = git("status", "--porcelain", "--", ".", ":(exclude)docs/results")
    return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")


def machine() -> dict:
    """What the figures depend on, without the hostname."""
    import psutil

    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _gpus(),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "deepspeed", "nvidia-dali", "mlflow")},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> str:
    """'N x name' from nvidia-smi (no CUDA context in this process), or 'none'."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "none"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    names = [n.strip() for n in out.splitlines() if n.strip()]
    return f"{len(names)} x {names[0]}" if names else "none"


def _version(name: str) -> str | None:
    """The installed version; DALI's wheel is named by its CUDA (nvidia-dali-cuda130), so that name
    is kept with it."""
    if name == "nvidia-dali":
        found = sorted(
            f"{d.metadata['Name']} {d.version}"
            for d in metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")
        )
        return ", ".join(found) or None
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
