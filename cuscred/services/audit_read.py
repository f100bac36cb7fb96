"""Reading the audit trail: the newest events, optionally one tenant's or one action's.

Nothing in an audit row is secret (fixed codes, non-secret ids, keyed fingerprints of
references that were not ours), so a listing needs no key and decrypts nothing. A listing is
only as trustworthy as the chain it comes from: ``cuscred audit verify`` checks that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from cuscred.db.models import AUDIT_EVENTS
from cuscred.errors import InvalidInputError
from cuscred.validation import validate_tenant_id

_A = AUDIT_EVENTS
MAX_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    ts: datetime
    actor: str
    tenant_id: str | None
    credential_id: str | None
    action: str
    outcome: str
    reason: str | None

    def as_json(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v
                for k, v in asdict(self).items()}


def recent_events(
    conn: Connection, *, tenant_id: str | None = None, action: str | None = None,
    limit: int = 20,
) -> list[AuditEntry]:
    """The newest ``limit`` events (by sequence number), newest first.

    Raises :class:`~cuscred.errors.InvalidTenantError` for a malformed tenant id and
    :class:`InvalidInputError` for a limit outside 1..10,000.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInputError(f"the limit must be 1..{MAX_LIMIT}")
    query = select(_A.c.seq, _A.c.ts, _A.c.actor, _A.c.tenant_id, _A.c.credential_id,
                   _A.c.action, _A.c.outcome, _A.c.reason)
    if tenant_id is not None:
        query = query.where(_A.c.tenant_id == validate_tenant_id(tenant_id))
    if action is not None:
        query = query.where(_A.c.action == action)
    rows = conn.execute(query.order_by(_A.c.seq.desc()).limit(limit)).all()
    return [AuditEntry(*row) for row in rows]


__all__ = ["AuditEntry", "recent_events"]
