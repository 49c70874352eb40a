"""Helpers for the hostile-user suite: act as a researcher, watch the daemon, count what changed.

Everything here drives the real dev cluster (marked ``slurm``) with production permissions:
slurmctld and the daemon run as ``slurm``, Prolog/Epilog as root, attackers as ``mallory``
(no team) or a team member acting against another team.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, Cluster, render_lua, scontrol_retry
from tests.waiting import wait_for

PYTHON = sys.executable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/hostile/" in str(item.path):
            item.add_marker(pytest.mark.slurm)


def as_user(user: str, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as ``user`` (a real, unprivileged uid) with this checkout on the path."""
    return subprocess.run(["runuser", "-u", user, "--", PYTHON, "-c", code], cwd="/tmp",
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
                               "HOME": "/tmp", "SLURM_CONF": os.environ.get("SLURM_CONF", "")},
                          capture_output=True, text=True, timeout=timeout)


def daemon_alive(cluster: Cluster) -> bool:
    from slurm_plugin.protocol import call

    try:
        return bool(call(cluster.socket, {"op": "ping"}, timeout=2).get("ok"))
    except Exception:
        return False


PRIVILEGED = ("requeue", "drain", "credit", "hold", "exclude")
"""Event kinds that record a privileged action the daemon took."""


def privileged_actions(cluster: Cluster) -> dict[str, int]:
    from db.store import open_store

    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        return {kind: store.event_count(kind) for kind in PRIVILEGED}
    finally:
        store.close()


def spend(cluster: Cluster) -> dict[str, tuple[float, float]]:
    """Team -> (spent, reserved), as the daemon's ledger has it (asked as root)."""
    from slurm_plugin.protocol import call

    resp = call(cluster.socket, {"op": "quota"}, timeout=10)
    assert resp["ok"], resp
    return {r["team"]: (r["spent"], r["reserved"]) for r in resp["teams"]}


def runs_of(cluster: Cluster, job_id: int) -> list[dict]:
    from db.store import open_store

    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        return store.runs_of_job(cluster_name(cluster), job_id)
    finally:
        store.close()


def cluster_name(cluster: Cluster) -> str:
    from policies.config import load_policy

    return load_policy(cluster.policy_path).daemon.cluster


def quarantined(cluster: Cluster) -> dict[str, str]:
    """File name -> reason text for everything in the spool's quarantine."""
    q = cluster.dir / "spool/quarantine"
    out = {}
    for p in q.iterdir():
        if p.name.endswith(".reason"):
            out[p.name[: -len(".reason")]] = p.read_text(errors="replace")
    return out


def wait_quarantined(cluster: Cluster, name: str, timeout: float = 30) -> str:
    from slurm_plugin.protocol import call

    def found() -> str | None:
        call(cluster.socket, {"op": "nudge"}, timeout=2)
        return next((r for n, r in quarantined(cluster).items() if n.startswith(name)), None)

    return wait_for(found, timeout, 0.3, what=f"{name} quarantined")


def move_in(src: Path, dest_dir: Path) -> Path:
    """Put a file into a spool directory keeping its owner, as a mis-set mode would let a user
    do (root does the move; the file stays the user's)."""
    dest = dest_dir / src.name
    os.rename(src, dest) if src.stat().st_dev == dest_dir.stat().st_dev else \
        subprocess.run(["mv", str(src), str(dest)], check=True)
    return dest


def json_line(record: dict) -> bytes:
    return json.dumps(record).encode() + b"\n"


__all__ = ["as_user", "cluster_name", "daemon_alive", "json_line", "move_in",
           "privileged_actions", "quarantined", "runs_of", "spend", "wait_for",
           "wait_quarantined"]


# -- the submission path: reservations, the ledger, jobs made by a test ------------------------


def spawn_as(user: str, code: str) -> subprocess.Popen[str]:
    """Start Python ``code`` as ``user`` in the background (stdin and stdout are pipes: the
    code may report on stdout and wait for stdin to close)."""
    return subprocess.Popen(["runuser", "-u", user, "--", PYTHON, "-c", code], cwd="/tmp",
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                 "PYTHONPATH": str(REPO), "HOME": "/tmp",
                                 "SLURM_CONF": os.environ.get("SLURM_CONF", "")},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def live_reservations(cluster: Cluster) -> list[dict]:
    """The database's reserved and bound reservations (with ``charged``: what runs already
    settled against them cost)."""
    from db.store import open_store

    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        return store.live_reservations()
    finally:
        store.close()


def reservation(cluster: Cluster, rid: str) -> dict | None:
    from db.store import open_store

    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        return store.reservation(rid)
    finally:
        store.close()


def reservation_count(cluster: Cluster) -> int:
    """Reservations ever made (any state)."""
    from db.store import open_store

    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        return int(store.conn.execute("SELECT count(*) FROM reservations").fetchone()[0])
    finally:
        store.close()


def events_of(cluster: Cluster, kind: str, job_id: int | None = None) -> list[dict]:
    """Events of ``kind`` in the database (newest first), for one job if given."""
    from db.reports import events
    from db.store import open_store

    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        return events(store, [kind], job_id=job_id)
    finally:
        store.close()


def _forgotten_lately(cluster: Cluster, job_id: int, now: float, grace: float) -> bool:
    """Whether the job's last run ended in a state Slurm may requeue from, within MinJobAge
    plus ``grace`` of now (the daemon keeps such a reservation until the job has vanished)."""
    from policies.reservations import REQUEUE_STATES

    runs = runs_of(cluster, job_id)
    if not runs or runs[-1]["state"] not in REQUEUE_STATES or runs[-1]["end_ts"] is None:
        return False
    conf = (cluster.dir / "etc/slurm.conf").read_text()
    m = re.search(r"^MinJobAge=(\d+)", conf, re.M)
    min_job_age = int(m.group(1)) if m else 300
    return now - runs[-1]["end_ts"] <= min_job_age + grace


