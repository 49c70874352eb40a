"""A team's budget when several daemons decide against one ledger (PostgreSQL).

Each daemon keeps the team figures in memory (policies/ledger.py) so a decision reads two
numbers. With a second daemon writing reservations too, those numbers go stale between its
decisions, so a decision on a shared ledger, inside its one transaction:

1. ``lock_team``: takes the team's budget lock, a transaction-scoped advisory lock keyed
   on (team, cluster) (the cluster is None for a global budget). A second daemon deciding
   for the same team waits here until the first commits its reservation; other teams do
   not wait.
2. ``team_standing``: reads the team's net spend in the period and what its live
   reservations still hold, as committed now (the other daemon's reservation included).
3. decides, and writes the reservation before the commit releases the lock.

On SQLite the transaction's ``BEGIN IMMEDIATE`` already serialises every writer of the
file; ``lock_team`` does nothing there.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from db.store import Store

TEAM_LOCK_CLASS = 0x5A6F
"""int4 class of the team budget locks (db/leader.py uses 0x5A6E for the leader lock)."""


def team_lock_key(team: str, cluster: str | None) -> int:
    return zlib.crc32(f"{cluster or '*'}\x00{team}".encode()) & 0x7FFFFFFF


def lock_team(store: Store, team: str, cluster: str | None) -> None:
    """Wait for, and hold until the transaction ends, the budget lock of ``team`` (in
    ``cluster``, or across clusters for None). Must run inside ``store.transaction()``."""
    if store.dialect != "postgresql":
        return
    if not store.conn.in_transaction:
        raise RuntimeError("lock_team must run inside a transaction")
    store.conn.execute("SELECT pg_advisory_xact_lock(:c, :k)",
                       {"c": TEAM_LOCK_CLASS, "k": team_lock_key(team, cluster)})


def team_standing(store: Store, team: str, period_start_ts: float, period_end_ts: float, *,
                  cluster: str | None = None) -> tuple[float, float]:
    """(net spend, reserved) of ``team`` in the period, as the ledger has them now: the
    settled cost less credits of runs that ended in the period (the daily rollup for whole
    UTC days, the runs for the partial days at the edges), and what its live reservations
    hold less what their already-settled runs were charged (never below zero each). The
    same figures ``db.reports.quota_rows`` gives, for one team (``cluster`` None: all)."""
    conn = store.conn
    where_c = "" if cluster is None else " AND cluster = :cluster"
    params: dict[str, object] = {"team": team, "cluster": cluster}
    first_day = math.ceil(period_start_ts / 86400.0)
    end_day = math.floor(period_end_ts / 86400.0)
    runs = ("SELECT cost, credit FROM runs WHERE team = :team AND end_ts >= :{a} "
            "AND end_ts < :{b} AND cost IS NOT NULL" + where_c)
    if end_day < first_day:  # inside one day
        parts = [runs.format(a="s0", b="e0")]
        params.update(s0=period_start_ts, e0=period_end_ts)
    else:
        parts = [runs.format(a="s0", b="e0"), runs.format(a="s1", b="e1"),
                 "SELECT cost, credit FROM usage_daily_team WHERE team = :team "
                 "AND day >= :d0 AND day < :d1" + where_c]
        params.update(s0=period_start_ts, e0=first_day * 86400.0, s1=end_day * 86400.0,
                      e1=period_end_ts, d0=first_day, d1=end_day)
    net = conn.scalar("SELECT coalesce(sum(cost), 0) - coalesce(sum(credit), 0) FROM ("
                      + " UNION ALL ".join(parts) + ") AS spend", params)
    rwhere = "" if cluster is None else " AND r.cluster = :cluster"
    held = conn.scalar(
        "SELECT coalesce(sum(CASE WHEN r.est_cost > coalesce(p.paid, 0) "
        "THEN r.est_cost - coalesce(p.paid, 0) ELSE 0 END), 0) "
        "FROM reservations r LEFT JOIN (SELECT u.rid, sum(u.cost - u.credit) AS paid "
        "FROM runs u JOIN reservations q ON q.rid = u.rid "
        "WHERE q.team = :team AND q.state IN ('reserved', 'bound') AND u.cost IS NOT NULL "
        "GROUP BY u.rid) p ON p.rid = r.rid "
        "WHERE r.team = :team AND r.state IN ('reserved', 'bound')" + rwhere,
        {"team": team, "cluster": cluster})
    return float(net or 0.0), float(held or 0.0)
