"""The Checkpointer: the one owner of a stage's checkpoints while it runs. It chooses the checkpoint
to resume once, at start, and holds it; it decides when to save; it saves and restores the states
registered with it. The loop asks it, never the files (ffscale/engine/checkpoint.py does the file
work: writing, checking, choosing, converting).

Modelled on torchtitan's CheckpointManager (github.com/pytorch/torchtitan, commit
970fbddb3284a3e7d5ed39f0a95ffa0c5019ea94, torchtitan/components/checkpoint.py, the last commit that
holds it there; later ones move it to torchtitan/components/checkpointer/dcp.py): the states to save
are registered objects with `state_dict()` / `load_state_dict()` (its `states`, beside the model and
optimizer); the trainer offers every step and the manager decides (its `save(curr_step, last_step)`
and `_should_save`, here `maybe_save(step, reason)`); the step to resume is found once (its
`_find_load_step`, here `checkpoint.select`, which also checks the files). The cadence is
ffscale/util/cadence.py's `itstime` (after big_vision's).

What is saved, in the format DeepSpeed's checkpoint holds it:
- the model and optimizer: DeepSpeed's own files (`attach`);
- the shared states (`register`): their state_dicts merged into DeepSpeed's client state, each
  restored from the whole of it (the loop's progress: epoch, micro-steps done in it and the
  accumulation they were counted in, which is also the loader's position: a loader is a function of
  (epoch, skip));
- each rank's own states (`register_rank`): ffscale_rank<r>.pt beside DeepSpeed's files (the EMA
  shard).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ffscale.config import CheckpointCfg
from ffscale.engine import checkpoint
from ffscale.engine.dist import on_rank0
from ffscale.util.cadence import itstime

REASONS = ("step", "epoch", "stop")


class Checkpointer:
    def __init__(
        self,
        ckpt_dir,
        cfg: CheckpointCfg,
        epochs: int,
        rank: int,
        world: int,
        fence: Callable[[], None] = lambda: None,
        prepare: Callable[[], None] = lambda: None,
    ):
        """Every rank, before the DeepSpeed engine is built: the checkpoint to resume is chosen here
        (checked, damaged ones set aside) and held. `epochs`: the schedule's length (its last epoch
        always saves). `fence()`: rank 0, before every write and before the record that completes
        it (ffscale/run/runlock.py). `prepare()`: every rank, before a write (the engine lets
        collectives wait the long timeout)."""
        self.ckpt_dir, self.cfg, self.epochs = Path(ckpt_dir), cfg, epochs
        self.rank, self.world = rank, world
        self.fence, self.prepare = fence, prepare
        # the newest complete checkpoint: the one resumed, then each one saved
        self.tag = checkpoint.select(self.ckpt_dir, rank, world)
        self.record = checkpoint.meta_of(self.ckpt_dir, self.tag) if self.tag else {}
        self.resumed = self.tag is not None
        self.saved_step: int | None = None  # the step the held checkpoint holds (once loaded or saved)
        self.ds = None
        self.states: dict = {}
        self.rank_states: dict = {}

    @property
    def needs_reshard(self) -> bool:
        """The checkpoint to resume holds ZeRO shards of another rank count than this run's."""
        return self.resumed and checkpoint.needs_reshard(self.record, self.world)

    @property
    def last(self) -> Path | None:
        """The newest complete checkpoint: the one resumed, or the last one saved since."""
        return self.ckpt_dir / self.tag if self.tag else None

    def attach(self, ds) -> None:
        """The DeepSpeed engine: its model and optimizer are saved and loaded by DeepSpeed."""
        self.ds = ds

    def register(self, name: str, state) -> None:
        """A state every rank holds alike, saved in DeepSpeed's client state."""
        self.states[name] = state

    def register_rank(self, name: str, state) -> None:
        """A state of this rank only (its EMA shard), saved in its own file."""
        self.rank_states[name] = state

    def load(self, reshard: bool) -> list[str] | None:
        """Restore the held checkpoint into the engine and the registered states. None on a fresh
        start; else the rank states it could not restore (all of them when resharded: they were
        saved in another rank count's partitions), which their owners restart."""
        if not self.resumed:
            return None
        client = checkpoint.load(self.ds, self.ckpt_dir, self.tag, self.record, reshard)
        for state in self.states.values():
            state.load_state_dict(client)
        self.saved_step = self.ds.global_steps
        if self.needs_reshard:
            return list(self.rank_states)
        if self.rank_states:
            own = checkpoint.load_rank_state(self.ckpt_dir, self.tag, self.rank)
            for name, state in self.rank_states.items():
                state.load_state_dict(own[name])
        return []

    def maybe_save(self, step: int, reason: str, epoch: int | None = None) -> bool:
        """Save after `step` optimizer steps if it is time and this step is not saved yet; True when
        it saved. `reason`: "step" after an optimizer step (checkpoint.every_steps), "epoch" at the
        end of `epoch` (checkpoint.every_epochs, and the last epoch), "stop" where the stage stops
        (schedule.stop_at_step/stop_at_epoch, SIGTERM): always."""
        if reason not in REASONS:
            raise ValueError(f"maybe_save: reason {reason!r}, not one of {REASONS}")
        if step == self.saved_step:
            return False
        due = {
            "step": lambda: itstime(step, self.cfg.every_steps),
            "epoch": lambda: itstime(epoch, self.cfg.every_epochs, last=self.epochs),
            "stop": lambda: True,
        }[reason]()
        if due:
            self._save(step)
        return due

    def _save(self, step: int) -> None:
        """Checkpoint `step<N>` of the registered states; `latest` moves once every rank wrote."""
        self.prepare()
        on_rank0(self.rank, self.fence)  # the run is still this job's, else every rank stops here
        client = {}
        for state in self.states.values():
            client |= state.state_dict()
        own = {name: state.state_dict() for name, state in self.rank_states.items()}
        tag = f"step{step}"
        checkpoint.save(
            self.ds, self.ckpt_dir, tag, client, self.cfg.keep, own, self.fence, previous=self.tag
        )
        self.tag, self.saved_step = tag, step
