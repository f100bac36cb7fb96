"""Where KEK versions come from: one protocol, two implementations chosen by configuration.

* :class:`cuscred.kek.local.LocalKeyring`: a 0600 JSON file for the embedded default, created by
  ``cuscred keygen`` and never generated silently at start-up.
* :class:`cuscred.kek.vault.VaultKekSource`: a KV v2 secret in Vault/OpenBao; each KV version of
  the secret is one KEK version.

A source only stores and returns key material. Which version is ``active``, ``decrypt_only`` or
``retired`` is recorded in the database (``kek_versions``) by :mod:`cuscred.services.keys`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cuscred.crypto.keys import Kek


@runtime_checkable
class KekSource(Protocol):
    """Storage of versioned 256-bit KEKs."""

    #: Short name recorded with each version in ``kek_versions`` ("local" or "vault").
    kind: str

    def get(self, version: int) -> Kek:
        """Load one version.

        Raises :class:`~cuscred.errors.KekUnavailableError` when the version does not exist or
        was deleted/destroyed, :class:`~cuscred.errors.VaultUnavailableError` when the source
        cannot be reached (retryable), :class:`~cuscred.errors.PermissionDeniedError` when the
        identity may not read it.
        """
        ...

    def latest_version(self) -> int | None:
        """The newest version present in the source, or ``None`` if it holds none."""
        ...

    def add_version(self) -> int:
        """Write a new random 256-bit version and return its number."""
        ...


__all__ = ["KekSource"]
