"""Which LLM provider a secret belongs to, judged from its shape alone (no I/O).

:data:`KEY_SHAPES` is the one table of known key prefixes. Detection uses it, and masking
(:mod:`cuscred.masking`) shows a prefix only if it comes from this table, so adding a provider
is one line here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cuscred.errors import CuscredTypeError

OPENAI = "openai"
ANTHROPIC = "anthropic"
GOOGLE = "google"
AZURE_OPENAI = "azure-openai"
AWS = "aws"
VERTEX = "vertex"
GENERIC = "generic"
PROVIDERS = (OPENAI, ANTHROPIC, GOOGLE, AZURE_OPENAI, AWS, VERTEX, GENERIC)


@dataclass(frozen=True, slots=True)
class KeyShape:
    """A provider key: a public, fixed ``prefix`` followed by a ``body`` of a known shape."""

    provider: str
    prefix: str
    body: re.Pattern[str]

    def matches(self, secret: str) -> bool:
        return secret.startswith(self.prefix) and bool(
            self.body.fullmatch(secret, len(self.prefix))
        )


_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,}")

#: Known key shapes. Where prefixes nest, the longer one comes first (``sk-ant-`` before ``sk-``)
#: so that the most specific prefix wins.
KEY_SHAPES: tuple[KeyShape, ...] = (
    KeyShape(ANTHROPIC, "sk-ant-api03-", _TOKEN),
    KeyShape(ANTHROPIC, "sk-ant-", _TOKEN),
    KeyShape(OPENAI, "sk-proj-", _TOKEN),
    KeyShape(OPENAI, "sk-svcacct-", _TOKEN),
    KeyShape(OPENAI, "sk-admin-", _TOKEN),
    KeyShape(OPENAI, "sk-", re.compile(r"[A-Za-z0-9]{48}")),  # legacy user keys
    KeyShape(GOOGLE, "AIza", re.compile(r"[A-Za-z0-9_-]{35}")),
    KeyShape(AWS, "AKIA", re.compile(r"[A-Z0-9]{16}")),  # long-term access key id
    KeyShape(AWS, "ASIA", re.compile(r"[A-Z0-9]{16}")),  # temporary (STS) access key id
)

_AZURE_KEY = re.compile(r"[0-9a-fA-F]{32}")
# AWS field names as written by people and tools: access_key_id, aws_access_key_id, AccessKeyId.
_AWS_FIELDS = frozenset({"accesskeyid", "secretaccesskey"})


def match_shape(secret: str) -> KeyShape | None:
    """The first entry of :data:`KEY_SHAPES` that ``secret`` matches in full, if any."""
    for shape in KEY_SHAPES:
        if shape.matches(secret):
            return shape
    return None


def parse_json_object(text: str) -> dict[str, object] | None:
    """``text`` parsed as a JSON object, or ``None`` if it is not exactly one JSON object.

    Used to recognise JSON credentials (service-account files, AWS key pairs). Never raises.
    """
    if not text.lstrip().startswith("{"):  # cheap test before parsing
        return None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    return doc if isinstance(doc, dict) else None


def json_provider(doc: dict[str, object]) -> str:
    """The provider of a parsed JSON credential: ``vertex``, ``aws`` or ``generic``."""
    if doc.get("type") == "service_account":
        return VERTEX
    names = {key.lower().replace("_", "").removeprefix("aws") for key in doc}
    return AWS if _AWS_FIELDS.issubset(names) else GENERIC


def detect_provider(secret: str) -> str:
    """One of :data:`PROVIDERS`, from the shape of ``secret``; ``"generic"`` if unknown.

    Raises :class:`~cuscred.errors.CuscredTypeError` if ``secret`` is not a ``str``.
    """
    if not isinstance(secret, str):
        raise CuscredTypeError(f"secret must be a str, got {type(secret).__name__}")
    text = str.__str__(secret)
    shape = match_shape(text)
    if shape is not None:
        return shape.provider
    if _AZURE_KEY.fullmatch(text):
        return AZURE_OPENAI
    doc = parse_json_object(text)
    return GENERIC if doc is None else json_provider(doc)


__all__ = [
    "KEY_SHAPES",
    "PROVIDERS",
    "KeyShape",
    "detect_provider",
    "json_provider",
    "match_shape",
    "parse_json_object",
]
