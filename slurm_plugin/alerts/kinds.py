"""What each alert kind says, and to whom: subject, mail body and webhook text of a budget
threshold or an event, and the deliveries (mail to its recipients, each webhook that takes
the kind) that go with it.

Text that came from users (job names, reasons in an event's message) is kept as plain text:
control characters are dropped from subjects, Slack's ``& < >`` are escaped in webhook text.
An alert never names another team's figures: a budget alert is about one team and goes to that
team's people, the admins and the addresses the policy names for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from db.alert_log import NewAlert, NewSend
from policies.alerts import EVENT_KINDS, recipients
from policies.config import Policy
from policies.cost import format_money
from policies.idle import format_minutes
from slurm_plugin.alerts.webhook import describe, slack_escape

PREFIX = "[slurmgate]"
_DONE = {"cancel": "cancelled", "requeue": "requeued", "hold": "held", "dry_run": "reported "
         "(dry run: nothing done)"}
"""An idle action's ``action`` as the verb the mail uses."""
MAX_MESSAGE = 2000


@dataclass(frozen=True)
class Content:
    subject: str
    body: str
    fields: dict[str, Any] = field(default_factory=dict)


def event_detail(event: dict[str, Any]) -> dict[str, Any]:
    """An event's detail as a dict ({} when it is not a JSON object)."""
    raw = event.get("detail")
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) < 1e15 else None


def _text(value: Any, limit: int = MAX_MESSAGE) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return "".join(c for c in text if c in "\n\t" or ord(c) >= 32)[:limit]


def budget_content(policy: Policy, *, team: str, period: str, threshold: float,
                   covered: list[float], spent: float, reserved: float,
                   budget: float) -> Content:
    cur = policy.rates.currency
    pct = spent / budget * 100.0 if budget else 0.0
    also = (f" (also past {', '.join(f'{t:g}%' for t in covered)})" if covered else "")
    subject = f"{PREFIX} team {team} has used {pct:.0f}% of its {period} budget"
    lines = [
        f"Team {team} has spent {format_money(spent, cur)} of its budget of "
        f"{format_money(budget, cur)} for {period}: {pct:.1f}%, past the {threshold:g}% "
        f"alert threshold{also}.",
        "",
        f"  spent (settled, after credits): {format_money(spent, cur)}",
        f"  reserved by pending and running jobs: {format_money(reserved, cur)}",
        f"  left: {format_money(budget - spent - reserved, cur)}",
        "",
    ]
    t = policy.teams.get(team)
    if t is not None and budget and policy.budgets.mode == "chargeback":
        lines.append(f"Above {t.soft_limit:.0%} of the budget jobs move to the "
                     f"'{policy.budgets.soft_partition}' partition; above {t.hard_limit:.0%} "
                     "they are rejected unless an admin grants an approval.")
    lines.append("`slurmgate quota` shows the team's figures.")
    return Content(subject, "\n".join(lines), {
        "team": team, "period": period, "threshold": threshold, "covered": covered,
        "percent": round(pct, 2), "spent": round(spent, 2), "reserved": round(reserved, 2),
        "budget": budget, "currency": cur})


