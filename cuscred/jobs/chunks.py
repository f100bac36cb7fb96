"""Process one chunk: claim it, re-encrypt its stale rows, record everything in one transaction.

The life of a chunk (``rotation_chunks.status``)::

    pending --claim--> running --work--> done
       ^                  |  \\--give up after chunk_max_crashes presumed crashes--> failed
       +---- release -----+   (a claim whose lease ran out without finishing was a crash)

* **Claim** (own transaction): only a ``pending`` chunk, or a ``running`` one whose lease ran
  out, can be claimed; the claim gets a random token. A duplicate delivery finds the chunk
  ``done`` or leased and does nothing.
* **Prepare** (no write lock): load the KEKs, read the stale rows, decrypt each with exactly
  the key its header names, encrypt with the target keys. Nothing is written.
* **Finish** (one transaction): check the token still holds, compare-and-swap the rows back
  (a row changed since it was read is *skipped*, never overwritten), record failures, mark the
  chunk ``done`` with its counts, append one audit event per row. A crash anywhere before
  commit leaves nothing behind, and counts are only ever written with the rows they count, so
  ``done + skipped + failed == total`` by construction. Keeping the crypto out of this
  transaction keeps SQLite's one write lock short (an application writing credentials during a
  rotation waits for a chunk's writes, not for its decryption), and PostgreSQL's row locks.
* **Release**: a retryable error (Vault or the database unavailable) puts the chunk back to
  ``pending`` without counting a crash, so the task can retry with backoff; any other error
  counts as a crash.

Plaintexts live only inside :meth:`ChunkProcessor._reseal`; nothing secret is logged, stored
outside the ciphertext, or returned (a :class:`PreparedChunk` holds new ciphertexts only).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from cuscred import metrics
from cuscred.config import Settings
from cuscred.db.models import (
    CREDENTIAL_ID_LEN,
    ROTATION_CHUNKS,
    ROTATION_FAILURES,
    ROTATION_JOBS,
    TENANT_ID_LEN,
    ChunkStatus,
    JobStatus,
    KeyState,
    utcnow,
)
from cuscred.errors import CuscredError, DecryptionError, KekUnavailableError
from cuscred.jobs.bulk import Reseal, write_resealed
from cuscred.jobs.scope import stale_rows
from cuscred.jobs.views import reader_engine
from cuscred.services.audit import AuditLog, AuditRecord, Outcome
from cuscred.services.keys import KeyManager
from cuscred.services.sealing import TaskKeys, context_from_json, open_row, seal_with
from cuscred.validation import safe_text

_J = ROTATION_JOBS
_CH = ROTATION_CHUNKS
_F = ROTATION_FAILURES
_TERMINAL = (ChunkStatus.DONE, ChunkStatus.FAILED, ChunkStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class ChunkOutcome:
    """What a delivery of a chunk task did (ids and counts only: safe to log and return)."""

    job_id: int
    chunk_no: int
    status: str  # done | failed | cancelled | not_claimed | lost_claim
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    duration_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class ChunkClaim:
    """A chunk taken by one worker until its lease runs out: the token its writes must match,
    what the chunk covers and the KEK versions its work may need. Ids and numbers only."""

    token: str
    target_kek: int
    tenant_id: str | None
    pk_lo: int
    pk_hi: int
    readable: frozenset[int]  # KEK versions that may still decrypt


class RowRef(NamedTuple):
    """Who a row read by a chunk belongs to: what its audit event names."""

    pk: int
    tenant_id: str
    credential_id: str


class Failure(NamedTuple):
    """A row a chunk could not move, left untouched: which row (by primary key; its ids as
    :func:`~cuscred.validation.safe_text`, since damaged ids may be why it failed) and why."""

    pk: int
    credential_id: str
    tenant_id: str
    reason: str

    @classmethod
    def of(cls, row: Any, reason: str) -> Failure:
        # Cut to the columns' widths: an escaped id is longer than the one it stands for.
        return cls(row.pk, safe_text(row.credential_id)[:CREDENTIAL_ID_LEN],
                   safe_text(row.tenant_id)[:TENANT_ID_LEN], reason)


@dataclass(slots=True)
class PreparedChunk:
    """A claimed chunk whose rows are re-encrypted in memory, not yet written: ids, new
    ciphertexts and counts (no plaintext, no key). :meth:`ChunkProcessor.finish` writes it,
    in this process or, pickled, in the one that prepared it (:mod:`cuscred.jobs.local_pool`).
    """

    job_id: int
    chunk_no: int
    claim: ChunkClaim
    started: float
    rows: list[RowRef]
    resealed: list[Reseal]
    failures: list[Failure]

    def __repr__(self) -> str:
        return (f"<PreparedChunk job={self.job_id} chunk={self.chunk_no} rows={len(self.rows)}"
                f" failures={len(self.failures)}>")


def is_retryable(exc: BaseException) -> bool:
    """Errors worth retrying with backoff: a service was unavailable, nothing was written."""
    if isinstance(exc, CuscredError):
        return exc.retryable
    return isinstance(exc, OperationalError)


class ChunkProcessor:
    """Runs chunks; shared by Celery tasks and the in-process runner."""

    def __init__(
        self, engine: Engine, keys: KeyManager, audit: AuditLog, settings: Settings,
        *, actor: str = "rotation-worker",
        between_read_and_write: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._audit = audit
        self._settings = settings
        self._actor = actor
        # Test seam: called with the chunk's row pks after they were read, before the write.
        self._between_read_and_write = between_read_and_write
        self._reader_engine: Engine | None = None

    def process(self, job_id: int, chunk_no: int) -> ChunkOutcome:
        """Claim and run one chunk. Raises the error of a failed attempt after releasing the
        claim (retryable errors: see :func:`is_retryable`)."""
        prepared = self.prepare(job_id, chunk_no)
        return prepared if isinstance(prepared, ChunkOutcome) else self.finish(prepared)

    def prepare(self, job_id: int, chunk_no: int) -> PreparedChunk | ChunkOutcome:
        """Claim the chunk, load its keys and re-encrypt its stale rows in memory (no write
        lock is held). A chunk that cannot be claimed comes back as its outcome."""
        claim = self.claim(job_id, chunk_no)
        if claim is None:
            return ChunkOutcome(job_id, chunk_no, "not_claimed")
        return self.prepare_claimed(job_id, chunk_no, claim)

    def prepare_claimed(self, job_id: int, chunk_no: int, claim: ChunkClaim) -> PreparedChunk:
        """The work of :meth:`prepare` after the claim: reads only, so another process (a
        helper of :mod:`cuscred.jobs.local_pool`) can do it while this one writes. On error
        the claim is released and the error raised."""
        started = time.monotonic()
        try:
            self._prefetch_keks(claim.target_kek, claim.readable)
            with self._reader().connect() as conn:
                rows = list(conn.execute(stale_rows(
                    job_id, claim.target_kek, claim.tenant_id, claim.pk_lo, claim.pk_hi)))
                resealed, failures = self._reseal(conn, rows, claim.target_kek)
                conn.rollback()  # a read: nothing to keep, and no snapshot held open
        except BaseException as exc:
            self._failed(job_id, chunk_no, claim.token, started, exc)
            raise
        refs = [RowRef(r.pk, r.tenant_id, r.credential_id) for r in rows]
        return PreparedChunk(job_id, chunk_no, claim, started, refs, resealed, failures)

    def finish(self, prepared: PreparedChunk) -> ChunkOutcome:
        """Write a prepared chunk in one transaction (see the module docstring)."""
        try:
            outcome = self._work(prepared)
        except BaseException as exc:
            self._failed(prepared.job_id, prepared.chunk_no, prepared.claim.token,
                         prepared.started, exc)
            raise
        metrics.CHUNK_SECONDS.labels(outcome.status).observe(time.monotonic() - prepared.started)
        return outcome

    def _failed(self, job_id: int, chunk_no: int, token: str, started: float,
                exc: BaseException) -> None:
        self._release(job_id, chunk_no, token, exc)
        metrics.CHUNK_SECONDS.labels("error").observe(time.monotonic() - started)

    def _reader(self) -> Engine:
        """Where a chunk reads its rows: on SQLite a plain (deferred) read, which in WAL mode
        sees the last commit without taking the write lock that every transaction of the
        library's engine takes (``BEGIN IMMEDIATE``); elsewhere the engine itself."""
        if self._reader_engine is None:
            self._reader_engine = reader_engine(self._engine)
        return self._reader_engine

    # --- claim / release ----------------------------------------------------------------------

    def claim(self, job_id: int, chunk_no: int) -> ChunkClaim | None:
        """Take the chunk, in its own short transaction: its claim token, what it covers, and
        the KEK versions its work may need (the job's target, and every version that can still
        decrypt). None: it is finished, cancelled, held by another worker, or given up (which
        this records)."""
        with self._engine.begin() as conn:
            chunk = _locked_chunk(conn, job_id, chunk_no)
            if chunk is None or chunk.status in _TERMINAL:
                return None
            job = conn.execute(
                select(_J.c.status, _J.c.target_kek_version, _J.c.tenant_id).where(
                    _J.c.id == job_id)
            ).one()
            now = utcnow()
            if job.status == JobStatus.CANCELLED:
                _set_chunk(conn, job_id, chunk_no, status=ChunkStatus.CANCELLED, lease_until=None)
                return None
            if chunk.status == ChunkStatus.RUNNING and chunk.lease_until > now:
                return None  # another worker holds it
            crashes = chunk.crashes + (1 if chunk.status == ChunkStatus.RUNNING else 0)
            if crashes >= self._settings.chunk_max_crashes:
                self._give_up(conn, job_id, chunk, crashes, "repeated worker crashes")
                return None
            if chunk.attempts >= self._settings.chunk_max_attempts:
                self._give_up(conn, job_id, chunk, crashes, f"{chunk.attempts} attempts")
                return None
            token = secrets.token_hex(16)
            _set_chunk(
                conn, job_id, chunk_no, status=ChunkStatus.RUNNING, attempts=chunk.attempts + 1,
                crashes=crashes, claim_token=token, started_at=now,
                lease_until=now + timedelta(seconds=self._settings.chunk_lease_s),
            )
            return ChunkClaim(token, int(job.target_kek_version), job.tenant_id,
                              int(chunk.pk_lo), int(chunk.pk_hi), self._readable(conn))

    def _readable(self, conn: Connection) -> frozenset[int]:
        return frozenset(v for v, state in self._keys.kek_states(conn).items()
                         if state != KeyState.RETIRED)

    def _prefetch_keks(self, target: int, readable: frozenset[int]) -> None:
        """Load the KEKs into the key cache before the work transaction takes its locks.

        On SQLite the work transaction holds the database's one write lock from its first
        statement; a Vault round trip inside it (or ``vault_timeout_s`` per attempt while Vault
        is down) would stall every other writer. Vault being unavailable raises here, before
        anything is locked, and the chunk is released for a retry. A source version that is
        missing is left for the work to record per row; a missing target fails the chunk.
        """
        self._keys.kek(target)
        for version in sorted(readable - {target}):
            with contextlib.suppress(KekUnavailableError):
                self._keys.kek(version)

    def _release(self, job_id: int, chunk_no: int, token: str, exc: BaseException) -> None:
        retryable = is_retryable(exc)
        error = exc.code if isinstance(exc, CuscredError) else type(exc).__name__
        try:
            with self._engine.begin() as conn:
                chunk = _locked_chunk(conn, job_id, chunk_no)
                if chunk is None or chunk.claim_token != token:
                    return
                crashes = chunk.crashes + (0 if retryable else 1)
                if crashes >= self._settings.chunk_max_crashes:
                    self._give_up(conn, job_id, chunk, crashes, error)
                    return
                _set_chunk(conn, job_id, chunk_no, status=ChunkStatus.PENDING, crashes=crashes,
                           claim_token=None, lease_until=None, enqueued_at=utcnow(),
                           last_error=f"{'retrying' if retryable else 'error'}: {error}"[:500])
        except SQLAlchemyError:
            pass  # the database is down too: the lease will run out and the sweeper re-enqueues

    def _give_up(self, conn: Connection, job_id: int, chunk: Any, crashes: int, why: str) -> None:
        """Mark the chunk failed; its stale rows stay untouched and are recorded as failures."""
        job = conn.execute(select(_J).where(_J.c.id == job_id)).one()
        rows = conn.execute(stale_rows(job_id, job.target_kek_version, job.tenant_id,
                                       chunk.pk_lo, chunk.pk_hi)).all()
        failures = [Failure.of(r, "chunk_gave_up") for r in rows]
        _record_failures(conn, job_id, chunk.chunk_no, failures)
        _set_chunk(conn, job_id, chunk.chunk_no, status=ChunkStatus.FAILED, crashes=crashes,
                   total=len(rows), done=0, skipped=0, failed=len(rows), claim_token=None,
                   lease_until=None, finished_at=utcnow(), last_error=f"gave up: {why}"[:500])
        self._audit.append(conn, [AuditRecord(
            action="reencrypt_chunk", outcome=Outcome.FAILURE, actor=self._actor,
            reason=f"job={job_id} chunk={chunk.chunk_no} gave_up rows={len(rows)}",
        )])

    # --- work -----------------------------------------------------------------------------

    def _work(self, prepared: PreparedChunk) -> ChunkOutcome:
        job_id, chunk_no, rows = prepared.job_id, prepared.chunk_no, prepared.rows
        resealed, failures = prepared.resealed, prepared.failures
        if self._between_read_and_write is not None:
            self._between_read_and_write([r.pk for r in rows])
        with self._engine.begin() as conn:
            chunk = _locked_chunk(conn, job_id, chunk_no)
            if (chunk is None or chunk.claim_token != prepared.claim.token
                    or chunk.status != "running"):
                return ChunkOutcome(job_id, chunk_no, "lost_claim")
            written = write_resealed(conn, resealed, utcnow())
            _record_failures(conn, job_id, chunk_no, failures)
            duration_ms = int((time.monotonic() - prepared.started) * 1000)
            outcome = ChunkOutcome(
                job_id, chunk_no, ChunkStatus.DONE, total=len(rows), done=len(written),
                skipped=len(resealed) - len(written), failed=len(failures),
                duration_ms=duration_ms,
            )
            _set_chunk(conn, job_id, chunk_no, status=ChunkStatus.DONE, total=outcome.total,
                       done=outcome.done, skipped=outcome.skipped, failed=outcome.failed,
                       claim_token=None, lease_until=None, finished_at=utcnow(),
                       duration_ms=duration_ms, last_error=_failure_summary(failures))
            self._append_events(conn, job_id, rows, written, failures)
        for failure in failures:  # counted once committed: a rolled-back attempt runs again
            metrics.DECRYPT_FAILURES.labels(metrics.failure_reason(failure.reason)).inc()
        return outcome

    def _reseal(
        self, conn: Connection, rows: Sequence[Any], target_kek: int
    ) -> tuple[list[Reseal], list[Failure]]:
        resealed: list[Reseal] = []
        failures: list[Failure] = []
        keys = TaskKeys(self._keys)  # each tenant key looked up once per task
        contexts: dict[str, dict[str, str]] = {}  # a chunk's rows share a few context texts
        for row in rows:
            try:
                context = contexts.get(row.context_json)
                if context is None:
                    context = contexts[row.context_json] = context_from_json(row.context_json)
                plaintext = open_row(
                    keys, conn, tenant_id=row.tenant_id, credential_id=row.credential_id,
                    ciphertext=row.ciphertext, kek_version=row.kek_version,
                    key_generation=row.key_generation, context=context,
                )
            except DecryptionError:
                failures.append(Failure.of(row, "decrypt_failed"))
                continue
            except KekUnavailableError:
                failures.append(Failure.of(row, f"kek_v{row.kek_version}_unavailable"))
                continue
            if row.active_generation is None:  # decrypts, but has no key to move to
                failures.append(Failure.of(row, "no_active_key_generation"))
                continue
            key = keys.tenant_key(conn, row.tenant_id, row.active_generation, target_kek)
            sealed = seal_with(key, plaintext, credential_id=row.credential_id, context=context)
            resealed.append(Reseal(
                pk=row.pk, row_version=row.row_version, old_kek_version=row.kek_version,
                old_generation=row.key_generation, ciphertext=sealed.ciphertext,
                kek_version=sealed.kek_version, key_generation=sealed.key_generation,
                fingerprint=sealed.fingerprint,
            ))
        return resealed, failures

    def _append_events(
        self, conn: Connection, job_id: int, rows: Sequence[RowRef], written: set[int],
        failures: list[Failure],
    ) -> None:
        """One audit event per row moved (in primary-key order), then one per row that
        failed: the moved rows' events differ only in tenant and credential id."""
        reason = f"job={job_id}"
        moved = [(r.tenant_id, r.credential_id) for r in rows if r.pk in written]
        self._audit.append_uniform(
            conn,
            AuditRecord(action="reencrypt", outcome=Outcome.SUCCESS, actor=self._actor,
                        reason=reason),
            moved,
            then=[AuditRecord(action="reencrypt", outcome=Outcome.FAILURE, actor=self._actor,
                              tenant_id=f.tenant_id, credential_id=f.credential_id,
                              reason=f"{reason} {f.reason}"[:64])
                  for f in failures],
        )


