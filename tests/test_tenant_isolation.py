"""Tenant isolation, attacked case by case: every way tenant A might reach tenant B's secret, or
the service's own settings, is refused with a typed error, sends no request to Vault, and is
written to the audit trail as a denied attempt (with nothing of the reference in clear)."""

from __future__ import annotations

import uuid
from typing import Any

import hvac
import pytest
from sqlalchemy import text

from cuscred.errors import (
    AuditWriteError,
    CredentialNotFoundError,
    CuscredError,
    InvalidInputError,
    InvalidTenantError,
    MalformedReferenceError,
    ScopeError,
)
from cuscred.factory import Runtime, build_runtime
from cuscred.services.audit import AuditRecord
from tests.conftest import Database
from tests.vault_fixtures import vault_settings
from tests.vault_server import OpenBaoServer

B_SECRET = "sk-proj-" + "Bb7tenantBsecret" * 3

# (name, tenant, reference, expected error). Tenant "a" attacks; "ab" is a tenant whose id has
# "a" as a string prefix; the template is the default "tenants/{tenant_id}/".
_ATTACKS: list[tuple[str, str, str, type[CuscredError]]] = [
    ("other tenant's path", "a", "vault://secret/tenants/ab/openai#api_key", ScopeError),
    ("dot-dot", "a", "vault://secret/tenants/a/../ab/openai#api_key", MalformedReferenceError),
    ("dot", "a", "vault://secret/tenants/./ab/openai#api_key", MalformedReferenceError),
    ("dot segment inside", "a", "vault://secret/tenants/a/./openai#api_key",
     MalformedReferenceError),
    ("doubled slash", "a", "vault://secret/tenants//ab/openai#api_key", MalformedReferenceError),
    ("trailing slash", "a", "vault://secret/tenants/a/#api_key", MalformedReferenceError),
    ("percent-encoded dot-dot", "a", "vault://secret/tenants/a/%2e%2e/ab/openai#api_key",
     MalformedReferenceError),
    ("double percent-encoding", "a", "vault://secret/tenants/a/%252e%252e/ab/openai#api_key",
     MalformedReferenceError),
    ("encoded slash", "a", "vault://secret/tenants/a%2fab/openai#api_key",
     MalformedReferenceError),
    ("two-dot leader U+2025", "a", "vault://secret/tenants/a/\u2025/ab/openai#api_key",
     MalformedReferenceError),
    ("fullwidth dots", "a", "vault://secret/tenants/a/\uff0e\uff0e/ab/openai#api_key",
     MalformedReferenceError),
    ("fullwidth solidus", "a", "vault://secret/tenants/a\uff0fab/openai#api_key",
     MalformedReferenceError),
    ("Cyrillic a look-alike", "a", "vault://secret/tenants/\u0430b/openai#api_key",
     MalformedReferenceError),
    ("NFD-decomposed id", "a", "vault://secret/tenants/a\u0301/openai#api_key",
     MalformedReferenceError),
    ("string-prefix tenant", "a", "vault://secret/tenants/ab#api_key", ScopeError),
    ("prefix without separator", "a", "vault://secret/tenantsab/openai#api_key", ScopeError),
    ("another mount", "a", "vault://sys/tenants/a/openai#api_key", ScopeError),
    ("KEK mount and path", "a", "vault://secret/cuscred/kek#key", ScopeError),
    ("backslash", "a", "vault://secret/tenants/a\\..\\ab/openai#api_key", MalformedReferenceError),
    ("env: database URL", "a", "env://CUSCRED_DATABASE_URL", ScopeError),
    ("env: Vault token", "a", "env://CUSCRED_VAULT_TOKEN", ScopeError),
    ("env: keyring path", "a", "env://CUSCRED_KEYRING_PATH", ScopeError),
    ("env: process", "a", "env://PATH", ScopeError),
]

