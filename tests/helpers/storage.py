"""Real storage servers on 127.0.0.1 for the remote-shard tests (no mocks): nginx serving a folder
with HTTP range requests (and a `/forbidden/` prefix answering 403), moto's standalone S3 API server
and gcp-storage-emulator's GCS JSON API server (in-memory buckets, both). scripts/setup.sh installs
them (Debian's nginx, the dev extra's moto and gcp-storage-emulator)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from helpers.launch import free_port


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


class Nginx:
    """nginx serving `root` at http://127.0.0.1:PORT/ (autoindex on: fsspec lists folders from it)."""

    def __init__(self, root: Path):
        self.bin = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(self.bin).exists():
            raise RuntimeError("nginx is not installed (bash scripts/setup.sh, or apt-get install nginx)")
        self.root, self.port = Path(root), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ffscale-nginx-"))
        weakref.finalize(self, shutil.rmtree, self.dir, True)  # its config, pid and log: gone with it
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        d = self.dir
        # as root, workers run as `user`: root, so they read pytest's 0700 temporary folders
        user = "user root;" if os.geteuid() == 0 else ""
        (d / "nginx.conf").write_text(
            f"""{user}
daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{self.port}; root {self.root}; autoindex on;
    location /forbidden/ {{ return 403; }}
  }}
}}
"""
        )
        self.proc = subprocess.Popen(
            [self.bin, "-c", str(d / "nginx.conf"), "-p", str(d)], stderr=subprocess.PIPE, text=True
        )
        _wait_port(self.port, self.proc, "nginx")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class MotoS3:
    """moto's S3 API server; `env` is what a client needs (endpoint, a dummy key, the region)."""

    def __init__(self):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> MotoS3:
        exe = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_port(self.port, self.proc, "moto_server")
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def upload(self, bucket: str, prefix: str, folder: Path) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=bucket)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                c.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class FakeGcs:
    """gcp-storage-emulator's GCS JSON API server; `env` is what gcsfs needs to use it.

    gcsfs (2025.x on) first asks the storage control plane, over gRPC, whether a bucket is
    hierarchical or zonal, and falls back to the JSON API for other buckets after that call times
    out (60 s; gcsfs/extended_gcsfs.py, `_get_bucket_type`). The emulator serves the JSON API only,
    so `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (gcsfs/__init__.py, read when gcsfs is first imported:
    tests/conftest.py sets it for the whole test process) takes that JSON API path at once: the one a
    bucket without a hierarchical namespace ends on. `NO_GCE_CHECK=true` keeps gcsfs's search for
    credentials from asking a GCE metadata server (gcsfs/credentials.py, `connect`)."""

    def __init__(self):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.port}",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "NO_GCE_CHECK": "true",
        }

    def start(self) -> FakeGcs:
        exe = Path(sys.executable).with_name("gcp-storage-emulator")
        self.proc = subprocess.Popen(
            [str(exe), "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_port(self.port, self.proc, "gcp-storage-emulator")
        return self

    def upload(self, bucket: str, prefix: str, folder: Path) -> None:
        """`folder`'s files under gs://bucket/prefix, by a gcsfs of its own."""
        import gcsfs

        fs = gcsfs.GCSFileSystem(
            token="anon",
            project="test",
            endpoint_url=self.env["STORAGE_EMULATOR_HOST"],
            skip_instance_cache=True,
        )
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                fs.pipe(f"{bucket}/{prefix}/{f.relative_to(folder).as_posix()}", f.read_bytes())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
