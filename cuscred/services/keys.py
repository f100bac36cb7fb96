"""Key management: KEK versions and their states, tenant key generations, derived-key caches.

Key material comes from a :class:`~cuscred.kek.source.KekSource`; *which* version does what is
recorded in ``kek_versions`` (exactly one ``active``, enforced by a partial unique index). The
version-window invariants live in :func:`check_transition`, one function, as Vault's transit
``policy.go`` keeps them.

Caches (per process, bounded, TTL'd, never persisted or pickled):

* KEKs by version, so a worker fetches each version from Vault once per TTL, not per row;
* derived tenant keys by (tenant, generation, KEK version);
* tenant key parameters (salt, KDF) by (tenant, generation): immutable rows;
* KEK version states, for ``key_state_ttl_s`` seconds. Only the *read* path trusts this cache:
  writes read the active version inside their own transaction, so after a promotion no process
  keeps encrypting under the old version.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import threading
import time
from dataclasses import dataclass

from cachetools import LRUCache, TTLCache
from sqlalchemy import Connection, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from cuscred.config import KdfName, Settings
from cuscred.crypto.kdf import MIN_SALT_BYTES, KdfParams, derive_tenant_key, parse_kdf_name
from cuscred.crypto.keys import Kek, TenantKey
from cuscred.db.models import CREDENTIALS, KEK_VERSIONS, TENANT_KEYS, KeyState, utcnow
from cuscred.db.raw import Executor
from cuscred.errors import (
    ConfigurationError,
    DecryptionError,
    InvalidInputError,
    KekMismatchError,
    KeyStateError,
)
from cuscred.kek.source import KekSource

SALT_BYTES = 32
#: The salt of a crypto-shredded generation: the row stays so its number is never reused.
SHREDDED_SALT = b""
# Statements on the resolve path are built once (see cuscred.db.raw).
_STATES = select(KEK_VERSIONS.c.version, KEK_VERSIONS.c.state, KEK_VERSIONS.c.check_value)
_ACTIVE_FOR_SHARE = (
    select(KEK_VERSIONS.c.version).where(KEK_VERSIONS.c.state == KeyState.ACTIVE)
    .with_for_update(read=True)
)
_TENANT_PARAMS = select(TENANT_KEYS.c.salt, TENANT_KEYS.c.kdf, TENANT_KEYS.c.iterations).where(
    TENANT_KEYS.c.tenant_id == bindparam("tenant_id"),
    TENANT_KEYS.c.generation == bindparam("generation"),
)
_KV = KEK_VERSIONS
_TK = TENANT_KEYS
_CRED = CREDENTIALS

#: Allowed KEK state transitions; everything else is refused.
_TRANSITIONS: dict[tuple[str | None, KeyState], str] = {
    (None, KeyState.DECRYPT_ONLY): "register",
    (None, KeyState.ACTIVE): "bootstrap",
    (KeyState.DECRYPT_ONLY, KeyState.ACTIVE): "promote",
    (KeyState.ACTIVE, KeyState.DECRYPT_ONLY): "demote",
    (KeyState.DECRYPT_ONLY, KeyState.RETIRED): "retire",
    (KeyState.RETIRED, KeyState.DECRYPT_ONLY): "unretire",
}


def check_transition(
    version: int, current: str | None, target: KeyState, rows_on_version: int,
    *, first: bool = False,
) -> str:
    """The one place the version-window invariants are checked. Returns the action name.

    Raises :class:`KeyStateError` when the transition is not allowed: retiring the active
    version, retiring a version that rows still use, making an unregistered version active
    when others exist (it must be registered first: step 1), or any jump not in the table.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidInputError("a KEK version is a positive integer")
    action = _TRANSITIONS.get((current, target))
    if action == "bootstrap" and not first:
        action = None
    if action is None:
        raise KeyStateError(
            f"KEK version {version}: cannot go from {current or 'unregistered'} to {target}"
        )
    if target is KeyState.RETIRED and rows_on_version:
        raise KeyStateError(
            f"KEK version {version} is still used by {rows_on_version} credential(s); "
            "re-encrypt them before retiring it"
        )
    return action


