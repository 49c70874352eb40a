"""Benchmark of the accounting store (db/): ingest rate and month-long report queries.

    python3 bench/bench_db.py --runs 50000 --query-runs 1000000,10000000

(a) Ingest: ``--runs`` jobs, each a jobcomp plus one node_run record (4 GPUs), every job with a
    bound reservation, fed to ``ingest_records`` in batches of ``--batch`` records in the order
    they would reach the spool (a jobcomp and its epilog usually share a batch, sometimes not).
    Baseline in the same run: one record per call (a transaction each), on fewer jobs.
(b) Queries: ``--query-runs`` settled runs per database, ALL ending in the queried month (the
    worst case: the month holds every row), generated with a recursive CTE straight into the
    runs table, then the daily rollup built with the v3 migration's SQL. Timed: the month's
    chargeback by team and project from the rollup (UTC month, and a month in UTC-5 whose
    edges come from the runs table), the same from the runs table alone (the naive baseline:
    an index range scan on end_ts), the daemon's ledger inputs (quota_rows and fairshare
    usage). Databases live in ``--dir`` (default /tmp/slurmgate-bench); ``--reuse`` keeps a
    database generated earlier with the same row count.

``--database postgresql://...`` runs (a) on that PostgreSQL database instead (its ledger
tables are emptied first, and between the two ingest runs); (b) stays on SQLite.

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import ingest_records, open_store  # noqa: E402
from db.backend import is_postgresql, redact  # noqa: E402
from db.reports import chargeback, quota_rows  # noqa: E402
from db.schema import SCHEMA_V3, SCHEMA_V4, split_statements  # noqa: E402
from db.store import Store  # noqa: E402
from policies.config import Policy  # noqa: E402

DAY = 86400.0
MONTH_START = 1_793_491_200.0  # 2026-11-01 00:00 UTC
MONTH_END = 1_796_083_200.0  # 2026-12-01 00:00 UTC
EST = 5 * 3600.0  # UTC-5: a month in local time starts at 05:00 UTC
RATES = {"a100": 2.0, "h100": 4.0, "l40s": 1.0}

POLICY = Policy.model_validate({
    "daemon": {"cluster": "c1"},
    "teams": {f"t{i}": {"accounts": [f"acct{i}"], "cost_center": f"CC{i}"} for i in range(20)},
    "rates": {"gpu_hour": RATES, "cpu_core_hour": 0.01, "mem_gb_hour": 0.002, "kwh": 0.1},
    "partitions": {"gpu": {"default_gpu_type": "a100"},
                   "scavenger": {"default_gpu_type": "a100", "price_factor": 0.3}},
})


def fresh(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def fresh_store(workdir: Path, name: str, database: str | None) -> Store:
    """An empty ledger: a new SQLite file ``name`` in workdir, or the PostgreSQL database
    ``database`` with every ledger table emptied (the schema and its migrations kept)."""
    if database is None:
        path = workdir / name
        fresh(path)
        return open_store(path)
    store = open_store(database)
    tables = [r["t"] for r in store._query(
        "SELECT tablename AS t FROM pg_tables WHERE schemaname = current_schema() "
        "AND tablename != 'schema_migrations'")]
    if tables:
        store.conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
    return store


# -- (a) ingest ------------------------------------------------------------------------------


def job_records(n: int, first_job: int = 1) -> list[dict[str, Any]]:
    """Spool records of n finished jobs, in arrival order."""
    arrivals: list[tuple[float, dict[str, Any]]] = []
    for k in range(n):
        job_id = first_job + k
        end = MONTH_START + 3600 + k * 0.05  # 20 jobs end per second
        start = end - 600 - (k * 7919) % 7200
        node = f"node{k % 64}"
        gpu_type = ("a100", "h100")[k % 2]
        arrivals.append((end + 0.2, {
            "v": 1, "kind": "jobcomp", "record_id": uuid.uuid4().hex, "cluster": "c1",
            "written_at": end + 0.2, "job_id": job_id, "restart_count": None,
            "state": "COMPLETED", "submit_ts": start - 30, "start_ts": start, "end_ts": end,
            "nodes": node, "node_count": 1, "partition": "gpu", "uid": 1000 + k % 50,
            "user": f"u{k % 50}", "account": f"acct{k % 20}", "exit_code": "0:0",
            "derived_ec": "0:0", "time_limit_min": 240, "array_job_id": None,
            "array_task_id": None, "work_dir": "/home/u",
        }))
        arrivals.append((end + 0.3 + (k % 97) * 0.05, {
            "v": 1, "kind": "node_run", "record_id": uuid.uuid4().hex, "cluster": "c1",
            "written_at": end + 1, "job_id": job_id, "restart_count": 0, "node": node,
            "user": f"u{k % 50}", "account": f"acct{k % 20}", "start_ts": start,
            "end_ts": end + 1,
            "gpus": [{"index": i, "minor": i, "uuid": f"GPU-{node}-{i}", "gpu_type": gpu_type,
                      "energy_j": 250.0 * (end - start), "util_mean": float(40 + 13 * i),
                      "util_max": 100.0, "mem_max_bytes": 40 * 2**30,
                      "gpu_seconds": end + 1 - start} for i in range(4)],
        }))
    arrivals.sort(key=lambda a: a[0])
    return [r for _, r in arrivals]


def add_reservations(store: Store, n: int, first_job: int = 1) -> None:
    with store.transaction():
        store.conn.executemany(
            "INSERT INTO reservations (rid, cluster, job_id, team, project, cost_center, "
            "\"user\", account, \"partition\", tags, gpu_type, gpus, cpus, mem_mb, "
            "time_limit_min, tasks, est_cost, state, period, created_at, updated_at) "
            "VALUES (:rid, 'c1', :job_id, :team, :project, :cost_center, :user, :account, "
            "'gpu', '{}', :gpu_type, 4, 32, 256000, 240, 1, 50, 'bound', '2026-11', :ts, :ts)",
            [{"rid": uuid.uuid4().hex, "job_id": first_job + k, "team": f"t{k % 20}",
              "project": f"p{k % 20}-{k % 3}", "cost_center": f"CC{k % 20}",
              "user": f"u{k % 50}", "account": f"acct{k % 20}",
              "gpu_type": ("a100", "h100")[k % 2], "ts": MONTH_START - DAY}
             for k in range(n)])


def bench_ingest(workdir: Path, runs: int, batch: int, baseline_runs: int,
                 database: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs, "batch": batch}
    store = fresh_store(workdir, "ingest.db", database)
    if database is not None:
        out["server"] = store.conn.scalar("SHOW server_version")
    add_reservations(store, runs)
    records = job_records(runs)
    out["records"] = len(records)
    t = time.perf_counter()
    errors = settled = 0
    for i in range(0, len(records), batch):
        res = ingest_records(store, records[i:i + batch], POLICY)
        errors += len(res.errors)
        settled += len(res.settled)
    out["seconds"] = time.perf_counter() - t
    out["errors"], out["settled"] = errors, settled
    unsettled = store.conn.execute("SELECT count(*) FROM runs WHERE cost IS NULL").fetchone()[0]
    out["unsettled"] = unsettled
    # the same records again: every one a duplicate, nothing written
    t = time.perf_counter()
    dups = 0
    for i in range(0, len(records), batch):
        dups += ingest_records(store, records[i:i + batch], POLICY).duplicates
    out["replay_seconds"] = time.perf_counter() - t
    out["replay_duplicates"] = dups
    store.close()

    # naive baseline: one record per ingest call (one transaction per record)
    store = fresh_store(workdir, "ingest-one-by-one.db", database)
    add_reservations(store, baseline_runs)
    records = job_records(baseline_runs)
    t = time.perf_counter()
    for rec in records:
        ingest_records(store, [rec], POLICY)
    out["baseline_runs"] = baseline_runs
    out["baseline_seconds"] = time.perf_counter() - t
    store.close()
    return out


# -- (b) queries -----------------------------------------------------------------------------

_GENERATE = """
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < :n - 1),
h AS (SELECT i, (i * 2654435761) % 4294967296 AS h FROM seq),
d AS (
    SELECT i, h, h % 500 AS u, (h % 500) % 20 AS t,
           CASE (h >> 12) % 3 WHEN 0 THEN 'a100' WHEN 1 THEN 'h100' ELSE 'l40s' END AS gt,
           CASE WHEN (h >> 15) % 10 < 8 THEN 'gpu' ELSE 'scavenger' END AS part,
           1 << ((h >> 18) % 4) AS gpus,
           300 + (h >> 20) % 36000 AS dur,
           (h >> 7) % 101 AS util,
           (h >> 25) % 50 = 0 AS failed,
           :start + (i + 0.5) * (:span / :n) AS end_ts
    FROM h
),
c AS (
    SELECT *, CASE part WHEN 'gpu' THEN 1.0 ELSE 0.3 END AS f,
           CASE gt WHEN 'a100' THEN 2.0 WHEN 'h100' THEN 4.0 ELSE 1.0 END AS rate
    FROM d
),
m AS (
    SELECT *, round(gpus * dur / 3600.0 * rate * f, 6) AS cg,
           round(gpus * 8 * dur / 3600.0 * 0.01 * f, 6) AS cc,
           round(gpus * 64 * dur / 3600.0 * 0.002 * f, 6) AS cm,
           round(gpus * dur * 300.0 / 3600000.0 * 0.1 * f, 6) AS ce
    FROM c
)
INSERT INTO runs (cluster, job_id, restart_count, submit_ts, start_ts, end_ts, state,
    exit_code, derived_ec, "user", uid, account, team, project, cost_center, tags,
    "partition", nodes, node_count, gpu_type, gpus, cpus, mem_mb, time_limit_min,
    gpu_seconds, energy_j, util_mean, cost, cost_gpu, cost_cpu, cost_mem, cost_energy,
    cost_idle, credit, credit_reason, settled_at, jobcomp_at, updated_at)
