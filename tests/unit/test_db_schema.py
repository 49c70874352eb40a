"""Migrations: an empty ledger (a SQLite file, a PostgreSQL database), an old SQLite database
upgrading, the same schema on both servers, read-only stores.

Tests that take ``ledger_target`` run on both servers; those about SQLite files (WAL and its
pragmas, the SQLite migrations v1..v9 with their backfills, ``mode=ro``) stay on SQLite, and
say so."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from db import StoreError, open_store
from db.backend import Connection, SQLiteConnection, connect_postgresql
from db.schema import (
    LATEST_VERSION,
    MIGRATIONS,
    PG_BASELINE_VERSION,
    MigrationError,
    current_version,
    migrate,
    split_statements,
)
from db.store import DatabaseError
from tests.unit.test_db_ingest import check_rollups

T0 = 1_790_000_000.0


def test_migrations_of_an_empty_ledger(ledger_target: str) -> None:
    store = open_store(ledger_target)
    assert store.schema_version == LATEST_VERSION
    versions = [r["version"] for r in store.conn.query(
        "SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [v for v, _ in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
    store.close()
    again = open_store(ledger_target)  # reopening applies nothing twice
    assert again.conn.scalar("SELECT count(*) FROM schema_migrations") == len(MIGRATIONS)
    assert migrate(again.conn) == []
    again.close()


# SQLite only: the file's journal and locking pragmas
def test_a_new_sqlite_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "slurmgate.db"
    store = open_store(path)
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    store.close()
    again = open_store(path)  # reopening applies nothing twice
    assert again.conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(
        MIGRATIONS)
    again.close()


def _sqlite(path: Path) -> SQLiteConnection:
    return SQLiteConnection(sqlite3.connect(path), str(path))


def _v1_database(path: Path) -> None:
    """A SQLite ledger at schema v1 with a row in every table (SQLite only: PostgreSQL
    ledgers start at v10)."""
    conn = _sqlite(path)
    assert migrate(conn, target=1) == [1]
    conn.execute(
        "INSERT INTO reservations (rid, cluster, job_id, team, project, tags, gpus, est_cost, "
        "state, period, created_at, updated_at) VALUES "
        "('r1', 'c1', 7, 'vision', 'llm', '{\"project\": \"llm\"}', 4, 40, 'settled', "
        "'2026-09', :t0, :t0), ('r2', 'c1', NULL, 'nlp', NULL, '{}', 1, 5, 'reserved', "
        "'2026-09', :t0, :t0)", {"t0": T0})
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
    columns = ("cluster", "job_id", "restart_count", "start_ts", "end_ts", "state", "team",
               "project", "gpu_type", "gpus", "rid", "gpu_seconds", "util_mean", "cost",
               "cost_gpu", "cost_cpu", "cost_mem", "cost_energy", "credit")
    conn.executemany(
        f"INSERT INTO runs ({', '.join(columns)}) "
        f"VALUES ({', '.join(':' + c for c in columns)})",
        [dict(zip(columns, run, strict=True)) for run in runs])
    conn.execute(
        "INSERT INTO run_nodes (cluster, job_id, restart_count, node, start_ts, end_ts, gpus, "
        "gpu_type, gpu_count, gpu_seconds) VALUES ('c1', 7, 0, 'node1', :start, :end, :gpus, "
        "'a100', 4, 28800)",
        {"start": T0, "end": T0 + 7200, "gpus": json.dumps([{"uuid": "GPU-1"}])})
    conn.execute("INSERT INTO events (ts, kind, node, message) VALUES (:ts, 'node_fail', "
                 "'node2', 'node2 went down')", {"ts": T0})
    conn.execute("INSERT INTO approvals (id, team, amount, expires_at, created_at) VALUES "
                 "('a1', 'nlp', 100, :expires, :created)",
                 {"expires": T0 + 86400, "created": T0})
    conn.execute("INSERT INTO gpu_samples (node, gpu_uuid, ts, util) VALUES "
                 "('node1', 'GPU-1', :ts, 55)", {"ts": T0})
    conn.execute("INSERT INTO gpu_samples_hourly (node, gpu_uuid, hour_ts, util_mean, samples)"
                 " VALUES ('node1', 'GPU-1', :ts, 40, 120)", {"ts": T0 - 86400})
    conn.close()


def _rows(conn: Connection | sqlite3.Connection, table: str,
          columns: str = "*") -> list[tuple]:
    return sorted(conn.execute(f"SELECT {columns} FROM {table}").fetchall(), key=repr)


# SQLite only: the SQLite migrations v2..v10 and their backfills
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


# SQLite only: the SQLite migrations v1..v3
def test_a_failing_migration_leaves_the_database_untouched(tmp_path: Path) -> None:
    path = tmp_path / "half.db"
    _v1_database(path)
    conn = _sqlite(path)
    broken = [*MIGRATIONS[:2], (3, "CREATE TABLE usage_daily (x); SELECT nonsense FROM nowhere;")]
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, migrations=broken)
    assert conn.scalar("SELECT max(version) FROM schema_migrations") == 1
    columns = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    assert "cost_idle" not in columns  # v2 was rolled back with v3
    conn.close()


def test_a_failing_migration_after_the_latest_leaves_the_ledger_untouched(
        ledger_target: str) -> None:
    """A migration written for both servers that fails half-way rolls back whole on either
    (PostgreSQL's DDL is transactional too)."""
    store = open_store(ledger_target)
    broken = [*MIGRATIONS,
              (LATEST_VERSION + 1, "CREATE TABLE half_done (x TEXT);"),
              (LATEST_VERSION + 2, "SELECT nonsense FROM nowhere;")]
    with pytest.raises(DatabaseError):
        migrate(store.conn, migrations=broken)
    assert not store.conn.in_transaction
    assert store.schema_version == LATEST_VERSION
    assert "half_done" not in _catalog(store.conn)["tables"]
    store.close()


def test_a_newer_database_is_refused(ledger_target: str) -> None:
    store = open_store(ledger_target)
    store.conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (:v, 0)",
                       {"v": LATEST_VERSION + 1})
    store.close()
    with pytest.raises(MigrationError, match="newer than this slurmgate"):
        open_store(ledger_target)


