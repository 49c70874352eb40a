"""The idle-GPU scan and the alert scan together, as the daemon wires them: the events the scan
writes reach the job's user as mail at a real SMTP server (aiosmtpd on 127.0.0.1) with the job
id, the idle minutes and the cost so far, once each; busy and exempt jobs raise nothing. Also
the alert thread's cadence: turning alerts on by a reload starts at once and does not mail
what happened while they were off."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from db import ingest_records
from db.alert_log import AlertLog
from db.reports import events
from db.store import Store, open_store
from policies import records
from policies.config import Policy
from policies.cost import format_money
from policies.idle import format_minutes
from slurm_plugin.alerts.dispatch import Dispatcher, store_spend
from slurm_plugin.daemon.alerting import make_dispatcher
from slurm_plugin.daemon.idle import IdleScan
from slurm_plugin.daemon.service import Daemon
from slurm_plugin.node import spool
from slurm_plugin.slurm.client import Job
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tests.unit.alert_servers import Received, SmtpSink
from tests.waiting import wait_for

START = 1_800_000_000.0
SAMPLE_S = 2.0


def make_policy(tmp_path: Path, smtp: SmtpSink, *, alerts: bool = True,
                database: str | None = None) -> Policy:
    """Short thresholds, as the cluster test uses: warn at 12 s idle, cancel at 30 s."""
    return Policy.model_validate({
        "daemon": {"cluster": "c1", "admins": ["root"], "log_file": str(tmp_path / "d.log"),
                   "database": database or str(tmp_path / "sg.db")},
        "teams": {"vision": {"accounts": ["vis"], "members": ["alice", "carol"],
                             "leads": ["carol"]},
                  "nlp": {"accounts": ["nlp"], "members": ["bob"]}},
        "rates": {"currency": "$", "gpu_hour": {"a100": 2.5, "h100": 4.0}},
        "partitions": {"gpu": {"default_gpu_type": "a100"}},
        "nvml": {"sample_seconds": SAMPLE_S},
        "idle": {"enabled": True, "threshold_percent": 5, "warn_after_minutes": [0.2],
                 "act_after_minutes": 0.5, "action": "cancel", "scan_seconds": 1,
                 "exempt_users": ["carol"]},
        "alerts": {"enabled": alerts, "smtp_host": "127.0.0.1", "smtp_port": smtp.port,
                   "tls": "none", "sender": "slurmgate@example.org",
                   "mail_domain": "example.org", "budget_thresholds": [],
                   "scan_seconds": 1, "retry_seconds": 1},
    })


@pytest.fixture
def smtp():
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def store(ledger_target: str) -> Any:
    s = open_store(ledger_target)
    yield s
    s.close()


def running(slurm: SyntheticSlurm, user: str, account: str, gpus: int, node: str) -> Job:
    return slurm.add_job(state="RUNNING", user=user, account=account, gpus=float(gpus),
                         nodes=node, start_ts=START, partition="gpu", gpu_type="a100", cpus=0,
                         node_count=1)


def sample(store: Store, policy: Policy, job: Job, util: float, until: float) -> None:
    """The agent's samples of ``job``'s GPUs from its start to ``until``, every SAMPLE_S."""
    recs = []
    ts = START + SAMPLE_S / 2
    while ts < until:
        gpus = [records.sample_gpu(uuid=f"GPU-{job.job_id}-{i}", index=i, gpu_type="a100",
                                   util=util, mem_used_bytes=0, power_w=None,
                                   job_id=job.job_id) for i in range(int(job.gpus))]
        recs.append(spool.prepare_record(records.gpu_sample_record(
            cluster="c1", node=job.nodes or "", ts=ts, gpus=gpus)))
        ts += SAMPLE_S
    assert ingest_records(store, recs, policy).errors == []


def about(mails: list[Received], job_id: int) -> list[Received]:
    return [m for m in mails if f"job {job_id}" in str(m.message["Subject"])]


def test_the_idle_jobs_user_is_mailed_the_warning_and_the_action_once_each(
        tmp_path: Path, store: Store, smtp: SmtpSink) -> None:
    policy = make_policy(tmp_path, smtp, database=store.path)
    slurm = SyntheticSlurm(n_jobs=0, n_nodes=2, clock=lambda: START)
    idle = running(slurm, "alice", "vis", 2, "node1")
    busy = running(slurm, "bob", "nlp", 1, "node2")
    exempt = running(slurm, "carol", "vis", 1, "node1")
    daemon = Daemon(str(tmp_path / "policy.toml"), policy, store, slurm)
    dispatcher = make_dispatcher(daemon)
    assert dispatcher is not None
    now = START + 1
    dispatcher.clock = lambda: now
    dispatcher.round()  # the first scan starts the events cursor

    for now in (START + 20, START + 26, START + 40, START + 44):
        for job, util in ((idle, 0.0), (busy, 90.0), (exempt, 0.0)):
            sample(store, policy, job, util, now)
        IdleScan(daemon).scan(slurm.jobs(), now=now)
        dispatcher.round()
        dispatcher.round()  # nothing is sent twice

    assert slurm.job(idle.job_id).state == "CANCELLED"
    assert slurm.job(busy.job_id).state == slurm.job(exempt.job_id).state == "RUNNING"
    mails = smtp.received()
    warning, action = mails  # two mails in all, both about the idle job
    assert [str(m.message["X-Slurmgate-Alert"]) for m in mails] == ["idle_gpu_warning",
                                                                     "idle_gpu_action"]
    assert about(mails, idle.job_id) == mails
    assert about(mails, busy.job_id) == about(mails, exempt.job_id) == []
    # the warning to the job's user; the action to the user and the team's lead
    assert warning.rcpt_tos == ["alice@example.org"]
    assert action.rcpt_tos == ["alice@example.org", "carol@example.org"]
    assert not any("bob@example.org" in m.rcpt_tos for m in mails)
    logged = sorted(events(store, ["idle_warning", "idle_action"], 10), key=lambda e: e["id"])
    assert [e["kind"] for e in logged] == ["idle_warning", "idle_action"]
    for m, event in zip(mails, logged, strict=True):
        subject, body = str(m.message["Subject"]), m.message.get_content()
        minutes = format_minutes(event["detail"]["idle_minutes"])
        assert 0 < event["detail"]["idle_minutes"] < 1 and minutes.startswith("0.")
        cost = format_money(event["detail"]["cost_so_far"], "$")
        assert f"cost so far: {cost}" in body
        assert f"job {idle.job_id}" in subject and f"{minutes} minutes" in subject
        assert f"job id: {idle.job_id}" in body
        assert f"idle minutes: {minutes} minutes" in body
        assert cost.startswith("$0.0")  # 2 A100s at $2.50/h for 20-44 s: a few cents
    assert "was cancelled after 2 of 2 allocated GPUs stayed idle" in action.message.get_content()


def test_turning_alerts_on_by_a_reload_starts_at_once_without_the_history(
        tmp_path: Path, store: Store, smtp: SmtpSink) -> None:
    """The thread runs while alerts are off (a reload turns them on); it notices the reload
    within a second, however long scan_seconds is, and starts after the events that happened
    while alerts were off, also when an earlier period of alerting left a cursor behind."""
    on = make_policy(tmp_path, smtp, database=store.path).model_copy(deep=True)
    off = make_policy(tmp_path, smtp, alerts=False, database=store.path)
    current = [on]
    lock = threading.RLock()
    logged: list[dict[str, Any]] = []
    dispatcher = Dispatcher(AlertLog(store), lambda: current[0],
                            store_spend(store, lambda: current[0], lock),
                            write_log=lambda event, **kw: logged.append({"event": event, **kw}),
                            lock=lock)
    dispatcher.round()  # alerting was on once: the cursor exists
    current[0] = off
    store.add_event("idle_warning", cluster="c1", job_id=7, user="alice", team="vision",
                    message="while alerts were off",
                    detail={"idle_minutes": 65, "cost_so_far": 1.0, "currency": "$"})
    stopping = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: any(e["event"] == "alerts_off" for e in logged), 10, 0.05,
                 what="the thread seeing alerts off")
        slow = on.model_copy(update={"alerts": on.alerts.model_copy(
            update={"scan_seconds": 3600.0})})
        current[0] = slow  # the reload
        wait_for(lambda: any(e.get("reason") == "alerts turned on" for e in logged), 10,
                 0.05, what="the first round after the reload")
        store.add_event("idle_warning", cluster="c1", job_id=8, user="alice", team="vision",
                        message="after the reload",
                        detail={"idle_minutes": 70, "cost_so_far": 2.0, "currency": "$"})
        current[0] = slow.model_copy()  # another reload: a round at once
        wait_for(lambda: smtp.received(), 10, 0.05, what="the mail of job 8")
        assert [str(m.message["Subject"]) for m in smtp.received()] == [
            "[slurmgate] job 8: GPUs idle for 70 minutes"]
    finally:
        stopping.set()
        thread.join(10)
