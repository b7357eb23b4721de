"""The MLflow tracker: a parent run per pipeline, a child run per stage.

Run ids live in `<run dir>/mlflow_runs.json`, so a rerun continues the same runs. Metrics are
buffered and written with `log_batch`. A server that fails costs one warning, not the training
(ffscale/tracking/breaker.py): the run directory holds every row, and at a stage's end the stage
is caught up from it (ffscale/tracking/replay.py, the code of `ffscale track sync`): its run created
if it could not be, every metric step the server lacks, the summary, artifacts and final status.
At a stage's or the job's end a server that does not answer is retried for `tracking.end_retry_s`;
then the job finishes without it and prints the `ffscale track sync` command that replays it.
"""

from __future__ import annotations

import time
from pathlib import Path

from ffscale.tracking.breaker import Breaker, Down
from ffscale.tracking.facts import StageFacts
from ffscale.tracking.metrics import last_steps
from ffscale.tracking.replay import Replay
from ffscale.tracking.store import tracking_uri
from ffscale.util.secrets import has_secret, redact

BUFFER = 100_000  # metric values kept while the server is down; older ones are replayed from metrics.jsonl
ENDED = ("FINISHED", "FAILED")  # what is waited for; a preempted or stopped job's rerun continues its runs


class MlflowTracker:
    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.uri = tracking_uri(cfg, run_dir)
        self.where = redact(self.uri)
        self.replay = Replay(run_dir, self.uri, cfg)
        self.breaker = Breaker(self.uri)
        self.parent: str | None = None
        self.child: str | None = None
        self.stage = None
        self.facts: StageFacts | None = None
        self.buffer: list = []
        self.held: dict[str, int] = {}  # the stage run's last step per metric when it (re)started
        self.monitor = None
        self.gave_up = False
        self.pending: list = []  # (stage, facts, status) of stage ends MLflow missed: caught up at the next

    # -- the tracker interface ---------------------------------------------------------------
    def pipeline_started(self, cfg) -> None:
        self.parent = self.breaker.attempt(self._open, self.replay.pipeline_run)

    def _open(self, make) -> str:
        """A run made or found, and (resumed) running again."""
        rid = make()
        self.replay.client.update_run(rid, status="RUNNING")
        return rid

    def stage_started(self, stage, train_manifest, val_manifest, n_params, lineage: str) -> None:
        """`lineage`: where the stage's weights came from (pipeline.init_weights_for)."""
        self.stage, self.child, self.held = stage, None, {}
        self.facts = StageFacts(train_manifest.tag, n_params, lineage, train_manifest, val_manifest)
        self._open_stage()

    def _open_stage(self) -> None:
        opened = self.breaker.attempt(self._open_with_steps)
        if opened:
            self.child, self.held = opened
            self._start_system_metrics()

    def _open_with_steps(self) -> tuple[str, dict[str, int]]:
        """The stage's run, and the last step it holds per metric: a resumed stage retrains the steps
        past its checkpoint, and the run keeps their first values (ffscale/tracking/metrics.py)."""
        rid = self._open(lambda: self.replay.stage_run(self.stage, self.facts))
        return rid, last_steps(self.replay.client, rid)

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                self.child, sampling_interval=10, tracking_uri=self.uri, resume_logging=True
            )
            self.monitor.start()
        except Exception:
            self.monitor = None

    def config_changed(self, stage, step: int, diff: dict, what: str, history: Path) -> None:
        """The change is in the stage's config history already; its tags follow from it."""
        if self.child:
            self.breaker.attempt(self.replay.changes, stage, self.child)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        if self.stage is None:
            return
        now = int(time.time() * 1000)
        self.buffer += [
            Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))
        ]
        if len(self.buffer) >= self.cfg.tracking.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.stage is not None and self.child is None:
            self._open_stage()  # the server answers again: the stage's run exists from now on
        if self.child:  # no second value at a step the run holds
            self.buffer = [m for m in self.buffer if m.step > self.held.get(m.key, -1)]
        while self.child and self.buffer:
            try:
                self.breaker.call(self.replay.client.log_batch, self.child, metrics=self.buffer[:1000])
            except Down:
                break
            self.buffer = self.buffer[1000:]
        self.buffer = self.buffer[-BUFFER:]  # the rest is in metrics.jsonl: the stage's end sends it

    def stage_ended(self, stage, status: str, summary: dict | None = None) -> None:
        stage = stage or self.stage
        self.flush()
        if self.monitor is not None:
            self.breaker.attempt(self.monitor.finish)
            self.monitor = None
        if stage is None:
            return
        self.pending.append((stage, self.facts or StageFacts.from_files(stage), status))
        self._final(status, f"stage {stage.name}", self._catch_up)
        self.stage = self.child = None
        self.buffer = []

    def _catch_up(self) -> None:
        """Every stage end MLflow has missed, oldest first (a stage whose end fell in an outage is
        caught up at the next stage's end once the server answers)."""
        while self.pending:
            self.replay.stage(*self.pending[0])
            self.pending.pop(0)

    def model_ready(self, final, stages) -> None:
        """The final stage's model logged (and registered with tracking.register_as), once."""
        self._final("FINISHED", "the model", lambda: self._catch_up() or self.replay.model(final, stages))

    def pipeline_ended(self, status: str) -> None:
        if self.stage is not None:  # a stage stopped by an error or a signal
            self.stage_ended(self.stage, status)
        if status != "RUNNING":
            self._final(status, "the pipeline", lambda: self._end_pipeline(status))

    def _end_pipeline(self, status: str) -> None:
        self._catch_up()
        self.replay.end(self.replay.pipeline_run(), status)

    # -- a stage's or the job's end --------------------------------------------------------------
    def _final(self, status: str, what: str, fn):
        """fn() until it succeeds: retried for tracking.end_retry_s when the job ends FINISHED or
        FAILED, tried once when it stops to be rerun (KILLED, RUNNING). After one give-up, nothing
        more is tried until the server has answered again."""
        if self.gave_up and time.monotonic() < self.breaker.down_until:
            return None
        wait = self.cfg.tracking.end_retry_s if status in ENDED and not self.gave_up else 0.0
        deadline, said = time.monotonic() + wait, False
        while True:
            try:
                out = fn()
            except Exception as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._give_up(what, e)
                    return None
                if not said:
                    print(f"ffscale: MLflow at {self.where} did not answer at the end of {what} "
                          f"({type(e).__name__}); retrying for up to {wait:.0f} s (tracking.end_retry_s)", flush=True)  # fmt: skip
                    said = True
                time.sleep(min(5.0, left))
                continue
            self.breaker.close()
            self.gave_up = False
            if said:
                print(f"ffscale: MLflow at {self.where} answered again: {what} caught up", flush=True)
            return out

    def _give_up(self, what: str, error: Exception) -> None:
        self.breaker.down_until = time.monotonic() + self.breaker.open_s
        if self.gave_up:
            return
        self.gave_up = True
        # a URI with a credential is not printed: say where it comes from instead
        uri = (
            " (with MLFLOW_TRACKING_URI set to that server's URI)"
            if has_secret(self.uri)
            else f" --uri {self.uri}"
        )
        print(f"ffscale: MLflow at {self.where} unreachable at the end of {what} ({type(error).__name__}: "
              f"{redact(str(error)).splitlines()[0][:160] if str(error) else ''}); the job goes on without it. {self.run_dir} "
              f"holds every metric and artifact; once the server answers, replay them with: "
              f"ffscale track sync {self.run_dir}{uri}", flush=True)  # fmt: skip
