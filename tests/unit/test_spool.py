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
    sub = spool_dir / spool.subdir_for(rec.get("kind"))
    make_dirs(spool_dir)
    path = sub / spool.record_filename(rec)
    path.write_bytes(spool.encode_record(rec))
    return path


TRUST = spool.trust_for("slurm")


def make_dirs(spool_dir: Path, *subs: str) -> None:
    """The layout's directories, as the hooks (node/) and the daemon (ctld/, quarantine/)
    make them."""
    for sub in subs or ("node/tmp", "ctld/tmp", "quarantine"):
        os.close(spool.open_subdir(spool_dir, sub, TRUST, create=True))


NODE = "node"
CTLD = "ctld"


def test_write_record_fills_fields_and_names_the_file(tmp_path: Path) -> None:
    path = spool.write_record(tmp_path, node_run())
    assert path.parent == tmp_path / NODE and NAME.match(path.name), path.name
    assert path.name.startswith("node_run.dev.42.1.node1.")
    rec = json.loads(path.read_text())
    assert rec["v"] == 1 and len(rec["record_id"]) == 32
    assert path.name.endswith(f".{rec['record_id']}.json")
    assert abs(rec["written_at"] - time.time()) < 60
    assert spool.validate(rec) is None
    assert list((tmp_path / NODE / "tmp").iterdir()) == []  # nothing left behind
    jc = spool.write_record(tmp_path, jobcomp())
    assert jc.name.startswith("jobcomp.dev.42.-.ctl.")
    assert jc.parent == tmp_path / CTLD  # each writer its own subdirectory
    assert list((tmp_path / CTLD / "tmp").iterdir()) == []


def test_names_are_unique_and_safe(tmp_path: Path) -> None:
    paths = {spool.write_record(tmp_path, node_run()) for _ in range(200)}
    assert len(paths) == 200 and len(json_files(tmp_path / NODE)) == 200
    odd = spool.write_record(tmp_path, node_run(node="gpu01.example.com", cluster="a/b c"))
    assert odd.name.startswith("node_run.a_b_c.42.1.gpu01_example_com.")


def test_caller_record_id_is_kept_for_idempotent_retries(tmp_path: Path) -> None:
    path = spool.write_record(tmp_path, node_run(record_id="ab" * 16, written_at=5.0))
    rec = json.loads(path.read_text())
    assert rec["record_id"] == "ab" * 16 and rec["written_at"] == 5.0


def test_crash_between_write_and_rename_leaves_only_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(src: str, dst: str, **dir_fds: int) -> None:
        raise KeyboardInterrupt("killed before rename")

    monkeypatch.setattr(spool.os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        spool.write_record(tmp_path, node_run())
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / NODE).iterdir() if p.is_file()] == []
    assert spool.claim_batch(tmp_path) == []
    leftovers = list((tmp_path / NODE / "tmp").iterdir())
    assert len(leftovers) == 1
    # young temp files may still be being written: left alone
    assert spool.recover_tmp(tmp_path, older_than=600) == (0, 0)
    # the writer is long dead: the complete record is rescued, not lost
    assert spool.recover_tmp(tmp_path, older_than=0) == (1, 0)
    items = spool.claim_batch(tmp_path)
    assert len(items) == 1 and items[0].error is None and items[0].record["job_id"] == 42
    assert items[0].writer == "node:node1" and items[0].where == NODE


def test_partial_temp_file_is_quarantined_not_deleted(tmp_path: Path) -> None:
    make_dirs(tmp_path)
    partial = tmp_path / NODE / "tmp" / "node_run.dev.1.0.n.0123.json.tmp"
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
    make_dirs(tmp_path)
    (tmp_path / "quarantine" / "x.json").write_text("{}")
    (tmp_path / NODE / "tmp" / "y.json").write_text("{}")
    assert [i.record["job_id"] for i in spool.claim_batch(tmp_path, limit=3)] == [4, 3, 2]
    items = spool.claim_batch(tmp_path)
    assert [i.record["job_id"] for i in items] == [4, 3, 2, 1, 0]
    assert all(i.path.parent == tmp_path / NODE and i.error is None for i in items)


