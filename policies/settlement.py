"""Settlement: what a finished run is charged, and when it is credited.

Pure rules over plain data: a run is its row (a mapping with the ``runs`` table's columns) and
its node rows (``run_nodes``: gpu_type, gpu_count, gpu_seconds, start_ts, end_ts). db.ingest
loads them, calls these functions and writes what they return.

- GPU-seconds are the sum over the nodes that reported; nodes that never reported add their
  share of the allocation (the reservation's GPUs per node, else what the reporting nodes
  had) x elapsed. Without node records: allocated GPUs x elapsed, split evenly over the types
  of a mixed request ("a100+h100").
- Each GPU type is priced by ``cost_fn`` (policies.cost.run_cost) in turn, the largest share
  first; CPUs, memory and measured energy go with the first. Money is rounded to 1e-6.
- A run that ended in NODE_FAIL (or PREEMPTED, when the policy says so) is credited in full,
  but only once the daemon's failure handler confirmed the failure with Slurm: until then its
  credit is 0 with the reason ``node_failure_pending`` (``preemption_pending``), and the handler
  turns that into ``node_failure`` (``confirm_credit_reason``). An admin's credit is never
  replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from policies.config import Policy, Requeue

CostFn = Callable[..., dict[str, float]]
Row = Mapping[str, Any]

PENDING_SUFFIX = "_pending"
CONFIRMED_CREDIT_REASONS = frozenset({"node_failure", "preemption"})
"""Credit reasons of a failure Slurm confirmed (the run is credited in full)."""
PENDING_CREDIT_REASONS = frozenset(r + PENDING_SUFFIX for r in CONFIRMED_CREDIT_REASONS)
"""Credit reasons of a failure not confirmed yet (credit 0 until it is)."""
AUTO_CREDIT_REASONS = CONFIRMED_CREDIT_REASONS | PENDING_CREDIT_REASONS
"""Credit reasons settlement sets (and may change on re-settlement); any other is an admin's."""


def confirm_credit_reason(credit_reason: str | None) -> str | None:
    """The confirmed reason for a pending one ("node_failure_pending" -> "node_failure"); None
    when ``credit_reason`` is not pending (nothing to confirm)."""
    if credit_reason in PENDING_CREDIT_REASONS:
        return credit_reason[: -len(PENDING_SUFFIX)]
    return None


def money(amount: float) -> float:
    """A stored amount: rounded to 1e-6, like every part of policies.cost.run_cost."""
    return round(amount, 6)


class Usage(NamedTuple):
    """What a run used, ready to price."""

    seconds: float
    """Wall seconds priced: the run's elapsed time, else its GPU-seconds / GPUs."""
    gpu_seconds: float
    """GPU-seconds of every type."""
    parts: list[tuple[str | None, float]]
    """(GPU type, GPU-seconds) priced one by one, the largest first; one (type, 0.0) part
    when no GPU time was used."""


def elapsed_seconds(run: Row, nodes: Collection[Row]) -> float:
    """The run's span; without one (or a zero one), the span its nodes reported."""
    elapsed = 0.0
    if run["start_ts"] is not None and run["end_ts"] is not None:
        elapsed = max(0.0, run["end_ts"] - run["start_ts"])
    if elapsed <= 0 and nodes:
        elapsed = max(0.0, max(n["end_ts"] for n in nodes) - min(n["start_ts"] for n in nodes))
    return elapsed


def gpu_seconds_by_type(run: Row, nodes: Collection[Row], seconds: float
                        ) -> dict[str | None, float]:
    """GPU-seconds per GPU type (see the module docstring); ``seconds`` is the elapsed time
    charged for nodes that did not report."""
    alloc = run["gpus"] or 0.0
    by_type: dict[str | None, float] = {}
    if nodes:
        for n in nodes:
            by_type[n["gpu_type"]] = by_type.get(n["gpu_type"], 0.0) + n["gpu_seconds"]
        missing = (run["node_count"] or 0) - len(nodes)
        if missing > 0 and seconds > 0:
            per_node = (alloc / run["node_count"] if alloc and run["rid"] else
                        sum(n["gpu_count"] for n in nodes) / len(nodes))
            key = run["gpu_type"]
            by_type[key] = by_type.get(key, 0.0) + missing * per_node * seconds
    elif alloc and seconds > 0:
        types = [t for t in (run["gpu_type"] or "").split("+") if t] or [None]
        for t in types:
            by_type[t] = by_type.get(t, 0.0) + alloc * seconds / len(types)
    return by_type


