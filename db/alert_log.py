"""The alert send log: what was decided once, what was delivered, every attempt and its error.

``record`` writes an alert (unique ``dedupe_key``), its deliveries (one per channel, each with
its own unique key) and, for event-driven alerts, the scan's cursor past those events, in ONE
transaction: an alert is decided exactly once, also across daemon restarts, and a restart
neither resends nor skips an event. Delivery then works through ``due_sends``,
``start_attempt`` (committed before the network is touched) and ``finish_attempt``.

Only the daemon writes (schema v7, db/schema.py); readers (CLI, TUI) use ``sends``/``alerts``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from db.backend import split_in
from db.store import Store

SEND_STATES = ("pending", "sent", "failed", "dry_run", "dropped")
"""pending: waiting for its next attempt; sent; failed: given up after max_attempts;
dry_run: decided while alerts.dry_run was on (never sent later); dropped: its channel left
the policy before it could be delivered."""


@dataclass(frozen=True)
class NewSend:
    channel: str
    """"mail" or "webhook:<ident>" (policies.alerts.Webhook.ident)."""
    target: str
    """Who it goes to, for people reading the log: the addresses, or the webhook's name and
    host (never a URL's path or query, which may hold a secret)."""
    payload: dict[str, Any]
    """What the sender needs: the mail's to/subject/body, or the webhook's JSON body."""


@dataclass(frozen=True)
class NewAlert:
    dedupe_key: str
    kind: str
    subject: str
    body: str
    ts: float
    cluster: str | None = None
    team: str | None = None
    user: str | None = None
    job_id: int | None = None
    node: str | None = None
    event_id: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    sends: tuple[NewSend, ...] = ()
    covers: tuple[str, ...] = ()
    """Dedupe keys this alert answers too (lower budget thresholds crossed at the same time):
    recorded as decided, pointing at this alert, with no deliveries of their own."""


class AlertLog:
    """Named reads and writes of the send log, over the daemon's store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- deciding ---------------------------------------------------------------------------

    def decided(self, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` that an alert was decided for already."""
        wanted = list(dict.fromkeys(keys))
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            marks, params = split_in("key", wanted[i:i + 500])
            rows = self.store._query(
                f"SELECT dedupe_key FROM alerts WHERE dedupe_key IN ({marks})", params)
            found.update(r["dedupe_key"] for r in rows)
        return found

    def record(self, alerts: Sequence[NewAlert], *, now: float, dry_run: bool = False,
               cursor: tuple[str, int] | None = None) -> dict[str, int]:
        """Decide ``alerts`` (and move ``cursor``, (name, event id), with them) in one
        transaction. An alert whose key is decided already is left alone, with its sends.
        Returns dedupe key -> alert id of those recorded now.

        A key decided already (by this daemon earlier, or by another daemon on the same
        PostgreSQL ledger a moment ago) is passed over by ``ON CONFLICT DO NOTHING``: no
        statement fails, so the transaction (on PostgreSQL a failed statement aborts it) always
        goes on to the next alert and the cursor."""
        state = "dry_run" if dry_run else "pending"
        made: dict[str, int] = {}
        with self.store.transaction():
            conn = self.store.conn
            for a in alerts:
                who = {"kind": a.kind, "ts": a.ts, "cluster": a.cluster, "team": a.team,
                       "user": a.user, "job_id": a.job_id, "node": a.node,
                       "event_id": a.event_id}
                row = conn.execute(
                    'INSERT INTO alerts (dedupe_key, kind, ts, cluster, team, "user", job_id, '
                    "node, event_id, subject, body, detail) VALUES (:key, :kind, :ts, "
                    ":cluster, :team, :user, :job_id, :node, :event_id, :subject, :body, "
                    ":detail) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
                    {"key": a.dedupe_key, **who, "subject": a.subject, "body": a.body,
                     "detail": json.dumps(a.detail, sort_keys=True, default=str)}).fetchall()
                if not row:  # decided already: its sends are left alone
                    continue
                alert_id = int(row[0][0])
                made[a.dedupe_key] = alert_id
                for key in a.covers:
                    conn.execute(
                        'INSERT INTO alerts (dedupe_key, kind, ts, cluster, team, "user", '
                        "job_id, node, event_id, covered_by, subject, body, detail) VALUES "
                        "(:key, :kind, :ts, :cluster, :team, :user, :job_id, :node, "
                        ":event_id, :covered_by, :subject, '', '{}') "
                        "ON CONFLICT (dedupe_key) DO NOTHING",
                        {"key": key, **who, "covered_by": alert_id,
                         "subject": f"answered by {a.dedupe_key}"})
                for s in a.sends:
                    conn.execute(
                        "INSERT INTO alert_sends (alert_id, channel, target, dedupe_key, "
                        "payload, state, attempts, next_attempt_at, created_at, updated_at) "
                        "VALUES (:alert_id, :channel, :target, :key, :payload, :state, 0, "
                        ":now, :now, :now) ON CONFLICT (dedupe_key) DO NOTHING",
                        {"alert_id": alert_id, "channel": s.channel, "target": s.target,
                         "key": f"{a.dedupe_key}/{s.channel}",
                         "payload": json.dumps(s.payload, sort_keys=True, default=str),
                         "state": state, "now": now})
            if cursor is not None:
                self._set_cursor(*cursor, now=now)
        return made

    # -- the events cursor ------------------------------------------------------------------

    def cursor(self, name: str) -> int | None:
        """Last event id the scan called ``name`` has handled; None before its first scan."""
        rows = self.store._query("SELECT event_id FROM alert_cursors WHERE name = :name",
                                 {"name": name})
        return int(rows[0]["event_id"]) if rows else None

    def set_cursor(self, name: str, event_id: int, *, now: float) -> None:
        with self.store.transaction():
            self._set_cursor(name, event_id, now=now)

    def _set_cursor(self, name: str, event_id: int, *, now: float) -> None:
        # never backwards: the upsert keeps the higher id (on PostgreSQL under the row's lock,
        # so a slower writer cannot move it back either)
        self.store.conn.execute(
            "INSERT INTO alert_cursors (name, event_id, updated_at) "
            "VALUES (:name, :event_id, :now) ON CONFLICT (name) DO UPDATE SET "
            "event_id = CASE WHEN excluded.event_id > alert_cursors.event_id "
            "THEN excluded.event_id ELSE alert_cursors.event_id END, "
            "updated_at = excluded.updated_at",
            {"name": name, "event_id": int(event_id), "now": now})

    def last_event_id(self) -> int:
        rows = self.store._query("SELECT coalesce(max(id), 0) AS id FROM events")
        return int(rows[0]["id"])

    def events_after(self, event_id: int, kinds: Iterable[str],
                     limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        """(events of ``kinds`` with id > ``event_id``, oldest first, at most ``limit``; the
        highest event id looked at, of any kind). The second value is where the cursor may
        move to: events of other kinds in between are passed over with them."""
        kinds = tuple(kinds)
        top = self.store._query(
            "SELECT coalesce(max(id), :after) AS id FROM (SELECT id FROM events "
            "WHERE id > :after ORDER BY id LIMIT :n) AS e",
            {"after": int(event_id), "n": limit * 10})[0]["id"]
        if not kinds:
            return [], int(top)
        marks, params = split_in("kind", kinds)
        rows = self.store._query(
            'SELECT id, ts, kind, cluster, job_id, restart_count, team, "user", node, actor, '
            f"message, detail FROM events WHERE id > :after AND id <= :top AND kind IN "
            f"({marks}) ORDER BY id LIMIT :n",
            {"after": int(event_id), "top": int(top), "n": limit, **params})
        if len(rows) == limit:
            top = rows[-1]["id"]
        return rows, int(top)

    def job_owner(self, cluster: str | None, job_id: int) -> tuple[str | None, str | None]:
        """(user, team) of a job: its newest reservation or run, whichever began later (after
        the job id counter wraps, an old job's runs must not name a new job's owner)."""
        # "= :cluster" (or IS NULL), not IS NOT DISTINCT FROM: PostgreSQL uses no index for it
        where = "cluster IS NULL" if cluster is None else "cluster = :cluster"
        params = {"cluster": cluster, "job_id": job_id}
        runs = self.store._query(
            'SELECT "user", team, coalesce(start_ts, submit_ts, end_ts, 0) AS at FROM runs '
            f"WHERE {where} AND job_id = :job_id ORDER BY at DESC LIMIT 1", params)
        resv = self.store._query(
            f'SELECT "user", team, created_at AS at FROM reservations WHERE {where} '
            "AND job_id = :job_id ORDER BY created_at DESC LIMIT 1", params)
        rows = sorted(runs + resv, key=lambda r: r["at"] or 0.0, reverse=True)
        return (rows[0]["user"], rows[0]["team"]) if rows else (None, None)

    # -- delivering -------------------------------------------------------------------------

    def due_sends(self, now: float, limit: int = 100) -> list[dict[str, Any]]:
        """Pending deliveries whose next attempt is due, oldest first, with their alert's
        kind and key: id, alert_id, channel, target, dedupe_key, payload (decoded), attempts,
        kind, alert_key."""
        rows = self.store._query(
            "SELECT s.id, s.alert_id, s.channel, s.target, s.dedupe_key, s.payload, s.attempts,"
            " a.kind, a.dedupe_key AS alert_key FROM alert_sends s JOIN alerts a "
            "ON a.id = s.alert_id WHERE s.state = 'pending' AND s.next_attempt_at <= :now "
            "ORDER BY s.next_attempt_at, s.id LIMIT :n", {"now": now, "n": limit})
        for r in rows:
            try:
                r["payload"] = json.loads(r["payload"])
            except ValueError:
                r["payload"] = {}
        return rows

    CLAIM_S = 300.0
    """How long a started attempt holds its delivery: no other daemon (nor this one) starts
    it again until the attempt is finished or this long has passed (the daemon died mid-send:
    the delivery is tried again then)."""

    def start_attempt(self, send_id: int, *, now: float) -> int | None:
        """Claim a due delivery and count an attempt before it is made (committed first: a
        crash during the send still counts it). Returns its number, or None when the
        delivery is not due any more (another daemon on the same ledger claimed it, or it
        is no longer pending): then nothing is sent."""
        with self.store.transaction():
            rows = self.store.conn.execute(
                "UPDATE alert_sends SET attempts = attempts + 1, updated_at = :now, "
                "next_attempt_at = :claim WHERE id = :id AND state = 'pending' "
                "AND next_attempt_at <= :now RETURNING attempts",
                {"now": now, "claim": now + self.CLAIM_S, "id": send_id}).fetchall()
            if not rows:
                return None
            attempt = int(rows[0][0])
            # a row of this number left by an earlier try is started afresh (as REPLACE did)
            self.store.conn.execute(
                "INSERT INTO alert_attempts (send_id, attempt, started_at) "
                "VALUES (:id, :attempt, :now) ON CONFLICT (send_id, attempt) DO UPDATE SET "
                "started_at = excluded.started_at, finished_at = NULL, ok = NULL, "
                "error = NULL", {"id": send_id, "attempt": attempt, "now": now})
        return attempt

    def finish_attempt(self, send_id: int, attempt: int, *, now: float, error: str | None,
                       state: str, next_attempt_at: float | None = None) -> None:
        """The outcome of an attempt: ``error`` None for success; ``state`` what the
        delivery is now (pending with ``next_attempt_at`` for a retry)."""
        if state not in SEND_STATES:
            raise ValueError(f"a delivery's state is one of {', '.join(SEND_STATES)}")
        with self.store.transaction():
            self.store.conn.execute(
                "UPDATE alert_attempts SET finished_at = :now, ok = :ok, error = :error "
                "WHERE send_id = :id AND attempt = :attempt",
                {"now": now, "ok": int(error is None), "error": error, "id": send_id,
                 "attempt": attempt})
            self.store.conn.execute(
                "UPDATE alert_sends SET state = :state, last_error = :error, "
                "updated_at = :now, next_attempt_at = coalesce(:next, next_attempt_at), "
                "sent_at = coalesce(:sent_at, sent_at) WHERE id = :id",
                {"state": state, "error": error, "now": now, "next": next_attempt_at,
                 "sent_at": now if state == "sent" else None, "id": send_id})

    def drop(self, send_id: int, reason: str, *, now: float) -> None:
        """A delivery whose channel is gone from the policy: kept, never tried again."""
        with self.store.transaction():
            self.store.conn.execute(
                "UPDATE alert_sends SET state = 'dropped', last_error = :reason, "
                "updated_at = :now WHERE id = :id AND state = 'pending'",
                {"reason": reason, "now": now, "id": send_id})

    # -- reading ----------------------------------------------------------------------------

    def alerts(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Decided alerts, oldest first (of ``kind`` when given), detail decoded."""
        where, params = ("WHERE kind = :kind", {"kind": kind}) if kind else ("", {})
        rows = self.store._query(f"SELECT * FROM alerts {where} ORDER BY id", params)
        for r in rows:
            try:
                r["detail"] = json.loads(r["detail"] or "{}")
            except ValueError:
                r["detail"] = {}
        return rows

    def sends(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Deliveries, oldest first, with their alert's kind and key and every attempt
        (``tries``: attempt, ok, error)."""
        where, params = ("WHERE a.kind = :kind", {"kind": kind}) if kind else ("", {})
        rows = self.store._query(
            "SELECT s.*, a.kind, a.dedupe_key AS alert_key, a.team, a.job_id FROM alert_sends s "
            f"JOIN alerts a ON a.id = s.alert_id {where} ORDER BY s.id", params)
        tries: dict[int, list[dict[str, Any]]] = {}
        if rows:
            for t in self.store._query(
                    "SELECT send_id, attempt, ok, error FROM alert_attempts "
                    "WHERE send_id >= :first ORDER BY attempt",
                    {"first": min(r["id"] for r in rows)}):
                tries.setdefault(t["send_id"], []).append(t)
        for r in rows:
            r["tries"] = tries.get(r["id"], [])
        return rows
