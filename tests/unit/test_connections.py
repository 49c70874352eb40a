"""The daemon's connection layer on a real Unix socket, with a small fake daemon.

Controllers (root and the SlurmUser) get a thread each and no limits; every other peer shares
one selector thread and a few workers, under the live policy's limits. Which peer is a
controller is the fake's call: by pid (a child process is the controller), or by a flag.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

from policies.config import DaemonSettings
from slurm_plugin.daemon.connections import USER_MAX_LINE, ConnectionServer
from slurm_plugin.daemon.prometheus import Metrics
from slurm_plugin.protocol import Peer
from tests.waiting import wait_for


class FakeLog:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []

    def write(self, event: str, **fields: Any) -> None:
        with self.lock:
            self.events.append({"event": event, **fields})

    def named(self, event: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["event"] == event]


class FakeDaemon:
    """What connections.py uses of service.Daemon: policy.daemon, is_controller, handle, log,
    metrics. Ops: ping, block (waits on ``gate``), big (a reply larger than socket buffers)."""

    def __init__(self, **limits: Any) -> None:
        self.set_limits(**limits)
        self.controller_pids: set[int] = set()
        self.controller: Callable[[Peer], bool] = lambda peer: peer.pid in self.controller_pids
        self.log = FakeLog()
        self.metrics = Metrics()
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.blocked = 0
        self.handled: list[Any] = []

    def set_limits(self, **limits: Any) -> None:
        self.policy = SimpleNamespace(daemon=DaemonSettings(**limits))  # swapped whole

    def is_controller(self, peer: Peer) -> bool:
        return self.controller(peer)

    def handle(self, line: bytes, peer: Peer) -> dict[str, Any]:
        req = json.loads(line)
        if req.get("op") == "block":
            with self.lock:
                self.blocked += 1
            self.gate.wait(30)
        with self.lock:
            self.handled.append(req.get("id"))
        resp: dict[str, Any] = {"ok": True, "op": req.get("op"), "id": req.get("id"),
                                "thread": threading.current_thread().name}
        if req.get("op") == "big":
            resp["data"] = "x" * (8 << 20)
        return resp


class Client:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""

    def send(self, payload: bytes | dict[str, Any]) -> None:
        if isinstance(payload, dict):
            payload = json.dumps({"v": 1, **payload}).encode() + b"\n"
        self.s.sendall(payload)

    def next_line(self) -> dict[str, Any] | None:
        """The next line, or None once the daemon has closed the connection."""
        while b"\n" not in self.buf:
            try:
                chunk = self.s.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def line(self) -> dict[str, Any]:
        answer = self.next_line()
        assert answer is not None, "the daemon closed the connection"
        return answer

    def ask(self, **req: Any) -> dict[str, Any]:
        self.send(req)
        return self.line()

    def until_closed(self) -> list[dict[str, Any]]:
        """Every line the daemon sends before it closes the connection (within the timeout)."""
        lines = []
        while (line := self.next_line()) is not None:
            lines.append(line)
        return lines

    def close(self) -> None:
        self.s.close()


CONTROLLER = r"""
import json, socket, sys, time
path, n, pad = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.stdin.readline()  # the test has our pid now
t0 = time.monotonic()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
f = s.makefile("rb")
answers = []
for i in range(n):
    s.sendall(json.dumps({"v": 1, "op": "ping", "id": i, "pad": "a" * pad}).encode() + b"\n")
    answers.append(json.loads(f.readline()))
