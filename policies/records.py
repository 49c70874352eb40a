"""The spool record, defined once: its kinds, version, fields, the one check, and constructors.

The hooks (``node_run``, ``jobcomp``), the node agent (``gpu_sample``) and ``slurmgate
reconcile`` (``jobcomp``) build records here; ``slurm_plugin.node.spool`` checks each on the
way in (``write_record``) and out (``claim_batch``); ``db.ingest`` checks each before it
touches the database. All three use ``validate``: the spool passes what the ingest takes.

Stdlib only, and nothing heavier than ``math``: compute-node hooks import this module on every
job (they must not load pydantic).

Fields
------
Every record has ``v`` (RECORD_VERSION), ``kind`` (one of KINDS), ``cluster``, ``record_id``
and ``written_at`` (the spool fills the last two). ``FIELDS`` lists each kind's own fields as
``(name, type, required)``: type ``int``, ``num`` (a finite int or float), ``str`` or ``list``.
A field that is not required may be absent or null; a required string must not be empty.
Counts, times, sizes and energies must not be negative; utilisations are percentages (0-100).
A ``gpus`` list holds objects (``GPU_FIELDS``) whose ``uuid`` is unique in the record. A
gpu_sample's GPU may carry ``job_id``, the job whose Prolog baseline on that node lists the
GPU (the agent's tag; the idle-GPU policy reads it); a daemon that predates the field
ignores it.

``flags`` (node_run: what was degraded, e.g. ``no_baseline``) is informational and not
checked: the ingest only looks for ``no_baseline`` in it and keeps it in its events.

A node_run may lack ``start_ts`` (the prolog's baseline was missing or unreadable) and then
the GPU-seconds of its GPUs: such a record is *incomplete* (``is_complete``); the ingest keeps
it as an event and charges that node's share of the allocation instead.
"""

from __future__ import annotations

import math
from typing import Any

RECORD_VERSION = 1
KINDS = ("node_run", "jobcomp", "gpu_sample")
MAX_RECORD_BYTES = 64 * 1024
"""The biggest record file the daemon reads (the spool checks the size on the open descriptor
before reading). Real records are well under 10 KiB; a bigger file is quarantined unread."""

Spec = tuple[tuple[str, str, bool], ...]
"""(field, type, required) per field."""

COMMON: Spec = (("cluster", "str", True), ("record_id", "str", True),
                ("written_at", "num", True))
FIELDS: dict[str, Spec] = {
    "node_run": (
        ("job_id", "int", True), ("restart_count", "int", True), ("node", "str", True),
        ("user", "str", False), ("account", "str", False), ("start_ts", "num", False),
        ("end_ts", "num", True), ("gpus", "list", True), ("sluid", "str", False),
    ),
    "jobcomp": (
        ("job_id", "int", True), ("restart_count", "int", False), ("state", "str", True),
        ("submit_ts", "num", False), ("start_ts", "num", False), ("end_ts", "num", False),
        ("nodes", "str", False), ("node_count", "int", False), ("partition", "str", False),
        ("uid", "int", False), ("user", "str", False), ("account", "str", False),
        ("exit_code", "str", False), ("derived_ec", "str", False),
        ("time_limit_min", "int", False), ("array_job_id", "int", False),
        ("array_task_id", "int", False), ("work_dir", "str", False),
        ("source", "str", False), ("sluid", "str", False),
    ),
    "gpu_sample": (("node", "str", True), ("ts", "num", True), ("gpus", "list", True)),
}
GPU_FIELDS: dict[str, Spec] = {
    "node_run": (
        ("index", "int", True), ("minor", "int", False), ("uuid", "str", True),
        ("gpu_type", "str", True), ("energy_j", "num", False), ("util_mean", "num", False),
        ("util_max", "num", False), ("mem_max_bytes", "int", False),
        ("gpu_seconds", "num", False),
    ),
    "gpu_sample": (
        ("uuid", "str", True), ("index", "int", True), ("gpu_type", "str", True),
        ("util", "num", True), ("mem_used_bytes", "int", True), ("power_w", "num", False),
        ("job_id", "int", False),
    ),
}
NON_NEGATIVE = frozenset({"job_id", "restart_count", "node_count", "uid", "energy_j",
                          "gpu_seconds", "mem_max_bytes", "mem_used_bytes", "power_w",
                          "util_mean", "util_max", "util", "index", "time_limit_min",
                          "array_job_id", "array_task_id", "start_ts", "end_ts",
                          "submit_ts", "written_at", "ts"})
