"""The one place where ``hvac`` and ``requests`` exceptions are caught and translated.

STYLE.md habit 6: every call into hvac runs inside :func:`translate_vault_errors`, which maps

* connection error, timeout, ``VaultDown`` (sealed, 503), ``InternalServerError`` (500),
  ``BadGateway`` (502), ``RateLimitExceeded`` (429), ``VaultNotInitialized`` (501), and a KV
  mount that is upgrading (400 "... will resume service shortly")
  -> :class:`VaultUnavailableError` (retryable);
* ``Forbidden`` / ``Unauthorized`` (403/401), and 400 on a login -> :class:`PermissionDeniedError`;
* ``InvalidPath`` (404) -> :class:`CredentialNotFoundError`, or its subclasses
  :class:`SecretVersionDeletedError` / :class:`SecretVersionDestroyedError` when the metadata in
  the 404 body says so;
* ``InvalidRequest`` (400) "check-and-set parameter did not match" -> :class:`ConcurrentUpdateError`
  (nothing was written);
* TLS verification failure, any other 400, anything else -> :class:`VaultError`.

Our messages are built from fixed text plus the operation, the mount and the version. They never
contain the Vault path (tenant path segments are sensitive), a token, a secret-id, a secret value
or any server text (Vault error strings can echo the path or request input).

The original exception is chained as ``__cause__`` but scrubbed first: a ``requests`` exception
carries the prepared request (``X-Vault-Token`` header, JSON body with secret values or the
AppRole secret-id) and its urllib3 context names the URL; an hvac exception carries the URL and
the response body. Those are dropped so that neither a traceback nor a debugger can reach them.
Only the HTTP method and Vault's own ``errors`` strings (with the request path cut out) stay.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

import requests
from hvac import exceptions as hvac_exc

from cuscred import metrics
from cuscred.errors import (
    ConcurrentUpdateError,
    CredentialNotFoundError,
    CuscredError,
    PermissionDeniedError,
    SecretVersionDeletedError,
    SecretVersionDestroyedError,
    VaultError,
    VaultUnavailableError,
)

# hvac class -> (our class, reason). Order matters only for subclasses, and hvac has none here.
_BY_HVAC_CLASS: tuple[tuple[type[Exception], type[CuscredError], str], ...] = (
    (hvac_exc.VaultDown, VaultUnavailableError, "Vault is sealed or unavailable (HTTP 503)"),
    (hvac_exc.InternalServerError, VaultUnavailableError, "Vault internal error (HTTP 500)"),
    (hvac_exc.BadGateway, VaultUnavailableError, "bad gateway in front of Vault (HTTP 502)"),
    (hvac_exc.RateLimitExceeded, VaultUnavailableError, "rate limited by Vault (HTTP 429)"),
    # Not initialised is a server state an operator fixes, like sealed: retry later.
    (hvac_exc.VaultNotInitialized, VaultUnavailableError, "Vault is not initialised (HTTP 501)"),
    (hvac_exc.Forbidden, PermissionDeniedError, "permission denied (HTTP 403)"),
    (hvac_exc.Unauthorized, PermissionDeniedError, "not authenticated (HTTP 401)"),
)

_CAS_MISMATCH = "check-and-set parameter did not match"
# A KV mount that is upgrading (just enabled, or v1 -> v2) answers 400 "... This backend will
# be unavailable for a brief period and will resume service shortly": transient, not our fault.
_KV_UPGRADING = "will resume service"


@contextmanager
def translate_vault_errors(
    operation: str,
    *,
    mount: str | None = None,
    version: int | None = None,
    login: bool = False,
) -> Iterator[None]:
    """Run a block of hvac calls, translating its failures into cuscred errors.

    ``operation`` ("read", "write", "AppRole login"...), ``mount`` and ``version`` are the only
    details that reach the message. ``login=True`` treats HTTP 400 as rejected credentials
    (Vault answers 400 "invalid role or secret ID" to a bad AppRole login).

    Raises :class:`VaultUnavailableError`, :class:`PermissionDeniedError`,
    :class:`CredentialNotFoundError` (or its deleted/destroyed subclasses),
    :class:`ConcurrentUpdateError` or :class:`VaultError`, always chained ``from`` the scrubbed
    original. Exceptions that are not from hvac or requests pass through unchanged.
    """
    where = describe_operation(operation, mount, version)
    started = time.perf_counter()
    try:
        yield
    except hvac_exc.VaultError as e:
        error = _from_hvac(e, where, login=login)
        _scrub_hvac(e)
        metrics.VAULT_ERRORS.labels(operation, error.code).inc()
        raise error from e
    except requests.RequestException as e:
        error = _from_requests(e, where)
        _scrub_requests(e)
        metrics.VAULT_ERRORS.labels(operation, error.code).inc()
        raise error from e
    finally:
        # ``operation`` is one of a fixed set of names ("read", "write", "token renewal"...).
        metrics.VAULT_SECONDS.labels(operation).observe(time.perf_counter() - started)


def missing_version_error(
    metadata: Mapping[str, object] | None, where: str
) -> CredentialNotFoundError:
    """The not-found error that KV v2 version ``metadata`` (from a 404 body) describes.

    A destroyed version has ``destroyed: true``; a soft-deleted one a non-empty
    ``deletion_time``; a path or version that never existed (or whose metadata was deleted, or
    that fell out of ``max_versions``) comes with no metadata at all.
    """
    if metadata is not None and metadata.get("destroyed") is True:
        return SecretVersionDestroyedError(f"{where}: the secret version was destroyed")
    if metadata is not None and metadata.get("deletion_time"):
        return SecretVersionDeletedError(f"{where}: the secret version was deleted")
    return CredentialNotFoundError(f"{where}: no secret at this path or version")


def describe_operation(operation: str, mount: str | None, version: int | None) -> str:
    """The non-secret prefix of every message: operation, mount and version, never the path."""
    text = f"Vault {operation}"
    if mount is not None:
        text += f" on mount {mount!r}"
    if version is not None:
        text += f" (version {version})"
    return text


def _from_hvac(e: hvac_exc.VaultError, where: str, *, login: bool) -> CuscredError:
    for hvac_class, ours, reason in _BY_HVAC_CLASS:
        if isinstance(e, hvac_class):
            return ours(f"{where} failed: {reason}")
    if isinstance(e, hvac_exc.InvalidPath):
        return missing_version_error(_version_metadata(e.json), where)
    if isinstance(e, hvac_exc.InvalidRequest):
        if login:
            return PermissionDeniedError(f"{where} failed: credentials rejected (HTTP 400)")
        messages = [str(msg) for msg in e.errors or ()]
        if any(_KV_UPGRADING in msg for msg in messages):
            return VaultUnavailableError(f"{where} failed: the KV mount is upgrading (HTTP 400)")
        if any(_CAS_MISMATCH in msg for msg in messages):
            return ConcurrentUpdateError(
                f"{where} failed: check-and-set version mismatch, another writer got there "
                "first; nothing was written"
            )
        return VaultError(f"{where} failed: request refused (HTTP 400)")
    return VaultError(f"{where} failed: unexpected Vault answer ({type(e).__name__})")


def _from_requests(e: requests.RequestException, where: str) -> CuscredError:
    if isinstance(e, requests.exceptions.SSLError):
        # A certificate problem does not heal by retrying: it is a configuration error.
        return VaultError(f"{where} failed: TLS verification failed")
    if isinstance(e, requests.Timeout):
        return VaultUnavailableError(f"{where} failed: timed out")
    if isinstance(e, requests.ConnectionError):
        return VaultUnavailableError(f"{where} failed: cannot connect to Vault")
    if isinstance(e, requests.exceptions.JSONDecodeError):
        return VaultError(f"{where} failed: Vault sent a response that is not JSON")
    return VaultError(f"{where} failed: HTTP client error ({type(e).__name__})")


def _version_metadata(body: object) -> Mapping[str, object] | None:
    """``data.metadata`` of a KV v2 404 body, or None (the body is untrusted: check each step)."""
    data = body.get("data") if isinstance(body, dict) else None
    metadata = data.get("metadata") if isinstance(data, dict) else None
    return metadata if isinstance(metadata, dict) else None


def _scrub_hvac(e: hvac_exc.VaultError) -> None:
    """Drop the response body and every mention of the request path from an hvac exception."""
    api_paths: list[str] = []
    if isinstance(e.url, str):
        parts = urlsplit(e.url)
        quoted = parts.path.removeprefix("/v1/")
        api_paths = [p for p in {quoted, unquote(quoted)} if p]
        e.url = f"{parts.scheme}://{parts.netloc}/<path redacted>"
    # Vault's own error strings stay (they help operators) but can quote the path (429,
    # "no handler for route"); a message without ``errors`` was raw response text: dropped.
    errors = [str(m) for m in e.errors] if isinstance(e.errors, list) else []
    for api_path in api_paths:
        errors = [m.replace(api_path, "<path redacted>") for m in errors]
    e.errors = errors or None
    e.args = (", ".join(errors) if errors else None,)
    e.text = None
    e.json = None


def _scrub_requests(e: requests.RequestException) -> None:
    """Drop the request (token header, body), response and URL-naming context."""
    e.request = None
    e.response = None
    if isinstance(e, requests.exceptions.JSONDecodeError):
        e.doc = ""  # it keeps the whole response text
    # urllib3's MaxRetryError names the URL; its ``reason`` (e.g. connection refused) does not.
    inner = e.args[0] if e.args else None
    reason = getattr(inner, "reason", None) or inner
    kind = type(reason).__name__ if isinstance(reason, BaseException) else "request failed"
    e.args = (f"{type(e).__name__} ({kind}); details removed by cuscred",)
    e.__context__ = None
    e.__suppress_context__ = True


__all__ = ["describe_operation", "missing_version_error", "translate_vault_errors"]
