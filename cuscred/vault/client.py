"""A small typed adapter over hvac's KV v2 API.

:class:`VaultKV` takes an injected ``hvac.Client`` (as tink's Vault integration does) so tests
and callers choose how it authenticates; :func:`build_vault_client` builds one from
:class:`~cuscred.config.Settings` without reading the environment. Every hvac call goes through
:func:`~cuscred.vault.errors.translate_vault_errors`; nothing here catches hvac exceptions.

Policies the Vault identity needs on a KV v2 mount ``M`` and path ``P``: ``read`` on
``M/data/P`` for :meth:`VaultKV.read`, ``read`` on ``M/metadata/P`` for
:meth:`VaultKV.metadata` / :meth:`VaultKV.current_version`, ``create``/``update`` on
``M/data/P`` for :meth:`VaultKV.write`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import hvac
import requests

from cuscred.config import Settings, VaultAuthMethod
from cuscred.errors import (
    ConfigurationError,
    CredentialNotFoundError,
    CuscredTypeError,
    InvalidInputError,
    PermissionDeniedError,
    VaultError,
)
from cuscred.vault.errors import (
    describe_operation,
    missing_version_error,
    translate_vault_errors,
)
from cuscred.vault.token import Relogin, TokenKeeper

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class VaultServerStatus:
    """What ``sys/seal-status`` says: nothing secret. ``storage_type`` is ``inmem`` for a dev
    server, whose keys are gone when it stops."""

    sealed: bool
    storage_type: str | None
    version: str


@dataclass(frozen=True, eq=False)
class KVSecret:
    """One version of a KV v2 secret. ``repr()`` never shows the data; pickling is refused."""

    data: dict[str, object] = field(repr=False)
    version: int

    def __repr__(self) -> str:
        return f"<KVSecret version={self.version} fields={len(self.data)} data=<redacted>>"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        # Secret values must not reach a Celery message, a result backend or a cache.
        raise TypeError("KVSecret holds secret values and cannot be pickled")


@dataclass(frozen=True)
class KVMetadata:
    """The version bookkeeping of a KV v2 secret (no secret values)."""

    #: Newest version number ever written (0 if only metadata exists).
    current_version: int
    #: Versions KV v2 still keeps (live, deleted or destroyed); older ones are gone for good.
    version_count: int
    #: Per-secret ``max_versions``; 0 means the mount's setting (whose own default is 10).
    max_versions: int
    #: Per-secret ``delete_version_after`` (a Go duration; "0s": never, unless the mount says).
    delete_version_after: str = "0s"


@dataclass(frozen=True)
class KVMountConfig:
    """A KV v2 mount's settings for every secret in it (``<mount>/config``)."""

    #: 0: the KV default of 10.
    max_versions: int
    #: A Go duration; "0s": versions are never deleted by age.
    delete_version_after: str


