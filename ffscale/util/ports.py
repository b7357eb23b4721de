"""A free TCP port for a job's rendezvous, without torch: the launchers' parents pick it."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel has just handed out on 127.0.0.1 (free unless taken again in between)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
