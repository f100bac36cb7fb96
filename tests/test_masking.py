"""Provider detection and masking, with realistic random provider-shaped keys."""

from __future__ import annotations

import json
import secrets
import string

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from cuscred.errors import CuscredTypeError
from cuscred.ids import new_credential_id
from cuscred.masking import MASK, mask_credential, mask_secret, masked_hint
from cuscred.providers import KEY_SHAPES, PROVIDERS, detect_provider

ELLIPSIS = "\u2026"
_URLSAFE = string.ascii_letters + string.digits + "-_"
_ALNUM = string.ascii_letters + string.digits
_UPPER = string.ascii_uppercase + string.digits


def _rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def openai_project_key() -> str:
    return "sk-proj-" + _rand(_URLSAFE, 156)  # 164 characters


def anthropic_key() -> str:
    return "sk-ant-api03-" + _rand(_URLSAFE, 93) + "AA"  # 108 characters


def google_key() -> str:
    return "AIza" + _rand(_URLSAFE, 35)


def azure_key() -> str:
    return secrets.token_hex(16)


def aws_pair() -> tuple[str, str, str]:
    key_id = "AKIA" + _rand(_UPPER, 16)
    secret_key = _rand(_ALNUM + "+/", 40)
    doc = json.dumps(
        {"access_key_id": key_id, "secret_access_key": secret_key, "region": "eu-west-1"}
    )
    return doc, key_id, secret_key


@pytest.fixture(scope="module")
def private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def vertex(private_key_pem: str) -> dict[str, str]:
    email = "llm-gateway@acme-prod-4821.iam.gserviceaccount.com"
    return {
        "type": "service_account",
        "project_id": "acme-prod-4821",
        "private_key_id": secrets.token_hex(20),
        "private_key": private_key_pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**21)).zfill(21),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
        + email.replace("@", "%40"),
        "universe_domain": "googleapis.com",
    }


def _assert_no_window(mask: str, body: str, *, size: int = 8) -> None:
    """No ``size``-character window of ``body`` appears in ``mask``."""
    for i in range(len(body) - size + 1):
        assert body[i : i + size] not in mask, f"window {i} of the secret leaked"


# --- provider detection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "provider"),
    [
        (openai_project_key, "openai"),
        (lambda: "sk-svcacct-" + _rand(_URLSAFE, 120), "openai"),
        (lambda: "sk-admin-" + _rand(_URLSAFE, 80), "openai"),
        (lambda: "sk-" + _rand(_ALNUM, 48), "openai"),
        (anthropic_key, "anthropic"),
        (lambda: "sk-ant-" + _rand(_URLSAFE, 60), "anthropic"),
        (google_key, "google"),
        (azure_key, "azure-openai"),
        (lambda: secrets.token_hex(16).upper(), "azure-openai"),
        (lambda: aws_pair()[0], "aws"),
        (lambda: "AKIA" + _rand(_UPPER, 16), "aws"),
        (lambda: "ASIA" + _rand(_UPPER, 16), "aws"),
        (lambda: json.dumps({"aws_access_key_id": "x", "aws_secret_access_key": "y"}), "aws"),
        (lambda: json.dumps({"AccessKeyId": "x", "SecretAccessKey": "y"}), "aws"),
        (lambda: json.dumps({"type": "service_account", "private_key": "k"}), "vertex"),
        (lambda: "sk-" + _rand(_ALNUM, 47), "generic"),  # legacy keys are exactly 48
        (lambda: "sk-proj-short", "generic"),
        (lambda: "AIza" + _rand(_URLSAFE, 34), "generic"),
        (lambda: secrets.token_hex(16) + "0", "generic"),
        (lambda: "ghp_" + _rand(_ALNUM, 36), "generic"),
        (lambda: "correct horse battery staple", "generic"),
        (lambda: json.dumps({"type": "authorized_user"}), "generic"),
        (lambda: json.dumps(["type", "service_account"]), "generic"),
        (lambda: "", "generic"),
    ],
)
def test_detect_provider(make: object, provider: str) -> None:
    assert detect_provider(make()) == provider  # type: ignore[operator]
    assert provider in PROVIDERS


def test_detect_provider_type_error() -> None:
    with pytest.raises(CuscredTypeError):
        detect_provider(b"sk-proj-x")  # type: ignore[arg-type]


