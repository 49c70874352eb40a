"""Detail pane of the selected job: tags, reservation, restarts, checkpoint directory and,
once a run of it is settled, its efficiency and the job report's advice.

The ledger part (``job_ledger``) is read in a worker thread: db.jobs.load_job, then the figures
and advice of policies.efficiency, the same numbers `slurmgate job` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual.widgets import Static

from db.jobs import load_job
from db.store import Store
from policies.config import Policy
from policies.decision import checkpoint_dir as job_checkpoint_dir
from policies.efficiency import AdviceRules, JobFigures, advice, job_figures
from policies.tags import parse_tags
from tui import format as fmt
from tui.queue_model import QueueJob

ADVICE_LINES = 2
"""Advice items the pane shows (most money first); `slurmgate job` prints them all."""


@dataclass(frozen=True)
class JobLedger:
    """What the store holds of a queue job: its runs (oldest first) and, once one of them is
    priced, the job's figures and advice."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    figures: JobFigures | None = None
    advice: list[str] = field(default_factory=list)


def job_ledger(store: Store, policy: Policy, q: QueueJob) -> JobLedger:
    """The ledger picture of ``q`` (blocking: call from a worker thread). Empty when the store
    knows no run of it, or when its newest runs belong to another user (a job id Slurm
    reused)."""
    job = load_job(store, policy.daemon.cluster, q.job.job_id)
    runs = list(job["runs"]) if job else []
    if not job or not runs or (q.job.user and runs[-1].get("user") not in (None, q.job.user)):
        return JobLedger()
    if all(r.get("cost") is None for r in runs):
        return JobLedger(runs)
    rules = AdviceRules.from_policy(policy.reports)
    figures = job_figures(job, experiment_tag=policy.reports.experiment_tag,
                          gpu_used_percent=rules.gpu_used_percent)
    return JobLedger(runs, figures, advice(figures, rules, policy.rates.currency))


def efficiency_text(f: JobFigures, currency: str) -> str:
    """One line: GPU efficiency, GPUs used, net and idle cost, cost per epoch."""
    if f.gpu_efficiency is None:
        gpu = "GPU use not measured"
    else:
        gpu = f"GPU {fmt.share(f.gpu_efficiency)} busy"
        if f.gpus_measured:
            gpu += f", {f.gpus_used}/{f.gpus_measured} used"
    money = (f"net {fmt.money(f.net, currency)}{'' if f.settled else ' so far'}, idle "
             f"{fmt.money(f.cost_idle, currency)}")
    parts = [gpu, money]
    if f.epochs is not None:
        per = f", {fmt.money(f.cost_per_epoch, currency)}/epoch" if f.cost_per_epoch else ""
        parts.append(f"{f.epochs} epoch{'s' * (f.epochs != 1)}{per}")
    return " | ".join(parts)


def checkpoint_dir(q: QueueJob, tags: dict[str, str], policy: Policy) -> str:
    """Where the job finds its checkpoints: the directory the daemon injected at submit
    (policies.decision.checkpoint_dir), or the job-side default of slurm_plugin.checkpoint."""
    ck = policy.checkpoint
    j = q.job
    injected = ck.inject == "all" or (ck.inject == "tagged" and tags.get("ckpt") == "yes")
    if injected and q.team:
        name = getattr(j, "name", None)  # squeue's name, when the client has it
        if name:
            return f"${ck.env_var} = {job_checkpoint_dir(policy, q.team, j.user or '', name)}"
        team_dir = job_checkpoint_dir(policy, q.team, j.user or "", None).rsplit("/", 1)[0]
        return f"${ck.env_var} = {team_dir}/<job name>"
    if j.work_dir:
        return f"{j.work_dir}/.ckpt/{j.job_id} (no ckpt=yes tag: the job's own default)"
    return "-"


def describe(q: QueueJob, reservation: dict[str, Any] | None, ledger: JobLedger | None,
             policy: Policy, now: float) -> Text:
    j = q.job
    runs = ledger.runs if ledger else None
    cur = policy.rates.currency
    tags, _ = parse_tags(j.comment)
    out = Text(no_wrap=True, overflow="ellipsis")  # one row a line: the pane's height is fixed
    out.append(f"Job {q.label}", style="bold")
    out.append(f" {j.user or '?'} ({q.team or 'no team'}) {j.state}")
    if j.reason:
        out.append(f" ({j.reason})")
    out.append(f" {fmt.gpus(j.gpu_type, j.gpus)} on {j.nodes or f'{j.node_count} node(s)'}\n")
    out.append(f"Account {j.account or '-'} | nice {j.nice} | priority {j.priority} | "
               f"submitted {fmt.clock(j.submit_ts)} UTC\n")
    tag_text = " ".join(f"{k}={v}" for k, v in sorted(tags.items())) or "(none)"
    out.append("Tags: ", style="bold")
    out.append(f"{tag_text}\n")
    out.append("Reservation: ", style="bold")
    if reservation:
        out.append(f"{reservation['rid']} {fmt.money(reservation.get('est_cost'), cur)} "
                   f"{reservation.get('state')}")
    elif q.admin.get("rid") and ledger and ledger.figures and ledger.figures.settled:
        out.append(f"{q.admin['rid']} settled")
    elif q.admin.get("rid"):
        out.append(f"{q.admin['rid']} (not live in the store)")
    else:
        out.append("none (submitted without slurmgate's check)")
    out.append(f"   Est. cost {fmt.money(q.est_cost, cur)}\n")
    out.append("Restarts: ", style="bold")
    out.append(str(j.restart_count))
    if runs:
        done = [f"#{r['restart_count']} {r.get('state') or 'running'}"
                + (f" credit {fmt.money(r['credit'], cur)}" if r.get("credit") else "")
                for r in runs]
        out.append("  runs: " + ", ".join(done[-4:]))
    out.append("\n")
    out.append("Checkpoint: ", style="bold")
    out.append(checkpoint_dir(q, tags, policy))
    if ledger and ledger.figures:
        out.append("\nEfficiency: ", style="bold")
        out.append(efficiency_text(ledger.figures, cur))
        for n, line in enumerate(ledger.advice[:ADVICE_LINES]):
            out.append("\nAdvice: " if n == 0 else "\n        ", style="bold")
            out.append(line)
        if len(ledger.advice) > ADVICE_LINES:
            out.append(f" (+{len(ledger.advice) - ADVICE_LINES} more: slurmgate job "
                       f"{j.job_id})", style="dim")
    return out


class JobDetail(Static):
    """Shows ``describe`` of the highlighted job; empty when nothing is selected."""

    def show(self, q: QueueJob | None, reservation: dict[str, Any] | None,
             ledger: JobLedger | None, policy: Policy, now: float) -> None:
        if q is None:
            self.update(Text("No job selected.", style="dim"))
            return
        self.update(describe(q, reservation, ledger, policy, now))
