"""Decision latency at the daemon: 200 teams, 50,000 live reservations.

Starts a real `slurmgate daemon` on a temporary socket and database, fills the database with
live reservations, then sends submit requests over ONE kept connection (as job_submit.lua
does) and times each round trip. Baseline in the same run: `ping` round trips on the same
connection (the protocol's floor). Also reports the daemon's own decision time from its log.

With ``--hammer-estimate`` and/or ``--idle-connections N`` the same requests are timed a
second time while an unprivileged user (a forked child that drops to ``alice``, else
``nobody``: the bench runs as root, and root is a controller) hammers the daemon with
``estimate`` requests on 4 connections, ignoring every retry_after, and/or holds N idle
connections; the output then has both runs ("quiet" and "under_load"). ``--user-limits M``
sets max_user_connections and max_connections_per_user to M in the bench policy (by default
the policy's own limits apply, and most idle connections are refused).

With ``--database postgresql`` the ledger is a PostgreSQL server this bench starts for the
run (contrib/devcluster/postgres.sh: Debian's server, default settings, fsync and
synchronous_commit on) on a loopback port, and the daemon reaches it over TCP, as a
controller reaches a database host.

    /opt/slurmgate/venv/bin/python bench/bench_decisions.py [--requests 5000]
        [--hammer-estimate] [--idle-connections 1000] [--user-limits 1100]
        [--database sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import random
import select
import socket
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

from db.store import open_store  # noqa: E402


def policy_text(state: Path, teams: int, user_limits: int | None = None,
                members: list[str] | None = None, ledger: str | None = None) -> str:
    # --account bills a team only for its members: the jobs' user, and the load's user
    members = members or ["u"]
    lines = [
        "[daemon]", f'socket = "{state}/sg.sock"', f'database = "{ledger or state / "sg.db"}"',
        f'spool_dir = "{state}/spool"', f'log_file = "{state}/daemon.log"',
        'slurm_user = "root"', "reconcile_seconds = 3600", 'cluster = "bench"',
        *([f"max_user_connections = {user_limits}",
           f"max_connections_per_user = {user_limits}"] if user_limits else []),
        "[tags]", 'required = ["project", "cost_center"]',
        "[tags.allowed.cost_center]", 'regex = "CC[0-9]{2,6}"',
        "[rates]", "cpu_core_hour = 0.02", "mem_gb_hour = 0.005",
        "[rates.gpu_hour]", "a100 = 2.5", "h100 = 4.0",
        "[partitions.gpu]", 'default_gpu_type = "a100"', "max_time_minutes = 10080",
        "[partitions.scavenger]", 'default_gpu_type = "a100"', "price_factor = 0.3",
    ]
    for i in range(teams):
        lines += [f"[teams.team{i}]", f'accounts = ["acct{i}"]', f"members = {members!r}",
                  f'projects = ["p{i}a", "p{i}b"]', f"budget = {100000 + i}.0",
                  f"share = {1 + i % 7}"]
    return "\n".join(lines) + "\n"


ALERTS = "\n".join([
    "[alerts]", "enabled = true", "dry_run = true", 'mail_domain = "example.org"',
    "scan_seconds = 1", "budget_thresholds = [0.001, 50, 80, 90, 100]", ""])
"""The alert scan at its shortest cadence (``--alerts``): dry run, so nothing is sent."""


def start_postgresql(state: Path) -> tuple[str, Path]:
    """A PostgreSQL server for this run: (the slurmgate role's URL, its state dir)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pg = state / "pg"
    script = str(REPO / "contrib/devcluster/postgres.sh")
    subprocess.run(["bash", script, "start", str(pg), str(port)], check=True)
    url = subprocess.run(["bash", script, "url", str(pg), str(port)], check=True,
                         capture_output=True, text=True).stdout.strip()
    return url, pg


def stop_postgresql(pg: Path) -> None:
    subprocess.run(["bash", str(REPO / "contrib/devcluster/postgres.sh"), "stop", str(pg)],
                   check=False)


def fill(db_path: Path | str, teams: int, reservations: int) -> None:
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
    cols = list(rows[0])
    names = ", ".join(f'"{c}"' for c in cols)  # "user", "partition": reserved on PostgreSQL
    sql = (f"INSERT INTO reservations ({names}) "
           f"VALUES ({', '.join(':' + c for c in cols)})")
    with store.transaction():
        store.conn.executemany(sql, rows)
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


def job_for(rng: random.Random, teams: int, i: int) -> dict:
    team = rng.randrange(teams)
    return {"user": "u", "uid": 1000, "account": f"acct{team}", "partition": "gpu",
            "comment": f"project=p{team}a,cost_center=CC{1000 + team}",
            "time_limit": rng.choice([30, 60, 240]), "tres_per_node":
            rng.choice(["gres:gpu:1", "gres:gpu:a100:2", "gres:gpu:h100:4"]),
            "min_nodes": 1, "num_tasks": 1, "name": f"b{i}"}


def measure(conn: Conn, requests: int, teams: int, rng: random.Random,
            first_id: int = 0) -> dict[str, Any]:
    submit_ms: list[float] = []
    ping_ms: list[float] = []
    verdicts: dict[str, int] = {}
    for i in range(first_id, first_id + requests):
        job = job_for(rng, teams, i)
        t = time.perf_counter()
        conn.ask({"v": 1, "op": "ping", "id": i})
        ping_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        resp = conn.ask({"v": 1, "op": "submit", "id": i, "job": job})
        submit_ms.append((time.perf_counter() - t) * 1000)
        verdict = resp.get("verdict", "error")
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    return {"verdicts": verdicts,
            "submit_round_trip_ms": {"p50": pct(submit_ms, 50), "p99": pct(submit_ms, 99),
                                     "mean": statistics.mean(submit_ms)},
            "ping_round_trip_ms": {"p50": pct(ping_ms, 50), "p99": pct(ping_ms, 99)},
            "ratio_submit_to_ping_p50": pct(submit_ms, 50) / pct(ping_ms, 50)}


# -- the unprivileged load (a forked child) --------------------------------------------------


def user_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "u"


def unprivileged_user() -> pwd.struct_passwd:
    for name in ("alice", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise SystemExit("no unprivileged user (alice or nobody) to run the load as")


def _hammer(path: str, teams: int, seed: int, stop: threading.Event,
            stats: dict[str, int], lock: threading.Lock) -> None:
    """estimate requests back to back on one connection, every retry_after ignored;
    reconnects when the daemon closes the connection."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    s: socket.socket | None = None
    f = None
    i = 0
    while not stop.is_set():
        try:
            if s is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(path)
                f = s.makefile("rb")
            assert f is not None
            s.sendall(json.dumps({"v": 1, "op": "estimate", "id": i,
                                  "job": job_for(rng, teams, i)}).encode() + b"\n")
            line = f.readline()
            if not line:
                raise ConnectionResetError("closed by the daemon")
            resp = json.loads(line)
            kind = ("ok" if resp.get("ok") is not False else
                    "rate_limited" if "retry_after" in resp and "busy" not in resp["error"]
                    else "busy" if "busy" in resp.get("error", "") else "refused")
        except OSError:
            kind = "connection_lost"
            if s is not None:
                s.close()
            s = f = None
            stop.wait(0.01)
        counts[kind] = counts.get(kind, 0) + 1
        i += 1
    if s is not None:
        s.close()
    with lock:
        for k, v in counts.items():
            stats[k] = stats.get(k, 0) + v


def _open_idle(path: str, n: int) -> tuple[list[socket.socket], int]:
    """Open n connections and say nothing; returns those the daemon kept and how many it
    refused (a refused one gets an error line and EOF)."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError:
            s.close()
            continue
        socks.append(s)
    time.sleep(1.0)  # let the daemon accept and refuse what it refuses
    kept = [s for s in socks if not select.select([s], [], [], 0)[0]]
    for s in socks:
        if s not in kept:
            s.close()
    return kept, len(socks) - len(kept)


def start_load(path: str, teams: int, hammer: bool, idle: int) -> tuple[int, int, int]:
    """Fork the unprivileged child; returns (pid, control fd to close to stop it, stats fd)
    once its load is in place."""
    user = unprivileged_user()
    ctl_r, ctl_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, make the load, report when told to stop
        code = 1
        try:
            os.close(ctl_w)
            os.close(out_r)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            stats: dict[str, Any] = {"user": user.pw_name}
            lock = threading.Lock()
            stop = threading.Event()
            threads = [threading.Thread(target=_hammer, args=(path, teams, k, stop, stats, lock),
                                        daemon=True) for k in range(4 if hammer else 0)]
            for th in threads:
                th.start()
            kept, refused = _open_idle(path, idle)
            stats["idle_kept"], stats["idle_refused"] = len(kept), refused
            os.write(out_w, b"r")  # the load is in place
            os.read(ctl_r, 1)  # until the parent closes its end
            stats["idle_still_open"] = sum(
                1 for s in kept if not select.select([s], [], [], 0)[0])
            stop.set()
            for th in threads:
                th.join(15)
            os.write(out_w, json.dumps(stats).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(ctl_r)
    os.close(out_w)
    if os.read(out_r, 1) != b"r":
        raise SystemExit("the load child failed to start")
    return pid, ctl_w, out_r


def stop_load(pid: int, ctl_w: int, out_r: int) -> dict[str, Any]:
    os.close(ctl_w)
    raw = b""
    while chunk := os.read(out_r, 65536):
        raw += chunk
    os.close(out_r)
    os.waitpid(pid, 0)
    return json.loads(raw) if raw else {"error": "the load child reported nothing"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--teams", type=int, default=200)
    ap.add_argument("--reservations", type=int, default=50_000)
    ap.add_argument("--hammer-estimate", action="store_true",
                    help="time the requests again while an unprivileged user hammers "
                         "`estimate` on 4 connections")
    ap.add_argument("--idle-connections", type=int, default=0, metavar="N",
                    help="... and/or holds N idle connections")
    ap.add_argument("--user-limits", type=int, default=None, metavar="M",
                    help="max_user_connections and max_connections_per_user for the bench")
    ap.add_argument("--alerts", action="store_true",
                    help="with the alert scan on (dry run, a round every second)")
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                    help="the ledger: a SQLite file (default) or a PostgreSQL server started "
                         "for the run")
    args = ap.parse_args()
    load = args.hammer_estimate or args.idle_connections > 0
    if load and os.geteuid() != 0:
        raise SystemExit("--hammer-estimate/--idle-connections run the load as another user: "
                         "run the bench as root")
    state = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    if load:
        os.chmod(state, 0o755)  # the unprivileged child must reach the socket (mode 0666)
    members = ["u", user_of(1000)]  # the daemon names a job's user from its uid when it can
    if load:
        members.append(unprivileged_user().pw_name)
    pg_dir: Path | None = None
    ledger: str = str(state / "sg.db")
    if args.database == "postgresql":
        os.chmod(state, 0o755)  # the server runs as `postgres`
        ledger, pg_dir = start_postgresql(state)
    (state / "policy.toml").write_text(policy_text(state, args.teams, args.user_limits,
                                                   members, ledger)
                                       + (ALERTS if args.alerts else ""))
    t0 = time.perf_counter()
    fill(ledger, args.teams, args.reservations)
    fill_s = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "slurm_plugin.cli", "--config",
                             str(state / "policy.toml"), "daemon"], env=env,
                            stderr=subprocess.DEVNULL)
    loaded: dict[str, Any] | None = None
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
        quiet = measure(conn, args.requests, args.teams, rng)
        if load:
            child = start_load(str(state / "sg.sock"), args.teams, args.hammer_estimate,
                               args.idle_connections)
            try:
                loaded = measure(conn, args.requests, args.teams, rng, args.requests)
            finally:
                loaded_stats = stop_load(*child)
            loaded["load"] = {"hammer_estimate": args.hammer_estimate,
                              "idle_connections": args.idle_connections,
                              "user_limits": args.user_limits, **loaded_stats}
    finally:
        proc.terminate()
        proc.wait(10)
        if pg_dir is not None:
            stop_postgresql(pg_dir)
    inner = [json.loads(line)["latency_ms"] for line in
             (state / "daemon.log").read_text().splitlines() if '"event": "decision"' in line]
    quiet["daemon_decision_ms"] = {"p50": pct(inner[:args.requests], 50),
                                   "p99": pct(inner[:args.requests], 99)}
    out: dict[str, Any] = {
        "database": args.database, "teams": args.teams,
        "live_reservations_at_start": args.reservations,
        "reserved_total_at_start": round(reserved_total, 2), "fill_s": round(fill_s, 2),
        "requests": args.requests, **quiet,
    }
    if loaded is not None:
        rest = inner[args.requests:] or [float("nan")]
        loaded["daemon_decision_ms"] = {"p50": pct(rest, 50), "p99": pct(rest, 99)}
        out["under_load"] = loaded
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
