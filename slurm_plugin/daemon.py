"""The slurmgate policy daemon: decisions for job_submit.lua, the single writer of SQLite.

Threads: one per connection (slurmctld keeps one open; CLI calls and hook nudges come and go),
plus background workers added by later stages (spool ingest, reconcile). Shared state is the
current policy (swapped whole on SIGHUP) and the store, which is guarded by one lock.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TextIO

from policies.config import Policy, PolicyError, load_policy
from policies.decision import Decision, decide_tags
from policies.request import JobRequest
from slurm_plugin.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    Peer,
    ProtocolError,
    decode,
    encode,
    peer_of,
)


class EventLog:
    """Structured log: one JSON object per line (ts, event, fields)."""

    def __init__(self, path: str = "") -> None:
        self._lock = threading.Lock()
        self._out: TextIO = open(path, "a", buffering=1, encoding="utf-8") if path else sys.stderr

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 6), "event": event, **fields}, default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


class Forbidden(Exception):
    """The peer may not ask for this."""


class Daemon:
    def __init__(self, config_path: str, policy: Policy) -> None:
        self.config_path = config_path
        self.policy = policy
        self.log = EventLog(policy.daemon.log_file)
        self.lock = threading.RLock()
        self.started = time.time()
        self.decisions = 0
        self.handlers: dict[str, Callable[[dict[str, Any], Peer], dict[str, Any]]] = {
            "ping": self.op_ping,
            "submit": self.op_submit,
        }

    # -- peers ------------------------------------------------------------------------------

    def is_controller(self, peer: Peer) -> bool:
        """SlurmUser or root: the only peers allowed to ask for decisions and send events."""
        return peer.uid == 0 or peer.uid == uid_of(self.policy.daemon.slurm_user)

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid == 0 or user_name(peer.uid) in self.policy.daemon.admins

    def require_controller(self, peer: Peer, op: str) -> None:
        if not self.is_controller(peer):
            raise Forbidden(
                f"'{op}' is accepted only from root or the SlurmUser "
                f"({self.policy.daemon.slurm_user}); you are {user_name(peer.uid)}"
            )

    # -- policy reload ----------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the policy file again; keep the current policy when the new one is invalid."""
        try:
            new = load_policy(self.config_path)
        except PolicyError as exc:
            self.log.write("policy_reload_failed", path=self.config_path, error=str(exc),
                           kept="previous policy")
            return False
        with self.lock:
            self.policy = new
        self.log.write("policy_reloaded", path=self.config_path, teams=len(new.teams))
        return True

    # -- requests ---------------------------------------------------------------------------

    def handle(self, line: bytes, peer: Peer) -> dict[str, Any]:
        """Answer one request line; the request's "id", if any, is echoed back."""
        try:
            req = decode(line)
        except ProtocolError as exc:
            self.log.write("bad_request", uid=peer.uid, error=str(exc))
            return {"ok": False, "error": str(exc)}
        resp = self._dispatch(req, peer)
        if "id" in req:
            resp["id"] = req["id"]
        return resp

    def _dispatch(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        handler = self.handlers.get(req["op"])
        if handler is None:
            return {"ok": False, "error": f"unknown op {req['op']!r}"}
        try:
            return handler(req, peer)
        except ProtocolError as exc:
            self.log.write("bad_request", uid=peer.uid, op=req["op"], error=str(exc))
            return {"ok": False, "error": str(exc)}
        except Forbidden as exc:
            self.log.write("forbidden", uid=peer.uid, user=user_name(peer.uid), op=req["op"],
                           error=str(exc))
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # never let one request take the daemon down
            self.log.write("internal_error", uid=peer.uid, op=req["op"], error=repr(exc))
            return {"ok": False, "error": f"internal error in slurmgate daemon: {exc!r}"}

    def op_ping(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "uptime": time.time() - self.started,
                "decisions": self.decisions, "you": user_name(peer.uid)}

    def op_submit(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.require_controller(peer, "submit")
        t0 = time.perf_counter()
        raw = req.get("job")
        if not isinstance(raw, dict):
            raise ProtocolError("submit needs a 'job' object")
        job = JobRequest.from_wire(raw)
        policy = self.policy
        decision = self.decide(job, policy)
        self.decisions += 1
        latency_ms = (time.perf_counter() - t0) * 1000
        self.log.write(
            "decision", job_name=job.name, user=job.user, uid=job.uid, account=job.account,
            team=decision.team, verdict=decision.verdict, reason=decision.reason,
            tags=decision.tags, latency_ms=round(latency_ms, 3),
        )
        return self.submit_response(decision)

    def decide(self, job: JobRequest, policy: Policy) -> Decision:
        rid = "r" + secrets.token_hex(8)
        return decide_tags(job, policy, rid)

    @staticmethod
    def submit_response(decision: Decision) -> dict[str, Any]:
        return {"ok": True, "verdict": decision.verdict, "msg": decision.message,
                "set": decision.set_fields}


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
    daemon = Daemon(config_path, policy)
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
    daemon.log.write("daemon_started", pid=os.getpid(), socket=path, config=config_path)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        daemon.log.write("daemon_stopped", pid=os.getpid())
    return 0