def event_content(policy: Policy, kind: str, event: dict[str, Any], *, user: str | None,
                  team: str | None) -> Content:
    """Subject and body of the alert an event raises."""
    d = event_detail(event)
    job = event.get("job_id")
    node = _text(event.get("node"), 100)
    message = _text(event.get("message"))
    who = ", ".join(x for x in (f"user {user}" if user else "",
                                f"team {team}" if team else "") if x)
    job_text = f"job {job}" + (f" ({who})" if who else "")
    fields: dict[str, Any] = {"event_id": event.get("id"), "event_kind": event.get("kind"),
                              "job_id": job, "user": user, "team": team, "node": node or None,
                              "message": message}
    if kind in ("idle_gpu_warning", "idle_gpu_action"):
        minutes = _number(d.get("idle_minutes"))
        cost = _number(d.get("cost_so_far"))
        cur = _text(d.get("currency"), 8) or policy.rates.currency
        idle, alloc = _number(d.get("gpus_idle")), _number(d.get("gpus_allocated"))
        action = _text(d.get("action"), 100)
        minutes_text = (f"{format_minutes(minutes)} minutes" if minutes is not None
                        else "a while")
        cost_text = format_money(cost, cur) if cost is not None else "unknown"
        gpus = (f"{idle:g} of {alloc:g} allocated GPUs" if idle is not None and alloc
                else "its allocated GPUs")
        fields.update(idle_minutes=minutes, cost_so_far=cost, currency=cur,
                      gpus_idle=idle, gpus_allocated=alloc, action=action or None)
        if kind == "idle_gpu_warning":
            subject = f"{PREFIX} job {job}: GPUs idle for {minutes_text}"
            first = (f"Your {job_text} has had {gpus} idle for {minutes_text}"
                     + (f" on {node}" if node else "") + f". Cost so far: {cost_text}.")
            advice = ("If the job does not need its GPUs, cancel it (scancel "
                      f"{job}) or ask for fewer (--gres=gpu:N) next time.")
        else:
            did = _DONE.get(action, action) or "acted on"
            subject = f"{PREFIX} job {job} {did}: GPUs idle for {minutes_text}"
            first = (f"Your {job_text} was {did} after {gpus} stayed idle for "
                     f"{minutes_text}" + (f" on {node}" if node else "")
                     + f". Cost so far: {cost_text}.")
            advice = "Ask your admins if you think this was wrong."
        lines = [first, "", f"  job id: {job}", f"  idle minutes: {minutes_text}",
                 f"  cost so far: {cost_text}"]
        if message:
            lines += ["", message]
        lines += ["", advice]
        return Content(subject, "\n".join(lines), fields)
    if kind == "job_held":
        subject = f"{PREFIX} job {job} is held"
        lines = [f"{job_text[0].upper()}{job_text[1:]} is held by slurmgate.", "", message,
                 "", "`scontrol show job " f"{job}` shows the reason; an admin can release it "
                 f"(`scontrol release {job}`)."]
        return Content(subject, "\n".join(lines), fields)
    if kind == "node_failure":
        failed = node or "its node"
        subject = f"{PREFIX} job {job} lost {failed}"
        lines = [f"{job_text[0].upper()}{job_text[1:]} failed with {failed}.", "", message, "",
                 "slurmgate requeues it where the policy allows (from its checkpoint, away "
                 "from the failed node) and credits the lost run."]
        return Content(subject, "\n".join(lines), fields)
    if kind == "node_drained":
        subject = f"{PREFIX} node {node or '?'} drained"
        lines = [f"slurmgate drained node {node or '?'}.", "", message, "",
                 f"Resume it when it is healthy: `scontrol update NodeName={node or 'NODE'} "
                 "State=RESUME`."]
        return Content(subject, "\n".join(lines), fields)
    return Content(f"{PREFIX} {event.get('kind')}", message, fields)


def alert_kind_of(event_kind: str) -> str | None:
    return EVENT_KINDS.get(event_kind)


def deliveries(policy: Policy, kind: str, key: str, content: Content, *, team: str | None,
               user: str | None) -> tuple[list[NewSend], list[str]]:
    """(the sends of an alert, users without an address): one mail to every recipient the
    policy names for ``kind`` (when there is a relay and anyone to send to), one POST to each
    usable webhook that takes ``kind``."""
    alerts = policy.alerts
    team_cfg = policy.teams.get(team or "")
    to, missing = recipients(alerts, kind, user=user,
                             leads=team_cfg.leads if team_cfg else (),
                             members=team_cfg.members if team_cfg else (),
                             admins=policy.daemon.admins)
    sends: list[NewSend] = []
    if alerts.smtp_host and to:
        sends.append(NewSend("mail", ", ".join(to), {
            "to": to, "subject": content.subject, "body": content.body, "kind": kind}))
    for hook in alerts.webhooks_for(kind):
        text = f"*{slack_escape(content.subject.removeprefix(PREFIX).strip())}*\n" \
               f"{slack_escape(content.body)}"
        body: dict[str, Any] = {"text": text}
        if hook.format == "full":
            body.update(kind=kind, dedupe_key=key, cluster=policy.daemon.cluster,
                        subject=content.subject, fields=content.fields)
        sends.append(NewSend(f"webhook:{hook.ident()}", describe(hook), body))
    return sends, missing


def make_alert(policy: Policy, kind: str, key: str, content: Content, *, ts: float,
               team: str | None = None, user: str | None = None, job_id: int | None = None,
               node: str | None = None, event_id: int | None = None,
               covers: tuple[str, ...] = ()) -> tuple[NewAlert, list[str]]:
    """The alert to record, with its deliveries; and the users it could not reach."""
    sends, missing = deliveries(policy, kind, key, content, team=team, user=user)
    return NewAlert(dedupe_key=key, kind=kind, subject=content.subject, body=content.body,
                    ts=ts, cluster=policy.daemon.cluster, team=team, user=user,
                    job_id=job_id, node=node, event_id=event_id, detail=content.fields,
                    sends=tuple(sends), covers=covers), missing
