"""Alert mail over SMTP: one message per alert, every wait bounded by a timeout.

TLS as the policy says: "starttls" fails when the relay does not offer STARTTLS (the mail is
never sent in clear instead), "ssl" speaks TLS from the first byte, both verify the relay's
certificate against the system's CAs. Any failure is a ``SendError`` whose text goes to the
send log; nothing here retries (dispatch.py does).
"""

from __future__ import annotations

import hashlib
import smtplib
import socket
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

from policies.alerts import Alerts
from slurm_plugin.alerts import SendError
from slurm_plugin.fsutil import PrivateFileError, read_private_file


@dataclass(frozen=True)
class Mail:
    to: list[str]
    subject: str
    body: str
    dedupe_key: str
    kind: str


def read_password(path: str) -> str:
    """The SMTP password in ``path`` (one line; surrounding whitespace dropped). Raises
    SendError naming the field when it cannot be used."""
    try:
        data = read_private_file(path)
    except (OSError, PrivateFileError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SendError(f"alerts.password_file {path}: cannot use it ({why})") from exc
    return data.decode("utf-8", "replace").strip()


def clean_header(text: str, limit: int = 200) -> str:
    """One line of header text: control characters (CR, LF ...) become spaces."""
    out = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)
    return " ".join(out.split())[:limit]


def message_id(dedupe_key: str) -> str:
    """The same Message-ID for every attempt of one delivery: a receiver that sees it twice
    (a crash right after the relay took it) can drop the second."""
    return f"<{hashlib.sha256(dedupe_key.encode()).hexdigest()[:32]}@slurmgate>"


def build_message(mail: Mail, sender: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(mail.to)
    msg["Subject"] = clean_header(mail.subject)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = message_id(mail.dedupe_key)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    msg["X-Slurmgate-Alert"] = clean_header(mail.kind, 64)
    msg["X-Slurmgate-Dedupe-Key"] = clean_header(mail.dedupe_key, 300)
    msg.set_content(mail.body)
    return msg


def send_mail(alerts: Alerts, mail: Mail, *, timeout: float) -> list[str]:
    """Send ``mail`` through ``alerts``' relay; returns the recipients the relay refused
    (the others got it). Raises SendError when nobody got it."""
    if not alerts.smtp_host:
        raise SendError("alerts.smtp_host is not set: no mail relay")
    if not mail.to:
        raise SendError("no recipients")
    password = read_password(alerts.password_file) if alerts.username else ""
    host, port = alerts.smtp_host, alerts.port()
    where = f"{host}:{port}"
    context = ssl.create_default_context()
    try:
        client: smtplib.SMTP
        if alerts.tls == "ssl":
            client = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
        else:
            client = smtplib.SMTP(host, port, timeout=timeout)
    except (OSError, smtplib.SMTPException) as exc:
        raise SendError(f"cannot connect to the mail relay {where} "
                        f"(alerts.smtp_host): {_why(exc)}", connection=True) from exc
    try:
        client.ehlo_or_helo_if_needed()
        if alerts.tls == "starttls":
            if not client.has_extn("starttls"):
                raise SendError(f"the mail relay {where} does not offer STARTTLS; set "
                                'alerts.tls = "ssl" or (a relay on this host) "none"')
            client.starttls(context=context)
            client.ehlo()
        if alerts.username:
            client.login(alerts.username, password)
        refused = client.send_message(build_message(mail, alerts.sender))
    except SendError:
        raise
    except smtplib.SMTPRecipientsRefused as exc:
        raise SendError(f"the mail relay {where} refused every recipient: "
                        f"{_refusals(exc.recipients)}") from exc
    except smtplib.SMTPAuthenticationError as exc:
        raise SendError(f"the mail relay {where} refused the login of alerts.username "
                        f"{alerts.username!r}: {_why(exc)}") from exc
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        raise SendError(f"mail to {where} failed: {_why(exc)}",
                        connection=isinstance(exc, socket.timeout | ConnectionError)) from exc
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()
    return sorted(refused)


def _refusals(recipients: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{rcpt}: {code} {msg.decode('utf-8', 'replace')}"
                     for rcpt, (code, msg) in sorted(recipients.items()))


def _why(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(
            exc.smtp_error, bytes) else str(exc.smtp_error)
        return f"{exc.smtp_code} {text}"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
