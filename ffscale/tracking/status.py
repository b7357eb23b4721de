"""A run's final status. The run directory says what a stage is (FINISHED when it has its DONE); a
replay does not overrule what the job itself set (a FAILED), and a stopped stage (RUNNING: the rerun
continues it) changes nothing."""

from __future__ import annotations

from ffscale.inference.stagedir import StageDir


def end_run(client, run_id: str, status: str, only_running: bool = False, end_ms: int | None = None) -> None:
    """Mark a run ended with `status`. `only_running`: end it only while still RUNNING. `end_ms`: its
    end time (None: now)."""
    now = client.get_run(run_id).info.status
    if status != "RUNNING" and now != status and (now == "RUNNING" or not only_running):
        client.set_terminated(run_id, status, end_time=end_ms)


def stage_status(files: StageDir, status: str, only_running: bool) -> tuple[str, bool]:
    """(status, only_running) of a stage's run: FINISHED, whatever was asked, when it has its DONE."""
    return ("FINISHED", False) if files.finished() else (status, only_running)
