"""Encrypt and decrypt one credential value with a tenant key (AES-256-GCM).

The nonce is never a caller's argument: :func:`encrypt` draws 96 random bits and calls the
private deterministic core :func:`_encrypt_with_nonce`, which the known-answer vectors in
``tests/vectors/`` exercise (the pyca/cryptography ``encrypt_at_time`` pattern).

Random 96-bit nonces are safe for up to 2**32 encryptions under one key (NIST SP 800-38D); one
tenant key encrypts one tenant's credentials for one KEK version and generation, far below that.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag

from cuscred.crypto.header import (
    NONCE_LEN,
    UnverifiedCiphertext,
    canonical_aad,
    pack_header,
    parse_unverified,
)
from cuscred.crypto.keys import TenantKey
from cuscred.errors import DecryptionError


def encrypt(
    key: TenantKey,
    plaintext: bytes,
    *,
    credential_id: str,
    context: Mapping[str, str],
) -> bytes:
    """Seal ``plaintext`` for ``key``'s tenant and the row ``credential_id``."""
    return _encrypt_with_nonce(
        key, plaintext, os.urandom(NONCE_LEN), credential_id=credential_id, context=context
    )


def _encrypt_with_nonce(
    key: TenantKey,
    plaintext: bytes,
    nonce: bytes,
    *,
    credential_id: str,
    context: Mapping[str, str],
) -> bytes:
    header = pack_header(key.kek_version, key.generation)
    aad = canonical_aad(header, key.tenant_id, credential_id, context)
    return header + nonce + key.aead.encrypt(nonce, plaintext, aad)


def decrypt(
    key: TenantKey,
    blob: bytes,
    *,
    credential_id: str,
    context: Mapping[str, str],
) -> bytes:
    """Open ``blob`` with ``key``; any mismatch or forgery raises :class:`DecryptionError`.

    The caller picks ``key`` from the versions in the header (see :func:`parse_unverified`);
    this function re-checks that they match, so a wrong key can never be tried by mistake.
    """
    return decrypt_parsed(
        key, parse_unverified(blob), credential_id=credential_id, context=context
    )


def decrypt_parsed(
    key: TenantKey,
    parsed: UnverifiedCiphertext,
    *,
    credential_id: str,
    context: Mapping[str, str],
) -> bytes:
    """:func:`decrypt` for a caller that already split the blob to choose the key."""
    if (parsed.kek_version, parsed.key_generation) != (key.kek_version, key.generation):
        raise DecryptionError()
    aad = canonical_aad(parsed.header, key.tenant_id, credential_id, context)
    try:
        return key.aead.decrypt(parsed.nonce, parsed.sealed, aad)
    except InvalidTag:
        raise DecryptionError() from None


__all__ = ["decrypt", "decrypt_parsed", "encrypt"]