SELECT 'c1', 1000000 + i, 0, end_ts - dur - 60, end_ts - dur, end_ts,
    CASE WHEN failed THEN 'NODE_FAIL' ELSE 'COMPLETED' END, '0:0', '0:0',
    'u' || u, 1000 + u, 'acct' || t, 't' || t,
    'p' || t || '-' || ((u / 20 + (h >> 9) % 2) % 5), 'CC' || t, '{}', part,
    'node' || (h % 256), 1, gt, gpus, gpus * 8, gpus * 65536, 720,
    gpus * dur, gpus * dur * 300.0, util, cg + cc + cm + ce, cg, cc, cm, ce,
    round(cg * (1.0 - util / 100.0), 6),
    CASE WHEN failed THEN cg + cc + cm + ce ELSE 0 END,
    CASE WHEN failed THEN 'node_failure' END, end_ts + 5, end_ts + 1, end_ts + 5
FROM m
"""


def build_query_db(path: Path, n: int, reuse: bool) -> tuple[Store, dict[str, float]]:
    """A database of n settled runs ending in the month, and its daily rollups.

    To stay within minutes on a small machine, one tenth of the runs (3 of the 30 days) is
    generated by the CTE and the rollups of that block are built by the v3/v4 migrations'
    backfill SQL; the other nine blocks are copies shifted by 3 days (job ids shifted too),
    rollup rows included. The chargeback from the rollups is checked against the runs table.
    """
    timings: dict[str, float] = {}
    if reuse and path.exists():
        store = open_store(path)
        have = store.conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        if have == n:
            return store, timings
        store.close()
    fresh(path)
    store = open_store(path)
    conn = store.conn
    # SQLite's own bench: PRAGMAs and the table_info catalog below are SQLite's
    # bulk load only: no WAL copy of millions of rows, a big page cache
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -2000000")
    blocks = 10 if n % 10 == 0 else 1
    base = n // blocks
    shift_days = round((MONTH_END - MONTH_START) / DAY) // blocks
    shift = shift_days * DAY
    t = time.perf_counter()
    with conn.transaction():
        conn.execute(_GENERATE, {"n": base, "start": MONTH_START, "span": shift * (blocks > 1)
                                 or MONTH_END - MONTH_START})
    timings[f"generate {base:,} runs"] = time.perf_counter() - t
    t = time.perf_counter()
    tables = []
    with conn.transaction():
        for sql in (SCHEMA_V3, SCHEMA_V4):  # the migrations' INSERT ... SELECT backfills
            for statement in split_statements(sql):
                if statement.startswith("INSERT INTO"):
                    tables.append(statement.split()[2])
                    conn.execute(f"DELETE FROM {tables[-1]}")
                    conn.execute(statement)
    timings["build their rollups"] = time.perf_counter() - t
    if blocks > 1:
        t = time.perf_counter()
        cols = [r[1] for r in conn.execute("PRAGMA table_info(runs)").fetchall()]
        moved = {"job_id": "job_id + :k * :base"}
        moved.update({c: f"{c} + :k * :shift" for c in
                      ("submit_ts", "start_ts", "end_ts", "settled_at", "jobcomp_at",
                       "updated_at")})
        names = ", ".join(f'"{c}"' for c in cols)
        select = ", ".join(moved.get(c, f'"{c}"') for c in cols)
        with conn.transaction():
            for k in range(1, blocks):
                conn.execute(f"INSERT INTO runs ({names}) SELECT {select} FROM runs "
                             "WHERE job_id < 1000000 + :base",
                             {"k": k, "base": base, "shift": shift})
                for table in tables:
                    tcols = [r[1] for r in
                             conn.execute(f"PRAGMA table_info({table})").fetchall()]
                    tnames = ", ".join(f'"{c}"' for c in tcols)
                    tselect = ", ".join("day + :k * :d" if c == "day" else f'"{c}"'
                                        for c in tcols)
                    conn.execute(f"INSERT INTO {table} ({tnames}) SELECT {tselect} "
                                 f"FROM {table} WHERE day < :first + :d",
                                 {"k": k, "d": shift_days, "first": round(MONTH_START / DAY)})
        timings[f"copy {blocks - 1} blocks"] = time.perf_counter() - t
    t = time.perf_counter()
    conn.execute("PRAGMA analysis_limit = 1000")
    conn.execute("ANALYZE")
    timings["ANALYZE"] = time.perf_counter() - t
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    store.close()
    return open_store(path), timings


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(first, best of repeat, result) in seconds."""
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return times[0], min(times), result


