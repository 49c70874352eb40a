"""Exact money for chargeback: whole cents (and millionths) and the pro rata split to the cent.

Stored amounts are floats kept to 1e-6 (see policies.cost). Everything finance sees is
computed from them in integers: a run's amount in cents is its stored amount rounded half
up, and the part of a run inside a period is

    piece = R(X * f(hi)) - R(X * f(lo))

where X is the run's amount in cents, f(t) the share of its wall time before t and R rounds
half up. Over adjacent periods the pieces telescope to X, so daily exports add up to the
month's export, and statements to exports, to the cent (db/chargeback/FORMAT.md).

Pure arithmetic and text: no I/O, nothing of ours imported.
"""

from __future__ import annotations

import math

CENT_SUFFIXES = [f".{i:02d}" for i in range(100)]
"""``CENT_SUFFIXES[n]`` is the text of n cents (``".07"``), for formatters that inline money()."""


def to_cents(value: float | None) -> int:
    """A stored amount (kept to 1e-6) in whole cents, half up."""
    if not value:
        return 0
    return (round(value * 1e6) + 5000) // 10000  # a float literal: text fails at once


def to_micro(value: float | None, unit: float) -> int:
    """``value / unit`` in millionths, half up (gpu_seconds/3600 -> micro GPU-hours)."""
    if not value:
        return 0
    return math.floor(value * 1e6 / unit + 0.5)


def split(amount: int, f_lo: float, f_hi: float) -> int:
    """The share of ``amount`` between wall-time fractions f_lo and f_hi (see module doc)."""
    return math.floor(amount * f_hi + 0.5) - math.floor(amount * f_lo + 0.5)


def fractions(start: float, end: float, lo: float, hi: float) -> tuple[float, float]:
    """(f(lo'), f(hi')) of a run [start, end] clipped to [lo, hi); (0, 1) for a zero-length
    run. f(t) = (t - start) / (end - start) is computed the same way for every period, so
    the pieces of adjacent periods meet exactly."""
    if end <= start:
        return 0.0, 1.0
    lo_c = lo if lo > start else start
    hi_c = hi if hi < end else end
    f_lo = 0.0 if lo_c == start else (lo_c - start) / (end - start)
    f_hi = 1.0 if hi_c == end else (hi_c - start) / (end - start)
    return f_lo, f_hi


def money(cents: int) -> str:
    """Whole cents as a decimal string with two places: 123456 -> "1234.56", -5 -> "-0.05"."""
    if cents >= 0:
        return str(cents // 100) + CENT_SUFFIXES[cents % 100]
    return "-" + money(-cents)


def micro(units: int) -> str:
    """Millionths as a decimal string with six places: 1500000 -> "1.500000"."""
    if units >= 0:
        return f"{units // 1_000_000}.{units % 1_000_000:06d}"
    return "-" + micro(-units)
