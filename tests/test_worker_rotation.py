"""The rotation worker as it runs in production: ``celery -A worker worker`` processes, a real
Redis broker, SQLite and PostgreSQL, and (for the KEK) a real OpenBao server."""

from __future__ import annotations

import uuid

import hvac

from cuscred.jobs.celery_runner import TASK_CHUNK
from cuscred.services.audit_verify import verify_chain
from tests.vault_server import OpenBaoServer
from tests.worker_fixtures import (
    Stack,
    assert_no_secrets,
    assert_rows_readable,
    kek_materials,
    reencrypt_events,
    seed,
    wait_for,
)

_DONE = r"chunk job=\d+ chunk=\d+ status=done "
_NOT_CLAIMED = r"chunk job=\d+ chunk=\d+ status=not_claimed "


def test_kek_rotation_of_10k_credentials_by_two_worker_processes(stack: Stack) -> None:
    stack.env["CUSCRED_CHUNK_SIZE"] = "1000"
    runtime = stack.runtime()
    data = seed(runtime, 10_000, 300)
    assert len({t for t, _, _ in data.rows.values()}) == 300
    workers = stack.workers(2)

    job_id, created = runtime.rotation().rotate_kek(requested_by="test")
    assert created
    job = stack.wait_job(job_id, timeout=120)

    assert (job.status, job.target_kek_version) == ("completed", 2)
    assert (job.total, job.done, job.skipped, job.failed) == (10_000, 10_000, 0, 0)
    chunks = stack.chunks(job_id)
    assert {c.status for c in chunks} == {"done"} and len(chunks) == 10
    assert sum(c.done for c in chunks) == 10_000
    # A chunk logs its line after its commit, so the job can complete before the last line
    # is written: wait for the lines, then count them.
    wait_for(lambda: sum(w.count(_DONE) for w in workers) >= 10, timeout=30,
             what="10 chunk lines", details=stack.tails)
    for worker in workers:  # both processes took part
        assert worker.count(_DONE) >= 1, worker.tail()
    assert sum(w.count(_DONE) for w in workers) == 10

    # Exactly one audit event per re-encrypted row, and the chain still verifies.
    events = reencrypt_events(runtime, job_id)
    assert set(events) == set(data.rows) and set(events.values()) == {1}
    with runtime.engine.connect() as conn:
        assert verify_chain(conn, runtime.audit.keys).ok

    # None is left on the old version (retiring it is refused otherwise), and every row
    # decrypts to its original value under the new one, through the public API as well.
    runtime.key_admin().retire(1)
    assert_rows_readable(runtime, data, kek_version=2)
    service = runtime.credential_service()
    for cid, (tenant, plaintext, context) in list(data.rows.items())[:100]:
        assert service.resolve_credential(tenant, f"encrypted://{cid}", context) == plaintext
    assert_no_secrets(stack.logs(), data.plaintexts, kek_materials(runtime, [1, 2]))


def test_same_chunk_delivered_twice_changes_nothing(stack: Stack) -> None:
    runtime = stack.runtime()
    data = seed(runtime, 600, 20)
    # Steps 1-2 and planning here; the chunk tasks go to the broker by hand, each one twice.
    service = stack.runtime().rotation(_Recorder())
    job_id, _ = service.rotate_kek(requested_by="test")
    service.advance_rotation(job_id)
    chunk_nos = service.start_reencryption(job_id)
    assert len(chunk_nos) == 6
    worker = stack.worker(concurrency=2)
    runner = stack.runner()
    for chunk_no in chunk_nos:
        runner.chunk(job_id, chunk_no)
        runner.chunk(job_id, chunk_no)
    job = stack.wait_job(job_id)
    worker.wait_for_log(_NOT_CLAIMED, count=6)
    worker.wait_for_log(_DONE, count=6)  # logged after the commit: may trail the job row

    # Of each pair one delivery did the work and the other found it done or leased.
    assert (worker.count(_DONE), worker.count(_NOT_CLAIMED)) == (6, 6)
    assert (job.status, job.total, job.done, job.skipped, job.failed) == (
        "completed", 600, 600, 0, 0)
    assert set(reencrypt_events(runtime, job_id).values()) == {1}

    # A third delivery after the job finished: nothing changes anywhere.
    before = _snapshot(stack, job_id)
    stack.runner().chunk(job_id, chunk_nos[0])
    worker.wait_for_log(_NOT_CLAIMED, count=7)
    worker.wait_for_log(rf"Task {TASK_CHUNK}\[[^\]]+\] succeeded", count=13)
    assert _snapshot(stack, job_id) == before
    assert_rows_readable(runtime, data, kek_version=2)


