"""The queue as the Queue view shows it: jobs with their team and estimated cost, filtered,
searched, sorted and capped. Pure functions; runs in worker threads.

Team and project come from the admin_comment slurmgate wrote at submit (else the policy's
account/user map). The estimated cost is the job's reservation when the store has one (the
worst case the daemon reserved), else ``policies.cost.estimate_job`` of what Slurm reports
(memory is not in squeue's output, so that estimate leaves memory out).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rich.text import Text

from policies.config import Policy
from policies.cost import estimate_job
from policies.request import JobRequest
from policies.tags import parse_admin_comment
from slurm_plugin.slurm.client import Job
from tui import format as fmt

COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "Job"), ("user", "User"), ("team", "Team"), ("project", "Project"),
    ("partition", "Part"), ("state", "State"), ("reason", "Reason"), ("gpus", "GPUs"),
    ("nodes", "Nodes"), ("wait", "Wait"), ("time", "Elapsed/Limit"), ("cost", "Est.cost"),
)
COLUMN_KEYS = tuple(k for k, _ in COLUMNS)
FILTER_FIELDS = ("team", "user", "partition", "state")
STATE_STYLE = {"RUNNING": "green", "PENDING": "yellow", "COMPLETING": "cyan",
               "FAILED": "red", "NODE_FAIL": "red", "TIMEOUT": "red", "OUT_OF_MEMORY": "red",
               "CANCELLED": "dim", "COMPLETED": "dim"}
DEFAULT_LIMIT = 500


@dataclass(frozen=True)
class QueueQuery:
    """What the admin asked to see; ``None`` filters match everything."""

    team: str | None = None
    user: str | None = None
    partition: str | None = None
    state: str | None = None
    search: str = ""
    sort: str = "id"
    reverse: bool = False
    limit: int = DEFAULT_LIMIT

    def describe(self) -> str:
        parts = [f"{f}={getattr(self, f)}" for f in FILTER_FIELDS if getattr(self, f)]
        if self.search:
            parts.append(f"/{self.search}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class QueueJob:
    job: Job
    team: str | None
    project: str | None
    est_cost: float | None
    admin_items: tuple[tuple[str, str], ...] = ()

    @property
    def admin(self) -> dict[str, str]:
        """What slurmgate recorded in the admin_comment: team, rid, project, tags."""
        return dict(self.admin_items)

    @property
    def key(self) -> str:
        return str(self.job.job_id)

    @property
    def label(self) -> str:
        j = self.job
        if j.array_job_id and j.array_task_id is not None:
            return f"{j.array_job_id}_{j.array_task_id}"
        return str(j.job_id)


@dataclass(frozen=True)
class QueueResult:
    shown: list[QueueJob]
    matched: int
    total: int
    query: QueueQuery
    now: float
    values: dict[str, list[str]]
    """Distinct team/user/partition/state values of the visible jobs, for the filter dialog."""


@lru_cache(maxsize=262_144)
def _admin(text: str | None) -> tuple[tuple[str, str], ...]:
    return tuple(parse_admin_comment(text).items())


class CostEstimator:
    """``estimate_job`` per distinct (partition, GPUs, CPUs, limit, nodes); few per queue."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._cache: dict[tuple[Any, ...], float | None] = {}

    def __call__(self, job: Job) -> float | None:
        key = (job.partition, job.gpu_type, job.gpus, job.cpus, job.time_limit_min,
               job.node_count)
        if key not in self._cache:
            self._cache[key] = self._estimate(job)
        return self._cache[key]

    def _estimate(self, job: Job) -> float | None:
        gpu = ""
        if job.gpus:
            n = int(job.gpus) if float(job.gpus).is_integer() else job.gpus
            gpu = f"gres:gpu:{job.gpu_type}:{n}" if job.gpu_type else f"gres:gpu:{n}"
        try:
            req = JobRequest(partition=job.partition, time_limit=job.time_limit_min,
                             tres_per_job=gpu or None, min_cpus=job.cpus or None,
                             min_nodes=job.node_count or None)
            return estimate_job(req, self.policy).amount
        except ValueError:  # a GPU type the rate card does not price: shown as unknown
            return None


