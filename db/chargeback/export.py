"""Chargeback exports: the runs of a period and their sums, as files finance can load.

``slurmgate export`` writes one folder per period under the export directory::

    <out>/<label>/runs.csv  runs.jsonl  [runs.parquet]
                  by_team.*  by_project.*  by_user.*  by_cost_center.*  by_gpu_type.*
                  schema.json  manifest.json

Labels: a UTC day ``2026-11-25``, a month ``2026-10``, a range of days
``2026-11-01_2026-11-15`` (first and last day, both included).

What is exported: every SETTLED run (priced by the daemon) whose wall time overlaps the
period. A run that crosses midnight or a month boundary is split pro rata by wall time: the
part inside the period carries that share of the run's cost (each component), idle cost,
credit, GPU-hours, energy and seconds. A run of zero length belongs to the period holding
its end. Amounts are whole cents per row (GPU-hours and kWh in millionths) and are split so
that the pieces of a run add up to the whole run exactly, however the periods are cut:
``piece = R(X * f(hi)) - R(X * f(lo))`` where X is the run's amount in cents, f(t) the share
of its wall time before t and R rounds half up; over adjacent periods the sum telescopes to X.
So the daily exports of a month add up to that month's export to the cent, and every total
(aggregated files, manifest) is exactly the sum of the rows it covers. A run's amount in cents
is its stored amount (kept to 1e-6) rounded half up.

Runs not settled yet (running, or their completion record has not arrived) are not exported;
the manifest counts them (``unsettled_runs``). Re-export when they have settled: the nightly
timer re-exports the last days (``--catch-up``); files are replaced, never duplicated.

Files: CSV (RFC 4180, UTF-8, header row, ``\\n`` line ends, null is an empty field) and JSON
Lines (one object per line, keys in column order) always; Parquet when pyarrow imports
(money as decimal128(18, 2), timestamps as timestamp[ms, UTC]: Parquet has no second unit).
In CSV and JSON, money and other decimals are decimal STRINGS with a fixed number of places
(``"12.30"``): exact, never a float.
Timestamps are ISO 8601 UTC to the second (``2026-11-25T13:05:00Z``). The JSON Schema of every
JSON Lines file is ``db/chargeback/export_schema.json``, copied into each export as ``schema.json``.
Columns are stable: new ones are only ever appended; anything else bumps ``schema_version``.

runs.csv / runs.jsonl, one row per run and period (ordered by end time, then run key):

| column | type | meaning |
|---|---|---|
| period | text | period label |
| cluster | text | cluster name (a run is keyed cluster, job_id, restart_count) |
| job_id | int | Slurm job id |
| restart_count | int | Slurm restart count of this run (0, then +1 per requeue) |
| array_job_id | int? | array master job id |
| array_task_id | int? | array task id |
| user | text? | user name |
| account | text? | Slurm account |
| team | text? | team charged |
| project | text? | project tag |
| cost_center | text? | cost centre (tag, else the team's default) |
| partition | text? | partition |
| state | text? | final Slurm state (COMPLETED, NODE_FAIL, ...) |
| gpu_type | text? | priced GPU type ("a100+h100" for a mixed request) |
| gpus | decimal(3)? | GPUs allocated |
| cpus | int? | CPUs allocated |
| mem_mb | int? | memory allocated, MB |
| node_count | int? | nodes |
| nodes | text? | Slurm hostlist |
| start_time | timestamp | run start (its end when the start is unknown) |
| end_time | timestamp | run end |
| seconds | int | wall seconds of the run inside the period |
| share | decimal(6) | fraction of the run's wall time inside the period |
| gpu_hours | decimal(6) | GPU-hours inside the period |
| energy_kwh | decimal(6) | measured GPU energy inside the period, kWh |
| util_mean | decimal(1)? | mean GPU utilisation of the run, percent |
| cost_gpu | money | GPU part of the cost |
| cost_cpu | money | CPU part |
| cost_mem | money | memory part |
| cost_energy | money | energy part |
| cost | money | cost (rounded on its own: the four parts may differ from it by a cent) |
| idle_cost | money | GPU cost of allocated GPU time the GPUs spent idle |
| credit | money | credit (node failure, preemption, admin) |
| net | money | cost - credit: what is charged |
| credit_reason | text? | why the run was credited |

by_team, by_project (team, project), by_user (team, user), by_cost_center, by_gpu_type:
period, the key column(s), then runs (run pieces), gpu_hours, energy_kwh, cost_gpu, cost_cpu,
cost_mem, cost_energy, cost, idle_cost, credit, net, mode. Rows are sorted by key; a run with
no team/project/... is under an empty key (null in JSON).

manifest.json: schema_version, generator, period {kind, label, start, end}, mode (the
policy's ``budgets.mode`` when the export ran: "chargeback" or "showback"), currency, clusters,
rows per file, totals, unsettled_runs, data_as_of (latest change among the exported runs)
and per file its rows, bytes and sha256. ``generated_at`` is the period's END, not the wall
clock: an export of unchanged data is byte-identical, manifest included (the wall-clock time
of a run is the folder's mtime and the command's log line).

Re-running a period replaces its folder atomically: everything is written into a temporary
folder beside it, fsynced, and swapped in with one rename (renameat2 RENAME_EXCHANGE where the
file system has it); readers see the old folder or the new one, never a mix. A lock file
keeps two exports of the same directory from interleaving.

Speed: each row is formatted once in Python; large periods are cut into slices by end time
and exported by worker processes (``jobs``), each in its own read transaction. Every slice
also returns a fingerprint of what it read (count, sums of cost and credit, newest
``updated_at``); the parent compares their sum with one fingerprint of the whole period taken
after the workers finished, and exports again if a run changed meanwhile, so no run is
counted twice or missed. Memory does not grow with the number of runs (rows stream from a
cursor to the files; only the per-group sums are kept).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from slurm_plugin.fsutil import fsync_dir, locked, swap_in_dir

SCHEMA_VERSION = 1
DAY = 86400
CHUNK_ROWS = 2000
PARALLEL_MIN_RUNS = 50_000
"""Fewer runs than this are exported in-process (a worker pool costs more than it saves)."""
SLICES_PER_JOB = 6
MAX_WARNINGS = 50


class ExportError(RuntimeError):
    """An export cannot be made as asked; the message says why and what to do."""


# -- periods ---------------------------------------------------------------------------------


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


# -- columns ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    kind: str
    """text, int, money (2 places), dec1/dec3/dec6 (decimal strings), timestamp."""
    nullable: bool = False


def _cols(spec: str) -> tuple[Column, ...]:
    out = []
    for item in spec.split():
        name, kind = item.split(":")
        out.append(Column(name, kind.rstrip("?"), kind.endswith("?")))
    return tuple(out)


RUN_COLUMNS = _cols(
    "period:text cluster:text job_id:int restart_count:int array_job_id:int? "
    "array_task_id:int? user:text? account:text? team:text? project:text? cost_center:text? "
    "partition:text? state:text? gpu_type:text? gpus:dec3? cpus:int? mem_mb:int? "
    "node_count:int? nodes:text? start_time:timestamp end_time:timestamp seconds:int "
    "share:dec6 gpu_hours:dec6 energy_kwh:dec6 util_mean:dec1? cost_gpu:money cost_cpu:money "
    "cost_mem:money cost_energy:money cost:money idle_cost:money credit:money net:money "
    "credit_reason:text?"
)
MEASURE_COLUMNS = _cols(
    "runs:int gpu_hours:dec6 energy_kwh:dec6 cost_gpu:money cost_cpu:money cost_mem:money "
    "cost_energy:money cost:money idle_cost:money credit:money net:money"
)
# Aggregated files: name -> key columns. The group key of the accumulation is GROUP_KEY.
AGGREGATES: dict[str, tuple[str, ...]] = {
    "by_team": ("team",),
    "by_project": ("team", "project"),
    "by_user": ("team", "user"),
    "by_cost_center": ("cost_center",),
    "by_gpu_type": ("gpu_type",),
}
GROUP_KEY = ("team", "project", "user", "cost_center", "gpu_type")


def aggregate_columns(name: str) -> tuple[Column, ...]:
    keys = tuple(Column(k, "text", True) for k in AGGREGATES[name])
    return (Column("period", "text"), *keys, *MEASURE_COLUMNS, Column("mode", "text"))


_PATTERNS = {
    "money": r"^-?[0-9]+\.[0-9]{2}$",
    "dec1": r"^-?[0-9]+\.[0-9]$",
    "dec3": r"^-?[0-9]+\.[0-9]{3}$",
    "dec6": r"^-?[0-9]+\.[0-9]{6}$",
    "timestamp": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$",
}


def _column_schema(col: Column) -> dict[str, Any]:
    if col.kind == "int":
        schema: dict[str, Any] = {"type": ["integer", "null"] if col.nullable else "integer"}
    else:
        schema = {"type": ["string", "null"] if col.nullable else "string"}
        if col.kind in _PATTERNS:
            schema["pattern"] = _PATTERNS[col.kind]
        if col.kind == "timestamp":
            schema["format"] = "date-time"
    if col.name == "mode":
        schema["enum"] = ["chargeback", "showback"]
    return schema


def _object_schema(title: str, columns: Sequence[Column]) -> dict[str, Any]:
    return {
        "title": title,
        "type": "object",
        "properties": {c.name: _column_schema(c) for c in columns},
        "required": [c.name for c in columns],
        "additionalProperties": False,
    }


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of every JSON Lines file; one line validates against
    ``$defs/<file stem>`` (``runs``, ``by_team``, ...). db/chargeback/export_schema.json is this."""
    defs = {"runs": _object_schema("one run (or its share) in the period", RUN_COLUMNS)}
    for name in AGGREGATES:
        defs[name] = _object_schema(f"sums {name.replace('_', ' ')}", aggregate_columns(name))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"slurmgate-export-v{SCHEMA_VERSION}",
        "title": f"slurmgate chargeback export, schema version {SCHEMA_VERSION}",
        "description": "Each line of <file>.jsonl validates against $defs/<file>. Money and "
                       "decimals are strings with a fixed number of places; timestamps are "
                       "ISO 8601 UTC.",
        "$defs": defs,
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


