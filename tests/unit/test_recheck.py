"""Jobs accepted unchecked (fail-open) get their decision on the next reconcile passes
(slurm_plugin/daemon/recheck.py), against the synthetic Slurm client, no cluster."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from db.store import Store, open_store
from policies.config import Policy
from policies.decision import SubmitDecision
from policies.request import JobRequest
from slurm_plugin.daemon import recheck
from slurm_plugin.daemon.recheck import held_code, queued_jobs, request_from_slurm
from slurm_plugin.daemon.service import Daemon
from slurm_plugin.doctor import Doctor
from slurm_plugin.slurm.cli_backend import job_from_squeue
from slurm_plugin.slurm.client import Job
from slurm_plugin.slurm.pyslurm_backend import PySlurm
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tests import fake_pyslurm
from tests.waiting import wait_for

USERS = {1001: "alice", 1002: "nora", 1003: "mallory"}
JOBSTATS = "JS1:H4sIAAAAAAAAA6tWKkotLs0pUbJSUE"


def make_policy(tmp_path: Path, **daemon: Any) -> Policy:
    return Policy.model_validate({
        "daemon": {"cluster": "c1", "log_file": str(tmp_path / "daemon.log"), **daemon},
        "teams": {
            "vision": {"accounts": ["vis"], "members": ["alice"], "budget": 10_000.0},
            "nlp": {"accounts": ["nlp"], "members": ["nora"], "budget": 10_000.0},
        },
        "rates": {"gpu_hour": {"a100": 2.0}},
        "partitions": {"gpu": {"default_gpu_type": "a100"},
                       "scavenger": {"default_gpu_type": "a100", "price_factor": 0.3}},
        "checkpoint": {"inject": "all"},
    })


class RecheckingDaemon(Daemon):
    """The daemon, noting what it was asked to decide."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.asked: list[tuple[JobRequest, str]] = []

    def decide_and_record(self, job: JobRequest, *, origin: str) -> SubmitDecision:
        self.asked.append((job, origin))
        return super().decide_and_record(job, origin=origin)


class Setup(SimpleNamespace):
    daemon: RecheckingDaemon
    store: Store
    slurm: SyntheticSlurm
    log: Path

    def unchecked(self, **fields: Any) -> Job:
        job = {"uid": 1001, "user": "alice", "account": "vis", "partition": "gpu",
               "comment": "project=vit", "admin_comment": f"slurmgate:unchecked {JOBSTATS}",
               "time_limit_min": 60, "tres_per_node": "gres:gpu:a100:2", "state": "PENDING",
               "name": "train"}
        job.update(fields)
        return self.slurm.add_job(**job)

    def job(self, job_id: int) -> Job:
        found = self.slurm.job(job_id)
        assert found is not None
        return found

    def events(self, kind: str) -> list[dict[str, Any]]:
        return self.store._query("SELECT * FROM events WHERE kind = :kind ORDER BY id",
                                 {"kind": kind})

    def reservations(self) -> list[dict[str, Any]]:
        return self.store._query("SELECT * FROM reservations ORDER BY created_at")

    def logged(self, event: str) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == event]


@pytest.fixture(autouse=True)
def fixed_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """uid -> name as USERS says, whatever this machine's user database holds (the user is
    the uid's name, never the name a record carries)."""
    monkeypatch.setattr(recheck, "user_name", lambda uid: USERS.get(uid, str(uid)))


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    def make(**daemon: Any) -> Setup:
        policy = make_policy(tmp_path, **daemon)
        store = open_store(tmp_path / "sg.db")
        slurm = SyntheticSlurm(n_jobs=0, n_nodes=2)
        d = RecheckingDaemon(str(tmp_path / "policy.toml"), policy, store, slurm)
        made.append(store)
        return Setup(daemon=d, store=store, slurm=slurm, log=tmp_path / "daemon.log")

    made: list[Store] = []
    yield make
    for store in made:
        store.close()


# -- accepted ---------------------------------------------------------------------------------


