"""``cuscred keys import-keyring PATH`` against a real OpenBao, on SQLite and PostgreSQL: every
version of a local keyring becomes the KV version of the same number, read back and checked
against ``kek_versions``; refused, writing nothing, for a Vault path that already holds a
version, a keyring that is wrong or outdated, a database that records no version, a secret that
keeps too few versions. No key material and no token appears in any output."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import hvac
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cuscred.cli import app
from cuscred.config import Settings
from cuscred.crypto.keys import Kek
from cuscred.db.migrate import upgrade_to_head
from cuscred.db.models import AUDIT_EVENTS, KEK_VERSIONS
from cuscred.db.session import make_engine
from cuscred.errors import InvalidInputError
from cuscred.factory import build_runtime
from cuscred.kek.local import LocalKeyring
from cuscred.kek.vault import VaultKekSource
from cuscred.vault import VaultKV
from tests.conftest import Database
from tests.vault_server import OpenBaoServer
from tests.worker_fixtures import Seeded, assert_no_secrets, seed

pytestmark = pytest.mark.vault
KEK_PATH = "cuscred/kek"


def _local_env(database: Database, keyring: LocalKeyring) -> dict[str, str]:
    return {"CUSCRED_DATABASE_URL": database.url, "CUSCRED_KEYRING_PATH": str(keyring.path)}


def _vault_env(database_url: str, server: OpenBaoServer, mount: str) -> dict[str, str]:
    return {"CUSCRED_DATABASE_URL": database_url, "CUSCRED_KEK_SOURCE": "vault",
            "CUSCRED_VAULT_ADDR": server.addr, "CUSCRED_VAULT_TOKEN": server.token,
            "CUSCRED_VAULT_KEK_MOUNT": mount}


@pytest.fixture
def installed(database: Database, keyring: LocalKeyring, tmp_path: Path) -> tuple[Path, Seeded]:
    """Credentials under KEK v1 and v2 of the local keyring; returns a copy of the keyring as
    it was before v2 (an outdated backup) and the data."""
    shutil.copy2(keyring.path, tmp_path / "keyring-v1-only.json")
    runtime = build_runtime(Settings.from_env(_local_env(database, keyring)),
                            engine=database.engine)
    data = seed(runtime, 40, 4)
    runtime.rotation().rotate_kek(requested_by="test")
    data2 = seed(runtime, 10, 2, seed=7)  # written under v2 only
    return tmp_path / "keyring-v1-only.json", Seeded({**data.rows, **data2.rows})


def _import(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["keys", "import-keyring", *args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


def _secrets(keyring: LocalKeyring, server: OpenBaoServer) -> list[str]:
    """The keyring's keys as base64 and hex, and the Vault token: text no output may hold."""
    out = [server.token]
    for version in keyring.versions():
        raw = keyring.get(version).material()
        out += [base64.b64encode(raw).decode(), raw.hex()]
    return out


def _events(database: Database, action: str) -> list[tuple[str, str]]:
    with database.engine.connect() as conn:
        return [(o, r) for o, r in conn.execute(select(
            AUDIT_EVENTS.c.outcome, AUDIT_EVENTS.c.reason).where(
            AUDIT_EVENTS.c.action == action).order_by(AUDIT_EVENTS.c.seq)).all()]


def test_each_version_becomes_the_kv_version_of_the_same_number(
    database: Database, keyring: LocalKeyring, installed: tuple[Path, Seeded],
    openbao: OpenBaoServer, kv_mount: str, vault_kv: VaultKV,
) -> None:
    _, data = installed
    env = _vault_env(database.url, openbao, kv_mount)
    code, output = _import(env, str(keyring.path), "--json")
    assert code == 0, output
    assert json.loads(output) == {"versions": [1, 2], "recorded": [1, 2]}
    meta = vault_kv.metadata(kv_mount, KEK_PATH)
    assert meta is not None and (meta.current_version, meta.version_count) == (2, 2)
    source = VaultKekSource(vault_kv, kv_mount, KEK_PATH)
    for version in (1, 2):
        assert source.get(version).material() == keyring.get(version).material()
    assert _events(database, "kek_import") == [("success", "v1-v2:vault")]
    # The installation now reads its keys from Vault: every row decrypts, the chain verifies.
    for args in (["verify", "--json"], ["audit", "verify", "--json"]):
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 0, result.stdout + result.stderr
    assert json.loads(CliRunner().invoke(app, ["verify", "--json"], env=env).stdout)[
        "checked"] == len(data)
    assert_no_secrets({"import": output}, data.plaintexts, _secrets(keyring, openbao))


