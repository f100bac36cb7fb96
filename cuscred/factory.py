"""Build the object graph from :class:`~cuscred.config.Settings`, in one place.

Every process (CLI, worker, the platform's own app) calls :func:`build_runtime` once at start-up
with settings it read with :meth:`Settings.from_env`. Nothing here runs at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cuscred.config import KekSourceKind, Settings
from cuscred.db.session import make_engine, make_session_factory
from cuscred.jobs.celery_runner import CeleryRunner
from cuscred.jobs.control import JobControl
from cuscred.jobs.local_pool import PreparePool
from cuscred.jobs.runner import InProcessRunner, JobRunner
from cuscred.jobs.service import RotationService
from cuscred.kek.local import LocalKeyring
from cuscred.kek.source import KekSource
from cuscred.kek.vault import VaultKekSource
from cuscred.services import health
from cuscred.services.audit import AuditKeys, AuditLog
from cuscred.services.credentials import CredentialService
from cuscred.services.key_admin import KeyAdmin
from cuscred.services.keys import KeyManager
from cuscred.vault.client import VaultKV


@dataclass(frozen=True)
class Runtime:
    """The long-lived objects of one process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    keys: KeyManager
    audit: AuditLog
    vault_kv: VaultKV | None

    def __repr__(self) -> str:
        return f"<Runtime env={self.settings.env} kek_source={self.settings.kek_source}>"

    def credential_service(
        self, *, environ: Mapping[str, str] | None = None, actor: str | None = None
    ) -> CredentialService:
        return CredentialService(
            self.settings, self.engine, self.keys, self.audit,
            vault_kv=self.vault_kv, environ=environ, actor=actor,
        )

    def key_admin(self, *, actor: str | None = None) -> KeyAdmin:
        return KeyAdmin(self.engine, self.keys, self.audit, actor or self.settings.default_actor)

    def rotation(
        self, runner: JobRunner | None = None, *, actor: str = "rotation-worker"
    ) -> RotationService:
        """The job service; with no runner given, Celery if a broker is configured, else
        chunks run in this process (the embedded default)."""
        if runner is None:
            runner = (CeleryRunner.from_settings(self.settings) if self.settings.broker_url_value()
                      else InProcessRunner())
        service = RotationService(self.engine, self.keys, self.audit, self.settings, runner,
                                  actor=actor)
        if isinstance(runner, InProcessRunner):
            helpers = self.settings.local_prepare_processes

            def pool() -> PreparePool:
                return PreparePool(self.settings, helpers, actor=actor)

            runner.bind(service, chunk_size=self.settings.chunk_size,
                        pool_min_rows=self.settings.local_prepare_min_rows,
                        pool=pool if helpers else None,
                        pool_timeout_s=self.settings.chunk_time_limit_s)
        return service

    def job_control(self, runner: JobRunner | None = None) -> JobControl:
        return JobControl(self.rotation(runner))

    def preflight(self) -> None:
        """Fail fast if a KEK version that rows use cannot be loaded (see
        :func:`cuscred.services.health.preflight`): one line naming the version."""
        health.preflight(self)

    def dispose(self) -> None:
        """Close pooled connections (call in a child process after fork)."""
        self.engine.dispose(close=False)
        self.keys.clear_caches()


def build_vault_kv(settings: Settings) -> VaultKV | None:
    """A Vault KV client if Vault is configured (KEK source, or tokens for references)."""
    wants_vault = settings.kek_source is KekSourceKind.VAULT or (
        settings.vault_token is not None or settings.vault_role_id is not None
    )
    return VaultKV.from_settings(settings) if wants_vault else None


def build_kek_source(settings: Settings, vault_kv: VaultKV | None) -> KekSource:
    if settings.kek_source is KekSourceKind.VAULT:
        assert vault_kv is not None  # settings validation requires Vault credentials
        return VaultKekSource(vault_kv, settings.vault_kek_mount, settings.vault_kek_path)
    return LocalKeyring(settings.keyring_path)


def build_runtime(
    settings: Settings, *, engine: Engine | None = None, preflight: bool | None = None
) -> Runtime:
    """Engine, keys and audit log for ``settings``.

    ``preflight`` (default: in production only) checks at once that every KEK version rows
    use can be loaded, so a process with a missing key fails at start-up with one line naming
    the version (:class:`ConfigurationError`) instead of failing each access later. Without it
    nothing here makes a network call.
    """
    engine = engine or make_engine(settings.database_url.get_secret_value(), hide_parameters=True)
    sessions = make_session_factory(engine)
    vault_kv = build_vault_kv(settings)
    keys = KeyManager(build_kek_source(settings, vault_kv), settings)
    audit = AuditLog(AuditKeys(keys.kek, keys.cached_active_kek_version,
                               lambda conn: keys.kek_states(conn, fresh=True)))
    runtime = Runtime(settings, engine, sessions, keys, audit, vault_kv)
    if preflight if preflight is not None else not settings.is_development:
        runtime.preflight()
    return runtime


def build_service(
    settings: Settings, *, environ: Mapping[str, str] | None = None, actor: str | None = None
) -> CredentialService:
    """Shortcut for the common case: one service over a new runtime."""
    return build_runtime(settings).credential_service(environ=environ, actor=actor)


__all__ = ["Runtime", "build_kek_source", "build_runtime", "build_service", "build_vault_kv"]
