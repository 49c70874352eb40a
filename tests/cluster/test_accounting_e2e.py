"""Issue: per-run GPU accounting from real jobs on the dev cluster (fake NVML backend)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from db.store import open_store
from slurm_plugin.node.spool import write_record
from tests.conftest import FINAL_STATES, Cluster, scontrol_retry
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm
RATES = {"a100": 2.50, "h100": 4.00}
CPU_HOUR, KWH = 0.02, 0.15


def settled_runs(cluster: Cluster, job_id: int, n: int = 1, timeout: float = 60) -> list[dict]:
    def ready():
        store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
        try:
            runs = store._query("SELECT * FROM runs WHERE job_id = :j ORDER BY restart_count",
                                {"j": job_id})
            nodes = store._query("SELECT * FROM run_nodes WHERE job_id = :j ORDER BY node",
                                 {"j": job_id})
        finally:
            store.close()
        # settled, and matched to the job's reservation (team, tags and request from submit)
        if len(runs) >= n and all(r["cost"] is not None and r["rid"] for r in runs):
            for r in runs:
                r["node_rows"] = [x for x in nodes if x["restart_count"] == r["restart_count"]]
            return runs
        return None

    return wait_for(ready, timeout, 0.5, what=f"{n} settled run(s) of job {job_id}")


def expected_cost(run: dict) -> float:
    by_type: dict[str, float] = {}
    for node in run["node_rows"]:
        for gpu in json.loads(node["gpus"]):
            by_type[gpu["gpu_type"]] = by_type.get(gpu["gpu_type"], 0.0) + gpu["gpu_seconds"]
    elapsed_h = (run["end_ts"] - run["start_ts"]) / 3600
    gpu = sum(RATES[t] * s / 3600 for t, s in by_type.items())
    return gpu + run["cpus"] * elapsed_h * CPU_HOUR + (run["energy_j"] or 0) / 3.6e6 * KWH


def test_two_gpu_job_on_node1_is_recorded_and_priced(cluster: Cluster):
    job_id = cluster.submit_ok("alice", "--gres=gpu:a100:2", "-w", "node1", wrap="sleep 4")
    job = cluster.wait_state(job_id, FINAL_STATES, 90)
    assert job["job_state"] == "COMPLETED"
    (run,) = settled_runs(cluster, job_id)
    assert (run["gpus"], run["gpu_type"], run["nodes"], run["state"]) == (2, "a100", "node1",
                                                                          "COMPLETED")
    assert run["team"] == "vision" and run["project"] == "vit-scaling"
    elapsed = run["end_ts"] - run["start_ts"]
    assert 3.5 <= elapsed <= 30
    (node,) = run["node_rows"]
    assert node["gpu_count"] == 2
    gpus = json.loads(node["gpus"])
    assert sorted(g["index"] for g in gpus) == [0, 1] or len({g["uuid"] for g in gpus}) == 2
    assert run["gpu_seconds"] == pytest.approx(2 * (node["end_ts"] - node["start_ts"]), rel=0.05)
    # fake node1 GPUs draw 310 W each
    assert run["energy_j"] == pytest.approx(310 * run["gpu_seconds"], rel=0.1)
    assert run["cost"] == pytest.approx(expected_cost(run), abs=1e-4)


def test_two_node_job_records_both_nodes_and_both_gpu_types(cluster: Cluster):
    job_id = cluster.submit_ok("bob", "-N", "2", "--gres=gpu:2", wrap="sleep 4")
    job = cluster.wait_state(job_id, FINAL_STATES, 90)
    assert job["job_state"] == "COMPLETED"
    (run,) = settled_runs(cluster, job_id)
    assert run["nodes"] == "node[1-2]" and run["node_count"] == 2
    assert [n["node"] for n in run["node_rows"]] == ["node1", "node2"]
    types = {g["gpu_type"] for n in run["node_rows"] for g in json.loads(n["gpus"])}
    assert types == {"a100", "h100"}
    assert sum(n["gpu_count"] for n in run["node_rows"]) == 4
    energy = {n["node"]: n["energy_j"] / n["gpu_seconds"] for n in run["node_rows"]}
    assert energy["node1"] == pytest.approx(310, rel=0.1)
    assert energy["node2"] == pytest.approx(520, rel=0.1)
    assert run["cost"] == pytest.approx(expected_cost(run), abs=1e-4)


def test_requeued_job_is_a_second_run_with_the_same_job_id(cluster: Cluster):
    job_id = cluster.submit_ok("alice", "--gres=gpu:1", wrap="sleep 6")
    cluster.wait_state(job_id, "RUNNING", 60)
    subprocess.run(["scontrol", "requeue", str(job_id)], env=cluster.env, check=True,
                   timeout=30)
    wait_for(lambda: (j := cluster.job(job_id)) and j["restart_cnt"] == 1
             and j["job_state"] == "PENDING", 30, 0.5, what="requeued and pending")
    # the first run's Epilog and completion are through before the job may start again
    # (started at once on the same node, slurmd may still refuse the job's credential)
    (first,) = settled_runs(cluster, job_id, n=1, timeout=60)
    wait_for(lambda: subprocess.run(
        ["sinfo", "-h", "-n", first["nodes"], "-o", "%T"], env=cluster.env,
        capture_output=True, text=True, timeout=30).stdout.strip() == "idle", 30, 0.3,
        what="the first run's node idle again")
    # slurmd refuses a credential made in the same whole second as the revocation of the
    # job's previous one ("Job credential revoked"): start in the next second at the earliest
    next_second = int(time.time()) + 1.05
    wait_for(lambda: time.time() >= next_second, 5, 0.05, what="the next wall-clock second")
    started = scontrol_retry(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                             cluster.env)
    assert started.returncode == 0, started.stderr
    cluster.wait_state(job_id, FINAL_STATES, 120)
    runs = settled_runs(cluster, job_id, n=2, timeout=90)
    assert [r["restart_count"] for r in runs] == [0, 1]
    assert runs[0]["state"] == "REQUEUED" and runs[1]["state"] == "COMPLETED"
    assert runs[0]["end_ts"] <= runs[1]["start_ts"]
    assert runs[0]["credit"] == 0 and runs[1]["credit"] == 0  # an admin's requeue: no credit
    # Slurm 22.05 may skip the Prolog of a requeued job on the same node: without node
    # facts the run is charged from its allocation x elapsed, never at zero
    rerun = runs[1]
    elapsed = rerun["end_ts"] - rerun["start_ts"]
    assert rerun["gpu_seconds"] == pytest.approx(rerun["gpus"] * elapsed, rel=0.25)
    assert rerun["cost"] > 0


def test_daemon_killed_while_jobs_finish_loses_nothing_and_counts_nothing_twice(
        cluster: Cluster):
    pid = int((cluster.dir / "run/slurmgate.pid").read_text())
    jobs = [cluster.submit_ok("bob", "--gres=gpu:1", wrap="sleep 2") for _ in range(3)]
    os.kill(pid, signal.SIGKILL)
    try:
        for job_id in jobs:
            cluster.wait_state(job_id, FINAL_STATES, 90)
        spool = cluster.dir / "spool"
        wait_for(lambda: len([p for sub in ("node", "ctld")
                              for p in (spool / sub).glob("*.json")]) >= 6, 30, 0.5,
                 what="records waiting in the spool")
    finally:
        cluster.ctl("daemon", "start")
    for job_id in jobs:
        (run,) = settled_runs(cluster, job_id)
        assert len(run["node_rows"]) == 1 and run["state"] == "COMPLETED"
    wait_for(lambda: not [p for sub in ("node", "ctld")
                          for p in (cluster.dir / "spool" / sub).glob("*.json")], 30, 0.5,
             what="spool drained")
    # ingesting the same records again changes nothing
    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        counts = store._query(
            "SELECT job_id, count(*) AS n FROM runs WHERE job_id IN (:a, :b, :c) "
            "GROUP BY job_id ORDER BY job_id", dict(zip("abc", jobs, strict=True)))
    finally:
        store.close()
    assert [c["n"] for c in counts] == [1, 1, 1]


def test_a_corrupted_spool_record_is_quarantined_and_the_rest_ingest(cluster: Cluster):
    spool = cluster.dir / "spool"
    bad = spool / "ctld" / "jobcomp.slurmgate-dev.999999.0.ctl.deadbeef.json"
    bad.write_text('{"v": 1, "kind": "jobcomp", "job_id": "not-a-number",')
    good = write_record(spool, {"kind": "gpu_sample", "cluster": "slurmgate-dev",
                                "node": "node1", "ts": 1_700_000_000.0,
                                "gpus": [{"uuid": "GPU-test-q", "index": 0, "gpu_type": "a100",
                                          "util": 55.0, "mem_used_bytes": 1024,
                                          "power_w": 100.0}]})
    subprocess.run(["/opt/slurmgate/venv/bin/python", "-c",
                    "import sys; from slurm_plugin.node.spool import nudge_daemon; "
                    "nudge_daemon(sys.argv[1], 1.0)", cluster.socket], timeout=30)
    quarantined = spool / "quarantine" / bad.name
    wait_for(lambda: quarantined.exists() and not good.exists(), 30, 0.3,
             what="bad record quarantined, good one ingested")
    reason = (spool / "quarantine" / (bad.name + ".reason")).read_text()
    assert "JSON" in reason or "json" in reason
    assert any(bad.name in e["file"] for e in cluster.log_events("quarantined"))
    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        rows = store._query("SELECT util FROM gpu_samples WHERE gpu_uuid = 'GPU-test-q'")
        events = store._query("SELECT message FROM events WHERE kind = 'quarantine'")
    finally:
        store.close()
    assert rows == [{"util": 55.0}]
    assert any(bad.name in e["message"] for e in events)


def test_node_agent_samples_land_in_sqlite(cluster: Cluster):
    out = subprocess.run(["/opt/slurmgate/venv/bin/slurmgate", "agent", "--node", "node2",
                          "--once"], env=cluster.env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr

    def samples():
        store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
        try:
            return store._query("SELECT count(DISTINCT gpu_uuid) AS n FROM gpu_samples "
                               "WHERE node = 'node2' AND ts > :since",
                               {"since": time.time() - 60})[0]["n"]
        finally:
            store.close()

    assert wait_for(lambda: samples() == 4 and samples(), 30, 0.5, what="4 GPUs sampled") == 4


def test_reconcile_finds_a_lost_completion_record_and_repairs_it(cluster: Cluster):
    job_id = cluster.submit_ok("bob", "--gres=gpu:1", wrap="sleep 3")
    pid = int((cluster.dir / "run/slurmgate.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    try:
        cluster.wait_state(job_id, FINAL_STATES, 90)
        spool = cluster.dir / "spool"
        lost = wait_for(lambda: list(spool.glob(f"ctld/jobcomp.*.{job_id}.*.json")), 30, 0.3,
                        what="jobcomp record in the spool")
        for path in lost:
            path.unlink()  # the completion record is lost; the node record is not
    finally:
        cluster.ctl("daemon", "start")
    sg = ["/opt/slurmgate/venv/bin/slurmgate"]

    def gaps():
        out = subprocess.run([*sg, "reconcile", "--json"], env=cluster.env,
                             capture_output=True, text=True, timeout=60)
        found = json.loads(out.stdout)["gaps"]["jobs_not_recorded"]
        return [g for g in found if g["job_id"] == job_id]

    assert wait_for(gaps, 60, 1, what="the gap reported")[0]["state"] == "COMPLETED"
    fix = subprocess.run([*sg, "reconcile", "--repair"], env=cluster.env, capture_output=True,
                         text=True, timeout=60)
    assert fix.returncode == 0, fix.stderr
    (run,) = settled_runs(cluster, job_id)
    assert run["state"] == "COMPLETED" and run["team"] == "nlp"
    assert not gaps()
