"""CLI commands for operators: keygen, db, keys, audit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from cuscred.cli.common import (
    EXIT_CONFIG,
    EXIT_INVALID,
    EXIT_VERIFY,
    CliState,
    err_console,
    fail,
    handled,
    out_console,
    print_json,
    state,
)
from cuscred.config import KekSourceKind
from cuscred.db.migrate import current_and_head, upgrade_to_head
from cuscred.db.models import KeyState
from cuscred.kek.local import LocalKeyring
from cuscred.metrics import render, write_textfile
from cuscred.services.audit_read import recent_events
from cuscred.services.audit_verify import verify_chain
from cuscred.services.health import run_checks

Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Version = Annotated[int, typer.Argument(help="KEK version number.", min=1)]

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
keys_app = typer.Typer(help="KEK versions and the key census.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit trail.", no_args_is_help=True)


def keygen(
    ctx: typer.Context,
    path: Annotated[Path | None, typer.Option(help="Keyring file (default: setting).")] = None,
) -> None:
    """Create the local keyring (mode 0600) holding KEK version 1. Never overwrites."""
    settings = state(ctx).settings
    if settings.kek_source is not KekSourceKind.LOCAL:
        fail("CUSCRED_KEK_SOURCE is not 'local'; the KEK lives in Vault", EXIT_CONFIG,
             "use `cuscred keys create` to write a KEK version to Vault")
    with handled():
        recorded = _recorded_kek_versions(state(ctx))
        if recorded:
            fail(f"the database already records KEK version(s) {recorded}; a new keyring could "
                 "not decrypt anything stored under them", EXIT_CONFIG,
                 f"restore the keyring file from backup to {path or settings.keyring_path}")
        keyring = LocalKeyring.create(path or settings.keyring_path)
    err_console.print(f"created keyring {keyring.path} (KEK version 1, mode 0600)")


def _recorded_kek_versions(cli: CliState) -> list[int]:
    """KEK versions the database knows, or [] if it has no schema yet (keygen comes first)."""
    try:
        with cli.runtime.engine.connect() as conn:
            return sorted(cli.runtime.keys.kek_states(conn, fresh=True))
    except SQLAlchemyError:
        return []


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply pending migrations (alembic upgrade head)."""
    with handled():
        engine = state(ctx).runtime.engine
        upgrade_to_head(engine)
        current, _ = current_and_head(engine)
    err_console.print(f"database schema at revision {current}")


@db_app.command("status")
def db_status(ctx: typer.Context, json: Json = False) -> None:
    """Show the database's revision and the newest one; exit 78 if behind."""
    with handled():
        current, head = current_and_head(state(ctx).runtime.engine)
    if json:
        print_json({"current": current, "head": head, "up_to_date": current == head})
    else:
        out_console.print(f"current {current or '-'}, head {head}")
    if current != head:
        raise typer.Exit(EXIT_CONFIG)


@keys_app.command("status")
def keys_status(
    ctx: typer.Context,
    tenants: Annotated[bool, typer.Option(help="Also show per-tenant generations.")] = False,
    json: Json = False,
) -> None:
    """KEK versions with their states and how many credentials each protects."""
    with handled():
        status = state(ctx).runtime.key_admin().status(per_tenant=tenants)
    if json:
        print_json({
            "kek_versions": [vars_of(v) for v in status.kek_versions],
            "unregistered": status.unregistered,
            "tenant_generations": [
                dict(zip(("tenant_id", "generation", "state", "kdf", "credentials"), t,
                         strict=True))
                for t in status.tenant_generations
            ],
        })
        return
    table = Table("KEK version", "state", "source", "credentials", "created", "activated")
    for v in status.kek_versions:
        table.add_row(str(v.version), v.state, v.source, str(v.credentials),
                      f"{v.created_at:%Y-%m-%d %H:%M}",
                      f"{v.activated_at:%Y-%m-%d %H:%M}" if v.activated_at else "-")
    out_console.print(table)
    if status.unregistered:
        err_console.print(f"[red]rows on unregistered KEK versions: {status.unregistered}[/]")
    if tenants:
        t = Table("tenant", "generation", "state", "kdf", "credentials")
        for row in status.tenant_generations:
            t.add_row(*(str(x) for x in row))
        out_console.print(t)


def vars_of(obj: object) -> dict[str, object]:
    return {name: getattr(obj, name) for name in obj.__slots__}  # type: ignore[attr-defined]


@keys_app.command("create")
def keys_create(ctx: typer.Context) -> None:
    """Write a new KEK version to the source and record it decrypt_only (rotation step 1);
    on a fresh installation the first version is active at once."""
    st = state(ctx)
    with handled():
        admin = st.runtime.key_admin(actor=st.actor)
        version = admin.create_version()
        active = any(v.version == version and v.state == KeyState.ACTIVE
                     for v in admin.status(per_tenant=False).kek_versions)
    err_console.print(f"KEK version {version} created (active: the first version)" if active
                      else f"KEK version {version} created (decrypt_only); promote it next")
    out_console.print(str(version))


