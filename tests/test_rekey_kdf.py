"""Choosing the KDF of new tenant key generations, on SQLite and PostgreSQL: ``rekey TENANT
--kdf/--iterations`` and ``rekey --all-with-kdf K --kdf K2`` (a new generation for every
tenant on K, then one reencrypt job). Bad input is refused with a clear error and changes
nothing; the generations are created in one transaction; every key-state change is audited."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from cuscred.cli import app
from cuscred.config import KdfName, Settings
from cuscred.crypto.kdf import KdfParams
from cuscred.datagen import generate
from cuscred.db.models import AUDIT_EVENTS, CREDENTIALS, ROTATION_JOBS, TENANT_KEYS
from cuscred.errors import InvalidInputError
from cuscred.factory import Runtime, build_runtime
from cuscred.kek.local import LocalKeyring
from cuscred.services.keys import KeyManager
from tests.conftest import Database

ITERATIONS = 100_000  # the minimum: keeps PBKDF2 derivations at ~20 ms


@pytest.fixture
def env(database: Database, keyring: LocalKeyring) -> dict[str, str]:
    return {"CUSCRED_DATABASE_URL": database.url, "CUSCRED_KEYRING_PATH": str(keyring.path),
            "CUSCRED_CHUNK_SIZE": "40", "CUSCRED_PBKDF2_ITERATIONS": str(ITERATIONS)}


def _runtime(env: dict[str, str], database: Database, **extra: str) -> Runtime:
    return build_runtime(Settings.from_env({**env, **extra}), engine=database.engine)


def _seed(env: dict[str, str], database: Database, *, pbkdf2_tenants: int,
          hkdf_tenants: int) -> dict[str, tuple[str, str, dict[str, str]]]:
    """Five credentials per tenant: ``p-*`` tenants on PBKDF2, ``h-*`` on HKDF."""
    stored: dict[str, tuple[str, str, dict[str, str]]] = {}
    for prefix, count, kdf in (("p", pbkdf2_tenants, "pbkdf2-sha256"),
                               ("h", hkdf_tenants, "hkdf-sha256")):
        if not count:
            continue
        secrets = [g.secret for g in generate(5 * count, 1, seed=count)]
        items = [(f"{prefix}-{i // 5:03d}", s, {"provider": "test"})
                 for i, s in enumerate(secrets)]
        refs = _runtime(env, database, CUSCRED_KDF=kdf).credential_service().import_credentials(
            items)
        stored.update(zip(refs, items, strict=True))
    return stored


def _active(runtime: Runtime) -> dict[str, tuple[int, str, int | None]]:
    t = TENANT_KEYS.c
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(t.tenant_id, t.generation, t.kdf, t.iterations)
                            .where(t.state == "active")).all()
    return {r.tenant_id: (r.generation, r.kdf, r.iterations) for r in rows}


def _all_resolve(runtime: Runtime, stored: dict[str, tuple[str, str, dict[str, str]]]) -> None:
    svc = runtime.credential_service()
    for ref, (tenant, secret, context) in stored.items():
        assert svc.resolve_credential(tenant, ref, context) == secret


def _snapshot(database: Database) -> dict[str, Any]:
    """Everything a re-key could change: generations, rows, jobs, the audit trail's length."""
    t, c = TENANT_KEYS.c, CREDENTIALS.c
    with database.engine.connect() as conn:
        return {
            "tenant_keys": conn.execute(select(t.tenant_id, t.generation, t.salt, t.kdf,
                                               t.iterations, t.state)
                                        .order_by(t.tenant_id, t.generation)).all(),
            "credentials": conn.execute(select(c.pk, c.ciphertext, c.key_generation,
                                               c.row_version).order_by(c.pk)).all(),
            "jobs": conn.execute(select(func.count()).select_from(ROTATION_JOBS)).scalar(),
            "audit": conn.execute(select(func.count()).select_from(AUDIT_EVENTS)).scalar(),
        }


