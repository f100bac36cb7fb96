"""Shared fixtures: real databases (SQLite and PostgreSQL), real OpenBao.

Every storage test takes a fixture built on ``database``, which is parametrised over both
backends, so it runs twice. Each backend is a fresh database migrated once per session with
``alembic upgrade head`` (PostgreSQL: a throw-away database in the local cluster, dropped at the
end); tables are emptied after each test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, text

from cuscred.config import Settings
from cuscred.db.migrate import upgrade_to_head
from cuscred.db.session import make_engine
from cuscred.factory import Runtime, build_runtime
from cuscred.kek.local import LocalKeyring

pytest_plugins = ["tests.vault_fixtures", "tests.worker_fixtures"]

PG_ADMIN_DSN = os.environ.get("CUSCRED_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
_TABLES_IN_DELETE_ORDER = ("audit_events", "credentials", "tenant_keys", "kek_versions")


@dataclass
class Database:
    backend: str
    url: str
    engine: Engine

    def clear(self) -> None:
        with self.engine.begin() as conn:
            for table in _extra_tables(conn) + list(_TABLES_IN_DELETE_ORDER):
                conn.execute(text(f"DELETE FROM {table}"))


def _extra_tables(conn: object) -> list[str]:
    """Tables added by later migrations that reference the core ones (deleted first)."""
    from cuscred.db.models import Base

    core = set(_TABLES_IN_DELETE_ORDER)
    return [t.name for t in reversed(Base.metadata.sorted_tables) if t.name not in core]


def _create_pg_database() -> tuple[str, str]:
    name = f"cuscred_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def _drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'cuscred.db'}"
    engine = make_engine(url, hide_parameters=True)
    upgrade_to_head(engine)
    yield Database("sqlite", url, engine)
    engine.dispose()


@pytest.fixture(scope="session")
def postgresql_database() -> Iterator[Database]:
    name, url = _create_pg_database()
    engine = make_engine(url, hide_parameters=True)
    upgrade_to_head(engine)
    yield Database("postgresql", url, engine)
    engine.dispose()
    _drop_pg_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[Database]:
    db: Database = request.getfixturevalue(f"{request.param}_database")
    db.clear()
    yield db
    db.clear()


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    return LocalKeyring.create(tmp_path / "keyring.json")


@pytest.fixture
def settings(database: Database, keyring: LocalKeyring) -> Settings:
    return Settings.from_env(
        {
            "CUSCRED_DATABASE_URL": database.url,
            "CUSCRED_KEYRING_PATH": str(keyring.path),
        }
    )


@pytest.fixture
def runtime(settings: Settings, database: Database) -> Runtime:
    return build_runtime(settings, engine=database.engine)
