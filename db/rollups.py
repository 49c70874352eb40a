"""The rollups: daily sums of settled runs, and hourly GPU samples. Kept, checked, rebuilt.

Daily rollups (db.schema.ROLLUPS: ``usage_daily_team``, ``usage_daily_project``,
``usage_daily``) hold, per UTC day of a run's END and per key, the runs, GPU-seconds, energy,
cost parts and credits of settled runs. Key columns hold '' for a missing team, project etc.
The ingest keeps them in the transaction that settles the runs (``apply_rollup_delta``: a
run's old row out, its new row in); month-long reports read them instead of millions of runs.

``verify`` recomputes them from the runs table and lists every difference; ``rebuild`` writes
the recomputed rows over the tables that differ. ``slurmgate doctor --rollups`` verifies.

``rollup_samples`` folds raw GPU samples older than the retention into hourly rows.

The SQL runs on SQLite and PostgreSQL alike (db/backend.py). Imports only db.schema and
db.backend: the store, the ingest and the reports build on this module.
"""

from __future__ import annotations

import contextlib
import math
import operator
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

from db.backend import Connection
from db.schema import ROLLUP_MEASURES, ROLLUPS

DAY = 86400


class RollupStore(Protocol):
    """What this module needs of db.store.Store."""

    @property
    def conn(self) -> Connection: ...

    def transaction(self) -> contextlib.AbstractContextManager[Any]: ...


def _q(name: str) -> str:
    return f'"{name}"'


def _floor_int(expr: str) -> str:
    """floor(expr) as an integer, on both servers (``floor()`` is a SQLite math function,
    missing from some builds): CAST truncates on SQLite and rounds on PostgreSQL; the CASE
    takes back a round up. Then ``/ 86400`` is integer division on both, as Python's ``//``
    on the float (end_ts // 86400 == floor(end_ts) // 86400)."""
    return (f"(CAST({expr} AS BIGINT) - CASE WHEN CAST({expr} AS BIGINT) > {expr} "
            "THEN 1 ELSE 0 END)")


# -- keeping the daily rollups -----------------------------------------------------------------


def _rollup_sql(table: str, dims: tuple[str, ...], measures: tuple[str, ...]
                ) -> tuple[str, str]:
    """The upsert and the prune of one rollup table; parameters are named after the
    columns."""
    key = ("day", *dims)
    cols = key + measures
    upsert = (f"INSERT INTO {table} ({', '.join(_q(c) for c in cols)}) "
              f"VALUES ({', '.join(':' + c for c in cols)}) "
              f"ON CONFLICT ({', '.join(_q(c) for c in key)}) DO UPDATE SET "
              + ", ".join(f"{m} = {table}.{m} + excluded.{m}" for m in measures))
    prune = (f"DELETE FROM {table} WHERE runs <= 0 AND "
             + " AND ".join(f"{_q(c)} = :{c}" for c in key))
    return upsert, prune


# (upsert, prune, its columns, key of a run row, does the table keep credited_gpu_seconds)
_ROLLUPS = [(*_rollup_sql(table, dims, measures), ("day", *dims, *measures),
             operator.itemgetter(*dims), "credited_gpu_seconds" in measures)
            for table, dims, measures in ROLLUPS]
_rollup_measures = operator.itemgetter(*ROLLUP_MEASURES[1:])


