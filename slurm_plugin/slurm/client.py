"""The Slurm client layer: one interface for everything slurmgate asks of Slurm.

``SlurmClient`` is what the daemon, the requeue handler and the TUI program against. Backends:

- ``CliSlurm`` (cli_backend.py): drives squeue/sinfo/scontrol/scancel and reads their JSON
  (openapi v0.0.38 on Slurm 22.05). The default.
- ``PySlurm`` (pyslurm_backend.py): pyslurm >= 25.11 for sites on Slurm 25.11.
- ``SyntheticSlurm`` (synthetic.py): a deterministic in-memory stand-in for benchmarks and the TUI's
  10,000-job test. It is never chosen by ``open_client`` (factory.py, the only
  module that names the backends).

What every backend does the same way lives here: the ``Job``/``Node`` records, validation of
everything that is sent to Slurm (``check_job_fields`` and friends), and reading GPU counts
out of GRES strings (request strings go through ``policies.gpu``).

Verified on Slurm 22.05.8 and worth knowing when reading the backends:

- ``squeue --json`` ignores ``-j``: it always returns the whole queue (including jobs that
  finished less than MinJobAge ago), so ``jobs(ids)`` filters on our side.
- ``scancel`` of an unknown job id exits 0 and prints nothing unless ``-v`` is given.
- ``scontrol update NodeName=.. Reason=..`` strips one leading and one trailing double quote.
- With PriorityType=priority/basic, ``scontrol update JobId=.. Nice=..`` on a held job sets its
  priority to 2, which silently releases the hold; a later release then resets nice to 0.
  Backends re-apply the hold after changing nice (see ``update_job``).
- ``scontrol release`` on a job that is not held also resets its nice to 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from policies import defaults
from policies.gpu import GpuRequestError, parse_gpu_request, parse_gres_entries
from policies.request import JobRequest

log = logging.getLogger("slurmgate.slurm")

UNTYPED_GPU = "gpu"
"""Key of ``Node.gpus_total``/``gpus_used`` for GPUs configured without a type (gres gpu:4)."""

FINISHED_STATES = defaults.FINISHED_STATES
HELD_REASONS = frozenset({"JobHeldAdmin", "JobHeldUser"})

MAX_NICE = 2147483645
"""scontrol: 'The adjustment range is +/- 2147483645'."""


class SlurmError(Exception):
    """A Slurm command or RPC failed. The message names the command, its exit code (or the
    Slurm error number) and what Slurm said."""

    def __init__(self, command: str | list[str], returncode: int | None, stderr: str,
                 hint: str = ""):
        self.command = command if isinstance(command, str) else " ".join(command)
        self.returncode = returncode
        self.stderr = (stderr or "").strip()
        self.hint = hint
        how = f"exit code {returncode}" if returncode is not None else "no exit code"
        msg = f"`{self.command}` failed ({how}): {self.stderr or '(no error output)'}"
        if hint:
            msg += f" -- {hint}"
        super().__init__(msg)


class InvalidSlurmValue(ValueError):
    """A value slurmgate refuses to send to Slurm; the message says what is allowed."""


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Job:
    """One Slurm job (one task of an array) as squeue/pyslurm report it.

    Times are epoch seconds; ``start_ts`` is None while the job is pending (Slurm reports an
    expected start there) and for a job that finished without ever getting nodes (Slurm
    reports the cancel time), ``end_ts`` is None until the job has finished (Slurm reports
    the expected end of a running job). ``gpus`` is the number of GPUs allocated (from the
    allocation's GRES detail while the job holds nodes) or else requested (``policies.gpu``);
    shards count as fractions. ``gpu_type`` is None when untyped or mixed.
    ``exit_code`` is ``"code:signal"`` as in sacct and jobcomp. ``gpu_request_error`` is set
    when the job's GPU request could not be read (``gpus`` is then 0): nothing is dropped
    silently.

    The request fields after ``gpu_request_error`` are what the job asked for, as Slurm keeps
    them (what a decision reads, for a job decided after submit: see daemon/recheck.py).
    Memory is in MB, per node or per CPU (at most one of the two is set); unset values are
    None. Arrays: every record carries the array's current throttle ``array_max_tasks``
    (``%N``, 0 or None: none; a user may change it after submit); the array's head record
    (``job_id == array_job_id``, ``array_task_id`` None) also carries the task ids not yet
    split off into records of their own, ``array_task_string`` ("2-99", "1,3,5-7",
    "0-98:2"; Slurm may append "%N"), see ``array_waiting_spec``.
    """

    job_id: int
    array_job_id: int | None = None
    array_task_id: int | None = None
    user: str | None = None
    uid: int | None = None
    account: str | None = None
    partition: str | None = None
    state: str = "UNKNOWN"
    reason: str | None = None
    nice: int = 0
    priority: int | None = None
    comment: str | None = None
    admin_comment: str | None = None
    gpu_type: str | None = None
    gpus: float = 0.0
    nodes: str | None = None
    node_count: int = 0
    submit_ts: float | None = None
    start_ts: float | None = None
    end_ts: float | None = None
    time_limit_min: int | None = None
    restart_count: int = 0
    requeue: bool = False
    exit_code: str | None = None
    cpus: int = 0
    work_dir: str | None = None
    name: str | None = None
    cluster: str | None = None
    exc_nodes: str | None = None
    gpu_request_error: str | None = None
    tres_per_node: str | None = None
    tres_per_job: str | None = None
    tres_per_task: str | None = None
    tres_per_socket: str | None = None
    max_nodes: int | None = None
    num_tasks: int | None = None
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    sockets_per_node: int | None = None
    min_mem_per_node: int | None = None
    min_mem_per_cpu: int | None = None
    features: str | None = None
    """--constraint, e.g. "h100|a100"."""
    array_task_string: str | None = None
    array_max_tasks: int | None = None
    batch: bool = True
    """False for a job without a batch script: an allocation made by salloc, or by srun
    outside sbatch (Slurm's BatchFlag=0; squeue's ``batch_flag``, pyslurm's
    ``is_batch_job``). The idle-GPU policy leaves such interactive jobs alone."""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def array_waiting_spec(self) -> str | None:
        """The task ids this (head) record still stands for, without Slurm's "%N" suffix;
        None for a plain job or a task record."""
        if self.array_job_id is None or self.array_task_id is not None:
            return None
        spec = (self.array_task_string or "").split("%", 1)[0].strip()
        return spec or None

    @property
    def pending(self) -> bool:
        return self.state == "PENDING"

    @property
    def held(self) -> bool:
        """Pending with priority 0 (scontrol hold/uhold, requeuehold, sbatch -H)."""
        return self.state == "PENDING" and self.priority == 0


@dataclass(frozen=True)
class Node:
    """One node: ``state`` is the lower-case base state (idle, mixed, allocated, down, ...),
    ``flags`` the upper-case state flags (DRAIN, NOT_RESPONDING, ...). GPU counts are per
    type; GPUs configured without a type are counted under ``UNTYPED_GPU``."""

    name: str
    state: str
    flags: tuple[str, ...] = ()
    reason: str | None = None
    gpus_total: dict[str, int] = field(default_factory=dict)
    gpus_used: dict[str, int] = field(default_factory=dict)
    cpus: int = 0
    alloc_cpus: int = 0
    partitions: tuple[str, ...] = ()

    @property
    def drained(self) -> bool:
        """Drained or draining: no new jobs start here."""
        return "DRAIN" in self.flags or self.state in ("drained", "draining")

    @property
    def gpus_free(self) -> dict[str, int]:
        return {t: max(0, n - self.gpus_used.get(t, 0)) for t, n in self.gpus_total.items()}


# --------------------------------------------------------------------------------------------
# The interface


@runtime_checkable
class SlurmClient(Protocol):
    """Everything slurmgate asks of Slurm. Every method raises SlurmError when Slurm refuses
    or cannot be reached, and InvalidSlurmValue before talking to Slurm at all when a value
    is unsafe or out of range."""

    def jobs(self, job_ids: Iterable[int] | None = None) -> list[Job]:
        """All jobs Slurm knows (pending, running and recently finished), or those of
        ``job_ids`` that it still knows, from ONE query."""
        ...

    def job(self, job_id: int) -> Job | None:
        """The job, or None when Slurm does not know it (never existed or purged)."""
        ...

    def nodes(self) -> list[Node]: ...

    def hold(self, job_id: int, reason: str | None = None) -> None:
        """Admin hold (priority 0). A running job keeps running but stays pending if it is
        requeued. Slurm keeps no hold reason: it is logged here and callers record it as an
        event."""
        ...

    def release(self, job_id: int) -> None: ...

    def requeue(self, job_id: int, hold: bool = False) -> None: ...

    def cancel(self, job_id: int) -> None:
        """Cancel; cancelling a job that already finished is not an error."""
        ...

    def update_job(self, job_id: int, **fields: Any) -> None:
        """Change job fields: exc_nodes, nice, partition, comment, admin_comment,
        time_limit (minutes). A held job stays held when its nice changes."""
        ...

    def drain(self, node: str, reason: str) -> None: ...

    def resume(self, node: str) -> None: ...

    def set_down(self, node: str, reason: str) -> None: ...


# --------------------------------------------------------------------------------------------
# Validation: every value goes through here before any backend sends it to Slurm.

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_HOSTLIST_RE = re.compile(r"[A-Za-z0-9_.\-\[\],]*")
_PARTITIONS_RE = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

JOB_FIELDS = ("exc_nodes", "nice", "partition", "comment", "admin_comment", "time_limit",
              "start_time")


def check_job_id(job_id: Any) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id <= 0:
        raise InvalidSlurmValue(f"job id must be a positive whole number, not {job_id!r}")
    return job_id


def check_text(what: str, value: Any, allow_empty: bool = True) -> str:
    """Free text (comments, reasons): one line, no control characters."""
    if not isinstance(value, str):
        raise InvalidSlurmValue(f"{what} must be text, not {type(value).__name__}")
    if (m := _CONTROL_RE.search(value)) is not None:
        raise InvalidSlurmValue(
            f"{what} must be a single line without control characters "
            f"(found {m.group()!r}); Slurm would store it garbled")
    if not allow_empty and not value.strip():
        raise InvalidSlurmValue(f"{what} must not be empty")
    return value


def check_node_name(node: Any) -> str:
    if not isinstance(node, str) or not node or not _HOSTLIST_RE.fullmatch(node):
        raise InvalidSlurmValue(
            f"node must be a node name or hostlist like node1 or node[1-4], not {node!r}")
    return node


def check_reason(reason: Any) -> str:
    """Node reasons: scontrol strips a leading and a trailing '\"', so refuse those."""
    text = check_text("reason", reason, allow_empty=False)
    if text.startswith('"') or text.endswith('"'):
        raise InvalidSlurmValue(
            "reason must not start or end with '\"' (scontrol strips those quotes)")
    return text


def _check_nodes_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, Iterable):
        names = list(value)
        for n in names:
            check_node_name(n)
        text = ",".join(names)
    else:
        raise InvalidSlurmValue(f"exc_nodes must be a hostlist or a list of node names, "
                                f"not {value!r}")
    if not _HOSTLIST_RE.fullmatch(text):
        raise InvalidSlurmValue(
            f"exc_nodes must be node names or a hostlist like node[1-2],node7 "
            f"(letters, digits, '_', '.', '-', '[', ']', ','), not {text!r}")
    return text


def _check_int(what: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSlurmValue(f"{what} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise InvalidSlurmValue(f"{what} must be between {low} and {high}, not {value}")
    return value


def check_job_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise ``update_job`` fields; unknown names are refused.

    '=' is allowed in comments: scontrol splits ``Comment=a=b`` at the first '=' (verified).
    Names (partition, nodes) may not contain '=', spaces or anything else scontrol or Slurm
    would read differently.
    """
    if not fields:
        raise InvalidSlurmValue(f"nothing to update; fields: {', '.join(JOB_FIELDS)}")
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "exc_nodes":
            out[name] = _check_nodes_value(value)
        elif name == "nice":
            out[name] = _check_int("nice", value, -MAX_NICE, MAX_NICE)
        elif name == "partition":
            if not isinstance(value, str) or not _PARTITIONS_RE.fullmatch(value):
                raise InvalidSlurmValue(
                    f"partition must be a partition name (letters, digits, '_', '.', '-'; "
                    f"several separated by ','), not {value!r}")
            out[name] = value
        elif name in ("comment", "admin_comment"):
            out[name] = check_text(name, value)
        elif name == "time_limit":
            out[name] = _check_int("time_limit (minutes)", value, 1, 365 * 24 * 60 * 100)
        elif name == "start_time":
            if value != "now":
                raise InvalidSlurmValue("start_time can only be set to 'now' (lets a requeued "
                                        "job start without Slurm's requeue delay)")
            out[name] = value
        else:
            raise InvalidSlurmValue(
                f"cannot update job field {name!r}; fields: {', '.join(JOB_FIELDS)}")
    return out


def task_id_ranges(ids: Iterable[int]) -> str:
    """Array task ids the way Slurm writes them: ``[0, 1, 2, 5, 7, 8]`` -> "0-2,5,7-8"."""
    out: list[str] = []
    ordered = sorted(set(ids))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


# --------------------------------------------------------------------------------------------
# GPU counts from GRES strings


def split_gres(text: str | None) -> list[str]:
    """Split a GRES string at commas outside parentheses: 'gpu:a100:2(IDX:0,2),shard:4'."""
    if not text:
        return []
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def gres_gpu_counts(texts: str | Iterable[str] | None, shards_per_gpu: int = 8,
                    count_shards: bool = False) -> dict[str | None, float]:
    """GPUs per type (None = untyped) in GRES strings such as sinfo's gres/gres_used or a
    job's gres_detail ("gpu:h100:2(IDX:0-1)", "gpu:a100:0(IDX:N/A)", "gpu:4(S:0-1)").
    Entries that cannot be read are logged and skipped."""
    if texts is None:
        return {}
    items = [texts] if isinstance(texts, str) else list(texts)
    out: dict[str | None, float] = {}
    for text in items:
        if not isinstance(text, str):
            continue
        for entry in split_gres(text):
            bare = entry.split("(", 1)[0]
            try:
                found = parse_gres_entries(bare, "gres", "gpu:type:count")
            except GpuRequestError as exc:
                log.warning("unreadable GRES entry %r: %s", entry, exc)
                continue
            for name, gpu_type, count in found:
                if name == "gpu":
                    out[gpu_type] = out.get(gpu_type, 0.0) + count
                elif count_shards and shards_per_gpu > 0:
                    out[gpu_type] = out.get(gpu_type, 0.0) + count / shards_per_gpu
    return out


def node_gpu_counts(text: str | Iterable[str] | None) -> dict[str, int]:
    """Whole GPUs per type for a node; untyped ones under UNTYPED_GPU."""
    return {(t or UNTYPED_GPU): int(n)
            for t, n in gres_gpu_counts(text).items()}


def job_gpus(gres_detail: Iterable[str] | None, request: JobRequest,
             shards_per_gpu: int = 8) -> tuple[str | None, float, str | None]:
    """(gpu_type, gpus, error) of a job: the allocation when there is one, else the request."""
    allocated = gres_gpu_counts(gres_detail, shards_per_gpu, count_shards=True)
    allocated = {t: n for t, n in allocated.items() if n > 0}
    if allocated:
        types = set(allocated)
        only = next(iter(types)) if len(types) == 1 else None
        return only, float(sum(allocated.values())), None
    try:
        req = parse_gpu_request(request, shards_per_gpu)
    except GpuRequestError as exc:
        return None, 0.0, str(exc)
    return req.gpu_type, req.total, None
