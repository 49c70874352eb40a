"""Checkpoints for training jobs that Slurm may requeue: save atomically, find the latest.

This module runs inside user jobs, so it uses the standard library only. From Python::

    from slurm_plugin import checkpoint as ckpt

    state = ckpt.load_json(default={"step": 0})   # None/default when nothing to resume from
    ckpt.on_signal()                              # SIGUSR1 (time limit), SIGTERM (preemption)
    for step in range(state["step"] + 1, total + 1):
        ...
        if step % 100 == 0 or ckpt.should_save():
            ckpt.save_json(step, state)
        if ckpt.requested():
            break

From bash: ``slurmgate ckpt dir | latest [--path|--step] | restarts | save STEP [FILE|-] |
load [--path] | list`` (see ``main``).

Where: the directory named by ``$SLURMGATE_CKPT_DIR`` (the variable's name can be changed with
``$SLURMGATE_CKPT_ENV``; slurmgate injects it at submit time into jobs tagged ``ckpt=yes``, the
same directory across requeues). Without it: ``$SLURM_SUBMIT_DIR/.ckpt/$SLURM_JOB_ID``.

Layout of that directory::

    step-00000042/          one complete checkpoint: the payload file(s) and COMPLETE
    step-00000043/
    latest -> step-00000043 pointer (a symlink; a one-line text file where symlinks fail)
    .tmp-...                a save in progress, or one that crashed: never read

A save writes into ``.tmp-step-...``, fsyncs every file, writes the ``COMPLETE`` marker, renames
the directory to ``step-NNNNNNNN``, fsyncs the parent, then moves the ``latest`` pointer
(temp + rename) and prunes to the last ``keep`` (default 3) checkpoints. A job killed at any
moment therefore leaves either the previous latest checkpoint or the new one, never a half.
Only one process per job should save (rank 0 in distributed training).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

from slurm_plugin.fsutil import fsync_path, fsync_tree, write_new_file

DEFAULT_ENV_VAR = "SLURMGATE_CKPT_DIR"
ENV_VAR_OVERRIDE = "SLURMGATE_CKPT_ENV"
"""Names the variable that holds the checkpoint directory (policy.checkpoint.env_var)."""
KEEP_ENV = "SLURMGATE_CKPT_KEEP"
DEFAULT_KEEP = 3
MARKER = "COMPLETE"
POINTER = "latest"
BYTES_PAYLOAD = "data"
JSON_PAYLOAD = "state.json"
STALE_TMP_SECONDS = 24 * 3600
"""Leftover temp entries of other jobs are removed only when older than this."""

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP = re.compile(r"^\.(?:tmp|old)-[A-Za-z0-9-]+\.([A-Za-z0-9_-]+)\.(\d+)\.\d+\.[0-9a-f]+$")
_noted: set[str] = set()


class CheckpointError(Exception):
    """A checkpoint problem the user can fix; the message says what and how."""


class Checkpoint(NamedTuple):
    step: int
    path: Path
    created: float
    """Epoch seconds when the checkpoint was completed."""
    payload: str | None = None
    """Name of the main file inside ``path`` (save_bytes, save_json, ckpt save); None if many."""
    job_id: str | None = None
    restart_count: int | None = None

    @property
    def payload_path(self) -> Path | None:
        return self.path / self.payload if self.payload else None


# -- where ------------------------------------------------------------------------------------


def env_var_name() -> str:
    return os.environ.get(ENV_VAR_OVERRIDE) or DEFAULT_ENV_VAR


def _note(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        print(f"slurmgate ckpt: {message}", file=sys.stderr, flush=True)


def checkpoint_dir(create: bool = True) -> Path:
    """This job's checkpoint directory (the same across requeues of the job)."""
    name = env_var_name()
    value = os.environ.get(name, "").strip()
    if value:
        path = Path(value).expanduser()
    else:
        base = os.environ.get("SLURM_SUBMIT_DIR") or os.getcwd()
        job = os.environ.get("SLURM_JOB_ID") or "local"
        path = Path(base) / ".ckpt" / job
        _note(f"${name} is not set (submit with --comment 'ckpt=yes,...' to get a checkpoint "
              f"directory from slurmgate); using {path}")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint directory {path}: {e.strerror or e}; "
                                  f"set ${name} to a writable directory") from e
    return path


