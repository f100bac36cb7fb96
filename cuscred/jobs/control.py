"""Operator and beat actions on jobs: cancel, resume, sweep, the rotation-due check, verify."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, or_, select, update

from cuscred.db.models import (
    CREDENTIALS,
    KEK_VERSIONS,
    ROTATION_CHUNKS,
    ROTATION_FAILURES,
    ROTATION_JOBS,
    ChunkStatus,
    JobKind,
    JobStatus,
    KeyState,
    utcnow,
)
from cuscred.errors import CuscredError, InvalidInputError
from cuscred.jobs.finalize import FINAL, chunk_sums
from cuscred.jobs.service import RotationService
from cuscred.services.audit import AuditRecord, Outcome
from cuscred.services.sealing import context_from_json, open_row
from cuscred.validation import safe_text, validate_tenant_id

_J = ROTATION_JOBS
_CH = ROTATION_CHUNKS
_F = ROTATION_FAILURES
_C = CREDENTIALS


@dataclass
class SweepReport:
    requeued_chunks: list[tuple[int, int]] = field(default_factory=list)
    finalized_jobs: list[int] = field(default_factory=list)
    advanced_rotations: list[int] = field(default_factory=list)


@dataclass
class VerifyReport:
    """Decryption check of every credential in scope: counts per KEK version, failing ids."""

    checked: int = 0
    per_kek_version: Counter[int] = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (credential id, reason)

    @property
    def ok(self) -> bool:
        return not self.failures


class JobControl:
    def __init__(self, service: RotationService) -> None:
        self.service = service
        self._engine: Engine = service.engine
        self.settings = service.settings

    def cancel(self, job_id: int, *, actor: str) -> str:
        """Stop a job: pending chunks become cancelled; a chunk already running finishes its
        transaction (its rows are consistent either way). Returns the job's status."""
        with self._engine.begin() as conn:
            job = conn.execute(select(_J).where(_J.c.id == job_id).with_for_update()).first()
            if job is None:
                raise InvalidInputError(f"no job {job_id}")
            if job.status in FINAL:
                return str(job.status)
            conn.execute(update(_CH).where(_CH.c.job_id == job_id,
                                           _CH.c.status == ChunkStatus.PENDING)
                         .values(status=ChunkStatus.CANCELLED))
            sums = chunk_sums(conn, job_id)  # what finished chunks did; a running one may add
            conn.execute(update(_J).where(_J.c.id == job_id).values(
                status=JobStatus.CANCELLED, finished_at=utcnow(), total=sums["total"],
                done=sums["done"], skipped=sums["skipped"], failed=sums["failed"]))
            self.service.audit_job(conn, "job_cancelled", job_id, job.tenant_id, actor)
        return JobStatus.CANCELLED

    def resume(self, job_id: int, *, actor: str) -> str:
        """Re-drive a job: cancelled and failed chunks go back to pending (crash and attempt
        counts reset), then every unfinished chunk is enqueued. A finished job with no such
        chunk is left alone."""
        with self._engine.begin() as conn:
            job = conn.execute(select(_J).where(_J.c.id == job_id).with_for_update()).first()
            if job is None:
                raise InvalidInputError(f"no job {job_id}")
            if job.status == JobStatus.PENDING:
                pending = True
            else:
                pending = False
                reopen = _CH.c.job_id == job_id, _CH.c.status.in_(
                    (ChunkStatus.CANCELLED, ChunkStatus.FAILED))
                # A chunk that gave up recorded its rows as failures, which keeps them out of
                # every later pass; forget those records so the reopened chunk retries them.
                conn.execute(delete(_F).where(_F.c.job_id == job_id, _F.c.chunk_no.in_(
                    select(_CH.c.chunk_no).where(*reopen))))
                # Crashes and attempts are budgets for one drive of the job: a chunk given up
                # for either would otherwise be given up again on its first claim.
                reopened = conn.execute(update(_CH).where(*reopen).values(
                    status=ChunkStatus.PENDING, crashes=0, attempts=0, claim_token=None,
                    lease_until=None,
                    enqueued_at=utcnow(), total=0, done=0, skipped=0, failed=0,
                )).rowcount
                if job.status in FINAL and not reopened:
                    return str(job.status)
                conn.execute(update(_J).where(_J.c.id == job_id).values(
                    status=JobStatus.RUNNING, finished_at=None))
            self.service.audit_job(conn, "job_resumed", job_id, job.tenant_id, actor)
        if pending:
            self._redrive_pending(job_id, job.kind)
        else:
            self._enqueue_open_chunks(job_id)
        return JobStatus.PENDING if pending else JobStatus.RUNNING

    def sweep(self) -> SweepReport:
        """Re-enqueue chunks whose lease ran out or that sat pending too long (a lost message,
        a restarted Redis), finalize jobs whose chunks are all final, and re-drive KEK
        rotations stuck before planning. Safe to run from several beats at once."""
        report = SweepReport()
        now = utcnow()
        stale_pending = now - timedelta(seconds=self.settings.chunk_requeue_after_s)
        with self._engine.begin() as conn:
            rows = conn.execute(select(_CH.c.job_id, _CH.c.chunk_no).join(
                _J, _J.c.id == _CH.c.job_id).where(
                _J.c.status == JobStatus.RUNNING,
                or_(
                    (_CH.c.status == ChunkStatus.RUNNING) & (_CH.c.lease_until < now),
                    (_CH.c.status == ChunkStatus.PENDING) & (_CH.c.enqueued_at < stale_pending),
                ),
            )).all()
            for job_id, chunk_no in rows:
                conn.execute(update(_CH).where(_CH.c.job_id == job_id, _CH.c.chunk_no == chunk_no)
                             .values(enqueued_at=now))
            running = conn.execute(select(_J.c.id).where(_J.c.status == JobStatus.RUNNING)).all()
            pending = conn.execute(select(_J.c.id, _J.c.kind, _J.c.created_at).where(
                _J.c.status == JobStatus.PENDING)).all()
        for job_id, chunk_no in rows:
            self.service.runner.chunk(job_id, chunk_no)
            report.requeued_chunks.append((job_id, chunk_no))
        for (job_id,) in running:
            if self.service.all_chunks_final(job_id):
                self.service.runner.finalize(job_id)
                report.finalized_jobs.append(job_id)
        for job_id, kind, created_at in pending:
            if created_at < stale_pending:
                self._redrive_pending(job_id, kind)
                report.advanced_rotations.append(job_id)
        return report

    def rotation_due(self) -> bool:
        """Whether the active KEK is older than ``kek_max_age_days``."""
        with self._engine.connect() as conn:
            activated = conn.execute(select(KEK_VERSIONS.c.activated_at).where(
                KEK_VERSIONS.c.state == KeyState.ACTIVE)).scalar()
        if activated is None:
            return False
        age: timedelta = utcnow() - activated
        return age >= timedelta(days=self.settings.kek_max_age_days)

    def check_rotation_due(self) -> int | None:
        """The beat's daily check: start a rotation if due; the job id, or None."""
        if not self.rotation_due():
            return None
        job_id, _ = self.service.rotate_kek(requested_by="beat")
        return job_id

    def verify(self, *, tenant_id: str | None = None, job_id: int | None = None,
               actor: str, batch: int = 1000) -> VerifyReport:
        """Decrypt every credential in scope (a tenant, a job's tenant, or all), keyset-paged,
        and report counts per KEK version and the ids that fail. Plaintexts are dropped at
        once; one audit event records the run."""
        if job_id is not None:
            with self._engine.connect() as conn:
                job = conn.execute(select(_J.c.tenant_id).where(_J.c.id == job_id)).first()
            if job is None:
                raise InvalidInputError(f"no job {job_id}")
            tenant_id = job.tenant_id
        tenant = None if tenant_id is None else validate_tenant_id(tenant_id)
        report = VerifyReport()
        last_pk = 0
        while True:
            with self._engine.connect() as conn:
                query = select(_C.c.pk, _C.c.credential_id, _C.c.tenant_id, _C.c.ciphertext,
                               _C.c.kek_version, _C.c.key_generation, _C.c.context_json).where(
                    _C.c.pk > last_pk).order_by(_C.c.pk).limit(batch)
                if tenant is not None:
                    query = query.where(_C.c.tenant_id == tenant)
                rows = conn.execute(query).all()
                for row in rows:
                    self._check_row(conn, row, report)
            if len(rows) < batch:
                break
            last_pk = rows[-1].pk
        self._audit_verify(tenant, report, actor)
        return report

    def _check_row(self, conn: Connection, row: Any, report: VerifyReport) -> None:
        report.checked += 1
        report.per_kek_version[row.kek_version] += 1
        try:
            open_row(self.service.keys, conn,
                     tenant_id=row.tenant_id, credential_id=row.credential_id,
                     ciphertext=row.ciphertext, kek_version=row.kek_version,
                     key_generation=row.key_generation,
                     context=context_from_json(row.context_json))
        except CuscredError as exc:
            if exc.retryable:
                raise
            report.failures.append((safe_text(row.credential_id), exc.code))

    def _audit_verify(self, tenant: str | None, report: VerifyReport, actor: str) -> None:
        with self._engine.begin() as conn:
            self.service.audit.append(conn, [AuditRecord(
                action="verify", outcome=Outcome.SUCCESS if report.ok else Outcome.FAILURE,
                actor=actor, tenant_id=tenant,
                reason=f"checked={report.checked} failed={len(report.failures)}"[:64],
            )])

    def _redrive_pending(self, job_id: int, kind: str) -> None:
        if kind == JobKind.KEK_ROTATION:
            self.service.runner.advance_rotation(job_id)
        else:
            self.service.runner.start(job_id)

    def _enqueue_open_chunks(self, job_id: int) -> None:
        with self._engine.connect() as conn:
            open_chunks = conn.execute(select(_CH.c.chunk_no).where(
                _CH.c.job_id == job_id,
                _CH.c.status.in_((ChunkStatus.PENDING, ChunkStatus.RUNNING)),
            ).order_by(_CH.c.chunk_no)).scalars().all()
        for chunk_no in open_chunks:
            self.service.runner.chunk(job_id, chunk_no)
        if not open_chunks:
            self.service.runner.finalize(job_id)


__all__ = ["JobControl", "SweepReport", "VerifyReport"]
