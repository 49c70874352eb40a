"""Many clusters, one ledger: every report, quota, export and statement shows all clusters or
one, and the decision path (db.shared_ledger.team_standing) counts exactly what the quota
view (db.reports.quota_rows) counts. Every test runs on both backends (``ledger_target``: a
SQLite file, then a PostgreSQL database).

The ledger: clusters c1 and c2, both with a job 1 (a run is keyed by cluster, job id and
restart count), settled runs of vision, nlp and of no team, and live reservations on both.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db import ingest_records, open_store
from db import reports as rp
from db.chargeback import export as ex
from db.chargeback import statement as stmt
from db.chargeback.periods import Period
from db.rollups import apply_rollup_delta, team_spend_by_day
from db.shared_ledger import team_standing
from db.store import Store
from policies.config import Policy
from policies.ledger import period_bounds
from slurm_plugin.daemon.service import Daemon
from slurm_plugin.protocol import Peer
from tests.unit.test_db_ingest import HOUR, T0, make_jobcomp, make_node_run, make_policy, reserve

DAY = 86400.0
SEP = Period("month", "2026-09", int(T0 - 21 * DAY), int(T0 + 9 * DAY))
"""September 2026 (T0 is 2026-09-22 00:00 UTC)."""
WINDOW = (T0, T0 + 8 * DAY)
"""A budget-period-like window holding every run (whole UTC days)."""
EDGES = (T0 - 5 * HOUR, T0 + 8 * DAY - 5 * HOUR)
"""The same, from and to local midnights: the rollup plus partial days at both edges."""

# net per (cluster, team) of the runs below, and what their live reservations hold
NET = {("c1", "vision"): 16.0, ("c1", "nlp"): 4.0,
       ("c2", "vision"): 8.0, ("c2", "nlp"): 6.0, ("c2", None): 2.0}
HELD = {("c1", "vision"): 50.0, ("c2", "vision"): 30.0}


def gpu_policy(**overrides: Any) -> Policy:
    return make_policy(rates={"gpu_hour": {"a100": 2.0, "h100": 4.0}}, **overrides)  # GPU time


def two_clusters(store: Store, policy: Policy | None = None) -> None:
    """c1: vision 4 x a100 for 2 h (16), nlp 1 x h100 for 1 h (4); c2: vision 2 x a100 for
    2 h (8, job 1 again), nlp 1 x a100 for 3 h (6), a run of no team 1 x a100 for 1 h (2).
    Live: vision holds 50 on c1 (reserved) and 30 on c2 (bound to a running job)."""
    policy = policy or gpu_policy()
    reserve(store, 1, cluster="c1", project="llm")
    reserve(store, 2, cluster="c1", team="nlp", project="chat", gpu_type="h100")
    reserve(store, 1, cluster="c2", project="vit")
    reserve(store, 3, cluster="c2", team="nlp", project="chat")
    d1, d2, d3 = T0 + DAY + 5 * HOUR, T0 + 2 * DAY + 10 * HOUR, T0 + 3 * DAY + 20 * HOUR
    ingest_records(store, [
        make_node_run(1, cluster="c1"), make_jobcomp(1, cluster="c1"),
        make_node_run(2, cluster="c1", gpus=1, gpu_type="h100", account="nlp", start=d1,
                      end=d1 + HOUR),
        make_jobcomp(2, cluster="c1", account="nlp", start=d1, end=d1 + HOUR),
        make_node_run(1, cluster="c2", gpus=2, start=d1, end=d1 + 2 * HOUR, node="east1"),
        make_jobcomp(1, cluster="c2", start=d1, end=d1 + 2 * HOUR, nodes="east1"),
        make_node_run(3, cluster="c2", gpus=1, account="nlp", start=d2, end=d2 + 3 * HOUR),
        make_jobcomp(3, cluster="c2", account="nlp", start=d2, end=d2 + 3 * HOUR),
        make_node_run(4, cluster="c2", gpus=1, account="zzz", user="zed", start=d3,
                      end=d3 + HOUR),
        make_jobcomp(4, cluster="c2", account="zzz", user="zed", start=d3, end=d3 + HOUR),
    ], policy)
    reserve(store, None, cluster="c1", est_cost=50.0, created_at=T0 + 5 * DAY)
    live = reserve(store, None, cluster="c2", est_cost=30.0, created_at=T0 + 5 * DAY)
    store.bind_reservation(live, 9, "c2")


@pytest.fixture
def store(ledger_target: str) -> Iterator[Store]:
    s = open_store(ledger_target)
    two_clusters(s)
    yield s
    s.close()


def expected(cluster: str | None) -> dict[str | None, tuple[float, float]]:
    """team -> (net, reserved) of ``cluster`` (None: both)."""
    out: dict[str | None, tuple[float, float]] = {}
    for (c, team), net in NET.items():
        if cluster in (None, c):
            n, r = out.get(team, (0.0, 0.0))
            out[team] = (n + net, r)
    for (c, team), held in HELD.items():
        if cluster in (None, c):
            n, r = out.get(team, (0.0, 0.0))
            out[team] = (n, r + held)
    return out


# -- quota: per cluster and global, and the decision path's figures -------------------------


@pytest.mark.parametrize("window", [WINDOW, EDGES], ids=["whole days", "local midnights"])
@pytest.mark.parametrize("cluster", ["c1", "c2", None])
def test_quota_rows_per_cluster_and_global(store: Store, cluster: str | None,
                                           window: tuple[float, float]) -> None:
    rows = rp.quota_rows(store, *window, cluster=cluster)
    got = {r["team"]: (r["net"], r["reserved"]) for r in rows}
    assert got == {t: (pytest.approx(n), pytest.approx(h))
                   for t, (n, h) in expected(cluster).items()}
    assert [r["team"] for r in rows] == sorted(got, key=lambda t: t or "")
    live = {r["team"]: r["reservations"] for r in rows}
    assert live.get("vision") == (2 if cluster is None else 1)


def test_global_quota_is_the_sum_of_the_clusters(store: Store) -> None:
    both = {r["team"]: r for r in rp.quota_rows(store, *EDGES)}
    per = [{r["team"]: r for r in rp.quota_rows(store, *EDGES, cluster=c)} for c in ("c1", "c2")]
    for team, row in both.items():
        for k in ("spend", "credits", "net", "reserved", "reservations"):
            assert row[k] == pytest.approx(sum(p[team][k] for p in per if team in p))


@pytest.mark.parametrize("window", [WINDOW, EDGES, (T0 + HOUR, T0 + 3 * HOUR)],
                         ids=["whole days", "local midnights", "inside one day"])
def test_team_standing_is_the_quota_rows_figure(store: Store,
                                                window: tuple[float, float]) -> None:
    """One definition: the decision path's (net, reserved) of a team is the quota view's,
    for each cluster and across clusters, to the last bit."""
    for cluster in ("c1", "c2", None):
        rows = {r["team"]: r for r in rp.quota_rows(store, *window, cluster=cluster)}
        for team in ("vision", "nlp", "speech"):
            row = rows.get(team)
            want = (row["net"], row["reserved"]) if row else (0.0, 0.0)
            assert team_standing(store, team, *window, cluster=cluster) == want, \
                (team, cluster)


def test_team_figures_filters_by_team_and_period(store: Store) -> None:
    one = rp.team_figures(store, *EDGES, team="vision", cluster="c2")
    assert list(one) == ["vision"] and one["vision"]["net"] == pytest.approx(8.0)
    assert one["vision"]["reserved"] == 30.0 and one["vision"]["reservations"] == 1
    nobody = rp.team_figures(store, *EDGES, team="")  # runs without a team
    assert list(nobody) == [""] and nobody[""]["net"] == pytest.approx(2.0)
    assert rp.team_figures(store, *EDGES, team="vision", period="2026-10") == {
        "vision": {"team": "vision", "spend": pytest.approx(24.0), "credits": 0.0,
                   "net": pytest.approx(24.0), "reserved": 0.0, "reservations": 0}}


class Recorder:
    """Wraps a connection's execute, recording each statement."""

    def __init__(self, store: Store) -> None:
        self.conn = store.conn
        self.real = store.conn.execute
        self.seen: list[tuple[str, Any]] = []

    def __enter__(self) -> Recorder:
        def execute(sql: str, params: Any = None) -> Any:
            self.seen.append((sql, params))
            return self.real(sql, params)

        self.conn.execute = execute  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute = self.real  # type: ignore[method-assign]


