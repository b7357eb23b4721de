"""Ranks that never outlive their job.

`ffscale train` starts a launcher (ffscale/run/ranks.py), which starts the ranks. Killed with SIGKILL (the OOM
killer, `kill -9`, a supervisor), a parent cannot stop its children, and they would train on as
orphans while a rerun takes the run over. Two guards, both in every rank:
- the parent-death signal (prctl(2) PR_SET_PDEATHSIG): the kernel kills the rank the moment its
  launcher process exits;
- a watch on `ffscale train` itself (its pid and start time, every 0.5 s), for the processes in
  between (ffscale's launcher, or DeepSpeed's runner and its launch.py) do not pass a parent's death on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Receive `sig` when the parent exits; exit now if it already has. A no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        print(f"ffscale: warning: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}): this rank may "
              "outlive its launcher; the watch on its job and the run lock's fence still hold",
              file=sys.stderr, flush=True)  # fmt: skip
        return
    if os.getppid() != parent:  # it died before the signal was armed (a launcher as PID 1 is fine)
        os.kill(os.getpid(), sig)


JOB_PID = "FFSCALE_JOB_PID"  # the `ffscale train` process whose job this rank belongs to
JOB_START = "FFSCALE_JOB_START"  # its start time (psutil's create_time): a reused pid is not it


def job_env() -> dict[str, str]:
    """What `ffscale train` gives its ranks so that they can watch it."""
    import psutil

    me = psutil.Process()
    return {JOB_PID: str(me.pid), JOB_START: repr(me.create_time())}


def watch_job(interval_s: float = 0.5) -> None:
    """In a rank started by `ffscale train`: a daemon thread that kills this rank once that process
    is gone. The parent-death signal reaches only the direct parent's child, and between
    `ffscale train` and a rank sits a launcher, which does not pass it on."""
    import threading
    import time

    import psutil

    pid, start = os.environ.get(JOB_PID), os.environ.get(JOB_START)
    if not pid or not start:
        return

    def alive() -> bool:
        try:
            return repr(psutil.Process(int(pid)).create_time()) == start
        except psutil.Error:
            return False

    def loop() -> None:
        while alive():
            time.sleep(interval_s)
        print(f"ffscale: rank {os.environ.get('RANK', '?')}: its job (`ffscale train`, pid {pid}) is gone: "
              "stopping", file=sys.stderr, flush=True)  # fmt: skip
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=loop, daemon=True, name="ffscale-job-watch").start()
