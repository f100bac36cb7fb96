"""Audit lookup indexes cover access events only, not bulk re-encryption events.

A re-encryption job appends one audit event per credential it moves. Indexed by tenant and by
credential id, each of those events is two inserts at random places in two B-trees: on SQLite
that was 28 of the 32 us an audit row cost a chunk (bench/reencrypt.py), most of it WAL pages.
The questions these indexes answer ("who resolved this credential", "what happened to this
tenant's keys") are about accesses and key changes; a job's events are found by their job
(``reason = 'job=N'``) and lie together in ``seq`` order. So the two indexes become partial,
leaving out ``action = 'reencrypt'``; every event is still written, chained and verified.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEXES = (
    ("ix_audit_events_tenant_ts", ["tenant_id", "ts"]),
    ("ix_audit_events_credential", ["credential_id"]),
)
_ACCESS_ONLY = sa.text("action <> 'reencrypt'")


def upgrade() -> None:
    for name, columns in _INDEXES:
        op.drop_index(name, table_name="audit_events")
        op.create_index(
            name, "audit_events", columns,
            sqlite_where=_ACCESS_ONLY, postgresql_where=_ACCESS_ONLY,
        )


def downgrade() -> None:
    for name, columns in _INDEXES:
        op.drop_index(name, table_name="audit_events")
        op.create_index(name, "audit_events", columns)
