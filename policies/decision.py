"""The submit-time decision: accept, reject, or accept with changes.

Pure: everything the decision needs (the policy, the job, the budget picture) comes in as
arguments; the daemon does the I/O around it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from policies.config import Policy
from policies.cost import CostError, Estimate, estimate_job, format_money
from policies.fairshare import nice_for
from policies.gpu import GpuRequestError, parse_array
from policies.ledger import Ledger, TeamBudget, team_budget
from policies.request import JobRequest
from policies.tags import check_tags, format_admin_comment, merge_admin_comment

Verdict = Literal["accept", "reject"]


@dataclass
class Decision:
    verdict: Verdict
    team: str | None
    reason: str
    """One line for the decision log and the events table."""
    lines: list[str] = field(default_factory=list)
    """What the user sees on sbatch's stderr, one message per line."""
    tags: dict[str, str] = field(default_factory=dict)
    set_fields: dict[str, object] = field(default_factory=dict)
    """Job fields job_submit.lua sets: admin_comment, nice, partition, environment."""

    @property
    def message(self) -> str:
        return "\n".join(self.lines)


def _no_team_message(req: JobRequest, policy: Policy) -> str:
    accounts = sorted(a for t in policy.teams.values() for a in t.accounts)
    who = f"user '{req.user}'" if req.user else "this user"
    acct = f"account '{req.account}'" if req.account else "no --account"
    hint = f"submit with --account=<one of: {', '.join(accounts)}>" if accounts else (
        "ask your admin to add you to a team in the slurmgate policy"
    )
    return f"slurmgate: job rejected: {who} with {acct} belongs to no team; {hint}"


def _not_a_member_message(req: JobRequest, policy: Policy, team: str) -> str:
    mine = policy.member_teams(req.user)
    accounts = sorted({a for t in mine for a in policy.teams[t].accounts})
    yours = (f"your teams: {', '.join(mine)}" + (f" (--account={' or --account='.join(accounts)})"
                                                  if accounts else "")) if mine else \
        "you belong to no team; ask your admin to add you to one in the slurmgate policy"
    return (f"slurmgate: job rejected: --account={req.account} bills team {team}, and you "
            f"({req.user}) are not a member or lead of {team}; {yours}")


def decide_tags(req: JobRequest, policy: Policy, rid: str) -> Decision:
    """Team and tags: the first gate every job passes. An --account names a team only for
    its members and leads (unless Slurm enforces associations: daemon.account_membership)."""
    team = policy.team_for(req.account, req.user)
    if team is None:
        return Decision("reject", None, "no team", [_no_team_message(req, policy)])
    if (policy.daemon.account_membership == "daemon" and req.account
            and team not in policy.member_teams(req.user)):
        return Decision("reject", team, f"account: {req.user} is not a member of {team}",
                        [_not_a_member_message(req, policy, team)])
    check = check_tags(req.comment, policy, team)
    if not check.ok:
        n = len(check.errors)
        lines = [f"slurmgate: job rejected: {n} problem{'s' if n > 1 else ''} with the job tags "
                 "in --comment:"]
        lines += [f"  - {e}" for e in check.errors]
        lines.append(f"  fix: {check.example}")
        return Decision("reject", team, "tags: " + "; ".join(check.errors), lines, check.tags)
    lines = [f"slurmgate: warning: {w}" for w in check.warnings]
    decision = Decision("accept", team, "ok", lines, check.tags)
    decision.set_fields["admin_comment"] = merge_admin_comment(
        req.admin_comment, format_admin_comment(team, rid, check.tags))
    return decision


@dataclass(frozen=True)
class ApprovalGrant:
    """An admin's grant letting one team exceed its hard limit (what is left of it)."""

    id: str
    team: str
    remaining_amount: float | None
    remaining_gpu_hours: float | None
    expires_at: float
    revoked: bool = False


@dataclass
class SubmitDecision(Decision):
    estimate: Estimate | None = None
    reserve: float = 0.0
    """Amount to hold against the team's budget until the job ends."""
    approval_id: str | None = None
    approval: ApprovalGrant | None = None
    """The grant this job draws from (its unit decides what is drawn: money or GPU-hours)."""
    gpu_hours: float = 0.0
    rid: str = ""
    """The reservation id written into the job's admin_comment."""


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def checkpoint_dir(policy: Policy, team: str, user: str, job_name: str | None) -> str:
    """Stable per-job checkpoint directory: the same across requeues of the job."""
    name = _SAFE_NAME.sub("_", job_name or "job").strip("._") or "job"
    root = policy.checkpoint.checkpoint_root.rstrip("/")
    return f"{root}/{team}/{user or 'unknown'}/{name[:100]}"


