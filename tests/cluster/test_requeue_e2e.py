"""Issue: requeue with checkpoints on real node failures and preemption on the dev cluster.

The tests run in order and share one policy with node draining off, except where a test
turns it on; every test leaves both nodes up and in service.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from db.interruptions import failure_metrics
from db.store import open_store
from tests.conftest import FINAL_STATES, REPO, Cluster, PolicyOverride
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm
SLURMGATE = "/opt/slurmgate/venv/bin/slurmgate"
TRAIN = REPO / "contrib/examples/train_bash.sbatch"
CKPT_ROOT = Path("/var/tmp/slurmgate-ckpt")


def set_requeue(override: PolicyOverride, **values) -> None:
    text = override.original
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    override.apply(text)


@pytest.fixture(scope="module")
def failure_policy(cluster: Cluster):
    override = PolicyOverride(cluster)
    set_requeue(override, drain_after_failures=0)
    yield override
    override.restore()


@pytest.fixture
def nodes_back(cluster: Cluster):
    """Whatever a test breaks, both nodes end up running and in service."""
    yield
    cluster.ctl("start")  # restarts a killed slurmd; a no-op otherwise
    for node in ("node1", "node2"):
        state = node_state(cluster, node)
        if "drain" in state or "down" in state:
            subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"],
                           env=cluster.env, capture_output=True, timeout=30)
    wait_for(lambda: all(node_state(cluster, n) in ("idle", "mixed", "allocated")
                         for n in ("node1", "node2")), 90, 0.5, what="nodes back in service")


def node_state(cluster: Cluster, node: str) -> str:
    out = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], env=cluster.env,
                         capture_output=True, text=True, timeout=30)
    states = {line.strip().lower() for line in out.stdout.splitlines() if line.strip()}
    return ",".join(sorted(states))


def submit_training(cluster: Cluster, name: str, *extra: str, steps: int = 40,
                    user: str = "alice") -> tuple[int, Path]:
    out_file = Path(f"/tmp/{name}.out")
    out_file.unlink(missing_ok=True)
    argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", "-J", name, "-o", str(out_file),
            f"--export=ALL,SLURMGATE={SLURMGATE},TOTAL_STEPS={steps},STEP_SECONDS=1",
            *extra, str(TRAIN)]
    out = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=30,
                         cwd="/tmp")
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip()), out_file


def ckpt_step(user_dir: Path) -> int:
    """The job's last complete step, read as the job's owner (ROOT/team/USER/name): the
    checkpoint library opens only directories that are the caller's own."""
    owner = user_dir.parent.name
    latest = subprocess.run(["runuser", "-u", owner, "--", SLURMGATE, "ckpt", "--dir",
                             str(user_dir), "latest", "--step"], cwd="/tmp",
                            capture_output=True, text=True, timeout=30)
    return int(latest.stdout.strip()) if latest.returncode == 0 else -1


def scontrol_job(cluster: Cluster, job_id: int) -> str:
    return subprocess.run(["scontrol", "show", "job", str(job_id)], env=cluster.env,
                          capture_output=True, text=True, timeout=30).stdout


def events(cluster: Cluster, kind: str, job_id: int | None = None) -> list[dict]:
    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        sql, params = "SELECT * FROM events WHERE kind = :kind", {"kind": kind, "j": job_id}
        if job_id is not None:
            sql += " AND job_id = :j"
        return store._query(sql + " ORDER BY ts", params)
    finally:
        store.close()


def runs_of(cluster: Cluster, job_id: int) -> list[dict]:
    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        return store._query("SELECT * FROM runs WHERE job_id = :j ORDER BY restart_count",
                            {"j": job_id})
    finally:
        store.close()


def start_on(cluster: Cluster, node: str, other: str, name: str, *extra: str,
             steps: int = 40) -> tuple[int, Path]:
    """Submit a training job that lands on `node` (the other node is drained meanwhile)."""
    subprocess.run(["scontrol", "update", f"NodeName={other}", "State=DRAIN",
                    "Reason=test-placement"], env=cluster.env, check=True, timeout=30)
    try:
        job_id, out = submit_training(cluster, name, *extra, steps=steps)
        job = cluster.wait_state(job_id, "RUNNING", 60)
        assert job["nodes"] == node
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={other}", "State=RESUME"],
                       env=cluster.env, check=True, timeout=30)
    return job_id, out


def kill_node(cluster: Cluster, node: str, job_id: int) -> float:
    """Simulate the node dying under the job: kill -9 its slurmd and the job's processes
    there (slurmstepd and the tasks would otherwise run on as a ghost of the failed run)."""
    os.kill(int((cluster.dir / f"run/slurmd-{node}.pid").read_text()), signal.SIGKILL)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if (b"slurmstepd" in cmdline and f"[{job_id}.".encode() in cmdline) or \
                f"SLURM_JOB_ID={job_id}\0".encode() in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
    return time.time()


