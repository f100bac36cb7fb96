"""Credential ids: ``cred_`` followed by 26 characters of lower-case Crockford base32.

An id carries exactly 128 random bits. 26 base32 characters hold 130 bits, so the top two bits
are always zero and the first character is one of ``0``-``7`` (the same trick as ULID).
:func:`is_credential_id` checks that too, so every valid id maps to exactly one 128-bit value and
no two spellings name the same credential. Ids are not secret: they appear in references, audit
rows and error messages.
"""

from __future__ import annotations

import re
import secrets

PREFIX = "cred_"
#: Crockford's base32 alphabet in lower case (no i, l, o, u: nothing to misread).
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
BODY_LENGTH = 26
CREDENTIAL_ID_LENGTH = len(PREFIX) + BODY_LENGTH  # 31
_BITS = 128
_FIRST_CHARS = frozenset(ALPHABET[: 2 ** (_BITS - 5 * (BODY_LENGTH - 1))])  # "01234567"
_ID_PATTERN = re.compile(
    re.escape(PREFIX) + f"[{''.join(sorted(_FIRST_CHARS))}][{ALPHABET}]{{{BODY_LENGTH - 1}}}"
)


def new_credential_id() -> str:
    """A fresh credential id with 128 bits from the operating system's CSPRNG."""
    return PREFIX + _encode(secrets.randbits(_BITS))


def is_credential_id(value: object) -> bool:
    """Whether ``value`` is exactly a credential id: prefix, length, alphabet, first character.

    Never raises; anything that is not a ``str`` is simply not an id. No case folding: an id in
    upper case is not an id.
    """
    if not isinstance(value, str):
        return False
    text = str.__str__(value)  # a plain str, whatever subclass came in
    if len(text) != CREDENTIAL_ID_LENGTH or not text.startswith(PREFIX):
        return False
    return _ID_PATTERN.fullmatch(text) is not None


def _encode(value: int) -> str:
    """The 26-character base32 form of a 128-bit integer, most significant digit first."""
    if not 0 <= value < 2**_BITS:
        raise ValueError("credential id value must fit in 128 bits")
    digits = []
    for _ in range(BODY_LENGTH):
        value, digit = divmod(value, 32)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


__all__ = ["CREDENTIAL_ID_LENGTH", "PREFIX", "is_credential_id", "new_credential_id"]