def _locked_chunk(conn: Connection, job_id: int, chunk_no: int) -> Any:
    # FOR UPDATE serialises deliveries of one chunk on PostgreSQL; SQLite's BEGIN IMMEDIATE
    # already serialises whole transactions (and SQLAlchemy omits FOR UPDATE there).
    return conn.execute(
        select(_CH).where(_CH.c.job_id == job_id, _CH.c.chunk_no == chunk_no).with_for_update()
    ).first()


def _set_chunk(conn: Connection, job_id: int, chunk_no: int, **values: Any) -> None:
    conn.execute(
        update(_CH).where(_CH.c.job_id == job_id, _CH.c.chunk_no == chunk_no).values(**values)
    )


def _record_failures(
    conn: Connection, job_id: int, chunk_no: int, failures: list[Failure]
) -> None:
    if failures:
        now = utcnow()
        conn.execute(insert(_F), [
            {"job_id": job_id, "chunk_no": chunk_no, "credential_pk": f.pk,
             "credential_id": f.credential_id, "reason": f.reason, "created_at": now}
            for f in failures
        ])


def _failure_summary(failures: list[Failure]) -> str | None:
    if not failures:
        return None
    reasons = sorted({f.reason for f in failures})
    return f"{len(failures)} row(s) failed: {', '.join(reasons)}"[:500]


__all__ = ["ChunkClaim", "ChunkOutcome", "ChunkProcessor", "Failure", "PreparedChunk",
           "RowRef", "is_retryable"]
