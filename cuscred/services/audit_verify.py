"""Verify the audit chain and report the first row that was edited, inserted or deleted.

Walks the table in ``seq`` order and checks, for every row: that ``seq`` is the previous plus
one (else rows were deleted), that ``prev_mac`` equals the previous row's ``mac`` (else the chain
was cut), and that ``mac`` recomputes under the audit key of the row's KEK version (else the row
was edited or forged). A forged row is told apart from an edited one by looking one row ahead:
if the next row links to the row *before* it, it was inserted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from cuscred.db.models import AUDIT_EVENTS
from cuscred.errors import ConfigurationError, CuscredError, CuscredTypeError, KekMismatchError
from cuscred.services.audit import GENESIS_MAC, AuditKeys, compute_mac

_TABLE = AUDIT_EVENTS
_FIELDS = (
    "seq", "ts", "actor", "tenant_id", "credential_id", "ref_fingerprint",
    "action", "outcome", "reason", "key_version", "prev_mac", "mac",
)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Result of a chain walk. ``ok`` is True only if every row checked out."""

    ok: bool
    rows_checked: int
    head_seq: int
    head_mac: str
    problem: str | None = None  # edited | inserted | deleted | truncated | unverifiable
    problem_seq: int | None = None
    detail: str | None = None


def verify_chain(
    conn: Connection, keys: AuditKeys, *, expect_head: tuple[int, str] | None = None,
    batch: int = 5000,
) -> VerifyReport:
    """Check the whole chain. Never raises for a broken chain: it reports it.

    ``expect_head`` is a ``(seq, mac)`` printed by an earlier verify and kept elsewhere: the
    row at that seq must still carry that MAC. This catches a tail that was cut off, even if
    new rows were appended since (they would chain from an earlier row).

    Raises :class:`~cuscred.errors.ConfigurationError` and retryable errors (a keyring that
    cannot be read, Vault down) instead of calling the chain broken: that is not the chain's
    fault. A KEK version that is gone (deleted in Vault) makes its rows "unverifiable".
    """
    keys.prepare(conn)
    # A server-side cursor on PostgreSQL: the chain may hold millions of rows.
    rows = conn.execution_options(stream_results=True, yield_per=batch).execute(
        select(*(_TABLE.c[f] for f in _FIELDS)).order_by(_TABLE.c.seq)
    )
    prev_seq, prev_mac, checked = 0, GENESIS_MAC, 0
    pending: dict[str, Any] | None = None
    anchor_mac: str | None = None
    for mapping in rows.mappings():
        row = dict(mapping)
        if pending is not None:
            # The previous row's MAC failed; decide edited vs inserted from this row's link.
            kind = "inserted" if row["prev_mac"] == pending["prev_mac"] else "edited"
            return _broken(kind, pending["seq"], checked, prev_seq, prev_mac)
        if row["seq"] != prev_seq + 1:
            detail = f"rows {prev_seq + 1}..{row['seq'] - 1} are missing"
            return _broken("deleted", prev_seq + 1, checked, prev_seq, prev_mac, detail)
        if row["prev_mac"] != prev_mac:
            return _broken("deleted", row["seq"], checked, prev_seq, prev_mac,
                           "the row does not link to its predecessor")
        try:
            key = keys.for_version(int(row["key_version"]))
        except (ConfigurationError, CuscredTypeError):
            raise
        except CuscredError as exc:
            if exc.retryable:
                raise
            why = ("is not the key recorded for it: wrong keyring or Vault path"
                   if isinstance(exc, KekMismatchError) else f"unavailable ({exc.code})")
            return _broken("unverifiable", row["seq"], checked, prev_seq, prev_mac,
                           f"KEK version {row['key_version']} {why}")
        if compute_mac(key, prev_mac, row) != row["mac"]:
            pending = row
            continue
        prev_seq, prev_mac, checked = row["seq"], row["mac"], checked + 1
        if expect_head is not None and prev_seq == expect_head[0]:
            anchor_mac = prev_mac
    if pending is not None:
        return _broken("edited", pending["seq"], checked, prev_seq, prev_mac,
                       "the last row does not match its MAC")
    if expect_head is not None and anchor_mac != expect_head[1]:
        what = ("the chain ends before it" if anchor_mac is None
                else "its row now carries a different MAC")
        return _broken("truncated", expect_head[0], checked, prev_seq, prev_mac,
                       f"expected head {expect_head[0]}: {what}")
    return VerifyReport(ok=True, rows_checked=checked, head_seq=prev_seq, head_mac=prev_mac)


def _broken(
    kind: str, seq: int, checked: int, prev_seq: int, prev_mac: str, detail: str | None = None
) -> VerifyReport:
    return VerifyReport(
        ok=False, rows_checked=checked, head_seq=prev_seq, head_mac=prev_mac,
        problem=kind, problem_seq=seq, detail=detail,
    )


__all__ = ["VerifyReport", "verify_chain"]
