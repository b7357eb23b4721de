"""The DeepSpeed launcher started and seen through for `ffscale train` (ffscale/cli/train.py checks the job first).

Preemption: SIGTERM/SIGINT go to the rank processes only, never to DeepSpeed's launcher. Its
`terminate_process_tree` (deepspeed/launcher/launch.py) answers a signal by terminating the ranks and
SIGKILLing any still alive 30 s later, whatever grace the pod has, so a large checkpoint on a network
filesystem would die mid-write. The ranks write their checkpoint and exit 143; only if they are still
running after `--grace` seconds is the whole group killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ffscale.util import startup
from ffscale.util.lifeline import job_env
from ffscale.util.secrets import redact


def launcher_cmd(a, entry: Path, nproc: int) -> list[str]:
    """`entry`: the script every rank runs (ffscale/train.py, or the user's --entry)."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "-q", "--num_gpus", str(nproc), "--master_port", str(a.master_port)]
    if a.nnodes > 1:
        hosts = Path(tempfile.mkdtemp()) / "hostfile"
        hosts.write_text("".join(f"node{i} slots={nproc}\n" for i in range(a.nnodes)))
        cmd += ["--hostfile", str(hosts), "--no_ssh", "--num_nodes", str(a.nnodes)]
        cmd += ["--node_rank", str(a.node_rank), "--master_addr", a.master_addr]
    cmd += [str(entry)] + sum((["--config", c] for c in a.config), [])
    return cmd + sum((["--allow-change", k] for k in a.allow_change), []) + a.overrides


def rank_processes(launcher_pid: int) -> list[psutil.Process]:
    """The training ranks under the launcher (they carry --local_rank), not the launchers."""
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            if any(arg.startswith("--local_rank") for arg in p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def run(a, entry: Path, nproc: int, env: dict) -> int:
    """Start the launcher in its own process group; forward SIGTERM/SIGINT to the ranks; return
    the launcher's exit code, or 128 + the signal when one came."""
    cmd = launcher_cmd(a, entry, nproc)
    print("+", redact(" ".join(cmd)), flush=True)  # no credential in the log (ffscale/util/secrets.py)
    # Its own session: a terminal's Ctrl-C reaches `ffscale train` alone, which passes it to the ranks
    # only. The ranks watch this process and die with it (ffscale/util/lifeline.py); the launcher then
    # exits, as it does whenever its ranks end.
    startup.mark("launcher_started")
    proc = subprocess.Popen(cmd, env={**env, **job_env()}, start_new_session=True)
    got: list[int] = []
    since: list[float] = []  # when the first signal came

    def forward(signum, frame):
        got.append(signum)
        since.append(time.monotonic())
        ranks = rank_processes(proc.pid)
        for r in ranks:
            try:
                r.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        if not ranks:  # not started yet: stop the launcher itself
            _signal_group(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while proc.poll() is None:
        if since and time.monotonic() - since[0] > a.grace:
            print(
                f"ffscale: ranks still running {a.grace:g} s after the signal (--grace): killing them",
                flush=True,
            )
            _signal_group(proc.pid, signal.SIGKILL)
        time.sleep(0.2)
    if proc.returncode in (2, 3):  # a rerun cannot fix it (config, damaged checkpoints, run taken over),
        return proc.returncode  # even when a signal also came: a scheduler must not requeue it
    return 128 + got[0] if got else proc.returncode


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
