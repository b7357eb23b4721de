"""One writer per run directory: `<run dir>/.lock`, created exclusively, kept alive by a heartbeat.

The lock file says who holds it (token, host, pid, job start) and never changes once in place. It
is written aside, then hard-linked into place: link() fails if the name exists and is atomic on the
server over NFS (the classic NFS lock), so a contender never sees a half-written lock. The holder's
heartbeat goes to a file of its own, `.lock.beat-<token>`, so a heartbeat can never overwrite
another holder's lock.

A lock is stale when its heartbeat has not advanced for `stale_s` on the waiter's own clock (clocks
of hosts sharing a volume may disagree by more than that), or at once when its holder was a process
of this host that no longer exists and no process of this host still carries its token (the job's
ranks do, in their environment, until they exit). Taking over renames the lock aside first and checks
it moved the lock it judged stale (else puts it back), so of two jobs that both find it stale only
one wins. A job whose lock was taken over stops before its next checkpoint (`fence`, exit 3).
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

from ffscale.errors import LockHeld, LockLost
from ffscale.util.atomic import write_atomic

LOCK = ".lock"
BEAT = ".lock.beat-"  # + token: the holder's heartbeat, written by the holder alone
HEARTBEAT_S = 10.0
STALE_S = 60.0
ENV = "FFSCALE_RUN_LOCK"  # token of the lock this job's launcher holds (its ranks don't take it again)


@dataclass
class Holder:
    token: str
    host: str
    pid: int
    started: float
    heartbeat: float = 0.0  # the holder's clock at its last beat (for messages; never compared)

    def describe(self, now: float) -> str:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        beat = f"heartbeat {now - self.heartbeat:.0f} s ago" if self.heartbeat else "no heartbeat yet"
        return f"host {self.host} pid {self.pid} (job started {start}, {beat})"


def _beat_file(path: Path, token: str) -> Path:
    return path.with_name(BEAT + token)


def read(path: Path) -> Holder | None:
    """The lock's holder with its last heartbeat; None when there is no lock."""
    try:
        d = json.loads(path.read_text())
        h = Holder(**{k: d[k] for k in ("token", "host", "pid", "started")})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):  # not ours (or damaged): its heartbeat is its mtime
        mtime = path.stat().st_mtime if path.exists() else 0.0
        return Holder("?", "?", -1, mtime, mtime)
    try:
        h.heartbeat = float(_beat_file(path, h.token).read_text())
    except (OSError, ValueError):
        h.heartbeat = 0.0
    return h


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def token_in_use(token: str) -> bool:
    """Does a process of this host carry the lock's token (a rank of the job that took it)?"""
    needle = f"{ENV}={token}".encode()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                return True
        except OSError:
            continue
    return False


def gone_here(h: Holder) -> bool:
    """The holder was a process of this host, it is dead, and none of its job's ranks lives on."""
    return h.host == socket.gethostname() and h.pid > 0 and not _alive(h.pid) and not token_in_use(h.token)


