"""Schema of the accounting store, as numbered migrations.

A migration is ``(version, step)`` where ``step`` is SQL (one or more statements) or a
callable taking the ``sqlite3.Connection``. ``migrate`` applies every pending step in ONE
transaction and records each in ``schema_migrations``: a database is either fully at the new
version or untouched. Never edit a released migration; add the next number instead.

- v1: the base tables.
- v2: ``runs.cost_idle`` (the GPU part of a run's cost that its GPUs spent idle), backfilled
  from ``cost_gpu`` and ``util_mean``; an index for the event log by kind.
- v3: ``usage_daily``, the per-day rollup of settled runs that month-long reports read
  instead of scanning millions of runs (kept up to date by the ingest), backfilled from runs.
- v4: ``usage_daily_team`` and ``usage_daily_project``: the same without users (and without
  projects), for the daemon's ledger and fairshare and for the usual chargeback.
- v5: ``runs.settled_by``.
- v6: ``runs.sluid``, Slurm's own id of the run (25.11 and later).
- v7: the alert send log (``alerts``, ``alert_sends``, ``alert_attempts``) and the alert
  scan's cursor over the events (``alert_cursors``); see db/alert_log.py.
- v8: ``run_progress``, the training progress (epoch, step) a job reported through the
  checkpoint helper, per run: a figure for the efficiency reports, never an amount.
- v9: ``gpu_samples.job_id`` (the job holding the GPU, from the node agent's tag) and an index
  by job and time, for the idle-GPU policy.
- v10: an index of runs by array job and task.
- v11: ``team_versions``, one row per (scope, team) that the daemons deciding against a
  shared ledger lock and count up with every reservation (db/shared_ledger.py).

PostgreSQL (db/backend.py) starts at v10: ``PG_BASELINE`` is the schema v1..v10 leave on
SQLite, in PostgreSQL's types (``DOUBLE PRECISION`` for every REAL: float8, the same IEEE
double SQLite stores; ``BIGINT`` for every INTEGER; identity columns for the rowid ids).
Migrations after v10 are written for both servers: a step is either SQL both accept or a
``{"sqlite": ..., "postgresql": ...}`` pair. tests/unit/test_db_schema.py checks that both
servers end with the same tables, columns and indexes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from db.backend import Connection

Step = str | Callable[[sqlite3.Connection], None] | Mapping[str, str]

SCHEMA_V1 = """
CREATE TABLE reservations (
    rid TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    job_id INTEGER,
    team TEXT,
    project TEXT,
    cost_center TEXT,
    "user" TEXT,
    account TEXT,
    "partition" TEXT,
    tags TEXT NOT NULL DEFAULT '{}',
    gpu_type TEXT,
    gpus REAL NOT NULL DEFAULT 0,
    cpus REAL,
    mem_mb REAL,
    time_limit_min INTEGER,
    tasks INTEGER,
    est_cost REAL NOT NULL DEFAULT 0,
    approval_id TEXT,
    state TEXT NOT NULL DEFAULT 'reserved'
        CHECK (state IN ('reserved', 'bound', 'settled', 'released')),
    period TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    reason TEXT
);
CREATE INDEX reservations_job ON reservations (cluster, job_id);
CREATE INDEX reservations_live ON reservations (team) WHERE state IN ('reserved', 'bound');