def test_an_accepted_job_gets_its_marks_and_its_reservation_binds(setup: Any) -> None:
    s = setup()
    job = s.unchecked()
    result = s.daemon.reconcile_once()
    assert result == {"bound": 0, "released": 0, "decided": 1, "accepted": 1}
    ((req, origin),) = s.daemon.asked
    assert origin == "recheck" and (req.user, req.uid, req.account) == ("alice", 1001, "vis")
    assert req.tres_per_node == "gres:gpu:a100:2" and req.time_limit == 60
    marked = s.job(job.job_id)
    first, rest = marked.admin_comment.split(" ", 1)
    assert first.startswith("slurmgate:v2;team=vision;rid=r") and rest == JOBSTATS
    (resv,) = s.reservations()
    assert f"rid={resv['rid']}" in first and resv["state"] == "reserved"
    assert resv["est_cost"] == pytest.approx(4.0)  # 2 a100 x 1 h x 2.0
    rc = s.daemon.recheck
    assert rc is not None and set(rc.decided[job.job_id].fields) == {"admin_comment", "nice"}
    assert s.daemon.unchecked_waiting == 0
    # the next pass binds it like any other reservation, and decides nothing again
    assert s.daemon.reconcile_once() == {"bound": 1, "released": 0}
    bound = s.store.reservation(resv["rid"])
    assert bound is not None and (bound["state"], bound["job_id"]) == ("bound", job.job_id)
    assert len(s.daemon.asked) == 1
    (env,) = s.logged("unchecked_env_skipped")  # the checkpoint variable cannot be added
    assert env["job_id"] == job.job_id and "SLURMGATE_CKPT_DIR" in env["env"]


def test_the_owner_is_slurms_uid_never_the_name(setup: Any) -> None:
    s = setup()
    s.unchecked(uid=1003, user="alice")  # Slurm's record says alice; uid 1003 is mallory
    s.daemon.reconcile_once()
    ((req, _),) = s.daemon.asked
    assert (req.user, req.uid) == ("mallory", 1003)


def test_over_the_soft_limit_a_waiting_job_moves_and_a_running_one_stays(setup: Any) -> None:
    s = setup()
    vision = s.daemon.policy.teams["vision"].model_copy(update={"soft_limit": 0.01,
                                                               "budget": 100.0})
    s.daemon.policy = s.daemon.policy.model_copy(update={"teams": {"vision": vision}})
    waiting, running = s.unchecked(), s.unchecked(state="RUNNING")
    s.daemon.reconcile_once()
    assert s.job(waiting.job_id).partition == "scavenger"
    assert s.job(running.job_id).partition == "gpu" and s.job(running.job_id).nice == 0
    assert s.job(running.job_id).admin_comment.startswith("slurmgate:v2;team=vision;rid=")
    (skipped,) = s.logged("unchecked_fields_skipped")
    assert skipped["job_id"] == running.job_id and skipped["fields"] == ["nice", "partition"]


# -- rejected ---------------------------------------------------------------------------------


def test_a_rejected_pending_job_is_held_with_a_short_code(setup: Any) -> None:
    s = setup()
    job = s.unchecked(comment="")  # no project tag
    result = s.daemon.reconcile_once()
    assert result["rejected"] == 1 and "unchecked_waiting" not in result
    held = s.job(job.job_id)
    assert held.held and held.reason == "JobHeldAdmin"
    assert held.admin_comment == f"slurmgate:v2;held=tags {JOBSTATS}"
    (event,) = s.events("unchecked_held")
    assert event["job_id"] == job.job_id and event["team"] == "vision"
    assert event["user"] == "alice" and "missing required tag 'project'" in event["message"]
    assert json.loads(event["detail"])["code"] == "tags"
    assert s.reservations() == [] and len(s.events("reject")) == 1
    s.daemon.reconcile_once()
    assert len(s.daemon.asked) == 1 and len(s.events("unchecked_held")) == 1


@pytest.mark.parametrize("policy", ["finish", "requeue"])
def test_a_rejected_running_job_finishes_or_is_requeued_held(setup: Any, policy: str) -> None:
    s = setup(unchecked_running=policy)
    job = s.unchecked(state="RUNNING", account="nope", uid=1003)  # no team
    s.daemon.reconcile_once()
    after = s.job(job.job_id)
    assert after.admin_comment == f"slurmgate:v2;held=no-team {JOBSTATS}"
    if policy == "finish":
        assert after.state == "RUNNING" and after.restart_count == 0
        (event,) = s.events("unchecked_running_kept")
    else:  # requeued, and held by the admin (requeuehold alone leaves a user hold)
        assert after.held and after.restart_count == 1 and after.reason == "JobHeldAdmin"
        (event,) = s.events("unchecked_requeued")
    assert json.loads(event["detail"])["code"] == "no-team"
    assert s.reservations() == []


