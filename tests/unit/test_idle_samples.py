"""Which job holds which GPU: the agent tags its samples from the Prolog baselines, the ingest
keeps the tag (gpu_samples.job_id, migration v9)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from db import ingest_records, open_store
from db.backend import SQLiteConnection
from db.schema import LATEST_VERSION, migrate
from policies.config import parse_policy
from slurm_plugin.node import agent, hooks, spool
from slurm_plugin.node.nvml import FakeNvml
from tests.unit.test_hooks import T0, node_env, write_config

POLICY = parse_policy("[rates.gpu_hour]\nh100 = 4.0\n")


SAMPLE_INSERT = ("INSERT INTO gpu_samples (node, gpu_uuid, ts, gpu_index, gpu_type, util, "
                 "mem_used_bytes, power_w, job_id) VALUES (:node, :uuid, :ts, :index, :type, "
                 ":util, :mem, :power, :job_id)")
SAMPLE_KEYS = ("node", "uuid", "ts", "index", "type", "util", "mem", "power", "job_id")


def sample(cfg: Path, now: float = T0 + 60) -> dict:
    settings = hooks.load_settings(str(cfg))
    backend = FakeNvml("node2", settings.nvml, clock=lambda: now)
    return agent.sample_once(settings, "node2", backend)


def tags(record: dict) -> dict[int, int | None]:
    return {g["index"]: g.get("job_id") for g in record["gpus"]}


@pytest.fixture(autouse=True)
def booted_long_ago(monkeypatch: pytest.MonkeyPatch) -> None:
    """The baselines here start at T0 (2025): this host booted before that, for these tests."""
    monkeypatch.setattr(hooks, "_boot_time", lambda: 0.0)


def prolog(cfg: Path, job_id: int, gpus: str, now: float) -> None:
    env = node_env(cfg, SLURM_JOB_ID=str(job_id), SLURM_JOB_GPUS=gpus)
    assert hooks.main(["prolog"], env=env, now=now) == 0


def test_each_sampled_gpu_carries_the_job_whose_baseline_lists_it(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    assert tags(sample(cfg)) == {0: None, 1: None, 2: None, 3: None}
    assert "job_id" not in sample(cfg)["gpus"][0]  # untagged readings keep their bytes
    prolog(cfg, 77, "1,3", T0)
    prolog(cfg, 78, "0", T0 + 5)
    assert tags(sample(cfg)) == {0: 78, 1: 77, 2: None, 3: 77}
    # the job ends: its Epilog removes the baseline, its GPUs are untagged again
    env = node_env(cfg, SLURM_JOB_ID="77", SLURM_JOB_GPUS="1,3")
    assert hooks.main(["epilog"], env=env, now=T0 + 100) == 0
    assert tags(sample(cfg)) == {0: 78, 1: None, 2: None, 3: None}


def test_a_left_over_baseline_loses_to_the_newer_job_on_the_same_gpu(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    prolog(cfg, 70, "1", T0 - 3600)  # its Epilog never ran
    prolog(cfg, 71, "1,2", T0)
    assert tags(sample(cfg)) == {0: None, 1: 71, 2: 71, 3: None}
    # only this node's baselines count
    other = tmp_path / "state" / "baseline" / "node9.99.json"
    other.write_bytes((tmp_path / "state" / "baseline" / "node2.70.json").read_bytes())
    assert tags(sample(cfg))[1] == 71


def test_a_baseline_from_before_this_boot_tags_nothing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that died under a job and came back still has that job's baseline (no Epilog
    ran): it must not tag the node's now idle GPUs with a job running elsewhere."""
    cfg = write_config(tmp_path)
    prolog(cfg, 72, "0,1", T0 - 600)
    prolog(cfg, 73, "2", T0 + 60)
    monkeypatch.setattr(hooks, "_boot_time", lambda: T0)
    assert tags(sample(cfg)) == {0: None, 1: None, 2: 73, 3: None}


def test_samples_from_a_node_the_job_no_longer_runs_on_are_not_its(ledger_target: str
                                                                     ) -> None:
    """The requeued job runs busy on node B; node A, where it failed, still reports idle
    GPUs tagged with its id: with Slurm's nodes given, only node B's samples count."""
    from db.idle import idle_summaries

    store = open_store(ledger_target)
    try:
        rows = [(node, f"{node}-{g}", T0 + k * 60 + 1, g, "a100", util, 0, None, 5)
                for k in range(10) for node, util in (("nodeA", 0.0), ("nodeB", 90.0))
                for g in range(4)]
        store.conn.executemany(SAMPLE_INSERT,
                               [dict(zip(SAMPLE_KEYS, r, strict=True)) for r in rows])
        wanted = {5: (T0, 4, 4)}
        anywhere = idle_summaries(store, wanted, width_s=60, threshold_percent=5)
        assert 5 in anywhere  # without the nodes, node A's idle GPUs make the job look idle
        assert idle_summaries(store, wanted, width_s=60, threshold_percent=5,
                              nodes={5: ["nodeB"]}) == {}
        assert 5 in idle_summaries(store, wanted, width_s=60, threshold_percent=5,
                                   nodes={5: ["nodeA"]})
    finally:
        store.close()


