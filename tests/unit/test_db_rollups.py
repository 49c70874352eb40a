"""db.rollups: the daily rollups kept by the ingest, verified and rebuilt from the runs.

On both ledgers (``ledger_target``: a SQLite file, then a PostgreSQL database)."""

from __future__ import annotations

from pathlib import Path

import pytest

from db import ingest_records, open_store, rollups
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
def policy() -> Policy:
    return make_policy()


def settled_store(path: str | Path, policy: Policy) -> Store:
    """Runs of two teams over two days, one credited (a node failure), one unsettled."""
    store = open_store(path)
    reserve(store, 1, team="nlp", project="chat")
    recs = [make_node_run(1), make_jobcomp(1),
            make_node_run(2, account="vis", start=T0 + 86400, end=T0 + 86400 + HOUR),
            make_jobcomp(2, state="NODE_FAIL", start=T0 + 86400, end=T0 + 86400 + HOUR),
            make_node_run(3, gpu_type="v100")]  # no jobcomp, no price: never in a rollup
    res = ingest_records(store, recs, policy)
    assert res.errors == []
    assert store.confirm_failure_credit("c1", 2, 0)  # the failure handler confirmed it
    return store


def test_kept_rollups_verify_clean(ledger_target: str, policy: Policy) -> None:
    store = settled_store(ledger_target, policy)
    assert rollups.verify(store) == []
    assert rollups.rebuild(store) == []  # nothing to fix, nothing written
    check_rollups(store)


