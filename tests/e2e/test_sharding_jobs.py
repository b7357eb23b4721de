"""A sharding job killed mid-way and rerun: real `ffscale shard` processes, SIGKILLed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from ffscale.data.manifest import load_manifest

CLI = Path(sys.executable).with_name("ffscale")


def test_sharding_killed_midway_then_rerun_gives_the_same_bytes_as_one_run_and_as_n_workers(tmp_path):
    cmd = [str(CLI), "shard", "fashion-mnist", "--limit", "4000", "--shard-size", "125"]
    whole = tmp_path / "whole"
    subprocess.run(
        [*cmd, "--out", str(whole), "--workers", "2"], check=True, capture_output=True, timeout=120
    )
    cut = tmp_path / "cut"
    p = subprocess.Popen([*cmd, "--out", str(cut), "--workers", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and len(list((cut / "train" / ".ffscale-shard").glob("*.done"))) < 5:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(list((cut / "train" / ".ffscale-shard").glob("*.done")))
    assert 5 <= done < 32 and not (cut / "train" / "manifest.json").exists()
    r = subprocess.run(
        [*cmd, "--out", str(cut), "--workers", "1"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and f"{done * 125:,} of 4,000 images already written" in r.stderr
    for split in ("train", "val"):
        a, b = load_manifest(whole / split)[0], load_manifest(cut / split)[0]
        assert a.digest == b.digest and [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
        # the binary sample index is written once the shard list is final: the same bytes either way
        assert a.index_sha256 and a.index_sha256 == b.index_sha256
        assert (cut / split / "sample-index.npy").is_file()
    assert not list((cut / "train").glob("*.tmp"))