def test_readonly_store_cannot_write(ledger_target: str) -> None:
    writer = open_store(ledger_target)
    writer.add_event("admin_action", message="hello")
    reader = open_store(ledger_target, readonly=True)
    assert reader.readonly
    assert reader._query("SELECT message FROM events") == [{"message": "hello"}]
    with pytest.raises(StoreError, match="read-only"):
        reader.add_event("admin_action", message="nope")
    with pytest.raises(StoreError, match="read-only"):
        reader.transaction().__enter__()
    with pytest.raises(DatabaseError):
        reader.conn.execute("INSERT INTO events (ts, kind) VALUES (0, 'x')")
    with pytest.raises(DatabaseError):
        reader.conn.execute("DELETE FROM events")
    with pytest.raises(DatabaseError):
        reader.conn.execute("CREATE TABLE scratch (x TEXT)")
    # not inside a transaction of its own either
    with pytest.raises(DatabaseError), reader.conn.transaction():
        reader.conn.execute("UPDATE events SET message = 'changed'")
    if reader.dialect == "postgresql":
        # every transaction of the reader's session is read-only on the server
        assert reader.conn.scalar("SHOW default_transaction_read_only") == "on"
        assert reader.conn.scalar("SHOW transaction_read_only") == "on"
    assert not reader.conn.in_transaction
    # the reader sees the writer's later commits (SQLite: the WAL)
    writer.add_event("admin_action", message="again")
    assert [r["message"] for r in reader._query("SELECT message FROM events ORDER BY id")] \
        == ["hello", "again"]
    reader.close()
    writer.close()


