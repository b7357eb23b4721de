"""A real MLflow tracking server for the tests, as teams run it: PostgreSQL from Debian's packages
behind it (a throwaway cluster in a temporary directory, on a free port), artifacts served over
HTTP (`--serve-artifacts`), optionally MLflow's basic-auth app. Where PostgreSQL is not installed or
does not start, the server runs on a SQLite file instead and says so (a pytest warning).

PostgreSQL refuses to run as root (PLATFORM-NOTES.md): as root, initdb and the server run as the
unprivileged `nobody`, in a directory under /tmp that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from helpers.launch import free_port

MLFLOW = Path(sys.executable).with_name("mlflow")


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


class Postgres:
    """A PostgreSQL cluster of its own: `start()` (initdb on first use), `create_db(name)`, `stop()`."""

    def __init__(self):
        self.bin = _pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="ffscale-pg-"))
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:  # postgres will not run as root
            self.user = pwd.getpwnam("nobody")
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    def _as_user(self):
        if self.user is None:
            return None
        uid, gid = self.user.pw_uid, self.user.pw_gid

        def drop():
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

        return drop

    def _run(self, *cmd: str, timeout: int = 60) -> None:
        r = subprocess.run([str(self.bin / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=timeout,
                           preexec_fn=self._as_user(), cwd=self.root, env={**os.environ, "LC_ALL": "C"})  # fmt: skip
        if r.returncode:
            raise RuntimeError(f"{cmd[0]} failed: {(r.stderr or r.stdout)[-800:]}")

    def start(self) -> Postgres:
        data = self.root / "data"
        if not data.exists():
            self._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -F"  # -F: no fsync, a test DB
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(self.root / "log"), "-o", opts, "-w", "-t", "60", "start"
        )
        return self

    def create_db(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the dev extra installs psycopg2-binary
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with one worker; `kill()` (SIGKILL, as a crashed pod) and
    `start()` again keep the port, the database and the artifacts."""

    def __init__(self, root: Path, backend: str, auth_admin: tuple[str, str] | None = None):
        self.root, self.backend = root, backend
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.log = root / "server.log"
        # no job runner: its four huey processes serve GenAI scorers, which ffscale does not use
        self.env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_PYTHON_REFRESH": "quiet",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # fmt: skip
        self.cmd = [str(MLFLOW), "server", "--backend-store-uri", backend, "--serve-artifacts",
                    "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", "1"]  # fmt: skip
        if auth_admin is not None:  # MLflow's basic-auth app, its users in a SQLite file of its own
            ini = root / "basic_auth.ini"
            ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                           f"admin_username = {auth_admin[0]}\nadmin_password = {auth_admin[1]}\n"
                           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")  # fmt: skip
            self.env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
            self.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.urandom(16).hex()
            self.cmd += ["--app-name", "basic-auth"]
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            self.env.pop(k, None)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"mlflow server did not answer in {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its workers (no goodbye to clients), and wait until the port is free."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None


def backend_uri(pg: Postgres | None, root: Path, db: str) -> str:
    """A new database `db` in the PostgreSQL cluster, or a SQLite file under `root` without one."""
    return pg.create_db(db) if pg is not None else f"sqlite:///{root / (db + '.db')}"
