"""MLflow as teams run it: `mlflow server` over PostgreSQL with artifacts served over HTTP
(tests/helpers/mlflow_server.py; SQLite behind it where PostgreSQL cannot start, said as a warning).
Three launches, each a scenario fixture the tests share:
- `outage`: two "nodes" train and register their model while the server is SIGKILLed mid-run and
  started again; compare, predict and `mlflow models predict` then read it over HTTP;
- `late`: the server dies mid-run and comes back only after the job ended; `ffscale track sync`
  finishes the runs;
- `secret`: MLflow's basic-auth app; credentials from the environment, a canary password in them
  and another in tracking.uri, grepped for everywhere the job writes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.launch import ROOT, free_port, launch_env, small_overrides, start_nodes
from helpers.mlflow_server import MlflowServer, Postgres, backend_uri

pytestmark = pytest.mark.e2e
CLI = Path(sys.executable).with_name("ffscale")
MODEL = "ff-nodes"
CANARY_ENV = "canary-env-5b1f0c9e"  # the password the server knows, given in MLFLOW_TRACKING_PASSWORD
CANARY_URI = "canary-uri-77d2a4f1"  # a password written into tracking.uri
ADMIN = "ffscale-admin"


def rows_of(stage_dir: Path) -> list[dict]:
    f = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def wait_rows(stage_dir: Path, n: int, procs, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(rows_of(stage_dir)) < n and any(p.poll() is None for p in procs):
        time.sleep(0.1)


def steps_by_key(stage_dir: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for r in rows_of(stage_dir):
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                out.setdefault(k, set()).add(r["step"])
    return out


def mlflow_steps(c, run_id: str, keys) -> dict[str, set[int]]:
    return {k: {m.step for m in c.get_metric_history(run_id, k)} for k in keys}


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=launch_env(env))  # fmt: skip


@contextlib.contextmanager
def environ(env: dict):
    """os.environ with `env` for the block (in-process MLflow clients read credentials from it)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def in_process(*args, env: dict) -> SimpleNamespace:
    """An `ffscale` command run in this process (no interpreter start-up): exit code and output."""
    from ffscale.cli import main

    out, err = io.StringIO(), io.StringIO()
    with environ(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def pg(module_dir):
    try:
        pg = Postgres().start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired, KeyError) as e:
        import warnings

        warnings.warn(f"MLflow server tests run on SQLite, not PostgreSQL: {str(e)[:300]}", stacklevel=1)
        pg = None
    yield pg
    if pg is not None:
        pg.stop()


@pytest.fixture(scope="module")
def server(pg, module_dir):
    s = MlflowServer(module_dir / "server", backend_uri(pg, module_dir, "mlflow")).start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def outage(server, fm_shards, module_dir):
    """Two nodes; the server SIGKILLed after a few rows and started again at once (it takes 10-20 s to
    answer, during which the job trains on, or ends and retries for tracking.end_retry_s)."""
    args = small_overrides(fm_shards, module_dir, "outage") + [
        "schedule.epochs=2", f"tracking.uri={server.uri}", f"tracking.register_as={MODEL}",
    ]  # fmt: skip
    t0 = time.time()
    procs = start_nodes(args)
    stage = module_dir / "outage" / "train"
    wait_rows(stage, 8, procs)
    server.kill()
    killed_at = len(rows_of(stage))
    server.start()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return {"procs": procs, "outs": outs, "stage": stage, "killed_at": killed_at, "s": time.time() - t0,
            "ids": json.loads((module_dir / "outage" / "mlflow_runs.json").read_text())}  # fmt: skip


def test_a_server_killed_mid_run_loses_nothing_and_the_model_is_registered(outage, server):
    from mlflow import MlflowClient

    assert [p.returncode for p in outage["procs"]] == [0, 0], outage["outs"][0][-3000:]
    out = outage["outs"][0]
    assert out.count(f"MLflow at {server.uri} failed") == 1, out[-3000:]
    assert 8 <= outage["killed_at"] < len(rows_of(outage["stage"]))  # killed mid-run, rows written after
    c, ids = MlflowClient(server.uri), outage["ids"]
    run = c.get_run(ids["stages"]["train"])
    assert run.info.status == "FINISHED" and c.get_run(ids["parent"]).info.status == "FINISHED"
    want = steps_by_key(outage["stage"])
    assert {"loss", "lr", "val_top1", "epoch"} <= set(want)
    assert mlflow_steps(c, run.info.run_id, want) == want  # every metric step of every key
    v = c.get_model_version(MODEL, "1")
    assert v.run_id == run.info.run_id and json.loads(v.tags["ffscale.stage_runs"]) == ids["stages"]
    assert len(c.search_model_versions(f"name = '{MODEL}'")) == 1
    assert {"DONE", "weights.safetensors", "metrics.jsonl"} <= {
        a.path for a in c.list_artifacts(run.info.run_id)
    }
    assert run.data.params["model.dim"] == "32" and run.data.tags["ffscale.init_from"] == "scratch"


