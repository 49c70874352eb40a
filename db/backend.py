"""Where the ledger lives: a SQLite file on the controller, or a PostgreSQL server that every
controller (and every cluster) reaches.

Both are driven through ``Connection``: ``execute``/``executemany``/``query``/``scalar`` take
SQL with named parameters (``:name``) and a mapping, and ``transaction()`` is one write
transaction (nested: a savepoint). The SQL in db/ is written once, in the dialect both
servers share (``coalesce(sum(x), 0)``, ``CASE``, ``ON CONFLICT``, ``RETURNING``,
``IS NOT DISTINCT FROM``); ``connection.dialect`` names the server where a statement cannot
be shared (advisory locks, the catalog).

SQLite runs through the standard library's sqlite3, which reads ``:name`` itself: the hot
paths pay nothing for the second backend. PostgreSQL runs through psycopg 3; SQLAlchemy's
compiler turns ``:name`` into psycopg's ``%(name)s`` (and doubles a literal ``%``), once per
distinct statement. Positional parameters are refused on both, so a statement that would
run on one server only fails in every test.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

SQLITE = "sqlite"
POSTGRESQL = "postgresql"

PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgresql(target: str) -> bool:
    """Whether a ``[daemon] database`` value names a PostgreSQL server (a URL) rather than a
    SQLite file."""
    return target.startswith(PG_SCHEMES)


def redact(target: str) -> str:
    """A database target fit for a log line or an error: a URL's password is replaced."""
    if not is_postgresql(target):
        return target
    scheme, _, rest = target.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return target
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class Cursor(Protocol):
    """The part of a DB-API cursor the store reads (sqlite3's and psycopg's both are one)."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchmany(self, size: int = ...) -> list[Any]: ...

    def fetchall(self) -> list[Any]: ...


Params = Mapping[str, Any] | None


def _check(params: Params) -> Mapping[str, Any]:
    if type(params) is dict:
        return params
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise TypeError("SQL parameters are named (:name) and passed as a mapping, "
                        f"not {type(params).__name__}")
    return params


def _rows(cur: Cursor) -> list[dict[str, Any]]:
    if cur.description is None:
        return []
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


class Connection:
    """One connection to the ledger. Not shared between threads without a lock."""

    dialect: str
    target: str

    def execute(self, sql: str, params: Params = None) -> Cursor:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def executescript_statement(self, sql: str) -> None:
        """One DDL statement of a migration, as written (no parameters)."""
        raise NotImplementedError

    @property
    def in_transaction(self) -> bool:
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def query(self, sql: str, params: Params = None) -> list[dict[str, Any]]:
        """Rows of one statement as dicts."""
        return _rows(self.execute(sql, params))

    def scalar(self, sql: str, params: Params = None) -> Any:
        """The first column of the first row (None when there is no row)."""
        row = self.execute(sql, params).fetchone()
        return None if row is None else row[0]


class SQLiteConnection(Connection):
    """sqlite3 in autocommit mode: nothing is in a transaction unless ``transaction()``
    opened one (``BEGIN IMMEDIATE``: the write lock up front, so two writers never deadlock
    on an upgrade from a read lock)."""

    dialect = SQLITE

    def __init__(self, raw: sqlite3.Connection, target: str) -> None:
        raw.isolation_level = None
        self.raw = raw
        self.target = target
        self._depth = 0

    def execute(self, sql: str, params: Params = None) -> Cursor:
        return self.raw.execute(sql, _check(params))

    def executemany(self, sql: str, rows: Iterable[Mapping[str, Any]]) -> None:
        self.raw.executemany(sql, (_check(r) for r in rows))

    def executescript_statement(self, sql: str) -> None:
        """One DDL statement of a migration (no parameters)."""
        self.raw.execute(sql)

    @property
    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self.raw.in_transaction:
            self._depth += 1
            name = f"sg_{self._depth}"
            self.raw.execute(f"SAVEPOINT {name}")
            try:
                yield
            except BaseException:
                self.raw.execute(f"ROLLBACK TO {name}")
                self.raw.execute(f"RELEASE {name}")
                raise
            finally:
                self._depth -= 1
            self.raw.execute(f"RELEASE {name}")
            return
        self.raw.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.raw.in_transaction:
                self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    def close(self) -> None:
        self.raw.close()


@functools.lru_cache(maxsize=4096)
def _pg_sql(sql: str) -> str:
    """``:name`` SQL as psycopg's ``%(name)s`` SQL, by SQLAlchemy's compiler."""
    from sqlalchemy import text
    from sqlalchemy.dialects.postgresql import psycopg

    compiled = text(sql).compile(dialect=psycopg.dialect())
    return str(compiled)


class PostgresConnection(Connection):
    """psycopg 3 in autocommit mode; ``transaction()`` is psycopg's own (BEGIN, or a
    SAVEPOINT when nested)."""

    dialect = POSTGRESQL

    def __init__(self, raw: Any, target: str) -> None:
        self.raw = raw
        self.target = target

    def execute(self, sql: str, params: Params = None) -> Cursor:
        p = _check(params)
        return self.raw.execute(_pg_sql(sql), p)  # a mapping even when empty: %% -> %

    def executemany(self, sql: str, rows: Iterable[Mapping[str, Any]]) -> None:
        batch = list(rows)
        with self.raw.cursor() as cur:
            cur.executemany(_pg_sql(sql), [_check(r) for r in batch])

    def executescript_statement(self, sql: str) -> None:
        self.raw.execute(sql)

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return self.raw.transaction()

    def close(self) -> None:
        self.raw.close()


def driver_errors(kind: str = "Error") -> tuple[type[BaseException], ...]:
    """Each installed driver's DB-API exception class ``kind`` ("Error", "IntegrityError",
    "OperationalError"...), for ``except``: code outside this module imports no driver."""
    modules: list[Any] = [sqlite3]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        modules.append(psycopg)
    return tuple(getattr(m, kind) for m in modules)


def database_errors() -> tuple[type[BaseException], ...]:
    """The errors either server raises (locked, gone, refused, corrupt), for ``except``."""
    return driver_errors("Error")


def connect_postgresql(url: str, *, readonly: bool, connect_timeout: float = 5.0,
                       application_name: str = "slurmgate",
                       extra: Mapping[str, Any] | None = None) -> PostgresConnection:
    """A connection to the PostgreSQL ledger at ``url``. A reader's transactions are
    read-only on the server; every statement is bounded by ``statement_timeout`` so that a
    stuck server never stalls a decision past the fail-mode deadline."""
    try:
        import psycopg
    except ImportError as exc:
        raise RuntimeError("a postgresql:// database needs psycopg: pip install "
                           "'slurmgate[postgresql]'") from exc
    options = "-c statement_timeout=10000 -c lock_timeout=5000"
    if readonly:
        options += " -c default_transaction_read_only=on"
    raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout)),
                          options=options, application_name=application_name,
                          **dict(extra or {}))
    # sum() over BIGINT is NUMERIC on PostgreSQL: read it as a float, as SQLite's arithmetic
    # gives (the ledger stores no NUMERIC column; amounts are DOUBLE PRECISION on both)
    from psycopg.types.numeric import FloatLoader

    raw.adapters.register_loader("numeric", FloatLoader)
    return PostgresConnection(raw, url)


def split_in(name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """``(":name_0, :name_1, ...", {name_0: ..., ...})`` for ``IN (...)`` over a list."""
    keys = [f"{name}_{i}" for i in range(len(values))]
    return ", ".join(f":{k}" for k in keys), dict(zip(keys, values, strict=True))