def apply_rollup_delta(conn: Connection,
                       pairs: list[tuple[dict[str, Any] | None, dict[str, Any]]]) -> None:
    """Move settled runs' contributions in the daily rollups from (old row) to (new row).

    A row counts when it has a cost and an end; None (a run that did not exist) counts as
    nothing. Key columns hold '' for a missing team, project, etc. (see db.schema)."""
    accs: list[dict[tuple[Any, ...], list[float]]] = [{} for _ in _ROLLUPS]
    for old, new in pairs:
        for row, sign in ((old, -1.0), (new, 1.0)):
            if row is None or row["cost"] is None or row["end_ts"] is None:
                continue
            day = int(row["end_ts"] // 86400)
            values = [sign, *(sign * (v or 0.0) for v in _rollup_measures(row))]
            cost, gs = row["cost"], row["gpu_seconds"] or 0.0
            credited = sign * gs * min(1.0, row["credit"] / cost) if cost > 0 else 0.0
            for acc, (_, _, _, dims_of, with_credited) in zip(accs, _ROLLUPS, strict=True):
                key = (day, *(v or "" for v in dims_of(row)))
                vals = [*values, credited] if with_credited else values
                have = acc.get(key)
                if have is None:
                    acc[key] = list(vals)
                else:
                    for i, v in enumerate(vals):
                        have[i] += v
    for acc, (upsert, prune, cols, _, _) in zip(accs, _ROLLUPS, strict=True):
        rows, removed = [], []
        for key, values in acc.items():
            if values[0] == 0 and all(abs(v) < 1e-12 for v in values):
                continue
            row = dict(zip(cols, (*key, int(values[0]), *values[1:]), strict=True))
            rows.append(row)
            if values[0] < 0:
                removed.append(row)
        if rows:
            conn.executemany(upsert, rows)
        if removed:
            conn.executemany(prune, removed)


# -- reading them ----------------------------------------------------------------------------


def team_spend_by_day(store: RollupStore, start_ts: float, end_ts: float
                      ) -> dict[str, dict[int, float]]:
    """Net settled spend (cost minus credits) per team per UTC day, from ``usage_daily_team``:
    team ('' for runs without one) -> {day number (``ts // 86400``): net}, for every UTC day
    that overlaps [start_ts, end_ts). Budget periods start at UTC midnight, so a period's
    days are read whole; days with no settled run are absent. Summed over clusters."""
    rows = store.conn.execute(
        "SELECT team, day, coalesce(sum(cost), 0) - coalesce(sum(credit), 0) "
        "FROM usage_daily_team WHERE day >= :first AND day < :end "
        "GROUP BY team, day ORDER BY team, day",
        {"first": math.floor(start_ts / DAY), "end": math.ceil(end_ts / DAY)}).fetchall()
    out: dict[str, dict[int, float]] = {}
    for team, day, net in rows:
        out.setdefault(team, {})[int(day)] = float(net)
    return out


# -- checking and rebuilding them ----------------------------------------------------------------

TOLERANCE = 1e-6
"""Sums kept by adding and subtracting runs drift by float rounding: a measure differs when it
is further than this from the recomputed one (relative for sums above 1)."""


class Difference(NamedTuple):
    """One way a rollup table disagrees with the runs table."""

    table: str
    key: tuple[Any, ...]
    """(day, *the table's dimensions)."""
    column: str
    """The measure that differs; "row" for a row that is missing or should not be there."""
    have: float | None
    """In the table (None: the row is missing)."""
    want: float | None
    """Recomputed from the runs (None: no settled run has this key)."""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d", time.gmtime(self.key[0] * DAY))
        where = f"{self.table} {when} {'/'.join(str(k) or '-' for k in self.key[1:])}"
        if self.have is None:
            return f"{where}: row missing ({self.want:g} runs)"
        if self.want is None:
            return f"{where}: row has no settled runs behind it ({self.have:g} runs)"
        return f"{where}: {self.column} is {self.have:.6g}, the runs say {self.want:.6g}"


def _measure_sql(measure: str) -> str:
    if measure == "runs":
        return "count(*)"
    if measure == "credited_gpu_seconds":
        # as apply_rollup_delta: the credited share of the run's GPU time
        return ("coalesce(sum(CASE WHEN cost > 0 THEN coalesce(gpu_seconds, 0) * "
                "CASE WHEN credit / cost < 1.0 THEN credit / cost ELSE 1.0 END "
                "ELSE 0 END), 0)")
    return f"coalesce(sum({measure}), 0)"


def _recompute_sql(dims: tuple[str, ...], measures: tuple[str, ...]) -> str:
    """The rows of one rollup from the runs table: day, *dims, *measures. The day is
    floor(end_ts / 86400), as apply_rollup_delta takes it (end_ts is never negative)."""
    key = [f"{_floor_int('end_ts')} / 86400", *(f"coalesce({_q(d)}, '')" for d in dims)]
    cols = [*key, *(_measure_sql(m) for m in measures)]
    return (f"SELECT {', '.join(cols)} FROM runs WHERE cost IS NOT NULL AND end_ts IS NOT NULL "
            f"GROUP BY {', '.join(str(i + 1) for i in range(len(key)))}")


def _table_sql(table: str, dims: tuple[str, ...], measures: tuple[str, ...]) -> str:
    return f"SELECT {', '.join(_q(c) for c in ('day', *dims, *measures))} FROM {table}"


Rows = dict[tuple[Any, ...], tuple[Any, ...]]


def _rows(conn: Connection, sql: str, width: int) -> Rows:
    return {tuple(r[:width]): tuple(r[width:]) for r in conn.execute(sql).fetchall()}


def _compare(table: str, measures: tuple[str, ...], have: Rows, want: Rows,
             tolerance: float) -> Iterator[Difference]:
    for key in sorted(have.keys() | want.keys()):
        h, w = have.get(key), want.get(key)
        if h is None or w is None:
            yield Difference(table, key, "row", None if h is None else h[0],
                             None if w is None else w[0])
            continue
        for name, a, b in zip(measures, h, w, strict=True):
            if name == "runs":
                if a != b:
                    yield Difference(table, key, name, a, b)
            elif not math.isclose(a or 0.0, b or 0.0, rel_tol=tolerance, abs_tol=tolerance):
                yield Difference(table, key, name, a, b)


def _differences(conn: Connection, tolerance: float) -> dict[str, list[Difference]]:
    out: dict[str, list[Difference]] = {}
    for table, dims, measures in ROLLUPS:
        width = 1 + len(dims)
        have = _rows(conn, _table_sql(table, dims, measures), width)
        want = _rows(conn, _recompute_sql(dims, measures), width)
        out[table] = list(_compare(table, measures, have, want, tolerance))
    return out


def verify(store: RollupStore, *, tolerance: float = TOLERANCE) -> list[Difference]:
    """Every difference between the daily rollups and a recomputation from the runs table
    (empty: they agree). Reads only; a reader's store will do."""
    diffs = _differences(store.conn, tolerance)
    return [d for table, _, _ in ROLLUPS for d in diffs[table]]


def rebuild(store: RollupStore, *, tolerance: float = TOLERANCE) -> list[Difference]:
    """Recompute every daily rollup table that differs from the runs and write it, in one
    transaction (the writer's store). Returns the differences it fixed."""
    with store.transaction():
        diffs = _differences(store.conn, tolerance)
        for table, dims, measures in ROLLUPS:
            if not diffs[table]:
                continue
            cols = ", ".join(_q(c) for c in ("day", *dims, *measures))
            store.conn.execute(f"DELETE FROM {table}")
            store.conn.execute(f"INSERT INTO {table} ({cols}) {_recompute_sql(dims, measures)}")
    return [d for table, _, _ in ROLLUPS for d in diffs[table]]


# -- hourly GPU samples ----------------------------------------------------------------------

_SAMPLES_HOURLY = f"""
INSERT INTO gpu_samples_hourly AS h
    (node, gpu_uuid, hour_ts, gpu_type, util_mean, util_max, mem_max_bytes, samples)
SELECT node, gpu_uuid, {_floor_int('ts')} / 3600 * 3600, max(gpu_type), avg(util), max(util),
       max(mem_used_bytes), count(*)
FROM gpu_samples
WHERE ts < :cutoff
GROUP BY 1, 2, 3
ON CONFLICT (node, gpu_uuid, hour_ts) DO UPDATE SET
    util_mean = (coalesce(h.util_mean, 0) * h.samples
                 + coalesce(excluded.util_mean, 0) * excluded.samples)
                / (h.samples + excluded.samples),
    util_max = CASE WHEN excluded.util_max > h.util_max THEN excluded.util_max
                    ELSE coalesce(h.util_max, excluded.util_max) END,
    mem_max_bytes = CASE WHEN excluded.mem_max_bytes > h.mem_max_bytes
                         THEN excluded.mem_max_bytes
                         ELSE coalesce(h.mem_max_bytes, excluded.mem_max_bytes) END,
    gpu_type = coalesce(excluded.gpu_type, h.gpu_type),
    samples = h.samples + excluded.samples
"""


def rollup_samples(store: RollupStore, retention_days: float, *,
                   now: float | None = None) -> int:
    """Fold raw samples older than ``retention_days`` into hourly rows and delete them.

    One transaction; an hour split by the cutoff is merged (sample-weighted mean) when its
    later samples age out. Returns how many raw samples were rolled up.
    """
    cutoff = (time.time() if now is None else now) - retention_days * 86400.0
    with store.transaction():
        store.conn.execute(_SAMPLES_HOURLY, {"cutoff": cutoff})
        cur = store.conn.execute("DELETE FROM gpu_samples WHERE ts < :cutoff",
                                 {"cutoff": cutoff})
    return cur.rowcount
