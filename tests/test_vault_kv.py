"""VaultKV and the hvac error translation, against a real OpenBao dev server."""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hvac
import pytest
import requests
from hvac import exceptions as hvac_exc

from cuscred.errors import (
    ConcurrentUpdateError,
    ConfigurationError,
    CredentialNotFoundError,
    CuscredError,
    CuscredTypeError,
    InvalidInputError,
    PermissionDeniedError,
    SecretVersionDeletedError,
    SecretVersionDestroyedError,
    VaultError,
    VaultUnavailableError,
)
from cuscred.vault import KVSecret, Relogin, VaultKV, approle_relogin, build_vault_client
from cuscred.vault.errors import translate_vault_errors
from tests.vault_fixtures import (
    AppRole,
    LeakGuard,
    approle_settings,
    limited_token,
    make_approle,
    vault_settings,
)
from tests.vault_server import OpenBaoServer

pytestmark = pytest.mark.vault


# --- reads and writes -------------------------------------------------------------------------


def test_write_returns_new_versions_and_reads_latest_or_pinned(
    vault_kv: VaultKV, kv_mount: str, kv_path: str
) -> None:
    versions = [vault_kv.write(kv_mount, kv_path, {"key": f"value-{i}"}, cas=i) for i in range(3)]

    assert versions == [1, 2, 3]
    latest = vault_kv.read(kv_mount, kv_path)
    assert (latest.version, latest.data) == (3, {"key": "value-2"})
    pinned = vault_kv.read(kv_mount, kv_path, version=1)
    assert (pinned.version, pinned.data) == (1, {"key": "value-0"})


def test_current_version_and_metadata(
    vault_client: hvac.Client, vault_kv: VaultKV, kv_mount: str, kv_path: str
) -> None:
    assert vault_kv.current_version(kv_mount, kv_path) is None
    assert vault_kv.metadata(kv_mount, kv_path) is None
    for _ in range(2):
        vault_kv.write(kv_mount, kv_path, {"k": "v"}, cas=None)
    vault_client.secrets.kv.v2.delete_latest_version_of_secret(kv_path, mount_point=kv_mount)

    # The newest version counts even when it is deleted.
    assert vault_kv.current_version(kv_mount, kv_path) == 2
    meta = vault_kv.metadata(kv_mount, kv_path)
    assert meta is not None
    assert (meta.current_version, meta.version_count, meta.max_versions) == (2, 2, 0)
    vault_client.secrets.kv.v2.delete_metadata_and_all_versions(kv_path, mount_point=kv_mount)
    assert vault_kv.current_version(kv_mount, kv_path) is None


def test_cas_mismatch_writes_nothing(
    vault_kv: VaultKV, kv_mount: str, kv_path: str, leak_guard: LeakGuard
) -> None:
    vault_kv.write(kv_mount, kv_path, {"k": "first"}, cas=0)
    leak_guard.watch("second")

    with leak_guard.raises(ConcurrentUpdateError, kv_path) as info:
        vault_kv.write(kv_mount, kv_path, {"k": "second"}, cas=0)

    assert isinstance(info.value.__cause__, hvac_exc.InvalidRequest)
    assert vault_kv.current_version(kv_mount, kv_path) == 1
    assert vault_kv.read(kv_mount, kv_path).data == {"k": "first"}


@pytest.mark.parametrize("data", [{"k": 1}, {1: "v"}, [("k", "v")]])
def test_write_refuses_non_string_data(vault_kv: VaultKV, kv_mount: str, data: object) -> None:
    with pytest.raises(CuscredTypeError):
        vault_kv.write(kv_mount, "never-written", data, cas=None)  # type: ignore[arg-type]
    assert vault_kv.current_version(kv_mount, "never-written") is None


@pytest.mark.parametrize("version", [0, -1])
def test_read_refuses_version_below_one_without_calling_vault(
    openbao: OpenBaoServer, vault_kv: VaultKV, kv_mount: str, kv_path: str, version: int
) -> None:
    # Vault would read the latest version for 0: refuse it before any request.
    vault_kv.write(kv_mount, kv_path, {"k": "v"}, cas=0)
    with pytest.raises(InvalidInputError):
        vault_kv.read(kv_mount, kv_path, version)
    assert openbao.kv_reads(kv_mount, kv_path) == 0


