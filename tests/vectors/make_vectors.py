"""Write ``credential_v1.json`` from an independent implementation of the format.

This does NOT import cuscred's crypto: HKDF is written out from RFC 5869 with ``hmac``, and the
header/AAD layout is built by hand from the docstring of ``cuscred/crypto/header.py``. The test
then checks that cuscred produces and opens exactly these bytes, so a change in either the
format or the library's reading of it fails loudly. Run it only when the format version changes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def aad(header: bytes, tenant: str, cred: str, context: dict[str, str]) -> bytes:
    out = header + lp(b"cuscred/credential/v1") + lp(tenant.encode()) + lp(cred.encode())
    out += lp(struct.pack(">I", len(context)))
    for k in sorted(context):
        out += lp(k.encode()) + lp(context[k].encode())
    return out


CASES = [
    ("openai key, empty context", "tenant-a", "cred_0000000000000000000000000a",
     {}, "sk-proj-EXAMPLEexampleEXAMPLEexample0123", 1, 1),
    ("anthropic key, context, later versions", "acme_corp", "cred_0123456789abcdefghjkmnpqrs",
     {"provider": "anthropic", "purpose": "health-check"},
     "sk-ant-api03-EXAMPLE-example_EXAMPLE-0123456789", 7, 3),
    ("unicode plaintext", "t1", "cred_zzzzzzzzzzzzzzzzzzzzzzzzzz",
     {"region": "eu-ouest-été"}, "pässwörd-ключ-密钥", 4294967295, 2),
]


def main() -> None:
    vectors = []
    for i, (name, tenant, cred, ctx, pt, kek_v, gen) in enumerate(CASES):
        kek = bytes((i * 37 + j) % 256 for j in range(32))
        salt = bytes((i * 11 + j * 3) % 256 for j in range(32))
        nonce = bytes((i + j * 5) % 256 for j in range(12))
        okm = hkdf_sha256(kek, salt, b"cuscred/tenant/" + tenant.encode(), 64)
        header = struct.pack(">BII", 1, kek_v, gen)
        sealed = AESGCM(okm[:32]).encrypt(nonce, pt.encode(), aad(header, tenant, cred, ctx))
        vectors.append({
            "name": name, "tenant_id": tenant, "credential_id": cred, "context": ctx,
            "plaintext": pt, "kek_version": kek_v, "key_generation": gen,
            "kek_hex": kek.hex(), "salt_hex": salt.hex(), "nonce_hex": nonce.hex(),
            "kdf": "hkdf-sha256",
            "data_key_hex": okm[:32].hex(), "fingerprint_key_hex": okm[32:].hex(),
            "ciphertext_hex": (header + nonce + sealed).hex(),
        })
    out = Path(__file__).with_name("credential_v1.json")
    out.write_text(json.dumps({"format": "cuscred ciphertext v1", "vectors": vectors}, indent=2,
                              ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
