"""Migrations: `alembic upgrade head` builds the schema the models describe (`alembic check`
finds nothing), on SQLite and PostgreSQL, and the downgrade refuses to drop credentials."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from cuscred.db.migrate import alembic_config, current_and_head
from cuscred.factory import Runtime
from tests.conftest import Database

ROOT = Path(__file__).resolve().parents[1]


def test_database_is_at_head(database: Database) -> None:
    current, head = current_and_head(database.engine)
    assert current == head is not None


def test_alembic_check_reports_nothing(database: Database) -> None:
    # The real command line, as CI and operators run it.
    done = subprocess.run(
        [Path(sys.executable).with_name("alembic"), "check"], cwd=ROOT, capture_output=True,
        text=True, env={"CUSCRED_DATABASE_URL": database.url, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No new upgrade operations detected" in done.stdout + done.stderr


def test_downgrade_refuses_to_drop_credentials(database: Database, runtime: Runtime) -> None:
    runtime.credential_service().encrypt_credential("tenant-a", "sk-proj-" + "d" * 60)
    cfg = alembic_config()
    with database.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        with pytest.raises(RuntimeError, match="refusing to drop the credential store"):
            command.downgrade(cfg, "base")
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM credentials")).scalar_one() == 1
    assert current_and_head(database.engine)[0] == current_and_head(database.engine)[1]


def test_postgres_tail_function_exists(database: Database) -> None:
    if database.backend != "postgresql":
        pytest.skip("the locked-tail function is PostgreSQL only")
    with database.engine.connect() as conn:
        row = conn.execute(text("SELECT seq, mac FROM cuscred_audit_locked_tail(1)")).one()
    assert row.seq is None
