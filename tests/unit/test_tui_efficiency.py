"""Efficiency figures in the TUI, against a store filled with known runs (the real ingest path)
and values worked out by hand: the chargeback rows (GPU efficiency, idle cost, cost per run,
experiments per 1k, cost per epoch, and the CSV export) and the job detail (efficiency line,
advice) of a finished job still in the queue.

Demo policy rates: a100 $2.50/GPU-h, h100 $4.00/GPU-h; the reservations ask for no CPUs or
memory and the nodes report no energy, so a run costs exactly its GPU time.
"""

from __future__ import annotations

import csv
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db.efficiency import efficiency_runs
from db.ingest import ingest_records
from db.store import open_store
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tests.unit.test_tui_support import column, drive, loaded, rows, until
from tui.app import SlurmgateApp
from tui.chargeback_view import LEVELS, month, tree_figures
from tui.demo import CLUSTER, DEMO_NOW, DemoSources
from tui.sources import Viewer

HOUR = 3600.0
END = DEMO_NOW - 2 * HOUR  # 2023-11-14: in the demo clock's month
RID = "r" + "501".rjust(16, "0")


def _record(kind: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "kind": kind, "record_id": uuid.uuid4().hex, "cluster": CLUSTER,
            "written_at": fields.get("end_ts") or END, **fields}


def _run(sources: DemoSources, job_id: int, *, team: str, project: str, user: str,
         gpu_type: str, utils: list[float | None], hours: float,
         experiment: str | None, epochs: int | None, rid: str | None = None) -> None:
    start, end = END - hours * 3600, END
    tags = {"project": project, **({"experiment": experiment} if experiment else {})}
    sources.writer.add_reservation({
        "rid": rid or uuid.uuid4().hex, "cluster": CLUSTER, "job_id": job_id, "team": team,
        "project": project, "user": user, "account": team, "partition": "gpu",
        "gpu_type": gpu_type, "gpus": len(utils), "cpus": 0, "mem_mb": 0,
        "time_limit_min": 1440, "est_cost": 200.0, "period": "2023-11", "tags": tags,
    }, now=start - 120)
    gpus = [{"index": i, "minor": i, "uuid": f"GPU-{job_id}-{i}", "gpu_type": gpu_type,
             "energy_j": None, "util_mean": u, "util_max": None if u is None else u + 5,
             "mem_max_bytes": 2**30, "gpu_seconds": end - start} for i, u in enumerate(utils)]
    records = [
        _record("node_run", job_id=job_id, restart_count=0, node="gpu001", user=user,
                account=team, start_ts=start, end_ts=end, gpus=gpus),
        _record("jobcomp", job_id=job_id, restart_count=0, state="COMPLETED",
                submit_ts=start - 60, start_ts=start, end_ts=end, nodes="gpu001",
                node_count=1, partition="gpu", uid=2000 + job_id, user=user, account=team,
                exit_code="0:0", derived_ec="0:0", time_limit_min=1440,
                work_dir=f"/home/{user}"),
    ]
    result = ingest_records(sources.writer, records, sources.policy, now=DEMO_NOW)
    assert not result.errors and result.settled
    if epochs is not None:
        sources.writer.record_progress(CLUSTER, job_id, 0, uid=2000 + job_id, epoch=epochs,
                                       now=end - 60)


def on_ledger(sources: DemoSources, target: str) -> DemoSources:
    """The demo's sources with their writer and reader on ``target`` (a ``ledger_target``)
    instead of the demo's own SQLite file."""
    sources.writer.close()
    sources.writer = open_store(target)
    sources.policy = sources.policy.model_copy(update={
        "daemon": sources.policy.daemon.model_copy(update={"database": target})})
    return sources


