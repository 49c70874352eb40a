"""Store operations the daemon calls: reservations, events, approvals, ledger inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from db import ingest_records, open_store, rollup_samples
from db.reports import events
from db.store import Store
from policies.config import Policy
from tests.unit.test_db_ingest import (
    HOUR,
    T0,
    check_rollups,
    make_jobcomp,
    make_node_run,
    make_policy,
    make_sample,
    reserve,
)


@pytest.fixture
def store(ledger_target: str) -> Store:
    """A fresh ledger, once on SQLite and once on PostgreSQL."""
    s = open_store(ledger_target)
    yield s
    s.close()


@pytest.fixture
def policy() -> Policy:
    return make_policy()


def test_reservation_lifecycle(store: Store) -> None:
    rid = reserve(store, None)
    live = store.live_reservations()
    assert [(r["rid"], r["state"], r["tags"], r["charged"]) for r in live] == [
        (rid, "reserved", {"project": "llm"}, 0)]
    assert store.bind_reservation(rid, 42, "c1")
    assert store.reservation(rid)["job_id"] == 42
    assert store.reservation(rid)["state"] == "bound"
    assert store.reprice_reservation(rid, 3, 120.0, now=T0)
    assert (store.reservation(rid)["tasks"], store.reservation(rid)["est_cost"]) == (3, 120.0)
    assert store.finish_reservation(rid, "released", "job gone from the queue")
    assert store.live_reservations() == []
    assert not store.finish_reservation(rid, "settled")  # not live any more
    assert not store.reprice_reservation(rid, 1, 1.0)
    assert not store.bind_reservation(rid, 43, "c1")
    assert not store.bind_reservation("nope", 1, "c1")
    with pytest.raises(ValueError, match="exists|cannot be added"):
        store.add_reservation({"rid": rid, "cluster": "c1"})
    with pytest.raises(ValueError, match="unknown reservation field"):
        store.add_reservation({"cluster": "c1", "colour": "red"})
    with pytest.raises(ValueError, match="finishes as"):
        store.finish_reservation(rid, "bound")


def test_bind_after_the_job_already_finished_resettles(store: Store, policy: Policy) -> None:
    rid = reserve(store, None, team="nlp", project="chat", cpus=0, mem_mb=0)
    # a short job ended before the daemon learnt its id: settled from the policy's map
    ingest_records(store, [make_node_run(77, account="vis"), make_jobcomp(77)], policy)
    assert store.run("c1", 77, 0)["team"] == "vision"
    assert store.bind_reservation(rid, 77, "c1", policy=policy)
    run = store.run("c1", 77, 0)
    assert (run["rid"], run["team"], run["project"]) == (rid, "nlp", "chat")
    assert store.reservation(rid)["state"] == "settled"
    assert store.spend_by_team(T0 - 86400, T0 + 86400) == {"nlp": pytest.approx(run["cost"])}
    check_rollups(store)


def test_events(store: Store) -> None:
    first = store.add_event("reject", team="vision", user="vera", message="over budget",
                            detail={"budget": 100})
    store.add_event("hold", job_id=5, message="too many restarts", ts=T0)
    assert first == 1
    assert [e["kind"] for e in events(store)] == ["hold", "reject"]
    rejected = events(store, kinds=["reject"])
    assert rejected[0]["detail"] == {"budget": 100}
    assert events(store, before_id=2) == rejected
    with pytest.raises(ValueError, match="unknown event field"):
        store.add_event("reject", colour="red")
    assert store.add_events([{"kind": "drain", "node": "node1"},
                             {"kind": "quarantine", "detail": {"file": "x.json"}}]) == 2
    assert len(events(store, limit=3)) == 3


def test_approvals(store: Store) -> None:
    aid = store.add_approval(team="nlp", amount=100.0, expires_at=T0 + 86400,
                             reason="paper deadline", created_by="root", now=T0)
    assert [a["id"] for a in store.approvals(now=T0)] == [aid]
    assert store.use_approval(aid, 60.0, job_id=1, user="nora", now=T0 + 1)
    assert not store.use_approval(aid, 60.0, now=T0 + 2)  # would overdraw
    assert store.use_approval(aid, 40.0, now=T0 + 3)
    assert store.approvals(now=T0 + 4) == []  # used up
    assert store.approvals(active_only=False, now=T0)[0]["used"] == pytest.approx(100.0)

    hours = store.add_approval(team="nlp", gpu_hours=10, expires_at=T0 + 60, now=T0)
    assert not store.use_approval(hours, 1, now=T0 + 61)  # expired
    assert store.revoke_approval(hours, actor="root")
    assert not store.use_approval(hours, 1, now=T0)
    assert not store.use_approval("unknown", 1)
    kinds = [e["kind"] for e in reversed(events(store))]  # oldest first
    assert kinds == ["approval", "approval_use", "approval_use", "approval", "approval"]
    with pytest.raises(ValueError, match="amount or gpu_hours"):
        store.add_approval(team="nlp", expires_at=T0)


def test_spend_by_team_counts_runs_by_end_time(store: Store, policy: Policy) -> None:
    start, end = T0, T0 + 30 * 86400
    before = start - 2 * HOUR
    reserve(store, 1, cpus=0, mem_mb=0, created_at=before)
    reserve(store, 2, team="nlp", cpus=0, mem_mb=0, created_at=before)
    reserve(store, 3, cpus=0, mem_mb=0, created_at=before)
    ingest_records(store, [
        # ends inside the period
        make_jobcomp(1, start=start - HOUR, end=start + HOUR),
        # ends exactly at the period's end: next period
        make_jobcomp(2, start=end - HOUR, end=end),
        # node failure: credited (once the failure handler confirmed it with Slurm)
        make_jobcomp(3, state="NODE_FAIL", start=start + HOUR, end=start + 2 * HOUR),
    ], policy)
    assert store.spend_by_team(start, end) == {"vision": pytest.approx(4 * 3 * 2.0)}
    assert store.confirm_failure_credit("c1", 3, 0) == pytest.approx(4 * 1 * 2.0)
    assert store.spend_by_team(start, end) == {"vision": pytest.approx(4 * 2 * 2.0)}
    assert store.spend_by_team(end, end + 86400) == {"nlp": pytest.approx(4 * 1 * 2.0)}


def test_team_usage_gpu_hours_ignores_credited_time(store: Store, policy: Policy) -> None:
    ingest_records(store, [
        make_node_run(1), make_jobcomp(1),
        make_node_run(2, account="nlp"), make_jobcomp(2, state="NODE_FAIL", account="nlp"),
    ], policy)
    store.confirm_failure_credit("c1", 2, 0)  # the failure handler confirmed it
    usage = store.team_usage_gpu_hours(T0 - 86400, now=T0 + 3 * HOUR)
    assert usage == [("vision", T0 + 3 * HOUR, pytest.approx(8.0))]  # capped at now
    assert store.team_usage_gpu_hours(T0, now=T0 + 2 * 86400) == [
        ("vision", T0 + 43200, pytest.approx(8.0))]  # the day's midpoint
    assert store.team_usage_gpu_hours(T0 + 86400, now=T0 + 2 * 86400) == []


def test_rollup_samples(store: Store, policy: Policy) -> None:
    hour = 3600 * (int(T0) // 3600)
    ingest_records(store, [make_sample(ts=hour + 60 * i) for i in range(10)], policy)
    # the cutoff splits the hour: 5 samples now, 5 later
    assert rollup_samples(store, 1, now=hour + 300 + 86400) == 2 * 5
    assert rollup_samples(store, 1, now=hour + 3000 + 86400) == 2 * 5
    assert store.conn.execute("SELECT count(*) FROM gpu_samples").fetchone()[0] == 0
    rows = store._query("SELECT gpu_uuid, hour_ts, util_mean, util_max, samples "
                        "FROM gpu_samples_hourly ORDER BY gpu_uuid")
    assert rows == [
        {"gpu_uuid": "GPU-node1-0", "hour_ts": hour, "util_mean": 10.0, "util_max": 10.0,
         "samples": 10},
        {"gpu_uuid": "GPU-node1-1", "hour_ts": hour, "util_mean": 20.0, "util_max": 20.0,
         "samples": 10},
    ]


def test_transaction_rolls_back_everything(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.add_event("admin_action", message="one")  # nested: a savepoint
        store.conn.execute("INSERT INTO events (ts, kind) VALUES (:ts, :kind)",
                           {"ts": 0.0, "kind": "admin_action"})
        reserve(store, 5)
        raise RuntimeError("boom")
    assert store.event_count() == 0
    assert store.live_reservations() == []
    assert not store.conn.in_transaction


def test_a_failed_statement_inside_a_transaction_spoils_only_its_savepoint(
        store: Store) -> None:
    """A duplicate reservation inside a larger transaction is refused (ValueError) without
    aborting the rest (PostgreSQL aborts a whole transaction on a failed statement: the store
    runs each write in its own savepoint)."""
    with store.transaction():
        rid = reserve(store, 5)
        with pytest.raises(ValueError, match="cannot be added"):
            store.add_reservation({"rid": rid, "cluster": "c1"})
        store.add_event("admin_action", message="after the refusal")
    assert [r["rid"] for r in store.live_reservations()] == [rid]
    assert store.event_count("admin_action") == 1


def test_credit_run_moves_the_rollup(store: Store, policy: Policy) -> None:
    ingest_records(store, [make_node_run(1), make_jobcomp(1)], policy)
    cost = store.run("c1", 1, 0)["cost"]
    assert store.credit_run("c1", 1, 0, 5.0, "admin: bad node", actor="root")
    assert store.spend_by_team(T0, T0 + 86400) == {"vision": pytest.approx(cost - 5.0)}
    # a later re-settlement keeps the admin's credit
    ingest_records(store, [make_node_run(1, node="node9", gpus=1)], policy)
    assert store.run("c1", 1, 0)["credit"] == 5.0
    check_rollups(store)
    assert not store.credit_run("c1", 99, 0, 1.0, "nothing there")


def test_named_reads(store: Store, policy: Policy) -> None:
    """The reads the daemon, the reconcile command, the doctor and the TUI ask for by name."""
    reserve(store, 7)
    reserve(store, None)
    reserve(store, 8, cluster="c2")
    assert store.bound_job_ids({7, 8, 9}) == {7, 8}
    assert store.bound_job_ids([]) == set()

    aid = store.add_approval(team="nlp", amount=10.0, expires_at=T0 + 60, now=T0)
    assert store.revoke_approval(aid)
    approval = store.approval(aid)
    assert approval is not None and approval["team"] == "nlp" and approval["revoked"] == 1
    assert store.approval("unknown") is None

    ingest_records(store, [make_node_run(1), make_jobcomp(2), make_sample(ts=T0)], policy)
    assert [(r["job_id"], r["restart_count"]) for r in store.unfinished_runs("c1")] == [(1, 0)]
    assert set(store.unfinished_runs("c1")[0]) == {
        "cluster", "job_id", "restart_count", "start_ts", "end_ts"}
    assert store.unfinished_runs("c2") == []
    assert store.recorded_job_ids("c1") == {2}
    assert store.run_count() == 2

    samples = store.gpu_samples(T0, T0)
    assert [(s["node"], s["gpu_index"], s["util"]) for s in samples] == [
        ("node1", 0, 10.0), ("node1", 1, 20.0)]
    assert set(samples[0]) == {"node", "gpu_index", "gpu_type", "ts", "util",
                               "mem_used_bytes"}
    assert store.gpu_samples(T0 + 1, T0 + 2) == []


def test_named_reads_of_the_event_log(store: Store) -> None:
    kinds_before = store.event_kinds()
    assert store.event_count() == len(events(store))
    store.add_event("node_fail", ts=T0, cluster="c1", job_id=5, restart_count=0,
                    node="node1")
    store.add_event("node_fail", ts=T0 + 1, cluster="c1", job_id=5, restart_count=0,
                    node="node1")  # the same run, twice
    store.add_event("node_fail", ts=T0 + 2, cluster="c1", job_id=6, node="node1")
    store.add_event("preempt", ts=T0 + 3, cluster="c1", job_id=7, restart_count=1)
    store.add_event("recovered", ts=T0 + 4, cluster="c1", job_id=7, restart_count=1)
    store.add_event("drain", ts=T0 + 5, cluster="c1", node="node1")
    store.add_event("drain", ts=T0 + 9, cluster="c1", node="node1")
    assert store.event_kinds() == sorted({*kinds_before, "node_fail", "preempt",
                                          "recovered", "drain"})
    assert store.event_count("node_fail") == 3
    assert store.event_count() == len(events(store))

    assert store.has_event("node_fail", "c1", 5, 0)
    assert store.has_event("node_fail", "c1", 6, None)
    assert not store.has_event("node_fail", "c1", 6, 0)
    assert not store.has_event("node_fail", "c2", 5, 0)

    open_ = store.unrecovered_interruptions(T0 - 1)
    assert [(e["job_id"], e["restart_count"], e["kind"]) for e in open_] == [
        (5, 0, "node_fail"), (5, 0, "node_fail"), (6, None, "node_fail")]
    assert set(open_[0]) == {"id", "cluster", "job_id", "restart_count", "kind", "ts"}
    assert store.unrecovered_interruptions(T0 + 2) == []

    assert store.last_drain_ts("c1", "node1") == T0 + 9
    assert store.last_drain_ts("c1", "node2") is None
    assert store.failed_runs_on_node("c1", "node1", T0 - 1) == 2  # runs, not events
    assert store.failed_runs_on_node("c1", "node1", T0) == 2
    assert store.failed_runs_on_node("c1", "node1", T0 + 1) == 1
    assert store.failed_runs_on_node("c2", "node1", T0 - 1) == 0


def test_the_reservation_rules_home_agrees_with_the_ingest() -> None:
    """policies.reservations holds the settle rule; db.ingest keeps its own copy of the
    requeue states until it calls that rule (then this is trivially true)."""
    from db import ingest
    from policies.reservations import REQUEUE_STATES, run_settles_reservation

    assert ingest.REQUEUE_STATES == REQUEUE_STATES
    settled = {"cost": 1.0, "array_job_id": None, "state": "COMPLETED"}
    assert run_settles_reservation(settled)
    assert not run_settles_reservation(dict(settled, cost=None))
    assert not run_settles_reservation(dict(settled, array_job_id=3))
    assert not run_settles_reservation(dict(settled, state="NODE_FAIL"))


# SQLite only: file modes of the database and its WAL
def test_the_database_and_its_wal_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    from db.store import make_private

    old = os.umask(0)
    try:
        path = tmp_path / "sg.db"
        s = open_store(path)
        s.add_event("probe", message="x")  # the WAL and its index exist now
        for name in ("sg.db", "sg.db-wal", "sg.db-shm"):
            f = tmp_path / name
            if f.exists():
                mode = stat.S_IMODE(f.stat().st_mode)
                assert mode & ~0o640 == 0, (name, oct(mode))
        assert (tmp_path / "sg.db").exists()
        s.close()
        # a database left world-readable (started by hand) is made private when opened
        os.chmod(path, 0o666)
        open_store(path).close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        # a stricter mode an admin chose stays
        os.chmod(path, 0o600)
        open_store(path).close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        make_private(":memory:")  # nothing to do
    finally:
        os.umask(old)
    assert os.umask(old) == old  # open_store gives the process its umask back


# -- the store's SQL on its own (no ingest): rows written straight into the tables ----------


def _insert(store: Store, table: str, **row: Any) -> None:
    names = ", ".join(f'"{c}"' for c in row)
    store.conn.execute(
        f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + c for c in row)})", row)


def _settled_run(store: Store, job_id: int, *, team: str | None, end: float, cost: float,
                 credit: float = 0.0, rid: str | None = None, cluster: str = "c1") -> None:
    _insert(store, "runs", cluster=cluster, job_id=job_id, restart_count=0, start_ts=end - HOUR,
            end_ts=end, state="COMPLETED", team=team, rid=rid, gpus=1.0, gpu_seconds=HOUR,
            cost=cost, credit=credit)


def _team_day(store: Store, day: int, team: str, *, runs: int, cost: float, credit: float,
              gpu_seconds: float, credited_gpu_seconds: float = 0.0) -> None:
    _insert(store, "usage_daily_team", day=day, cluster="c1", team=team, runs=runs, cost=cost,
            credit=credit, gpu_seconds=gpu_seconds,
            credited_gpu_seconds=credited_gpu_seconds)


def _ledger(store: Store) -> dict[str, Any]:
    """A small ledger written straight into the tables, and what the store reads of it."""
    day0 = int(T0 // 86400)
    # the partial days at the edges of [T0 + 6 h, T0 + 3 days + 6 h) come from runs ...
    _settled_run(store, 1, team="vision", end=T0 + 7 * HOUR, cost=10.25, credit=0.25)
    _settled_run(store, 2, team=None, end=T0 + 3 * 86400 + HOUR, cost=3.1)  # no team: ""
    _settled_run(store, 3, team="vision", end=T0 + 5 * HOUR, cost=99.0)  # before the period
    _settled_run(store, 4, team="nlp", end=T0 + 3 * 86400 + 6 * HOUR, cost=7.0)  # at its end
    # ... the whole days between from the team rollup
    _team_day(store, day0 + 1, "vision", runs=2, cost=20.5, credit=0.5, gpu_seconds=7200.0,
              credited_gpu_seconds=1800.0)
    _team_day(store, day0 + 2, "nlp", runs=1, cost=0.1, credit=0.1, gpu_seconds=3600.0,
              credited_gpu_seconds=3600.0)
    _team_day(store, day0 + 2, "empty", runs=0, cost=0.0, credit=0.0, gpu_seconds=0.0)
    _team_day(store, day0 + 3, "vision", runs=1, cost=1000.0, credit=0.0, gpu_seconds=1.0)
    rid = reserve(store, 9, est_cost=40.0, created_at=T0 - 2 * 86400)
    _settled_run(store, 9, team="vision", end=T0 - 86400, cost=4.5, credit=1.5, rid=rid)
    reserve(store, None, team="nlp", est_cost=2.5, created_at=T0)
    store.add_approval(team="nlp", amount=10.0, expires_at=T0 + 86400, now=T0,
                       approval_id="a1")
    store.use_approval("a1", 2.5, now=T0 + 1)
    store.add_approval(team="vision", gpu_hours=3, expires_at=T0 + 86400, now=T0 + 2,
                       approval_id="a2")
    return {
        "spend": store.spend_by_team(T0 + 6 * HOUR, T0 + 3 * 86400 + 6 * HOUR),
        "spend_one_day": store.spend_by_team(T0 + HOUR, T0 + 8 * HOUR),
        "usage": store.team_usage_gpu_hours(T0, now=T0 + 10 * 86400),
        "live": [(r["rid"] == rid, r["team"], r["est_cost"], r["charged"], r["tags"])
                 for r in store.live_reservations()],
        "approvals": [(a["id"], a["used"], a["remaining"]) for a in store.approvals(now=T0)],
    }


def test_the_ledger_inputs_read_from_the_tables(store: Store) -> None:
    got = _ledger(store)
    assert got["spend"] == {"vision": 10.0 + 20.0, "": 3.1, "nlp": 0.0}
    assert got["spend_one_day"] == {"vision": 99.0 + 10.0}
    # by day; the nlp day was credited whole (no hours left)
    assert got["usage"] == [("vision", T0 + 86400 + 43200, 1.5),
                            ("vision", T0 + 3 * 86400 + 43200, pytest.approx(1 / 3600))]
    assert got["live"] == [(True, "vision", 40.0, 3.0, {"project": "llm"}),
                           (False, "nlp", 2.5, 0.0, {"project": "llm"})]
    assert got["approvals"] == [("a2", 0.0, 3.0), ("a1", 2.5, 7.5)]


def test_both_servers_read_the_same_amounts(tmp_path: Path, pg_url: str) -> None:
    """Money and timestamps come out identical (same floats, same types) on SQLite and on
    PostgreSQL."""
    results = []
    for target in (str(tmp_path / "ledger.db"), pg_url):
        store = open_store(target)
        results.append(_ledger(store))
        store.close()
    lite, pg = results
    assert pg == lite
    for key in ("spend", "spend_one_day"):
        assert [type(v) for v in pg[key].values()] == [float] * len(pg[key])
    assert [type(v) for r in pg["live"] for v in r[2:4]] == [float] * 2 * len(pg["live"])
    assert [type(v) for r in lite["live"] for v in r[2:4]] == [float] * 2 * len(lite["live"])


def test_record_progress_keeps_the_highest(store: Store) -> None:
    store.record_progress("c1", 5, 0, uid=1001, epoch=3, step=300, now=T0)
    store.record_progress("c1", 5, 0, uid=1001, epoch=2, now=T0 + 1)  # never lowers
    store.record_progress("c1", 5, 0, uid=1001, step=500, now=T0 + 2)
    store.record_progress("c1", 5, 1, uid=None, epoch=4, now=T0 + 3)  # resumed: a base
    rows = store._query("SELECT restart_count, uid, epoch, step, epoch_base, step_base, "
                        "reports, first_ts, last_ts FROM run_progress ORDER BY restart_count")
    assert rows == [
        {"restart_count": 0, "uid": 1001, "epoch": 3, "step": 500, "epoch_base": 0,
         "step_base": 0, "reports": 3, "first_ts": T0, "last_ts": T0 + 2},
        {"restart_count": 1, "uid": None, "epoch": 4, "step": None, "epoch_base": 3,
         "step_base": 500, "reports": 1, "first_ts": T0 + 3, "last_ts": T0 + 3},
    ]
    with pytest.raises(ValueError, match="whole number"):
        store.record_progress("c1", 5, 0, uid=1001, epoch=store.PROGRESS_MAX + 1)


def test_bind_attaches_runs_that_arrived_first(store: Store) -> None:
    """Runs of the job recorded before its reservation was bound (none older than the
    reservation) are attached to it; bound job ids are found by id."""
    rid = reserve(store, None, created_at=T0)
    _settled_run(store, 77, team="vision", end=T0 + HOUR, cost=1.0)
    _insert(store, "runs", cluster="c1", job_id=77, restart_count=1, start_ts=T0 + 2 * HOUR)
    _settled_run(store, 78, team="vision", end=T0 - 2 * HOUR, cost=1.0)  # job id reuse
    _insert(store, "runs", cluster="c1", job_id=78, restart_count=1, submit_ts=T0 - 2 * HOUR,
            start_ts=T0 + HOUR)
    assert store.bind_reservation(rid, 77, "c1", now=T0 + 3 * HOUR)
    assert [r["rid"] for r in store.runs_of_job("c1", 77)] == [rid, rid]
    other = reserve(store, None, created_at=T0 + 1)
    assert store.bind_reservation(other, 78, "c1", now=T0 + 3 * HOUR)
    assert [r["rid"] for r in store.runs_of_job("c1", 78)] == [None, None]
    assert store.reservation(rid)["updated_at"] == T0 + 3 * HOUR
    assert store.bound_job_ids([77, 78, 79]) == {77, 78}
    assert [r["rid"] for r in store.live_reservations()] == [rid, other]
