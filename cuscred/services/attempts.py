"""Audit every attempt: successes inside the access's own transaction, failures afterwards.

A successful access writes its audit row in the same transaction as the access itself, as the
last statement before commit; if that row cannot be written, the transaction rolls back and the
caller gets :class:`~cuscred.errors.AuditWriteError` instead of the value. A failed attempt is
recorded in a fresh transaction after the failed one rolled back, then the original error is
re-raised unchanged (with a note if even the failure could not be recorded).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from cuscred import metrics
from cuscred.errors import (
    CuscredError,
    DecryptionError,
    EnvReferenceDisabledError,
    InvalidInputError,
    InvalidTenantError,
    KekUnavailableError,
    MalformedReferenceError,
    PermissionDeniedError,
    ScopeError,
    StorageError,
)
from cuscred.references import EncryptedRef, Reference, parse_reference
from cuscred.services.audit import AuditLog, AuditRecord, Outcome, fingerprint_reference
from cuscred.validation import key_shaped, validate_actor

#: Refusals recorded as ``denied``: policy said no, or the caller named a tenant or reference
#: the service will not act on at all. Traversal (``..``, encodings, look-alikes) and a
#: mangled tenant id are refused as malformed before any lookup; a reviewer searching the
#: trail for denied attempts must find them there, with the reason code saying which.
_DENIALS = (
    ScopeError, PermissionDeniedError, EnvReferenceDisabledError, MalformedReferenceError,
    InvalidTenantError,
)
_SAFE_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(slots=True)
class Attempt:
    """What an audited call is about; filled in as the call learns more."""

    action: str
    actor: str
    tenant_id: str | None
    credential_id: str | None = None
    ref_fingerprint: str | None = None
    #: The reference the call is about, parsed once (None if absent or malformed).
    reference: Reference | None = None
    #: Set when the call refuses for a reason the caller must not learn (e.g. cross-tenant).
    denied_reason: str | None = None
    success_reason: str | None = field(default=None)

    def success(self) -> AuditRecord:
        return AuditRecord(
            action=self.action, outcome=Outcome.SUCCESS, actor=self.actor,
            tenant_id=self.tenant_id, credential_id=self.credential_id,
            ref_fingerprint=self.ref_fingerprint, reason=self.success_reason,
        )

    def failure(self, exc: CuscredError) -> AuditRecord:
        denied = self.denied_reason is not None or isinstance(exc, _DENIALS)
        return AuditRecord(
            action=self.action, outcome=Outcome.DENIED if denied else Outcome.FAILURE,
            actor=self.actor, tenant_id=self.tenant_id, credential_id=self.credential_id,
            ref_fingerprint=self.ref_fingerprint, reason=self.denied_reason or exc.code,
        )


class _InternalError(CuscredError):
    code = "internal_error"


class AttemptRecorder:
    """Opens audited attempts for the credential service."""

    def __init__(self, engine: Engine, audit: AuditLog) -> None:
        self._engine = engine
        self._audit = audit

    @contextmanager
    def attempt(
        self, action: str, actor: str, tenant_id: object, reference: object = None
    ) -> Iterator[Attempt]:
        """Yield an :class:`Attempt`; on a library error, audit the failure and re-raise.

        Database errors are turned into :class:`StorageError` (with parameters hidden by the
        engine, so no SQL value reaches a message) before being audited.
        """
        # Plain str copies: a str subclass (a str-valued Enum, say) can print as something
        # else than the characters the database stores, and the audit MAC covers the text.
        # A value with a provider key's shape is never recorded: it is a secret in the wrong
        # argument, and validation refuses it.
        tenant = (str.__str__(tenant_id) if isinstance(tenant_id, str)
                  and _SAFE_TENANT.fullmatch(tenant_id) and not key_shaped(tenant_id) else None)
        try:
            recorded_actor, bad_actor = validate_actor(actor), None
        except InvalidInputError as exc:
            recorded_actor, bad_actor = "<invalid actor>", exc
        attempt = Attempt(action=action,
                          actor=recorded_actor,
                          tenant_id=tenant)
        self._identify(attempt, reference)
        try:
            if bad_actor is not None:
                raise bad_actor
            yield attempt
        except SQLAlchemyError as exc:
            error = StorageError("database error; the operation may not have completed, retry")
            self._record_failure(attempt, error)
            raise error from exc
        except CuscredError as exc:
            if isinstance(exc, DecryptionError | KekUnavailableError):
                metrics.DECRYPT_FAILURES.labels(exc.code).inc()
            self._record_failure(attempt, exc)
            raise
        except Exception:
            # A bug, not a refusal: still on the record, then the caller sees it unchanged.
            self._record_failure(attempt, _InternalError())
            raise

    def _identify(self, attempt: Attempt, reference: object) -> None:
        if not isinstance(reference, str):
            return
        try:
            parsed = attempt.reference = parse_reference(reference)
        except CuscredError:
            parsed = None
        if isinstance(parsed, EncryptedRef):
            attempt.credential_id = parsed.credential_id
            return
        try:
            with self._engine.connect() as conn:
                attempt.ref_fingerprint = fingerprint_reference(
                    self._audit.keys, conn, reference
                )
        except (CuscredError, SQLAlchemyError):
            attempt.ref_fingerprint = None  # no KEK to key it with; the row still records the try

    def _record_failure(self, attempt: Attempt, exc: CuscredError) -> None:
        try:
            with self._engine.begin() as conn:
                self._audit.append(conn, [attempt.failure(exc)])
        except (CuscredError, SQLAlchemyError):
            exc.add_note("the failed attempt could not be written to the audit trail")


__all__ = ["Attempt", "AttemptRecorder"]
