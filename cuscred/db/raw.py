"""Core statements compiled once and run straight on the DB-API cursor: the resolve hot path.

``resolve_credential`` runs before every LLM call, so its cost matters. On this machine a cached
Core ``Connection.execute`` costs ~48 us against ~10 us for the same statement on the raw
cursor, and the resolve transaction has four statements (bench/resolve.py). The SQL is still
written once, as SQLAlchemy Core, and compiled per dialect on first use; values go through the
column types' own bind processors, so what is stored is identical to the Core path.

:class:`RawConnection` offers the small part of ``Connection`` the hot path needs (``dialect``
and ``execute(statement, params)`` returning ``first()/all()/scalar()``), so the key manager and
the audit log accept either. Driver errors are raised as SQLAlchemy's ``DBAPIError`` subclasses
with parameters hidden, exactly as the Core path raises them.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

from sqlalchemy import Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class Executor(Protocol):
    """What both ``sqlalchemy.Connection`` and :class:`RawConnection` provide."""

    @property
    def dialect(self) -> Dialect: ...

    def execute(self, statement: Any, parameters: Any = None) -> Any: ...


@dataclass(frozen=True, slots=True)
class _Compiled:
    statement: ClauseElement  # kept alive so its id() stays unique in the cache
    sql: str
    positional: tuple[str, ...] | None
    processors: dict[str, Callable[[Any], Any]]
    #: Values of binds the statement carries itself (LIMIT 1, literal()).
    defaults: dict[str, Any]


class RawResult:
    """The rows of one statement, with the few accessors the hot path uses."""

    def __init__(self, rows: list[tuple[Any, ...]], names: tuple[str, ...]) -> None:
        row_type = _row_type(names)
        self._rows = [row_type(*r) for r in rows]

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def all(self) -> list[Any]:
        return self._rows

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None


_ROW_TYPES: dict[tuple[str, ...], type] = {}


def _row_type(names: tuple[str, ...]) -> type:
    row_type = _ROW_TYPES.get(names)
    if row_type is None:
        row_type = _ROW_TYPES[names] = namedtuple("RawRow", names, rename=True)
    return row_type


class RawConnection:
    """A DB-API connection whose transaction is managed by the caller."""

    _cache: ClassVar[dict[tuple[int, str, tuple[str, ...]], _Compiled]] = {}
    #: Result column names by SQL text (empty for a statement that returns no rows).
    _result_names: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, dbapi_connection: Any, dialect: Dialect) -> None:
        self._dbapi = dbapi_connection
        self._dialect = dialect

    @property
    def dialect(self) -> Dialect:
        return self._dialect

    def execute(
        self,
        statement: ClauseElement,
        parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> RawResult:
        """Run ``statement`` (a list of parameter mappings runs it once per mapping)."""
        # A dict is the hot path's case: tested first, without the ABC checks below.
        many = not isinstance(parameters, dict) and (
            isinstance(parameters, Sequence) and not isinstance(parameters, Mapping))
        rows_in = cast(
            Sequence[Mapping[str, Any]], parameters if many else [parameters or {}]
        )
        compiled = self._compiled(statement, tuple(rows_in[0]) if rows_in else ())
        cursor = self._dbapi.cursor()
        try:
            if many:
                cursor.executemany(compiled.sql, [self._args(compiled, row) for row in rows_in])
                return RawResult([], ())
            cursor.execute(compiled.sql, self._args(compiled, rows_in[0]))
            names = self._result_names.get(compiled.sql)
            if names is None:
                # Asked once per statement: psycopg builds a Column object per column each
                # time ``description`` is read (~15 us for the credential row).
                described = cursor.description
                names = self._result_names[compiled.sql] = (
                    () if described is None else tuple(d[0] for d in described))
            if not names:
                return RawResult([], ())
            return RawResult(cursor.fetchall(), names)
        except self._dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(
                compiled.sql, None, exc, self._dialect.loaded_dbapi.Error, hide_parameters=True,
                dialect=self._dialect, ismulti=many,
            ) from None
        finally:
            cursor.close()

    def _compiled(self, statement: ClauseElement, keys: tuple[str, ...]) -> _Compiled:
        cache_key = (id(statement), self._dialect.name, keys)
        hit = self._cache.get(cache_key)
        if hit is not None and hit.statement is statement:
            return hit
        compiled = cast(
            SQLCompiler,
            statement.compile(dialect=self._dialect, column_keys=list(keys) or None),
        )
        processors: dict[str, Callable[[Any], Any]] = {}
        defaults: dict[str, Any] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.bind_processor(self._dialect)
            if processor is not None:
                processors[name] = processor
            if not bind.required and bind.callable is None:
                defaults[name] = bind.value
        positional = tuple(compiled.positiontup) if compiled.positiontup is not None else None
        entry = _Compiled(statement, compiled.string, positional, processors, defaults)
        self._cache[cache_key] = entry
        return entry

    @staticmethod
    def _args(compiled: _Compiled, values: Mapping[str, Any]) -> Any:
        if compiled.defaults:
            values = {**compiled.defaults, **values}
        if compiled.processors:
            # Few binds have a processor (timestamps): convert those, copy the rest as they are.
            values = dict(values)
            for name, processor in compiled.processors.items():
                if name in values:
                    values[name] = processor(values[name])
        if compiled.positional is None:
            return values
        return tuple([values[name] for name in compiled.positional])


@contextmanager
def raw_transaction(engine: Engine) -> Iterator[RawConnection]:
    """A pooled connection in one transaction: committed on success, rolled back otherwise.

    On SQLite the transaction starts with ``BEGIN IMMEDIATE``, as on the Core path
    (:mod:`cuscred.db.session`). A connection the driver reports as disconnected is discarded
    from the pool instead of being handed out again.
    """
    dialect = engine.dialect
    try:
        fairy = engine.raw_connection()
    except dialect.loaded_dbapi.Error as exc:  # checkout itself failed: the server is gone
        raise DBAPIError.instance(
            "connect", None, exc, dialect.loaded_dbapi.Error, hide_parameters=True,
            dialect=dialect,
        ) from None
    dbapi: Any = fairy.dbapi_connection
    try:
        if dialect.name == "sqlite":
            _driver_call(dialect, "BEGIN IMMEDIATE", lambda: dbapi.execute("BEGIN IMMEDIATE"))
        yield RawConnection(dbapi, dialect)
        _driver_call(dialect, "COMMIT", fairy.commit)
    except BaseException as exc:
        _rollback_or_invalidate(fairy, engine.dialect, exc)
        raise
    finally:
        fairy.close()


def _driver_call(dialect: Dialect, what: str, call: Callable[[], object]) -> None:
    try:
        call()
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(
            what, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect
        ) from None


def _rollback_or_invalidate(fairy: Any, dialect: Dialect, exc: BaseException) -> None:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, dialect.loaded_dbapi.Error) and dialect.is_disconnect(
        orig, fairy.dbapi_connection, None
    ):
        fairy.invalidate(orig)
        return
    try:
        fairy.rollback()
    except dialect.loaded_dbapi.Error as rollback_exc:
        fairy.invalidate(rollback_exc)


__all__ = ["Executor", "RawConnection", "RawResult", "raw_transaction"]
