"""The tasks an operator or beat sends by name (``rotate_kek``, ``rekey_tenant``, ``verify``,
``sweep``) run on a real worker, and the Celery options that keep a job's messages safe are
pinned where they are set: JSON only, late acks, a message requeued when its worker dies."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import text

from cuscred.config import Settings
from cuscred.jobs.celery_runner import QUEUE
from cuscred.jobs.service import RotationService
from tests.worker_fixtures import Stack, assert_no_secrets, assert_rows_readable, seed, wait_for


def _send(stack: Stack, name: str, *args: Any, **kwargs: Any) -> None:
    stack.runner()._app.send_task(name, args=list(args), kwargs=kwargs)


def _job_of_kind(stack: Stack, kind: str) -> int:
    def found() -> int | None:
        with stack.observer.connect() as conn:
            return conn.execute(text("SELECT max(id) FROM rotation_jobs WHERE kind = :k"),
                                {"k": kind}).scalar()

    return int(wait_for(found, timeout=30, what=f"a {kind} job", details=stack.tails))


def _succeeded(worker: Any, task: str) -> str:
    """The return value the worker logged for the last success of ``task``."""
    pattern = rf"Task {re.escape(task)}\[[^\]]+\] succeeded in [\d.]+s: (.*)"
    worker.wait_for_log(pattern)
    return str(re.findall(pattern, worker.log())[-1])


class _Lost:
    """A runner whose messages never reach the broker: what a Redis crash leaves behind."""

    def advance_rotation(self, job_id: int) -> None: ...
    def start(self, job_id: int) -> None: ...
    def chunk(self, job_id: int, chunk_no: int) -> None: ...
    def finalize(self, job_id: int) -> None: ...


def test_operator_tasks_by_name_on_a_worker(stack: Stack) -> None:
    runtime = stack.runtime()
    data = seed(runtime, 300, 10)
    worker = stack.worker()

    _send(stack, "tasks.rotation.rotate_kek", requested_by="ops")
    rotation = stack.wait_job(_job_of_kind(stack, "kek_rotation"))
    assert (rotation.status, rotation.target_kek_version, rotation.done) == ("completed", 2, 300)
    assert_rows_readable(runtime, data, kek_version=2)
    assert "'created': True" in _succeeded(worker, "tasks.rotation.rotate_kek")

    tenant = next(t for t, _, _ in data.rows.values())
    own = {cid for cid, (t, _, _) in data.rows.items() if t == tenant}
    _send(stack, "tasks.rotation.rekey_tenant", tenant, requested_by="ops")
    rekey = stack.wait_job(_job_of_kind(stack, "tenant_rekey"))
    assert (rekey.status, rekey.tenant_id, rekey.done) == ("completed", tenant, len(own))
    assert stack.scalar("SELECT count(*) FROM credentials WHERE tenant_id = :t "
                        "AND key_generation = 2", t=tenant) == len(own)

    # One of the tenant's rows damaged: verify names it, by id only, and counts the rest.
    damaged = sorted(own)[0]
    with runtime.engine.begin() as conn:
        blob = bytearray(conn.execute(text(
            "SELECT ciphertext FROM credentials WHERE credential_id = :c"),
            {"c": damaged}).scalar_one())
        blob[-1] ^= 0x01
        conn.execute(text("UPDATE credentials SET ciphertext = :b WHERE credential_id = :c"),
                     {"b": bytes(blob), "c": damaged})
    _send(stack, "tasks.rotation.verify", tenant_id=tenant)
    result = _succeeded(worker, "tasks.rotation.verify")
    assert f"'checked': {len(own)}" in result
    assert f"'per_kek_version': {{'2': {len(own)}}}" in result
    assert f"'failed_ids': ['{damaged}']" in result
    assert_no_secrets(stack.logs(), data.plaintexts)


def test_sweep_task_redrives_chunks_whose_messages_were_lost(stack: Stack) -> None:
    stack.env["CUSCRED_CHUNK_REQUEUE_AFTER_S"] = "1"
    runtime = stack.runtime()
    data = seed(runtime, 250, 8)
    # Planned with every message lost: four chunks pending, nothing on the broker.
    lost = RotationService(runtime.engine, runtime.keys, runtime.audit, stack.settings(), _Lost())
    job_id, _ = lost.rotate_kek(requested_by="test")
    lost.advance_rotation(job_id)
    assert len(lost.start_reencryption(job_id)) == 3
    worker = stack.worker()

    def swept() -> Any:
        _send(stack, "tasks.rotation.sweep")
        job = stack.job(job_id)
        return job if job.status == "completed" else None

    job = wait_for(swept, timeout=60, interval=1.5, what="the sweeper to finish the job",
                   details=stack.tails)
    assert (job.total, job.done, job.skipped, job.failed) == (250, 250, 0, 0)
    assert re.search(r"'requeued': [1-3]", worker.log())
    assert_rows_readable(runtime, data, kek_version=2)


def test_arguments_that_are_not_ids_are_refused_without_being_logged(stack: Stack) -> None:
    """Anyone who can write to the broker can send any arguments: a task takes positive int
    ids (and a short printable actor) only, and never writes what it refused into a log."""
    runtime = stack.runtime()
    seed(runtime, 20, 2)
    worker = stack.worker()
    poison = "7; drop table credentials\n[fake] chunk done"
    _send(stack, "tasks.rotation.reencrypt_chunk", poison, 1)
    _send(stack, "tasks.rotation.finalize_job", True)
    _send(stack, "tasks.rotation.start_reencryption", -3)
    _send(stack, "tasks.rotation.rotate_kek", requested_by=poison)
    _send(stack, "tasks.rotation.rotate_kek", requested_by="AKIAIOSFODNN7EXAMPLE")
    worker.wait_for_log(r"task refused", count=5)
    assert "AKIAIOSFODNN7EXAMPLE" not in worker.log()
    assert "drop table" not in worker.log() and "[fake]" not in worker.log()
    assert stack.scalar("SELECT count(*) FROM rotation_jobs") == 0


def test_celery_options_that_keep_job_messages_safe(monkeypatch: Any) -> None:
    from worker import runtime as process_runtime

    settings = Settings.from_env({"CUSCRED_BROKER_URL": "redis://127.0.0.1:6379/0",
                                  "CUSCRED_BROKER_VISIBILITY_TIMEOUT_S": "7200"})
    monkeypatch.setattr(process_runtime, "_settings", settings)
    from tasks import rotation as tasks  # the worker's app, configured from settings (no I/O)

    conf = tasks.app.conf
    # JSON only: a pickled message from anyone who can write to Redis is never loaded.
    assert (conf.task_serializer, conf.result_serializer, conf.accept_content) == (
        "json", "json", ["json"])
    # Acked after the task's transaction, requeued if its process dies, one message at a time.
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options == {"visibility_timeout": 7200}
    assert conf.result_backend is None and conf.task_ignore_result is True
    assert conf.worker_send_task_events and conf.task_send_sent_event  # Flower
    assert conf.task_default_queue == QUEUE
    for task in (tasks.rotate_kek, tasks.rotate_kek_advance, tasks.rekey_tenant,
                 tasks.start_reencryption, tasks.reencrypt_chunk, tasks.finalize_job,
                 tasks.verify, tasks.check_rotation_due, tasks.sweep):
        assert task.acks_late is True and task.reject_on_worker_lost is True, task.name


def test_each_pool_process_gets_its_own_runtime_after_fork(monkeypatch: Any) -> None:
    """Connections pooled (and keys cached) before a fork are dropped in the child."""
    from celery.signals import worker_process_init

    import worker.app  # noqa: F401  (connects the worker's signal handlers)
    from worker import runtime as process_runtime

    disposed: list[object] = []

    class _Runtime:
        def dispose(self) -> None:
            disposed.append(self)

    before = _Runtime()
    monkeypatch.setattr(process_runtime, "_runtime", before)
    worker_process_init.send(sender=None)  # what each prefork child gets at start
    assert disposed == [before] and process_runtime._runtime is None
