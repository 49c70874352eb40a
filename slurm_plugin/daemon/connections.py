"""The daemon's connections: who gets a thread, who shares one, and the limits on users.

A hostile local user must never delay or starve a decision, so peers are split right after
``accept`` by SO_PEERCRED:

* **Controllers** (root and the SlurmUser, ``Daemon.is_controller``): a dedicated blocking
  thread each, the same loop as ever (no timeouts, no rate limit, ``protocol.MAX_LINE``),
  never counted against the user limits; at most ``max_controllers`` of them, as a runaway
  guard only.
* **Everyone else**: ONE selector thread reads all their non-blocking sockets and a small pool
  of worker threads runs ``daemon.handle`` and sends the reply. The limits come from the live
  policy (``policy.daemon``, read at each use: SIGHUP swaps it whole): connections in all and
  per uid, requests per second per uid (a token bucket, bursts of twice the rate), the idle
  and read timeouts, and a 64 KiB line. Over a limit a peer gets one error line, written
  without blocking, and (for the connection limits) is closed at once. While a connection's
  request is in the pool nothing more is read from it; a peer that does not read its reply
  within ``send_timeout`` seconds is closed; when the pool has a deep queue users are told the
  daemon is busy instead of being queued.

The acceptor (the thread that calls ``serve_forever``) never blocks on a peer, and backs off on
accept errors such as EMFILE instead of spinning.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import queue
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from slurm_plugin.protocol import MAX_LINE, PROTOCOL_VERSION, Peer, encode, peer_of

USER_MAX_LINE = 64 * 1024
"""Longest request line from a non-controller peer (the controllers keep MAX_LINE)."""
MAX_CONTROLLERS = 64
"""Controller connections at once: far above what slurmctld opens; a runaway guard only."""
USER_WORKERS = 4
"""Threads that run users' requests (the controllers have their own threads)."""
MAX_QUEUED = 64
"""Users' requests waiting for a worker; beyond this they are told the daemon is busy."""
SEND_TIMEOUT_S = 2.0
"""How long a user peer may take to read its reply before it is closed."""
LOG_EVERY_S = 10.0
"""At most one refusal line per uid this often in the daemon's log (a flood cannot fill it)."""
ACCEPT_BACKOFF_S = 0.1
"""Pause after an accept error (EMFILE, ENFILE, ENOBUFS, ENOMEM) so it cannot spin the CPU."""
FD_RESERVE = 64
"""Descriptors kept free for the daemon itself (database, log, metrics, Slurm commands)."""
SWEEP_S = 0.1
"""How often the user loop looks for connections past their idle or read timeout."""
_RECV = 65536
_BACKLOG = 1024


class _Log(Protocol):
    def write(self, event: str, **fields: Any) -> None: ...


class _Metrics(Protocol):
    def error(self, where: str) -> None: ...


class _Daemon(Protocol):
    """What the connection layer needs from the daemon (service.Daemon, or a test's fake)."""

    @property
    def policy(self) -> Any: ...  # policies.config.Policy: .daemon holds the limits

    @property
    def log(self) -> _Log: ...

    @property
    def metrics(self) -> _Metrics: ...

    def is_controller(self, peer: Peer) -> bool: ...

    def handle(self, line: bytes, peer: Peer) -> dict[str, Any]: ...


def frame(resp: dict[str, Any]) -> bytes:
    return encode({"v": PROTOCOL_VERSION, **resp})


def _send_now(sock: socket.socket, resp: dict[str, Any]) -> bool:
    """Best effort, never blocking: True if the whole line went into the socket's buffer."""
    data = frame(resp)
    try:
        return sock.send(data) == len(data)
    except OSError:
        return False


