"""Settings: read once from an environment mapping, validated, then passed down.

Nothing in cuscred reads ``os.environ`` at import time (STYLE.md habit 7). A process builds one
:class:`Settings` with :meth:`Settings.from_env` at start-up and hands it to whatever needs it.
Every field maps to an environment variable ``CUSCRED_<FIELD NAME IN CAPITALS>``; the same names
are used by ``docker-compose.yml`` and checked by a test.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cuscred.errors import ConfigurationError

ENV_PREFIX = "CUSCRED_"
#: What a tenant id may be (cuscred.validation checks it; repeated here for the prefix check).
_TENANT_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"


def tenant_prefix_pattern(template: str) -> re.Pattern[str]:
    """A regex matching the start of every path some tenant's prefix (``template`` with
    ``{tenant_id}`` filled in) covers."""
    parts = template.split("{tenant_id}")
    return re.compile(_TENANT_ID_PATTERN.join(re.escape(p) for p in parts))


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class KekSourceKind(StrEnum):
    LOCAL = "local"
    VAULT = "vault"


class VaultAuthMethod(StrEnum):
    TOKEN = "token"  # noqa: S105 - the name of an auth method, not a password
    APPROLE = "approle"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class KdfName(StrEnum):
    HKDF_SHA256 = "hkdf-sha256"
    PBKDF2_SHA256 = "pbkdf2-sha256"


_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


class Settings(BaseSettings):
    """All configuration of the library, worker and CLI."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    env: Environment = Environment.DEVELOPMENT
    #: A SecretStr: a PostgreSQL URL may carry a password (hidden in repr, dumps and logs).
    database_url: SecretStr = SecretStr("sqlite:///.cuscred/cuscred.db")

    # Where KEK versions come from.
    kek_source: KekSourceKind = KekSourceKind.LOCAL
    keyring_path: Path = Path(".cuscred/keyring.json")

    vault_addr: str = "http://127.0.0.1:8200"
    vault_auth: VaultAuthMethod = VaultAuthMethod.TOKEN
    vault_token: SecretStr | None = None
    vault_role_id: str | None = None
    vault_secret_id: SecretStr | None = None
    vault_approle_mount: str = "approle"
    vault_namespace: str | None = None
    vault_timeout_s: float = Field(default=5.0, gt=0)
    vault_verify_tls: bool = True
    vault_ca_cert: Path | None = None
    #: KV v2 mount and path holding the KEK; every KV version of that secret is a KEK version.
    vault_kek_mount: str = "secret"
    vault_kek_path: str = "cuscred/kek"
    #: KV v2 mounts that ``vault://`` references may name (comma-separated in the environment).
    vault_ref_mounts: str = "secret"
    #: Path prefix a tenant's ``vault://`` references must lie under; ``{tenant_id}`` is replaced.
    vault_tenant_prefix: str = "tenants/{tenant_id}/"

    #: ``env://NAME`` references: development only, and only names starting with this prefix.
    env_ref_prefix: str = "DEV_SECRET_"

    # Tenant key derivation for new tenant key generations.
    kdf: KdfName = KdfName.HKDF_SHA256
    pbkdf2_iterations: int = Field(default=600_000, ge=100_000, le=100_000_000)

    # In-process caches of derived keys: bounded and short-lived.
    key_cache_size: int = Field(default=4096, ge=1)
    key_cache_ttl_s: float = Field(default=300.0, gt=0)
    #: How long a process trusts its cached view of KEK version states.
    key_state_ttl_s: float = Field(default=5.0, ge=0)

    #: Largest secret accepted, in bytes of UTF-8 (a Vertex service-account JSON is ~2.3 KB).
    max_secret_bytes: int = Field(default=16_384, ge=64, le=1_048_576)

    #: Actor recorded in the audit trail when a caller does not name one.
    default_actor: str = "cuscred"

    # --- the rotation worker ---
    #: Celery broker (Redis). Unset: jobs run their chunks in-process (embedded default).
    #: Secret: a Redis URL may carry a password.
    broker_url: SecretStr | None = None
    #: Seconds Redis waits before redelivering an unacknowledged task; must exceed the chunk
    #: task's hard time limit or a slow chunk would be delivered twice while it runs.
    broker_visibility_timeout_s: int = Field(default=3600, ge=10)
    #: Credentials per chunk task (>= 2,000 keeps broker overhead near 3%, DESIGN.md).
    chunk_size: int = Field(default=2000, ge=1, le=100_000)
    chunk_soft_time_limit_s: int = Field(default=240, ge=1)
    chunk_time_limit_s: int = Field(default=300, ge=2)
    #: A claimed chunk not finished within this many seconds is presumed crashed.
    chunk_lease_s: int = Field(default=360, ge=2)
    #: Presumed crashes of one chunk before it is marked failed (its rows left untouched).
    chunk_max_crashes: int = Field(default=3, ge=1)
    #: Claims of one chunk, for any reason, before it is marked failed: retries of a
    #: retryable error (Vault down) back off and do not count as crashes, but never go on
    #: for ever either.
    chunk_max_attempts: int = Field(default=100, ge=1)
    #: Pending chunks with no progress for this long are enqueued again (lost messages).
    chunk_requeue_after_s: int = Field(default=300, ge=1)
    #: Without a broker: helper processes that prepare (claim, read, re-encrypt) the chunks of
    #: a large job while the calling process writes them (cuscred.jobs.local_pool). 0: none,
    #: every chunk runs in the calling process. One uses a second core; more rarely help,
    #: since the writes are serial.
    local_prepare_processes: int = Field(default=1, ge=0, le=16)
    #: ...for jobs of at least this many rows (a helper takes about a second to start).
    local_prepare_min_rows: int = Field(default=50_000, ge=0)
    #: Rotate the KEK when the active version is older than this (checked daily by beat).
    kek_max_age_days: float = Field(default=90.0, ge=0)
    #: Retire the old KEK version when a rotation ends with a zero census for it.
    auto_retire: bool = False

    # --- operator visibility ---
    #: Port on which the worker serves Prometheus metrics (unset: none served).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    #: Address the metrics port binds to (the metrics hold no secret; 0.0.0.0 in a container).
    metrics_addr: str = "127.0.0.1"
    #: Worker and beat log lines: ``text``, or ``json`` (one object per line, with fields).
    log_format: LogFormat = LogFormat.TEXT

    @field_validator("vault_tenant_prefix")
    @classmethod
    def _prefix_is_a_directory_template(cls, value: str) -> str:
        if "{tenant_id}" not in value or not value.endswith("/") or value.startswith("/"):
            raise ValueError(
                "must contain {tenant_id}, end with '/' and not start with '/' "
                "(e.g. 'tenants/{tenant_id}/')"
            )
        return value

    @field_validator("env_ref_prefix")
    @classmethod
    def _env_prefix_cannot_reach_settings(cls, value: str) -> str:
        if not _ENV_NAME.match(value) or len(value) < 4:
            raise ValueError("must be 4+ upper-case letters, digits and '_'")
        # A prefix overlapping our own settings would let a tenant read e.g. the Vault token.
        if value.startswith(ENV_PREFIX) or ENV_PREFIX.startswith(value):
            raise ValueError(f"must not overlap the service's own {ENV_PREFIX}* settings")
        return value

    @model_validator(mode="after")
    def _chunk_limits_are_consistent(self) -> Settings:
        if not self.chunk_soft_time_limit_s < self.chunk_time_limit_s <= self.chunk_lease_s:
            raise ValueError(
                "need chunk_soft_time_limit_s < chunk_time_limit_s <= chunk_lease_s"
            )
        return self

    @model_validator(mode="after")
    def _vault_auth_is_complete(self) -> Settings:
        if self.kek_source is KekSourceKind.VAULT or self.env is Environment.PRODUCTION:
            if self.vault_auth is VaultAuthMethod.TOKEN and self.vault_token is None:
                raise ValueError("CUSCRED_VAULT_TOKEN is required for Vault token auth")
            if self.vault_auth is VaultAuthMethod.APPROLE and (
                not self.vault_role_id or self.vault_secret_id is None
            ):
                raise ValueError(
                    "CUSCRED_VAULT_ROLE_ID and CUSCRED_VAULT_SECRET_ID are required for AppRole"
                )
        if self.env is Environment.PRODUCTION and self.kek_source is KekSourceKind.LOCAL:
            raise ValueError("production refuses the local keyring: set CUSCRED_KEK_SOURCE=vault")
        if self.env is Environment.PRODUCTION and "vault_addr" not in self.model_fields_set:
            # The default (a Vault on localhost) is a development convenience; production must
            # say where its KEK lives.
            raise ValueError("production needs CUSCRED_VAULT_ADDR set explicitly")
        return self

    @model_validator(mode="after")
    def _no_tenant_prefix_covers_the_kek(self) -> Settings:
        # vault:// references are read with the service's own Vault token, which can read the
        # KEK: no tenant id may turn the prefix into a path above it (e.g. '{tenant_id}/' and
        # a tenant named 'cuscred' against the KEK at secret/cuscred/kek).
        if self.vault_kek_mount in self.ref_mounts and tenant_prefix_pattern(
                self.vault_tenant_prefix).match(self.vault_kek_path.strip("/")):
            raise ValueError(
                "CUSCRED_VAULT_TENANT_PREFIX would put the KEK path "
                "(CUSCRED_VAULT_KEK_MOUNT/CUSCRED_VAULT_KEK_PATH) inside a tenant's prefix for "
                "some tenant id: give the prefix a fixed first segment (e.g. "
                "'tenants/{tenant_id}/') or keep the KEK on a mount that is not in "
                "CUSCRED_VAULT_REF_MOUNTS"
            )
        return self

    @property
    def ref_mounts(self) -> frozenset[str]:
        return frozenset(m.strip() for m in self.vault_ref_mounts.split(",") if m.strip())

    def broker_url_value(self) -> str | None:
        """The broker URL in clear, for Celery only; None (or empty) means in-process."""
        if self.broker_url is None:
            return None
        return self.broker_url.get_secret_value() or None

    @property
    def is_development(self) -> bool:
        return self.env is Environment.DEVELOPMENT

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only explicit values: the environment is read by from_env(), never implicitly.
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from ``CUSCRED_*`` variables in ``environ`` (plus explicit overrides).

        Raises :class:`ConfigurationError` naming each bad variable; the message never repeats
        a value, since some values are secrets.
        """
        known = {ENV_PREFIX + name.upper(): name for name in cls.model_fields}
        unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
        if unknown:
            raise ConfigurationError(f"unknown setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {known[k]: v for k, v in environ.items() if k in known}
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    """Name each failing setting and why, without echoing the value (it may be a secret)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        name = ENV_PREFIX + loc.upper() if loc else "settings"
        parts.append(f"{name}: {err['msg']}")
    return "invalid settings: " + "; ".join(parts)


__all__ = ["ENV_PREFIX", "Environment", "KdfName", "KekSourceKind", "Settings", "VaultAuthMethod"]
