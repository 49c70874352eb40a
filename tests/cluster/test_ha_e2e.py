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
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from db.store import Store, open_store
from tests.conftest import FINAL_STATES, REPO, Cluster
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="the HA dev cluster needs root (namespaces, slurmctld as SlurmUser)"),
    pytest.mark.skipif(bool(os.environ.get("SLURMGATE_CHROOT")),
                       reason="the HA dev cluster runs on the host's Slurm (its ports are the "
                              "host's)"),
]
SHARED_LEDGER = os.environ.get("DEVCLUSTER_HA_LEDGER", "postgresql") == "postgresql"

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


SUBMISSIONS = 200
KILL_AFTER = 60
RUN_EVERY = 20
"""Of the 200 jobs, every 20th runs (and is charged); the rest are held (reserved only)."""


def _ledger(ha: HACluster) -> Store:
    url = (ha.dir / "etc" / "ledger.url").read_text().strip()
    return open_store(url, readonly=True)


@pytest.mark.skipif(not SHARED_LEDGER,
                    reason="one ledger for both controllers needs the PostgreSQL one")
def test_200_submissions_across_a_primary_kill_are_each_decided_and_reserved_once(
        ha: HACluster) -> None:
    if ha.active() != "ctl1":
        ha.ctl("ha", "start-primary")
    assert wait_for(lambda: ha.active() == "ctl1", 60, 0.5, what="ctl1 in control")
    tag = uuid.uuid4().hex[:6]
    accepted: dict[int, str] = {}
    number: dict[int, int] = {}  # job id -> which of the 200 submissions it is
    slurm_errors: list[tuple[str, float, str]] = []
    killed_at: list[float] = []

    def submit(n: int) -> None:
        """sbatch as a user's script would: a Slurm communication error (the controller died
        under the request) is tried again under a new name, as the user would resubmit."""
        held = [] if n % RUN_EVERY == 0 else ["--hold"]
        for attempt in range(5):
            name = f"ha200-{tag}-{n}" + (f"-r{attempt}" if attempt else "")
            res = ha.sbatch("alice", "-J", name, *held)
            if res.returncode == 0:
                job_id = int(res.stdout.decode().strip().split(";")[0])
                accepted[job_id], number[job_id] = name, n
                return
            err = res.stderr.decode(errors="replace").strip()
            assert "slurmgate" not in err, f"{name} rejected by slurmgate: {err}"
            slurm_errors.append((name, time.time(), err[-200:]))
        raise AssertionError(f"submission {n} failed 5 times: {slurm_errors[-1]}")

    killer = None
    for n in range(SUBMISSIONS):  # one submitter, as a user's loop of sbatch calls would be
        if n == KILL_AFTER:  # the primary's host dies while submissions keep coming
            def kill() -> None:
                out = ha.ctl("ha", "kill-primary")
                killed_at.append(float(re.search(r"killed ctl1 at ([0-9.]+)", out).group(1)))

            killer = threading.Thread(target=kill)
            killer.start()
        submit(n)
    assert killer is not None
    killer.join(60)
    assert killed_at and ha.active() == "ctl2"
    assert len(accepted) == SUBMISSIONS
    # the only failures were Slurm's own, while it failed over
    print(f"sbatch errors during the failover: {slurm_errors}")
    assert all(abs(ts - killed_at[0]) < 30 for _, ts, _ in slurm_errors), slurm_errors
    tried = set(accepted.values()) | {name for name, _, _ in slurm_errors}

    # the shim never fell back on its fail mode: open or closed, nothing was left to it
    for host in ("ctl1", "ctl2"):
        ctld_log = (ha.dir / "hosts" / host / "log" / "slurmctld.log").read_text(errors="replace")
        assert "policy daemon unavailable" not in ctld_log, host
    # Slurm's own loss: slurmctld saves job_state every few seconds, so the jobs the primary
    # accepted since its last save are gone with it (the backup logs "Vestigial state files")
    jobs = ha.jobs()
    ours = {j: jobs[j] for j in accepted if j in jobs}
    lost = sorted(set(accepted) - set(ours))
    print(f"{len(lost)} of {SUBMISSIONS} accepted jobs lost by slurmctld's crash: {lost[:5]}...")
    # every job Slurm kept was decided by a daemon (none unchecked)
    rids: dict[int, str] = {}
    for job_id, job in ours.items():
        comment = job["admin_comment"]
        assert comment.startswith("slurmgate:v2;team=vision;"), (job_id, comment)
        assert "unchecked" not in comment
        rids[job_id] = re.search(r"rid=(r[0-9a-f]+)", comment).group(1)
    decisions = [e for host in ("ctl1", "ctl2") for e in ha.host_events(host, "decision")
                 if str(e.get("job_name", "")).startswith(f"ha200-{tag}-")]
    names = [e["job_name"] for e in decisions]
    assert len(names) == len(set(names)), "a submission was decided twice"
    assert set(accepted.values()) <= set(names) <= tried
    assert all(e["verdict"] == "accept" for e in decisions)
    assert {e["job_name"] for e in ha.host_events("ctl2", "decision")} & set(accepted.values())

    # the ledger: exactly one reservation per decision, none doubled, none lost
    def ours_in_ledger() -> list[dict]:
        with _ledger(ha) as store:
            return store.conn.query(
                "SELECT rid, job_id, state, est_cost FROM reservations WHERE created_at >= :t0 "
                "AND rid IN (" + ", ".join(f"'{e['rid']}'" for e in decisions if e.get("rid"))
                + ")", {"t0": min(killed_at) - 900})

    assert all(e.get("rid") for e in decisions)
    resv = ours_in_ledger()
    assert len(resv) == len(decisions) and len({r["rid"] for r in resv}) == len(decisions)
    assert set(rids.values()) <= {r["rid"] for r in resv}
    # the reservations of decided jobs Slurm does not have (lost in its crash, or decided
    # just before the controller died under the sbatch)
    gone = {r["rid"] for r in resv} - set(rids.values())
    assert len(gone) == len(decisions) - len(rids)

    # the running jobs finish on the backup, each charged once against its reservation
    runners = [j for j in accepted if j in ours and number[j] % RUN_EVERY == 0]
    for job_id in runners:
        ha.wait_state(job_id, FINAL_STATES, timeout=180)
    held = [j for j in ours if j not in runners]
    ha.scancel(*held)

    def settled() -> bool:
        with _ledger(ha) as store:
            runs = store.conn.query(
                "SELECT job_id, count(*) AS n, count(cost) AS priced FROM runs "
                "WHERE job_id IN (" + ", ".join(str(j) for j in runners) + ") GROUP BY job_id")
            live = store.conn.scalar(
                "SELECT count(*) FROM reservations WHERE state IN ('reserved', 'bound') "
                "AND rid IN (" + ", ".join(f"'{r}'" for r in rids.values()) + ")")
        return len(runs) == len(runners) and all(r["n"] == 1 == r["priced"] for r in runs) \
            and live == 0

    wait_for(settled, 180, 1.0, what="every run charged once and every reservation closed")
    # the lost jobs' reservations hold no money for ever: the reconcile pass releases them
    # once they have been missing from Slurm for the vanished grace (120 s)
    wait_for(lambda: all(r["state"] == "released" for r in ours_in_ledger()
                         if r["rid"] in gone), 300, 2.0,
             what="the reservations of the jobs Slurm lost to be released")
    with _ledger(ha) as store:
        spent = store.conn.query(
            "SELECT r.rid, r.state, u.cost FROM reservations r JOIN runs u ON u.rid = r.rid "
            "WHERE r.rid IN (" + ", ".join(f"'{rids[j]}'" for j in runners) + ")")
    assert len(spent) == len(runners) and all(s["state"] == "settled" for s in spent)
    assert all(s["cost"] > 0 for s in spent)
    ha.ctl("ha", "start-primary")
    assert wait_for(lambda: ha.active() == "ctl1", 60, 0.5, what="ctl1 in control again")
