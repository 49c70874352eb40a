"""Defaults with one home each: where slurmgate's files live, and which Slurm states end a run.

Stdlib only and import-free, so compute-node hooks (which must not load pydantic) share these
values with the policy model in config.py instead of keeping their own copies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

POLICY_PATH = "/etc/slurmgate/policy.toml"
"""The policy file every command reads unless ``--config`` or ``$SLURMGATE_CONFIG`` says else."""

POLICY_ENV = "SLURMGATE_CONFIG"

SOCKET = "/run/slurmgate/slurmgate.sock"
DATABASE = "/var/lib/slurmgate/slurmgate.db"
SPOOL_DIR = "/var/spool/slurmgate"
EXPORT_DIR = "/var/lib/slurmgate/exports"
NODE_STATE_DIR = "/var/lib/slurmgate/node"
CLUSTER = "default"
NVML_BACKEND: Literal["real", "fake"] = "real"
GPU_NUMBERING: Literal["minor", "pci"] = "minor"

FINISHED_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})
"""Slurm job states after which a run has ended (its completion record is due)."""


def policy_path(explicit: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The policy file to read: ``explicit`` (``--config``), else ``$SLURMGATE_CONFIG``, else
    the default path."""
    environ = os.environ if env is None else env
    return explicit or environ.get(POLICY_ENV) or POLICY_PATH
