"""PySlurm: the Slurm client layer over pyslurm >= 25.11 (sites on Slurm 25.11).

pyslurm is imported when the backend is created, never at module import: it needs Slurm
25.11's libslurmfull and refuses other versions. The API used is pyslurm's documented one
(https://pyslurm.github.io/25.11/reference/job/, .../node/, .../jobsubmitdescription/):
``Jobs.load()``, ``Job.load(id)``, ``Job(id).hold/release/requeue/cancel/modify``,
``JobSubmitDescription(...)``, ``Nodes.load()``, ``Node(name).modify(Node(state=..., ...))``.

GPU requests: ``Job.tres_per_node`` & co. (TrackableResources, pyslurm 25.11.1+) when they
carry something, else ``Job.gres_per_node`` (a dict, in every 25.11.x); the allocation from
``Job.get_resource_layout_per_node()`` while the job runs. Everything goes through the same
``policies.gpu`` parser as the CLI backend.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from policies.request import JobRequest
from slurm_plugin.slurm.client import (
    FINISHED_STATES,
    UNTYPED_GPU,
    Job,
    Node,
    SlurmError,
    check_job_fields,
    check_job_id,
    check_node_name,
    check_reason,
    check_text,
    job_gpus,
    node_gpu_counts,
)

log = logging.getLogger("slurmgate.slurm")

ESLURM_INVALID_JOB_ID = 2017  # pyslurm/slurm/slurm_errno.h.pxi
MIN_VERSION = (25, 11)

_SUBMIT_FIELDS = {  # update_job field -> JobSubmitDescription attribute
    "exc_nodes": "excluded_nodes",
    "nice": "nice",
    "partition": "partitions",
    "comment": "comment",
    "admin_comment": "admin_comment",
    "time_limit": "time_limit",
    "start_time": "begin_time",
}


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in str(text).split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _count(value: Any) -> float | None:
    """A GRES count from an int, {"count": n, ...} or an object with .count."""
    if isinstance(value, Mapping):
        value = value.get("count")
    elif not isinstance(value, int | float):
        value = getattr(value, "count", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _tres_entries(value: Any) -> list[str]:
    """'gres/gpu:a100=2'-style entries from what pyslurm returns for a tres_per_* or gres
    attribute: None, a raw string, a dict (gres_per_node: {"gpu:a100": 2}, 25.11.0's
    tres_per_task: {"gres/gpu": 1}) or a TrackableResources (its .gres dict of GPU objects)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    mapping = getattr(value, "gres", None) if not isinstance(value, Mapping) else value
    if not isinstance(mapping, Mapping):
        return []
    out = []
    for key, item in mapping.items():
        count = _count(item)
        if not isinstance(key, str) or count is None:
            continue
        name = key
        if not name.startswith(("gres/", "gres:")) and name.split(":", 1)[0] in ("gpu", "shard"):
            name = "gres/" + name
        out.append(f"{name}={int(count)}")
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value != "" else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _positive(value: Any) -> int | None:
    n = _int(value)
    return n if n is not None and n > 0 else None


