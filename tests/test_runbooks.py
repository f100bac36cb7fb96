"""Every runbook of the README, run exactly as written on generated data, then checked from the
database and the CLI's JSON: exact counts, every credential decrypting to the value it was
given, refusals with their exit codes, and no secret in anything the runbook printed.

Runbooks 1-4, 6 and 7 run on SQLite and PostgreSQL with chunks in the CLI's own process; the
killed worker runs on both with real Celery workers and Redis; the move off the embedded
default goes from a SQLite file and a keyring to a fresh PostgreSQL database, OpenBao and Redis.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from typer.testing import CliRunner

from cuscred.cli import app
from cuscred.config import Settings
from cuscred.datagen import generate
from cuscred.db.copy import TABLES
from cuscred.db.models import CREDENTIALS, KEK_VERSIONS, TENANT_KEYS
from cuscred.db.session import make_engine
from cuscred.factory import Runtime, build_runtime
from cuscred.kek.local import LocalKeyring
from cuscred.services.keys import check_value
from cuscred.vault import VaultKV
from tests.conftest import Database, _create_pg_database, _drop_pg_database
from tests.runbook_shell import BIN, Ran, read_env, run_runbook
from tests.test_worker_faults import SHORT_LEASE, SLOW_FIRST_CHUNK, _NoRunner
from tests.vault_server import OpenBaoServer
from tests.worker_fixtures import (
    Seeded,
    Stack,
    assert_no_secrets,
    assert_rows_readable,
    kek_materials,
    process_env,
    reencrypt_events,
    seed,
    wait_for,
)

N, TENANTS, CHUNK = 300, 30, 50
#: Fast PBKDF2 for generations made in tests (the minimum the schema allows).
PBKDF2 = {"CUSCRED_PBKDF2_ITERATIONS": "100000"}


@dataclass
class Install:
    """An installation on the test's database, and what was stored in it."""

    cwd: Path
    settings: dict[str, str]
    runtime: Runtime
    data: Seeded

    def run(self, name: str, **variables: str) -> Ran:
        ran = run_runbook(name, cwd=self.cwd, settings=self.settings, variables=variables)
        assert_no_secrets({name: ran.output}, self.data.plaintexts,
                           kek_materials(self.runtime, self.versions()))
        return ran

    def versions(self) -> list[int]:
        return sorted(census(self.settings))

    def per_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tenant, _, _ in self.data.rows.values():
            counts[tenant] = counts.get(tenant, 0) + 1
        return counts


@pytest.fixture
def install(database: Database, keyring: LocalKeyring, tmp_path: Path) -> Install:
    settings = {"CUSCRED_DATABASE_URL": database.url, "CUSCRED_KEYRING_PATH": str(keyring.path),
                "CUSCRED_CHUNK_SIZE": str(CHUNK), **PBKDF2}
    runtime = build_runtime(Settings.from_env(settings), engine=database.engine)
    return Install(tmp_path, settings, runtime, seed(runtime, N, TENANTS))


def cli(settings: dict[str, str], *args: str) -> Any:
    """A read-only command's --json output (in this process)."""
    result = CliRunner().invoke(app, [*args, "--json"], env=settings)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def census(settings: dict[str, str]) -> dict[int, tuple[str, int]]:
    return {v["version"]: (v["state"], v["credentials"])
            for v in cli(settings, "keys", "status")["kek_versions"]}


def generations(settings: dict[str, str]) -> dict[tuple[str, int], tuple[str, str, int]]:
    rows = cli(settings, "keys", "status", "--tenants")["tenant_generations"]
    return {(g["tenant_id"], g["generation"]): (g["state"], g["kdf"], g["credentials"])
            for g in rows}


def only_job(settings: dict[str, str]) -> dict[str, Any]:
    [job] = cli(settings, "jobs")
    return dict(job)


def assert_job_exact(install: Install, job: dict[str, Any], kind: str, rows: int) -> None:
    assert (job["kind"], job["status"], job["done"], job["skipped"], job["failed"],
            job["total"]) == (kind, "completed", rows, 0, 0, rows)
    events = reencrypt_events(install.runtime, job["id"])
    assert len(events) == rows and set(events.values()) == {1}


# --- 1-3: KEK versions and tenant generations ------------------------------------------------


