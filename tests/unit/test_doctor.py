"""`slurmgate doctor` (slurm_plugin/doctor.py).

It must pass on the running dev cluster. The broken cases never touch that cluster: they run
against a copy of an installation in a temporary directory (its own policy, database, spool
and a daemon this test starts), and Slurm's configuration is handed to the doctor as text.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slurm_plugin.daemon.lua_shim import render_lua
from slurm_plugin.doctor import Doctor, parse_lua_socket, parse_slurm_config, run_doctor
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "contrib/slurm/slurmgate-hook"


class Install:
    """A slurmgate installation in a temporary directory, with its own running daemon."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.policy = root / "policy.toml"
        self.socket = str(root / "run" / "sg.sock")
        self.db = root / "sg.db"
        self.spool = root / "spool"
        self.etc = root / "etc"
        self.bin = root / "bin"
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (root / "run", self.etc, self.bin):
            d.mkdir(mode=0o755)
        self.spool.mkdir()
        os.chmod(self.spool, 0o775)  # root:<slurm group> 0775 (here the SlurmUser is root)
        self.write_policy()
        (self.etc / "job_submit.lua").write_text(render_lua(self.socket, 200, "open"))
        for hook in ("prolog", "epilog", "jobcomp"):
            (self.bin / f"slurmgate-{hook}").symlink_to(HOOK)

    def write_policy(self, extra: str = "") -> None:
        self.policy.write_text(
            f'[daemon]\nsocket = "{self.socket}"\ndatabase = "{self.db}"\n'
            f'spool_dir = "{self.spool}"\nslurm_user = "root"\ncluster = "doc"\n'
            f'log_file = "{self.root}/daemon.log"\n'
            f'[node]\nstate_dir = "{self.root}/state"\n'
            f'[export]\nout_dir = "{self.root}/exports"\n'
            '[rates.gpu_hour]\na100 = 2.0\n'
            '[nvml]\nbackend = "fake"\n[nvml.fake_nodes.gpu01]\ngpu_type = "a100"\ncount = 2\n'
            + extra)

    def slurm_text(self, **changes: str | None) -> str:
        """`scontrol show config` as the doctor reads it; None drops a key."""
        conf: dict[str, str | None] = {
            "ClusterName": "doc", "SLURM_CONF": str(self.etc / "slurm.conf"),
            "JobSubmitPlugins": "lua", "JobCompType": "jobcomp/script",
            "JobCompLoc": str(self.bin / "slurmgate-jobcomp"),
            "Prolog": str(self.bin / "slurmgate-prolog"),
            "Epilog": str(self.bin / "slurmgate-epilog"), "PrologFlags": "Alloc",
        }
        conf.update(changes)
        lines = ["Configuration data as of 2026-11-25T10:00:00"]
        lines += [f"{k:<23} = {v}" for k, v in conf.items() if v is not None]
        return "\n".join(lines) + "\n"

    def doctor(self, slurm_text: str | None = None, **kw: Any) -> Doctor:
        text = self.slurm_text() if slurm_text is None else slurm_text
        kw.setdefault("slurm_jobs", lambda: [])
        doc = Doctor(str(self.policy), slurm_config=lambda: text, **kw)
        doc.run()
        return doc

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
        env.update(PYTHONPATH=str(REPO), SLURM_CONF=str(self.etc / "slurm.conf"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slurm_plugin.cli", "--config", str(self.policy), "daemon"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, 20,
                 what="temporary daemon socket")
        assert self.proc.poll() is None
        # the socket is up before the ingest thread lays out the spool: wait for that too,
        # or a test that changes the spool's mode races the daemon's start
        wait_for(lambda: (self.spool / "ctld" / "tmp").is_dir() or self.proc.poll() is not None,
                 20, what="the daemon's spool layout")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


def status(doc: Doctor) -> dict[str, str]:
    return {c.name: c.status for c in doc.checks}


def check(doc: Doctor, name: str) -> Any:
    return next(c for c in doc.checks if c.name == name)


@pytest.fixture
def inst() -> Iterator[Install]:
    # a short path: Unix socket paths are limited to 108 bytes
    root = Path(tempfile.mkdtemp(prefix="sgdoc-", dir="/tmp"))
    os.chmod(root, 0o755)
    install = Install(root)
    install.start()
    try:
        yield install
    finally:
        install.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_healthy_installation_passes(inst: Install) -> None:
    os.chmod(inst.db, 0o640)
    doc = inst.doctor()
    assert not doc.failed, [c.line() for c in doc.checks]
    assert status(doc) == {"policy": "OK", "socket": "OK", "daemon": "OK", "database": "OK",
                           "spool": "OK", "slurm": "OK", "job_submit": "OK", "hooks": "OK",
                           "unchecked": "OK", "exports": "OK"}
    assert "SLURMGATE_CONFIG set" in check(doc, "hooks").detail


def test_wrong_socket_mode_and_stopped_daemon(inst: Install) -> None:
    os.chmod(inst.socket, 0o600)
    doc = inst.doctor()
    sock = check(doc, "socket")
    assert sock.status == "FAIL" and "0600" in sock.detail and "chmod 0666" in sock.fix
    assert doc.failed
    inst.stop()
    doc = inst.doctor()
    assert status(doc)["socket"] == "FAIL" and status(doc)["daemon"] == "FAIL"
    assert "systemctl start slurmgate-daemon" in check(doc, "daemon").fix
    # on a compute node the daemon being out of reach is only a warning
    node = inst.doctor(node="gpu01")
    assert status(node)["daemon"] == "WARN"


def test_broken_slurm_configuration(inst: Install) -> None:
    doc = inst.doctor(inst.slurm_text(JobSubmitPlugins="pbs"))
    assert check(doc, "slurm").status == "FAIL"
    assert "JobSubmitPlugins=lua" in check(doc, "slurm").fix
    doc = inst.doctor(inst.slurm_text(JobSubmitPlugins="job_submit/lua,job_submit/pbs"))
    assert check(doc, "slurm").status == "OK"
    doc = inst.doctor(inst.slurm_text(Prolog="/etc/slurm/site-prolog.sh"))
    hooks = check(doc, "hooks")
    assert hooks.status == "FAIL" and "Prolog=/etc/slurm/site-prolog.sh" in hooks.detail
    assert "slurmgate-prolog" in hooks.fix
    doc = inst.doctor(inst.slurm_text(JobCompType="jobcomp/none", Epilog=None))
    hooks = check(doc, "hooks")
    assert hooks.status == "FAIL" and "(+1 more)" in hooks.detail
    doc = inst.doctor(inst.slurm_text(PrologFlags="Contain"))
    assert check(doc, "hooks").status == "WARN" and not doc.failed
    # a site prolog that calls slurmgate's wrapper at its end is fine
    site = inst.root / "site-prolog"
    site.write_text(f"#!/bin/sh\n/usr/bin/true\n{inst.bin}/slurmgate-prolog\n")
    site.chmod(0o755)
    doc = inst.doctor(inst.slurm_text(Prolog=str(site)))
    assert check(doc, "hooks").status == "OK", check(doc, "hooks").line()

    def unreachable() -> str:
        raise RuntimeError("slurm_load_ctl_conf error: Unable to contact slurm controller")

    doc = Doctor(str(inst.policy), slurm_config=unreachable)
    doc.run()
    assert check(doc, "slurm").status == "FAIL" and "Unable to contact" in \
        check(doc, "slurm").detail


def test_job_submit_lua_problems(inst: Install) -> None:
    lua = inst.etc / "job_submit.lua"
    lua.write_text(render_lua("/run/elsewhere.sock", 200, "closed"))
    js = check(inst.doctor(), "job_submit")
    assert js.status == "FAIL" and "/run/elsewhere.sock" in js.detail
    assert f"slurmgate lua -o {lua}" in js.fix
    lua.write_text("function slurm_job_submit(job_desc, part_list, submit_uid)\n"
                   "  return slurm.SUCCESS\nend\n")
    assert "not a slurmgate-generated" in check(inst.doctor(), "job_submit").detail
    lua.write_text(render_lua(inst.socket, 200, "open").replace(
        "local UNCHECKED", "-- an older template\nlocal UNCHECKED"))
    js = check(inst.doctor(), "job_submit")
    assert js.status == "WARN" and "older" in js.detail
    lua.unlink()
    assert check(inst.doctor(), "job_submit").status == "FAIL"
    assert parse_lua_socket(render_lua("/tmp/a \"b\"\\c.sock")) == '/tmp/a "b"\\c.sock'


def test_spool_database_and_policy_problems(inst: Install) -> None:
    os.chmod(inst.spool, 0o1777)  # the old world-writable spool
    spool = check(inst.doctor(), "spool")
    assert spool.status == "FAIL" and "more open than 0775" in spool.detail
    assert "install -d -m 0775 -o root" in spool.fix and "/ctld" in spool.fix
    os.chmod(inst.spool, 0o775)
    os.chmod(inst.spool / "ctld", 0o777)
    spool = check(inst.doctor(), "spool")
    assert spool.status == "FAIL" and "ctld has mode 0777" in spool.detail
    os.chmod(inst.spool / "ctld", 0o770)
    inst.stop()  # nobody ingests: the backlog stays
    for i in range(5):
        (inst.spool / "ctld" / f"jobcomp.doc.{i}.0.ctl.x{i}.json").write_text("{}")
    doc = Doctor(str(inst.policy), slurm_config=inst.slurm_text, backlog_warn=3,
                 backlog_fail=100)
    doc.run()
    assert check(doc, "spool").status == "WARN" and "backlog 5 records" in \
        check(doc, "spool").detail
    doc = Doctor(str(inst.policy), slurm_config=inst.slurm_text, backlog_fail=5)
    doc.run()
    assert check(doc, "spool").status == "FAIL"
    for i in range(5):
        (inst.spool / "ctld" / f"jobcomp.doc.{i}.0.ctl.x{i}.json").unlink()
    (inst.spool / "ctld" / "tmp" / "stranded.json.tmp").write_text("{}")
    (inst.spool / "quarantine" / "q.json").write_text("{}")
    spool = check(inst.doctor(), "spool")
    assert spool.status == "WARN" and "1 quarantined; 1 in tmp/" in spool.detail
    (inst.spool / "quarantine" / "q.json").unlink()
    inst.start()
    os.chmod(inst.db, 0o644)
    db = check(inst.doctor(), "database")
    assert db.status == "WARN" and "chmod 0640" in db.fix
    inst.write_policy(extra="[budgets]\nmode = \"sometimes\"\n")
    doc = inst.doctor()
    assert check(doc, "policy").status == "FAIL" and "budgets.mode" in check(doc, "policy").detail
    assert status(doc)["database"] == "SKIP" and doc.failed
    inst.write_policy()
    inst.stop()
    inst.db.unlink()
    db = check(inst.doctor(), "database")
    assert db.status == "FAIL" and "no database here" in db.detail


def test_node_mode_checks_gpus_and_spool(inst: Install) -> None:
    doc = inst.doctor(node="gpu01")
    assert status(doc) == {"policy": "OK", "spool": "OK", "slurm": "OK", "hooks": "OK",
                           "gpus": "OK", "daemon": "OK"}
    assert "fake backend on gpu01: 2 x a100" in check(doc, "gpus").detail
    assert not list((inst.spool / "node" / "tmp").iterdir())  # the probe file is gone again
    # a planted symlink cannot catch the probe (random name, O_EXCL|O_NOFOLLOW), and
    # records waiting in the node's fallback spool are reported
    victim = inst.root / "victim"
    victim.write_text("precious\n")
    for pid in range(os.getpid() - 5, os.getpid() + 5):
        (inst.spool / "node" / "tmp" / f".doctor.{pid}").symlink_to(victim)
    from slurm_plugin.node import spool as sp

    sp.deliver(str(inst.root / "no-spool"), {
        "kind": "gpu_sample", "cluster": "doc", "node": "gpu01", "ts": 1.0, "gpus": []},
        trust=sp.trust_for("root"), state_dir=str(inst.root / "state"))
    doc = inst.doctor(node="gpu01")
    assert victim.read_text() == "precious\n"
    spool_check = check(doc, "spool")
    assert spool_check.status == "WARN" and "1 records wait in the fallback" in spool_check.detail
    for link in (inst.spool / "node" / "tmp").iterdir():
        link.unlink()

    class Unpriced:
        def devices(self) -> list[Any]:
            from slurm_plugin.node.nvml import GpuDevice

            return [GpuDevice(0, 0, "GPU-1", "NVIDIA L40S", "l40s", None, None)]

        def close(self) -> None:
            pass

    doc = inst.doctor(node="gpu01", open_backend=lambda policy, node: Unpriced())
    gpus = check(doc, "gpus")
    assert gpus.status == "WARN" and "l40s" in gpus.fix

    def no_driver(policy: Any, node: str) -> Any:
        from slurm_plugin.node.nvml import NvmlUnavailable

        raise NvmlUnavailable("NVML Shared Library Not Found")

    gpus = check(inst.doctor(node="gpu01", open_backend=no_driver), "gpus")
    assert gpus.status == "FAIL" and "NVML Shared Library" in gpus.detail


def test_cli_output_and_exit_status(inst: Install) -> None:
    lines: list[str] = []
    os.chmod(inst.db, 0o640)
    assert run_doctor(str(inst.policy), print_fn=lines.append,
                      slurm_config=inst.slurm_text, slurm_jobs=lambda: []) == 0
    assert lines[-1] == "10 checks: 0 failed, 0 warnings"
    assert all(line.startswith("OK   ") for line in lines[:-1])
    os.chmod(inst.socket, 0o644)
    lines.clear()
    assert run_doctor(str(inst.policy), print_fn=lines.append,
                      slurm_config=inst.slurm_text, slurm_jobs=lambda: []) == 1
    (bad,) = [line for line in lines if line.startswith("FAIL")]
    assert bad.startswith("FAIL socket") and "; fix: chmod 0666" in bad


def test_parse_scontrol_show_config() -> None:
    conf = parse_slurm_config(
        "Configuration data as of 2026-11-25T10:00:00\nAccountingStorageBackupHost = (null)\n"
        "JobSubmitPlugins        = lua\nSLURM_CONF              = /etc/slurm/slurm.conf\n"
        "Prolog                  = /a,/b\n\nCgroup Support Configuration:\n"
        "AllowedKmemSpace = (null)\n")
    assert conf["jobsubmitplugins"] == "lua" and conf["prolog"] == "/a,/b"
    assert conf["slurm_conf"] == "/etc/slurm/slurm.conf"
    assert "configuration data as of 2026-11-25t10:00:00" not in conf
