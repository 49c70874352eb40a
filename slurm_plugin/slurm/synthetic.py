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
    """

    def __init__(self, n_jobs: int = 1000, n_nodes: int = 64, seed: int = 0,
                 gpus_per_node: int = 8, base_ts: float = 1_700_000_000.0,
                 cluster: str = "synthetic", clock: Any = None):
        if n_nodes <= 0 or n_jobs < 0:
            raise ValueError("need at least one node and a non-negative number of jobs")
        self._lock = threading.Lock()
        self._clock = clock or time.time
        self.calls = 0
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
                cpus=gpus * 8, work_dir=f"/home/{user}", cluster=cluster)
            if state == "RUNNING":
                n = self._nodes[node]
                used = dict(n.gpus_used)
                used[gpu_type] = min(n.gpus_total[gpu_type], used[gpu_type] + gpus)
                self._nodes[node] = replace(n, gpus_used=used, state="mixed",
                                            alloc_cpus=min(n.cpus, n.alloc_cpus + gpus * 8))

    # -- queries ---------------------------------------------------------------------------

    def jobs(self, job_ids: Iterable[int] | None = None) -> list[Job]:
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

    def _change(self, job_id: int, what: str, fn: Any) -> None:
        check_job_id(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise SlurmError(f"synthetic {what} {job_id}", 1,
                                 f"Invalid job id specified for job {job_id}")
            self._jobs[job_id] = fn(job)

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
        self._change(job_id, "update", lambda j: replace(j, **mapped))

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
