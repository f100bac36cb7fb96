"""Keeping a Vault token usable for as long as the process runs.

A token has a TTL and, usually, a maximum TTL it can never be renewed past. Vault answers a
renewal with the TTL it actually *granted*, which near the maximum is less than was asked for,
and it does so with HTTP 200: a renewal that returned is not a renewal that worked. So the
keeper reads the granted TTL and, when it no longer clears the renewal margin, logs in again
(AppRole) instead of waiting for the first 403. The 403 path stays as the backstop (a revoked
token): :class:`~cuscred.vault.client.VaultKV` re-logs in once and retries once.

Nothing here logs or raises a token or a secret-id: messages carry TTLs in seconds only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import hvac

from cuscred.errors import PermissionDeniedError
from cuscred.vault.errors import translate_vault_errors

log = logging.getLogger("cuscred.vault")

#: Called with the client to authenticate it again (AppRole); see :class:`TokenKeeper`.
Relogin = Callable[[hvac.Client], None]


@dataclass(frozen=True, slots=True)
class TokenLease:
    """What Vault says of the current token. ``expires_at`` is on the monotonic clock, None for a
    token without expiry (a root token)."""

    expires_at: float | None
    ttl: float  # the TTL granted at creation: what each renewal asks for again
    renewable: bool


_UNKNOWN = TokenLease(None, 0.0, False)


def renewal_margin(ttl: float) -> float:
    """Renew once less than a third of the TTL is left (at least one second, for short TTLs)."""
    return max(1.0, ttl / 3)


class TokenKeeper:
    """Renews the client's token before it expires; logs in again when renewal cannot extend it.

    Call :meth:`before_request` before each request. Thread-safe: one renewal or login at a
    time, and a thread that waited for it does not repeat it.
    """

    def __init__(
        self, client: hvac.Client, relogin: Relogin | None, *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._relogin = relogin
        self._clock = clock
        self._lock = threading.Lock()
        self._lease: TokenLease | None = None
        self._warned_cap = False

    @property
    def lease(self) -> TokenLease | None:
        return self._lease

    def before_request(self) -> None:
        lease = self._lease
        if lease is not None and not self._due(lease):
            return
        with self._lock:
            lease = self._lease
            if lease is None:
                self._lease = self._lookup_or_relogin()
            elif self._due(lease):
                self._lease = self._refresh(lease)

    def relogin(self) -> None:
        """Log in again now (after a 403), and read the new token's lease."""
        if self._relogin is None:
            return
        with self._lock:
            self._relogin(self._client)
            self._lease = self._lookup()

    # --- internals ----------------------------------------------------------------------------

    def _due(self, lease: TokenLease) -> bool:
        if lease.expires_at is None:
            return False
        return lease.expires_at - self._clock() <= renewal_margin(lease.ttl)

    def _refresh(self, lease: TokenLease) -> TokenLease:
        if lease.renewable:
            try:
                granted = self._renew(lease.ttl)
            except PermissionDeniedError:
                granted = 0.0  # expired or revoked meanwhile: only a new login helps
            if granted > renewal_margin(lease.ttl):
                return TokenLease(self._clock() + granted, lease.ttl, True)
            # Capped by the token's max TTL: the renewal "succeeded" without buying time.
            if self._relogin is None:
                self._warn_capped(granted)
                return TokenLease(self._clock() + granted, lease.ttl, True)
        elif self._relogin is None:
            self._warn_capped(max(0.0, (lease.expires_at or 0.0) - self._clock()))
            return TokenLease(None, lease.ttl, False)  # nothing to do but wait for the 403
        assert self._relogin is not None
        self._relogin(self._client)
        log.info("Vault token near its maximum TTL: logged in again")
        return self._lookup()

    def _lookup_or_relogin(self) -> TokenLease:
        """The first lease: a token refused even a lookup of itself has expired (log in
        again) or lacks the default policy (then its expiry is unknown: the 403 path remains)."""
        try:
            return self._lookup()
        except PermissionDeniedError:
            if self._relogin is None:
                return _UNKNOWN
        self._relogin(self._client)
        try:
            return self._lookup()
        except PermissionDeniedError:
            return _UNKNOWN

    def _lookup(self) -> TokenLease:
        with translate_vault_errors("token lookup", mount="auth/token"):
            body = self._client.auth.token.lookup_self()
        data = body.get("data") if isinstance(body, dict) else None
        data = data if isinstance(data, dict) else {}
        ttl = _seconds(data.get("ttl"))
        creation_ttl = _seconds(data.get("creation_ttl")) or ttl
        if ttl <= 0:
            return TokenLease(None, creation_ttl, False)  # no expiry (root token)
        return TokenLease(self._clock() + ttl, creation_ttl, bool(data.get("renewable")))

    def _renew(self, increment: float) -> float:
        with translate_vault_errors("token renewal", mount="auth/token"):
            body = self._client.auth.token.renew_self(increment=f"{int(increment)}s")
        auth = body.get("auth") if isinstance(body, dict) else None
        granted = _seconds(auth.get("lease_duration")) if isinstance(auth, dict) else 0.0
        log.debug("Vault token renewed: asked %ss, granted %ss", int(increment), int(granted))
        return granted

    def _warn_capped(self, remaining: float) -> None:
        if not self._warned_cap:
            self._warned_cap = True
            log.warning("Vault token expires in %ds and cannot be renewed past its maximum "
                        "TTL; with token auth, give the process a new token before then",
                        int(remaining))


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


__all__ = ["Relogin", "TokenKeeper", "TokenLease", "renewal_margin"]
