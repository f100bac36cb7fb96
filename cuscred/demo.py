"""``make demo``: the library end to end on the embedded default (SQLite + local keyring).

Everything lives in ``.demo/`` (recreated on each run): a keyring made the way ``cuscred keygen``
makes it, a migrated SQLite database, realistic provider-shaped keys for a few tenants. It then
walks the contract: store, resolve, a refused cross-tenant read, masked listing, the first steps
of a KEK rotation (create, promote; retiring the old version is refused while rows use it), and
an audit chain verification.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cuscred.config import Settings
from cuscred.datagen import generate_secret
from cuscred.db.migrate import upgrade_to_head
from cuscred.errors import CredentialNotFoundError, KeyStateError
from cuscred.factory import build_runtime
from cuscred.kek.local import LocalKeyring
from cuscred.services.audit_verify import verify_chain

console = Console(highlight=False)


def main(workdir: Path = Path(".demo")) -> int:
    shutil.rmtree(workdir, ignore_errors=True)
    keyring = LocalKeyring.create(workdir / "keyring.json")
    settings = Settings.from_env({
        "CUSCRED_DATABASE_URL": f"sqlite:///{workdir / 'cuscred.db'}",
        "CUSCRED_KEYRING_PATH": str(keyring.path),
    })
    runtime = build_runtime(settings)
    upgrade_to_head(runtime.engine)
    svc = runtime.credential_service(actor="demo")
    admin = runtime.key_admin(actor="demo")
    console.rule("store")
    refs: dict[str, list[str]] = {}
    for tenant, providers in {"acme": ["openai", "anthropic", "vertex"],
                              "globex": ["google", "azure-openai"]}.items():
        for provider in providers:
            refs.setdefault(tenant, []).append(
                svc.encrypt_credential(tenant, generate_secret(provider), {"provider": provider})
            )
    console.print(f"stored {sum(map(len, refs.values()))} credentials for {len(refs)} tenants")

    console.rule("resolve, and a refused cross-tenant read")
    first = refs["acme"][0]
    value = svc.resolve_credential("acme", first, {"provider": "openai"})
    console.print(f"acme resolves {first} -> {svc.mask_credential(value)} ({len(value)} chars)")
    try:
        svc.resolve_credential("globex", first, {"provider": "openai"})
    except CredentialNotFoundError as exc:
        console.print(f"globex is refused: {type(exc).__name__}: {exc}")

    console.rule("masked listing")
    table = Table("tenant", "reference", "provider", "masked", "KEK")
    for tenant in refs:
        for info in svc.list_credentials(tenant):
            table.add_row(tenant, info.reference, info.provider, info.masked,
                          str(info.kek_version))
    console.print(table)

    console.rule("KEK rotation: a new version, promoted; old rows still readable")
    new_version = admin.create_version()
    admin.promote(new_version)
    fresh = svc.encrypt_credential("acme", generate_secret("openai"), {"provider": "openai"})
    console.print(f"new writes use KEK v{svc.describe_credential('acme', fresh).kek_version}")
    for tenant, tenant_refs in refs.items():
        for ref in tenant_refs:
            svc.resolve_credential(tenant, ref, svc.describe_credential(tenant, ref).context)
    console.print(f"all {sum(map(len, refs.values()))} older credentials still resolve")
    try:
        admin.retire(new_version - 1)
    except KeyStateError as exc:
        console.print(f"retiring v{new_version - 1} is refused: {exc}")
    for v in admin.status().kek_versions:
        console.print(f"KEK v{v.version}: {v.state:<12} {v.credentials} credentials")

    console.rule("audit")
    with runtime.engine.connect() as conn:
        report = verify_chain(conn, runtime.audit.keys)
    console.print(f"audit chain {'OK' if report.ok else 'BROKEN'}: {report.rows_checked} rows, "
                  f"head {report.head_seq}:{report.head_mac[:16]}…")
    runtime.engine.dispose()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
