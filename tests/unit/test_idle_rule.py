"""The idle-GPU rule (policies.idle): buckets to an idle streak, the fraction-of-GPUs rule,
exemptions, what is due at which threshold, dry run, cost so far, and the [idle] settings."""

from __future__ import annotations

import pytest

from policies.config import Idle, PolicyError, parse_policy
from policies.idle import (
    ACTION,
    WARNING,
    Bucket,
    IdleJob,
    Step,
    cost_so_far,
    due,
    event_message,
    exemption,
    required_idle,
    streak,
)

W = 60.0  # bucket width: one agent sample a minute
NOW_BUCKET = 100_000
NOW = (NOW_BUCKET + 1) * W


def job(gpus: float = 8, **over: object) -> IdleJob:
    fields: dict[str, object] = {"cluster": "c", "job_id": 5, "restart_count": 0,
                                 "start_ts": 0.0, "gpus": gpus, "user": "alice",
                                 "team": "vision", "partition": "gpu", "nodes": "node1"}
    fields.update(over)
    return IdleJob(**fields)  # type: ignore[arg-type]


def run(*states: tuple[int, int], gpus: int = 8) -> list[Bucket]:
    """Buckets ending now, oldest first: (GPUs seen, GPUs idle) each."""
    first = NOW_BUCKET - len(states) + 1
    return [Bucket(first + i, seen, idle) for i, (seen, idle) in enumerate(states)]


def test_all_gpus_idle_for_an_hour_is_an_hour_idle() -> None:
    s = streak(Idle(), job(), run(*[(8, 8)] * 60), width_s=W, now=NOW)
    assert s is not None and s.idle_minutes == 60 and s.fresh
    assert (s.gpus_idle, s.gpus_allocated) == (8, 8)


@pytest.mark.parametrize(("fraction", "idle_gpus", "is_idle"), [
    (1.0, 8, True), (1.0, 7, False), (1.0, 1, False),  # 7 of 8 busy: never idle
    (0.5, 4, True), (0.5, 3, False), (0.5, 1, False),
    (0.125, 1, True),  # only where the admin says one idle GPU of 8 is enough
])
def test_the_fraction_of_gpus_rule(fraction: float, idle_gpus: int, is_idle: bool) -> None:
    s = streak(Idle(min_idle_fraction=fraction), job(),
               run(*[(8, idle_gpus)] * 30), width_s=W, now=NOW)
    assert (s is not None) == is_idle
    assert required_idle(Idle(min_idle_fraction=0.5), 8) == 4
    assert required_idle(Idle(min_idle_fraction=0.01), 8) == 1


def test_a_busy_bucket_restarts_the_count_and_gaps_neither_count_nor_break() -> None:
    busy = (8, 0)
    s = streak(Idle(), job(), run(*[(8, 8)] * 50, busy, *[(8, 8)] * 10), width_s=W, now=NOW)
    assert s is not None and s.idle_minutes == 10
    # GPUs that did not report: unknown, the streak goes on without counting them
    partial = (5, 5)
    s = streak(Idle(), job(), run(*[(8, 8)] * 20, *[partial] * 5, *[(8, 8)] * 20),
               width_s=W, now=NOW)
    assert s is not None and s.idle_minutes == 40
    # time without any sample is not idle time
    spaced = [Bucket(NOW_BUCKET - 2 * i, 8, 8) for i in range(10)]
    s = streak(Idle(), job(), spaced, width_s=W, now=NOW)
    assert s is not None and s.idle_minutes == 10
    # busy now: not idle, whatever came before
    assert streak(Idle(), job(), run(*[(8, 8)] * 50, busy), width_s=W, now=NOW) is None
    assert streak(Idle(), job(), [], width_s=W, now=NOW) is None


def test_evidence_must_be_fresh() -> None:
    old = run(*[(8, 8)] * 60)
    s = streak(Idle(), job(), old, width_s=W, now=NOW + 3 * W)
    assert s is not None and s.fresh
    s = streak(Idle(), job(), old, width_s=W, now=NOW + 4 * W)  # the agent stopped
    assert s is not None and not s.fresh


def test_exemptions() -> None:
    idle = Idle(exempt_users=["carol"], exempt_teams=["nlp"], exempt_partitions=["debug"])
    assert exemption(idle, job()) is None
    assert exemption(idle, job(user="carol")) == "user carol is exempt"
    assert exemption(idle, job(team="nlp")) == "team nlp is exempt"
    assert exemption(idle, job(partition="gpu,debug")) == "partition gpu,debug is exempt"
    assert exemption(idle, job(batch=False)) == "interactive job (no batch script)"
    assert exemption(Idle(exempt_interactive=False), job(batch=False)) is None
    assert exemption(idle, job(gpus=0.25)) is not None  # shards: shared GPUs
    assert exemption(idle, job(gpus=0)) is not None


def steps(idle: Idle, minutes: float, *done: tuple[str, float, bool]) -> list[Step]:
    return due(idle, minutes, frozenset(done))


def test_warnings_then_the_action_each_once() -> None:
    idle = Idle()  # warn at 60 and 105, cancel at 120
    assert steps(idle, 59) == []
    assert steps(idle, 60) == [Step(WARNING, 60, "cancel", False)]
    assert steps(idle, 70, (WARNING, 60, False)) == []
    assert steps(idle, 105, (WARNING, 60, False)) == [Step(WARNING, 105, "cancel", False)]
    done = ((WARNING, 60, False), (WARNING, 105, False))
    assert steps(idle, 119, *done) == []
    assert steps(idle, 120, *done) == [Step(ACTION, 120, "cancel", False)]
    assert steps(idle, 500, *done, (ACTION, 120, False)) == []


