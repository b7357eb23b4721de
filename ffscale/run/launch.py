"""The node's launcher (ffscale/run/ranks.py) started and seen through for `ffscale train`
(ffscale/cli/train.py checks the job first).

Preemption: SIGTERM/SIGINT go to the rank processes only, never to the launcher, which (as DeepSpeed's
launch.py, `terminate_process_tree`) answers a rank's failure by terminating the others and SIGKILLing
any still alive 30 s later, whatever grace the pod has: a large checkpoint on a network filesystem
would die mid-write. The ranks write their checkpoint and exit 143; only if they are still running
after `--grace` seconds is the whole group killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from ffscale.util import startup
from ffscale.util.lifeline import job_env
from ffscale.util.secrets import redact


def launcher_cmd(
    entry: Path,
    args: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
) -> list[str]:
    """This node's launcher (ffscale/run/ranks.py) starting its `nproc` ranks, each running `entry`
    (ffscale/train.py, or the user's --entry) with `args`: what DeepSpeed's runner and its launch.py
    do for a launch on one node or without ssh, without importing DeepSpeed in either process
    (seconds on every start: docs/results/startup.json)."""
    return [
        sys.executable, "-u", "-m", "ffscale.run.ranks", f"--nproc={nproc}", f"--nnodes={nnodes}",
        f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}",
        str(entry), *args,
    ]  # fmt: skip


def rank_args(args) -> list[str]:
    """What every rank of `ffscale train` gets: the config files, --allow-change keys, overrides."""
    files = sum((["--config", c] for c in args.config), [])
    return files + sum((["--allow-change", k] for k in args.allow_change), []) + args.overrides


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


def run(args, entry: Path, nproc: int, env: dict, stop: Callable[[], bool] = lambda: False) -> int:
    """Start the launcher in its own process group; forward SIGTERM/SIGINT to the ranks; return
    the launcher's exit code, or 128 + the signal when one came. `stop()` true: kill the launcher
    and its ranks at once (they have not touched the run: ffscale/run/verdict.py)."""
    cmd = launcher_cmd(
        entry, rank_args(args), nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port
    )
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
        if stop():
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        if since and time.monotonic() - since[0] > args.grace:
            print(
                f"ffscale: ranks still running {args.grace:g} s after the signal (--grace): killing them",
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
