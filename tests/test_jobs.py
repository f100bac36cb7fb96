"""Re-encryption jobs, in-process, on SQLite and PostgreSQL: whole rotations, exact counts,
one audit event per re-encrypted row, skipped rows that changed under the job, undecryptable
rows recorded and left alone, duplicate deliveries, crashes, cancel/resume, one rotation only."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import pytest
from sqlalchemy import func, select, text, update

from cuscred.datagen import generate
from cuscred.db.models import (
    CREDENTIALS,
    ROTATION_CHUNKS,
    ROTATION_FAILURES,
    ROTATION_JOBS,
    utcnow,
)
from cuscred.errors import KeyStateError
from cuscred.factory import Runtime
from cuscred.jobs.chunks import ChunkProcessor
from cuscred.jobs.runner import InProcessRunner
from cuscred.jobs.service import RotationService
from cuscred.services.audit_verify import verify_chain
from cuscred.services.key_history import state_mismatches


def _seed(runtime: Runtime, n: int = 300, tenants: int = 20) -> dict[str, tuple[str, str]]:
    svc = runtime.credential_service()
    items = [(g.tenant_id, g.secret, {"provider": g.provider}) for g in generate(n, tenants)]
    refs = svc.import_credentials(items, batch_size=128)
    return {ref: (tenant, secret) for ref, (tenant, secret, _) in zip(refs, items, strict=True)}


def _settings(runtime: Runtime, **changes: object) -> Runtime:
    return Runtime(runtime.settings.model_copy(update=changes), runtime.engine, runtime.sessions,
                   runtime.keys, runtime.audit, runtime.vault_kv)


def _job(runtime: Runtime, job_id: int):  # type: ignore[no-untyped-def]
    with runtime.engine.connect() as conn:
        return conn.execute(select(ROTATION_JOBS).where(ROTATION_JOBS.c.id == job_id)).one()


def _scalar(runtime: Runtime, query: str) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.execute(text(query)).scalar_one())


def _all_resolve(runtime: Runtime, data: dict[str, tuple[str, str]]) -> None:
    svc = runtime.credential_service()
    for ref, (tenant, secret) in data.items():
        provider = svc.describe_credential(tenant, ref).context
        assert svc.resolve_credential(tenant, ref, provider) == secret


def test_kek_rotation_moves_every_row(runtime: Runtime) -> None:
    data = _seed(runtime)
    small = _settings(runtime, chunk_size=37)
    audit_before = _scalar(runtime, "SELECT COUNT(*) FROM audit_events")
    job_id, created = small.rotation().rotate_kek(requested_by="test")
    assert created
    job = _job(runtime, job_id)
    assert (job.status, job.target_kek_version) == ("completed", 2)
    assert (job.total, job.done, job.skipped, job.failed) == (300, 300, 0, 0)
    assert json.loads(job.census_json) == [[2, 1, 300]]  # recorded as the job completed
    assert _scalar(runtime, f"SELECT COUNT(*) FROM rotation_chunks WHERE job_id={job_id}") == 9
    assert _scalar(runtime, "SELECT COUNT(*) FROM credentials WHERE kek_version <> 2") == 0
    reencrypt_events = _scalar(
        runtime, "SELECT COUNT(*) FROM audit_events WHERE action='reencrypt' AND "
                 "outcome='success'")
    assert reencrypt_events == 300
    assert _scalar(runtime, "SELECT COUNT(*) FROM audit_events") > audit_before + 300
    _all_resolve(runtime, data)
    runtime.key_admin().retire(1)
    _all_resolve(runtime, data)
    with runtime.engine.connect() as conn:
        assert verify_chain(conn, runtime.audit.keys).ok


def test_second_rotation_while_one_is_in_flight_is_the_same_job(runtime: Runtime) -> None:
    _seed(runtime, 20, 4)
    svc = RotationService(runtime.engine, runtime.keys, runtime.audit, runtime.settings,
                          _Recorder())
    first = svc.rotate_kek(requested_by="beat-1")
    second = svc.rotate_kek(requested_by="beat-2")
    assert first[1] and not second[1] and first[0] == second[0]
    assert _scalar(runtime, "SELECT COUNT(*) FROM rotation_jobs") == 1


class _Recorder:
    """A runner that only records what would be enqueued."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def advance_rotation(self, job_id: int) -> None:
        self.calls.append(("advance", job_id))

    def start(self, job_id: int) -> None:
        self.calls.append(("start", job_id))

    def chunk(self, job_id: int, chunk_no: int) -> None:
        self.calls.append(("chunk", job_id, chunk_no))

    def finalize(self, job_id: int) -> None:
        self.calls.append(("finalize", job_id))


