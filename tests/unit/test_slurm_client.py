"""The Slurm client layer: CliSlurm on the real dev cluster, PySlurm on tests/fake_pyslurm.py,
SyntheticSlurm on its own, and the shared readers and validation without any Slurm."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import pytest

from policies.config import parse_policy
from slurm_plugin.slurm.cli_backend import CliSlurm, job_from_squeue, node_from_sinfo
from slurm_plugin.slurm.client import (
    InvalidSlurmValue,
    SlurmClient,
    SlurmError,
    check_job_fields,
    gres_gpu_counts,
    split_gres,
)
from slurm_plugin.slurm.factory import open_client
from slurm_plugin.slurm.pyslurm_backend import PySlurm
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tests import fake_pyslurm
from tests.conftest import TAGS

# --------------------------------------------------------------------------------------------
# squeue/sinfo records, as printed by the dev cluster (Slurm 22.05.8, openapi v0.0.38)

RUNNING = {
    "account": "", "admin_comment": "slurmgate:team=vision;rid=r2e8;project=vit-scaling",
    "array_job_id": 0, "array_task_id": None, "batch_host": "node2", "cluster": "slurmgate-dev",
    "comment": "project=vit-scaling,cost_center=CC1001", "cpus": 1,
    "current_working_directory": "/tmp", "derived_exit_code": 0, "end_time": 1795693745,
    "excluded_nodes": "", "exit_code": 0, "flags": ["JOB_WAS_RUNNING"],
    "gres_detail": ["gpu:h100:2(IDX:0-1)"], "job_id": 12, "job_state": "RUNNING", "nice": None,
    "node_count": 1, "nodes": "node2", "partition": "gpu", "priority": 4294901698,
    "requeue": True, "restart_cnt": 0, "sockets_per_node": None, "start_time": 1795693445,
    "state_reason": "None", "submit_time": 1795693445, "tasks": 1, "time_limit": 5,
    "tres_alloc_str": "cpu=1,mem=1000M,node=1,billing=1", "tres_per_job": "",
    "tres_per_node": "gres:gpu:h100:2", "tres_per_socket": "", "tres_per_task": "",
    "user_id": 1001, "user_name": "alice",
}


def test_a_running_job_reads_its_allocation():
    job = job_from_squeue(RUNNING)
    assert (job.job_id, job.user, job.uid, job.partition, job.state) == (
        12, "alice", 1001, "gpu", "RUNNING")
    assert (job.gpus, job.gpu_type, job.nodes, job.node_count) == (2.0, "h100", "node2", 1)
    assert job.nice == 0 and job.reason is None and job.account is None
    assert job.start_ts == 1795693445.0 and job.end_ts is None  # end_time is only expected
    assert job.exit_code == "0:0" and job.requeue and job.time_limit_min == 5
    assert job.array_job_id is None and job.array_task_id is None
    assert job.admin_comment.startswith("slurmgate:team=vision")
    assert not job.held and not job.finished and job.gpu_request_error is None


def test_pending_finished_and_array_jobs():
    pending = job_from_squeue({**RUNNING, "job_state": "PENDING", "gres_detail": [],
                               "nodes": "", "node_count": 2, "tres_per_node": "gres:gpu:1",
                               "state_reason": "Resources", "nice": 50, "priority": 0})
    assert pending.gpus == 2.0 and pending.gpu_type is None  # -N 2 --gres=gpu:1
    assert pending.start_ts is None and pending.nodes is None and pending.nice == 50
    assert pending.held and pending.reason == "Resources"
    failed = job_from_squeue({**RUNNING, "job_state": "FAILED", "exit_code": 768,
                              "gres_detail": [], "end_time": 1795693800})
    assert failed.exit_code == "3:0" and failed.end_ts == 1795693800.0
    assert failed.gpus == 2.0 and failed.gpu_type == "h100"  # the request once finished
    killed = job_from_squeue({**RUNNING, "job_state": "CANCELLED", "exit_code": 15})
    assert killed.exit_code == "0:15"
    never_ran = job_from_squeue({**RUNNING, "job_state": "CANCELLED", "nodes": ""})
    assert never_ran.start_ts is None and never_ran.end_ts is not None
    task = job_from_squeue({**RUNNING, "job_id": 25, "array_job_id": 23, "array_task_id": 0,
                            "tres_per_node": "", "tres_per_job": "gres:gpu:2",
                            "gres_detail": ["gpu:a100:2(IDX:2-3)"]})
    assert (task.array_job_id, task.array_task_id, task.gpus, task.gpu_type) == (
        23, 0, 2.0, "a100")


def test_readers_tolerate_missing_null_and_newer_shapes():
    bare = job_from_squeue({"job_id": 7})
    assert bare.state == "UNKNOWN" and bare.gpus == 0.0 and bare.submit_ts is None
    assert bare.nice == 0 and bare.user is None and bare.exit_code is None
    nulls = job_from_squeue({k: None for k in RUNNING} | {"job_id": 8})
    assert nulls.job_id == 8 and nulls.time_limit_min is None and nulls.cpus == 0
    newer = job_from_squeue({  # openapi v0.0.39+ shapes
        "job_id": {"set": True, "infinite": False, "number": 9}, "job_state": ["PENDING"],
        "time_limit": {"set": True, "infinite": True, "number": 0},
        "submit_time": {"set": True, "infinite": False, "number": 1795693445},
        "nice": {"set": False, "infinite": False, "number": 0},
        "exit_code": {"status": ["EXITED"], "return_code": {"set": True, "number": 2},
                      "signal": {"id": {"set": False, "number": 0}, "name": ""}},
        "tres_per_node": "gres/gpu:a100:4",
    })
    assert (newer.job_id, newer.state, newer.time_limit_min, newer.submit_ts) == (
        9, "PENDING", None, 1795693445.0)
    assert newer.exit_code == "2:0" and newer.gpus == 4.0 and newer.gpu_type == "a100"
    with pytest.raises(ValueError, match="without a job id"):
        job_from_squeue({"job_state": "RUNNING"})


def test_an_unreadable_gpu_request_is_reported_not_dropped(caplog):
    job = job_from_squeue({**RUNNING, "gres_detail": [], "tres_per_node": "gres:gpu:4k"})
    assert job.gpus == 0.0 and "unit suffix" in job.gpu_request_error
    assert "GPU request not understood" in caplog.text


def test_nodes_from_sinfo():
    node = node_from_sinfo({
        "name": "node2", "state": "mixed", "state_flags": ["DRAIN"], "reason": "bad fan",
        "gres": "gpu:h100:4(S:0-1)", "gres_used": "gpu:h100:2(IDX:0-1)", "cpus": 8,
        "alloc_cpus": 1, "partitions": ["gpu", "scavenger"]})
    assert (node.state, node.flags, node.reason, node.drained) == (
        "mixed", ("DRAIN",), "bad fan", True)
    assert node.gpus_total == {"h100": 4} and node.gpus_used == {"h100": 2}
    assert node.gpus_free == {"h100": 2} and node.partitions == ("gpu", "scavenger")
    untyped = node_from_sinfo({"name": "n3", "state": ["IDLE", "NOT_RESPONDING"],
                               "gres": "gpu:2,shard:16", "gres_used": "gpu:0(IDX:N/A)"})
    assert untyped.state == "idle" and untyped.flags == ("NOT_RESPONDING",)
    assert untyped.gpus_total == {"gpu": 2} and untyped.gpus_used == {"gpu": 0}
    # 24.11 leaves a resumed node's old reason on it: only an out-of-service node has one
    resumed = node_from_sinfo({"name": "n4", "state": ["IDLE"], "reason": "was down"})
    assert resumed.reason is None
    down = node_from_sinfo({"name": "n4", "state": ["DOWN"], "reason": "was down"})
    assert down.reason == "was down"


def test_gres_strings_split_outside_parentheses():
    assert split_gres("gpu:a100:2(IDX:0,2),gpu:h100:1(IDX:3)") == [
        "gpu:a100:2(IDX:0,2)", "gpu:h100:1(IDX:3)"]
    assert gres_gpu_counts(["gpu:a100:2(IDX:0,2),gpu:h100:1(IDX:3)", "gpu:a100:1(IDX:0)"]
                           ) == {"a100": 3.0, "h100": 1.0}
    assert gres_gpu_counts("shard:a100:4(IDX:0)", count_shards=True) == {"a100": 0.5}
    assert gres_gpu_counts("gpu:a100:x(IDX:0)") == {}  # unreadable: logged and skipped


# --------------------------------------------------------------------------------------------
# Validation: unsafe values never reach Slurm


@pytest.mark.parametrize(("fields", "message"), [
    ({"comment": "project=x\nAdminComment=evil"}, "single line"),
    ({"admin_comment": "a\rb"}, "single line"),
    ({"comment": "nul\x00byte"}, "control characters"),
    ({"partition": "gpu=x"}, "partition must be"),
    ({"partition": "gpu scavenger"}, "partition must be"),
    ({"exc_nodes": "node1 TimeLimit=1"}, "exc_nodes must be"),
    ({"exc_nodes": ["node1", "node2=x"]}, "node must be"),
    ({"nice": "50"}, "whole number"),
    ({"nice": True}, "whole number"),
    ({"nice": 2**31}, "between"),
    ({"time_limit": 0}, "between"),
    ({"priority": 1}, "cannot update job field 'priority'"),
])
def test_unsafe_job_fields_are_rejected(fields: dict[str, Any], message: str):
    with pytest.raises(InvalidSlurmValue, match=message):
        check_job_fields(fields)


def test_safe_job_fields_are_normalised():
    assert check_job_fields({"exc_nodes": ["node1", "node2"], "nice": -5,
                             "comment": 'project=a,cost_center=CC1 "quoted" ok',
                             "partition": "gpu,scavenger", "time_limit": 90}) == {
        "exc_nodes": "node1,node2", "nice": -5, "comment": 'project=a,cost_center=CC1 "quoted" ok',
        "partition": "gpu,scavenger", "time_limit": 90}
    assert check_job_fields({"exc_nodes": ""}) == {"exc_nodes": ""}  # clears the list


def test_cli_rejects_before_running_anything(tmp_path: Path):
    cli = CliSlurm(bin_dir=str(tmp_path / "no-such-dir"))  # any command would fail loudly
    with pytest.raises(InvalidSlurmValue):
        cli.update_job(5, partition="gpu\nx")
    with pytest.raises(InvalidSlurmValue):
        cli.update_job(0, nice=1)
    with pytest.raises(InvalidSlurmValue, match="start or end"):
        cli.drain("node1", '"quoted"')
    with pytest.raises(InvalidSlurmValue, match="must not be empty"):
        cli.set_down("node1", "  ")
    with pytest.raises(InvalidSlurmValue, match="node must be"):
        cli.resume("node1 State=DOWN")
    with pytest.raises(InvalidSlurmValue, match="hold reason"):
        cli.hold(5, reason="two\nlines")
    with pytest.raises(SlurmError, match="command not found"):
        cli.jobs()


def _fake_command(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_cli_reports_timeouts_and_garbage(tmp_path: Path):
    _fake_command(tmp_path, "squeue", "exec sleep 5")
    _fake_command(tmp_path, "sinfo", "echo 'not json'")
    cli = CliSlurm(bin_dir=str(tmp_path), timeout=0.3)
    with pytest.raises(SlurmError,
                       match=r"`squeue --all --states=all --json` failed .*no answer within 0.3"):
        cli.jobs()
    with pytest.raises(SlurmError, match="not JSON"):
        cli.nodes()


def test_cli_cache_shares_one_squeue_between_queries(tmp_path: Path):
    record = '{"jobs": [{"job_id": 5, "job_state": "PENDING"}], "errors": []}'
    _fake_command(tmp_path, "squeue", f"echo run >> {tmp_path}/runs; echo '{record}'")
    _fake_command(tmp_path, "scancel", "exit 0")
    cli = CliSlurm(bin_dir=str(tmp_path), cache_seconds=60)
    assert [j.job_id for j in cli.jobs()] == [5]
    assert cli.job(5) is not None and cli.job(6) is None
    assert (tmp_path / "runs").read_text().count("run") == 1
    cli.cancel(5)  # an action: the next query asks Slurm again
    cli.jobs()
    assert (tmp_path / "runs").read_text().count("run") == 2


def _versioned_slurm(directory: Path, version: str, parsers: str) -> None:
    """sinfo says ``version``; squeue lists ``parsers`` for --json=list, logs its argv, and
    answers jobs 5 and 6 (one line per argv in directory/argv), or 'Invalid job id' for 99."""
    _fake_command(directory, "sinfo", f"echo 'slurm {version}'")
    record = ('{"jobs": [{"job_id": 5, "job_state": "PENDING"}, '
              '{"job_id": 6, "job_state": "RUNNING"}], "errors": []}')
    _fake_command(directory, "squeue", f"""
