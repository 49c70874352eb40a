"""Golden fixtures: what each Slurm release's CLI printed for the same four jobs reads into the
same model (tests/fixtures/slurm/<version>/, recorded by contrib/devcluster/record-fixtures.sh:
22.05 openapi v0.0.38, 24.11 data_parser v0.0.42, 26.05 v0.0.45)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from slurm_plugin.doctor import parse_slurm_config
from slurm_plugin.slurm.cli_backend import CliSlurm, job_from_squeue, node_from_sinfo
from tests.conftest import normalise_job

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures/slurm"
VERSIONS = ("22.05", "24.11", "26.05")
JOB_FIELDS = ("state", "held", "gpus", "gpu_type", "partition", "time_limit_min", "num_tasks",
              "node_count", "cpus", "min_mem_per_cpu", "reason", "exit_code", "user", "account",
              "array_task_string", "array_max_tasks", "batch")


def _load(version: str, name: str) -> Any:
    return json.loads((FIXTURES / version / name).read_text())


def _jobs(version: str) -> dict[str, Any]:
    """The recorded jobs by role; array tasks as "array[0]", "array[1]" and "array" (the
    head record, its waiting tasks)."""
    ids = _load(version, "jobs.json")
    roles = {v: k for k, v in ids.items()}
    out: dict[str, Any] = {}
    for rec in _load(version, "squeue.json")["jobs"]:
        job = job_from_squeue(rec)
        if job.job_id in roles:
            out[roles[job.job_id]] = job
        elif job.array_job_id == ids["array"]:
            out[f"array[{job.array_task_id}]"] = job
    return out


def _shape(version: str) -> dict[str, dict[str, Any]]:
    ids = _load(version, "jobs.json")
    shape = {}
    for role, job in _jobs(version).items():
        fields = {f: getattr(job, f) for f in JOB_FIELDS}
        fields["array"] = (None if job.array_job_id is None
                           else (job.array_job_id - ids["array"], job.array_task_id))
        fields["started"] = job.start_ts is not None
        shape[role] = fields
    return shape


@pytest.mark.parametrize("version", VERSIONS[1:])
def test_squeue_json_reads_the_same_on_every_release(version: str):
    assert _shape(version) == _shape("22.05")


def test_the_recorded_jobs_read_as_submitted():
    shape = _shape("22.05")
    assert set(shape) == {"finished", "held", "running", "array", "array[0]", "array[1]"}
    assert (shape["held"]["state"], shape["held"]["held"], shape["held"]["gpus"],
            shape["held"]["gpu_type"], shape["held"]["time_limit_min"]) == (
        "PENDING", True, 2.0, "a100", 60)
    assert (shape["running"]["state"], shape["running"]["gpu_type"]) == ("RUNNING", "h100")
    assert shape["finished"]["state"] == "COMPLETED" and shape["finished"]["gpus"] == 0
    assert shape["array"]["array"] == (0, None)
    assert shape["array"]["array_task_string"] == "2-3%2"
    assert shape["array"]["array_max_tasks"] == 2
    assert (shape["array[0]"]["array"], shape["array[1]"]["array"]) == ((0, 0), (0, 1))


@pytest.mark.parametrize("version", VERSIONS)
def test_an_allocation_without_a_batch_script_reads_as_interactive(version: str):
    """salloc and srun outside sbatch: Slurm's BatchFlag=0 (squeue's batch_flag false); the
    idle-GPU policy leaves such jobs alone."""
    ids = _load(version, "jobs.json")
    rec = next(r for r in _load(version, "squeue.json")["jobs"]
               if job_from_squeue(r).job_id == ids["running"])
    assert job_from_squeue(rec).batch is True
    assert job_from_squeue(dict(rec, batch_flag=False)).batch is False


def _nodes(version: str) -> list[dict[str, Any]]:
    if version == "22.05":
        return _load(version, "sinfo.json")["nodes"]
    assert "nodes" not in _load(version, "sinfo.json")  # grouped rows from 23.02
    return _load(version, "scontrol_nodes.json")["nodes"]


@pytest.mark.parametrize("version", VERSIONS)
def test_node_records_read_the_same_on_every_release(version: str):
    assert [node_from_sinfo(n) for n in _nodes(version)] == \
        [node_from_sinfo(n) for n in _nodes("22.05")]


def _fake(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("version", VERSIONS)
def test_cli_asks_the_command_that_lists_nodes_on_that_release(version: str, tmp_path: Path):
    here = FIXTURES / version
    _fake(tmp_path, "sinfo", f'if [ "$1" = --version ]; then head -n1 {here}/version.txt; '
                             f'else echo "sinfo $*" >> {tmp_path}/runs; cat {here}/sinfo.json; fi')
    nodes_json = here / ("sinfo.json" if version == "22.05" else "scontrol_nodes.json")
    _fake(tmp_path, "scontrol", f'echo "scontrol $*" >> {tmp_path}/runs; cat {nodes_json}')
    cli = CliSlurm(bin_dir=str(tmp_path))
    nodes = {n.name: n for n in cli.nodes()}
    assert (nodes["node1"].gpus_total, nodes["node2"].gpus_total) == ({"a100": 4}, {"h100": 4})
    assert (nodes["node1"].gpus_used, nodes["node1"].alloc_cpus) == ({"a100": 2}, 2)
    cli.nodes()
    runs = (tmp_path / "runs").read_text().splitlines()
    wanted = ("sinfo --all --json" if version == "22.05" else "scontrol show nodes --json")
    assert runs == [wanted, wanted]  # the version asked once


@pytest.mark.parametrize("version", VERSIONS)
def test_the_test_helper_gives_every_release_the_22_05_shape(version: str):
    ids = _load(version, "jobs.json")
    jobs = {j["job_id"]: j for j in map(normalise_job, _load(version, "squeue.json")["jobs"])}
    held, running = jobs[ids["held"]], jobs[ids["running"]]
    assert (held["job_state"], held["priority"], held["time_limit"]) == ("PENDING", 0, 60)
    assert held["admin_comment"].startswith("slurmgate:v2;team=vision;rid=r")
    assert held["array_job_id"] == 0 and held["array_task_id"] is None
    assert running["job_state"] == "RUNNING" and jobs[ids["finished"]]["job_state"] == \
        "COMPLETED"
    tasks = [j for j in jobs.values() if j["array_job_id"] == ids["array"]]
    assert sorted(j["job_state"] for j in tasks) == ["PENDING", "RUNNING", "RUNNING"]


@pytest.mark.parametrize("version", VERSIONS)
def test_doctor_reads_the_hooks_from_every_release(version: str):
    conf = parse_slurm_config((FIXTURES / version / "scontrol_show_config.txt").read_text())
    for key, script in (("prolog", "slurmgate-prolog"), ("epilog", "slurmgate-epilog"),
                        ("jobcomploc", "slurmgate-jobcomp")):
        assert conf[key].endswith(f"/bin/{script}"), (key, conf[key])
    assert conf["prologflags"] == "Alloc"
    assert "prolog[0]" not in conf


def test_list_settings_join_their_items():
    conf = parse_slurm_config("Prolog[0]               = /a\nProlog[1]               = /b\n"
                              "PrologFlags             = Alloc\nEpilog[0] = (null)\n")
    assert (conf["prolog"], conf["prologflags"], conf["epilog"]) == ("/a,/b", "Alloc", "")
