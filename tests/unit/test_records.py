"""The spool record (policies.records): one check, its fast path pinned to it, constructors."""

from __future__ import annotations

import copy
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from policies import records
from policies.records import QUICK, explain, validate

REPO = Path(__file__).resolve().parents[2]
T0 = 1_790_035_200.0
_DROP = object()  # "delete the key"


def node_run(**over: Any) -> dict[str, Any]:
    rec = records.node_run_record(
        cluster="c1", job_id=42, restart_count=0, node="node1", user="vera", account="vis",
        start_ts=T0, end_ts=T0 + 3600, flags=[],
        gpus=[records.node_run_gpu(index=i, minor=i, uuid=f"GPU-{i}", gpu_type="a100",
                                   gpu_seconds=3600.0, energy_j=1.5e6, util_mean=80.0,
                                   util_max=95.0, mem_max_bytes=2**34) for i in range(2)])
    rec.update(v=1, record_id="ab" * 16, written_at=T0 + 3601)
    rec.update(over)
    return rec


def jobcomp(**over: Any) -> dict[str, Any]:
    rec = records.jobcomp_record(
        cluster="c1", job_id=42, state="COMPLETED", submit_ts=T0 - 60, start_ts=T0,
        end_ts=T0 + 3600, nodes="node[1-2]", node_count=2, partition="gpu", uid=1001,
        user="vera", account="vis", exit_code="0:0", derived_ec="0:0", time_limit_min=60,
        work_dir="/home/vera")
    rec.update(v=1, record_id="cd" * 16, written_at=T0 + 3600.5)
    rec.update(over)
    return rec


def gpu_sample(**over: Any) -> dict[str, Any]:
    rec = records.gpu_sample_record(
        cluster="c1", node="node1", ts=T0,
        gpus=[records.sample_gpu(uuid=f"GPU-{i}", index=i, gpu_type="a100", util=50.0,
                                 mem_used_bytes=2**30, power_w=250.0) for i in range(2)])
    rec.update(v=1, record_id="ef" * 16, written_at=T0)
    rec.update(over)
    return rec


BASES = [
    node_run(), jobcomp(), gpu_sample(),
    node_run(start_ts=None, flags=["no_baseline"],
             gpus=[dict(g, gpu_seconds=None, energy_j=None) for g in node_run()["gpus"]]),
    node_run(gpus=[]), gpu_sample(gpus=[]),
    gpu_sample(gpus=[dict(g, job_id=4242) for g in gpu_sample()["gpus"]]),  # the agent's tag
    jobcomp(start_ts=0, end_ts=0, submit_ts=None, nodes=None, node_count=None,
            source="reconcile", restart_count=3, array_job_id=40, array_task_id=2),
    {k: v for k, v in jobcomp().items() if v is not None or k == "restart_count"},
]

# values a field may be given; the JSON ones and a few a direct caller could pass
PALETTE: list[Any] = [
    _DROP, None, "", "x", "GPU-0", 0, 1, -1, 7, 100, 101, 0.0, -0.0, 2.5, -2.5, 99.5, 100.5,
    T0, T0 + 7200, T0 - 7200, 2**63, 2**1100, -(2**1100), math.nan, math.inf, True, False,
    [], ["no_baseline"], [1], {}, {"index": 0}, 1.0,
]


