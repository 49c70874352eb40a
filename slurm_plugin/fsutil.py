"""File-system durability helpers, one copy for the spool, checkpoints and exports.

Stdlib only and cheap to import: compute-node hooks and user training jobs load this module.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pathlib and shutil cost the hooks' start-up; only exports need them
    from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_path(path: str | os.PathLike[str], directory: bool = False) -> None:
    """fsync a file or a directory; a file system that refuses (some NFS on directories) or
    a path that is gone is not an error."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fsync_path(path, directory=True)


def fsync_tree(top: str | os.PathLike[str]) -> None:
    """fsync every regular file and directory under ``top`` (symlinks are not followed)."""
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                fsync_path(p)
        fsync_path(dirpath, directory=True)


def write_new_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o644,
                   dir_fd: int | None = None) -> None:
    """Create ``path`` (it must not exist, not even as a symlink; relative to ``dir_fd`` when
    given), write all of ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(tmp_path: str, final_path: str, data: bytes) -> None:
    """Write to ``tmp_path`` (same file system), fsync, rename over ``final_path``, fsync dir.

    A failed rename leaves the complete temp file behind on purpose: the spool's recover_tmp
    moves it into place later, so no accounting data is lost.
    """
    write_new_file(tmp_path, data)
    os.rename(tmp_path, final_path)
    fsync_dir(os.path.dirname(final_path) or ".")


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Make ``tmp`` the folder at ``final`` in one step; the old folder is removed."""
    import shutil

    if not final.exists():
        os.rename(tmp, final)
    elif exchange_dirs(tmp, final):
        shutil.rmtree(tmp)
    else:  # no renameat2 here: two renames, the gap is one directory entry long
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    fsync_dir(final.parent)


@contextlib.contextmanager
def locked(lock_path: str | os.PathLike[str], mode: int = 0o640) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` (created if missing) for the block."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class PrivateFileError(ValueError):
    """A secret's file may not be used: the message says why (not regular, others may read
    it, too big)."""


def read_private_file(path: str, max_bytes: int = 4096) -> bytes:
    """The bytes of a secret's file (a password, a token, a URL with a key in it): opened
    without following a symlink, and refused unless it is a regular file that others may not
    read, of at most ``max_bytes``. Raises OSError when it cannot be opened."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PrivateFileError(f"{path}: not a regular file")
        if st.st_mode & 0o007:
            raise PrivateFileError(f"{path}: others may read it (mode "
                                   f"{stat.S_IMODE(st.st_mode):04o}); `chmod o-rwx {path}`")
        data = os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise PrivateFileError(f"{path}: longer than {max_bytes} bytes")
    return data