@keys_app.command("promote")
def keys_promote(ctx: typer.Context, version: Version) -> None:
    """Make VERSION the active KEK (rotation step 2); the previous becomes decrypt_only."""
    st = state(ctx)
    with handled():
        st.runtime.key_admin(actor=st.actor).set_state(version, KeyState.ACTIVE)
    err_console.print(f"KEK version {version} is active")


@keys_app.command("retire")
def keys_retire(ctx: typer.Context, version: Version) -> None:
    """Retire VERSION (rotation step 4). Refused, with the count, while credentials use it."""
    st = state(ctx)
    with handled():
        st.runtime.key_admin(actor=st.actor).retire(version)
    err_console.print(f"KEK version {version} is retired")


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    expect_head: Annotated[
        str | None,
        typer.Option(help="SEQ:MAC printed by an earlier verify; catches truncation."),
    ] = None,
    json: Json = False,
) -> None:
    """Walk the audit chain; exit 8 naming the first edited, inserted or deleted row."""
    anchor = _parse_head(expect_head) if expect_head else None
    runtime = state(ctx).runtime
    with handled(), runtime.engine.connect() as conn:
        report = verify_chain(conn, runtime.audit.keys, expect_head=anchor)
    if json:
        print_json(vars_of(report))
    elif report.ok:
        out_console.print(f"audit chain OK: {report.rows_checked} rows; "
                          f"head {report.head_seq}:{report.head_mac}")
    else:
        err_console.print(f"[bold red]audit chain broken:[/] {report.problem} at row "
                          f"{report.problem_seq}"
                          + (f" ({escape(report.detail)})" if report.detail else ""))
    if not report.ok:
        raise typer.Exit(EXIT_VERIFY)


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant.")] = None,
    action: Annotated[str | None, typer.Option(
        help="Only this action (e.g. shred_tenant).")] = None,
    limit: Annotated[int, typer.Option(help="Newest N events.", min=1, max=10_000)] = 20,
    json: Json = False,
) -> None:
    """The newest audit events, newest first: who did what, to which tenant and credential,
    and how it ended. Nothing in them is secret; `audit verify` checks they are genuine."""
    with handled(), state(ctx).runtime.engine.connect() as conn:
        entries = recent_events(conn, tenant_id=tenant, action=action, limit=limit)
    if json:
        print_json([e.as_json() for e in entries])
        return
    table = Table("seq", "time (UTC)", "actor", "tenant", "credential", "action", "outcome",
                  "reason")
    for e in entries:
        table.add_row(str(e.seq), f"{e.ts:%Y-%m-%d %H:%M:%S}", escape(e.actor),
                      e.tenant_id or "-", e.credential_id or "-", e.action, e.outcome,
                      escape(e.reason or "-"))
    out_console.print(table)
    if not entries:
        err_console.print("no audit events match")


def doctor(ctx: typer.Context, json: Json = False) -> None:
    """Check the installation: schema at head, Vault unsealed, every KEK version in use
    loadable, the audit chain, the broker. Exit 8 if anything is wrong (a readiness probe)."""
    st = state(ctx)
    st.preflight = False  # report a missing key as a failed check, not as a start-up refusal
    with handled():
        checks = run_checks(st.runtime)
    ok = all(c.ok for c in checks)
    if json:
        print_json({"ok": ok, "checks": [vars_of(c) for c in checks]})
    else:
        table = Table("check", "status", "detail")
        for c in checks:
            table.add_row(c.name, "[green]ok[/]" if c.ok else "[bold red]FAIL[/]",
                          escape(c.detail))
        out_console.print(table)
    if not ok:
        raise typer.Exit(EXIT_VERIFY)


def metrics(
    ctx: typer.Context,
    output: Annotated[Path | None, typer.Option(
        help="Write to FILE atomically (node_exporter's textfile collector) instead of stdout.",
    )] = None,
) -> None:
    """Prometheus metrics of the stored state: credentials per KEK version and tenant key
    generation, KEK states and age, progress of unfinished jobs (no decryption)."""
    runtime = state(ctx).runtime
    with handled():
        if output is not None:
            write_textfile(runtime.engine, output)
            err_console.print(f"wrote {output}")
            return
        text = render(runtime.engine, with_process=False)
    sys.stdout.write(text.decode())


def _parse_head(text: str) -> tuple[int, str]:
    seq, sep, mac = text.partition(":")
    if not sep or not seq.isdigit() or not mac:
        fail("--expect-head takes SEQ:MAC as printed by `cuscred audit verify`", EXIT_INVALID)
    return int(seq), mac


def register(app: typer.Typer) -> None:
    app.command()(keygen)
    app.command()(doctor)
    app.command()(metrics)
    app.add_typer(db_app, name="db")
    app.add_typer(keys_app, name="keys")
    app.add_typer(audit_app, name="audit")


__all__ = ["register"]
