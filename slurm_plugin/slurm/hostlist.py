"""Slurm hostlists: ``node[1-3,7],gpu07`` <-> node names."""

from __future__ import annotations

import re

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand(hostlist: str | None) -> list[str]:
    """``node[1-2],gpu07`` -> ``["node1", "node2", "gpu07"]`` (zero padding kept)."""
    if not hostlist or hostlist in ("(null)", "None"):
        return []
    names: list[str] = []
    for part in _split_top(hostlist):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
        if not m:
            names.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            rm = _RANGE_RE.match(r.strip())
            if not rm:
                raise ValueError(f"not a hostlist range: {r!r} in {hostlist!r}")
            lo, hi = rm.group(1), rm.group(2) or rm.group(1)
            width = len(lo) if lo.startswith("0") else 0
            for i in range(int(lo), int(hi) + 1):
                names.append(f"{prefix}{i:0{width}d}{suffix}")
    return names


def compress(names: list[str]) -> str:
    """Node names back to a comma list (Slurm accepts plain lists everywhere)."""
    return ",".join(dict.fromkeys(names))
