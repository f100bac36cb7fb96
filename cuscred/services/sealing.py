"""Seal a plaintext for a credential row, and open a stored row: the one path both the
credential service and the re-encryption worker use, so they cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from cuscred.crypto import aead
from cuscred.crypto.header import parse_unverified
from cuscred.crypto.keys import TenantKey
from cuscred.db.raw import Executor
from cuscred.errors import DecryptionError
from cuscred.services.keys import KeyManager


@dataclass(frozen=True, slots=True)
class Sealed:
    """What gets written to a credential row (no plaintext, no key material)."""

    ciphertext: bytes
    kek_version: int
    key_generation: int
    fingerprint: bytes

    def __repr__(self) -> str:
        return (
            f"<Sealed kek_version={self.kek_version} key_generation={self.key_generation} "
            f"bytes={len(self.ciphertext)}>"
        )


def context_to_json(context: Mapping[str, str]) -> str:
    """Canonical text of a context, as stored in ``credentials.context_json``."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def context_from_json(text: str) -> dict[str, str]:
    """Parse a stored context; anything but an object of strings is a damaged row."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError):  # not JSON, or not even text (a tampered column)
        raise DecryptionError() from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise DecryptionError()
    return value


def seal_with(
    key: TenantKey, plaintext: bytes, *, credential_id: str, context: Mapping[str, str]
) -> Sealed:
    return Sealed(
        ciphertext=aead.encrypt(key, plaintext, credential_id=credential_id, context=context),
        kek_version=key.kek_version,
        key_generation=key.generation,
        fingerprint=key.fingerprint(plaintext),
    )


def open_row(
    keys: KeyManager,
    conn: Executor,
    *,
    tenant_id: str,
    credential_id: str,
    ciphertext: object,
    kek_version: int,
    key_generation: int,
    context: Mapping[str, str],
) -> bytes:
    """Decrypt a stored row with exactly the key its authenticated header names.

    The version columns must agree with the header (they are copies kept for indexing); a
    retired or unknown KEK version is refused. Every failure is :class:`DecryptionError`,
    except a KEK that cannot be *loaded*, which is an availability problem and says so.
    """
    parsed = parse_unverified(ciphertext)  # anything but bytes is refused as a forgery
    if (parsed.kek_version, parsed.key_generation) != (kek_version, key_generation):
        raise DecryptionError()
    keys.ensure_decryptable(conn, parsed.kek_version)
    key = keys.tenant_key(conn, tenant_id, parsed.key_generation, parsed.kek_version)
    return aead.decrypt_parsed(key, parsed, credential_id=credential_id, context=context)


__all__ = ["Sealed", "context_from_json", "context_to_json", "open_row", "seal_with"]
