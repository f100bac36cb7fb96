"""Without a broker, a large job's chunks are prepared by a helper process and written here
(cuscred.jobs.local_pool), on SQLite and PostgreSQL: the same exact counts and one audit
event per moved row as in one process; a helper killed with SIGKILL mid-job costs nothing (this
process holds its claims and prepares those chunks itself); nothing secret in what crosses."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
from typing import Any

import pytest
from sqlalchemy import text

from cuscred.factory import Runtime
from cuscred.jobs.chunks import PreparedChunk
from cuscred.jobs.local_pool import PreparePool
from cuscred.jobs.runner import InProcessRunner
from cuscred.jobs.service import RotationService
from cuscred.services.audit_verify import verify_chain
from tests.worker_fixtures import Seeded, assert_no_secrets, assert_rows_readable, seed


class _Watched(PreparePool):
    """The real pool, remembering what it was asked and what came back."""

    def __init__(self, *args: Any, kill_after: int | None = None,
                 signal_to_send: signal.Signals = signal.SIGKILL, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submitted = 0
        self.kill_after = kill_after
        self.signal = signal_to_send
        self.futures: list[Any] = []

    @property
    def results(self) -> list[Any]:
        return [f.exception() or f.result() for f in self.futures if not f.cancelled()]

    def submit(self, *args: Any) -> Any:
        future = super().submit(*args)
        self.submitted += 1
        self.futures.append(future)
        if self.submitted == self.kill_after:
            future.result()  # a helper is up and has worked: kill it before the next one
            for child in multiprocessing.active_children():
                os.kill(child.pid or 0, self.signal)
        return future


def _pooled(runtime: Runtime, pool: _Watched,
            timeout_s: float = 300.0) -> tuple[RotationService, InProcessRunner]:
    settings = runtime.settings.model_copy(update={"chunk_size": 40})
    runner = InProcessRunner()
    service = RotationService(runtime.engine, runtime.keys, runtime.audit, settings, runner)
    runner.bind(service, pool=lambda: pool, pool_min_rows=200, chunk_size=40,
                pool_timeout_s=timeout_s)
    return service, runner


def _assert_exact(runtime: Runtime, job_id: int, data: Seeded) -> None:
    with runtime.engine.connect() as conn:
        job = conn.execute(text("SELECT status, total, done, skipped, failed FROM rotation_jobs "
                                "WHERE id = :j"), {"j": job_id}).one()
        events = dict(conn.execute(text(
            "SELECT credential_id, count(*) FROM audit_events WHERE action = 'reencrypt' "
            "AND reason = :r GROUP BY credential_id"), {"r": f"job={job_id}"}).all())
        assert verify_chain(conn, runtime.audit.keys).ok
    assert tuple(job) == ("completed", len(data), len(data), 0, 0)
    assert set(events) == set(data.rows) and set(events.values()) == {1}
    assert_rows_readable(runtime, data, kek_version=2)


def test_a_helper_prepares_and_this_process_writes(runtime: Runtime) -> None:
    data = seed(runtime, 600, 20)
    pool = _Watched(runtime.settings, 1, actor="rotation-worker")
    service, _ = _pooled(runtime, pool)
    job_id, _ = service.rotate_kek(requested_by="test")
    _assert_exact(runtime, job_id, data)
    prepared = [r for r in pool.results if isinstance(r, PreparedChunk)]
    # The helper prepared what it was handed (this process ran chunks from the far end of the
    # job itself while the helper started).
    assert pool.submitted >= 1 and len(prepared) == pool.submitted
    # What crossed the pipe: ids, new ciphertexts and counts; no plaintext, no key.
    crossed = pickle.dumps(prepared)
    assert_no_secrets({"pickled chunks": crossed.decode("latin-1")}, data.plaintexts,
                      [runtime.keys.source.get(v).material().hex() for v in (1, 2)])


def test_a_helper_killed_mid_job_costs_nothing(
    runtime: Runtime, caplog: pytest.LogCaptureFixture,
) -> None:
    data = seed(runtime, 600, 20)
    pool = _Watched(runtime.settings, 1, actor="rotation-worker", kill_after=2)
    service, _ = _pooled(runtime, pool)
    with caplog.at_level(logging.WARNING, logger="cuscred.jobs.runner"):
        job_id, _ = service.rotate_kek(requested_by="test")
    # The runner saw the helper die (a future it held failed, or the next hand-over found no
    # helper left)...
    assert "a chunk helper process died or hung" in caplog.text
    # ...and prepared every chunk the dead helper held here, with the same claim: no chunk
    # waits for its lease, and the job completes in this call with exact counts.
    _assert_exact(runtime, job_id, data)
    with runtime.engine.connect() as conn:
        assert conn.execute(text("SELECT max(attempts) FROM rotation_chunks WHERE job_id = :j"),
                            {"j": job_id}).scalar_one() == 1


def test_a_helper_that_hangs_is_killed_and_its_chunks_prepared_here(
    runtime: Runtime, caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGSTOP: the helper neither answers nor dies. Past the chunk time limit (2 s here) it
    is killed, and the chunks it held are prepared here with their claims."""
    data = seed(runtime, 600, 20)
    pool = _Watched(runtime.settings, 1, actor="rotation-worker", kill_after=2,
                    signal_to_send=signal.SIGSTOP)
    service, _ = _pooled(runtime, pool, timeout_s=2.0)
    with caplog.at_level(logging.WARNING, logger="cuscred.jobs.runner"):
        job_id, _ = service.rotate_kek(requested_by="test")
    assert "died or hung" in caplog.text
    assert multiprocessing.active_children() == []  # killed, not left stopped
    _assert_exact(runtime, job_id, data)


