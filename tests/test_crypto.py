"""The crypto layer: known-answer vectors, header parsing, tamper detection, key handles."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuscred.config import KdfName
from cuscred.crypto import aead
from cuscred.crypto.header import HEADER_LEN, MIN_LEN, NONCE_LEN, pack_header, parse_unverified
from cuscred.crypto.kdf import KdfParams, derive_tenant_key
from cuscred.crypto.keys import Kek, TenantKey
from cuscred.errors import CuscredTypeError, DecryptionError, InvalidInputError

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "credential_v1.json").read_text()
)["vectors"]


def _key_for(vector: dict[str, Any]) -> TenantKey:
    kek = Kek(vector["kek_version"], bytes.fromhex(vector["kek_hex"]))
    return derive_tenant_key(
        kek,
        tenant_id=vector["tenant_id"],
        generation=vector["key_generation"],
        salt=bytes.fromhex(vector["salt_hex"]),
        params=KdfParams(KdfName(vector["kdf"])),
    )


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_known_answer_encrypt(vector: dict[str, Any]) -> None:
    blob = aead._encrypt_with_nonce(
        _key_for(vector),
        vector["plaintext"].encode(),
        bytes.fromhex(vector["nonce_hex"]),
        credential_id=vector["credential_id"],
        context=vector["context"],
    )
    assert blob.hex() == vector["ciphertext_hex"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_known_answer_decrypt(vector: dict[str, Any]) -> None:
    plaintext = aead.decrypt(
        _key_for(vector),
        bytes.fromhex(vector["ciphertext_hex"]),
        credential_id=vector["credential_id"],
        context=vector["context"],
    )
    assert plaintext.decode() == vector["plaintext"]


def test_fingerprint_key_is_derived_alongside_the_data_key() -> None:
    vector = VECTORS[0]
    import hmac

    expected = hmac.new(
        bytes.fromhex(vector["fingerprint_key_hex"]), b"abc", "sha256"
    ).digest()
    assert _key_for(vector).fingerprint(b"abc") == expected


@pytest.fixture
def sealed() -> tuple[TenantKey, bytes]:
    key = _key_for(VECTORS[1])
    blob = aead.encrypt(key, b"sk-ant-secret", credential_id="cred_x", context={"a": "b"})
    return key, blob


def test_every_single_byte_flip_fails(sealed: tuple[TenantKey, bytes]) -> None:
    key, blob = sealed
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[i] ^= bit
            with pytest.raises(DecryptionError) as info:
                aead.decrypt(key, bytes(tampered), credential_id="cred_x", context={"a": "b"})
            assert str(info.value) == "credential could not be decrypted"


@pytest.mark.parametrize("cut", [0, 1, HEADER_LEN, HEADER_LEN + NONCE_LEN, MIN_LEN - 1, -1])
def test_truncated_ciphertext_fails(sealed: tuple[TenantKey, bytes], cut: int) -> None:
    key, blob = sealed
    with pytest.raises(DecryptionError):
        aead.decrypt(key, blob[:cut], credential_id="cred_x", context={"a": "b"})


@pytest.mark.parametrize(
    ("credential_id", "context"),
    [
        ("cred_y", {"a": "b"}),  # moved to another row
        ("cred_x", {}),  # context dropped
        ("cred_x", {"a": "c"}),  # context changed
        ("cred_x", {"a": "b", "c": "d"}),  # context extended
    ],
)
def test_aad_binds_row_and_context(
    sealed: tuple[TenantKey, bytes], credential_id: str, context: dict[str, str]
) -> None:
    key, blob = sealed
    with pytest.raises(DecryptionError):
        aead.decrypt(key, blob, credential_id=credential_id, context=context)


def test_other_tenant_key_fails(sealed: tuple[TenantKey, bytes]) -> None:
    _, blob = sealed
    vector = dict(VECTORS[1], tenant_id="other_tenant")
    with pytest.raises(DecryptionError):
        aead.decrypt(_key_for(vector), blob, credential_id="cred_x", context={"a": "b"})


def test_aad_fields_are_length_prefixed() -> None:
    key = _key_for(VECTORS[0])
    # ("ab", "c") and ("a", "bc") must not collide.
    blob = aead.encrypt(key, b"v", credential_id="x", context={"ab": "c"})
    with pytest.raises(DecryptionError):
        aead.decrypt(key, blob, credential_id="x", context={"a": "bc"})


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x02" + bytes(40), "text", None, 5])
def test_parse_unverified_rejects_junk(blob: object) -> None:
    with pytest.raises(DecryptionError):
        parse_unverified(blob)  # type: ignore[arg-type]


def test_header_with_version_zero_is_rejected() -> None:
    blob = b"\x01" + bytes(8) + bytes(NONCE_LEN) + bytes(17)
    with pytest.raises(DecryptionError):
        parse_unverified(blob)


def test_nonces_are_fresh() -> None:
    key = _key_for(VECTORS[0])
    blobs = {aead.encrypt(key, b"same", credential_id="c", context={}) for _ in range(200)}
    assert len(blobs) == 200


def test_pbkdf2_and_hkdf_give_different_keys() -> None:
    kek = Kek(1, bytes(range(32)))
    salt = bytes(16)
    hk = derive_tenant_key(kek, tenant_id="t", generation=1, salt=salt,
                           params=KdfParams(KdfName.HKDF_SHA256))
    pb = derive_tenant_key(kek, tenant_id="t", generation=1, salt=salt,
                           params=KdfParams(KdfName.PBKDF2_SHA256, 100_000))
    blob = aead.encrypt(hk, b"x", credential_id="c", context={})
    with pytest.raises(DecryptionError):
        aead.decrypt(pb, blob, credential_id="c", context={})


@pytest.mark.parametrize(
    ("name", "iterations"),
    [(KdfName.PBKDF2_SHA256, None), (KdfName.PBKDF2_SHA256, 1000), (KdfName.HKDF_SHA256, 5)],
)
def test_kdf_params_are_checked(name: KdfName, iterations: int | None) -> None:
    with pytest.raises(InvalidInputError):
        KdfParams(name, iterations)


def test_short_salt_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        derive_tenant_key(Kek(1, bytes(32)), tenant_id="t", generation=1, salt=bytes(8),
                          params=KdfParams(KdfName.HKDF_SHA256))


@pytest.mark.parametrize("material", [b"short", bytes(33), "a" * 32])
def test_kek_material_is_checked(material: object) -> None:
    with pytest.raises((InvalidInputError, CuscredTypeError)):
        Kek(1, material)  # type: ignore[arg-type]


def test_key_handles_redact_and_refuse_pickling() -> None:
    material = bytes(range(32))
    kek = Kek(3, material)
    key = _key_for(VECTORS[0])
    for obj in (kek, key):
        text = repr(obj) + str(obj)
        assert "redacted" in text
        assert material.hex() not in text and repr(material) not in text
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        with pytest.raises(TypeError):
            copy.copy(obj)


# --- property tests: the header parser and decrypt never fail any other way ------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_to_fields_that_rebuild_them_or_raise_decryption_error(
    blob: bytes,
) -> None:
    well_formed = (len(blob) >= MIN_LEN and blob[0] == 0x01
                   and blob[1:5] != bytes(4) and blob[5:9] != bytes(4))
    if not well_formed:
        with pytest.raises(DecryptionError, match=r"^credential could not be decrypted$"):
            parse_unverified(blob)
        return
    parsed = parse_unverified(blob)
    assert parsed.header == pack_header(parsed.kek_version, parsed.key_generation)
    assert parsed.header + parsed.nonce + parsed.sealed == blob
    assert len(parsed.nonce) == NONCE_LEN


@settings(max_examples=300, deadline=None)
@given(
    kek_version=st.integers(1, 2**32 - 1), generation=st.integers(1, 2**32 - 1),
    body=st.binary(min_size=MIN_LEN - HEADER_LEN, max_size=120),
)
def test_well_formed_headers_round_trip(kek_version: int, generation: int, body: bytes) -> None:
    blob = pack_header(kek_version, generation) + body
    parsed = parse_unverified(blob)
    assert (parsed.kek_version, parsed.key_generation) == (kek_version, generation)
    assert parsed.header + parsed.nonce + parsed.sealed == blob


_FUZZ_KEY = _key_for(VECTORS[1])
_FUZZ_BLOB = aead.encrypt(_FUZZ_KEY, b"sk-ant-secret", credential_id="cred_x", context={})


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=120)
    | st.builds(  # near misses: the real blob with a few bytes overwritten, cut or extended
        lambda at, junk, cut: (_FUZZ_BLOB[:at] + junk + _FUZZ_BLOB[at + len(junk):])[:cut],
        st.integers(0, len(_FUZZ_BLOB)), st.binary(min_size=1, max_size=4),
        st.integers(0, len(_FUZZ_BLOB) + 4),
    )
)
def test_decrypt_of_anything_but_the_real_blob_raises_only_decryption_error(blob: bytes) -> None:
    if blob == _FUZZ_BLOB:
        assert aead.decrypt(_FUZZ_KEY, blob, credential_id="cred_x", context={}) == b"sk-ant-secret"
        return
    with pytest.raises(DecryptionError):
        aead.decrypt(_FUZZ_KEY, blob, credential_id="cred_x", context={})
