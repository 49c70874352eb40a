"""A stand-in for the ``pyslurm`` module (25.11.x) with an in-memory slurmctld behind it.

No Slurm 25.11 exists here, so the PySlurm backend is tested against this module. It mirrors
only the API surface slurmgate uses, with pyslurm's names, signatures and value types, as
documented on these pages (docstrings checked against PySlurm/pyslurm tag v25.11.2):

- https://pyslurm.github.io/25.11/reference/job/ -- ``pyslurm.Job``, ``pyslurm.Jobs``
  (pyslurm/core/job/job.pyx, job.pxd): ``Jobs.load()`` (a MultiClusterMap: ``.values()``),
  ``Job(job_id)``, ``Job.load(job_id)``, ``hold(mode=None)``, ``release()``,
  ``requeue(hold=False)``, ``cancel()``, ``modify(JobSubmitDescription)``,
  ``get_resource_layout_per_node()``; attributes ``id``, ``state``, ``state_reason``,
  ``nice``, ``priority``, ``requeue_count``, ``is_batch_job``, ``gres_per_node`` (dict),
  ``tres_per_node`` /
  ``tres_per_job`` / ``tres_per_task`` / ``tres_per_socket`` (TrackableResources or None,
  25.11.1+), ``gpus``, ``allocated_nodes``, ``num_nodes``, ...
- https://pyslurm.github.io/25.11/reference/jobsubmitdescription/ -- ``JobSubmitDescription``
  (pyslurm/core/job/submission.pxd): ``nice``, ``comment``, ``admin_comment``,
  ``excluded_nodes``, ``partitions``, ``time_limit`` (str), ``priority``.
- https://pyslurm.github.io/25.11/reference/node/ -- ``pyslurm.Node``, ``pyslurm.Nodes``
  (pyslurm/core/node.pyx): ``Nodes.load()``, ``Node(name=None, **kwargs)``, ``Node.load()``,
  ``modify(Node(state="DRAIN", reason=...))``; ``state`` reads like "IDLE+DRAIN";
  ``configured_gres``/``allocated_gres`` dicts.
- https://pyslurm.github.io/25.11/reference/exceptions/ -- ``PyslurmError``, ``RPCError``
  (pyslurm/core/error.pyx): ``RPCError(errno=..., msg=...)``.
- https://pyslurm.github.io/25.11/reference/db/tres/ -- ``TrackableResources.gres`` (a dict of
  ``GPU`` objects with ``name``/``type``/``count``), built like ``from_cstr``: only
  ``key=value`` pairs count, so "gres/gpu:a100:2" gives None, as in pyslurm.

The controller side imitates slurmctld where slurmgate depends on it, including two quirks
verified on 22.05.8 with PriorityType=priority/basic (assumed unchanged in 25.11): changing
nice on a held job sets its priority to 2, and releasing a job that is not held resets its
nice to 0. pyslurm's ``cancel()`` ignores unknown job ids, as the real one does.

Test helpers (not pyslurm API): ``reset()``, ``add_job()``, ``add_node()``, ``calls``.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace
from typing import Any

__version__ = "25.11.2"

# errno values as numbered in pyslurm/slurm/slurm_errno.h.pxi (25.11.2)
ESLURM_INVALID_JOB_ID = 2017
ESLURM_INVALID_NODE_NAME = 2018
ESLURM_ALREADY_DONE = 2021
ESLURM_JOB_PENDING = 2024
ESLURM_JOB_NOT_PENDING = 2071
ESLURM_INVALID_NODE_STATE = 2028
ESLURM_INVALID_PARTITION_NAME = 2000
INFINITE = 0xFFFFFFFF
LOCAL_CLUSTER = "fake25"

calls: list[str] = []
"""Every RPC the fake controller served, e.g. "slurm_load_jobs"."""


class PyslurmError(Exception):
    """The base Exception for all Pyslurm errors."""


class RPCError(PyslurmError):
    def __init__(self, errno: int = -1, msg: str | None = None):
        self.errno = errno
        self.msg = msg or f"Slurm error {errno}"
        super().__init__(self.msg)


# -- TRES (pyslurm.db) --------------------------------------------------------------------


class GenericResources(dict):
    pass


class GPU:
    def __init__(self, count: int, gpu_type: str | None = None, tres_id: int | None = None):
        self.count = int(count)
        self.type = gpu_type
        self.id = tres_id

    @property
    def name(self) -> str:
        return f"gpu:{self.type}" if self.type else "gpu"


class TrackableResource:
    def __init__(self, tres_type: str, count: int, name: str | None = None,
                 tres_id: int | None = None):
        self.type, self.count, self.name, self.id = tres_type, int(count), name, tres_id


class TrackableResources:
    def __init__(self) -> None:
        self.gres = GenericResources()
        self.cpu = self.mem = None

    @staticmethod
    def from_str(tres_str: str | None, global_tres_data: Any = None,
                 on_empty: Any = None) -> TrackableResources | None:
        pairs = [kv.split("=", 1) for kv in (tres_str or "").split(",") if "=" in kv]
        if not pairs:
            return on_empty
        out = TrackableResources()
        for key, value in pairs:
            typ, _, name = key.partition("/")
            if typ == "gres" and value.isdigit():
                if name == "gpu" or name.startswith("gpu:"):
                    out.gres[name] = GPU(int(value), name.partition(":")[2] or None)
                else:
                    out.gres[name] = TrackableResource("gres", int(value), name)
        return out


db = SimpleNamespace(TrackableResources=TrackableResources, GPU=GPU,
                     TrackableResource=TrackableResource)


def _to_gres_dict(text: str | None) -> dict[str, Any]:
    """Like pyslurm.utils.cstr.to_gres_dict: "gpu:a100:2(IDX:0-1)" -> {"gpu:a100": {...}}."""
    out: dict[str, Any] = {}
    for item in re.split(r",(?![^(]*\))", text or ""):
        item = item.strip().replace("gres:", "")
        if not item:
            continue
        idx = None
        if "(" in item:
            item, _, rest = item.partition("(")
            m = re.search(r"IDX:([^)]*)", rest)
            idx = m.group(1) if m else None
        fields = item.split(":")
        name, typ, cnt = fields[0], None, "1"
        if len(fields) == 2:
            if fields[1].isdigit():
                cnt = fields[1]
            else:
                continue
        elif len(fields) >= 3:
            typ, cnt = fields[1], fields[2]
        key = f"{name}:{typ}" if typ else name
        out[key] = {"count": int(cnt), "indexes": idx} if idx is not None else int(cnt)
    return out


# -- the in-memory controller -------------------------------------------------------------

_jobs: dict[int, dict[str, Any]] = {}
_nodes: dict[str, dict[str, Any]] = {}

_JOB_DEFAULTS: dict[str, Any] = {
    "name": "wrap", "cluster": LOCAL_CLUSTER, "array_id": None, "array_task_id": None,
    "user_name": "alice", "user_id": 1001, "account": None, "partition": "gpu",
    "state": "PENDING", "state_reason": "None", "nice": 0, "priority": 1000, "comment": None,
    "admin_comment": None, "system_comment": None, "allocated_nodes": None, "num_nodes": 1,
    "excluded_nodes": None, "submit_time": None, "start_time": None, "end_time": None,
    "time_limit": 60, "requeue_count": 0, "is_requeueable": True, "is_batch_job": True,
    "exit_code": 0,
    "exit_code_signal": 0, "cpus": 1, "ntasks": 1, "sockets_per_node": None,
    "working_directory": "/tmp", "tres_per_node_str": None, "tres_per_job_str": None,
    "tres_per_task_str": None, "tres_per_socket_str": None, "tres_req_str": None,
    "gres_detail": (),
}


def reset() -> None:
    _jobs.clear()
    _nodes.clear()
    calls.clear()


def add_job(job_id: int, **fields: Any) -> None:
    """A job as slurmctld holds it. ``tres_per_node`` etc. take Slurm's raw strings;
    ``gres_detail`` the per-node allocation strings of a running job."""
    rec = dict(_JOB_DEFAULTS)
    for key in ("tres_per_node", "tres_per_job", "tres_per_task", "tres_per_socket"):
        if key in fields:
            fields[key + "_str"] = fields.pop(key)
    unknown = set(fields) - set(rec)
    if unknown:
        raise TypeError(f"fake job has no fields {sorted(unknown)}")
    rec.update(fields)
    rec["id"] = job_id
    _jobs[job_id] = rec


def add_node(name: str, **fields: Any) -> None:
    rec = {"name": name, "cluster": LOCAL_CLUSTER, "base": "IDLE", "flags": [], "reason": None,
           "gres": "", "alloc_tres": "", "total_cpus": 8, "allocated_cpus": 0,
           "partitions": ["gpu"]}
    rec.update(fields)
    _nodes[name] = rec


def _job_rec(job_id: int) -> dict[str, Any]:
    rec = _jobs.get(job_id)
    if rec is None:
        raise RPCError(ESLURM_INVALID_JOB_ID, "Invalid job id specified")
    return rec


# -- collections ---------------------------------------------------------------------------


class _MultiClusterMap:
    def __init__(self) -> None:
        self.data: dict[str, dict[Any, Any]] = {}

    def values(self) -> list[Any]:
        return [v for cluster in self.data.values() for v in cluster.values()]

    def keys(self) -> list[Any]:
        return [k for cluster in self.data.values() for k in cluster]

    def __iter__(self) -> Any:
        return iter(self.keys())

    def __len__(self) -> int:
        return sum(len(c) for c in self.data.values())

    def __getitem__(self, item: Any) -> Any:
        if item in self.data:
            return self.data[item]
        return self.data[LOCAL_CLUSTER][item]


class Jobs(_MultiClusterMap):
    @staticmethod
    def load(preload_passwd_info: bool = False, frozen: bool = False) -> Jobs:
        calls.append("slurm_load_jobs")
        jobs = Jobs()
        for rec in _jobs.values():
            job = Job._from_record(rec)
            jobs.data.setdefault(job.cluster, {})[job.id] = job
        return jobs


class Nodes(_MultiClusterMap):
    @staticmethod
    def load(preload_passwd_info: bool = False) -> Nodes:
        calls.append("slurm_load_node")
        nodes = Nodes()
        for rec in _nodes.values():
            node = Node._from_record(rec)
            nodes.data.setdefault(node.cluster, {})[node.name] = node
        return nodes


# -- Job -----------------------------------------------------------------------------------

_JOB_ATTRS = frozenset(  # the documented attributes; the rest is controller-side state
    k for k in _JOB_DEFAULTS if not k.endswith("_str") and k != "gres_detail") | {"id"}


class Job:
    """Read-only job attributes, a snapshot taken at load time like pyslurm's."""

    def __init__(self, job_id: int):
        object.__setattr__(self, "_rec", {**_JOB_DEFAULTS, "id": job_id})

    @classmethod
    def _from_record(cls, rec: dict[str, Any]) -> Job:
        job = cls.__new__(cls)
        object.__setattr__(job, "_rec", dict(rec))
        return job

    def __getattr__(self, name: str) -> Any:
        rec = object.__getattribute__(self, "_rec")
        if name in _JOB_ATTRS:
            return rec[name]
        raise AttributeError(f"'pyslurm.Job' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"attribute '{name}' of 'pyslurm.Job' objects is not writable")

    def __repr__(self) -> str:
        return f"pyslurm.Job({self.id})"

    @property
    def gres_per_node(self) -> dict[str, Any]:
        return _to_gres_dict(self._rec["tres_per_node_str"])

    @property
    def tres_per_node(self) -> TrackableResources | None:
        return TrackableResources.from_str(self._rec["tres_per_node_str"])

    @property
    def tres_per_job(self) -> TrackableResources | None:
        return TrackableResources.from_str(self._rec["tres_per_job_str"])

    @property
    def tres_per_task(self) -> TrackableResources | None:
        return TrackableResources.from_str(self._rec["tres_per_task_str"])

    @property
    def tres_per_socket(self) -> TrackableResources | None:
        return TrackableResources.from_str(self._rec["tres_per_socket_str"])

    @property
    def gpus(self) -> dict[str, GPU]:
        tres = TrackableResources.from_str(self._rec["tres_req_str"])
        return {k: v for k, v in (tres.gres if tres else {}).items() if isinstance(v, GPU)}

    @staticmethod
    def load(job_id: int) -> Job:
        calls.append("slurm_load_job")
        return Job._from_record(_job_rec(job_id))

    def get_resource_layout_per_node(self) -> dict[str, Any]:
        rec = self._rec
        if rec["state"] != "RUNNING" or not rec["allocated_nodes"]:
            return {}
        nodes = [n for n in re.split(r",(?![^\[]*\])", rec["allocated_nodes"]) if n]
        out = {}
        for i, node in enumerate(nodes):
            detail = rec["gres_detail"][i] if i < len(rec["gres_detail"]) else None
            out[node] = {"cpu_ids": "0", "gres": _to_gres_dict(detail), "memory": None}
        return out

    def send_signal(self, signal: int | str, steps: str = "children", hurry: bool = False
                    ) -> None:
        calls.append("slurm_kill_job")
        rec = _jobs.get(self.id)
        if rec is None or rec["state"] in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT"):
            return  # pyslurm ignores ESLURM_ALREADY_DONE, and an unknown id with SIGKILL
        if signal in (9, "SIGKILL", "KILL"):
            was_running = rec["state"] == "RUNNING"
            rec.update(state="CANCELLED", end_time=int(time.time()),
                       exit_code_signal=9 if was_running else 0)
            if not was_running:
                rec["start_time"] = rec["end_time"]

    def cancel(self) -> None:
        self.send_signal(9)

    def modify(self, changes: JobSubmitDescription) -> None:
        calls.append("slurm_update_job")
        rec = _job_rec(self.id)
        values = dict(changes._set)
        if "priority" in values:
            prio = values.pop("priority")
            if prio == 0:  # a running job keeps running, with priority 0
                if rec["state"] in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT"):
                    raise RPCError(ESLURM_ALREADY_DONE, "Job has already finished")
                rec["priority"] = 0
                rec["state_reason"] = ("JobHeldUser" if changes._alloc_sid == "user"
                                       else "JobHeldAdmin")
            elif prio == INFINITE:
                if rec["priority"] == 0:
                    rec["priority"] = 1000
                    rec["state_reason"] = "None"
                else:
                    rec["nice"] = 0  # slurmctld quirk, see the module docstring
        if "partitions" in values:
            part = values.pop("partitions")
            if rec["state"] != "PENDING":
                raise RPCError(ESLURM_JOB_NOT_PENDING, "Job is no longer pending execution")
            if isinstance(part, list):
                part = ",".join(part)
            if part not in {p for n in _nodes.values() for p in n["partitions"]}:
                raise RPCError(ESLURM_INVALID_PARTITION_NAME, "Invalid partition name specified")
            rec["partition"] = part
        if "nice" in values:
            rec["nice"] = values.pop("nice")
            if rec["priority"] == 0:
                rec["priority"] = 2  # priority/basic: a held job is no longer held
        if "time_limit" in values:
            rec["time_limit"] = int(values.pop("time_limit"))
        if "excluded_nodes" in values:
            nodes = values.pop("excluded_nodes")
            rec["excluded_nodes"] = ",".join(nodes) if isinstance(nodes, list) else nodes
        for key in ("comment", "admin_comment"):
            if key in values:
                rec[key] = values.pop(key)
        if values:
            raise RPCError(-1, f"fake slurmctld does not implement updating {sorted(values)}")

    def hold(self, mode: str | None = None) -> None:
        sub = JobSubmitDescription(priority=0)
        if mode and mode.casefold() == "user":
            sub._alloc_sid = "user"
        self.modify(sub)

    def release(self) -> None:
        self.modify(JobSubmitDescription(priority=INFINITE))

    def requeue(self, hold: bool = False) -> None:
        calls.append("slurm_requeue")
        rec = _job_rec(self.id)
        if rec["state"] == "PENDING":
            raise RPCError(ESLURM_JOB_PENDING, "Job is pending execution")
        rec.update(state="PENDING", requeue_count=rec["requeue_count"] + 1,
                   allocated_nodes=None, gres_detail=(), start_time=None, end_time=None,
                   state_reason="JobHeldAdmin" if hold else "BeginTime",
                   priority=0 if hold else (rec["priority"] or 1000))


class JobSubmitDescription:
    _ALLOWED = frozenset({
        "name", "account", "user_id", "group_id", "priority", "comment", "admin_comment",
        "excluded_nodes", "required_nodes", "nice", "partitions", "time_limit",
        "time_limit_min", "qos", "dependencies", "requeue", "working_directory",
        "gres_per_node", "gpus", "gpus_per_node", "gpus_per_task", "begin_time",
    })

    def __init__(self, **kwargs: Any):
        self._set: dict[str, Any] = {}
        self._alloc_sid: str | None = None
        for key, value in kwargs.items():
            if key not in self._ALLOWED:
                raise AttributeError(
                    f"'pyslurm.JobSubmitDescription' object has no attribute '{key}'")
            self._set[key] = value


# -- Node ----------------------------------------------------------------------------------

_NODE_STATES = {"DRAIN", "RESUME", "DOWN", "UNDRAIN", "FAIL", "FUTURE", "POWER_DOWN",
                "POWER_UP", "NORESP", "NO_RESP", "CANCEL_REBOOT"}


class Node:
    def __init__(self, name: str | None = None, **kwargs: Any):
        self._rec: dict[str, Any] = {"name": name, "cluster": LOCAL_CLUSTER}
        self._changes: dict[str, Any] = {}
        for key, value in kwargs.items():
            setattr(self, key, value)

    @classmethod
    def _from_record(cls, rec: dict[str, Any]) -> Node:
        node = cls.__new__(cls)
        node._rec = dict(rec)
        node._changes = {}
        return node

    def __repr__(self) -> str:
        return f"pyslurm.Node({self.name})"

    @property
    def name(self) -> str | None:
        return self._rec.get("name")

    @property
    def cluster(self) -> str:
        return self._rec.get("cluster", LOCAL_CLUSTER)

    @property
    def state(self) -> str:
        return "+".join([self._rec.get("base", "IDLE"), *self._rec.get("flags", [])])

    @state.setter
    def state(self, value: str) -> None:
        if not value or value.upper() not in _NODE_STATES:
            raise ValueError(f"Invalid Node state: {value}")
        self._changes["state"] = value.upper()

    @property
    def reason(self) -> str | None:
        return self._rec.get("reason")

    @reason.setter
    def reason(self, value: str) -> None:
        self._changes["reason"] = value

    @property
    def configured_gres(self) -> dict[str, Any]:
        return _to_gres_dict(self._rec.get("gres"))

    @property
    def allocated_gres(self) -> dict[str, Any]:
        tres = TrackableResources.from_str(self._rec.get("alloc_tres"))
        return {k: v.count for k, v in tres.gres.items()} if tres else {}

    @property
    def total_cpus(self) -> int:
        return self._rec.get("total_cpus", 0)

    @property
    def allocated_cpus(self) -> int:
        return self._rec.get("allocated_cpus", 0)

    @property
    def partitions(self) -> list[str]:
        return list(self._rec.get("partitions", []))

    @staticmethod
    def load(name: str) -> Node:
        calls.append("slurm_load_node_single")
        if name not in _nodes:
            raise RPCError(msg=f"Node '{name}' does not exist")
        return Node._from_record(_nodes[name])

    def modify(self, changes: Node) -> None:
        calls.append("slurm_update_node")
        rec = _nodes.get(self.name or "")
        if rec is None:
            raise RPCError(ESLURM_INVALID_NODE_NAME, "Invalid node name specified")
        state = changes._changes.get("state")
        reason = changes._changes.get("reason")
        if state in ("DRAIN", "DOWN") and not reason:
            raise RPCError(-1, "You must specify a reason when DOWNING or DRAINING a node")
        if state == "DRAIN":
            rec["flags"] = sorted({*rec["flags"], "DRAIN"})
            rec["reason"] = reason
        elif state == "DOWN":
            rec["base"] = "DOWN"
            rec["reason"] = reason
        elif state == "RESUME":
            if "DRAIN" not in rec["flags"] and rec["base"] != "DOWN":
                raise RPCError(ESLURM_INVALID_NODE_STATE, "Invalid node state specified")
            rec["flags"] = [f for f in rec["flags"] if f != "DRAIN"]
            if rec["base"] == "DOWN":
                rec["base"] = "IDLE"
            rec["reason"] = None
        elif reason is not None:
            rec["reason"] = reason