def test_claim_flags_corrupt_and_ill_typed_records(tmp_path: Path, caplog: Any) -> None:
    good = spool.write_record(tmp_path, node_run())
    make_dirs(tmp_path)
    (tmp_path / NODE / "node_run.dev.1.0.n.00.json").write_bytes(b"{not json")
    (tmp_path / NODE / "node_run.dev.2.0.n.00.json").write_bytes(b"\xff\xfe")
    write_unchecked(tmp_path, node_run(job_id="42"))
    write_unchecked(tmp_path, node_run(job_id=7, restart_count=True))
    gpus = node_run()["gpus"]
    gpus[0]["energy_j"] = "lots"
    write_unchecked(tmp_path, node_run(job_id=8, gpus=gpus))
    write_unchecked(tmp_path, jobcomp(node_count="2"))
    write_unchecked(tmp_path, {"kind": "mystery", "cluster": "dev"})
    (tmp_path / CTLD / "jobcomp.dev.3.-.ctl.00.json").write_text(
        json.dumps({**jobcomp(), "v": 2}))
    (tmp_path / CTLD / "jobcomp.dev.4.-.ctl.00.json").write_text("[1, 2]")
    items = spool.claim_batch(tmp_path)
    errors = {i.path.name: i.error for i in items}
    assert errors.pop(good.name) is None
    problems = sorted(e for e in errors.values())
    assert len(problems) == 9 and all(problems)
    assert all(i.record is None for i in items if i.error)  # bodies of bad records not kept
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
    make_dirs(tmp_path)
    item = spool.SpoolItem(tmp_path / NODE / "gone.json", None, "x", NODE)
    assert spool.quarantine(tmp_path, item, "x") is None
    assert list((tmp_path / "quarantine").iterdir()) == []  # no orphan .reason


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


def test_sub_folders_get_the_layouts_owner_and_mode(tmp_path: Path) -> None:
    import pwd

    slurm = pwd.getpwnam("slurm")
    root = tmp_path / "spool"
    root.mkdir()
    os.chown(root, 0, slurm.pw_gid)
    os.chmod(root, 0o775)
    spool.write_record(root, node_run())
    spool.write_record(root, jobcomp())
    for sub, uid in (("node", 0), ("node/tmp", 0), ("ctld", slurm.pw_uid),
                     ("ctld/tmp", slurm.pw_uid)):
        st = os.stat(root / sub)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o770, uid, slurm.pw_gid)
    assert not (root / "tmp").exists()
    # a world-writable spool (the old 1733/1777 layout) is refused, not written into
    os.chmod(root, 0o1777)
    with pytest.raises(spool.LayoutError, match="more open than 0775"):
        spool.write_record(root, node_run())


def test_gpu_sample_records_validate(tmp_path: Path) -> None:
    rec = {"kind": "gpu_sample", "cluster": "dev", "node": "node1", "ts": 5.0,
           "gpus": [{"uuid": "GPU-x", "index": 0, "gpu_type": "a100", "util": 50.0,
                     "mem_used_bytes": 10, "power_w": None}]}
    path = spool.write_record(tmp_path, rec)
    assert path.name.startswith("gpu_sample.dev.-.-.node1.")
    assert spool.claim_batch(tmp_path)[0].error is None


def test_write_record_refuses_what_the_daemon_could_not_use(tmp_path: Path) -> None:
    make_dirs(tmp_path)
    with pytest.raises(spool.RefusedRecord, match="job_id must be an integer, got '42'"):
        spool.write_record(tmp_path, node_run(job_id="42"))
    assert spool.claim_batch(tmp_path) == []  # nothing for the daemon
    assert list((tmp_path / NODE / "tmp").iterdir()) == []
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


