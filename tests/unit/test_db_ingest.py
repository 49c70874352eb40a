"""Ingest of spool records: matching, idempotency, validation, settlement.

Every test runs on both ledgers (the ``ledger_target`` fixture: a SQLite file, then a
PostgreSQL database): the ingest is one SQL for both."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from db import ingest_records, open_store, rollup_samples
from db.store import Store
from policies.config import Policy

T0 = 1_790_035_200.0  # 2026-09-22 00:00 UTC: a whole number of days (20718)
HOUR = 3600.0


def make_policy(**overrides: Any) -> Policy:
    data: dict[str, Any] = {
        "daemon": {"cluster": "c1"},
        "teams": {
            "vision": {"accounts": ["vis"], "cost_center": "CC-V"},
            "nlp": {"accounts": ["nlp"], "members": ["nora"]},
        },
        "rates": {"gpu_hour": {"a100": 2.0, "h100": 4.0}, "cpu_core_hour": 0.01,
                  "mem_gb_hour": 0.001, "kwh": 0.1},
        "partitions": {"gpu": {"default_gpu_type": "a100"},
                       "scavenger": {"default_gpu_type": "a100", "price_factor": 0.3}},
    }
    data.update(overrides)
    return Policy.model_validate(data)


def make_node_run(job_id: int, *, node: str = "node1", restart: int = 0, start: float = T0,
                  end: float = T0 + 2 * HOUR, gpus: int = 4, gpu_type: str = "a100",
                  util: float | None = 50.0, energy_per_gpu: float | None = 3.6e6,
                  cluster: str = "c1", user: str | None = "vera",
                  account: str | None = "vis") -> dict[str, Any]:
    return {
        "v": 1, "kind": "node_run", "record_id": uuid.uuid4().hex, "cluster": cluster,
        "written_at": end + 1, "job_id": job_id, "restart_count": restart, "node": node,
        "user": user, "account": account, "start_ts": start, "end_ts": end,
        "gpus": [
            {"index": i, "minor": i, "uuid": f"GPU-{node}-{i}", "gpu_type": gpu_type,
             "energy_j": energy_per_gpu, "util_mean": util,
             "util_max": None if util is None else min(100.0, util + 10),
             "mem_max_bytes": 10 * 2**30, "gpu_seconds": end - start}
            for i in range(gpus)
        ],
    }


def make_jobcomp(job_id: int, *, state: str = "COMPLETED", start: float | None = T0,
                 end: float | None = T0 + 2 * HOUR, nodes: str = "node1", node_count: int = 1,
                 partition: str = "gpu", cluster: str = "c1", user: str = "vera",
                 account: str = "vis", array_job_id: int | None = None,
                 array_task_id: int | None = None, restart: int | None = None
                 ) -> dict[str, Any]:
    return {
        "v": 1, "kind": "jobcomp", "record_id": uuid.uuid4().hex, "cluster": cluster,
        "written_at": (end or start or T0) + 0.5, "job_id": job_id, "restart_count": restart,
        "state": state, "submit_ts": (start or T0) - 60, "start_ts": start, "end_ts": end,
        "nodes": nodes, "node_count": node_count, "partition": partition, "uid": 1001,
        "user": user, "account": account, "exit_code": "0:0", "derived_ec": "0:0",
        "time_limit_min": 240, "array_job_id": array_job_id, "array_task_id": array_task_id,
        "work_dir": "/home/vera",
    }


def make_sample(node: str = "node1", ts: float = T0, gpus: int = 2) -> dict[str, Any]:
    return {
        "v": 1, "kind": "gpu_sample", "record_id": uuid.uuid4().hex, "cluster": "c1",
        "written_at": ts, "node": node, "ts": ts,
        "gpus": [{"uuid": f"GPU-{node}-{i}", "index": i, "gpu_type": "a100",
                  "util": 10.0 * (i + 1), "mem_used_bytes": 2**30, "power_w": 250.0}
                 for i in range(gpus)],
    }


def reserve(store: Store, job_id: int | None, *, team: str = "vision", gpus: float = 4,
            gpu_type: str = "a100", cpus: int = 32, mem_mb: int = 256_000,
            project: str = "llm", est_cost: float = 40.0, cluster: str = "c1",
            created_at: float = T0 - 120, rid: str | None = None) -> str:
    return store.add_reservation({
        **({"rid": rid} if rid is not None else {}),
        "cluster": cluster, "job_id": job_id, "team": team, "project": project,
        "cost_center": "CC42", "user": "vera", "account": "vis", "partition": "gpu",
        "tags": {"project": project}, "gpu_type": gpu_type, "gpus": gpus, "cpus": cpus,
        "mem_mb": mem_mb, "time_limit_min": 240, "tasks": 1, "est_cost": est_cost,
        "period": "2026-09", "created_at": created_at,
    }, now=created_at)


def table_names(store: Store) -> list[str]:
    """The ledger's tables, from the server's catalog (each server has its own)."""
    if store.dialect == "postgresql":
        sql = ("SELECT table_name AS name FROM information_schema.tables "
               "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'")
    else:
        sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
    return sorted(r["name"] for r in store._query(sql))


def dump(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (but the migrations' log)."""
    out = {}
    names = table_names(store)
    assert {"runs", "run_nodes", "gpu_samples", "usage_daily", "events"} <= set(names)
    for table in names:
        if table == "schema_migrations":
            continue
        rows = store.conn.execute(f"SELECT * FROM {table}").fetchall()
        out[table] = sorted((tuple(r) for r in rows), key=repr)
    return out


