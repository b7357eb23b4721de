"""ffscale/train.py with NaN losses injected, for the fault suite: on rank 0 the inputs (and so the
loss and every gradient) become NaN at the optimizer steps listed in FFSCALE_FAULT_NAN_STEPS
(e.g. 5,9). Launched by the real `deepspeed` launcher in place of ffscale/train.py.

It also counts the all-reduces ffscale's own code issues inside training steps (DeepSpeed's gradient
collectives aside) and prints them per optimizer step at exit: the non-finite check and the
preemption flag must share one collective."""

import atexit
import os
import sys
import traceback
from pathlib import Path

import torch.distributed

import ffscale
from ffscale import train
from ffscale.engine.engine import Engine
from ffscale.util.hostenv import reexec_with_rank_env

FFSCALE = Path(ffscale.__file__).resolve().parent  # the package's own files (not a .venv under the clone)
NAN_STEPS = {int(v) for v in os.environ.get("FFSCALE_FAULT_NAN_STEPS", "").split(",") if v.strip()}
_train_step = Engine.train_step
_all_reduce = torch.distributed.all_reduce
counts = {"in_step": False, "ours": 0, "steps": 0}


def train_step(self, x, target):
    if self.dist.rank == 0 and self.global_step + 1 in NAN_STEPS:
        x = x * float("nan")
    before = self.global_step
    counts["in_step"] = True
    try:
        return _train_step(self, x, target)
    finally:
        counts["in_step"] = False
        counts["steps"] += self.global_step - before


def all_reduce(*args, **kwargs):
    if counts["in_step"]:
        callers = [f.filename for f in traceback.extract_stack()[:-1]]
        if Path(callers[-1]).resolve().is_relative_to(FFSCALE):  # not DeepSpeed's, wherever the venv is
            counts["ours"] += 1
    return _all_reduce(*args, **kwargs)


def report():
    if os.environ.get("RANK", "0") == "0" and counts["steps"]:
        print(f"ffscale all-reduces per optimizer step: {counts['ours'] / counts['steps']:.2f}", flush=True)


if __name__ == "__main__":
    reexec_with_rank_env()
    Engine.train_step = train_step
    torch.distributed.all_reduce = all_reduce
    atexit.register(report)
    sys.exit(train.main())
