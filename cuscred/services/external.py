"""Resolution of references to secrets kept elsewhere: ``vault://`` and ``env://``.

Both check the tenant's scope before any I/O: a tenant reaches only paths under its own prefix
on an allowed mount, and ``env://`` reaches only prefixed names, in development mode only.
"""

from __future__ import annotations

from collections.abc import Mapping

from cuscred.config import Settings
from cuscred.errors import (
    ConfigurationError,
    CredentialNotFoundError,
    FieldMissingError,
)
from cuscred.references import EnvRef, VaultRef, check_env_scope, check_vault_scope
from cuscred.vault.client import VaultKV


def resolve_vault(
    ref: VaultRef, tenant_id: str, settings: Settings, kv: VaultKV | None
) -> str:
    """Read one field of a KV v2 secret inside the tenant's prefix.

    Raises :class:`~cuscred.errors.ScopeError` before any request when the path is outside the
    tenant's prefix or mount; otherwise the Vault errors of :class:`VaultKV` (not found, deleted,
    destroyed, permission denied, unavailable) and :class:`FieldMissingError`.
    """
    check_vault_scope(ref, tenant_id, settings)
    if kv is None:
        raise ConfigurationError("vault:// references need Vault settings (CUSCRED_VAULT_*)")
    secret = kv.read(ref.mount, ref.path, ref.version)
    value = secret.data.get(ref.field)
    if not isinstance(value, str) or not value:
        raise FieldMissingError(
            f"the secret has no non-empty string field {ref.field!r} "
            f"(mount {ref.mount!r}, version {secret.version})"
        )
    return value


def resolve_env(ref: EnvRef, settings: Settings, environ: Mapping[str, str]) -> str:
    """Read a prefixed environment variable (development mode only).

    Raises :class:`~cuscred.errors.EnvReferenceDisabledError` outside development,
    :class:`~cuscred.errors.ScopeError` for a name without the configured prefix, and
    :class:`CredentialNotFoundError` when the variable is unset or empty.
    """
    check_env_scope(ref, settings)
    value = environ.get(ref.name)
    if not value:
        raise CredentialNotFoundError(f"environment variable {ref.name} is not set")
    return value


__all__ = ["resolve_env", "resolve_vault"]
