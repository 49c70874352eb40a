"""Short, fixed-width text for table cells: durations, money, GPU counts, bars, sparklines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from rich.text import Text

from policies.cost import format_money

SPARK = "▁▂▃▄▅▆▇█"


def duration(seconds: float | None) -> str:
    """``45s``, ``12m``, ``3h05``, ``2d04h``; ``-`` when unknown."""
    if seconds is None or seconds < 0 or math.isnan(seconds):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def clusters(name: str | None) -> str:
    """Which clusters a view shows, for its header: ``cluster gpu-east``, ``all clusters``."""
    return "all clusters" if name is None else f"cluster {name}"


def money(amount: float | None, currency: str) -> str:
    return "-" if amount is None else format_money(amount, currency)


def gpus(gpu_type: str | None, count: float) -> str:
    """``a100x2``, ``gpu x0.5`` (shards), ``-`` for none."""
    if not count:
        return "-"
    n = f"{count:g}"
    return f"{gpu_type or 'gpu'}x{n}"


def clock(ts: float | None) -> str:
    """UTC wall time of an event: ``2023-11-14 22:13``."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def sparkline(values: Sequence[float | None], width: int = 16) -> str:
    """Utilisation in percent as block characters; missing samples are spaces."""
    if not values:
        return " " * width
    vals = list(values)[-width:]
    out = []
    for v in vals:
        if v is None:
            out.append(" ")
        else:
            i = int(min(100.0, max(0.0, v)) / 100.0 * (len(SPARK) - 1) + 0.5)
            out.append(SPARK[i])
    return "".join(out).rjust(width)


def budget_bar(spent: float, reserved: float, budget: float, soft: float, hard: float,
               width: int = 20) -> Text:
    """Spent (solid), reserved (shaded) and what is left of a budget; coloured by limit."""
    if budget <= 0:
        return Text("no budget".ljust(width), style="dim")
    used = spent + reserved
    style = "red" if used >= hard else "yellow" if used >= soft else "green"
    n_spent = min(width, round(spent / budget * width))
    n_res = min(width - n_spent, round(reserved / budget * width))
    bar = Text()
    bar.append("█" * n_spent, style=style)
    bar.append("▒" * n_res, style=style)
    bar.append("░" * (width - n_spent - n_res), style="dim")
    return bar


def share(fraction: float | None) -> str:
    """A fraction as a whole percentage (``72%``); ``-`` when unknown."""
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def percent(part: float, whole: float) -> str:
    return "-" if whole <= 0 else f"{part / whole * 100:.0f}%"
