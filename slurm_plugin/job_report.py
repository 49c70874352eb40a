"""`slurmgate job JOBID`: the per-job report for researchers, as text (seff/jobstats style:
plain numbers, then advice) or JSON.

The figures and advice are made by the daemon (op ``job``: policies.efficiency over db.jobs)
or, for admins with ``--db``, here from the database directly (``build_report``); this
module turns them into text. ``parse_job_spec`` reads what a user types for JOBID.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from policies.efficiency import duration_text

if TYPE_CHECKING:
    from db.store import Store
    from policies.config import Policy
    from policies.ledger import TeamBudget

MAX_JOB_ID = 4_294_967_294
"""Slurm job ids are 32-bit (NO_VAL is 0xfffffffe)."""

_SPEC = re.compile(r"([0-9]{1,12})(?:_([0-9]{1,12}))?")


class JobSpecError(ValueError):
    """A JOBID that is not one; the message says what is accepted."""


def parse_job_spec(text: object) -> tuple[int, int | None]:
    """``"123"`` -> (123, None); ``"123_4"`` (array job 123, task 4) -> (123, 4). Anything
    else (not a number, negative, too large, a task range, a het-job component) raises
    JobSpecError naming what was wrong."""
    if not isinstance(text, str):
        raise JobSpecError("JOBID must be text like 123 or 123_4")
    t = text.strip()
    shown = t[:40] + ("..." if len(t) > 40 else "")
    if not t:
        raise JobSpecError("JOBID is empty: give a job id like 123 (or 123_4 for an array task)")
    if t.startswith("-"):
        raise JobSpecError(f"JOBID {shown!r} is negative: job ids are 1 to {MAX_JOB_ID}")
    if "[" in t or "-" in t or "," in t:
        raise JobSpecError(f"JOBID {shown!r}: one job or array task at a time (123 or 123_4), "
                           "not a range or list")
    if "+" in t:
        raise JobSpecError(f"JOBID {shown!r}: heterogeneous job components are not supported; "
                           "give the job id (123)")
    m = _SPEC.fullmatch(t)
    if m is None:
        raise JobSpecError(f"JOBID {shown!r} is not a job id: use digits, like 123, or 123_4 "
                           "for task 4 of array job 123")
    job_id = int(m.group(1))
    task = int(m.group(2)) if m.group(2) is not None else None
    if not 1 <= job_id <= MAX_JOB_ID:
        raise JobSpecError(f"JOBID {shown!r} is out of range: job ids are 1 to {MAX_JOB_ID}")
    if task is not None and task > MAX_JOB_ID:
        raise JobSpecError(f"JOBID {shown!r}: array task ids are 0 to {MAX_JOB_ID}")
    return job_id, task


def job_spec_text(job_id: int, task: int | None) -> str:
    return f"{job_id}_{task}" if task is not None else str(job_id)


# -- building (the daemon, and admins reading the database) -----------------------------------


def budget_picture(budget: TeamBudget) -> dict[str, Any]:
    return {"team": budget.team, "budget": budget.budget, "spent": round(budget.spent, 6),
            "reserved": round(budget.reserved, 6), "remaining": round(budget.remaining, 6)}


def build_report(store: Store, policy: Policy, cluster: str, job_id: int,
                 task: int | None, *, budget: dict[str, Any] | None = None,
                 period: str | None = None) -> dict[str, Any] | None:
    """The report of one job as the daemon answers it (figures, advice, budget), or None
    when the ledger knows nothing of it. The caller decides who may see it."""
    from db.jobs import load_job
    from policies.efficiency import AdviceRules, advice, job_figures

    job = load_job(store, cluster, job_id, task)
    if job is None:
        return None
    rules = AdviceRules.from_policy(policy.reports)
    f = job_figures(job, experiment_tag=policy.reports.experiment_tag,
                    gpu_used_percent=rules.gpu_used_percent)
    return {"job": f.as_dict(), "advice": advice(f, rules, policy.rates.currency),
            "budget": budget,
            "period": period, "currency": policy.rates.currency,
            "mode": policy.budgets.mode}


# -- text ------------------------------------------------------------------------------------


def _money(amount: float | None, currency: str) -> str:
    from policies.cost import format_money

    return "-" if amount is None else format_money(amount, currency)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} %"


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def _mem_mb(mb: float | None) -> str:
    if not mb:
        return "-"
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _clean(text: object) -> str:
    """User-written text (job tags, node names) without control characters."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))[:200]


