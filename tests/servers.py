"""A real PostgreSQL for tests (Debian's packages), on a loopback port; the ``mlflow server`` is
:mod:`tests.mlflow_server`'s.

Started as subprocesses and stopped at teardown; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.mlflow_server import free_port


def postgres_bin() -> Path | None:
    """The folder holding Debian's ``initdb`` / ``pg_ctl`` (``/usr/lib/postgresql/<v>/bin``), if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on a loopback port; yields its ``postgresql+psycopg2://`` URI (db ``mlflow``).

    ``initdb`` refuses to run as root, so the cluster belongs to the ``postgres`` user (made by
    Debian's package) when the tests run as root.
    """
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    base = Path(tempfile.mkdtemp(prefix="medseg-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    as_root = os.geteuid() == 0
    if as_root:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")

    def run(*cmd: str) -> subprocess.CompletedProcess:
        full = (["runuser", "-u", "postgres", "--"] if as_root else []) + list(cmd)
        return subprocess.run(full, capture_output=True, text=True, timeout=120, check=True)

    port = free_port()
    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "start",
        "-o", f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
