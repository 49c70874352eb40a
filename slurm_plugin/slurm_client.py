"""The Slurm client layer: one interface for everything slurmgate asks of Slurm.

``SlurmClient`` is what the daemon, the requeue handler and the TUI program against. Backends:

- ``CliSlurm`` (slurm_cli.py): drives squeue/sinfo/scontrol/scancel and reads their JSON
  (openapi v0.0.38 on Slurm 22.05). The default.
- ``PySlurm`` (slurm_pyslurm.py): pyslurm >= 25.11 for sites on Slurm 25.11.
- ``SyntheticSlurm`` (below): a deterministic in-memory stand-in for benchmarks and the TUI's
  10,000-job test. It is never chosen by ``open_client``.

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
import random
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from policies.gpu import GpuRequestError, parse_gpu_request, parse_gres_entries
from policies.request import JobRequest

if TYPE_CHECKING:
    from policies.config import Policy

log = logging.getLogger("slurmgate.slurm")

UNTYPED_GPU = "gpu"
"""Key of ``Node.gpus_total``/``gpus_used`` for GPUs configured without a type (gres gpu:4)."""

FINISHED_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})
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

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

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


def open_client(policy: Policy, **options: Any) -> SlurmClient:
    """The backend the policy names in ``daemon.slurm_backend`` ("cli" or "pyslurm")."""
    backend = policy.daemon.slurm_backend
    if backend == "cli":
        from slurm_plugin.slurm_cli import CliSlurm

        return CliSlurm(**options)
    if backend == "pyslurm":
        from slurm_plugin.slurm_pyslurm import PySlurm

        return PySlurm(**options)
    raise InvalidSlurmValue(
        f"daemon.slurm_backend: unknown backend {backend!r}; use \"cli\" or \"pyslurm\"")


def __getattr__(name: str) -> Any:
    # `from slurm_plugin.slurm_client import CliSlurm` without importing backends eagerly.
    if name == "CliSlurm":
        from slurm_plugin.slurm_cli import CliSlurm

        return CliSlurm
    if name == "PySlurm":
        from slurm_plugin.slurm_pyslurm import PySlurm

        return PySlurm
    raise AttributeError(name)


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


# --------------------------------------------------------------------------------------------
# SyntheticSlurm: a stand-in for tests and benchmarks, never for a real cluster.

_SYN_USERS = (("alice", 1001, "vision"), ("bob", 1002, "nlp"), ("carol", 1003, "vision"),
              ("dave", 1004, "speech"), ("erin", 1005, "nlp"), ("frank", 1006, "robotics"))
_SYN_PROJECTS = {"vision": "vit-scaling", "nlp": "llm-pretrain", "speech": "asr-v2",
                 "robotics": "sim2real"}
_SYN_TYPES = ("a100", "h100", "l40s")
_SYN_PENDING_REASONS = ("Priority", "Resources", "JobHeldAdmin", "BeginTime", "Dependency")


class SyntheticSlurm:
    """A deterministic in-memory cluster: ``n_jobs`` jobs on ``n_nodes`` nodes from ``seed``.

    FOR TESTS AND BENCHMARKS ONLY (the TUI's 10,000-job test, bench/). It implements the
    SlurmClient interface with the same validation as the real backends; actions change the
    in-memory state. Timestamps are relative to ``base_ts`` so two instances with the same
    arguments report identical jobs. ``calls`` counts queries, like a real controller's load.
    Thread-safe.
    """

    def __init__(self, n_jobs: int = 1000, n_nodes: int = 64, seed: int = 0,
                 gpus_per_node: int = 8, base_ts: float = 1_700_000_000.0,
                 cluster: str = "synthetic", clock: Any = None):
        if n_nodes <= 0 or n_jobs < 0:
            raise ValueError("need at least one node and a non-negative number of jobs")
        self._lock = threading.Lock()
        self._clock = clock or time.time
        self.calls = 0
        rng = random.Random(seed)
        width = max(3, len(str(n_nodes)))
        self._nodes: dict[str, Node] = {}
        for i in range(n_nodes):
            gpu_type = _SYN_TYPES[i % len(_SYN_TYPES)]
            name = f"gpu{i + 1:0{width}d}"
            self._nodes[name] = Node(
                name=name, state="idle", gpus_total={gpu_type: gpus_per_node},
                gpus_used={gpu_type: 0}, cpus=64, partitions=("gpu", "scavenger"))
        names = list(self._nodes)
        self._jobs: dict[int, Job] = {}
        job_id = 1000
        for _ in range(n_jobs):
            job_id += 1
            user, uid, team = rng.choice(_SYN_USERS)
            roll = rng.random()
            state = ("RUNNING" if roll < 0.45 else "PENDING" if roll < 0.85
                     else rng.choice(("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")))
            gpus = rng.choice((1, 1, 2, 4, 8))
            submit = base_ts - rng.randint(60, 86_400)
            limit = rng.choice((30, 60, 240, 1440))
            node = rng.choice(names)
            gpu_type = next(iter(self._nodes[node].gpus_total))
            start = end = None
            reason = None
            nodes = None
            priority = rng.randint(1000, 100_000)
            if state == "PENDING":
                reason = rng.choice(_SYN_PENDING_REASONS)
                if reason == "JobHeldAdmin":
                    priority = 0
            else:
                start = submit + rng.randint(0, 3600)
                nodes = node
                if state != "RUNNING":
                    end = start + rng.randint(60, limit * 60)
            project = _SYN_PROJECTS[team]
            self._jobs[job_id] = Job(
                job_id=job_id, user=user, uid=uid, account=team, partition="gpu",
                state=state, reason=reason, nice=rng.choice((0, 0, 0, 100, 500)),
                priority=priority, comment=f"project={project},cost_center=CC{uid}",
                admin_comment=f"slurmgate:team={team};rid=r{job_id:016x};project={project}",
                gpu_type=gpu_type, gpus=float(gpus), nodes=nodes, node_count=1,
                submit_ts=submit, start_ts=start, end_ts=end, time_limit_min=limit,
                restart_count=0, requeue=True,
                exit_code=("0:0" if state == "COMPLETED" else "1:0" if end else None),
                cpus=gpus * 8, work_dir=f"/home/{user}", cluster=cluster)
            if state == "RUNNING":
                n = self._nodes[node]
                used = dict(n.gpus_used)
                used[gpu_type] = min(n.gpus_total[gpu_type], used[gpu_type] + gpus)
                self._nodes[node] = replace(n, gpus_used=used, state="mixed",
                                            alloc_cpus=min(n.cpus, n.alloc_cpus + gpus * 8))

    # -- queries ---------------------------------------------------------------------------

    def jobs(self, job_ids: Iterable[int] | None = None) -> list[Job]:
        with self._lock:
            self.calls += 1
            if job_ids is None:
                return list(self._jobs.values())
            wanted = dict.fromkeys(job_ids)
            return [self._jobs[j] for j in wanted if j in self._jobs]

    def job(self, job_id: int) -> Job | None:
        check_job_id(job_id)
        found = self.jobs([job_id])
        return found[0] if found else None

    def nodes(self) -> list[Node]:
        with self._lock:
            self.calls += 1
            return list(self._nodes.values())

    # -- job actions -----------------------------------------------------------------------

    def _change(self, job_id: int, what: str, fn: Any) -> None:
        check_job_id(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise SlurmError(f"synthetic {what} {job_id}", 1,
                                 f"Invalid job id specified for job {job_id}")
            self._jobs[job_id] = fn(job)

    def hold(self, job_id: int, reason: str | None = None) -> None:
        if reason is not None:
            check_text("hold reason", reason)

        def held(job: Job) -> Job:
            # as slurmctld: a running job keeps running, but with priority 0
            if job.finished:
                raise SlurmError(f"synthetic hold {job_id}", 1,
                                 f"Job has already finished for job {job_id}")
            return replace(job, priority=0, reason="JobHeldAdmin")

        self._change(job_id, "hold", held)
        log.info("held job %s: %s", job_id, reason or "(no reason given)")

    def release(self, job_id: int) -> None:
        self._change(job_id, "release",
                     lambda j: replace(j, priority=j.priority or 1000, reason=None)
                     if j.held else j)

    def requeue(self, job_id: int, hold: bool = False) -> None:
        def requeued(job: Job) -> Job:
            if job.pending:
                raise SlurmError(f"synthetic requeue {job_id}", 1,
                                 f"Job is pending execution for job {job_id}")
            return replace(job, state="PENDING", start_ts=None, end_ts=None, nodes=None,
                           restart_count=job.restart_count + 1,
                           reason="JobHeldAdmin" if hold else "BeginTime",
                           priority=0 if hold else (job.priority or 1000))

        self._change(job_id, "requeue", requeued)

    def cancel(self, job_id: int) -> None:
        now = self._clock()
        self._change(job_id, "cancel", lambda j: j if j.finished else replace(
            j, state="CANCELLED", end_ts=now, start_ts=j.start_ts or now, reason=None))

    def update_job(self, job_id: int, **fields: Any) -> None:
        clean = check_job_fields(fields)
        mapped: dict[str, Any] = {}
        for name, value in clean.items():
            if name == "time_limit":
                mapped["time_limit_min"] = value
            elif name in ("comment", "admin_comment", "exc_nodes"):
                mapped[name] = value or None
            else:
                mapped[name] = value
        self._change(job_id, "update", lambda j: replace(j, **mapped))

    # -- node actions ----------------------------------------------------------------------

    def _node_change(self, node: str, fn: Any) -> None:
        check_node_name(node)
        with self._lock:
            if node not in self._nodes:
                raise SlurmError(f"synthetic update NodeName={node}", 1,
                                 "Invalid node name specified")
            self._nodes[node] = fn(self._nodes[node])

    def drain(self, node: str, reason: str) -> None:
        check_reason(reason)
        self._node_change(node, lambda n: replace(
            n, flags=tuple(sorted({*n.flags, "DRAIN"})), reason=reason))

    def resume(self, node: str) -> None:
        def resumed(n: Node) -> Node:
            if not n.drained and n.state != "down":
                raise SlurmError(f"synthetic update NodeName={node} State=RESUME", 1,
                                 "Invalid node state specified")
            busy = any(n.gpus_used.values())
            return replace(n, flags=tuple(f for f in n.flags if f != "DRAIN"), reason=None,
                           state="mixed" if busy else "idle")

        self._node_change(node, resumed)

    def set_down(self, node: str, reason: str) -> None:
        check_reason(reason)
        self._node_change(node, lambda n: replace(n, state="down", reason=reason))
