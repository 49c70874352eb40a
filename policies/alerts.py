"""The ``[alerts]`` section: who is told what, by mail and by webhook, and when.

Pure: the model, the alert kinds and their default recipients, how a Slurm user name becomes
an address, and ``problems``, the check of what only alerting depends on. Such problems
(a malformed webhook URL, an unknown alert kind or recipient, a bad threshold) never make the
policy invalid, so a typo here cannot stop the daemon deciding submissions: ``slurmgate
check-policy`` reports each with its field, the daemon logs them at start and on reload and
runs on with that part switched off. Type errors (a port that is not a number) and unknown
settings make the file invalid as anywhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

KINDS = ("budget_threshold", "idle_gpu_warning", "idle_gpu_action", "job_held",
         "node_failure", "node_drained")
"""Every alert kind, in the order the documentation lists them."""

EVENT_KINDS: dict[str, str] = {
    "idle_warning": "idle_gpu_warning",
    "idle_action": "idle_gpu_action",
    "hold": "job_held",
    "unchecked_held": "job_held",
    "node_fail": "node_failure",
    "drain": "node_drained",
}
"""Event kind (the events table) -> the alert kind it raises. Budget thresholds come from the
ledger, not from events."""

ROLES = ("team_leads", "team_members", "job_user", "admins")
"""Recipients by role; anything with an ``@`` in a recipients list is an explicit address."""

DEFAULT_RECIPIENTS: dict[str, tuple[str, ...]] = {
    "budget_threshold": ("team_leads", "admins"),
    "idle_gpu_warning": ("job_user",),
    "idle_gpu_action": ("job_user", "team_leads"),
    "job_held": ("job_user",),
    "node_failure": ("job_user", "admins"),
    "node_drained": ("admins",),
}

TLS_PORTS = {"none": 25, "starttls": 587, "ssl": 465}
MAX_THRESHOLD = 1000.0
"""Thresholds are percent of the budget; above 100 says "this far over"."""

_ADDRESS = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}$")
_DOMAIN = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def is_address(text: str) -> bool:
    """A plain ``local@domain`` address (no display name, no spaces, nothing to inject)."""
    return len(text) <= 254 and bool(_ADDRESS.match(text))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Webhook(_Model):
    url: str = ""
    """http(s) URL the alert is POSTed to as JSON. Slack, Mattermost and Teams incoming
    webhooks carry a secret in the URL: put those in url_file instead (the policy file is
    readable by every user)."""
    url_file: str = ""
    """File holding the URL, readable only by the daemon's user (instead of url)."""
    name: str = ""
    """Label in logs and metrics, and the webhook's identity in the send log (default: made
    from the URL). Keep it when the URL changes, so an alert is not sent twice."""
    kinds: list[str] = []
    """Alert kinds sent to this webhook; empty means every kind."""
    headers: dict[str, str] = {}
    """Extra HTTP headers (no secrets: the policy file is readable by every user)."""
    format: Literal["full", "slack"] = "full"
    """"full": text (Slack-compatible) plus every field of the alert; "slack": only text."""

    def ident(self) -> str:
        """Stable identity of this webhook in the send log and its dedupe keys."""
        if self.name:
            return self.name
        import hashlib

        source = self.url or "file:" + self.url_file
        return "h" + hashlib.sha256(source.encode()).hexdigest()[:10]


