"""The local keyring file: the KEK source of the embedded default.

File format (JSON, mode 0600, owned by the service user)::

    {"format": "cuscred-keyring/v1",
     "versions": {"1": {"key": "<base64 of 32 bytes>", "created_at": "2026-12-03T19:00:00Z"}}}

The file is created only by :meth:`LocalKeyring.create` (``cuscred keygen``), never on start-up:
a missing keyring is a configuration error, because silently generating a fresh key would make
every stored credential unreadable. The file is refused if group or others may read or write it.
New versions are written to a temporary file and renamed over the old one under an exclusive
lock, so a crash leaves either the old or the new keyring, never half of one.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cuscred.crypto.keys import KEY_BYTES, Kek
from cuscred.errors import ConfigurationError, KekUnavailableError

FORMAT = "cuscred-keyring/v1"


class LocalKeyring:
    """A :class:`~cuscred.kek.source.KekSource` backed by a JSON file on local disk."""

    kind = "local"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"<LocalKeyring path={str(self.path)!r}>"

    @classmethod
    def create(cls, path: Path) -> LocalKeyring:
        """Create a keyring holding version 1. Refuses to overwrite an existing file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"format": FORMAT, "versions": {"1": _new_entry()}}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(
                f"keyring {path} already exists; refusing to overwrite it"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return cls(path)

    def get(self, version: int) -> Kek:
        entry = self._load()["versions"].get(str(version))
        if entry is None:
            raise KekUnavailableError(f"KEK version {version} is not in keyring {self.path}")
        return Kek(version, _decode_key(entry, version, self.path))

    def latest_version(self) -> int | None:
        return max(self.versions(), default=None)

    def versions(self) -> list[int]:
        """Every version in the file, in order (``keys import-keyring`` copies them all)."""
        return sorted(int(v) for v in self._load()["versions"])

    def add_version(self) -> int:
        with self._locked():
            doc = self._load()
            version = max(int(v) for v in doc["versions"]) + 1 if doc["versions"] else 1
            doc["versions"][str(version)] = _new_entry()
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        return version

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _load(self) -> dict[str, Any]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise ConfigurationError(
                f"keyring {self.path} does not exist; create it with `cuscred keygen`"
            ) from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"keyring {self.path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); run `chmod 600 {self.path}`"
            )
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            raise ConfigurationError(f"keyring {self.path} is unreadable or not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigurationError(f"keyring {self.path} is not a {FORMAT} file")
        versions = doc.get("versions")
        if not isinstance(versions, dict) or not all(
            isinstance(v, str) and v.isdigit() and not v.startswith("0") for v in versions
        ):
            raise ConfigurationError(
                f"keyring {self.path} is damaged: versions must be positive integers"
            )
        return doc


def _new_entry() -> dict[str, str]:
    return {
        "key": base64.b64encode(os.urandom(KEY_BYTES)).decode(),
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _decode_key(entry: Any, version: int, path: Path) -> bytes:
    try:
        raw = base64.b64decode(entry["key"], validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise ConfigurationError(f"keyring {path}: version {version} is corrupt") from None
    if len(raw) != KEY_BYTES:
        raise ConfigurationError(f"keyring {path}: version {version} is not a 256-bit key")
    return raw


__all__ = ["LocalKeyring"]
