"""Rate card and cost; every expected amount is worked out by hand in the comment above it."""

from __future__ import annotations

import pytest

from policies.config import Policy, parse_policy
from policies.cost import CostError, Estimate, estimate_job, format_money, run_cost
from policies.gpu import GpuRequestError
from policies.request import JobRequest

POLICY_TOML = """
[rates]
currency = "$"
gpu_hour = { a100 = 2.5, h100 = 4.0 }
cpu_core_hour = 0.05
mem_gb_hour = 0.01
kwh = 0.2

[partitions.gpu]
default_gpu_type = "a100"
max_time_minutes = 1440

[partitions.scavenger]
default_gpu_type = "h100"
price_factor = 0.3
max_time_minutes = 0

[partitions.thirds]
default_gpu_type = "a100"
shards_per_gpu = 3
max_time_minutes = 60
"""


def _policy(extra: str = "", cpu_core_hour: float | None = None) -> Policy:
    text = POLICY_TOML
    if cpu_core_hour is not None:
        text = text.replace("cpu_core_hour = 0.05", f"cpu_core_hour = {cpu_core_hour}")
    return parse_policy(text + extra)


@pytest.fixture
def policy() -> Policy:
    return _policy()


def test_typed_multi_resource_job(policy: Policy) -> None:
    # sbatch -p gpu --gres=gpu:a100:4 -t 24:00:00 -n 1 -c 8 --mem=64G
    # gpu 4 x 2.5 x 24 = 240; cpu 8 x 0.05 x 24 = 9.6; mem 64 GB x 0.01 x 24 = 15.36
    # total 264.96
    req = JobRequest(partition="gpu", tres_per_node="gres:gpu:a100:4", time_limit=24 * 60,
                     num_tasks=1, cpus_per_task=8, min_mem_per_node=64 * 1024)
    est = estimate_job(req, policy)
    assert est.breakdown == {"gpu": 240.0, "cpu": 9.6, "mem": 15.36}
    assert est.amount == pytest.approx(264.96, abs=1e-6)
    assert (est.gpu_type, est.gpus, est.cpus, est.mem_mb, est.nodes) == ("a100", 4.0, 8, 65536, 1)
    assert (est.hours, est.time_source, est.tasks_reserved) == (24.0, "job", 1)
    assert est.describe("$") == "est. max cost $264.96 (4 x a100 x 24.0 h)"


def test_untyped_gpus_take_the_partition_default(policy: Policy) -> None:
    # -p gpu --gres=gpu:2 -t 60: a100 by default; gpu 2 x 2.5 x 1 = 5; cpu 1 x 0.05 = 0.05
    est = estimate_job(JobRequest(partition="gpu", tres_per_node="gres:gpu:2", time_limit=60),
                       policy)
    assert est.gpu_type == "a100"
    assert est.amount == pytest.approx(5.05, abs=1e-6)


def test_partition_price_factor(policy: Policy) -> None:
    # -p scavenger --gres=gpu:1 -t 120: h100 default; (4.0 + 1 x 0.05) x 2 h x 0.3 = 2.43
    est = estimate_job(
        JobRequest(partition="scavenger", tres_per_node="gres:gpu:1", time_limit=120), policy
    )
    assert est.gpu_type == "h100"
    assert est.breakdown == {"gpu": 2.4, "cpu": 0.03, "mem": 0.0}
    assert est.amount == pytest.approx(2.43, abs=1e-6)
    assert "at 0.3x" in est.describe("$")


def test_multi_node_memory_and_cpus(policy: Policy) -> None:
    # -N 2 --gres=gpu:a100:4 --mem=32G -t 30: 8 GPUs, 2 CPUs (1 per node), 64 GB
    # gpu 8 x 2.5 x 0.5 = 10; cpu 2 x 0.05 x 0.5 = 0.05; mem 64 x 0.01 x 0.5 = 0.32; = 10.37
    req = JobRequest(partition="gpu", tres_per_node="gres:gpu:a100:4", min_nodes=2,
                     min_mem_per_node=32 * 1024, time_limit=30)
    est = estimate_job(req, policy)
    assert (est.gpus, est.cpus, est.mem_mb, est.nodes) == (8.0, 2, 65536, 2)
    assert est.amount == pytest.approx(10.37, abs=1e-6)


