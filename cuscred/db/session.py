"""Engines and sessions for SQLite (embedded default) and PostgreSQL (production).

SQLite is set up so that concurrent writers serialise instead of forking state: WAL journal,
foreign keys on, a busy timeout, and ``BEGIN IMMEDIATE`` for every transaction (pysqlite's own
deferred BEGIN would let two connections read the same audit-chain tail and race to extend it).
This is SQLAlchemy's documented recipe for taking over pysqlite's transaction handling.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from cuscred.errors import ConfigurationError

SQLITE_BUSY_TIMEOUT_MS = 30_000
IDLE_PING_AFTER_S = 10.0


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``database_url`` with the settings cuscred relies on.

    Raises :class:`~cuscred.errors.ConfigurationError` for a URL that cannot be used, without
    repeating it (it may carry a password).
    """
    try:
        return _make_engine(database_url, **kwargs)
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise ConfigurationError(
            "CUSCRED_DATABASE_URL is not a usable database URL "
            "(expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB)"
        ) from None


def _make_engine(database_url: str, **kwargs: Any) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(database_url, **kwargs)
    if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
        # psycopg 3 is the one PostgreSQL driver we pin.
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url, **kwargs)
    _ping_connections_that_sat_idle(engine)  # a server can go away; a SQLite file cannot
    return engine


def _ping_connections_that_sat_idle(engine: Engine) -> None:
    """Check a pooled connection before use only if it sat idle for a while.

    ``pool_pre_ping`` would add a round trip to every call (~150 us on the resolve path); a
    connection used moments ago is almost always alive, and if the server restarted meanwhile
    the call fails with a retryable StorageError and the pool drops every stale connection.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is not None and time.monotonic() - since > IDLE_PING_AFTER_S:
            try:
                engine.dialect.do_ping(dbapi_conn)
            except Exception as exc:
                # Tells the pool to discard this connection and hand out a fresh one.
                raise DisconnectionError() from exc


def sqlite_text(value: bytes) -> str:
    """SQLite's ``text_factory`` for every cuscred connection.

    A TEXT value that is not UTF-8 can only come from outside cuscred (a database edited by
    hand: ``||`` makes TEXT even of blobs). The default factory fails the whole read with an
    ``OperationalError``, which looks like an outage and stops a job; decoded losslessly
    instead, the one damaged row is refused as such (``DecryptionError``, recorded by a job,
    named by ``verify``) and the rest carry on.
    """
    return value.decode("utf-8", "surrogateescape")


def _sqlite_engine(database_url: str, **kwargs: Any) -> Engine:
    url = make_url(database_url)
    if url.database and url.database != ":memory:":
        _private_file(Path(url.database))
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        dbapi_conn.text_factory = sqlite_text
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _private_file(path: Path) -> None:
    """Create the database file (and its directory) readable by the owner only.

    The file holds ciphertexts, salts and the audit trail: nothing readable without the KEK,
    but no reason to share it. SQLite creates its -wal and -shm files with the database
    file's permissions, so those follow.
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


__all__ = ["make_engine", "make_session_factory"]
