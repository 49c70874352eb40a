"""Time from node failure to the requeued run RUNNING, split into Slurm's detection,
slurmgate's handling and scheduling.

Kills node1's slurmd (and the job's processes there, as a dead node would) under a running
GPU job, then reads the timeline from Slurm and from slurmgate's own records:

  kill -> NODE_FAIL completion record written (Slurm: SlurmdTimeout detection + requeue)
       -> requeue handled by slurmgate (ingest, exclude node, start-now)  [slurmgate's share]
       -> requeued run RUNNING on node2 (scheduling)

Needs the dev cluster (make cluster) to itself while it runs; restores node1 at the end.

    /opt/slurmgate/venv/bin/python bench/bench_failover.py [--runs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIR = Path(os.environ.get("DEVCLUSTER_DIR", REPO / ".devcluster"))
ENV = {**os.environ, "SLURM_CONF": str(DIR / "etc/slurm.conf")}


def sh(*argv: str) -> str:
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=60).stdout


def job(job_id: int) -> dict | None:
    jobs = json.loads(sh("squeue", "--json", "--all"))["jobs"]
    return next((j for j in jobs if j["job_id"] == job_id), None)


def wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def kill_node(node: str, job_id: int) -> None:
    os.kill(int((DIR / f"run/slurmd-{node}.pid").read_text()), signal.SIGKILL)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd, env = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:
            continue
        if (b"slurmstepd" in cmd and f"[{job_id}.".encode() in cmd) or \
                f"SLURM_JOB_ID={job_id}\0".encode() in env:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def one_run() -> dict[str, float]:
    sh("scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=bench-placement")
    out = subprocess.run(
        ["runuser", "-u", "alice", "--", "sbatch", "--parsable", "-t", "10", "-o", "/dev/null",
         "--gres=gpu:1", "--comment=project=vit-scaling,cost_center=CC1001", "--wrap",
         "sleep 600"], env=ENV, capture_output=True, text=True, timeout=30, cwd="/tmp")
    job_id = int(out.stdout.strip())
    wait(lambda: (j := job(job_id)) and j["job_state"] == "RUNNING", 60, "job running")
    sh("scontrol", "update", "NodeName=node2", "State=RESUME")
    t_kill = time.time()
    kill_node("node1", job_id)
    running = wait(lambda: (j := job(job_id)) and j["restart_cnt"] >= 1
                   and j["job_state"] == "RUNNING" and j, 300, "requeued run running")
    db = sqlite3.connect(f"file:{DIR / 'var/slurmgate.db'}?mode=ro", uri=True)

    def event_ts(kind: str) -> float | None:
        row = db.execute("SELECT min(ts) FROM events WHERE kind = ? AND job_id = ?",
                         (kind, job_id)).fetchone()
        return row[0]

    handled = wait(lambda: event_ts("requeue"), 30, "requeue event")
    detail = json.loads(db.execute(
        "SELECT detail FROM events WHERE kind = 'node_fail' AND job_id = ?",
        (job_id,)).fetchone()[0])
    record_written = detail["record_written_at"]
    subprocess.run(["scancel", str(job_id)], env=ENV, timeout=30)
    subprocess.run(["bash", str(REPO / "contrib/devcluster/cluster.sh"), "start"], env=ENV,
                   capture_output=True, timeout=120)
    wait(lambda: "idle" in sh("sinfo", "-h", "-n", "node1", "-o", "%T"), 120, "node1 back")
    return {
        "detection_s (kill -> NODE_FAIL record)": record_written - t_kill,
        "slurmgate_s (record -> requeue handled)": handled - record_written,
        "scheduling_s (handled -> RUNNING)": running["start_time"] - handled,
        "total_s (kill -> RUNNING)": running["start_time"] - t_kill,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    results = [one_run() for _ in range(args.runs)]
    for key in results[0]:
        values = [r[key] for r in results]
        print(f"{key:<42} " + "  ".join(f"{v:7.2f}" for v in values)
              + f"   median {statistics.median(values):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
