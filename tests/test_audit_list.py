"""``cuscred audit list`` on SQLite and PostgreSQL: the newest events first, filtered by tenant
and action, nothing secret in them; a malformed tenant id is refused without being echoed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from cuscred.cli import app
from cuscred.errors import CredentialNotFoundError
from cuscred.factory import Runtime
from tests.conftest import Database

SECRET = "sk-proj-" + "L1stM3" * 20


def _list(env: dict[str, str], *args: str) -> tuple[int, Any, str]:
    result = CliRunner().invoke(app, ["audit", "list", *args], env=env)
    body = json.loads(result.stdout) if result.exit_code == 0 and "--json" in args else None
    return result.exit_code, body, result.stdout + result.stderr


def test_newest_first_filtered_by_tenant_and_action(
    database: Database, runtime: Runtime,
) -> None:
    env = {"CUSCRED_DATABASE_URL": database.url,
           "CUSCRED_KEYRING_PATH": str(runtime.settings.keyring_path)}
    svc = runtime.credential_service(actor="app")
    ref_a = svc.encrypt_credential("tenant-a", SECRET)
    svc.encrypt_credential("tenant-b", SECRET + "b")
    assert svc.resolve_credential("tenant-a", ref_a) == SECRET
    with pytest.raises(CredentialNotFoundError):
        svc.resolve_credential("tenant-b", ref_a)

    code, events, _ = _list(env, "--tenant", "tenant-a", "--json")
    assert code == 0
    assert [(e["action"], e["outcome"], e["credential_id"]) for e in events] == [
        ("resolve", "success", ref_a.removeprefix("encrypted://")),
        ("encrypt", "success", ref_a.removeprefix("encrypted://"))]
    assert [e["seq"] for e in events] == sorted((e["seq"] for e in events), reverse=True)
    code, events, _ = _list(env, "--action", "resolve", "--limit", "1", "--json")
    assert [(e["tenant_id"], e["outcome"], e["reason"]) for e in events] == [
        ("tenant-b", "denied", "cross_tenant")]
    code, _, output = _list(env, "--tenant", "tenant-b")
    assert code == 0 and "cross_tenant" in output and "encrypt" in output
    assert SECRET[8:30] not in output
    code, _, output = _list(env, "--tenant", "nobody-here")
    assert code == 0 and "no audit events match" in output


def test_a_malformed_tenant_id_is_refused_without_echo(
    database: Database, runtime: Runtime,
) -> None:
    env = {"CUSCRED_DATABASE_URL": database.url,
           "CUSCRED_KEYRING_PATH": str(runtime.settings.keyring_path)}
    code, _, output = _list(env, "--tenant", SECRET + "/x")
    assert code == 6 and SECRET[8:30] not in output