def test_compare_predict_and_mlflow_models_predict_work_over_http(outage, server, tmp_path):
    from PIL import Image

    from ffscale.data.ingest.sources import FASHION_MNIST_CLASSES, fashion_mnist_arrays

    r = cli("compare", "--uri", server.uri, "--model", "ff_")
    assert r.returncode == 0 and "outage" in r.stdout and "FINISHED" in r.stdout, r.stderr[-2000:]
    images, _ = fashion_mnist_arrays("val")
    files = []
    for i in range(6):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i], "L").save(files[-1])
    env = {"MLFLOW_TRACKING_URI": server.uri}
    r = cli("predict", "--model", f"models:/{MODEL}/1", "--json", *files, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = [json.loads(line)["top"][0]["index"] for line in r.stdout.splitlines()]
    local = cli("predict", "--model", outage["stage"], "--json", *files)
    assert ours == [json.loads(line)["top"][0]["index"] for line in local.stdout.splitlines()]
    (tmp_path / "in.csv").write_text("image\n" + "".join(f"{f}\n" for f in files))
    r = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m", f"models:/{MODEL}/1",
                        "-i", str(tmp_path / "in.csv"), "-t", "csv", "--env-manager", "local", "-o",
                        str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300,
                       env=launch_env(env))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    served = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert [p["class_index"] for p in served] == ours
    assert [p["class_name"] for p in served] == [FASHION_MNIST_CLASSES[k] for k in ours]


@pytest.fixture(scope="module")
def late(server, fm_shards, module_dir):
    """One rank; the server SIGKILLed mid-run and started only after the job ended; then synced twice."""
    args = small_overrides(fm_shards, module_dir, "late") + [
        "schedule.epochs=2", f"tracking.uri={server.uri}", "tracking.register_as=ff-late", "tracking.end_retry_s=3",
    ]  # fmt: skip
    cmd = [str(CLI), "train", "--nproc", "1", "--master-port", str(free_port()), *args]
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    stage = module_dir / "late" / "train"
    wait_rows(stage, 8, [p])
    server.kill()
    out = p.communicate(timeout=300)[0]
    from mlflow import MlflowClient

    server.start()
    ids = json.loads((module_dir / "late" / "mlflow_runs.json").read_text())
    before = MlflowClient(server.uri).get_run(ids["stages"]["train"])
    t0 = time.time()
    syncs = [cli("track", "sync", module_dir / "late") for _ in range(2)]
    return {"rc": p.returncode, "out": out, "stage": stage, "ids": ids, "before": before, "syncs": syncs,
            "sync_s": (time.time() - t0) / 2}  # fmt: skip


def test_a_run_whose_server_returns_after_the_job_ends_is_finished_by_sync(late, server):
    from mlflow import MlflowClient

    assert late["rc"] == 0, late["out"][-3000:]
    assert f"ffscale track sync {late['stage'].parent} --uri {server.uri}" in late["out"]
    assert late["before"].info.status == "RUNNING"  # left as the outage found it
    first, second = late["syncs"]
    assert first.returncode == 0 and "train FINISHED" in first.stdout, first.stdout + first.stderr[-2000:]
    assert " 0 metric values sent, 0 artifacts uploaded" in second.stdout, second.stdout  # idempotent
    c, ids = MlflowClient(server.uri), late["ids"]
    assert c.get_run(ids["parent"]).info.status == "FINISHED"
    want = steps_by_key(late["stage"])
    assert mlflow_steps(c, ids["stages"]["train"], want) == want
    (v,) = c.search_model_versions("name = 'ff-late'")  # registered once, by the first sync
    assert v.run_id == ids["stages"]["train"]


