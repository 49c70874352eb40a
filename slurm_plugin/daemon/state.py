"""What every part of the daemon shares: its state, declared once for the parts to use.

``Daemon`` (service.py) owns and fills this state; ``AdminOps`` (admin_ops.py) and ``Workers``
(workers.py) are the daemon's other rooms and reach it through these declarations.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from policies.config import Policy
from policies.decision import SubmitDecision
from policies.ledger import Ledger
from policies.request import JobRequest
from slurm_plugin.daemon.prometheus import Metrics
from slurm_plugin.protocol import Peer

if TYPE_CHECKING:
    from db.leader import Leadership
    from db.store import Store
    from slurm_plugin.daemon.eventlog import EventLog
    from slurm_plugin.daemon.requeue import FailureHandler
    from slurm_plugin.slurm.client import SlurmClient


class DaemonState:
    """Attributes and cross-room methods of the daemon (implemented by ``Daemon``)."""

    policy: Policy
    store: Store | None
    slurm: SlurmClient | None
    lock: threading.RLock
    log: EventLog
    metrics: Metrics
    ledger: Ledger
    fairshare: dict[str, float]
    failures: FailureHandler | None
    stopping: threading.Event
    ingest_wakeup: threading.Event
    missing_since: dict[str, float]
    last_bind_read: float
    leadership: Leadership
    """Whether this daemon does the cluster's once-only work (always, on SQLite)."""
    shared_ledger: bool
    unchecked_waiting: int = 0
    """Jobs accepted unchecked (fail-open) still waiting for their decision after the last
    reconcile pass (an array counts once); kept by workers.py for ping and metrics."""

    def need_store(self) -> Store:
        """The store, for work that cannot go without one. A daemon made without a store
        (``Daemon(..., store=None)``) fails that work, as an internal error in a request."""
        if self.store is None:
            raise RuntimeError("the slurmgate daemon has no store")
        return self.store

    def is_admin(self, peer: Peer) -> bool:
        raise NotImplementedError

    def visible_teams(self, peer: Peer) -> list[str]:
        raise NotImplementedError

    def refresh_ledger(self, policy: Policy | None = None, now: float | None = None) -> None:
        raise NotImplementedError

    def reconcile_once(self) -> dict[str, int]:
        raise NotImplementedError

    def is_controller(self, peer: Peer) -> bool:
        raise NotImplementedError

    def reader(self) -> Store | None:
        raise NotImplementedError

    def flush_progress(self) -> int:
        """Write the progress reports users sent (job_ops.py); the ingest loop calls it."""
        raise NotImplementedError

    def decide_and_record(self, job: JobRequest, *, origin: str) -> SubmitDecision:
        """Decide ``job`` like a new submission under the decision lock and record it (a
        reservation for an accept, an event for a reject). ``origin`` is "submit" or
        "recheck" (a job accepted unchecked while the daemon was away)."""
        raise NotImplementedError
