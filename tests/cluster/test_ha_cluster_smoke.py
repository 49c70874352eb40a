"""The HA dev cluster (contrib/devcluster/ha.sh): a primary and a backup slurmctld on two
controller hosts (ctl1, ctl2), each with its own slurmgate daemon behind the one socket path
that job_submit.lua names. The primary's host dies; the backup takes over, and its own
daemon decides the next submission; the primary comes back and takes control again.

The HA cluster runs beside the default one (its own state folder and ports) and is stopped at
the end. DEVCLUSTER_HA_LEDGER=sqlite (from the environment) gives each daemon a SQLite ledger
of its own instead of the shared PostgreSQL one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FINAL_STATES, REPO, Cluster
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm

CLUSTER_SH = REPO / "contrib/devcluster/cluster.sh"
HA_DIR = REPO / ".devcluster-ha"
# Beside the default cluster (6817-6819) and the chroots' (6827-6849): the HA mode's defaults.
HA_ENV = {
    "DEVCLUSTER_HA": "1",
    "DEVCLUSTER_DIR": str(HA_DIR),
    "DEVCLUSTER_CTLD_PORT": "6857",
    "DEVCLUSTER_NODE1_PORT": "6858",
    "DEVCLUSTER_NODE2_PORT": "6859",
    "DEVCLUSTER_PG_PORT": "6850",
}


@dataclass
class HACluster(Cluster):
    """The HA cluster: the default cluster's helpers, plus each controller host's files."""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, **HA_ENV}

    @property
    def ledger(self) -> str:
        return os.environ.get("DEVCLUSTER_HA_LEDGER", "postgresql")

    def host_log(self, host: str) -> Path:
        """The slurmgate daemon's log on controller host ``host`` (its $DIR/host/log)."""
        return self.dir / "hosts" / host / "log/slurmgate.log"

    def host_events(self, host: str, event: str) -> list[dict]:
        log = self.host_log(host)
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text(errors="replace").splitlines()
                if f'"event": "{event}"' in line]

    def decision(self, host: str, job_name: str) -> dict | None:
        return next((e for e in self.host_events(host, "decision")
                     if e.get("job_name") == job_name), None)

    def active(self) -> str | None:
        out = subprocess.run(["bash", str(CLUSTER_SH), "ha", "status"], env=self.env,
                             capture_output=True, text=True, timeout=120)
        m = re.search(r"^active: (\S+)$", out.stdout, re.M)
        return m.group(1) if m and m.group(1) != "none" else None


@pytest.fixture(scope="module")
def ha() -> Iterator[HACluster]:
    if os.geteuid() != 0:
        pytest.skip("the HA dev cluster needs root (namespaces, slurmctld as SlurmUser)")
    if os.environ.get("SLURMGATE_CHROOT"):
        pytest.skip("the HA dev cluster runs on the host's Slurm (its ports are the host's)")
    c = HACluster(HA_DIR)
    try:
        out = subprocess.run(["bash", str(CLUSTER_SH), "start"], env=c.env, text=True,
                             capture_output=True, timeout=600)
        assert out.returncode == 0, f"HA cluster start:\n{out.stdout}\n{out.stderr}"
        yield c
    finally:
        out = subprocess.run(["bash", str(CLUSTER_SH), "stop"], env=c.env, text=True,
                             capture_output=True, timeout=300)
        assert out.returncode == 0, f"HA cluster stop:\n{out.stdout}\n{out.stderr}"


def _name(what: str) -> str:
    return f"ha-{what}-{uuid.uuid4().hex[:8]}"


def _accepted_by(ha: HACluster, host: str, job_name: str) -> dict:
    decision = wait_for(lambda: ha.decision(host, job_name), 30, 0.2,
                        what=f"{host}'s daemon to log the decision on {job_name}")
    assert decision["verdict"] == "accept", decision
    return decision


def test_the_backup_takes_over_and_its_own_daemon_decides(ha: HACluster):
    assert wait_for(lambda: ha.active() == "ctl1", 60, 0.5, what="ctl1 in control")

    before = _name("before")
    ha.submit_ok("alice", "-J", before)
    _accepted_by(ha, "ctl1", before)
    assert ha.decision("ctl2", before) is None, "the standby's daemon decided a submission"
    if ha.ledger == "postgresql":
        wait_for(lambda: ha.host_events("ctl1", "leader_acquired"), 60, 0.5,
                 what="ctl1's daemon to lead (it started first)")

    # The primary's host dies: slurmctld and daemon SIGKILLed at once.
    out = ha.ctl("ha", "kill-primary")
    killed = float(re.search(r"killed ctl1 at ([0-9.]+)", out).group(1))

    # sbatch tries ctl1 (refused), then ctl2; while ctl2 stands by it waits and tries again.
    after = _name("after")
    submitted: list[int] = []

    def submit_after() -> bool:
        res = ha.sbatch("alice", "-J", after)
        if res.returncode == 0:
            submitted.append(int(res.stdout.decode().strip().split(";")[0]))
        return bool(submitted)

    wait_for(submit_after, 60, 0.2, what="a submission the backup accepts")
    takeover_s = time.time() - killed
    print(f"first sbatch accepted {takeover_s:.1f} s after the primary's SIGKILL")
    assert takeover_s < 30, f"the backup took {takeover_s:.1f} s"
    decision = _accepted_by(ha, "ctl2", after)
    assert decision["team"] == "vision"
    assert ha.decision("ctl1", after) is None
    assert ha.active() == "ctl2"
    # the backup schedules: the job runs on a node and completes
    job = ha.wait_state(submitted[0], FINAL_STATES, timeout=90)
    assert job["job_state"] == "COMPLETED", job
    assert job["admin_comment"].startswith("slurmgate:v2;team=vision;")
    if ha.ledger == "postgresql":
        wait_for(lambda: [e for e in ha.host_events("ctl2", "leader_acquired")
                          if e["ts"] > killed], 60, 0.5,
                 what="ctl2's daemon to take the leader lock ctl1's daemon held")

    # The primary comes back and takes control again; its daemon decides again.
    ha.ctl("ha", "start-primary")
    assert wait_for(lambda: ha.active() == "ctl1", 60, 0.5, what="ctl1 in control again")
    back = _name("back")
    ha.submit_ok("alice", "-J", back)
    _accepted_by(ha, "ctl1", back)
    assert ha.decision("ctl2", back) is None
    status = ha.ctl("ha", "status")
    assert re.search(r"^ctl2 .* standing by ", status, re.M), status