def test_a_reader_refuses_an_older_schema(ledger_target: str) -> None:
    """A ledger whose schema is older than this code (an upgrade the daemon has not applied
    yet) is refused by a reader, which leaves it as it is."""
    assert LATEST_VERSION == 11, "make the ledger one version older by that version's undo"
    writer = open_store(ledger_target)
    with writer.transaction():  # undo v11
        writer.conn.execute("DROP TABLE team_versions")
        writer.conn.execute("DELETE FROM schema_migrations WHERE version = :v",
                            {"v": LATEST_VERSION})
    writer.close()
    with pytest.raises(StoreError, match=f"version {LATEST_VERSION - 1}.*start the daemon"):
        open_store(ledger_target, readonly=True)
    store = open_store(ledger_target)
    assert store.schema_version == LATEST_VERSION  # the daemon brings the ledger up to date
    store.close()
    open_store(ledger_target, readonly=True).close()


def test_a_reader_refuses_an_empty_postgresql_database(pg_url: str) -> None:
    with pytest.raises(StoreError, match="version 0.*start the daemon"):
        open_store(pg_url, readonly=True)
    writer = open_store(pg_url)  # the reader created nothing
    assert writer.schema_version == LATEST_VERSION
    assert writer.conn.scalar("SELECT count(*) FROM schema_migrations") == LATEST_VERSION
    writer.close()


def test_a_postgresql_ledger_starts_at_the_baseline(pg_url: str) -> None:
    conn = connect_postgresql(pg_url, readonly=False)
    with pytest.raises(MigrationError, match="starts at schema version"):
        migrate(conn, target=PG_BASELINE_VERSION - 1)
    assert current_version(conn) == 0
    assert migrate(conn) == list(range(1, LATEST_VERSION + 1))  # the baseline: v1..v10
    conn.close()