def _ts(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


class PySlurm:
    """SlurmClient over pyslurm >= 25.11. ``module`` replaces ``import pyslurm`` (tests pass
    tests/fake_pyslurm.py)."""

    def __init__(self, module: ModuleType | None = None, shards_per_gpu: int = 8):
        self.shards_per_gpu = shards_per_gpu
        if module is None:
            # libslurm cuts an array's waiting task ids at 64 characters ("...") unless told
            # otherwise (SLURM_BITSTR_LEN, read once per process)
            os.environ.setdefault("SLURM_BITSTR_LEN", "0")
            try:
                module = importlib.import_module("pyslurm")
            except ImportError as exc:
                raise SlurmError("import pyslurm", None, str(exc),
                                 "install it with `pip install 'slurmgate[pyslurm]'` on a "
                                 "Slurm 25.11 host, or set daemon.slurm_backend = \"cli\"") \
                    from None
        version = getattr(module, "__version__", "0")
        if _version(version) < MIN_VERSION:
            raise SlurmError("import pyslurm", None, f"pyslurm {version} is too old",
                             "the pyslurm backend needs pyslurm >= 25.11 (Slurm 25.11); "
                             "use daemon.slurm_backend = \"cli\" on older Slurm")
        self.pyslurm = module

    @contextmanager
    def _rpc(self, what: str) -> Iterator[None]:
        try:
            yield
        except self.pyslurm.PyslurmError as exc:
            errno = getattr(exc, "errno", None)
            msg = getattr(exc, "msg", None) or str(exc)
            raise SlurmError(f"pyslurm {what}", errno, str(msg)) from exc

    # -- reading records -------------------------------------------------------------------

    @staticmethod
    def _tres_fields(pj: Any) -> dict[str, str | None]:
        per_node = _tres_entries(getattr(pj, "tres_per_node", None))
        if not per_node:
            per_node = _tres_entries(getattr(pj, "gres_per_node", None))
        return {
            "tres_per_node": ",".join(per_node) or None,
            "tres_per_job": ",".join(_tres_entries(getattr(pj, "tres_per_job", None))) or None,
            "tres_per_task": ",".join(_tres_entries(getattr(pj, "tres_per_task", None)))
            or None,
            "tres_per_socket": ",".join(_tres_entries(getattr(pj, "tres_per_socket", None)))
            or None,
        }

    def _request(self, pj: Any) -> JobRequest:
        fields: dict[str, Any] = {
            **self._tres_fields(pj),
            "min_nodes": _int(getattr(pj, "num_nodes", None)),
            "num_tasks": _int(getattr(pj, "ntasks", None)),
            "sockets_per_node": _int(getattr(pj, "sockets_per_node", None)),
        }
        return JobRequest.model_validate({k: v for k, v in fields.items() if v is not None})

    def _request_fields(self, pj: Any) -> dict[str, Any]:
        """The Job's request fields, from pyslurm 25.11's documented Job attributes
        (``array_tasks_waiting`` and ``array_tasks_parallel`` are Slurm's array_task_str and
        array_max_tasks; ``constraints`` is the --constraint list)."""
        features = getattr(pj, "constraints", None)
        if isinstance(features, list | tuple):
            features = ",".join(f for f in features if isinstance(f, str))
        return {
            **self._tres_fields(pj),
            "max_nodes": _positive(getattr(pj, "max_nodes", None)),
            "num_tasks": _positive(getattr(pj, "ntasks", None)),
            "ntasks_per_node": _positive(getattr(pj, "ntasks_per_node", None)),
            "cpus_per_task": _positive(getattr(pj, "cpus_per_task", None)),
            "sockets_per_node": _positive(getattr(pj, "sockets_per_node", None)),
            "min_mem_per_node": _positive(getattr(pj, "memory_per_node", None)),
            "min_mem_per_cpu": _positive(getattr(pj, "memory_per_cpu", None)),
            "features": _text(features),
            "array_task_string": _text(getattr(pj, "array_tasks_waiting", None)),
            "array_max_tasks": _positive(getattr(pj, "array_tasks_parallel", None)),
        }

    def _allocated(self, pj: Any) -> list[str]:
        """'gpu:a100:2' per node from the running job's resource layout."""
        try:
            layout = pj.get_resource_layout_per_node()
        except Exception as exc:  # pyslurm marks this API as subject to change
            log.debug("job %s: no resource layout: %s", getattr(pj, "id", "?"), exc)
            return []
        out = []
        for per_node in (layout or {}).values():
            gres = per_node.get("gres") if isinstance(per_node, Mapping) else None
            for key, item in (gres or {}).items():
                count = _count(item)
                if isinstance(key, str) and count is not None:
                    out.append(f"{key.removeprefix('gres/')}:{int(count)}")
        return out

    def _job(self, pj: Any) -> Job:
        state = str(getattr(pj, "state", None) or "UNKNOWN").split("+")[0].upper()
        nodes = _text(getattr(pj, "allocated_nodes", None))
        try:
            request = self._request(pj)
            detail = self._allocated(pj) if nodes and state not in FINISHED_STATES else []
            gpu_type, gpus, error = job_gpus(detail, request, self.shards_per_gpu)
        except ValidationError as exc:
            gpu_type, gpus, error = None, 0.0, f"unreadable request fields: {exc}"
        if not gpus and not error:
            gpu_type, gpus = self._job_level_gpus(pj, gpu_type, gpus)
        if error:
            log.warning("job %s: GPU request not understood: %s", pj.id, error)
        reason = _text(getattr(pj, "state_reason", None))
        array_id = _int(getattr(pj, "array_id", None))
        code, sig = _int(getattr(pj, "exit_code", None)), _int(getattr(pj, "exit_code_signal",
                                                                      None))
        limit = _int(getattr(pj, "time_limit", None))
        return Job(
            **self._request_fields(pj),
            job_id=int(pj.id),
            array_job_id=array_id or None,
            array_task_id=_int(getattr(pj, "array_task_id", None)) if array_id else None,
            user=_text(getattr(pj, "user_name", None)),
            uid=_int(getattr(pj, "user_id", None)),
            account=_text(getattr(pj, "account", None)),
            partition=_text(getattr(pj, "partition", None)),
            state=state,
            reason=None if reason == "None" else reason,
            nice=_int(getattr(pj, "nice", None)) or 0,
            priority=_int(getattr(pj, "priority", None)),
            comment=_text(getattr(pj, "comment", None)),
            admin_comment=_text(getattr(pj, "admin_comment", None)),
            gpu_type=gpu_type,
            gpus=gpus,
            nodes=nodes,
            node_count=_int(getattr(pj, "num_nodes", None)) or 0,
            submit_ts=_ts(getattr(pj, "submit_time", None)),
            start_ts=None if state == "PENDING" or (state in FINISHED_STATES and not nodes)
            else _ts(getattr(pj, "start_time", None)),
            end_ts=_ts(getattr(pj, "end_time", None)) if state in FINISHED_STATES else None,
            time_limit_min=limit if limit and limit > 0 else None,
            restart_count=_int(getattr(pj, "requeue_count", None)) or 0,
            requeue=getattr(pj, "is_requeueable", False) is True,
            exit_code=None if code is None and sig is None else f"{code or 0}:{sig or 0}",
            cpus=_int(getattr(pj, "cpus", None)) or 0,
            work_dir=_text(getattr(pj, "working_directory", None)),
            name=_text(getattr(pj, "name", None)),
            cluster=_text(getattr(pj, "cluster", None)),
            exc_nodes=_text(getattr(pj, "excluded_nodes", None)),
            gpu_request_error=error,
            batch=getattr(pj, "is_batch_job", True) is not False,
        )

    @staticmethod
    def _job_level_gpus(pj: Any, gpu_type: str | None, gpus: float
                        ) -> tuple[str | None, float]:
        """Last resort: Job.gpus (pyslurm 25.11.1+, from the job's TRES) when the request
        strings said nothing, e.g. a tres_per_* format pyslurm could not read."""
        found = getattr(pj, "gpus", None)
        if not isinstance(found, Mapping) or not found:
            return gpu_type, gpus
        typed = {k.split(":", 1)[1]: c for k, v in found.items()
                 if isinstance(k, str) and ":" in k and (c := _count(v))}
        if typed:
            types = list(typed)
            return (types[0] if len(types) == 1 else None), float(sum(typed.values()))
        untyped = _count(found.get("gpu"))
        return (None, float(untyped)) if untyped else (gpu_type, gpus)

    @staticmethod
    def _node(pn: Any) -> Node:
        words = str(getattr(pn, "state", None) or "UNKNOWN").split("+")
        total = node_gpu_counts(_gres_strings(getattr(pn, "configured_gres", None)))
        used_raw = getattr(pn, "allocated_gres", None) or {}
        used: dict[str, int] = {}
        untyped = 0
        for key, item in used_raw.items() if isinstance(used_raw, Mapping) else ():
            count = _count(item)
            if not isinstance(key, str) or not count:
                continue
            name, _, gpu_type = key.removeprefix("gres/").partition(":")
            if name != "gpu":
                continue
            if gpu_type:
                used[gpu_type] = used.get(gpu_type, 0) + int(count)
            else:
                untyped += int(count)
        # TRES list "gres/gpu=2" (all) next to "gres/gpu:a100=2" (typed): only the rest is new
        rest = untyped - sum(used.values())
        if rest > 0:
            key = next(iter(total)) if len(total) == 1 else UNTYPED_GPU
            used[key] = used.get(key, 0) + rest
        for key in total:
            used.setdefault(key, 0)
        parts = getattr(pn, "partitions", None) or []
        return Node(
            name=str(pn.name),
            state=words[0].lower(),
            flags=tuple(w.upper() for w in words[1:] if w),
            reason=_text(getattr(pn, "reason", None)),
            gpus_total=total,
            gpus_used=used,
            cpus=_int(getattr(pn, "total_cpus", None)) or 0,
            alloc_cpus=_int(getattr(pn, "allocated_cpus", None)) or 0,
            partitions=tuple(p for p in parts if isinstance(p, str)),
        )

    # -- queries ---------------------------------------------------------------------------

    def jobs(self, job_ids: Iterable[int] | None = None) -> list[Job]:
        wanted = None if job_ids is None else {check_job_id(j) for j in job_ids}
        if wanted is not None and not wanted:
            return []
        with self._rpc("Jobs.load()"):
            loaded = self.pyslurm.Jobs.load()
        out = []
        for pj in loaded.values():
            if wanted is not None and pj.id not in wanted:
                continue
            out.append(self._job(pj))
        return out

    def _load(self, job_id: int) -> Any | None:
        try:
            return self.pyslurm.Job.load(job_id)
        except self.pyslurm.PyslurmError as exc:
            if getattr(exc, "errno", None) == ESLURM_INVALID_JOB_ID:
                return None
            raise SlurmError(f"pyslurm Job.load({job_id})", getattr(exc, "errno", None),
                             str(getattr(exc, "msg", None) or exc)) from exc

    def _must_load(self, job_id: int, what: str) -> Any:
        pj = self._load(job_id)
        if pj is None:
            raise SlurmError(f"pyslurm Job({job_id}).{what}", ESLURM_INVALID_JOB_ID,
                             f"Invalid job id specified for job {job_id}")
        return pj

    def job(self, job_id: int) -> Job | None:
        pj = self._load(check_job_id(job_id))
        return None if pj is None else self._job(pj)

    def nodes(self) -> list[Node]:
        with self._rpc("Nodes.load()"):
            loaded = self.pyslurm.Nodes.load()
        return [self._node(pn) for pn in loaded.values()]

    # -- job actions -----------------------------------------------------------------------

    def hold(self, job_id: int, reason: str | None = None) -> None:
        check_job_id(job_id)
        if reason is not None:
            check_text("hold reason", reason)
        with self._rpc(f"Job({job_id}).hold()"):
            self.pyslurm.Job(job_id).hold()
        log.info("held job %s: %s", job_id, reason or "(no reason given)")

    def release(self, job_id: int) -> None:
        pj = self._must_load(check_job_id(job_id), "release()")
        if pj.priority != 0:  # not held; releasing would only reset its nice
            log.info("release of job %s skipped: it is not held", job_id)
            return
        with self._rpc(f"Job({job_id}).release()"):
            self.pyslurm.Job(job_id).release()

    def requeue(self, job_id: int, hold: bool = False) -> None:
        check_job_id(job_id)
        with self._rpc(f"Job({job_id}).requeue(hold={hold})"):
            self.pyslurm.Job(job_id).requeue(hold=hold)

    def cancel(self, job_id: int) -> None:
        # pyslurm ignores an unknown job id on cancel; load first so a wrong id is an error
        pj = self._must_load(check_job_id(job_id), "cancel()")
        with self._rpc(f"Job({job_id}).cancel()"):
            pj.cancel()

    def update_job(self, job_id: int, **fields: Any) -> None:
        check_job_id(job_id)
        clean = check_job_fields(fields)
        changes = {_SUBMIT_FIELDS[k]: (str(v) if k == "time_limit" else v)
                   for k, v in clean.items()}
        held_mode = None
        if "nice" in clean:
            pj = self._must_load(job_id, "modify()")
            if pj.priority == 0:
                held_mode = "user" if _text(pj.state_reason) == "JobHeldUser" else "admin"
        with self._rpc(f"Job({job_id}).modify(JobSubmitDescription({changes}))"):
            self.pyslurm.Job(job_id).modify(self.pyslurm.JobSubmitDescription(**changes))
        if held_mode:
            # Nice on a held job lifts its priority off 0 (priority/basic): hold it again.
            with self._rpc(f"Job({job_id}).hold(mode={held_mode!r})"):
                self.pyslurm.Job(job_id).hold(mode=held_mode)

    # -- node actions ----------------------------------------------------------------------

    def _modify_node(self, node: str, **changes: Any) -> None:
        check_node_name(node)
        with self._rpc(f"Node({node!r}).modify(Node({changes}))"):
            self.pyslurm.Node(node).modify(self.pyslurm.Node(**changes))

    def drain(self, node: str, reason: str) -> None:
        self._modify_node(node, state="DRAIN", reason=check_reason(reason))

    def resume(self, node: str) -> None:
        self._modify_node(node, state="RESUME")

    def set_down(self, node: str, reason: str) -> None:
        self._modify_node(node, state="DOWN", reason=check_reason(reason))


def _gres_strings(value: Any) -> list[str]:
    """Node.configured_gres {"gpu:a100": 4} as ["gpu:a100:4"]."""
    if not isinstance(value, Mapping):
        return [value] if isinstance(value, str) else []
    out = []
    for key, item in value.items():
        count = _count(item)
        if isinstance(key, str) and count is not None:
            out.append(f"{key.removeprefix('gres/')}:{int(count)}")
    return out
