"""Prometheus metrics (slurm_plugin/daemon/prometheus.py): the registry's text format and the HTTP
endpoint, bound to a free port on 127.0.0.1."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from policies.config import Policy
from slurm_plugin.daemon.prometheus import (
    CONTENT_TYPE,
    Metrics,
    MetricsError,
    MetricsServer,
    parse_listen,
    spool_backlog,
)

SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="(?:[^"\\]|\\.)*"\})? \S+$')


def parse(text: str) -> dict[str, float]:
    """Sample lines -> {name{labels}: value}; checks every line is well formed."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) slurmgate_[a-z_]+ ", line), line
            continue
        assert SAMPLE.match(line), line
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value.replace("+Inf", "inf"))
    return samples


def test_listen_addresses() -> None:
    assert parse_listen("") is None and parse_listen("  ") is None
    assert parse_listen("9466") == ("127.0.0.1", 9466)
    assert parse_listen(":9466") == ("127.0.0.1", 9466)
    assert parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    for bad in ("localhost", "host:port", "1.2.3.4:99999", "[::1]9100"):
        with pytest.raises(MetricsError, match="metrics_listen"):
            parse_listen(bad)


def test_registry_renders_the_prometheus_text_format() -> None:
    m = Metrics(clock=lambda: 1_700_000_000.0)
    for latency in (0.0004, 0.003, 0.003, 2.0):
        m.decision("accept", latency)
    m.decision("reject", 0.02)
    m.ingested(10, errors=1)
    m.quarantined()
    m.ingest_lag(3.5)
    m.set_spool_backlog(7)
    m.set_reservations(4, 1234.5)
    m.set_budget_used("vision", 100.25, 20000)
    m.set_budget_used('we"ird\nteam', 1.0)
    m.error("ingest")
    m.policy_reload(False)
    s = parse(m.render())
    assert s['slurmgate_decisions_total{verdict="accept"}'] == 4
    assert s['slurmgate_decisions_total{verdict="reject"}'] == 1
    h = "slurmgate_decision_latency_seconds"
    assert s[f'{h}_bucket{{le="0.0005"}}'] == 1
    assert s[f'{h}_bucket{{le="0.005"}}'] == 3  # cumulative
    assert s[f'{h}_bucket{{le="1.0"}}'] == 4
    assert s[f'{h}_bucket{{le="+Inf"}}'] == 5 == s[f"{h}_count"]
    assert s[f"{h}_sum"] == pytest.approx(2.0264)
    assert s["slurmgate_ingested_records_total"] == 10
    assert s["slurmgate_ingest_errors_total"] == 1
    assert s["slurmgate_quarantined_records_total"] == 1
    assert s["slurmgate_ingest_lag_seconds"] == 3.5
    assert s["slurmgate_spool_backlog_records"] == 7
    assert (s["slurmgate_reservations"], s["slurmgate_reserved_amount"]) == (4, 1234.5)
    assert s['slurmgate_budget_used{team="vision"}'] == 100.25
    assert s['slurmgate_budget_limit{team="vision"}'] == 20000
    assert s['slurmgate_budget_used{team="we\\"ird\\nteam"}'] == 1.0
    assert s['slurmgate_errors_total{where="ingest"}'] == 1
    assert s['slurmgate_policy_reloads_total{result="failed"}'] == 1
    assert s["slurmgate_start_time_seconds"] == 1_700_000_000.0
    m.forget_team("vision")
    assert 'team="vision"' not in m.render()


def test_gauges_not_reported_yet_are_absent_and_collectors_fill_them(tmp_path: Path) -> None:
    m = Metrics()
    text = m.render()
    assert "\nslurmgate_spool_backlog_records " not in text
    assert "# TYPE slurmgate_spool_backlog_records gauge" in text
    (tmp_path / "node").mkdir()
    (tmp_path / "ctld").mkdir()
    for name in ("node/node_run.c.1.0.n1.a.json", "ctld/jobcomp.c.1.0.ctl.b.json",
                 "node/notes.txt", "node/node_run.c.2.0.n1.c.json.tmp"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "jobcomp.c.3.0.ctl.d.json").write_text("{}")
    m.on_scrape(lambda: m.set_spool_backlog(spool_backlog(str(tmp_path))))

    def broken() -> None:
        raise RuntimeError("collector bug")

    m.on_scrape(broken)
    s = parse(m.render())
    assert s["slurmgate_spool_backlog_records"] == 2
    assert s['slurmgate_errors_total{where="metrics"}'] == 1
    assert spool_backlog(str(tmp_path / "missing")) == 0


