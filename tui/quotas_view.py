"""Quotas view: the daemon's own numbers (the same as `slurmgate quota`), plus burn rate,
the projected spend at the end of the budget period and the date the budget runs out; under
the table, the highlighted team's burn-down chart (tui.burndown_chart).

The rows are the daemon's quota answer for the view's cluster (``Sources.quota_request``:
the daemon's own budgets, or another cluster's with ``--cluster``); the header names it.
The burn-down comes from the daily team rollup (db.reports.spend_by_day, of the same
cluster, or of every cluster with global budgets) through policies.burndown: burn rate is
the team's net settled spend per day over the last 7 UTC days of the period, today included
(or since the period began, when that is shorter); projected = spent + burn x days left.
Reads and the math run in the poller's worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from db.reports import spend_by_day
from db.store import DatabaseError, StoreError
from policies.burndown import RATE_DAYS, Burndown, burndown
from policies.ledger import period_bounds
from tui import format as fmt
from tui.burndown_chart import chart, runs_out_cell, summary
from tui.keyed_table import KeyedTable, Row
from tui.sources import Sources
from tui.view import View

DAY = 86400.0
CHART_ROWS = 6
COLUMNS = (("team", "Team"), ("bar", "Used"), ("pct", "%"), ("budget", "Budget"),
           ("spent", "Spent"), ("reserved", "Reserved"), ("remaining", "Remaining"),
           ("soft", "Soft"), ("hard", "Hard"), ("fairshare", "Fairshare"),
           ("burn", "Burn/day"), ("projected", "Projected"), ("out", "Budget out"))


@dataclass
class QuotaData:
    quota: dict[str, Any]
    burndowns: dict[str, Burndown]
    """team -> its burn-down (absent: no store to read it from)."""
    days_left: float
    now: float
    store_error: str | None


def quota_cells(row: dict[str, Any], b: Burndown | None, cur: str) -> tuple[str | Text, ...]:
    m = fmt.money
    used = row["spent"] + row["reserved"]
    burn = b.rate if b else 0.0
    proj = b.projected if b else row["spent"]
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
            right(f"{row['fairshare']:.3f}"), right(m(burn, cur)), right(m(proj, cur), style),
            runs_out_cell(b))


class QuotasView(View):
    def __init__(self, sources: Sources, *, interval: float) -> None:
        super().__init__(sources, id="quotas")
        self.data: QuotaData | None = None
        self.fetcher = self.poller("quota", self._fetch, self._show_data, interval)

    def compose(self) -> ComposeResult:
        yield Static("Loading quotas...", classes="info")
        yield KeyedTable(id="quotas-table")
        yield Static("", id="burndown-title")
        yield Static("", id="burndown-chart")
        yield Static("", id="burndown-summary")
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
        burndowns: dict[str, Burndown] = {}
        error = None
        try:
            with self.sources.store() as store:
                by_day = spend_by_day(store, start, end, cluster=quota.get("cluster"))
            for r in quota.get("teams", []):
                burndowns[r["team"]] = burndown(
                    by_day.get(r["team"], {}), period_start=start, period_end=end, now=now,
                    budget=r["budget"], soft=r["soft_limit"], hard=r["hard_limit"])
        except (StoreError, *DatabaseError) as exc:
            error = f"no burn-down: {exc}"
        return QuotaData(quota, burndowns, max(0.0, (end - now) / DAY), now, error)

    def _show_data(self, data: QuotaData) -> None:
        self.data = data
        self.gate.report("burn rate", data.store_error)
        cur = self.currency
        rows: list[Row] = [(r["team"], quota_cells(r, data.burndowns.get(r["team"]), cur))
                           for r in data.quota.get("teams", [])]
        self.table.sync(rows)
        mode = data.quota.get("mode", "")
        self.set_info(f"Budget period {data.quota.get('period', '?')} ({mode}), "
                      f"{fmt.clusters(data.quota.get('cluster'))}, "
                      f"{data.days_left:.1f} days left | burn = last {RATE_DAYS} days | "
                      f"{fmt.clock(data.now)[-5:]} UTC")
        self._show_burndown()

    @property
    def currency(self) -> str:
        quota = self.data.quota if self.data else {}
        return str(quota.get("currency", self.sources.currency))

    @on(DataTable.RowHighlighted, "#quotas-table")
    def _highlighted(self) -> None:
        self._show_burndown()

    def on_resize(self) -> None:
        self._show_burndown()

    def _show_burndown(self) -> None:
        """The highlighted team's chart, drawn to the width on screen."""
        key = self.table.cursor_key
        b = self.data.burndowns.get(key) if self.data and key else None
        title = self.query_one("#burndown-title", Static)
        if b is None or key is None:
            title.update("")
            self.query_one("#burndown-chart", Static).update("")
            self.query_one("#burndown-summary", Static).update("")
            return
        title.update(Text(f"Burn-down of {key}: spend by day, cumulative; projected dim",
                          style="bold"))
        box = self.query_one("#burndown-chart", Static)
        width = max(20, (box.content_size.width or self.size.width - 2))
        box.update(chart(b, width, CHART_ROWS))
        self.query_one("#burndown-summary", Static).update(summary(b, self.currency))
