"""The spool: records from the hooks (and the node agent) waiting for the daemon.

One JSON object per file, written atomically: a temp file in ``<spool>/tmp/``, fsync, rename
into ``<spool>/`` as ``<kind>.<cluster>.<job_id>.<restart>.<node or ctl>.<record_id>.json``,
fsync of the directory. A reader therefore never sees a partial record; a writer that crashed
before the rename leaves its file in ``tmp/``, where ``recover_tmp`` finds it.

The daemon is the only consumer: ``claim_batch`` (oldest first, parsed and checked), ingest and
commit, then ``remove``; a record it cannot use goes to ``quarantine/`` with a ``.reason`` file.
Nothing here deletes a record that was not committed.

``baseline/`` holds the prolog's per-run snapshots (not records; see slurm_plugin.node.hooks).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from slurm_plugin.fsutil import atomic_write, fsync_dir

if TYPE_CHECKING:  # pathlib costs the hooks ~8 ms of start-up: imported where it is used
    from pathlib import Path

RECORD_VERSION = 1
KINDS = ("node_run", "jobcomp", "gpu_sample")
MAX_RECORD_BYTES = 16 * 2**20
"""A bigger file is not a record we wrote: it is quarantined unread."""

# Field types per kind: int, num (int or float), str, list; a trailing ? allows null.
_COMMON = {"v": "int", "kind": "str", "record_id": "str", "cluster": "str", "written_at": "num"}
_SCHEMA: dict[str, dict[str, str]] = {
    "node_run": {
        "job_id": "int", "restart_count": "int", "node": "str", "user": "str?",
        "account": "str?", "start_ts": "num?", "end_ts": "num", "gpus": "list",
    },
    "jobcomp": {
        "job_id": "int", "restart_count": "int?", "state": "str", "submit_ts": "num?",
        "start_ts": "num?", "end_ts": "num?", "nodes": "str", "node_count": "int",
        "partition": "str?", "uid": "int?", "user": "str?", "account": "str?",
        "exit_code": "str?", "derived_ec": "str?", "time_limit_min": "int?",
        "array_job_id": "int?", "array_task_id": "int?", "work_dir": "str?",
    },
    "gpu_sample": {"node": "str", "ts": "num", "gpus": "list"},
}
_GPU_SCHEMA: dict[str, dict[str, str]] = {
    "node_run": {
        "index": "int", "minor": "int?", "uuid": "str", "gpu_type": "str", "energy_j": "num?",
        "util_mean": "num?", "util_max": "num?", "mem_max_bytes": "int?",
        "gpu_seconds": "num?",
    },
    "gpu_sample": {
        "uuid": "str", "index": "int", "gpu_type": "str", "util": "num",
        "mem_used_bytes": "int", "power_w": "num?",
    },
}


class SpoolItem(NamedTuple):
    path: Path
    record: dict[str, Any] | None
    """The parsed record; None when it could not be read or parsed."""
    error: str | None
    """Why the record is unusable (quarantine it); None for a good record."""


def _is_type(value: Any, spec: str) -> bool:
    if spec.endswith("?"):
        if value is None:
            return True
        spec = spec[:-1]
    if isinstance(value, bool):
        return False
    if spec == "int":
        return isinstance(value, int)
    if spec == "num":
        return isinstance(value, (int, float)) and math.isfinite(value)
    if spec == "str":
        return isinstance(value, str)
    if spec == "list":
        return isinstance(value, list)
    raise ValueError(f"unknown type spec {spec!r}")


def _check_fields(obj: dict[str, Any], schema: dict[str, str], where: str) -> str | None:
    for key, spec in schema.items():
        if key not in obj:
            return f"{where}missing key '{key}'"
        if not _is_type(obj[key], spec):
            return f"{where}'{key}' must be {spec.replace('?', ' or null')}, not {obj[key]!r:.60}"
    return None


def validate(record: Any) -> str | None:
    """None for a usable record, else one sentence saying what is wrong."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("v") != RECORD_VERSION or isinstance(record.get("v"), bool):
        return f"unsupported record version {record.get('v')!r:.30} (expected {RECORD_VERSION})"
    kind = record.get("kind")
    if kind not in _SCHEMA:
        return f"unknown kind {kind!r:.40} (known: {', '.join(KINDS)})"
    problem = _check_fields(record, _COMMON, "") or _check_fields(record, _SCHEMA[kind], "")
    if problem:
        return problem
    gpu_schema = _GPU_SCHEMA.get(kind)
    if gpu_schema:
        for i, gpu in enumerate(record["gpus"]):
            if not isinstance(gpu, dict):
                return f"gpus[{i}] is not an object"
            problem = _check_fields(gpu, gpu_schema, f"gpus[{i}]: ")
            if problem:
                return problem
    flags = record.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        return "'flags' must be a list of strings"
    return None


