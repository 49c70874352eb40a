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
    for name in ("node_run.c.1.0.n1.a.json", "jobcomp.c.1.0.ctl.b.json", "notes.txt",
                 "node_run.c.2.0.n1.c.json.tmp"):
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


def test_server_serves_metrics_and_nothing_else() -> None:
    m = Metrics()
    m.decision("accept", 0.001)
    server = MetricsServer(m, "127.0.0.1:0")
    server.start()
    try:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            body = resp.read().decode()
        assert parse(body)['slurmgate_decisions_total{verdict="accept"}'] == 1
        m.decision("reject", 0.002)
        with urllib.request.urlopen(server.url + "?x=1", timeout=5) as resp:
            assert 'verdict="reject"} 1' in resp.read().decode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/secret", timeout=5)
        assert err.value.code == 404
        busy = MetricsServer(m, f"127.0.0.1:{port}")
        with pytest.raises(MetricsError, match="cannot listen"):
            busy.start()
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_off_unless_the_policy_asks() -> None:
    assert MetricsServer.from_policy(Policy(), Metrics()) is None
    policy = Policy.model_validate({"daemon": {"metrics_listen": ":0"}})
    server = MetricsServer.from_policy(policy, Metrics())
    assert server is not None and server.address == ("127.0.0.1", 0)
    with pytest.raises(MetricsError):
        MetricsServer(Metrics(), "")
