"""CLI commands that move an installation off the embedded default (README runbook 8):
``keys import-keyring PATH`` (the local keyring into Vault) and ``db copy --from URL`` (every
table into the configured, empty database). A ``--from`` URL is never printed: it may carry a
password (better kept in ``PGPASSWORD`` or ``~/.pgpass``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr
from rich.table import Table

from cuscred.cli.admin import db_app, keys_app
from cuscred.cli.common import (
    EXIT_CONFIG,
    CliState,
    err_console,
    fail,
    handled,
    out_console,
    print_json,
    state,
)
from cuscred.db.copy import open_source, require_head
from cuscred.factory import Runtime, build_runtime
from cuscred.kek.local import LocalKeyring
from cuscred.kek.vault import VaultKekSource
from cuscred.services.moving import copy_into, import_keyring

Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def keys_import_keyring(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The local keyring file to import.")],
    from_url: Annotated[str | None, typer.Option(
        "--from", help="The database whose kek_versions record the keyring's versions, for "
                       "the check (default: the configured database).")] = None,
    json: Json = False,
) -> None:
    """Write every KEK version of a local keyring into the configured Vault KV v2 path
    (CUSCRED_KEK_SOURCE=vault), so that KV version N holds keyring version N.

    Refused, writing nothing, if the path already holds a version or the keyring does not
    hold every version the database records, with its check value. Each version is read back
    and checked after writing. The keyring file is left alone: delete it once every version
    from it is retired.
    """
    st = state(ctx)
    st.preflight = False  # this command is the remedy for KEK versions missing from Vault
    with handled():
        target = st.runtime.keys.source
        if not isinstance(target, VaultKekSource):
            fail("CUSCRED_KEK_SOURCE is not 'vault': the import writes to the Vault that the "
                 "CUSCRED_VAULT_* settings name", EXIT_CONFIG)
        records = st.runtime if from_url is None else _runtime_on(st, from_url)
        try:
            done = import_keyring(LocalKeyring(path), target, records.engine, records.audit,
                                  actor=st.actor or st.settings.default_actor)
        finally:
            if records is not st.runtime:
                records.engine.dispose()
    if json:
        print_json({"versions": done.versions, "recorded": done.recorded})
        return
    err_console.print(f"imported KEK versions {_span(done.versions)} into Vault (KV version N "
                      f"= KEK version N); read back and checked against the database's "
                      f"record of {_span(done.recorded)}")


def _runtime_on(st: CliState, url: str) -> Runtime:
    """The configured KEK source over another database (the one the keyring belongs to)."""
    engine = open_source(url)
    try:
        require_head(engine, "--from")
        settings = st.settings.model_copy(update={"database_url": SecretStr(url)})
        return build_runtime(settings, engine=engine, preflight=False)
    except BaseException:
        engine.dispose()
        raise


def _span(versions: list[int]) -> str:
    return ", ".join(f"v{v}" for v in versions) or "none"


def db_copy(
    ctx: typer.Context,
    from_url: Annotated[str, typer.Option(
        "--from", help="The database to copy, e.g. sqlite:///.cuscred/cuscred.db.")],
    batch_size: Annotated[int, typer.Option(help="Rows per insert.", min=1,
                                            max=100_000)] = 1000,
    json: Json = False,
) -> None:
    """Copy every table of the --from database into the configured one, which must be
    migrated (`cuscred db upgrade`) and empty: foreign-key order, batches, one transaction.

    Values are copied byte for byte, so ciphertexts and the audit chain stay valid; the copy
    is audited in the target, which needs the active KEK from the configured source (import
    the keyring first). Check with `cuscred audit verify` and `cuscred verify`.
    """
    st = state(ctx)
    with handled():
        runtime = st.runtime
        counts = copy_into(runtime.engine, runtime.keys, runtime.audit, from_url,
                           batch=batch_size, actor=st.actor or st.settings.default_actor)
    if json:
        print_json({"tables": counts, "rows": sum(counts.values())})
        return
    table = Table("table", "rows")
    for name, n in counts.items():
        table.add_row(name, f"{n:,}")
    out_console.print(table)
    err_console.print(f"copied {sum(counts.values()):,} rows into the configured database; "
                      "check it with `cuscred audit verify` and `cuscred verify`")


def register() -> None:
    """Attach the commands to the ``keys`` and ``db`` groups of :mod:`cuscred.cli.admin`."""
    keys_app.command("import-keyring")(keys_import_keyring)
    db_app.command("copy")(db_copy)


__all__ = ["register"]
