"""Every error the library raises, in one place.

Rules (see DESIGN.md, STYLE.md habits 1 and 6):

* All library errors derive from :class:`CuscredError`, so callers can catch one class.
* Any failure to decrypt is one opaque :class:`DecryptionError`; the message never says which
  check failed, so the error is not an oracle.
* Bad input raises a subclass of :class:`InvalidInputError` (which is also a ``ValueError``) or
  :class:`CuscredTypeError` (also a ``TypeError``) and changes nothing.
* No message ever contains a secret, key material or a full reference: messages are written by
  this library from fixed text plus non-secret identifiers (tenant ids, credential ids, versions).
* ``retryable`` tells a worker whether trying again later can succeed.
"""

from __future__ import annotations


class CuscredError(Exception):
    """Base class of every error raised by cuscred."""

    #: Whether the same call may succeed later without any change (a service was unavailable).
    retryable: bool = False
    #: A short stable code, written to the audit trail as the reason and used for CLI exit codes.
    code: str = "error"


# --- misuse and bad input -------------------------------------------------------------------


class CuscredTypeError(CuscredError, TypeError):
    """An argument has the wrong type (a programming error in the caller)."""

    code = "bad_type"


class InvalidInputError(CuscredError, ValueError):
    """An argument has the right type but a value the library refuses. Nothing was changed."""

    code = "invalid_input"


class DatabaseCopyRefusedError(InvalidInputError):
    """``db copy`` refused: the target is not empty, or a schema is not at the newest
    migration, or the source does not exist. Nothing was copied."""

    code = "copy_refused"


class InvalidSecretError(InvalidInputError):
    """The secret is empty, too long, contains NUL, or has surrounding whitespace."""

    code = "invalid_secret"


class InvalidTenantError(InvalidInputError):
    """The tenant id is empty or contains characters outside the allowed set."""

    code = "invalid_tenant"


class InvalidContextError(InvalidInputError):
    """The encryption context is not a mapping of short strings to short strings."""

    code = "invalid_context"


class MalformedReferenceError(InvalidInputError):
    """A credential reference does not follow any accepted form."""

    code = "malformed_reference"


# --- access to a referenced secret ----------------------------------------------------------


class ReferenceAccessError(CuscredError):
    """A well-formed reference could not be resolved."""

    code = "access_error"


class ScopeError(ReferenceAccessError):
    """The reference lies outside what this tenant may reach (another tenant, mount or prefix).

    Also raised for ``encrypted://`` ids that belong to another tenant: to the caller that is
    indistinguishable from a credential that does not exist in its scope.
    """

    code = "scope_denied"


class CredentialNotFoundError(ReferenceAccessError):
    """Nothing exists at the reference (no such credential, no such Vault path or version)."""

    code = "not_found"


class SecretVersionDeletedError(CredentialNotFoundError):
    """The Vault KV version was soft-deleted; it can be undeleted by an operator."""

    code = "version_deleted"


class SecretVersionDestroyedError(CredentialNotFoundError):
    """The Vault KV version was destroyed; its data is gone for good."""

    code = "version_destroyed"


class FieldMissingError(ReferenceAccessError):
    """The Vault secret exists but has no such field (or the field is not a string)."""

    code = "field_missing"


class PermissionDeniedError(ReferenceAccessError):
    """Vault refused the request (HTTP 401/403) for the configured identity."""

    code = "permission_denied"


class EnvReferenceDisabledError(ReferenceAccessError):
    """``env://`` references are allowed only in development mode."""

    code = "env_disabled"


class VaultUnavailableError(CuscredError):
    """Vault could not be reached, is sealed, or answered 429/5xx. Try again later."""

    retryable = True
    code = "vault_unavailable"


class VaultError(CuscredError):
    """Vault answered with an error that is neither ours to fix nor transient (e.g. HTTP 400)."""

    code = "vault_error"


# --- cryptography ---------------------------------------------------------------------------


class DecryptionError(CuscredError):
    """The stored value could not be decrypted and authenticated.

    Raised for every cause alike (tampered, truncated, moved to another tenant or row, wrong
    context, unknown key version) so that the error reveals nothing about the cause.
    """

    code = "decrypt_failed"

    def __init__(self, message: str = "credential could not be decrypted") -> None:
        super().__init__(message)


# --- keys -----------------------------------------------------------------------------------


class KeyManagementError(CuscredError):
    """Base of key-management errors."""

    code = "key_error"


class KekUnavailableError(KeyManagementError):
    """A KEK version could not be loaded from its source (missing, deleted or destroyed)."""

    code = "kek_unavailable"


class KekMismatchError(KekUnavailableError):
    """A KEK version loaded, but it is not the key recorded for that version (its check value
    differs): a wrong keyring or Vault path, or a replaced key. Never used to seal or verify."""

    code = "kek_mismatch"


class KeyStateError(KeyManagementError):
    """A key-version state change was refused (e.g. retiring a version rows still use)."""

    code = "key_state_refused"


class ConfigurationError(CuscredError):
    """The settings are incomplete or unsafe (e.g. no keyring, production with a local key)."""

    code = "configuration"


# --- storage --------------------------------------------------------------------------------


class ConcurrentUpdateError(CuscredError):
    """The row changed between read and write; nothing was written. Safe to retry the call."""

    retryable = True
    code = "concurrent_update"


class StorageError(CuscredError):
    """The database could not be reached or failed the operation; nothing was changed."""

    retryable = True
    code = "storage_error"


class AuditWriteError(CuscredError):
    """The audit event could not be written, so the access it records did not happen."""

    retryable = True
    code = "audit_write_failed"


__all__ = [
    "AuditWriteError",
    "ConcurrentUpdateError",
    "ConfigurationError",
    "CredentialNotFoundError",
    "CuscredError",
    "CuscredTypeError",
    "DatabaseCopyRefusedError",
    "DecryptionError",
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
    "ScopeError",
    "SecretVersionDeletedError",
    "SecretVersionDestroyedError",
    "StorageError",
    "VaultError",
    "VaultUnavailableError",
]
