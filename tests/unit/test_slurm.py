"""The Slurm script's signal forwarding and requeueing, in a shell harness: no Slurm here, so `srun`
and `scontrol` are small stand-ins on PATH (srun forwards signals to its task, as Slurm documents),
and `ffscale` is one that waits and answers SIGTERM with exit 143 as training does."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from helpers.launch import ROOT

SBATCH = ROOT / "cluster" / "slurm" / "ffscale.sbatch"
FAKES = {
    "scontrol": """#!/bin/bash
case $1 in show) echo node0; echo node1 ;; requeue) echo "scontrol requeue $2" >> "$LOG" ;; esac
""",
    # srun: run the task in the background and forward SIGTERM to it (srun.1, SIGNALS AND ESCAPE SEQUENCES)
    "srun": """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
SLURM_NODEID=0 "$@" & child=$!
trap 'kill -TERM $child' TERM
while :; do wait $child; rc=$?; kill -0 $child 2>/dev/null || break; done
exit $rc
""",
    "ffscale": """#!/bin/bash
echo "ffscale $* TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR" >> "$LOG"
trap 'echo "ffscale got SIGTERM" >> "$LOG"; exit 143' TERM
[ -n "${FAKE_RC:-}" ] && exit "$FAKE_RC"
for _ in $(seq 300); do sleep 0.1; done
""",
}


def _start(tmp_path: Path, **extra) -> tuple[subprocess.Popen, Path]:
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, body in FAKES.items():
        (bin_ / name).write_text(body)
        (bin_ / name).chmod(0o755)
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "SLURM_TMPDIR")}
    env |= {"PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "42",
            "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", **extra}  # fmt: skip
    p = subprocess.Popen(["bash", str(SBATCH), "configs/ff_base.yaml", "optim.base_lr=1e-3", "run.name=a b;c"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return p, log


def test_sigterm_reaches_the_ranks_with_the_grace_and_the_job_is_requeued(tmp_path):
    p, log = _start(tmp_path)
    deadline = time.time() + 20
    while not (log.is_file() and "ffscale train" in log.read_text()):
        assert time.time() < deadline and p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends: the batch shell alone
    out, _ = p.communicate(timeout=20)
    lines = log.read_text().splitlines()
    assert p.returncode == 143, out
    # every argument arrives whole, a space or a `;` in one included (quoted for the task's shell)
    assert (
        "--grace 110 --wait-lock 120 --config configs/ff_base.yaml optim.base_lr=1e-3 run.name=a b;c"
        in lines[0]
    )
    assert "--nnodes 2 --node-rank 0 --master-addr node0" in lines[0]
    assert lines[0].endswith("TORCH_EXTENSIONS_DIR=/tmp/ffscale-torch-extensions")  # node-local
    assert lines[1:] == ["ffscale got SIGTERM", "scontrol requeue 42"], (lines, out)


def test_exits_that_a_rerun_cannot_fix_are_not_requeued_and_failures_are_a_bounded_number_of_times(tmp_path):
    for rc, restarts, requeued in ((2, 0, False), (3, 0, False), (0, 0, False), (1, 0, True), (1, 6, False)):
        log = tmp_path / "log"
        log.unlink(missing_ok=True)
        p, log = _start(tmp_path, FAKE_RC=str(rc), SLURM_RESTART_COUNT=str(restarts))
        out, _ = p.communicate(timeout=20)
        assert p.returncode == rc, out
        assert ("scontrol requeue 42" in log.read_text()) == requeued, (rc, restarts, out)
