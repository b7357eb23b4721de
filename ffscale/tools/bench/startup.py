"""`ffscale bench startup`: from the exec of `ffscale train` to the end of the job's first optimizer
step, and its parts, timed by the processes themselves (ffscale/util/startup.py's marks).

The command (`ffscale train --nproc N --config configs/demo.yaml schedule.stop_at_step=1
tracking.enabled=false`, plus the given overrides) runs `--warmup` times (1) to warm the page cache,
then `--rounds` times, each in a fresh run directory; median, min and max of each part are reported. A part runs
from one event to the next, so the parts add up to the total. Rank events are the time the last
rank got there (the collectives wait for it), except the ranks' creation: the first rank's, which
ends the launcher's part (ffscale/run/ranks.py, which starts the node's ranks).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ffscale.util.startup import ENV

DEMO = "configs/demo.yaml"
STOP_AFTER_ONE_STEP = ["schedule.stop_at_step=1", "tracking.enabled=false"]
FFSCALE, UPSTREAM = "ffscale", "torch, DeepSpeed"
TIMEOUT_S = 900  # a failed rendezvous hangs rather than fails: gloo waits for the missing peer

# key, what it covers, from event, to event, whose code runs in it
PARTS = [
    ("total", "exec of `ffscale train` to the end of the first optimizer step", "exec", "first_step", ""),
    ("front_end", "`ffscale train` before it starts the launcher", "exec", "launcher_started", FFSCALE),
    ("front_end.python", "python start, ffscale.cli imported", "exec", "ffscale_started", FFSCALE),
    ("front_end.checks", "config, job checks without torch, run lock", "ffscale_started", "launcher_started", FFSCALE),
    ("launcher", "the node's launcher (ffscale/run/ranks.py) starts the ranks", "launcher_started", "rank_created", FFSCALE),
    ("rank_config", "rank: python start, config loaded (and its imports)", "rank_created", "config_loaded", FFSCALE),
    ("rank_imports", "rank: imports left (torch, DeepSpeed; MLflow where the rank tracks)", "config_loaded", "imports_done", UPSTREAM),
    ("distributed_init", "distributed init", "imports_done", "distributed_initialised", FFSCALE),
    ("run_setup", "run lock, preflight verdict, config saved, tracker", "distributed_initialised", "stage_started", FFSCALE),
    ("data", "data set-up (DALI loaders)", "stage_started", "loaders_built", FFSCALE),
    ("model", "model built", "loaders_built", "model_built", FFSCALE),
    # torch.optim's first optimizer imports torch._dynamo (torch/optim/optimizer.py, add_param_group
    # under torch._disable_dynamo): most of this part is that import. DeepSpeed's ZeRO check imports its
    # Muon module, whose torch.compile decorators would import torch._inductor as well
    # (ffscale/engine/dist.py `defer_muon_compile` says why they no longer do)
    ("engine", "DeepSpeed engine built (imports torch._dynamo)", "model_built", "engine_built", UPSTREAM),
    ("first_step", "first optimizer step", "engine_built", "first_step", FFSCALE),
]  # fmt: skip
RANK_EVENTS = ("config_loaded", "imports_done", "distributed_initialised", "stage_started", "loaders_built",
               "model_built", "engine_built", "first_step")  # fmt: skip
OWN = ("ffscale_own", "ffscale's own: the parts whose code is ffscale's", FFSCALE)


def command(args) -> list[str]:
    """The measured command's arguments after `ffscale train` (run dir and port are added per run)."""
    configs = sum((["--config", c] for c in args.config or [DEMO]), [])
    return ["--nproc", str(args.nproc), *configs, *STOP_AFTER_ONE_STEP, *args.overrides]


def run(args) -> dict:
    rounds = []
    warmup = args.warmup
    for i in range(warmup + args.rounds):  # the warm-up runs fill the page cache and are not kept
        with tempfile.TemporaryDirectory(prefix="ffscale-startup-") as tmp:
            ev = events(_launch(args, Path(tmp)))
        if i >= warmup:
            rounds.append(parts(ev))
    return summary(shlex.join(["ffscale", "train", *command(args)]), rounds, warmup)


