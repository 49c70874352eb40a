"""Attacks on the submission path, tried as unprivileged users on the real dev cluster.

Each test states the attack, then proves it failed: the job is refused with a message that
says what to fix (or decided as policy says), nothing is accepted unchecked, and afterwards
the daemon answers and the ledger invariant holds (``ledger_checked``): every live reservation
belongs to a job Slurm lists, and the daemon's "reserved" per team is what the database holds.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from policies.config import load_policy
from policies.cost import format_money
from policies.tags import parse_admin_comment
from slurm_plugin.protocol import call
from tests.conftest import FINAL_STATES, TAGS, Cluster
from tests.hostile.conftest import (
    Submitted,
    events_of,
    render_lua,
    reservation,
    reservation_count,
    runs_of,
    scontrol_as,
    spawn_as,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("ledger_checked")

LATER = "--begin=now+1hour"
"""Keeps a job pending. Not --hold: in Slurm 22.05 a Nice change lifts any hold."""
DECIDED = re.compile(r"slurmgate:v2;team=(\w+);rid=(r[0-9a-f]{16})(;tags=\S*)?")


def rid_of(cluster: Cluster, job_id: int) -> str:
    rid = parse_admin_comment(cluster.job(job_id)["admin_comment"]).get("rid")
    assert rid, cluster.job(job_id)["admin_comment"]
    return rid


def estimate_as(cluster: Cluster, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``slurmgate estimate ARGS`` as ``user`` (the real CLI)."""
    return subprocess.run(["runuser", "-u", user, "--", str(cluster.dir / "bin/slurmgate"),
                           "estimate", *args], env=cluster.env, cwd="/tmp",
                          capture_output=True, text=True, timeout=60)


