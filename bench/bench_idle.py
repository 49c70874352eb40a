"""The idle-GPU scan at 1,000 GPUs sampled every minute: one round's time, and decision
latency with the scan running beside the decisions vs not, in the same run.

The database holds 1,000 GPUs (125 nodes x 8) sampled once a minute for ``--hours`` (synthetic
rows in gpu_samples, each tagged with the job holding the GPU), ~400 running jobs of 1 to 8
GPUs (a third idle, some with 7 of 8 GPUs busy), and the 50,000 live reservations of
bench_decisions.py. The queue comes from the synthetic Slurm backend.

1. Rounds: ``IdleScan.scan`` in this process, ``--rounds`` times (the first writes the
   warnings, dry run, so the jobs keep running and later rounds judge the same queue).
2. Decisions: the daemon in a child process (``--serve``: the service and its socket server,
   as ``slurmgate daemon`` runs them, with the synthetic queue), and submit requests over ONE
   kept connection as job_submit.lua sends them, in blocks of ``--block`` requests that
   alternate scan off / scan on. "On" hands the queue to the scan every 10 ms as the reconcile
   loop does (``scan_idle_gpus``), so rounds run back to back in the scan's own thread of the
   daemon's process: the worst case, thousands of times the production cadence of one round
   per 15 minutes. The daemon's own decision time comes from its log, like the round times
   under load.

    /opt/slurmgate/venv/bin/python bench/bench_idle.py [--hours 24] [--rounds 20]
        [--requests 6000] [--block 500]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_decisions import Conn, fill, job_for, pct, policy_text, user_of  # noqa: E402

from db.store import open_store  # noqa: E402
from policies.config import load_policy  # noqa: E402
from slurm_plugin.slurm.synthetic import SyntheticSlurm  # noqa: E402

NODES, GPUS_PER_NODE = 125, 8
TEAMS = 200
SHAPES = ((8,), (4, 4), (2, 2, 2, 2), (4, 2, 1, 1), (1,) * 8)


def idle_policy(state: Path) -> str:
    return policy_text(state, TEAMS, members=["u", user_of(1000)]) + "\n".join([
        "[nvml]", "sample_seconds = 60",
        "[idle]", "enabled = true", "dry_run = true", "threshold_percent = 5",
        "warn_after_minutes = [60, 105]", "act_after_minutes = 120", 'action = "cancel"',
        "scan_seconds = 0.01", ""])  # the bench asks for rounds back to back


def cluster_jobs(now: float, seed: int = 11) -> tuple[SyntheticSlurm, list[dict[str, Any]]]:
    """The running queue and, per job, how its GPUs behave."""
    rng = random.Random(seed)
    slurm = SyntheticSlurm(n_jobs=0, n_nodes=NODES, gpus_per_node=GPUS_PER_NODE,
                           clock=lambda: now)
    plans = []
    for n in range(NODES):
        node = f"gpu{n + 1:03d}"
        first = 0
        for gpus in rng.choice(SHAPES):
            kind = rng.choices(("idle", "busy", "one_busy"), (0.33, 0.57, 0.10))[0]
            started = now - rng.choice((30, 90, 150, 400)) * 60.0
            team = rng.randrange(TEAMS)
            job = slurm.add_job(state="RUNNING", user="u", account=f"acct{team}",
                                partition="gpu", gpus=float(gpus), gpu_type="a100",
                                nodes=node, node_count=1, start_ts=started, cpus=8 * gpus)
            plans.append({"job_id": job.job_id, "node": node, "first": first, "gpus": gpus,
                          "kind": kind, "start": started})
            first += gpus
    return slurm, plans


SAMPLE_INSERT = ("INSERT INTO gpu_samples (node, gpu_uuid, ts, gpu_index, gpu_type, util, "
                 "mem_used_bytes, power_w, job_id) VALUES (:node, :uuid, :ts, :index, :type, "
                 ":util, :mem, :power, :job_id)")


def fill_samples(db: Path, plans: list[dict[str, Any]], now: float, hours: float) -> int:
    """One sample a minute of every GPU for ``hours`` (tagged with its job while it runs)."""
    rng = random.Random(5)
    store = open_store(db)
    rows: list[dict[str, Any]] = []
    total = 0
    minutes = int(hours * 60)
    with store.transaction():
        for plan in plans:
            for g in range(plan["gpus"]):
                index = plan["first"] + g
                uuid = f"GPU-{plan['node']}-{index}"
                for k in range(minutes):
                    ts = now - k * 60.0 - rng.uniform(0, 2)
                    if ts < plan["start"]:
                        util, job_id = rng.uniform(0, 100), None  # an earlier job
                    elif plan["kind"] == "idle" or (plan["kind"] == "one_busy" and g > 0):
                        util, job_id = rng.choice((0.0, 0.0, 1.0, 3.0)), plan["job_id"]
                    else:
                        util, job_id = rng.uniform(40, 99), plan["job_id"]
                    rows.append({"node": plan["node"], "uuid": uuid, "ts": ts,
                                 "index": index, "type": "a100", "util": util, "mem": 0,
                                 "power": 250.0, "job_id": job_id})
                if len(rows) > 200_000:
                    store.conn.executemany(SAMPLE_INSERT, rows)
                    total += len(rows)
                    rows = []
        store.conn.executemany(SAMPLE_INSERT, rows)
        total += len(rows)
    store.conn.execute("ANALYZE")
    store.close()
    return total


# -- the daemon in a child process (--serve) ---------------------------------------------------


def serve(state: Path) -> int:
    """The service and its socket server as ``slurmgate daemon`` runs them, with the synthetic
    queue; the idle scan runs back to back while ``state/scan-on`` exists."""
    from slurm_plugin.daemon.connections import ConnectionServer
    from slurm_plugin.daemon.idle import scan_idle_gpus
    from slurm_plugin.daemon.service import Daemon

    config = state / "policy.toml"
    policy = load_policy(config)
    slurm, _ = cluster_jobs(float((state / "now").read_text()))
    jobs = slurm.jobs()
    daemon = Daemon(str(config), policy, open_store(policy.daemon.database), slurm)
    daemon.refresh_ledger()
    server = ConnectionServer(policy.daemon.socket, daemon)
    os.chmod(policy.daemon.socket, 0o666)
    stop = threading.Event()

    def reconcile_passes() -> None:
        # what the reconcile loop does each pass, every 10 ms: hand the queue to the scan's
        # thread, which runs a round whenever scan_seconds (0.01 here) have passed
        while not stop.is_set():
            if (state / "scan-on").exists():
                scan_idle_gpus(daemon, jobs)
            stop.wait(0.01)

    threading.Thread(target=reconcile_passes, daemon=True, name="reconcile").start()
    (state / "ready").write_text("1")
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        stop.set()
        server.server_close()
    return 0


def start_daemon(state: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(state)], env=env)
    deadline = time.time() + 120
    while not (state / "ready").exists():
        if time.time() > deadline or proc.poll() is not None:
            raise SystemExit("the bench daemon did not start")
        time.sleep(0.05)
    return proc


def log_lines(state: Path, event: str) -> list[dict[str, Any]]:
    marker = f'"event": "{event}"'
    return [json.loads(line) for line in (state / "daemon.log").read_text().splitlines()
            if marker in line]


def stats(values: list[float]) -> dict[str, float]:
    return {"p50": round(pct(values, 50), 4), "p99": round(pct(values, 99), 4),
            "max": round(max(values), 4), "mean": round(statistics.mean(values), 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=24.0,
                    help="hours of samples kept (the table a scan searches)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--block", type=int, default=500)
    ap.add_argument("--reservations", type=int, default=50_000)
    ap.add_argument("--control", action="store_true",
                    help="A/A run: the 'on' blocks hand nothing to the scan (the noise floor)")
    ap.add_argument("--serve", metavar="STATE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(Path(args.serve))

    state = Path(tempfile.mkdtemp(prefix="sg-bench-idle-"))
    now = time.time()
    (state / "now").write_text(repr(now))
    (state / "policy.toml").write_text(idle_policy(state))
    t0 = time.perf_counter()
    fill(state / "sg.db", TEAMS, args.reservations)
    slurm, plans = cluster_jobs(now)
    rows = fill_samples(state / "sg.db", plans, now, args.hours)
    fill_s = time.perf_counter() - t0

    # 1. rounds, in this process, on the daemon's own scan
    from slurm_plugin.daemon.idle import IdleScan
    from slurm_plugin.daemon.service import Daemon

    policy = load_policy(state / "policy.toml")
    store = open_store(policy.daemon.database)
    daemon = Daemon(str(state / "policy.toml"), policy, store, slurm)
    jobs = slurm.jobs()
    scan = IdleScan(daemon)
    rounds: list[float] = []
    counts: dict[str, int] = {}
    for _ in range(args.rounds):
        t = time.perf_counter()
        got = scan.scan(jobs, now=now)
        rounds.append(time.perf_counter() - t)
        counts = counts or got
    store.close()

    # 2. decisions with the scan off and on, alternating blocks, same daemon
    (state / "daemon.log").rename(state / "rounds.log")
    proc = start_daemon(state)
    submit: dict[str, list[float]] = {"off": [], "on": []}
    try:
        conn = Conn(str(state / "sg.sock"))
        rng = random.Random(7)
        blocks = max(2, args.requests // args.block)
        i = 0
        for b in range(blocks):
            mode = "on" if b % 2 else "off"
            flag = state / "scan-on"
            if mode == "on" and not args.control:
                flag.write_text("1")
                time.sleep(0.2)  # the scan thread is under way
            else:
                flag.unlink(missing_ok=True)
                time.sleep(0.5)  # the last round has finished
            for _ in range(args.block):
                job = job_for(rng, TEAMS, i)
                t = time.perf_counter()
                conn.ask({"v": 1, "op": "submit", "id": i, "job": job})
                submit[mode].append((time.perf_counter() - t) * 1000)
                i += 1
        (state / "scan-on").unlink(missing_ok=True)
    finally:
        proc.terminate()
        proc.wait(10)
    decisions = log_lines(state, "decision")
    inner: dict[str, list[float]] = {"off": [], "on": []}
    for n, d in enumerate(decisions):
        inner["on" if (n // args.block) % 2 else "off"].append(d["latency_ms"])
    loaded_rounds = [e["seconds"] for e in log_lines(state, "idle_scan")]
    out = {
        "control_run": args.control,
        "gpus": NODES * GPUS_PER_NODE, "nodes": NODES, "running_jobs": len(plans),
        "idle_jobs_planned": sum(p["kind"] == "idle" for p in plans),
        "sample_rows": rows, "hours_of_samples": args.hours,
        "live_reservations": args.reservations, "fill_s": round(fill_s, 1),
        "first_round_counts": counts,
        "round_s": stats(rounds),
        "round_s_beside_decisions": stats(loaded_rounds) if loaded_rounds else None,
        "rounds_beside_decisions": len(loaded_rounds),
        "requests_per_mode": {k: len(v) for k, v in submit.items()},
        "submit_round_trip_ms": {k: stats(v) for k, v in submit.items()},
        "daemon_decision_ms": {k: stats(v) for k, v in inner.items()},
        "p99_ratio_on_to_off": {
            "round_trip": round(pct(submit["on"], 99) / pct(submit["off"], 99), 3),
            "daemon": round(pct(inner["on"], 99) / pct(inner["off"], 99), 3)},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
