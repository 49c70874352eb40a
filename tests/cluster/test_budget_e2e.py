"""Issue: team budgets, fairshare, estimates and approvals, with real sbatch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import uuid

import pytest

from tests.conftest import FINAL_STATES, Cluster, PolicyOverride, daemon_call
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm
SLURMGATE = "/opt/slurmgate/venv/bin/slurmgate"


def quota(cluster: Cluster, team: str) -> dict:
    return next(t for t in daemon_call(cluster, op="quota")["teams"] if t["team"] == team)


def set_nlp_budget(override: PolicyOverride, budget: float, soft: float) -> None:
    text = override.original
    block = re.search(r"\[teams\.nlp\].*?(?=\n\[)", text, re.S).group(0)
    new = re.sub(r"budget = [0-9.]+", f"budget = {budget:.6f}", block)
    new = re.sub(r"soft_limit = [0-9.]+", f"soft_limit = {soft:.6f}", new)
    override.apply(text.replace(block, new))


def unique_name() -> str:
    return "t" + uuid.uuid4().hex[:10]


def decision_for(cluster: Cluster, name: str) -> dict:
    return wait_for(lambda: next((e for e in cluster.log_events("decision")
                                  if e.get("job_name") == name), None), 10,
                    what=f"decision for {name}")


def test_hard_limit_rejects_with_numbers_soft_limit_moves_to_scavenger(
        cluster: Cluster, policy_override: PolicyOverride):
    q = quota(cluster, "nlp")
    used = q["spent"] + q["reserved"]
    budget = used + 100.0
    set_nlp_budget(policy_override, budget, (used + 50.0) / budget)
    jobs = []
    try:
        # under both limits: runs in gpu ($4.02: 1 h100 x 1 h + 1 core x 1 h)
        ok = cluster.submit_ok("bob", "--gres=gpu:h100:1", "-t", "60", "--hold")
        jobs.append(ok)
        assert cluster.job(ok)["partition"] == "gpu"
        # crosses the soft limit ($80.40), stays under the hard one: moved to scavenger
        out = cluster.sbatch("bob", "--gres=gpu:h100:1", "-t", "1200", "--hold")
        assert out.returncode == 0, out.stderr
        soft = int(out.stdout.decode())
        jobs.append(soft)
        assert "job moved to the low-priority, preemptible partition 'scavenger'" in \
            out.stderr.decode()
        assert cluster.job(soft)["partition"] == "scavenger"
        # crosses the hard limit: rejected, with the numbers
        out = cluster.sbatch("bob", "--gres=gpu:h100:4", "-t", "600")
        err = out.stderr.decode()
        assert out.returncode != 0
        assert "team nlp would exceed its hard limit of $" in err
        assert "est. max cost $160.20 (4 x h100 x 10.0 h)" in err
        assert "reserved of $" in err and "spent" in err
    finally:
        cluster.scancel(*jobs)


def reservation_of(cluster: Cluster, job_id: int) -> dict | None:
    from db.store import open_store
    from policies.tags import parse_admin_comment

    rid = parse_admin_comment(cluster.job(job_id)["admin_comment"]).get("rid")
    store = open_store(cluster.dir / "var/slurmgate.db", readonly=True)
    try:
        rows = store._query("SELECT * FROM reservations WHERE rid = :rid", {"rid": rid})
        return rows[0] if rows else None
    finally:
        store.close()


def test_reservation_settles_at_job_end_and_is_released_when_cancelled_pending(
        cluster: Cluster):
    held = cluster.submit_ok("bob", "--gres=gpu:h100:1", "-t", "60", "--hold")
    resv = reservation_of(cluster, held)
    assert resv["state"] in ("reserved", "bound") and resv["est_cost"] == pytest.approx(4.02)
    cluster.scancel(held)
    # a job that never ran closes its reservation (settled at zero)
    wait_for(lambda: reservation_of(cluster, held)["state"] in ("settled", "released"), 60, 0.5,
             what="reservation of the cancelled pending job closed")

    spent_before = quota(cluster, "nlp")["spent"]
    ran = cluster.submit_ok("bob", "--gres=gpu:h100:1", "-t", "60", wrap="sleep 2")
    cluster.wait_state(ran, FINAL_STATES, 90)
    settled = wait_for(lambda: (r := reservation_of(cluster, ran))["state"] == "settled" and r,
                       60, 0.5, what="reservation settled")
    assert settled["job_id"] == ran
    # it ran ~2 s of an h100: charged that, not the $4.02 worst case
    spent_after = wait_for(lambda: (q := quota(cluster, "nlp")["spent"]) > spent_before and q,
                           30, 0.5, what="spend settled")
    assert 0 < spent_after - spent_before < 1.0


def test_ledger_survives_kill_9_of_the_daemon(cluster: Cluster):
    held = cluster.submit_ok("bob", "--gres=gpu:h100:2", "-t", "120", "--hold")
    try:
        # earlier jobs' completion records settled first, so only the kill can move the ledger
        wait_for(lambda: not list((cluster.dir / "spool").glob("*.json")), 30, 0.3,
                 what="spool drained")
        assert reservation_of(cluster, held)["state"] in ("reserved", "bound")
        before = quota(cluster, "nlp")
        pid = int((cluster.dir / "run/slurmgate.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: subprocess.run(["kill", "-0", str(pid)]).returncode != 0, 10,
                 what="daemon gone")
        cluster.ctl("daemon", "start")
        after = wait_for(lambda: quota(cluster, "nlp"), 20, what="daemon back")
        assert after["reserved"] == pytest.approx(before["reserved"], abs=1e-6)
        assert after["spent"] == pytest.approx(before["spent"], abs=1e-6)
        assert reservation_of(cluster, held)["state"] in ("reserved", "bound")
    finally:
        cluster.scancel(held)


def test_fairshare_gives_the_heavier_team_a_larger_nice(cluster: Cluster):
    burn = cluster.submit_ok("alice", "--gres=gpu:a100:4", "-t", "5", wrap="sleep 3")
    cluster.wait_state(burn, FINAL_STATES, 90)
    wait_for(lambda: quota(cluster, "vision")["fairshare"] < quota(cluster, "nlp")["fairshare"],
             60, what="vision's usage counted")

    def fairshares() -> dict[str, float]:
        return {t["team"]: t["fairshare"] for t in daemon_call(cluster, op="quota")["teams"]}

    # the burn run is re-settled when its node records arrive after its jobcomp: the nice is
    # judged against the fairshare in force while the jobs were submitted (same before/after)
    for _ in range(5):
        before = fairshares()
        a = cluster.submit_ok("alice", "--gres=gpu:1", "--hold")
        b = cluster.submit_ok("bob", "--gres=gpu:1", "--hold")
        try:
            nice_a = cluster.job(a)["nice"] or 0
            nice_b = cluster.job(b)["nice"] or 0
        finally:
            cluster.scancel(a, b)
        if fairshares() == before:
            break
    else:
        raise AssertionError("vision's fairshare kept changing while jobs were submitted")
    assert nice_a > nice_b
    assert nice_a == round(10000 * (1 - before["vision"]))


def test_approval_lets_exactly_the_granted_amount_through(cluster: Cluster,
                                                          policy_override: PolicyOverride):
    q = quota(cluster, "nlp")
    set_nlp_budget(policy_override, q["spent"] + q["reserved"] + 1.0, 0.99)
    out = subprocess.run([SLURMGATE, "approve", "--team", "nlp", "--amount", "8.04",
                          "--expires", "7d", "--reason", "deadline run"],
                         env=cluster.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    aid = re.search(r"approval (\S+) created", out.stdout).group(1)
    tags = f"project=llm-pretrain,cost_center=CC2002,approval={aid}"
    jobs = []
    try:
        for _ in range(2):  # two jobs of $4.02 each use up the $8.04 grant
            out = cluster.sbatch("bob", "--gres=gpu:h100:1", "-t", "60", "--hold", tags=tags)
            assert out.returncode == 0, out.stderr.decode()
            jobs.append(int(out.stdout.decode()))
            assert f"using approval {aid}" in out.stderr.decode()
        out = cluster.sbatch("bob", "--gres=gpu:h100:1", "-t", "60", "--hold", tags=tags)
        assert out.returncode != 0
        assert f"approval '{aid}' has 0.00 left, this job needs 4.02" in out.stderr.decode()
        listed = subprocess.run([SLURMGATE, "approvals", "--json", "--all"], env=cluster.env,
                                capture_output=True, text=True, timeout=30)
        grant = next(a for a in json.loads(listed.stdout)["approvals"] if a["id"] == aid)
        assert grant["used"] == pytest.approx(8.04)
    finally:
        cluster.scancel(*jobs)


SHAPES = [
    ["--gres=gpu:2"],
    ["--gres=gpu:h100:2"],
    ["--gpus=2"],
    ["--gpus=a100:3"],
    ["--gpus-per-node=2", "-N", "2"],
    ["--gpus-per-task=1", "-n", "2"],
    ["--gpus-per-socket=1", "--sockets-per-node=1"],
    ["-N", "2", "--gres=gpu:4"],
    ["--gres=gpu:a100:1", "-a", "0-7%2"],
    ["--gres=gpu:1", "-a", "0-3"],
    ["--gres=gpu:h100:1", "-c", "4", "--mem=8G"],
    ["--gres=gpu:1", "-p", "scavenger"],
    ["--gres=gpu:1"],  # no -t given below: priced at the partition's limit
    [],
]


@pytest.mark.parametrize("shape", SHAPES, ids=[" ".join(s) or "cpu-only" for s in SHAPES])
def test_estimate_agrees_with_submission(cluster: Cluster, shape: list[str]):
    name = unique_name()
    limit = [] if shape == ["--gres=gpu:1"] else ["-t", "90"]
    args = ["-J", name, *limit, *shape, "--comment=project=vit-scaling,cost_center=CC1001"]
    est = subprocess.run(["runuser", "-u", "alice", "--", SLURMGATE, "--config",
                          str(cluster.policy_path), "estimate", "--json", *args, "--wrap", "true"],
                         capture_output=True, text=True, timeout=30, cwd="/tmp")
    estimate = json.loads(est.stdout)
    argv = ["runuser", "-u", "alice", "--", "sbatch", "--parsable", "-o", "/dev/null", "--hold",
            *args, "--wrap", "true"]
    sub = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=30,
                         cwd="/tmp")
    decision = decision_for(cluster, name)
    if sub.returncode == 0:
        cluster.scancel(int(sub.stdout.strip().split(";")[0]))
    assert decision["verdict"] == estimate["verdict"]
    assert decision["est_cost"] == pytest.approx(estimate["est_cost"])
    assert decision["set"].get("partition") == estimate["set"].get("partition")


def test_users_see_only_their_teams_and_cannot_approve(cluster: Cluster):
    def as_user(user: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", user, "--", SLURMGATE, "--config",
                               str(cluster.policy_path), *args], capture_output=True, text=True,
                              timeout=30, cwd="/tmp")

    mine = as_user("alice", "quota", "--json")
    assert [t["team"] for t in json.loads(mine.stdout)["teams"]] == ["vision"]
    theirs = as_user("alice", "quota", "--team", "nlp")
    assert theirs.returncode != 0
    assert "not a member or lead of team nlp" in theirs.stderr
    nobody = as_user("mallory", "quota", "--json")
    assert json.loads(nobody.stdout)["teams"] == []
    approve = as_user("bob", "approve", "--team", "nlp", "--amount", "1000", "--expires", "1d",
                      "--reason", "please")
    assert approve.returncode != 0
    assert "only slurmgate admins may approve; you are bob" in approve.stderr
    listed = as_user("bob", "approvals", "--json")
    assert all(a["reason"] != "please" for a in json.loads(listed.stdout)["approvals"])
