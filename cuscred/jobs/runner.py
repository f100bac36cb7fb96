"""Where follow-up work goes after a commit: Celery tasks, or a loop in this process.

Services never call each other's next step directly; they hand ids to a :class:`JobRunner`
after their transaction committed (warehouse's "enqueue after commit"), so a message can never
refer to work that was rolled back. With a broker the runner sends Celery tasks (ids only);
without one (the embedded default) :class:`InProcessRunner` runs the same steps in order here,
and lets helper processes prepare the chunks of a large job (:mod:`cuscred.jobs.local_pool`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cuscred.errors import CuscredError

if TYPE_CHECKING:
    from cuscred.jobs.chunks import ChunkClaim, ChunkOutcome, PreparedChunk
    from cuscred.jobs.local_pool import Prepared, PreparePool

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

    def claim_chunk(self, job_id: int, chunk_no: int) -> ChunkClaim | None: ...

    def prepare_claimed(self, job_id: int, chunk_no: int, claim: ChunkClaim) -> PreparedChunk: ...

    def finish_chunk(self, prepared: PreparedChunk | ChunkOutcome) -> ChunkOutcome: ...

    def finalize_job(self, job_id: int) -> object: ...


@dataclass(frozen=True, slots=True)
class _Step:
    name: str
    call: Callable[[], object]
    chunk: tuple[int, int] | None = None  # (job id, chunk no) of a chunk step


class InProcessRunner:
    """Runs steps in this process, in order, until nothing is left (no recursion).

    Each step is its own transaction exactly as in a worker. A step that raises is retried up
    to ``attempts`` times (then re-raised), like a Celery task with retries.

    Bound with ``pool`` (a factory of :class:`~cuscred.jobs.local_pool.PreparePool`), a job
    with at least ``pool_min_rows`` rows queued in chunks (``chunk_size`` each) has its chunks
    claimed here, prepared (read, re-encrypted) by helper processes and written here, in
    order: same transactions, same outcomes, two cores. A chunk a helper fails runs here as a
    plain step. A helper process that dies stops the pool: this process holds the claims it
    handed out, prepares those chunks itself, and runs the rest of the job as plain steps.
    """

    def __init__(self, attempts: int = 3) -> None:
        self._queue: deque[_Step] = deque()
        self._steps: JobSteps | None = None
        self._running = False
        self._attempts = attempts
        self._pool_factory: Callable[[], PreparePool] | None = None
        self._pool_min_chunks = 2
        self._pool_timeout_s = 300.0

    def bind(
        self, steps: JobSteps, *, pool: Callable[[], PreparePool] | None = None,
        pool_min_rows: int = 0, chunk_size: int = 1, pool_timeout_s: float = 300.0,
    ) -> None:
        """Drive ``steps``; with ``pool``, prepare the chunks of jobs of ``pool_min_rows`` or
        more rows (chunks of ``chunk_size``) in helper processes, each chunk within
        ``pool_timeout_s`` (a chunk's time limit)."""
        self._steps = steps
        self._pool_factory = pool
        self._pool_min_chunks = max(2, -(-pool_min_rows // max(chunk_size, 1)))
        self._pool_timeout_s = pool_timeout_s

    def advance_rotation(self, job_id: int) -> None:
        self._push(_Step(f"advance_rotation({job_id})",
                         lambda: self._s().advance_rotation(job_id)))

    def start(self, job_id: int) -> None:
        self._push(_Step(f"start_reencryption({job_id})",
                         lambda: self._s().start_reencryption(job_id)))

    def chunk(self, job_id: int, chunk_no: int) -> None:
        self._push(_Step(f"reencrypt_chunk({job_id}, {chunk_no})",
                         lambda: self._s().reencrypt_chunk(job_id, chunk_no),
                         chunk=(job_id, chunk_no)))

    def finalize(self, job_id: int) -> None:
        self._push(_Step(f"finalize_job({job_id})", lambda: self._s().finalize_job(job_id)))

    def _s(self) -> JobSteps:
        assert self._steps is not None, "bind() the runner to a service first"
        return self._steps

    def _push(self, step: _Step) -> None:
        self._queue.append(step)
        if not self._running:
            self._drain()

    def _drain(self) -> None:
        self._running = True
        try:
            while self._queue:
                batch = self._chunk_batch()
                if batch:
                    self._run_pooled(batch)
                else:
                    self._run(self._queue.popleft())
        finally:
            self._running = False

    def _run(self, step: _Step) -> None:
        for attempt in range(1, self._attempts + 1):
            try:
                step.call()
                return
            except CuscredError as exc:
                if not exc.retryable or attempt == self._attempts:
                    raise  # a refusal: the same again next time (the Celery tasks agree)
                log.warning("step %s failed (attempt %d), retrying", step.name, attempt)
            except Exception:
                if attempt == self._attempts:
                    raise
                log.warning("step %s failed (attempt %d), retrying", step.name, attempt)

    # --- chunks prepared by helper processes ----------------------------------------------

    def _chunk_batch(self) -> list[_Step]:
        """The chunk steps of one job at the head of the queue, taken off it, if there are
        enough of them to be worth helper processes; else nothing is taken."""
        if self._pool_factory is None or self._queue[0].chunk is None:
            return []
        job_id = self._queue[0].chunk[0]
        count = 0
        for step in self._queue:
            if step.chunk is None or step.chunk[0] != job_id:
                break
            count += 1
        if count < self._pool_min_chunks:
            return []
        return [self._queue.popleft() for _ in range(count)]

    def _run_pooled(self, batch: list[_Step]) -> None:
        assert self._pool_factory is not None
        started = self._pool_factory()
        # Chunks claimed and handed out: one being prepared and one waiting, per helper. More
        # did not go faster (bench/reencrypt.py), and each is a claim an interrupted command
        # leaves behind until its lease runs out.
        ahead = 2 * started.processes
        starting = True
        pool: PreparePool | None = started
        waiting: deque[_Handed] = deque()
        todo = deque(batch)
        try:
            while todo or waiting:
                while pool is not None and todo and len(waiting) < ahead:
                    handed = self._hand_over(todo.popleft(), pool)
                    if handed is not None:
                        waiting.append(handed)
                if not waiting:
                    if pool is None:
                        break
                    continue
                handed = waiting.popleft()
                while starting and not handed.future.done() and todo:
                    # Rather than wait for the helpers to start (about a second), run chunks
                    # from the far end of the job here, start to finish. Once they deliver,
                    # writing what they prepare keeps this process busy.
                    self._run(todo.pop())
                starting = False
                try:
                    prepared = handed.future.result(timeout=self._pool_timeout_s)
                except (BrokenProcessPool, TimeoutError, CancelledError):
                    # A helper died (killed, out of memory) or hung past a chunk's time limit:
                    # it wrote nothing, and this process holds every claim it handed out, so it
                    # stops the helpers for good (cancelling what they had not started) and
                    # prepares those chunks itself.
                    if pool is not None:
                        log.warning("a chunk helper process died or hung; the job goes on here")
                        pool.close(kill=True)
                        pool = None
                    self._finish(handed.step, self._prepare_here(handed))
                    continue
                self._finish(handed.step, prepared)
        finally:
            if pool is not None:
                pool.close()
        for step in todo:  # not handed out before the pool stopped: plain steps, here
            self._run(step)

    def _hand_over(self, step: _Step, pool: PreparePool) -> _Handed | None:
        """Claim the chunk here and give it to a helper to prepare (``None``: it was not
        claimed, or ran here instead)."""
        from cuscred.jobs.chunks import ChunkOutcome

        assert step.chunk is not None
        try:
            claim = self._s().claim_chunk(*step.chunk)
        except Exception as exc:  # the database, say: the plain step retries
            log.warning("claiming for step %s failed (%s); running it here", step.name,
                        type(exc).__name__)
            self._run(step)
            return None
        if claim is None:  # finished, held elsewhere, cancelled or given up
            self._s().finish_chunk(ChunkOutcome(*step.chunk, "not_claimed"))
            return None
        try:
            return _Handed(step, claim, pool.submit(*step.chunk, claim))
        except BrokenProcessPool:
            failed: Future[Prepared] = Future()
            failed.set_exception(BrokenProcessPool("no helper left"))
            return _Handed(step, claim, failed)

    def _prepare_here(self, handed: _Handed) -> Prepared:
        from cuscred.jobs.local_pool import PrepareFailed

        assert handed.step.chunk is not None
        try:
            return self._s().prepare_claimed(*handed.step.chunk, handed.claim)
        except Exception as exc:  # the claim was released: the plain step retries
            return PrepareFailed(type(exc).__name__)

    def _finish(self, step: _Step, prepared: Prepared) -> None:
        from cuscred.jobs.local_pool import PrepareFailed

        if isinstance(prepared, PrepareFailed):
            log.warning("step %s failed while prepared (%s); running it here", step.name,
                        prepared.code)
            self._run(step)
            return
        try:
            outcome = self._s().finish_chunk(prepared)
        except Exception as exc:  # the claim was released: the chunk runs again, here
            log.warning("step %s failed (%s); running it again here", step.name,
                        type(exc).__name__)
            self._run(step)
            return
        if outcome.status == "lost_claim":
            # The claim ran out or was released before the write (nothing was written): run
            # the chunk as a plain step, which claims it again unless another worker has it.
            self._run(step)


@dataclass(frozen=True, slots=True)
class _Handed:
    """A chunk claimed here and handed to a helper process."""

    step: _Step
    claim: ChunkClaim
    future: Future[Prepared]


__all__ = ["InProcessRunner", "JobRunner", "JobSteps"]
