"""Prometheus metrics of the daemon: a small thread-safe registry and an HTTP endpoint.

Off unless ``[daemon] metrics_listen`` is set: ``"9466"`` or ``":9466"`` binds 127.0.0.1,
``"0.0.0.0:9466"`` or ``"[::]:9466"`` every interface. ``GET /metrics`` answers in the
Prometheus text format 0.0.4, and only to a scraper that sends ``Authorization: Bearer
<token>`` with the token of ``[daemon] metrics_token_file`` (the series show every team's
name and spend; every local user can reach 127.0.0.1). Without a readable token file, not
readable by others, the endpoint is not served at all (``MetricsError``; the daemon logs
``metrics_disabled`` and runs on). Connections idle for ``_Handler.timeout`` seconds are
closed, and at most ``MAX_CONNECTIONS`` are served at once.

The daemon reports through ``Metrics``' methods (``decision``, ``ingested``, ``ingest_lag``,
``set_spool_backlog``, ``set_reservations``, ``set_budget_used`` ...). Values that are cheap
to read but not worth tracking all the time (the spool backlog) are filled in at scrape time
by callbacks registered with ``on_scrape``. The registry has no dependencies and never
raises into the daemon's hot path: every method is a few dictionary updates under a lock.

Series:

| metric | type | labels |
|---|---|---|
| slurmgate_decisions_total | counter | verdict (accept, reject) |
| slurmgate_decision_latency_seconds | histogram | |
| slurmgate_ingested_records_total | counter | |
| slurmgate_ingest_errors_total | counter | |
| slurmgate_quarantined_records_total | counter | |
| slurmgate_ingest_lag_seconds | gauge | age of the oldest record of the last ingest batch |
| slurmgate_spool_backlog_records | gauge | records waiting in the spool |
| slurmgate_reservations | gauge | live reservations |
| slurmgate_reserved_amount | gauge | money reserved by them |
| slurmgate_leader | gauge | 1 while this daemon does the cluster's once-only work (db/leader.py) |
| slurmgate_budget_used | gauge | team: net spend in the current budget period |
| slurmgate_budget_limit | gauge | team: budget of the period (0: none) |
| slurmgate_errors_total | counter | where (ingest, reconcile, request, metrics, alerts) |
| slurmgate_policy_reloads_total | counter | result (ok, failed) |
| slurmgate_alert_sends_total | counter | kind, channel (mail, webhook), result (sent; error: |
| | | an attempt failed, retried; failed: given up; dry_run; dropped) |
| slurmgate_start_time_seconds | gauge | |
| slurmgate_idle_warnings_total | counter | dry_run (true, false): idle_warning events |
| slurmgate_idle_actions_total | counter | action (cancel, requeue), dry_run: idle_action events |
| slurmgate_idle_jobs | gauge | jobs idle past their first warning at the last idle scan |
| slurmgate_idle_scan_seconds | gauge | how long the last idle scan took |
"""

from __future__ import annotations

import hmac
import math
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from policies.records import KINDS as RECORD_KINDS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_HOST = "127.0.0.1"
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Seconds. job_submit.lua waits at most its timeout (200 ms by default) for an answer."""


class MetricsError(ValueError):
    """metrics_listen cannot be used; the message says what is wrong."""


MAX_TOKEN_BYTES = 4096
MAX_CONNECTIONS = 16
"""Scrapes served at once; more connections are closed at once (a scraper retries)."""


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped). Raises MetricsError when
    no file is configured, it cannot be read, is empty, or others may read it."""
    if not (path or "").strip():
        raise MetricsError(
            "metrics_listen is set but [daemon] metrics_token_file is not: refusing to serve "
            "metrics without authentication (they show every team's spend); put a random "
            "token in a file only the daemon's user can read (mode 0600 or 0640) and name it "
            "there")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise MetricsError(f"metrics_token_file {path}: cannot read it "
                           f"({exc.strerror or exc}); metrics are not served") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MetricsError(f"metrics_token_file {path}: not a regular file; metrics are "
                               "not served")
        if st.st_mode & 0o007:
            raise MetricsError(
                f"metrics_token_file {path}: others may read it (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); `chmod o-rwx {path}`; metrics are not "
                "served")
        data = os.read(fd, MAX_TOKEN_BYTES + 1)
    finally:
        os.close(fd)
    token = data.decode("utf-8", "replace").strip()
    if not token or len(data) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise MetricsError(f"metrics_token_file {path}: must hold one token (no spaces, at "
                           f"most {MAX_TOKEN_BYTES} bytes); metrics are not served")
    return token


