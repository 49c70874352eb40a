"""The policy daemon as a real process on a real Unix socket (no Slurm needed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from slurm_plugin.protocol import call
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = (REPO / "contrib/examples/policy.toml").read_text()


def render_policy(state: Path, text: str = EXAMPLE) -> str:
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "socket":
            line = f'socket = "{state}/sg.sock"'
        elif key == "database":
            line = f'database = "{state}/sg.db"'
        elif key == "spool_dir":
            line = f'spool_dir = "{state}/spool"'
        elif key == "log_file":
            line = f'log_file = "{state}/daemon.log"'
        elif key == "backend" and '"real"' in line:
            line = 'backend = "fake"'
        lines.append(line)
    return "\n".join(lines) + "\n"


class RunningDaemon:
    def __init__(self, state: Path):
        self.state = state
        self.config = state / "policy.toml"
        self.socket = str(state / "sg.sock")
        self.log = state / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slurm_plugin.cli", "--config", str(self.config), "daemon"],
            env=env, stdout=subprocess.DEVNULL,
            stderr=(self.state / "stderr").open("w"),  # noqa: SIM115 (the child keeps it)
        )
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None,
                 15, what="daemon socket")
        assert self.proc.poll() is None, (self.state / "stderr").read_text()

    def ask(self, **req) -> dict:
        return call(self.socket, req, timeout=5)

    def raw(self, payload: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.socket)
            s.sendall(payload)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return buf

    def log_events(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def daemon():
    # Not under pytest's tmp_path: that is private to root, and one test connects as nobody.
    state = Path(tempfile.mkdtemp(prefix="sg-daemon-"))
    os.chmod(state, 0o755)
    d = RunningDaemon(state)
    d.config.write_text(render_policy(state))
    d.start()
    yield d
    d.stop()
    shutil.rmtree(state, ignore_errors=True)


def submit(d: RunningDaemon, **job) -> dict:
    job.setdefault("user", "alice")
    return d.ask(op="submit", id=7, job=job)


def test_ping_and_decisions(daemon):
    assert daemon.ask(op="ping")["ok"] is True
    ok = submit(daemon, comment="project=vit-scaling,cost_center=CC42", time_limit=60)
    assert ok["verdict"] == "accept" and ok["id"] == 7
    assert ok["set"]["admin_comment"].startswith("slurmgate:team=vision;rid=r")
    bad = submit(daemon, comment="project=vit-scaling")
    assert bad["verdict"] == "reject"
    assert "missing required tag 'cost_center'" in bad["msg"]
    decisions = [e for e in daemon.log_events() if e["event"] == "decision"]
    assert [e["verdict"] for e in decisions] == ["accept", "reject"]
    assert decisions[0]["team"] == "vision" and decisions[0]["user"] == "alice"
    assert "cost_center" in decisions[1]["reason"]


def _as_nobody(sock_path: str, payload: bytes) -> bytes:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, ask, report through the pipe
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(sock_path)
                s.sendall(payload)
                os.write(w, s.recv(65536))
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out


def test_only_slurmuser_or_root_may_ask_for_decisions(daemon):
    req = (b'{"v":1,"op":"submit","id":1,"job":{"user":"alice",'
           b'"comment":"project=vit-scaling,cost_center=CC1"}}\n')
    resp = json.loads(_as_nobody(daemon.socket, req))
    assert resp["ok"] is False
    assert "accepted only from root or the SlurmUser" in resp["error"]
    assert "verdict" not in resp
    ping = json.loads(_as_nobody(daemon.socket, b'{"v":1,"op":"ping"}\n'))
    assert ping["ok"] is True and ping["you"] == "nobody"
    assert any(e["event"] == "forbidden" for e in daemon.log_events())


@pytest.mark.parametrize(
    "payload",
    [
        b"not json\n",
        b"[1,2,3]\n",
        b'{"v":99,"op":"submit"}\n',
        b'{"v":1}\n',
        b'{"v":1,"op":"submit","job":"a string"}\n',
        b'{"v":1,"op":"submit","job":{"user":"alice","comment":"project=\xff\xfe,cost_center=CC1"}}\n',
        b'{"v":1,"op":"submit","job":{"user":"alice","comment":"project=\\"; os.exit(1) --"}}\n',
        b'{"v":1,"op":"submit","job":{"user":"alice","comment":"project=a\\nb,cost_center=CC12"}}\n',
        b'{"v":1,"op":"submit","job":{"user":"alice","time_limit":"60","min_nodes":1e308}}\n',
        b'{"v":1,"op":"nonsense"}\n',
        b"\n",
    ],
)
def test_hostile_input_gets_an_answer_and_never_an_accept(daemon, payload):
    resp = json.loads(daemon.raw(payload))
    assert resp.get("verdict") != "accept"
    assert resp.get("verdict") == "reject" or resp["ok"] is False
    assert daemon.ask(op="ping")["ok"] is True


def test_huge_comment_is_rejected_clearly(daemon):
    resp = submit(daemon, comment="project=vit-scaling,cost_center=CC1," + "x" * 100_000)
    assert resp["verdict"] == "reject"
    assert "the limit is 1024" in resp["msg"]


def test_oversized_line_is_refused_and_daemon_survives(daemon):
    resp = json.loads(daemon.raw(b'{"v":1,"op":"ping","pad":"' + b"a" * (2 << 20) + b'"}\n'))
    assert resp["ok"] is False and "longer than" in resp["error"]
    assert daemon.ask(op="ping")["ok"] is True


def test_invalid_policy_on_sighup_keeps_the_old_one(daemon):
    bad = render_policy(daemon.state).replace('unknown = "warn"', 'unknown = "sometimes"')
    daemon.config.write_text(bad)
    daemon.proc.send_signal(signal.SIGHUP)
    failed = wait_for(
        lambda: [e for e in daemon.log_events() if e["event"] == "policy_reload_failed"],
        10, what="reload failure in the log")
    assert "tags.unknown" in failed[0]["error"]
    resp = submit(daemon, comment="project=vit-scaling")
    assert resp["verdict"] == "reject" and "cost_center" in resp["msg"]
    # a valid change takes effect
    daemon.config.write_text(render_policy(daemon.state).replace(
        'required = ["project", "cost_center"]', 'required = ["project"]'))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e["event"] == "policy_reloaded" for e in daemon.log_events()), 10,
             what="reload in the log")
    assert submit(daemon, comment="project=vit-scaling")["verdict"] == "accept"


def test_daemon_refuses_to_start_with_an_invalid_policy(tmp_path):
    bad = tmp_path / "policy.toml"
    bad.write_text("[tags]\nunknown = 'sometimes'\n")
    out = subprocess.run(
        [sys.executable, "-m", "slurm_plugin.cli", "--config", str(bad), "daemon"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 2
    assert f"{bad}: invalid policy" in out.stderr and "tags.unknown" in out.stderr


def test_daemon_serves_prometheus_metrics_on_localhost_when_asked():
    state = Path(tempfile.mkdtemp(prefix="sg-metrics-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = RunningDaemon(state)
    d.config.write_text(render_policy(state).replace(
        "[daemon]\n", f'[daemon]\nmetrics_listen = "127.0.0.1:{port}"\n', 1))
    d.start()
    try:
        submit(d, comment="project=vit-scaling,cost_center=CC42", time_limit=60)
        submit(d, comment="nope")
        body = wait_for(lambda: _get(f"http://127.0.0.1:{port}/metrics"), 10,
                        what="metrics endpoint")
        assert 'slurmgate_decisions_total{verdict="accept"} 1' in body
        assert 'slurmgate_decisions_total{verdict="reject"} 1' in body
        assert "slurmgate_decision_latency_seconds_count 2" in body
        assert 'slurmgate_budget_used{team="vision"}' in body
    finally:
        d.stop()
        shutil.rmtree(state, ignore_errors=True)


def _get(url: str) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read().decode()
    except OSError:
        return None


# -- in process: the reconcile loop and `slurmgate reconcile` share one vanished-job rule ----


class _Queue:
    """Slurm's queue and nothing else (the reconcile loop only reads it)."""

    def __init__(self, jobs: list) -> None:
        self.listed = jobs

    def jobs(self, job_ids=None) -> list:  # noqa: ANN001
        return list(self.listed)