def _stepwise(runtime: Runtime, chunk_size: int = 50) -> tuple[RotationService, _Recorder, int]:
    recorder = _Recorder()
    svc = RotationService(runtime.engine, runtime.keys, runtime.audit,
                          runtime.settings.model_copy(update={"chunk_size": chunk_size}),
                          recorder)
    job_id, _ = svc.rotate_kek(requested_by="test")
    svc.advance_rotation(job_id)
    svc.start_reencryption(job_id)
    return svc, recorder, job_id


def test_duplicate_delivery_changes_nothing(runtime: Runtime) -> None:
    _seed(runtime, 120, 6)
    svc, recorder, job_id = _stepwise(runtime)
    chunks = [c for c in recorder.calls if c[0] == "chunk"]
    first = svc.reencrypt_chunk(job_id, 1)
    assert first.status == "done" and first.done == 50
    snapshot = _scalar(runtime, "SELECT COUNT(*) FROM audit_events")
    again = svc.reencrypt_chunk(job_id, 1)
    assert again.status == "not_claimed"
    assert _scalar(runtime, "SELECT COUNT(*) FROM audit_events") == snapshot
    for call in chunks[1:]:
        svc.reencrypt_chunk(job_id, call[2])  # type: ignore[arg-type]
    svc.finalize_job(job_id)
    svc.finalize_job(job_id)
    job = _job(runtime, job_id)
    assert (job.status, job.total, job.done, job.skipped, job.failed) == (
        "completed", 120, 120, 0, 0)


def test_row_changed_by_the_application_mid_chunk_keeps_its_new_value(runtime: Runtime) -> None:
    data = _seed(runtime, 40, 4)
    svc, _, job_id = _stepwise(runtime, chunk_size=100)
    victim_ref, (tenant, _) = next(iter(data.items()))
    app = runtime.credential_service()
    new_value = "sk-proj-" + "N3w" * 40

    def rotate_meanwhile(pks: Sequence[int]) -> None:
        # The application rotates the secret between the chunk's read and its write. On
        # PostgreSQL it commits from another connection right now; on SQLite (one writer at a
        # time) it has to wait, so it runs in a thread and commits after the chunk.
        worker = threading.Thread(target=app.rotate_credential,
                                  args=(tenant, victim_ref, new_value))
        worker.start()
        if runtime.engine.dialect.name == "postgresql":
            worker.join()
        else:
            threads.append(worker)

    threads: list[threading.Thread] = []
    processor = ChunkProcessor(runtime.engine, runtime.keys, runtime.audit, svc.settings,
                               between_read_and_write=rotate_meanwhile)
    outcome = processor.process(job_id, 1)
    for t in threads:
        t.join()
    context = app.describe_credential(tenant, victim_ref).context
    assert app.resolve_credential(tenant, victim_ref, context) == new_value
    assert outcome.done + outcome.skipped + outcome.failed == outcome.total == 40
    if runtime.engine.dialect.name == "postgresql":
        assert outcome.skipped == 1


