"""The preflight's torch checks run beside the ranks' start-up, and the ranks wait for their verdict.

`ffscale train` checks everything it can without torch before it launches (ffscale/run/preflight.py).
What needs torch (a distilled stage's teacher, the weights an earlier stage hands on) would cost the
launch a torch import in the parent first; instead a thread of the parent runs those checks while the
launcher and the ranks import, and writes its verdict to a file the ranks read before they touch
the run directory. A failed check is the parent's one line at once, and every rank stops silently
with its exit code (errors.ReportedElsewhere): no rank has written anything.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ffscale.errors import FfscaleError, ReportedElsewhere, report
from ffscale.util.atomic import write_atomic

ENV = "FFSCALE_PREFLIGHT_VERDICT"
OK = "ok"


class Verdict:
    """The torch checks on a thread; `path` holds "ok" or the failed check's exit code."""

    def __init__(self, checks: Callable[[], None]):
        self.path = Path(tempfile.mkdtemp(prefix="ffscale-preflight-")) / "verdict"
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, args=(checks,), daemon=True, name="preflight")
        self.thread.start()

    def _run(self, checks: Callable[[], None]) -> None:
        try:
            checks()
        except FfscaleError as e:
            self.exit_code = report(e, rank=0)
        except BaseException as e:  # a bug in a check must not leave the ranks waiting
            self.exit_code = 1
            print(f"ffscale: the preflight failed: {type(e).__name__}: {e}", flush=True)
        write_atomic(self.path, OK if self.exit_code is None else str(self.exit_code))

    def failed(self) -> int | None:
        """The failed check's exit code (its line already printed), None when every check passed."""
        self.thread.join()
        try:
            self.path.unlink()
            self.path.parent.rmdir()
        except OSError:
            pass
        return self.exit_code


def await_verdict(poll_s: float = 0.05) -> None:
    """On a rank: return once the launcher's checks passed; stop silently, as they did, otherwise.
    A rank never outlives its launcher (ffscale/util/lifeline.py), so the wait cannot outlive it."""
    where = os.environ.get(ENV)
    if not where:
        return
    path = Path(where)
    while not path.is_file():
        time.sleep(poll_s)
    said = path.read_text().strip()
    if said != OK:
        raise ReportedElsewhere(int(said))
