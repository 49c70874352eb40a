"""Which daemon of a cluster does the once-only work (spool ingest, reconcile, failure
handling, the idle scan, alerts): the one that holds the cluster's leader lock.

On SQLite there is one daemon per ledger (the file's flock says so): it always leads. On
PostgreSQL every controller host runs a daemon against the same ledger; the leader is the
one whose session holds the advisory lock ``(LOCK_CLASS, cluster key)``. The lock lives as
long as that session: a daemon that exits, crashes or is killed loses it at once (the
server sees the socket close); a host that vanishes loses it when the server's TCP
keepalives give up on it (INSTALL: ``tcp_keepalives_*``), and the client's own keepalives
and ``tcp_user_timeout`` make the old leader notice it is cut off in the same few seconds.

``Leadership.check()`` is called before every round of once-only work: it takes the lock
when free, and confirms it is still held (a round trip on the lock's own session) when
held. A leader that cannot confirm steps down before doing anything; a round never starts
on a daemon that is not the leader.
"""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from db.backend import PostgresConnection, connect_postgresql, database_errors, is_postgresql

LOCK_CLASS = 0x5A6E  # int4 class of slurmgate's advisory locks (the second int: the cluster)

KEEPALIVE = {"keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1,
             "keepalives_count": 3, "tcp_user_timeout": 5000}
"""libpq settings of the lock's session: a dead server or network is noticed in ~5 s."""


def cluster_key(cluster: str) -> int:
    """The cluster's int4 key of the leader lock (one leader per cluster in a shared DB)."""
    return zlib.crc32(cluster.encode()) & 0x7FFFFFFF


class Leadership:
    """The leader lock of one cluster's daemons, held on a session of its own."""

    def __init__(self, target: str, cluster: str, *,
                 on_change: Callable[[bool, str], None] | None = None,
                 connect: Callable[[], Any] | None = None) -> None:
        self.target = target
        self.cluster = cluster
        self.shared = is_postgresql(target)
        self.on_change = on_change
        self._connect = connect
        self._conn: PostgresConnection | None = None
        self._leader = not self.shared
        self._mutex = threading.Lock()
        self.since = time.time() if self._leader else None
        self.last_error = ""

    @property
    def is_leader(self) -> bool:
        """The last known state (no round trip); ``check()`` confirms it."""
        return self._leader

    def check(self) -> bool:
        """Whether this daemon leads now: take the lock if it is free, confirm it if held.
        Never raises; a database error means "not the leader" until the next check."""
        if not self.shared:
            return True
        with self._mutex:
            try:
                conn = self._session()
                got = bool(conn.scalar("SELECT pg_try_advisory_lock(:c, :k)",
                                       {"c": LOCK_CLASS, "k": cluster_key(self.cluster)}))
                if got and self._leader:
                    # re-entrant: each success stacks a lock level; keep exactly one
                    conn.execute("SELECT pg_advisory_unlock(:c, :k)",
                                 {"c": LOCK_CLASS, "k": cluster_key(self.cluster)})
                self.last_error = ""
                self._set(got, "lock taken" if got else "another daemon holds the lock")
            except database_errors() as exc:
                self.last_error = str(exc).strip()[:300]
                self._drop()
                self._set(False, f"ledger unreachable: {self.last_error}")
            return self._leader

    def release(self) -> None:
        """Give the lock up (at shutdown: the other daemon takes over at its next check)."""
        with self._mutex:
            self._drop()
            self._set(False, "released")

    def _session(self) -> PostgresConnection:
        if self._conn is None:
            if self._connect is not None:
                self._conn = self._connect()
            else:
                self._conn = connect_postgresql(self.target, readonly=False,
                                                application_name="slurmgate-leader",
                                                extra=KEEPALIVE)
        assert self._conn is not None
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # the session is gone either way; the lock too
                conn.close()

    def _set(self, leader: bool, why: str) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        self.since = time.time() if leader else None
        if self.on_change is not None:
            self.on_change(leader, why)
