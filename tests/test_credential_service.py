"""CredentialService end to end on SQLite and PostgreSQL with a local keyring."""

from __future__ import annotations

import logging
import pickle

import pytest
from sqlalchemy import select, text, update

from cuscred.db.models import AuditEvent, Credential
from cuscred.errors import (
    AuditWriteError,
    CredentialNotFoundError,
    CuscredTypeError,
    DecryptionError,
    EnvReferenceDisabledError,
    InvalidContextError,
    InvalidInputError,
    InvalidSecretError,
    InvalidTenantError,
    MalformedReferenceError,
    ScopeError,
)
from cuscred.factory import Runtime
from cuscred.services.credentials import CredentialService
from cuscred.services.sealing import TaskKeys

OPENAI = "sk-proj-" + "Ab3xQ9rT" * 20 + "Zz91"


@pytest.fixture
def service(runtime: Runtime) -> CredentialService:
    return runtime.credential_service(environ={"DEV_SECRET_OPENAI": "sk-env-value-123456"})


def _audit(runtime: Runtime) -> list[AuditEvent]:
    with runtime.sessions() as s:
        return list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq)))


def test_round_trip_and_audit(service: CredentialService, runtime: Runtime) -> None:
    ref = service.encrypt_credential("tenant-a", OPENAI, {"purpose": "chat"})
    assert ref.startswith("encrypted://cred_")
    assert service.decrypt_credential("tenant-a", ref, {"purpose": "chat"}) == OPENAI
    assert service.resolve_credential("tenant-a", ref, {"purpose": "chat"}) == OPENAI
    events = [(e.action, e.outcome, e.tenant_id) for e in _audit(runtime)]
    assert events == [
        ("encrypt", "success", "tenant-a"),
        ("decrypt", "success", "tenant-a"),
        ("resolve", "success", "tenant-a"),
    ]


def test_other_tenant_is_refused_and_audited_as_denied(
    service: CredentialService, runtime: Runtime
) -> None:
    ref = service.encrypt_credential("tenant-a", OPENAI)
    with pytest.raises(CredentialNotFoundError) as info:
        service.resolve_credential("tenant-b", ref)
    assert OPENAI not in str(info.value)
    last = _audit(runtime)[-1]
    assert (last.action, last.outcome, last.reason, last.tenant_id) == (
        "resolve", "denied", "cross_tenant", "tenant-b")
    # An id that exists nowhere gives the same error type: no existence oracle.
    with pytest.raises(CredentialNotFoundError):
        service.resolve_credential("tenant-b", "encrypted://cred_" + "0" * 26)
    assert _audit(runtime)[-1].reason == "not_found"


def test_wrong_context_fails_opaquely(service: CredentialService) -> None:
    ref = service.encrypt_credential("tenant-a", OPENAI, {"purpose": "chat"})
    with pytest.raises(DecryptionError):
        service.decrypt_credential("tenant-a", ref, {"purpose": "embeddings"})
    with pytest.raises(DecryptionError):
        service.decrypt_credential("tenant-a", ref)


def test_ciphertext_swapped_between_rows_and_tenants_fails(
    service: CredentialService, runtime: Runtime
) -> None:
    a1 = service.encrypt_credential("tenant-a", OPENAI)
    a2 = service.encrypt_credential("tenant-a", "sk-ant-api03-" + "k" * 90)
    b1 = service.encrypt_credential("tenant-b", "AIza" + "x" * 35)

    def blob(ref: str) -> bytes:
        with runtime.sessions() as s:
            return bytes(s.scalar(select(Credential.ciphertext).where(
                Credential.credential_id == ref.removeprefix("encrypted://"))) or b"")

    def put(ref: str, value: bytes) -> None:
        with runtime.sessions.begin() as s:
            s.execute(update(Credential).where(
                Credential.credential_id == ref.removeprefix("encrypted://")
            ).values(ciphertext=value))

    original_a2 = blob(a2)
    put(a2, blob(a1))  # same tenant, another row
    with pytest.raises(DecryptionError):
        service.decrypt_credential("tenant-a", a2)
    put(a2, blob(b1))  # another tenant's ciphertext
    with pytest.raises(DecryptionError):
        service.decrypt_credential("tenant-a", a2)
    put(a2, original_a2)
    assert service.decrypt_credential("tenant-a", a2).startswith("sk-ant-api03-")
    assert _audit(runtime)[-2].reason == "decrypt_failed"