# -- the trust boundary: who may write where, and what a bad entry cannot do -----------------


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def test_a_symlinked_subdir_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o770)
    root = tmp_path / "spool"
    root.mkdir()
    (root / NODE).symlink_to(elsewhere)
    with pytest.raises(spool.LayoutError, match="symbolic link"):
        spool.write_record(root, node_run())
    (elsewhere / "node_run.dev.1.1.n.aa.json").write_bytes(
        spool.encode_record(spool.prepare_record(node_run())))
    assert spool.claim_batch(root) == []  # never read through the link
    problems = spool.check_layout(root, TRUST, create=True)
    assert "symbolic link" in problems[NODE]
    assert list(elsewhere.iterdir()) == [elsewhere / "node_run.dev.1.1.n.aa.json"]
    (root / "quarantine").rmdir()
    (root / "quarantine").symlink_to(elsewhere)  # nor is quarantine/ followed
    assert "symbolic link" in spool.check_layout(root, TRUST)["quarantine"]


def test_a_subdir_of_the_wrong_owner_or_mode_is_refused(tmp_path: Path) -> None:
    make_dirs(tmp_path)
    os.chown(tmp_path / CTLD, _uid("alice"), -1)
    assert "owned by uid" in spool.check_layout(tmp_path, TRUST)[CTLD]
    with pytest.raises(spool.LayoutError):
        spool.write_record(tmp_path, jobcomp())
    os.chown(tmp_path / CTLD, _uid("slurm"), -1)
    os.chmod(tmp_path / NODE, 0o777)
    problems = spool.check_layout(tmp_path, TRUST)
    assert list(problems) == [NODE] and "more open than 0770" in problems[NODE]
    assert stat.S_IMODE(os.stat(tmp_path / NODE).st_mode) == 0o777  # never chmod-ed


