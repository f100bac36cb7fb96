"""Create jobs and split their work into chunks (contiguous primary-key ranges)."""

from __future__ import annotations

from sqlalchemy import Connection, func, insert, select, update

from cuscred.db.models import (
    ROTATION_CHUNKS,
    ROTATION_JOBS,
    ChunkStatus,
    JobKind,
    JobStatus,
    utcnow,
)
from cuscred.jobs.scope import chunk_boundaries

_J = ROTATION_JOBS
_CH = ROTATION_CHUNKS


def create_job(
    conn: Connection,
    kind: JobKind,
    *,
    requested_by: str,
    chunk_size: int,
    tenant_id: str | None = None,
    target_kek_version: int | None = None,
    target_generation: int | None = None,
) -> int:
    """Insert a ``pending`` job and return its id.

    A second in-flight KEK rotation violates ``uq_rotation_jobs_one_kek_rotation`` and raises
    ``IntegrityError``: the database, not the caller's luck, keeps it to one.
    """
    result = conn.execute(
        insert(_J).values(
            kind=kind, status=JobStatus.PENDING, tenant_id=tenant_id,
            target_kek_version=target_kek_version, target_generation=target_generation,
            chunk_size=chunk_size, planned_rows=0, passes=0, total=0, done=0, skipped=0,
            failed=0, requested_by=requested_by[:128], created_at=utcnow(),
        ).returning(_J.c.id)
    )
    return int(result.scalar_one())


def plan_pass(
    conn: Connection, job_id: int, target_kek: int, tenant_id: str | None, chunk_size: int
) -> list[int]:
    """Record chunks covering every stale row of the job; return the new chunk numbers.

    Chunk numbers continue after any earlier pass. Marks the job ``running``.
    """
    bounds = conn.execute(chunk_boundaries(job_id, target_kek, tenant_id, chunk_size)).all()
    first_no = int(conn.execute(
        select(func.coalesce(func.max(_CH.c.chunk_no), 0)).where(_CH.c.job_id == job_id)
    ).scalar_one()) + 1
    starts = [(int(b.pk), int(b.n)) for b in bounds if (b.n - 1) % chunk_size == 0]
    total = int(bounds[-1].total) if bounds else 0
    last_pk = int(bounds[-1].pk) if bounds else 0
    now = utcnow()
    rows = []
    for i, (pk_lo, n) in enumerate(starts):
        pk_hi = starts[i + 1][0] - 1 if i + 1 < len(starts) else last_pk
        rows.append({
            "job_id": job_id, "chunk_no": first_no + i, "pk_lo": pk_lo, "pk_hi": pk_hi,
            "status": ChunkStatus.PENDING, "planned_rows": min(chunk_size, total - n + 1),
            "total": 0, "done": 0, "skipped": 0, "failed": 0, "attempts": 0, "crashes": 0,
            "enqueued_at": now,
        })
    if rows:
        conn.execute(insert(_CH), rows)
    conn.execute(
        update(_J).where(_J.c.id == job_id).values(
            status=JobStatus.RUNNING, passes=_J.c.passes + 1,
            planned_rows=_J.c.planned_rows + total,
            started_at=func.coalesce(_J.c.started_at, now),
        )
    )
    return [first_no + i for i in range(len(rows))]


__all__ = ["create_job", "plan_pass"]
