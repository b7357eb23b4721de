"""Shards under URLs against real servers on 127.0.0.1 (tests/helpers/storage.py): nginx with range
requests, moto's S3 API server and a GCS JSON API server, started once for the module. Staging (data.stage_dir) and ranged
reads without it; a 403, a missing or truncated object, a sha256 mismatch and a server that stops."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers.storage import FakeGcs, MotoS3, Nginx

from ffscale.config import DataCfg
from ffscale.data import remote, stage
from ffscale.data.ingest import sources
from ffscale.data.ingest.writer import write_shards
from ffscale.data.loader import open_index
from ffscale.data.manifest import load_manifest
from ffscale.errors import DataError, StorageError

BUCKET = "ffscale-test"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One small real shard set (256 Fashion-MNIST images, 4 shards) served as it is and spoilt
    three ways, by nginx and by moto; {name: local folder}, the servers."""
    srv = tmp_path_factory.mktemp("srv")
    good = srv / "fm" / "val"
    write_shards(sources.fashion_mnist("val"), good, "val", shard_size=64, limit=256)
    for name in ("forbidden", "trunc", "bad", "missing"):
        shutil.copytree(good, srv / name / "val")
    tar = "val-000001.tar"
    data = (good / tar).read_bytes()
    (srv / "trunc" / "val" / tar).write_bytes(data[: len(data) // 2])  # an upload cut short
    spoilt = bytearray(data)
    spoilt[len(data) // 2] ^= 0xFF  # the same size, other bytes: only the sha256 tells
    (srv / "bad" / "val" / tar).write_bytes(bytes(spoilt))
    (srv / "missing" / "val" / tar).unlink()
    saved = dict(os.environ)
    ng, s3, gcs = Nginx(srv).start(), MotoS3().start(), FakeGcs().start()
    os.environ.update({**s3.env, **gcs.env})
    try:
        for name in ("fm", "trunc", "bad", "missing"):
            s3.upload(BUCKET, f"{name}/val", srv / name / "val")
            gcs.upload(BUCKET, f"{name}/val", srv / name / "val")
        yield {"srv": srv, "local": good, "nginx": ng, "s3": s3, "gcs": gcs}
    finally:
        ng.stop()
        s3.stop()
        gcs.stop()
        os.environ.clear()
        os.environ.update(saved)
        remote._FS.clear()  # clients of the servers just stopped


def roots(served, name: str = "fm") -> list[str]:
    return [f"{served['nginx'].url}/{name}/val", f"s3://{BUCKET}/{name}/val", f"gs://{BUCKET}/{name}/val"]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def test_staging_from_s3_and_https_copies_the_checked_set_once(served, tmp_path):
    local_m, local_files = load_manifest(served["local"])
    for root in roots(served):
        said = []
        dest = stage.ensure(tmp_path, root, said.append)
        m, files = load_manifest(dest)  # the loaders' own check of the copy
        assert m.digest == local_m.digest and m.index_sha256 == local_m.index_sha256
        assert [f.read_bytes() for f in files] == [f.read_bytes() for f in local_files]
        assert any("staged" in s and "copied" in s for s in said)
        again = []
        assert stage.ensure(tmp_path, root, again.append) == dest and again == []  # nothing copied twice
        index, _ = open_index(root, DataCfg(stage_dir=str(tmp_path)))
        assert Path(index.files[0]).parent == dest  # the existing loaders read the local copy
        assert stage.staged(tmp_path, root) == dest


def test_a_split_on_a_shared_filesystem_is_staged_the_same_way(served, tmp_path):
    """A local path (NFS, Lustre: one open per sample there costs the metadata server) stages too."""
    dest = stage.ensure(tmp_path, str(served["local"]), lambda m: None)
    m, files = load_manifest(dest)
    assert dest != served["local"] and m.digest == load_manifest(served["local"])[0].digest
    assert [f.read_bytes() for f in files] == [(served["local"] / f.name).read_bytes() for f in files]


def test_an_interrupted_staging_resumes_and_never_trusts_a_partial_copy(served, tmp_path):
    root = roots(served)[1]
    m, _ = load_manifest(served["local"])
    dest = stage.local_root(tmp_path, root)
    dest.mkdir(parents=True)
    first, second = (served["local"] / s.file for s in m.shards[:2])
    # what a killed copy leaves: a part holding the first half, and one whose bytes went wrong
    (dest / (first.name + ".part")).write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    (dest / (second.name + ".part")).write_bytes(b"\0" * (second.stat().st_size // 2))
    said = []
    stage.ensure(tmp_path, root, said.append)
    assert (dest / first.name).read_bytes() == first.read_bytes()  # resumed at its last byte
    assert (dest / second.name).read_bytes() == second.read_bytes()  # redone from its first byte
    assert not list(dest.glob("*.part"))
    # a resumed part fetches only what it lacks
    part = tmp_path / "one.part"
    part.write_bytes(first.read_bytes()[:1000])
    got = stage.copy_checked(
        remote.join(root, first.name), tmp_path / "one", m.shards[0].size, m.shards[0].sha256
    )
    assert got == m.shards[0].size - 1000 and (tmp_path / "one").read_bytes() == first.read_bytes()


def test_a_sha256_mismatch_names_the_shard_and_url_and_stages_nothing_wrong(served, tmp_path):
    for root in roots(served, "bad"):
        with pytest.raises(DataError) as e:
            stage.ensure(tmp_path, root, lambda m: None)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
        assert "val-000001.tar" in str(e.value) and "sha256" in str(e.value) and root in str(e.value)
        dest = stage.local_root(tmp_path, root)
        assert not (dest / "val-000001.tar").exists() and not (dest / stage.STAGED).exists()


def test_a_403_a_missing_and_a_truncated_object_are_one_line_data_errors(served, tmp_path):
    port = served["nginx"].port
    secret_url = f"http://reader:hunter2secret@127.0.0.1:{port}/forbidden/val"
    with pytest.raises(DataError) as e:
        load_manifest(secret_url)
    assert "(403)" in str(e.value) and "hunter2secret" not in str(e.value) and "127.0.0.1" in str(e.value)
    assert e.value.exit_code == 2
    for scheme in ("s3", "gs"):  # both list sizes: found before any rank starts
        with pytest.raises(
            DataError, match=rf"missing in storage: {scheme}://ffscale-test/missing/val/val-000001.tar"
        ):
            load_manifest(f"{scheme}://{BUCKET}/missing/val")
    http_missing = f"{served['nginx'].url}/missing/val"
    with pytest.raises(DataError, match="missing in storage"):
        load_manifest(http_missing)  # nginx's index page lists it
    for root in roots(served, "trunc"):
        with pytest.raises(DataError) as e:
            stage.ensure(tmp_path, root, lambda m: None)
        assert "val-000001.tar" in str(e.value) and ("truncated" in str(e.value))
        assert e.value.exit_code == 2 and not isinstance(e.value, StorageError)
    http_trunc, *listed = roots(served, "trunc")
    index, m = open_index(http_trunc, DataCfg())
    late = m.shards[0].count + m.shards[1].count - 1  # the last sample of the cut shard
    with pytest.raises(DataError, match="truncated"):
        index.read(late)
    for root in listed:  # S3 and GCS list sizes: the cut shard is found when the index opens
        with pytest.raises(DataError, match=r"val-000001.tar: \d+ bytes.* says \d+ .truncated"):
            open_index(root, DataCfg())


def test_a_server_that_stops_is_a_storage_error_and_staging_resumes_after_it(served, tmp_path):
    ng = Nginx(served["srv"]).start()
    root = f"{ng.url}/fm/val"
    try:
        index, m = open_index(root, DataCfg())
        index.read(0)
        ng.stop()  # mid-epoch
        with pytest.raises(StorageError) as e:
            index.read(m.num_samples - 1)
        assert e.value.exit_code == 1 and "\n" not in str(e.value)
        assert f"{root}/val-000003.tar" in str(e.value) and "rerun" in str(e.value)
        dest = stage.local_root(tmp_path, root)
        dest.mkdir(parents=True)
        first = served["local"] / m.shards[0].file
        (dest / (first.name + ".part")).write_bytes(first.read_bytes()[:5000])
        with pytest.raises(StorageError):
            stage.ensure(tmp_path, root, lambda m: None)
        assert not (dest / stage.STAGED).exists()
        ng.start()  # the same port: the rerun
        stage.ensure(tmp_path, root, lambda m: None)
        assert (dest / first.name).read_bytes() == first.read_bytes() and (dest / stage.STAGED).exists()
    finally:
        ng.stop()


def test_ranged_reads_without_staging_read_the_same_bytes_as_local(served):
    local, m = open_index(str(served["local"]))
    for root in roots(served):
        index, rm = open_index(root, DataCfg(remote_cache_mb=1))
        assert rm.digest == m.digest and len(index) == len(local)
        for i in range(len(local)):
            got, want = index.read(i), local.read(i)
            assert got["__url__"].startswith(root) and {**got, "__url__": 0} == {**want, "__url__": 0}
        cache = index.cache
        assert cache.held <= (1 << 20) + (256 << 10)  # bounded
        assert cache.requests < len(local)  # neighbours share a block


NEVER_BEFORE_LAUNCH = ("torch", "deepspeed", "mlflow", "nvidia")


@pytest.mark.parametrize("case", ["403", "sha256"])
def test_ffscale_train_stops_on_remote_data_in_one_line_before_importing_torch(served, tmp_path, case):
    """A 403 found by the preflight, a sha256 mismatch found by the node's staging: one line, credentials
    masked, exit 2, before any rank starts or torch is imported (PYTHONPROFILEIMPORTTIME lists imports)."""
    import re
    import subprocess
    import sys

    port = served["nginx"].port
    root = f"http://reader:hunter2secret@127.0.0.1:{port}/" + (
        "forbidden/val" if case == "403" else "bad/val"
    )
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "CUDA_VISIBLE_DEVICES": ""}
    cli = Path(sys.executable).with_name("ffscale")
    config = Path(__file__).parents[2] / "configs" / "demo.yaml"
    args = [f"run.dir={tmp_path}", f"data.train={root}", f"data.val={root}", f"data.stage_dir={tmp_path / 'stage'}",
            "optim.global_batch=32", "tracking.enabled=false"]  # fmt: skip
    r = subprocess.run([str(cli), "train", "--config", str(config), *args], env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    lines = r.stderr.splitlines()
    imported = {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in lines if ln.startswith("import time:")}
    said = [ln for ln in lines if not ln.startswith("import time:")]
    assert r.returncode == 2, said
    assert len(said) == 1 and "hunter2secret" not in said[0] and "stages.pretrain.data.train=" in said[0], (
        said
    )
    assert re.search(r"\(403\)" if case == "403" else r"val-000001\.tar: its sha256 differs", said[0]), said
    assert not imported & set(NEVER_BEFORE_LAUNCH)


def test_the_webdataset_loader_in_worker_processes_reads_remote_shards_and_stops_in_one_line(served):
    """Ranged reads from forked DataLoader workers (each its own cache and client) give the local
    batches; a server that stops mid-epoch is one StorageError line, not the worker's traceback."""
    import torch
    from helpers.loaders import plain_cfg

    from ffscale.data.loader import build_loader

    def batches(root):
        cfg = plain_cfg("webdataset", workers=2, img_size=28)
        loader, _ = build_loader(cfg, root, True, 0, 1, 32, 0, None, torch.device("cpu"))
        return loader, loader.epoch(0)

    _, local = batches(str(served["local"]))
    ng = Nginx(served["srv"]).start()
    try:
        _, remote_batches = batches(f"{ng.url}/fm/val")
        for k, ((x, y), (rx, ry)) in enumerate(zip(local, remote_batches)):
            assert torch.equal(x, rx) and torch.equal(y, ry)
            if k == 1:
                break
        _, later = batches(f"{ng.url}/fm/val")
        ng.stop()
        with pytest.raises(StorageError) as e:
            list(later)
        assert "\n" not in str(e.value) and "storage did not answer" in str(e.value)
    finally:
        ng.stop()


def test_staging_stops_before_copying_when_the_stage_volume_is_too_small(served, tmp_path, monkeypatch):
    root = roots(served)[0]
    real = shutil.disk_usage
    monkeypatch.setattr(stage.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DataError, match=r"data.stage_dir .*: 0.0 MB free, staging .* needs 0.\d MB more"):
        stage.ensure(tmp_path, root, lambda m: None)
    assert not list(stage.local_root(tmp_path, root).glob("*.tar*"))


def test_the_doctor_measures_reading_remote_shards(served):
    from ffscale.tools.doctor import read_speed

    m, files = load_manifest(roots(served)[1])
    check = read_speed(files, 1.0, [s.size for s in m.shards])
    assert check.ok and "MB/s from s3://ffscale-test/fm/val" in check.figure, check


def test_the_processes_of_a_node_share_one_staging(served, tmp_path):
    """Three stagers at once (each its own open file description, so flock treats them as processes
    do): one copies, the others wait and find the copy complete."""
    from concurrent.futures import ThreadPoolExecutor

    root, said = roots(served)[1], []
    with ThreadPoolExecutor(3) as pool:
        dests = list(pool.map(lambda _: stage.ensure(tmp_path, root, said.append), range(3)))
    assert len(set(dests)) == 1 and (dests[0] / stage.STAGED).is_file()
    assert sum(s.startswith("ffscale: staging ") for s in said) == 1, said
    m, files = load_manifest(dests[0])
    assert [f.read_bytes() for f in files] == [(served["local"] / s.file).read_bytes() for s in m.shards]


def test_a_stage_resumes_on_the_same_shards_uploaded_and_staged(served, tmp_path):
    """A run started on local shards resumes on the same set under a URL (its digest, not its path,
    is the data's identity), staged or not: where shards are read from is no config change."""
    from ffscale import config
    from ffscale.run import changes

    def stage_of(root: str, *extra: str):
        cfg = config.load([str(Path(__file__).parents[2] / "configs" / "demo.yaml")],
                          [f"run.dir={tmp_path}", "run.name=r", f"data.train={root}", f"data.val={root}", *extra])  # fmt: skip
        return config.stages(cfg)[0], cfg.run

    stage_cfg, run = stage_of(str(served["local"]))
    (stage_cfg.dir / "checkpoints").mkdir(parents=True)
    changes.started(stage_cfg, run, "scratch")
    (stage_cfg.dir / "checkpoints" / "latest").write_text("step5")
    for root in roots(served):
        moved, run = stage_of(root, f"data.stage_dir={tmp_path / 'stage'}", "data.remote_cache_mb=8")
        assert changes.check(moved, run, set()) == {}


def test_a_changed_source_stages_again_and_replaces_the_shards_it_changed(served, tmp_path):
    """A shard replaced at the source with bytes of the same size, the manifest rewritten: the copy
    made from the old manifest is not kept for its size."""
    src = tmp_path / "src"
    shutil.copytree(served["local"], src)
    dest = stage.ensure(tmp_path / "stage", str(src), lambda m: None)
    m, files = load_manifest(src)
    data = bytearray(files[0].read_bytes())
    data[-2000] ^= 0xFF  # inside the tar's end-of-archive zeros: still a valid tar, other bytes
    files[0].write_bytes(bytes(data))
    from ffscale.data.manifest import sha256_file

    m.shards[0].sha256 = sha256_file(files[0])
    m.save(src)
    said = []
    assert stage.ensure(tmp_path / "stage", str(src), said.append) == dest
    assert (dest / files[0].name).read_bytes() == bytes(data)
    assert any("staged" in s for s in said)


@pytest.mark.parametrize(
    "override, expect",
    [("data.train=ftp://host/train", r"data.train='ftp://host/train': a local path, or an https://"),
     ("data.stage_dir=s3://b/stage", r"data.stage_dir='s3://b/stage': must be a node-local folder"),
     ("data.remote_cache_mb=0", r"data.remote_cache_mb=0: must be 1 or more")],
)  # fmt: skip
def test_remote_keys_are_checked_when_the_config_loads(override, expect):
    from ffscale import config

    with pytest.raises(config.ConfigError, match=expect):
        config.load([str(Path(__file__).parents[2] / "configs" / "demo.yaml")], [override])


def test_a_read_larger_than_the_cache_returns_its_bytes(tmp_path):
    """A member spanning more blocks than data.remote_cache_mb holds: the read keeps its own blocks,
    whatever the cache drops meanwhile (fsspec's local files stand in for a server's ranges)."""
    from ffscale.data.ranged import BLOCK, BlockCache

    blob = tmp_path / "shard.tar"
    data = bytes(range(256)) * (5 * BLOCK // 256)
    blob.write_bytes(data)
    cache = BlockCache([f"file://{blob}"], [len(data)], limit=BLOCK)
    assert cache.pread(0, 3 * BLOCK + 10, BLOCK - 5) == data[BLOCK - 5 : 4 * BLOCK + 5]
    assert cache.held <= BLOCK and cache.requests == 1