def test_kv_secret_hides_its_data() -> None:
    secret = KVSecret(data={"api_key": "sk-live-very-secret"}, version=4)

    for text in (repr(secret), str(secret), f"{secret}"):
        assert "sk-live-very-secret" not in text
        assert "version=4" in text
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(secret)


def test_one_read_is_one_audited_request_and_the_audit_log_holds_no_secret(
    openbao: OpenBaoServer, vault_kv: VaultKV, kv_mount: str, kv_path: str
) -> None:
    value = f"sk-{uuid.uuid4().hex}"
    vault_kv.write(kv_mount, kv_path, {"k": value}, cas=0)

    assert vault_kv.read(kv_mount, kv_path, version=1).data == {"k": value}

    assert openbao.kv_reads(kv_mount, kv_path) == 1
    log = openbao.audit_log_path.read_text() if openbao.audit_log_path else ""
    assert f"{kv_mount}/data/{kv_path}" in log
    assert value not in log  # the file audit device HMACs values
    assert openbao.token not in log


# --- not found, deleted, destroyed, forbidden ---------------------------------------------------


@dataclass(frozen=True)
class ReadCase:
    """Prepare the server (3 versions already written), then read ``version``."""

    prepare: Callable[[hvac.Client, str, str], None]
    version: int | None
    expected: type[CuscredError]


def _nothing(client: hvac.Client, mount: str, path: str) -> None:
    pass


def _delete(*versions: int) -> Callable[[hvac.Client, str, str], None]:
    def prepare(client: hvac.Client, mount: str, path: str) -> None:
        client.secrets.kv.v2.delete_secret_versions(path, list(versions), mount_point=mount)

    return prepare


def _destroy(*versions: int) -> Callable[[hvac.Client, str, str], None]:
    def prepare(client: hvac.Client, mount: str, path: str) -> None:
        client.secrets.kv.v2.destroy_secret_versions(path, list(versions), mount_point=mount)

    return prepare


def _delete_then_destroy(client: hvac.Client, mount: str, path: str) -> None:
    _delete(2)(client, mount, path)
    _destroy(2)(client, mount, path)


def _delete_metadata(client: hvac.Client, mount: str, path: str) -> None:
    client.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point=mount)


def _overflow_max_versions(client: hvac.Client, mount: str, path: str) -> None:
    client.secrets.kv.v2.update_metadata(path, max_versions=3, mount_point=mount)
    client.secrets.kv.v2.create_or_update_secret(path, {"k": "v4"}, mount_point=mount)


READ_CASES = {
    "version above current": ReadCase(_nothing, 9, CredentialNotFoundError),
    "soft-deleted version": ReadCase(_delete(2), 2, SecretVersionDeletedError),
    "deleted latest version": ReadCase(_delete(3), None, SecretVersionDeletedError),
    "destroyed version": ReadCase(_destroy(2), 2, SecretVersionDestroyedError),
    "deleted then destroyed": ReadCase(_delete_then_destroy, 2, SecretVersionDestroyedError),
    "destroyed latest version": ReadCase(_destroy(3), None, SecretVersionDestroyedError),
    "metadata deleted (latest)": ReadCase(_delete_metadata, None, CredentialNotFoundError),
    "metadata deleted (pinned)": ReadCase(_delete_metadata, 1, CredentialNotFoundError),
    "pushed out by max_versions": ReadCase(_overflow_max_versions, 1, CredentialNotFoundError),
}


@pytest.mark.parametrize("case", READ_CASES.values(), ids=READ_CASES.keys())
def test_read_failures_are_typed(
    vault_client: hvac.Client,
    vault_kv: VaultKV,
    kv_mount: str,
    kv_path: str,
    leak_guard: LeakGuard,
    case: ReadCase,
) -> None:
    for i in range(3):
        vault_kv.write(kv_mount, kv_path, {"k": f"v{i + 1}"}, cas=None)
    case.prepare(vault_client, kv_mount, kv_path)

    with leak_guard.raises(case.expected, kv_path) as info:
        vault_kv.read(kv_mount, kv_path, case.version)

    assert type(info.value) is case.expected  # not merely a subclass
    assert not info.value.retryable
    assert repr(kv_mount) in str(info.value)
    cause: Any = info.value.__cause__
    assert isinstance(cause, hvac_exc.InvalidPath)
    assert cause.json is None  # response body scrubbed from the cause


