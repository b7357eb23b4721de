"""README.md's and docs/training.md's commands run as a user would type them, from a directory that
links the checkout's configs/, ffscale/ and scripts/, with only the replacements in
tests/helpers/doc_commands.py (ranks and nodes that fit this host) and small overrides appended (the
tests' small model and shards, a few steps). What is skipped, and why, is the plan's too."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.doc_commands import PLAN, ROOT, Run, runnable, runs
from helpers.launch import free_port, launch_env, small_overrides

STOP = ["schedule.stop_at_step=2", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def ws(module_dir):
    """The user's working directory: the checkout's files the commands name, linked."""
    ws = module_dir / "ws"
    ws.mkdir()
    for name in ("configs", "ffscale", "scripts"):
        (ws / name).symlink_to(ROOT / name)
    return ws


def env(**extra) -> dict:
    # `ffscale` and `deepspeed` as the virtual environment puts them on PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return launch_env({"PATH": path, **extra})


def shell(ws: Path, command: str, extra: list[str] = (), limit: int = 240, **env_extra) -> subprocess.Popen:
    """The command through bash in `ws`, `extra` appended; `timeout` ends a hung rendezvous and its ranks
    (it signals its whole process group)."""
    line = f"{command} {shlex.join(extra)}".strip()
    return subprocess.Popen(["timeout", "-k", "10", str(limit), "bash", "-c", line], cwd=ws, env=env(**env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def finish(*procs: subprocess.Popen, timeout: int = 300) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outs)
    return outs


def test_ff_tiny_trains_with_ffscale_train(fm_shards, ws):
    # README's command and docs/training.md's, which adds shard paths (replaced by the tests' here)
    readme, training = runs("ff_tiny")
    assert training.startswith(readme)
    (out,) = finish(shell(ws, runnable(training), small_overrides(fm_shards, ws / "runs", "ff_tiny") + STOP))
    assert "2 rank(s)" in out and "stopped at schedule.stop_at_step=2" in out, out[-3000:]


def test_deepspeeds_launcher_without_ssh_trains_on_two_nodes_given_the_hostfile(fm_shards, ws):
    """docs/training.md's multi-node command without ssh: two "nodes" on 127.0.0.1 (DeepSpeed 0.19.8
    refuses --num_nodes > 1 without a hostfile: deepspeed/launcher/runner.py, `main`)."""
    (hostfile,) = runs("hostfile")
    finish(shell(ws, runnable(hostfile)))
    assert (ws / "hosts").read_text().split("\n")[:4] == [f"node{i} slots=8" for i in range(4)]
    (command,) = runs("two_nodes")
    command = runnable(command).replace("--master_addr", f"--master_port {free_port()} --master_addr", 1)
    args = small_overrides(fm_shards, ws / "runs", "two_nodes") + STOP
    outs = finish(*[shell(ws, command, args, RANK=str(rank)) for rank in (0, 1)])
    assert "2 rank(s)" in outs[0] and "stopped at schedule.stop_at_step=2" in outs[0], outs[0][-3000:]
    assert "nnodes=2" in outs[1] and "node_rank=1" in outs[1], outs[1][-3000:]  # launch.py on node 1


def test_table1_in_small_shards_cluttered_fashion_mnist_then_trains_the_three_families(ws):
    (shard,) = runs("cluttered")
    finish(shell(ws, runnable(shard), ["--limit", "256"]))
    assert (ws / "data" / "cluttered-fashion-mnist" / "val" / "manifest.json").is_file()
    (train,) = runs("table1_small")
    # the config's own model and shards (the data/ the shard command wrote), one epoch of each stage
    finish(shell(ws, runnable(train), ["schedule.epochs=1", "tracking.enabled=false"]), timeout=400)
    for stage in ("ff", "vit", "attn_only"):
        done = json.loads((ws / "runs" / "table1-small" / stage / "DONE").read_text())
        assert done["ranks"] == 2, done


def test_every_run_in_the_plan_is_run_here():
    names = {p.name for p in PLAN.values() if isinstance(p, Run)}  # a new Run needs its test here
    tested = {"ff_tiny", "hostfile", "two_nodes", "cluttered", "table1_small"}
    assert names == tested
