"""Rows of runs.csv and runs.jsonl: one run (or its piece in the period) as a CSV line and a
JSON line, plus the per-group sums the aggregated files and the manifest are made of.

The input is one row of the runs table with the columns INPUT_FIELDS, in that order
(export.py reads exactly these). The money is policies.money's: whole cents per piece, split
pro rata by wall time (FORMAT.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

from db.chargeback.columns import EXPORT_COLUMNS, Column
from db.chargeback.periods import Period, iso_utc
from policies.money import CENT_SUFFIXES, fractions, micro, money, split, to_cents, to_micro

MAX_WARNINGS = 50
"""At most this many warnings (bad values) are kept per export."""

INPUT_FIELDS = (
    "cluster", "job_id", "restart_count", "array_job_id", "array_task_id", "user", "account",
    "team", "project", "cost_center", "partition", "state", "gpu_type", "gpus", "cpus",
    "mem_mb", "node_count", "nodes", "start_ts", "end_ts", "util_mean", "gpu_seconds",
    "energy_j", "cost_gpu", "cost_cpu", "cost_mem", "cost_energy", "cost", "cost_idle",
    "credit", "credit_reason", "epochs", "steps",
)
"""The runs-table columns of one input row, in the order RowFormatter unpacks them
(``epochs``/``steps``: the progress the run reported, from run_progress)."""


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A text cell starting with one of these is read as a formula by spreadsheets."""


