"""Realistic generated credentials for the demo, the tests and ``bench/``.

Values have the real shapes of provider keys (so detection, masking, size limits and row widths
behave as in production) but are random: none is a working key. Tenants are skewed the way a
platform's customers are: a few large tenants hold thousands of keys, most hold one to five.
Generation is deterministic for a given seed.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass

_URLSAFE = string.ascii_letters + string.digits + "-_"
_ALNUM = string.ascii_letters + string.digits
_UPPER32 = string.ascii_uppercase + "234567"

#: Provider mix of a typical platform (weights).
PROVIDER_MIX: dict[str, int] = {
    "openai": 40,
    "anthropic": 25,
    "google": 10,
    "azure-openai": 10,
    "aws": 8,
    "vertex": 7,
}


def _pick(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choices(alphabet, k=n))


def _pem_body(rng: random.Random) -> str:
    # The length of a PKCS#8 RSA-2048 key; random bytes, not a usable key.
    b64 = base64.b64encode(rng.randbytes(1218)).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END PRIVATE KEY-----\n"


def _vertex(rng: random.Random) -> str:
    project = f"{_pick(rng, string.ascii_lowercase, 8)}-{rng.randint(100000, 999999)}"
    account = _pick(rng, string.ascii_lowercase, 10)
    email = f"{account}@{project}.iam.gserviceaccount.com"
    doc = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": rng.randbytes(20).hex(),
        "private_key": _pem_body(rng),
        "client_email": email,
        "client_id": str(rng.randint(10**20, 10**21 - 1)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
        + email.replace("@", "%40"),
        "universe_domain": "googleapis.com",
    }
    return json.dumps(doc, indent=2)


def generate_secret(provider: str, rng: random.Random | None = None) -> str:
    """One random secret with the shape of ``provider``'s keys (see :data:`PROVIDER_MIX`)."""
    rng = rng or random.Random()  # noqa: S311 - test data, not key material
    if provider == "openai":
        return "sk-proj-" + _pick(rng, _URLSAFE, 156)
    if provider == "anthropic":
        return "sk-ant-api03-" + _pick(rng, _URLSAFE, 93) + "AA"
    if provider == "google":
        return "AIza" + _pick(rng, _URLSAFE, 35)
    if provider == "azure-openai":
        return rng.randbytes(16).hex()
    if provider == "aws":
        return json.dumps({
            "aws_access_key_id": "AKIA" + _pick(rng, _UPPER32, 16),
            "aws_secret_access_key": _pick(rng, _ALNUM + "+/", 40),
            "region": rng.choice(["us-east-1", "us-west-2", "eu-central-1"]),
        })
    if provider == "vertex":
        return _vertex(rng)
    raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDER_MIX)}")


def tenant_sizes(credentials: int, tenants: int, rng: random.Random) -> list[int]:
    """Split ``credentials`` over ``tenants``: most get 1-5, a few large ones the rest.

    Every tenant gets at least one credential (so ``credentials >= tenants`` is required).
    """
    if tenants < 1 or credentials < tenants:
        raise ValueError("need at least one tenant and one credential per tenant")
    big = max(1, tenants // 50)
    sizes = [rng.randint(1, 5) for _ in range(tenants - big)]
    while sum(sizes) > credentials - big:  # small data sets: shrink the long tail
        i = max(range(len(sizes)), key=sizes.__getitem__)
        if sizes[i] == 1:
            break
        sizes[i] -= 1
    rest = credentials - sum(sizes)
    weights = [1 / (i + 1) ** 1.1 for i in range(big)]  # Zipf-like among the large tenants
    big_sizes = [max(1, int(rest * w / sum(weights))) for w in weights]
    big_sizes[0] += rest - sum(big_sizes)
    return big_sizes + sizes


@dataclass(frozen=True, slots=True)
class GeneratedCredential:
    tenant_id: str
    provider: str
    secret: str

    def __repr__(self) -> str:  # test data still never goes to a log in clear
        return f"<GeneratedCredential tenant={self.tenant_id} provider={self.provider}>"


def generate(credentials: int, tenants: int, *, seed: int = 0) -> Iterator[GeneratedCredential]:
    """Yield ``credentials`` generated credentials over ``tenants`` tenants (skewed)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data
    providers, weights = zip(*PROVIDER_MIX.items(), strict=True)
    for index, size in enumerate(tenant_sizes(credentials, tenants, rng)):
        tenant = f"tenant-{index:05d}"
        for _ in range(size):
            provider = rng.choices(providers, weights)[0]
            yield GeneratedCredential(tenant, provider, generate_secret(provider, rng))


__all__ = ["PROVIDER_MIX", "GeneratedCredential", "generate", "generate_secret", "tenant_sizes"]
