"""KEK check values: a public fingerprint recorded per version, compared on every load.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: versions registered before this revision have none, and the check does not
    # apply to them.
    with op.batch_alter_table("kek_versions") as batch:
        batch.add_column(sa.Column("check_value", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("kek_versions") as batch:
        batch.drop_column("check_value")
