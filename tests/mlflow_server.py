"""A real ``mlflow server`` for tests: started on a free loopback port, stopped at teardown.

The backend store is a parameter, so a test of another store reuses the fixture by indirect
parametrisation (the default is a SQLite file in a temporary folder)::

    @pytest.mark.parametrize("mlflow_server", ["postgresql://user:pw@127.0.0.1:5432/mlflow"], indirect=True)
    def test_on_postgres(mlflow_server: MlflowServer) -> None:
        client = MlflowClient(mlflow_server.uri)

Artifacts are proxied by the server (``--serve-artifacts``, into ``--artifacts-destination``), so
clients log and read them over HTTP, as they would against a shared server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

#: how long a server may take to answer /health
STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MlflowServer:
    """A running server: its URI (``http://127.0.0.1:<port>``), backend store and process."""

    uri: str
    backend_store_uri: str
    artifacts: Path
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 4000) -> str:
        """The end of the server's output (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """``kill -9`` the server and its workers (a crash: nothing is flushed or closed), then reap them."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 9)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=20)

    def stop(self) -> None:
        """Terminate the server (and its workers), then wait for it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 15)  # the server and the worker processes it started
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)


def start_server(backend_store_uri: str, workdir: Path, timeout_s: float = STARTUP_TIMEOUT_S,
                 port: int | None = None) -> MlflowServer:
    """Start ``mlflow server`` on a free loopback port (or ``port``: a server restarted where its clients
    look for it) and wait until ``/health`` answers.

    Raises:
        RuntimeError: the server exited or did not answer in time (with the end of its log).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts = workdir / "artifacts"
    port = port or free_port()
    log_path = workdir / "server.log"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
           "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # no background job runners (MLflow 3 starts several huey consumers otherwise): tracking only
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as log:
        # its own process group, so teardown stops the workers too
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", backend_store_uri, artifacts, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server did not answer /health within {timeout_s:.0f} s:\n{server.log_tail()}")