def test_rotate_kek(install: Install) -> None:
    assert census(install.settings) == {1: ("active", N)}
    ran = install.run("rotate-kek", OLD="1")
    assert "KEK v1 protects no row now" in ran.stderr
    assert "KEK version 1 is retired" in ran.stderr
    assert f"verified {N} credentials: all decrypt" in ran.stderr
    assert census(install.settings) == {1: ("retired", 0), 2: ("active", N)}
    assert_job_exact(install, only_job(install.settings), "kek_rotation", N)
    assert_rows_readable(install.runtime, install.data, kek_version=2)


def test_rekey_one_tenant(install: Install) -> None:
    tenant, mine = max(install.per_tenant().items(), key=lambda kv: kv[1])
    before = generations(install.settings)
    ran = install.run("rekey-tenant", TENANT=tenant)
    after = generations(install.settings)
    assert after.pop((tenant, 1)) == ("decrypt_only", "hkdf-sha256", 0)
    assert after.pop((tenant, 2)) == ("active", "hkdf-sha256", mine)
    del before[tenant, 1]
    assert after == before  # no other tenant touched
    job = only_job(install.settings)
    assert (job["tenant_id"], job["target_generation"]) == (tenant, 2)
    assert_job_exact(install, job, "tenant_rekey", mine)
    assert ran.stdout.count(tenant) >= 3 and f"verified {mine} credentials" in ran.stderr
    assert_rows_readable(install.runtime, install.data, kek_version=1)


def test_retire_is_refused_with_the_count_until_no_row_uses_the_version(
    install: Install,
) -> None:
    for args in (("keys", "create"), ("keys", "promote", "2")):
        assert CliRunner().invoke(app, list(args), env=install.settings).exit_code == 0
    ran = install.run("retire-kek-version", OLD="1")
    assert f"KEK version 1 is still used by {N} credential(s)" in ran.stderr
    assert "refused: exit 7" in ran.stdout
    assert "KEK version 1 is retired" in ran.stderr
    assert census(install.settings) == {1: ("retired", 0), 2: ("active", N)}
    assert_job_exact(install, only_job(install.settings), "reencrypt", N)
    assert_rows_readable(install.runtime, install.data, kek_version=2)


# --- 4: cancel, then resume ------------------------------------------------------------------


def test_cancel_a_job_then_resume_it(install: Install) -> None:
    # A KEK rotation stopped between chunks: the first one committed, the rest pending.
    service = install.runtime.rotation(_NoRunner())
    job_id, _ = service.rotate_kek(requested_by="test")
    service.advance_rotation(job_id)
    chunks = service.start_reencryption(job_id)
    assert len(chunks) == N // CHUNK
    assert service.reencrypt_chunk(job_id, chunks[0]).done == CHUNK
    job = str(job_id)

    ran = install.run("cancel-job", JOB=job)
    assert f"job {job} cancelled" in ran.stderr and "status:       running" in ran.stdout
    detail = cli(install.settings, "jobs", "show", job)
    assert detail["job"]["status"] == "cancelled"
    assert detail["chunks"]["by_status"] == {"done": 1, "cancelled": len(chunks) - 1}
    assert census(install.settings) == {1: ("decrypt_only", N - CHUNK), 2: ("active", CHUNK)}
    assert f"verified {N} credentials: all decrypt" in ran.stderr

    ran = install.run("resume-job", JOB=job)
    assert f"job {job} resumed" in ran.stderr and f"job {job} completed" in ran.stderr
    detail = cli(install.settings, "jobs", "show", job)
    assert detail["chunks"]["by_status"] == {"done": len(chunks)}
    assert_job_exact(install, detail["job"], "kek_rotation", N)
    assert census(install.settings) == {1: ("decrypt_only", 0), 2: ("active", N)}
    assert_rows_readable(install.runtime, install.data, kek_version=2)


# --- 5: a killed worker ----------------------------------------------------------------------


