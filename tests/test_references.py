"""Reference parsing, printing, format checks and tenant scope checks (all pure)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuscred.config import Settings
from cuscred.errors import (
    CuscredTypeError,
    EnvReferenceDisabledError,
    InvalidTenantError,
    MalformedReferenceError,
    ScopeError,
)
from cuscred.ids import new_credential_id
from cuscred.references import (
    MAX_REFERENCE_LENGTH,
    EncryptedRef,
    EnvRef,
    VaultRef,
    check_env_scope,
    check_vault_scope,
    parse_reference,
    validate_credential_format,
)

CID = new_credential_id()
TENANT_PATH = "tenants/acme-corp/openai"  # a tenant segment no message may reveal


@pytest.fixture
def settings() -> Settings:
    return Settings(vault_ref_mounts="secret, kv")


@pytest.fixture
def production() -> Settings:
    return Settings(env="production", kek_source="vault", vault_token="t",
                    vault_addr="https://vault.internal:8200")


# --- parsing valid references ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"encrypted://{CID}", EncryptedRef(CID)),
        (
            "vault://secret/tenants/a/openai#api_key",
            VaultRef("secret", "tenants/a/openai", "api_key"),
        ),
        ("vault://kv/x#k", VaultRef("kv", "x", "k", None)),
        ("vault://kv/a/b?version=1#k", VaultRef("kv", "a/b", "k", 1)),
        ("vault://kv/a/b?version=42#k.v-1_", VaultRef("kv", "a/b", "k.v-1_", 42)),
        ("vault://kv-2/a.b/_c/-d/e..f#..", VaultRef("kv-2", "a.b/_c/-d/e..f", "..", None)),
        ("vault://kv/a?version=999999999999999999#k", VaultRef("kv", "a", "k", 10**18 - 1)),
        ("env://DEV_SECRET_OPENAI", EnvRef("DEV_SECRET_OPENAI")),
        ("env://A", EnvRef("A")),
        ("env://X_1_", EnvRef("X_1_")),
    ],
)
def test_parse_valid(text: str, expected: object) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert str(ref) == text


# --- parsing malformed references: each with its own message --------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "reference is empty"),
        (" vault://kv/x#k", "remove surrounding whitespace"),
        ("vault://kv/x#k ", "remove surrounding whitespace"),
        ("vault://kv/x#k\n", "remove surrounding whitespace"),
        ("\tenv://DEV_SECRET_X", "remove surrounding whitespace"),
        ("vault://kv/x\x00#k", "control character"),
        ("vault://kv/x#k\x7f", "control character"),
        ("vault://kv/x y#k", "may contain only"),
        ("vault://kv/" + "a" * MAX_REFERENCE_LENGTH + "#k", "longer than 1024"),
        ("no-scheme-here", "no '://'"),
        ("vault:/kv/x#k", "no '://'"),
        ("https://kv/x#k", "unknown reference scheme"),
        ("file:///etc/passwd", "unknown reference scheme"),
        ("://x", "unknown reference scheme"),
        ("VAULT://kv/x#k", "lower-case"),
        ("Env://DEV_SECRET_X", "lower-case"),
        ("encrypted://not-an-id", "credential id"),
        ("encrypted://", "credential id"),
        (f"encrypted://{CID.upper()}", "credential id"),
        (f"encrypted://{CID}#x", "credential id"),
        (f"encrypted://{CID}/", "credential id"),
        ("env://lower", "upper-case"),
        ("env://Dev_Secret", "upper-case"),
        ("env://", "needs a variable name"),
        ("env://1ABC", "starting with a letter"),
        ("env://A-B", "starting with a letter"),
        ("env://A/B", "starting with a letter"),
        ("vault://", "vault:// is empty"),
        ("vault://kv", "names a mount but no secret path"),
        ("vault://kv#k", "names a mount but no secret path"),
        ("vault://kv/", "names a mount but no secret path"),
        ("vault:///x", "no mount"),
        ("vault:///x#k", "no mount"),
        ("vault://kv/tenants/a/../b/x#k", "'.' or '..' path segment"),
        ("vault://kv/tenants/a/./x#k", "'.' or '..' path segment"),
        ("vault://../x#k", "'.' or '..' mount"),
        ("vault://kv/tenants//a/x#k", "empty path segment"),
        ("vault://kv/tenants/a/x/#k", "empty path segment"),
        ("vault://kv/x", "no field"),
        ("vault://kv/x#", "field must be"),
        ("vault://kv/x#a/b", "field must be"),
        ("vault://kv/x#" + "f" * 129, "field must be"),
        ("vault://kv/x#k#l", "more than one '#'"),
        ("vault://kv/x#k?version=2", "write vault://<mount>/<path>?version=N#<field>"),
        ("vault://kv/x?version=0#k", "from 1 up without leading zeros"),
        ("vault://kv/x?version=01#k", "without leading zeros"),
        ("vault://kv/x?version=-1#k", "without leading zeros"),
        ("vault://kv/x?version=+1#k", "without leading zeros"),
        ("vault://kv/x?version=1.0#k", "without leading zeros"),
        ("vault://kv/x?version= 1#k", "without leading zeros"),
        ("vault://kv/x?version=#k", "without leading zeros"),
        ("vault://kv/x?version#k", "without leading zeros"),
        ("vault://kv/x?version=1000000000000000000#k", "at most 18 digits"),
        ("vault://kv/x?#k", "empty query"),
        ("vault://kv/x?v=1#k", "may only be ?version=N"),
        ("vault://kv/x?version=1&version=2#k", "may only be ?version=N"),
        ("vault://kv/x?version=1&x=2#k", "may only be ?version=N"),
        ("vault://kv/x?version=1?#k", "without leading zeros"),
        ("vault://kv/.hidden#k", "may not start with '.'"),
        ("vault://kv/a\\b#k", "may contain only"),
        ("vault://kv/a:b#k", "may contain only"),
        ("vault://kv/{tenant_id}/x#k", "may contain only"),
        ("vault://kv/~/x#k", "may contain only"),
    ],
)
def test_parse_malformed(text: str, fragment: str) -> None:
    with pytest.raises(MalformedReferenceError) as info:
        parse_reference(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_the_four_vault_examples_get_four_different_messages() -> None:
    texts = ["vault://", "vault://kv", "vault:///x", "vault://kv/tenants/a/../b/x#k"]
    messages = set()
    for text in texts:
        ok, message = validate_credential_format(text)
        assert not ok
        messages.add(message)
    assert len(messages) == 4


# Scope attacks that the parser itself refuses, before any scope check.
_PARSE_ATTACKS = [
    ("vault://secret/tenants/a/../b/x#k", "'.' or '..'"),
    ("vault://secret/tenants/a/./x#k", "'.' or '..'"),
    ("vault://secret/tenants/a/..#k", "'.' or '..'"),
    ("vault://secret/tenants//a/x#k", "empty path segment"),
    ("vault://secret/tenants/a//x#k", "empty path segment"),
    ("vault://secret/tenants/a/x/#k", "empty path segment"),
    ("vault://secret//tenants/a/x#k", "empty path segment"),
    ("vault://secret/tenants/a/%2e%2e/b/x#k", "percent-encoding"),
    ("vault://secret/tenants/a/%2E%2E%2Fb/x#k", "percent-encoding"),
    ("vault://secret/tenants/a/%252e%252e/b/x#k", "percent-encoding"),
    ("vault://secret/tenants/a%2fb/x#k", "percent-encoding"),
    ("vault://secret/tenants/a/x#k%00", "percent-encoding"),
    ("vault://secret/tenants/a\uff0fb/x#k", "non-ASCII"),  # fullwidth solidus
    ("vault://secret/tenants/\u0430/x#k", "non-ASCII"),  # Cyrillic small letter a
    ("vault://secret/tenants/a/\u2025/x#k", "non-ASCII"),  # two dot leader
    ("vault://secret/tenants/a\u2215b/x#k", "non-ASCII"),  # division slash
    ("vault://secret/tenants/a/x\u200b#k", "non-ASCII"),  # zero-width space
    ("vault://secret/tenants/a\\..\\b/x#k", "may contain only"),
]


@pytest.mark.parametrize(("text", "fragment"), _PARSE_ATTACKS)
def test_scope_attacks_refused_by_the_parser(text: str, fragment: str) -> None:
    with pytest.raises(MalformedReferenceError) as info:
        parse_reference(text)
    assert fragment in str(info.value)
    assert "tenants" not in str(info.value)


@pytest.mark.parametrize("text", [x for x, _ in _PARSE_ATTACKS] + [f"vault://kv/{TENANT_PATH}"])
def test_messages_never_echo_the_reference(text: str) -> None:
    ok, message = validate_credential_format(text)
    assert not ok
    assert "acme" not in message
    assert "tenants/" not in message
    assert text not in message


@pytest.mark.parametrize(
    "value", [None, 1, 1.5, b"vault://kv/x#k", ["env://X"], object(), {"a": 1}, bytearray()]
)
def test_non_str_is_a_type_error(value: object) -> None:
    with pytest.raises(CuscredTypeError, match="reference must be a str"):
        parse_reference(value)
    ok, message = validate_credential_format(value)
    assert not ok
    assert "must be a str" in message


# --- validate_credential_format -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "description"),
    [
        (
            "vault://secret/tenants/a/openai#api_key",
            "vault reference: mount 'secret', field 'api_key', latest version",
        ),
        (
            "vault://secret/tenants/a/openai?version=3#api_key",
            "vault reference: mount 'secret', field 'api_key', version 3",
        ),
        (f"encrypted://{CID}", f"encrypted reference: credential {CID}"),
        ("env://DEV_SECRET_X", "env reference: variable 'DEV_SECRET_X' (development mode only)"),
    ],
)
def test_validate_credential_format_valid(text: str, description: str) -> None:
    assert validate_credential_format(text) == (True, description)


def test_description_hides_the_tenant_path() -> None:
    ok, description = validate_credential_format(f"vault://secret/{TENANT_PATH}#k")
    assert ok
    assert "acme" not in description


# --- dataclasses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "error"),
    [
        (lambda: EncryptedRef("nope"), MalformedReferenceError),
        (lambda: EncryptedRef(5), CuscredTypeError),  # type: ignore[arg-type]
        (lambda: VaultRef("kv", "a/../b", "k"), MalformedReferenceError),
        (lambda: VaultRef("kv", "", "k"), MalformedReferenceError),
        (lambda: VaultRef("", "a", "k"), MalformedReferenceError),
        (lambda: VaultRef("kv", "a", ""), MalformedReferenceError),
        (lambda: VaultRef("kv", "a", "k", 0), MalformedReferenceError),
        (lambda: VaultRef("kv", "a", "k", True), MalformedReferenceError),
        (lambda: VaultRef("kv", "a", "k", 10**18), MalformedReferenceError),
        (lambda: VaultRef("kv", 1, "k"), CuscredTypeError),  # type: ignore[arg-type]
        (lambda: EnvRef("lower"), MalformedReferenceError),
        (lambda: EnvRef(None), CuscredTypeError),  # type: ignore[arg-type]
    ],
)
def test_refs_validate_on_construction(
    factory: Callable[[], object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        factory()


def test_refs_are_frozen() -> None:
    ref = VaultRef("kv", "a", "k")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.path = "b"  # type: ignore[misc]


# --- tenant scope: vault --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tenant"),
    [
        ("vault://secret/tenants/a/openai#api_key", "a"),
        ("vault://kv/tenants/a/x/y/z?version=2#k", "a"),
        ("vault://secret/tenants/ab/x#k", "ab"),
        ("vault://secret/tenants/acme-corp/openai#k", "acme-corp"),
    ],
)
def test_vault_scope_allows_own_prefix(text: str, tenant: str, settings: Settings) -> None:
    ref = parse_reference(text)
    assert isinstance(ref, VaultRef)
    check_vault_scope(ref, tenant, settings)


@pytest.mark.parametrize(
    ("text", "tenant", "fragment"),
    [
        ("vault://secret/tenants/ab/x#k", "a", "outside this tenant's prefix"),
        ("vault://secret/tenants/a/x#k", "ab", "outside this tenant's prefix"),
        ("vault://secret/tenants/A/x#k", "a", "outside this tenant's prefix"),
        ("vault://secret/tenants/a#k", "a", "outside this tenant's prefix"),  # the prefix itself
        ("vault://secret/tenants#k", "a", "outside this tenant's prefix"),
        ("vault://secret/tenants/b/x#k", "a", "outside this tenant's prefix"),
        ("vault://secret/tenants-a/x#k", "a", "outside this tenant's prefix"),
        ("vault://secret/a/tenants/a/x#k", "a", "outside this tenant's prefix"),
        ("vault://secret/other/x#k", "a", "outside this tenant's prefix"),
        ("vault://secret/cuscred/kek#key", "a", "outside this tenant's prefix"),
        ("vault://kv2/tenants/a/x#k", "a", "mount is not allowed"),
        ("vault://sys/tenants/a/x#k", "a", "mount is not allowed"),
        ("vault://Secret/tenants/a/x#k", "a", "mount is not allowed"),
    ],
)
def test_vault_scope_denies(text: str, tenant: str, fragment: str, settings: Settings) -> None:
    ref = parse_reference(text)
    assert isinstance(ref, VaultRef)
    with pytest.raises(ScopeError, match=fragment) as info:
        check_vault_scope(ref, tenant, settings)
    # Fixed text only: nothing about the path or other tenants.
    assert str(info.value) in {
        "vault path is outside this tenant's prefix",
        "vault mount is not allowed for credential references",
    }


@pytest.mark.parametrize("tenant", ["", "a/b", "..", ".", "a b", "{x}", "a\x00", "\uff41", "*"])
def test_vault_scope_refuses_bad_tenant_ids(tenant: str, settings: Settings) -> None:
    ref = VaultRef("secret", "tenants/a/x", "k")
    with pytest.raises(InvalidTenantError):
        check_vault_scope(ref, tenant, settings)


def test_vault_scope_rechecks_a_tampered_ref(settings: Settings) -> None:
    ref = VaultRef("secret", "tenants/a/x", "k")
    object.__setattr__(ref, "path", "tenants/a/../b/x")
    with pytest.raises(MalformedReferenceError):
        check_vault_scope(ref, "a", settings)


def test_vault_scope_with_a_custom_prefix() -> None:
    custom = Settings(vault_tenant_prefix="org/t-{tenant_id}/llm/")
    check_vault_scope(VaultRef("secret", "org/t-a/llm/openai", "k"), "a", custom)
    for path in ("org/t-ab/llm/openai", "org/t-a/llm", "org/t-a/other/x", "org/t-a"):
        with pytest.raises(ScopeError):
            check_vault_scope(VaultRef("secret", path, "k"), "a", custom)


def test_vault_scope_type_checks(settings: Settings) -> None:
    with pytest.raises(CuscredTypeError):
        check_vault_scope(EnvRef("DEV_SECRET_X"), "a", settings)  # type: ignore[arg-type]


# --- tenant scope: env ----------------------------------------------------------------------


def test_env_scope_allows_prefixed_names_in_development(settings: Settings) -> None:
    check_env_scope(EnvRef("DEV_SECRET_OPENAI"), settings)


@pytest.mark.parametrize(
    "name",
    [
        "DEV_SECRET_",
        "DEV_SECRET",
        "PATH",
        "CUSCRED_VAULT_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "XDEV_SECRET_A",
    ],
)
def test_env_scope_denies_other_names(name: str, settings: Settings) -> None:
    with pytest.raises(ScopeError, match="outside the allowed prefix"):
        check_env_scope(EnvRef(name), settings)


def test_env_refs_disabled_outside_development(production: Settings) -> None:
    with pytest.raises(EnvReferenceDisabledError, match="development mode"):
        check_env_scope(EnvRef("DEV_SECRET_OPENAI"), production)


def test_env_scope_type_checks(settings: Settings) -> None:
    with pytest.raises(CuscredTypeError):
        check_env_scope(VaultRef("kv", "a", "k"), settings)  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------------

_SEGMENT = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,12}", fullmatch=True)
_VAULT_REFS = st.builds(
    VaultRef,
    mount=_SEGMENT,
    path=st.lists(_SEGMENT, min_size=1, max_size=5).map("/".join),
    field=st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True),
    version=st.none() | st.integers(min_value=1, max_value=10**18 - 1),
)
_VALID_REFS = (
    _VAULT_REFS
    | st.builds(EnvRef, st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True))
    | st.builds(lambda: EncryptedRef(new_credential_id()))
)
# Text near the grammar: real schemes followed by the characters that matter to the parser.
_NEAR = st.builds(
    "".join,
    st.tuples(
        st.sampled_from(["vault://", "env://", "encrypted://", "vault:/", "VAULT://", "", "x://"]),
        st.text(alphabet="aZ09._-/%#?=&~ \\:\u0430\uff0f\x00", max_size=30),
    ),
)


def _roundtrip_or_refuse(text: object) -> None:
    try:
        ref = parse_reference(text)
    except (MalformedReferenceError, CuscredTypeError):
        ok, message = validate_credential_format(text)
        assert not ok
        assert message
        return
    assert parse_reference(str(ref)) == ref
    assert str(ref) == text  # canonical only: nothing is normalised
    assert validate_credential_format(text)[0]


@given(_VALID_REFS)
def test_valid_refs_roundtrip(ref: object) -> None:
    assert parse_reference(str(ref)) == ref


@given(st.text(max_size=80) | _NEAR)
def test_any_text_parses_canonically_or_is_refused(text: str) -> None:
    _roundtrip_or_refuse(text)


@given(st.from_type(object) | st.binary() | st.integers())
def test_any_object_parses_or_is_refused(value: object) -> None:
    _roundtrip_or_refuse(value)


@given(
    st.lists(st.sampled_from(["tenants", "a", "ab", "A", "b", "x", "a-", "secret"]), max_size=5),
    st.sampled_from(["a", "ab", "b"]),
    st.sampled_from(["secret", "kv", "other"]),
)
def test_vault_scope_matches_a_segment_model(segments: list[str], tenant: str, mount: str) -> None:
    settings = Settings(vault_ref_mounts="secret,kv")
    allowed = (
        mount in {"secret", "kv"} and len(segments) > 2 and segments[:2] == ["tenants", tenant]
    )
    try:
        ref = VaultRef(mount, "/".join(segments), "k")
    except MalformedReferenceError:
        assert not segments  # the only invalid path here is the empty one
        return
    try:
        check_vault_scope(ref, tenant, settings)
    except ScopeError:
        assert not allowed
    else:
        assert allowed
