"""SyntheticSlurm: a deterministic in-memory cluster for tests, benchmarks and the TUI demo.

Never chosen by ``factory.open_client``; never for a real cluster.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from slurm_plugin.slurm.client import (
    Job,
    Node,
    SlurmError,
    check_job_fields,
    check_job_id,
    check_node_name,
    check_reason,
    check_text,
    task_id_ranges,
)

log = logging.getLogger("slurmgate.slurm")


_SYN_USERS = (("alice", 1001, "vision"), ("bob", 1002, "nlp"), ("carol", 1003, "vision"),
              ("dave", 1004, "speech"), ("erin", 1005, "nlp"), ("frank", 1006, "robotics"))
_SYN_PROJECTS = {"vision": "vit-scaling", "nlp": "llm-pretrain", "speech": "asr-v2",
                 "robotics": "sim2real"}
_SYN_TYPES = ("a100", "h100", "l40s")
_SYN_PENDING_REASONS = ("Priority", "Resources", "JobHeldAdmin", "BeginTime", "Dependency")


class SyntheticSlurm:
    """A deterministic in-memory cluster: ``n_jobs`` jobs on ``n_nodes`` nodes from ``seed``.

    FOR TESTS AND BENCHMARKS ONLY (the TUI's 10,000-job test, bench/). It implements the
    SlurmClient interface with the same validation as the real backends; actions change the
    in-memory state. Timestamps are relative to ``base_ts`` so two instances with the same
    arguments report identical jobs. ``calls`` counts queries, like a real controller's load.
    Thread-safe.

    Tests add their own jobs (``add_job``) and job arrays (``add_array``, ``start_array_task``,
    ``set_array_throttle``), end and purge them (``finish``, ``purge``) and make the next
    actions fail like an unreachable controller (``fail_next``). Arrays behave as in Slurm:
    the head record (job id = array job id) stands for the tasks still waiting, tasks get
    records of their own when they start, and an action on the array job id acts on every
    task of the array.
    """

    def __init__(self, n_jobs: int = 1000, n_nodes: int = 64, seed: int = 0,
                 gpus_per_node: int = 8, base_ts: float = 1_700_000_000.0,
                 cluster: str = "synthetic", clock: Any = None):
        if n_nodes <= 0 or n_jobs < 0:
            raise ValueError("need at least one node and a non-negative number of jobs")
        self._lock = threading.Lock()
        self._clock = clock or time.time
        self.calls = 0
        self._failing: dict[str, int] = {}
        self._waiting: dict[int, list[int]] = {}
        """Per array job id: task ids not yet split off the head record."""
        rng = random.Random(seed)
        width = max(3, len(str(n_nodes)))
        self._nodes: dict[str, Node] = {}
        for i in range(n_nodes):
            gpu_type = _SYN_TYPES[i % len(_SYN_TYPES)]
            name = f"gpu{i + 1:0{width}d}"
            self._nodes[name] = Node(
                name=name, state="idle", gpus_total={gpu_type: gpus_per_node},
                gpus_used={gpu_type: 0}, cpus=64, partitions=("gpu", "scavenger"))
        names = list(self._nodes)
        self._jobs: dict[int, Job] = {}
        job_id = 1000
        for _ in range(n_jobs):
            job_id += 1
            user, uid, team = rng.choice(_SYN_USERS)
            roll = rng.random()
            state = ("RUNNING" if roll < 0.45 else "PENDING" if roll < 0.85
                     else rng.choice(("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")))
            gpus = rng.choice((1, 1, 2, 4, 8))
            submit = base_ts - rng.randint(60, 86_400)
            limit = rng.choice((30, 60, 240, 1440))
            node = rng.choice(names)
            gpu_type = next(iter(self._nodes[node].gpus_total))
            start = end = None
            reason = None
            nodes = None
            priority = rng.randint(1000, 100_000)
            if state == "PENDING":
                reason = rng.choice(_SYN_PENDING_REASONS)
                if reason == "JobHeldAdmin":
                    priority = 0
            else:
                start = submit + rng.randint(0, 3600)
                nodes = node
                if state != "RUNNING":
                    end = start + rng.randint(60, limit * 60)
            project = _SYN_PROJECTS[team]
            self._jobs[job_id] = Job(
                job_id=job_id, user=user, uid=uid, account=team, partition="gpu",
                state=state, reason=reason, nice=rng.choice((0, 0, 0, 100, 500)),
                priority=priority, comment=f"project={project},cost_center=CC{uid}",
                admin_comment=f"slurmgate:team={team};rid=r{job_id:016x};project={project}",
                gpu_type=gpu_type, gpus=float(gpus), nodes=nodes, node_count=1,
                submit_ts=submit, start_ts=start, end_ts=end, time_limit_min=limit,
                restart_count=0, requeue=True,
                exit_code=("0:0" if state == "COMPLETED" else "1:0" if end else None),
                cpus=gpus * 8, work_dir=f"/home/{user}", cluster=cluster,
                tres_per_node=f"gres:gpu:{gpus}", num_tasks=1, cpus_per_task=gpus * 8)
            if state == "RUNNING":
                n = self._nodes[node]
                used = dict(n.gpus_used)
                used[gpu_type] = min(n.gpus_total[gpu_type], used[gpu_type] + gpus)
                self._nodes[node] = replace(n, gpus_used=used, state="mixed",
                                            alloc_cpus=min(n.cpus, n.alloc_cpus + gpus * 8))

    # -- test set-up -------------------------------------------------------------------------

    def _next_id(self) -> int:
        return max(self._jobs, default=1000) + 1

    def add_job(self, **fields: Any) -> Job:
        """Submit a job with these Job fields (job id: the next free one unless given; a
        RUNNING job gets a start time and a node). Returns it."""
        with self._lock:
            now = self._clock()
            fields.setdefault("job_id", self._next_id())
            fields.setdefault("submit_ts", now)
            fields.setdefault("cluster", "synthetic")
            fields.setdefault("priority", 1000)
            if fields.get("state") not in (None, "PENDING"):
                fields.setdefault("start_ts", now)
                fields.setdefault("nodes", next(iter(self._nodes)))
                fields.setdefault("node_count", 1)
            job = Job(**fields)
            if job.job_id in self._jobs:
                raise ValueError(f"job {job.job_id} exists already")
            self._jobs[job.job_id] = job
            return job

    def add_array(self, task_ids: Iterable[int], throttle: int = 0, running: int = 0,
                  **fields: Any) -> int:
        """Submit a job array (``--array=<task_ids>%<throttle>``) with these Job fields, and
        start its first ``running`` tasks. Returns the array job id."""
        ids = sorted(set(task_ids))
        if not ids:
            raise ValueError("an array needs at least one task id")
        head = self.add_job(**fields, state="PENDING", array_task_id=None,
                            array_max_tasks=throttle or None)
        with self._lock:
            self._jobs[head.job_id] = replace(head, array_job_id=head.job_id)
            self._waiting[head.job_id] = ids
            self._write_head(head.job_id)
        for _ in range(running):
            self.start_array_task(head.job_id)
        return head.job_id

    def _write_head(self, array_id: int) -> None:
        """The head record's waiting-task string, as squeue shows it ("2-9%4")."""
        head = self._jobs[array_id]
        waiting = self._waiting.get(array_id, [])
        if head.array_task_id is not None:
            return
        spec = task_id_ranges(waiting)
        if spec and head.array_max_tasks:
            spec += f"%{head.array_max_tasks}"
        self._jobs[array_id] = replace(head, array_task_string=spec or None)

    def start_array_task(self, array_id: int) -> Job:
        """Start the array's next waiting task (as slurmctld does: a record of its own, or
        the head record itself for the last one). Slurm's throttle is not checked here."""
        with self._lock:
            waiting = self._waiting.get(array_id) or []
            if not waiting:
                raise ValueError(f"array {array_id} has no waiting task")
            task = waiting.pop(0)
            head = self._jobs[array_id]
            now = self._clock()
            running: dict[str, Any] = {"state": "RUNNING", "start_ts": now, "reason": None,
                                       "nodes": next(iter(self._nodes)), "node_count": 1,
                                       "array_task_id": task, "array_task_string": None}
            if waiting:
                job = replace(head, job_id=self._next_id(), **running)
                self._jobs[job.job_id] = job
                self._write_head(array_id)
            else:
                job = replace(head, **running)
                self._jobs[array_id] = job
            return job

    def set_array_throttle(self, array_id: int, throttle: int) -> None:
        """``scontrol update JobId=<array> ArrayTaskThrottle=<throttle>`` (0: none)."""
        with self._lock:
            for job_id, job in list(self._jobs.items()):
                if job.array_job_id == array_id:
                    self._jobs[job_id] = replace(job, array_max_tasks=throttle or None)
            self._write_head(array_id)

    def finish(self, job_id: int, state: str = "COMPLETED") -> None:
        """The job (one record) ends in ``state``; it stays listed until ``purge``."""
        now = self._clock()
        self._change(job_id, "finish", lambda j: replace(
            j, state=state, end_ts=now, start_ts=j.start_ts or now, reason=None,
            array_task_string=None), whole_array=False)
        with self._lock:
            if job_id in self._waiting and self._jobs[job_id].array_task_id is None:
                self._waiting.pop(job_id)  # a head record ending takes its waiting tasks along

    def purge(self, job_id: int) -> None:
        """The job's record leaves the queue (MinJobAge passed)."""
        with self._lock:
            self._jobs.pop(job_id, None)

    def fail_next(self, action: str, times: int = 1) -> None:
        """The next ``times`` calls of ``action`` ("jobs", "hold", "update_job", ...) fail as
        if slurmctld could not be reached."""
        with self._lock:
            self._failing[action] = self._failing.get(action, 0) + times

    def _maybe_fail(self, action: str) -> None:
        with self._lock:
            left = self._failing.get(action, 0)
            if left <= 0:
                return
            self._failing[action] = left - 1
        raise SlurmError(f"synthetic {action}", 1,
                         "Unable to contact slurm controller (connect failure)")

    # -- queries ---------------------------------------------------------------------------

    def jobs(self, job_ids: Iterable[int] | None = None) -> list[Job]:
        self._maybe_fail("jobs")
        with self._lock:
            self.calls += 1
            if job_ids is None:
                return list(self._jobs.values())
            wanted = dict.fromkeys(job_ids)
            return [self._jobs[j] for j in wanted if j in self._jobs]

    def job(self, job_id: int) -> Job | None:
        check_job_id(job_id)
        found = self.jobs([job_id])
        return found[0] if found else None

    def nodes(self) -> list[Node]:
        with self._lock:
            self.calls += 1
            return list(self._nodes.values())

    # -- job actions -----------------------------------------------------------------------

    def _change(self, job_id: int, what: str, fn: Any, whole_array: bool = True) -> None:
        """Apply ``fn`` to the job, or with ``whole_array`` to every task of the array
        ``job_id`` names (Slurm: an update of the array job id updates all its tasks)."""
        check_job_id(job_id)
        self._maybe_fail(what)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise SlurmError(f"synthetic {what} {job_id}", 1,
                                 f"Invalid job id specified for job {job_id}")
            if not whole_array or job.array_job_id != job_id:
                self._jobs[job_id] = fn(job)
                return
            tasks = [j for j in self._jobs.values() if j.array_job_id == job_id]
            changed, errors = {}, []
            for task in tasks:
                try:
                    changed[task.job_id] = fn(task)
                except SlurmError as exc:
                    errors.append(exc)
            self._jobs.update(changed)
            if errors and not changed:
                raise errors[0]

    def hold(self, job_id: int, reason: str | None = None) -> None:
        if reason is not None:
            check_text("hold reason", reason)

        def held(job: Job) -> Job:
            # as slurmctld: a running job keeps running, but with priority 0
            if job.finished:
                raise SlurmError(f"synthetic hold {job_id}", 1,
                                 f"Job has already finished for job {job_id}")
            return replace(job, priority=0, reason="JobHeldAdmin")

        self._change(job_id, "hold", held)
        log.info("held job %s: %s", job_id, reason or "(no reason given)")

    def release(self, job_id: int) -> None:
        self._change(job_id, "release",
                     lambda j: replace(j, priority=j.priority or 1000, reason=None)
                     if j.held else j)

    def requeue(self, job_id: int, hold: bool = False) -> None:
        def requeued(job: Job) -> Job:
            if job.pending:
                raise SlurmError(f"synthetic requeue {job_id}", 1,
                                 f"Job is pending execution for job {job_id}")
            return replace(job, state="PENDING", start_ts=None, end_ts=None, nodes=None,
                           restart_count=job.restart_count + 1,
                           reason="JobHeldAdmin" if hold else "BeginTime",
                           priority=0 if hold else (job.priority or 1000))

        self._change(job_id, "requeue", requeued)

    def cancel(self, job_id: int) -> None:
        now = self._clock()
        self._change(job_id, "cancel", lambda j: j if j.finished else replace(
            j, state="CANCELLED", end_ts=now, start_ts=j.start_ts or now, reason=None))

    def update_job(self, job_id: int, **fields: Any) -> None:
        clean = check_job_fields(fields)
        mapped: dict[str, Any] = {}
        for name, value in clean.items():
            if name == "time_limit":
                mapped["time_limit_min"] = value
            elif name in ("comment", "admin_comment", "exc_nodes"):
                mapped[name] = value or None
            else:
                mapped[name] = value
        self._change(job_id, "update_job", lambda j: replace(j, **mapped))

    # -- node actions ----------------------------------------------------------------------

    def _node_change(self, node: str, fn: Any) -> None:
        check_node_name(node)
        with self._lock:
            if node not in self._nodes:
                raise SlurmError(f"synthetic update NodeName={node}", 1,
                                 "Invalid node name specified")
            self._nodes[node] = fn(self._nodes[node])

    def drain(self, node: str, reason: str) -> None:
        check_reason(reason)
        self._node_change(node, lambda n: replace(
            n, flags=tuple(sorted({*n.flags, "DRAIN"})), reason=reason))

    def resume(self, node: str) -> None:
        def resumed(n: Node) -> Node:
            if not n.drained and n.state != "down":
                raise SlurmError(f"synthetic update NodeName={node} State=RESUME", 1,
                                 "Invalid node state specified")
            busy = any(n.gpus_used.values())
            return replace(n, flags=tuple(f for f in n.flags if f != "DRAIN"), reason=None,
                           state="mixed" if busy else "idle")

        self._node_change(node, resumed)

    def set_down(self, node: str, reason: str) -> None:
        check_reason(reason)
        self._node_change(node, lambda n: replace(n, state="down", reason=reason))
