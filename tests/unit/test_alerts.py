"""Alerts (slurm_plugin/alerts, policies/alerts.py, db/alert_log.py) against real receivers on
127.0.0.1: aiosmtpd for mail, http.server for webhooks. No stand-in for smtplib or urllib.

The dispatcher runs with a clock the test moves (retries come due without waiting); the
budget alerts read spend from a real daemon ledger over runs the real ingest settled."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from db import ingest_records, open_store
from db.alert_log import AlertLog
from db.store import Store
from policies.alerts import problems, recipients
from policies.config import Policy, parse_policy
from slurm_plugin.alerts.dispatch import BudgetSnapshot, Dispatcher, backoff
from slurm_plugin.daemon.alerting import make_dispatcher
from slurm_plugin.daemon.prometheus import Metrics
from slurm_plugin.daemon.service import Daemon
from tests.unit.alert_servers import SilentServer, SmtpSink, WebhookSink, closed_port
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
T0 = 1_790_035_200.0  # 2026-09-22 00:00 UTC
HOUR = 3600.0


def make_policy(alerts: dict[str, Any], **overrides: Any) -> Policy:
    data: dict[str, Any] = {
        "daemon": {"cluster": "c1", "admins": ["root"], "database": ":memory:"},
        "teams": {
            "vision": {"accounts": ["vis"], "members": ["vera", "carl"], "leads": ["carl"],
                       "budget": 100.0},
            "nlp": {"accounts": ["nlp"], "members": ["nora"], "leads": ["nils"],
                    "budget": 1000.0},
        },
        "rates": {"gpu_hour": {"a100": 2.0}},
        "partitions": {"gpu": {"default_gpu_type": "a100"}},
        "alerts": {"enabled": True, "mail_domain": "example.org",
                   "addresses": {"root": "hpc-ops@example.org"}, **alerts},
    }
    data.update(overrides)
    return Policy.model_validate(data)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Log:
    """The daemon's structured log, kept in memory."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})

    def of(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == event]


def settle_run(store: Store, policy: Policy, job_id: int, *, hours: float, end: float,
               user: str = "vera", account: str = "vis", gpus: int = 4) -> None:
    """One finished run of ``gpus`` a100 for ``hours`` through the real ingest (node record
    and jobcomp): $2 per GPU-hour."""
    start = end - hours * HOUR
    node = {
        "v": 1, "kind": "node_run", "record_id": uuid.uuid4().hex, "cluster": "c1",
        "written_at": end + 1, "job_id": job_id, "restart_count": 0, "node": "node1",
        "user": user, "account": account, "start_ts": start, "end_ts": end,
        "gpus": [{"index": i, "minor": i, "uuid": f"GPU-{job_id}-{i}", "gpu_type": "a100",
                  "energy_j": None, "util_mean": 90.0, "util_max": 99.0,
                  "mem_max_bytes": 2**30, "gpu_seconds": end - start} for i in range(gpus)],
    }
    jobcomp = {
        "v": 1, "kind": "jobcomp", "record_id": uuid.uuid4().hex, "cluster": "c1",
        "written_at": end + 2, "job_id": job_id, "restart_count": None, "state": "COMPLETED",
        "submit_ts": start - 60, "start_ts": start, "end_ts": end, "nodes": "node1",
        "node_count": 1, "partition": "gpu", "uid": 1001, "user": user, "account": account,
        "exit_code": "0:0", "derived_ec": "0:0", "time_limit_min": 600,
        "array_job_id": None, "array_task_id": None, "work_dir": "/tmp",
    }
    result = ingest_records(store, [node, jobcomp], policy)
    assert not result.errors and result.settled


class Site:
    """A daemon (its store on disk, its ledger, its lock, its metrics) and the alert scan
    over it, as slurm_plugin/daemon/alerting.py wires them; ``restart`` makes both anew over
    the same database (a file in ``tmp``, or ``db``: a ``ledger_target``)."""

    def __init__(self, tmp: Path, policy: Policy, clock: Clock, db: str | None = None) -> None:
        self.db = db or str(tmp / "sg.db")
        self.policy = policy.model_copy(update={
            "daemon": policy.daemon.model_copy(update={"database": self.db, "log_file": ""})})
        self.clock = clock
        self.log = Log()
        self.start()

    def start(self) -> None:
        self.store = open_store(self.db)
        self.daemon = Daemon("/nonexistent/policy.toml", self.policy, self.store)
        self.daemon.log = self.log  # type: ignore[assignment]
        self.daemon.refresh_ledger(now=self.clock())
        dispatcher = make_dispatcher(self.daemon)
        assert dispatcher is not None
        dispatcher.clock = self.clock
        self.dispatcher = dispatcher
        self.alert_log = AlertLog(self.store)

    def restart(self) -> None:
        self.store.close()
        self.start()

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy.model_copy(update={
            "daemon": policy.daemon.model_copy(update={"database": self.db, "log_file": ""})})
        self.daemon.policy = self.policy

    def settle(self, job_id: int, hours: float, **kw: Any) -> None:
        with self.daemon.lock:
            settle_run(self.store, self.policy, job_id, hours=hours, end=self.clock() - 60, **kw)
            self.daemon.refresh_ledger(now=self.clock())

    def round(self) -> dict[str, int]:
        return self.dispatcher.round()