def test_mem_per_cpu_cpu_only_job(policy: Policy) -> None:
    # -n 4 --mem-per-cpu=2048 -t 60, no GPUs: cpu 4 x 0.05 = 0.2; mem 4 x 2 GB x 0.01 = 0.08
    req = JobRequest(partition="gpu", num_tasks=4, min_mem_per_cpu=2048, time_limit=60)
    est = estimate_job(req, policy)
    assert (est.gpu_type, est.gpus, est.cpus, est.mem_mb) == (None, 0.0, 4, 8192)
    assert est.amount == pytest.approx(0.28, abs=1e-6)
    assert est.describe("$") == "est. max cost $0.28 (4 CPUs x 1.0 h)"


def test_unset_memory_is_not_priced(policy: Policy) -> None:
    # -c 2 -t 60 without --mem: cpu 2 x 0.05 = 0.1, mem 0
    est = estimate_job(JobRequest(partition="gpu", cpus_per_task=2, time_limit=60), policy)
    assert est.mem_mb == 0 and est.breakdown["mem"] == 0.0
    assert est.amount == pytest.approx(0.1, abs=1e-6)


def test_no_time_limit_uses_partition_max(policy: Policy) -> None:
    # -p gpu --gres=gpu:1, no -t: gpu's max_time_minutes 1440 = 24 h
    # gpu 1 x 2.5 x 24 = 60; cpu 0.05 x 24 = 1.2; = 61.2
    est = estimate_job(JobRequest(partition="gpu", tres_per_node="gres:gpu:1"), policy)
    assert (est.hours, est.time_source) == (24.0, "partition")
    assert est.amount == pytest.approx(61.2, abs=1e-6)
    assert "partition gpu's limit" in est.describe("$")


def test_time_limit_zero_means_no_limit(policy: Policy) -> None:
    # -t 0 is Slurm's "no time limit": priced like no -t, at 24 h
    est = estimate_job(JobRequest(partition="gpu", tres_per_node="gres:gpu:1", time_limit=0),
                       policy)
    assert est.time_source == "partition" and est.hours == 24.0


def test_gpu_job_without_time_limit_rejected_where_partition_has_none(policy: Policy) -> None:
    req = JobRequest(partition="scavenger", tres_per_node="gres:gpu:1")
    with pytest.raises(CostError) as caught:
        estimate_job(req, policy)
    assert "add a time limit, e.g. `sbatch -t 04:00:00 ...`" in str(caught.value)
    assert "scavenger" in str(caught.value)


def test_priced_cpu_job_without_time_limit_anywhere_is_refused(policy: Policy) -> None:
    # CPUs cost money here, and neither the job nor the partition has a limit: a run could
    # outlast any reservation, so the job must say how long it runs
    assert policy.rates.cpu_core_hour > 0
    with pytest.raises(CostError) as caught:
        estimate_job(JobRequest(partition="scavenger", num_tasks=4), policy)
    assert "add a time limit" in str(caught.value)


def test_free_cpu_job_without_time_limit_reserves_nothing() -> None:
    policy = _policy('[partitions.cpu]\nmax_time_minutes = 0\n', cpu_core_hour=0.0)
    est = estimate_job(JobRequest(partition="cpu", num_tasks=4), policy)
    assert (est.amount, est.hours, est.time_source) == (0.0, 0.0, "none")
    assert "nothing reserved" in est.describe("$")


