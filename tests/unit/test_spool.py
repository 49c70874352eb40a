"""The spool: atomic, checked records, oldest-first claims, quarantine, removal, the nudge."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from slurm_plugin.node import spool
from tests.waiting import wait_for

NAME = re.compile(
    r"^(node_run|jobcomp|gpu_sample)\.[A-Za-z0-9_-]+\.[0-9-]+\.[0-9-]+\.[A-Za-z0-9_-]+"
    r"\.[0-9a-f]{32}\.json$"
)


def node_run(**over: Any) -> dict[str, Any]:
    rec = {
        "kind": "node_run", "cluster": "dev", "job_id": 42, "restart_count": 1,
        "node": "node1", "user": "alice", "account": "ml", "start_ts": 1000.0,
        "end_ts": 4600.0, "flags": [],
        "gpus": [{"index": 0, "minor": 0, "uuid": "GPU-x", "gpu_type": "a100",
                  "energy_j": 1.5e6, "util_mean": 80.0, "util_max": 95.0,
                  "mem_max_bytes": 2**34, "gpu_seconds": 3600.0}],
    }
    rec.update(over)
    return rec


def jobcomp(**over: Any) -> dict[str, Any]:
    rec = {
        "kind": "jobcomp", "cluster": "dev", "job_id": 42, "restart_count": None,
        "state": "COMPLETED", "submit_ts": 900.0, "start_ts": 1000.0, "end_ts": None,
        "nodes": "node[1-2]", "node_count": 2, "partition": "gpu", "uid": 1001,
        "user": "alice", "account": "ml", "exit_code": "0:0", "derived_ec": "0:0",
        "time_limit_min": 60, "array_job_id": None, "array_task_id": None, "work_dir": None,
    }
    rec.update(over)
    return rec


def json_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def write_unchecked(spool_dir: Path, record: dict[str, Any]) -> Path:
    """A record in the spool as write_record names and encodes it, but unchecked: what an
    older or foreign writer, or a damaged disk, leaves for claim_batch to judge."""
    rec = {**record, "v": record.get("v", 1), "record_id": os.urandom(16).hex(),
           "written_at": time.time()}
    path = spool_dir / spool.record_filename(rec)
    path.write_bytes(spool.encode_record(rec))
    return path


def test_write_record_fills_fields_and_names_the_file(tmp_path: Path) -> None:
    path = spool.write_record(tmp_path, node_run())
    assert path.parent == tmp_path and NAME.match(path.name), path.name
    assert path.name.startswith("node_run.dev.42.1.node1.")
    rec = json.loads(path.read_text())
    assert rec["v"] == 1 and len(rec["record_id"]) == 32
    assert path.name.endswith(f".{rec['record_id']}.json")
    assert abs(rec["written_at"] - time.time()) < 60
    assert spool.validate(rec) is None
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left behind
    jc = spool.write_record(tmp_path, jobcomp())
    assert jc.name.startswith("jobcomp.dev.42.-.ctl.")


def test_names_are_unique_and_safe(tmp_path: Path) -> None:
    paths = {spool.write_record(tmp_path, node_run()) for _ in range(200)}
    assert len(paths) == 200 and len(json_files(tmp_path)) == 200
    odd = spool.write_record(tmp_path, node_run(node="gpu01.example.com", cluster="a/b c"))
    assert odd.name.startswith("node_run.a_b_c.42.1.gpu01_example_com.")


def test_caller_record_id_is_kept_for_idempotent_retries(tmp_path: Path) -> None:
    path = spool.write_record(tmp_path, node_run(record_id="ab" * 16, written_at=5.0))
    rec = json.loads(path.read_text())
    assert rec["record_id"] == "ab" * 16 and rec["written_at"] == 5.0


def test_crash_between_write_and_rename_leaves_only_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt("killed before rename")

    monkeypatch.setattr(spool.os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        spool.write_record(tmp_path, node_run())
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []
    assert spool.claim_batch(tmp_path) == []
    leftovers = list((tmp_path / "tmp").iterdir())
    assert len(leftovers) == 1
    # young temp files may still be being written: left alone
    assert spool.recover_tmp(tmp_path, older_than=600) == (0, 0)
    # the writer is long dead: the complete record is rescued, not lost
    assert spool.recover_tmp(tmp_path, older_than=0) == (1, 0)
    items = spool.claim_batch(tmp_path)
    assert len(items) == 1 and items[0].error is None and items[0].record["job_id"] == 42


def test_partial_temp_file_is_quarantined_not_deleted(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    partial = tmp_path / "tmp" / "node_run.dev.1.0.n.0123.json.tmp"
    partial.write_bytes(b'{"v":1,"kind":"node_r')
    assert spool.recover_tmp(tmp_path, older_than=0) == (0, 1)
    q = tmp_path / "quarantine"
    assert (q / partial.name).read_bytes() == b'{"v":1,"kind":"node_r'
    assert "writer that died" in (q / (partial.name + ".reason")).read_text()


def test_claim_is_oldest_first_limited_and_skips_sub_folders(tmp_path: Path) -> None:
    paths = [spool.write_record(tmp_path, node_run(job_id=i)) for i in range(5)]
    for job, path in enumerate(paths):  # job 4 is the oldest file, job 0 the newest
        os.utime(path, (1000 + 4 - job, 1000 + 4 - job))
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "node1.1.0.json").write_text("{}")
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "x.json").write_text("{}")
    assert [i.record["job_id"] for i in spool.claim_batch(tmp_path, limit=3)] == [4, 3, 2]
    items = spool.claim_batch(tmp_path)
    assert [i.record["job_id"] for i in items] == [4, 3, 2, 1, 0]
    assert all(i.path.parent == tmp_path and i.error is None for i in items)


def test_claim_flags_corrupt_and_ill_typed_records(tmp_path: Path, caplog: Any) -> None:
    good = spool.write_record(tmp_path, node_run())
    (tmp_path / "node_run.dev.1.0.n.00.json").write_bytes(b"{not json")
    (tmp_path / "node_run.dev.2.0.n.00.json").write_bytes(b"\xff\xfe")
    write_unchecked(tmp_path, node_run(job_id="42"))
    write_unchecked(tmp_path, node_run(job_id=7, restart_count=True))
    gpus = node_run()["gpus"]
    gpus[0]["energy_j"] = "lots"
    write_unchecked(tmp_path, node_run(job_id=8, gpus=gpus))
    write_unchecked(tmp_path, jobcomp(node_count="2"))
    write_unchecked(tmp_path, {"kind": "mystery", "cluster": "dev"})
    (tmp_path / "jobcomp.dev.3.-.ctl.00.json").write_text(json.dumps({**jobcomp(), "v": 2}))
    (tmp_path / "jobcomp.dev.4.-.ctl.00.json").write_text("[1, 2]")
    items = spool.claim_batch(tmp_path)
    errors = {i.path.name: i.error for i in items}
    assert errors.pop(good.name) is None
    problems = sorted(e for e in errors.values())
    assert len(problems) == 9 and all(problems)
    joined = " | ".join(problems)
    for expected in ("not JSON", "not UTF-8", "job_id must be an integer, got '42'",
                     "restart_count must be an integer, got True",
                     "gpus[0].energy_j must be a finite number or null, got 'lots'",
                     "node_count must be an integer or null, got '2'",
                     "unknown record kind 'mystery'", "unsupported record version 2",
                     "not a JSON object"):
        assert expected in joined, expected
    bad = [i for i in items if i.error]
    with caplog.at_level(logging.WARNING, logger="slurmgate.spool"):
        for item in bad:
            spool.quarantine(tmp_path, item, item.error)
    assert [i.path.name for i in spool.claim_batch(tmp_path)] == [good.name]
    q = tmp_path / "quarantine"
    assert len(list(q.glob("*.reason"))) == 9
    reason = (q / "node_run.dev.1.0.n.00.json.reason").read_text()
    assert "not JSON" in reason
    assert "quarantined spool record node_run.dev.1.0.n.00.json" in caplog.text


def test_quarantine_of_a_vanished_record_is_harmless(tmp_path: Path) -> None:
    item = spool.SpoolItem(tmp_path / "gone.json", None, "x")
    assert spool.quarantine(tmp_path, item, "x") is None


def test_remove_only_what_was_committed(tmp_path: Path) -> None:
    a = spool.write_record(tmp_path, node_run(job_id=1))
    b = spool.write_record(tmp_path, node_run(job_id=2))
    items = spool.claim_batch(tmp_path)
    committed = [i for i in items if i.path == a]
    assert spool.remove(committed) == 1
    assert spool.remove(committed) == 0  # twice is harmless
    assert not a.exists() and b.exists()


def test_non_finite_numbers_become_null(tmp_path: Path) -> None:
    path = spool.write_record(tmp_path, node_run(start_ts=float("nan")))
    rec = json.loads(path.read_text())
    assert rec["start_ts"] is None and spool.validate(rec) is None


def test_sub_folders_inherit_the_spool_mode(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    os.chmod(root, 0o1777)
    spool.write_record(root, node_run())
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777


def test_gpu_sample_records_validate(tmp_path: Path) -> None:
    rec = {"kind": "gpu_sample", "cluster": "dev", "node": "node1", "ts": 5.0,
           "gpus": [{"uuid": "GPU-x", "index": 0, "gpu_type": "a100", "util": 50.0,
                     "mem_used_bytes": 10, "power_w": None}]}
    path = spool.write_record(tmp_path, rec)
    assert path.name.startswith("gpu_sample.dev.-.-.node1.")
    assert spool.claim_batch(tmp_path)[0].error is None


def test_write_record_refuses_what_the_daemon_could_not_use(tmp_path: Path) -> None:
    with pytest.raises(spool.RefusedRecord, match="job_id must be an integer, got '42'"):
        spool.write_record(tmp_path, node_run(job_id="42"))
    assert spool.claim_batch(tmp_path) == []  # nothing for the daemon
    assert list((tmp_path / "tmp").iterdir()) == []
    q = tmp_path / "quarantine"
    [kept] = q.glob("*.json")  # kept for the admin, with its reason, not lost
    assert json.loads(kept.read_text())["job_id"] == "42"
    assert kept.name.startswith("node_run.dev.42.1.node1.")
    reason = (q / (kept.name + ".reason")).read_text()
    assert "refused by write_record: job_id must be an integer" in reason
    with pytest.raises(spool.RefusedRecord, match="unknown record kind 'mystery'"):
        spool.write_record(tmp_path, {"kind": "mystery", "cluster": "dev"})
    with pytest.raises(ValueError, match=r"gpus\[0\]\.gpu_seconds must not be negative"):
        gpus = [dict(node_run()["gpus"][0], gpu_seconds=-1.0)]
        spool.write_record(tmp_path, node_run(gpus=gpus))


def test_what_the_ingest_takes_the_spool_takes(tmp_path: Path) -> None:
    """One check (policies.records.validate) for the spool and the ingest: nullable fields may
    be absent, a jobcomp may lack its nodes, a node_run its start and GPU-seconds."""
    no_nodes = jobcomp(nodes=None, node_count=None)
    sparse = {k: v for k, v in jobcomp().items() if v is not None}
    assert "restart_count" not in sparse and "work_dir" not in sparse
    gpu = {k: v for k, v in node_run()["gpus"][0].items() if k != "minor"}
    lean = node_run(user=None, gpus=[gpu])
    del lean["user"], lean["flags"]
    incomplete = node_run(start_ts=None, flags=["baseline_unreadable"],
                          gpus=[dict(node_run()["gpus"][0], gpu_seconds=None)])
    for rec in (no_nodes, sparse, lean, incomplete):
        spool.write_record(tmp_path, rec)
    items = spool.claim_batch(tmp_path)
    assert len(items) == 4 and [i.error for i in items] == [None] * 4
    assert spool.validate(items[0].record) is None


def test_nudge_daemon_is_the_protocol_client(tmp_path: Path) -> None:
    from tests.unit.test_protocol import LineServer

    assert spool.nudge_daemon(str(tmp_path / "missing.sock")) is False
    server = LineServer(str(tmp_path / "d.sock"), b'{"v":1,"ok":true}\n')
    try:
        assert spool.nudge_daemon(str(tmp_path / "d.sock"), timeout=2.0) is True
        wait_for(lambda: server.lines, timeout=5, what="the nudge line")
        assert json.loads(server.lines[0]) == {"v": 1, "op": "nudge"}
    finally:
        server.close()
