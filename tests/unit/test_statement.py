"""Monthly statements (db/chargeback/statement.py): the same money as the exports, budget use from
the ledger, approvals used, showback/chargeback said out loud, and an HTML page with inline
SVG charts and nothing to fetch (rendered in headless Chromium where it is installed).

Every test that reads a ledger runs on both backends (``ledger_target``: a SQLite file, then
a PostgreSQL database), and the same runs in both give the same statement, to the byte."""

from __future__ import annotations

import csv
import json
import subprocess
from datetime import date
from html.parser import HTMLParser
from pathlib import Path

import pytest

from db.chargeback import export as ex
from db.chargeback import statement as stmt
from db.chargeback.periods import Period, day_period, month_period
from db.ingest import apply_rollup_delta
from db.store import Store, open_store
from policies.config import Policy, parse_policy
from tests.unit.test_export import add_progress, add_run, sample_store, ts

NOV = month_period(2026, 11)
CHROMIUM = "/usr/bin/chromium"


def make_policy(mode: str = "chargeback") -> Policy:
    return parse_policy(f"""
[teams.vision]
accounts = ["vision"]
cost_center = "CC1001"
budget = 50.0
[teams.nlp]
accounts = ["nlp"]
cost_center = "CC2002"
[budgets]
mode = "{mode}"
[rates]
currency = "$"
""")


def statement_store(target: str) -> Store:
    """The export tests' runs, an approval used twice and the daily rollups, at ``target``."""
    s = sample_store(target)
    aid = s.add_approval(team="vision", amount=40.0, reason="deadline push",
                         expires_at=ts("2026-12-31 00:00"), now=ts("2026-11-01 00:00"))
    assert s.use_approval(aid, 12.5, cluster="c1", job_id=1, user="alice",
                          now=ts("2026-11-25 09:59"))
    assert s.use_approval(aid, 2.5, cluster="c1", job_id=9, user="alice",
                          now=ts("2026-11-25 08:59"))
    with s.transaction():
        apply_rollup_delta(s.conn, [(None, r) for r in
                                    s._query("SELECT * FROM runs WHERE cost IS NOT NULL")])
    return s


@pytest.fixture
def store(ledger_target: str) -> Store:
    s = statement_store(ledger_target)
    yield s
    s.close()


def by_team_export(store: Store, tmp_path: Path, period: Period) -> dict[str, dict]:
    res = ex.export_period(store.path, period, tmp_path / "out", parquet=False)
    with open(res.path / "by_team.csv", newline="") as fh:
        return {r["team"]: r for r in csv.DictReader(fh)}


def cents(text: str) -> int:
    return round(float(text) * 100)


def test_statement_money_equals_the_month_export(store: Store, tmp_path: Path) -> None:
    st = stmt.build_statement(store, make_policy(), NOV)
    exported = by_team_export(store, tmp_path, NOV)
    assert {t.team for t in st.teams} == {"", "nlp", "vision"}
    for t in st.teams:
        row = exported[t.team]
        assert (t.totals.cost, t.totals.credit, t.totals.net, t.totals.idle) == (
            cents(row["cost"]), cents(row["credit"]), cents(row["net"]),
            cents(row["idle_cost"])), t.team
        assert t.totals.runs == int(row["runs"])
        assert sum(d.net for d in t.by_day) == t.totals.net
        assert sum(p.net for p in t.by_project) == t.totals.net
        assert sum(g.net for g in t.by_gpu_type) == t.totals.net
    vision = st.team("vision")
    assert vision.totals.cost == 3462  # 10.00 + 10.01 + 0.50 + 3.33 + 2.00 + 1.01 + 7.77
    nlp = st.team("nlp")
    assert (nlp.totals.cost, nlp.totals.credit) == (5100, 600)  # run 6 half, run 3 whole
    assert nlp.credits_by_reason == {"admin": 500, "node_failure": 100}


def test_days_of_the_chart_match_the_daily_exports(store: Store, tmp_path: Path) -> None:
    st = stmt.build_statement(store, make_policy(), NOV)
    vision = st.team("vision")
    for day in (date(2026, 11, 24), date(2026, 11, 25), date(2026, 11, 26)):
        exported = by_team_export(store, tmp_path, day_period(day))
        line = vision.by_day[day.day - 1]
        assert line.name == day.isoformat()
        assert line.net == cents(exported["vision"]["net"]), day
    assert vision.by_day[0].net == 0  # nothing of vision's on the 1st


def test_budget_use_and_approvals(store: Store) -> None:
    st = stmt.build_statement(store, make_policy(), NOV, team="vision")
    assert [t.team for t in st.teams] == ["vision"]
    vision = st.teams[0]
    assert (vision.budget, vision.budget_period) == (50.0, "2026-11")
    # the ledger counts runs by end time: run 8 ended on the 25th, run 2 on the 26th
    assert vision.budget_used == pytest.approx(10 + 10.01 + 0.5 + 3.33 + 2 + 1.005 + 7.77)
    (approval,) = vision.approvals
    assert (approval.uses, approval.amount, approval.unit, approval.reason) == (
        2, 15.0, "money", "deadline push")
    with pytest.raises(ValueError, match="unknown team 'nope'"):
        stmt.build_statement(store, make_policy(), NOV, team="nope")
    with pytest.raises(ValueError, match="monthly"):
        stmt.build_statement(store, make_policy(), day_period(date(2026, 11, 25)))


