"""Moving an installation off the embedded default: the keyring into Vault, the database into
PostgreSQL (``cuscred keys import-keyring``, ``cuscred db copy``; README runbook 8).

Both are audited, in the database they vouch for: the import in the database whose
``kek_versions`` the keyring was checked against (so ``db copy`` carries the event along), the
copy in the target, in the copy's own transaction.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select

from cuscred.crypto.keys import Kek
from cuscred.db.copy import copy_database, open_source
from cuscred.db.models import KEK_VERSIONS, KeyState
from cuscred.errors import KekUnavailableError, KeyStateError
from cuscred.kek.local import LocalKeyring
from cuscred.kek.vault import VaultKekSource
from cuscred.services.attempts import AttemptRecorder
from cuscred.services.audit import AuditLog, AuditRecord, Outcome
from cuscred.services.keys import KeyManager, check_value

_KV = KEK_VERSIONS


@dataclass(frozen=True, slots=True)
class KeyringImport:
    versions: list[int]  # written to Vault, each as the KV version of the same number
    recorded: list[int]  # those the database records; their check values matched on read-back


def import_keyring(
    keyring: LocalKeyring, target: VaultKekSource, engine: Engine, audit: AuditLog, *,
    actor: str,
) -> KeyringImport:
    """Write every version of ``keyring`` into ``target`` (KV version N = keyring version N),
    checked against the ``kek_versions`` of the database behind ``engine``.

    Before anything is written: the keyring must hold versions 1..N with no gap, and every
    version the database records, with the check value recorded for it. After writing, each
    version is read back from Vault and compared with that check value (the file's own, for a
    version the database does not record). Raises :class:`KeyStateError` (the database records
    no version, or the Vault path is not empty: nothing written) and
    :class:`KekUnavailableError` (a wrong or outdated keyring: nothing written).
    """
    with AttemptRecorder(engine, audit).attempt("kek_import", actor, None) as attempt:
        keks = _contiguous(keyring)
        with engine.connect() as conn:
            recorded: dict[int, str | None] = {
                int(v): c for v, c in conn.execute(select(_KV.c.version, _KV.c.check_value))}
        expected = _expected_check_values(keks, recorded, keyring)
        target.import_versions(keks)
        for version, value in expected.items():
            if not hmac.compare_digest(check_value(target.get(version)), value):
                raise KekUnavailableError(
                    f"KEK version {version} read back from Vault differs from the keyring; "
                    "do not delete the keyring file")
        attempt.success_reason = f"v1-v{len(keks)}:vault"
        with engine.begin() as conn:
            audit.append(conn, [attempt.success()])
    return KeyringImport([k.version for k in keks], sorted(recorded))


def _contiguous(keyring: LocalKeyring) -> list[Kek]:
    versions = keyring.versions()
    if not versions or versions != list(range(1, len(versions) + 1)):
        raise KeyStateError(f"keyring {keyring.path} holds versions {versions}, not 1..N: KV "
                            "version numbers could not match them")
    return [keyring.get(v) for v in versions]


def _expected_check_values(
    keks: list[Kek], recorded: dict[int, str | None], keyring: LocalKeyring
) -> dict[int, str]:
    if not recorded:
        raise KeyStateError(
            "the database records no KEK version, so the keyring cannot be checked against it; "
            "name the database it belongs to with --from (e.g. sqlite:///.cuscred/cuscred.db)")
    in_file = {k.version: check_value(k) for k in keks}
    missing = sorted(set(recorded) - set(in_file))
    if missing:
        raise KekUnavailableError(
            f"keyring {keyring.path} lacks KEK version(s) {missing}, which the database records: "
            "a wrong or outdated keyring. Nothing was written")
    wrong = sorted(v for v, value in recorded.items()
                   if value and not hmac.compare_digest(value, in_file[v]))
    if wrong:
        raise KekUnavailableError(
            f"keyring {keyring.path}: KEK version(s) {wrong} are not the keys the database "
            "recorded (check values differ). Nothing was written")
    return in_file


def copy_into(
    engine: Engine, keys: KeyManager, audit: AuditLog, source_url: str, *, batch: int,
    actor: str,
) -> dict[str, int]:
    """Copy the database at ``source_url`` into the empty one behind ``engine`` (see
    :func:`cuscred.db.copy.copy_database`) and audit it in the same transaction.

    Every KEK version the copied rows use, and the active one, must load from the configured
    source: a copy the new setup could not decrypt is rolled back (:class:`KekUnavailableError`
    naming the version). The URL is never repeated in a message: it may carry a password.
    """
    source = open_source(source_url)

    def record(conn: Connection, counts: dict[str, int]) -> None:
        _require_loadable_keks(conn, keys)
        audit.append(conn, [AuditRecord(
            action="db_copy", outcome=Outcome.SUCCESS, actor=actor,
            reason=f"from={source.dialect.name} rows={sum(counts.values())}",
        )])

    try:
        return copy_database(source, engine, batch=batch, before_commit=record)
    finally:
        source.dispose()


def _require_loadable_keks(conn: Connection, keys: KeyManager) -> None:
    """Every KEK version the copied rows use, and the active one, loads from the configured
    source with the check value the copy brought along; else the copy is rolled back, since
    the new setup could decrypt nothing under that version."""
    states = keys.kek_states(conn, fresh=True)  # the copied versions, not a view cached before
    needed = set(keys.census(conn)) | {v for v, s in states.items() if s == KeyState.ACTIVE}
    for version in sorted(needed):
        try:
            keys.kek(version)
        except KekUnavailableError as exc:
            raise KekUnavailableError(
                f"{exc}; the copy was rolled back: import the keyring into the configured "
                "source first (`cuscred keys import-keyring`)") from exc


__all__ = ["KeyringImport", "copy_into", "import_keyring"]