def test_reconcile_loop_and_reconcile_command_agree_on_vanished_jobs(tmp_path):
    import time

    from db.store import open_store
    from policies.reservations import release_reason, vanished_grace
    from slurm_plugin.daemon.reconcile import find_gaps
    from slurm_plugin.daemon.service import Daemon
    from slurm_plugin.slurm.client import Job
    from tests.unit.test_db_ingest import make_policy, reserve

    policy = make_policy(daemon={"cluster": "c1", "log_file": str(tmp_path / "log"),
                                 "reconcile_seconds": 60})
    grace = vanished_grace(policy.daemon.reconcile_seconds)
    assert grace == 180.0  # three rounds of 60 s, more than the 120 s minimum
    store = open_store(tmp_path / "sg.db")
    now = time.time()
    listed = reserve(store, None, created_at=now - 10 * grace)
    gone = reserve(store, 41, created_at=now - grace - 30)
    never = reserve(store, None, created_at=now - grace - 30)
    young = reserve(store, 43, created_at=now - grace + 30)
    queue = _Queue([Job(job_id=40, state="RUNNING",
                        admin_comment=f"slurmgate:team=vision;rid={listed}")])

    gaps = find_gaps(store, queue.jobs(), "c1", now, grace)
    assert {r["rid"] for r in gaps["reservations_without_job"]} == {gone, never}

    daemon = Daemon(str(tmp_path / "policy.toml"), policy, store, queue)
    for rid in (gone, never, young):  # missing from the queue for a while already
        daemon.missing_since[rid] = now - 10 * grace
    assert daemon.reconcile_once() == {"bound": 1, "released": 2}
    states = {rid: store.reservation(rid) for rid in (listed, gone, never, young)}
    assert states[listed]["state"] == "bound" and states[listed]["job_id"] == 40
    assert states[young]["state"] == "bound"  # within the grace: kept
    assert (states[gone]["state"], states[gone]["reason"]) == ("released", release_reason(41))
    assert (states[never]["state"], states[never]["reason"]) == (
        "released", release_reason(None))
    assert "never appeared" in release_reason(None)
    assert find_gaps(store, queue.jobs(), "c1", now, grace)["reservations_without_job"] == []
    store.close()


