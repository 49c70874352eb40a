"""CliSlurm: the Slurm client layer over squeue/sinfo/scontrol/scancel (the default backend).

Reads ``squeue --json`` and, for nodes, ``sinfo --json`` (openapi v0.0.38 on Slurm 22.05) or
``scontrol show nodes --json`` (23.02 on, where sinfo's JSON groups nodes into rows). The readers
also accept the shapes later plugins use (numbers as ``{"set", "infinite", "number"}``,
states as lists, structured exit codes), so a newer Slurm degrades to missing fields rather
than to a crash. Every command runs from an argv list (never a shell) with a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from policies.request import JobRequest
from slurm_plugin.slurm.client import (
    FINISHED_STATES,
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

_SCONTROL_JOB_TAGS = {
    "exc_nodes": "ExcNodeList",
    "nice": "Nice",
    "partition": "Partition",
    "comment": "Comment",
    "admin_comment": "AdminComment",
    "time_limit": "TimeLimit",
    "start_time": "StartTime",
}
_NO_VAL = 0xFFFFFFFE  # NO_VAL (and INFINITE above it) for 32-bit fields
_NO_VAL16 = 0xFFFE
_EAGAIN = "Resource temporarily unavailable"
_EAGAIN_FOR_S = 10.0
"""How long an action is tried again while slurmctld answers EAGAIN (24.11 and 26.05 do for
seconds at a time after an update of the same job): waits of 0.2 s doubling to 2 s."""
_SQUEUE_ENV = {"SLURM_BITSTR_LEN": "0"}
DATA_PARSERS = ("v0.0.45", "v0.0.44", "v0.0.43", "v0.0.42", "v0.0.41", "v0.0.40")
"""The data_parser versions this module reads (newest first; golden fixtures of v0.0.42 and
v0.0.45 in tests/fixtures/slurm). From 23.11 Slurm offers several and a site may change the
default (DataParserParameters), so the newest of these that the Slurm offers is asked for by
name."""
_INVALID_JOB_ID = "Invalid job id specified"
_MAX_JOBS_ASKED = 1000  # more ids than this: the whole queue (one short argv, one answer)
"""squeue writes an array's waiting task ids in full (default: cut at 64 characters, "...")."""


# --------------------------------------------------------------------------------------------
# Tolerant readers for one JSON record


def read_int(value: Any) -> int | None:
    """An integer from 22.05's plain numbers or 23.11+'s {"set", "infinite", "number"}
    (None when unset or infinite)."""
    if isinstance(value, dict):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value == value else None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def read_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value != "" else None


def _count(value: Any, unset: int = _NO_VAL) -> int | None:
    """A count or size Slurm may leave unset: None for missing, negative or a sentinel
    (``unset`` and above: NO_VAL/INFINITE, NO_VAL16 for 16-bit fields)."""
    n = read_int(value)
    return n if n is not None and 0 <= n < unset else None


def _ts(value: Any) -> float | None:
    n = read_int(value)
    return float(n) if n and 0 < n < _NO_VAL else None


def read_state(value: Any) -> tuple[str, tuple[str, ...]]:
    """(base, flags) from "RUNNING", ["PENDING", "REQUEUED"] or "IDLE+DRAIN"."""
    if isinstance(value, list):
        words = [str(v) for v in value if isinstance(v, str) and v]
    elif isinstance(value, str) and value:
        words = value.split("+")
    else:
        words = []
    if not words:
        return "UNKNOWN", ()
    return words[0], tuple(w.upper() for w in words[1:])


def _exit_code(value: Any) -> str | None:
    """"code:signal" from a raw wait status (22.05: 768 is exit 3) or a structured one."""
    if isinstance(value, dict):
        code = read_int(value.get("return_code"))
        sig = value.get("signal")
        sig_num = read_int(sig.get("id")) if isinstance(sig, dict) else read_int(sig)
        if code is None and sig_num is None:
            return None
        return f"{code or 0}:{sig_num or 0}"
    raw = read_int(value)
    if raw is None or raw < 0:
        return None
    return f"{(raw >> 8) & 0xFF}:{raw & 0x7F}"


