"""Checkpoint squatting, tried as unprivileged users on the real dev cluster.

The checkpoint root and its team directories are root's (0755); each ROOT/team/user is made
by the Prolog as root, owned by the user, 0700. Nobody can pre-create another user's
directory, read it, or plant a checkpoint the victim would resume from.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import uuid
from pathlib import Path

from tests.conftest import FINAL_STATES, TAGS, Cluster
from tests.hostile.conftest import as_user, wait_for

CKPT_ROOT = Path("/var/tmp/slurmgate-ckpt")
PY = "/opt/slurmgate/venv/bin/python"


def ckpt_job(cluster: Cluster, user: str, out: Path) -> int:
    """A ckpt=yes job that reports where its checkpoint directory is, or why it has none."""
    code = ("from slurm_plugin import checkpoint as c\n"
            "try:\n"
            "    print('dir', c.checkpoint_dir())\n"
            "except c.CheckpointError as e:\n"
            "    print('refused', e)\n")
    script = f"{PY} -c {shlex.quote(code)}"
    return cluster.submit_ok(user, "-o", str(out), "-J", "squat-" + uuid.uuid4().hex[:6],
                             tags=TAGS[user] + ",ckpt=yes", wrap=script)


def test_users_cannot_create_in_the_checkpoint_root(cluster: Cluster) -> None:
    (CKPT_ROOT / "vision").mkdir(mode=0o755, exist_ok=True)   # as the Prolog makes it
    mode = CKPT_ROOT.stat()
    assert mode.st_uid == 0 and not mode.st_mode & stat.S_IWOTH
    squat = uuid.uuid4().hex[:8]
    for target in (CKPT_ROOT / f"team-{squat}", CKPT_ROOT / "vision" / f"user-{squat}"):
        out = as_user("mallory", f"import os; os.mkdir({str(target)!r})")
        assert out.returncode != 0 and "PermissionError" in out.stderr, (target, out.stderr)
        assert not target.exists()


def test_a_job_gets_a_private_directory_others_cannot_read(cluster: Cluster) -> None:
    out = Path(f"/tmp/sg-ckpt-{uuid.uuid4().hex[:6]}.out")
    job_id = ckpt_job(cluster, "alice", out)
    cluster.wait_state(job_id, FINAL_STATES, 90)
    text = wait_for(lambda: out.exists() and out.read_text().strip(), 30, 0.3,
                    what="the job's output")
    assert text.startswith("dir "), text
    job_dir = Path(text.split(" ", 1)[1].strip())
    user_dir = job_dir.parent
    assert user_dir == CKPT_ROOT / "vision/alice"
    st = user_dir.stat()
    assert st.st_uid == os.stat("/home/alice").st_uid and stat.S_IMODE(st.st_mode) == 0o700
    peek = as_user("mallory", f"import os; print(os.listdir({str(user_dir)!r}))")
    assert peek.returncode != 0 and "PermissionError" in peek.stderr
    out.unlink()


def test_a_squatted_directory_is_refused_not_used(cluster: Cluster) -> None:
    """A directory mallory owns where carol's should be (planted before the root was locked
    down): the Prolog does not adopt it and carol's job refuses it, saying why."""
    team = CKPT_ROOT / "vision"
    team.mkdir(mode=0o755, exist_ok=True)
    squat = team / "carol"
    if squat.exists():
        shutil.rmtree(squat)
    squat.mkdir(mode=0o777)
    shutil.chown(squat, "mallory")
    out = Path(f"/tmp/sg-ckpt-{uuid.uuid4().hex[:6]}.out")
    try:
        job_id = ckpt_job(cluster, "carol", out)
        cluster.wait_state(job_id, FINAL_STATES, 90)
        text = wait_for(lambda: out.exists() and out.read_text().strip(), 30, 0.3,
                        what="the job's output")
        assert text.startswith("refused"), text
        assert "owned by" in text or "not yours" in text or "uid" in text, text
        assert list(squat.iterdir()) == [], "carol's job wrote into mallory's directory"
        assert squat.stat().st_uid != os.stat("/home/carol").st_uid   # not adopted
    finally:
        shutil.rmtree(squat)
        out.unlink(missing_ok=True)
