"""Monthly statements per team: spend against budget, by project and GPU type, idle cost,
credits and approvals used, as terminal text and as one self-contained HTML page.

The money is the chargeback's: runs split by wall time at day and month edges, whole cents
per piece, exactly like ``db.chargeback.export`` (the same functions, ``policies.money``), so a
team's statement for a month equals its row in that month's ``by_team`` export to the cent, and
the days of the "spend by day" chart add up to the month.

"Budget used" is the budget ledger's figure instead: what ``slurmgate quota`` and the
submit-time decisions counted (runs by END time, net of credits) from the start of the
budget period through the end of the month. Near month edges the two can differ by the part
of a run on the other side of the edge; the statement says so.

The efficiency section (GPU efficiency, idle cost, cost per run, experiments per 1k, cost per
epoch or step: db.efficiency, policies.efficiency) counts the runs that ENDED in the month,
whole, since its figures are ratios, not amounts to split; per team, by project, by user and
by the experiment tag (``[reports] experiment_tag``), plus any ``group_by`` asked for.

The HTML page has no scripts, fonts, images or links to fetch: inline CSS and inline SVG
only, so it opens the same from a mail attachment, a file share or offline.

A ledger may hold several clusters' runs. A statement covers every cluster's (and names
them) or, with ``cluster``, one cluster's runs, approvals and efficiency. Budget use follows
``[budgets] scope``: with global budgets it is the team's use across every cluster (the
one budget there is, whatever the statement covers); with a budget per cluster it is that
cluster's use, and a statement of several clusters shows each cluster's use against its own
budget (``TeamStatement.budget_by_cluster``).

The ledger may be SQLite or PostgreSQL (db/backend.py): the SQL is the dialect both share,
and on PostgreSQL the statement reads one snapshot (``db.chargeback.export.one_snapshot``),
so the same runs give the same statement, to the byte, on either.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from db.chargeback.periods import DAY, Period, iso_utc
from policies.money import fractions, money, split, to_cents, to_micro

if TYPE_CHECKING:
    from db.store import Store
    from policies.config import Policy

NO_TEAM = ""


@dataclass
class Line:
    """Sums of run pieces: cents for money, millionths for GPU-hours."""

    name: str
    runs: int = 0
    gpu_hours_micro: int = 0
    cost: int = 0
    credit: int = 0
    idle: int = 0
    cost_gpu: int = 0
    util_num: int = 0
    """sum of GPU-hours (micro) x utilisation percent over pieces with a measured util."""
    util_den: int = 0

    @property
    def net(self) -> int:
        return self.cost - self.credit

    @property
    def gpu_hours(self) -> float:
        return self.gpu_hours_micro / 1e6

    @property
    def utilisation(self) -> float | None:
        return self.util_num / self.util_den if self.util_den else None

    def add(self, runs: int, gh: int, cost: int, credit: int, idle: int, cost_gpu: int,
            util: float | None) -> None:
        self.runs += runs
        self.gpu_hours_micro += gh
        self.cost += cost
        self.credit += credit
        self.idle += idle
        self.cost_gpu += cost_gpu
        if util is not None and gh > 0:
            self.util_num += round(gh * util)
            self.util_den += gh


@dataclass
class ApprovalUse:
    approval_id: str
    uses: int
    amount: float
    unit: str
    """"money" or "gpu_hours"."""
    reason: str


@dataclass
class TeamStatement:
    team: str
    cost_center: str
    budget: float
    budget_period: str
    budget_used: float
    totals: Line
    by_project: list[Line]
    by_gpu_type: list[Line]
    by_day: list[Line]
    """One per day of the month, name = ISO date."""
    credits_by_reason: dict[str, int]
    approvals: list[ApprovalUse] = field(default_factory=list)
    efficiency: dict[str, Any] = field(default_factory=dict)
    budget_by_cluster: dict[str, float] = field(default_factory=dict)
    """With a budget per cluster and a statement of several clusters: each cluster's use of
    its own budget (``budget`` each); ``budget_used`` is then their sum. Empty otherwise."""
    """``totals`` (one db.efficiency row) and ``by`` {grouping: rows}: by project, user, the
    experiment tag and what the report asked for."""

    @property
    def label(self) -> str:
        return self.team or "(no team)"


@dataclass
class Statement:
    month: Period
    mode: str
    currency: str
    budget_period_kind: str
    teams: list[TeamStatement]
    data_as_of: str | None
    cluster: str | None = None
    """The cluster the statement is limited to (None: every cluster on the ledger)."""
    clusters: list[str] = field(default_factory=list)
    """The clusters it covers: ``cluster``, or those whose runs are in the month."""
    budget_scope: str = "cluster"
    """``[budgets] scope``: "cluster" (a budget per cluster) or "global"."""

    @property
    def covers(self) -> str:
        """Which clusters, in words: "cluster c1", "all clusters (c1, c2)"."""
        if self.cluster is not None:
            return f"cluster {self.cluster}"
        return "all clusters" + (f" ({', '.join(self.clusters)})" if self.clusters else "")

    def team(self, name: str) -> TeamStatement:
        return next(t for t in self.teams if t.team == name)


# -- building --------------------------------------------------------------------------------

_SELECT = (
    "SELECT coalesce(team, ''), coalesce(project, ''), coalesce(gpu_type, ''), start_ts, "
    "end_ts, cost, cost_idle, credit, coalesce(credit_reason, ''), gpu_seconds, util_mean, "
    "cost_gpu, updated_at, cluster FROM runs WHERE "
    "cost IS NOT NULL AND end_ts >= :a "
    "AND CASE WHEN start_ts < end_ts THEN start_ts ELSE end_ts END < :b "
    "AND (end_ts > :a OR coalesce(start_ts, end_ts) >= end_ts)"
)
"""Settled runs whose wall time overlaps the month [:a, :b): the export's scope
(db.chargeback.export._SCOPE; the CASE is min(coalesce(start_ts, end_ts), end_ts)); one
cluster's with `` AND cluster = :cluster``."""


