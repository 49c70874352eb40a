"""Efficiency figures and advice: one job (db.jobs + policies.efficiency) and groups of runs
(db.efficiency), against values computed by hand from a store filled with ingest_records."""

from __future__ import annotations

import json
from typing import Any

import pytest

from db import ingest_records, open_store
from db.efficiency import efficiency
from db.jobs import job_owner, load_job
from db.store import Store
from policies import efficiency as eff
from policies.config import PolicyError, parse_policy
from policies.tags import KEY_RE
from tests.unit.test_db_ingest import HOUR, T0, make_jobcomp, make_node_run, make_policy, reserve


@pytest.fixture
def store(ledger_target: str) -> Store:
    s = open_store(ledger_target)
    yield s
    s.close()


def node_run(job_id: int, utils: list[float | None], **kw: Any) -> dict[str, Any]:
    rec = make_node_run(job_id, gpus=len(utils), **kw)
    for g, u in zip(rec["gpus"], utils, strict=True):
        g["util_mean"] = u
        g["util_max"] = None if u is None else min(100.0, u + 5)
    return rec


def test_one_job_by_hand_with_one_busy_gpu_of_four(store: Store) -> None:
    policy = make_policy()
    reserve(store, 500, est_cost=80.0)
    ingest_records(store, [node_run(500, [80.0, 4.0, 0.0, 0.0]),
                           make_jobcomp(500)], policy, now=T0 + 3 * HOUR)
    job = load_job(store, "c1", 500)
    assert job is not None
    f = eff.job_figures(job, gpu_used_percent=10.0)
    # 4 x a100 x 2 h: gpu 16.00, cpu 0.64, mem 0.50, energy 0.40 (test_db_ingest by hand)
    assert f.cost == pytest.approx(17.54) and f.net == pytest.approx(17.54)
    assert (f.cost_gpu, f.cost_cpu, f.cost_mem, f.cost_energy) == pytest.approx(
        (16.0, 0.64, 0.5, 0.4))
    # util_mean 21 %: busy = 0.21 x 4 x 7200 GPU-s; idle cost = 16 x 0.79
    assert f.gpu_seconds == pytest.approx(4 * 7200)
    assert f.busy_gpu_seconds == pytest.approx(0.21 * 4 * 7200)
    assert f.gpu_efficiency == pytest.approx(0.21)
    assert f.cost_idle == pytest.approx(16.0 * 0.79)
    assert f.energy_kwh == pytest.approx(4.0)
    assert f.gpus_used == 1 and f.gpus_measured == 4 and f.util_max == pytest.approx(85.0)
    assert [g.util_mean for g in f.per_gpu] == [80.0, 4.0, 0.0, 0.0]
    assert f.gpus_by_type == {"a100": 4}
    assert f.reserved == pytest.approx(80.0) and f.settled and f.state == "COMPLETED"
    assert f.elapsed_s == pytest.approx(7200) and f.time_limit_min == 240
    tips = eff.advice(f)
    assert tips[0] == "4 GPUs allocated, 1 used: ask for --gres=gpu:a100:1"
    assert any(t.startswith("GPU utilisation averaged 21 %") for t in tips)
    # 2 h of a 4 h limit is half: no advice on -t at the default 25 %
    assert not any("shorter -t" in t for t in tips)


def test_short_run_of_a_long_limit_and_the_timeout_advice() -> None:
    f = eff.JobFigures(cluster="c1", job_id=1, runs=1, state="COMPLETED", gpus=1,
                       time_limit_min=24 * 60, last_run_s=20 * 60, gpus_used=1,
                       gpus_measured=1, gpu_efficiency=0.9)
    assert eff.advice(f) == [
        "used 20 min of a 24 h limit: a shorter -t reserves less budget (e.g. -t 0:30:00)"]
    f.time_limit_min = 50  # under the 60-minute floor: nothing to say
    assert eff.advice(f) == []
    f.state = "TIMEOUT"
    assert eff.advice(f)[0].startswith("the job hit its time limit")
    idle = eff.JobFigures(cluster="c1", job_id=2, runs=1, gpus=2, gpus_used=0,
                          gpus_measured=2, gpu_efficiency=0.01, state="COMPLETED")
    assert eff.advice(idle)[0].startswith("2 GPUs allocated, none used")
    multi = eff.JobFigures(cluster="c1", job_id=3, runs=1, gpus=8, node_count=2,
                           gpus_used=3, gpus_measured=8, gpu_efficiency=0.9)
    assert eff.advice(multi) == ["8 GPUs allocated, 3 used: ask for --gpus=3"]
    rules = eff.AdviceRules(low_gpu_util_percent=95)
    assert any("averaged 90 %" in t for t in eff.advice(multi, rules))


