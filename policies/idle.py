"""The idle-GPU rule: when a running job's GPUs count as idle, for how long, and what is due.

Pure: the daemon's scan (slurm_plugin/daemon/idle.py) hands in what Slurm says of a running
job (``IdleJob``), the job's GPU samples summarised per time bucket (``Bucket``, from
db/idle.py) and the warnings and actions already logged for the run (``Done``), and gets back
what to do now (``due``), worded for the events (``event_message``).

How a job is judged (policy ``[idle]``):

- A GPU is idle in a bucket (one agent sampling interval, ``nvml.sample_seconds``) when every
  reading of it there is below ``threshold_percent``.
- The job is idle in a bucket when at least ``min_idle_fraction`` of its allocated GPUs were
  idle there, and busy when so many GPUs were busy that it cannot be idle (with 8 GPUs and
  fraction 1.0, one busy GPU is enough; 7 of 8 busy is never idle). Otherwise (GPUs that did
  not report) the bucket is unknown: it neither counts nor breaks the streak.
- Idle minutes are the idle buckets since the last busy one (or since the run started),
  counted at the bucket width: time without samples is never counted as idle.
- Evidence must be fresh: a job whose last idle bucket ended more than ``STALE_BUCKETS``
  intervals ago (the agent stopped, the node is unreachable) is not acted on.
- Jobs sharing GPUs (shards), jobs of exempt users, teams or partitions and, with
  ``exempt_interactive``, jobs without a batch script are not judged.

What is due, once per run (cluster, job id, restart count) and threshold, across daemon
restarts (the events in the database are the memory, see ``Done``):

- a warning at each ``warn_after_minutes`` threshold; when several are crossed at once (a
  coarse scan, a daemon that was down) only the highest is sent, the lower ones are passed;
- at ``act_after_minutes``, the ``action`` ("cancel" or "requeue"; "none": warnings only),
  never in the same scan as the run's first warning: a job is always warned before it is
  acted on, even when it crossed every threshold between two scans;
- with ``dry_run`` the same steps are reported (events with ``dry_run`` true) and nothing is
  done; dry-run steps do not count for the real ones, so switching dry run off later warns
  (and acts) for real.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from policies.config import Idle, Policy
from policies.cost import CostError, format_money, run_cost

STALE_BUCKETS = 3
"""The last idle bucket must have ended at most this many sampling intervals ago."""
EVENT_KINDS = ("idle_warning", "idle_action")
WARNING, ACTION = EVENT_KINDS


@dataclass(frozen=True)
class IdleJob:
    """A running job as the rule sees it (from Slurm's view of the run)."""

    cluster: str
    job_id: int
    restart_count: int
    start_ts: float
    gpus: float
    """GPUs allocated (fractions for shards)."""
    user: str | None = None
    team: str | None = None
    partition: str | None = None
    nodes: str | None = None
    batch: bool = True
    """False for a job without a batch script (salloc, srun)."""


@dataclass(frozen=True)
class Bucket:
    """One sampling interval of a job: how many of its GPUs reported, and how many of those
    stayed below the threshold throughout."""

    index: int
    """``floor(ts / width)``: the bucket spans [index * width, (index + 1) * width)."""
    gpus_seen: int
    gpus_idle: int


@dataclass(frozen=True)
class Summary:
    """A job's idle streak in buckets: what ``summarise`` (and db/idle.py, in SQL) make of
    its buckets."""

    idle_buckets: int
    """Idle buckets since the last busy one (or since the first)."""
    last_idle: int
    """Index of the newest of them."""
    gpus_idle: int
    gpus_seen: int
    """GPUs idle, and GPUs that reported, in that newest idle bucket."""


@dataclass(frozen=True)
class Streak:
    """How long a job has been idle, as of its newest bucket."""

    idle_minutes: float
    gpus_idle: int
    """Idle GPUs in the newest idle bucket."""
    gpus_allocated: int
    fresh: bool
    """The newest idle bucket is recent enough to act on."""


@dataclass(frozen=True)
class Step:
    """One thing due now: an event of ``kind`` answering ``threshold_minutes``."""

    kind: str
    threshold_minutes: float
    action: str
    """The policy's action: the one taken (idle_action) or the one to come (idle_warning)."""
    dry_run: bool


Done = frozenset[tuple[str, float, bool]]
"""(kind, threshold_minutes, dry_run) of the events already logged for a run."""


def exemption(idle: Idle, job: IdleJob) -> str | None:
    """Why the job is not judged, or None."""
    if job.gpus < 1 or job.gpus != math.floor(job.gpus):
        return "no whole GPUs (shared GPUs are not judged)"
    if job.user is not None and job.user in idle.exempt_users:
        return f"user {job.user} is exempt"
    if job.team is not None and job.team in idle.exempt_teams:
        return f"team {job.team} is exempt"
    if job.partition is not None and any(p in idle.exempt_partitions
                                         for p in job.partition.split(",")):
        return f"partition {job.partition} is exempt"
    if idle.exempt_interactive and not job.batch:
        return "interactive job (no batch script)"
    return None


def required_idle(idle: Idle, gpus: int) -> int:
    """How many of ``gpus`` must be idle for the job to be idle."""
    return max(1, min(gpus, math.ceil(idle.min_idle_fraction * gpus - 1e-9)))


def bucket_state(b: Bucket, allocated: int, need: int) -> int:
    """1: the job is idle in this bucket; -1: busy (too many GPUs busy for it to be idle,
    whatever the GPUs that did not report did); 0: unknown."""
    if b.gpus_idle >= need:
        return 1
    if b.gpus_seen - b.gpus_idle > max(allocated, b.gpus_seen) - need:
        return -1
    return 0


def summarise(idle: Idle, job: IdleJob, buckets: Iterable[Bucket]) -> Summary | None:
    """The job's current idle streak from its buckets (any order), or None when it is not
    idle now (busy in its newest judged bucket, or no idle bucket since). The rule itself;
    db/idle.py computes the same in SQL (tests hold the two equal)."""
    allocated = int(job.gpus)
    need = required_idle(idle, allocated)
    count = 0
    last: Bucket | None = None
    for b in sorted(buckets, key=lambda b: b.index):
        state = bucket_state(b, allocated, need)
        if state == 1:
            count += 1
            last = b
        elif state == -1:
            count, last = 0, None
    if last is None:
        return None
    return Summary(count, last.index, last.gpus_idle, last.gpus_seen)


def streak_of(job: IdleJob, summary: Summary, *, width_s: float, now: float) -> Streak:
    """Minutes and freshness of a summarised streak."""
    ended = (summary.last_idle + 1) * width_s
    return Streak(idle_minutes=summary.idle_buckets * width_s / 60.0,
                  gpus_idle=summary.gpus_idle,
                  gpus_allocated=max(int(job.gpus), summary.gpus_seen),
                  fresh=now - ended <= STALE_BUCKETS * width_s)


def streak(idle: Idle, job: IdleJob, buckets: Iterable[Bucket], *, width_s: float,
           now: float) -> Streak | None:
    """``summarise`` and ``streak_of`` in one."""
    summary = summarise(idle, job, buckets)
    return None if summary is None else streak_of(job, summary, width_s=width_s, now=now)


def due(idle: Idle, idle_minutes: float, done: Done) -> list[Step]:
    """What to log (and do) now for a run idle ``idle_minutes``, given what was logged for it
    before (``done``); at most one warning and one action, warning first."""
    dry = idle.dry_run
    action = idle.action
    acts = action != "none"
    steps: list[Step] = []
    warned = [t for kind, t, d in done if kind == WARNING and d == dry]
    acted = any(kind == ACTION and d == dry for kind, _, d in done)
    if acts and acted:
        return []
    crossed = [w for w in idle.warn_after_minutes if idle_minutes >= w]
    act_due = acts and idle_minutes >= idle.act_after_minutes
    if crossed and not any(t >= crossed[-1] for t in warned):
        steps.append(Step(WARNING, crossed[-1], action, dry))
    # a run never warned before (every threshold crossed since the last scan) is warned now
    # and acted on at the next scan
    if act_due and (warned or not idle.warn_after_minutes):
        steps.append(Step(ACTION, idle.act_after_minutes, action, dry))
    return steps


def cost_so_far(policy: Policy, *, seconds: float, gpu_type: str | None, gpus: float,
                cpus: int, mem_mb: int, partition: str | None,
                reserved: float | None = None, reserved_minutes: float | None = None) -> float:
    """The run's price so far: its allocation x ``seconds`` at the rate card
    (``policies.cost.run_cost``, energy not yet known). A request the rate card cannot price
    on its own (a mixed "a100+h100" reservation) is priced pro rata of its reservation
    (``reserved`` for ``reserved_minutes``); with neither, 0."""
    seconds = max(0.0, seconds)
    try:
        return run_cost(gpu_type=gpu_type, gpus=gpus, cpus=max(0, cpus),
                        mem_mb=max(0, mem_mb), seconds=seconds, energy_j=None, policy=policy,
                        partition=partition)["total"]
    except CostError:
        if reserved and reserved_minutes and reserved_minutes > 0:
            return round(reserved * min(1.0, seconds / 60.0 / reserved_minutes), 6)
        return 0.0


def format_minutes(value: float) -> str:
    """Idle minutes as people read them: whole minutes from 10 on, else one decimal (a test
    policy's 0.2-minute threshold must not read "0")."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")


def event_message(step: Step, job: IdleJob, s: Streak, *, threshold_percent: float,
                  cost: float, currency: str, act_after_minutes: float) -> str:
    """The event's message: written for the job's user, who must act."""
    what = (f"job {job.job_id} ({job.user or 'unknown user'}): {s.gpus_idle} of "
            f"{s.gpus_allocated} GPU{'s' if s.gpus_allocated != 1 else ''} below "
            f"{threshold_percent:g}% utilisation for {format_minutes(s.idle_minutes)} min, "
            f"{format_money(cost, currency)} so far")
    verb = {"cancel": "cancelled", "requeue": "requeued"}.get(step.action, "")
    prefix = "[dry run] " if step.dry_run else ""
    if step.kind == WARNING:
        if verb:
            then = (f"it will be {verb} after {format_minutes(act_after_minutes)} idle minutes"
                    + (" (dry run: it would be)" if step.dry_run else ""))
        else:
            then = "please use the GPUs or end the job"
        return f"{prefix}idle GPUs: {what}; {then} (scancel {job.job_id} frees them now)"
    if step.dry_run:
        return f"{prefix}idle GPUs: {what}; it would have been {verb} now"
    return f"idle GPUs: {what}; {verb} by the idle-GPU policy"
