"""Researcher requests about one job: its report (op ``job``) and the training progress it
reports through the checkpoint helper (op ``progress``).

Both run beside the decision lock on the thread's read-only reader (service.reader), like
``estimate`` and ``quota``; connections.py rate-limits them per uid. A report goes to the
job's owner, its team's leads (members with ``[reports] team_members_see_team_jobs``) and
admins; anyone else gets the same answer as for a job that does not exist, so a refusal
never tells whether a job exists or whose it is. Progress is accepted only from the uid that
owns the job, for a run not settled yet; it is queued in memory and written by the ingest
loop (``flush_progress``) in one transaction, so a user's report never waits for, or holds,
the decision lock.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from policies.ledger import period_bounds, team_budget
from policies.visibility import may_read_job
from slurm_plugin.daemon.peers import user_name
from slurm_plugin.daemon.state import DaemonState
from slurm_plugin.job_report import (
    MAX_JOB_ID,
    JobSpecError,
    budget_picture,
    build_report,
    job_spec_text,
    parse_job_spec,
)
from slurm_plugin.protocol import Peer

if TYPE_CHECKING:
    from db.store import Store

PROGRESS_PENDING_MAX = 10_000
"""Runs with progress waiting for the next flush; beyond it reports are refused (busy)."""
PROGRESS_PENDING_PER_UID = 256
"""Runs one user may have waiting to be written: one user cannot fill the queue for all."""
PROGRESS_FLUSH_CHUNK = 500
"""Reports written per transaction, the decision lock let go between them."""
SLURM_LOOKUPS_PER_S = 2.0
SLURM_LOOKUP_BURST = 5.0
"""Progress for a job the ledger does not know yet asks Slurm who owns it: at most this many
asks a second (bursts of SLURM_LOOKUP_BURST) for all users together, so no user can turn the
daemon into a stream of squeue calls at slurmctld; beyond it the report is refused (busy)."""
SLURM_OWNER_TTL_S = 30.0
SLURM_OWNER_CACHE_MAX = 4096
"""Slurm's answer (owner, or none) is kept this long per job id, for this many job ids."""
PROGRESS_MAX = 10 ** 15
"""The store's bound (db.store.Store.PROGRESS_MAX; a unit test keeps them equal), checked
here so that a bad value is refused to the user at once, not dropped at the flush."""


def _job_spec(req: dict[str, Any]) -> tuple[int, int | None]:
    """(job id, array task) from a request: ``job`` as text ("123", "123_4") or ``job_id``
    (and ``array_task_id``) as integers."""
    if "job" in req:
        return parse_job_spec(req["job"])
    job_id, task = req.get("job_id"), req.get("array_task_id")
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= MAX_JOB_ID:
        raise JobSpecError(f"job_id must be a job id from 1 to {MAX_JOB_ID}")
    if task is not None and (isinstance(task, bool) or not isinstance(task, int)
                             or not 0 <= task <= MAX_JOB_ID):
        raise JobSpecError(f"array_task_id must be a task id from 0 to {MAX_JOB_ID}")
    return job_id, task


def _count(req: dict[str, Any], key: str) -> int | None:
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= PROGRESS_MAX:
        raise JobSpecError(f"{key} must be a whole number from 0 to {PROGRESS_MAX}")
    return value