def _budget_line(policy: Policy, b: TeamBudget) -> str:
    cur = policy.rates.currency
    pct = f" ({100 * (b.spent + b.reserved) / b.budget:.0f}%)" if b.budget > 0 else ""
    return (f"team {b.team}: {format_money(b.spent, cur)} spent + {format_money(b.reserved, cur)} "
            f"reserved of {format_money(b.budget, cur)}{pct}")


def _approval_problem(grant: ApprovalGrant | None, ref: str, team: str, cost: float,
                      gpu_hours: float, now: float) -> str:
    if grant is None:
        return f"approval '{ref}' does not exist"
    if grant.team != team:
        return f"approval '{ref}' belongs to team {grant.team}, not {team}"
    if grant.revoked:
        return f"approval '{ref}' was revoked"
    if grant.expires_at <= now:
        return f"approval '{ref}' expired"
    if grant.remaining_amount is not None and grant.remaining_amount + 1e-9 < cost:
        return f"approval '{ref}' has {grant.remaining_amount:.2f} left, this job needs {cost:.2f}"
    if grant.remaining_gpu_hours is not None and grant.remaining_gpu_hours + 1e-9 < gpu_hours:
        return (f"approval '{ref}' has {grant.remaining_gpu_hours:.1f} GPU-hours left, "
                f"this job needs {gpu_hours:.1f}")
    return ""


def decide(req: JobRequest, policy: Policy, *, rid: str, ledger: Ledger,
           fairshare: float = 1.0, approval: ApprovalGrant | None = None,
           now: float = 0.0) -> SubmitDecision:
    """The whole submit-time decision: team and tags, cost, budget, fairshare, checkpoint."""
    base = decide_tags(req, policy, rid)
    d = SubmitDecision(base.verdict, base.team, base.reason, base.lines, base.tags,
                       base.set_fields, rid=rid)
    if d.verdict == "reject" or d.team is None:
        return d
    team = d.team
    cur = policy.rates.currency

    try:
        est = estimate_job(req, policy)
        parse_array(req.array_inx)
    except (CostError, GpuRequestError) as exc:
        return SubmitDecision("reject", team, f"cost: {exc}",
                              [f"slurmgate: job rejected: {exc}"], d.tags)
    d.estimate = est
    d.gpu_hours = est.gpus * est.hours * est.tasks_reserved
    d.reserve = est.amount

    enforce = policy.budgets.mode == "chargeback" and policy.teams[team].budget > 0
    b = team_budget(policy, ledger, team)
    after = b.spent + b.reserved + est.amount
    # budget figures only for those who may see the team's data (members, leads, admins)
    shown = team in policy.teams_of_user(req.user)
    picture = _budget_line(policy, b) if shown else f"team {team}"
    head = f"slurmgate: {est.describe(cur)}; {picture}"
    if est.time_source == "partition":
        # priced at the partition's limit: the job gets that limit, so no run outlasts it
        d.set_fields["time_limit"] = int(round(est.hours * 60))

    if enforce and after > b.hard + 1e-9:
        ref = d.tags.get("approval")
        problem = "no approval tag" if not ref else _approval_problem(
            approval, ref, team, est.amount, d.gpu_hours, now)
        if problem:
            over = after - b.hard
            by = (f" of {format_money(b.hard, cur)} by {format_money(over, cur)}"
                  if shown else "")
            lines = [
                f"slurmgate: job rejected: team {team} would exceed its hard limit{by}",
                f"  {picture}; this job: {est.describe(cur)}",
                "  fix: shorten -t or use fewer GPUs, wait for running jobs to finish, or ask an "
                "admin for an approval and add approval=<id> to --comment"
                + (f" ({problem})" if ref else ""),
            ]
            return SubmitDecision("reject", team, f"hard limit: {problem}", lines, d.tags,
                                  estimate=est)
        d.approval_id, d.approval = ref, approval
        d.reason = f"over hard limit, approval {ref}"
        d.lines.append(f"{head}; over the hard limit, using approval {ref}")
    elif enforce and after > b.soft + 1e-9 and policy.budgets.soft_partition:
        target = policy.budgets.soft_partition
        if req.partition != target:
            d.set_fields["partition"] = target
            d.reason = f"soft limit: moved to {target}"
            soft = f" of {format_money(b.soft, cur)}" if shown else ""
            d.lines.append(
                f"{head}; over the soft limit{soft}: job moved to the "
                f"low-priority, preemptible partition '{target}'"
            )
        else:
            d.reason = "soft limit"
            d.lines.append(f"{head}; over the soft limit")
    else:
        mode = " (showback: not enforced)" if policy.budgets.mode == "showback" else ""
        d.lines.append(head + mode)

    d.set_fields["nice"] = nice_for(policy, fairshare)
    inject = policy.checkpoint.inject
    if req.batch and (inject == "all" or (inject == "tagged" and d.tags.get("ckpt") == "yes")):
        d.set_fields["env"] = {
            policy.checkpoint.env_var: checkpoint_dir(policy, team, req.user, req.name),
        }
    return d
