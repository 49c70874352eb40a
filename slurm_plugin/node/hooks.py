"""`slurmgate hook prolog|epilog|jobcomp`: what Slurm runs on every node and at every job end.

prolog (slurmd, as root): snapshot each allocated GPU's energy counter into
    ``<state_dir>/baseline/<node>.<job_id>.json`` (policy ``[node] state_dir``: node-local,
    root-only 0700; never the shared spool).
epilog (slurmd): read the baseline, take the deltas (energy) and the run's utilisation and
    memory, write one ``node_run`` record, delete the baseline, nudge the daemon.
jobcomp (slurmctld's jobcomp/script, as SlurmUser): one ``jobcomp`` record from the
    environment slurmctld sets (JOBID, JOBSTATE, START, END, ...), then nudge.

Records go to the writer's subdirectory of the shared spool (``node/`` or ``ctld/``, see
slurm_plugin.node.spool); when that write fails for any reason the record is kept in
``<state_dir>/fallback/`` and every later hook run on that node (and the agent) forwards such
records, oldest first.

Rules: a hook never fails a job or drains a node because of slurmgate's own errors: any
exception becomes one line on stderr (the wrapper appends it to a log) and exit status 0.
Start-up is kept light: the policy TOML is read with tomllib for the few settings hooks need
(no pydantic), NVML is only loaded when the job has GPUs. The config path comes from
``SLURMGATE_CONFIG`` (default /etc/slurmgate/policy.toml).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from policies import defaults, records
from slurm_plugin.node import spool
from slurm_plugin.node.nvml import (
    Allocated,
    GpuBackend,
    open_backend,
    parse_job_gpus,
    select_allocated,
)

Env = Mapping[str, str]

# Slurm's "not set" sentinels as they appear in %u-formatted environment values.
_SENTINELS = {0xFFFE, 0xFFFF, 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFE, 0xFFFFFFFFFFFFFFFF}
_UNSET = {"", "unknown", "none", "null", "(null)", "n/a", "na"}


class HookConfigError(Exception):
    """The policy file cannot be read or the hook settings in it are wrong."""


class HookSettings(NamedTuple):
    spool_dir: str
    socket: str
    cluster: str
    nvml: dict[str, Any]
    gpu_numbering: str
    """How SLURM_JOB_GPUS maps to devices: "minor" (gres.conf File=/dev/nvidiaN) or "pci"
    (AutoDetect=nvml). Read from nvml.gpu_numbering when present; default minor."""
    state_dir: str = defaults.NODE_STATE_DIR
    """``[node] state_dir``: node-local, root-only; baselines and the fallback spool."""
    slurm_user: str = "slurm"
    """``daemon.slurm_user``: owner of ctld/ and the group of the spool."""
    squash_uid: int | None = None
    """``daemon.spool_squash_uid``: root on a root_squash NFS spool."""

    @property
    def trust(self) -> spool.Trust:
        return spool.trust_for(self.slurm_user, self.squash_uid)


def _table(data: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise HookConfigError(f"{path}: [{key}] must be a table")
    return value


def _setting(table: dict[str, Any], key: str, default: str, where: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise HookConfigError(f"{where}.{key} must be a non-empty string, not {value!r}")
    return value


def load_settings(path: str) -> HookSettings:
    """The hooks' few settings, straight from the TOML (defaults as in policies.config)."""
    from slurm_plugin.node.policy_file import PolicyFileError, read_policy_file

    try:
        data = read_policy_file(path)
    except PolicyFileError as exc:
        raise HookConfigError(str(exc)) from exc
    daemon = _table(data, "daemon", path)
    nvml = _table(data, "nvml", path)
    node = _table(data, "node", path)
    squash = daemon.get("spool_squash_uid")
    if squash is not None and (not isinstance(squash, int) or isinstance(squash, bool)
                               or squash < 0):
        raise HookConfigError(f"{path}: daemon.spool_squash_uid must be a uid, not {squash!r}")
    where = f"{path}: daemon"
    backend = nvml.get("backend", defaults.NVML_BACKEND)
    if backend not in ("real", "fake"):
        raise HookConfigError(f"{path}: nvml.backend must be 'real' or 'fake', not {backend!r}")
    numbering = nvml.get("gpu_numbering", defaults.GPU_NUMBERING)
    if numbering not in ("minor", "pci"):
        raise HookConfigError(
            f"{path}: nvml.gpu_numbering must be 'minor' or 'pci', not {numbering!r}"
        )
    if not isinstance(nvml.get("fake_nodes", {}), dict):
        raise HookConfigError(f"{path}: nvml.fake_nodes must be a table")
    return HookSettings(
        spool_dir=_setting(daemon, "spool_dir", defaults.SPOOL_DIR, where),
        socket=_setting(daemon, "socket", defaults.SOCKET, where),
        cluster=_setting(daemon, "cluster", defaults.CLUSTER, where),
        nvml=nvml,
        gpu_numbering=numbering,
        state_dir=_setting(node, "state_dir", defaults.NODE_STATE_DIR, f"{path}: node"),
        slurm_user=_setting(daemon, "slurm_user", "slurm", where),
        squash_uid=squash,
    )


