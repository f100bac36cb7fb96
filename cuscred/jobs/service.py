"""The rotation service: every job step the tasks, the beat and the CLI call.

Each public method is one or a few transactions over ids, safe to run again: a redelivered task,
a second beat or an operator's ``jobs resume`` finds the work done and changes nothing. Follow-up
steps go to the :class:`~cuscred.jobs.runner.JobRunner` only after the commit that makes them
valid.

KEK rotation follows DESIGN.md, each step durable before the next and recorded on the job row:

1. a new KEK version is written to the source (or one an operator wrote is adopted) and
   recorded ``decrypt_only``, so every process can read rows that will use it;
2. it is promoted to ``active`` (the old one becomes ``decrypt_only``): new writes use it;
3. the re-encryption job moves every row (``start_reencryption`` → chunks → ``finalize_job``);
4. retiring the old version is left to the operator (``cuscred keys retire``), unless
   ``auto_retire`` is set, and is refused while the census counts any row on it.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import IntegrityError

from cuscred.config import KdfName, Settings
from cuscred.crypto.kdf import KdfParams, parse_kdf_name
from cuscred.db.models import (
    KEK_VERSIONS,
    ROTATION_CHUNKS,
    ROTATION_JOBS,
    ChunkStatus,
    JobKind,
    JobStatus,
    KeyState,
    utcnow,
)
from cuscred.errors import CuscredError, InvalidInputError
from cuscred.jobs.chunks import ChunkClaim, ChunkOutcome, ChunkProcessor, PreparedChunk
from cuscred.jobs.finalize import FINAL, FinalizeResult, finalize
from cuscred.jobs.planning import create_job, plan_pass
from cuscred.jobs.runner import JobRunner
from cuscred.services.audit import AuditLog, AuditRecord, Outcome
from cuscred.services.key_admin import KeyAdmin
from cuscred.services.keys import KeyManager
from cuscred.validation import validate_actor, validate_tenant_id

_J = ROTATION_JOBS
_CH = ROTATION_CHUNKS
_KV = KEK_VERSIONS


class RotationService:
    def __init__(
        self, engine: Engine, keys: KeyManager, audit: AuditLog, settings: Settings,
        runner: JobRunner, *, actor: str = "rotation-worker",
        chunks: ChunkProcessor | None = None,
    ) -> None:
        self.engine = engine
        self.keys = keys
        self.audit = audit
        self.settings = settings
        self.runner = runner
        self.actor = validate_actor(actor)
        self.chunks = chunks or ChunkProcessor(engine, keys, audit, settings, actor=actor)
        self._admin = KeyAdmin(engine, keys, audit, actor)

    # --- starting jobs ----------------------------------------------------------------------

    def rotate_kek(self, *, requested_by: str) -> tuple[int, bool]:
        """Start a KEK rotation; returns ``(job id, created)``. If one is already in flight
        (another beat, an operator), that job's id comes back with ``created=False``."""
        requested_by = validate_actor(requested_by)
        try:
            with self.engine.begin() as conn:
                job_id = create_job(conn, JobKind.KEK_ROTATION, requested_by=requested_by,
                                    chunk_size=self.settings.chunk_size)
                self.audit_job(conn, "job_created", job_id, None, requested_by)
        except IntegrityError:
            return self._in_flight_rotation(), False
        self.runner.advance_rotation(job_id)
        return job_id, True

    def advance_rotation(self, job_id: int) -> None:
        """Steps 1 and 2 for a pending KEK rotation, each in its own transaction.

        A refusal that retrying cannot change (the KEK source would discard a version, a
        version cannot be loaded, an actor is refused) fails the job, with the error code as
        its last error, so that it does not stand in the way of the next ``kek rotate`` as a
        rotation "in flight" that nothing will ever advance. Then the error is raised.
        """
        try:
            self._advance_rotation(job_id)
        except CuscredError as exc:
            if not exc.retryable:
                self._fail_pending(job_id, exc.code)
            raise

    def _advance_rotation(self, job_id: int) -> None:
        with self.engine.begin() as conn:
            job = _locked_job(conn, job_id)
            if job.status != JobStatus.PENDING:
                return
            target = job.target_kek_version
            if target is None:
                target = self._new_or_adopted_version(conn)
                conn.execute(update(_J).where(_J.c.id == job_id).values(
                    target_kek_version=target))
        with self.engine.connect() as conn:
            states = self.keys.kek_states(conn, fresh=True)
        if states.get(target) != KeyState.ACTIVE:
            self._admin.promote(target, actor=self.actor)
        self.runner.start(job_id)

    def _fail_pending(self, job_id: int, code: str) -> None:
        with self.engine.begin() as conn:
            job = _locked_job(conn, job_id)
            if job.status != JobStatus.PENDING:
                return
            conn.execute(update(_J).where(_J.c.id == job_id).values(
                status=JobStatus.FAILED, finished_at=utcnow(),
                last_error=f"step 1-2 refused: {code}"[:500]))
            self.audit.append(conn, [AuditRecord(
                action="job_finished", outcome=Outcome.FAILURE, actor=self.actor,
                tenant_id=job.tenant_id, reason=f"job={job_id} failed {code}"[:64])])

    def rekey_tenant(self, tenant_id: str, *, requested_by: str,
                     kdf: KdfParams | None = None) -> int:
        """A new key generation (fresh salt; ``kdf``, default the configured one) for one
        tenant and a job moving its rows to it."""
        tenant = validate_tenant_id(tenant_id)
        requested_by = validate_actor(requested_by)
        kdf = kdf or self.keys.default_kdf()
        with self.engine.begin() as conn:
            if self.keys.active_generation(conn, tenant, create=False) is None:
                # A typo must not create a tenant: re-keying needs one that exists.
                raise InvalidInputError(f"tenant {tenant!r} has no active key generation")
            generation = self.keys.add_generation(conn, tenant, kdf)
            kek = self.keys.active_kek_version(conn)
            job_id = create_job(conn, JobKind.TENANT_REKEY, requested_by=requested_by,
                                chunk_size=self.settings.chunk_size, tenant_id=tenant,
                                target_kek_version=kek, target_generation=generation)
            self.audit.append(conn, [_rekey_record(job_id, tenant, generation, kdf,
                                                   requested_by)])
        self.runner.start(job_id)
        return job_id

    def rekey_all_with_kdf(self, current: KdfName | str, kdf: KdfParams, *,
                           requested_by: str) -> int:
        """A new generation (fresh salt, ``kdf``) for every tenant whose active generation
        derives with ``current``, then one ``reencrypt`` job over all rows, which moves each
        row onto its tenant's active generation (and the active KEK).

        All generations are created in one transaction with the job, so a failure leaves no
        tenant half-way. Raises :class:`InvalidInputError` (nothing changed) for an unknown
        KDF name or when no tenant's active generation uses ``current``.
        """
        current = parse_kdf_name(current)
        requested_by = validate_actor(requested_by)
        with self.engine.begin() as conn:
            tenants = self.keys.tenants_on_kdf(conn, current)
            if not tenants:
                raise InvalidInputError(
                    f"no tenant's active key generation uses {current.value}; nothing to re-key")
            kek = self.keys.active_kek_version(conn)
            job_id = create_job(conn, JobKind.REENCRYPT, requested_by=requested_by,
                                chunk_size=self.settings.chunk_size, target_kek_version=kek)
            records = [_rekey_record(job_id, tenant, self.keys.add_generation(conn, tenant, kdf),
                                     kdf, requested_by) for tenant in tenants]
            records.append(_job_record("job_created", job_id, None, requested_by))
            self.audit.append(conn, records)
        self.runner.start(job_id)
        return job_id

    def reencrypt(self, *, requested_by: str, tenant_id: str | None = None) -> int:
        """A job moving rows (all, or one tenant's) onto the active KEK and generations."""
        tenant = None if tenant_id is None else validate_tenant_id(tenant_id)
        requested_by = validate_actor(requested_by)
        with self.engine.begin() as conn:
            kek = self.keys.active_kek_version(conn)
            job_id = create_job(conn, JobKind.REENCRYPT, requested_by=requested_by,
                                chunk_size=self.settings.chunk_size, tenant_id=tenant,
                                target_kek_version=kek)
            self.audit_job(conn, "job_created", job_id, tenant, requested_by)
        self.runner.start(job_id)
        return job_id

    # --- the steps the tasks run ------------------------------------------------------------

    def start_reencryption(self, job_id: int) -> list[int]:
        """Plan the job's chunks (once) and enqueue one task per chunk after commit."""
        with self.engine.begin() as conn:
            job = _locked_job(conn, job_id)
            if job.status != JobStatus.PENDING or job.target_kek_version is None:
                return []
            chunk_nos = plan_pass(conn, job_id, job.target_kek_version, job.tenant_id,
                                  job.chunk_size)
        for chunk_no in chunk_nos:
            self.runner.chunk(job_id, chunk_no)
        if not chunk_nos:
            self.runner.finalize(job_id)
        return chunk_nos

    def reencrypt_chunk(self, job_id: int, chunk_no: int) -> ChunkOutcome:
        return self._after_chunk(self.chunks.process(job_id, chunk_no))

    def claim_chunk(self, job_id: int, chunk_no: int) -> ChunkClaim | None:
        """Take a chunk for a helper process to prepare (see :meth:`finish_chunk`)."""
        return self.chunks.claim(job_id, chunk_no)

    def prepare_claimed(self, job_id: int, chunk_no: int, claim: ChunkClaim) -> PreparedChunk:
        """What a helper process does with a claimed chunk, done here instead."""
        return self.chunks.prepare_claimed(job_id, chunk_no, claim)

    def finish_chunk(self, prepared: PreparedChunk | ChunkOutcome) -> ChunkOutcome:
        """:meth:`reencrypt_chunk` for a chunk another process prepared (claimed, read and
        re-encrypted): write it here, or take the outcome of one it could not claim."""
        outcome = prepared if isinstance(prepared, ChunkOutcome) else self.chunks.finish(prepared)
        return self._after_chunk(outcome)

    def _after_chunk(self, outcome: ChunkOutcome) -> ChunkOutcome:
        if outcome.status in (ChunkStatus.DONE, ChunkStatus.FAILED, ChunkStatus.CANCELLED,
                              "not_claimed") and self.all_chunks_final(outcome.job_id):
            self.runner.finalize(outcome.job_id)
        return outcome

    def finalize_job(self, job_id: int) -> FinalizeResult:
        with self.engine.begin() as conn:
            result = finalize(conn, job_id, self.audit, self.actor)
        for chunk_no in result.new_chunks:
            self.runner.chunk(job_id, chunk_no)
        if result.status == JobStatus.COMPLETED and self.settings.auto_retire:
            self._retire_unused()
        return result

    # --- helpers ----------------------------------------------------------------------------

    def _new_or_adopted_version(self, conn: Connection) -> int:
        """Step 1 proper: a fresh KEK version, recorded ``decrypt_only`` in the transaction
        that also names it on the job.

        A version already in the source but not in the table is adopted instead: an operator
        wrote it for this rotation (``bao kv put``), or an earlier attempt of this step wrote it
        and died before its transaction committed. A ``decrypt_only`` version the table
        already records (staged by ``keys create``, perhaps long ago, perhaps copied since) is
        never reused: a rotation always ends on key material no earlier copy holds.
        """
        states = self.keys.kek_states(conn, fresh=True)
        newest_known = max(states, default=0)
        latest = self.keys.source.latest_version()
        adopted = latest is not None and latest > newest_known
        version = latest if adopted and latest is not None else self.keys.source.add_version()
        self.keys.set_kek_state(conn, version, KeyState.DECRYPT_ONLY)
        self.audit.append(conn, [AuditRecord(
            action="kek_state", outcome=Outcome.SUCCESS, actor=self.actor,
            reason=f"v{version}:{'adopt' if adopted else 'register'}",
        )])
        return version

    def _in_flight_rotation(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(_J.c.id).where(
                _J.c.kind == JobKind.KEK_ROTATION,
                _J.c.status.in_((JobStatus.PENDING, JobStatus.RUNNING)),
            )).scalar_one())

    def all_chunks_final(self, job_id: int) -> bool:
        with self.engine.connect() as conn:
            open_chunks = conn.execute(select(_CH.c.chunk_no).where(
                _CH.c.job_id == job_id,
                _CH.c.status.in_((ChunkStatus.PENDING, ChunkStatus.RUNNING)),
            ).limit(1)).first()
        return open_chunks is None

    def _retire_unused(self) -> None:
        status = self._admin.status(per_tenant=False)
        for version in status.kek_versions:
            if version.state == KeyState.DECRYPT_ONLY and version.credentials == 0:
                self._admin.retire(version.version, actor=self.actor)

    def audit_job(self, conn: Connection, action: str, job_id: int, tenant: str | None,
                   requested_by: str) -> None:
        self.audit.append(conn, [_job_record(action, job_id, tenant, requested_by)])


def _job_record(action: str, job_id: int, tenant: str | None, requested_by: str) -> AuditRecord:
    return AuditRecord(action=action, outcome=Outcome.SUCCESS, actor=requested_by[:128],
                       tenant_id=tenant, reason=f"job={job_id}")


def _rekey_record(job_id: int, tenant: str, generation: int, kdf: KdfParams,
                  requested_by: str) -> AuditRecord:
    """A tenant's new generation, as the trail records it: the job moving its rows, the
    generation number and how it derives (``pbkdf2-sha256:600000``), never the salt."""
    how = kdf.name.value + (f":{kdf.iterations}" if kdf.iterations is not None else "")
    return AuditRecord(action="tenant_rekey", outcome=Outcome.SUCCESS, actor=requested_by[:128],
                       tenant_id=tenant, reason=f"job={job_id} gen={generation} {how}"[:64])


def _locked_job(conn: Connection, job_id: int):  # type: ignore[no-untyped-def]
    job = conn.execute(select(_J).where(_J.c.id == job_id).with_for_update()).first()
    if job is None:
        raise InvalidInputError(f"no job {job_id}")
    return job


__all__ = ["FINAL", "RotationService"]