def _invoke(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


@pytest.mark.parametrize(("args", "code", "says"), [
    (["p-000", "--kdf", "md5"], 2, "'md5' is not one of"),
    (["--all-with-kdf", "sha1", "--kdf", "hkdf-sha256"], 2, "is not one of"),
    (["p-000", "--all-with-kdf", "pbkdf2-sha256", "--kdf", "hkdf-sha256"], 2,
     "exactly one of TENANT and --all-with-kdf"),
    ([], 2, "exactly one of TENANT and --all-with-kdf"),
    (["--all-with-kdf", "pbkdf2-sha256"], 2, "--all-with-kdf needs --kdf"),
    (["p-000", "--kdf", "hkdf-sha256", "--iterations", "200000"], 6,
     "hkdf-sha256 takes no iteration count"),
    (["--all-with-kdf", "pbkdf2-sha256", "--kdf", "hkdf-sha256", "--iterations", "200000"], 6,
     "hkdf-sha256 takes no iteration count"),
    (["p-000", "--kdf", "pbkdf2-sha256", "--iterations", "99999"], 6,
     "100,000 to 100,000,000 iterations"),
    (["p-000", "--kdf", "pbkdf2-sha256", "--iterations", "2000000000"], 6,
     "100,000 to 100,000,000 iterations"),
    (["--all-with-kdf", "hkdf-sha256", "--kdf", "pbkdf2-sha256"], 6,
     "no tenant's active key generation uses hkdf-sha256"),
    (["no-such-tenant", "--kdf", "hkdf-sha256"], 6, "has no active key generation"),
])
def test_bad_input_is_refused_and_changes_nothing(
    env: dict[str, str], database: Database, args: list[str], code: int, says: str,
) -> None:
    _seed(env, database, pbkdf2_tenants=3, hkdf_tenants=0)
    before = _snapshot(database)
    got, output = _invoke(env, "rekey", *args)
    assert (got, says in output) == (code, True), output
    assert _snapshot(database) == before


def test_library_refusals_are_typed(env: dict[str, str], database: Database) -> None:
    runtime = _runtime(env, database)
    keys: KeyManager = runtime.keys
    with pytest.raises(InvalidInputError, match="unknown KDF"):
        keys.kdf_params("md5")
    with pytest.raises(InvalidInputError, match="no iteration count"):
        keys.kdf_params(KdfName.HKDF_SHA256, ITERATIONS)
    assert keys.kdf_params("pbkdf2-sha256") == KdfParams(KdfName.PBKDF2_SHA256, ITERATIONS)
    assert keys.kdf_params() == KdfParams(KdfName.HKDF_SHA256)  # the setting's default
    with pytest.raises(InvalidInputError, match="unknown KDF"):
        runtime.rotation().rekey_all_with_kdf("md5", KdfParams(KdfName.HKDF_SHA256),
                                              requested_by="t")


def test_pbkdf2_to_hkdf_and_back_leaves_every_credential_decryptable(
    env: dict[str, str], database: Database,
) -> None:
    stored = _seed(env, database, pbkdf2_tenants=6, hkdf_tenants=4)
    runtime = _runtime(env, database)
    service = runtime.rotation()
    job_id = service.rekey_all_with_kdf(KdfName.PBKDF2_SHA256, KdfParams(KdfName.HKDF_SHA256),
                                        requested_by="test")
    active = _active(runtime)
    assert {t: a for t, a in active.items() if t.startswith("p-")} == {
        f"p-{i:03d}": (2, "hkdf-sha256", None) for i in range(6)}
    assert {t: a for t, a in active.items() if t.startswith("h-")} == {
        f"h-{i:03d}": (1, "hkdf-sha256", None) for i in range(4)}  # untouched
    with runtime.engine.connect() as conn:
        job = conn.execute(select(ROTATION_JOBS).where(ROTATION_JOBS.c.id == job_id)).one()
        on_old = conn.execute(text(
            "SELECT COUNT(*) FROM credentials c JOIN tenant_keys k ON k.tenant_id = c.tenant_id "
            "AND k.generation = c.key_generation WHERE k.kdf = 'pbkdf2-sha256'")).scalar_one()
        audited = conn.execute(select(AUDIT_EVENTS.c.tenant_id, AUDIT_EVENTS.c.reason).where(
            AUDIT_EVENTS.c.action.in_(("tenant_rekey", "job_created")))).all()
    assert (job.kind, job.status, job.tenant_id, job.done, job.failed) == (
        "reencrypt", "completed", None, 30, 0)
    assert on_old == 0
    assert sorted(audited, key=str) == sorted(
        [(f"p-{i:03d}", f"job={job_id} gen=2 hkdf-sha256") for i in range(6)]
        + [(None, f"job={job_id}")], key=str)
    _all_resolve(runtime, stored)

    back = service.rekey_all_with_kdf("hkdf-sha256", runtime.keys.kdf_params("pbkdf2-sha256"),
                                      requested_by="test")
    assert set(_active(runtime).values()) >= {(3, "pbkdf2-sha256", ITERATIONS)}
    assert {kdf for _, kdf, _ in _active(runtime).values()} == {"pbkdf2-sha256"}
    with runtime.engine.connect() as conn:
        done = conn.execute(select(ROTATION_JOBS.c.done).where(
            ROTATION_JOBS.c.id == back)).scalar_one()
    assert done == 50
    runtime.keys.clear_caches()  # derive every key afresh from the stored salts and KDFs
    _all_resolve(runtime, stored)


def test_one_tenant_gets_the_kdf_and_iterations_asked_for(
    env: dict[str, str], database: Database,
) -> None:
    stored = _seed(env, database, pbkdf2_tenants=0, hkdf_tenants=2)
    code, output = _invoke(env, "rekey", "h-001", "--kdf", "pbkdf2-sha256",
                           "--iterations", "150000", "--wait")
    assert code == 0, output
    runtime = _runtime(env, database)
    assert _active(runtime) == {"h-000": (1, "hkdf-sha256", None),
                                "h-001": (2, "pbkdf2-sha256", 150_000)}
    with runtime.engine.connect() as conn:
        reason = conn.execute(select(AUDIT_EVENTS.c.reason).where(
            AUDIT_EVENTS.c.action == "tenant_rekey")).scalar_one()
    assert reason.endswith("gen=2 pbkdf2-sha256:150000")
    _all_resolve(runtime, stored)


def test_a_failure_part_way_creates_no_generation_and_no_job(
    env: dict[str, str], database: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _seed(env, database, pbkdf2_tenants=4, hkdf_tenants=0)
    before = _snapshot(database)
    runtime = _runtime(env, database)
    real = KeyManager.add_generation
    calls: list[str] = []

    def add_generation(self: KeyManager, conn: Any, tenant_id: str,
                       kdf: KdfParams | None = None) -> int:
        calls.append(tenant_id)
        if len(calls) == 3:
            raise RuntimeError("the database went away")
        return real(self, conn, tenant_id, kdf)

    monkeypatch.setattr(KeyManager, "add_generation", add_generation)
    with pytest.raises(RuntimeError):
        runtime.rotation().rekey_all_with_kdf("pbkdf2-sha256", KdfParams(KdfName.HKDF_SHA256),
                                              requested_by="test")
    assert calls == ["p-000", "p-001", "p-002"]
    assert _snapshot(database) == before


def test_keys_status_shows_each_generations_kdf(env: dict[str, str],
                                                database: Database) -> None:
    _seed(env, database, pbkdf2_tenants=1, hkdf_tenants=1)
    code, output = _invoke(env, "rekey", "--all-with-kdf", "pbkdf2-sha256", "--kdf",
                           "hkdf-sha256")
    assert code == 0, output
    code, output = _invoke(env, "keys", "status", "--tenants")
    lines = [" ".join(line.replace("│", " ").split()) for line in output.splitlines()]
    assert "p-000 1 decrypt_only pbkdf2-sha256 0" in lines
    assert "p-000 2 active hkdf-sha256 5" in lines
    assert "h-000 1 active hkdf-sha256 5" in lines
