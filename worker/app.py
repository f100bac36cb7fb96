"""The Celery application (``celery -A worker worker|beat|flower``).

The app object exists at import (Celery needs it), but reads no environment then: its
configuration is built from ``CUSCRED_*`` settings when Celery first needs it
(``on_configure``). Start-up refuses a visibility timeout that does not exceed the chunk
task's hard time limit.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_init, worker_process_init

from worker import runtime as process_runtime
from worker.config import celery_config, check_visibility_timeout
from worker.logging import install_logging

app = Celery("cuscred", include=["tasks.rotation"])


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(process_runtime.settings()))


@worker_init.connect
def _check_worker(**_: Any) -> None:
    install_logging(process_runtime.settings())
    check_visibility_timeout(process_runtime.settings())


@beat_init.connect
def _check_beat(**_: Any) -> None:
    install_logging(process_runtime.settings())
    check_visibility_timeout(process_runtime.settings())


@worker_process_init.connect
def _fresh_runtime_after_fork(**_: Any) -> None:
    process_runtime.after_fork()


__all__ = ["app"]
