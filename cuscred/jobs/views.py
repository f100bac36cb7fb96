"""Read-only views of re-encryption jobs: lists, details, progress, rates and ETAs.

Everything here is computed from committed rows of ``rotation_jobs``, ``rotation_chunks`` and
``rotation_failures``: nothing is decrypted, nothing is written, and no key is loaded. So the
same numbers come out whether the chunks run in Celery workers or in this process, and a
dashboard or ``cuscred jobs`` can poll them as often as it likes.

A job's counts are always sums over its chunks. The job row's own totals are only written by
``finalize`` (a cancelled job never gets them), while a chunk's counts are written in the very
transaction that moved its rows, so the sums are exact at any moment. Progress is measured in
*planned* rows (what the planner counted when it cut the chunks): it only grows, and it reaches
100% exactly when the last chunk finishes. Rates and ETAs use the wall-clock time since the
job was planned, so several workers in parallel show as a higher rate, as they should.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, case, create_engine, event, func, select
from sqlalchemy.pool import NullPool

from cuscred.db.models import (
    ROTATION_CHUNKS,
    ROTATION_FAILURES,
    ROTATION_JOBS,
    ChunkStatus,
    JobStatus,
    utcnow,
)
from cuscred.db.session import sqlite_text
from cuscred.jobs.finalize import FINAL

_J = ROTATION_JOBS
_CH = ROTATION_CHUNKS
_F = ROTATION_FAILURES
_FINISHED = (ChunkStatus.DONE, ChunkStatus.FAILED)  # their rows were handled, counts written
_OPEN = (ChunkStatus.PENDING, ChunkStatus.RUNNING)
_COMPLETED = (JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS)


@dataclass(frozen=True, slots=True)
class JobView:
    """One job with its chunk sums, as of ``as_of``."""

    id: int
    kind: str
    status: str
    tenant_id: str | None
    target_kek_version: int | None
    target_generation: int | None
    requested_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_error: str | None
    passes: int
    chunks: int
    open_chunks: int
    planned: int  # rows the planner counted, over all passes
    planned_finished: int  # planned rows of chunks that finished (done or gave up)
    planned_open: int  # planned rows of chunks still pending or running
    total: int  # rows the finished chunks found still to move
    done: int
    skipped: int  # changed by the application meanwhile: already current, left alone
    failed: int  # would not decrypt (or their chunk gave up): recorded, left untouched
    census_json: str | None  # recorded by finalize (see :attr:`census`)
    as_of: datetime

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def processed(self) -> int:
        return self.done + self.skipped + self.failed

    @property
    def rows_total(self) -> int:
        """The denominator to show: what the chunks found once complete, else the plan."""
        return self.total if self.status in _COMPLETED else self.planned

    @property
    def fraction(self) -> float | None:
        """Share of the planned work finished, 0.0-1.0; ``None`` before planning."""
        if self.status in _COMPLETED:
            return 1.0
        if self.planned == 0:
            return None
        return self.planned_finished / self.planned

    @property
    def elapsed_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or self.as_of
        return max((end - self.started_at).total_seconds(), 0.0)

    @property
    def rate(self) -> float | None:
        """Rows handled per second of wall-clock time since the job was planned."""
        elapsed = self.elapsed_s
        if not elapsed or not self.processed:
            return None
        return self.processed / elapsed

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; ``None`` when unknown or not running."""
        elapsed = self.elapsed_s
        if self.status != JobStatus.RUNNING or elapsed is None or not self.planned_finished:
            return None
        return elapsed * self.planned_open / self.planned_finished

    @property
    def census(self) -> list[dict[str, int]] | None:
        """Rows in the job's scope per KEK version and tenant key generation when it
        completed; ``None`` for a job that did not complete (or finished before this was
        recorded)."""
        if self.census_json is None:
            return None
        return [{"kek_version": v, "key_generation": g, "credentials": n}
                for v, g, n in json.loads(self.census_json)]

    def as_json(self) -> dict[str, Any]:
        names = (*(n for n in self.__slots__ if n != "census_json"), "census", "final",
                 "processed", "rows_total", "fraction", "elapsed_s", "rate", "eta_s")
        return {name: _iso(getattr(self, name)) for name in names}


@dataclass(frozen=True, slots=True)
class FailureView:
    credential_id: str
    chunk_no: int
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChunkSummary:
    by_status: dict[str, int]
    attempts: int  # claims, over all chunks
    retried: int  # chunks claimed more than once
    crashes: int  # presumed worker crashes (leases that ran out, non-retryable errors)
    duration_ms: dict[str, int]  # total/min/median/max over finished chunks (empty if none)
    errors: list[tuple[int, str, str]]  # (chunk_no, status, last_error)


@dataclass(frozen=True, slots=True)
class JobDetail:
    job: JobView
    chunks: ChunkSummary
    failure_count: int
    failure_reasons: dict[str, int]
    failures: list[FailureView] = field(default_factory=list)  # the first ``failures_limit``

    def as_json(self) -> dict[str, Any]:
        return {
            "job": self.job.as_json(),
            "chunks": asdict(self.chunks),
            "failure_count": self.failure_count,
            "failure_reasons": self.failure_reasons,
            "failures": [{k: _iso(v) for k, v in asdict(f).items()} for f in self.failures],
        }


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def reader_engine(engine: Engine) -> Engine:
    """An engine for polling these views while jobs run, which never waits for a writer.

    The library's SQLite engine opens every transaction with ``BEGIN IMMEDIATE`` (it serialises
    writers, see :mod:`cuscred.db.session`), so a poller through it queues behind each chunk
    transaction and, against a busy in-process runner, starves. In WAL mode a plain read sees
    the last commit without taking the write lock, and pysqlite runs a ``SELECT`` as exactly
    that. PostgreSQL readers never wait: the engine is returned as it is. Dispose of the new
    engine when done.
    """
    if engine.dialect.name != "sqlite":
        return engine
    reader = create_engine(engine.url, poolclass=NullPool, hide_parameters=True,
                           connect_args={"timeout": 30})
    event.listen(reader, "connect", _reader_connected)
    return reader


