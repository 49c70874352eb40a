"""Issue 14 point 1: `slurmgate job` on the real dev cluster (fake NVML): a finished
multi-GPU job's figures as its owner sees them match the database, progress reported with
`slurmgate ckpt save --epoch` lands in the ledger, and another user is refused without
learning whether the job exists."""

from __future__ import annotations

import json
import subprocess

import pytest

from db.store import open_store
from tests.cluster.test_accounting_e2e import settled_runs
from tests.conftest import FINAL_STATES, Cluster
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm
SLURMGATE = "/opt/slurmgate/venv/bin/slurmgate"


def as_user(cluster: Cluster, user: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", SLURMGATE, "--config",
                           str(cluster.policy_path), *args], capture_output=True, text=True,
                          timeout=30, cwd="/tmp")


def test_owner_sees_the_figures_of_a_finished_multi_gpu_job_others_are_refused(
        cluster: Cluster) -> None:
    # reports progress while it runs (the daemon keeps it for the job's owner only)
    wrap = (f"{SLURMGATE} ckpt save 1 /etc/hostname --epoch 2 --step 200; sleep 4; "
            f"{SLURMGATE} ckpt save 2 /etc/hostname --epoch 3 --step 300")
    job_id = cluster.submit_ok("alice", "--gres=gpu:a100:4", "-w", "node1", wrap=wrap)
    assert cluster.wait_state(job_id, FINAL_STATES, 120)["job_state"] == "COMPLETED"
    (run,) = settled_runs(cluster, job_id)

    def progress() -> dict | None:
        with open_store(cluster.dir / "var/slurmgate.db", readonly=True) as store:
            rows = store._query("SELECT * FROM run_progress WHERE job_id = :j", {"j": job_id})
        return rows[0] if rows and rows[0]["epoch"] == 3 else None

    row = wait_for(progress, 30, 0.5, what=f"progress of job {job_id}")
    assert row["step"] == 300

    out = as_user(cluster, "alice", "job", str(job_id), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    j = report["job"]
    assert (j["job_id"], j["user"], j["team"], j["runs"], j["state"]) == (
        job_id, "alice", "vision", 1, "COMPLETED")
    assert j["gpus"] == 4 and j["gpus_by_type"] == {"a100": 4}
    assert j["cost"] == pytest.approx(run["cost"], abs=1e-6)
    for key in ("cost_gpu", "cost_cpu", "cost_mem", "cost_energy", "cost_idle", "credit"):
        assert j[key] == pytest.approx(run[key] or 0.0, abs=1e-6), key
    assert j["gpu_seconds"] == pytest.approx(run["gpu_seconds"])
    assert j["busy_gpu_seconds"] == pytest.approx(run["gpu_seconds"] * run["util_mean"] / 100)
    per_gpu = [g for n in run["node_rows"] for g in json.loads(n["gpus"])]
    assert sorted(g["util_mean"] for g in j["per_gpu"]) == sorted(g["util_mean"]
                                                                   for g in per_gpu)
    assert j["epochs"] == 3 and j["steps"] == 300
    assert report["budget"]["team"] == "vision"
    text = as_user(cluster, "alice", "job", str(job_id))
    assert text.returncode == 0 and f"Job {job_id} on cluster" in text.stdout
    # carol leads vision: she may read it; bob (nlp) and mallory (no team) may not
    assert as_user(cluster, "carol", "job", str(job_id), "--json").returncode == 0
    for other in ("bob", "mallory"):
        refused = as_user(cluster, other, "job", str(job_id))
        assert refused.returncode != 0
        assert f"job {job_id}: not found among your jobs" in refused.stderr
        assert "alice" not in refused.stderr and "vision" not in refused.stderr
    missing = as_user(cluster, "bob", "job", "4000000000")
    assert missing.stderr.replace("4000000000", str(job_id)) == refused.stderr
    bad = as_user(cluster, "bob", "job", "12_x")
    assert bad.returncode != 0 and "is not a job id" in bad.stderr
