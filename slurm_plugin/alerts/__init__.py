"""Alerts that reach people: budget thresholds, idle GPUs, held jobs, failed and drained nodes,
by mail (mail.py) and webhook (webhook.py); what each kind says and to whom (kinds.py); the
scan that decides, dedupes and retries (dispatch.py); the checks of the configuration that
need I/O (check.py). The policy model is policies/alerts.py, the send log db/alert_log.py.

Nothing here imports the daemon: slurm_plugin/daemon/alerting.py starts the scan beside it.
"""

from __future__ import annotations


class SendError(RuntimeError):
    """A delivery failed; the message says how (for the send log and the daemon's log).
    ``connection`` is True when the other side could not be reached at all."""

    def __init__(self, message: str, *, connection: bool = False) -> None:
        super().__init__(message)
        self.connection = connection
