"""A team's budget when several daemons decide against one ledger (PostgreSQL).

Each daemon keeps the team figures in memory (policies/ledger.py) so a decision reads two
numbers. With a second daemon writing reservations too, those numbers can go stale between
its decisions, so a decision on a shared ledger, inside its one transaction:

1. ``lock_team``: counts up the team's row of ``team_versions`` (scope, team) with an
   upsert. The row lock that takes is the team's budget lock: a second daemon deciding for
   the same team waits there until the first commits its reservation; other teams do not
   wait. The version it returns says whether any other daemon reserved for the team since
   this daemon's last decision for it: it is this daemon's last version plus one exactly
   when none did.
2. only when another daemon did (or this one has no figures of its own yet):
   ``team_standing`` reads the team's net spend in the period and what its live
   reservations still hold, as committed now (the other daemon's reservation included).
3. decides, and writes the reservation before the commit releases the lock.

What a daemon may miss between reads is only what lowers a team's use (a settlement of
less than was reserved, a credit, a release): the in-memory figures are then too high,
never too low, until the next refresh (every reconcile round) reads them all again.

On SQLite one daemon writes the file, and the transaction's ``BEGIN IMMEDIATE`` already
serialises every writer: ``lock_team`` does nothing there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from db.store import Store

def scope_of(cluster: str | None) -> str:
    """The ``team_versions`` scope of a budget: the cluster's name, or '*' for a budget
    across clusters."""
    return "*" if cluster is None else cluster


def lock_team(store: Store, team: str, cluster: str | None, *,
              relax_commit: bool = False) -> int | None:
    """Take the budget lock of ``team`` (in ``cluster``, or across clusters for None) until
    the transaction ends, and return the team's new version (None on SQLite, where the
    file's write lock serialises decisions). Must run inside ``store.transaction()``.
    ``relax_commit``: in the same round trip, the transaction's commit stops waiting for
    the server's disk (see ``relax_commit``)."""
    if store.dialect != "postgresql":
        return None
    if not store.conn.in_transaction:
        raise RuntimeError("lock_team must run inside a transaction")
    if relax_commit:  # one statement: the setting, then the team's row
        sql = ("WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) "
               "INSERT INTO team_versions (scope, team, version) "
               "SELECT :scope, :team, 1 FROM relaxed ON CONFLICT (scope, team) "
               "DO UPDATE SET version = team_versions.version + 1 RETURNING version")
    else:
        sql = ("INSERT INTO team_versions (scope, team, version) VALUES (:scope, :team, 1) "
               "ON CONFLICT (scope, team) DO UPDATE SET version = team_versions.version + 1 "
               "RETURNING version")
    return int(store.conn.scalar(sql, {"scope": scope_of(cluster), "team": team}))


def relax_commit(store: Store) -> None:
    """This transaction's commit does not wait for the server's disk (PostgreSQL's
    ``synchronous_commit = off`` for this transaction only): the decision path's choice
    (``[daemon] decision_synchronous_commit``). Nothing on SQLite (WAL with
    ``synchronous=NORMAL`` makes the same trade for every commit)."""
    if store.dialect == "postgresql":
        store.conn.execute("SET LOCAL synchronous_commit = off")


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
