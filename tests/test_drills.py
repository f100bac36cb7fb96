"""Failure drills, each ending with every credential readable and exact counts:

* a KEK version destroyed in Vault while rows still use it: a typed error naming the version,
  no row touched, the job ends ``completed_with_errors`` with those rows as failures;
* a chunk that kills its worker every time it runs: bounded attempts, then the chunk is marked
  failed and the job ends ``completed_with_errors``, with no endless redelivery;
* PostgreSQL restarted mid-job (a private server, so no other test loses its database).

(Worker killed, Vault frozen or sealed, Redis restarted: tests/test_worker_faults.py. The
visibility timeout shorter than a chunk: tests/test_worker_startup.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import psycopg
import pytest
from sqlalchemy import select, text

from cuscred.db.migrate import upgrade_to_head
from cuscred.db.models import CREDENTIALS
from cuscred.db.session import make_engine
from cuscred.errors import ConfigurationError, KekUnavailableError
from cuscred.factory import Runtime, build_runtime
from cuscred.kek.local import LocalKeyring
from tests.conftest import Database
from tests.test_worker_faults import (
    SHORT_LEASE,
    SLOW_FIRST_CHUNK,
    _assert_job_exact,
    _planned,
    _rows_on,
)
from tests.vault_fixtures import vault_settings
from tests.vault_server import OpenBaoServer
from tests.worker_fixtures import (
    BASE_ENV,
    Stack,
    assert_no_secrets,
    free_port,
    kek_materials,
    seed,
    wait_for,
)

# --- a KEK version destroyed in Vault ---------------------------------------------------------


def _ciphertexts(runtime: Runtime) -> dict[str, bytes]:
    c = CREDENTIALS.c
    with runtime.engine.connect() as conn:
        return {r.credential_id: bytes(r.ciphertext)
                for r in conn.execute(select(c.credential_id, c.ciphertext))}


def test_kek_version_destroyed_in_vault_while_rows_use_it(
    openbao: OpenBaoServer, database: Database
) -> None:
    kek_path = f"cuscred/kek-drill-{os.urandom(4).hex()}"
    settings = vault_settings(openbao, database_url=database.url, vault_kek_path=kek_path)
    runtime = build_runtime(settings, engine=database.engine)
    admin = runtime.key_admin()
    admin.create_version()
    old = seed(runtime, 120, 6)
    admin.promote(admin.create_version())
    svc = runtime.credential_service()
    new_ref = svc.encrypt_credential("tenant-new", "sk-proj-" + "AfterRotation9" * 3)

    client = hvac.Client(url=openbao.addr, token=openbao.token)
    client.secrets.kv.v2.destroy_secret_versions(kek_path, [1], mount_point="secret")
    before = _ciphertexts(runtime)

    # A fresh process: nothing cached. Reads of v1 rows fail with a typed error naming the
    # version; v2 rows still resolve.
    fresh = build_runtime(settings, engine=database.engine)
    cid, (tenant, _, context) = next(iter(old.rows.items()))
    with pytest.raises(KekUnavailableError) as info:
        fresh.credential_service().resolve_credential(tenant, f"encrypted://{cid}", context)
    assert "KEK version 1" in str(info.value) and "destroyed" in str(info.value)
    assert fresh.credential_service().resolve_credential("tenant-new", new_ref).startswith(
        "sk-proj-AfterRotation9")
    with pytest.raises(ConfigurationError, match=r"^KEK version 1 cannot be loaded from the "
                                                 r"vault source \(kek_unavailable\); 120 "):
        build_runtime(settings, engine=database.engine, preflight=True)

    # A re-encryption job records each v1 row as failed and touches none of them.
    job_id = fresh.rotation().reencrypt(requested_by="drill")
    with fresh.engine.connect() as conn:
        job = conn.execute(text("SELECT status, total, done, skipped, failed FROM rotation_jobs "
                                "WHERE id = :id"), {"id": job_id}).one()
        reasons = conn.execute(text("SELECT DISTINCT reason FROM rotation_failures "
                                    "WHERE job_id = :id"), {"id": job_id}).all()
    assert tuple(job) == ("completed_with_errors", 120, 0, 0, 120)
    assert reasons == [("kek_v1_unavailable",)]
    assert _ciphertexts(runtime) == before  # no row touched


# --- a chunk that always crashes its worker ---------------------------------------------------


def _seed_by_tenant(runtime: Runtime, tenants: int, per_tenant: int) -> list[str]:
    """Rows in tenant order, so each chunk (a primary-key range) holds its own tenants and a
    process that ran one chunk has none of the next chunk's keys cached."""
    items = [(f"tenant-{t:03d}", f"sk-proj-{t:03d}x{i:03d}" + "Cr4shLoop" * 4, None)
             for t in range(tenants) for i in range(per_tenant)]
    return runtime.credential_service().import_credentials(items, batch_size=500)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_a_chunk_that_always_kills_its_worker_is_given_up(stack: Stack) -> None:
    stack.env.update({**SLOW_FIRST_CHUNK, **SHORT_LEASE, "CUSCRED_CHUNK_SIZE": "100",
                      "CUSCRED_CHUNK_MAX_CRASHES": "2", "CUSCRED_PBKDF2_ITERATIONS": "300000"})
    runtime = stack.runtime()
    _seed_by_tenant(runtime, tenants=20, per_tenant=10)  # 200 rows: chunks 1 and 2
    worker = stack.worker(concurrency=1)
    job_id, _ = runtime.rotation().rotate_kek(requested_by="drill")

    kills: list[int] = []
    stop = threading.Event()

    def poison() -> None:
        """Whenever chunk 1 is claimed, kill the pool process running it (as a segfault or the
        OOM killer would), before it can commit."""
        seen_attempts = 0
        while not stop.is_set():
            chunk = stack.chunks(job_id)[0] if stack.chunks(job_id) else None
            if chunk is not None and chunk.status == "running" and chunk.attempts > seen_attempts:
                seen_attempts = chunk.attempts
                for pid in worker.pool_pids():
                    os.kill(pid, signal.SIGKILL)
                kills.append(chunk.attempts)
            time.sleep(0.005)

    killer = threading.Thread(target=poison, daemon=True)
    killer.start()
    try:
        job = stack.wait_job(job_id, timeout=120, sweep_every=0.5)
    finally:
        stop.set()
        killer.join(5)

    chunks = stack.chunks(job_id)
    assert (job.status, job.total, job.done, job.skipped, job.failed) == (
        "completed_with_errors", 200, 100, 0, 100), chunks
    first, second = chunks
    assert (first.status, first.crashes, first.failed) == ("failed", 2, 100)
    assert first.last_error.startswith("gave up: repeated worker crashes")
    assert second.status == "done" and second.done == 100
    assert kills == [1, 2]  # two deliveries ran it and died; none after the give-up
    # Its rows are untouched on the old version and listed as failures; nothing is lost.
    assert _rows_on(stack, 1, first.pk_lo, first.pk_hi) == 100
    assert stack.scalar("SELECT COUNT(*) FROM rotation_failures WHERE job_id = :j "
                        "AND reason = 'chunk_gave_up'", j=job_id) == 100
    # `jobs resume` (here: the service) moves them once the cause is gone.
    stack.control().resume(job_id, actor="drill")
    job = stack.wait_job(job_id, timeout=60, sweep_every=0.5)
    assert (job.status, job.done + job.skipped, job.failed) == ("completed", 200, 0)


