"""Read-only report queries for the CLI, the TUI and the exports.

Money reports count SETTLED runs by the time they ENDED, like the budget ledger. Month-long
reports read the daily rollup ``usage_daily`` for whole UTC days and the runs table only for
the partial days at the edges of the range, so a period that does not start at UTC midnight
(a site in another time zone) is still exact. ``use_rollup=False`` scans the runs table only
(the benchmark's baseline, and a cross-check in the tests).

The SQL is the dialect SQLite and PostgreSQL share (db/backend.py): named parameters,
``coalesce(sum(x), 0)`` for SQLite's ``total``, ``CASE`` for scalar ``max``/``min`` and for
counting a condition. Text is ordered in Python (the servers' collations differ), and every
sum is read as a float (SQLite's ``sum`` of integers is an integer).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from typing import Any

from db.backend import split_in
from db.schema import ROLLUP_DIMENSIONS, ROLLUP_MEASURES, ROLLUPS
from db.store import Store

DAY = 86400.0
CHARGEBACK_GROUPS = ROLLUP_DIMENSIONS


def _q(name: str) -> str:
    return f'"{name}"'


def _check_dims(dims: Sequence[str]) -> tuple[str, ...]:
    bad = [d for d in dims if d not in ROLLUP_DIMENSIONS]
    if bad:
        raise ValueError(f"cannot group by {', '.join(bad)}; "
                         f"choose from {', '.join(ROLLUP_DIMENSIONS)}")
    return tuple(dict.fromkeys(dims))


def _raw_select(dims: tuple[str, ...], lo: str, hi: str, sign: str = "") -> str:
    """Runs that ended in [:lo, :hi) as rollup-shaped rows; sign '-' subtracts them."""
    cols = [f"coalesce({_q(d)}, '') AS {_q(d)}" for d in dims]
    cols.append(f"{sign}1 AS runs")
    cols += [f"{sign}coalesce({m}, 0.0) AS {m}" for m in ROLLUP_MEASURES[1:]]
    return (f"SELECT {', '.join(cols)} FROM runs "
            f"WHERE end_ts >= :{lo} AND end_ts < :{hi} AND cost IS NOT NULL")


def usage_rows(store: Store, start_ts: float, end_ts: float, dims: Sequence[str], *,
               use_rollup: bool = True) -> list[dict[str, Any]]:
    """Sums of settled runs that ended in [start_ts, end_ts), grouped by ``dims``.

    Each row has the dims ('' for none) and runs, gpu_seconds, energy_j, cost, cost_gpu,
    cost_cpu, cost_mem, cost_energy, cost_idle, credit.

    With the rollup, whole UTC days come from the smallest daily rollup that has the
    grouping's columns (db.schema.ROLLUPS). A partial day at an edge is
    read from the runs table, either the part inside the range or, when that is the larger
    part, the whole rollup day minus the part outside: at most 12 hours of runs per edge.
    """
    dims = _check_dims(dims)
    group = ", ".join(_q(d) for d in dims)
    parts: list[str] = []
    params: dict[str, Any] = {}

    def raw(lo: float, hi: float, sign: str = "") -> None:
        if hi > lo:
            n = len(parts)
            parts.append(_raw_select(dims, f"lo{n}", f"hi{n}", sign))
            params.update({f"lo{n}": float(lo), f"hi{n}": float(hi)})

    first_day = math.ceil(start_ts / DAY)
    end_day = math.floor(end_ts / DAY)
    if not use_rollup or end_day < first_day:
        raw(start_ts, end_ts)
    else:
        days_lo, days_hi = first_day, end_day
        inside = first_day * DAY - start_ts
        if inside > DAY / 2:
            days_lo -= 1
            raw(days_lo * DAY, start_ts, "-")
        else:
            raw(start_ts, first_day * DAY)
        inside = end_ts - end_day * DAY
        if inside > DAY / 2:
            raw(end_ts, (end_day + 1) * DAY, "-")
            days_hi += 1
        else:
            raw(end_day * DAY, end_ts)
        if days_lo < days_hi:
            table = next(t for t, covered, _ in ROLLUPS if set(dims) <= set(covered))
            parts.append(f"SELECT {group}, {', '.join(ROLLUP_MEASURES)} FROM {table} "
                         "WHERE day >= :day_lo AND day < :day_hi")
            params.update(day_lo=int(days_lo), day_hi=int(days_hi))
    if not parts:
        return []
    measures = ", ".join(f"coalesce(sum({m}), 0) AS {m}" for m in ROLLUP_MEASURES)
    sql = (f"SELECT {group}, {measures} FROM ({' UNION ALL '.join(parts)}) AS u "
           f"GROUP BY {group} HAVING sum(runs) <> 0")
    rows = store._query(sql, params)
    for r in rows:
        r["runs"] = int(r["runs"])
        for m in ROLLUP_MEASURES[1:]:
            r[m] = float(r[m])
    # in Python, not ORDER BY: the servers order text by different collations
    rows.sort(key=lambda r: tuple(r[d] for d in dims))
    return rows


def chargeback(store: Store, start_ts: float, end_ts: float,
               group_by: Sequence[str] = ("team", "project"), *,
               use_rollup: bool = True) -> list[dict[str, Any]]:
    """Chargeback for [start_ts, end_ts), one row per group, dearest first.

    Row: the group_by values (None for none), runs, gpu_hours, gpu_hours_by_type
    {type: hours}, cost, credits, net (cost - credits), cost_gpu, cost_cpu, cost_mem,
    cost_energy, energy_kwh, idle_cost (the GPU cost of allocated GPU-hours the GPUs spent
    idle: cost_gpu x (1 - util_mean/100), summed over runs with a measured utilisation).
    """
    group = _check_dims(group_by)
    dims = group if "gpu_type" in group else (*group, "gpu_type")
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in usage_rows(store, start_ts, end_ts, dims, use_rollup=use_rollup):
        key = tuple(r[d] for d in group)
        row = out.get(key)
        if row is None:
            row = {d: (r[d] or None) for d in group}
            row.update(runs=0, gpu_hours=0.0, gpu_hours_by_type={}, cost=0.0, credits=0.0,
                       net=0.0, cost_gpu=0.0, cost_cpu=0.0, cost_mem=0.0, cost_energy=0.0,
                       energy_kwh=0.0, idle_cost=0.0)
            out[key] = row
        hours = r["gpu_seconds"] / 3600.0
        row["runs"] += r["runs"]
        row["gpu_hours"] += hours
        if hours:
            t = r["gpu_type"] or "(untyped)"
            row["gpu_hours_by_type"][t] = row["gpu_hours_by_type"].get(t, 0.0) + hours
        row["cost"] += r["cost"]
        row["credits"] += r["credit"]
        row["net"] += r["cost"] - r["credit"]
        for m in ("cost_gpu", "cost_cpu", "cost_mem", "cost_energy"):
            row[m] += r[m]
        row["energy_kwh"] += r["energy_j"] / 3.6e6
        row["idle_cost"] += r["cost_idle"]
    return sorted(out.values(), key=lambda row: (-row["net"], *(str(row[d]) for d in group)))


def quota_rows(store: Store, period_start_ts: float, period_end_ts: float, *,
               period: str | None = None) -> list[dict[str, Any]]:
    """Per team: spend (settled cost), credits, net, reserved (live reservations, less what
    their already-settled runs were charged) and live reservation count. Teams with neither
    spend nor reservations are absent; ``period`` limits reservations to that budget period.
    Runs with no team are under team None."""
    rows: dict[str, dict[str, Any]] = {}

    def row_for(team: str) -> dict[str, Any]:
        if team not in rows:
            rows[team] = {"team": team or None, "spend": 0.0, "credits": 0.0, "net": 0.0,
                          "reserved": 0.0, "reservations": 0}
        return rows[team]

    for r in usage_rows(store, period_start_ts, period_end_ts, ("team",)):
        row = row_for(r["team"])
        row["spend"] += r["cost"]
        row["credits"] += r["credit"]
        row["net"] += r["cost"] - r["credit"]
    where, params = "", {}
    if period is not None:
        where, params = " AND r.period = :period", {"period": period}
    # what is left of each live reservation: its estimate less what its settled runs were
    # charged, never below zero
    for r in store._query(
        "SELECT team, count(*) AS reservations, "
        "coalesce(sum(CASE WHEN remaining > 0.0 THEN remaining ELSE 0.0 END), 0) AS reserved "
        "FROM (SELECT coalesce(r.team, '') AS team, r.est_cost - coalesce(("
        "SELECT sum(u.cost - u.credit) FROM runs u WHERE u.rid = r.rid "
        "AND u.cost IS NOT NULL), 0) AS remaining FROM reservations r "
        f"WHERE r.state IN ('reserved', 'bound'){where}) AS live GROUP BY team", params,
    ):
        row = row_for(r["team"])
        row["reservations"] = int(r["reservations"])
        row["reserved"] = float(r["reserved"])
    return sorted(rows.values(), key=lambda r: r["team"] or "")


def events(store: Store, kinds: Sequence[str] | None = None, limit: int = 200, *,
           since_ts: float | None = None, team: str | None = None,
           job_id: int | None = None, before_id: int | None = None) -> list[dict[str, Any]]:
    """Event log, newest first; ``before_id`` pages backwards. ``detail`` is decoded."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if kinds:
        ph, p = split_in("kind", list(kinds))
        where.append(f"kind IN ({ph})")
        params.update(p)
    for col, value, op in (("ts", since_ts, ">="), ("team", team, "="),
                           ("job_id", job_id, "="), ("id", before_id, "<")):
        if value is not None:
            where.append(f"{col} {op} :{col}")
            params[col] = float(value) if col == "ts" else value if col == "team" \
                else int(value)
    sql = "SELECT * FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT :limit"
    params["limit"] = max(0, int(limit))
    rows = store._query(sql, params)
    for r in rows:
        if r["detail"]:
            with contextlib.suppress(ValueError):
                r["detail"] = json.loads(r["detail"])
    return rows


