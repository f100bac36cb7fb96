"""Seal a plaintext for a credential row, and open a stored row: the one path both the
credential service and the re-encryption worker use, so they cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

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


class RowKeys(Protocol):
    """Where :func:`open_row` gets its keys: the :class:`KeyManager`, or a :class:`TaskKeys`."""

    def ensure_decryptable(self, conn: Executor, version: int) -> None: ...

    def tenant_key(
        self, conn: Executor, tenant_id: str, generation: int, kek_version: int
    ) -> TenantKey: ...


class TaskKeys:
    """The keys of one task (a chunk, a verify pass): each looked up once, then held here.

    DESIGN.md asks a task to derive each tenant key once; the process-wide cache would already
    spare the derivation, but its TTL bookkeeping and lock cost more per row than the AES-GCM
    work itself. A task is short, and a KEK version that rows still use cannot be retired
    under it (the census refuses), so holding the answers for its duration is safe. Lives on
    the stack of one task: never stored, pickled or shared.
    """

    __slots__ = ("_decryptable", "_keys", "_manager")

    def __init__(self, manager: KeyManager) -> None:
        self._manager = manager
        self._keys: dict[tuple[str, int, int], TenantKey] = {}
        self._decryptable: set[int] = set()

    def ensure_decryptable(self, conn: Executor, version: int) -> None:
        if version not in self._decryptable:
            self._manager.ensure_decryptable(conn, version)  # raises: not remembered
            self._decryptable.add(version)

    def tenant_key(
        self, conn: Executor, tenant_id: str, generation: int, kek_version: int
    ) -> TenantKey:
        cache_key = (tenant_id, generation, kek_version)
        key = self._keys.get(cache_key)
        if key is None:
            key = self._keys[cache_key] = self._manager.tenant_key(
                conn, tenant_id, generation, kek_version
            )
        return key

    def __repr__(self) -> str:
        return f"<TaskKeys keys={len(self._keys)} material=<redacted>>"

    def __reduce__(self) -> tuple[()]:
        raise TypeError("TaskKeys holds key material and cannot be pickled")


def context_to_json(context: Mapping[str, str]) -> str:
    """Canonical text of a context, as stored in ``credentials.context_json``."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def context_from_json(text: str) -> dict[str, str]:
    """Parse a stored context; anything but an object of strings is a damaged row."""
    try:
        value = json.loads(text)
        text.encode()  # TEXT that was not UTF-8 comes back with lone surrogates (sqlite_text)
    except (ValueError, TypeError, AttributeError):  # not JSON, not even text: tampered
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
    keys: RowKeys,
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
    try:
        key = keys.tenant_key(conn, tenant_id, parsed.key_generation, parsed.kek_version)
        return aead.decrypt_parsed(key, parsed, credential_id=credential_id, context=context)
    except UnicodeEncodeError:  # an id or context edited into text that is not UTF-8
        raise DecryptionError() from None


__all__ = [
    "RowKeys", "Sealed", "TaskKeys", "context_from_json", "context_to_json", "open_row",
    "seal_with",
]