@pytest.fixture
def known(tmp_path: Path, ledger_target: str) -> Iterator[tuple[SlurmgateApp, DemoSources]]:
    slurm = SyntheticSlurm(0, 2, seed=1, gpus_per_node=4, base_ts=DEMO_NOW, cluster=CLUSTER,
                           clock=lambda: DEMO_NOW)
    sources = on_ledger(DemoSources(slurm=slurm, fill_store=False), ledger_target)
    # nlp/llm-pretrain/bob: 2 x a100 for 2 h at 90 % and 5 % (mean 47.5 %), 4 epochs;
    # 1 x h100 for 1 h at 90 %
    _run(sources, 501, team="nlp", project="llm-pretrain", user="bob", gpu_type="a100",
         utils=[90.0, 5.0], hours=2, experiment="exp-a", epochs=4, rid=RID)
    _run(sources, 502, team="nlp", project="llm-pretrain", user="bob", gpu_type="h100",
         utils=[90.0], hours=1, experiment="exp-b", epochs=None)
    # vision/detection/carol: 1 x a100 for 4 h, utilisation not measured, no experiment tag
    _run(sources, 503, team="vision", project="detection", user="carol", gpu_type="a100",
         utils=[None], hours=4, experiment=None, epochs=None)
    # job 501 is still listed by Slurm (finished, within MinJobAge)
    slurm.add_job(job_id=501, user="bob", account="nlp", partition="gpu", state="COMPLETED",
                  gpu_type="a100", gpus=2, nodes="gpu001", node_count=1,
                  submit_ts=END - 2 * HOUR - 60, start_ts=END - 2 * HOUR, end_ts=END,
                  time_limit_min=1440, comment="project=llm-pretrain,experiment=exp-a",
                  admin_comment=f"slurmgate:team=nlp;rid={RID};project=llm-pretrain",
                  work_dir="/home/bob")
    yield SlurmgateApp(sources, export_dir=str(tmp_path)), sources
    sources.close()


def test_chargeback_rows_show_the_efficiency_figures(known, tmp_path: Path) -> None:  # noqa: ANN001
    app, _ = known

    async def scenario(pilot) -> None:  # noqa: ANN001
        cb = await loaded(pilot, "chargeback")
        got = rows(cb.table)
        assert list(got) == ["nlp", "nlp/llm-pretrain", "nlp/llm-pretrain/bob", "vision",
                             "vision/detection", "vision/detection/carol"]
        keys = [k.value for k in cb.table.columns]
        nlp = dict(zip(keys, got["nlp"], strict=True))
        # cost: 2 x 2 h x 2.50 = 10.00 plus 1 h x 4.00 = 4.00; busy GPU-h: 4 x 0.475 + 0.9 =
        # 2.8 of 5.0 (56 %); idle: 10.00 x 0.525 + 4.00 x 0.10 = 5.65; 2 experiments per
        # $14.00 = 142.9 per $1k; epochs: job 501's $10.00 over its 4 epochs
        assert (nlp["runs"], nlp["gpuh"], nlp["eff"], nlp["net"], nlp["idle"]) == (
            "2", "5.0", "56%", "$14.00", "$5.65")
        assert (nlp["per_run"], nlp["per_1k"], nlp["per_epoch"]) == ("$7.00", "142.9", "$2.50")
        assert got["nlp/llm-pretrain/bob"][1:9] == got["nlp"][1:9]
        vision = dict(zip(keys, got["vision"], strict=True))
        # not measured: efficiency unknown (not 0 %), no idle cost; no experiment, no epochs
        assert (vision["eff"], vision["net"], vision["idle"], vision["per_run"]) == (
            "-", "$10.00", "$0.00", "$10.00")
        assert (vision["per_1k"], vision["per_epoch"]) == ("0.0", "-")
        header = [str(c.label) for c in cb.table.columns.values()]
        assert header[3:9] == ["GPU eff", "Net", "Idle cost", "Cost/run", "Exp/$1k",
                               "Cost/epoch"]
        assert "idle $5.65, GPU eff 56%" in app.screen_text()  # only nlp is measured
        await pilot.press("e")
        path = tmp_path / "slurmgate-chargeback-2023-11.csv"
        await until(pilot, lambda: f"to {path}" in app.status.text, 10, "the export")
        by_path = {"/".join(p for p in (r["team"], r["project"], r["user"]) if p): r
                   for r in csv.DictReader(path.open())}
        assert float(by_path["nlp"]["gpu_efficiency"]) == pytest.approx(0.56)
        assert float(by_path["nlp"]["experiments_per_1k"]) == pytest.approx(2 / 14 * 1000,
                                                                             abs=1e-6)
        assert by_path["nlp"]["cost_per_epoch"] == "2.5"
        assert by_path["vision"]["gpu_efficiency"] == "" and by_path["vision"]["epochs"] == ""

    drive(app, scenario, size=(160, 24))


