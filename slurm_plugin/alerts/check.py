"""Checks of the [alerts] configuration that need I/O: the password file and webhook URL
files can be read (and others cannot), the SMTP relay accepts a connection.

``slurmgate check-policy`` prints them (the relay only with ``--connect``); the daemon's alert
scan logs them at start and after every reload (``alerts_config_problem``) and runs on.
"""

from __future__ import annotations

import socket

from policies.alerts import problems
from policies.config import Policy
from slurm_plugin.alerts import SendError
from slurm_plugin.alerts.mail import read_password
from slurm_plugin.alerts.webhook import webhook_url


def config_problems(policy: Policy, *, connect: bool,
                    timeout: float = 3.0) -> list[tuple[str, str]]:
    """(field, what is wrong) for every problem of ``policy.alerts``; with ``connect``, a TCP
    connection to the relay is tried too (bounded by ``timeout``)."""
    a = policy.alerts
    found = list(problems(a))
    bad_fields = {f for f, _ in found}
    if a.username and a.password_file:
        try:
            if not read_password(a.password_file):
                found.append(("alerts.password_file", f"{a.password_file}: empty"))
        except SendError as exc:
            found.append(("alerts.password_file", str(exc).removeprefix(
                "alerts.password_file ")))
    for i, hook in enumerate(a.webhooks):
        field = f"alerts.webhooks.{i}.url_file"
        if hook.url_file and not hook.url and field not in bad_fields:
            try:
                webhook_url(hook)
            except SendError as exc:
                found.append((field, str(exc)))
    if connect and a.smtp_host:
        where = f"{a.smtp_host}:{a.port()}"
        try:
            with socket.create_connection((a.smtp_host, a.port()), timeout=timeout):
                pass
        except OSError as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            found.append(("alerts.smtp_host",
                          f"cannot connect to the mail relay {where} ({why}, within "
                          f"{timeout:g} s)"))
    return found