PERCENT = frozenset({"util_mean", "util_max", "util"})

_MAX_FLOAT_INT = 2**1024
"""An int this large cannot become a float (the ingest takes times and amounts as floats)."""


# -- the check --------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -_MAX_FLOAT_INT < v < _MAX_FLOAT_INT
    return isinstance(v, float) and math.isfinite(v)


_TYPES = {"int": _is_int, "num": _is_num, "str": lambda v: isinstance(v, str),
          "list": lambda v: isinstance(v, list)}
_WHAT = {"int": "an integer", "num": "a finite number", "str": "a string", "list": "a list"}


def _fields_problem(obj: dict[str, Any], spec: Spec, where: str) -> str | None:
    for name, typ, required in spec:
        v = obj.get(name)
        if v is None:
            if required:
                return f"{where}{name} is missing"
            continue
        if not _TYPES[typ](v):
            return (f"{where}{name} must be {_WHAT[typ]}{'' if required else ' or null'}, "
                    f"got {v!r:.60}")
        if typ == "str" and required and not v:
            return f"{where}{name} must not be empty"
        if name in NON_NEGATIVE and v < 0:
            return f"{where}{name} must not be negative, got {v!r}"
        if name in PERCENT and v > 100:
            return f"{where}{name} is a percentage, got {v!r}"
    return None


def explain(record: Any) -> str | None:
    """``validate`` without the fast path: the field-by-field check that words the problem."""
    if not isinstance(record, dict):
        return f"not a JSON object (got {type(record).__name__})"
    v = record.get("v")
    if v != RECORD_VERSION or isinstance(v, bool):
        return (f"unsupported record version {v!r:.30} "
                f"(this slurmgate reads version {RECORD_VERSION})")
    kind = record.get("kind")
    if not isinstance(kind, str) or kind not in FIELDS:
        return f"unknown record kind {kind!r:.40} (known: {', '.join(KINDS)})"
    problem = _fields_problem(record, COMMON, "") or _fields_problem(record, FIELDS[kind], "")
    if problem:
        return problem
    gpu_spec = GPU_FIELDS.get(kind)
    if gpu_spec is not None:
        seen: set[str] = set()
        for i, gpu in enumerate(record["gpus"]):
            if not isinstance(gpu, dict):
                return f"gpus[{i}] must be an object"
            problem = _fields_problem(gpu, gpu_spec, f"gpus[{i}].")
            if problem:
                return problem
            if gpu["uuid"] in seen:
                return f"gpus[{i}].uuid {gpu['uuid']!r:.60} appears twice"
            seen.add(gpu["uuid"])
    start, end = record.get("start_ts"), record.get("end_ts")
    if kind == "node_run" and start is not None and end < start:
        return f"end_ts {end} is before start_ts {start}"
    if kind == "jobcomp" and start and end and end < start:  # 0: never started / ended
        return f"end_ts {end} is before start_ts {start}"
    return None


# Quick acceptance: most records are fine, and the ingest must sustain tens of thousands of
# runs a second. These predicates accept exactly what ``explain`` accepts for records made of
# JSON's types (tests/unit/test_records.py holds them to that); a record they do not accept is
# judged, and its problem worded, by ``explain``.
_INF = math.inf


def _nn(v: Any) -> bool:
    """A finite, non-negative number (not a bool)."""
    t = type(v)
    return (t is float and 0.0 <= v < _INF) or (t is int and 0 <= v < _MAX_FLOAT_INT)


def _opt_nn(v: Any) -> bool:
    return v is None or _nn(v)


def _pct(v: Any) -> bool:
    return _nn(v) and v <= 100


def _opt_pct(v: Any) -> bool:
    return v is None or (_nn(v) and v <= 100)


def _opt_str(v: Any) -> bool:
    return v is None or type(v) is str


