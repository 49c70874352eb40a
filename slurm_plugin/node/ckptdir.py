"""The Prolog's share of checkpoints: ``ROOT/TEAM/USER``, made by root and owned by the user.

slurmgate injects ``$SLURMGATE_CKPT_DIR = ROOT/TEAM/USER/JOBNAME`` at submit time. Users must
not be able to make each other's directories (security review H10: a directory planted at
``ROOT/TEAM/VICTIM`` would hand the victim a checkpoint to resume from), so ROOT is not
world-writable and the Prolog, as root, creates on the job's first node:

    ROOT                root:root 0755 when missing (its parent must exist: ROOT is never made
                        on a node's local disk because a shared file system is not mounted)
    ROOT/TEAM           root:root 0755
    ROOT/TEAM/USER      the job's user and primary group, 0700

Each component is opened relative to its parent with O_NOFOLLOW. Whatever is found in place
is checked, never changed: a symlink, a directory with the wrong owner or one others may write
is refused and reported (one note in the hook log), and the job runs anyway (the checkpoint
library refuses the same directory and says why). JOBNAME below USER is made by the library
inside the user's 0700 directory, where nobody else can squat it.

Only for jobs that get a checkpoint directory: ``[checkpoint] inject = "all"``, or "tagged" and
``ckpt=yes`` in the job's comment (``$SLURM_JOB_COMMENT``, which slurmd sets from the job
credential when the job has a comment). The team is
derived as the daemon derives it (``policies.config.Policy.team_for``); the team of the user
alone is prepared too when it differs, since the daemon saw the account the job was submitted
with and the Prolog sees the account Slurm filled in.

Stdlib only (compute-node code): the few settings come straight from the policy TOML.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from policies import defaults

Env = Mapping[str, str]

DEFAULT_ROOT = "/shared/checkpoints"
"""policies.config.Checkpoint.checkpoint_root's default."""
DEFAULT_INJECT = "tagged"
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OPEN_BELOW = _OPEN_DIR | os.O_NOFOLLOW
OWNER_WAIT_SECONDS = 2.0
"""How long a user directory still owned by root may be the Prolog of another node of the same
job, between its mkdir and its fchown."""


class CkptDirError(Exception):
    """The policy's checkpoint settings cannot be read."""


class Team(NamedTuple):
    accounts: tuple[str, ...]
    members: tuple[str, ...]


class CkptSettings(NamedTuple):
    root: str
    inject: str
    """all | tagged | off (policy.checkpoint.inject)."""
    users: dict[str, str]
    teams: dict[str, Team]
    """In the policy file's order, as Policy.team_for walks them."""


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CkptDirError(f"{where} must be a list of strings")
    return tuple(value)


def settings_from(data: Mapping[str, Any], path: str = "policy") -> CkptSettings:
    """The checkpoint settings from a parsed policy TOML (defaults as in policies.config)."""
    ckpt = data.get("checkpoint", {})
    if not isinstance(ckpt, dict):
        raise CkptDirError(f"{path}: [checkpoint] must be a table")
    root = ckpt.get("checkpoint_root", DEFAULT_ROOT)
    if not isinstance(root, str) or not root:
        raise CkptDirError(f"{path}: checkpoint.checkpoint_root must be a non-empty string")
    inject = ckpt.get("inject", DEFAULT_INJECT)
    if inject not in ("all", "tagged", "off"):
        raise CkptDirError(f"{path}: checkpoint.inject must be all, tagged or off")
    users = data.get("users", {})
    if not isinstance(users, dict) or not all(isinstance(v, str) for v in users.values()):
        raise CkptDirError(f"{path}: [users] must map user names to team names")
    teams_in = data.get("teams", {})
    if not isinstance(teams_in, dict):
        raise CkptDirError(f"{path}: [teams] must be a table")
    teams: dict[str, Team] = {}
    for name, team in teams_in.items():
        if not isinstance(team, dict):
            raise CkptDirError(f"{path}: [teams.{name}] must be a table")
        teams[name] = Team(_strings(team.get("accounts", []), f"{path}: teams.{name}.accounts"),
                           _strings(team.get("members", []), f"{path}: teams.{name}.members"))
    return CkptSettings(root, inject, dict(users), teams)


