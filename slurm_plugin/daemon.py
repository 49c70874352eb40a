"""The slurmgate policy daemon: decisions for job_submit.lua, the single writer of SQLite.

Threads: one per connection (slurmctld keeps one open; CLI calls and hook nudges come and go),
plus background workers added by later stages (spool ingest, reconcile). Shared state is the
current policy (swapped whole on SIGHUP) and the store, which is guarded by one lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TextIO

from policies.config import Policy, PolicyError, load_policy
from policies.decision import ApprovalGrant, Decision, SubmitDecision, decide
from policies.fairshare import decayed_usage, factors
from policies.ledger import Ledger, period_bounds, team_budget
from policies.request import JobRequest
from policies.tags import parse_admin_comment
from slurm_plugin.metrics import Metrics, MetricsError, MetricsServer, spool_backlog
from slurm_plugin.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    Peer,
    ProtocolError,
    decode,
    encode,
    peer_of,
)


class EventLog:
    """Structured log: one JSON object per line (ts, event, fields)."""

    def __init__(self, path: str = "") -> None:
        self._lock = threading.Lock()
        # kept open for the daemon's lifetime: one append-only structured log
        self._out: TextIO = (open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
                             if path else sys.stderr)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 6), "event": event, **fields}, default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


class LockedStore:
    """The store seen through the daemon's lock, one call at a time, for work that also waits
    on Slurm (failure handling) and so must not hold the lock across those waits."""

    def __init__(self, store: Any, lock: threading.RLock) -> None:
        self._store, self._lock = store, lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


class Forbidden(Exception):
    """The peer may not ask for this."""


class Daemon:
    def __init__(self, config_path: str, policy: Policy, store: Any = None,
                 slurm: Any = None) -> None:
        self.config_path = config_path
        self.policy = policy
        self.log = EventLog(policy.daemon.log_file)
        self.lock = threading.RLock()
        """Guards the store (one SQLite connection), the ledger and the fairshare factors."""
        self.store = store
        self.slurm = slurm
        self.ledger = Ledger()
        self.fairshare: dict[str, float] = {}
        self.started = time.time()
        self.decisions = 0
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self.ingest_wakeup = threading.Event()
        self.missing_since: dict[str, float] = {}
        self.last_bind_read = 0.0
        self.failures = None
        if store is not None and slurm is not None:
            from slurm_plugin.requeue import FailureHandler

            self.failures = FailureHandler(LockedStore(store, self.lock), slurm,
                                           lambda: self.policy, self.log.write)
        self.handlers: dict[str, Callable[[dict[str, Any], Peer], dict[str, Any]]] = {
            "ping": self.op_ping,
            "submit": self.op_submit,
            "estimate": self.op_estimate,
            "quota": self.op_quota,
            "approve": self.op_approve,
            "approvals": self.op_approvals,
            "nudge": self.op_nudge,
            "action": self.op_action,
            "reconcile": self.op_reconcile,
        }

    # -- peers ------------------------------------------------------------------------------

    def is_controller(self, peer: Peer) -> bool:
        """SlurmUser or root: the only peers allowed to ask for decisions and send events."""
        return peer.uid == 0 or peer.uid == uid_of(self.policy.daemon.slurm_user)

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid == 0 or user_name(peer.uid) in self.policy.daemon.admins

    def require_controller(self, peer: Peer, op: str) -> None:
        if not self.is_controller(peer):
            raise Forbidden(
                f"'{op}' is accepted only from root or the SlurmUser "
                f"({self.policy.daemon.slurm_user}); you are {user_name(peer.uid)}"
            )

    # -- policy reload ----------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the policy file again; keep the current policy when the new one is invalid."""
        try:
            new = load_policy(self.config_path)
        except PolicyError as exc:
            self.log.write("policy_reload_failed", path=self.config_path, error=str(exc),
                           kept="previous policy")
            self.metrics.policy_reload(False)
            return False
        with self.lock:
            self.policy = new
        self.metrics.policy_reload(True)
        self.log.write("policy_reloaded", path=self.config_path, teams=len(new.teams))
        return True

    # -- requests ---------------------------------------------------------------------------

    def handle(self, line: bytes, peer: Peer) -> dict[str, Any]:
        """Answer one request line; the request's "id", if any, is echoed back."""
        try:
            req = decode(line)
        except ProtocolError as exc:
            self.log.write("bad_request", uid=peer.uid, error=str(exc))
            return {"ok": False, "error": str(exc)}
        resp = self._dispatch(req, peer)
        if "id" in req:
            resp["id"] = req["id"]
        return resp

    def _dispatch(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        handler = self.handlers.get(req["op"])
        if handler is None:
            return {"ok": False, "error": f"unknown op {req['op']!r}"}
        try:
            return handler(req, peer)
        except ProtocolError as exc:
            self.log.write("bad_request", uid=peer.uid, op=req["op"], error=str(exc))
            return {"ok": False, "error": str(exc)}
        except Forbidden as exc:
            self.log.write("forbidden", uid=peer.uid, user=user_name(peer.uid), op=req["op"],
                           error=str(exc))
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # never let one request take the daemon down
            self.metrics.error("request")
            self.log.write("internal_error", uid=peer.uid, op=req["op"], error=repr(exc))
            return {"ok": False, "error": f"internal error in slurmgate daemon: {exc!r}"}

    def op_ping(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "uptime": time.time() - self.started,
                "decisions": self.decisions, "you": user_name(peer.uid)}

    def op_submit(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.require_controller(peer, "submit")
        t0 = time.perf_counter()
        raw = req.get("job")
        if not isinstance(raw, dict):
            raise ProtocolError("submit needs a 'job' object")
        job = JobRequest.from_wire(raw)
        with self.lock:
            policy = self.policy
            decision = self.decide(job, policy)
            self.record(job, decision, policy)
        self.decisions += 1
        latency_ms = (time.perf_counter() - t0) * 1000
        self.metrics.decision(decision.verdict, latency_ms / 1000)
        self.log.write(
            "decision", job_name=job.name, user=job.user, uid=job.uid, account=job.account,
            team=decision.team, verdict=decision.verdict, reason=decision.reason,
            tags=decision.tags, est_cost=decision.estimate.amount if decision.estimate else None,
            set=decision.set_fields, latency_ms=round(latency_ms, 3),
        )
        return self.submit_response(decision)

    def decide(self, job: JobRequest, policy: Policy) -> SubmitDecision:
        """Decide under self.lock, against the current ledger (nothing is written here)."""
        now = time.time()
        self.roll_period(policy, now)
        rid = "r" + secrets.token_hex(8)
        team = policy.team_for(job.account, job.user)
        return decide(job, policy, rid=rid, ledger=self.ledger,
                      fairshare=self.fairshare.get(team or "", 1.0),
                      approval=self.approval_grant(job), now=now)

    def approval_grant(self, job: JobRequest) -> ApprovalGrant | None:
        from policies.tags import parse_tags

        ref = parse_tags(job.comment)[0].get("approval") if job.comment else None
        if not ref or self.store is None:
            return None
        rows = self.store.query("SELECT * FROM approvals WHERE id = ?", (ref,))
        if not rows:
            return None
        a = rows[0]
        left = (a["amount"] - a["used"]) if a["amount"] is not None else None
        left_h = (a["gpu_hours"] - a["used"]) if a["amount"] is None else None
        return ApprovalGrant(a["id"], a["team"], left, left_h, a["expires_at"], bool(a["revoked"]))

    def record(self, job: JobRequest, d: SubmitDecision, policy: Policy) -> None:
        """Persist an accepted job's reservation (and approval use) or a rejection event."""
        if self.store is None:
            return
        if d.verdict == "reject":
            self.store.add_event("reject", cluster=policy.daemon.cluster, team=d.team,
                                 user=job.user, message="\n".join(d.lines)[:2000],
                                 detail={"reason": d.reason[:500], "job_name": job.name,
                                         "account": job.account})
            return
        est = d.estimate
        if est is None:
            return
        rid = d.rid
        _, _, period = period_bounds(policy.budgets.period, time.time())
        team = d.team or ""
        self.store.add_reservation({
            "rid": rid, "cluster": policy.daemon.cluster, "team": team,
            "project": d.tags.get("project"),
            "cost_center": d.tags.get("cost_center") or policy.teams[team].cost_center or None,
            "user": job.user, "account": job.account,
            "partition": str(d.set_fields.get("partition") or est.partition),
            "tags": d.tags, "gpu_type": est.gpu_type, "gpus": est.gpus, "cpus": est.cpus,
            "mem_mb": est.mem_mb, "time_limit_min": job.time_limit,
            "tasks": est.tasks_reserved, "est_cost": d.reserve, "approval_id": d.approval_id,
            "period": period,
        })
        self.ledger.reserve(rid, team, d.reserve)
        if d.approval_id and d.approval:
            grant = d.approval
            amount = d.reserve if grant.remaining_amount is not None else d.gpu_hours
            self.store.use_approval(d.approval_id, amount, cluster=policy.daemon.cluster,
                                    user=job.user, rid=rid)

    @staticmethod
    def submit_response(decision: Decision) -> dict[str, Any]:
        return {"ok": True, "verdict": decision.verdict, "msg": decision.message,
                "set": decision.set_fields}

    # -- researcher and admin requests ------------------------------------------------------

    def op_estimate(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Dry run of a submission; the user is who is asking, not who the request names."""
        raw = req.get("job")
        if not isinstance(raw, dict):
            raise ProtocolError("estimate needs a 'job' object")
        raw = dict(raw)
        if not self.is_controller(peer) or not raw.get("user"):
            raw["user"] = user_name(peer.uid)
        job = JobRequest.from_wire(raw)
        with self.lock:
            d = self.decide(job, self.policy)
        est = d.estimate
        return {"ok": True, "verdict": d.verdict, "team": d.team, "msg": d.message,
                "reason": d.reason, "set": {k: v for k, v in d.set_fields.items()
                                            if k != "admin_comment"},
                "est_cost": est.amount if est else None,
                "gpu_type": est.gpu_type if est else None, "gpus": est.gpus if est else None,
                "hours": est.hours if est else None}

    def visible_teams(self, peer: Peer) -> list[str]:
        if self.is_admin(peer):
            return sorted(self.policy.teams)
        return self.policy.teams_of_user(user_name(peer.uid))

    def op_quota(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        wanted = req.get("team")
        visible = self.visible_teams(peer)
        if wanted is not None:
            if not isinstance(wanted, str) or wanted not in self.policy.teams:
                return {"ok": False, "error": f"unknown team {wanted!r}; teams you can see: "
                        f"{', '.join(visible) or 'none'}"}
            if wanted not in visible:
                raise Forbidden(f"you ({user_name(peer.uid)}) are not a member or lead of team "
                                f"{wanted}; teams you can see: {', '.join(visible) or 'none'}")
            visible = [wanted]
        with self.lock:
            policy = self.policy
            self.roll_period(policy, time.time())
            rows = []
            for team in visible:
                b = team_budget(policy, self.ledger, team)
                rows.append({
                    "team": team, "budget": b.budget, "spent": round(b.spent, 6),
                    "reserved": round(b.reserved, 6), "remaining": round(b.remaining, 6),
                    "soft_limit": b.soft, "hard_limit": b.hard,
                    "fairshare": round(self.fairshare.get(team, 1.0), 6),
                    "share": policy.teams[team].share,
                })
        return {"ok": True, "period": self.ledger.period, "currency": policy.rates.currency,
                "mode": policy.budgets.mode, "teams": rows}

    def op_approve(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        if not self.is_admin(peer):
            raise Forbidden(f"only slurmgate admins may approve; you are {user_name(peer.uid)} "
                            "(admins are listed in [daemon] admins)")
        team = req.get("team")
        if team not in self.policy.teams:
            return {"ok": False, "error": f"unknown team {team!r}"}
        amount, hours = req.get("amount"), req.get("gpu_hours")
        if (amount is None) == (hours is None):
            return {"ok": False, "error": "give exactly one of --amount or --gpu-hours"}
        value = amount if amount is not None else hours
        if not isinstance(value, int | float) or not value > 0:
            return {"ok": False, "error": "the approved amount must be a positive number"}
        expires = req.get("expires_at")
        if not isinstance(expires, int | float) or expires <= time.time():
            return {"ok": False, "error": "expires must be in the future"}
        reason = str(req.get("reason") or "")[:500]
        if not reason:
            return {"ok": False, "error": "an approval needs a --reason"}
        with self.lock:
            aid = self.store.add_approval(team=team, expires_at=float(expires),
                                          amount=amount, gpu_hours=hours, reason=reason,
                                          created_by=user_name(peer.uid))
        self.log.write("approval", id=aid, team=team, amount=amount, gpu_hours=hours,
                       by=user_name(peer.uid))
        return {"ok": True, "id": aid}

    def op_approvals(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        visible = set(self.visible_teams(peer))
        with self.lock:
            rows = self.store.approvals(active_only=not req.get("all"))
        return {"ok": True, "approvals": [r for r in rows if r["team"] in visible]}

    JOB_ACTIONS = ("hold", "release", "requeue", "cancel")
    NODE_ACTIONS = ("drain", "resume")

    def op_action(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """An admin's action on a job or node, done through the Slurm client and audited."""
        who = user_name(peer.uid)
        if not self.is_admin(peer):
            raise Forbidden(f"only slurmgate admins may act on jobs and nodes; you are {who}")
        if self.slurm is None:
            return {"ok": False, "error": "the daemon has no Slurm client configured"}
        action = req.get("action")
        reason = str(req.get("reason") or f"by {who} via slurmgate")[:200]
        if action in self.JOB_ACTIONS:
            job_id = req.get("job_id")
            if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id <= 0:
                return {"ok": False, "error": "job_id must be a positive integer"}
            target = {"job_id": job_id}
            do = (lambda: self.slurm.hold(job_id, reason)) if action == "hold" else (
                lambda: getattr(self.slurm, action)(job_id))
        elif action in self.NODE_ACTIONS:
            node = req.get("node")
            if not isinstance(node, str) or not node.replace("-", "").replace("_", "").isalnum():
                return {"ok": False, "error": "node must be a node name"}
            target = {"node": node}
            do = (lambda: self.slurm.drain(node, f"slurmgate: {reason}")) if action == "drain" \
                else (lambda: self.slurm.resume(node))
        else:
            return {"ok": False, "error": f"unknown action {action!r}; one of "
                    f"{', '.join(self.JOB_ACTIONS + self.NODE_ACTIONS)}"}
        try:
            do()
        except Exception as exc:  # Slurm said no: tell the admin why, in Slurm's words
            self.log.write("admin_action_failed", action=action, by=who, error=str(exc),
                           **target)
            return {"ok": False, "error": f"{action} failed: {exc}"}
        with self.lock:
            self.store.add_event("admin_action", cluster=self.policy.daemon.cluster, actor=who,
                                 message=f"{action} {target}: {reason}", detail=target | {
                                     "action": action}, **target)
        self.log.write("admin_action", action=action, by=who, **target)
        return {"ok": True}

    def op_reconcile(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        if not self.is_admin(peer):
            raise Forbidden(f"only slurmgate admins may reconcile; you are {user_name(peer.uid)}")
        self.ingest_wakeup.set()
        return {"ok": True, "result": self.reconcile_once()}

    def op_nudge(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.require_controller(peer, "nudge")
        self.ingest_wakeup.set()
        return {"ok": True}

    # -- ledger -----------------------------------------------------------------------------

    def roll_period(self, policy: Policy, now: float) -> None:
        if self.ledger.period != period_bounds(policy.budgets.period, now)[2]:
            self.refresh_ledger(policy, now)

    def refresh_ledger(self, policy: Policy | None = None, now: float | None = None) -> None:
        """Rebuild spend, reservations and fairshare from SQLite (caller may hold the lock)."""
        if self.store is None:
            return
        from db.reports import quota_rows

        policy = policy or self.policy
        now = time.time() if now is None else now
        start, end, label = period_bounds(policy.budgets.period, now)
        with self.lock:
            ledger = Ledger(period=label)
            rows = quota_rows(self.store, start, end)
            for row in rows:
                team = row["team"] or ""
                ledger.spent[team] = row["net"]
                ledger.reserved[team] = row["reserved"]
            self.metrics.set_reservations(sum(r["reservations"] for r in rows),
                                          sum(ledger.reserved.values()))
            for team, cfg in policy.teams.items():
                self.metrics.set_budget_used(team, ledger.spent.get(team, 0.0), cfg.budget)
            half_life = policy.fairshare.half_life_hours
            since = now - 10 * half_life * 3600
            usage = decayed_usage(self.store.team_usage_gpu_hours(since), now, half_life)
            self.fairshare = factors(policy, usage)
            self.ledger = ledger

    # -- background work --------------------------------------------------------------------

    def ingest_once(self, limit: int = 1000) -> int:
        """Move one batch from the spool into SQLite; returns how many records were handled."""
        from db.ingest import ingest_records
        from slurm_plugin import spool

        spool_dir = self.policy.daemon.spool_dir
        items = spool.claim_batch(spool_dir, limit)
        if not items:
            return 0
        good = [i for i in items if i.error is None and i.record is not None]
        for item in items:
            if item.error is not None or item.record is None:
                self.quarantine(item, item.error or "unreadable")
        self.bind_before_settling([i.record for i in good])
        written = [i.record["written_at"] for i in good
                   if isinstance(i.record.get("written_at"), int | float)]
        if written:
            self.metrics.ingest_lag(time.time() - min(written))
        with self.lock:
            result = ingest_records(self.store, [i.record for i in good], self.policy)
            failed = {id(rec) for rec, _ in result.errors}
            for rec, reason in result.errors:
                item = next(i for i in good if i.record is rec)
                self.quarantine(item, reason)
            spool.remove([i for i in good if id(i.record) not in failed])
            if result.settled or result.runs_touched:
                self.refresh_ledger()
        self.metrics.ingested(len(items), errors=len(result.errors))
        self.log.write("ingested", records=len(items), counts=result.counts,
                       settled=len(result.settled), errors=len(result.errors))
        if self.failures is not None:
            try:
                self.failures.handle([i.record for i in good if id(i.record) not in failed])
            except Exception as exc:  # the records are committed; log and carry on
                self.log.write("failure_handling_error", error=repr(exc))
        return len(items)

    def bind_before_settling(self, records: list[dict[str, Any]]) -> None:
        """A job that ends before the reconcile loop bound its reservation would be settled
        without its team's tags and request (and re-settled later): bind first, with one
        queue read at most every 5 s."""
        if self.slurm is None or self.store is None:
            return
        ids = {r["job_id"] for r in records if r.get("kind") == "jobcomp"
               and isinstance(r.get("job_id"), int)}
        if not ids or time.monotonic() - self.last_bind_read < 5.0:
            return
        with self.lock:
            marks = ",".join("?" * len(ids))
            bound = {row["job_id"] for row in self.store.query(
                f"SELECT job_id FROM reservations WHERE job_id IN ({marks})", tuple(ids))}
        if ids - bound:
            self.last_bind_read = time.monotonic()
            try:
                self.reconcile_once()
            except Exception as exc:
                self.log.write("reconcile_error", error=repr(exc))

    def quarantine(self, item: Any, reason: str) -> None:
        from slurm_plugin import spool

        spool.quarantine(self.policy.daemon.spool_dir, item, reason)
        self.metrics.quarantined()
        self.log.write("quarantined", file=str(item.path), reason=reason)
        if self.store is not None:
            with self.lock:
                self.store.add_event("quarantine", message=f"{item.path.name}: {reason}"[:2000])

    def ingest_loop(self) -> None:
        while not self.stopping.is_set():
            self.ingest_wakeup.wait(2.0)
            self.ingest_wakeup.clear()
            try:
                while self.ingest_once() >= 1000:
                    pass
            except Exception as exc:  # keep the records; try again on the next round
                self.metrics.error("ingest")
                self.log.write("ingest_error", error=repr(exc))
                self.stopping.wait(5.0)

    def reconcile_once(self) -> dict[str, int]:
        """Bind reservations to job ids and release those whose jobs vanished."""
        if self.slurm is None or self.store is None:
            return {}
        jobs = self.slurm.jobs()
        now = time.time()
        if self.failures is not None:
            self.failures.note_recoveries(jobs)
        seen: dict[str, int] = {}
        for j in jobs:
            rid = parse_admin_comment(j.admin_comment).get("rid")
            if rid:
                seen.setdefault(rid, j.array_job_id or j.job_id)
        grace = max(120.0, 3 * self.policy.daemon.reconcile_seconds)
        bound = released = 0
        with self.lock:
            live = self.store.live_reservations()
        policy = self.policy
        # one short lock per change, so submissions are decided in between
        for r in live:
            rid = r["rid"]
            if rid in seen:
                self.missing_since.pop(rid, None)
                if r["job_id"] is None:
                    with self.lock:
                        self.store.bind_reservation(rid, seen[rid], policy.daemon.cluster,
                                                    policy=policy)
                    bound += 1
                continue
            first = self.missing_since.setdefault(rid, now)
            if now - max(first, r["created_at"]) < grace:
                continue
            why = ("job never appeared in Slurm's queue (rejected later or submission "
                   "failed)" if r["job_id"] is None else
                   "job left Slurm's queue without a completion record")
            with self.lock:
                self.store.finish_reservation(rid, "released", why)
            self.missing_since.pop(rid, None)
            released += 1
        if bound or released:
            self.refresh_ledger()
        if bound or released:
            self.log.write("reconciled", bound=bound, released=released, jobs=len(jobs))
        return {"bound": bound, "released": released}

    def reconcile_loop(self) -> None:
        while not self.stopping.wait(self.policy.daemon.reconcile_seconds):
            try:
                self.reconcile_once()
            except Exception as exc:
                self.metrics.error("reconcile")
                self.log.write("reconcile_error", error=repr(exc))


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        peer = peer_of(sock)
        reader = sock.makefile("rb")
        daemon = self.server.daemon
        while True:
            try:
                line = reader.readline(MAX_LINE + 1)
            except OSError:
                return
            if not line:
                return
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                # Skip the rest of the line (bounded), answer, and carry on with the next one.
                skipped = len(line)
                while skipped < 64 * MAX_LINE:
                    rest = reader.readline(MAX_LINE)
                    skipped += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                resp = {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
                if not self._send(sock, resp) or skipped >= 64 * MAX_LINE:
                    return
                continue
            resp = daemon.handle(line, peer)
            if not self._send(sock, resp):
                return

    @staticmethod
    def _send(sock: socket.socket, resp: dict[str, Any]) -> bool:
        try:
            sock.sendall(encode({"v": PROTOCOL_VERSION, **resp}))
            return True
        except OSError:
            return False


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    daemon: Daemon


def serve(config_path: str) -> int:
    try:
        policy = load_policy(config_path)
    except PolicyError as exc:
        print(f"slurmgate daemon: {exc}", file=sys.stderr)
        return 2
    from db.store import StoreError, open_store

    try:
        os.makedirs(os.path.dirname(policy.daemon.database) or ".", exist_ok=True)
        store = open_store(policy.daemon.database)
    except (StoreError, OSError) as exc:
        print(f"slurmgate daemon: {exc}", file=sys.stderr)
        return 2
    slurm = None
    try:
        from slurm_plugin.slurm_client import open_client

        slurm = open_client(policy)
    except Exception as exc:  # the daemon still decides; reconcile waits for Slurm
        print(f"slurmgate daemon: no Slurm client ({exc}); reconcile disabled", file=sys.stderr)
    daemon = Daemon(config_path, policy, store, slurm)
    daemon.refresh_ledger()
    os.makedirs(policy.daemon.spool_dir, exist_ok=True)
    path = policy.daemon.socket
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        # A live daemon answers; a stale socket from a crash is removed.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            print(f"slurmgate daemon: another daemon is listening on {path}", file=sys.stderr)
            return 1
        except OSError:
            os.unlink(path)
        finally:
            probe.close()
    old_umask = os.umask(0o111)
    try:
        server = _Server(path, _Handler)
    finally:
        os.umask(old_umask)
    # Anyone may connect; what a peer may ask is decided per request from SO_PEERCRED.
    os.chmod(path, 0o666)
    server.daemon = daemon

    signal.signal(signal.SIGHUP, lambda *_: daemon.reload())

    def _stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    daemon.metrics.on_scrape(lambda: daemon.metrics.set_spool_backlog(
        spool_backlog(daemon.policy.daemon.spool_dir)))
    metrics_server = None
    try:
        metrics_server = MetricsServer.from_policy(policy, daemon.metrics)
        if metrics_server:
            metrics_server.start()
    except MetricsError as exc:
        daemon.log.write("metrics_disabled", error=str(exc))
    daemon.log.write("daemon_started", pid=os.getpid(), socket=path, config=config_path)
    for target in (daemon.ingest_loop, daemon.reconcile_loop):
        threading.Thread(target=target, daemon=True, name=target.__name__).start()
    daemon.ingest_wakeup.set()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        daemon.stopping.set()
        if metrics_server:
            metrics_server.stop()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        daemon.log.write("daemon_stopped", pid=os.getpid())
    return 0
