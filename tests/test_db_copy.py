"""``cuscred db copy --from URL``, SQLite to PostgreSQL and PostgreSQL to SQLite: every table
byte for byte, in one target transaction; the copied audit chain and every ciphertext stay
valid; sequences go on after the copied ids. Refused, changing nothing: a target that is not
empty or not migrated, a source not at the newest revision, a missing SQLite file, and a copy
whose KEK versions the configured source cannot load (rolled back)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, func, select, text, update
from typer.testing import CliRunner

from cuscred.cli import app
from cuscred.config import Settings
from cuscred.db.copy import TABLES
from cuscred.db.migrate import alembic_config, upgrade_to_head
from cuscred.db.models import CREDENTIALS
from cuscred.db.session import make_engine
from cuscred.factory import build_runtime
from cuscred.kek.local import LocalKeyring
from tests.conftest import Database, _create_pg_database, _drop_pg_database
from tests.worker_fixtures import Seeded, assert_rows_readable, seed

SECRET_PASSWORD = "Pw-" + "q8Zr4" * 4


@pytest.fixture
def blank_other(database: Database, tmp_path: Path) -> Iterator[Database]:
    """A database with no schema, on the other backend than ``database`` (the target)."""
    if database.backend == "postgresql":
        url = f"sqlite:///{tmp_path / 'source.db'}"
        engine = make_engine(url)
        yield Database("sqlite", url, engine)
        engine.dispose()
        return
    name, url = _create_pg_database()
    engine = make_engine(url)
    yield Database("postgresql", url, engine)
    engine.dispose()
    _drop_pg_database(name)


@pytest.fixture
def source(blank_other: Database, keyring: LocalKeyring) -> tuple[Database, Seeded]:
    """A migrated source with rows in every table: a rotation that failed one row (rows in
    rotation_failures), a re-encryption that moved it once repaired, KEK v1 retired, and a
    crypto-shredded tenant (empty salts)."""
    upgrade_to_head(blank_other.engine)
    runtime = build_runtime(Settings(database_url=blank_other.url, keyring_path=keyring.path,
                                     chunk_size=64), engine=blank_other.engine)
    data = seed(runtime, 200, 12)
    c = CREDENTIALS.c
    with runtime.engine.begin() as conn:
        (pk_a, blob_a), (_, blob_b) = conn.execute(
            select(c.pk, c.ciphertext).order_by(c.pk).limit(2)).all()
        conn.execute(update(CREDENTIALS).where(c.pk == pk_a).values(ciphertext=blob_b))
    runtime.rotation().rotate_kek(requested_by="test")
    with runtime.engine.begin() as conn:
        conn.execute(update(CREDENTIALS).where(c.pk == pk_a).values(ciphertext=blob_a))
    runtime.rotation().reencrypt(requested_by="test")
    runtime.key_admin().retire(1)
    gone = max(t for t, _, _ in data.rows.values())
    runtime.credential_service().shred_tenant(gone)
    return blank_other, Seeded({k: v for k, v in data.rows.items() if v[0] != gone})


def _env(target: Database, keyring: LocalKeyring) -> dict[str, str]:
    return {"CUSCRED_DATABASE_URL": target.url, "CUSCRED_KEYRING_PATH": str(keyring.path)}


def _run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {t.name: [tuple(r) for r in conn.execute(
            select(t).order_by(*t.primary_key.columns)).all()] for t in TABLES}


def _row_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in TABLES}


def test_copy_is_byte_for_byte_and_the_target_verifies(
    database: Database, keyring: LocalKeyring, source: tuple[Database, Seeded],
) -> None:
    src, data = source
    env = _env(database, keyring)
    before = _rows(src.engine)
    assert all(before.values()), {t: len(r) for t, r in before.items()}  # every table has rows

    code, out, err = _run(env, "db", "copy", "--from", src.url, "--batch-size", "7", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tables"] == {t: len(r) for t, r in before.items()}
    after = _rows(database.engine)
    audit = after.pop("audit_events")
    assert {t: r for t, r in after.items()} == {t: r for t, r in before.items()
                                               if t != "audit_events"}
    assert audit[:-1] == before["audit_events"]  # then the copy's own event
    assert audit[-1][6:9] == ("db_copy", "success", f"from={src.backend} rows={report['rows']}")
    assert _rows(src.engine) == before  # the source is only read

    code, out, _ = _run(env, "audit", "verify", "--json")
    assert code == 0 and json.loads(out)["rows_checked"] == len(audit)
    code, out, _ = _run(env, "verify", "--json")
    assert code == 0 and json.loads(out)["checked"] == len(data)
    runtime = build_runtime(Settings.from_env(env), engine=database.engine)
    assert_rows_readable(runtime, data, kek_version=2)
    # Keys go on after the copied ones: a new credential, a new job, a new failure record.
    tenant, secret, context = next(iter(data.rows.values()))
    runtime.credential_service().encrypt_credential(tenant, secret + "x", context)
    job_id = runtime.rotation().reencrypt(requested_by="test")
    assert job_id == max(r[0] for r in before["rotation_jobs"]) + 1
    with database.engine.begin() as conn:
        conn.execute(text("INSERT INTO rotation_failures (job_id, chunk_no, credential_id, "
                          "reason, created_at) VALUES (:j, 1, 'cred_x', 'test', :ts)"),
                     {"j": job_id, "ts": before["rotation_failures"][0][5]})


def test_a_target_that_is_not_empty_is_refused(
    database: Database, keyring: LocalKeyring, source: tuple[Database, Seeded],
) -> None:
    src, _ = source
    env = _env(database, keyring)
    assert _run(env, "db", "copy", "--from", src.url)[0] == 0
    before = _rows(database.engine)
    code, _, err = _run(env, "db", "copy", "--from", src.url)
    assert code == 6 and "the target database is not empty" in err
    assert _rows(database.engine) == before


def test_a_source_behind_the_newest_migration_is_refused(
    database: Database, keyring: LocalKeyring, blank_other: Database,
) -> None:
    cfg = alembic_config()
    with blank_other.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    code, _, err = _run(_env(database, keyring), "db", "copy", "--from", blank_other.url)
    assert code == 6 and "source database schema is at revision 0003" in err
    assert set(_row_counts(database.engine).values()) == {0}


def test_a_target_without_the_schema_is_refused(
    keyring: LocalKeyring, source: tuple[Database, Seeded], tmp_path: Path,
) -> None:
    src, _ = source
    url = f"sqlite:///{tmp_path / 'new.db'}"
    code, _, err = _run({"CUSCRED_DATABASE_URL": url, "CUSCRED_KEYRING_PATH": str(keyring.path)},
                        "db", "copy", "--from", src.url)
    assert code == 6 and "target database schema is at revision none" in err


def test_a_missing_sqlite_file_is_refused_and_not_created(
    database: Database, keyring: LocalKeyring, tmp_path: Path,
) -> None:
    missing = tmp_path / "typo.db"
    code, _, err = _run(_env(database, keyring), "db", "copy", "--from", f"sqlite:///{missing}")
    assert code == 6 and "does not exist" in err and not missing.exists()
    code, _, err = _run(_env(database, keyring), "db", "copy", "--from", "not a url")
    assert code == 6 and "not a usable database URL" in err


def test_a_copy_the_configured_keys_cannot_read_is_rolled_back(
    database: Database, source: tuple[Database, Seeded], tmp_path: Path,
) -> None:
    src, _ = source
    other = LocalKeyring.create(tmp_path / "other.json")  # v1 and v2, but not these keys
    other.add_version()
    code, _, err = _run(_env(database, other), "db", "copy", "--from", src.url)
    assert code == 78 and "not the key recorded for that version" in err
    assert "the copy was rolled back" in err
    assert set(_row_counts(database.engine).values()) == {0}


def test_a_password_in_the_url_is_never_printed(
    database: Database, keyring: LocalKeyring,
) -> None:
    url = f"postgresql://nobody:{SECRET_PASSWORD}@127.0.0.1:1/none"
    code, out, err = _run(_env(database, keyring), "db", "copy", "--from", url)
    assert code == 69 and SECRET_PASSWORD not in out + err