def raise_fd_limit(want: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE toward the hard limit (at most ``want``); returns the soft
    limit in force. systemd's default soft limit (1024) would otherwise bound the user cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


class _RefusalLog:
    """Refusals go to the metrics always and to the log at most once per uid per
    ``LOG_EVERY_S`` (the next line says how many were not logged)."""

    def __init__(self, daemon: _Daemon, clock: Callable[[], float] = time.monotonic) -> None:
        self.daemon = daemon
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[int, float] = {}
        self._suppressed: dict[int, int] = {}

    def __call__(self, event: str, kind: str, uid: int, reason: str, **fields: Any) -> None:
        with contextlib.suppress(Exception):
            self.daemon.metrics.error(kind)
        now = self.clock()
        with self._lock:
            last = self._last.get(uid)
            if last is not None and now - last < LOG_EVERY_S:
                self._suppressed[uid] = self._suppressed.get(uid, 0) + 1
                return
            if len(self._last) > 4096:  # forget uids that have been quiet for a while
                for old in [u for u, t in self._last.items() if now - t >= LOG_EVERY_S]:
                    self._last.pop(old, None)
                    self._suppressed.pop(old, None)
            self._last[uid] = now
            suppressed = self._suppressed.pop(uid, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        with contextlib.suppress(Exception):
            self.daemon.log.write(event, uid=uid, reason=reason, **fields)


class _Pool:
    """A few daemon threads taking jobs from one queue: never holds the process at exit (a
    ThreadPoolExecutor's workers are joined at exit, and a handler may be stuck)."""

    def __init__(self, workers: int, on_error: Callable[[BaseException], None]) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._on_error = on_error
        self._threads = [threading.Thread(target=self._run, daemon=True,
                                          name=f"slurmgate-user-worker-{i}")
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                job()
            except BaseException as exc:  # a job's failure must not take a worker with it
                self._on_error(exc)

    def submit(self, job: Callable[[], None]) -> None:
        self._q.put(job)

    def waiting(self) -> int:
        return self._q.qsize()

    def stop(self) -> None:
        for _ in self._threads:
            self._q.put(None)


class _UserConn:
    __slots__ = ("sock", "peer", "buf", "last_request", "line_started", "busy", "registered",
                 "closed", "parked_until")

    def __init__(self, sock: socket.socket, peer: Peer, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.last_request = now
        """When the last complete request arrived or its reply went out (the idle clock)."""
        self.line_started: float | None = None
        """When the first byte of a request line still incomplete arrived."""
        self.busy = False
        """A request of this connection is with the workers (the socket belongs to them)."""
        self.registered = False
        self.closed = False
        self.parked_until: float | None = None
        """Rate-limited: not read from until then (its refusal went out)."""


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class ConnectionServer:
    """Listens on a Unix socket and serves the daemon's JSON lines (see the module's doc).

    ``serve_forever`` runs the acceptor in the calling thread until ``shutdown`` (called from
    another thread, e.g. a signal handler's); ``server_close`` then closes everything without
    waiting on idle peers."""

    def __init__(self, path: str, daemon: _Daemon, *, max_controllers: int = MAX_CONTROLLERS,
                 workers: int = USER_WORKERS, max_queued: int = MAX_QUEUED,
                 send_timeout: float = SEND_TIMEOUT_S,
                 user_max_line: int = USER_MAX_LINE) -> None:
        self.path = path
        self.daemon = daemon
        self.max_controllers = max_controllers
        self.max_queued = max_queued
        self.send_timeout = send_timeout
        self.user_max_line = user_max_line
        self._refused = _RefusalLog(daemon)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_ceiling = (1 << 30 if soft == resource.RLIM_INFINITY
                           else max(1, soft - max_controllers - FD_RESERVE))
        """User connections never take the descriptors the controllers and the daemon need,
        whatever max_user_connections says."""

        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            self._listener.listen(_BACKLOG)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self._stop_r, self._stop_w = socket.socketpair()
        self._stop_w.setblocking(False)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

        self._lock = threading.Lock()  # the counts, the controller set, _closing, the inbox
        self._closing = False
        self._controllers: set[socket.socket] = set()
        self._controller_threads: set[threading.Thread] = set()
        self._user_total = 0
        self._per_uid: dict[int, int] = {}

        # The user loop's own state: touched by the user thread only (selectors are not
        # thread-safe); other threads talk to it through _inbox and the wake-up socketpair.
        self._inbox: list[tuple[_UserConn, bool]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: set[_UserConn] = set()
        self._parked: set[_UserConn] = set()
        self._buckets: dict[int, _Bucket] = {}
        self._pool = _Pool(workers, self._worker_failed)
        self._user_thread = threading.Thread(target=self._user_loop, daemon=True,
                                             name="slurmgate-user-connections")
        self._user_thread.start()

    # -- introspection (tests, metrics) -----------------------------------------------------

    def user_connections(self) -> int:
        with self._lock:
            return self._user_total

    def controller_connections(self) -> int:
        with self._lock:
            return len(self._controllers)

    def queued_requests(self) -> int:
        """Users' requests waiting for a worker."""
        return self._pool.waiting()

    # -- the acceptor -----------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self._listener, selectors.EVENT_READ)
                sel.register(self._stop_r, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    for key, _ in sel.select(poll_interval):
                        if key.fileobj is self._listener:
                            self._accept_ready()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` and wait until it has returned (call from another thread)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._stop_w.send(b"x")
        self._stopped.wait()

    def _accept(self) -> tuple[socket.socket, Any]:
        return self._listener.accept()

    def _accept_ready(self) -> None:
        for _ in range(64):  # drain the backlog a while, then look at the stop flag again
            try:
                sock, _addr = self._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self._refused("accept_failed", "accept", -1, str(exc))
                self._stopping.wait(ACCEPT_BACKOFF_S)  # EMFILE and friends: do not spin
                return
            if self._stopping.is_set():
                sock.close()
                return
            try:
                self._admit(sock)
            except Exception as exc:  # one bad peer must not stop the acceptor
                self._internal_error("acceptor", exc)
                with contextlib.suppress(OSError):
                    sock.close()

    def _admit(self, sock: socket.socket) -> None:
        try:
            peer = peer_of(sock)
        except OSError:
            sock.close()
            return
        try:
            controller = bool(self.daemon.is_controller(peer))
        except Exception:
            controller = False
        if controller:
            self._admit_controller(sock, peer)
        else:
            self._admit_user(sock, peer)

    def _refuse(self, sock: socket.socket, peer: Peer, reason: str, error: str) -> None:
        self._refused("connection_refused", "connection_refused", peer.uid, reason,
                      pid=peer.pid)
        sock.setblocking(False)
        _send_now(sock, {"ok": False, "error": error})
        sock.close()

    # -- controllers: a blocking thread each ------------------------------------------------

    def _admit_controller(self, sock: socket.socket, peer: Peer) -> None:
        with self._lock:
            full = len(self._controllers) >= self.max_controllers or self._closing
            if not full:
                self._controllers.add(sock)
        if full:
            self._refuse(sock, peer, "max_controllers",
                         f"too many controller connections ({self.max_controllers}) to the "
                         "slurmgate daemon at once")
            return
        sock.setblocking(True)
        thread = threading.Thread(target=self._controller, args=(sock, peer), daemon=True,
                                  name=f"slurmgate-controller-{peer.pid}")
        with self._lock:
            self._controller_threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # cannot start a thread: the connection goes, the daemon stays
            with self._lock:
                self._controller_threads.discard(thread)
                self._controllers.discard(sock)
            sock.close()

    def _controller(self, sock: socket.socket, peer: Peer) -> None:
        try:
            self._controller_loop(sock, peer)
        finally:
            with self._lock:
                self._controllers.discard(sock)
                self._controller_threads.discard(threading.current_thread())
            with contextlib.suppress(OSError):
                sock.close()

    def _controller_loop(self, sock: socket.socket, peer: Peer) -> None:
        reader = sock.makefile("rb")
        while True:
            try:
                line = reader.readline(MAX_LINE + 1)
            except OSError:
                return
            if not line or (self._closing and not line.endswith(b"\n")):
                return  # (a half line cut off by server_close is not a request)
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                # Skip the rest of the line (bounded), answer, and carry on with the next one.
                skipped = len(line)
                while skipped < 64 * MAX_LINE:
                    try:
                        rest = reader.readline(MAX_LINE)
                    except OSError:
                        return
                    skipped += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                resp = {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
                if not self._send_blocking(sock, resp) or skipped >= 64 * MAX_LINE:
                    return
                continue
            resp = self.daemon.handle(line, peer)
            if not self._send_blocking(sock, resp):
                return

    @staticmethod
    def _send_blocking(sock: socket.socket, resp: dict[str, Any]) -> bool:
        try:
            sock.sendall(frame(resp))
            return True
        except OSError:
            return False

    # -- users: one selector thread and a few workers ---------------------------------------

    def _admit_user(self, sock: socket.socket, peer: Peer) -> None:
        s = self.daemon.policy.daemon
        cap = min(s.max_user_connections, self.fd_ceiling)
        reason, error = "", ""
        with self._lock:
            if self._closing:
                error = "the slurmgate daemon is shutting down"
            elif self._user_total >= cap:
                reason = "max_user_connections"
                error = (f"too many connections to the slurmgate daemon from users "
                         f"(max_user_connections = {cap}); try again shortly")
            elif self._per_uid.get(peer.uid, 0) >= s.max_connections_per_user:
                reason = "max_connections_per_user"
                error = (f"too many connections to the slurmgate daemon from uid {peer.uid} "
                         f"(max_connections_per_user = {s.max_connections_per_user}); close "
                         "some and try again")
            else:
                self._user_total += 1
                self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
                sock.setblocking(False)
                self._inbox.append((_UserConn(sock, peer, time.monotonic()), True))
        if reason:
            self._refuse(sock, peer, reason, error)
        elif error:
            sock.setblocking(False)
            _send_now(sock, {"ok": False, "error": error})
            sock.close()
        else:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pair means a wake-up is pending anyway
            self._wake_w.send(b"x")

    def _user_loop(self) -> None:
        next_sweep = time.monotonic() + SWEEP_S
        while not self._closing:
            wake_at = next_sweep
            if self._parked:
                wake_at = min(wake_at, min(c.parked_until or 0.0 for c in self._parked))
            timeout = max(0.0, wake_at - time.monotonic()) if self._conns else None
            try:
                events = self._sel.select(timeout)
            except OSError:  # closed under us at shutdown
                return
            try:
                for key, _ in events:
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                    else:
                        self._readable(key.data)
                self._drain_inbox()
                now = time.monotonic()
                if self._parked:
                    self._unpark(now)
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_S
            except Exception as exc:  # the users' thread must outlive any one bug
                self._internal_error("user connections", exc)
                time.sleep(ACCEPT_BACKOFF_S)

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        for conn, ok in items:
            if conn.closed:
                continue
            if not conn.busy:  # a new connection
                self._conns.add(conn)
                self._register(conn)
                continue
            conn.busy = False  # its reply went out (or did not)
            if not ok:
                self._close(conn, "reply_not_read", None,
                            f"did not read its reply within {self.send_timeout:g} s")
                continue
            conn.last_request = time.monotonic()
            if conn.buf:  # a pipelined partial line: its clock starts now, not while busy
                conn.line_started = conn.last_request
            self._next_request(conn)
            if not conn.busy and not conn.closed:
                self._register(conn)

    def _register(self, conn: _UserConn) -> None:
        if not conn.registered:
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            conn.registered = True

    def _unregister(self, conn: _UserConn) -> None:
        if conn.registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
            conn.registered = False

    def _readable(self, conn: _UserConn) -> None:
        if conn.busy or conn.closed:
            return
        try:
            data = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        if not conn.buf:
            conn.line_started = time.monotonic()
        conn.buf += data
        self._next_request(conn)

    def _next_request(self, conn: _UserConn) -> None:
        """Take complete lines off the buffer until one goes to the workers (or none is left):
        refusals are answered here; one request per connection is in the pool at a time."""
        limit = self.user_max_line
        while not conn.busy and not conn.closed:
            end = conn.buf.find(b"\n", 0, limit + 1)
            if end < 0:
                if len(conn.buf) > limit:
                    self._close(conn, "request_too_long",
                                {"ok": False, "error": f"request longer than {limit} bytes "
                                 "(the limit for users); closing the connection"})
                return
            line = bytes(conn.buf[:end + 1])
            del conn.buf[:end + 1]
            now = time.monotonic()
            conn.line_started = now if conn.buf else None
            conn.last_request = now
            wait = self._take_token(conn.peer.uid, now)
            if wait > 0:
                self._refused("request_refused", "rate_limited", conn.peer.uid,
                              "user_requests_per_second", pid=conn.peer.pid)
                if not _send_now(conn.sock, {
                        "ok": False, "retry_after": wait,
                        "error": f"too many requests from uid {conn.peer.uid} (the limit is "
                                 f"{self.daemon.policy.daemon.user_requests_per_second:g} per "
                                 f"second); retry in {wait:g} s"}):
                    self._close(conn)
                    return
                # Not read from again until it may be served: a client that ignores
                # retry_after costs one refusal per wait, not one per line it sends.
                conn.parked_until = now + wait
                self._unregister(conn)
                self._parked.add(conn)
                return
            if self._pool.waiting() >= self.max_queued:
                self._refused("request_refused", "daemon_busy", conn.peer.uid, "daemon_busy",
                              pid=conn.peer.pid)
                if not _send_now(conn.sock, {"ok": False, "retry_after": 1,
                                             "error": "the slurmgate daemon is busy; retry in "
                                                      "1 s"}):
                    self._close(conn)
                continue
            conn.busy = True
            self._unregister(conn)
            self._pool.submit(functools.partial(self._work, conn, line))

    def _unpark(self, now: float) -> None:
        for conn in [c for c in self._parked if (c.parked_until or 0.0) <= now]:
            self._parked.discard(conn)
            conn.parked_until = None
            if conn.closed:
                continue
            conn.last_request = now
            self._next_request(conn)
            if not conn.busy and not conn.closed and conn.parked_until is None:
                self._register(conn)

    def _take_token(self, uid: int, now: float) -> float:
        """0 if ``uid`` may send a request now, else the seconds until it may."""
        rate = float(self.daemon.policy.daemon.user_requests_per_second)
        if rate <= 0:
            return 0.0
        burst = 2 * rate
        b = self._buckets.get(uid)
        if b is None:
            b = self._buckets[uid] = _Bucket(burst, now)
        b.tokens = min(burst, b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens >= 1:
            b.tokens -= 1
            return 0.0
        return math.ceil((1 - b.tokens) / rate * 100) / 100  # up to the next 10 ms

    def _sweep(self, now: float) -> None:
        s = self.daemon.policy.daemon
        idle, read = float(s.user_idle_timeout_s), float(s.user_read_timeout_s)
        for conn in list(self._conns):
            if conn.busy or conn.closed or conn.parked_until is not None:
                continue
            if conn.line_started is not None and 0 < read <= now - conn.line_started:
                self._close(conn, "user_read_timeout_s",
                            {"ok": False, "error": f"request line not completed within {read:g} "
                             "s (user_read_timeout_s); closing the connection"})
            elif 0 < idle <= now - conn.last_request:
                self._close(conn, "user_idle_timeout_s",
                            {"ok": False, "error": f"no request for {idle:g} s "
                             "(user_idle_timeout_s); closing the connection"})
        rate = float(s.user_requests_per_second)
        if len(self._buckets) > 256 or rate <= 0:  # forget buckets that would be full anyway
            for uid, b in list(self._buckets.items()):
                if rate <= 0 or b.tokens + (now - b.at) * rate >= 2 * rate:
                    del self._buckets[uid]

    def _close(self, conn: _UserConn, reason: str | None = None,
               resp: dict[str, Any] | None = None, detail: str | None = None) -> None:
        """Close a user connection from the user thread (not while a worker holds it)."""
        if conn.closed:
            return
        conn.closed = True
        if reason is not None:  # logged first: whoever sees the close can find the line
            self._refused("connection_refused", "connection_closed", conn.peer.uid, reason,
                          pid=conn.peer.pid, **({"detail": detail} if detail else {}))
        if resp is not None:
            _send_now(conn.sock, resp)
        self._unregister(conn)
        self._conns.discard(conn)
        self._parked.discard(conn)
        self._forget(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _forget(self, conn: _UserConn) -> None:
        with self._lock:
            self._user_total -= 1
            left = self._per_uid.get(conn.peer.uid, 1) - 1
            if left > 0:
                self._per_uid[conn.peer.uid] = left
            else:
                self._per_uid.pop(conn.peer.uid, None)

    def _work(self, conn: _UserConn, line: bytes) -> None:
        """In a worker: answer one request and hand the connection back to the user loop."""
        try:
            resp = self.daemon.handle(line, conn.peer)
        except Exception as exc:  # the daemon answers errors itself; this is a last resort
            with contextlib.suppress(Exception):
                self.daemon.metrics.error("request")
            resp = {"ok": False, "error": f"internal error in slurmgate daemon: {exc!r}"}
        ok = True
        try:
            conn.sock.settimeout(self.send_timeout)
            conn.sock.sendall(frame(resp))
        except OSError:
            ok = False
        finally:
            with contextlib.suppress(OSError):
                conn.sock.setblocking(False)
        with self._lock:
            if not self._closing:
                self._inbox.append((conn, ok))
                handed = True
            else:
                handed = False
        if handed:
            self._wake()
        else:
            with contextlib.suppress(OSError):
                conn.sock.close()

    def _worker_failed(self, exc: BaseException) -> None:
        self._internal_error("user worker", exc)

    def _internal_error(self, where: str, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            self.daemon.metrics.error("connections")
            self.daemon.log.write("internal_error", where=where, error=repr(exc))

    # -- closing ----------------------------------------------------------------------------

    def server_close(self) -> None:
        """Close the listener and every connection; never waits on an idle peer. A
        controller in the middle of a request gets a moment to send its answer."""
        with self._lock:
            self._closing = True
            controllers = list(self._controllers)
            threads = list(self._controller_threads)
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._wake()
        self._user_thread.join(2.0)
        self._pool.stop()
        with self._lock:
            leftovers, self._inbox = self._inbox, []
        for conn in list(self._conns):
            if conn.busy:  # a worker is writing to it: wake it, the worker closes it
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
            else:
                with contextlib.suppress(OSError):
                    conn.sock.close()
        for conn, _ in leftovers:
            with contextlib.suppress(OSError):
                conn.sock.close()
        for sock in controllers:  # readers see EOF; a reply being written still goes out
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + 1.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            self._sel.close()
        for s in (self._wake_r, self._wake_w, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> ConnectionServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server_close()
