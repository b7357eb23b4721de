"""`ffscale bench demo | suite | unit`: README's two commands timed as a user runs them, so their
figures are kept, not guessed.

- `demo`: `bash scripts/demo.sh` (README's first command) in a fresh clone of this checkout's HEAD:
  set-up, sharding, the pipeline; its final top-1 read from the pipeline's last line.
- `suite`: `bash .ci/run` (= `bash scripts/test.sh`, the second) in a fresh clone of HEAD with CI=true,
  as CI runs it: set-up, lint and every test; pytest's own time and counts from its closing line, and
  the slowest tests' phases it lists (kept in the record, where a slower suite shows where).
- `unit`: `pytest tests/unit` in this checkout, the tier a change is first checked with.
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

from ffscale.tools.bench.results import CLONED, REPO

# pytest's closing line, e.g. "354 passed, 8 warnings in 1234.56s (0:20:34)"
SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ \w+.*) in (?P<s>[\d.]+)s\b", re.M)
# a line of pytest's --durations list, e.g. "201.35s setup    tests/e2e/test_faults.py::test_chaos"
DURATION = re.compile(r"^(?P<s>[\d.]+)s (?P<when>setup|call|teardown)\s+(?P<test>\S+)$", re.M)
# the pipeline's last line (ffscale/run/pipeline.py)
FINAL = re.compile(r"^pipeline \S+: done; final test top-1 (?P<top1>[\d.]+)%", re.M)
TIMEOUT_S = 2 * 3600


def run(args) -> dict:
    if args.what == "unit":
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"]
        return tests(_timed(cmd, REPO))
    with tempfile.TemporaryDirectory(prefix=f"ffscale-{args.what}-") as tmp:
        clone = Path(tmp) / "ffscale"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        sha = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        if args.what == "demo":
            return demo(_timed(["bash", "scripts/demo.sh"], clone, fresh_clone=True)) | {CLONED: sha}
        return tests(_timed(["bash", ".ci/run"], clone, fresh_clone=True)) | {CLONED: sha}


def _timed(cmd: list[str], cwd: Path, fresh_clone: bool = False) -> tuple[dict, str]:
    """Run `cmd` in `cwd`; its wall time and output. A failed command raises with its output's tail."""
    t0 = time.monotonic()
    p = subprocess.run(
        cmd, cwd=cwd, env={**os.environ, "CI": "true"}, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    wall = time.monotonic() - t0
    if p.returncode:
        raise RuntimeError(
            f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}"
        )
    where = " (in a fresh clone of HEAD)" if fresh_clone else ""
    return {"command": shlex.join(cmd) + where, "wall_s": round(wall, 1)}, p.stdout


def tests(timed: tuple[dict, str]) -> dict:
    res, out = timed
    found = list(SUMMARY.finditer(out))
    if not found:
        raise RuntimeError(f"{res['command']}: no pytest closing line in its output:\n{out[-2000:]}")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", found[-1]["counts"])}
    slowest = [[float(m["s"]), m["when"], m["test"]] for m in DURATION.finditer(out)]
    return (
        res
        | {"pytest_s": float(found[-1]["s"])}
        | {k: counts.get(k, 0) for k in ("passed", "failed", "skipped")}
        | ({"slowest": slowest} if slowest else {})
    )


def demo(timed: tuple[dict, str]) -> dict:
    res, out = timed
    final = FINAL.search(out)
    if not final:
        raise RuntimeError(f"{res['command']}: no final top-1 in its output:\n{out[-2000:]}")
    return res | {"final_top1": float(final["top1"])}


def table(res: dict) -> list[list]:
    head = ["command", "wall"]
    row = [f"`{res['command']}`", _minutes(res["wall_s"])]
    if "final_top1" in res:
        return [head + ["final test top-1"], row + [f"{res['final_top1']:.2f}%"]]
    return [head + ["pytest's own time", "passed", "failed", "skipped"],
            row + [_minutes(res["pytest_s"]), res["passed"], res["failed"], res["skipped"]]]  # fmt: skip


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def print_table(res: dict) -> None:
    head, row = table(res)
    for k, v in zip(head, row):
        print(f"{k:<20} {v}")
