"""Jobs accepted unchecked get their decision later; array reservations follow what Slurm runs.

Unchecked jobs. In fail-open mode job_submit.lua accepts a job it could not get decided (daemon
down, too slow) and marks its admin comment ``slurmgate:unchecked``. On every reconcile pass
(the first one at daemon start) ``Recheck.check_unchecked_jobs`` decides each such job that has
not ended like a new submission (``decide_and_record(origin="recheck")``), from Slurm's own
view of it: the owner is Slurm's uid (the user name is looked up from it, never taken from the
record) and an array is ONE decision for all its tasks that have not ended.

- accepted: the admin comment gets the decision's segment (team, rid, tags; other tools' text
  kept); a pending job also the nice, partition and time limit the decision sets (a running
  one keeps its own). The reservation then binds like any other. The checkpoint environment
  variable cannot be added after submit: that is logged.
- rejected and pending: held (``hold``), admin comment ``slurmgate:v2;held=<code>``, event
  ``unchecked_held``.
- rejected and running: ``daemon.unchecked_running``: "finish" leaves it running (event
  ``unchecked_running_kept``; the ingest charges its run to its account's team), "requeue"
  requeues it held (event ``unchecked_requeued``). Both get the held admin comment.

Slurm's view decides what is done, not an exit code: ``scontrol`` on an array job id acts on
every task and exits 1 when any task refused (a finished one, say) even if the others took the
change. So a step counts as done when the action returned or when a later queue read shows it
(pending records held, records requeued, no record still unchecked), and the held comment is
written only once the hold is in place. Every Slurm call may fail; what is left is tried again
on the next pass. A job is decided once per daemon life: its decision waits in memory until
Slurm shows the marks, and until then its reservation counts as listed
(``awaiting_marks``), so a failing ``update_job`` never makes a second reservation or loses
the first.

Arrays. A reservation for an array covers ``tasks`` tasks at once (``Estimate.tasks_reserved``:
min(tasks, %throttle) under ``budgets.array_concurrency = "throttle"``). Slurm 22.05 applies a
user's ``scontrol update JobId=X ArrayTaskThrottle=N`` even when job_submit's job_modify
refuses it, so ``Recheck.follow_array_throttles`` compares, on every pass, what Slurm may run
at once (the tasks holding nodes, or the current throttle capped at the tasks not yet ended,
whichever is more) with what is reserved, and re-prices the reservation up at the same cost per
task. It never re-prices down: tasks settle as they end, and the reservation is released when
the array's last task has left Slurm's queue (policies.reservations).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from policies.config import Policy
from policies.decision import SubmitDecision
from policies.gpu import GpuRequestError, parse_array
from policies.request import JobRequest
from policies.tags import (
    format_admin_comment,
    format_held_comment,
    is_unchecked,
    merge_admin_comment,
)
from slurm_plugin.daemon.peers import user_name
from slurm_plugin.slurm.client import (
    FINISHED_STATES,
    InvalidSlurmValue,
    Job,
    SlurmClient,
    SlurmError,
    task_id_ranges,
)

HOLDS_NODES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING"})
"""Task states that hold nodes: what an array runs at once."""
REQUEUEABLE = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED"})
"""States a rejected running job can be requeued from (others are on their way out)."""
SLURM_FAILURES = (SlurmError, InvalidSlurmValue)
MARKED_MEMORY_S = 3600.0

_REASON_CODES = (("no team", "no-team"), ("account", "account"), ("tags", "tags"),
                 ("hard limit", "hard-limit"), ("cost", "cost"), ("bad input", "bad-input"),
                 ("invalid", "bad-input"))


class DecidingDaemon(Protocol):
    """What the re-check asks of the daemon (``Daemon`` has all of it)."""

    @property
    def policy(self) -> Policy: ...

    @property
    def lock(self) -> threading.RLock: ...

    def decide_and_record(self, job: JobRequest, *, origin: str) -> SubmitDecision: ...

    def refresh_ledger(self, policy: Policy | None = None, now: float | None = None) -> None: ...


class RecheckStore(Protocol):
    """What the re-check writes (``db.store.Store`` has it); called under the daemon's lock."""

    def add_event(self, kind: str, **fields: Any) -> int: ...

    def reprice_reservation(self, rid: str, tasks: int, est_cost: float) -> bool: ...