def test_undecryptable_row_is_recorded_and_left_untouched(runtime: Runtime) -> None:
    data = _seed(runtime, 60, 5)
    bad_ref = next(iter(data))
    bad_id = bad_ref.removeprefix("encrypted://")
    with runtime.engine.begin() as conn:
        blob = conn.execute(select(CREDENTIALS.c.ciphertext).where(
            CREDENTIALS.c.credential_id == bad_id)).scalar_one()
        tampered = bytes(blob[:-1]) + bytes([blob[-1] ^ 1])
        conn.execute(update(CREDENTIALS).where(CREDENTIALS.c.credential_id == bad_id)
                     .values(ciphertext=tampered))
    job_id, _ = _settings(runtime, chunk_size=25).rotation().rotate_kek(requested_by="t")
    job = _job(runtime, job_id)
    assert (job.status, job.total, job.done, job.failed) == ("completed_with_errors", 60, 59, 1)
    with runtime.engine.connect() as conn:
        failure = conn.execute(select(ROTATION_FAILURES)).one()
        still = conn.execute(select(CREDENTIALS.c.ciphertext, CREDENTIALS.c.kek_version).where(
            CREDENTIALS.c.credential_id == bad_id)).one()
    assert (failure.credential_id, failure.reason) == (bad_id, "decrypt_failed")
    assert (bytes(still.ciphertext), still.kek_version) == (tampered, 1)


def test_crashed_chunk_is_swept_and_completes(runtime: Runtime) -> None:
    _seed(runtime, 80, 4)
    fast = runtime.settings.model_copy(update={
        "chunk_size": 40, "chunk_lease_s": 2, "chunk_time_limit_s": 2,
        "chunk_soft_time_limit_s": 1})
    recorder = _Recorder()
    svc = RotationService(runtime.engine, runtime.keys, runtime.audit, fast, recorder)
    job_id, _ = svc.rotate_kek(requested_by="t")
    svc.advance_rotation(job_id)
    svc.start_reencryption(job_id)
    # A worker claims chunk 1 and dies before its work transaction commits.
    assert svc.chunks.claim(job_id, 1) is not None
    assert svc.reencrypt_chunk(job_id, 1).status == "not_claimed"  # leased to the dead one
    with runtime.engine.begin() as conn:  # let the lease run out
        conn.execute(update(ROTATION_CHUNKS).values(lease_until=utcnow()))
    from cuscred.jobs.control import JobControl

    report = JobControl(svc).sweep()
    assert (job_id, 1) in report.requeued_chunks
    for chunk_no in (1, 2):
        svc.reencrypt_chunk(job_id, chunk_no)
    svc.finalize_job(job_id)
    job = _job(runtime, job_id)
    assert (job.status, job.done) == ("completed", 80)
    with runtime.engine.connect() as conn:
        crashes = conn.execute(select(ROTATION_CHUNKS.c.crashes).where(
            ROTATION_CHUNKS.c.chunk_no == 1)).scalar_one()
    assert crashes == 1


def test_cancel_and_resume(runtime: Runtime) -> None:
    _seed(runtime, 100, 5)
    svc, _, job_id = _stepwise(runtime, chunk_size=25)
    from cuscred.jobs.control import JobControl

    control = JobControl(svc)
    svc.reencrypt_chunk(job_id, 1)
    assert control.cancel(job_id, actor="op") == "cancelled"
    assert svc.reencrypt_chunk(job_id, 2).status == "not_claimed"
    with runtime.engine.connect() as conn:
        statuses = conn.execute(select(ROTATION_CHUNKS.c.status).order_by(
            ROTATION_CHUNKS.c.chunk_no)).scalars().all()
    assert statuses == ["done", "cancelled", "cancelled", "cancelled"]
    runner = InProcessRunner()
    svc.runner = runner
    runner.bind(svc)
    assert control.resume(job_id, actor="op") == "running"
    job = _job(runtime, job_id)
    assert (job.status, job.total, job.done) == ("completed", 100, 100)


