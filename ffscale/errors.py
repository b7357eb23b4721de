"""Every error a user can cause or fix, with its exit code, and the one place that reports them.

Exit codes: 2 for what will not fix itself on a rerun (config, data, a checkpoint of another
model), so a Kubernetes Job does not retry it; 3 for a job whose run directory another job took
over (not retried either); 1 for a failure worth a look (disk full, NaN); 143 for a preempted job
that wrote its checkpoint. A user's mistake is one line, never a traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable


class FfscaleError(Exception):
    """Base: `exit_code`, the `kind` shown before the message, and whether every rank raises it
    alike (then only rank 0 prints it) or one rank found it alone (then that rank prints it)."""

    exit_code = 1
    kind = ""
    same_on_every_rank = True


class ConfigError(FfscaleError, ValueError):
    """A config problem, phrased for the user: names the file and/or the full key."""

    exit_code, kind = 2, "config error"


class DataError(FfscaleError, RuntimeError):
    """Bad input data; the message names the directory, shard and/or sample key."""

    exit_code, kind, same_on_every_rank = 2, "data error", False


class StorageError(DataError):
    """Remote storage did not answer (server down, connection reset, timeout) after a few tries: not
    the data, worth a retry; the rerun resumes (a staging keeps what it copied). Never skipped by
    data.on_error=skip."""

    exit_code, kind = 1, "storage error"


class DaliFailure(FfscaleError, RuntimeError):
    """DALI itself failed (no driver, a driver too old for its CUDA, nvJPEG, memory): not the data."""

    exit_code, kind, same_on_every_rank = 1, "DALI error", False


class CheckpointMismatch(FfscaleError, RuntimeError):
    """A checkpoint this run cannot load as is; the message says what to do."""

    exit_code = 2


class CheckpointDamaged(FfscaleError, RuntimeError):
    """Every complete checkpoint of a stage failed its check (truncated, missing or changed files):
    a rerun meets the same files."""

    exit_code, kind = 2, "damaged checkpoints"


class UntrustedFile(FfscaleError, ValueError):
    """A pickle that would have to run code to load; refused unless the user says they trust it."""

    exit_code, kind = 2, "untrusted file"


class LockHeld(FfscaleError, RuntimeError):
    """Another job holds the run directory: retrying at once cannot help."""

    exit_code, kind = 2, "run in use"


class LockLost(FfscaleError, RuntimeError):
    """This job's run lock was taken over (its heartbeat stopped long enough for another job to take
    the run): it stops before writing anything more. Retrying would fight the job that holds it."""

    exit_code, kind = 3, "run taken over"


class PeerGone(FfscaleError, RuntimeError):
    """Another rank stopped; this one says so in one line (worth a retry: the job resumes)."""

    exit_code, same_on_every_rank = 1, False


class CheckpointWriteError(FfscaleError, OSError):
    """A checkpoint could not be written (disk full, quota, I/O); the previous one is intact."""

    exit_code, same_on_every_rank = 1, False


class NonFiniteLoss(FfscaleError, FloatingPointError):
    """The loss was NaN/inf and optim.nonfinite says stop; every rank stops at the same step."""

    exit_code = 1


class ReportedElsewhere(FfscaleError):
    """Rank 0 found an error every rank must stop for and printed it; this rank exits alike, silently."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code


class Preempted(FfscaleError):
    """SIGTERM: every rank wrote the checkpoint together and stops."""

    exit_code = 143  # 128 + SIGTERM


def report(error: FfscaleError, rank: int | None = None) -> int:
    """Print `e` as one line (on the rank that should) and return its exit code."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if str(error) and (rank == 0 or not error.same_on_every_rank):
        print(f"ffscale: {error.kind + ': ' if error.kind else ''}{error}", file=sys.stderr, flush=True)
    return error.exit_code


def guarded(fn: Callable[[], int]) -> int:
    """Run a command body; an FfscaleError becomes its one line and exit code."""
    try:
        return fn()
    except FfscaleError as e:
        return report(e)


def peer_gone(error: RuntimeError) -> PeerGone | None:
    """A training rank's collective that failed because a peer stopped (its sockets closed, or it
    stopped answering past the timeout), as one line: the peer's own message is the one that explains.
    Only the ranks ask (ffscale/train.py): elsewhere "timed out" can mean anything."""
    if not PEER_GONE.search(str(error)):
        return None
    rank = os.environ.get("RANK", "?")
    return PeerGone(f"rank {rank} stopped: another rank failed or stopped answering ({_first_line(error)})")


# gloo's and NCCL's words for a collective whose peer is gone, or that waited past its timeout
PEER_GONE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|NCCL communicator was aborted|"
                       r"timed out", re.I)  # fmt: skip


def _first_line(error: Exception) -> str:
    line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    return re.sub(r"^\[[^\]]*\]\s*", "", line)[:200]