# --------------------------------------------------------------------------------------------
# Slurm's queue, one entry per job (an array is one job)


@dataclass(frozen=True)
class QueuedJob:
    """A job as the re-check sees it: a plain job, or a whole array with its records that
    have not ended (the head record, standing for the tasks still waiting, first)."""

    job_id: int
    """The job id, or the array job id."""
    records: tuple[Job, ...]
    ended: tuple[Job, ...] = ()
    """An array's tasks that ended but are still listed (MinJobAge)."""

    @property
    def first(self) -> Job:
        return self.records[0]

    @property
    def is_array(self) -> bool:
        return self.first.array_job_id is not None

    @property
    def unchecked(self) -> bool:
        return any(is_unchecked(r.admin_comment) for r in self.records)

    @property
    def pending(self) -> list[Job]:
        return [r for r in self.records if r.pending]

    @property
    def running(self) -> list[Job]:
        """Records that have started (running, configuring, completing, suspended...)."""
        return [r for r in self.records if not r.pending]

    @property
    def throttle(self) -> int:
        """The array's current %throttle; 0: none."""
        return max((r.array_max_tasks or 0) for r in self.records)

    def waiting_specs(self) -> list[str]:
        return [s for r in self.records if (s := _readable_spec(r)) is not None]

    def array_spec(self) -> str | None:
        """``--array`` for the tasks that have not ended ("4-9,1,3%2"); None: no array."""
        if not self.is_array:
            return None
        started = [r.array_task_id for r in self.records if r.array_task_id is not None]
        parts = [*self.waiting_specs(), task_id_ranges(started)]
        spec = ",".join(p for p in parts if p)
        return spec + (f"%{self.throttle}" if spec and self.throttle else "")

    def tasks_not_ended(self) -> int:
        count = 0
        for r in self.records:
            spec = _readable_spec(r)
            if spec is None:
                count += 1
                continue
            try:
                count += parse_array(spec)[0]
            except GpuRequestError:
                count += 1
        return count

    def tasks_holding_nodes(self) -> int:
        return sum(r.state in HOLDS_NODES for r in self.records)

    def tasks_at_once(self) -> int:
        """What Slurm may run at once: the tasks holding nodes, or the current throttle
        capped at the tasks not yet ended (no throttle: all of them), whichever is more."""
        left = self.tasks_not_ended()
        allowed = min(self.throttle, left) if self.throttle else left
        return max(self.tasks_holding_nodes(), allowed)


def _readable_spec(job: Job) -> str | None:
    """The head record's waiting task ids; a list Slurm cut short ("0,2,4,...") counts what
    it shows (the CLI and pyslurm backends ask for the whole list)."""
    spec = job.array_waiting_spec
    if spec is not None and spec.endswith("..."):
        spec = spec.rstrip(".").rstrip(",") or None
    return spec


def queued_jobs(jobs: Iterable[Job]) -> dict[int, QueuedJob]:
    """Slurm's queue as jobs that have not ended, an array as one entry (first seen order)."""
    grouped: dict[int, list[Job]] = {}
    ended: dict[int, list[Job]] = {}
    for j in jobs:
        key = j.array_job_id or j.job_id
        (ended if j.state in FINISHED_STATES else grouped).setdefault(key, []).append(j)
    out = {}
    for key, records in grouped.items():
        records.sort(key=lambda r: r.array_waiting_spec is None)  # the head record first
        out[key] = QueuedJob(key, tuple(records), tuple(ended.get(key, ())))
    return out