def ctld_log_from(cluster: Cluster, offset: int) -> str:
    with open(cluster.dir / "log/slurmctld.log", "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def ctld_log_size(cluster: Cluster) -> int:
    return (cluster.dir / "log/slurmctld.log").stat().st_size


def fail_mode(cluster: Cluster) -> str:
    lua = (cluster.dir / "etc/job_submit.lua").read_text()
    return re.search(r'^local FAIL_MODE = "(\w+)"', lua, re.M).group(1)


# -- 1. bad bytes --------------------------------------------------------------------------

BAD_BYTES = {
    "--account": ([b"--account=vision\xff"], None),
    "--comment": ([], b"project=vit-scaling,cost_center=CC1001\xff"),
    "the job name (-J)": ([b"--job-name=train\xfe\xff"], None),
    "--gres": ([b"--gres=gpu:a100\xff:1"], None),
    "--array": ([b"--array=0-3\xff"], None),
    "--partition": ([b"--partition=gpu\xff"], None),
}


@pytest.mark.parametrize("user", ["alice", "mallory"])
@pytest.mark.parametrize("field", list(BAD_BYTES))
def test_non_utf8_fields_are_rejected_not_accepted_unchecked(cluster: Cluster, field: str,
                                                             user: str) -> None:
    """H5: raw bytes >= 0x80 used to make the daemon fail, so fail-open let the job in as
    ``slurmgate:unchecked``. Now they are a reject naming the option."""
    assert fail_mode(cluster) == "open"
    args, tags = BAD_BYTES[field]
    if user == "mallory" and field == "--account":
        args = [b"--account=x\xff"]
    before = max(cluster.jobs(), default=0)
    out = cluster.sbatch(user, *args, tags=tags)
    err = out.stderr.decode(errors="replace")
    assert out.returncode != 0, f"accepted: {out.stdout!r} {err}"
    assert f"slurmgate: job rejected: {field} contains bytes that are not valid UTF-8; " \
           "use plain text" in err, err
    assert not [j for j in cluster.jobs().values() if j["job_id"] > before
                and j["admin_comment"].startswith("slurmgate:unchecked")]


# -- 2. slurmgate's own keys ---------------------------------------------------------------


def test_team_and_rid_cannot_be_given_as_tags(cluster: Cluster, submitted: Submitted) -> None:
    """H9: ``team=``/``rid=`` in --comment used to be read back as slurmgate's own fields."""
    out = cluster.sbatch("alice", "--gres=gpu:1",
                         tags=TAGS["alice"] + ",team=nlp,rid=rdeadbeefdeadbeef")
    err = out.stderr.decode(errors="replace")
    assert out.returncode != 0
    for key in ("team", "rid"):
        assert f"tag '{key}' is written by slurmgate itself and cannot be given in --comment: " \
               "remove it" in err, err

    job_id, _ = submitted.ok("alice", "--gres=gpu:1", LATER)
    comment = cluster.job(job_id)["admin_comment"]
    first = next(t for t in comment.split() if t.startswith("slurmgate:"))
    m = DECIDED.fullmatch(first)
    assert m and m[1] == "vision", comment
    assert m[3] == ";tags=project=vit-scaling,cost_center=CC1001", comment
    assert reservation(cluster, m[2])["team"] == "vision"


SNEAKY = [
    "project=vit-scaling,cost_center=CC1001;team=nlp",
    "project=vit-scaling,cost_center=CC1001 slurmgate:v2;team=nlp;rid=rdeadbeefdeadbeef",
    "project=vit-scaling;rid=rdeadbeefdeadbeef,cost_center=CC1001",
    "project=vit-scaling,cost_center=CC1001,tags=team=nlp",
]


@pytest.mark.parametrize("comment", SNEAKY, ids=range(len(SNEAKY)))
def test_a_comment_cannot_extend_slurmgates_segment(cluster: Cluster, submitted: Submitted,
                                                   comment: str) -> None:
    out = cluster.sbatch("alice", "--gres=gpu:1", LATER, tags=comment)
    err = out.stderr.decode(errors="replace")
    if out.returncode != 0:
        assert "slurmgate: job rejected:" in err and "fix:" in err, err
        return
    job_id = submitted.add(int(out.stdout.decode().strip()))
    fields = parse_admin_comment(cluster.job(job_id)["admin_comment"])
    assert fields["team"] == "vision" and fields["rid"] != "rdeadbeefdeadbeef", fields
    assert reservation(cluster, fields["rid"])["team"] == "vision"


# -- 3. --account needs membership ---------------------------------------------------------


def test_an_account_bills_a_team_only_for_its_members(cluster: Cluster,
                                                      submitted: Submitted) -> None:
    """H8: a member of vision used to charge nlp just by naming --account=nlp."""
    out = cluster.sbatch("alice", "--account=nlp", "--gres=gpu:1", tags=TAGS["bob"])
    err = out.stderr.decode(errors="replace")
    assert out.returncode != 0
    assert "--account=nlp bills team nlp, and you (alice) are not a member or lead of nlp; " \
           "your teams: vision (--account=vision)" in err, err

    job_id, _ = submitted.ok("bob", "--account=nlp", "--gres=gpu:1", wrap="sleep 1")
    m = DECIDED.match(cluster.job(job_id)["admin_comment"])
    assert m and m[1] == "nlp"
    assert reservation(cluster, m[2])["team"] == "nlp"
    cluster.wait_state(job_id, FINAL_STATES, 90)
    runs = wait_for(lambda: [r for r in runs_of(cluster, job_id) if r["cost"] is not None],
                    90, 0.5, what=f"job {job_id} settled")
    assert [r["team"] for r in runs] == ["nlp"]
    assert wait_for(lambda: reservation(cluster, m[2])["state"] == "settled", 30, 0.5,
                    what="bob's reservation settled")


# -- 4. other teams' figures ---------------------------------------------------------------


def test_budget_figures_are_shown_only_to_the_teams_people(cluster: Cluster,
                                                          submitted: Submitted) -> None:
    """M3: estimate (and any sbatch) with --account=nlp used to print nlp's spend."""
    submitted.ok("bob", "--gres=gpu:h100:3", "-t", "97", LATER)   # nlp holds something now
    nlp = next(t for t in call(cluster.socket, {"op": "quota"})["teams"] if t["team"] == "nlp")
    cur = load_policy(cluster.policy_path).rates.currency
    secret = {format_money(nlp[k], cur) for k in ("budget", "reserved", "remaining")}
    assert nlp["reserved"] > 0

    nlp_job = ["--account=nlp", f"--comment={TAGS['bob']}", "--gres=gpu:1", "-t", "60"]
    for user, args in (("alice", nlp_job), ("mallory", nlp_job),
                       ("mallory", ["--comment=project=llm-eval,cost_center=CC2002"])):
        out = estimate_as(cluster, user, *args)
        text = out.stdout + out.stderr
        assert out.returncode == 1 and "REJECTED" in text, text
        assert "spent" not in text and not [s for s in secret if s in text], text

    carol = estimate_as(cluster, "carol", f"--comment={TAGS['carol']}", "--gres=gpu:1", "-t", "60")
    assert carol.returncode == 0, carol.stderr
    assert re.search(r"team vision: \$[\d,.]+ spent \+ \$[\d,.]+ reserved of \$20,000\.00",
                     carol.stdout), carol.stdout

    _, err = submitted.ok("alice", "--gres=gpu:1", LATER)
    assert re.search(r"team vision: \$[\d,.]+ spent \+ \$[\d,.]+ reserved of \$20,000\.00",
                     err), err
    assert "nlp" not in err and not [s for s in secret if s in err], err


# -- 5. floods and idle connections --------------------------------------------------------

FLOOD = r"""
import json, socket, time
ranges = ",".join(["0-4000000"] * 64)
tags = "project=vit-scaling,cost_center=CC1001"
jobs = [dict(array_inx=ranges, partition=",".join(["gpu", "scavenger"] * 4), account="vision",
             comment=tags, tres_per_node="gres:gpu:h100:4", time_limit=10080),
        dict(array_inx=ranges, partition=",".join(f"p{i}" for i in range(9)), comment=tags,
             tres_per_node="gres:gpu:4")]
stats = {"sent": 0, "answers": {}, "slowest_s": 0.0}
def kind(resp):
    if resp.get("verdict"):
        return "verdict " + resp["verdict"]
    err = resp.get("error", "")
    return "refused: " + ("rate" if "too many requests" in err else
                          "connections" if "too many connections" in err else err[:80])
conn = reader = None
end = time.monotonic() + SECONDS
while time.monotonic() < end:
    try:
        if conn is None:
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(10)
            conn.connect(SOCKET)
            reader = conn.makefile("rb")
        t = time.monotonic()
        conn.sendall(json.dumps({"v": 1, "op": "estimate",
                                 "job": jobs[stats["sent"] % 2]}).encode() + b"\n")
        stats["sent"] += 1
        line = reader.readline()
        if not line:
            raise OSError("closed")
        stats["slowest_s"] = max(stats["slowest_s"], time.monotonic() - t)
        k = kind(json.loads(line))
        stats["answers"][k] = stats["answers"].get(k, 0) + 1
        if stats["sent"] == 1:
            print("started", flush=True)
    except OSError:
        stats["answers"]["closed"] = stats["answers"].get("closed", 0) + 1
        conn = None
        time.sleep(0.05)
print(json.dumps(stats), flush=True)
"""

HOLD = r"""
import json, select, socket, sys
socks = []
for _ in range(COUNT):
    s = socket.socket(socket.AF_UNIX)
    s.connect(SOCKET)
    socks.append(s)
held, refused = list(socks), []
while True:  # a refused connection gets one error line at once; held ones hear nothing
    readable = select.select(held, [], [], 1.0)[0]
    if not readable:
        break
    for s in readable:
        refused.append(json.loads(s.recv(65536) or b'{"error": "closed silently"}')["error"])
        s.close()
        held.remove(s)
print(json.dumps({"held": len(held), "refused": refused}), flush=True)
sys.stdin.read()
"""


def test_a_flood_and_idle_connections_do_not_delay_a_decision(cluster: Cluster,
                                                              submitted: Submitted) -> None:
    """H6/H7: one user's estimates with huge arrays and many partitions, plus as many idle
    connections as the daemon lets one uid hold (and more), while a real sbatch comes in."""
    cap = load_policy(cluster.policy_path).daemon.max_connections_per_user
    prelude = f"SOCKET = {cluster.socket!r}\nSECONDS = 20\nCOUNT = {cap + 4}\n"
    flood = spawn_as("mallory", prelude + FLOOD)
    holder = None
    try:
        assert flood.stdout.readline().strip() == "started", flood.stderr.read()
        holder = spawn_as("mallory", prelude + HOLD)
        report = json.loads(holder.stdout.readline() or "{}")
        assert report, holder.stderr.read()
        assert report["held"] <= cap and len(report["refused"]) >= 4, report
        for msg in report["refused"]:
            assert "max_connections_per_user" in msg and "close some and try again" in msg, msg

        t0 = time.monotonic()
        job_id, _ = submitted.ok("alice", "--gres=gpu:1", LATER)
        took = time.monotonic() - t0
        assert DECIDED.match(cluster.job(job_id)["admin_comment"]), \
            cluster.job(job_id)["admin_comment"]
        assert took < 30, f"sbatch took {took:.1f} s"
        assert call(cluster.socket, {"op": "ping"}, timeout=5)["ok"] is True
    finally:
        if holder is not None:
            holder.communicate(input="", timeout=30)
        out, err = flood.communicate(timeout=60)
    stats = json.loads(out.strip().splitlines()[-1])
    answers = stats["answers"]
    assert stats["sent"] > 50, stats
    assert set(answers) <= {"verdict reject", "refused: rate", "refused: connections",
                            "closed"}, stats
    assert answers.get("refused: rate", 0) > 0 and answers.get("verdict reject", 0) > 0, stats
    assert stats["slowest_s"] < 2.0, stats


# -- 6. resends and late requests ----------------------------------------------------------


def submit_request(request_id: str, deadline: float) -> dict:
    import pwd

    return {"op": "submit", "id": request_id, "deadline": deadline,
            "job": {"uid": pwd.getpwnam("alice").pw_uid, "comment": TAGS["alice"],
                    "tres_per_node": "gres:gpu:1", "time_limit": 5, "name": "resent",
                    "batch": True}}


def test_a_resent_submit_is_decided_once(cluster: Cluster) -> None:
    """M4: a resent submission used to be decided again, with a second reservation."""
    before = reservation_count(cluster)
    req = submit_request(f"hostile-{time.time():.6f}-resend-1", time.time() + 30)
    first = call(cluster.socket, req)
    second = call(cluster.socket, req)
    assert first["ok"] and first["verdict"] == "accept", first
    assert second == first
    rid = parse_admin_comment(first["set"]["admin_comment"])["rid"]
    assert reservation(cluster, rid)["state"] == "reserved"
    assert reservation_count(cluster) == before + 1


def test_a_submit_past_its_deadline_is_dropped_unreserved(cluster: Cluster) -> None:
    before = reservation_count(cluster)
    resp = call(cluster.socket, submit_request(f"hostile-{time.time():.6f}-late",
                                               time.time() - 1))
    assert resp["ok"] is False and resp["late"] is True, resp
    assert "not decided" in resp["error"]
    assert reservation_count(cluster) == before


# -- 7. changes after submit ---------------------------------------------------------------

CHANGES = [
    ("NumCPUs=4", "NumCPUs"),
    ("MinCPUsNode=4", "MinCPUsNode"),
    ("MinMemoryNode=4000", "MinMemoryNode"),
    ("Features=h100", "Features"),
    ("ExcNodeList=node2", "ExcNodeList"),
    ("Partition=scavenger", "Partition"),
    ("Account=nlp", "Account"),
    ("Comment=project=detection,cost_center=CC1001", "Comment"),
    ("Gres=gpu:h100:4", "TresPerNode"),
    ("TresPerNode=gres:gpu:h100:4", "TresPerNode"),
    ("NumTasks=4", "NumTasks"),
]
COST_FIELDS = ("cpus", "minimum_cpus_per_node", "memory_per_node", "memory_per_cpu",
               "features", "excluded_nodes", "partition", "account", "comment",
               "tres_per_node", "tasks", "node_count", "admin_comment", "time_limit")


def job_fields(cluster: Cluster, job_id: int) -> dict:
    job = cluster.job(job_id)
    return {k: job[k] for k in COST_FIELDS}


def nice_of(cluster: Cluster, job_id: int) -> int:
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%y"], env=cluster.env,
                         capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout.strip())