CREATE TABLE runs (
    cluster TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    restart_count INTEGER NOT NULL,
    submit_ts REAL,
    start_ts REAL,
    end_ts REAL,
    state TEXT,
    exit_code TEXT,
    derived_ec TEXT,
    "user" TEXT,
    uid INTEGER,
    account TEXT,
    team TEXT,
    project TEXT,
    cost_center TEXT,
    tags TEXT,
    "partition" TEXT,
    nodes TEXT,
    node_count INTEGER,
    gpu_type TEXT,
    gpus REAL,
    cpus REAL,
    mem_mb REAL,
    time_limit_min INTEGER,
    rid TEXT,
    gpu_seconds REAL,
    energy_j REAL,
    util_mean REAL,
    cost REAL,
    cost_gpu REAL,
    cost_cpu REAL,
    cost_mem REAL,
    cost_energy REAL,
    credit REAL NOT NULL DEFAULT 0,
    credit_reason TEXT,
    array_job_id INTEGER,
    array_task_id INTEGER,
    work_dir TEXT,
    settled_at REAL,
    jobcomp_at REAL,
    updated_at REAL,
    PRIMARY KEY (cluster, job_id, restart_count)
);
CREATE INDEX runs_end ON runs (end_ts);
CREATE INDEX runs_team_end ON runs (team, end_ts);
CREATE INDEX runs_rid ON runs (rid) WHERE rid IS NOT NULL;
CREATE INDEX runs_unfinished ON runs (end_ts) WHERE state IS NULL;

CREATE TABLE run_nodes (
    cluster TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    restart_count INTEGER NOT NULL,
    node TEXT NOT NULL,
    start_ts REAL,
    end_ts REAL,
    gpus TEXT NOT NULL DEFAULT '[]',
    gpu_type TEXT,
    gpu_count INTEGER NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0,
    energy_j REAL,
    util_mean REAL,
    util_max REAL,
    mem_max_bytes INTEGER,
    record_id TEXT,
    PRIMARY KEY (cluster, job_id, restart_count, node)
);
CREATE INDEX run_nodes_node ON run_nodes (node, end_ts);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    cluster TEXT,
    job_id INTEGER,
    restart_count INTEGER,
    team TEXT,
    "user" TEXT,
    node TEXT,
    actor TEXT,
    message TEXT,
    detail TEXT
);
CREATE INDEX events_ts ON events (ts);

CREATE TABLE approvals (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    amount REAL,
    gpu_hours REAL,
    used REAL NOT NULL DEFAULT 0,
    expires_at REAL NOT NULL,
    reason TEXT,
    created_by TEXT,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX approvals_team ON approvals (team, expires_at);

CREATE TABLE gpu_samples (
    node TEXT NOT NULL,
    gpu_uuid TEXT NOT NULL,
    ts REAL NOT NULL,
    gpu_index INTEGER,
    gpu_type TEXT,
    util REAL,
    mem_used_bytes INTEGER,
    power_w REAL,
    PRIMARY KEY (node, gpu_uuid, ts)
) WITHOUT ROWID;
CREATE INDEX gpu_samples_ts ON gpu_samples (ts);

CREATE TABLE gpu_samples_hourly (
    node TEXT NOT NULL,
    gpu_uuid TEXT NOT NULL,
    hour_ts REAL NOT NULL,
    gpu_type TEXT,
    util_mean REAL,
    util_max REAL,
    mem_max_bytes INTEGER,
    samples INTEGER NOT NULL,
    PRIMARY KEY (node, gpu_uuid, hour_ts)
) WITHOUT ROWID;
"""

SCHEMA_V2 = """
ALTER TABLE runs ADD COLUMN cost_idle REAL;
UPDATE runs SET cost_idle = cost_gpu * (1.0 - min(max(util_mean, 0.0), 100.0) / 100.0)
    WHERE cost_gpu IS NOT NULL AND util_mean IS NOT NULL;
CREATE INDEX events_kind_ts ON events (kind, ts);
"""

# Dimensions of the daily rollup. Key columns hold '' instead of NULL so that the UNIQUE key
# (and ON CONFLICT upserts) treat "no project" as one value.
ROLLUP_DIMENSIONS = ("cluster", "team", "project", "cost_center", "user", "account",
                     "partition", "gpu_type")
ROLLUP_MEASURES = ("runs", "gpu_seconds", "energy_j", "cost", "cost_gpu", "cost_cpu",
                   "cost_mem", "cost_energy", "cost_idle", "credit")

SCHEMA_V3 = """
CREATE TABLE usage_daily (
    day INTEGER NOT NULL,
    cluster TEXT NOT NULL,
    team TEXT NOT NULL,
    project TEXT NOT NULL,
    cost_center TEXT NOT NULL,
    "user" TEXT NOT NULL,
    account TEXT NOT NULL,
    "partition" TEXT NOT NULL,
    gpu_type TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0,
    energy_j REAL NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    cost_gpu REAL NOT NULL DEFAULT 0,
    cost_cpu REAL NOT NULL DEFAULT 0,
    cost_mem REAL NOT NULL DEFAULT 0,
    cost_energy REAL NOT NULL DEFAULT 0,
    cost_idle REAL NOT NULL DEFAULT 0,
    credit REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, cluster, team, project, cost_center, "user", account, "partition",
                 gpu_type)
) WITHOUT ROWID;
INSERT INTO usage_daily
SELECT CAST(end_ts / 86400 AS INTEGER), cluster, coalesce(team, ''), coalesce(project, ''),
       coalesce(cost_center, ''), coalesce("user", ''), coalesce(account, ''),
       coalesce("partition", ''), coalesce(gpu_type, ''),
       count(*), total(gpu_seconds), total(energy_j), total(cost), total(cost_gpu),
       total(cost_cpu), total(cost_mem), total(cost_energy), total(cost_idle), total(credit)
