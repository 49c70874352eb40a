"""The quotas view's burn-down and the nodes view's per-GPU sparklines, on known data."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policies.burndown import DAY, burndown
from tests.unit.test_tui_support import column, drive, loaded, until
from tui.app import SlurmgateApp
from tui.burndown_chart import chart
from tui.demo import DEMO_NOW, DemoSources
from tui.util_sparkline import UtilisationSparkline, anchored, columns

NOV = datetime(2023, 11, 1, tzinfo=UTC).timestamp()
FIRST = int(NOV // DAY)


@pytest.fixture
def known(tmp_path: Path) -> Iterator[tuple[SlurmgateApp, DemoSources]]:
    """nlp settled 250 a day on Nov 1-13; nobody else spent anything."""
    sources = DemoSources(fill_store=False)
    with sources.writer.transaction():
        sources.writer.conn.executemany(
            "INSERT INTO usage_daily_team (day, cluster, team, runs, cost) "
            "VALUES (:day, 'demo', 'nlp', 1, 250.0)", [{"day": FIRST + d} for d in range(13)])
    yield SlurmgateApp(sources, export_dir=str(tmp_path)), sources
    sources.close()


def test_quotas_show_the_burn_down_and_the_exhaustion_date(known) -> None:  # noqa: ANN001
    app, _ = known
    elapsed = (DEMO_NOW - (FIRST + 7) * DAY) / DAY  # Nov 8 00:00 to now
    runs_out = DEMO_NOW + 750.0 / (1500.0 / elapsed) * DAY
    when = datetime.fromtimestamp(runs_out, UTC)

    async def scenario(pilot) -> None:  # noqa: ANN001
        quotas = await loaded(pilot, "quotas")
        quotas.table.select_key("nlp")
        await until(pilot, lambda: "Burn-down of nlp" in app.screen_text(), 10, "nlp's chart")
        text = app.screen_text()
        assert "spent $3,250.00 of $4,000.00 (81%)" in text
        assert f"${1500.0 / elapsed:,.2f}/day" in text
        assert "soft limit reached on 2023-11-13" in text
        assert f"budget = hard limit ~{when:%m-%d %H:%M} UTC" in text
        assert "budget=hard" in text and "soft" in text and "per day" in text
        out = dict(zip(quotas.table.keys, column(quotas.table, "out"), strict=True))
        assert out["nlp"] == f"{when:%m-%d}" == "11-18"
        assert out["speech"] == "not before end"
        quotas.table.select_key("speech")
        await until(pilot, lambda: "Burn-down of speech" in app.screen_text(), 10, "speech")
        assert ("soft limit, budget = hard limit: not before the period ends"
                in app.screen_text())

    drive(app, scenario)


def test_the_chart_draws_days_so_far_solid_and_the_projection_after_them() -> None:
    b = burndown({FIRST + d: 100.0 for d in range(10)}, period_start=NOV,
                 period_end=NOV + 30 * DAY, now=NOV + 10 * DAY, budget=2000.0, soft=1600.0,
                 hard=2000.0)
    text = chart(b, 2 * 30 + 1 + 12, height=4)
    lines = text.plain.split("\n")
    assert len(lines) == 6
    assert lines[-1].startswith("└1") and "UTC days" in lines[-1]
    assert lines[-2].rstrip().endswith("per day") and lines[-2][1:21] == "█" * 20
    plot = [line[1:61] for line in lines[:4]]
    # the projection reaches 3,000 by the period's end: the chart's top
    assert plot[0][-2:] == "██"
    assert "budget=hard" in lines[1] and "─" in plot[1]  # 2,000 of 3,000: row 3 of 4
    projected = [span for span in text.spans if span.style == "bright_black"]
    assert projected  # the days to come are drawn dim


def test_sparkline_columns_keep_a_fixed_scale() -> None:
    assert columns([0.0, 50.0, None, 100.0], 2) == [25.0, 100.0]
    assert columns([None, None], 2) == [0.0, 0.0]
    assert columns([150.0, -3.0], 4) == [100.0, 100.0, 0.0, 0.0]
    assert anchored([40.0, 40.0, 40.0]) == [40.0, 0.0, 40.0, 100.0, 40.0, 40.0]


def test_nodes_show_each_gpus_last_hour(tmp_path: Path) -> None:
    sources = DemoSources()
    app = SlurmgateApp(sources, export_dir=str(tmp_path))

    async def scenario(pilot) -> None:  # noqa: ANN001
        nodes = await loaded(pilot, "nodes")
        nodes.table.select_key("gpu002")
        await until(pilot, lambda: "GPUs of gpu002" in app.screen_text(), 10, "gpu002")
        sparks = list(app.main.query("#gpu-sparklines UtilisationSparkline")
                      .results(UtilisationSparkline))
        assert len(sparks) == 4
        idle, busy = sparks[0].slots, sparks[1].slots
        assert len(idle) == 60 and idle[0] is None  # no sample in the hour's first minute
        assert all(v == 0.0 for v in idle[1:])  # gpu002's first GPU sits idle
        assert all(v is not None and v >= 55.0 for v in busy[1:])
        lines = {line.strip()[:5]: line for line in app.screen_text().split("\n")
                 if line.strip().startswith("GPU ")}
        idle_bars = lines["GPU 0"].split("%", 1)[1].strip()
        busy_bars = lines["GPU 1"].split("%", 1)[1].strip()
        assert set(idle_bars) == {"▁"} and len(idle_bars) > 30
        assert set(busy_bars) - {"▁"} and set(busy_bars) <= set("▁▂▃▄▅▆▇█")

    try:
        drive(app, scenario)
    finally:
        sources.close()
