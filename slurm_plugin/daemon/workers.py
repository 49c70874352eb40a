"""The daemon's background work: the spool ingest loop and the reconcile loop.

Ingest moves spool records into SQLite in batches (the daemon is the only writer), quarantines
what cannot be read, and hands node failures to the requeue handler. Reconcile binds
reservations to Slurm job ids and releases those whose jobs vanished, re-prices array
reservations to what Slurm may run at once, and decides the jobs accepted unchecked while the
daemon was away (recheck.py); its first pass runs at daemon start.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from policies.defaults import FINISHED_STATES
from policies.reservations import job_vanished, release_reason, vanished_grace
from policies.tags import parse_admin_comment
from slurm_plugin.daemon.idle import scan_idle_gpus
from slurm_plugin.daemon.recheck import Recheck
from slurm_plugin.daemon.state import DaemonState

if TYPE_CHECKING:
    from db.store import Store
    from slurm_plugin.slurm.client import Job

_RECHECK_MADE = threading.Lock()


ARRAY_ENDED = "array ended: every task finished"
ARRAY_SETTLE_S = 10.0
"""How long after an array's last task ended its reservation is released (the tasks'
completion records are ingested by then; each run is charged on its own)."""


def arrays_ended(jobs: list[Job], now: float) -> frozenset[str]:
    """Reservation ids of arrays Slurm still lists whose every task has finished (none
    pending or running) more than ARRAY_SETTLE_S ago: their unspent reservation is let go at
    once instead of when the array leaves Slurm's queue (MinJobAge) plus the grace."""
    done: dict[str, bool] = {}
    for j in jobs:
        rid = parse_admin_comment(j.admin_comment).get("rid")
        if not rid:
            continue
        over = (j.array_job_id is not None and j.state in FINISHED_STATES
                and j.end_ts is not None and j.end_ts <= now - ARRAY_SETTLE_S)
        done[rid] = done.get(rid, True) and over
    return frozenset(rid for rid, over in done.items() if over)


