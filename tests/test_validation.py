"""Input checks: typed errors, clear messages, never an echo of the secret."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuscred.errors import (
    CuscredTypeError,
    InvalidContextError,
    InvalidInputError,
    InvalidSecretError,
    InvalidTenantError,
)
from cuscred.validation import validate_context, validate_secret, validate_tenant_id

MAX = 16_384
SECRET = "sk-proj-Zq8VnT3kLwR5yH2mB7xC9dF4gJ6pQ1sA"


def _assert_not_echoed(exc: BaseException, secret: str) -> None:
    """Neither the secret nor any 6-character piece of it appears in the error."""
    text = str(exc) + repr(exc)
    core = secret.strip()
    for i in range(max(1, len(core) - 5)):
        piece = core[i : i + 6]
        if len(piece.strip()) == 6 and piece.isprintable():
            assert piece not in text, (piece, text)
    assert exc.__context__ is None or not isinstance(exc.__context__, UnicodeError)


# --- tenant ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["a", "A", "0", "acme", "acme-corp_2", "x" * 64, "9to5"])
def test_valid_tenant_ids(tenant: str) -> None:
    assert validate_tenant_id(tenant) == tenant


@pytest.mark.parametrize(
    ("tenant", "fragment"),
    [
        ("", "empty"),
        ("x" * 65, "longer than 64"),
        ("a/b", "only ASCII"),
        ("..", "only ASCII"),
        (".", "only ASCII"),
        ("a.b", "only ASCII"),
        ("a b", "only ASCII"),
        (" a", "only ASCII"),
        ("a\n", "only ASCII"),
        ("{x}", "only ASCII"),
        ("{tenant_id}", "only ASCII"),
        ("a\x00", "only ASCII"),
        ("\uff41", "only ASCII"),  # fullwidth 'a'
        ("\u0430", "only ASCII"),  # Cyrillic 'a'
        ("acme\u200b", "only ASCII"),  # zero-width space
        ("-acme", "start with"),
        ("_acme", "start with"),
        ("a%2fb", "only ASCII"),
    ],
)
def test_invalid_tenant_ids(tenant: str, fragment: str) -> None:
    with pytest.raises(InvalidTenantError, match=fragment) as info:
        validate_tenant_id(tenant)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.isascii()
    assert message.isprintable()
    assert len(message) < 200


def test_tenant_id_message_names_the_position_never_the_text() -> None:
    # An invalid tenant id may be a secret passed in the wrong argument: never echo it.
    secret = "sk-proj-" + "Hq2w" * 10
    with pytest.raises(InvalidTenantError) as info:
        validate_tenant_id(secret + "/x")
    assert str(info.value).startswith(
        "tenant id has a character not allowed at position 49 (U+002F): it must start")
    with pytest.raises(InvalidTenantError) as info:
        validate_tenant_id("a\x00\x1b[31m")
    assert "position 2 (U+0000)" in str(info.value) and "\x1b" not in str(info.value)
    with pytest.raises(InvalidTenantError) as info:
        validate_tenant_id(secret * 2)
    assert str(info.value) == "tenant id is 96 characters, longer than 64"


@pytest.mark.parametrize("tenant", [None, 1, b"acme", ["acme"], 1.5])
def test_tenant_id_of_wrong_type(tenant: object) -> None:
    with pytest.raises(CuscredTypeError, match="tenant id must be a str"):
        validate_tenant_id(tenant)


def test_tenant_id_returns_a_plain_str() -> None:
    class Tenant(str):
        pass

    result = validate_tenant_id(Tenant("acme"))
    assert type(result) is str
    assert result == "acme"


# --- secrets --------------------------------------------------------------------------------


def _vertex_json(indent: int | str | None = 2) -> str:
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "p",
            "private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADAN\n-----END PRIVATE KEY-----\n",
            "client_email": "sa@p.iam.gserviceaccount.com",
        },
        indent=indent,
    )


@pytest.mark.parametrize(
    "secret",
    [SECRET, "x", "pass word with spaces", "p\u00e4ss\u00f6rd-\u20ac", "a" * MAX, _vertex_json()],
)
def test_valid_secrets_are_returned_unchanged(secret: str) -> None:
    assert validate_secret(secret, max_bytes=MAX) == secret


def test_json_object_may_span_lines_with_tabs_and_crlf() -> None:
    doc = _vertex_json(indent="\t").replace("\n", "\r\n")
    assert "\t" in doc
    assert validate_secret(doc, max_bytes=MAX) == doc


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [
        ("", "empty"),
        (" ", "whitespace only"),
        ("\n\t \r\n", "whitespace only"),
        (" " + SECRET, "leading or trailing whitespace"),
        (SECRET + " ", "leading or trailing whitespace"),
        (SECRET + "\n", "leading or trailing whitespace"),
        (SECRET + "\r\n", "leading or trailing whitespace"),
        ("\t" + SECRET, "leading or trailing whitespace"),
        (SECRET + "\u00a0", "leading or trailing whitespace"),
        (SECRET[:10] + "\n" + SECRET[10:], "line break"),
        (SECRET[:10] + "\r" + SECRET[10:], "line break"),
        (SECRET[:10] + "\x00" + SECRET[10:], "NUL"),
        (SECRET + "\x00", "NUL"),
        (SECRET[:10] + "\x1b" + SECRET[10:], "control character"),
        (SECRET[:10] + "\t" + SECRET[10:], "control character"),
        (SECRET[:10] + "\x7f" + SECRET[10:], "control character"),
        (SECRET[:10] + "\x85" + SECRET[10:], "control character"),
        (SECRET[:10] + "\ud800" + SECRET[10:], "lone surrogate"),
        ("a" * (MAX + 1), f"limit of {MAX} bytes"),
        ("\u20ac" * (MAX // 3 + 1), f"limit of {MAX} bytes"),  # bytes, not characters
        ('["not", "a dict",\n 1]', "line break"),  # only JSON *objects* may span lines
        ('{"broken": \n', "leading or trailing"),
        ('{"a":\n1,}', "line break"),  # not valid JSON
        ('{"a": "\x00"}', "NUL"),
        ('{"a":\n"b\x85"}', "control character"),
    ],
)
def test_invalid_secrets(secret: str, fragment: str) -> None:
    with pytest.raises(InvalidSecretError, match=fragment) as info:
        validate_secret(secret, max_bytes=MAX)
    assert isinstance(info.value, InvalidInputError)
    _assert_not_echoed(info.value, secret)


@pytest.mark.parametrize("secret", [" " + SECRET, SECRET + "\n", SECRET + "\r\n", "\t" + SECRET])
def test_surrounding_whitespace_message_mentions_strip(secret: str) -> None:
    with pytest.raises(InvalidSecretError, match=r"strip=True \(CLI: --strip\)"):
        validate_secret(secret, max_bytes=MAX)


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        (" " + SECRET + "\n", SECRET),
        ("\r\n" + SECRET + "\r\n", SECRET),
        (SECRET, SECRET),
        (_vertex_json() + "\n", _vertex_json()),
    ],
)
def test_strip_removes_surrounding_whitespace(secret: str, expected: str) -> None:
    assert validate_secret(secret, max_bytes=MAX, strip=True) == expected


@pytest.mark.parametrize(
    ("secret", "error", "fragment"),
    [
        (SECRET[:10] + "\n" + SECRET[10:] + "\n", InvalidSecretError, "line break"),
        (" \n ", InvalidSecretError, "empty"),
        ("  " + "a" * MAX + "  ", str, ""),  # the limit applies after stripping
        ("x\x00 ", InvalidSecretError, "NUL"),
    ],
)
def test_strip_still_refuses_bad_interiors(secret: str, error: type, fragment: str) -> None:
    if error is str:
        assert validate_secret(secret, max_bytes=MAX, strip=True) == "a" * MAX
        return
    with pytest.raises(error, match=fragment):
        validate_secret(secret, max_bytes=MAX, strip=True)


@pytest.mark.parametrize(
    "value", [SECRET.encode(), bytearray(SECRET.encode()), None, 42, [SECRET], memoryview(b"x")]
)
def test_secret_of_wrong_type(value: object) -> None:
    with pytest.raises(CuscredTypeError, match="secret must be a str") as info:
        validate_secret(value, max_bytes=MAX)
    assert SECRET not in str(info.value)


def test_bytes_secret_gets_a_hint() -> None:
    with pytest.raises(CuscredTypeError, match="decode bytes"):
        validate_secret(b"abc", max_bytes=MAX)


def test_lone_surrogate_error_does_not_carry_the_secret_in_its_context() -> None:
    with pytest.raises(InvalidSecretError) as info:
        validate_secret(SECRET + "\udfff", max_bytes=MAX)
    assert info.value.__context__ is None
    assert info.value.__cause__ is None


_FIXED_SECRET_MESSAGE = re.compile(
    "secret ("
    + "|".join(
        [
            "is empty",
            "is whitespace only",
            r"is larger than the limit of 64 bytes \(UTF-8\)",
            re.escape(
                "has leading or trailing whitespace (often a copied newline); remove it, or "
                "pass strip=True (CLI: --strip) to strip surrounding whitespace"
            ),
            re.escape(
                "contains a line break; a secret must be one line (only a JSON object, such as "
                "a service-account file, may span lines); strip=True (CLI: --strip) removes "
                "only surrounding whitespace"
            ),
            "contains a NUL character",
            r"contains a control character \(U\+[0-9A-F]{4}\)",
            r"contains an invisible character \(U\+[0-9A-F]{4,6}\), often pasted along with "
            r"a key; remove it",
        ]
    )
    + ")"
)


def _refusal(secret: str) -> str | None:
    """The error message for ``secret``, or None if it is accepted (and returned unchanged)."""
    try:
        result = validate_secret(secret, max_bytes=64)
    except InvalidSecretError as exc:
        return str(exc)
    assert result == secret
    assert result.strip() == result
    return None


@given(st.text(max_size=80))
def test_validate_secret_accepts_or_raises_invalid_secret(secret: str) -> None:
    message = _refusal(secret)
    # Fixed text only (plus the limit or a control character's code point): no part of the secret.
    assert message is None or _FIXED_SECRET_MESSAGE.fullmatch(message), message


# --- context --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        (None, {}),
        ({}, {}),
        ({"purpose": "llm"}, {"purpose": "llm"}),
        (OrderedDict(a="1", b="2"), {"a": "1", "b": "2"}),
        (MappingProxyType({"env.name": "prod"}), {"env.name": "prod"}),
        ({f"k{i}": "v" for i in range(16)}, {f"k{i}": "v" for i in range(16)}),
        ({"k" * 64: "v" * 256}, {"k" * 64: "v" * 256}),
        ({"0-key_.x": "\u00e9t\u00e9"}, {"0-key_.x": "\u00e9t\u00e9"}),
        ({"k": ""}, {"k": ""}),
    ],
)
def test_valid_contexts(context: object, expected: dict[str, str]) -> None:
    result = validate_context(context)
    assert result == expected
    assert type(result) is dict
    assert result is not context


@pytest.mark.parametrize(
    ("context", "fragment"),
    [
        ({"purpose": 1}, "context value for 'purpose' must be a string, got int"),
        ({"purpose": None}, "context value for 'purpose' must be a string, got NoneType"),
        ({"purpose": b"llm"}, "context value for 'purpose' must be a string, got bytes"),
        ({"flag": True}, "context value for 'flag' must be a string, got bool"),
        ({"n": 1.5}, "got float"),
        ({"nested": {"a": "b"}}, "got dict"),
        ({"k": "v" * 257}, "longer than 256"),
        ({"k": "a\x00b"}, "control character"),
        ({"k": "a\nb"}, "control character"),
        ({"k": "\ud800"}, "lone surrogate"),
        ({f"k{i}": "v" for i in range(17)}, "at most 16"),
        ({"": "v"}, "context key is 0 characters"),
        ({"Purpose": "v"}, "context key has a character not allowed at position 1 (U+0050)"),
        ({"_x": "v"}, "starting with a letter or digit"),
        ({"a b": "v"}, "context key"),
        ({"k" * 65: "v"}, "context key"),
        ({"\uff4b": "v"}, "context key has a character not allowed at position 1 (U+FF4B)"),
        ({1: "v"}, "context keys must be strings, got int"),
        ({b"k": "v"}, "got bytes"),
    ],
)
def test_invalid_contexts(context: dict[object, object], fragment: str) -> None:
    with pytest.raises(InvalidContextError) as info:
        validate_context(context)
    assert fragment in str(info.value)


def test_context_messages_do_not_echo_values() -> None:
    with pytest.raises(InvalidContextError) as info:
        validate_context({"k": "confidential-value\x00"})
    assert "confidential" not in str(info.value)


@pytest.mark.parametrize("context", [[("a", "b")], "a=b", 1, {"a", "b"}])
def test_context_of_wrong_type(context: object) -> None:
    with pytest.raises(CuscredTypeError, match="context must be a mapping"):
        validate_context(context)
