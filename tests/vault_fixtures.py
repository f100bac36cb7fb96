"""pytest plugin: a real OpenBao server and clients for the Vault integration tests.

Fixtures:

* ``openbao`` (session): one dev server with the file audit device on. Tests must leave it
  running and unsealed; a test that stops, seals or pauses a server takes its own from
  ``openbao_factory``.
* ``openbao_factory`` (function): ``make(audit=False) -> OpenBaoServer``, started; all stopped at
  teardown.
* ``vault_client`` / ``vault_kv`` (function): an ``hvac.Client`` with the root token, built by
  :func:`cuscred.vault.build_vault_client`, and a :class:`cuscred.vault.VaultKV` over it.
* ``kv_mount`` (function): a fresh KV v2 mount with a unique name, disabled afterwards.
* ``kv_path`` (function): a unique path under the dev server's ``secret/`` KV v2 mount.
* ``approle`` (function): an AppRole auth mount whose role may read ``<kv_mount>/allowed/*``
  (helpers :func:`make_approle`, :func:`approle_settings`; :func:`limited_token` for a token
  that may read one path only).
* ``leak_guard`` (function): registers secret strings (the root token is pre-registered) and
  checks that no exception raised in a test mentions them, down its whole ``__cause__`` chain.

A missing ``bao`` binary fails loudly: it is a pinned dev dependency (``make venv``).
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import hvac
import pytest

from cuscred.config import Settings
from cuscred.errors import VaultUnavailableError
from cuscred.vault import VaultKV, build_vault_client
from tests.vault_server import OpenBaoServer


def vault_settings(server: OpenBaoServer, **overrides: Any) -> Settings:
    """Settings pointing at ``server`` with its root token (overridable)."""
    values: dict[str, Any] = {
        "kek_source": "vault",
        "vault_addr": server.addr,
        "vault_token": server.token,
        "vault_timeout_s": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    server = OpenBaoServer(
        tmp_path_factory.mktemp("openbao"), token=f"root-{secrets.token_hex(16)}", audit=True
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def openbao_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., OpenBaoServer]]:
    servers: list[OpenBaoServer] = []

    def make(*, audit: bool = False) -> OpenBaoServer:
        workdir = tmp_path_factory.mktemp("openbao-private")
        server = OpenBaoServer(workdir, token=f"root-{secrets.token_hex(16)}", audit=audit)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def vault_client(openbao: OpenBaoServer) -> hvac.Client:
    return build_vault_client(vault_settings(openbao))


@pytest.fixture
def vault_kv(vault_client: hvac.Client) -> VaultKV:
    return VaultKV(vault_client)


@pytest.fixture
def kv_mount(vault_client: hvac.Client, vault_kv: VaultKV) -> Iterator[str]:
    mount = f"kv-{uuid.uuid4().hex[:12]}"
    vault_client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    # A new KV v2 mount briefly answers 400 "upgrading ... will resume service" (mapped to
    # VaultUnavailableError), then 404 for a missing key once it is ready.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert vault_kv.metadata(mount, "probe") is None
            break
        except VaultUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield mount
    vault_client.sys.disable_secrets_engine(mount)


@pytest.fixture
def kv_path(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]
    return f"tests/{name}/{uuid.uuid4().hex[:12]}"


def limited_token(client: hvac.Client, mount: str, readable_path: str) -> str:
    """A 10-minute token whose policy may read ``mount/data/readable_path`` and nothing else."""
    name = f"only-{uuid.uuid4().hex[:8]}"
    policy = f'path "{mount}/data/{readable_path}" {{ capabilities = ["read"] }}'
    client.sys.create_or_update_policy(name, policy)
    token: str = client.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
    return token


@dataclass(frozen=True)
class AppRole:
    """An AppRole auth mount and the credentials of its role ``worker``."""

    mount: str
    role_id: str
    secret_id: str


def make_approle(
    client: hvac.Client, kv_mount: str, *, token_ttl: str = "10m", token_max_ttl: str | None = None
) -> AppRole:
    """A new AppRole auth mount whose role ``worker`` may read ``kv_mount/data/allowed/*``
    (tokens live ``token_ttl``, renewable up to ``token_max_ttl``, default the same)."""
    mount = f"approle-{uuid.uuid4().hex[:8]}"
    client.sys.enable_auth_method("approle", path=mount)
    policy = f"kv-reader-{mount}"
    client.sys.create_or_update_policy(
        policy, f'path "{kv_mount}/data/allowed/*" {{ capabilities = ["read"] }}'
    )
    client.auth.approle.create_or_update_approle(
        "worker", token_policies=[policy], token_ttl=token_ttl,
        token_max_ttl=token_max_ttl or token_ttl,
        mount_point=mount,
    )  # fmt: skip
    role_id = client.auth.approle.read_role_id("worker", mount_point=mount)["data"]["role_id"]
    secret = client.auth.approle.generate_secret_id("worker", mount_point=mount)
    return AppRole(mount, role_id, secret["data"]["secret_id"])


def approle_settings(server: OpenBaoServer, role: AppRole, **overrides: Any) -> Settings:
    """Settings that log in to ``server`` with ``role`` (no token)."""
    return vault_settings(
        server, vault_auth="approle", vault_token=None, vault_role_id=role.role_id,
        vault_secret_id=role.secret_id, vault_approle_mount=role.mount, **overrides,
    )  # fmt: skip


@pytest.fixture
def approle(vault_client: hvac.Client, kv_mount: str) -> Iterator[AppRole]:
    """An AppRole that may read ``<kv_mount>/data/allowed/*``; its auth mount is removed after."""
    role = make_approle(vault_client, kv_mount)
    yield role
    vault_client.sys.disable_auth_method(role.mount)


class LeakGuard:
    """Secret strings that must never appear in an exception or anything chained to it."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()

    def watch(self, *values: str) -> None:
        self.secrets.update(v for v in values if v)

    def check(self, exc: BaseException, *also_absent: str) -> None:
        """Fail if ``exc`` or its causes/contexts mention a secret (or ``also_absent``)."""
        forbidden = self.secrets | {v for v in also_absent if v}
        for text in _texts_of_chain(exc):
            for value in forbidden:
                assert value not in text, f"{type(exc).__name__} leaks a watched value: {text}"

    @contextmanager
    def raises(self, expected: type[BaseException], *also_absent: str) -> Iterator[Any]:
        """``pytest.raises`` that also runs :meth:`check` on the exception."""
        with pytest.raises(expected) as info:
            yield info
        self.check(info.value, *also_absent)


def _texts_of_chain(exc: BaseException) -> Iterator[str]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield str(e)
        yield repr(e)
        yield from (repr(a) for a in e.args)
        # hvac / requests attributes that could hold a URL, a body, headers or a token.
        for attr in ("url", "text", "json", "errors", "request", "response"):
            value = getattr(e, attr, None)
            if value is not None:
                yield repr(value)
                yield repr(getattr(value, "headers", None))
                yield repr(getattr(value, "body", None))
        todo += [e.__cause__, e.__context__]


@pytest.fixture
def leak_guard(openbao: OpenBaoServer) -> LeakGuard:
    guard = LeakGuard()
    guard.watch(openbao.token)
    return guard


__all__ = [
    "AppRole",
    "LeakGuard",
    "approle_settings",
    "limited_token",
    "make_approle",
    "vault_settings",
]