def name_part(value: Any, missing: str = "-") -> str:
    if value is None or value == "":
        return missing
    text = str(value)
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in text)


def record_filename(record: dict[str, Any]) -> str:
    """``<kind>.<cluster>.<job_id>.<restart>.<node or ctl>.<record_id>.json``; characters
    other than letters, digits, _ and - become _, absent parts are -."""
    node = record.get("node") if record.get("kind") != "jobcomp" else "ctl"
    parts = (
        record.get("kind"), record.get("cluster"), record.get("job_id"),
        record.get("restart_count"), node, record.get("record_id"),
    )
    return ".".join(name_part(p) for p in parts) + ".json"


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def ensure_dir(path: str, like: str | None = None) -> None:
    """mkdir -p; a new sub-folder takes the permission bits of ``like`` (the spool dir), so a
    sticky world-writable spool stays writable for prolog (root) and jobcomp (SlurmUser)."""
    if os.path.isdir(path):
        return
    os.makedirs(path, exist_ok=True)
    if like is not None:
        with contextlib.suppress(OSError):
            os.chmod(path, os.stat(like).st_mode & 0o7777)


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(
        _finite(record), separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii") + b"\n"


def write_record(spool_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write one record atomically and return its path in the spool.

    Fills ``v`` (always 1), ``record_id`` and ``written_at`` unless the caller set them (a
    retry may keep its record_id so the daemon's ingest stays idempotent).
    """
    from pathlib import Path

    return Path(write_record_file(spool_dir, record))


def write_record_file(spool_dir: str | os.PathLike[str], record: dict[str, Any]) -> str:
    """``write_record`` returning a str: the hooks' path, which must not import pathlib."""
    spool = os.fspath(spool_dir)
    rec = dict(record)
    rec["v"] = RECORD_VERSION
    if not rec.get("record_id"):
        rec["record_id"] = os.urandom(16).hex()
    rec.setdefault("written_at", time.time())
    name = record_filename(rec)
    data = encode_record(rec)
    ensure_dir(spool)
    tmp_dir = os.path.join(spool, "tmp")
    ensure_dir(tmp_dir, like=spool)
    final = os.path.join(spool, name)
    atomic_write(os.path.join(tmp_dir, name + ".tmp"), final, data)
    return final


def _read_item(path: Path) -> SpoolItem:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:
        return SpoolItem(path, None, f"cannot read: {exc.strerror or exc}")
    if len(data) > MAX_RECORD_BYTES:
        return SpoolItem(path, None, f"larger than {MAX_RECORD_BYTES} bytes")
    try:
        record = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return SpoolItem(path, None, f"not UTF-8 at byte {exc.start}")
    except json.JSONDecodeError as exc:
        return SpoolItem(path, None, f"not JSON: {exc.msg} at line {exc.lineno} col {exc.colno}")
    except RecursionError:
        return SpoolItem(path, None, "not JSON: nested too deeply")
    problem = validate(record)
    if problem:
        return SpoolItem(path, record if isinstance(record, dict) else None, problem)
    return SpoolItem(path, record, None)


def _records_oldest_first(directory: str) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return found
    with entries:
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
            except FileNotFoundError:  # removed while we looked
                continue
    found.sort()
    return found


def claim_batch(spool_dir: str | os.PathLike[str], limit: int = 1000) -> list[SpoolItem]:
    """Up to ``limit`` records, oldest first (by file time), each parsed and checked.

    Items with ``error`` set belong in quarantine. Sub-folders are never read.
    """
    from pathlib import Path

    spool = os.fspath(spool_dir)
    names = _records_oldest_first(spool)[: max(limit, 0)]
    items = []
    for _, name in names:
        item = _read_item(Path(spool, name))
        if item.error and item.error.startswith("cannot read") and not item.path.exists():
            continue  # removed between listing and reading
        items.append(item)
    return items


def remove(items: Iterable[SpoolItem]) -> int:
    """Delete records the daemon has committed. Returns how many were removed."""
    removed = 0
    for item in items:
        try:
            os.unlink(item.path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def quarantine(spool_dir: str | os.PathLike[str], item: SpoolItem, reason: str) -> Path | None:
    """Move a record to ``quarantine/`` with ``<name>.reason`` beside it; log the reason."""
    import logging
    from pathlib import Path

    qdir = os.path.join(os.fspath(spool_dir), "quarantine")
    ensure_dir(qdir, like=os.fspath(spool_dir))
    dest = Path(qdir, item.path.name)
    reason_line = reason.replace("\n", " ")
    try:
        os.replace(item.path, dest)
    except FileNotFoundError:
        logging.getLogger("slurmgate.spool").warning(
            "spool record %s vanished before quarantine (%s)", item.path.name, reason_line
        )
        return None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    Path(qdir, item.path.name + ".reason").write_text(f"{stamp} {reason_line}\n", "utf-8")
    fsync_dir(qdir)
    logging.getLogger("slurmgate.spool").warning(
        "quarantined spool record %s: %s", item.path.name, reason_line
    )
    return dest


def recover_tmp(
    spool_dir: str | os.PathLike[str], older_than: float = 600.0, now: float | None = None
) -> tuple[int, int]:
    """Deal with temp files left by writers that died (the daemon calls this at start-up).

    A complete, valid record (the writer died between fsync and rename) is renamed into the
    spool; anything else is quarantined, never deleted. Files younger than ``older_than``
    seconds may still be being written and are left alone. Returns (recovered, quarantined).
    """
    from pathlib import Path

    spool = os.fspath(spool_dir)
    tmp_dir = os.path.join(spool, "tmp")
    now = time.time() if now is None else now
    recovered = quarantined = 0
    try:
        entries = [e for e in os.scandir(tmp_dir) if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return (0, 0)
    for entry in entries:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
        except FileNotFoundError:
            continue
        item = _read_item(Path(entry.path))
        if item.error is None and item.record is not None:
            os.replace(entry.path, os.path.join(spool, record_filename(item.record)))
            recovered += 1
        elif quarantine(spool, item, f"left in tmp/ by a writer that died: {item.error}"):
            quarantined += 1
    if recovered:
        fsync_dir(spool)
    return (recovered, quarantined)


def nudge_daemon(socket_path: str, timeout: float = 0.05) -> bool:
    """Tell the daemon the spool has new records. Never raises; True if it answered ok.

    ``timeout`` bounds the whole exchange (connect, send, one line back).
    """
    import socket

    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            s.sendall(b'{"v":1,"op":"nudge"}\n')
            buf = b""
            while b"\n" not in buf and len(buf) < 65536:
                s.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        resp = json.loads(buf.split(b"\n", 1)[0])
        return isinstance(resp, dict) and resp.get("ok") is True
    except Exception:
        return False