def test_known_prefixes_are_ordered_longest_first_where_they_nest() -> None:
    prefixes = [shape.prefix for shape in KEY_SHAPES]
    for i, earlier in enumerate(prefixes):
        for later in prefixes[i + 1 :]:
            assert not later.startswith(earlier), (earlier, later)


# --- masking plain keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "prefix"),
    [
        (openai_project_key, "sk-proj-"),
        (anthropic_key, "sk-ant-api03-"),
        (lambda: "sk-ant-" + _rand(_URLSAFE, 60), "sk-ant-"),
        (lambda: "sk-" + _rand(_ALNUM, 48), "sk-"),
        (google_key, "AIza"),
        (azure_key, ""),
        (lambda: "ghp_" + _rand(_ALNUM, 36), ""),  # unknown prefix: never shown
        (lambda: "sk-proj-" + _rand(_URLSAFE, 10), ""),  # not a real key shape: prefix hidden
        (lambda: _rand(_ALNUM + "!@#$%^&*", 24), ""),
    ],
)
def test_mask_shows_known_prefix_and_last_four(make: object, prefix: str) -> None:
    secret = make()  # type: ignore[operator]
    for masked in (mask_credential(secret), mask_secret(secret), masked_hint(secret)):
        assert masked == f"{prefix}{ELLIPSIS}{secret[-4:]}"
        _assert_no_window(masked, secret[len(prefix) :])
        assert len(masked) <= 64


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "a",
        "hunter2",
        "12345678901",  # 11 characters
        "sk-" + "a" * 8,
        "AKIA" + "ABCDEFGHIJKLMNOP",  # prefix + 4 would show 8 of 20 characters
        "ASIA" + "ABCDEFGHIJKLMNOP",
        "AIza" + "x" * 7,
        "abcdefghijk\n",  # last four not printable
        "abcdefghij k",
        "abcdefghijklmn\x00",
        "p\u00e4ssw\u00f6rd-\u00e9\u00e9\u00e9\u00e9",  # non-ASCII tail
        "\n\n\n\n\n\n\n\n\n\n\n\n\n",
    ],
)
def test_short_or_odd_secrets_are_fully_masked(secret: str) -> None:
    assert mask_credential(secret) == MASK
    assert masked_hint(secret) == MASK


def test_mask_never_reveals_the_length() -> None:
    masks = {mask_credential("x" * n) for n in range(12)}
    assert masks == {MASK}
    long_masks = {len(mask_credential(_rand(_ALNUM, n))) for n in range(12, 400, 7)}
    assert long_masks == {5}


@given(
    st.sampled_from([s.prefix for s in KEY_SHAPES] + [""]),
    st.text(alphabet=_URLSAFE, min_size=0, max_size=200),
)
def test_no_window_of_the_body_leaks(prefix: str, body: str) -> None:
    secret = prefix + body
    masked = mask_credential(secret)
    if masked == MASK:
        return
    # Otherwise exactly: a known prefix of the secret, an ellipsis and the last four characters,
    # and together they show at most a third of the secret.
    shown_prefix, ellipsis, tail = masked.rpartition(ELLIPSIS)
    assert ellipsis
    assert tail == secret[-4:]
    assert shown_prefix in {s.prefix for s in KEY_SHAPES} | {""}
    assert secret.startswith(shown_prefix)
    assert 3 * (len(shown_prefix) + 4) <= len(secret)


@given(st.text(max_size=300))
def test_mask_is_one_short_line_for_any_text(text: str) -> None:
    masked = mask_credential(text)
    assert "\n" not in masked
    assert "\r" not in masked
    assert masked.isprintable()
    assert len(masked_hint(text)) <= 64


# --- masking JSON credentials ---------------------------------------------------------------


def test_vertex_service_account_is_masked_field_by_field(vertex: dict[str, str]) -> None:
    document = json.dumps(vertex, indent=2)
    assert 2000 <= len(document) <= 2600  # a realistic ~2.3 KB service-account file
    assert detect_provider(document) == "vertex"
    masked = mask_credential(document)
    assert "\n" not in masked
    assert masked.isascii()
    shown = json.loads(masked)
    assert shown["private_key"] == MASK
    assert shown["private_key_id"] == MASK
    for field in ("type", "project_id", "client_email", "client_id", "token_uri"):
        assert shown[field] == vertex[field]
    assert "PRIVATE KEY" not in masked
    assert "BEGIN" not in masked
    _assert_no_window(masked, vertex["private_key"])
    _assert_no_window(masked, vertex["private_key_id"])
    pem_body = "".join(vertex["private_key"].splitlines()[1:-1])
    _assert_no_window(masked, pem_body, size=6)  # not even its last characters
    assert pem_body[-4:] + '"' not in masked


