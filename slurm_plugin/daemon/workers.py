"""The daemon's background work: the spool ingest loop and the reconcile loop.

Ingest moves spool records into SQLite in batches (the daemon is the only writer), quarantines
what cannot be read, and hands node failures to the requeue handler. Reconcile binds
reservations to Slurm job ids and releases those whose jobs vanished.
"""

from __future__ import annotations

import time
from typing import Any

from policies.reservations import job_vanished, release_reason, vanished_grace
from policies.tags import parse_admin_comment
from slurm_plugin.daemon.state import DaemonState


class Workers(DaemonState):
    def ingest_once(self, limit: int = 1000) -> int:
        """Move one batch from the spool into SQLite; returns how many records were handled."""
        from db.ingest import ingest_records
        from slurm_plugin.node import spool

        spool_dir = self.policy.daemon.spool_dir
        items = spool.claim_batch(spool_dir, limit)
        if not items:
            return 0
        good = [i for i in items if i.error is None and i.record is not None]
        records: list[dict[str, Any]] = [i.record for i in good if i.record is not None]
        for item in items:
            if item.error is not None or item.record is None:
                self.quarantine(item, item.error or "unreadable")
        self.bind_before_settling(records)
        written = [rec["written_at"] for rec in records
                   if isinstance(rec.get("written_at"), int | float)]
        if written:
            self.metrics.ingest_lag(time.time() - min(written))
        with self.lock:
            result = ingest_records(self.need_store(), records, self.policy)
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
            bound = self.store.bound_job_ids(ids)
        if ids - bound:
            self.last_bind_read = time.monotonic()
            try:
                self.reconcile_once()
            except Exception as exc:
                self.log.write("reconcile_error", error=repr(exc))

    def quarantine(self, item: Any, reason: str) -> None:
        from slurm_plugin.node import spool

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
        grace = vanished_grace(self.policy.daemon.reconcile_seconds)
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
            if not job_vanished(max(first, r["created_at"]), now, grace):
                continue
            with self.lock:
                self.store.finish_reservation(rid, "released", release_reason(r["job_id"]))
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
