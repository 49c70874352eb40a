"""The spool: records from the hooks (and the node agent) waiting for the daemon.

Layout (INSTALL "Spool layout and permissions"; users may traverse the spool, never create):

    <spool>/              root:<slurm group> 0775
    <spool>/node/         root:<slurm group> 0770   node_run, gpu_sample (root on the nodes, or
    <spool>/node/tmp/                               daemon.spool_squash_uid under root_squash)
    <spool>/ctld/         <slurm>:<slurm group> 0770  jobcomp (the SlurmUser: jobcomp/script,
    <spool>/ctld/tmp/                                 and the daemon's reconcile --repair)
    <spool>/quarantine/   <daemon user>:<slurm group> 0750

One JSON object per file, written atomically: a temp file in ``<subdir>/tmp/`` created
``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to a checked directory fd, fsync, rename into
``<subdir>/`` as ``<kind>.<cluster>.<job_id>.<restart>.<node or ctl>.<record_id>.json``, fsync
of the directory. Every directory is opened ``O_DIRECTORY|O_NOFOLLOW`` and its owner and mode
checked against the layout before anything is created in it (``LayoutError`` otherwise).

Records are checked by ``policies.records.validate`` (the ingest's check too) on the way in:
``write_record`` refuses a record the daemon could not use, keeps it in ``quarantine/`` (or,
where the writer may not write there, the node-local ``<state_dir>/quarantine/``) with a
``.reason`` file and raises ``RefusedRecord``. ``deliver`` is the hooks' writer: when the shared
spool cannot be written for any reason the record goes to the node-local, root-only
``<state_dir>/fallback/``, and ``forward_fallback`` moves such records on later.

The daemon is the only consumer: ``claim_batch`` lists ``node/`` and ``ctld/`` only and opens
each entry ``O_RDONLY|O_NOFOLLOW|O_NONBLOCK`` relative to the directory fd; the descriptor must
be a regular file of an allowed writer for that subdirectory, at most
``policies.records.MAX_RECORD_BYTES``, of a kind that belongs there. Anything else, and any
exception while reading one file, makes an item with ``error`` set (its body is not kept),
which the daemon ``quarantine``s. Nothing here deletes a record that was not committed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from policies.records import MAX_RECORD_BYTES, RECORD_VERSION, validate
from slurm_plugin.fsutil import write_new_file

if TYPE_CHECKING:  # pathlib costs the hooks ~8 ms of start-up: imported where it is used
    from pathlib import Path

MAX_BATCH_BYTES = 8 * 2**20
"""``claim_batch`` reads at most about this many bytes of records per batch."""

NODE, CTLD, QUARANTINE, TMP = "node", "ctld", "quarantine", "tmp"
SUBDIRS = (NODE, CTLD)
KINDS_IN = {NODE: ("node_run", "gpu_sample"), CTLD: ("jobcomp",)}
"""Which record kinds each writer subdirectory may hold."""
TMP_GRACE_S = 60.0
"""A file in ``<subdir>/tmp/`` this old belongs to a writer that died (``recover_tmp``)."""

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MODES = {"": 0o775, NODE: 0o770, CTLD: 0o770, QUARANTINE: 0o750}
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))


class RefusedRecord(ValueError):
    """``write_record`` was handed a record the daemon could not ingest; it was kept in
    quarantine (with its reason) instead of the spool."""


class LayoutError(OSError):
    """A spool directory is a symlink, not a directory, or has the wrong owner or mode."""


class Trust(NamedTuple):
    """Who may write where: the SlurmUser (policy daemon.slurm_user) and, on a root_squash
    NFS spool, the uid root on the nodes becomes (daemon.spool_squash_uid)."""

    slurm_uid: int | None
    slurm_gid: int | None
    squash_uid: int | None = None

    def writers(self, sub: str) -> frozenset[int]:
        """Owners a record file in ``sub`` may have."""
        if sub == NODE:
            return frozenset({0} | ({self.squash_uid} if self.squash_uid is not None else set()))
        if sub == CTLD:
            return frozenset({0} | ({self.slurm_uid} if self.slurm_uid is not None else set()))
        # the old single-directory layout (migration): root or the SlurmUser
        return self.writers(CTLD)

    def dir_owners(self, path: str) -> frozenset[int]:
        top = path.split("/", 1)[0]
        if top == NODE:
            return self.writers(NODE)
        if top == QUARANTINE:
            return frozenset({0, os.geteuid()} | (
                {self.slurm_uid} if self.slurm_uid is not None else set()))
        return self.writers(CTLD)  # the spool itself and ctld/

    def new_dir_owner(self, path: str) -> tuple[int, int]:
        """(uid, gid) a directory created by this process gets; -1 leaves it as it is."""
        euid = os.geteuid()
        uid = euid
        if path.split("/", 1)[0] == CTLD and euid == 0 and self.slurm_uid is not None:
            uid = self.slurm_uid
        return uid, self.slurm_gid if self.slurm_gid is not None else -1


def trust_for(slurm_user: str = "slurm", squash_uid: int | None = None) -> Trust:
    """The ``Trust`` for a SlurmUser name (or uid as text); an unknown user trusts root only."""
    import pwd

    try:
        pw = pwd.getpwuid(int(slurm_user)) if slurm_user.isdigit() else pwd.getpwnam(slurm_user)
    except (KeyError, ValueError):
        return Trust(None, None, squash_uid)
    return Trust(pw.pw_uid, pw.pw_gid, squash_uid)


class SpoolItem(NamedTuple):
    path: Path
    record: dict[str, Any] | None
    """The parsed record; None when it could not be read, parsed or used."""
    error: str | None
    """Why the record is unusable (quarantine it); None for a good record."""
    where: str = ""
    """The directory it was read from, relative to the spool: node, ctld, node/tmp, ''."""
    owner: int | None = None
    """The file's owner (fstat of the open descriptor)."""
    writer: str | None = None
    """Who wrote it, as the ingest records it: 'ctld', 'repair' or 'node:<name>'."""


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


