"""Queue view: every job Slurm knows, with team, cost and a detail pane; admin job actions."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.timer import Timer
from textual.widgets import DataTable, Input, Static

from db.store import DatabaseError, StoreError
from tui import format as fmt
from tui.confirm import ConfirmScreen
from tui.filter_screen import Filters, FilterScreen
from tui.job_detail import JobDetail, JobLedger, job_ledger
from tui.keyed_table import KeyedTable, Row
from tui.queue_model import (
    COLUMN_KEYS,
    COLUMNS,
    FILTER_FIELDS,
    CostEstimator,
    QueueJob,
    QueueQuery,
    QueueResult,
    annotate,
    cells,
    select,
)
from tui.refresh import call_ui
from tui.sources import Sources
from tui.view import View

JOB_ACTIONS = ("hold", "release", "requeue", "cancel")


@dataclass
class QueueSnapshot:
    jobs: list[QueueJob]
    reservations: dict[str, dict[str, Any]]
    store_error: str | None
    result: QueueResult
    rows: list[Row]
    generation: int


class QueueView(View):
    BINDINGS = [
        Binding("slash", "search", "Search"),
        Binding("f", "filter", "Filter"),
        Binding("c", "clear_filters", "Clear", show=False),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse", "Reverse", show=False),
        Binding("escape", "end_search", "End search", show=False),
        Binding("h", "job('hold')", "Hold"),
        Binding("u", "job('release')", "Release"),
        Binding("R", "job('requeue')", "Requeue"),
        Binding("x", "job('cancel')", "Cancel"),
    ]

    def __init__(self, sources: Sources, *, interval: float, limit: int) -> None:
        super().__init__(sources, id="queue")
        self.query_state = QueueQuery(limit=limit)
        self.estimator = CostEstimator(sources.policy)
        self.jobs: list[QueueJob] = []
        self.reservations: dict[str, dict[str, Any]] = {}
        self.result: QueueResult | None = None
        self.by_key: dict[str, QueueJob] = {}
        self.ledgers: dict[tuple[int, int, str], JobLedger] = {}
        """The store's picture of jobs shown in the detail pane, by (job id, restarts, state);
        entries not in ``fresh`` are shown and read again (after each queue refresh)."""
        self.fresh: set[tuple[int, int, str]] = set()
        self.ledger_reads = 0
        """Ledger reads started and not yet shown (the detail pane may still change)."""
        self.generation = 0
        self.last_apply_s = 0.0
        self._search_timer: Timer | None = None
        self.fetcher = self.poller("squeue", self._fetch, self._show_data, interval)

    def compose(self) -> ComposeResult:
        yield Static("Loading the queue...", classes="info")
        yield Input(placeholder="search: job, user, team, project, state, reason, nodes",
                    id="queue-search")
        yield KeyedTable(id="queue-table")
        yield JobDetail(id="job-detail")

    def on_mount(self) -> None:
        self.table.set_columns(COLUMNS)
        self.query_one("#queue-search", Input).display = False

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#queue-table", KeyedTable)

    def focus_main(self) -> None:
        self.table.focus()

    # -- data (worker threads) -------------------------------------------------------------

    def _reservations(self) -> tuple[dict[str, dict[str, Any]], str | None]:
        try:
            with self.sources.store() as store:
                rows = store.live_reservations()
        except (StoreError, *DatabaseError) as exc:
            return {}, f"accounting store unavailable, costs are estimates: {exc}"
        return {r["rid"]: r for r in rows}, None

    def _fetch(self) -> QueueSnapshot:
        now = self.sources.clock()
        jobs = self.sources.jobs()
        reservations, store_error = self._reservations()
        costs = {rid: r["est_cost"] for rid, r in reservations.items()}
        annotated = annotate(jobs, self.sources.policy, costs, self.estimator)
        viewer = self.sources.viewer
        if not viewer.admin:
            annotated = [q for q in annotated if viewer.sees(q.team)]
        query, generation = self.query_state, self.generation
        result = select(annotated, query, now)
        rows = self._rows(result)
        return QueueSnapshot(annotated, reservations, store_error, result, rows, generation)

    def _rows(self, result: QueueResult) -> list[Row]:
        cur = self.sources.currency
        return [(q.key, cells(q, result.now, cur)) for q in result.shown]

    def _select_work(self, jobs: list[QueueJob], query: QueueQuery, now: float,
                     generation: int) -> None:
        result = select(jobs, query, now)
        rows = self._rows(result)
        call_ui(self.app, self._selection_done, result, rows, generation)

    # -- rendering (UI thread) -------------------------------------------------------------

    def _show_data(self, snap: QueueSnapshot) -> None:
        self.fresh.clear()
        self.jobs = snap.jobs
        self.reservations = snap.reservations
        self.gate.report("reservations", snap.store_error)
        if snap.generation != self.generation:  # the query changed while fetching
            self._reselect()
            return
        self._apply(snap.result, snap.rows)

    def _selection_done(self, result: QueueResult, rows: list[Row], generation: int) -> None:
        if generation == self.generation:
            self._apply(result, rows)

    def _apply(self, result: QueueResult, rows: list[Row]) -> None:
        t0 = time.perf_counter()
        self.table.sync(rows)
        self.result = result
        self.by_key = {q.key: q for q in result.shown}
        self._update_info()
        self._show_detail()
        self.last_apply_s = time.perf_counter() - t0

    def _update_info(self) -> None:
        r = self.result
        if r is None:
            return
        q = r.query
        text = f"Showing {len(r.shown):,} of {r.matched:,} jobs"
        if r.matched != r.total:
            text += f" ({r.total:,} in queue)"
        label = dict(COLUMNS)[q.sort]
        text += f" | sort {label} {'desc' if q.reverse else 'asc'}"
        if q.describe():
            text += f" | {q.describe()}"
        # the cluster after what the user set: a narrow terminal cuts the end of the line
        text += (f" | {fmt.clusters(self.sources.slurm_cluster)} | "
                 f"{time.strftime('%H:%M:%S', time.gmtime(r.now))} UTC")
        self.set_info(text)

    def _reselect(self) -> None:
        self.generation += 1
        now = self.result.now if self.result else self.sources.clock()
        work = partial(self._select_work, self.jobs, self.query_state, now, self.generation)
        self.run_worker(work, thread=True, group="queue-select", exclusive=True,
                        exit_on_error=False)

    def set_query(self, **changes: Any) -> None:
        self.query_state = replace(self.query_state, **changes)
        self._reselect()

    # -- selection and detail --------------------------------------------------------------

    def selected(self) -> QueueJob | None:
        key = self.table.cursor_key
        return self.by_key.get(key) if key else None

    @on(DataTable.RowHighlighted, "#queue-table")
    def _highlighted(self) -> None:
        self._show_detail()

    @staticmethod
    def _ledger_key(q: QueueJob) -> tuple[int, int, str]:
        return q.job.job_id, q.job.restart_count, q.job.state

    def _show_detail(self) -> None:
        q = self.selected()
        resv = self.reservations.get(q.admin.get("rid", "")) if q else None
        key = self._ledger_key(q) if q else None
        ledger = self.ledgers.get(key) if key else None
        detail = self.query_one("#job-detail", JobDetail)
        now = self.result.now if self.result else self.sources.clock()
        detail.show(q, resv, ledger, self.sources.policy, now)
        # the store has runs of a job only once one ended: a requeued or a finished job
        if q and key and key not in self.fresh and (q.job.restart_count > 0 or q.job.finished):
            self.fresh.add(key)
            self.ledger_reads += 1
            self.run_worker(partial(self._load_ledger, q, key), thread=True,
                            group="queue-runs", exclusive=True, exit_on_error=False)

    def _load_ledger(self, q: QueueJob, key: tuple[int, int, str]) -> None:
        try:
            with self.sources.store() as store:
                ledger = job_ledger(store, self.sources.policy, q)
        except Exception:  # noqa: BLE001 - the pane shows no figures rather than failing
            ledger = JobLedger()
        call_ui(self.app, self._ledger_loaded, key, ledger)

    def _ledger_loaded(self, key: tuple[int, int, str], ledger: JobLedger) -> None:
        self.ledger_reads -= 1
        self.ledgers[key] = ledger
        q = self.selected()
        if q and self._ledger_key(q) == key:
            self._show_detail()

    # -- keys ------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return action != "job" or self.sources.viewer.admin

    def action_search(self) -> None:
        box = self.query_one("#queue-search", Input)
        box.display = True
        box.focus()

    def action_end_search(self) -> None:
        box = self.query_one("#queue-search", Input)
        box.value = ""
        box.display = False
        self.table.focus()
        if self.query_state.search:
            self.set_query(search="")

    @on(Input.Changed, "#queue-search")
    def _search_changed(self, event: Input.Changed) -> None:
        if self._search_timer is not None:
            self._search_timer.stop()
        value = event.value
        self._search_timer = self.set_timer(0.15, lambda: self.set_query(search=value))

    @on(Input.Submitted, "#queue-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        if self._search_timer is not None:
            self._search_timer.stop()
        if not event.value:
            event.input.display = False
        self.table.focus()
        if event.value != self.query_state.search:
            self.set_query(search=event.value)

    def action_filter(self) -> None:
        values = self.result.values if self.result else {}
        current: Filters = {f: getattr(self.query_state, f) for f in FILTER_FIELDS}

        def done(filters: Filters | None) -> None:
            if filters is not None:
                self.set_query(**filters)

        self.app.push_screen(FilterScreen(current, values), done)

    def action_clear_filters(self) -> None:
        self.query_one("#queue-search", Input).value = ""
        self.set_query(search="", **dict.fromkeys(FILTER_FIELDS))

    def action_sort(self) -> None:
        i = COLUMN_KEYS.index(self.query_state.sort)
        self.set_query(sort=COLUMN_KEYS[(i + 1) % len(COLUMN_KEYS)], reverse=False)

    def action_reverse(self) -> None:
        self.set_query(reverse=not self.query_state.reverse)

    @on(DataTable.HeaderSelected, "#queue-table")
    def _header(self, event: DataTable.HeaderSelected) -> None:
        key = event.column_key.value
        if key == self.query_state.sort:
            self.set_query(reverse=not self.query_state.reverse)
        elif key in COLUMN_KEYS:
            self.set_query(sort=key, reverse=False)

    def action_job(self, action: str) -> None:
        q = self.selected()
        if q is None:
            self.gate.say("No job selected.", error=True)
            return
        j = q.job
        question = (f"{action.capitalize()} job {q.label} "
                    f"({j.user}, {q.team or 'no team'}, {j.state})?")

        def confirmed(reason: str | None) -> None:
            if reason is not None:
                self.gate.act({"action": action, "job_id": j.job_id}, self.fetcher)

        self.app.push_screen(ConfirmScreen(question), confirmed)
