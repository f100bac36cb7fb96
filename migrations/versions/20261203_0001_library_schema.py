"""Library schema: KEK versions, tenant keys, credentials, audit events.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_TS = sa.DateTime(timezone=True)
STATES = "state IN ('active', 'decrypt_only', 'retired')"
ACTIVE_ONLY = sa.text("state = 'active'")


def upgrade() -> None:
    op.create_table(
        "kek_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.Column("activated_at", UTC_TS, nullable=True),
        sa.Column("retired_at", UTC_TS, nullable=True),
        sa.CheckConstraint(STATES, name=op.f("ck_kek_versions_state")),
        sa.CheckConstraint("version >= 1", name=op.f("ck_kek_versions_version_positive")),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_kek_versions")),
    )
    op.create_index(
        "uq_kek_versions_one_active", "kek_versions", ["state"], unique=True,
        sqlite_where=ACTIVE_ONLY, postgresql_where=ACTIVE_ONLY,
    )

    op.create_table(
        "tenant_keys",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("salt", sa.LargeBinary(64), nullable=False),
        sa.Column("kdf", sa.String(16), nullable=False),
        sa.Column("iterations", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.CheckConstraint(
            "(kdf = 'hkdf-sha256' AND iterations IS NULL) OR "
            "(kdf = 'pbkdf2-sha256' AND iterations >= 100000)",
            name=op.f("ck_tenant_keys_iterations"),
        ),
        sa.CheckConstraint(
            "kdf IN ('hkdf-sha256', 'pbkdf2-sha256')", name=op.f("ck_tenant_keys_kdf")
        ),
        sa.CheckConstraint(STATES, name=op.f("ck_tenant_keys_state")),
        sa.PrimaryKeyConstraint("tenant_id", "generation", name=op.f("pk_tenant_keys")),
    )
    op.create_index(
        "uq_tenant_keys_one_active", "tenant_keys", ["tenant_id"], unique=True,
        sqlite_where=ACTIVE_ONLY, postgresql_where=ACTIVE_ONLY,
    )

    op.create_table(
        "credentials",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True, nullable=False,
        ),
        sa.Column("credential_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("masked", sa.String(64), nullable=False),
        sa.Column("context_json", sa.Text(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("key_generation", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary(32), nullable=False),
        sa.Column("row_version", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.Column("rotated_at", UTC_TS, nullable=True),
        sa.Column("reencrypted_at", UTC_TS, nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id", "key_generation"],
            ["tenant_keys.tenant_id", "tenant_keys.generation"],
            name="fk_credentials_tenant_key",
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_credentials")),
        sa.UniqueConstraint("credential_id", name=op.f("uq_credentials_credential_id")),
    )
    op.create_index(
        "ix_credentials_key_versions", "credentials", ["kek_version", "key_generation"]
    )
    op.create_index(
        "ix_credentials_tenant_generation", "credentials", ["tenant_id", "key_generation"]
    )

    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("ts", UTC_TS, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=True),
        sa.Column("credential_id", sa.String(40), nullable=True),
        sa.Column("ref_fingerprint", sa.String(32), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("prev_mac", sa.String(64), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.CheckConstraint(
            "outcome IN ('success', 'denied', 'failure')", name=op.f("ck_audit_events_outcome")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
    )
    op.create_index("ix_audit_events_tenant_ts", "audit_events", ["tenant_id", "ts"])
    op.create_index("ix_audit_events_credential", "audit_events", ["credential_id"])


def downgrade() -> None:
    # Dropping these tables would destroy every stored credential and the audit trail: refuse
    # while any credential exists, so a mistyped `alembic downgrade base` cannot lose data.
    count = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM credentials")).scalar_one()
    if count:
        raise RuntimeError(
            f"refusing to drop the credential store: {count} credentials exist. "
            "Export or crypto-shred them first."
        )
    op.drop_table("audit_events")
    op.drop_table("credentials")
    op.drop_table("tenant_keys")
    op.drop_table("kek_versions")
