"""Report queries: chargeback grouping, quota inputs, node failures, the event log. Every
test runs on both backends (``ledger_target``: a SQLite file, then a PostgreSQL database)."""

from __future__ import annotations

import pytest

from db import ingest_records, open_store
from db.reports import chargeback, events, node_failures, quota_rows, unsettled_runs, usage_rows
from db.store import Store
from policies.config import Policy
from tests.unit.test_db_ingest import (
    HOUR,
    T0,
    make_jobcomp,
    make_node_run,
    make_policy,
    reserve,
)

DAY = 86400.0


@pytest.fixture
def store(ledger_target: str) -> Store:
    s = open_store(ledger_target)
    yield s
    s.close()


@pytest.fixture
def policy() -> Policy:
    return make_policy(rates={"gpu_hour": {"a100": 2.0, "h100": 4.0}})  # GPU time only


def _month(store: Store, policy: Policy) -> None:
    """vision/llm: a100 run (util 50) + h100 run (util 100); vision/vit: a100 node failure;
    nlp/chat: h100 run; one run in the next month."""
    reserve(store, 1, project="llm")
    reserve(store, 2, project="llm", gpu_type="h100")
    reserve(store, 3, project="vit")
    reserve(store, 4, team="nlp", project="chat", gpu_type="h100")
    reserve(store, 5, project="llm")
    ingest_records(store, [
        make_node_run(1, util=50.0), make_jobcomp(1),
        make_node_run(2, gpus=2, gpu_type="h100", util=100.0, start=T0 + DAY,
                      end=T0 + DAY + HOUR),
        make_jobcomp(2, start=T0 + DAY, end=T0 + DAY + HOUR),
        make_node_run(3, util=None), make_jobcomp(3, state="NODE_FAIL"),
        make_node_run(4, gpus=1, gpu_type="h100", util=0.0, account="nlp",
                      start=T0 + 10 * DAY + 0.5 * DAY, end=T0 + 10.5 * DAY + HOUR),
        make_jobcomp(4, start=T0 + 10.5 * DAY, end=T0 + 10.5 * DAY + HOUR, account="nlp"),
        make_node_run(5, start=T0 + 40 * DAY, end=T0 + 40 * DAY + HOUR),
        make_jobcomp(5, start=T0 + 40 * DAY, end=T0 + 40 * DAY + HOUR),
    ], policy)
    assert store.confirm_failure_credit("c1", 3, 0)  # the failure handler confirmed it


def test_chargeback_by_team_and_project(store: Store, policy: Policy) -> None:
    _month(store, policy)
    rows = chargeback(store, T0, T0 + 30 * DAY)
    assert [(r["team"], r["project"]) for r in rows] == [  # by net cost, dearest first
        ("vision", "llm"), ("nlp", "chat"), ("vision", "vit")]
    llm, chat, vit = rows
    # a100: 4 GPUs x 2 h = 8 GPU-h at 2.0 = 16; h100: 2 x 1 h = 2 GPU-h at 4.0 = 8
    assert llm["runs"] == 2
    assert llm["gpu_hours_by_type"] == {"a100": pytest.approx(8.0), "h100": pytest.approx(2.0)}
    assert llm["gpu_hours"] == pytest.approx(10.0)
    assert llm["cost"] == pytest.approx(24.0) and llm["net"] == pytest.approx(24.0)
    assert llm["idle_cost"] == pytest.approx(8.0)  # the a100 run half idle, the h100 busy
    assert llm["energy_kwh"] == pytest.approx(4 + 2)
    # the node failure is charged and credited: net 0
    assert vit["cost"] == pytest.approx(16.0) and vit["credits"] == pytest.approx(16.0)
    assert vit["net"] == 0 and vit["idle_cost"] == 0  # no utilisation measured
    # an h100 idle for its whole hour
    assert chat["cost"] == pytest.approx(4.0) and chat["idle_cost"] == pytest.approx(4.0)


def test_chargeback_other_groupings(store: Store, policy: Policy) -> None:
    _month(store, policy)
    by_team = chargeback(store, T0, T0 + 30 * DAY, group_by=("team",))
    assert [(r["team"], r["runs"], round(r["net"], 6)) for r in by_team] == [
        ("vision", 3, 24.0), ("nlp", 1, 4.0)]
    by_type = chargeback(store, T0, T0 + 30 * DAY, group_by=("gpu_type",))
    assert {r["gpu_type"]: r["gpu_hours"] for r in by_type} == {
        "a100": pytest.approx(16.0), "h100": pytest.approx(3.0)}
    by_cc = chargeback(store, T0, T0 + 60 * DAY, group_by=("cost_center", "user"))
    assert [(r["cost_center"], r["user"], r["runs"]) for r in by_cc] == [("CC42", "vera", 5)]
    with pytest.raises(ValueError, match="cannot group by"):
        chargeback(store, T0, T0 + DAY, group_by=("colour",))


