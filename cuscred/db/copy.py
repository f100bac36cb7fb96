"""Copy every table of one cuscred database into another: SQLite to PostgreSQL, or back.

Values go through the tables' own column types and nothing is re-encoded: a ciphertext is
bound to its row (tenant, credential id, stored context), and each audit row's MAC covers its
columns down to the microsecond of its timestamp, so a byte-for-byte copy is exactly what keeps
every credential decryptable and the audit chain valid. Nothing is decrypted and no key is
needed for the copy itself.

Rules, each checked before a row is written:

* both schemas are at the newest migration, so the source reads as the models describe it;
* every table of the target is empty: a copy never merges into existing data;
* the source is read in one transaction, a consistent snapshot (SQLite's ``BEGIN IMMEDIATE``
  holds writers off until the copy ends; PostgreSQL reads at REPEATABLE READ);
* the target is written in one transaction, tables in foreign-key order, rows in primary-key
  order, in batches: a failure anywhere leaves the target as empty as it was;
* afterwards PostgreSQL's sequences of autoincrement keys are moved past the copied ids, or the
  next job or credential inserted would collide with a copied row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, Table, func, insert, literal, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from cuscred.db.migrate import current_and_head
from cuscred.db.models import Base
from cuscred.db.session import make_engine
from cuscred.errors import ConfigurationError, DatabaseCopyRefusedError

#: Parents before children, so every foreign key finds its row.
TABLES: tuple[Table, ...] = tuple(Base.metadata.sorted_tables)

#: Called with the target connection and the rows copied per table, before the commit.
BeforeCommit = Callable[[Connection, dict[str, int]], None]


def open_source(url: str) -> Engine:
    """An engine on the database to copy from, refusing (without repeating the URL, which may
    carry a password) one that is not a database URL, and a SQLite file that does not exist:
    opening it would create an empty database, and a typo would read as "not migrated"."""
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
            raise DatabaseCopyRefusedError("the source SQLite database file does not exist")
        return make_engine(url, hide_parameters=True)
    except (ArgumentError, ConfigurationError):
        raise DatabaseCopyRefusedError(
            "--from is not a usable database URL (expected sqlite:///PATH or "
            "postgresql://USER@HOST:PORT/DB)") from None


def copy_database(
    source: Engine, target: Engine, *, batch: int = 1000,
    before_commit: BeforeCommit | None = None,
) -> dict[str, int]:
    """Copy every table of ``source`` into the empty ``target``; return rows per table.

    Raises :class:`DatabaseCopyRefusedError` (nothing written) when a schema is not at head or
    the target holds any row; database errors roll the target back to empty.
    """
    if batch < 1:
        raise DatabaseCopyRefusedError("the batch size must be at least 1")
    require_head(source, "source")
    require_head(target, "target")
    with _snapshot(source) as src, target.begin() as dst:
        occupied = [t.name for t in TABLES if _has_rows(dst, t)]
        if occupied:
            raise DatabaseCopyRefusedError(
                f"the target database is not empty ({', '.join(occupied)} hold rows); copy "
                "into a freshly migrated database"
            )
        counts = {t.name: _copy_table(src, dst, t, batch) for t in TABLES}
        _advance_sequences(dst)
        if before_commit is not None:
            before_commit(dst, counts)
    return counts


def require_head(engine: Engine, which: str) -> None:
    """Refuse a database whose schema is not at the newest migration."""
    current, head = current_and_head(engine)
    if current != head:
        raise DatabaseCopyRefusedError(
            f"the {which} database schema is at revision {current or 'none'}, not {head}: run "
            f"`cuscred db upgrade` against it first"
        )


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            yield conn


def _has_rows(conn: Connection, table: Table) -> bool:
    return conn.execute(select(literal(1)).select_from(table).limit(1)).first() is not None


def _copy_table(src: Connection, dst: Connection, table: Table, batch: int) -> int:
    order = list(table.primary_key.columns)
    rows = src.execution_options(stream_results=True, yield_per=batch).execute(
        select(table).order_by(*order)
    )
    copied = 0
    for part in rows.mappings().partitions():
        dst.execute(insert(table), [dict(row) for row in part])
        copied += len(part)
    return copied


def _advance_sequences(dst: Connection) -> None:
    # SQLite gives an INTEGER PRIMARY KEY max(rowid) + 1 by itself; PostgreSQL's serial columns
    # draw from a sequence that explicit ids did not move.
    if dst.dialect.name != "postgresql":
        return
    for table in TABLES:
        column = table.autoincrement_column
        if column is None:
            continue
        following = func.coalesce(select(func.max(column)).scalar_subquery(), 0) + 1
        dst.execute(select(func.setval(
            func.pg_get_serial_sequence(table.name, column.name), following, False)))


__all__ = ["TABLES", "BeforeCommit", "copy_database", "open_source", "require_head"]