def test_requeued_job_sums_its_runs_and_counts_progress_from_where_it_resumed(
        store: Store) -> None:
    policy = make_policy()
    reserve(store, 600)
    t1 = T0 + 3 * HOUR
    ingest_records(store, [make_node_run(600, gpus=2),
                           make_jobcomp(600, state="NODE_FAIL"),
                           make_node_run(600, gpus=2, restart=1, start=t1, end=t1 + HOUR),
                           make_jobcomp(600, start=t1, end=t1 + HOUR)], policy, now=t1 + 2 * HOUR)
    # run 0 reached epoch 5 (step 500), run 1 resumed there and reached epoch 8
    store.record_progress("c1", 600, 0, uid=1001, epoch=3, step=300, now=T0 + HOUR)
    store.record_progress("c1", 600, 0, uid=1001, epoch=5, step=500, now=T0 + 2 * HOUR)
    store.record_progress("c1", 600, 0, uid=1001, epoch=4, now=T0 + 2 * HOUR)  # never lowers
    store.record_progress("c1", 600, 1, uid=1001, epoch=8, step=800, now=t1 + HOUR)
    job = load_job(store, "c1", 600)
    assert job is not None and [r["restart_count"] for r in job["runs"]] == [0, 1]
    assert job["progress"][1]["epoch_base"] == 5 and job["progress"][0]["epoch"] == 5
    f = eff.job_figures(job)
    assert f.runs == 2 and f.restarts == 1
    run0, run1 = job["runs"]
    assert f.cost == pytest.approx(run0["cost"] + run1["cost"])
    assert f.epochs == 8 and f.steps == 800
    assert f.cost_per_epoch == pytest.approx(f.net / 8)
    assert [s["state"] for s in f.run_states] == ["NODE_FAIL", "COMPLETED"]
    assert any("requeued 1 time:" in t for t in eff.advice(f))
    with pytest.raises(ValueError, match="whole number"):
        store.record_progress("c1", 600, 1, uid=1001, epoch=-1)
    with pytest.raises(ValueError, match="whole number"):
        store.record_progress("c1", 600, 1, uid=1001, step=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="an epoch or a step"):
        store.record_progress("c1", 600, 1, uid=1001)


def test_a_wrapped_job_id_shows_only_the_newest_job(store: Store) -> None:
    policy = make_policy()
    ingest_records(store, [make_node_run(700, gpus=1), make_jobcomp(700)], policy)
    later = T0 + 40 * 86400
    ingest_records(store, [make_node_run(700, gpus=2, start=later, end=later + HOUR),
                           make_jobcomp(700, start=later, end=later + HOUR)], policy)
    job = load_job(store, "c1", 700)
    assert job is not None and len(job["runs"]) == 1
    assert job["runs"][0]["start_ts"] == later
    assert load_job(store, "c1", 701) is None


def test_array_task_syntax_finds_the_task(store: Store) -> None:
    policy = make_policy()
    ingest_records(store, [make_node_run(801, gpus=1),
                           make_jobcomp(801, array_job_id=800, array_task_id=4),
                           make_node_run(802, gpus=1),
                           make_jobcomp(802, array_job_id=800, array_task_id=5)], policy)
    job = load_job(store, "c1", 800, array_task_id=5)
    assert job is not None and job["job_id"] == 802
    assert load_job(store, "c1", 800, array_task_id=9) is None
    owner = job_owner(store, "c1", 802)
    assert owner is not None and owner["user"] == "vera" and owner["uid"] == 1001
    assert owner["settled"] is True


def test_a_pending_job_has_only_its_reservation(store: Store) -> None:
    reserve(store, 900, est_cost=12.5)
    job = load_job(store, "c1", 900)
    assert job is not None and job["runs"] == []
    f = eff.job_figures(job)
    assert f.runs == 0 and f.reserved == pytest.approx(12.5) and f.user == "vera"
    assert eff.advice(f) == []
    owner = job_owner(store, "c1", 900)
    assert owner == {"user": "vera", "uid": None, "team": "vision", "restart_count": None,
                     "settled": False, "runs": {}}