def test_path_that_never_existed_is_not_found(
    vault_kv: VaultKV, kv_mount: str, leak_guard: LeakGuard
) -> None:
    with leak_guard.raises(CredentialNotFoundError, "tenants/acme") as info:
        vault_kv.read(kv_mount, "tenants/acme/openai")
    assert type(info.value) is CredentialNotFoundError


def test_missing_mount_is_not_found_and_the_route_is_scrubbed(
    vault_kv: VaultKV, leak_guard: LeakGuard
) -> None:
    # Vault answers 'no handler for route "<mount>/data/<path>"': the path must not survive.
    with leak_guard.raises(CredentialNotFoundError, "tenants/acme") as info:
        vault_kv.read("no-such-mount", "tenants/acme/openai")
    assert "no handler for route" in str(info.value.__cause__)


def test_forbidden_read_is_permission_denied(
    openbao: OpenBaoServer,
    vault_client: hvac.Client,
    vault_kv: VaultKV,
    kv_mount: str,
    kv_path: str,
    leak_guard: LeakGuard,
) -> None:
    vault_kv.write(kv_mount, kv_path, {"k": "v"}, cas=0)
    token = limited_token(vault_client, kv_mount, "somewhere/else")
    leak_guard.watch(token)
    limited = VaultKV(build_vault_client(vault_settings(openbao, vault_token=token)))

    with leak_guard.raises(PermissionDeniedError, kv_path) as info:
        limited.read(kv_mount, kv_path)

    assert "403" in str(info.value)
    assert not info.value.retryable


def test_environment_token_is_never_used(
    openbao: OpenBaoServer,
    kv_mount: str,
    monkeypatch: pytest.MonkeyPatch,
    leak_guard: LeakGuard,
) -> None:
    # hvac falls back to VAULT_TOKEN when given no token; settings must be the only input.
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    settings = vault_settings(openbao, kek_source="local", vault_token=None)
    kv = VaultKV(build_vault_client(settings))

    with leak_guard.raises(PermissionDeniedError):
        kv.read(kv_mount, "anything")


# --- unavailable ------------------------------------------------------------------------------


def test_stopped_server_is_unavailable_and_restart_loses_dev_data(
    openbao_factory: Callable[..., OpenBaoServer], leak_guard: LeakGuard
) -> None:
    server = openbao_factory()
    leak_guard.watch(server.token)
    kv = VaultKV(build_vault_client(vault_settings(server)))
    kv.write("secret", "tenants/acme/openai", {"api_key": "sk-stop-test"}, cas=0)
    leak_guard.watch("sk-stop-test")
    server.stop()

    with leak_guard.raises(VaultUnavailableError, "tenants/acme") as info:
        kv.read("secret", "tenants/acme/openai")
    with leak_guard.raises(VaultUnavailableError, "tenants/acme") as write_info:
        kv.write("secret", "tenants/acme/openai", {"api_key": "sk-stop-test"}, cas=1)

    for error in (info.value, write_info.value):
        assert error.retryable is True
        cause = error.__cause__
        assert isinstance(cause, requests.ConnectionError)
        assert cause.request is None  # the request carried the token and the body
    server.restart()  # dev mode is in memory: the secret is gone
    with pytest.raises(CredentialNotFoundError):
        kv.read("secret", "tenants/acme/openai")


def test_sealed_server_is_unavailable_until_unsealed(
    openbao_factory: Callable[..., OpenBaoServer], leak_guard: LeakGuard
) -> None:
    server = openbao_factory()
    leak_guard.watch(server.token, server.unseal_key or "")
    kv = VaultKV(build_vault_client(vault_settings(server)))
    kv.write("secret", "kek", {"k": "v"}, cas=0)
    server.seal()

    with leak_guard.raises(VaultUnavailableError) as info:
        kv.read("secret", "kek")

    assert info.value.retryable is True
    assert "sealed" in str(info.value)
    assert isinstance(info.value.__cause__, hvac_exc.VaultDown)
    server.unseal()  # same process: the data survives a seal
    assert kv.read("secret", "kek").data == {"k": "v"}


