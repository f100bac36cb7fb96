"""Tables of the library: key versions, tenant keys, credentials, audit events.

The schema is owned by Alembic (``migrations/``); these models are its source for
``alembic check``. Nothing here holds plaintext or key material: ``credentials.ciphertext`` is
the sealed format of :mod:`cuscred.crypto.header`, ``tenant_keys.salt`` is public KDF input,
and ``fingerprint`` is an HMAC under a key derived from the KEK.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# A 64-bit autoincrementing key; SQLite only autoincrements an INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")

TENANT_ID_LEN = 64
#: Audit events the lookup indexes cover: every action but a job's per-row re-encryption.
_ACCESS_EVENTS = text("action <> 'reencrypt'")
CREDENTIAL_ID_LEN = 40


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class KeyState(StrEnum):
    """Life cycle of a KEK version or a tenant key generation (DESIGN.md)."""

    ACTIVE = "active"  # encrypts and decrypts; exactly one
    DECRYPT_ONLY = "decrypt_only"  # decrypts rows still on it
    RETIRED = "retired"  # refused; only once no row uses it


_STATES = "', '".join(s.value for s in KeyState)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class KekVersion(Base):
    __tablename__ = "kek_versions"
    __table_args__ = (
        CheckConstraint(f"state IN ('{_STATES}')", name="state"),
        CheckConstraint("version >= 1", name="version_positive"),
        # At most one active KEK version, enforced by the database.
        Index(
            "uq_kek_versions_one_active",
            "state",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    #: Public fingerprint of the key material (see services.keys.check_value).
    check_value: Mapped[str | None] = mapped_column(String(32))


class TenantKeyRow(Base):
    """One generation of a tenant's key: its salt and KDF. Deleting all of a tenant's rows
    crypto-shreds the tenant: no key can be derived for its ciphertexts any more."""

    __tablename__ = "tenant_keys"
    __table_args__ = (
        CheckConstraint(f"state IN ('{_STATES}')", name="state"),
        CheckConstraint("kdf IN ('hkdf-sha256', 'pbkdf2-sha256')", name="kdf"),
        CheckConstraint(
            "(kdf = 'hkdf-sha256' AND iterations IS NULL) OR "
            "(kdf = 'pbkdf2-sha256' AND iterations >= 100000)",
            name="iterations",
        ),
        Index(
            "uq_tenant_keys_one_active",
            "tenant_id",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )

    tenant_id: Mapped[str] = mapped_column(String(TENANT_ID_LEN), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    salt: Mapped[bytes] = mapped_column(LargeBinary(64))
    kdf: Mapped[str] = mapped_column(String(16))
    iterations: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Credential(Base):
    """One stored secret. ``credential_id`` is the public id in ``encrypted://<id>`` and never
    changes when keys rotate; ``pk`` orders rows for chunked re-encryption."""

    __tablename__ = "credentials"
    __table_args__ = (
        # The tenant key generation a row names must exist: shredding a tenant needs its
        # credentials deleted first, so a dangling ciphertext can never be left behind.
        ForeignKeyConstraint(
            ["tenant_id", "key_generation"],
            ["tenant_keys.tenant_id", "tenant_keys.generation"],
            name="fk_credentials_tenant_key",
        ),
        Index("ix_credentials_key_versions", "kek_version", "key_generation"),
        Index("ix_credentials_tenant_generation", "tenant_id", "key_generation"),
    )

    pk: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    credential_id: Mapped[str] = mapped_column(String(CREDENTIAL_ID_LEN), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(TENANT_ID_LEN))
    provider: Mapped[str] = mapped_column(String(32))
    masked: Mapped[str] = mapped_column(String(64))
    #: Canonical JSON of the encryption context (AAD is public by design; the re-encryption
    #: worker needs it to re-seal a row without the caller).
    context_json: Mapped[str] = mapped_column(Text, default="{}")
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    #: Copies of the header's versions, for the census and for chunk selection without
    #: decrypting; decryption checks that they agree with the authenticated header.
    kek_version: Mapped[int] = mapped_column(Integer)
    key_generation: Mapped[int] = mapped_column(Integer)
    #: HMAC-SHA256 of the plaintext under the row's tenant fingerprint key.
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary(32))
    #: Compare-and-swap counter: every write bumps it, and writes are conditional on it.
    row_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    reencrypted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class AuditEvent(Base):
    """One hash-chained audit record. ``seq`` is gapless by construction (assigned under a
    lock as previous + 1), so a deleted row shows as a gap and a broken link."""

    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint("outcome IN ('success', 'denied', 'failure')", name="outcome"),
        # Access events only: a re-encryption job writes one event per row it moves, and
        # indexing those cost most of a chunk's audit time (migration 0005 says why).
        Index("ix_audit_events_tenant_ts", "tenant_id", "ts",
              sqlite_where=_ACCESS_EVENTS, postgresql_where=_ACCESS_EVENTS),
        Index("ix_audit_events_credential", "credential_id",
              sqlite_where=_ACCESS_EVENTS, postgresql_where=_ACCESS_EVENTS),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[datetime] = mapped_column(UtcDateTime)
    actor: Mapped[str] = mapped_column(String(128))
    tenant_id: Mapped[str | None] = mapped_column(String(TENANT_ID_LEN))
    credential_id: Mapped[str | None] = mapped_column(String(CREDENTIAL_ID_LEN))
    #: Keyed fingerprint of a reference that did not name a credential of ours.
    ref_fingerprint: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))
    #: KEK version whose derived audit key computed ``mac`` (0: chain anchor, unkeyed).
    key_version: Mapped[int] = mapped_column(Integer)
    prev_mac: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


class JobStatus(StrEnum):
    PENDING = "pending"  # created; keys not yet in place or chunks not yet planned
    RUNNING = "running"  # chunks planned and enqueued
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"  # some rows would not decrypt
    CANCELLED = "cancelled"
    FAILED = "failed"  # could not be planned (e.g. a key version missing)


class JobKind(StrEnum):
    KEK_ROTATION = "kek_rotation"  # new KEK version, then every row moved to it
    TENANT_REKEY = "tenant_rekey"  # new salt generation for one tenant, its rows moved
    REENCRYPT = "reencrypt"  # move rows (all, or one tenant's) to the active keys


class ChunkStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"  # claimed by a worker until lease_until
    DONE = "done"
    FAILED = "failed"  # gave up after repeated crashes; its rows were left untouched
    CANCELLED = "cancelled"


def _check_in(column: str, enum: type[StrEnum]) -> str:
    return f"{column} IN ('" + "', '".join(e.value for e in enum) + "')"


class RotationJob(Base):
    """A re-encryption job. Its counts are sums over committed chunks (never incremented
    from outside a chunk's own transaction), so redelivered tasks cannot double-count."""

    __tablename__ = "rotation_jobs"
    __table_args__ = (
        CheckConstraint(_check_in("kind", JobKind), name="kind"),
        CheckConstraint(_check_in("status", JobStatus), name="status"),
        # At most one KEK rotation in flight, whoever starts it (two beats, an operator).
        Index(
            "uq_rotation_jobs_one_kek_rotation",
            "kind",
            unique=True,
            sqlite_where=text("kind = 'kek_rotation' AND status IN ('pending', 'running')"),
            postgresql_where=text("kind = 'kek_rotation' AND status IN ('pending', 'running')"),
        ),
        Index("ix_rotation_jobs_status", "status"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(24))
    tenant_id: Mapped[str | None] = mapped_column(String(TENANT_ID_LEN))
    target_kek_version: Mapped[int | None] = mapped_column(Integer)
    target_generation: Mapped[int | None] = mapped_column(Integer)
    chunk_size: Mapped[int] = mapped_column(Integer)
    #: Rows needing re-encryption when the job was planned (the final counts are the chunks').
    planned_rows: Mapped[int] = mapped_column(Integer, default=0)
    passes: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    requested_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(String(500))
    #: Rows in the job's scope per (KEK version, tenant key generation) when it finished, as
    #: JSON ``[[kek_version, key_generation, credentials], ...]``: what "did the rotation
    #: really finish?" is answered with long after the rows have moved on.
    census_json: Mapped[str | None] = mapped_column(Text)


class RotationChunk(Base):
    """One slice of a job: credentials with ``pk_lo <= pk <= pk_hi``."""

    __tablename__ = "rotation_chunks"
    __table_args__ = (
        ForeignKeyConstraint(["job_id"], ["rotation_jobs.id"], name="fk_rotation_chunks_job"),
        CheckConstraint(_check_in("status", ChunkStatus), name="status"),
        CheckConstraint("pk_lo <= pk_hi", name="range"),
        Index("ix_rotation_chunks_status_lease", "status", "lease_until"),
    )

    job_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    chunk_no: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    pk_lo: Mapped[int] = mapped_column(BigInteger)
    pk_hi: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    planned_rows: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    #: Claims of this chunk; a claim whose lease ran out without finishing was a crash.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    crashes: Mapped[int] = mapped_column(Integer, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    enqueued_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))


class RotationFailure(Base):
    """A credential a chunk could not re-encrypt, left untouched, with a reason code."""

    __tablename__ = "rotation_failures"
    __table_args__ = (
        ForeignKeyConstraint(["job_id"], ["rotation_jobs.id"], name="fk_rotation_failures_job"),
        # A job's later passes leave out the rows it already failed, found by primary key
        # (a row may have failed because its credential id was damaged).
        Index("ix_rotation_failures_job_pk", "job_id", "credential_pk"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigInteger)
    chunk_no: Mapped[int] = mapped_column(Integer)
    #: The row's credential id, escaped if it was not printable text (damaged outside cuscred).
    credential_id: Mapped[str] = mapped_column(String(CREDENTIAL_ID_LEN))
    reason: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    #: ``credentials.pk`` of the row (NULL only if it was deleted before migration 0006).
    #: Last, as migration 0006 added it: the model's column order is the tables' own.
    credential_pk: Mapped[int | None] = mapped_column(BigInteger)


# Core handles on the tables, typed as Table (``Model.__table__`` is typed as a FromClause).
# Hot paths use Core statements on these: loading ORM objects costs 5-10x more (DESIGN.md).
KEK_VERSIONS = cast(Table, KekVersion.__table__)
TENANT_KEYS = cast(Table, TenantKeyRow.__table__)
CREDENTIALS = cast(Table, Credential.__table__)
AUDIT_EVENTS = cast(Table, AuditEvent.__table__)
ROTATION_JOBS = cast(Table, RotationJob.__table__)
ROTATION_CHUNKS = cast(Table, RotationChunk.__table__)
ROTATION_FAILURES = cast(Table, RotationFailure.__table__)

__all__ = [
    "AUDIT_EVENTS",
    "CREDENTIALS",
    "KEK_VERSIONS",
    "ROTATION_CHUNKS",
    "ROTATION_FAILURES",
    "ROTATION_JOBS",
    "TENANT_KEYS",
    "AuditEvent",
    "Base",
    "ChunkStatus",
    "Credential",
    "JobKind",
    "JobStatus",
    "KekVersion",
    "KeyState",
    "RotationChunk",
    "RotationFailure",
    "RotationJob",
    "TenantKeyRow",
    "UtcDateTime",
    "utcnow",
]
