"""The deployment kit: systemd units (systemd-analyze verify), the hook wrapper, the Slurm
snippets and the logrotate file agree with each other and with slurmgate's defaults."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from policies.config import DaemonSettings, Export
from slurm_plugin.cli import build_parser
from slurm_plugin.doctor import Doctor

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "contrib/systemd"
SLURM = REPO / "contrib/slurm"
UNITS = ["slurmgate-daemon.service", "slurmgate-agent.service", "slurmgate-export.service",
         "slurmgate-export.timer"]
HARDENING = ["NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
             "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
             "ProtectControlGroups=yes", "RestrictNamespaces=yes", "RestrictSUIDSGID=yes",
             "LockPersonality=yes", "SystemCallArchitectures=native",
             "SystemCallFilter=@system-service", "CapabilityBoundingSet="]


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (a key may repeat, like ExecStart)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="needs systemd-analyze (package systemd; make test installs it)")
def test_units_pass_systemd_analyze_verify() -> None:
    missing = [p for p in ("/opt/slurmgate/venv/bin/slurmgate",) if not os.path.exists(p)]
    assert not missing, f"install slurmgate first (make install): {missing}"
    out = subprocess.run(["systemd-analyze", "verify", *[str(SYSTEMD / u) for u in UNITS]],
                         capture_output=True, text=True, timeout=120)
    # verify exits 0 on unknown keys and bad values: any output at all is a finding
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_daemon_unit_matches_the_defaults() -> None:
    u = unit("slurmgate-daemon.service")["Service"]
    d = DaemonSettings()
    assert u["User"] == ["slurm"] and d.slurm_user == "slurm"
    assert f"/run/{u['RuntimeDirectory'][0]}" == os.path.dirname(d.socket)
    assert u["RuntimeDirectoryMode"] == ["0755"]  # everyone reaches the 0666 socket
    assert f"/var/lib/{u['StateDirectory'][0]}" == os.path.dirname(d.database)
    assert u["UMask"] == ["0027"]  # database 0640
    assert d.spool_dir in u["ReadWritePaths"]
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    text = (SYSTEMD / "slurmgate-daemon.service").read_text()
    for line in HARDENING + ["PrivateDevices=yes"]:
        assert f"\n{line}\n" in text, line


def cli_args(exec_start: str) -> list[str]:
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/slurmgate/venv/bin/slurmgate", argv
    build_parser().parse_args(argv[1:])  # raises SystemExit on an option slurmgate lacks
    return argv[1:]


def test_exec_lines_are_commands_slurmgate_has() -> None:
    assert [cli_args(x) for x in unit("slurmgate-daemon.service")["Service"]["ExecStart"]] == [
        ["daemon"]]
    assert cli_args(unit("slurmgate-daemon.service")["Service"]["ExecStartPre"][0]) == [
        "check-policy"]
    assert cli_args(unit("slurmgate-agent.service")["Service"]["ExecStart"][0]) == ["agent"]
    export = unit("slurmgate-export.service")["Service"]
    runs = [cli_args(x) for x in export["ExecStart"]]
    assert runs[0][:3] == ["export", "--date", "yesterday"] and "--catch-up" in runs[0]
    assert runs[1][:3] == ["export", "--month", "last"]
    assert export["Type"] == ["oneshot"] and export["User"] == ["slurm"]
    assert os.path.dirname(Export().out_dir) == f"/var/lib/{export['StateDirectory'][0]}"
    for name in ("slurmgate-agent.service", "slurmgate-export.service"):
        text = (SYSTEMD / name).read_text()
        for line in HARDENING:
            assert f"\n{line}\n" in text, (name, line)


def test_timer_runs_the_export_nightly_after_utc_midnight() -> None:
    t = unit("slurmgate-export.timer")
    assert t["Timer"]["OnCalendar"] == ["*-*-* 00:30:00 UTC"]
    assert t["Timer"]["Persistent"] == ["true"]
    assert t["Install"]["WantedBy"] == ["timers.target"]
    assert (SYSTEMD / "slurmgate-export.service").exists()  # Unit= defaults to the same name


def test_slurm_snippet_wires_the_hooks_the_doctor_expects(tmp_path: Path) -> None:
    conf: dict[str, str] = {}
    for line in (SLURM / "slurm.conf.snippet").read_text().splitlines():
        if line.strip() and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    assert conf["JobSubmitPlugins"] == "lua" and conf["JobCompType"] == "jobcomp/script"
    assert conf["PrologFlags"] == "Alloc"
    libexec = "/usr/local/libexec/slurmgate"
    assert (conf["Prolog"], conf["Epilog"], conf["JobCompLoc"]) == (
        f"{libexec}/slurmgate-prolog", f"{libexec}/slurmgate-epilog",
        f"{libexec}/slurmgate-jobcomp")
    gres = (SLURM / "gres.conf.snippet").read_text()
    assert "File=/dev/nvidia[0-7]" in gres and "gpu_numbering" in gres
    # installed as INSTALL.md says (wrappers as symlinks), the doctor accepts the snippet
    for h in ("prolog", "epilog", "jobcomp"):
        (tmp_path / f"slurmgate-{h}").symlink_to(SLURM / "slurmgate-hook")
    text = "\n".join(f"{k} = {v.replace(libexec, str(tmp_path))}" for k, v in conf.items())
    policy = tmp_path / "policy.toml"
    policy.write_text("")
    doc = Doctor(str(policy), slurm_config=lambda: text)
    doc.check_policy()
    doc.check_slurm()
    doc.check_hooks()
    assert [c.status for c in doc.checks] == ["OK", "OK", "OK"], [c.line() for c in doc.checks]


def run_hook(tmp_path: Path, name: str, bin_exit: int, log_dir: bool = True
             ) -> tuple[subprocess.CompletedProcess[str], str, str]:
    fake = tmp_path / "fake-slurmgate"
    fake.write_text(f'#!/bin/bash\necho "cfg=$SLURMGATE_CONFIG args=$*" >> {tmp_path}/called\n'
                    f"exit {bin_exit}\n")
    fake.chmod(0o755)
    logs = tmp_path / "log"
    if log_dir:
        logs.mkdir(exist_ok=True)
    defaults = tmp_path / "defaults"
    defaults.write_text(f"SLURMGATE_CONFIG=/site/policy.toml\nSLURMGATE_BIN={fake}\n"
                        f"SLURMGATE_HOOK_LOG={logs}/hooks.log\n")
    link = tmp_path / name
    if not link.exists():
        link.symlink_to(SLURM / "slurmgate-hook")
    # the environment slurmctld gives jobcomp/script: no SLURMGATE_CONFIG, no PATH
    out = subprocess.run([str(link)], env={"SLURMGATE_DEFAULTS": str(defaults), "JOBID": "42",
                                           "JOBSTATE": "COMPLETED"},
                         capture_output=True, text=True, timeout=60)
    called = (tmp_path / "called").read_text() if (tmp_path / "called").exists() else ""
    log = (logs / "hooks.log").read_text() if (logs / "hooks.log").exists() else ""
    return out, called, log


def test_hook_wrapper_sets_the_config_and_always_exits_0(tmp_path: Path) -> None:
    out, called, log = run_hook(tmp_path, "slurmgate-jobcomp", 0)
    assert out.returncode == 0 and out.stdout == out.stderr == ""
    assert called == "cfg=/site/policy.toml args=hook jobcomp\n" and log == ""
    out, called, log = run_hook(tmp_path, "slurmgate-prolog", 3)
    assert out.returncode == 0
    assert called.splitlines()[-1] == "cfg=/site/policy.toml args=hook prolog"
    assert "slurmgate-prolog job=42" in log and "exit=3" in log
    out, _, log = run_hook(tmp_path, "oddly-named", 0)
    assert out.returncode == 0 and "cannot tell" not in log and "name it" in log


def test_hook_wrapper_runs_without_a_log_directory(tmp_path: Path) -> None:
    out, called, _ = run_hook(tmp_path, "slurmgate-epilog", 1, log_dir=False)
    assert out.returncode == 0 and out.stderr == ""
    assert called == "cfg=/site/policy.toml args=hook epilog\n"


def test_hook_wrapper_is_clean_shell() -> None:
    assert subprocess.run(["bash", "-n", str(SLURM / "slurmgate-hook")]).returncode == 0
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(SLURM / "slurmgate-hook")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout
    assert os.access(SLURM / "slurmgate-hook", os.X_OK)


@pytest.mark.skipif(shutil.which("logrotate") is None,
                    reason="needs logrotate (package logrotate; make test installs it)")
def test_logrotate_config_rotates_by_copy_and_truncate(tmp_path: Path) -> None:
    import grp

    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "hooks.log").write_text("line\n" * 100)
    group = grp.getgrgid(os.getgid()).gr_name
    conf = (REPO / "contrib/logrotate/slurmgate").read_text()
    assert "/var/log/slurmgate/*.log" in conf and "su root slurm" in conf
    conf = conf.replace("/var/log/slurmgate", str(logs)).replace("su root slurm",
                                                                 f"su root {group}")
    (tmp_path / "conf").write_text(conf)
    out = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"),
                          str(tmp_path / "conf")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (logs / "hooks.log").read_text() == ""  # truncated in place: open writers keep going
    assert (logs / "hooks.log.1").read_text() == "line\n" * 100  # delaycompress


def test_install_guide_names_every_shipped_file() -> None:
    guide = (REPO / "contrib/INSTALL.md").read_text()
    shipped = [p.relative_to(REPO / "contrib").as_posix()
               for p in sorted((REPO / "contrib").rglob("*"))
               if p.is_file() and p.parts[-2] in ("systemd", "slurm", "logrotate")]
    for rel in shipped:
        stem = rel.rsplit("/", 1)[-1]
        assert rel in guide or stem in guide or stem.split(".")[0] in guide, rel
    assert "## Rollback" in guide