def ledger_problems(cluster: Cluster) -> list[str]:
    """What breaks the ledger invariant now (empty: it holds).

    1. Every live reservation belongs to a job Slurm still lists: bound to a job id (or array
       job id) in ``squeue --json``; or unbound and named by a listed job's admin comment (the
       reconcile has not bound it yet); or unbound and young (within the reconcile grace plus
       a few passes: a submission Slurm has not listed yet, or one it dropped, which the
       reconcile releases after the grace); or bound to a job whose last run ended in a state
       Slurm may requeue from (NODE_FAIL, PREEMPTED ...: the reservation stays live for the
       next run) no longer ago than Slurm's MinJobAge plus that grace (Slurm forgets the job
       after MinJobAge, the reconcile releases it a grace later). The grace counts from the
       reservation's creation or from the daemon's start, whichever is later: a daemon that
       restarts cannot know how long a job has been gone, and waits a whole grace again (its
       documented rule).
    2. Per team, what the database's live reservations still hold (est_cost less what runs
       already settled against them cost: the daemon's own rule) equals the daemon's
       ``quota`` "reserved" (asked as root), within 1e-6.
    """
    from policies.config import load_policy
    from policies.reservations import vanished_grace
    from policies.tags import parse_admin_comment

    every = load_policy(cluster.policy_path).daemon.reconcile_seconds
    young = vanished_grace(every) + 3 * every + 5
    live = live_reservations(cluster)
    jobs = cluster.jobs().values()
    listed = {j["job_id"] for j in jobs} | {j["array_job_id"] for j in jobs if j["array_job_id"]}
    named = {parse_admin_comment(j["admin_comment"]).get("rid") for j in jobs}
    now = time.time()
    from slurm_plugin.protocol import call

    started = now - float(call(cluster.socket, {"op": "ping"}, timeout=10)["uptime"])
    problems = []
    held: dict[str, float] = {}
    for r in live:
        what = f"reservation {r['rid']} (team {r['team']}, {r['est_cost']:.2f})"
        if r["job_id"] is not None and r["job_id"] not in listed \
                and not _forgotten_lately(cluster, r["job_id"], now, young):
            problems.append(f"{what} is bound to job {r['job_id']}, which Slurm no longer "
                            "lists")
        elif r["job_id"] is None and r["rid"] not in named and \
                now - max(r["created_at"], started) > young:
            problems.append(f"{what} is bound to no job, no job names it, and it is "
                            f"{now - r['created_at']:.0f} s old")
        team = r["team"] or ""
        held[team] = held.get(team, 0.0) + max(0.0, r["est_cost"] - r["charged"])
    quota = {team: reserved for team, (_, reserved) in spend(cluster).items()}
    for team in sorted(set(held) | set(quota)):
        if abs(held.get(team, 0.0) - quota.get(team, 0.0)) > 1e-6:
            problems.append(f"team {team or '(none)'}: the database holds "
                            f"{held.get(team, 0.0):.6f} in live reservations, the daemon's "
                            f"quota says {quota.get(team, 0.0):.6f} reserved")
    return problems


def ledger_invariant(cluster: Cluster, timeout: float = 30) -> None:
    """Fail unless the ledger invariant (``ledger_problems``) holds within ``timeout``
    seconds (a reconcile pass or an ingest batch may be between two reads)."""
    problems: list[str] = []

    def holds() -> bool:
        problems[:] = ledger_problems(cluster)
        return not problems

    try:
        wait_for(holds, timeout, 0.5, what="the ledger invariant")
    except AssertionError:
        raise AssertionError("ledger invariant broken: " + "; ".join(problems)) from None


@pytest.fixture
def ledger_checked(cluster: Cluster):
    """After the test (and after its other fixtures are torn down): the daemon is alive and
    the ledger invariant holds."""
    yield
    wait_for(lambda: daemon_alive(cluster), 20, 0.5, what="the daemon answering root's ping")
    ledger_invariant(cluster)


class Submitted:
    """Jobs a test makes, cancelled when it ends."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.ids: list[int] = []

    def ok(self, user: str, *args: str | bytes, wrap: str = "true",
           tags: str | bytes | None = None) -> tuple[int, str]:
        """Submit; assert sbatch accepted it. Returns the job id and sbatch's stderr."""
        out = self.cluster.sbatch(user, *args, wrap=wrap, tags=tags)
        err = out.stderr.decode(errors="replace")
        assert out.returncode == 0, err
        return self.add(int(out.stdout.decode().strip().split(";")[0])), err

    def add(self, job_id: int) -> int:
        self.ids.append(job_id)
        return job_id

    def cancel(self) -> None:
        self.cluster.scancel(*self.ids)


@pytest.fixture
def submitted(cluster: Cluster):
    jobs = Submitted(cluster)
    yield jobs
    jobs.cancel()


def scontrol_as(cluster: Cluster, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``scontrol ARGS`` as ``user`` (again on EAGAIN, see ``scontrol_retry``)."""
    return scontrol_retry(["runuser", "-u", user, "--", "scontrol", *args], cluster.env,
                          cwd="/tmp")


__all__ += ["Submitted", "render_lua", "events_of", "ledger_invariant", "ledger_problems",
            "live_reservations", "reservation", "reservation_count",
            "scontrol_as", "spawn_as"]
