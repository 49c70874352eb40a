"""Attacks on the accounting path, tried as unprivileged users on the real dev cluster.

Each test states the attack, then proves it failed: refused by the file system or quarantined
with a reason naming the file, the daemon alive, no privileged action taken (no requeue, drain,
exclusion or credit), no bill changed, and genuine records before and after ingested once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from policies.records import jobcomp_record, node_run_gpu, node_run_record
from tests.conftest import FINAL_STATES, Cluster
from tests.hostile.conftest import (
    as_user,
    cluster_name,
    daemon_alive,
    json_line,
    privileged_actions,
    runs_of,
    spend,
    wait_for,
    wait_quarantined,
)

ATTACKER = "mallory"


def settled(cluster: Cluster, job_id: int, timeout: float = 90) -> list[dict]:
    """The job's runs once its completion is in the database (exactly as many as it had)."""
    def done() -> list[dict] | None:
        runs = runs_of(cluster, job_id)
        return runs if runs and all(r["state"] for r in runs) else None

    return wait_for(done, timeout, 0.5, what=f"job {job_id} settled in the database")


def genuine_job(cluster: Cluster, user: str = "alice") -> int:
    job_id = cluster.submit_ok(user, "--gres=gpu:1", wrap="sleep 1")
    cluster.wait_state(job_id, FINAL_STATES, 90)
    return job_id


def forged_node_fail(cluster: Cluster, victim_job: int, node: str) -> dict:
    now = time.time()
    return jobcomp_record(cluster=cluster_name(cluster), job_id=victim_job, state="NODE_FAIL",
                          restart_count=0, submit_ts=now - 60, start_ts=now - 50, end_ts=now,
                          nodes=node, node_count=1, partition="gpu", user="alice",
                          account="vision")


def forged_bill(cluster: Cluster, job_id: int) -> dict:
    """A node_run that would bill 8 H100s for a year to whoever owns ``job_id``."""
    now = time.time()
    year = 365 * 86400.0
    gpus = [node_run_gpu(index=i, minor=i, uuid=f"GPU-forged-{i}", gpu_type="h100",
                         gpu_seconds=year, energy_j=None, util_mean=None, util_max=None,
                         mem_max_bytes=None) for i in range(8)]
    return node_run_record(cluster=cluster_name(cluster), job_id=job_id, restart_count=0,
                           node="node2", start_ts=now - year, end_ts=now, user="bob",
                           account="nlp", gpus=gpus, flags=[])


# -- the spool is not writable by users -------------------------------------------------------


def test_users_can_create_nothing_in_the_spool(cluster: Cluster) -> None:
    spool = cluster.dir / "spool"
    for where in ("", "node", "node/tmp", "ctld", "ctld/tmp", "quarantine"):
        d = spool / where
        code = (
            "import os, sys\n"
            f"d = {str(d)!r}\n"
            "tries = [lambda: open(os.path.join(d, 'forged.json'), 'x'),\n"
            "         lambda: os.symlink('/etc/passwd', os.path.join(d, 'link.json')),\n"
            "         lambda: os.mkfifo(os.path.join(d, 'fifo.json')),\n"
            "         lambda: os.mkdir(os.path.join(d, 'tmp2'))]\n"
            "ok = 0\n"
            "for t in tries:\n"
            "    try:\n"
            "        t(); ok += 1\n"
            "    except PermissionError:\n"
            "        pass\n"
            "print(ok)\n")
        out = as_user(ATTACKER, code)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "0", f"{ATTACKER} created something in {d}"
    assert daemon_alive(cluster)