def _uint(v: Any) -> bool:
    return type(v) is int and v >= 0


def _opt_uint(v: Any) -> bool:
    return v is None or (type(v) is int and v >= 0)


def _word(v: Any) -> bool:
    return type(v) is str and v != ""


def _quick_common(rec: dict[str, Any]) -> bool:
    return _word(rec.get("cluster")) and _word(rec.get("record_id")) and _nn(
        rec.get("written_at"))


def _quick_node_run(rec: dict[str, Any]) -> bool:
    g = rec.get
    start, end, gpus = g("start_ts"), g("end_ts"), g("gpus")
    if not (_uint(g("job_id")) and _uint(g("restart_count")) and _word(g("node"))
            and _opt_str(g("user")) and _opt_str(g("account")) and _nn(end)
            and _opt_str(g("sluid"))
            and (start is None or (_nn(start) and end >= start)) and type(gpus) is list
            and _quick_common(rec)):
        return False
    uuids = set()
    for gpu in gpus:
        if type(gpu) is not dict:
            return False
        q = gpu.get
        uuid = q("uuid")
        if not (_uint(q("index")) and _word(uuid) and _word(q("gpu_type"))
                and _opt_nn(q("gpu_seconds")) and _opt_nn(q("energy_j"))
                and _opt_pct(q("util_mean")) and _opt_pct(q("util_max"))
                and _opt_uint(q("mem_max_bytes"))
                and (q("minor") is None or type(q("minor")) is int)):
            return False
        uuids.add(uuid)
    return len(uuids) == len(gpus)


def _quick_jobcomp(rec: dict[str, Any]) -> bool:
    g = rec.get
    start, end = g("start_ts"), g("end_ts")
    return (_uint(g("job_id")) and _opt_uint(g("restart_count"))
            and _word(g("state")) and _opt_nn(g("submit_ts")) and _opt_nn(start)
            and _opt_nn(end) and not (start and end and end < start)
            and _opt_str(g("nodes")) and _opt_uint(g("node_count"))
            and _opt_str(g("partition")) and _opt_uint(g("uid")) and _opt_str(g("user"))
            and _opt_str(g("account")) and _opt_str(g("exit_code"))
            and _opt_str(g("derived_ec")) and _opt_uint(g("time_limit_min"))
            and _opt_uint(g("array_job_id")) and _opt_uint(g("array_task_id"))
            and _opt_str(g("work_dir")) and _opt_str(g("source")) and _opt_str(g("sluid"))
            and _quick_common(rec))


def _quick_gpu_sample(rec: dict[str, Any]) -> bool:
    g = rec.get
    gpus = g("gpus")
    if not (_word(g("node")) and _nn(g("ts")) and type(gpus) is list and _quick_common(rec)):
        return False
    uuids = set()
    for gpu in gpus:
        if type(gpu) is not dict:
            return False
        q = gpu.get
        uuid = q("uuid")
        if not (_word(uuid) and _uint(q("index")) and _word(q("gpu_type")) and _pct(q("util"))
                and _uint(q("mem_used_bytes")) and _opt_nn(q("power_w"))
                and _opt_uint(q("job_id"))):
            return False
        uuids.add(uuid)
    return len(uuids) == len(gpus)


QUICK = {"node_run": _quick_node_run, "jobcomp": _quick_jobcomp,
         "gpu_sample": _quick_gpu_sample}
"""Per kind, a predicate that is True exactly for the records ``explain`` accepts."""


def validate(record: Any) -> str | None:
    """None for a usable record, else one sentence saying what is wrong with it."""
    if type(record) is dict:
        v = record.get("v")
        kind = record.get("kind")
        if v == RECORD_VERSION and v is not True and type(kind) is str:
            quick = QUICK.get(kind)
            if quick is not None and quick(record):
                return None
    return explain(record)


def is_complete(record: dict[str, Any]) -> bool:
    """A valid node_run that knows its start and every GPU's GPU-seconds (other kinds: True).
    The ingest keeps an incomplete one as an event and charges the node from the
    allocation."""
    if record.get("kind") != "node_run":
        return True
    return record.get("start_ts") is not None and all(
        g.get("gpu_seconds") is not None for g in record["gpus"])


