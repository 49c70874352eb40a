"""Migrations: an empty file, an old database upgrading, read-only stores."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from db import StoreError, open_store
from db.schema import LATEST_VERSION, MIGRATIONS, MigrationError, migrate, split_statements
from tests.unit.test_db_ingest import check_rollups

T0 = 1_790_000_000.0


def test_migrations_from_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "slurmgate.db"
    store = open_store(path)
    versions = [r[0] for r in store.conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [v for v, _ in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    store.close()
    again = open_store(path)  # reopening applies nothing twice
    assert again.conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(
        MIGRATIONS)
    again.close()


def _v1_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    assert migrate(conn, target=1) == [1]
    conn.execute(
        "INSERT INTO reservations (rid, cluster, job_id, team, project, tags, gpus, est_cost, "
        "state, period, created_at, updated_at) VALUES "
        "('r1', 'c1', 7, 'vision', 'llm', '{\"project\": \"llm\"}', 4, 40, 'settled', "
        "'2026-09', ?, ?), ('r2', 'c1', NULL, 'nlp', NULL, '{}', 1, 5, 'reserved', "
        "'2026-09', ?, ?)", (T0, T0, T0, T0))
    runs = [
        # settled, measured utilisation 25 %
        ("c1", 7, 0, T0, T0 + 7200, "COMPLETED", "vision", "llm", "a100", 4, "r1", 28800.0,
         25.0, 17.54, 16.0, 0.64, 0.5, 0.4, 0.0),
        # settled, no utilisation measured, credited
        ("c1", 8, 0, T0, T0 + 3600, "NODE_FAIL", "nlp", None, "h100", 1, None, 3600.0,
         None, 4.0, 4.0, 0.0, 0.0, 0.0, 4.0),
        # not settled yet
        ("c1", 9, 1, T0, T0 + 60, None, None, None, "a100", 1, None, 60.0, 90.0, None,
         None, None, None, None, 0.0),
    ]
    conn.executemany(
        "INSERT INTO runs (cluster, job_id, restart_count, start_ts, end_ts, state, team, "
        "project, gpu_type, gpus, rid, gpu_seconds, util_mean, cost, cost_gpu, cost_cpu, "
        "cost_mem, cost_energy, credit) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", runs)
    conn.execute(
        "INSERT INTO run_nodes (cluster, job_id, restart_count, node, start_ts, end_ts, gpus, "
        "gpu_type, gpu_count, gpu_seconds) VALUES ('c1', 7, 0, 'node1', ?, ?, ?, 'a100', 4, "
        "28800)", (T0, T0 + 7200, json.dumps([{"uuid": "GPU-1"}])))
    conn.execute("INSERT INTO events (ts, kind, node, message) VALUES (?, 'node_fail', "
                 "'node2', 'node2 went down')", (T0,))
    conn.execute("INSERT INTO approvals (id, team, amount, expires_at, created_at) VALUES "
                 "('a1', 'nlp', 100, ?, ?)", (T0 + 86400, T0))
    conn.execute("INSERT INTO gpu_samples (node, gpu_uuid, ts, util) VALUES "
                 "('node1', 'GPU-1', ?, 55)", (T0,))
    conn.execute("INSERT INTO gpu_samples_hourly (node, gpu_uuid, hour_ts, util_mean, samples)"
                 " VALUES ('node1', 'GPU-1', ?, 40, 120)", (T0 - 86400,))
    conn.commit()
    conn.close()


def _rows(conn: sqlite3.Connection, table: str, columns: str = "*") -> list[tuple]:
    return sorted(conn.execute(f"SELECT {columns} FROM {table}").fetchall(), key=repr)


def test_a_v1_database_upgrades_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _v1_database(path)
    raw = sqlite3.connect(path)
    v1_columns = [r[1] for r in raw.execute("PRAGMA table_info(runs)")]
    v1_sample_columns = ", ".join(r[1] for r in raw.execute("PRAGMA table_info(gpu_samples)"))
    before = {t: _rows(raw, t) for t in ("reservations", "run_nodes", "events", "approvals",
                                         "gpu_samples_hourly")}
    before_samples = _rows(raw, "gpu_samples", v1_sample_columns)
    before_runs = _rows(raw, "runs", ", ".join(f'"{c}"' for c in v1_columns))
    raw.close()

    store = open_store(path)
    assert store.schema_version == LATEST_VERSION
    conn = store.conn
    for table, rows in before.items():
        assert _rows(conn, table) == rows, table
    assert _rows(conn, "runs", ", ".join(f'"{c}"' for c in v1_columns)) == before_runs
    # v6: samples keep every value; the job holding the GPU is unknown for old ones
    assert _rows(conn, "gpu_samples", v1_sample_columns) == before_samples
    assert _rows(conn, "gpu_samples", "job_id") == [(None,)]

    # v2: idle cost backfilled where a utilisation was measured
    idle = dict(((r[0], r[1]), r[2]) for r in conn.execute(
        "SELECT job_id, restart_count, cost_idle FROM runs"))
    assert idle == {(7, 0): pytest.approx(12.0), (8, 0): None, (9, 1): None}
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(events)")}
    assert "events_kind_ts" in indexes

    # v3: the daily rollup holds exactly the settled runs
    rollup = store._query("SELECT team, project, gpu_type, runs, cost, credit, cost_idle "
                         "FROM usage_daily ORDER BY team")
    assert rollup == [
        {"team": "nlp", "project": "", "gpu_type": "h100", "runs": 1, "cost": 4.0,
         "credit": 4.0, "cost_idle": 0.0},
        {"team": "vision", "project": "llm", "gpu_type": "a100", "runs": 1, "cost": 17.54,
         "credit": 0.0, "cost_idle": pytest.approx(12.0)},
    ]
    # v4: the team rollup, with the credited GPU time of the node failure
    team = store._query("SELECT team, runs, cost, credit, gpu_seconds, credited_gpu_seconds "
                       "FROM usage_daily_team ORDER BY team")
    assert team == [
        {"team": "nlp", "runs": 1, "cost": 4.0, "credit": 4.0, "gpu_seconds": 3600.0,
         "credited_gpu_seconds": 3600.0},
        {"team": "vision", "runs": 1, "cost": 17.54, "credit": 0.0, "gpu_seconds": 28800.0,
         "credited_gpu_seconds": 0.0},
    ]
    assert store.spend_by_team(T0 - 86400, T0 + 86400) == {"vision": pytest.approx(17.54),
                                                           "nlp": 0.0}
    assert [(t, h) for t, _, h in store.team_usage_gpu_hours(T0 - 86400)] == [("vision", 8.0)]
    check_rollups(store)
    store.close()


def test_a_failing_migration_leaves_the_database_untouched(tmp_path: Path) -> None:
    path = tmp_path / "half.db"
    _v1_database(path)
    conn = sqlite3.connect(path)
    broken = [*MIGRATIONS[:2], (3, "CREATE TABLE usage_daily (x); SELECT nonsense FROM nowhere;")]
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, migrations=broken)
    assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == 1
    columns = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    assert "cost_idle" not in columns  # v2 was rolled back with v3
    conn.close()


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    open_store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (LATEST_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(MigrationError, match="newer than this slurmgate"):
        open_store(path)


def test_readonly_store_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    writer = open_store(path)
    writer.add_event("admin_action", message="hello")
    reader = open_store(path, readonly=True)
    assert reader._query("SELECT message FROM events") == [{"message": "hello"}]
    with pytest.raises(StoreError, match="read-only"):
        reader.add_event("admin_action", message="nope")
    with pytest.raises(sqlite3.OperationalError):
        reader.conn.execute("INSERT INTO events (ts, kind) VALUES (0, 'x')")
    with pytest.raises(sqlite3.OperationalError):
        reader.db["events"].insert({"ts": 0, "kind": "x"})
    # the reader sees the writer's later commits (WAL)
    writer.add_event("admin_action", message="again")
    assert len(reader._query("SELECT * FROM events")) == 2
    reader.close()
    writer.close()


def test_readonly_never_migrates(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no database here"):
        open_store(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    old = tmp_path / "old.db"
    _v1_database(old)
    with pytest.raises(StoreError, match="start the daemon"):
        open_store(old, readonly=True)
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == 1
    conn.close()


def test_split_statements_keeps_semicolons_inside_strings() -> None:
    sql = "CREATE TABLE t (a TEXT DEFAULT ';');\nINSERT INTO t VALUES ('x;y');\n"
    assert list(split_statements(sql)) == ["CREATE TABLE t (a TEXT DEFAULT ';');",
                                           "INSERT INTO t VALUES ('x;y');"]
    with pytest.raises(MigrationError):
        list(split_statements("INSERT INTO t VALUES ('x;"))
