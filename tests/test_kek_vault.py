"""VaultKekSource against a real OpenBao dev server."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable

import hvac
import pytest

from cuscred.crypto.keys import KEY_BYTES
from cuscred.errors import (
    ConcurrentUpdateError,
    CredentialNotFoundError,
    InvalidInputError,
    KekUnavailableError,
    KeyStateError,
    PermissionDeniedError,
    SecretVersionDeletedError,
    SecretVersionDestroyedError,
    VaultUnavailableError,
)
from cuscred.kek.source import KekSource
from cuscred.kek.vault import KV_DEFAULT_MAX_VERSIONS, VaultKekSource
from cuscred.vault import KVMetadata, VaultKV, build_vault_client
from tests.vault_fixtures import LeakGuard, limited_token, vault_settings
from tests.vault_server import OpenBaoServer

pytestmark = pytest.mark.vault


@pytest.fixture
def source(vault_kv: VaultKV, kv_mount: str, kv_path: str) -> VaultKekSource:
    return VaultKekSource(vault_kv, kv_mount, kv_path)


def stored_keys(kv: VaultKV, source: VaultKekSource, leak_guard: LeakGuard) -> list[str]:
    """The base64 key of every readable version, registered with the leak guard."""
    latest = source.latest_version() or 0
    values = []
    for version in range(1, latest + 1):
        value = kv.read(source.mount, source.path, version).data["key"]
        assert isinstance(value, str)
        values.append(value)
    leak_guard.watch(*values)
    return values


def test_versions_are_numbered_and_hold_distinct_256_bit_keys(
    vault_kv: VaultKV, source: VaultKekSource, leak_guard: LeakGuard
) -> None:
    assert isinstance(source, KekSource)
    assert source.kind == "vault"
    assert source.latest_version() is None

    assert [source.add_version() for _ in range(3)] == [1, 2, 3]

    assert source.latest_version() == 3
    keks = [source.get(v) for v in (1, 2, 3)]
    assert [k.version for k in keks] == [1, 2, 3]
    materials = [k.material() for k in keks]
    assert all(len(m) == KEY_BYTES for m in materials)
    assert len(set(materials)) == 3
    # The documented storage format: base64 of the 32 bytes in field "key".
    stored = stored_keys(vault_kv, source, leak_guard)
    assert [base64.b64decode(s) for s in stored] == materials
    for text in (repr(source), str(keks[0]), repr(keks[0])):
        leak_guard.check(Exception(text))


def test_get_is_one_kv_read_and_the_audit_log_never_holds_the_key(
    openbao: OpenBaoServer, source: VaultKekSource
) -> None:
    source.add_version()
    material = source.get(1).material()

    assert openbao.kv_reads(source.mount, source.path) == 1
    log = openbao.audit_log_path.read_text() if openbao.audit_log_path else ""
    assert base64.b64encode(material).decode() not in log


def _delete(client: hvac.Client, source: VaultKekSource) -> None:
    client.secrets.kv.v2.delete_secret_versions(source.path, [2], mount_point=source.mount)


def _destroy(client: hvac.Client, source: VaultKekSource) -> None:
    client.secrets.kv.v2.destroy_secret_versions(source.path, [2], mount_point=source.mount)


def _nothing(client: hvac.Client, source: VaultKekSource) -> None:
    pass


GONE = {
    "deleted": (_delete, 2, "was deleted", SecretVersionDeletedError),
    "destroyed": (_destroy, 2, "was destroyed", SecretVersionDestroyedError),
    "never written": (_nothing, 7, "does not exist", CredentialNotFoundError),
}


@pytest.mark.parametrize(("prepare", "version", "says", "cause"), GONE.values(), ids=GONE.keys())
def test_missing_versions_are_kek_unavailable_and_say_why(
    vault_client: hvac.Client,
    vault_kv: VaultKV,
    source: VaultKekSource,
    leak_guard: LeakGuard,
    prepare: Callable[[hvac.Client, VaultKekSource], None],
    version: int,
    says: str,
    cause: type[Exception],
) -> None:
    for _ in range(3):
        source.add_version()
    stored_keys(vault_kv, source, leak_guard)
    prepare(vault_client, source)

    with leak_guard.raises(KekUnavailableError, source.path) as info:
        source.get(version)

    assert f"KEK version {version}" in str(info.value)
    assert says in str(info.value)
    assert type(info.value.__cause__) is cause
    assert source.get(3).version == 3  # the other versions are untouched


@pytest.mark.parametrize("version", [0, -1, True])
def test_get_refuses_a_version_below_one(source: VaultKekSource, version: int) -> None:
    with pytest.raises(InvalidInputError):
        source.get(version)


MALFORMED = {
    "not base64": ({"key": "this is not base64!"}, "not valid base64"),
    "31 bytes": ({"key": base64.b64encode(b"k" * 31).decode()}, "not a 256-bit key"),
    "33 bytes": ({"key": base64.b64encode(b"k" * 33).decode()}, "not a 256-bit key"),
    "no key field": ({"other": base64.b64encode(b"k" * 32).decode()}, "no string field 'key'"),
    "key not a string": ({"key": 12345678}, "no string field 'key'"),
}


@pytest.mark.parametrize(("data", "says"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_material_is_refused_without_echoing_it(
    vault_client: hvac.Client,
    source: VaultKekSource,
    leak_guard: LeakGuard,
    data: dict[str, object],
    says: str,
) -> None:
    vault_client.secrets.kv.v2.create_or_update_secret(
        source.path, secret=data, mount_point=source.mount
    )
    leak_guard.watch(*(str(v) for v in data.values()))

    with leak_guard.raises(KekUnavailableError, source.path) as info:
        source.get(1)

    assert says in str(info.value)


class RacingKV(VaultKV):
    """The real VaultKV, with a second rotation slipped in after the first read the metadata."""

    def __init__(self, client: hvac.Client, rival: VaultKekSource) -> None:
        super().__init__(client)
        self.rival = rival

    def metadata(self, mount: str, path: str) -> KVMetadata | None:
        meta = super().metadata(mount, path)
        self.rival.add_version()
        return meta


def test_cas_conflict_refuses_the_second_rotation_and_overwrites_nothing(
    vault_client: hvac.Client,
    vault_kv: VaultKV,
    source: VaultKekSource,
    leak_guard: LeakGuard,
) -> None:
    source.add_version()
    racing = VaultKekSource(RacingKV(vault_client, rival=source), source.mount, source.path)

    with leak_guard.raises(KeyStateError, source.path) as info:
        racing.add_version()

    assert "after version 1" in str(info.value)
    assert isinstance(info.value.__cause__, ConcurrentUpdateError)
    assert source.latest_version() == 2  # the rival's version, and nothing after it
    rival_key = stored_keys(vault_kv, source, leak_guard)[1]
    assert source.get(2).material() == base64.b64decode(rival_key)
    leak_guard.check(info.value)  # again, now that the rival's key is known


class BarrierKV(VaultKV):
    """The real VaultKV, holding every rotation after its metadata read until all have read."""

    def __init__(self, client: hvac.Client, barrier: threading.Barrier) -> None:
        super().__init__(client)
        self.barrier = barrier

    def metadata(self, mount: str, path: str) -> KVMetadata | None:
        meta = super().metadata(mount, path)
        self.barrier.wait(timeout=30)
        return meta


def test_of_concurrent_rotations_exactly_one_writes(
    openbao: OpenBaoServer, source: VaultKekSource
) -> None:
    source.add_version()
    workers = 5
    barrier = threading.Barrier(workers)
    won: list[int] = []
    lost: list[Exception] = []

    def rotate() -> None:
        kv = BarrierKV(build_vault_client(vault_settings(openbao)), barrier)
        try:
            won.append(VaultKekSource(kv, source.mount, source.path).add_version())
        except KeyStateError as e:
            lost.append(e)

    threads = [threading.Thread(target=rotate) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # All five saw version 1 as current; check-and-set lets exactly one write version 2.
    assert won == [2]
    assert len(lost) == workers - 1
    assert source.latest_version() == 2


def test_add_version_refuses_to_push_out_the_oldest_kept_version(
    vault_client: hvac.Client, vault_kv: VaultKV, source: VaultKekSource, leak_guard: LeakGuard
) -> None:
    vault_client.secrets.kv.v2.update_metadata(
        source.path, max_versions=3, mount_point=source.mount
    )
    for _ in range(3):
        source.add_version()
    stored_keys(vault_kv, source, leak_guard)

    with leak_guard.raises(KeyStateError, source.path) as info:
        source.add_version()

    assert "at most 3 versions" in str(info.value)
    assert source.latest_version() == 3
    assert source.get(1).version == 1  # still there


def test_default_max_versions_is_assumed_when_the_secret_sets_none(source: VaultKekSource) -> None:
    for _ in range(KV_DEFAULT_MAX_VERSIONS):
        source.add_version()

    with pytest.raises(KeyStateError, match=f"at most {KV_DEFAULT_MAX_VERSIONS} versions"):
        source.add_version()
    assert source.get(1).version == 1


def test_a_mount_level_max_versions_is_honoured(
    vault_client: hvac.Client, vault_kv: VaultKV, source: VaultKekSource, leak_guard: LeakGuard
) -> None:
    """The secret sets no limit, so it inherits the mount's 3 (not KV's default of 10): the
    fourth write would make Vault destroy KEK version 1, and is refused."""
    vault_client.secrets.kv.v2.configure(max_versions=3, mount_point=source.mount)
    for _ in range(3):
        source.add_version()
    stored_keys(vault_kv, source, leak_guard)
    with leak_guard.raises(KeyStateError, source.path) as info:
        source.add_version()
    assert "at most 3 versions" in str(info.value) and "Nothing was written" in str(info.value)
    assert source.latest_version() == 3 and source.get(1).version == 1


def test_an_unreadable_mount_limit_is_refused_not_guessed(
    vault_client: hvac.Client, openbao: OpenBaoServer, source: VaultKekSource,
) -> None:
    source.add_version()  # v1, written with full rights
    name = f"kek-{source.mount}"
    vault_client.sys.create_or_update_policy(name, f"""
        path "{source.mount}/data/{source.path}" {{ capabilities = ["create", "read", "update"] }}
        path "{source.mount}/metadata/{source.path}" {{ capabilities = ["read"] }}
    """)
    token = vault_client.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
    limited = VaultKekSource(VaultKV(hvac.Client(url=openbao.addr, token=token)),
                             source.mount, source.path)
    with pytest.raises(KeyStateError, match="may not read") as info:
        limited.add_version()
    assert token not in str(info.value)
    assert source.latest_version() == 1
    # With the limit set on the secret itself, the mount's does not matter and is not read.
    vault_client.secrets.kv.v2.update_metadata(
        source.path, max_versions=50, mount_point=source.mount)
    assert limited.add_version() == 2


@pytest.mark.parametrize("where", ["mount", "secret"])
def test_versions_deleted_by_age_are_refused(
    vault_client: hvac.Client, source: VaultKekSource, where: str,
) -> None:
    """``delete_version_after`` would delete KEK versions that rows still use, after a while:
    no version is written to a secret or mount that does that."""
    source.add_version()
    if where == "mount":
        vault_client.secrets.kv.v2.configure(delete_version_after="1h",
                                             mount_point=source.mount)
    else:
        vault_client.secrets.kv.v2.update_metadata(
            source.path, delete_version_after="1h", mount_point=source.mount)
    with pytest.raises(KeyStateError, match="delete_version_after"):
        source.add_version()
    assert source.latest_version() == 1


def test_vault_errors_other_than_not_found_pass_through(
    openbao: OpenBaoServer,
    openbao_factory: Callable[..., OpenBaoServer],
    vault_client: hvac.Client,
    vault_kv: VaultKV,
    source: VaultKekSource,
    leak_guard: LeakGuard,
) -> None:
    source.add_version()
    stored_keys(vault_kv, source, leak_guard)
    token = limited_token(vault_client, source.mount, "somewhere/else")
    leak_guard.watch(token)
    denied = VaultKV(build_vault_client(vault_settings(openbao, vault_token=token)))
    with leak_guard.raises(PermissionDeniedError, source.path):
        VaultKekSource(denied, source.mount, source.path).get(1)

    stopped = openbao_factory()
    down = VaultKekSource(VaultKV(build_vault_client(vault_settings(stopped))), "secret", "kek")
    stopped.stop()
    with leak_guard.raises(VaultUnavailableError) as info:
        down.get(1)
    assert info.value.retryable is True
    with pytest.raises(VaultUnavailableError):
        down.add_version()


def test_from_settings_uses_the_configured_mount_and_path(
    openbao: OpenBaoServer, kv_mount: str, kv_path: str
) -> None:
    settings = vault_settings(openbao, vault_kek_mount=kv_mount, vault_kek_path=kv_path)

    source = VaultKekSource.from_settings(settings)

    assert (source.mount, source.path, source.field) == (kv_mount, kv_path, "key")
    assert source.add_version() == 1
    assert source.get(1).version == 1
