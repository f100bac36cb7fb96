"""Checks of caller input: tenant ids, secrets and encryption contexts. No I/O.

Each check returns the value to use (a plain ``str``/``dict`` copy, whatever subclass came in) or
raises a typed error from :mod:`cuscred.errors`. Messages never contain the secret, not even a
part of it. Tenant ids and context keys are not secret and may be shown, escaped with
:func:`ascii` so that control characters and Unicode look-alikes are visible, and truncated.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from cuscred.errors import (
    CuscredTypeError,
    InvalidContextError,
    InvalidInputError,
    InvalidSecretError,
    InvalidTenantError,
)
from cuscred.providers import KEY_SHAPES, match_shape, parse_json_object

MAX_TENANT_ID_LENGTH = 64
MAX_CONTEXT_ITEMS = 16
MAX_CONTEXT_VALUE_LENGTH = 256

# Tenant ids end up in KDF info strings, Vault path prefixes and log lines: keep them boring.
_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_CONTEXT_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_TENANT_FIRST, _TENANT_REST = re.compile(r"[A-Za-z0-9]"), re.compile(r"[A-Za-z0-9_-]")
_CONTEXT_FIRST, _CONTEXT_REST = re.compile(r"[a-z0-9]"), re.compile(r"[a-z0-9_.-]")
# Control characters: C0, DEL and C1 (Unicode category Cc).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The same minus JSON's insignificant whitespace (tab, LF, CR), allowed between JSON tokens.
_CONTROL_IN_JSON = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f]")
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp"})
_LINE_BREAKS = frozenset("\n\r")
_STRIP_HINT = "pass strip=True (CLI: --strip) to strip surrounding whitespace"


_KEY_PREFIXES = tuple(shape.prefix for shape in KEY_SHAPES)


def validate_tenant_id(value: object) -> str:
    """``value`` if it is a valid tenant id: 1-64 ASCII letters, digits, ``_`` and ``-``,
    starting with a letter or digit.

    Raises :class:`CuscredTypeError` if ``value`` is not a ``str``, and
    :class:`InvalidTenantError` if it is empty or has any other character (``/``, ``.``, braces,
    whitespace, control characters, non-ASCII look-alikes), or has the shape of a provider API
    key (:func:`key_shaped`).
    """
    if not isinstance(value, str):
        raise CuscredTypeError(f"tenant id must be a str, got {type(value).__name__}")
    tenant_id = str.__str__(value)
    if not tenant_id:
        raise InvalidTenantError("tenant id is empty")
    if len(tenant_id) > MAX_TENANT_ID_LENGTH:
        raise InvalidTenantError(
            f"tenant id is {len(tenant_id)} characters, longer than {MAX_TENANT_ID_LENGTH}"
        )
    if not _TENANT_ID.fullmatch(tenant_id):
        raise InvalidTenantError(
            f"tenant id {_first_bad(tenant_id, _TENANT_FIRST, _TENANT_REST)}: it must start "
            "with an ASCII letter or digit and contain only ASCII letters, digits, '_' and '-'"
        )
    provider = key_shaped(tenant_id)
    if provider is not None:
        raise InvalidTenantError(
            f"tenant id has the shape of a {provider} API key: a secret passed where the tenant "
            "goes would be stored and audited in clear, so it is refused"
        )
    return tenant_id


def safe_text(value: str) -> str:
    """``value`` if it is printable text, else an ASCII escape of it (``\x1b``, ``\udc80``).

    For ids read back from the database and written again (a job's failure records, audit
    events) or shown on a terminal: one edited outside cuscred may hold control characters
    or, on SQLite, bytes that are not UTF-8 (see :func:`cuscred.db.session.sqlite_text`).
    """
    if value.isprintable():
        try:
            value.encode()
            return value
        except UnicodeEncodeError:
            pass
    return ascii(value)[1:-1]


_ACTOR = re.compile(r"[ -~]{1,128}")  # printable ASCII: it is written to the audit trail


def validate_actor(value: object) -> str:
    """``value`` if it can be recorded as who acted: 1-128 printable ASCII characters, and
    not shaped like a provider API key (:func:`key_shaped`: actors are audited in clear).

    Raises :class:`InvalidInputError` (never echoing the value) otherwise.
    """
    if not isinstance(value, str) or not _ACTOR.fullmatch(value) or key_shaped(value):
        raise InvalidInputError("actor must be 1-128 printable ASCII characters, and not "
                                "shaped like a provider API key")
    return str.__str__(value)


def key_shaped(value: str) -> str | None:
    """The provider whose API key ``value`` looks like (a known prefix and body), if any.

    Tenant ids and actors are stored and audited in clear, so a value of that shape (a secret
    passed in the wrong argument) is refused there. Bare 32-hex Azure keys are not refused:
    a UUID without dashes, a common tenant id, has the same shape.
    """
    if not value.startswith(_KEY_PREFIXES):  # the common case, on every access: one C call
        return None
    shape = match_shape(value)
    return None if shape is None else shape.provider


def validate_secret(value: object, *, max_bytes: int, strip: bool = False) -> str:
    """``value`` (stripped of surrounding whitespace if ``strip``) if it is an acceptable secret.

    A secret is one line of text with no control characters, at most ``max_bytes`` bytes of
    UTF-8. The exception is a JSON object (e.g. a Vertex service-account file), which may span
    lines: tabs, line feeds and carriage returns (JSON whitespace) are allowed between its tokens.

    Raises :class:`CuscredTypeError` if ``value`` is not a ``str`` (``bytes`` included), and
    :class:`InvalidSecretError` if it is empty or whitespace only, not encodable as UTF-8 (lone
    surrogates), larger than ``max_bytes``, has leading or trailing whitespace (unless
    ``strip``), or contains a line break (outside a JSON object), NUL or another control
    character.
    """
    if not isinstance(value, str):
        hint = " (decode bytes to str first)" if isinstance(value, bytes | bytearray) else ""
        raise CuscredTypeError(f"secret must be a str, got {type(value).__name__}{hint}")
    secret = str.__str__(value)
    if strip:
        secret = secret.strip()
    if not secret:
        raise InvalidSecretError("secret is empty")
    if not secret.strip():
        raise InvalidSecretError("secret is whitespace only")
    if _utf8_length(secret) > max_bytes:
        raise InvalidSecretError(f"secret is larger than the limit of {max_bytes} bytes (UTF-8)")
    if secret != secret.strip():
        raise InvalidSecretError(
            "secret has leading or trailing whitespace (often a copied newline); remove it, or "
            + _STRIP_HINT
        )
    _check_secret_characters(secret)
    return secret


def validate_context(value: object) -> dict[str, str]:
    """A plain ``dict`` copy of the encryption context ``value``; ``None`` means ``{}``.

    At most 16 items; keys match ``[a-z0-9][a-z0-9_.-]{0,63}``; values are strings of at most
    256 characters without control characters. Context is authenticated, not secret.

    Raises :class:`CuscredTypeError` if ``value`` is not a mapping, and
    :class:`InvalidContextError` naming the offending key for anything else.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CuscredTypeError(f"context must be a mapping, got {type(value).__name__}")
    if len(value) > MAX_CONTEXT_ITEMS:
        raise InvalidContextError(
            f"context has {len(value)} items; at most {MAX_CONTEXT_ITEMS} are allowed"
        )
    result: dict[str, str] = {}
    for key, item in value.items():
        name = _context_key(key)
        result[name] = _context_value(name, item)
    return result