def load_settings(path: str) -> CkptSettings:
    from slurm_plugin.node.policy_file import PolicyFileError, read_policy_file

    try:
        return settings_from(read_policy_file(path), path)
    except PolicyFileError as exc:
        raise CkptDirError(str(exc)) from exc


def team_for(settings: CkptSettings, account: str | None, user: str | None) -> str | None:
    """policies.config.Policy.team_for over the TOML: the account first, then the user map,
    then team membership."""
    if account:
        for name, team in settings.teams.items():
            if account in team.accounts:
                return name
    if user:
        if user in settings.users:
            return settings.users[user]
        for name, team in settings.teams.items():
            if user in team.members:
                return name
    return None


def _value(env: Env, key: str) -> str | None:
    value = (env.get(key) or "").strip()
    return None if value.lower() in ("", "unknown", "none", "null", "(null)", "n/a") else value


def wants_dir(settings: CkptSettings, env: Env) -> bool:
    """Whether the daemon gave (or would give) this job a checkpoint directory."""
    if settings.inject == "all":
        return True
    if settings.inject != "tagged":
        return False
    # slurmd sets SLURM_JOB_COMMENT from the job credential, and only when there is one.
    for piece in (env.get("SLURM_JOB_COMMENT") or "").split(","):
        key, eq, value = piece.partition("=")
        if eq and key.strip().lower() == "ckpt" and value.strip() == "yes":
            return True
    return False


def _job_user(env: Env) -> tuple[str, int, int]:
    """(name, uid, gid) of the job's user: SLURM_JOB_UID / SLURM_JOB_USER, primary group."""
    import pwd

    name, uid_text, gid_text = (_value(env, k) for k in
                                ("SLURM_JOB_USER", "SLURM_JOB_UID", "SLURM_JOB_GID"))
    entry = None
    try:
        if uid_text is not None and uid_text.isdigit():
            uid = int(uid_text)
            entry = pwd.getpwuid(uid)
        elif name is not None:
            entry = pwd.getpwnam(name)
            uid = entry.pw_uid
        else:
            raise CkptDirError("the job's user is unknown (no SLURM_JOB_UID or SLURM_JOB_USER)")
    except KeyError:
        if name is None or uid_text is None or not uid_text.isdigit():
            raise CkptDirError(f"user {name or uid_text} is unknown on this node") from None
        uid = int(uid_text)
    if name is None:
        assert entry is not None
        name = entry.pw_name
    if gid_text is not None and gid_text.isdigit():
        gid = int(gid_text)
    else:
        gid = entry.pw_gid if entry is not None else -1
    if uid == 0:
        raise CkptDirError("the job runs as root: no checkpoint directory is prepared for it")
    return name, uid, gid


def _safe_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


class _Refused(Exception):
    """A component found in place that is not what it must be (left as it is)."""


