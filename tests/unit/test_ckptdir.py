"""The Prolog's checkpoint directories (slurm_plugin.node.ckptdir): ROOT/TEAM/USER made by
root, owned by the user, 0700; whatever a user planted is refused, never adopted."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from policies.config import load_policy
from slurm_plugin.node import ckptdir, hooks

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO / "contrib" / "examples" / "policy.toml"


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


as_root = pytest.mark.skipif(
    os.geteuid() != 0 or None in (_uid("alice"), _uid("mallory")),
    reason="needs root and the users alice and mallory",
)


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory others can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="sg-ckptdir-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def settings(root: Path, inject: str = "tagged") -> ckptdir.CkptSettings:
    with open(EXAMPLE_POLICY, "rb") as f:
        data = tomllib.load(f)
    data["checkpoint"].update(checkpoint_root=str(root), inject=inject)
    return ckptdir.settings_from(data)


def job_env(user: str = "alice", comment: str | None = "project=vit-scaling,ckpt=yes",
            account: str = "vision") -> dict[str, str]:
    entry = pwd.getpwnam(user)
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_USER": user, "SLURM_JOB_UID": str(entry.pw_uid),
           "SLURM_JOB_GID": str(entry.pw_gid), "SLURM_JOB_ACCOUNT": account}
    if comment is not None:
        env["SLURM_JOB_COMMENT"] = comment
    return env


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# -- the team, as the daemon derives it -----------------------------------------------------------


def test_team_for_agrees_with_the_policy_model() -> None:
    policy = load_policy(EXAMPLE_POLICY)
    with open(EXAMPLE_POLICY, "rb") as f:
        data = tomllib.load(f)
    data.setdefault("users", {}).update({"dave": "nlp", "carol": "nlp"})  # the user map too
    policy = policy.model_copy(update={"users": dict(data["users"])})
    mine = ckptdir.settings_from(data)
    for account in (None, "", "vision", "nlp", "other"):
        for user in (None, "", "alice", "bob", "carol", "dave", "mallory"):
            assert ckptdir.team_for(mine, account, user) == policy.team_for(account, user), \
                (account, user)


def test_which_jobs_get_a_directory(tmp_path: Path) -> None:
    tagged, every, off = (settings(tmp_path, m) for m in ("tagged", "all", "off"))
    assert ckptdir.wants_dir(tagged, {"SLURM_JOB_COMMENT": "project=x, CKPT = yes"})
    assert not ckptdir.wants_dir(tagged, {"SLURM_JOB_COMMENT": "project=x,ckpt=no"})
    assert not ckptdir.wants_dir(tagged, {})  # slurmd sets the variable only with a comment
    assert ckptdir.wants_dir(every, {})
    assert not ckptdir.wants_dir(off, {"SLURM_JOB_COMMENT": "ckpt=yes"})


# -- prepare ------------------------------------------------------------------------------------


@as_root
def test_prepare_makes_root_team_and_user_dirs(base: Path) -> None:
    root = base / "ckpt"
    notes = ckptdir.prepare(settings(root), job_env())
    assert notes == [f"made the checkpoint root {root} (root:root 0755)"]
    alice = pwd.getpwnam("alice")
    for p, uid, m in ((root, 0, 0o755), (root / "vision", 0, 0o755),
                      (root / "vision" / "alice", alice.pw_uid, 0o700)):
        st = os.lstat(p)
        assert stat.S_ISDIR(st.st_mode) and (st.st_uid, mode(p)) == (uid, m), p
    assert os.lstat(root / "vision" / "alice").st_gid == alice.pw_gid
    # again (a requeue, or the job's next node): all is in place, nothing to say
    assert ckptdir.prepare(settings(root), job_env()) == []
    # bob's job: his own directory in his team, nothing of alice's touched
    assert ckptdir.prepare(settings(root), job_env("bob", "ckpt=yes", "nlp")) == []
    assert os.lstat(root / "nlp" / "bob").st_uid == pwd.getpwnam("bob").pw_uid


@as_root
def test_prepare_only_for_jobs_that_get_a_directory(base: Path) -> None:
    root = base / "ckpt"
    assert ckptdir.prepare(settings(root), job_env(comment="project=x")) == []
    assert ckptdir.prepare(settings(root), job_env(comment=None)) == []
    assert ckptdir.prepare(settings(root, "off"), job_env()) == []
    assert not root.exists()
    ckptdir.prepare(settings(root, "all"), job_env(comment=None))
    assert (root / "vision" / "alice").is_dir()


@as_root
def test_a_job_without_a_team_account_uses_the_users_team_too(base: Path) -> None:
    """The daemon may have seen no --account (team from the user); the Prolog sees the
    account Slurm filled in. Both teams' directories are prepared."""
    root = base / "ckpt"
    assert ckptdir.prepare(settings(root), job_env(account="nlp"))[1:] == []
    assert os.lstat(root / "nlp" / "alice").st_uid == uid("alice")
    assert os.lstat(root / "vision" / "alice").st_uid == uid("alice")
    [note] = ckptdir.prepare(settings(root), job_env("mallory", account="other"))
    assert "belongs to no team" in note


