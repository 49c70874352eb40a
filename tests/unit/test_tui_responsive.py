"""10,000 queued jobs through SyntheticSlurm: the UI thread is never the one waiting.

A gated backend holds ``jobs()`` (a slow squeue) while the test presses keys and checks each
took effect within a bound; then the refresh completes and the cursor is still on its job.
"""

from __future__ import annotations

import threading
import time

from slurm_plugin.slurm.client import Job
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tests.unit.test_tui_support import drive, loaded, until
from tui.app import Intervals, SlurmgateApp
from tui.demo import DEMO_NOW, DemoSources

N_JOBS = 10_000
KEY_BOUND_S = 2.0
"""A key press must have its effect within this, refresh or not. Typically 0.05-0.3 s on the
2-CPU dev machine (a tab switch repaints the whole screen); the gated squeue would hold a
blocked UI thread for up to 60 s."""
APPLY_BOUND_S = 0.5
"""UI-thread time to apply a 10,000-job refresh (the benchmark measures ~5 ms)."""


class GatedSlurm(SyntheticSlurm):
    """``jobs()`` waits for ``gate`` (bounded) so a refresh can be held in flight."""

    def __init__(self) -> None:
        super().__init__(N_JOBS, n_nodes=128, seed=5, base_ts=DEMO_NOW, clock=lambda: DEMO_NOW)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def jobs(self, job_ids=None) -> list[Job]:  # noqa: ANN001
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(60)
            self.waiting.clear()
        return super().jobs(job_ids)


def test_keys_work_while_a_10000_job_refresh_runs() -> None:
    slurm = GatedSlurm()
    sources = DemoSources(slurm=slurm, fill_store=False)
    app = SlurmgateApp(sources, intervals=Intervals(queue=3600))

    async def timed(pilot, key: str, effect, what: str) -> float:  # noqa: ANN001
        t0 = time.monotonic()
        await pilot.press(key)
        await until(pilot, effect, KEY_BOUND_S * 5, what, interval=0.01)
        took = time.monotonic() - t0
        assert took < KEY_BOUND_S, f"{what} took {took:.2f}s"
        return took

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        table = queue.table
        assert "Showing 500 of 10,000 jobs" in app.screen_text()
        for _ in range(3):
            await pilot.press("down")
        kept = table.cursor_key
        assert kept == table.keys[3]

        slurm.gate.clear()  # the next squeue hangs until the gate opens
        await pilot.press("r")
        await until(pilot, slurm.waiting.is_set, 10, "the refresh to be in flight")
        assert queue.fetcher.in_flight
        row = table.cursor_row
        await timed(pilot, "down", lambda: table.cursor_row == row + 1, "cursor down")
        await timed(pilot, "up", lambda: table.cursor_row == row, "cursor up")
        await timed(pilot, "2", lambda: app.active_view == "nodes", "switch to Nodes")
        await timed(pilot, "1", lambda: app.active_view == "queue", "back to Queue")
        await timed(pilot, "S", lambda: queue.result.query.reverse, "reverse sort")
        await timed(pilot, "S", lambda: not queue.result.query.reverse, "sort back")
        await timed(pilot, "question_mark", lambda: app.modal_open, "open help")
        await timed(pilot, "escape", lambda: not app.modal_open, "close help")
        assert queue.fetcher.in_flight and slurm.waiting.is_set()
        assert table.cursor_key == kept

        slurm.gate.set()
        renders = queue.fetcher.renders
        await until(pilot, lambda: queue.fetcher.renders > renders, 30, "the refresh")
        assert table.cursor_key == kept, "the cursor left its job across the refresh"
        assert queue.fetcher.last_render_s < APPLY_BOUND_S

        # keys stay responsive while the worker churns through 10,000 jobs (no gate)
        for _ in range(3):
            renders = queue.fetcher.renders
            queue.fetcher.request()
            row = table.cursor_row
            await timed(pilot, "down", lambda r=row: table.cursor_row == r + 1, "cursor down")
            await until(pilot, lambda r=renders: queue.fetcher.renders > r, 30, "the refresh")

    try:
        drive(app, scenario)
    finally:
        slurm.gate.set()
        sources.close()
