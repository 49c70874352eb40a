"""The failure handler acts only on Slurm's word (slurm_plugin/daemon/requeue.py).

A jobcomp record saying NODE_FAIL or PREEMPTED is a claim. Before any requeue, exclusion, drain
or credit the handler asks Slurm (a fake SlurmClient here) whether the job really ended that way
for that run and whether the named node really failed. The store is a real one; the records go
through the real ingest first, as in the daemon.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from db.ingest import ingest_records
from db.store import Store, open_store
from policies.config import Policy
from slurm_plugin.daemon.requeue import FailureHandler, node_failure
from slurm_plugin.slurm.client import Job, Node, SlurmError
from tests.unit.test_db_ingest import HOUR, T0, make_jobcomp, make_node_run, make_policy, reserve


class FakeSlurm:
    """Slurm's view (jobs and nodes) and every action asked of it."""

    def __init__(self, jobs: list[Job], nodes: list[Node]) -> None:
        self.jobs_by_id = {j.job_id: j for j in jobs}
        self.node_list = nodes
        self.actions: list[tuple[Any, ...]] = []
        self.down = False

    def jobs(self, job_ids=None) -> list[Job]:  # noqa: ANN001
        if self.down:
            raise SlurmError("squeue --all --json", 1, "slurm_load_jobs error: timeout")
        wanted = None if job_ids is None else set(job_ids)
        return [j for i, j in self.jobs_by_id.items() if wanted is None or i in wanted]

    def job(self, job_id: int) -> Job | None:
        return self.jobs_by_id.get(job_id)

    def nodes(self) -> list[Node]:
        if self.down:
            raise SlurmError("sinfo --json", 1, "timeout")
        return list(self.node_list)

    def requeue(self, job_id: int, hold: bool = False) -> None:
        self.actions.append(("requeue", job_id))
        job = self.jobs_by_id[job_id]
        self.jobs_by_id[job_id] = replace(job, state="PENDING",
                                          restart_count=job.restart_count + 1)

    def hold(self, job_id: int, reason: str | None = None) -> None:
        self.actions.append(("hold", job_id))

    def update_job(self, job_id: int, **fields: Any) -> None:
        self.actions.append(("update_job", job_id, fields))

    def drain(self, node: str, reason: str) -> None:
        self.actions.append(("drain", node))


def up(name: str, partitions: tuple[str, ...] = ("gpu",)) -> Node:
    return Node(name=name, state="idle", partitions=partitions)


def down(name: str, partitions: tuple[str, ...] = ("gpu",)) -> Node:
    return Node(name=name, state="down", flags=("NOT_RESPONDING",), reason="Not responding",
                partitions=partitions)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = open_store(tmp_path / "sg.db")
    yield s
    s.close()


def run_failure(store: Store, slurm: FakeSlurm, records: list[dict[str, Any]],
                policy: Policy | None = None) -> tuple[FailureHandler, list[int]]:
    policy = policy or make_policy()
    assert ingest_records(store, records, policy).errors == []
    refreshed: list[int] = []
    handler = FailureHandler(store, slurm, lambda: policy, lambda *a, **k: None,
                             credited=lambda: refreshed.append(1))
    handler.handle(records)
    return handler, refreshed


def events(store: Store, kind: str) -> list[dict[str, Any]]:
    return store._query("SELECT * FROM events WHERE kind = :kind ORDER BY id",
                        {"kind": kind})


def failed_run(job_id: int, **kw: Any) -> list[dict[str, Any]]:
    return [make_node_run(job_id, end=T0 + HOUR),
            make_jobcomp(job_id, state="NODE_FAIL", end=T0 + HOUR, **kw)]


def assert_no_action(store: Store, slurm: FakeSlurm, job_id: int) -> dict[str, Any]:
    assert slurm.actions == []
    for kind in ("node_fail", "requeue", "drain", "credit", "preempt"):
        assert events(store, kind) == [], kind
    run = store.run("c1", job_id, 0)
    assert run["credit"] == 0 and run["credit_reason"] in ("node_failure_pending",
                                                            "preemption_pending")
    (ev,) = events(store, "failure_unconfirmed")
    assert ev["job_id"] == job_id and ev["actor"] == "slurmgate"
    return ev


