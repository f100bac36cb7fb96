"""What a caller needs beside the crypto: describe, list and delete credentials, and
crypto-shred a tenant. Nothing here decrypts; listings show the stored masked hint only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, select, update

from cuscred.db.models import CREDENTIALS, TENANT_KEYS, KeyState
from cuscred.errors import CredentialNotFoundError, DecryptionError, InvalidInputError
from cuscred.ids import is_credential_id
from cuscred.references import EncryptedRef, parse_reference
from cuscred.services.attempts import AttemptRecorder
from cuscred.services.audit import AuditLog
from cuscred.services.keys import SHREDDED_SALT, KeyManager
from cuscred.services.sealing import context_from_json
from cuscred.validation import safe_text, validate_tenant_id

_CRED = CREDENTIALS
_TK = TENANT_KEYS
_INFO_COLUMNS = (
    _CRED.c.pk, _CRED.c.credential_id, _CRED.c.tenant_id, _CRED.c.provider, _CRED.c.masked,
    _CRED.c.kek_version, _CRED.c.key_generation, _CRED.c.context_json, _CRED.c.created_at,
    _CRED.c.rotated_at, _CRED.c.reencrypted_at,
)
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """Everything about a credential except its value."""

    credential_id: str
    reference: str
    tenant_id: str
    provider: str
    masked: str
    kek_version: int
    key_generation: int
    #: None when the stored context is damaged (the row will not decrypt either).
    context: dict[str, str] | None
    created_at: datetime
    rotated_at: datetime | None
    reencrypted_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("created_at", "rotated_at", "reencrypted_at"):
            out[name] = out[name].isoformat() if out[name] else None
        return out


def _info(row: Any) -> CredentialInfo:
    try:
        context: dict[str, str] | None = context_from_json(row.context_json)
    except DecryptionError:
        context = None  # a damaged row is still listed; decrypting it will fail loudly
    # safe_text: a row edited outside cuscred is listed as it is, escaped, never as control
    # characters for the operator's terminal.
    credential_id = safe_text(row.credential_id)
    return CredentialInfo(
        # Not EncryptedRef(...): a damaged id is listed as it is, not refused as malformed.
        credential_id=credential_id, reference=f"encrypted://{credential_id}",
        tenant_id=safe_text(row.tenant_id), provider=safe_text(row.provider),
        masked=safe_text(row.masked),
        kek_version=row.kek_version, key_generation=row.key_generation,
        context=context, created_at=row.created_at,
        rotated_at=row.rotated_at, reencrypted_at=row.reencrypted_at,
    )


class CredentialCatalog:
    """Metadata operations; the base of :class:`~cuscred.services.credentials.CredentialService`."""

    def __init__(
        self,
        engine: Engine,
        keys: KeyManager,
        audit: AuditLog,
        attempts: AttemptRecorder,
        actor: str,
    ) -> None:
        self.actor = actor
        self._engine = engine
        self._keys = keys
        self._audit = audit
        self._attempts = attempts

    def describe_credential(
        self, tenant_id: str, credential_ref: str, *, actor: str | None = None
    ) -> CredentialInfo:
        """Metadata of one of the tenant's credentials (nothing is decrypted). Only failed
        attempts are audited: metadata reads carry no secret.

        Raises :class:`CredentialNotFoundError` if the id is not this tenant's.
        """
        with self._attempts.attempt("describe", actor or self.actor, tenant_id,
                                    credential_ref) as attempt:
            tenant = validate_tenant_id(tenant_id)
            ref = as_encrypted_ref(credential_ref)
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(*_INFO_COLUMNS).where(_CRED.c.credential_id == ref.credential_id)
                ).first()
            if row is None or row.tenant_id != tenant:
                if row is not None:
                    attempt.denied_reason = "cross_tenant"
                raise CredentialNotFoundError(
                    f"no credential {ref.credential_id} for this tenant")
            return _info(row)

    def list_credentials(
        self, tenant_id: str, *, limit: int = 100, after: str | None = None
    ) -> list[CredentialInfo]:
        """The tenant's credentials in creation order, ``limit`` at a time (keyset paging:
        pass the last ``credential_id`` seen as ``after``). Failed attempts are audited."""
        with self._attempts.attempt("list", self.actor, tenant_id):
            tenant = validate_tenant_id(tenant_id)
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
                raise InvalidInputError(f"limit must be an integer in 1..{MAX_PAGE}")
            if after is not None and not is_credential_id(after):
                raise InvalidInputError("after must be a credential id (cred_...)")
            query = select(*_INFO_COLUMNS).where(_CRED.c.tenant_id == tenant)
            with self._engine.connect() as conn:
                if after is not None:
                    after_pk = select(_CRED.c.pk).where(
                        _CRED.c.credential_id == after, _CRED.c.tenant_id == tenant
                    ).scalar_subquery()
                    query = query.where(_CRED.c.pk > func.coalesce(after_pk, 0))
                rows = conn.execute(query.order_by(_CRED.c.pk).limit(limit)).all()
            return [_info(r) for r in rows]

    def delete_credential(
        self, tenant_id: str, credential_ref: str, *, actor: str | None = None
    ) -> None:
        """Delete one of the tenant's credentials (audited).

        Raises :class:`CredentialNotFoundError` if the id is not this tenant's.
        """
        actor = actor or self.actor
        with self._attempts.attempt("delete", actor, tenant_id, credential_ref) as attempt:
            tenant = validate_tenant_id(tenant_id)
            ref = as_encrypted_ref(credential_ref)
            with self._engine.begin() as conn:
                owner = conn.execute(
                    select(_CRED.c.tenant_id).where(_CRED.c.credential_id == ref.credential_id)
                ).scalar()
                if owner != tenant:
                    if owner is not None:
                        attempt.denied_reason = "cross_tenant"
                    raise CredentialNotFoundError(
                        f"no credential {ref.credential_id} for this tenant"
                    )
                conn.execute(delete(_CRED).where(_CRED.c.credential_id == ref.credential_id))
                self._audit.append(conn, [attempt.success()])

    def shred_tenant(self, tenant_id: str, *, actor: str | None = None) -> int:
        """Crypto-shred a tenant: wipe the salts of all its key generations and delete every
        credential sealed under them, in one audited transaction. Returns the number of
        credentials.

        Without the salt no key can be derived for the tenant's ciphertexts, so copies that
        escaped (replicas, exports of the credentials table) become unreadable too. The
        generation rows stay as tombstones (empty salt, ``retired``) so that a tenant id that
        comes back never reuses a generation number another process may still have cached.
        """
        with self._attempts.attempt("shred_tenant", actor or self.actor, tenant_id) as attempt:
            tenant = validate_tenant_id(tenant_id)
            with self._engine.begin() as conn:
                count = conn.execute(
                    select(func.count()).where(_CRED.c.tenant_id == tenant)
                ).scalar_one()
                conn.execute(delete(_CRED).where(_CRED.c.tenant_id == tenant))
                conn.execute(update(_TK).where(_TK.c.tenant_id == tenant).values(
                    salt=SHREDDED_SALT, state=KeyState.RETIRED))
                attempt.success_reason = f"credentials={count}"
                self._audit.append(conn, [attempt.success()])
            self._keys.forget_tenant(tenant)
            return int(count)


def as_encrypted_ref(reference: object) -> EncryptedRef:
    ref = parse_reference(reference)
    if not isinstance(ref, EncryptedRef):
        raise InvalidInputError("expected an encrypted:// reference")
    return ref


__all__ = ["CredentialCatalog", "CredentialInfo", "as_encrypted_ref"]
