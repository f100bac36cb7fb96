"""Rotation tasks. Each takes ids (never a secret, never key material), calls one service
method (which opens its own transactions and enqueues follow-ups after commit), and returns
a small dict of ids and counts.

Retries: a retryable failure (Vault or the database unavailable) is retried with exponential
backoff and jitter; the chunk's claim was already released, so the retry can claim it again.
Exceptions are re-raised as :class:`TaskFailedError` carrying only an error code, so nothing but
fixed text reaches the broker, the events Flower reads, or the logs.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task

from cuscred.errors import CuscredError, InvalidInputError
from cuscred.jobs.celery_runner import (
    TASK_ADVANCE,
    TASK_CHUNK,
    TASK_FINALIZE,
    TASK_START,
    CeleryRunner,
)
from cuscred.jobs.chunks import is_retryable
from cuscred.jobs.control import JobControl
from cuscred.jobs.service import RotationService
from cuscred.validation import validate_actor
from worker import runtime as process_runtime
from worker.app import app
from worker.config import TASK_CHECK_ROTATION_DUE, TASK_SWEEP

log = logging.getLogger("cuscred.tasks")
MAX_RETRIES = 40
BACKOFF_CAP_S = 60
#: Follow-up steps go out through this worker's own app: one broker connection pool per
#: process (a runner from settings would build a new Celery app, and a new pool, per task).
_RUNNER = CeleryRunner(app)


class TaskFailedError(Exception):
    """A task error reduced to a code: safe to serialise into events and logs."""


def _service() -> RotationService:
    return process_runtime.runtime().rotation(_RUNNER)


def _run(task: Task, what: str, call: Any) -> Any:
    try:
        return call()
    except Exception as exc:
        code = exc.code if isinstance(exc, CuscredError) else type(exc).__name__
        if is_retryable(exc) and task.request.retries < MAX_RETRIES:
            delay = min(BACKOFF_CAP_S, 2 ** task.request.retries) * (0.5 + random.random())  # noqa: S311
            log.warning("%s: %s, retry %d in %.1fs", what, code, task.request.retries + 1, delay)
            raise task.retry(exc=TaskFailedError(code), countdown=delay) from None
        log.error("%s failed: %s", what, code)
        raise TaskFailedError(code) from None


def _ids(*values: object) -> tuple[int, ...]:
    """Job ids and chunk numbers as the tasks take them: positive ints, nothing else.

    Anyone who can write to the broker can send any arguments; a string here would otherwise
    reach the log lines below verbatim (log injection) before the service refused it.
    """
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            log.error("task refused: its arguments are not positive integer ids")
            raise TaskFailedError("invalid_arguments")
    return tuple(int(v) for v in values)  # type: ignore[call-overload]


def _actor(requested_by: object) -> str:
    """Who asked, as the audit trail records it (:func:`validate_actor`), at most 64
    characters."""
    try:
        if isinstance(requested_by, str) and len(requested_by) <= 64:
            return validate_actor(requested_by)
    except InvalidInputError:
        pass
    log.error("task refused: requested_by is not an acceptable actor")
    raise TaskFailedError("invalid_arguments")


_JOB = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "max_retries": MAX_RETRIES}


@app.task(name="tasks.rotation.rotate_kek", **_JOB)
def rotate_kek(self: Task, requested_by: str = "beat") -> dict[str, Any]:
    """Start a KEK rotation (or return the one in flight)."""
    actor = _actor(requested_by)
    job_id, created = _run(self, "rotate_kek",
                           lambda: _service().rotate_kek(requested_by=actor))
    return {"job_id": job_id, "created": created}


@app.task(name=TASK_ADVANCE, **_JOB)
def rotate_kek_advance(self: Task, job_id: int) -> dict[str, Any]:
    """Steps 1-2 of a KEK rotation: new version readable everywhere, then promoted."""
    (job_id,) = _ids(job_id)
    _run(self, f"rotate_kek_advance job={job_id}", lambda: _service().advance_rotation(job_id))
    return {"job_id": job_id}


@app.task(name="tasks.rotation.rekey_tenant", **_JOB)
def rekey_tenant(self: Task, tenant_id: str, requested_by: str = "task") -> dict[str, Any]:
    """A new key generation for one tenant and a job moving its rows to it."""
    actor = _actor(requested_by)
    job_id = _run(self, "rekey_tenant",
                  lambda: _service().rekey_tenant(tenant_id, requested_by=actor))
    return {"job_id": job_id}


@app.task(name=TASK_START, **_JOB)
def start_reencryption(self: Task, job_id: int) -> dict[str, Any]:
    """Split a job into chunks and enqueue one task per chunk."""
    (job_id,) = _ids(job_id)
    chunks = _run(self, f"start_reencryption job={job_id}",
                  lambda: _service().start_reencryption(job_id))
    return {"job_id": job_id, "chunks": len(chunks)}


@app.task(name=TASK_CHUNK, **_JOB)
def reencrypt_chunk(self: Task, job_id: int, chunk_no: int) -> dict[str, Any]:
    """Re-encrypt one chunk in one transaction (see cuscred.jobs.chunks)."""
    job_id, chunk_no = _ids(job_id, chunk_no)
    outcome = _run(self, f"reencrypt_chunk job={job_id} chunk={chunk_no}",
                   lambda: _service().reencrypt_chunk(job_id, chunk_no))
    result: dict[str, Any] = outcome.as_dict()
    log.info("chunk job=%d chunk=%d status=%s rows=%d done=%d skipped=%d failed=%d "
             "duration_ms=%d", job_id, chunk_no, outcome.status, outcome.total, outcome.done,
             outcome.skipped, outcome.failed, outcome.duration_ms,
             extra={"job": job_id, "chunk": chunk_no, "status": outcome.status,
                    "rows": outcome.total, "done": outcome.done, "skipped": outcome.skipped,
                    "failed": outcome.failed, "duration_ms": outcome.duration_ms})
    return result


@app.task(name=TASK_FINALIZE, **_JOB)
def finalize_job(self: Task, job_id: int) -> dict[str, Any]:
    """Sum the chunks, take the census, complete the job (or plan a sweep-up pass)."""
    (job_id,) = _ids(job_id)
    result = _run(self, f"finalize_job job={job_id}", lambda: _service().finalize_job(job_id))
    return {"job_id": job_id, "status": result.status, "new_chunks": len(result.new_chunks)}


@app.task(name="tasks.rotation.verify", **_JOB)
def verify(self: Task, job_id: int | None = None, tenant_id: str | None = None) -> dict[str, Any]:
    """Decrypt every credential in scope; counts per KEK version and the failing ids."""
    if job_id is not None:
        (job_id,) = _ids(job_id)
    report = _run(self, "verify", lambda: JobControl(_service()).verify(
        job_id=job_id, tenant_id=tenant_id, actor="worker"))
    return {"checked": report.checked,
            "per_kek_version": {str(k): v for k, v in sorted(report.per_kek_version.items())},
            "failed_ids": [cid for cid, _ in report.failures]}


@app.task(name=TASK_CHECK_ROTATION_DUE, **_JOB)
def check_rotation_due(self: Task) -> dict[str, Any]:
    """Beat, daily and at beat start-up: start a KEK rotation if the active version is older
    than the maximum age (at most one is ever in flight)."""
    job_id = _run(self, "check_rotation_due", lambda: JobControl(_service()).check_rotation_due())
    return {"job_id": job_id}


@app.task(name=TASK_SWEEP, **_JOB)
def sweep(self: Task) -> dict[str, Any]:
    """Beat, every minute: re-enqueue chunks whose lease ran out or whose message was lost."""
    report = _run(self, "sweep", lambda: JobControl(_service()).sweep())
    return {"requeued": len(report.requeued_chunks), "finalized": len(report.finalized_jobs),
            "advanced": len(report.advanced_rotations)}


__all__ = [
    "check_rotation_due", "finalize_job", "reencrypt_chunk", "rekey_tenant", "rotate_kek",
    "rotate_kek_advance", "start_reencryption", "sweep", "verify",
]
