"""Regressions for defects a security review found (each test names its defect)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text, update

from cuscred.config import KdfName, Settings
from cuscred.db.models import AUDIT_EVENTS, CREDENTIALS
from cuscred.errors import (
    ConfigurationError,
    CredentialNotFoundError,
    DecryptionError,
    InvalidInputError,
    KekUnavailableError,
    KeyStateError,
    StorageError,
)
from cuscred.factory import Runtime, build_runtime
from cuscred.kek.local import LocalKeyring
from cuscred.services.audit_verify import verify_chain
from cuscred.services.credentials import _new_row
from tests.conftest import Database

SECRET = "sk-proj-" + "R3v13w" * 20


def _other_process(runtime: Runtime) -> Runtime:
    """A second runtime over the same database: another process's caches."""
    return build_runtime(runtime.settings, engine=runtime.engine)


def test_d1_shredded_tenant_that_returns_is_readable_everywhere(runtime: Runtime) -> None:
    a, b = runtime.credential_service(), _other_process(runtime).credential_service()
    old = a.encrypt_credential("tenant-a", SECRET)
    assert b.resolve_credential("tenant-a", old) == SECRET  # b caches generation 1's key
    a.shred_tenant("tenant-a")
    new = a.encrypt_credential("tenant-a", SECRET + "2")
    assert b.resolve_credential("tenant-a", new) == SECRET + "2"
    newer = b.encrypt_credential("tenant-a", SECRET + "3")
    assert a.resolve_credential("tenant-a", newer) == SECRET + "3"
    assert a.describe_credential("tenant-a", new).key_generation == 2


def test_d2_expect_head_catches_a_cut_tail_that_grew_again(runtime: Runtime) -> None:
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", SECRET)
    for _ in range(4):
        svc.resolve_credential("tenant-a", ref)
    with runtime.engine.connect() as conn:
        head = verify_chain(conn, runtime.audit.keys)
    with runtime.engine.begin() as conn:  # cut the last two rows ...
        conn.execute(AUDIT_EVENTS.delete().where(AUDIT_EVENTS.c.seq > head.head_seq - 2))
    for _ in range(3):  # ... and let ordinary traffic append past the old head
        svc.resolve_credential("tenant-a", ref)
    with runtime.engine.connect() as conn:
        assert verify_chain(conn, runtime.audit.keys).ok  # the chain alone cannot tell
        report = verify_chain(conn, runtime.audit.keys,
                              expect_head=(head.head_seq, head.head_mac))
        forged = verify_chain(conn, runtime.audit.keys, expect_head=(1, "deadbeef"))
    assert (report.ok, report.problem, report.problem_seq) == (False, "truncated", head.head_seq)
    assert not forged.ok


def test_d3_retire_cannot_race_a_write_under_the_old_version(runtime: Runtime) -> None:
    svc = runtime.credential_service()
    svc.encrypt_credential("tenant-a", SECRET)  # bootstrap v1
    admin = runtime.key_admin()
    outcome: list[object] = []

    def rotate_and_retire() -> None:
        try:
            version = admin.create_version()
            admin.promote(version)
            admin.retire(version - 1)
            outcome.append("retired")
        except KeyStateError as exc:
            outcome.append(exc)

    with runtime.engine.begin() as conn:
        key = svc._write_key(conn, "tenant-a")  # reads the active version (share-locked)
        assert key.kek_version == 1
        other = threading.Thread(target=rotate_and_retire)
        other.start()
        time.sleep(0.5)  # the promotion must now wait for this write
        conn.execute(CREDENTIALS.insert(), _new_row(key, SECRET, {}, "cred_" + "1" * 26))
        # The existing row was written before: move it so only the racing row is on v1.
        conn.execute(update(CREDENTIALS).where(CREDENTIALS.c.credential_id != "cred_" + "1" * 26)
                     .values(kek_version=1))
    other.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], KeyStateError), outcome
    assert svc.resolve_credential("tenant-a", "encrypted://cred_" + "1" * 26) == SECRET


def test_d4_database_down_is_a_typed_retryable_error(tmp_path: Path, keyring: LocalKeyring,
                                                     database: Database) -> None:
    if database.backend != "postgresql":
        pytest.skip("a server that is down: PostgreSQL")
    settings = Settings.from_env({
        "CUSCRED_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere",
        "CUSCRED_KEYRING_PATH": str(keyring.path),
    })
    svc = build_runtime(settings).credential_service()
    for call in (
        lambda: svc.resolve_credential("tenant-a", "encrypted://cred_" + "0" * 26),
        lambda: svc.describe_credential("tenant-a", "encrypted://cred_" + "0" * 26),
        lambda: svc.list_credentials("tenant-a"),
        lambda: svc.encrypt_credential("tenant-a", SECRET),
    ):
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.retryable