def test_header_byte_flips_in_storage_fail(service: CredentialService, runtime: Runtime) -> None:
    ref = service.encrypt_credential("tenant-a", OPENAI)
    cid = ref.removeprefix("encrypted://")
    with runtime.sessions() as s:
        original = bytes(s.scalar(select(Credential.ciphertext).where(
            Credential.credential_id == cid)) or b"")
    for i in range(9):
        tampered = bytearray(original)
        tampered[i] ^= 0x01
        with runtime.sessions.begin() as s:
            s.execute(update(Credential).where(Credential.credential_id == cid)
                      .values(ciphertext=bytes(tampered)))
        with pytest.raises(DecryptionError):
            service.decrypt_credential("tenant-a", ref)


def test_rotate_keeps_reference_and_detects_no_change(
    service: CredentialService, runtime: Runtime
) -> None:
    ref = service.encrypt_credential("tenant-a", OPENAI)
    assert service.rotate_credential("tenant-a", ref, OPENAI) == (ref, False)
    new_value = "sk-proj-" + "N" * 100
    assert service.rotate_credential("tenant-a", ref, new_value) == (ref, True)
    assert service.resolve_credential("tenant-a", ref) == new_value
    info = service.describe_credential("tenant-a", ref)
    assert info.rotated_at is not None
    assert info.masked.endswith("NNNN")
    with pytest.raises(CredentialNotFoundError):
        service.rotate_credential("tenant-b", ref, "sk-proj-" + "Q" * 60)
    assert service.resolve_credential("tenant-a", ref) == new_value
    rotates = [e for e in _audit(runtime) if e.action == "rotate"]
    assert [(e.outcome, e.reason) for e in rotates] == [
        ("success", "unchanged"), ("success", None), ("denied", "cross_tenant")]


