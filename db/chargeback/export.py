"""Chargeback exports: the runs of a period and their sums, as files finance can load.

``slurmgate export`` writes one folder per period (``<out>/<label>/``: runs and sums as CSV,
JSON Lines and Parquet, schema.json, manifest.json). What the files hold, how runs are split
at period edges and what the manifest says is the file-format spec, db/chargeback/FORMAT.md.

This module makes the files: it reads the settled runs of the period (SQL), cuts large
periods into slices for worker processes, checks that no run changed meanwhile, writes and
hashes the files, converts them to Parquet and swaps the new folder in atomically. Its
rooms: periods.py (which period), columns.py (which columns, the JSON Schema), rows.py (one
run as text, the group sums) and policies.money (cents and the pro rata split).

The ledger is a SQLite file or a PostgreSQL server (db/backend.py): the export reads it
through a read-only store, in the SQL both servers share, and writes the same bytes from the
same runs on either. Each export reads one snapshot of the runs: on SQLite each slice is one
read transaction and a fingerprint of the whole period, taken after the slices, must equal
the slices' (else the export is made again); on PostgreSQL every read of the export is one
``REPEATABLE READ READ ONLY`` transaction whose snapshot the worker processes share.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from db.backend import POSTGRESQL, Connection, SQLiteConnection, database_errors
from db.chargeback.columns import (
    AGGREGATES,
    EXPORT_COLUMNS,
    GROUP_KEY,
    MEASURE_COLUMNS,
    SCHEMA_VERSION,
    SUM_COLUMNS,
    Column,
    aggregate_columns,
    schema_text,
)
from db.chargeback.periods import Period, iso_utc
from db.chargeback.rows import INPUT_FIELDS, MAX_WARNINGS, RowFormatter, csv_header, format_cell
from policies.money import micro, money
from slurm_plugin.fsutil import fsync_dir, locked, swap_in_dir

if TYPE_CHECKING:
    from db.store import Store

CHUNK_ROWS = 2000
PARALLEL_MIN_RUNS = 50_000
"""Fewer runs than this are exported in-process (a worker pool costs more than it saves)."""
SLICES_PER_JOB = 6


class ExportError(RuntimeError):
    """An export cannot be made as asked; the message says why and what to do."""


# -- SQL ---------------------------------------------------------------------------------------
# One dialect for SQLite and PostgreSQL (db/backend.py): CASE for SQLite's scalar max/min,
# coalesce(sum(x), 0) for its total(x).

# The columns RowFormatter takes, in its order ("user" and "partition" are SQL keywords); the
# progress a run made comes from run_progress (a figure the job reported, never an amount;
# NULL stays NULL, a negative difference is 0).
_PROGRESS = ("(SELECT CASE WHEN p.{0} - p.{0}_base < 0 THEN 0 ELSE p.{0} - p.{0}_base END "
             "FROM run_progress p WHERE p.cluster = runs.cluster AND p.job_id = runs.job_id "
             "AND p.restart_count = runs.restart_count)")
_EXPRESSIONS = {"user": '"user"', "partition": '"partition"',
                "epochs": _PROGRESS.format("epoch"), "steps": _PROGRESS.format("step")}
_SELECT = "SELECT " + ", ".join(_EXPRESSIONS.get(c, c) for c in INPUT_FIELDS) + " FROM runs "
# Settled runs whose wall time overlaps [:a, :b); a zero-length run counts at its end.
# (The CASE is min(coalesce(start_ts, end_ts), end_ts); end_ts is never NULL here.)
_SCOPE = (
    "cost IS NOT NULL AND end_ts >= :a "
    "AND CASE WHEN start_ts < end_ts THEN start_ts ELSE end_ts END < :b "
    "AND (end_ts > :a OR coalesce(start_ts, end_ts) >= end_ts)"
)
_SLICE = " AND end_ts >= :lo AND end_ts < :hi"
_CLUSTER = " AND cluster = :cluster"
"""``slurmgate export --cluster NAME``: that cluster's runs only (params carry "cluster")."""


def _scope(params: dict[str, Any]) -> str:
    """_SCOPE, limited to the cluster ``params`` name when they name one."""
    return _SCOPE + (_CLUSTER if params.get("cluster") is not None else "")


def _scope_params(period: Period, cluster: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"a": period.start_ts, "b": period.end_ts}
    if cluster is not None:
        params["cluster"] = str(cluster)
    return params
_ORDER = " ORDER BY end_ts, cluster, job_id, restart_count"