def test_a_forged_node_fail_for_a_job_running_fine_does_nothing(store: Store) -> None:
    reserve(store, 501)
    slurm = FakeSlurm([Job(job_id=501, state="RUNNING", restart_count=0, nodes="node1",
                           requeue=True, partition="gpu")],
                      [down("node1"), up("node2")])  # even a node that is down
    run_failure(store, slurm, failed_run(501))
    ev = assert_no_action(store, slurm, 501)
    assert "Slurm reports job 501 RUNNING with restart count 0, not NODE_FAIL" in ev["message"]
    assert "no requeue, exclusion, drain or credit" in ev["message"]


def test_a_node_fail_naming_an_up_node_gets_no_exclusion_drain_or_credit(store: Store) -> None:
    # the job was requeued (by its owner, say), but the node the record names is fine
    slurm = FakeSlurm([Job(job_id=502, state="PENDING", restart_count=1, requeue=True,
                           partition="gpu")], [up("node1"), up("node2")])
    policy = make_policy(requeue={"drain_after_failures": 1})
    run_failure(store, slurm, failed_run(502), policy)
    ev = assert_no_action(store, slurm, 502)
    assert "node1 idle" in ev["message"] and "up and responding" in ev["message"]


def test_a_node_fail_for_a_job_slurm_does_not_know_does_nothing(store: Store) -> None:
    slurm = FakeSlurm([], [down("node1")])
    run_failure(store, slurm, failed_run(503))
    assert "Slurm does not know job 503" in assert_no_action(store, slurm, 503)["message"]


def test_a_record_naming_no_node_excludes_and_drains_nothing(store: Store) -> None:
    slurm = FakeSlurm([Job(job_id=504, state="PENDING", restart_count=1, requeue=True,
                           partition="gpu")], [down("node1"), down("node2")])
    run_failure(store, slurm, failed_run(504, nodes=""),
                make_policy(requeue={"drain_after_failures": 1}))
    assert "names no node" in assert_no_action(store, slurm, 504)["message"]


def test_slurm_unreachable_means_no_action(store: Store) -> None:
    slurm = FakeSlurm([], [])
    slurm.down = True
    run_failure(store, slurm, failed_run(505))
    assert "could not be asked" in assert_no_action(store, slurm, 505)["message"]


def test_a_confirmed_failure_is_requeued_excluded_credited_and_counted(store: Store) -> None:
    rid = reserve(store, 510)
    slurm = FakeSlurm([Job(job_id=510, state="PENDING", restart_count=1, requeue=True,
                           partition="gpu", node_count=1)],
                      [down("node1"), up("node2"), up("node3")])
    policy = make_policy(requeue={"drain_after_failures": 1})
    records = failed_run(510, nodes="node[1-2]", node_count=2)
    handler, refreshed = run_failure(store, slurm, records, policy)
    run = store.run("c1", 510, 0)
    assert run["cost"] > 0 and run["credit"] == pytest.approx(run["cost"])
    assert run["credit_reason"] == "node_failure" and refreshed == [1]
    (credit,) = events(store, "credit")
    assert "confirmed by Slurm" in credit["message"]
    # only the node Slurm reports failed is excluded, counted and drained
    (fail,) = events(store, "node_fail")
    assert fail["node"] == "node1" and "not_failed" in fail["detail"]
    assert ("update_job", 510, {"start_time": "now", "exc_nodes": "node1"}) in slurm.actions
    assert ("drain", "node1") in slurm.actions and ("drain", "node2") not in slurm.actions
    assert "excluding node1" in events(store, "requeue")[0]["message"]
    assert events(store, "failure_unconfirmed") == []
    assert store.reservation(rid)["state"] in ("bound", "reserved")
    # the same record again acts once
    before = list(slurm.actions)
    handler.handle(records)
    assert slurm.actions == before and len(events(store, "credit")) == 1


def test_a_node_fail_job_slurm_did_not_requeue_is_requeued_by_us(store: Store) -> None:
    # --requeue job Slurm left NODE_FAIL: its node is back up already (ReturnToService=2),
    # but Slurm's own job record says it failed there, on that node alone
    slurm = FakeSlurm([Job(job_id=511, state="NODE_FAIL", restart_count=0, nodes="node1",
                           requeue=True, partition="gpu", node_count=1)],
                      [up("node1"), up("node2")])
    run_failure(store, slurm, failed_run(511))
    assert ("requeue", 511) in slurm.actions
    assert ("update_job", 511, {"start_time": "now", "exc_nodes": "node1"}) in slurm.actions
    assert store.run("c1", 511, 0)["credit_reason"] == "node_failure"