def test_a_fifo_swapped_in_for_a_record_does_not_hang_and_is_quarantined(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    make_dirs(tmp_path)
    fifo = tmp_path / NODE / "node_run.dev.5.0.n.ff.json"
    os.mkfifo(fifo)
    real_stat = os.stat
    regular = real_stat(spool.write_record(tmp_path, node_run(job_id=6)), follow_symlinks=False)

    def racing_stat(path: Any, *a: Any, **kw: Any) -> Any:  # the listing saw a regular file
        if path == fifo.name:
            return regular
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(spool.os, "stat", racing_stat)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(spool.claim_batch(tmp_path)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "claim_batch blocked on a FIFO"
    monkeypatch.undo()
    errors = {i.path.name: i.error for i in out[0]}
    assert errors[fifo.name] == "a FIFO, not a record file"
    [bad] = [i for i in out[0] if i.error]
    dest = spool.quarantine(tmp_path, bad, bad.error)
    assert dest is not None and stat.S_ISFIFO(os.lstat(dest).st_mode)
    assert "a FIFO" in Path(str(dest) + ".reason").read_text()


def test_an_oversized_record_is_quarantined_without_reading_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dirs(tmp_path)
    big = tmp_path / NODE / "node_run.dev.7.0.n.bb.json"
    with open(big, "wb") as f:
        f.truncate(2**30)  # a sparse GiB: reading it would show
    exact = tmp_path / NODE / "node_run.dev.8.0.n.cc.json"
    exact.write_bytes(b" " * (spool.MAX_RECORD_BYTES + 1))

    def no_parse(*_: Any) -> Any:
        raise AssertionError("an oversized record was parsed")

    monkeypatch.setattr(spool.json, "loads", no_parse)
    items = spool.claim_batch(tmp_path)
    assert sorted(i.error for i in items) == [
        f"{2**30} bytes, larger than {spool.MAX_RECORD_BYTES}: not read",
        f"{spool.MAX_RECORD_BYTES + 1} bytes, larger than {spool.MAX_RECORD_BYTES}: not read"]
    from policies.records import MAX_RECORD_BYTES

    assert spool.MAX_RECORD_BYTES == MAX_RECORD_BYTES == 64 * 1024


def test_bytes_per_batch_are_capped(tmp_path: Path) -> None:
    for i in range(6):
        spool.write_record(tmp_path, node_run(job_id=i, flags=["x" * 30_000]))
    first = spool.claim_batch(tmp_path, max_bytes=100_000)
    assert 2 <= len(first) <= 4
    assert len(spool.claim_batch(tmp_path)) == 6


def test_a_record_of_the_wrong_owner_or_in_the_wrong_subdir_is_refused(tmp_path: Path) -> None:
    theirs = spool.write_record(tmp_path, node_run(job_id=1))
    os.chown(theirs, _uid("alice"), -1)
    mine = spool.write_record(tmp_path, node_run(job_id=2))
    make_dirs(tmp_path)
    misplaced = tmp_path / NODE / "jobcomp.dev.3.-.ctl.dd.json"
    misplaced.write_bytes(spool.encode_record(spool.prepare_record(jobcomp(job_id=3))))
    sample = spool.prepare_record({"kind": "gpu_sample", "cluster": "dev", "node": "n1",
                                   "ts": 5.0, "gpus": []})
    (tmp_path / CTLD / "gpu_sample.dev.-.-.n1.ee.json").write_bytes(spool.encode_record(sample))
    slurm_jc = spool.write_record(tmp_path, jobcomp(job_id=4))
    os.chown(slurm_jc, _uid("slurm"), -1)  # the SlurmUser writes ctld/...
    slurm_node = spool.write_record(tmp_path, node_run(job_id=5))
    os.chown(slurm_node, _uid("slurm"), -1)  # ...but not node/
    errors = {i.path.name: i.error for i in spool.claim_batch(tmp_path)}
    assert errors.pop(mine.name) is None and errors.pop(slurm_jc.name) is None
    assert (f"owned by uid {_uid('alice')} (alice), not a writer allowed here"
            in errors.pop(theirs.name))
    assert "owned by uid 64030 (slurm)" in errors.pop(slurm_node.name)
    assert errors.pop(misplaced.name) == ("a jobcomp record in node/ (node/ holds only "
                                          "node_run, gpu_sample)")
    assert "a gpu_sample record in ctld/" in errors.pop("gpu_sample.dev.-.-.n1.ee.json")
    assert errors == {}
    squash = spool.Trust(TRUST.slurm_uid, TRUST.slurm_gid, squash_uid=_uid("nobody"))
    os.chown(slurm_node, _uid("nobody"), -1)  # root_squash: root on a node is nobody
    assert {i.path.name: i.error for i in spool.claim_batch(tmp_path, trust=squash)}[
        slurm_node.name] is None


def test_users_cannot_write_the_spool(tmp_path: Path) -> None:
    import pwd
    import subprocess
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        root = base / "spool"
        root.mkdir()
        os.chown(root, 0, pwd.getpwnam("slurm").pw_gid)
        os.chmod(root, 0o775)
        spool.write_record(root, node_run())
        spool.write_record(root, jobcomp())
        make_dirs(root)
        for target in ("x.json", "node/x.json", "ctld/x.json", "node/tmp/x", "quarantine/x",
                       "tmp"):
            p = subprocess.run(["runuser", "-u", "alice", "--", "mkdir", str(root / target)],
                               capture_output=True, text=True, timeout=30)
            assert p.returncode != 0 and not (root / target).exists(), target
    finally:
        import shutil

        shutil.rmtree(base)


def test_recover_tmp_in_both_subdirs(tmp_path: Path) -> None:
    make_dirs(tmp_path)
    for sub, rec in ((NODE, node_run(job_id=9)), (CTLD, jobcomp(job_id=9))):
        rec = spool.prepare_record(rec)
        (tmp_path / sub / "tmp" / (spool.record_filename(rec) + ".tmp")).write_bytes(
            spool.encode_record(rec))
    wrong = spool.prepare_record(jobcomp(job_id=10))  # a jobcomp in node/tmp
    (tmp_path / NODE / "tmp" / "x.tmp").write_bytes(spool.encode_record(wrong))
    assert spool.count_tmp(tmp_path) == {NODE: 2, CTLD: 1}
    assert spool.recover_tmp(tmp_path) == (0, 0)  # younger than a minute: still being written
    assert spool.recover_tmp(tmp_path, now=time.time() + 61) == (2, 1)
    kinds = sorted((i.where, i.record["kind"]) for i in spool.claim_batch(tmp_path))
    assert kinds == [(CTLD, "jobcomp"), (NODE, "node_run")]
    reason = (tmp_path / "quarantine" / "x.tmp.reason").read_text()
    assert "writer that died: a jobcomp record in node/" in reason


def test_quarantine_retention(tmp_path: Path) -> None:
    make_dirs(tmp_path)
    path = spool.write_record(tmp_path, node_run())
    os.utime(path, (1000, 1000))  # an old record: retention counts from its quarantine
    [item] = spool.claim_batch(tmp_path)
    dest = spool.quarantine(tmp_path, item, "for the test")
    assert dest is not None
    assert spool.prune_quarantine(tmp_path, 30) == 0 and dest.exists()
    (tmp_path / "quarantine" / "sub").mkdir()
    (tmp_path / "quarantine" / "sub" / "f").write_text("x")
    os.symlink("/etc/passwd", tmp_path / "quarantine" / "link.json")
    for p in (tmp_path / "quarantine").iterdir():
        os.utime(p, (1000, 1000), follow_symlinks=False)
    assert spool.quarantine_count(tmp_path) == 3
    assert spool.prune_quarantine(tmp_path, 30) == 3
    assert list((tmp_path / "quarantine").iterdir()) == []
    assert Path("/etc/passwd").exists()


def test_reason_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    make_dirs(tmp_path)
    victim = tmp_path / "victim.db"
    victim.write_text("precious\n")
    os.chmod(victim, 0o600)
    (tmp_path / NODE / "node_run.dev.1.0.n.00.json").write_bytes(b"{not json")
    q = tmp_path / "quarantine"
    os.symlink(victim, q / "node_run.dev.1.0.n.00.json.reason")
    os.symlink(victim, q / "node_run.dev.1.0.n.00.json")
    [item] = spool.claim_batch(tmp_path)
    dest = spool.quarantine(tmp_path, item, "not JSON")
    assert victim.read_text() == "precious\n"
    assert dest is not None and dest.name.startswith("node_run.dev.1.0.n.00.json.")
    assert dest.read_bytes() == b"{not json" and not dest.is_symlink()
    assert "not JSON" in Path(str(dest) + ".reason").read_text()


def test_deliver_falls_back_and_forwards_later(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    root = tmp_path / "spool"  # missing: the shared spool is not mounted
    done = spool.deliver(str(root), node_run(job_id=1), trust=TRUST, state_dir=state)
    kept_id = json.loads(Path(done.path).read_text())["record_id"]
    assert done.fallback_reason and "FileNotFoundError" in done.fallback_reason
    fb = tmp_path / "state" / "fallback"
    assert Path(done.path).parent == fb
    assert stat.S_IMODE(os.stat(fb).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    time.sleep(0.01)
    spool.deliver(str(root), node_run(job_id=2), trust=TRUST, state_dir=state)
    assert [n.split(".")[2] for n in spool.fallback_records(state)] == ["1", "2"]
    moved, error = spool.forward_fallback(str(root), trust=TRUST, state_dir=state)
    assert moved == 0 and error and "FileNotFoundError" in error
    assert len(spool.fallback_records(state)) == 2  # nothing lost while it is still down
    root.mkdir()
    assert spool.forward_fallback(str(root), trust=TRUST, state_dir=state) == (2, None)
    assert spool.fallback_records(state) == []
    items = spool.claim_batch(root)
    assert [i.record["job_id"] for i in items] == [1, 2]
    assert items[0].record["record_id"] == kept_id  # the same record: ingest stays idempotent
    # a fallback directory that is not root-only is refused, never used
    os.chmod(fb, 0o755)
    with pytest.raises(spool.LayoutError):
        spool.deliver(str(root / "missing"), node_run(), trust=TRUST, state_dir=state)
