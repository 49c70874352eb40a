"""The daemon's socket: JSON lines over a Unix socket, one thread per connection, and ``serve``.

slurmctld keeps one connection open; CLI calls and hook nudges come and go. What a peer may ask
is decided per request from SO_PEERCRED (service.py); this module only frames lines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import sys
import threading
from typing import Any

from policies.config import PolicyError, load_policy
from slurm_plugin.daemon.prometheus import MetricsError, MetricsServer, spool_backlog
from slurm_plugin.daemon.service import Daemon
from slurm_plugin.protocol import MAX_LINE, PROTOCOL_VERSION, encode, peer_of


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        peer = peer_of(sock)
        reader = sock.makefile("rb")
        daemon = self.server.daemon
        while True:
            try:
                line = reader.readline(MAX_LINE + 1)
            except OSError:
                return
            if not line:
                return
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                # Skip the rest of the line (bounded), answer, and carry on with the next one.
                skipped = len(line)
                while skipped < 64 * MAX_LINE:
                    rest = reader.readline(MAX_LINE)
                    skipped += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                resp = {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
                if not self._send(sock, resp) or skipped >= 64 * MAX_LINE:
                    return
                continue
            resp = daemon.handle(line, peer)
            if not self._send(sock, resp):
                return

    @staticmethod
    def _send(sock: socket.socket, resp: dict[str, Any]) -> bool:
        try:
            sock.sendall(encode({"v": PROTOCOL_VERSION, **resp}))
            return True
        except OSError:
            return False


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    daemon: Daemon


def serve(config_path: str) -> int:
    try:
        policy = load_policy(config_path)
    except PolicyError as exc:
        print(f"slurmgate daemon: {exc}", file=sys.stderr)
        return 2
    from db.store import StoreError, open_store

    try:
        os.makedirs(os.path.dirname(policy.daemon.database) or ".", exist_ok=True)
        store = open_store(policy.daemon.database)
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
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            print(f"slurmgate daemon: another daemon is listening on {path}", file=sys.stderr)
            return 1
        except OSError:
            os.unlink(path)
        finally:
            probe.close()
    old_umask = os.umask(0o111)
    try:
        server = _Server(path, _Handler)
    finally:
        os.umask(old_umask)
    # Anyone may connect; what a peer may ask is decided per request from SO_PEERCRED.
    os.chmod(path, 0o666)
    server.daemon = daemon

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
    except MetricsError as exc:
        daemon.log.write("metrics_disabled", error=str(exc))
    daemon.log.write("daemon_started", pid=os.getpid(), socket=path, config=config_path)
    for target in (daemon.ingest_loop, daemon.reconcile_loop):
        threading.Thread(target=target, daemon=True, name=target.__name__).start()
    daemon.ingest_wakeup.set()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        daemon.stopping.set()
        if metrics_server:
            metrics_server.stop()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        daemon.log.write("daemon_stopped", pid=os.getpid())
    return 0
