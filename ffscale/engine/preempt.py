"""SIGTERM (Kubernetes preemption, node drain, the launcher's forwarding) -> checkpoint and exit.

The handler only sets a flag. The engine folds it into the one collective it makes per optimizer
step, so all ranks see it at the same step, write one checkpoint together, and exit with 143.
"""

from __future__ import annotations

import signal

_requested = False


def _handler(signum, frame) -> None:
    global _requested
    _requested = True


def install() -> None:
    signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    """Was this process sent SIGTERM?"""
    return _requested