def test_forged_records_with_a_user_owner_are_quarantined_and_change_nothing(
        cluster: Cluster, tmp_path: Path) -> None:
    """A site that got the spool's mode wrong still holds: records the attacker owns are
    refused by owner, whatever they say (a NODE_FAIL for a healthy running job, a bill)."""
    victim = cluster.submit_ok("alice", "--gres=gpu:1", wrap="sleep 30")
    job = cluster.wait_state(victim, {"RUNNING"}, 60)
    node = job["nodes"]
    before_actions, before_spend = privileged_actions(cluster), spend(cluster)

    # beside the spool, so rename() stays on one mount (/tmp need not be: in a chroot it is not)
    drop = cluster.dir / f"forged-drop-{os.getpid()}"
    drop.mkdir(exist_ok=True)
    shutil.chown(drop, ATTACKER)
    for name, record in (("forged-nodefail.json", forged_node_fail(cluster, victim, node)),
                         ("forged-bill.json", forged_bill(cluster, victim))):
        out = as_user(ATTACKER, f"open({str(drop / name)!r}, 'wb').write({json_line(record)!r})")
        assert out.returncode == 0, out.stderr
    # root moves them in, keeping the owner: what a world-writable spool would have allowed
    os.rename(drop / "forged-nodefail.json", cluster.dir / "spool/ctld/forged-nodefail.json")
    os.rename(drop / "forged-bill.json", cluster.dir / "spool/node/forged-bill.json")
    drop.rmdir()

    for name in ("forged-nodefail.json", "forged-bill.json"):
        reason = wait_quarantined(cluster, name)
        assert "owner" in reason or "uid" in reason, reason
    assert any("forged-nodefail.json" in json.dumps(e)
               for e in cluster.log_events("quarantined")), "no log line names the file"

    assert cluster.job(victim)["job_state"] == "RUNNING"      # not requeued
    assert cluster.job(victim)["restart_cnt"] == 0
    assert privileged_actions(cluster) == before_actions
    states = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], env=cluster.env,
                            capture_output=True, text=True, timeout=30).stdout.split()
    assert not any(s.startswith(("drain", "down")) for s in states), states
    # spent, not reserved: an earlier test's reservation may close meanwhile (vanished grace)
    after = spend(cluster)
    assert after["nlp"][0] == before_spend["nlp"][0], "the forged bill reached team nlp"
    assert daemon_alive(cluster)

    cluster.scancel(victim)
    cluster.wait_state(victim, FINAL_STATES, 60)
    assert len(settled(cluster, victim)) == 1        # the genuine run, once


@pytest.mark.parametrize("shape", ["huge_int", "deep", "bad_utf8", "oversized", "fifo",
                                   "symlink", "wrong_kind"])
def test_pathological_records_are_quarantined_and_ingest_goes_on(cluster: Cluster,
                                                                 shape: str) -> None:
    """Even from an allowed writer (root on a node), no content can stall or crash ingest."""
    first = genuine_job(cluster)
    spool = cluster.dir / "spool/node"
    name = f"hostile-{shape}-{os.getpid()}.json"
    path = spool / name
    if shape == "huge_int":
        path.write_bytes(b'{"kind": "node_run", "job_id": ' + b"9" * 5000 + b"}\n")
    elif shape == "deep":
        path.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    elif shape == "bad_utf8":
        path.write_bytes(b'{"kind": "node_run", "node": "\xff\xfe"}\n')
    elif shape == "oversized":
        path.write_bytes(b'{"kind": "node_run", "pad": "' + b"x" * (1 << 20) + b'"}\n')
    elif shape == "fifo":
        os.mkfifo(path)
    elif shape == "symlink":
        os.symlink(cluster.dir / "var/slurmgate.db", path)
    elif shape == "wrong_kind":   # a jobcomp may only come from the controller's directory
        now = time.time()
        path.write_bytes(json_line(jobcomp_record(
            cluster=cluster_name(cluster), job_id=first, state="COMPLETED", restart_count=0,
            submit_ts=now, start_ts=now, end_ts=now)))
    wait_quarantined(cluster, name)
    assert daemon_alive(cluster)
    if shape == "symlink":
        assert (cluster.dir / "var/slurmgate.db").stat().st_size > 0   # the target is intact
    second = genuine_job(cluster)
    assert len(settled(cluster, first)) == 1
    assert len(settled(cluster, second)) == 1


# -- a hook that cannot write ------------------------------------------------------------------


