"""Rows damaged outside cuscred, in ways only SQLite allows: a column edited into TEXT that is
not UTF-8 (``||`` turns even a blob into TEXT). Each damaged row is refused as damaged, on its
own: a resolve raises ``DecryptionError``, a job records the row as failed and moves the rest,
``verify`` names it. Before, the driver failed the whole read with an ``OperationalError``,
which looked like an outage: the job stopped and retried for ever, ``verify`` named nothing.

(PostgreSQL stores ``bytea`` and checks UTF-8 on every write, so these values cannot exist
there, and the test is skipped on it.)"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from typing import Any

import pytest
from sqlalchemy import text

from cuscred.errors import DecryptionError
from cuscred.factory import Runtime
from tests.worker_fixtures import Seeded, seed

# Text that is not UTF-8: a lone continuation byte and an overlong NUL.
_NOT_UTF8 = "X'80C0'"


def _damage(runtime: Runtime, data: Seeded) -> tuple[str, str]:
    ids = sorted(data.rows)
    bad_ciphertext, bad_context = ids[3], ids[7]
    with runtime.engine.begin() as conn:
        conn.execute(text(
            "UPDATE credentials SET ciphertext = CAST(substr(ciphertext, 1, 30) || "
            f"{_NOT_UTF8} || substr(ciphertext, 31) AS TEXT) WHERE credential_id = :c"),
            {"c": bad_ciphertext})
        conn.execute(text(
            f"UPDATE credentials SET context_json = CAST({_NOT_UTF8} AS TEXT) "
            "WHERE credential_id = :c"), {"c": bad_context})
        kinds = dict(conn.execute(text(
            "SELECT credential_id, typeof(ciphertext) || '/' || typeof(context_json) "
            "FROM credentials WHERE credential_id IN (:a, :b)"),
            {"a": bad_ciphertext, "b": bad_context}).all())
    assert kinds == {bad_ciphertext: "text/text", bad_context: "blob/text"}
    return bad_ciphertext, bad_context


def _job_and_failures(runtime: Runtime, job_id: int) -> tuple[Any, dict[str, str]]:
    """The job's row, and its recorded failures: credential id -> reason."""
    with runtime.engine.connect() as conn:
        job = conn.execute(text("SELECT status, total, done, failed, census_json FROM "
                                "rotation_jobs WHERE id = :j"), {"j": job_id}).one()
        failures = dict(conn.execute(text(
            "SELECT credential_id, reason FROM rotation_failures WHERE job_id = :j"),
            {"j": job_id}).all())
    return job, failures


@pytest.fixture
def sqlite_runtime(runtime: Runtime) -> Runtime:
    if runtime.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL refuses such values on write (bytea, UTF-8 text)")
    return runtime


def test_a_non_utf8_text_value_is_a_damaged_row_not_an_outage(sqlite_runtime: Runtime) -> None:
    runtime = sqlite_runtime
    data = seed(runtime, 120, 6)
    damaged = _damage(runtime, data)
    svc = runtime.credential_service()
    bad_ciphertext, bad_context = damaged
    tenant, _, context = data.rows[bad_ciphertext]
    with pytest.raises(DecryptionError):
        svc.resolve_credential(tenant, f"encrypted://{bad_ciphertext}", context)
    # A resolve authenticates with the caller's context, not the stored copy: still correct.
    # A job needs the stored copy to re-encrypt, so it will record the row as failed.
    tenant, plaintext, context = data.rows[bad_context]
    assert svc.resolve_credential(tenant, f"encrypted://{bad_context}", context) == plaintext

    job_id, _ = runtime.rotation().rotate_kek(requested_by="test")
    job, failures = _job_and_failures(runtime, job_id)
    assert (job.status, job.total, job.done, job.failed) == ("completed_with_errors", 120, 118, 2)
    assert failures == {cid: "decrypt_failed" for cid in damaged}
    assert json.loads(job.census_json) == [[1, 1, 2], [2, 1, 118]]

    report = runtime.job_control().verify(actor="test")
    assert report.checked == 120 and sorted(cid for cid, _ in report.failures) == sorted(damaged)
    with runtime.engine.connect() as conn:
        on_v2 = {cid for (cid,) in conn.execute(text(
            "SELECT credential_id FROM credentials WHERE kek_version = 2")).all()}
    assert on_v2 == set(data.rows) - set(damaged)
    for cid in on_v2:
        tenant, plaintext, context = data.rows[cid]
        assert svc.resolve_credential(tenant, f"encrypted://{cid}", context) == plaintext


def test_damaged_ids_are_failed_rows_and_printed_escaped(sqlite_runtime: Runtime) -> None:
    """A credential id or tenant id edited into non-UTF-8 TEXT, or into terminal escape
    sequences: the job records those rows as failed (under an escaped id) and ends
    ``completed_with_errors``; verify and the listing show escapes, never the raw bytes."""
    runtime = sqlite_runtime
    data = seed(runtime, 90, 3)
    ids = sorted(data.rows)
    with runtime.engine.begin() as conn:
        conn.execute(text(f"UPDATE credentials SET credential_id = CAST({_NOT_UTF8} AS TEXT) "
                          "WHERE credential_id = :c"), {"c": ids[1]})
        conn.execute(text("UPDATE credentials SET credential_id = 'cred_' || char(27) || "
                          "'[2J' || char(7) WHERE credential_id = :c"), {"c": ids[3]})
    # As the sqlite3 shell does it: foreign keys are not enforced there by default.
    with contextlib.closing(sqlite3.connect(str(runtime.engine.url.database))) as raw:
        raw.execute(f"UPDATE credentials SET tenant_id = CAST({_NOT_UTF8} AS TEXT) "
                    "WHERE credential_id = ?", (ids[2],))
        raw.commit()
    job_id, _ = runtime.rotation().rotate_kek(requested_by="test")
    job, failures = _job_and_failures(runtime, job_id)
    failed = sorted(failures)
    with runtime.engine.connect() as conn:
        events = conn.execute(text(
            "SELECT count(*) FROM audit_events WHERE action = 'reencrypt' AND outcome = "
            "'failure' AND reason LIKE :r"), {"r": f"job={job_id} %"}).scalar_one()
    assert (job.status, job.total, job.done, job.failed) == ("completed_with_errors", 90, 87, 3)
    assert failed == sorted([r"\udc80\udcc0", ids[2], r"cred_\x1b[2J\x07"]) and events == 3
    report = runtime.job_control().verify(actor="test")
    assert sorted(cid for cid, _ in report.failures) == failed
    listed = [i.reference for t in ("tenant-00000", "tenant-00001", "tenant-00002")
              for i in runtime.credential_service().list_credentials(t)]
    assert r"encrypted://cred_\x1b[2J\x07" in listed
    assert all(ref.isprintable() for ref in listed)
