"""The views on the fixed demo dataset: node actions, chargeback periods and CSV export,
event kinds, quotas. (Node drains are not tried on the shared dev cluster: other tests use
its nodes.)"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_tui_support import column, drive, loaded, rows, until
from tui.app import SlurmgateApp
from tui.demo import DemoSources


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[SlurmgateApp, DemoSources]]:
    sources = DemoSources()
    yield SlurmgateApp(sources, export_dir=str(tmp_path)), sources
    sources.close()


def test_drain_and_resume_a_node_with_a_reason(demo) -> None:  # noqa: ANN001
    app, sources = demo

    async def scenario(pilot) -> None:  # noqa: ANN001
        nodes = await loaded(pilot, "nodes")
        assert nodes.table.cursor_key == "gpu001"
        await pilot.press("d")
        await until(pilot, lambda: app.modal_open, 5, "the drain dialog")
        box = app.screen.query_one("#reason")
        assert box.has_focus and box.value == "drained by admin"
        box.value = ""
        await pilot.press(*"bad fan", "enter")
        await until(pilot, lambda: "drain gpu001: done" in app.status.text, 10, "the drain")
        await until(pilot, lambda: "drain" in rows(nodes.table)["gpu001"][1], 10, "drained")
        assert rows(nodes.table)["gpu001"][-1] == "bad fan"
        await pilot.press("u", "y")
        await until(pilot, lambda: "drain" not in rows(nodes.table)["gpu001"][1], 10,
                    "resumed")
        events = await loaded(pilot, "events")
        await until(pilot, lambda: sum(r[1] == "admin_action" for r in
                                       rows(events.table).values()) >= 3, 10, "audit events")

    drive(app, scenario)


def test_a_drain_needs_a_reason(demo) -> None:  # noqa: ANN001
    app, sources = demo

    async def scenario(pilot) -> None:  # noqa: ANN001
        await loaded(pilot, "nodes")
        await pilot.press("d")
        await until(pilot, lambda: app.modal_open, 5, "the drain dialog")
        app.screen.query_one("#reason").value = " "
        await pilot.press("enter")
        assert app.modal_open and "reason is required" in app.screen_text()
        await pilot.press("escape")
        await until(pilot, lambda: not app.modal_open, 5, "the dialog to close")
        assert not sources.slurm.nodes()[0].drained

    drive(app, scenario)


def test_allocated_but_idle_gpus_are_flagged(demo) -> None:  # noqa: ANN001
    app, _ = demo

    async def scenario(pilot) -> None:  # noqa: ANN001
        nodes = await loaded(pilot, "nodes")
        idle = dict(zip(nodes.table.keys, column(nodes.table, "idle"), strict=True))
        assert idle["gpu002"] == "1" and idle["gpu001"] == "0"
        nodes.table.select_key("gpu002")
        await pilot.pause()
        gpus = rows(app.main.query_one("#gpus-table"))
        assert gpus["0"][2] == "0%" and gpus["0"][4] == "allocated but idle?"
        assert "1 allocated but idle" in app.screen_text()
        assert column(nodes.table, "fail")[2] == "2"  # gpu003: two node failures this week

    drive(app, scenario)


def test_chargeback_periods_depth_and_csv_export(demo, tmp_path: Path) -> None:  # noqa: ANN001
    app, _ = demo

    async def scenario(pilot) -> None:  # noqa: ANN001
        cb = await loaded(pilot, "chargeback")
        this_month = rows(cb.table)
        assert "nlp" in this_month and "nlp/llm-pretrain/bob" in this_month
        await pilot.press("d")  # team only
        assert all("/" not in k for k in cb.table.keys)
        await pilot.press("p")
        await until(pilot, lambda: cb.period[2] == "2023-10" and cb.fetcher.renders >= 2, 10,
                    "last month")
        await until(pilot, lambda: not cb.fetcher.in_flight, 10, "last month's rows")
        last_month = rows(cb.table)
        assert last_month and last_month != {k: v for k, v in this_month.items() if "/" not in k}
        await pilot.press("e")
        path = tmp_path / "slurmgate-chargeback-2023-10.csv"
        await until(pilot, lambda: f"to {path}" in app.status.text, 10, "the export")
        lines = list(csv.DictReader(path.open()))
        assert [r["team"] for r in lines] == list(last_month)
        assert {r["level"] for r in lines} == {"team"}
        net = sum(float(r["net"]) for r in lines)
        assert f"{net:,.2f}" in app.screen_text()
        await pilot.press("t")
        await until(pilot, lambda: app.modal_open, 5, "the date dialog")
        await pilot.press(*"2023-10-01 2023-11-14", "enter")
        await until(pilot, lambda: cb.period[2] == "2023-10-01_2023-11-14"
                    and not cb.fetcher.in_flight and cb.fetcher.renders >= 3, 10, "custom days")
        custom = sum(float(c.strip("$").replace(",", "")) for c in column(cb.table, "net"))
        assert custom > net

    drive(app, scenario)


def test_events_newest_first_and_by_kind(demo) -> None:  # noqa: ANN001
    app, _ = demo

    async def scenario(pilot) -> None:  # noqa: ANN001
        events = await loaded(pilot, "events")
        ids = [int(k) for k in events.table.keys]
        assert ids == sorted(ids, reverse=True)
        kinds = set(column(events.table, "kind"))
        assert {"node_fail", "reject", "drain", "idle_warning", "idle_action",
                "alert_failed"} <= kinds
        while events.kind != "reject":
            await pilot.press("k")
        await until(pilot, lambda: not events.fetcher.in_flight
                    and set(column(events.table, "kind")) == {"reject"}, 10, "reject only")
        assert "kind: reject" in app.screen_text()
        await pilot.press("K")
        await until(pilot, lambda: set(column(events.table, "kind")) == kinds, 10, "all again")

    drive(app, scenario)


def test_quotas_show_budget_use_and_projection(demo) -> None:  # noqa: ANN001
    app, sources = demo

    async def scenario(pilot) -> None:  # noqa: ANN001
        quotas = await loaded(pilot, "quotas")
        shown = rows(quotas.table)
        quota = {r["team"]: r for r in sources.quota()["teams"]}
        assert sorted(shown) == sorted(quota)
        robotics = shown["robotics"]
        assert int(robotics[2].rstrip("%")) > 100 and robotics[6].startswith("$-")
        assert all(len(r[1]) == 16 for r in shown.values())  # the bars
        burn = float(shown["nlp"][10].strip("$").replace(",", ""))
        projected = float(shown["nlp"][11].strip("$").replace(",", ""))
        assert burn > 0 and projected > quota["nlp"]["spent"]
        assert "days left" in app.screen_text()

    drive(app, scenario)
