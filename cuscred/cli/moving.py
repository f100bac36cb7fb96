"""CLI commands that move an installation off the embedded default (README runbook 8):
``db copy --from URL`` (every table into the configured, empty database). A ``--from`` URL is
never printed: it may carry a password (better kept in ``PGPASSWORD`` or ``~/.pgpass``)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cuscred.cli.admin import db_app
from cuscred.cli.common import (
    err_console,
    handled,
    out_console,
    print_json,
    state,
)
from cuscred.services.moving import copy_into

Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


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
    is audited in the target, which needs the active KEK from the configured source. Check
    with `cuscred audit verify` and `cuscred verify`.
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
    """Attach the command to the ``db`` group of :mod:`cuscred.cli.admin`."""
    db_app.command("copy")(db_copy)


__all__ = ["register"]
