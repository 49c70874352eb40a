"""Issue 14, point 3: the idle-GPU policy on the real dev cluster.

A test policy with thresholds of seconds and node1's fake GPUs at 0 % utilisation; the node
agent (`slurmgate agent`, as root, as in production) samples both nodes and tags each GPU
with the job holding it. A GPU job on node1 that idles is warned, then cancelled; a busy job
on node2 and an exempt user's job on node1 are left alone. With ``[alerts]`` on, pointed at a
real SMTP server (aiosmtpd on 127.0.0.1, in this test process), the idle job's user gets the
warning and the action by mail, once each, with the job id, the idle minutes and the cost so
far; nothing is mailed about the busy and the exempt job.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

from db.alert_log import AlertLog
from db.reports import events
from db.store import open_store
from policies.cost import format_money
from policies.idle import format_minutes
from tests.conftest import FINAL_STATES, Cluster, PolicyOverride
from tests.unit.alert_servers import Received, SmtpSink
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm
SLURMGATE = "/opt/slurmgate/venv/bin/slurmgate"
SAMPLE_S = 2
IDLE_POLICY = """
[idle]
enabled = true
threshold_percent = 5
min_idle_fraction = 1.0
warn_after_minutes = [0.2]    # 12 s
act_after_minutes = 0.5       # 30 s
action = "cancel"
scan_seconds = 1              # the reconcile loop hands the queue over every 2 s
exempt_users = ["carol"]
"""


def alerts_block(smtp: SmtpSink) -> str:
    """Alerts by mail only, the default recipients (warning: the job's user; action: the
    user and the team's leads), every second."""
    return f"""
[alerts]
enabled = true
smtp_host = "127.0.0.1"
smtp_port = {smtp.port}
tls = "none"
sender = "slurmgate@example.org"
mail_domain = "example.org"
scan_seconds = 1
retry_seconds = 1
budget_thresholds = []
"""


def idle_policy(original: str, smtp: SmtpSink | None = None) -> str:
    text = re.sub(r"\n\[alerts\].*?(?=\n\[+(?![\[]|alerts)|\Z)", "\n", original, flags=re.S)
    text = re.sub(r"(?m)^reconcile_seconds = [0-9.]+", "reconcile_seconds = 2", text)
    text = re.sub(r"(?m)^sample_seconds = [0-9.]+", f"sample_seconds = {SAMPLE_S}", text)
    block = re.search(r"\[nvml\.fake_nodes\.node1\].*?(?=\n\[)", text, re.S)
    assert block, "the dev policy has a [nvml.fake_nodes.node1] table"
    idle_node1 = re.sub(r"utilization = \[[^\]]*\]", "utilization = [0, 0, 0, 0]",
                        block.group(0))
    return (text.replace(block.group(0), idle_node1) + IDLE_POLICY
            + (alerts_block(smtp) if smtp is not None else ""))


def mails_about(smtp: SmtpSink, job_id: int) -> list[Received]:
    return [m for m in smtp.received() if f"job {job_id}" in str(m.message["Subject"])]


def idle_events(cluster: Cluster, job_ids: list[int]) -> list[dict]:
    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        found = events(store, ["idle_warning", "idle_action"], 1000)
    finally:
        store.close()
    return sorted((e for e in found if e["job_id"] in job_ids), key=lambda e: e["id"])


def alert_sends(cluster: Cluster, job_ids: list[int]) -> list[dict]:
    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        return [x for x in AlertLog(store).sends() if x["job_id"] in job_ids]
    finally:
        store.close()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def agents(cluster: Cluster) -> Iterator[list[subprocess.Popen]]:
    """The node agent on node1 and node2, as root, every SAMPLE_S seconds."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_agents(cluster: Cluster, procs: list[subprocess.Popen]) -> None:
    for node in ("node1", "node2"):
        procs.append(subprocess.Popen(
            [SLURMGATE, "agent", "--node", node, "--interval", str(SAMPLE_S)],
            env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def test_an_idle_gpu_job_is_warned_then_cancelled_and_the_others_are_left_alone(
        cluster: Cluster, policy_override: PolicyOverride,
        agents: list[subprocess.Popen], smtp: SmtpSink) -> None:
    policy_override.apply(idle_policy(policy_override.original, smtp))
    jobs: list[int] = []
    try:
        idle = cluster.submit_ok("alice", "--gres=gpu:a100:2", "-w", "node1", "-t", "10",
                                 wrap="sleep 600")
        jobs.append(idle)
        busy = cluster.submit_ok("bob", "--gres=gpu:h100:1", "-w", "node2", "-t", "10",
                                 wrap="sleep 600")
        jobs.append(busy)
        exempt = cluster.submit_ok("carol", "--gres=gpu:a100:1", "-w", "node1", "-t", "10",
                                   wrap="sleep 600")
        jobs.append(exempt)
        for job_id in jobs:
            cluster.wait_state(job_id, "RUNNING", 90)
        start_agents(cluster, agents)

        # the agent's samples carry the job holding each GPU
        def tagged() -> set[int]:
            store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
            try:
                rows = store._query("SELECT DISTINCT job_id FROM gpu_samples "
                                    "WHERE job_id IN (:a, :b, :c)",
                                    dict(zip("abc", jobs, strict=True)))
            finally:
                store.close()
            return {r["job_id"] for r in rows}

        wait_for(lambda: tagged() == set(jobs), 60, 0.5, what="samples tagged with the jobs")

        warning = wait_for(lambda: next((e for e in idle_events(cluster, jobs)
                                         if e["kind"] == "idle_warning"), None), 90, 0.5,
                           what="the idle job's warning")
        assert warning["job_id"] == idle and warning["restart_count"] == 0
        assert (warning["user"], warning["team"], warning["node"]) == ("alice", "vision",
                                                                        "node1")
        detail = warning["detail"]
        assert detail["idle_minutes"] >= 0.2 and detail["threshold_minutes"] == 0.2
        assert (detail["gpus_idle"], detail["gpus_allocated"]) == (2, 2)
        assert detail["cost_so_far"] > 0 and detail["currency"] == "$"
        assert (detail["action"], detail["dry_run"]) == ("cancel", False)
        assert f"job {idle} (alice): 2 of 2 GPUs below 5% utilisation" in warning["message"]
        assert cluster.job(idle)["job_state"] == "RUNNING"  # warned first

        final = cluster.wait_state(idle, FINAL_STATES, 120)
        assert final["job_state"] == "CANCELLED"
        got = wait_for(lambda: (found := idle_events(cluster, jobs))
                       and found[-1]["kind"] == "idle_action" and found, 30, 0.5,
                       what="the idle_action event")
        assert [(e["kind"], e["job_id"]) for e in got] == [("idle_warning", idle),
                                                           ("idle_action", idle)]
        action = got[-1]["detail"]
        assert action["idle_minutes"] >= 0.5 and action["action"] == "cancel"
        assert action["cost_so_far"] >= detail["cost_so_far"]
        assert any(e["job_id"] == idle for e in cluster.log_events("idle_action"))

        # the busy job and the exempt one run on, with nothing logged against them
        for job_id in (busy, exempt):
            assert cluster.job(job_id)["job_state"] == "RUNNING"
        scans = cluster.log_events("idle_scan")
        assert scans and all(s["exempt"] >= 1 for s in scans[-3:])
        assert [e["job_id"] for e in idle_events(cluster, jobs)] == [idle, idle]

        # the mails: the warning to alice, the action to alice and vision's lead
        mails = wait_for(lambda: len(found := mails_about(smtp, idle)) >= 2 and found, 30,
                         0.2, what="the warning and the action mails")
        assert [str(m.message["X-Slurmgate-Alert"]) for m in mails] == ["idle_gpu_warning",
                                                                         "idle_gpu_action"]
        assert mails[0].rcpt_tos == ["alice@example.org"]
        assert mails[1].rcpt_tos == ["alice@example.org", "carol@example.org"]
        for mail, event in zip(mails, got, strict=True):
            body = mail.message.get_content()
            minutes = format_minutes(event["detail"]["idle_minutes"])
            assert f"job {idle}" in str(mail.message["Subject"])
            assert f"job id: {idle}" in body
            assert f"idle minutes: {minutes} minutes" in body and minutes != "0"
            assert f"cost so far: {format_money(event['detail']['cost_so_far'], '$')}" in body
        assert "was cancelled after 2 of 2 allocated GPUs" in mails[1].message.get_content()
        # nothing about the busy and the exempt job, nothing to bob; the send log agrees:
        # one alert per event, each mailed once
        sends = wait_for(lambda: (found := alert_sends(cluster, jobs)) and all(
            x["state"] == "sent" for x in found) and found, 30, 0.2, what="the send log")
        assert [(x["kind"], x["job_id"], x["channel"], x["attempts"]) for x in sends] == [
            ("idle_gpu_warning", idle, "mail", 1), ("idle_gpu_action", idle, "mail", 1)]
        assert mails_about(smtp, busy) == mails_about(smtp, exempt) == []
        assert mails_about(smtp, idle) == mails
        assert not any("bob@example.org" in m.rcpt_tos for m in smtp.received())
    finally:
        cluster.scancel(*jobs)
