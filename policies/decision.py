"""The submit-time decision: accept, reject, or accept with changes.

Pure: everything the decision needs (the policy, the job, the budget picture) comes in as
arguments; the daemon does the I/O around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from policies.config import Policy
from policies.request import JobRequest
from policies.tags import check_tags, format_admin_comment

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


def decide_tags(req: JobRequest, policy: Policy, rid: str) -> Decision:
    """Team and tags: the first gate every job passes."""
    team = policy.team_for(req.account, req.user)
    if team is None:
        return Decision("reject", None, "no team", [_no_team_message(req, policy)])
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
    decision.set_fields["admin_comment"] = format_admin_comment(team, rid, check.tags)
    return decision