def bench_queries(workdir: Path, n: int, reuse: bool, repeat: int) -> dict[str, Any]:
    path = workdir / f"runs-{n}.db"
    store, build = build_query_db(path, n, reuse)
    reader = open_store(path, readonly=True)
    out: dict[str, Any] = {"n": n, "build": build, "queries": {},
                           "file_mb": os.path.getsize(path) / 2**20,
                           "rollup_rows": reader.conn.execute(
                               "SELECT count(*) FROM usage_daily").fetchone()[0]}
    q = out["queries"]
    span = (MONTH_START, MONTH_END)
    local = (MONTH_START + EST, MONTH_END + EST)
    q["chargeback team+project, UTC month (rollup)"] = timed(
        lambda: chargeback(reader, *span, ("team", "project")), repeat)
    q["chargeback team+project, UTC-5 month (rollup + edges)"] = timed(
        lambda: chargeback(reader, *local, ("team", "project")), repeat)
    q["chargeback team+project+user, UTC month (rollup)"] = timed(
        lambda: chargeback(reader, *span, ("team", "project", "user")), repeat)
    q["quota_rows (daemon ledger), UTC-5 month"] = timed(
        lambda: quota_rows(reader, *local), repeat)
    q["team_usage_gpu_hours, 70 days (fairshare)"] = timed(
        lambda: reader.team_usage_gpu_hours(MONTH_END - 70 * DAY, now=MONTH_END), repeat)
    naive = "NAIVE: chargeback team+project, UTC month (runs table)"
    q[naive] = timed(lambda: chargeback(reader, *span, ("team", "project"), use_rollup=False),
                     1 if n > 2_000_000 else max(1, repeat - 1))
    # the rollup and the scan must agree
    fast = q["chargeback team+project, UTC month (rollup)"][2]
    slow = q[naive][2]
    out["agree"] = len(fast) == len(slow) and all(
        a["runs"] == b["runs"] and abs(a["net"] - b["net"]) <= 1e-6 * max(1.0, b["net"])
        and a["team"] == b["team"] and a["project"] == b["project"]
        for a, b in zip(fast, slow, strict=True))
    out["groups"] = len(q["chargeback team+project, UTC month (rollup)"][2])
    out["month_runs"] = sum(r["runs"] for r in q["chargeback team+project, UTC month (rollup)"][2])
    reader.close()
    store.close()
    return out