def _root(directory: str | os.PathLike[str] | None, create: bool) -> Path:
    if directory is None:
        return checkpoint_dir(create=create)
    path = Path(directory)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint directory {path}: "
                                  f"{e.strerror or e}") from e
    return path


def restart_count() -> int:
    """How often Slurm requeued this job (0 on the first run)."""
    for var in ("SLURM_RESTART_COUNT", "SLURM_JOB_RESTART_COUNT"):
        raw = os.environ.get(var, "").strip()
        if raw.isdigit():
            return int(raw)
    return 0


def _job_id() -> str:
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    return job if job.isdigit() else "local"


# -- names ------------------------------------------------------------------------------------


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def as_step(name_or_step: int | str) -> int:
    """42, "42" and "step-00000042" all mean step 42."""
    if isinstance(name_or_step, bool):
        raise ValueError(f"checkpoint step must be a non-negative integer, not {name_or_step!r}")
    if isinstance(name_or_step, int):
        step = name_or_step
    else:
        text = str(name_or_step).strip()
        m = _STEP_DIR.match(text)
        if m:
            text = m.group(1)
        if not text.isascii() or not text.isdigit():
            raise ValueError(f"checkpoint step must be a non-negative integer or 'step-NNNNNNNN', "
                             f"not {name_or_step!r}")
        step = int(text)
    if step < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, not {step}")
    return step


def _keep(keep: int | None) -> int:
    if keep is not None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), not {keep}")
        return keep
    raw = os.environ.get(KEEP_ENV, "").strip()
    if raw.isdigit():
        return int(raw)
    if raw:
        _note(f"${KEEP_ENV}={raw!r} is not a non-negative integer; keeping {DEFAULT_KEEP}")
    return DEFAULT_KEEP


# -- durability helpers -------------------------------------------------------------------------


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def _tmp_name(kind: str, what: str) -> str:
    return f".{kind}-{what}.{_job_id()}.{restart_count()}.{os.getpid()}.{secrets.token_hex(6)}"


# -- reading ------------------------------------------------------------------------------------


def _read_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint in ``path``, or None unless it is a complete ``step-N`` directory."""
    m = _STEP_DIR.match(path.name)
    if not m or not path.is_dir():
        return None
    marker = path / MARKER
    try:
        st = marker.stat()
        raw = marker.read_bytes()[:65536]
    except OSError:
        return None  # no marker: not complete
    meta: dict[str, Any] = {}
    if raw.strip():  # an empty marker (``touch COMPLETE``) also marks a checkpoint complete
        try:
            loaded = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            loaded = None
        if isinstance(loaded, dict):
            meta = loaded
    created = meta.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)) \
            or not math.isfinite(created):
        created = st.st_mtime
    payload = meta.get("payload")
    if not isinstance(payload, str) or "/" in payload or payload in ("", ".", "..", MARKER):
        payload = None
    restarts = meta.get("restart_count")
    job = meta.get("job_id")
    return Checkpoint(
        step=int(m.group(1)), path=path, created=float(created), payload=payload,
        job_id=job if isinstance(job, str) else None,
        restart_count=restarts if isinstance(restarts, int) and not isinstance(restarts, bool)
        else None,
    )


def list_checkpoints(directory: str | os.PathLike[str] | None = None) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (by completion time, then step)."""
    root = _root(directory, create=False)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint directory {root}: {e.strerror or e}") from e
    found = [c for n in names if _STEP_DIR.match(n) and (c := _read_checkpoint(root / n))]
    return sorted(found, key=lambda c: (c.created, c.step))


def _pointer_target(root: Path) -> str | None:
    p = root / POINTER
    try:
        if p.is_symlink():
            return os.path.basename(os.readlink(p).rstrip("/"))
        return p.read_text(encoding="ascii", errors="replace").strip() or None
    except OSError:
        return None


