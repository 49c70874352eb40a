"""The alert scan: decide what to send (new events past the cursor, budget thresholds
crossed), record it once, deliver it with bounded timeouts, retry with backoff, give up loudly.

One thread (started by slurm_plugin/daemon/alerting.py) runs ``run``: every
``alerts.scan_seconds`` a ``round`` = ``scan`` (decide) + ``deliver``. Every store call is one
short transaction under the daemon's lock; no network wait ever holds it, so a dead mail relay
or a webhook answering 500 costs the submit path nothing.

Exactly once, also across restarts: an alert is decided in the same transaction as its
deliveries and the events cursor (db/alert_log.py), under a unique key (budget:
``budget_threshold:<cluster>:<team>:<period>:<threshold>``; events:
``<kind>:<cluster>:event:<id>``). A delivery's attempt is counted in the database before the
network is touched; the only way one goes out twice is a crash between the relay (or the
webhook) accepting it and the next commit, a few milliseconds, and then the second copy
carries the same Message-ID and ``dedupe_key``.

Crossing several budget thresholds at once (a big run settling) sends ONE alert naming the
highest; the lower ones are recorded as answered by it and never sent on their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from db.alert_log import AlertLog, NewAlert
from policies.alerts import EVENT_KINDS, Webhook
from policies.config import Policy
from slurm_plugin.alerts import SendError
from slurm_plugin.alerts.check import config_problems
from slurm_plugin.alerts.kinds import budget_content, event_content, make_alert
from slurm_plugin.alerts.mail import Mail, send_mail
from slurm_plugin.alerts.webhook import post

EVENTS_CURSOR = "events"
MAX_BACKOFF_S = 3600.0
EVENT_BATCH = 500
SENDS_PER_ROUND = 100
TICK_S = 1.0
"""How often the alert thread looks for a reloaded policy."""


@dataclass(frozen=True)
class BudgetSnapshot:
    """Spend (settled, after credits) and reservations by team in the current period."""

    period: str
    spent: Mapping[str, float]
    reserved: Mapping[str, float]


SpendSource = Callable[[float], BudgetSnapshot]


def budget_key(cluster: str, team: str, period: str, threshold: float) -> str:
    return f"budget_threshold:{cluster}:{team}:{period}:{threshold:g}"


def backoff(retry_seconds: float, attempt: int) -> float:
    """Wait after failed attempt number ``attempt`` (1, 2, ...): doubling, at most an hour."""
    return min(MAX_BACKOFF_S, max(1.0, retry_seconds) * 2.0 ** max(0, attempt - 1))


def _noop(*_: Any) -> None:
    return None


class Dispatcher:
    """Decides, records and delivers alerts over one store (see the module doc)."""

    def __init__(self, log: AlertLog, policy: Callable[[], Policy], spend: SpendSource, *,
                 write_log: Callable[..., None], lock: threading.RLock | None = None,
                 on_send: Callable[[str, str, str], None] = _noop,
                 on_error: Callable[[str], None] = _noop,
                 leading: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.time) -> None:
        self.log = log
        self.policy = policy
        self.spend = spend
        self.write_log = write_log
        self.lock = lock or threading.RLock()
        self.on_send = on_send
        self.on_error = on_error
        self.leading = leading
        """Whether this daemon sends (db/leader.py): with two daemons on one ledger only the
        leader scans and sends; the other's rounds wait until it leads."""
        self.clock = clock
        self._checked: Policy | None = None
        self._enabled: bool | None = None
        """Whether the last round found alerts on (None: no round yet)."""

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stopping: threading.Event) -> None:
        """Rounds until ``stopping`` is set; an error costs one round, never the thread.

        A round every ``alerts.scan_seconds``, and at once (within ``TICK_S``) after every
        policy reload: turning alerts on, or shortening scan_seconds, takes effect without
        waiting out the old interval (alerts off still means the default 30 s)."""
        seen: Policy | None = None
        next_round = 0.0
        while not stopping.is_set():
            policy = self.policy()
            if policy is not seen:
                seen, next_round = policy, 0.0
            if time.monotonic() >= next_round and self.leading():
                self.round()
                next_round = time.monotonic() + max(TICK_S, policy.alerts.scan_seconds)
            if stopping.wait(TICK_S):
                break

    def round(self) -> dict[str, int]:
        """One scan and one delivery pass; never raises. Returns counts for tests and logs."""
        out: dict[str, int] = {}
        policy = self.policy()
        if not policy.alerts.enabled:
            if self._enabled is not False:
                self.write_log("alerts_off")
            self._enabled = False
            return out
        steps: list[tuple[str, Callable[[Policy], dict[str, int] | None]]] = [
            ("check", self.check_config), ("scan", self.scan), ("deliver", self.deliver)]
        if self._enabled is False:  # turned on by a reload: what happened while off is past
            steps.insert(0, ("cursor", self.restart_cursor))
        self._enabled = True
        for name, step in steps:
            try:
                out.update(step(policy) or {})
            except Exception as exc:  # logged; the next round tries again
                self.on_error("alerts")
                self.write_log("alerts_error", step=name, error=repr(exc))
        return out

    def restart_cursor(self, policy: Policy) -> dict[str, int]:
        """Move the events cursor to the newest event: alerts were turned off and on again
        in this daemon, and the events of the time in between are not alerted late."""
        now = self.clock()
        with self.lock:
            top = self.log.last_event_id()
            self.log.set_cursor(EVENTS_CURSOR, top, now=now)
        self.write_log("alerts_cursor_started", event_id=top, reason="alerts turned on")
        return {}

    def check_config(self, policy: Policy) -> dict[str, int]:
        """Log every problem of the [alerts] section once per policy (at start and after each
        reload), the SMTP relay's reachability included; alerting runs on without the broken
        part."""
        if policy is self._checked:
            return {}
        self._checked = policy
        found = config_problems(policy, connect=True,
                                timeout=min(5.0, policy.alerts.send_timeout_s))
        for field, problem in found:
            self.write_log("alerts_config_problem", field=field, problem=problem)
        return {"config_problems": len(found)}

    # -- deciding ---------------------------------------------------------------------------

    def scan(self, policy: Policy) -> dict[str, int]:
        now = self.clock()
        return {"event_alerts": self.scan_events(policy, now),
                "budget_alerts": self.scan_budgets(policy, now)}

    def _record(self, policy: Policy, alerts: list[NewAlert], now: float,
                cursor: tuple[str, int] | None = None) -> int:
        dry = policy.alerts.dry_run
        with self.lock:
            made = self.log.record(alerts, now=now, dry_run=dry, cursor=cursor)
        for a in alerts:
            if a.dedupe_key not in made:
                continue
            self.write_log("alert_decided", kind=a.kind, key=a.dedupe_key, team=a.team,
                           job_id=a.job_id, node=a.node, subject=a.subject,
                           sends=[s.channel for s in a.sends], dry_run=dry or None)
            for s in a.sends if dry else ():
                self.on_send(a.kind, _channel_type(s.channel), "dry_run")
                self.write_log("alert_dry_run", kind=a.kind, key=a.dedupe_key,
                               channel=s.channel, target=s.target, subject=a.subject)
        return len(made)

    def _unreachable(self, kind: str, key: str, missing: list[str]) -> None:
        if missing:
            self.write_log("alert_no_address", kind=kind, key=key, users=missing,
                           fix="set alerts.mail_domain or alerts.addresses.<user>")

    def scan_events(self, policy: Policy, now: float) -> int:
        """Alerts for the events logged since the cursor. The first scan ever starts at the
        newest event: enabling alerts does not mail the history."""
        with self.lock:
            cursor = self.log.cursor(EVENTS_CURSOR)
            if cursor is None:
                top = self.log.last_event_id()
                self.log.set_cursor(EVENTS_CURSOR, top, now=now)
        if cursor is None:
            self.write_log("alerts_cursor_started", event_id=top)
            return 0
        max_age = policy.alerts.event_max_age_hours * 3600.0
        decided = skipped = 0
        for _ in range(20):  # bounded per round; the rest waits for the next one
            with self.lock:
                rows, top = self.log.events_after(cursor, EVENT_KINDS, EVENT_BATCH)
            if top <= cursor:
                break
            alerts: list[NewAlert] = []
            for ev in rows:
                if max_age > 0 and (ev["ts"] or 0.0) < now - max_age:
                    skipped += 1
                    continue
                alert = self.event_alert(policy, ev, now)
                if alert is not None:
                    alerts.append(alert)
            decided += self._record(policy, alerts, now, cursor=(EVENTS_CURSOR, top))
            cursor = top
        if skipped:
            self.write_log("alerts_events_passed_over", events=skipped,
                           older_than_hours=policy.alerts.event_max_age_hours)
        return decided

    def event_alert(self, policy: Policy, ev: dict[str, Any], now: float) -> NewAlert | None:
        kind = EVENT_KINDS.get(ev["kind"])
        if kind is None:
            return None
        user, team = ev.get("user"), ev.get("team")
        job_id = ev.get("job_id") if isinstance(ev.get("job_id"), int) else None
        if (not user or not team) and job_id is not None:
            with self.lock:
                owner, owner_team = self.log.job_owner(ev.get("cluster"), job_id)
            user, team = user or owner, team or owner_team
        cluster = ev.get("cluster") or policy.daemon.cluster
        key = f"{kind}:{cluster}:event:{ev['id']}"
        content = event_content(policy, kind, ev, user=user, team=team)
        alert, missing = make_alert(policy, kind, key, content, ts=now, team=team, user=user,
                                    job_id=job_id, node=ev.get("node"), event_id=ev["id"])
        self._unreachable(kind, key, missing)
        return alert

    def scan_budgets(self, policy: Policy, now: float) -> int:
        """One alert per team whose spend passed thresholds not alerted yet this period."""
        thresholds = policy.alerts.thresholds()
        if not thresholds:
            return 0
        snap = self.spend(now)
        cluster = policy.daemon.cluster
        crossed: dict[str, list[float]] = {}
        for team, cfg in policy.teams.items():
            if cfg.budget <= 0:
                continue
            pct = snap.spent.get(team, 0.0) / cfg.budget * 100.0
            passed = [t for t in thresholds if pct >= t - 1e-9]
            if passed:
                crossed[team] = passed
        if not crossed:
            return 0
        keys = {(team, t): budget_key(cluster, team, snap.period, t)
                for team, ts in crossed.items() for t in ts}
        with self.lock:
            done = self.log.decided(keys.values())
        alerts: list[NewAlert] = []
        for team, passed in crossed.items():
            new = [t for t in passed if keys[(team, t)] not in done]
            if not new:
                continue
            top, lower = new[-1], new[:-1]
            key = keys[(team, top)]
            content = budget_content(policy, team=team, period=snap.period, threshold=top,
                                     covered=lower, spent=snap.spent.get(team, 0.0),
                                     reserved=snap.reserved.get(team, 0.0),
                                     budget=policy.teams[team].budget)
            alert, missing = make_alert(policy, "budget_threshold", key, content, ts=now,
                                        team=team, covers=tuple(keys[(team, t)] for t in lower))
            self._unreachable("budget_threshold", key, missing)
            alerts.append(alert)
        return self._record(policy, alerts, now) if alerts else 0

    # -- delivering -------------------------------------------------------------------------

    def deliver(self, policy: Policy) -> dict[str, int]:
        """Try every due delivery once. A channel that cannot be reached is not tried again in
        the same round (its other deliveries wait, uncounted, for the next one)."""
        a = policy.alerts
        if a.dry_run:
            return {}
        with self.lock:
            due = self.log.due_sends(self.clock(), SENDS_PER_ROUND)
        counts = {"sent": 0, "retry": 0, "failed": 0, "dropped": 0}
        down: set[str] = set()
        hooks = {f"webhook:{h.ident()}": h for h in a.usable_webhooks()}
        for s in due:
            channel = s["channel"]
            if channel in down:
                continue
            hook = hooks.get(channel)
            if (channel == "mail" and not a.smtp_host) or (channel != "mail" and hook is None):
                why = ("alerts.smtp_host is no longer set" if channel == "mail"
                       else f"{channel} is no longer in the policy (or is unusable)")
                with self.lock:
                    self.log.drop(s["id"], why, now=self.clock())
                self.on_send(s["kind"], _channel_type(channel), "dropped")
                self.write_log("alert_dropped", kind=s["kind"], key=s["dedupe_key"],
                               reason=why)
                counts["dropped"] += 1
                continue
            with self.lock:
                attempt = self.log.start_attempt(s["id"], now=self.clock())
            if attempt is None:  # claimed by another daemon on the ledger, or settled meanwhile
                continue
            error, connection = self._send(policy, s, hook)
            if connection:
                down.add(channel)
            counts[self._finish(policy, s, attempt, error)] += 1
        return {k: v for k, v in counts.items() if v}

    def _send(self, policy: Policy, s: dict[str, Any],
              hook: Webhook | None) -> tuple[str | None, bool]:
        """(error or None, whether the channel was unreachable)."""
        a, p = policy.alerts, s["payload"]
        timeout = a.send_timeout_s if a.send_timeout_s > 0 else 10.0
        try:
            if hook is None:
                to = [x for x in p.get("to", []) if isinstance(x, str)]
                refused = send_mail(a, Mail(to, str(p.get("subject", "")),
                                            str(p.get("body", "")), s["dedupe_key"],
                                            s["kind"]), timeout=timeout)
                if refused:
                    self.write_log("alert_recipients_refused", key=s["dedupe_key"],
                                   refused=refused)
            else:
                post(hook, p, timeout=timeout)
        except SendError as exc:
            return str(exc)[:1000], exc.connection
        except Exception as exc:  # a bug must not take the thread; it is logged per attempt
            return f"internal error: {exc!r}"[:1000], False
        return None, False

    def _finish(self, policy: Policy, s: dict[str, Any], attempt: int,
                error: str | None) -> str:
        a = policy.alerts
        now = self.clock()
        kind, channel, key = s["kind"], s["channel"], s["dedupe_key"]
        kind_of_channel = _channel_type(channel)
        if error is None:
            with self.lock:
                self.log.finish_attempt(s["id"], attempt, now=now, error=None, state="sent")
            self.on_send(kind, kind_of_channel, "sent")
            self.write_log("alert_sent", kind=kind, key=key, channel=channel,
                           target=s["target"], attempt=attempt)
            return "sent"
        if attempt >= max(1, a.max_attempts):
            with self.lock:
                self.log.finish_attempt(s["id"], attempt, now=now, error=error, state="failed")
                self.log.store.add_event(
                    "alert_failed", ts=now, cluster=policy.daemon.cluster, actor="slurmgate",
                    message=f"{kind} alert via {channel} to {s['target']} given up after "
                            f"{attempt} attempts: {error}"[:2000],
                    detail={"key": key, "channel": channel, "attempts": attempt,
                            "error": error})
            self.on_send(kind, kind_of_channel, "failed")
            self.write_log("alert_gave_up", kind=kind, key=key, channel=channel,
                           target=s["target"], attempts=attempt, error=error)
            return "failed"
        retry_at = now + backoff(a.retry_seconds, attempt)
        with self.lock:
            self.log.finish_attempt(s["id"], attempt, now=now, error=error, state="pending",
                                    next_attempt_at=retry_at)
        self.on_send(kind, kind_of_channel, "error")
        self.write_log("alert_send_failed", kind=kind, key=key, channel=channel,
                       attempt=attempt, retry_in_s=round(retry_at - now, 1), error=error)
        return "retry"


def _channel_type(channel: str) -> str:
    return "mail" if channel == "mail" else "webhook"


def store_spend(store: Any, policy: Callable[[], Policy],
                lock: threading.RLock | None = None) -> SpendSource:
    """Spend per team of the current period read from the store (the daemon passes its
    in-memory ledger instead; this serves a dispatcher without a daemon)."""
    from policies.ledger import period_bounds

    guard = lock or threading.RLock()

    def spend(now: float) -> BudgetSnapshot:
        start, end, label = period_bounds(policy().budgets.period, now)
        with guard:
            spent = store.spend_by_team(start, end)
        return BudgetSnapshot(label, spent, {})

    return spend