@pytest.fixture(scope="module")
def secret(pg, fm_shards, module_dir):
    """Basic auth on; the job's credentials in the environment; canaries in them and in tracking.uri."""
    s = MlflowServer(module_dir / "auth", backend_uri(pg, module_dir, "auth"), auth_admin=(ADMIN, CANARY_ENV))
    s.start()
    env = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": CANARY_ENV}
    uri = s.uri.replace("http://", f"http://intruder:{CANARY_URI}@")
    # in a config file: every rank reads it, rank 0 writes config.yaml and the params from it
    # (a `tracking.uri=` override goes to the ranks' environment instead: tests/unit/test_secrets.py)
    (module_dir / "secret.yaml").write_text(f"tracking:\n  uri: {uri}\n  register_as: ff-secret\n")
    args = small_overrides(fm_shards, module_dir, "secret") + ["schedule.epochs=1"]
    try:
        job = cli("train", "--nproc", "1", "--master-port", free_port(), "--config", module_dir / "secret.yaml",
                  *args, env=env)  # fmt: skip
        from ffscale import config
        from ffscale.tracking.probe import probe

        experiment = config.load(None, []).tracking.experiment
        with environ(env):
            checks = {"right": probe(s.uri, experiment)}
        with environ({**env, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}):
            checks["wrong"] = probe(s.uri, experiment)
        render = in_process("cluster", "render", "--config", ROOT / "configs" / "ff_base.yaml", "--config",
                            module_dir / "secret.yaml", "--out", module_dir / "manifests", env=env)  # fmt: skip
        render_ok = in_process("cluster", "render", "--config", ROOT / "configs" / "ff_base.yaml", "--out",
                               module_dir / "manifests-ok", env=env)  # fmt: skip
        sync = in_process("track", "sync", module_dir / "secret", "--uri", s.uri, env=env)
        yield {"server": s, "job": job, "checks": checks, "render": render, "render_ok": render_ok, "sync": sync,
               "env": env, "run_dir": module_dir / "secret"}  # fmt: skip
    finally:
        s.kill()


def test_credentials_come_from_the_environment_and_appear_nowhere(secret, module_dir):
    from mlflow import MlflowClient

    job = secret["job"]
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
    assert "+ " in job.stdout and "secret.yaml" in job.stdout  # the launcher's printout is there
    with environ(secret["env"]):
        c = MlflowClient(secret["server"].uri)
        runs = c.search_runs([c.get_experiment_by_name("ffscale").experiment_id])
        versions = c.search_model_versions("name = 'ff-secret'")
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) >= 2 and len(versions) == 1
    assert secret["sync"].returncode == 0 and " 0 metric values sent" in secret["sync"].stdout

    places = {"job output": job.stdout + job.stderr, "sync output": secret["sync"].stdout + secret["sync"].stderr,
              "render output": secret["render"].stdout + secret["render"].stderr,
              "MLflow params and tags": json.dumps([[r.data.params, r.data.tags] for r in runs]),
              "model version": json.dumps([[v.tags, v.description] for v in versions])}  # fmt: skip
    files = [f for d in (secret["run_dir"], module_dir / "auth" / "artifacts", module_dir / "manifests-ok")
             for f in d.rglob("*") if f.is_file()]  # fmt: skip
    assert any(f.name == "model.json" for f in files) and any(f.name == "config.yaml" for f in files)
    assert any(f.name == "MLmodel" for f in files) and any(f.name == "job.yaml" for f in files)
    for canary in (CANARY_ENV, CANARY_URI):
        leaks = [k for k, text in places.items() if canary in text]
        leaks += [str(f) for f in files if canary.encode() in f.read_bytes()]
        assert not leaks, (canary, leaks)
    assert secret["render"].returncode == 2 and "tracking.uri holds a credential" in secret["render"].stderr


def test_doctor_checks_the_server_authenticates_and_takes_artifacts(secret):
    right = {f.name: f for f in secret["checks"]["right"]}
    assert right["mlflow"].ok and f"authenticated ({ADMIN})" in right["mlflow"].figure
    assert right["mlflow.artifacts"].ok and "mlflow-artifacts:" in right["mlflow.artifacts"].figure
    (wrong,) = secret["checks"]["wrong"]
    assert not wrong.ok and wrong.fatal and "UNAUTHENTICATED" in wrong.figure
    assert "MLFLOW_TRACKING_PASSWORD" in wrong.figure and "not-the-password" not in wrong.figure
