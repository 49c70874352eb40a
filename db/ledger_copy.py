"""Moving a site's ledger: a SQLite file copied into a PostgreSQL database, then checked.

``copy_ledger(source, target)`` reads every table of the SQLite ledger (at this
slurmgate's schema) and writes it into an empty PostgreSQL ledger in one transaction, ids
included (the identity sequences continue after the highest id), then compares both:
rows per table, and the money and time totals finance and the ledger rely on. Nothing is
left half-copied: a failure rolls the target back, and a mismatch raises after the commit
with both figures (the target is then dropped or copied again with ``replace``).

The source must be quiet: the CLI holds the SQLite writer's lock while this runs, so no
daemon writes the file during the copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from db.store import Store, StoreError

TABLES = (
    "reservations", "runs", "run_nodes", "events", "approvals", "gpu_samples",
    "gpu_samples_hourly", "usage_daily", "usage_daily_team", "usage_daily_project",
    "alerts", "alert_sends", "alert_attempts", "alert_cursors", "run_progress",
    "team_versions",
)
"""Every table of the ledger, parents before children (alert_sends refer to alerts)."""

IDENTITY_TABLES = ("events", "alerts", "alert_sends")

MONEY, SECONDS, UNITS = 1_000_000, 1000, 1
TOTALS: dict[str, dict[str, int]] = {
    "reservations": {"est_cost": MONEY},
    "runs": {"cost": MONEY, "credit": MONEY, "cost_gpu": MONEY, "cost_idle": MONEY,
             "gpu_seconds": SECONDS, "energy_j": UNITS},
    "run_nodes": {"gpu_seconds": SECONDS},
    "approvals": {"amount": MONEY, "used": MONEY},
    "usage_daily": {"cost": MONEY, "credit": MONEY, "gpu_seconds": SECONDS},
    "usage_daily_team": {"cost": MONEY, "credit": MONEY, "gpu_seconds": SECONDS},
    "usage_daily_project": {"cost": MONEY, "credit": MONEY},
}
"""Columns whose sums must agree, each term rounded to a whole number of its unit first
(micro-units of money, milliseconds): sums of whole numbers are exact in a double, whatever
order either server adds them in."""

TIMES = {"runs": "end_ts", "events": "ts", "reservations": "created_at"}
"""A time column per table whose first and last value must agree."""

BATCH = 5000


@dataclass
class CopyReport:
    rows: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{t:<22} {n:>12,} rows" for t, n in self.rows.items()]
        out += [f"MISMATCH {m}" for m in self.mismatches]
        return out


def _columns(store: Store, table: str) -> list[str]:
    cur = store.conn.execute(f'SELECT * FROM "{table}" WHERE 1 = 0')
    return [d[0] for d in cur.description]


def _figures(store: Store, table: str) -> dict[str, float]:
    parts = ["count(*) AS n"]
    parts += [f'coalesce(sum(round("{c}" * {k})), 0) AS "{c}"'
              for c, k in TOTALS.get(table, {}).items()]
    if table in TIMES:
        parts += [f'min("{TIMES[table]}") AS first_ts', f'max("{TIMES[table]}") AS last_ts']
    row = store.conn.query(f'SELECT {", ".join(parts)} FROM "{table}"')[0]
    return {k: float(v) if v is not None else 0.0 for k, v in row.items()}


def copy_ledger(source: Store, target: Store, *, replace: bool = False,
                progress: Callable[[str, int], None] | None = None) -> CopyReport:
    """Copy the SQLite ledger ``source`` into the PostgreSQL ledger ``target`` (both open,
    the target writable and at the same schema version) and verify it."""
    if target.dialect != "postgresql":
        raise StoreError("the copy goes into a postgresql:// ledger")
    if source.schema_version != target.schema_version:
        raise StoreError(f"schema versions differ: source {source.schema_version}, "
                         f"target {target.schema_version}; start the daemon once on the "
                         "source with this slurmgate to upgrade it")
    report = CopyReport()
    with target.transaction():
        if not replace:
            busy = [t for t in TABLES if target.conn.scalar(f'SELECT 1 FROM "{t}" LIMIT 1')]
            if busy:
                raise StoreError(f"the target ledger is not empty ({', '.join(busy)} hold "
                                 "rows); copy into a new database, or pass --replace")
        else:
            target.conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in TABLES))
        for table in TABLES:
            cols = _columns(source, table)
            names = ", ".join(f'"{c}"' for c in cols)
            sql = (f'INSERT INTO "{table}" ({names}) VALUES '
                   f'({", ".join(":" + c for c in cols)})')
            cur = source.conn.execute(f'SELECT {names} FROM "{table}"')
            copied = 0
            while True:
                batch = cur.fetchmany(BATCH)
                if not batch:
                    break
                target.conn.executemany(sql, [dict(zip(cols, r, strict=True)) for r in batch])
                copied += len(batch)
                if progress:
                    progress(table, copied)
            report.rows[table] = copied
        for table in IDENTITY_TABLES:
            target.conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f'coalesce((SELECT max(id) FROM "{table}"), 0) + 1, false)')
    for table in TABLES:
        want, got = _figures(source, table), _figures(target, table)
        for key in want:
            if want[key] != got.get(key):
                report.mismatches.append(f"{table}.{key}: source {want[key]}, "
                                         f"target {got.get(key)}")
    return report


def describe(report: CopyReport) -> dict[str, Any]:
    return {"rows": report.rows, "mismatches": report.mismatches,
            "verified": not report.mismatches}