def _check_secret_characters(secret: str) -> None:
    """Refuse control characters; JSON whitespace only between the tokens of a JSON object.

    Also refuse invisible format characters and Unicode line/paragraph separators (categories
    Cf, Zl, Zp: zero-width spaces, a byte-order mark, U+2028): pasted along with a key they
    make a value that looks right and fails at the provider.
    """
    if not secret.isascii():
        for char in secret:
            if unicodedata.category(char) in _INVISIBLE_CATEGORIES:
                raise InvalidSecretError(
                    f"secret contains an invisible character (U+{ord(char):04X}), often "
                    "pasted along with a key; remove it"
                )
    control = _CONTROL.search(secret)
    if control is None:
        return
    if parse_json_object(secret) is not None:
        # json.loads refuses raw control characters inside strings, so LF/CR/tab can only sit
        # between tokens here; C1 controls inside strings are still refused below.
        control = _CONTROL_IN_JSON.search(secret)
        if control is None:
            return
    char = control.group()
    if char in _LINE_BREAKS:
        raise InvalidSecretError(
            "secret contains a line break; a secret must be one line (only a JSON object, "
            "such as a service-account file, may span lines); strip=True (CLI: --strip) "
            "removes only surrounding whitespace"
        )
    if char == "\x00":
        raise InvalidSecretError("secret contains a NUL character")
    raise InvalidSecretError(f"secret contains a control character (U+{ord(char):04X})")


def _context_key(key: object) -> str:
    if not isinstance(key, str):
        raise InvalidContextError(f"context keys must be strings, got {type(key).__name__}")
    name = str.__str__(key)
    if not _CONTEXT_KEY.fullmatch(name):
        what = (f"is {len(name)} characters" if not name or len(name) > 64
                else _first_bad(name, _CONTEXT_FIRST, _CONTEXT_REST))
        raise InvalidContextError(
            f"context key {what}: it must be 1-64 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def _context_value(name: str, item: object) -> str:
    # ``name`` passed _CONTEXT_KEY, so it is safe to show as is.
    if not isinstance(item, str):
        raise InvalidContextError(
            f"context value for {name!r} must be a string, got {type(item).__name__}"
        )
    text = str.__str__(item)
    if len(text) > MAX_CONTEXT_VALUE_LENGTH:
        raise InvalidContextError(
            f"context value for {name!r} is longer than {MAX_CONTEXT_VALUE_LENGTH} characters"
        )
    if _CONTROL.search(text):
        raise InvalidContextError(f"context value for {name!r} contains a control character")
    if not _encodable(text):
        raise InvalidContextError(
            f"context value for {name!r} is not valid Unicode text (lone surrogate)"
        )
    return text


def _utf8_length(secret: str) -> int:
    # Raise outside the except block: a UnicodeEncodeError carries the whole secret in its
    # ``object`` attribute and must not ride along as __context__ into logs or error trackers.
    if not _encodable(secret):
        raise InvalidSecretError("secret is not valid Unicode text (it contains a lone surrogate)")
    return len(secret.encode("utf-8"))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_bad(value: str, first: re.Pattern[str], rest: re.Pattern[str]) -> str:
    """Where ``value`` goes wrong, without repeating it: an invalid tenant id or context key is
    as likely to be a secret passed in the wrong argument as a typo, so messages name the
    position and code point of the first character not allowed, never the text."""
    for position, char in enumerate(value, start=1):
        if not (first if position == 1 else rest).fullmatch(char):
            return f"has a character not allowed at position {position} (U+{ord(char):04X})"
    return f"is {len(value)} characters"


__all__ = [
    "MAX_CONTEXT_ITEMS",
    "MAX_CONTEXT_VALUE_LENGTH",
    "MAX_TENANT_ID_LENGTH",
    "validate_context",
    "validate_secret",
    "validate_tenant_id",
]
