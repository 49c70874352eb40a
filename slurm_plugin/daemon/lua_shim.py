"""Render job_submit.lua with the socket path, timeout and fail mode filled in."""

from __future__ import annotations

from importlib import resources


def lua_string(text: str) -> str:
    """A Lua string literal for any text: only printable ASCII passes through unescaped."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\' or not 32 <= byte < 127:
            out.append(f"\\{byte:03d}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def render_lua(socket_path: str, timeout_ms: int = 200, fail_mode: str = "open",
               slurm_uid: int = 0) -> str:
    if fail_mode not in ("open", "closed"):
        raise ValueError("fail mode must be 'open' or 'closed'")
    if not 1 <= timeout_ms <= 10_000:
        raise ValueError("timeout must be between 1 and 10000 ms")
    if isinstance(slurm_uid, bool) or not isinstance(slurm_uid, int) \
            or not 0 <= slurm_uid < 0xFFFFFFFE:
        raise ValueError("the SlurmUser uid must be a whole number from 0 to 4294967293")
    template = resources.files("slurm_plugin.daemon").joinpath("lua/job_submit.lua").read_text()
    return (
        template.replace("@SOCKET@", lua_string(socket_path))
        .replace("@TIMEOUT_MS@", str(int(timeout_ms)))
        .replace("@FAIL_MODE@", lua_string(fail_mode))
        .replace("@SLURM_UID@", str(int(slurm_uid)))
    )