@pytest.mark.parametrize(
    ("tenant", "secret", "context", "error"),
    [
        ("", OPENAI, None, InvalidTenantError),
        ("a/b", OPENAI, None, InvalidTenantError),
        ("..", OPENAI, None, InvalidTenantError),
        (" a", OPENAI, None, InvalidTenantError),
        ("a\x00", OPENAI, None, InvalidTenantError),
        ("tenant-a", "", None, InvalidSecretError),
        ("tenant-a", "   ", None, InvalidSecretError),
        ("tenant-a", OPENAI + "\n", None, InvalidSecretError),
        ("tenant-a", " " + OPENAI, None, InvalidSecretError),
        ("tenant-a", "sk-\x00abc-def-ghi", None, InvalidSecretError),
        ("tenant-a", "x" * 20_000, None, InvalidSecretError),
        ("tenant-a", OPENAI, {"purpose": 5}, InvalidContextError),
        ("tenant-a", b"bytes-secret", None, CuscredTypeError),
        (5, OPENAI, None, CuscredTypeError),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    service: CredentialService, runtime: Runtime, tenant: object, secret: object,
    context: object, error: type[Exception],
) -> None:
    with pytest.raises(error) as info:
        service.encrypt_credential(tenant, secret, context)  # type: ignore[arg-type]
    if isinstance(secret, str) and len(secret.strip()) > 4:
        assert secret.strip() not in str(info.value)
    with runtime.sessions() as s:
        assert s.scalar(text("SELECT COUNT(*) FROM credentials")) == 0
    # A tenant id the service will not act on is a refusal (denied); a bad value is a failure.
    expected = "denied" if error is InvalidTenantError else "failure"
    assert _audit(runtime)[-1].outcome == expected


def test_strip_is_explicit(service: CredentialService) -> None:
    ref = service.encrypt_credential("tenant-a", f"  {OPENAI}\n", strip=True)
    assert service.resolve_credential("tenant-a", ref) == OPENAI


@pytest.mark.parametrize(
    ("ref", "error"),
    [
        ("vault://", MalformedReferenceError),
        ("vault://kv", MalformedReferenceError),
        ("vault:///x", MalformedReferenceError),
        ("vault://kv/tenants/a/../b/x#k", MalformedReferenceError),
        ("encrypted://not-an-id", MalformedReferenceError),
        ("env://lower", MalformedReferenceError),
        ("ftp://x", MalformedReferenceError),
        (" encrypted://cred_" + "0" * 26, MalformedReferenceError),
        ("vault://secret/tenants/tenant-b/openai#api_key", ScopeError),
        ("vault://other/tenants/tenant-a/openai#api_key", ScopeError),
        ("env://PATH", ScopeError),
        ("env://CUSCRED_DATABASE_URL", ScopeError),
    ],
)
def test_bad_references(
    service: CredentialService, runtime: Runtime, ref: str, error: type[Exception]
) -> None:
    service.encrypt_credential("tenant-a", OPENAI)  # make a KEK active for fingerprints
    with pytest.raises(error):
        service.resolve_credential("tenant-a", ref)
    last = _audit(runtime)[-1]
    assert last.outcome == "denied"  # malformed (traversal-shaped) or out of scope: refused
    assert last.credential_id is None
    assert last.ref_fingerprint is not None and ref not in last.ref_fingerprint


def test_env_reference_in_development_only(runtime: Runtime) -> None:
    environ = {"DEV_SECRET_OPENAI": "sk-env-value-123456"}
    dev = runtime.credential_service(environ=environ)
    assert dev.resolve_credential("tenant-a", "env://DEV_SECRET_OPENAI") == "sk-env-value-123456"
    with pytest.raises(CredentialNotFoundError):
        dev.resolve_credential("tenant-a", "env://DEV_SECRET_MISSING")
    from cuscred.services.credentials import CredentialService as Svc

    prod_settings = runtime.settings.model_copy(update={"env": "production"})
    prod = Svc(prod_settings, runtime.engine, runtime.keys, runtime.audit, environ=environ)
    with pytest.raises(EnvReferenceDisabledError):
        prod.resolve_credential("tenant-a", "env://DEV_SECRET_OPENAI")


def test_decrypt_refuses_non_encrypted_references(service: CredentialService) -> None:
    with pytest.raises(InvalidInputError):
        service.decrypt_credential("tenant-a", "env://DEV_SECRET_OPENAI")


def test_list_describe_delete_shred(service: CredentialService, runtime: Runtime) -> None:
    refs = [service.encrypt_credential("tenant-a", OPENAI[:-4] + f"{i:04d}") for i in range(5)]
    other = service.encrypt_credential("tenant-b", "AIza" + "y" * 35)
    listed = service.list_credentials("tenant-a")
    assert [i.reference for i in listed] == refs
    assert all(i.provider == "openai" and OPENAI[10:30] not in i.masked for i in listed)
    page = service.list_credentials("tenant-a", limit=2, after=listed[1].credential_id)
    assert [i.reference for i in page] == refs[2:4]
    service.delete_credential("tenant-a", refs[0])
    with pytest.raises(CredentialNotFoundError):
        service.resolve_credential("tenant-a", refs[0])
    with pytest.raises(CredentialNotFoundError):
        service.delete_credential("tenant-a", other)  # another tenant's: refused, untouched
    assert service.shred_tenant("tenant-a") == 4
    assert service.list_credentials("tenant-a") == []
    with pytest.raises(CredentialNotFoundError):
        service.resolve_credential("tenant-a", refs[1])
    assert service.resolve_credential("tenant-b", other).startswith("AIza")
    with runtime.sessions() as s:
        # The generation rows stay as tombstones with the salt wiped, so numbers never repeat.
        salts = s.execute(text("SELECT salt, state FROM tenant_keys WHERE tenant_id='tenant-a'"))
        assert [(bytes(salt), state) for salt, state in salts] == [(b"", "retired")]


def test_audit_failure_blocks_the_access(
    service: CredentialService, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = service.encrypt_credential("tenant-a", OPENAI)

    def broken(*_a: object, **_k: object) -> None:
        raise AuditWriteError("audit event not written: database error")

    monkeypatch.setattr(runtime.audit, "append", broken)
    with pytest.raises(AuditWriteError):
        service.resolve_credential("tenant-a", ref)
    with pytest.raises(AuditWriteError):
        service.encrypt_credential("tenant-a", OPENAI)
    monkeypatch.undo()
    assert len(service.list_credentials("tenant-a")) == 1  # the second encrypt rolled back


def test_nothing_secret_in_logs_reprs_or_pickles(
    service: CredentialService, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ref = service.encrypt_credential("tenant-a", OPENAI)
    service.resolve_credential("tenant-a", ref)
    with pytest.raises(CredentialNotFoundError):
        service.resolve_credential("tenant-b", ref)
    kek = runtime.keys.kek(1)
    key_hex = kek.material().hex()
    task_keys = TaskKeys(runtime.keys)  # a chunk's per-task key memo, holding one key
    with runtime.engine.connect() as conn:
        task_keys.tenant_key(conn, "tenant-a", 1, 1)
    objects = [service, runtime, runtime.keys, runtime.audit.keys, kek, task_keys,
               service.describe_credential("tenant-a", ref)]
    for obj in objects:
        assert OPENAI[8:20] not in repr(obj) and key_hex not in repr(obj)
    for holder in (runtime.keys, kek, runtime.audit.keys, task_keys):
        with pytest.raises(TypeError):
            pickle.dumps(holder)
    assert OPENAI[8:20] not in caplog.text
    assert key_hex not in caplog.text
