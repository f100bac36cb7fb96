"""The audit trail: append hash-chained events, and verify the chain.

Each row carries ``seq`` (previous + 1, so gapless), ``prev_mac`` (the previous row's ``mac``) and
``mac`` = HMAC-SHA256(audit key, prev_mac || canonical(row)). The audit key is derived from a KEK
version (HKDF, info ``cuscred/audit/v1``) recorded in the row, so someone who can write to the
database but cannot read the KEK can neither forge a row nor re-chain the table after editing or
deleting one. Deleting rows from the *end* of the chain leaves a valid shorter chain; catch that
by comparing the head that ``verify`` prints with one kept elsewhere (``--expect-head``).

Appends are serialised: on PostgreSQL by a transaction-scoped advisory lock taken just before the
tail is read (and released by the commit), on SQLite by the database write lock that every
transaction takes at ``BEGIN IMMEDIATE``. The append is the last statement before commit, so the
lock is held for one insert. The primary key on ``seq`` is the backstop: two writers can never
both extend the chain from the same tail.

No secret is ever written here: actions, outcomes and reasons are fixed codes; a reference that
does not name one of our credentials is stored only as a keyed fingerprint.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import insert, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cuscred.crypto.keys import Kek
from cuscred.db.models import AUDIT_EVENTS, utcnow
from cuscred.errors import AuditWriteError, CuscredError

GENESIS_MAC = "0" * 64
AUDIT_LOCK_ID = 0x6375736175646974  # "cusaudit"
_AUDIT_INFO = b"cuscred/audit/v1"
_LEN = struct.Struct(">I")
_TABLE = AUDIT_EVENTS


class Outcome:
    SUCCESS = "success"
    DENIED = "denied"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What happened, without any secret: fixed codes and non-secret identifiers."""

    action: str
    outcome: str
    actor: str
    tenant_id: str | None = None
    credential_id: str | None = None
    ref_fingerprint: str | None = None
    reason: str | None = None


class AuditKeys:
    """Audit MAC keys derived from KEK versions, cached per version."""

    def __init__(
        self, kek_for: Callable[[int], Kek], active_version: Callable[[Session], int]
    ) -> None:
        self._kek_for = kek_for
        self._active_version = active_version
        self._keys: dict[int, bytes] = {}

    def active(self, session: Session) -> tuple[int, bytes]:
        version = self._active_version(session)
        return version, self.for_version(version)

    def for_version(self, version: int) -> bytes:
        key = self._keys.get(version)
        if key is None:
            kek = self._kek_for(version)
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_AUDIT_INFO)
            key = self._keys[version] = hkdf.derive(kek.material())
        return key

    def __repr__(self) -> str:
        return f"<AuditKeys versions={sorted(self._keys)} material=<redacted>>"

    def __reduce__(self) -> tuple[()]:
        raise TypeError("AuditKeys holds key material and cannot be pickled")


def _canonical(row: dict[str, object]) -> bytes:
    out = bytearray()
    for name in (
        "seq", "ts", "actor", "tenant_id", "credential_id", "ref_fingerprint",
        "action", "outcome", "reason", "key_version",
    ):
        value = row[name]
        if isinstance(value, datetime):
            value = value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        field = b"\xff" if value is None else str(value).encode()
        out += _LEN.pack(len(field)) + field
    return bytes(out)


def compute_mac(key: bytes, prev_mac: str, row: dict[str, object]) -> str:
    return hmac.new(key, prev_mac.encode() + _canonical(row), "sha256").hexdigest()


def fingerprint_reference(keys: AuditKeys, session: Session, reference: str) -> str:
    """A keyed, truncated fingerprint: equal references compare equal under one KEK version,
    and the reference itself cannot be recovered or brute-forced without the KEK."""
    _, key = keys.active(session)
    return hmac.new(key, b"ref\x00" + reference.encode(), "sha256").hexdigest()[:32]


class AuditLog:
    """Writes audit events inside the caller's transaction."""

    def __init__(self, keys: AuditKeys) -> None:
        self.keys = keys

    def append(self, session: Session, records: Iterable[AuditRecord]) -> None:
        """Append ``records`` to the chain in the session's open transaction.

        Must be the last write before commit (the chain lock is held until then).
        Raises :class:`AuditWriteError` if the events cannot be written; the caller's
        transaction must then be rolled back, so the access it records does not happen.
        """
        records = list(records)
        if not records:
            return
        try:
            version, key = self.keys.active(session)
            seq, prev_mac = self._lock_tail(session)
            ts = utcnow()
            rows = []
            for record in records:
                seq += 1
                row: dict[str, object] = {
                    "seq": seq, "ts": ts, "actor": record.actor[:128],
                    "tenant_id": record.tenant_id, "credential_id": record.credential_id,
                    "ref_fingerprint": record.ref_fingerprint, "action": record.action,
                    "outcome": record.outcome, "reason": record.reason, "key_version": version,
                }
                row["prev_mac"] = prev_mac
                row["mac"] = prev_mac = compute_mac(key, prev_mac, row)
                rows.append(row)
            session.execute(insert(_TABLE), rows)
        except CuscredError as exc:
            raise AuditWriteError(f"audit event not written: {exc.code}") from exc
        except SQLAlchemyError as exc:
            raise AuditWriteError("audit event not written: database error") from exc

    @staticmethod
    def _lock_tail(session: Session) -> tuple[int, str]:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": AUDIT_LOCK_ID})
        tail = session.execute(
            select(_TABLE.c.seq, _TABLE.c.mac).order_by(_TABLE.c.seq.desc()).limit(1)
        ).first()
        return (0, GENESIS_MAC) if tail is None else (int(tail.seq), str(tail.mac))


__all__ = [
    "GENESIS_MAC",
    "AuditKeys",
    "AuditLog",
    "AuditRecord",
    "Outcome",
    "compute_mac",
    "fingerprint_reference",
]