def test_untyped_gpus_are_reserved_at_the_dearest_type_the_partition_has() -> None:
    policy = _policy('[partitions.mixed]\ngpu_types = ["a100", "h100"]\n'
                     'default_gpu_type = "a100"\nmax_time_minutes = 60\n')
    est = estimate_job(JobRequest(partition="mixed", tres_per_node="gres:gpu:1"), policy)
    assert est.gpu_type == "h100"


def test_untyped_gpus_follow_the_constraint() -> None:
    policy = _policy('[partitions.gpu2]\ndefault_gpu_type = "a100"\nmax_time_minutes = 60\n')
    plain = estimate_job(JobRequest(partition="gpu2", tres_per_node="gres:gpu:1"), policy)
    assert plain.gpu_type == "a100"
    req = JobRequest(partition="gpu2", tres_per_node="gres:gpu:1", features="h100|a100")
    assert estimate_job(req, policy).gpu_type == "h100"


def test_unknown_gpu_type_names_the_known_ones(policy: Policy) -> None:
    req = JobRequest(partition="gpu", tres_per_node="gres:gpu:v100:1", time_limit=60)
    with pytest.raises(CostError) as caught:
        estimate_job(req, policy)
    assert "'v100'" in str(caught.value) and "a100, h100" in str(caught.value)


def test_gpu_type_matching_ignores_case(policy: Policy) -> None:
    req = JobRequest(partition="gpu", tres_per_node="gres:gpu:A100:1", time_limit=60)
    assert estimate_job(req, policy).gpu_type == "a100"


def test_partition_default_type_missing_from_rate_card_blames_the_policy() -> None:
    policy = _policy('[partitions.l40]\ndefault_gpu_type = "l40s"\nmax_time_minutes = 60\n')
    with pytest.raises(CostError) as caught:
        estimate_job(JobRequest(partition="l40", tres_per_node="gres:gpu:1"), policy)
    assert "default_gpu_type 'l40s'" in str(caught.value) and "a100, h100" in str(caught.value)


def test_unknown_partition_prices_untyped_gpus_at_the_dearest_type(policy: Policy) -> None:
    # a partition the policy does not list: no default type -> h100 (4.0, the dearest)
    # (4.0 + 0.05) x 1 h = 4.05
    req = JobRequest(partition="other", tres_per_node="gres:gpu:1", time_limit=60)
    est = estimate_job(req, policy)
    assert (est.gpu_type, est.partition) == ("h100", "other")
    assert est.amount == pytest.approx(4.05, abs=1e-6)


def test_no_partition_uses_first_in_policy(policy: Policy) -> None:
    est = estimate_job(JobRequest(tres_per_node="gres:gpu:1", time_limit=60), policy)
    assert (est.partition, est.gpu_type) == ("gpu", "a100")


def test_partition_list_prices_the_dearest(policy: Policy) -> None:
    # -p gpu,scavenger --gres=gpu:1 -t 60: gpu (2.5 + 0.05) = 2.55;
    # scavenger (4.0 + 0.05) x 0.3 = 1.215 -> 2.55 in gpu
    req = JobRequest(partition="gpu,scavenger", tres_per_node="gres:gpu:1", time_limit=60)
    est = estimate_job(req, policy)
    assert est.partition == "gpu" and est.amount == pytest.approx(2.55, abs=1e-6)


def test_mixed_types(policy: Policy) -> None:
    # --gres=gpu:a100:2,gpu:h100:1 -t 60: 2 x 2.5 + 1 x 4.0 = 9; cpu 0.05; = 9.05
    req = JobRequest(partition="gpu", tres_per_node="gres:gpu:a100:2,gres:gpu:h100:1",
                     time_limit=60)
    est = estimate_job(req, policy)
    assert est.gpu_type == "a100+h100" and est.gpus == 3.0
    assert est.gpu_parts == (("a100", 2.0), ("h100", 1.0))
    assert est.amount == pytest.approx(9.05, abs=1e-6)
    assert est.describe("$") == "est. max cost $9.05 ((2 x a100 + 1 x h100) x 1.0 h)"


