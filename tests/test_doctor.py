"""`cuscred doctor` and the start-up preflight: each check passes on a healthy installation and
fails, naming the problem and nothing secret, when that one thing is broken."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from typer.testing import CliRunner

from cuscred.cli import app
from cuscred.config import Settings
from cuscred.db.migrate import alembic_config
from cuscred.errors import ConfigurationError
from cuscred.factory import Runtime, build_runtime
from cuscred.kek.local import LocalKeyring
from cuscred.services.health import (
    check_broker,
    check_kek_versions,
    check_vault,
    kek_version_problems,
    run_checks,
)
from tests.conftest import Database
from tests.vault_fixtures import vault_settings
from tests.vault_server import OpenBaoServer
from tests.worker_fixtures import Stack, free_port, seed
from worker.app import EXIT_CONFIG

SECRET = "sk-ant-api03-" + "Zx8vB2nM4qW6eR" * 6


def _doctor(database: Database, keyring: LocalKeyring, **env: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(app, ["doctor", "--json"], env={
        "CUSCRED_DATABASE_URL": database.url, "CUSCRED_KEYRING_PATH": str(keyring.path), **env,
    })
    assert SECRET not in result.stdout + result.stderr
    return result.exit_code, json.loads(result.stdout)


def _failed(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def _store(runtime: Runtime, n: int = 3) -> None:
    svc = runtime.credential_service()
    for i in range(n):
        svc.encrypt_credential(f"tenant-{i % 2}", SECRET, {"provider": "anthropic"})


def _drop_from_keyring(keyring: LocalKeyring, version: int) -> str:
    """Remove one version from the keyring file; return its material (base64) for leak scans."""
    doc = json.loads(keyring.path.read_text())
    entry = doc["versions"].pop(str(version))
    keyring.path.write_text(json.dumps(doc))
    return str(entry["key"]) if isinstance(entry, dict) else str(entry)


def test_a_healthy_installation_passes_every_check(
    runtime: Runtime, database: Database, keyring: LocalKeyring
) -> None:
    _store(runtime)
    checks = {c.name: c for c in run_checks(runtime)}
    assert all(c.ok for c in checks.values()), checks
    assert set(checks) == {"settings", "schema", "vault", "kek_versions", "audit_chain",
                           "key_states", "broker"}
    assert checks["kek_versions"].detail == "every version in use loads (v1: 3)"
    code, report = _doctor(database, keyring)
    assert code == 0 and report["ok"] is True


def test_rows_on_a_kek_version_that_cannot_be_loaded(
    runtime: Runtime, database: Database, keyring: LocalKeyring, settings: Settings
) -> None:
    _store(runtime)
    admin = runtime.key_admin()
    admin.promote(admin.create_version())  # v2 active; the three rows stay on v1
    material = _drop_from_keyring(keyring, 1)
    runtime.keys.clear_caches()

    problems = kek_version_problems(runtime)
    assert problems == ["KEK version 1 cannot be loaded from the local source "
                        "(kek_unavailable); 3 credential(s) depend on it"]
    # Every process that builds a runtime with the preflight (the default in production)
    # stops at once, with one line naming the version.
    with pytest.raises(ConfigurationError) as info:
        build_runtime(settings, engine=database.engine, preflight=True)
    assert str(info.value) == problems[0] and "\n" not in str(info.value)
    assert material not in str(info.value)

    code, report = _doctor(database, keyring)
    assert code == 8 and report["ok"] is False
    failed = _failed(report)
    assert failed["kek_versions"] == problems[0]
    # The audit rows MAC'd under v1 can no longer be verified either: the doctor says so.
    assert failed["audit_chain"].startswith("unverifiable at row 1")
    assert material not in json.dumps(report)


def test_the_active_version_missing_is_named_as_such(
    runtime: Runtime, keyring: LocalKeyring
) -> None:
    _store(runtime, 1)
    admin = runtime.key_admin()
    admin.promote(admin.create_version())
    _drop_from_keyring(keyring, 2)
    runtime.keys.clear_caches()
    assert kek_version_problems(runtime) == [
        "KEK version 2 cannot be loaded from the local source (kek_unavailable); 0 "
        "credential(s) and every new write (it is the active version) depend on it"]


def test_an_edited_audit_row_fails_the_doctor(
    runtime: Runtime, database: Database, keyring: LocalKeyring
) -> None:
    _store(runtime)
    with runtime.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET reason = 'nothing to see' WHERE seq = 2"))
    code, report = _doctor(database, keyring)
    assert code == 8
    assert _failed(report) == {"audit_chain": "edited at row 2"}


def test_a_database_without_the_schema(tmp_path: Path, keyring: LocalKeyring) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    settings = Settings.from_env({"CUSCRED_DATABASE_URL": url,
                                  "CUSCRED_KEYRING_PATH": str(keyring.path)})
    # Nothing to check yet (this is how `cuscred db upgrade` starts in production).
    runtime = build_runtime(settings, preflight=True)
    failed = {c.name: c.detail for c in run_checks(runtime) if not c.ok}
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None and head >= "0005"
    assert failed == {
        "schema": f"database at revision none, migrations at {head}: run `cuscred db upgrade`",
        "audit_chain": "no schema yet: run `cuscred db upgrade`",
        "key_states": "no schema yet: run `cuscred db upgrade`",
    }
    runtime.engine.dispose()


def test_broker_checks_name_the_problem_not_the_url() -> None:
    base = {"CUSCRED_BROKER_URL": "redis://:brokerpw99@127.0.0.1:6379/0"}
    ok = check_broker(Settings.from_env(base))
    assert ok.ok and ok.detail.startswith("reachable")
    short = check_broker(Settings.from_env({
        **base, "CUSCRED_BROKER_VISIBILITY_TIMEOUT_S": "300", "CUSCRED_CHUNK_TIME_LIMIT_S": "300",
    }))
    assert not short.ok and "must exceed CUSCRED_CHUNK_TIME_LIMIT_S (300)" in short.detail
    gone = check_broker(Settings.from_env(
        {"CUSCRED_BROKER_URL": f"redis://:brokerpw99@127.0.0.1:{free_port()}/0"}))
    assert not gone.ok and gone.detail == "broker unreachable (ConnectionError)"
    assert "brokerpw99" not in ok.detail + short.detail + gone.detail


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_vault_checks(
    openbao_factory: Any, database: Database, tmp_path: Path
) -> None:
    server: OpenBaoServer = openbao_factory()
    dev = vault_settings(server, database_url=database.url)
    runtime = build_runtime(dev, engine=database.engine)
    runtime.key_admin().create_version()
    _store(runtime, 1)
    check = check_vault(runtime)
    assert check.ok and check.detail.startswith("unsealed, storage inmem")
    # Production refuses a dev-mode server: its KEK vanishes when the process stops.
    prod = build_runtime(vault_settings(server, database_url=database.url, env="production"),
                         engine=database.engine, preflight=False)
    check = check_vault(prod)
    assert not check.ok and "dev-mode server" in check.detail
    server.seal()
    try:
        check = check_vault(runtime)
        assert not check.ok and check.detail.startswith("sealed")
    finally:
        server.unseal()
    server.stop()
    check = check_vault(runtime)
    assert (check.ok, check.detail) == (False, "unreachable (vault_unavailable)")
    # An outage is no verdict on the keys: the start-up check logs it and lets the process
    # start (its work retries with backoff); the doctor reports it.
    runtime.keys.clear_caches()
    runtime.preflight()
    kek_check = check_kek_versions(runtime)
    assert (kek_check.ok, kek_check.detail) == (False, "could not check: vault_unavailable")
    assert server.token not in repr(run_checks(runtime))


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("command", ["worker", "beat"])
def test_worker_and_beat_refuse_to_start_on_a_missing_kek(stack: Stack, command: str) -> None:
    runtime = stack.runtime()
    seed(runtime, 20, 3)
    admin = runtime.key_admin()
    admin.promote(admin.create_version())
    keyring = LocalKeyring(Path(stack.env["CUSCRED_KEYRING_PATH"]))
    material = _drop_from_keyring(keyring, 1)
    args = ["worker", "-Q", "cuscred", "--without-mingle", "--without-gossip"]
    result = stack.run(*(args if command == "worker" else ["beat", "-s",
                                                          str(stack.workdir / "schedule")]),
                       timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_CONFIG, output
    lines = [line for line in output.splitlines() if line.startswith("cuscred: ")]
    assert lines == ["cuscred: refusing to start: KEK version 1 cannot be loaded from the local "
                     "source (kek_unavailable); 20 credential(s) depend on it"], output
    assert "Traceback" not in output and material not in output
    assert base64.b64decode(material).hex() not in output