def test_a_path_that_already_holds_a_version_is_refused(
    database: Database, keyring: LocalKeyring, installed: tuple[Path, Seeded],
    openbao: OpenBaoServer, kv_mount: str, vault_kv: VaultKV,
) -> None:
    vault_kv.write(kv_mount, KEK_PATH, {"key": "something an operator put here"}, cas=0)
    code, output = _import(_vault_env(database.url, openbao, kv_mount), str(keyring.path))
    assert code == 7 and "already holds versions up to 1" in output
    assert "Nothing was written" in output
    assert vault_kv.read(kv_mount, KEK_PATH).data == {"key": "something an operator put here"}
    assert_no_secrets({"import": output}, [], _secrets(keyring, openbao))


@pytest.mark.parametrize("which", ["another keyring", "an outdated backup"])
def test_a_keyring_that_does_not_match_the_database_is_refused(
    database: Database, installed: tuple[Path, Seeded], openbao: OpenBaoServer, kv_mount: str,
    vault_kv: VaultKV, tmp_path: Path, which: str,
) -> None:
    outdated, _ = installed
    if which == "another keyring":
        path = tmp_path / "other.json"
        LocalKeyring.create(path).add_version()
        says = "are not the keys the database recorded"
    else:
        path = outdated
        says = "lacks KEK version(s) [2]"
    code, output = _import(_vault_env(database.url, openbao, kv_mount), str(path))
    assert code == 78 and says in output and "Nothing was written" in output
    assert vault_kv.metadata(kv_mount, KEK_PATH) is None
    assert_no_secrets({"import": output}, [], _secrets(LocalKeyring(path), openbao))


def test_a_database_that_records_no_version_is_refused_unless_from_names_one(
    database: Database, keyring: LocalKeyring, installed: tuple[Path, Seeded],
    openbao: OpenBaoServer, kv_mount: str, vault_kv: VaultKV, tmp_path: Path,
) -> None:
    # The configured database is new and empty; the keyring's own database is named by --from.
    empty_url = f"sqlite:///{tmp_path / 'new.db'}"
    empty = make_engine(empty_url)
    upgrade_to_head(empty)
    env = _vault_env(empty_url, openbao, kv_mount)
    code, output = _import(env, str(keyring.path))
    assert code == 7 and "records no KEK version" in output and "--from" in output
    assert vault_kv.metadata(kv_mount, KEK_PATH) is None

    code, output = _import(env, str(keyring.path), "--from", database.url)
    assert code == 0, output
    assert vault_kv.metadata(kv_mount, KEK_PATH).current_version == 2  # type: ignore[union-attr]
    # The event is in the database the keyring was checked against, to be copied with it.
    assert _events(database, "kek_import") == [("success", "v1-v2:vault")]
    with empty.connect() as conn:
        assert conn.execute(select(AUDIT_EVENTS.c.seq)).all() == []
        assert conn.execute(select(KEK_VERSIONS.c.version)).all() == []
    empty.dispose()


def test_a_secret_that_keeps_too_few_versions_is_refused(
    database: Database, keyring: LocalKeyring, installed: tuple[Path, Seeded],
    openbao: OpenBaoServer, kv_mount: str, vault_kv: VaultKV, vault_client: hvac.Client,
) -> None:
    vault_client.secrets.kv.v2.update_metadata(KEK_PATH, max_versions=1, mount_point=kv_mount)
    code, output = _import(_vault_env(database.url, openbao, kv_mount), str(keyring.path))
    assert code == 7 and "keeps at most 1" in output
    meta = vault_kv.metadata(kv_mount, KEK_PATH)
    assert meta is not None and meta.current_version == 0


def test_the_kek_source_must_be_vault(
    database: Database, keyring: LocalKeyring, installed: tuple[Path, Seeded],
) -> None:
    code, output = _import(_local_env(database, keyring), str(keyring.path))
    assert code == 78 and "CUSCRED_KEK_SOURCE is not 'vault'" in output


def test_versions_must_be_one_to_n_in_order(vault_kv: VaultKV, kv_mount: str,
                                            keyring: LocalKeyring) -> None:
    source = VaultKekSource(vault_kv, kv_mount, KEK_PATH)
    v1 = keyring.get(1)
    v2 = Kek(2, v1.material())
    for keks in ([], [v2], [v2, v1]):
        with pytest.raises(InvalidInputError, match=r"1\.\.N, in order"):
            source.import_versions(keks)
    assert vault_kv.metadata(kv_mount, KEK_PATH) is None


def test_a_version_read_back_is_the_one_written(
    vault_kv: VaultKV, kv_mount: str, keyring: LocalKeyring,
) -> None:
    keyring.add_version()
    source = VaultKekSource(vault_kv, kv_mount, KEK_PATH)
    source.import_versions([keyring.get(1), keyring.get(2)])
    got: list[Any] = [source.get(v).material() for v in (1, 2)]
    assert got == [keyring.get(1).material(), keyring.get(2).material()]
    assert source.add_version() == 3  # a rotation goes on from the imported versions
