"""ffscale/train.py whose checkpoint on SIGTERM takes 35 s on every rank (a large checkpoint on a slow
network filesystem): longer than the 30 s DeepSpeed's launcher allows once it is signalled. Run by
`ffscale train --entry` in the preemption test."""

import sys
import time

from ffscale import train
from ffscale.engine.engine import Engine
from ffscale.util.hostenv import reexec_with_rank_env

SLOW_S = 35
_stop_if_requested = Engine.stop_if_requested


def stop_if_requested(self, agree=False):
    if agree:
        self.agree_stop()
    # a checkpoint is written now
    if self.stop_requested and self.checkpointer.saved_step != self.global_step:
        if self.dist.rank == 0:
            print(f"slow checkpoint: {SLOW_S} s", flush=True)
        time.sleep(SLOW_S)
    return _stop_if_requested(self)


if __name__ == "__main__":
    reexec_with_rank_env()
    Engine.stop_if_requested = stop_if_requested
    sys.exit(train.main())
