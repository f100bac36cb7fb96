"""The second line of defence: the filter the worker, beat and CLI put on their log handler
rewrites every generated provider key shape, and the worker really installs it. (The first
line, that nothing of ours logs a secret at all, is the leak scan's: it fails if this filter
ever had to act.) Also pins what the data generator produces, since every leak test relies on
its shapes."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import sys
from collections import Counter
from collections.abc import Iterator

import pytest

from cuscred.config import Settings
from cuscred.datagen import PROVIDER_MIX, generate, generate_secret, tenant_sizes
from cuscred.logging_redaction import REDACTED, RedactingFilter, redact
from cuscred.providers import detect_provider
from tests.worker_fixtures import secret_parts


def _windows(secret: str, width: int = 12) -> list[str]:
    return [part[i:i + width] for part in secret_parts(secret)
            for i in range(max(1, len(part) - width + 1))]


@pytest.mark.parametrize("provider", sorted(PROVIDER_MIX))
def test_every_generated_key_shape_is_redacted(provider: str) -> None:
    rng = random.Random(7)
    for _ in range(20):
        secret = generate_secret(provider, rng)
        line = redact(f"provider call failed with key={secret} (retrying)")
        assert REDACTED in line
        # Nothing but structure (JSON punctuation, the PEM armour) of the value survives.
        leaked = [w for w in _windows(secret) if w in line and not set(w) & set(" \n\"'")]
        assert not leaked, f"{provider}: {len(leaked)} secret windows survive redaction"


def test_ids_and_digests_that_are_not_keys_are_left_alone() -> None:
    line = ("job=12 chunk=3 credential cred_4myg5v74v9gdx46jy27j9edmqc "
            "head 3:3966dccb60121a4d438b7e5b0c9428e6feaa0e9070e81b088b8afd189ebf9277 "
            "task 9f1c2b1e-0d7a-4c53-9a53-0c6f3f0b5d11")
    assert redact(line) == line


@contextlib.contextmanager
def _worker_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The worker's own logging set-up, writing to the returned buffer; undone afterwards."""
    from worker.logging import install_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", stream)
    try:
        install_logging(Settings.from_env({}))
        yield stream
    finally:
        root.handlers[:], root.level = saved


def test_the_worker_handler_carries_the_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = generate_secret("openai", random.Random(3))
    with _worker_logging(monkeypatch) as stream:
        (handler,) = logging.getLogger().handlers
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
        logging.getLogger("some.library").warning("request headers: Authorization=Bearer %s",
                                                  secret)
        try:
            raise RuntimeError(f"upstream said: {secret}")
        except RuntimeError:
            logging.getLogger("some.library").exception("call failed")
    out = stream.getvalue()
    assert "request headers" in out and "call failed" in out and REDACTED in out
    assert not [w for w in _windows(secret) if w in out]


def test_generated_data_has_real_shapes_and_a_skewed_tenant_mix() -> None:
    creds = list(generate(3000, 300, seed=11))
    assert len(creds) == 3000
    by_provider = Counter(c.provider for c in creds)
    assert set(by_provider) == set(PROVIDER_MIX)
    for cred in creds:
        assert detect_provider(cred.secret) == cred.provider, cred.provider
    vertex = next(c.secret for c in creds if c.provider == "vertex")
    doc = json.loads(vertex)
    assert doc["type"] == "service_account"
    assert doc["private_key"].startswith("-----BEGIN PRIVATE KEY-----\n")
    assert 2000 <= len(vertex.encode()) <= 2700  # ~2.3 KB, as real service-account files
    aws = json.loads(next(c.secret for c in creds if c.provider == "aws"))
    assert aws["aws_access_key_id"].startswith("AKIA") and len(aws["aws_secret_access_key"]) == 40

    sizes = sorted(Counter(c.tenant_id for c in creds).values(), reverse=True)
    assert len(sizes) == 300 and min(sizes) >= 1
    assert sizes[0] > 500  # a few tenants hold thousands at scale...
    assert sorted(sizes)[len(sizes) // 2] <= 5  # ...most hold one to five
    assert sum(tenant_sizes(3000, 300, random.Random(1))) == 3000


def test_a_worker_log_record_never_forges_another_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Text from outside (a refused message's arguments, an exception's input) can hold
    newlines and terminal escapes: in the worker's text log, only a record's own first line
    starts at column 0, and control characters are escaped."""
    forged = "\n2026-12-04 12:00:00,000 ERROR celery.worker: forged"
    with _worker_logging(monkeypatch) as stream:
        logging.getLogger("celery.worker").error("unexpected kwarg %r%s", "x", forged)
        try:
            raise TypeError(f"bad input{forged}\x1b[2J")
        except TypeError:
            logging.getLogger("celery.worker").exception("task raised")
    lines = stream.getvalue().splitlines()
    records = [line for line in lines if not line.startswith("  | ")]
    assert len(records) == 2 and all(" ERROR celery.worker: " in r for r in records)
    assert not any("forged" in r for r in records) and "\x1b" not in stream.getvalue()
