"""`slurmgate doctor` on the running dev cluster: every check passes."""

from __future__ import annotations

import json
from typing import Any

import pytest


@pytest.mark.slurm
def test_doctor_passes_on_the_running_dev_cluster(cluster: Any,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    from slurm_plugin.cli import main

    rc = main(["--config", str(cluster.policy_path), "doctor"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "FAIL" not in out
    for name in ("policy", "socket", "daemon", "database", "spool", "slurm", "job_submit",
                 "hooks"):
        assert any(line.split()[1:2] == [name] for line in out.splitlines()), (name, out)
    rc = main(["--config", str(cluster.policy_path), "doctor", "--node", "node2", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["ok"] is True
    gpus = next(c for c in data["checks"] if c["check"] == "gpus")
    assert gpus["status"] == "OK" and "4 x h100" in gpus["detail"]


# -- a temporary installation ----------------------------------------------------------------
