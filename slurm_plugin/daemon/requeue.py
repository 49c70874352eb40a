"""Node failures and preemptions: requeue from checkpoint, exclude the node, cap retries,
count failures per node and drain flaky ones, and credit the run that died.

The daemon calls ``FailureHandler.handle`` with each batch of jobcomp records right after
they are committed to SQLite. Everything here is idempotent: a record ingested twice, or a
daemon restart mid-way, acts once.

Privileged actions only on Slurm's word. A record is a claim; before any requeue, exclusion,
drain or credit the handler asks Slurm itself, fresh (one ``jobs(ids)`` and one ``nodes()``
query per batch, made first so the answer is as close to the failure as possible):

- the job really ended that way for that run: Slurm shows it NODE_FAIL (PREEMPTED) with the
  run's restart count, or it came back (pending, or running again) with a higher restart
  count (Slurm 22.05 requeues a batch job under the same id with restart_count + 1);
- for NODE_FAIL, the node the record names really failed: Slurm reports it down, failing or
  not responding, or drained for a failure (``FAILURE_DRAIN_REASONS``), or the job ended
  NODE_FAIL on that node alone (Slurm's own job record names it).

A record that fails either check gets no action at all, only a ``failure_unconfirmed`` event
naming the record and why. Only the nodes Slurm confirms are excluded and counted towards
draining; a record that names no node excludes and drains nothing (never "all the job's
nodes"). The ingest leaves the failed run's credit pending (``node_failure_pending``); it is
credited here (``FailureStore.confirm_failure_credit``) once confirmed.

Excluding the failed nodes never leaves a job that no node set of its partition can run
(``-N 2`` on a two-node partition, or every node excluded): the exclusion is narrowed or
dropped, with an ``exclusion_narrowed`` event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from policies.config import Policy
from slurm_plugin.daemon.seams import FailureStore
from slurm_plugin.slurm.client import Job, Node, SlurmClient
from slurm_plugin.slurm.hostlist import compress, expand

FAILED_NODE_STATES = frozenset({"down", "fail", "failing"})
"""Base node states of a node that failed."""
FAILED_NODE_FLAGS = frozenset({"NOT_RESPONDING", "DOWN", "FAIL"})
"""Node state flags of a node that failed."""
FAILURE_DRAIN_REASONS = ("not responding", "kill task failed", "prolog error", "epilog error",
                         "batch job complete failure", "unexpectedly rebooted",
                         "launch failed", "node fail")
"""A drained node counts as failed when Slurm's reason says so (case-insensitive prefix or
substring); a node an admin drained for maintenance does not."""
TRANSITIONAL_JOB_STATES = frozenset({"COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                                     "RESIZING", "SIGNALING", "STAGE_OUT", "CONFIGURING"})
"""Job states on the way to the requeue: asked again for a few seconds before judging."""
CONFIRM_WAIT_S = 3.0


def node_failure(node: Node) -> str | None:
    """How Slurm says ``node`` failed ("down", "NOT_RESPONDING", "drained: Kill task failed"),
    or None when Slurm reports it up and responding."""
    if node.state in FAILED_NODE_STATES:
        return node.state
    flags = {f.upper() for f in node.flags}
    if bad := sorted(flags & FAILED_NODE_FLAGS):
        return "+".join(bad)
    if node.drained:
        reason = (node.reason or "").lower()
        if any(r in reason for r in FAILURE_DRAIN_REASONS):
            return f"drained: {node.reason}"
    return None


def _describe(node: Node) -> str:
    text = node.state + "".join(f"+{f}" for f in node.flags)
    return text + (f" ({node.reason})" if node.reason else "")


class _Slurm:
    """What Slurm said about one batch: jobs by id and nodes by name, or why it could not
    be asked."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.nodes: dict[str, Node] | None = None
        self.jobs_error: str | None = None
        self.nodes_error: str | None = None