def fresh(h: Holder, now: float, stale_s: float) -> bool:
    """Recently beaten by the holder's own clock: certainly live, no need to watch it."""
    return 0 <= now - h.heartbeat <= stale_s


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
        self._seen: tuple[str, float, float] | None = None  # (token, heartbeat, when first seen: our clock)

    def acquire(self) -> RunLock:
        deadline, said = time.monotonic() + self.wait_s, False
        while True:
            try:
                return self._acquire(watch=time.monotonic() < deadline)
            except LockHeld as e:
                if time.monotonic() >= deadline:
                    raise
                if not said:
                    self.say(f"ffscale: waiting up to {self.wait_s:.0f} s for the run lock: {e}")
                    said = True
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _unchanged_for(self, h: Holder) -> float:
        """Seconds, on our clock, since `h`'s heartbeat was last seen to change."""
        now = time.monotonic()
        if self._seen is None or self._seen[:2] != (h.token, h.heartbeat):
            self._seen = (h.token, h.heartbeat, now)
        return now - self._seen[2]

    def _stale(self, h: Holder, watch: bool) -> bool:
        """Gone here, or its heartbeat still for stale_s on our clock. A lock that looks old by its
        holder's clock is watched that long before it is taken (clocks of hosts differ); a fresh one
        is watched only while waiting for it."""
        if gone_here(h):
            return True
        if self._unchanged_for(h) >= self.stale_s:
            return True
        if fresh(h, time.time(), self.stale_s) and not watch:
            return False
        if not watch:
            self.say(
                f"ffscale: the run lock of {h.describe(time.time())} has an old heartbeat by its holder's "
                f"clock: watching it for up to {self.stale_s:.0f} s before taking it over"
            )
        while self._unchanged_for(h) < self.stale_s:
            time.sleep(min(1.0, self.heartbeat_s))
            now_h = read(self.path)
            if now_h is None or now_h.token != h.token:
                return False  # released or taken meanwhile: look again
            if now_h.heartbeat != h.heartbeat:
                return False  # it beats: live
            if not watch and fresh(now_h, time.time(), self.stale_s):
                return False
        return True

    def _acquire(self, watch: bool = False) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True, name="ffscale-run-lock")
                self._thread.start()
                return self
            h = read(self.path)
            if h is None:
                continue  # released meanwhile
            if not self._stale(h, watch):
                h = read(self.path) or h
                raise LockHeld(
                    f"run directory {self.path.parent} is in use by {h.describe(time.time())}: wait for that "
                    f"job, stop it, or pick another run.name (a lock whose heartbeat stops is taken over "
                    f"after {self.stale_s:.0f} s)"
                )
            if not self._remove(h.token, "stale"):  # another job took it over meanwhile
                continue
            _beat_file(self.path, h.token).unlink(missing_ok=True)
            self.say(f"ffscale: taking over the run lock of {h.describe(time.time())}: its holder is gone")
        raise LockHeld(
            f"run directory {self.path.parent}: could not take its lock (another job keeps taking it)"
        )

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{LOCK}.new-{self.me.token}")
        mine = {k: v for k, v in asdict(self.me).items() if k != "heartbeat"}
        write_atomic(tmp, json.dumps(mine))
        self._write_beat()
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            _beat_file(self.path, self.me.token).unlink(missing_ok=True)
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _write_beat(self) -> None:
        self.me.heartbeat = time.time()
        write_atomic(_beat_file(self.path, self.me.token), repr(self.me.heartbeat))

    def held(self) -> bool:
        h = read(self.path)
        return h is not None and h.token == self.me.token

    def _beat(self) -> None:
        foreign = 0  # beats in a row that found the lock not ours
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self.held():
                    foreign = 0
                    self._write_beat()  # its own file: never another holder's lock
                    continue
                foreign += 1
                if foreign < 2:  # absent for an instant: another job moving a stale lock aside and back
                    continue
                h = read(self.path)
                self.say(f"ffscale: warning: lost the run lock {self.path} (now "
                         f"{h.describe(time.time()) if h else 'nobody'}'s); this job stops before its next "
                         "checkpoint")  # fmt: skip
                return
            except OSError as e:  # a shared filesystem's hiccup: try again at the next beat
                self.say(f"ffscale: warning: run lock heartbeat failed ({e}); retrying")

    def _remove(self, token: str, why: str) -> bool:
        """Take the lock away if it is `token`'s: renamed aside first (one of several contenders gets
        it), then checked, and put back when it turned out to be another's. True when it was removed."""
        aside = self.path.with_name(f"{LOCK}.{why}-{self.me.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read(aside)
        if moved is None or moved.token != token:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        """Remove the lock if it is still ours; another job's (ours was taken over) is left alone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held():
            self._remove(self.me.token, "release")
        _beat_file(self.path, self.me.token).unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def fence(run_dir: Path, token: str | None) -> None:
    """Before a checkpoint: stop (LockLost, exit 3) when this job's lock is no longer in place, so a
    job whose run was taken over never writes into it again. `token` None: nothing to check."""
    if token is None:
        return
    h = read(Path(run_dir) / LOCK)
    if h is None or h.token != token:
        who = f"by {h.describe(time.time())}" if h else "by nobody (the lock is gone)"
        raise LockLost(
            f"run directory {run_dir} is no longer this job's: its lock is held {who}. Stopped before "
            "writing a checkpoint; do not rerun while that job runs"
        )
