"""A real PostgreSQL server for the tests (contrib/devcluster/postgres.sh, Debian's package),
started once per test session on a free loopback port, and a fresh database per test.

``make test`` installs the package (cluster.sh install-packages); without it the fixtures
fail with the command that installs it, never skip.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POSTGRES_SH = REPO / "contrib/devcluster/postgres.sh"
_names = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One running server; ``url()`` is its slurmgate role's database."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sg-pg-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.port = _free_port()
        run = subprocess.run(["bash", str(POSTGRES_SH), "start", str(self.dir), str(self.port)],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError("cannot start the test PostgreSQL server "
                               f"(make packages installs it): {run.stderr.strip()}")
        self.base_url = subprocess.run(
            ["bash", str(POSTGRES_SH), "url", str(self.dir), str(self.port)],
            capture_output=True, text=True, check=True).stdout.strip()
        atexit.register(self.stop)

    def url(self, database: str = "slurmgate") -> str:
        return self.base_url.rsplit("/", 1)[0] + "/" + database

    def stop(self) -> None:
        if self.dir.exists():
            subprocess.run(["bash", str(POSTGRES_SH), "stop", str(self.dir)],
                           capture_output=True, timeout=60)
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        subprocess.run(["bash", str(POSTGRES_SH), "kill", str(self.dir)], check=True)

    def start(self) -> None:
        subprocess.run(["bash", str(POSTGRES_SH), "start", str(self.dir), str(self.port)],
                       check=True, capture_output=True, timeout=120)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database for one test (dropped after, its connections cut)."""
        import psycopg

        name = f"t{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.base_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            with psycopg.connect(self.base_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@functools.cache
def server() -> Server:
    """The session's server, started on first use."""
    return Server()