def test_unresponsive_server_times_out(
    openbao_factory: Callable[..., OpenBaoServer], leak_guard: LeakGuard
) -> None:
    server = openbao_factory()
    kv = VaultKV(build_vault_client(vault_settings(server, vault_timeout_s=0.5)))
    kv.write("secret", "kek", {"k": "v"}, cas=0)
    server.pause()
    try:
        with leak_guard.raises(VaultUnavailableError) as info:
            kv.read("secret", "kek")
    finally:
        server.resume()

    assert "timed out" in str(info.value)
    assert info.value.retryable is True


@pytest.fixture
def rate_limited_mount(vault_client: hvac.Client, kv_mount: str) -> Iterator[str]:
    name = f"rl-{kv_mount}"
    quota = f"/v1/sys/quotas/rate-limit/{name}"
    vault_client.adapter.post(quota, json={"path": f"{kv_mount}/", "rate": 1, "interval": "60s"})
    yield kv_mount
    vault_client.adapter.delete(quota)


def test_rate_limited_read_is_unavailable(
    vault_kv: VaultKV, rate_limited_mount: str, kv_path: str, leak_guard: LeakGuard
) -> None:
    with pytest.raises(CredentialNotFoundError):  # the one request the quota allows
        vault_kv.read(rate_limited_mount, kv_path)

    # OpenBao's 429 text quotes the request path: it must be cut from the chained cause too.
    with leak_guard.raises(VaultUnavailableError, kv_path) as info:
        vault_kv.read(rate_limited_mount, kv_path)

    assert "429" in str(info.value)
    assert info.value.retryable is True
    assert "rate limit quota exceeded" in str(info.value.__cause__)


# --- the mapping table for statuses a healthy dev server does not produce -----------------------


API_PATH = "secret/data/tenants/acme/openai"

UPGRADING = "Upgrading from non-versioned to versioned data. ... will resume service shortly."

MAPPING = {
    "500": (hvac_exc.InternalServerError, "internal error", VaultUnavailableError),
    "502": (hvac_exc.BadGateway, "bad gateway", VaultUnavailableError),
    "501": (hvac_exc.VaultNotInitialized, "not initialized", VaultUnavailableError),
    "401": (hvac_exc.Unauthorized, "no token", PermissionDeniedError),
    "400": (hvac_exc.InvalidRequest, "invalid request", VaultError),
    "400 kv upgrading": (hvac_exc.InvalidRequest, UPGRADING, VaultUnavailableError),
    "400 cas": (
        hvac_exc.InvalidRequest,
        "check-and-set parameter did not match",
        ConcurrentUpdateError,
    ),
    "unknown status": (hvac_exc.UnexpectedError, "teapot", VaultError),
    "hvac validation": (hvac_exc.ParamValidationError, "bad param", VaultError),
}


@pytest.mark.parametrize(("raised", "message", "expected"), MAPPING.values(), ids=MAPPING.keys())
def test_hvac_status_mapping_and_scrubbing(
    raised: Any, message: str, expected: type[CuscredError]
) -> None:
    guard = LeakGuard()
    guard.watch("tenants/acme", "sk-in-response-body")
    original = raised(
        errors=[f"{message} at {API_PATH}"], method="get",
        url=f"http://vault.internal:8200/v1/{API_PATH}",
        text='{"data": "sk-in-response-body"}', json={"data": "sk-in-response-body"},
    )  # fmt: skip

    with pytest.raises(expected) as info, translate_vault_errors("read", mount="secret"):
        raise original

    assert type(info.value) is expected
    assert (original.text, original.json) == (None, None)
    assert info.value.__cause__ is original
    redacted = "<path redacted>"
    assert str(original) == f"{message} at {redacted}, on get http://vault.internal:8200/{redacted}"
    guard.check(info.value)


def test_login_rejection_is_permission_denied() -> None:
    with (
        pytest.raises(PermissionDeniedError, match="credentials rejected"),
        translate_vault_errors("AppRole login", mount="approle", login=True),
    ):
        raise hvac_exc.InvalidRequest(errors=["invalid role or secret ID"])


