"""The accounting store: the ledger, on SQLite (one file, one writer: the daemon, many
readers) or on PostgreSQL (one server, a daemon on every controller host); db/backend.py.

``open_store(target)`` opens the writer and applies migrations; ``target`` is a file path
(SQLite: WAL, ``synchronous=NORMAL``, every connection waits up to 5 s on a lock) or a
``postgresql://`` URL. ``open_store(target, readonly=True)`` opens a reader (CLI, TUI,
exports): it never migrates and cannot write (SQLite ``mode=ro`` + ``query_only``, a
PostgreSQL session whose transactions are read-only).

Write several things atomically with ``with store.transaction(): ...`` (SQLite:
``BEGIN IMMEDIATE``, PostgreSQL: ``BEGIN``; nested calls become savepoints, so a write that
fails inside one, such as a duplicate reservation, undoes only itself). Outside a transaction
every statement commits on its own. Every statement here is written once for both servers
(named ``:parameters``, db/backend.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.backend import (
    Connection,
    SQLiteConnection,
    connect_postgresql,
    database_errors,
    driver_errors,
    is_postgresql,
    redact,
    split_in,
)
from db.ingest import resettle_runs
from db.rollups import apply_rollup_delta
from db.schema import LATEST_VERSION, current_version, migrate
from policies import settlement

if TYPE_CHECKING:
    from policies.config import Policy

BUSY_TIMEOUT_MS = 5000
RESERVATION_STATES = ("reserved", "bound", "settled", "released")
LIVE_STATES = ("reserved", "bound")

_RESERVATION_FIELDS = (
    "rid", "cluster", "job_id", "team", "project", "cost_center", "user", "account",
    "partition", "tags", "gpu_type", "gpus", "cpus", "mem_mb", "time_limit_min", "tasks",
    "est_cost", "approval_id", "state", "period", "created_at", "updated_at", "reason",
)
_EVENT_FIELDS = (
    "ts", "cluster", "job_id", "restart_count", "team", "user", "node", "actor", "message",
    "detail",
)


class StoreError(RuntimeError):
    """The store cannot be opened or used as asked; the message says what to do."""


DatabaseError = database_errors()
"""The servers' own errors (locked, corrupt, I/O, connection lost), named here so that code
outside db can catch them without importing a driver (only db runs SQL). A flat tuple:
``except DatabaseError`` alone, or ``except (StoreError, *DatabaseError)`` with others
(Python refuses a tuple nested in an except tuple)."""


def _decode_tags(row: dict[str, Any]) -> dict[str, Any]:
    tags = row.get("tags")
    if isinstance(tags, str):
        try:
            row["tags"] = json.loads(tags)
        except ValueError:
            row["tags"] = {}
    elif tags is None:
        row["tags"] = {}
    return row


class Store:
    """The daemon's operations over one ledger connection (``.conn``, db/backend.py)."""

    def __init__(self, conn: Connection, *, path: str, readonly: bool) -> None:
        self.conn = conn
        self.path = path
        self.readonly = readonly

    @property
    def dialect(self) -> str:
        return self.conn.dialect

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return current_version(self.conn)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Store]:
        """One write transaction; nested use becomes a savepoint."""
        if self.readonly:
            raise StoreError(f"{redact(self.path)}: opened read-only; only the daemon writes")
        with self.conn.transaction():
            yield self

    def _query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        """Rows of one SQL statement (named ``:parameters``) as dicts. Private to db: code
        outside db asks the store for what it needs by name (the import-linter contract
        "only db runs SQL")."""
        return self.conn.query(sql, params)

    # -- reservations -----------------------------------------------------------------------

    def add_reservation(self, reservation: dict[str, Any], *, now: float | None = None) -> str:
        """Record a reservation made at submit; returns its rid (generated when absent).

        ``tags`` may be a dict (stored as JSON). ``state`` defaults to 'bound' when a job id is
        given, else 'reserved'. Raises ValueError for unknown fields, a missing cluster or a
        rid that exists already.
        """
        unknown = set(reservation) - set(_RESERVATION_FIELDS)
        if unknown:
            raise ValueError(f"unknown reservation field(s): {', '.join(sorted(unknown))}")
        row = dict(reservation)
        if not row.get("cluster"):
            raise ValueError("a reservation needs its cluster")
        ts = time.time() if now is None else now
        row.setdefault("rid", uuid.uuid4().hex)
        row.setdefault("state", "bound" if row.get("job_id") is not None else "reserved")
        if row["state"] not in RESERVATION_STATES:
            raise ValueError(f"reservation state must be one of {', '.join(RESERVATION_STATES)}")
        row.setdefault("created_at", ts)
        row.setdefault("updated_at", ts)
        row["tags"] = json.dumps(row.get("tags") or {}, sort_keys=True)
        for key in ("gpus", "est_cost"):
            if row.get(key) is None:
                row[key] = 0.0
        if self.readonly:
            raise StoreError(f"{redact(self.path)}: opened read-only; only the daemon writes")
        # one statement, no savepoint: on the decision path every round trip counts, and a
        # rid taken already is answered by ON CONFLICT, not by an error that would abort a
        # PostgreSQL transaction around it
        try:
            added = self.conn.execute(
                _insert_sql("reservations", tuple(row)) + " ON CONFLICT (rid) DO NOTHING "
                "RETURNING rid", row).fetchone()
        except _INTEGRITY_ERRORS as exc:
            raise ValueError(f"reservation {row['rid']} cannot be added: "
                             f"{str(exc).strip()}") from exc
        if added is None:
            raise ValueError(f"reservation {row['rid']} cannot be added: that rid exists")
        return str(row["rid"])

    def bind_reservation(self, rid: str, job_id: int, cluster: str, *,
                         policy: Policy | None = None, now: float | None = None) -> bool:
        """Attach a reservation to its Slurm job id (state 'bound').

        A short job can finish before the daemon learns its id, so runs of (cluster, job_id)
        that already arrived without a reservation are attached too; with ``policy`` they are
        re-settled with the reservation's team, tags and request. Returns False when the rid
        is unknown or already settled/released.
        """
        ts = time.time() if now is None else now
        with self.transaction():
            cur = self.conn.execute(
                "UPDATE reservations SET job_id = :job_id, cluster = :cluster, "
                "state = 'bound', updated_at = :ts "
                "WHERE rid = :rid AND state IN ('reserved', 'bound') RETURNING created_at",
                {"job_id": job_id, "cluster": cluster, "ts": ts, "rid": rid},
            )
            bound = cur.fetchone()
            if bound is None:
                return False
            created = bound[0]
            orphans = self.conn.execute(
                "SELECT restart_count FROM runs WHERE cluster = :cluster AND job_id = :job_id "
                "AND rid IS NULL AND coalesce(submit_ts, start_ts, end_ts, :created) "
                ">= :created - 60",
                {"cluster": cluster, "job_id": job_id, "created": created},
            ).fetchall()
            if orphans:
                keys = [(cluster, job_id, r[0]) for r in orphans]
                self.conn.executemany(
                    "UPDATE runs SET rid = :rid WHERE cluster = :cluster AND job_id = :job_id "
                    "AND restart_count = :restart_count",
                    [{"rid": rid, "cluster": c, "job_id": j, "restart_count": n}
                     for c, j, n in keys],
                )
                if policy is not None:
                    resettle_runs(self, keys, policy, now=ts)
        return True

    def finish_reservation(self, rid: str, state: str, reason: str | None = None, *,
                           now: float | None = None) -> bool:
        """Close a reservation ('settled' or 'released'); False when it is not live."""
        if state not in ("settled", "released"):
            raise ValueError("a reservation finishes as 'settled' or 'released'")
        ts = time.time() if now is None else now
        with self.transaction():
            cur = self.conn.execute(
                "UPDATE reservations SET state = :state, reason = :reason, updated_at = :ts "
                "WHERE rid = :rid AND state IN ('reserved', 'bound')",
                {"state": state, "reason": reason, "ts": ts, "rid": rid},
            )
        return cur.rowcount == 1

    def reprice_reservation(self, rid: str, tasks: int, est_cost: float, *,
                            now: float | None = None) -> bool:
        """A live reservation now covers ``tasks`` (array tasks at once) at ``est_cost``;
        False when it is not live. Raises ValueError for fewer than one task or a cost that
        is negative or not a number."""
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
            raise ValueError(f"a reservation covers at least one task, not {tasks!r}")
        if not isinstance(est_cost, int | float) or not 0 <= est_cost < float("inf"):
            raise ValueError(f"a reservation's cost must be a non-negative amount, "
                             f"not {est_cost!r}")
        ts = time.time() if now is None else now
        with self.transaction():
            cur = self.conn.execute(
                "UPDATE reservations SET tasks = :tasks, est_cost = :est_cost, "
                "updated_at = :ts WHERE rid = :rid AND state IN ('reserved', 'bound')",
                {"tasks": tasks, "est_cost": float(est_cost), "ts": ts, "rid": rid},
            )
        return cur.rowcount == 1

    def live_reservations(self) -> list[dict[str, Any]]:
        """Reserved and bound reservations, tags decoded, with ``charged``: the net cost of
        runs already settled against them (a requeued job keeps its reservation)."""
        rows = self._query(
            "SELECT r.*, (SELECT coalesce(sum(u.cost - u.credit), 0.0) FROM runs u "
            "WHERE u.rid = r.rid AND u.cost IS NOT NULL) AS charged "
            "FROM reservations r WHERE r.state IN ('reserved', 'bound') "
            "ORDER BY r.created_at, r.rid"
        )
        return [_decode_tags(r) for r in rows]

    def reservation(self, rid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM reservations WHERE rid = :rid", {"rid": rid})
        return _decode_tags(rows[0]) if rows else None

    def bound_job_ids(self, job_ids: Iterable[int]) -> set[int]:
        """Those of ``job_ids`` that a reservation is bound to (any cluster, any state)."""
        ids = [int(i) for i in job_ids]
        if not ids:
            return set()
        marks, params = split_in("job_id", ids)
        return {row["job_id"] for row in self._query(
            f"SELECT DISTINCT job_id FROM reservations WHERE job_id IN ({marks})", params)}

    # -- runs -------------------------------------------------------------------------------

    def run(self, cluster: str, job_id: int, restart_count: int) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT * FROM runs WHERE cluster = :cluster AND job_id = :job_id "
            "AND restart_count = :restart_count",
            {"cluster": cluster, "job_id": job_id, "restart_count": restart_count},
        )
        return rows[0] if rows else None

    def runs_of_job(self, cluster: str, job_id: int) -> list[dict[str, Any]]:
        return self._query(
            "SELECT * FROM runs WHERE cluster = :cluster AND job_id = :job_id "
            "ORDER BY restart_count", {"cluster": cluster, "job_id": job_id},
        )

    def run_nodes(self, cluster: str, job_id: int, restart_count: int) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT * FROM run_nodes WHERE cluster = :cluster AND job_id = :job_id "
            "AND restart_count = :restart_count ORDER BY node",
            {"cluster": cluster, "job_id": job_id, "restart_count": restart_count},
        )
        for r in rows:
            r["gpus"] = json.loads(r["gpus"] or "[]")
        return rows

    def unfinished_runs(self, cluster: str) -> list[dict[str, Any]]:
        """Runs of ``cluster`` without a final state (their completion record has not come):
        cluster, job_id, restart_count, start_ts, end_ts."""
        return self._query(
            "SELECT cluster, job_id, restart_count, start_ts, end_ts FROM runs "
            "WHERE cluster = :cluster AND state IS NULL", {"cluster": cluster})

    def recorded_job_ids(self, cluster: str) -> set[int]:
        """Job ids of ``cluster`` with at least one run that has its final state."""
        return {r["job_id"] for r in self._query(
            "SELECT DISTINCT job_id FROM runs WHERE cluster = :cluster "
            "AND state IS NOT NULL", {"cluster": cluster})}

    def run_count(self) -> int:
        """How many runs the store holds (every cluster, settled or not)."""
        return int(self.conn.scalar("SELECT count(*) FROM runs"))

    def credit_run(self, cluster: str, job_id: int, restart_count: int, amount: float,
                   reason: str, *, actor: str | None = None, now: float | None = None) -> bool:
        """Admin credit on a settled run (replaces its credit); logs a 'credit' event.

        The daily rollup follows. Returns False when the run does not exist or is not
        settled yet.
        """
        if amount < 0:
            raise ValueError("a credit cannot be negative")
        ts = time.time() if now is None else now
        with self.transaction():
            before = self.run(cluster, job_id, restart_count)
            if before is None or before["cost"] is None:
                return False
            self.conn.execute(
                "UPDATE runs SET credit = :credit, credit_reason = :reason, updated_at = :ts "
                "WHERE cluster = :cluster AND job_id = :job_id "
                "AND restart_count = :restart_count",
                {"credit": float(amount), "reason": reason, "ts": ts, "cluster": cluster,
                 "job_id": job_id, "restart_count": restart_count},
            )
            after = dict(before, credit=amount, credit_reason=reason)
            apply_rollup_delta(self.conn, [(before, after)])
            self.add_event("credit", ts=ts, cluster=cluster, job_id=job_id,
                           restart_count=restart_count, team=before["team"],
                           user=before["user"], actor=actor,
                           message=f"credit {amount:g}: {reason}",
                           detail={"amount": amount, "previous": before["credit"]})
        return True

    def confirm_failure_credit(self, cluster: str, job_id: int, restart_count: int, *,
                               now: float | None = None) -> float | None:
        """Credit a failed run whose failure the daemon confirmed with Slurm: a run whose
        credit is pending ("node_failure_pending", "preemption_pending": set by ingest) gets
        its whole cost credited under the confirmed reason; logs a 'credit' event and moves
        the rollup. Returns the amount credited, or None when nothing was pending (already
        confirmed, an admin's credit, not a failure, no such run). A run not settled yet keeps
        the confirmed reason and is credited when it is settled."""
        ts = time.time() if now is None else now
        with self.transaction():
            before = self.run(cluster, job_id, restart_count)
            reason = settlement.confirm_credit_reason(before["credit_reason"]) if before \
                else None
            if before is None or reason is None:
                return None
            amount = float(before["cost"] or 0.0)
            self.conn.execute(
                "UPDATE runs SET credit = :credit, credit_reason = :reason, updated_at = :ts "
                "WHERE cluster = :cluster AND job_id = :job_id "
                "AND restart_count = :restart_count",
                {"credit": float(amount), "reason": reason, "ts": ts, "cluster": cluster,
                 "job_id": job_id, "restart_count": restart_count},
            )
            after = dict(before, credit=amount, credit_reason=reason)
            apply_rollup_delta(self.conn, [(before, after)])
            self.add_event("credit", ts=ts, cluster=cluster, job_id=job_id,
                           restart_count=restart_count, team=before["team"],
                           user=before["user"], actor="slurmgate",
                           message=f"{before['state']}: run credited ({reason}; "
                                   "confirmed by Slurm)",
                           detail={"amount": amount, "reason": reason})
        return amount

    # -- events -----------------------------------------------------------------------------

    def add_event(self, kind: str, **fields: Any) -> int:
        """Append to the event log; ``detail`` may be any JSON-able value. Returns the id."""
        unknown = set(fields) - set(_EVENT_FIELDS)
        if unknown:
            raise ValueError(f"unknown event field(s): {', '.join(sorted(unknown))}")
        if not kind:
            raise ValueError("an event needs a kind")
        row = dict(fields, kind=kind)
        if row.get("ts") is None:
            row["ts"] = time.time()
        if "detail" in row and row["detail"] is not None and not isinstance(row["detail"], str):
            row["detail"] = json.dumps(row["detail"], sort_keys=True, default=str)
        with self.transaction():
            event_id = self.conn.execute(
                _insert_sql("events", tuple(row)) + " RETURNING id", row).fetchone()[0]
        return int(event_id)

    def add_events(self, events: list[dict[str, Any]]) -> int:
        """Batch insert of event dicts (each with ``kind``); returns how many."""
        rows = []
        for e in events:
            row = dict(e)
            row.setdefault("ts", time.time())
            if row.get("detail") is not None and not isinstance(row["detail"], str):
                row["detail"] = json.dumps(row["detail"], sort_keys=True, default=str)
            rows.append(row)
        cols = ("ts", "kind") + tuple(f for f in _EVENT_FIELDS if f != "ts")
        unknown = {k for r in rows for k in r} - set(cols)
        if unknown:
            raise ValueError(f"unknown event field(s): {', '.join(sorted(unknown))}")
        sql = (f"INSERT INTO events ({', '.join(_q(c) for c in cols)}) "
               f"VALUES ({', '.join(':' + c for c in cols)})")
        with self.transaction():
            self.conn.executemany(sql, [{c: r.get(c) for c in cols} for r in rows])
        return len(rows)

    def has_event(self, kind: str, cluster: str, job_id: int,
                  restart_count: int | None) -> bool:
        """Whether an event of ``kind`` was logged for this run (``restart_count`` None: for
        the job with no run number)."""
        return bool(self._query(
            "SELECT 1 FROM events WHERE kind = :kind AND cluster = :cluster "
            "AND job_id = :job_id AND restart_count IS NOT DISTINCT FROM :restart_count "
            "LIMIT 1", {"kind": kind, "cluster": cluster, "job_id": job_id,
                        "restart_count": restart_count}))

    def event_kinds(self) -> list[str]:
        """The kinds of event logged so far, in alphabetical order."""
        return [r["kind"] for r in self._query("SELECT DISTINCT kind FROM events ORDER BY kind")]

    def event_count(self, kind: str | None = None) -> int:
        """How many events are logged, of ``kind`` when one is given."""
        where, params = ("WHERE kind = :kind", {"kind": kind}) if kind else ("", {})
        return int(self.conn.scalar(f"SELECT count(*) FROM events {where}", params))

    def unrecovered_interruptions(self, since_ts: float) -> list[dict[str, Any]]:
        """'node_fail' and 'preempt' events of a job after ``since_ts`` that no 'recovered'
        event of the same run (cluster, job id, restart count) answers yet, oldest first:
        id, cluster, job_id, restart_count, kind, ts."""
        return self._query(
            "SELECT e.id, e.cluster, e.job_id, e.restart_count, e.kind, e.ts FROM events e "
            "WHERE e.kind IN ('node_fail', 'preempt') AND e.job_id IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM events r WHERE r.kind = 'recovered' AND r.job_id = e.job_id "
            "AND r.cluster = e.cluster AND r.restart_count IS NOT DISTINCT FROM "
            "e.restart_count) AND e.ts > :since_ts ORDER BY e.ts, e.id",
            {"since_ts": since_ts})

    def last_drain_ts(self, cluster: str, node: str) -> float | None:
        """When slurmgate last drained ``node`` ('drain' event), or None if it never did."""
        ts = self.conn.scalar(
            "SELECT max(ts) FROM events WHERE kind = 'drain' AND node = :node "
            "AND cluster = :cluster", {"node": node, "cluster": cluster})
        return None if ts is None else float(ts)

    def failed_runs_on_node(self, cluster: str, node: str, since_ts: float) -> int:
        """How many runs (job id, restart count) lost ``node`` ('node_fail' events) after
        ``since_ts``."""
        return int(self.conn.scalar(
            "SELECT count(*) FROM (SELECT DISTINCT job_id, restart_count FROM events "
            "WHERE kind = 'node_fail' AND node = :node AND cluster = :cluster "
            "AND ts > :since_ts) AS failed",
            {"node": node, "cluster": cluster, "since_ts": since_ts}))

    # -- training progress (figures, never money) -----------------------------------------

    PROGRESS_MAX = 10 ** 15
    """Largest epoch or step number kept (anything above is refused as not a count)."""

    def record_progress(self, cluster: str, job_id: int, restart_count: int, *,
                        uid: int | None, epoch: int | None = None, step: int | None = None,
                        now: float | None = None) -> None:
        """Progress a run reported (the daemon checked that ``uid`` owns the job): the
        highest epoch and step so far are kept. The run's base (where it resumed from) is
        taken once, at its first report: the highest any earlier run of the job reported.
        Raises ValueError for a value that is not a count in [0, PROGRESS_MAX]."""
        for name, value in (("epoch", epoch), ("step", step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= self.PROGRESS_MAX):
                raise ValueError(f"{name} must be a whole number from 0 to "
                                 f"{self.PROGRESS_MAX}, not {value!r}")
        if epoch is None and step is None:
            raise ValueError("progress needs an epoch or a step")
        ts = time.time() if now is None else now
        with self.transaction():
            self.conn.execute(
                "INSERT INTO run_progress (cluster, job_id, restart_count, uid, epoch, step, "
                "epoch_base, step_base, reports, first_ts, last_ts) "
                "SELECT :cluster, :job_id, :restart_count, :uid, :epoch, :step, "
                "coalesce(max(epoch), 0), coalesce(max(step), 0), 1, :ts, :ts "
                "FROM run_progress WHERE cluster = :cluster AND job_id = :job_id "
                "AND restart_count < :restart_count "
                # the existing row by the table's name: PostgreSQL finds a bare ``epoch``
                # ambiguous next to ``excluded.epoch``
                "ON CONFLICT (cluster, job_id, restart_count) DO UPDATE SET "
                "epoch = CASE WHEN excluded.epoch IS NULL THEN run_progress.epoch "
                "WHEN run_progress.epoch IS NULL OR excluded.epoch > run_progress.epoch "
                "THEN excluded.epoch ELSE run_progress.epoch END, "
                "step = CASE WHEN excluded.step IS NULL THEN run_progress.step "
                "WHEN run_progress.step IS NULL OR excluded.step > run_progress.step "
                "THEN excluded.step ELSE run_progress.step END, "
                "reports = run_progress.reports + 1, last_ts = excluded.last_ts",
                {"cluster": cluster, "job_id": job_id, "restart_count": restart_count,
                 "uid": uid, "epoch": epoch, "step": step, "ts": ts})

    # -- GPU samples ------------------------------------------------------------------------

    def gpu_samples(self, since_ts: float, until_ts: float) -> list[dict[str, Any]]:
        """Raw GPU samples taken in [since_ts, until_ts], oldest first: node, gpu_index,
        gpu_type, ts, util, mem_used_bytes."""
        return self._query(
            "SELECT node, gpu_index, gpu_type, ts, util, mem_used_bytes "
            "FROM gpu_samples WHERE ts >= :since_ts AND ts <= :until_ts "
            "ORDER BY ts, node, gpu_index", {"since_ts": since_ts, "until_ts": until_ts})

    # -- approvals --------------------------------------------------------------------------

    def add_approval(self, *, team: str, expires_at: float, amount: float | None = None,
                     gpu_hours: float | None = None, reason: str | None = None,
                     created_by: str | None = None, approval_id: str | None = None,
                     now: float | None = None) -> str:
        """An admin lets ``team`` go over its hard limit by ``amount`` (money) or
        ``gpu_hours``, until ``expires_at``. Logs an 'approval' event; returns the id."""
        if amount is None and gpu_hours is None:
            raise ValueError("an approval needs an amount or gpu_hours")
        ts = time.time() if now is None else now
        aid = approval_id or uuid.uuid4().hex[:12]
        with self.transaction():
            self.conn.execute(
                "INSERT INTO approvals (id, team, amount, gpu_hours, used, expires_at, reason, "
                "created_by, created_at, revoked) VALUES (:id, :team, :amount, :gpu_hours, "
                "0.0, :expires_at, :reason, :created_by, :created_at, 0)",
                {"id": aid, "team": team, "amount": amount, "gpu_hours": gpu_hours,
                 "expires_at": expires_at, "reason": reason, "created_by": created_by,
                 "created_at": ts})
            self.add_event("approval", ts=ts, team=team, actor=created_by, message=reason,
                           detail={"approval_id": aid, "amount": amount,
                                   "gpu_hours": gpu_hours, "expires_at": expires_at})
        return aid

    def use_approval(self, approval_id: str, amount: float, *, cluster: str | None = None,
                     job_id: int | None = None, user: str | None = None,
                     rid: str | None = None, now: float | None = None) -> bool:
        """Draw ``amount`` (in the approval's unit: money, else GPU-hours) from an approval.

        Atomic: False (and nothing written) when the approval is unknown, revoked, expired
        or would be overdrawn. Logs an 'approval_use' event.
        """
        ts = time.time() if now is None else now
        with self.transaction():
            cur = self.conn.execute(
                "UPDATE approvals SET used = used + :amount WHERE id = :id AND revoked = 0 "
                "AND expires_at > :ts AND used + :amount <= coalesce(amount, gpu_hours) + 1e-9 "
                "RETURNING team, used",
                {"amount": float(amount), "id": approval_id, "ts": ts},
            )
            row = cur.fetchone()
            if row is None:
                return False
            self.add_event("approval_use", ts=ts, cluster=cluster, job_id=job_id,
                           team=row[0], user=user,
                           message=f"approval {approval_id}: used {amount:g}",
                           detail={"approval_id": approval_id, "amount": amount,
                                   "used": row[1], "rid": rid})
        return True

    def revoke_approval(self, approval_id: str, *, actor: str | None = None,
                        now: float | None = None) -> bool:
        ts = time.time() if now is None else now
        with self.transaction():
            cur = self.conn.execute(
                "UPDATE approvals SET revoked = 1 WHERE id = :id AND revoked = 0 "
                "RETURNING team", {"id": approval_id},
            )
            row = cur.fetchone()
            if row is None:
                return False
            self.add_event("approval", ts=ts, team=row[0], actor=actor,
                           message=f"approval {approval_id} revoked",
                           detail={"approval_id": approval_id, "revoked": True})
        return True

    def approvals(self, active_only: bool = True, *, team: str | None = None,
                  now: float | None = None) -> list[dict[str, Any]]:
        """Approvals, newest first; ``active_only``: not revoked, not expired, not used up.
        Each row has ``remaining`` in its unit."""
        ts = time.time() if now is None else now
        where: list[str] = []
        params: dict[str, Any] = {}
        if active_only:
            where.append("revoked = 0 AND expires_at > :ts "
                         "AND used < coalesce(amount, gpu_hours) - 1e-9")
            params["ts"] = ts
        if team is not None:
            where.append("team = :team")
            params["team"] = team
        return self._query(
            "SELECT *, coalesce(amount, gpu_hours) - used AS remaining FROM approvals "
            f"{'WHERE ' + ' AND '.join(where) if where else ''} "
            "ORDER BY created_at DESC, id", params,
        )

    def approval(self, approval_id: str) -> dict[str, Any] | None:
        """One approval by id, whatever its state (revoked, expired, used up), or None."""
        rows = self._query("SELECT * FROM approvals WHERE id = :id", {"id": approval_id})
        return rows[0] if rows else None

    # -- ledger inputs ----------------------------------------------------------------------

    def spend_by_team(self, period_start_ts: float, period_end_ts: float) -> dict[str, float]:
        """Settled cost minus credits of runs that ENDED in [start, end), by team.

        Runs with no team are under ``""``. Reads the team rollup for whole UTC days and the
        runs table for the partial days at the edges (as db.reports.usage_rows does; the
        store reads the tables itself: db.reports builds on the store).
        """
        first_day = math.ceil(period_start_ts / 86400.0)
        end_day = math.floor(period_end_ts / 86400.0)
        if end_day < first_day:  # inside one day
            rows = self.conn.execute(_SPEND_ONE_DAY, {
                "start_ts": period_start_ts, "end_ts": period_end_ts}).fetchall()
        else:
            rows = self.conn.execute(_SPEND_DAYS, {
                "start_ts": period_start_ts, "first_ts": first_day * 86400.0,
                "end_day_ts": end_day * 86400.0, "end_ts": period_end_ts,
                "first_day": first_day, "end_day": end_day}).fetchall()
        return {team: float(net) for team, net in rows}

    def team_usage_gpu_hours(self, since_ts: float, *,
                             now: float | None = None) -> list[tuple[str, float, float]]:
        """(team, ts, gpu_hours) for fairshare decay: one row per team per UTC day of end time,
        from the daily rollup (the daemon asks after every settled batch, so this must not
        scan millions of runs). ``ts`` is the day's midpoint, capped at ``now``: at most 12 h
        off, under 5 % of a run's weight with a one-week half-life. The day holding
        ``since_ts`` is included whole. Runs with no team are under ``""``.

        Credited GPU time does not count: each run weighs ``1 - credit/cost`` (a
        node-failure credit removes the run)."""
        ts_now = time.time() if now is None else now
        rows = self.conn.execute(
            "SELECT team, day, sum(gpu_seconds - credited_gpu_seconds) / 3600.0 "
            "FROM usage_daily_team WHERE day >= :since_day GROUP BY team, day "
            "ORDER BY day, team", {"since_day": math.floor(since_ts / 86400.0)},
        ).fetchall()
        return [(team, min(day * 86400.0 + 43200.0, ts_now), float(hours))
                for team, day, hours in rows if hours > 1e-9]


def _q(name: str) -> str:
    return f'"{name}"'


@functools.lru_cache(maxsize=256)
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT INTO table (columns) VALUES (:column, ...)``, built once per column set (the
    decision path inserts a reservation per submit)."""
    return (f"INSERT INTO {table} ({', '.join(_q(c) for c in columns)}) "
            f"VALUES ({', '.join(':' + c for c in columns)})")


_INTEGRITY_ERRORS = driver_errors("IntegrityError")
"""A duplicate key or a failed CHECK, on either server."""

# The ledger's spend: runs that ended in the period, read from the runs table for the partial
# days at its edges and from the team rollup for the whole UTC days between them.
_SPEND_RUNS = ("SELECT coalesce(team, '') AS team, 1 AS runs, cost, credit FROM runs "
               "WHERE end_ts >= :{lo} AND end_ts < :{hi} AND cost IS NOT NULL")
_SPEND_TOTAL = ("SELECT team, coalesce(sum(cost), 0.0) - coalesce(sum(credit), 0.0) "
                "FROM ({parts}) AS spend GROUP BY team HAVING sum(runs) != 0")
_SPEND_ONE_DAY = _SPEND_TOTAL.format(parts=_SPEND_RUNS.format(lo="start_ts", hi="end_ts"))
_SPEND_DAYS = _SPEND_TOTAL.format(parts=" UNION ALL ".join((
    _SPEND_RUNS.format(lo="start_ts", hi="first_ts"),
    _SPEND_RUNS.format(lo="end_day_ts", hi="end_ts"),
    "SELECT team, runs, cost, credit FROM usage_daily_team "
    "WHERE day >= :first_day AND day < :end_day")))


def _configure(conn: sqlite3.Connection, *, writer: bool) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if writer:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    else:
        conn.execute("PRAGMA query_only = 1")


def open_store(path: str | Path, *, readonly: bool = False) -> Store:
    """Open the ledger at ``path``: a SQLite file (``":memory:"`` for tests) or a
    ``postgresql://`` URL.

    The writer creates the file (or the tables) and applies migrations. A reader never
    migrates, and refuses a missing file or a schema older than this code (the daemon
    upgrades it when it starts).
    """
    spath = str(path)
    if is_postgresql(spath):
        return _open_postgresql(spath, readonly=readonly)
    if readonly:
        if spath == ":memory:":
            raise StoreError("a read-only store needs a database file")
        p = Path(spath)
        if not p.exists():
            raise StoreError(f"{p}: no database here; is the daemon's [daemon] database set "
                             "to this path, and has the daemon started once?")
        try:
            # autocommit: a reader never holds a transaction open (and so never pins an old
            # snapshot of the WAL) between its queries
            raw = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True,
                                  check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"{p}: cannot open read-only: {exc}") from exc
        try:
            _configure(raw, writer=False)
            conn = SQLiteConnection(raw, spath)
            version = current_version(conn)
        except sqlite3.Error as exc:
            raw.close()
            raise StoreError(f"{p}: cannot open read-only: {exc}") from exc
        _refuse_older(conn, version, spath)
        return Store(conn, path=spath, readonly=True)
    try:
        with _private_umask():
            raw = sqlite3.connect(spath, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"{spath}: cannot open the database for writing: {exc}") from exc
    try:
        with _private_umask():
            _configure(raw, writer=True)
            conn = SQLiteConnection(raw, spath)
            migrate(conn)
        make_private(spath)
    except BaseException as exc:
        raw.close()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{spath}: cannot open the database for writing: {exc}") from exc
        if isinstance(exc, OSError):
            raise StoreError(f"{spath}: cannot make the database private (0640): "
                             f"{exc}") from exc
        raise
    return Store(conn, path=spath, readonly=False)


def _refuse_older(conn: Connection, version: int, target: str) -> None:
    if version < LATEST_VERSION:
        conn.close()
        raise StoreError(
            f"{redact(target)}: database schema is version {version}, this slurmgate needs "
            f"{LATEST_VERSION}; start the daemon (the only writer) once to upgrade it"
        )


def _open_postgresql(url: str, *, readonly: bool) -> Store:
    errors = database_errors()
    try:
        conn = connect_postgresql(url, readonly=readonly)
    except errors as exc:
        raise StoreError(f"{redact(url)}: cannot connect: {str(exc).strip()}") from exc
    try:
        if readonly:
            version = current_version(conn)
        else:
            migrate(conn)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, errors):
            raise StoreError(f"{redact(url)}: cannot open the ledger: "
                             f"{str(exc).strip()}") from exc
        raise
    if readonly:
        _refuse_older(conn, version, url)
    return Store(conn, path=url, readonly=readonly)


PRIVATE_UMASK = 0o027
"""Files of the store are at most 0640: the service user writes, its group reads."""


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    old = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(old)


def make_private(path: str) -> None:
    """Take group write and every 'other' bit off the database and its -wal/-shm (whatever
    the umask was when they were created). SQLite creates -wal/-shm later with the process
    umask: the daemon sets its umask to PRIVATE_UMASK as well (server.serve)."""
    if path in ("", ":memory:") or path.startswith("file:"):
        return
    for name in (path, path + "-wal", path + "-shm"):
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue
        mode = st.st_mode & 0o7777
        if mode & ~0o640:
            os.chmod(name, mode & 0o640)