def test_a_hook_that_cannot_write_keeps_its_record(cluster: Cluster) -> None:
    """node/ replaced by a directory the attacker owns (or the spool unwritable): the hooks
    exit 0, keep the record node-locally, doctor shows it pending, and once the spool is right
    again the record is forwarded and ingested once."""
    node_dir = cluster.dir / "spool/node"
    aside = cluster.dir / "spool/.node-aside"
    os.rename(node_dir, aside)
    node_dir.mkdir(mode=0o777)
    shutil.chown(node_dir, ATTACKER)
    try:
        job_id = genuine_job(cluster)
        fallback = cluster.dir / "var/node/fallback"
        wait_for(lambda: fallback.is_dir() and any(fallback.iterdir()), 60, 0.5,
                 what="the epilog's record in the node-local fallback spool")
        assert not any(node_dir.iterdir()), "a hook wrote into the attacker's directory"
        doctor = subprocess.run([str(cluster.dir / "bin/slurmgate"), "doctor", "--node",
                                 "node1", "--json"], env=cluster.env, capture_output=True,
                                text=True, timeout=120)
        report = json.loads(doctor.stdout)
        assert "fallback" in json.dumps(report), report
        hook_log = (cluster.dir / "log/hooks.log").read_text(errors="replace")
        assert f"node_run.{cluster_name(cluster)}.{job_id}." in hook_log  # names the record
        assert "fallback" in hook_log
    finally:
        shutil.rmtree(node_dir)
        os.rename(aside, node_dir)
    # the next hook run on the node forwards what it kept
    later = genuine_job(cluster)
    runs = settled(cluster, job_id)
    assert len(runs) == 1
    assert len(settled(cluster, later)) == 1
    wait_for(lambda: not any((cluster.dir / "var/node/fallback").iterdir()), 60, 0.5,
             what="the fallback spool drained")


# -- two daemons -------------------------------------------------------------------------------


def test_a_second_daemon_on_the_same_database_refuses_to_start(cluster: Cluster) -> None:
    out = subprocess.run(["setpriv", "--reuid", "slurm", "--regid", "slurm", "--init-groups",
                          "--", str(cluster.dir / "bin/slurmgate"), "daemon"],
                         env=cluster.env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    pid = (cluster.dir / "run/slurmgate.pid").read_text().strip()
    assert pid in out.stderr, out.stderr
    assert daemon_alive(cluster)


# -- the daemon killed in the middle of a batch ---------------------------------------------


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_daemon_killed_mid_batch_loses_and_doubles_nothing(cluster: Cluster) -> None:
    pid = int((cluster.dir / "run/slurmgate.pid").read_text())
    # held at submit (decided and reserved as usual), released once the daemon is stopped, so
    # every one of their records piles up in the spool for one big batch
    jobs = [cluster.submit_ok(u, "--hold", wrap="true") for u in ("alice", "bob", "carol") * 8]
    os.kill(pid, signal.SIGSTOP)
    try:
        subprocess.run(["scontrol", "release", ",".join(map(str, jobs))], env=cluster.env,
                       check=True, timeout=30)
        for j in jobs:
            cluster.wait_state(j, FINAL_STATES, 120)
        ctld = cluster.dir / "spool/ctld"
        prefix = f"jobcomp.{cluster_name(cluster)}."

        def waiting() -> int:
            names = [p.name for p in ctld.iterdir() if p.suffix == ".json"]
            return sum(any(n.startswith(f"{prefix}{j}.") for n in names) for j in jobs)

        wait_for(lambda: waiting() == len(jobs), 60, 0.3,
                 what="every completion record in the spool")
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(0.05)  # the kill point: 50 ms into the first batch (not a wait for a condition)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), 20, 0.1, what="daemon gone")
    cluster.ctl("daemon", "start")
    for j in jobs:
        runs = settled(cluster, j)
        assert len(runs) == 1, (j, runs)
        assert runs[0]["state"] == "COMPLETED"


def test_a_read_only_spool_keeps_the_record_until_it_is_writable(cluster: Cluster) -> None:
    """The shared spool goes read-only under the nodes (a remount, a full or failing NFS
    server): hooks exit 0, keep the record node-locally, doctor shows it pending, and it is
    forwarded and ingested once when the spool is writable again."""
    node_dir = cluster.dir / "spool/node"
    subprocess.run(["mount", "--bind", str(node_dir), str(node_dir)], check=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(node_dir)], check=True,
                       timeout=30)
        job_id = genuine_job(cluster)
        fallback = cluster.dir / "var/node/fallback"
        wait_for(lambda: fallback.is_dir() and any(
            p.name.startswith(f"node_run.{cluster_name(cluster)}.{job_id}.")
            for p in fallback.iterdir()), 60, 0.5, what="the record kept node-locally")
        doctor = subprocess.run([str(cluster.dir / "bin/slurmgate"), "doctor", "--node",
                                 "node1", "--json"], env=cluster.env, capture_output=True,
                                text=True, timeout=120)
        spool_check = next(c for c in json.loads(doctor.stdout)["checks"]
                           if c["check"] == "spool")
        assert spool_check["status"] == "FAIL", spool_check
        assert "fallback" in spool_check["detail"], spool_check
    finally:
        subprocess.run(["umount", str(node_dir)], check=True, timeout=30)
    later = genuine_job(cluster)
    assert len(settled(cluster, job_id)) == 1
    assert len(settled(cluster, later)) == 1


