"""A logging filter that redacts anything shaped like a secret, as a second line of defence.

The first line is that no code of ours puts a secret in a log call, an exception or a task
argument (the leak-scan tests check it, and fail if this filter ever had to act). It catches
what a third-party library might log: provider key shapes (Azure's bare 32 hex digits
included), PEM private keys, Vault tokens and bearer headers. It rewrites the record's message
(and formatted traceback) before any handler sees it.
"""

from __future__ import annotations

import logging
import re
import sys

REDACTED = "[REDACTED]"

_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
    re.compile(r"sk-(?:proj|ant|svcacct|admin|ant-api\d\d)-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}"),
    re.compile(r"\bAIza[0-9A-Za-z_\-]{20,}"),
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(r"\b[0-9a-f]{32}\b"),  # Azure OpenAI keys: 32 hex digits, nothing else
    re.compile(r"\b(?:hvs|hvb|hvr|s|b|r)\.[A-Za-z0-9_\-]{20,}"),  # Vault / OpenBao tokens
    re.compile(r"(?i)(authorization|x-vault-token)([\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
    re.compile(r"(?i)(secret_access_key|private_key(?:_id)?|secret_id|password)"
               r"([\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
]


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        if pattern.groups >= 2:
            text = pattern.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrite each record's message and traceback with :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = redact(text), None
        return True


def log_warnings_to_stderr() -> None:
    """Warnings and errors to stderr, every handler through :class:`RedactingFilter`: the CLI
    and the job helper processes (the worker has its own handler, ``worker/logging.py``)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


__all__ = ["REDACTED", "RedactingFilter", "log_warnings_to_stderr", "redact"]
