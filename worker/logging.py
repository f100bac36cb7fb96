"""Logging for worker and beat processes: one line per event, JSON when asked, and a filter
that redacts anything shaped like a provider key as a second line of defence (the first is that
no code logs a secret)."""

from __future__ import annotations

import logging
import sys

from cuscred.config import Settings
from cuscred.logging_redaction import RedactingFilter


def install_logging(settings: Settings) -> None:
    root = logging.getLogger()
    # The process's real stderr: beat has already pointed sys.stderr at a proxy that logs what
    # is written to it, which would swallow every record sent back to it.
    handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    del settings  # reserved for the JSON switch (operator visibility)


__all__ = ["install_logging"]
