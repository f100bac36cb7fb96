"""Where follow-up work goes after a commit: Celery tasks, or a loop in this process.

Services never call each other's next step directly; they hand ids to a :class:`JobRunner`
after their transaction committed (warehouse's "enqueue after commit"), so a message can never
refer to work that was rolled back. With a broker the runner sends Celery tasks (ids only);
without one (the embedded default) :class:`InProcessRunner` runs the same steps in order here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class JobRunner(Protocol):
    def advance_rotation(self, job_id: int) -> None: ...

    def start(self, job_id: int) -> None: ...

    def chunk(self, job_id: int, chunk_no: int) -> None: ...

    def finalize(self, job_id: int) -> None: ...


class JobSteps(Protocol):
    """The service methods a runner drives (see :class:`cuscred.jobs.service.RotationService`)."""

    def advance_rotation(self, job_id: int) -> None: ...

    def start_reencryption(self, job_id: int) -> object: ...

    def reencrypt_chunk(self, job_id: int, chunk_no: int) -> object: ...

    def finalize_job(self, job_id: int) -> object: ...


class InProcessRunner:
    """Runs steps in this process, in order, until nothing is left (no recursion).

    Each step is its own transaction exactly as in a worker. A step that raises is retried up
    to ``attempts`` times (then re-raised), like a Celery task with retries.
    """

    def __init__(self, attempts: int = 3) -> None:
        self._queue: deque[tuple[str, Callable[[], object]]] = deque()
        self._steps: JobSteps | None = None
        self._running = False
        self._attempts = attempts

    def bind(self, steps: JobSteps) -> None:
        self._steps = steps

    def advance_rotation(self, job_id: int) -> None:
        self._push(f"advance_rotation({job_id})", lambda: self._s().advance_rotation(job_id))

    def start(self, job_id: int) -> None:
        self._push(f"start_reencryption({job_id})", lambda: self._s().start_reencryption(job_id))

    def chunk(self, job_id: int, chunk_no: int) -> None:
        self._push(f"reencrypt_chunk({job_id}, {chunk_no})",
                   lambda: self._s().reencrypt_chunk(job_id, chunk_no))

    def finalize(self, job_id: int) -> None:
        self._push(f"finalize_job({job_id})", lambda: self._s().finalize_job(job_id))

    def _s(self) -> JobSteps:
        assert self._steps is not None, "bind() the runner to a service first"
        return self._steps

    def _push(self, name: str, step: Callable[[], object]) -> None:
        self._queue.append((name, step))
        if not self._running:
            self._drain()

    def _drain(self) -> None:
        self._running = True
        try:
            while self._queue:
                name, step = self._queue.popleft()
                for attempt in range(1, self._attempts + 1):
                    try:
                        step()
                        break
                    except Exception:
                        if attempt == self._attempts:
                            raise
                        log.warning("step %s failed (attempt %d), retrying", name, attempt)
        finally:
            self._running = False


__all__ = ["InProcessRunner", "JobRunner", "JobSteps"]