def subdir_for(kind: Any) -> str:
    """The writer subdirectory a record kind goes to."""
    return CTLD if kind == "jobcomp" else NODE


def writer_of(sub: str, record: dict[str, Any]) -> str:
    if record.get("kind") == "jobcomp":
        return "repair" if record.get("source") == "reconcile" else "ctld"
    return f"node:{record.get('node')}"


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode_record(record: dict[str, Any]) -> bytes:
    return _encode(_finite(record))


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(
        record, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii") + b"\n"


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- directories -------------------------------------------------------------------------------


def check_dir_fd(fd: int, what: str, owners: Iterable[int], mode: int,
                 gid: int | None = None) -> None:
    """Raise LayoutError unless the open directory ``fd`` has an allowed owner and no
    permission bits beyond ``mode`` (setgid/sticky allowed); group write needs group ``gid``."""
    st = os.fstat(fd)
    allowed = set(owners)
    if not stat.S_ISDIR(st.st_mode):
        raise LayoutError(errno.ENOTDIR, f"{what} is not a directory")
    if st.st_uid not in allowed:
        raise LayoutError(errno.EPERM, f"{what} is owned by uid {st.st_uid}, not by "
                          f"{' or '.join(f'uid {u}' for u in sorted(allowed))}")
    bits = stat.S_IMODE(st.st_mode)
    if bits & 0o777 & ~mode:
        raise LayoutError(errno.EPERM, f"{what} has mode {bits:04o}, more open than {mode:04o}")
    if bits & 0o020 and gid is not None and gid >= 0 and st.st_gid != gid:
        raise LayoutError(errno.EPERM, f"{what} is group-writable for gid {st.st_gid}, "
                          f"not the SlurmUser's group {gid}")


def _open_child(parent: int, name: str, what: str) -> int:
    try:
        return os.open(name, _DIR, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LayoutError(exc.errno, f"{what} is a symbolic link or not a directory") \
                from exc
        raise


def open_root(spool_dir: str | os.PathLike[str], trust: Trust) -> int:
    """The spool directory, opened and checked (root or the SlurmUser, at most 0775)."""
    spool = os.fspath(spool_dir)
    try:
        fd = os.open(spool, _DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LayoutError(exc.errno, f"{spool} is a symbolic link or not a directory") \
                from exc
        raise
    try:
        check_dir_fd(fd, spool, trust.dir_owners(""), _MODES[""], trust.slurm_gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_subdir(spool_dir: str | os.PathLike[str], sub: str, trust: Trust, *,
                create: bool = False, root_fd: int | None = None) -> int:
    """``<spool>/<sub>`` (``sub`` like ``node/tmp``) opened component by component with
    O_NOFOLLOW and checked against the layout; with ``create`` a missing component is made
    with the layout's owner and mode (the caller must be allowed to own it). The caller
    closes the returned fd."""
    spool = os.fspath(spool_dir)
    fd = open_root(spool, trust) if root_fd is None else os.dup(root_fd)
    parts = sub.split("/")
    mode = _MODES[parts[0]]
    try:
        for i, name in enumerate(parts):
            rel = "/".join(parts[: i + 1])
            what = os.path.join(spool, rel)
            try:
                child = _open_child(fd, name, what)
            except FileNotFoundError:
                if not create:
                    raise
                child = _make_dir(fd, name, what, rel, mode, trust)
            os.close(fd)
            fd = child
            check_dir_fd(fd, what, trust.dir_owners(rel), mode, trust.slurm_gid)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _make_dir(parent: int, name: str, what: str, rel: str, mode: int, trust: Trust) -> int:
    with contextlib.suppress(FileExistsError):  # another writer made it first: check theirs
        os.mkdir(name, 0o700, dir_fd=parent)
    fd = _open_child(parent, name, what)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700:
            uid, gid = trust.new_dir_owner(rel)
            if os.geteuid() != 0:
                uid = -1
            with contextlib.suppress(OSError):
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_dir(path: str) -> int:
    """A node-local directory only this uid may use (state_dir and below), created 0700;
    refused when it is a symlink, someone else's or open to others."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, _DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LayoutError(exc.errno, f"{path} is a symbolic link or not a directory") \
                from exc
        raise
    try:
        check_dir_fd(fd, path, (os.geteuid(),), 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def state_path(state_dir: str) -> str:
    """Root's node state directory; another writer (the SlurmUser's jobcomp hook) keeps its
    own beside it, ``<state_dir>.<uid>``, since the root-only one is closed to it."""
    return state_dir if os.geteuid() == 0 else f"{state_dir.rstrip('/')}.{os.geteuid()}"


def open_state_subdir(state_dir: str, name: str) -> int:
    """``<state_dir>/<name>`` (baseline, fallback, quarantine), both checked private."""
    top = state_path(state_dir)
    os.close(_private_dir(top))
    return _private_dir(os.path.join(top, name))


# -- writing -----------------------------------------------------------------------------------


def _write_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    write_new_file(name, data, mode, dir_fd=dir_fd)


def _fsync_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(fd)


def atomic_write_at(tmp_fd: int, final_fd: int, name: str, data: bytes,
                    mode: int = 0o644) -> None:
    """Create a temp file in ``tmp_fd`` (O_EXCL|O_NOFOLLOW), fsync, rename it to ``name`` in
    ``final_fd``, fsync that directory. A failed rename leaves the complete temp file behind
    on purpose (``recover_tmp``)."""
    tmp = f"{name}.tmp"
    try:
        _write_at(tmp_fd, tmp, data, mode)
    except FileExistsError:
        tmp = f"{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        _write_at(tmp_fd, tmp, data, mode)
    os.rename(tmp, name, src_dir_fd=tmp_fd, dst_dir_fd=final_fd)
    _fsync_fd(final_fd)


def prepare_record(record: dict[str, Any]) -> dict[str, Any]:
    """``v``, ``record_id`` and ``written_at`` filled (kept when the caller set them: a retry
    keeps its record_id so the daemon's ingest stays idempotent); NaN becomes null."""
    rec = dict(record)
    rec["v"] = RECORD_VERSION
    if not rec.get("record_id"):
        rec["record_id"] = os.urandom(16).hex()
    rec.setdefault("written_at", time.time())
    clean: dict[str, Any] = _finite(rec)
    return clean


def write_record(spool_dir: str | os.PathLike[str], record: dict[str, Any], *,
                 trust: Trust | None = None, state_dir: str | None = None) -> Path:
    """Write one record atomically into its writer subdirectory and return its path.

    A record that does not validate is kept in quarantine instead and ``RefusedRecord`` says
    why. Any other failure to write raises (``deliver`` falls back instead).
    """
    from pathlib import Path

    return Path(write_record_file(spool_dir, record, trust=trust, state_dir=state_dir))


def write_record_file(spool_dir: str | os.PathLike[str], record: dict[str, Any], *,
                      trust: Trust | None = None, state_dir: str | None = None) -> str:
    """``write_record`` returning a str: the hooks' path, which must not import pathlib."""
    spool = os.fspath(spool_dir)
    trust = trust_for() if trust is None else trust
    clean = prepare_record(record)
    name = record_filename(clean)
    data = _encode(clean)
    problem = validate(clean)  # as the daemon will read it: NaN is null by now
    if problem is not None:
        _refuse(spool, trust, state_dir, name, data, problem)
    sub = subdir_for(clean.get("kind"))
    sub_fd = open_subdir(spool, sub, trust, create=True)
    try:
        tmp_fd = open_subdir(spool, f"{sub}/{TMP}", trust, create=True)
        try:
            atomic_write_at(tmp_fd, sub_fd, name, data)
        finally:
            os.close(tmp_fd)
    finally:
        os.close(sub_fd)
    return os.path.join(spool, sub, name)


def _refuse(spool: str, trust: Trust, state_dir: str | None, name: str, data: bytes,
            problem: str) -> None:
    """Keep a record the daemon could not use where an admin finds it, then raise: the
    spool's quarantine/ when this writer may write there, else <state_dir>/quarantine/."""
    reason = f"refused by write_record: {problem}"
    places: list[tuple[str, Any]] = [
        (os.path.join(spool, QUARANTINE), lambda: open_subdir(spool, QUARANTINE, trust))]
    if state_dir:
        places.append((os.path.join(state_path(state_dir), QUARANTINE),
                       lambda: open_state_subdir(state_dir, QUARANTINE)))
    for where, opener in places:
        try:
            qfd = opener()
        except OSError:
            continue
        try:
            kept = _keep_in_quarantine(qfd, name, data, reason)
        except OSError:
            continue
        finally:
            os.close(qfd)
        raise RefusedRecord(f"{problem} (record kept as {os.path.join(where, kept)})")
    raise RefusedRecord(f"{problem} (record not kept: no quarantine this writer may use)")


def _reserve_reason(qfd: int, base: str) -> tuple[str, int]:
    """A free quarantine name and its ``.reason`` file, created O_EXCL|O_NOFOLLOW (a name
    taken, or a planted link, makes another name; nothing is followed or overwritten)."""
    for attempt in range(8):
        dest = base if attempt == 0 else f"{base}.{os.urandom(4).hex()}"
        try:
            rfd = os.open(dest + ".reason", _CREATE, 0o640, dir_fd=qfd)
        except FileExistsError:
            continue
        try:
            os.stat(dest, dir_fd=qfd, follow_symlinks=False)
        except FileNotFoundError:
            return dest, rfd
        os.close(rfd)
        os.unlink(dest + ".reason", dir_fd=qfd)
    raise FileExistsError(errno.EEXIST, f"no free quarantine name for {base}")


def _reason_bytes(reason: str) -> bytes:
    line = reason.replace("\n", " ").replace("\r", " ")[:4000]
    return f"{_stamp()} {line}\n".encode("utf-8", "backslashreplace")


def _keep_in_quarantine(qfd: int, name: str, data: bytes, reason: str) -> str:
    dest, rfd = _reserve_reason(qfd, name)
    try:
        _write_at(qfd, dest, data, 0o640)
        os.write(rfd, _reason_bytes(reason))
    finally:
        os.close(rfd)
    _fsync_fd(qfd)
    return dest


# -- the hooks' writer: shared spool, else the node-local fallback ---------------------------


class Delivery(NamedTuple):
    path: str
    fallback_reason: str | None
    """None: in the shared spool; else why the record went to the fallback spool."""


def deliver(spool_dir: str, record: dict[str, Any], *, trust: Trust, state_dir: str) -> Delivery:
    """Write a record to the shared spool; when that fails for any reason (read-only, full,
    missing, wrong owner...) keep it in ``<state_dir>/fallback/`` (root-only) for
    ``forward_fallback``. ``RefusedRecord`` (the record itself is bad) still raises."""
    rec = prepare_record(record)
    try:
        return Delivery(write_record_file(spool_dir, rec, trust=trust, state_dir=state_dir),
                        None)
    except RefusedRecord:
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
    fd = open_state_subdir(state_dir, "fallback")
    try:
        name = record_filename(rec)
        _write_at(fd, f".{name}.tmp", _encode(rec), 0o600)
        os.rename(f".{name}.tmp", name, src_dir_fd=fd, dst_dir_fd=fd)
        _fsync_fd(fd)
    finally:
        os.close(fd)
    return Delivery(os.path.join(state_path(state_dir), "fallback", name), why)


def fallback_records(state_dir: str) -> list[str]:
    """Names of records waiting in the fallback spool, oldest first (never creates it)."""
    path = os.path.join(state_path(state_dir), "fallback")
    try:
        fd = os.open(path, _DIR)
    except OSError:
        return []
    try:
        return [n for _, n in _listing(fd)]
    finally:
        os.close(fd)


def forward_fallback(spool_dir: str, *, trust: Trust, state_dir: str,
                     limit: int = 200) -> tuple[int, str | None]:
    """Move fallback records (oldest first) to the shared spool; each is removed only after
    it is safely there. Stops at the first failure. Returns (forwarded, error or None)."""
    path = os.path.join(state_path(state_dir), "fallback")
    try:
        fd = os.open(path, _DIR)
    except FileNotFoundError:
        return 0, None
    except OSError as exc:
        return 0, f"cannot open {path}: {exc}"
    forwarded = 0
    try:
        check_dir_fd(fd, path, (os.geteuid(),), 0o700)
        for _, name in _listing(fd)[:limit]:
            record, error, _owner = _read_at(fd, name, frozenset({os.geteuid()}))
            if record is None:
                return forwarded, f"fallback record {name} unreadable: {error}"
            try:
                write_record_file(spool_dir, record, trust=trust, state_dir=state_dir)
            except RefusedRecord as exc:  # kept in quarantine by write_record
                return forwarded, f"fallback record {name}: {exc}"
            except Exception as exc:
                return forwarded, f"{type(exc).__name__}: {exc}"
            os.unlink(name, dir_fd=fd)
            forwarded += 1
        _fsync_fd(fd)
    except LayoutError as exc:
        return forwarded, str(exc)
    finally:
        os.close(fd)
    return forwarded, None


# -- reading -----------------------------------------------------------------------------------


def _listing(dir_fd: int) -> list[tuple[int, str]]:
    """(mtime_ns, name) of the record names in a directory, oldest first."""
    found: list[tuple[int, str]] = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue
            try:
                found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
            except FileNotFoundError:  # removed while we looked
                continue
    found.sort()
    return found


def _file_kind(mode: int) -> str:
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def _user(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class _Vanished(Exception):
    pass



_MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects a spool record may have (real ones are 3 or 4 deep)."""


def _json_depth(value: object) -> int:
    """How deeply ``value`` (parsed JSON) nests lists and dicts, without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > _MAX_JSON_DEPTH:
            return deepest
        stack.extend((c, depth + 1) for c in children)
    return deepest

def _read_at(dir_fd: int, name: str, owners: frozenset[int],
             max_bytes: int = MAX_RECORD_BYTES) -> tuple[dict[str, Any] | None, str | None,
                                                         int | None]:
    """(record, None, owner) or (None, why, owner). Raises _Vanished when the file is gone.
    Never follows a link, never blocks on a FIFO, never reads past the size cap."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise _Vanished() from None
    if not stat.S_ISREG(st.st_mode):
        return None, f"{_file_kind(st.st_mode)}, not a record file", st.st_uid
    try:
        fd = os.open(name, _READ, dir_fd=dir_fd)
    except FileNotFoundError:
        raise _Vanished() from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "a symbolic link, not a record file", None
        return None, f"cannot open: {exc.strerror or exc}", st.st_uid
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"{_file_kind(st.st_mode)}, not a record file", st.st_uid
        if st.st_uid not in owners:
            return None, (f"owned by {_user(st.st_uid)}, not a writer allowed here "
                          f"({', '.join(_user(u) for u in sorted(owners))})"), st.st_uid
        if st.st_size > max_bytes:
            return None, f"{st.st_size} bytes, larger than {max_bytes}: not read", st.st_uid
        chunks = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            return None, f"larger than {max_bytes} bytes: not read", st.st_uid
        try:
            record = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return None, f"not UTF-8 at byte {exc.start}", st.st_uid
        except json.JSONDecodeError as exc:
            return None, (f"not JSON: {exc.msg} at line {exc.lineno} col {exc.colno}"), \
                st.st_uid
        except RecursionError:
            return None, "not JSON: nested too deeply", st.st_uid
        del data, chunks
        # Python 3.14's json parses far deeper nesting than 3.11-3.13's RecursionError let
        # through: the same bound on every Python
        if _json_depth(record) > _MAX_JSON_DEPTH:
            return None, "not JSON: nested too deeply", st.st_uid
        problem = validate(record)
        if problem:
            return None, problem, st.st_uid
        return record, None, st.st_uid
    except Exception as exc:  # one bad file must never stop the ingest
        text = f"{type(exc).__name__}: {exc}"
        return None, f"cannot be read: {text[:300]}", None
    finally:
        os.close(fd)


def read_item(spool: str, dir_fd: int, where: str, name: str, owners: frozenset[int],
              max_bytes: int = MAX_RECORD_BYTES) -> SpoolItem | None:
    """One spool entry, judged; None when it vanished."""
    from pathlib import Path

    path = Path(spool, where, name) if where else Path(spool, name)
    try:
        record, error, owner = _read_at(dir_fd, name, owners, max_bytes)
    except _Vanished:
        return None
    sub = where.split("/", 1)[0]
    if record is not None and sub in KINDS_IN and record.get("kind") not in KINDS_IN[sub]:
        error = (f"a {record.get('kind')} record in {sub}/ ({sub}/ holds only "
                 f"{', '.join(KINDS_IN[sub])})")
        record = None
    if record is None:
        return SpoolItem(path, None, error or "unreadable", where, owner)
    return SpoolItem(path, record, None, where, owner, writer_of(sub, record))


def claim_batch(spool_dir: str | os.PathLike[str], limit: int = 1000, *,
                trust: Trust | None = None, max_bytes: int = MAX_BATCH_BYTES,
                subdirs: Iterable[str] = SUBDIRS) -> list[SpoolItem]:
    """Up to ``limit`` entries of ``node/`` and ``ctld/`` (``subdirs``), oldest first (by file
    time), each read from its own descriptor and checked; about ``max_bytes`` at most.

    Items with ``error`` set belong in quarantine (their bodies are not kept). A subdirectory
    that is missing or fails the layout check is not read (``check_layout`` says why).
    """
    spool = os.fspath(spool_dir)
    trust = trust_for() if trust is None else trust
    try:
        root = open_root(spool, trust)
    except OSError:
        return []
    fds: dict[str, int] = {}
    try:
        for sub in subdirs:
            with contextlib.suppress(OSError):
                fds[sub] = open_subdir(spool, sub, trust, root_fd=root)
        names = sorted((mtime, name, sub) for sub, fd in fds.items()
                       for mtime, name in _listing(fd))[: max(limit, 0)]
        items: list[SpoolItem] = []
        total = 0
        for _, name, sub in names:
            if total >= max_bytes and items:
                break
            item = read_item(spool, fds[sub], sub, name, trust.writers(sub))
            if item is None:
                continue  # removed between listing and reading
            items.append(item)
            if item.record is not None:
                with contextlib.suppress(OSError):
                    total += os.stat(name, dir_fd=fds[sub], follow_symlinks=False).st_size
        return items
    finally:
        for fd in fds.values():
            os.close(fd)
        os.close(root)


def claim_legacy(spool_dir: str | os.PathLike[str], limit: int = 1000, *,
                 trust: Trust | None = None) -> list[SpoolItem]:
    """Records of the old single-directory layout (``<spool>/*.json``): read as
    ``claim_batch`` reads, accepted from root or the SlurmUser. The daemon ingests these
    once, at start-up."""
    from pathlib import Path

    spool = os.fspath(spool_dir)
    trust = trust_for() if trust is None else trust
    try:
        root = open_root(spool, trust)
    except OSError:
        return []
    try:
        items = []
        for _, name in _listing(root)[: max(limit, 0)]:
            try:
                record, error, owner = _read_at(root, name, trust.writers(""))
            except _Vanished:
                continue
            if record is None:
                items.append(SpoolItem(Path(spool, name), None, error, "", owner))
            else:
                items.append(SpoolItem(Path(spool, name), record, None, "", owner,
                                       writer_of(subdir_for(record.get("kind")), record)))
        return items
    finally:
        os.close(root)


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


# -- quarantine --------------------------------------------------------------------------------


def quarantine(spool_dir: str | os.PathLike[str], item: SpoolItem, reason: str, *,
               trust: Trust | None = None) -> Path | None:
    """Move a spool entry (whatever it is: file, link, FIFO) into ``quarantine/`` with
    ``<name>.reason`` beside it, by directory fds, never following a link; log the reason.
    Returns its new path, or None when it had vanished."""
    import logging
    from pathlib import Path

    log = logging.getLogger("slurmgate.spool")
    spool = os.fspath(spool_dir)
    trust = trust_for() if trust is None else trust
    name = item.path.name
    reason_line = reason.replace("\n", " ")
    root = open_root(spool, trust)
    try:
        src = open_subdir(spool, item.where, trust, root_fd=root) if item.where else os.dup(root)
        try:
            qfd = open_subdir(spool, QUARANTINE, trust, create=True, root_fd=root)
            try:
                dest, rfd = _reserve_reason(qfd, name)
                try:
                    try:
                        os.rename(name, dest, src_dir_fd=src, dst_dir_fd=qfd)
                    except FileNotFoundError:
                        os.close(rfd)
                        rfd = -1
                        os.unlink(dest + ".reason", dir_fd=qfd)
                        log.warning("spool record %s vanished before quarantine (%s)",
                                    name, reason_line)
                        return None
                    with contextlib.suppress(OSError):  # retention counts from now
                        os.utime(dest, dir_fd=qfd, follow_symlinks=False)
                    os.write(rfd, _reason_bytes(reason_line))
                finally:
                    if rfd >= 0:
                        os.close(rfd)
                _fsync_fd(qfd)
            finally:
                os.close(qfd)
        finally:
            os.close(src)
    finally:
        os.close(root)
    log.warning("quarantined spool record %s: %s", name, reason_line)
    return Path(spool, QUARANTINE, dest)


def quarantine_count(spool_dir: str | os.PathLike[str]) -> int:
    """Records (not .reason files) in quarantine/; 0 when it cannot be read."""
    try:
        fd = os.open(os.path.join(os.fspath(spool_dir), QUARANTINE), _DIR)
    except OSError:
        return 0
    try:
        with os.scandir(fd) as entries:
            return sum(1 for e in entries if not e.name.endswith(".reason"))
    finally:
        os.close(fd)


def prune_quarantine(spool_dir: str | os.PathLike[str], days: float, *,
                     trust: Trust | None = None, now: float | None = None) -> int:
    """Delete quarantined entries (and their .reason files) older than ``days``. Returns how
    many entries went. Never follows a link (unlink, or shutil.rmtree with a dir fd)."""
    import shutil

    spool = os.fspath(spool_dir)
    trust = trust_for() if trust is None else trust
    now = time.time() if now is None else now
    cutoff = now - days * 86400.0
    try:
        qfd = open_subdir(spool, QUARANTINE, trust)
    except FileNotFoundError:
        return 0
    removed = 0
    try:
        with os.scandir(qfd) as entries:
            old = []
            for e in entries:
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat(follow_symlinks=False)
                    if st.st_mtime < cutoff:
                        old.append((e.name, stat.S_ISDIR(st.st_mode)))
        for name, is_dir in old:
            try:
                if is_dir:
                    shutil.rmtree(name, dir_fd=qfd)
                else:
                    os.unlink(name, dir_fd=qfd)
            except FileNotFoundError:
                continue
            if not name.endswith(".reason"):
                removed += 1
    finally:
        os.close(qfd)
    return removed


# -- start-up: the layout, stranded temp files ----------------------------------------------


def check_layout(spool_dir: str | os.PathLike[str], trust: Trust, *,
                 create: bool = False) -> dict[str, str]:
    """Problems per directory ('' for the spool itself, 'node', 'node/tmp', 'ctld', ...).
    With ``create`` (the daemon at start, as the SlurmUser) ctld/, ctld/tmp/ and quarantine/
    are made when missing. A missing node/ is not a problem (the first hook makes it)."""
    spool = os.fspath(spool_dir)
    problems: dict[str, str] = {}
    try:
        root = open_root(spool, trust)
    except OSError as exc:
        return {"": str(exc) if isinstance(exc, LayoutError) else f"{spool}: {exc.strerror}"}
    try:
        for sub in (NODE, f"{NODE}/{TMP}", CTLD, f"{CTLD}/{TMP}", QUARANTINE):
            top = sub.split("/", 1)[0]
            if top in problems:
                continue
            make = create and top != NODE
            try:
                os.close(open_subdir(spool, sub, trust, create=make, root_fd=root))
            except FileNotFoundError:
                if top != NODE:
                    problems[sub] = f"{os.path.join(spool, sub)} does not exist"
            except OSError as exc:
                problems[sub] = str(exc) if isinstance(exc, LayoutError) else \
                    f"{os.path.join(spool, sub)}: {exc.strerror or exc}"
    finally:
        os.close(root)
    return problems


def count_tmp(spool_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Files waiting in node/tmp and ctld/tmp (a writer that died, or one still writing)."""
    out = {}
    for sub in SUBDIRS:
        try:
            fd = os.open(os.path.join(os.fspath(spool_dir), sub, TMP), _DIR)
        except OSError:
            continue
        try:
            with os.scandir(fd) as entries:
                out[sub] = sum(1 for _ in entries)
        finally:
            os.close(fd)
    return out


def recover_tmp(
    spool_dir: str | os.PathLike[str], older_than: float = TMP_GRACE_S,
    now: float | None = None, *, trust: Trust | None = None,
) -> tuple[int, int]:
    """Deal with temp files in node/tmp and ctld/tmp left by writers that died (the daemon
    calls this at start-up and on a timer).

    A complete, valid record of an allowed writer (the writer died between fsync and
    rename) is renamed into its subdirectory; anything else is quarantined, never deleted.
    Files younger than ``older_than`` seconds may still be being written and are left alone.
    Returns (recovered, quarantined).
    """
    from pathlib import Path

    spool = os.fspath(spool_dir)
    trust = trust_for() if trust is None else trust
    now = time.time() if now is None else now
    recovered = quarantined = 0
    for sub in SUBDIRS:
        try:
            sub_fd = open_subdir(spool, sub, trust)
        except OSError:
            continue
        try:
            try:
                tmp_fd = open_subdir(spool, f"{sub}/{TMP}", trust)
            except OSError:
                continue
            try:
                with os.scandir(tmp_fd) as entries:
                    names = []
                    for e in entries:
                        with contextlib.suppress(FileNotFoundError):
                            if now - e.stat(follow_symlinks=False).st_mtime >= older_than:
                                names.append(e.name)
                moved = False
                for name in sorted(names):
                    item = read_item(spool, tmp_fd, f"{sub}/{TMP}", name, trust.writers(sub))
                    if item is None:
                        continue
                    if item.error is None and item.record is not None:
                        try:
                            os.rename(name, record_filename(item.record), src_dir_fd=tmp_fd,
                                      dst_dir_fd=sub_fd)
                        except FileNotFoundError:
                            continue
                        recovered += 1
                        moved = True
                        continue
                    bad = SpoolItem(Path(spool, sub, TMP, name), None, item.error,
                                    f"{sub}/{TMP}", item.owner)
                    if quarantine(spool, bad, "left in tmp/ by a writer that died: "
                                  f"{item.error}", trust=trust):
                        quarantined += 1
                if moved:
                    _fsync_fd(sub_fd)
            finally:
                os.close(tmp_fd)
        finally:
            os.close(sub_fd)
    return (recovered, quarantined)


def nudge_daemon(socket_path: str, timeout: float = 0.05) -> bool:
    """``slurm_plugin.protocol.nudge`` by its old name (``slurmgate reconcile`` and the
    cluster tests call it so): tell the daemon the spool has new records. Never raises; True
    if it answered ok."""
    from slurm_plugin.protocol import nudge

    return nudge(socket_path, timeout)
