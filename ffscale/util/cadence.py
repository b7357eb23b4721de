"""When a periodic action is due: the one cadence rule of the loop (checkpoints, evaluations,
progress lines).

After big_vision's `itstime` (github.com/google-research/big_vision, commit
0127fb6b337ee2a27bf4e54dea79cff176527356, big_vision/utils.py): due every `every` counts and at the
last one. Unlike it there is no first-step rule and no skipping close to the last (a checkpoint
here is also the preemption point, so none is dropped), and `every` 0 means never.
"""

from __future__ import annotations


def itstime(count: int, every: int, last: int | None = None) -> bool:
    """Is the action due after `count` (steps or epochs) done? Every `every` of them (0: never by
    the period), and at `last` when given."""
    return bool(every and count % every == 0) or count == last