def latest(directory: str | os.PathLike[str] | None = None) -> Checkpoint | None:
    """The checkpoint to resume from, or None. Never a half-written one.

    The ``latest`` pointer decides when it names a complete checkpoint; otherwise (pointer
    missing, or a crash between the rename and the pointer update) the newest complete one.
    """
    root = _root(directory, create=False)
    target = _pointer_target(root)
    if target and _STEP_DIR.match(target):
        ck = _read_checkpoint(root / target)
        if ck is not None:
            return ck
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_bytes(directory: str | os.PathLike[str] | None = None) -> bytes | None:
    """The latest checkpoint's payload, or None when there is nothing to resume from."""
    ck = latest(directory)
    if ck is None:
        return None
    if ck.payload_path is None:
        raise CheckpointError(f"checkpoint {ck.path} has no single payload file; "
                              f"read the files in that directory instead")
    return ck.payload_path.read_bytes()


def load_json(default: Any = None, directory: str | os.PathLike[str] | None = None) -> Any:
    """The latest checkpoint's JSON payload (save_json), or ``default`` when there is none."""
    data = load_bytes(directory)
    if data is None:
        return default
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"latest checkpoint in {_root(directory, create=False)} is not "
                              f"JSON ({e}); it was not written by save_json") from e


# -- writing ------------------------------------------------------------------------------------


