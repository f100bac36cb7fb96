"""cuscred: a credential vault for multi-tenant AI platforms.

Typical use in a platform service::

    import os
    from cuscred import Settings, build_runtime

    runtime = build_runtime(Settings.from_env(os.environ))    # once per process
    credentials = runtime.credential_service(actor="admin-api")
    ref = credentials.encrypt_credential("tenant-a", "sk-proj-...")      # store
    key = credentials.resolve_credential("tenant-a", ref)                # right before use
"""

from cuscred.config import Settings
from cuscred.errors import (
    AuditWriteError,
    ConcurrentUpdateError,
    ConfigurationError,
    CredentialNotFoundError,
    CuscredError,
    CuscredTypeError,
    DecryptionError,
    EnvReferenceDisabledError,
    FieldMissingError,
    InvalidContextError,
    InvalidInputError,
    InvalidSecretError,
    InvalidTenantError,
    KekMismatchError,
    KekUnavailableError,
    KeyManagementError,
    KeyStateError,
    MalformedReferenceError,
    PermissionDeniedError,
    ReferenceAccessError,
    ScopeError,
    SecretVersionDeletedError,
    SecretVersionDestroyedError,
    StorageError,
    VaultError,
    VaultUnavailableError,
)
from cuscred.factory import Runtime, build_runtime, build_service
from cuscred.masking import mask_credential
from cuscred.references import EncryptedRef, EnvRef, VaultRef, parse_reference
from cuscred.services.catalog import CredentialInfo
from cuscred.services.credentials import CredentialService

__all__ = [
    "AuditWriteError",
    "ConcurrentUpdateError",
    "ConfigurationError",
    "CredentialInfo",
    "CredentialNotFoundError",
    "CredentialService",
    "CuscredError",
    "CuscredTypeError",
    "DecryptionError",
    "EncryptedRef",
    "EnvRef",
    "EnvReferenceDisabledError",
    "FieldMissingError",
    "InvalidContextError",
    "InvalidInputError",
    "InvalidSecretError",
    "InvalidTenantError",
    "KekMismatchError",
    "KekUnavailableError",
    "KeyManagementError",
    "KeyStateError",
    "MalformedReferenceError",
    "PermissionDeniedError",
    "ReferenceAccessError",
    "Runtime",
    "ScopeError",
    "SecretVersionDeletedError",
    "SecretVersionDestroyedError",
    "Settings",
    "StorageError",
    "VaultError",
    "VaultRef",
    "VaultUnavailableError",
    "build_runtime",
    "build_service",
    "mask_credential",
    "parse_reference",
]