@pytest.fixture
def smtp():
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def hook():
    with WebhookSink() as sink:
        yield sink


def mail_and_hook(smtp: SmtpSink, hook: WebhookSink, **extra: Any) -> dict[str, Any]:
    return {"smtp_host": "127.0.0.1", "smtp_port": smtp.port, "tls": "none",
            "sender": "slurmgate@example.org",
            "webhooks": [{"url": hook.url, "name": "ops-chat"}], **extra}


def subjects(smtp: SmtpSink) -> list[str]:
    return [str(m.message["Subject"]) for m in smtp.received()]


# -- policy ------------------------------------------------------------------------------------


def test_alerts_are_off_by_default_and_the_example_policy_still_validates(tmp_path: Path):
    assert Policy().alerts.enabled is False
    assert Policy().alerts.budget_thresholds == [50, 80, 90, 100]
    text = (REPO / "contrib/examples/policy.toml").read_text()
    example = parse_policy(text)
    assert problems(example.alerts) == []
    site = Site(tmp_path, example, Clock(T0))
    assert site.round() == {}  # disabled: no cursor, nothing decided, nothing sent
    assert site.alert_log.cursor("events") is None and site.alert_log.alerts() == []


def test_recipients_are_resolved_per_kind():
    policy = make_policy({"recipients": {"node_drained": ["admins", "facilities@example.org"],
                                         "job_held": ["job_user", "team_leads"]},
                          "addresses": {"root": "hpc-ops@example.org",
                                        "nils": "nils.lead@nlp.example.org"}})
    a = policy.alerts

    def to(kind: str, team: str | None, user: str | None) -> list[str]:
        t = policy.teams.get(team or "")
        got, _ = recipients(a, kind, user=user, leads=t.leads if t else (),
                            members=t.members if t else (), admins=policy.daemon.admins)
        return got

    # defaults: budget to the team's leads and the admins; idle warnings to the job's user
    assert to("budget_threshold", "vision", None) == ["carl@example.org", "hpc-ops@example.org"]
    assert to("budget_threshold", "nlp", None) == ["nils.lead@nlp.example.org",
                                                   "hpc-ops@example.org"]
    assert to("idle_gpu_warning", "vision", "vera") == ["vera@example.org"]
    assert to("idle_gpu_action", "vision", "vera") == ["vera@example.org", "carl@example.org"]
    assert to("node_failure", "nlp", "nora") == ["nora@example.org", "hpc-ops@example.org"]
    # named in the policy: roles and explicit addresses
    assert to("node_drained", None, None) == ["hpc-ops@example.org", "facilities@example.org"]
    assert to("job_held", "nlp", "nora") == ["nora@example.org", "nils.lead@nlp.example.org"]
    # a user name that is not a plain name gets no made-up address
    got, missing = recipients(a, "job_held", user="x@evil.org\r\nBcc: y", leads=(), members=(),
                              admins=())
    assert got == [] and missing == ["x@evil.org\r\nBcc: y"]


def test_check_policy_names_the_field_of_each_bad_alert_setting(tmp_path: Path):
    secret = tmp_path / "smtp.password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)  # others may read it
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[teams.vision]
budget = 100.0

[alerts]
enabled = true
smtp_host = "127.0.0.1"
smtp_port = {closed_port()}
tls = "none"
sender = "slurmgate@example.org"
username = "slurmgate"
password_file = "{secret}"

[alerts.recipients]
budget_treshold = ["team_leads"]
job_held = ["job_user", "the_boss"]

[[alerts.webhooks]]
url = "htps://chat.example.org/hook"

