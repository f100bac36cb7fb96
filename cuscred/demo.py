"""``make demo``: the library end to end on the embedded default (SQLite + local keyring).

Everything lives in a fresh ``.demo/`` (recreated on each run) and no service is needed. It
makes a keyring the way ``cuscred keygen`` does and a migrated SQLite database, shows the
contract in brief (store, resolve, a refused cross-tenant read, masked listing), then the main
job: a realistic generated data set (provider-shaped keys over skewed tenants), a whole KEK
rotation run in this process with the same progress bar as ``cuscred kek rotate --wait``, and
a summary: rows/s, counts, the census per KEK version before and after, the old version retired
(allowed now that no row uses it), a sample decrypting to the original values, every
credential verified, and the audit chain verified.

``python -m cuscred.demo --credentials N --tenants M [--workdir DIR]`` changes the size.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cuscred.cli.progress import AnnouncingRunner, Background, fmt_count, fmt_duration, watch
from cuscred.config import Settings
from cuscred.datagen import generate, generate_secret
from cuscred.db.migrate import upgrade_to_head
from cuscred.errors import CredentialNotFoundError
from cuscred.factory import Runtime, build_runtime
from cuscred.jobs.views import JobView
from cuscred.kek.local import LocalKeyring
from cuscred.services.audit_verify import verify_chain

#: ~10 s on an idle 2-core machine, ~20 s while it is busy with something else (measured).
DEFAULT_CREDENTIALS = 20_000
DEFAULT_TENANTS = 300
SAMPLE = 200

Generated = list[tuple[str, str, dict[str, str]]]  # (tenant, secret, context)


@dataclass(frozen=True, slots=True)
class DemoSummary:
    credentials: int  # generated
    tenants: int
    stored: int  # every credential in the database when the rotation started
    job_id: int
    status: str
    total: int
    done: int
    skipped: int
    failed: int
    rows_per_s: float
    census_before: dict[int, int]
    census_after: dict[int, int]
    states_after: dict[int, str]
    retired: list[int]
    sample_checked: int
    verified: int
    verify_failures: int
    audit_ok: bool
    audit_rows: int
    seconds: float


def setup(workdir: Path, console: Console) -> Runtime:
    shutil.rmtree(workdir, ignore_errors=True)
    keyring = LocalKeyring.create(workdir / "keyring.json")
    settings = Settings.from_env({
        "CUSCRED_DATABASE_URL": f"sqlite:///{workdir / 'cuscred.db'}",
        "CUSCRED_KEYRING_PATH": str(keyring.path),
    })
    runtime = build_runtime(settings)
    upgrade_to_head(runtime.engine)
    console.print(f"keyring {keyring.path} (KEK v1, mode 0600); SQLite {workdir / 'cuscred.db'} "
                  "migrated; no broker: jobs run in this process")
    return runtime


def highlights(runtime: Runtime, console: Console) -> None:
    console.rule("the contract in brief")
    svc = runtime.credential_service(actor="demo")
    refs = {
        (tenant, provider): svc.encrypt_credential(tenant, generate_secret(provider),
                                                   {"provider": provider})
        for tenant, provider in (("acme", "openai"), ("acme", "vertex"), ("globex", "anthropic"))
    }
    ref = refs["acme", "openai"]
    value = svc.resolve_credential("acme", ref, {"provider": "openai"})
    console.print(f"acme stores and resolves {ref} -> {svc.mask_credential(value)} "
                  f"({len(value)} chars)")
    try:
        svc.resolve_credential("globex", ref, {"provider": "openai"})
    except CredentialNotFoundError as exc:
        console.print(f"globex asking for it is refused: {type(exc).__name__}: {exc}")
    for tenant in ("acme", "globex"):
        listed = ", ".join(f"{i.provider} {i.masked}" for i in svc.list_credentials(tenant))
        console.print(f"masked listing for {tenant}: {listed}")


def load_data(
    runtime: Runtime, credentials: int, tenants: int, console: Console
) -> tuple[list[str], Generated]:
    console.rule(f"a realistic data set: {credentials:,} credentials over {tenants:,} tenants")
    started = time.perf_counter()
    items: Generated = [(g.tenant_id, g.secret, {"provider": g.provider})
                        for g in generate(credentials, tenants)]
    refs = runtime.credential_service(actor="demo").import_credentials(items, batch_size=1000)
    took = time.perf_counter() - started
    sizes: dict[str, int] = {}
    for tenant, _, _ in items:
        sizes[tenant] = sizes.get(tenant, 0) + 1
    biggest = max(sizes, key=sizes.__getitem__)
    console.print(f"generated and stored in {fmt_duration(took)} ({len(refs) / took:,.0f}/s); "
                  f"largest tenant {biggest} holds {sizes[biggest]:,}, median tenant "
                  f"{sorted(sizes.values())[len(sizes) // 2]}")
    seen: set[str] = set()
    for info in runtime.credential_service().list_credentials(biggest, limit=50):
        if info.provider not in seen and len(seen) < 3:
            seen.add(info.provider)
            console.print(f"  {info.reference}  {info.provider:<12} {info.masked}  "
                          f"KEK v{info.kek_version}")
    return refs, items


def census(runtime: Runtime) -> tuple[dict[int, int], dict[int, str]]:
    status = runtime.key_admin().status(per_tenant=False)
    return ({v.version: v.credentials for v in status.kek_versions},
            {v.version: v.state for v in status.kek_versions})


def rotate(runtime: Runtime, console: Console, rows: int) -> JobView:
    settings = runtime.settings
    helped = settings.local_prepare_processes and rows >= settings.local_prepare_min_rows
    console.rule("KEK rotation, chunks written in this process, prepared by a helper" if helped
                 else "KEK rotation, every chunk in this process")
    runner = AnnouncingRunner()
    service = runtime.rotation(runner, actor="demo")
    background = Background(lambda: service.rotate_kek(requested_by="demo"))
    job_id = background.announced_job(runner)
    if job_id is None:
        job_id = background.result()[0]
    view = watch(runtime.engine, job_id, console, stop=lambda: background.finished)
    background.result()
    console.print(f"job {view.id} {view.status}: {view.processed:,} rows in "
                  f"{fmt_duration(view.elapsed_s)}, {view.rate or 0:,.0f} rows/s")
    return view


def retire_unused(runtime: Runtime, states: dict[int, str], console: Console) -> list[int]:
    admin = runtime.key_admin(actor="demo")
    _, after = census(runtime)
    retired = []
    for version, state in sorted(after.items()):
        if state == "decrypt_only":
            admin.retire(version)  # allowed: the census shows no row on it
            retired.append(version)
            console.print(f"KEK v{version} retired: the census shows no row on it "
                          f"(it was {states.get(version)} before the rotation)")
    return retired


def check_sample(runtime: Runtime, refs: list[str], items: Generated) -> int:
    svc = runtime.credential_service(actor="demo")
    picks = random.Random(1).sample(range(len(refs)), min(SAMPLE, len(refs)))  # noqa: S311
    for i in picks:
        tenant, secret, context = items[i]
        if svc.resolve_credential(tenant, refs[i], context) != secret:
            raise AssertionError(f"{refs[i]} resolved to another value")
    return len(picks)


def run(workdir: Path, credentials: int, tenants: int, console: Console) -> DemoSummary:
    started = time.perf_counter()
    runtime = setup(workdir, console)
    try:
        highlights(runtime, console)
        refs, items = load_data(runtime, credentials, tenants, console)
        before, states_before = census(runtime)
        view = rotate(runtime, console, sum(before.values()))
        retired = retire_unused(runtime, states_before, console)
        after, states_after = census(runtime)
        sample = check_sample(runtime, refs, items)
        report = runtime.job_control().verify(actor="demo")
        with runtime.engine.connect() as conn:
            audit = verify_chain(conn, runtime.audit.keys)
    finally:
        runtime.engine.dispose()
    return DemoSummary(
        credentials=credentials, tenants=tenants, stored=sum(before.values()), job_id=view.id,
        status=view.status, total=view.total, done=view.done, skipped=view.skipped,
        failed=view.failed, rows_per_s=view.rate or 0.0, census_before=before, census_after=after,
        states_after=states_after, retired=retired, sample_checked=sample,
        verified=report.checked, verify_failures=len(report.failures), audit_ok=audit.ok,
        audit_rows=audit.rows_checked, seconds=time.perf_counter() - started,
    )


def print_summary(s: DemoSummary, console: Console) -> None:
    console.rule("summary")
    table = Table("KEK version", "credentials before", "credentials after", "state after")
    for version in sorted(s.census_after):
        table.add_row(f"v{version}", fmt_count(s.census_before.get(version, 0)),
                      fmt_count(s.census_after[version]), s.states_after[version])
    console.print(table)
    lines = [
        ("rotation", f"job {s.job_id} {s.status}: {s.rows_per_s:,.0f} rows/s"),
        ("rows", f"done {s.done:,} + skipped {s.skipped:,} + failed {s.failed:,} "
                 f"= total {s.total:,}"),
        ("retired", ", ".join(f"v{v}" for v in s.retired) or "-"),
        ("sample", f"{s.sample_checked} credentials resolve to their original values"),
        ("verify", f"{s.verified:,} credentials decrypt, {s.verify_failures} fail"),
        ("audit", f"chain {'OK' if s.audit_ok else 'BROKEN'}: {s.audit_rows:,} rows"),
        ("time", f"{s.seconds:.1f}s in all"),
    ]
    for name, value in lines:
        console.print(f"{name + ':':<10}{value}")


def ok(s: DemoSummary) -> bool:
    """Whether the run shows what it claims: counts add up, nothing left on the old keys."""
    return (s.status == "completed" and s.done + s.skipped + s.failed == s.total == s.stored
            and s.verified == s.stored == sum(s.census_after.values()) and s.verify_failures == 0
            and s.audit_ok and bool(s.retired))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuscred.demo", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--credentials", type=int, default=DEFAULT_CREDENTIALS)
    parser.add_argument("--tenants", type=int, default=DEFAULT_TENANTS)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON")
    args = parser.parse_args(argv)
    if args.tenants < 1 or args.credentials < args.tenants:
        parser.error("need --tenants >= 1 and --credentials >= --tenants")
    console = Console(highlight=False, soft_wrap=True)
    summary = run(args.workdir, args.credentials, args.tenants, console)
    print_summary(summary, console)
    if args.json:
        console.print_json(data=asdict(summary))
    return 0 if ok(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
