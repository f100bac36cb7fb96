"""The Celery application (``celery -A worker worker|beat|flower``).

The app object exists at import (Celery needs it), but reads no environment then: its
configuration is built from ``CUSCRED_*`` settings when Celery first needs it
(``on_configure``). Start-up refuses a visibility timeout that does not exceed the chunk
task's hard time limit.

A bad configuration stops the process with one line on stderr and exit status 78
(``EX_CONFIG``). Celery's signal dispatch logs and swallows an ``Exception`` raised by a handler
(the worker would then start anyway, on Celery's default broker), so the handlers raise
``SystemExit``, which it lets through.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from celery import Celery
from celery.signals import (
    beat_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)

from cuscred.errors import ConfigurationError
from worker import metrics as worker_metrics
from worker import runtime as process_runtime
from worker.config import TASK_CHECK_ROTATION_DUE, celery_config, check_visibility_timeout
from worker.logging import install_logging

log = logging.getLogger("cuscred.beat")
#: Exit status of a process refused for its configuration (``EX_CONFIG`` in sysexits.h).
EXIT_CONFIG = 78

app = Celery("cuscred", include=["tasks.rotation"])


def refuse_to_start(exc: ConfigurationError) -> NoReturn:
    # ConfigurationError messages name settings, never their values (cuscred.config). The
    # original stderr: beat has already redirected sys.stderr into its logger by now.
    stream = sys.__stderr__ or sys.stderr
    print(f"cuscred: refusing to start: {exc}", file=stream, flush=True)
    raise SystemExit(EXIT_CONFIG)


@contextmanager
def _or_refuse() -> Iterator[None]:
    try:
        yield
    except ConfigurationError as exc:
        refuse_to_start(exc)


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    with _or_refuse():
        sender.conf.update(celery_config(process_runtime.settings()))


def _start_checks() -> None:
    with _or_refuse():
        settings = process_runtime.settings()
        check_visibility_timeout(settings)
    install_logging(settings)
    with _or_refuse():
        # Rows on a KEK version that cannot be loaded: say so now, once, naming the version,
        # instead of failing every chunk that meets them. (Vault or the database down is no
        # verdict: logged, and the tasks retry with backoff until it is back.)
        process_runtime.runtime().preflight()


@worker_init.connect
def _check_worker(**_: Any) -> None:
    _start_checks()
    worker_metrics.serve(process_runtime.runtime())


@worker_process_shutdown.connect
def _pool_process_exited(pid: int | None = None, **_: Any) -> None:
    worker_metrics.process_exited(pid or os.getpid())


@beat_init.connect
def _check_beat(**_: Any) -> None:
    _start_checks()
    # The schedule's daily interval starts over whenever beat starts without its schedule file
    # (a container restarted by each deploy), so a daily check might never come due: check
    # once at start-up as well. Idempotent: at most one rotation is ever in flight, however
    # many beats send this.
    app.send_task(TASK_CHECK_ROTATION_DUE)
    log.info("start-up rotation-due check sent")


@worker_process_init.connect
def _fresh_runtime_after_fork(**_: Any) -> None:
    process_runtime.after_fork()


__all__ = ["EXIT_CONFIG", "app", "refuse_to_start"]
