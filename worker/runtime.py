"""The worker process's runtime: built on first use from the environment, rebuilt after fork.

Celery's prefork pool forks children from the main process; a database connection or a cached
key must never be shared across that fork, so each child disposes what it inherited
(STYLE.md habit 9) and builds its own on first use.
"""

from __future__ import annotations

import os
import threading

from cuscred.config import Settings
from cuscred.factory import Runtime, build_runtime

_lock = threading.Lock()
_settings: Settings | None = None
_runtime: Runtime | None = None


def settings() -> Settings:
    global _settings
    with _lock:
        if _settings is None:
            _settings = Settings.from_env(os.environ)
        return _settings


def runtime() -> Runtime:
    global _runtime
    current = settings()
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(current)
        return _runtime


def after_fork() -> None:
    """In a new child: drop the parent's pooled connections and cached keys."""
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.dispose()
        _runtime = None


__all__ = ["after_fork", "runtime", "settings"]
