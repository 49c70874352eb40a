"""The daemon's seams: what each part asks of the store, by name, and the store behind the lock.

``db.store.Store`` implements every Protocol here; a part typed with one of them can be tested
with any object that has those methods. ``LockedStore`` is the store seen through the daemon's
lock, one call at a time, as a ``FailureStore``.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol


class FailureStore(Protocol):
    """What the failure handler (requeue.py) reads and writes."""

    def add_event(self, kind: str, **fields: Any) -> int: ...

    def runs_of_job(self, cluster: str, job_id: int) -> list[dict[str, Any]]: ...

    def has_event(self, kind: str, cluster: str, job_id: int,
                  restart_count: int | None) -> bool: ...

    def unrecovered_interruptions(self, since_ts: float) -> list[dict[str, Any]]: ...

    def last_drain_ts(self, cluster: str, node: str) -> float | None: ...

    def failed_runs_on_node(self, cluster: str, node: str, since_ts: float) -> int: ...

    def confirm_failure_credit(self, cluster: str, job_id: int, restart_count: int, *,
                               now: float | None = None) -> float | None: ...

    def finish_reservation(self, rid: str, state: str, reason: str | None = None, *,
                           now: float | None = None) -> bool: ...


class ReconcileStore(Protocol):
    """What ``slurmgate reconcile`` (reconcile.py) reads."""

    def unfinished_runs(self, cluster: str) -> list[dict[str, Any]]: ...

    def recorded_job_ids(self, cluster: str) -> set[int]: ...

    def live_reservations(self) -> list[dict[str, Any]]: ...


class LockedStore:
    """A ``FailureStore`` through the daemon's lock, one call at a time, for work that also
    waits on Slurm (failure handling) and so must not hold the lock across those waits."""

    def __init__(self, store: FailureStore, lock: threading.RLock) -> None:
        self._store, self._lock = store, lock

    def add_event(self, kind: str, **fields: Any) -> int:
        with self._lock:
            return self._store.add_event(kind, **fields)

    def runs_of_job(self, cluster: str, job_id: int) -> list[dict[str, Any]]:
        with self._lock:
            return self._store.runs_of_job(cluster, job_id)

    def has_event(self, kind: str, cluster: str, job_id: int,
                  restart_count: int | None) -> bool:
        with self._lock:
            return self._store.has_event(kind, cluster, job_id, restart_count)

    def unrecovered_interruptions(self, since_ts: float) -> list[dict[str, Any]]:
        with self._lock:
            return self._store.unrecovered_interruptions(since_ts)

    def last_drain_ts(self, cluster: str, node: str) -> float | None:
        with self._lock:
            return self._store.last_drain_ts(cluster, node)

    def failed_runs_on_node(self, cluster: str, node: str, since_ts: float) -> int:
        with self._lock:
            return self._store.failed_runs_on_node(cluster, node, since_ts)

    def confirm_failure_credit(self, cluster: str, job_id: int, restart_count: int, *,
                               now: float | None = None) -> float | None:
        with self._lock:
            return self._store.confirm_failure_credit(cluster, job_id, restart_count, now=now)

    def finish_reservation(self, rid: str, state: str, reason: str | None = None, *,
                           now: float | None = None) -> bool:
        with self._lock:
            return self._store.finish_reservation(rid, state, reason, now=now)
