"""``slurmgate db migrate --to postgresql://...``: move a site's SQLite ledger to PostgreSQL.

Run it as root (or the service user) with the daemon stopped: it takes the SQLite writer's
lock for the whole copy, so a daemon that starts meanwhile refuses to run. The target is a
PostgreSQL database the slurmgate role owns; its tables are made at this slurmgate's schema,
the rows are copied in one transaction and then compared (db/ledger_copy.py). Nothing in
the SQLite file changes: rolling back is pointing ``[daemon] database`` at it again.
"""

from __future__ import annotations

import argparse
import json
import sys

from db.backend import is_postgresql, redact


def cmd_db(args: argparse.Namespace, policy_ledger: str) -> int:
    from db.ledger_copy import copy_ledger, describe
    from db.store import StoreError, open_store
    from slurm_plugin.daemon.server import DaemonRunning, lock_database

    source = args.source or policy_ledger
    target = args.to
    if args.to_file:
        with open(args.to_file, encoding="utf-8") as f:
            target = f.read().strip()
    if not target or not is_postgresql(target):
        print("slurmgate db migrate: --to needs a postgresql:// URL (or --to-file FILE)",
              file=sys.stderr)
        return 2
    if is_postgresql(source):
        print(f"slurmgate db migrate: the source {redact(source)} is already PostgreSQL; "
              "give the SQLite file with --from", file=sys.stderr)
        return 2
    try:
        lock_fd = lock_database(source)
    except (DaemonRunning, OSError) as exc:
        print(f"slurmgate db migrate: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            src = open_store(source, readonly=True)
            dst = open_store(target)
        except StoreError as exc:
            print(f"slurmgate db migrate: {exc}", file=sys.stderr)
            return 2
        with src, dst:
            def progress(table: str, n: int) -> None:
                if not args.quiet and n % 50_000 == 0:
                    print(f"  {table}: {n:,} rows", file=sys.stderr)

            try:
                report = copy_ledger(src, dst, replace=args.replace, progress=progress)
            except StoreError as exc:
                print(f"slurmgate db migrate: {exc}", file=sys.stderr)
                return 2
    finally:
        if lock_fd is not None:
            import os

            os.close(lock_fd)
    if args.json:
        print(json.dumps({"source": source, "target": redact(target), **describe(report)},
                         indent=2))
    else:
        print(f"copied {source} -> {redact(target)}")
        print("\n".join(report.lines()))
        print("verified: rows and totals match" if not report.mismatches
              else "NOT verified: see the mismatches above")
    return 0 if not report.mismatches else 1


def add_parser(sub: argparse._SubParsersAction, func: object) -> None:
    sp = sub.add_parser("db", help="the ledger: move it to PostgreSQL (db migrate --to URL)",
                        description="the ledger: move it to PostgreSQL")
    dbsub = sp.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    mp = dbsub.add_parser("migrate", help="copy the SQLite ledger into a PostgreSQL database "
                          "and verify counts and totals (the daemon stopped)")
    mp.set_defaults(func=func)
    mp.add_argument("--to", help="postgresql://USER:PASSWORD@HOST:PORT/DB")
    mp.add_argument("--to-file", metavar="FILE",
                    help="a file holding the URL (keeps the password off the command line)")
    mp.add_argument("--from", dest="source", metavar="PATH",
                    help="the SQLite ledger (default [daemon] database)")
    mp.add_argument("--replace", action="store_true",
                    help="empty a target that already holds rows first")
    mp.add_argument("--json", action="store_true")
    mp.add_argument("-q", "--quiet", action="store_true")