# --- PostgreSQL restarted mid-job -------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb, trust auth, a free port), run as the
    ``postgres`` user, so restarting it disturbs nothing else."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bins or shutil.which("runuser") is None:
            pytest.skip("PostgreSQL server binaries or runuser are not installed")
        self.bin = bins[-1]
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cuscred-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
                       check=True, capture_output=True, timeout=120, cwd=self.dir)

    def start(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
                          "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
                          "start")

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def running(self) -> bool:
        try:
            psycopg.connect(self.url, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def remove(self) -> None:
        if self.running():
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def pg_stack(
    private_postgres: PrivatePostgres, broker_url: str, tmp_path: Path
) -> Iterator[Stack]:
    engine = make_engine(private_postgres.url, hide_parameters=True)
    upgrade_to_head(engine)
    keyring = LocalKeyring.create(tmp_path / "keyring.json")
    env = {"CUSCRED_DATABASE_URL": private_postgres.url,
           "CUSCRED_KEYRING_PATH": str(keyring.path), "CUSCRED_BROKER_URL": broker_url,
           **BASE_ENV}
    workdir = tmp_path / "procs"
    workdir.mkdir()
    stack = Stack(Database("postgresql", private_postgres.url, engine), env, workdir)
    yield stack
    stack.kill_all()
    engine.dispose()


def test_postgresql_restarted_mid_job(
    pg_stack: Stack, private_postgres: PrivatePostgres
) -> None:
    stack = pg_stack
    stack.env.update(SHORT_LEASE)
    runtime = stack.runtime()
    data = seed(runtime, 1_200, 30)
    service, job_id, chunk_nos = _planned(runtime)
    for chunk_no in chunk_nos[:3]:  # mid-job: three chunks done before the restart
        assert service.reencrypt_chunk(job_id, chunk_no).status == "done"
    worker = stack.worker(concurrency=2)

    private_postgres.stop()
    runner = stack.runner()
    for chunk_no in chunk_nos[3:]:
        runner.chunk(job_id, chunk_no)
    wait_for(lambda: worker.count(r"reencrypt_chunk job=\d+ chunk=\d+: \w+, retry 2 ") > 0,
             timeout=60, what="chunk tasks retrying while PostgreSQL is down",
             details=stack.tails)
    private_postgres.start()
    runtime.engine.dispose()  # the test's own pool held connections to the old server

    stack.wait_job(job_id, timeout=120, sweep_every=1.0)
    _assert_job_exact(stack, runtime, job_id, data)
    assert_no_secrets(stack.logs(), data.plaintexts, kek_materials(runtime, [1, 2]))

