"""``CredentialService``: the public API the platform's code calls.

The names and argument order of the first seven methods are the public contract (DESIGN.md).
Every call is one database transaction that ends with its audit event; a failed call writes a
``denied`` or ``failure`` event afterwards and re-raises a typed error (see
:mod:`cuscred.services.attempts`). Plaintexts exist only as local variables of these methods:
they are never logged, stored, put in an exception or cached.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, Engine, Select, bindparam, select, update

from cuscred.config import Settings
from cuscred.crypto.keys import TenantKey
from cuscred.db.models import CREDENTIALS, utcnow
from cuscred.db.raw import Executor, raw_transaction
from cuscred.errors import ConcurrentUpdateError, CredentialNotFoundError, InvalidInputError
from cuscred.ids import new_credential_id
from cuscred.masking import mask_credential, masked_hint
from cuscred.providers import detect_provider
from cuscred.references import EncryptedRef, VaultRef, parse_reference
from cuscred.references import validate_credential_format as _validate_format
from cuscred.services.attempts import Attempt, AttemptRecorder
from cuscred.services.audit import AuditLog, AuditRecord, Outcome, tail_of, with_locked_tail
from cuscred.services.catalog import CredentialCatalog, CredentialInfo, as_encrypted_ref
from cuscred.services.external import resolve_env, resolve_vault
from cuscred.services.keys import KeyManager
from cuscred.services.sealing import context_from_json, context_to_json, open_row, seal_with
from cuscred.validation import validate_context, validate_secret, validate_tenant_id
from cuscred.vault.client import VaultKV

_CRED = CREDENTIALS
# Built once (building a statement per call cost more than running it, bench/resolve.py).
_ROW_BY_ID = select(
    _CRED.c.pk, _CRED.c.tenant_id, _CRED.c.ciphertext, _CRED.c.kek_version,
    _CRED.c.key_generation, _CRED.c.fingerprint, _CRED.c.row_version, _CRED.c.context_json,
).where(_CRED.c.credential_id == bindparam("credential_id"))
_ROW_AND_TAIL = {name: with_locked_tail(_ROW_BY_ID, name) for name in ("sqlite", "postgresql")}


class CredentialService(CredentialCatalog):
    """Store, resolve and rotate tenants' provider credentials."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        keys: KeyManager,
        audit: AuditLog,
        *,
        vault_kv: VaultKV | None = None,
        environ: Mapping[str, str] | None = None,
        actor: str | None = None,
    ) -> None:
        super().__init__(
            engine, keys, audit, AttemptRecorder(engine, audit),
            actor or settings.default_actor,
        )
        self.settings = settings
        self._vault_kv = vault_kv
        self._environ = os.environ if environ is None else environ

    def __repr__(self) -> str:
        return f"<CredentialService actor={self.actor!r} keys={self._keys!r}>"

    # --- the public contract ----------------------------------------------------------------

    def encrypt_credential(
        self,
        tenant_id: str,
        plaintext: str,
        context: Mapping[str, str] | None = None,
        *,
        actor: str | None = None,
        strip: bool = False,
    ) -> str:
        """Store ``plaintext`` for ``tenant_id``; return ``encrypted://<credential id>``.

        Raises :class:`~cuscred.errors.InvalidInputError` subclasses for a bad tenant id,
        secret or context (nothing is stored), :class:`~cuscred.errors.AuditWriteError` /
        :class:`~cuscred.errors.StorageError` if the row or its audit event cannot be written.
        """
        with self._attempts.attempt("encrypt", actor or self.actor, tenant_id) as attempt:
            tenant = validate_tenant_id(tenant_id)
            secret = validate_secret(plaintext, max_bytes=self.settings.max_secret_bytes,
                                     strip=strip)
            ctx = validate_context(context)
            credential_id = attempt.credential_id = new_credential_id()
            with self._engine.begin() as conn:
                key = self._write_key(conn, tenant)
                conn.execute(_CRED.insert(), _new_row(key, secret, ctx, credential_id))
                self._audit.append(conn, [attempt.success()])
            return str(EncryptedRef(credential_id))

    def import_credentials(
        self,
        items: Iterable[tuple[str, str, Mapping[str, str] | None]],
        *,
        actor: str | None = None,
        batch_size: int = 500,
    ) -> list[str]:
        """Store many ``(tenant_id, plaintext, context)`` items; return their references.

        For migrations from another store and for generated test data: one transaction and one
        audit append (one event per credential) per batch. Every item of a batch is validated
        before any of it is written, so a bad item leaves its whole batch unwritten; earlier
        batches stay committed. Raises as :meth:`encrypt_credential`.
        """
        refs: list[str] = []
        batch: list[tuple[str, str, dict[str, str]]] = []
        for tenant_id, plaintext, context in items:
            with self._attempts.attempt("encrypt", actor or self.actor, tenant_id):
                batch.append((
                    validate_tenant_id(tenant_id),
                    validate_secret(plaintext, max_bytes=self.settings.max_secret_bytes),
                    validate_context(context),
                ))
            if len(batch) >= batch_size:
                refs += self._import_batch(batch, actor or self.actor)
                batch = []
        if batch:
            refs += self._import_batch(batch, actor or self.actor)
        return refs

    def _import_batch(self, batch: list[tuple[str, str, dict[str, str]]], actor: str) -> list[str]:
        ids = [new_credential_id() for _ in batch]
        with self._attempts.attempt("encrypt", actor, None), self._engine.begin() as conn:
            keys: dict[str, TenantKey] = {}
            rows = []
            for (tenant, secret, ctx), cid in zip(batch, ids, strict=True):
                if tenant not in keys:  # one key lookup per tenant per batch
                    keys[tenant] = self._write_key(conn, tenant)
                rows.append(_new_row(keys[tenant], secret, ctx, cid))
            conn.execute(_CRED.insert(), rows)
            self._audit.append(conn, [
                AuditRecord(action="encrypt", outcome=Outcome.SUCCESS, actor=actor,
                            tenant_id=row["tenant_id"], credential_id=row["credential_id"],
                            reason="import")
                for row in rows
            ])
        return [str(EncryptedRef(cid)) for cid in ids]

    def decrypt_credential(
        self,
        tenant_id: str,
        credential_ref: str,
        context: Mapping[str, str] | None = None,
        *,
        actor: str | None = None,
    ) -> str:
        """Decrypt the tenant's ``encrypted://`` credential.

        Raises :class:`~cuscred.errors.MalformedReferenceError` for anything but an
        ``encrypted://`` reference, :class:`~cuscred.errors.CredentialNotFoundError` when the id
        is not one of this tenant's credentials (another tenant's id included),
        :class:`~cuscred.errors.DecryptionError` for any failure to authenticate the value.
        """
        return self._open("decrypt", tenant_id, credential_ref, context, actor, vault_ok=False)

    def resolve_credential(
        self,
        tenant_id: str,
        credential_ref: str,
        context: Mapping[str, str] | None = None,
        *,
        actor: str | None = None,
    ) -> str:
        """Return the secret behind any reference, right before it is used.

        ``encrypted://`` as :meth:`decrypt_credential`; ``vault://`` only inside the tenant's
        prefix (:class:`~cuscred.errors.ScopeError` otherwise, before any request), raising the
        Vault errors (not found, deleted, destroyed, permission denied, unavailable, field
        missing); ``env://`` in development mode only, for prefixed names.
        """
        return self._open("resolve", tenant_id, credential_ref, context, actor, vault_ok=True)

    def rotate_credential(
        self,
        tenant_id: str,
        old_credential_ref: str,
        new_plaintext: str,
        context: Mapping[str, str] | None = None,
        *,
        actor: str | None = None,
        strip: bool = False,
    ) -> tuple[str, bool]:
        """Replace the secret behind ``old_credential_ref``; the reference stays valid.

        Returns ``(reference, changed)``; ``changed`` is False when the new value equals the
        stored one, decided by comparing keyed fingerprints (no plaintext is kept or decrypted).
        ``context=None`` keeps the stored context. Raises as :meth:`encrypt_credential` and
        :meth:`decrypt_credential`, and :class:`~cuscred.errors.ConcurrentUpdateError` if the
        row changed during the call (nothing written; retry).
        """
        with self._attempts.attempt(
            "rotate", actor or self.actor, tenant_id, old_credential_ref
        ) as attempt:
            tenant = validate_tenant_id(tenant_id)
            ref = as_encrypted_ref(old_credential_ref)
            secret = validate_secret(new_plaintext, max_bytes=self.settings.max_secret_bytes,
                                     strip=strip)
            with self._engine.begin() as conn:
                row = self._own_row(conn, attempt, tenant, ref.credential_id)
                ctx = context_from_json(row.context_json) if context is None else (
                    validate_context(context))
                old_key = self._keys.tenant_key(conn, tenant, row.key_generation,
                                                row.kek_version)
                unchanged = old_key.fingerprint(secret.encode()) == bytes(row.fingerprint) and (
                    context_to_json(ctx) == row.context_json)
                if unchanged:
                    attempt.success_reason = "unchanged"
                else:
                    self._replace(conn, row, ref.credential_id, tenant, secret, ctx)
                self._audit.append(conn, [attempt.success()])
            return str(ref), not unchanged

    @staticmethod
    def validate_credential_format(credential_ref: str) -> tuple[bool, str]:
        """Check a reference's syntax without any I/O: ``(ok, what is wrong or what it is)``."""
        return _validate_format(credential_ref)

    @staticmethod
    def generate_master_key() -> str:
        """32 random bytes from the OS CSPRNG, standard base64 (44 characters)."""
        return base64.b64encode(os.urandom(32)).decode()

    @staticmethod
    def mask_credential(value_or_ref: str) -> str:
        """A display form of a secret or reference that reveals at most a known prefix and
        the last 4 characters (see :mod:`cuscred.masking`)."""
        return mask_credential(value_or_ref)

    # --- internals --------------------------------------------------------------------------

    def _open(
        self, action: str, tenant_id: str, credential_ref: str,
        context: Mapping[str, str] | None, actor: str | None, *, vault_ok: bool,
    ) -> str:
        with self._attempts.attempt(action, actor or self.actor, tenant_id, credential_ref) as at:
            tenant = validate_tenant_id(tenant_id)
            ctx = validate_context(context)
            ref = at.reference or parse_reference(credential_ref)
            if not isinstance(ref, EncryptedRef):
                if not vault_ok:
                    raise InvalidInputError(
                        "decrypt_credential takes encrypted:// references; "
                        "use resolve_credential for vault:// and env://"
                    )
                value = (resolve_vault(ref, tenant, self.settings, self._vault_kv)
                         if isinstance(ref, VaultRef)
                         else resolve_env(ref, self.settings, self._environ))
                with raw_transaction(self._engine) as conn:
                    self._audit.append(conn, [at.success()])
                return value
            # The hot path: one round trip reads the row and the locked audit-chain tail, then
            # the audit insert and the commit (bench/resolve.py measures it against raw SQL).
            with raw_transaction(self._engine) as conn:
                query = _ROW_AND_TAIL[conn.dialect.name]
                row = self._own_row(conn, at, tenant, ref.credential_id, query)
                plaintext = open_row(
                    self._keys, conn, tenant_id=tenant, credential_id=ref.credential_id,
                    ciphertext=row.ciphertext, kek_version=row.kek_version,
                    key_generation=row.key_generation, context=ctx,
                )
                self._audit.append(conn, [at.success()], tail=tail_of(row))
            return plaintext.decode()

    def _own_row(
        self, conn: Executor, attempt: Attempt, tenant: str, credential_id: str,
        query: Select[Any] = _ROW_BY_ID,
    ) -> Any:
        row = conn.execute(query, {"credential_id": credential_id}).first()
        if row is None or row.tenant_id != tenant:
            if row is not None:
                attempt.denied_reason = "cross_tenant"  # audited; the caller sees "not found"
            raise CredentialNotFoundError(f"no credential {credential_id} for this tenant")
        return row

    def _write_key(self, conn: Connection, tenant: str) -> TenantKey:
        kek_version = self._keys.active_version_for_write(conn)
        generation = self._keys.active_generation(conn, tenant, create=True)
        assert generation is not None  # create=True always yields one
        return self._keys.tenant_key(conn, tenant, generation, kek_version)

    def _replace(
        self, conn: Connection, row: Any, credential_id: str, tenant: str, secret: str,
        ctx: Mapping[str, str],
    ) -> None:
        key = self._write_key(conn, tenant)
        sealed = seal_with(key, secret.encode(), credential_id=credential_id, context=ctx)
        now = utcnow()
        result = conn.execute(
            update(_CRED)
            .where(_CRED.c.pk == row.pk, _CRED.c.row_version == row.row_version)
            .values(
                ciphertext=sealed.ciphertext, kek_version=sealed.kek_version,
                key_generation=sealed.key_generation, fingerprint=sealed.fingerprint,
                provider=detect_provider(secret), masked=masked_hint(secret),
                context_json=context_to_json(ctx), row_version=row.row_version + 1,
                rotated_at=now,
            )
        )
        if result.rowcount != 1:
            raise ConcurrentUpdateError("the credential changed during rotation; retry")


def _new_row(
    key: TenantKey, secret: str, ctx: Mapping[str, str], credential_id: str
) -> dict[str, Any]:
    """The ``credentials`` row for a new secret sealed under ``key``."""
    sealed = seal_with(key, secret.encode(), credential_id=credential_id, context=ctx)
    return {
        "credential_id": credential_id, "tenant_id": key.tenant_id,
        "provider": detect_provider(secret), "masked": masked_hint(secret),
        "context_json": context_to_json(ctx), "ciphertext": sealed.ciphertext,
        "kek_version": sealed.kek_version, "key_generation": sealed.key_generation,
        "fingerprint": sealed.fingerprint, "row_version": 1, "created_at": utcnow(),
    }


__all__ = ["CredentialInfo", "CredentialService"]
