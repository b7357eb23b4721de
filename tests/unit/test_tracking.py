"""Tracking: switched off, no store and no calls; where a store lives and what the URI is."""

from __future__ import annotations

from pathlib import Path

import pytest

from ffscale import config as C


def test_tracking_off_makes_no_store_and_logs_nothing(tmp_path):
    from ffscale import tracking

    cfg = C.load(None, ["tracking.enabled=false", f"run.dir={tmp_path}"])
    tracking.ensure_store(cfg, tmp_path / "default")
    tracker = tracking.create(cfg, tmp_path / "default", rank=0)
    assert isinstance(tracker, tracking.NullTracker) and not any(tmp_path.iterdir())


MOUNTS = """overlay / overlay rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
fs.example.com:/export/runs /runs nfs4 rw,vers=4.2 0 0
/dev/nvme0n1p1 /runs/local ext4 rw 0 0
sshfs#me@host: /mnt/remote fuse.sshfs rw 0 0
fuse-overlayfs /rootless fuse.fuse-overlayfs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "network"),
    [("/runs/a/mlflow.db", ("nfs4", "/runs")), ("/runs/local/mlflow.db", None), ("/tmp/x", None),
     ("/mnt/remote/runs/mlflow.db", ("fuse.sshfs", "/mnt/remote")), ("/rootless/runs", None)],
)  # fmt: skip
def test_the_filesystem_of_a_store_is_read_from_the_mount_table(path, network):
    from ffscale.util.fsinfo import network_fs

    assert network_fs(Path(path), MOUNTS) == network


def test_a_masked_uri_from_a_saved_config_names_the_fix_or_takes_the_environment(tmp_path, monkeypatch):
    from ffscale.errors import ConfigError
    from ffscale.tracking.store import artifact_root, tracking_uri

    cfg = C.load(None, ["tracking.uri=http://***@mlflow:5000"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="masked when the config was saved"):
        tracking_uri(cfg, tmp_path / "run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:p@mlflow:5000")
    assert tracking_uri(cfg, tmp_path / "run") == "http://u:p@mlflow:5000"
    # a SQLite store keeps its artifacts beside it, not in the working directory (/opt/ffscale in the image)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = tracking_uri(C.load(None, []), tmp_path / "run")
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert artifact_root(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()