def parse_listen(text: str) -> tuple[str, int] | None:
    """``host:port`` from the policy; None when empty (metrics off)."""
    value = (text or "").strip()
    if not value:
        return None
    host, port_text = DEFAULT_HOST, value
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1:end + 2] != ":":
            raise MetricsError(f"metrics_listen {text!r}: write an IPv6 address as [::1]:9466")
        host, port_text = value[1:end], value[end + 2:]
    elif ":" in value:
        host, _, port_text = value.rpartition(":")
        host = host or DEFAULT_HOST
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise MetricsError(f"metrics_listen {text!r}: use host:port, e.g. 127.0.0.1:9466")
    return host, int(port_text)


def _value(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{le="{_value(bound)}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_value(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """What the daemon reports; ``render()`` is the /metrics page."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._collectors: list[Callable[[], None]] = []
        self.start_time = clock()
        self.decisions: dict[str, int] = {"accept": 0, "reject": 0}
        self.latency = Histogram(DECISION_BUCKETS)
        self.ingested_records = 0
        self.ingest_errors = 0
        self.quarantined_records = 0
        self.lag: float | None = None
        self.backlog: int | None = None
        self.reservations: int | None = None
        self.reserved_amount: float | None = None
        self.leader: int | None = None
        self.budget_used: dict[str, float] = {}
        self.budget_limit: dict[str, float] = {}
        self.errors: dict[str, int] = {}
        self.reloads: dict[str, int] = {"ok": 0, "failed": 0}
        self.alert_sends: dict[tuple[str, str, str], int] = {}
        self.idle_warnings: dict[str, int] = {}
        self.idle_actions: dict[tuple[str, str], int] = {}
        self.idle_jobs: int | None = None
        self.idle_scan_s: float | None = None

    # -- what the daemon calls ---------------------------------------------------------------

    def decision(self, verdict: str, latency_s: float) -> None:
        """One submit decision and how long it took (seconds)."""
        with self._lock:
            self.decisions[verdict] = self.decisions.get(verdict, 0) + 1
            self.latency.observe(max(0.0, float(latency_s)))

    def ingested(self, records: int, errors: int = 0) -> None:
        with self._lock:
            self.ingested_records += max(0, int(records))
            self.ingest_errors += max(0, int(errors))

    def quarantined(self, records: int = 1) -> None:
        with self._lock:
            self.quarantined_records += max(0, int(records))

    def ingest_lag(self, seconds: float) -> None:
        """Age of the oldest record in the batch just ingested (now - its written_at)."""
        with self._lock:
            self.lag = max(0.0, float(seconds))

    def set_spool_backlog(self, records: int) -> None:
        with self._lock:
            self.backlog = max(0, int(records))

    def set_leader(self, leader: bool) -> None:
        with self._lock:
            self.leader = 1 if leader else 0

    def set_reservations(self, count: int, amount: float | None = None) -> None:
        with self._lock:
            self.reservations = max(0, int(count))
            if amount is not None:
                self.reserved_amount = float(amount)

    def set_budget_used(self, team: str, amount: float, budget: float | None = None) -> None:
        """Net spend of ``team`` in the current budget period (and its budget)."""
        with self._lock:
            self.budget_used[team] = float(amount)
            if budget is not None:
                self.budget_limit[team] = float(budget)

    def forget_team(self, team: str) -> None:
        """A team removed from the policy stops being reported."""
        with self._lock:
            self.budget_used.pop(team, None)
            self.budget_limit.pop(team, None)

    def error(self, where: str) -> None:
        with self._lock:
            self.errors[where] = self.errors.get(where, 0) + 1

    def policy_reload(self, ok: bool) -> None:
        with self._lock:
            self.reloads["ok" if ok else "failed"] += 1

    def alert_sent(self, kind: str, channel: str, result: str) -> None:
        """One alert delivery attempt (or a dry-run or dropped one) by its outcome."""
        with self._lock:
            key = (kind, channel, result)
            self.alert_sends[key] = self.alert_sends.get(key, 0) + 1
    def idle_event(self, kind: str, action: str, dry_run: bool) -> None:
        """One idle_warning or idle_action event (policies.idle)."""
        dry = "true" if dry_run else "false"
        with self._lock:
            if kind == "idle_warning":
                self.idle_warnings[dry] = self.idle_warnings.get(dry, 0) + 1
            else:
                key = (action, dry)
                self.idle_actions[key] = self.idle_actions.get(key, 0) + 1

    def idle_scan(self, seconds: float, idle_jobs: int) -> None:
        """One idle-GPU scan round: how long it took, how many jobs were idle past their
        first warning threshold."""
        with self._lock:
            self.idle_scan_s = max(0.0, float(seconds))
            self.idle_jobs = max(0, int(idle_jobs))

    def on_scrape(self, collector: Callable[[], None]) -> None:
        """Call ``collector`` before every render (it sets gauges, e.g. the spool backlog)."""
        self._collectors.append(collector)

    # -- rendering ---------------------------------------------------------------------------

    def render(self) -> str:
        for collect in list(self._collectors):
            try:
                collect()
            except Exception:  # a failing collector costs its gauge, never the page
                self.error("metrics")
        with self._lock:
            out: list[str] = []

            def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} {kind}")
                out.extend(samples)

            def labelled(name: str, label: str, values: dict[str, Any]) -> list[str]:
                return [f'{name}{{{label}="{_label(k)}"}} {_value(v)}'
                        for k, v in sorted(values.items())]

            def single(name: str, value: float | None) -> list[str]:
                return [] if value is None else [f"{name} {_value(value)}"]

            family("slurmgate_decisions_total", "counter", "Submit decisions by verdict.",
                   labelled("slurmgate_decisions_total", "verdict", self.decisions))
            family("slurmgate_decision_latency_seconds", "histogram",
                   "Time the daemon took to decide a submission.",
                   self.latency.lines("slurmgate_decision_latency_seconds"))
            family("slurmgate_ingested_records_total", "counter",
                   "Spool records ingested into the database.",
                   single("slurmgate_ingested_records_total", self.ingested_records))
            family("slurmgate_ingest_errors_total", "counter",
                   "Spool records the ingest rejected.",
                   single("slurmgate_ingest_errors_total", self.ingest_errors))
            family("slurmgate_quarantined_records_total", "counter",
                   "Spool records moved to quarantine.",
                   single("slurmgate_quarantined_records_total", self.quarantined_records))
            family("slurmgate_ingest_lag_seconds", "gauge",
                   "Age of the oldest record in the last ingest batch.",
                   single("slurmgate_ingest_lag_seconds", self.lag))
            family("slurmgate_spool_backlog_records", "gauge", "Records waiting in the spool.",
                   single("slurmgate_spool_backlog_records", self.backlog))
            family("slurmgate_reservations", "gauge", "Live budget reservations.",
                   single("slurmgate_reservations", self.reservations))
            family("slurmgate_reserved_amount", "gauge",
                   "Money held by live reservations (rate card currency).",
                   single("slurmgate_reserved_amount", self.reserved_amount))
            family("slurmgate_leader", "gauge",
                   "1 while this daemon does the cluster's once-only work, 0 while another does.",
                   single("slurmgate_leader", self.leader))
            family("slurmgate_budget_used", "gauge",
                   "Net spend of a team in the current budget period (rate card currency).",
                   labelled("slurmgate_budget_used", "team", self.budget_used))
            family("slurmgate_budget_limit", "gauge",
                   "Budget of a team for the current period (0: none).",
                   labelled("slurmgate_budget_limit", "team", self.budget_limit))
            family("slurmgate_errors_total", "counter", "Errors in the daemon by where.",
                   labelled("slurmgate_errors_total", "where", self.errors))
            family("slurmgate_policy_reloads_total", "counter", "Policy reloads (SIGHUP).",
                   labelled("slurmgate_policy_reloads_total", "result", self.reloads))
            family("slurmgate_alert_sends_total", "counter",
                   "Alert deliveries by kind, channel and result.",
                   [f'slurmgate_alert_sends_total{{kind="{_label(k)}",channel="{_label(c)}",'
                    f'result="{_label(r)}"}} {n}'
                    for (k, c, r), n in sorted(self.alert_sends.items())])
            family("slurmgate_start_time_seconds", "gauge", "When the daemon started (epoch).",
                   single("slurmgate_start_time_seconds", self.start_time))
            family("slurmgate_idle_warnings_total", "counter",
                   "Idle-GPU warnings (idle_warning events), dry runs apart.",
                   labelled("slurmgate_idle_warnings_total", "dry_run", self.idle_warnings))
            family("slurmgate_idle_actions_total", "counter",
                   "Jobs cancelled or requeued for idle GPUs (idle_action events).",
                   [f'slurmgate_idle_actions_total{{action="{_label(a)}",dry_run="{d}"}} '
                    f"{n}" for (a, d), n in sorted(self.idle_actions.items())])
            family("slurmgate_idle_jobs", "gauge",
                   "Running jobs idle past their first warning at the last idle scan.",
                   single("slurmgate_idle_jobs", self.idle_jobs))
            family("slurmgate_idle_scan_seconds", "gauge", "How long the last idle scan took.",
                   single("slurmgate_idle_scan_seconds", self.idle_scan_s))
        return "\n".join(out) + "\n"


def spool_backlog(spool_dir: str) -> int:
    """Records waiting in the spool's writer directories (what the daemon has not ingested)."""
    from slurm_plugin.node.spool import SUBDIRS

    n = 0
    for sub in SUBDIRS:
        try:
            with os.scandir(os.path.join(spool_dir, sub)) as entries:
                for e in entries:
                    if e.name.endswith(".json") and e.name.split(".", 1)[0] in RECORD_KINDS:
                        n += 1
        except OSError:
            continue
    return n


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "slurmgate-metrics"
    timeout = 10.0  # socket timeout of each connection: idle ones are closed

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode("utf-8", "replace"), self.server.token.encode("utf-8"))
        if not ok:
            data = b"unauthorized: send Authorization: Bearer <token>\n"
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="slurmgate"')
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        return ok

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics.render(), CONTENT_TYPE)
        elif path == "/":
            self._send(200, "slurmgate daemon metrics: /metrics\n", "text/plain; charset=utf-8")
        else:
            self._send(404, "not found: try /metrics\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        self._send(200 if self.path.split("?", 1)[0] == "/metrics" else 404, "", CONTENT_TYPE)

    def _send(self, code: int, body: str, ctype: str) -> None:
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # scrapes every 15 s would flood the daemon's log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics: Metrics
    token: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: closed, the scraper retries
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """``/metrics`` over HTTP in a daemon thread; ``start()`` binds, ``stop()`` closes."""

    def __init__(self, metrics: Metrics, listen: str, token: str) -> None:
        where = parse_listen(listen)
        if where is None:
            raise MetricsError("metrics_listen is empty: metrics are off")
        if not token:
            raise MetricsError("metrics need a bearer token: refusing to serve them "
                               "without authentication")
        self.metrics = metrics
        self.token = token
        self.host, self.port = where
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_policy(cls, policy: Any, metrics: Metrics) -> MetricsServer | None:
        """The server ``[daemon] metrics_listen`` asks for, or None when it is empty. Raises
        MetricsError when no usable ``metrics_token_file`` goes with it."""
        listen = policy.daemon.metrics_listen
        if not listen.strip():
            return None
        return cls(metrics, listen, read_token(policy.daemon.metrics_token_file))

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked for)."""
        if self._server is None:
            return self.host, self.port
        return self.host, int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"

    def start(self) -> None:
        cls = _Server6 if ":" in self.host else _Server
        try:
            server = cls((self.host, self.port), _Handler)
        except OSError as exc:
            raise MetricsError(f"cannot listen on {self.host}:{self.port} for metrics: "
                               f"{exc.strerror or exc}") from exc
        server.metrics = self.metrics
        server.token = self.token
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": 0.5}, name="metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