def _month(store: Store) -> None:
    policy = make_policy()
    for job_id, team, exp, util in ((1, "vision", "e1", 50.0), (2, "vision", "e1", 100.0),
                                    (3, "vision", "e2", None), (4, "nlp", None, 25.0)):
        reserve(store, job_id, team=team, gpus=1, cpus=0, mem_mb=0,
                project="p" + str(job_id % 2))
        with store.transaction():
            store.conn.execute("UPDATE reservations SET tags = :tags WHERE job_id = :job_id",
                               {"tags": json.dumps({"experiment": exp} if exp else {}),
                                "job_id": job_id})
        ingest_records(store, [node_run(job_id, [util], energy_per_gpu=None),
                               make_jobcomp(job_id)], policy)
    store.record_progress("c1", 1, 0, uid=1001, epoch=4)


def test_group_figures_by_team_and_by_tag(store: Store) -> None:
    _month(store)
    rows = {r["team"]: r for r in efficiency(store, T0, T0 + 86400, ("team",))}
    v = rows["vision"]
    # each run: 1 a100 x 2 h = 4.00; vision has 3 runs = 12.00
    assert v["runs"] == 3 and v["net"] == pytest.approx(12.0)
    assert v["cost_per_run"] == pytest.approx(4.0)
    # measured: runs 1 and 2 (4 GPU-h), busy 1 + 2 GPU-h; run 3 is unmeasured
    assert v["measured_gpu_hours"] == pytest.approx(4.0)
    assert v["busy_gpu_hours"] == pytest.approx(3.0)
    assert v["gpu_efficiency"] == pytest.approx(0.75)
    assert v["idle_cost"] == pytest.approx(2.0)  # run 1: half of 4.00
    assert v["experiments"] == 2 and v["experiments_per_1k"] == pytest.approx(2 / 0.012)
    assert v["epochs"] == 4 and v["cost_per_epoch"] == pytest.approx(1.0)
    assert v["steps"] is None and v["cost_per_step"] is None
    n = rows["nlp"]
    assert n["experiments"] == 0 and n["gpu_efficiency"] == pytest.approx(0.25)
    by_exp = {r["tag:experiment"]: r for r in efficiency(store, T0, T0 + 86400,
                                                           ("tag:experiment",))}
    assert set(by_exp) == {"e1", "e2", None} and by_exp["e1"]["runs"] == 2
    one = efficiency(store, T0, T0 + 86400, ())
    assert len(one) == 1 and one[0]["runs"] == 4 and one[0]["experiments"] == 2
    assert efficiency(store, T0, T0 + 86400, ("team",), team="nlp")[0]["team"] == "nlp"
    with pytest.raises(ValueError, match="cannot group efficiency by"):
        efficiency(store, T0, T0 + 86400, ("tag:Bad Key",))


def test_reports_settings_are_checked() -> None:
    assert parse_policy("[reports]\nexperiment_tag = \"run_group\"\n").reports.experiment_tag \
        == "run_group"
    for bad in ('experiment_tag = "Exp-1"', "gpu_used_percent = 120",
                "short_run_fraction = 2"):
        with pytest.raises(PolicyError, match="reports"):
            parse_policy(f"[reports]\n{bad}\n")
    # the setting's key syntax is the tags' own
    for key in ("experiment", "a", "a_b9", "x" * 32, "Exp", "9a", "x" * 33, "a-b"):
        ok = KEY_RE.fullmatch(key) is not None
        try:
            parse_policy(f'[reports]\nexperiment_tag = "{key}"\n')
            accepted = True
        except PolicyError:
            accepted = False
        assert accepted == ok, key


def test_small_helpers() -> None:
    assert eff.duration_text(45) == "45 s" and eff.duration_text(3900) == "1 h 05 min"
    assert eff.suggested_limit(20 * 60) == "0:30:00" and eff.suggested_limit(1) == "0:15:00"
    assert eff.per_thousand(3, 0.0) is None and eff.per_thousand(2, 500.0) == 4.0
    assert eff.busy_gpu_seconds(100.0, 150.0) == 100.0 and eff.busy_gpu_seconds(1.0, None) is None
    assert eff.progress_made({"epoch": 3, "epoch_base": 5}, "epoch") == 0


