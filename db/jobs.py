"""One job as the ledger knows it: its runs, their nodes and GPUs, its reservation and the
progress it reported. What `slurmgate job` (the daemon's ``job`` op) reads; the figures and
advice made from it are policies.efficiency's.

A job is found by (cluster, job id), or by (cluster, array job id, task id) for ``123_4``.
Slurm reuses job ids after the id counter wraps, so only the runs of the NEWEST job with that
id are returned: the runs that share the newest run's reservation (rid), or, for runs without
one, those that follow each other without a gap longer than db.ingest.JOB_ID_REUSE_GAP_S.
"""

from __future__ import annotations

import json
from typing import Any

from db.ingest import JOB_ID_REUSE_GAP_S
from db.store import Store, _decode_tags


def _gpus(raw: Any) -> list[dict[str, Any]]:
    try:
        gpus = json.loads(raw or "[]")
    except ValueError:
        return []
    return [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []


def _newest_job(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of the newest job among ``runs`` (ordered by restart_count)."""
    if not runs:
        return []
    newest = max(runs, key=lambda r: (r["submit_ts"] or r["start_ts"] or r["end_ts"] or 0.0,
                                      r["restart_count"]))
    if newest["rid"]:
        return [r for r in runs if r["rid"] == newest["rid"]]
    kept = [newest]
    earlier = sorted((r for r in runs if r is not newest and not r["rid"]),
                     key=lambda r: r["restart_count"], reverse=True)
    for r in earlier:
        nxt = kept[-1]
        gap = (nxt["start_ts"] or nxt["end_ts"] or 0.0) - (r["end_ts"] or r["start_ts"] or 0.0)
        if r["restart_count"] >= nxt["restart_count"] or gap > JOB_ID_REUSE_GAP_S:
            break
        kept.append(r)
    return sorted(kept, key=lambda r: r["restart_count"])


def find_job_runs(store: Store, cluster: str, job_id: int,
                  array_task_id: int | None = None) -> list[dict[str, Any]]:
    """The runs of the job (newest job with that id), by restart count; tags decoded. With
    ``array_task_id``, ``job_id`` is the array's job id."""
    if array_task_id is None:
        rows = store._query(
            "SELECT * FROM runs WHERE cluster = :cluster AND job_id = :job_id "
            "ORDER BY restart_count", {"cluster": cluster, "job_id": job_id})
    else:
        rows = store._query(
            "SELECT * FROM runs WHERE cluster = :cluster AND array_job_id = :job_id "
            "AND array_task_id = :task ORDER BY job_id, restart_count",
            {"cluster": cluster, "job_id": job_id, "task": array_task_id})
        if rows:  # one task has one job id; the newest task of that number wins
            newest = max(rows, key=lambda r: r["submit_ts"] or r["start_ts"] or 0.0)
            rows = [r for r in rows if r["job_id"] == newest["job_id"]]
    return [_decode_tags(r) for r in _newest_job(rows)]


def job_reservation(store: Store, cluster: str, job_id: int,
                    rid: str | None = None) -> dict[str, Any] | None:
    """The job's reservation: by ``rid`` when its runs name one, else the newest bound to
    (cluster, job_id)."""
    if rid:
        rows = store._query("SELECT * FROM reservations WHERE rid = :rid", {"rid": rid})
    else:
        rows = store._query(
            "SELECT * FROM reservations WHERE cluster = :cluster AND job_id = :job_id "
            "ORDER BY created_at DESC LIMIT 1", {"cluster": cluster, "job_id": job_id})
    return _decode_tags(rows[0]) if rows else None


def job_nodes(store: Store, cluster: str, job_id: int) -> dict[int, list[dict[str, Any]]]:
    """Node rows of the job's runs by restart count, ``gpus`` decoded (a list of per-GPU
    dicts: index, uuid, gpu_type, util_mean, util_max, mem_max_bytes, energy_j,
    gpu_seconds)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in store._query(
            "SELECT * FROM run_nodes WHERE cluster = :cluster AND job_id = :job_id "
            "ORDER BY restart_count, node", {"cluster": cluster, "job_id": job_id}):
        r["gpus"] = _gpus(r["gpus"])
        out.setdefault(r["restart_count"], []).append(r)
    return out


def job_progress(store: Store, cluster: str, job_id: int) -> dict[int, dict[str, Any]]:
    """Reported progress of the job's runs by restart count: epoch, step (highest reported),
    epoch_base, step_base (where the run resumed from), reports, first_ts, last_ts."""
    return {r["restart_count"]: r for r in store._query(
        "SELECT restart_count, uid, epoch, step, epoch_base, step_base, reports, first_ts, "
        "last_ts FROM run_progress WHERE cluster = :cluster AND job_id = :job_id "
        "ORDER BY restart_count", {"cluster": cluster, "job_id": job_id})}


def load_job(store: Store, cluster: str, job_id: int,
             array_task_id: int | None = None) -> dict[str, Any] | None:
    """Everything the ledger holds about one job, or None when it knows nothing of it:
    ``runs`` (rows, oldest first), ``nodes`` {restart_count: node rows}, ``reservation``
    (or None), ``progress`` {restart_count: row}. A job still pending or running before its
    first run was recorded has only its reservation."""
    runs = find_job_runs(store, cluster, job_id, array_task_id)
    if runs:
        real_id = runs[0]["job_id"]
        reservation = job_reservation(store, cluster, real_id, runs[-1]["rid"])
    elif array_task_id is None:
        real_id = job_id
        reservation = job_reservation(store, cluster, job_id)
        if reservation is None:
            return None
    else:
        return None
    keep = {r["restart_count"] for r in runs}
    nodes = {k: v for k, v in job_nodes(store, cluster, real_id).items() if k in keep}
    progress = {k: v for k, v in job_progress(store, cluster, real_id).items()
                if k in keep or not runs}
    return {"cluster": cluster, "job_id": real_id, "runs": runs, "nodes": nodes,
            "reservation": reservation, "progress": progress}


def job_owner(store: Store, cluster: str, job_id: int) -> dict[str, Any] | None:
    """Who the newest job with this id belongs to, from its newest run or else its newest
    reservation: user, uid (None when only a reservation names it), team, and the restart
    count and settled flag of its newest run (None without one)."""
    runs = find_job_runs(store, cluster, job_id)
    if runs:
        last = runs[-1]
        return {"user": last["user"], "uid": last["uid"], "team": last["team"],
                "restart_count": last["restart_count"], "settled": last["cost"] is not None,
                "runs": {r["restart_count"]: r["cost"] is not None for r in runs}}
    res = job_reservation(store, cluster, job_id)
    if res is None:
        return None
    return {"user": res["user"], "uid": None, "team": res["team"], "restart_count": None,
            "settled": False, "runs": {}}
