"""The rotation worker: ``celery -A worker worker``, ``celery -A worker beat``,
``celery -A worker flower --basic-auth=USER:PASS``."""

import os
import tempfile

from prometheus_client import values as _prometheus_values

# With a metrics port, the pool processes' counters go to files in a directory that the main
# process sums when scraped (worker/metrics.py). prometheus_client picks its value class when it
# is first imported, which the ``celery`` command has already done (Flower's plugin imports it),
# so it is switched here, before cuscred.metrics creates any metric.
if os.environ.get("CUSCRED_METRICS_PORT"):
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="cuscred-metrics-"))
    _prometheus_values.ValueClass = _prometheus_values.MultiProcessValue()  # type: ignore[no-untyped-call]

from worker.app import app  # after the metrics mode above is chosen

__all__ = ["app"]
