"""Idle-GPU warnings and actions show in the TUI's events view, with their own kinds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_tui_support import column, drive, loaded, rows, until
from tui.app import SlurmgateApp
from tui.demo import DEMO_NOW, DemoSources
from tui.events_view import KIND_STYLE, event_cells


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[SlurmgateApp, DemoSources]]:
    sources = DemoSources()
    for kind, message in (("idle_warning", "idle GPUs: job 4242 (alice): 4 of 4 GPUs below 5%"
                                           " utilisation for 61 min, $10.17 so far"),
                          ("idle_action", "idle GPUs: job 4242 (alice): cancelled")):
        sources.writer.add_event(kind, ts=DEMO_NOW, cluster="demo", job_id=4242,
                                 restart_count=0, team="vision", user="alice", node="gpu001",
                                 actor="slurmgate", message=message,
                                 detail={"idle_minutes": 61.0, "dry_run": False})
    yield SlurmgateApp(sources, export_dir=str(tmp_path)), sources
    sources.close()


def test_idle_events_are_listed_and_filtered_by_their_kind(demo) -> None:  # noqa: ANN001
    app, _ = demo

    async def scenario(pilot) -> None:  # noqa: ANN001
        events = await loaded(pilot, "events")
        assert {"idle_warning", "idle_action"} <= set(column(events.table, "kind"))
        while events.kind != "idle_warning":
            await pilot.press("k")
        await until(pilot, lambda: not events.fetcher.in_flight
                    and set(column(events.table, "kind")) == {"idle_warning"}, 10,
                    "idle warnings only")
        # the demo has idle warnings of its own: this test's is job 4242's
        [row] = [r for r in rows(events.table).values() if "4242" in r]
        assert "4242" in row and "alice" in row and "gpu001" in row
        assert any("below 5% utilisation for 61 min" in cell for cell in row)

    drive(app, scenario, size=(160, 30))


def test_idle_kinds_have_a_style() -> None:
    cells = event_cells({"ts": DEMO_NOW, "kind": "idle_action", "job_id": 1, "message": "x"})
    assert cells[1].style == KIND_STYLE["idle_action"] != ""
    assert KIND_STYLE["idle_warning"]
