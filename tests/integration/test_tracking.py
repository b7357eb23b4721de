"""Tracking: switched off, no store and no calls; where a store lives and what the URI is."""

from __future__ import annotations

import os
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
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(k, "-")  # restored (unset) after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:p%40ss@mlflow:5000")
    # MLflow prints the URLs it calls in its errors: the credentials go to the variables it sends
    assert tracking_uri(cfg, tmp_path / "run") == "http://mlflow:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("u", "p@ss")
    # a SQLite store keeps its artifacts beside it, not in the working directory (/opt/ffscale in the image)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = tracking_uri(C.load(None, []), tmp_path / "run")
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert artifact_root(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()


@pytest.mark.parametrize(
    "overrides", [[], ["tracking.enabled=false"], ["tracking.uri=http://mlflow.ml.svc:5000"]]
)
def test_rendered_pods_need_a_tracking_server_unless_the_config_names_one_or_tracks_nothing(overrides):
    """Without a URI the pods would put a SQLite store on the shared (NFS) runs volume."""
    from ffscale.tools import cluster

    cfg = C.load(None, overrides)
    job = cluster.render(cfg, C.to_yaml(cfg), cluster.ClusterOpts(nodes=1, gpus_per_node=1))["job.yaml"]
    (train,) = job["spec"]["template"]["spec"]["containers"]
    refs = {next(iter(r)): r[next(iter(r))] for r in train["envFrom"]}
    assert refs["configMapRef"] == {"name": "mlflow", "optional": bool(overrides)}
    assert refs["secretRef"]["optional"] is True


def test_a_stage_whose_rows_carry_no_time_is_timed_from_its_config_history_to_done(tmp_path):
    """Stages trained before metrics rows carried their time: `ffscale track sync` creates their runs
    with the stage's wall time (compare showed 0.0 min), not the sync's."""
    import json

    from ffscale.tracking.walltime import wall_span

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 100, "loss": 2.3}) + "\n")
    assert wall_span(tmp_path) == (None, None)  # nothing says when it ran
    (tmp_path / "config-history.jsonl").write_text(
        json.dumps({"step": 0, "time": 1_000.5, "config": {}}) + "\n"
    )
    (tmp_path / "DONE").write_text("{}")
    os.utime(tmp_path / "DONE", (1_900.25, 1_900.25))
    assert wall_span(tmp_path) == (1_000_500, 1_900_250)


@pytest.mark.parametrize(
    "source, fallback, name",
    [
        ("fashion-mnist:train", "train", "fashion-mnist"),
        ("imagenet:/data/ILSVRC2012_img_train.tar", "train", "imagenet"),
        ("folder:/data/pets/train", "train", "pets"),
        ("flat:/data/birds/images:labels.csv", "train", "birds"),
        ("indexed:/data/laion/shards/*/part-*.tar", "train", "laion"),  # globs name nothing
        ("", "data/cifar/val", "cifar"),  # a manifest without a source: its folder
        ("", "/train", "train"),  # nothing but a split: the split, not the path
        ("", "train", "train"),
    ],
)
def test_runs_are_tagged_with_the_datasets_name_not_its_splits(source, fallback, name):
    """`ffscale compare`'s dataset column and the runs' `ffscale.dataset` tag (Manifest.dataset)."""
    from ffscale.data.manifest import dataset_name

    assert dataset_name(source, fallback) == name


def test_a_stage_is_tagged_from_its_card_or_shards_or_history_whichever_survives(tmp_path):
    """`ffscale track sync` of a stage whose shards are gone: the card's dataset; a card written before cards
    named it, the shard folder's name; no card, the config history's digest. Never "train" or a path."""
    import json

    from ffscale.inference.card import CARD
    from ffscale.tracking.facts import StageFacts

    gone = tmp_path / "data" / "pets" / "train"
    overrides = [f"run.dir={tmp_path / 'runs'}", f"data.train={gone}", f"data.val={gone.parent / 'val'}"]
    (stage,) = C.stages(C.load(None, overrides))
    stage.dir.mkdir(parents=True)
    train = {"path": str(gone), "name": "train", "digest": "d1"}
    (stage.dir / CARD).write_text(json.dumps({"data": {"train": train | {"dataset": "oxford-pets"}}}))
    assert StageFacts.from_files(stage).dataset == "oxford-pets:d1"
    (stage.dir / CARD).write_text(json.dumps({"data": {"train": train}}))  # an older card
    assert StageFacts.from_files(stage).dataset == "pets:d1"
    (stage.dir / CARD).unlink()
    (stage.dir / "config-history.jsonl").write_text(json.dumps({"digests": {"data.train": "d0"}}) + "\n")
    assert StageFacts.from_files(stage).dataset == "pets:d0"


def test_a_stage_resumed_from_an_older_checkpoint_records_one_value_per_step_and_name(tmp_path):
    """A stage logged to step 10 (checkpoints at 4 and 8, an evaluation each 6 steps) and was killed
    mid-append; it resumes from step 4 (its newest checkpoint damaged) and trains to 12. metrics.jsonl
    and the MLflow run (SQLite) hold one value per (step, name): the retrained steps once, each
    evaluation once, its epoch once."""
    import json
    from collections import Counter

    from ffscale import tracking
    from ffscale.data.manifest import Manifest
    from ffscale.run.record import POSITION, Recorder
    from ffscale.tracking.store import client

    cfg = C.load(None, [f"run.dir={tmp_path}", "run.name=older", "tracking.flush_every=1"])
    (stage,) = C.stages(cfg)
    stage.dir.mkdir(parents=True)
    run_dir, metrics = tmp_path / "older", stage.dir / "metrics.jsonl"
    tracking.ensure_store(cfg, run_dir)
    shards = Manifest("fm", ["a", "b"])

    def job(resumed_step: int, last_step: int):
        tracker = tracking.create(cfg, run_dir, rank=0)
        tracker.pipeline_started(cfg)
        tracker.stage_started(stage, shards, shards, 1000, "scratch")
        record = Recorder(metrics, tracker, 0, resumed_step)
        for step in range(resumed_step + 1, last_step + 1):
            record({"step": step, "epoch": step / 6, "loss": 1 / step, "lr": 0.1})
            if step % 6 == 0:  # the epoch's evaluation; the progress row above carried its epoch
                record({"step": step, "val_top1": 50.0 + step, "epoch": step // 6})
        return tracker

    killed = job(0, 10)
    if killed.monitor is not None:
        killed.monitor.finish()
    with open(metrics, "a") as f:
        f.write('{"step": 11, "lo')  # the kill cut the next row short
    job(4, 12).stage_ended(stage, "RUNNING")

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    keys = Counter((row["step"], name) for row in rows for name in row if name not in POSITION)
    assert set(keys.values()) == {1}, [k for k, n in keys.items() if n > 1]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 13))
    assert [(row["step"], row["epoch"]) for row in rows if "val_top1" in row] == [(6, 1), (12, 2)]
    mlflow = client(tracking.store.tracking_uri(cfg, run_dir))
    rid = json.loads((run_dir / "mlflow_runs.json").read_text())["stages"][stage.name]
    steps = {
        name: [m.step for m in mlflow.get_metric_history(rid, name)]
        for name in ("loss", "lr", "epoch", "val_top1")
    }
    assert {name: sorted(s) for name, s in steps.items()} == {
        "loss": list(range(1, 13)),
        "lr": list(range(1, 13)),
        "epoch": list(range(1, 13)),
        "val_top1": [6, 12],
    }
