"""Environment for the rank processes ffscale starts on a CPU host: jemalloc, keeping freed pages.

glibc hands every large free back to the kernel, so each step's fresh activations, gradients and
DeepSpeed's flattened gradient buffers fault their pages in again: on the 2-core CI host a fresh
232 MB buffer costs 0.16 s to fill against 0.03 s for a reused one. jemalloc configured to keep
dirty pages (Intel's recommended setting for PyTorch on CPUs) reuses them: ff_base at 112 px steps
2.11 -> 2.03 s with ZeRO-0 and 2.33 -> 2.14 s with ZeRO-2 (docs/performance.md).

Used on hosts without an NVIDIA driver when Debian's libjemalloc2 is installed (scripts/setup.sh
installs it) and LD_PRELOAD is unset;
FFSCALE_JEMALLOC=0 opts out. Must be in the environment before the process starts, so the launchers
(`ffscale train`, `ffscale bench train`) set it for their ranks, and `ffscale/train.py` started by
another launcher (`deepspeed ffscale/train.py ...`) restarts itself once with it on a CPU host.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys

JEMALLOC_CONF = (
    "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
)


def jemalloc() -> str | None:
    return ctypes.util.find_library("jemalloc")


def rank_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) plus the allocator settings for CPU ranks."""
    env = dict(os.environ if env is None else env)
    if gpu_host() or env.get("FFSCALE_JEMALLOC") == "0" or env.get("LD_PRELOAD"):
        return env
    lib = jemalloc()
    if lib:
        env["LD_PRELOAD"] = lib
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def allocator() -> str:
    """The malloc this process runs on, for the log: 'jemalloc' when preloaded, else 'glibc'."""
    try:
        with open("/proc/self/maps") as f:
            return "jemalloc" if "libjemalloc" in f.read() else "glibc"
    except OSError:
        return "unknown"


def gpu_host() -> bool:
    """An NVIDIA driver is present: decided without importing torch (2 s per rank on a small CPU)."""
    return os.path.exists("/dev/nvidiactl") or ctypes.util.find_library("cuda") is not None


def gpus_may_be_visible() -> bool:
    """Whether this process may see a CUDA GPU, decided without importing torch (so that a CPU host
    never imports it to learn it has none): CUDA_VISIBLE_DEVICES naming devices, or GPU device files
    (the driver makes /dev/nvidia0, ... one per GPU, and container runtimes mount a container's own;
    WSL 2 passes GPUs through as /dev/dxg). CUDA reads CUDA_VISIBLE_DEVICES up to its first invalid
    entry (CUDA C Programming Guide, "CUDA Environment Variables"), so an empty list or one starting
    with -1 hides every GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return bool(visible.strip()) and not visible.strip().startswith("-")
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")


def reexec_with_rank_env() -> None:
    """Restart this process once under `rank_env` where that changes anything (a CPU rank without
    jemalloc). Same pid and arguments, so the launcher that started it does not notice."""
    if os.environ.get("FFSCALE_REEXEC"):
        return
    env = rank_env()
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    env["FFSCALE_REEXEC"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