def save(name_or_step: int | str, writer: Callable[[Path], object], *,
         directory: str | os.PathLike[str] | None = None, keep: int | None = None) -> Checkpoint:
    """Save checkpoint ``step-NNNNNNNN`` atomically; ``writer(path)`` writes files into ``path``.

    ``writer`` may return the name of its main file (the payload ``load`` reads); a writer that
    writes exactly one file gets that one. Saving a step that exists replaces it. Afterwards the
    ``latest`` pointer names the new checkpoint and only the last ``keep`` are kept (default
    ``$SLURMGATE_CKPT_KEEP`` or 3; 0 keeps all).
    """
    step = as_step(name_or_step)
    keep = _keep(keep)
    root = _root(directory, create=True)
    name = step_name(step)
    tmp = root / _tmp_name("tmp", name)
    _signals.saving += 1
    try:
        try:
            tmp.mkdir()
        except OSError as e:
            raise CheckpointError(f"cannot write in checkpoint directory {root}: "
                                  f"{e.strerror or e}") from e
        try:
            returned = writer(tmp)
            if (tmp / MARKER).exists():
                raise CheckpointError(f"'{MARKER}' is reserved for slurmgate's completion marker; "
                                      f"name the file differently")
            payload = _payload_name(tmp, returned)
            fsync_tree(tmp)
            meta = {"v": 1, "step": step, "created": time.time(), "payload": payload,
                    "job_id": _job_id(), "restart_count": restart_count()}
            write_new_file(tmp / MARKER, json.dumps(meta).encode() + b"\n")
            fsync_path(tmp, directory=True)
            final = root / name
            old = _move_into_place(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        if old is not None:
            _remove(old)
        _set_pointer(root, name)
        ck = _read_checkpoint(final)
        assert ck is not None
        _prune(root, keep, protect=name)
        return ck
    finally:
        _signals.saving -= 1
        _signals.run_deferred()


def _move_into_place(tmp: Path, final: Path) -> Path | None:
    """Rename the finished ``tmp`` to ``final``; an existing ``final`` is moved aside first and
    returned for removal (put back if the second rename fails)."""
    old = None
    if os.path.lexists(final):
        old = final.with_name(_tmp_name("old", final.name))
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    fsync_path(final.parent, directory=True)
    return old


def _payload_name(tmp: Path, returned: object) -> str | None:
    if isinstance(returned, (str, os.PathLike)):
        p = Path(returned)
        p = p if p.is_absolute() else tmp / p
        if p.parent.resolve() == tmp.resolve() and p.is_file():
            return p.name
        raise CheckpointError(f"writer returned {returned!r}, which is not a file it wrote "
                              f"directly into {tmp}")
    entries = os.listdir(tmp)
    if len(entries) == 1 and (tmp / entries[0]).is_file():
        return entries[0]
    return None


def save_bytes(step: int | str, data: bytes, *, directory: str | os.PathLike[str] | None = None,
               keep: int | None = None) -> Checkpoint:
    def writer(d: Path) -> str:
        write_new_file(d / BYTES_PAYLOAD, bytes(data))
        return BYTES_PAYLOAD

    return save(step, writer, directory=directory, keep=keep)


def save_json(step: int | str, obj: Any, *, directory: str | os.PathLike[str] | None = None,
              keep: int | None = None) -> Checkpoint:
    data = json.dumps(obj, allow_nan=False).encode() + b"\n"  # fails before touching the disk
    def writer(d: Path) -> str:
        write_new_file(d / JSON_PAYLOAD, data)
        return JSON_PAYLOAD

    return save(step, writer, directory=directory, keep=keep)


def _set_pointer(root: Path, name: str) -> None:
    tmp = root / _tmp_name("tmp", POINTER)
    try:
        os.symlink(name, tmp)
    except OSError:  # file systems without symlinks: a one-line text file
        write_new_file(tmp, name.encode() + b"\n")
    try:
        os.replace(tmp, root / POINTER)
    except OSError:
        _remove(tmp)
        raise
    fsync_path(root, directory=True)


def _prune(root: Path, keep: int, protect: str) -> None:
    """Keep the last ``keep`` complete checkpoints; drop dead temp leftovers."""
    job, restarts, now = _job_id(), restart_count(), time.time()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for n in names:
        m = _TMP.match(n)
        if not m:
            continue
        p = root / n
        try:
            age = now - p.lstat().st_mtime
        except OSError:
            continue
        # Same job, earlier run: that run is over (Slurm requeued it). Otherwise wait a day:
        # a job with the same name may share this directory and be saving right now.
        if (m.group(1) == job != "local" and int(m.group(2)) < restarts) \
                or age > STALE_TMP_SECONDS:
            _remove(p)
    if keep <= 0:
        return
    found = list_checkpoints(root)
    for ck in found[:-keep]:
        if ck.path.name != protect:
            _remove(ck.path)


# -- signals ------------------------------------------------------------------------------------


class _SignalState:
    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self.saving = 0
        self.deferred: list[tuple[Callable[[signal.Signals], object], signal.Signals]] = []

    def run_deferred(self) -> None:
        while self.deferred and not self.saving:
            fn, sig = self.deferred.pop(0)
            fn(sig)


_signals = _SignalState()


def _as_signal(s: int | str | signal.Signals) -> signal.Signals:
    if isinstance(s, str):
        name = s.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        try:
            return signal.Signals[name]
        except KeyError:
            raise ValueError(f"unknown signal {s!r} (use e.g. USR1, TERM)") from None
    return signal.Signals(s)


def on_signal(callback: Callable[[signal.Signals], object] | None = None,
              signals: Iterable[int | str | signal.Signals] = (signal.SIGUSR1, signal.SIGTERM),
              ) -> dict[signal.Signals, Any]:
    """Catch the early warning (``--signal=B:USR1@120``) and preemption's SIGTERM.

    The handler records the signal (``should_save()`` / ``requested()``) and, if given, calls
    ``callback(signal)``; a callback that arrives during a save runs right after it. Checking
    ``should_save()`` in the training loop is safer than saving from the callback, which may
    interrupt a half-updated model. Call from the main thread. Returns the previous handlers
    (for ``restore_signals``).
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        _signals.requested = sig
        if callback is None:
            return
        if _signals.saving:
            _signals.deferred.append((callback, sig))
        else:
            callback(sig)

    previous: dict[signal.Signals, Any] = {}
    for s in signals:
        sig = _as_signal(s)
        previous[sig] = signal.signal(sig, handler)
    return previous


def restore_signals(previous: dict[signal.Signals, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def requested() -> signal.Signals | None:
    """The signal that asked this job to save and stop, or None."""
    return _signals.requested


def should_save() -> bool:
    return _signals.requested is not None


def clear_request() -> None:
    _signals.requested = None


# -- command line: `slurmgate ckpt ...` ---------------------------------------------------------


def _build_parser():  # -> argparse.ArgumentParser (argparse is imported only for the CLI)
    import argparse

    p = argparse.ArgumentParser(
        prog="slurmgate ckpt",
        description="Checkpoints of this job: one value per line on stdout, notes on stderr.",
    )
    p.add_argument("--dir", help=f"checkpoint directory (default ${env_var_name()}, else "
                                 f"$SLURM_SUBMIT_DIR/.ckpt/$SLURM_JOB_ID)")
    sub = p.add_subparsers(dest="op", required=True, metavar="OP")
    sub.add_parser("dir", help="print the checkpoint directory (creating it)")
    sp = sub.add_parser("latest", help="print the latest complete checkpoint; exit 1 if none")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--path", action="store_true", help="print only its directory")
    g.add_argument("--step", action="store_true", help="print only its step")
    sub.add_parser("restarts", help="print how often Slurm requeued this job")
    sp = sub.add_parser("save", help="save FILE (or stdin: '-' or nothing) as checkpoint STEP")
    sp.add_argument("step", help="step number")
    sp.add_argument("file", nargs="?", default="-", help="file or directory to save; - = stdin")
    sp.add_argument("--keep", type=int, help=f"keep the last K (default ${KEEP_ENV} or "
                                             f"{DEFAULT_KEEP}; 0 keeps all)")
    sp = sub.add_parser("load", help="write the latest checkpoint's payload to stdout; "
                                     "exit 1 if none")
    sp.add_argument("--path", action="store_true", help="print the payload file's path instead")
    sub.add_parser("list", help="print 'STEP PATH' per complete checkpoint, oldest first")
    return p


def _cli_save(root: Path, step: int, source: str, keep: int | None) -> Checkpoint:
    def writer(d: Path) -> str | None:
        if source == "-":
            with open(d / BYTES_PAYLOAD, "xb") as out:
                shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
            return BYTES_PAYLOAD
        src = Path(source)
        if src.is_dir():
            shutil.copytree(src, d, dirs_exist_ok=True, symlinks=True)
            return None
        name = src.name if src.name != MARKER else BYTES_PAYLOAD
        shutil.copyfile(src, d / name)
        return name

    if source != "-" and not os.path.exists(source):
        raise CheckpointError(f"{source}: no such file or directory")
    # The save must finish even when the job's warning signal or preemption's SIGTERM reaches
    # this process too; the caller's trap handles the signal once we are done.
    previous = {}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        with contextlib.suppress(OSError, ValueError):  # not the main thread: nothing to do
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        return save(step, writer, directory=root, keep=keep)
    finally:
        restore_signals(previous)


def main(argv: Sequence[str] | None = None) -> int:
    """``slurmgate ckpt``. Exit 0 ok, 1 nothing to resume from, 2 usage or I/O error."""
    args = _build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out = sys.stdout
    try:
        root = Path(args.dir) if args.dir else checkpoint_dir(create=args.op in ("dir", "save"))
        if args.op == "dir":
            root.mkdir(parents=True, exist_ok=True)
            print(root, file=out)
        elif args.op == "restarts":
            print(restart_count(), file=out)
        elif args.op == "list":
            for ck in list_checkpoints(root):
                print(ck.step, ck.path, file=out)
        elif args.op == "save":
            ck = _cli_save(root, as_step(args.step), args.file, args.keep)
            print(ck.path, file=out)
        elif args.op in ("latest", "load"):
            ck = latest(root)
            if ck is None:
                print(f"slurmgate ckpt: no complete checkpoint in {root}: nothing to resume "
                      f"from", file=sys.stderr)
                return 1
            if args.op == "latest":
                if args.step:
                    print(ck.step, file=out)
                elif args.path:
                    print(ck.path, file=out)
                else:
                    import shlex

                    print(f"step={ck.step}\npath={shlex.quote(str(ck.path))}\n"
                          f"created={ck.created:.3f}", file=out)
            elif ck.payload_path is None:
                raise CheckpointError(f"checkpoint {ck.path} has no single payload file; "
                                      f"use 'slurmgate ckpt latest --path' and read its files")
            elif args.path:
                print(ck.payload_path, file=out)
            else:
                out.flush()
                with open(ck.payload_path, "rb") as f:
                    shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
                sys.stdout.buffer.flush()
    except (CheckpointError, ValueError) as e:
        print(f"slurmgate ckpt: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"slurmgate ckpt: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