def check_rollups(store: Store) -> None:
    """The incrementally kept daily rollups equal a recomputation from the runs table: in
    Python (a run counts on the UTC day of its end, '' for a missing key, the credited share
    of its GPU time), and on SQLite by the v3/v4 migrations' backfill SQL as well (SQLite's
    own: a PostgreSQL ledger starts at the v10 baseline and never runs it)."""
    from db.schema import ROLLUPS, SCHEMA_V3, SCHEMA_V4, split_statements

    runs = store._query("SELECT * FROM runs WHERE cost IS NOT NULL AND end_ts IS NOT NULL")
    for table, dims, measures in ROLLUPS:
        want: dict[tuple[Any, ...], list[float]] = {}
        for r in runs:
            sums = want.setdefault((int(r["end_ts"] // 86400), *(r[d] or "" for d in dims)),
                                   [0.0] * len(measures))
            for i, m in enumerate(measures):
                if m == "runs":
                    sums[i] += 1
                elif m == "credited_gpu_seconds":
                    if r["cost"] > 0:
                        sums[i] += (r["gpu_seconds"] or 0.0) * min(1.0, r["credit"] / r["cost"])
                else:
                    sums[i] += r[m] or 0.0
        cols = ", ".join(f'"{c}"' for c in ("day", *dims, *measures))
        width = 1 + len(dims)
        have = {tuple(row[:width]): list(row[width:])
                for row in store.conn.execute(f"SELECT {cols} FROM {table}").fetchall()}
        assert sorted(have) == sorted(want), table
        for key, sums in want.items():
            assert have[key] == pytest.approx(sums, abs=1e-6), (table, key)
    if store.dialect != "sqlite":
        return
    v3, v4 = list(split_statements(SCHEMA_V3)), list(split_statements(SCHEMA_V4))
    for table, rebuild in (("usage_daily", v3[-1]), ("usage_daily_team", v4[1]),
                           ("usage_daily_project", v4[3])):
        assert rebuild.startswith(f"INSERT INTO {table}")
        expected = store.conn.execute("SELECT" + rebuild.split("SELECT", 1)[1]).fetchall()
        have_rows = store.conn.execute(f"SELECT * FROM {table}").fetchall()
        assert len(have_rows) == len(expected), table
        for a, b in zip(sorted(have_rows), sorted(expected), strict=True):
            assert a == pytest.approx(b, abs=1e-6), table


@pytest.fixture
def store(ledger_target: str) -> Iterator[Store]:
    s = open_store(ledger_target)
    yield s
    s.close()


@pytest.fixture
def policy() -> Policy:
    return make_policy()


# -- settlement arithmetic -------------------------------------------------------------------


def test_settlement_by_hand(store: Store, policy: Policy) -> None:
    rid = reserve(store, 101)
    res = ingest_records(store, [make_node_run(101), make_jobcomp(101)], policy, now=T0 + 9000)
    assert res.errors == [] and res.counts == {"node_run": 1, "jobcomp": 1}
    run = store.run("c1", 101, 0)
    assert run is not None
    # 4 x a100 for 2 h at 2.0 = 16; 32 cores x 2 h x 0.01 = 0.64;
    # 256000 MB = 250 GB x 2 h x 0.001 = 0.5; 4 GPUs x 3.6e6 J = 4 kWh x 0.1 = 0.4
    assert run["cost_gpu"] == pytest.approx(16.0)
    assert run["cost_cpu"] == pytest.approx(0.64)
    assert run["cost_mem"] == pytest.approx(0.5)
    assert run["cost_energy"] == pytest.approx(0.4)
    assert run["cost"] == pytest.approx(17.54)
    assert run["gpu_seconds"] == pytest.approx(4 * 7200)
    assert run["energy_j"] == pytest.approx(4 * 3.6e6)
    assert run["util_mean"] == pytest.approx(50.0)
    assert run["cost_idle"] == pytest.approx(8.0)  # half of the GPU cost was idle
    assert (run["team"], run["project"], run["cost_center"], run["rid"]) == (
        "vision", "llm", "CC42", rid)
    assert run["state"] == "COMPLETED" and run["credit"] == 0
    assert store.reservation(rid)["state"] == "settled"
    assert res.settled == [("c1", 101, 0)]


def test_partition_price_factor_and_fallback_without_nodes(store: Store, policy: Policy) -> None:
    reserve(store, 102, gpus=2, cpus=0, mem_mb=0)
    ingest_records(store, [make_jobcomp(102, partition="scavenger")], policy)
    run = store.run("c1", 102, 0)
    # no node records: allocated 2 GPUs x 2 h x 2.0 x 0.3 = 2.4
    assert run["gpu_seconds"] == pytest.approx(2 * 7200)
    assert run["cost"] == pytest.approx(2.4)
    assert run["energy_j"] is None and run["cost_idle"] is None


def test_run_without_reservation_takes_team_from_policy(store: Store, policy: Policy) -> None:
    ingest_records(store, [make_node_run(103, account="nlp", gpus=1),
                           make_jobcomp(103, account="nlp")], policy)
    run = store.run("c1", 103, 0)
    assert run["team"] == "nlp" and run["rid"] is None
    assert run["gpus"] == 1 and run["cost_gpu"] == pytest.approx(4.0)


def test_missing_node_records_charge_their_share(store: Store, policy: Policy) -> None:
    reserve(store, 104, gpus=8, cpus=0, mem_mb=0)
    # two nodes allocated, only node1 reported (node2 died): node2 is billed 4 GPUs x elapsed
    ingest_records(store, [make_node_run(104, energy_per_gpu=None),
                           make_jobcomp(104, nodes="node[1-2]", node_count=2)], policy)
    run = store.run("c1", 104, 0)
    assert run["gpu_seconds"] == pytest.approx(8 * 7200)
    assert run["cost_gpu"] == pytest.approx(32.0)


# -- ordering --------------------------------------------------------------------------------


def test_jobcomp_before_node_run(store: Store, policy: Policy) -> None:
    rid = reserve(store, 201)
    first = ingest_records(store, [make_jobcomp(201)], policy)
    run = store.run("c1", 201, 0)
    assert first.settled == [("c1", 201, 0)]
    assert run["gpu_seconds"] == pytest.approx(4 * 7200)  # allocation x elapsed for now
    assert run["energy_j"] is None and run["cost_energy"] == 0
    assert store.reservation(rid)["state"] == "settled"

    # the epilog arrives later, with the measured GPU time (3 of 4 GPUs busy only 1 h)
    late = make_node_run(201)
    for g in late["gpus"][1:]:
        g["gpu_seconds"] = 3600.0
    second = ingest_records(store, [late], policy)
    assert second.runs_touched == [("c1", 201, 0)] and second.settled == [("c1", 201, 0)]
    run = store.run("c1", 201, 0)
    assert run["gpu_seconds"] == pytest.approx(7200 + 3 * 3600)
    assert run["cost_gpu"] == pytest.approx((7200 + 3 * 3600) / 3600 * 2.0)
    assert run["cost_energy"] == pytest.approx(0.4)
    assert len(store.runs_of_job("c1", 201)) == 1
    # the rollup moved with the re-settlement
    day = store._query("SELECT * FROM usage_daily")
    assert len(day) == 1 and day[0]["runs"] == 1
    assert day[0]["cost"] == pytest.approx(run["cost"])
    check_rollups(store)


def test_node_run_then_jobcomp_in_separate_batches(store: Store, policy: Policy) -> None:
    reserve(store, 202)
    ingest_records(store, [make_node_run(202, node="node1"),
                           make_node_run(202, node="node2")], policy)
    run = store.run("c1", 202, 0)
    assert run["state"] is None and run["cost"] is None
    ingest_records(store, [make_jobcomp(202, nodes="node[1-2]", node_count=2)], policy)
    run = store.run("c1", 202, 0)
    assert run["state"] == "COMPLETED"
    assert run["gpu_seconds"] == pytest.approx(8 * 7200)
    assert len(store.run_nodes("c1", 202, 0)) == 2


def test_requeue_after_node_failure(store: Store, policy: Policy) -> None:
    rid = reserve(store, 301)
    t1 = T0 + HOUR  # node1 dies
    t2 = T0 + 2 * HOUR  # requeued run starts
    t3 = t2 + 3 * HOUR
    records = [
        make_node_run(301, node="node2", restart=0, start=T0, end=t1),
        make_jobcomp(301, state="NODE_FAIL", start=T0, end=t1, nodes="node[1-2]",
                     node_count=2),
        make_node_run(301, node="node2", restart=1, start=t2, end=t3),
        make_node_run(301, node="node3", restart=1, start=t2, end=t3),
        make_jobcomp(301, state="COMPLETED", start=t2, end=t3, nodes="node[2-3]",
                     node_count=2),
    ]
    res = ingest_records(store, records[::-1], policy)  # order within a batch is irrelevant
    assert res.errors == []
    r0, r1 = store.runs_of_job("c1", 301)
    assert (r0["restart_count"], r0["state"]) == (0, "NODE_FAIL")
    assert (r1["restart_count"], r1["state"]) == (1, "COMPLETED")
    # credited only once the failure handler confirmed the failure with Slurm
    assert r0["credit"] == 0 and r0["credit_reason"] == "node_failure_pending"
    assert store._query("SELECT kind FROM events") == []
    assert store.confirm_failure_credit("c1", 301, 0) == pytest.approx(r0["cost"])
    assert store.confirm_failure_credit("c1", 301, 0) is None  # once
    r0 = store.run("c1", 301, 0)
    assert r0["credit"] == pytest.approx(r0["cost"]) and r0["credit_reason"] == "node_failure"
    assert r1["credit"] == 0
    assert {r0["rid"], r1["rid"]} == {rid}
    assert store.reservation(rid)["state"] == "settled"
    spend = store.spend_by_team(T0 - 86400, T0 + 86400)
    assert spend == {"vision": pytest.approx(r1["cost"])}
    kinds = [e["kind"] for e in store._query("SELECT kind FROM events")]
    assert kinds == ["credit"]
    check_rollups(store)
    # a late node record re-settles the run: the confirmed credit follows its cost
    ingest_records(store, [make_node_run(301, node="node1", restart=0, start=T0, end=t1)],
                   policy)
    again = store.run("c1", 301, 0)
    assert again["cost"] > r0["cost"] and again["credit"] == pytest.approx(again["cost"])
    check_rollups(store)


def test_node_fail_jobcomp_arriving_after_the_requeued_run_started(store: Store,
                                                                  policy: Policy) -> None:
    rid = reserve(store, 302)
    t1, t2 = T0 + HOUR, T0 + 2 * HOUR
    # the failed run's nodes never reported; the requeued run's epilog is already in
    ingest_records(store, [make_node_run(302, restart=1, start=t2, end=t2 + HOUR)], policy)
    ingest_records(store, [make_jobcomp(302, state="NODE_FAIL", start=T0, end=t1)], policy)
    runs = store.runs_of_job("c1", 302)
    assert [(r["restart_count"], r["state"]) for r in runs] == [(0, "NODE_FAIL"), (1, None)]
    assert store.reservation(rid)["state"] == "bound"  # the job goes on
    ingest_records(store, [make_jobcomp(302, start=t2, end=t2 + HOUR)], policy)
    assert store.run("c1", 302, 1)["state"] == "COMPLETED"
    assert store.reservation(rid)["state"] == "settled"


def test_jobcomps_of_a_requeued_job_before_any_node_record(store: Store, policy: Policy) -> None:
    t1, t2 = T0 + HOUR, T0 + 2 * HOUR
    ingest_records(store, [make_jobcomp(303, state="NODE_FAIL", start=T0, end=t1)], policy)
    ingest_records(store, [make_jobcomp(303, start=t2, end=t2 + HOUR)], policy)
    ingest_records(store, [make_node_run(303, restart=1, start=t2, end=t2 + HOUR),
                           make_node_run(303, restart=0, start=T0, end=t1)], policy)
    runs = store.runs_of_job("c1", 303)
    assert [(r["restart_count"], r["state"]) for r in runs] == [(0, "NODE_FAIL"),
                                                                (1, "COMPLETED")]
    assert [len(store.run_nodes("c1", 303, r)) for r in (0, 1)] == [1, 1]


def test_runs_named_by_slurms_sluid_never_merge(store: Store, policy: Policy) -> None:
    """From Slurm 25.11 each run has a SLUID: records join the run it names, even where the
    restart count and times alone would merge two runs (22.05's prolog says 0 on requeue)."""
    first = dict(make_node_run(41, start=T0, end=T0 + HOUR), sluid="sA")
    second = dict(make_node_run(41, start=T0 + HOUR + 5, end=T0 + 2 * HOUR), sluid="sB")
    done = [dict(make_jobcomp(41, state="NODE_FAIL", start=T0, end=T0 + HOUR), sluid="sA"),
            dict(make_jobcomp(41, start=T0 + HOUR + 5, end=T0 + 2 * HOUR), sluid="sB")]
    ingest_records(store, [second, first], policy)
    ingest_records(store, list(reversed(done)), policy)
    runs = store.runs_of_job("c1", 41)
    assert sorted((r["sluid"], r["state"]) for r in runs) == [("sA", "NODE_FAIL"),
                                                              ("sB", "COMPLETED")]
    by_sluid = {r["sluid"]: r for r in runs}
    assert by_sluid["sA"]["end_ts"] == T0 + HOUR
    assert by_sluid["sB"]["start_ts"] == T0 + HOUR + 5
    assert len({r["restart_count"] for r in runs}) == 2
    # the same records again change nothing
    before = store.runs_of_job("c1", 41)
    ingest_records(store, [first, second, *done], policy)
    assert store.runs_of_job("c1", 41) == before


def test_records_without_a_sluid_still_match_as_before(store: Store, policy: Policy) -> None:
    ingest_records(store, [make_node_run(42), make_jobcomp(42)], policy)
    (run,) = store.runs_of_job("c1", 42)
    assert run["sluid"] is None and run["state"] == "COMPLETED"


def test_wrapped_job_id_gets_its_own_run(store: Store, policy: Policy) -> None:
    ingest_records(store, [make_node_run(401), make_jobcomp(401)], policy)
    later = T0 + 200 * 86400  # the id counter wrapped; a new job got id 401
    ingest_records(store, [make_node_run(401, start=later, end=later + HOUR),
                           make_jobcomp(401, start=later, end=later + HOUR)], policy)
    runs = store.runs_of_job("c1", 401)
    assert [(r["restart_count"], r["start_ts"]) for r in runs] == [(0, T0), (1, later)]
    assert all(r["state"] == "COMPLETED" for r in runs)


def test_job_cancelled_while_pending(store: Store, policy: Policy) -> None:
    rid = reserve(store, 501)
    res = ingest_records(store, [make_jobcomp(501, state="CANCELLED", start=0, end=T0)],
                         policy)
    assert res.errors == []
    run = store.run("c1", 501, 0)
    assert run["state"] == "CANCELLED" and run["cost"] == 0 and run["start_ts"] is None
    assert store.reservation(rid)["state"] == "settled"
    again = ingest_records(store, [make_jobcomp(501, state="CANCELLED", start=0, end=T0)],
                           policy)
    assert again.duplicates == 1 and len(store.runs_of_job("c1", 501)) == 1


def test_array_tasks_settle_against_the_array_reservation(store: Store, policy: Policy) -> None:
    rid = reserve(store, 600, gpus=1, est_cost=100.0)
    records = []
    for task, job_id in enumerate((600, 601, 602)):
        records += [make_node_run(job_id, gpus=1),
                    make_jobcomp(job_id, array_job_id=600, array_task_id=task)]
    ingest_records(store, records, policy)
    runs = [store.run("c1", j, 0) for j in (600, 601, 602)]
    assert {r["rid"] for r in runs} == {rid}
    assert {r["project"] for r in runs} == {"llm"}
    # other tasks may still be pending: the array's reservation stays live
    live = store.live_reservations()
    assert [r["rid"] for r in live] == [rid]
    assert live[0]["charged"] == pytest.approx(sum(r["cost"] for r in runs))


# -- idempotency -----------------------------------------------------------------------------


def test_same_batch_twice_changes_nothing(store: Store, policy: Policy) -> None:
    reserve(store, 701)
    reserve(store, 702, team="nlp", project="chat")
    batch = [
        make_node_run(701), make_jobcomp(701),
        make_node_run(702, node="node2", gpu_type="h100", account="nlp"),
        make_node_run(702, node="node3", gpu_type="h100", account="nlp"),
        make_jobcomp(702, nodes="node[2-3]", node_count=2, account="nlp"),
        make_jobcomp(703, state="NODE_FAIL"),
        make_sample("node1", T0), make_sample("node1", T0 + 30),
    ]
    first = ingest_records(store, batch, policy, now=T0 + 9000)
    assert first.errors == [] and first.duplicates == 0
    before = dump(store)
    totals = store.spend_by_team(T0 - 86400, T0 + 86400)

    second = ingest_records(store, batch, policy, now=T0 + 99999)
    assert second.errors == []
    assert second.duplicates == len(batch)
    assert second.runs_touched == [] and second.settled == []
    assert dump(store) == before
    assert store.spend_by_team(T0 - 86400, T0 + 86400) == totals

    # the same facts re-sent under new record ids are duplicates too
    resent = [dict(r, record_id=uuid.uuid4().hex) for r in batch]
    third = ingest_records(store, resent, policy, now=T0 + 99999)
    assert third.duplicates == len(batch) and dump(store) == before
    check_rollups(store)


def test_both_servers_keep_the_same_ledger(tmp_path: Any, pg_url: str, policy: Policy) -> None:
    """The same records give the same rows on SQLite and PostgreSQL: money, GPU time and
    timestamps the same floats, the same runs, nodes, rollups, samples, events."""
    t1, t2 = T0 + HOUR, T0 + 2 * HOUR
    first = [
        make_node_run(301, node="node2", restart=0, start=T0, end=t1, util=37.3),
        make_jobcomp(301, state="NODE_FAIL", start=T0, end=t1, nodes="node[1-2]",
                     node_count=2),
        make_node_run(301, node="node3", restart=1, start=t2, end=t2 + 3 * HOUR),
        make_jobcomp(301, start=t2, end=t2 + 3 * HOUR, nodes="node3"),
        make_node_run(702, node="node4", gpu_type="h100", account="nlp", energy_per_gpu=None),
        make_jobcomp(702, nodes="node4", account="nlp", partition="scavenger",
                     end=T0 + 86400 - 0.125),
        make_jobcomp(703, state="PREEMPTED", start=T0 + 17.4, end=T0 + 3333.3),
        make_sample("node1", T0 + 0.5), make_sample("node1", T0 + 30.25, gpus=3),
    ]
    late = [make_node_run(702, node="node5", gpu_type="h100", account="nlp", util=None),
            make_node_run(303, start=T0 + 5, end=T0 + 6)]
    dumps = []
    for target in (str(tmp_path / "ledger.db"), pg_url):
        store = open_store(target)
        try:
            reserve(store, 301, rid="r301", est_cost=33.3)
            reserve(store, 702, team="nlp", project="chat", gpus=8, rid="r702")
            assert ingest_records(store, first, policy, now=T0 + 90000).errors == []
            assert ingest_records(store, late, policy, now=T0 + 95000).errors == []
            assert store.confirm_failure_credit("c1", 301, 0, now=T0 + 96000)
            assert rollup_samples(store, 1, now=T0 + 86400 + 20) == 2  # the first sample
            names = [n for n in table_names(store) if n != "schema_migrations"]
            dumps.append({table: sorted((sorted(r.items()) for r in store._query(
                f"SELECT * FROM {table}")), key=repr) for table in names})
            check_rollups(store)
        finally:
            store.close()
    sqlite, pg = dumps
    assert sorted(sqlite) == sorted(pg)
    for table in sqlite:
        assert sqlite[table] == pg[table], table
    assert sqlite["runs"] and sqlite["usage_daily"] and sqlite["events"]
    assert len(sqlite["gpu_samples"]) == 3 and len(sqlite["gpu_samples_hourly"]) == 2


def test_gpu_samples_dedupe(store: Store, policy: Policy) -> None:
    ingest_records(store, [make_sample(ts=T0), make_sample(ts=T0)], policy)
    assert store.conn.execute("SELECT count(*) FROM gpu_samples").fetchone()[0] == 2


# -- bad input -------------------------------------------------------------------------------


def test_invalid_records_are_reported_and_the_rest_ingest(store: Store, policy: Policy) -> None:
    bad_gpu = make_node_run(802)
    bad_gpu["gpus"][1]["gpu_seconds"] = -5
    nan = make_jobcomp(803)
    nan["end_ts"] = math.nan
    dup_uuid = make_node_run(804)
    dup_uuid["gpus"][1]["uuid"] = dup_uuid["gpus"][0]["uuid"]
    backwards = dict(make_node_run(805), end_ts=T0 - 10)
    bad = [
        "not a record",
        {"v": 2, "kind": "jobcomp"},
        {"v": 1, "kind": "mystery", "cluster": "c1"},
        dict(make_jobcomp(801), job_id="801"),
        {k: v for k, v in make_node_run(806).items() if k != "node"},
        dict(make_jobcomp(807), state=""),
        bad_gpu, nan, dup_uuid, backwards,
        dict(make_node_run(808), gpus=[{"index": 0}]),
        dict(make_sample(), ts=True),
        dict(make_node_run(809), v=True),
        dict(make_node_run(810), cluster=""),
        {**make_node_run(811), "gpus": [dict(make_node_run(811)["gpus"][0], util_mean=140.0)]},
    ]
    good = [make_node_run(900), make_jobcomp(900), make_sample()]
    res = ingest_records(store, bad[:6] + good + bad[6:], policy)
    assert [r for r, _ in res.errors] == bad
    reasons = [why for _, why in res.errors]
    assert "JSON object" in reasons[0]
    assert "version" in reasons[1]
    assert "unknown record kind" in reasons[2]
    assert "job_id must be an integer" in reasons[3]
    assert "node is missing" in reasons[4]
    assert "state must not be empty" in reasons[5]
    assert "gpus[1].gpu_seconds must not be negative" in reasons[6]
    assert "end_ts must be a finite number" in reasons[7]
    assert "appears twice" in reasons[8]
    assert "before start_ts" in reasons[9]
    assert "percentage" in reasons[14]
    assert res.counts == {"node_run": 1, "jobcomp": 1, "gpu_sample": 1}
    assert store.run("c1", 900, 0)["state"] == "COMPLETED"
    assert store.conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1


def test_unpriceable_run_is_kept_unsettled_with_a_warning(store: Store, policy: Policy) -> None:
    res = ingest_records(store, [make_node_run(950, gpu_type="v100"), make_jobcomp(950)],
                         policy)
    assert res.errors == []
    assert res.warnings and "v100" in res.warnings[0]
    run = store.run("c1", 950, 0)
    assert run["state"] == "COMPLETED" and run["cost"] is None
    assert run["gpu_seconds"] == pytest.approx(4 * 7200)  # the facts are kept
    assert [e["kind"] for e in store._query("SELECT kind FROM events")] == ["settle_error"]


def test_a_failing_record_does_not_block_the_batch(store: Store, policy: Policy) -> None:
    from policies.cost import run_cost

    def flaky_cost(**kw: Any) -> dict[str, float]:
        if kw["partition"] == "broken":
            raise RuntimeError("rate service exploded")
        return run_cost(**kw)

    res = ingest_records(store, [make_jobcomp(960, partition="broken"), make_jobcomp(961),
                                 make_node_run(962)], policy, cost_fn=flaky_cost)
    assert len(res.errors) == 1 and "rate service exploded" in res.errors[0][1]
    assert res.errors[0][0]["job_id"] == 960
    assert store.run("c1", 960, 0) is None
    assert store.run("c1", 961, 0)["cost"] is not None
    assert store.run("c1", 962, 0) is not None
    assert res.counts == {"jobcomp": 1, "node_run": 1}


def test_a_record_the_database_refuses_does_not_block_the_batch(store: Store,
                                                                policy: Policy) -> None:
    """Numbers validate passes but no 64-bit column holds: the server (PostgreSQL: bigint
    out of range, which aborts the transaction it is in) or the driver (sqlite3) refuses
    them. The batch is retried one record per savepoint: only those records fail."""
    huge_job = make_node_run(2**63)
    huge_mem = make_sample("node7", T0)
    huge_mem["gpus"][0]["mem_used_bytes"] = 2**64
    good = [make_node_run(965), make_jobcomp(965), make_sample("node1", T0)]
    res = ingest_records(store, [huge_job, good[0], huge_mem, good[1], good[2]], policy)
    assert [r for r, _ in res.errors] == [huge_job, huge_mem]
    assert all("internal error while ingesting" in why for _, why in res.errors)
    assert res.counts == {"node_run": 1, "jobcomp": 1, "gpu_sample": 1}
    assert store.run("c1", 965, 0)["cost"] == pytest.approx(17.54 - 0.64 - 0.5)
    assert store.conn.execute("SELECT count(*) FROM gpu_samples").fetchone()[0] == 2
    assert store.conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    check_rollups(store)
    # the same good records again: duplicates, nothing changes
    before = dump(store)
    again = ingest_records(store, good, policy)
    assert again.errors == [] and again.duplicates == len(good) and dump(store) == before


def test_epilog_without_baseline_is_kept_as_an_event_not_quarantined(store: Store) -> None:
    from policies.config import parse_policy

    rec = {"v": 1, "kind": "node_run", "record_id": "abc", "cluster": "c", "written_at": 1.0,
           "job_id": 5, "restart_count": 0, "node": "node1", "user": "alice", "account": None,
           "start_ts": None, "end_ts": 100.0, "gpus": [], "flags": ["no_baseline"]}
    result = ingest_records(store, [rec], parse_policy(""))
    assert result.errors == []
    assert result.counts == {"node_run_incomplete": 1}
    events = store._query("SELECT kind, node, job_id FROM events")
    assert events == [{"kind": "settle_warning", "node": "node1", "job_id": 5}]
    assert store._query("SELECT count(*) AS n FROM run_nodes")[0]["n"] == 0


# -- the one record check (policies.records) ------------------------------------------------


def test_node_runs_without_their_gpu_time_are_kept_as_events(store: Store,
                                                             policy: Policy) -> None:
    """A node_run the spool passes (policies.records.validate) is never an error here: one
    without its start or GPU-seconds is an event, its node charged from the allocation."""
    unreadable = dict(make_node_run(990, node="node1"), start_ts=None,
                      flags=["baseline_unreadable"])
    for gpu in unreadable["gpus"]:
        gpu["gpu_seconds"] = None
    partial = make_node_run(990, node="node2")
    partial["gpus"][1]["gpu_seconds"] = None
    res = ingest_records(store, [unreadable, partial,
                                 make_jobcomp(990, nodes="node[1-3]", node_count=3)], policy)
    assert res.errors == []
    assert res.counts == {"node_run_incomplete": 2, "jobcomp": 1}
    messages = [e["message"] for e in store._query("SELECT message FROM events "
                                                    "WHERE kind = 'settle_warning'")]
    assert messages == [
        "node node1 of job 990 reported no start time; its GPU time is charged from the "
        "allocation",
        "node node2 of job 990 reported GPUs without their GPU-seconds; its GPU time is "
        "charged from the allocation"]
    run = store.run("c1", 990, 0)
    assert run["state"] == "COMPLETED" and run["cost"] is not None
    assert store.run_nodes("c1", 990, 0) == []


def test_a_jobcomp_without_its_nodes_settles(store: Store, policy: Policy) -> None:
    """The spool used to quarantine these (it demanded nodes and node_count)."""
    rec = {k: v for k, v in make_jobcomp(991).items() if k not in ("nodes", "node_count")}
    reserve(store, 991)
    reserve(store, 992)  # its twin, with the nodes named
    res = ingest_records(store, [make_node_run(991), rec, make_node_run(992),
                                 make_jobcomp(992)], policy)
    assert res.errors == [] and res.counts == {"node_run": 2, "jobcomp": 2}
    run = store.run("c1", 991, 0)
    assert (run["nodes"], run["node_count"]) == (None, None)
    assert run["cost"] == store.run("c1", 992, 0)["cost"] == pytest.approx(17.54)
    check_rollups(store)


def test_records_already_in_spools_still_ingest(store: Store, policy: Policy) -> None:
    """Bytes as the hooks wrote them before the record had one home (and reconcile's
    jobcomp, with its extra "source")."""
    import json

    lines = [
        '{"kind":"node_run","cluster":"c1","job_id":992,"restart_count":0,"node":"node1",'
        '"user":"vera","account":"vis","start_ts":1790035200.0,"end_ts":1790042400.0,"gpus":'
        '[{"index":0,"minor":0,"uuid":"GPU-a","gpu_type":"a100","energy_j":3600000.0,'
        '"util_mean":50.0,"util_max":60.0,"mem_max_bytes":1073741824,"gpu_seconds":7200.0}],'
        '"flags":[],"v":1,"record_id":"0123456789abcdef0123456789abcdef",'
        '"written_at":1790042401.0}',
        '{"kind":"jobcomp","cluster":"c1","job_id":992,"restart_count":null,"state":'
        '"COMPLETED","submit_ts":1790035140.0,"start_ts":1790035200.0,"end_ts":1790042400.0,'
        '"nodes":"node1","node_count":1,"partition":"gpu","uid":1001,"user":"vera",'
        '"account":"vis","exit_code":"0:0","derived_ec":"0:0","time_limit_min":240,'
        '"array_job_id":null,"array_task_id":null,"work_dir":"/home/vera","v":1,'
        '"record_id":"fedcba9876543210fedcba9876543210","written_at":1790042400.5}',
        '{"kind":"jobcomp","cluster":"c1","job_id":993,"restart_count":0,"state":"FAILED",'
        '"submit_ts":null,"start_ts":1790035200.0,"end_ts":1790038800.0,"nodes":"",'
        '"node_count":null,"partition":"gpu","uid":null,"user":"vera","account":"vis",'
        '"exit_code":"1:0","derived_ec":"0:0","time_limit_min":null,"array_job_id":null,'
        '"array_task_id":null,"work_dir":null,"source":"reconcile","v":1,'
        '"record_id":"00112233445566778899aabbccddeeff","written_at":1790038801.0}',
    ]
    res = ingest_records(store, [json.loads(line) for line in lines], policy)
    assert res.errors == [] and res.counts == {"node_run": 1, "jobcomp": 2}
    assert store.run("c1", 992, 0)["cost"] == pytest.approx(4.0 + 0.1 * 1.0)
    assert store.run("c1", 993, 0)["state"] == "FAILED"


def test_a_settled_run_cannot_be_settled_again_by_another_writer(store: Store,
                                                                  policy: Policy) -> None:
    reserve(store, 970)
    real = make_jobcomp(970, state="COMPLETED")
    res = ingest_records(store, [make_node_run(970), real], policy, writers=["node:node1", "ctld"])
    assert res.errors == [] and res.counts == {"node_run": 1, "jobcomp": 1}
    [run] = store.runs_of_job("c1", 970)
    assert run["settled_by"] == "ctld" and run["cost"] > 0
    cost = run["cost"]
    # reconcile --repair (or anyone but slurmctld) re-stating the same run's end: refused
    forged = make_jobcomp(970, state="NODE_FAIL", end=T0 + HOUR)
    late = make_jobcomp(970, state="COMPLETED", end=T0 + 3 * HOUR)
    res = ingest_records(store, [forged, late], policy, writers=["repair", "node:gpu01"])
    assert [r for r, _ in res.errors] == [forged, late]
    assert all("was settled by ctld" in why for _, why in res.errors)
    assert res.counts == {}
    [run] = store.runs_of_job("c1", 970)
    assert (run["state"], run["cost"], run["settled_by"]) == ("COMPLETED", cost, "ctld")
    # the same writer again is a duplicate, as before; without writers nothing is checked
    again = ingest_records(store, [dict(real)], policy, writers=["ctld"])
    assert again.errors == [] and again.duplicates == 1
    # a repair for a run nobody settled settles it, as 'repair'
    res = ingest_records(store, [make_jobcomp(971)], policy, writers=["repair"])
    assert res.errors == [] and store.runs_of_job("c1", 971)[0]["settled_by"] == "repair"
    with pytest.raises(ValueError, match="one writer per record"):
        ingest_records(store, [make_jobcomp(972)], policy, writers=[])
