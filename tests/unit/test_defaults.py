"""Defaults have one home (policies/defaults.py): the hooks' light settings reader and the policy
model agree on every value they share, and the policy path is chosen the same way everywhere."""

from __future__ import annotations

from pathlib import Path

from policies import defaults
from policies.config import load_policy
from slurm_plugin.node.hooks import load_settings


def test_hook_settings_and_policy_model_share_their_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "policy.toml"
    empty.write_text("")
    policy = load_policy(empty)
    hook = load_settings(str(empty))
    assert hook.spool_dir == policy.daemon.spool_dir == defaults.SPOOL_DIR
    assert hook.socket == policy.daemon.socket == defaults.SOCKET
    assert hook.cluster == policy.daemon.cluster == defaults.CLUSTER
    assert hook.gpu_numbering == policy.nvml.gpu_numbering == defaults.GPU_NUMBERING
    assert policy.nvml.backend == defaults.NVML_BACKEND
    assert policy.daemon.database == defaults.DATABASE
    assert policy.export.out_dir == defaults.EXPORT_DIR


def test_hook_settings_follow_the_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[daemon]\nspool_dir = "/srv/spool"\ncluster = "c2"\n'
                    '[nvml]\nbackend = "fake"\ngpu_numbering = "pci"\n')
    policy, hook = load_policy(path), load_settings(str(path))
    assert (hook.spool_dir, hook.cluster, hook.gpu_numbering) == ("/srv/spool", "c2", "pci")
    assert (policy.daemon.spool_dir, policy.daemon.cluster) == ("/srv/spool", "c2")


def test_policy_path_prefers_the_flag_then_the_environment() -> None:
    assert defaults.policy_path("/x.toml", env={"SLURMGATE_CONFIG": "/y.toml"}) == "/x.toml"
    assert defaults.policy_path(None, env={"SLURMGATE_CONFIG": "/y.toml"}) == "/y.toml"
    assert defaults.policy_path(None, env={}) == defaults.POLICY_PATH == \
        "/etc/slurmgate/policy.toml"