def test_vertex_hint_fits_the_column(vertex: dict[str, str]) -> None:
    hint = masked_hint(json.dumps(vertex, indent=2))
    assert hint == "vertex JSON llm-gateway@acme-prod-4821.iam.gserviceaccount.com"
    assert len(hint) <= 64
    _assert_no_window(hint, vertex["private_key"])


def test_long_client_email_is_truncated_in_the_hint(vertex: dict[str, str]) -> None:
    vertex["client_email"] = "a" * 100 + "@p.iam.gserviceaccount.com"
    hint = masked_hint(json.dumps(vertex))
    assert len(hint) == 64
    assert hint.endswith(ELLIPSIS)


def test_aws_pair_is_masked_field_by_field() -> None:
    document, key_id, secret_key = aws_pair()
    masked = mask_credential(document)
    assert json.loads(masked) == {
        "access_key_id": MASK,
        "secret_access_key": MASK,
        "region": "eu-west-1",
    }
    _assert_no_window(masked, secret_key)
    _assert_no_window(masked, key_id[4:], size=5)
    assert masked_hint(document) == "aws JSON"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"type": "service_account", "project_id": {"nested": "x"}},
            {"type": "service_account", "project_id": MASK},
        ),
        ({"type": "x" * 200}, {"type": MASK}),
        ({"type": "a\nb"}, {"type": MASK}),
        ({"client_id": 12345}, {"client_id": MASK}),
        ({"sk-proj-AbCdEfGhIjKlMnOpQrStUv": "v"}, {"?0": MASK}),
        ({"ok": "v", "has space": "v"}, {"ok": MASK, "?1": MASK}),
        ({}, {}),
    ],
)
def test_json_masking_edge_cases(document: dict[str, object], expected: dict[str, str]) -> None:
    masked = mask_credential(json.dumps(document))
    assert json.loads(masked) == expected
    assert "AbCdEfGh" not in masked


# --- masking references ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("vault://secret/tenants/acme/openai#api_key", f"vault://secret/{ELLIPSIS}/openai#api_key"),
        ("vault://kv/tenants/acme/a/b?version=3#k", f"vault://kv/{ELLIPSIS}/b?version=3#k"),
        ("vault://kv/tenants/acme#k", f"vault://kv/{ELLIPSIS}#k"),
        ("vault://kv/acme#k", f"vault://kv/{ELLIPSIS}#k"),
        ("env://DEV_SECRET_OPENAI", f"env://DEV_{ELLIPSIS}"),
        ("env://OPENAIKEY", f"env://{ELLIPSIS}"),
    ],
)
def test_references_are_masked_without_tenant_segments(ref: str, expected: str) -> None:
    masked = mask_credential(ref)
    assert masked == expected
    assert "acme" not in masked
    assert "tenants" not in masked


def test_env_mask_uses_the_configured_prefix() -> None:
    masked = mask_credential("env://DEV_SECRET_OPENAI", env_prefix="DEV_SECRET_")
    assert masked == f"env://DEV_SECRET_{ELLIPSIS}"


def test_encrypted_reference_is_shown_as_is() -> None:
    ref = f"encrypted://{new_credential_id()}"
    assert mask_credential(ref) == ref


@pytest.mark.parametrize(
    "text",
    [
        "vault://kv/tenants/acme/openai-prod",  # no field: not a reference, maybe a secret
        "vault:///tenants/acme/x#k",
        "encrypted://not-an-id-but-maybe-a-secret",
        "env://lower_case_secret_value",
        "vault://kv/tenants/acme/x#k ",
    ],
)
def test_malformed_references_are_masked_as_secrets(text: str) -> None:
    masked = mask_credential(text)
    assert masked in (MASK, f"{ELLIPSIS}{text[-4:]}")
    assert "://" not in masked
    assert "acme" not in masked


@pytest.mark.parametrize("value", [None, 1, b"sk-proj-x", ["a"], {"type": "service_account"}])
def test_non_str_is_a_type_error(value: object) -> None:
    with pytest.raises(CuscredTypeError):
        mask_credential(value)
    with pytest.raises(CuscredTypeError):
        masked_hint(value)  # type: ignore[arg-type]
    with pytest.raises(CuscredTypeError):
        mask_secret(value)  # type: ignore[arg-type]