_BAD_TENANTS = ["a/b", "..", "a/../b", "{tenant_id}", "a b", " a", "a\n", "a\x00", "a\t", "",
                "\u0430", "a{b}"]


@pytest.fixture
def attacked(
    openbao: OpenBaoServer, database: Database, monkeypatch: pytest.MonkeyPatch
) -> tuple[Runtime, str]:
    """A runtime on Vault; tenant "ab" has a secret in Vault and in the database."""
    runtime = build_runtime(vault_settings(openbao, database_url=database.url,
                                           vault_kek_path=f"cuscred/kek-{uuid.uuid4().hex}"),
                            engine=database.engine)
    runtime.key_admin().create_version()
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    client.secrets.kv.v2.create_or_update_secret(
        "tenants/ab/openai", secret={"api_key": B_SECRET}, mount_point="secret")
    for name in ("CUSCRED_DATABASE_URL", "CUSCRED_VAULT_TOKEN", "CUSCRED_KEYRING_PATH"):
        monkeypatch.setenv(name, "value-of-" + name)
    ref = runtime.credential_service().encrypt_credential("ab", B_SECRET)
    return runtime, ref


def _last_audit(runtime: Runtime) -> Any:
    with runtime.engine.connect() as conn:
        return conn.execute(text(
            "SELECT action, outcome, tenant_id, credential_id, ref_fingerprint, reason "
            "FROM audit_events ORDER BY seq DESC LIMIT 1")).one()


def _vault_requests(server: OpenBaoServer) -> int:
    return sum(1 for e in server.audit_entries() if e.get("type") == "request")


@pytest.mark.parametrize(("name", "tenant", "reference", "error"), _ATTACKS,
                         ids=[a[0] for a in _ATTACKS])
def test_reference_attacks_are_refused_and_audited_as_denied(
    attacked: tuple[Runtime, str], openbao: OpenBaoServer,
    name: str, tenant: str, reference: str, error: type[CuscredError],
) -> None:
    runtime, _ = attacked
    svc = runtime.credential_service()
    requests_before = _vault_requests(openbao)
    with pytest.raises(error) as info:
        svc.resolve_credential(tenant, reference)
    assert B_SECRET not in str(info.value) and "value-of-" not in str(info.value)
    assert "tenants/ab" not in str(info.value)  # tenant path segments are not echoed
    # Refused before any request was sent to Vault.
    assert _vault_requests(openbao) == requests_before
    row = _last_audit(runtime)
    assert (row.action, row.outcome, row.tenant_id) == ("resolve", "denied", tenant), row
    assert row.credential_id is None and reference not in str(tuple(row))
    assert row.ref_fingerprint is None or len(row.ref_fingerprint) == 32


def test_another_tenants_credential_id_is_not_found_and_audited_as_denied(
    attacked: tuple[Runtime, str],
) -> None:
    runtime, ref_b = attacked
    svc = runtime.credential_service()
    for call in (svc.resolve_credential, svc.decrypt_credential, svc.describe_credential):
        with pytest.raises(CredentialNotFoundError) as info:
            call("a", ref_b)
        # The same answer as for an id that does not exist: "a" learns nothing of "ab".
        assert str(info.value) == f"no credential {ref_b.removeprefix('encrypted://')} " \
                                  "for this tenant"
        row = _last_audit(runtime)
        assert (row.outcome, row.tenant_id, row.reason) == ("denied", "a", "cross_tenant")
    with pytest.raises(CredentialNotFoundError):
        svc.rotate_credential("a", ref_b, "sk-proj-" + "attackerValue1" * 3)
    with pytest.raises(CredentialNotFoundError):
        svc.delete_credential("a", ref_b)
    assert svc.resolve_credential("ab", ref_b) == B_SECRET  # untouched