@as_root
def test_a_planted_symlink_is_refused_and_left_alone(base: Path) -> None:
    root = base / "ckpt"
    ckptdir.prepare(settings(root), job_env("bob", "ckpt=yes", "nlp"))
    loot = base / "mallory-loot"
    loot.mkdir()
    os.chown(loot, uid("mallory"), -1)
    (root / "vision").mkdir(mode=0o755)
    (root / "vision" / "alice").symlink_to(loot)
    [note] = ckptdir.prepare(settings(root), job_env())
    assert f"{root}/vision/alice is a symlink" in note and "refused" in note
    assert (root / "vision" / "alice").is_symlink()
    assert os.lstat(loot).st_uid == uid("mallory") and mode(loot) == 0o755  # not adopted


@as_root
def test_a_directory_of_another_user_is_refused_and_left_alone(base: Path) -> None:
    root = base / "ckpt"
    squat = root / "vision" / "alice"
    squat.mkdir(parents=True)
    root.chmod(0o755)
    (root / "vision").chmod(0o755)
    os.chown(squat, uid("mallory"), -1)
    [note] = ckptdir.prepare(settings(root), job_env())
    assert f"{squat} is owned by uid {uid('mallory')}, not uid {uid('alice')}" in note
    assert os.lstat(squat).st_uid == uid("mallory")
    # alice's own directory that she made writable by everyone: not fixed either, refused
    os.chown(squat, uid("alice"), -1)
    squat.chmod(0o777)
    [note] = ckptdir.prepare(settings(root), job_env())
    assert "is writable by others (mode 0777)" in note and mode(squat) == 0o777


@as_root
def test_a_team_directory_of_a_user_is_refused(base: Path) -> None:
    root = base / "ckpt"
    (root / "vision").mkdir(parents=True)
    root.chmod(0o755)
    os.chown(root / "vision", uid("mallory"), -1)
    [note] = ckptdir.prepare(settings(root), job_env())
    assert f"{root}/vision is owned by uid {uid('mallory')}, not uid 0" in note
    assert not (root / "vision" / "alice").exists()


@as_root
def test_a_world_writable_or_symlinked_root_is_refused(base: Path) -> None:
    root = base / "ckpt"
    root.mkdir()
    root.chmod(0o1777)
    [note] = ckptdir.prepare(settings(root), job_env())
    assert f"{root} is writable by others (mode 1777)" in note
    assert os.listdir(root) == []
    root.chmod(0o755)
    elsewhere = base / "real-root"
    elsewhere.mkdir(mode=0o755)
    link = base / "link-root"
    link.symlink_to(elsewhere)
    [note] = ckptdir.prepare(settings(link), job_env())
    assert f"{link} is a symlink" in note and os.listdir(elsewhere) == []
    # ROOT is never made where its parent is missing (a shared file system not mounted)
    [note] = ckptdir.prepare(settings(base / "not-mounted" / "ckpt"), job_env())
    assert "not-mounted" in note and "mounted?" in note
    assert not (base / "not-mounted").exists()


# -- the one call in the Prolog --------------------------------------------------------------------


def _settings_for_prolog(tmp_path: Path) -> hooks.HookSettings:
    return hooks.HookSettings(str(tmp_path / "spool"), str(tmp_path / "none.sock"), "c", {},
                              "minor", state_dir=str(tmp_path / "state"))


def test_the_prolog_survives_a_failing_checkpoint_step(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(env: object) -> list[str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(ckptdir, "prepare_job", boom)
    notes = hooks.prolog({"SLURM_JOB_ID": "5", "SLURMD_NODENAME": "n1"},
                         _settings_for_prolog(tmp_path), 1.0)
    assert notes == ["checkpoint directory: RuntimeError: boom"]


@as_root
def test_the_prolog_prepares_the_directory(base: Path, tmp_path: Path) -> None:
    root = base / "ckpt"
    text = EXAMPLE_POLICY.read_text().replace('checkpoint_root = "/shared/checkpoints"',
                                              f'checkpoint_root = "{root}"')
    assert str(root) in text
    cfg = tmp_path / "policy.toml"
    cfg.write_text(text)
    env = {**job_env(), "SLURMGATE_CONFIG": str(cfg), "SLURMD_NODENAME": "n1"}
    notes = hooks.prolog(env, _settings_for_prolog(tmp_path), 1.0)
    assert notes == [f"made the checkpoint root {root} (root:root 0755)"]
    assert os.lstat(root / "vision" / "alice").st_uid == uid("alice")
    assert hooks.prolog(env, _settings_for_prolog(tmp_path), 2.0) == []
