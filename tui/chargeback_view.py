"""Chargeback view: spend by team -> project -> user for this month, last month or custom
days; net, efficiency (GPU efficiency, idle cost, cost per run, experiments per 1k, cost per
epoch), then cost, credits, energy and GPU-hours by type. ``e`` exports the rows shown to CSV.

Money is settled runs by the time they ended (``db.reports.chargeback``), months in UTC, of
the view's cluster (``slurmgate tui --cluster``; every cluster's by default). The
efficiency figures are policies.efficiency's, over the same runs (``db.efficiency``), worked
out for each level of the tree from the runs themselves (a ratio or a count of distinct
experiments does not add up from the rows below it). The columns that say where money goes
come first, so they fit 80 columns; the wide GPU-hours-by-type breakdown comes last.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from db.chargeback.rows import defuse_formula
from db.efficiency import efficiency_runs
from db.reports import chargeback
from policies.efficiency import group_figures
from tui import format as fmt
from tui.keyed_table import KeyedTable, Row
from tui.range_screen import Range, RangeScreen
from tui.refresh import call_ui
from tui.sources import Sources
from tui.view import View

LEVELS = ("team", "project", "user")
COLUMNS = (("name", "Team / project / user"), ("runs", "Runs"), ("gpuh", "GPU-h"),
           ("eff", "GPU eff"), ("net", "Net"), ("idle", "Idle cost"), ("per_run", "Cost/run"),
           ("per_1k", "Exp/1k"), ("per_epoch", "Cost/epoch"), ("cost", "Cost"),
           ("credits", "Credits"), ("kwh", "kWh"), ("types", "GPU-h by type"))
MEASURES = ("runs", "gpu_hours", "energy_kwh", "cost", "idle_cost", "credits", "net")
FIGURES = ("gpu_efficiency", "busy_gpu_hours", "measured_gpu_hours", "cost_per_run",
           "experiments", "experiments_per_1k", "epochs", "cost_per_epoch")
"""Efficiency figures of a row (policies.efficiency.GroupFigures.as_dict's names), in the
CSV after MEASURES; empty where unknown."""
Figures = dict[tuple[str, ...], dict[str, Any]]


def columns(currency: str) -> tuple[tuple[str, str], ...]:
    """COLUMNS with the currency in "experiments per 1k" (``Exp/$1k``)."""
    return tuple((k, f"Exp/{currency}1k" if k == "per_1k" else label) for k, label in COLUMNS)


def month(now: float, back: int = 0) -> Range:
    t = datetime.fromtimestamp(now, UTC)
    y, m = t.year, t.month - back
    while m < 1:
        y, m = y - 1, m + 12
    start = datetime(y, m, 1, tzinfo=UTC)
    end = datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp(), end.timestamp(), f"{y:04d}-{m:02d}"


@dataclass
class Group:
    level: int
    path: tuple[str, ...]
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MEASURES, 0.0))
    by_type: dict[str, float] = field(default_factory=dict)
    children: dict[str, Group] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    """Efficiency of the group's runs (``FIGURES``); empty until ``attach_figures``."""

    def add(self, row: dict[str, Any]) -> None:
        for m in MEASURES:
            self.totals[m] += row[m]
        for t, h in row["gpu_hours_by_type"].items():
            self.by_type[t] = self.by_type.get(t, 0.0) + h


def hierarchy(rows: list[dict[str, Any]], depth: int) -> list[Group]:
    """Groups in display order (dearest first at every level), down to ``depth`` levels."""
    root = Group(-1, ())
    for r in rows:
        node = root
        for level in range(depth):
            name = r.get(LEVELS[level]) or "(none)"
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = Group(level, (*node.path, name))
            child.add(r)
            node = child
    out: list[Group] = []

    def walk(g: Group) -> None:
        for child in sorted(g.children.values(), key=lambda c: (-c.totals["net"], c.path)):
            out.append(child)
            walk(child)

    walk(root)
    return out


def path_of(row: dict[str, Any], depth: int) -> tuple[str, ...]:
    """The tree path of a report row, as ``hierarchy`` names it."""
    return tuple(row.get(LEVELS[level]) or "(none)" for level in range(depth))


def tree_figures(runs: list[dict[str, Any]], experiment_tag: str) -> Figures:
    """Efficiency figures of every team, team/project and team/project/user path, from the
    runs of the period (db.efficiency.efficiency_runs rows)."""
    out: Figures = {}
    for depth in range(1, len(LEVELS) + 1):
        for row in group_figures(runs, LEVELS[:depth], experiment_tag=experiment_tag):
            out[path_of(row, depth)] = row
    return out


def attach_figures(groups: list[Group], figures: Figures) -> None:
    for g in groups:
        g.figures = figures.get(g.path, {})


def group_cells(g: Group, cur: str) -> tuple[str | Text, ...]:
    t, f = g.totals, g.figures

    def right(text: str) -> Text:
        return Text(text, justify="right")

    per_1k = f.get("experiments_per_1k")
    name = Text("  " * g.level + g.path[-1], style="bold" if g.level == 0 else "")
    types = " ".join(f"{k} {v:.1f}" for k, v in sorted(g.by_type.items()))
    return (name, right(f"{int(t['runs'])}"), right(f"{t['gpu_hours']:.1f}"),
            right(fmt.share(f.get("gpu_efficiency"))), right(fmt.money(t["net"], cur)),
            right(fmt.money(t["idle_cost"], cur)), right(fmt.money(f.get("cost_per_run"), cur)),
            right("-" if per_1k is None else f"{per_1k:.1f}"),
            right(fmt.money(f.get("cost_per_epoch"), cur)), right(fmt.money(t["cost"], cur)),
            right(fmt.money(t["credits"], cur)), right(f"{t['energy_kwh']:.1f}"), types)


def defuse_name(name: str) -> str:
    """``name`` as one safe file name: anything but letters, digits, '.', '-' and '_' is
    '_' (a cluster name is the admin's text, never a path)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name)


def write_csv(path: str, groups: list[Group], label: str) -> None:
    """Write the table as CSV: a fresh temporary file beside ``path`` (never a predictable name
    that a planted symlink could redirect), then one rename. Text cells are defused against
    spreadsheet formulas: team, project and user names are user text."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["period", "level", *LEVELS, *MEASURES, "gpu_hours_by_type", *FIGURES])
            for g in groups:
                path_cols = [defuse_formula(str(p)) for p in g.path]
                path_cols += [""] * (len(LEVELS) - len(g.path))
                types = ";".join(f"{k}={v:.4f}" for k, v in sorted(g.by_type.items()))
                figures = ["" if g.figures.get(k) is None else round(g.figures[k], 6)
                           for k in FIGURES]
                w.writerow([label, LEVELS[g.level], *path_cols,
                            *(round(g.totals[m], 6) for m in MEASURES), defuse_formula(types),
                            *figures])
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ChargebackView(View):
    BINDINGS = [
        Binding("p", "period", "This/last month"),
        Binding("t", "custom", "Dates"),
        Binding("d", "depth", "Depth"),
        Binding("e", "export", "Export CSV"),
    ]

    def __init__(self, sources: Sources, *, interval: float, export_dir: str) -> None:
        super().__init__(sources, id="chargeback")
        self.export_dir = export_dir
        self.period: Range = month(sources.clock())
        self.months_back = 0
        self.depth = 3
        self.rows: list[dict[str, Any]] = []
        self.figures: Figures = {}
        self.groups: list[Group] = []
        self.last_export: str | None = None
        self.fetcher = self.poller("chargeback", self._fetch, self._show_data, interval)

    def compose(self) -> ComposeResult:
        yield Static("Loading chargeback...", classes="info")
        yield KeyedTable(id="chargeback-table")

    def on_mount(self) -> None:
        self.table.set_columns(columns(self.sources.currency))

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#chargeback-table", KeyedTable)

    def focus_main(self) -> None:
        self.table.focus()

    def _fetch(self) -> tuple[Range, list[dict[str, Any]], Figures]:
        period, cluster = self.period, self.sources.cluster
        with self.sources.store() as store:
            rows = chargeback(store, period[0], period[1], LEVELS, cluster=cluster)
            runs = efficiency_runs(store, period[0], period[1])
        viewer = self.sources.viewer
        runs = [r for r in runs if viewer.sees(r["team"])
                and (cluster is None or r["cluster"] == cluster)]
        figures = tree_figures(runs, self.sources.policy.reports.experiment_tag)
        return period, [r for r in rows if viewer.sees(r["team"])], figures

    def _show_data(self, data: tuple[Range, list[dict[str, Any]], Figures]) -> None:
        period, rows, figures = data
        if period != self.period:  # asked for another period meanwhile
            self.fetcher.request()
            return
        self.rows, self.figures = rows, figures
        self._show()

    def _show(self) -> None:
        self.groups = hierarchy(self.rows, self.depth)
        attach_figures(self.groups, self.figures)
        cur = self.sources.currency
        table_rows: list[Row] = [("/".join(g.path), group_cells(g, cur)) for g in self.groups]
        self.table.sync(table_rows)
        teams = [g for g in self.groups if g.level == 0]
        net = sum(g.totals["net"] for g in teams)
        idle = sum(g.totals["idle_cost"] for g in teams)
        busy = sum(g.figures.get("busy_gpu_hours") or 0.0 for g in teams)
        measured = sum(g.figures.get("measured_gpu_hours") or 0.0 for g in teams)
        eff = fmt.share(busy / measured if measured > 0 else None)
        self.set_info(f"Chargeback {self.period[2]}, {fmt.clusters(self.sources.cluster)} | "
                      f"{len(teams)} teams, net "
                      f"{fmt.money(net, cur)}, idle {fmt.money(idle, cur)}, GPU eff {eff} | "
                      f"depth {LEVELS[self.depth - 1]}")

    def action_period(self) -> None:
        self.months_back = (self.months_back + 1) % 2
        self.period = month(self.sources.clock(), self.months_back)
        self.set_info(f"Loading chargeback {self.period[2]}...")
        self.fetcher.request()

    def action_custom(self) -> None:
        def chosen(period: Range | None) -> None:
            if period is not None:
                self.period = period
                self.set_info(f"Loading chargeback {period[2]}...")
                self.fetcher.request()

        self.app.push_screen(RangeScreen(), chosen)

    def action_depth(self) -> None:
        self.depth = self.depth % len(LEVELS) + 1
        self._show()

    def action_export(self) -> None:
        groups, label = list(self.groups), self.period[2]
        cluster = self.sources.cluster
        name = f"slurmgate-chargeback-{label}" + (f"-{cluster}" if cluster else "")
        path = os.path.join(self.export_dir, defuse_name(name) + ".csv")
        self.run_worker(lambda: self._export(path, groups, label), thread=True,
                        group="export", exit_on_error=False)

    def _export(self, path: str, groups: list[Group], label: str) -> None:
        try:
            write_csv(path, groups, label)
            message, error = f"Exported {len(groups)} rows to {path}", False
            self.last_export = path
        except OSError as exc:
            message, error = f"Export failed: {exc}", True
        call_ui(self.app, self.gate.say, message, error=error)
