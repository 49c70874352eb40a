"""Ingest spool records (node_run, jobcomp, gpu_sample) into the store and settle runs.

``ingest_records(store, records, policy)`` writes a whole batch in ONE transaction and is
idempotent: ingesting the same records again changes nothing. A record that does not
validate (``policies.records.validate``, the spool's check too) is returned in ``errors`` with
the reason; it never raises and never blocks the rest. A node_run without its start time or
GPU-seconds (the prolog's baseline was missing or unreadable) is kept as an event, and the
run is charged for that node as if it had not reported.

Run matching (a run is keyed cluster, job_id, restart_count; Slurm reuses job ids after a
requeue and when the id counter wraps):

- node_run carries Slurm's restart count: it joins run (cluster, job_id, restart_count) when
  that run's time span is compatible (within JOB_ID_REUSE_GAP_S, so a wrapped job id never
  joins a months-old run), else the run whose start is within MATCH_WINDOW_S of the node's
  start, else it creates the run.
- From Slurm 25.11 node_run and jobcomp carry the run's SLUID: a record joins the run with
  that SLUID, else only a run without a SLUID, by the rules below (which older Slurm needs).
- jobcomp carries no restart count (slurmctld's jobcomp/script does not get one). It is a
  duplicate when a finished run of (cluster, job_id) has the same state, end and start. Else
  it finishes: the unfinished run with the record's restart count (when given); else the
  newest unfinished run whose start is within MATCH_WINDOW_S of the record's start; else the
  newest unfinished run that could be this one (it did not start after the record ended, nor
  end before the record started); else a new run. The new run's restart_count is the
  record's, or, without one, the number of runs of this job that started before it (a
  requeue whose earlier run's records are still in flight); when that key is taken (an old
  job with a wrapped id) it is max + 1. The key is then our ordinal, not Slurm's count.

Settlement happens when a run has its jobcomp (final state): team, project, tags and the
request (cpus, memory, GPUs) come from its reservation (matched by job id, or by the array's
job id for array tasks), else the team from the policy's account/user map. GPU-seconds and
energy are the sum over its node_run records (nodes that never reported add their share of
the allocation x elapsed), else allocated GPUs x elapsed. ``policies.cost.run_cost`` prices
it; node failures (and preemptions, when the policy says so) are credited in full once the
daemon confirmed them with Slurm, until then they are marked ``node_failure_pending`` (the
rules: ``policies.settlement``). When node records arrive after the jobcomp the run is re-settled,
and the daily rollups follow (``db.rollups``).

Writers: the daemon passes, per record, who wrote it (``writers``: 'ctld' for slurmctld's
jobcomp, 'repair' for ``reconcile --repair``, 'node:<name>'; known from the spool subdirectory
and the file's owner). A run keeps the writer of the jobcomp that settled it (``settled_by``);
a jobcomp from a different writer that would settle that run again is refused (returned in
``errors``: the daemon quarantines it), never applied. Without ``writers`` (or with None for a
record) nothing is checked.

The store is anything with ``conn`` (a ``db.backend.Connection``: SQLite or PostgreSQL, the
same SQL on both), ``transaction()`` and ``add_event()`` (``IngestStore``): db.store.Store,
which builds on this module, is one.
"""

from __future__ import annotations

import functools
import json
import operator
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from db.backend import POSTGRESQL, Connection, driver_errors
from db.rollups import RollupStore, apply_rollup_delta
from policies import settlement
from policies.records import is_complete, validate
from policies.reservations import REQUEUE_STATES as REQUEUE_STATES  # re-exported
from policies.reservations import run_settles_reservation
from policies.settlement import CostFn

if TYPE_CHECKING:
    from policies.config import Policy

RunKey = tuple[str, int, int]


class IngestStore(RollupStore, Protocol):
    """What the ingest needs of db.store.Store."""

    def add_event(self, kind: str, **fields: Any) -> int: ...


MATCH_WINDOW_S = 5.0
"""A jobcomp and a run belong together when their start times are this close."""
JOB_ID_REUSE_GAP_S = 3600.0
"""A record this far outside a run's time span belongs to another job with the same id."""
REQUEUE_LOOKBACK_S = 30 * 86400.0
"""Earlier runs of a job are looked for this far back when numbering a new run."""


def _q(name: str) -> str:
    return f'"{name}"'


