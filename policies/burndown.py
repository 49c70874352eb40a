"""A team's budget burn-down over the period: spend by day, cumulative, and when it runs out.

Pure: the daily net spend (settled cost minus credits, per UTC day of the runs' end, as the
daily rollup ``usage_daily_team`` keeps it) comes in as an argument.

The projection is linear from the RECENT spend rate: the net spend of the last ``RATE_DAYS``
UTC days up to now (today's part-day included), or since the period began when that is
shorter, divided by the time elapsed in that window. A recent window rather than the whole
period, because what an admin asks is "at the pace they are going now, when do they run
out?": a team that launched a big training run this week runs out at this week's pace, one
that stopped spending is not projected from the first week's. The same rate is the TUI's
"Burn/day".

A level (soft limit, budget, hard limit) already passed is dated by the UTC day on which the
cumulative spend first reached it. A level the projection does not reach before the period
ends has no date ("not before the period ends"); nor has any level while the rate is zero
or negative (credits outweighing cost). A team without a budget (0) has no levels.
Reservations are not projected: they become spend as their jobs finish, which is what the
rate already extrapolates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

DAY = 86400.0
RATE_DAYS = 7
"""The projection's window: this many UTC days up to now, today included."""


@dataclass(frozen=True)
class Day:
    """One UTC day of the period, up to today."""

    start_ts: float
    spend: float
    """Net settled spend of runs that ended that day."""
    cumulative: float
    """Net spend of the period up to the end of that day."""


@dataclass(frozen=True)
class Crossing:
    """When the cumulative spend reaches one level."""

    name: str
    """``soft limit``, ``budget``, ``hard limit``, or ``budget = hard limit`` when equal."""
    amount: float
    ts: float | None
    """Reached (already: the day's start; projected: the moment), or None: not before the
    period ends."""
    reached: bool
    """Already reached (``ts`` is the UTC day it was first reached)."""


@dataclass(frozen=True)
class Burndown:
    period_start: float
    period_end: float
    now: float
    """The moment of the projection, inside [period_start, period_end]."""
    budget: float
    days: tuple[Day, ...]
    """Every UTC day from the period's first to today, zero-spend days included."""
    spent: float
    """Net spend of the period so far."""
    rate: float
    """Net spend per day over the rate window (may be negative: credits)."""
    rate_since: float
    """Start of the rate window."""
    projected: float
    """Spend at the end of the period at ``max(rate, 0)``."""
    crossings: tuple[Crossing, ...]
    """Soft limit, budget, hard limit, lowest first (levels of equal amount merged)."""

    @property
    def exhaustion(self) -> Crossing | None:
        """The crossing of the budget itself (None without a budget)."""
        return next((c for c in self.crossings if "budget" in c.name), None)

    def projected_at(self, ts: float) -> float:
        """Projected cumulative spend at ``ts`` (>= now)."""
        return self.spent + max(0.0, self.rate) * max(0.0, ts - self.now) / DAY


def _levels(budget: float, soft: float, hard: float) -> list[tuple[str, float]]:
    if budget <= 0:
        return []
    merged: dict[float, list[str]] = {}
    for name, amount in (("soft limit", soft), ("budget", budget), ("hard limit", hard)):
        if amount > 0:
            merged.setdefault(round(amount, 9), []).append(name)
    return [(" = ".join(names), amount) for amount, names in sorted(merged.items())]


def burndown(spend_by_day: Mapping[int, float], *, period_start: float, period_end: float,
             now: float, budget: float, soft: float, hard: float,
             rate_days: int = RATE_DAYS) -> Burndown:
    """The burn-down of one team; ``spend_by_day`` maps a UTC day number (``ts // 86400``) to
    that day's net spend (days absent: nothing spent). ``soft`` and ``hard`` are amounts, as
    the daemon's quota answer gives them. Spend outside the period is ignored."""
    if period_end <= period_start:
        raise ValueError("the period must end after it starts")
    if rate_days < 1:
        raise ValueError("the rate window needs at least one day")
    now = min(max(now, period_start), period_end)
    first = math.floor(period_start / DAY)
    last = math.ceil(now / DAY) - 1 if now > period_start else first - 1
    days: list[Day] = []
    total = 0.0
    for d in range(first, last + 1):
        spend = float(spend_by_day.get(d, 0.0))
        total += spend
        days.append(Day(d * DAY, spend, total))

    rate_since = max(period_start, (last - rate_days + 1) * DAY)
    elapsed = (now - rate_since) / DAY
    window = sum(day.spend for day in days if day.start_ts >= rate_since)
    rate = window / elapsed if elapsed > 0 else 0.0

    crossings = []
    for name, amount in _levels(budget, soft, hard):
        if total >= amount - 1e-9:
            first_day = next(day for day in days if day.cumulative >= amount - 1e-9)
            crossings.append(Crossing(name, amount, first_day.start_ts, True))
            continue
        ts = None
        if rate > 0:
            at = now + (amount - total) / rate * DAY
            ts = at if at < period_end else None
        crossings.append(Crossing(name, amount, ts, False))
    projected = total + max(0.0, rate) * (period_end - now) / DAY
    return Burndown(period_start, period_end, now, budget, tuple(days), total, rate,
                    rate_since, projected, tuple(crossings))
