"""KEK versions stored in a Vault / OpenBao KV v2 secret.

Each KV v2 version of the secret at ``mount``/``path`` is one KEK version, with the same number.
The field (``key`` by default) holds the base64 of 32 random bytes::

    bao kv get -mount=secret -version=3 cuscred/kek   ->   key = "q3J0...=" (44 characters)

KV v2 keeps only ``max_versions`` versions of a secret and silently discards the oldest beyond
that, which would destroy a KEK that rows still use. So :meth:`VaultKekSource.add_version`
refuses to write a version that would push one out. The limit is the secret's own
``max_versions`` when set; when it is 0 the secret inherits the mount's (``<mount>/config``,
whose own 0 means 10), which is read too. A token that may not read the mount's configuration
gets a refusal, never a guess: set the limit on the secret itself
(``bao kv metadata put -max-versions=1000 -mount=secret cuscred/kek``), which both makes it
visible and overrides the mount's. For the same reason a secret or mount that deletes versions
by age (``delete_version_after``) is refused.

:meth:`VaultKekSource.import_versions` (``cuscred keys import-keyring``) moves a local keyring
here: its versions 1..N become KV versions 1..N of a secret that has none yet.

Policy needed: ``read`` on ``<mount>/data/<path>`` and ``<mount>/metadata/<path>``; ``create`` and
``update`` on ``<mount>/data/<path>`` for the identity that rotates, and ``read`` on
``<mount>/config`` unless the secret sets its own ``max_versions``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence

from cuscred.config import Settings
from cuscred.crypto.keys import KEY_BYTES, Kek
from cuscred.errors import (
    ConcurrentUpdateError,
    CredentialNotFoundError,
    CuscredError,
    InvalidInputError,
    KekUnavailableError,
    KeyStateError,
    PermissionDeniedError,
    SecretVersionDeletedError,
    SecretVersionDestroyedError,
)
from cuscred.vault.client import KVMetadata, VaultKV

#: KV v2 keeps this many versions when neither the secret nor the mount sets ``max_versions``.
KV_DEFAULT_MAX_VERSIONS = 10
#: ``delete_version_after`` values that mean "never".
_NEVER = frozenset({"0s", "0", ""})


class VaultKekSource:
    """A :class:`~cuscred.kek.source.KekSource` backed by one KV v2 secret."""

    kind = "vault"

    def __init__(self, kv: VaultKV, mount: str, path: str, field: str = "key") -> None:
        self._kv = kv
        self.mount = mount
        self.path = path
        self.field = field

    def __repr__(self) -> str:
        return f"<VaultKekSource mount={self.mount!r} path={self.path!r} field={self.field!r}>"

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultKekSource:
        """The source at ``vault_kek_mount``/``vault_kek_path`` with a client from settings.

        Raises what :meth:`VaultKV.from_settings` raises (AppRole logs in at once).
        """
        kv = VaultKV.from_settings(settings)
        return cls(kv, settings.vault_kek_mount, settings.vault_kek_path)

    def get(self, version: int) -> Kek:
        """Load KEK ``version`` (one KV read).

        Raises :class:`KekUnavailableError` when the version does not exist, was deleted or
        destroyed (the message says which) or does not hold base64 of 32 bytes;
        :class:`VaultUnavailableError` (retryable) and :class:`PermissionDeniedError` unchanged;
        :class:`InvalidInputError` for a version below 1.
        """
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidInputError("KEK version must be a positive integer")
        where = f"KEK version {version} (Vault mount {self.mount!r})"
        try:
            secret = self._kv.read(self.mount, self.path, version)
        except SecretVersionDestroyedError as e:
            raise KekUnavailableError(f"{where} was destroyed; its key material is gone") from e
        except SecretVersionDeletedError as e:
            raise KekUnavailableError(
                f"{where} was deleted; an operator can undelete it (bao kv undelete)"
            ) from e
        except CredentialNotFoundError as e:
            raise KekUnavailableError(f"{where} does not exist") from e
        return Kek(version, self._decode(secret.data.get(self.field), where))

    def latest_version(self) -> int | None:
        """The newest KV version of the secret (possibly deleted), or ``None`` if none exists.

        Raises :class:`VaultUnavailableError`, :class:`PermissionDeniedError`,
        :class:`VaultError`.
        """
        return self._kv.current_version(self.mount, self.path)

    def add_version(self) -> int:
        """Write a new random 256-bit KEK as the next KV version and return its number.

        Check-and-set on the current version: of two concurrent rotations only one writes.
        Raises :class:`KeyStateError` when another writer added a version first (nothing was
        written; re-read the state before deciding to rotate again) or when KV v2 would discard
        the oldest kept version; :class:`VaultUnavailableError`, :class:`PermissionDeniedError`,
        :class:`VaultError`.
        """
        meta = self._kv.metadata(self.mount, self.path)
        current = meta.current_version if meta is not None else 0
        kept = meta.version_count if meta is not None else 0
        limit = self._kept_at_most(meta)
        if kept >= limit:
            raise KeyStateError(
                f"the KEK secret keeps at most {limit} versions and holds {kept}: writing "
                "another would make KV v2 discard the oldest KEK version; raise max_versions "
                "in the secret's metadata first. Nothing was written"
            )
        return self._write(os.urandom(KEY_BYTES), cas=current)

    def import_versions(self, keks: Sequence[Kek]) -> None:
        """Write ``keks`` (versions 1..N, in order) as KV versions 1..N of a secret that has no
        version yet, so that KV version N holds KEK version N: ciphertext headers and audit
        rows name KEK versions by number, and :meth:`get` reads version N as KV version N.

        Refuses with :class:`KeyStateError`, writing nothing, when the secret already has a
        version or keeps fewer than N versions (KV v2 would discard the oldest). Each write is
        check-and-set on the version before it, so a concurrent writer stops the import
        instead of shifting the numbers; an error part-way carries a note saying how many
        versions were written. Raises :class:`InvalidInputError` if the versions are not
        1..N; :class:`VaultUnavailableError`, :class:`PermissionDeniedError`,
        :class:`VaultError` as :meth:`add_version`.
        """
        if not keks or [k.version for k in keks] != list(range(1, len(keks) + 1)):
            raise InvalidInputError("KEK versions to import must be 1..N, in order")
        meta = self._kv.metadata(self.mount, self.path)
        if meta is not None and meta.current_version:
            raise KeyStateError(
                f"the KEK secret (Vault mount {self.mount!r}) already holds versions up to "
                f"{meta.current_version}; a keyring is imported into an empty path only, so "
                "that KV version N is KEK version N. Nothing was written"
            )
        limit = self._kept_at_most(meta)
        if len(keks) > limit:
            raise KeyStateError(
                f"the keyring holds {len(keks)} versions but the KEK secret keeps at most "
                f"{limit}: KV v2 would discard the oldest; raise max_versions in the secret's "
                "metadata first. Nothing was written"
            )
        for kek in keks:
            try:
                written = self._write(kek.material(), cas=kek.version - 1)
            except CuscredError as exc:
                if kek.version > 1:
                    exc.add_note(f"KEK versions 1..{kek.version - 1} were written to Vault "
                                 "before this error")
                raise
            if written != kek.version:  # cas makes this impossible; never trust it silently
                raise KeyStateError(f"Vault stored KEK version {kek.version} as KV version "
                                    f"{written}: remove the secret and import again")

    def _kept_at_most(self, meta: KVMetadata | None) -> int:
        """How many versions KV v2 keeps of the KEK secret: its own ``max_versions``, else
        the mount's, else KV's default. Raises :class:`KeyStateError` when the mount's limit
        applies but cannot be read (nothing is assumed: a guess of 10 once let a mount set to
        3 destroy KEK versions in use), or when the secret or the mount deletes versions by
        age (``delete_version_after``): a KEK version must stay until it is retired."""
        if meta is not None and meta.delete_version_after not in _NEVER:
            raise KeyStateError(self._deletes_by_age("secret"))
        try:
            mount = self._kv.mount_config(self.mount)
        except PermissionDeniedError as e:
            if meta is not None and meta.max_versions > 0:
                return meta.max_versions  # its own limit overrides the mount's
            raise KeyStateError(
                f"cannot tell how many versions the KEK secret keeps (Vault mount "
                f"{self.mount!r}): it inherits the mount's max_versions, which this token may "
                "not read. Set max_versions on the secret (bao kv metadata put "
                "-max-versions=1000 ...) or allow reading <mount>/config. Nothing was written"
            ) from e
        if mount.delete_version_after not in _NEVER:
            raise KeyStateError(self._deletes_by_age("mount"))
        if meta is not None and meta.max_versions > 0:
            return meta.max_versions
        return mount.max_versions or KV_DEFAULT_MAX_VERSIONS

    def _deletes_by_age(self, where: str) -> str:
        return (f"the KEK {where} (Vault mount {self.mount!r}) sets delete_version_after: KV v2 "
                "would delete KEK versions by age, while rows still use them. Set it to 0s. "
                "Nothing was written")

    def _write(self, material: bytes, *, cas: int) -> int:
        value = base64.b64encode(material).decode("ascii")
        try:
            return self._kv.write(self.mount, self.path, {self.field: value}, cas=cas)
        except ConcurrentUpdateError as e:
            raise KeyStateError(
                f"another writer added a KEK version after version {cas} "
                f"(Vault mount {self.mount!r}); nothing was written"
            ) from e

    def _decode(self, value: object, where: str) -> bytes:
        # Never echo the value: even a malformed one may be (part of) a key.
        if not isinstance(value, str):
            raise KekUnavailableError(f"{where} has no string field {self.field!r}")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise KekUnavailableError(f"{where} is not valid base64") from None
        if len(raw) != KEY_BYTES:
            raise KekUnavailableError(f"{where} is not a {KEY_BYTES * 8}-bit key")
        return raw


__all__ = ["KV_DEFAULT_MAX_VERSIONS", "VaultKekSource"]
