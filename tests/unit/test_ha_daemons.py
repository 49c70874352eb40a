"""Two daemon processes on one PostgreSQL ledger and one shared spool (no Slurm needed):
one leads the once-only work, and when the leader is killed mid-ingest the other takes
over within seconds and every run is ingested exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from db.rollups import verify
from db.store import open_store
from slurm_plugin.node import spool
from slurm_plugin.protocol import call
from tests.unit.test_db_ingest import make_jobcomp, make_node_run
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


class Daemon:
    """One ``slurmgate daemon`` process with its own socket and log, a shared ledger URL
    (in a private file) and the shared spool."""

    def __init__(self, root: Path, name: str, url_file: Path, spool_dir: Path) -> None:
        self.root = root / name
        self.root.mkdir(mode=0o755)
        self.policy = self.root / "policy.toml"
        self.socket = str(self.root / "sg.sock")
        self.policy.write_text(
            f'[daemon]\nsocket = "{self.socket}"\ndatabase_url_file = "{url_file}"\n'
            f'spool_dir = "{spool_dir}"\nslurm_user = "root"\ncluster = "c1"\n'
            f'log_file = "{self.root}/daemon.log"\nreconcile_seconds = 3600\n'
            f'[node]\nstate_dir = "{self.root}/state"\n'
            '[rates.gpu_hour]\na100 = 2.0\n[rates]\ncpu_core_hour = 0.01\n'
            '[teams.vision]\naccounts = ["vis"]\nbudget = 1000000.0\n'
            '[partitions.gpu]\ndefault_gpu_type = "a100"\n'
            '[nvml]\nbackend = "fake"\n')
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slurm_plugin.cli", "--config", str(self.policy), "daemon"],
            env=env, stdout=subprocess.DEVNULL,
            stderr=(self.root / "stderr").open("w"))  # noqa: SIM115 (the child keeps it)
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, 30,
                 what=f"{self.root.name}'s socket")
        assert self.proc.poll() is None, (self.root / "stderr").read_text()

    def ping(self) -> dict[str, Any]:
        return call(self.socket, {"op": "ping"}, timeout=5)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def pair(pg_url: str, tmp_path: Path) -> Any:
    root = Path(tmp_path)
    os.chmod(root, 0o755)
    url_file = root / "ledger.url"
    url_file.write_text(pg_url + "\n")
    os.chmod(url_file, 0o600)
    spool_dir = root / "spool"
    spool_dir.mkdir()
    os.chmod(spool_dir, 0o755)  # root's (the test policy's SlurmUser), like the daemon tests
    a, b = Daemon(root, "a", url_file, spool_dir), Daemon(root, "b", url_file, spool_dir)
    yield a, b, spool_dir, pg_url
    for d in (a, b):
        d.stop()


def run_count(url: str) -> int:
    with open_store(url, readonly=True) as s:
        return s.run_count()


def test_the_standby_takes_over_a_killed_leader_mid_ingest_and_nothing_is_ingested_twice(
        pair: Any) -> None:
    a, b, spool_dir, url = pair
    a.start()
    wait_for(lambda: a.ping().get("leader"), 15, what="the first daemon to lead")
    b.start()
    assert b.ping()["leader"] is False and b.ping()["ledger"] == "postgresql"
    jobs = 3000
    trust = spool.trust_for("root")  # the test policy's SlurmUser
    for d in (a, b):  # both wait while the backlog is written: the kill must find work left
        os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        for n in range(jobs):  # a backlog of finished jobs, each with its node's record
            spool.write_record(spool_dir, make_jobcomp(10_000 + n), trust=trust)
            spool.write_record(spool_dir, make_node_run(10_000 + n), trust=trust)
        os.kill(a.proc.pid, signal.SIGCONT)
        wait_for(lambda: run_count(url) > 0, 30, interval=0.02, what="the ingest to start")
        a.kill()  # the leader's host died in the middle of the backlog
        killed_at = time.monotonic()
        at_kill = run_count(url)
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert 0 < at_kill < jobs, f"the kill did not land mid-ingest ({at_kill} of {jobs})"
    wait_for(lambda: b.ping().get("leader"), 15, what="the standby to take the lead")
    took = time.monotonic() - killed_at
    assert took < 10, f"took {took:.1f} s"
    wait_for(lambda: run_count(url) == jobs, 120, interval=0.5, what="every run ingested")
    with open_store(url, readonly=True) as s:
        assert s.run_count() == jobs
        runs = s.conn.query("SELECT count(DISTINCT job_id) AS n, count(*) AS m, "
                            "coalesce(sum(cost), 0) AS cost FROM runs")[0]
        assert runs["n"] == runs["m"] == jobs and runs["cost"] > 0
        nodes = s.conn.scalar("SELECT count(*) FROM run_nodes")
        assert nodes == jobs  # one node record per run, none twice
        assert verify(s) == []  # the daily rollups hold each run's cost once
        leaders = s.conn.query("SELECT message FROM events WHERE kind = 'leader' ORDER BY id")
    assert len(leaders) == 2  # a, then b
    wait_for(lambda: not any(spool_dir.glob("ctld/*.json")) and
             not any(spool_dir.glob("node/*.json")), 30, what="the spool to drain")


def test_a_daemon_whose_ledger_is_unreachable_says_so_and_gives_no_verdict(
        pair: Any, tmp_path: Path) -> None:
    a, _, _, _ = pair
    a.start()
    wait_for(lambda: a.ping().get("leader"), 15, what="the daemon to lead")
    from tests.postgres import server

    srv = server()
    srv.kill()  # the database host died
    try:
        resp = call(a.socket, {"op": "submit", "id": "x1", "job": {
            "uid": 0, "account": "vis", "partition": "gpu", "time_limit": 60,
            "tres_per_node": "gres/gpu:a100:1"}}, timeout=30)
        assert resp["ok"] is False and resp.get("unavailable") is True
        assert "ledger unreachable" in resp["error"]
        ping = a.ping()
        assert ping["ledger_error"]
        wait_for(lambda: a.ping().get("leader") is False, 20,
                 what="the daemon to step down from the lead")
    finally:
        srv.start()
