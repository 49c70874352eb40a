"""Benchmark of the chargeback export (db/chargeback/export.py): one month, 100,000 and
1,000,000 runs.

    python3 bench/bench_export.py --runs 100000,1000000 --jobs 1,0
    python3 bench/bench_export.py --runs 100000 --postgresql postgresql://user:pw@host/db

Databases come from bench/bench_db.py's generator (settled runs, all ending in November 2026,
some starting in October so the month's edge is split; ``--reuse`` keeps them in ``--dir``).
``--postgresql URL`` also copies those runs into the (scratch!) PostgreSQL database at URL,
replacing its runs, and exports from there too: same runs, so the same files (checked).
Each export runs in a fresh process (``python -c``), so its peak memory is its own: the
parent's ``ru_maxrss`` and, with worker processes, the largest worker's. ``--jobs 0`` means
the default (one worker per CPU, at most 8). Formats: CSV + JSON Lines (+ Parquet only when
pyarrow imports and ``--parquet`` is given). Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Peak memory: VmHWM of the export process itself (ru_maxrss would carry the high-water mark
# of whatever process exec'd it), ru_maxrss of its reaped worker processes.
_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from db.chargeback.export import export_period
from db.chargeback.periods import month_period
t = time.perf_counter()
res = export_period({db!r}, month_period(2026, 11), {out!r}, jobs={jobs!r}, parquet={parquet!r})
wall = time.perf_counter() - t
print(json.dumps({{
    "wall": wall, "runs": res.runs,
    "rss_self_mb": int(next(l.split()[1] for l in open("/proc/self/status")
                            if l.startswith("VmHWM"))) / 1024,
    "rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "cpu": sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime")),
    "bytes": {{k: v["bytes"] for k, v in res.manifest["files"].items()}},
    "sha256": {{k: v["sha256"] for k, v in res.manifest["files"].items()}},
    "net": res.manifest["totals"]["net"],
}}))
"""