def test_statement_has_an_efficiency_section(store: Store) -> None:
    from db.chargeback import statement as stmt
    from db.chargeback.periods import month_period

    _month(store)
    policy = make_policy()
    st = stmt.build_statement(store, policy, month_period(2026, 9), efficiency_by=["tag:none"])
    vision = st.team("vision")
    tot = vision.efficiency["totals"]
    assert tot["runs"] == 3 and tot["gpu_efficiency"] == pytest.approx(0.75)
    assert tot["cost_per_epoch"] == pytest.approx(1.0) and tot["experiments"] == 2
    assert list(vision.efficiency["by"]) == ["project", "user", "tag:experiment", "tag:none"]
    by_exp = {r["tag:experiment"]: r["runs"] for r in vision.efficiency["by"]["tag:experiment"]}
    assert by_exp == {"e1": 2, "e2": 1}
    text = stmt.render_text(st)
    assert ("efficiency (runs that ended this month): GPU efficiency 75% of 4.0 measured "
            "GPU-hours; cost per run $4.00; experiments 2 (166.67 per $1k); cost per epoch "
            "$1.00") in text
    assert "efficiency by experiment:" in text
    page = stmt.render_html(st)
    assert "<h3>Efficiency</h3>" in page and "<h3>Efficiency by experiment</h3>" in page
    assert "166.67" in page and "experiments per $1k (2)" in page
    assert stmt.statement_json(st)["teams"][0]["efficiency"]["totals"]["runs"] in (1, 3)
    with pytest.raises(ValueError, match="cannot group efficiency"):
        stmt.build_statement(store, policy, month_period(2026, 9), efficiency_by=["colour"])


def test_export_columns_busy_gpu_hours_and_progress(tmp_path: Any, ledger_target: str) -> None:
    import csv

    from db.chargeback import export as ex
    from db.chargeback.periods import day_period

    with open_store(ledger_target) as s:
        _month(s)
        # a run across midnight: 1 GPU 22:00-02:00 at 40 %, epochs 6 reported
        start = T0 + 22 * HOUR
        reserve(s, 5, gpus=1, cpus=0, mem_mb=0)
        ingest_records(s, [node_run(5, [40.0], start=start, end=start + 4 * HOUR,
                                    energy_per_gpu=None),
                           make_jobcomp(5, start=start, end=start + 4 * HOUR)], make_policy())
        s.record_progress("c1", 5, 0, uid=1001, epoch=6, step=60)
    from datetime import date

    out = {}
    for day in (date(2026, 9, 22), date(2026, 9, 23)):
        res = ex.export_period(ledger_target, day_period(day), tmp_path / "out",
                               parquet=False, jobs=1)
        with open(res.path / "runs.csv", newline="") as fh:
            out[day.day] = {int(r["job_id"]): r for r in csv.DictReader(fh)}
        with open(res.path / "by_team.csv", newline="") as fh:
            out[f"team{day.day}"] = {r["team"]: r for r in csv.DictReader(fh)}
        jsonl = (res.path / "runs.jsonl").read_text().splitlines()
        assert all(set(json.loads(line)) >= {"busy_gpu_hours", "epochs", "steps"}
                   for line in jsonl)
        assert res.manifest["totals"]["busy_gpu_hours"] is not None
    first, second = out[22], out[23]
    assert set(first) == {1, 2, 3, 4, 5}, first.keys()
    # job 1: 2 GPU-h at 50 % = 1.000000 busy; 4 epochs; job 3 unmeasured: empty
    assert first[1]["busy_gpu_hours"] == "1.000000" and first[1]["epochs"] == "4"
    assert first[2]["busy_gpu_hours"] == "2.000000" and first[2]["epochs"] == ""
    assert first[3]["busy_gpu_hours"] == "" and first[3]["util_mean"] == ""
    # job 5 split half and half: 0.8 busy GPU-h each side; its progress where it ended
    assert first[5]["busy_gpu_hours"] == "0.800000" == second[5]["busy_gpu_hours"]
    assert (first[5]["epochs"], second[5]["epochs"], second[5]["steps"]) == ("", "6", "60")
    v = out["team22"]["vision"]
    assert (v["busy_gpu_hours"], v["measured_gpu_hours"]) == ("3.800000", "6.000000")
    assert list(v)[-3:] == ["mode", "busy_gpu_hours", "measured_gpu_hours"]