# -- exact amounts ---------------------------------------------------------------------------

_CENTS = [f".{i:02d}" for i in range(100)]


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
    if cents >= 0:
        return str(cents // 100) + _CENTS[cents % 100]
    return "-" + money(-cents)


def micro(units: int) -> str:
    if units >= 0:
        return f"{units // 1_000_000}.{units % 1_000_000:06d}"
    return "-" + micro(-units)


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(math.floor(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- SQL ---------------------------------------------------------------------------------------

_SELECT = (
    'SELECT cluster, job_id, restart_count, array_job_id, array_task_id, "user", account, '
    'team, project, cost_center, "partition", state, gpu_type, gpus, cpus, mem_mb, '
    "node_count, nodes, start_ts, end_ts, util_mean, gpu_seconds, energy_j, cost_gpu, "
    "cost_cpu, cost_mem, cost_energy, cost, cost_idle, credit, credit_reason FROM runs "
)
# Settled runs whose wall time overlaps [:a, :b); a zero-length run counts at its end.
_SCOPE = (
    "cost IS NOT NULL AND end_ts >= :a AND min(coalesce(start_ts, end_ts), end_ts) < :b "
    "AND (end_ts > :a OR coalesce(start_ts, end_ts) >= end_ts)"
)
_SLICE = " AND end_ts >= :lo AND end_ts < :hi"
_ORDER = " ORDER BY end_ts, cluster, job_id, restart_count"
_FINGERPRINT = (
    "SELECT count(*), total(round(cost * 1000000)), total(round(credit * 1000000)), "
    "max(updated_at) FROM runs WHERE "
)
_UNSETTLED = (
    "SELECT (SELECT count(*) FROM runs WHERE end_ts >= :a AND cost IS NULL "
    "AND coalesce(start_ts, end_ts) < :b) + (SELECT count(*) FROM runs WHERE end_ts IS NULL "
    "AND cost IS NULL AND coalesce(start_ts, :a) < :b)"
)
_NO_END = 1e18


def connect_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A reader of the store that checks the schema (db.store.open_store's rules)."""
    from db.store import StoreError, open_store

    try:
        store = open_store(path, readonly=True)
    except StoreError as exc:
        raise ExportError(str(exc)) from exc
    return store.conn


# -- one slice -------------------------------------------------------------------------------


@dataclass
class SliceResult:
    index: int
    rows: int = 0
    groups: dict[tuple[Any, ...], list[int]] = field(default_factory=dict)
    fingerprint: tuple[Any, ...] = ()
    clusters: set[str] = field(default_factory=set)
    last_change: float | None = None
    warnings: list[str] = field(default_factory=list)
    files: dict[str, FileInfo] = field(default_factory=dict)
    """Set when the slice wrote the final runs files itself."""


def _csv_text(value: str | None) -> str:
    if value is None:
        return ""
    if "," in value or '"' in value or "\n" in value or "\r" in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def _json_text(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


def _finite(value: Any) -> float | None:
    """A number the arithmetic can use, else None (bad data is exported as 0 and reported)."""
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class RowFormatter:
    """Turns run rows (the _SELECT columns) into CSV and JSON lines plus group sums.

    Hot path, once per run: text columns that repeat (user, team, ...) are quoted once and
    cached by value tuple; amounts are integers (cents, millionths, seconds), formatted once
    and shared by both %-templates; group sums are taken per batch of rows, in C (``zip`` and
    ``sum``), not row by row. A row with anything unusual (a negative amount, a value of
    the wrong type) takes the slow path, which prints the same thing.
    """

    _DIM_NAMES = ("user", "account", "team", "project", "cost_center", "partition", "state",
                  "gpu_type")
    _MAX_CACHE = 200_000
    # %-templates: the money columns take (units, cents) pairs, gpu_hours/energy_kwh
    # (units, millionths); see _one_slow for the same values through money()/micro().
    _CSV = ",".join(["%s"] * 21) + "\n"
    _JSON = (
        '{"period":%s,"cluster":%s,"job_id":%s,"restart_count":%s,"array_job_id":%s,'
        '"array_task_id":%s,%s,%s,'
        '"start_time":"%s","end_time":"%s","seconds":%s,"share":"%s","gpu_hours":"%s",'
        '"energy_kwh":"%s","util_mean":%s,"cost_gpu":"%s","cost_cpu":"%s","cost_mem":"%s",'
        '"cost_energy":"%s","cost":"%s","idle_cost":"%s","credit":"%s","net":"%s",'
        '"credit_reason":%s}\n'
    )

    def __init__(self, period: Period) -> None:
        self.period = period
        self.a = float(period.start_ts)
        self.b = float(period.end_ts)
        self.label_csv = _csv_text(period.label)
        self.label_json = _json_text(period.label)
        self.groups: dict[tuple[Any, ...], list[int]] = {}
        self.clusters: dict[str, tuple[str, str]] = {}
        self.dims: dict[tuple[Any, ...], tuple[str, str, tuple[Any, ...]]] = {}
        self.reasons: dict[str | None, tuple[str, str]] = {}
        self.hours: dict[int, str] = {}
        self.allocs: dict[tuple[Any, ...], tuple[str, str]] = {}
        self.warnings: list[str] = []
        self.rows = 0

    # -- caches ------------------------------------------------------------------------------

    def _hour(self, h: int) -> str:
        prefix = datetime.fromtimestamp(h * 3600, UTC).strftime("%Y-%m-%dT%H:")
        if len(self.hours) >= self._MAX_CACHE:
            self.hours.clear()
        self.hours[h] = prefix
        return prefix

    def _dims(self, key: tuple[Any, ...]) -> tuple[str, str, tuple[Any, ...]]:
        if len(self.dims) >= self._MAX_CACHE:
            self.dims.clear()
        csv_part = ",".join(_csv_text(v) for v in key)
        json_part = ",".join(f'"{n}":{_json_text(v)}' for n, v in zip(self._DIM_NAMES, key,
                                                                     strict=True))
        user, _, team, project, cost_center, _, _, gpu_type = key
        entry = self.dims[key] = (csv_part, json_part, (team, project, user, cost_center,
                                                        gpu_type))
        return entry

    def _alloc(self, key: tuple[Any, ...]) -> tuple[str, str]:
        """gpus, cpus, mem_mb, node_count, nodes as CSV and JSON fragments."""
        gpus, cpus, mem_mb, node_count, nodes = key
        gp = None if gpus is None else f"{gpus:.3f}"
        cpu = None if cpus is None else int(cpus)
        mem = None if mem_mb is None else int(mem_mb)
        csv_part = ",".join(["" if gp is None else gp, "" if cpu is None else str(cpu),
                             "" if mem is None else str(mem),
                             "" if node_count is None else str(int(node_count)),
                             _csv_text(nodes)])
        json_part = (f'"gpus":{_json_text(gp)},"cpus":{"null" if cpu is None else cpu},'
                     f'"mem_mb":{"null" if mem is None else mem},'
                     f'"node_count":{"null" if node_count is None else int(node_count)},'
                     f'"nodes":{_json_text(nodes)}')
        if len(self.allocs) >= self._MAX_CACHE:
            self.allocs.clear()
        entry = self.allocs[key] = (csv_part, json_part)
        return entry

    def _cluster(self, name: str) -> tuple[str, str]:
        entry = self.clusters[name] = (_csv_text(name), _json_text(name))
        return entry

    def _reason(self, reason: str | None) -> tuple[str, str]:
        if len(self.reasons) >= self._MAX_CACHE:
            self.reasons.clear()
        entry = self.reasons[reason] = (_csv_text(reason), _json_text(reason))
        return entry

    def _warn(self, row: Sequence[Any], what: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"run {row[0]}/{row[1]}/{row[2]}: {what}")

    # -- rows --------------------------------------------------------------------------------

    def format(self, rows: Sequence[Sequence[Any]]) -> tuple[str, str]:
        """CSV and JSON Lines text of ``rows``; group sums accumulate in ``self.groups``."""
        out_csv: list[str] = []
        out_json: list[str] = []
        batch: dict[tuple[Any, ...], list[tuple[int, ...]]] = {}
        a, b = self.a, self.b
        dims_get, clusters_get, reasons_get = self.dims.get, self.clusters.get, self.reasons.get
        hours_get = self.hours.get
        allocs_get = self.allocs.get
        label_csv, label_json = self.label_csv, self.label_json
        tpl_csv, tpl_json = self._CSV, self._JSON
        floor = math.floor
        cents = _CENTS
        for row in rows:
            try:
                (cluster, job_id, restart, array_job, array_task, user, account, team,
                 project, cost_center, partition, state, gpu_type, gpus, cpus, mem_mb,
                 node_count, nodes, start, end, util, gpu_seconds, energy_j, c_gpu, c_cpu,
                 c_mem, c_energy, cost, c_idle, credit, reason) = row
                key = (user, account, team, project, cost_center, partition, state, gpu_type)
                dims = dims_get(key) or self._dims(key)
                if start is None or start > end:
                    start = end
                ks = [(round(x * 1e6) + 5000) // 10000 if x else 0 for x in
                      (c_gpu, c_cpu, c_mem, c_energy, cost, c_idle, credit)]
                ks.append(floor(gpu_seconds * 1e6 / 3600.0 + 0.5) if gpu_seconds else 0)
                ks.append(floor(energy_j * 1e6 / 3_600_000.0 + 0.5) if energy_j else 0)
                ks.append(floor(end - start + 0.5))
                if start >= a and end <= b or end <= start:
                    share = "1.000000"
                else:
                    f_lo, f_hi = fractions(start, end, a, b)
                    ks = [split(k, f_lo, f_hi) for k in ks]
                    share = f"{f_hi - f_lo:.6f}"
                ks.append(ks[4] - ks[6])
                if min(ks) < 0:
                    raise _SlowPath
                g, cp, me, en, co, idle, cr, gh, kwh, secs, net = ks
                cl = clusters_get(cluster) or self._cluster(cluster)
                rs = reasons_get(reason) or self._reason(reason)
                s0 = floor(start)
                s1 = floor(end)
                st = (hours_get(s0 // 3600) or self._hour(s0 // 3600)) + _MMSS[s0 % 3600]
                et = (hours_get(s1 // 3600) or self._hour(s1 // 3600)) + _MMSS[s1 % 3600]
                alloc_key = (gpus, cpus, mem_mb, node_count, nodes)
                alloc = allocs_get(alloc_key) or self._alloc(alloc_key)
                ut = "" if util is None else f"{util:.1f}"
                aj = "" if array_job is None else array_job
                at = "" if array_task is None else array_task
                mg = str(g // 100) + cents[g % 100]
                mc = str(cp // 100) + cents[cp % 100]
                mm = str(me // 100) + cents[me % 100]
                mn = str(en // 100) + cents[en % 100]
                mco = str(co // 100) + cents[co % 100]
                mi = str(idle // 100) + cents[idle % 100]
                mcr = str(cr // 100) + cents[cr % 100]
                mnet = str(net // 100) + cents[net % 100]
                ghs = f"{gh // 1_000_000}.{gh % 1_000_000:06d}"
                kws = f"{kwh // 1_000_000}.{kwh % 1_000_000:06d}"
                line_csv = tpl_csv % (
                    label_csv, cl[0], job_id, restart, aj, at, dims[0], alloc[0], st, et,
                    secs, share, ghs, kws, ut, f"{mg},{mc},{mm},{mn}", mco, mi, mcr, mnet,
                    rs[0])
                line_json = tpl_json % (
                    label_json, cl[1], job_id, restart, "null" if aj == "" else aj,
                    "null" if at == "" else at, dims[1], alloc[1], st, et, secs, share, ghs,
                    kws, "null" if ut == "" else f'"{ut}"', mg, mc, mm, mn, mco, mi, mcr, mnet,
                    rs[1])
                # nothing is recorded before both lines exist: a row that fails half-way
                # goes to the slow path whole
                entry = batch.get(dims[2])
                if entry is None:
                    batch[dims[2]] = [ks]
                else:
                    entry.append(ks)
                out_csv.append(line_csv)
                out_json.append(line_json)
            except (_SlowPath, TypeError, ValueError, OverflowError, AttributeError):
                c, j, gkey, ks = self._one_slow(row)
                out_csv.append(c)
                out_json.append(j)
                batch.setdefault(gkey, []).append(ks)
        for gkey, rows_ks in batch.items():
            acc = self.groups.get(gkey)
            sums = [len(rows_ks), *(sum(col) for col in zip(*rows_ks, strict=True))]
            # ks order: gpu, cpu, mem, energy, cost, idle, credit, gpu_hours, kwh, secs, net
            sums = [sums[0], sums[8], sums[9], sums[1], sums[2], sums[3], sums[4], sums[5],
                    sums[6], sums[7], sums[11]]
            if acc is None:
                self.groups[gkey] = sums
            else:
                for i, v in enumerate(sums):
                    acc[i] += v
        self.rows += len(rows)
        return "".join(out_csv), "".join(out_json)

    def _clean(self, row: Sequence[Any]) -> list[Any]:
        """Bad numbers become 0/None (and a warning), wrong types are coerced, so one broken
        value never drops the run or stops the export."""
        r = list(row)
        for i in (13, 14, 15, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29):
            value = _finite(r[i])
            if value is None and r[i] is not None:
                self._warn(row, f"column {_SELECT_NAMES[i]} is not a finite number "
                                f"({str(r[i])[:40]!r}); exported as empty/0")
            r[i] = value
        for i in (1, 2, 3, 4, 16):
            if r[i] is not None and not isinstance(r[i], int):
                value = _finite(r[i])
                r[i] = int(value) if value is not None else None
        for i in (0, 5, 6, 7, 8, 9, 10, 11, 12, 17, 30):
            if r[i] is not None and not isinstance(r[i], str):
                r[i] = str(r[i])
        if r[0] is None:
            r[0] = ""
        if r[19] is None:
            r[19] = self.a
        return r

    def _one_slow(self, row: Sequence[Any]) -> tuple[str, str, tuple[Any, ...], list[int]]:
        """One row through plain function calls (negative amounts, bad values)."""
        (cluster, job_id, restart, array_job, array_task, user, account, team, project,
         cost_center, partition, state, gpu_type, gpus, cpus, mem_mb, node_count, nodes,
         start, end, util, gpu_seconds, energy_j, c_gpu, c_cpu, c_mem, c_energy, cost, c_idle,
         credit, reason) = self._clean(row)
        key = (user, account, team, project, cost_center, partition, state, gpu_type)
        dims = self.dims.get(key) or self._dims(key)
        if start is None or start > end:
            start = end
        ks = [to_cents(c_gpu), to_cents(c_cpu), to_cents(c_mem), to_cents(c_energy),
              to_cents(cost), to_cents(c_idle), to_cents(credit),
              to_micro(gpu_seconds, 3600.0), to_micro(energy_j, 3_600_000.0),
              math.floor(end - start + 0.5)]
        f_lo, f_hi = fractions(start, end, self.a, self.b)
        if (f_lo, f_hi) != (0.0, 1.0):
            ks = [split(k, f_lo, f_hi) for k in ks]
        share = f"{f_hi - f_lo:.6f}"
        ks.append(ks[4] - ks[6])
        g, cp, me, en, co, idle, cr, gh, kwh, secs, net = ks
        values = {
            "period": self.period.label, "cluster": cluster, "job_id": job_id,
            "restart_count": restart, "array_job_id": array_job, "array_task_id": array_task,
            "user": user, "account": account, "team": team, "project": project,
            "cost_center": cost_center, "partition": partition, "state": state,
            "gpu_type": gpu_type, "gpus": None if gpus is None else f"{gpus:.3f}",
            "cpus": None if cpus is None else int(cpus),
            "mem_mb": None if mem_mb is None else int(mem_mb), "node_count": node_count,
            "nodes": nodes, "start_time": iso_utc(start), "end_time": iso_utc(end),
            "seconds": secs, "share": share, "gpu_hours": gh, "energy_kwh": kwh,
            "util_mean": None if util is None else f"{util:.1f}", "cost_gpu": g,
            "cost_cpu": cp, "cost_mem": me, "cost_energy": en, "cost": co, "idle_cost": idle,
            "credit": cr, "net": net, "credit_reason": reason,
        }
        csv_line = ",".join(_format_cell(c, values[c.name], as_json=False)
                            for c in RUN_COLUMNS) + "\n"
        json_line = "{" + ",".join(f'"{c.name}":{_format_cell(c, values[c.name], as_json=True)}'
                                   for c in RUN_COLUMNS) + "}\n"
        return csv_line, json_line, dims[2], ks


class _SlowPath(Exception):
    """This row needs RowFormatter._one_slow."""


_MMSS = [f"{m:02d}:{s:02d}Z" for m in range(60) for s in range(60)]
_SELECT_NAMES = [c.strip().strip('"') for c in
                 _SELECT.removeprefix("SELECT ").removesuffix(" FROM runs ").split(",")]


def _open_slice_conn(db_path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True,
                           isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA query_only = 1")
    return conn


def _export_slice(conn: sqlite3.Connection, period: Period, index: int, lo: float, hi: float,
                  csv_path: str, json_path: str,
                  progress: Callable[[int], None] | None = None, *,
                  final: bool = False) -> SliceResult:
    """Rows of one slice of end times [lo, hi) into two files, in one read transaction.

    ``final``: the slice is the whole period, so these are runs.csv (header included) and
    runs.jsonl themselves: hashed and fsynced here, nothing to merge afterwards.
    """
    params = {"a": period.start_ts, "b": period.end_ts, "lo": lo, "hi": hi}
    fmt = RowFormatter(period)
    result = SliceResult(index)
    hashes = (hashlib.sha256(), hashlib.sha256()) if final else None
    sizes = [0, 0]
    conn.execute("BEGIN")
    try:
        cur = conn.execute(_SELECT + "WHERE " + _SCOPE + _SLICE + _ORDER, params)
        with open(csv_path, "wb") as fc, open(json_path, "wb") as fj:
            outs = (fc, fj)

            def emit(i: int, data: bytes) -> None:
                if hashes is not None:
                    hashes[i].update(data)
                outs[i].write(data)
                sizes[i] += len(data)

            if final:
                emit(0, _csv_header(RUN_COLUMNS).encode())
            while True:
                try:
                    rows = cur.fetchmany(CHUNK_ROWS)
                except sqlite3.OperationalError as exc:
                    if "decode" not in str(exc).lower():
                        raise
                    raise _NeedsLenientText from exc
                if not rows:
                    break
                text_csv, text_json = fmt.format(rows)
                emit(0, text_csv.encode())
                emit(1, text_json.encode())
                if progress is not None:
                    progress(len(rows))
            if final:  # parts are copied into the final files, which are fsynced then
                for fh in outs:
                    fh.flush()
                    os.fsync(fh.fileno())
        result.fingerprint = _fingerprint(conn, params, sliced=True)
        result.last_change = result.fingerprint[3]
    finally:
        conn.execute("COMMIT")
    result.rows = fmt.rows
    result.groups = fmt.groups
    result.clusters = set(fmt.clusters)
    result.warnings = fmt.warnings
    if hashes is not None:
        result.files = {"runs.csv": FileInfo(fmt.rows, sizes[0], hashes[0].hexdigest()),
                        "runs.jsonl": FileInfo(fmt.rows, sizes[1], hashes[1].hexdigest())}
    return result


class _NeedsLenientText(Exception):
    """A text column holds bytes that are not UTF-8: redo the slice decoding leniently."""


def _fingerprint(conn: sqlite3.Connection, params: dict[str, Any], *,
                 sliced: bool) -> tuple[Any, ...]:
    row = conn.execute(_FINGERPRINT + _SCOPE + (_SLICE if sliced else ""), params).fetchone()
    # sums of whole micro-units stay exact as floats (below 2**53); inf stays inf
    return (int(row[0]), float(row[1]), float(row[2]), row[3])


def _slice_task(task: tuple[Any, ...]) -> SliceResult:
    """Worker entry point (module level so a process pool can call it)."""
    db_path, period, index, lo, hi, csv_path, json_path = task
    conn = _open_slice_conn(db_path)
    try:
        try:
            return _export_slice(conn, period, index, lo, hi, csv_path, json_path)
        except _NeedsLenientText:
            conn.text_factory = lambda b: b.decode("utf-8", "replace")
            return _export_slice(conn, period, index, lo, hi, csv_path, json_path)
    finally:
        conn.close()


# -- files -----------------------------------------------------------------------------------


def _csv_header(columns: Sequence[Column]) -> str:
    return ",".join(c.name for c in columns) + "\n"


def _format_cell(col: Column, value: Any, *, as_json: bool) -> str:
    if value is None or value == "":
        if col.kind == "text" and not col.nullable:
            return '""' if as_json else ""
        return "null" if as_json else ""
    if col.kind == "int":
        return str(int(value))
    if isinstance(value, str):
        text = value
    elif col.kind == "money":
        text = money(int(value))
    elif col.kind == "dec6":
        text = micro(int(value))
    else:
        text = str(value)
    if as_json:
        return encode_basestring(text)
    return _csv_text(text)


@dataclass
class FileInfo:
    rows: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


def _write_file(path: Path, chunks: Iterator[bytes] | Sequence[bytes], rows: int) -> FileInfo:
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as fh:
        for chunk in chunks:
            digest.update(chunk)
            fh.write(chunk)
            size += len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return FileInfo(rows, size, digest.hexdigest())


def _file_chunks(paths: Sequence[Path], head: bytes = b"") -> Iterator[bytes]:
    if head:
        yield head
    for p in paths:
        with open(p, "rb") as fh:
            while True:
                block = fh.read(1 << 20)
                if not block:
                    break
                yield block


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _aggregate_rows(name: str, groups: dict[tuple[Any, ...], list[int]]
                    ) -> list[tuple[tuple[Any, ...], list[int]]]:
    keys = AGGREGATES[name]
    idx = [GROUP_KEY.index(k) for k in keys]
    out: dict[tuple[Any, ...], list[int]] = {}
    for gkey, acc in groups.items():
        k = tuple(gkey[i] if gkey[i] != "" else None for i in idx)
        sums = out.get(k)
        if sums is None:
            out[k] = list(acc)
        else:
            for i, v in enumerate(acc):
                sums[i] += v
    return sorted(out.items(), key=lambda kv: tuple("" if v is None else str(v)
                                                    for v in kv[0]))


def _aggregate_lines(period: Period, mode: str, name: str,
                     rows: list[tuple[tuple[Any, ...], list[int]]]) -> tuple[bytes, bytes]:
    columns = aggregate_columns(name)
    csv_lines = [_csv_header(columns)]
    json_lines = []
    for key, sums in rows:
        values = [period.label, *key, *sums, mode]
        csv_lines.append(",".join(_format_cell(c, v, as_json=False)
                                  for c, v in zip(columns, values, strict=True)) + "\n")
        json_lines.append("{" + ",".join(
            f'"{c.name}":{_format_cell(c, v, as_json=True)}'
            for c, v in zip(columns, values, strict=True)) + "}\n")
    return "".join(csv_lines).encode(), "".join(json_lines).encode()


# -- parquet (optional) ------------------------------------------------------------------------


def _arrow_type(pa: Any, col: Column) -> Any:
    return {
        "text": pa.string(), "int": pa.int64(), "money": pa.decimal128(18, 2),
        "dec1": pa.decimal128(9, 1), "dec3": pa.decimal128(15, 3),
        "dec6": pa.decimal128(24, 6), "timestamp": pa.timestamp("ms", tz="UTC"),
    }[col.kind]


def _arrow_schema(pa: Any, columns: Sequence[Column]) -> Any:
    return pa.schema([pa.field(c.name, _arrow_type(pa, c), nullable=c.nullable or
                               c.kind == "text") for c in columns])


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.csv  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _csv_to_parquet(csv_path: Path, parquet_path: Path, columns: Sequence[Column]) -> FileInfo:
    """Stream a CSV we wrote into Parquet with the documented types (memory stays flat)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema = _arrow_schema(pa, columns)
    reader = pacsv.open_csv(
        csv_path,
        read_options=pacsv.ReadOptions(block_size=8 << 20, use_threads=True),
        convert_options=pacsv.ConvertOptions(
            column_types={f.name: f.type for f in schema}, strings_can_be_null=True,
            quoted_strings_can_be_null=False),
    )
    rows = 0
    with pq.ParquetWriter(parquet_path, schema, compression="zstd") as writer:
        for batch in reader:
            rows += batch.num_rows
            writer.write_table(pa.Table.from_batches([batch]).cast(schema))
    with open(parquet_path, "rb+") as fh:
        os.fsync(fh.fileno())
    return FileInfo(rows, parquet_path.stat().st_size, _hash_file(parquet_path))


# -- atomic folder swap ------------------------------------------------------------------------

def _remove_leftovers(out_dir: Path, label: str) -> None:
    for p in out_dir.glob(f".{label}.*"):
        if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


# -- the export ------------------------------------------------------------------------------


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]

    @property
    def runs(self) -> int:
        return int(self.manifest["totals"]["runs"])


def _generator() -> str:
    try:
        from importlib.metadata import version

        return f"slurmgate {version('slurmgate')}"
    except Exception:  # not installed (tests from a checkout)
        return "slurmgate"


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _plan(conn: sqlite3.Connection, period: Period, jobs: int) -> tuple[int, list[float]]:
    """(runs in scope, slice edges): equal-count slices of end times, the last unbounded."""
    params = {"a": period.start_ts, "b": period.end_ts}
    total = conn.execute("SELECT count(*) FROM runs WHERE " + _SCOPE, params).fetchone()[0]
    edges: list[float] = [float(period.start_ts)]
    if jobs > 1 and total >= PARALLEL_MIN_RUNS:
        step = max(1, total // (jobs * SLICES_PER_JOB))
        for (end_ts,) in conn.execute(
                "SELECT end_ts FROM (SELECT end_ts, row_number() OVER (ORDER BY end_ts) AS n "
                "FROM runs WHERE end_ts >= :a AND end_ts < :b) WHERE n % :step = 0",
                {**params, "step": step}):
            if end_ts > edges[-1]:
                edges.append(float(end_ts))
    edges.append(_NO_END)
    return int(total), edges


def export_period(db_path: str | os.PathLike[str], period: Period,
                  out_dir: str | os.PathLike[str], *, mode: str = "chargeback",
                  currency: str = "$", jobs: int | None = None, parquet: bool | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  attempts: int = 3) -> ExportResult:
    """Export ``period`` from the store at ``db_path`` into ``out_dir/<label>/``.

    ``jobs``: worker processes for large periods (default: CPUs, at most 8). ``parquet``:
    None writes Parquet when pyarrow imports. ``progress(done, total)`` is called as runs are
    written. Raises ExportError with a message for the admin.
    """
    if mode not in ("chargeback", "showback"):
        raise ExportError(f"mode must be chargeback or showback, not {mode!r}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{out}: cannot create the export directory: {exc.strerror}; "
                          "set [export] out_dir or pass --out") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(f"{out}: not writable by this user; run as the daemon's user "
                          "(e.g. sudo -u slurm slurmgate export) or pass --out")
    jobs = max(1, min(jobs or _cpus(), 8))
    with_parquet = parquet_available() if parquet is None else parquet
    if with_parquet and not parquet_available():
        raise ExportError("Parquet needs pyarrow: pip install 'slurmgate[parquet]'")
    with locked(out / ".export.lock"):
        _remove_leftovers(out, period.label)
        for attempt in range(attempts):
            tmp = out / f".{period.label}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=0o750)
            try:
                manifest = _export_into(str(db_path), period, tmp, mode=mode, currency=currency,
                                        jobs=jobs, parquet=with_parquet, progress=progress)
            except _Changed:
                shutil.rmtree(tmp, ignore_errors=True)
                if attempt + 1 == attempts:
                    raise ExportError(
                        f"runs of {period.label} kept changing while they were exported "
                        f"({attempts} tries); run the export again in a minute") from None
                continue
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(tmp)
            final = out / period.label
            swap_in_dir(tmp, final)
            return ExportResult(final, manifest)
    raise AssertionError("unreachable")


class _Changed(Exception):
    """The runs of the period changed between the slices' snapshots."""


def _run_slices(db_path: str, period: Period, tmp: Path, edges: list[float], jobs: int,
                progress: Callable[[int], None]) -> Iterator[SliceResult]:
    tasks = [(db_path, period, i, edges[i], edges[i + 1], str(tmp / f"part-{i:04d}.csv"),
              str(tmp / f"part-{i:04d}.jsonl")) for i in range(len(edges) - 1)]
    if len(tasks) == 1:
        final = (db_path, period, 0, edges[0], edges[1], str(tmp / "runs.csv"),
                 str(tmp / "runs.jsonl"))
        conn = _open_slice_conn(db_path)
        try:
            try:
                result = _export_slice(conn, period, *final[2:], progress=progress, final=True)
            except _NeedsLenientText:
                conn.text_factory = lambda b: b.decode("utf-8", "replace")
                result = _export_slice(conn, period, *final[2:], progress=progress, final=True)
        finally:
            conn.close()
        yield result
        return
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(min(jobs, len(tasks))) as pool:
        for result in pool.imap(_slice_task, tasks):
            progress(result.rows)
            yield result


def _export_into(db_path: str, period: Period, tmp: Path, *, mode: str, currency: str,
                 jobs: int, parquet: bool, progress: Callable[[int, int], None] | None
                 ) -> dict[str, Any]:
    conn = connect_readonly(db_path)
    try:
        total, edges = _plan(conn, period, jobs)
    finally:
        conn.close()  # no connection may cross the fork into the workers
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    parallel = len(edges) > 2
    groups: dict[tuple[Any, ...], list[int]] = {}
    clusters: set[str] = set()
    warnings: list[str] = []
    fingerprint: list[Any] = [0, 0.0, 0.0, None]
    last_change: float | None = None
    rows = 0
    csv_parts: list[Path] = []
    json_parts: list[Path] = []
    single_files: dict[str, FileInfo] = {}
    for res in _run_slices(db_path, period, tmp, edges, jobs, step):
        single_files.update(res.files)
        rows += res.rows
        clusters |= res.clusters
        warnings.extend(res.warnings[:MAX_WARNINGS - len(warnings)])
        if res.last_change is not None and (last_change is None or res.last_change > last_change):
            last_change = res.last_change
        for key, acc in res.groups.items():
            mine = groups.get(key)
            if mine is None:
                groups[key] = list(acc)
            else:
                for i, v in enumerate(acc):
                    mine[i] += v
        if parallel:
            fingerprint[0] += res.fingerprint[0]
            fingerprint[1] += res.fingerprint[1]
            fingerprint[2] += res.fingerprint[2]
            if res.fingerprint[3] is not None and (fingerprint[3] is None or
                                                   res.fingerprint[3] > fingerprint[3]):
                fingerprint[3] = res.fingerprint[3]
        csv_parts.append(tmp / f"part-{res.index:04d}.csv")
        json_parts.append(tmp / f"part-{res.index:04d}.jsonl")
    params = {"a": period.start_ts, "b": period.end_ts}
    conn = connect_readonly(db_path)
    try:
        conn.execute("BEGIN")
        if parallel and tuple(fingerprint) != _fingerprint(conn, params, sliced=False):
            raise _Changed
        unsettled = int(conn.execute(_UNSETTLED, params).fetchone()[0])
        conn.execute("COMMIT")
    finally:
        conn.close()

    files: dict[str, FileInfo] = dict(single_files)
    if parallel:  # concatenate the parts in order; two threads (hashing releases the GIL)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            csv_job = pool.submit(_write_file, tmp / "runs.csv", _file_chunks(
                csv_parts, _csv_header(RUN_COLUMNS).encode()), rows)
            json_job = pool.submit(_write_file, tmp / "runs.jsonl", _file_chunks(json_parts),
                                   rows)
            files["runs.csv"], files["runs.jsonl"] = csv_job.result(), json_job.result()
        for p in (*csv_parts, *json_parts):
            p.unlink()
    totals = [0] * len(MEASURE_COLUMNS)
    for acc in groups.values():
        for i, v in enumerate(acc):
            totals[i] += v
    for name in AGGREGATES:
        agg = _aggregate_rows(name, groups)
        csv_bytes, json_bytes = _aggregate_lines(period, mode, name, agg)
        files[f"{name}.csv"] = _write_file(tmp / f"{name}.csv", [csv_bytes], len(agg))
        files[f"{name}.jsonl"] = _write_file(tmp / f"{name}.jsonl", [json_bytes], len(agg))
        if parquet:
            files[f"{name}.parquet"] = _csv_to_parquet(tmp / f"{name}.csv",
                                                       tmp / f"{name}.parquet",
                                                       aggregate_columns(name))
    if parquet:
        files["runs.parquet"] = _csv_to_parquet(tmp / "runs.csv", tmp / "runs.parquet",
                                                RUN_COLUMNS)
    schema = schema_text().encode()
    files["schema.json"] = _write_file(tmp / "schema.json", [schema], 0)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "generator": _generator(),
        "period": period.as_dict(),
        "generated_at": period.end_iso,
        "data_as_of": iso_utc(last_change) if last_change is not None else None,
        "mode": mode,
        "currency": currency,
        "clusters": sorted(clusters),
        "pro_rata": "runs crossing the period's edges are split by wall time; amounts in "
                    "cents per row, split so the pieces of a run add up to the run",
        "totals": {c.name: (v if c.kind == "int" else money(v) if c.kind == "money"
                            else micro(v)) for c, v in zip(MEASURE_COLUMNS, totals, strict=True)},
        "unsettled_runs": unsettled,
        "warnings": warnings,
        "files": {name: info.as_dict() for name, info in sorted(files.items())},
    }
    text = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
    _write_file(tmp / "manifest.json", [text], 0)
    return manifest


def terminal_progress(label: str, stream: Any = None, width: int = 30
                      ) -> Callable[[int, int], None]:
    """A progress bar for a terminal: ``export 2026-10 [#####     ] 52% 520,000/1,000,000``.
    Redrawn at most 5 times a second; a newline when done."""
    import time

    out = stream or sys.stderr
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        finished = done >= total
        if not finished and now - last[0] < 0.2:
            return
        last[0] = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * width)
        out.write(f"\rexport {label} [{bar:<{width}}] {frac:4.0%} {done:,}/{total:,} runs")
        if finished:
            out.write("\n")
        out.flush()

    return show


def verify_export(path: str | os.PathLike[str]) -> list[str]:
    """Problems found when checking an export folder against its manifest (empty: intact)."""
    folder = Path(path)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{folder}/manifest.json: {exc}"]
    problems = []
    for name, info in manifest.get("files", {}).items():
        p = folder / name
        if not p.exists():
            problems.append(f"{name}: missing")
        elif _hash_file(p) != info.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m db.chargeback.export --schema`` prints the JSON Schema
    (db/chargeback/export_schema.json)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--schema"]:
        sys.stdout.write(schema_text())
        return 0
    print("usage: python -m db.chargeback.export --schema", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
