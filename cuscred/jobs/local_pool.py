"""Helper processes that prepare chunks while the runner's own process writes them.

A chunk's work is two halves of about equal cost (bench/reencrypt.py): *prepare* (claim, read
the rows, decrypt and encrypt each: CPU) and *finish* (the compare-and-swap write, the chunk
row and one chained audit event per row, in one transaction). Without a broker every chunk ran
both halves in one process, on one core. Here helper processes prepare the next chunks while
this process finishes the current one, so a large job uses two cores. More helpers than one
rarely help: the writes are serial (SQLite has one writer; the audit chain is one sequence).

Nothing changes in what a chunk does or guarantees. This process claims the chunk exactly as
a Celery worker would (so a crash anywhere is recovered by the lease, as any crash), a helper
reads and re-encrypts its rows, and the :class:`~cuscred.jobs.chunks.PreparedChunk` it hands
back holds ids, new ciphertexts and counts only: no plaintext and no key crosses the pipe.
Helpers never write (but to release a claim they failed): SQLite has one writer, and a helper
waiting for it would stall this process. A helper builds its own engine and key caches from
the settings it is started with, which reach it over the pipe as the environment reaches any
child process.

Helpers start with ``spawn``: a fresh interpreter, never a fork of a process that may run
other threads (the CLI draws its progress bar in one) or hold pooled connections.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from cuscred.config import Settings
from cuscred.errors import CuscredError
from cuscred.jobs.chunks import ChunkClaim, ChunkOutcome, ChunkProcessor, PreparedChunk
from cuscred.logging_redaction import log_warnings_to_stderr

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True, slots=True)
class PrepareFailed:
    """A helper's prepare raised (its claim was released): an error code, no message, since a
    message could carry anything. The runner then runs the chunk itself, with retries."""

    code: str


Prepared = PreparedChunk | ChunkOutcome | PrepareFailed

_processor: ChunkProcessor | None = None


def _die_with_parent() -> None:
    """Linux: the kernel kills this helper when the process that started it dies (kill -9
    included), so no helper outlives its job holding a database handle and key caches."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the helper ends when its pipe breaks
        return
    if os.getppid() == 1:  # the parent died before the call above took effect
        os._exit(1)


def _start_helper(settings: Settings, actor: str) -> None:
    global _processor
    _die_with_parent()
    from cuscred.factory import build_runtime  # the factory imports the runners

    log_warnings_to_stderr()  # a fresh interpreter: the same redacting handler as the CLI's
    runtime = build_runtime(settings, preflight=False)
    _processor = ChunkProcessor(runtime.engine, runtime.keys, runtime.audit, settings,
                                actor=actor)


def _prepare(job_id: int, chunk_no: int, claim: ChunkClaim) -> Prepared:
    assert _processor is not None, "helper not started"
    try:
        return _processor.prepare_claimed(job_id, chunk_no, claim)
    except Exception as exc:  # reported by code only; the runner retries the chunk itself
        return PrepareFailed(exc.code if isinstance(exc, CuscredError) else type(exc).__name__)


class PreparePool:
    """``processes`` helper processes preparing chunks for this process to finish."""

    def __init__(self, settings: Settings, processes: int, *, actor: str) -> None:
        self._executor = ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_helper, initargs=(settings, actor),
        )
        self.processes = processes

    def __repr__(self) -> str:
        return f"<PreparePool processes={self.processes}>"

    def submit(self, job_id: int, chunk_no: int, claim: ChunkClaim) -> Future[Prepared]:
        """Prepare a chunk this process claimed (claims and all other writes stay here: a
        helper holding SQLite's write lock would stall the writer)."""
        return self._executor.submit(_prepare, job_id, chunk_no, claim)

    def close(self, *, kill: bool = False) -> None:
        """Stop the helpers; with ``kill``, at once (one that hangs would never return from
        its call, and one that came back later must not release a claim prepared here)."""
        if kill:
            # The executor keeps no public handle on its processes (3.14 adds
            # terminate_workers()); a pool that has not started any has none to kill.
            processes = getattr(self._executor, "_processes", None) or {}
            for process in list(processes.values()):
                process.kill()
        self._executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["PrepareFailed", "PreparePool", "Prepared"]