@pytest.mark.parametrize("change,name", CHANGES, ids=[c for c, _ in CHANGES])
def test_cost_fields_cannot_be_changed_after_submit(cluster: Cluster, submitted: Submitted,
                                                    change: str, name: str) -> None:
    """M2: CPUs, memory, constraint, exclusions and more used to be changeable on a pending
    job, past the hard-limit check."""
    job_id, _ = submitted.ok("alice", "--gres=gpu:a100:1", LATER)
    before, offset = job_fields(cluster, job_id), ctld_log_size(cluster)
    out = scontrol_as(cluster, "alice", "update", f"job={job_id}", change)
    assert out.returncode != 0, f"{change} was accepted"
    assert "Access/permission denied" in out.stderr, out.stderr
    assert job_fields(cluster, job_id) == before
    # Slurm 22.05 drops job_modify's user message; slurmctld's log keeps what to do
    logged = wait_for(lambda: [ln for ln in ctld_log_from(cluster, offset).splitlines()
                               if "slurmgate: this change is refused:" in ln], 10, 0.2,
                      what="the refusal in slurmctld's log")
    assert name in logged[-1] and "Cancel the job (scancel) and submit it again" in logged[-1]


def test_nice_may_go_up_but_never_down(cluster: Cluster, submitted: Submitted) -> None:
    job_id, _ = submitted.ok("alice", "--gres=gpu:1", LATER)
    nice = nice_of(cluster, job_id) + 100
    up = scontrol_as(cluster, "alice", "update", f"job={job_id}", f"Nice={nice}")
    assert up.returncode == 0, up.stderr
    assert nice_of(cluster, job_id) == nice
    down = scontrol_as(cluster, "alice", "update", f"job={job_id}", f"Nice={nice - 50}")
    assert down.returncode != 0
    assert nice_of(cluster, job_id) == nice


