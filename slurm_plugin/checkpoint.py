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

From bash: ``slurmgate ckpt dir | latest [--path|--step] | restarts | save STEP [FILE|-]
[--epoch N] [--step N] | load [--path] | list`` (see ``main``).

Progress: ``save(..., epoch=N, progress_step=N)`` (``ckpt save --epoch N --step N``) also
tells the slurmgate daemon how far training got, for the efficiency figures (cost per epoch
in ``slurmgate job`` and ``slurmgate report``); ``report_progress`` does that alone. The
daemon records it only for a running job of the calling user; a daemon that cannot be reached
costs the save at most ``PROGRESS_TIMEOUT_S`` and a note on stderr, never the checkpoint.

Where: the directory named by ``$SLURMGATE_CKPT_DIR`` (the variable's name can be changed with
``$SLURMGATE_CKPT_ENV``; slurmgate injects ``ROOT/TEAM/USER/JOBNAME`` at submit time into jobs
tagged ``ckpt=yes``, the same directory across requeues; the Prolog creates ``ROOT/TEAM/USER``
owned by the user, mode 0700). Without it: ``$SLURM_SUBMIT_DIR/.ckpt/$SLURM_JOB_ID``. Every
directory on the way is opened without following symlinks and must be the caller's (root may
own those above the caller's own); a symlink, another user's directory or one others may write
is refused (``CheckpointError`` says which and why). ``.active`` in the directory names the job
working there: a second job with the same name that runs at the same time gets
``JOBNAME.JOBID`` beside it (with a warning); a resubmitted job resumes from ``JOBNAME``.

Layout of that directory::

    step-00000042/          one complete checkpoint: the payload file(s) and COMPLETE
    step-00000043/
    latest -> step-00000043 pointer (a symlink; a one-line text file where symlinks fail)
    .active                 the job id that works here (one job per directory)
    .tmp-...                a save in progress, or one that crashed: never read

A save writes into ``.tmp-step-...``, fsyncs every file, writes the ``COMPLETE`` marker, renames
the directory to ``step-NNNNNNNN``, fsyncs the parent, then moves the ``latest`` pointer
(temp + rename) and prunes to the last ``keep`` (default 3) checkpoints. A job killed at any
moment therefore leaves either the previous latest checkpoint or the new one, never a half.
Only one process per job should save (rank 0 in distributed training).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

from policies import defaults
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
    """This job's checkpoint directory (the same across requeues of the job).

    Checked on every call: each directory below the checkpoint root (below
    ``$SLURM_SUBMIT_DIR`` for the fallback) is opened without following symlinks and must be
    yours (root may own the ones above your own); a symlink, another user's directory or one
    that others may write is refused with a ``CheckpointError`` naming it and the reason.
    Missing directories are created, mode 0700. A job claims its directory with an ``.active``
    file; while another running job with the same name holds it, this job works in its own
    ``NAME.JOBID`` beside it (and says so on stderr). A later job of that name, or this job
    after a requeue, takes the directory over and resumes from it.
    """
    name = env_var_name()
    value = os.environ.get(name, "").strip()
    if value:
        path = Path(value).expanduser()
        anchor, parts, strict = _split_injected(path)
    else:
        base = os.environ.get("SLURM_SUBMIT_DIR") or os.getcwd()
        job = os.environ.get("SLURM_JOB_ID") or "local"
        path = Path(base) / ".ckpt" / job
        _note(f"${name} is not set (submit with --comment 'ckpt=yes,...' to get a checkpoint "
              f"directory from slurmgate); using {path}")
        anchor, parts = ((os.path.abspath(base), []) if os.path.isdir(base)
                         else _split_chosen(Path(base)))
        parts, strict = [*parts, ".ckpt", job], False
    exists = _walk(path, anchor, parts, create=create, strict=strict)
    job_id = _job_id()
    if value and exists and job_id != "local":
        return _claim(path, anchor, parts, job_id, strict=strict)
    return path


def _root(directory: str | os.PathLike[str] | None, create: bool) -> Path:
    if directory is None:
        return checkpoint_dir(create=create)
    path = Path(directory)
    anchor, parts = _split_chosen(path)
    _walk(path, anchor, parts, create=create, strict=False)
    return path