def unchecked_jobs(jobs: Iterable[Job]) -> list[QueuedJob]:
    """Jobs accepted unchecked that have not ended and still wait for their decision."""
    return [q for q in queued_jobs(jobs).values() if q.unchecked]


def request_from_slurm(q: QueuedJob) -> JobRequest:
    """The submission as Slurm holds it now. The owner is Slurm's uid, the name looked up from
    it here; an array asks for the tasks that have not ended. Raises ValueError when Slurm
    gives no uid or the fields do not validate."""
    job = q.first
    if job.uid is None:
        raise ValueError(f"Slurm reports no uid for job {q.job_id}")
    fields: dict[str, Any] = {
        "user": user_name(job.uid), "uid": job.uid, "account": job.account,
        "partition": job.partition, "comment": job.comment, "name": job.name,
        "work_dir": job.work_dir, "time_limit": job.time_limit_min,
        "min_nodes": job.node_count or None, "max_nodes": job.max_nodes,
        "num_tasks": job.num_tasks, "ntasks_per_node": job.ntasks_per_node,
        "cpus_per_task": job.cpus_per_task, "min_cpus": job.cpus or None,
        "min_mem_per_node": job.min_mem_per_node, "min_mem_per_cpu": job.min_mem_per_cpu,
        "array_inx": q.array_spec(), "tres_per_job": job.tres_per_job,
        "tres_per_node": job.tres_per_node, "tres_per_socket": job.tres_per_socket,
        "tres_per_task": job.tres_per_task, "exc_nodes": job.exc_nodes,
        "admin_comment": job.admin_comment, "features": job.features, "job_id": q.job_id,
        "requeue": job.requeue, "sockets_per_node": job.sockets_per_node,
    }
    try:
        return JobRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise ValueError(f"job {q.job_id}: Slurm's fields do not validate: {exc}") from None


def held_code(reason: str) -> str:
    """The short code a rejection leaves in the admin comment ("hard limit: ..." ->
    "hard-limit"); the full message is an event."""
    head = reason.split(":", 1)[0].strip().lower()
    for prefix, code in _REASON_CODES:
        if head.startswith(prefix):
            return code
    return "policy"


def _one_line(text: str, limit: int = 200) -> str:
    return "".join(c if " " <= c != "\x7f" else " " for c in text)[:limit]


# --------------------------------------------------------------------------------------------
# The re-check


@dataclass
class Decided:
    """A job the re-check decided; kept until Slurm's queue shows its marks."""

    job_id: int
    verdict: str
    rid: str
    team: str | None
    user: str
    reason: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    """Accepted: what to set on the job (admin_comment first)."""
    done: set[str] = field(default_factory=set)
    """Rejected: the events already written ("held", "kept")."""

    @property
    def code(self) -> str:
        return held_code(self.reason)


