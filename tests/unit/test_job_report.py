"""`slurmgate job`: JOBID parsing, the daemon's ``job`` and ``progress`` ops (who may read
and write what, driven with SO_PEERCRED-style peers), the text rendering, and progress sent
by the checkpoint helper to a real daemon on a real socket."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from db import ingest_records, open_store
from db.jobs import job_progress
from slurm_plugin import checkpoint
from slurm_plugin.cli import main as cli_main
from slurm_plugin.daemon.service import Daemon
from slurm_plugin.job_report import JobSpecError, parse_job_spec, render_short, render_text
from slurm_plugin.protocol import Peer
from tests.unit.test_daemon import RunningDaemon, render_policy
from tests.unit.test_db_ingest import HOUR, T0, make_jobcomp, make_node_run, make_policy
from tests.waiting import wait_for

# uids every Debian system has: daemon (1) owns the jobs, bin (2) leads team vision,
# sys (3) is a member of vision, nobody (65534) is no one's; root (0) is an admin
OWNER, LEAD, MEMBER, STRANGER, ROOT = (Peer(10, uid, uid) for uid in (1, 2, 3, 65534, 0))


def quota_period(d: Daemon) -> str:
    return d.handlers["quota"]({"op": "quota"}, ROOT)["period"]


def policy(**reports: Any):  # noqa: ANN201
    return make_policy(
        teams={"vision": {"accounts": ["vis"], "members": ["daemon", "sys"], "leads": ["bin"],
                          "budget": 1000.0},
               "nlp": {"accounts": ["nlp"]}},
        reports=reports)


def owned(rec: dict[str, Any]) -> dict[str, Any]:
    rec["user"] = "daemon"
    if rec["kind"] == "jobcomp":
        rec["uid"] = 1
    return rec


def daemon_with_jobs(target: str = ":memory:", **reports: Any) -> Daemon:
    """A daemon over a ledger at ``target`` (a ``ledger_target``) holding jobs 41 (settled)
    and 42 (running)."""
    p = policy(**reports)
    p = p.model_copy(update={"daemon": p.daemon.model_copy(update={"database": target})})
    store = open_store(target)
    recs = [owned(make_node_run(41, gpus=4)), owned(make_jobcomp(41))]
    for rec in recs[:1]:
        for g, u in zip(rec["gpus"], (90.0, 2.0, 1.0, 0.0), strict=True):
            g["util_mean"] = u
    # a running job: its node record is in, its completion record is not
    recs.append(owned(make_node_run(42, gpus=1, start=T0 + HOUR, end=T0 + 2 * HOUR)))
    ingest_records(store, recs, p, now=T0 + 3 * HOUR)
    d = Daemon("/nonexistent/policy.toml", p, store, None)
    d.refresh_ledger()
    return d


@pytest.mark.parametrize("text,expected", [
    ("123", (123, None)), (" 77 ", (77, None)), ("123_4", (123, 4)), ("9_0", (9, 0)),
])
def test_job_spec_accepts_ids_and_array_tasks(text: str, expected: tuple) -> None:
    assert parse_job_spec(text) == expected


@pytest.mark.parametrize("text,message", [
    ("abc", "is not a job id"), ("-5", "is negative"), ("99999999999", "out of range"),
    ("0", "out of range"), ("123_[1-3]", "one job or array task at a time"),
    ("1,2", "one job or array task at a time"), ("12+1", "heterogeneous"), ("", "is empty"),
    ("1" * 400, "is not a job id"), ("12_", "is not a job id"), ("１２", "is not a job id"),
])
def test_job_spec_refuses_what_is_not_a_job_id(text: str, message: str) -> None:
    with pytest.raises(JobSpecError, match=message):
        parse_job_spec(text)


def test_owner_lead_and_admin_read_the_report_others_are_refused_alike(ledger_target: str
                                                                        ) -> None:
    d = daemon_with_jobs(ledger_target)
    mine = d.handlers["job"]({"op": "job", "job_id": 41}, OWNER)
    assert mine["ok"] is True
    j = mine["report"]["job"]
    assert (j["job_id"], j["user"], j["uid"], j["gpus_used"]) == (41, "daemon", 1, 1)
    assert mine["report"]["advice"][0] == "4 GPUs allocated, 1 used: ask for --gres=gpu:a100:1"
    assert mine["report"]["budget"]["team"] == "vision"
    # the budget picture is the daemon's ledger of the current period, as `quota` shows it
    quota = d.handlers["quota"]({"op": "quota", "team": "vision"}, OWNER)["teams"][0]
    assert {k: mine["report"]["budget"][k] for k in ("spent", "reserved", "remaining")} == \
        {k: quota[k] for k in ("spent", "reserved", "remaining")}
    assert mine["report"]["period"] == quota_period(d)
    assert d.handlers["job"]({"op": "job", "job_id": 41}, LEAD)["ok"] is True
    assert d.handlers["job"]({"op": "job", "job_id": 41}, ROOT)["ok"] is True
    refused = d.handlers["job"]({"op": "job", "job_id": 41}, STRANGER)
    missing = d.handlers["job"]({"op": "job", "job_id": 4040}, STRANGER)
    assert refused["ok"] is False and refused["error"].startswith("job 41: not found among "
                                                                  "your jobs")
    assert missing["error"] == refused["error"].replace("41", "4040")
    assert "daemon" not in refused["error"] and "vision" not in refused["error"]
    member = d.handlers["job"]({"op": "job", "job_id": 41}, MEMBER)
    assert member["ok"] is False
    assert "not found in the slurmgate ledger" in d.handlers["job"](
        {"op": "job", "job_id": 4040}, ROOT)["error"]


def test_members_see_their_team_s_jobs_when_the_policy_says_so(ledger_target: str) -> None:
    d = daemon_with_jobs(ledger_target, team_members_see_team_jobs=True)
    assert d.handlers["job"]({"op": "job", "job_id": 41}, MEMBER)["ok"] is True
    assert d.handlers["job"]({"op": "job", "job_id": 41}, STRANGER)["ok"] is False


@pytest.mark.parametrize("req", [
    {"job_id": "41"}, {"job_id": -1}, {"job_id": 2**40}, {"job_id": True}, {"job": "4x"},
    {"job_id": 41, "array_task_id": -2}, {"job_id": 41, "cluster": "c" * 200},
    {"job_id": 41, "cluster": ["c1"]}, {},
])
def test_bad_requests_get_a_clear_answer(req: dict[str, Any]) -> None:
    d = daemon_with_jobs()
    resp = d.handle(json.dumps({"v": 1, "op": "job", **req}).encode(), STRANGER)
    assert resp["ok"] is False and resp["error"].startswith("slurmgate job: ")


def test_progress_only_from_the_owner_of_a_running_job(ledger_target: str) -> None:
    d = daemon_with_jobs(ledger_target)
    report = d.handlers["progress"]
    ok = report({"op": "progress", "job_id": 42, "restart_count": 0, "epoch": 3, "step": 30},
                OWNER)
    assert ok["ok"] is True
    report({"op": "progress", "job_id": 42, "restart_count": 0, "epoch": 2}, OWNER)
    stranger = report({"op": "progress", "job_id": 42, "epoch": 99}, STRANGER)
    unknown = report({"op": "progress", "job_id": 4242, "epoch": 99}, STRANGER)
    assert stranger["ok"] is unknown["ok"] is False
    assert unknown["error"].replace("4242", "42") == stranger["error"]
    assert "not one of your running jobs" in stranger["error"]
    assert report({"op": "progress", "job_id": 42, "epoch": 99}, LEAD)["ok"] is False
    settled = report({"op": "progress", "job_id": 41, "epoch": 5}, OWNER)
    assert settled["ok"] is False and "settled" in settled["error"]
    for bad in ({"epoch": -1}, {"epoch": 1.5}, {"step": "7"}, {"epoch": 10**16}, {},
                {"epoch": 1, "restart_count": -1}):
        resp = report({"op": "progress", "job_id": 42, **bad}, OWNER)
        assert resp["ok"] is False and resp["error"].startswith("slurmgate progress: "), bad
    assert d.store is not None and job_progress(d.store, "c1", 42) == {}  # queued only
    assert d.flush_progress() == 1
    row = job_progress(d.store, "c1", 42)[0]
    assert (row["epoch"], row["step"], row["uid"]) == (3, 30, 1)
    # money never moves: the run is still unsettled and the spend is what it was
    assert d.store.run("c1", 42, 0)["cost"] is None


def test_progress_only_for_the_jobs_current_run_and_bounded_per_user(
        monkeypatch: pytest.MonkeyPatch, ledger_target: str) -> None:
    """A user cannot make rows for restart counts that never ran, nor fill the queue."""
    from slurm_plugin.daemon import job_ops

    d = daemon_with_jobs(ledger_target)
    report = d.handlers["progress"]
    # job 42 has run 0 (unsettled) in the ledger: 0, or the next run (1), never beyond
    for restart, ok in ((0, True), (1, True), (2, False), (100_000, False)):
        resp = report({"op": "progress", "job_id": 42, "restart_count": restart, "epoch": 1},
                      OWNER)
        assert resp["ok"] is ok, (restart, resp)
    assert "not the job's current run" in report(
        {"op": "progress", "job_id": 42, "restart_count": 7, "epoch": 1}, OWNER)["error"]
    monkeypatch.setattr(job_ops, "PROGRESS_PENDING_PER_UID", 2)
    busy = report({"op": "progress", "job_id": 41, "restart_count": 1, "epoch": 1}, OWNER)
    assert busy["ok"] is False and "busy" in busy["error"]  # two runs of this uid wait
    assert d.flush_progress() == 2
    assert report({"op": "progress", "job_id": 41, "restart_count": 1, "epoch": 1},
                  OWNER)["ok"] is True


class CountingSlurm:
    """Slurm's view of running jobs 500-599 (all the OWNER's), counting every question."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def job(self, job_id: int) -> Any:
        from slurm_plugin.slurm.client import Job

        self.asked.append(job_id)
        if 500 <= job_id < 600:
            return Job(job_id=job_id, state="RUNNING", user="daemon", uid=1, restart_count=0)
        return None