def test_team_standing_is_two_statements_filtered_by_team(store: Store) -> None:
    """The decision path's read inside the team lock: two statements, each filtered by
    team; on SQLite, each reads its team's rows through the indexes."""
    with Recorder(store) as rec:
        team_standing(store, "vision", *EDGES, cluster="c1")
    assert len(rec.seen) == 2
    for sql, params in rec.seen:
        assert params["f_team"] == "vision" and params["f_cluster"] == "c1"
        assert "team = :f_team" in sql
    if store.dialect != "sqlite":
        return
    plans = [" | ".join(r[-1] for r in store.conn.execute("EXPLAIN QUERY PLAN " + sql,
                                                          params).fetchall())
             for sql, params in rec.seen]
    assert "runs_team_end" in plans[0] and "SCAN runs" not in plans[0]
    assert "reservations_live" in plans[1] and "runs_rid" in plans[1]
    assert plans[1].count("runs_rid") == 1  # one probe of a reservation's runs, not two
    assert "SCAN r " not in plans[1] + " " and "SCAN reservations" not in plans[1]


# -- the other reports ----------------------------------------------------------------------


@pytest.mark.parametrize("window", [WINDOW, EDGES, (T0 + 0.5 * HOUR, T0 + 2 * DAY + 11 * HOUR)])
def test_usage_rows_of_a_cluster_rollup_and_raw_scan_agree(store: Store,
                                                           window: tuple[float, float]) -> None:
    for cluster in ("c1", "c2"):
        for dims in (("team",), ("team", "project"), ("user", "team")):
            fast = rp.usage_rows(store, *window, dims, cluster=cluster)
            slow = rp.usage_rows(store, *window, dims, cluster=cluster, use_rollup=False)
            assert fast == [pytest.approx(r) for r in slow], (cluster, dims)
    by_cluster = rp.usage_rows(store, *WINDOW, ("cluster", "team"))
    assert {(r["cluster"], r["team"] or None): r["cost"] for r in by_cluster} == \
        pytest.approx(NET)


