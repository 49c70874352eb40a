"""policies.settlement: pricing and credit of a finished run, over plain data (no database)."""

from __future__ import annotations

from typing import Any

import pytest

from policies import settlement
from policies.config import Policy

T0 = 1_790_035_200.0
HOUR = 3600.0


def run(**over: Any) -> dict[str, Any]:
    row = {"start_ts": T0, "end_ts": T0 + 2 * HOUR, "gpus": 8.0, "node_count": 2,
           "rid": "r1", "gpu_type": "a100", "cpus": 32.0, "mem_mb": 256_000.0,
           "energy_j": None, "partition": "gpu", "util_mean": 50.0}
    row.update(over)
    return row


def node(gpu_type: str = "a100", count: int = 4, start: float = T0,
         end: float = T0 + 2 * HOUR) -> dict[str, Any]:
    return {"gpu_type": gpu_type, "gpu_count": count, "gpu_seconds": count * (end - start),
            "start_ts": start, "end_ts": end}


def policy() -> Policy:
    return Policy.model_validate({
        "rates": {"gpu_hour": {"a100": 2.0, "h100": 4.0}, "cpu_core_hour": 0.01},
        "partitions": {"gpu": {"default_gpu_type": "a100"}},
        "requeue": {"credit_preemption": True},
    })


def test_nodes_that_never_reported_are_charged_their_share() -> None:
    use = settlement.usage(run(), [node()])
    assert use.seconds == 2 * HOUR
    assert use.gpu_seconds == 8 * 2 * HOUR  # the silent node: 8 GPUs / 2 nodes x 2 h
    assert use.parts == [("a100", 8 * 2 * HOUR)]
    # without a reservation, the reporting nodes say what a node had
    use = settlement.usage(run(rid=None, gpus=None), [node(count=2)])
    assert use.gpu_seconds == 2 * 2 * HOUR * 2


def test_without_node_records_the_allocation_is_split_over_a_mixed_request() -> None:
    use = settlement.usage(run(gpu_type="a100+h100"), [])
    assert sorted(use.parts, key=str) == [("a100", 8 * HOUR), ("h100", 8 * HOUR)]
    use = settlement.usage(run(gpus=0.0), [])
    assert use.gpu_seconds == 0 and use.parts == [("a100", 0.0)]
    assert settlement.usage(run(gpus=0.0, gpu_type="a100+h100"), []).parts == [(None, 0.0)]


def test_a_run_without_a_span_takes_its_nodes_span() -> None:
    nodes = [node(start=T0, end=T0 + HOUR), node(start=T0 + 60, end=T0 + 2 * HOUR)]
    assert settlement.elapsed_seconds(run(start_ts=None), nodes) == 2 * HOUR
    assert settlement.elapsed_seconds(run(start_ts=None), []) == 0.0
    use = settlement.usage(run(start_ts=None, end_ts=None, gpus=4.0, node_count=1),
                           [node(count=4, start=T0, end=T0)])
    assert use.seconds == 0.0


def test_each_gpu_type_is_priced_the_largest_first() -> None:
    calls: list[dict[str, Any]] = []

    def cost_fn(**kw: Any) -> dict[str, float]:
        calls.append(kw)
        return {"gpu": kw["gpus"], "cpu": kw["cpus"], "mem": 0.0, "energy": 0.0,
                "total": kw["gpus"] + kw["cpus"]}

    use = settlement.usage(run(node_count=2), [node("h100", 2), node("a100", 4)])
    total = settlement.price(use, run(), policy(), cost_fn)
    assert [c["gpu_type"] for c in calls] == ["a100", "h100"]
    assert [c["cpus"] for c in calls] == [32, 0]  # CPUs and memory go with the first
    assert total == {"gpu": 6.0, "cpu": 32.0, "mem": 0.0, "energy": 0.0, "total": 38.0}


def test_charges_round_and_price_the_idle_time() -> None:
    out = settlement.charges({"gpu": 10.0000004, "cpu": 1.0, "mem": 0.5, "energy": 0.25,
                              "total": 11.7500004}, util_mean=25.0)
    assert out == {"cost": 11.75, "cost_gpu": 10.0, "cost_cpu": 1.0, "cost_mem": 0.5,
                   "cost_energy": 0.25, "cost_idle": 7.5}
    assert settlement.charges(dict.fromkeys(("gpu", "cpu", "mem", "energy", "total"), 1.0),
                              None)["cost_idle"] is None
    assert settlement.money(0.1234565) == round(0.1234565, 6)


def test_default_gpu_type() -> None:
    assert settlement.default_gpu_type(policy(), "gpu") == "a100"
    assert settlement.default_gpu_type(policy(), None) is None


@pytest.mark.parametrize(("state", "reason", "want"), [
    # credited only once the failure handler confirmed the failure with Slurm
    ("NODE_FAIL", None, (0.0, "node_failure_pending")),
    ("PREEMPTED", None, (0.0, "preemption_pending")),
    ("NODE_FAIL", "node_failure_pending", (0.0, "node_failure_pending")),
    ("NODE_FAIL", "node_failure", (12.5, "node_failure")),  # confirmed
    ("PREEMPTED", "preemption", (12.5, "preemption")),
    ("COMPLETED", None, (0.0, None)),
    ("COMPLETED", "node_failure", (0.0, None)),  # re-settled: the automatic credit goes
    ("COMPLETED", "node_failure_pending", (0.0, None)),
    ("NODE_FAIL", "admin: bad node", None),      # an admin's credit stands
])
def test_auto_credit(state: str, reason: str | None, want: Any) -> None:
    assert settlement.auto_credit(state, 12.5, reason, policy().requeue) == want
    no_preempt = Policy.model_validate({}).requeue
    assert settlement.auto_credit("PREEMPTED", 12.5, None, no_preempt) == (0.0, None)
    assert settlement.auto_credit("PREEMPTED", 12.5, "preemption", no_preempt) == (0.0, None)
    assert settlement.confirm_credit_reason("node_failure_pending") == "node_failure"
    assert settlement.confirm_credit_reason("node_failure") is None
    assert settlement.confirm_credit_reason("admin: bad node") is None