echo "$*" >> {directory}/argv
case "$*" in
  *--json=list*) printf 'Possible data_parser plugins:\\n{parsers}\\n'; exit 0 ;;
  *--jobs=99) echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1 ;;
esac
echo '{record}'""")


def test_cli_asks_for_the_newest_data_parser_it_reads_and_filters_in_slurm(tmp_path: Path):
    _versioned_slurm(tmp_path, "24.11.5",
                     "data_parser/v0.0.42\\ndata_parser/v0.0.40\\ndata_parser/v0.0.41")
    cli = CliSlurm(bin_dir=str(tmp_path))
    assert cli.json_flag() == "--json=v0.0.42"
    assert [j.job_id for j in cli.jobs([6, 5])] == [5, 6]
    assert cli.jobs([99]) == []  # every id has left Slurm: an empty answer, not an error
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == ["--json=list", "--all --states=all --json=v0.0.42 --jobs=5,6",
                    "--all --states=all --json=v0.0.42 --jobs=99"]


def test_cli_keeps_slurms_default_when_it_offers_none_it_reads(tmp_path: Path, caplog):
    _versioned_slurm(tmp_path, "31.05.1", "data_parser/v0.0.51")
    cli = CliSlurm(bin_dir=str(tmp_path))
    assert cli.json_flag() == "--json"
    assert "offers data_parser v0.0.51" in caplog.text


def test_on_22_05_the_cli_filters_the_whole_queue_itself(tmp_path: Path):
    _versioned_slurm(tmp_path, "22.05.8", "unused")
    cli = CliSlurm(bin_dir=str(tmp_path))
    assert [j.job_id for j in cli.jobs([6])] == [6]
    assert (tmp_path / "argv").read_text().splitlines() == ["--all --states=all --json"]


# --------------------------------------------------------------------------------------------
# CliSlurm on the real dev cluster


@pytest.fixture
def fake() -> Any:
    fake_pyslurm.reset()
    fake_pyslurm.add_node("node1", gres="gpu:a100:4(S:0-1)", partitions=["gpu", "scavenger"],
                          alloc_tres="cpu=2,mem=2000M,gres/gpu=2,gres/gpu:a100=2",
                          allocated_cpus=2)
    fake_pyslurm.add_node("node2", gres="gpu:h100:4", partitions=["gpu", "scavenger"])
    fake_pyslurm.add_job(101, state="RUNNING", allocated_nodes="node1", start_time=1000,
                         submit_time=900, end_time=4600, tres_per_node="gres/gpu:a100=2",
                         gres_detail=["gpu:a100:2(IDX:0-1)"], admin_comment="slurmgate:team=x",
                         comment=TAGS["alice"])
    fake_pyslurm.add_job(102, user_name="bob", user_id=1002, submit_time=950, start_time=5000,
                         tres_per_node="gres/gpu:h100:1", num_nodes=2, nice=10)
    fake_pyslurm.add_job(103, user_name="bob", tres_per_task="gres/gpu=1", ntasks=4,
                         array_id=100, array_task_id=3)
    yield fake_pyslurm
    fake_pyslurm.reset()


def test_pyslurm_reads_jobs_in_one_rpc(fake: Any):
    client = PySlurm(module=fake)
    jobs = {j.job_id: j for j in client.jobs()}
    assert fake.calls == ["slurm_load_jobs"]
    running, pending, task = jobs[101], jobs[102], jobs[103]
    assert (running.state, running.gpus, running.gpu_type, running.nodes) == (
        "RUNNING", 2.0, "a100", "node1")
    assert running.start_ts == 1000.0 and running.end_ts is None
    assert running.comment == TAGS["alice"] and running.cluster == "fake25"
    assert (pending.gpus, pending.gpu_type, pending.nice, pending.start_ts) == (
        2.0, "h100", 10, None)
    assert (task.gpus, task.array_job_id, task.array_task_id) == (4.0, 100, 3)
    assert [j.job_id for j in client.jobs([103, 999])] == [103]


def test_pyslurm_reads_whether_a_job_has_a_batch_script(fake: Any):
    fake.add_job(104, state="RUNNING", allocated_nodes="node2", start_time=1000,
                 is_batch_job=False)  # salloc
    jobs = {j.job_id: j for j in PySlurm(module=fake).jobs()}
    assert jobs[104].batch is False and jobs[101].batch is True


def test_pyslurm_falls_back_to_the_documented_dict_attributes(fake: Any):
    # "gres/gpu:a100:3" has no '=': tres_per_node (TrackableResources) is None, while
    # gres_per_node (a dict in every 25.11.x) still reads it
    fake.add_job(104, tres_per_node="gres/gpu:a100:3")
    # no tres_per_* string at all: Job.gpus (from the job's requested TRES) is the last word
    fake.add_job(105, tres_req_str="cpu=1,gres/gpu=2,gres/gpu:h100=2")
    client = PySlurm(module=fake)
    assert (client.job(104).gpus, client.job(104).gpu_type) == (3.0, "a100")
    assert (client.job(105).gpus, client.job(105).gpu_type) == (2.0, "h100")
    assert client.job(999) is None


def test_pyslurm_actions(fake: Any):
    client = PySlurm(module=fake)
    client.hold(102, reason="budget review")
    assert client.job(102).held and client.job(102).reason == "JobHeldAdmin"
    client.update_job(102, nice=70)
    assert client.job(102).held and client.job(102).nice == 70
    client.release(102)
    job = client.job(102)
    assert not job.held and job.nice == 70
    client.release(102)  # not held: skipped, so nice survives slurmctld's reset
    assert client.job(102).nice == 70
    client.update_job(102, comment="project=p,cost_center=CC1", time_limit=30,
                      exc_nodes=["node1"], partition="scavenger", admin_comment="a=b")
    job = client.job(102)
    assert (job.comment, job.time_limit_min, job.exc_nodes, job.partition,
            job.admin_comment) == ("project=p,cost_center=CC1", 30, "node1", "scavenger", "a=b")
    client.requeue(101, hold=True)
    job = client.job(101)
    assert job.held and job.restart_count == 1 and job.nodes is None
    client.cancel(103)
    assert client.job(103).state == "CANCELLED" and client.job(103).start_ts is None
    client.cancel(103)  # already finished: fine


def test_pyslurm_errors_become_slurm_errors(fake: Any):
    client = PySlurm(module=fake)
    with pytest.raises(SlurmError, match=r"pyslurm Job\(102\).requeue.*exit code 2024.*pending"):
        client.requeue(102)
    with pytest.raises(SlurmError, match="Invalid job id"):
        client.cancel(999)  # pyslurm alone would ignore it
    with pytest.raises(SlurmError, match="Invalid job id"):
        client.update_job(999, comment="x")
    with pytest.raises(SlurmError, match="Invalid partition"):
        client.update_job(102, partition="nosuch")
    with pytest.raises(SlurmError, match="Invalid node name"):
        client.drain("node9", "bad fan")
    served = len(fake.calls)
    with pytest.raises(InvalidSlurmValue):
        client.update_job(102, comment="a\nb")
    assert len(fake.calls) == served  # refused before any RPC


def test_pyslurm_nodes(fake: Any):
    client = PySlurm(module=fake)
    nodes = {n.name: n for n in client.nodes()}
    assert nodes["node1"].gpus_total == {"a100": 4} and nodes["node1"].gpus_used == {"a100": 2}
    assert nodes["node2"].gpus_used == {"h100": 0} and nodes["node2"].state == "idle"
    client.drain("node2", "bad fan")
    node = next(n for n in client.nodes() if n.name == "node2")
    assert node.drained and node.flags == ("DRAIN",) and node.reason == "bad fan"
    client.set_down("node2", "dead")
    assert next(n for n in client.nodes() if n.name == "node2").state == "down"
    client.resume("node2")
    node = next(n for n in client.nodes() if n.name == "node2")
    assert (node.state, node.flags, node.reason) == ("idle", (), None)
    with pytest.raises(SlurmError, match="Invalid node state"):
        client.resume("node2")


def test_pyslurm_version_and_import_are_checked(monkeypatch):
    old = type(fake_pyslurm)("pyslurm")
    old.__version__ = "24.11.0"
    with pytest.raises(SlurmError, match="needs pyslurm >= 25.11"):
        PySlurm(module=old)
    monkeypatch.setitem(__import__("sys").modules, "pyslurm", None)  # not installed
    with pytest.raises(SlurmError, match="slurmgate\\[pyslurm\\]"):
        PySlurm()


# --------------------------------------------------------------------------------------------
# open_client and SyntheticSlurm


def test_open_client_follows_the_policy(monkeypatch):
    assert isinstance(open_client(parse_policy("")), CliSlurm)
    monkeypatch.setitem(__import__("sys").modules, "pyslurm", fake_pyslurm)
    chosen = open_client(parse_policy('[daemon]\nslurm_backend = "pyslurm"\n'))
    assert isinstance(chosen, PySlurm)
    for client in (chosen, CliSlurm(), SyntheticSlurm(n_jobs=1, n_nodes=1)):
        assert isinstance(client, SlurmClient)


def test_synthetic_cluster_is_deterministic_and_large():
    started = time.perf_counter()
    big = SyntheticSlurm(n_jobs=10_000, n_nodes=500, seed=7)
    jobs = big.jobs()
    assert len(jobs) == 10_000 and len(big.nodes()) == 500
    assert time.perf_counter() - started < 5
    assert jobs == SyntheticSlurm(n_jobs=10_000, n_nodes=500, seed=7).jobs()
    assert jobs != SyntheticSlurm(n_jobs=10_000, n_nodes=500, seed=8).jobs()
    states = {j.state for j in jobs}
    assert {"RUNNING", "PENDING", "COMPLETED"} <= states
    assert sum(n.gpus_used[next(iter(n.gpus_used))] for n in big.nodes()) > 0


def test_synthetic_actions_follow_the_interface():
    syn = SyntheticSlurm(n_jobs=200, n_nodes=8, seed=1, clock=lambda: 1_800_000_000.0)
    pending = next(j for j in syn.jobs() if j.pending and not j.held)
    running = next(j for j in syn.jobs() if j.state == "RUNNING")
    syn.hold(pending.job_id, reason="review")
    assert syn.job(pending.job_id).held
    syn.update_job(pending.job_id, nice=7, comment="project=p", exc_nodes=["gpu001"])
    changed = syn.job(pending.job_id)
    assert (changed.nice, changed.comment, changed.exc_nodes, changed.held) == (
        7, "project=p", "gpu001", True)
    syn.release(pending.job_id)
    assert not syn.job(pending.job_id).held
    syn.requeue(running.job_id)
    assert syn.job(running.job_id).restart_count == 1 and syn.job(running.job_id).pending
    syn.cancel(running.job_id)
    assert syn.job(running.job_id).state == "CANCELLED"
    assert syn.job(running.job_id).end_ts == 1_800_000_000.0
    assert [j.job_id for j in syn.jobs([running.job_id, 1])] == [running.job_id]
    node = syn.nodes()[0].name
    syn.drain(node, "bad fan")
    assert syn.nodes()[0].drained
    syn.resume(node)
    assert not syn.nodes()[0].drained
    with pytest.raises(SlurmError, match="Invalid job id"):
        syn.hold(1)
    with pytest.raises(InvalidSlurmValue):
        syn.update_job(pending.job_id, partition="a=b")
    with pytest.raises(SlurmError, match="Invalid node state"):
        syn.resume(node)