def test_thresholds_crossed_at_once_give_the_highest_warning_and_the_action_waits() -> None:
    idle = Idle()
    assert steps(idle, 110) == [Step(WARNING, 105, "cancel", False)]  # 60 is passed
    assert steps(idle, 130) == [Step(WARNING, 105, "cancel", False)]  # warned before acting
    assert steps(idle, 130, (WARNING, 105, False)) == [Step(ACTION, 120, "cancel", False)]
    # a run warned once and idle again later (busy in between) is acted on without more
    assert steps(idle, 125, (WARNING, 60, False)) == [Step(WARNING, 105, "cancel", False),
                                                     Step(ACTION, 120, "cancel", False)]
    # no warnings configured: the action alone
    assert steps(Idle(warn_after_minutes=[]), 120) == [Step(ACTION, 120, "cancel", False)]


def test_action_none_warns_only_and_requeue_is_named() -> None:
    idle = Idle(action="none")
    done = ((WARNING, 60, False), (WARNING, 105, False))
    assert steps(idle, 1000, *done) == []
    assert steps(Idle(action="requeue"), 120, *done) == [Step(ACTION, 120, "requeue", False)]


def test_dry_run_reports_the_same_steps_and_they_do_not_count_for_real_ones() -> None:
    dry = Idle(dry_run=True)
    assert steps(dry, 60) == [Step(WARNING, 60, "cancel", True)]
    done = ((WARNING, 60, True), (WARNING, 105, True))
    assert steps(dry, 120, *done) == [Step(ACTION, 120, "cancel", True)]
    assert steps(dry, 130, *done, (ACTION, 120, True)) == []
    # dry run switched off: warned for real first, acted on next time
    assert steps(Idle(), 130, *done, (ACTION, 120, True)) == [
        Step(WARNING, 105, "cancel", False)]


def test_cost_so_far_prices_the_allocation_for_the_time_run() -> None:
    policy = parse_policy('[rates]\ncpu_core_hour = 0.1\n[rates.gpu_hour]\na100 = 2.5\n'
                          'h100 = 4.0\n[partitions.cheap]\nprice_factor = 0.5\n')
    assert cost_so_far(policy, seconds=7200, gpu_type="a100", gpus=4, cpus=10, mem_mb=0,
                       partition="gpu") == pytest.approx(4 * 2.5 * 2 + 10 * 0.1 * 2)
    assert cost_so_far(policy, seconds=3600, gpu_type="h100", gpus=1, cpus=0, mem_mb=0,
                       partition="cheap") == pytest.approx(2.0)
    # a mixed reservation: pro rata of what was reserved for its time limit
    assert cost_so_far(policy, seconds=1800, gpu_type="a100+h100", gpus=2, cpus=0,
                       mem_mb=0, partition=None, reserved=13.0,
                       reserved_minutes=60) == pytest.approx(6.5)
    assert cost_so_far(policy, seconds=1800, gpu_type="tpu", gpus=2, cpus=0, mem_mb=0,
                       partition=None) == 0.0


def test_messages_say_what_happens_next() -> None:
    from policies.idle import Streak

    s = Streak(idle_minutes=61.0, gpus_idle=4, gpus_allocated=4, fresh=True)
    warn = event_message(Step(WARNING, 60, "cancel", False), job(gpus=4), s,
                         threshold_percent=5, cost=12.345, currency="$", act_after_minutes=120)
    assert warn == ("idle GPUs: job 5 (alice): 4 of 4 GPUs below 5% utilisation for 61 min, "
                    "$12.35 so far; it will be cancelled after 120 idle minutes "
                    "(scancel 5 frees them now)")
    act = event_message(Step(ACTION, 120, "requeue", False), job(gpus=4), s,
                        threshold_percent=5, cost=20, currency="EUR", act_after_minutes=120)
    assert act.endswith("20.00 EUR so far; requeued by the idle-GPU policy")
    dry = event_message(Step(ACTION, 120, "cancel", True), job(gpus=4), s,
                        threshold_percent=5, cost=1, currency="$", act_after_minutes=120)
    assert dry.startswith("[dry run] ") and dry.endswith("it would have been cancelled now")


@pytest.mark.parametrize(("text", "field"), [
    ("threshold_percent = 0", "threshold_percent"),
    ("min_idle_fraction = 1.5", "min_idle_fraction"),
    ("warn_after_minutes = [105, 60]", "warn_after_minutes"),
    ("warn_after_minutes = [60, 120]", "act_after_minutes"),
    ("scan_seconds = 0", "scan_seconds"),
    ('action = "kill"', "idle.action"),
    ('exempt_teams = ["nope"]', "idle.exempt_teams"),
    ("treshold_percent = 5", "idle.treshold_percent"),
])
def test_bad_settings_are_named(text: str, field: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(f"[idle]\n{text}\n")
    assert field in str(err.value)


def test_defaults_are_the_fields() -> None:
    idle = parse_policy("").idle
    assert not idle.enabled and idle.threshold_percent == 5
    assert idle.warn_after_minutes == [60, 105] and idle.act_after_minutes == 120
    assert idle.scan_seconds == 900 and idle.action == "cancel" and not idle.dry_run
    assert idle.min_idle_fraction == 1.0 and idle.exempt_interactive