def test_recover_after_a_worker_was_killed(stack: Stack, tmp_path: Path) -> None:
    stack.env.update({**SLOW_FIRST_CHUNK, **SHORT_LEASE, "CUSCRED_CHUNK_SIZE": "100"})
    runtime = stack.runtime()
    data = seed(runtime, N, 20)
    worker = stack.worker(concurrency=1)
    started = CliRunner().invoke(app, ["kek", "rotate"], env=stack.env)
    assert started.exit_code == 0, started.stderr
    job_id = int(started.stdout.split()[0])

    def running() -> Any:
        return next((c for c in stack.chunks(job_id) if c.status == "running"), None)

    claimed = wait_for(running, timeout=30, interval=0.01, what="a claimed chunk",
                       details=stack.tails)
    worker.kill()  # kill -9 of the worker and its pool, mid-chunk
    assert stack.chunks(job_id)[claimed.chunk_no - 1].status == "running"
    stack.worker(concurrency=1, name="restarted")  # what a supervisor does

    ran = run_runbook("recover-killed-worker", cwd=tmp_path, settings=stack.env,
                      variables={"JOB": str(job_id)}, timeout=120)
    first_show = ran.stdout.split("completed", 1)[0]
    assert "status:       running" in first_show and "0 crashes" in first_show
    assert f"job {job_id} completed" in ran.stderr and "1 crashes" in ran.stdout
    job = stack.job(job_id)
    assert (job.status, job.total, job.done, job.skipped, job.failed) == (
        "completed", N, N, 0, 0)
    chunk = stack.chunks(job_id)[claimed.chunk_no - 1]
    assert (chunk.status, chunk.crashes, chunk.done) == ("done", 1, chunk.total)
    events = reencrypt_events(runtime, job_id)
    assert set(events) == set(data.rows) and set(events.values()) == {1}
    assert_rows_readable(runtime, data, kek_version=2)
    assert_no_secrets({"runbook": ran.output, **stack.logs()}, data.plaintexts,
                      kek_materials(runtime, [1, 2]))


# --- 6: PBKDF2 to HKDF and back --------------------------------------------------------------


@pytest.fixture
def mixed_kdf(database: Database, keyring: LocalKeyring, tmp_path: Path) -> Install:
    """Even-numbered tenants on PBKDF2 (as the original service derived them), odd on HKDF."""
    settings = {"CUSCRED_DATABASE_URL": database.url, "CUSCRED_KEYRING_PATH": str(keyring.path),
                "CUSCRED_CHUNK_SIZE": str(CHUNK), **PBKDF2}
    items = [(g.tenant_id, g.secret, {"provider": g.provider}) for g in generate(N, TENANTS)]
    rows: dict[str, tuple[str, str, dict[str, str]]] = {}
    for kdf, parity in (("pbkdf2-sha256", 0), ("hkdf-sha256", 1)):
        mine = [i for i in items if int(i[0].rsplit("-", 1)[1]) % 2 == parity]
        runtime = build_runtime(Settings.from_env({**settings, "CUSCRED_KDF": kdf}),
                                engine=database.engine)
        refs = runtime.credential_service().import_credentials(mine)
        rows.update((r.removeprefix("encrypted://"), i) for r, i in zip(refs, mine, strict=True))
    runtime = build_runtime(Settings.from_env(settings), engine=database.engine)
    return Install(tmp_path, settings, runtime, Seeded(rows))


def _active_kdfs(install: Install) -> dict[str, tuple[int, str, int | None]]:
    t = TENANT_KEYS.c
    with install.runtime.engine.connect() as conn:
        rows = conn.execute(select(t.tenant_id, t.generation, t.kdf, t.iterations)
                            .where(t.state == "active")).all()
    return {r.tenant_id: (r.generation, r.kdf, r.iterations) for r in rows}


