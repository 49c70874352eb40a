"""Read sbatch options the way sbatch does, for `slurmgate estimate` (a dry run).

Options come from the script's leading ``#SBATCH`` lines, then the command line (which wins).
The result has the job_desc field names job_submit.lua sends, so the daemon prices a dry run
with exactly the code that prices a real submission.
"""

from __future__ import annotations

import re
import shlex
from typing import Any


class SbatchArgsError(ValueError):
    """An option sbatch would not accept either; the message says which and why."""


_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", re.IGNORECASE)

# option -> (job_desc field, kind). Short and long forms, as sbatch spells them.
_OPTIONS: dict[str, tuple[str, str]] = {
    "-A": ("account", "str"), "--account": ("account", "str"),
    "-p": ("partition", "str"), "--partition": ("partition", "str"),
    "--comment": ("comment", "str"),
    "--wckey": ("wckey", "str"),
    "-J": ("name", "str"), "--job-name": ("name", "str"),
    "-D": ("work_dir", "str"), "--chdir": ("work_dir", "str"),
    "-t": ("time_limit", "time"), "--time": ("time_limit", "time"),
    "-N": ("min_nodes", "nodes"), "--nodes": ("min_nodes", "nodes"),
    "-n": ("num_tasks", "int"), "--ntasks": ("num_tasks", "int"),
    "--ntasks-per-node": ("ntasks_per_node", "int"),
    "-c": ("cpus_per_task", "int"), "--cpus-per-task": ("cpus_per_task", "int"),
    "--mem": ("min_mem_per_node", "mem"),
    "--mem-per-cpu": ("min_mem_per_cpu", "mem"),
    "-a": ("array_inx", "str"), "--array": ("array_inx", "str"),
    "--gres": ("tres_per_node", "gres"),
    "-G": ("tres_per_job", "gpus"), "--gpus": ("tres_per_job", "gpus"),
    "--gpus-per-node": ("tres_per_node", "gpus"),
    "--gpus-per-task": ("tres_per_task", "gpus"),
    "--gpus-per-socket": ("tres_per_socket", "gpus"),
    "--sockets-per-node": ("sockets_per_node", "int"),
    "-q": ("qos", "str"), "--qos": ("qos", "str"),
    "-x": ("exc_nodes", "str"), "--exclude": ("exc_nodes", "str"),
}
_FLAGS: dict[str, tuple[str, int]] = {
    "--requeue": ("requeue", 1), "--no-requeue": ("requeue", 0),
}


def parse_time(text: str) -> int | None:
    """Slurm time limit -> minutes (seconds round up); None for UNLIMITED."""
    t = text.strip()
    if t.upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    m = _TIME_RE.match(t)
    if not m:
        raise SbatchArgsError(
            f"time limit {t!r} is not a Slurm time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
            "D-HH:MM:SS)"
        )
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return int(days) * 1440 + h * 60 + mi + (1 if s else 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 60 + int(b) + (1 if int(c) else 0)
    if b is not None:  # MM:SS
        return int(a) + (1 if int(b) else 0)
    return int(a)


def parse_mem(text: str) -> int:
    """Slurm memory size -> MB (default unit MB)."""
    m = _MEM_RE.match(text.strip())
    if not m:
        raise SbatchArgsError(f"memory {text!r} is not a size like 4000, 16G or 1T")
    value, unit = float(m.group(1)), m.group(2).upper()
    factor = {"": 1, "M": 1, "K": 1 / 1024, "G": 1024, "T": 1024 * 1024}[unit]
    return int(value * factor + 0.999999)


def _gres(text: str) -> str:
    parts = []
    for entry in text.split(","):
        entry = entry.strip()
        if entry:
            parts.append(entry if entry.startswith("gres:") else "gres:" + entry)
    return ",".join(parts)


def _gpus(text: str) -> str:
    return "gres:gpu:" + text.strip()


def _apply(job: dict[str, Any], opt: str, value: str) -> None:
    field, kind = _OPTIONS[opt]
    try:
        if kind == "str":
            job[field] = value
        elif kind == "int":
            job[field] = int(value)
        elif kind == "time":
            job[field] = parse_time(value)
        elif kind == "mem":
            job[field] = parse_mem(value)
        elif kind == "nodes":
            lo, _, hi = value.partition("-")
            job["min_nodes"] = int(lo)
            if hi:
                job["max_nodes"] = int(hi)
        elif kind == "gres":
            job[field] = _gres(value)
        elif kind == "gpus":
            job[field] = _gpus(value)
    except ValueError as exc:
        if isinstance(exc, SbatchArgsError):
            raise
        raise SbatchArgsError(f"{opt}={value!r}: expected a number") from exc


def _parse_argv(argv: list[str], job: dict[str, Any]) -> list[str]:
    """Apply options; return what is left (the script and its arguments)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--wrap":
            job["batch"] = True
            return []
        if arg in _FLAGS:
            field, flag = _FLAGS[arg]
            job[field] = flag
            i += 1
            continue
        if arg.startswith("--") and "=" in arg:
            opt, value = arg.split("=", 1)
        elif arg in _OPTIONS:
            if i + 1 >= len(argv):
                raise SbatchArgsError(f"option {arg} needs a value")
            opt, value = arg, argv[i + 1]
            i += 1
        elif len(arg) > 2 and arg[:2] in _OPTIONS and not arg.startswith("--"):
            opt, value = arg[:2], arg[2:]
        elif arg.startswith("-"):
            i += 1  # an option estimate does not need (e.g. --mail-type): ignore it
            continue
        else:
            return argv[i:]
        if opt in _OPTIONS:
            _apply(job, opt, value)
        i += 1
    return []


def script_options(script_text: str) -> list[str]:
    """Arguments from the leading #SBATCH lines (sbatch stops at the first command)."""
    args: list[str] = []
    for line in script_text.splitlines()[1:] if script_text.startswith("#!") else (
            script_text.splitlines()):
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not stripped.startswith("#SBATCH")):
            continue
        if not stripped.startswith("#SBATCH"):
            break
        body = stripped[len("#SBATCH"):].split(" #", 1)[0]
        try:
            args += shlex.split(body)
        except ValueError as exc:
            raise SbatchArgsError(f"cannot read #SBATCH line {line.strip()!r}: {exc}") from exc
    return args


def job_from_sbatch(argv: list[str], read_file=None) -> dict[str, Any]:
    """job_desc-style dict from sbatch arguments (and the script they name, if any)."""
    job: dict[str, Any] = {"batch": True}
    rest = _parse_argv(list(argv), {})  # find the script first; CLI options win later
    if rest:
        if read_file is None:
            with open(rest[0], encoding="utf-8") as fh:
                text = fh.read()
        else:
            text = read_file(rest[0])
        _parse_argv(script_options(text), job)
    _parse_argv(list(argv), job)
    return job
