"""Finish a job once every chunk is in a final state: sum the chunks, take the census.

The census (rows in the job's scope per KEK version and tenant key generation) is recorded on
the job row as it completes, so ``jobs show`` can answer "did it really finish?" later.

The job's counts are always recomputed from committed chunk rows, so finalising twice (two
chunks finishing together both ask for it, a redelivery) gives the same answer. If the census
still finds stale rows that no chunk counted as failed (an application write that raced the key
promotion), another pass of chunks is planned instead, up to ``MAX_PASSES``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import Connection, func, select, update

from cuscred.db.models import ROTATION_CHUNKS, ROTATION_JOBS, ChunkStatus, JobStatus, utcnow
from cuscred.jobs.planning import plan_pass
from cuscred.jobs.scope import count_stale, scope_census
from cuscred.services.audit import AuditLog, AuditRecord, Outcome

_J = ROTATION_JOBS
_CH = ROTATION_CHUNKS
MAX_PASSES = 3
FINAL = (JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS, JobStatus.CANCELLED,
         JobStatus.FAILED)


@dataclass(frozen=True, slots=True)
class FinalizeResult:
    status: str  # the job's status afterwards
    new_chunks: list[int]  # chunks of a sweep-up pass to enqueue after commit


def chunk_sums(conn: Connection, job_id: int) -> dict[str, int]:
    row = conn.execute(
        select(
            func.coalesce(func.sum(_CH.c.total), 0), func.coalesce(func.sum(_CH.c.done), 0),
            func.coalesce(func.sum(_CH.c.skipped), 0), func.coalesce(func.sum(_CH.c.failed), 0),
            func.count().filter(_CH.c.status.in_((ChunkStatus.PENDING, ChunkStatus.RUNNING))),
        ).where(_CH.c.job_id == job_id)
    ).one()
    total, done, skipped, failed, open_chunks = (int(x) for x in row)
    return {"total": total, "done": done, "skipped": skipped, "failed": failed,
            "open_chunks": open_chunks}


def finalize(conn: Connection, job_id: int, audit: AuditLog, actor: str) -> FinalizeResult:
    """Complete ``job_id`` if all its chunks are final (in the caller's transaction)."""
    job = conn.execute(select(_J).where(_J.c.id == job_id).with_for_update()).first()
    if job is None or job.status in FINAL or job.status == JobStatus.PENDING:
        return FinalizeResult(job.status if job else "missing", [])
    sums = chunk_sums(conn, job_id)
    if sums["open_chunks"]:
        return FinalizeResult(job.status, [])
    remaining = int(conn.execute(
        count_stale(job_id, job.target_kek_version, job.tenant_id)
    ).scalar_one())
    if remaining and job.passes < MAX_PASSES:
        return FinalizeResult(job.status, plan_pass(
            conn, job_id, job.target_kek_version, job.tenant_id, job.chunk_size))
    status = (JobStatus.COMPLETED if sums["failed"] == 0 and remaining == 0
              else JobStatus.COMPLETED_WITH_ERRORS)
    census = [[int(v), int(g), int(n)] for v, g, n in conn.execute(scope_census(job.tenant_id))]
    conn.execute(update(_J).where(_J.c.id == job_id).values(
        status=status, total=sums["total"], done=sums["done"], skipped=sums["skipped"],
        failed=sums["failed"], finished_at=utcnow(), census_json=json.dumps(census),
        last_error=(f"{remaining} stale row(s) left after {job.passes} passes"
                    if remaining else job.last_error),
    ))
    audit.append(conn, [AuditRecord(
        action="job_finished",
        outcome=Outcome.SUCCESS if status == JobStatus.COMPLETED else Outcome.FAILURE,
        actor=actor, tenant_id=job.tenant_id,
        reason=f"job={job_id} {status} done={sums['done']} failed={sums['failed']}"[:64],
    )])
    return FinalizeResult(status, [])


__all__ = ["FINAL", "MAX_PASSES", "FinalizeResult", "chunk_sums", "finalize"]
