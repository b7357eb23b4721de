"""The doctor's MLflow checks, each as a job would meet it: the store answers, accepts these
credentials, and takes an artifact; a SQLite store is refused on a network filesystem."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ffscale.tracking.store import client, experiment_id, sqlite_file, sqlite_unsafe
from ffscale.util.secrets import redact

CREDENTIALS = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"


@dataclass
class Finding:
    name: str
    figure: str
    ok: bool = True
    fatal: bool = True


def _why(error: Exception) -> str:
    text = redact(str(error)).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def probe(uri: str, experiment: str) -> list[Finding]:
    where = redact(uri)
    out: list[Finding] = []
    db = sqlite_file(uri)
    if db is not None:
        why = sqlite_unsafe(db)
        if why:
            return [Finding("mlflow.store", why, ok=False)]
        db.parent.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    try:
        c.search_experiments(max_results=1)
    except Exception as e:
        code = getattr(e, "error_code", "")
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            given = f"as {who}" if who else "without credentials"
            return [
                Finding("mlflow", f"{where} refused the request {given} ({code}): {CREDENTIALS}", ok=False)
            ]
        # a server that is down does not stop training: the run directory keeps everything
        return [Finding("mlflow", f"{where} unreachable: {_why(e)}; training would go on and "
                                  "`ffscale track sync RUN_DIR` replays it later", ok=False, fatal=False)]  # fmt: skip
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or (
        "token" if os.environ.get("MLFLOW_TRACKING_TOKEN") else ""
    )
    out.append(Finding("mlflow", f"{where} reachable" + (f", authenticated ({user})" if user else "")))
    out.append(_artifacts(c, uri, experiment))
    return out


def _artifacts(c, uri: str, experiment: str) -> Finding:
    """A throwaway run in the experiment logs a small artifact and lists it, then is deleted."""
    try:
        exp = experiment_id(c, experiment, uri)
        location = c.get_experiment(exp).artifact_location
        run = c.create_run(exp, run_name="ffscale-doctor", tags={"ffscale.kind": "doctor"})
    except Exception as e:
        code = getattr(e, "error_code", "")
        fix = f": {CREDENTIALS} of a user who may write to it" if code == "PERMISSION_DENIED" else ""
        return Finding(
            "mlflow.artifacts", f"cannot create a run in experiment {experiment!r}: {_why(e)}{fix}", ok=False
        )
    rid = run.info.run_id
    try:
        with tempfile.TemporaryDirectory() as d:
            probe_file = Path(d) / "doctor.txt"
            probe_file.write_text("ffscale doctor\n")
            c.log_artifact(rid, str(probe_file))
        if "doctor.txt" not in {a.path for a in c.list_artifacts(rid)}:
            raise OSError("the artifact was not listed back")
    except Exception as e:
        return Finding("mlflow.artifacts", f"{location} (experiment {experiment!r}) not writable: {_why(e)}; serve "
                       "artifacts from the server (`mlflow server --serve-artifacts --artifacts-destination ...`) or "
                       "use a new experiment (tracking.experiment=...) whose artifact root this job can write", ok=False)  # fmt: skip
    finally:
        try:
            c.delete_run(rid)
        except Exception:
            pass
    return Finding("mlflow.artifacts", f"{redact(location)} writable (experiment {experiment!r})")