def test_progress_for_jobs_the_ledger_does_not_know_asks_slurm_sparingly(ledger_target: str
                                                                         ) -> None:
    """Unknown job ids send the daemon to Slurm: at most a burst of SLURM_LOOKUP_BURST, then
    SLURM_LOOKUPS_PER_S for all users together, and each answer is kept for a while, so no
    user can turn progress reports into a stream of squeue calls at slurmctld."""
    from slurm_plugin.daemon import job_ops

    d = daemon_with_jobs(ledger_target)
    slurm = CountingSlurm()
    d.slurm = slurm  # type: ignore[assignment]
    report = d.handlers["progress"]
    answers = [report({"op": "progress", "job_id": 10_000 + i, "epoch": 1}, STRANGER)
               for i in range(50)]
    assert len(slurm.asked) == job_ops.SLURM_LOOKUP_BURST  # the rest were not asked about
    assert all(a["ok"] is False for a in answers)
    assert sum("busy" in a["error"] for a in answers) == 50 - len(slurm.asked)
    wait_for(lambda: report({"op": "progress", "job_id": 500, "epoch": 1}, OWNER)["ok"],
             5, 0.1, what="a lookup allowed again")
    asked = len(slurm.asked)
    for epoch in range(2, 12):  # the same job again: Slurm's answer is remembered
        assert report({"op": "progress", "job_id": 500, "epoch": epoch}, OWNER)["ok"] is True
    assert len(slurm.asked) == asked


