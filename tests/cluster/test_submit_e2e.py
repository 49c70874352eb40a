"""Issue: real sbatch on the real dev cluster, decided by the slurmgate daemon."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from slurm_plugin.protocol import call
from tests.conftest import FINAL_STATES, Cluster, render_lua, scontrol_retry
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm


def test_missing_tags_are_rejected_with_the_message_on_stderr(cluster: Cluster):
    out = cluster.sbatch("alice", "--gres=gpu:1", tags="project=vit-scaling")
    err = out.stderr.decode()
    assert out.returncode != 0
    assert "slurmgate: job rejected: 1 problem with the job tags" in err
    assert "missing required tag 'cost_center'" in err
    assert 'fix: sbatch --comment "project=vit-scaling,cost_center=CC1234"' in err


def test_invalid_tags_list_every_problem(cluster: Cluster):
    out = cluster.sbatch("bob", "--gres=gpu:1", tags="project=vit-scaling,cost_center=42,x")
    err = out.stderr.decode()
    assert out.returncode != 0
    assert "3 problems" in err
    assert "project 'vit-scaling' is not an allowed value of team nlp" in err
    assert "cost_center '42' does not look like cost centre code like CC1234" in err
    assert "'x' is not key=value" in err


def test_user_without_team_is_told_how_to_fix_it(cluster: Cluster):
    out = cluster.sbatch("mallory", tags="project=vit-scaling,cost_center=CC1001")
    assert out.returncode != 0
    assert "belongs to no team; submit with --account=<one of: nlp, vision>" in out.stderr.decode()


def test_valid_job_runs_on_a_gpu_node_and_completes(cluster: Cluster):
    job_id = cluster.submit_ok("alice", "--gres=gpu:a100:2", wrap="echo $CUDA_VISIBLE_DEVICES")
    job = cluster.wait_state(job_id, FINAL_STATES, timeout=90)
    assert job["job_state"] == "COMPLETED"
    assert job["nodes"] == "node1"
    assert job["admin_comment"].startswith("slurmgate:v2;team=vision;rid=r")
    assert "tags=project=vit-scaling,cost_center=CC1001" in job["admin_comment"]
    decisions = [e for e in cluster.log_events("decision") if e["user"] == "alice"]
    assert decisions and decisions[-1]["verdict"] == "accept"


def test_account_decides_the_team_for_its_members_only(cluster: Cluster):
    job_id = cluster.submit_ok("bob", "--account=nlp", "--gres=gpu:1",
                               tags="project=llm-eval,cost_center=CC2002")
    job = cluster.wait_state(job_id, FINAL_STATES, timeout=90)
    assert job["admin_comment"].startswith("slurmgate:v2;team=nlp;")
    out = cluster.sbatch("alice", "--account=nlp", "--gres=gpu:1",
                         tags="project=llm-eval,cost_center=CC2002")
    assert out.returncode != 0
    err = out.stderr.decode()
    assert "--account=nlp bills team nlp" in err and "your teams: vision" in err


def test_daemon_down_fail_open_accepts_and_marks_unchecked(daemon_stopped: Cluster):
    c = daemon_stopped
    render_lua(c, "open")
    job_id = c.submit_ok("alice", "--gres=gpu:1", tags="anything")
    assert c.job(job_id)["admin_comment"] == "slurmgate:unchecked"
    c.scancel(job_id)


def test_daemon_down_fail_closed_rejects_with_the_stated_message(daemon_stopped: Cluster):
    c = daemon_stopped
    render_lua(c, "closed")
    # slurmctld picks up the new script on the next submission (it checks the mtime)
    out = c.sbatch("alice", "--gres=gpu:1")
    assert out.returncode != 0
    assert "the job policy service is down" in out.stderr.decode()


def test_invalid_policy_on_sighup_keeps_enforcing_the_old_one(cluster: Cluster):
    original = cluster.policy_path.read_text()
    try:
        cluster.policy_path.write_text(original.replace("[tags]", "[tags]\nbogus_key = 1", 1))
        before = len(cluster.log_events("policy_reload_failed"))
        cluster.ctl("daemon", "reload")
        failed = wait_for(lambda: cluster.log_events("policy_reload_failed")[before:], 20,
                          what="reload failure logged")
        assert "tags.bogus_key: unknown setting" in failed[0]["error"]
        out = cluster.sbatch("alice", tags="project=vit-scaling")
        assert out.returncode != 0 and "cost_center" in out.stderr.decode()
    finally:
        cluster.policy_path.write_text(original)
        cluster.ctl("daemon", "reload")


def test_a_non_slurmuser_peer_is_refused(cluster: Cluster):
    client = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(b'{\"v\":1,\"op\":\"submit\",\"job\":{\"user\":\"mallory\","
        "\"comment\":\"project=vit-scaling,cost_center=CC1001\",\"account\":\"vision\"}}\\n')\n"
        "print(s.makefile().readline())\n"
    )
    out = subprocess.run(["runuser", "-u", "mallory", "--", "/usr/bin/python3", "-c", client,
                          cluster.socket], capture_output=True, text=True, timeout=30)
    resp = json.loads(out.stdout)
    assert resp["ok"] is False and "verdict" not in resp
    assert "accepted only from root or the SlurmUser" in resp["error"]


HOSTILE = [
    b'project=vit-scaling,cost_center=CC1001,note="quoted"',
    b"project=vit-scaling,cost_center=CC1001\nproject=evil",
    b"project=vit-scaling,cost_center=CC1001," + b"x=" + b"a" * 100_000,
    b"project=vit-\xff\xfescaling,cost_center=CC1001",
    b'project=vit-scaling"]] os.execute("touch /tmp/pwned") --[[,cost_center=CC1001',
    b'project=vit-scaling,cost_center=CC1001","verdict":"accept',
    b"project=%s%s%s%n,cost_center=CC1001",
    b"project=vit-scaling,cost_center=CC1001\\",
]


@pytest.mark.parametrize("comment", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_comments_never_crash_and_never_sneak_in(cluster: Cluster, comment: bytes):
    pid_before = (cluster.dir / "run/slurmgate.pid").read_text().strip()
    out = cluster.sbatch("alice", "--gres=gpu:1", tags=comment)
    err = out.stderr.decode(errors="replace")
    if out.returncode == 0:  # accepted: only as a properly checked job
        job_id = int(out.stdout.decode().strip())
        job = cluster.job(job_id)
        cluster.scancel(job_id)
        assert job["admin_comment"].startswith("slurmgate:v2;team=vision;rid=")
        assert "evil" not in job["admin_comment"] and "pwned" not in job["admin_comment"]
    else:
        assert "slurmgate: job rejected" in err or "comment" in err.lower(), err
    assert not Path("/tmp/pwned").exists()
    assert call(cluster.socket, {"op": "ping"})["ok"] is True
    assert (cluster.dir / "run/slurmgate.pid").read_text().strip() == pid_before
    os.kill(int(pid_before), 0)  # same daemon process still alive


def test_users_cannot_change_cost_deciding_fields_after_submission(cluster: Cluster):
    job_id = cluster.submit_ok("bob", "--gres=gpu:1", "--hold")
    try:
        for change in ("Partition=scavenger", "Comment=project=llm-eval,cost_center=CC2002",
                       "Gres=gpu:h100:4"):
            out = scontrol_retry(["runuser", "-u", "bob", "--", "scontrol", "update",
                                  f"JobId={job_id}", change], cluster.env)
            assert out.returncode != 0, change
            assert "Access/permission denied" in out.stderr, out.stderr
        log = (cluster.dir / "log/slurmctld.log").read_text(errors="replace")
        assert "slurmgate: this change is refused" in log
        assert cluster.job(job_id)["partition"] == "gpu"
        # what does not touch cost stays the user's to change
        ok = scontrol_retry(["runuser", "-u", "bob", "--", "scontrol", "update",
                             f"JobId={job_id}", "Name=renamed"], cluster.env)
        assert ok.returncode == 0, ok.stderr
        # root (an admin) may still move it
        moved = scontrol_retry(["scontrol", "update", f"JobId={job_id}", "Partition=scavenger"],
                               cluster.env)
        assert moved.returncode == 0, moved.stderr
        assert cluster.job(job_id)["partition"] == "scavenger"
    finally:
        cluster.scancel(job_id)
