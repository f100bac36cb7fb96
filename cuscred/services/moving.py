"""Moving an installation off the embedded default: the database into PostgreSQL
(``cuscred db copy``; README runbook 8). The copy is audited in the target, in the copy's own
transaction.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine

from cuscred.db.copy import copy_database, open_source
from cuscred.db.models import KeyState
from cuscred.errors import KekUnavailableError
from cuscred.services.audit import AuditLog, AuditRecord, Outcome
from cuscred.services.keys import KeyManager


def copy_into(
    engine: Engine, keys: KeyManager, audit: AuditLog, source_url: str, *, batch: int,
    actor: str,
) -> dict[str, int]:
    """Copy the database at ``source_url`` into the empty one behind ``engine`` (see
    :func:`cuscred.db.copy.copy_database`) and audit it in the same transaction.

    Every KEK version the copied rows use, and the active one, must load from the configured
    source: a copy the new setup could not decrypt is rolled back (:class:`KekUnavailableError`
    naming the version). The URL is never repeated in a message: it may carry a password.
    """
    source = open_source(source_url)

    def record(conn: Connection, counts: dict[str, int]) -> None:
        _require_loadable_keks(conn, keys)
        audit.append(conn, [AuditRecord(
            action="db_copy", outcome=Outcome.SUCCESS, actor=actor,
            reason=f"from={source.dialect.name} rows={sum(counts.values())}",
        )])

    try:
        return copy_database(source, engine, batch=batch, before_commit=record)
    finally:
        source.dispose()


def _require_loadable_keks(conn: Connection, keys: KeyManager) -> None:
    """Every KEK version the copied rows use, and the active one, loads from the configured
    source with the check value the copy brought along; else the copy is rolled back, since
    the new setup could decrypt nothing under that version."""
    states = keys.kek_states(conn, fresh=True)  # the copied versions, not a view cached before
    needed = set(keys.census(conn)) | {v for v, s in states.items() if s == KeyState.ACTIVE}
    for version in sorted(needed):
        try:
            keys.kek(version)
        except KekUnavailableError as exc:
            raise KekUnavailableError(
                f"{exc}; the copy was rolled back: import the keyring into the configured "
                "source first") from exc


__all__ = ["copy_into"]
