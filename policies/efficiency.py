"""Efficiency figures of a job and of groups of runs, and the plain advice a job report gives.

Pure rules over plain rows (the ``runs``, ``run_nodes`` and ``run_progress`` tables' columns,
as db.jobs and db.efficiency read them). Definitions, one home each:

- **GPU efficiency** = busy GPU-seconds / allocated GPU-seconds, where a run's busy
  GPU-seconds are ``util_mean / 100 x gpu_seconds``. Only runs (and GPUs) with a measured
  utilisation count on either side: a run the node hooks could not measure is unknown, not
  idle. ``measured`` says what share of the allocated GPU-seconds was measured.
- **Idle cost** is the stored ``runs.cost_idle`` (the GPU cost of the time the GPUs were
  idle, from settlement).
- **Money figures** (cost per run, experiments per 1k, cost per epoch/step) use the NET cost
  (cost - credit): what the team is charged. A credited node failure costs the team nothing,
  so it does not make a job look dearer.
- **Experiments** are the distinct values of the tag ``[reports] experiment_tag``;
  experiments per 1k = experiments / (net cost / 1000), None when nothing was charged.
- **Progress** (epochs, steps) is what the job reported through the checkpoint helper: a run
  made ``highest reported - base`` (base: the highest any earlier run of the job reported,
  where it resumed from). Users write these numbers, so they are figures only: they never
  change a price, a credit or a budget. Cost per epoch = net cost of the runs that reported
  epochs (whole jobs) / epochs made.
- A GPU counts as **used** in a run when its mean utilisation is at least
  ``[reports] gpu_used_percent``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Row = Mapping[str, Any]

RATE_BASE = 1000.0
"""Experiments are counted per this much money ("experiments per $1k")."""


def busy_gpu_seconds(gpu_seconds: float | None, util_mean: float | None) -> float | None:
    """``util_mean / 100 x gpu_seconds`` (utilisation clamped to 0..100); None when the
    utilisation was not measured."""
    if util_mean is None or gpu_seconds is None:
        return None
    return float(gpu_seconds) * min(max(float(util_mean), 0.0), 100.0) / 100.0


def ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def per_thousand(count: int, net: float) -> float | None:
    """``count`` per RATE_BASE of ``net`` money; None when nothing was charged."""
    return count / (net / RATE_BASE) if net > 1e-9 else None


def progress_made(row: Row | None, key: str) -> int | None:
    """Epochs (``key`` "epoch") or steps a run made: highest reported - base, at least 0;
    None when the run reported none."""
    if row is None or row.get(key) is None:
        return None
    return max(0, int(row[key]) - int(row.get(f"{key}_base") or 0))


def experiment_of(tags: Mapping[str, Any] | None, tag: str) -> str | None:
    if not tag or not tags:
        return None
    value = tags.get(tag)
    return str(value) if value not in (None, "") else None


# -- one job ------------------------------------------------------------------------------


@dataclass
class GpuFigure:
    """One GPU of one run on one node."""

    restart_count: int
    node: str
    index: int | None
    gpu_type: str | None
    util_mean: float | None
    util_max: float | None
    mem_max_bytes: int | None
    energy_j: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class JobFigures:
    """The numbers of one job (every run of it), as the job report shows them."""

    cluster: str
    job_id: int
    array_job_id: int | None = None
    array_task_id: int | None = None
    user: str | None = None
    uid: int | None = None
    """The run's uid as slurmctld reported it (None while only a reservation is known)."""
    team: str | None = None
    project: str | None = None
    experiment: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    partition: str | None = None
    state: str | None = None
    """Final state of the newest run (None while it runs)."""
    runs: int = 0
    restarts: int = 0
    run_states: list[dict[str, Any]] = field(default_factory=list)
    gpu_type: str | None = None
    gpus: float = 0.0
    gpus_by_type: dict[str, float] = field(default_factory=dict)
    cpus: float | None = None
    mem_mb: float | None = None
    node_count: int | None = None
    nodes: str | None = None
    elapsed_s: float = 0.0
    """Wall seconds of every run together."""
    last_run_s: float = 0.0
    time_limit_min: int | None = None
    gpu_seconds: float = 0.0
    busy_gpu_seconds: float = 0.0
    measured_gpu_seconds: float = 0.0
    gpu_efficiency: float | None = None
    util_max: float | None = None
    gpus_used: int | None = None
    """GPUs of the newest measured run at or above the used threshold."""
    gpus_measured: int = 0
    energy_kwh: float = 0.0
    cost: float = 0.0
    cost_gpu: float = 0.0
    cost_cpu: float = 0.0
    cost_mem: float = 0.0
    cost_energy: float = 0.0
    cost_idle: float = 0.0
    credit: float = 0.0
    credit_reasons: list[str] = field(default_factory=list)
    net: float = 0.0
    settled: bool = False
    """Every run has been priced."""
    reserved: float | None = None
    """The reservation's worst case (est_cost), when there is one."""
    epochs: int | None = None
    steps: int | None = None
    cost_per_epoch: float | None = None
    cost_per_step: float | None = None
    per_gpu: list[GpuFigure] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "per_gpu"}
        out["per_gpu"] = [g.as_dict() for g in self.per_gpu]
        return out