def test_a_symlinked_spool_directory_is_refused_and_nothing_is_lost(cluster: Cluster) -> None:
    """ctld/ replaced by a symlink to a directory the attacker owns: the daemon refuses it
    (log line naming it), the jobcomp hook does not write through it, and once the directory
    is back the kept completion record is ingested once."""
    ctld = cluster.dir / "spool/ctld"
    aside = cluster.dir / "spool/.ctld-aside"
    trap = Path(f"/tmp/sg-trap-{os.getpid()}")
    trap.mkdir(mode=0o777)
    shutil.chown(trap, ATTACKER)
    cluster.ctl("daemon", "stop")
    os.rename(ctld, aside)
    os.symlink(trap, ctld)
    try:
        cluster.ctl("daemon", "start")
        wait_for(lambda: any("ctld" in e.get("dir", "")
                             for e in cluster.log_events("spool_layout_refused")), 30, 0.3,
                 what="the daemon refusing the symlinked ctld/")
        job_id = genuine_job(cluster)
        wait_for(lambda: subprocess.run(["grep", "-q", f"jobcomp.{cluster_name(cluster)}."
                                         f"{job_id}.", str(cluster.dir / "log/hooks.log")],
                                        timeout=10).returncode == 0, 60, 0.5,
                 what="the jobcomp hook logging the record it kept")
        assert list(trap.iterdir()) == [], "a record was written through the symlink"
        assert daemon_alive(cluster)
    finally:
        cluster.ctl("daemon", "stop")
        ctld.unlink()
        os.rename(aside, ctld)
        shutil.rmtree(trap)
        cluster.ctl("daemon", "start")
    later = genuine_job(cluster)        # its jobcomp hook forwards the kept record first
    assert len(settled(cluster, job_id)) == 1
    assert len(settled(cluster, later)) == 1


def test_users_cannot_read_other_clusters_or_the_ledger_server_or_move_the_ledger(
        cluster: Cluster, tmp_path: Path) -> None:
    """The multi-cluster and shared-ledger surface, as an unprivileged user: another
    cluster's quota is refused, ping tells a user no more than that the ledger is down, and
    `slurmgate db migrate` cannot read the ledger (nor copy it anywhere)."""
    probe = as_user("mallory", (
        "import json\n"
        "from slurm_plugin.protocol import call\n"
        f"sock = {cluster.socket!r}\n"
        "print(json.dumps([call(sock, {'op': 'quota', 'cluster': 'elsewhere'}),\n"
        "                  call(sock, {'op': 'ping'})]))\n"))
    assert probe.returncode == 0, probe.stderr
    quota, ping = json.loads(probe.stdout.strip().splitlines()[-1])
    assert quota["ok"] is False and "this cluster" in quota["error"]
    assert ping["ok"] is True and ping.get("ledger") == "sqlite"
    assert "ledger_error" not in ping or ping["ledger_error"] == "unreachable"
    target = tmp_path / "stolen.url"
    target.write_text("postgresql://mallory:x@127.0.0.1:1/stolen\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(target, 0o644)
    out = as_user("mallory", (
        "import sys\n"
        "from slurm_plugin.cli import main\n"
        f"sys.exit(main(['--config', {str(cluster.dir / 'etc/policy.toml')!r}, 'db', "
        f"'migrate', '--to-file', {str(target)!r}]))\n"))
    assert out.returncode != 0
    assert "Permission denied" in out.stderr or "cannot" in out.stderr, out.stderr