# -- who may write there -----------------------------------------------------------------------

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OPEN_BELOW = _OPEN_DIR | os.O_NOFOLLOW
ACTIVE = ".active"
"""Names the job (SLURM_JOB_ID) that works in a checkpoint directory now or did last."""
SQUEUE_TIMEOUT = 5.0


def _user_name() -> str | None:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or os.environ.get("LOGNAME")


def _split_injected(path: Path) -> tuple[str, list[str], bool]:
    """(anchor, parts below it, strict). slurmgate injects ``ROOT/TEAM/USER/JOBNAME``: then
    the anchor is ROOT, and ROOT, TEAM and USER are checked strictly (no world-writable
    directory, even a sticky one). Any other path is checked like a chosen directory."""
    absolute = Path(os.path.abspath(path))
    parts = absolute.parts
    if len(parts) >= 5 and parts[-2] == _user_name():
        return os.path.join(*parts[:-3]), list(parts[-3:]), True
    anchor, below = _split_chosen(absolute)
    return anchor, below, False


def _split_chosen(path: Path) -> tuple[str, list[str]]:
    """A directory the user named: the anchor is its nearest existing ancestor; the directory
    and anything missing on the way to it are checked (or created) below the anchor."""
    absolute = Path(os.path.abspath(path))
    if not absolute.name:
        raise CheckpointError(f"{path} cannot be a checkpoint directory")
    anchor, parts = absolute.parent, [absolute.name]
    while not os.path.lexists(anchor) and anchor != anchor.parent:
        parts.insert(0, anchor.name)
        anchor = anchor.parent
    return str(anchor), parts


def _private_group(gid: int) -> bool:
    """The caller's own user-private group (same name, no other members)."""
    import grp

    me = _user_name()
    try:
        g = grp.getgrgid(gid)
    except KeyError:
        return False
    return g.gr_name == me and all(m == me for m in g.gr_mem)


def _others_may_write(st: os.stat_result) -> bool:
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and not _private_group(st.st_gid)


def _refuse(path: Path, where: str, reason: str, fix: str) -> CheckpointError:
    return CheckpointError(f"refusing checkpoint directory {path}: {where} {reason}; {fix}")


def _check(path: Path, where: str, st: os.stat_result, *, leaf: bool, strict: bool) -> None:
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"cannot use checkpoint directory {path}: {where} is not a "
                              f"directory")
    mode = stat.S_IMODE(st.st_mode)
    if leaf and st.st_uid != me:
        raise _refuse(path, where, f"is owned by uid {st.st_uid}, not you (uid {me})",
                      "a checkpoint directory must be yours (someone else could plant the "
                      "checkpoint you resume from); remove it or ask your admin to")
    if not leaf and st.st_uid not in (0, me):
        raise _refuse(path, where, f"is owned by uid {st.st_uid}, not you (uid {me}) or root",
                      "ask your admin to remove it (slurmgate's Prolog creates "
                      "ROOT/TEAM/USER owned by you)")
    if _others_may_write(st) and (leaf or strict or not mode & stat.S_ISVTX):
        raise _refuse(path, where, f"is writable by others (mode {mode:04o})",
                      "chmod go-w it (the checkpoint root should be 0755)" if not leaf
                      else f"chmod 0700 {where}")