class Alerts(_Model):
    enabled: bool = False
    """Send alerts at all. Off by default: a site that upgrades sees no change."""
    dry_run: bool = False
    """Decide and log every alert (and keep it in the send log, so it is never sent later)
    without mailing or posting anything."""
    smtp_host: str = ""
    """Mail relay; empty: no mail (webhooks only)."""
    smtp_port: int = 0
    """0: 25 for tls "none", 587 for "starttls", 465 for "ssl"."""
    tls: Literal["none", "starttls", "ssl"] = "starttls"
    """"starttls" upgrades the connection (and fails when the relay does not offer it);
    "ssl" is TLS from the first byte (SMTPS); "none" only for a relay on the same host."""
    username: str = ""
    """SMTP login; empty: no authentication."""
    password_file: str = ""
    """File holding the SMTP password, readable only by the daemon's user (not by others)."""
    sender: str = ""
    """From address of every mail (required with smtp_host), e.g. slurmgate@example.org."""
    mail_domain: str = ""
    """A Slurm user name becomes user@mail_domain unless ``addresses`` names them."""
    addresses: dict[str, str] = {}
    """Slurm user name -> mail address (admins such as root usually need one)."""
    recipients: dict[str, list[str]] = {}
    """Per alert kind: roles (team_leads, team_members, job_user, admins) and explicit
    addresses. A kind not named keeps its default; an empty list sends it to webhooks only."""
    budget_thresholds: list[float] = [50.0, 80.0, 90.0, 100.0]
    """Percent of a team's budget in the current period (settled spend after credits); each
    is alerted once per team and period."""
    webhooks: list[Webhook] = []
    """JSON POST receivers; see [[alerts.webhooks]] in the example policy."""
    scan_seconds: float = 30.0
    """How often new events and the budgets are checked and due sends are tried."""
    send_timeout_s: float = 10.0
    """Bound on one mail or webhook delivery (connect, TLS, every read and write)."""
    max_attempts: int = 5
    """Deliveries are tried this often, then given up (an alert_failed event and a log line)."""
    retry_seconds: float = 60.0
    """Wait after the first failed attempt; doubled after each one, at most an hour."""
    event_max_age_hours: float = 24.0
    """Events older than this when first scanned (alerts were off when they happened) are
    passed over instead of alerted late."""

    # -- lookups ----------------------------------------------------------------------------

    def port(self) -> int:
        return self.smtp_port or TLS_PORTS[self.tls]

    def address_of(self, user: str | None) -> str | None:
        """The mail address of a Slurm user: the ``addresses`` map, else user@mail_domain
        for a plain user name, else None."""
        if not user:
            return None
        mapped = self.addresses.get(user)
        if mapped is not None:
            return mapped if is_address(mapped) else None
        if self.mail_domain and _USER.match(user) and _DOMAIN.match(self.mail_domain):
            return f"{user}@{self.mail_domain}"
        return None

    def recipients_of(self, kind: str) -> tuple[str, ...]:
        named = self.recipients.get(kind)
        return tuple(named) if named is not None else DEFAULT_RECIPIENTS.get(kind, ())

    def thresholds(self) -> list[float]:
        """The usable budget thresholds, ascending, without duplicates."""
        return sorted({float(t) for t in self.budget_thresholds if 0 < t <= MAX_THRESHOLD})

    def usable_webhooks(self) -> list[Webhook]:
        """The webhooks ``problems`` finds nothing wrong with (the others are off)."""
        bad = {i for i, _ in _webhook_problems(self)}
        return [w for i, w in enumerate(self.webhooks) if i not in bad]

    def webhooks_for(self, kind: str) -> list[Webhook]:
        """The usable webhooks that take ``kind``."""
        return [w for w in self.usable_webhooks() if not w.kinds or kind in w.kinds]