def test_tenant_rekey_moves_only_that_tenant(runtime: Runtime) -> None:
    data = _seed(runtime, 200, 10)
    tenant = next(iter(data.values()))[0]
    mine = sum(1 for t, _ in data.values() if t == tenant)
    job_id = _settings(runtime, chunk_size=16).rotation().rekey_tenant(tenant, requested_by="t")
    job = _job(runtime, job_id)
    assert (job.status, job.done, job.target_generation) == ("completed", mine, 2)
    with runtime.engine.connect() as conn:
        gens = dict(conn.execute(select(CREDENTIALS.c.tenant_id, func.max(
            CREDENTIALS.c.key_generation)).group_by(CREDENTIALS.c.tenant_id)).all())
    assert gens[tenant] == 2
    assert all(g == 1 for t, g in gens.items() if t != tenant)
    _all_resolve(runtime, data)


def test_nothing_to_do_completes_at_once(runtime: Runtime) -> None:
    _seed(runtime, 10, 2)
    job_id = runtime.rotation().reencrypt(requested_by="t")
    job = _job(runtime, job_id)
    assert (job.status, job.total) == ("completed", 0)
    assert json.loads(job.census_json) == [[1, 1, 10]]
    assert _scalar(runtime, "SELECT COUNT(*) FROM audit_events WHERE action='job_finished'") == 1


def test_resume_gives_a_chunk_that_ran_out_of_attempts_a_fresh_budget(runtime: Runtime) -> None:
    """A chunk given up after ``chunk_max_attempts`` claims (say, Vault down for hours) must run
    when an operator resumes the job, not be given up again on its first claim."""
    _seed(runtime, 60, 3)
    svc, _, job_id = _stepwise(runtime, chunk_size=30)
    from cuscred.jobs.control import JobControl

    svc.reencrypt_chunk(job_id, 1)
    # Chunk 2 used up its attempts on retryable errors (each claim counts one).
    with runtime.engine.begin() as conn:
        conn.execute(update(ROTATION_CHUNKS).where(ROTATION_CHUNKS.c.chunk_no == 2).values(
            attempts=runtime.settings.chunk_max_attempts))
    assert svc.reencrypt_chunk(job_id, 2).status == "not_claimed"  # given up
    svc.finalize_job(job_id)
    job = _job(runtime, job_id)
    assert (job.status, job.done, job.failed) == ("completed_with_errors", 30, 30)

    runner = InProcessRunner()
    svc.runner = runner
    runner.bind(svc)
    assert JobControl(svc).resume(job_id, actor="op") == "running"
    job = _job(runtime, job_id)
    assert (job.status, job.total, job.done, job.skipped, job.failed) == (
        "completed", 60, 60, 0, 0)


def _kek_states(runtime: Runtime) -> dict[int, str]:
    with runtime.engine.connect() as conn:
        return {int(v): str(s) for v, s in conn.execute(
            text("SELECT version, state FROM kek_versions ORDER BY version")).all()}


def test_auto_retire_retires_the_old_version_only_when_its_census_is_zero(
    runtime: Runtime,
) -> None:
    _seed(runtime, 80, 6)
    auto = _settings(runtime, chunk_size=30, auto_retire=True)
    job_id, _ = auto.rotation().rotate_kek(requested_by="t")
    assert _job(runtime, job_id).status == "completed"
    assert _kek_states(runtime) == {1: "retired", 2: "active"}

    # A row that will not decrypt stays on v2: the next rotation ends with errors, and v2,
    # which the census still counts, is not retired.
    with runtime.engine.begin() as conn:
        blob = conn.execute(select(CREDENTIALS.c.ciphertext).limit(1)).scalar_one()
        conn.execute(update(CREDENTIALS).where(CREDENTIALS.c.ciphertext == blob)
                     .values(ciphertext=bytes(blob[:-1]) + bytes([blob[-1] ^ 1])))
    job_id, _ = auto.rotation().rotate_kek(requested_by="t")
    assert _job(runtime, job_id).status == "completed_with_errors"
    assert _kek_states(runtime) == {1: "retired", 2: "decrypt_only", 3: "active"}