RUN_COLUMNS = (
    "cluster", "job_id", "restart_count", "submit_ts", "start_ts", "end_ts", "state",
    "exit_code", "derived_ec", "user", "uid", "account", "team", "project", "cost_center",
    "tags", "partition", "nodes", "node_count", "gpu_type", "gpus", "cpus", "mem_mb",
    "time_limit_min", "rid", "gpu_seconds", "energy_j", "util_mean", "cost", "cost_gpu",
    "cost_cpu", "cost_mem", "cost_energy", "cost_idle", "credit", "credit_reason",
    "array_job_id", "array_task_id", "work_dir", "sluid", "settled_by", "jobcomp_at",
    "settled_at", "updated_at",
)
NODE_COLUMNS = (
    "cluster", "job_id", "restart_count", "node", "start_ts", "end_ts", "gpus", "gpu_type",
    "gpu_count", "gpu_seconds", "energy_j", "util_mean", "util_max", "mem_max_bytes",
    "record_id",
)
_NODE_FACTS = NODE_COLUMNS[4:14]  # what makes two node records "the same"
_RESV_COLUMNS = ", ".join(_q(c) for c in (
    "rid", "cluster", "job_id", "team", "project", "cost_center", "user", "account",
    "partition", "tags", "gpu_type", "gpus", "cpus", "mem_mb", "time_limit_min", "state",
    "created_at"))
_NODE_SELECT = ", ".join(_q(c) for c in NODE_COLUMNS)
_run_facts = operator.itemgetter(*RUN_COLUMNS[:-2])  # all but settled_at, updated_at
_node_fact_values = operator.itemgetter(*_NODE_FACTS)


