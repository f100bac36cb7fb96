"""Prometheus metrics: what is protected by which key, and how the work that moves it is going.

Two kinds:

* **State**, read from the database at each scrape by :class:`StateCollector` (so every
  process, and ``cuscred metrics``, reports the same truth): credentials per KEK version and
  tenant key generation (one grouped, index-only query: no decryption), the KEK versions' states
  and the active one's age, and the progress of every unfinished job.
* **Events**, counted by the process that sees them: chunk durations, decrypt failures by
  reason, Vault request latency and errors, audit write failures. In the Celery worker they are
  aggregated across pool processes through ``prometheus_client``'s multiprocess mode
  (``worker/metrics.py``).

No label carries a secret, a reference or a tenant id: labels are versions, job ids and kinds,
fixed operation names and error codes.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cuscred.db.models import CREDENTIALS, KEK_VERSIONS, ROTATION_JOBS, JobStatus, KeyState, utcnow

if TYPE_CHECKING:
    from prometheus_client import Metric
    from sqlalchemy import Engine

# --- events (process-local; aggregated across a worker's pool in multiprocess mode) -----------

CHUNK_SECONDS = Histogram(
    "cuscred_chunk_duration_seconds", "Wall time of one chunk task's work, by outcome.",
    ["status"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
DECRYPT_FAILURES = Counter(
    "cuscred_decrypt_failures", "Stored values that failed to decrypt, by reason.", ["reason"],
)
VAULT_SECONDS = Histogram(
    "cuscred_vault_request_duration_seconds", "Vault requests by operation (success or not).",
    ["operation"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
VAULT_ERRORS = Counter(
    "cuscred_vault_request_errors", "Vault requests that failed, by operation and error code.",
    ["operation", "code"],
)
AUDIT_WRITE_FAILURES = Counter(
    "cuscred_audit_write_failures", "Audit events that could not be written (the access failed).",
)

_JOB_STATES = ("pending", "running")


def failure_reason(code: str) -> str:
    """A bounded label from a failure reason: ``kek_v3_unavailable`` -> ``kek_unavailable``."""
    if code.startswith("kek_v") and code.endswith("_unavailable"):
        return "kek_unavailable"
    return code


# --- state (read from the database at scrape time) ----------------------------------------


class StateCollector(Collector):
    """Census, KEK ages and job progress, queried from ``engine`` on every collect."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cuscred_state_up",
                               "1 if the state metrics below could be read from the database.")
        try:
            families = list(self._read())
        except SQLAlchemyError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> Iterator[Metric]:
        # Imported here: the job views reach the audit log, which counts its failures here.
        from cuscred.jobs.views import query_jobs

        started = time.perf_counter()
        c, kv, j = CREDENTIALS.c, KEK_VERSIONS.c, ROTATION_JOBS.c
        with self._engine.connect() as conn:
            census = conn.execute(
                select(c.kek_version, c.key_generation, func.count())
                .group_by(c.kek_version, c.key_generation)
            ).all()
            versions = conn.execute(select(kv.version, kv.state, kv.activated_at)).all()
            # Sums over committed chunks: the job row's own counts are written only when the
            # job ends, so they would read 0 for the whole of a running job.
            jobs = query_jobs(conn, j.status.in_(_JOB_STATES))
        credentials = GaugeMetricFamily(
            "cuscred_credentials", "Stored credentials by the KEK version and tenant key "
            "generation in their header (from the indexed columns, nothing decrypted).",
            labels=["kek_version", "key_generation"])
        for version, generation, count in census:
            credentials.add_metric([str(version), str(generation)], count)
        yield credentials

        states = GaugeMetricFamily("cuscred_kek_version_state",
                                   "1 for each KEK version's current state.",
                                   labels=["kek_version", "state"])
        age = GaugeMetricFamily("cuscred_active_kek_age_seconds",
                                "Seconds since the active KEK version was promoted.")
        now = utcnow()
        for version, state, activated_at in versions:
            states.add_metric([str(version), str(state)], 1)
            if state == KeyState.ACTIVE and activated_at is not None:
                age.add_metric([], (now - activated_at).total_seconds())
        yield states
        yield age

        rows = GaugeMetricFamily("cuscred_job_rows", "Rows of each unfinished re-encryption "
                                 "job, by what happened to them.",
                                 labels=["job_id", "kind", "status", "rows"])
        for job in jobs:
            # "total" is the planned row count while the job runs (what the chunks were cut
            # from); done + skipped + failed reaches it as the last chunk commits.
            for name, value in (("total", job.rows_total), ("done", job.done),
                                ("skipped", job.skipped), ("failed", job.failed)):
                rows.add_metric([str(job.id), str(job.kind), str(job.status), name], value)
        yield rows
        running = GaugeMetricFamily("cuscred_jobs_running", "Jobs running (not pending ones).")
        running.add_metric([], sum(1 for job in jobs if job.status == JobStatus.RUNNING))
        yield running
        took = GaugeMetricFamily("cuscred_state_query_seconds",
                                 "Time the state queries of this scrape took.")
        took.add_metric([], time.perf_counter() - started)
        yield took


def state_registry(engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(engine))
    return registry


def render(engine: Engine, *, with_process: bool = True) -> bytes:
    """The text exposition of the state (and this process's event metrics)."""
    text = generate_latest(state_registry(engine))
    if with_process:
        from prometheus_client import REGISTRY

        text += generate_latest(REGISTRY)
    return text


def write_textfile(engine: Engine, path: Path) -> None:
    """Write the state metrics for node_exporter's textfile collector, atomically (a scrape
    must never read a half-written file)."""
    data = render(engine, with_process=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "AUDIT_WRITE_FAILURES",
    "CHUNK_SECONDS",
    "DECRYPT_FAILURES",
    "VAULT_ERRORS",
    "VAULT_SECONDS",
    "StateCollector",
    "failure_reason",
    "render",
    "state_registry",
    "write_textfile",
]
