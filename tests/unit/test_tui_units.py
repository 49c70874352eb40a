"""The TUI's pure parts: formatting, the queue model, backoff, the key-diff table."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
from textual.app import App, ComposeResult

from slurm_plugin.slurm.client import Job
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tests.unit.test_tui_support import drive, rows
from tui import format as fmt
from tui.app import Intervals, intervals_from_env
from tui.chargeback_view import hierarchy, month, write_csv
from tui.demo import DEMO_NOW, demo_policy
from tui.keyed_table import KeyedTable
from tui.queue_model import CostEstimator, QueueQuery, annotate, cells, select
from tui.range_screen import parse_range
from tui.refresh import backoff

POLICY = demo_policy()


def test_durations_money_gpus_and_sparklines() -> None:
    assert [fmt.duration(s) for s in (None, 5, 125, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == \
        ["-", "5s", "2m", "3h05", "2d04h"]
    assert fmt.money(1234.5, "$") == "$1,234.50"
    assert fmt.money(None, "$") == "-"
    assert fmt.gpus("a100", 2.0) == "a100x2"
    assert fmt.gpus(None, 0.5) == "gpux0.5"
    assert fmt.gpus("h100", 0) == "-"
    assert fmt.sparkline([0, 50, 100, None], 4) == "▁▅█ "
    assert fmt.sparkline([], 3) == "   "
    bar = fmt.budget_bar(50, 25, 100, 80, 100, width=8)
    assert bar.plain == "████▒▒░░"
    assert fmt.budget_bar(0, 0, 0, 0, 0, width=9).plain == "no budget"


def test_refresh_interval_from_the_environment() -> None:
    assert intervals_from_env({}) == Intervals()
    assert intervals_from_env({"SLURMGATE_TUI_REFRESH": "60"}) == Intervals(queue=60, nodes=60)
    for too_fast_or_bad in ("1", "-3", "soon", "inf", "nan"):
        got = intervals_from_env({"SLURMGATE_TUI_REFRESH": too_fast_or_bad}).queue
        assert got in (5.0, 20.0), too_fast_or_bad


def test_errors_back_off_from_5_to_30_seconds() -> None:
    assert [backoff(n) for n in range(1, 7)] == [5, 10, 20, 30, 30, 30]


def _queue(n: int = 200) -> list:
    slurm = SyntheticSlurm(n, 8, seed=3, base_ts=DEMO_NOW)
    return annotate(slurm.jobs(), POLICY, {}, CostEstimator(POLICY))


def test_team_project_and_cost_come_from_the_admin_comment_and_rate_card() -> None:
    q = _queue(50)[0]
    assert q.team == q.job.account and q.project
    assert q.admin["rid"].startswith("r")
    gpu_hours = q.job.gpus * q.job.time_limit_min / 60
    assert q.est_cost == pytest.approx(
        gpu_hours * POLICY.rates.gpu_hour[q.job.gpu_type] + q.job.cpus
        * POLICY.rates.cpu_core_hour * q.job.time_limit_min / 60)
    # a reservation's worst case wins over the estimate
    costed = annotate([q.job], POLICY, {q.admin["rid"]: 99.0}, CostEstimator(POLICY))
    assert costed[0].est_cost == 99.0
    # a job without slurmgate's comment falls back to the policy's account map
    bare = replace(q.job, admin_comment=None, account="nlp")
    assert annotate([bare], POLICY, {}, CostEstimator(POLICY))[0].team == "nlp"
    # a GPU type the rate card does not price is shown as unknown, not as 0
    odd = replace(q.job, gpu_type="tpu9")
    assert annotate([odd], POLICY, {}, CostEstimator(POLICY))[0].est_cost is None


def test_filter_search_sort_and_cap() -> None:
    jobs = _queue()
    r = select(jobs, QueueQuery(team="nlp", state="PENDING", limit=5), DEMO_NOW)
    assert r.total == 200 and 5 < r.matched < 200 and len(r.shown) == 5
    assert all(q.team == "nlp" and q.job.state == "PENDING" for q in r.shown)
    assert "vision" in r.values["team"] and "RUNNING" in r.values["state"]
    r = select(jobs, QueueQuery(search="ERIN"), DEMO_NOW)
    assert r.matched and all(q.job.user == "erin" for q in r.shown)
    r = select(jobs, QueueQuery(sort="cost", reverse=True), DEMO_NOW)
    costs = [q.est_cost or -1 for q in r.shown]
    assert costs == sorted(costs, reverse=True)
    r = select(jobs, QueueQuery(sort="wait"), DEMO_NOW)
    assert r.shown[0].job.submit_ts is not None
    label = cells(r.shown[0], DEMO_NOW, "$")
    assert len(label) == 12 and "/" in str(label[10])


def test_held_jobs_read_held() -> None:
    held = next(q for q in _queue() if q.job.held)
    assert str(cells(held, DEMO_NOW, "$")[5]) == "HELD"


def test_chargeback_tree_and_csv(tmp_path) -> None:  # noqa: ANN001
    data = [
        {"team": "nlp", "project": "llm", "user": "bob", "runs": 2, "gpu_hours": 10.0,
         "gpu_hours_by_type": {"a100": 10.0}, "energy_kwh": 1.0, "cost": 30.0,
         "idle_cost": 3.0, "credits": 5.0, "net": 25.0},
        {"team": "nlp", "project": "llm", "user": "erin", "runs": 1, "gpu_hours": 4.0,
         "gpu_hours_by_type": {"h100": 4.0}, "energy_kwh": 0.5, "cost": 16.0,
         "idle_cost": 0.0, "credits": 0.0, "net": 16.0},
        {"team": "vision", "project": None, "user": "alice", "runs": 1, "gpu_hours": 1.0,
         "gpu_hours_by_type": {"a100": 1.0}, "energy_kwh": 0.1, "cost": 2.5,
         "idle_cost": 0.0, "credits": 0.0, "net": 2.5},
    ]
    groups = hierarchy(data, 3)
    assert [g.path for g in groups] == [("nlp",), ("nlp", "llm"), ("nlp", "llm", "bob"),
                                        ("nlp", "llm", "erin"), ("vision",),
                                        ("vision", "(none)"), ("vision", "(none)", "alice")]
    assert groups[0].totals["net"] == 41.0 and groups[0].by_type == {"a100": 10.0, "h100": 4.0}
    assert [g.path for g in hierarchy(data, 1)] == [("nlp",), ("vision",)]
    out = tmp_path / "cb.csv"
    write_csv(str(out), hierarchy(data, 2), "2023-11")
    lines = list(csv.DictReader(out.open()))
    assert lines[0]["team"] == "nlp" and lines[0]["level"] == "team" and lines[0]["net"] == "41.0"
    assert lines[1]["project"] == "llm" and lines[1]["gpu_hours_by_type"] == \
        "a100=10.0000;h100=4.0000"


def test_months_and_custom_ranges() -> None:
    assert month(DEMO_NOW)[2] == "2023-11" and month(DEMO_NOW, 1)[2] == "2023-10"
    start, end, label = parse_range("2023-10-01 2023-10-15")
    assert end - start == 15 * 86400 and label == "2023-10-01_2023-10-15"
    for bad in ("2023-10-01", "2023-13-01 2023-10-02", "2023-10-05 2023-10-01"):
        with pytest.raises(ValueError):
            parse_range(bad)


class _TableApp(App):
    def compose(self) -> ComposeResult:
        yield KeyedTable(id="t")


def test_key_diff_keeps_the_cursor_on_its_row() -> None:
    def row(key: str, value: str) -> tuple[str, tuple[str, str]]:
        return key, (key, value)

    async def scenario(pilot) -> None:  # noqa: ANN001
        t = pilot.app.query_one(KeyedTable)
        t.set_columns([("k", "Key"), ("v", "Value")])
        t.sync([row("a", "1"), row("b", "2"), row("c", "3")])
        await pilot.pause()
        t.select_key("b")
        stats = t.sync([row("z", "0"), row("c", "3"), row("b", "9")])  # a gone, z new, b changed
        assert (stats.added, stats.removed, stats.updated, stats.reordered) == (1, 1, 1, True)
        assert t.cursor_key == "b" and t.keys == ["z", "c", "b"]
        assert rows(t) == {"z": ["z", "0"], "c": ["c", "3"], "b": ["b", "9"]}
        t.sync([row("z", "0"), row("c", "3")])  # the cursor's row leaves: stay at its index
        assert t.cursor_key == "c"
        t.set_columns([("k", "Key"), ("v", "Value")])  # same columns: rows stay
        assert t.keys == ["z", "c"]
        many = [row(f"m{i:03d}", str(i)) for i in range(120)]
        t.sync([*many[:60], row("c", "3"), *many[60:]])
        t.select_key("c")
        t.sync([row("c", "4"), *many[100:]])  # 100 rows leave at once: rebuilt
        assert t.cursor_key == "c" and t.keys == ["c", *[k for k, _ in many[100:]]]
        t.set_columns([("k", "Key"), ("v", "Value"), ("w", "More")])  # new columns: cleared
        assert t.keys == [] and t.cursor_key is None

    drive(_TableApp(), scenario)


def test_a_job_without_times_or_gpus_formats() -> None:
    q = annotate([Job(job_id=5, state="PENDING")], POLICY, {}, CostEstimator(POLICY))[0]
    text = [str(c) for c in cells(q, DEMO_NOW, "$")]
    assert text[0] == "5" and text[7] == "-" and text[9] == "-" and text[10] == "-/none"