def test_untyped_and_typed_resolving_to_one_type_merge(policy: Policy) -> None:
    # --gres=gpu:2,gpu:a100:1 in gpu: untyped -> a100, so 3 x a100
    req = JobRequest(partition="gpu", tres_per_node="gres:gpu:2,gres:gpu:a100:1", time_limit=60)
    assert estimate_job(req, policy).gpu_parts == (("a100", 3.0),)


def test_shards(policy: Policy) -> None:
    # --gres=shard:4 -t 600 in gpu (8 shards/GPU): 0.5 x 2.5 x 10 = 12.5; cpu 0.05 x 10 = 0.5
    req = JobRequest(partition="gpu", tres_per_node="gres:shard:4", time_limit=600)
    est = estimate_job(req, policy)
    assert est.gpus == 0.5 and est.amount == pytest.approx(13.0, abs=1e-6)
    assert est.describe("$") == "est. max cost $13.00 (0.5 x a100 x 10.0 h)"


def test_money_is_rounded_to_micro_units(policy: Policy) -> None:
    # 1 shard of 3 in 'thirds', no -t -> 60 min: 1/3 x 2.5 = 0.8333333.. -> 0.833333
    est = estimate_job(JobRequest(partition="thirds", tres_per_node="gres:shard:1"), policy)
    assert est.breakdown["gpu"] == 0.833333


ARRAY_CASES = [
    # -p gpu --gres=gpu:1 -t 60: one task = 2.5 + 0.05 = 2.55
    ("throttle-mode-with-throttle", "throttle", "0-99%10", 10, 25.5),  # 10 x 2.55
    ("all-mode-with-throttle", "all", "0-99%10", 100, 255.0),  # 100 x 2.55
    ("throttle-mode-no-throttle", "throttle", "0-99", 100, 255.0),
    ("throttle-above-tasks", "throttle", "1,3,5%10", 3, 7.65),  # 3 x 2.55
]


@pytest.mark.parametrize(
    ("mode", "array", "reserved", "amount"),
    [pytest.param(m, a, r, x, id=i) for i, m, a, r, x in ARRAY_CASES],
)
def test_array_reservation(mode: str, array: str, reserved: int, amount: float) -> None:
    policy = _policy(f'[budgets]\narray_concurrency = "{mode}"\n')
    req = JobRequest(partition="gpu", tres_per_node="gres:gpu:1", time_limit=60, array_inx=array)
    est = estimate_job(req, policy)
    assert est.tasks_reserved == reserved
    assert est.amount == pytest.approx(amount, abs=1e-6)


def test_array_describe_mentions_waiting_tasks(policy: Policy) -> None:
    req = JobRequest(partition="gpu", tres_per_node="gres:gpu:a100:1", time_limit=60,
                     array_inx="0-99%10")
    assert estimate_job(req, policy).describe("$") == (
        "est. max cost $25.50 (10 tasks x 1 x a100 x 1.0 h, 90 more array tasks wait)"
    )


def test_bad_gpu_request_surfaces_as_value_error(policy: Policy) -> None:
    with pytest.raises(GpuRequestError):
        estimate_job(JobRequest(tres_per_node="gres:gpu:a100:lots", time_limit=60), policy)


def test_no_partitions_and_no_rates() -> None:
    # nothing configured: GPUs cost 0 (shown as plain "gpu"), a GPU job still needs -t
    policy = parse_policy("")
    est = estimate_job(JobRequest(tres_per_node="gres:gpu:2", time_limit=60), policy)
    assert (est.partition, est.amount, est.gpu_type) == ("default", 0.0, "gpu")
    with pytest.raises(CostError):
        estimate_job(JobRequest(tres_per_node="gres:gpu:2"), policy)