def recipients(alerts: Alerts, kind: str, *, user: str | None, leads: Iterable[str] = (),
               members: Iterable[str] = (),
               admins: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(addresses, users who have none) for an alert of ``kind``: the roles of the kind's
    recipients resolved to the team's ``leads`` and ``members``, the policy's ``admins`` and
    the job's ``user``, plus explicit addresses. Unknown roles and malformed addresses are
    skipped (``problems`` names them)."""
    out: list[str] = []
    missing: list[str] = []

    def add_user(name: str | None) -> None:
        address = alerts.address_of(name)
        if address is None:
            if name:
                missing.append(name)
        elif address not in out:
            out.append(address)

    by_role = {"team_leads": list(leads), "team_members": list(members),
               "admins": list(admins), "job_user": [user] if user else []}
    for entry in alerts.recipients_of(kind):
        if "@" in entry:
            if is_address(entry) and entry not in out:
                out.append(entry)
        else:
            for name in by_role.get(entry, []):
                add_user(name)
    return out, sorted(set(missing))


def _webhook_problems(alerts: Alerts) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for i, hook in enumerate(alerts.webhooks):
        if bool(hook.url) == bool(hook.url_file):
            found.append((i, "give url or url_file (one of them)"))
            continue
        if hook.url:
            why = url_problem(hook.url)
            if why:
                found.append((i, why))
    return found


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as exc:
        return f"malformed URL {url!r}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"malformed URL {url!r}: must start with http:// or https://"
    if not parts.hostname:
        return f"malformed URL {url!r}: no host"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return f"malformed URL {url!r}: contains spaces or control characters"
    return None


def problems(a: Alerts) -> list[tuple[str, str]]:
    """(field, what is wrong) for every problem of the ``[alerts]`` section that needs no
    I/O to see. Checked whether or not alerts are enabled (an admin turning them on should
    not meet them then)."""
    found: list[tuple[str, str]] = []
    known = ", ".join(KINDS)
    for kind, entries in a.recipients.items():
        if kind not in KINDS:
            found.append((f"alerts.recipients.{kind}",
                          f"unknown alert kind {kind!r}; one of {known}"))
            continue
        for j, entry in enumerate(entries):
            if "@" in entry:
                if not is_address(entry):
                    found.append((f"alerts.recipients.{kind}.{j}",
                                  f"malformed address {entry!r}"))
            elif entry not in ROLES:
                found.append((f"alerts.recipients.{kind}.{j}",
                              f"unknown recipient {entry!r}; a role ({', '.join(ROLES)}) "
                              "or an address"))
    for user, address in a.addresses.items():
        if not is_address(address):
            found.append((f"alerts.addresses.{user}", f"malformed address {address!r}"))
    if a.mail_domain and not _DOMAIN.match(a.mail_domain):
        found.append(("alerts.mail_domain", f"not a domain: {a.mail_domain!r}"))
    if a.smtp_host:
        if not a.sender:
            found.append(("alerts.sender", "required with smtp_host (the From address)"))
        elif not is_address(a.sender):
            found.append(("alerts.sender", f"malformed address {a.sender!r}"))
        if not 0 <= a.smtp_port <= 65535:
            found.append(("alerts.smtp_port", f"not a port: {a.smtp_port}"))
        if a.username and not a.password_file:
            found.append(("alerts.password_file", "required with username"))
    for t in a.budget_thresholds:
        if not 0 < t <= MAX_THRESHOLD:
            found.append(("alerts.budget_thresholds",
                          f"{t:g} is not a percentage in (0, {MAX_THRESHOLD:g}]"))
    for i, why in _webhook_problems(a):
        field = "url" if a.webhooks[i].url else "url_file"
        found.append((f"alerts.webhooks.{i}.{field}", why))
    for i, hook in enumerate(a.webhooks):
        for kind in hook.kinds:
            if kind not in KINDS:
                found.append((f"alerts.webhooks.{i}.kinds",
                              f"unknown alert kind {kind!r}; one of {known}"))
        for name, value in hook.headers.items():
            if not _HEADER.match(name) or any(c in value for c in "\r\n"):
                found.append((f"alerts.webhooks.{i}.headers.{name}",
                              "not a valid HTTP header (letters, digits, '-'; one line)"))
    idents = [h.ident() for h in a.webhooks]
    for i, ident in enumerate(idents):
        if ident in idents[:i]:
            found.append((f"alerts.webhooks.{i}.name", f"two webhooks are both {ident!r}"))
    timings = {"scan_seconds": a.scan_seconds, "send_timeout_s": a.send_timeout_s,
               "retry_seconds": a.retry_seconds}
    for name, seconds in timings.items():
        if not seconds > 0:
            found.append((f"alerts.{name}", "must be positive"))
    if a.max_attempts < 1:
        found.append(("alerts.max_attempts", "must be at least 1"))
    return found
