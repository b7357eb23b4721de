"""ffscale/train.py with one signal delivered at a chosen phase, for the chaos and preemption tests,
and optionally a record of the samples every training step consumed. Launched by the real
`deepspeed` launcher in place of ffscale/train.py.

FFSCALE_FAULT=SIG:PHASE:RANK[:N]: rank RANK sends itself SIGTERM or SIGKILL
- startup: before its loaders and engine are built;
- step: at its N-th training micro-step of this launch (default 1);
- eval: as an evaluation starts (SIGTERM is then seen inside it, at its first check);
- save: once DeepSpeed has written its first file of a checkpoint (SIGKILL: mid-write);
- convert: as rank 0 starts converting shards to a universal checkpoint.
FFSCALE_LOG_IDS=DIR: each rank appends {"world", "rank", "epoch", "micro", "ids"} for every training
batch it consumed (the sample plan's ids of that batch) to DIR/ids.jsonl.
"""

import json
import os
import signal
import sys
from pathlib import Path

from ffscale import train
from ffscale.data import wds
from ffscale.engine import checkpoint, ckpt_engine
from ffscale.engine.engine import Engine
from ffscale.run import loop
from ffscale.util.hostenv import reexec_with_rank_env

FAULT = os.environ.get("FFSCALE_FAULT", "")
LOG_IDS = os.environ.get("FFSCALE_LOG_IDS")


def fault() -> tuple[int, str, int, int] | None:
    if not FAULT:
        return None
    sig, phase, rank, *n = FAULT.split(":")
    return getattr(signal, f"SIG{sig}"), phase, int(rank), int(n[0]) if n else 1


def arm() -> None:
    f = fault()
    if f is None or int(os.environ.get("RANK", "0")) != f[2]:
        return
    sig, phase, _, n = f
    fire = lambda: os.kill(os.getpid(), sig)  # noqa: E731
    calls = {"n": 0}

    def before(owner, name):
        original = getattr(owner, name)

        def wrapped(*a, **kw):
            calls["n"] += 1
            if phase != "step" or calls["n"] == n:
                fire()
            return original(*a, **kw)

        setattr(owner, name, wrapped)

    if phase == "startup":
        before(loop.StageRun, "_loaders")
    elif phase == "step":
        before(Engine, "train_step")
    elif phase == "eval":
        before(Engine, "validate")
    elif phase == "convert":
        before(checkpoint, "_to_universal")
    elif phase == "save":
        original = ckpt_engine.SafeCheckpointEngine.save

        def save(self, state_dict, path):
            out = original(self, state_dict, path)
            fire()  # after its first file: the rest of the checkpoint is still to be written
            return out

        ckpt_engine.SafeCheckpointEngine.save = save
    else:
        raise SystemExit(f"chaos_train: unknown phase {phase!r}")


def log_ids() -> None:
    if not LOG_IDS:
        return
    out = Path(LOG_IDS) / "ids.jsonl"
    epoch_of = wds.WdsLoader.epoch

    def epoch(self, e, skip=0):
        ids = self.plan.epoch_ids(e, self.train, self.batch)
        for k, batch in enumerate(epoch_of(self, e, skip)):
            if self.train:
                i = skip + k
                row = {"world": self.plan.world, "rank": self.plan.rank, "epoch": e, "micro": i,
                       "ids": ids[i * self.batch : (i + 1) * self.batch].tolist()}  # fmt: skip
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            yield batch

    wds.WdsLoader.epoch = epoch


if __name__ == "__main__":
    reexec_with_rank_env()
    arm()
    log_ids()
    sys.exit(train.main())
