"""Re-encryption jobs record the census of their scope when they finish.

``rotation_jobs.census_json``: rows per (KEK version, tenant key generation) in the job's scope
(all rows, or one tenant's), taken by ``finalize_job`` in the transaction that completes the
job. Nullable: jobs that finished before this revision, and jobs cancelled or still running,
have none. Adding a nullable column rewrites nothing on either database.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rotation_jobs", sa.Column("census_json", sa.Text(), nullable=True))


def downgrade() -> None:
    # Only a record of past jobs is lost; no credential or key depends on it.
    with op.batch_alter_table("rotation_jobs") as batch:
        batch.drop_column("census_json")