# -- 8. jobs accepted while the daemon was away --------------------------------------------


def held_by_slurmgate(cluster: Cluster, job_id: int) -> dict | None:
    job = cluster.job(job_id)
    held = job["priority"] == 0 and job["state_reason"] == "JobHeldAdmin" and \
        job["admin_comment"].startswith("slurmgate:v2;held=")
    return job if held else None


def test_jobs_accepted_unchecked_are_decided_when_the_daemon_is_back(
        daemon_stopped: Cluster, submitted: Submitted) -> None:
    """H5 (fail-open): unchecked jobs used to stay unchecked forever."""
    c = daemon_stopped
    assert fail_mode(c) == "open"
    stranger, _ = submitted.ok("mallory", "--gres=gpu:1", LATER, tags=TAGS["alice"])
    untagged, _ = submitted.ok("alice", "--gres=gpu:1", LATER, tags="")
    valid, _ = submitted.ok("alice", "--gres=gpu:1", LATER)
    for job_id in (stranger, untagged, valid):
        assert c.job(job_id)["admin_comment"] == "slurmgate:unchecked"

    c.ctl("daemon", "start")
    for job_id, why in ((stranger, "belongs to no team"), (untagged, "missing required tag")):
        wait_for(lambda j=job_id: held_by_slurmgate(c, j), 60, 0.5,
                 what=f"job {job_id} held by slurmgate")
        event = wait_for(lambda j=job_id: events_of(c, "unchecked_held", j), 30, 0.5,
                         what=f"an unchecked_held event for job {job_id}")
        assert why in event[0]["message"], event[0]
    job = wait_for(lambda: DECIDED.match(c.job(valid)["admin_comment"]) and c.job(valid), 60,
                   0.5, what=f"job {valid} decided")
    assert job["priority"] > 0
    m = DECIDED.match(job["admin_comment"])
    assert m[1] == "vision"
    resv = wait_for(lambda: (r := reservation(c, m[2])) and r["job_id"] == valid and r, 60, 0.5,
                    what=f"job {valid}'s reservation bound")
    assert resv["team"] == "vision" and resv["state"] == "bound"