class Recheck:
    """Unchecked jobs and array reservations, on each reconcile pass. One pass at a time (the
    reconcile loop, `slurmgate reconcile --repair` and the ingest may all ask for one)."""

    def __init__(self, daemon: DecidingDaemon, slurm: SlurmClient, store: RecheckStore,
                 write_log: Callable[..., None]) -> None:
        self.daemon, self.slurm, self.store, self.write_log = daemon, slurm, store, write_log
        self.decided: dict[int, Decided] = {}
        self.marked: dict[int, float] = {}
        """job id -> time.monotonic() when its admin comment was set: a queue read from
        before that still shows it unchecked."""
        self.waiting = 0
        """Unchecked jobs still waiting for their decision after the last pass."""
        self._one_pass = threading.Lock()

    # -- unchecked jobs ----------------------------------------------------------------------

    def awaiting_marks(self, listed: Iterable[int]) -> dict[str, int]:
        """rid -> job id of accepted jobs in ``listed`` whose admin comment does not name
        their rid yet: the reconcile loop counts these reservations as listed."""
        present = set(listed)
        return {d.rid: d.job_id for d in list(self.decided.values())
                if d.verdict == "accept" and d.rid and d.job_id in present}

    def check_unchecked_jobs(self, jobs: list[Job], read_at: float) -> dict[str, int]:
        """Decide and mark every unchecked job in ``jobs`` (Slurm's queue as read at
        ``read_at``, time.monotonic()). Returns counts: decided, accepted, rejected, waiting."""
        counts = {"decided": 0, "accepted": 0, "rejected": 0, "waiting": 0}
        with self._one_pass:
            queued = queued_jobs(jobs)
            self._forget_finished(queued, read_at)
            for q in queued.values():
                if not q.unchecked or self.marked.get(q.job_id, -1.0) >= read_at:
                    continue  # decided, or marked after this queue was read
                d = self.decided.get(q.job_id)
                try:
                    if d is None:
                        d = self._decide(q)
                        counts["decided"] += 1
                    if self._mark(q, d):
                        counts["accepted" if d.verdict == "accept" else "rejected"] += 1
                        continue
                except Exception as exc:  # one job's trouble never stops the others
                    self.write_log("unchecked_error", job_id=q.job_id, error=repr(exc))
                counts["waiting"] += 1
            self.waiting = counts["waiting"]
        return counts

    def _forget_finished(self, queued: Mapping[int, QueuedJob], read_at: float) -> None:
        """Drop decisions whose job ended or whose marks Slurm shows, and marks older than
        any queue read still on its way (an hour)."""
        for job_id in list(self.decided):
            q = queued.get(job_id)
            if q is None or not q.unchecked:
                self.decided.pop(job_id)
        for job_id, at in list(self.marked.items()):
            if at < read_at - MARKED_MEMORY_S:
                self.marked.pop(job_id)

    def _decide(self, q: QueuedJob) -> Decided:
        req = request_from_slurm(q)
        d = self.daemon.decide_and_record(req, origin="recheck")
        decided = Decided(q.job_id, d.verdict, d.rid if d.verdict == "accept" else "", d.team,
                          req.user, d.reason, "\n".join(d.lines))
        if d.verdict == "accept":
            decided.fields = self._accept_fields(q, d)
        self.decided[q.job_id] = decided
        self.write_log("unchecked_decided", job_id=q.job_id, user=req.user, uid=req.uid,
                       account=req.account, team=d.team, verdict=d.verdict, reason=d.reason,
                       rid=decided.rid or None, array=req.array_inx)
        return decided

    def _accept_fields(self, q: QueuedJob, d: SubmitDecision) -> dict[str, Any]:
        """The decision's job fields Slurm can still take: the admin comment always, nice
        while a task waits, partition and time limit only while nothing has started."""
        comment = d.set_fields.get("admin_comment")
        if not isinstance(comment, str):
            comment = merge_admin_comment(q.first.admin_comment,
                                          format_admin_comment(d.team or "", d.rid, d.tags))
        fields: dict[str, Any] = {"admin_comment": comment}
        skipped = []
        for name in ("nice", "partition", "time_limit"):
            if name not in d.set_fields:
                continue
            if (q.pending and name == "nice") or not q.running:
                fields[name] = d.set_fields[name]
            else:
                skipped.append(name)
        if skipped:
            self.write_log("unchecked_fields_skipped", job_id=q.job_id, fields=skipped,
                           why="the job is already running")
        if "env" in d.set_fields:
            self.write_log("unchecked_env_skipped", job_id=q.job_id, env=d.set_fields["env"],
                           why="a job's environment cannot be changed after submit; it "
                               "starts without the checkpoint variable")
        return fields

    def _mark(self, q: QueuedJob, d: Decided) -> bool:
        """Apply the decision in Slurm; True when the admin comment is set."""
        if d.verdict == "accept":
            return self._mark_accepted(q, d)
        if not self._stop_rejected(q, d):
            return False
        comment = merge_admin_comment(q.first.admin_comment, format_held_comment(d.code))
        if not self._set_comment(q, comment):
            return False
        self.marked[q.job_id] = time.monotonic()
        return True

    def _mark_accepted(self, q: QueuedJob, d: Decided) -> bool:
        comment, more = d.fields["admin_comment"], {k: v for k, v in d.fields.items()
                                                    if k != "admin_comment"}
        if not self._set_comment(q, comment, more):
            if not more or not self._set_comment(q, comment):
                return False
            self.write_log("unchecked_fields_not_set", job_id=q.job_id, fields=sorted(more),
                           why="Slurm refused them (or some of the array's tasks did); the "
                               "admin comment was set alone")
        self.marked[q.job_id] = time.monotonic()
        self.write_log("unchecked_accepted", job_id=q.job_id, team=d.team, rid=d.rid,
                       set=sorted(d.fields))
        return True

    def _set_comment(self, q: QueuedJob, comment: str,
                     more: Mapping[str, Any] | None = None) -> bool:
        """Set the job's admin comment (and ``more`` fields). On an array the update of the
        array job id writes every task's admin comment, so each task whose other tools' text
        (jobstats' JS1:..., written at a task's end) differs gets its own back (best effort:
        a failure is logged)."""
        if not self._update(q.job_id, {"admin_comment": comment, **(more or {})}):
            return False
        if q.is_array:
            ours = comment.split(" ", 1)[0]  # slurmgate's segment holds no whitespace
            for r in (*q.records, *q.ended):
                own = merge_admin_comment(r.admin_comment, ours)
                if r.job_id != q.job_id and own != comment:
                    self._update(r.job_id, {"admin_comment": own})
        return True

    def _update(self, job_id: int, fields: dict[str, Any]) -> bool:
        try:
            self.slurm.update_job(job_id, **fields)
        except SLURM_FAILURES as exc:
            self.write_log("unchecked_slurm_error", job_id=job_id, action="update_job",
                           fields=sorted(fields), error=str(exc))
            return False
        return True

    def _stop_rejected(self, q: QueuedJob, d: Decided) -> bool:
        """Apply ``daemon.unchecked_running`` to what runs and hold what waits; True once
        Slurm took both (now, or as this queue read shows)."""
        ok = self._stop_running(q, d)
        to_hold = [r for r in q.pending if not _admin_held(r)]
        if to_hold and not self._hold(q.job_id, d):
            return False
        if q.pending and "held" not in d.done:
            d.done.add("held")
            self._event("unchecked_held", q, d, action="held")
        return ok

    def _hold(self, job_id: int, d: Decided) -> bool:
        try:
            self.slurm.hold(job_id, _one_line(f"slurmgate: {d.reason}"))
        except SLURM_FAILURES as exc:
            self.write_log("unchecked_slurm_error", job_id=job_id, action="hold",
                           error=str(exc))
            return False
        return True

    def _stop_running(self, q: QueuedJob, d: Decided) -> bool:
        if not q.running:
            return True
        if self.daemon.policy.daemon.unchecked_running == "finish":
            if "kept" not in d.done:
                d.done.add("kept")
                self._event("unchecked_running_kept", q, d, action="left to finish",
                            tasks=[r.job_id for r in q.running])
            return True
        ok, requeued, kept = True, [], []
        for r in q.running:
            if r.state not in REQUEUEABLE or (q.is_array and r.job_id == q.job_id):
                kept.append(r.job_id)  # the array's last task shares the array's id: a
                continue               # requeue of that id would rerun every task
            try:
                self.slurm.requeue(r.job_id, hold=True)
            except SLURM_FAILURES as exc:
                self.write_log("unchecked_slurm_error", job_id=r.job_id, action="requeue",
                               error=str(exc))
                ok = False
                continue
            requeued.append(r.job_id)
            # requeuehold leaves a user hold, which the user may lift: make it an admin's
            ok = self._hold(r.job_id, d) and ok
        if requeued:
            self._event("unchecked_requeued", q, d, action="requeued and held",
                        tasks=requeued)
        if kept and "kept" not in d.done:
            d.done.add("kept")
            self._event("unchecked_running_kept", q, d, action="left to finish (it cannot "
                        "be requeued alone)", tasks=kept)
        return ok

    def _event(self, kind: str, q: QueuedJob, d: Decided, *, action: str,
               **detail: Any) -> None:
        policy = self.daemon.policy
        self.write_log(kind, job_id=q.job_id, team=d.team, user=d.user, reason=d.reason,
                       code=d.code, **detail)
        with self.daemon.lock:
            self.store.add_event(
                kind, cluster=policy.daemon.cluster, job_id=q.job_id, team=d.team,
                user=d.user, actor="slurmgate",
                message=(f"job accepted unchecked, rejected on re-check, {action}: "
                         f"{d.message}")[:2000],
                detail={"reason": d.reason[:500], "code": d.code, "state": q.first.state,
                        "account": q.first.account, **detail})

    # -- array reservations -------------------------------------------------------------------

    def follow_array_throttles(self, live: list[dict[str, Any]], listed: Mapping[str, int],
                               jobs: list[Job]) -> int:
        """Re-price up the live reservations of arrays Slurm may run more of at once than
        reserved; ``listed`` is rid -> job id of what the queue shows. Returns how many."""
        with self._one_pass:
            arrays = {k: q for k, q in queued_jobs(jobs).items() if q.is_array}
            repriced = 0
            for r in live:
                q = arrays.get(listed.get(r["rid"], -1))
                if q is None or r["job_id"] not in (None, q.job_id):
                    continue
                try:
                    repriced += self._reprice(r, q)
                except Exception as exc:
                    self.write_log("reprice_error", rid=r["rid"], job_id=q.job_id,
                                   error=repr(exc))
            if repriced:
                self.daemon.refresh_ledger()
        return repriced

    def _reprice(self, r: Mapping[str, Any], q: QueuedJob) -> bool:
        tasks, cost = r["tasks"], float(r["est_cost"] or 0.0)
        if not isinstance(tasks, int) or tasks < 1:
            return False
        at_once = q.tasks_at_once()
        if at_once <= tasks:
            return False
        new_cost = round(cost / tasks * at_once, 6)
        with self.daemon.lock:
            if not self.store.reprice_reservation(r["rid"], at_once, new_cost):
                return False
            self.store.add_event(
                "reservation_repriced", cluster=self.daemon.policy.daemon.cluster,
                job_id=q.job_id, team=r["team"], user=r["user"], actor="slurmgate",
                message=(f"array {q.job_id}: Slurm may run {at_once} tasks at once "
                         f"(throttle {q.throttle or 'none'}, {q.tasks_holding_nodes()} "
                         f"holding nodes), {tasks} were reserved: reservation "
                         f"{cost:.2f} -> {new_cost:.2f}"),
                detail={"rid": r["rid"], "old_tasks": tasks, "new_tasks": at_once,
                        "old_cost": cost, "new_cost": new_cost, "throttle": q.throttle,
                        "running": q.tasks_holding_nodes(),
                        "not_ended": q.tasks_not_ended()})
        self.write_log("reservation_repriced", rid=r["rid"], job_id=q.job_id, team=r["team"],
                       old_tasks=tasks, new_tasks=at_once, old_cost=cost, new_cost=new_cost,
                       throttle=q.throttle, running=q.tasks_holding_nodes())
        return True


def _admin_held(job: Job) -> bool:
    """Held by an admin (a user's own hold, sbatch -H, the user may lift)."""
    return job.held and job.reason != "JobHeldUser"
