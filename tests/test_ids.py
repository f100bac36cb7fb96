"""Credential ids: shape, entropy layout, strict recognition."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuscred.ids import (
    ALPHABET,
    CREDENTIAL_ID_LENGTH,
    PREFIX,
    _encode,
    is_credential_id,
    new_credential_id,
)

_ID = re.compile(r"cred_[0-7][0-9a-hjkmnp-tv-z]{25}")


def test_new_ids_have_the_documented_shape() -> None:
    ids = {new_credential_id() for _ in range(2000)}
    assert len(ids) == 2000  # 128 random bits: collisions would mean a broken RNG
    for cid in ids:
        assert len(cid) == CREDENTIAL_ID_LENGTH == 31
        assert _ID.fullmatch(cid), cid
        assert is_credential_id(cid)


def test_first_character_covers_exactly_the_top_three_bits() -> None:
    firsts = {new_credential_id()[len(PREFIX)] for _ in range(2000)}
    assert firsts == set("01234567")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0" * 26),
        (1, "0" * 25 + "1"),
        (31, "0" * 25 + "z"),
        (32, "0" * 24 + "10"),
        (2**128 - 1, "7" + "z" * 25),
    ],
)
def test_encode_known_answers(value: int, expected: str) -> None:
    assert _encode(value) == expected


@pytest.mark.parametrize("value", [-1, 2**128])
def test_encode_refuses_values_outside_128_bits(value: int) -> None:
    with pytest.raises(ValueError, match="128 bits"):
        _encode(value)


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_encode_is_a_bijection_onto_valid_ids(value: int) -> None:
    body = _encode(value)
    assert is_credential_id(PREFIX + body)
    assert int("".join(f"{ALPHABET.index(c):05b}" for c in body), 2) == value


_VALID = "cred_" + "0" * 26
_GOOD = new_credential_id()


@pytest.mark.parametrize(
    "value",
    [
        "",
        "cred_",
        _GOOD[:-1],  # too short
        _GOOD + "0",  # too long
        _GOOD.upper(),  # no case folding
        "CRED_" + _GOOD[5:],
        "cred-" + _GOOD[5:],
        "crd_" + _GOOD[4:] + "0",
        "cred_8" + "0" * 25,  # first char above 7: more than 128 bits
        "cred_z" + "0" * 25,
        "cred_" + "0" * 25 + "i",  # letters outside Crockford's alphabet
        "cred_" + "0" * 25 + "l",
        "cred_" + "0" * 25 + "o",
        "cred_" + "0" * 25 + "u",
        "cred_" + "0" * 25 + "\u0661",  # Arabic-Indic digit one
        "cred_" + "0" * 25 + "\uff10",  # fullwidth zero
        " " + _VALID[1:],
        _VALID[:-1] + "\n",
        None,
        123,
        b"cred_" + b"0" * 26,
        ["cred_" + "0" * 26],
    ],
)
def test_is_credential_id_is_strict(value: object) -> None:
    assert is_credential_id(value) is False


def test_is_credential_id_accepts_str_subclasses() -> None:
    class Id(str):
        pass

    assert is_credential_id(Id(_VALID))