# SQLite only: a missing file, the SQLite v1 schema
def test_readonly_never_migrates(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no database here"):
        open_store(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    old = tmp_path / "old.db"
    _v1_database(old)
    with pytest.raises(StoreError, match="start the daemon"):
        open_store(old, readonly=True)
    conn = _sqlite(old)
    assert conn.scalar("SELECT max(version) FROM schema_migrations") == 1
    conn.close()


def test_split_statements_keeps_semicolons_inside_strings() -> None:
    sql = "CREATE TABLE t (a TEXT DEFAULT ';');\nINSERT INTO t VALUES ('x;y');\n"
    assert list(split_statements(sql)) == ["CREATE TABLE t (a TEXT DEFAULT ';');",
                                           "INSERT INTO t VALUES ('x;y');"]
    with pytest.raises(MigrationError):
        list(split_statements("INSERT INTO t VALUES ('x;"))


# -- the same schema on both servers ---------------------------------------------------------

_TYPES = {"INTEGER": "bigint", "REAL": "double precision", "TEXT": "text"}
"""SQLite's declared type -> PostgreSQL's (information_schema.columns.data_type)."""


def _catalog(conn: Connection) -> dict[str, Any]:
    """Tables, their columns ({name: (type, not null)}, PostgreSQL's type names), primary
    keys, UNIQUE columns and the indexes created by name ({name: (table, columns,
    partial)}), from the server's own catalog."""
    tables: dict[str, dict[str, tuple[str, bool]]] = {}
    keys: dict[str, list[str]] = {}
    unique: list[tuple[str, list[str]]] = []
    indexes: dict[str, tuple[str, list[str], bool]] = {}
    if conn.dialect == "sqlite":
        for t in conn.query("SELECT name FROM sqlite_master WHERE type = 'table' "
                            "AND name NOT LIKE 'sqlite_%'"):
            name = t["name"]
            info = conn.query(f"PRAGMA table_info({name})")
            # SQLite lets a non-INTEGER primary key hold NULL unless it says NOT NULL;
            # PostgreSQL's never does: the key's columns are compared as keys
            tables[name] = {c["name"]: (_TYPES[c["type"]], bool(c["notnull"] or c["pk"]))
                            for c in info}
            keys[name] = [c["name"] for c in sorted(info, key=lambda c: c["pk"]) if c["pk"]]
            for i in conn.query(f"PRAGMA index_list({name})"):
                cols = [c["name"] for c in sorted(conn.query(f"PRAGMA index_info({i['name']})"),
                                                  key=lambda c: c["seqno"])]
                if i["origin"] == "c":  # CREATE INDEX (not a key's or a UNIQUE's own)
                    indexes[i["name"]] = (name, cols, bool(i["partial"]))
                elif i["origin"] == "u":
                    unique.append((name, cols))
        return {"tables": tables, "keys": keys, "unique": sorted(unique), "indexes": indexes}
    for c in conn.query(
            "SELECT table_name, column_name, data_type, is_nullable FROM "
            "information_schema.columns WHERE table_schema = current_schema()"):
        tables.setdefault(c["table_name"], {})[c["column_name"]] = (
            c["data_type"], c["is_nullable"] == "NO")
    for k in conn.query(
            "SELECT k.table_name, k.column_name FROM information_schema.table_constraints t "
            "JOIN information_schema.key_column_usage k "
            "ON k.constraint_schema = t.constraint_schema "
            "AND k.constraint_name = t.constraint_name "
            "WHERE t.table_schema = current_schema() AND t.constraint_type = 'PRIMARY KEY' "
            "ORDER BY k.table_name, k.ordinal_position"):
        keys.setdefault(k["table_name"], []).append(k["column_name"])
    constraints = {r["conname"]: r["contype"] for r in conn.query(
        "SELECT conname, contype FROM pg_constraint WHERE contype IN ('p', 'u') "
        "AND connamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())")}
    for i in conn.query(
            "SELECT indexname, tablename FROM pg_indexes WHERE schemaname = current_schema()"):
        name, table = i["indexname"], i["tablename"]
        cols = [r["attname"] for r in conn.query(
            "SELECT a.attname FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN unnest(x.indkey) WITH ORDINALITY AS k (attnum, ord) ON TRUE "
            "JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum "
            "WHERE i.relname = :name AND i.relnamespace = "
            "(SELECT oid FROM pg_namespace WHERE nspname = current_schema()) ORDER BY k.ord",
            {"name": name})]
        partial = conn.scalar(
            "SELECT x.indpred IS NOT NULL FROM pg_index x JOIN pg_class i "
            "ON i.oid = x.indexrelid WHERE i.relname = :name", {"name": name})
        if name not in constraints:  # CREATE INDEX (not a key's or a UNIQUE's own)
            indexes[name] = (table, cols, bool(partial))
        elif constraints[name] == "u":
            unique.append((table, cols))
    return {"tables": tables, "keys": keys, "unique": sorted(unique), "indexes": indexes}


def test_both_servers_hold_the_same_schema(tmp_path: Path, pg_url: str) -> None:
    """A fresh ledger on SQLite (migrations v1..v10) and on PostgreSQL (PG_BASELINE, then
    the same later migrations) has the same tables, columns (types: REAL ~ DOUBLE
    PRECISION, INTEGER ~ BIGINT, TEXT ~ TEXT), NOT NULLs, primary keys and indexes."""
    lite, pg = open_store(tmp_path / "ledger.db"), open_store(pg_url)
    want, have = _catalog(lite.conn), _catalog(pg.conn)
    lite.close()
    pg.close()
    assert sorted(have["tables"]) == sorted(want["tables"])
    assert "reservations" in want["tables"] and "schema_migrations" in want["tables"]
    for table, columns in want["tables"].items():
        assert have["tables"][table] == columns, table
    assert have["keys"] == want["keys"]
    assert have["unique"] == want["unique"] == [("alert_sends", ["dedupe_key"]),
                                                ("alerts", ["dedupe_key"])]
    assert have["indexes"] == want["indexes"]
    assert "runs_array" in want["indexes"]