FROM runs
WHERE cost IS NOT NULL AND end_ts IS NOT NULL
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9;
"""

# v4: two smaller rollups. The daemon rebuilds its ledger (spend per team) and fairshare usage
# after every settled batch, so the team rollup keeps that O(teams x days) however many users
# there are; ``credited_gpu_seconds`` lets fairshare drop credited GPU time run by run. Reports
# by team/project/cost centre/GPU type (the usual chargeback) read the project rollup, which
# does not grow with the number of users.
TEAM_ROLLUP_DIMENSIONS = ("cluster", "team")
TEAM_ROLLUP_MEASURES = (*ROLLUP_MEASURES, "credited_gpu_seconds")
PROJECT_ROLLUP_DIMENSIONS = ("cluster", "team", "project", "cost_center", "partition",
                             "gpu_type")

SCHEMA_V4 = """
CREATE TABLE usage_daily_team (
    day INTEGER NOT NULL,
    cluster TEXT NOT NULL,
    team TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0,
    energy_j REAL NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    cost_gpu REAL NOT NULL DEFAULT 0,
    cost_cpu REAL NOT NULL DEFAULT 0,
    cost_mem REAL NOT NULL DEFAULT 0,
    cost_energy REAL NOT NULL DEFAULT 0,
    cost_idle REAL NOT NULL DEFAULT 0,
    credit REAL NOT NULL DEFAULT 0,
    credited_gpu_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, cluster, team)
) WITHOUT ROWID;
INSERT INTO usage_daily_team
SELECT CAST(end_ts / 86400 AS INTEGER), cluster, coalesce(team, ''),
       count(*), total(gpu_seconds), total(energy_j), total(cost), total(cost_gpu),
       total(cost_cpu), total(cost_mem), total(cost_energy), total(cost_idle), total(credit),
       total(CASE WHEN cost > 0 THEN coalesce(gpu_seconds, 0) * min(1.0, credit / cost)
             ELSE 0 END)
