"""The one place that names Slurm backends: ``open_client`` picks the one the policy asks for.

The interface (``client.SlurmClient``) knows no backend; backends import the interface, and only
this module imports backends, lazily, so ``pyslurm`` is never imported where it is not chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slurm_plugin.slurm.client import InvalidSlurmValue, SlurmClient

if TYPE_CHECKING:
    from policies.config import Policy


def open_client(policy: Policy, **options: Any) -> SlurmClient:
    """The backend the policy names in ``daemon.slurm_backend`` ("cli" or "pyslurm")."""
    backend = policy.daemon.slurm_backend
    if backend == "cli":
        from slurm_plugin.slurm.cli_backend import CliSlurm

        return CliSlurm(**options)
    if backend == "pyslurm":
        from slurm_plugin.slurm.pyslurm_backend import PySlurm

        return PySlurm(**options)
    raise InvalidSlurmValue(
        f"daemon.slurm_backend: unknown backend {backend!r}; use \"cli\" or \"pyslurm\"")

