"""Fixtures for tests that drive the real local Slurm cluster (contrib/devcluster).

`make test` starts the cluster first; a test run without it starts it here (idempotent).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from policies import defaults
from slurm_plugin.slurm.cli_backend import read_int, read_state
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SH = REPO / "contrib/devcluster/cluster.sh"
FINAL_STATES = defaults.FINISHED_STATES
TAGS = {
    "alice": "project=vit-scaling,cost_center=CC1001",
    "carol": "project=detection,cost_center=CC1001",
    "bob": "project=llm-pretrain,cost_center=CC2002",
}


_TEXT_FIELDS = ("admin_comment", "comment", "state_reason", "partition", "nodes",
                "user_name", "account", "name", "tres_per_node", "tres_per_job")
_EAGAIN = "Resource temporarily unavailable"


def normalise_job(rec: dict[str, Any]) -> dict[str, Any]:
    """One raw ``squeue --json`` job record in 22.05's (openapi v0.0.38) shape, whatever the
    Slurm: ``job_state`` its base state string (23.11+: a list), numbers ``{set, infinite,
    number}`` plain ints (None when unset or infinite), text fields 22.05 always writes ""
    when missing or null. Every test that reads squeue JSON reads it through this."""
    job: dict[str, Any] = {}
    for key, value in rec.items():
        if isinstance(value, dict) and "number" in value and "set" in value:
            value = read_int(value)
        job[key] = value
    job["job_state"] = read_state(rec.get("job_state"))[0]
    for key in _TEXT_FIELDS:
        if not isinstance(job.get(key), str):
            job[key] = ""
    return job


def scontrol_retry(argv: list[str], env: dict[str, str], within: float = 15.0,
                   **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(argv)`` again, after a short wait, while it fails with EAGAIN
    ("Resource temporarily unavailable": 24.11/26.05's slurmctld, for seconds at a time after
    an update of the same job), for up to ``within`` seconds."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 30)
    give_up = time.monotonic() + within
    wait = 0.2
    while True:
        out = subprocess.run(argv, env=env, **kwargs)
        err = out.stderr if isinstance(out.stderr, str) else (out.stderr or b"").decode(
            errors="replace")
        if out.returncode == 0 or _EAGAIN not in err or time.monotonic() + wait > give_up:
            return out
        time.sleep(wait)
        wait = min(2 * wait, 2.0)


@dataclass
class Cluster:
    dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SLURM_CONF": str(self.dir / "etc/slurm.conf"),
            "SLURMGATE_CONFIG": str(self.dir / "etc/policy.toml"),
        }

    @property
    def policy_path(self) -> Path:
        return self.dir / "etc/policy.toml"

    @property
    def socket(self) -> str:
        return str(self.dir / "run/slurmgate.sock")

    @property
    def daemon_log(self) -> Path:
        return self.dir / "log/slurmgate.log"

    @functools.cached_property
    def slurm_version(self) -> tuple[int, int]:
        """(major, minor) of the cluster's Slurm, from ``sinfo --version``."""
        out = subprocess.run(["sinfo", "--version"], env=self.env, text=True,
                             capture_output=True, timeout=30, check=True).stdout
        m = re.search(r"(\d+)\.(\d+)", out)
        assert m, f"sinfo --version said {out!r}"
        return int(m.group(1)), int(m.group(2))

    def ctl(self, *args: str) -> str:
        out = subprocess.run(["bash", str(CLUSTER_SH), *args], env=self.env, text=True,
                             capture_output=True, timeout=180)
        assert out.returncode == 0, f"cluster.sh {' '.join(args)}: {out.stdout}\n{out.stderr}"
        return out.stdout

    def sbatch(self, user: str, *args: str | bytes, wrap: str = "true",
               tags: str | bytes | None = None) -> subprocess.CompletedProcess:
        """Submit as `user` with real sbatch; tags default to the user's valid tags."""
        comment = TAGS.get(user, "") if tags is None else tags
        argv: list[str | bytes] = ["runuser", "-u", user, "--", "sbatch", "--parsable",
                                   "-o", "/dev/null", "-t", "5"]
        if comment != "":
            argv += [b"--comment=" + comment if isinstance(comment, bytes)
                     else f"--comment={comment}"]
        argv += [*args, "--wrap", wrap]
        return subprocess.run(argv, env=self.env, cwd="/tmp", capture_output=True, timeout=60)

    def submit_ok(self, user: str, *args: str, wrap: str = "true",
                  tags: str | None = None) -> int:
        out = self.sbatch(user, *args, wrap=wrap, tags=tags)
        assert out.returncode == 0, out.stderr.decode(errors="replace")
        return int(out.stdout.decode().strip().split(";")[0])

    def jobs(self) -> dict[int, dict]:
        # 23.02+ applies --states: without --states=all finished jobs are left out
        out = subprocess.run(["squeue", "--json", "--all", "--states=all"], env=self.env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        jobs = (normalise_job(j) for j in json.loads(out.stdout)["jobs"])
        return {j["job_id"]: j for j in jobs}

    def job(self, job_id: int) -> dict | None:
        return self.jobs().get(job_id)

    def wait_state(self, job_id: int, states: set[str] | str, timeout: float = 60) -> dict:
        wanted = {states} if isinstance(states, str) else states

        def reached() -> dict | None:
            job = self.job(job_id)
            return job if job and job["job_state"] in wanted else None

        return wait_for(reached, timeout, 0.3, what=f"job {job_id} in {sorted(wanted)}")

    def scancel(self, *job_ids: int) -> None:
        if job_ids:
            subprocess.run(["scancel", *map(str, job_ids)], env=self.env, timeout=30)

    def log_events(self, event: str) -> list[dict]:
        out = []
        for line in self.daemon_log.read_text(errors="replace").splitlines():
            if f'"event": "{event}"' in line:
                out.append(json.loads(line))
        return out


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    state = Path(os.environ.get("DEVCLUSTER_DIR", REPO / ".devcluster"))
    c = Cluster(state)
    status = subprocess.run(["bash", str(CLUSTER_SH), "status"], env=c.env,
                            capture_output=True, timeout=60)
    if status.returncode != 0:
        c.ctl("start")
    return c


def daemon_call(cluster: Cluster, **req) -> dict:
    from slurm_plugin.protocol import call

    return call(cluster.socket, req, timeout=10)


class PolicyOverride:
    """Edit the running cluster's policy, reload the daemon, restore on exit."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.original = cluster.policy_path.read_text()

    def apply(self, text: str) -> None:
        before = len(self.cluster.log_events("policy_reloaded"))
        self.cluster.policy_path.write_text(text)
        self.cluster.ctl("daemon", "reload")
        wait_for(lambda: len(self.cluster.log_events("policy_reloaded")) > before, 20,
                 what="policy reload")

    def restore(self) -> None:
        self.apply(self.original)


@pytest.fixture
def policy_override(cluster: Cluster):
    override = PolicyOverride(cluster)
    yield override
    override.restore()


def render_lua(cluster: Cluster, fail_mode: str) -> None:
    """Install job_submit.lua with ``fail_mode``; slurmctld loads it on the next submission
    (it checks the file's mtime)."""
    subprocess.run([str(cluster.dir / "bin/slurmgate"), "--socket", cluster.socket, "lua",
                    "--fail-mode", fail_mode, "-o", str(cluster.dir / "etc/job_submit.lua")],
                   env=cluster.env, check=True, capture_output=True, timeout=30)


@pytest.fixture
def daemon_stopped(cluster: Cluster):
    """The cluster with the slurmgate daemon stopped; afterwards fail-open again and the
    daemon back."""
    from slurm_plugin.protocol import call

    cluster.ctl("daemon", "stop")
    try:
        yield cluster
    finally:
        render_lua(cluster, "open")
        cluster.ctl("daemon", "start")
        wait_for(lambda: call(cluster.socket, {"op": "ping"}, timeout=2)["ok"], 20,
                 what="the daemon back")


# -- the ledger on both backends --------------------------------------------------------------

@pytest.fixture
def pg_url() -> Any:
    """A fresh, empty PostgreSQL database on the session's test server (tests/postgres.py)."""
    from tests.postgres import server

    with server().database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_target(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Where a test's ledger lives, once per backend: a SQLite file, then a fresh
    PostgreSQL database. Pass it to ``open_store``."""
    if request.param == "sqlite":
        yield str(tmp_path / "ledger.db")
        return
    from tests.postgres import server

    with server().database() as url:
        yield url