# -- constructors -----------------------------------------------------------------------------
# The spool fills v, record_id and written_at. Keys come in the order the records have always
# had (the bytes of a record are unchanged by the move here).


def node_run_gpu(*, index: int, minor: int | None, uuid: str, gpu_type: str,
                 gpu_seconds: float | None, energy_j: float | None = None,
                 util_mean: float | None = None, util_max: float | None = None,
                 mem_max_bytes: int | None = None) -> dict[str, Any]:
    """One GPU of a node_run: its identity, GPU-seconds and what NVML measured."""
    return {"index": index, "minor": minor, "uuid": uuid, "gpu_type": gpu_type,
            "energy_j": energy_j, "util_mean": util_mean, "util_max": util_max,
            "mem_max_bytes": mem_max_bytes, "gpu_seconds": gpu_seconds}


def node_run_record(*, cluster: str, job_id: int, restart_count: int, node: str,
                    user: str | None, account: str | None, start_ts: float | None,
                    end_ts: float, gpus: list[dict[str, Any]],
                    flags: list[str] | None = None, sluid: str | None = None) -> dict[str, Any]:
    """What one node says about its share of a run (the epilog). ``sluid`` (Slurm's id of
    this run, SLURM_JOB_SLUID from 25.11) is written only when Slurm gave one."""
    record = {"kind": "node_run", "cluster": cluster, "job_id": job_id,
              "restart_count": restart_count, "node": node, "user": user, "account": account,
              "start_ts": start_ts, "end_ts": end_ts, "gpus": gpus,
              "flags": [] if flags is None else flags}
    if sluid is not None:
        record["sluid"] = sluid
    return record


def jobcomp_record(*, cluster: str, job_id: int, state: str, restart_count: int | None = None,
                   submit_ts: float | None = None, start_ts: float | None = None,
                   end_ts: float | None = None, nodes: str | None = None,
                   node_count: int | None = None, partition: str | None = None,
                   uid: int | None = None, user: str | None = None, account: str | None = None,
                   exit_code: str | None = None, derived_ec: str | None = None,
                   time_limit_min: int | None = None, array_job_id: int | None = None,
                   array_task_id: int | None = None, work_dir: str | None = None,
                   source: str | None = None, sluid: str | None = None) -> dict[str, Any]:
    """A run's completion (slurmctld's jobcomp, or ``source="reconcile"`` when rebuilt from
    Slurm's view of a finished job). ``source`` and ``sluid`` (Slurm's id of this run, from
    25.11) are written only when given."""
    record = {
        "kind": "jobcomp", "cluster": cluster, "job_id": job_id,
        "restart_count": restart_count, "state": state, "submit_ts": submit_ts,
        "start_ts": start_ts, "end_ts": end_ts, "nodes": nodes, "node_count": node_count,
        "partition": partition, "uid": uid, "user": user, "account": account,
        "exit_code": exit_code, "derived_ec": derived_ec, "time_limit_min": time_limit_min,
        "array_job_id": array_job_id, "array_task_id": array_task_id, "work_dir": work_dir,
    }
    if source is not None:
        record["source"] = source
    if sluid is not None:
        record["sluid"] = sluid
    return record


def sample_gpu(*, uuid: str, index: int, gpu_type: str, util: float, mem_used_bytes: int,
               power_w: float | None, job_id: int | None = None) -> dict[str, Any]:
    """One GPU's reading in a gpu_sample. ``job_id``: the job holding the GPU (from the
    node's Prolog baselines), written only when known, so an untagged reading keeps its
    bytes."""
    gpu = {"uuid": uuid, "index": index, "gpu_type": gpu_type, "util": util,
           "mem_used_bytes": mem_used_bytes, "power_w": power_w}
    if job_id is not None:
        gpu["job_id"] = job_id
    return gpu


def gpu_sample_record(*, cluster: str, node: str, ts: float,
                      gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """One reading of every GPU of a node (the node agent)."""
    return {"kind": "gpu_sample", "cluster": cluster, "node": node, "ts": ts, "gpus": gpus}