def test_a_run_ending_late_in_the_day_counts_on_that_day(ledger_target: str,
                                                         policy: Policy) -> None:
    """The recomputed day is floor(end_ts / 86400), as the ingest keeps it (a cast alone
    would round to the next day on PostgreSQL)."""
    store = open_store(ledger_target)
    end = T0 + 86400 - 0.25  # 23:59:59.75 UTC
    assert ingest_records(store, [make_node_run(5, start=end - HOUR, end=end),
                                  make_jobcomp(5, start=end - HOUR, end=end)],
                          policy).errors == []
    assert rollups.verify(store) == []
    with store.transaction():
        store.conn.execute("DELETE FROM usage_daily_team")
    assert [d.key for d in rollups.rebuild(store)] == [(int(T0 // 86400), "c1", "vision")]
    assert store._query("SELECT day FROM usage_daily_team") == [{"day": int(T0 // 86400)}]
    check_rollups(store)
    store.close()


def test_verify_finds_a_corrupt_row_and_rebuild_fixes_it(ledger_target: str,
                                                        policy: Policy) -> None:
    store = settled_store(ledger_target, policy)
    day = int(T0 // 86400)
    with store.transaction():
        store.conn.execute("UPDATE usage_daily_team SET cost = cost + 5 WHERE day = :day",
                           {"day": day})
        store.conn.execute("UPDATE usage_daily SET runs = runs + 1 WHERE day = :day",
                           {"day": day + 1})
        store.conn.execute("DELETE FROM usage_daily_project WHERE day = :day",
                           {"day": day + 1})
        store.conn.execute(
            "INSERT INTO usage_daily_team (day, cluster, team, runs, cost) "
            "VALUES (:day, 'c1', 'ghost', 1, 9.0)", {"day": day + 5})
    before = store.spend_by_team(T0 - 86400, T0 + 7 * 86400)
    assert before["nlp"] != pytest.approx(store.run("c1", 1, 0)["cost"])

    diffs = rollups.verify(store)
    found = {(d.table, d.key[0] - day, d.column) for d in diffs}
    assert found == {
        ("usage_daily_team", 0, "cost"),
        ("usage_daily_team", 5, "row"),
        ("usage_daily", 1, "runs"),
        ("usage_daily_project", 1, "row"),
    }
    cost = next(d for d in diffs if d.column == "cost")
    assert cost.key == (day, "c1", "nlp")
    assert cost.have == pytest.approx(cost.want + 5)
    ghost = next(d for d in diffs if d.key[-1] == "ghost")
    assert (ghost.have, ghost.want) == (1, None)
    missing = next(d for d in diffs if d.table == "usage_daily_project")
    assert missing.have is None and missing.want == 1
    assert "2026-09-22 c1/nlp: cost is" in cost.describe()
    assert "no settled runs behind it" in ghost.describe()
    assert "row missing (1 runs)" in missing.describe()

    assert sorted(rollups.rebuild(store)) == sorted(diffs)
    assert rollups.verify(store) == []
    check_rollups(store)
    assert store.spend_by_team(T0 - 86400, T0 + 7 * 86400) == {
        "nlp": pytest.approx(store.run("c1", 1, 0)["cost"]),
        "vision": pytest.approx(0.0)}  # the node failure is credited in full


def test_float_drift_is_not_a_difference(ledger_target: str, policy: Policy) -> None:
    store = settled_store(ledger_target, policy)
    with store.transaction():
        store.conn.execute("UPDATE usage_daily SET cost = cost + 1e-9, "
                           "gpu_seconds = gpu_seconds * (1 + 1e-12)")
    assert rollups.verify(store) == []


def test_verify_reads_through_a_reader(ledger_target: str, policy: Policy) -> None:
    settled_store(ledger_target, policy).close()
    reader = open_store(ledger_target, readonly=True)
    try:
        assert rollups.verify(reader) == []
    finally:
        reader.close()


def test_doctor_rollups(tmp_path: Path, ledger_target: str, policy: Policy) -> None:
    from slurm_plugin.doctor import Doctor, run_doctor

    db = ledger_target
    cfg = tmp_path / "policy.toml"
    cfg.write_text(f'[daemon]\ndatabase = "{db}"\ncluster = "c1"\n'
                   '[rates.gpu_hour]\na100 = 2.0\n')
    settled_store(db, policy).close()

    doc = Doctor(str(cfg), rollups=True)
    doc.check_policy()
    doc.check_rollups()
    assert [(c.name, c.status) for c in doc.checks] == [("policy", "OK"), ("rollups", "OK")]

    with open_store(db) as store, store.transaction():
        store.conn.execute("UPDATE usage_daily_team SET credit = credit + 1")
    doc = Doctor(str(cfg), rollups=True)
    doc.check_policy()
    doc.check_rollups()
    check = doc.checks[-1]
    assert check.status == "FAIL" and "usage_daily_team" in check.detail
    assert "credit is" in check.detail and "rebuild(open_store(" in check.fix

    # the flag adds the check to a controller run; without it the check does not run
    lines: list[str] = []
    run_doctor(str(cfg), print_fn=lines.append, slurm_config=lambda: "", rollups=True)
    assert any(line.split()[:2] == ["FAIL", "rollups"] for line in lines), lines
    lines.clear()
    run_doctor(str(cfg), print_fn=lines.append, slurm_config=lambda: "")
    assert not any(line.split()[1:2] == ["rollups"] for line in lines), lines

    with open_store(db) as store:
        rollups.rebuild(store)
    doc = Doctor(str(cfg), rollups=True)
    doc.check_policy()
    doc.check_rollups()
    assert doc.checks[-1].status == "OK"


def test_cli_has_the_flag() -> None:
    from slurm_plugin.cli import build_parser

    args = build_parser().parse_args(["doctor", "--rollups"])
    assert args.rollups is True
    assert build_parser().parse_args(["doctor"]).rollups is False


def test_team_spend_by_day_reads_the_team_rollup(ledger_target: str, policy: Policy) -> None:
    store = settled_store(ledger_target, policy)
    day = int(T0 // 86400)
    nlp = store.run("c1", 1, 0)["cost"]
    assert nlp > 0
    got = rollups.team_spend_by_day(store, day * 86400.0, (day + 30) * 86400.0)
    assert got == {"nlp": {day: pytest.approx(nlp)},
                   "vision": {day + 1: pytest.approx(0.0)}}  # the node failure: credited
    # every day that overlaps the range, read whole; the days after it are not
    assert rollups.team_spend_by_day(store, day * 86400.0 + 3600, day * 86400.0 + 7200) == {
        "nlp": {day: pytest.approx(nlp)}}
    assert rollups.team_spend_by_day(store, (day + 2) * 86400.0, (day + 9) * 86400.0) == {}
    # the same money as the ledger's read over whole days
    whole = store.spend_by_team(day * 86400.0, (day + 2) * 86400.0)
    assert {t: sum(d.values()) for t, d in got.items()} == pytest.approx(whole)


def test_team_spend_by_day_through_a_reader(ledger_target: str, policy: Policy) -> None:
    settled_store(ledger_target, policy).close()
    reader = open_store(ledger_target, readonly=True)
    try:
        got = rollups.team_spend_by_day(reader, 0.0, T0 + 7 * 86400)
        assert set(got) == {"nlp", "vision"}
    finally:
        reader.close()


def test_rollup_samples_folds_each_hour_once(ledger_target: str, policy: Policy) -> None:
    """Samples late in an hour stay in it (the hour is floor(ts / 3600): a cast alone rounds
    on PostgreSQL), and an hour the cutoff splits is merged: mean weighted by samples, the
    highs kept (the first part's memory, the second part's utilisation)."""
    store = open_store(ledger_target)
    hour = 3600.0 * (int(T0) // 3600)
    samples = []
    for i in range(10):  # 10 samples in the hour's second half, one GPU
        rec = make_sample(ts=hour + 1800 + 179.9 * i, gpus=1)
        rec["gpus"][0].update(util=float(10 * i), mem_used_bytes=2**30 * (9 - i))
        samples.append(rec)
    samples.append(make_sample(ts=hour + 3600, gpus=1))  # the next hour
    assert ingest_records(store, samples, policy).errors == []
    day = 86400
    assert rollups.rollup_samples(store, 1, now=hour + 1800 + 179.9 * 4 + 1 + day) == 5
    assert rollups.rollup_samples(store, 1, now=hour + 3600 + 1 + day) == 6
    assert store.conn.execute("SELECT count(*) FROM gpu_samples").fetchone()[0] == 0
    rows = store._query("SELECT hour_ts, util_mean, util_max, mem_max_bytes, samples "
                        "FROM gpu_samples_hourly ORDER BY hour_ts")
    assert rows == [
        {"hour_ts": hour, "util_mean": pytest.approx(45.0), "util_max": 90.0,
         "mem_max_bytes": 9 * 2**30, "samples": 10},
        {"hour_ts": hour + 3600, "util_mean": 10.0, "util_max": 10.0, "mem_max_bytes": 2**30,
         "samples": 1},
    ]
    store.close()
