"""CLI commands on credentials: put, list, show, resolve, rotate, delete, shred-tenant,
validate, mask. Secrets are read from stdin or a hidden prompt, never from the command line."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from cuscred.cli.common import (
    EXIT_INVALID,
    confirm_or_stop,
    err_console,
    fail,
    handled,
    out_console,
    parse_context,
    print_json,
    read_secret,
    state,
)
from cuscred.errors import CuscredError
from cuscred.references import parse_reference, validate_credential_format
from cuscred.services.catalog import CredentialInfo

Tenant = Annotated[str, typer.Option("--tenant", "-t", help="Tenant id the call acts for.")]
Ref = Annotated[str, typer.Argument(help="encrypted://…, vault://…#field or env://NAME")]
Context = Annotated[
    list[str] | None,
    typer.Option("--context", "-c", help="Encryption context as key=value (repeatable)."),
]
Strip = Annotated[
    bool, typer.Option("--strip", help="Strip surrounding whitespace instead of refusing it.")
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def put(ctx: typer.Context, tenant: Tenant, context: Context = None, strip: Strip = False) -> None:
    """Store a secret read from stdin (or a hidden prompt); print its reference."""
    st = state(ctx)
    with handled():
        service = st.runtime.credential_service(actor=st.actor)
        ref = service.encrypt_credential(tenant, read_secret(), parse_context(context),
                                         strip=strip)
    out_console.print(ref)


def list_(
    ctx: typer.Context,
    tenant: Tenant,
    limit: Annotated[int, typer.Option(help="Rows per page (1-1000).")] = 100,
    after: Annotated[str | None, typer.Option(help="Continue after this credential id.")] = None,
    json: Json = False,
) -> None:
    """List a tenant's credentials, masked (nothing is decrypted)."""
    with handled():
        items = state(ctx).runtime.credential_service().list_credentials(
            tenant, limit=limit, after=after
        )
    if json:
        print_json([i.as_json() for i in items])
        return
    table = Table("provider", "masked", "KEK", "gen", "created", "rotated")
    # The reference is what one copies out of a listing: never cut, whatever the width (the
    # other columns wrap first).
    table.columns.insert(0, Column("reference", no_wrap=True,
                                   min_width=max((len(i.reference) for i in items), default=9)))
    for i in items:
        # Stored text (masks of tenant-supplied JSON) is shown literally, never as markup.
        table.add_row(escape(i.reference), escape(i.provider), escape(i.masked),
                      str(i.kek_version), str(i.key_generation), _ts(i.created_at),
                      _ts(i.rotated_at))
    out_console.print(table)
    if not items:
        err_console.print(f"no credentials for tenant {tenant!r}", markup=False)


def show(ctx: typer.Context, tenant: Tenant, ref: Ref, json: Json = False) -> None:
    """Show one credential's metadata (masked; nothing is decrypted)."""
    with handled():
        info = state(ctx).runtime.credential_service().describe_credential(tenant, ref)
    if json:
        print_json(info.as_json())
    else:
        _print_info(info)


def resolve(ctx: typer.Context, tenant: Tenant, ref: Ref, context: Context = None) -> None:
    """Print the secret behind a reference to stdout. Audited like any other access."""
    st = state(ctx)
    with handled():
        value = st.runtime.credential_service(actor=st.actor).resolve_credential(
            tenant, ref, parse_context(context)
        )
    sys.stdout.write(value + "\n")


def rotate(
    ctx: typer.Context, tenant: Tenant, ref: Ref, context: Context = None, strip: Strip = False
) -> None:
    """Replace the secret behind a reference with one read from stdin; the reference stays."""
    st = state(ctx)
    with handled():
        service = st.runtime.credential_service(actor=st.actor)
        ref_out, changed = service.rotate_credential(
            tenant, ref, read_secret("new secret"), parse_context(context), strip=strip
        )
    err_console.print("rotated" if changed else "unchanged: the new value equals the stored one")
    out_console.print(ref_out)


def delete(
    ctx: typer.Context,
    tenant: Tenant,
    ref: Ref,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete one credential."""
    if not yes:
        confirm_or_stop(f"Delete {ref} of tenant {tenant}?")
    st = state(ctx)
    with handled():
        st.runtime.credential_service(actor=st.actor).delete_credential(tenant, ref)
    err_console.print(f"deleted {ref}")


def shred_tenant(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant to crypto-shred.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Crypto-shred a tenant: delete every credential and wipe the salts of its key generations
    (kept as retired rows, so a returning tenant id never reuses a generation number)."""
    if not yes:
        confirm_or_stop(f"Destroy every credential of tenant {tenant}?")
    st = state(ctx)
    with handled():
        count = st.runtime.credential_service(actor=st.actor).shred_tenant(tenant)
    err_console.print(f"shredded tenant {tenant}: {count} credential(s), all key generations")


def validate(ref: Ref, json: Json = False) -> None:
    """Check a reference's syntax (no I/O); exit 6 with the reason when it is malformed."""
    ok, message = validate_credential_format(ref)
    if json:
        print_json({"valid": ok, "message": message})
    elif ok:
        out_console.print(message)
    if not ok:
        if not json:
            fail(message, EXIT_INVALID)
        raise typer.Exit(EXIT_INVALID)


def mask(
    ctx: typer.Context,
    reference: Annotated[
        str | None, typer.Argument(help="A reference; secrets are read from stdin.")
    ] = None,
    json: Json = False,
) -> None:
    """Print the masked form of a reference (argument) or of a secret (stdin)."""
    st = state(ctx)
    if reference is not None:
        try:
            parse_reference(reference)
        except CuscredError:
            # A secret on the command line would sit in shell history and `ps`: refuse it.
            fail("the argument is not a valid reference",
                 EXIT_INVALID, "to mask a secret, pipe it on stdin: ... | cuscred mask")
        value = reference
    else:
        value = read_secret()
    from cuscred.masking import mask_credential

    with handled():
        masked = mask_credential(value, env_prefix=st.settings.env_ref_prefix)
    if json:
        print_json({"masked": masked})
    else:
        out_console.print(masked, markup=False)


def _ts(value: object) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if hasattr(value, "strftime") else "-"


def _print_info(info: CredentialInfo) -> None:
    for name, value in info.as_json().items():
        out_console.print(f"{name:>16}: {value if value is not None else '-'}", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(put)
    app.command("list")(list_)
    app.command()(show)
    app.command()(resolve)
    app.command()(rotate)
    app.command()(delete)
    app.command("shred-tenant")(shred_tenant)
    app.command()(validate)
    app.command()(mask)


__all__ = ["register"]
