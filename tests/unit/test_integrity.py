"""One writer per run (the lock), explicit config changes on resume, the exit-code contract, predict's inputs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.launch import ROOT

from ffscale import config
from ffscale.errors import ConfigError, LockHeld, LockLost
from ffscale.inference.stagedir import HISTORY
from ffscale.run import changes, runlock
from ffscale.run.runlock import BEAT, ENV, LOCK, RunLock, read

CLI = Path(sys.executable).with_name("ffscale")


def test_a_second_holder_is_refused_naming_the_first_and_release_frees_it(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.05) as first:
        h = read(tmp_path / LOCK)
        assert (h.host, h.pid, h.token) == (socket.gethostname(), os.getpid(), first.me.token)
        time.sleep(0.3)
        assert read(tmp_path / LOCK).heartbeat > h.heartbeat  # the heartbeat moves
        with pytest.raises(LockHeld, match=rf"in use by host {socket.gethostname()} pid {os.getpid()} "):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK).exists()
    RunLock(tmp_path).acquire().release()


def test_waiting_for_the_lock_gets_it_when_the_holder_ends_within_the_wait(tmp_path):
    said = []
    first = RunLock(tmp_path).acquire()
    threading.Timer(0.5, first.release).start()  # a pod still writing its preemption checkpoint
    second = RunLock(tmp_path, say=said.append, wait_s=30).acquire()
    assert read(tmp_path / LOCK).token == second.me.token and said[0].startswith(
        "ffscale: waiting up to 30 s"
    )
    second.release()


def _plant(d: Path, host: str, pid: int, age: float, token: str = "t0") -> None:
    now = time.time()
    (d / LOCK).write_text(json.dumps({"token": token, "host": host, "pid": pid, "started": now - age}))
    (d / f"{BEAT}{token}").write_text(repr(now - age))


def test_a_stale_lock_is_judged_on_the_waiters_clock_and_taken_over_saying_so(tmp_path):
    said = []
    _plant(tmp_path, "node-7", 4242, age=5)  # another host, fresh heartbeat: held, at once
    with pytest.raises(LockHeld, match="host node-7 pid 4242 .*heartbeat 5 s ago"):
        RunLock(tmp_path, stale_s=60).acquire()
    # an old heartbeat by the holder's clock (skewed by 2 minutes) that still advances: live
    _plant(tmp_path, "node-7", 4242, age=120)
    beat = tmp_path / f"{BEAT}t0"
    stop = threading.Event()

    def beating():
        while not stop.wait(0.2):
            beat.write_text(repr(time.time() - 120))

    threading.Thread(target=beating, daemon=True).start()
    with pytest.raises(LockHeld, match="host node-7"):
        RunLock(tmp_path, stale_s=0.8, say=said.append).acquire()
    assert "watching it for up to 1 s" in said[0]
    stop.set()
    time.sleep(0.3)  # its node is gone: the heartbeat stops, and after stale_s of ours it is taken
    t0 = time.monotonic()
    lock = RunLock(tmp_path, stale_s=0.8, say=said.append).acquire()
    assert time.monotonic() - t0 >= 0.7 and "taking over the run lock of host node-7" in said[-1]
    assert read(tmp_path / LOCK).token == lock.me.token and not beat.exists()
    lock.release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    # this host, pid gone, but a rank of its job still runs (it carries the token): held
    rank = subprocess.Popen(["sleep", "30"], env={**os.environ, ENV: "t0"})
    try:
        _plant(tmp_path, socket.gethostname(), dead.pid, age=1)
        with pytest.raises(LockHeld):
            RunLock(tmp_path, stale_s=3600).acquire()
    finally:
        rank.kill()
        rank.wait()
    RunLock(tmp_path, stale_s=3600).acquire().release()  # now at once


def test_a_heartbeat_never_overwrites_another_holders_lock_and_the_loser_is_fenced(tmp_path):
    said = []
    a = RunLock(tmp_path, heartbeat_s=0.1, say=said.append).acquire()
    runlock.fence(tmp_path, a.me.token)  # its own: nothing happens
    lock = tmp_path / LOCK
    for _ in range(5):  # a contender's takeover moves it aside, finds it live, puts it back (0.06 s)
        os.rename(lock, tmp_path / "aside")
        time.sleep(0.06)  # under one beat: at most one beat sees it gone (most of the five windows do)
        os.link(tmp_path / "aside", lock)
        (tmp_path / "aside").unlink()
        time.sleep(0.25)
    assert a.held() and not said  # a lock absent for an instant is not lost
    a.heartbeat_s = 0.05
    _plant(tmp_path, "node-9", 77, age=0, token="b")  # taken over while `a` looked dead to node-9
    time.sleep(0.4)  # a's heartbeat runs meanwhile
    assert read(tmp_path / LOCK).token == "b" and not a.held()
    assert any("lost the run lock" in m for m in said)
    with pytest.raises(LockLost, match=r"no longer this job's: its lock is held by host node-9 pid 77"):
        runlock.fence(tmp_path, a.me.token)
    assert LockLost.exit_code == 3
    a.release()  # releasing leaves the new holder's lock in place
    assert read(tmp_path / LOCK).token == "b"


def _stage(tmp_path: Path, *overrides: str) -> tuple[config.Stage, config.RunCfg]:
    cfg = config.load(
        [str(ROOT / "configs" / "demo.yaml")], [f"run.dir={tmp_path}", "run.name=r", *overrides]
    )
    return config.stages(cfg)[0], cfg.run


def test_a_resumed_stage_refuses_changes_unless_allowed_and_never_fixed_keys(tmp_path):
    stage, run = _stage(tmp_path)
    (stage.dir / "checkpoints").mkdir(parents=True)
    changes.started(stage, run, "scratch")
    assert changes.check(stage, run, set()) == {}  # not resuming yet: no checkpoint
    (stage.dir / "checkpoints" / "latest").write_text("step5")
    lr = stage.cfg.optim.base_lr
    new, run = _stage(tmp_path, f"optim.base_lr={lr * 2}", "schedule.stop_at_step=9", "checkpoint.keep=5")
    with pytest.raises(
        ConfigError, match=rf"optim.base_lr: {lr!r} -> {lr * 2!r}; run with --allow-change optim.base_lr"
    ):
        changes.check(new, run, set())
    assert changes.check(new, run, {"optim.base_lr"}) == {
        "optim.base_lr": [lr, lr * 2]
    }  # stop_at_step, workers: free
    changes.record(new, 5, {"optim.base_lr": [lr, lr * 2]})
    with open(stage.dir / HISTORY, "a") as f:
        f.write('{"step": 7, "chan')  # an append cut short by a kill: never applied
    assert changes.check(new, run, set()) == {}  # the history's effective config has it now
    shape, run = _stage(tmp_path, f"optim.base_lr={lr * 2}", "model.depth=9")
    with pytest.raises(ConfigError, match="model.depth: 4 -> 9: cannot change mid-stage"):
        changes.check(shape, run, {"model.depth"})


def test_the_same_shards_at_a_new_path_resume_and_other_shards_do_not(tmp_path, fm_shards):
    import shutil

    stage, run = _stage(tmp_path, f"data.train={fm_shards / 'train'}", f"data.val={fm_shards / 'val'}")
    (stage.dir / "checkpoints").mkdir(parents=True)
    changes.started(stage, run, "scratch")
    (stage.dir / "checkpoints" / "latest").write_text("step5")
    shutil.copytree(fm_shards, tmp_path / "moved")  # the volume mounted elsewhere
    moved, run = _stage(
        tmp_path, f"data.train={tmp_path / 'moved' / 'train'}", f"data.val={tmp_path / 'moved' / 'val'}"
    )
    assert changes.check(moved, run, set()) == {}
    other, run = _stage(tmp_path, f"data.train={fm_shards / 'val'}", f"data.val={fm_shards / 'val'}")
    with pytest.raises(ConfigError, match="data.train: .* cannot change mid-stage"):
        changes.check(other, run, {"data.train"})


def test_every_exit_code_in_docs_training_names_the_tests_that_check_it():
    text = (ROOT / "docs" / "training.md").read_text()
    table = text[text.index("## Exit codes") :].split("\n\n")[1]
    rows = [r for r in table.splitlines() if re.match(r"\| (0|1|2|3|143)", r)]
    assert [r.split("|")[1].strip().split()[0] for r in rows] == ["0", "2", "3", "143", "1"]
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    for r in rows:
        named = re.findall(r"`(test_\w+)`", r)
        assert named, r
        assert all(f"def {t}(" in tests for t in named), r


def test_predict_reads_images_as_paths_or_base64(tmp_path):
    import base64
    import io

    from PIL import Image

    from ffscale.inference.predict import open_image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    for source in (str(tmp_path / "a.png"), base64.b64encode(buf.getvalue()).decode(), buf.getvalue()):
        assert open_image(source).size == (40, 30)


def test_a_lost_latest_pointer_resumes_from_the_newest_complete_checkpoint_and_deletes_nothing(tmp_path):
    """`latest` missing, or naming a removed directory (lost on shared storage): the newest checkpoint
    whose ffscale.json was written is resumed, and no complete one is taken for a partial write."""
    from ffscale.engine import checkpoint as ck

    for step in (100, 200, 300):
        (tmp_path / f"step{step}").mkdir()
        (tmp_path / f"step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if step < 300:  # step300: killed before every rank had written (no ffscale.json)
            (tmp_path / f"step{step}" / ck.META).write_text("{}")
    assert ck.latest_tag(tmp_path) == "step200"
    assert "is missing: resuming from step200" in ck.pointer_note(tmp_path)
    (tmp_path / ck.LATEST).write_text("step900")
    assert "names step900, which is gone: resuming from step200" in ck.pointer_note(tmp_path)
    assert ck.remove_partial(tmp_path) == ["step300"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step100", "step200"]
    (tmp_path / ck.LATEST).write_text("step200")
    assert ck.pointer_note(tmp_path) is None and ck.remove_partial(tmp_path) == []