def _elapsed(run: Row) -> float:
    if run.get("start_ts") is None or run.get("end_ts") is None:
        return 0.0
    return max(0.0, float(run["end_ts"]) - float(run["start_ts"]))


def job_figures(job: Mapping[str, Any], *, experiment_tag: str = "experiment",
                gpu_used_percent: float = 10.0) -> JobFigures:
    """The figures of one job from db.jobs.load_job's mapping (runs, nodes, reservation,
    progress)."""
    runs: Sequence[Row] = job["runs"]
    nodes: Mapping[int, Sequence[Row]] = job.get("nodes") or {}
    res: Row | None = job.get("reservation")
    progress: Mapping[int, Row] = job.get("progress") or {}
    newest = runs[-1] if runs else (res or {})
    tags = dict(newest.get("tags") or (res or {}).get("tags") or {})
    f = JobFigures(cluster=job["cluster"], job_id=int(job["job_id"]))
    f.array_job_id = newest.get("array_job_id")
    f.array_task_id = newest.get("array_task_id")
    f.user = newest.get("user")
    f.uid = newest.get("uid")
    f.team = newest.get("team")
    f.project = newest.get("project") or tags.get("project")
    f.tags = tags
    f.experiment = experiment_of(tags, experiment_tag)
    f.partition = newest.get("partition")
    f.gpu_type = newest.get("gpu_type")
    f.gpus = float(newest.get("gpus") or 0.0)
    f.cpus = newest.get("cpus")
    f.mem_mb = newest.get("mem_mb")
    f.node_count = newest.get("node_count")
    f.nodes = newest.get("nodes")
    f.time_limit_min = newest.get("time_limit_min") or (res or {}).get("time_limit_min")
    if res is not None:
        f.reserved = float(res.get("est_cost") or 0.0)
    f.runs = len(runs)
    f.restarts = max(0, len(runs) - 1)
    f.settled = bool(runs) and all(r.get("cost") is not None for r in runs)
    f.state = runs[-1].get("state") if runs else None
    maxes: list[float] = []
    for run in runs:
        elapsed = _elapsed(run)
        f.elapsed_s += elapsed
        f.run_states.append({"restart_count": run["restart_count"], "state": run.get("state"),
                             "start_ts": run.get("start_ts"), "end_ts": run.get("end_ts"),
                             "nodes": run.get("nodes"), "seconds": elapsed,
                             "cost": run.get("cost"), "credit": run.get("credit") or 0.0,
                             "credit_reason": run.get("credit_reason")})
        gs = float(run.get("gpu_seconds") or 0.0)
        f.gpu_seconds += gs
        busy = busy_gpu_seconds(gs, run.get("util_mean"))
        if busy is not None:
            f.busy_gpu_seconds += busy
            f.measured_gpu_seconds += gs
        f.energy_kwh += float(run.get("energy_j") or 0.0) / 3.6e6
        for key in ("cost", "cost_gpu", "cost_cpu", "cost_mem", "cost_energy", "cost_idle",
                    "credit"):
            setattr(f, key, getattr(f, key) + float(run.get(key) or 0.0))
        reason = run.get("credit_reason")
        if reason and reason not in f.credit_reasons:
            f.credit_reasons.append(reason)
        for n in nodes.get(run["restart_count"], ()):
            if n.get("util_max") is not None:
                maxes.append(float(n["util_max"]))
            for g in n.get("gpus") or ():
                f.per_gpu.append(GpuFigure(
                    restart_count=run["restart_count"], node=n["node"], index=g.get("index"),
                    gpu_type=g.get("gpu_type") or n.get("gpu_type"),
                    util_mean=g.get("util_mean"), util_max=g.get("util_max"),
                    mem_max_bytes=g.get("mem_max_bytes"), energy_j=g.get("energy_j")))
                if g.get("gpu_type"):
                    t = str(g["gpu_type"])
                    if run is runs[-1]:
                        f.gpus_by_type[t] = f.gpus_by_type.get(t, 0.0) + 1
    if runs:
        f.last_run_s = _elapsed(runs[-1])
    if not f.gpus_by_type and f.gpus:
        f.gpus_by_type = {f.gpu_type or "gpu": f.gpus}
    f.net = f.cost - f.credit
    f.gpu_efficiency = ratio(f.busy_gpu_seconds, f.measured_gpu_seconds)
    f.util_max = max(maxes) if maxes else None
    # GPUs used: the newest run whose GPUs were measured
    for run in reversed(runs):
        measured = [g for g in f.per_gpu
                    if g.restart_count == run["restart_count"] and g.util_mean is not None]
        if measured:
            f.gpus_measured = len(measured)
            f.gpus_used = sum(1 for g in measured if float(g.util_mean or 0) >= gpu_used_percent)
            break
    epochs = [progress_made(progress.get(r["restart_count"]), "epoch") for r in runs] \
        if runs else [progress_made(p, "epoch") for p in progress.values()]
    steps = [progress_made(progress.get(r["restart_count"]), "step") for r in runs] \
        if runs else [progress_made(p, "step") for p in progress.values()]
    if any(e is not None for e in epochs):
        f.epochs = sum(e or 0 for e in epochs)
        f.cost_per_epoch = (f.net / f.epochs) if f.epochs and f.settled else None
    if any(s is not None for s in steps):
        f.steps = sum(s or 0 for s in steps)
        f.cost_per_step = (f.net / f.steps) if f.steps and f.settled else None
    return f


