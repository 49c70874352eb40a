"""The CLI Slurm backend on the real dev cluster: a GPU job through its life, drains, errors."""

from __future__ import annotations

import pwd

import pytest

from slurm_plugin.slurm.cli_backend import CliSlurm
from slurm_plugin.slurm.client import (
    InvalidSlurmValue,
    Job,
    SlurmClient,
    SlurmError,
)
from tests.conftest import TAGS, Cluster
from tests.waiting import wait_for

# --------------------------------------------------------------------------------------------
# squeue/sinfo records, as printed by the dev cluster (Slurm 22.05.8, openapi v0.0.38)

def _client(cluster: Cluster) -> CliSlurm:
    return CliSlurm(env=cluster.env)


def _wait_job(client: SlurmClient, job_id: int, what: str, cond, timeout: float = 90) -> Job:
    def check() -> Job | None:
        job = client.job(job_id)
        return job if job is not None and cond(job) else None

    return wait_for(check, timeout, 0.3, what=f"job {job_id} {what}")


@pytest.mark.slurm
def test_cli_drives_a_gpu_job_through_its_life(cluster: Cluster):
    client = _client(cluster)
    job_id = cluster.submit_ok("alice", "--gres=gpu:h100:2", "-p", "gpu", wrap="sleep 300")
    try:
        job = _wait_job(client, job_id, "running", lambda j: j.state == "RUNNING")
        assert (job.user, job.uid, job.partition) == ("alice", pwd.getpwnam("alice").pw_uid,
                                                      "gpu")
        assert (job.gpus, job.gpu_type, job.nodes, job.node_count) == (2.0, "h100", "node2", 1)
        assert job.comment == TAGS["alice"]
        assert job.admin_comment.startswith("slurmgate:v2;team=vision;rid=r")
        assert job.time_limit_min == 5 and job.restart_count == 0 and job.requeue
        assert job.start_ts and job.end_ts is None and job.cluster == "slurmgate-dev"
        node2 = next(n for n in client.nodes() if n.name == "node2")
        assert node2.gpus_used["h100"] >= 2

        client.requeue(job_id, hold=True)
        job = _wait_job(client, job_id, "requeued and held",
                        lambda j: j.state == "PENDING" and j.held and j.restart_count == 1)
        assert job.start_ts is None and job.gpus == 2.0 and job.gpu_type == "h100"

        client.update_job(job_id, nice=50)
        job = client.job(job_id)
        assert job.nice == 50 and job.held, "changing nice must not lift the hold"

        original = job.admin_comment
        client.update_job(job_id, comment=TAGS["alice"] + ",note=a b", time_limit=4,
                          exc_nodes=["node1"], partition="scavenger",
                          admin_comment=original + ";checked=yes")
        job = client.job(job_id)
        assert job.comment == TAGS["alice"] + ",note=a b"
        assert job.admin_comment == original + ";checked=yes"
        assert (job.time_limit_min, job.exc_nodes, job.partition) == (4, "node1", "scavenger")
        client.update_job(job_id, partition="gpu", admin_comment=original)

        client.release(job_id)
        job = _wait_job(client, job_id, "released", lambda j: not j.held)
        assert job.nice == 50, "a release must keep the job's nice"
        client.release(job_id)  # not held: nothing to do, and nice survives
        assert client.job(job_id).nice == 50

        if client.job(job_id).pending:
            client.hold(job_id, reason="slurmgate test: admin hold")
            _wait_job(client, job_id, "held", lambda j: j.held and j.reason == "JobHeldAdmin")
        client.cancel(job_id)
        job = _wait_job(client, job_id, "cancelled", lambda j: j.state == "CANCELLED")
        assert job.finished and job.end_ts is not None
        client.cancel(job_id)  # already finished: not an error
        assert client.job(job_id).state == "CANCELLED"  # finished jobs stay listed
    finally:
        cluster.scancel(job_id)


