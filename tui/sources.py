"""Where the TUI's data comes from: Slurm (through the client layer), the accounting store
(read-only) and the daemon (quotas, admin actions). Every method here blocks: call them from
worker threads only.

``Sources`` is what the views use. ``LiveSources`` reads the real cluster; ``tui.demo``
builds a fixed synthetic one for screenshots and tests.

A ledger may hold several clusters' runs (one PostgreSQL ledger). ``cluster`` is the view
filter of ``slurmgate tui --cluster NAME``: the quotas, chargeback and events views show that
cluster's figures (None: every cluster's; the quotas, the daemon's own). The queue and the
nodes are Slurm's, so always this cluster's (``slurm_cluster``: ``[daemon] cluster``).
"""

from __future__ import annotations

import os
import pwd
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from db.store import Store, StoreError, open_store
from policies.config import Policy, load_policy
from slurm_plugin.slurm.client import Job, Node, SlurmClient
from slurm_plugin.slurm.factory import open_client


@dataclass(frozen=True)
class Viewer:
    """Who is looking: admins see every team and may act; others see their teams only."""

    user: str
    admin: bool
    teams: frozenset[str]

    def sees(self, team: str | None) -> bool:
        return self.admin or (team is not None and team in self.teams)


def viewer_for(policy: Policy, uid: int | None = None) -> Viewer:
    """Mirror of the daemon's rule: root or a user in [daemon] admins is an admin."""
    uid = os.geteuid() if uid is None else uid
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    admin = uid == 0 or user in policy.daemon.admins
    return Viewer(user, admin, frozenset(policy.teams_of_user(user)))


class Sources:
    """Blocking data access for the views (subclasses fill in quota and action)."""

    demo = False

    def __init__(self, policy: Policy, slurm: SlurmClient, viewer: Viewer,
                 clock: Callable[[], float] = time.time, *, cluster: str | None = None) -> None:
        self.policy = policy
        self.slurm = slurm
        self.viewer = viewer
        self.clock = clock
        self.cluster = cluster
        """The ledger views' cluster (None: every cluster on the ledger)."""
        self._store: Store | None = None
        self._store_lock = threading.Lock()

    @property
    def currency(self) -> str:
        return self.policy.rates.currency

    @property
    def slurm_cluster(self) -> str:
        """The cluster Slurm answers for (the queue and nodes views): ``[daemon] cluster``."""
        return self.policy.daemon.cluster

    def quota_request(self) -> dict[str, Any]:
        """The daemon's quota op for the view: another cluster's with a budget per cluster;
        with global budgets there is one quota, across clusters, whatever the filter."""
        request: dict[str, Any] = {"op": "quota"}
        if self.cluster is not None and self.policy.budgets.scope == "cluster":
            request["cluster"] = self.cluster
        return request

    def jobs(self) -> list[Job]:
        return self.slurm.jobs()

    def nodes(self) -> list[Node]:
        return self.slurm.nodes()

    def open_store(self) -> Store:
        return open_store(self.policy.daemon.ledger(), readonly=True)

    @contextmanager
    def store(self) -> Iterator[Store]:
        """The read-only store, opened on first use; one query at a time across threads."""
        with self._store_lock:
            if self._store is None:
                self._store = self.open_store()
            yield self._store

    def quota(self) -> dict[str, Any]:
        """What the daemon's quota op answers for ``quota_request()``."""
        raise NotImplementedError

    def action(self, request: dict[str, Any]) -> str:
        raise NotImplementedError

    def close(self) -> None:
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class DaemonError(RuntimeError):
    """The daemon refused a request or could not be reached; the message says why."""


class LiveSources(Sources):
    """The real cluster: Slurm through ``open_client``, quotas and actions via the daemon."""

    def __init__(self, policy: Policy, slurm: SlurmClient | None = None,
                 viewer: Viewer | None = None, socket_path: str | None = None, *,
                 cluster: str | None = None) -> None:
        super().__init__(policy, slurm or open_client(policy), viewer or viewer_for(policy),
                         cluster=cluster)
        self.socket_path = socket_path or policy.daemon.socket

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        from slurm_plugin.protocol import DaemonUnavailable, call

        try:
            resp = call(self.socket_path, request, timeout=30.0)
        except DaemonUnavailable as exc:
            raise DaemonError(str(exc)) from exc
        if not resp.get("ok"):
            raise DaemonError(f"daemon: {resp.get('error', 'request failed')}")
        return resp

    def quota(self) -> dict[str, Any]:
        return self._call(self.quota_request())

    def action(self, request: dict[str, Any]) -> str:
        self._call({"op": "action", **request})
        target = f"job {request['job_id']}" if "job_id" in request else request.get("node")
        return f"{request['action']} {target}: done"


def open_sources(config_path: str, cluster: str | None = None) -> LiveSources:
    """Sources for the live cluster named by the policy file (raises PolicyError); the
    ledger views show ``cluster`` (None: every cluster)."""
    return LiveSources(load_policy(config_path), cluster=cluster)


__all__ = ["DaemonError", "LiveSources", "Sources", "StoreError", "Viewer", "open_sources",
           "viewer_for"]