def test_pbkdf2_tenants_move_to_hkdf_in_one_job_and_back(mixed_kdf: Install) -> None:
    install = mixed_kdf
    per_tenant = install.per_tenant()
    before = _active_kdfs(install)
    on_pbkdf2 = {t for t, (_, kdf, _) in before.items() if kdf == "pbkdf2-sha256"}
    assert on_pbkdf2 and len(on_pbkdf2) < len(before)
    moved = sum(per_tenant[t] for t in on_pbkdf2)

    ran = install.run("kdf-to-hkdf")
    after = _active_kdfs(install)
    assert {t: v for t, v in after.items() if t in on_pbkdf2} == {
        t: (2, "hkdf-sha256", None) for t in on_pbkdf2}
    assert {t: v for t, v in after.items() if t not in on_pbkdf2} == {
        t: v for t, v in before.items() if t not in on_pbkdf2}
    gens = generations(install.settings)
    assert all(gens[t, 1] == ("decrypt_only", "pbkdf2-sha256", 0) for t in on_pbkdf2)
    job = only_job(install.settings)
    assert job["tenant_id"] is None
    assert_job_exact(install, job, "reencrypt", moved)
    with install.runtime.engine.connect() as conn:
        audited = dict(conn.execute(text(
            "SELECT tenant_id, reason FROM audit_events WHERE action = 'tenant_rekey'")).all())
    assert audited == {t: f"job={job['id']} gen=2 hkdf-sha256" for t in on_pbkdf2}
    assert f"verified {N} credentials: all decrypt" in ran.stderr
    assert_rows_readable(install.runtime, install.data, kek_version=1)

    install.run("kdf-to-pbkdf2")
    back = _active_kdfs(install)
    assert {kdf for _, kdf, _ in back.values()} == {"pbkdf2-sha256"}
    assert {it for _, _, it in back.values()} == {100_000}
    assert all(back[t][0] == after[t][0] + 1 for t in back)  # every tenant: one more generation
    assert_rows_readable(install.runtime, install.data, kek_version=1)


# --- 7: crypto-shred ---------------------------------------------------------------------------


def test_shred_an_offboarded_tenant(install: Install) -> None:
    per_tenant = install.per_tenant()
    tenant = sorted(t for t, n in per_tenant.items() if n >= 3)[0]
    mine = per_tenant[tenant]
    ref = next(f"encrypted://{cid}" for cid, (t, _, _) in install.data.rows.items()
               if t == tenant)
    ran = install.run("shred-tenant", TENANT=tenant, REF=ref)
    assert f"shredded tenant {tenant}: {mine} credential(s)" in ran.stderr
    assert f"no credentials for tenant '{tenant}'" in ran.stderr
    assert "resolve refused: exit 3" in ran.stdout and "audit chain OK" in ran.stdout

    t, c = TENANT_KEYS.c, CREDENTIALS.c
    with install.runtime.engine.connect() as conn:
        assert conn.execute(select(c.pk).where(c.tenant_id == tenant)).all() == []
        keys = conn.execute(select(t.salt, t.state).where(t.tenant_id == tenant)).all()
    assert [(bytes(salt), state) for salt, state in keys] == [(b"", "retired")]
    events = cli(install.settings, "audit", "list", "--tenant", tenant, "--limit", "2")
    assert [(e["action"], e["outcome"], e["reason"]) for e in events] == [
        ("resolve", "failure", "not_found"), ("shred_tenant", "success", f"credentials={mine}")]
    report = cli(install.settings, "verify")
    assert (report["ok"], report["checked"]) == (True, N - mine)


# --- 8: off the embedded default -------------------------------------------------------------


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    """A new PostgreSQL database with no schema at all: the runbook migrates it."""
    name, url = _create_pg_database()
    yield url
    _drop_pg_database(name)