TOKEN = "s3cret-scrape-token"


def get(url: str, token: str | None = TOKEN, timeout: float = 5):  # noqa: ANN201
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=timeout)


def test_server_serves_metrics_and_nothing_else() -> None:
    m = Metrics()
    m.decision("accept", 0.001)
    server = MetricsServer(m, "127.0.0.1:0", TOKEN)
    server.start()
    try:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        with get(server.url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            body = resp.read().decode()
        assert parse(body)['slurmgate_decisions_total{verdict="accept"}'] == 1
        m.decision("reject", 0.002)
        with get(server.url + "?x=1") as resp:
            assert 'verdict="reject"} 1' in resp.read().decode()
        with pytest.raises(urllib.error.HTTPError) as err:
            get(f"http://127.0.0.1:{port}/secret")
        assert err.value.code == 404
        busy = MetricsServer(m, f"127.0.0.1:{port}", TOKEN)
        with pytest.raises(MetricsError, match="cannot listen"):
            busy.start()
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_off_unless_the_policy_asks(tmp_path: Path) -> None:
    assert MetricsServer.from_policy(Policy(), Metrics()) is None
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o640)
    policy = Policy.model_validate({"daemon": {"metrics_listen": ":0",
                                               "metrics_token_file": str(token)}})
    server = MetricsServer.from_policy(policy, Metrics())
    assert server is not None and server.address == ("127.0.0.1", 0)
    assert server.token == TOKEN
    with pytest.raises(MetricsError):
        MetricsServer(Metrics(), "", TOKEN)


def test_never_served_without_a_usable_token(tmp_path: Path) -> None:
    def policy(token_file: str) -> Policy:
        return Policy.model_validate({"daemon": {"metrics_listen": ":0",
                                                 "metrics_token_file": token_file}})

    with pytest.raises(MetricsError, match="metrics_token_file is not"):
        MetricsServer.from_policy(policy(""), Metrics())
    with pytest.raises(MetricsError, match="cannot read it"):
        MetricsServer.from_policy(policy(str(tmp_path / "missing")), Metrics())
    open_to_all = tmp_path / "open"
    open_to_all.write_text(TOKEN)
    open_to_all.chmod(0o644)
    with pytest.raises(MetricsError, match="others may read it"):
        MetricsServer.from_policy(policy(str(open_to_all)), Metrics())
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(MetricsError, match="one token"):
        MetricsServer.from_policy(policy(str(empty)), Metrics())
    with pytest.raises(MetricsError, match="bearer token"):
        MetricsServer(Metrics(), "127.0.0.1:0", "")


def test_every_request_needs_the_bearer_token() -> None:
    m = Metrics()
    m.set_budget_used("vision", 12.0, 100.0)
    server = MetricsServer(m, "127.0.0.1:0", TOKEN)
    server.start()
    try:
        for token in (None, "", "wrong", TOKEN + "x", TOKEN[:-1]):
            with pytest.raises(urllib.error.HTTPError) as err:
                get(server.url, token=token)
            assert err.value.code == 401
            assert err.value.headers["WWW-Authenticate"].startswith("Bearer")
            assert b"vision" not in err.value.read()
        req = urllib.request.Request(server.url, headers={"Authorization": f"Basic {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 401
        with get(server.url) as resp:
            assert 'team="vision"' in resp.read().decode()
    finally:
        server.stop()


def test_idle_connections_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    from slurm_plugin.daemon import prometheus

    monkeypatch.setattr(prometheus._Handler, "timeout", 0.3)
    server = MetricsServer(Metrics(), "127.0.0.1:0", TOKEN)
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5) as idle:
            idle.sendall(b"GET /metrics HTTP/1.1\r\n")  # and then nothing
            started = time.monotonic()
            assert idle.recv(1024) == b""  # the daemon hung up
            assert time.monotonic() - started < 4
        with get(server.url) as resp:  # still serving
            assert resp.status == 200
    finally:
        server.stop()


def test_spool_backlog_counts_the_writer_directories(tmp_path) -> None:
    for sub, names in (("node", ["node_run.a.json", "gpu_sample.b.json", "junk.txt"]),
                       ("ctld", ["jobcomp.c.json"]), ("quarantine", ["jobcomp.d.json"])):
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).write_text("{}")
    (tmp_path / "jobcomp.top.json").write_text("{}")   # the old flat layout is not the backlog
    assert spool_backlog(str(tmp_path)) == 3
