"""One writer per run directory: `<run dir>/.lock`, created exclusively, refreshed by a heartbeat.

The file says who holds it (host, pid, job start, heartbeat). It is written aside, then hard-linked
into place: link() fails if the name exists and is atomic on the server over NFS (the classic NFS
lock), so a contender never sees a half-written lock. Taking over a stale lock renames it aside
first and checks it moved the lock it judged stale (else it puts it back), so of two jobs that
both find it stale only one wins. A lock is stale when
its holder is a dead process on this host, or when its heartbeat is older than `stale_s` (the
holder's clock: hosts sharing a run directory are assumed NTP-synchronised to well under that).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ffscale.errors import LockHeld
from ffscale.util.atomic import write_atomic

LOCK = ".lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0
ENV = "FFSCALE_RUN_LOCK"  # token of the lock this job's launcher holds (its ranks don't take it again)


@dataclass
class Holder:
    token: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def describe(self, now: float) -> str:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host} pid {self.pid} (job started {start}, heartbeat {now - self.heartbeat:.0f} s ago)"


def read(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # not ours (or damaged): stale once its mtime is old enough
        mtime = path.stat().st_mtime if path.exists() else 0.0
        return Holder("?", "?", -1, mtime, mtime)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale(h: Holder, now: float, stale_s: float) -> bool:
    if h.host == socket.gethostname() and h.pid > 0 and not _alive(h.pid):
        return True  # a dead process on this host: no need to wait for the heartbeat to age
    return now - h.heartbeat > stale_s


class RunLock:
    """`with RunLock(run_dir):` holds the run directory for the block, or raises LockHeld (exit 2).
    While a live job holds it, wait up to `wait_s` first (a replacement pod whose predecessor is still
    writing its preemption checkpoint)."""

    def __init__(
        self,
        run_dir: Path,
        stale_s: float = STALE_S,
        heartbeat_s: float = HEARTBEAT_S,
        say=print,
        wait_s: float = 0,
    ):
        self.path = Path(run_dir) / LOCK
        self.stale_s, self.heartbeat_s, self.say, self.wait_s = stale_s, heartbeat_s, say, wait_s
        self.me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), time.time(), time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        deadline, said = time.monotonic() + self.wait_s, False
        while True:
            try:
                return self._acquire()
            except LockHeld as e:
                if time.monotonic() >= deadline:
                    raise
                if not said:
                    self.say(f"ffscale: waiting up to {self.wait_s:.0f} s for the run lock: {e}")
                    said = True
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def _acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True, name="ffscale-run-lock")
                self._thread.start()
                return self
            h, now = read(self.path), time.time()
            if h is None:
                continue  # released meanwhile
            if not stale(h, now, self.stale_s):
                raise LockHeld(
                    f"run directory {self.path.parent} is in use by {h.describe(now)}: wait for that job, "
                    f"stop it, or pick another run.name (a lock whose holder died is taken over after "
                    f"{self.stale_s:.0f} s without a heartbeat)"
                )
            aside = self.path.with_name(f"{LOCK}.stale-{self.me.token}")
            try:
                os.rename(self.path, aside)  # only one of several contenders gets it
            except FileNotFoundError:
                continue
            moved = read(aside)
            if moved is None or moved.token != h.token:  # another job took it over meanwhile: put back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            self.say(f"ffscale: taking over the run lock of {h.describe(now)}: its holder is gone")
        raise LockHeld(
            f"run directory {self.path.parent}: could not take its lock (another job keeps taking it)"
        )

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{LOCK}.new-{self.me.token}")
        write_atomic(tmp, json.dumps(asdict(self.me)))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                h = read(self.path)
                if h is None or h.token != self.me.token:
                    self.say(f"ffscale: warning: lost the run lock {self.path} (taken over by "
                             f"{h.describe(time.time()) if h else 'nobody'}); this job no longer holds it")  # fmt: skip
                    return
                self.me.heartbeat = time.time()
                write_atomic(self.path, json.dumps(asdict(self.me)))
            except OSError as e:  # a shared filesystem's hiccup: try again at the next beat
                self.say(f"ffscale: warning: run lock heartbeat failed ({e}); retrying")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        h = read(self.path)
        if h is not None and h.token == self.me.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
