"""Who may read a job's report: its owner, its team's leads (and members, where the policy
says so), and slurmgate admins. Pure: the caller names the viewer and the job's owner."""

from __future__ import annotations

from policies.config import Policy


def may_read_job(policy: Policy, viewer: str, *, viewer_uid: int | None, owner: str | None,
                 owner_uid: int | None, team: str | None, admin: bool) -> bool:
    """Whether ``viewer`` (a user name from the authenticated uid) may read the report of a
    job run by ``owner`` (``owner_uid``) for ``team``. The owner matches by uid when the
    ledger has one, else by name; team leads always, members only with
    ``[reports] team_members_see_team_jobs``."""
    if admin:
        return True
    if owner_uid is not None and viewer_uid is not None and owner_uid == viewer_uid:
        return True
    if owner and owner == viewer and owner_uid is None:
        return True
    cfg = policy.teams.get(team or "")
    if cfg is None:
        return False
    if viewer in cfg.leads:
        return True
    return policy.reports.team_members_see_team_jobs and cfg is not None \
        and team in policy.member_teams(viewer)