@pytest.mark.parametrize("value", ["text instead of bytes", 2**62, -1, 3.5, b""])
def test_d6_any_stored_ciphertext_type_is_a_decryption_error(runtime: Runtime,
                                                             value: object) -> None:
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", SECRET)
    cid = ref.removeprefix("encrypted://")
    with runtime.engine.begin() as conn:
        if runtime.engine.dialect.name == "sqlite":  # SQLite stores any type in any column
            conn.execute(text("UPDATE credentials SET ciphertext = :v WHERE credential_id = :c"),
                         {"v": value, "c": cid})
        else:
            conn.execute(update(CREDENTIALS).values(ciphertext=b"x" if value != b"" else b""))
    with pytest.raises(DecryptionError):
        svc.resolve_credential("tenant-a", ref)


def test_d6_damaged_context_is_listed_and_refused_to_decrypt(runtime: Runtime) -> None:
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", SECRET)
    with runtime.engine.begin() as conn:
        conn.execute(update(CREDENTIALS).values(context_json="not json"))
    assert svc.describe_credential("tenant-a", ref).context is None
    assert len(svc.list_credentials("tenant-a")) == 1
    # The caller's context is what authenticates a resolve; the stored copy only serves jobs
    # that re-seal rows without a caller, and for them a damaged copy is a failed row.
    assert svc.resolve_credential("tenant-a", ref) == SECRET
    report = runtime.job_control().verify(actor="t")
    assert report.failures == [(ref.removeprefix("encrypted://"), "decrypt_failed")]


@pytest.mark.parametrize("actor", [123, "x" * 200, "bad\nactor", object()])
def test_d7_bad_actor_is_a_typed_error_and_audited(runtime: Runtime, actor: object) -> None:
    svc = runtime.credential_service()
    svc.encrypt_credential("tenant-a", SECRET)
    with pytest.raises(InvalidInputError):
        svc.encrypt_credential("tenant-a", SECRET, actor=actor)  # type: ignore[arg-type]
    with runtime.engine.connect() as conn:
        row = conn.execute(text(
            "SELECT actor, outcome, reason FROM audit_events ORDER BY seq DESC LIMIT 1")).one()
    assert tuple(row) == ("<invalid actor>", "failure", "invalid_input")


def test_d8_promoting_an_unregistered_version_is_a_key_state_error(runtime: Runtime) -> None:
    runtime.credential_service().encrypt_credential("tenant-a", SECRET)
    runtime.keys.source.add_version()  # in the keyring, never registered
    with pytest.raises(KeyStateError, match="unregistered"):
        runtime.key_admin().promote(2)


def test_d9_replaced_keyring_is_named_not_reported_as_tampering(runtime: Runtime,
                                                                tmp_path: Path) -> None:
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", SECRET)
    path = Path(runtime.settings.keyring_path)
    path.unlink()
    LocalKeyring.create(path)  # someone "fixed" a lost keyring with a fresh one
    fresh = _other_process(runtime)
    with pytest.raises(KekUnavailableError, match="check value"):
        fresh.credential_service().resolve_credential("tenant-a", ref)
    with fresh.engine.connect() as conn:
        report = verify_chain(conn, fresh.audit.keys)
    assert (report.problem, report.problem_seq) == ("unverifiable", 1)
    assert "KEK version 1 is not the key recorded for it" in (report.detail or "")


def test_d11_tenant_with_trailing_newline_is_not_written_to_the_audit(runtime: Runtime) -> None:
    with pytest.raises(InvalidInputError):
        runtime.credential_service().encrypt_credential("tenant-a\n", SECRET)
    with runtime.engine.connect() as conn:
        tenant = conn.execute(text(
            "SELECT tenant_id FROM audit_events ORDER BY seq DESC LIMIT 1")).scalar()
    assert tenant is None