FROM runs
WHERE cost IS NOT NULL AND end_ts IS NOT NULL
GROUP BY 1, 2, 3;
CREATE TABLE usage_daily_project (
    day INTEGER NOT NULL,
    cluster TEXT NOT NULL,
    team TEXT NOT NULL,
    project TEXT NOT NULL,
    cost_center TEXT NOT NULL,
    "partition" TEXT NOT NULL,
    gpu_type TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0,
    energy_j REAL NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    cost_gpu REAL NOT NULL DEFAULT 0,
    cost_cpu REAL NOT NULL DEFAULT 0,
    cost_mem REAL NOT NULL DEFAULT 0,
    cost_energy REAL NOT NULL DEFAULT 0,
    cost_idle REAL NOT NULL DEFAULT 0,
    credit REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, cluster, team, project, cost_center, "partition", gpu_type)
) WITHOUT ROWID;
INSERT INTO usage_daily_project
SELECT day, cluster, team, project, cost_center, "partition", gpu_type,
       sum(runs), total(gpu_seconds), total(energy_j), total(cost), total(cost_gpu),
       total(cost_cpu), total(cost_mem), total(cost_energy), total(cost_idle), total(credit)
FROM usage_daily
GROUP BY 1, 2, 3, 4, 5, 6, 7;
"""

# Every daily rollup of settled runs, smallest first: (table, key dimensions, measures). The
# ingest keeps all of them; a report reads the first whose dimensions cover its grouping.
ROLLUPS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("usage_daily_team", TEAM_ROLLUP_DIMENSIONS, TEAM_ROLLUP_MEASURES),
    ("usage_daily_project", PROJECT_ROLLUP_DIMENSIONS, ROLLUP_MEASURES),
    ("usage_daily", ROLLUP_DIMENSIONS, ROLLUP_MEASURES),
)

# v5: who settled a run ('ctld': slurmctld's jobcomp, 'repair': reconcile --repair,
# 'node:<name>'), known from the spool subdirectory and the record file's owner. A jobcomp from
# another writer may not settle that run again (db.ingest).
SCHEMA_V5 = """
ALTER TABLE runs ADD COLUMN settled_by TEXT;
"""

# v6: Slurm's own id of a run (SLUID, from Slurm 25.11: SLURM_JOB_SLUID in the prolog and
# epilog, SLUID in jobcomp/script). Recorded when Slurm gives one; the key stays
# (cluster, job_id, restart_count) on every version.
SCHEMA_V6 = """
ALTER TABLE runs ADD COLUMN sluid TEXT;
"""

# v7: the alert send log. An alert is decided once (``alerts.dedupe_key`` is unique: a budget
# threshold per cluster, team, period and threshold; an event by its id) in the same
# transaction as its deliveries (``alert_sends``, one per channel, also unique) and, for
# events, the cursor past them: a restart neither resends nor skips. Every delivery attempt is
# a row of ``alert_attempts`` with its error.
SCHEMA_V7 = """
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY,
    dedupe_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    ts REAL NOT NULL,
    cluster TEXT,
    team TEXT,
    "user" TEXT,
    job_id INTEGER,
    node TEXT,
    event_id INTEGER,
    covered_by INTEGER REFERENCES alerts (id),
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX alerts_kind_ts ON alerts (kind, ts);
CREATE TABLE alert_sends (
    id INTEGER PRIMARY KEY,
    alert_id INTEGER NOT NULL REFERENCES alerts (id),
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    dedupe_key TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'sent', 'failed', 'dry_run', 'dropped')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL
);
CREATE INDEX alert_sends_due ON alert_sends (next_attempt_at) WHERE state = 'pending';
CREATE INDEX alert_sends_alert ON alert_sends (alert_id);
CREATE TABLE alert_attempts (
    send_id INTEGER NOT NULL REFERENCES alert_sends (id),
    attempt INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    ok INTEGER,
    error TEXT,
    PRIMARY KEY (send_id, attempt)
);
CREATE TABLE alert_cursors (
    name TEXT PRIMARY KEY,
    event_id INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
"""

# v8: progress a job reports (``slurmgate ckpt save --epoch N --step N``), one row per run,
# written by the daemon after checking that the reporting uid owns the job. ``epoch``/``step``
# are the highest values the run reported; ``*_base`` the highest any earlier run of the job
# reported (where this run resumed from), so the run made ``value - base``. Users write these
# numbers: they feed figures (cost per epoch) and never a price, a credit or a rollup.
SCHEMA_V8 = """
CREATE TABLE run_progress (
    cluster TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    restart_count INTEGER NOT NULL,
    uid INTEGER,
    epoch INTEGER,
    step INTEGER,
    epoch_base INTEGER NOT NULL DEFAULT 0,
    step_base INTEGER NOT NULL DEFAULT 0,
    reports INTEGER NOT NULL DEFAULT 0,
    first_ts REAL NOT NULL,
    last_ts REAL NOT NULL,
    PRIMARY KEY (cluster, job_id, restart_count)
) WITHOUT ROWID;
"""

# v9: which job held a sampled GPU (the agent tags each reading from the node's Prolog
# baselines); the idle-GPU scan reads a running job's samples by job id and time. Samples of
# older agents (and of GPUs no job holds) keep NULL, and stay out of the index.
SCHEMA_V9 = """
ALTER TABLE gpu_samples ADD COLUMN job_id INTEGER;
CREATE INDEX gpu_samples_job_ts ON gpu_samples (job_id, ts) WHERE job_id IS NOT NULL;
"""

# v10: array tasks by (cluster, array job, task): `slurmgate job 123_4` and the job report's
# newest-job lookup read them by that, at a user's request rate.
SCHEMA_V10 = """
CREATE INDEX runs_array ON runs (cluster, array_job_id, array_task_id)
    WHERE array_job_id IS NOT NULL;
"""

SCHEMA_V11: Mapping[str, str] = {
    "sqlite": """
CREATE TABLE team_versions (
    scope TEXT NOT NULL,
    team TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (scope, team)
);
""",
    "postgresql": """
CREATE TABLE team_versions (
    scope TEXT NOT NULL,
    team TEXT NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (scope, team)
);
""",
}

MIGRATIONS: list[tuple[int, Step]] = [
    (1, SCHEMA_V1),
    (2, SCHEMA_V2),
    (3, SCHEMA_V3),
    (4, SCHEMA_V4),
    (5, SCHEMA_V5),
    (6, SCHEMA_V6),
    (7, SCHEMA_V7),
    (8, SCHEMA_V8),
    (9, SCHEMA_V9),
    (10, SCHEMA_V10),
    (11, SCHEMA_V11),
]

LATEST_VERSION = MIGRATIONS[-1][0]

PG_BASELINE_VERSION = 10
"""The version ``PG_BASELINE`` stands for; a new PostgreSQL ledger records v1..v10 as applied."""

PG_BASELINE = """
CREATE TABLE reservations (
    rid TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    job_id BIGINT,
    team TEXT,
    project TEXT,
    cost_center TEXT,
    "user" TEXT,
    account TEXT,
    "partition" TEXT,
    tags TEXT NOT NULL DEFAULT '{}',
    gpu_type TEXT,
    gpus DOUBLE PRECISION NOT NULL DEFAULT 0,
    cpus DOUBLE PRECISION,
    mem_mb DOUBLE PRECISION,
    time_limit_min BIGINT,
    tasks BIGINT,
    est_cost DOUBLE PRECISION NOT NULL DEFAULT 0,
    approval_id TEXT,
    state TEXT NOT NULL DEFAULT 'reserved'
        CHECK (state IN ('reserved', 'bound', 'settled', 'released')),
    period TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    reason TEXT
);
CREATE INDEX reservations_job ON reservations (cluster, job_id);
CREATE INDEX reservations_live ON reservations (team) WHERE state IN ('reserved', 'bound');
CREATE TABLE runs (
    cluster TEXT NOT NULL,
    job_id BIGINT NOT NULL,
    restart_count BIGINT NOT NULL,
    submit_ts DOUBLE PRECISION,
    start_ts DOUBLE PRECISION,
    end_ts DOUBLE PRECISION,
    state TEXT,
    exit_code TEXT,
    derived_ec TEXT,
    "user" TEXT,
    uid BIGINT,
    account TEXT,
    team TEXT,
    project TEXT,
    cost_center TEXT,
    tags TEXT,
    "partition" TEXT,
    nodes TEXT,
    node_count BIGINT,
    gpu_type TEXT,
    gpus DOUBLE PRECISION,
    cpus DOUBLE PRECISION,
    mem_mb DOUBLE PRECISION,
    time_limit_min BIGINT,
    rid TEXT,
    gpu_seconds DOUBLE PRECISION,
    energy_j DOUBLE PRECISION,
    util_mean DOUBLE PRECISION,
    cost DOUBLE PRECISION,
    cost_gpu DOUBLE PRECISION,
    cost_cpu DOUBLE PRECISION,
    cost_mem DOUBLE PRECISION,
    cost_energy DOUBLE PRECISION,
    credit DOUBLE PRECISION NOT NULL DEFAULT 0,
    credit_reason TEXT,
    array_job_id BIGINT,
    array_task_id BIGINT,
    work_dir TEXT,
    settled_at DOUBLE PRECISION,
    jobcomp_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION,
    cost_idle DOUBLE PRECISION,
    settled_by TEXT,
    sluid TEXT,
    PRIMARY KEY (cluster, job_id, restart_count)
);
CREATE INDEX runs_end ON runs (end_ts);
CREATE INDEX runs_team_end ON runs (team, end_ts);
CREATE INDEX runs_rid ON runs (rid) WHERE rid IS NOT NULL;
CREATE INDEX runs_unfinished ON runs (end_ts) WHERE state IS NULL;
CREATE TABLE run_nodes (
    cluster TEXT NOT NULL,
    job_id BIGINT NOT NULL,
    restart_count BIGINT NOT NULL,
    node TEXT NOT NULL,
    start_ts DOUBLE PRECISION,
    end_ts DOUBLE PRECISION,
    gpus TEXT NOT NULL DEFAULT '[]',
    gpu_type TEXT,
    gpu_count BIGINT NOT NULL DEFAULT 0,
    gpu_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    energy_j DOUBLE PRECISION,
    util_mean DOUBLE PRECISION,
    util_max DOUBLE PRECISION,
    mem_max_bytes BIGINT,
    record_id TEXT,
    PRIMARY KEY (cluster, job_id, restart_count, node)
);
CREATE INDEX run_nodes_node ON run_nodes (node, end_ts);
CREATE TABLE events (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    cluster TEXT,
    job_id BIGINT,
    restart_count BIGINT,
    team TEXT,
    "user" TEXT,
    node TEXT,
    actor TEXT,
    message TEXT,
    detail TEXT
);
CREATE INDEX events_ts ON events (ts);
CREATE TABLE approvals (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    amount DOUBLE PRECISION,
    gpu_hours DOUBLE PRECISION,
    used DOUBLE PRECISION NOT NULL DEFAULT 0,
    expires_at DOUBLE PRECISION NOT NULL,
    reason TEXT,
    created_by TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    revoked BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX approvals_team ON approvals (team, expires_at);
CREATE TABLE gpu_samples (
    node TEXT NOT NULL,
    gpu_uuid TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    gpu_index BIGINT,
    gpu_type TEXT,
    util DOUBLE PRECISION,
    mem_used_bytes BIGINT,
    power_w DOUBLE PRECISION,
    job_id BIGINT,
    PRIMARY KEY (node, gpu_uuid, ts)
);
CREATE INDEX gpu_samples_ts ON gpu_samples (ts);
CREATE TABLE gpu_samples_hourly (
    node TEXT NOT NULL,
    gpu_uuid TEXT NOT NULL,
    hour_ts DOUBLE PRECISION NOT NULL,
    gpu_type TEXT,
    util_mean DOUBLE PRECISION,
    util_max DOUBLE PRECISION,
    mem_max_bytes BIGINT,
    samples BIGINT NOT NULL,
    PRIMARY KEY (node, gpu_uuid, hour_ts)
);
CREATE INDEX events_kind_ts ON events (kind, ts);
CREATE TABLE usage_daily (
    day BIGINT NOT NULL,
    cluster TEXT NOT NULL,
    team TEXT NOT NULL,
    project TEXT NOT NULL,
    cost_center TEXT NOT NULL,
    "user" TEXT NOT NULL,
    account TEXT NOT NULL,
    "partition" TEXT NOT NULL,
    gpu_type TEXT NOT NULL,
    runs BIGINT NOT NULL DEFAULT 0,
    gpu_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    energy_j DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_gpu DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_cpu DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_mem DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_energy DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_idle DOUBLE PRECISION NOT NULL DEFAULT 0,
    credit DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, cluster, team, project, cost_center, "user", account, "partition",
                 gpu_type)
);
CREATE TABLE usage_daily_team (
    day BIGINT NOT NULL,
    cluster TEXT NOT NULL,
    team TEXT NOT NULL,
    runs BIGINT NOT NULL DEFAULT 0,
    gpu_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    energy_j DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_gpu DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_cpu DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_mem DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_energy DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_idle DOUBLE PRECISION NOT NULL DEFAULT 0,
    credit DOUBLE PRECISION NOT NULL DEFAULT 0,
    credited_gpu_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, cluster, team)
);
CREATE TABLE usage_daily_project (
    day BIGINT NOT NULL,
    cluster TEXT NOT NULL,
    team TEXT NOT NULL,
    project TEXT NOT NULL,
    cost_center TEXT NOT NULL,
    "partition" TEXT NOT NULL,
    gpu_type TEXT NOT NULL,
    runs BIGINT NOT NULL DEFAULT 0,
    gpu_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    energy_j DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_gpu DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_cpu DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_mem DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_energy DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_idle DOUBLE PRECISION NOT NULL DEFAULT 0,
    credit DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, cluster, team, project, cost_center, "partition", gpu_type)
);
CREATE TABLE alerts (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    dedupe_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    cluster TEXT,
    team TEXT,
    "user" TEXT,
    job_id BIGINT,
    node TEXT,
    event_id BIGINT,
    covered_by BIGINT REFERENCES alerts (id),
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX alerts_kind_ts ON alerts (kind, ts);
CREATE TABLE alert_sends (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    alert_id BIGINT NOT NULL REFERENCES alerts (id),
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    dedupe_key TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'sent', 'failed', 'dry_run', 'dropped')),
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    sent_at DOUBLE PRECISION
);
CREATE INDEX alert_sends_due ON alert_sends (next_attempt_at) WHERE state = 'pending';
CREATE INDEX alert_sends_alert ON alert_sends (alert_id);
CREATE TABLE alert_attempts (
    send_id BIGINT NOT NULL REFERENCES alert_sends (id),
    attempt BIGINT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    ok BIGINT,
    error TEXT,
    PRIMARY KEY (send_id, attempt)
);
CREATE TABLE alert_cursors (
    name TEXT PRIMARY KEY,
    event_id BIGINT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE run_progress (
    cluster TEXT NOT NULL,
    job_id BIGINT NOT NULL,
    restart_count BIGINT NOT NULL,
    uid BIGINT,
    epoch BIGINT,
    step BIGINT,
    epoch_base BIGINT NOT NULL DEFAULT 0,
    step_base BIGINT NOT NULL DEFAULT 0,
    reports BIGINT NOT NULL DEFAULT 0,
    first_ts DOUBLE PRECISION NOT NULL,
    last_ts DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (cluster, job_id, restart_count)
);
CREATE INDEX gpu_samples_job_ts ON gpu_samples (job_id, ts) WHERE job_id IS NOT NULL;
CREATE INDEX runs_array ON runs (cluster, array_job_id, array_task_id)
    WHERE array_job_id IS NOT NULL;
"""


class MigrationError(RuntimeError):
    """The database cannot be brought to this slurmgate's schema; the message says why."""


def split_statements(sql: str) -> Iterator[str]:
    """Complete SQL statements in ``sql`` (sqlite3.complete_statement decides the ends)."""
    buf = ""
    for piece in sql.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \t\r\n;"):
                yield buf.strip()
            buf = ""
    rest = buf.strip(" \t\r\n;")
    if rest:
        raise MigrationError(f"incomplete SQL statement in migration: {rest[:80]!r}")


def current_version(conn: Connection) -> int:
    """Highest applied migration; 0 for an empty database."""
    if conn.dialect == "postgresql":
        exists = conn.scalar("SELECT to_regclass('schema_migrations') IS NOT NULL")
    else:
        exists = conn.scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                             "AND name = 'schema_migrations'")
    if not exists:
        return 0
    return int(conn.scalar("SELECT max(version) FROM schema_migrations") or 0)


