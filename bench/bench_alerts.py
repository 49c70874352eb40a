"""The alert scan's round time: events past the cursor and budgets of many teams.

One store with ``--teams`` teams (each crossing one or more budget thresholds this period) and
``--events`` alertable events per round (idle warnings, holds, node failures of jobs on
``--gpus`` GPUs' worth of nodes); each round is ``Dispatcher.round`` in dry-run mode (every
alert decided and recorded, nothing sent: the network is not what is measured). Prints
min/median/max per round for the first round (every threshold new) and for steady rounds (only
the new events of that round).

    /opt/slurmgate/venv/bin/python bench/bench_alerts.py [--teams 200] [--events 1000]

``--beside N``: decision latency with the alert scan beside the decisions vs not, paired:
N runs of bench_decisions.py each without and with ``--alerts`` (the real daemon, 50,000 live
reservations, the alert thread scanning every second), alternating; prints the daemon's
decision p50/p99 of each and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db.alert_log import AlertLog  # noqa: E402
from db.store import open_store  # noqa: E402
from policies.config import Policy  # noqa: E402
from policies.ledger import period_bounds  # noqa: E402
from slurm_plugin.alerts.dispatch import BudgetSnapshot, Dispatcher  # noqa: E402

KINDS = ("idle_warning", "hold", "node_fail", "idle_action", "drain")


def policy(teams: int) -> Policy:
    return Policy.model_validate({
        "daemon": {"cluster": "c1", "admins": ["root"]},
        "teams": {f"t{i}": {"accounts": [f"a{i}"], "members": [f"u{i}"], "leads": [f"l{i}"],
                            "budget": 1000.0} for i in range(teams)},
        "rates": {"gpu_hour": {"a100": 2.0}},
        "partitions": {"gpu": {"default_gpu_type": "a100"}},
        "alerts": {"enabled": True, "dry_run": True, "mail_domain": "example.org",
                   "addresses": {"root": "ops@example.org"},
                   "webhooks": [{"name": "ops", "url": "http://127.0.0.1:9/hook"}]},
    })


def add_events(store, n: int, ts: float, first_job: int) -> None:  # noqa: ANN001
    store.add_events([
        {"kind": KINDS[i % len(KINDS)], "ts": ts, "cluster": "c1", "job_id": first_job + i,
         "restart_count": 0, "team": f"t{i % 200}", "user": f"u{i % 200}",
         "node": f"gpu{i % 125:03d}", "actor": "slurmgate", "message": f"event {i}",
         "detail": {"idle_minutes": 61, "gpus_idle": 8, "gpus_allocated": 8,
                    "cost_so_far": 12.5, "currency": "$", "action": "cancel",
                    "dry_run": False}}
        for i in range(n)])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teams", type=int, default=200)
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--beside", type=int, default=0, metavar="N")
    args = ap.parse_args()
    if args.beside:
        return beside(args.beside)
    pol = policy(args.teams)
    now = time.time()
    period = period_bounds(pol.budgets.period, now)[2]
    # every team past 50 %, a fifth past 100 %: all thresholds are new in the first round
    spent = {f"t{i}": 550.0 + (500.0 if i % 5 == 0 else 0.0) for i in range(args.teams)}
    snapshot = BudgetSnapshot(period, spent, {})
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "bench.db")
        clock = [now]
        d = Dispatcher(AlertLog(store), lambda: pol, lambda _now: snapshot,
                       write_log=lambda *a, **k: None, clock=lambda: clock[0])
        t0 = time.perf_counter()
        counts = d.round()  # events start at the newest: history is not alerted
        print(f"first round ({args.teams} teams, every threshold new): "
              f"{time.perf_counter() - t0:.3f} s  {counts}")
        job = 1
        times: list[float] = []
        for r in range(args.rounds + 1):
            clock[0] += 30
            add_events(store, args.events, clock[0], job)
            job += args.events
            t0 = time.perf_counter()
            counts = d.round()
            times.append(time.perf_counter() - t0)
            if r == 0:
                print(f"second round ({args.events} new events): {times[0]:.3f} s  {counts}")
        steady = times[1:]
        print(f"steady rounds ({args.events} new events each, {args.teams} teams, "
              f"{args.rounds} rounds): min {min(steady):.3f} s, median "
              f"{statistics.median(steady):.3f} s, max {max(steady):.3f} s")
        store.close()
    return 0


def beside(n: int) -> int:
    import json
    import subprocess

    bench = Path(__file__).resolve().parent / "bench_decisions.py"
    p99: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(n):
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            out = subprocess.run([sys.executable, str(bench), "--requests", "3000",
                                  *(["--alerts"] if mode == "on" else [])],
                                 capture_output=True, text=True, check=True, timeout=600)
            result = json.loads(out.stdout)
            inner = result["daemon_decision_ms"]
            p99[mode].append(inner["p99"])
            print(f"run {i + 1} alerts {mode}: decision p50 {inner['p50']:.3f} ms, "
                  f"p99 {inner['p99']:.3f} ms")
    off, on = statistics.median(p99["off"]), statistics.median(p99["on"])
    print(f"decision p99 median off / on: {off:.3f} / {on:.3f} ms, ratio on/off {on / off:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
