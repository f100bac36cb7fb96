"""The audit trail: append hash-chained events, and verify the chain.

Each row carries ``seq`` (previous + 1, so gapless), ``prev_mac`` (the previous row's ``mac``) and
``mac`` = HMAC-SHA256(audit key, prev_mac || canonical(row)). The audit key is derived from a KEK
version (HKDF, info ``cuscred/audit/v1``) recorded in the row, so someone who can write to the
database but cannot read the KEK can neither forge a row nor re-chain the table after editing or
deleting one. Deleting rows from the *end* of the chain leaves a valid shorter chain; catch that
by comparing the head that ``verify`` prints with one kept elsewhere (``--expect-head``).

Appends are serialised: on PostgreSQL by a transaction-scoped advisory lock taken just before the
tail is read, in one round trip by the function ``cuscred_audit_locked_tail`` (migration 0002),
and released by the commit; on SQLite by the database write lock that every
transaction takes at ``BEGIN IMMEDIATE``. The append is the last statement before commit, so the
lock is held for one insert. The primary key on ``seq`` is the backstop: two writers can never
both extend the chain from the same tail.

No secret is ever written here: actions, outcomes and reasons are fixed codes; a reference that
does not name one of our credentials is stored only as a keyed fingerprint.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import BigInteger, Connection, Select, func, insert, literal, select, text, true
from sqlalchemy.exc import SQLAlchemyError

from cuscred import metrics
from cuscred.crypto.keys import Kek
from cuscred.db.models import AUDIT_EVENTS, utcnow
from cuscred.db.raw import Executor
from cuscred.errors import AuditWriteError, CuscredError
from cuscred.validation import key_shaped

GENESIS_MAC = "0" * 64
AUDIT_LOCK_ID = 0x6375736175646974  # "cusaudit"
_AUDIT_INFO = b"cuscred/audit/v1"
_LEN = struct.Struct(">I")
_NONE = b"\xff\xff\xff\xff"  # a length no real field can have
_ZERO = timedelta(0)
_TABLE = AUDIT_EVENTS
# Statements built once: building a Core statement costs more than executing a cached one.
_INSERT = insert(_TABLE)
_TAIL = select(_TABLE.c.seq, _TABLE.c.mac).order_by(_TABLE.c.seq.desc()).limit(1)
_PG_LOCKED_TAIL = text("SELECT seq, mac FROM cuscred_audit_locked_tail(:id)")


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
        self, kek_for: Callable[[int], Kek], active_version: Callable[[Executor], int],
        load_check_values: Callable[[Executor], object] | None = None,
    ) -> None:
        self._kek_for = kek_for
        self._active_version = active_version
        self._load_check_values = load_check_values
        self._keys: dict[int, bytes] = {}

    def prepare(self, conn: Executor) -> None:
        """Learn the check values recorded for the KEK versions, so that a wrong key for an
        old version is refused as a mismatch (not taken for tampering) by :meth:`for_version`."""
        if self._load_check_values is not None:
            self._load_check_values(conn)

    def active(self, conn: Executor) -> tuple[int, bytes]:
        version = self._active_version(conn)
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


_CANONICAL_FIELDS = (
    "seq", "ts", "actor", "tenant_id", "credential_id", "ref_fingerprint",
    "action", "outcome", "reason", "key_version",
)


def _field(value: object) -> bytes:
    """One length-prefixed field (None distinct from ""); timestamps as UTC ISO-8601 with
    microseconds (every timestamp here is UTC-aware: see ``UtcDateTime``)."""
    if value is None:
        return _NONE
    if isinstance(value, str):
        # The characters themselves, as the driver stores them: str() of a str subclass (a
        # str-valued Enum) may print something else, and the MAC would never verify.
        data = str.encode(value)
    elif isinstance(value, datetime):
        if value.utcoffset() != _ZERO:
            value = value.astimezone(UTC)
        data = value.isoformat(timespec="microseconds").encode()
    else:
        data = str(int(value) if isinstance(value, int) else value).encode()
    return _LEN.pack(len(data)) + data


def _canonical(row: Mapping[str, object]) -> bytes:
    """The bytes a row's MAC covers: its fields in a fixed order, each length-prefixed.

    This is the definition ``verify`` checks against; :func:`_chain` builds the same bytes
    faster for a batch.
    """
    return b"".join([_field(row[name]) for name in _CANONICAL_FIELDS])


#: Column order of an audit row as :func:`_chain` returns it (and as the batch inserts take it).
_ROW_COLUMNS = (
    "seq", "ts", "actor", "tenant_id", "credential_id", "ref_fingerprint", "action",
    "outcome", "reason", "key_version", "prev_mac", "mac",
)


def _chain(
    records: list[AuditRecord], seq: int, prev_mac: str, key: bytes, version: int,
    ts: datetime, stored_ts: object,
) -> list[tuple[object, ...]]:
    """The rows for ``records`` after the tail (``seq``, ``prev_mac``), each MAC'd over
    :func:`_canonical` of itself and chained to the one before.

    One pass per row, no intermediate dicts: the rows of a batch share their timestamp and key
    version (encoded once) and a handful of distinct strings (actor, tenants, action, outcome,
    reason: encoded once each), so a chunk's 2,000 events cost little more than their HMACs.
    ``stored_ts`` is the value the row tuple carries for ``ts`` (the driver-ready form for a
    batch insert, or ``ts`` itself).
    """
    head = _field(ts)
    version_enc = _field(version)
    strings: dict[str | None, bytes] = {None: _NONE}
    rows: list[tuple[object, ...]] = []
    for record in records:
        seq += 1
        actor = record.actor[:128]
        shared = []
        for value in (actor, record.tenant_id):
            encoded = strings.get(value)
            if encoded is None:
                encoded = strings[value] = _field(value)
            shared.append(encoded)
        rest = []
        for value in (record.ref_fingerprint, record.action, record.outcome, record.reason):
            encoded = strings.get(value)
            if encoded is None:
                encoded = strings[value] = _field(value)
            rest.append(encoded)
        message = b"".join((
            prev_mac.encode(), _field(seq), head, *shared, _field(record.credential_id), *rest,
            version_enc,
        ))
        mac = hmac.digest(key, message, "sha256").hex()
        rows.append((
            seq, stored_ts, actor, record.tenant_id, record.credential_id,
            record.ref_fingerprint, record.action, record.outcome, record.reason, version,
            prev_mac, mac,
        ))
        prev_mac = mac
    return rows


#: Who an event of a uniform batch is about: (tenant id, credential id).
Subject = tuple[str | None, str | None]


def _chain_uniform(
    template: AuditRecord, subjects: Sequence[Subject], seq: int, prev_mac: str, key: bytes,
    version: int, ts: datetime, stored_ts: object,
) -> list[tuple[object, ...]]:
    """:func:`_chain` for events equal to ``template`` but for their tenant and credential.

    A chunk's success events are such a batch; everything but ``seq``, the tenant (a handful
    per chunk, encoded once each) and the credential id is encoded once for the batch, so a
    row costs two short encodings, a join and its HMAC.
    """
    actor = template.actor[:128]
    middle = _field(ts) + _field(actor)
    tail = b"".join((_field(template.ref_fingerprint), _field(template.action),
                     _field(template.outcome), _field(template.reason), _field(version)))
    tenants: dict[str | None, bytes] = {None: _NONE}
    rows: list[tuple[object, ...]] = []
    fields = (template.ref_fingerprint, template.action, template.outcome, template.reason,
              version)
    for tenant_id, credential_id in subjects:
        seq += 1
        tenant_enc = tenants.get(tenant_id)
        if tenant_enc is None:
            tenant_enc = tenants[tenant_id] = _field(tenant_id)
        message = b"".join((prev_mac.encode(), _field(seq), middle, tenant_enc,
                            _field(credential_id), tail))
        mac = hmac.digest(key, message, "sha256").hex()
        rows.append((seq, stored_ts, actor, tenant_id, credential_id, *fields, prev_mac, mac))
        prev_mac = mac
    return rows


def compute_mac(key: bytes, prev_mac: str, row: Mapping[str, object]) -> str:
    return hmac.digest(key, prev_mac.encode() + _canonical(row), "sha256").hex()


def fingerprint_reference(keys: AuditKeys, conn: Executor, reference: str) -> str:
    """A keyed, truncated fingerprint: equal references compare equal under one KEK version,
    and the reference itself cannot be recovered or brute-forced without the KEK."""
    _, key = keys.active(conn)
    return hmac.digest(key, b"ref\x00" + reference.encode(), "sha256").hex()[:32]


def with_locked_tail(query: Select[Any], dialect_name: str) -> Select[Any]:
    """``query`` plus the chain's tail as columns ``tail_seq`` and ``tail_mac``, read under the
    chain lock, so an access reads its row and the tail in one round trip.

    PostgreSQL joins ``cuscred_audit_locked_tail`` (lock, then a fresh-snapshot read); on SQLite
    the transaction's ``BEGIN IMMEDIATE`` already holds the lock, so plain subqueries suffice.
    The tail columns are NULL for an empty chain. A query that returns no row may not have
    taken the lock; such a caller writes nothing and must not call :meth:`AuditLog.append`
    with a tail.
    """
    if dialect_name == "postgresql":
        fn = func.cuscred_audit_locked_tail(
            literal(AUDIT_LOCK_ID, BigInteger())
        ).table_valued("seq", "mac")
        return query.add_columns(fn.c.seq.label("tail_seq"), fn.c.mac.label("tail_mac"))
    # One seek of the newest row, joined to the (at most one) row of ``query``; two scalar
    # subqueries would each read the tail again.
    last = select(_TABLE.c.seq, _TABLE.c.mac).order_by(_TABLE.c.seq.desc()).limit(1).subquery()
    return query.outerjoin(last, true()).add_columns(
        last.c.seq.label("tail_seq"), last.c.mac.label("tail_mac")
    )


def tail_of(row: Any) -> tuple[int, str]:
    """The (seq, mac) tail from a row of a :func:`with_locked_tail` query."""
    return (0, GENESIS_MAC) if row.tail_seq is None else (int(row.tail_seq), str(row.tail_mac))


_ARRAY_COLUMNS = (
    "seq", "actor", "tenant_id", "credential_id", "ref_fingerprint", "action", "outcome",
    "reason", "key_version", "prev_mac", "mac",
)
_PG_INSERT_MANY = """
INSERT INTO audit_events (ts, seq, actor, tenant_id, credential_id, ref_fingerprint, action,
                          outcome, reason, key_version, prev_mac, mac)
