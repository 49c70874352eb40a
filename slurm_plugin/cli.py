"""The `slurmgate` command.

Imports are lazy per sub-command: `slurmgate hook ...` runs in every Prolog/Epilog and must
start fast, so nothing heavy is imported before we know which command runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from policies import defaults

if TYPE_CHECKING:  # argparse itself is imported only when a command line is parsed
    import argparse

    from policies.config import Policy



def config_path(args: argparse.Namespace) -> str:
    return defaults.policy_path(args.config)


def _policy(args: argparse.Namespace):  # -> Policy (lazy import keeps start-up light)
    from policies.config import PolicyError, load_policy

    try:
        return load_policy(config_path(args))
    except PolicyError as exc:
        raise SystemExit(f"slurmgate: {exc}") from exc


def _call(args: argparse.Namespace, request: dict) -> dict:
    from slurm_plugin.protocol import DaemonUnavailable, call

    socket_path = args.socket or _policy(args).daemon.socket
    try:
        resp = call(socket_path, request)
    except DaemonUnavailable as exc:
        raise SystemExit(f"slurmgate: {exc}") from exc
    if not resp.get("ok"):
        raise SystemExit(f"slurmgate: {resp.get('error', 'request failed')}")
    return resp


def cmd_daemon(args: argparse.Namespace) -> int:
    from slurm_plugin.daemon.server import serve

    return serve(config_path(args))


def cmd_lua(args: argparse.Namespace) -> int:
    import pwd

    from slurm_plugin.daemon.lua_shim import render_lua

    policy = None if args.socket and args.slurm_uid is not None else _policy(args)
    socket_path = args.socket or policy.daemon.socket
    uid = args.slurm_uid
    if uid is None:
        try:
            uid = pwd.getpwnam(policy.daemon.slurm_user).pw_uid
        except KeyError as exc:
            raise SystemExit(f"slurmgate lua: SlurmUser {policy.daemon.slurm_user!r} (from "
                             "[daemon] slurm_user) is not a user here; give --slurm-uid") from exc
    text = render_lua(socket_path, args.timeout_ms, args.fail_mode, uid)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        # slurmctld reloads the script when its mtime changes, compared in whole seconds:
        # a rewrite within the same second as the last one must still look newer.
        try:
            old = int(os.stat(args.output).st_mtime)
            if int(os.stat(tmp).st_mtime) <= old:
                os.utime(tmp, (old + 1, old + 1))
        except FileNotFoundError:
            pass
        os.replace(tmp, args.output)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    resp = _call(args, {"op": "ping"})
    print(json.dumps(resp, indent=2))
    return 0


def cmd_check_policy(args: argparse.Namespace) -> int:
    policy = _policy(args)
    from slurm_plugin.alerts.check import config_problems

    print(f"{config_path(args)}: OK ({len(policy.teams)} teams, "
          f"required tags: {', '.join(policy.tags.required) or 'none'})")
    # the daemon runs with these (alerting without the broken part): warnings unless --strict
    alert_problems = config_problems(policy, connect=args.connect)
    if alert_problems:
        print(f"{len(alert_problems)} problem(s) with [alerts] (the daemon logs them and "
              "alerts without those parts):")
        for field, problem in alert_problems:
            print(f"  - {field}: {problem}")
        return 1 if args.strict else 0
    return 0


def _money(amount: float, currency: str) -> str:
    from policies.cost import format_money

    return format_money(amount, currency)


def cmd_estimate(args: argparse.Namespace) -> int:
    from slurm_plugin.slurm.sbatch_args import SbatchArgsError, job_from_sbatch

    try:
        job = job_from_sbatch(args.sbatch_args)
    except (SbatchArgsError, OSError) as exc:
        raise SystemExit(f"slurmgate estimate: {exc}") from exc
    resp = _call(args, {"op": "estimate", "job": job})
    if args.json:
        print(json.dumps(resp, indent=2))
    else:
        verdict = "would be ACCEPTED" if resp["verdict"] == "accept" else "would be REJECTED"
        print(f"job {verdict} (team {resp.get('team') or '-'})")
        for line in resp["msg"].splitlines():
            print(line.removeprefix("slurmgate: "))
        moved = resp.get("set", {}).get("partition")
        if moved:
            print(f"partition would be set to: {moved}")
    return 0 if resp["verdict"] == "accept" else 1


def cmd_quota(args: argparse.Namespace) -> int:
    req: dict = {"op": "quota"}
    if args.team:
        req["team"] = args.team
    if args.cluster:
        req["cluster"] = args.cluster
    resp = _call(args, req)
    if args.json:
        print(json.dumps(resp, indent=2))
        return 0
    cur = resp["currency"]
    # the daemon's budgets: its cluster's ("cluster" scope) or one across clusters ("global")
    where = (f"cluster {resp['cluster']}" if resp.get("cluster")
             else "all clusters (global budgets)" if resp.get("scope") == "global" else "")
    print(f"budget period {resp['period']} ({resp['mode']})" + (f", {where}" if where else ""))
    header = f"{'team':<14}{'budget':>13}{'spent':>13}{'reserved':>13}{'remaining':>13}" \
             f"{'used':>6}{'fairshare':>10}"
    print(header)
    for r in resp["teams"]:
        used = (r["spent"] + r["reserved"]) / r["budget"] * 100 if r["budget"] else 0.0
        print(f"{r['team']:<14}{_money(r['budget'], cur):>13}{_money(r['spent'], cur):>13}"
              f"{_money(r['reserved'], cur):>13}{_money(r['remaining'], cur):>13}"
              f"{used:>5.0f}%{r['fairshare']:>10.3f}")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    """The per-job report: through the daemon (who may read it is checked there), or for
    admins straight from the database with --db."""
    from slurm_plugin.job_report import JobSpecError, parse_job_spec, render_text

    try:
        job_id, task = parse_job_spec(args.jobid)
    except JobSpecError as exc:
        raise SystemExit(f"slurmgate job: {exc}") from exc
    if args.db is not None:
        report = _job_report_from_db(args, job_id, task)
    else:
        req: dict = {"op": "job", "job_id": job_id}
        if task is not None:
            req["array_task_id"] = task
        if args.cluster:
            req["cluster"] = args.cluster
        report = _call(args, req)["report"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(render_text(report))
    return 0


def _job_report_from_db(args: argparse.Namespace, job_id: int, task: int | None) -> dict:
    import time

    from db.reports import quota_rows
    from db.store import StoreError, open_store
    from policies.ledger import period_bounds
    from slurm_plugin.job_report import build_report, job_spec_text

    policy = _policy(args)
    path = args.db or policy.daemon.ledger()
    try:
        store = open_store(path, readonly=True)
    except StoreError as exc:
        raise SystemExit(f"slurmgate job: {exc}") from exc
    cluster = args.cluster or policy.daemon.cluster
    with store:
        report = build_report(store, policy, cluster, job_id, task)
        if report is None:
            raise SystemExit(f"slurmgate job: job {job_spec_text(job_id, task)}: not found in "
                             f"{path} (cluster {cluster})")
        team = report["job"].get("team")
        if team in policy.teams:
            start, end, label = period_bounds(policy.budgets.period, time.time())
            scope = policy.daemon.cluster if policy.budgets.scope == "cluster" else None
            row = next((r for r in quota_rows(store, start, end, cluster=scope)
                        if r["team"] == team), None)
            spent, reserved = (row["net"], row["reserved"]) if row else (0.0, 0.0)
            budget = policy.teams[team].budget
            report["budget"] = {"team": team, "budget": budget, "spent": round(spent, 6),
                                "reserved": round(reserved, 6),
                                "remaining": round(budget - spent - reserved, 6)}
            report["period"] = label
    return report


def _parse_when(text: str) -> float:
    from datetime import UTC, datetime, timedelta

    t = text.strip()
    units = {"h": 3600, "d": 86400, "w": 7 * 86400}
    if t[:-1].isdigit() and t[-1:] in units:
        return (datetime.now(UTC) + timedelta(seconds=int(t[:-1]) * units[t[-1]])).timestamp()
    try:
        when = datetime.fromisoformat(t)
    except ValueError as exc:
        raise SystemExit(f"slurmgate: --expires {t!r}: use a date like 2026-12-31, "
                         "an ISO time, or a duration like 7d / 48h") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def cmd_approve(args: argparse.Namespace) -> int:
    req = {"op": "approve", "team": args.team, "amount": args.amount,
           "gpu_hours": args.gpu_hours, "expires_at": _parse_when(args.expires),
           "reason": args.reason}
    resp = _call(args, req)
    print(f"approval {resp['id']} created: add approval={resp['id']} to the job's --comment")
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    resp = _call(args, {"op": "approvals", "all": args.all})
    if args.json:
        print(json.dumps(resp, indent=2))
        return 0
    print(f"{'id':<14}{'team':<12}{'granted':>12}{'used':>12}{'remaining':>12}  expires     reason")
    for a in resp["approvals"]:
        unit = "$" if a["amount"] is not None else "GPU-h "
        granted = a["amount"] if a["amount"] is not None else a["gpu_hours"]
        exp = datetime.fromtimestamp(a["expires_at"], UTC).strftime("%Y-%m-%d")
        print(f"{a['id']:<14}{a['team']:<12}{unit}{granted:>10.2f}{a['used']:>12.2f}"
              f"{a['remaining']:>12.2f}  {exp}  {a['reason'] or ''}")
    return 0


def _read_store(args: argparse.Namespace):
    from db.store import StoreError, open_store

    try:
        return open_store(_policy(args).daemon.ledger(), readonly=True)
    except StoreError as exc:
        raise SystemExit(f"slurmgate: {exc}") from exc


def _ts(value: float | None) -> str:
    from datetime import UTC, datetime

    if not value:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M")


def cmd_nodes(args: argparse.Namespace) -> int:
    import time

    from db.interruptions import failure_metrics, node_history

    store = _read_store(args)
    since = time.time() - args.days * 86400
    rows = node_history(store, since)
    metrics = failure_metrics(store, since, time.time())
    if args.json:
        print(json.dumps({"nodes": rows, "metrics": metrics}, indent=2))
        return 0
    print(f"node failures in the last {args.days:g} days")
    print(f"{'node':<12}{'failures':>9}{'per day':>9}  {'last failure':<17}{'drains':>7}"
          "  last drain")
    for r in rows:
        rate = metrics["node_failure_rate_per_day"].get(r["node"], 0.0)
        print(f"{r['node']:<12}{int(r['failures']):>9}{rate:>9.2f}  {_ts(r['last_failure']):<17}"
              f"{int(r['drains']):>7}  {_ts(r['last_drain'])}")
    if not rows:
        print("(no node failures recorded)")
    return 0


def cmd_failures(args: argparse.Namespace) -> int:
    import time

    from db.interruptions import failure_metrics

    store = _read_store(args)
    m = failure_metrics(store, time.time() - args.days * 86400, time.time())
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    mttr = f"{m['mttr_seconds']:.0f} s" if m["mttr_seconds"] is not None else "-"
    rate = m["scavenger_preemption_rate"]
    print(f"last {args.days:g} days: {m['interruptions']} interruptions "
          f"({m['interruptions_per_day']:.2f}/day): {m['node_failures']} node failures, "
          f"{m['preemptions']} preemptions")
    print(f"mean time to recover (failure -> running again): {mttr} over "
          f"{m['recoveries']} recoveries")
    print(f"GPU-hours lost: {m['gpu_hours_lost']:.2f}; credited: {m['gpu_hours_credited']:.2f} "
          f"GPU-hours ({m['money_credited']:.2f})")
    print("scavenger preemption rate: " + (f"{rate:.1%} of {m['scavenger_runs']} runs"
                                           if rate is not None else "-"))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from slurm_plugin.node.agent import run

    return run(config_path(args), args.node, args.interval, args.once)


def cmd_reconcile(args: argparse.Namespace) -> int:
    from slurm_plugin.daemon.reconcile import run

    return run(_policy(args), repair=args.repair, as_json=args.json)


def _this_host_leads(args: argparse.Namespace, policy: Policy) -> bool:
    """With ``--if-leader``: whether this host's daemon leads its cluster's once-only work.
    A SQLite ledger has one daemon, which always leads; on a shared ledger a standby, or a
    daemon that does not answer, leaves the export to the leading host (said on stderr)."""
    from db.backend import is_postgresql
    from slurm_plugin.protocol import DaemonUnavailable, call

    if not is_postgresql(policy.daemon.ledger()):
        return True
    sock = args.socket or policy.daemon.socket
    try:
        leads = bool(call(sock, {"op": "ping"}, timeout=5).get("leader"))
    except (DaemonUnavailable, OSError, ValueError) as exc:
        print(f"slurmgate export: this host's daemon does not answer ({exc}); the leading "
              "controller exports", file=sys.stderr)
        return False
    if not leads:
        print("slurmgate export: another controller's daemon leads; it exports",
              file=sys.stderr)
    return leads


def cmd_export(args: argparse.Namespace) -> int:
    from datetime import date, timedelta

    from db.chargeback.export import ExportError, export_period, terminal_progress
    from db.chargeback.periods import day_period, parse_period

    policy = _policy(args)
    try:
        period = parse_period(day=args.date, month=args.month, first=args.from_, last=args.to)
    except ValueError as exc:
        raise SystemExit(f"slurmgate export: {exc}") from exc
    periods = [period]
    if args.catch_up:
        if period.kind != "day":
            raise SystemExit("slurmgate export: --catch-up goes with --date (a day)")
        day = date.fromisoformat(period.label)
        periods = [day_period(day - timedelta(days=n)) for n in range(args.catch_up, -1, -1)]
    if args.if_leader and not _this_host_leads(args, policy):
        return 0
    show = not args.quiet and sys.stderr.isatty()
    for p in periods:
        try:
            res = export_period(policy.daemon.ledger(), p, args.out or policy.export.out_dir,
                                mode=policy.budgets.mode, currency=policy.rates.currency,
                                jobs=args.jobs, parquet=False if args.no_parquet else None,
                                progress=terminal_progress(p.label) if show else None,
                                cluster=args.cluster)
        except ExportError as exc:
            raise SystemExit(f"slurmgate export: {exc}") from exc
        if not args.quiet:
            m = res.manifest
            n = m["unsettled_runs"]
            late = f"; {n} run{'s' * (n != 1)} not settled yet" if n else ""
            net = _money(float(m["totals"]["net"]), m["currency"])
            print(f"{res.path}: {res.runs:,} runs, net {net} ({m['mode']}){late}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from db.chargeback.periods import parse_period
    from db.chargeback.statement import build_statement, render_html, render_text, statement_json

    policy = _policy(args)
    try:
        month = parse_period(month=args.month)
    except ValueError as exc:
        raise SystemExit(f"slurmgate report: {exc}") from exc
    store = _read_store(args)
    try:
        statement = build_statement(store, policy, month, team=args.team,
                                    efficiency_by=args.by or (), cluster=args.cluster)
    except ValueError as exc:
        raise SystemExit(f"slurmgate report: {exc}") from exc
    finally:
        store.close()
    if args.json:
        print(json.dumps(statement_json(statement), indent=2))
    else:
        sys.stdout.write(render_text(statement))
    if args.html:
        _write_replacing(os.path.abspath(args.html), render_html(statement))
        print(f"wrote {args.html}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _write_replacing(target: str, text: str) -> None:
    """Write ``target`` through a temp file that ``tempfile.mkstemp`` creates (O_EXCL, a
    random name) in the target's own directory, then ``os.replace``: never a predictable path
    a planted link could redirect."""
    import tempfile

    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def cmd_doctor(args: argparse.Namespace) -> int:
    from slurm_plugin.doctor import run_doctor

    return run_doctor(config_path(args), node=args.node, socket_path=args.socket,
                      as_json=args.json, rollups=args.rollups)


def cmd_ckpt(args: argparse.Namespace) -> int:
    from slurm_plugin.checkpoint import main as ckpt_main

    return ckpt_main(args.ckpt_args)


def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import run

    return run(config_path(args), demo=args.demo, cluster=args.cluster)


def cmd_db(args: argparse.Namespace) -> int:
    from slurm_plugin.db_migrate import cmd_db as run_db

    policy = _policy(args)
    return run_db(args, policy.daemon.database)


def build_parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog="slurmgate",
        description="Job tags, team budgets, GPU accounting and requeue for Slurm GPU clusters.",
    )
    p.add_argument("--config",
                   help=f"policy file (default ${defaults.POLICY_ENV} or {defaults.POLICY_PATH})")
    p.add_argument("--socket", help="daemon socket (default: daemon.socket from the policy file)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    add("daemon", cmd_daemon, "run the policy daemon (foreground)")
    sp = add("lua", cmd_lua, "print or install job_submit.lua for slurmctld")
    sp.add_argument("--timeout-ms", type=int, default=200, help="bound on every wait (default 200)")
    sp.add_argument("--fail-mode", choices=["open", "closed"], default="open",
                    help="daemon unreachable: accept and mark unchecked (open) or reject (closed)")
    sp.add_argument("-o", "--output", help="write to this path atomically instead of stdout")
    sp.add_argument("--slurm-uid", type=int,
                    help="uid of SlurmUser (default: looked up from [daemon] slurm_user)")
    add("ping", cmd_ping, "check that the daemon answers")
    sp = add("estimate", cmd_estimate,
             "dry run: would this job be accepted, and what would it cost at most?")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("sbatch_args", nargs=argparse.REMAINDER,
                    help="sbatch options and/or the batch script, as you would give sbatch")
    sp = add("quota", cmd_quota, "budget, spent, reserved, remaining and fairshare per team")
    sp.add_argument("--team", help="one team (you see only teams you belong to)")
    sp.add_argument("--cluster", metavar="NAME",
                    help="another cluster's quotas on a shared ledger (admins; default: this "
                         "daemon's, [daemon] cluster, or every cluster with global budgets)")
    sp.add_argument("--json", action="store_true")
    sp = add("job", cmd_job, "report of one job: allocation, runs, GPU use, cost, advice")
    sp.add_argument("jobid", metavar="JOBID", help="job id, or ARRAYID_TASK for an array task")
    sp.add_argument("--cluster", help="cluster (default [daemon] cluster)")
    sp.add_argument("--db", nargs="?", const="", metavar="PATH",
                    help="admins: read the database directly (default [daemon] database)")
    sp.add_argument("--json", action="store_true")
    sp = add("approve", cmd_approve, "let a team exceed its hard limit (admins only)")
    sp.add_argument("--team", required=True)
    grant = sp.add_mutually_exclusive_group(required=True)
    grant.add_argument("--amount", type=float, help="money the team may go over by")
    grant.add_argument("--gpu-hours", type=float, help="GPU-hours the team may go over by")
    sp.add_argument("--expires", required=True, help="date (2026-12-31) or duration (7d, 48h)")
    sp.add_argument("--reason", required=True)
    sp = add("approvals", cmd_approvals, "list approvals (yours, or all for admins)")
    sp.add_argument("--all", action="store_true", help="include expired, revoked and used up")
    sp.add_argument("--json", action="store_true")
    sp = add("nodes", cmd_nodes, "per-node failure history and drains")
    sp.add_argument("--days", type=float, default=30)
    sp.add_argument("--json", action="store_true")
    sp = add("failures", cmd_failures,
             "interruptions, mean time to recover, GPU-hours lost and credited, preemption rate")
    sp.add_argument("--days", type=float, default=7)
    sp.add_argument("--json", action="store_true")
    sp = add("agent", cmd_agent, "sample this node's GPUs into the spool (optional, per node)")
    sp.add_argument("--node", help="node name (default $SLURMD_NODENAME or the host name)")
    sp.add_argument("--interval", type=float, help="seconds between samples (default "
                    "nvml.sample_seconds)")
    sp.add_argument("--once", action="store_true", help="take one sample and exit")
    sp = add("reconcile", cmd_reconcile,
             "compare SQLite with Slurm: runs missing or unfinished, reservations left open")
    sp.add_argument("--repair", action="store_true",
                    help="ask the daemon to release reservations of jobs Slurm no longer knows")
    sp.add_argument("--json", action="store_true")
    sp = add("ckpt", cmd_ckpt,
             "checkpoint helper for batch jobs: dir | latest | restarts | save | load")
    sp.add_argument("ckpt_args", nargs=argparse.REMAINDER)
    sp = add("export", cmd_export, "write chargeback files (CSV, JSON Lines, Parquet) of a "
             "period")
    when = sp.add_mutually_exclusive_group()
    when.add_argument("--date", help="a UTC day: 2026-11-25, yesterday (default) or today")
    when.add_argument("--month", help="a month: 2026-10, last or this")
    when.add_argument("--from", dest="from_", metavar="DAY", help="first UTC day of a range")
    sp.add_argument("--to", metavar="DAY", help="last UTC day of the range (included)")
    sp.add_argument("--catch-up", type=int, default=0, metavar="N",
                    help="with --date: also re-export the N days before (runs settled late)")
    sp.add_argument("--out", help="export directory (default [export] out_dir)")
    sp.add_argument("--jobs", type=int, help="worker processes for big periods (default: CPUs)")
    sp.add_argument("--no-parquet", action="store_true", help="skip Parquet even with pyarrow")
    sp.add_argument("--cluster", metavar="NAME",
                    help="only this cluster's runs, into OUT/cluster=NAME/LABEL/ (default: "
                         "every cluster on the ledger, into OUT/LABEL/)")
    sp.add_argument("--if-leader", action="store_true",
                    help="controller pairs on one ledger: export only where this host's "
                         "daemon leads (the systemd timer runs on both)")
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    sp = add("report", cmd_report, "monthly statement per team (text, --json, --html FILE)")
    sp.add_argument("--month", default="last", help="2026-10, last (default) or this")
    sp.add_argument("--team", help="one team")
    sp.add_argument("--cluster", metavar="NAME",
                    help="only this cluster's runs (default: every cluster on the ledger)")
    sp.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    sp.add_argument("--by", action="append", metavar="GROUP",
                    help="add an efficiency table by GROUP: user, project or tag:KEY "
                         "(repeatable)")
    sp.add_argument("--json", action="store_true")
    sp = add("doctor", cmd_doctor, "check this installation and say what to fix")
    sp.add_argument("--node", nargs="?", const="", metavar="NAME",
                    help="compute-node checks (spool, hooks, GPUs) for NAME (default this node)")
    sp.add_argument("--rollups", action="store_true",
                    help="also recompute the daily rollups from the runs and compare them")
    sp.add_argument("--json", action="store_true")
    sp = add("check-policy", cmd_check_policy, "validate the policy file and say what is wrong")
    sp.add_argument("--connect", action="store_true",
                    help="also try to connect to the SMTP relay of [alerts]")
    sp.add_argument("--strict", action="store_true",
                    help="exit 1 when [alerts] has problems (they never stop the daemon)")
    sp = add("tui", cmd_tui, "open the admin terminal UI")
    sp.add_argument("--demo", action="store_true", help="show a fixed sample dataset")
    sp.add_argument("--cluster", metavar="NAME",
                    help="quotas, chargeback and events of this cluster only (default: every "
                         "cluster on the ledger; quotas: the daemon's own)")
    from slurm_plugin.db_migrate import add_parser as add_db

    add_db(sub, cmd_db)
    sub.add_parser("hook", help="Slurm hooks: prolog | epilog | jobcomp (wired in slurm.conf)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hook"]:
        from slurm_plugin.node.hooks import main as hook_main

        return hook_main(argv[1:])
    if argv[:1] == ["ckpt"]:  # runs inside user jobs: no config, no daemon
        from slurm_plugin.checkpoint import main as ckpt_main

        return ckpt_main(argv[1:])
    parser = build_parser()
    if "estimate" in argv:
        # everything after `estimate` is sbatch's, options included
        i = argv.index("estimate")
        rest = argv[i + 1:]
        as_json = "--json" in rest[:1]
        args = parser.parse_args([*argv[:i], "estimate"])
        args.json = as_json
        args.sbatch_args = rest[1:] if as_json else rest
        return int(args.func(args) or 0)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