def node_failures(store: Store, since_ts: float) -> list[dict[str, Any]]:
    """Nodes with 'node_fail' events since ``since_ts``, most failures first: node,
    failures, jobs (distinct job ids hit), drains, first_ts, last_ts, last_message."""
    rows = store._query(
        "SELECT node, sum(CASE WHEN kind = 'node_fail' THEN 1 ELSE 0 END) AS failures, "
        "count(DISTINCT CASE WHEN kind = 'node_fail' THEN job_id END) AS jobs, "
        "sum(CASE WHEN kind = 'drain' THEN 1 ELSE 0 END) AS drains, "
        "min(CASE WHEN kind = 'node_fail' THEN ts END) AS first_ts, "
        "max(CASE WHEN kind = 'node_fail' THEN ts END) AS last_ts, "
        "(SELECT e2.message FROM events e2 WHERE e2.node = e.node AND e2.kind = 'node_fail' "
        " AND e2.ts >= :since ORDER BY e2.ts DESC, e2.id DESC LIMIT 1) AS last_message "
        "FROM events e WHERE kind IN ('node_fail', 'drain') AND ts >= :since "
        "AND node IS NOT NULL GROUP BY node "
        "HAVING sum(CASE WHEN kind = 'node_fail' THEN 1 ELSE 0 END) > 0",
        {"since": since_ts},
    )
    for r in rows:
        r["failures"], r["jobs"], r["drains"] = int(r["failures"]), int(r["jobs"]), \
            int(r["drains"])
    # in Python, not ORDER BY: ties go by node name, and the servers' collations differ
    rows.sort(key=lambda r: (-r["failures"], -r["last_ts"], r["node"]))
    return rows


def unsettled_runs(store: Store, ended_before_ts: float, limit: int = 1000
                   ) -> list[dict[str, Any]]:
    """Runs whose nodes reported but whose jobcomp never came (oldest first): candidates for
    the daemon to look up in Slurm."""
    return store._query(
        "SELECT cluster, job_id, restart_count, start_ts, end_ts, \"user\", account, nodes "
        "FROM runs WHERE state IS NULL AND end_ts < :before "
        "ORDER BY end_ts, job_id, restart_count LIMIT :limit",
        {"before": ended_before_ts, "limit": max(0, int(limit))},
    )
