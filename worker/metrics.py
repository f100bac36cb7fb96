"""The worker's Prometheus endpoint (``CUSCRED_METRICS_PORT``).

Celery's prefork pool runs tasks in child processes, each with its own counters; the main
process serves them summed through ``prometheus_client``'s multiprocess mode, plus the state
read from the database at scrape time (:class:`cuscred.metrics.StateCollector`). Multiprocess
mode must be chosen before ``prometheus_client`` is first imported, so ``worker/__init__.py``
points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before importing anything else.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from cuscred.factory import Runtime
from cuscred.metrics import StateCollector

log = logging.getLogger("cuscred.metrics")


def serve(runtime: Runtime) -> int | None:
    """Start the HTTP endpoint in this (the main) process if a port is configured."""
    settings = runtime.settings
    if settings.metrics_port is None:
        return None
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(StateCollector(runtime.engine))
    start_http_server(settings.metrics_port, addr=settings.metrics_addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_addr, settings.metrics_port)
    return settings.metrics_port


def process_exited(pid: int) -> None:
    """Drop a finished pool process's live gauges (its counters stay in the totals)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


__all__ = ["process_exited", "serve"]
