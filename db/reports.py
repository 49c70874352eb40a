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


def _filter_sql(cluster: str | None, team: str | None, *, rollup: bool,
                alias: str = "") -> str:
    """`` AND ...`` limiting rows to ``cluster`` and ``team`` (None: any). Runs and
    reservations keep "no team" as NULL (or ''), the rollups as ''; a named team stays an
    equality, so the (team, end_ts) index and the live-reservations index serve it."""
    out = ""
    if cluster is not None:
        out += f" AND {alias}cluster = :f_cluster"
    if team is not None:
        if team == "" and not rollup:
            out += f" AND ({alias}team IS NULL OR {alias}team = '')"
        else:
            out += f" AND {alias}team = :f_team"
    return out


def _filter_params(cluster: str | None, team: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if cluster is not None:
        params["f_cluster"] = str(cluster)
    if team is not None:
        params["f_team"] = str(team)
    return params


def _raw_select(dims: tuple[str, ...], lo: str, hi: str, sign: str = "",
                where: str = "") -> str:
    """Runs that ended in [:lo, :hi) as rollup-shaped rows; sign '-' subtracts them."""
    cols = [f"coalesce({_q(d)}, '') AS {_q(d)}" for d in dims]
    cols.append(f"{sign}1 AS runs")
    cols += [f"{sign}coalesce({m}, 0.0) AS {m}" for m in ROLLUP_MEASURES[1:]]
    return (f"SELECT {', '.join(cols)} FROM runs "
            f"WHERE end_ts >= :{lo} AND end_ts < :{hi} AND cost IS NOT NULL{where}")


def usage_rows(store: Store, start_ts: float, end_ts: float, dims: Sequence[str], *,
               use_rollup: bool = True, cluster: str | None = None,
               team: str | None = None) -> list[dict[str, Any]]:
    """Sums of settled runs that ended in [start_ts, end_ts), grouped by ``dims``; only the
    runs of ``cluster`` and of ``team`` ('' for runs without one) when given (None: every
    cluster, every team).

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
    params: dict[str, Any] = _filter_params(cluster, team)
    raw_where = _filter_sql(cluster, team, rollup=False)

    def raw(lo: float, hi: float, sign: str = "") -> None:
        if hi > lo:
            n = len(parts)
            parts.append(_raw_select(dims, f"lo{n}", f"hi{n}", sign, raw_where))
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
                         "WHERE day >= :day_lo AND day < :day_hi"
                         + _filter_sql(cluster, team, rollup=True))
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
               use_rollup: bool = True, cluster: str | None = None) -> list[dict[str, Any]]:
    """Chargeback for [start_ts, end_ts), one row per group, dearest first; the runs of
    ``cluster`` only when given (None: every cluster).

    Row: the group_by values (None for none), runs, gpu_hours, gpu_hours_by_type
    {type: hours}, cost, credits, net (cost - credits), cost_gpu, cost_cpu, cost_mem,
    cost_energy, energy_kwh, idle_cost (the GPU cost of allocated GPU-hours the GPUs spent
    idle: cost_gpu x (1 - util_mean/100), summed over runs with a measured utilisation).
    """
    group = _check_dims(group_by)
    dims = group if "gpu_type" in group else (*group, "gpu_type")
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in usage_rows(store, start_ts, end_ts, dims, use_rollup=use_rollup,
                        cluster=cluster):
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


# -- the budget ledger's figures --------------------------------------------------------------
# ONE definition of what a team has spent and still holds in a budget period: the daemon's
# in-memory ledger (quota_rows), `slurmgate quota`, the statements and, on a shared ledger,
# every decision (db.shared_ledger.team_standing, inside the team's lock) read these two
# statements, so the decision path and the quota view cannot disagree.


def _held_sql(cluster: str | None, team: str | None, period: str | None
              ) -> tuple[str, dict[str, Any]]:
    """Per team: live reservations and what is left of them: each one's estimate less what
    its settled runs were charged, never below zero. One statement, index-driven on both
    servers: the live reservations from their partial index (reservations_live, by team),
    each one's runs from runs_rid in a correlated subquery that clamps at zero itself, so it
    runs once per reservation (a CASE over a flattened subquery's column would run it
    twice) and a server cannot turn it into a scan of every run."""
    where = _filter_sql(cluster, team, rollup=False, alias="r.")
    params = _filter_params(cluster, team)
    if period is not None:
        where += " AND r.period = :period"
        params["period"] = str(period)
    paid = "coalesce(sum(u.cost - u.credit), 0)"
    return ("SELECT team, count(*) AS reservations, coalesce(sum(remaining), 0) AS reserved "
            "FROM (SELECT coalesce(r.team, '') AS team, (SELECT CASE WHEN r.est_cost > "
            f"{paid} THEN r.est_cost - {paid} ELSE 0.0 END FROM runs u "
            "WHERE u.rid = r.rid AND u.cost IS NOT NULL) AS remaining FROM reservations r "
            f"WHERE r.state IN ('reserved', 'bound'){where}) AS live GROUP BY team", params)


def team_figures(store: Store, period_start_ts: float, period_end_ts: float, *,
                 team: str | None = None, cluster: str | None = None,
                 period: str | None = None) -> dict[str, dict[str, Any]]:
    """The budget ledger's figures, by team ('' for runs and reservations without one):
    spend (settled cost of runs that ENDED in the period: the daily team rollup for whole
    UTC days, the runs for the edges), credits, net (spend - credits), reserved (live
    reservations less what their already-settled runs were charged, never below zero each)
    and reservations (how many are live). Teams with neither spend nor live reservations are
    absent.

    ``team``: that team only (the decision path: one team, index reads). ``cluster``: the
    runs and reservations of that cluster only (None: all clusters, a global budget).
    ``period``: only reservations made for that budget period. Two statements."""
    out: dict[str, dict[str, Any]] = {}

    def row_for(name: str) -> dict[str, Any]:
        if name not in out:
            out[name] = {"team": name or None, "spend": 0.0, "credits": 0.0, "net": 0.0,
                         "reserved": 0.0, "reservations": 0}
        return out[name]

    for r in usage_rows(store, period_start_ts, period_end_ts, ("team",), cluster=cluster,
                        team=team):
        row = row_for(r["team"])
        row["spend"] += r["cost"]
        row["credits"] += r["credit"]
        row["net"] += r["cost"] - r["credit"]
    sql, params = _held_sql(cluster, team, period)
    for r in store._query(sql, params):
        row = row_for(r["team"])
        row["reservations"] = int(r["reservations"])
        row["reserved"] = float(r["reserved"])
    return out


def quota_rows(store: Store, period_start_ts: float, period_end_ts: float, *,
               period: str | None = None, cluster: str | None = None) -> list[dict[str, Any]]:
    """Per team (``team_figures``): spend (settled cost), credits, net, reserved (live
    reservations, less what their already-settled runs were charged) and live reservation
    count, sorted by team. Teams with neither spend nor reservations are absent; ``period``
    limits reservations to that budget period; ``cluster`` counts that cluster's runs and
    reservations only (None: every cluster). Runs with no team are under team None."""
    rows = team_figures(store, period_start_ts, period_end_ts, cluster=cluster, period=period)
    return sorted(rows.values(), key=lambda r: r["team"] or "")


def spend_by_day(store: Store, start_ts: float, end_ts: float, *,
                 cluster: str | None = None) -> dict[str, dict[int, float]]:
    """Net settled spend per team per UTC day (``db.rollups.team_spend_by_day``'s figures,
    from ``usage_daily_team``), of ``cluster`` only when given: team ('' for none) -> {day
    number: net} for every UTC day overlapping [start_ts, end_ts); days with nothing are
    absent."""
    params: dict[str, Any] = {"first": math.floor(start_ts / DAY), "end": math.ceil(end_ts / DAY),
                              **_filter_params(cluster, None)}
    rows = store.conn.execute(
        "SELECT team, day, coalesce(sum(cost), 0) - coalesce(sum(credit), 0) "
        "FROM usage_daily_team WHERE day >= :first AND day < :end"
        + _filter_sql(cluster, None, rollup=True) + " GROUP BY team, day", params).fetchall()
    out: dict[str, dict[int, float]] = {}
    for team, day, net in sorted(rows, key=lambda r: (r[0], r[1])):
        out.setdefault(team, {})[int(day)] = float(net)
    return out


# -- clusters --------------------------------------------------------------------------------


def has_cluster(store: Store, cluster: str) -> bool:
    """Whether the ledger holds any run or reservation of ``cluster`` (two index probes)."""
    return bool(store.conn.scalar(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM runs WHERE cluster = :c) "
        "OR EXISTS (SELECT 1 FROM reservations WHERE cluster = :c) THEN 1 ELSE 0 END",
        {"c": str(cluster)}))


def ledger_clusters(store: Store) -> list[str]:
    """The clusters the ledger has settled spend or live reservations of, in byte order (for
    messages and pickers: it reads the daily team rollup, not the runs)."""
    rows = store.conn.execute(
        "SELECT cluster FROM usage_daily_team UNION "
        "SELECT cluster FROM reservations WHERE state IN ('reserved', 'bound')").fetchall()
    return sorted({str(r[0]) for r in rows})


def unknown_cluster_message(store: Store, cluster: str) -> str | None:
    """None when the ledger knows ``cluster``; else the sentence saying so, with the clusters
    it does know."""
    if has_cluster(store, cluster):
        return None
    known = ledger_clusters(store)
    return (f"cluster {cluster!r} has no runs or reservations in the ledger; clusters: "
            f"{', '.join(known) or 'none yet'}")


# -- events ----------------------------------------------------------------------------------


def events(store: Store, kinds: Sequence[str] | None = None, limit: int = 200, *,
           since_ts: float | None = None, team: str | None = None,
           job_id: int | None = None, before_id: int | None = None,
           cluster: str | None = None) -> list[dict[str, Any]]:
    """Event log, newest first; ``before_id`` pages backwards; ``cluster``: that cluster's
    events only (None: all). ``detail`` is decoded."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if kinds:
        ph, p = split_in("kind", list(kinds))
        where.append(f"kind IN ({ph})")
        params.update(p)
    for col, value, op in (("ts", since_ts, ">="), ("team", team, "="),
                           ("job_id", job_id, "="), ("id", before_id, "<"),
                           ("cluster", cluster, "=")):
        if value is not None:
            where.append(f"{col} {op} :{col}")
            params[col] = float(value) if col == "ts" else str(value) \
                if col in ("team", "cluster") else int(value)
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


def event_count(store: Store, kind: str | None = None, *,
                cluster: str | None = None) -> int:
    """How many events are logged (of ``kind``, of ``cluster`` when given)."""
    where = [w for w, v in (("kind = :kind", kind), ("cluster = :cluster", cluster))
             if v is not None]
    sql = "SELECT count(*) FROM events" + (" WHERE " + " AND ".join(where) if where else "")
    return int(store.conn.scalar(sql, {"kind": kind, "cluster": cluster}))


def node_failures(store: Store, since_ts: float, *,
                  cluster: str | None = None) -> list[dict[str, Any]]:
    """Nodes with 'node_fail' events since ``since_ts``, most failures first: node,
    failures, jobs (distinct job ids hit), drains, first_ts, last_ts, last_message.
    ``cluster``: that cluster's nodes only (node names repeat across clusters)."""
    where, where2 = ("", "") if cluster is None else (" AND cluster = :cluster",
                                                      " AND e2.cluster = :cluster")
    rows = store._query(
        "SELECT node, sum(CASE WHEN kind = 'node_fail' THEN 1 ELSE 0 END) AS failures, "
        "count(DISTINCT CASE WHEN kind = 'node_fail' THEN job_id END) AS jobs, "
        "sum(CASE WHEN kind = 'drain' THEN 1 ELSE 0 END) AS drains, "
        "min(CASE WHEN kind = 'node_fail' THEN ts END) AS first_ts, "
        "max(CASE WHEN kind = 'node_fail' THEN ts END) AS last_ts, "
        "(SELECT e2.message FROM events e2 WHERE e2.node = e.node AND e2.kind = 'node_fail' "
        " AND e2.ts >= :since" + where2
        + " ORDER BY e2.ts DESC, e2.id DESC LIMIT 1) AS last_message "
        "FROM events e WHERE kind IN ('node_fail', 'drain') AND ts >= :since "
        "AND node IS NOT NULL" + where + " GROUP BY node "
        "HAVING sum(CASE WHEN kind = 'node_fail' THEN 1 ELSE 0 END) > 0",
        {"since": since_ts, "cluster": cluster},
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
