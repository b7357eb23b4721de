"""A run directory's MLflow ids (`mlflow_runs.json`): the parent run, a run per stage, the run its
model was logged from, the pipeline id its runs are tagged with, and the store they are in. A rerun
continues the same runs; ids of another store than the one named in the file are not this store's
(there the runs are found by their `ffscale.pipeline_id` tag: ffscale/tracking/search.py)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from ffscale.inference.stagedir import IDS, read_json
from ffscale.util.atomic import write_atomic


class RunIds:
    def __init__(self, run_dir: Path, where: str):
        """`where`: the store, redacted, as the file names it."""
        self.file, self.where = Path(run_dir) / IDS, where
        saved = read_json(self.file) or {"stages": {}}
        saved.setdefault("stages", {})
        self.own = saved.get("uri") in (None, where)
        self.ids = saved if self.own else {"stages": {}, "pipeline_id": saved.get("pipeline_id")}
        if not self.ids.get("pipeline_id"):
            self.ids["pipeline_id"] = saved.get("pipeline_id") or uuid.uuid4().hex

    def save(self) -> None:
        """Written for the store it names; for another store only where the file does not exist
        (then this store's ids are the directory's from now on)."""
        if self.own:
            write_atomic(self.file, json.dumps({**self.ids, "uri": self.where}, indent=1))
        elif not self.file.is_file():
            self.own = True
            self.save()