def test_chargeback_of_one_cluster(store: Store) -> None:
    rows = rp.chargeback(store, *WINDOW, group_by=("team",), cluster="c2")
    assert [(r["team"], r["runs"], round(r["net"], 6)) for r in rows] == [
        ("vision", 1, 8.0), ("nlp", 1, 6.0), (None, 1, 2.0)]
    both = rp.chargeback(store, *WINDOW, group_by=("team",))
    assert [(r["team"], r["runs"]) for r in both] == [("vision", 2), ("nlp", 2), (None, 1)]
    assert rp.chargeback(store, *WINDOW, cluster="nowhere") == []


def test_spend_by_day_of_one_cluster(store: Store) -> None:
    assert rp.spend_by_day(store, *WINDOW) == team_spend_by_day(store, *WINDOW)
    c2 = rp.spend_by_day(store, *WINDOW, cluster="c2")
    day = int((T0 + DAY) // DAY)
    assert c2 == {"": {day + 2: pytest.approx(2.0)}, "nlp": {day + 1: pytest.approx(6.0)},
                  "vision": {day: pytest.approx(8.0)}}


def test_events_and_node_failures_of_one_cluster(store: Store) -> None:
    for i, (cluster, node) in enumerate([("c1", "n1"), ("c2", "n1"), ("c2", "n1"),
                                         ("c1", "n2")]):
        store.add_event("node_fail", ts=T0 + i, cluster=cluster, node=node, job_id=10 + i,
                        message=f"{cluster}/{node} down #{i}")
    assert [e["job_id"] for e in rp.events(store, ["node_fail"], cluster="c2")] == [12, 11]
    assert rp.event_count(store, "node_fail") == 4
    assert rp.event_count(store, "node_fail", cluster="c1") == 2
    assert rp.event_count(store, cluster="c2") == rp.event_count(store, "node_fail",
                                                                  cluster="c2") == 2
    # node names repeat across clusters: c2's n1 is not c1's n1
    assert [(r["node"], r["failures"]) for r in rp.node_failures(store, T0)] == [
        ("n1", 3), ("n2", 1)]
    c2 = rp.node_failures(store, T0, cluster="c2")
    assert [(r["node"], r["failures"]) for r in c2] == [("n1", 2)]
    assert c2[0]["last_message"] == "c2/n1 down #2"
    c1 = rp.node_failures(store, T0, cluster="c1")
    assert [(r["node"], r["failures"], r["last_message"]) for r in c1] == [
        ("n2", 1, "c1/n2 down #3"), ("n1", 1, "c1/n1 down #0")]  # the latest failure first


def test_known_clusters(store: Store) -> None:
    assert rp.ledger_clusters(store) == ["c1", "c2"]
    assert rp.has_cluster(store, "c2") and not rp.has_cluster(store, "c3")
    assert rp.unknown_cluster_message(store, "c1") is None
    assert rp.unknown_cluster_message(store, "c3") == (
        "cluster 'c3' has no runs or reservations in the ledger; clusters: c1, c2")


# -- exports ---------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_export_of_every_cluster_and_of_one(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    every = ex.export_period(store.path, SEP, out, parquet=False)
    c2 = ex.export_period(store.path, SEP, out, parquet=False, cluster="c2")
    c1 = ex.export_period(store.path, SEP, out, parquet=False, cluster="c1")
    assert every.path == out / "2026-09"
    assert c2.path == out / "cluster=c2" / "2026-09" and c1.path == out / "cluster=c1" / "2026-09"
    assert every.manifest["clusters"] == ["c1", "c2"] and every.manifest["cluster_filter"] is None
    assert c2.manifest["clusters"] == ["c2"] and c2.manifest["cluster_filter"] == "c2"
    runs = read_csv(c2.path / "runs.csv")
    assert [(r["cluster"], r["job_id"], r["net"]) for r in runs] == [
        ("c2", "1", "8.00"), ("c2", "3", "6.00"), ("c2", "4", "2.00")]
    assert {r["team"]: r["net"] for r in read_csv(c2.path / "by_team.csv")} == {
        "": "2.00", "nlp": "6.00", "vision": "8.00"}
    # the clusters' exports add up to the export of every cluster, to the cent
    for key, value in every.manifest["totals"].items():
        parts = (c1.manifest["totals"][key], c2.manifest["totals"][key])
        if isinstance(value, int):
            assert value == sum(parts), key
        else:
            assert round(float(value), 6) == round(sum(float(p) for p in parts), 6), key
    assert len(read_csv(every.path / "runs.csv")) == 5
    assert ex.verify_export(c2.path) == [] and ex.verify_export(every.path) == []
    # exporting one cluster never touched the export of every cluster
    assert json.loads((every.path / "manifest.json").read_text()) == every.manifest


def test_export_of_a_cluster_counts_its_unsettled_runs_only(store: Store,
                                                           tmp_path: Path) -> None:
    ingest_records(store, [make_node_run(7, cluster="c1", start=T0 + 4 * DAY,
                                         end=T0 + 4 * DAY + HOUR)], gpu_policy())
    counts = {c: ex.export_period(store.path, SEP, tmp_path, parquet=False,
                                  cluster=c).manifest["unsettled_runs"] for c in ("c1", "c2")}
    assert counts == {"c1": 1, "c2": 0}


def test_export_refuses_an_unknown_or_unsafe_cluster(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ex.ExportError, match="cluster 'c3' has no runs or reservations"):
        ex.export_period(store.path, SEP, out, parquet=False, cluster="c3")
    for bad in ("../c1", "c1/x", "", ".hidden"):
        with pytest.raises(ex.ExportError, match="a cluster name is letters"):
            ex.export_period(store.path, SEP, out, parquet=False, cluster=bad)
    assert not out.exists()


def test_a_big_export_of_one_cluster_in_slices_matches_one_slice(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes read the same cluster's runs as the one-slice export."""
    one = ex.export_period(store.path, SEP, tmp_path / "one", parquet=False, cluster="c2")
    monkeypatch.setattr(ex, "PARALLEL_MIN_RUNS", 1)
    monkeypatch.setattr(ex, "SLICES_PER_JOB", 2)
    many = ex.export_period(store.path, SEP, tmp_path / "many", parquet=False, jobs=2,
                            cluster="c2")
    for name in ("runs.csv", "runs.jsonl", "by_team.csv", "manifest.json"):
        assert (one.path / name).read_bytes() == (many.path / name).read_bytes(), name


def cli_policy(tmp_path: Path, target: str, scope: str = "cluster") -> Path:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[daemon]\ndatabase = "{target}"\ncluster = "c1"\n'
        '[teams.vision]\naccounts = ["vis"]\nbudget = 100.0\n'
        '[teams.nlp]\naccounts = ["nlp"]\nbudget = 20.0\n'
        f'[budgets]\nscope = "{scope}"\n[export]\nout_dir = "{tmp_path / "exports"}"\n')
    return policy


def test_export_command_with_and_without_cluster(store: Store, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from slurm_plugin.cli import main

    policy = cli_policy(tmp_path, store.path)
    assert main(["--config", str(policy), "export", "--month", "2026-09"]) == 0
    assert main(["--config", str(policy), "export", "--month", "2026-09",
                 "--cluster", "c2"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith(f"{tmp_path / 'exports' / '2026-09'}: 5 runs, net $36.00")
    assert said[1].startswith(f"{tmp_path / 'exports' / 'cluster=c2' / '2026-09'}: 3 runs, "
                              "net $16.00")
    with pytest.raises(SystemExit, match="cluster 'nope' has no runs"):
        main(["--config", str(policy), "export", "--month", "2026-09", "--cluster", "nope"])


# -- statements ------------------------------------------------------------------------------


def statement_policy(scope: str = "cluster") -> Policy:
    return gpu_policy(teams={"vision": {"accounts": ["vis"], "budget": 100.0},
                             "nlp": {"accounts": ["nlp"], "members": ["nora"], "budget": 20.0}},
                      budgets={"scope": scope, "period": "month"})


def test_statement_of_one_cluster_and_of_every_cluster(store: Store) -> None:
    every = stmt.build_statement(store, statement_policy(), SEP)
    c2 = stmt.build_statement(store, statement_policy(), SEP, cluster="c2")
    assert (every.cluster, every.clusters) == (None, ["c1", "c2"])
    assert (c2.cluster, c2.clusters) == ("c2", ["c2"])
    assert {t.team: t.totals.net for t in c2.teams} == {"nlp": 600, "vision": 800, "": 200}
    assert {t.team: t.totals.net for t in every.teams} == {"nlp": 1000, "vision": 2400,
                                                            "": 200}
    assert c2.team("vision").totals.runs == 1 and every.team("vision").totals.runs == 2
    text, every_text = stmt.render_text(c2), stmt.render_text(every)
    assert "covers: cluster c2\n" in text and "covers: all clusters (c1, c2)\n" in every_text
    assert "cluster c2" in stmt.render_html(c2)
    assert "all clusters (c1, c2)" in stmt.render_html(every)
    data = stmt.statement_json(c2)
    assert (data["cluster"], data["clusters"], data["budget_scope"]) == ("c2", ["c2"], "cluster")
    assert stmt.statement_json(every)["cluster"] is None
    with pytest.raises(ValueError, match="cluster 'c3' has no runs or reservations"):
        stmt.build_statement(store, statement_policy(), SEP, cluster="c3")


def test_statement_efficiency_and_approvals_of_one_cluster(store: Store) -> None:
    aid = store.add_approval(team="vision", amount=40.0, reason="push", expires_at=T0 + 30 * DAY,
                             now=T0)
    assert store.use_approval(aid, 5.0, cluster="c1", job_id=1, user="vera", now=T0 + HOUR)
    assert store.use_approval(aid, 7.0, cluster="c2", job_id=1, user="vera", now=T0 + 2 * HOUR)
    policy = statement_policy()
    uses = {c: [(a.uses, a.amount) for a in stmt.build_statement(
        store, policy, SEP, cluster=c).team("vision").approvals] for c in ("c1", "c2", None)}
    assert uses == {"c1": [(1, 5.0)], "c2": [(1, 7.0)], None: [(2, 12.0)]}
    eff = {c: stmt.build_statement(store, policy, SEP, cluster=c, efficiency_by=("user",))
           .team("vision").efficiency for c in ("c2", None)}
    assert eff["c2"]["totals"]["runs"] == 1 and eff[None]["totals"]["runs"] == 2
    assert eff["c2"]["totals"]["net"] == pytest.approx(8.0)
    assert [r["runs"] for r in eff["c2"]["by"]["user"]] == [1]
    with pytest.raises(ValueError, match="cannot group efficiency"):
        stmt.build_statement(store, policy, SEP, cluster="c2", efficiency_by=("colour",))


def test_statement_budget_use_follows_the_budget_scope(store: Store) -> None:
    # a budget per cluster: each cluster's use against its own budget
    every = stmt.build_statement(store, statement_policy("cluster"), SEP)
    vision = every.team("vision")
    assert vision.budget_by_cluster == pytest.approx({"c1": 16.0, "c2": 8.0})
    assert vision.budget_used == pytest.approx(24.0)
    assert every.team("").budget_by_cluster == {"c1": 0.0, "c2": pytest.approx(2.0)}
    assert "budget 2026-09: $100.00 on each cluster; used c1 $16.00 (16.0%), c2 $8.00 (8.0%)" \
        in stmt.render_text(every)
    assert stmt.statement_json(every)["teams"][1]["budget"]["used_by_cluster"] == {
        "c1": "16.00", "c2": "8.00"}
    assert stmt.render_html(every).count("<svg") > stmt.render_html(
        stmt.build_statement(store, statement_policy("cluster"), SEP, cluster="c2")).count("<svg")
    one = stmt.build_statement(store, statement_policy("cluster"), SEP, cluster="c2")
    assert one.team("vision").budget_used == pytest.approx(8.0)
    assert one.team("vision").budget_by_cluster == {}
    assert "budget 2026-09: $100.00; used $8.00 (8.0%); remaining $92.00" in \
        stmt.render_text(one)
    # a global budget: every cluster's use, whatever the statement covers
    for cluster in (None, "c2"):
        st = stmt.build_statement(store, statement_policy("global"), SEP, cluster=cluster)
        assert st.team("vision").budget_used == pytest.approx(24.0)
        assert st.team("vision").budget_by_cluster == {}
    assert "budget 2026-09 (one budget across every cluster): $100.00; used $24.00" in \
        stmt.render_text(st)


def test_report_command_with_and_without_cluster(store: Store, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from slurm_plugin.cli import main

    policy = cli_policy(tmp_path, store.path)
    assert main(["--config", str(policy), "report", "--month", "2026-09", "--cluster", "c1",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cluster"] == "c1" and data["clusters"] == ["c1"]
    assert {t["team"]: t["totals"]["net"] for t in data["teams"]} == {"nlp": "4.00",
                                                                      "vision": "16.00"}
    assert main(["--config", str(policy), "report", "--month", "2026-09"]) == 0
    said = capsys.readouterr().out
    assert "covers: all clusters (c1, c2)" in said and "Team (no team)" in said
    with pytest.raises(SystemExit, match="cluster 'c9' has no runs"):
        main(["--config", str(policy), "report", "--month", "2026-09", "--cluster", "c9"])


# -- the daemon's ledger and its quota op ------------------------------------------------------

ROOT, MEMBER = Peer(10, 0, 0), Peer(10, 3, 3)
"""root (an admin) and uid 3 ("sys" on every Debian system), a member of vision."""


def daemon_policy(tmp: Path, target: str, scope: str) -> Policy:
    return gpu_policy(
        daemon={"cluster": "c1", "log_file": str(tmp / "daemon.log"), "database": target},
        budgets={"scope": scope},
        teams={"vision": {"accounts": ["vis"], "members": ["sys"], "budget": 100.0},
               "nlp": {"accounts": ["nlp"], "members": ["nora"], "budget": 20.0}})


@pytest.fixture
def this_month(ledger_target: str) -> Iterator[tuple[str, float, float]]:
    """Both clusters' runs and reservations, moved into the current budget period (the
    daemon's ledger is the period's): (target, period start, period end)."""
    start, end, _ = period_bounds("month", time.time())
    s = open_store(ledger_target)
    two_clusters(s)
    shift = start + HOUR - T0
    with s.transaction():
        for table in ("runs", "run_nodes"):
            s.conn.execute(f"UPDATE {table} SET start_ts = start_ts + :d, end_ts = end_ts + :d",
                           {"d": shift})
        s.conn.execute("DELETE FROM usage_daily_team")
        s.conn.execute("DELETE FROM usage_daily_project")
        s.conn.execute("DELETE FROM usage_daily")
        apply_rollup_delta(s.conn, [(None, r) for r in
                                    s._query("SELECT * FROM runs WHERE cost IS NOT NULL")])
    s.close()
    yield ledger_target, start, end


def make_daemon(tmp: Path, target: str, scope: str) -> Daemon:
    d = Daemon(str(tmp / "policy.toml"), daemon_policy(tmp, target, scope), open_store(target),
               None)
    d.refresh_ledger()
    return d


def quota(d: Daemon, peer: Peer = ROOT, **req: Any) -> dict[str, Any]:
    return d._dispatch({"op": "quota", **req}, peer)


def figures(resp: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {r["team"]: (r["spent"], r["reserved"]) for r in resp["teams"]}


@pytest.mark.parametrize("scope", ["cluster", "global"])
def test_the_daemons_ledger_follows_the_budget_scope(this_month: tuple[str, float, float],
                                                     tmp_path: Path, scope: str) -> None:
    target, start, end = this_month
    d = make_daemon(tmp_path, target, scope)
    cluster = "c1" if scope == "cluster" else None
    want = expected(cluster)
    assert d.ledger.spent == pytest.approx({t or "": n for t, (n, _) in want.items()})
    assert {t: r for t, r in d.ledger.reserved.items() if r} == pytest.approx(
        {t or "": r for t, (_, r) in want.items() if r})
    # the decision path on a shared ledger reads the same figures
    assert d.store is not None
    for team in ("vision", "nlp"):
        assert team_standing(d.store, team, start, end, cluster=cluster) == \
            (d.ledger.spent.get(team, 0.0), d.ledger.reserved.get(team, 0.0))
    resp = quota(d)
    assert resp["ok"] and (resp["scope"], resp["cluster"]) == (scope, cluster)
    assert figures(resp) == {t: (pytest.approx(want[t][0]), pytest.approx(want[t][1]))
                             for t in ("vision", "nlp")}
    d.store.close()


def test_quota_of_another_cluster_is_for_admins(this_month: tuple[str, float, float],
                                                tmp_path: Path) -> None:
    target, _, _ = this_month
    d = make_daemon(tmp_path, target, "cluster")
    other = quota(d, cluster="c2")
    assert other["ok"] and other["cluster"] == "c2"
    assert figures(other) == {"vision": (pytest.approx(8.0), pytest.approx(30.0)),
                              "nlp": (pytest.approx(6.0), 0.0)}
    assert other["teams"][1]["remaining"] == pytest.approx(100.0 - 8.0 - 30.0)
    assert quota(d, cluster="c1") == quota(d)  # this cluster: the daemon's own ledger
    mine = quota(d, MEMBER, cluster="c1")
    assert mine["ok"] and [r["team"] for r in mine["teams"]] == ["vision"]
    refused = quota(d, MEMBER, cluster="c2")
    assert refused == {"ok": False, "error": "you (sys) may see the quotas of this cluster "
                       "(c1) only; ask on cluster c2's own daemon, or an admin"}
    unknown = quota(d, cluster="c3")
    assert unknown["ok"] is False and "cluster 'c3' has no runs or reservations" in \
        unknown["error"] and "clusters: c1, c2" in unknown["error"]
    for bad in (5, "", ["c2"]):
        assert quota(d, cluster=bad) == {"ok": False, "error": "'cluster' must be a cluster name"}
    assert d.store is not None
    d.store.close()


def test_quota_per_cluster_is_refused_with_global_budgets(this_month: tuple[str, float, float],
                                                          tmp_path: Path) -> None:
    target, _, _ = this_month
    d = make_daemon(tmp_path, target, "global")
    for peer, cluster in ((ROOT, "c2"), (ROOT, "c1"), (MEMBER, "c1")):
        resp = quota(d, peer, cluster=cluster)
        assert resp["ok"] is False and resp["error"].startswith("budgets are global here")
    assert d.store is not None
    d.store.close()


def test_quota_command_names_the_cluster(this_month: tuple[str, float, float], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from slurm_plugin import cli

    target, _, _ = this_month
    for scope, args, header in (
            ("cluster", [], ", cluster c1"), ("cluster", ["--cluster", "c2"], ", cluster c2"),
            ("global", [], ", all clusters (global budgets)")):
        d = make_daemon(tmp_path, target, scope)
        sent: list[dict[str, Any]] = []

        def call(_args: Any, request: dict[str, Any], d: Daemon = d,
                 sent: list[dict[str, Any]] = sent) -> dict[str, Any]:
            sent.append(request)
            return quota(d, **{k: v for k, v in request.items() if k != "op"})

        monkeypatch.setattr(cli, "_call", call)
        assert cli.main(["quota", *args]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("budget period ") and first.endswith(header), first
        assert sent[0].get("cluster") == (args[1] if args else None)
        assert d.store is not None
        d.store.close()
