"""Prometheus metrics: the state read from the database (census, KEK states and age, job
progress), the events counted where they happen, the worker's endpoint summing its pool
processes, `cuscred metrics` for a textfile collector, and JSON log lines. No label or value
carries a secret, a reference or a tenant id."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from typer.testing import CliRunner

from cuscred.cli import app
from cuscred.db.models import KEK_VERSIONS
from cuscred.errors import AuditWriteError, DecryptionError, KekUnavailableError
from cuscred.factory import Runtime
from cuscred.jobs.service import RotationService
from cuscred.metrics import render
from tests.conftest import Database
from tests.worker_fixtures import Stack, assert_no_secrets, free_port, seed, wait_for

SECRET = "sk-proj-" + "M3tricsN0Secret" * 3
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


def _value(exposition: str, name: str, **labels: str) -> float | None:
    return _samples(exposition).get((name, tuple(sorted(labels.items()))))


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_state_metrics_count_without_decrypting(runtime: Runtime) -> None:
    svc = runtime.credential_service()
    refs = [svc.encrypt_credential(f"tenant-{i % 3}", SECRET + str(i)) for i in range(7)]
    admin = runtime.key_admin()
    admin.promote(admin.create_version())
    svc.encrypt_credential("tenant-0", SECRET + "-on-v2")
    svc.rotate_credential("tenant-1", refs[1], SECRET + "-rotated")  # onto v2 as well
    runtime.rotation(_NoRunner()).reencrypt(requested_by="metrics-test")  # a pending job

    with runtime.engine.connect() as conn:
        activated = conn.execute(select(KEK_VERSIONS.c.activated_at).where(
            KEK_VERSIONS.c.state == "active")).scalar_one()  # UTC-aware (UtcDateTime)
    before = (datetime.now(UTC) - activated).total_seconds()
    exposition = render(runtime.engine).decode()
    after = (datetime.now(UTC) - activated).total_seconds()
    assert _value(exposition, "cuscred_state_up") == 1
    assert _value(exposition, "cuscred_credentials", kek_version="1", key_generation="1") == 6
    assert _value(exposition, "cuscred_credentials", kek_version="2", key_generation="1") == 2
    assert _value(exposition, "cuscred_kek_version_state", kek_version="1",
                  state="decrypt_only") == 1
    assert _value(exposition, "cuscred_kek_version_state", kek_version="2", state="active") == 1
    age = _value(exposition, "cuscred_active_kek_age_seconds")
    assert age is not None and before <= age <= after  # seconds since v2 was promoted
    job_rows = {dict(labels)["rows"]: v for (name, labels), v in _samples(exposition).items()
                if name == "cuscred_job_rows"}
    assert set(job_rows) == {"total", "done", "skipped", "failed"}
    # Label values are versions, ids and fixed words: no tenant id, reference or secret.
    labels = " ".join(str(k) for k in _samples(exposition))
    assert "tenant-" not in labels and "encrypted://" not in labels
    assert_no_secrets({"metrics": exposition}, [SECRET])


def test_job_progress_is_read_from_committed_chunks_while_the_job_runs(
    runtime: Runtime,
) -> None:
    """A running job's row counts are written only when it ends; the metric must show the
    chunks committed so far, as `cuscred jobs` does."""
    svc = runtime.credential_service()
    for i in range(120):
        svc.encrypt_credential(f"tenant-{i % 4}", SECRET + str(i))
    rotation = RotationService(runtime.engine, runtime.keys, runtime.audit,
                               runtime.settings.model_copy(update={"chunk_size": 50}),
                               _NoRunner())
    job_id, _ = rotation.rotate_kek(requested_by="metrics-test")
    rotation.advance_rotation(job_id)
    rotation.start_reencryption(job_id)

    def rows(exposition: str) -> dict[str, float]:
        return {dict(labels)["rows"]: v for (name, labels), v in _samples(exposition).items()
                if name == "cuscred_job_rows" and dict(labels)["job_id"] == str(job_id)}

    assert rows(render(runtime.engine).decode()) == {
        "total": 120, "done": 0, "skipped": 0, "failed": 0}
    assert rotation.reencrypt_chunk(job_id, 1).done == 50
    exposition = render(runtime.engine).decode()
    assert rows(exposition) == {"total": 120, "done": 50, "skipped": 0, "failed": 0}
    assert _value(exposition, "cuscred_jobs_running") == 1
    for chunk_no in (2, 3):
        rotation.reencrypt_chunk(job_id, chunk_no)
    rotation.finalize_job(job_id)
    # Finished jobs leave the gauge: it covers unfinished jobs only.
    exposition = render(runtime.engine).decode()
    assert rows(exposition) == {}
    assert _value(exposition, "cuscred_jobs_running") == 0


class _NoRunner:
    def advance_rotation(self, job_id: int) -> None: ...
    def start(self, job_id: int) -> None: ...
    def chunk(self, job_id: int, chunk_no: int) -> None: ...
    def finalize(self, job_id: int) -> None: ...


def test_state_down_is_reported_not_raised(tmp_path: Path) -> None:
    from cuscred.db.session import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'no-schema.db'}", hide_parameters=True)
    exposition = render(engine, with_process=False).decode()
    assert _value(exposition, "cuscred_state_up") == 0
    engine.dispose()


def test_event_metrics(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", SECRET)
    with runtime.engine.begin() as conn:  # one flipped byte of the stored tag
        blob = bytearray(conn.execute(text("SELECT ciphertext FROM credentials")).scalar_one())
        blob[-1] ^= 0x01
        conn.execute(text("UPDATE credentials SET ciphertext = :c"), {"c": bytes(blob)})
    before = _counter("cuscred_decrypt_failures_total", reason="decrypt_failed")
    with pytest.raises(DecryptionError):
        svc.resolve_credential("tenant-a", ref)
    assert _counter("cuscred_decrypt_failures_total", reason="decrypt_failed") == before + 1

    # An audit event that cannot be written fails the access, and is counted.
    before = _counter("cuscred_audit_write_failures_total")

    def no_key(*_: Any) -> Any:
        raise KekUnavailableError("audit key unavailable (test)")

    monkeypatch.setattr(runtime.audit.keys, "active", no_key)
    with pytest.raises(AuditWriteError):
        svc.encrypt_credential("tenant-a", SECRET + "x")
    assert _counter("cuscred_audit_write_failures_total") >= before + 1


def test_vault_requests_are_timed_and_errors_counted(vault_kv: Any, kv_mount: str) -> None:
    reads = _counter("cuscred_vault_request_duration_seconds_count", operation="read")
    missing = _counter("cuscred_vault_request_errors_total", operation="read", code="not_found")
    vault_kv.write(kv_mount, "metrics/here", {"k": "v"}, cas=0)
    vault_kv.read(kv_mount, "metrics/here")
    with pytest.raises(Exception, match="no secret at this path"):
        vault_kv.read(kv_mount, "metrics/absent")
    assert _counter("cuscred_vault_request_duration_seconds_count", operation="read") == reads + 2
    assert _counter("cuscred_vault_request_errors_total", operation="read",
                    code="not_found") == missing + 1


def test_cli_writes_a_textfile_atomically(database: Database, tmp_path: Path) -> None:
    env = {"CUSCRED_DATABASE_URL": database.url,
           "CUSCRED_KEYRING_PATH": str(tmp_path / "keyring.json")}
    assert CliRunner().invoke(app, ["keygen"], env=env).exit_code == 0
    put = CliRunner().invoke(app, ["put", "--tenant", "t1"], input=SECRET + "\n", env=env)
    assert put.exit_code == 0
    out = tmp_path / "cuscred.prom"
    result = CliRunner().invoke(app, ["metrics", "--output", str(out)], env=env)
    assert result.exit_code == 0, result.stderr
    exposition = out.read_text()
    assert _value(exposition, "cuscred_credentials", kek_version="1", key_generation="1") == 1
    assert list(tmp_path.glob(".cuscred.prom.*")) == []  # no temporary file left behind
    stdout = CliRunner().invoke(app, ["metrics"], env=env).stdout
    assert "cuscred_credentials{" in stdout and SECRET[8:20] not in stdout


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_worker_endpoint_sums_its_pool_and_logs_json(stack: Stack) -> None:
    port = free_port()
    stack.env.update({"CUSCRED_METRICS_PORT": str(port), "CUSCRED_LOG_FORMAT": "json"})
    runtime = stack.runtime()
    data = seed(runtime, 600, 12)
    worker = stack.worker(concurrency=2)
    job_id, _ = runtime.rotation().rotate_kek(requested_by="metrics-test")
    job = stack.wait_job(job_id, timeout=90)
    assert (job.status, job.done) == ("completed", 600)

    def scrape() -> str | None:
        with _HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body: str = response.read().decode()
        done = _samples(body).get(
            ("cuscred_chunk_duration_seconds_count", (("status", "done"),)))
        return body if done == 6 else None

    # Six chunks, run by two pool processes, counted once each in the main process's sum.
    exposition = wait_for(scrape, timeout=30, what="six chunks in the worker's metrics",
                          details=worker.tail)
    assert _value(exposition, "cuscred_credentials", kek_version="2", key_generation="1") == 600
    assert _value(exposition, "cuscred_state_up") == 1
    assert_no_secrets({"metrics": exposition}, data.plaintexts)

    chunk_lines = [json.loads(line) for line in worker.log().splitlines()
                   if line.startswith("{") and '"chunk"' in line]
    assert len(chunk_lines) == 6, worker.tail()
    for line in chunk_lines:
        assert line["job"] == job_id and line["status"] == "done" and line["rows"] == 100
        assert line["level"] == "info" and line["logger"] == "cuscred.tasks"
        assert isinstance(line["duration_ms"], int) and "timestamp" in line