def render_text(report: dict[str, Any]) -> str:
    """The report for a terminal: what ran, what it cost, how well it used the GPUs, the
    team's budget, then advice."""
    j, cur = report["job"], report.get("currency") or "$"
    spec = job_spec_text(j["array_job_id"], j["array_task_id"]) \
        if j.get("array_job_id") is not None and j.get("array_task_id") is not None \
        else str(j["job_id"])
    lines = [f"Job {spec}" + (f" (job id {j['job_id']})" if spec != str(j["job_id"]) else "")
             + f" on cluster {_clean(j['cluster'])}"]
    state = j.get("state") or ("no run recorded yet" if not j["runs"] else "running")
    lines.append(f"  user {_clean(j.get('user') or '-')}, team {_clean(j.get('team') or '-')}, "
                 f"project {_clean(j.get('project') or '-')}"
                 + (f", experiment {_clean(j['experiment'])}" if j.get("experiment") else ""))
    lines.append(f"  state {state}; partition {_clean(j.get('partition') or '-')}")
    lines.append("")
    lines.append("Allocation")
    by_type = ", ".join(f"{n:g} x {_clean(t)}" for t, n in sorted(j["gpus_by_type"].items())) \
        or ("none" if not j["gpus"] else f"{j['gpus']:g}")
    lines.append(f"  GPUs     {by_type}")
    lines.append(f"  CPUs     {j['cpus']:g}" if j.get("cpus") is not None else "  CPUs     -")
    lines.append(f"  memory   {_mem_mb(j.get('mem_mb'))}")
    lines.append(f"  nodes    {j.get('node_count') or '-'} ({_clean(j.get('nodes') or '-')})")
    lines.append("")
    lines.append(f"Runs: {j['runs']} ({j['restarts']} restart{'s' * (j['restarts'] != 1)})")
    for r in j["run_states"]:
        credit = (f", credited {_money(r['credit'], cur)} ({_clean(r['credit_reason'])})"
                  if r.get("credit") else "")
        lines.append(f"  #{r['restart_count']}  {r.get('state') or 'running':<11} "
                     f"{_when(r.get('start_ts'))}  {duration_text(r['seconds']):>11}  "
                     f"{_clean(r.get('nodes') or '-')}  {_money(r.get('cost'), cur)}{credit}")
    limit = j.get("time_limit_min")
    used = j["last_run_s"]
    if limit:
        lines.append(f"  time used {duration_text(used)} of a {duration_text(limit * 60)} limit "
                     f"({used / (limit * 60) * 100:.0f} %)" + (
                         f"; all runs {duration_text(j['elapsed_s'])}" if j["restarts"] else ""))
    lines.append("")
    lines.append("GPU use")
    eff = j.get("gpu_efficiency")
    lines.append(f"  efficiency {_pct(None if eff is None else eff * 100)} "
                 f"(busy {j['busy_gpu_seconds'] / 3600:.2f} of "
                 f"{j['measured_gpu_seconds'] / 3600:.2f} measured GPU-hours; "
                 f"{j['gpu_seconds'] / 3600:.2f} allocated)")
    if j.get("gpus_used") is not None:
        lines.append(f"  GPUs used  {j['gpus_used']} of {j['gpus_measured']} "
                     f"(mean utilisation at least the policy's threshold)")
    if j["per_gpu"]:
        lines.append(f"  {'run':<4}{'node':<14}{'gpu':>4}  {'type':<8}{'util mean':>10}"
                     f"{'util max':>10}{'mem max':>11}")
        for g in j["per_gpu"]:
            idx = "-" if g.get("index") is None else str(g["index"])
            lines.append(f"  {'#' + str(g['restart_count']):<4}{_clean(g['node'])[:13]:<14}"
                         f"{idx:>4}  {_clean(g.get('gpu_type') or '-')[:8]:<8}"
                         f"{_pct(g.get('util_mean')):>10}{_pct(g.get('util_max')):>10}"
                         f"{_gib(g.get('mem_max_bytes')):>11}")
    lines.append(f"  energy     {j['energy_kwh']:.3f} kWh")
    lines.append("")
    lines.append("Cost" + ("" if j["settled"] else " (not every run is settled yet)"))
    lines.append(f"  GPU {_money(j['cost_gpu'], cur)}, CPU {_money(j['cost_cpu'], cur)}, "
                 f"memory {_money(j['cost_mem'], cur)}, energy {_money(j['cost_energy'], cur)}")
    lines.append(f"  total {_money(j['cost'], cur)}, credits {_money(j['credit'], cur)}"
                 + (f" ({', '.join(_clean(r) for r in j['credit_reasons'])})"
                    if j["credit_reasons"] else "")
                 + f", charged {_money(j['net'], cur)}")
    lines.append(f"  idle GPU time cost {_money(j['cost_idle'], cur)}")
    if j.get("reserved") is not None:
        lines.append(f"  reserved at submit {_money(j['reserved'], cur)} (worst case)")
    if j.get("epochs") is not None or j.get("steps") is not None:
        parts = []
        if j.get("epochs") is not None:
            parts.append(f"{j['epochs']} epochs" + (
                f" ({_money(j['cost_per_epoch'], cur)} per epoch)"
                if j.get("cost_per_epoch") is not None else ""))
        if j.get("steps") is not None:
            parts.append(f"{j['steps']} steps" + (
                f" ({_money(j['cost_per_step'], cur)} per step)"
                if j.get("cost_per_step") is not None else ""))
        lines.append("  progress " + ", ".join(parts) + " (reported by the job)")
    b = report.get("budget")
    if b:
        used_pct = ((b["spent"] + b["reserved"]) / b["budget"] * 100) if b["budget"] else None
        lines.append("")
        lines.append(f"Team {_clean(b['team'])}, budget period {report.get('period') or '-'}"
                     f" ({report.get('mode') or '-'})")
        lines.append(f"  spent {_money(b['spent'], cur)} + reserved {_money(b['reserved'], cur)}"
                     f" of {_money(b['budget'], cur)}"
                     + (f" ({used_pct:.0f} %)" if used_pct is not None else "")
                     + f"; remaining {_money(b['remaining'], cur)}")
    if report.get("advice"):
        lines.append("")
        lines.append("Advice")
        lines.extend(f"  - {a}" for a in report["advice"])
    return "\n".join(lines) + "\n"


def render_short(report: dict[str, Any]) -> str:
    """A few lines for the end of a job (its output file or a mail): cost, GPU efficiency,
    time used and the advice."""
    j, cur = report["job"], report.get("currency") or "$"
    eff = j.get("gpu_efficiency")
    limit = j.get("time_limit_min")
    head = (f"slurmgate: job {j['job_id']}: {j.get('state') or 'running'}, charged "
            f"{_money(j['net'], cur)} (idle GPU time {_money(j['cost_idle'], cur)}), "
            f"GPU efficiency {_pct(None if eff is None else eff * 100)}")
    if limit:
        head += f", used {duration_text(j['last_run_s'])} of {duration_text(limit * 60)}"
    out = [head]
    out.extend(f"slurmgate:   - {a}" for a in report.get("advice") or ())
    return "\n".join(out) + "\n"