def test_d12_sqlite_files_are_private(tmp_path: Path) -> None:
    from cuscred.db.session import make_engine

    db = tmp_path / "new" / "cuscred.db"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x)"))
    engine.dispose()
    assert stat.S_IMODE(os.stat(db.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600


@pytest.mark.parametrize("version", [None, 0, -1, "2", True])
def test_d14_key_admin_validates_versions(runtime: Runtime, version: object) -> None:
    runtime.credential_service().encrypt_credential("tenant-a", SECRET)
    with pytest.raises(InvalidInputError):
        runtime.key_admin().promote(version)  # type: ignore[arg-type]


def test_d15_keyring_with_a_bad_version_name_is_a_configuration_error(tmp_path: Path) -> None:
    keyring = LocalKeyring.create(tmp_path / "k.json")
    doc = json.loads(keyring.path.read_text())
    doc["versions"]["x"] = doc["versions"]["1"]
    keyring.path.write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError, match="damaged"):
        keyring.latest_version()


@pytest.mark.parametrize("url", ["postgresql://u:pw@h:notaport/db", "nosuchdb://x", "::::"])
def test_d16_unusable_database_url_is_a_configuration_error(url: str) -> None:
    settings = Settings.from_env({"CUSCRED_DATABASE_URL": url})
    with pytest.raises(ConfigurationError) as info:
        build_runtime(settings)
    assert "pw" not in str(info.value)


def test_d17_database_and_broker_passwords_stay_out_of_dumps() -> None:
    settings = Settings.from_env({
        "CUSCRED_DATABASE_URL": "postgresql://u:hunter2pw@h/db",
        "CUSCRED_BROKER_URL": "redis://:brokerpw99@h:6379/0",
    })
    dumps = repr(settings) + str(settings) + str(settings.model_dump())
    dumps += settings.model_dump_json()
    assert "hunter2pw" not in dumps and "brokerpw99" not in dumps
    assert settings.broker_url_value() == "redis://:brokerpw99@h:6379/0"


def test_cross_tenant_describe_is_audited_as_denied(runtime: Runtime) -> None:
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", SECRET)
    with pytest.raises(CredentialNotFoundError):
        svc.describe_credential("tenant-b", ref)
    with runtime.engine.connect() as conn:
        row = conn.execute(text(
            "SELECT action, outcome, reason FROM audit_events ORDER BY seq DESC LIMIT 1")).one()
    assert tuple(row) == ("describe", "denied", "cross_tenant")


# --- second review (2026-12-04): each test names what the reviewer did -----------------------


@pytest.mark.parametrize("prefix", ["{tenant_id}/", "cus{tenant_id}/"])
def test_r2a_no_tenant_prefix_may_cover_the_kek(prefix: str) -> None:
    """'{tenant_id}/' and a tenant named 'cuscred' reached secret/cuscred/kek with the
    service's own token (so did 'cus{tenant_id}/' and a tenant 'cred'): such settings are
    refused, naming the fix."""
    with pytest.raises(ConfigurationError, match="KEK path"):
        Settings.from_env({"CUSCRED_VAULT_TENANT_PREFIX": prefix})
    # The same prefix is fine where the KEK does not live on a reference mount.
    Settings.from_env({"CUSCRED_VAULT_TENANT_PREFIX": prefix,
                       "CUSCRED_VAULT_REF_MOUNTS": "tenants"})


def test_r2a_a_reference_to_the_kek_path_is_refused_even_with_unchecked_settings() -> None:
    from cuscred.errors import ScopeError
    from cuscred.references import check_vault_scope, parse_reference

    # model_copy does not validate: the guard in check_vault_scope must hold on its own.
    settings = Settings.from_env({}).model_copy(
        update={"vault_tenant_prefix": "{tenant_id}/"})
    for ref in ("vault://secret/cuscred/kek#key", "vault://secret/cuscred/kek/x#key",
                "vault://secret/cuscred/kek?version=1#key"):
        with pytest.raises(ScopeError, match="reserved"):
            check_vault_scope(parse_reference(ref), "cuscred", settings)  # type: ignore[arg-type]
    check_vault_scope(parse_reference("vault://secret/cuscred/other#k"),  # type: ignore[arg-type]
                      "cuscred", settings)


def _wrong_keyring(path: Path) -> Path:
    """A keyring file whose version 1 is another key (a copy from another installation)."""
    wrong = path.with_name("wrong-keyring.json")
    LocalKeyring.create(wrong)
    return wrong


def test_r2b_a_wrong_key_for_the_active_version_is_refused_on_write(
    runtime: Runtime, keyring: LocalKeyring
) -> None:
    """With another key in the keyring under the active version's number, `put` used to
    succeed and seal credentials no one could read (and audit rows that never verify)."""
    from cuscred.errors import KekMismatchError

    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", SECRET)  # registers v1 with its check value
    wrong = _wrong_keyring(keyring.path)
    other = build_runtime(runtime.settings.model_copy(update={"keyring_path": wrong}),
                          engine=runtime.engine)
    before = _count(runtime, "credentials"), _count(runtime, "audit_events")
    with pytest.raises(KekMismatchError, match="check value differs"):
        other.credential_service().encrypt_credential("tenant-b", SECRET + "b")
    with pytest.raises(KekMismatchError):
        other.credential_service().resolve_credential("tenant-a", ref)
    assert _count(runtime, "credentials") == before[0]
    with runtime.engine.connect() as conn:
        report = verify_chain(conn, runtime.audit.keys)
    assert report.ok, report  # only the failed attempts were added, under the right key
    # And the wrong keyring's verify names the key, not tampering.
    with runtime.engine.connect() as conn:
        report = verify_chain(conn, other.audit.keys)
    assert (report.ok, report.problem, report.problem_seq) == (False, "unverifiable", 1)
    assert "not the key recorded" in (report.detail or "")


def _count(runtime: Runtime, table: str) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def test_r2c_a_str_subclass_tenant_or_actor_keeps_the_chain_verifiable(
    runtime: Runtime,
) -> None:
    """A str-valued Enum as tenant id was stored as 'acme' but MAC'd as 'Tenant.ACME'."""
    from enum import Enum

    class Tenant(str, Enum):  # noqa: UP042  (StrEnum prints its value: no bug to show)
        ACME = "acme"

    class Actor(str, Enum):  # noqa: UP042
        API = "admin-api"

    svc = runtime.credential_service()
    ref = svc.encrypt_credential(Tenant.ACME, SECRET, actor=Actor.API)  # type: ignore[arg-type]
    assert svc.resolve_credential(Tenant.ACME, ref) == SECRET  # type: ignore[arg-type]
    with runtime.engine.connect() as conn:
        assert verify_chain(conn, runtime.audit.keys).ok
        rows = conn.execute(text("SELECT DISTINCT tenant_id, actor FROM audit_events "
                                 "WHERE tenant_id IS NOT NULL")).all()
    assert {tuple(r) for r in rows} >= {("acme", "admin-api")}


def test_r2d_rows_of_a_tenant_without_an_active_generation_are_failed_not_skipped(
    runtime: Runtime,
) -> None:
    """A tenant_keys row edited to decrypt_only left that tenant's rows out of the job, which
    then reported 'completed, failed 0' with rows still on the old KEK."""
    from cuscred.db.models import TENANT_KEYS

    svc = runtime.credential_service()
    for i in range(3):
        svc.encrypt_credential("tenant-a", SECRET + str(i))
        svc.encrypt_credential("tenant-b", SECRET + str(i))
    with runtime.engine.begin() as conn:
        conn.execute(update(TENANT_KEYS).where(TENANT_KEYS.c.tenant_id == "tenant-b")
                     .values(state="decrypt_only"))
    job_id, _ = runtime.rotation().rotate_kek(requested_by="review")
    with runtime.engine.connect() as conn:
        job = conn.execute(text(f"SELECT status, total, done, skipped, failed FROM rotation_jobs "
                                f"WHERE id = {job_id}")).one()
        reasons = conn.execute(text("SELECT reason FROM rotation_failures")).scalars().all()
    assert tuple(job) == ("completed_with_errors", 6, 3, 0, 3)
    assert reasons == ["no_active_key_generation"] * 3
    with pytest.raises(KeyStateError, match="still used by 3"):
        runtime.key_admin().retire(1)


def test_r2d_a_stored_pbkdf2_count_out_of_range_is_refused_not_run(runtime: Runtime) -> None:
    """iterations=2,000,000,000 on a tenant_keys row made resolve hang (holding SQLite's
    write lock); such a row is damaged data: DecryptionError at once."""
    from cuscred.crypto.kdf import MAX_PBKDF2_ITERATIONS, KdfParams
    from cuscred.db.models import TENANT_KEYS

    with pytest.raises(InvalidInputError):
        KdfParams(KdfName.PBKDF2_SHA256, MAX_PBKDF2_ITERATIONS + 1)
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", SECRET)
    with runtime.engine.begin() as conn:
        conn.execute(update(TENANT_KEYS).values(kdf="pbkdf2-sha256", iterations=2_000_000_000))
    fresh = _other_process(runtime).credential_service()  # no cached key
    with pytest.raises(DecryptionError):  # refused before deriving (hours at that count)
        fresh.resolve_credential("tenant-a", ref)
    with pytest.raises(ConfigurationError):
        Settings.from_env({"CUSCRED_PBKDF2_ITERATIONS": str(MAX_PBKDF2_ITERATIONS + 1)})


def test_r2d_a_retired_kek_made_active_again_in_the_table_is_reported(
    runtime: Runtime,
) -> None:
    """Two UPDATEs revived retired v1 (new credentials sealed under it) and doctor said ok.
    The audit trail's kek_state events say what the states must be."""
    from cuscred.db.models import KEK_VERSIONS
    from cuscred.services.health import check_key_states

    runtime.credential_service().encrypt_credential("tenant-a", SECRET)
    runtime.rotation().rotate_kek(requested_by="review")
    runtime.key_admin().retire(1)
    assert check_key_states(runtime).ok
    with runtime.engine.begin() as conn:
        conn.execute(update(KEK_VERSIONS).where(KEK_VERSIONS.c.version == 2)
                     .values(state="decrypt_only"))
        conn.execute(update(KEK_VERSIONS).where(KEK_VERSIONS.c.version == 1)
                     .values(state="active"))
    check = check_key_states(runtime)
    assert not check.ok
    assert "v1: the table says active, the audit trail retired" in check.detail
    assert "v2: the table says decrypt_only, the audit trail active" in check.detail
