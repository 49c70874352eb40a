"""Refresh behaviour: errors in the status line with backoff, no overlapping fetches, and no
fetching while a dialog is open."""

from __future__ import annotations

import threading
import time

import pytest

from slurm_plugin.slurm.client import Job, SlurmError
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tests.unit.test_tui_support import drive, loaded, until
from tui import refresh
from tui.app import Intervals, SlurmgateApp
from tui.demo import DEMO_NOW, DemoSources, demo_policy
from tui.sources import LiveSources, Viewer


class FlakySlurm(SyntheticSlurm):
    """Fails the first ``failures`` queue queries; counts concurrent ones."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__(300, 8, seed=2, base_ts=DEMO_NOW, clock=lambda: DEMO_NOW)
        self.failures = failures
        self.queries = 0
        self.active = 0
        self.most_active = 0
        self.gate = threading.Event()
        self.gate.set()
        self._count = threading.Lock()

    def jobs(self, job_ids=None) -> list[Job]:  # noqa: ANN001
        with self._count:
            self.queries += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            self.gate.wait(30)
            if self.queries <= self.failures:
                raise SlurmError(["squeue", "--json"], 1, "slurm_load_jobs error: timed out")
            return super().jobs(job_ids)
        finally:
            with self._count:
                self.active -= 1


def _app(slurm: FlakySlurm, queue_s: float = 3600) -> tuple[SlurmgateApp, DemoSources]:
    sources = DemoSources(slurm=slurm, fill_store=False)
    return SlurmgateApp(sources, intervals=Intervals(queue=queue_s)), sources


def test_errors_show_in_the_status_line_and_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refresh, "BACKOFF_MIN_S", 0.2)
    monkeypatch.setattr(refresh, "BACKOFF_MAX_S", 0.4)
    slurm = FlakySlurm(failures=3)
    app, sources = _app(slurm)
    seen: list[str] = []

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue", timeout=30)  # after 3 failures, 0.2 + 0.4 + 0.4 s
        assert slurm.queries == 4 and queue.fetcher.failures == 0
        assert "squeue" not in app.status.text, "the error stays after the source recovered"
        assert "Showing 300 of 300 jobs" in app.screen_text()

    def watch(source: str, error: str | None) -> None:
        if error:
            seen.append(f"{source}: {error}")
        app.status.report(source, error)

    app.report = watch  # type: ignore[method-assign]
    try:
        drive(app, scenario)
    finally:
        sources.close()
    assert [s.split("(retry in ")[1] for s in seen] == ["0.2 s)", "0.4 s)", "0.4 s)"]
    assert seen[0].startswith("squeue: `squeue --json` failed (exit code 1): slurm_load_jobs")


def test_a_refresh_never_overlaps_the_one_in_flight() -> None:
    slurm = FlakySlurm()
    app, sources = _app(slurm)

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        slurm.gate.clear()
        queries = slurm.queries
        for _ in range(5):
            await pilot.press("r")
        await until(pilot, lambda: slurm.active == 1, 10, "the held query")
        assert queue.fetcher.in_flight and queue.fetcher.again
        renders = queue.fetcher.renders
        slurm.gate.set()
        # the presses during the fetch fold into ONE more fetch after it rendered
        await until(pilot, lambda: queue.fetcher.renders >= renders + 2, 30, "two refreshes")
        await until(pilot, lambda: not queue.fetcher.in_flight, 10, "quiet")
        assert slurm.queries == queries + 2 and slurm.most_active == 1

    try:
        drive(app, scenario)
    finally:
        slurm.gate.set()
        sources.close()


def test_no_refresh_while_a_dialog_is_open() -> None:
    slurm = FlakySlurm()
    app, sources = _app(slurm, queue_s=0.2)

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        await pilot.press("question_mark")
        await until(pilot, lambda: queue.fetcher.due and not queue.fetcher.in_flight, 10,
                    "a refresh to fall due behind the dialog")
        queries = slurm.queries
        window = time.monotonic() + 5 * 0.2  # five refresh intervals behind the dialog
        await until(pilot, lambda: time.monotonic() > window or slurm.queries > queries, 5,
                    "the observation window")
        assert slurm.queries == queries and queue.fetcher.due
        await pilot.press("escape")
        await until(pilot, lambda: slurm.queries > queries, 10, "the refresh to resume")

    try:
        drive(app, scenario)
    finally:
        sources.close()


def test_hidden_views_do_not_refresh() -> None:
    slurm = FlakySlurm()
    app, sources = _app(slurm)

    async def scenario(pilot) -> None:  # noqa: ANN001
        await loaded(pilot, "queue")
        nodes = app.view("nodes")
        assert nodes.fetcher.renders == 0 and nodes.fetcher.due
        await loaded(pilot, "nodes")
        assert nodes.fetcher.renders == 1

    try:
        drive(app, scenario)
    finally:
        sources.close()


def test_a_missing_daemon_and_database_are_reported_not_fatal(tmp_path) -> None:  # noqa: ANN001
    policy = demo_policy(str(tmp_path / "never-created.db"))
    policy = policy.model_copy(update={"daemon": policy.daemon.model_copy(
        update={"socket": str(tmp_path / "no.sock")})})
    sources = LiveSources(policy, slurm=FlakySlurm(), viewer=Viewer("root", True, frozenset()))
    app = SlurmgateApp(sources, intervals=Intervals(queue=3600))

    async def scenario(pilot) -> None:  # noqa: ANN001
        await loaded(pilot, "queue")
        assert "Showing 300 of 300 jobs" in app.screen_text()
        await until(pilot, lambda: "reservations: accounting store unavailable" in
                    app.status.text, 10, "the store warning")
        app.action_show("quotas")
        await until(pilot, lambda: "quota: the slurmgate daemon is not running" in
                    app.status.text, 10, "the daemon error")
        assert "(retry in 5 s)" in app.status.text
        app.action_show("events")
        await until(pilot, lambda: "events: " in app.status.text, 10, "the events error")
        assert "no database here" in app.status.text

    try:
        drive(app, scenario)
    finally:
        sources.close()