class VaultKV:
    """Typed reads and writes of KV v2 secrets through an injected ``hvac.Client``.

    With ``relogin`` set (AppRole), a request refused with 403/401 triggers exactly one new
    login and one retry: the token may have expired or been revoked. A second refusal raises
    :class:`PermissionDeniedError`. Before each request a :class:`TokenKeeper` renews the
    token, or logs in again when renewal can no longer extend it (max TTL).
    """

    def __init__(self, client: hvac.Client, *, relogin: Relogin | None = None) -> None:
        self._client = client
        self._relogin = relogin
        self._token = TokenKeeper(client, relogin)

    def __repr__(self) -> str:
        return f"<VaultKV relogin={self._relogin is not None}>"

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultKV:
        """A client built by :func:`build_vault_client`, re-logging in when using AppRole.

        Raises what :func:`build_vault_client` raises.
        """
        relogin = None
        if settings.vault_auth is VaultAuthMethod.APPROLE:
            relogin = approle_relogin(settings)
        return cls(build_vault_client(settings), relogin=relogin)

    def read(self, mount: str, path: str, version: int | None = None) -> KVSecret:
        """Read one version (``None``: the latest) of the secret at ``mount``/``path``.

        Raises :class:`SecretVersionDeletedError` / :class:`SecretVersionDestroyedError` for a
        soft-deleted / destroyed version, :class:`CredentialNotFoundError` when the path or the
        version does not exist, :class:`PermissionDeniedError`, :class:`VaultUnavailableError`
        (retryable), :class:`VaultError`; :class:`InvalidInputError` for a version below 1
        (Vault would silently read the latest for 0).
        """
        _check_version(version)
        response = self._call(
            "read",
            lambda: self._client.secrets.kv.v2.read_secret_version(
                path, version=version, mount_point=mount, raise_on_deleted_version=True
            ),
            mount=mount,
            version=version,
        )
        return _parse_secret(response, mount, version)

    def metadata(self, mount: str, path: str) -> KVMetadata | None:
        """The secret's version bookkeeping, or ``None`` if nothing exists at the path.

        Raises :class:`PermissionDeniedError`, :class:`VaultUnavailableError`,
        :class:`VaultError`.
        """
        try:
            response = self._call(
                "metadata read",
                lambda: self._client.secrets.kv.v2.read_secret_metadata(path, mount_point=mount),
                mount=mount,
            )
        except CredentialNotFoundError:
            return None
        return _parse_metadata(response, mount)

    def mount_config(self, mount: str) -> KVMountConfig:
        """The KV v2 mount's ``max_versions`` and ``delete_version_after``.

        Raises :class:`PermissionDeniedError` when the policy does not allow reading
        ``<mount>/config``, :class:`VaultUnavailableError`, :class:`VaultError`.
        """
        response = self._call(
            "mount config read",
            lambda: self._client.secrets.kv.v2.read_configuration(mount_point=mount),
            mount=mount,
        )
        max_versions = _dig(response, "data", "max_versions")
        delete_after = _dig(response, "data", "delete_version_after")
        if (not isinstance(max_versions, int) or isinstance(max_versions, bool)
                or max_versions < 0 or not isinstance(delete_after, str)):
            where = describe_operation("mount config read", mount, None)
            raise VaultError(f"{where}: unexpected response shape")
        return KVMountConfig(max_versions, delete_after)

    def current_version(self, mount: str, path: str) -> int | None:
        """The newest version number written at the path, or ``None`` if there is none.

        The newest version may itself be deleted or destroyed. Raises as :meth:`metadata`.
        """
        meta = self.metadata(mount, path)
        return meta.current_version if meta is not None and meta.current_version else None

    def write(self, mount: str, path: str, data: dict[str, str], cas: int | None) -> int:
        """Write ``data`` as a new version and return its number.

        ``cas`` is the version the caller expects to be current (0: the path must not exist
        yet); ``None`` writes unconditionally. Raises :class:`ConcurrentUpdateError` when the
        check-and-set fails (nothing was written), :class:`PermissionDeniedError`,
        :class:`VaultUnavailableError`, :class:`VaultError`; :class:`CuscredTypeError` if
        ``data`` is not a mapping of strings to strings.
        """
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise CuscredTypeError("KV data must be a dict of str to str")
        response = self._call(
            "write",
            lambda: self._client.secrets.kv.v2.create_or_update_secret(
                path, secret=dict(data), cas=cas, mount_point=mount
            ),
            mount=mount,
        )
        version = _dig(response, "data", "version")
        if not isinstance(version, int) or isinstance(version, bool):
            where = describe_operation("write", mount, None)
            raise VaultError(f"{where}: response has no version number")
        return version

    def server_status(self) -> VaultServerStatus:
        """Seal state and storage backend (``sys/seal-status``, unauthenticated).

        Raises :class:`VaultUnavailableError` when Vault cannot be reached, :class:`VaultError`.
        """
        with translate_vault_errors("status read", mount="sys"):
            body = self._client.sys.read_seal_status()
        if not isinstance(body, dict):
            raise VaultError("status read: unexpected response")
        storage = body.get("storage_type")
        return VaultServerStatus(
            sealed=bool(body.get("sealed")),
            storage_type=storage if isinstance(storage, str) else None,
            version=str(body.get("version") or "?"),
        )

    def _call(
        self, operation: str, call: Callable[[], _T], *, mount: str, version: int | None = None
    ) -> _T:
        self._token.before_request()  # renew, or log in again, before the token runs out
        if self._relogin is not None:
            try:
                with translate_vault_errors(operation, mount=mount, version=version):
                    return call()
            except PermissionDeniedError:
                pass  # the token may have been revoked: log in once, retry once
            self._token.relogin()
        # Outside the except block, so a second refusal is not chained to the first one.
        with translate_vault_errors(operation, mount=mount, version=version):
            return call()