def _set(rec: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(rec)
    obj: Any = out
    for step in path[:-1]:
        obj = obj[step]
    if value is not _DROP:
        obj[path[-1]] = value
    elif isinstance(obj, list):
        del obj[path[-1]]
    else:
        obj.pop(path[-1], None)
    return out


def _paths(rec: dict[str, Any]) -> list[tuple[Any, ...]]:
    paths: list[tuple[Any, ...]] = [(k,) for k in rec]
    gpus = rec.get("gpus")
    for i, gpu in enumerate(gpus if isinstance(gpus, list) else []):
        if isinstance(gpu, dict):
            paths += [("gpus", i, k) for k in gpu]
        paths.append(("gpus", i))
    return paths


def corpus() -> list[Any]:
    out: list[Any] = [None, [], "a record", 42, {"kind": "node_run"}]
    for base in BASES:
        out.append(base)
        for path in _paths(base):
            out.extend(_set(base, path, value) for value in PALETTE)
        if len(base.get("gpus") or []) == 2:  # a GPU twice
            out.append(_set(base, ("gpus", 1, "uuid"), base["gpus"][0]["uuid"]))
        out.append(dict(base, extra_key={"kept": True}))
    rng = random.Random(20261122)
    for _ in range(3000):  # several things wrong (or right) at once
        rec = copy.deepcopy(rng.choice(BASES))
        for _ in range(rng.randint(2, 4)):
            paths = _paths(rec)
            if not paths:
                break
            rec = _set(rec, rng.choice(paths), rng.choice(PALETTE))
        out.append(rec)
    return out


CORPUS = corpus()


def test_the_fast_path_accepts_exactly_what_the_full_check_accepts() -> None:
    valid = invalid = 0
    for rec in CORPUS:
        full = explain(rec)
        assert validate(rec) == full, rec
        if full is None:
            valid += 1
        else:
            invalid += 1
        if (isinstance(rec, dict) and rec.get("v") == 1 and rec.get("v") is not True
                and isinstance(rec.get("kind"), str) and rec["kind"] in QUICK):
            assert QUICK[rec["kind"]](rec) == (full is None), (full, rec)
    assert valid > 500 and invalid > 2000, (valid, invalid)


def test_a_samples_job_tag_is_checked_on_both_paths() -> None:
    def tagged(job_id: Any) -> dict[str, Any]:
        return gpu_sample(gpus=[dict(gpu_sample()["gpus"][0], job_id=job_id)])

    assert validate(tagged(12)) is None and validate(tagged(None)) is None
    assert explain(tagged(-1)) == "gpus[0].job_id must not be negative, got -1"
    assert explain(tagged("12")) == "gpus[0].job_id must be an integer or null, got '12'"
    for bad in (-1, "12", 1.5, True):
        assert QUICK["gpu_sample"](tagged(bad)) is False


def test_every_field_is_in_the_fast_path() -> None:
    """A field added to FIELDS without a quick check would make the paths disagree."""
    for kind, spec in records.FIELDS.items():
        base = {"node_run": node_run, "jobcomp": jobcomp, "gpu_sample": gpu_sample}[kind]()
        for name, typ, _required in spec:
            bad = {"str": 5, "int": "5", "num": "5", "list": "5"}[typ]
            assert QUICK[kind](dict(base, **{name: bad})) is False, (kind, name)
            assert explain(dict(base, **{name: bad})) is not None, (kind, name)


def test_messages() -> None:
    assert explain([1, 2]) == "not a JSON object (got list)"
    assert "unsupported record version 2 " in explain(node_run(v=2))
    assert "unknown record kind 'mystery'" in explain(node_run(kind="mystery"))
    assert explain(node_run(kind=["node_run"])).startswith("unknown record kind")
    assert explain(node_run(job_id="42")) == "job_id must be an integer, got '42'"
    assert explain(jobcomp(node_count="2")) == "node_count must be an integer or null, got '2'"
    assert explain(_set(node_run(), ("node",), _DROP)) == "node is missing"
    assert explain(jobcomp(state="")) == "state must not be empty"
    gpus = [dict(node_run()["gpus"][0], gpu_seconds=-5)]
    assert explain(node_run(gpus=gpus)) == "gpus[0].gpu_seconds must not be negative, got -5"
    gpus = [dict(node_run()["gpus"][0], util_mean=140.0)]
    assert explain(node_run(gpus=gpus)) == "gpus[0].util_mean is a percentage, got 140.0"
    assert "appears twice" in explain(_set(node_run(), ("gpus", 1, "uuid"), "GPU-0"))
    assert "before start_ts" in explain(node_run(end_ts=T0 - 1))
    assert explain(jobcomp(end_ts=math.nan)).startswith("end_ts must be a finite number or null")
    assert explain(node_run(start_ts=2**1100)).startswith("start_ts must be a finite number")


def test_the_resolved_disagreements() -> None:
    """What the spool and the ingest used to read differently, read one way."""
    # jobcomp nodes / node_count: optional (the spool demanded them)
    assert validate(jobcomp(nodes=None, node_count=None)) is None
    # nullable keys may be absent (the spool demanded them present)
    assert validate({k: v for k, v in jobcomp().items() if v is not None}) is None
    # a node_run may lack its start and GPU-seconds (the ingest demanded them): incomplete
    incomplete = node_run(start_ts=None,
                          gpus=[dict(g, gpu_seconds=None) for g in node_run()["gpus"]])
    assert validate(incomplete) is None and not records.is_complete(incomplete)
    assert not records.is_complete(_set(node_run(), ("gpus", 0, "gpu_seconds"), None))
    assert records.is_complete(node_run()) and records.is_complete(jobcomp())
    # the ingest's rules bind the spool too: non-empty names, no negatives, percentages
    assert validate(node_run(cluster="")) == "cluster must not be empty"
    assert validate(node_run(written_at=-1.0)) is not None
    # reconcile's source is a listed, optional string
    assert validate(jobcomp(source="reconcile")) is None
    assert validate(jobcomp(source=5)) == "source must be a string or null, got 5"
    # flags are informational: never a reason to refuse a record
    assert validate(node_run(flags="no_baseline")) is None
    # Slurm's run id (25.11 and later): an optional string on both kinds that carry a run
    assert validate(node_run(sluid="s8CNM8SYJPCA00")) is None
    assert validate(jobcomp(sluid="s8CNM8SYJPCA00")) is None
    assert validate(jobcomp(sluid=7)) == "sluid must be a string or null, got 7"


def test_constructors_keep_the_records_bytes() -> None:
    """Records already in spools were written with these keys in this order."""
    assert list(node_run()) == [
        "kind", "cluster", "job_id", "restart_count", "node", "user", "account", "start_ts",
        "end_ts", "gpus", "flags", "v", "record_id", "written_at"]
    assert list(node_run()["gpus"][0]) == [
        "index", "minor", "uuid", "gpu_type", "energy_j", "util_mean", "util_max",
        "mem_max_bytes", "gpu_seconds"]
    assert list(records.jobcomp_record(cluster="c", job_id=1, state="COMPLETED")) == [
        "kind", "cluster", "job_id", "restart_count", "state", "submit_ts", "start_ts",
        "end_ts", "nodes", "node_count", "partition", "uid", "user", "account", "exit_code",
        "derived_ec", "time_limit_min", "array_job_id", "array_task_id", "work_dir"]
    assert list(records.jobcomp_record(cluster="c", job_id=1, state="X",
                                       source="reconcile"))[-1] == "source"
    assert list(records.jobcomp_record(cluster="c", job_id=1, state="X",
                                       sluid="s1"))[-1] == "sluid"
    assert list(gpu_sample()) == ["kind", "cluster", "node", "ts", "gpus", "v", "record_id",
                                  "written_at"]
    assert list(gpu_sample()["gpus"][0]) == ["uuid", "index", "gpu_type", "util",
                                             "mem_used_bytes", "power_w"]
    tagged = records.sample_gpu(uuid="GPU-0", index=0, gpu_type="a100", util=1.0,
                                mem_used_bytes=0, power_w=None, job_id=7)
    assert list(tagged)[-1] == "job_id" and tagged["job_id"] == 7
    for rec in (node_run(), jobcomp(), gpu_sample()):
        assert validate(json.loads(json.dumps(rec))) is None


def test_valid_records_ingest(ledger_target: str) -> None:
    """What validate passes the ingest takes (ints it can store: both servers' are 64-bit),
    on both ledgers."""
    from db import ingest_records, open_store
    from policies.config import parse_policy

    def storable(value: Any) -> bool:
        if isinstance(value, dict):
            return all(storable(v) for v in value.values())
        if isinstance(value, list):
            return all(storable(v) for v in value)
        return not isinstance(value, int) or abs(value) < 2**63

    good = [r for r in CORPUS if validate(r) is None and storable(r)]
    store = open_store(ledger_target)
    try:
        result = ingest_records(store, good, parse_policy('[rates.gpu_hour]\na100 = 2.0\n'))
    finally:
        store.close()
    assert result.errors == []
    assert sum(result.counts.values()) == len(good)


def test_node_code_can_import_it_without_pydantic() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import policies.records"],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)}, check=True)
    assert "pydantic" not in out.stderr and "sqlite" not in out.stderr


@pytest.mark.parametrize("kind", records.KINDS)
def test_kinds_and_version_have_one_home(kind: str) -> None:
    from slurm_plugin import doctor
    from slurm_plugin.daemon import prometheus
    from slurm_plugin.node import spool

    assert doctor.RECORD_KINDS is prometheus.RECORD_KINDS is records.KINDS
    assert spool.RECORD_VERSION == records.RECORD_VERSION == 1
    assert kind in records.FIELDS