@pytest.mark.parametrize("tenant", _BAD_TENANTS, ids=ascii)
def test_malformed_tenant_ids_are_refused_and_audited_as_denied(
    attacked: tuple[Runtime, str], tenant: str
) -> None:
    runtime, ref_b = attacked
    svc = runtime.credential_service()
    with pytest.raises(InvalidTenantError) as info:
        svc.resolve_credential(tenant, ref_b)
    if len(tenant.strip()) >= 3:  # (shorter ones occur in any English sentence)
        assert tenant not in str(info.value)
    row = _last_audit(runtime)
    # The audit row never stores an id that failed validation.
    assert (row.action, row.outcome, row.tenant_id) == ("resolve", "denied", None), row
    with pytest.raises(InvalidTenantError):
        svc.encrypt_credential(tenant, "sk-proj-" + "valueForBadTenant" * 2)
    with runtime.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM credentials")).scalar() == 1


_KEY_SHAPED = [
    "AIzaSyD3xQ7mR2vN8kLp4sT9wYz3bC6dF1gH5jK",  # a Google API key
    "sk-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7dEf0hIj3kLm6n",  # a legacy OpenAI key
    "sk-proj-Xq7mR2vN8kLp4sT9wYz3bC6dF1gH5jK0aE",
    "sk-ant-api03-Xq7mR2vN8kLp4sT9wYz3bC6dF1gH5jK0aE",
    "AKIAIOSFODNN7EXAMPLE",
]


@pytest.mark.parametrize("key", _KEY_SHAPED, ids=lambda k: k[:4])
def test_a_secret_passed_as_the_tenant_or_actor_is_refused_and_never_recorded(
    attacked: tuple[Runtime, str], key: str
) -> None:
    """Arguments swapped (`encrypt_credential(secret, secret)`), or a key in the actor: tenant
    ids and actors are stored and audited in clear, so a key-shaped one is refused and the
    audit row records neither."""
    runtime, ref_b = attacked
    svc = runtime.credential_service()
    with pytest.raises(InvalidTenantError) as info:
        svc.encrypt_credential(key, key)
    assert key not in str(info.value) and "API key" in str(info.value)
    with pytest.raises(InvalidTenantError):
        svc.resolve_credential(key, ref_b)
    with pytest.raises(InvalidInputError):
        runtime.credential_service(actor=key).resolve_credential("ab", ref_b)
    with runtime.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM credentials")).scalar() == 1
        stored = "\n".join(str(v) for row in conn.execute(text(
            "SELECT tenant_id, actor, reason FROM audit_events")).all() for v in row)
        assert conn.execute(text("SELECT COUNT(*) FROM tenant_keys WHERE tenant_id = :k"),
                            {"k": key}).scalar() == 0
    assert key not in stored and key[4:16] not in stored
    # Every path that takes an actor refuses it before writing anything: jobs (their row
    # records who asked), key changes (before the KEK source is written), the audit log itself.
    latest = runtime.keys.source.latest_version()
    rotation = runtime.rotation()
    for start in (lambda: rotation.rotate_kek(requested_by=key),
                  lambda: rotation.reencrypt(requested_by=key),
                  lambda: rotation.rekey_tenant("ab", requested_by=key),
                  lambda: runtime.key_admin(actor=key).create_version(),
                  lambda: runtime.key_admin().adopt_or_create(actor=key),
                  lambda: runtime.rotation(actor=key)):
        with pytest.raises(InvalidInputError):
            start()
    with pytest.raises(AuditWriteError), runtime.engine.begin() as conn:
        runtime.audit.append(conn, [AuditRecord(action="x", outcome="success", actor=key)])
    assert runtime.keys.source.latest_version() == latest
    with runtime.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM rotation_jobs")).scalar() == 0
        assert conn.execute(text("SELECT COUNT(*) FROM audit_events WHERE actor = :k"),
                            {"k": key}).scalar() == 0
    # A tenant id that is a UUID without dashes (32 hex digits, like an Azure key) is fine.
    assert svc.encrypt_credential(uuid.uuid4().hex, "sk-proj-" + "hexTenantValue1" * 3)
