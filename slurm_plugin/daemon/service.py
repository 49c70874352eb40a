"""The slurmgate policy daemon: decisions for job_submit.lua, the single writer of SQLite.

Threads: one per connection (server.py), plus the background workers (workers.py: spool
ingest, reconcile). Shared state is the current policy (swapped whole on SIGHUP) and the store,
which is guarded by one lock. This module is the service: peers, reload, the submit path.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from policies.config import Policy, PolicyError, load_policy
from policies.decision import ApprovalGrant, Decision, SubmitDecision, decide
from policies.fairshare import decayed_usage, factors
from policies.ledger import Ledger, period_bounds, team_budget
from policies.request import JobRequest, wire_problems
from slurm_plugin.daemon.admin_ops import AdminOps
from slurm_plugin.daemon.eventlog import EventLog
from slurm_plugin.daemon.job_ops import JobOps
from slurm_plugin.daemon.peers import Forbidden, uid_of, user_name
from slurm_plugin.daemon.prometheus import Metrics
from slurm_plugin.daemon.seams import LockedStore
from slurm_plugin.daemon.workers import Workers
from slurm_plugin.protocol import (
    Peer,
    ProtocolError,
    decode,
)

if TYPE_CHECKING:
    from db.store import Store
    from slurm_plugin.slurm.client import SlurmClient


class LedgerUnavailable(RuntimeError):
    """A shared ledger could not be reached for a decision; the submission is not decided."""


class Daemon(AdminOps, Workers, JobOps):
    """The policy daemon: peers, policy reload, request dispatch, the submit path, quotas and
    the ledger; admin requests and background work live in admin_ops.py and workers.py."""

    def __init__(self, config_path: str, policy: Policy, store: Store | None = None,
                 slurm: SlurmClient | None = None) -> None:
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
        self.slurm_uid = uid_of(policy.daemon.slurm_user)
        """The SlurmUser's uid, looked up once per policy (not per request: NSS may be LDAP)."""
        self.answered: OrderedDict[tuple[int, str, str], dict[str, Any]] = OrderedDict()
        """Recent submit replies by (peer uid, request id): a resent request gets the same
        decision and no second reservation."""
        self.readers = threading.local()
        from db.leader import Leadership

        self.shared_ledger = store is not None and store.dialect == "postgresql"
        """The ledger is shared with other daemons (PostgreSQL): each decision locks its
        team's row of the budget and reads the team's standing fresh (decide_shared)."""
        self.leadership = Leadership(store.path if store is not None else "",
                                     policy.daemon.cluster, on_change=self.leader_changed)
        """Whether this daemon does the cluster's once-only work (db/leader.py)."""
        self.metrics.set_leader(self.leadership.is_leader)
        self.ledger_error = ""
        """The last shared-ledger error of a decision ("" since one succeeded)."""
        self.team_versions: dict[tuple[str, str], int] = {}
        """(scope, team) -> the team's version in the shared ledger that this daemon's
        in-memory figures are of (db/shared_ledger.py); cleared by every refresh."""
        self.failures = None
        if store is not None and slurm is not None:
            from slurm_plugin.daemon.requeue import FailureHandler

            self.failures = FailureHandler(LockedStore(store, self.lock), slurm,
                                           lambda: self.policy, self.log.write,
                                           credited=self.refresh_ledger)
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
            "job": self.op_job,
            "progress": self.op_progress,
        }

    # -- peers ------------------------------------------------------------------------------

    def is_controller(self, peer: Peer) -> bool:
        """SlurmUser or root: the only peers allowed to ask for decisions and send events."""
        return peer.uid == 0 or (self.slurm_uid is not None and peer.uid == self.slurm_uid)

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
            self.slurm_uid = uid_of(new.daemon.slurm_user)
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
        out = {"ok": True, "pid": os.getpid(), "uptime": time.time() - self.started,
               "decisions": self.decisions, "you": user_name(peer.uid),
               "unchecked_waiting": getattr(self, "unchecked_waiting", 0)}
        if self.store is not None:
            out["ledger"] = self.store.dialect
            out["leader"] = self.leadership.is_leader
            error = self.ledger_error or self.leadership.last_error
            if error:  # the server's words for admins; users learn only that it is down
                out["ledger_error"] = error if self.is_admin(peer) or \
                    self.is_controller(peer) else "unreachable"
        return out

    ANSWERED_MAX = 4096
    """Submit replies kept for resends (a few seconds of submissions at any rate)."""

    def op_submit(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """One decision per submission: the user is the authenticated submit uid, bad fields
        are a reject that names them, a resend (same id) gets the first reply, and a request
        past its deadline (the shim stopped waiting) is dropped without reserving."""
        self.require_controller(peer, "submit")
        t0 = time.perf_counter()
        raw = req.get("job")
        if not isinstance(raw, dict):
            raise ProtocolError("submit needs a 'job' object")
        # job_submit.lua's ids are unique strings, resent with the same deadline
        deadline = req.get("deadline")
        rid_key = req.get("id")
        key = (peer.uid, rid_key, repr(deadline)) if isinstance(rid_key, str) else None
        with self.lock:
            if key is not None and key in self.answered:
                self.log.write("submit_resent", id=key[1])
                return dict(self.answered[key])
            if isinstance(deadline, int | float) and not isinstance(deadline, bool) \
                    and time.time() > deadline:
                self.metrics.error("late_submit")
                self.log.write("submit_late", id=key[1] if key else None,
                               late_s=round(time.time() - deadline, 3))
                return {"ok": False, "late": True,
                        "error": "request arrived after its deadline; not decided"}
            job, decision = self.submission(raw)
            if job is not None:
                try:
                    decision = self.decide_and_record(job, origin="submit")
                except LedgerUnavailable as exc:  # no verdict: the shim's fail mode decides
                    return {"ok": False, "unavailable": True, "error": str(exc)}
            else:
                self.record_safely(None, decision, self.policy)
            resp = self.submit_response(decision)
            if key is not None:
                self.answered[key] = resp
                while len(self.answered) > self.ANSWERED_MAX:
                    self.answered.popitem(last=False)
        self.decisions += 1
        latency_ms = (time.perf_counter() - t0) * 1000
        self.metrics.decision(decision.verdict, latency_ms / 1000)
        self.log.write(
            "decision", job_name=job.name if job else None, user=job.user if job else None,
            uid=raw.get("uid") if isinstance(raw.get("uid"), int) else None,
            account=job.account if job else None, team=decision.team,
            rid=decision.rid if decision.verdict == "accept" else None,
            verdict=decision.verdict, reason=decision.reason, tags=decision.tags,
            est_cost=decision.estimate.amount if decision.estimate else None,
            set=decision.set_fields, latency_ms=round(latency_ms, 3),
        )
        return dict(resp)

    def submission(self, raw: dict[str, Any]) -> tuple[JobRequest | None, SubmitDecision]:
        """The request to decide, with its user taken from the authenticated uid; or None and
        a reject naming every field that cannot be read."""
        problems = wire_problems(raw)
        uid = raw.get("uid")
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 2 ** 32:
            problems.append("the submission carries no valid submit uid")
        if problems:
            lines = ["slurmgate: job rejected: " + p for p in problems]
            return None, SubmitDecision("reject", None, "bad input: " + "; ".join(problems),
                                        lines)
        assert isinstance(uid, int)
        return JobRequest.from_wire({**raw, "user": user_name(uid)}), \
            SubmitDecision("accept", None, "")

    def decide_and_record(self, job: JobRequest, *, origin: str) -> SubmitDecision:
        with self.lock:
            policy = self.policy
            if self.shared_ledger:
                return self.decide_shared(job, policy, origin=origin)
            decision = self.decide(job, policy)
            self.record_safely(job, decision, policy, origin=origin)
        return decision

    def decide_shared(self, job: JobRequest, policy: Policy, *, origin: str) -> SubmitDecision:
        """A decision against a ledger other daemons write too: in one transaction, the
        team's budget lock (db/shared_ledger.py), the team's spend and live reservations as
        the ledger has them now, the decision, and its reservation. Two daemons deciding for
        one team at once are serialised by the lock, so neither can spend what the other just
        reserved. A ledger that cannot be reached raises LedgerUnavailable: the submission
        gets no verdict and job_submit.lua follows its fail mode."""
        from db.shared_ledger import lock_team, relax_commit, scope_of, team_standing
        from db.store import DatabaseError

        team = policy.team_for(job.account, job.user)
        assert self.store is not None
        seen: tuple[tuple[str, str], int] | None = None
        try:
            with self.store.transaction():
                relax = not policy.daemon.decision_synchronous_commit
                now = time.time()
                self.roll_period(policy, now)
                if team:
                    start, end, period = period_bounds(policy.budgets.period, now)
                    cluster = policy.daemon.cluster if policy.budgets.scope == "cluster" \
                        else None
                    version = lock_team(self.store, team, cluster, relax_commit=relax)
                    key = (scope_of(cluster), team)
                    known = self.team_versions.pop(key, None)
                    if version is None or known is None or known != version - 1:
                        # another daemon reserved for the team since this one last did
                        net, reserved = team_standing(self.store, team, start, end,
                                                      cluster=cluster)
                        self.ledger.spent[team] = net
                        self.ledger.reserved[team] = reserved
                    if version is not None:
                        seen = (key, version)
                elif relax:
                    relax_commit(self.store)
                decision = self.decide(job, policy)
                self.record(job, decision, policy, origin=origin)
            if seen is not None:  # committed: the figures in memory are those of this version
                self.team_versions[seen[0]] = seen[1]
            self.ledger_error = ""
        except DatabaseError as exc:
            self.ledger_error = str(exc).strip()[:300]
            self.metrics.error("ledger")
            self.log.write("ledger_unavailable", op="submit", team=team,
                           error=str(exc).strip()[:300])
            raise LedgerUnavailable(f"ledger unreachable: {str(exc).strip()[:200]}") from exc
        return decision

    def decide(self, job: JobRequest, policy: Policy) -> SubmitDecision:
        """Decide under self.lock, against the current ledger (nothing is written here)."""
        now = time.time()
        self.roll_period(policy, now)
        rid = "r" + secrets.token_hex(8)
        team = policy.team_for(job.account, job.user)
        return decide(job, policy, rid=rid, ledger=self.ledger,
                      fairshare=self.fairshare.get(team or "", 1.0),
                      approval=self.approval_grant(job), now=now)

    def record_safely(self, job: JobRequest | None, d: SubmitDecision, policy: Policy,
                      origin: str = "submit") -> None:
        """Record a decision; a failure to record never changes the verdict (it is logged,
        and an accepted job's reservation is still held in the ledger)."""
        try:
            self.record(job, d, policy, origin=origin)
        except Exception as exc:
            self.metrics.error("record")
            self.log.write("record_failed", verdict=d.verdict, team=d.team, rid=d.rid,
                           origin=origin, error=repr(exc))

    def approval_grant(self, job: JobRequest, store: Store | None = None) -> ApprovalGrant | None:
        """The approval the job's tags name, read from ``store`` (default: the daemon's own,
        under the decision lock)."""
        from policies.tags import parse_tags

        ref = parse_tags(job.comment)[0].get("approval") if job.comment else None
        store = store or self.store
        if not ref or store is None:
            return None
        a = store.approval(ref)
        if a is None:
            return None
        left = (a["amount"] - a["used"]) if a["amount"] is not None else None
        left_h = (a["gpu_hours"] - a["used"]) if a["amount"] is None else None
        return ApprovalGrant(a["id"], a["team"], left, left_h, a["expires_at"], bool(a["revoked"]))

    def record(self, job: JobRequest | None, d: SubmitDecision, policy: Policy,
               origin: str = "submit") -> None:
        """Persist an accepted job's reservation (and approval use) or a rejection event."""
        if d.verdict == "reject":
            if self.store is None:
                return
            self.store.add_event("reject", cluster=policy.daemon.cluster, team=d.team,
                                 user=job.user if job else None,
                                 message="\n".join(d.lines)[:2000],
                                 detail={"reason": d.reason[:500], "origin": origin,
                                         "job_name": job.name if job else None,
                                         "account": job.account if job else None})
            return
        est = d.estimate
        if est is None or job is None:
            return
        rid = d.rid
        # the ledger first: a reservation the database failed to keep still counts now
        self.ledger.reserve(rid, d.team or "", d.reserve)
        if self.store is None:
            return
        _, _, period = period_bounds(policy.budgets.period, time.time())
        team = d.team or ""
        self.store.add_reservation({
            "rid": rid, "cluster": policy.daemon.cluster, "team": team,
            "project": d.tags.get("project"),
            "cost_center": d.tags.get("cost_center") or policy.teams[team].cost_center or None,
            "user": job.user, "account": job.account,
            "partition": str(d.set_fields.get("partition") or est.partition),
            "tags": d.tags, "gpu_type": est.gpu_type, "gpus": est.gpus, "cpus": est.cpus,
            "mem_mb": est.mem_mb,
            "time_limit_min": job.time_limit or d.set_fields.get("time_limit"),
            "tasks": est.tasks_reserved, "est_cost": d.reserve, "approval_id": d.approval_id,
            "period": period,
        })
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

    def reader(self) -> Store | None:
        """This thread's read-only connection to the database, for user requests: they read
        beside the decisions (SQLite WAL) instead of waiting for the decision lock. None for
        an in-memory store (tests); callers then read under the lock."""
        if self.store is None or self.store.path in ("", ":memory:"):
            return None
        store = getattr(self.readers, "store", None)
        if store is None:
            from db.store import StoreError, open_store

            try:
                store = open_store(self.store.path, readonly=True)
            except (StoreError, OSError):
                return None
            self.readers.store = store
        return store

    def op_estimate(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Dry run of a submission; the user is who is asking, not who the request names.
        Decided outside the decision lock, on the ledger as it stands (a user's estimate never
        delays a submission), with every field checked before any work."""
        raw = req.get("job")
        if not isinstance(raw, dict):
            raise ProtocolError("estimate needs a 'job' object")
        raw = dict(raw)
        if not self.is_controller(peer) or not raw.get("user"):
            raw["user"] = user_name(peer.uid)
        raw.pop("uid", None)
        problems = wire_problems(raw)
        if problems:
            return {"ok": True, "verdict": "reject", "team": None,
                    "msg": "\n".join("slurmgate: job rejected: " + p for p in problems),
                    "reason": "bad input: " + "; ".join(problems), "set": {},
                    "est_cost": None, "gpu_type": None, "gpus": None, "hours": None}
        job = JobRequest.from_wire(raw)
        policy = self.policy
        team = policy.team_for(job.account, job.user)
        reader = self.reader()
        if reader is not None:
            grant = self.approval_grant(job, reader)
        else:
            with self.lock:
                grant = self.approval_grant(job)
        d = decide(job, policy, rid="r-estimate", ledger=self.ledger,
                   fairshare=self.fairshare.get(team or "", 1.0), approval=grant,
                   now=time.time())
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
        """Budget, spent, reserved, remaining and fairshare per visible team, from the
        daemon's ledger: this cluster's runs and reservations (``[budgets] scope =
        "cluster"``) or every cluster's (``"global"``), as the decisions count them.
        ``cluster``: another cluster's figures (admins only, read from the ledger; a user
        may name this cluster only); refused with global budgets, which have no per-cluster
        quota."""
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
        policy = self.policy
        scope, own = policy.budgets.scope, policy.daemon.cluster
        cluster = req.get("cluster")
        if cluster is not None:
            if not isinstance(cluster, str) or not cluster.strip() or len(cluster) > 256:
                raise ProtocolError("'cluster' must be a cluster name")
            if scope == "global":
                return {"ok": False, "error": "budgets are global here ([budgets] scope = "
                        "\"global\"): each team has one budget across every cluster, so "
                        "there is no quota per cluster; ask without --cluster (per-cluster "
                        "spend: slurmgate report --cluster NAME)"}
            if cluster != own and not self.is_admin(peer):
                raise Forbidden(f"you ({user_name(peer.uid)}) may see the quotas of this "
                                f"cluster ({own}) only; ask on cluster {cluster}'s own "
                                "daemon, or an admin")
        if cluster is None or cluster == own:
            if self.ledger.period != period_bounds(policy.budgets.period, time.time())[2]:
                with self.lock:
                    self.roll_period(policy, time.time())
            ledger = self.ledger  # read beside the decisions: two dict entries per team
        else:  # another cluster's: read from the ledger, beside the decisions when we can
            from db.reports import quota_rows, unknown_cluster_message

            start, end, label = period_bounds(policy.budgets.period, time.time())

            def read(store: Store) -> Ledger | str:
                unknown = unknown_cluster_message(store, cluster)
                if unknown is not None:
                    return unknown
                found = Ledger(period=label)
                for row in quota_rows(store, start, end, cluster=cluster):
                    found.spent[row["team"] or ""] = row["net"]
                    found.reserved[row["team"] or ""] = row["reserved"]
                return found

            reader = self.reader()
            if reader is not None:
                answer = read(reader)
            elif self.store is not None:
                with self.lock:
                    answer = read(self.store)
            else:
                answer = f"this daemon has no ledger to read cluster {cluster}'s quotas from"
            if isinstance(answer, str):
                return {"ok": False, "error": answer}
            ledger = answer
        rows = []
        for team in visible:
            b = team_budget(policy, ledger, team)
            rows.append({
                "team": team, "budget": b.budget, "spent": round(b.spent, 6),
                "reserved": round(b.reserved, 6), "remaining": round(b.remaining, 6),
                "soft_limit": b.soft, "hard_limit": b.hard,
                "fairshare": round(self.fairshare.get(team, 1.0), 6),
                "share": policy.teams[team].share,
            })
        return {"ok": True, "period": ledger.period, "currency": policy.rates.currency,
                "mode": policy.budgets.mode, "scope": scope,
                "cluster": (cluster or own) if scope == "cluster" else None, "teams": rows}

    def op_nudge(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.require_controller(peer, "nudge")
        self.ingest_wakeup.set()
        return {"ok": True}

    # -- leadership -------------------------------------------------------------------------

    def leader_changed(self, leader: bool, why: str) -> None:
        """This daemon took or lost the cluster's once-only work (db/leader.py)."""
        self.metrics.set_leader(leader)
        self.log.write("leader_acquired" if leader else "leader_lost", reason=why,
                       cluster=self.policy.daemon.cluster, pid=os.getpid())
        if leader and self.store is not None:
            from db.store import DatabaseError

            try:
                with self.lock:
                    self.store.add_event("leader", cluster=self.policy.daemon.cluster,
                                         actor=socket.gethostname(),
                                         message=f"daemon pid {os.getpid()} on "
                                                 f"{socket.gethostname()} leads: {why}")
            except DatabaseError as exc:
                self.log.write("ledger_unavailable", op="leader_event", error=repr(exc))
            self.ingest_wakeup.set()

    # -- ledger -----------------------------------------------------------------------------

    def roll_period(self, policy: Policy, now: float) -> None:
        if self.ledger.period != period_bounds(policy.budgets.period, now)[2]:
            self.refresh_ledger(policy, now)

    def refresh_ledger(self, policy: Policy | None = None, now: float | None = None) -> None:
        """Rebuild spend, reservations and fairshare from the ledger (caller may hold the
        lock). Spend and reservations follow ``[budgets] scope``: this cluster's
        (``"cluster"``) or every cluster's on the ledger (``"global"``)."""
        if self.store is None:
            return
        from db.reports import quota_rows

        policy = policy or self.policy
        now = time.time() if now is None else now
        start, end, label = period_bounds(policy.budgets.period, now)
        # the budget's scope: this cluster's runs and reservations, or every cluster's (the
        # same choice decide_shared makes for team_standing)
        cluster = policy.daemon.cluster if policy.budgets.scope == "cluster" else None
        with self.lock:
            ledger = Ledger(period=label)
            rows = quota_rows(self.store, start, end, cluster=cluster)
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
            self.team_versions = {}  # fresh figures, of no known version: read at next use
