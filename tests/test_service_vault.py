"""CredentialService against a real OpenBao: the KEK in KV v2, and vault:// references.

Covers not-found vs deleted vs destroyed vs forbidden through the public API, scope checks that
happen before any request, an unavailable server, and that the KEK is read once, not per call.
"""

from __future__ import annotations

from collections.abc import Callable

import hvac
import pytest
from sqlalchemy import select

from cuscred.db.models import AuditEvent
from cuscred.errors import (
    CredentialNotFoundError,
    FieldMissingError,
    KekUnavailableError,
    KeyStateError,
    PermissionDeniedError,
    ScopeError,
    SecretVersionDeletedError,
    SecretVersionDestroyedError,
    VaultUnavailableError,
)
from cuscred.factory import Runtime, build_runtime
from tests.conftest import Database
from tests.vault_fixtures import vault_settings
from tests.vault_server import OpenBaoServer

OPENAI = "sk-proj-" + "V4ult" * 30


def _runtime(server: OpenBaoServer, database: Database, mount: str, **extra: object) -> Runtime:
    values: dict[str, object] = {"vault_kek_path": "cuscred/kek", **extra}
    settings = vault_settings(
        server, database_url=database.url, vault_kek_mount=mount, vault_ref_mounts=mount,
        **values,
    )
    return build_runtime(settings, engine=database.engine)


@pytest.fixture
def vault_runtime(openbao: OpenBaoServer, database: Database, kv_mount: str) -> Runtime:
    runtime = _runtime(openbao, database, kv_mount)
    assert runtime.key_admin().create_version() == 1  # fresh install: v1 becomes active
    return runtime


def _last_audit(runtime: Runtime) -> AuditEvent:
    with runtime.sessions() as s:
        event = s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).one()
    return event


def test_rotation_matrix_with_the_kek_in_vault(vault_runtime: Runtime, openbao: OpenBaoServer,
                                               kv_mount: str) -> None:
    svc = vault_runtime.credential_service()
    admin = vault_runtime.key_admin()
    old = svc.encrypt_credential("tenant-a", OPENAI)
    assert admin.create_version() == 2
    admin.promote(2)
    new = svc.encrypt_credential("tenant-a", OPENAI + "2")
    assert [svc.describe_credential("tenant-a", r).kek_version for r in (old, new)] == [1, 2]
    assert svc.resolve_credential("tenant-a", old) == OPENAI
    with pytest.raises(KeyStateError, match="still used by 1"):
        admin.retire(1)
    # Each KEK version was read from Vault once by this process, whatever the number of calls.
    reads_before = openbao.kv_reads(kv_mount, "cuscred/kek")
    for _ in range(5):
        svc.resolve_credential("tenant-a", old)
        svc.resolve_credential("tenant-a", new)
    assert openbao.kv_reads(kv_mount, "cuscred/kek") == reads_before


@pytest.fixture
def tenant_secret(vault_client: hvac.Client, kv_mount: str) -> Callable[..., None]:
    def write(path: str, **data: str) -> None:
        vault_client.secrets.kv.v2.create_or_update_secret(path, secret=data, mount_point=kv_mount)

    return write


def test_vault_reference_inside_the_prefix(
    vault_runtime: Runtime, tenant_secret: Callable[..., None], kv_mount: str
) -> None:
    tenant_secret("tenants/tenant-a/openai", api_key=OPENAI)
    tenant_secret("tenants/tenant-a/openai", api_key=OPENAI + "-v2")
    svc = vault_runtime.credential_service()
    ref = f"vault://{kv_mount}/tenants/tenant-a/openai#api_key"
    assert svc.resolve_credential("tenant-a", ref) == OPENAI + "-v2"
    pinned = f"vault://{kv_mount}/tenants/tenant-a/openai?version=1#api_key"
    assert svc.resolve_credential("tenant-a", pinned) == OPENAI
    event = _last_audit(vault_runtime)
    assert (event.action, event.outcome, event.credential_id) == ("resolve", "success", None)
    assert event.ref_fingerprint and kv_mount not in event.ref_fingerprint


