"""Interruption metrics admins asked for: interruptions per day, mean time to recover,
GPU-hours lost and credited, failure rate per node, scavenger preemption rate.

All of it comes from the events the daemon records (node_fail, preempt, recovered, drain)
and the runs table; nothing here writes.
"""

from __future__ import annotations

import json
from typing import Any

from db.store import Store


def _detail(row: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(row.get("detail") or "{}") or {}
    except (TypeError, ValueError):
        return {}


def failure_metrics(store: Store, start_ts: float, end_ts: float) -> dict[str, Any]:
    events = store._query(
        "SELECT kind, ts, job_id, restart_count, node, detail FROM events "
        "WHERE kind IN ('node_fail', 'preempt', 'recovered', 'drain') AND ts >= :start_ts "
        "AND ts < :end_ts ORDER BY ts", {"start_ts": start_ts, "end_ts": end_ts})
    days = max((end_ts - start_ts) / 86400.0, 1e-9)
    runs_failed: dict[tuple[int, Any], dict[str, Any]] = {}
    per_node: dict[str, int] = {}
    preempted: set[tuple[int, Any]] = set()
    recoveries: list[float] = []
    drains: list[str] = []
    for e in events:
        d = _detail(e)
        key = (e["job_id"], e["restart_count"])
        if e["kind"] == "node_fail":
            runs_failed.setdefault(key, d)
            if e["node"]:
                per_node[e["node"]] = per_node.get(e["node"], 0) + 1
        elif e["kind"] == "preempt":
            preempted.add(key)
        elif e["kind"] == "recovered" and d.get("seconds") is not None:
            recoveries.append(float(d["seconds"]))
        elif e["kind"] == "drain" and e["node"]:
            drains.append(e["node"])
    lost = sum(float(d.get("gpu_hours_lost") or 0.0) for d in runs_failed.values())
    window = {"start_ts": start_ts, "end_ts": end_ts}
    credited = store._query(
        "SELECT coalesce(sum(credit), 0) AS money, "
        "coalesce(sum(CASE WHEN credit > 0 THEN gpu_seconds END), 0) / 3600.0 AS gpu_hours "
        "FROM runs WHERE end_ts >= :start_ts AND end_ts < :end_ts", window)[0]
    scav = store._query(
        "SELECT count(*) AS runs, "
        "coalesce(sum(CASE WHEN state = 'PREEMPTED' THEN 1 ELSE 0 END), 0) AS preempted "
        "FROM runs WHERE \"partition\" = 'scavenger' AND end_ts >= :start_ts "
        "AND end_ts < :end_ts", window)[0]
    nodes_seen = {r["node"] for r in store._query(
        "SELECT DISTINCT node FROM run_nodes WHERE end_ts >= :start_ts AND end_ts < :end_ts",
        window)} | set(per_node)
    interruptions = len(runs_failed) + len(preempted)
    recoveries.sort()
    return {
        "start_ts": start_ts, "end_ts": end_ts, "days": days,
        "interruptions": interruptions,
        "interruptions_per_day": interruptions / days,
        "node_failures": len(runs_failed),
        "preemptions": len(preempted),
        "recoveries": len(recoveries),
        "mttr_seconds": sum(recoveries) / len(recoveries) if recoveries else None,
        "mttr_seconds_max": recoveries[-1] if recoveries else None,
        "gpu_hours_lost": lost,
        "gpu_hours_credited": float(credited["gpu_hours"] or 0.0),
        "money_credited": float(credited["money"] or 0.0),
        "failures_per_node": dict(sorted(per_node.items())),
        "node_failure_rate_per_day": {n: per_node.get(n, 0) / days for n in sorted(nodes_seen)},
        "drains": drains,
        "scavenger_runs": int(scav["runs"] or 0),
        "scavenger_preemption_rate": (float(scav["preempted"]) / scav["runs"]
                                      if scav["runs"] else None),
    }


def node_history(store: Store, since_ts: float) -> list[dict[str, Any]]:
    """Per node: failures, last failure, drains by slurmgate, since ``since_ts``."""
    # counts as floats (1.0 per row) on both servers, as SQLite's total() gave them
    return store._query(
        "SELECT node, coalesce(sum(CASE WHEN kind = 'node_fail' THEN 1.0 ELSE 0.0 END), 0.0) "
        "AS failures, max(CASE WHEN kind = 'node_fail' THEN ts END) AS last_failure, "
        "coalesce(sum(CASE WHEN kind = 'drain' THEN 1.0 ELSE 0.0 END), 0.0) AS drains, "
        "max(CASE WHEN kind = 'drain' THEN ts END) AS last_drain "
        "FROM events WHERE node IS NOT NULL AND kind IN ('node_fail', 'drain') "
        "AND ts >= :since_ts GROUP BY node ORDER BY failures DESC, node",
        {"since_ts": since_ts})