@pytest.mark.parametrize("start,end", [
    (T0, T0 + 30 * DAY),                       # whole UTC days: the rollup only
    (T0 + 7 * HOUR, T0 + 30 * DAY - 5 * HOUR),  # local midnights: rollup + both edges
    (T0 + 1.5 * HOUR, T0 + 10.5 * DAY + 0.5 * HOUR),  # edges cut runs off
    (T0 + HOUR, T0 + 3 * HOUR),                # inside one day
    (T0 + 20 * HOUR, T0 + DAY + 2 * HOUR),     # across one midnight
    (T0 + 20 * HOUR, T0 + 12 * DAY),           # short start edge, the runs table
    (T0 + 0.5 * HOUR, T0 + 10.5 * DAY + 2 * HOUR),  # long edges: a rollup day minus runs
])
def test_rollup_and_raw_scan_agree(store: Store, policy: Policy, start: float,
                                   end: float) -> None:
    _month(store, policy)
    # each grouping is served by a different rollup table: team, project, per-user detail
    for dims in (("team",), ("team", "project", "gpu_type"), ("user", "account", "team")):
        fast = usage_rows(store, start, end, dims)
        slow = usage_rows(store, start, end, dims, use_rollup=False)
        assert fast == [pytest.approx(r) for r in slow], dims


def test_quota_rows(store: Store, policy: Policy) -> None:
    _month(store, policy)
    live = reserve(store, None, team="nlp", est_cost=50.0)
    store.bind_reservation(live, 9, "c1")
    rows = quota_rows(store, T0, T0 + 30 * DAY)
    assert rows == [
        {"team": "nlp", "spend": pytest.approx(4.0), "credits": 0.0, "net": pytest.approx(4.0),
         "reserved": 50.0, "reservations": 1},
        # the node-failed job may be requeued: its reservation stays live
        {"team": "vision", "spend": pytest.approx(40.0), "credits": pytest.approx(16.0),
         "net": pytest.approx(24.0), "reserved": 40.0, "reservations": 1},
    ]
    # a requeued job: its reservation is reduced by what its first run already cost
    ingest_records(store, [make_jobcomp(9, state="NODE_FAIL", account="nlp")],
                   make_policy(rates={"gpu_hour": {"a100": 2.0}},
                               requeue={"credit_node_failure": False}))
    nlp = quota_rows(store, T0, T0 + 30 * DAY)[0]
    assert nlp["reserved"] == pytest.approx(50.0 - 16.0)
    assert nlp["net"] == pytest.approx(4.0 + 16.0)


def test_node_failures(store: Store) -> None:
    for i, node in enumerate(["node1", "node2", "node1", "node1"]):
        store.add_event("node_fail", ts=T0 + i, node=node, job_id=10 + i % 2,
                        message=f"{node} down #{i}")
    store.add_event("drain", ts=T0 + 10, node="node1")
    store.add_event("node_fail", ts=T0 - DAY, node="node3")  # too old
    rows = node_failures(store, T0)
    assert [(r["node"], r["failures"], r["jobs"], r["drains"]) for r in rows] == [
        ("node1", 3, 2, 1), ("node2", 1, 1, 0)]
    assert rows[0]["last_message"] == "node1 down #3"
    assert rows[0]["first_ts"] == T0 and rows[0]["last_ts"] == T0 + 3


def test_unsettled_runs(store: Store, policy: Policy) -> None:
    ingest_records(store, [make_node_run(1), make_node_run(2), make_jobcomp(2)], policy)
    assert [r["job_id"] for r in unsettled_runs(store, T0 + DAY)] == [1]


def test_usage_rows_are_floats_in_text_order(store: Store, policy: Policy) -> None:
    """Sums are floats on both servers (SQLite's sum of whole numbers is an integer), runs an
    int; rows come in byte order of the group's text, whatever the server's collation."""
    _month(store, policy)
    reserve(store, 6, team="Vision", project="LLM")
    reserve(store, 7, team="_nlp", project="chat")
    ingest_records(store, [make_node_run(6, energy_per_gpu=None), make_jobcomp(6),
                           make_node_run(7, gpus=1), make_jobcomp(7)], policy)
    rows = usage_rows(store, T0, T0 + 30 * DAY, ("team", "project"))
    keys = [(r["team"], r["project"]) for r in rows]
    assert keys == sorted(keys) and ("Vision", "LLM") in keys and ("_nlp", "chat") in keys
    for r in rows:
        assert type(r["runs"]) is int
        assert all(type(r[m]) is float for m in r if m not in ("team", "project", "runs"))
    vision = next(r for r in rows if r["team"] == "Vision")
    assert vision["energy_j"] == 0.0 and vision["runs"] == 1


def test_events_filters_and_pages(store: Store) -> None:
    for i in range(6):
        store.add_event("node_fail" if i % 2 else "drain", ts=T0 + i, node=f"node{i % 3}",
                        job_id=100 + i, team="vision" if i < 4 else "nlp",
                        detail={"n": i} if i else None)
    newest = events(store)
    assert [e["job_id"] for e in newest] == [105, 104, 103, 102, 101, 100]
    assert newest[0]["detail"] == {"n": 5} and newest[-1]["detail"] is None
    assert [e["job_id"] for e in events(store, ["node_fail"])] == [105, 103, 101]
    assert [e["job_id"] for e in events(store, ["node_fail", "drain"], limit=2)] == [105, 104]
    assert [e["job_id"] for e in events(store, since_ts=T0 + 3, team="vision")] == [103]
    assert [e["job_id"] for e in events(store, job_id=102)] == [102]
    page = events(store, limit=2, before_id=newest[1]["id"])
    assert [e["job_id"] for e in page] == [103, 102]
    assert events(store, limit=0) == []