class JobOps(DaemonState):
    def _progress_queue(self) -> tuple[threading.Lock, dict[tuple[str, int, int], Any]]:
        """This daemon's lock and queue of progress reports (made on first use)."""
        lock = self.__dict__.setdefault("_progress_lock", threading.Lock())
        return lock, self.__dict__.setdefault("_progress_pending", {})

    def _cluster(self, req: dict[str, Any]) -> str:
        cluster = req.get("cluster")
        if cluster is None or cluster == "":
            return self.policy.daemon.cluster
        if not isinstance(cluster, str) or len(cluster) > 64 or not cluster.isprintable():
            raise JobSpecError("cluster must be a cluster name (at most 64 characters)")
        return cluster

    def _read(self, fn: Any) -> Any:
        """``fn(store)`` on this thread's reader, beside the decisions; under the lock only
        without one (an in-memory store in tests)."""
        reader = self.reader()
        if reader is not None:
            return fn(reader)
        with self.lock:
            return fn(self.need_store())

    def op_job(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """The report of one job for someone allowed to read it (see the module docstring)."""
        try:
            job_id, task = _job_spec(req)
            cluster = self._cluster(req)
        except JobSpecError as exc:
            return {"ok": False, "error": f"slurmgate job: {exc}"}
        spec = job_spec_text(job_id, task)
        viewer = user_name(peer.uid)
        admin = self.is_admin(peer)
        policy = self.policy

        def read(store: Store) -> dict[str, Any] | None:
            return build_report(store, policy, cluster, job_id, task)

        report = self._read(read)
        j = report["job"] if report else None
        if j is None or not may_read_job(
                policy, viewer, viewer_uid=peer.uid, owner=j.get("user"),
                owner_uid=j.get("uid"), team=j.get("team"), admin=admin):
            if admin:
                return {"ok": False, "error": f"job {spec}: not found in the slurmgate ledger "
                                              f"of cluster {cluster}"}
            self.log.write("job_report_refused", uid=peer.uid, user=viewer, job=spec,
                           cluster=cluster)
            return {"ok": False, "error": f"job {spec}: not found among your jobs"
                    + ("" if policy.reports.team_members_see_team_jobs else
                       " (you see your own jobs, and your team's if you lead it)")}
        team = j.get("team")
        if team and team in policy.teams and team in self.visible_teams(peer):
            now = time.time()
            if self.ledger.period != period_bounds(policy.budgets.period, now)[2]:
                with self.lock:  # a new period: the picture is this period's, as in quota
                    self.refresh_ledger(policy, now)
            report["budget"] = budget_picture(team_budget(policy, self.ledger, team))
            report["period"] = period_bounds(policy.budgets.period, time.time())[2]
        return {"ok": True, "report": report}

    # -- progress ---------------------------------------------------------------------------

    def op_progress(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Progress of a running job, from its owner: ``job_id``, ``restart_count``,
        ``epoch`` and/or ``step``."""
        try:
            job_id, _ = _job_spec({"job_id": req.get("job_id")})
            restart = req.get("restart_count", 0)
            if isinstance(restart, bool) or not isinstance(restart, int) \
                    or not 0 <= restart <= 100_000:
                raise JobSpecError("restart_count must be a whole number from 0 to 100000")
            epoch, step = _count(req, "epoch"), _count(req, "step")
            if epoch is None and step is None:
                raise JobSpecError("progress needs an epoch or a step")
        except JobSpecError as exc:
            return {"ok": False, "error": f"slurmgate progress: {exc}"}
        cluster = self.policy.daemon.cluster
        refusal = {"ok": False, "error": f"progress for job {job_id}: not one of your running "
                                         "jobs; nothing recorded"}
        owner = self._read(lambda store: _owner(store, cluster, job_id))
        if owner is None:
            asked = self._slurm_owner(job_id)
            if asked == "busy":
                return {"ok": False, "error": "slurmgate is busy recording progress; "
                                              "try again in a few seconds"}
            owner = asked if isinstance(asked, dict) else None
        if owner is None:
            return refusal
        name = user_name(peer.uid)
        mine = (owner["uid"] == peer.uid) if owner.get("uid") is not None \
            else owner.get("user") == name
        if not mine:
            self.log.write("progress_refused", uid=peer.uid, user=name, job_id=job_id)
            return refusal
        if owner["runs"].get(restart):
            return {"ok": False, "error": f"progress for job {job_id} run {restart}: that run "
                                          "has finished and is settled; nothing recorded"}
        # the run must be the job's current one (Slurm's count), or the next after the runs
        # the ledger has: a user cannot make rows for restart counts that never ran
        current = owner.get("restart")
        newest = max(owner["runs"], default=-1)
        if (current is not None and restart != current) or \
                (current is None and restart > newest + 1):
            return {"ok": False, "error": f"progress for job {job_id}: run {restart} is not "
                                          "the job's current run; nothing recorded"}
        key = (cluster, job_id, restart)
        lock, pending = self._progress_queue()
        with lock:
            if key not in pending and (
                    len(pending) >= PROGRESS_PENDING_MAX
                    or sum(1 for e in pending.values() if e["uid"] == peer.uid)
                    >= PROGRESS_PENDING_PER_UID):
                return {"ok": False, "error": "slurmgate is busy recording progress; "
                                              "try again in a few seconds"}
            entry = pending.setdefault(key, {"uid": peer.uid, "epoch": None, "step": None})
            for k, v in (("epoch", epoch), ("step", step)):
                if v is not None and (entry[k] is None or v > entry[k]):
                    entry[k] = v
            entry["ts"] = time.time()
        return {"ok": True, "recorded": {"job_id": job_id, "restart_count": restart,
                                         "epoch": epoch, "step": step}}

    def _slurm_owner(self, job_id: int) -> dict[str, Any] | None | str:
        """The owner Slurm names for a job the ledger does not know yet (its reservation is
        bound at the next reconcile pass); None without a Slurm client or when Slurm does not
        know it either, or it has finished; "busy" when Slurm may not be asked now (the
        lookup budget, SLURM_LOOKUPS_PER_S). Answers are kept SLURM_OWNER_TTL_S per job."""
        if self.slurm is None:
            return None
        now = time.monotonic()
        lock = self.__dict__.setdefault("_owner_lock", threading.Lock())
        cache: dict[int, tuple[float, dict[str, Any] | None]] = \
            self.__dict__.setdefault("_owner_cache", {})
        with lock:
            hit = cache.get(job_id)
            if hit is not None and hit[0] > now:
                return hit[1]
            tokens, last = self.__dict__.get("_owner_tokens", (SLURM_LOOKUP_BURST, now))
            tokens = min(SLURM_LOOKUP_BURST, tokens + (now - last) * SLURM_LOOKUPS_PER_S)
            if tokens < 1.0:
                self.__dict__["_owner_tokens"] = (tokens, now)
                return "busy"
            self.__dict__["_owner_tokens"] = (tokens - 1.0, now)
        owner = self._ask_slurm_owner(job_id)
        with lock:
            if len(cache) >= SLURM_OWNER_CACHE_MAX:
                for key in [k for k, (exp, _) in cache.items() if exp <= now] or list(cache):
                    del cache[key]
            cache[job_id] = (now + SLURM_OWNER_TTL_S, owner)
        return owner

    def _ask_slurm_owner(self, job_id: int) -> dict[str, Any] | None:
        assert self.slurm is not None
        try:
            job = self.slurm.job(job_id)
        except Exception as exc:  # Slurm unreachable: the report is refused, nothing else
            self.log.write("progress_owner_lookup_failed", job_id=job_id, error=repr(exc))
            return None
        if job is None or job.finished or (job.cluster and
                                           job.cluster != self.policy.daemon.cluster):
            return None
        return {"user": job.user, "uid": job.uid, "runs": {}, "restart": job.restart_count}

    def flush_progress(self) -> int:
        """Write the queued progress reports (the ingest loop calls this); returns how many
        runs were written. A report the store refuses is logged and dropped."""
        lock, pending = self._progress_queue()
        with lock:
            batch = dict(pending)
            pending.clear()
        if not batch or self.store is None:
            return 0
        written = 0
        items = list(batch.items())
        for start in range(0, len(items), PROGRESS_FLUSH_CHUNK):  # the lock is let go between
            with self.lock, self.store.transaction():
                for (cluster, job_id, restart), e in items[start:start + PROGRESS_FLUSH_CHUNK]:
                    try:
                        self.store.record_progress(cluster, job_id, restart, uid=e["uid"],
                                                   epoch=e["epoch"], step=e["step"],
                                                   now=e["ts"])
                        written += 1
                    except ValueError as exc:
                        self.log.write("progress_dropped", job_id=job_id, error=str(exc))
        return written


def _owner(store: Store, cluster: str, job_id: int) -> dict[str, Any] | None:
    from db.jobs import job_owner

    return job_owner(store, cluster, job_id)
