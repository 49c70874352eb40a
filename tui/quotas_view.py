"""Quotas view: the daemon's own numbers (the same as `slurmgate quota`), plus burn rate and
the projected spend at the end of the budget period.

Burn rate is the team's net settled spend per day over the last 7 days of the period (or
since the period began, when that is shorter); projected = spent + burn x days left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from db.reports import usage_rows
from db.store import DatabaseError, StoreError
from policies.ledger import period_bounds
from tui import format as fmt
from tui.keyed_table import KeyedTable, Row
from tui.sources import Sources
from tui.view import View

DAY = 86400.0
BURN_DAYS = 7
COLUMNS = (("team", "Team"), ("bar", "Used"), ("pct", "%"), ("budget", "Budget"),
           ("spent", "Spent"), ("reserved", "Reserved"), ("remaining", "Remaining"),
           ("soft", "Soft"), ("hard", "Hard"), ("fairshare", "Fairshare"),
           ("burn", "Burn/day"), ("projected", "Projected"))


@dataclass
class QuotaData:
    quota: dict[str, Any]
    burn: dict[str, float]
    """team -> net spend per day."""
    days_left: float
    now: float
    store_error: str | None


def projected(row: dict[str, Any], burn: float, days_left: float) -> float:
    return row["spent"] + burn * days_left


def quota_cells(row: dict[str, Any], burn: float, days_left: float,
                cur: str) -> tuple[str | Text, ...]:
    m = fmt.money
    used = row["spent"] + row["reserved"]
    proj = projected(row, burn, days_left)
    budget = row["budget"]
    style = ("bold red" if budget and proj >= row["hard_limit"]
             else "yellow" if budget and proj >= row["soft_limit"] else "")

    def right(text: str, style: str = "") -> Text:
        return Text(text, justify="right", style=style)

    return (row["team"],
            fmt.budget_bar(row["spent"], row["reserved"], budget, row["soft_limit"],
                           row["hard_limit"], width=16),
            right(fmt.percent(used, budget)), right(m(budget, cur)), right(m(row["spent"], cur)),
            right(m(row["reserved"], cur)),
            right(m(row["remaining"], cur), "red" if row["remaining"] < 0 else ""),
            right(m(row["soft_limit"], cur)), right(m(row["hard_limit"], cur)),
            right(f"{row['fairshare']:.3f}"), right(m(burn, cur)), right(m(proj, cur), style))


class QuotasView(View):
    def __init__(self, sources: Sources, *, interval: float) -> None:
        super().__init__(sources, id="quotas")
        self.data: QuotaData | None = None
        self.fetcher = self.poller("quota", self._fetch, self._show_data, interval)

    def compose(self) -> ComposeResult:
        yield Static("Loading quotas...", classes="info")
        yield KeyedTable(id="quotas-table")
        yield Static(Text("Used: █ spent  ▒ reserved  ░ left; green < soft limit <= yellow "
                          "< hard limit <= red", style="dim"), id="quotas-legend")

    def on_mount(self) -> None:
        self.table.set_columns(COLUMNS)

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#quotas-table", KeyedTable)

    def focus_main(self) -> None:
        self.table.focus()

    def _fetch(self) -> QuotaData:
        quota = self.sources.quota()
        now = self.sources.clock()
        start, end, _ = period_bounds(self.sources.policy.budgets.period, now)
        since = max(start, now - BURN_DAYS * DAY)
        burn: dict[str, float] = {}
        error = None
        if now > since:
            try:
                with self.sources.store() as store:
                    rows = usage_rows(store, since, now, ("team",))
                days = (now - since) / DAY
                burn = {r["team"]: (r["cost"] - r["credit"]) / days for r in rows}
            except (StoreError, DatabaseError) as exc:
                error = f"no burn rate: {exc}"
        return QuotaData(quota, burn, max(0.0, (end - now) / DAY), now, error)

    def _show_data(self, data: QuotaData) -> None:
        self.data = data
        self.gate.report("burn rate", data.store_error)
        cur = data.quota.get("currency", self.sources.currency)
        rows: list[Row] = [
            (r["team"], quota_cells(r, data.burn.get(r["team"], 0.0), data.days_left, cur))
            for r in data.quota.get("teams", [])]
        self.table.sync(rows)
        mode = data.quota.get("mode", "")
        self.set_info(f"Budget period {data.quota.get('period', '?')} ({mode}), "
                      f"{data.days_left:.1f} days left | burn = last {BURN_DAYS} days | "
                      f"{fmt.clock(data.now)[-5:]} UTC")