SELECT %(ts)s, * FROM unnest(
    %(seq)s::bigint[], %(actor)s::text[], %(tenant_id)s::text[], %(credential_id)s::text[],
    %(ref_fingerprint)s::text[], %(action)s::text[], %(outcome)s::text[], %(reason)s::text[],
    %(key_version)s::integer[], %(prev_mac)s::text[], %(mac)s::text[])
"""


_SQLITE_INSERT_MANY = (
    "INSERT INTO audit_events (seq, ts, actor, tenant_id, credential_id, ref_fingerprint, action,"
    " outcome, reason, key_version, prev_mac, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _insert(conn: Executor, rows: list[tuple[object, ...]]) -> None:
    """Insert rows built by :func:`_chain` in the caller's transaction.

    A batch (a chunk appends one event per re-encrypted row) bypasses Core's per-row parameter
    handling, which cost more than the inserts themselves (bench/reencrypt.py): PostgreSQL gets
    one ``INSERT … SELECT FROM unnest(arrays)``, as the chunk's own compare-and-swap does;
    SQLite the driver's ``executemany``. Their ``ts`` went through the column type's own bind
    processor (see :meth:`AuditLog.append`), so what is stored is identical to the Core path.
    """
    if len(rows) == 1 or not isinstance(conn, Connection):
        params = [dict(zip(_ROW_COLUMNS, row, strict=True)) for row in rows]
        conn.execute(_INSERT, params if len(params) > 1 else params[0])
    elif conn.dialect.name == "postgresql":
        columns = list(zip(*rows, strict=True))
        params_pg: dict[str, object] = {"ts": rows[0][1]}
        params_pg.update({name: list(columns[_ROW_COLUMNS.index(name)])
                          for name in _ARRAY_COLUMNS})
        conn.exec_driver_sql(_PG_INSERT_MANY, params_pg)
    else:
        conn.exec_driver_sql(_SQLITE_INSERT_MANY, rows)


def _refuse_key_shaped_actors(records: Iterable[AuditRecord]) -> None:
    """The last line before the trail: an actor is stored in clear and chained for good, so
    one shaped like a provider key (a secret in the wrong argument) is never written, whatever
    path it came by (callers validate it first: :func:`cuscred.validation.validate_actor`)."""
    for record in records:
        if key_shaped(record.actor):
            metrics.AUDIT_WRITE_FAILURES.inc()
            raise AuditWriteError("audit event not written: the actor has the shape of a "
                                  "provider API key")


class AuditLog:
    """Writes audit events inside the caller's transaction."""

    def __init__(self, keys: AuditKeys) -> None:
        self.keys = keys

    def append(
        self,
        conn: Executor,
        records: Iterable[AuditRecord],
        *,
        tail: tuple[int, str] | None = None,
    ) -> None:
        """Append ``records`` to the chain in the connection's open transaction.

        Must be the last write before commit (the chain lock is held until then). ``tail`` is
        the chain's (seq, mac) if the caller already read it under the lock in its own query
        (:func:`with_locked_tail`); otherwise it is read here.
        Raises :class:`AuditWriteError` if the events cannot be written; the caller's
        transaction must then be rolled back, so the access it records does not happen.
        """
        records = list(records)
        if records:
            _refuse_key_shaped_actors(records)
            self._write(conn, tail, len(records), lambda *chain_args: _chain(
                records, *chain_args))

    def append_uniform(
        self,
        conn: Executor,
        template: AuditRecord,
        subjects: Sequence[Subject],
        *,
        then: Sequence[AuditRecord] = (),
    ) -> None:
        """Append one event per ``(tenant_id, credential_id)`` of ``subjects``, each equal to
        ``template`` otherwise, then ``then``: a re-encryption chunk's events, one per row it
        moved and one per row that failed. Same contract as :meth:`append`; the rows are
        exactly what :meth:`append` would write for the same records."""
        if not subjects and not then:
            return
        _refuse_key_shaped_actors([template, *then])

        def chain(seq: int, prev_mac: str, key: bytes, version: int, ts: datetime,
                  stored_ts: object) -> list[tuple[object, ...]]:
            rows = _chain_uniform(template, subjects, seq, prev_mac, key, version, ts, stored_ts)
            if then:
                last_mac = str(rows[-1][-1]) if rows else prev_mac
                rows += _chain(list(then), seq + len(rows), last_mac, key, version, ts,
                               stored_ts)
            return rows

        self._write(conn, None, len(subjects) + len(then), chain)

    def _write(
        self, conn: Executor, tail: tuple[int, str] | None, count: int,
        chain: Callable[[int, str, bytes, int, datetime, object], list[tuple[object, ...]]],
    ) -> None:
        try:
            version, key = self.keys.active(conn)
            seq, prev_mac = tail if tail is not None else self._lock_tail(conn)
            ts = utcnow()
            stored_ts: object = ts
            if count > 1 and isinstance(conn, Connection):  # a batch: _insert's raw path
                stamp = _TABLE.c.ts.type.bind_processor(conn.dialect)
                stored_ts = stamp(ts) if stamp else ts
            _insert(conn, chain(seq, prev_mac, key, version, ts, stored_ts))
        except CuscredError as exc:
            metrics.AUDIT_WRITE_FAILURES.inc()
            raise AuditWriteError(f"audit event not written: {exc.code}") from exc
        except SQLAlchemyError as exc:
            metrics.AUDIT_WRITE_FAILURES.inc()
            raise AuditWriteError("audit event not written: database error") from exc

    @staticmethod
    def _lock_tail(conn: Executor) -> tuple[int, str]:
        if conn.dialect.name == "postgresql":
            # One round trip: the function takes the lock, then reads the tail with a fresh
            # snapshot (a single SELECT would read with a snapshot from before the lock wait).
            tail = conn.execute(_PG_LOCKED_TAIL, {"id": AUDIT_LOCK_ID}).first()
            if tail is None or tail.seq is None:
                return 0, GENESIS_MAC
        else:
            tail = conn.execute(_TAIL).first()  # SQLite: BEGIN IMMEDIATE holds the write lock
            if tail is None:
                return 0, GENESIS_MAC
        return int(tail.seq), str(tail.mac)


__all__ = [
    "GENESIS_MAC",
    "AuditKeys",
    "AuditLog",
    "AuditRecord",
    "Outcome",
    "compute_mac",
    "fingerprint_reference",
    "tail_of",
    "with_locked_tail",
]