def test_a_baseline_that_is_not_the_prologs_own_file_is_not_read(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    prolog(cfg, 80, "0", T0)
    base = tmp_path / "state" / "baseline"
    os.chown(base / "node2.80.json", 65534, 65534)  # someone else's file
    (base / "node2.81.json").symlink_to(base / "node2.80.json")
    (base / "node2.82.json").write_text("{not json")
    (base / "node2.83.json").write_text('{"job_id": 99, "gpus": [{"uuid": "x"}]}')  # wrong id
    (base / "node2.junk.json").write_text("{}")
    assert tags(sample(cfg)) == {0: None, 1: None, 2: None, 3: None}
    assert hooks.gpu_holders(str(tmp_path / "nowhere"), "node2") == {}


def test_the_ingest_keeps_the_tag(tmp_path: Path, ledger_target: str) -> None:
    cfg = write_config(tmp_path)
    prolog(cfg, 77, "1,3", T0)
    rec = spool.prepare_record(sample(cfg))
    store = open_store(ledger_target)
    try:
        result = ingest_records(store, [rec], POLICY)
        assert result.errors == [] and result.counts == {"gpu_sample": 1}
        rows = store._query("SELECT gpu_index, job_id FROM gpu_samples ORDER BY gpu_index")
        assert rows == [{"gpu_index": 0, "job_id": None}, {"gpu_index": 1, "job_id": 77},
                        {"gpu_index": 2, "job_id": None}, {"gpu_index": 3, "job_id": 77}]
        assert ingest_records(store, [rec], POLICY).duplicates == 1  # idempotent
    finally:
        store.close()


def test_an_older_database_upgrades_with_its_samples_untagged(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = SQLiteConnection(sqlite3.connect(path), str(path))  # autocommit
    migrate(conn, target=5)
    conn.execute("INSERT INTO gpu_samples (node, gpu_uuid, ts, util) VALUES ('n1', 'G', 1, 3)")
    conn.close()
    store = open_store(path)
    try:
        assert store.schema_version == LATEST_VERSION
        assert store._query("SELECT gpu_uuid, util, job_id FROM gpu_samples") == [
            {"gpu_uuid": "G", "util": 3.0, "job_id": None}]
        plan = store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM gpu_samples WHERE job_id = 5 AND ts >= 0"
        ).fetchall()
        assert "gpu_samples_job_ts" in " ".join(str(r) for r in plan)
    finally:
        store.close()


def test_the_streaks_sql_agrees_with_the_rule(ledger_target: str) -> None:
    """db.idle.idle_summaries computes policies.idle.summarise in SQL: the same answer on
    random samples (GPUs that skip buckets, several readings a bucket, busy blips, jobs
    without samples, samples before the run's start)."""
    import random

    from db.idle import idle_summaries
    from policies.config import Idle
    from policies.idle import Bucket, IdleJob, required_idle, summarise

    rng = random.Random(20270101)
    width, threshold = 60.0, 5.0
    store = open_store(ledger_target)
    try:
        wanted: dict[int, tuple[float, int, int]] = {}
        expected: dict[int, object] = {}
        rows = []
        for job_id in range(1, 160):
            gpus = rng.choice((1, 2, 4, 8))
            idle = Idle(min_idle_fraction=rng.choice((1.0, 0.5, 0.25, 0.125)))
            since = rng.choice((0.0, 600.0, 1234.5))
            readings: dict[tuple[int, int], list[float]] = {}
            busy_bias = rng.random()
            for k in range(rng.randint(0, 40)):
                for g in range(gpus):
                    if rng.random() < 0.15:
                        continue  # this GPU did not report in this bucket
                    for _ in range(rng.choice((1, 1, 2))):
                        ts = k * width + rng.uniform(0, width - 1e-3)
                        util = rng.uniform(10, 99) if rng.random() < busy_bias * 0.3 \
                            else rng.choice((0.0, 1.0, 4.9))
                        rows.append(("n", f"G{job_id}-{g}", ts, g, "a100", util, 0, None,
                                     job_id))
                        if ts >= since:
                            readings.setdefault((k, g), []).append(util)
            per_bucket: dict[int, list[int]] = {}
            for (k, _g), utils in readings.items():
                cell = per_bucket.setdefault(k, [0, 0])
                cell[0] += 1
                cell[1] += max(utils) < threshold
            buckets = [Bucket(k, seen, idle_n) for k, (seen, idle_n) in per_bucket.items()]
            job = IdleJob(cluster="c", job_id=job_id, restart_count=0, start_ts=since,
                          gpus=gpus)
            wanted[job_id] = (since, required_idle(idle, gpus), gpus)
            expected[job_id] = summarise(idle, job, buckets)
        store.conn.executemany(SAMPLE_INSERT + " ON CONFLICT DO NOTHING",
                               [dict(zip(SAMPLE_KEYS, r, strict=True)) for r in rows])
        got = idle_summaries(store, wanted, width_s=width, threshold_percent=threshold)
    finally:
        store.close()
    assert {j: s for j, s in expected.items() if s is not None} == got
    assert 20 < len(got) < 150  # both kinds of answer were tried