def test_describe_currency_codes() -> None:
    assert format_money(1234.5, "$") == "$1,234.50"
    assert format_money(1234.5, "EUR") == "1,234.50 EUR"
    est = Estimate(amount=12.0, gpu_type="a100", gpus=2.0, cpus=1, mem_mb=0, nodes=1, hours=2.4,
                   tasks_reserved=1, time_source="job", breakdown={}, gpu_parts=(("a100", 2.0),))
    assert est.describe("€") == "est. max cost €12.00 (2 x a100 x 2.4 h)"


# ---- settlement ------------------------------------------------------------------------------


def test_run_cost_all_parts(policy: Policy) -> None:
    # 2 x a100, 8 CPUs, 64 GB for 1 h, 7.2 MJ = 2 kWh:
    # gpu 2 x 2.5 = 5; cpu 8 x 0.05 = 0.4; mem 64 x 0.01 = 0.64; energy 2 x 0.2 = 0.4; = 6.44
    cost = run_cost(gpu_type="a100", gpus=2, cpus=8, mem_mb=65536, seconds=3600,
                    energy_j=7.2e6, policy=policy, partition="gpu")
    assert cost == {"gpu": 5.0, "cpu": 0.4, "mem": 0.64, "energy": 0.4, "total": 6.44}


def test_run_cost_partition_factor_and_default_type(policy: Policy) -> None:
    # untyped in scavenger -> h100; 1 x 4.0 x 0.5 h x 0.3 = 0.6; cpu 1 x 0.05 x 0.5 x 0.3 = 0.0075
    # energy 3.6 MJ = 1 kWh x 0.2 x 0.3 = 0.06; = 0.6675
    cost = run_cost(gpu_type=None, gpus=1, cpus=1, mem_mb=0, seconds=1800, energy_j=3.6e6,
                    policy=policy, partition="scavenger")
    assert cost == {"gpu": 0.6, "cpu": 0.0075, "mem": 0.0, "energy": 0.06, "total": 0.6675}


def test_run_cost_energy_only_when_kwh_priced() -> None:
    policy = parse_policy(POLICY_TOML.replace("kwh = 0.2", "kwh = 0.0"))
    cost = run_cost(gpu_type="a100", gpus=1, cpus=0, mem_mb=0, seconds=3600, energy_j=3.6e6,
                    policy=policy, partition="gpu")
    assert cost == {"gpu": 2.5, "cpu": 0.0, "mem": 0.0, "energy": 0.0, "total": 2.5}


def test_run_cost_without_energy_measurement(policy: Policy) -> None:
    cost = run_cost(gpu_type="h100", gpus=1, cpus=0, mem_mb=0, seconds=3600, energy_j=None,
                    policy=policy, partition=None)
    assert cost["energy"] == 0.0 and cost["total"] == 4.0


def test_run_cost_unknown_type_is_an_error_not_zero(policy: Policy) -> None:
    with pytest.raises(CostError, match="a100, h100"):
        run_cost(gpu_type="v100", gpus=1, cpus=1, mem_mb=0, seconds=60, energy_j=None,
                 policy=policy, partition="gpu")
    # no GPUs used: the type does not matter
    cost = run_cost(gpu_type="v100", gpus=0, cpus=1, mem_mb=0, seconds=3600, energy_j=None,
                    policy=policy, partition="gpu")
    assert cost["total"] == 0.05


@pytest.mark.parametrize(
    ("field", "value"),
    [("seconds", -1.0), ("gpus", float("nan")), ("energy_j", float("inf")), ("cpus", -2)],
)
def test_run_cost_rejects_bad_numbers(policy: Policy, field: str, value: float) -> None:
    args = {"gpu_type": "a100", "gpus": 1.0, "cpus": 1, "mem_mb": 0, "seconds": 60.0,
            "energy_j": None, "policy": policy, "partition": "gpu"}
    args[field] = value
    with pytest.raises(CostError, match=field):
        run_cost(**args)