def build_vault_client(settings: Settings) -> hvac.Client:
    """An ``hvac.Client`` for ``settings``: address, namespace, timeout, TLS, authentication.

    With AppRole auth this logs in immediately. The environment is never read: requests'
    proxy and CA-bundle variables are ignored (``trust_env=False``).

    Raises :class:`ConfigurationError` when AppRole credentials are missing, and for AppRole
    :class:`PermissionDeniedError` (credentials rejected), :class:`VaultUnavailableError`,
    :class:`VaultError`.
    """
    verify: bool | str = settings.vault_verify_tls
    if settings.vault_verify_tls and settings.vault_ca_cert is not None:
        verify = str(settings.vault_ca_cert)
    session = requests.Session()
    session.trust_env = False
    session.verify = verify  # hvac prefers the session's value over its own argument
    token = settings.vault_token.get_secret_value() if settings.vault_token else ""
    client = hvac.Client(
        url=settings.vault_addr,
        # "" rather than None: with None hvac reads VAULT_TOKEN or ~/.vault-token.
        token=token if settings.vault_auth is VaultAuthMethod.TOKEN else "",
        verify=verify,
        timeout=settings.vault_timeout_s,
        namespace=settings.vault_namespace,
        session=session,
    )
    if settings.vault_auth is VaultAuthMethod.APPROLE:
        approle_relogin(settings)(client)
    return client


def approle_relogin(settings: Settings) -> Relogin:
    """A :data:`Relogin` that logs ``client`` in with the AppRole credentials of ``settings``.

    Raises :class:`ConfigurationError` at once if the credentials are missing; the returned
    callable raises :class:`PermissionDeniedError` (rejected), :class:`VaultUnavailableError`,
    :class:`VaultError`.
    """
    role_id, secret_id = settings.vault_role_id, settings.vault_secret_id
    if not role_id or secret_id is None:
        raise ConfigurationError(
            "CUSCRED_VAULT_ROLE_ID and CUSCRED_VAULT_SECRET_ID are required for AppRole"
        )
    mount = settings.vault_approle_mount

    def login(client: hvac.Client) -> None:
        with translate_vault_errors("AppRole login", mount=mount, login=True):
            client.auth.approle.login(
                role_id=role_id, secret_id=secret_id.get_secret_value(), mount_point=mount
            )

    return login


def _check_version(version: int | None) -> None:
    if version is None:
        return
    if not isinstance(version, int) or isinstance(version, bool):
        raise CuscredTypeError("a KV version must be an int")
    if version < 1:
        raise InvalidInputError("a KV version must be 1 or more")


def _dig(body: object, *keys: str) -> object:
    """``body[k1][k2]...`` on an untrusted JSON body, or None when any step is missing."""
    for key in keys:
        if not isinstance(body, dict):
            return None
        body = body.get(key)
    return body


def _parse_secret(response: Any, mount: str, version: int | None) -> KVSecret:
    data = _dig(response, "data", "data")
    metadata = _dig(response, "data", "metadata")
    got = _dig(metadata, "version")
    where = describe_operation("read", mount, version)
    if data is None and isinstance(metadata, dict):
        # A 200 without data describes a deleted version (hvac normally raises a 404 for it).
        raise missing_version_error(metadata, where)
    if not isinstance(data, dict) or not isinstance(got, int) or isinstance(got, bool):
        raise VaultError(f"{where}: unexpected response shape")
    return KVSecret(data={str(k): v for k, v in data.items()}, version=got)


def _parse_metadata(response: Any, mount: str) -> KVMetadata:
    current = _dig(response, "data", "current_version")
    max_versions = _dig(response, "data", "max_versions")
    versions = _dig(response, "data", "versions")
    if not (isinstance(current, int) and isinstance(max_versions, int)) or not isinstance(
        versions, dict
    ):
        where = describe_operation("metadata read", mount, None)
        raise VaultError(f"{where}: unexpected response shape")
    delete_after = _dig(response, "data", "delete_version_after")
    return KVMetadata(
        current_version=current, version_count=len(versions), max_versions=max_versions,
        delete_version_after=delete_after if isinstance(delete_after, str) else "0s",
    )


__all__ = [
    "KVMetadata",
    "KVMountConfig",
    "KVSecret",
    "Relogin",
    "VaultKV",
    "VaultServerStatus",
    "approle_relogin",
    "build_vault_client",
]
