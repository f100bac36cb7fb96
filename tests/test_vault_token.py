"""The Vault token lifecycle against a real OpenBao: an AppRole token with a 5 s TTL and a 10 s
maximum is renewed while renewal buys time, replaced by a new login once the maximum caps it,
and a job that runs far longer than both never meets a refused request."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import hvac
import pytest
from sqlalchemy import text

from cuscred.db.models import JobStatus
from cuscred.factory import build_runtime
from cuscred.jobs.chunks import ChunkProcessor
from cuscred.jobs.runner import InProcessRunner
from cuscred.jobs.service import RotationService
from cuscred.vault import VaultKV
from cuscred.vault.token import TokenKeeper, renewal_margin
from tests.conftest import Database
from tests.vault_fixtures import approle_settings, make_approle, vault_settings
from tests.vault_server import OpenBaoServer

_SECRET = "sk-proj-" + "Tk5nR8wQ2mZ7" * 4


def _refusals(server: OpenBaoServer) -> list[dict[str, Any]]:
    """Responses the server sent with an error (a refused or failed request)."""
    return [e for e in server.audit_entries()
            if e.get("type") == "response" and e.get("error")]


def _approle(server: OpenBaoServer, kv_mount: str) -> Any:
    root = hvac.Client(url=server.addr, token=server.token)
    return make_approle(root, kv_mount, token_ttl="5s", token_max_ttl="10s")


def test_renewal_reads_the_granted_ttl_and_logs_in_again_at_the_cap(
    openbao_factory: Any,
) -> None:
    server: OpenBaoServer = openbao_factory(audit=True)
    root_kv = VaultKV(hvac.Client(url=server.addr, token=server.token))
    root_kv.write("secret", "allowed/openai", {"api_key": _SECRET}, cas=0)
    role = _approle(server, "secret")
    settings = approle_settings(server, role)
    kv = VaultKV.from_settings(settings)

    started = time.monotonic()
    while time.monotonic() - started < 16:  # past the 10 s maximum of the first token
        assert kv.read("secret", "allowed/openai").data == {"api_key": _SECRET}
        time.sleep(0.25)

    logins = server.requests_to(f"auth/{role.mount}/login")
    renewals = server.requests_to("auth/token/renew-self")
    # Renewed while renewal bought time; logged in again when the maximum capped it (a token
    # can be renewed past 5 s but never past 10 s, so 16 s need at least one new login).
    assert len(renewals) >= 1 and len(logins) >= 2, (len(renewals), len(logins))
    # ...and every one of those reads went through on the first try: no 403 at all.
    assert _refusals(server) == []


def test_a_capped_renewal_is_not_taken_for_success() -> None:
    """Unit-level: a renewal answered 200 with a TTL below the margin triggers a new login."""
    now = [1000.0]
    calls: list[str] = []

    class FakeToken:
        def lookup_self(self) -> dict[str, Any]:
            calls.append("lookup")
            return {"data": {"ttl": 5, "creation_ttl": 5, "renewable": True}}

        def renew_self(self, increment: str) -> dict[str, Any]:
            calls.append(f"renew {increment}")
            return {"auth": {"lease_duration": 1}}  # capped: asked 5 s, granted 1 s

    class FakeClient:
        class auth:  # noqa: N801 - mirrors hvac's attribute names
            token = FakeToken()

    keeper = TokenKeeper(FakeClient(), lambda _client: calls.append("login"),  # type: ignore[arg-type]
                         clock=lambda: now[0])
    keeper.before_request()
    assert calls == ["lookup"]
    now[0] += 5 - renewal_margin(5) + 0.1  # inside the renewal margin
    keeper.before_request()
    assert calls == ["lookup", "renew 5s", "login", "lookup"]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_a_job_longer_than_the_token_max_ttl_completes(
    openbao_factory: Any, database: Database
) -> None:
    server: OpenBaoServer = openbao_factory(audit=True)
    kek = {"vault_kek_mount": "secret", "vault_kek_path": "allowed/kek",
           "database_url": database.url}
    # An operator (root token) writes KEK v1, stores credentials, writes v2 and promotes it.
    admin_rt = build_runtime(vault_settings(server, **kek), engine=database.engine)
    admin = admin_rt.key_admin()
    admin.create_version()
    svc = admin_rt.credential_service()
    refs = [svc.encrypt_credential(f"tenant-{i % 6}", f"{_SECRET}{i:04d}") for i in range(60)]
    admin.promote(admin.create_version())

    # The worker authenticates with the short-lived AppRole and keys cached for 0.3 s only, so
    # every chunk goes back to Vault; each chunk is slowed to make the job last ~15 s.
    role = _approle(server, "secret")
    worker_rt = build_runtime(
        approle_settings(server, role, chunk_size=2, key_cache_ttl_s=0.3, **kek),
        engine=database.engine)

    def slow(_pks: Sequence[int]) -> None:
        time.sleep(0.5)

    chunks = ChunkProcessor(worker_rt.engine, worker_rt.keys, worker_rt.audit,
                            worker_rt.settings, between_read_and_write=slow)
    runner = InProcessRunner()
    service = RotationService(worker_rt.engine, worker_rt.keys, worker_rt.audit,
                              worker_rt.settings, runner, chunks=chunks)
    runner.bind(service)
    job_id = service.reencrypt(requested_by="test")

    with worker_rt.engine.connect() as conn:
        row = conn.execute(text("SELECT status, total, done, skipped, failed FROM "
                                "rotation_jobs WHERE id = :id"), {"id": job_id}).one()
        versions = conn.execute(text("SELECT DISTINCT kek_version FROM credentials")).all()
    assert tuple(row) == (JobStatus.COMPLETED, 60, 60, 0, 0)
    assert versions == [(2,)]
    # The job outlived its first token (10 s maximum): it had to log in again, and no request
    # was refused on the way.
    assert len(server.requests_to(f"auth/{role.mount}/login")) >= 2
    assert _refusals(server) == []
    assert svc.resolve_credential("tenant-1", refs[1]) == f"{_SECRET}0001"
