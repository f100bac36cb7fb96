"""Tenant key derivation: KEK version + tenant salt -> data key and fingerprint key.

Two KDFs, chosen per tenant key generation and stored with it (never re-read from mutable
configuration, so changing the default never orphans existing ciphertexts):

* ``hkdf-sha256`` (default). The KEK is 256 uniformly random bits, so a plain extract-and-expand
  KDF is the right tool; iteration counts only slow down password guessing. ~6 us.
* ``pbkdf2-sha256`` with a recorded iteration count: compatible with how the original service
  derived tenant keys. ~127 ms at 600k iterations, which is why derived keys are cached.

Both produce 64 bytes: the first 32 are the AES-256-GCM data key, the last 32 the HMAC key for
plaintext fingerprints. The tenant id is bound in: HKDF ``info`` is ``cuscred/tenant/<tenant_id>``;
PBKDF2 has no ``info`` parameter, so the same label is appended to the salt.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from cuscred.config import KdfName
from cuscred.crypto.keys import KEY_BYTES, Kek, TenantKey
from cuscred.errors import InvalidInputError

MIN_SALT_BYTES = 16
MIN_PBKDF2_ITERATIONS = 100_000
#: ~20 s per derivation here: above it a stored count is a damaged (or hostile) row, which
#: would stall every process touching the tenant (and, on SQLite, hold the write lock).
MAX_PBKDF2_ITERATIONS = 100_000_000


@dataclass(frozen=True, slots=True)
class KdfParams:
    """How one tenant key generation derives its key; stored in ``tenant_keys``."""

    name: KdfName
    iterations: int | None = None

    def __post_init__(self) -> None:
        if self.name is KdfName.PBKDF2_SHA256:
            if self.iterations is None or not (
                    MIN_PBKDF2_ITERATIONS <= self.iterations <= MAX_PBKDF2_ITERATIONS):
                raise InvalidInputError(
                    f"pbkdf2-sha256 needs {MIN_PBKDF2_ITERATIONS:,} to "
                    f"{MAX_PBKDF2_ITERATIONS:,} iterations"
                )
        elif self.iterations is not None:
            raise InvalidInputError("hkdf-sha256 takes no iteration count")


def parse_kdf_name(name: str) -> KdfName:
    """``name`` as a :class:`KdfName`; :class:`InvalidInputError` naming the known ones if it is
    not one (the value itself is not repeated: input is described, never echoed)."""
    try:
        return KdfName(name)
    except ValueError:
        known = ", ".join(k.value for k in KdfName)
        raise InvalidInputError(f"unknown KDF; known: {known}") from None


def tenant_info(tenant_id: str) -> bytes:
    return b"cuscred/tenant/" + tenant_id.encode()


def derive_tenant_key(
    kek: Kek, *, tenant_id: str, generation: int, salt: bytes, params: KdfParams
) -> TenantKey:
    """Derive the tenant key for (KEK version, tenant, generation). Pure and deterministic."""
    if len(salt) < MIN_SALT_BYTES:
        raise InvalidInputError(f"tenant salt must be at least {MIN_SALT_BYTES} bytes")
    okm = _derive(kek.material(), salt, tenant_info(tenant_id), params)
    return TenantKey(
        tenant_id=tenant_id,
        generation=generation,
        kek_version=kek.version,
        data_key=okm[:KEY_BYTES],
        fingerprint_key=okm[KEY_BYTES:],
    )


def _derive(ikm: bytes, salt: bytes, info: bytes, params: KdfParams) -> bytes:
    length = 2 * KEY_BYTES
    if params.name is KdfName.HKDF_SHA256:
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
    assert params.iterations is not None  # checked in KdfParams
    return PBKDF2HMAC(
        algorithm=hashes.SHA256(),
        length=length,
        salt=salt + b"|" + info,
        iterations=params.iterations,
    ).derive(ikm)


__all__ = [
    "MAX_PBKDF2_ITERATIONS", "MIN_SALT_BYTES", "KdfParams", "derive_tenant_key",
    "parse_kdf_name", "tenant_info",
]