def test_reason_codes() -> None:
    assert held_code("no team") == "no-team"
    assert held_code("account: mallory is not a member of vision") == "account"
    assert held_code("tags: missing required tag 'project'") == "tags"
    assert held_code("hard limit: no approval tag") == "hard-limit"
    assert held_code("cost: GPU jobs in partition gpu need a time limit") == "cost"
    assert held_code("bad input: --gres is not text") == "bad-input"
    assert held_code("something new") == "policy"


# -- Slurm failing ------------------------------------------------------------------------------


def test_a_failed_update_is_retried_without_a_second_decision(setup: Any) -> None:
    s = setup()
    job = s.unchecked()
    s.slurm.fail_next("update_job", 4)  # two passes: all fields, then the comment alone
    assert s.daemon.reconcile_once()["unchecked_waiting"] == 1
    assert s.daemon.unchecked_waiting == 1
    (resv,) = s.reservations()
    # missing from the queue's admin comments for long, the reservation is still listed
    s.daemon.missing_since[resv["rid"]] = time.time() - 10_000
    assert s.daemon.reconcile_once()["unchecked_waiting"] == 1
    still = s.store.reservation(resv["rid"])
    assert still is not None and (still["state"], still["job_id"]) == ("bound", job.job_id)
    result = s.daemon.reconcile_once()
    assert result.get("accepted") == 1 and "unchecked_waiting" not in result
    assert f"rid={resv['rid']}" in s.job(job.job_id).admin_comment
    assert len(s.daemon.asked) == 1 and len(s.reservations()) == 1
    assert len(s.logged("unchecked_slurm_error")) == 4


def test_a_failed_hold_writes_no_held_comment_until_the_job_is_held(setup: Any) -> None:
    s = setup()
    job = s.unchecked(comment="")
    s.slurm.fail_next("hold")
    s.daemon.reconcile_once()
    assert s.job(job.job_id).admin_comment.startswith("slurmgate:unchecked")  # not marked
    assert not s.job(job.job_id).held and s.events("unchecked_held") == []
    s.daemon.reconcile_once()
    assert s.job(job.job_id).held and s.job(job.job_id).admin_comment.startswith(
        "slurmgate:v2;held=tags")
    assert len(s.daemon.asked) == 1 and len(s.events("unchecked_held")) == 1


def test_slurm_down_and_a_vanished_job_never_stop_the_loop(setup: Any) -> None:
    s = setup()
    gone = s.unchecked()
    kept = s.unchecked()
    s.slurm.fail_next("update_job", 2)  # the first job's update fails ...
    s.daemon.reconcile_once()
    s.slurm.purge(gone.job_id)  # ... and it vanishes before the retry
    assert s.job(kept.job_id).admin_comment.startswith("slurmgate:v2;team=vision")
    s.slurm.fail_next("jobs")
    with pytest.raises(Exception, match="Unable to contact"):
        s.daemon.reconcile_once()  # the loop logs this and tries again next round
    assert s.daemon.reconcile_once()["bound"] == 1
    assert gone.job_id not in s.daemon.recheck.decided


def test_an_unexpected_error_in_one_job_leaves_the_others_decided(setup: Any) -> None:
    s = setup()
    broken = s.unchecked(uid=None)  # Slurm always knows the uid; if not, nothing is decided
    fine = s.unchecked()
    result = s.daemon.reconcile_once()
    assert result["accepted"] == 1 and result["unchecked_waiting"] == 1
    assert s.job(broken.job_id).admin_comment.startswith("slurmgate:unchecked")
    assert s.job(fine.job_id).admin_comment.startswith("slurmgate:v2;team=vision")
    (err,) = s.logged("unchecked_error")
    assert err["job_id"] == broken.job_id and "no uid" in err["error"]


def test_a_queue_read_older_than_the_marks_decides_nothing_again(setup: Any) -> None:
    s = setup()
    s.unchecked()
    stale, read_at = s.slurm.jobs(), time.monotonic()
    s.daemon.reconcile_once()
    rc = s.daemon.recheck
    assert rc is not None
    assert rc.check_unchecked_jobs(stale, read_at)["decided"] == 0
    assert len(s.daemon.asked) == 1


