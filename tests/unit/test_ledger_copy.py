"""Moving a site's SQLite ledger into PostgreSQL (db/ledger_copy.py, ``slurmgate db
migrate``): every row, the ids, the money and the named reads come out the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from db.alert_log import AlertLog, NewAlert, NewSend
from db.ingest import ingest_records
from db.ledger_copy import TABLES, copy_ledger
from db.reports import quota_rows
from db.store import StoreError, open_store
from tests.unit.test_db_ingest import make_jobcomp, make_node_run, make_policy, make_sample

REPO = Path(__file__).resolve().parents[2]


def filled_sqlite(path: Path) -> Any:
    policy = make_policy()
    store = open_store(path)
    records: list[dict[str, Any]] = []
    for n in range(40):
        records += [make_jobcomp(500 + n, state="NODE_FAIL" if n % 7 == 0 else "COMPLETED"),
                    make_node_run(500 + n, gpus=1 + n % 4)]
    records.append(make_sample())
    ingest_records(store, records, policy)
    now = time.time()
    for n in range(5):
        store.add_reservation({"cluster": "c1", "team": "vision", "est_cost": 1.25 * n,
                               "tags": {"project": "p"}, "user": "vera"}, now=now)
    aid = store.add_approval(team="vision", expires_at=now + 86400, amount=100.0, reason="x")
    store.use_approval(aid, 12.5)
    store.add_event("admin_action", cluster="c1", message="drain node1", actor="root")
    log = AlertLog(store)
    log.record([NewAlert("budget:vision:2026-12:80", "budget_threshold", "vision at 80 %",
                         "body", now, cluster="c1", team="vision",
                         sends=(NewSend("mail", "lead@example.org", {"to": ["lead"]}),),
                         covers=("budget:vision:2026-12:50",))], now=now,
               cursor=("events", 1))
    return store, policy


def test_copy_gives_the_same_ledger(tmp_path: Path, pg_url: str) -> None:
    src, policy = filled_sqlite(tmp_path / "site.db")
    dst = open_store(pg_url)
    report = copy_ledger(src, dst)
    assert report.mismatches == []
    for table in TABLES:
        assert report.rows[table] == src.conn.scalar(f'SELECT count(*) FROM "{table}"'), table
    assert report.rows["runs"] == 40 and report.rows["reservations"] == 5
    assert report.rows["events"] >= 3
    start, end = 0.0, time.time() + 86400
    assert quota_rows(dst, start, end) == quota_rows(src, start, end)
    assert dst.approvals(active_only=False) == src.approvals(active_only=False)
    assert dst.spend_by_team(start, end) == src.spend_by_team(start, end)
    # ids continue after the copied ones: a new event does not collide
    before = int(dst.conn.scalar("SELECT max(id) FROM events"))
    assert dst.add_event("admin_action", message="after the move") == before + 1
    # a second copy into the same ledger is refused; --replace copies again
    with pytest.raises(StoreError, match="not empty"):
        copy_ledger(src, dst)
    assert copy_ledger(src, dst, replace=True).mismatches == []
    src.close()
    dst.close()


def test_the_cli_copies_verifies_and_refuses_while_a_daemon_writes(tmp_path: Path,
                                                                   pg_url: str) -> None:
    src, _ = filled_sqlite(tmp_path / "site.db")
    src.close()
    url_file = tmp_path / "ledger.url"
    url_file.write_text(pg_url + "\n")
    os.chmod(url_file, 0o600)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[daemon]\ndatabase = "{tmp_path / "site.db"}"\ncluster = "c1"\n'
                      '[rates.gpu_hour]\na100 = 2.0\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "slurm_plugin.cli", "--config", str(policy), "db", "migrate",
           "--to-file", str(url_file), "--json"]
    from slurm_plugin.daemon.server import lock_database

    fd = lock_database(str(tmp_path / "site.db"))  # a daemon is running on the file
    try:
        busy = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    finally:
        assert fd is not None
        os.close(fd)
    assert busy.returncode == 1 and "another slurmgate daemon" in busy.stderr
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["verified"] is True and out["rows"]["runs"] == 40
    assert "***" in out["target"] and pg_url.split("@")[0].split(":")[-1] not in out["target"]
    with open_store(pg_url, readonly=True) as dst:
        assert dst.run_count() == 40