def test_other_exceptions_pass_through_unchanged() -> None:
    with pytest.raises(KeyError), translate_vault_errors("read"):
        raise KeyError("not ours to translate")


# --- AppRole ----------------------------------------------------------------------------------


def counted(relogin: Relogin, calls: list[int]) -> Relogin:
    def wrapper(client: hvac.Client) -> None:
        calls.append(1)
        relogin(client)

    return wrapper


def test_approle_login_from_settings(
    openbao: OpenBaoServer, vault_kv: VaultKV, kv_mount: str, approle: AppRole
) -> None:
    vault_kv.write(kv_mount, "allowed/x", {"k": "v"}, cas=0)

    kv = VaultKV.from_settings(approle_settings(openbao, approle))

    assert kv.read(kv_mount, "allowed/x").data == {"k": "v"}
    assert len(openbao.requests_to(f"auth/{approle.mount}/login")) == 1


def test_revoked_token_triggers_exactly_one_relogin(
    openbao: OpenBaoServer,
    vault_client: hvac.Client,
    vault_kv: VaultKV,
    kv_mount: str,
    approle: AppRole,
) -> None:
    vault_kv.write(kv_mount, "allowed/x", {"k": "v"}, cas=0)
    settings = approle_settings(openbao, approle)
    client = build_vault_client(settings)
    calls: list[int] = []
    kv = VaultKV(client, relogin=counted(approle_relogin(settings), calls))
    first_token = client.token
    vault_client.auth.token.revoke(first_token)

    assert kv.read(kv_mount, "allowed/x").data == {"k": "v"}

    assert calls == [1]
    assert client.token != first_token
    assert len(openbao.requests_to(f"auth/{approle.mount}/login")) == 2


def test_expired_token_triggers_a_relogin(
    openbao: OpenBaoServer, vault_client: hvac.Client, vault_kv: VaultKV, kv_mount: str
) -> None:
    role = make_approle(vault_client, kv_mount, token_ttl="1s")
    vault_kv.write(kv_mount, "allowed/x", {"k": "v"}, cas=0)
    settings = approle_settings(openbao, role)
    calls: list[int] = []
    kv = VaultKV(build_vault_client(settings), relogin=counted(approle_relogin(settings), calls))
    time.sleep(1.5)

    assert kv.read(kv_mount, "allowed/x").data == {"k": "v"}
    assert calls == [1]


def test_forbidden_path_relogins_once_then_denies(
    openbao: OpenBaoServer, kv_mount: str, approle: AppRole, leak_guard: LeakGuard
) -> None:
    leak_guard.watch(approle.secret_id)
    settings = approle_settings(openbao, approle)
    client = build_vault_client(settings)
    leak_guard.watch(client.token)
    calls: list[int] = []
    kv = VaultKV(client, relogin=counted(approle_relogin(settings), calls))

    with leak_guard.raises(PermissionDeniedError, "denied/x") as info:
        kv.read(kv_mount, "denied/x")

    leak_guard.check(info.value, client.token)  # the token from the re-login
    assert calls == [1]
    # The retry's error, chained to its own hvac cause only, not to the first refusal.
    assert info.value.__context__ is info.value.__cause__
    assert info.value.__cause__.__context__ is None
    assert len(openbao.requests_to(f"auth/{approle.mount}/login")) == 2


def test_rejected_secret_id_is_permission_denied(
    openbao: OpenBaoServer, approle: AppRole, leak_guard: LeakGuard
) -> None:
    wrong = AppRole(approle.mount, approle.role_id, f"wrong-{uuid.uuid4()}")
    leak_guard.watch(wrong.secret_id, approle.secret_id, wrong.role_id)

    with leak_guard.raises(PermissionDeniedError) as info:
        build_vault_client(approle_settings(openbao, wrong))

    assert "AppRole login" in str(info.value)


def test_approle_without_credentials_is_a_configuration_error(openbao: OpenBaoServer) -> None:
    settings = vault_settings(openbao, vault_auth="approle", vault_token=None, kek_source="local")
    with pytest.raises(ConfigurationError):
        build_vault_client(settings)
