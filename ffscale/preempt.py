"""SIGTERM (Kubernetes preemption, node drain, the launcher's forwarding) -> checkpoint and exit.

The handler only sets a flag; the loop asks at each optimizer step whether any rank saw it, so all
ranks stop at the same step, write one checkpoint together, and exit with 143.
"""

from __future__ import annotations

import signal

import torch

_requested = False
EXIT_CODE = 143  # 128 + SIGTERM


class Preempted(Exception):
    pass


def _handler(signum, frame) -> None:
    global _requested
    _requested = True


def install() -> None:
    signal.signal(signal.SIGTERM, _handler)


def requested_anywhere(device: torch.device) -> bool:
    flag = torch.tensor([1.0 if _requested else 0.0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
