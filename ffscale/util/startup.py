"""Start-up timestamps from the processes themselves, for `ffscale bench startup`
(ffscale/tools/bench/startup.py).

Only when FFSCALE_STARTUP_TRACE names a file does `mark(phase)` append one JSON line to it:
{"phase", "t" (time.time()), "rank" (RANK, or null in `ffscale train` itself), "pid"}. Otherwise it
returns after one environment lookup. Each phase is written once per process (a second stage's
set-up is not the job's start-up). The ranks write concurrently: one O_APPEND write per line keeps
lines whole on a local filesystem (POSIX write(2): the offset move and the write are one step).
"""

from __future__ import annotations

import json
import os
import time

ENV = "FFSCALE_STARTUP_TRACE"
_marked: set[str] = set()


def mark(phase: str, created: bool = False) -> None:
    """Record that this process reached `phase` now; with `created`, when this process was created
    instead (`process_created`)."""
    path = os.environ.get(ENV)
    if not path or phase in _marked:
        return
    _marked.add(phase)
    rank = os.environ.get("RANK")
    line = {"phase": phase, "t": time.time(), "rank": None if rank is None else int(rank), "pid": os.getpid()}
    if created:
        line["t"] = process_created()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def process_created() -> float:
    """Creation time (epoch seconds) of this process, to a clock tick (10 ms).

    psutil's `create_time()` adds the boot time of /proc/stat's `btime`, which the kernel rounds
    down to whole seconds (psutil/_pslinux.py `boot_time`): it read up to 1 s early against
    time.time() here (0.5 s on this host). The process's age since boot is exact to a tick, so the
    boot time is taken from the clocks instead: now minus CLOCK_BOOTTIME."""
    import psutil

    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + psutil.Process().create_time() - psutil.boot_time()
