"""Detail pane of the selected job: tags, reservation, restarts, checkpoint directory."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from policies.config import Policy
from policies.decision import checkpoint_dir as job_checkpoint_dir
from policies.tags import parse_tags
from tui import format as fmt
from tui.queue_model import QueueJob


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


def describe(q: QueueJob, reservation: dict[str, Any] | None, runs: list[dict[str, Any]] | None,
             policy: Policy, now: float) -> Text:
    j = q.job
    cur = policy.rates.currency
    tags, _ = parse_tags(j.comment)
    out = Text()
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
    return out


class JobDetail(Static):
    """Shows ``describe`` of the highlighted job; empty when nothing is selected."""

    def show(self, q: QueueJob | None, reservation: dict[str, Any] | None,
             runs: list[dict[str, Any]] | None, policy: Policy, now: float) -> None:
        if q is None:
            self.update(Text("No job selected.", style="dim"))
            return
        self.update(describe(q, reservation, runs, policy, now))
