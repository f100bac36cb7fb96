"""Logging for worker and beat processes: one line per event, JSON when asked
(``CUSCRED_LOG_FORMAT=json``), and a filter that redacts anything shaped like a provider key as a
second line of defence (the first is that no code logs a secret).

In JSON each line is one object: ``timestamp``, ``level``, ``logger``, ``event`` (the message)
and the record's extra fields, e.g. for every chunk ``job``, ``chunk``, ``status``, ``rows``,
``done``, ``skipped``, ``failed``, ``duration_ms`` (ids and counts only).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from cuscred.config import LogFormat, Settings
from cuscred.logging_redaction import RedactingFilter


def _exception_text(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # The redaction filter has already turned the traceback into redacted text (exc_text).
    record = event.get("_record")
    text = getattr(record, "exc_text", None)
    if text:
        event["exception"] = text
    return event


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class TextFormatter(logging.Formatter):
    """``time level logger: message``, where a record never forges another line.

    Messages can carry text from outside (Celery logs a refused message's arguments, an
    exception its input): control characters are escaped, and every line after a record's
    first (a traceback, a multi-line message) is indented with ``  | ``, so a line that
    starts with a timestamp is always a record of its own.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", super().format(record))
        return text.replace("\n", "\n  | ")


def json_formatter() -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            _exception_text,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
    )


def install_logging(settings: Settings) -> None:
    root = logging.getLogger()
    # The process's real stderr: beat has already pointed sys.stderr at a proxy that logs what
    # is written to it, which would swallow every record sent back to it.
    handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.addFilter(RedactingFilter())
    if settings.log_format is LogFormat.JSON:
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(TextFormatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


__all__ = ["TextFormatter", "install_logging", "json_formatter"]