def annotate(jobs: Iterable[Job], policy: Policy, reservations: dict[str, float],
             estimator: CostEstimator) -> list[QueueJob]:
    """Team, project and estimated cost of every job (``reservations``: rid -> est_cost)."""
    out = []
    for job in jobs:
        items = _admin(job.admin_comment)
        admin = dict(items)
        team = admin.get("team") or policy.team_for(job.account, job.user)
        rid = admin.get("rid")
        cost = reservations.get(rid) if rid else None
        if cost is None:
            cost = estimator(job)
        out.append(QueueJob(job, team, admin.get("project"), cost, items))
    return out


def wait_seconds(job: Job, now: float) -> float | None:
    if job.submit_ts is None:
        return None
    end = job.start_ts if job.start_ts is not None else (job.end_ts or now)
    return max(0.0, end - job.submit_ts)


def elapsed_seconds(job: Job, now: float) -> float | None:
    if job.start_ts is None:
        return None
    return max(0.0, (job.end_ts or now) - job.start_ts)


def _sort_key(name: str, now: float):  # -> Callable[[QueueJob], Any]
    def text(v: str | None) -> str:
        return (v or "").lower()

    def num(v: float | None) -> float:
        return -1.0 if v is None else v

    keys = {
        "id": lambda q: q.job.job_id,
        "user": lambda q: (text(q.job.user), q.job.job_id),
        "team": lambda q: (text(q.team), q.job.job_id),
        "project": lambda q: (text(q.project), q.job.job_id),
        "partition": lambda q: (text(q.job.partition), q.job.job_id),
        "state": lambda q: (q.job.state, q.job.job_id),
        "reason": lambda q: (text(q.job.reason), q.job.job_id),
        "gpus": lambda q: (q.job.gpus, text(q.job.gpu_type), q.job.job_id),
        "nodes": lambda q: (text(q.job.nodes), q.job.job_id),
        "wait": lambda q: (num(wait_seconds(q.job, now)), q.job.job_id),
        "time": lambda q: (num(elapsed_seconds(q.job, now)), q.job.job_id),
        "cost": lambda q: (num(q.est_cost), q.job.job_id),
    }
    return keys.get(name, keys["id"])


def _haystack(q: QueueJob) -> str:
    j = q.job
    return " ".join(str(v) for v in (q.label, j.user, q.team, q.project, j.partition, j.state,
                                     j.reason, j.nodes, j.account) if v).lower()


def select(jobs: Sequence[QueueJob], query: QueueQuery, now: float) -> QueueResult:
    """Filter, search, sort and cap; ``matched`` counts everything that passed the filters."""
    teams, users, partitions, states = set(), set(), set(), set()
    picked = []
    needle = query.search.strip().lower()
    want_team, want_user, want_part, want_state = (query.team, query.user, query.partition,
                                                   query.state)
    for q in jobs:
        j = q.job
        teams.add(q.team)
        users.add(j.user)
        partitions.add(j.partition)
        states.add(j.state)
        if ((want_team and q.team != want_team) or (want_user and j.user != want_user)
                or (want_part and j.partition != want_part)
                or (want_state and j.state != want_state)):
            continue
        if needle and needle not in _haystack(q):
            continue
        picked.append(q)
    values = {"team": teams, "user": users, "partition": partitions, "state": states}
    picked.sort(key=_sort_key(query.sort, now), reverse=query.reverse)
    return QueueResult(picked[:max(0, query.limit)], len(picked), len(jobs), query, now,
                       {k: sorted(x for x in v if x) for k, v in values.items()})


def cells(q: QueueJob, now: float, currency: str) -> tuple[str | Text, ...]:
    j = q.job
    limit = fmt.duration(j.time_limit_min * 60) if j.time_limit_min else "none"
    state = Text(j.state, style=STATE_STYLE.get(j.state, ""))
    if j.held:
        state = Text("HELD", style="magenta")
    return (
        q.label, j.user or "-", q.team or "-", q.project or "-", j.partition or "-", state,
        j.reason or "", fmt.gpus(j.gpu_type, j.gpus), j.nodes or f"({j.node_count})",
        fmt.duration(wait_seconds(j, now)),
        f"{fmt.duration(elapsed_seconds(j, now))}/{limit}",
        Text(fmt.money(q.est_cost, currency), justify="right"),
    )
