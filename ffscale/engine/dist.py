"""Process group and device: one code path for gloo/CPU and NCCL/GPU."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from ffscale.util.ports import free_port


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device


def prepare_env() -> None:
    """Called before importing deepspeed: a plain `python` run becomes a 1-rank job, a CPU host
    skips DeepSpeed's accelerator probe, and CPU ranks share the cores instead of oversubscribing."""
    # torch 2.13 warns on every ZeRO step that DeepSpeed uses all_gather_into_tensor.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    if "RANK" not in os.environ:  # no launcher: single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if "OMP_NUM_THREADS" not in os.environ:  # launchers leave it unset: 10-20x slower steps
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))


class _QuietScheduler(logging.Filter):
    """WarmupCosineLR warns once at construction, before we step it to warmup_lr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before it has started" not in record.getMessage()


def init(timeout_s: int = 600) -> DistInfo:
    import deepspeed

    if not torch.cuda.is_available():
        # CPU ranks: training never uses DeepSpeed's shared-memory comm op; skip its ~45 s JIT build.
        # Only here: touching __compatible_ops__ makes DeepSpeed probe every op builder (compiler
        # subprocesses, GPU queries) on every rank, which on a GPU node costs start-up for nothing.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    defer_muon_compile()
    from deepspeed.utils import logger

    logger.addFilter(_QuietScheduler())
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, device)


def defer_muon_compile() -> None:
    """DeepSpeed's Muon kernels built with torch.compile at their first call, not when their module is
    imported. deepspeed 0.19.8 imports that module on every ZeRO engine build and step for an
    isinstance test against an optimizer ffscale never builds (deepspeed/runtime/zero/utils.py
    `is_zero_supported_optimizer`, stage_1_and_2.py `average_tensor`), and the module decorates
    three functions with `torch.compile` (deepspeed/runtime/zero/muon/original_muon.py through
    deepspeed/runtime/compiler.py `compile`), which imports torch._inductor's compiler in every rank
    (docs/performance.md, "Start-up", the engine part). torch.compile compiles at the first call
    either way; inside a function being compiled, a decorated one is traced as it is, as Dynamo does
    with a nested torch.compile."""
    from deepspeed.runtime import compiler

    if "deepspeed.runtime.zero.muon.original_muon" not in sys.modules:  # not decorated yet
        compiler.compile = lambda: _compile_on_first_call


def _compile_on_first_call(fn):
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if torch.compiler.is_compiling():  # traced into its caller's graph; nothing to cache
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    return call


def set_timeout(seconds: float, sync: bool = False) -> None:
    """Every collective of this rank gives up after `seconds` from now on. `sync`: a barrier first
    (under the old timeout), so that no rank starts collectives under a shorter timeout while a slow
    rank still finishes work the longer one allowed (as torchtitan's set_pg_timeouts,
    pytorch/torchtitan @ b5bcd76, torchtitan/distributed/utils.py:563-590)."""
    if not torch.distributed.is_initialized():
        return
    if sync:
        torch.distributed.barrier()
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    # every group, not only the default one: DeepSpeed reduces gradients and gathers ZeRO-3
    # parameters on a clone of the world group made without a timeout (deepspeed 0.19.8,
    # deepspeed/utils/groups.py `_clone_world_group`), which would wait torch's default
    for group in list(_world.pg_map):
        try:
            _set_pg_timeout(timedelta(seconds=seconds), group)
        except ValueError:  # a group this rank is not in
            continue


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def _here() -> torch.device:
    """The device collectives of this rank run on (NCCL: its GPU)."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a small picklable value)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(rank: int, fn):
    """fn() on rank 0; when it raises, every rank stops: rank 0 raises the error, the others
    ReportedElsewhere with its exit code (1 for an error that is not a user-facing FfscaleError, e.g.
    an OSError of shared storage). One collective that every rank must call, so all ranks stop alike
    instead of waiting in their next collective for a rank that left."""
    from ffscale.errors import FfscaleError, ReportedElsewhere

    out, code, failed = None, 0, None
    if rank == 0:
        try:
            out = fn()
        except Exception as e:
            failed, code = e, e.exit_code if isinstance(e, FfscaleError) else 1
    if code_all := int(all_reduce_sum(torch.tensor(float(code), device=_here())).item()):
        raise failed if rank == 0 else ReportedElsewhere(code_all)
    return out
