"""PostgreSQL: take the audit-chain lock and read the chain's tail in one round trip.

A plain ``SELECT pg_advisory_xact_lock(...), (SELECT ... tail)`` would read the tail with the
snapshot taken when the statement started, i.e. before waiting for the lock, and so could miss
the row the previous lock holder just committed. Inside a VOLATILE plpgsql function each
statement takes a fresh snapshot, so the tail is read after the lock is granted. The lock is
transaction-scoped: it is released by the caller's commit or rollback.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTION = """
CREATE OR REPLACE FUNCTION cuscred_audit_locked_tail(lock_id bigint,
                                                     OUT seq bigint, OUT mac varchar)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_id);
    SELECT a.seq, a.mac INTO seq, mac FROM audit_events AS a ORDER BY a.seq DESC LIMIT 1;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS cuscred_audit_locked_tail(bigint)")