# -- report ----------------------------------------------------------------------------------


def report(args: argparse.Namespace, ing: dict[str, Any] | None,
           queries: list[dict[str, Any]]) -> str:
    lines = ["## Accounting store (db)", ""]
    cmd = "python3 bench/bench_db.py " + " ".join(redact(a) for a in sys.argv[1:])
    lines += [f"Command: `{cmd.strip()}`  ",
              f"Python {platform.python_version()}, SQLite {__import__('sqlite3').sqlite_version},"
              f" {os.cpu_count()} CPUs, {platform.platform()}; database files in {args.dir}.",
              ""]
    if ing:
        rate = ing["runs"] / ing["seconds"]
        base = ing["baseline_runs"] / ing["baseline_seconds"]
        if "server" in ing:
            lines += [f"Ingest on PostgreSQL {ing['server']} ({redact(args.database)}).", ""]
        lines += [
            "| ingest | runs | records | seconds | runs/s | records/s |",
            "|---|---:|---:|---:|---:|---:|",
            f"| batches of {ing['batch']} records | {ing['runs']} | {ing['records']} | "
            f"{ing['seconds']:.2f} | {rate:,.0f} | {ing['records'] / ing['seconds']:,.0f} |",
            f"| replay of the same records (all duplicates) | {ing['runs']} | {ing['records']} "
            f"| {ing['replay_seconds']:.2f} | {ing['runs'] / ing['replay_seconds']:,.0f} | "
            f"{ing['records'] / ing['replay_seconds']:,.0f} |",
            f"| NAIVE: one record per call | {ing['baseline_runs']} | "
            f"{2 * ing['baseline_runs']} | {ing['baseline_seconds']:.2f} | {base:,.0f} | "
            f"{2 * ing['baseline_runs'] / ing['baseline_seconds']:,.0f} |",
            "",
            f"Batched / one-by-one: {rate / base:.1f}x. {ing['runs'] - ing['unsettled']} runs "
            f"settled, {ing['settled'] - ing['runs'] + ing['unsettled']} of them twice (their "
            f"epilog came in a later batch than their jobcomp), {ing['unsettled']} unsettled, "
            f"{ing['errors']} errors; {ing['replay_duplicates']} duplicates on replay.",
            "",
        ]
    for qr in queries:
        lines += [f"Queries over {qr['n']:,} settled runs, all ending in one month "
                  f"({qr['file_mb']:,.0f} MiB file, {qr['rollup_rows']:,} usage_daily rows, "
                  f"{qr['groups']} team/project groups, rollup and scan agree: "
                  f"{'yes' if qr['agree'] else 'NO'}). Build: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in qr["build"].items())
                  + ("" if qr["build"] else "reused an earlier database") + ".", "",
                  "| query | first s | best s |", "|---|---:|---:|"]
        naive = None
        for name, (first, best, _) in qr["queries"].items():
            lines.append(f"| {name} | {first:.3f} | {best:.3f} |")
            if name.startswith("NAIVE"):
                naive = best
        fast = qr["queries"]["chargeback team+project, UTC month (rollup)"][1]
        if naive:
            lines += ["", f"Rollup vs naive scan (team+project, UTC month): "
                          f"{naive / fast:,.0f}x faster."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50_000, help="jobs to ingest (0 skips)")
    ap.add_argument("--batch", type=int, default=1000, help="records per ingest batch")
    ap.add_argument("--baseline-runs", type=int, default=2000,
                    help="jobs for the one-record-per-call baseline")
    ap.add_argument("--query-runs", default="1000000,10000000",
                    help="comma-separated run counts for the query databases ('' skips)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per query")
    ap.add_argument("--dir", default="/tmp/slurmgate-bench", help="where databases go")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse query databases of the same size from an earlier run")
    ap.add_argument("--clean", action="store_true", help="delete --dir at the end")
    ap.add_argument("--database", metavar="URL",
                    help="run the ingest on this postgresql:// database (its ledger tables are "
                         "emptied); the queries stay on SQLite")
    args = ap.parse_args()
    if args.database is not None and not is_postgresql(args.database):
        ap.error("--database takes a postgresql:// URL (SQLite files go in --dir)")
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    ing = None
    if args.runs > 0:
        ing = bench_ingest(workdir, args.runs, args.batch, min(args.baseline_runs, args.runs),
                           args.database)
        print(f"ingest: {args.runs / ing['seconds']:,.0f} runs/s", file=sys.stderr)
    queries = []
    for n in [int(x) for x in args.query_runs.split(",") if x.strip()]:
        queries.append(bench_queries(workdir, n, args.reuse, args.repeat))
        print(f"queries over {n:,} runs done", file=sys.stderr)
    print(report(args, ing, queries))
    if args.clean:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
