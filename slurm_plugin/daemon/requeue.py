"""Node failures and preemptions: requeue from checkpoint, exclude the node, cap retries,
count failures per node and drain flaky ones.

The daemon calls ``FailureHandler.handle`` with each batch of jobcomp records right after
they are committed to SQLite (the ingest has already credited the failed run). Everything
here is idempotent: a record ingested twice, or a daemon restart mid-way, acts once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from policies.config import Policy
from slurm_plugin.daemon.seams import FailureStore
from slurm_plugin.slurm.client import Job, SlurmClient
from slurm_plugin.slurm.hostlist import compress, expand

BAD_NODE_STATES = ("down", "drain", "drained", "draining", "fail", "failing")


class FailureHandler:
    def __init__(self, store: FailureStore, slurm: SlurmClient, policy: Callable[[], Policy],
                 log: Callable[..., None]) -> None:
        self.store = store
        self.slurm = slurm
        self.policy = policy
        self.log = log

    # -- entry points ------------------------------------------------------------------------

    def handle(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            if rec.get("kind") != "jobcomp":
                continue
            state = str(rec.get("state") or "").upper()
            if state == "NODE_FAIL":
                self.on_node_fail(rec)
            elif state == "PREEMPTED":
                self.on_preempted(rec)

    def on_node_fail(self, rec: dict[str, Any]) -> None:
        policy = self.policy()
        cluster, job_id = rec.get("cluster") or policy.daemon.cluster, int(rec["job_id"])
        run = self._run_of(cluster, job_id, rec)
        restart = run["restart_count"] if run else None
        if self._seen("node_fail", cluster, job_id, restart):
            return
        failed = self._failed_nodes(expand(rec.get("nodes")))
        lost_h = self._gpu_hours(run, rec)
        credit = float(run["credit"] or 0.0) if run else 0.0
        now = time.time()
        targets: list[str | None] = [*failed] if failed else [None]
        for node in targets:
            self.store.add_event(
                "node_fail", ts=now, cluster=cluster, job_id=job_id, restart_count=restart,
                team=run["team"] if run else None, user=rec.get("user"), node=node,
                actor="slurmgate",
                message=f"job {job_id} lost its node {node or '(unknown)'}; "
                        f"{lost_h:.2f} GPU-hours lost, {credit:.2f} credited",
                detail={"nodes": failed, "gpu_hours_lost": lost_h, "credited": credit,
                        "failed_at": rec.get("end_ts") or now,
                        "record_written_at": rec.get("written_at")},
            )
        self.log("node_fail", job_id=job_id, restart_count=restart, nodes=failed,
                 gpu_hours_lost=round(lost_h, 4))
        self._requeue(policy, cluster, job_id, restart, failed, rec)
        for node in failed:
            self._check_node_health(policy, cluster, node)

    def on_preempted(self, rec: dict[str, Any]) -> None:
        policy = self.policy()
        cluster, job_id = rec.get("cluster") or policy.daemon.cluster, int(rec["job_id"])
        run = self._run_of(cluster, job_id, rec)
        restart = run["restart_count"] if run else None
        if self._seen("preempt", cluster, job_id, restart):
            return
        self.store.add_event(
            "preempt", cluster=cluster, job_id=job_id, restart_count=restart,
            team=run["team"] if run else None, user=rec.get("user"), actor="slurmgate",
            message=f"job {job_id} preempted from {rec.get('partition')}; Slurm requeues it",
            detail={"partition": rec.get("partition"), "gpu_hours": self._gpu_hours(run, rec),
                    "credited": float(run["credit"] or 0.0) if run else 0.0,
                    "failed_at": rec.get("end_ts")},
        )
        try:  # Slurm holds a requeued job back for a while; it may run as soon as it fits
            job = self.slurm.job(job_id)
            if job is not None and job.pending:
                self.slurm.update_job(job_id, start_time="now")
        except Exception as exc:
            self.log("slurm_error", op="start_time", job_id=job_id, error=str(exc))

    # -- recovery tracking (called from the daemon's reconcile loop) ------------------------

    def note_recoveries(self, jobs: list[Job]) -> int:
        """Record when a requeued job runs again: MTTR = failure -> RUNNING again."""
        open_ = self.store.unrecovered_interruptions(time.time() - 7 * 86400)
        if not open_:
            return 0
        running = {j.job_id: j for j in jobs if j.state == "RUNNING"}
        done = 0
        for ev in open_:
            job = running.get(ev["job_id"])
            restart = ev["restart_count"] if ev["restart_count"] is not None else -1
            if job is None or job.restart_count <= restart or job.start_ts is None:
                continue
            if self._seen("recovered", ev["cluster"], ev["job_id"], ev["restart_count"]):
                continue
            self.store.add_event(
                "recovered", ts=job.start_ts, cluster=ev["cluster"], job_id=ev["job_id"],
                restart_count=ev["restart_count"], actor="slurmgate",
                message=f"job {ev['job_id']} running again after {ev['kind']} "
                        f"({job.start_ts - ev['ts']:.0f} s)",
                detail={"after": ev["kind"], "failed_event": ev["id"],
                        "seconds": max(0.0, job.start_ts - ev["ts"]),
                        "node": job.nodes},
            )
            done += 1
        return done

    # -- pieces ------------------------------------------------------------------------------

    def _run_of(self, cluster: str, job_id: int, rec: dict[str, Any]) -> dict[str, Any] | None:
        runs = self.store.runs_of_job(cluster, job_id)
        for run in sorted(runs, key=lambda r: -r["restart_count"]):
            if run["state"] == rec.get("state") and run["end_ts"] == rec.get("end_ts"):
                return run
        return max(runs, key=lambda r: r["restart_count"]) if runs else None

    def _seen(self, kind: str, cluster: str, job_id: int, restart: int | None) -> bool:
        return self.store.has_event(kind, cluster, job_id, restart)

    def _failed_nodes(self, job_nodes: list[str]) -> list[str]:
        """The job's nodes Slurm now reports down or not responding."""
        if not job_nodes:
            return []
        try:
            states = {n.name: n for n in self.slurm.nodes()}
        except Exception as exc:
            self.log("slurm_error", op="nodes", error=str(exc))
            return job_nodes
        bad = []
        for name in job_nodes:
            node = states.get(name)
            flags = {f.upper() for f in (node.flags or [])} if node else set()
            if node is None or node.state in BAD_NODE_STATES or "NOT_RESPONDING" in flags \
                    or "DRAIN" in flags:
                bad.append(name)
        return bad or job_nodes

    @staticmethod
    def _gpu_hours(run: dict[str, Any] | None, rec: dict[str, Any]) -> float:
        if run and run.get("gpu_seconds"):
            return float(run["gpu_seconds"]) / 3600.0
        if run and run.get("gpus") and rec.get("start_ts") and rec.get("end_ts"):
            return float(run["gpus"]) * max(0.0, rec["end_ts"] - rec["start_ts"]) / 3600.0
        return 0.0

    def _requeue(self, policy: Policy, cluster: str, job_id: int, restart: int | None,
                 failed: list[str], rec: dict[str, Any]) -> None:
        try:
            job = self.slurm.job(job_id)
        except Exception as exc:
            self.log("slurm_error", op="job", job_id=job_id, error=str(exc))
            return
        if job is None:
            return
        if not job.requeue:
            self.store.add_event("requeue", cluster=cluster, job_id=job_id,
                                 restart_count=restart, actor="slurmgate",
                                 message=f"job {job_id} is not requeueable (--no-requeue); "
                                         "left as failed",
                                 detail={"requeued": False})
            return
        restarts = job.restart_count
        if job.finished:  # Slurm did not requeue an eligible batch job: we do
            try:
                self.slurm.requeue(job_id)
                restarts += 1
            except Exception as exc:
                self.log("slurm_error", op="requeue", job_id=job_id, error=str(exc))
                return
        max_restarts = policy.requeue.max_restarts
        if restarts > max_restarts:
            why = (f"slurmgate: retries exhausted ({restarts} restarts after node failures, "
                   f"limit {max_restarts}); release with `scontrol release {job_id}`")
            try:
                self.slurm.hold(job_id, why)
            except Exception as exc:
                self.log("slurm_error", op="hold", job_id=job_id, error=str(exc))
            self.store.add_event("hold", cluster=cluster, job_id=job_id, restart_count=restart,
                                 actor="slurmgate", message=why,
                                 detail={"restarts": restarts, "limit": max_restarts})
            return
        # Slurm finishes the requeue asynchronously and then sets a begin time ~2 min ahead;
        # once the job is pending, "start now" takes (the failed node is excluded anyway).
        deadline = time.monotonic() + 5.0
        while not job.pending and time.monotonic() < deadline:
            time.sleep(0.2)
            job = self.slurm.job(job_id) or job
        excluded = expand(job.exc_nodes)
        changes: dict[str, Any] = {"start_time": "now"}
        if policy.requeue.exclude_failed_nodes and failed:
            excluded = list(dict.fromkeys(excluded + failed))
            changes["exc_nodes"] = compress(excluded)
        try:
            self.slurm.update_job(job_id, **changes)
        except Exception as exc:
            self.log("slurm_error", op="exclude", job_id=job_id, error=str(exc))
        self.store.add_event(
            "requeue", cluster=cluster, job_id=job_id, restart_count=restart, actor="slurmgate",
            message=f"job {job_id} requeued (restart {restarts} of {max_restarts})"
                    + (f", excluding {compress(excluded)}" if excluded else ""),
            detail={"requeued": True, "restarts": restarts, "excluded": excluded},
        )

    def _check_node_health(self, policy: Policy, cluster: str, node: str) -> None:
        k = policy.requeue.drain_after_failures
        if k <= 0:
            return
        window = policy.requeue.drain_window_hours * 3600
        # count from the window's start, or from slurmgate's last drain of this node (an admin
        # resumed it since: it starts with a clean slate)
        last_drain = self.store.last_drain_ts(cluster, node)
        since = max(time.time() - window, last_drain or 0.0)
        failures = self.store.failed_runs_on_node(cluster, node, since)
        if failures < k:
            return
        reason = (f"slurmgate: {failures} job failures in "
                  f"{policy.requeue.drain_window_hours:g}h")
        try:
            self.slurm.drain(node, reason)
        except Exception as exc:
            self.log("slurm_error", op="drain", node=node, error=str(exc))
            return
        self.store.add_event("drain", cluster=cluster, node=node, actor="slurmgate",
                             message=reason, detail={"failures": failures})
        self.log("node_drained", node=node, failures=failures)