def _order(dialect: str) -> str:
    """The files' row order. PostgreSQL sorts text by the database's collation, SQLite by
    bytes (BINARY): COLLATE "C" is PostgreSQL's byte order, so both write the runs in the same
    order. SQLite has no collation named "C", hence the branch."""
    if dialect == POSTGRESQL:
        return ' ORDER BY end_ts, cluster COLLATE "C", job_id, restart_count'
    return _ORDER


def _micro_units(x: str) -> str:
    """SQL for ``round(x * 1000000)`` exactly as SQLite's round() computes it (half away from
    zero: trunc(y +/- 0.5); values beyond 2**52 are whole already). PostgreSQL's
    round(double precision) breaks ties to even, so round() itself would give other integers
    there; this gives the same on both."""
    y = f"({x} * 1000000)"
    return (f"CASE WHEN {y} > 4503599627370496.0 OR {y} < -4503599627370496.0 THEN {y} "
            f"WHEN {y} < 0 THEN -floor(0.5 - {y}) ELSE floor({y} + 0.5) END")


_FINGERPRINT = (
    f"SELECT count(*), coalesce(sum({_micro_units('cost')}), 0), "
    f"coalesce(sum({_micro_units('credit')}), 0), max(updated_at) FROM runs WHERE "
)
_UNSETTLED = (
    "SELECT (SELECT count(*) FROM runs WHERE end_ts >= :a AND cost IS NULL "
    "AND coalesce(start_ts, end_ts) < :b{0}) + (SELECT count(*) FROM runs WHERE end_ts IS NULL "
    "AND cost IS NULL AND coalesce(start_ts, :a) < :b{0})"
)
_NO_END = 1e18


def open_reader(target: str | os.PathLike[str]) -> Store:
    """A read-only store of the ledger at ``target`` (a SQLite file or a postgresql:// URL)
    that checks the schema (db.store.open_store's rules); ExportError when it cannot."""
    from db.store import StoreError, open_store

    try:
        return open_store(os.fspath(target), readonly=True)
    except StoreError as exc:
        raise ExportError(str(exc)) from exc


# -- reading one snapshot --------------------------------------------------------------------

_SNAPSHOT_ID = re.compile(r"^[0-9A-Fa-f]+-[0-9A-Fa-f]+(-[0-9A-Fa-f]+)?$")
PG_READ_TIMEOUT = "10min"
"""statement_timeout of an export's or a statement's reads on PostgreSQL. A reader's session
allows 10 s a statement (db.backend: what bounds a decision); sorting the runs of a large
month into the export's order takes longer. The lock timeout stays."""
_cursors = itertools.count()