@pytest.mark.slurm
def test_cli_asks_squeue_once_for_many_jobs(cluster: Cluster, monkeypatch):
    client = _client(cluster)
    ids = [cluster.submit_ok("bob", "--begin=now+1hour", wrap="true") for _ in range(3)]
    try:
        client.json_flag()  # asked once per client: the version, and the data_parsers offered
        seen: list[list[str]] = []
        real_run = client._run
        monkeypatch.setattr(client, "_run", lambda argv, **kw: seen.append(argv)
                            or real_run(argv, **kw))
        found = client.jobs([*ids, 999_999])
        assert sorted(j.job_id for j in found) == sorted(ids)
        assert all(j.state == "PENDING" and j.user == "bob" for j in found)
        assert [argv[0] for argv in seen] == ["squeue"]
        everything = {j.job_id for j in client.jobs()}
        assert set(ids) <= everything
    finally:
        cluster.scancel(*ids)


@pytest.mark.slurm
def test_cli_nodes_show_both_gpu_types(cluster: Cluster):
    nodes = {n.name: n for n in _client(cluster).nodes()}
    assert nodes["node1"].gpus_total == {"a100": 4}
    assert nodes["node2"].gpus_total == {"h100": 4}
    for node in nodes.values():
        assert {"gpu", "scavenger"} <= set(node.partitions)
        assert node.cpus == 8 and node.state == node.state.lower()
        assert set(node.gpus_used) == set(node.gpus_total)


@pytest.mark.slurm
def test_cli_drains_and_resumes_a_node(cluster: Cluster):
    client = _client(cluster)

    def usable():
        return next((n for n in client.nodes()
                     if not n.drained and n.state in ("idle", "mixed", "allocated")), None)

    name = wait_for(usable, 60, 0.5, what="a node that is not drained or down").name
    try:
        client.drain(name, "slurmgate test: drain a=b")
        node = next(n for n in client.nodes() if n.name == name)
        assert node.drained and node.reason == "slurmgate test: drain a=b"
        if node.state == "idle":  # nothing runs there, so DOWN disturbs nobody
            log = cluster.dir / "log/slurmctld.log"
            before = log.stat().st_size
            client.set_down(name, "slurmgate test: down")
            # the node may be back before we look (resumed below, or ReturnToService=2 at a site):
            # slurmctld's log is the witness that it went down
            wait_for(lambda: f"node {name} state set to DOWN" in
                     log.read_bytes()[before:].decode(errors="replace"), 10, 0.2,
                     what=f"{name} set DOWN")
        client.resume(name)
    finally:
        node = next(n for n in client.nodes() if n.name == name)
        if node.drained or node.state == "down":
            client.resume(name)

    def back() -> bool:
        n = next(n for n in client.nodes() if n.name == name)
        return not n.drained and n.state in ("idle", "mixed", "allocated") and n.reason is None

    wait_for(back, 60, 0.3, what=f"{name} back in service")
    with pytest.raises(SlurmError, match="Invalid node state"):
        client.resume(name)  # not drained: Slurm says so


@pytest.mark.slurm
def test_cli_errors_name_the_command_and_what_slurm_said(cluster: Cluster):
    client = _client(cluster)
    with pytest.raises(SlurmError) as err:
        client.update_job(999_999, nice=5)
    assert "`scontrol update JobId=999999 Nice=5` failed (exit code 1)" in str(err.value)
    assert "Invalid job id specified" in str(err.value)
    assert err.value.returncode == 1
    with pytest.raises(SlurmError, match="Invalid job id"):
        client.cancel(999_999)
    with pytest.raises(SlurmError, match="Invalid job id"):
        client.hold(999_999)
    with pytest.raises(SlurmError, match="Invalid job id"):
        client.release(999_999)
    with pytest.raises(SlurmError, match="Invalid node name"):
        client.drain("nosuchnode", "slurmgate test")
    assert client.job(999_999) is None


@pytest.mark.slurm
def test_cli_unsafe_values_leave_the_job_alone(cluster: Cluster):
    client = _client(cluster)
    job_id = cluster.submit_ok("alice", "--begin=now+1hour", wrap="true")
    try:
        before = client.job(job_id)
        for fields in ({"comment": "x\nAdminComment=slurmgate:team=nlp"},
                       {"partition": "gpu AdminComment=x"}, {"exc_nodes": "a=b"}):
            with pytest.raises(InvalidSlurmValue):
                client.update_job(job_id, **fields)
        assert client.job(job_id) == before
    finally:
        cluster.scancel(job_id)


# --------------------------------------------------------------------------------------------
# PySlurm on the fake pyslurm module
