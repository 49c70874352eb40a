"""The TUI on a ledger of several clusters: ``slurmgate tui --cluster NAME`` limits the
quotas, chargeback and events views to that cluster (every cluster's by default; the quotas,
the daemon's own), every view's header names the cluster it shows, and the queue and nodes
stay Slurm's own cluster. The ledger is a ``ledger_target`` (SQLite, then PostgreSQL).

Demo rates: a100 $2.50/GPU-h, h100 $4.00/GPU-h; no CPU, memory or energy is priced here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db.ingest import ingest_records
from tests.unit.test_tui_efficiency import on_ledger
from tests.unit.test_tui_support import column, drive, loaded, rows, until
from tui.app import SlurmgateApp, run, unknown_cluster
from tui.demo import DEMO_NOW, DemoSources

HOUR = 3600.0
END = DEMO_NOW - 2 * HOUR  # 2023-11-14: in the demo clock's month
SIZE = (160, 30)


def settled_run(sources: DemoSources, cluster: str, job_id: int, *, team: str, gpus: int,
                gpu_type: str = "a100", hours: float = 1.0) -> None:
    start = END - hours * HOUR
    sources.writer.add_reservation({
        "cluster": cluster, "job_id": job_id, "team": team, "project": "p", "user": "bob",
        "account": team, "partition": "gpu", "gpu_type": gpu_type, "gpus": gpus, "cpus": 0,
        "mem_mb": 0, "time_limit_min": 600, "est_cost": 50.0, "period": "2023-11",
        "tags": {"project": "p"}}, now=start - 60)

    def record(kind: str, **fields: Any) -> dict[str, Any]:
        return {"v": 1, "kind": kind, "record_id": uuid.uuid4().hex, "cluster": cluster,
                "written_at": END, "job_id": job_id, "restart_count": 0, "user": "bob",
                "account": team, "start_ts": start, "end_ts": END, **fields}

    gpu_list = [{"index": i, "minor": i, "uuid": f"GPU-{cluster}-{job_id}-{i}",
                 "gpu_type": gpu_type, "energy_j": None, "util_mean": 50.0, "util_max": 60.0,
                 "mem_max_bytes": 2**30, "gpu_seconds": hours * HOUR} for i in range(gpus)]
    result = ingest_records(sources.writer, [
        record("node_run", node="gpu001", gpus=gpu_list),
        record("jobcomp", state="COMPLETED", submit_ts=start - 60, nodes="gpu001",
               node_count=1, partition="gpu", uid=2001, exit_code="0:0", derived_ec="0:0",
               time_limit_min=600, work_dir="/home/bob"),
    ], sources.policy, now=DEMO_NOW)
    assert not result.errors and result.settled


def two_cluster_sources(target: str, cluster: str | None) -> DemoSources:
    """demo: nlp 2 x a100 for 2 h ($10.00), vision holds $100.00; west: nlp 1 x a100 for 1 h
    ($2.50, job 601 again), vision 1 x h100 for 1 h ($4.00) and holds $40.00. Events: a node
    failure of demo's gpu001, two of west's gpu001 and a rejection on west."""
    sources = on_ledger(DemoSources(fill_store=False, cluster=cluster), target)
    settled_run(sources, "demo", 601, team="nlp", gpus=2, hours=2)
    settled_run(sources, "west", 601, team="nlp", gpus=1)
    settled_run(sources, "west", 602, team="vision", gpus=1, gpu_type="h100")
    for c, est in (("demo", 100.0), ("west", 40.0)):
        sources.writer.add_reservation({
            "cluster": c, "job_id": None, "team": "vision", "user": "carol",
            "account": "vision", "partition": "gpu", "gpu_type": "a100", "gpus": 1,
            "est_cost": est, "period": "2023-11"}, now=DEMO_NOW - HOUR)
    sources.writer.add_events([
        {"ts": END + 60, "kind": "node_fail", "cluster": "demo", "node": "gpu001",
         "job_id": 601, "message": "demo gpu001 down"},
        {"ts": END + 120, "kind": "node_fail", "cluster": "west", "node": "gpu001",
         "job_id": 601, "message": "west gpu001 down"},
        {"ts": END + 180, "kind": "node_fail", "cluster": "west", "node": "gpu001",
         "job_id": 602, "message": "west gpu001 down again"},
        {"ts": END + 240, "kind": "reject", "cluster": "west", "team": "nlp",
         "message": "west rejects"},
    ])
    return sources


@pytest.fixture(params=[None, "west"], ids=["all clusters", "west"])
def shown(request: pytest.FixtureRequest, ledger_target: str, tmp_path: Path
          ) -> Iterator[tuple[SlurmgateApp, DemoSources, str | None]]:
    sources = two_cluster_sources(ledger_target, request.param)
    yield SlurmgateApp(sources, export_dir=str(tmp_path)), sources, request.param
    sources.close()


def test_the_views_show_the_cluster_asked_for_and_say_which(shown) -> None:  # noqa: ANN001
    app, sources, cluster = shown
    label = "all clusters" if cluster is None else f"cluster {cluster}"

    async def scenario(pilot) -> None:  # noqa: ANN001
        cb = await loaded(pilot, "chargeback")
        await until(pilot, lambda: "Chargeback 2023-11" in app.screen_text(), 10, "header")
        assert f"Chargeback 2023-11, {label} | 2 teams" in app.screen_text()
        net = dict(zip(cb.table.keys, column(cb.table, "net"), strict=True))
        assert (net["nlp"], net["vision"]) == (("$12.50", "$4.00") if cluster is None
                                               else ("$2.50", "$4.00"))

        events = await loaded(pilot, "events")
        n = 4 if cluster is None else 3
        await until(pilot, lambda: f"{label} | Showing {n} of {n} events" in app.screen_text(),
                    10, "the events header")
        messages = [r[-1] for r in rows(events.table).values()]
        assert ("demo gpu001 down" in messages) == (cluster is None)

        quotas = await loaded(pilot, "quotas")
        # the daemon's own budgets (a budget per cluster: demo's), or the cluster asked for
        quota_label = f"cluster {cluster or 'demo'}"
        await until(pilot, lambda: f"(chargeback), {quota_label}, " in app.screen_text(), 10,
                    "the quotas header")
        spent = dict(zip(quotas.table.keys, column(quotas.table, "spent"), strict=True))
        held = dict(zip(quotas.table.keys, column(quotas.table, "reserved"), strict=True))
        if cluster is None:
            assert (spent["nlp"], held["vision"]) == ("$10.00", "$100.00")
        else:
            assert (spent["nlp"], spent["vision"], held["vision"]) == ("$2.50", "$4.00",
                                                                       "$40.00")

        # Slurm's queue and nodes are this cluster's, whatever the ledger views show
        nodes = await loaded(pilot, "nodes")
        await until(pilot, lambda: "demo: 6 nodes" in app.screen_text(), 10, "nodes header")
        fails = dict(zip(nodes.table.keys, column(nodes.table, "fail"), strict=True))
        assert fails["gpu001"] == "1"  # demo's failure, not west's two
        await loaded(pilot, "queue")
        await until(pilot, lambda: "| cluster demo |" in app.screen_text(), 10,
                    "the queue header")

    drive(app, scenario, size=SIZE)


def test_the_chargeback_csv_of_one_cluster_is_named_after_it(ledger_target: str,
                                                            tmp_path: Path) -> None:
    sources = two_cluster_sources(ledger_target, "west")
    app = SlurmgateApp(sources, export_dir=str(tmp_path))

    async def scenario(pilot) -> None:  # noqa: ANN001
        await loaded(pilot, "chargeback")
        await pilot.press("e")
        path = tmp_path / "slurmgate-chargeback-2023-11-west.csv"
        await until(pilot, lambda: f"to {path}" in app.status.text, 10, "the export")
        assert "nlp" in path.read_text()

    try:
        drive(app, scenario, size=SIZE)
    finally:
        sources.close()


def test_an_unknown_cluster_is_refused_before_the_tui_starts(
        ledger_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    sources = two_cluster_sources(ledger_target, "east")
    try:
        assert unknown_cluster(sources) == ("cluster 'east' has no runs or reservations in "
                                            "the ledger; clusters: demo, west")
        sources.cluster = "west"
        assert unknown_cluster(sources) is None
        sources.cluster = None
        assert unknown_cluster(sources) is None
    finally:
        sources.close()
    assert run("/nonexistent/policy.toml", demo=True, cluster="east") == 2
    assert "slurmgate tui: --cluster: cluster 'east' has no runs" in capsys.readouterr().err


def test_the_daemons_quota_request_names_the_cluster_with_budgets_per_cluster() -> None:
    sources = DemoSources(fill_store=False, cluster="west")
    try:
        assert sources.quota_request() == {"op": "quota", "cluster": "west"}
        sources.cluster = None
        assert sources.quota_request() == {"op": "quota"}
        sources.cluster = "west"
        sources.policy = sources.policy.model_copy(update={"budgets": sources.policy.budgets
                                                           .model_copy(update={"scope": "global"})})
        assert sources.quota_request() == {"op": "quota"}  # one budget across clusters
        assert sources.quota()["cluster"] is None and sources.quota()["scope"] == "global"
    finally:
        sources.close()
