"""Every GPU request shape runs and is accounted once, on whichever Slurm the cluster runs.

The shapes are those whose pricing test_budget_e2e checks against `slurmgate estimate` (the
estimate parses sbatch's arguments itself, the decision reads the job_desc Slurm marshals,
which changes between releases). Here each one runs for real: one settled run per job (per
task for arrays), with the GPUs, GPU type and cost its allocation says.
"""

from __future__ import annotations

import pytest

from db.store import open_store
from tests.cluster.test_accounting_e2e import expected_cost
from tests.cluster.test_budget_e2e import SHAPES
from tests.conftest import FINAL_STATES, Cluster
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm

# shape -> (tasks, GPUs per task's run, GPU type or None for either)
EXPECTED: dict[tuple[str, ...], tuple[int, int, str | None]] = {
    ("--gres=gpu:2",): (1, 2, None),
    ("--gres=gpu:h100:2",): (1, 2, "h100"),
    ("--gpus=2",): (1, 2, None),
    ("--gpus=a100:3",): (1, 3, "a100"),
    ("--gpus-per-node=2", "-N", "2"): (1, 4, None),
    ("--gpus-per-task=1", "-n", "2"): (1, 2, None),
    ("--gpus-per-socket=1", "--sockets-per-node=1"): (1, 1, None),
    ("-N", "2", "--gres=gpu:4"): (1, 8, None),
    ("--gres=gpu:a100:1", "-a", "0-7%2"): (8, 1, "a100"),
    ("--gres=gpu:1", "-a", "0-3"): (4, 1, None),
    ("--gres=gpu:h100:1", "-c", "4", "--mem=8G"): (1, 1, "h100"),
    ("--gres=gpu:1", "-p", "scavenger"): (1, 1, None),
    ("--gres=gpu:1",): (1, 1, None),
    (): (1, 0, None),
}


def runs_for(cluster: Cluster, job_id: int) -> list[dict]:
    """The job's runs, or its tasks' runs for an array, each with its node rows."""
    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        runs = store._query("SELECT * FROM runs WHERE (job_id = :j AND array_job_id IS NULL) "
                            "OR array_job_id = :j", {"j": job_id})
        for run in runs:  # as test_accounting_e2e's expected_cost reads them: gpus as JSON text
            run["node_rows"] = store._query(
                "SELECT * FROM run_nodes WHERE cluster = :c AND job_id = :j "
                "AND restart_count = :r",
                {"c": run["cluster"], "j": run["job_id"], "r": run["restart_count"]})
        return runs
    finally:
        store.close()


def test_every_gpu_request_shape_runs_and_is_accounted_once(cluster: Cluster):
    assert {tuple(s) for s in SHAPES} == set(EXPECTED), "a shape without its expectation"
    jobs: dict[tuple[str, ...], int] = {}
    try:
        for shape in EXPECTED:
            limit = [] if shape == ("--gres=gpu:1",) else ["-t", "5"]  # partition limit
            jobs[shape] = cluster.submit_ok("alice", *limit, *shape, wrap="sleep 1")
        for job_id in jobs.values():
            array = any(a == "-a" for shape, j in jobs.items() if j == job_id for a in shape)
            wait_for(lambda j=job_id, a=array: _finished(cluster, j, a), 240, 1,
                     what=f"job {job_id} and its tasks finished")
        problems = []
        for shape, job_id in jobs.items():
            tasks, gpus, gpu_type = EXPECTED[shape]
            runs = wait_for(lambda j=job_id, n=tasks: (r := runs_for(cluster, j)) and len(r) >= n
                            and all(x["cost"] is not None for x in r) and r, 90, 1,
                            what=f"{tasks} settled run(s) of job {job_id} ({' '.join(shape)})")
            label = f"{' '.join(shape) or 'cpu-only'} (job {job_id})"
            if len(runs) != tasks or len({(r["job_id"], r["restart_count"]) for r in runs}) \
                    != tasks:
                problems.append(f"{label}: {len(runs)} runs, expected {tasks}")
            for run in runs:
                got = (run["state"], run["restart_count"], run["gpus"] or 0)
                if got != ("COMPLETED", 0, gpus):
                    problems.append(f"{label}: run {run['job_id']} is {got}, expected "
                                    f"('COMPLETED', 0, {gpus})")
                if gpu_type and run["gpu_type"] != gpu_type:
                    problems.append(f"{label}: GPU type {run['gpu_type']}, expected {gpu_type}")
                if gpus and sum(n["gpu_count"] for n in run["node_rows"]) != gpus:
                    problems.append(f"{label}: node records hold "
                                    f"{sum(n['gpu_count'] for n in run['node_rows'])} GPUs")
                if not run["rid"] or run["team"] != "vision":
                    problems.append(f"{label}: not matched to its reservation")
                if gpus and shape != ("--gres=gpu:1", "-p", "scavenger") and \
                        run["cost"] != pytest.approx(expected_cost(run), abs=1e-4):
                    problems.append(f"{label}: cost {run['cost']}, expected "
                                    f"{expected_cost(run):.6f}")
        assert not problems, "\n".join(problems)
    finally:
        cluster.scancel(*jobs.values())


def _finished(cluster: Cluster, job_id: int, array: bool) -> bool:
    jobs = cluster.jobs()
    mine = [j for j in jobs.values()
            if j["job_id"] == job_id or (array and j.get("array_job_id") == job_id)]
    return bool(mine) and all(j["job_state"] in FINAL_STATES for j in mine)