def test_the_first_pass_runs_at_daemon_start(setup: Any) -> None:
    s = setup(reconcile_seconds=3600.0)
    job = s.unchecked()
    loop = threading.Thread(target=s.daemon.reconcile_loop, daemon=True)
    loop.start()
    try:
        wait_for(lambda: not s.job(job.job_id).admin_comment.startswith("slurmgate:unch"), 10,
                 what="the first reconcile pass")
    finally:
        s.daemon.stopping.set()
        loop.join(10)
    assert not loop.is_alive()


# -- arrays -----------------------------------------------------------------------------------


def test_an_array_is_one_decision_for_its_tasks_not_ended(setup: Any) -> None:
    s = setup()
    array = s.slurm.add_array(range(10), throttle=2, running=2, uid=1001, user="alice",
                              account="vis", partition="gpu", comment="project=vit",
                              admin_comment="slurmgate:unchecked", time_limit_min=60,
                              tres_per_node="gres:gpu:a100:1")
    task0 = next(j.job_id for j in s.slurm.jobs() if j.array_task_id == 0)
    s.slurm.finish(task0)
    s.slurm.update_job(task0, admin_comment=f"slurmgate:unchecked {JOBSTATS}")  # at its end
    (q,) = queued_jobs(s.slurm.jobs()).values()
    assert q.array_spec() == "2-9,1%2" and q.tasks_not_ended() == 9
    s.daemon.reconcile_once()
    ((req, _),) = s.daemon.asked
    assert req.array_inx == "2-9,1%2" and req.job_id == array
    (resv,) = s.reservations()
    assert resv["tasks"] == 2 and resv["est_cost"] == pytest.approx(4.0)
    ours = f"slurmgate:v2;team=vision;rid={resv['rid']};tags=project=vit"
    for j in s.slurm.jobs():  # every record of the array, the ended task's with its own text
        assert j.admin_comment == (f"{ours} {JOBSTATS}" if j.job_id == task0 else ours)
    assert s.daemon.reconcile_once()["bound"] == 1
    assert s.store.reservation(resv["rid"])["job_id"] == array


def test_a_rejected_array_holds_its_waiting_tasks(setup: Any) -> None:
    s = setup(unchecked_running="finish")
    array = s.slurm.add_array(range(4), running=1, uid=1001, user="alice", account="vis",
                              partition="gpu", comment="", time_limit_min=60,
                              admin_comment="slurmgate:unchecked",
                              tres_per_node="gres:gpu:a100:1")
    s.daemon.reconcile_once()
    head = s.job(array)
    assert head.held and head.admin_comment == "slurmgate:v2;held=tags"
    running = [j for j in s.slurm.jobs() if j.state == "RUNNING"]
    assert len(running) == 1 and running[0].admin_comment == "slurmgate:v2;held=tags"
    assert len(s.events("unchecked_held")) == 1
    assert len(s.events("unchecked_running_kept")) == 1
    assert len(s.daemon.asked) == 1


# -- what a decision reads, from each backend ---------------------------------------------------


V0038 = {  # squeue --json, Slurm 22.05 (openapi v0.0.38), a pending job
    "account": "vis", "admin_comment": "slurmgate:unchecked", "array_job_id": 0,
    "array_task_id": None, "array_max_tasks": 0, "array_task_string": "", "comment": "project=v",
    "cpus": 16, "cpus_per_task": 8, "features": "a100|h100", "job_id": 77,
    "job_state": "PENDING", "max_nodes": 0, "memory_per_cpu": None, "memory_per_node": 64000,
    "node_count": 2, "partition": "gpu", "sockets_per_node": None, "tasks": 2,
    "tasks_per_node": 1, "time_limit": 120, "tres_per_job": "", "tres_per_node": "gres:gpu:2",
    "tres_per_socket": "", "tres_per_task": "", "user_id": 1001, "user_name": "alice",
    "name": "train", "current_working_directory": "/home/alice", "requeue": True,
}


def _n(number: int | None) -> dict[str, Any]:
    return {"set": number is not None, "infinite": False, "number": number or 0}


V0042 = {  # the same job from data_parser v0.0.42 (Slurm 24.11)
    **V0038, "job_state": ["PENDING"], "array_job_id": _n(0), "array_task_id": _n(None),
    "array_max_tasks": _n(0), "cpus": _n(16), "cpus_per_task": _n(8), "max_nodes": _n(0),
    "memory_per_cpu": _n(None), "memory_per_node": _n(64000), "node_count": _n(2),
    "tasks": _n(2), "tasks_per_node": _n(1), "time_limit": _n(120),
    "tres_per_node": "gres/gpu:2", "sockets_per_node": _n(None),
}