def test_text_statement_says_the_mode(store: Store) -> None:
    text = stmt.render_text(stmt.build_statement(store, make_policy("showback"), NOV))
    assert "mode: showback" in text and "nothing is charged" in text
    assert "Team vision  (cost centre CC1001)" in text
    assert "budget 2026-11: $50.00; used $34.6" in text
    assert "net $34.62" in text
    assert "approval" in text and "used 2x, $15.00 (deadline push)" in text
    assert "Team (no team)" in text
    text = stmt.render_text(stmt.build_statement(store, make_policy(), NOV))
    assert "chargeback: these amounts are charged" in text


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_page_is_self_contained_with_svg_charts(store: Store, tmp_path: Path) -> None:
    add_run(store, 50, "2026-11-03 10:00", "2026-11-03 11:00", 1.0,
            project="<script>alert(1)</script>")
    page = stmt.render_html(stmt.build_statement(store, make_policy("showback"), NOV))
    parser = _Page()
    parser.feed(page)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "img" not in parser.tags and "iframe" not in parser.tags
    for name, value in parser.attrs:
        assert name not in ("src", "href"), (name, value)
    for needle in ("http://", "https://", "@import", "url("):
        assert needle not in page
    assert parser.tags.count("svg") == 3 * 3 + 1  # day, project, utilisation; vision's gauge
    text = "".join(parser.text)
    assert "Team vision" in text and "$34.62" in text and "showback" in text
    assert "<script>alert(1)</script>" in text  # shown as text, escaped in the markup
    assert "&lt;script&gt;" in page


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason="needs Debian's chromium package (make test installs it)")
def test_html_statement_renders_in_headless_chromium(store: Store, tmp_path: Path) -> None:
    page = tmp_path / "statement.html"
    page.write_text(stmt.render_html(stmt.build_statement(store, make_policy(), NOV)))
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert dom.count("<svg") == 10
    assert "<rect" in dom and "Team vision" in dom and "$34.62" in dom
    assert "$51.00" in dom  # nlp's cost in November


def test_report_command_prints_and_writes_html(store: Store, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from slurm_plugin.cli import main

    policy = tmp_path / "policy.toml"
    policy.write_text(f'[daemon]\ndatabase = "{store.path}"\n[teams.vision]\n'
                      'accounts = ["vision"]\nbudget = 50.0\n[teams.nlp]\naccounts = ["nlp"]\n'
                      '[budgets]\nmode = "showback"\n')
    store.close()
    html_file = tmp_path / "report" / "nov.html"
    assert main(["--config", str(policy), "report", "--month", "2026-11", "--team", "vision",
                 "--html", str(html_file)]) == 0
    said = capsys.readouterr().out
    assert "Team vision" in said and "Team nlp" not in said and "showback" in said
    assert f"wrote {html_file}" in said
    assert html_file.read_text().count("<svg") == 4
    assert main(["--config", str(policy), "report", "--month", "2026-11", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "showback"
    assert {t["team"] for t in data["teams"]} == {None, "nlp", "vision"}
    with pytest.raises(SystemExit, match="unknown team"):
        main(["--config", str(policy), "report", "--month", "2026-11", "--team", "nope"])


def test_statement_of_an_empty_month_has_every_team(ledger_target: str) -> None:
    store = open_store(ledger_target)
    st = stmt.build_statement(store, make_policy(), month_period(2027, 2))
    assert [t.team for t in st.teams] == ["nlp", "vision"]
    assert all(len(t.by_day) == 28 and t.totals.net == 0 for t in st.teams)
    assert stmt.render_html(st).count("<svg") == 2 * 3 + 1  # renders with no data at all


def test_sqlite_and_postgresql_ledgers_give_the_same_statement(tmp_path: Path,
                                                              pg_url: str) -> None:
    """Same runs, two servers: the statement's HTML page, text and JSON are identical (there
    is no generated-at time in them; "data as of" is the runs' last change, the same in
    both), and so is a single team's. Only the approval's id differs: it is random."""
    made: dict[str, list[str]] = {}
    for target in (str(tmp_path / "twin.db"), pg_url):
        s = statement_store(target)
        add_run(s, 50, "2026-11-03 10:00", "2026-11-04 11:30", 12.34, project="détection",
                gpu_type="h100", util_mean=62.5, cost_idle=1.5)
        add_progress(s, 1, 12, 34_000, epoch_base=2)
        add_progress(s, 11, None, 7)
        (aid,) = [a["id"] for a in s._query("SELECT id FROM approvals")]  # random: made alike
        for team in (None, "vision"):
            for mode in ("chargeback", "showback"):
                st = stmt.build_statement(s, make_policy(mode), NOV, team=team,
                                          efficiency_by=("user",))
                made.setdefault(target, []).extend(
                    text.replace(aid, "<approval id>") for text in (
                        stmt.render_html(st), stmt.render_text(st),
                        json.dumps(stmt.statement_json(st), sort_keys=True)))
        s.close()
    sqlite_out, pg_out = made.values()
    assert len(sqlite_out) == len(pg_out) == 12
    for a, b in zip(sqlite_out, pg_out, strict=True):
        assert a == b
    assert "Team vision" in sqlite_out[0] and "data as of" in sqlite_out[0]