def _walk(path: Path, anchor: str, parts: Sequence[str], *, create: bool,
          strict: bool) -> bool:
    """Open ``anchor`` (symlinks followed: the admin's or your choice), then each of ``parts``
    below it with O_NOFOLLOW, checking each; create missing ones (0700) when ``create``.
    True when the directory exists (and passed), False when it is missing and not created."""
    verb = "create" if create else "open"
    hint = ("; slurmgate's Prolog creates ROOT/TEAM/USER for you (ask your admin whether it "
            "runs)" if strict else "")
    try:
        fd = os.open(anchor, _OPEN_DIR)
    except FileNotFoundError:
        if not create:
            return False
        raise CheckpointError(f"cannot create checkpoint directory {path}: {anchor} does not "
                              f"exist{hint}") from None
    except OSError as e:
        raise CheckpointError(f"cannot {verb} checkpoint directory {path}: {anchor}: "
                              f"{e.strerror or e}") from e
    try:
        _check(path, anchor, os.fstat(fd), leaf=not parts, strict=strict)
        where = anchor
        for i, part in enumerate(parts):
            where = os.path.join(where, part)
            leaf = i == len(parts) - 1
            below, created = _open_below(fd, part, path, where, create=create, verb=verb,
                                         hint=hint if not leaf else "")
            if below is None:
                return False
            os.close(fd)
            fd = below
            if created:
                os.fchmod(fd, 0o700)
            _check(path, where, os.fstat(fd), leaf=leaf, strict=strict)
        return True
    finally:
        os.close(fd)


def _open_below(fd: int, part: str, path: Path, where: str, *, create: bool, verb: str,
                hint: str) -> tuple[int | None, bool]:
    created = False
    for _ in range(2):
        try:
            return os.open(part, _OPEN_BELOW, dir_fd=fd), created
        except FileNotFoundError:
            if not create:
                return None, False
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
                created = True
            except FileExistsError:
                pass
            except OSError as e:
                raise CheckpointError(f"cannot create checkpoint directory {path}: {where}: "
                                      f"{e.strerror or e}{hint}") from e
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                try:
                    is_link = stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode)
                except OSError:
                    is_link = False
                if is_link:
                    raise _refuse(path, where, "is a symlink",
                                  "a checkpoint directory must be a real directory of yours "
                                  "(name the target itself)") from None
                raise CheckpointError(f"cannot {verb} checkpoint directory {path}: {where} is "
                                      f"not a directory") from None
            raise CheckpointError(f"cannot {verb} checkpoint directory {path}: {where}: "
                                  f"{e.strerror or e}") from e
    raise CheckpointError(f"cannot {verb} checkpoint directory {path}: {where} keeps "
                          f"disappearing")


# -- one job per directory -----------------------------------------------------------------------


def _squeue_alive(job_id: str) -> bool:
    """Whether Slurm still knows ``job_id`` as a job that has not ended (running, pending
    again after a requeue, suspended, completing). Any error means no."""
    import subprocess

    from policies.defaults import FINISHED_STATES

    if not job_id.isdigit():
        return False
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=SQUEUE_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    if out.returncode != 0:
        return False
    return any(s not in FINISHED_STATES for s in out.stdout.upper().split())


job_alive: Callable[[str], bool] = _squeue_alive
"""Whether a job id from an ``.active`` file is still alive (replaceable in tests)."""


def _claim(path: Path, anchor: str, parts: Sequence[str], job: str, *, strict: bool) -> Path:
    """The directory this job works in: ``path``, claimed for ``job``, or ``NAME.JOBID`` beside
    it while another live job holds ``path``."""
    sibling = path.with_name(f"{path.name}.{job}")
    sibling_parts = [*parts[:-1], sibling.name]
    if os.path.lexists(sibling):  # decided earlier in this job (or a run before its requeue)
        _walk(sibling, anchor, sibling_parts, create=True, strict=strict)
        return sibling
    for _ in range(5):
        holder = _read_active(path)
        if holder == job:
            return path
        if holder is None:
            if _create_active(path, job):
                return path
            continue
        if holder and job_alive(holder):
            _walk(sibling, anchor, sibling_parts, create=True, strict=strict)
            with contextlib.suppress(OSError):
                _create_active(sibling, job)
            _note(f"warning: job {holder} with the same name is still running in {path}; "
                  f"this job ({job}) uses its own directory {sibling} and does not resume "
                  f"from {path}")
            return sibling
        if _take_over(path, holder, job):
            return path
    raise CheckpointError(f"cannot claim checkpoint directory {path} for job {job}: its "
                          f"{ACTIVE} file keeps changing")


def _read_active(path: Path) -> str | None:
    """The job id in ``path/.active``; None when there is none; "" when it is unreadable."""
    try:
        fd = os.open(path / ACTIVE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return ""  # a symlink or junk: nobody's claim
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)