def test_a_job_slurmgate_held_stays_held_when_its_owner_raises_the_nice(
        daemon_stopped: Cluster, submitted: Submitted) -> None:
    """Slurm 22.05 recomputes a job's priority when its nice changes (slurmctld.log: "nice
    changed from .. to .., setting priority to 2"), which lifts an admin hold. Raising the nice
    is otherwise allowed, so it must not be for a job slurmgate held."""
    c = daemon_stopped
    job_id, _ = submitted.ok("mallory", "--gres=gpu:1", LATER, tags=TAGS["alice"])
    c.ctl("daemon", "start")
    wait_for(lambda: held_by_slurmgate(c, job_id), 60, 0.5, what=f"job {job_id} held")
    out = scontrol_as(c, "mallory", "update", f"job={job_id}", f"Nice={nice_of(c, job_id) + 1}")
    job = c.job(job_id)
    assert held_by_slurmgate(c, job_id), \
        f"scontrol rc={out.returncode}: job {job_id} now has priority {job['priority']} " \
        f"({job['state_reason']}): released by its owner"
    assert out.returncode != 0


def test_fail_closed_rejects_while_the_daemon_is_down(daemon_stopped: Cluster) -> None:
    render_lua(daemon_stopped, "closed")
    out = daemon_stopped.sbatch("alice", "--gres=gpu:1")
    err = out.stderr.decode(errors="replace")
    assert out.returncode != 0, out.stdout
    assert "slurmgate: job rejected: the job policy service is down" in err, err
    assert "Try again in a few minutes" in err


