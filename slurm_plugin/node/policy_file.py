"""The policy file as the node side reads it: plain TOML, no pydantic (hooks start fast).

The full model and its checks are policies/config.py; node code reads only the few settings
it needs, with the same defaults (policies/defaults.py).
"""

from __future__ import annotations

from typing import Any


class PolicyFileError(Exception):
    """The policy file is missing, unreadable or not TOML. The message names the file."""


def read_policy_file(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise PolicyFileError(f"{path}: cannot read policy file: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyFileError(f"{path}: not valid TOML: {exc}") from exc
