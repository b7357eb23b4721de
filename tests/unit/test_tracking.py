"""Tracking switched off: no store, no calls."""

from __future__ import annotations

from ffscale import config as C


def test_tracking_off_makes_no_store_and_logs_nothing(tmp_path):
    from ffscale import tracking

    cfg = C.load(None, ["tracking.enabled=false", f"run.dir={tmp_path}"])
    tracking.ensure_store(cfg, tmp_path / "default")
    tracker = tracking.create(cfg, tmp_path / "default", rank=0)
    assert isinstance(tracker, tracking.NullTracker) and not any(tmp_path.iterdir())