def check_value(kek: Kek) -> str:
    """A public fingerprint of a KEK (HMAC of a fixed label): recorded when a version is
    registered and compared on every load, so a replaced or wrong key is refused instead of
    silently failing every decryption. Reveals nothing about the key."""
    return hmac.new(kek.material(), b"cuscred/kek-check/v1", "sha256").hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class TenantKeyParams:
    salt: bytes
    kdf: KdfParams


class KeyManager:
    """Loads, derives and caches keys; records KEK and tenant key states."""

    def __init__(self, source: KekSource, settings: Settings) -> None:
        self.source = source
        self.settings = settings
        ttl = settings.key_cache_ttl_s
        self._lock = threading.Lock()
        self._keks: TTLCache[int, Kek] = TTLCache(maxsize=256, ttl=ttl)
        self._tenant_keys: TTLCache[tuple[str, int, int], TenantKey] = TTLCache(
            maxsize=settings.key_cache_size, ttl=ttl
        )
        self._params: LRUCache[tuple[str, int], TenantKeyParams] = LRUCache(
            maxsize=settings.key_cache_size
        )
        self._states: dict[int, str] = {}
        self._check_values: dict[int, str] = {}
        self._states_read_at = float("-inf")

    def __repr__(self) -> str:
        return f"<KeyManager source={self.source!r} cached_keys=<redacted>>"

    def __reduce__(self) -> tuple[()]:
        raise TypeError("KeyManager holds key material and cannot be pickled")

    def clear_caches(self) -> None:
        """Forget every cached key (after a fork, or to force fresh reads)."""
        with self._lock:
            self._keks.clear()
            self._tenant_keys.clear()
            self._params.clear()
            self._states_read_at = float("-inf")

    # --- KEKs -------------------------------------------------------------------------------

    def kek(self, version: int) -> Kek:
        """KEK material for ``version`` regardless of its state (cached)."""
        with self._lock:
            kek = self._keks.get(version)
        if kek is None:
            kek = self.source.get(version)
            recorded = self._check_values.get(version)
            if recorded is not None and not hmac.compare_digest(recorded, check_value(kek)):
                raise KekMismatchError(
                    f"KEK version {version} from the {self.source.kind} source is not the key "
                    "recorded for that version (check value differs): wrong keyring or Vault "
                    "path, or the key was replaced"
                )
            with self._lock:
                self._keks[version] = kek
        return kek

    def kek_states(self, conn: Executor, *, fresh: bool = False) -> dict[int, str]:
        now = time.monotonic()
        if fresh or now - self._states_read_at > self.settings.key_state_ttl_s:
            rows = conn.execute(_STATES).all()
            states = {int(v): str(s) for v, s, _ in rows}
            with self._lock:
                self._states, self._states_read_at = states, now
                self._check_values.update({int(v): c for v, _, c in rows if c})
                self._forget_unchecked_keks()
        return self._states

    def _forget_unchecked_keks(self) -> None:
        """Drop cached KEKs (and keys derived from them) that do not match a check value
        learnt since they were loaded: the next use reloads and refuses them. Holds the lock."""
        for version, kek in list(self._keks.items()):
            recorded = self._check_values.get(version)
            if recorded is not None and not hmac.compare_digest(recorded, check_value(kek)):
                del self._keks[version]
                for cache_key in [k for k in self._tenant_keys if k[2] == version]:
                    del self._tenant_keys[cache_key]

    def active_kek_version(self, conn: Executor, *, fresh: bool = True) -> int:
        """The version new ciphertexts use. Adopts the source's newest version on first use."""
        states = self.kek_states(conn, fresh=fresh)
        active = [v for v, s in states.items() if s == KeyState.ACTIVE]
        if active:
            return active[0]
        if states or not isinstance(conn, Connection):
            raise ConfigurationError("no active KEK version; promote one with `cuscred keys`")
        return self._bootstrap(conn)

    def active_version_for_write(self, conn: Connection) -> int:
        """The active version, read with a share lock held to commit (PostgreSQL), so that a
        concurrent promotion waits for this write and a retirement's census includes it."""
        for _ in range(3):
            version = conn.execute(_ACTIVE_FOR_SHARE).scalar()
            if version is not None:
                return int(version)
            # None: no version yet, or a promotion committed while this statement waited (its
            # snapshot predates the new active row); a new statement sees the new state.
            if not self.kek_states(conn, fresh=True):
                return self._bootstrap(conn)
        raise ConfigurationError("no active KEK version; promote one with `cuscred keys`")

    def cached_active_kek_version(self, conn: Executor) -> int:
        return self.active_kek_version(conn, fresh=False)

    def _bootstrap(self, conn: Connection) -> int:
        # Adopting a key that exists is not generating one: a missing key stays an error.
        latest = self.source.latest_version()
        if latest is None:
            raise ConfigurationError(
                f"the {self.source.kind} KEK source holds no key; create one with "
                "`cuscred keygen` (local) or `cuscred keys create` (Vault)"
            )
        kek = self.kek(latest)  # refuse to adopt a version that cannot be loaded
        # Another process may bootstrap at the same moment: the primary key lets one win and
        # the loser reads the winner's choice below.
        with contextlib.suppress(IntegrityError), conn.begin_nested():
            conn.execute(
                _KV.insert().values(
                    version=latest, state=KeyState.ACTIVE, source=self.source.kind,
                    created_at=utcnow(), activated_at=utcnow(), check_value=check_value(kek),
                )
            )
        return self.active_kek_version(conn)

    def ensure_decryptable(self, conn: Executor, version: int) -> None:
        """Refuse a KEK version that is retired or unknown (opaquely: it is a data problem)."""
        state = self.kek_states(conn).get(version)
        if state is None or state == KeyState.RETIRED:
            state = self.kek_states(conn, fresh=True).get(version)
        if state not in (KeyState.ACTIVE, KeyState.DECRYPT_ONLY):
            raise DecryptionError()

    def census(self, conn: Connection) -> dict[int, int]:
        """Credentials per KEK version, from the indexed header-version column."""
        rows = conn.execute(
            select(_CRED.c.kek_version, func.count()).group_by(_CRED.c.kek_version)
        ).all()
        return {int(v): int(n) for v, n in rows}

    def set_kek_state(self, conn: Connection, version: int, target: KeyState) -> str:
        """Move ``version`` to ``target`` state (in the caller's transaction); returns the
        action name. Promotion demotes the previous active version in the same transaction."""
        # Lock every version row first (PostgreSQL): state changes are serialised, and a writer
        # holding the active row FOR SHARE (active_version_for_write) finishes before a
        # promotion demotes it, so the census below counts every row written under it.
        conn.execute(select(_KV.c.version).with_for_update())
        states = self.kek_states(conn, fresh=True)
        rows = self.census(conn).get(version, 0) if target is KeyState.RETIRED else 0
        action = check_transition(version, states.get(version), target, rows, first=not states)
        kek = None if target is KeyState.RETIRED else self.kek(version)  # must be loadable
        now = utcnow()
        if action in ("register", "bootstrap"):
            assert kek is not None
            conn.execute(
                _KV.insert().values(
                    version=version, state=target, source=self.source.kind, created_at=now,
                    activated_at=now if target is KeyState.ACTIVE else None,
                    check_value=check_value(kek),
                )
            )
        else:
            if target is KeyState.ACTIVE:
                conn.execute(
                    update(_KV).where(_KV.c.state == KeyState.ACTIVE)
                    .values(state=KeyState.DECRYPT_ONLY)
                )
            extra = {"activated_at": now} if target is KeyState.ACTIVE else {}
            if target is KeyState.RETIRED:
                extra = {"retired_at": now}
            conn.execute(
                update(_KV).where(_KV.c.version == version).values(state=target, **extra)
            )
        self.kek_states(conn, fresh=True)
        return action

    # --- tenant keys ------------------------------------------------------------------------

    def tenant_params(self, conn: Executor, tenant_id: str, generation: int) -> TenantKeyParams:
        """Salt and KDF of one generation (cached: they never change). A missing, shredded or
        damaged row raises :class:`DecryptionError`: nothing can decrypt under it."""
        key = (tenant_id, generation)
        params = self._params.get(key)
        if params is None:
            row = conn.execute(
                _TENANT_PARAMS, {"tenant_id": tenant_id, "generation": generation}
            ).first()
            if row is None or len(row.salt or b"") < MIN_SALT_BYTES:
                raise DecryptionError()  # never existed, or crypto-shredded
            try:
                params = TenantKeyParams(
                    salt=bytes(row.salt), kdf=KdfParams(KdfName(row.kdf), row.iterations)
                )
            except (ValueError, TypeError):
                raise DecryptionError() from None  # a tampered KDF name or iteration count
            with self._lock:
                self._params[key] = params
        return params

    def tenant_key(
        self, conn: Executor, tenant_id: str, generation: int, kek_version: int
    ) -> TenantKey:
        """The derived key for one (tenant, generation, KEK version), cached."""
        cache_key = (tenant_id, generation, kek_version)
        with self._lock:
            key = self._tenant_keys.get(cache_key)
        if key is None:
            self.kek_states(conn)  # the recorded check values, before any KEK is loaded
            params = self.tenant_params(conn, tenant_id, generation)
            key = derive_tenant_key(
                self.kek(kek_version), tenant_id=tenant_id, generation=generation,
                salt=params.salt, params=params.kdf,
            )
            with self._lock:
                self._tenant_keys[cache_key] = key
        return key

    def active_generation(self, conn: Connection, tenant_id: str, *, create: bool) -> int | None:
        """The tenant's active key generation; with ``create``, make generation 1 if none."""
        gen = conn.execute(
            select(_TK.c.generation).where(
                _TK.c.tenant_id == tenant_id, _TK.c.state == KeyState.ACTIVE
            )
        ).scalar()
        if gen is not None or not create:
            return None if gen is None else int(gen)
        try:
            return self.add_generation(conn, tenant_id)
        except IntegrityError:
            # Another transaction created the tenant's first generation at the same time.
            return self.active_generation(conn, tenant_id, create=False)

    def add_generation(
        self, conn: Connection, tenant_id: str, kdf: KdfParams | None = None
    ) -> int:
        """Create the tenant's next generation (new random salt) as active; the previous active
        one becomes ``decrypt_only``. Concurrent creators race on the primary key; one wins."""
        kdf = kdf or self.default_kdf()
        latest = conn.execute(
            select(func.max(_TK.c.generation)).where(_TK.c.tenant_id == tenant_id)
        ).scalar()
        generation = int(latest or 0) + 1
        with conn.begin_nested():
            conn.execute(
                update(_TK).where(_TK.c.tenant_id == tenant_id, _TK.c.state == KeyState.ACTIVE)
                .values(state=KeyState.DECRYPT_ONLY)
            )
            conn.execute(
                _TK.insert().values(
                    tenant_id=tenant_id, generation=generation, salt=os.urandom(SALT_BYTES),
                    kdf=kdf.name.value, iterations=kdf.iterations, state=KeyState.ACTIVE,
                    created_at=utcnow(),
                )
            )
        with self._lock:
            for key in [k for k in self._params if k[0] == tenant_id]:
                del self._params[key]
        return generation

    def default_kdf(self) -> KdfParams:
        return self.kdf_params()

    def kdf_params(self, name: KdfName | str | None = None,
                   iterations: int | None = None) -> KdfParams:
        """How a new generation derives: ``name`` (default ``CUSCRED_KDF``) and, for PBKDF2,
        ``iterations`` (default ``CUSCRED_PBKDF2_ITERATIONS``).

        Raises :class:`InvalidInputError` for an unknown KDF, an iteration count given with
        HKDF (which has none), or fewer iterations than the minimum.
        """
        kdf = self.settings.kdf if name is None else parse_kdf_name(name)
        if kdf is KdfName.PBKDF2_SHA256 and iterations is None:
            iterations = self.settings.pbkdf2_iterations
        return KdfParams(kdf, iterations)

    def tenants_on_kdf(self, conn: Connection, kdf: KdfName) -> list[str]:
        """Tenants whose active generation derives with ``kdf``, in id order. A shredded
        tenant has no active generation, so it is never among them."""
        return [str(t) for t in conn.execute(
            select(_TK.c.tenant_id).where(_TK.c.state == KeyState.ACTIVE, _TK.c.kdf == kdf.value)
            .order_by(_TK.c.tenant_id)
        ).scalars()]

    def forget_tenant(self, tenant_id: str) -> None:
        with self._lock:
            for k in [k for k in self._tenant_keys if k[0] == tenant_id]:
                del self._tenant_keys[k]
            for p in [p for p in self._params if p[0] == tenant_id]:
                del self._params[p]


__all__ = ["SALT_BYTES", "SHREDDED_SALT", "KeyManager", "TenantKeyParams", "check_transition"]