def _upsert_sql(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    """An upsert whose parameters are named after the columns: a run's (or node's) row dict
    is its parameter mapping as it is."""
    cols = ", ".join(_q(c) for c in columns)
    sets = ", ".join(f"{_q(c)} = excluded.{_q(c)}" for c in columns if c not in key)
    return (f"INSERT INTO {table} ({cols}) VALUES ({', '.join(':' + c for c in columns)}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}")


_RUN_UPSERT = _upsert_sql("runs", RUN_COLUMNS, ("cluster", "job_id", "restart_count"))
_NODE_UPSERT = _upsert_sql("run_nodes", NODE_COLUMNS,
                           ("cluster", "job_id", "restart_count", "node"))
_EVENT_COLUMNS = ("ts", "kind", "cluster", "job_id", "restart_count", "team", "user", "actor",
                  "message", "detail")
_EVENT_INSERT = (f"INSERT INTO events ({', '.join(_q(c) for c in _EVENT_COLUMNS)}) "
                 f"VALUES ({', '.join(':' + c for c in _EVENT_COLUMNS)})")
_RESV_SETTLE = ("UPDATE reservations SET state = 'settled', reason = :reason, "
                "updated_at = :ts WHERE rid = :rid")


@functools.lru_cache(maxsize=256)
def _sample_insert(gpus: int) -> tuple[str, tuple[str, ...]]:
    """The statement that stores one gpu_sample record of ``gpus`` GPUs (one row each, one
    statement: its row count says whether the record was a duplicate), and its parameter
    names: node and ts, then seven per GPU. A record is at most 64 KiB, so a few hundred
    GPUs: well under either server's limit on parameters."""
    names = ["node", "ts"]
    rows = []
    for i in range(gpus):
        g = (f"u{i}", f"i{i}", f"t{i}", f"ut{i}", f"m{i}", f"p{i}", f"j{i}")
        names += g
        rows.append(f"(:node, :{g[0]}, :ts, {', '.join(':' + n for n in g[1:])})")
    sql = ("INSERT INTO gpu_samples "
           "(node, gpu_uuid, ts, gpu_index, gpu_type, util, mem_used_bytes, power_w, job_id) "
           f"VALUES {', '.join(rows)} ON CONFLICT DO NOTHING")
    return sql, tuple(names)


def _sample_params(rec: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    values = [rec["node"], float(rec["ts"])]
    for g in rec["gpus"]:
        values += (g["uuid"], g["index"], g["gpu_type"], float(g["util"]), g["mem_used_bytes"],
                   g.get("power_w"), g.get("job_id"))
    return dict(zip(names, values, strict=True))


def _one_of(conn: Connection, column: str, name: str, values: Iterable[Any],
            params: dict[str, Any]) -> str:
    """``column`` is one of ``values``: the list is ONE parameter, ``name`` (added to
    ``params``). Branches on the server, on purpose (the ingest's hot path): a batch's job
    ids and rids run to a thousand, and sqlite3 finds each named parameter by a linear scan
    of the statement's names, so an ``IN (:v_0, ..., :v_999)`` list (db.backend.split_in)
    binds in quadratic time: 2 ms a statement, which made a replayed batch of 1000 records
    (all duplicates) 20% slower and one record per call 35% slower (CPU time) than the JSON
    list the ingest has always passed SQLite. PostgreSQL takes the list as one array
    parameter (one statement, one plan whatever the batch's size). Both servers search the
    primary key's index with it."""
    items = sorted(set(values))
    if conn.dialect == POSTGRESQL:
        params[name] = items
        return f"{column} = ANY(:{name})"
    params[name] = json.dumps(items)
    return f"{column} IN (SELECT value FROM json_each(:{name}))"


@functools.cache
def _retry_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "the server, not the record": locked past busy_timeout or
    lock_timeout, a statement timeout, a deadlock, disk full, the connection lost. Each
    driver names them OperationalError (DB-API 2)."""
    return driver_errors("OperationalError")


@dataclass
class IngestResult:
    """What one batch did. ``errors`` holds (record, reason) for records NOT ingested."""

    counts: dict[str, int] = field(default_factory=dict)
    runs_touched: list[RunKey] = field(default_factory=list)
    errors: list[tuple[Any, str]] = field(default_factory=list)
    duplicates: int = 0
    settled: list[RunKey] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# -- node facts -----------------------------------------------------------------------------


_GPUS_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _node_row(rec: dict[str, Any], restart_count: int) -> dict[str, Any]:
    gpus = rec["gpus"]
    seconds = 0.0
    energy = util_w = util_s = util_plain = 0.0
    n_energy = n_util = 0
    util_max: float | None = None
    mem_max: int | None = None
    by_type: dict[str, float] = {}
    for g in gpus:
        gs = float(g["gpu_seconds"])
        seconds += gs
        t = g["gpu_type"]
        by_type[t] = by_type.get(t, 0.0) + gs
        e = g.get("energy_j")
        if e is not None:
            energy += e
            n_energy += 1
        u = g.get("util_mean")
        if u is not None:
            util_w += u * gs
            util_s += gs
            util_plain += u
            n_util += 1
        u = g.get("util_max")
        if u is not None and (util_max is None or u > util_max):
            util_max = u
        m = g.get("mem_max_bytes")
        if m is not None and (mem_max is None or m > mem_max):
            mem_max = m
    if util_s > 0:
        util_mean: float | None = util_w / util_s
    elif n_util and n_util == len(gpus):
        util_mean = util_plain / n_util
    else:
        util_mean = None
    if len(by_type) == 1:
        gpu_type: str | None = t
    else:
        gpu_type = max(by_type, key=lambda k: (by_type[k], k)) if by_type else None
    return {
        "cluster": rec["cluster"], "job_id": rec["job_id"], "restart_count": restart_count,
        "node": rec["node"], "start_ts": float(rec["start_ts"]), "end_ts": float(rec["end_ts"]),
        "gpus": _GPUS_JSON(gpus), "gpu_type": gpu_type, "gpu_count": len(gpus),
        "gpu_seconds": seconds, "energy_j": energy if n_energy else None,
        "util_mean": util_mean, "util_max": util_max, "mem_max_bytes": mem_max,
        "record_id": rec["record_id"],
    }


def _by_sluid(runs: list[_Run], sluid: Any) -> tuple[_Run | None, list[_Run]]:
    """For a record naming run ``sluid`` (Slurm 25.11 and later): the run with that SLUID if
    the ledger has it, and the runs it could still be (those without another SLUID)."""
    if not sluid:
        return None, runs
    same = next((r for r in runs if r.row["sluid"] == sluid), None)
    return same, [r for r in runs if r.row["sluid"] is None]


def _close(a: float | None, b: float | None, tol: float = 1e-3) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol


def _ts(v: Any) -> float | None:
    """Slurm writes 0 for a time that never happened (a job cancelled while pending)."""
    return float(v) if v else None


# -- the batch --------------------------------------------------------------------------------


class _Run:
    __slots__ = ("row", "old", "nodes", "changed")

    def __init__(self, row: dict[str, Any], old: dict[str, Any] | None) -> None:
        self.row = row
        self.old = old
        self.nodes: dict[str, dict[str, Any]] = {}
        self.changed: set[str] = set()  # node names written in this batch

    @property
    def key(self) -> RunKey:
        r = self.row
        return (r["cluster"], r["job_id"], r["restart_count"])

    def span(self) -> tuple[float | None, float | None]:
        r = self.row
        lo = r["start_ts"] if r["start_ts"] is not None else (r["submit_ts"] or r["end_ts"])
        hi = r["end_ts"] if r["end_ts"] is not None else lo
        if lo is not None and hi is not None and hi < lo:
            hi = lo
        return lo, hi

    def compatible(self, start: float | None, end: float | None) -> bool:
        """Could a record spanning [start, end] belong to this run (not a wrapped job id)?"""
        lo, hi = self.span()
        if lo is None or hi is None:
            return True
        s = start if start is not None else end
        e = end if end is not None else start
        if s is None or e is None:
            return True
        return s <= hi + JOB_ID_REUSE_GAP_S and e >= lo - JOB_ID_REUSE_GAP_S


class _Batch:
    def __init__(self, store: IngestStore, policy: Policy, cost_fn: CostFn | None,
                 now: float) -> None:
        self.store = store
        self.conn = store.conn
        self.policy = policy
        if cost_fn is None:
            from policies.cost import run_cost

            cost_fn = run_cost
        self.cost_fn: CostFn = cost_fn
        self.now = now
        self.jobs: dict[tuple[str, int], list[_Run]] = {}
        self.dirty: dict[RunKey, _Run] = {}
        self.resv_by_job: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.resv_by_rid: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self.warnings: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.settled: list[RunKey] = []
        self.refused: list[tuple[dict[str, Any], str]] = []

    # loading ---------------------------------------------------------------------------------

    def load(self, job_keys: set[tuple[str, int]]) -> None:
        by_cluster: dict[str, list[int]] = {}
        for cluster, job_id in job_keys:
            by_cluster.setdefault(cluster, []).append(job_id)
            self.jobs.setdefault((cluster, job_id), [])
        resv_jobs: dict[str, set[int]] = {c: set(ids) for c, ids in by_cluster.items()}
        rids: set[str] = set()
        for cluster, ids in by_cluster.items():
            params: dict[str, Any] = {"cluster": cluster}
            jobs = _one_of(self.conn, "job_id", "ids", ids, params)
            cur = self.conn.execute(
                f"SELECT * FROM runs WHERE cluster = :cluster AND {jobs}", params)
            names = [d[0] for d in cur.description]
            for values in cur.fetchall():
                row = dict(zip(names, values, strict=True))
                run = _Run(row, dict(row))
                self.jobs[(cluster, row["job_id"])].append(run)
                if row["array_job_id"] is not None:
                    resv_jobs[cluster].add(row["array_job_id"])
                if row["rid"]:
                    rids.add(row["rid"])
            cur = self.conn.execute(
                f"SELECT {_NODE_SELECT} FROM run_nodes WHERE cluster = :cluster AND {jobs}",
                params)
            index = {run.key: run for job_id in ids for run in self.jobs[(cluster, job_id)]}
            for values in cur.fetchall():
                node = dict(zip(NODE_COLUMNS, values, strict=True))
                owner = index.get((cluster, node["job_id"], node["restart_count"]))
                if owner is not None:
                    owner.nodes[node["node"]] = node
        self._resv_jobs = resv_jobs
        self._resv_rids = rids

    def load_reservations(self, extra_jobs: dict[str, set[int]]) -> None:
        for cluster, ids in extra_jobs.items():
            self._resv_jobs.setdefault(cluster, set()).update(ids)
        queries: list[tuple[str, dict[str, Any]]] = []
        for cluster, ids in self._resv_jobs.items():
            params: dict[str, Any] = {"cluster": cluster}
            jobs = _one_of(self.conn, "job_id", "ids", ids, params)
            by_rid = _one_of(self.conn, "rid", "rids", self._resv_rids, params)
            queries.append((f"(cluster = :cluster AND {jobs}) OR {by_rid}", params))
        if not self._resv_jobs and self._resv_rids:
            params = {}
            queries.append((_one_of(self.conn, "rid", "rids", self._resv_rids, params), params))
        for where, params in queries:
            cur = self.conn.execute(
                f"SELECT {_RESV_COLUMNS} FROM reservations WHERE {where}", params)
            names = [d[0] for d in cur.description]
            for values in cur.fetchall():
                self._add_resv(dict(zip(names, values, strict=True)))

    def _add_resv(self, resv: dict[str, Any]) -> None:
        if resv["rid"] in self.resv_by_rid:
            return
        self.resv_by_rid[resv["rid"]] = resv
        if resv["job_id"] is not None:
            self.resv_by_job.setdefault((resv["cluster"], resv["job_id"]), []).append(resv)

    # matching ---------------------------------------------------------------------------------

    def _new_run(self, cluster: str, job_id: int, restart_count: int) -> _Run:
        row: dict[str, Any] = dict.fromkeys(RUN_COLUMNS)
        row.update(cluster=cluster, job_id=job_id, restart_count=restart_count, credit=0.0)
        run = _Run(row, None)
        self.jobs[(cluster, job_id)].append(run)
        return run

    @staticmethod
    def _free_key(runs: list[_Run], wanted: int) -> int:
        taken = {r.row["restart_count"] for r in runs}
        if wanted not in taken:
            return wanted
        return max(taken) + 1

    def add_node_run(self, rec: dict[str, Any]) -> bool:
        cluster, job_id, restart = rec["cluster"], rec["job_id"], rec["restart_count"]
        start, end = float(rec["start_ts"]), float(rec["end_ts"])
        runs = self.jobs[(cluster, job_id)]
        run, could_be = _by_sluid(runs, rec.get("sluid"))
        if run is None:
            run = next((r for r in could_be if r.row["restart_count"] == restart
                        and r.compatible(start, end)), None)
        if run is None:
            near = [r for r in could_be if r.row["start_ts"] is not None
                    and abs(r.row["start_ts"] - start) <= MATCH_WINDOW_S]
            run = max(near, key=lambda r: r.row["restart_count"]) if near else None
        if run is None:
            run = self._new_run(cluster, job_id, self._free_key(runs, restart))
        node = _node_row(rec, run.row["restart_count"])
        old = run.nodes.get(rec["node"])
        if old is not None and _node_fact_values(old) == _node_fact_values(node):
            self.duplicates += 1
            return False
        run.nodes[rec["node"]] = node
        run.changed.add(rec["node"])
        row = run.row
        if row["jobcomp_at"] is None:  # until the jobcomp says, the nodes define the span
            row["start_ts"] = start if row["start_ts"] is None else min(row["start_ts"], start)
            row["end_ts"] = end if row["end_ts"] is None else max(row["end_ts"], end)
        if row["user"] is None:
            row["user"] = rec.get("user")
        if row["account"] is None:
            row["account"] = rec.get("account")
        if row["sluid"] is None:
            row["sluid"] = rec.get("sluid")
        self.dirty[run.key] = run
        return True

    def _settled_target(self, runs: list[_Run], rec: dict[str, Any], start: float | None,
                        end: float | None) -> _Run | None:
        """The finished run this jobcomp is about, if any (same restart count, or a start
        within MATCH_WINDOW_S; without either, an end within it)."""
        rc = rec.get("restart_count")
        for r in runs:
            row = r.row
            if row["state"] is None:
                continue
            if rc is not None and row["restart_count"] == rc and r.compatible(start, end):
                return r
            if start is not None:
                if row["start_ts"] is not None and abs(row["start_ts"] - start) <= MATCH_WINDOW_S:
                    return r
            elif end is not None and row["end_ts"] is not None \
                    and abs(row["end_ts"] - end) <= MATCH_WINDOW_S:
                return r
        return None

    def add_jobcomp(self, rec: dict[str, Any], writer: str | None = None) -> bool:
        cluster, job_id = rec["cluster"], rec["job_id"]
        state = rec["state"].split()[0].upper()
        start, end = _ts(rec.get("start_ts")), _ts(rec.get("end_ts"))
        runs = self.jobs[(cluster, job_id)]
        for r in runs:
            row = r.row
            if row["jobcomp_at"] is None or row["state"] != state:
                continue
            if start is None and end is None:
                same = _close(row["jobcomp_at"], float(rec["written_at"]))
            else:
                same = ((end is None or _close(row["end_ts"], end))
                        and (start is None or _close(row["start_ts"], start)))
            if same:
                self.duplicates += 1
                return False
        if writer is not None:
            settled = self._settled_target(runs, rec, start, end)
            by = settled.row.get("settled_by") if settled is not None else None
            if settled is not None and by is not None and by != writer:
                key = "/".join(str(k) for k in settled.key)
                self.refused.append((rec, f"run {key} was settled by {by}; a jobcomp from "
                                          f"{writer} may not settle it again"))
                return False
        run, unfinished = _by_sluid([r for r in runs if r.row["state"] is None],
                                    rec.get("sluid"))
        rc = rec.get("restart_count")
        if run is None and rc is not None:
            run = next((r for r in unfinished if r.row["restart_count"] == rc
                        and r.compatible(start, end)), None)
        if run is None and start is not None:
            near = [r for r in unfinished if r.row["start_ts"] is not None
                    and abs(r.row["start_ts"] - start) <= MATCH_WINDOW_S]
            run = max(near, key=lambda r: r.row["restart_count"]) if near else None
        if run is None:
            ref_end = end if end is not None else start
            plausible = [
                r for r in unfinished
                if r.compatible(start, end)
                and not (r.row["start_ts"] is not None and ref_end is not None
                         and r.row["start_ts"] > ref_end + MATCH_WINDOW_S)
                and not (r.row["end_ts"] is not None and start is not None
                         and start > r.row["end_ts"] + MATCH_WINDOW_S)
            ]
            run = max(plausible, key=lambda r: r.row["restart_count"]) if plausible else None
        if run is None:
            if rc is None:
                rc = 0
                if start is not None:
                    rc = sum(1 for r in runs if r.row["start_ts"] is not None
                             and start - REQUEUE_LOOKBACK_S < r.row["start_ts"]
                             < start - MATCH_WINDOW_S)
            run = self._new_run(cluster, job_id, self._free_key(runs, rc))
        row = run.row
        row["state"] = state
        row["jobcomp_at"] = float(rec["written_at"])
        if writer is not None:
            row["settled_by"] = writer
        if start is not None:
            row["start_ts"] = start
        if end is not None:
            row["end_ts"] = end
        elif row["end_ts"] is None:
            row["end_ts"] = start if start is not None else float(rec["written_at"])
        if _ts(rec.get("submit_ts")) is not None:
            row["submit_ts"] = _ts(rec.get("submit_ts"))
        for name in ("exit_code", "derived_ec", "uid", "user", "account", "partition", "nodes",
                     "node_count", "time_limit_min", "array_task_id", "work_dir", "sluid"):
            if rec.get(name) is not None:
                row[name] = rec[name]
        if rec.get("array_job_id"):
            row["array_job_id"] = rec["array_job_id"]
        self.dirty[run.key] = run
        return True

    def mark_dirty(self, keys: Iterable[RunKey]) -> None:
        for cluster, job_id, restart in keys:
            for run in self.jobs.get((cluster, job_id), []):
                if run.row["restart_count"] == restart:
                    self.dirty[run.key] = run

    # settlement -------------------------------------------------------------------------------

    def _reservation_for(self, run: _Run) -> dict[str, Any] | None:
        row = run.row
        if row["rid"]:
            return self.resv_by_rid.get(row["rid"])
        when = row["submit_ts"] or row["start_ts"] or row["end_ts"]
        for job_id in (row["job_id"], row["array_job_id"]):
            if job_id is None:
                continue
            cands = [r for r in self.resv_by_job.get((row["cluster"], job_id), [])
                     if when is None or r["created_at"] <= when + 60]
            if cands:
                return max(cands, key=lambda r: r["created_at"])
        return None

    def _aggregate_nodes(self, run: _Run) -> None:
        row = run.row
        nodes = run.nodes.values()
        if not nodes:
            return
        if row["jobcomp_at"] is None:
            row["start_ts"] = min(n["start_ts"] for n in nodes)
            row["end_ts"] = max(n["end_ts"] for n in nodes)
        energy = [n["energy_j"] for n in nodes if n["energy_j"] is not None]
        row["energy_j"] = sum(energy) if energy else None
        with_util = [n for n in nodes if n["util_mean"] is not None]
        weight = sum(n["gpu_seconds"] for n in with_util)
        if weight > 0:
            row["util_mean"] = sum(n["util_mean"] * n["gpu_seconds"] for n in with_util) / weight
        elif with_util:
            row["util_mean"] = sum(n["util_mean"] for n in with_util) / len(with_util)
        by_type: dict[str, float] = {}
        for n in nodes:
            if n["gpu_type"]:
                by_type[n["gpu_type"]] = by_type.get(n["gpu_type"], 0.0) + n["gpu_seconds"]
        if by_type:
            row["gpu_type"] = max(by_type, key=lambda t: (by_type[t], t))
        row["gpu_seconds"] = sum(n["gpu_seconds"] for n in nodes)

    def _fill_from_reservation(self, run: _Run) -> dict[str, Any] | None:
        row = run.row
        resv = self._reservation_for(run)
        if resv is not None:
            row["rid"] = resv["rid"]
            for name in ("team", "project", "cost_center", "tags", "cpus", "mem_mb"):
                row[name] = resv[name]
            row["gpus"] = resv["gpus"]
            if not run.nodes and resv["gpu_type"]:
                row["gpu_type"] = resv["gpu_type"]
            for name in ("user", "account", "partition", "time_limit_min"):
                if row[name] is None:
                    row[name] = resv[name]
        elif run.nodes:
            # no request known: the allocation is what the nodes reported, scaled to the
            # job's node count when some nodes never reported
            per_node = sum(n["gpu_count"] for n in run.nodes.values()) / len(run.nodes)
            row["gpus"] = per_node * max(row["node_count"] or 0, len(run.nodes))
        if row["team"] is None:
            row["team"] = self.policy.team_for(row["account"], row["user"])
        if row["cost_center"] is None and row["team"] in self.policy.teams:
            row["cost_center"] = self.policy.teams[row["team"]].cost_center or None
        return resv

    def _settle(self, run: _Run) -> None:
        row = run.row
        use = settlement.usage(row, run.nodes.values())
        try:
            total = settlement.price(use, row, self.policy, self.cost_fn)
        except (ValueError, TypeError, KeyError) as exc:
            key = "/".join(str(k) for k in run.key)
            msg = f"run {key} cannot be settled: {exc}"
            self.warnings.append(msg)
            self.events.append({
                "ts": self.now, "kind": "settle_error", "cluster": row["cluster"],
                "job_id": row["job_id"], "restart_count": row["restart_count"],
                "team": row["team"], "user": row["user"], "message": msg, "detail": None,
            })
            return
        if row["gpu_type"] is None and use.gpu_seconds > 0:
            row["gpu_type"] = settlement.default_gpu_type(self.policy, row["partition"])
        row["gpu_seconds"] = use.gpu_seconds
        row.update(settlement.charges(total, row["util_mean"]))
        self._credit(run)

    def _credit(self, run: _Run) -> None:
        row = run.row
        decided = settlement.auto_credit(row["state"], row["cost"], row["credit_reason"],
                                         self.policy.requeue)
        if decided is None:
            return  # an admin's credit stands
        credit, reason = decided
        # a failure is credited once the failure handler confirmed it with Slurm
        # (Store.confirm_failure_credit); a pending credit (0) logs no event
        first = (reason is not None and reason not in settlement.PENDING_CREDIT_REASONS
                 and row["credit_reason"] != reason)
        row["credit"], row["credit_reason"] = credit, reason
        if first:
            self.events.append({
                "ts": self.now, "kind": "credit", "cluster": row["cluster"],
                "job_id": row["job_id"], "restart_count": row["restart_count"],
                "team": row["team"], "user": row["user"], "actor": "slurmgate",
                "message": f"{row['state']}: run credited ({reason})",
                "detail": json.dumps({"amount": credit, "reason": reason}),
            })

    def finish(self) -> list[RunKey]:
        """Aggregate node facts, settle finished runs, write everything. Returns run keys
        whose row changed."""
        resv_updates: list[dict[str, Any]] = []
        touched: list[RunKey] = []
        run_rows: list[dict[str, Any]] = []
        node_rows: list[dict[str, Any]] = []
        rollup: list[tuple[dict[str, Any] | None, dict[str, Any]]] = []
        for run in self.dirty.values():
            row = run.row
            self._aggregate_nodes(run)
            resv = self._fill_from_reservation(run)
            if row["state"] is not None:
                self._settle(run)
            for name in run.changed:
                node_rows.append(run.nodes[name])
            old = run.old
            if old is not None and _run_facts(old) == _run_facts(row):
                continue
            if row["cost"] is not None and (
                    old is None or _settled_facts(old) != _settled_facts(row)):
                row["settled_at"] = self.now
                self.settled.append(run.key)
            row["updated_at"] = self.now
            run_rows.append(row)
            touched.append(run.key)
            rollup.append((old, row))
            if (resv is not None and run_settles_reservation(row)
                    and resv["state"] != "settled"):
                reason = f"run {'/'.join(str(k) for k in run.key)} {row['state']}"
                resv_updates.append({"reason": reason, "ts": self.now, "rid": resv["rid"]})
                resv["state"] = "settled"
        # the rows are their own parameters (named after the columns): nothing is copied
        if node_rows:
            self.conn.executemany(_NODE_UPSERT, node_rows)
        if run_rows:
            self.conn.executemany(_RUN_UPSERT, run_rows)
        if rollup:
            apply_rollup_delta(self.conn, rollup)
        if resv_updates:
            self.conn.executemany(_RESV_SETTLE, resv_updates)
        if self.events:
            self.conn.executemany(_EVENT_INSERT, [{c: e.get(c) for c in _EVENT_COLUMNS}
                                                  for e in self.events])
        return touched


# Run columns whose change means the run was (re-)settled.
_settled_facts = operator.itemgetter(
    "cost", "cost_gpu", "cost_cpu", "cost_mem", "cost_energy", "cost_idle", "credit",
    "gpu_seconds", "energy_j", "end_ts", "team", "project", "cost_center", "user", "account",
    "partition", "gpu_type")


# -- entry points ------------------------------------------------------------------------------


_Item = tuple[str, dict[str, Any], str | None]
"""(kind, record, writer) of one valid record."""


def _run_batch(store: IngestStore, policy: Policy, records: list[_Item],
               cost_fn: CostFn | None, now: float, result: IngestResult) -> None:
    samples: list[dict[str, Any]] = []
    node_runs: list[dict[str, Any]] = []
    jobcomps: list[tuple[dict[str, Any], str | None]] = []
    for kind, rec, writer in records:
        if kind == "gpu_sample":
            samples.append(rec)
        elif kind == "node_run":
            node_runs.append(rec)
        else:
            jobcomps.append((rec, writer))
    conn: Connection = store.conn
    for rec in samples:
        if not rec["gpus"]:
            continue
        # one statement per record, as executemany was: a record none of whose GPUs is new
        # (ON CONFLICT DO NOTHING inserted no row) is a duplicate
        sql, names = _sample_insert(len(rec["gpus"]))
        if conn.execute(sql, _sample_params(rec, names)).rowcount == 0:
            result.duplicates += 1
    if not node_runs and not jobcomps:
        return
    batch = _Batch(store, policy, cost_fn, now)
    batch.load({(r["cluster"], r["job_id"]) for r in node_runs}
               | {(r["cluster"], r["job_id"]) for r, _ in jobcomps})
    extra: dict[str, set[int]] = {}
    for r, _ in jobcomps:
        if r.get("array_job_id"):
            extra.setdefault(r["cluster"], set()).add(r["array_job_id"])
    batch.load_reservations(extra)
    node_runs.sort(key=lambda r: (r["start_ts"], r["node"]))
    jobcomps.sort(key=lambda rw: (_ts(rw[0].get("start_ts")) or _ts(rw[0].get("end_ts"))
                                  or 0.0, _ts(rw[0].get("end_ts")) or 0.0))
    for rec in node_runs:
        batch.add_node_run(rec)
    for rec, writer in jobcomps:
        batch.add_jobcomp(rec, writer)
    result.errors.extend(batch.refused)
    result.runs_touched.extend(batch.finish())
    result.duplicates += batch.duplicates
    result.settled.extend(batch.settled)
    result.warnings.extend(batch.warnings)


def ingest_records(store: IngestStore, records: list[Any], policy: Policy, *,
                   now: float | None = None, cost_fn: CostFn | None = None,
                   writers: Sequence[str | None] | None = None) -> IngestResult:
    """Validate and ingest a batch in one transaction; see the module docstring.

    ``writers`` (parallel to ``records``) says who wrote each record; a jobcomp that would
    settle a run another writer settled lands in ``errors``.

    A database error that is the server's, not a record's (locked past busy_timeout or
    lock_timeout, a statement timeout, disk full, the connection lost: the driver's
    OperationalError) raises and writes nothing: the caller keeps the records and retries.
    Any other failure inside the batch falls back to one record per savepoint (on
    PostgreSQL a failed statement aborts the transaction it is in: the savepoint is what
    lets the others go on), so only the record that fails lands in errors.
    """
    ts = time.time() if now is None else now
    result = IngestResult()
    valid: list[_Item] = []
    incomplete: list[dict[str, Any]] = []
    if writers is not None and len(writers) != len(records):
        raise ValueError("writers must name one writer per record")
    for n, rec in enumerate(records):
        writer = writers[n] if writers is not None else None
        if _without_baseline(rec):
            incomplete.append(rec)
            continue
        problem = validate(rec)
        if problem is not None:
            result.errors.append((rec, problem))
            continue
        if not is_complete(rec):
            incomplete.append(rec)
            continue
        valid.append((rec["kind"], rec, writer))
    if incomplete:
        _note_incomplete(store, incomplete, ts, result)
    if not valid:
        return result
    early = list(result.errors)
    try:
        with store.transaction():
            _run_batch(store, policy, valid, cost_fn, ts, result)
    except _retry_errors():
        raise
    except Exception:
        result = IngestResult(errors=list(early))
        with store.transaction():
            for kind, rec, writer in valid:
                one = IngestResult()
                try:
                    with store.transaction():  # inside the batch's: a savepoint
                        _run_batch(store, policy, [(kind, rec, writer)], cost_fn, ts, one)
                except _retry_errors():
                    raise
                except Exception as exc:  # a bug must not block the other records
                    result.errors.append((rec, f"internal error while ingesting: {exc!r}"))
                    continue
                _merge(result, one)
                if one.errors:
                    result.errors.extend(one.errors)
                    continue
                result.counts[kind] = result.counts.get(kind, 0) + 1
        return result
    refused = {id(rec) for rec, _ in result.errors}
    for kind, rec, _ in valid:
        if id(rec) not in refused:
            result.counts[kind] = result.counts.get(kind, 0) + 1
    result.runs_touched = list(dict.fromkeys(result.runs_touched))
    return result


def _without_baseline(rec: Any) -> bool:
    """An epilog that found no prolog baseline knows neither start time nor GPU-seconds.
    Looser than ``validate`` (the ingest has always taken these as they come); any other
    node_run without its start or GPU-seconds is incomplete once it validates."""
    return (isinstance(rec, dict) and rec.get("kind") == "node_run"
            and rec.get("start_ts") is None and isinstance(rec.get("flags"), list)
            and "no_baseline" in rec["flags"] and isinstance(rec.get("job_id"), int)
            and isinstance(rec.get("cluster"), str) and isinstance(rec.get("node"), str))


def _note_incomplete(store: IngestStore, recs: list[dict[str, Any]], ts: float,
                     result: IngestResult) -> None:
    """Keep what such a record says as an event; the run is then settled as if the node had
    not reported (its share of allocation x elapsed), never at zero."""
    with store.transaction():
        for rec in recs:
            flags = rec.get("flags")
            if isinstance(flags, list) and "no_baseline" in flags:
                why = "reported no prolog baseline"
            elif rec.get("start_ts") is None:
                why = "reported no start time"
            else:
                why = "reported GPUs without their GPU-seconds"
            msg = (f"node {rec['node']} of job {rec['job_id']} {why}; "
                   "its GPU time is charged from the allocation")
            store.add_event("settle_warning", ts=ts, cluster=rec["cluster"],
                            job_id=rec["job_id"], restart_count=rec.get("restart_count"),
                            node=rec["node"], user=rec.get("user"), message=msg,
                            detail={"flags": flags, "gpus": rec.get("gpus"),
                                    "record_id": rec.get("record_id")})
            result.warnings.append(msg)
    result.counts["node_run_incomplete"] = len(recs)


def _merge(into: IngestResult, one: IngestResult) -> None:
    into.runs_touched.extend(k for k in one.runs_touched if k not in into.runs_touched)
    into.duplicates += one.duplicates
    into.settled.extend(one.settled)
    into.warnings.extend(one.warnings)


def resettle_runs(store: IngestStore, keys: Iterable[RunKey], policy: Policy, *,
                  now: float | None = None, cost_fn: CostFn | None = None) -> list[RunKey]:
    """Settle the given runs again (after a late reservation bind, a policy change, or a
    credit rule change). Returns the runs whose row changed."""
    keys = list(keys)
    if not keys:
        return []
    batch = _Batch(store, policy, cost_fn, time.time() if now is None else now)
    with store.transaction():
        batch.load({(c, j) for c, j, _ in keys})
        batch.load_reservations({})
        batch.mark_dirty(keys)
        return batch.finish()
