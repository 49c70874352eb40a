"""Fairshare-style priority without slurmdbd.

Classic Slurm fairshare: F = 2^(-U/S), where U is the team's share of the cluster's decayed
usage and S its share of the configured shares. A team that used nothing gets F = 1; a team
that used exactly its share gets F = 0.5. slurmgate maps F onto the job's nice:
nice = round(nice_max * (1 - F)), so teams over their share queue behind teams under it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from policies.config import Policy


def decayed_usage(rows: Iterable[tuple[str, float, float]], now: float,
                  half_life_hours: float) -> dict[str, float]:
    """Sum (team, end_ts, gpu_hours) rows, each weighted by 2^(-age / half_life)."""
    half_life_s = max(half_life_hours, 1e-9) * 3600.0
    usage: dict[str, float] = {}
    for team, end_ts, gpu_hours in rows:
        age = max(0.0, now - end_ts)
        usage[team] = usage.get(team, 0.0) + gpu_hours * math.pow(2.0, -age / half_life_s)
    return usage


def factors(policy: Policy, usage: dict[str, float]) -> dict[str, float]:
    """Fairshare factor per configured team."""
    total_shares = sum(t.share for t in policy.teams.values()) or 1.0
    total_usage = sum(max(0.0, usage.get(name, 0.0)) for name in policy.teams)
    out: dict[str, float] = {}
    for name, team in policy.teams.items():
        s = team.share / total_shares
        u = (usage.get(name, 0.0) / total_usage) if total_usage > 0 else 0.0
        out[name] = math.pow(2.0, -u / s)
    return out


def nice_for(policy: Policy, factor: float) -> int:
    return int(round(policy.fairshare.nice_max * (1.0 - min(1.0, max(0.0, factor)))))
