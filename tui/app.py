"""`slurmgate tui`: the admin console (queue, nodes/GPUs, quotas, chargeback, events).

Every view fetches in worker threads and arms its next refresh only after the previous one
rendered; nothing here calls Slurm, the daemon or SQLite on the UI thread. Refresh intervals:
the queue every ``$SLURMGATE_TUI_REFRESH`` seconds (default 20, at least 5; Slurm is asked for
the whole queue in one call), nodes every 30 s (or the queue's interval when longer), quotas
30 s, events 10 s, chargeback 60 s. Only the view on screen refreshes.
"""

from __future__ import annotations

import io
import math
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

from rich.console import Console
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, TabbedContent, TabPane

from tui.chargeback_view import ChargebackView
from tui.events_view import EventsView
from tui.help_screen import HelpScreen
from tui.nodes_view import NodesView
from tui.queue_model import DEFAULT_LIMIT
from tui.queue_view import QueueView
from tui.quotas_view import QuotasView
from tui.refresh import Poller, call_ui
from tui.sources import Sources
from tui.status_line import StatusLine
from tui.view import View

VIEWS = ("queue", "nodes", "quotas", "chargeback", "events")
MIN_QUEUE_REFRESH_S = 5.0


@dataclass(frozen=True)
class Intervals:
    queue: float = 20.0
    nodes: float = 30.0
    quotas: float = 30.0
    chargeback: float = 60.0
    events: float = 10.0


def intervals_from_env(env: dict[str, str] | None = None) -> Intervals:
    """``SLURMGATE_TUI_REFRESH`` sets the queue refresh in seconds (at least 5); a value that
    is not a number is ignored."""
    raw = (os.environ if env is None else env).get("SLURMGATE_TUI_REFRESH", "")
    try:
        seconds = float(raw) if raw else Intervals.queue
    except ValueError:
        seconds = Intervals.queue
    if not math.isfinite(seconds):
        seconds = Intervals.queue
    seconds = max(MIN_QUEUE_REFRESH_S, seconds)
    return Intervals(queue=seconds, nodes=max(seconds, Intervals.nodes))