@pytest.mark.parametrize("rec", [V0038, V0042], ids=["v0.0.38", "v0.0.42"])
def test_squeue_records_carry_the_request(rec: dict[str, Any]) -> None:
    job = job_from_squeue(rec)
    assert (job.num_tasks, job.ntasks_per_node, job.cpus_per_task, job.cpus) == (2, 1, 8, 16)
    assert (job.node_count, job.max_nodes, job.min_mem_per_node, job.min_mem_per_cpu) == (
        2, None, 64000, None)
    assert job.features == "a100|h100" and job.time_limit_min == 120
    assert job.tres_per_node in ("gres:gpu:2", "gres/gpu:2") and job.tres_per_job is None
    assert job.array_task_string is None and job.array_max_tasks is None
    req = request_from_slurm(next(iter(queued_jobs([job]).values())))
    assert (req.user, req.uid, req.account, req.partition, req.comment) == (
        "alice", 1001, "vis", "gpu", "project=v")
    assert (req.min_nodes, req.num_tasks, req.ntasks_per_node, req.cpus_per_task) == (
        2, 2, 1, 8)
    assert (req.min_mem_per_node, req.time_limit, req.features, req.job_id) == (
        64000, 120, "a100|h100", 77)
    assert req.array_inx is None and req.admin_comment == "slurmgate:unchecked"


def test_squeue_sentinels_are_unset() -> None:
    job = job_from_squeue({**V0038, "tasks_per_node": 65534, "cpus_per_task": 65534,
                           "max_nodes": 0xFFFFFFFE, "memory_per_node": 0})
    assert (job.ntasks_per_node, job.cpus_per_task, job.max_nodes, job.min_mem_per_node) == (
        None, None, None, None)


def test_pyslurm_jobs_carry_the_request() -> None:
    client = PySlurm(module=fake_pyslurm)
    pj = SimpleNamespace(
        id=78, state="PENDING", allocated_nodes=None, user_id=1002, user_name="nora",
        account="nlp", partition="gpu", comment="project=p", admin_comment="slurmgate:unchecked",
        tres_per_node="gres/gpu:a100=2", num_nodes=1, max_nodes=2, ntasks=4, ntasks_per_node=4,
        cpus_per_task=2, memory_per_cpu=4000, memory_per_node=None, constraints=["a100|h100"],
        array_id=78, array_task_id=None, array_tasks_waiting="0-15", array_tasks_parallel=4,
        time_limit=30)
    job = client._job(pj)
    assert (job.max_nodes, job.num_tasks, job.ntasks_per_node, job.cpus_per_task) == (
        2, 4, 4, 2)
    assert (job.min_mem_per_cpu, job.min_mem_per_node, job.features) == (4000, None,
                                                                          "a100|h100")
    assert (job.array_job_id, job.array_task_string, job.array_max_tasks) == (78, "0-15", 4)
    assert job.array_waiting_spec == "0-15" and job.tres_per_node == "gres/gpu:a100=2"


# -- doctor -----------------------------------------------------------------------------------


def test_doctor_counts_the_unchecked_jobs_in_slurms_queue(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[daemon]\ncluster = "c1"\n')
    syn = SyntheticSlurm(n_jobs=0, n_nodes=1)

    def doctor() -> Any:
        doc = Doctor(str(policy), slurm_jobs=syn.jobs)
        doc.check_policy()
        doc.check_unchecked()
        return doc.checks[-1]

    ok = doctor()
    assert (ok.name, ok.status, ok.detail) == (
        "unchecked", "OK", "jobs accepted unchecked, waiting for a decision: 0")
    syn.add_array(range(8), running=3, uid=1, admin_comment="slurmgate:unchecked")
    syn.add_job(uid=1, admin_comment="slurmgate:unchecked", state="RUNNING")
    syn.add_job(uid=1, admin_comment="slurmgate:unchecked", state="COMPLETED")  # ended
    syn.add_job(uid=1, admin_comment="slurmgate:v2;team=t;rid=r1")
    warn = doctor()
    assert warn.status == "WARN" and warn.detail.startswith(
        "jobs accepted unchecked, waiting for a decision: 2 (jobs ")
    syn.fail_next("jobs")
    down = doctor()
    assert down.status == "WARN" and "cannot read Slurm's queue" in down.detail
