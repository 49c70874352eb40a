"""Issue 14, point 4: a team crossing budget thresholds on the real dev cluster gets exactly
one mail and one webhook per threshold, also across a daemon restart.

The receivers are real servers in this test process on 127.0.0.1 (aiosmtpd, http.server); the
daemon (the SlurmUser's, started by contrib/devcluster) reaches them over TCP. Each run uses a
team of its own (an --account only bob may charge), so the once-per-period send log of earlier
runs in the same month cannot hide this run's alerts.
"""

from __future__ import annotations

import re
import uuid

import pytest

from tests.conftest import FINAL_STATES, Cluster, PolicyOverride, daemon_call
from tests.unit.alert_servers import SmtpSink, WebhookSink
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm


def team_block(name: str, budget: float) -> str:
    return f"""
[teams.{name}]
accounts = ["{name}"]
members = ["bob"]
leads = ["bob"]
budget = {budget:.6f}
soft_limit = 1.0
hard_limit = 1.0
share = 1
"""


def alerts_block(smtp: SmtpSink, hook: WebhookSink) -> str:
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
budget_thresholds = [50, 80, 90, 100]

[alerts.addresses]
root = "hpc-ops@example.org"

[[alerts.webhooks]]
name = "e2e"
url = "{hook.url}"
kinds = ["budget_threshold"]
"""


def with_sections(original: str, *blocks: str) -> str:
    """The cluster's policy with ``blocks`` added; any [alerts] of its own is dropped."""
    text = re.sub(r"\n\[alerts\].*?(?=\n\[+(?![\[]|alerts)|\Z)", "\n", original, flags=re.S)
    return text.rstrip() + "\n" + "".join(blocks)


def spent(cluster: Cluster, team: str) -> float:
    rows = daemon_call(cluster, op="quota")["teams"]
    return next(t["spent"] for t in rows if t["team"] == team)


def budget_mails(smtp: SmtpSink, team: str) -> list[str]:
    return [str(m.message["Subject"]) for m in smtp.received()
            if f"team {team} " in str(m.message["Subject"])]


def budget_posts(hook: WebhookSink, team: str) -> list[float]:
    return [p.body["fields"]["threshold"] for p in hook.posts()
            if p.body.get("fields", {}).get("team") == team]


def test_a_team_crossing_80_percent_gets_one_mail_and_one_webhook_per_threshold_across_a_restart(
        cluster: Cluster, policy_override: PolicyOverride):
    team = "al" + uuid.uuid4().hex[:8]
    with SmtpSink() as smtp, WebhookSink() as hook:
        policy_override.apply(with_sections(policy_override.original,
                                            team_block(team, 1_000_000.0),
                                            alerts_block(smtp, hook)))
        job = cluster.submit_ok("bob", f"--account={team}", "--gres=gpu:h100:1", "-t", "10",
                                wrap="sleep 3")
        cluster.wait_state(job, FINAL_STATES, 120)
        cost = wait_for(lambda: spent(cluster, team) or None, 60, 0.5,
                        what=f"job {job} settled to team {team}")

        # 85% of the budget: past 50 and 80 at once, one alert naming 80
        policy_override.apply(with_sections(policy_override.original,
                                            team_block(team, cost / 0.85),
                                            alerts_block(smtp, hook)))
        wait_for(lambda: budget_mails(smtp, team) and budget_posts(hook, team), 60, 0.2,
                 what="the 80% mail and webhook")
        (first,) = [m for m in smtp.received() if f"team {team} " in str(m.message["Subject"])]
        assert "bob@example.org" in first.rcpt_tos and "hpc-ops@example.org" in first.rcpt_tos
        assert "past the 80% alert threshold (also past 50%)" in first.message.get_content()
        assert budget_posts(hook, team) == [80]

        # a restart: the daemon comes back over the same send log and sends nothing again
        cluster.ctl("daemon", "stop")
        cluster.ctl("daemon", "start")
        wait_for(lambda: daemon_call(cluster, op="ping")["ok"], 30, what="the daemon back")
        # 95%: the 90% alert proves the scan runs again after the restart
        policy_override.apply(with_sections(policy_override.original,
                                            team_block(team, cost / 0.95),
                                            alerts_block(smtp, hook)))
        wait_for(lambda: len(budget_mails(smtp, team)) >= 2 and len(budget_posts(hook, team))
                 >= 2, 60, 0.2, what="the 90% mail and webhook")
        # that scan saw 50, 80 and 90 all crossed and only 90 new: nothing was sent twice
        assert len(budget_mails(smtp, team)) == 2, budget_mails(smtp, team)
        assert sorted(budget_posts(hook, team)) == [80, 90]
        assert re.search(r"has used 8[45]% of its", budget_mails(smtp, team)[0])
        assert re.search(r"has used 9[45]% of its", budget_mails(smtp, team)[1])