def test_kill_9_slurmd_requeues_on_the_other_node_from_the_checkpoint(
        cluster: Cluster, failure_policy, nodes_back):
    name = "kill9-" + uuid.uuid4().hex[:8]
    job_id, out = start_on(cluster, "node1", "node2", name, "--gres=gpu:1")
    user_dir = CKPT_ROOT / "vision/alice" / name
    wait_for(lambda: ckpt_step(user_dir) >= 3, 60, 0.5, what="checkpoint at step 3")
    killed_at = kill_node(cluster, "node1", job_id)
    wait_for(lambda: "down" in node_state(cluster, "node1"), 90, 1, what="node1 DOWN")
    step_at_failure = ckpt_step(user_dir)
    job = wait_for(lambda: (j := cluster.job(job_id)) and j["restart_cnt"] >= 1
                   and j["job_state"] == "RUNNING" and j, 180, 1, what="requeued run running")
    assert job["nodes"] == "node2"
    assert "ExcNodeList=node1" in scontrol_job(cluster, job_id)
    cluster.wait_state(job_id, FINAL_STATES, 120)
    text = out.read_text()
    resumed = [int(x) for x in re.findall(r"RESUMED_FROM=(\d+)", text)]
    assert resumed[0] == 0 and resumed[-1] >= 3 and resumed[-1] <= step_at_failure + 1
    assert "DONE steps=40 restarts=1" in text
    # the failed run is credited, the requeued one is charged
    runs = wait_for(lambda: (r := runs_of(cluster, job_id)) and len(r) >= 2
                    and all(x["cost"] is not None for x in r) and r, 60, 1,
                    what="both runs settled")
    failed, rerun = runs[0], runs[-1]
    assert failed["state"] == "NODE_FAIL" and failed["credit"] == pytest.approx(failed["cost"])
    assert failed["credit"] > 0 and failed["credit_reason"] == "node_failure"
    assert rerun["state"] == "COMPLETED" and rerun["credit"] == 0
    if cluster.slurm_version >= (25, 11):  # Slurm names each run itself (SLUID)
        assert failed["sluid"] and rerun["sluid"] and failed["sluid"] != rerun["sluid"]
    else:
        assert failed["sluid"] is None and rerun["sluid"] is None
    fail_events = events(cluster, "node_fail", job_id)
    assert [e["node"] for e in fail_events] == ["node1"]
    rec = wait_for(lambda: events(cluster, "recovered", job_id), 30, 1, what="recovery event")
    assert rec[0]["ts"] >= killed_at


def test_node_set_down_takes_the_same_path_without_the_wait(cluster: Cluster, failure_policy,
                                                           nodes_back):
    name = "down-" + uuid.uuid4().hex[:8]
    job_id, out = start_on(cluster, "node2", "node1", name, "--gres=gpu:1")
    user_dir = CKPT_ROOT / "vision/alice" / name
    wait_for(lambda: ckpt_step(user_dir) >= 2, 60, 0.5, what="checkpoint at step 2")
    subprocess.run(["scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=test"],
                   env=cluster.env, check=True, timeout=30)
    job = wait_for(lambda: (j := cluster.job(job_id)) and j["restart_cnt"] >= 1
                   and j["job_state"] == "RUNNING" and j, 120, 0.5, what="requeued run running")
    assert job["nodes"] == "node1"
    assert "ExcNodeList=node2" in scontrol_job(cluster, job_id)
    cluster.scancel(job_id)
    assert [e["node"] for e in events(cluster, "node_fail", job_id)] == ["node2"]


def test_retries_exhausted_holds_the_job_with_the_reason(cluster: Cluster, nodes_back):
    override = PolicyOverride(cluster)
    set_requeue(override, drain_after_failures=0, max_restarts=0)
    try:
        name = "cap-" + uuid.uuid4().hex[:8]
        job_id, _ = start_on(cluster, "node2", "node1", name, "--gres=gpu:1")
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=test"],
                       env=cluster.env, check=True, timeout=30)
        held = wait_for(lambda: events(cluster, "hold", job_id), 60, 0.5, what="hold event")
        assert "retries exhausted (1 restarts after node failures, limit 0)" in \
            held[0]["message"]
        job = wait_for(lambda: (j := cluster.job(job_id)) and j["job_state"] == "PENDING"
                       and j["priority"] == 0 and j, 30, 0.5, what="job held")
        assert job["state_reason"].startswith("JobHeld")
        cluster.scancel(job_id)
    finally:
        override.restore()


def test_no_requeue_job_is_not_requeued(cluster: Cluster, failure_policy, nodes_back):
    name = "noreq-" + uuid.uuid4().hex[:8]
    job_id, _ = start_on(cluster, "node2", "node1", name, "--gres=gpu:1", "--no-requeue")
    subprocess.run(["scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=test"],
                   env=cluster.env, check=True, timeout=30)
    job = cluster.wait_state(job_id, FINAL_STATES, 60)
    assert job["job_state"] == "NODE_FAIL" and job["restart_cnt"] == 0
    ev = wait_for(lambda: events(cluster, "requeue", job_id), 30, 0.5, what="requeue event")
    assert "not requeueable" in ev[0]["message"]
    assert cluster.job(job_id)["job_state"] == "NODE_FAIL"


