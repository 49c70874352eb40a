"""``serve``: the daemon's startup, signals, database lock and metrics, around its socket.

slurmctld keeps one connection open; CLI calls and hook nudges come and go. The connections
(a thread per controller, one shared selector thread and a small worker pool for everyone else,
with the users' limits) live in connections.py; what a peer may ask is decided per request
from SO_PEERCRED (service.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import threading
from typing import Any

from policies.config import LedgerConfigError, PolicyError, load_policy
from slurm_plugin.daemon.alerting import start_alerts
from slurm_plugin.daemon.connections import ConnectionServer, raise_fd_limit
from slurm_plugin.daemon.prometheus import MetricsError, MetricsServer, spool_backlog
from slurm_plugin.daemon.service import Daemon


def serve(config_path: str) -> int:
    try:
        policy = load_policy(config_path)
    except PolicyError as exc:
        print(f"slurmgate daemon: {exc}", file=sys.stderr)
        return 2
    from db.backend import is_postgresql
    from db.store import PRIVATE_UMASK, StoreError, open_store

    # Everything the daemon creates (database, -wal/-shm, log, lock) is at most 0640,
    # whatever umask it was started with (systemd's UMask=0027 or a shell's 022).
    os.umask(PRIVATE_UMASK)
    try:
        ledger = policy.daemon.ledger()
    except LedgerConfigError as exc:
        print(f"slurmgate daemon: {exc}", file=sys.stderr)
        return 2
    lock_fd = None
    if not is_postgresql(ledger):  # a SQLite file has one writer: this daemon
        try:
            os.makedirs(os.path.dirname(ledger) or ".", exist_ok=True)
            lock_fd = lock_database(ledger)
        except (DaemonRunning, OSError) as exc:
            print(f"slurmgate daemon: {exc}", file=sys.stderr)
            return 1
    try:
        store = open_store(ledger)
    except (StoreError, OSError) as exc:
        print(f"slurmgate daemon: {exc}", file=sys.stderr)
        return 2
    slurm = None
    try:
        from slurm_plugin.slurm.factory import open_client

        slurm = open_client(policy)
    except Exception as exc:  # the daemon still decides; reconcile waits for Slurm
        print(f"slurmgate daemon: no Slurm client ({exc}); reconcile disabled", file=sys.stderr)
    daemon = Daemon(config_path, policy, store, slurm)
    daemon.refresh_ledger()
    os.makedirs(policy.daemon.spool_dir, exist_ok=True)
    path = policy.daemon.socket
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        # A live daemon answers; a stale socket from a crash is removed.
        busy = probe_socket(path)
        if busy:
            print(f"slurmgate daemon: {busy}", file=sys.stderr)
            return 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    # Users' connections are capped well below the descriptor limit (connections.py); a
    # higher limit leaves room for max_user_connections with systemd's default of 1024.
    raise_fd_limit()
    old_umask = os.umask(0o111)
    try:
        server = ConnectionServer(path, daemon)
    finally:
        os.umask(old_umask)
    # Anyone may connect; what a peer may ask is decided per request from SO_PEERCRED.
    os.chmod(path, 0o666)

    signal.signal(signal.SIGHUP, lambda *_: daemon.reload())

    def _stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    daemon.metrics.on_scrape(lambda: daemon.metrics.set_spool_backlog(
        spool_backlog(daemon.policy.daemon.spool_dir)))
    metrics_server = None
    try:
        metrics_server = MetricsServer.from_policy(policy, daemon.metrics)
        if metrics_server:
            metrics_server.start()
    except MetricsError as exc:  # never served unauthenticated: off, said loudly
        daemon.log.write("metrics_disabled", error=str(exc))
        print(f"slurmgate daemon: metrics disabled: {exc}", file=sys.stderr)
    daemon.log.write("daemon_started", pid=os.getpid(), socket=path, config=config_path,
                     ledger=store.dialect)
    for target in (daemon.ingest_loop, daemon.reconcile_loop):
        threading.Thread(target=target, daemon=True, name=target.__name__).start()
    start_alerts(daemon)
    daemon.ingest_wakeup.set()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        daemon.stopping.set()
        daemon.leadership.release()
        if metrics_server:
            metrics_server.stop()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        daemon.log.write("daemon_stopped", pid=os.getpid())
        if lock_fd is not None:
            os.close(lock_fd)  # the lock goes with it
    return 0


class DaemonRunning(RuntimeError):
    """Another daemon holds the database's lock; the message names its pid."""


def lock_path(database: str) -> str:
    return database + ".lock"


def lock_database(database: str) -> int | None:
    """Take ``<database>.lock`` (flock LOCK_EX|LOCK_NB) for the daemon's life and write our
    pid into it: the daemon is the database's only writer, and a second one refuses to start.
    Returns the descriptor to keep open (None for an in-memory database)."""
    if database in ("", ":memory:"):
        return None
    path = lock_path(database)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise DaemonRunning(
                f"another slurmgate daemon ({who}) is running on {database} (it holds "
                f"{path}); the database has one writer: stop that daemon first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


PROBE_TIMEOUT_S = 1.0


def probe_socket(path: str) -> str | None:
    """Why ``path`` must not be replaced (a daemon listens there), or None when it is a stale
    socket left by a crash (nothing listens). The connect has a timeout: a daemon with a full
    backlog does not hang the probe."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
        return f"another daemon is listening on {path}"
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except TimeoutError:
        return f"another daemon is listening on {path} (it did not accept within " \
               f"{PROBE_TIMEOUT_S:g} s)"
    except OSError as exc:
        return f"cannot probe the socket {path} ({exc}); remove it if no daemon runs"
    finally:
        probe.close()