def test_failure_handler_reads_through_the_locked_store(tmp_path):
    """The failure handler's store is a FailureStore behind the daemon's lock."""
    import threading

    from db.store import open_store
    from slurm_plugin.daemon.requeue import FailureHandler
    from slurm_plugin.daemon.seams import FailureStore, LockedStore
    from slurm_plugin.slurm.client import Job, Node
    from tests.unit.test_db_ingest import make_policy

    class Slurm(_Queue):
        def __init__(self) -> None:
            super().__init__([])
            self.drained: list[tuple[str, str]] = []

        def nodes(self) -> list:
            return [Node(name="node1", state="down")]

        def job(self, job_id: int):  # noqa: ANN201
            return None

        def drain(self, node: str, reason: str) -> None:
            self.drained.append((node, reason))

    policy = make_policy(requeue={"drain_after_failures": 2, "drain_window_hours": 24})
    store = open_store(tmp_path / "sg.db")
    lock = threading.RLock()
    locked: FailureStore = LockedStore(store, lock)
    slurm = Slurm()
    handler = FailureHandler(locked, slurm, lambda: policy, lambda *a, **k: None)
    for job_id in (1, 2):
        rec = {"kind": "jobcomp", "cluster": "c1", "job_id": job_id, "state": "NODE_FAIL",
               "nodes": "node1", "end_ts": 100.0 + job_id}
        handler.handle([rec])
        handler.handle([rec])  # the same record again acts once
    assert store.event_count("node_fail") == 2
    assert [n for n, _ in slurm.drained] == ["node1"]
    assert store.last_drain_ts("c1", "node1") is not None
    running = [Job(job_id=1, state="RUNNING", restart_count=1, start_ts=200.0)]
    assert handler.note_recoveries(running) == 1
    assert handler.note_recoveries(running) == 0  # recorded once
    assert store.unrecovered_interruptions(0.0)[0]["job_id"] == 2
    store.close()
