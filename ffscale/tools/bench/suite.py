"""`ffscale bench suite`: how long the test suite takes, so its figure is kept, not guessed.

Without `--unit`: `bash .ci/run` (= `bash scripts/test.sh`, README's second command) in a fresh clone of
this checkout's HEAD, with CI=true, as CI runs it: set-up, lint and every test. With `--unit`:
`pytest tests/unit` in this checkout, the tier a change is first checked with. Reported: the wall
time of the whole command, the time pytest itself reports, and its counts.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ffscale.tools.bench.results import REPO

# pytest's closing line, e.g. "354 passed, 8 warnings in 1234.56s (0:20:34)"
SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ \w+.*) in (?P<s>[\d.]+)s\b", re.M)
TIMEOUT_S = 2 * 3600


def run(a) -> dict:
    if a.unit:
        return _timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"], REPO)
    with tempfile.TemporaryDirectory(prefix="ffscale-suite-") as tmp:
        clone = Path(tmp) / "ffscale"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        return _timed(["bash", ".ci/run"], clone, fresh_clone=True)


def _timed(cmd: list[str], cwd: Path, fresh_clone: bool = False) -> dict:
    t0 = time.monotonic()
    p = subprocess.run(
        cmd, cwd=cwd, env={**os.environ, "CI": "true"}, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    wall = time.monotonic() - t0
    found = list(SUMMARY.finditer(p.stdout))
    if p.returncode or not found:
        raise RuntimeError(
            f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}"
        )
    last = found[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", last["counts"])}
    return {
        "command": shlex.join(cmd) + (" (in a fresh clone of HEAD)" if fresh_clone else ""),
        "wall_s": round(wall, 1),
        "pytest_s": float(last["s"]),
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "skipped": counts.get("skipped", 0),
    }


def table(res: dict) -> list[list]:
    return [
        ["command", "wall", "pytest's own time", "passed", "failed", "skipped"],
        [f"`{res['command']}`", _minutes(res["wall_s"]), _minutes(res["pytest_s"]), res["passed"],
         res["failed"], res["skipped"]],
    ]  # fmt: skip


def _minutes(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:.0f} s"


def print_table(res: dict) -> None:
    head, row = table(res)
    for k, v in zip(head, row):
        print(f"{k:<20} {v}")
