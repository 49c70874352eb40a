"""Efficiency figures of settled runs, rolled up by team, project, user or a tag's value.

Reads the runs that ENDED in a period (like every money report) with the progress they
reported; the rules (GPU efficiency, experiments per 1k, cost per epoch) are
policies.efficiency's. Tags and progress are not in the daily rollups, so this reads the runs
table (indexed by end time): one row per run, grouped in Python.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from db.store import Store
from policies.efficiency import group_figures

GROUPS = ("team", "project", "user")
"""Columns a report may group by, besides ``tag:<key>``."""

_RUNS = (
    'SELECT r.cluster, r.job_id, r.restart_count, r.team, r.project, r."user", r.tags, '
    "r.gpu_seconds, r.util_mean, r.cost, r.credit, r.cost_idle, "
    # progress made, never below 0; NULL (no progress row) stays NULL
    "CASE WHEN p.epoch - p.epoch_base < 0 THEN 0 ELSE p.epoch - p.epoch_base END AS epochs, "
    "CASE WHEN p.step - p.step_base < 0 THEN 0 ELSE p.step - p.step_base END AS steps, "
    # 1/0 on both servers (a bare EXISTS is a boolean on PostgreSQL)
    "CASE WHEN EXISTS (SELECT 1 FROM run_progress q WHERE q.cluster = r.cluster "
    "AND q.job_id = r.job_id AND q.epoch IS NOT NULL) THEN 1 ELSE 0 END AS epoch_job, "
    "CASE WHEN EXISTS (SELECT 1 FROM run_progress q WHERE q.cluster = r.cluster "
    "AND q.job_id = r.job_id AND q.step IS NOT NULL) THEN 1 ELSE 0 END AS step_job "
    "FROM runs r LEFT JOIN run_progress p ON p.cluster = r.cluster AND p.job_id = r.job_id "
    "AND p.restart_count = r.restart_count "
    "WHERE r.cost IS NOT NULL AND r.end_ts >= :start_ts AND r.end_ts < :end_ts"
)


def _check_group(group_by: Sequence[str]) -> tuple[str, ...]:
    from policies.tags import KEY_RE

    out = []
    for g in group_by:
        if g in GROUPS or (g.startswith("tag:") and KEY_RE.fullmatch(g[4:])):
            out.append(g)
        else:
            raise ValueError(f"cannot group efficiency by {g!r}; choose from "
                             f"{', '.join(GROUPS)} or tag:<key>")
    return tuple(dict.fromkeys(out))


def efficiency_runs(store: Store, start_ts: float, end_ts: float, *,
                    team: str | None = None) -> list[dict[str, Any]]:
    """Settled runs that ended in [start_ts, end_ts) (of ``team`` when given), tags decoded,
    with the progress each made (``epochs``, ``steps``; None when it reported none) and
    whether its job reported epochs/steps at all (``epoch_job``, ``step_job``)."""
    sql = _RUNS
    params: dict[str, Any] = {"start_ts": start_ts, "end_ts": end_ts}
    if team is not None:
        sql += " AND r.team = :team"
        params["team"] = team
    rows = store._query(sql + " ORDER BY r.end_ts", params)
    for r in rows:
        try:
            tags = json.loads(r["tags"]) if r["tags"] else {}
        except ValueError:
            tags = {}
        r["tags"] = tags if isinstance(tags, dict) else {}
    return rows


def efficiency(store: Store, start_ts: float, end_ts: float,
               group_by: Sequence[str] = ("team",), *, experiment_tag: str = "experiment",
               team: str | None = None) -> list[dict[str, Any]]:
    """Efficiency figures per group (policies.efficiency.GroupFigures.as_dict: runs,
    gpu_hours, busy_gpu_hours, measured_gpu_hours, gpu_efficiency, cost, credit, net,
    idle_cost, cost_per_run, experiments, experiments_per_1k, epochs, cost_per_epoch, steps,
    cost_per_step), biggest net first. ``group_by``: team, project, user, tag:<key>; an
    empty grouping gives one row for everything."""
    key = _check_group(group_by)
    return group_figures(efficiency_runs(store, start_ts, end_ts, team=team), key,
                         experiment_tag=experiment_tag)