# -- advice --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdviceRules:
    """Thresholds of the advice (policy ``[reports]``)."""

    gpu_used_percent: float = 10.0
    low_gpu_util_percent: float = 50.0
    short_run_fraction: float = 0.25
    short_run_min_limit_minutes: int = 60

    @classmethod
    def from_policy(cls, reports: Any) -> AdviceRules:
        return cls(gpu_used_percent=reports.gpu_used_percent,
                   low_gpu_util_percent=reports.low_gpu_util_percent,
                   short_run_fraction=reports.short_run_fraction,
                   short_run_min_limit_minutes=reports.short_run_min_limit_minutes)


def duration_text(seconds: float) -> str:
    """``45 s``, ``20 min``, ``1 h 05 min``, ``24 h``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    minutes = s // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h" if rest == 0 else f"{hours} h {rest:02d} min"


def suggested_limit(used_s: float) -> str:
    """A -t value with room to spare: 1.5 x what the run used, rounded up to 15 minutes
    (at least 15), as H:MM:00."""
    minutes = max(15, math.ceil(used_s * 1.5 / 60 / 15) * 15)
    return f"{minutes // 60}:{minutes % 60:02d}:00"


def _gres(gpu_type: str | None, count: int) -> str:
    typed = gpu_type if gpu_type and "+" not in gpu_type else None
    return f"--gres=gpu:{typed}:{count}" if typed else f"--gres=gpu:{count}"


def advice(f: JobFigures, rules: AdviceRules = AdviceRules(), currency: str = "$") -> list[str]:
    """Plain advice, most money first; empty when the numbers give no reason."""
    from policies.cost import format_money

    out: list[str] = []
    alloc = int(round(f.gpus))
    if f.runs and alloc >= 1 and f.gpus_used is not None and f.gpus_measured:
        if f.gpus_used == 0:
            out.append(f"{alloc} GPU{'s' * (alloc != 1)} allocated, none used (each below "
                       f"{rules.gpu_used_percent:g} % utilisation): check that the program "
                       "runs on the GPU (e.g. torch.cuda.is_available()), or submit without "
                       "--gres")
        elif f.gpus_used < alloc:
            if (f.node_count or 1) <= 1:
                ask = _gres(f.gpu_type, f.gpus_used)
            else:
                ask = f"--gpus={f.gpus_used}"
            out.append(f"{alloc} GPUs allocated, {f.gpus_used} used: ask for {ask}")
    if (f.gpu_efficiency is not None and f.gpus_used
            and f.gpu_efficiency * 100 < rules.low_gpu_util_percent):
        out.append(f"GPU utilisation averaged {f.gpu_efficiency * 100:.0f} % "
                   f"(idle GPU time cost {format_money(f.cost_idle, currency)}): feed the GPU "
                   "faster (more --cpus-per-task and data-loader workers, larger batches) or "
                   "use fewer GPUs")
    limit_s = (f.time_limit_min or 0) * 60
    if (f.runs and f.state == "COMPLETED" and limit_s >= rules.short_run_min_limit_minutes * 60
            and f.last_run_s < rules.short_run_fraction * limit_s):
        out.append(f"used {duration_text(f.last_run_s)} of a {duration_text(limit_s)} limit: "
                   f"a shorter -t reserves less budget (e.g. -t {suggested_limit(f.last_run_s)})")
    if f.state == "TIMEOUT":
        out.append("the job hit its time limit: save checkpoints (ckpt=yes, slurmgate ckpt "
                   "save) so a resubmission resumes, or ask for a longer -t")
    if f.restarts and str(f.tags.get("ckpt", "")).lower() not in ("yes", "true", "1"):
        out.append(f"the job was requeued {f.restarts} time{'s' * (f.restarts != 1)}: tag it "
                   "ckpt=yes and save checkpoints so a requeued run resumes instead of "
                   "starting over")
    return out


# -- groups of runs ---------------------------------------------------------------------------


@dataclass
class GroupFigures:
    """Efficiency of a group of runs (a team, project, user or tag value)."""

    runs: int = 0
    gpu_seconds: float = 0.0
    busy_gpu_seconds: float = 0.0
    measured_gpu_seconds: float = 0.0
    cost: float = 0.0
    credit: float = 0.0
    cost_idle: float = 0.0
    experiments: set[str] = field(default_factory=set)
    epochs: int = 0
    epoch_net: float = 0.0
    steps: int = 0
    step_net: float = 0.0

    def add(self, run: Row, *, experiment: str | None, epochs: int | None,
            steps: int | None, epoch_job: bool = False, step_job: bool = False) -> None:
        """One run; ``epoch_job``/``step_job``: its job reported that kind of progress (its
        net cost then counts towards cost per epoch/step)."""
        self.runs += 1
        gs = float(run.get("gpu_seconds") or 0.0)
        self.gpu_seconds += gs
        busy = busy_gpu_seconds(gs, run.get("util_mean"))
        if busy is not None:
            self.busy_gpu_seconds += busy
            self.measured_gpu_seconds += gs
        cost, credit = float(run.get("cost") or 0.0), float(run.get("credit") or 0.0)
        self.cost += cost
        self.credit += credit
        self.cost_idle += float(run.get("cost_idle") or 0.0)
        if experiment:
            self.experiments.add(experiment)
        if epoch_job:
            self.epochs += epochs or 0
            self.epoch_net += cost - credit
        if step_job:
            self.steps += steps or 0
            self.step_net += cost - credit

    @property
    def net(self) -> float:
        return self.cost - self.credit

    def as_dict(self) -> dict[str, Any]:
        n = len(self.experiments)
        return {
            "runs": self.runs, "gpu_hours": self.gpu_seconds / 3600.0,
            "busy_gpu_hours": self.busy_gpu_seconds / 3600.0,
            "measured_gpu_hours": self.measured_gpu_seconds / 3600.0,
            "gpu_efficiency": ratio(self.busy_gpu_seconds, self.measured_gpu_seconds),
            "cost": self.cost, "credit": self.credit, "net": self.net,
            "idle_cost": self.cost_idle,
            "cost_per_run": self.net / self.runs if self.runs else None,
            "experiments": n, "experiments_per_1k": per_thousand(n, self.net),
            "epochs": self.epochs or None,
            "cost_per_epoch": self.epoch_net / self.epochs if self.epochs else None,
            "steps": self.steps or None,
            "cost_per_step": self.step_net / self.steps if self.steps else None,
        }


def group_figures(rows: Iterable[Row], key: Sequence[str], *, experiment_tag: str
                  ) -> list[dict[str, Any]]:
    """Efficiency per group of run rows (db.efficiency.efficiency_runs: runs columns plus
    ``epochs``/``steps`` made, ``epoch_job``/``step_job``). ``key`` names the group columns
    (team, project, user, or ``tag:<key>``); biggest net first."""
    groups: dict[tuple[Any, ...], GroupFigures] = {}
    for r in rows:
        tags = r.get("tags") or {}
        k = tuple(tags.get(d[4:]) if d.startswith("tag:") else r.get(d) for d in key)
        g = groups.setdefault(k, GroupFigures())
        g.add(r, experiment=experiment_of(tags, experiment_tag), epochs=r.get("epochs"),
              steps=r.get("steps"), epoch_job=bool(r.get("epoch_job")),
              step_job=bool(r.get("step_job")))
    out = []
    for k, g in groups.items():
        row = {d: (v if v not in ("", None) else None) for d, v in zip(key, k, strict=True)}
        row.update(g.as_dict())
        out.append(row)
    return sorted(out, key=lambda r: (-r["net"], *(str(r[d]) for d in key)))
