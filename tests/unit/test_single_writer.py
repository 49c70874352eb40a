"""One daemon per database (flock on ``<database>.lock``), a stale-socket probe that cannot
hang, and private files whatever umask the daemon was started with."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from slurm_plugin.daemon.server import DaemonRunning, lock_database, lock_path, probe_socket
from tests.unit.test_daemon import REPO, RunningDaemon, render_policy
from tests.waiting import wait_for


def test_the_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    db = str(tmp_path / "sg.db")
    fd = lock_database(db)
    assert fd is not None
    try:
        assert Path(lock_path(db)).read_text() == f"{os.getpid()}\n"
        # flock locks belong to the open file: a second open (as a second daemon does) fails
        with pytest.raises(DaemonRunning, match=rf"pid {os.getpid()}\b.*stop that daemon"):
            lock_database(db)
    finally:
        os.close(fd)
    again = lock_database(db)  # released with the descriptor
    assert again is not None
    os.close(again)
    assert lock_database(":memory:") is None


def test_the_lock_file_is_never_followed_as_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep me")
    os.symlink(target, tmp_path / "sg.db.lock")
    with pytest.raises(OSError):
        lock_database(str(tmp_path / "sg.db"))
    assert target.read_text() == "keep me"


def test_the_socket_probe(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening: what a crashed daemon leaves
    try:
        assert probe_socket(path) is None
    finally:
        stale.close()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.unlink(path)
    live.bind(path)
    live.listen(0)
    try:
        assert "another daemon is listening" in (probe_socket(path) or "")
    finally:
        live.close()
    assert probe_socket(str(tmp_path / "missing.sock")) is None


@pytest.fixture
def state():
    # Not under pytest's tmp_path (see test_daemon.daemon)
    d = Path(tempfile.mkdtemp(prefix="sg-writer-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_second_daemon_on_the_same_database_refuses_to_start(state: Path) -> None:
    first = RunningDaemon(state)
    first.config.write_text(render_policy(state))
    old = os.umask(0)  # the daemon makes its files private anyway
    try:
        first.start()
    finally:
        os.umask(old)
    try:
        assert first.ask(op="ping")["ok"] is True
        # the second one has its own socket, so only the database lock can stop it
        other = state / "other.toml"
        other.write_text(render_policy(state).replace(f"{state}/sg.sock",
                                                      f"{state}/other.sock"))
        out = subprocess.run(
            [sys.executable, "-m", "slurm_plugin.cli", "--config", str(other), "daemon"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
            timeout=30)
        assert out.returncode == 1
        assert first.proc is not None
        assert f"another slurmgate daemon (pid {first.proc.pid}) is running on " \
               f"{state}/sg.db" in out.stderr
        assert not (state / "other.sock").exists()
        assert first.ask(op="ping")["ok"] is True  # the first one is untouched
        wait_for(lambda: (state / "sg.db-wal").exists(), 10, what="the WAL")
        for name in ("sg.db", "sg.db-wal", "sg.db-shm", "sg.db.lock", "daemon.log"):
            f = state / name
            if f.exists():
                mode = stat.S_IMODE(f.stat().st_mode)
                assert mode & ~0o640 == 0, (name, oct(mode))
    finally:
        first.stop()
    # once it is gone, a new daemon starts (the lock went with the process)
    second = RunningDaemon(state)
    second.start()
    try:
        assert second.ask(op="ping")["ok"] is True
    finally:
        second.stop()
