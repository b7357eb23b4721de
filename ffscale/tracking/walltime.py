"""When a stage ran, read back from its files, for a run that a replay creates: MLflow would time
it by the sync otherwise (`ffscale compare` showed 0.0 min)."""

from __future__ import annotations

from pathlib import Path

from ffscale.inference.stagedir import StageDir


def _timed(rows: list[dict]) -> list[dict]:
    return [row for row in rows if isinstance(row.get("time"), (int, float))]


def wall_span(stage_dir: Path) -> tuple[int | None, int | None]:
    """(start, end) of a stage in epoch ms. The first row comes `log_every` steps in, so the start is
    set back by those steps at the rate between the rows; the end is DONE's time, else the last
    row's. Rows written before they carried their time: from the stage's first config-history row
    to DONE. None where neither says."""
    files = StageDir(stage_dir)
    rows, done = _timed(files.rows()), files.finished_at()
    if not rows:
        history = _timed(files.history_rows())
        if not history or done is None:
            return None, None
        return int(history[0]["time"] * 1000), int(max(done, history[0]["time"]) * 1000)
    first, last = rows[0], rows[-1]
    start = first["time"]
    steps = last.get("step", 0) - first.get("step", 0)
    if steps > 0 and last["time"] > first["time"]:
        start -= first.get("step", 0) * (last["time"] - first["time"]) / steps
    end = done if done is not None else last["time"]
    return int(start * 1000), int(max(end, start) * 1000)


def pipeline_span(stage_dirs: list[Path]) -> tuple[int | None, int | None]:
    """(start, end) of a pipeline in epoch ms: its first stage's start, its last stage's end."""
    spans = [wall_span(stage_dir) for stage_dir in stage_dirs]
    starts = [start for start, _ in spans if start is not None]
    ends = [end for _, end in spans if end is not None]
    return min(starts, default=None), max(ends, default=None)
