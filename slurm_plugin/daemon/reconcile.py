"""`slurmgate reconcile`: compare what SQLite recorded with what Slurm reports.

Lists runs still unfinished in SQLite whose job Slurm no longer knows (a lost completion
record), finished jobs Slurm still lists that SQLite never recorded, and reservations still
open for jobs Slurm does not know. ``--repair`` writes the missing completion records into
the spool from Slurm's own data (the daemon ingests them as usual) and asks the daemon to
release reservations of vanished jobs. Sites with slurmdbd can extend ``slurm_jobs`` with
sacct; the dev cluster has none, so Slurm's queue (finished jobs stay for MinJobAge) is it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from policies import defaults
from policies.config import Policy
from policies.reservations import job_vanished, vanished_grace
from policies.tags import parse_admin_comment

if TYPE_CHECKING:
    from slurm_plugin.daemon.seams import ReconcileStore
    from slurm_plugin.slurm.client import Job

FINAL = defaults.FINISHED_STATES


def find_gaps(store: ReconcileStore, jobs: list[Job], cluster: str, now: float,
              grace_s: float) -> dict[str, list[dict[str, Any]]]:
    """What SQLite and Slurm's queue (``jobs``) disagree on. A job Slurm does not list counts
    as gone by the daemon's own rule (``policies.reservations.job_vanished``), with
    ``grace_s`` from ``vanished_grace``."""
    by_id = {j.job_id: j for j in jobs}
    # a run without a final state never got its completion record
    lost = [r for r in store.unfinished_runs(cluster) if r["job_id"] not in by_id
            and job_vanished(r["start_ts"] or 0, now, grace_s)]
    recorded = store.recorded_job_ids(cluster)
    missing = [
        {"job_id": j.job_id, "state": j.state, "end_ts": j.end_ts, "restart_count": j.restart_count}
        for j in jobs
        if j.state in FINAL and j.end_ts and j.end_ts < now - 10 and j.job_id not in recorded
        and parse_admin_comment(j.admin_comment)
    ]
    open_resv = []
    known = {parse_admin_comment(j.admin_comment).get("rid") for j in jobs}
    for r in store.live_reservations():
        if r["rid"] not in known and job_vanished(r["created_at"], now, grace_s):
            open_resv.append({"rid": r["rid"], "job_id": r["job_id"], "team": r["team"],
                              "est_cost": r["est_cost"]})
    return {"runs_without_completion": lost, "jobs_not_recorded": missing,
            "reservations_without_job": open_resv}


def completion_record(job: Any, cluster: str) -> dict[str, Any]:
    """A jobcomp spool record rebuilt from Slurm's view of a finished job."""
    from policies.records import jobcomp_record

    return jobcomp_record(
        cluster=cluster, job_id=job.job_id, restart_count=job.restart_count, state=job.state,
        submit_ts=job.submit_ts, start_ts=job.start_ts, end_ts=job.end_ts,
        nodes=job.nodes or "", node_count=job.node_count, partition=job.partition,
        uid=job.uid, user=job.user, account=job.account, exit_code=job.exit_code or "0:0",
        derived_ec="0:0", time_limit_min=job.time_limit_min, array_job_id=job.array_job_id,
        array_task_id=job.array_task_id, work_dir=job.work_dir, source="reconcile",
    )


def run(policy: Policy, *, repair: bool = False, as_json: bool = False) -> int:
    from db.store import StoreError, open_store
    from slurm_plugin.node.spool import nudge_daemon, trust_for, write_record
    from slurm_plugin.protocol import DaemonUnavailable, call
    from slurm_plugin.slurm.factory import open_client

    try:
        store = open_store(policy.daemon.ledger(), readonly=True)
    except StoreError as exc:
        raise SystemExit(f"slurmgate reconcile: {exc}") from exc
    jobs = open_client(policy).jobs()
    cluster = policy.daemon.cluster
    gaps = find_gaps(store, jobs, cluster, time.time(),
                     vanished_grace(policy.daemon.reconcile_seconds))
    repaired: dict[str, Any] = {}
    if repair:
        by_id = {j.job_id: j for j in jobs}
        trust = trust_for(policy.daemon.slurm_user, policy.daemon.spool_squash_uid)
        for gap in gaps["jobs_not_recorded"]:
            write_record(policy.daemon.spool_dir,
                         completion_record(by_id[gap["job_id"]], cluster), trust=trust)
        nudge_daemon(policy.daemon.socket)
        repaired["completion_records_written"] = len(gaps["jobs_not_recorded"])
        try:
            resp = call(policy.daemon.socket, {"op": "reconcile"})
        except DaemonUnavailable as exc:
            raise SystemExit(f"slurmgate reconcile: {exc}") from exc
        if not resp.get("ok"):
            raise SystemExit(f"slurmgate reconcile: {resp.get('error')}")
        repaired["reservations"] = resp.get("result")
    if as_json:
        print(json.dumps({"gaps": gaps, "repaired": repaired}, indent=2, default=str))
    else:
        for name, rows in gaps.items():
            print(f"{name.replace('_', ' ')}: {len(rows)}")
            for row in rows[:50]:
                print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
        if repaired:
            print(f"repaired: {repaired}")
    return 0 if not any(gaps.values()) or repair else 1