def _others_may_write(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _check(where: str, st: os.stat_result, uid: int, *, sticky_ok: bool = False) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise _Refused(f"{where} is not a directory")
    if st.st_uid != uid:
        raise _Refused(f"{where} is owned by uid {st.st_uid}, not uid {uid}")
    if _others_may_write(st) and not (sticky_ok and mode & stat.S_ISVTX):
        raise _Refused(f"{where} is writable by others (mode {mode:04o})")


def _open_component(parent: int, name: str, where: str) -> int | None:
    """``name`` below ``parent``, not followed if a symlink; None when missing."""
    try:
        return os.open(name, _OPEN_BELOW, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                if stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode):
                    raise _Refused(f"{where} is a symlink") from None
            except OSError:
                pass
            raise _Refused(f"{where} is not a directory") from None
        raise


def _ensure(parent: int, name: str, where: str, *, uid: int, gid: int, mode: int,
            wait_for_owner: bool = False) -> tuple[int, bool]:
    """Open (making it if missing) the directory ``name`` below ``parent``: owned by
    ``uid``:``gid`` with ``mode`` when made; checked, never changed, when found."""
    me = os.geteuid()
    fd = _open_component(parent, name, where)
    created = False
    if fd is None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)  # private until it has its owner
            created = True
        except FileExistsError:
            pass
        fd = _open_component(parent, name, where)
        if fd is None:
            raise _Refused(f"{where} vanished while it was being made")
    try:
        if created:
            st = os.fstat(fd)
            if st.st_uid != me:  # e.g. root squashed to nobody on NFS
                raise _Refused(f"{where} was made but belongs to uid {st.st_uid}, not root: "
                               f"root cannot own files here (root_squash?)")
            if (uid, gid) != (me, -1) and (st.st_uid, st.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        st = os.fstat(fd)
        deadline = time.monotonic() + (OWNER_WAIT_SECONDS if wait_for_owner else 0.0)
        while wait_for_owner and st.st_uid == me != uid and time.monotonic() < deadline:
            time.sleep(0.05)  # another node's Prolog between its mkdir and its fchown
            st = os.fstat(fd)
        _check(where, st, uid)
        return fd, created
    except BaseException:
        os.close(fd)
        raise


def prepare_dirs(root: str, teams: list[str], user: str, uid: int, gid: int) -> list[str]:
    """Make or check ROOT, ROOT/TEAM and ROOT/TEAM/USER for each of ``teams``; notes for the
    log (empty when all is well)."""
    notes: list[str] = []
    root = os.path.normpath(root)
    if not os.path.isabs(root) or root == "/":
        return [f"checkpoint_root {root!r} must be an absolute path below /"]
    if not _safe_name(user):
        return [f"user name {user!r} cannot be a directory name"]
    me = os.geteuid()
    parent_path, base = os.path.split(root)
    try:
        parent = os.open(parent_path, _OPEN_DIR)
    except OSError as exc:
        return [f"checkpoint root {root} not prepared: {parent_path}: {exc.strerror or exc} "
                f"(is the shared file system mounted?)"]
    try:
        try:
            st = os.fstat(parent)
            if stat.S_IMODE(st.st_mode) & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
                raise _Refused(f"{parent_path} is writable by everyone (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit")
            root_fd, made = _ensure(parent, base, root, uid=me, gid=-1, mode=0o755)
        except _Refused as why:
            return [f"checkpoint root refused: {why}; fix it by hand (root:root 0755); no "
                    f"checkpoint directories are made until then"]
        except OSError as exc:
            return [f"checkpoint root {root} not prepared: {exc.strerror or exc}"]
    finally:
        os.close(parent)
    try:
        if made:
            notes.append(f"made the checkpoint root {root} (root:root 0755)")
        for team in dict.fromkeys(teams):
            if not _safe_name(team):
                notes.append(f"team name {team!r} cannot be a directory name")
                continue
            team_path = os.path.join(root, team)
            try:
                team_fd, _ = _ensure(root_fd, team, team_path, uid=me, gid=-1, mode=0o755)
                try:
                    user_fd, _ = _ensure(team_fd, user, os.path.join(team_path, user),
                                         uid=uid, gid=gid, mode=0o700, wait_for_owner=True)
                    os.close(user_fd)
                finally:
                    os.close(team_fd)
            except _Refused as why:
                notes.append(f"checkpoint directory refused: {why}; left in place: an admin "
                             f"must move it away (the job runs, its checkpoint library will "
                             f"refuse it too)")
            except OSError as exc:
                notes.append(f"checkpoint directory {os.path.join(team_path, user)} not made: "
                             f"{exc.strerror or exc}")
    finally:
        os.close(root_fd)
    return notes


def prepare(settings: CkptSettings, env: Env) -> list[str]:
    """The Prolog's step (as root): ROOT/TEAM/USER for this job when it gets a checkpoint
    directory. Returns notes for the hook log; raises only on unexpected errors (the caller
    logs and ignores them)."""
    if not wants_dir(settings, env):
        return []
    try:
        user, uid, gid = _job_user(env)
    except CkptDirError as exc:
        return [f"checkpoint directory not prepared: {exc}"]
    account = _value(env, "SLURM_JOB_ACCOUNT")
    teams = [t for t in (team_for(settings, account, user), team_for(settings, None, user))
             if t is not None]
    if not teams:
        return [f"checkpoint directory not prepared: user {user} with account {account} "
                f"belongs to no team"]
    return prepare_dirs(settings.root, teams, user, uid, gid)


def prepare_job(env: Env) -> list[str]:
    """``prepare`` with the settings from the policy file the hooks read."""
    return prepare(load_settings(defaults.policy_path(env=env)), env)
