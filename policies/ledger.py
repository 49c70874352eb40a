"""Budget periods and the team ledger: settled spend plus live reservations.

The daemon keeps one ``Ledger`` in memory (rebuilt from SQLite at start and at each period
boundary) so a decision reads two dict entries instead of scanning reservations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from policies.config import Policy


def period_bounds(period: str, now: float) -> tuple[float, float, str]:
    """(start_ts, end_ts, label) of the budget period containing ``now`` (UTC)."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "month":
        start = datetime(t.year, t.month, 1, tzinfo=UTC)
        end = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
        label = f"{t.year:04d}-{t.month:02d}"
    elif period == "quarter":
        q = (t.month - 1) // 3
        start = datetime(t.year, 3 * q + 1, 1, tzinfo=UTC)
        end = datetime(t.year + (q == 3), (3 * q + 3) % 12 + 1, 1, tzinfo=UTC)
        label = f"{t.year:04d}-Q{q + 1}"
    elif period == "year":
        start = datetime(t.year, 1, 1, tzinfo=UTC)
        end = datetime(t.year + 1, 1, 1, tzinfo=UTC)
        label = f"{t.year:04d}"
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return start.timestamp(), end.timestamp(), label


@dataclass
class Ledger:
    """Spend and reservations for the current period, by team."""

    period: str = ""
    spent: dict[str, float] = field(default_factory=dict)
    reserved: dict[str, float] = field(default_factory=dict)
    reservations: dict[str, tuple[str, float]] = field(default_factory=dict)
    """rid -> (team, amount) of every live reservation."""

    def reserve(self, rid: str, team: str, amount: float) -> None:
        self.release(rid)
        self.reservations[rid] = (team, amount)
        self.reserved[team] = self.reserved.get(team, 0.0) + amount

    def release(self, rid: str) -> None:
        held = self.reservations.pop(rid, None)
        if held:
            team, amount = held
            self.reserved[team] = max(0.0, self.reserved.get(team, 0.0) - amount)

    def settle(self, rid: str | None, team: str, actual: float) -> None:
        if rid:
            self.release(rid)
        self.spent[team] = self.spent.get(team, 0.0) + actual

    def used(self, team: str) -> float:
        return self.spent.get(team, 0.0) + self.reserved.get(team, 0.0)


@dataclass(frozen=True)
class TeamBudget:
    team: str
    budget: float
    spent: float
    reserved: float
    soft: float
    hard: float

    @property
    def remaining(self) -> float:
        return self.budget - self.spent - self.reserved


def team_budget(policy: Policy, ledger: Ledger, team: str) -> TeamBudget:
    t = policy.teams[team]
    return TeamBudget(team, t.budget, ledger.spent.get(team, 0.0), ledger.reserved.get(team, 0.0),
                      t.soft_limit * t.budget, t.hard_limit * t.budget)
