"""What the idle-GPU scan reads: running jobs' samples per bucket, the idle events already
logged for their runs, and their reservations. Reads only; the daemon writes the events.

The heavy part runs inside SQLite (which releases the GIL while it steps a statement), so a
scan over 1,000 GPUs sampled every minute leaves the daemon's decision threads alone: the
samples of the wanted jobs are found through ``gpu_samples_job_ts`` (job id, time) and
reduced to one row per idle job (its streak) before Python sees them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from db.backend import POSTGRESQL, SQLITE, split_in
from db.store import Store
from policies.idle import EVENT_KINDS, Summary

_CHUNK = 2000
"""Jobs per statement (up to five parameters each; SQLite allows 32,766, PostgreSQL 65,535)."""

# The two places where the servers spell the streak statement differently; the rest of it is
# shared. A bucket is floor(ts / width): SQLite's CAST truncates (ts is never negative) and its
# floor() exists only in builds with the math functions, while PostgreSQL's CAST rounds. A
# job's nodes come as one JSON array parameter (five parameters a job, however many nodes it
# has), read by each server's own JSON table function (SQLite json_each, PostgreSQL
# json_array_elements_text; both name their column "value").
_STREAK_SQL = {
    SQLITE: ("CAST(s.ts / :width AS INTEGER)", "SELECT value FROM json_each(w.nodes)"),
    POSTGRESQL: ("CAST(floor(s.ts / :width) AS BIGINT)",
                 "SELECT value FROM json_array_elements_text(CAST(w.nodes AS json))"),
}


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def idle_summaries(store: Store, wanted: dict[int, tuple[float, int, int]], *,
                   width_s: float, threshold_percent: float,
                   nodes: dict[int, list[str]] | None = None) -> dict[int, Summary]:
    """Per job id, its idle streak (``policies.idle.summarise``, computed here in SQL) from
    its samples at or after ``since``, where ``wanted[job_id] = (since, need, allocated)``:
    the run's start (or the start of the window that matters), how many GPUs must be idle,
    how many it has. Jobs that are not idle now are left out.

    Per bucket of ``width_s`` seconds a GPU is idle when every reading of it there is below
    ``threshold_percent``; the bucket is idle (1) with at least ``need`` idle GPUs, busy (-1)
    when more GPUs were busy than ``max(allocated, seen) - need``, else unknown (0); the
    streak is the idle buckets after the job's last busy one. ``nodes[job_id]``, when given,
    are the nodes Slurm runs the job on now: samples tagged with the job's id on any other
    node (a baseline left behind by a run that failed there) are not the job's."""
    out: dict[int, Summary] = {}
    bucket, nodes_of = _STREAK_SQL[store.conn.dialect]
    items = sorted(wanted.items())
    for part in _chunks(items):
        values = ", ".join(f"(:j{i}, :s{i}, :n{i}, :a{i}, :d{i})" for i in range(len(part)))
        params: dict[str, Any] = {"width": width_s, "threshold": threshold_percent}
        for i, (job_id, (since, need, allocated)) in enumerate(part):
            params.update({
                f"j{i}": int(job_id), f"s{i}": float(since), f"n{i}": int(need),
                f"a{i}": int(allocated),
                f"d{i}": json.dumps(nodes[job_id]) if nodes and job_id in nodes else None})
        rows = store.conn.execute(
            f"WITH wanted(job_id, since, need, allocated, nodes) AS (VALUES {values}), "
            f"per_gpu AS (SELECT s.job_id AS job_id, {bucket} AS bucket, "
            "CASE WHEN max(s.util) < :threshold THEN 1 ELSE 0 END AS idle "
            "FROM wanted w JOIN gpu_samples s "
            "ON s.job_id = w.job_id AND s.ts >= w.since AND (w.nodes IS NULL OR s.node IN "
            f"({nodes_of})) "
            "GROUP BY s.job_id, s.gpu_uuid, bucket), "
            "per_bucket AS (SELECT job_id, bucket, count(*) AS seen, sum(idle) AS idle "
            "FROM per_gpu GROUP BY job_id, bucket), "
            "judged AS (SELECT b.job_id AS job_id, b.bucket AS bucket, b.seen AS seen, "
            "b.idle AS idle, CASE WHEN b.idle >= w.need THEN 1 "
            "WHEN b.seen - b.idle > CASE WHEN w.allocated > b.seen THEN w.allocated "
            "ELSE b.seen END - w.need THEN -1 ELSE 0 END "
            "AS state FROM per_bucket b JOIN wanted w ON w.job_id = b.job_id), "
            # per job its newest busy and newest idle bucket, in one pass
            "ends AS (SELECT job_id, max(CASE WHEN state = -1 THEN bucket END) AS busy, "
            "max(CASE WHEN state = 1 THEN bucket END) AS last FROM judged "
            "WHERE state <> 0 GROUP BY job_id) "
            # the streak: the idle buckets after the newest busy one; idle and seen are those
            # of its newest bucket (max() of one value per group: both servers' GROUP BY)
            "SELECT j.job_id, count(*), max(e.last), "
            "max(CASE WHEN j.bucket = e.last THEN j.idle END), "
            "max(CASE WHEN j.bucket = e.last THEN j.seen END) FROM judged j "
            "JOIN ends e ON e.job_id = j.job_id "
            "WHERE j.state = 1 AND (e.busy IS NULL OR j.bucket > e.busy) "
            "GROUP BY j.job_id", params).fetchall()
        for job_id, count, last, idle, seen in rows:
            out[int(job_id)] = Summary(int(count), int(last), int(idle), int(seen))
    return out


