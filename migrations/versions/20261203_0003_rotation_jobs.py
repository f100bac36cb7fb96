"""Re-encryption jobs: rotation_jobs, rotation_chunks, rotation_failures.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_TS = sa.DateTime(timezone=True)
BIG_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
IN_FLIGHT_ROTATION = sa.text("kind = 'kek_rotation' AND status IN ('pending', 'running')")


def _counts() -> list[sa.Column[int]]:
    return [sa.Column(name, sa.Integer(), nullable=False)
            for name in ("total", "done", "skipped", "failed")]


def upgrade() -> None:
    op.create_table(
        "rotation_jobs",
        sa.Column("id", BIG_PK, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=True),
        sa.Column("target_kek_version", sa.Integer(), nullable=True),
        sa.Column("target_generation", sa.Integer(), nullable=True),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("planned_rows", sa.Integer(), nullable=False),
        sa.Column("passes", sa.Integer(), nullable=False),
        *_counts(),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.Column("started_at", UTC_TS, nullable=True),
        sa.Column("finished_at", UTC_TS, nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.CheckConstraint(
            "kind IN ('kek_rotation', 'tenant_rekey', 'reencrypt')",
            name=op.f("ck_rotation_jobs_kind"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'completed', 'completed_with_errors', "
            "'cancelled', 'failed')",
            name=op.f("ck_rotation_jobs_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rotation_jobs")),
    )
    op.create_index("ix_rotation_jobs_status", "rotation_jobs", ["status"])
    # Two beats, or a beat and an operator, can never both start a KEK rotation.
    op.create_index(
        "uq_rotation_jobs_one_kek_rotation", "rotation_jobs", ["kind"], unique=True,
        sqlite_where=IN_FLIGHT_ROTATION, postgresql_where=IN_FLIGHT_ROTATION,
    )

    op.create_table(
        "rotation_chunks",
        sa.Column("job_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("chunk_no", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("pk_lo", sa.BigInteger(), nullable=False),
        sa.Column("pk_hi", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("planned_rows", sa.Integer(), nullable=False),
        *_counts(),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("crashes", sa.Integer(), nullable=False),
        sa.Column("claim_token", sa.String(32), nullable=True),
        sa.Column("lease_until", UTC_TS, nullable=True),
        sa.Column("enqueued_at", UTC_TS, nullable=True),
        sa.Column("started_at", UTC_TS, nullable=True),
        sa.Column("finished_at", UTC_TS, nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'failed', 'cancelled')",
            name=op.f("ck_rotation_chunks_status"),
        ),
        sa.CheckConstraint("pk_lo <= pk_hi", name=op.f("ck_rotation_chunks_range")),
        sa.ForeignKeyConstraint(["job_id"], ["rotation_jobs.id"], name="fk_rotation_chunks_job"),
        sa.PrimaryKeyConstraint("job_id", "chunk_no", name=op.f("pk_rotation_chunks")),
    )
    op.create_index(
        "ix_rotation_chunks_status_lease", "rotation_chunks", ["status", "lease_until"]
    )

    op.create_table(
        "rotation_failures",
        sa.Column("id", BIG_PK, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("chunk_no", sa.Integer(), nullable=False),
        sa.Column("credential_id", sa.String(40), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["rotation_jobs.id"], name="fk_rotation_failures_job"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rotation_failures")),
    )
    op.create_index(
        "ix_rotation_failures_job_credential", "rotation_failures", ["job_id", "credential_id"]
    )


def downgrade() -> None:
    # Job history only; no credential or key is lost by dropping it.
    op.drop_table("rotation_failures")
    op.drop_table("rotation_chunks")
    op.drop_table("rotation_jobs")
