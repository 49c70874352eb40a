"""The policy daemon as a real process on a real Unix socket (no Slurm needed)."""

from __future__ import annotations

import json
import os
import pwd
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
    # submissions are decided for the authenticated submit uid: uid 1 ("daemon", on every
    # Debian system) stands for a member of team vision
    return "\n".join(lines) + '\n[users]\ndaemon = "vision"\n'


MEMBER_UID = 1


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
    job.setdefault("uid", MEMBER_UID)
    return d.ask(op="submit", id=7, job=job)


def test_ping_and_decisions(daemon):
    assert daemon.ask(op="ping")["ok"] is True
    ok = submit(daemon, comment="project=vit-scaling,cost_center=CC42", time_limit=60)
    assert ok["verdict"] == "accept" and ok["id"] == 7
    assert ok["set"]["admin_comment"].startswith("slurmgate:v2;team=vision;rid=r")
    bad = submit(daemon, comment="project=vit-scaling")
    assert bad["verdict"] == "reject"
    assert "missing required tag 'cost_center'" in bad["msg"]
    decisions = [e for e in daemon.log_events() if e["event"] == "decision"]
    assert [e["verdict"] for e in decisions] == ["accept", "reject"]
    assert decisions[0]["team"] == "vision" and decisions[0]["user"] == "daemon"
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
    req = (b'{"v":1,"op":"submit","id":1,"job":{"uid":1,'
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
        b'{"v":1,"op":"submit","job":{"uid":1,"comment":"project=\xff\xfe,cost_center=CC1"}}\n',
        b'{"v":1,"op":"submit","job":{"uid":1,"comment":"project=\\"; os.exit(1) --"}}\n',
        b'{"v":1,"op":"submit","job":{"uid":1,"comment":"project=a\\nb,cost_center=CC12"}}\n',
        b'{"v":1,"op":"submit","job":{"uid":1,"time_limit":"60","min_nodes":1e308}}\n',
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
    token = state / "metrics.token"
    token.write_text("t0ken-for-the-scraper\n")
    token.chmod(0o600)
    d.config.write_text(render_policy(state).replace(
        "[daemon]\n", f'[daemon]\nmetrics_listen = "127.0.0.1:{port}"\n'
                      f'metrics_token_file = "{token}"\n', 1))
    d.start()
    try:
        submit(d, comment="project=vit-scaling,cost_center=CC42", time_limit=60)
        submit(d, comment="nope")
        body = wait_for(lambda: _get(f"http://127.0.0.1:{port}/metrics",
                                     "t0ken-for-the-scraper"), 10, what="metrics endpoint")
        assert _get(f"http://127.0.0.1:{port}/metrics") is None  # no token: 401
        assert 'slurmgate_decisions_total{verdict="accept"} 1' in body
        assert 'slurmgate_decisions_total{verdict="reject"} 1' in body
        assert "slurmgate_decision_latency_seconds_count 2" in body
        assert 'slurmgate_budget_used{team="vision"}' in body
    finally:
        d.stop()
        shutil.rmtree(state, ignore_errors=True)


def _get(url: str, token: str | None = None) -> str | None:
    import urllib.request

    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
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
        def __init__(self) -> None:  # Slurm confirms: both jobs ended NODE_FAIL, node1 down
            super().__init__([Job(job_id=j, state="NODE_FAIL", nodes="node1") for j in (1, 2)])
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


# -- the daemon's spool: layout at start, hostile entries, migration, maintenance -----------


def _spool_daemon(tmp_path, **daemon_settings):  # noqa: ANN001, ANN202
    from db.store import open_store
    from slurm_plugin.daemon.service import Daemon
    from tests.unit.test_db_ingest import make_policy

    spool_dir = tmp_path / "spool"
    if not spool_dir.exists():
        spool_dir.mkdir()
        os.chmod(spool_dir, 0o755)
    policy = make_policy(daemon={"cluster": "c1", "log_file": str(tmp_path / "log"),
                                 "spool_dir": str(spool_dir), **daemon_settings})
    store = open_store(tmp_path / "sg.db")
    return Daemon(str(tmp_path / "policy.toml"), policy, store, None), store, spool_dir


def _events(store, kind):  # noqa: ANN001, ANN202
    return [e["message"] for e in store._query(
        "SELECT message FROM events WHERE kind = :kind ORDER BY id", {"kind": kind})]


def test_one_bad_record_never_stalls_ingest_and_good_ones_ingest_once(tmp_path):
    import time

    from slurm_plugin.node import spool
    from tests.unit.test_db_ingest import make_jobcomp, make_node_run

    d, store, root = _spool_daemon(tmp_path)
    d.spool_startup()
    assert (root / "ctld" / "tmp").is_dir() and (root / "quarantine").is_dir()
    before = spool.write_record(root, make_node_run(980))
    time.sleep(0.01)
    hostile = {
        "node_run.c1.1.0.n.deep.json": b"[" * 30_000 + b"]" * 30_000,
        "node_run.c1.2.0.n.digits.json": b'{"v":1,"kind":"node_run","job_id":' + b"9" * 5000
        + b"}",
        "node_run.c1.3.0.n.utf8.json": b'{"v":1,"kind":"node_run","node":"\xff\xfe"}',
        "jobcomp.c1.4.-.ctl.misplaced.json": spool.encode_record(spool.prepare_record(
            make_jobcomp(4))),
    }
    for name, data in hostile.items():
        (root / "node" / name).write_bytes(data)
    os.mkfifo(root / "node" / "node_run.c1.5.0.n.fifo.json")
    os.symlink("/etc/shadow", root / "node" / "node_run.c1.6.0.n.link.json")
    theirs = spool.write_record(root, make_node_run(7))
    alice = pwd.getpwnam("alice").pw_uid  # 1001 on a Debian 12 host, 1000 in a fresh chroot
    os.chown(theirs, alice, -1)
    time.sleep(0.01)
    after = spool.write_record(root, make_jobcomp(980))
    for _ in range(3):
        d.ingest_once()
    assert [r["state"] for r in store.runs_of_job("c1", 980)] == ["COMPLETED"]
    assert len(store.run_nodes("c1", 980, 0)) == 1
    assert not before.exists() and not after.exists()
    assert sorted(os.listdir(root / "node")) == ["tmp"]
    q = root / "quarantine"
    names = sorted(p.name for p in q.iterdir() if not p.name.endswith(".reason"))
    assert len(names) == 7 and all((q / (n + ".reason")).exists() for n in names)
    reasons = " | ".join((q / (n + ".reason")).read_text() for n in names)
    for expected in ("nested too deeply", "digits", "not UTF-8", "a jobcomp record in node/",
                     "a FIFO", "a symbolic link", f"owned by uid {alice} (alice)"):
        assert expected in reasons, expected
    assert len(_events(store, "quarantine")) == 7
    log = (tmp_path / "log").read_text()
    assert log.count('"quarantined"') == 7 and "node_run.c1.6.0.n.link.json" in log
    assert d.ingest_once() == 0  # nothing left, nothing read twice


def test_startup_refuses_a_bad_layout_and_does_not_ingest_from_it(tmp_path):
    from slurm_plugin.node import spool
    from tests.unit.test_db_ingest import make_jobcomp, make_node_run

    d, store, root = _spool_daemon(tmp_path)
    spool.write_record(root, make_node_run(990))
    spool.write_record(root, make_jobcomp(991))
    os.chown(root / "node", 1001, -1)  # someone else's node/
    d.spool_startup()
    assert "node" in d.spool_problems and "owned by uid 1001" in d.spool_problems["node"]
    assert any("refused" in m for m in _events(store, "spool_layout"))
    assert "spool_layout_refused" in (tmp_path / "log").read_text()
    d.ingest_once()
    assert store.runs_of_job("c1", 990) == [] and len(store.runs_of_job("c1", 991)) == 1
    assert len(list((root / "node").glob("*.json"))) == 1  # left alone, not chmod-ed
    assert os.stat(root / "node").st_uid == 1001
    os.chown(root / "node", 0, -1)  # the admin fixes it: the next check takes it back
    d.spool_maintenance(force=False, now=d.last_spool_maintenance + 61)
    assert d.spool_problems == {}
    d.ingest_once()
    assert len(store.runs_of_job("c1", 990)) == 1


def test_old_layout_records_are_ingested_once_at_start(tmp_path):
    from slurm_plugin.node import spool
    from tests.unit.test_db_ingest import make_jobcomp, make_node_run

    d, store, root = _spool_daemon(tmp_path)
    old_jc = root / "jobcomp.c1.995.-.ctl.aa.json"
    old_jc.write_bytes(spool.encode_record(spool.prepare_record(make_jobcomp(995))))
    old_node = root / "node_run.c1.995.0.node1.bb.json"
    old_node.write_bytes(spool.encode_record(spool.prepare_record(make_node_run(995))))
    os.chown(old_node, 64030, -1)  # the SlurmUser's: accepted once
    forged = root / "jobcomp.c1.996.-.ctl.cc.json"
    forged.write_bytes(spool.encode_record(spool.prepare_record(make_jobcomp(996))))
    os.chown(forged, 1001, -1)
    d.spool_startup()
    [run] = store.runs_of_job("c1", 995)
    assert run["state"] == "COMPLETED" and len(store.run_nodes("c1", 995, 0)) == 1
    assert store.runs_of_job("c1", 996) == []
    assert not old_jc.exists() and not old_node.exists() and not forged.exists()
    assert "owned by uid 1001" in (root / "quarantine" / (forged.name + ".reason")).read_text()
    again = root / "jobcomp.c1.997.-.ctl.dd.json"  # after start: never read from the top
    again.write_bytes(spool.encode_record(spool.prepare_record(make_jobcomp(997))))
    d.ingest_once()
    assert store.runs_of_job("c1", 997) == [] and again.exists()


def test_maintenance_recovers_tmp_and_prunes_the_quarantine(tmp_path):
    import time

    from slurm_plugin.node import spool
    from tests.unit.test_db_ingest import make_jobcomp

    d, store, root = _spool_daemon(tmp_path, quarantine_days=1.0)
    d.spool_startup()
    rec = spool.prepare_record(make_jobcomp(998))
    stranded = root / "ctld" / "tmp" / (spool.record_filename(rec) + ".tmp")
    stranded.write_bytes(spool.encode_record(rec))
    os.utime(stranded, (time.time() - 120, time.time() - 120))
    old = root / "quarantine" / "old.json"
    old.write_text("x")
    (root / "quarantine" / "old.json.reason").write_text("x")
    for p in (old, root / "quarantine" / "old.json.reason"):
        os.utime(p, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    d.spool_maintenance(force=True)
    assert not stranded.exists() and list((root / "quarantine").iterdir()) == []
    d.ingest_once()
    assert len(store.runs_of_job("c1", 998)) == 1
    log = (tmp_path / "log").read_text()
    assert "spool_tmp_recovered" in log and "quarantine_pruned" in log


def test_a_second_settlement_from_another_writer_is_quarantined(tmp_path):
    from slurm_plugin.node import spool
    from tests.unit.test_db_ingest import make_jobcomp

    d, store, root = _spool_daemon(tmp_path)
    d.spool_startup()
    spool.write_record(root, make_jobcomp(999))
    d.ingest_once()
    repair = dict(make_jobcomp(999, state="FAILED", end=make_jobcomp(999)["end_ts"] + 600),
                  source="reconcile")
    path = spool.write_record(root, repair)
    d.ingest_once()
    [run] = store.runs_of_job("c1", 999)
    assert (run["state"], run["settled_by"]) == ("COMPLETED", "ctld")
    reason = (root / "quarantine" / (path.name + ".reason")).read_text()
    assert "settled by ctld; a jobcomp from repair may not settle it again" in reason
