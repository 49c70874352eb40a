"""The daemon's idle-GPU scan (slurm_plugin/daemon/idle.py) over a real database file and the
synthetic Slurm: warnings then the action, each once per run and threshold also across a
re-created scanner (a daemon restart), dry run, exemptions, confirmation with Slurm before
acting, a refused action tried again, events and metrics, and no lock held while reading."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from db import ingest_records
from db.reports import events
from db.store import Store, open_store
from policies import records
from policies.config import Policy
from slurm_plugin.daemon.idle import IdleScan, scan_idle_gpus
from slurm_plugin.daemon.service import Daemon
from slurm_plugin.node import spool
from slurm_plugin.slurm.client import Job
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tests.waiting import wait_for

NOW = 1_800_000_000.0
MIN = 60.0
IDLE_KINDS = ["idle_warning", "idle_action"]


def make_policy(tmp_path: Path, database: str | None = None, **idle: Any) -> Policy:
    return Policy.model_validate({
        "daemon": {"cluster": "c1", "log_file": str(tmp_path / "daemon.log"),
                   "database": database or str(tmp_path / "sg.db")},
        "teams": {"vision": {"accounts": ["vis"], "members": ["alice", "carol"]},
                  "nlp": {"accounts": ["nlp"], "members": ["bob"]}},
        "rates": {"currency": "$", "gpu_hour": {"a100": 2.5, "h100": 4.0}},
        "partitions": {"gpu": {"default_gpu_type": "a100"}},
        "nvml": {"sample_seconds": 60},
        "idle": {"enabled": True, **idle},
    })


@pytest.fixture
def store(ledger_target: str) -> Any:
    s = open_store(ledger_target)
    yield s
    s.close()


@pytest.fixture
def slurm() -> SyntheticSlurm:
    return SyntheticSlurm(n_jobs=0, n_nodes=4, clock=lambda: NOW)


def daemon(tmp_path: Path, store: Store, slurm: SyntheticSlurm, **idle: Any) -> Daemon:
    return Daemon(str(tmp_path / "policy.toml"), make_policy(tmp_path, store.path, **idle),
                  store, slurm)


def running(slurm: SyntheticSlurm, *, minutes: float, gpus: int = 4, node: str = "gpu001",
            user: str = "alice", account: str = "vis", now: float = NOW, **over: Any) -> Job:
    """A job running for ``minutes`` before ``now``."""
    fields: dict[str, Any] = {"partition": "gpu", "gpu_type": "a100", "cpus": 0,
                              "node_count": 1, **over}
    return slurm.add_job(state="RUNNING", user=user, account=account, gpus=float(gpus),
                         nodes=node, start_ts=now - minutes * MIN, **fields)


def samples(store: Store, job: Job, utils: list[float], *, minutes: float,
            until: float = NOW) -> None:
    """One sample a minute of each of the job's GPUs for the last ``minutes`` before
    ``until``: GPU i at ``utils[i]`` percent."""
    recs = []
    for k in range(int(minutes)):
        ts = until - (k + 0.5) * MIN
        gpus = [records.sample_gpu(uuid=f"GPU-{job.job_id}-{i}", index=i, gpu_type="a100",
                                   util=u, mem_used_bytes=0, power_w=None, job_id=job.job_id)
                for i, u in enumerate(utils)]
        recs.append(spool.prepare_record(records.gpu_sample_record(
            cluster="c1", node=job.nodes or "gpu001", ts=ts, gpus=gpus)))
    result = ingest_records(store, recs, make_policy(Path("/nonexistent")))
    assert result.errors == []


def idle_events(store: Store) -> list[dict[str, Any]]:
    return sorted(events(store, IDLE_KINDS, 100), key=lambda e: e["id"])


def test_an_idle_job_is_warned_then_cancelled_once_across_restarts(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    idle = running(slurm, minutes=130)
    samples(store, idle, [0, 0, 1, 0], minutes=130)
    busy = running(slurm, minutes=130, node="gpu002", user="bob", account="nlp")
    samples(store, busy, [90, 0, 0, 0], minutes=130)  # 1 of 4 busy: not idle (fraction 1.0)
    d = daemon(tmp_path, store, slurm)
    first = IdleScan(d).scan(slurm.jobs(), now=NOW)
    assert first == {"judged": 2, "exempt": 0, "idle": 1, "warned": 1, "acted": 0}
    [warning] = idle_events(store)
    assert warning["kind"] == "idle_warning" and warning["job_id"] == idle.job_id
    assert (warning["cluster"], warning["restart_count"], warning["user"], warning["team"],
            warning["node"]) == ("c1", 0, "alice", "vision", "gpu001")
    detail = warning["detail"]
    # idle minutes count what the scan reads: the highest threshold and a few intervals
    assert detail == {"idle_minutes": 125.0, "gpus_idle": 4, "gpus_allocated": 4,
                      "cost_so_far": round(4 * 2.5 * 130 / 60, 2), "currency": "$",
                      "action": "cancel", "dry_run": False, "threshold_minutes": 105.0}
    assert "4 of 4 GPUs below 5% utilisation for 125 min, $21.67 so far" in warning["message"]
    assert slurm.job(idle.job_id).state == "RUNNING"  # warned before it is acted on
    # the daemon restarts: a new scanner over the same database
    second = IdleScan(daemon(tmp_path, store, slurm)).scan(slurm.jobs(), now=NOW + MIN)
    assert second["acted"] == 1 and second["warned"] == 0
    assert slurm.job(idle.job_id).state == "CANCELLED"
    assert slurm.job(busy.job_id).state == "RUNNING"
    kinds = [(e["kind"], e["job_id"], e["detail"]["threshold_minutes"])
             for e in idle_events(store)]
    assert kinds == [("idle_warning", idle.job_id, 105.0), ("idle_action", idle.job_id, 120.0)]
    assert idle_events(store)[1]["message"].endswith("cancelled by the idle-GPU policy")
    # and again: nothing new (the job is gone, the events remember)
    third = IdleScan(daemon(tmp_path, store, slurm)).scan(slurm.jobs(), now=NOW + 2 * MIN)
    assert third["warned"] == third["acted"] == 0 and len(idle_events(store)) == 2


def test_each_threshold_once_as_the_job_goes_on_idling(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    job = running(slurm, minutes=125)
    d = daemon(tmp_path, store, slurm, action="requeue")
    found = []
    ingested = 0
    for minute in (30, 61, 62, 106, 110, 121, 125):
        # the samples up to that minute of the run, then a scan at that moment
        samples(store, job, [0, 0, 0, 0], minutes=minute - ingested,
                until=job.start_ts + minute * MIN)
        ingested = minute
        IdleScan(d).scan(slurm.jobs(), now=job.start_ts + minute * MIN)
        found.append([(e["kind"], e["detail"]["threshold_minutes"]) for e in idle_events(store)])
    assert found[0] == [] and found[1] == found[2] == [("idle_warning", 60.0)]
    assert found[3] == found[4] == [("idle_warning", 60.0), ("idle_warning", 105.0)]
    assert found[5] == found[6] == [*found[4], ("idle_action", 120.0)]
    requeued = slurm.job(job.job_id)
    assert requeued.state == "PENDING" and requeued.restart_count == 1
    action = idle_events(store)[-1]
    assert action["detail"]["action"] == "requeue" and action["restart_count"] == 0


def test_dry_run_reports_what_would_happen_and_touches_nothing(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    job = running(slurm, minutes=130)
    samples(store, job, [0, 0, 0, 0], minutes=130)
    for _ in range(3):
        IdleScan(daemon(tmp_path, store, slurm, dry_run=True)).scan(slurm.jobs(), now=NOW)
    got = [(e["kind"], e["detail"]["dry_run"], e["message"][:10]) for e in idle_events(store)]
    assert got == [("idle_warning", True, "[dry run] "), ("idle_action", True, "[dry run] ")]
    assert slurm.job(job.job_id).state == "RUNNING"
    assert "would have been cancelled" in idle_events(store)[1]["message"]
    # dry run off: the real warning first, the real action at the next round
    d = daemon(tmp_path, store, slurm)
    IdleScan(d).scan(slurm.jobs(), now=NOW + MIN)
    assert slurm.job(job.job_id).state == "RUNNING"
    IdleScan(d).scan(slurm.jobs(), now=NOW + 2 * MIN)
    assert slurm.job(job.job_id).state == "CANCELLED"
    assert [e["detail"]["dry_run"] for e in idle_events(store)] == [True, True, False, False]


def test_exempt_and_interactive_jobs_are_left_alone(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    jobs = [running(slurm, minutes=130, user="carol"),  # exempt user
            running(slurm, minutes=130, user="bob", account="nlp"),  # exempt team
            running(slurm, minutes=130, partition="debug"),
            running(slurm, minutes=130, batch=False),  # salloc
            running(slurm, minutes=130, gpus=0)]
    for job in jobs:
        samples(store, job, [0, 0, 0, 0], minutes=130)
    d = daemon(tmp_path, store, slurm, exempt_users=["carol"], exempt_teams=["nlp"],
               exempt_partitions=["debug"])
    for k in range(2):
        counts = IdleScan(d).scan(slurm.jobs(), now=NOW + k * MIN)
        assert counts == {"judged": 0, "exempt": 4, "idle": 0, "warned": 0, "acted": 0}
    assert idle_events(store) == []
    assert all(slurm.job(j.job_id).state == "RUNNING" for j in jobs)


def test_the_action_waits_for_slurm_to_confirm_the_run_and_is_tried_again(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    job = running(slurm, minutes=130)
    samples(store, job, [0, 0, 0, 0], minutes=130)
    d = daemon(tmp_path, store, slurm)
    IdleScan(d).scan(slurm.jobs(), now=NOW)  # the warning
    slurm.fail_next("cancel")  # slurmctld does not answer
    assert IdleScan(d).scan(slurm.jobs(), now=NOW + MIN)["acted"] == 0
    assert slurm.job(job.job_id).state == "RUNNING"
    assert [e["kind"] for e in idle_events(store)] == ["idle_warning"]
    failed = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines()
              if '"idle_action_failed"' in line]
    assert failed and "Unable to contact slurm controller" in failed[0]["reason"]
    assert d.metrics.errors.get("idle") == 1
    # the queue listed the job, but by the time of the action Slurm runs another run of it
    listed = slurm.jobs()
    slurm.requeue(job.job_id)
    assert IdleScan(d).scan(listed, now=NOW + 2 * MIN)["acted"] == 0
    assert slurm.job(job.job_id).state == "PENDING"
    assert "job is PENDING" in (tmp_path / "daemon.log").read_text()


def test_a_refused_action_then_succeeds(tmp_path: Path, store: Store,
                                        slurm: SyntheticSlurm) -> None:
    job = running(slurm, minutes=130)
    samples(store, job, [0, 0, 0, 0], minutes=130)
    d = daemon(tmp_path, store, slurm)
    IdleScan(d).scan(slurm.jobs(), now=NOW)
    slurm.fail_next("cancel")
    IdleScan(d).scan(slurm.jobs(), now=NOW + MIN)
    assert IdleScan(d).scan(slurm.jobs(), now=NOW + 2 * MIN)["acted"] == 1
    assert slurm.job(job.job_id).state == "CANCELLED"
    page = d.metrics.render()
    assert 'slurmgate_idle_warnings_total{dry_run="false"} 1' in page
    assert 'slurmgate_idle_actions_total{action="cancel",dry_run="false"} 1' in page
    assert "slurmgate_idle_scan_seconds " in page and "slurmgate_idle_jobs 1" in page


def test_samples_are_read_beside_the_decision_lock(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    job = running(slurm, minutes=130)
    samples(store, job, [90, 90, 90, 90], minutes=130)  # busy: nothing to write
    d = daemon(tmp_path, store, slurm)
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with d.lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        held.wait(5)
        result: list[dict[str, int]] = []
        scanner = threading.Thread(target=lambda: result.append(
            IdleScan(d).scan(slurm.jobs(), now=NOW)))
        scanner.start()
        wait_for(lambda: result, 10, 0.01, what="a scan while the decision lock is held")
        assert result[0]["judged"] == 1 and result[0]["idle"] == 0
    finally:
        release.set()
        holder.join(5)


def test_the_reconcile_pass_runs_the_scan_at_its_cadence(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    now = time.time()  # reconcile_once reads the wall clock
    fresh = running(slurm, minutes=130, now=now)
    samples(store, fresh, [0, 0, 0, 0], minutes=130, until=now)
    d = daemon(tmp_path, store, slurm, scan_seconds=3600)
    try:
        d.reconcile_once()  # hands the queue to the scan's thread and goes on
        wait_for(lambda: idle_events(store), 10, 0.02, what="the round's warning")
        assert [e["job_id"] for e in idle_events(store)] == [fresh.job_id]
        assert [t.name for t in threading.enumerate()].count("idle_scan") >= 1
        assert scan_idle_gpus(d, slurm.jobs()) is False  # within scan_seconds: no round
        d.reconcile_once()
        log = (tmp_path / "daemon.log").read_text().splitlines()
        assert sum('"event": "idle_scan"' in line for line in log) == 1
        off = daemon(tmp_path, store, slurm, enabled=False)
        assert scan_idle_gpus(off, slurm.jobs()) is False
    finally:
        d.stopping.set()


def test_the_scans_thread_yields_the_cpu_to_decisions() -> None:
    import os

    from slurm_plugin.daemon.idle import SCAN_NICE, lower_this_threads_priority

    seen: list[int] = []

    def worker() -> None:
        lower_this_threads_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)
    assert seen == [max(before, SCAN_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_a_broken_round_is_logged_and_never_raises(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm) -> None:
    running(slurm, minutes=130)
    d = daemon(tmp_path, store, slurm)
    gone = store.path.rsplit("/", 1)[0] + "/elsewhere-that-does-not-exist"
    store.close()  # the database went away under the daemon
    store.path = gone  # and its readers cannot open it again
    assert IdleScan(d).maybe_scan(slurm.jobs()) is None
    assert '"idle_scan_error"' in (tmp_path / "daemon.log").read_text()
    assert d.metrics.errors.get("idle") == 1


def test_one_jobs_trouble_does_not_end_the_round(
        tmp_path: Path, store: Store, slurm: SyntheticSlurm,
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = running(slurm, minutes=130)
    second = running(slurm, minutes=130, node="gpu002")
    for job in (first, second):
        samples(store, job, [0, 0, 0, 0], minutes=130)
    d = daemon(tmp_path, store, slurm)
    scan = IdleScan(d)
    real = scan.cost

    def cost(ij: Any, *args: Any) -> float:
        if ij.job_id == first.job_id:
            raise RuntimeError("a reservation row the code did not expect")
        return real(ij, *args)

    monkeypatch.setattr(scan, "cost", cost)
    assert scan.scan(slurm.jobs(), now=NOW)["warned"] == 1
    assert [e["job_id"] for e in idle_events(store)] == [second.job_id]
    assert '"idle_step_error"' in (tmp_path / "daemon.log").read_text()