def test_without_auto_retire_a_finished_rotation_retires_nothing(runtime: Runtime) -> None:
    _seed(runtime, 40, 4)
    job_id, _ = runtime.rotation().rotate_kek(requested_by="t")
    assert _job(runtime, job_id).status == "completed"
    assert _kek_states(runtime) == {1: "decrypt_only", 2: "active"}


def test_rotation_adopts_a_version_an_operator_already_wrote(runtime: Runtime) -> None:
    data = _seed(runtime, 40, 4)
    written = runtime.keys.source.add_version()  # e.g. `vault kv put` by hand, not recorded
    assert written == 2 and _kek_states(runtime) == {1: "active"}
    job_id, _ = runtime.rotation().rotate_kek(requested_by="t")
    job = _job(runtime, job_id)
    assert (job.status, job.target_kek_version, job.done) == ("completed", 2, 40)
    assert runtime.keys.source.latest_version() == 2  # adopted, no third version written
    assert _kek_states(runtime) == {1: "decrypt_only", 2: "active"}
    _all_resolve(runtime, data)
    with runtime.engine.connect() as conn:  # the adoption is on the record, and replays
        assert state_mismatches(conn) == []
        assert conn.execute(text("SELECT count(*) FROM audit_events WHERE action = 'kek_state' "
                                 "AND reason = 'v2:adopt'")).scalar_one() == 1


def test_rotation_never_reuses_a_version_staged_earlier(runtime: Runtime) -> None:
    """A `keys create` left `decrypt_only` (perhaps long ago, perhaps copied since) is not
    what a rotation moves rows onto: it writes a fresh version."""
    data = _seed(runtime, 30, 3)
    staged = runtime.key_admin().create_version()
    assert staged == 2 and _kek_states(runtime) == {1: "active", 2: "decrypt_only"}
    job_id, _ = runtime.rotation().rotate_kek(requested_by="t")
    job = _job(runtime, job_id)
    assert (job.status, job.target_kek_version, job.done) == ("completed", 3, 30)
    assert _kek_states(runtime) == {1: "decrypt_only", 2: "decrypt_only", 3: "active"}
    runtime.key_admin().retire(2)  # never used by a row
    _all_resolve(runtime, data)
    with runtime.engine.connect() as conn:
        assert state_mismatches(conn) == []
        reasons = list(conn.execute(text(
            "SELECT reason FROM audit_events WHERE action = 'kek_state' ORDER BY seq")).scalars())
    assert "v3:register" in reasons


def test_a_refused_rotation_fails_its_job_instead_of_blocking_the_next(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Step 1 refused for good (here: the KEK source would discard a version): the job is
    failed with the reason, not left pending as a rotation "in flight" that nothing advances;
    the next `kek rotate`, once the cause is fixed, starts a new job and completes."""
    data = _seed(runtime, 30, 3)

    def refuse() -> int:
        raise KeyStateError("the KEK secret keeps at most 3 versions (test)")

    monkeypatch.setattr(runtime.keys.source, "add_version", refuse)
    with pytest.raises(KeyStateError):
        runtime.rotation().rotate_kek(requested_by="t")
    failed = _job(runtime, _scalar(runtime, "SELECT max(id) FROM rotation_jobs"))
    assert failed.status == "failed" and "key_state" in failed.last_error
    monkeypatch.undo()
    job_id, created = runtime.rotation().rotate_kek(requested_by="t")
    assert created and job_id > failed.id
    assert (_job(runtime, job_id).status, _job(runtime, job_id).target_kek_version) == (
        "completed", 2)
    _all_resolve(runtime, data)