def test_a_node_failing_k_times_is_drained_and_resume_works(cluster: Cluster, nodes_back):
    window_h = 0.01  # 36 s: only this test's two failures may count
    last = {n: max([e["ts"] for e in events(cluster, "node_fail") if e["node"] == n],
                   default=0.0) for n in ("node1", "node2")}
    node = min(last, key=last.get)
    wait_for(lambda: time.time() - last[node] > window_h * 3600 + 1, 60, 0.5,
             what=f"earlier failures of {node} out of the window")
    override = PolicyOverride(cluster)
    set_requeue(override, drain_after_failures=2, drain_window_hours=window_h)
    started = time.time()
    try:
        for i in range(2):
            name = "flaky-" + uuid.uuid4().hex[:8]
            job_id, _ = submit_training(cluster, name, "-w", node, "--gres=gpu:1",
                                        "--no-requeue")
            cluster.wait_state(job_id, "RUNNING", 60)
            subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN",
                            "Reason=test"], env=cluster.env, check=True, timeout=30)
            wait_for(lambda j=job_id: events(cluster, "node_fail", j), 30, 0.3,
                     what="failure recorded")
            drained = [e for e in events(cluster, "drain") if e["ts"] >= started]
            if i == 0:
                assert not drained, "drained after one failure"
                # an admin brings the node back (ReturnToService=1 keeps it down until then)
                subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"],
                               env=cluster.env, check=True, timeout=30)
                wait_for(lambda: node_state(cluster, node) == "idle", 30, 0.3,
                         what=f"{node} back in service")
        drain = wait_for(lambda: [e for e in events(cluster, "drain") if e["ts"] >= started],
                         30, 0.5, what="drain event")
        assert [e["node"] for e in drain] == [node]
        assert "drain" in node_state(cluster, node)
        reason = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%E"], env=cluster.env,
                                capture_output=True, text=True, timeout=30).stdout
        assert "slurmgate: 2 job failures in 0.01h" in reason
        nodes = subprocess.run([SLURMGATE, "nodes"], env=cluster.env, capture_output=True,
                               text=True, timeout=30).stdout
        assert re.search(rf"{node}\s+\d+", nodes)
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"],
                       env=cluster.env, check=True, timeout=30)
        wait_for(lambda: node_state(cluster, node) == "idle", 60, 0.5, what=f"{node} resumed")
    finally:
        override.restore()


def test_preempted_scavenger_job_requeues_and_resumes(cluster: Cluster, failure_policy,
                                                      nodes_back):
    name = "scav-" + uuid.uuid4().hex[:8]
    job_id, out = submit_training(cluster, name, "-p", "scavenger", "--gres=gpu:a100:4",
                                  steps=25)
    cluster.wait_state(job_id, "RUNNING", 60)
    user_dir = CKPT_ROOT / "vision/alice" / name
    wait_for(lambda: ckpt_step(user_dir) >= 3, 60, 0.5, what="scavenger checkpoint")
    urgent = cluster.submit_ok("bob", "--gres=gpu:a100:4", wrap="sleep 3")
    cluster.wait_state(urgent, FINAL_STATES, 120)
    job = cluster.wait_state(job_id, FINAL_STATES, 180)
    assert job["job_state"] == "COMPLETED" and job["restart_cnt"] >= 1
    text = out.read_text()
    assert int(re.findall(r"RESUMED_FROM=(\d+)", text)[-1]) >= 3
    assert "DONE steps=25" in text
    assert events(cluster, "preempt", job_id)


def test_mttr_and_interruption_metrics_match_the_events(cluster: Cluster):
    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        since = time.time() - 3600
        m = failure_metrics(store, since, time.time())
        fails = store._query("SELECT DISTINCT job_id, restart_count FROM events "
                            "WHERE kind = 'node_fail' AND ts >= :since", {"since": since})
        preempts = store._query("SELECT DISTINCT job_id, restart_count FROM events "
                               "WHERE kind = 'preempt' AND ts >= :since", {"since": since})
        rec = store._query("SELECT e.ts, e.job_id, f.ts AS failed FROM events e JOIN events f "
                          "ON f.job_id = e.job_id AND f.restart_count IS e.restart_count "
                          "AND f.kind IN ('node_fail', 'preempt') "
                          "WHERE e.kind = 'recovered' AND e.ts >= :since GROUP BY e.id",
                          {"since": since})
    finally:
        store.close()
    assert m["node_failures"] == len(fails) >= 4
    assert m["preemptions"] == len(preempts) >= 1
    assert m["interruptions"] == len(fails) + len(preempts)
    assert m["recoveries"] == len(rec) >= 2
    mean = sum(r["ts"] - r["failed"] for r in rec) / len(rec)
    assert m["mttr_seconds"] == pytest.approx(mean, abs=1.0)
    assert m["failures_per_node"].get("node2", 0) >= 3
    cli = subprocess.run([SLURMGATE, "failures", "--json", "--days", str(1 / 24)],
                         env=cluster.env, capture_output=True, text=True, timeout=30)
    shown = json.loads(cli.stdout)
    assert (shown["node_failures"], shown["preemptions"]) == (m["node_failures"],
                                                              m["preemptions"])