# -- 9. arrays -----------------------------------------------------------------------------


def estimated_cost(cluster: Cluster, user: str, *args: str) -> float:
    out = estimate_as(cluster, user, "--json", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)["est_cost"]


def test_an_array_reservation_follows_its_throttle_and_closes_at_the_end(
        cluster: Cluster, submitted: Submitted) -> None:
    """M2/ArrayTaskThrottle: 22.05 applies a user's throttle change although job_modify
    refuses it; the reservation must grow to what may run."""
    per_task = estimated_cost(cluster, "alice", f"--comment={TAGS['alice']}", "--gres=gpu:1",
                              "-t", "5")
    job_id, _ = submitted.ok("alice", "--gres=gpu:1", "--array=0-9%2", wrap="sleep 10")
    rid = rid_of(cluster, job_id)
    resv = reservation(cluster, rid)
    assert resv["tasks"] == 2 and resv["est_cost"] == pytest.approx(2 * per_task, abs=0.011)

    scontrol_as(cluster, "alice", "update", f"job={job_id}", "ArrayTaskThrottle=10")

    def tasks() -> list[dict]:
        return [j for j in cluster.jobs().values() if j["array_job_id"] == job_id]

    def covered() -> dict | None:
        running = sum(t["job_state"] == "RUNNING" for t in tasks())
        r = reservation(cluster, rid)
        return r if r["tasks"] > 2 and r["tasks"] >= running and \
            r["est_cost"] >= running * per_task - 0.011 else None

    resv = wait_for(covered, 60, 0.5, what="the reservation covering the running tasks")
    assert resv["est_cost"] == pytest.approx(resv["tasks"] * per_task, abs=0.011 * resv["tasks"])
    assert events_of(cluster, "reservation_repriced", job_id)

    wait_for(lambda: all(t["job_state"] in FINAL_STATES for t in tasks()), 180, 1,
             what="every array task ended")
    from slurm_plugin.daemon.workers import ARRAY_ENDED, ARRAY_SETTLE_S

    every = load_policy(cluster.policy_path).daemon.reconcile_seconds
    # let go once every task has ended, while Slurm still lists them (not after MinJobAge)
    closed = wait_for(lambda: (r := reservation(cluster, rid))["state"] in ("settled",
                                                                           "released") and r,
                      ARRAY_SETTLE_S + 3 * every + 30, 1, what="the array's reservation closed")
    assert closed["reason"] == ARRAY_ENDED
    assert closed["state"] in ("settled", "released")


# -- 10. no time limit ---------------------------------------------------------------------


def test_a_job_without_a_time_limit_gets_the_one_it_was_priced_at(
        cluster: Cluster, submitted: Submitted) -> None:
    limit = load_policy(cluster.policy_path).partitions["gpu"].max_time_minutes
    job_id, err = submitted.ok("alice", "--gres=gpu:1", "-t", "UNLIMITED", LATER)
    assert cluster.job(job_id)["time_limit"] == limit, err
    priced = estimated_cost(cluster, "alice", f"--comment={TAGS['alice']}", "--gres=gpu:1",
                            "-t", str(limit))
    assert reservation(cluster, rid_of(cluster, job_id))["est_cost"] == pytest.approx(priced)


def test_a_gpu_job_without_a_time_limit_is_refused_where_the_partition_sets_none(
        cluster: Cluster, policy_override) -> None:
    text = policy_override.original
    assert "max_time_minutes = 1440" in text
    policy_override.apply(text.replace("max_time_minutes = 1440", "max_time_minutes = 0"))
    out = cluster.sbatch("alice", "-p", "scavenger", "--gres=gpu:1", "-t", "UNLIMITED")
    err = out.stderr.decode(errors="replace")
    assert out.returncode != 0, out.stdout
    assert "need a time limit" in err and "add a time limit, e.g. `sbatch -t 04:00:00" in err, err