def _number(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _day_pieces(start: float, end: float, a: float, b: float
                ) -> Iterable[tuple[int, float, float]]:
    """(day index in the month, f_lo, f_hi) for each UTC day of the month the run touches."""
    if end <= start:
        yield int((end - a) // DAY), 0.0, 1.0
        return
    first = int((max(start, a) - a) // DAY)
    last = max(first, math.ceil((min(end, b) - a) / DAY) - 1)
    for d in range(first, last + 1):
        lo, hi = a + d * DAY, a + (d + 1) * DAY
        f_lo, f_hi = fractions(start, end, lo, hi)
        if f_hi > f_lo or (f_lo, f_hi) == (0.0, 1.0):
            yield d, f_lo, f_hi


def build_statement(store: Store, policy: Policy, month: Period, *,
                    team: str | None = None,
                    efficiency_by: Iterable[str] = (),
                    cluster: str | None = None) -> Statement:
    """The statement of ``month`` for every team with policy or usage (or just ``team``);
    ``efficiency_by`` adds groupings (``user``, ``tag:<key>``, ...) to the efficiency
    section; ``cluster``: that cluster's runs only (None: every cluster's)."""
    from db.chargeback.export import _lenient_text, _NeedsLenientText, one_snapshot

    if month.kind != "month":
        raise ValueError("statements are monthly: give a month like 2026-10")
    try:
        with one_snapshot(store.conn):
            return _build(store, policy, month, team, efficiency_by, cluster)
    except _NeedsLenientText:  # text that is not UTF-8 (SQLite): shown with "\ufffd", as the
        _lenient_text(store.conn)  # exports write it
        with one_snapshot(store.conn):
            return _build(store, policy, month, team, efficiency_by, cluster)


def _budget_use(store: Store, policy: Policy, start: float, end: float,
                cluster: str | None) -> tuple[dict[str, float], dict[str, dict[str, float]],
                                              list[str]]:
    """What the budget ledger counted from ``start`` to ``end``: net per team ('' for none)
    against the budget there is; and, with a budget per cluster, no ``cluster`` and more than
    one cluster's runs on the ledger, each cluster's net per team and those clusters ({} and
    [] otherwise)."""
    from db.reports import quota_rows, usage_rows

    if policy.budgets.scope == "global":  # one budget across every cluster
        return {r["team"] or NO_TEAM: r["net"] for r in quota_rows(store, start, end)}, {}, []
    if cluster is not None:
        return {r["team"] or NO_TEAM: r["net"]
                for r in quota_rows(store, start, end, cluster=cluster)}, {}, []
    per: dict[str, dict[str, float]] = {}
    for r in usage_rows(store, start, end, ("cluster", "team")):
        per.setdefault(r["team"], {})[r["cluster"]] = r["cost"] - r["credit"]
    used = {t: sum(by.values()) for t, by in per.items()}
    clusters = sorted({c for by in per.values() for c in by})
    if len(clusters) <= 1:  # one cluster's budget: quota_rows' figure
        return used, {}, []
    return used, per, clusters


def _build(store: Store, policy: Policy, month: Period, team: str | None,
           efficiency_by: Iterable[str], cluster: str | None = None) -> Statement:
    from db.chargeback.export import read_batches
    from db.reports import unknown_cluster_message
    from policies.ledger import period_bounds

    if cluster is not None:
        unknown = unknown_cluster_message(store, cluster)
        if unknown is not None:
            raise ValueError(unknown)
    if team is not None and team not in policy.teams and not store._query(
            "SELECT 1 FROM runs WHERE coalesce(team, '') = :team LIMIT 1", {"team": team}):
        raise ValueError(f"unknown team {team!r}; teams: {', '.join(sorted(policy.teams))}")
    a, b = float(month.start_ts), float(month.end_ts)
    ndays = round((b - a) / DAY)
    totals: dict[str, Line] = {}
    projects: dict[tuple[str, str], Line] = {}
    gpu_types: dict[tuple[str, str], Line] = {}
    days: dict[str, list[Line]] = {}
    credits: dict[str, dict[str, int]] = {}
    seen_clusters: set[str] = set()
    last_change: float | None = None

    def lines_for(t: str) -> tuple[Line, list[Line]]:
        if t not in totals:
            totals[t] = Line(t)
            days[t] = [Line(datetime.fromtimestamp(a + d * DAY, UTC).date().isoformat())
                       for d in range(ndays)]
            credits[t] = {}
        return totals[t], days[t]

    params: dict[str, Any] = {"a": month.start_ts, "b": month.end_ts}
    sql = _SELECT
    if cluster is not None:
        sql += " AND cluster = :cluster"
        params["cluster"] = cluster
    for rows in read_batches(store.conn, sql, params, 5000):
        for (t, project, gpu_type, start, end, cost, idle, credit, reason, gpu_seconds, util,
             cost_gpu, updated, run_cluster) in rows:
            if team is not None and t != team:
                continue
            seen_clusters.add(str(run_cluster))
            end = _number(end)
            if end is None:
                continue
            start = _number(start)
            if start is None or start > end:
                start = end
            util = _number(util)
            if updated is not None and (last_change is None or updated > last_change):
                last_change = updated
            whole = (to_cents(_number(cost)), to_cents(_number(credit)),
                     to_cents(_number(idle)), to_cents(_number(cost_gpu)),
                     to_micro(_number(gpu_seconds), 3600.0))
            tot, by_day = lines_for(t)
            proj = projects.setdefault((t, project), Line(project))
            gt = gpu_types.setdefault((t, gpu_type), Line(gpu_type))
            counted = False
            for d, f_lo, f_hi in _day_pieces(start, end, a, b):
                if (f_lo, f_hi) == (0.0, 1.0):
                    c, cr, i, cg, gh = whole
                else:
                    c, cr, i, cg, gh = (split(v, f_lo, f_hi) for v in whole)
                runs = 0 if counted else 1
                counted = True
                for line in (tot, proj, gt, by_day[d]):
                    line.add(runs, gh, c, cr, i, cg, util)
                if cr:
                    key = reason or "unspecified"
                    credits[t][key] = credits[t].get(key, 0) + cr

    names = sorted(set(totals) | ({team} if team is not None else set(policy.teams)),
                   key=lambda n: (n == NO_TEAM, n))  # "(no team)" last
    bp_start, bp_end, bp_label = period_bounds(policy.budgets.period, a)
    used, used_by_cluster, budget_clusters = _budget_use(store, policy, bp_start,
                                                         min(bp_end, b), cluster)
    approvals = _approvals_used(store, a, b, cluster)
    teams = []
    for name in names:
        tot, by_day = lines_for(name)
        cfg = policy.teams.get(name)
        teams.append(TeamStatement(
            team=name,
            cost_center=cfg.cost_center if cfg else "",
            budget=cfg.budget if cfg else 0.0,
            budget_period=bp_label,
            budget_used=float(used.get(name, 0.0)),
            totals=tot,
            by_project=sorted((v for (tn, _), v in projects.items() if tn == name),
                              key=lambda line: (-line.net, line.name)),
            by_gpu_type=sorted((v for (tn, _), v in gpu_types.items() if tn == name),
                               key=lambda line: (-line.net, line.name)),
            by_day=by_day,
            credits_by_reason=dict(sorted(credits[name].items())),
            approvals=approvals.get(name, []),
            efficiency=_efficiency(store, policy, a, b, name, efficiency_by, cluster),
            budget_by_cluster={c: used_by_cluster.get(name, {}).get(c, 0.0)
                               for c in budget_clusters},
        ))
    return Statement(month, policy.budgets.mode, policy.rates.currency, policy.budgets.period,
                     teams, iso_utc(last_change) if last_change is not None else None,
                     cluster=cluster,
                     clusters=[cluster] if cluster is not None else sorted(seen_clusters),
                     budget_scope=policy.budgets.scope)


def efficiency_groupings(policy: Policy, extra: Iterable[str] = ()) -> list[str]:
    """The efficiency tables of a team's statement: project, user, the experiment tag, then
    ``extra`` (each once)."""
    tag = policy.reports.experiment_tag
    return list(dict.fromkeys(["project", "user", *([f"tag:{tag}"] if tag else []), *extra]))


def _efficiency(store: Store, policy: Policy, a: float, b: float, team: str,
                extra: Iterable[str], cluster: str | None = None) -> dict[str, Any]:
    """db.efficiency.efficiency of the team's runs (of ``cluster`` when given), whole and by
    each grouping: the runs are read once and grouped in Python for every table."""
    from db.efficiency import _check_group, efficiency_runs
    from policies.efficiency import group_figures

    tag = policy.reports.experiment_tag
    groupings = [_check_group((g,))[0] for g in efficiency_groupings(policy, extra)]
    # runs without a team are stored with team NULL; efficiency_runs() matches team = ?
    runs = efficiency_runs(store, a, b, team=team) if team else []
    if cluster is not None:  # (db.efficiency reads every cluster's runs)
        runs = [r for r in runs if r["cluster"] == cluster]
    rows = group_figures(runs, (), experiment_tag=tag) if runs else []
    out: dict[str, Any] = {"totals": rows[0] if rows else None, "by": {}}
    if rows:
        for g in groupings:
            out["by"][g] = group_figures(runs, (g,), experiment_tag=tag)
    return out


def _approvals_used(store: Store, a: float, b: float,
                    cluster: str | None = None) -> dict[str, list[ApprovalUse]]:
    info = {r["id"]: r for r in store._query("SELECT id, amount, gpu_hours, reason FROM approvals")}
    uses: dict[tuple[str, str], list[float]] = {}
    where, params = "", {"a": a, "b": b, "cluster": cluster}
    if cluster is not None:
        where = " AND cluster = :cluster"
    for row in store._query("SELECT team, detail FROM events WHERE kind = 'approval_use' "
                            f"AND ts >= :a AND ts < :b{where} ORDER BY ts, id", params):
        try:
            detail = json.loads(row["detail"] or "{}")
        except ValueError:
            detail = {}
        if not isinstance(detail, dict):
            detail = {}
        aid = str(detail.get("approval_id") or "?")
        amount = _number(detail.get("amount")) or 0.0
        uses.setdefault((row["team"] or NO_TEAM, aid), []).append(amount)
    out: dict[str, list[ApprovalUse]] = {}
    for (t, aid), amounts in sorted(uses.items()):
        a_info = info.get(aid, {})
        unit = "gpu_hours" if a_info and a_info.get("amount") is None else "money"
        out.setdefault(t, []).append(ApprovalUse(aid, len(amounts), sum(amounts), unit,
                                                 str(a_info.get("reason") or "")))
    return out


# -- text ------------------------------------------------------------------------------------


def _fmt(cents: int, currency: str) -> str:
    from policies.cost import format_money

    return format_money(cents / 100, currency)


def _pct(part: float, whole: float) -> str:
    return f"{part / whole * 100:.1f}%" if whole else "-"


def mode_sentence(mode: str) -> str:
    if mode == "showback":
        return ("showback: amounts are shown for information; budgets are not enforced and "
                "nothing is charged")
    return "chargeback: these amounts are charged to the teams' cost centres"


def render_text(st: Statement) -> str:
    cur = st.currency
    out = [f"slurmgate statement {st.month.label}: {month_name(st.month)} (UTC)",
           f"mode: {mode_sentence(st.mode)}", f"covers: {st.covers}"]
    for t in st.teams:
        tot = t.totals
        out.append("")
        out.append(f"Team {t.label}" + (f"  (cost centre {t.cost_center})" if t.cost_center
                                        else ""))
        if t.budget and t.budget_by_cluster:
            out.append(f"  budget {t.budget_period}: {_fmt(round(t.budget * 100), cur)} on each "
                       "cluster; used " + ", ".join(
                           f"{c} {_fmt(round(u * 100), cur)} ({_pct(u, t.budget)})"
                           for c, u in t.budget_by_cluster.items()))
        elif t.budget:
            left = round((t.budget - t.budget_used) * 100)
            rest = (f"remaining {_fmt(left, cur)}" if left >= 0
                    else f"over budget by {_fmt(-left, cur)}")
            out.append(f"  budget {t.budget_period}{_budget_where(st)}: "
                       f"{_fmt(round(t.budget * 100), cur)}; used "
                       f"{_fmt(round(t.budget_used * 100), cur)} "
                       f"({_pct(t.budget_used, t.budget)}); {rest}")
        else:
            out.append(f"  budget {t.budget_period}: none set")
        out.append(f"  this month: {tot.runs:,} runs, {tot.gpu_hours:,.1f} GPU-hours, cost "
                   f"{_fmt(tot.cost, cur)}, credits {_fmt(tot.credit, cur)}, net "
                   f"{_fmt(tot.net, cur)}")
        util = tot.utilisation
        out.append(f"  idle GPU cost: {_fmt(tot.idle, cur)} ({_pct(tot.idle, tot.cost_gpu)} of "
                   f"GPU cost); mean GPU utilisation "
                   f"{'-' if util is None else f'{util:.1f}%'}")
        for title, lines in (("by project", t.by_project), ("by GPU type", t.by_gpu_type)):
            if lines:
                out.append(f"  {title}:")
                for line in lines:
                    runs = "run " if line.runs == 1 else "runs"
                    out.append(f"    {line.name or '(none)':<24}{line.runs:>8,} {runs}"
                               f"{line.gpu_hours:>12,.1f} GPU-h{_fmt(line.net, cur):>16}")
        if t.credits_by_reason:
            out.append("  credits: " + ", ".join(f"{k} {_fmt(v, cur)}"
                                                  for k, v in t.credits_by_reason.items()))
        for a in t.approvals:
            amount = (_fmt(round(a.amount * 100), cur) if a.unit == "money"
                      else f"{a.amount:,.1f} GPU-hours")
            out.append(f"  approval {a.approval_id} used {a.uses}x, {amount}"
                       + (f" ({a.reason})" if a.reason else ""))
        out.extend(_efficiency_text(t, cur))
    out.append("")
    out.append(_METHOD_NOTE)
    return "\n".join(out) + "\n"


def _budget_where(st: Statement) -> str:
    """Whose budget use the budget line shows, where the statement's runs do not say it:
    a global budget on a statement of one cluster counts every cluster's runs."""
    if st.budget_scope == "global" and st.cluster is not None:
        return " (one budget across every cluster)"
    return ""


def _money_or_dash(amount: float | None, cur: str) -> str:
    return "-" if amount is None else _fmt(round(amount * 100), cur)


def _eff_pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def thousand(cur: str) -> str:
    """What "experiments per 1k" counts per: "$1k", or "1k EUR" for a currency code."""
    return f"1k {cur}" if len(cur) > 1 and cur.isalpha() else f"{cur}1k"


def _per_1k(value: float | None, cur: str) -> str:
    return "-" if value is None else f"{value:,.2f} per {thousand(cur)}"


def efficiency_cells(row: dict[str, Any], cur: str) -> list[str]:
    """runs, GPU efficiency, idle cost, cost per run, experiments (per 1k), cost per epoch,
    cost per step: one table row of the efficiency section."""
    exps = f"{row['experiments']}" + (f" ({_per_1k(row['experiments_per_1k'], cur)})"
                                      if row["experiments"] else "")
    return [f"{row['runs']:,}", _eff_pct(row["gpu_efficiency"]),
            _money_or_dash(row["idle_cost"], cur), _money_or_dash(row["cost_per_run"], cur),
            exps, _money_or_dash(row["cost_per_epoch"], cur),
            _money_or_dash(row["cost_per_step"], cur)]


EFFICIENCY_HEADERS = ["runs", "GPU efficiency", "idle cost", "cost per run", "experiments",
                      "cost per epoch", "cost per step"]


def _group_name(grouping: str, row: dict[str, Any]) -> str:
    value = row.get(grouping)
    return "(none)" if value in (None, "") else str(value)


def _efficiency_text(t: TeamStatement, cur: str) -> list[str]:
    tot = t.efficiency.get("totals")
    if not tot:
        return []
    measured = tot["measured_gpu_hours"]
    out = [f"  efficiency (runs that ended this month): GPU efficiency "
           f"{_eff_pct(tot['gpu_efficiency'])} of {measured:,.1f} measured GPU-hours; cost per "
           f"run {_money_or_dash(tot['cost_per_run'], cur)}; experiments "
           f"{tot['experiments']}"
           + (f" ({_per_1k(tot['experiments_per_1k'], cur)})" if tot["experiments"] else "")
           + (f"; cost per epoch {_money_or_dash(tot['cost_per_epoch'], cur)}"
              if tot["cost_per_epoch"] is not None else "")
           + (f"; cost per step {_money_or_dash(tot['cost_per_step'], cur)}"
              if tot["cost_per_step"] is not None else "")]
    for grouping, rows in t.efficiency.get("by", {}).items():
        if not rows:
            continue
        out.append(f"  efficiency by {grouping.removeprefix('tag:')}:")
        out.append(f"    {'name':<20}" + "".join(f"{h:>15}" for h in EFFICIENCY_HEADERS))
        for row in rows:
            out.append(f"    {_group_name(grouping, row)[:19]:<20}"
                       + "".join(f"{c:>15}" for c in efficiency_cells(row, cur)))
    return out


_METHOD_NOTE = (
    "Amounts split runs that cross midnight or the month's edges by wall time, like the "
    "exports; budget use follows the budget ledger, which counts a run when it ends."
)


# -- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2733;
background:#f4f6f8;margin:0;padding:24px}
main{max-width:980px;margin:0 auto}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:0 0 8px}
h3{font-size:14px;margin:18px 0 6px;color:#3d4b5c;text-transform:uppercase;letter-spacing:.04em}
.sub{color:#5b6776;margin:0 0 16px}
.mode{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600;font-size:12px}
.mode.chargeback{background:#fde8d7;color:#8a3b00}.mode.showback{background:#dcecff;color:#0b4a8b}
section.team{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:18px 20px;
margin:0 0 20px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0}
.card{flex:1 1 105px;border:1px solid #e4e9ef;border-radius:6px;padding:8px 10px}
.card b{display:block;font-size:18px}.card span{color:#5b6776;font-size:12px}
table{border-collapse:collapse;width:100%;margin:4px 0 8px}
th,td{padding:4px 8px;border-bottom:1px solid #eef1f4;text-align:right}
th:first-child,td:first-child{text-align:left}th{color:#5b6776;font-weight:600}
svg{display:block;max-width:100%;height:auto}
svg text{font:11px sans-serif;fill:#3d4b5c}
.note{color:#5b6776;font-size:12px;margin-top:16px}
"""

_COLORS = ["#2f6fb0", "#e07b28", "#3a9a5b", "#b5485d", "#7c5cb8", "#8c8c3a", "#2a9ca0",
           "#c46fb0"]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>'
            + "".join(body) + "</svg>")


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def svg_day_bars(values: list[float], labels: list[str], title: str, fmt: Any,
                 color: str = "#2f6fb0", max_value: float | None = None) -> str:
    """Vertical bars, one per day, with the top of the scale and every 5th day labelled."""
    width, height, left, bottom, top = 760, 220, 64, 28, 14
    n = max(len(values), 1)
    top_value = max_value if max_value is not None else _nice_max(max(values, default=0.0))
    plot_w, plot_h = width - left - 10, height - bottom - top
    bar_w = plot_w / n
    body = [f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" '
            'stroke="#9aa5b1"/>']
    for frac in (0.5, 1.0):
        y = top + plot_h * (1 - frac)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
                    'stroke="#e4e9ef"/>')
        body.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                    f'{_e(fmt(top_value * frac))}</text>')
    for i, (v, label) in enumerate(zip(values, labels, strict=True)):
        h = 0.0 if top_value <= 0 else max(0.0, min(v, top_value)) / top_value * plot_h
        x = left + i * bar_w
        body.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" '
                    f'width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}" fill="{color}">'
                    f'<title>{_e(label)}: {_e(fmt(v))}</title></rect>')
        if i % 5 == 0 or i == n - 1:
            body.append(f'<text x="{x + bar_w / 2:.1f}" y="{height - 10}" '
                        f'text-anchor="middle">{_e(label[-5:])}</text>')
    return _svg(width, height, body, title)


def svg_hbars(items: list[tuple[str, float]], title: str, fmt: Any) -> str:
    """Horizontal bars, one per item (largest first), with the value at the bar's end."""
    items = items[:12] or [("(nothing)", 0.0)]
    row_h, left, width = 24, 170, 760
    height = row_h * len(items) + 10
    top_value = _nice_max(max((v for _, v in items), default=0.0))
    plot_w = width - left - 110
    body = []
    for i, (name, v) in enumerate(items):
        y = 5 + i * row_h
        w = 0.0 if top_value <= 0 else max(0.0, v) / top_value * plot_w
        label = name if len(name) <= 26 else name[:25] + "…"
        body.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{_e(label)}</text>')
        body.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
                    f'fill="{_COLORS[i % len(_COLORS)]}"><title>{_e(name)}: {_e(fmt(v))}'
                    '</title></rect>')
        body.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{_e(fmt(v))}</text>')
    return _svg(width, height, body, title)


def svg_budget_gauge(used: float, budget: float, fmt: Any) -> str:
    width, height = 760, 46
    frac = used / budget if budget else 0.0
    color = "#3a9a5b" if frac < 0.8 else "#e07b28" if frac < 1.0 else "#c0392b"
    w = min(max(frac, 0.0), 1.0) * (width - 20)
    body = [f'<rect x="10" y="8" width="{width - 20}" height="16" rx="4" fill="#e4e9ef"/>',
            f'<rect x="10" y="8" width="{w:.1f}" height="16" rx="4" fill="{color}"/>',
            f'<text x="10" y="40">{_e(fmt(used))} of {_e(fmt(budget))} '
            f'({frac * 100:.1f}%)</text>']
    return _svg(width, height, body, f"budget used: {frac * 100:.1f}%")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _team_html(t: TeamStatement, st: Statement) -> str:
    cur = st.currency

    def m(cents: int) -> str:
        return _fmt(cents, cur)

    def m_float(amount: float) -> str:
        return _fmt(round(amount * 100), cur)

    tot = t.totals
    util = tot.utilisation
    cards = [
        (m(tot.net), "net charge" if st.mode == "chargeback" else "net (showback)"),
        (m(tot.cost), "cost"), (m(tot.credit), "credits"),
        (m(tot.idle), f"idle GPU cost ({_pct(tot.idle, tot.cost_gpu)} of GPU cost)"),
        (f"{tot.gpu_hours:,.1f}", "GPU-hours"), (f"{tot.runs:,}", "runs"),
        ("-" if util is None else f"{util:.1f}%", "mean GPU utilisation"),
    ]
    parts = [f'<section class="team" id="team-{_e(t.team or "none")}">',
             f"<h2>Team {_e(t.label)}</h2>"]
    if t.cost_center:
        parts.append(f'<p class="sub">cost centre {_e(t.cost_center)}</p>')
    parts.append('<div class="cards">' + "".join(
        f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in cards)
        + "</div>")
    parts.append(f"<h3>Budget {_e(t.budget_period)}{_e(_budget_where(st))}</h3>")
    if t.budget and t.budget_by_cluster:
        for c, u in t.budget_by_cluster.items():
            parts.append(f'<p class="sub">cluster {_e(c)}</p>')
            parts.append(svg_budget_gauge(u, t.budget, m_float))
    elif t.budget:
        parts.append(svg_budget_gauge(t.budget_used, t.budget, m_float))
    else:
        parts.append("<p>No budget is set for this team.</p>")
    labels = [line.name for line in t.by_day]
    parts.append("<h3>Spend by day</h3>")
    parts.append(svg_day_bars([line.net / 100 for line in t.by_day], labels,
                              f"net spend by day, {st.month.label}", m_float))
    parts.append("<h3>Spend by project</h3>")
    parts.append(svg_hbars([(line.name or "(none)", line.net / 100) for line in t.by_project],
                           "net spend by project", m_float))
    parts.append("<h3>GPU utilisation by day</h3>")
    parts.append(svg_day_bars([line.utilisation or 0.0 for line in t.by_day], labels,
                              "mean GPU utilisation by day (GPU-hour weighted)",
                              lambda v: f"{v:.0f}%", color="#3a9a5b", max_value=100.0))
    for title, lines in (("By project", t.by_project), ("By GPU type", t.by_gpu_type)):
        parts.append(f"<h3>{title}</h3>")
        parts.append(_table(["name", "runs", "GPU-hours", "cost", "credits", "idle cost", "net"],
                            [[line.name or "(none)", f"{line.runs:,}",
                              f"{line.gpu_hours:,.1f}", m(line.cost), m(line.credit),
                              m(line.idle), m(line.net)] for line in lines]))
    if t.credits_by_reason:
        parts.append("<h3>Credits</h3>")
        parts.append(_table(["reason", "amount"], [[k, m(v)] for k, v in
                                                   t.credits_by_reason.items()]))
    parts.extend(_efficiency_html(t, st))
    parts.append("<h3>Approvals used</h3>")
    if t.approvals:
        parts.append(_table(["approval", "uses", "amount", "reason"], [
            [a.approval_id, str(a.uses),
             m_float(a.amount) if a.unit == "money" else f"{a.amount:,.1f} GPU-hours",
             a.reason] for a in t.approvals]))
    else:
        parts.append("<p>None this month.</p>")
    parts.append("</section>")
    return "".join(parts)


def _efficiency_html(t: TeamStatement, st: Statement) -> list[str]:
    cur = st.currency
    parts = ["<h3>Efficiency</h3>"]
    tot = t.efficiency.get("totals")
    if not tot:
        return [*parts, "<p>No runs ended this month.</p>"]
    cards = [
        (_eff_pct(tot["gpu_efficiency"]),
         f"GPU efficiency ({tot['measured_gpu_hours']:,.1f} measured GPU-hours)"),
        (_money_or_dash(tot["idle_cost"], cur), "idle GPU cost"),
        (_money_or_dash(tot["cost_per_run"], cur), "cost per run"),
        ("-" if tot["experiments_per_1k"] is None else f"{tot['experiments_per_1k']:,.2f}",
         f"experiments per {thousand(cur)} ({tot['experiments']})"),
        (_money_or_dash(tot["cost_per_epoch"], cur), "cost per epoch"),
        (_money_or_dash(tot["cost_per_step"], cur), "cost per step"),
    ]
    parts.append('<div class="cards">' + "".join(
        f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in cards)
        + "</div>")
    for grouping, rows in t.efficiency.get("by", {}).items():
        if rows:
            parts.append(f"<h3>Efficiency by {_e(grouping.removeprefix('tag:'))}</h3>")
            parts.append(_table(["name", *EFFICIENCY_HEADERS],
                                [[_group_name(grouping, r), *efficiency_cells(r, cur)]
                                 for r in rows]))
    parts.append('<p class="note">Efficiency counts the runs that ended this month. GPU '
                 "efficiency is busy GPU time (utilisation x GPU time) over the GPU time that "
                 "was measured; money figures are net of credits; epochs and steps are what "
                 "jobs reported through the checkpoint helper.</p>")
    return parts


def render_html(st: Statement) -> str:
    title = f"slurmgate statement {st.month.label}"
    teams = "".join(_team_html(t, st) for t in st.teams) or "<p>No teams.</p>"
    asof = f"; data as of {st.data_as_of}" if st.data_as_of else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1>"
        f'<p class="sub">{_e(month_name(st.month))} (UTC days), {_e(st.covers)}{_e(asof)} '
        f'<span class="mode {_e(st.mode)}">{_e(st.mode)}</span></p>'
        f"<p>{_e(mode_sentence(st.mode).capitalize())}.</p>"
        f"{teams}<p class=\"note\">{_e(_METHOD_NOTE)} Currency: {_e(st.currency)}.</p>"
        "</main></body></html>\n"
    )


def month_name(month: Period) -> str:
    return datetime.fromtimestamp(month.start_ts, UTC).strftime("%B %Y")


def statement_json(st: Statement) -> dict[str, Any]:
    """Machine-readable statement (``slurmgate report --json``): money as decimal strings."""
    def line(x: Line) -> dict[str, Any]:
        return {"name": x.name, "runs": x.runs, "gpu_hours": f"{x.gpu_hours:.6f}",
                "cost": money(x.cost), "credit": money(x.credit), "net": money(x.net),
                "idle_cost": money(x.idle),
                "utilisation": None if x.utilisation is None else round(x.utilisation, 1)}

    return {
        "month": st.month.as_dict(), "mode": st.mode, "currency": st.currency,
        "data_as_of": st.data_as_of, "cluster": st.cluster, "clusters": st.clusters,
        "budget_scope": st.budget_scope,
        "teams": [{
            "team": t.team or None, "cost_center": t.cost_center or None,
            "budget": {"period": t.budget_period, "amount": f"{t.budget:.2f}",
                       "used": f"{t.budget_used:.2f}",
                       **({"used_by_cluster": {c: f"{u:.2f}" for c, u in
                                               t.budget_by_cluster.items()}}
                          if t.budget_by_cluster else {})},
            "totals": line(t.totals), "by_project": [line(x) for x in t.by_project],
            "by_gpu_type": [line(x) for x in t.by_gpu_type],
            "by_day": [line(x) for x in t.by_day],
            "credits_by_reason": {k: money(v) for k, v in t.credits_by_reason.items()},
            "approvals_used": [{"approval": a.approval_id, "uses": a.uses,
                                "amount": a.amount, "unit": a.unit, "reason": a.reason}
                               for a in t.approvals],
            "efficiency": t.efficiency,
        } for t in st.teams],
    }
