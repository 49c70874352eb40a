"""The quotas view's burn-down chart and its words, drawn as text from a ``Burndown``.

One column per UTC day of the period (several days a column when the period is wider than
the space): the cumulative net spend up to that day, solid for the days so far, dim for the
projection; the soft limit (``╌``), the budget and the hard limit (``─``) are lines across
the chart, labelled on the right. Below it a row of bars shows the spend of each day, and
the axis names the days (the month's day for a month, the month for longer periods).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from rich.text import Text

from policies.burndown import DAY, Burndown, Crossing
from tui import format as fmt

BLOCKS = " ▁▂▃▄▅▆▇█"
SHORT = {"soft limit": "soft", "budget": "budget", "hard limit": "hard",
         "budget = hard limit": "budget=hard"}
NOT_BEFORE_END = "not before the period ends"


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%m-%d %H:%M")


def crossing_text(c: Crossing) -> str:
    """``budget reached on 2023-11-09``, ``budget ~11-24 09:00 UTC`` or ``budget: not before
    the period ends``."""
    if c.reached and c.ts is not None:
        return f"{c.name} reached on {_date(c.ts)}"
    if c.ts is None:
        return f"{c.name}: {NOT_BEFORE_END}"
    return f"{c.name} ~{_when(c.ts)} UTC"


def runs_out_cell(b: Burndown | None) -> Text:
    """The table's short form of the budget's exhaustion date."""
    c = b.exhaustion if b else None
    if c is None:
        return Text("-", style="dim")
    if c.ts is None:
        return Text("not before end", style="dim")
    day = datetime.fromtimestamp(c.ts, UTC).strftime("%m-%d")
    return Text(f"since {day}", style="bold red") if c.reached else Text(day, style="yellow")


def summary(b: Burndown, currency: str) -> Text:
    """Two lines under the chart: where the team stands, and when each level is reached
    (the levels that are not reached share one "not before the period ends")."""
    m = fmt.money
    of = f" of {m(b.budget, currency)} ({fmt.percent(b.spent, b.budget)})" if b.budget else ""
    end = datetime.fromtimestamp(b.period_end, UTC).strftime("%m-%d")
    out = Text(f"spent {m(b.spent, currency)}{of} | {m(b.rate, currency)}/day | by {end}: "
               f"{m(b.projected, currency)}\n")
    if not b.crossings:
        out.append("no budget: nothing runs out", style="dim")
        return out
    parts: list[tuple[str, str]] = []
    for c in b.crossings:
        if c.reached and c.ts is not None:
            parts.append((f"{c.name} reached on {_date(c.ts)}", "bold red"))
        elif c.ts is not None:
            parts.append((f"{c.name} ~{_when(c.ts)}", "yellow"))
    if any(c.ts is not None and not c.reached for c in b.crossings):
        parts[-1] = (parts[-1][0] + " UTC", parts[-1][1])
    later = [c.name for c in b.crossings if c.ts is None]
    if later:
        parts.append((f"{', '.join(later)}: {NOT_BEFORE_END}", "green"))
    for i, (text, style) in enumerate(parts):
        if i:
            out.append(" | ", style="dim")
        out.append(text, style=style)
    return out


def _level_style(value: float, b: Burndown) -> str:
    for c in reversed(b.crossings):  # highest first
        if value >= c.amount - 1e-9:
            return "red" if "hard" in c.name else "yellow"
    return "green"


def chart(b: Burndown, width: int, height: int = 6) -> Text:
    """``height`` rows of cumulative spend, a row of daily spend and the day axis (the
    levels' amounts are in the table and the summary)."""
    height = max(2, height)
    days = max(1, round((b.period_end - b.period_start) / DAY))
    first_day = math.floor(b.period_start / DAY)
    labels = {c.name: f" {SHORT.get(c.name, c.name)}" for c in b.crossings}
    right = max([len(v) for v in labels.values()] + [len(" per day")])
    plot_w = max(1, width - 1 - right)
    per = max(1, math.ceil(days / plot_w))  # days a column
    n_cols = math.ceil(days / per)
    cw = max(1, min(3, plot_w // n_cols))  # characters a column

    spend = {int(d.start_ts // DAY): d for d in b.days}
    today = math.ceil(b.now / DAY) - 1
    cols: list[tuple[float, float, bool]] = []  # (cumulative, daily, projected)
    for i in range(n_cols):
        lo, hi = first_day + i * per, min(first_day + days, first_day + (i + 1) * per)
        seen = [spend[d] for d in range(lo, hi) if d in spend]
        if seen:  # days so far (the column holding today: up to now)
            cols.append((seen[-1].cumulative, sum(d.spend for d in seen), False))
        else:
            cols.append((b.projected_at(hi * DAY), 0.0, True))

    top = max([b.spent, b.projected, *(c.amount for c in b.crossings),
               *(c[0] for c in cols)]) or 1.0
    eighths = height * 8
    fill = [max(0, min(eighths, round(v / top * eighths))) for v, _, _ in cols]
    level_rows: dict[int, list[Crossing]] = {}
    for c in b.crossings:
        row = min(height - 1, max(0, math.ceil(c.amount / top * eighths / 8) - 1))
        level_rows.setdefault(row, []).append(c)

    out = Text()
    for row in reversed(range(height)):
        out.append("│", style="dim")
        here = level_rows.get(row, [])
        line = "╌" if here and all("soft" in c.name for c in here) else "─"
        for (value, _, projected), f in zip(cols, fill, strict=True):
            part = f - row * 8
            if part <= 0 and here:
                out.append(line * cw, style=_level_style(here[-1].amount, b) + " dim")
            elif part <= 0:
                out.append(" " * cw)
            else:
                style = "bright_black" if projected else _level_style(value, b)
                out.append(BLOCKS[min(8, part)] * cw, style=style)
        out.append(" " * (plot_w - n_cols * cw))
        label = " " + "/".join(labels[c.name].strip() for c in here) if here else ""
        out.append(label.ljust(right), style=_level_style(here[-1].amount, b) if here else "")
        out.append("\n")

    daily_top = max((d for _, d, p in cols if not p), default=0.0)
    out.append("│", style="dim")
    for _, daily, projected in cols:
        part = (0 if projected or daily_top <= 0 or daily <= 0
                else max(1, round(daily / daily_top * 8)))
        out.append((BLOCKS[part] if part else " ") * cw, style="cyan")
    out.append(" " * (plot_w - n_cols * cw))
    out.append(" per day".ljust(right), style="cyan")
    out.append("\n")

    axis = ["─"] * (n_cols * cw)
    long_period = days > 31
    last_end = -1
    for i in range(n_cols):
        in_col = [datetime.fromtimestamp((first_day + i * per + k) * DAY, UTC)
                  for k in range(per)]
        if long_period:
            tick = next((d.strftime("%b") for d in in_col if d.day == 1), "")
        else:
            tick = str(in_col[0].day) if in_col[0].day % 7 == 1 else ""
        pos = i * cw
        if tick and pos > last_end and pos + len(tick) <= len(axis):
            axis[pos:pos + len(tick)] = tick
            last_end = pos + len(tick)
    now_col = min(n_cols - 1, max(0, (today - first_day) // per))
    out.append("└", style="dim")
    for i, ch in enumerate(axis):
        out.append(ch, style="bold" if i // cw == now_col else "dim")
    out.append(" " * (plot_w - n_cols * cw))
    out.append(" UTC days".ljust(right), style="dim")
    return out