def usage(run: Row, nodes: Collection[Row]) -> Usage:
    """What ``run`` (its row and node rows) used."""
    elapsed = elapsed_seconds(run, nodes)
    by_type = gpu_seconds_by_type(run, nodes, elapsed)
    gpu_seconds = sum(by_type.values())
    seconds = elapsed
    if seconds <= 0 and gpu_seconds > 0:
        seconds = gpu_seconds / max(run["gpus"] or 1.0, 1.0)
    if len(by_type) == 1:
        parts = [(t, gs) for t, gs in by_type.items() if gs > 0]
    else:
        parts = [(t, gs) for t, gs in sorted(by_type.items(), key=lambda kv: -kv[1])
                 if gs > 0]
    if not parts:
        gpu_type = run["gpu_type"]
        parts = [(gpu_type if gpu_type and "+" not in gpu_type else None, 0.0)]
    return Usage(seconds, gpu_seconds, parts)


def price(use: Usage, run: Row, policy: Policy, cost_fn: CostFn) -> dict[str, float]:
    """gpu, cpu, mem, energy and total of ``use``: ``cost_fn`` per part, summed. Raises what
    ``cost_fn`` raises (policies.cost.CostError for a GPU type without a price)."""
    parts, seconds = use.parts, use.seconds
    total = {"gpu": 0.0, "cpu": 0.0, "mem": 0.0, "energy": 0.0, "total": 0.0}
    for i, (gpu_type, gs) in enumerate(parts):
        c = cost_fn(
            gpu_type=gpu_type, gpus=gs / seconds if seconds > 0 else 0.0,
            cpus=int(round(run["cpus"] or 0)) if i == 0 else 0,
            mem_mb=int(round(run["mem_mb"] or 0)) if i == 0 else 0,
            seconds=seconds, energy_j=run["energy_j"] if i == 0 else None,
            policy=policy, partition=run["partition"],
        )
        if len(parts) == 1:
            total = c
        else:
            for k in total:
                total[k] += float(c.get(k, 0.0))
    return total


def charges(total: Mapping[str, float], util_mean: float | None) -> dict[str, float | None]:
    """The run's cost columns from a ``price`` result: each part rounded, and ``cost_idle``,
    the GPU cost of the time its GPUs spent idle (None without a measured utilisation)."""
    cost_gpu = money(total["gpu"])
    return {
        "cost": money(total["total"]),
        "cost_gpu": cost_gpu,
        "cost_cpu": money(total["cpu"]),
        "cost_mem": money(total["mem"]),
        "cost_energy": money(total["energy"]),
        "cost_idle": (money(cost_gpu * (1.0 - min(max(util_mean, 0.0), 100.0) / 100.0))
                      if util_mean is not None else None),
    }


def default_gpu_type(policy: Policy, partition: str | None) -> str | None:
    """The GPU type a run of ``partition`` is recorded with when nothing named one."""
    part = policy.partitions.get(partition or "")
    return (part.default_gpu_type or None) if part else None


def auto_credit(state: str | None, cost: float | None, credit_reason: str | None,
                requeue: Requeue) -> tuple[float | None, str | None] | None:
    """(credit, reason) settlement gives a run that ended in ``state``: its whole ``cost`` for
    a node failure (and a preemption, when ``requeue`` says so) that Slurm confirmed
    (``credit_reason`` is already "node_failure"/"preemption"), (0.0, "<reason>_pending") for
    one not confirmed yet, else (0.0, None). None when ``credit_reason`` is an admin's: that
    credit stands."""
    if credit_reason is not None and credit_reason not in AUTO_CREDIT_REASONS:
        return None
    reason = None
    if state == "NODE_FAIL" and requeue.credit_node_failure:
        reason = "node_failure"
    elif state == "PREEMPTED" and requeue.credit_preemption:
        reason = "preemption"
    if reason is None:
        return 0.0, None
    if credit_reason == reason:  # confirmed: the credit follows the (re-settled) cost
        return cost, reason
    return 0.0, reason + PENDING_SUFFIX
