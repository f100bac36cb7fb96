"""The ``cuscred`` command line. Settings come from ``CUSCRED_*`` environment variables."""

from __future__ import annotations

from typing import Annotated

import typer

from cuscred.cli import admin, credentials, jobs, moving, rotation
from cuscred.cli.common import CliState, handled, quiet_logging
from cuscred.validation import validate_actor

app = typer.Typer(
    name="cuscred",
    help="Credential vault for multi-tenant AI platforms.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # tracebacks with locals could print a secret
    add_completion=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    actor: Annotated[
        str | None, typer.Option(help="Who is acting, for the audit trail.", envvar=None)
    ] = None,
) -> None:
    quiet_logging()
    if actor is not None:
        with handled():  # refused before anything runs (exit 6), never echoed
            actor = validate_actor(actor)
    cli_state = CliState(actor=actor)
    ctx.obj = cli_state
    ctx.call_on_close(cli_state.close)


credentials.register(app)
admin.register(app)
moving.register()
rotation.register(app)
jobs.register(app)


def main() -> None:
    app()


__all__ = ["app", "main"]
