"""The audit chain: verify passes on an honest table and names the first edited, inserted or
deleted row; concurrent writers never fork the chain. SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import delete, insert, select, update

from cuscred.db.models import AuditEvent
from cuscred.factory import Runtime
from cuscred.services.audit_verify import verify_chain


def _fill(runtime: Runtime, n: int = 6) -> list[str]:
    svc = runtime.credential_service()
    refs = [svc.encrypt_credential("tenant-a", f"sk-proj-{i:02d}" + "z" * 50) for i in range(n)]
    for ref in refs:
        svc.resolve_credential("tenant-a", ref)
    return refs


def _verify(runtime: Runtime):  # type: ignore[no-untyped-def]
    with runtime.engine.connect() as conn:
        return verify_chain(conn, runtime.audit.keys)


def test_honest_chain_verifies(runtime: Runtime) -> None:
    _fill(runtime)
    report = _verify(runtime)
    assert report.ok and report.rows_checked == 12 and report.head_seq == 12


def test_edit_is_found(runtime: Runtime) -> None:
    _fill(runtime)
    with runtime.sessions.begin() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 5).values(actor="mallory"))
    report = _verify(runtime)
    assert (report.ok, report.problem, report.problem_seq) == (False, "edited", 5)
    assert report.rows_checked == 4


def test_outcome_flip_is_found(runtime: Runtime) -> None:
    _fill(runtime)
    with runtime.sessions.begin() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 12).values(outcome="denied"))
    report = _verify(runtime)
    assert (report.problem, report.problem_seq) == ("edited", 12)


def test_deletion_is_found(runtime: Runtime) -> None:
    _fill(runtime)
    with runtime.sessions.begin() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq == 7))
    report = _verify(runtime)
    assert (report.problem, report.problem_seq) == ("deleted", 7)


def test_deletion_with_renumbering_is_found(runtime: Runtime) -> None:
    _fill(runtime)
    with runtime.sessions.begin() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq == 7))
        for seq in range(8, 13):
            s.execute(update(AuditEvent).where(AuditEvent.seq == seq).values(seq=seq - 1))
    report = _verify(runtime)
    assert (report.problem, report.problem_seq) == ("deleted", 7)


def test_insertion_is_found(runtime: Runtime) -> None:
    _fill(runtime)
    with runtime.sessions.begin() as s:
        rows = s.execute(select(AuditEvent.__table__).order_by(AuditEvent.seq.desc())).all()
        for row in rows:  # make room after seq 3, then forge a row that links to seq 3
            if row.seq > 3:
                s.execute(update(AuditEvent).where(AuditEvent.seq == row.seq)
                          .values(seq=row.seq + 1))
        third = next(r for r in rows if r.seq == 3)
        forged = dict(third._mapping, seq=4, action="resolve", prev_mac=third.mac, mac="f" * 64)
        s.execute(insert(AuditEvent), [forged])
    report = _verify(runtime)
    assert (report.problem, report.problem_seq) == ("inserted", 4)


def test_concurrent_writers_do_not_fork_the_chain(runtime: Runtime) -> None:
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", "sk-proj-" + "c" * 60)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(15):
                svc.resolve_credential("tenant-a", ref)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = _verify(runtime)
    assert report.ok and report.rows_checked == 61


@pytest.mark.parametrize("column", ["tenant_id", "credential_id", "reason", "key_version"])
def test_any_column_edit_is_found(runtime: Runtime, column: str) -> None:
    _fill(runtime, 2)
    value = 99 if column == "key_version" else "x"
    with runtime.sessions.begin() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 2).values({column: value}))
    report = _verify(runtime)
    assert not report.ok and report.problem_seq == 2


def test_batch_chain_matches_the_verified_definition() -> None:
    """The batch builder (one pass, shared encodings) must produce exactly the MAC that
    ``verify`` recomputes from each stored row: None vs "", repeated and unique strings."""
    from datetime import UTC, datetime

    from cuscred.services.audit import (
        _ROW_COLUMNS,
        GENESIS_MAC,
        AuditRecord,
        _chain,
        compute_mac,
    )

    key = bytes(range(32))
    ts = datetime(2026, 12, 4, 10, 11, 12, 345678, tzinfo=UTC)
    records = [
        AuditRecord(action="reencrypt", outcome="success", actor="w", tenant_id="t-1",
                    credential_id=f"cred_{i}", reason="job=1")
        for i in range(3)
    ] + [
        AuditRecord(action="resolve", outcome="denied", actor="w", tenant_id=None,
                    ref_fingerprint="ab" * 16, reason=""),
        AuditRecord(action="verify", outcome="failure", actor="a" * 200, tenant_id="t-1"),
    ]
    rows = _chain(records, 41, GENESIS_MAC, key, 3, ts, "stored")
    prev = GENESIS_MAC
    for seq, row in enumerate(rows, start=42):
        as_dict = dict(zip(_ROW_COLUMNS, row, strict=True))
        assert as_dict["seq"] == seq and as_dict["prev_mac"] == prev
        assert as_dict["ts"] == "stored"
        assert as_dict["mac"] == compute_mac(key, prev, {**as_dict, "ts": ts})
        prev = as_dict["mac"]
    assert rows[-1][2] == "a" * 128  # actor is cut to the column's width before the MAC


def test_uniform_batch_matches_the_verified_definition() -> None:
    """A chunk's events (equal but for tenant and credential) chain to the same MACs as the
    general builder, and so as ``verify`` recomputes them."""
    from datetime import UTC, datetime

    from cuscred.services.audit import (
        _ROW_COLUMNS,
        GENESIS_MAC,
        AuditRecord,
        _chain,
        _chain_uniform,
        compute_mac,
    )

    key = bytes(range(32, 64))
    ts = datetime(2026, 12, 4, 1, 2, 3, 4, tzinfo=UTC)
    template = AuditRecord(action="reencrypt", outcome="success", actor="rotation-worker",
                           reason="job=7")
    subjects = [("t-1", "cred_a"), ("t-2", "cred_b"), ("t-1", "cred_c"), (None, "cred_d")]
    uniform = _chain_uniform(template, subjects, 9, GENESIS_MAC, key, 2, ts, ts)
    general = _chain([AuditRecord(action="reencrypt", outcome="success", actor="rotation-worker",
                                  reason="job=7", tenant_id=t, credential_id=c)
                      for t, c in subjects], 9, GENESIS_MAC, key, 2, ts, ts)
    assert uniform == general
    prev = GENESIS_MAC
    for row in uniform:
        as_dict = dict(zip(_ROW_COLUMNS, row, strict=True))
        assert as_dict["mac"] == compute_mac(key, prev, as_dict)
        prev = as_dict["mac"]


def test_uniform_append_then_failures_verifies(runtime: Runtime) -> None:
    from cuscred.services.audit import AuditRecord

    _fill(runtime, 2)
    template = AuditRecord(action="reencrypt", outcome="success", actor="w", reason="job=1")
    with runtime.engine.begin() as conn:
        runtime.audit.append_uniform(
            conn, template, [("tenant-a", f"cred_{i}") for i in range(5)],
            then=[AuditRecord(action="reencrypt", outcome="failure", actor="w",
                              tenant_id="tenant-a", credential_id="cred_x",
                              reason="job=1 decrypt_failed")])
    report = _verify(runtime)
    assert report.ok and report.rows_checked == 4 + 6
    with runtime.engine.connect() as conn:
        outcomes = conn.execute(select(AuditEvent.outcome).where(
            AuditEvent.action == "reencrypt").order_by(AuditEvent.seq)).scalars().all()
    assert outcomes == ["success"] * 5 + ["failure"]