class Workers(DaemonState):
    # Spool state, reassigned (never mutated) by the ingest thread.
    spool_problems: dict[str, str] | None = None
    """The last layout check: problem per spool directory ('' is the spool itself)."""
    last_spool_maintenance: float = 0.0
    SPOOL_MAINTENANCE_S = 60.0
    """How often the ingest loop re-checks the layout, recovers tmp/ and prunes quarantine."""
    recheck: Recheck | None = None
    """Unchecked jobs and array reservations (made at the first reconcile pass)."""

    def spool_trust(self) -> Any:
        from slurm_plugin.node import spool

        d = self.policy.daemon
        return spool.trust_for(d.slurm_user, d.spool_squash_uid)

    def readable_subdirs(self) -> tuple[str, ...]:
        """node/ and ctld/, less those the layout check refused."""
        from slurm_plugin.node import spool

        problems = self.spool_problems or {}
        if "" in problems:
            return ()
        return tuple(s for s in spool.SUBDIRS
                     if not any(k.split("/", 1)[0] == s for k in problems))

    def check_spool_layout(self, create: bool = False, always_log: bool = False) -> dict[str, str]:
        """Check (and with ``create``, make ctld/, ctld/tmp/, quarantine/) the spool layout;
        a refused directory is logged and kept as an event, and not ingested from."""
        from slurm_plugin.node import spool

        spool_dir = self.policy.daemon.spool_dir
        problems = spool.check_layout(spool_dir, self.spool_trust(), create=create)
        if always_log or problems != self.spool_problems:
            for sub, why in problems.items():
                where = f"{spool_dir}/{sub}" if sub else spool_dir
                self.log.write("spool_layout_refused", dir=where, reason=why)
                if self.store is not None:
                    with self.lock:
                        self.store.add_event(
                            "spool_layout", message=f"{where} refused: {why}"[:2000])
            if not problems and self.spool_problems:
                self.log.write("spool_layout_ok", dir=spool_dir)
        self.spool_problems = problems
        return problems

    def spool_startup(self) -> None:
        """At daemon start: the layout (ctld/, ctld/tmp/, quarantine/ made if missing), temp
        files of writers that died, and, once, records of the old single-directory layout."""
        self.check_spool_layout(create=True, always_log=True)
        self.spool_maintenance(force=True)
        self.ingest_legacy()

    def spool_maintenance(self, now: float | None = None, force: bool = False) -> None:
        """On a timer: re-check the layout, recover node/tmp and ctld/tmp, prune quarantine."""
        from slurm_plugin.node import spool

        now = time.time() if now is None else now
        if not force and now - self.last_spool_maintenance < self.SPOOL_MAINTENANCE_S:
            return
        self.last_spool_maintenance = now
        if not force:
            self.check_spool_layout(create=True)
        spool_dir = self.policy.daemon.spool_dir
        trust = self.spool_trust()
        recovered, quarantined = spool.recover_tmp(spool_dir, spool.TMP_GRACE_S, now,
                                                   trust=trust)
        if recovered or quarantined:
            self.log.write("spool_tmp_recovered", recovered=recovered, quarantined=quarantined)
            if quarantined:
                self.metrics.quarantined()
        pruned = spool.prune_quarantine(spool_dir, self.policy.daemon.quarantine_days,
                                        trust=trust, now=now)
        if pruned:
            self.log.write("quarantine_pruned", removed=pruned,
                           days=self.policy.daemon.quarantine_days)

    def ingest_legacy(self, limit: int = 1000) -> int:
        """Records left directly in the spool by the old layout: ingested once (root's or the
        SlurmUser's), anything else quarantined. Returns how many were handled."""
        from slurm_plugin.node import spool

        if "" in (self.spool_problems or {}):
            return 0
        total = 0
        for _ in range(10_000):
            items = spool.claim_legacy(self.policy.daemon.spool_dir, limit,
                                       trust=self.spool_trust())
            if not items:
                break
            self.ingest_items(items)
            total += len(items)
        if total:
            self.log.write("spool_legacy_ingested", records=total)
        return total

    def ingest_once(self, limit: int = 1000) -> int:
        """Move one batch from the spool into SQLite; returns how many records were handled."""
        from slurm_plugin.node import spool

        subdirs = self.readable_subdirs() if self.spool_problems is not None else spool.SUBDIRS
        items = spool.claim_batch(self.policy.daemon.spool_dir, limit,
                                  trust=self.spool_trust(), subdirs=subdirs)
        if not items:
            return 0
        self.ingest_items(items)
        return len(items)

    def ingest_items(self, items: list[Any]) -> None:
        """Quarantine the bad items, ingest the good ones with their writers, remove what
        was committed."""
        from db.ingest import ingest_records
        from slurm_plugin.node import spool

        good = [i for i in items if i.error is None and i.record is not None]
        records: list[dict[str, Any]] = [i.record for i in good if i.record is not None]
        writers = [i.writer for i in good if i.record is not None]
        for item in items:
            if item.error is not None or item.record is None:
                self.quarantine(item, item.error or "unreadable")
        self.bind_before_settling(records)
        written = [rec["written_at"] for rec in records
                   if isinstance(rec.get("written_at"), int | float)]
        if written:
            self.metrics.ingest_lag(time.time() - min(written))
        with self.lock:
            result = ingest_records(self.need_store(), records, self.policy, writers=writers)
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
                self.failures.handle([rec for rec in records if id(rec) not in failed])
            except Exception as exc:  # the records are committed; log and carry on
                self.log.write("failure_handling_error", error=repr(exc))

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
            bound = self.store.bound_job_ids(ids)
        if ids - bound:
            self.last_bind_read = time.monotonic()
            try:
                self.reconcile_once()
            except Exception as exc:
                self.log.write("reconcile_error", error=repr(exc))

    def quarantine(self, item: Any, reason: str) -> None:
        """Move one item to quarantine/ with its reason; a failure to do so is logged and the
        item stays where it is (it is judged again next round), never stopping the batch."""
        from slurm_plugin.node import spool

        try:
            spool.quarantine(self.policy.daemon.spool_dir, item, reason,
                             trust=self.spool_trust())
        except Exception as exc:
            self.metrics.error("quarantine")
            self.log.write("quarantine_failed", file=str(item.path), reason=reason,
                           error=repr(exc))
            return
        self.metrics.quarantined()
        self.log.write("quarantined", file=str(item.path), reason=reason)
        if self.store is not None:
            with self.lock:
                self.store.add_event("quarantine", message=f"{item.path.name}: {reason}"[:2000])

    def ingest_loop(self) -> None:
        """The spool ingest, on the cluster's leader only (db/leader.py): every 2 s, or at
        once after a hook's nudge. A daemon that becomes the leader sets the spool up first."""
        started = False
        while not self.stopping.is_set():
            if self.leadership.check():
                if not started:
                    started = True
                    try:
                        self.spool_startup()
                    except Exception as exc:
                        self.metrics.error("ingest")
                        self.log.write("ingest_error", error=repr(exc))
                try:
                    self.spool_maintenance()
                    rounds = 0  # batches are capped in records and bytes: go on while more
                    while rounds < 100 and self.ingest_once() > 0:
                        rounds += 1
                    self.flush_progress()
                except Exception as exc:  # keep the records; try again on the next round
                    self.metrics.error("ingest")
                    self.log.write("ingest_error", error=repr(exc))
                    self.stopping.wait(5.0)
            else:
                started = False  # leading again later: recover tmp/ and the layout first
            self.ingest_wakeup.wait(2.0)
            self.ingest_wakeup.clear()

    def rechecker(self) -> Recheck | None:
        """The one Recheck of this daemon (its memory of decided jobs must not be split)."""
        if self.slurm is None or self.store is None:
            return None
        with _RECHECK_MADE:
            if self.recheck is None:
                self.recheck = Recheck(self, self.slurm, self.store, self.log.write)
        return self.recheck

    def reconcile_once(self) -> dict[str, int]:
        """Bind reservations to job ids and release those whose jobs vanished; re-price
        array reservations up to what Slurm may run at once; decide unchecked jobs.

        Returns counts: bound and released always, repriced, decided, accepted, rejected and
        unchecked_waiting when not 0."""
        recheck, store = self.rechecker(), self.store
        if self.slurm is None or store is None or recheck is None:
            return {}
        read_at = time.monotonic()
        jobs = self.slurm.jobs()
        now = time.time()
        if self.failures is not None:
            self.failures.note_recoveries(jobs)
        seen: dict[str, int] = {}
        for j in jobs:
            rid = parse_admin_comment(j.admin_comment).get("rid")
            if rid:
                seen.setdefault(rid, j.array_job_id or j.job_id)
        # decided on an earlier pass, admin comment not set yet: listed all the same
        for rid, job_id in recheck.awaiting_marks(j.array_job_id or j.job_id
                                                  for j in jobs).items():
            seen.setdefault(rid, job_id)
        bound, released = self.bind_and_release(store, seen, now, arrays_ended(jobs, now))
        if bound or released:
            self.log.write("reconciled", bound=bound, released=released, jobs=len(jobs))
        with self.lock:
            live = store.live_reservations()
        extra = {"repriced": recheck.follow_array_throttles(live, seen, jobs)}
        checked = recheck.check_unchecked_jobs(jobs, read_at)
        self.unchecked_waiting = checked.pop("waiting")
        extra.update(checked, unchecked_waiting=self.unchecked_waiting)
        if checked["decided"] or self.unchecked_waiting:
            self.log.write("unchecked_pass", waiting=self.unchecked_waiting, **checked)
        scan_idle_gpus(self, jobs)  # idle-GPU policy, when due (daemon/idle.py)
        return {"bound": bound, "released": released, **{k: v for k, v in extra.items() if v}}

    def bind_and_release(self, store: Store, seen: dict[str, int], now: float,
                         ended: frozenset[str] = frozenset()) -> tuple[int, int]:
        """Bind live reservations listed in ``seen`` (rid -> job id) and release those whose
        job vanished, or whose array has ended (``ended``: every task finished, none
        waiting); returns (bound, released)."""
        grace = vanished_grace(self.policy.daemon.reconcile_seconds)
        bound = released = 0
        with self.lock:
            live = store.live_reservations()
        policy = self.policy
        # one short lock per change, so submissions are decided in between
        for r in live:
            rid = r["rid"]
            if rid in ended and r["job_id"] is not None:
                with self.lock:
                    store.finish_reservation(rid, "released", ARRAY_ENDED)
                self.missing_since.pop(rid, None)
                released += 1
                continue
            if rid in seen:
                self.missing_since.pop(rid, None)
                if r["job_id"] is None:
                    with self.lock:
                        store.bind_reservation(rid, seen[rid], policy.daemon.cluster,
                                               policy=policy)
                    bound += 1
                continue
            first = self.missing_since.setdefault(rid, now)
            if not job_vanished(max(first, r["created_at"]), now, grace):
                continue
            with self.lock:
                store.finish_reservation(rid, "released", release_reason(r["job_id"]))
            self.missing_since.pop(rid, None)
            released += 1
        if bound or released:
            self.refresh_ledger()
        return bound, released

    def reconcile_loop(self) -> None:
        """A pass at start (jobs accepted unchecked while the daemon was away are decided at
        once), then one every ``daemon.reconcile_seconds``."""
        while not self.stopping.is_set():
            try:
                if self.leadership.check():
                    self.reconcile_once()
                else:  # another daemon leads: keep this one's picture of the ledger fresh
                    self.refresh_ledger()
            except Exception as exc:
                self.metrics.error("reconcile")
                self.log.write("reconcile_error", error=repr(exc))
            if self.stopping.wait(self.policy.daemon.reconcile_seconds):
                break