def _apply(conn: Connection, step: Step) -> None:
    if isinstance(step, Mapping):
        step = step[conn.dialect]
    if callable(step):
        from db.backend import SQLiteConnection

        if not isinstance(conn, SQLiteConnection):
            raise MigrationError("a callable migration step runs on SQLite only")
        step(conn.raw)
    else:
        for statement in split_statements(step):
            conn.executescript_statement(statement)


MIGRATION_LOCK = 0x51A7_6A7E
"""The PostgreSQL advisory lock two daemons starting at once take around ``migrate``."""


def migrate(conn: Connection, *, target: int | None = None,
            migrations: list[tuple[int, Step]] | None = None) -> list[int]:
    """Apply pending migrations up to ``target`` (default: all) in one transaction.

    Returns the versions applied. The write lock comes first (SQLite's ``BEGIN IMMEDIATE``,
    a PostgreSQL advisory lock), so two daemons opening the same ledger cannot both migrate
    it. A database newer than this code raises MigrationError (an older slurmgate must not
    write a schema it does not know).
    """
    steps = MIGRATIONS if migrations is None else migrations
    target = steps[-1][0] if target is None else target
    if conn.in_transaction:
        raise MigrationError("migrate() must not run inside an open transaction")
    pg = conn.dialect == "postgresql"
    with conn.transaction():
        if pg:
            conn.execute("SELECT pg_advisory_xact_lock(:k)", {"k": MIGRATION_LOCK})
        conn.executescript_statement(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            f"(version {'BIGINT' if pg else 'INTEGER'} PRIMARY KEY, "
            f"applied_at {'DOUBLE PRECISION' if pg else 'REAL'} NOT NULL)"
        )
        have = current_version(conn)
        known = steps[-1][0]
        if have > known:
            raise MigrationError(
                f"database schema is version {have}, newer than this slurmgate knows "
                f"({known}); upgrade slurmgate before running the daemon on it"
            )
        if pg and 0 < have < PG_BASELINE_VERSION:
            # PG_BASELINE records v1..v10 at once: a PostgreSQL ledger in between was not
            # made by slurmgate, and the SQLite steps cannot bring it up
            raise MigrationError(
                f"database schema is version {have}: a PostgreSQL ledger not made by "
                f"slurmgate (they start at version {PG_BASELINE_VERSION}); restore it from a "
                "backup or start a new database")
        if pg and have < PG_BASELINE_VERSION and target < PG_BASELINE_VERSION:
            raise MigrationError(f"a PostgreSQL ledger starts at schema version "
                                 f"{PG_BASELINE_VERSION}, not {target}")
        applied: list[int] = []
        for version, step in steps:
            if not have < version <= target:
                continue
            if pg and version <= PG_BASELINE_VERSION:
                if version == 1:
                    _apply(conn, PG_BASELINE)
            else:
                _apply(conn, step)
            conn.execute("INSERT INTO schema_migrations (version, applied_at) "
                         "VALUES (:v, :ts)", {"v": version, "ts": time.time()})
            applied.append(version)
    return applied
