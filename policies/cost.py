"""Rate card and cost: the worst case of a pending job, and the cost of what really ran.

Prices come from ``policy.rates``: GPU-hours per GPU type, CPU core-hours, memory GB-hours
(1 GB = 1024 MB, Slurm's unit) and kWh of measured GPU energy. A partition's ``price_factor``
multiplies every one of them. Money is rounded to 1e-6 internally; messages show cents.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from policies.config import Partition, Policy, Rates
from policies.gpu import job_nodes, job_tasks, parse_array, parse_gpu_request
from policies.request import JobRequest

DEFAULT_PARTITION_NAME = "default"
MB_PER_GB = 1024
J_PER_KWH = 3_600_000.0


class CostError(ValueError):
    """A job slurmgate cannot price; the message says what to change."""


def _money(value: float) -> float:
    return round(value, 6)


def format_money(amount: float, currency: str) -> str:
    """``$1,234.56``; a currency written as a code goes after: ``1,234.56 EUR``."""
    number = f"{amount:,.2f}"
    if len(currency) > 1 and currency.isalpha():
        return f"{number} {currency}"
    return f"{currency}{number}"


def _hours_text(hours: float) -> str:
    return f"{hours:.1f}" if hours >= 0.1 or hours == 0 else f"{hours:.3f}"


@dataclass(frozen=True)
class Estimate:
    """Worst-case cost of a pending job; ``amount`` covers every reserved array task.

    ``gpus``, ``cpus``, ``mem_mb`` and ``nodes`` are for ONE job (one array task). ``gpu_type``
    is the priced type, "a100+h100" for a mixed request (see ``gpu_parts``), None without GPUs,
    "gpu" for untyped GPUs when neither the partition nor a rate card names a type.
    ``time_source`` is "job" (its -t), "partition" (the partition's max_time_minutes) or
    "none" (a CPU-only job with no limit anywhere: nothing is reserved, see estimate_job).
    ``breakdown`` holds the "gpu", "cpu" and "mem" parts of ``amount``.
    """

    amount: float
    gpu_type: str | None
    gpus: float
    cpus: int
    mem_mb: int
    nodes: int
    hours: float
    tasks_reserved: int
    time_source: str
    breakdown: dict[str, float]
    partition: str = DEFAULT_PARTITION_NAME
    price_factor: float = 1.0
    array_tasks: int = 1
    gpu_parts: tuple[tuple[str, float], ...] = field(default=())

    def describe(self, currency: str = "$") -> str:
        """E.g. ``est. max cost $264.96 (4 x a100 x 24.0 h)``."""
        if self.gpu_parts:
            what = " + ".join(f"{g:g} x {t}" for t, g in self.gpu_parts)
            if len(self.gpu_parts) > 1:
                what = f"({what})"
        else:
            what = f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}"
        if self.tasks_reserved > 1:
            what = f"{self.tasks_reserved} tasks x {what}"
        if self.time_source == "none":
            how = f"{what}, no time limit: nothing reserved"
        else:
            how = f"{what} x {_hours_text(self.hours)} h"
            if self.time_source == "partition":
                how += f" (no -t: partition {self.partition}'s limit)"
        if self.price_factor != 1.0:
            how += f", partition {self.partition} at {self.price_factor:g}x"
        if self.array_tasks > self.tasks_reserved:
            how += f", {self.array_tasks - self.tasks_reserved} more array tasks wait"
        return f"est. max cost {format_money(self.amount, currency)} ({how})"


def _partition(policy: Policy, name: str | None) -> tuple[str, Partition]:
    """The named partition, else the first one in the policy, else default settings.

    A name the policy does not list gets default settings (no default GPU type, no time limit
    for pricing, factor 1).
    """
    if name:
        return name, policy.partitions.get(name, Partition())
    if policy.partitions:
        first = next(iter(policy.partitions))
        return first, policy.partitions[first]
    return DEFAULT_PARTITION_NAME, Partition()


def gpu_rate(gpu_type: str | None, partition_name: str, partition: Partition,
             rates: Rates) -> tuple[str | None, float]:
    """(priced type, price per GPU-hour before the partition factor).

    Untyped GPUs take the partition's default_gpu_type; a partition without one prices them as
    the most expensive type on the rate card (the worst case). An empty ``rates.gpu_hour``
    prices GPUs at 0. A type the rate card does not list raises CostError naming the known ones
    (matching ignores case).
    """
    card = rates.gpu_hour
    from_partition = gpu_type is None and bool(partition.default_gpu_type)
    wanted = gpu_type or partition.default_gpu_type or None
    if not card:
        return wanted, 0.0
    if wanted is None:
        priciest = max(card, key=lambda t: (card[t], t))
        return priciest, card[priciest]
    if wanted in card:
        return wanted, card[wanted]
    by_lower = {t.lower(): t for t in card}
    if wanted.lower() in by_lower:
        known = by_lower[wanted.lower()]
        return known, card[known]
    known_types = ", ".join(sorted(card))
    if from_partition:
        raise CostError(
            f"partition {partition_name}'s default_gpu_type '{wanted}' has no price in the rate "
            f"card (known GPU types: {known_types}); ask the cluster admins to fix the policy, "
            f"or request a type, e.g. --gres=gpu:{sorted(card)[0]}:1"
        )
    raise CostError(
        f"GPU type '{wanted}' has no price in the rate card; known GPU types: {known_types}. "
        f"Request one of them, e.g. --gres=gpu:{sorted(card)[0]}:1"
    )


_FEATURE_SPLIT = re.compile(r"(?:\*\d+)?[&|,\[\]() ]+|\*\d+$")


def untyped_gpu_type(features: str | None, partition: Partition, rates: Rates) -> str | None:
    """The type to reserve an untyped GPU request at: the worst case of what may run.

    The dearest of the GPU types --constraint names (features on the rate card), else of the
    partition's gpu_types, else the partition's default_gpu_type, else None (gpu_rate then
    applies the partition's default_gpu_type, else the dearest type on the rate card)."""
    card = {t.lower(): t for t in rates.gpu_hour}
    named = [card[f.lower()] for f in _FEATURE_SPLIT.split(features or "") if f.lower() in card]
    candidates = named or [card.get(t.lower(), t) for t in partition.gpu_types]
    if not candidates:
        return None
    return max(candidates, key=lambda t: (rates.gpu_hour.get(t, 0.0), t))


def _job_cpus(req: JobRequest, nodes: int, tasks: int) -> int:
    """The largest of: tasks x --cpus-per-task (1 per task without -c), min_cpus, 1 per node."""
    per_task = req.cpus_per_task if req.cpus_per_task and req.cpus_per_task > 0 else 1
    candidates = [nodes, tasks * per_task]
    if req.min_cpus and req.min_cpus > 0:
        candidates.append(req.min_cpus)
    return max(candidates)


def _job_mem_mb(req: JobRequest, nodes: int, cpus: int) -> int:
    if req.min_mem_per_node and req.min_mem_per_node > 0:
        return req.min_mem_per_node * nodes
    if req.min_mem_per_cpu and req.min_mem_per_cpu > 0:
        return req.min_mem_per_cpu * cpus
    return 0


def _estimate_in(req: JobRequest, policy: Policy, partition_name: str | None) -> Estimate:
    name, part = _partition(policy, partition_name)
    rates = policy.rates
    gpu_req = parse_gpu_request(req, shards_per_gpu=part.shards_per_gpu)
    nodes = job_nodes(req)
    tasks = job_tasks(req, nodes)
    cpus = _job_cpus(req, nodes, tasks)
    mem_mb = _job_mem_mb(req, nodes, cpus)

    priced: dict[str, float] = {}
    gpu_per_hour = 0.0
    for gpu_type, gpus in gpu_req.parts:
        if gpu_type is None:
            gpu_type = untyped_gpu_type(req.features, part, rates)
        priced_type, rate = gpu_rate(gpu_type, name, part, rates)
        label = priced_type or "gpu"
        priced[label] = priced.get(label, 0.0) + gpus
        gpu_per_hour += gpus * rate
    gpu_parts = tuple(sorted(priced.items()))

    if req.time_limit and req.time_limit > 0:
        hours, time_source = req.time_limit / 60.0, "job"
    elif part.max_time_minutes > 0:
        hours, time_source = part.max_time_minutes / 60.0, "partition"
    elif gpu_req.total > 0 or rates.cpu_core_hour > 0 or (mem_mb and rates.mem_gb_hour > 0):
        what = "GPU jobs" if gpu_req.total > 0 else "Jobs"
        raise CostError(
            f"{what} in partition {name} need a time limit so their cost can be reserved "
            "(the partition sets none); add a time limit, e.g. `sbatch -t 04:00:00 ...` "
            "(or #SBATCH --time=04:00:00)"
        )
    else:
        hours, time_source = 0.0, "none"

    array_tasks, throttle = parse_array(req.array_inx)
    reserved = array_tasks
    if policy.budgets.array_concurrency == "throttle" and throttle:
        reserved = min(array_tasks, throttle)

    scale = hours * part.price_factor * reserved
    breakdown = {
        "gpu": _money(gpu_per_hour * scale),
        "cpu": _money(cpus * rates.cpu_core_hour * scale),
        "mem": _money(mem_mb / MB_PER_GB * rates.mem_gb_hour * scale),
    }
    return Estimate(
        amount=_money(sum(breakdown.values())),
        gpu_type="+".join(t for t, _ in gpu_parts) or None,
        gpus=gpu_req.total,
        cpus=cpus,
        mem_mb=mem_mb,
        nodes=nodes,
        hours=hours,
        tasks_reserved=reserved,
        time_source=time_source,
        breakdown=breakdown,
        partition=name,
        price_factor=part.price_factor,
        array_tasks=array_tasks,
        gpu_parts=gpu_parts,
    )


def estimate_job(req: JobRequest, policy: Policy) -> Estimate:
    """Worst-case cost of a submission, to reserve against its team's budget.

    amount = allocation x time limit x rates x partition price_factor x reserved array tasks.

    - Allocation: GPUs from ``parse_gpu_request`` (untyped ones at the partition's default
      type); CPUs the largest of tasks x --cpus-per-task, min_cpus and one per node; memory
      --mem x nodes, else --mem-per-cpu x CPUs, else 0: a job that sets no memory (or --mem=0,
      "all of the node") has its memory NOT priced.
    - Time: the job's -t; without one (or -t 0, "no limit") the partition's max_time_minutes.
      With neither, a GPU job raises CostError (add -t); a CPU-only job is estimated at 0 h
      (time_source "none"), so nothing is reserved and settlement charges what ran.
    - Partition: the job's; a list ``-p a,b`` is priced in the dearest of them. No partition
      means the first in the policy, else default settings.
    - Arrays: every task is a job. With budgets.array_concurrency "throttle" and a % throttle,
      only min(tasks, throttle) tasks are reserved: at most that many run at once and each
      settles at its end, so the reservation tracks the spend in flight rather than locking the
      whole array's budget up front. "all" (or no throttle) reserves every task.

    Raises CostError, or GpuRequestError for an unreadable GPU/array request (both ValueError).
    """
    names: list[str | None] = [p.strip() for p in (req.partition or "").split(",") if p.strip()]
    names = names or [None]
    estimates = [_estimate_in(req, policy, name) for name in names]
    return max(estimates, key=lambda e: e.amount)


def _check_amount(what: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CostError(f"cannot price a run with {what}={value!r}: not a finite number")
    if value < 0:
        raise CostError(f"cannot price a run with negative {what} ({value})")


def run_cost(*, gpu_type: str | None, gpus: float, cpus: int, mem_mb: int, seconds: float,
             energy_j: float | None, policy: Policy, partition: str | None) -> dict[str, float]:
    """Cost of what actually ran, for settlement: gpu, cpu, mem, energy and total.

    Energy is priced only when rates.kwh > 0 and a measurement exists. The partition's
    price_factor applies to every part, energy included. Raises CostError for a GPU type
    missing from the rate card or for negative / non-finite inputs, never prices them as 0.
    """
    for what, value in (("gpus", gpus), ("cpus", cpus), ("mem_mb", mem_mb),
                        ("seconds", seconds), ("energy_j", energy_j)):
        _check_amount(what, value)
    name, part = _partition(policy, partition)
    rates = policy.rates
    hours = seconds / 3600.0
    factor = part.price_factor
    rate = gpu_rate(gpu_type, name, part, rates)[1] if gpus > 0 else 0.0
    energy = 0.0
    if rates.kwh > 0 and energy_j is not None:
        energy = energy_j / J_PER_KWH * rates.kwh * factor
    cost = {
        "gpu": _money(gpus * rate * hours * factor),
        "cpu": _money(cpus * rates.cpu_core_hour * hours * factor),
        "mem": _money(mem_mb / MB_PER_GB * rates.mem_gb_hour * hours * factor),
        "energy": _money(energy),
    }
    cost["total"] = _money(sum(cost.values()))
    return cost