class MainScreen(Screen):
    """The tabs; when a dialog closes, the views' paused refreshes resume."""

    def __init__(self, gate: SlurmgateApp) -> None:
        super().__init__()
        self.gate = gate

    def compose(self) -> ComposeResult:
        c = self.gate
        s, i = c.sources, c.intervals
        views: list[tuple[str, View]] = [
            ("1 Queue", QueueView(s, interval=i.queue, limit=c.max_rows)),
            ("2 Nodes", NodesView(s, interval=i.nodes)),
            ("3 Quotas", QuotasView(s, interval=i.quotas)),
            ("4 Chargeback", ChargebackView(s, interval=i.chargeback, export_dir=c.export_dir)),
            ("5 Events", EventsView(s, interval=i.events)),
        ]
        with TabbedContent(initial="tab-queue", id="views"):
            for title, view in views:
                with TabPane(title, id=f"tab-{view.id}"):
                    yield view
        yield StatusLine(c.who(), id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.gate.view("queue").focus_main()

    def on_screen_resume(self) -> None:
        self.gate.resume_views()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane_id = event.pane.id or ""
        self.gate.active_view = pane_id.removeprefix("tab-")
        view = self.gate.view(self.gate.active_view)
        view.focus_main()
        view.activated()


class SlurmgateApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "slurmgate"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        *(Binding(str(n), f"show('{v}')", v.capitalize(), show=False)
          for n, v in enumerate(VIEWS, 1)),
        Binding("r", "refresh", "Refresh", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, sources: Sources, *, intervals: Intervals | None = None,
                 max_rows: int = DEFAULT_LIMIT, export_dir: str | None = None) -> None:
        super().__init__()
        self.sources = sources
        self.intervals = intervals or Intervals()
        self.max_rows = max_rows
        self.export_dir = export_dir or os.getcwd()
        self.active_view = "queue"
        self.animation_level = "none"  # a tab switch repaints once, not once per frame
        self.main = MainScreen(self)

    def get_default_screen(self) -> Screen:
        return self.main

    def who(self) -> str:
        v = self.sources.viewer
        prefix = "DEMO " if self.sources.demo else ""
        if v.admin:
            return f"{prefix}{v.user} (admin)"
        return f"{prefix}{v.user}: {', '.join(sorted(v.teams)) or 'no team'} (read-only)"

    # -- views -----------------------------------------------------------------------------

    @property
    def modal_open(self) -> bool:
        return len(self.screen_stack) > 1

    def view(self, name: str) -> View:
        return self.main.query_one(f"#{name}", View)

    def resume_views(self) -> None:
        if self.modal_open:
            return
        try:
            view = self.view(self.active_view)
        except NoMatches:  # the screen resumes once before its views are composed
            return
        view.activated()

    @property
    def status(self) -> StatusLine:
        return self.main.query_one("#status", StatusLine)

    def report(self, source: str, error: str | None) -> None:
        self.status.report(source, error)

    def say(self, message: str, *, error: bool = False) -> None:
        self.status.say(message, error=error)

    # -- admin actions (through the daemon, in a worker) -----------------------------------

    def act(self, request: dict[str, Any], poller: Poller) -> None:
        target = request.get("job_id", request.get("node"))
        self.say(f"{request['action']} {target}...")
        self.run_worker(partial(self._act, request, poller), thread=True, group="actions",
                        exit_on_error=False)

    def _act(self, request: dict[str, Any], poller: Poller) -> None:
        try:
            message, error = self.sources.action(request), False
        except Exception as exc:  # the daemon's or Slurm's refusal, shown as it is
            message, error = f"{request['action']} failed: {exc}", True
        call_ui(self, self._acted, message, error, poller)

    def _acted(self, message: str, error: bool, poller: Poller) -> None:
        self.say(message, error=error)
        poller.request()

    # -- keys ------------------------------------------------------------------------------

    def action_show(self, name: str) -> None:
        self.main.query_one("#views", TabbedContent).active = f"tab-{name}"

    def action_refresh(self) -> None:
        self.view(self.active_view).refresh_now()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def screen_text(self) -> str:
        """The screen as plain text (tests, benchmarks)."""
        width, height = self.size
        console = Console(width=width, height=height, file=io.StringIO(), record=True,
                          force_terminal=True, legacy_windows=False, safe_box=False)
        console.print(self.screen._compositor.render_update(
            full=True, screen_stack=self._background_screens))
        return console.export_text()


def unknown_cluster(sources: Sources) -> str | None:
    """Why ``sources.cluster`` cannot be shown (the ledger has nothing of it), or None (also
    when the ledger cannot be read now: the views then say so themselves)."""
    from db.reports import unknown_cluster_message
    from db.store import DatabaseError, StoreError

    if sources.cluster is None:
        return None
    try:
        with sources.store() as store:
            return unknown_cluster_message(store, sources.cluster)
    except (StoreError, *DatabaseError):
        return None


def run(config_path: str, demo: bool = False, cluster: str | None = None) -> int:
    """Entry point of `slurmgate tui`; returns the exit status. ``cluster``: the quotas,
    chargeback and events views show that cluster's (None: every cluster on the ledger)."""
    from policies.config import PolicyError

    if demo:
        from tui.demo import demo_sources

        sources: Sources = demo_sources(cluster=cluster)
    else:
        from tui.sources import open_sources

        try:
            sources = open_sources(config_path, cluster)
        except (PolicyError, ValueError) as exc:
            print(f"slurmgate tui: {exc}", file=sys.stderr)
            return 2
    problem = unknown_cluster(sources)
    if problem is not None:
        sources.close()
        print(f"slurmgate tui: --cluster: {problem}", file=sys.stderr)
        return 2
    app = SlurmgateApp(sources, intervals=intervals_from_env())
    try:
        app.run()
    finally:
        sources.close()
    return app.return_code or 0