def _cuscred(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``cuscred`` on the embedded default of ``cwd`` (no CUSCRED_* setting at all)."""
    env = process_env({})
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return subprocess.run([str(BIN / "cuscred"), *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def _embedded_install(cwd: Path) -> tuple[Runtime, Seeded]:
    """What a development install has after a while: a rotation with one failed row (fixed
    since, and moved by a reencrypt job), KEK v1 retired, a shredded tenant."""
    assert _cuscred(cwd, "keygen").returncode == 0
    assert _cuscred(cwd, "db", "upgrade").returncode == 0
    runtime = build_runtime(Settings(
        database_url=f"sqlite:///{cwd / '.cuscred/cuscred.db'}",
        keyring_path=cwd / ".cuscred/keyring.json"))
    data = seed(runtime, N, TENANTS)
    c = CREDENTIALS.c
    with runtime.engine.begin() as conn:
        (pk_a, blob_a), (_, blob_b) = conn.execute(
            select(c.pk, c.ciphertext).order_by(c.pk).limit(2)).all()
        conn.execute(CREDENTIALS.update().where(c.pk == pk_a).values(ciphertext=blob_b))
    assert _cuscred(cwd, "kek", "rotate", "--wait").returncode == 9  # one row would not decrypt
    with runtime.engine.begin() as conn:
        conn.execute(CREDENTIALS.update().where(c.pk == pk_a).values(ciphertext=blob_a))
    assert _cuscred(cwd, "reencrypt", "--wait").returncode == 0
    assert _cuscred(cwd, "keys", "retire", "1").returncode == 0
    shredded = max(data.rows.values(), key=lambda r: r[0])[0]  # the last tenant: a small one
    assert _cuscred(cwd, "shred-tenant", shredded, "--yes").returncode == 0
    runtime.engine.dispose()
    return runtime, Seeded({k: v for k, v in data.rows.items() if v[0] != shredded})


def _table_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {t.name: [tuple(r) for r in conn.execute(
            select(t).order_by(*t.primary_key.columns)).all()] for t in TABLES}


@pytest.mark.vault
def test_move_from_the_embedded_default_to_postgresql_redis_and_vault(
    tmp_path: Path, empty_postgres: str, openbao: OpenBaoServer, kv_mount: str,
    vault_kv: VaultKV, broker_url: str,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    old_runtime, data = _embedded_install(site)
    file_keks = kek_materials(old_runtime, [1, 2])
    forbidden = [*file_keks, openbao.token]
    variables = {"PG_URL": empty_postgres, "REDIS_URL": broker_url,
                 "VAULT_ADDR": openbao.addr, "VAULT_TOKEN": openbao.token}
    site_settings = {"CUSCRED_VAULT_KEK_MOUNT": kv_mount, "CUSCRED_CHUNK_SIZE": "100"}
    state = tmp_path / "shell.env"

    ran = run_runbook("move-to-services", cwd=site, settings=site_settings,
                      variables=variables, env_out=state)
    assert "imported KEK versions v1, v2 into Vault" in ran.stderr
    assert f"verified {len(data)} credentials: all decrypt" in ran.stderr
    # Byte for byte: every row of the old database is in the new one, unchanged.
    source = make_engine(f"sqlite:///{site / '.cuscred/cuscred.db'}")
    target = make_engine(empty_postgres)
    old, new = _table_rows(source), _table_rows(target)
    source.dispose()
    assert {t: len(rows) for t, rows in old.items() if not rows} == {}  # every table has rows
    for table, rows in old.items():
        assert new[table][:len(rows)] == rows, table
    assert len(new["audit_events"]) > len(old["audit_events"])  # the copy, the verify runs
    # KV version N holds keyring version N.
    with target.connect() as conn:
        recorded = {v: c for v, c in conn.execute(select(KEK_VERSIONS.c.version,
                                                         KEK_VERSIONS.c.check_value))}
    for version in (1, 2):
        assert check_value(old_runtime.keys.source.get(version)) == recorded[version]
        stored = vault_kv.read(kv_mount, "cuscred/kek", version).data["key"]
        assert stored in file_keks

    settings = {k: v for k, v in read_env(state).items() if k.startswith("CUSCRED_")}
    stack = Stack(Database("postgresql", empty_postgres, target), settings, tmp_path)
    try:
        stack.worker(concurrency=1)
        stack.beat()
        ran2 = run_runbook("move-to-services-rotate", cwd=site, settings=settings,
                           variables={"FILE_VERSIONS": "2"})
        logs = stack.logs()
    finally:
        stack.kill_all()
    assert not (site / ".cuscred/keyring.json").exists()
    assert "KEK version 2 is retired" in ran2.stderr and "audit_chain" in ran2.stdout
    runtime = build_runtime(Settings.from_env(settings), engine=target)
    status = runtime.key_admin().status(per_tenant=False)
    assert [(v.version, v.state, v.source, v.credentials) for v in status.kek_versions] == [
        (1, "retired", "local", 0), (2, "retired", "local", 0),
        (3, "active", "vault", len(data))]
    job = cli(settings, "jobs", "show", "3")["job"]  # ids go on after the copied jobs 1 and 2
    assert (job["kind"], job["status"], job["done"], job["failed"]) == (
        "kek_rotation", "completed", len(data), 0)
    assert any("chunk job=3" in log for log in logs.values())  # the workers ran it
    assert_rows_readable(runtime, data, kek_version=3)
    assert_no_secrets({"move": ran.output, "rotate": ran2.output, **logs}, data.plaintexts,
                      [*forbidden, *kek_materials(runtime, [3])])
    target.dispose()