print(json.dumps({"elapsed": time.monotonic() - t0, "answers": answers}))
"""


def controller_round_trips(path: str, fake: FakeDaemon, n: int = 3,
                           pad: int = 0) -> dict[str, Any]:
    """``n`` pings from another process that the fake counts as a controller (by its pid)."""
    proc = subprocess.Popen([sys.executable, "-c", CONTROLLER, path, str(n), str(pad)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    fake.controller_pids.add(proc.pid)
    out, _ = proc.communicate("go\n", timeout=30)
    assert proc.returncode == 0
    return json.loads(out)


@contextlib.contextmanager
def running(fake: FakeDaemon, **kw: Any) -> Iterator[tuple[ConnectionServer, str]]:
    state = tempfile.mkdtemp(prefix="sgc-")  # short: a socket path has at most 107 bytes
    path = os.path.join(state, "s.sock")
    server = ConnectionServer(path, fake, **kw)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield server, path
    finally:
        fake.gate.set()
        server.shutdown()
        thread.join(5)
        server.server_close()
        shutil.rmtree(state, ignore_errors=True)


def count_is(count: Callable[[], int], n: int) -> Callable[[], bool]:
    return lambda: count() == n


def refusals(fake: FakeDaemon, reason: str) -> list[dict[str, Any]]:
    return [e for e in fake.log.named("connection_refused") if e["reason"] == reason]


def test_user_over_per_user_cap_is_refused_while_a_controller_is_served():
    fake = FakeDaemon(max_connections_per_user=2, max_user_connections=10)
    with running(fake) as (server, path):
        c1, c2 = Client(path), Client(path)
        assert c1.ask(op="ping")["ok"] and c2.ask(op="ping")["ok"]
        c3 = Client(path)
        lines = c3.until_closed()
        assert len(lines) == 1 and lines[0]["ok"] is False and lines[0]["v"] == 1
        assert "max_connections_per_user = 2" in lines[0]["error"]
        # the controller is not counted against the user's caps and is answered on its thread
        out = controller_round_trips(path, fake, n=3)
        assert [a["id"] for a in out["answers"]] == [0, 1, 2]
        assert all(a["ok"] and a["thread"].startswith("slurmgate-controller-")
                   for a in out["answers"])
        assert refusals(fake, "max_connections_per_user")[0]["uid"] == os.getuid()
        assert fake.metrics.errors["connection_refused"] == 1
        # a closed connection frees its slot
        c1.close()
        wait_for(lambda: server.user_connections() == 1, 5, 0.01, what="slot freed")
        c4 = Client(path)
        assert c4.ask(op="ping")["thread"].startswith("slurmgate-user-worker-")
        for c in (c2, c3, c4):
            c.close()


def test_total_user_cap_is_read_from_the_live_policy():
    fake = FakeDaemon(max_connections_per_user=10, max_user_connections=3)
    with running(fake) as (server, path):
        held = [Client(path) for _ in range(3)]
        assert all(c.ask(op="ping")["ok"] for c in held)
        lines = Client(path).until_closed()
        assert len(lines) == 1 and "max_user_connections = 3" in lines[0]["error"]
        fake.set_limits(max_connections_per_user=10, max_user_connections=5)  # SIGHUP
        more = Client(path)
        assert more.ask(op="ping")["ok"]
        for c in [*held, more]:
            c.close()


def test_controllers_have_no_caps_timeouts_rate_limit_or_user_line_limit():
    fake = FakeDaemon(max_connections_per_user=1, max_user_connections=1,
                      user_requests_per_second=1, user_idle_timeout_s=0.2,
                      user_read_timeout_s=0.2)
    fake.controller = lambda peer: True  # our own uid is the SlurmUser here
    with running(fake) as (server, path):
        ctl = [Client(path) for _ in range(5)]
        for c in ctl:
            for i in range(10):  # far over 1 request per second
                a = c.ask(op="ping", id=i)
                assert a["ok"] and a["id"] == i
                assert a["thread"].startswith("slurmgate-controller-")
        wait_for(lambda: server.controller_connections() == 5, 5, 0.01, what="controllers")
        big = json.dumps({"v": 1, "op": "ping", "id": "big", "pad": "a" * 200_000}).encode()
        ctl[0].send(big + b"\n")
        assert ctl[0].line()["id"] == "big"
        ctl[1].send(b'{"v":1,')  # a half line from a controller is never timed out
        # A user connected at the same time is closed for idling: the timeouts have passed.
        fake.controller = lambda peer: False
        user = Client(path)
        wait_for(lambda: server.user_connections() == 1, 5, 0.01, what="the user admitted")
        assert "user_idle_timeout_s" in user.until_closed()[0]["error"]
        assert all(c.ask(op="ping", id="after")["id"] == "after" for c in ctl[2:])
        ctl[1].send(b'"op":"ping","id":"half"}\n')
        assert ctl[1].line()["id"] == "half"
        assert server.user_connections() == 0 and fake.log.named("request_refused") == []
        for c in ctl:
            c.close()


def test_idle_user_connection_is_closed_after_the_idle_timeout():
    fake = FakeDaemon(user_idle_timeout_s=0.3, user_read_timeout_s=30)
    with running(fake) as (server, path):
        c = Client(path)
        assert c.ask(op="ping")["ok"]
        t0 = time.monotonic()
        lines = c.until_closed()
        assert time.monotonic() - t0 >= 0.25  # not before its time (the clock: its request)
        assert len(lines) == 1 and "user_idle_timeout_s" in lines[0]["error"]
        wait_for(lambda: server.user_connections() == 0, 5, 0.01, what="connection forgotten")
        assert refusals(fake, "user_idle_timeout_s")
        assert fake.metrics.errors["connection_closed"] == 1


def test_trickled_half_line_is_closed_after_the_read_timeout():
    fake = FakeDaemon(user_idle_timeout_s=30, user_read_timeout_s=0.3)
    with running(fake) as (server, path):
        c = Client(path)
        c.send(b'{"v":1,"op":"ping","pad":"')
        stop = threading.Event()

        def trickle() -> None:  # a byte every 50 ms never completes the line
            while not stop.wait(0.05):
                try:
                    c.s.send(b"a")
                except OSError:
                    return

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            lines = c.until_closed()
        finally:
            stop.set()
            t.join(5)
        assert len(lines) == 1 and "user_read_timeout_s" in lines[0]["error"]
        wait_for(lambda: server.user_connections() == 0, 5, 0.01, what="connection forgotten")
        assert refusals(fake, "user_read_timeout_s") and fake.handled == []


def test_rate_limit_answers_with_retry_after_and_slows_a_client_that_ignores_it():
    fake = FakeDaemon(user_requests_per_second=5)  # bursts of 10
    with running(fake) as (_server, path):
        c = Client(path)
        t0 = time.monotonic()
        answers = [c.ask(op="ping", id=i) for i in range(20)]
        elapsed = time.monotonic() - t0
        ok = [a for a in answers if a["ok"]]
        limited = [a for a in answers if not a["ok"]]
        assert limited and all(0 < a["retry_after"] <= 1 and "retry in" in a["error"]
                               for a in limited)
        assert fake.handled == [a["id"] for a in ok]  # refused requests never ran
        # the burst, then the rate: a client that ignores retry_after is not read from
        # until it may be served, so it costs one refusal per wait, not one per line
        assert len(ok) <= 10 + 5 * elapsed + 1
        assert len(limited) <= 5 * elapsed + 2
        # the bucket is the uid's, not the connection's
        other = Client(path)
        assert any(other.ask(op="ping")["ok"] is False for _ in range(3))
        assert fake.metrics.errors["rate_limited"] >= len(limited) + 1
        logged = fake.log.named("request_refused")
        assert len(logged) == 1 and logged[0]["reason"] == "user_requests_per_second"
        # after retry_after, it is served again
        assert wait_for(lambda: c.ask(op="ping", id="later")["ok"], 5, 0.05, what="refill")


def test_slow_user_handlers_never_delay_a_controller():
    fake = FakeDaemon()
    fake.gate.clear()
    with running(fake) as (server, path):
        users = [Client(path, timeout=30) for _ in range(5)]
        for i, u in enumerate(users[:4]):
            u.send({"op": "block", "id": i})
        wait_for(lambda: fake.blocked == 4, 5, 0.01, what="4 workers stuck in the handler")
        users[4].send({"op": "ping", "id": "queued"})
        wait_for(lambda: server.queued_requests() == 1, 5, 0.01, what="a queued request")
        out = controller_round_trips(path, fake, n=5)
        assert out["elapsed"] < 2.0 and all(a["ok"] for a in out["answers"])
        assert "queued" not in fake.handled  # the users are still waiting
        fake.gate.set()
        assert [u.line()["id"] for u in users] == [0, 1, 2, 3, "queued"]
        for u in users:
            u.close()


def test_deep_pool_queue_answers_busy_instead_of_queueing():
    fake = FakeDaemon()
    fake.gate.clear()
    with running(fake, max_queued=2) as (server, path):
        users = [Client(path, timeout=30) for _ in range(7)]
        for i, u in enumerate(users[:4]):  # one by one: a job not yet picked up is queued
            u.send({"op": "block", "id": i})
            wait_for(count_is(lambda: fake.blocked, i + 1), 5, 0.01, what="a worker stuck")
        for i, u in enumerate(users[4:6], start=4):
            u.send({"op": "ping", "id": i})
            wait_for(count_is(server.queued_requests, i - 3), 5, 0.01, what="queued")
        busy = users[6].ask(op="ping", id=6)
        assert busy["ok"] is False and "busy" in busy["error"] and busy["retry_after"] == 1
        assert fake.metrics.errors["daemon_busy"] == 1
        fake.gate.set()
        assert [u.line()["id"] for u in users[:6]] == [0, 1, 2, 3, 4, 5]
        assert users[6].ask(op="ping", id="again")["ok"]  # still connected
        for u in users:
            u.close()


def test_user_line_limit_is_64_kib_and_over_it_the_connection_closes():
    fake = FakeDaemon()
    with running(fake) as (_server, path):
        head = b'{"v":1,"op":"ping","id":"max","pad":"'
        exact = head + b"a" * (USER_MAX_LINE - len(head) - 2) + b'"}'
        assert len(exact) == USER_MAX_LINE
        c = Client(path)
        c.send(exact + b"\n")
        assert c.line()["id"] == "max"
        c.send(exact + b"a\n")
        lines = c.until_closed()
        assert len(lines) == 1 and f"longer than {USER_MAX_LINE} bytes" in lines[0]["error"]
        assert refusals(fake, "request_too_long")
        # a controller keeps protocol.MAX_LINE
        out = controller_round_trips(path, fake, n=1, pad=200_000)
        assert out["answers"][0]["ok"]


def test_pipelined_user_requests_are_answered_one_at_a_time_in_order():
    fake = FakeDaemon()
    with running(fake) as (_server, path):
        c = Client(path)
        c.send(b"".join(json.dumps({"v": 1, "op": "ping", "id": i}).encode() + b"\n"
                        for i in range(5)))
        assert [c.line()["id"] for _ in range(5)] == [0, 1, 2, 3, 4]


def test_a_user_that_does_not_read_its_reply_is_closed():
    fake = FakeDaemon()
    with running(fake, send_timeout=0.3) as (server, path):
        hog = Client(path)
        hog.send({"op": "big"})  # and never reads
        wait_for(lambda: refusals(fake, "reply_not_read"), 10, 0.02, what="hog closed")
        wait_for(lambda: server.user_connections() == 0, 5, 0.01, what="hog forgotten")
        assert Client(path).ask(op="ping")["ok"]
        hog.close()


def test_refusals_are_logged_at_most_once_per_uid_per_10_s():
    fake = FakeDaemon(max_connections_per_user=1)
    with running(fake) as (_server, path):
        held = Client(path)
        assert held.ask(op="ping")["ok"]
        for _ in range(20):
            assert "max_connections_per_user" in Client(path).until_closed()[0]["error"]
        assert fake.metrics.errors["connection_refused"] == 20
        assert len(fake.log.named("connection_refused")) == 1
        held.close()


def test_accept_errors_back_off_instead_of_spinning():
    fake = FakeDaemon()
    with running(fake) as (server, path):
        calls: list[float] = []

        def emfile() -> Any:
            calls.append(time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")

        server._accept = emfile  # type: ignore[method-assign]
        c = Client(path)  # the listener stays readable: each try fails
        wait_for(lambda: len(calls) >= 4, 5, 0.01, what="accept retries")
        assert calls[3] - calls[0] >= 0.25  # ~0.1 s apart, not a busy loop
        assert fake.metrics.errors["accept"] >= 4 and len(fake.log.named("accept_failed")) == 1
        del server._accept  # descriptors are back: the waiting peer is served
        assert c.ask(op="ping")["ok"]


def test_1000_idle_user_connections_do_not_delay_a_controller():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # both ends of every connection live in this process: 1000 of them where the hard limit
    # allows, else as many as it does (never fewer than 200, which still dwarfs the pool)
    n = 1000 if hard == resource.RLIM_INFINITY else min(1000, (hard - 512) // 2)
    assert n >= 200, f"RLIMIT_NOFILE hard limit {hard} is too low for this test; raise it"
    need = 2 * n + 512
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    fake = FakeDaemon(max_user_connections=n + 10, max_connections_per_user=n + 10,
                      user_idle_timeout_s=120)
    idle: list[Client] = []
    try:
        with running(fake) as (server, path):
            idle.extend(Client(path) for _ in range(n))
            wait_for(lambda: server.user_connections() == n, 30, 0.05, what=f"{n} admitted")
            out = controller_round_trips(path, fake, n=5)
            assert out["elapsed"] < 2.0 and all(a["ok"] for a in out["answers"])
            t0 = time.monotonic()
            assert Client(path).ask(op="ping")["ok"]  # and users are still served
            assert time.monotonic() - t0 < 2.0
    finally:
        for c in idle:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_shutdown_does_not_hang_on_idle_connections():
    fake = FakeDaemon()
    fake.controller = lambda peer: True
    state = tempfile.mkdtemp(prefix="sgc-")
    path = os.path.join(state, "s.sock")
    server = ConnectionServer(path, fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ctl = Client(path)
        assert ctl.ask(op="ping")["ok"]
        fake.controller = lambda peer: False
        user, half = Client(path), Client(path)
        half.send(b'{"v":1,')
        wait_for(lambda: server.user_connections() == 2, 5, 0.01, what="users admitted")
        t0 = time.monotonic()
        threading.Thread(target=server.shutdown, daemon=True).start()  # as on SIGTERM
        thread.join(5)
        assert not thread.is_alive()
        server.server_close()
        assert time.monotonic() - t0 < 3.0
        assert ctl.until_closed() == [] and user.until_closed() == []
        assert half.until_closed() == []
    finally:
        server.server_close()
        shutil.rmtree(state, ignore_errors=True)
