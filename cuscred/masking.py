"""Masked forms of secrets and references, safe for logs, UIs and the ``credentials.masked`` column.

What a mask may reveal:

* a secret: at most a known provider prefix from :data:`cuscred.providers.KEY_SHAPES` and the last
  4 characters (``sk-proj-…Ab3x``). Short secrets, and secrets where prefix + 4 would show more
  than a third of them, become a fixed ``********`` that does not reveal the length. An unknown
  prefix is never shown.
* a JSON credential: identifying fields (type, project_id, client_email, …) as they are, every
  other field ``********`` (a PEM private key not even partly), on one line.
* a reference: ``encrypted://`` ids as they are (ids are not secret); ``vault://`` without the
  tenant part of the path; ``env://`` with the name's prefix only.
"""

from __future__ import annotations

import json
import re

from cuscred.errors import CuscredTypeError, MalformedReferenceError
from cuscred.providers import json_provider, match_shape, parse_json_object
from cuscred.references import EncryptedRef, Reference, VaultRef, parse_reference

MASK = "********"
ELLIPSIS = "\u2026"
MAX_HINT_LENGTH = 64
_TAIL = 4
_MIN_SHOWN_LENGTH = 12  # below this, even 4 characters are too many
_REFERENCE_SCHEMES = ("encrypted://", "vault://", "env://")
_SHOWABLE_TAIL = re.compile(r"[!-~]{4}")  # printable ASCII, no spaces: keeps the mask one line

#: Fields of a JSON credential that identify it without granting access; all others are masked.
PUBLIC_JSON_FIELDS = frozenset(
    {
        "type",
        "project_id",
        "client_email",
        "client_id",
        "auth_uri",
        "token_uri",
        "auth_provider_x509_cert_url",
        "client_x509_cert_url",
        "universe_domain",
        "region",
    }
)
_SHOWABLE_VALUE = re.compile(r"[ -~]{1,128}")
# Field names shown as is; anything else (which could itself be a pasted secret) is renamed.
_SHOWABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def mask_credential(value_or_ref: object, *, env_prefix: str | None = None) -> str:
    """The masked form of a secret or of a reference, on one line.

    A string that parses as a reference is masked as a reference; anything else, including text
    that looks like a reference but is malformed (it might be a secret), is masked as a secret.
    ``env_prefix`` (``Settings.env_ref_prefix``) is what an ``env://`` mask may show of a name.

    Raises :class:`CuscredTypeError` if ``value_or_ref`` is not a ``str``.
    """
    text = _as_str(value_or_ref)
    if text.startswith(_REFERENCE_SCHEMES):
        try:
            return _mask_reference(parse_reference(text), env_prefix)
        except MalformedReferenceError:
            pass  # not a valid reference: treat it as the secret it may be
    return mask_secret(text)


def mask_secret(secret: str) -> str:
    """The masked form of ``secret``, never read as a reference. One line; for a JSON credential
    it can be long (use :func:`masked_hint` for a bounded form).

    Raises :class:`CuscredTypeError` if ``secret`` is not a ``str``.
    """
    text = _as_str(secret)
    doc = parse_json_object(text)
    if doc is not None:
        return _mask_json(doc)
    shape = match_shape(text)
    return _prefix_and_tail(text, "" if shape is None else shape.prefix)


def masked_hint(secret: str) -> str:
    """What to store in the ``credentials.masked`` column: at most 64 characters, one line.

    For a plain key, the same as :func:`mask_secret`. For a JSON credential, the provider and
    its identifying e-mail or project (e.g. ``vertex JSON sa@p.iam.gserviceaccount.com``),
    truncated to fit. The value is always treated as a secret, never as a reference.

    Raises :class:`CuscredTypeError` if ``secret`` is not a ``str``.
    """
    text = _as_str(secret)
    doc = parse_json_object(text)
    if doc is None:
        return mask_secret(text)  # at most len("sk-ant-api03-") + 1 + 4 characters
    hint = f"{json_provider(doc)} JSON"
    for name in ("client_email", "project_id"):
        shown = _public_value(name, doc.get(name))
        if shown is not None:
            hint = f"{hint} {shown}"
            break
    if len(hint) > MAX_HINT_LENGTH:
        hint = hint[: MAX_HINT_LENGTH - 1] + ELLIPSIS
    return hint


def _as_str(value: object) -> str:
    if not isinstance(value, str):
        raise CuscredTypeError(f"expected a str to mask, got {type(value).__name__}")
    return str.__str__(value)


def _prefix_and_tail(secret: str, prefix: str) -> str:
    """``prefix…tail`` if that reveals little enough of ``secret``, else :data:`MASK`."""
    tail = secret[-_TAIL:]
    revealed = len(prefix) + _TAIL
    if (
        len(secret) < _MIN_SHOWN_LENGTH
        or revealed * 3 > len(secret)
        or not _SHOWABLE_TAIL.fullmatch(tail)
    ):
        return MASK
    return f"{prefix}{ELLIPSIS}{tail}"


def _mask_json(doc: dict[str, object]) -> str:
    """Field by field: public fields shown, every other value replaced by :data:`MASK`."""
    shown: dict[str, str] = {}
    for index, (name, value) in enumerate(doc.items()):
        key = name if _SHOWABLE_NAME.fullmatch(name) else f"?{index}"
        public = _public_value(name, value)
        shown[key] = MASK if public is None else public
    # ensure_ascii and no indent: one line, control characters escaped.
    return json.dumps(shown, ensure_ascii=True)


def _public_value(name: str, value: object) -> str | None:
    """``value`` if ``name`` is a public field and the value is a short printable string."""
    if name in PUBLIC_JSON_FIELDS and isinstance(value, str) and _SHOWABLE_VALUE.fullmatch(value):
        return value
    return None


def _mask_reference(ref: Reference, env_prefix: str | None) -> str:
    if isinstance(ref, EncryptedRef):
        return str(ref)
    if isinstance(ref, VaultRef):
        return _mask_vault(ref)
    name = ref.name
    if env_prefix and name.startswith(env_prefix):
        shown = env_prefix
    else:
        # Without a configured prefix, show the first word of the name at most (``DEV_``).
        head, underscore, _ = name.partition("_")
        shown = head + underscore if underscore else ""
    return f"env://{shown}{ELLIPSIS}"


def _mask_vault(ref: VaultRef) -> str:
    """``vault://<mount>/…/<last segment>#<field>``: the tenant part of the path is hidden.

    The last segment is shown only when at least two segments precede it, so that a path of
    the form ``<prefix>/<tenant>`` never shows the tenant.
    """
    segments = ref.path.split("/")
    tail = f"/{segments[-1]}" if len(segments) >= 3 else ""
    query = "" if ref.version is None else f"?version={ref.version}"
    return f"vault://{ref.mount}/{ELLIPSIS}{tail}{query}#{ref.field}"


__all__ = ["MASK", "PUBLIC_JSON_FIELDS", "mask_credential", "mask_secret", "masked_hint"]
