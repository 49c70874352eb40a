"""The spool: records from the hooks (and the node agent) waiting for the daemon.

One JSON object per file, written atomically: a temp file in ``<spool>/tmp/``, fsync, rename
into ``<spool>/`` as ``<kind>.<cluster>.<job_id>.<restart>.<node or ctl>.<record_id>.json``,
fsync of the directory. A reader therefore never sees a partial record; a writer that crashed
before the rename leaves its file in ``tmp/``, where ``recover_tmp`` finds it.

Records are checked by ``policies.records.validate`` (the ingest's check too) on the way in:
``write_record`` refuses a record the daemon could not use, keeps it in ``quarantine/`` with a
``.reason`` file and raises ``RefusedRecord``. The daemon is the only consumer:
``claim_batch`` (oldest first, parsed and checked again), ingest and commit, then ``remove``;
a record it cannot use goes to ``quarantine/`` with a ``.reason`` file. Nothing here deletes
a record that was not committed.

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

from policies.records import RECORD_VERSION, validate
from slurm_plugin.fsutil import atomic_write, fsync_dir

if TYPE_CHECKING:  # pathlib costs the hooks ~8 ms of start-up: imported where it is used
    from pathlib import Path

MAX_RECORD_BYTES = 16 * 2**20
"""A bigger file is not a record we wrote: it is quarantined unread."""


class RefusedRecord(ValueError):
    """``write_record`` was handed a record the daemon could not ingest; it was kept in
    ``quarantine/`` (with its reason) instead of the spool."""


class SpoolItem(NamedTuple):
    path: Path
    record: dict[str, Any] | None
    """The parsed record; None when it could not be read or parsed."""
    error: str | None
    """Why the record is unusable (quarantine it); None for a good record."""


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
    return _encode(_finite(record))


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(
        record, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii") + b"\n"


def write_record(spool_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write one record atomically and return its path in the spool.

    Fills ``v`` (always 1), ``record_id`` and ``written_at`` unless the caller set them (a
    retry may keep its record_id so the daemon's ingest stays idempotent). A record that does
    not validate is kept in ``quarantine/`` instead and ``RefusedRecord`` says why.
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
    clean = _finite(rec)
    data = _encode(clean)
    problem = validate(clean)  # as the daemon will read it: NaN is null by now
    ensure_dir(spool)
    tmp_dir = os.path.join(spool, "tmp")
    ensure_dir(tmp_dir, like=spool)
    if problem is not None:
        _refuse(spool, tmp_dir, name, data, problem)
    final = os.path.join(spool, name)
    atomic_write(os.path.join(tmp_dir, name + ".tmp"), final, data)
    return final


def _refuse(spool: str, tmp_dir: str, name: str, data: bytes, problem: str) -> None:
    """Keep a record the daemon could not use where an admin finds it, then raise."""
    qdir = os.path.join(spool, "quarantine")
    ensure_dir(qdir, like=spool)
    final = os.path.join(qdir, name)
    atomic_write(os.path.join(tmp_dir, name + ".tmp"), final, data)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    reason = f"{stamp} refused by write_record: {problem}\n".encode()
    atomic_write(os.path.join(tmp_dir, name + ".reason.tmp"), final + ".reason", reason)
    raise RefusedRecord(f"{problem} (record kept as {final})")


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
    """``slurm_plugin.protocol.nudge`` by its old name (``slurmgate reconcile`` and the
    cluster tests call it so): tell the daemon the spool has new records. Never raises; True
    if it answered ok."""
    from slurm_plugin.protocol import nudge

    return nudge(socket_path, timeout)