[[alerts.webhooks]]
url = "https://chat.example.org/hook2"
kinds = ["node_failure", "gpu_on_fire"]
""")

    def check(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "slurm_plugin.cli", "--config",
                               str(policy), "check-policy", *extra], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})

    out = check()  # the daemon runs with these, so its unit's ExecStartPre must pass
    assert out.returncode == 0, out.stdout + out.stderr
    assert check("--strict").returncode == 1
    text = out.stdout
    assert "5 problem(s) with [alerts]" in text
    assert "alerts.recipients.budget_treshold: unknown alert kind 'budget_treshold'" in text
    assert "alerts.recipients.job_held.1: unknown recipient 'the_boss'" in text
    assert "alerts.webhooks.0.url: malformed URL 'htps://chat.example.org/hook'" in text
    assert "alerts.webhooks.1.kinds: unknown alert kind 'gpu_on_fire'" in text
    assert f"alerts.password_file: {secret}: cannot use it ({secret}: others may read it" in text
    assert "alerts.smtp_host" not in text  # the relay is tried only when asked
    out = check("--connect")
    assert re.search(r"alerts\.smtp_host: cannot connect to the mail relay 127\.0\.0\.1:\d+ "
                     r"\(Connection refused", out.stdout), out.stdout
    # the good parts alone are OK
    policy.write_text('[alerts]\nenabled = true\nwebhooks = [{url = "https://x.example.org/h"}]\n')
    out = check("--strict")
    assert out.returncode == 0 and ": OK (" in out.stdout, out.stdout
    assert "problem" not in out.stdout


def test_a_daemon_with_bad_alert_settings_logs_them_and_keeps_deciding(tmp_path: Path):
    from tests.unit.test_daemon import RunningDaemon, render_policy

    daemon = RunningDaemon(tmp_path)
    daemon.config.write_text(render_policy(tmp_path) + f"""