def test_a_failed_job_slurm_will_not_requeue_stops_holding_budget(store: Store) -> None:
    """--no-requeue: the job is over, so its reservation closes now, not when Slurm forgets
    the job (MinJobAge) and the vanished grace has passed; a requeueable one keeps it."""
    gone, kept = reserve(store, 512), reserve(store, 513)
    slurm = FakeSlurm([Job(job_id=512, state="NODE_FAIL", restart_count=0, nodes="node1",
                           requeue=False, partition="gpu", node_count=1),
                       Job(job_id=513, state="PENDING", restart_count=1, nodes="node1",
                           requeue=True, partition="gpu", node_count=1)],
                      [down("node1"), up("node2")])
    _, refreshed = run_failure(store, slurm, failed_run(512) + failed_run(513))
    assert store.reservation(gone)["state"] == "settled"
    assert "not requeueable" in store.reservation(gone)["reason"]
    assert store.reservation(kept)["state"] in ("bound", "reserved")
    assert refreshed  # the daemon's ledger is read again
    assert ("requeue", 512) not in slurm.actions


def test_the_exclusion_is_dropped_when_no_node_set_could_run_the_job(store: Store) -> None:
    # -N 2 on a two-node partition: excluding the failed node would strand the job
    slurm = FakeSlurm([Job(job_id=520, state="PENDING", restart_count=1, requeue=True,
                           partition="gpu", node_count=2)],
                      [down("node1"), up("node2"), up("other", ("cpu",))])
    run_failure(store, slurm, failed_run(520, nodes="node[1-2]", node_count=2))
    assert ("update_job", 520, {"start_time": "now"}) in slurm.actions  # no exc_nodes
    (ev,) = events(store, "exclusion_narrowed")
    assert "no node excluded" in ev["message"] and "needs 2" in ev["message"]
    assert store.run("c1", 520, 0)["credit_reason"] == "node_failure"  # still a failure


def test_the_exclusion_is_narrowed_to_what_leaves_a_runnable_set(store: Store) -> None:
    # three nodes, one already excluded by the user, two failed, the job needs one node
    slurm = FakeSlurm([Job(job_id=521, state="PENDING", restart_count=1, requeue=True,
                           partition="gpu", node_count=1, exc_nodes="node3")],
                      [down("node1"), down("node2"), up("node3")])
    run_failure(store, slurm, failed_run(521, nodes="node[1-2]", node_count=2))
    assert ("update_job", 521, {"start_time": "now", "exc_nodes": "node3,node1"}) \
        in slurm.actions
    (ev,) = events(store, "exclusion_narrowed")
    assert "excluding only node1" in ev["message"]
    assert '"not_excluded": ["node2"]' in ev["detail"]


def test_a_forged_preemption_does_nothing_and_a_real_one_is_credited(store: Store) -> None:
    policy = make_policy(requeue={"credit_preemption": True})
    reserve(store, 530)
    reserve(store, 531)
    slurm = FakeSlurm([Job(job_id=530, state="RUNNING", restart_count=0, partition="scavenger"),
                       Job(job_id=531, state="PENDING", restart_count=1, partition="scavenger",
                           requeue=True)], [])
    recs = [make_jobcomp(530, state="PREEMPTED", partition="scavenger"),
            make_jobcomp(531, state="PREEMPTED", partition="scavenger")]
    run_failure(store, slurm, recs, policy)
    (ev,) = events(store, "failure_unconfirmed")
    assert ev["job_id"] == 530 and "RUNNING" in ev["message"]
    assert store.run("c1", 530, 0)["credit"] == 0
    assert [e["job_id"] for e in events(store, "preempt")] == [531]
    real = store.run("c1", 531, 0)
    assert real["credit"] == pytest.approx(real["cost"]) and real["credit"] > 0
    assert slurm.actions == [("update_job", 531, {"start_time": "now"})]


@pytest.mark.parametrize(("node", "failed"), [
    (Node(name="n", state="down"), True),
    (Node(name="n", state="idle", flags=("NOT_RESPONDING",)), True),
    (Node(name="n", state="mixed", flags=("DRAIN",), reason="Kill task failed"), True),
    (Node(name="n", state="idle", flags=("DRAIN",), reason="maintenance"), False),
    (Node(name="n", state="allocated"), False),
    (Node(name="n", state="idle"), False),
])
def test_what_counts_as_a_failed_node(node: Node, failed: bool) -> None:
    assert (node_failure(node) is not None) == failed
