"""A stage's rows (progress, eval, skipped steps): appended to metrics.jsonl by rank 0 and sent to
the tracker, with the optimizer step as the x axis. Each row carries its wall time: metrics.jsonl
is the record that `ffscale track sync` replays into MLflow (ffscale/tracking/replay.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path


class Recorder:
    def __init__(self, path: Path, tracker, rank: int):
        self.path, self.tracker, self.rank = path, tracker, rank

    def __call__(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
