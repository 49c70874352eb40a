"""The idle-GPU scan: running GPU jobs judged by their samples, warned, then acted on.

The reconcile loop hands it the queue that pass read (``scan_idle_gpus``, one call that never
waits), at most every ``[idle] scan_seconds``; the round runs in the scan's own thread, at a
lower CPU priority (``SCAN_NICE``) than the threads that decide submissions. One round:

1. the running jobs of the queue, less the exempt ones (``policies.idle.exemption``);
2. their idle streaks from the samples, the idle events already logged for their runs and their
   reservations, read on the daemon's read-only connection beside the decision lock (never
   under it; only an in-memory store, in tests, is read under the lock);
3. per job, the idle streak (``policies.idle.summarise``, computed in SQL by
   ``db.idle.idle_summaries``) and what is due (``policies.idle.due``);
4. each step: an action is confirmed with Slurm first (the job still runs the same run),
   then done through the Slurm client (``cancel`` / ``requeue``); then the event is written
   (``idle_warning`` / ``idle_action``, a short hold of the lock per event) and counted in
   Prometheus. An action Slurm refuses is logged and tried again next round (no event).

The events are the memory: a warning or action is never repeated for a run (cluster, job id,
restart count) and threshold, also after a restart of the daemon. Their fields are the alert
module's input: cluster, job_id, restart_count, user, team, node, message, and detail
{idle_minutes, gpus_idle, gpus_allocated, cost_so_far, currency, action, dry_run} plus
threshold_minutes (which threshold the event answers).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from policies.idle import (
    ACTION,
    STALE_BUCKETS,
    IdleJob,
    Step,
    Streak,
    cost_so_far,
    due,
    event_message,
    exemption,
    required_idle,
    streak_of,
)
from policies.tags import parse_admin_comment
from slurm_plugin.slurm.hostlist import expand

if TYPE_CHECKING:
    from db.store import Store
    from slurm_plugin.daemon.state import DaemonState
    from slurm_plugin.slurm.client import Job

CONFIRM_START_TOLERANCE_S = 2.0
"""The run Slurm reports before an action must have started within this of the judged one."""


class IdleScan:
    """The idle-GPU scan of one daemon (``scan_idle_gpus`` makes one per daemon)."""

    def __init__(self, daemon: DaemonState) -> None:
        self.daemon = daemon
        self.last_scan: float | None = None
        """time.monotonic() of the last round (None: none yet)."""
        self._running = threading.Lock()
        self._handoff = threading.Lock()
        self._queue: Sequence[Job] | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def is_due(self) -> bool:
        idle = self.daemon.policy.idle
        return idle.enabled and (self.last_scan is None
                                 or time.monotonic() - self.last_scan >= idle.scan_seconds)

    def hand_over(self, jobs: Sequence[Job]) -> bool:
        """Give the queue to the scan's own thread when a round is due (started on first
        use); True when it was handed over. Returns at once: the caller (the reconcile pass)
        never waits for a round."""
        if not self.is_due():
            return False
        with self._handoff:
            self._queue = jobs
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="idle_scan",
                                                daemon=True)
                self._thread.start()
        self._wake.set()
        return True

    def _loop(self) -> None:
        lower_this_threads_priority()
        while not self.daemon.stopping.is_set():
            if not self._wake.wait(1.0):
                continue
            self._wake.clear()
            with self._handoff:
                jobs, self._queue = self._queue, None
            if jobs is not None:
                self.maybe_scan(jobs)

    def maybe_scan(self, jobs: Sequence[Job], now: float | None = None) -> dict[str, int] | None:
        """A round when the policy enables the scan and ``scan_seconds`` have passed since
        the last; None otherwise. Never raises: a failed round is logged and counted."""
        if not self.is_due():
            return None
        if not self._running.acquire(blocking=False):
            return None  # another thread's round is under way
        try:
            self.last_scan = time.monotonic()
            return self.scan(jobs, now)
        except Exception as exc:
            self.daemon.metrics.error("idle")
            self.daemon.log.write("idle_scan_error", error=repr(exc))
            return None
        finally:
            self._running.release()

    # -- one round -----------------------------------------------------------------------------

    def candidates(self, jobs: Sequence[Job]) -> tuple[dict[int, tuple[IdleJob, Job]], int]:
        """Running GPU jobs not exempt, by job id, and how many were exempt."""
        policy = self.daemon.policy
        cluster = policy.daemon.cluster
        out: dict[int, tuple[IdleJob, Job]] = {}
        exempt = 0
        for j in jobs:
            if j.state != "RUNNING" or j.start_ts is None or j.gpus <= 0:
                continue
            team = (parse_admin_comment(j.admin_comment).get("team")
                    or policy.team_for(j.account, j.user))
            ij = IdleJob(cluster=cluster, job_id=j.job_id, restart_count=j.restart_count,
                         start_ts=j.start_ts, gpus=j.gpus, user=j.user, team=team,
                         partition=j.partition, nodes=j.nodes, batch=j.batch)
            if exemption(policy.idle, ij) is not None:
                exempt += 1
                continue
            out[j.job_id] = (ij, j)
        return out, exempt

    def _read(self, store: Store, since: dict[int, float], runs: dict[int, float],
              jobs: dict[int, tuple[IdleJob, Job]]) -> tuple[Any, Any, Any]:
        from db.idle import idle_events, idle_summaries, live_reservations_of_jobs

        policy = self.daemon.policy
        cluster = policy.daemon.cluster
        wanted = {jid: (since[jid], required_idle(policy.idle, int(ij.gpus)), int(ij.gpus))
                  for jid, (ij, _) in jobs.items()}
        # only the samples of the nodes Slurm runs the job on now: a node the job failed on
        # may still tag its GPUs with the job's id (its baseline was never cleared)
        on_nodes = {jid: expand(job.nodes) for jid, (_, job) in jobs.items() if job.nodes}
        summaries = idle_summaries(store, wanted, width_s=policy.nvml.sample_seconds,
                                   threshold_percent=policy.idle.threshold_percent,
                                   nodes=on_nodes)
        done = idle_events(store, cluster, runs)
        resv = live_reservations_of_jobs(store, cluster,
                                         {j.array_job_id or j.job_id for _, j in jobs.values()})
        return summaries, done, resv

    def scan(self, jobs: Sequence[Job], now: float | None = None) -> dict[str, int]:
        """One round over ``jobs`` (Slurm's queue); returns counts: judged, exempt, idle
        (past their first threshold), warned, acted."""
        d = self.daemon
        policy = d.policy
        idle = policy.idle
        now = time.time() if now is None else now
        t0 = time.perf_counter()
        wanted, exempt = self.candidates(jobs)
        width = policy.nvml.sample_seconds
        horizon = max([idle.act_after_minutes, *idle.warn_after_minutes]) * 60.0
        window = horizon + (STALE_BUCKETS + 2) * width
        since = {jid: max(ij.start_ts, now - window) for jid, (ij, _) in wanted.items()}
        runs = {jid: ij.start_ts for jid, (ij, _) in wanted.items()}
        counts = {"judged": len(wanted), "exempt": exempt, "idle": 0, "warned": 0, "acted": 0}
        if wanted:
            store = d.reader()
            if store is not None:
                summaries, done_rows, resv = self._read(store, since, runs, wanted)
            else:
                with d.lock:
                    summaries, done_rows, resv = self._read(d.need_store(), since, runs,
                                                            wanted)
            done: dict[tuple[int, int | None], set[tuple[str, float, bool]]] = {}
            for job_id, restart, kind, threshold, dry in done_rows:
                if threshold is not None:
                    done.setdefault((job_id, restart), set()).add((kind, threshold, dry))
            first = min([*idle.warn_after_minutes, idle.act_after_minutes])
            for job_id, (ij, job) in wanted.items():
                summary = summaries.get(job_id)
                if summary is None:
                    continue
                s = streak_of(ij, summary, width_s=width, now=now)
                if not s.fresh:
                    continue
                if s.idle_minutes >= first:
                    counts["idle"] += 1
                steps = due(idle, s.idle_minutes,
                            frozenset(done.get((job_id, ij.restart_count), ())))
                for step in steps:
                    try:
                        done_now = self.carry_out(step, ij, job, s,
                                                  resv.get(job.array_job_id or job_id), now)
                    except Exception as exc:  # one job's trouble never ends the round
                        d.metrics.error("idle")
                        d.log.write("idle_step_error", job_id=job_id, kind=step.kind,
                                    error=repr(exc))
                        break
                    if done_now:
                        counts["warned" if step.kind != ACTION else "acted"] += 1
        elapsed = time.perf_counter() - t0
        d.metrics.idle_scan(elapsed, counts["idle"])
        d.log.write("idle_scan", seconds=round(elapsed, 4), **counts)
        return counts

    # -- one step ------------------------------------------------------------------------------

    def cost(self, ij: IdleJob, job: Job, resv: dict[str, Any] | None, now: float) -> float:
        policy = self.daemon.policy
        seconds = now - ij.start_ts
        if resv is not None:
            minutes = resv.get("time_limit_min")
            return cost_so_far(
                policy, seconds=seconds, gpu_type=resv.get("gpu_type"),
                gpus=float(resv.get("gpus") or job.gpus), cpus=int(resv.get("cpus") or 0),
                mem_mb=int(resv.get("mem_mb") or 0),
                partition=resv.get("partition") or job.partition,
                reserved=float(resv.get("est_cost") or 0.0) / max(1, int(resv.get("tasks")
                                                                        or 1)),
                reserved_minutes=float(minutes) if minutes else None)
        return cost_so_far(policy, seconds=seconds, gpu_type=job.gpu_type, gpus=job.gpus,
                           cpus=job.cpus, mem_mb=(job.min_mem_per_node or 0)
                           * max(1, job.node_count), partition=job.partition)

    def confirmed(self, ij: IdleJob) -> str | None:
        """Why the action must not happen (Slurm no longer runs this run), or None."""
        slurm = self.daemon.slurm
        if slurm is None:
            return "no Slurm client"
        now_job = slurm.job(ij.job_id)
        if now_job is None or now_job.state != "RUNNING":
            return f"job is {now_job.state if now_job else 'gone'}"
        if now_job.restart_count != ij.restart_count or now_job.start_ts is None or abs(
                now_job.start_ts - ij.start_ts) > CONFIRM_START_TOLERANCE_S:
            return "job runs another run now"
        return None

    def carry_out(self, step: Step, ij: IdleJob, job: Job, s: Streak,
                  resv: dict[str, Any] | None, now: float) -> bool:
        """Do the step (an action unless dry run), then log its event. False when the action
        was not done (it is tried again next round)."""
        d = self.daemon
        policy = d.policy
        cost = self.cost(ij, job, resv, now)
        if step.kind == ACTION and not step.dry_run:
            try:
                why = self.confirmed(ij)
                if why is None and d.slurm is not None:
                    if step.action == "requeue":
                        d.slurm.requeue(ij.job_id)
                    else:
                        d.slurm.cancel(ij.job_id)
            except Exception as exc:  # SlurmError, InvalidSlurmValue, a backend's bug
                why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                d.metrics.error("idle")
                d.log.write("idle_action_failed", job_id=ij.job_id,
                            restart_count=ij.restart_count, action=step.action, reason=why)
                return False
        message = event_message(step, ij, s, threshold_percent=policy.idle.threshold_percent,
                                cost=cost, currency=policy.rates.currency,
                                act_after_minutes=policy.idle.act_after_minutes)
        detail = {
            "idle_minutes": round(s.idle_minutes, 2), "gpus_idle": s.gpus_idle,
            "gpus_allocated": s.gpus_allocated, "cost_so_far": round(cost, 2),
            "currency": policy.rates.currency, "action": step.action,
            "dry_run": step.dry_run, "threshold_minutes": step.threshold_minutes,
        }
        with d.lock:
            d.need_store().add_event(step.kind, ts=now, cluster=ij.cluster, job_id=ij.job_id,
                                     restart_count=ij.restart_count, team=ij.team,
                                     user=ij.user, node=ij.nodes, actor="slurmgate",
                                     message=message[:2000], detail=detail)
        d.metrics.idle_event(step.kind, step.action, step.dry_run)
        d.log.write(step.kind, job_id=ij.job_id, restart_count=ij.restart_count,
                    user=ij.user, team=ij.team, node=ij.nodes, **detail)
        return True


_SCANS: weakref.WeakKeyDictionary[Any, IdleScan] = weakref.WeakKeyDictionary()
_SCANS_MADE = threading.Lock()


def idle_scan_of(daemon: DaemonState) -> IdleScan:
    """The one IdleScan of this daemon."""
    with _SCANS_MADE:
        scan = _SCANS.get(daemon)
        if scan is None:
            scan = _SCANS[daemon] = IdleScan(daemon)
        return scan


SCAN_NICE = 10
"""Nice value of the scan's thread: when CPUs are short the decisions come first."""


def lower_this_threads_priority(nice: int = SCAN_NICE) -> None:
    """Raise the calling thread's nice value to ``nice`` (Linux keeps one per thread; an
    unprivileged process may raise but not lower it). Elsewhere, or when refused: as is."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError):
        pass


def scan_idle_gpus(daemon: DaemonState, jobs: Sequence[Job]) -> bool:
    """The reconcile loop's call: hands the queue it read to the idle-GPU scan's thread when a
    round is due (``[idle] enabled``, ``scan_seconds``); True when one was. Never raises and
    never waits for the round."""
    try:
        return idle_scan_of(daemon).hand_over(jobs)
    except Exception as exc:  # the reconcile pass goes on whatever happens here
        daemon.log.write("idle_scan_error", error=repr(exc))
        return False