def test_a_chunk_whose_claim_was_lost_before_its_write_runs_again_here(
    runtime: Runtime,
) -> None:
    """Between a helper's prepare and this process's write, the chunk's claim went away (its
    lease ran out and a sweep released it): the write is refused (``lost_claim``) and the chunk
    runs again as a plain step, so the job still completes here, with exact counts."""
    data = seed(runtime, 600, 20)
    pool = _Watched(runtime.settings, 1, actor="rotation-worker")
    service, _ = _pooled(runtime, pool)
    real_finish = service.finish_chunk
    lost: list[int] = []

    def finish(prepared: Any) -> Any:
        if isinstance(prepared, PreparedChunk) and not lost:
            lost.append(prepared.chunk_no)
            with runtime.engine.begin() as conn:
                conn.execute(text("UPDATE rotation_chunks SET status = 'pending', "
                                  "claim_token = NULL, lease_until = NULL WHERE job_id = :j "
                                  "AND chunk_no = :c"),
                             {"j": prepared.job_id, "c": prepared.chunk_no})
        return real_finish(prepared)

    service.finish_chunk = finish  # type: ignore[method-assign]
    job_id, _ = service.rotate_kek(requested_by="test")
    assert lost  # a helper's chunk did lose its claim
    _assert_exact(runtime, job_id, data)


def test_small_jobs_stay_in_one_process(runtime: Runtime) -> None:
    data = seed(runtime, 100, 5)
    pool = _Watched(runtime.settings, 1, actor="rotation-worker")
    service, _ = _pooled(runtime, pool)  # 100 rows: 3 chunks of 40, under 200 rows
    admin = runtime.key_admin()
    admin.promote(admin.create_version())
    job_id = service.reencrypt(requested_by="test")
    assert pool.submitted == 0
    pool.close()
    _assert_exact(runtime, job_id, data)


@pytest.mark.parametrize("processes", [0, 1])
def test_the_factory_binds_the_pool_from_settings(runtime: Runtime, processes: int) -> None:
    settings = runtime.settings.model_copy(update={
        "local_prepare_processes": processes, "local_prepare_min_rows": 100, "chunk_size": 25})
    data = seed(runtime, 150, 5)
    built = Runtime(settings, runtime.engine, runtime.sessions, runtime.keys, runtime.audit,
                    runtime.vault_kv)
    job_id = built.rotation().reencrypt(requested_by="test")  # KEK v1 still active: no move
    with runtime.engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM rotation_jobs WHERE id = :j"),
                            {"j": job_id}).scalar_one() == "completed"
    admin = built.key_admin()
    admin.promote(admin.create_version())
    job_id = built.rotation().reencrypt(requested_by="test")
    _assert_exact(built, job_id, data)


_ORPHAN_SCRIPT = """
import multiprocessing, sys, time
from cuscred.config import Settings
from cuscred.jobs.chunks import ChunkClaim
from cuscred.jobs.local_pool import PreparePool
if __name__ == "__main__":
    settings = Settings.from_env({"CUSCRED_DATABASE_URL": sys.argv[1],
                                  "CUSCRED_KEYRING_PATH": sys.argv[2]})
    pool = PreparePool(settings, 1, actor="test")
    pool.submit(999, 1, ChunkClaim("t", 2, None, 1, 1, frozenset({1}))).result()
    print(multiprocessing.active_children()[0].pid, flush=True)
    time.sleep(600)
"""


def test_a_helper_dies_with_the_process_that_started_it(
    runtime: Runtime, tmp_path: Any,
) -> None:
    """kill -9 of the job's process must not leave its helper behind, holding a database
    handle and key caches (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys
    import time

    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(runtime.engine.url.render_as_string(
            hide_password=False)), str(runtime.settings.keyring_path)],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert proc.stdout is not None
        helper = int(proc.stdout.readline())
        assert os.path.exists(f"/proc/{helper}")  # up, and working for the script
    finally:
        proc.kill()
        proc.wait()
    def alive() -> bool:  # a zombie waiting for init to reap it is dead
        try:
            with open(f"/proc/{helper}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()