def test_a_member_sees_only_the_figures_of_their_teams(known) -> None:  # noqa: ANN001
    app, sources = known
    sources.viewer = Viewer("bob", False, frozenset({"nlp"}))

    async def scenario(pilot) -> None:  # noqa: ANN001
        cb = await loaded(pilot, "chargeback")
        assert list(rows(cb.table)) == ["nlp", "nlp/llm-pretrain", "nlp/llm-pretrain/bob"]
        assert column(cb.table, "eff") == ["56%"] * 3
        assert "1 teams, net $14.00, idle $5.65, GPU eff 56%" in app.screen_text()

    drive(app, scenario, size=(160, 24))


def test_job_detail_shows_the_jobs_efficiency_and_advice(known) -> None:  # noqa: ANN001
    app, _ = known

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        await until(pilot, lambda: "Efficiency:" in app.screen_text(), 10, "the job's figures")
        text = app.screen_text()
        # 2 GPUs at 90 % and 5 %: 47.5 % busy, one GPU at or above 10 %; $10.00 over 4 epochs
        assert "Efficiency: GPU 48% busy, 1/2 used | net $10.00, idle $5.25 | 4 epochs, " \
            "$2.50/epoch" in text
        assert "Advice: 2 GPUs allocated, 1 used: ask for --gres=gpu:a100:1" in text
        assert "GPU utilisation averaged 48 % (idle GPU time cost $5.25)" in text
        # the third tip (2 h of a 24 h limit) is left to `slurmgate job`
        assert "(+1 more: slurmgate job 501)" in text
        assert f"Reservation: {RID} settled" in text
        assert "runs: #0 COMPLETED" in text
        assert queue.ledgers[(501, 0, "COMPLETED")].figures.net == pytest.approx(10.0)

    drive(app, scenario, size=(200, 30))


def test_a_job_whose_id_the_store_knows_for_another_user_shows_no_figures(known) -> None:  # noqa: ANN001
    app, sources = known
    slurm: Any = sources.slurm
    slurm.purge(501)
    slurm.add_job(job_id=502, user="mallory", account="nlp", partition="gpu",
                  state="FAILED", gpus=1, gpu_type="h100", start_ts=END - HOUR, end_ts=END,
                  time_limit_min=60)

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        await until(pilot, lambda: (502, 0, "FAILED") in queue.ledgers, 10, "the ledger read")
        assert queue.ledgers[(502, 0, "FAILED")].figures is None
        assert "Efficiency:" not in app.screen_text()
        assert "Job 502 mallory" in app.screen_text()

    drive(app, scenario, size=(200, 30))


def test_the_demo_figures_are_not_trivial() -> None:
    sources = DemoSources()
    try:
        start, end, _ = month(DEMO_NOW)
        with sources.store() as store:
            runs = efficiency_runs(store, start, end)
        figures = tree_figures(runs, sources.policy.reports.experiment_tag)
        teams = [f for path, f in figures.items() if len(path) == 1]
        assert len(teams) == 4 and len(LEVELS) == 3
        assert all(0 < f["gpu_efficiency"] < 1 for f in teams)
        assert all(f["experiments"] >= 1 and f["cost_per_epoch"] for f in teams)
    finally:
        sources.close()
