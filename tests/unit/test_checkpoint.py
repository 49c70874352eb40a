"""The user-side checkpoint helper and the example jobs that resume after being killed."""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from slurm_plugin import checkpoint as ckpt
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "contrib" / "examples"


@pytest.fixture
def cdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "ckpt"
    for var in ("SLURM_RESTART_COUNT", "SLURM_JOB_RESTART_COUNT", "SLURM_JOB_ID",
                "SLURMGATE_CKPT_ENV", "SLURMGATE_CKPT_KEEP", "SLURM_SUBMIT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURMGATE_CKPT_DIR", str(d))
    return d


@pytest.fixture
def signals() -> Iterator[None]:
    ckpt.clear_request()
    prev = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    ckpt.restore_signals(prev)
    ckpt.clear_request()


# -- where ------------------------------------------------------------------------------------


def test_checkpoint_dir_from_env_and_override(cdir: Path, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    assert ckpt.checkpoint_dir() == cdir and cdir.is_dir()
    monkeypatch.setenv("SLURMGATE_CKPT_ENV", "MY_CKPT")
    monkeypatch.setenv("MY_CKPT", str(tmp_path / "other"))
    assert ckpt.checkpoint_dir(create=False) == tmp_path / "other"
    assert not (tmp_path / "other").exists()


def test_checkpoint_dir_fallback_says_so(cdir: Path, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("SLURMGATE_CKPT_DIR")
    monkeypatch.setenv("SLURM_SUBMIT_DIR", str(tmp_path / "submit"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(ckpt, "_noted", set())
    assert ckpt.checkpoint_dir() == tmp_path / "submit" / ".ckpt" / "4242"
    err = capsys.readouterr().err
    assert "SLURMGATE_CKPT_DIR is not set" in err and "ckpt=yes" in err


def test_unwritable_directory_is_a_clear_error(cdir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="cannot create checkpoint directory"):
        ckpt.save_bytes(1, b"x", directory=blocker / "sub")


def test_restart_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_RESTART_COUNT", raising=False)
    assert ckpt.restart_count() == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert ckpt.restart_count() == 2
    monkeypatch.setenv("SLURM_RESTART_COUNT", "garbage")
    assert ckpt.restart_count() == 0


# -- save / latest ----------------------------------------------------------------------------


def test_save_and_latest(cdir: Path) -> None:
    assert ckpt.latest() is None and ckpt.load_json() is None
    assert ckpt.load_json(default={"step": 0}) == {"step": 0}
    before = time.time()
    ck = ckpt.save_json(7, {"step": 7, "w": [1, 2]})
    assert ck.step == 7 and ck.path == cdir / "step-00000007" and ck.created >= before
    assert (ck.path / "COMPLETE").is_file() and ck.payload == "state.json"
    assert ckpt.latest() == ck
    assert ckpt.load_json() == {"step": 7, "w": [1, 2]}
    assert os.readlink(cdir / "latest") == "step-00000007"
    ckpt.save_bytes("step-00000008", b"\x00raw")
    assert ckpt.latest().step == 8 and ckpt.load_bytes() == b"\x00raw"


def test_writer_with_many_files_and_named_payload(cdir: Path) -> None:
    def writer(d: Path) -> str:
        (d / "model.pt").write_bytes(b"weights")
        (d / "optim.pt").write_bytes(b"moments")
        return "model.pt"

    ck = ckpt.save(3, writer)
    assert ck.payload == "model.pt" and ckpt.load_bytes() == b"weights"
    assert sorted(p.name for p in ck.path.iterdir()) == ["COMPLETE", "model.pt", "optim.pt"]
    ck = ckpt.save(4, lambda d: [(d / n).write_text(n) for n in ("a", "b")])
    assert ck.payload is None
    with pytest.raises(ckpt.CheckpointError, match="no single payload"):
        ckpt.load_bytes()


def test_failing_writer_leaves_nothing(cdir: Path) -> None:
    ckpt.save_json(1, {"ok": 1})

    def broken(d: Path) -> None:
        (d / "half").write_bytes(b"x")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        ckpt.save(2, broken)
    assert sorted(os.listdir(cdir)) == ["latest", "step-00000001"]
    assert ckpt.latest().step == 1
    with pytest.raises(ValueError):
        ckpt.save_json(3, {"bad": float("nan")})
    with pytest.raises(ValueError):
        ckpt.save_json(-1, {})
    with pytest.raises(ValueError):
        ckpt.save_json("latest", {})
    with pytest.raises(ckpt.CheckpointError, match="reserved"):
        ckpt.save(5, lambda d: (d / "COMPLETE").write_text("mine"))
    assert ckpt.latest().step == 1


def test_crash_mid_save_is_ignored(cdir: Path) -> None:
    """What a job killed during a save leaves behind never counts as a checkpoint."""
    ckpt.save_json(5, {"step": 5})
    # killed while writing: the temp directory is all there is
    tmp = cdir / ".tmp-step-00000006.77.0.1234.abcdef"
    tmp.mkdir()
    (tmp / "state.json").write_text('{"step": 6')
    # a directory with the final name but no completion marker (e.g. a hand copy cut short)
    (cdir / "step-00000007").mkdir()
    (cdir / "step-00000007" / "state.json").write_text('{"step": 7}')
    # a pointer to the unfinished one
    (cdir / "latest").unlink()
    os.symlink("step-00000007", cdir / "latest")
    ck = ckpt.latest()
    assert ck is not None and ck.step == 5 and ckpt.load_json() == {"step": 5}
    assert [c.step for c in ckpt.list_checkpoints()] == [5]


def test_crash_between_rename_and_pointer(cdir: Path) -> None:
    ckpt.save_json(1, {"step": 1})
    ckpt.save_json(2, {"step": 2})
    (cdir / "latest").unlink()  # the pointer update never happened
    assert ckpt.latest().step == 2
    (cdir / "latest").write_text("step-00000001\n")  # text pointer (no symlink support)
    assert ckpt.latest().step == 1


def test_marker_written_by_hand_counts(cdir: Path) -> None:
    d = cdir / "step-00000010"
    d.mkdir(parents=True)
    (d / "weights").write_bytes(b"w")
    assert ckpt.latest() is None
    (d / "COMPLETE").touch()
    ck = ckpt.latest()
    assert ck is not None and ck.step == 10 and ck.payload is None


def test_keep_last_k(cdir: Path) -> None:
    for step in range(1, 7):
        ckpt.save_json(step, {"step": step})
    assert [c.step for c in ckpt.list_checkpoints()] == [4, 5, 6]
    assert sorted(n for n in os.listdir(cdir)) == \
        ["latest", "step-00000004", "step-00000005", "step-00000006"]
    ckpt.save_json(7, {"step": 7}, keep=1)
    assert [c.step for c in ckpt.list_checkpoints()] == [7]
    for step in range(8, 12):
        ckpt.save_json(step, {"step": step}, keep=0)
    assert [c.step for c in ckpt.list_checkpoints()] == [7, 8, 9, 10, 11]


def test_keep_from_env(cdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURMGATE_CKPT_KEEP", "2")
    for step in range(1, 5):
        ckpt.save_bytes(step, b"x")
    assert [c.step for c in ckpt.list_checkpoints()] == [3, 4]


def test_resave_same_step_replaces(cdir: Path) -> None:
    ckpt.save_json(4, {"v": "old"})
    ckpt.save_json(4, {"v": "new"})
    assert ckpt.load_json() == {"v": "new"}
    assert sorted(os.listdir(cdir)) == ["latest", "step-00000004"]


def test_rollback_save_is_latest_and_kept(cdir: Path) -> None:
    for step in (10, 11, 12):
        ckpt.save_json(step, {"step": step})
    ckpt.save_json(5, {"step": 5})  # the user went back to an earlier step on purpose
    assert ckpt.latest().step == 5
    assert [c.step for c in ckpt.list_checkpoints()] == [11, 12, 5]


def test_leftovers_of_an_earlier_run_are_cleaned(cdir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    ckpt.save_json(1, {})
    dead = cdir / ".tmp-step-00000002.77.0.1234.abcdef"  # job 77's first run, killed mid-save
    other = cdir / ".tmp-step-00000009.88.0.99.abcdef"  # another job sharing the directory
    old = cdir / ".tmp-step-00000003.88.0.98.abcdef"
    for p in (dead, other, old):
        p.mkdir()
    past = time.time() - ckpt.STALE_TMP_SECONDS - 60
    os.utime(old, (past, past))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    ckpt.save_json(2, {})
    assert not dead.exists() and other.exists() and not old.exists()


# -- signals ----------------------------------------------------------------------------------


def test_signal_sets_the_flag(signals: None) -> None:
    ckpt.on_signal()
    assert not ckpt.should_save() and ckpt.requested() is None
    os.kill(os.getpid(), signal.SIGUSR1)
    wait_for(ckpt.should_save, timeout=5, what="SIGUSR1 to set the flag")
    assert ckpt.requested() == signal.SIGUSR1
    ckpt.clear_request()
    os.kill(os.getpid(), signal.SIGTERM)
    wait_for(ckpt.should_save, timeout=5, what="SIGTERM to set the flag")
    assert ckpt.requested() == signal.SIGTERM


def test_signal_callback_saves(cdir: Path, signals: None) -> None:
    got: list[signal.Signals] = []

    def on_warning(sig: signal.Signals) -> None:
        got.append(sig)
        ckpt.save_json(99, {"saved_on": sig.name})

    ckpt.on_signal(on_warning, signals=["USR1"])
    os.kill(os.getpid(), signal.SIGUSR1)
    wait_for(lambda: got, timeout=5, what="the callback")
    assert ckpt.load_json() == {"saved_on": "SIGUSR1"}


def test_signal_during_a_save_runs_the_callback_after_it(cdir: Path, signals: None) -> None:
    order: list[str] = []
    ckpt.on_signal(lambda s: order.append("callback"), signals=[signal.SIGUSR1])

    def writer(d: Path) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(ckpt.should_save, timeout=5, what="the handler")
        (d / "data").write_bytes(b"x")
        order.append("written")

    ckpt.save(1, writer)
    assert order == ["written", "callback"]
    with pytest.raises(ValueError, match="unknown signal"):
        ckpt.on_signal(signals=["NOPE"])


# -- CLI --------------------------------------------------------------------------------------


def run_main(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsysbinary,
             stdin: bytes = b"") -> tuple[int, bytes, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    rc = ckpt.main(argv)
    out, err = capsysbinary.readouterr()
    return rc, out, err.decode()


def test_cli(cdir: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary, tmp_path: Path) -> None:
    rc, out, err = run_main(["latest", "--step"], monkeypatch, capsysbinary)
    assert rc == 1 and out == b"" and "nothing to resume from" in err
    rc, out, _ = run_main(["load"], monkeypatch, capsysbinary)
    assert rc == 1 and out == b""

    assert run_main(["dir"], monkeypatch, capsysbinary)[:2] == (0, f"{cdir}\n".encode())
    rc, out, _ = run_main(["save", "3", "-"], monkeypatch, capsysbinary, stdin=b"step=3\n")
    assert rc == 0 and out == f"{cdir / 'step-00000003'}\n".encode()
    f = tmp_path / "model.pt"
    f.write_bytes(b"\x00\x01")
    assert run_main(["save", "4", str(f)], monkeypatch, capsysbinary)[0] == 0

    assert run_main(["latest", "--step"], monkeypatch, capsysbinary)[:2] == (0, b"4\n")
    assert run_main(["latest", "--path"], monkeypatch, capsysbinary)[1] == \
        f"{cdir / 'step-00000004'}\n".encode()
    rc, out, _ = run_main(["latest"], monkeypatch, capsysbinary)
    lines = out.decode().splitlines()
    assert rc == 0 and lines[:2] == ["step=4", f"path={cdir / 'step-00000004'}"]
    assert re.fullmatch(r"created=\d+\.\d{3}", lines[2])
    assert run_main(["load"], monkeypatch, capsysbinary)[:2] == (0, b"\x00\x01")
    assert run_main(["load", "--path"], monkeypatch, capsysbinary)[1] == \
        f"{cdir / 'step-00000004' / 'model.pt'}\n".encode()
    assert run_main(["list"], monkeypatch, capsysbinary)[1] == \
        f"3 {cdir / 'step-00000003'}\n4 {cdir / 'step-00000004'}\n".encode()

    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert run_main(["restarts"], monkeypatch, capsysbinary)[1] == b"2\n"

    rc, _, err = run_main(["save", "x"], monkeypatch, capsysbinary)
    assert rc == 2 and "non-negative integer" in err
    rc, _, err = run_main(["save", "5", str(tmp_path / "missing")], monkeypatch, capsysbinary)
    assert rc == 2 and "no such file" in err
    other = tmp_path / "elsewhere"
    assert run_main(["--dir", str(other), "latest"], monkeypatch, capsysbinary)[0] == 1
    assert run_main(["--dir", str(other), "save", "1"], monkeypatch, capsysbinary,
                    stdin=b"x")[0] == 0
    assert ckpt.latest(other).step == 1


def test_cli_save_of_a_directory(cdir: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary,
                                 tmp_path: Path) -> None:
    src = tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a")
    (src / "sub" / "b.bin").write_bytes(b"b")
    assert run_main(["save", "2", str(src)], monkeypatch, capsysbinary)[0] == 0
    ck = ckpt.latest()
    assert (ck.path / "sub" / "b.bin").read_bytes() == b"b" and ck.payload is None
    rc, _, err = run_main(["load"], monkeypatch, capsysbinary)
    assert rc == 2 and "latest --path" in err


# -- the example jobs, killed and resumed --------------------------------------------------------


@pytest.fixture
def job_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a job run as a plain script: a temp checkpoint dir, slurmgate -> repo."""
    wrapper = tmp_path / "bin" / "slurmgate"
    wrapper.parent.mkdir()
    # `slurmgate ckpt ARGS` -> slurm_plugin.checkpoint.main(ARGS), from this checkout
    wrapper.write_text(
        "#!/bin/sh\n"
        '[ "$1" = ckpt ] || { echo "only ckpt here" >&2; exit 2; }\nshift\n'
        f"exec {sys.executable} -m slurm_plugin.checkpoint \"$@\"\n"
    )
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM", "SLURMGATE"))}
    env.update(
        PYTHONPATH=str(REPO), SLURMGATE=str(wrapper), SLURMGATE_PYTHON=sys.executable,
        SLURMGATE_CKPT_DIR=str(tmp_path / "ckpt"), TOTAL_STEPS="12", STEP_SECONDS="0.2",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


JOBS = {
    "bash": ["bash", str(EXAMPLES / "train_bash.sbatch")],
    "python-sbatch": ["bash", str(EXAMPLES / "train_python.sbatch")],
    "python": [sys.executable, str(EXAMPLES / "train.py")],
}


class Job:
    """An example job run as a plain script; its output is read while it runs."""

    def __init__(self, job: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(JOBS[job], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(f, buf), daemon=True)
                        for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream: IO[str], buf: list[str]) -> None:
        for line in stream:
            buf.append(line)

    def steps_done(self) -> int:
        done = [int(m.group(1)) for line in list(self.out)
                if (m := re.fullmatch(r"STEP (\d+)\n", line))]
        return max(done, default=0)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job did not finish in {timeout}s\n{''.join(self.out)}\n"
                                 f"{''.join(self.err)}") from None
        finally:
            for t in self.readers:
                t.join(10)
        return self.proc.returncode, "".join(self.out), "".join(self.err)

    def kill(self) -> None:
        """The node died: no warning, no last save (the whole process group goes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def saved_step(env: dict[str, str]) -> int:
    ck = ckpt.latest(env["SLURMGATE_CKPT_DIR"])
    return ck.step if ck else -1


def resumed_from(out: str) -> int:
    found = re.findall(r"^RESUMED_FROM=(\d+)$", out, re.M)
    assert len(found) == 1, out
    return int(found[0])


@pytest.mark.parametrize("job", list(JOBS))
def test_example_resumes_after_node_failure(job: str, job_env: dict[str, str]) -> None:
    first = Job(job, job_env)
    try:
        wait_for(lambda: saved_step(job_env) >= 3 or first.proc.poll() is not None,
                 timeout=60, what="a checkpoint of step 3")
    finally:
        first.kill()
    rc, out, err = first.finish()
    assert rc == -signal.SIGKILL, err
    assert resumed_from(out) == 0 and "DONE" not in out
    killed_at = saved_step(job_env)
    assert killed_at >= 3

    job_env["SLURM_RESTART_COUNT"] = "1"  # what Slurm sets on the requeued run
    rc, out, err = Job(job, job_env).finish()
    assert rc == 0, err
    assert resumed_from(out) == killed_at
    assert re.findall(r"^DONE .*$", out, re.M) == ["DONE steps=12 restarts=1"]
    assert "STATE sum=78\n" in out  # 1+...+12: the state came back with the step
    assert saved_step(job_env) == 12
    assert [c.step for c in ckpt.list_checkpoints(job_env["SLURMGATE_CKPT_DIR"])] == [10, 11, 12]


@pytest.mark.parametrize(("job", "sig", "code"), [
    ("bash", signal.SIGUSR1, 0), ("bash", signal.SIGTERM, 143),
    ("python-sbatch", signal.SIGUSR1, 0), ("python", signal.SIGTERM, 143),
])
def test_example_saves_and_stops_on_warning(job: str, sig: signal.Signals, code: int,
                                            job_env: dict[str, str]) -> None:
    """The time-limit warning (B:USR1 reaches the batch shell) or preemption's SIGTERM: the
    job saves the step it reached, although no periodic save was due, and stops."""
    job_env.update(SAVE_EVERY="1000", TOTAL_STEPS="500", STEP_SECONDS="0.1")
    run = Job(job, job_env)
    try:
        wait_for(lambda: run.steps_done() >= 2 or run.proc.poll() is not None, timeout=30,
                 what="two training steps")
        os.kill(run.proc.pid, sig)
        rc, out, err = run.finish(timeout=30)
    finally:
        run.kill()
    assert rc == code, err
    assert "DONE" not in out
    caught = re.search(rf"^caught {sig.name} at step (\d+); checkpoint step (\d+) saved$", err,
                       re.M)
    assert caught, err
    # it saved the step it had reached, and a rerun continues from there
    reached = int(caught.group(1))
    assert int(caught.group(2)) == reached == saved_step(job_env) >= 2
    job_env["TOTAL_STEPS"] = str(reached + 2)
    rc, out, err = Job(job, job_env).finish()
    assert rc == 0, err
    assert resumed_from(out) == reached
    assert f"DONE steps={reached + 2} restarts=0\n" in out


# -- whose directory (H10) -----------------------------------------------------------------------


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


RUNUSER = next((p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)), "")
def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


as_root = pytest.mark.skipif(
    os.geteuid() != 0 or None in (_uid("alice"), _uid("mallory")) or not RUNUSER,
    reason="needs root, runuser and the users alice and mallory",
)


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """ROOT with vision/alice prepared as the Prolog does; traversable by the test users."""
    import tempfile

    from slurm_plugin.node import ckptdir

    base = Path(tempfile.mkdtemp(prefix="sg-ckpt-", dir="/tmp"))
    base.chmod(0o755)
    root = base / "ckpt"
    notes = ckptdir.prepare_dirs(str(root), ["vision"], "alice", uid("alice"), uid("alice"))
    assert notes == [f"made the checkpoint root {root} (root:root 0755)"]
    yield root
    shutil.rmtree(base, ignore_errors=True)


LIB = ("import json, sys\n"
       "from slurm_plugin import checkpoint as ckpt\n"
       "try:\n"
       "    state = ckpt.load_json(default={'step': 0})\n"
       "    ck = ckpt.save_json(state['step'] + 1, {'step': state['step'] + 1})\n"
       "    print(json.dumps({'path': str(ck.path), 'step': ck.step}))\n"
       "except ckpt.CheckpointError as e:\n"
       "    print(e, file=sys.stderr); sys.exit(2)\n")


def as_user(user: str, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1",
             **env}
    return subprocess.run([RUNUSER, "-u", user, "--", sys.executable, "-c", code], env=clean,
                          cwd="/", capture_output=True, text=True, timeout=60)


@as_root
def test_the_library_works_in_the_prolog_made_directory(shared: Path) -> None:
    job = shared / "vision" / "alice" / "train"
    p = as_user("alice", LIB, SLURMGATE_CKPT_DIR=str(job), SLURM_JOB_ID="101")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f'{{"path": "{job}/step-00000001", "step": 1}}'
    st = os.lstat(job)
    assert (st.st_uid, stat_mode(job)) == (uid("alice"), 0o700)
    assert (job / ".active").read_text() == "101\n"
    # the same job again (a requeue, or another `slurmgate ckpt` call): resumes
    p = as_user("alice", LIB, SLURMGATE_CKPT_DIR=str(job), SLURM_JOB_ID="101")
    assert p.returncode == 0 and '"step": 2' in p.stdout, p.stderr


def stat_mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@as_root
def test_the_library_refuses_a_planted_directory(shared: Path) -> None:
    mine = shared / "vision" / "alice"
    mine.rmdir()
    mine.mkdir(mode=0o755)
    os.chown(mine, uid("mallory"), uid("mallory"))
    planted = mine / "train"
    planted.mkdir()
    os.chown(planted, uid("mallory"), uid("mallory"))
    env = {"SLURMGATE_CKPT_DIR": str(planted), "SLURM_JOB_ID": "101"}
    p = as_user("alice", LIB, **env)
    assert p.returncode == 2 and p.stdout == ""
    assert (f"refusing checkpoint directory {planted}: {mine} is owned by uid "
            f"{uid('mallory')}, not you (uid {uid('alice')})") in p.stderr
    # the CLI says the same and exits 2
    cli = "import sys; from slurm_plugin.checkpoint import main; sys.exit(main(['load']))"
    p = as_user("alice", cli, **env)
    assert p.returncode == 2 and f"is owned by uid {uid('mallory')}, not you" in p.stderr
    # the job directory itself planted inside alice's own directory is refused too
    os.chown(mine, uid("alice"), uid("alice"))
    p = as_user("alice", LIB, **env)
    assert p.returncode == 2
    assert f"{planted} is owned by uid {uid('mallory')}, not you (uid {uid('alice')})" \
        in p.stderr


@as_root
def test_the_library_refuses_a_symlink(shared: Path) -> None:
    mine = shared / "vision" / "alice"
    mine.rmdir()
    loot = shared.parent / "loot"
    loot.mkdir(mode=0o777)
    loot.chmod(0o777)
    os.chown(loot, uid("mallory"), -1)
    mine.symlink_to(loot)
    p = as_user("alice", LIB, SLURMGATE_CKPT_DIR=str(mine / "train"), SLURM_JOB_ID="101")
    assert p.returncode == 2
    assert f"refusing checkpoint directory {mine / 'train'}: {mine} is a symlink" in p.stderr
    assert os.listdir(loot) == []


@as_root
def test_the_library_refuses_a_world_writable_root(shared: Path) -> None:
    shared.chmod(0o1777)
    p = as_user("alice", LIB, SLURMGATE_CKPT_DIR=str(shared / "vision" / "alice" / "t"))
    assert p.returncode == 2
    assert f"{shared} is writable by others (mode 1777)" in p.stderr


def test_chosen_and_fallback_directories_are_checked(cdir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ckpt.CheckpointError, match=f"{link} is a symlink"):
        ckpt.save_bytes(1, b"x", directory=link)
    with pytest.raises(ckpt.CheckpointError, match=f"{link} is a symlink"):
        ckpt.latest(link)
    real.chmod(0o777)
    with pytest.raises(ckpt.CheckpointError, match=r"is writable by others \(mode 0777\)"):
        ckpt.save_bytes(1, b"x", directory=real)
    assert os.listdir(real) == []
    monkeypatch.setenv("SLURMGATE_CKPT_DIR", str(link))
    with pytest.raises(ckpt.CheckpointError, match=f"{link} is a symlink"):
        ckpt.checkpoint_dir()
    # a symlink above the directory (yours, or the admin's) is followed; what it leads to is
    # checked like any other directory
    monkeypatch.setenv("SLURMGATE_CKPT_DIR", str(link / "sub"))
    with pytest.raises(ckpt.CheckpointError, match=f"{link} is writable by others"):
        ckpt.checkpoint_dir()
    real.chmod(0o700)
    assert ckpt.checkpoint_dir() == link / "sub" and (real / "sub").is_dir()
    # the fallback: $SLURM_SUBMIT_DIR/.ckpt/$SLURM_JOB_ID, walked the same way
    monkeypatch.delenv("SLURMGATE_CKPT_DIR")
    submit = tmp_path / "submit"
    submit.mkdir()
    monkeypatch.setenv("SLURM_SUBMIT_DIR", str(submit))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    (submit / ".ckpt").symlink_to(real)
    with pytest.raises(ckpt.CheckpointError, match=r"\.ckpt is a symlink"):
        ckpt.checkpoint_dir()
    (submit / ".ckpt").unlink()
    assert ckpt.checkpoint_dir() == submit / ".ckpt" / "4243"
    assert stat_mode(submit / ".ckpt" / "4243") == 0o700


@as_root
def test_root_refuses_a_directory_of_another_user(cdir: Path, tmp_path: Path) -> None:
    """Even root (the caller here) does not resume from a directory someone else owns."""
    other = tmp_path / "theirs"
    other.mkdir(mode=0o700)
    os.chown(other, uid("mallory"), -1)
    with pytest.raises(ckpt.CheckpointError,
                       match=f"{other} is owned by uid {uid('mallory')}, not you \\(uid 0\\)"):
        ckpt.load_json(directory=other)


# -- one job per directory -------------------------------------------------------------------------


def test_two_running_jobs_with_one_name_get_two_directories(
        cdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    running = {"101"}
    asked: list[str] = []

    def alive(job: str) -> bool:
        asked.append(job)
        return job in running

    monkeypatch.setattr(ckpt, "job_alive", alive)
    monkeypatch.setattr(ckpt, "_noted", set())
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    assert ckpt.checkpoint_dir() == cdir
    ckpt.save_json(1, {"job": 101})
    assert (cdir / ".active").read_text() == "101\n" and asked == []
    # a second job with the same name starts while 101 runs
    monkeypatch.setenv("SLURM_JOB_ID", "102")
    own = cdir.with_name("ckpt.102")
    assert ckpt.checkpoint_dir() == own
    err = capsys.readouterr().err
    assert "warning: job 101 with the same name is still running" in err and str(own) in err
    assert ckpt.load_json() is None  # does not resume from the running job's checkpoints
    ckpt.save_json(1, {"job": 102})
    assert ckpt.load_json() == {"job": 102} and ckpt.load_json(directory=cdir) == {"job": 101}
    assert (own / ".active").read_text() == "102\n" and stat_mode(own) == 0o700
    # each `slurmgate ckpt` call is a new process: the same answer, even once 101 ended
    running.clear()
    assert ckpt.checkpoint_dir() == own
    assert (cdir / ".active").read_text() == "101\n"


def test_a_resubmitted_job_resumes_after_the_first_ended(
        cdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(ckpt, "job_alive", lambda job: False)
    monkeypatch.setenv("SLURM_JOB_ID", "201")
    ckpt.save_json(5, {"step": 5})
    monkeypatch.setenv("SLURM_JOB_ID", "202")  # resubmitted by name: 201 is over
    assert ckpt.checkpoint_dir() == cdir and ckpt.load_json() == {"step": 5}
    assert (cdir / ".active").read_text() == "202\n"
    assert "warning" not in capsys.readouterr().err
    # a requeue of 202 (same job id): its own claim, no question to Slurm
    monkeypatch.setattr(ckpt, "job_alive", lambda job: pytest.fail(f"asked about {job}"))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert ckpt.checkpoint_dir() == cdir


def test_a_claim_changed_meanwhile_is_not_taken_over(cdir: Path) -> None:
    cdir.mkdir()
    (cdir / ".active").write_text("301\n")
    assert not ckpt._take_over(cdir, "300", "302")  # someone took 300's claim first
    assert (cdir / ".active").read_text() == "301\n"
    assert ckpt._take_over(cdir, "301", "302")
    assert (cdir / ".active").read_text() == "302\n"
    assert [n for n in os.listdir(cdir) if n != ".active"] == []  # no temp file left


def test_slurm_is_asked_whether_the_holder_still_runs(cdir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The real check (`squeue -h -j ID -o %T`), from separate `slurmgate ckpt` processes."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "squeue").write_text('#!/bin/sh\n[ "$3" = 401 ] && echo RUNNING\n'
                                 '[ "$3" = 402 ] && echo COMPLETED\n'
                                 '[ "$3" = 403 ] && { echo "slurm_load_jobs error" >&2; exit 1; }'
                                 "\nexit 0\n")
    (fake / "squeue").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "SLURMGATE_CKPT_DIR": str(cdir)}

    def cli(job: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "slurm_plugin.checkpoint", *argv],
                              env={**env, "SLURM_JOB_ID": job}, capture_output=True, text=True,
                              timeout=60)

    for holder, expect in (("401", cdir.with_name("ckpt.500")), ("402", cdir),
                           ("403", cdir)):
        cdir.mkdir(exist_ok=True)
        (cdir / ".active").write_text(f"{holder}\n")
        p = cli("500", "dir")
        assert p.returncode == 0 and p.stdout == f"{expect}\n", (holder, p.stderr)
        assert ("still running" in p.stderr) == (holder == "401")
        shutil.rmtree(cdir.with_name("ckpt.500"), ignore_errors=True)