[alerts]
enabled = true
smtp_host = "127.0.0.1"
smtp_port = {closed_port()}
tls = "none"
sender = "slurmgate@example.org"
scan_seconds = 1
recipients = {{ budget_treshold = ["admins"] }}
webhooks = [{{ url = "not a url" }}]
""")
    daemon.start()
    try:
        problems_logged = wait_for(
            lambda: [json.loads(line) for line in daemon.log.read_text().splitlines()
                     if '"alerts_config_problem"' in line], 20, what="alert problems logged")
        fields = {p["field"] for p in problems_logged}
        assert {"alerts.recipients.budget_treshold", "alerts.webhooks.0.url",
                "alerts.smtp_host"} <= fields
        assert daemon.ask(op="ping")["ok"] is True
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        if daemon.proc is not None:
            daemon.proc.terminate()
            daemon.proc.wait(timeout=20)


# -- budget thresholds -------------------------------------------------------------------------


def test_each_budget_threshold_is_sent_once_per_period_also_after_a_restart(
        tmp_path: Path, smtp: SmtpSink, hook: WebhookSink, ledger_target: str):
    clock = Clock(T0 + 10 * HOUR)
    site = Site(tmp_path, make_policy(mail_and_hook(smtp, hook)), clock, ledger_target)
    site.settle(1, hours=7)  # 4 a100 x 7 h x $2 = $56 of $100
    site.round()
    assert len(smtp.received()) == 1 and len(hook.posts()) == 1
    m = smtp.received()[0]
    assert m.rcpt_tos == ["carl@example.org", "hpc-ops@example.org"]
    assert str(m.message["Subject"]) == "[slurmgate] team vision has used 56% of its " \
                                        "2026-09 budget"
    assert "past the 50% alert threshold" in m.message.get_content()
    post = hook.posts()[0]
    assert post.body["kind"] == "budget_threshold" and post.body["fields"]["threshold"] == 50
    assert post.body["dedupe_key"] == "budget_threshold:c1:vision:2026-09:50"
    assert "team vision has used 56%" in post.body["text"]

    site.round()
    site.restart()  # a new daemon over the same database: nothing is sent again
    site.round()
    assert len(smtp.received()) == 1 and len(hook.posts()) == 1

    site.settle(2, hours=3)  # $80 of $100: the 80% threshold
    site.round()
    site.restart()
    site.round()
    assert subjects(smtp)[1:] == ["[slurmgate] team vision has used 80% of its 2026-09 budget"]
    assert len(hook.posts()) == 2

    site.settle(3, hours=3)  # $104: past 90 and 100 at once -> one alert naming 100
    site.round()
    site.restart()
    site.round()
    assert len(smtp.received()) == 3 and len(hook.posts()) == 3
    last = smtp.received()[2].message.get_content()
    assert "past the 100% alert threshold (also past 90%)" in last
    decided = {a["dedupe_key"]: a for a in site.alert_log.alerts("budget_threshold")}
    assert set(decided) == {f"budget_threshold:c1:vision:2026-09:{t}" for t in (50, 80, 90, 100)}
    assert decided["budget_threshold:c1:vision:2026-09:90"]["covered_by"] == \
        decided["budget_threshold:c1:vision:2026-09:100"]["id"]
    # nlp spent nothing: no alert about it; vision's mails never went to nlp's people
    assert all("nils@example.org" not in m.rcpt_tos for m in smtp.received())

    clock.now = T0 + 10 * 86400  # next month: the thresholds start again
    site.daemon.refresh_ledger(now=clock.now)
    site.round()
    assert len(smtp.received()) == 3
    site.settle(4, hours=7)
    site.round()
    assert subjects(smtp)[3] == "[slurmgate] team vision has used 56% of its 2026-10 budget"
    assert len(hook.posts()) == 4
    sends = site.alert_log.sends("budget_threshold")
    assert [s["state"] for s in sends] == ["sent"] * 8
    assert len({s["dedupe_key"] for s in sends}) == 8
    # the webhook's secret path never lands in the send log
    assert all("secret-token" not in s["target"] for s in sends)


# -- delivery ----------------------------------------------------------------------------------


def test_a_webhook_answering_500_is_retried_with_backoff_until_it_takes_it(
        tmp_path: Path, ledger_target: str):
    clock = Clock(T0 + 10 * HOUR)
    with WebhookSink(statuses=[500, 500]) as hook:
        site = Site(tmp_path, make_policy({"webhooks": [{"url": hook.url}],
                                           "retry_seconds": 60}), clock, ledger_target)
        metrics = Metrics()
        site.dispatcher.on_send = metrics.alert_sent
        site.settle(1, hours=7)
        site.round()
        assert len(hook.posts()) == 1
        site.round()  # not due yet: no second POST
        assert len(hook.posts()) == 1
        clock.now += backoff(60, 1)
        site.round()
        assert len(hook.posts()) == 2
        clock.now += backoff(60, 2) - 1
        site.round()
        assert len(hook.posts()) == 2  # the wait doubled
        clock.now += 1
        site.round()
        assert len(hook.posts()) == 3
        clock.now += 86400
        site.round()
        assert len(hook.posts()) == 3  # taken: never sent again
    (send,) = site.alert_log.sends()
    assert send["state"] == "sent" and send["attempts"] == 3
    assert [t["ok"] for t in send["tries"]] == [0, 0, 1]
    assert send["tries"][0]["error"].startswith("webhook h") and \
        "answered 500" in send["tries"][0]["error"]
    text = metrics.render()
    assert 'slurmgate_alert_sends_total{kind="budget_threshold",channel="webhook",' \
           'result="error"} 2' in text
    assert 'slurmgate_alert_sends_total{kind="budget_threshold",channel="webhook",' \
           'result="sent"} 1' in text
    assert [line["attempt"] for line in site.log.of("alert_send_failed")] == [1, 2]


def test_an_unreachable_relay_is_logged_and_given_up_without_raising(tmp_path: Path,
                                                                     ledger_target: str):
    clock = Clock(T0 + 10 * HOUR)
    site = Site(tmp_path, make_policy({
        "smtp_host": "127.0.0.1", "smtp_port": closed_port(), "tls": "none",
        "sender": "slurmgate@example.org", "max_attempts": 3, "retry_seconds": 10}), clock,
        ledger_target)
    site.settle(1, hours=7)
    for _ in range(6):
        site.round()  # never raises
        clock.now += 3600
    (send,) = site.alert_log.sends()
    assert send["state"] == "failed" and send["attempts"] == 3
    assert all("cannot connect to the mail relay 127.0.0.1" in t["error"] for t in send["tries"])
    (gave_up,) = site.log.of("alert_gave_up")
    assert gave_up["attempts"] == 3 and gave_up["channel"] == "mail"
    assert site.store.event_count("alert_failed") == 1
    assert site.log.of("alerts_error") == []


def test_a_hung_relay_is_bounded_by_the_timeout_and_never_holds_the_daemon_lock(
        tmp_path: Path):
    clock = Clock(T0 + 10 * HOUR)
    with SilentServer() as silent:
        site = Site(tmp_path, make_policy({
            "smtp_host": "127.0.0.1", "smtp_port": silent.port, "tls": "none",
            "sender": "slurmgate@example.org", "send_timeout_s": 1.5}), clock)
        site.settle(1, hours=7)
        done = threading.Event()
        started = time.monotonic()
        worker = threading.Thread(target=lambda: (site.round(), done.set()))
        worker.start()
        wait_for(lambda: silent.accepted, 10, 0.01, what="the relay connected to")
        # a decision needs the daemon's lock: it gets it while the mail waits
        assert site.daemon.lock.acquire(timeout=0.2)
        site.daemon.lock.release()
        assert not done.is_set()
        wait_for(done.is_set, 10, 0.01, what="the round to end")
        assert time.monotonic() - started < 8
        worker.join()
    (send,) = site.alert_log.sends()
    assert send["state"] == "pending" and send["attempts"] == 1
    assert "timed out" in send["last_error"]


def test_starttls_is_required_when_asked_and_nothing_goes_out_in_clear(tmp_path: Path,
                                                                        smtp: SmtpSink):
    clock = Clock(T0 + 10 * HOUR)
    site = Site(tmp_path, make_policy({"smtp_host": "127.0.0.1", "smtp_port": smtp.port,
                                       "tls": "starttls", "sender": "slurmgate@example.org"}),
                clock)
    site.settle(1, hours=7)
    site.round()
    assert smtp.received() == []
    (send,) = site.alert_log.sends()
    assert "does not offer STARTTLS" in send["last_error"]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtp_login_reads_the_private_password_file(tmp_path: Path):
    secret = tmp_path / "smtp.password"
    secret.write_text("hunter2\n")
    secret.chmod(0o640)
    clock = Clock(T0 + 10 * HOUR)
    with SmtpSink(login=("slurmgate", "hunter2")) as smtp:
        site = Site(tmp_path, make_policy({
            "smtp_host": "127.0.0.1", "smtp_port": smtp.port, "tls": "none",
            "sender": "slurmgate@example.org", "username": "slurmgate",
            "password_file": str(secret)}), clock)
        site.settle(1, hours=7)
        site.round()
        assert len(smtp.received()) == 1
        secret.chmod(0o644)  # now others may read it: refused, said, retried later
        site.settle(2, hours=3)
        site.round()
        assert len(smtp.received()) == 1
    second = site.alert_log.sends()[1]
    assert second["state"] == "pending"
    assert "alerts.password_file" in second["last_error"] and "others may read it" in \
        second["last_error"]


def test_dry_run_decides_and_logs_but_sends_nothing_ever(tmp_path: Path, smtp: SmtpSink,
                                                         hook: WebhookSink, ledger_target: str):
    clock = Clock(T0 + 10 * HOUR)
    policy = make_policy(mail_and_hook(smtp, hook, dry_run=True))
    site = Site(tmp_path, policy, clock, ledger_target)
    site.settle(1, hours=7)
    site.round()
    assert smtp.received() == [] and hook.posts() == []
    assert {line["channel"] for line in site.log.of("alert_dry_run")} == {"mail",
                                                                         "webhook:ops-chat"}
    site.set_policy(make_policy(mail_and_hook(smtp, hook)))
    site.round()
    assert smtp.received() == [] and hook.posts() == []
    assert [s["state"] for s in site.alert_log.sends()] == ["dry_run", "dry_run"]


# -- events ------------------------------------------------------------------------------------


def idle_event(store: Store, job_id: int = 4242, **detail: Any) -> int:
    return store.add_event(
        "idle_warning", cluster="c1", job_id=job_id, user="vera", team="vision", node="node1",
        message="4 of 4 GPUs below 5% for 65 min",
        detail={"idle_minutes": 65, "gpus_idle": 4, "gpus_allocated": 4, "cost_so_far": 12.5,
                "currency": "$", "action": "warn", **detail})


def test_idle_warning_mail_names_the_job_the_idle_minutes_and_the_cost_so_far(
        tmp_path: Path, smtp: SmtpSink, hook: WebhookSink):
    site = Site(tmp_path, make_policy(mail_and_hook(smtp, hook)), Clock(time.time()))
    site.round()  # the first scan starts the cursor at the newest event
    idle_event(site.store)
    site.round()
    (m,) = smtp.received()
    assert m.rcpt_tos == ["vera@example.org"]
    body = m.message.get_content()
    subject = str(m.message["Subject"])
    assert "4242" in subject and "65 minutes" in subject
    assert "job id: 4242" in body and "idle minutes: 65 minutes" in body
    assert "cost so far: $12.50" in body
    assert m.message["Auto-Submitted"] == "auto-generated"
    (post,) = hook.posts()
    assert post.body["kind"] == "idle_gpu_warning"
    assert post.body["fields"]["idle_minutes"] == 65 and post.body["fields"]["job_id"] == 4242


def test_events_past_the_cursor_are_alerted_once_across_restarts_and_history_is_not(
        tmp_path: Path, smtp: SmtpSink, ledger_target: str):
    policy = make_policy({"smtp_host": "127.0.0.1", "smtp_port": smtp.port, "tls": "none",
                          "sender": "slurmgate@example.org"})
    site = Site(tmp_path, policy, Clock(time.time()), ledger_target)
    site.store.add_event("drain", cluster="c1", node="old-node", message="before alerts")
    site.round()
    assert smtp.received() == []  # history is not mailed
    # a node failure, a drain and a hold (the requeue handler's hold names no user: the run
    # does) while the daemon is away
    with site.daemon.lock:
        settle_run(site.store, site.policy, 77, hours=1, end=time.time() - 60, user="nora",
                   account="nlp")
    site.store.add_event("node_fail", cluster="c1", job_id=77, restart_count=0, team="nlp",
                         user="nora", node="node2", message="job 77 lost its node node2")
    site.store.add_event("drain", cluster="c1", node="node2",
                         message="slurmgate: 3 job failures in 24h")
    site.store.add_event("hold", cluster="c1", job_id=77, restart_count=0,
                         message="slurmgate: retries exhausted")
    site.store.add_event("credit", cluster="c1", job_id=77, message="not an alert")
    site.restart()
    site.round()
    site.restart()
    site.round()
    got = {str(m.message["Subject"]): m.rcpt_tos for m in smtp.received()}
    assert got == {
        "[slurmgate] job 77 lost node2": ["nora@example.org", "hpc-ops@example.org"],
        "[slurmgate] node node2 drained": ["hpc-ops@example.org"],
        "[slurmgate] job 77 is held": ["nora@example.org"],
    }
    idle_event(site.store, job_id=78)
    site.restart()
    site.round()
    assert len(smtp.received()) == 4


def test_user_text_cannot_inject_headers_or_slack_mentions(tmp_path: Path, smtp: SmtpSink,
                                                           hook: WebhookSink):
    site = Site(tmp_path, make_policy(mail_and_hook(smtp, hook)), Clock(time.time()))
    site.round()
    site.store.add_event(
        "unchecked_held", cluster="c1", job_id=9, user="vera", team="vision",
        message="job 'x\r\nBcc: everyone@example.org\r\n\r\n<!channel> pwned' held")
    site.round()
    (m,) = smtp.received()
    assert m.rcpt_tos == ["vera@example.org"] and m.message["Bcc"] is None
    assert "\n" not in str(m.message["Subject"])
    (post,) = hook.posts()
    assert "<!channel>" not in post.body["text"] and "&lt;!channel&gt;" in post.body["text"]


def test_a_slack_format_webhook_gets_only_text(tmp_path: Path):
    with WebhookSink() as hook:
        site = Site(tmp_path, make_policy({"webhooks": [
            {"url": hook.url, "format": "slack", "kinds": ["idle_gpu_warning"],
             "headers": {"X-Team": "hpc"}}]}), Clock(time.time()))
        site.round()
        site.store.add_event("drain", cluster="c1", node="n1", message="not for this hook")
        idle_event(site.store)
        site.round()
        (post,) = hook.posts()
    assert set(post.body) == {"text"} and "4242" in post.body["text"]
    assert post.headers["X-Team"] == "hpc" and post.path == "/hooks/secret-token"


def test_a_budget_snapshot_source_without_a_daemon_works_too(smtp: SmtpSink,
                                                              ledger_target: str):
    """The dispatcher takes any spend source (here a fixed one) and any store."""
    policy = make_policy({"smtp_host": "127.0.0.1", "smtp_port": smtp.port, "tls": "none",
                          "sender": "slurmgate@example.org", "budget_thresholds": [10]})
    store = open_store(ledger_target)
    log = Log()
    d = Dispatcher(AlertLog(store), lambda: policy,
                   lambda now: BudgetSnapshot("2026-09", {"nlp": 150.0}, {}),
                   write_log=log.write)
    d.round()
    d.round()
    assert [m.rcpt_tos for m in smtp.received()] == [["nils@example.org",
                                                       "hpc-ops@example.org"]]


def test_webhook_text_cannot_mention_a_channel() -> None:
    """User text (a job name, a comment echoed in a held job's reason) reaches webhook text:
    neither Slack's <!channel> nor Mattermost's @channel/@all/@here survive it."""
    from slurm_plugin.alerts.webhook import slack_escape

    text = slack_escape("<!channel> @channel @all @here see <http://x|y> & more")
    assert "<!channel>" not in text and "<http" not in text and "&amp; more" in text
    for mention in ("@channel", "@all", "@here"):
        assert mention not in text
    assert text.replace("\u2060", "").count("@") == 3  # still readable as written


def test_an_alert_names_the_current_owner_of_a_reused_job_id(ledger_target: str) -> None:
    """After the job id counter wraps, an old job's runs must not name the new job's user."""
    from tests.unit.test_db_ingest import make_jobcomp, make_node_run, reserve
    from tests.unit.test_db_ingest import make_policy as ingest_policy

    store = open_store(ledger_target)
    try:
        ingest_records(store, [make_node_run(7, user="old"), make_jobcomp(7, user="old")],
                       ingest_policy())
        log = AlertLog(store)
        assert log.job_owner("c1", 7)[0] == "old"
        rid = reserve(store, None, created_at=T0 + 90 * 86400)
        store.bind_reservation(rid, 7, "c1")
        assert log.job_owner("c1", 7)[0] == "vera"  # the reservation's user, made later
    finally:
        store.close()


def test_the_send_log_decides_once_counts_every_attempt_and_never_moves_its_cursor_back(
        ledger_target: str) -> None:
    """db/alert_log.py on its own, with two writers on one ledger (as two daemons sharing a
    PostgreSQL server are): a key is decided once, with its sends and covers, whoever records
    it again and however the two race; every attempt is numbered and kept with its error; the
    cursor moves with the alerts and never backwards."""
    from db.alert_log import NewAlert, NewSend

    mail = NewSend("mail", "ops@example.org", {"to": ["ops@example.org"], "subject": "s"})
    hook = NewSend("webhook:ops", "ops (chat.example.org)", {"text": "t"})
    budget = NewAlert("budget_threshold:c1:vision:2026-09:100", "budget_threshold", "s", "b",
                      T0, cluster="c1", team="vision", detail={"pct": 104.0},
                      sends=(mail, hook), covers=("budget_threshold:c1:vision:2026-09:90",))
    node = NewAlert("node_failure:c1:event:11", "node_failure", "s2", "b2", T0 + 1,
                    cluster="c1", user="nora", job_id=77, node="node2", event_id=11,
                    sends=(mail,))
    first, second = open_store(ledger_target), open_store(ledger_target)
    try:
        a, b = AlertLog(first), AlertLog(second)
        assert a.cursor("events") is None and a.last_event_id() == 0
        made = a.record([budget], now=T0, cursor=("events", 10))
        assert list(made) == [budget.dedupe_key]
        # the other writer decides the same alert again with a new one, its cursor behind
        again = b.record([budget, node], now=T0 + 1, cursor=("events", 5))
        assert list(again) == [node.dedupe_key] and again[node.dedupe_key] > made[
            budget.dedupe_key]
        assert a.cursor("events") == b.cursor("events") == 10
        b.set_cursor("events", 12, now=T0 + 2)
        a.set_cursor("events", 3, now=T0 + 3)
        assert a.cursor("events") == 12
        assert a.decided([budget.dedupe_key, *budget.covers, "budget_threshold:c1:x:2026-09:50",
                          budget.dedupe_key]) == {budget.dedupe_key, *budget.covers}
        alerts = {r["dedupe_key"]: r for r in b.alerts()}
        assert len(alerts) == 3 and [r["dedupe_key"] for r in b.alerts("node_failure")] == [
            node.dedupe_key]
        covered = alerts[budget.covers[0]]
        assert covered["covered_by"] == alerts[budget.dedupe_key]["id"]
        assert (covered["subject"], covered["body"], covered["detail"]) == (
            f"answered by {budget.dedupe_key}", "", {})
        assert alerts[budget.dedupe_key]["detail"] == {"pct": 104.0}
        n = alerts[node.dedupe_key]
        assert (n["ts"], n["user"], n["job_id"], n["node"], n["event_id"]) == (
            T0 + 1, "nora", 77, "node2", 11)
        sends = a.sends()
        assert [(s["alert_key"], s["dedupe_key"], s["state"], s["attempts"]) for s in sends] == [
            (budget.dedupe_key, f"{budget.dedupe_key}/mail", "pending", 0),
            (budget.dedupe_key, f"{budget.dedupe_key}/webhook:ops", "pending", 0),
            (node.dedupe_key, f"{node.dedupe_key}/mail", "pending", 0)]
        due = b.due_sends(T0 + 1)
        assert [d["id"] for d in due] == [s["id"] for s in sends]
        assert due[0]["payload"] == mail.payload and due[0]["kind"] == "budget_threshold"
        assert b.due_sends(T0 - 1) == [] and len(b.due_sends(T0 + 1, limit=2)) == 2

        # attempts: counted before the send, finished with their outcome
        sid, hid = sends[0]["id"], sends[1]["id"]
        one = a.start_attempt(sid, now=T0 + 2)
        a.finish_attempt(sid, one, now=T0 + 3, error="relay said 451", state="pending",
                         next_attempt_at=T0 + 60)
        assert sid not in [d["id"] for d in a.due_sends(T0 + 30)]
        two = b.start_attempt(sid, now=T0 + 61)
        # claimed: neither daemon on the ledger starts it again while the attempt runs
        assert a.start_attempt(sid, now=T0 + 61.5) is None
        assert sid not in [d["id"] for d in a.due_sends(T0 + 62)]
        b.finish_attempt(sid, two, now=T0 + 62, error=None, state="sent")
        assert b.start_attempt(sid, now=T0 + 9999) is None  # sent: never again
        a.drop(hid, "webhook:ops is no longer in the policy", now=T0 + 63)
        a.drop(sid, "too late: it was sent", now=T0 + 64)
        with pytest.raises(ValueError, match="state is one of"):
            a.finish_attempt(sid, two, now=T0 + 65, error=None, state="delivered")
        got = {s["id"]: s for s in b.sends()}
        assert (one, two) == (1, 2)
        mailed = got[sid]
        assert (mailed["state"], mailed["attempts"], mailed["sent_at"], mailed["last_error"],
                mailed["next_attempt_at"]) == ("sent", 2, T0 + 62, None, T0 + 61 + a.CLAIM_S)
        assert [(t["send_id"], t["attempt"], t["ok"], t["error"]) for t in mailed["tries"]] == [
            (sid, 1, 0, "relay said 451"), (sid, 2, 1, None)]
        assert (got[hid]["state"], got[hid]["last_error"], got[hid]["tries"]) == (
            "dropped", "webhook:ops is no longer in the policy", [])
        assert [d["id"] for d in a.due_sends(T0 + 3600)] == [sends[2]["id"]]

        # dry run: decided and logged, never due
        dry = NewAlert("idle_gpu_warning:c1:event:13", "idle_gpu_warning", "s3", "b3", T0,
                       sends=(mail,))
        assert list(a.record([dry], now=T0, dry_run=True)) == [dry.dedupe_key]
        assert [s["state"] for s in a.sends("idle_gpu_warning")] == ["dry_run"]
        assert dry.dedupe_key not in {d["alert_key"] for d in a.due_sends(T0 + 3600)}

        # two writers racing over the same new keys: each key is made by exactly one
        keys = [NewAlert(f"hold:c1:event:{100 + i}", "hold", "s", "b", T0, sends=(mail, hook))
                for i in range(30)]
        results: list[dict[str, int]] = []
        errors: list[BaseException] = []

        def decide(log: AlertLog, cursor: int) -> None:
            try:
                for i in range(0, len(keys), 5):
                    results.append(log.record(keys[i:i + 5], now=T0, cursor=("events", cursor)))
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)

        racers = [threading.Thread(target=decide, args=(log, cursor))
                  for log, cursor in ((a, 140), (b, 130))]
        for t in racers:
            t.start()
        for t in racers:
            t.join(60)
        assert errors == []
        won = [k for r in results for k in r]
        assert sorted(won) == sorted(k.dedupe_key for k in keys)
        assert len(a.sends("hold")) == 60 and len({s["dedupe_key"] for s in a.sends()}) == 64
        assert a.cursor("events") == 140
    finally:
        first.close()
        second.close()


def test_the_scan_reads_the_events_after_its_cursor_in_order(ledger_target: str) -> None:
    store = open_store(ledger_target)
    try:
        log = AlertLog(store)
        ids = [store.add_event(kind, ts=T0 + i, cluster="c1", node=f"n{i}", message=kind)
               for i, kind in enumerate(("drain", "credit", "drain", "hold", "credit"))]
        assert log.last_event_id() == ids[-1]
        rows, top = log.events_after(0, ("drain", "hold"))
        assert [r["id"] for r in rows] == [ids[0], ids[2], ids[3]] and top == ids[-1]
        assert rows[0]["node"] == "n0" and rows[0]["kind"] == "drain"
        rows, top = log.events_after(0, ("drain", "hold"), limit=2)
        assert [r["id"] for r in rows] == [ids[0], ids[2]] and top == ids[2]
        assert log.events_after(ids[-1], ("drain",)) == ([], ids[-1])
        assert log.events_after(ids[0], ()) == ([], ids[-1])
    finally:
        store.close()
