"""Helpers for the hostile-user suite: act as a researcher, watch the daemon, count what changed.

Everything here drives the real dev cluster (marked ``slurm``) with production permissions:
slurmctld and the daemon run as ``slurm``, Prolog/Epilog as root, attackers as ``mallory``
(no team) or a team member acting against another team.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Cluster
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