def summary(cmd: str, rounds: list[dict[str, float]], warmup: int = 1) -> dict:
    """Median, min and max of each part over the rounds, with what it covers and whose code it is."""
    spec = [(k, what, whose) for k, what, _, _, whose in PARTS] + [OWN]
    return {
        "command": cmd,
        "rounds": len(rounds),
        "warmup": warmup,
        "parts": {
            k: {
                "what": what,
                "whose": whose,
                "median_s": statistics.median(r[k] for r in rounds),
                "min_s": min(r[k] for r in rounds),
                "max_s": max(r[k] for r in rounds),
            }
            for k, what, whose in spec
        },  # fmt: skip
        "per_round": rounds,
    }


def _launch(args, tmp: Path) -> list[dict]:
    """One run of the command in `tmp`: the trace's lines, with the exec time as the event 'exec'."""
    from ffscale.util.ports import free_port

    trace = tmp / "startup.jsonl"
    exe = Path(sys.executable).parent / "ffscale"
    cli = [str(exe)] if exe.is_file() else [sys.executable, "-m", "ffscale.cli"]
    cmd = [*cli, "train", "--master-port", str(free_port()), *command(args), f"run.dir={tmp / 'runs'}"]
    t0 = time.time()
    # on a timeout the ranks die with `ffscale train` (ffscale/util/lifeline.py)
    p = subprocess.run(
        cmd, env={**os.environ, ENV: str(trace)}, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if p.returncode:
        raise RuntimeError(
            f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        )
    lines = [json.loads(ln) for ln in trace.read_text().splitlines()] if trace.is_file() else []
    return [{"phase": "exec", "t": t0, "rank": None, "pid": None}, *lines]


def events(lines: list[dict]) -> dict[str, float]:
    """Each event's time: the front end's own; for rank events the last rank's, and for the ranks'
    creation (and their launch.py's) the first rank's. Every event must be there, from every rank."""
    ev: dict[str, float] = {}
    seen: dict[str, set] = {}
    for ln in lines:
        phase, t, first = ln["phase"], ln["t"], ln["rank"] is None or ln["phase"] == "rank_created"
        pick = min if first else max
        ev[phase] = pick(ev.get(phase, t), t)
        seen.setdefault(phase, set()).add(ln["rank"])
    needed = {e for _, _, start, end, _ in PARTS for e in (start, end)}
    ranks = seen.get("rank_created", set())
    missing = sorted(needed - ev.keys()) + sorted(
        f"{phase} of rank {r}" for phase in RANK_EVENTS for r in ranks - seen.get(phase, set())
    )
    if missing:
        raise RuntimeError(f"start-up trace lacks {', '.join(missing)}: the job did not reach them")
    return ev


def parts(ev: dict[str, float]) -> dict[str, float]:
    out = {k: ev[end] - ev[start] for k, _, start, end, _ in PARTS}
    out[OWN[0]] = sum(out[k] for k, _, _, _, whose in PARTS if whose == FFSCALE and "." not in k)
    return out


def table(res: dict) -> list[list]:
    """Header and rows: each part's median, min and max seconds and whose code it is."""
    rows: list[list] = [["part", "median s", "min s", "max s", "whose"]]
    for k, p in res["parts"].items():
        what = ("&nbsp;&nbsp;" if "." in k else "") + p["what"]
        rows.append([what, *(f"{p[f'{stat}_s']:.2f}" for stat in ("median", "min", "max")), p["whose"]])
    return rows


def print_table(res: dict) -> None:
    print(f"{res['command']}: {res['rounds']} round(s) after {res.get('warmup', 1)} warm-up run(s)")
    for row in table(res):
        what, *figs, whose = (str(c).replace("&nbsp;", " ") for c in row)
        print(f"{what:<66} " + " ".join(f"{f:>8}" for f in figs) + f"  {whose}")
