"""The stored ciphertext format: the one place that builds and parses it.

Layout (all integers unsigned big-endian)::

    offset  size  field
    0       1     format byte, 0x01 for this layout
    1       4     kek_version              KEK version the tenant key was derived from (>= 1)
    5       4     key_generation           tenant key generation, i.e. which salt (>= 1)
    9       12    nonce                    random per encryption, drawn inside encrypt()
    21      n+16  AES-256-GCM ciphertext of the n-byte plaintext, followed by the 16-byte tag

The first 9 bytes (format, kek_version, key_generation) are the *header*. The header is part of
the AAD, so editing any header byte makes authentication fail; the nonce is covered by GCM itself.
Decryption reads both versions from the header and asks for exactly that key: there is no trial
decryption over several keys.

AAD = header || canonical(tenant_id, credential_id, context), where canonical() is a sequence of
length-prefixed UTF-8 fields (u32 BE length, then bytes): a domain label, tenant id, credential
id, the number of context items, then each context key and value with keys sorted. Length
prefixes make the encoding injective: no two different inputs produce the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cuscred.errors import DecryptionError

FORMAT_V1 = 0x01
_HEADER = struct.Struct(">BII")
HEADER_LEN = _HEADER.size  # 9
NONCE_LEN = 12
TAG_LEN = 16
MIN_LEN = HEADER_LEN + NONCE_LEN + TAG_LEN + 1  # a plaintext is never empty
_U32_MAX = 2**32 - 1
_AAD_LABEL = b"cuscred/credential/v1"
_LEN = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class UnverifiedCiphertext:
    """Fields of a stored ciphertext, *not yet authenticated*: trust nothing here until the
    AEAD tag has been checked with the key these versions name."""

    kek_version: int
    key_generation: int
    header: bytes
    nonce: bytes
    sealed: bytes  # ciphertext || tag


def pack_header(kek_version: int, key_generation: int) -> bytes:
    """The 9-byte header for a new ciphertext."""
    if not (1 <= kek_version <= _U32_MAX and 1 <= key_generation <= _U32_MAX):
        raise ValueError("key versions must be in 1..2**32-1")
    return _HEADER.pack(FORMAT_V1, kek_version, key_generation)


def parse_unverified(blob: object) -> UnverifiedCiphertext:
    """Split untrusted bytes into fields, checking bounds before slicing.

    Raises :class:`DecryptionError` for anything that is not a well-formed v1 ciphertext, so a
    caller never learns more from a malformed blob than from a forged one.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise DecryptionError()
    blob = bytes(blob)
    if len(blob) < MIN_LEN:
        raise DecryptionError()
    fmt, kek_version, key_generation = _HEADER.unpack_from(blob, 0)
    if fmt != FORMAT_V1 or kek_version == 0 or key_generation == 0:
        raise DecryptionError()
    return UnverifiedCiphertext(
        kek_version=kek_version,
        key_generation=key_generation,
        header=blob[:HEADER_LEN],
        nonce=blob[HEADER_LEN : HEADER_LEN + NONCE_LEN],
        sealed=blob[HEADER_LEN + NONCE_LEN :],
    )


def canonical_aad(
    header: bytes, tenant_id: str, credential_id: str, context: Mapping[str, str]
) -> bytes:
    """AAD binding a ciphertext to its header, tenant, row and caller-supplied context."""
    fields = [_AAD_LABEL, tenant_id.encode(), credential_id.encode(), _LEN.pack(len(context))]
    for key in sorted(context):
        fields.append(key.encode())
        fields.append(context[key].encode())
    out = bytearray(header)
    for field in fields:
        out += _LEN.pack(len(field))
        out += field
    return bytes(out)


__all__ = [
    "FORMAT_V1",
    "HEADER_LEN",
    "MIN_LEN",
    "NONCE_LEN",
    "TAG_LEN",
    "UnverifiedCiphertext",
    "canonical_aad",
    "pack_header",
    "parse_unverified",
]
