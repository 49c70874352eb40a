"""Array reservations follow what Slurm really runs (slurm_plugin/daemon/recheck.py): Slurm
22.05 applies a user's `scontrol update JobId=X ArrayTaskThrottle=N` even when job_modify
refuses it, so the reconcile loop re-prices a reservation up when Slurm may run more tasks at
once than were reserved; and an array's reservation closes when its last task has gone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from db.store import Store, open_store
from policies.config import Policy
from policies.reservations import run_settles_reservation
from slurm_plugin.daemon.recheck import queued_jobs
from slurm_plugin.daemon.service import Daemon
from slurm_plugin.slurm.cli_backend import CliSlurm, job_from_squeue
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tests.unit.test_recheck import RecheckingDaemon

PER_TASK = 4.0


def make_policy(tmp_path: Path, concurrency: str = "throttle") -> Policy:
    return Policy.model_validate({
        "daemon": {"cluster": "c1", "log_file": str(tmp_path / "daemon.log")},
        "teams": {"vision": {"accounts": ["vis"], "members": ["alice"], "budget": 10_000.0}},
        "rates": {"gpu_hour": {"a100": 2.0}},
        "partitions": {"gpu": {"default_gpu_type": "a100"}},
        "budgets": {"array_concurrency": concurrency},
    })


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = open_store(tmp_path / "sg.db")
    yield s
    s.close()


@pytest.fixture
def slurm() -> SyntheticSlurm:
    return SyntheticSlurm(n_jobs=0, n_nodes=4)


def daemon_for(tmp_path: Path, store: Store, slurm: SyntheticSlurm,
               concurrency: str = "throttle") -> Daemon:
    return Daemon(str(tmp_path / "policy.toml"), make_policy(tmp_path, concurrency), store,
                  slurm)


def reserved_array(store: Store, slurm: SyntheticSlurm, tasks: int, throttle: int,
                   running: int = 0, reserved: int | None = None) -> tuple[int, str]:
    """An array accepted at submit: `tasks` tasks %throttle, a reservation bound to it
    covering `reserved` tasks (default: min(tasks, throttle)) at PER_TASK each."""
    reserved = reserved or min(tasks, throttle or tasks)
    rid = store.add_reservation({
        "cluster": "c1", "team": "vision", "user": "alice", "account": "vis",
        "partition": "gpu", "gpu_type": "a100", "gpus": 2, "time_limit_min": 60,
        "tasks": reserved, "est_cost": PER_TASK * reserved, "period": "2026-01",
        "created_at": time.time() - 3600,
    })
    array = slurm.add_array(range(tasks), throttle=throttle, running=running, uid=1001,
                            user="alice", account="vis", partition="gpu",
                            admin_comment=f"slurmgate:v2;team=vision;rid={rid}")
    store.bind_reservation(rid, array, "c1")
    return array, rid


def reservation(store: Store, rid: str) -> dict[str, Any]:
    found = store.reservation(rid)
    assert found is not None
    return found


def events(store: Store, kind: str) -> list[dict[str, Any]]:
    return store._query("SELECT * FROM events WHERE kind = :kind ORDER BY id",
                        {"kind": kind})


# -- re-pricing -------------------------------------------------------------------------------


def test_a_raised_throttle_reprices_the_reservation_up(tmp_path: Path, store: Store,
                                                       slurm: SyntheticSlurm) -> None:
    d = daemon_for(tmp_path, store, slurm)
    array, rid = reserved_array(store, slurm, tasks=100, throttle=10, running=10)
    assert "repriced" not in d.reconcile_once()  # as reserved: nothing to do
    slurm.set_array_throttle(array, 50)  # job_modify refused it; Slurm 22.05 applies it
    assert d.reconcile_once()["repriced"] == 1
    r = store.reservation(rid)
    assert r is not None and (r["tasks"], r["est_cost"]) == (50, pytest.approx(200.0))
    assert d.ledger.reserved["vision"] == pytest.approx(200.0)  # the ledger follows
    (event,) = events(store, "reservation_repriced")
    detail = json.loads(event["detail"])
    assert (detail["old_tasks"], detail["new_tasks"], detail["throttle"]) == (10, 50, 50)
    assert event["job_id"] == array and event["team"] == "vision"
    assert "repriced" not in d.reconcile_once()  # once


def test_more_tasks_running_than_reserved_reprice_up(tmp_path: Path, store: Store,
                                                     slurm: SyntheticSlurm) -> None:
    d = daemon_for(tmp_path, store, slurm)
    array, rid = reserved_array(store, slurm, tasks=20, throttle=2, running=2)
    for _ in range(3):  # however it happened, Slurm runs five at once
        slurm.start_array_task(array)
    (q,) = queued_jobs(slurm.jobs()).values()
    assert (q.tasks_holding_nodes(), q.throttle, q.tasks_not_ended()) == (5, 2, 20)
    d.reconcile_once()
    assert reservation(store, rid)["tasks"] == 5


def test_the_throttle_counts_only_tasks_not_ended(tmp_path: Path, store: Store,
                                                  slurm: SyntheticSlurm) -> None:
    d = daemon_for(tmp_path, store, slurm)
    array, rid = reserved_array(store, slurm, tasks=10, throttle=2, running=2)
    for job in [j for j in slurm.jobs() if j.state == "RUNNING"]:
        slurm.finish(job.job_id)
        slurm.purge(job.job_id)
    for _ in range(2):
        slurm.start_array_task(array)
    for job in [j for j in slurm.jobs() if j.state == "RUNNING"]:
        slurm.finish(job.job_id)  # finished, still listed (MinJobAge)
    slurm.set_array_throttle(array, 100)
    (q,) = queued_jobs(slurm.jobs()).values()
    assert q.tasks_not_ended() == 6
    d.reconcile_once()
    assert reservation(store, rid)["tasks"] == 6  # min(throttle 100, 6 tasks left)
    assert reservation(store, rid)["est_cost"] == pytest.approx(6 * PER_TASK)


def test_a_removed_throttle_lets_every_task_left_run(tmp_path: Path, store: Store,
                                                     slurm: SyntheticSlurm) -> None:
    d = daemon_for(tmp_path, store, slurm)
    array, rid = reserved_array(store, slurm, tasks=8, throttle=2, running=1)
    slurm.set_array_throttle(array, 0)
    d.reconcile_once()
    assert reservation(store, rid)["tasks"] == 8


def test_never_repriced_down(tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    d = daemon_for(tmp_path, store, slurm)
    array, rid = reserved_array(store, slurm, tasks=50, throttle=10, running=4)
    slurm.set_array_throttle(array, 1)
    assert "repriced" not in d.reconcile_once()
    assert (reservation(store, rid)["tasks"], reservation(store, rid)["est_cost"]) == (
        10, pytest.approx(40.0))


def test_reserving_every_task_leaves_nothing_to_follow(tmp_path: Path, store: Store,
                                                       slurm: SyntheticSlurm) -> None:
    d = daemon_for(tmp_path, store, slurm, concurrency="all")
    array, rid = reserved_array(store, slurm, tasks=12, throttle=3, running=3, reserved=12)
    slurm.set_array_throttle(array, 0)
    assert "repriced" not in d.reconcile_once()
    assert reservation(store, rid)["tasks"] == 12


def test_a_plain_job_is_never_repriced(tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    d = daemon_for(tmp_path, store, slurm)
    rid = store.add_reservation({"cluster": "c1", "team": "vision", "tasks": 1,
                                 "est_cost": PER_TASK})
    job = slurm.add_job(uid=1001, state="RUNNING",
                        admin_comment=f"slurmgate:v2;team=vision;rid={rid}")
    store.bind_reservation(rid, job.job_id, "c1")
    assert "repriced" not in d.reconcile_once()


def test_store_refuses_a_nonsense_price(store: Store) -> None:
    rid = store.add_reservation({"cluster": "c1", "team": "vision", "tasks": 2,
                                 "est_cost": 8.0})
    with pytest.raises(ValueError, match="at least one task"):
        store.reprice_reservation(rid, 0, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        store.reprice_reservation(rid, 3, float("nan"))
    assert store.reprice_reservation(rid, 3, 12.0)
    store.finish_reservation(rid, "released")
    assert not store.reprice_reservation(rid, 4, 16.0)  # only live reservations
    assert reservation(store, rid)["tasks"] == 3


def test_an_unchecked_array_reserves_its_throttle_then_follows_it(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_plugin.daemon import recheck

    monkeypatch.setattr(recheck, "user_name", lambda uid: "alice")
    d = RecheckingDaemon(str(tmp_path / "policy.toml"), make_policy(tmp_path), store, slurm)
    array = slurm.add_array(range(30), throttle=3, uid=1001, user="alice", account="vis",
                            partition="gpu", comment="project=p", time_limit_min=60,
                            admin_comment="slurmgate:unchecked",
                            tres_per_node="gres:gpu:a100:2")
    d.reconcile_once()  # decided: 3 tasks reserved
    d.reconcile_once()  # bound
    (resv,) = store._query("SELECT * FROM reservations")
    assert (resv["job_id"], resv["tasks"], resv["est_cost"]) == (array, 3, pytest.approx(12.0))
    slurm.set_array_throttle(array, 30)
    d.reconcile_once()
    assert reservation(store, resv["rid"])["tasks"] == 30


# -- when an array's reservation closes -------------------------------------------------------


def test_a_partly_finished_array_keeps_its_reservation_the_last_task_closes_it(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    # a task's settled run never closes the array's reservation ...
    assert not run_settles_reservation({"cost": 1.0, "array_job_id": 40, "state": "COMPLETED"})
    assert run_settles_reservation({"cost": 1.0, "array_job_id": None, "state": "COMPLETED"})
    # ... the reconcile loop releases it once no task is left in Slurm's queue
    d = daemon_for(tmp_path, store, slurm)
    array, rid = reserved_array(store, slurm, tasks=3, throttle=0, running=3)
    tasks = [j.job_id for j in slurm.jobs()]
    assert len(tasks) == 3 and array in tasks  # the last task started is the head record
    long_ago = time.time() - 10_000
    for job_id in tasks:  # two tasks ended and left Slurm's queue
        if job_id != array:
            slurm.finish(job_id)
            slurm.purge(job_id)
    d.missing_since[rid] = long_ago
    d.reconcile_once()
    assert reservation(store, rid)["state"] == "bound"  # one task still runs
    slurm.finish(array)
    d.missing_since[rid] = long_ago
    d.reconcile_once()
    assert reservation(store, rid)["state"] == "bound"  # ended, but still listed (MinJobAge)
    slurm.purge(array)
    d.reconcile_once()
    assert reservation(store, rid)["state"] == "bound"  # gone: the grace starts now
    d.missing_since[rid] = long_ago
    assert d.reconcile_once()["released"] == 1
    assert reservation(store, rid)["state"] == "released"


# -- what squeue says about arrays ------------------------------------------------------------


HEAD_V0038 = {"job_id": 40, "array_job_id": 40, "array_task_id": None, "array_max_tasks": 4,
              "array_task_string": "2-9%4", "job_state": "PENDING"}
TASK_V0038 = {"job_id": 41, "array_job_id": 40, "array_task_id": 0, "array_max_tasks": 4,
              "array_task_string": None, "job_state": "RUNNING"}


def _n(number: int | None) -> dict[str, Any]:
    return {"set": number is not None, "infinite": False, "number": number or 0}


def test_squeue_array_fields_in_v0038_and_v0042() -> None:
    newer = {"job_id": _n(40), "array_job_id": _n(40), "array_task_id": _n(None),
             "array_max_tasks": _n(4), "array_task_string": "2-9%4", "job_state": ["PENDING"]}
    for rec in (HEAD_V0038, newer):
        head = job_from_squeue(rec)
        assert (head.array_job_id, head.array_task_id, head.array_max_tasks) == (40, None, 4)
        assert head.array_task_string == "2-9%4" and head.array_waiting_spec == "2-9"
    task = job_from_squeue(TASK_V0038)
    assert (task.array_task_id, task.array_max_tasks, task.array_waiting_spec) == (0, 4, None)
    unthrottled = job_from_squeue({**HEAD_V0038, "array_max_tasks": 0,
                                   "array_task_string": "0-15:4"})
    assert unthrottled.array_max_tasks is None and unthrottled.array_waiting_spec == "0-15:4"
    (q,) = queued_jobs([head, task, job_from_squeue({**TASK_V0038, "job_id": 42,
                                                     "array_task_id": 1})]).values()
    assert (q.tasks_not_ended(), q.tasks_holding_nodes(), q.throttle) == (10, 2, 4)
    assert q.array_spec() == "2-9,0-1%4"


def test_a_cut_task_list_counts_what_it_shows() -> None:
    head = job_from_squeue({**HEAD_V0038, "array_task_string": "0,2,4,6,8,10,12,..."})
    (q,) = queued_jobs([head]).values()
    assert q.tasks_not_ended() == 7


def test_squeue_is_asked_for_the_whole_task_list(tmp_path: Path) -> None:
    fake = tmp_path / "squeue"
    fake.write_text('#!/bin/sh\nprintf \'{"jobs": [{"job_id": 5, "name": "%s"}]}\' '
                    '"${SLURM_BITSTR_LEN-unset}"\n')
    os.chmod(fake, 0o755)
    (job,) = CliSlurm(bin_dir=str(tmp_path)).jobs()
    assert job.name == "0"
    (job,) = CliSlurm(bin_dir=str(tmp_path), env={"PATH": "/usr/bin:/bin"}).jobs()
    assert job.name == "0"


def test_an_ended_array_lets_its_reservation_go_without_waiting_for_min_job_age(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    from slurm_plugin.daemon.workers import ARRAY_ENDED, ARRAY_SETTLE_S

    d = daemon_for(tmp_path, store, slurm)
    array, rid = reserved_array(store, slurm, tasks=3, throttle=0, running=3)
    ended_at = time.time() - ARRAY_SETTLE_S - 1
    slurm._clock = lambda: ended_at  # noqa: SLF001 (the tasks end at a time we choose)
    tasks = [j.job_id for j in slurm.jobs()]
    for job_id in tasks[:-1]:
        slurm.finish(job_id)
    d.reconcile_once()
    assert reservation(store, rid)["state"] == "bound"  # one task still runs
    slurm.finish(tasks[-1])
    assert d.reconcile_once()["released"] == 1  # every task ended, all still listed
    r = reservation(store, rid)
    assert (r["state"], r["reason"]) == ("released", ARRAY_ENDED)