def _gres_detail(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _tres_text(value: Any) -> str | None:
    text = read_text(value)
    return text if text and text != "(null)" else None


def job_from_squeue(rec: Mapping[str, Any], shards_per_gpu: int = 8) -> Job:
    """One ``squeue --json`` job record as a Job. Raises ValueError without a job id.

    Field names are the same in openapi v0.0.38 (22.05) and data_parser v0.0.39 to v0.0.44
    (23.02 to 25.11): account, admin_comment, array_job_id, array_task_id, array_max_tasks,
    array_task_string, batch_flag, comment, cpus (minimum CPUs; allocated once running),
    cpus_per_task,
    features, max_nodes, memory_per_cpu, memory_per_node (MB), node_count, partition, tasks,
    tasks_per_node, time_limit (minutes), tres_per_job/node/socket/task, user_id, user_name.
    v0.0.38 writes plain numbers (null or the raw sentinel when unset), later ones
    ``{"set", "infinite", "number"}``."""
    job_id = read_int(rec.get("job_id"))
    if not job_id or job_id <= 0:
        raise ValueError(f"job record without a job id: {str(dict(rec))[:200]}")
    state, _flags = read_state(rec.get("job_state"))
    state = state.upper()
    node_count = read_int(rec.get("node_count")) or 0
    request: dict[str, Any] = {
        "tres_per_node": _tres_text(rec.get("tres_per_node")),
        "tres_per_job": _tres_text(rec.get("tres_per_job")),
        "tres_per_task": _tres_text(rec.get("tres_per_task")),
        "tres_per_socket": _tres_text(rec.get("tres_per_socket")),
        "min_nodes": node_count or None,
        "num_tasks": read_int(rec.get("tasks")),
        "sockets_per_node": read_int(rec.get("sockets_per_node")),
    }
    try:
        req = JobRequest.model_validate({k: v for k, v in request.items() if v is not None})
        gpu_type, gpus, gpu_error = job_gpus(_gres_detail(rec.get("gres_detail")), req,
                                             shards_per_gpu)
    except ValidationError as exc:
        gpu_type, gpus, gpu_error = None, 0.0, f"unreadable request fields: {exc}"
    if gpu_error:
        log.warning("job %s: GPU request not understood: %s", job_id, gpu_error)
    array_job = read_int(rec.get("array_job_id"))
    reason = read_text(rec.get("state_reason"))
    limit = read_int(rec.get("time_limit"))
    nodes = read_text(rec.get("nodes"))
    return Job(
        **_request_fields(rec, request),
        job_id=job_id,
        array_job_id=array_job or None,
        array_task_id=read_int(rec.get("array_task_id")) if array_job else None,
        user=read_text(rec.get("user_name")),
        uid=read_int(rec.get("user_id")),
        account=read_text(rec.get("account")),
        partition=read_text(rec.get("partition")),
        state=state,
        reason=None if reason == "None" else reason,
        nice=read_int(rec.get("nice")) or 0,
        priority=read_int(rec.get("priority")),
        comment=read_text(rec.get("comment")),
        admin_comment=read_text(rec.get("admin_comment")),
        gpu_type=gpu_type,
        gpus=gpus,
        nodes=nodes,
        node_count=node_count,
        submit_ts=_ts(rec.get("submit_time")),
        start_ts=None if state == "PENDING" or (state in FINISHED_STATES and not nodes)
        else _ts(rec.get("start_time")),
        end_ts=_ts(rec.get("end_time")) if state in FINISHED_STATES else None,
        time_limit_min=limit if limit is not None and 0 < limit < _NO_VAL else None,
        restart_count=read_int(rec.get("restart_cnt")) or 0,
        requeue=rec.get("requeue") is True,
        exit_code=_exit_code(rec.get("exit_code")),
        cpus=read_int(rec.get("cpus")) or 0,
        work_dir=read_text(rec.get("current_working_directory")),
        name=read_text(rec.get("name")),
        cluster=read_text(rec.get("cluster")),
        exc_nodes=read_text(rec.get("excluded_nodes")),
        gpu_request_error=gpu_error,
        batch=rec.get("batch_flag") is not False,
    )


def _request_fields(rec: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
    """The Job's request fields (what a decision after submit reads) from one record."""
    return {
        "tres_per_node": request["tres_per_node"],
        "tres_per_job": request["tres_per_job"],
        "tres_per_task": request["tres_per_task"],
        "tres_per_socket": request["tres_per_socket"],
        "max_nodes": _count(rec.get("max_nodes")) or None,
        "num_tasks": _count(rec.get("tasks")),
        "ntasks_per_node": _count(rec.get("tasks_per_node"), _NO_VAL16) or None,
        "cpus_per_task": _count(rec.get("cpus_per_task"), _NO_VAL16) or None,
        "sockets_per_node": _count(rec.get("sockets_per_node"), _NO_VAL16) or None,
        "min_mem_per_node": _count(rec.get("memory_per_node")) or None,
        "min_mem_per_cpu": _count(rec.get("memory_per_cpu")) or None,
        "features": read_text(rec.get("features")),
        "array_task_string": read_text(rec.get("array_task_string")),
        "array_max_tasks": _count(rec.get("array_max_tasks")) or None,
    }


_OUT_STATES = frozenset({"down", "drained", "draining", "drain", "fail", "failing", "error",
                         "unknown", "future"})
_OUT_FLAGS = frozenset({"DRAIN", "DRAINED", "DRAINING", "DOWN", "FAIL", "FAILING",
                        "NOT_RESPONDING", "MAINTENANCE", "REBOOT_REQUESTED", "REBOOT_ISSUED"})


def node_from_sinfo(rec: Mapping[str, Any]) -> Node:
    """One ``sinfo --json`` node record as a Node. Raises ValueError without a name."""
    name = read_text(rec.get("name"))
    if not name:
        raise ValueError(f"node record without a name: {str(dict(rec))[:200]}")
    base, more_flags = read_state(rec.get("state"))
    flags = [f.upper() for f in rec.get("state_flags") or [] if isinstance(f, str)]
    flags += [f for f in more_flags if f not in flags]
    parts = rec.get("partitions")
    # 24.11 keeps the reason of a node resumed from DOWN on the idle node (22.05 clears it):
    # a reason counts, as in `sinfo -R`, only while the node is out of service
    out = base.lower() in _OUT_STATES or any(f in _OUT_FLAGS for f in flags)
    return Node(
        name=name,
        state=base.lower(),
        flags=tuple(flags),
        reason=read_text(rec.get("reason")) if out else None,
        gpus_total=node_gpu_counts(read_text(rec.get("gres"))),
        gpus_used=node_gpu_counts(read_text(rec.get("gres_used"))),
        cpus=read_int(rec.get("cpus")) or 0,
        alloc_cpus=read_int(rec.get("alloc_cpus")) or 0,
        partitions=tuple(p for p in parts if isinstance(p, str)) if isinstance(parts, list)
        else (),
    )


# --------------------------------------------------------------------------------------------


class CliSlurm:
    """SlurmClient over the Slurm commands.

    ``timeout`` bounds every command. ``cache_seconds`` > 0 lets ``jobs()``/``job()`` calls
    within that window share one squeue query (actions clear the cache), in the spirit of
    submitit's batched status checks. ``bin_dir`` picks the Slurm commands' directory;
    ``env`` replaces the environment they run with (SLURM_CONF comes from there).
    """

    def __init__(self, timeout: float = 10.0, cache_seconds: float = 0.0,
                 shards_per_gpu: int = 8, bin_dir: str | None = None,
                 env: Mapping[str, str] | None = None):
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.shards_per_gpu = shards_per_gpu
        self.bin_dir = bin_dir
        self.env = dict(env) if env is not None else None
        self._cache: tuple[float, list[Job]] | None = None
        self._version: tuple[int, int] | None = None
        self._json_flag: str | None = None

    # -- running commands ------------------------------------------------------------------

    def _run(self, argv: list[str], ok_codes: tuple[int, ...] = (0,),
             extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self.bin_dir:
            cmd[0] = os.path.join(self.bin_dir, cmd[0])
        env = self.env
        if extra_env:
            env = {**(os.environ if env is None else env), **extra_env}
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                                 timeout=self.timeout, env=env, stdin=subprocess.DEVNULL,
                                 check=False)
        except FileNotFoundError:
            raise SlurmError(argv, None, f"{cmd[0]}: command not found",
                             "install the Slurm client commands or set bin_dir") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(argv, None, f"no answer within {self.timeout:g} s",
                             "is slurmctld up? try `scontrol ping`") from None
        except OSError as exc:
            raise SlurmError(argv, None, f"cannot run {cmd[0]}: {exc}") from None
        if out.returncode not in ok_codes:
            raise SlurmError(argv, out.returncode, out.stderr.strip() or out.stdout.strip())
        return out

    def _json(self, argv: list[str], key: str,
              extra_env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        out = self._run(argv, extra_env=extra_env)
        try:
            data = json.loads(out.stdout)
        except json.JSONDecodeError as exc:
            raise SlurmError(argv, out.returncode,
                             f"output is not JSON ({exc}): {out.stdout[:200]!r}") from None
        if not isinstance(data, dict):
            raise SlurmError(argv, out.returncode, "output is not a JSON object")
        errors = [e for e in data.get("errors") or [] if e]
        records = data.get(key)
        if not isinstance(records, list):
            raise SlurmError(argv, out.returncode,
                             f"no '{key}' list in the output; errors: {errors or 'none'}")
        if errors:
            log.warning("%s reported errors: %s", " ".join(argv), errors)
        return [r for r in records if isinstance(r, dict)]

    def _action(self, argv: list[str]) -> None:
        self._cache = None
        give_up = time.monotonic() + _EAGAIN_FOR_S
        wait = 0.2
        while True:
            try:
                self._run(argv)
                return
            except SlurmError as exc:
                # 24.11/26.05's slurmctld answers `scontrol update` with EAGAIN now and then
                if _EAGAIN not in str(exc) or time.monotonic() + wait > give_up:
                    raise
                log.info("%s: %s; trying again", " ".join(argv), _EAGAIN)
                time.sleep(wait)
                wait = min(2 * wait, 2.0)

    def slurm_version(self) -> tuple[int, int] | None:
        """(major, minor) of the Slurm commands, from ``sinfo --version`` (asked once; None
        when it cannot be read, and asked again next time)."""
        if self._version is None:
            try:
                out = self._run(["sinfo", "--version"])
            except SlurmError:
                return None
            m = re.search(r"\b(\d+)\.(\d+)(?:\.\d+)?\b", out.stdout)
            if not m:
                return None
            self._version = (int(m.group(1)), int(m.group(2)))
        return self._version

    def json_flag(self) -> str:
        """``--json=<data_parser>`` from 23.11 (the newest in DATA_PARSERS that
        ``squeue --json=list`` offers), else ``--json`` (22.05 and 23.02 have one format;
        a Slurm offering none of ours gets its default, with a warning). Asked once."""
        if self._json_flag is None:
            version = self.slurm_version()
            if version is None:
                return "--json"  # asked again next time
            flag = "--json"
            if version >= (23, 11):
                try:
                    listing = self._run(["squeue", "--json=list"]).stdout
                except SlurmError as exc:
                    log.warning("cannot list Slurm's data_parser plugins (%s); using its "
                                "default JSON format", exc)
                    listing = ""
                offered = set(re.findall(r"data_parser/(v\d+\.\d+\.\d+)", listing))
                ours = [v for v in DATA_PARSERS if v in offered]
                if ours:
                    flag = f"--json={ours[0]}"
                elif listing:
                    log.warning("Slurm offers data_parser %s; slurmgate reads %s: using "
                                "Slurm's default", ", ".join(sorted(offered)) or "none",
                                ", ".join(DATA_PARSERS))
            self._json_flag = flag
        return self._json_flag

    # -- queries ---------------------------------------------------------------------------

    def jobs(self, job_ids: Iterable[int] | None = None) -> list[Job]:
        wanted = None if job_ids is None else {check_job_id(j) for j in job_ids}
        if wanted is not None and not wanted:
            return []
        now = time.monotonic()
        if self._cache and self.cache_seconds > 0 and now - self._cache[0] < self.cache_seconds:
            everything = self._cache[1]
        else:
            version = self.slurm_version()
            server_side = (wanted is not None and len(wanted) <= _MAX_JOBS_ASKED
                           and version is not None and version >= (23, 2))
            everything = self._squeue(wanted if server_side else None)
            if self.cache_seconds > 0 and not server_side:
                self._cache = (now, everything)
        if wanted is None:
            return list(everything)
        return [j for j in everything if j.job_id in wanted]

    def _squeue(self, wanted: set[int] | None) -> list[Job]:
        """squeue's records as Jobs, of the ``wanted`` ids only (from 23.02, where squeue
        applies -j) or of the whole queue. 22.05's squeue --json ignores -j and --states (it
        lists the whole queue, finished jobs too), so there the caller filters. From 23.02
        --states=all keeps finished jobs (until MinJobAge) in the answer."""
        argv = ["squeue", "--all", "--states=all", self.json_flag()]
        if wanted is not None:
            argv.append("--jobs=" + ",".join(str(j) for j in sorted(wanted)))
        try:
            records = self._json(argv, "jobs", _SQUEUE_ENV)
        except SlurmError as exc:
            if wanted is not None and _INVALID_JOB_ID in str(exc):
                return []  # every id asked for has left Slurm's memory
            raise
        jobs = []
        for rec in records:
            try:
                jobs.append(job_from_squeue(rec, self.shards_per_gpu))
            except ValueError as exc:
                log.warning("skipping a squeue record: %s", exc)
        return jobs

    def job(self, job_id: int) -> Job | None:
        found = self.jobs([check_job_id(job_id)])
        return found[0] if found else None

    def nodes(self) -> list[Node]:
        merged: dict[str, Node] = {}
        # From 23.02 `sinfo --json` writes grouped rows ("sinfo"), and node records come
        # from `scontrol show nodes --json` (same fields as 22.05's sinfo node records).
        version = self.slurm_version()
        argv = (["scontrol", "show", "nodes", self.json_flag()]
                if version and version >= (23, 2) else ["sinfo", "--all", "--json"])
        for rec in self._json(argv, "nodes"):
            try:
                node = node_from_sinfo(rec)
            except ValueError as exc:
                log.warning("skipping a sinfo record: %s", exc)
                continue
            seen = merged.get(node.name)
            if seen is not None:  # listed once per partition by some versions
                parts = seen.partitions + tuple(p for p in node.partitions
                                                if p not in seen.partitions)
                node = replace(node, partitions=parts)
            merged[node.name] = node
        return list(merged.values())

    def _hold_state(self, job_id: int) -> str | None:
        """"admin"/"user" when the job is held now, "no" when it is not, None when Slurm
        does not know it (or cannot say). The text output honours --jobs; JSON does not."""
        try:
            out = self._run(["squeue", "--noheader", "--states=all", f"--jobs={job_id}",
                             "--format=%Q|%r"])
        except SlurmError:
            return None
        for line in out.stdout.splitlines():
            prio, _, reason = line.strip().partition("|")
            if prio.strip() == "0":
                return "user" if reason.strip() == "JobHeldUser" else "admin"
            return "no"
        return None

    # -- job actions -----------------------------------------------------------------------

    def hold(self, job_id: int, reason: str | None = None) -> None:
        check_job_id(job_id)
        if reason is not None:
            check_text("hold reason", reason)
        self._action(["scontrol", "hold", str(job_id)])
        log.info("held job %s: %s", job_id, reason or "(no reason given)")

    def release(self, job_id: int) -> None:
        check_job_id(job_id)
        # A release of a job that is not held resets its nice to 0 (verified on 22.05):
        # only release what is held. An unknown job goes to scontrol for its own error.
        if self._hold_state(job_id) == "no":
            log.info("release of job %s skipped: it is not held", job_id)
            return
        self._action(["scontrol", "release", str(job_id)])

    def requeue(self, job_id: int, hold: bool = False) -> None:
        check_job_id(job_id)
        self._action(["scontrol", "requeuehold" if hold else "requeue", str(job_id)])

    def cancel(self, job_id: int) -> None:
        check_job_id(job_id)
        self._cache = None
        # Without -v, scancel of an unknown job exits 0 and says nothing (verified on 22.05).
        argv = ["scancel", "--verbose", str(job_id)]
        out = self._run(argv)
        errors = [line for line in out.stderr.splitlines() if "error:" in line]
        if errors and not all("already completing or completed" in e for e in errors):
            raise SlurmError(argv, out.returncode, "\n".join(errors))

    def update_job(self, job_id: int, **fields: Any) -> None:
        check_job_id(job_id)
        clean = check_job_fields(fields)
        held = self._hold_state(job_id) if "nice" in clean else None
        argv = ["scontrol", "update", f"JobId={job_id}"]
        argv += [f"{_SCONTROL_JOB_TAGS[k]}={v}" for k, v in clean.items()]
        self._action(argv)
        if held in ("admin", "user"):
            # Nice on a held job lifts its priority off 0 (priority/basic): hold it again.
            self._action(["scontrol", "uhold" if held == "user" else "hold", str(job_id)])

    # -- node actions ----------------------------------------------------------------------

    def drain(self, node: str, reason: str) -> None:
        self._action(["scontrol", "update", f"NodeName={check_node_name(node)}", "State=DRAIN",
                      f"Reason={check_reason(reason)}"])

    def resume(self, node: str) -> None:
        self._action(["scontrol", "update", f"NodeName={check_node_name(node)}",
                      "State=RESUME"])

    def set_down(self, node: str, reason: str) -> None:
        self._action(["scontrol", "update", f"NodeName={check_node_name(node)}", "State=DOWN",
                      f"Reason={check_reason(reason)}"])


__all__ = ["CliSlurm", "job_from_squeue", "node_from_sinfo", "read_int", "read_state",
           "read_text"]
