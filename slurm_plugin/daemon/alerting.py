"""The alert scan beside the daemon: one thread over the daemon's store, lock and ledger.

``start_alerts(daemon)`` (called once from server.serve) starts it whether or not alerts are
enabled, so turning them on is a policy reload (SIGHUP) away. Budgets are read from the
daemon's in-memory ledger (no SQL on the way); every store call the scan makes is a short
transaction under the daemon's lock, and no mail or webhook wait ever holds it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from db.alert_log import AlertLog
from policies.ledger import period_bounds
from slurm_plugin.alerts.dispatch import BudgetSnapshot, Dispatcher, SpendSource

if TYPE_CHECKING:
    from slurm_plugin.daemon.service import Daemon


def ledger_spend(daemon: Daemon) -> SpendSource:
    """Spend and reservations by team in the current period, from the daemon's ledger (rolled
    over to a new period first when the period has changed)."""

    def spend(now: float) -> BudgetSnapshot:
        policy = daemon.policy
        with daemon.lock:
            if daemon.ledger.period != period_bounds(policy.budgets.period, now)[2]:
                daemon.roll_period(policy, now)
            ledger = daemon.ledger
            return BudgetSnapshot(ledger.period, dict(ledger.spent), dict(ledger.reserved))

    return spend


def make_dispatcher(daemon: Daemon) -> Dispatcher | None:
    if daemon.store is None:
        return None
    return Dispatcher(AlertLog(daemon.store), lambda: daemon.policy, ledger_spend(daemon),
                      write_log=daemon.log.write, lock=daemon.lock,
                      on_send=daemon.metrics.alert_sent, on_error=daemon.metrics.error,
                      leading=daemon.leadership.check)


def start_alerts(daemon: Daemon) -> threading.Thread | None:
    """Start the alert thread (a daemon thread that ends with ``daemon.stopping``)."""
    dispatcher = make_dispatcher(daemon)
    if dispatcher is None:
        return None
    thread = threading.Thread(target=dispatcher.run, args=(daemon.stopping,), daemon=True,
                              name="alerts")
    thread.start()
    return thread
