"""Decision latency at the daemon: 200 teams, 50,000 live reservations.

Starts a real `slurmgate daemon` on a temporary socket and database, fills the database with
live reservations, then sends submit requests over ONE kept connection (as job_submit.lua
does) and times each round trip. Baseline in the same run: `ping` round trips on the same
connection (the protocol's floor). Also reports the daemon's own decision time from its log.

    /opt/slurmgate/venv/bin/python bench/bench_decisions.py [--requests 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from db.store import open_store  # noqa: E402


def policy_text(state: Path, teams: int) -> str:
    lines = [
        "[daemon]", f'socket = "{state}/sg.sock"', f'database = "{state}/sg.db"',
        f'spool_dir = "{state}/spool"', f'log_file = "{state}/daemon.log"',
        'slurm_user = "root"', "reconcile_seconds = 3600", 'cluster = "bench"',
        "[tags]", 'required = ["project", "cost_center"]',
        "[tags.allowed.cost_center]", 'regex = "CC[0-9]{2,6}"',
        "[rates]", "cpu_core_hour = 0.02", "mem_gb_hour = 0.005",
        "[rates.gpu_hour]", "a100 = 2.5", "h100 = 4.0",
        "[partitions.gpu]", 'default_gpu_type = "a100"', "max_time_minutes = 10080",
        "[partitions.scavenger]", 'default_gpu_type = "a100"', "price_factor = 0.3",
    ]
    for i in range(teams):
        lines += [f"[teams.team{i}]", f'accounts = ["acct{i}"]',
                  f'projects = ["p{i}a", "p{i}b"]', f"budget = {100000 + i}.0",
                  f"share = {1 + i % 7}"]
    return "\n".join(lines) + "\n"


def fill(db_path: Path, teams: int, reservations: int) -> None:
    store = open_store(db_path)
    now = time.time()
    period = time.strftime("%Y-%m", time.gmtime(now))
    rows = [{
        "rid": f"rb{i:08d}", "cluster": "bench", "team": f"team{i % teams}",
        "project": f"p{i % teams}a", "cost_center": "CC1000", "user": "u", "account": None,
        "partition": "gpu", "tags": "{}", "gpu_type": "a100", "gpus": 1.0, "cpus": 1,
        "mem_mb": 0, "time_limit_min": 60, "tasks": 1, "est_cost": 2.52, "state": "reserved",
        "period": period, "created_at": now, "updated_at": now,
    } for i in range(reservations)]
    with store.transaction():
        store.db["reservations"].insert_all(rows, batch_size=5000)
    store.close()


class Conn:
    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.f = self.s.makefile("rb")

    def ask(self, obj: dict) -> dict:
        self.s.sendall(json.dumps(obj).encode() + b"\n")
        return json.loads(self.f.readline())


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--teams", type=int, default=200)
    ap.add_argument("--reservations", type=int, default=50_000)
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    (state / "policy.toml").write_text(policy_text(state, args.teams))
    t0 = time.perf_counter()
    fill(state / "sg.db", args.teams, args.reservations)
    fill_s = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "slurm_plugin.cli", "--config",
                             str(state / "policy.toml"), "daemon"], env=env,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (state / "sg.sock").exists():
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit("daemon did not start")
            time.sleep(0.05)
        conn = Conn(str(state / "sg.sock"))
        quota = conn.ask({"v": 1, "op": "quota"})
        reserved_total = sum(t["reserved"] for t in quota["teams"])
        rng = random.Random(7)
        submit_ms: list[float] = []
        ping_ms: list[float] = []
        verdicts: dict[str, int] = {}
        for i in range(args.requests):
            team = rng.randrange(args.teams)
            job = {"user": "u", "uid": 1000, "account": f"acct{team}", "partition": "gpu",
                   "comment": f"project=p{team}a,cost_center=CC{1000 + team}",
                   "time_limit": rng.choice([30, 60, 240]), "tres_per_node":
                   rng.choice(["gres:gpu:1", "gres:gpu:a100:2", "gres:gpu:h100:4"]),
                   "min_nodes": 1, "num_tasks": 1, "name": f"b{i}"}
            t = time.perf_counter()
            conn.ask({"v": 1, "op": "ping", "id": i})
            ping_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            resp = conn.ask({"v": 1, "op": "submit", "id": i, "job": job})
            submit_ms.append((time.perf_counter() - t) * 1000)
            verdicts[resp.get("verdict", "error")] = verdicts.get(resp.get("verdict", "error"),
                                                                  0) + 1
    finally:
        proc.terminate()
        proc.wait(10)
    inner = [json.loads(line)["latency_ms"] for line in
             (state / "daemon.log").read_text().splitlines() if '"event": "decision"' in line]
    out = {
        "teams": args.teams, "live_reservations_at_start": args.reservations,
        "reserved_total_at_start": round(reserved_total, 2), "fill_s": round(fill_s, 2),
        "requests": args.requests, "verdicts": verdicts,
        "submit_round_trip_ms": {"p50": pct(submit_ms, 50), "p99": pct(submit_ms, 99),
                                 "mean": statistics.mean(submit_ms)},
        "ping_round_trip_ms": {"p50": pct(ping_ms, 50), "p99": pct(ping_ms, 99)},
        "daemon_decision_ms": {"p50": pct(inner, 50), "p99": pct(inner, 99)},
        "ratio_submit_to_ping_p50": pct(submit_ms, 50) / pct(ping_ms, 50),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
