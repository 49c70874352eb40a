"""policies.burndown: spend by day, the recent rate and the dates each level is reached."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from policies.burndown import DAY, Burndown, burndown
from policies.ledger import period_bounds


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def day(y: int, m: int, d: int) -> int:
    return int(ts(y, m, d) // DAY)


NOV, DEC = ts(2023, 11, 1), ts(2023, 12, 1)


def nov(spend: dict[int, float], now: float, budget: float = 2000.0, soft: float = 1600.0,
        hard: float = 2000.0) -> Burndown:
    return burndown({day(2023, 11, d): v for d, v in spend.items()}, period_start=NOV,
                    period_end=DEC, now=now, budget=budget, soft=soft, hard=hard)


def dates(b: Burndown) -> dict[str, tuple[float | None, bool]]:
    return {c.name: (c.ts, c.reached) for c in b.crossings}


def test_constant_spend_runs_out_on_the_exact_day() -> None:
    b = nov({d: 100.0 for d in range(1, 11)}, now=ts(2023, 11, 11))
    assert [d.start_ts for d in b.days] == [ts(2023, 11, d) for d in range(1, 11)]
    assert [d.cumulative for d in b.days] == [100.0 * d for d in range(1, 11)]
    assert b.spent == 1000.0
    assert b.rate_since == ts(2023, 11, 4) and b.rate == 100.0
    assert b.projected == 3000.0
    assert dates(b) == {"soft limit": (ts(2023, 11, 17), False),
                        "budget = hard limit": (ts(2023, 11, 21), False)}
    assert b.exhaustion is not None and b.exhaustion.ts == ts(2023, 11, 21)


def test_the_recent_week_sets_the_pace_not_the_whole_period() -> None:
    # 1,000 on the first day, then 650 in the last 6.5 days: 100 a day
    b = nov({1: 1000.0, 9: 300.0, 10: 300.0, 11: 50.0}, now=ts(2023, 11, 11, 12),
            budget=3000.0, soft=2400.0, hard=3300.0)
    assert b.rate_since == ts(2023, 11, 5)
    assert b.rate == pytest.approx(100.0)
    assert b.spent == 1650.0
    assert dates(b) == {"soft limit": (pytest.approx(ts(2023, 11, 19)), False),
                        "budget": (pytest.approx(ts(2023, 11, 25)), False),
                        "hard limit": (pytest.approx(ts(2023, 11, 28)), False)}
    assert b.projected == pytest.approx(1650.0 + 100.0 * 19.5)
    assert b.projected_at(ts(2023, 11, 12, 12)) == pytest.approx(1750.0)


def test_a_team_that_stopped_spending_does_not_run_out() -> None:
    b = nov({1: 500.0, 2: 500.0, 3: 500.0}, now=ts(2023, 11, 11))
    assert b.rate == 0.0 and b.projected == 1500.0
    assert dates(b) == {"soft limit": (None, False), "budget = hard limit": (None, False)}


def test_zero_spend() -> None:
    b = nov({}, now=ts(2023, 11, 11))
    assert len(b.days) == 10 and all(d.spend == 0.0 and d.cumulative == 0.0 for d in b.days)
    assert (b.spent, b.rate, b.projected) == (0.0, 0.0, 0.0)
    assert all(c.ts is None and not c.reached for c in b.crossings)


def test_levels_already_passed_are_dated_by_the_day_they_were_reached() -> None:
    b = nov({1: 400.0, 2: 700.0, 3: 100.0}, now=ts(2023, 11, 4), budget=1000.0, soft=800.0,
            hard=1500.0)
    assert b.rate == 400.0  # 1,200 in the three days since the period began
    assert dates(b) == {"soft limit": (ts(2023, 11, 2), True),
                        "budget": (ts(2023, 11, 2), True),
                        "hard limit": (ts(2023, 11, 4, 18), False)}
    assert b.exhaustion is not None and b.exhaustion.reached


def test_credits_that_outweigh_cost_project_nothing() -> None:
    b = nov({1: 900.0, 9: -300.0}, now=ts(2023, 11, 10), budget=1000.0, soft=800.0,
            hard=1000.0)
    assert b.rate == pytest.approx(-300.0 / 7)
    assert b.spent == 600.0 and b.projected == 600.0
    assert dates(b) == {"soft limit": (None, False), "budget = hard limit": (None, False)}


def test_no_budget_no_levels() -> None:
    b = nov({1: 50.0}, now=ts(2023, 11, 2), budget=0.0, soft=0.0, hard=0.0)
    assert b.crossings == () and b.exhaustion is None and b.projected == 50.0 * 30


def test_a_projection_that_lands_on_the_period_end_is_not_before_it() -> None:
    spend = {d: 100.0 for d in range(1, 21)}
    b = nov(spend, now=ts(2023, 11, 21), budget=3000.0, soft=2400.0, hard=3000.0)
    assert b.spent == 2000.0 and b.rate == 100.0
    assert dates(b) == {"soft limit": (ts(2023, 11, 25), False),
                        "budget = hard limit": (None, False)}  # exactly Dec 1: not before
    b = nov(spend, now=ts(2023, 11, 21), budget=2999.0, soft=2400.0, hard=2999.0)
    assert b.exhaustion is not None
    assert b.exhaustion.ts == pytest.approx(DEC - 0.01 * DAY)


def test_period_boundaries() -> None:
    outside = {day(2023, 10, 31): 5000.0, day(2023, 12, 1): 5000.0}
    at_start = burndown(outside, period_start=NOV, period_end=DEC, now=NOV, budget=100.0,
                        soft=80.0, hard=100.0)
    assert at_start.days == () and at_start.spent == 0.0 and at_start.rate == 0.0
    # six hours into the first day: the window is those six hours
    early = burndown({**outside, day(2023, 11, 1): 25.0}, period_start=NOV, period_end=DEC,
                     now=ts(2023, 11, 1, 6), budget=3000.0, soft=2400.0, hard=3000.0)
    assert early.rate_since == NOV and early.rate == pytest.approx(100.0)
    assert early.spent == 25.0
    # after the period ended the picture is the period's last moment
    after = nov({30: 300.0}, now=ts(2023, 12, 5), budget=1000.0, soft=800.0, hard=1000.0)
    assert after.now == DEC and len(after.days) == 30 and after.spent == 300.0
    assert after.rate == pytest.approx(300.0 / 7)
    assert after.projected == 300.0 and all(c.ts is None for c in after.crossings)


def test_a_quarter_across_the_new_year() -> None:
    start, end, label = period_bounds("quarter", ts(2023, 12, 20))
    assert label == "2023-Q4"
    spend = {day(2023, 12, d): 1000.0 for d in range(14, 21)}
    b = burndown(spend, period_start=start, period_end=end, now=ts(2023, 12, 21),
                 budget=10_000.0, soft=8000.0, hard=12_000.0)
    assert len(b.days) == 31 + 30 + 20 and b.rate == 1000.0
    assert dates(b) == {"soft limit": (ts(2023, 12, 22), False),
                        "budget": (ts(2023, 12, 24), False),
                        "hard limit": (ts(2023, 12, 26), False)}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="end after"):
        burndown({}, period_start=DEC, period_end=NOV, now=NOV, budget=1, soft=1, hard=1)
    with pytest.raises(ValueError, match="one day"):
        burndown({}, period_start=NOV, period_end=DEC, now=NOV, budget=1, soft=1, hard=1,
                 rate_days=0)
