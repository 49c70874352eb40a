"""Node and controller hooks end to end in a temporary spool, with Slurm's environment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from slurm_plugin.node import hooks, spool
from slurm_plugin.node.nvml import FakeNvml, NvmlUnavailable
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
SLURM_GID = __import__("pwd").getpwnam("slurm").pw_gid
T0 = 1_750_000_000.0


def write_config(tmp_path: Path, extra: str = "", make_spool: bool = True) -> Path:
    """The policy, and the shared spool root as INSTALL makes it (root:slurm 0775)."""
    cfg = tmp_path / "policy.toml"
    if make_spool and not (tmp_path / "spool").exists():
        (tmp_path / "spool").mkdir()
        os.chown(tmp_path / "spool", 0, SLURM_GID)
        os.chmod(tmp_path / "spool", 0o775)
    cfg.write_text(f"""
[daemon]
spool_dir = "{tmp_path / 'spool'}"
socket = "{tmp_path / 'd.sock'}"
cluster = "dev"

[node]
state_dir = "{tmp_path / 'state'}"

[nvml]
backend = "fake"
sample_seconds = 30

[nvml.fake_nodes.node2]
gpu_type = "h100"
count = 4
power_watts = 500
utilization = [90, 95, 60, 85]
memory_gb = 80
{extra}""")
    return cfg


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def node_env(cfg: Path, **over: str) -> dict[str, str]:
    env = {
        "SLURMGATE_CONFIG": str(cfg), "SLURM_JOB_ID": "77", "SLURM_JOB_RESTART_COUNT": "0",
        "SLURMD_NODENAME": "node2", "SLURM_JOB_GPUS": "1,3", "SLURM_JOB_USER": "alice",
        "SLURM_JOB_ACCOUNT": "ml",
    }
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def records(spool_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    items = spool.claim_batch(spool_dir)
    assert all(i.error is None for i in items), [i.error for i in items]
    return [i.record for i in items if kind is None or i.record["kind"] == kind]


class NudgeCounter:
    def __init__(self, path: Path) -> None:
        self.lines: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(4096)
                self.lines.append(data)
                conn.sendall(b'{"v":1,"ok":true}\n')


def test_prolog_then_epilog_writes_one_node_run(
    cfg: Path, tmp_path: Path, capsys: Any
) -> None:
    daemon = NudgeCounter(tmp_path / "d.sock")
    env = node_env(cfg)
    assert hooks.main(["prolog"], env=env, now=T0) == 0
    baseline = tmp_path / "state" / "baseline" / "node2.77.json"  # node-local, root-only
    assert baseline.exists()
    assert not (tmp_path / "spool" / "baseline").exists()
    assert oct(os.stat(baseline.parent).st_mode & 0o777) == "0o700"
    assert records(tmp_path / "spool") == []  # the baseline is not a record
    assert hooks.main(["hook", "epilog"], env=env, now=T0 + 3600) == 0
    assert capsys.readouterr().err == ""
    [rec] = records(tmp_path / "spool")
    assert not baseline.exists()
    fake = FakeNvml("node2", {"fake_nodes": {"node2": {"gpu_type": "h100"}}}).devices()
    assert rec["kind"] == "node_run" and rec["cluster"] == "dev"
    assert (rec["job_id"], rec["restart_count"], rec["node"]) == (77, 0, "node2")
    assert (rec["user"], rec["account"]) == ("alice", "ml")
    assert (rec["start_ts"], rec["end_ts"]) == (T0, T0 + 3600)
    assert rec["flags"] == []
    assert [(g["index"], g["minor"], g["uuid"], g["gpu_type"]) for g in rec["gpus"]] == [
        (1, 1, fake[1].uuid, "h100"), (3, 3, fake[3].uuid, "h100"),
    ]
    for gpu in rec["gpus"]:
        assert gpu["energy_j"] == pytest.approx(500 * 3600)  # 500 W for an hour
        assert gpu["gpu_seconds"] == 3600
        assert 60 <= gpu["util_mean"] <= 95 and gpu["util_max"] == 95
        assert 0 < gpu["mem_max_bytes"] <= 80 * 2**30
    wait_for(lambda: daemon.lines, timeout=5, what="the epilog's nudge")
    assert json.loads(daemon.lines[0]) == {"v": 1, "op": "nudge"}


def test_epilog_without_baseline_still_writes_a_flagged_record(cfg: Path, tmp_path: Path) -> None:
    assert hooks.main(["epilog"], env=node_env(cfg), now=T0) == 0
    [rec] = records(tmp_path / "spool")
    assert "no_baseline" in rec["flags"]
    assert rec["start_ts"] is None and rec["end_ts"] == T0
    assert [g["index"] for g in rec["gpus"]] == [1, 3]
    assert all(g["energy_j"] is None and g["gpu_seconds"] is None for g in rec["gpus"])


def test_epilog_with_a_corrupt_baseline(cfg: Path, tmp_path: Path) -> None:
    hooks.main(["prolog"], env=node_env(cfg), now=T0)
    (tmp_path / "state" / "baseline" / "node2.77.json").write_text("{garbage")
    assert hooks.main(["epilog"], env=node_env(cfg), now=T0 + 60) == 0
    [rec] = records(tmp_path / "spool")
    assert "baseline_unreadable" in rec["flags"]


def test_requeued_run_keeps_its_own_baseline(cfg: Path, tmp_path: Path) -> None:
    hooks.main(["prolog"], env=node_env(cfg, SLURM_JOB_RESTART_COUNT="1"), now=T0)
    env = node_env(cfg)
    del env["SLURM_JOB_RESTART_COUNT"]  # comes from the credential; may be absent
    assert hooks.main(["epilog"], env=env, now=T0 + 120) == 0
    [rec] = records(tmp_path / "spool")
    assert rec["restart_count"] == 1 and rec["start_ts"] == T0
    assert "restart_count_missing" in rec["flags"] and "no_baseline" not in rec["flags"]


def test_cpu_only_job_and_unknown_gpu(cfg: Path, tmp_path: Path) -> None:
    env = node_env(cfg, SLURM_JOB_ID="5")
    del env["SLURM_JOB_GPUS"]
    hooks.main(["prolog"], env=env, now=T0)
    hooks.main(["epilog"], env=env, now=T0 + 10)
    env = node_env(cfg, SLURM_JOB_ID="6", SLURM_JOB_GPUS="0,7")  # node2 has GPUs 0-3
    hooks.main(["prolog"], env=env, now=T0)
    hooks.main(["epilog"], env=env, now=T0 + 10)
    by_job = {r["job_id"]: r for r in records(tmp_path / "spool")}
    assert by_job[5]["gpus"] == [] and by_job[5]["flags"] == []
    assert [g["index"] for g in by_job[6]["gpus"]] == [0, 7]
    assert by_job[6]["flags"] == ["gpu_not_found:7"]
    assert by_job[6]["gpus"][1]["uuid"] == "unknown:node2:7"
    assert by_job[6]["gpus"][1]["gpu_seconds"] == 10


def test_nvml_unavailable_keeps_times_and_gpus(
    cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    def broken(*args: Any, **kw: Any) -> Any:
        raise NvmlUnavailable("nvmlInit failed: DriverNotLoaded")

    monkeypatch.setattr(hooks, "open_backend", broken)
    assert hooks.main(["prolog"], env=node_env(cfg), now=T0) == 0
    assert hooks.main(["epilog"], env=node_env(cfg), now=T0 + 30) == 0
    assert "DriverNotLoaded" in capsys.readouterr().err
    [rec] = records(tmp_path / "spool")
    assert "nvml_unavailable" in rec["flags"]
    assert [(g["index"], g["uuid"], g["energy_j"], g["gpu_seconds"]) for g in rec["gpus"]] == [
        (1, "unknown:node2:1", None, 30.0), (3, "unknown:node2:3", None, 30.0),
    ]


def test_jobcomp_with_odd_values(cfg: Path, tmp_path: Path) -> None:
    env = {
        "SLURMGATE_CONFIG": str(cfg), "JOBID": "88", "JOBSTATE": "NODE_FAIL",
        "START": "1750000000", "END": "Unknown", "SUBMIT": "", "NODES": "node[1-2]",
        "NODECNT": "", "PARTITION": "gpu", "UID": "Unknown", "USERNAME": "bob",
        "EXITCODE": "0:9", "DERIVED_EC": "", "LIMIT": "UNLIMITED", "ACCOUNT": "",
        "ARRAYJOBID": "0", "ARRAYTASKID": "4294967294", "WORK_DIR": "unknown",
    }
    assert hooks.main(["jobcomp"], env=env, now=T0) == 0
    env.update(JOBID="89", JOBSTATE="COMPLETED", END="1750003600", NODECNT="1", UID="1002",
               LIMIT="1-02:30:00", ARRAYJOBID="85", ARRAYTASKID="4", WORK_DIR="/home/bob")
    assert hooks.main(["jobcomp"], env=env, now=T0) == 0
    by_job = {r["job_id"]: r for r in records(tmp_path / "spool", "jobcomp")}
    odd = by_job[88]
    assert odd["state"] == "NODE_FAIL" and odd["restart_count"] is None
    assert (odd["submit_ts"], odd["start_ts"], odd["end_ts"]) == (None, T0, None)
    assert (odd["node_count"], odd["uid"], odd["account"], odd["derived_ec"]) == (0, None,
                                                                                  None, None)
    assert odd["time_limit_min"] is None and odd["work_dir"] is None
    assert (odd["array_job_id"], odd["array_task_id"]) == (None, None)
    assert odd["nodes"] == "node[1-2]" and odd["exit_code"] == "0:9"
    ok = by_job[89]
    assert (ok["end_ts"], ok["node_count"], ok["uid"]) == (T0 + 3600, 1, 1002)
    assert ok["time_limit_min"] == 1590
    assert (ok["array_job_id"], ok["array_task_id"], ok["work_dir"]) == (85, 4, "/home/bob")


@pytest.mark.parametrize(
    ("limit", "minutes"),
    [("UNLIMITED", None), ("Partition_Limit", None), ("INVALID", None), ("", None),
     ("00:30:00", 30), ("01:00:00", 60), ("7-00:00:00", 10080), ("90", 90), ("05:30", 6),
     ("2-12", 3600), ("1-00:01", 1441), ("00:00:01", 1), ("x-1", None), ("1:2:3:4", None),
     ("2982616-08:14:00", None)],
)
def test_time_limit_parsing(limit: str, minutes: int | None) -> None:
    assert hooks.parse_time_limit(limit) == minutes


@pytest.mark.parametrize(
    "text",
    ["[daemon\nspool_dir = 1", "[daemon]\nspool_dir = 5\n", "[nvml]\nbackend = 'cuda'\n",
     "daemon = 3\n", "[nvml]\ngpu_numbering = 'nvml'\n"],
)
def test_broken_config_logs_one_line_and_exits_0(tmp_path: Path, text: str, capsys: Any) -> None:
    cfg = tmp_path / "policy.toml"
    cfg.write_text(text)
    for hook in ("prolog", "epilog", "jobcomp"):
        env = {**node_env(cfg), "JOBID": "1"}
        assert hooks.main([hook], env=env, now=T0) == 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(cfg) in err and f"slurmgate hook {hook}" in err


def test_missing_config_and_bad_job_id(tmp_path: Path, capsys: Any) -> None:
    env = node_env(tmp_path / "nope.toml")
    assert hooks.main(["prolog"], env=env) == 0
    assert "cannot read policy file" in capsys.readouterr().err
    env = node_env(write_config(tmp_path), SLURM_JOB_ID="abc")
    assert hooks.main(["prolog"], env=env) == 0
    assert "SLURM_JOB_ID is missing or not a number" in capsys.readouterr().err


def test_unwritable_spool_never_fails_the_job(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "spool").write_text("a file where the spool should be")
    cfg = write_config(tmp_path)
    assert hooks.main(["prolog"], env=node_env(cfg), now=T0) == 0
    assert hooks.main(["epilog"], env=node_env(cfg), now=T0) == 0
    lines = capsys.readouterr().err.splitlines()
    # the baseline is node-local now; the record waits in the node's fallback spool
    assert len(lines) == 1 and "Error" in lines[0] and "fallback" in lines[0]
    [kept] = spool.fallback_records(str(tmp_path / "state"))
    assert kept.startswith("node_run.dev.77.0.node2.")


@pytest.mark.parametrize("how", ["missing", "read-only", "wrong owner", "a file"])
def test_fallback_spool_keeps_the_record_and_the_next_hook_forwards_it(
        tmp_path: Path, capsys: Any, how: str) -> None:
    cfg = write_config(tmp_path, make_spool=False)
    root = tmp_path / "spool"
    if how == "a file":
        root.write_text("not a directory")
    elif how != "missing":
        root.mkdir()
        os.chown(root, 0, SLURM_GID)
        os.chmod(root, 0o775)
        (root / "node").mkdir(mode=0o770)
        if how == "wrong owner":
            os.chown(root / "node", __import__("pwd").getpwnam("alice").pw_uid, SLURM_GID)
        else:
            # a read-only bind mount of the spool on itself (make test runs as root)
            for argv in (["mount", "--bind", str(root), str(root)],
                         ["mount", "-o", "remount,ro,bind", str(root)]):
                done = subprocess.run(argv, capture_output=True, text=True, check=False)
                assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
            assert not _writable(root / "node"), "the spool is still writable"
    hooks.main(["prolog"], env=node_env(cfg), now=T0)
    assert hooks.main(["epilog"], env=node_env(cfg), now=T0 + 60) == 0
    assert "fallback" in capsys.readouterr().err
    [kept] = spool.fallback_records(str(tmp_path / "state"))
    assert oct(os.stat(tmp_path / "state" / "fallback").st_mode & 0o777) == "0o700"
    # the spool is repaired; the next hook run on the node forwards the record first
    subprocess.run(["umount", str(root)], capture_output=True, check=False)
    if root.is_file():
        root.unlink()
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    os.chown(root, 0, SLURM_GID)
    os.chmod(root, 0o775)
    hooks.main(["prolog"], env=node_env(cfg, SLURM_JOB_ID="78"), now=T0 + 100)
    assert spool.fallback_records(str(tmp_path / "state")) == []
    [rec] = records(root)
    assert rec["job_id"] == 77 and rec["start_ts"] == T0  # the record, with its baseline
    assert kept.endswith(f".{rec['record_id']}.json")


def _writable(directory: Path) -> bool:
    try:
        (directory / ".probe").write_text("x")
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


def test_usage_errors() -> None:
    assert hooks.main([], env={}) == 2
    assert hooks.main(["bogus"], env={}) == 2


def run_hook(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], env=full, cwd=REPO, text=True,
                          capture_output=True, timeout=60)


MAIN = ("import sys; from slurm_plugin.node.hooks import main; "
        "sys.exit(main(sys.argv[1:] or {argv}))")


def test_hooks_as_processes(cfg: Path, tmp_path: Path) -> None:
    env = node_env(cfg)
    probe = ("import sys; from slurm_plugin.node.hooks import main; rc = main(['prolog']); "
             "heavy = [m for m in ('pydantic', 'sqlite_utils', 'textual', 'pynvml') "
             "if m in sys.modules]; print(heavy); sys.exit(rc)")
    p = run_hook(probe, env)
    assert (p.returncode, p.stdout.strip(), p.stderr) == (0, "[]", "")
    p = run_hook(MAIN.format(argv=["epilog"]), env)
    assert (p.returncode, p.stderr) == (0, "")
    [rec] = records(tmp_path / "spool")
    assert rec["kind"] == "node_run" and rec["gpus"][0]["energy_j"] > 0
    # a broken policy file: exit status 0 and one line for the wrapper's log
    (tmp_path / "policy.toml").write_text("[daemon\n")
    p = run_hook(MAIN.format(argv=["epilog"]), env)
    assert p.returncode == 0 and p.stderr.count("\n") == 1
    assert "not valid TOML" in p.stderr


def test_jobcomp_of_a_requeued_run_says_requeued(tmp_path):
    from slurm_plugin.node.hooks import HookSettings, jobcomp

    spool = tmp_path / "spool"
    spool.mkdir()
    settings = HookSettings(str(spool), str(tmp_path / "none.sock"), "c", {}, "minor",
                            state_dir=str(tmp_path / "state"))
    jobcomp({"JOBID": "7", "JOBSTATE": "PENDING", "START": "100", "END": "160"}, settings, 200.0)
    (path,) = [p for p in (spool / "ctld").iterdir() if p.suffix == ".json"]
    assert json.loads(path.read_text())["state"] == "REQUEUED"


def test_requeued_run_uses_the_prolog_baseline_and_the_epilogs_restart_count(
        cfg: Path, tmp_path: Path) -> None:
    # Slurm 22.05: the requeued run's Prolog sees restart count 0, its Epilog the real one
    hooks.main(["prolog"], env=node_env(cfg, SLURM_JOB_RESTART_COUNT="0"), now=T0)
    hooks.main(["epilog"], env=node_env(cfg, SLURM_JOB_RESTART_COUNT="1"), now=T0 + 60)
    [rec] = records(tmp_path / "spool")
    assert rec["restart_count"] == 1 and rec["start_ts"] == T0
    assert "no_baseline" not in rec["flags"]


def test_a_record_the_daemon_could_not_use_is_kept_in_quarantine(
        cfg: Path, tmp_path: Path, capsys: Any) -> None:
    """The hooks write through the one record check (policies.records.validate): a GPU that
    Slurm names by a UUID this node does not have has no index the ingest could take."""
    env = node_env(cfg, SLURM_JOB_GPUS="GPU-not-on-this-node")
    assert hooks.main(["epilog"], env=env, now=T0) == 0  # never fails the job
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RefusedRecord: gpus[0].index must not be negative" in err
    assert records(tmp_path / "spool") == []
    # a node's root may not write the daemon's quarantine/: kept node-local, with its reason
    [kept] = (tmp_path / "state" / "quarantine").glob("node_run.*.json")
    assert "refused by write_record" in Path(str(kept) + ".reason").read_text()
    assert json.loads(kept.read_text())["gpus"][0]["uuid"] == "unknown:node2:GPU-not-on-this-node"


def test_hook_records_are_built_by_the_record_home(cfg: Path, tmp_path: Path) -> None:
    from policies import records as home

    hooks.main(["prolog"], env=node_env(cfg), now=T0)
    hooks.main(["epilog"], env=node_env(cfg), now=T0 + 60)
    jobcomp_env = {"SLURMGATE_CONFIG": str(cfg), "JOBID": "77", "JOBSTATE": "COMPLETED",
                   "START": str(int(T0)), "END": str(int(T0 + 60)), "NODES": "node2",
                   "NODECNT": "1"}
    hooks.main(["jobcomp"], env=jobcomp_env, now=T0 + 61)
    by_kind = {r["kind"]: r for r in records(tmp_path / "spool")}
    filled = ["v", "record_id", "written_at"]
    assert list(by_kind["node_run"]) == [*home.node_run_record(
        cluster="", job_id=0, restart_count=0, node="", user=None, account=None,
        start_ts=None, end_ts=0.0, gpus=[]), *filled]
    assert list(by_kind["node_run"]["gpus"][0]) == list(home.node_run_gpu(
        index=0, minor=None, uuid="", gpu_type="", gpu_seconds=None))
    assert list(by_kind["jobcomp"]) == [
        *home.jobcomp_record(cluster="", job_id=0, state=""), *filled]
    assert all(home.validate(r) is None for r in by_kind.values())


def test_slurms_run_id_is_recorded_when_slurm_gives_one(cfg: Path, tmp_path: Path) -> None:
    """Slurm 25.11 and later: SLURM_JOB_SLUID in the prolog/epilog, SLUID in jobcomp/script.
    The prolog's copy stands in when the epilog's environment lacks it; older Slurm: none."""
    hooks.main(["prolog"], env=node_env(cfg, SLURM_JOB_SLUID="s8CNM8SYJPCA00"), now=T0)
    hooks.main(["epilog"], env=node_env(cfg), now=T0 + 60)
    hooks.main(["prolog"], env=node_env(cfg, SLURM_JOB_ID="78"), now=T0)
    hooks.main(["epilog"], env=node_env(cfg, SLURM_JOB_ID="78"), now=T0 + 60)
    hooks.main(["jobcomp"], env={"SLURMGATE_CONFIG": str(cfg), "JOBID": "77",
                                 "JOBSTATE": "COMPLETED", "SLUID": "s8CNM8SYJPCA00",
                                 "ORIGINAL_SLUID": "s8CNM8SYJPCA00"}, now=T0 + 61)
    got = {(r["kind"], r["job_id"]): r.get("sluid") for r in records(tmp_path / "spool")}
    assert got == {("node_run", 77): "s8CNM8SYJPCA00", ("node_run", 78): None,
                   ("jobcomp", 77): "s8CNM8SYJPCA00"}