_BUILD = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r}); sys.path.insert(0, {here!r})
import bench_db
store, _ = bench_db.build_query_db(Path({db!r}), {n!r}, {reuse!r})
store.close()
"""


def build_db(db: Path, n: int, reuse: bool) -> None:
    """In a child process: building the database uses a 2 GB page cache."""
    subprocess.run([sys.executable, "-c", _BUILD.format(repo=str(REPO), here=str(HERE),
                                                        db=str(db), n=n, reuse=reuse)],
                   check=True)


_COPY_TABLES = ("runs", "run_progress")
_COPY_BATCH = 20_000


def load_postgresql(db: Path, url: str, n: int, reuse: bool) -> None:
    """The runs (and run progress) of the SQLite database ``db`` into the PostgreSQL ledger
    at ``url``, replacing what its tables held (a scratch database: the rollups are left
    alone, the export does not read them)."""
    sys.path.insert(0, str(REPO))
    from db.chargeback.export import one_snapshot, read_batches
    from db.store import open_store

    src = open_store(db, readonly=True)
    dst = open_store(url)
    try:
        if reuse and dst.conn.scalar("SELECT count(*) FROM runs") == n:
            return
        t = time.perf_counter()
        with dst.transaction():
            for table in _COPY_TABLES:
                dst.conn.execute(f"DELETE FROM {table}")
            for table in _COPY_TABLES:
                cols = [d[0] for d in src.conn.execute(
                    f"SELECT * FROM {table} LIMIT 0").description]
                names = ", ".join(f'"{c}"' for c in cols)
                insert = (f"INSERT INTO {table} ({names}) "
                          f"VALUES ({', '.join(f':{c}' for c in cols)})")
                with one_snapshot(src.conn):
                    for rows in read_batches(src.conn, f"SELECT * FROM {table}", {},
                                             _COPY_BATCH):
                        dst.conn.executemany(insert, [dict(zip(cols, r, strict=True))
                                                      for r in rows])
        dst.conn.execute("ANALYZE runs")
        print(f"copied {n:,} runs into PostgreSQL in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
    finally:
        src.close()
        dst.close()


def server_version(target: str) -> str:
    """``SQLite 3.40.1`` or ``PostgreSQL 15.x`` of the ledger at ``target``."""
    sys.path.insert(0, str(REPO))
    from db.store import open_store

    with open_store(target, readonly=True) as store:
        if store.dialect == "postgresql":
            return f"PostgreSQL {store.conn.scalar('SHOW server_version')}"
        return f"SQLite {store.conn.scalar('SELECT sqlite_version()')}"


def run_export(db: Path | str, out: Path, jobs: int | None, parquet: bool) -> dict[str, Any]:
    code = _CHILD.format(repo=str(REPO), db=str(db), out=str(out), jobs=jobs, parquet=parquet)
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = load
    return result


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="100000,1000000", help="comma-separated run counts")
    ap.add_argument("--jobs", default="1,0", help="comma-separated worker counts (0: default)")
    ap.add_argument("--dir", default="/tmp/slurmgate-bench", help="databases and exports")
    ap.add_argument("--reuse", action="store_true", help="reuse databases of the same size")
    ap.add_argument("--parquet", action="store_true", help="also write Parquet (pyarrow)")
    ap.add_argument("--repeat", type=int, default=1, help="exports per setting (best wall)")
    ap.add_argument("--postgresql", metavar="URL",
                    help="also export from this scratch PostgreSQL database (its runs are "
                         "replaced by the generated ones)")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[int, str, int, dict[str, Any]]] = []
    servers: list[str] = []
    for n in [int(x) for x in args.runs.split(",") if x.strip()]:
        db = work / f"export-{n}.db"
        t = time.perf_counter()
        build_db(db, n, args.reuse)
        print(f"database with {n:,} runs ready in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        targets: list[str] = [str(db)]
        if args.postgresql:
            load_postgresql(db, args.postgresql, n, args.reuse)
            targets.append(args.postgresql)
        for target in targets:
            server = server_version(target)
            if server not in servers:
                servers.append(server)
            ledger = server.split()[0]
            for jobs in [int(x) for x in args.jobs.split(",") if x.strip()]:
                best: dict[str, Any] | None = None
                for _ in range(args.repeat):
                    r = run_export(target, work / f"out-{n}-{jobs}-{ledger}", jobs or None,
                                   args.parquet)
                    if best is None or r["wall"] < best["wall"]:
                        best = r
                assert best is not None
                same = [b for m, _, j, b in rows if m == n and j == (jobs or min(cpus(), 8))]
                if same and same[0]["sha256"] != best["sha256"]:
                    raise SystemExit(f"{n:,} runs: the {ledger} export's files differ from "
                                     "the SQLite export's")
                rows.append((n, ledger, jobs or min(cpus(), 8), best))
                print(f"{n:,} runs, {ledger}, jobs {jobs or 'default'}: {best['wall']:.1f} s",
                      file=sys.stderr)
    print(report(args, rows, servers))


def report(args: argparse.Namespace, rows: list[tuple[int, str, int, dict[str, Any]]],
           servers: list[str]) -> str:
    lines = ["## Exports", ""]
    lines.append(f"Command: `python3 bench/bench_export.py --runs {args.runs} --jobs {args.jobs}"
                 f"{' --parquet' if args.parquet else ''} --repeat {args.repeat}"
                 f"{' --postgresql URL' if args.postgresql else ''}` "
                 f"(best of {args.repeat})  ")
    lines.append(f"Python {platform.python_version()}, {', '.join(servers)}, "
                 f"{cpus()} CPUs, {platform.platform()}. One month (November 2026) of settled "
                 "runs from bench_db's generator; CSV + JSON Lines for runs and the five "
                 "aggregates, manifest with sha256 of every file, atomic swap into place; "
                 "each export in a fresh process.")
    lines.append("")
    lines.append("| runs | ledger | worker processes | wall s | CPU s (all processes) | runs/s | "
                 "peak RSS parent MiB | peak RSS largest worker MiB | runs.csv MiB | "
                 "runs.jsonl MiB | load avg before |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, ledger, jobs, r in rows:
        workers = f"{r['rss_workers_mb']:.0f}" if jobs > 1 else "-"
        lines.append(f"| {n:,} | {ledger} | {jobs} | {r['wall']:.1f} | {r['cpu']:.1f} | "
                     f"{n / r['wall']:,.0f} | {r['rss_self_mb']:.0f} | {workers} | "
                     f"{r['bytes']['runs.csv'] / 2**20:.0f} | "
                     f"{r['bytes']['runs.jsonl'] / 2**20:.0f} | {r['load']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
