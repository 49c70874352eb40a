"""Periods of an export or a statement: a UTC day, a month or a range of days, and the
command-line words that name them (``--date yesterday``, ``--month last``, ``--from/--to``).

Labels name the export folders: a day ``2026-11-25``, a month ``2026-10``, a range
``2026-11-01_2026-11-15`` (first and last day, both included). See FORMAT.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

DAY = 86400
"""Seconds in a UTC day."""


@dataclass(frozen=True)
class Period:
    """[start_ts, end_ts) in UTC; ``label`` names the export folder."""

    kind: str
    label: str
    start_ts: int
    end_ts: int

    @property
    def start_iso(self) -> str:
        return iso_utc(self.start_ts)

    @property
    def end_iso(self) -> str:
        return iso_utc(self.end_ts)

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "label": self.label, "start": self.start_iso,
                "end": self.end_iso}


def _ts(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())


def day_period(d: date) -> Period:
    return Period("day", d.isoformat(), _ts(d), _ts(d + timedelta(days=1)))


def month_period(year: int, month: int) -> Period:
    first = date(year, month, 1)
    nxt = date(year + (month == 12), month % 12 + 1, 1)
    return Period("month", f"{year:04d}-{month:02d}", _ts(first), _ts(nxt))


def range_period(first: date, last: date) -> Period:
    if last < first:
        raise ValueError(f"--to {last} is before --from {first}")
    if first == last:
        return day_period(first)
    return Period("range", f"{first.isoformat()}_{last.isoformat()}", _ts(first),
                  _ts(last + timedelta(days=1)))


def _parse_day(text: str, what: str, today: date) -> date:
    t = text.strip().lower()
    if t == "today":
        return today
    if t == "yesterday":
        return today - timedelta(days=1)
    try:
        return date.fromisoformat(t)
    except ValueError:
        raise ValueError(f"{what} {text!r}: use a UTC day like 2026-11-25, "
                         "'yesterday' or 'today'") from None


def _parse_month(text: str, today: date) -> Period:
    t = text.strip().lower()
    if t in ("this", "current"):
        return month_period(today.year, today.month)
    if t in ("last", "previous"):
        first = today.replace(day=1) - timedelta(days=1)
        return month_period(first.year, first.month)
    parts = t.split("-")
    if len(parts) == 2 and len(parts[0]) == 4 and parts[0].isdigit() and parts[1].isdigit():
        year, month = int(parts[0]), int(parts[1])
        if 1 <= month <= 12 and year >= 1970:
            return month_period(year, month)
    raise ValueError(f"--month {text!r}: use a month like 2026-10, 'last' or 'this'")


def parse_period(*, day: str | None = None, month: str | None = None,
                 first: str | None = None, last: str | None = None,
                 today: date | None = None) -> Period:
    """The period the CLI options name; default yesterday (UTC). Raises ValueError."""
    today = today or datetime.now(UTC).date()
    given = [n for n, v in (("--date", day), ("--month", month),
                            ("--from/--to", first or last)) if v]
    if len(given) > 1:
        raise ValueError(f"give one of --date, --month or --from/--to, not {' and '.join(given)}")
    if month:
        return _parse_month(month, today)
    if first or last:
        if not (first and last):
            raise ValueError("--from and --to go together (both UTC days, both included)")
        return range_period(_parse_day(first, "--from", today), _parse_day(last, "--to", today))
    return day_period(_parse_day(day or "yesterday", "--date", today))


def iso_utc(ts: float) -> str:
    """Epoch seconds as ISO 8601 UTC to the second: ``2026-11-25T13:05:00Z``."""
    return datetime.fromtimestamp(math.floor(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