class FailureHandler:
    def __init__(self, store: FailureStore, slurm: SlurmClient, policy: Callable[[], Policy],
                 log: Callable[..., None], credited: Callable[[], None] | None = None) -> None:
        self.store = store
        self.slurm = slurm
        self.policy = policy
        self.log = log
        self.credited = credited  # called after a credit (the daemon refreshes its ledger)

    # -- entry points ------------------------------------------------------------------------

    def handle(self, records: list[dict[str, Any]]) -> None:
        mine = [(rec, str(rec.get("state") or "").upper()) for rec in records
                if rec.get("kind") == "jobcomp"]
        mine = [(rec, state) for rec, state in mine if state in ("NODE_FAIL", "PREEMPTED")]
        if not mine:
            return
        said = self._ask_slurm({int(rec["job_id"]) for rec, _ in mine},
                               nodes=any(state == "NODE_FAIL" for _, state in mine))
        for rec, state in mine:
            if state == "NODE_FAIL":
                self.on_node_fail(rec, said)
            else:
                self.on_preempted(rec, said)

    def on_node_fail(self, rec: dict[str, Any], said: _Slurm | None = None) -> None:
        policy = self.policy()
        cluster, job_id = rec.get("cluster") or policy.daemon.cluster, int(rec["job_id"])
        run = self._run_of(cluster, job_id, rec)
        restart = run["restart_count"] if run else None
        if self._seen("node_fail", cluster, job_id, restart) or \
                self._seen("failure_unconfirmed", cluster, job_id, restart):
            return
        said = said or self._ask_slurm([job_id], nodes=True)
        try:
            named = expand(rec.get("nodes"))
        except Exception:  # a malformed hostlist names nothing we could act on
            named = []
        job = self._confirmed_job(said, "NODE_FAIL", job_id, restart)
        why = job if isinstance(job, str) else None
        failed: list[str] = []
        not_failed: dict[str, str] = {}
        if isinstance(job, Job):
            if not named:
                why = "the record names no node (nothing is excluded or drained)"
            elif said.nodes is None:
                why = f"Slurm's node states could not be read: {said.nodes_error}"
            else:
                failed, not_failed = self._failed_nodes(named, said.nodes, job)
                if not failed:
                    why = "Slurm reports " + "; ".join(
                        f"{n} {state}" for n, state in not_failed.items()) + \
                        " (up and responding: not a node failure)"
        if why is not None:
            self._unconfirmed(cluster, job_id, restart, run, rec, "NODE_FAIL", why)
            return
        lost_h = self._gpu_hours(run, rec)
        credit = self._credit(cluster, job_id, restart, run)
        now = time.time()
        for node in failed:
            self.store.add_event(
                "node_fail", ts=now, cluster=cluster, job_id=job_id, restart_count=restart,
                team=run["team"] if run else None, user=rec.get("user"), node=node,
                actor="slurmgate",
                message=f"job {job_id} lost its node {node}; "
                        f"{lost_h:.2f} GPU-hours lost, {credit:.2f} credited",
                detail={"nodes": failed, "gpu_hours_lost": lost_h, "credited": credit,
                        "failed_at": rec.get("end_ts") or now,
                        "record_written_at": rec.get("written_at"),
                        "not_failed": not_failed or None},
            )
        self.log("node_fail", job_id=job_id, restart_count=restart, nodes=failed,
                 gpu_hours_lost=round(lost_h, 4))
        self._requeue(policy, cluster, job_id, restart, failed, rec,
                      list(said.nodes.values()) if said.nodes else [])
        for node in failed:
            self._check_node_health(policy, cluster, node)

    def on_preempted(self, rec: dict[str, Any], said: _Slurm | None = None) -> None:
        policy = self.policy()
        cluster, job_id = rec.get("cluster") or policy.daemon.cluster, int(rec["job_id"])
        run = self._run_of(cluster, job_id, rec)
        restart = run["restart_count"] if run else None
        if self._seen("preempt", cluster, job_id, restart) or \
                self._seen("failure_unconfirmed", cluster, job_id, restart):
            return
        said = said or self._ask_slurm([job_id], nodes=False)
        job = self._confirmed_job(said, "PREEMPTED", job_id, restart)
        if isinstance(job, str):
            self._unconfirmed(cluster, job_id, restart, run, rec, "PREEMPTED", job)
            return
        credit = self._credit(cluster, job_id, restart, run)
        self.store.add_event(
            "preempt", cluster=cluster, job_id=job_id, restart_count=restart,
            team=run["team"] if run else None, user=rec.get("user"), actor="slurmgate",
            message=f"job {job_id} preempted from {rec.get('partition')}; Slurm requeues it",
            detail={"partition": rec.get("partition"), "gpu_hours": self._gpu_hours(run, rec),
                    "credited": credit, "failed_at": rec.get("end_ts")},
        )
        try:  # Slurm holds a requeued job back for a while; it may run as soon as it fits
            now_job = self.slurm.job(job_id)
            if now_job is not None and now_job.pending:
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

    def _ask_slurm(self, job_ids: Iterable[int], nodes: bool) -> _Slurm:
        """One fresh look at the jobs (and the nodes) of a batch."""
        said = _Slurm()
        try:
            said.jobs = {j.job_id: j for j in self.slurm.jobs(sorted(set(job_ids)))}
        except Exception as exc:
            said.jobs_error = str(exc)
            self.log("slurm_error", op="jobs", error=str(exc))
        if nodes:
            try:
                said.nodes = {n.name: n for n in self.slurm.nodes()}
            except Exception as exc:
                said.nodes_error = str(exc)
                self.log("slurm_error", op="nodes", error=str(exc))
        return said

    def _confirmed_job(self, said: _Slurm, state: str, job_id: int,
                       restart: int | None) -> Job | str:
        """Slurm's job when it confirms that run ``restart`` of ``job_id`` ended in ``state``,
        else why not. A job on its way to the requeue is asked again for a few seconds."""
        if said.jobs_error is not None:
            return f"Slurm could not be asked about job {job_id}: {said.jobs_error}"
        base = restart if restart is not None else 0
        job = said.jobs.get(job_id)
        deadline = time.monotonic() + CONFIRM_WAIT_S
        while job is not None and job.restart_count <= base and \
                job.state in TRANSITIONAL_JOB_STATES and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                job = self.slurm.job(job_id)
            except Exception as exc:
                return f"Slurm could not be asked about job {job_id}: {exc}"
        if job is None:
            return f"Slurm does not know job {job_id}"
        if job.restart_count > base:
            return job  # requeued since that run (pending, or running again)
        if job.state == state and job.restart_count == base:
            return job  # ended that way and was not requeued
        return (f"Slurm reports job {job_id} {job.state} with restart count "
                f"{job.restart_count}, not {state} of run {base}")

    @staticmethod
    def _failed_nodes(named: list[str], nodes: dict[str, Node],
                      job: Job) -> tuple[list[str], dict[str, str]]:
        """(nodes Slurm confirms failed, {node: what Slurm says} for the others) of those the
        record names. A node counts as failed when Slurm reports it so, or when Slurm's job
        record ended NODE_FAIL on that node alone (it may be back in service already)."""
        try:
            job_nodes = expand(job.nodes) if job.state == "NODE_FAIL" else []
        except Exception:
            job_nodes = []
        failed, not_failed = [], {}
        for name in dict.fromkeys(named):
            node = nodes.get(name)
            if node is None:
                not_failed[name] = "is not a node Slurm knows"
            elif node_failure(node) is not None:
                failed.append(name)
            elif job_nodes == [name]:
                failed.append(name)  # Slurm's own word: the job failed on this node
            else:
                not_failed[name] = _describe(node)
        return failed, not_failed

    def _unconfirmed(self, cluster: str, job_id: int, restart: int | None,
                     run: dict[str, Any] | None, rec: dict[str, Any], state: str,
                     why: str) -> None:
        self.store.add_event(
            "failure_unconfirmed", cluster=cluster, job_id=job_id, restart_count=restart,
            team=run["team"] if run else None, user=rec.get("user"), actor="slurmgate",
            message=f"{state} record of job {job_id} not acted on: {why}; no requeue, "
                    "exclusion, drain or credit",
            detail={"state": state, "why": why, "nodes": rec.get("nodes"),
                    "end_ts": rec.get("end_ts"), "record_id": rec.get("record_id"),
                    "record_written_at": rec.get("written_at")},
        )
        self.log("failure_unconfirmed", job_id=job_id, restart_count=restart, state=state,
                 why=why)

    def _close_reservation(self, cluster: str, job_id: int, state: str) -> None:
        """A failed job Slurm will not run again: its reservation stops holding budget now
        (not when the job leaves Slurm's memory, MinJobAge plus the vanished grace later).
        An array's reservation covers its other tasks and stays."""
        closed = False
        for run in self.store.runs_of_job(cluster, job_id):
            if run.get("rid") and run.get("array_job_id") is None:
                closed |= self.store.finish_reservation(
                    run["rid"], "settled", f"job ended {state} and is not requeueable")
        if closed and self.credited is not None:
            try:
                self.credited()
            except Exception as exc:
                self.log("failure_handling_error", op="ledger", error=repr(exc))

    def _credit(self, cluster: str, job_id: int, restart: int | None,
                run: dict[str, Any] | None) -> float:
        """Credit the confirmed failed run (its credit was pending); what it is credited."""
        if run is None or restart is None:
            return 0.0
        amount = self.store.confirm_failure_credit(cluster, job_id, restart)
        if amount is None:  # nothing pending: already credited, an admin's, or not credited
            return float(run.get("credit") or 0.0)
        if self.credited is not None:
            try:
                self.credited()
            except Exception as exc:
                self.log("failure_handling_error", op="ledger", error=repr(exc))
        return amount

    def _feasible_exclusion(self, job: Job, excluded: list[str], add: list[str],
                            nodes: list[Node]) -> tuple[list[str], str | None]:
        """The failed nodes that can be excluded while the job's partition keeps enough nodes
        for it (its node count), and why others were not (None: all of them)."""
        if not add:
            return [], None
        parts = {p for p in (job.partition or "").split(",") if p}
        members = [n.name for n in nodes if parts & set(n.partitions)]
        if not parts or not members:
            return add, None  # the partition's nodes are unknown: nothing to judge by
        need = max(1, job.node_count)
        available = [m for m in members if m not in excluded]
        room = len(available) - need
        keep = [n for n in add if n in available][:max(0, room)]
        keep += [n for n in add if n not in members]  # outside the partition: harmless
        if len(keep) == len(add):
            return add, None
        dropped = [n for n in add if n not in keep]
        return keep, (f"excluding {compress(dropped)} would leave fewer than {need} of "
                      f"partition {job.partition}'s {len(members)} nodes "
                      f"({len(members) - len(available)} excluded already) for a job that "
                      f"needs {need}")

    @staticmethod
    def _gpu_hours(run: dict[str, Any] | None, rec: dict[str, Any]) -> float:
        if run and run.get("gpu_seconds"):
            return float(run["gpu_seconds"]) / 3600.0
        if run and run.get("gpus") and rec.get("start_ts") and rec.get("end_ts"):
            return float(run["gpus"]) * max(0.0, rec["end_ts"] - rec["start_ts"]) / 3600.0
        return 0.0

    def _requeue(self, policy: Policy, cluster: str, job_id: int, restart: int | None,
                 failed: list[str], rec: dict[str, Any], nodes: list[Node]) -> None:
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
            self._close_reservation(cluster, job_id, rec.get("state") or "NODE_FAIL")
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
            add = [n for n in failed if n not in excluded]
            keep, narrowed = self._feasible_exclusion(job, excluded, add, nodes)
            if narrowed is not None:
                self.store.add_event(
                    "exclusion_narrowed", cluster=cluster, job_id=job_id,
                    restart_count=restart, actor="slurmgate",
                    message=f"job {job_id}: {narrowed}; "
                            + (f"excluding only {compress(keep)}" if keep
                               else "no node excluded"),
                    detail={"failed": failed, "excluded": keep,
                            "not_excluded": [n for n in add if n not in keep],
                            "partition": job.partition, "node_count": job.node_count})
            if keep:
                excluded = list(dict.fromkeys(excluded + keep))
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
