"""Credential references: parse, print, check the format, check a tenant's scope. No I/O.

Accepted forms (DESIGN.md "References")::

    encrypted://<credential id>
    vault://<mount>/<path>[?version=N]#<field>
    env://<NAME>

Parsing is strict and decodes nothing: no percent-decoding, no Unicode normalisation, no case
folding, no path normalisation. Text is either already in canonical form or refused, so the text
that was checked is exactly what gets resolved; nothing downstream can read it another way.

Error messages name the scheme and what is wrong in general terms, never the reference itself:
its path may carry tenant names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from cuscred.errors import (
    CuscredTypeError,
    EnvReferenceDisabledError,
    MalformedReferenceError,
    ScopeError,
)
from cuscred.ids import is_credential_id
from cuscred.validation import validate_tenant_id

if TYPE_CHECKING:
    from cuscred.config import Settings

MAX_REFERENCE_LENGTH = 1024
MAX_VAULT_VERSION = 10**18 - 1  # 18 digits: far beyond any KV history, far below 2**63
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_FIELD = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FORMS = "encrypted://<credential id>, vault://<mount>/<path>[?version=N]#<field>, env://<NAME>"
_VAULT_FORM = "vault://<mount>/<path>#<field>"


def _malformed(message: str) -> MalformedReferenceError:
    return MalformedReferenceError(message)


@dataclass(frozen=True, slots=True)
class EncryptedRef:
    """A credential stored (encrypted) in this service's ``credentials`` table."""

    credential_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.credential_id, str):
            raise CuscredTypeError("credential id must be a str")
        if not is_credential_id(self.credential_id):
            raise _malformed(
                "encrypted:// must be followed by a credential id: 'cred_' and 26 characters "
                "of lower-case base32"
            )

    def __str__(self) -> str:
        return f"encrypted://{self.credential_id}"


@dataclass(frozen=True, slots=True)
class VaultRef:
    """A field of a KV v2 secret: ``path`` is relative to ``mount``; ``version=None`` is latest."""

    mount: str
    path: str
    field: str
    version: int | None = None

    def __post_init__(self) -> None:
        _check_vault_parts(self.mount, self.path, self.field, self.version)

    def __str__(self) -> str:
        query = "" if self.version is None else f"?version={self.version}"
        return f"vault://{self.mount}/{self.path}{query}#{self.field}"


