"""The job commands as an operator drives them, on SQLite and PostgreSQL: `kek rotate`,
`reencrypt`, `rekey`, `jobs` / `jobs show` / `cancel` / `resume`, `verify`, their exit codes and
--json. Without a broker the chunks run in the CLI process; with one, a thread stands in for the
Celery workers, and the CLI only polls the tables."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from cuscred.cli import app
from cuscred.config import Settings
from cuscred.datagen import generate
from cuscred.db.models import CREDENTIALS
from cuscred.factory import Runtime, build_runtime
from cuscred.jobs.celery_runner import CeleryRunner
from cuscred.jobs.service import RotationService
from tests.conftest import Database

N, TENANTS, CHUNK = 200, 10, 40


@pytest.fixture
def cli_env(database: Database, tmp_path: Path) -> dict[str, str]:
    return {
        "CUSCRED_DATABASE_URL": database.url,
        "CUSCRED_KEYRING_PATH": str(tmp_path / "keyring.json"),
        "CUSCRED_CHUNK_SIZE": str(CHUNK),
    }


@pytest.fixture
def seeded(cli_env: dict[str, str], database: Database) -> tuple[Runtime, dict[str, int]]:
    """N credentials over TENANTS tenants; returns the runtime and credentials per tenant."""
    assert run(cli_env, "keygen")[0] == 0
    runtime = build_runtime(Settings.from_env(cli_env), engine=database.engine)
    items = [(g.tenant_id, g.secret, {"provider": g.provider}) for g in generate(N, TENANTS)]
    runtime.credential_service().import_credentials(items)
    per_tenant: dict[str, int] = {}
    for tenant, _, _ in items:
        per_tenant[tenant] = per_tenant.get(tenant, 0) + 1
    return runtime, per_tenant


def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def run_json(env: dict[str, str], *args: str) -> Any:
    code, out, err = run(env, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def kek_census(env: dict[str, str]) -> dict[int, tuple[str, int]]:
    status = run_json(env, "keys", "status")
    return {v["version"]: (v["state"], v["credentials"]) for v in status["kek_versions"]}


def test_kek_rotate_wait_end_to_end(cli_env: dict[str, str], seeded: Any) -> None:
    code, out, err = run(cli_env, "kek", "rotate", "--wait")
    assert code == 0, err
    job_id = int(out.splitlines()[0])
    assert f"job {job_id} completed: {N} rows" in err and f"done {N}, skipped 0, failed 0" in err
    assert "100%" in err and "`cuscred keys retire 1`" in err
    assert kek_census(cli_env) == {1: ("decrypt_only", 0), 2: ("active", N)}
    [job] = run_json(cli_env, "jobs")
    assert (job["id"], job["kind"], job["status"], job["target_kek_version"]) == (
        job_id, "kek_rotation", "completed", 2)
    assert (job["done"], job["skipped"], job["failed"], job["rows_total"]) == (N, 0, 0, N)
    assert job["fraction"] == 1.0 and job["rate"] > 0 and job["eta_s"] is None
    detail = run_json(cli_env, "jobs", "show", str(job_id))
    assert detail["chunks"]["by_status"] == {"done": N // CHUNK}
    assert detail["chunks"]["attempts"] == N // CHUNK and detail["chunks"]["crashes"] == 0
    assert detail["failure_count"] == 0 and detail["failures"] == []
    # The census recorded as the job completed: every row on the new version.
    assert detail["job"]["census"] == [
        {"kek_version": 2, "key_generation": 1, "credentials": N}]
    code, out, _ = run(cli_env, "jobs", "show", str(job_id))
    assert code == 0 and f"KEK v2 gen 1: {N:,}" in out
    code, out, _ = run(cli_env, "jobs")
    assert code == 0 and "kek_rotation" in out and f"{N:,}" in out and "100%" in out
    assert run(cli_env, "keys", "retire", "1")[0] == 0
    report = run_json(cli_env, "verify")
    assert report == {"ok": True, "checked": N, "per_kek_version": {"2": N}, "failed": 0,
                      "failures": []}
    assert run(cli_env, "audit", "verify")[0] == 0


def test_without_wait_the_job_still_runs_to_the_end_in_process(
    cli_env: dict[str, str], seeded: Any
) -> None:
    job = run_json(cli_env, "kek", "rotate")  # --json: the final job instead of the id
    assert (job["status"], job["done"], job["total"]) == ("completed", N, N)
    assert kek_census(cli_env)[2] == ("active", N)


def test_reencrypt_one_tenant_then_all(cli_env: dict[str, str], seeded: Any) -> None:
    _, per_tenant = seeded
    tenant, mine = max(per_tenant.items(), key=lambda kv: kv[1])
    assert run(cli_env, "keys", "create")[0] == 0
    assert run(cli_env, "keys", "promote", "2")[0] == 0
    code, _, err = run(cli_env, "keys", "retire", "1")
    assert code == 7 and f"still used by {N} credential(s)" in err
    code, out, err = run(cli_env, "reencrypt", "--tenant", tenant, "--wait")
    assert code == 0 and f"done {mine}," in err
    assert run_json(cli_env, "verify", "--tenant", tenant)["per_kek_version"] == {"2": mine}
    assert kek_census(cli_env) == {1: ("decrypt_only", N - mine), 2: ("active", mine)}
    assert run_json(cli_env, "verify", "--job", out.split()[0])["checked"] == mine
    job = run_json(cli_env, "reencrypt")
    assert (job["kind"], job["tenant_id"], job["done"]) == ("reencrypt", None, N - mine)
    assert run(cli_env, "keys", "retire", "1")[0] == 0


def test_rekey_moves_one_tenant_to_a_new_generation(cli_env: dict[str, str], seeded: Any) -> None:
    _, per_tenant = seeded
    tenant, mine = max(per_tenant.items(), key=lambda kv: kv[1])
    job = run_json(cli_env, "rekey", tenant, "--wait")
    assert (job["kind"], job["status"], job["tenant_id"]) == ("tenant_rekey", "completed", tenant)
    assert (job["target_generation"], job["done"]) == (2, mine)
    # A tenant's job records the census of its own scope only.
    assert job["census"] == [{"kek_version": 1, "key_generation": 2, "credentials": mine}]
    gens = run_json(cli_env, "keys", "status", "--tenants")["tenant_generations"]
    counts = {(g["tenant_id"], g["generation"]): g["credentials"] for g in gens}
    assert counts[tenant, 1] == 0 and counts[tenant, 2] == mine
    assert all(g == 1 for t, g in counts if t != tenant)
    code, out, _ = run(cli_env, "jobs")
    assert code == 0 and "v1 gen 2" in out and tenant in out


def test_failed_rows_are_listed_and_the_exit_code_says_so(
    cli_env: dict[str, str], seeded: Any
) -> None:
    runtime, _ = seeded
    bad = _tamper_one(runtime)
    code, out, err = run(cli_env, "kek", "rotate", "--wait")
    assert code == 9 and "completed_with_errors" in err and "failed 1" in err
    job_id = out.split()[0]
    code, out, _ = run(cli_env, "jobs", "show", job_id)
    assert code == 0 and bad in out and "decrypt_failed" in out
    detail = run_json(cli_env, "jobs", "show", job_id)
    assert detail["job"]["status"] == "completed_with_errors"
    assert (detail["job"]["done"], detail["job"]["failed"]) == (N - 1, 1)
    assert detail["failure_count"] == 1 and detail["failure_reasons"] == {"decrypt_failed": 1}
    assert detail["failures"][0]["credential_id"] == bad
    code, out, err = run(cli_env, "verify")
    assert code == 8 and bad in out and f"{N - 1}" in out and "1 fail" in err
    report = json.loads(run(cli_env, "verify", "--json")[1])
    assert report["failed"] == 1 and report["per_kek_version"] == {"1": 1, "2": N - 1}
    code, _, err = run(cli_env, "keys", "retire", "1")
    assert code == 7 and "still used by 1 credential(s)" in err


def _tamper_one(runtime: Runtime) -> str:
    with runtime.engine.begin() as conn:
        pk, cid, blob = conn.execute(select(CREDENTIALS.c.pk, CREDENTIALS.c.credential_id,
                                            CREDENTIALS.c.ciphertext).limit(1)).one()
        conn.execute(update(CREDENTIALS).where(CREDENTIALS.c.pk == pk).values(
            ciphertext=bytes(blob[:-1]) + bytes([blob[-1] ^ 1])))
    return str(cid)


class _Recorder:
    """A runner that only records: the job waits for whoever resumes it."""

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


def test_progress_cancel_and_resume(cli_env: dict[str, str], seeded: Any) -> None:
    runtime, _ = seeded
    svc = RotationService(runtime.engine, runtime.keys, runtime.audit, runtime.settings,
                          _Recorder())
    job_id, _ = svc.rotate_kek(requested_by="test")
    [job] = run_json(cli_env, "jobs")
    assert (job["status"], job["fraction"], job["rate"]) == ("pending", None, None)
    # One in flight, driven by nobody here: its id, nothing started, and exit 9 (the rotation
    # asked for has not happened), with or without --wait.
    for wait in ([], ["--wait"]):
        code, out, err = run(cli_env, "kek", "rotate", *wait)
        assert (code, out.strip()) == (9, str(job_id)) and "already in flight" in err
    assert "jobs resume" in err
    svc.advance_rotation(job_id)
    svc.start_reencryption(job_id)
    svc.reencrypt_chunk(job_id, 1)
    [job] = run_json(cli_env, "jobs", "--status", "running")
    assert (job["done"], job["rows_total"], job["fraction"]) == (CHUNK, N, CHUNK / N)
    assert job["open_chunks"] == N // CHUNK - 1 and job["eta_s"] is not None
    code, _, err = run(cli_env, "jobs", "cancel", str(job_id))
    assert code == 0 and f"job {job_id} cancelled" in err
    assert run_json(cli_env, "jobs", "--status", "running") == []
    detail = run_json(cli_env, "jobs", "show", str(job_id))
    assert detail["chunks"]["by_status"] == {"cancelled": N // CHUNK - 1, "done": 1}
    assert (detail["job"]["status"], detail["job"]["done"]) == ("cancelled", CHUNK)
    code, out, err = run(cli_env, "jobs", "resume", str(job_id), "--wait")
    assert code == 0 and f"job {job_id} resumed" in err and f"done {N}," in err
    code, _, err = run(cli_env, "jobs", "cancel", str(job_id))
    assert code == 0 and "already ended (completed)" in err
    [job] = run_json(cli_env, "jobs")
    assert (job["status"], job["done"], job["total"]) == ("completed", N, N)
    assert kek_census(cli_env)[2] == ("active", N)


def test_resume_after_an_interrupted_run_waits_for_the_dead_claim(
    cli_env: dict[str, str], seeded: Any
) -> None:
    from cuscred.db.models import ROTATION_CHUNKS, utcnow

    runtime, _ = seeded
    svc = RotationService(runtime.engine, runtime.keys, runtime.audit, runtime.settings,
                          _Recorder())
    job_id, _ = svc.rotate_kek(requested_by="test")
    svc.advance_rotation(job_id)
    svc.start_reencryption(job_id)
    svc.reencrypt_chunk(job_id, 1)
    assert svc.chunks.claim(job_id, 2) is not None  # the process was killed inside chunk 2
    code, _, err = run(cli_env, "jobs", "resume", str(job_id))
    assert code == 9 and f"job {job_id} running: {N - CHUNK} rows" in err
    assert "1 chunk(s) still claimed elsewhere" in err and "CUSCRED_CHUNK_LEASE_S" in err
    with runtime.engine.begin() as conn:  # the dead claim's lease runs out
        conn.execute(update(ROTATION_CHUNKS).values(lease_until=utcnow()))
    code, _, err = run(cli_env, "jobs", "resume", str(job_id))
    assert code == 0 and f"job {job_id} completed: {N} rows" in err
    detail = run_json(cli_env, "jobs", "show", str(job_id))
    assert detail["chunks"]["crashes"] == 1 and detail["chunks"]["retried"] == 1


@pytest.mark.parametrize(
    ("error", "flags", "code"),
    [(RuntimeError("bug"), ["--wait"], 1),
     (OperationalError("SELECT 1", {}, Exception("database went away")), [], 69)],
)
def test_a_step_that_keeps_failing_stops_the_job_resumably(
    cli_env: dict[str, str], seeded: Any, monkeypatch: pytest.MonkeyPatch,
    error: Exception, flags: list[str], code: int,
) -> None:
    from cuscred.jobs.chunks import ChunkProcessor

    real = ChunkProcessor.process
    calls: list[int] = []

    def flaky(self: ChunkProcessor, job_id: int, chunk_no: int) -> Any:
        calls.append(chunk_no)
        if chunk_no == 2:
            raise error
        return real(self, job_id, chunk_no)

    monkeypatch.setattr(ChunkProcessor, "process", flaky)
    code_, out, err = run(cli_env, "kek", "rotate", *flags)
    job_id = int(out.split()[0]) if out.strip() else run_json(cli_env, "jobs")[0]["id"]
    assert code_ == code and f"job {job_id} stopped: a step failed ({type(error).__name__})" in err
    assert f"cuscred jobs resume {job_id}" in err and "Traceback" not in err
    assert calls == [1, 2, 2, 2]  # the in-process runner's three attempts, then it gives up
    [job] = run_json(cli_env, "jobs")
    assert (job["status"], job["done"]) == ("running", CHUNK)
    monkeypatch.setattr(ChunkProcessor, "process", real)
    code_, _, err = run(cli_env, "jobs", "resume", str(job_id))
    assert code_ == 0 and f"done {N}," in err


@pytest.mark.parametrize(
    "args",
    [["jobs", "show", "999999"], ["jobs", "cancel", "999999"], ["jobs", "resume", "999999"],
     ["verify", "--job", "999999"]],
)
def test_unknown_job_is_not_found(cli_env: dict[str, str], seeded: Any, args: list[str]) -> None:
    code, _, err = run(cli_env, *args)
    assert code == 3 and "no job 999999" in err


def test_usage_and_empty_list(cli_env: dict[str, str], seeded: Any) -> None:
    assert run(cli_env, "verify", "--tenant", "acme", "--job", "1")[0] == 2
    assert run(cli_env, "jobs", "--status", "bogus")[0] == 2
    code, _, err = run(cli_env, "jobs")
    assert code == 0 and "no jobs" in err
    assert run_json(cli_env, "jobs") == []


class _ThreadWorker:
    """Stands in for Celery: steps are queued and a thread of its own works through them."""

    _METHODS: ClassVar[dict[str, str]] = {
        "advance": "advance_rotation", "start": "start_reencryption",
        "chunk": "reencrypt_chunk", "finalize": "finalize_job",
    }

    def __init__(self, runtime: Runtime) -> None:
        self.service = RotationService(runtime.engine, runtime.keys, runtime.audit,
                                       runtime.settings, self, actor="worker")
        self.sent: list[tuple[str, tuple[int, ...]]] = []
        self._queue: queue.Queue[tuple[str, tuple[int, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _send(self, kind: str, *args: int) -> None:
        self.sent.append((kind, args))
        self._queue.put((kind, args))

    def advance_rotation(self, job_id: int) -> None:
        self._send("advance", job_id)

    def start(self, job_id: int) -> None:
        self._send("start", job_id)

    def chunk(self, job_id: int, chunk_no: int) -> None:
        self._send("chunk", job_id, chunk_no)

    def finalize(self, job_id: int) -> None:
        self._send("finalize", job_id)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            getattr(self.service, self._METHODS[item[0]])(*item[1])

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


@pytest.fixture
def worker(seeded: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[_ThreadWorker]:
    runtime, _ = seeded
    fake = _ThreadWorker(runtime)
    monkeypatch.setattr(CeleryRunner, "from_settings", classmethod(lambda cls, settings: fake))
    yield fake
    fake.stop()


def test_with_a_broker_the_cli_enqueues_and_polls(
    cli_env: dict[str, str], worker: _ThreadWorker
) -> None:
    env = {**cli_env, "CUSCRED_BROKER_URL": "redis://127.0.0.1:6379/15"}
    code, out, err = run(env, "kek", "rotate", "--wait")
    assert code == 0 and "queued for the workers" in err and f"done {N}," in err
    job_id = int(out.split()[0])
    assert worker.sent[0] == ("advance", (job_id,))
    assert sum(1 for kind, _ in worker.sent if kind == "chunk") == N // CHUNK
    assert kek_census(cli_env)[2] == ("active", N)
    code, out, err = run(env, "reencrypt")  # no --wait: queued, the command returns at once
    assert code == 0 and "queued for the workers" in err and out.strip().isdigit()


def test_resume_after_a_chunk_gave_up_moves_its_rows(
    cli_env: dict[str, str], seeded: Any
) -> None:
    from cuscred.db.models import ROTATION_CHUNKS, utcnow

    runtime, _ = seeded
    fragile = runtime.settings.model_copy(update={"chunk_max_crashes": 1})
    svc = RotationService(runtime.engine, runtime.keys, runtime.audit, fragile, _Recorder())
    job_id, _ = svc.rotate_kek(requested_by="test")
    svc.advance_rotation(job_id)
    svc.start_reencryption(job_id)
    assert svc.chunks.claim(job_id, 1) is not None  # a worker claims chunk 1 and dies
    with runtime.engine.begin() as conn:
        conn.execute(update(ROTATION_CHUNKS).values(lease_until=utcnow()))
    for chunk_no in range(1, N // CHUNK + 1):  # chunk 1 gives up, the others complete
        svc.reencrypt_chunk(job_id, chunk_no)
    svc.finalize_job(job_id)
    assert run_json(cli_env, "jobs")[0]["status"] == "completed_with_errors"
    run(cli_env, "jobs", "resume", str(job_id), "--wait")
    [job] = run_json(cli_env, "jobs")
    census = kek_census(cli_env)
    # Resume forgets the failures of the chunk it reopens, so its rows are retried.
    assert census[1][1] == 0 and (job["status"], job["done"]) == ("completed", N), (job, census)


# --- a library defect found while writing the CLI, fixed since ---


def test_verify_of_an_unknown_job_is_refused(seeded: Any) -> None:
    from cuscred.errors import InvalidInputError

    runtime, _ = seeded
    with pytest.raises(InvalidInputError):
        runtime.job_control().verify(job_id=999999, actor="test")


def test_job_view_progress_rate_and_eta_come_from_the_counts() -> None:
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    from cuscred.jobs.views import JobView

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    running = JobView(
        id=1, kind="kek_rotation", status="running", tenant_id=None, target_kek_version=2,
        target_generation=None, requested_by="t", created_at=t0, started_at=t0,
        finished_at=None, last_error=None, passes=1, chunks=5, open_chunks=3, planned=1000,
        planned_finished=400, planned_open=600, total=398, done=390, skipped=5, failed=3,
        census_json=None,
        as_of=t0 + timedelta(seconds=8),
    )
    assert (running.processed, running.rows_total, running.fraction) == (398, 1000, 0.4)
    assert running.rate == pytest.approx(398 / 8) and running.eta_s == pytest.approx(12.0)
    cancelled = replace(running, status="cancelled", finished_at=t0 + timedelta(seconds=4),
                        open_chunks=0, planned_open=0)
    assert cancelled.final and cancelled.fraction == 0.4 and cancelled.eta_s is None
    assert cancelled.rate == pytest.approx(398 / 4)  # up to when it stopped, not until now
    done = replace(cancelled, status="completed", planned_finished=1000, total=995, done=987)
    assert (done.fraction, done.rows_total, done.processed) == (1.0, 995, 995)
    pending = replace(running, status="pending", started_at=None, planned=0, planned_open=0,
                      planned_finished=0, total=0, done=0, skipped=0, failed=0)
    assert (pending.fraction, pending.rate, pending.eta_s) == (None, None, None)