def test_not_found_deleted_destroyed_field(
    vault_runtime: Runtime, tenant_secret: Callable[..., None], vault_client: hvac.Client,
    kv_mount: str,
) -> None:
    path = "tenants/tenant-a/anthropic"
    for i in range(3):
        tenant_secret(path, api_key=f"sk-ant-api03-{i}" + "x" * 40)
    vault_client.secrets.kv.v2.delete_secret_versions(path, [1], mount_point=kv_mount)
    vault_client.secrets.kv.v2.destroy_secret_versions(path, [2], mount_point=kv_mount)
    svc = vault_runtime.credential_service()
    base = f"vault://{kv_mount}/{path}"
    cases = [
        (f"vault://{kv_mount}/tenants/tenant-a/missing#api_key", CredentialNotFoundError,
         "not_found"),
        (f"{base}?version=9#api_key", CredentialNotFoundError, "not_found"),
        (f"{base}?version=1#api_key", SecretVersionDeletedError, "version_deleted"),
        (f"{base}?version=2#api_key", SecretVersionDestroyedError, "version_destroyed"),
        (f"{base}#no_such_field", FieldMissingError, "field_missing"),
    ]
    for ref, error, reason in cases:
        with pytest.raises(error) as info:
            svc.resolve_credential("tenant-a", ref)
        assert type(info.value) is error, ref
        event = _last_audit(vault_runtime)
        assert (event.outcome, event.reason) == ("failure", reason)
    assert svc.resolve_credential("tenant-a", f"{base}#api_key").startswith("sk-ant-api03-2")


def test_forbidden_path(
    vault_runtime: Runtime, openbao: OpenBaoServer, database: Database, kv_mount: str,
    tenant_secret: Callable[..., None], vault_client: hvac.Client,
) -> None:
    tenant_secret("tenants/tenant-a/google", api_key="AIza" + "g" * 35)
    # An identity that may read the KEK and one other path, not the tenant's google secret.
    policy = (f'path "{kv_mount}/data/cuscred/kek" {{ capabilities = ["read"] }}\n'
              f'path "{kv_mount}/data/tenants/tenant-a/other" {{ capabilities = ["read"] }}')
    vault_client.sys.create_or_update_policy(f"limited-{kv_mount}", policy)
    token = vault_client.auth.token.create(policies=[f"limited-{kv_mount}"], ttl="10m")[
        "auth"]["client_token"]
    limited = _runtime(openbao, database, kv_mount, vault_token=token)
    svc = limited.credential_service()
    with pytest.raises(PermissionDeniedError) as info:
        svc.resolve_credential("tenant-a", f"vault://{kv_mount}/tenants/tenant-a/google#api_key")
    assert token not in str(info.value)
    assert (_last_audit(limited).outcome, _last_audit(limited).reason) == (
        "denied", "permission_denied")


@pytest.mark.parametrize(
    "path",
    [
        "tenants/tenant-b/openai",  # another tenant
        "tenants/tenant-ab/openai",  # a string prefix of ours is not our prefix
        "tenants/tenant-a",  # the prefix itself is not a secret of ours
        "shared/openai",
    ],
)
def test_scope_is_checked_before_any_request(
    vault_runtime: Runtime, openbao: OpenBaoServer, kv_mount: str, path: str
) -> None:
    svc = vault_runtime.credential_service()
    before = len(openbao.requests_to(f"{kv_mount}/data/{path}"))
    with pytest.raises(ScopeError):
        svc.resolve_credential("tenant-a", f"vault://{kv_mount}/{path}#api_key")
    assert len(openbao.requests_to(f"{kv_mount}/data/{path}")) == before
    assert _last_audit(vault_runtime).outcome == "denied"


def test_other_mount_is_out_of_scope(vault_runtime: Runtime) -> None:
    with pytest.raises(ScopeError):
        vault_runtime.credential_service().resolve_credential(
            "tenant-a", "vault://secret/tenants/tenant-a/openai#api_key")


@pytest.fixture
def private_server(openbao_factory: Callable[..., OpenBaoServer]) -> OpenBaoServer:
    return openbao_factory()  # stopped by the factory fixture


def test_vault_down_is_retryable_and_audited(private_server: OpenBaoServer,
                                             database: Database) -> None:
    runtime = _runtime(private_server, database, "secret", vault_kek_path="cuscred/kek-down")
    runtime.key_admin().create_version()
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", OPENAI)
    runtime.keys.clear_caches()
    private_server.stop()
    with pytest.raises(VaultUnavailableError) as info:
        svc.resolve_credential("tenant-a", ref)
    assert info.value.retryable
    assert private_server.token not in str(info.value)
    # The audit key was derived while Vault was up, so the failure is still chained.
    assert (_last_audit(runtime).outcome, _last_audit(runtime).reason) == (
        "failure", "vault_unavailable")
    private_server.start()  # dev mode: the KEK is gone with the old process
    with pytest.raises(KekUnavailableError, match="version 1") as gone:
        svc.resolve_credential("tenant-a", ref)
    assert OPENAI not in str(gone.value)


def test_sealed_vault_is_retryable(private_server: OpenBaoServer, database: Database) -> None:
    runtime = _runtime(private_server, database, "secret", vault_kek_path="cuscred/kek-seal")
    runtime.key_admin().create_version()
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", OPENAI)
    runtime.keys.clear_caches()
    private_server.seal()
    with pytest.raises(VaultUnavailableError):
        svc.resolve_credential("tenant-a", ref)
    private_server.unseal()
    assert svc.resolve_credential("tenant-a", ref) == OPENAI