def _begin_pg_snapshot(conn: Connection) -> None:
    """PostgreSQL only: a REPEATABLE READ READ ONLY transaction (one snapshot for every
    statement in it), statements allowed PG_READ_TIMEOUT."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    conn.execute(f"SET LOCAL statement_timeout = '{PG_READ_TIMEOUT}'")


@contextlib.contextmanager
def one_snapshot(conn: Connection) -> Iterator[None]:
    """The reads inside see one snapshot of the ledger, where that takes a transaction here.

    PostgreSQL: one ``REPEATABLE READ READ ONLY`` transaction (unless ``conn`` is in a
    transaction already, which then holds the reads); it also lets ``read_batches`` stream
    through a server cursor. SQLite: nothing: the callers keep their own read transactions
    (an export's slices; a statement reads statement by statement, as it always did).
    """
    if conn.dialect != POSTGRESQL or conn.in_transaction:
        yield
        return
    _begin_pg_snapshot(conn)
    try:
        yield
    except BaseException:
        with contextlib.suppress(*database_errors()):  # the connection may be gone
            conn.execute("ROLLBACK")
        raise
    conn.execute("ROLLBACK")  # it only read: nothing to commit


@contextlib.contextmanager
def _slice_reads(conn: Connection) -> Iterator[None]:
    """One slice's rows and its fingerprint in one snapshot. SQLite: a read transaction of
    its own (the export's consistency check then compares the slices' fingerprints with the
    whole period's). PostgreSQL: the export's transaction holds it already (the parent's, or
    a worker's attached to the parent's snapshot)."""
    if conn.dialect == POSTGRESQL:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


class _Batched(Protocol):
    def fetchmany(self, size: int) -> list[Any]: ...


def read_batches(conn: Connection, sql: str, params: dict[str, Any], size: int
                 ) -> Iterator[list[Any]]:
    """The rows of ``sql`` as tuples, ``size`` at a time, without holding them all in memory.

    SQLite: the cursor's fetchmany (rows are read as they are asked for). PostgreSQL: psycopg's
    plain cursor would take the whole result into memory first, so the rows come through a
    cursor of the server's (DECLARE / FETCH); that needs the transaction ``one_snapshot``
    holds. Text that is not UTF-8 (only SQLite can hold it) raises _NeedsLenientText.
    """
    if conn.dialect == POSTGRESQL:
        if not conn.in_transaction:
            raise RuntimeError("read_batches on PostgreSQL runs inside one_snapshot()")
        name = f"sg_batches_{next(_cursors)}"
        conn.execute(f"DECLARE {name} NO SCROLL CURSOR FOR " + sql, params)
        while True:
            rows = conn.execute(f"FETCH FORWARD {int(size)} FROM {name}").fetchall()
            if not rows:
                break
            yield rows
        conn.execute(f"CLOSE {name}")  # (else the transaction's end closes it)
        return
    cur = cast(_Batched, conn.execute(sql, params))
    while True:
        try:
            rows = cur.fetchmany(size)
        except database_errors() as exc:
            if "decode" not in str(exc).lower():
                raise
            raise _NeedsLenientText from exc
        if not rows:
            break
        yield rows


def _lenient_text(conn: Connection) -> None:
    """Decode text that is not UTF-8 with replacement characters from now on (SQLite only:
    PostgreSQL refuses to store such text)."""
    if isinstance(conn, SQLiteConnection):
        conn.raw.text_factory = lambda b: b.decode("utf-8", "replace")


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


def _export_slice(conn: Connection, period: Period, index: int, lo: float, hi: float,
                  csv_path: str, json_path: str,
                  progress: Callable[[int], None] | None = None, *,
                  final: bool = False, cluster: str | None = None) -> SliceResult:
    """Rows of one slice of end times [lo, hi) into two files, in one snapshot.

    ``final``: the slice is the whole period, so these are runs.csv (header included) and
    runs.jsonl themselves: hashed and fsynced here, nothing to merge afterwards.
    """
    params = {**_scope_params(period, cluster), "lo": lo, "hi": hi}
    fmt = RowFormatter(period)
    result = SliceResult(index)
    hashes = (hashlib.sha256(), hashlib.sha256()) if final else None
    sizes = [0, 0]
    sql = _SELECT + "WHERE " + _scope(params) + _SLICE + _order(conn.dialect)
    with _slice_reads(conn):
        with open(csv_path, "wb") as fc, open(json_path, "wb") as fj:
            outs = (fc, fj)

            def emit(i: int, data: bytes) -> None:
                if hashes is not None:
                    hashes[i].update(data)
                outs[i].write(data)
                sizes[i] += len(data)

            if final:
                emit(0, csv_header(EXPORT_COLUMNS).encode())
            for rows in read_batches(conn, sql, params, CHUNK_ROWS):
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


def _fingerprint(conn: Connection, params: dict[str, Any], *,
                 sliced: bool) -> tuple[Any, ...]:
    row = conn.execute(_FINGERPRINT + _scope(params) + (_SLICE if sliced else ""),
                       params).fetchone()
    # sums of whole micro-units stay exact as floats (below 2**53), in any order; inf stays inf
    return (int(row[0]), float(row[1]), float(row[2]),
            None if row[3] is None else float(row[3]))


def _export_slice_lenient(conn: Connection, period: Period, index: int, lo: float, hi: float,
                          csv_path: str, json_path: str,
                          progress: Callable[[int], None] | None = None, *,
                          final: bool = False, cluster: str | None = None) -> SliceResult:
    """``_export_slice``, again with lenient decoding when a text column is not UTF-8."""
    try:
        return _export_slice(conn, period, index, lo, hi, csv_path, json_path, progress,
                             final=final, cluster=cluster)
    except _NeedsLenientText:
        _lenient_text(conn)
        return _export_slice(conn, period, index, lo, hi, csv_path, json_path, progress,
                             final=final, cluster=cluster)


def _attach(conn: Connection, snapshot: str | None) -> None:
    """A worker's PostgreSQL connection: a transaction reading the parent's snapshot."""
    if snapshot is None:
        return
    if not _SNAPSHOT_ID.match(snapshot):  # SET TRANSACTION SNAPSHOT takes no parameter
        raise ExportError(f"unexpected snapshot id {snapshot!r}")
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")  # before any other statement
    conn.execute(f"SET LOCAL statement_timeout = '{PG_READ_TIMEOUT}'")


def _slice_task(task: tuple[Any, ...]) -> SliceResult:
    """Worker entry point (module level so a process pool can call it)."""
    target, snapshot, period, index, lo, hi, csv_path, json_path, cluster = task
    conn = open_reader(target).conn
    try:
        _attach(conn, snapshot)
        return _export_slice_lenient(conn, period, index, lo, hi, csv_path, json_path,
                                     cluster=cluster)
    finally:
        conn.close()  # a worker's transaction only read: closing ends it


# -- files -----------------------------------------------------------------------------------


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
    csv_lines = [csv_header(columns)]
    json_lines = []
    n = len(MEASURE_COLUMNS)
    for key, sums in rows:
        values = [period.label, *key, *sums[:n], mode, *sums[n:]]
        csv_lines.append(",".join(format_cell(c, v, as_json=False)
                                  for c, v in zip(columns, values, strict=True)) + "\n")
        json_lines.append("{" + ",".join(
            f'"{c.name}":{format_cell(c, v, as_json=True)}'
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


def _plan(conn: Connection, period: Period, jobs: int, cluster: str | None = None
          ) -> tuple[int, list[float]]:
    """(runs in scope, slice edges): equal-count slices of end times, the last unbounded."""
    params = _scope_params(period, cluster)
    total = int(conn.scalar("SELECT count(*) FROM runs WHERE " + _scope(params), params))
    edges: list[float] = [float(period.start_ts)]
    if jobs > 1 and total >= PARALLEL_MIN_RUNS:
        step = max(1, total // (jobs * SLICES_PER_JOB))
        for (end_ts,) in conn.execute(
                "SELECT end_ts FROM (SELECT end_ts, row_number() OVER (ORDER BY end_ts) AS n "
                "FROM runs WHERE end_ts >= :a AND end_ts < :b"
                + (_CLUSTER if cluster is not None else "") + ") AS numbered "
                "WHERE n % :step = 0 ORDER BY end_ts",
                {**params, "step": int(step)}).fetchall():
            if end_ts > edges[-1]:
                edges.append(float(end_ts))
    edges.append(_NO_END)
    return int(total), edges


def export_period(db_path: str | os.PathLike[str], period: Period,
                  out_dir: str | os.PathLike[str], *, mode: str = "chargeback",
                  currency: str = "$", jobs: int | None = None, parquet: bool | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  attempts: int = 3, cluster: str | None = None) -> ExportResult:
    """Export ``period`` from the ledger at ``db_path`` (a SQLite file or a postgresql://
    URL, as ``[daemon] database``) into ``out_dir/<label>/``: every cluster's runs, or with
    ``cluster`` that cluster's only, into ``out_dir/cluster=<name>/<label>/`` (so it never
    replaces the export of every cluster; the manifest's ``cluster_filter`` names it).

    ``jobs``: worker processes for large periods (default: CPUs, at most 8). ``parquet``:
    None writes Parquet when pyarrow imports. ``progress(done, total)`` is called as runs are
    written. Raises ExportError with a message for the admin.
    """
    if mode not in ("chargeback", "showback"):
        raise ExportError(f"mode must be chargeback or showback, not {mode!r}")
    out = Path(out_dir)
    if cluster is not None:
        _check_cluster(db_path, cluster)
        out = out / f"cluster={cluster}"
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
                                        jobs=jobs, parquet=with_parquet, progress=progress,
                                        cluster=cluster)
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


_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A cluster name that is safe as a folder name (Slurm's ClusterName is letters, digits,
'-' and '_')."""


def _check_cluster(db_path: str | os.PathLike[str], cluster: str) -> None:
    """ExportError unless ``cluster`` is a name the folders can carry and the ledger has
    runs or reservations of (a typo would otherwise export nothing, silently)."""
    from db.reports import unknown_cluster_message

    if not _CLUSTER_NAME.match(cluster):
        raise ExportError(f"--cluster {cluster!r}: a cluster name is letters, digits, '.', "
                          "'-' and '_' (at most 64)")
    store = open_reader(db_path)
    try:
        unknown = unknown_cluster_message(store, cluster)
    finally:
        store.close()
    if unknown is not None:
        raise ExportError(unknown)


def _run_slices(reader: _Reader, period: Period, tmp: Path, edges: list[float], jobs: int,
                progress: Callable[[int], None], cluster: str | None = None
                ) -> Iterator[SliceResult]:
    if len(edges) == 2:  # one slice, in this process, straight into the final files
        conn = reader.connection()
        yield _export_slice_lenient(conn, period, 0, edges[0], edges[1], str(tmp / "runs.csv"),
                                    str(tmp / "runs.jsonl"), progress, final=True,
                                    cluster=cluster)
        return
    snapshot = reader.before_workers()
    tasks = [(reader.target, snapshot, period, i, edges[i], edges[i + 1],
              str(tmp / f"part-{i:04d}.csv"), str(tmp / f"part-{i:04d}.jsonl"), cluster)
             for i in range(len(edges) - 1)]
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(min(jobs, len(tasks))) as pool:
        for result in pool.imap(_slice_task, tasks):
            progress(result.rows)
            yield result


class _Reader:
    """The export's connection to the ledger, and the snapshot it reads.

    SQLite: no connection may cross the fork into the worker processes, so it is closed
    before they start and opened again for the check after them; each slice is a read
    transaction of its own (``_slice_reads``). PostgreSQL: the connection holds one
    REPEATABLE READ READ ONLY transaction from the plan to the unsettled count, and the
    workers import its snapshot (pg_export_snapshot): the whole export is one snapshot. The
    connection stays open across the fork (a worker never uses it, and a pool's worker ends
    with os._exit, which sends nothing on it).
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.conn: Connection | None = open_reader(target).conn
        self.pg = self.conn.dialect == POSTGRESQL
        if self.pg:
            # every read of the export in one snapshot (see the class's docstring)
            _begin_pg_snapshot(self.conn)

    def connection(self) -> Connection:
        if self.conn is None:
            self.conn = open_reader(self.target).conn
        return self.conn

    def before_workers(self) -> str | None:
        """The snapshot the workers attach to (PostgreSQL), or None (SQLite: closed here)."""
        conn = self.connection()
        if self.pg:
            return str(conn.scalar("SELECT pg_export_snapshot()"))
        conn.close()
        self.conn = None
        return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()  # PostgreSQL: ends the read-only transaction
            self.conn = None


def _export_into(db_path: str, period: Period, tmp: Path, *, mode: str, currency: str,
                 jobs: int, parquet: bool, progress: Callable[[int, int], None] | None,
                 cluster: str | None = None) -> dict[str, Any]:
    reader = _Reader(db_path)
    try:
        return _export_reading(reader, period, tmp, mode=mode, currency=currency, jobs=jobs,
                               parquet=parquet, progress=progress, cluster=cluster)
    finally:
        reader.close()


def _export_reading(reader: _Reader, period: Period, tmp: Path, *, mode: str, currency: str,
                    jobs: int, parquet: bool, progress: Callable[[int, int], None] | None,
                    cluster: str | None = None) -> dict[str, Any]:
    total, edges = _plan(reader.connection(), period, jobs, cluster)
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
    for res in _run_slices(reader, period, tmp, edges, jobs, step, cluster):
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
    params = _scope_params(period, cluster)
    conn = reader.connection()
    with _slice_reads(conn):  # SQLite: the check and the count in one read transaction
        if parallel and tuple(fingerprint) != _fingerprint(conn, params, sliced=False):
            raise _Changed
        unsettled = int(conn.scalar(
            _UNSETTLED.format(_CLUSTER if cluster is not None else ""), params))
    reader.close()

    files: dict[str, FileInfo] = dict(single_files)
    if parallel:  # concatenate the parts in order; two threads (hashing releases the GIL)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            csv_job = pool.submit(_write_file, tmp / "runs.csv", _file_chunks(
                csv_parts, csv_header(EXPORT_COLUMNS).encode()), rows)
            json_job = pool.submit(_write_file, tmp / "runs.jsonl", _file_chunks(json_parts),
                                   rows)
            files["runs.csv"], files["runs.jsonl"] = csv_job.result(), json_job.result()
        for p in (*csv_parts, *json_parts):
            p.unlink()
    totals = [0] * len(SUM_COLUMNS)
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
                                                EXPORT_COLUMNS)
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
        "cluster_filter": cluster,
        "pro_rata": "runs crossing the period's edges are split by wall time; amounts in "
                    "cents per row, split so the pieces of a run add up to the run",
        "totals": {c.name: (v if c.kind == "int" else money(v) if c.kind == "money"
                            else micro(v)) for c, v in zip(SUM_COLUMNS, totals, strict=True)},
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
