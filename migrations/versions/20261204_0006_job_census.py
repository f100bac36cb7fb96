"""Jobs record their census when they finish; their failures name rows by primary key.

* ``rotation_jobs.census_json``: rows per (KEK version, tenant key generation) in the job's
  scope (all rows, or one tenant's), taken by ``finalize_job`` in the transaction that completes
  the job. NULL for jobs that finished before this revision, were cancelled, or still run.
* ``rotation_failures.credential_pk``: the failed row's primary key, which a job's later passes
  use to leave it out. The credential id alone could not do that for a row whose id was itself
  damaged (the failure records it escaped, so it no longer matches). Backfilled from the
  credential ids; the index that served the old lookup is replaced by one on the key.

Adding nullable columns rewrites no table on either database; the backfill reads each failure
once.

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
    op.add_column("rotation_failures", sa.Column("credential_pk", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE rotation_failures SET credential_pk = (SELECT c.pk FROM credentials AS c "
        "WHERE c.credential_id = rotation_failures.credential_id)"
    )
    op.drop_index("ix_rotation_failures_job_credential", table_name="rotation_failures")
    op.create_index("ix_rotation_failures_job_pk", "rotation_failures",
                    ["job_id", "credential_pk"])


def downgrade() -> None:
    # Only records of past jobs are lost; no credential or key depends on them.
    op.create_index("ix_rotation_failures_job_credential", "rotation_failures",
                    ["job_id", "credential_id"])
    op.drop_index("ix_rotation_failures_job_pk", table_name="rotation_failures")
    with op.batch_alter_table("rotation_failures") as batch:
        batch.drop_column("credential_pk")
    with op.batch_alter_table("rotation_jobs") as batch:
        batch.drop_column("census_json")
