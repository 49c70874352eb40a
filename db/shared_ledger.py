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
    settled cost less credits of runs that ended in the period, and what its live
    reservations hold less what their already-settled runs were charged (never below zero
    each); ``cluster`` None: every cluster's (a global budget).

    These are ``db.reports.team_figures`` for one team: the definition ``quota_rows`` (the
    daemon's in-memory ledger, `slurmgate quota`) reads too, so a decision on a shared
    ledger and the quota view never count differently. Two statements, both filtered by
    team (the runs' (team, end_ts) index, the daily team rollup, the live-reservations
    index): this runs inside the team's lock."""
    from db.reports import team_figures

    row = team_figures(store, period_start_ts, period_end_ts, team=team,
                       cluster=cluster).get(team)
    if row is None:
        return 0.0, 0.0
    return float(row["net"]), float(row["reserved"])