def _reader_connected(dbapi_conn: Any, _record: object) -> None:
    dbapi_conn.text_factory = sqlite_text  # damaged TEXT: see sqlite_text


def _chunk_sums() -> Any:
    def planned_if(statuses: tuple[ChunkStatus, ...]) -> Any:
        return func.coalesce(func.sum(case((_CH.c.status.in_(statuses), _CH.c.planned_rows),
                                           else_=0)), 0)

    return select(
        _CH.c.job_id,
        func.count().label("chunks"),
        func.count().filter(_CH.c.status.in_(_OPEN)).label("open_chunks"),
        func.coalesce(func.sum(_CH.c.planned_rows), 0).label("planned"),
        planned_if(_FINISHED).label("planned_finished"),
        planned_if(_OPEN).label("planned_open"),
        *(func.coalesce(func.sum(_CH.c[name]), 0).label(name)
          for name in ("total", "done", "skipped", "failed")),
    ).group_by(_CH.c.job_id).subquery()


_SUMMED = ("chunks", "open_chunks", "planned", "planned_finished", "planned_open", "total",
           "done", "skipped", "failed")
_JOB_COLUMNS = ("id", "kind", "status", "tenant_id", "target_kek_version", "target_generation",
                "requested_by", "created_at", "started_at", "finished_at", "last_error", "passes",
                "census_json")


def query_jobs(conn: Connection, *where: Any, limit: int | None = None) -> list[JobView]:
    """Jobs matching ``where`` (newest first) with their chunk sums, on ``conn``."""
    sums = _chunk_sums()
    query = (
        select(*(_J.c[name] for name in _JOB_COLUMNS),
               *(func.coalesce(sums.c[name], 0).label(name) for name in _SUMMED))
        .outerjoin(sums, sums.c.job_id == _J.c.id)
        .where(*where)
        .order_by(_J.c.id.desc())
        .limit(limit)
    )
    rows = conn.execute(query).all()
    as_of = utcnow()
    views = []
    for r in rows:
        values: dict[str, Any] = {name: getattr(r, name) for name in _JOB_COLUMNS}
        values.update({name: int(getattr(r, name)) for name in _SUMMED})
        views.append(JobView(**values, as_of=as_of))
    return views


def list_jobs(engine: Engine, *, limit: int = 20, status: str | None = None) -> list[JobView]:
    """The newest ``limit`` jobs (optionally only those in ``status``), newest first."""
    where = [] if status is None else [_J.c.status == status]
    with engine.connect() as conn:
        return query_jobs(conn, *where, limit=limit)


def get_job(engine: Engine, job_id: int) -> JobView | None:
    """One job's progress, or ``None`` if there is no such job. Cheap enough to poll."""
    with engine.connect() as conn:
        found = query_jobs(conn, _J.c.id == job_id)
    return found[0] if found else None


def job_detail(
    engine: Engine, job_id: int, *, failures_limit: int | None = 100
) -> JobDetail | None:
    """A job with its chunk summary and the credentials it could not move (ids and reasons:
    credential ids are not secret). ``failures_limit=None`` lists every failure."""
    with engine.connect() as conn:
        found = query_jobs(conn, _J.c.id == job_id)
        if not found:
            return None
        chunks = _chunk_summary(conn, job_id)
        reasons = {str(reason): int(n) for reason, n in conn.execute(
            select(_F.c.reason, func.count()).where(_F.c.job_id == job_id)
            .group_by(_F.c.reason).order_by(_F.c.reason)
        ).all()}
        failures = [
            FailureView(r.credential_id, r.chunk_no, r.reason, r.created_at)
            for r in conn.execute(
                select(_F.c.credential_id, _F.c.chunk_no, _F.c.reason, _F.c.created_at)
                .where(_F.c.job_id == job_id).order_by(_F.c.id).limit(failures_limit)
            ).all()
        ]
    return JobDetail(found[0], chunks, sum(reasons.values()), reasons, failures)


def _chunk_summary(conn: Connection, job_id: int) -> ChunkSummary:
    rows = conn.execute(
        select(_CH.c.chunk_no, _CH.c.status, _CH.c.attempts, _CH.c.crashes, _CH.c.duration_ms,
               _CH.c.last_error).where(_CH.c.job_id == job_id).order_by(_CH.c.chunk_no)
    ).all()
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    durations = [r.duration_ms for r in rows
                 if r.status == ChunkStatus.DONE and r.duration_ms is not None]
    duration_ms = {} if not durations else {
        "total": sum(durations), "min": min(durations),
        "median": int(statistics.median(durations)), "max": max(durations)}
    return ChunkSummary(
        by_status=by_status,
        attempts=sum(r.attempts for r in rows),
        retried=sum(1 for r in rows if r.attempts > 1),
        crashes=sum(r.crashes for r in rows),
        duration_ms=duration_ms,
        errors=[(r.chunk_no, r.status, r.last_error) for r in rows if r.last_error],
    )


__all__ = ["ChunkSummary", "FailureView", "JobDetail", "JobView", "get_job", "job_detail",
           "list_jobs", "reader_engine"]
