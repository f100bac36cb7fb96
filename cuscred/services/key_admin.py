"""Operator actions on keys: census, create/register/promote/retire KEK versions.

Each state change is its own audited transaction, in DESIGN.md's order: a new version is first
recorded ``decrypt_only`` (every process can read it), then promoted to ``active`` (new writes use
it), and only retired once the census shows no row on it. A failure between steps leaves a state
from which the next step can simply be run again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, func, select

from cuscred.db.models import CREDENTIALS, KEK_VERSIONS, TENANT_KEYS, KeyState
from cuscred.services.attempts import AttemptRecorder
from cuscred.services.audit import AuditLog
from cuscred.services.keys import KeyManager
from cuscred.validation import validate_actor

_KV = KEK_VERSIONS
_TK = TENANT_KEYS
_CRED = CREDENTIALS


@dataclass(frozen=True, slots=True)
class KekVersionStatus:
    version: int
    state: str
    source: str
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None
    credentials: int


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """The census: KEK versions with their row counts, and rows per tenant key generation."""

    kek_versions: list[KekVersionStatus]
    #: Credentials on KEK versions that have no ``kek_versions`` row (must be empty).
    unregistered: dict[int, int]
    #: (tenant_id, generation, state, kdf) -> credentials
    tenant_generations: list[tuple[str, int, str, str, int]]


class KeyAdmin:
    """Audited key-version operations for the CLI and the rotation tasks."""

    def __init__(
        self, engine: Engine, keys: KeyManager, audit: AuditLog, actor: str
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._audit = audit
        self._attempts = AttemptRecorder(engine, audit)
        self.actor = actor

    def status(self, *, per_tenant: bool = True) -> KeyStatus:
        """Counts from the indexed version columns: no decryption, one grouped query each."""
        with self._engine.connect() as conn:
            census = self._keys.census(conn)
            rows = conn.execute(select(_KV).order_by(_KV.c.version)).all()
            versions = [
                KekVersionStatus(
                    version=r.version, state=r.state, source=r.source, created_at=r.created_at,
                    activated_at=r.activated_at, retired_at=r.retired_at,
                    credentials=census.get(r.version, 0),
                )
                for r in rows
            ]
            known = {v.version for v in versions}
            tenants = self._tenant_census(conn) if per_tenant else []
        unregistered = {v: n for v, n in census.items() if v not in known}
        return KeyStatus(versions, unregistered, tenants)

    @staticmethod
    def _tenant_census(conn: Connection) -> list[tuple[str, int, str, str, int]]:
        counts = (
            select(_CRED.c.tenant_id, _CRED.c.key_generation, func.count().label("n"))
            .group_by(_CRED.c.tenant_id, _CRED.c.key_generation)
            .subquery()
        )
        query = (
            select(_TK.c.tenant_id, _TK.c.generation, _TK.c.state, _TK.c.kdf,
                   func.coalesce(counts.c.n, 0))
            .outerjoin(counts, (counts.c.tenant_id == _TK.c.tenant_id)
                       & (counts.c.key_generation == _TK.c.generation))
            .order_by(_TK.c.tenant_id, _TK.c.generation)
        )
        return [(t, int(g), s, k, int(n)) for t, g, s, k, n in conn.execute(query).all()]

    def create_version(self, *, actor: str | None = None) -> int:
        """Step 1: write a new KEK version to the source and record it ``decrypt_only``.

        On a fresh installation (no version recorded yet) the first version becomes ``active``
        at once: there is nothing to keep readable and nothing to re-encrypt.
        """
        validate_actor(actor or self.actor)  # before the source is written: nothing to undo
        with self._engine.connect() as conn:
            first = not self._keys.kek_states(conn, fresh=True)
        version = self._keys.source.add_version()
        self.set_state(version, KeyState.ACTIVE if first else KeyState.DECRYPT_ONLY, actor=actor)
        return version

    def adopt_or_create(self, *, actor: str | None = None) -> int:
        """Step 1, idempotent: adopt a newer version an operator wrote, else create one."""
        validate_actor(actor or self.actor)
        with self._engine.connect() as conn:
            known = self._keys.kek_states(conn, fresh=True)
        latest = self._keys.source.latest_version()
        if latest is not None and latest not in known and latest > max(known, default=0):
            self.set_state(latest, KeyState.DECRYPT_ONLY, actor=actor)
            return latest
        return self.create_version(actor=actor)

    def set_state(self, version: int, target: KeyState, *, actor: str | None = None) -> str:
        """Move one KEK version to ``target`` (checked by
        :func:`~cuscred.services.keys.check_transition`); returns the action taken.

        Raises :class:`~cuscred.errors.KeyStateError` (with the row count when retiring a
        version still in use) and :class:`~cuscred.errors.KekUnavailableError` when a version
        that would become usable cannot be loaded.
        """
        with self._attempts.attempt("kek_state", actor or self.actor, None) as attempt:
            with self._engine.begin() as conn:
                action = self._keys.set_kek_state(conn, version, target)
                attempt.success_reason = f"v{version}:{action}"
                self._audit.append(conn, [attempt.success()])
            return action

    def promote(self, version: int, *, actor: str | None = None) -> str:
        """Step 2: make ``version`` the active one (the previous becomes ``decrypt_only``)."""
        return self.set_state(version, KeyState.ACTIVE, actor=actor)

    def retire(self, version: int, *, actor: str | None = None) -> str:
        """Step 4: refuse ``version`` from now on; refused while any row uses it."""
        return self.set_state(version, KeyState.RETIRED, actor=actor)


__all__ = ["KekVersionStatus", "KeyAdmin", "KeyStatus"]