def test_text_report_shows_the_figures_and_the_advice(ledger_target: str) -> None:
    d = daemon_with_jobs(ledger_target)
    report = d.handlers["job"]({"op": "job", "job_id": 41}, OWNER)["report"]
    text = render_text(report)
    assert text.startswith("Job 41 on cluster c1\n")
    for piece in ("GPUs     4 x a100", "Runs: 1 (0 restarts)", "COMPLETED",
                  "time used 2 h of a 4 h limit (50 %)", "efficiency 23 %",
                  "GPUs used  1 of 4", "GPU $16.00, CPU $0.00, memory $0.00, energy $0.40",
                  "charged $16.40", "idle GPU time cost $12.28", "Team vision, budget period",
                  "of $1,000.00",
                  "Advice", "  - 4 GPUs allocated, 1 used: ask for --gres=gpu:a100:1"):
        assert piece in text, piece
    assert "node1" in text and "90 %" in text
    short = render_short(report)
    assert short.startswith("slurmgate: job 41: COMPLETED, charged $16.40 (idle GPU time "
                            "$12.28), GPU efficiency 23 %, used 2 h of 4 h")
    assert "ask for --gres=gpu:a100:1" in short


def test_cli_rejects_a_bad_jobid_before_asking_anyone(capsys: pytest.CaptureFixture) -> None:
    for bad, message in (("12a", "is not a job id"), ("-3", "is negative")):
        with pytest.raises(SystemExit) as exc:
            cli_main(["--socket", "/nonexistent.sock", "job", bad])
        assert message in str(exc.value)


