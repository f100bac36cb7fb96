"""Alembic environment: online migrations only, guarded against long locks and parallel runs.

On PostgreSQL every migration runs with a lock timeout (a migration waiting behind a long
transaction must fail, not queue every application query behind it) and under an advisory lock
(two `migrate` containers starting together must not both run it).
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, text

from cuscred.config import Settings
from cuscred.db.models import Base
from cuscred.db.session import make_engine

MIGRATION_LOCK_ID = 0x637573637265  # "cuscre"
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SET lock_timeout = '10s'"))
        connection.execute(text("SET statement_timeout = '10min'"))
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.commit()
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # Our SQLite engine issues BEGIN itself (cuscred.db.session), so DDL is transactional
        # there too: a failed migration run leaves the database as it was, on both backends.
        transactional_ddl=True,
    )
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
            connection.commit()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url") or Settings.from_env(
        os.environ
    ).database_url.get_secret_value()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
