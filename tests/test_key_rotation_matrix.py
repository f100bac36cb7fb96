"""Which key decrypts which ciphertext as a KEK version is added, promoted and retired
(tink's _aead_wrapper_test pattern), on SQLite and PostgreSQL with the local keyring."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from cuscred.db.models import KekVersion, KeyState
from cuscred.errors import DecryptionError, KekUnavailableError, KeyStateError
from cuscred.factory import Runtime
from cuscred.services.keys import check_transition


def test_rotation_matrix(runtime: Runtime) -> None:
    svc = runtime.credential_service()
    admin = runtime.key_admin()
    old = svc.encrypt_credential("tenant-a", "sk-proj-" + "o" * 60)
    assert svc.describe_credential("tenant-a", old).kek_version == 1

    # Step 1: v2 exists and is readable, but new writes still use v1.
    assert admin.create_version() == 2
    mid = svc.encrypt_credential("tenant-a", "sk-proj-" + "m" * 60)
    assert svc.describe_credential("tenant-a", mid).kek_version == 1

    # Step 2: v2 active; old rows still decrypt under v1 (decrypt_only).
    admin.promote(2)
    new = svc.encrypt_credential("tenant-a", "sk-proj-" + "n" * 60)
    assert svc.describe_credential("tenant-a", new).kek_version == 2
    for ref in (old, mid, new):
        assert svc.resolve_credential("tenant-a", ref).startswith("sk-proj-")

    # Step 4 refused while rows use v1, with the count in the message.
    with pytest.raises(KeyStateError, match="still used by 2 credential"):
        admin.retire(1)
    with pytest.raises(KeyStateError):
        admin.retire(2)  # the active version can never be retired

    # A rotation moves rows to v2; then v1 may be retired and v2 rows keep working.
    svc.rotate_credential("tenant-a", old, "sk-proj-" + "O" * 60)
    svc.rotate_credential("tenant-a", mid, "sk-proj-" + "M" * 60)
    assert admin.status().kek_versions[0].credentials == 0
    admin.retire(1)
    assert [v.state for v in admin.status().kek_versions] == ["retired", "active"]
    for ref in (old, mid, new):
        assert svc.resolve_credential("tenant-a", ref).startswith("sk-proj-")


def test_retired_version_is_refused_for_decryption(runtime: Runtime) -> None:
    svc = runtime.credential_service()
    ref = svc.encrypt_credential("tenant-a", "sk-proj-" + "r" * 60)
    runtime.key_admin().create_version()
    runtime.key_admin().promote(2)
    # Force the state behind the census' back, as a restored backup might.
    with runtime.sessions.begin() as s:
        s.execute(update(KekVersion).where(KekVersion.version == 1).values(state="retired"))
    runtime.keys.clear_caches()
    with pytest.raises(DecryptionError):
        svc.resolve_credential("tenant-a", ref)


def test_unloadable_version_cannot_be_promoted(runtime: Runtime) -> None:
    admin = runtime.key_admin()
    runtime.credential_service().encrypt_credential("tenant-a", "sk-proj-" + "x" * 60)
    with pytest.raises(KekUnavailableError):
        admin.set_state(9, KeyState.DECRYPT_ONLY)


@pytest.mark.parametrize(
    ("current", "target", "rows", "ok"),
    [
        (None, KeyState.DECRYPT_ONLY, 0, True),
        (KeyState.DECRYPT_ONLY, KeyState.ACTIVE, 0, True),
        (KeyState.ACTIVE, KeyState.DECRYPT_ONLY, 5, True),
        (KeyState.DECRYPT_ONLY, KeyState.RETIRED, 0, True),
        (KeyState.DECRYPT_ONLY, KeyState.RETIRED, 1, False),
        (KeyState.ACTIVE, KeyState.RETIRED, 0, False),
        (KeyState.RETIRED, KeyState.ACTIVE, 0, False),
        (None, KeyState.RETIRED, 0, False),
    ],
)
def test_transition_table(
    current: KeyState | None, target: KeyState, rows: int, ok: bool
) -> None:
    if ok:
        check_transition(1, current, target, rows)
    else:
        with pytest.raises(KeyStateError):
            check_transition(1, current, target, rows)