def _snapshot(stack: Stack, job_id: int) -> tuple[object, ...]:
    return (
        tuple(stack.job(job_id)), tuple(tuple(c) for c in stack.chunks(job_id)),
        stack.scalar("SELECT COUNT(*) FROM audit_events"),
        stack.scalar("SELECT COUNT(*) FROM credentials WHERE kek_version = 2"),
    )


class _Recorder:
    """A runner that enqueues nothing (the test sends the tasks itself)."""

    def advance_rotation(self, job_id: int) -> None:
        pass

    def start(self, job_id: int) -> None:
        pass

    def chunk(self, job_id: int, chunk_no: int) -> None:
        pass

    def finalize(self, job_id: int) -> None:
        pass


def test_kek_is_fetched_from_vault_once_per_task_at_most(
    stack: Stack, openbao: OpenBaoServer
) -> None:
    """Count the KV reads of the KEK's path in OpenBao's file audit log: the workers log in
    with a token of their own, so their reads are told apart from the test's."""
    kek_path = f"tests/worker-kek/{uuid.uuid4().hex[:12]}"
    root = hvac.Client(url=openbao.addr, token=openbao.token)
    display = f"cuscred-worker-{uuid.uuid4().hex[:8]}"
    worker_token = root.auth.token.create(policies=["root"], display_name=display,
                                          ttl="15m")["auth"]["client_token"]
    stack.env.update({"CUSCRED_KEK_SOURCE": "vault", "CUSCRED_VAULT_ADDR": openbao.addr,
                      "CUSCRED_VAULT_TOKEN": openbao.token, "CUSCRED_VAULT_KEK_PATH": kek_path})
    del stack.env["CUSCRED_KEYRING_PATH"]
    runtime = stack.runtime()  # the test's own, with the root token
    runtime.key_admin().create_version()  # version 1, active
    data = seed(runtime, 2_000, 40)

    stack.env["CUSCRED_VAULT_TOKEN"] = worker_token
    worker = stack.worker(concurrency=2)
    job_id, _ = runtime.rotation().rotate_kek(requested_by="test")
    job = stack.wait_job(job_id)
    assert (job.status, job.done) == ("completed", 2_000)

    worker.wait_for_log(r"chunk job=\d+ chunk=\d+ status=", count=20)  # lines trail commits
    chunk_tasks = worker.count(r"chunk job=\d+ chunk=\d+ status=")
    assert chunk_tasks == 20
    reads = [r for r in _audited_requests(openbao, f"secret/data/{kek_path}", "read")
             if r["auth"]["display_name"] == f"token-{display}"]
    # Two versions are needed (decrypt v1, encrypt v2). Per row would be 4,000 reads; per task
    # at most 40; the process cache makes it at most two per pool process, plus the one read
    # of v1 by the worker's start-up check in the main process (before the fork, whose
    # children start with empty caches).
    assert 0 < len(reads) <= chunk_tasks * 2
    assert len(reads) <= 2 * len(worker.pool_pids()) + 1
    assert_rows_readable(runtime, data, kek_version=2)
    assert_no_secrets(stack.logs(), data.plaintexts,
                      [*kek_materials(runtime, [1, 2]), openbao.token, worker_token])


def _audited_requests(server: OpenBaoServer, path: str, operation: str) -> list[dict[str, object]]:
    return [e for e in server.audit_entries()
            if e.get("type") == "request" and e["request"].get("path") == path
            and e["request"].get("operation") == operation]