@dataclass(frozen=True, slots=True)
class EnvRef:
    """An environment variable of the resolving process (development mode only)."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise CuscredTypeError("environment variable name must be a str")
        if not _ENV_NAME.fullmatch(self.name):
            raise _malformed(
                "env:// must be followed by a variable name of A-Z, 0-9 and '_', "
                "starting with a letter"
            )

    def __str__(self) -> str:
        return f"env://{self.name}"


Reference: TypeAlias = EncryptedRef | VaultRef | EnvRef


def parse_reference(text: object) -> Reference:
    """The reference written in ``text``.

    Raises :class:`CuscredTypeError` if ``text`` is not a ``str``, and
    :class:`MalformedReferenceError` saying what is wrong and how to write it instead.
    """
    if not isinstance(text, str):
        raise CuscredTypeError(f"reference must be a str, got {type(text).__name__}")
    ref = str.__str__(text)
    _check_text(ref)
    scheme, sep, body = ref.partition("://")
    if not sep:
        raise _malformed(f"not a credential reference (no '://'); accepted forms: {_FORMS}")
    parse = _PARSERS.get(scheme)
    if parse is None:
        if scheme.lower() in _PARSERS:
            raise _malformed(f"reference schemes are lower-case; accepted forms: {_FORMS}")
        raise _malformed(f"unknown reference scheme; accepted forms: {_FORMS}")
    return parse(body)


def describe_reference(ref: Reference) -> str:
    """A short description of ``ref`` that reveals no tenant path segments."""
    if isinstance(ref, EncryptedRef):
        return f"encrypted reference: credential {ref.credential_id}"
    if isinstance(ref, VaultRef):
        version = "latest version" if ref.version is None else f"version {ref.version}"
        return f"vault reference: mount {ref.mount!r}, field {ref.field!r}, {version}"
    return f"env reference: variable {ref.name!r} (development mode only)"


def validate_credential_format(credential_ref: object) -> tuple[bool, str]:
    """``(True, description)`` if ``credential_ref`` is a well-formed reference, else
    ``(False, what is wrong)``. No I/O, no scope check, and never raises for bad input.
    """
    try:
        ref = parse_reference(credential_ref)
    except (MalformedReferenceError, CuscredTypeError) as exc:
        return False, str(exc)
    return True, describe_reference(ref)


def check_vault_scope(ref: VaultRef, tenant_id: str, settings: Settings) -> None:
    """Allow ``ref`` for ``tenant_id`` only if its mount is one of ``settings.ref_mounts`` and its
    path lies strictly below the tenant's prefix (``settings.vault_tenant_prefix``), compared
    segment by segment, so that ``tenants/a/`` does not admit ``tenants/ab/x``.

    Raises :class:`ScopeError` if not, :class:`InvalidTenantError` for a bad ``tenant_id``,
    :class:`CuscredTypeError` if ``ref`` is not a :class:`VaultRef`.
    """
    if not isinstance(ref, VaultRef):
        raise CuscredTypeError(f"expected a VaultRef, got {type(ref).__name__}")
    tenant = validate_tenant_id(tenant_id)  # no '/', '.', braces: cannot widen the prefix
    # Again, in case the frozen instance was altered with object.__setattr__.
    _check_vault_parts(ref.mount, ref.path, ref.field, ref.version)
    if ref.mount not in settings.ref_mounts:
        raise ScopeError("vault mount is not allowed for credential references")
    # replace() rather than format(): nothing in the template is interpreted but {tenant_id}.
    # The template ends with '/', so the last split element is empty and dropped.
    prefix = settings.vault_tenant_prefix.replace("{tenant_id}", tenant).split("/")[:-1]
    segments = ref.path.split("/")
    if len(segments) <= len(prefix) or segments[: len(prefix)] != prefix:
        raise ScopeError("vault path is outside this tenant's prefix")
    # Checked after the prefix, so a tenant learns nothing about where the KEK lives. Settings
    # refuse a prefix that could cover the KEK; this holds even for settings built
    # without validation, since references are read with the token that can read the KEK.
    kek_path = settings.vault_kek_path.strip("/")
    if ref.mount == settings.vault_kek_mount and (
            ref.path == kek_path or ref.path.startswith(kek_path + "/")):
        raise ScopeError("vault path is reserved for the service's own keys")


def check_env_scope(ref: EnvRef, settings: Settings) -> None:
    """Allow ``ref`` only in development mode and only for names that start with
    ``settings.env_ref_prefix`` and are longer than it.

    Raises :class:`EnvReferenceDisabledError` outside development, :class:`ScopeError` for any
    other name, :class:`CuscredTypeError` if ``ref`` is not an :class:`EnvRef`.
    """
    if not isinstance(ref, EnvRef):
        raise CuscredTypeError(f"expected an EnvRef, got {type(ref).__name__}")
    if not settings.is_development:
        raise EnvReferenceDisabledError("env:// references are allowed only in development mode")
    prefix = settings.env_ref_prefix
    if not ref.name.startswith(prefix) or len(ref.name) <= len(prefix):
        raise ScopeError(
            f"environment variable is outside the allowed prefix: env:// names must start "
            f"with {prefix} and continue after it"
        )


def _check_text(ref: str) -> None:
    """Checks on the whole text, before any splitting."""
    if not ref:
        raise _malformed(f"reference is empty; accepted forms: {_FORMS}")
    if len(ref) > MAX_REFERENCE_LENGTH:
        raise _malformed(f"reference is longer than {MAX_REFERENCE_LENGTH} characters")
    if ref != ref.strip():
        raise _malformed("reference has surrounding whitespace: remove surrounding whitespace")
    if _CONTROL.search(ref):
        raise _malformed("reference contains a control character")
    if not ref.isascii():
        raise _malformed(
            "reference contains a non-ASCII character (e.g. a look-alike such as a fullwidth "
            "'/' or a Cyrillic letter); references are plain ASCII"
        )


def _parse_env(body: str) -> EnvRef:
    if not body:
        raise _malformed("env:// needs a variable name: env://<NAME>")
    if not _ENV_NAME.fullmatch(body) and _ENV_NAME.fullmatch(body.upper()):
        raise _malformed(
            "env:// variable names are upper-case: A-Z, 0-9 and '_', starting with a letter"
        )
    return EnvRef(body)


def _parse_vault(body: str) -> VaultRef:
    if not body:
        raise _malformed(f"vault:// is empty: write {_VAULT_FORM}")
    if "%" in body:
        raise _malformed(
            "vault reference contains '%': percent-encoding is not accepted; "
            "write the path in plain characters"
        )
    location, has_field, field = body.partition("#")
    if "#" in field:
        raise _malformed("vault reference has more than one '#'")
    if "?version=" in field:
        raise _malformed(
            "vault reference has ?version=N after #<field>: the query comes first, as in a URL: "
            "write vault://<mount>/<path>?version=N#<field>"
        )
    location, has_query, query = location.partition("?")
    mount, _, path = location.partition("/")
    if not mount:
        raise _malformed(
            f"vault reference has no mount (a '/' straight after 'vault://'): write {_VAULT_FORM}"
        )
    if not path:
        raise _malformed(
            f"vault reference names a mount but no secret path after it: write {_VAULT_FORM}"
        )
    if not has_field:
        raise _malformed("vault reference has no field: add #<field> at the end, e.g. #api_key")
    version = _parse_version(query) if has_query else None
    return VaultRef(mount, path, field, version)


def _parse_version(query: str) -> int:
    name, has_value, value = query.partition("=")
    if not query:
        raise _malformed("vault reference has an empty query after '?': write ?version=N")
    if name != "version" or "&" in query:
        raise _malformed("vault reference query may only be ?version=N")
    if not has_value or not _VERSION.fullmatch(value):
        raise _malformed(
            "vault reference version must be a whole number from 1 up without leading zeros "
            "(at most 18 digits), e.g. ?version=3"
        )
    return int(value)


def _check_vault_parts(mount: object, path: object, field: object, version: object) -> None:
    """The rules for each part of a :class:`VaultRef`, in one place."""
    if not (isinstance(mount, str) and isinstance(path, str) and isinstance(field, str)):
        raise CuscredTypeError("vault reference mount, path and field must be str")
    _check_segment(mount, "mount")
    if not path:
        raise _malformed(f"vault reference has an empty path: write {_VAULT_FORM}")
    for segment in path.split("/"):
        _check_segment(segment, "path segment")
    if not _FIELD.fullmatch(field):
        raise _malformed(
            "vault reference field must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', '-'"
        )
    if version is not None and (type(version) is not int or not 1 <= version <= MAX_VAULT_VERSION):
        raise _malformed("vault reference version must be an int from 1 up, or None for latest")


def _check_segment(segment: str, what: str) -> None:
    if not segment:
        raise _malformed(f"vault reference has an empty {what} (doubled or trailing '/')")
    if segment in (".", ".."):
        raise _malformed(f"vault reference has a '.' or '..' {what}: no relative segments")
    if not _SEGMENT.fullmatch(segment):
        raise _malformed(
            f"vault reference {what} may contain only A-Z, a-z, 0-9, '.', '_' and '-', "
            "and may not start with '.'"
        )


_PARSERS: dict[str, Callable[[str], Reference]] = {
    "encrypted": EncryptedRef,
    "vault": _parse_vault,
    "env": _parse_env,
}

__all__ = [
    "MAX_REFERENCE_LENGTH",
    "EncryptedRef",
    "EnvRef",
    "Reference",
    "VaultRef",
    "check_env_scope",
    "check_vault_scope",
    "describe_reference",
    "parse_reference",
    "validate_credential_format",
]