def _claim_file(path: Path, job: str) -> Path:
    tmp = path / _tmp_name("tmp", "active")
    write_new_file(tmp, f"{job}\n".encode(), mode=0o600)
    return tmp


def _create_active(path: Path, job: str) -> bool:
    """Claim ``path`` if nobody has: a complete file linked into place, never half-written."""
    tmp = _claim_file(path, job)
    try:
        os.link(tmp, path / ACTIVE)
        fsync_path(path, directory=True)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here: create it in place
        try:
            fd = os.open(path / ACTIVE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{job}\n".encode())
        finally:
            os.close(fd)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _take_over(path: Path, stale: str, job: str) -> bool:
    """Replace the claim of ``stale`` (ended) with ours, unless someone changed it first.

    Takers lock the claim file and check that it is still the one at ``.active``, so of two
    jobs that both found the same stale claim only one takes it; the other looks again."""
    active = path / ACTIVE
    try:
        fd = os.open(active, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:  # a symlink or junk in our own directory: replace it
        tmp = _claim_file(path, job)
        try:
            os.replace(tmp, active)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True
    try:
        _lock(fd)
        st, now = os.fstat(fd), os.lstat(active)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            return False
        current = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if current != stale:
            return False
        tmp = _claim_file(path, job)
        try:
            os.replace(tmp, active)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_path(path, directory=True)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, timeout: float = 5.0) -> None:
    """Best effort: a file system without locks (or a lock held too long) goes unlocked."""
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        except OSError:
            return


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
         directory: str | os.PathLike[str] | None = None, keep: int | None = None,
         epoch: int | None = None, progress_step: int | None = None) -> Checkpoint:
    """Save checkpoint ``step-NNNNNNNN`` atomically; ``writer(path)`` writes files into ``path``.

    ``writer`` may return the name of its main file (the payload ``load`` reads); a writer that
    writes exactly one file gets that one. Saving a step that exists replaces it. Afterwards the
    ``latest`` pointer names the new checkpoint and only the last ``keep`` are kept (default
    ``$SLURMGATE_CKPT_KEEP`` or 3; 0 keeps all). ``epoch``/``progress_step``: how far training
    got, kept in the checkpoint's marker and reported to the daemon (``report_progress``)
    once the checkpoint is complete.
    """
    step = as_step(name_or_step)
    epoch = _progress_value("epoch", epoch)
    progress_step = _progress_value("step", progress_step)
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
            meta: dict[str, Any] = {"v": 1, "step": step, "created": time.time(),
                                    "payload": payload, "job_id": _job_id(),
                                    "restart_count": restart_count()}
            if epoch is not None:
                meta["epoch"] = epoch
            if progress_step is not None:
                meta["progress_step"] = progress_step
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
        if epoch is not None or progress_step is not None:
            report_progress(epoch=epoch, step=progress_step)
        return ck
    finally:
        _signals.saving -= 1
        _signals.run_deferred()


# -- progress -----------------------------------------------------------------------------------

PROGRESS_TIMEOUT_S = 2.0
"""Longest a progress report may wait for the daemon (each of connect, send, answer)."""
PROGRESS_MAX = 10 ** 15
SOCKET_ENV = "SLURMGATE_SOCKET"


