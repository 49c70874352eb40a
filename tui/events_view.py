"""Events view: the daemon's event log, newest first, filterable by kind (``k``/``K``).

No kind is filtered out: the kinds to cycle through are those the log holds (idle-GPU
warnings and actions, failed alert deliveries and any kind added later included). With
``slurmgate tui --cluster NAME`` the view shows that cluster's events (every cluster's by
default); the header names it.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from db.reports import event_count, events
from tui import format as fmt
from tui.keyed_table import KeyedTable, Row
from tui.sources import Sources
from tui.view import View

LIMIT = 500
COLUMNS = (("time", "Time (UTC)"), ("kind", "Kind"), ("job", "Job"), ("node", "Node"),
           ("team", "Team"), ("user", "User"), ("actor", "By"), ("message", "Message"))
KIND_STYLE = {"node_fail": "bold red", "drain": "red", "reject": "yellow",
              "quarantine": "yellow", "admin_action": "cyan", "requeue": "magenta",
              "idle_warning": "yellow", "idle_action": "bold magenta",
              "alert_failed": "bold red"}
"""Kinds not named here are shown unstyled: the view lists every kind the log holds."""


def event_cells(e: dict[str, Any]) -> tuple[str | Text, ...]:
    message = (e.get("message") or "").replace("\n", " ")
    return (fmt.clock(e["ts"]), Text(e["kind"], style=KIND_STYLE.get(e["kind"], "")),
            str(e["job_id"]) if e.get("job_id") is not None else "", e.get("node") or "",
            e.get("team") or "", e.get("user") or "", e.get("actor") or "", message[:200])


class EventsView(View):
    BINDINGS = [
        Binding("k", "next_kind", "Kind"),
        Binding("K", "all_kinds", "All kinds", show=False),
    ]

    def __init__(self, sources: Sources, *, interval: float) -> None:
        super().__init__(sources, id="events")
        self.kind: str | None = None
        self.kinds: list[str] = []
        self.fetcher = self.poller("events", self._fetch, self._show_data, interval)

    def compose(self) -> ComposeResult:
        yield Static("Loading events...", classes="info")
        yield KeyedTable(id="events-table")

    def on_mount(self) -> None:
        self.table.set_columns(COLUMNS)

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#events-table", KeyedTable)

    def focus_main(self) -> None:
        self.table.focus()

    def _fetch(self) -> tuple[str | None, list[str], list[dict[str, Any]], int]:
        kind, cluster = self.kind, self.sources.cluster
        with self.sources.store() as store:
            kinds = store.event_kinds()
            total = event_count(store, kind, cluster=cluster)
            rows = events(store, [kind] if kind else None, LIMIT, cluster=cluster)
        viewer = self.sources.viewer
        if not viewer.admin:
            rows = [e for e in rows if viewer.sees(e.get("team")) or e.get("user") == viewer.user]
        return kind, kinds, rows, int(total)

    def _show_data(self, data: tuple[str | None, list[str], list[dict[str, Any]], int]) -> None:
        kind, kinds, rows, total = data
        self.kinds = kinds
        if kind != self.kind:
            self.fetcher.request()
            return
        table_rows: list[Row] = [(str(e["id"]), event_cells(e)) for e in rows]
        self.table.sync(table_rows)
        self.set_info(f"{fmt.clusters(self.sources.cluster)} | Showing {len(rows):,} of "
                      f"{total:,} events, newest first | kind: {kind or 'all'} (k: next kind, "
                      "K: all)")

    def action_next_kind(self) -> None:
        options: list[str | None] = [None, *self.kinds]
        i = options.index(self.kind) if self.kind in options else 0
        self.kind = options[(i + 1) % len(options)]
        self.set_info(f"Loading {self.kind or 'all'} events...")
        self.fetcher.request()

    def action_all_kinds(self) -> None:
        self.kind = None
        self.fetcher.request()
