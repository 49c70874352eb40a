"""Alert webhooks: one JSON POST per alert, Slack-compatible (``text``), bounded by a timeout.

A 2xx answer is success; anything else, a redirect included (never followed: a webhook that
moved must be changed in the policy, and a redirect must not send alerts somewhere else), a
timeout or a refused connection is a ``SendError`` for the send log. Slack, Mattermost and
Teams accept the ``text`` field; ``format = "full"`` adds every field of the alert beside it.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from policies.alerts import Webhook, url_problem
from slurm_plugin.alerts import SendError
from slurm_plugin.fsutil import PrivateFileError, read_private_file

MAX_ANSWER_BYTES = 65536
USER_AGENT = "slurmgate-alerts"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises HTTPError with the 3xx


_OPENER = urllib.request.build_opener(_NoRedirect)


def webhook_url(hook: Webhook) -> str:
    """The URL to POST to (read from url_file when that is given). Raises SendError naming
    the field when it cannot be used."""
    if hook.url:
        url = hook.url
    else:
        try:
            url = read_private_file(hook.url_file).decode("utf-8", "replace").strip()
        except (OSError, PrivateFileError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SendError(f"url_file {hook.url_file}: cannot use it ({why})") from exc
    problem = url_problem(url)
    if problem:
        raise SendError(problem.replace(repr(url), "(the URL)") if hook.url_file else problem)
    return url


def describe(hook: Webhook) -> str:
    """The webhook for people reading the send log: its name and host, never the URL's path
    or query (Slack's carry the secret)."""
    host = ""
    if hook.url:
        try:
            host = urlsplit(hook.url).hostname or ""
        except ValueError:
            host = "?"
    else:
        host = f"url_file {hook.url_file}"
    return f"{hook.ident()} ({host})" if host else hook.ident()


def slack_escape(text: str) -> str:
    """Slack's three control characters, so a job name cannot @-mention a channel, and a
    zero-width joiner after every ``@``, so text a user wrote cannot mention anyone on
    Mattermost-style hooks either (``@channel``, ``@all``, ``@here``)."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("@", "@\u2060"))


def post(hook: Webhook, body: dict[str, Any], *, timeout: float) -> int:
    """POST ``body`` as JSON to ``hook``; returns the HTTP status (2xx) or raises SendError."""
    url = webhook_url(hook)
    data = json.dumps(body, sort_keys=True, default=str).encode("utf-8")
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT}
    headers.update(hook.headers)
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    name = hook.ident()
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            answer.read(MAX_ANSWER_BYTES)
            status = int(answer.status)
    except urllib.error.HTTPError as exc:
        text = exc.read(300).decode("utf-8", "replace").strip() if exc.fp else ""
        exc.close()
        raise SendError(f"webhook {name} answered {exc.code} {exc.reason}"
                        + (f": {text}" if text else "")) from exc
    except urllib.error.URLError as exc:
        why = exc.reason
        text = "timed out" if isinstance(why, socket.timeout | TimeoutError) else (
            getattr(why, "strerror", None) or str(why))
        raise SendError(f"webhook {name} unreachable: {text}", connection=True) from exc
    except TimeoutError as exc:
        raise SendError(f"webhook {name} timed out after {timeout:g} s",
                        connection=True) from exc
    except (OSError, ValueError) as exc:
        raise SendError(f"webhook {name} failed: {exc}", connection=True) from exc
    if not 200 <= status < 300:
        raise SendError(f"webhook {name} answered {status}")
    return status