def _progress_value(what: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= PROGRESS_MAX:
        raise ValueError(f"{what} must be a whole number from 0 to {PROGRESS_MAX}, "
                         f"not {value!r}")
    return value


def daemon_socket() -> str:
    """The daemon's socket: ``$SLURMGATE_SOCKET``, else ``[daemon] socket`` of the policy file
    (``$SLURMGATE_CONFIG`` or the default path) when it is readable, else the default."""
    explicit = os.environ.get(SOCKET_ENV, "").strip()
    if explicit:
        return explicit
    try:
        import tomllib

        with open(defaults.policy_path(), "rb") as fh:
            value = tomllib.load(fh).get("daemon", {}).get("socket")
        if isinstance(value, str) and value:
            return value
    except (OSError, ValueError, AttributeError):
        pass
    return defaults.SOCKET


def report_progress(epoch: int | None = None, step: int | None = None, *,
                    socket_path: str | None = None) -> bool:
    """Tell the slurmgate daemon how far this job's training got (the highest epoch and step
    of this run are kept). Outside a Slurm job, or when the daemon does not answer or refuses
    (says why on stderr), nothing is recorded and False is returned; it never raises for
    that. A value that is not a whole number from 0 to PROGRESS_MAX raises ValueError."""
    epoch = _progress_value("epoch", epoch)
    step = _progress_value("step", step)
    if epoch is None and step is None:
        raise ValueError("report_progress needs an epoch or a step")
    job = _job_id()
    if job == "local":
        _note("not in a Slurm job ($SLURM_JOB_ID unset): progress not reported")
        return False
    from slurm_plugin.protocol import DaemonUnavailable, call

    req: dict[str, Any] = {"op": "progress", "job_id": int(job),
                           "restart_count": restart_count()}
    if epoch is not None:
        req["epoch"] = epoch
    if step is not None:
        req["step"] = step
    try:
        resp = call(socket_path or daemon_socket(), req, timeout=PROGRESS_TIMEOUT_S)
    except (DaemonUnavailable, OSError, ValueError) as e:
        _note(f"progress not reported: {e}")
        return False
    if not resp.get("ok"):
        print(f"slurmgate ckpt: progress not reported: {resp.get('error', 'refused')}",
              file=sys.stderr, flush=True)
        return False
    return True


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
               keep: int | None = None, epoch: int | None = None,
               progress_step: int | None = None) -> Checkpoint:
    def writer(d: Path) -> str:
        write_new_file(d / BYTES_PAYLOAD, bytes(data))
        return BYTES_PAYLOAD

    return save(step, writer, directory=directory, keep=keep, epoch=epoch,
                progress_step=progress_step)


def save_json(step: int | str, obj: Any, *, directory: str | os.PathLike[str] | None = None,
              keep: int | None = None, epoch: int | None = None,
              progress_step: int | None = None) -> Checkpoint:
    data = json.dumps(obj, allow_nan=False).encode() + b"\n"  # fails before touching the disk
    def writer(d: Path) -> str:
        write_new_file(d / JSON_PAYLOAD, data)
        return JSON_PAYLOAD

    return save(step, writer, directory=directory, keep=keep, epoch=epoch,
                progress_step=progress_step)


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
    sp.add_argument("--epoch", type=int, metavar="N",
                    help="training epoch reached (reported to slurmgate for cost per epoch)")
    sp.add_argument("--step", type=int, metavar="N", dest="progress_step",
                    help="training step reached (reported to slurmgate for cost per step)")
    sp = sub.add_parser("load", help="write the latest checkpoint's payload to stdout; "
                                     "exit 1 if none")
    sp.add_argument("--path", action="store_true", help="print the payload file's path instead")
    sub.add_parser("list", help="print 'STEP PATH' per complete checkpoint, oldest first")
    return p


def _cli_save(root: Path, step: int, source: str, keep: int | None,
              epoch: int | None = None, progress_step: int | None = None) -> Checkpoint:
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
        return save(step, writer, directory=root, keep=keep, epoch=epoch,
                    progress_step=progress_step)
    finally:
        restore_signals(previous)


def main(argv: Sequence[str] | None = None) -> int:
    """``slurmgate ckpt``. Exit 0 ok, 1 nothing to resume from, 2 usage or I/O error."""
    args = _build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out = sys.stdout
    try:
        root = Path(args.dir) if args.dir else checkpoint_dir(create=args.op in ("dir", "save"))
        if args.op == "dir":
            if args.dir:
                _root(root, create=True)
            print(root, file=out)
        elif args.op == "restarts":
            print(restart_count(), file=out)
        elif args.op == "list":
            for ck in list_checkpoints(root):
                print(ck.step, ck.path, file=out)
        elif args.op == "save":
            ck = _cli_save(root, as_step(args.step), args.file, args.keep,
                           epoch=args.epoch, progress_step=args.progress_step)
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
