"""When a job counts as vanished and when a reservation closes: one home for those rules.

A reservation is made at submit (state 'reserved') and bound to its Slurm job id by the
daemon's reconcile loop ('bound'). It stops holding budget in one of two ways:

- settled, when a run charged against it ends for good (``run_settles_reservation``);
- released, when its job vanished: Slurm no longer lists it and it has been missing for the
  grace (``job_vanished``, ``vanished_grace``), with ``release_reason`` as the reason.

The daemon's reconcile loop releases by these rules; ``slurmgate reconcile`` reports runs left
without a completion record and reservations without a job by the same rule and grace.

Pure rules: stdlib only, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VANISHED_GRACE_MIN_S = 120.0
"""The shortest grace: a job just submitted may not be in Slurm's queue yet, and a finished
job's completion record may still be on its way."""

REQUEUE_STATES = frozenset({"NODE_FAIL", "PREEMPTED", "REQUEUED", "REQUEUE_FED",
                            "REQUEUE_HOLD", "RESIZING", "SUSPENDED"})
"""Final states after which Slurm may requeue the job: its reservation stays live for the next
run (and is released when the job vanishes). Any other final state ends the job."""


def vanished_grace(reconcile_seconds: float) -> float:
    """How long a job must be missing from Slurm's queue to count as vanished: at least
    ``VANISHED_GRACE_MIN_S``, and three reconcile rounds when those take longer."""
    return max(VANISHED_GRACE_MIN_S, 3 * reconcile_seconds)


def job_vanished(missing_since: float, now: float, grace_s: float) -> bool:
    """Whether a job Slurm does not list has vanished: it has been missing for ``grace_s``.

    ``missing_since`` is when it could first have been listed and was not: the reservation's
    creation or the run's start, or the first reconcile round that missed it if later.
    """
    return now - missing_since >= grace_s


def release_reason(job_id: int | None) -> str:
    """Why a vanished job's reservation is released (``job_id`` None: it was never bound)."""
    if job_id is None:
        return ("job never appeared in Slurm's queue (rejected later or submission "
                "failed)")
    return "job left Slurm's queue without a completion record"


def run_settles_reservation(run: Mapping[str, Any]) -> bool:
    """Whether a settled run closes its reservation ('settled'): it is charged (``cost``
    set), is not an array task (one reservation covers the whole array, which is released
    when the array is gone) and did not end in a state after which Slurm may requeue it."""
    return (run["cost"] is not None and run["array_job_id"] is None
            and run["state"] not in REQUEUE_STATES)