def defuse_formula(value: str) -> str:
    """``value`` with a leading ``'`` when a spreadsheet would run it as a formula
    ("=HYPERLINK(...)", "@SUM(1)", "-2+3"): account names and record fields are user text.
    For text cells only: numbers are never changed (a negative amount stays "-0.40")."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def csv_quote(value: str | None) -> str:
    """A CSV field, quoted as RFC 4180 asks; None is an empty field. No formula guard: for
    numbers and timestamps (csv_text is the one for text)."""
    if value is None:
        return ""
    if "," in value or '"' in value or "\n" in value or "\r" in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_text(value: str | None) -> str:
    """A text CSV field: formula-guarded (``defuse_formula``), quoted as RFC 4180 asks; None
    is an empty field."""
    if value is None:
        return ""
    value = defuse_formula(value)
    if "," in value or '"' in value or "\n" in value or "\r" in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def json_text(value: str | None) -> str:
    """A JSON string, or null."""
    return "null" if value is None else encode_basestring(value)


def csv_header(columns: Sequence[Column]) -> str:
    """The header line of a CSV file."""
    return ",".join(c.name for c in columns) + "\n"


def format_cell(col: Column, value: Any, *, as_json: bool) -> str:
    """One value of ``col`` as CSV or JSON text (the slow path and the aggregated files):
    money columns take cents, dec6 millionths, and a string is printed as it is."""
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
    return csv_text(text) if col.kind == "text" else csv_quote(text)


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
    """Turns run rows (INPUT_FIELDS) into CSV and JSON lines plus group sums.

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
    _CSV = ",".join(["%s"] * 24) + "\n"
    _JSON = (
        '{"period":%s,"cluster":%s,"job_id":%s,"restart_count":%s,"array_job_id":%s,'
        '"array_task_id":%s,%s,%s,'
        '"start_time":"%s","end_time":"%s","seconds":%s,"share":"%s","gpu_hours":"%s",'
        '"energy_kwh":"%s","util_mean":%s,"cost_gpu":"%s","cost_cpu":"%s","cost_mem":"%s",'
        '"cost_energy":"%s","cost":"%s","idle_cost":"%s","credit":"%s","net":"%s",'
        '"credit_reason":%s,"busy_gpu_hours":%s,"epochs":%s,"steps":%s}\n'
    )

    def __init__(self, period: Period) -> None:
        self.period = period
        self.a = float(period.start_ts)
        self.b = float(period.end_ts)
        self.label_csv = csv_text(period.label)
        self.label_json = json_text(period.label)
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
        csv_part = ",".join(csv_text(v) for v in key)
        json_part = ",".join(f'"{n}":{json_text(v)}' for n, v in zip(self._DIM_NAMES, key,
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
                             csv_text(nodes)])
        json_part = (f'"gpus":{json_text(gp)},"cpus":{"null" if cpu is None else cpu},'
                     f'"mem_mb":{"null" if mem is None else mem},'
                     f'"node_count":{"null" if node_count is None else int(node_count)},'
                     f'"nodes":{json_text(nodes)}')
        if len(self.allocs) >= self._MAX_CACHE:
            self.allocs.clear()
        entry = self.allocs[key] = (csv_part, json_part)
        return entry

    def _cluster(self, name: str) -> tuple[str, str]:
        entry = self.clusters[name] = (csv_text(name), json_text(name))
        return entry

    def _reason(self, reason: str | None) -> tuple[str, str]:
        if len(self.reasons) >= self._MAX_CACHE:
            self.reasons.clear()
        entry = self.reasons[reason] = (csv_text(reason), json_text(reason))
        return entry

    def _warn(self, row: Sequence[Any], what: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"run {row[0]}/{row[1]}/{row[2]}: {what}")

    # -- rows --------------------------------------------------------------------------------

    def format(self, rows: Sequence[Sequence[Any]]) -> tuple[str, str]:
        """CSV and JSON Lines text of ``rows``; group sums accumulate in ``self.groups``."""
        out_csv: list[str] = []
        out_json: list[str] = []
        batch: dict[tuple[Any, ...], list[list[int]]] = {}
        a, b = self.a, self.b
        dims_get, clusters_get, reasons_get = self.dims.get, self.clusters.get, self.reasons.get
        hours_get = self.hours.get
        allocs_get = self.allocs.get
        label_csv, label_json = self.label_csv, self.label_json
        tpl_csv, tpl_json = self._CSV, self._JSON
        floor = math.floor
        cents = CENT_SUFFIXES
        for row in rows:
            try:
                (cluster, job_id, restart, array_job, array_task, user, account, team,
                 project, cost_center, partition, state, gpu_type, gpus, cpus, mem_mb,
                 node_count, nodes, start, end, util, gpu_seconds, energy_j, c_gpu, c_cpu,
                 c_mem, c_energy, cost, c_idle, credit, reason, epochs, steps) = row
                key = (user, account, team, project, cost_center, partition, state, gpu_type)
                dims = dims_get(key) or self._dims(key)
                if start is None or start > end:
                    start = end
                # to_cents and to_micro, inlined; _one_slow calls them (a test keeps the two
                # paths byte-equal)
                ks = [(round(x * 1e6) + 5000) // 10000 if x else 0 for x in
                      (c_gpu, c_cpu, c_mem, c_energy, cost, c_idle, credit)]
                ks.append(floor(gpu_seconds * 1e6 / 3600.0 + 0.5) if gpu_seconds else 0)
                ks.append(floor(energy_j * 1e6 / 3_600_000.0 + 0.5) if energy_j else 0)
                ks.append(floor(end - start + 0.5))
                # busy and measured GPU-hours (millionths): only with a measured utilisation
                if util is None:
                    ks += (0, 0)
                else:
                    busy = gpu_seconds * min(max(util, 0.0), 100.0) / 100.0 \
                        if gpu_seconds else 0.0
                    ks += (floor(busy * 1e6 / 3600.0 + 0.5) if busy else 0, ks[7])
                if start >= a and end <= b or end <= start:
                    share = "1.000000"
                else:
                    f_lo, f_hi = fractions(start, end, a, b)
                    ks = [split(k, f_lo, f_hi) for k in ks]
                    share = f"{f_hi - f_lo:.6f}"
                ks.append(ks[4] - ks[6])
                if min(ks) < 0 or not (epochs is None or type(epochs) is int) \
                        or not (steps is None or type(steps) is int):
                    raise _SlowPath
                g, cp, me, en, co, idle, cr, gh, kwh, secs, bz, _, net = ks
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
                bzs = "" if util is None else f"{bz // 1_000_000}.{bz % 1_000_000:06d}"
                # progress is the whole run's figure, in the period that holds its end
                ep = "" if epochs is None or end > b else epochs
                sp = "" if steps is None or end > b else steps
                kws = f"{kwh // 1_000_000}.{kwh % 1_000_000:06d}"
                line_csv = tpl_csv % (
                    label_csv, cl[0], job_id, restart, aj, at, dims[0], alloc[0], st, et,
                    secs, share, ghs, kws, ut, f"{mg},{mc},{mm},{mn}", mco, mi, mcr, mnet,
                    rs[0], bzs, ep, sp)
                line_json = tpl_json % (
                    label_json, cl[1], job_id, restart, "null" if aj == "" else aj,
                    "null" if at == "" else at, dims[1], alloc[1], st, et, secs, share, ghs,
                    kws, "null" if ut == "" else f'"{ut}"', mg, mc, mm, mn, mco, mi, mcr, mnet,
                    rs[1], "null" if bzs == "" else f'"{bzs}"', "null" if ep == "" else ep,
                    "null" if sp == "" else sp)
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
            # ks order: gpu, cpu, mem, energy, cost, idle, credit, gpu_hours, kwh, secs, busy,
            # measured, net; sums: SUM_COLUMNS (columns.py)
            sums = [sums[0], sums[8], sums[9], sums[1], sums[2], sums[3], sums[4], sums[5],
                    sums[6], sums[7], sums[13], sums[11], sums[12]]
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
                self._warn(row, f"column {INPUT_FIELDS[i]} is not a finite number "
                                f"({str(r[i])[:40]!r}); exported as empty/0")
            r[i] = value
        for i in (1, 2, 3, 4, 16, 31, 32):
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
         credit, reason, epochs, steps) = self._clean(row)
        key = (user, account, team, project, cost_center, partition, state, gpu_type)
        dims = self.dims.get(key) or self._dims(key)
        if start is None or start > end:
            start = end
        ks = [to_cents(c_gpu), to_cents(c_cpu), to_cents(c_mem), to_cents(c_energy),
              to_cents(cost), to_cents(c_idle), to_cents(credit),
              to_micro(gpu_seconds, 3600.0), to_micro(energy_j, 3_600_000.0),
              math.floor(end - start + 0.5)]
        if util is None:
            ks += [0, 0]
        else:
            busy = gpu_seconds * min(max(util, 0.0), 100.0) / 100.0 if gpu_seconds else 0.0
            ks += [to_micro(busy, 3600.0), ks[7]]
        f_lo, f_hi = fractions(start, end, self.a, self.b)
        if (f_lo, f_hi) != (0.0, 1.0):
            ks = [split(k, f_lo, f_hi) for k in ks]
        share = f"{f_hi - f_lo:.6f}"
        ks.append(ks[4] - ks[6])
        g, cp, me, en, co, idle, cr, gh, kwh, secs, bz, _, net = ks
        in_end_piece = end <= self.b
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
            "busy_gpu_hours": None if util is None else bz,
            "epochs": epochs if in_end_piece else None,
            "steps": steps if in_end_piece else None,
        }
        csv_line = ",".join(format_cell(c, values[c.name], as_json=False)
                            for c in EXPORT_COLUMNS) + "\n"
        json_line = "{" + ",".join(f'"{c.name}":{format_cell(c, values[c.name], as_json=True)}'
                                   for c in EXPORT_COLUMNS) + "}\n"
        return csv_line, json_line, dims[2], ks


class _SlowPath(Exception):
    """This row needs RowFormatter._one_slow."""


_MMSS = [f"{m:02d}:{s:02d}Z" for m in range(60) for s in range(60)]
