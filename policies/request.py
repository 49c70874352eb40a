"""A job as slurmgate sees it at submit time: the job_desc fields job_submit.lua sends.

The Lua shim sends raw values; Slurm marks unset numbers with NO_VAL sentinels, which
``JobRequest.from_wire`` turns into None so nothing downstream needs to know them.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

# Slurm's "not set" sentinels are NO_VAL/INFINITE at each width. Lua numbers are doubles, so
# 64-bit sentinels arrive rounded: anything at or above the 32-bit NO_VAL counts as unset, and
# 16-bit fields also drop NO_VAL16/INFINITE16.
_UNSET_32 = 0xFFFFFFFE
_UNSET_16 = 0xFFFE
_U16_FIELDS = {"cpus_per_task", "ntasks_per_node"}

_INT_FIELDS = (
    "uid", "time_limit", "min_nodes", "max_nodes", "num_tasks", "ntasks_per_node",
    "cpus_per_task", "min_cpus", "min_mem_per_node", "min_mem_per_cpu", "pn_min_memory",
    "nice", "job_id", "sockets_per_node",
)
_STR_FIELDS = (
    "user", "account", "partition", "comment", "wckey", "name", "work_dir", "array_inx",
    "tres_per_job", "tres_per_node", "tres_per_socket", "tres_per_task", "gres", "script_head",
    "qos", "exc_nodes", "admin_comment", "features",
)


MAX_TEXT = 4096
"""Longest text field a submission may carry (job names, paths, GRES specs)."""
MAX_COMMENT = 1 << 20
"""--comment is checked against tags.max_length; this only bounds the work before that."""
MAX_PARTITIONS = 8
"""Partitions one job may list (-p a,b,...): each is priced."""
MAX_ARRAY_SPEC = 1024
"""Longest --array text; its tasks are counted arithmetically (policies.gpu.parse_array)."""
_LIMITS = {"comment": MAX_COMMENT, "array_inx": MAX_ARRAY_SPEC}
_FIELD_NAMES = {
    "account": "--account", "partition": "--partition", "comment": "--comment",
    "wckey": "--wckey", "name": "the job name (-J)", "work_dir": "the working directory",
    "array_inx": "--array", "tres_per_job": "--gpus", "tres_per_node": "--gres",
    "tres_per_socket": "--gpus-per-socket", "tres_per_task": "--gpus-per-task",
    "qos": "--qos", "exc_nodes": "--exclude", "features": "--constraint",
    "user": "the user name",
}


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def field_label(key: str) -> str:
    """How a user knows a job_desc field: the sbatch option where there is one."""
    return _FIELD_NAMES.get(key, key)


def wire_problems(raw: dict[str, Any]) -> list[str]:
    """What is wrong with a submission's fields, as sentences naming the option to fix.

    Checked before any other work: text must be valid UTF-8 (the wire keeps invalid bytes as
    surrogates, see protocol.decode) without control characters, and bounded in length;
    numbers must be whole and within 64 bits; at most MAX_PARTITIONS partitions. Sentinels
    (Slurm's NO_VAL, INFINITE) are fine: from_wire drops them."""
    problems: list[str] = []
    for key in _STR_FIELDS:
        v = raw.get(key)
        if v is None:
            continue
        if not isinstance(v, str):
            if not isinstance(v, int | float | bool):
                problems.append(f"{field_label(key)} is not text")
            continue
        limit = _LIMITS.get(key, MAX_TEXT)
        if len(v) > limit:
            problems.append(f"{field_label(key)} is {len(v)} characters long; the limit is "
                            f"{limit}")
            continue
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"{field_label(key)} contains bytes that are not valid UTF-8; "
                            "use plain text")
            continue
        if _CONTROL.search(v):
            problems.append(f"{field_label(key)} contains control characters; use plain text")
    for key in _INT_FIELDS:
        v = raw.get(key)
        if v is None or isinstance(v, bool):
            continue
        if not isinstance(v, int | float):
            problems.append(f"{field_label(key)} is not a number")
        elif v != v or v in (float("inf"), float("-inf")) or abs(v) >= 2.0 ** 64:
            problems.append(f"{field_label(key)} is out of range")
        elif isinstance(v, float) and not v.is_integer():
            problems.append(f"{field_label(key)} is not a whole number")
    part = raw.get("partition")
    if isinstance(part, str) and len([p for p in part.split(",") if p.strip()]) > MAX_PARTITIONS:
        problems.append(f"--partition lists more than {MAX_PARTITIONS} partitions; "
                        "name at most that many")
    return problems


class JobRequest(BaseModel):
    """What the policy needs to know about a submission. Times are in minutes, memory in MB."""

    model_config = ConfigDict(extra="ignore")

    user: str = ""
    uid: int | None = None
    account: str | None = None
    partition: str | None = None
    comment: str | None = None
    wckey: str | None = None
    name: str | None = None
    work_dir: str | None = None
    time_limit: int | None = None
    min_nodes: int | None = None
    max_nodes: int | None = None
    num_tasks: int | None = None
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    min_cpus: int | None = None
    min_mem_per_node: int | None = None
    min_mem_per_cpu: int | None = None
    array_inx: str | None = None
    tres_per_job: str | None = None
    tres_per_node: str | None = None
    tres_per_socket: str | None = None
    tres_per_task: str | None = None
    qos: str | None = None
    exc_nodes: str | None = None
    admin_comment: str | None = None
    """The job's admin comment as it stands (other tools' text is kept when slurmgate writes)."""
    features: str | None = None
    """--constraint, e.g. "h100|a100"."""
    job_id: int | None = None
    batch: bool = True
    requeue: bool | None = None
    sockets_per_node: int | None = None

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> JobRequest:
        """Build from job_submit.lua's JSON: drop sentinels, empty strings and wrong types."""
        clean: dict[str, Any] = {}
        for key in _INT_FIELDS:
            v = raw.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if v != v or v < 0 or v >= _UNSET_32:  # NaN, negative, sentinel
                continue
            v = int(v)
            if key in _U16_FIELDS and v >= _UNSET_16:
                continue
            clean[key] = v
        for key in _STR_FIELDS:
            v = raw.get(key)
            if isinstance(v, str) and v != "":
                clean[key] = v
        # pn_min_memory mixes per-node and per-CPU memory behind a flag bit that a double
        # cannot carry; the Lua shim sends min_mem_per_node/min_mem_per_cpu instead.
        clean.pop("pn_min_memory", None)
        # Older field name: job_desc.gres is tres_per_node with "gres:" prefixes.
        gres = clean.pop("gres", None)
        if gres and "tres_per_node" not in clean:
            clean["tres_per_node"] = gres
        if isinstance(raw.get("batch"), bool):
            clean["batch"] = raw["batch"]
        rq = raw.get("requeue")
        if isinstance(rq, int | float) and not isinstance(rq, bool):
            if 0 <= rq < _UNSET_16:
                clean["requeue"] = bool(rq)
        elif isinstance(raw.get("requeue"), bool):
            clean["requeue"] = raw["requeue"]
        return cls.model_validate(clean)
