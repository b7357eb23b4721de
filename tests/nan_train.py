"""ffscale/train.py with NaN losses injected, for the fault suite: on rank 0 the inputs (and so the
loss and every gradient) become NaN at the optimizer steps listed in FFSCALE_FAULT_NAN_STEPS
(e.g. 5,9). Launched by the real `deepspeed` launcher in place of ffscale/train.py."""

import os
import sys

from ffscale import train
from ffscale.engine.engine import Engine
from ffscale.hostenv import reexec_with_rank_env

NAN_STEPS = {int(v) for v in os.environ.get("FFSCALE_FAULT_NAN_STEPS", "").split(",") if v.strip()}
_train_step = Engine.train_step


def train_step(self, x, target):
    if self.dist.rank == 0 and self.global_step + 1 in NAN_STEPS:
        x = x * float("nan")
    return _train_step(self, x, target)


if __name__ == "__main__":
    reexec_with_rank_env()
    Engine.train_step = train_step
    sys.exit(train.main())
