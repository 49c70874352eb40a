"""Failover of the once-only work: two real daemons on one PostgreSQL ledger (a server this
bench starts, contrib/devcluster/postgres.sh) and one spool. Each trial SIGKILLs the leading
daemon (its host died), then times

- kill -> the standby says it leads (``ping``), and
- kill -> singleton work resumed: a finished job's records (its node's and its completion)
  written right after the kill are in the ledger (ingested by the new leader),

then restarts the killed daemon as the new standby. The baseline in the same run is a
SQLite daemon's own ingest latency for the same record (write -> in the ledger) with no
failover at all: what the first figure adds to it is the failover.

Run it beside a Slurm the daemons can ask (the dev cluster's environment): the ingest asks
Slurm about jobs it has no reservation for, and without a Slurm that question times out.

    make cluster && source .devcluster/env.sh
    /opt/slurmgate/venv/bin/python bench/bench_ha.py [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_decisions import start_postgresql, stop_postgresql  # noqa: E402

from db.store import open_store  # noqa: E402
from slurm_plugin.node import spool  # noqa: E402
from slurm_plugin.protocol import call  # noqa: E402
from tests.unit.test_db_ingest import make_jobcomp, make_node_run  # noqa: E402


def policy(root: Path, name: str, ledger_line: str, spool_dir: Path) -> Path:
    d = root / name
    d.mkdir(mode=0o755)
    p = d / "policy.toml"
    p.write_text(f'[daemon]\nsocket = "{d}/sg.sock"\n{ledger_line}\n'
                 f'spool_dir = "{spool_dir}"\nslurm_user = "root"\ncluster = "c1"\n'
                 f'log_file = "{d}/daemon.log"\nreconcile_seconds = 3600\n'
                 f'[node]\nstate_dir = "{d}/state"\n[rates.gpu_hour]\na100 = 2.0\n'
                 '[teams.vision]\naccounts = ["vis"]\n[partitions.gpu]\n'
                 'default_gpu_type = "a100"\n[nvml]\nbackend = "fake"\n')
    return p


def start(p: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "slurm_plugin.cli", "--config", str(p),
                             "daemon"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sock = str(p.parent / "sg.sock")
    until(lambda: os.path.exists(sock), 30)
    return proc


def leads(p: Path) -> bool:
    try:
        return bool(call(str(p.parent / "sg.sock"), {"op": "ping"}, timeout=2).get("leader"))
    except Exception:  # noqa: BLE001 - a daemon that does not answer does not lead
        return False


def until(cond: Any, timeout: float, interval: float = 0.01) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit("timed out")
        time.sleep(interval)
    return time.monotonic() - t0


def has_run(target: str, job_id: int) -> bool:
    with open_store(target, readonly=True) as s:
        return bool(s.runs_of_job("c1", job_id))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sg-bench-ha-"))
    os.chmod(root, 0o755)
    spool_dir = root / "spool"
    spool_dir.mkdir(mode=0o755)
    trust = spool.trust_for("root")
    url, pg = start_postgresql(root)
    url_file = root / "ledger.url"
    url_file.write_text(url + "\n")
    os.chmod(url_file, 0o600)
    out: dict[str, Any] = {"host": socket.gethostname(), "cpus": os.cpu_count()}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # the baseline: a lone SQLite daemon's ingest latency for one record
        lone = policy(root, "sqlite", f'database = "{root}/lone.db"', root / "lone-spool")
        (root / "lone-spool").mkdir(mode=0o755)
        proc = start(lone)
        procs.append(proc)
        base = []
        for n in range(args.trials):
            spool.write_record(root / "lone-spool", make_node_run(90_000 + n), trust=trust)
            spool.write_record(root / "lone-spool", make_jobcomp(90_000 + n), trust=trust)
            base.append(until(lambda n=n: has_run(f"{root}/lone.db", 90_000 + n), 30))
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        pa = policy(root, "a", f'database_url_file = "{url_file}"', spool_dir)
        pb = policy(root, "b", f'database_url_file = "{url_file}"', spool_dir)
        running = {pa: start(pa)}
        until(lambda: leads(pa), 30)
        running[pb] = start(pb)
        leader, standby = pa, pb
        to_lead, to_work = [], []
        for n in range(args.trials):
            time.sleep(1.0)  # both settled: the standby's next check is anywhere in its 2 s
            running[leader].send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            running[leader].wait(10)
            spool.write_record(spool_dir, make_node_run(50_000 + n), trust=trust)
            spool.write_record(spool_dir, make_jobcomp(50_000 + n), trust=trust)
            until(lambda s=standby: leads(s), 30)
            to_lead.append(time.monotonic() - t0)
            until(lambda n=n: has_run(url, 50_000 + n), 30)
            to_work.append(time.monotonic() - t0)
            running[leader] = start(leader)  # back as the standby
            leader, standby = standby, leader
        procs += list(running.values())

        def summary(xs: list[float]) -> dict[str, float]:
            return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3),
                    "max": round(max(xs), 3)}

        out.update(trials=args.trials,
                   baseline_sqlite_ingest_s=summary(base),
                   kill_to_standby_leads_s=summary(to_lead),
                   kill_to_singleton_work_resumed_s=summary(to_work))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        stop_postgresql(pg)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