def idle_events(store: Store, cluster: str, since: dict[int, float]
                ) -> list[tuple[int, int | None, str, float | None, bool]]:
    """(job_id, restart_count, kind, threshold_minutes, dry_run) of the idle_warning and
    idle_action events of ``cluster`` logged for these jobs at or after ``since[job_id]``
    (the run's start: an earlier job with the same id is not this one)."""
    if not since:
        return []
    out: list[tuple[int, int | None, str, float | None, bool]] = []
    kinds, kind_params = split_in("kind", EVENT_KINDS)
    oldest = min(since.values())
    for part in _chunks(sorted(since)):
        marks, params = split_in("job", [int(j) for j in part])
        rows = store.conn.execute(
            f"SELECT job_id, restart_count, kind, ts, detail FROM events "
            f"WHERE kind IN ({kinds}) AND ts >= :oldest AND cluster = :cluster "
            f"AND job_id IN ({marks})",
            {**kind_params, "oldest": oldest, "cluster": cluster, **params}).fetchall()
        for job_id, restart, kind, ts, detail in rows:
            if ts < since[job_id]:
                continue
            try:
                d = json.loads(detail or "{}")
            except ValueError:
                d = {}
            d = d if isinstance(d, dict) else {}
            threshold = d.get("threshold_minutes")
            out.append((job_id, restart, kind,
                        float(threshold) if isinstance(threshold, int | float) else None,
                        d.get("dry_run") is True))
    return out


def live_reservations_of_jobs(store: Store, cluster: str, job_ids: Iterable[int]
                              ) -> dict[int, dict[str, Any]]:
    """The newest live (reserved or bound) reservation bound to each of ``job_ids``
    (an array's job id for its tasks): gpu_type, gpus, cpus, mem_mb, partition,
    time_limit_min, est_cost, tasks."""
    ids = sorted(set(job_ids))
    out: dict[int, dict[str, Any]] = {}
    for part in _chunks(ids):
        marks, params = split_in("job", [int(j) for j in part])
        for row in store._query(
                "SELECT job_id, gpu_type, gpus, cpus, mem_mb, \"partition\", time_limit_min, "
                "est_cost, tasks FROM reservations WHERE cluster = :cluster AND job_id IN "
                f"({marks}) AND state IN ('reserved', 'bound') ORDER BY created_at",
                {"cluster": cluster, **params}):
            out[row["job_id"]] = row
    return out