# -- parsing Slurm's environment -------------------------------------------------------------


def _str(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in _UNSET else value


def _int(value: str | None) -> int | None:
    """'42' -> 42; '', 'Unknown', junk and Slurm's NO_VAL/INFINITE sentinels -> None."""
    text = _str(value)
    if text is None:
        return None
    try:
        number = int(text)
    except ValueError:
        try:
            number = int(float(text))
        except (ValueError, OverflowError):
            return None
    return None if number in _SENTINELS else number


def _epoch(value: str | None) -> float | None:
    """Epoch seconds; 0 (never started/ended) and unknowns -> None."""
    number = _int(value)
    return float(number) if number is not None and number > 0 else None


def parse_time_limit(value: str | None) -> int | None:
    """jobcomp's LIMIT (Slurm's mins2time_str: 'UNLIMITED', 'HH:MM:SS', 'D-HH:MM:SS'; also
    plain minutes, 'MM:SS', 'D-HH', 'D-HH:MM') -> minutes, rounded up; None if unlimited or
    unreadable."""
    text = _str(value)
    if text is None:
        return None
    days = 0
    if "-" in text:
        head, _, text = text.partition("-")
        if not head.isdigit():
            return None
        days = int(head)
        fields = text.split(":")
        if not 1 <= len(fields) <= 3:
            return None
        fields += ["0"] * (3 - len(fields))  # D-HH, D-HH:MM
        hours, minutes, seconds = fields
    else:
        fields = text.split(":")
        if len(fields) == 1:
            hours, minutes, seconds = "0", fields[0], "0"
        elif len(fields) == 2:
            hours, (minutes, seconds) = "0", fields
        elif len(fields) == 3:
            hours, minutes, seconds = fields
        else:
            return None
    if not all(f.isdigit() for f in (hours, minutes, seconds)):
        return None
    total = ((days * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(seconds)
    result = -(-total // 60)
    return None if result >= 0xFFFFFFFE else result


def _job_id(env: Env) -> int:
    job_id = _int(env.get("SLURM_JOB_ID")) or _int(env.get("SLURM_JOBID"))
    if job_id is None:
        raise ValueError(f"SLURM_JOB_ID is missing or not a number: {env.get('SLURM_JOB_ID')!r}")
    return job_id


def _node(env: Env) -> str:
    node = _str(env.get("SLURMD_NODENAME"))
    if node is None:
        import socket

        node = socket.gethostname().split(".")[0]
    return node


def _who(env: Env) -> str:
    job = env.get("SLURM_JOB_ID") or env.get("JOBID") or "?"
    node = env.get("SLURMD_NODENAME")
    return f"job={job}" + (f" node={node}" if node else "")


# -- baseline --------------------------------------------------------------------------------


def baseline_path(state_dir: str, node: str, job_id: int) -> str:
    """``<state_dir>/baseline/<node>.<job_id>.json``. One baseline per job and node. Not per
    restart: on Slurm 22.05 a requeued run's Prolog still sees SLURM_JOB_RESTART_COUNT=0
    while its Epilog sees the real count, and runs of one
    job on one node never overlap (an Epilog that never ran leaves a baseline the next Prolog
    there overwrites)."""
    name = f"{spool.name_part(node)}.{job_id}.json"
    return os.path.join(spool.state_path(state_dir), "baseline", name)


_BASELINE_MAX = 4 * 2**20


def _write_baseline(path: str, state_dir: str, baseline: dict[str, Any]) -> None:
    fd = spool.open_state_subdir(state_dir, "baseline")
    try:
        spool.atomic_write_at(fd, fd, os.path.basename(path), spool.encode_record(baseline),
                              0o600)
    finally:
        os.close(fd)


def _load_baseline(path: str) -> bytes | None:
    """The baseline's bytes, opened O_NOFOLLOW|O_NONBLOCK in the private directory; None when
    there is none. Raises ValueError for anything that is not our own regular file."""
    try:
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        try:
            fd = os.open(os.path.basename(path),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                    or st.st_size > _BASELINE_MAX):
                raise ValueError("not this node's baseline file")
            return os.read(fd, _BASELINE_MAX)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def _read_baseline(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """(baseline, None) or (None, flag) where flag says why there is none."""
    try:
        raw = _load_baseline(path)
        if raw is None:
            return None, "no_baseline"
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None, "baseline_unreadable"
    if not isinstance(data, dict) or not isinstance(data.get("gpus", []), list):
        return None, "baseline_unreadable"
    start = data.get("start_ts")
    if not isinstance(start, (int, float)) or isinstance(start, bool):
        data["start_ts"] = None
    return data, None


GPU_HOLDERS_MAX_FILES = 4096
"""Baselines ``gpu_holders`` reads at most per call (a node runs far fewer jobs at once)."""


def _boot_time() -> float:
    """When this host booted (``btime`` in /proc/stat); 0 when it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def gpu_holders(state_dir: str, node: str) -> dict[str, int]:
    """GPU uuid -> id of the job whose Prolog baseline on ``node`` lists it: which job holds
    which GPU, for the agent to tag its samples with.

    Read from the baselines themselves (the Prolog resolved SLURM_JOB_GPUS to NVML uuids, see
    nvml.select_allocated), each opened like the Epilog opens its own (``_load_baseline``:
    no symlinks, our own regular file, size cap). A baseline an Epilog never removed may
    still name a GPU a later job holds: the newest baseline (by its start) wins, and the
    daemon only reads tags of jobs Slurm says are running (and only on the nodes Slurm runs
    them on). A baseline from before this boot names no running job and is skipped, as are
    unreadable files."""
    booted = _boot_time()
    directory = os.path.join(spool.state_path(state_dir), "baseline")
    prefix = f"{spool.name_part(node)}."
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries
                     if e.name.startswith(prefix) and e.name.endswith(".json")]
    except OSError:
        return {}
    newest: dict[str, tuple[float, int]] = {}
    for name in sorted(names)[:GPU_HOLDERS_MAX_FILES]:
        id_text = name[len(prefix):-len(".json")]
        if not id_text.isdigit():
            continue
        job_id = int(id_text)
        base, why = _read_baseline(os.path.join(directory, name))
        if base is None or why or base.get("job_id") != job_id:
            continue
        start = base.get("start_ts")
        started = float(start) if isinstance(start, int | float) else 0.0
        if started < booted:
            continue
        for gpu in base.get("gpus", []):
            uuid = gpu.get("uuid") if isinstance(gpu, dict) else None
            if isinstance(uuid, str) and uuid and (uuid not in newest
                                                   or newest[uuid][0] <= started):
                newest[uuid] = (started, job_id)
    return {uuid: job_id for uuid, (_, job_id) in newest.items()}


def _epilog_restart(env: Env, base: dict[str, Any] | None) -> tuple[int, bool]:
    """SLURM_JOB_RESTART_COUNT comes from the job credential and may be missing in an
    epilog: then take the prolog's (or 0), and say so."""
    restart = _int(env.get("SLURM_JOB_RESTART_COUNT"))
    if restart is not None and restart >= 0:
        return restart, False
    prolog_count = (base or {}).get("restart_count")
    return (prolog_count if isinstance(prolog_count, int) and prolog_count >= 0 else 0), True


# -- the hooks -------------------------------------------------------------------------------


def _open(settings: HookSettings, node: str, now: float, notes: list[str]) -> GpuBackend | None:
    try:
        return open_backend(settings.nvml, node, clock=lambda: now)
    except Exception as exc:
        notes.append(f"GPU readings unavailable: {type(exc).__name__}: {exc}")
        return None


def prolog(env: Env, settings: HookSettings, now: float) -> list[str]:
    """Write the baseline. Returns notes worth one log line (degraded readings)."""
    notes: list[str] = []
    try:  # ROOT/TEAM/USER for the job's checkpoints, made by root (never fails the prolog)
        from slurm_plugin.node import ckptdir

        notes.extend(ckptdir.prepare_job(env))
    except Exception as exc:
        notes.append(f"checkpoint directory: {type(exc).__name__}: {exc}")
    job_id = _job_id(env)
    restart = _int(env.get("SLURM_JOB_RESTART_COUNT")) or 0
    node = _node(env)
    job_gpus = env.get("SLURM_JOB_GPUS")
    flags: list[str] = []
    gpus: list[dict[str, Any]] = []
    if parse_job_gpus(job_gpus):
        backend = _open(settings, node, now, notes)
        if backend is None:
            flags.append("nvml_unavailable")
        else:
            try:
                for alloc in select_allocated(backend.devices(), job_gpus, settings.gpu_numbering):
                    gpus.append(_baseline_gpu(backend, alloc, flags, notes))
            finally:
                backend.close()
    baseline = {
        "v": 1, "cluster": settings.cluster, "job_id": job_id, "restart_count": restart,
        "node": node, "user": _str(env.get("SLURM_JOB_USER")),
        "account": _str(env.get("SLURM_JOB_ACCOUNT")), "start_ts": now,
        "job_gpus": job_gpus, "gpus": gpus, "flags": flags,
        "sluid": _str(env.get("SLURM_JOB_SLUID")),
    }
    path = baseline_path(settings.state_dir, node, job_id)
    _write_baseline(path, settings.state_dir, baseline)
    return notes


def _baseline_gpu(
    backend: GpuBackend, alloc: Allocated, flags: list[str], notes: list[str]
) -> dict[str, Any]:
    dev = alloc.device
    if dev is None:
        flags.append(f"gpu_not_found:{alloc.token}")
        return {"index": alloc.slurm_index, "token": alloc.token, "uuid": None}
    reading = backend.read(dev.uuid)
    notes.extend(reading.notes)
    return {
        "index": alloc.slurm_index if alloc.slurm_index is not None else dev.index,
        "token": alloc.token, "minor": dev.minor, "uuid": dev.uuid, "gpu_type": dev.gpu_type,
        "pci_bus_id": dev.pci_bus_id, "energy_mj": reading.energy_mj, "ts": reading.ts,
    }


def epilog(env: Env, settings: HookSettings, now: float) -> list[str]:
    """Write one node_run record for this node's share of the run, then nudge the daemon."""
    notes: list[str] = []
    job_id = _job_id(env)
    node = _node(env)
    path = baseline_path(settings.state_dir, node, job_id)
    base, why = _read_baseline(path)
    restart, guessed = _epilog_restart(env, base)
    flags: list[str] = ["restart_count_missing"] if guessed else []
    if why:
        flags.append(why)
        notes.append(f"{why.replace('_', ' ')} at {path}; energy and start time unknown")
    start_ts = base.get("start_ts") if base else None
    if start_ts is None and _epoch(env.get("SLURM_JOB_START_TIME")) is not None:
        start_ts = _epoch(env.get("SLURM_JOB_START_TIME"))
        flags.append("start_from_env")
    if base:
        flags.extend(f for f in base.get("flags", []) if isinstance(f, str) and f not in flags)
    job_gpus = env.get("SLURM_JOB_GPUS")
    if job_gpus is None and base:
        job_gpus = base.get("job_gpus")
    gpus: list[dict[str, Any]] = []
    tokens = parse_job_gpus(job_gpus)
    if tokens:
        backend = _open(settings, node, now, notes)
        if backend is None and "nvml_unavailable" not in flags:
            flags.append("nvml_unavailable")
        try:
            devices = backend.devices() if backend else []
            for alloc in select_allocated(devices, job_gpus, settings.gpu_numbering):
                gpus.append(_run_gpu(backend, alloc, base, node, start_ts, now, flags, notes))
        finally:
            if backend:
                backend.close()
    record = records.node_run_record(
        cluster=settings.cluster, job_id=job_id, restart_count=restart, node=node,
        user=_str(env.get("SLURM_JOB_USER")) or (base or {}).get("user"),
        account=_str(env.get("SLURM_JOB_ACCOUNT")) or (base or {}).get("account"),
        start_ts=start_ts, end_ts=now, gpus=gpus, flags=list(dict.fromkeys(flags)),
        sluid=_str(env.get("SLURM_JOB_SLUID")) or _str((base or {}).get("sluid")),
    )
    emit(settings, record, notes)
    if base is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    _nudge(settings)
    return notes


def _run_gpu(
    backend: GpuBackend | None, alloc: Allocated, base: dict[str, Any] | None, node: str,
    start_ts: float | None, now: float, flags: list[str], notes: list[str],
) -> dict[str, Any]:
    dev = alloc.device
    base_gpus = [g for g in (base or {}).get("gpus", []) if isinstance(g, dict)]
    base_gpu = next((g for g in base_gpus if dev and g.get("uuid") == dev.uuid), None)
    if base_gpu is None and dev is None:
        base_gpu = next((g for g in base_gpus if g.get("token") == alloc.token), None)
    info = base_gpu or {}
    index = alloc.slurm_index if alloc.slurm_index is not None else (dev.index if dev else -1)
    entry = records.node_run_gpu(
        index=index,
        minor=dev.minor if dev else _opt_int(info.get("minor")),
        # Unknown device (not found, or no NVML): a placeholder that is unique in the record
        # and cannot be mistaken for an NVML UUID, so the GPU time is still accounted.
        uuid=dev.uuid if dev else str(info.get("uuid") or f"unknown:{node}:{alloc.token}"),
        gpu_type=dev.gpu_type if dev else str(info.get("gpu_type") or "unknown"),
        gpu_seconds=max(now - start_ts, 0.0) if start_ts is not None else None,
    )
    if dev is None:
        if backend is not None:
            flags.append(f"gpu_not_found:{alloc.token}")
        return entry
    reading = backend.read(dev.uuid, since=start_ts) if backend else None
    if reading is None:
        return entry
    notes.extend(reading.notes)
    e0 = _opt_int(info.get("energy_mj"))
    if e0 is not None and reading.energy_mj is not None:
        if reading.energy_mj >= e0:
            entry["energy_j"] = (reading.energy_mj - e0) / 1000.0
        else:
            flags.append(f"energy_counter_reset:{index}")
    elif base is not None:
        flags.append(f"no_energy:{index}")
    acct = reading.accounting
    if acct is not None:
        entry["util_mean"] = acct.util_mean
        entry["util_max"] = acct.util_max
        entry["mem_max_bytes"] = acct.mem_max_bytes
    elif start_ts is not None:
        flags.append(f"no_accounting:{index}")
    return entry


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def jobcomp(env: Env, settings: HookSettings, now: float) -> list[str]:
    """One jobcomp record from slurmctld's jobcomp/script environment, then nudge."""
    job_id = _int(env.get("JOBID"))
    if job_id is None:
        raise ValueError(f"JOBID is missing or not a number: {env.get('JOBID')!r}")
    array_job = _int(env.get("ARRAYJOBID"))
    state = (_str(env.get("JOBSTATE")) or "UNKNOWN").split()[0].upper()
    if state == "PENDING":  # `scontrol requeue` ends a run with the job already pending again
        state = "REQUEUED"
    record = records.jobcomp_record(
        cluster=settings.cluster, job_id=job_id, restart_count=None, state=state,
        submit_ts=_epoch(env.get("SUBMIT")), start_ts=_epoch(env.get("START")),
        end_ts=_epoch(env.get("END")),
        nodes=_str(env.get("NODES")) or "", node_count=_int(env.get("NODECNT")) or 0,
        partition=_str(env.get("PARTITION")), uid=_int(env.get("UID")),
        user=_str(env.get("USERNAME")), account=_str(env.get("ACCOUNT")),
        exit_code=_str(env.get("EXITCODE")), derived_ec=_str(env.get("DERIVED_EC")),
        time_limit_min=parse_time_limit(env.get("LIMIT")),
        # jobcomp/script sets ARRAYJOBID=0 and ARRAYTASKID=NO_VAL for jobs outside arrays.
        array_job_id=array_job if array_job else None,
        array_task_id=_int(env.get("ARRAYTASKID")) if array_job else None,
        work_dir=_str(env.get("WORK_DIR")), sluid=_str(env.get("SLUID")),
    )
    notes: list[str] = []
    emit(settings, record, notes)
    _nudge(settings)
    return notes


class RecordNotWritten(RuntimeError):
    """Neither the shared spool nor the node's fallback spool took the record: its text is
    in the message, so the hook's log line still holds it."""


def emit(settings: HookSettings, record: dict[str, Any], notes: list[str]) -> str:
    """Forward older fallback records first (oldest first), then deliver this one: to the
    shared spool, else to ``<state_dir>/fallback/`` (with a note). Returns its path."""
    trust = settings.trust
    forward(settings, notes, trust)
    rec = spool.prepare_record(record)
    try:
        done = spool.deliver(settings.spool_dir, rec, trust=trust, state_dir=settings.state_dir)
    except spool.RefusedRecord:
        raise
    except Exception as exc:
        text = spool.encode_record(rec).decode("ascii").strip()
        raise RecordNotWritten(f"record not written ({type(exc).__name__}: {exc}): {text}") \
            from exc
    if done.fallback_reason is not None:
        notes.append(f"shared spool not writable ({done.fallback_reason}); record kept in "
                     f"{done.path} until a later hook run forwards it")
    return done.path


def forward(settings: HookSettings, notes: list[str], trust: spool.Trust | None = None) -> int:
    """Move this node's fallback records to the shared spool; a failure is a note."""
    if not spool.fallback_records(settings.state_dir):
        return 0
    moved, error = spool.forward_fallback(settings.spool_dir, trust=trust or settings.trust,
                                          state_dir=settings.state_dir)
    if moved:
        notes.append(f"forwarded {moved} fallback record(s) to the shared spool")
    if error:
        notes.append(f"fallback records wait: {error}")
    return moved


def _nudge(settings: HookSettings) -> None:
    """Wake the daemon (``slurm_plugin.protocol.nudge``: never raises, bounded by its short
    timeout). Imported once the record is safe in the spool: the client is not start-up
    cost."""
    from slurm_plugin.protocol import nudge

    nudge(settings.socket)


HOOKS: dict[str, Callable[[Env, HookSettings, float], list[str]]] = {
    "prolog": prolog, "epilog": epilog, "jobcomp": jobcomp,
}


def _say(line: str) -> None:
    try:
        sys.stderr.write(line.replace("\n", " | ") + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def main(
    argv: Sequence[str] | None = None, env: Env | None = None, now: float | None = None
) -> int:
    """Run one hook. 0 whatever happens inside it; 2 only for a usage error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["hook"]:
        args = args[1:]
    if not args or args[0] not in HOOKS:
        _say(f"usage: slurmgate hook {{{'|'.join(HOOKS)}}}")
        return 2
    name = args[0]
    env = os.environ if env is None else env
    try:
        settings = load_settings(defaults.policy_path(env=env))
        notes = HOOKS[name](env, settings, time.time() if now is None else now)
        if name == "prolog":  # epilog and jobcomp forward before writing their own record
            forward(settings, notes)
        if notes:
            _say(f"slurmgate hook {name} {_who(env)}: note: " + "; ".join(dict.fromkeys(notes)))
    except Exception as exc:
        _say(f"slurmgate hook {name} {_who(env)}: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