def test_cli_reads_the_database_for_admins(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          ledger_target: str) -> None:
    db = ledger_target
    p = policy()
    with open_store(db) as store:
        now = time.time()  # this budget period, whenever the test runs
        ingest_records(store, [owned(make_node_run(41, gpus=2, start=now - 2 * HOUR, end=now)),
                               owned(make_jobcomp(41, start=now - 2 * HOUR, end=now))], p)
    conf = tmp_path / "policy.toml"
    conf.write_text(f'[daemon]\ncluster = "c1"\ndatabase = "{db}"\n'
                    '[teams.vision]\naccounts = ["vis"]\nbudget = 100.0\n'
                    '[rates.gpu_hour]\na100 = 2.0\n')
    assert cli_main(["--config", str(conf), "job", "41", "--db", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["job"]["job_id"] == 41 and out["job"]["cost_gpu"] == pytest.approx(8.0)
    assert out["budget"]["team"] == "vision"
    assert out["budget"]["spent"] == pytest.approx(out["job"]["net"])
    assert cli_main(["--config", str(conf), "job", "41", "--db"]) == 0
    assert "Job 41 on cluster c1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="job 99: not found in"):
        cli_main(["--config", str(conf), "job", "99", "--db", str(db)])


def test_checkpoint_save_reports_progress_to_a_real_daemon(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    state = Path(tempfile.mkdtemp(prefix="sg-progress-"))
    os.chmod(state, 0o755)
    d = RunningDaemon(state)
    d.config.write_text(render_policy(state))
    # a running job of this test's user, bound to its reservation
    with open_store(state / "sg.db") as store:
        store.add_reservation({"cluster": "slurmgate-dev", "job_id": 5150, "team": "vision",
                               "user": pwd.getpwuid(os.getuid()).pw_name, "tags": {},
                               "est_cost": 1.0})
    d.start()
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "5150")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        monkeypatch.setenv(checkpoint.SOCKET_ENV, d.socket)
        ck = checkpoint.save_json(7, {"w": 1}, directory=state / "ck", epoch=2,
                                  progress_step=700)
        assert ck.step == 7
        marker = json.loads((ck.path / checkpoint.MARKER).read_text())
        assert (marker["epoch"], marker["progress_step"]) == (2, 700)
        weights = state / "weights.bin"
        weights.write_bytes(b"w" * 10)
        assert checkpoint.main(["--dir", str(state / "ck"), "save", "8", str(weights),
                                "--epoch", "3"]) == 0

        def recorded() -> dict[str, Any] | None:
            with open_store(state / "sg.db", readonly=True) as reader:
                rows = job_progress(reader, "slurmgate-dev", 5150)
            return rows.get(0)

        row = wait_for(lambda: (r := recorded()) is not None and r["epoch"] == 3 and r,
                       15, what="progress in the ledger")
        assert row["step"] == 700
        monkeypatch.setenv("SLURM_JOB_ID", "5151")  # not this user's job: refused, no raise
        assert checkpoint.report_progress(epoch=1) is False
        monkeypatch.setenv(checkpoint.SOCKET_ENV, str(state / "nothing.sock"))
        assert checkpoint.report_progress(epoch=1) is False  # daemon away: a note, no raise
        with pytest.raises(ValueError, match="whole number"):
            checkpoint.report_progress(epoch=-1)
    finally:
        d.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_one_bound_on_progress_values_everywhere() -> None:
    from db.store import Store
    from slurm_plugin.daemon import job_ops

    assert job_ops.PROGRESS_MAX == Store.PROGRESS_MAX == checkpoint.PROGRESS_MAX
