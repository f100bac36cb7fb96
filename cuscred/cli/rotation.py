"""CLI commands that start re-encryption jobs, and ``verify``.

``kek rotate``, ``reencrypt`` and ``rekey`` create a job and hand it to the runner: Celery
workers when ``CUSCRED_BROKER_URL`` is set, otherwise this very process (the embedded default),
which then runs every chunk before the command returns. ``--wait`` draws a progress bar read
from the job tables in both cases. Each prints the job id on stdout (for scripts) and exits 9
when a job it followed did not complete cleanly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.table import Table

from cuscred.cli.common import (
    EXIT_INTERNAL,
    EXIT_JOB,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_VERIFY,
    CliState,
    err_console,
    fail,
    handled,
    out_console,
    print_json,
    state,
)
from cuscred.cli.progress import (
    AnnouncingRunner,
    Background,
    fmt_count,
    fmt_duration,
    fmt_rate,
    watch,
)
from cuscred.config import KdfName
from cuscred.db.models import JobKind, JobStatus, KeyState
from cuscred.errors import CuscredError
from cuscred.jobs.chunks import is_retryable
from cuscred.jobs.service import RotationService
from cuscred.jobs.views import JobView, get_job

#: Starts (or resumes) a job; returns its id and whether this call drives it (False: a KEK
#: rotation was already in flight and belongs to whoever started it).
Start = Callable[[RotationService], tuple[int, bool]]

Json = Annotated[bool, typer.Option("--json", help="Print the final job as JSON on stdout.")]
Wait = Annotated[bool, typer.Option(
    "--wait", help="Follow the job with a progress bar until it ends. Without a broker the job "
                   "runs to completion in this process either way; --wait adds the bar.")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant.")]

kek_app = typer.Typer(help="KEK rotation (new version, promote, re-encrypt every row).",
                      no_args_is_help=True)


def launch(st: CliState, start: Start, *, wait: bool, json: bool, verb: str = "started") -> None:
    """Run ``start`` on a rotation service and report the job the way every command does."""
    runtime = st.runtime
    in_process = not runtime.settings.broker_url_value()
    runner = AnnouncingRunner() if in_process else None
    service = runtime.rotation(runner, actor=st.actor or "cli")
    bg: Background[tuple[int, bool]] | None = None
    with _step_failures(runner):
        if runner is not None:  # no broker: the whole job runs here, in a thread of its own
            bg = Background(lambda: start(service))
            announced = bg.announced_job(runner)
            job_id, driven = (announced, True) if announced is not None else bg.result()
        else:
            job_id, driven = start(service)
    _say_started(job_id, driven, verb, json=json, in_process=in_process)
    # Not driven here and no broker: waiting could last forever. Queued for the workers and no
    # --wait: `cuscred jobs` follows it. Either way, report the job as it is now.
    if (not driven and in_process) or not (wait or in_process):
        view = _get(st, job_id)
        if json:
            print_json(view.as_json())
        if not driven and in_process and not view.final:
            # Another job is in the way and this process is not driving it: the rotation asked
            # for has not happened. Exit 9 ("left unfinished"), not 0.
            raise typer.Exit(EXIT_JOB)
        return
    finish(st, _follow(st, job_id, bg, runner, wait=wait), json=json)


def _follow(st: CliState, job_id: int, bg: Background[tuple[int, bool]] | None,
            runner: AnnouncingRunner | None, *, wait: bool) -> JobView:
    try:
        if wait:
            view = watch(st.runtime.engine, job_id, err_console,
                         stop=(lambda: bg.finished) if bg else None)
        else:
            if bg is not None:
                bg.join()
            view = _get(st, job_id)
    except KeyboardInterrupt:
        where = ("it stops with this process; `cuscred jobs resume "
                 f"{job_id}` continues it" if runner else "the workers carry on")
        fail(f"interrupted while following job {job_id}: {where}", 130)
    if bg is not None:
        with _step_failures(runner):
            bg.result()  # a step that raised (after its retries) is reported, not swallowed
    return view


@contextmanager
def _step_failures(runner: AnnouncingRunner | None) -> Iterator[None]:
    """A step that still failed after the runner's retries: one line and a documented exit
    code (69 if retrying later may help, else 1) instead of a traceback. Library errors are
    left to :func:`~cuscred.cli.common.handled`. The job stays as its committed rows left it."""
    try:
        yield
    except CuscredError:
        raise
    except Exception as exc:
        code = EXIT_UNAVAILABLE if is_retryable(exc) else EXIT_INTERNAL
        job_id = runner.job_id if runner is not None else None
        if job_id is None:
            fail(f"the job could not be started ({type(exc).__name__})", code,
                 "`cuscred db status` checks the database schema")
        fail(f"job {job_id} stopped: a step failed ({type(exc).__name__})", code,
             f"`cuscred jobs show {job_id}` shows where; `cuscred jobs resume {job_id}` "
             "continues it")


def _say_started(job_id: int, driven: bool, verb: str, *, json: bool, in_process: bool) -> None:
    if not json:
        out_console.print(str(job_id))
    if driven:
        where = "running in this process" if in_process else "queued for the workers"
        err_console.print(f"job {job_id} {verb} ({where})")
    else:
        err_console.print(f"a KEK rotation is already in flight: job {job_id}")
        if in_process:
            err_console.print("no broker is configured: unless another process is driving it, "
                              f"`cuscred jobs resume {job_id}` runs it here")


def finish(st: CliState, view: JobView, *, json: bool) -> None:
    """The closing summary of a job this command followed; exit 9 unless it completed
    (``completed_with_errors``, ``failed``, ``cancelled``, or left unfinished)."""
    if json:
        print_json(view.as_json())
    else:
        err_console.print(
            f"job {view.id} {view.status}: {fmt_count(view.processed)} rows in "
            f"{fmt_duration(view.elapsed_s)} ({fmt_rate(view.rate)}): done {fmt_count(view.done)},"
            f" skipped {fmt_count(view.skipped)}, failed {fmt_count(view.failed)}")
        if view.failed:
            err_console.print(f"`cuscred jobs show {view.id}` lists the failed credentials")
        if not view.final:  # in-process: a chunk another process claimed, or one that died
            err_console.print(
                f"{view.open_chunks} chunk(s) still claimed elsewhere; a claim whose process "
                "died lapses after CUSCRED_CHUNK_LEASE_S: then `cuscred jobs resume "
                f"{view.id}` finishes the job")
        if view.status == JobStatus.COMPLETED and view.kind == JobKind.KEK_ROTATION:
            _hint_retire(st)
    if view.status != JobStatus.COMPLETED:
        raise typer.Exit(EXIT_JOB)


def _hint_retire(st: CliState) -> None:
    status = st.runtime.key_admin().status(per_tenant=False)
    for v in status.kek_versions:
        if v.state == KeyState.DECRYPT_ONLY and v.credentials == 0:
            err_console.print(f"KEK v{v.version} protects no row now: "
                              f"`cuscred keys retire {v.version}` retires it")


def _get(st: CliState, job_id: int) -> JobView:
    view = get_job(st.runtime.engine, job_id)
    if view is None:
        fail(f"no job {job_id}", EXIT_NOT_FOUND)
    return view


@kek_app.command("rotate")
def kek_rotate(ctx: typer.Context, wait: Wait = False, json: Json = False) -> None:
    """Rotate the KEK: a new version, promoted, then every row re-encrypted under it.

    Without a broker (CUSCRED_BROKER_URL unset) the job runs to the end in this process.

    If a rotation is already in flight, its id is printed instead.

    The old version stays readable: `cuscred keys retire V` once the job completed.
    """
    st = state(ctx)
    with handled():
        launch(st, lambda svc: svc.rotate_kek(requested_by=st.actor or "cli"),
               wait=wait, json=json)


def reencrypt(ctx: typer.Context, tenant: TenantOpt = None, wait: Wait = False,
              json: Json = False) -> None:
    """Move rows (all, or one tenant's) onto the active KEK and tenant key generations.

    Without a broker (CUSCRED_BROKER_URL unset) the job runs to the end in this process.
    """
    st = state(ctx)
    with handled():
        launch(st, lambda svc: (svc.reencrypt(requested_by=st.actor or "cli",
                                              tenant_id=tenant), True), wait=wait, json=json)


def rekey(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Argument(help="Tenant id to re-key.",
                                                 metavar="TENANT")] = None,
    all_with_kdf: Annotated[KdfName | None, typer.Option(
        "--all-with-kdf", help="Instead of one tenant: every tenant whose active generation "
                               "derives with this KDF, then one reencrypt job over all rows.",
    )] = None,
    kdf: Annotated[KdfName | None, typer.Option(
        help="KDF of the new generation(s) (default: CUSCRED_KDF).")] = None,
    iterations: Annotated[int | None, typer.Option(
        help="PBKDF2 iterations (default: CUSCRED_PBKDF2_ITERATIONS); not for hkdf-sha256.",
    )] = None,
    wait: Wait = False, json: Json = False,
) -> None:
    """Give TENANT a new key generation (fresh salt) and move its rows to it.

    With --all-with-kdf K --kdf K2: a new K2 generation for every tenant now on K, all in one
    transaction, then one reencrypt job (e.g. PBKDF2-derived tenant keys to HKDF, or back).

    Without a broker (CUSCRED_BROKER_URL unset) the job runs to the end in this process.
    """
    if (tenant is None) == (all_with_kdf is None):
        raise typer.BadParameter("give exactly one of TENANT and --all-with-kdf")
    if all_with_kdf is not None and kdf is None:
        raise typer.BadParameter("--all-with-kdf needs --kdf, the KDF to move the tenants to")
    st = state(ctx)
    actor = st.actor or "cli"
    with handled():
        params = st.runtime.keys.kdf_params(kdf, iterations)  # bad input fails before any job
        if all_with_kdf is not None:
            launch(st, lambda svc: (svc.rekey_all_with_kdf(all_with_kdf, params,
                                                           requested_by=actor), True),
                   wait=wait, json=json)
            return
        assert tenant is not None
        launch(st, lambda svc: (svc.rekey_tenant(tenant, requested_by=actor, kdf=params), True),
               wait=wait, json=json)


def verify(
    ctx: typer.Context,
    tenant: TenantOpt = None,
    job: Annotated[int | None, typer.Option(help="The scope of this job (its tenant, or all).",
                                            min=1)] = None,
    show: Annotated[int, typer.Option("--failures", help="Failing ids to list.", min=0)] = 100,
    json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Decrypt every credential in scope: counts per KEK version, failing ids; exit 8 if any.

    Plaintexts are dropped at once; one audit event records the run.
    """
    if tenant is not None and job is not None:
        raise typer.BadParameter("give --tenant or --job, not both")
    st = state(ctx)
    with handled():
        if job is not None:
            _get(st, job)
        report = st.runtime.job_control().verify(tenant_id=tenant, job_id=job,
                                                 actor=st.actor or "cli")
    per_version = {int(v): n for v, n in sorted(report.per_kek_version.items())}
    if json:
        print_json({"ok": report.ok, "checked": report.checked, "per_kek_version": per_version,
                    "failed": len(report.failures),
                    "failures": [{"credential_id": c, "reason": r}
                                 for c, r in report.failures[:show]]})
    else:
        table = Table("KEK version", "credentials")
        for version, n in per_version.items():
            table.add_row(str(version), fmt_count(n))
        out_console.print(table)
        for cid, reason in report.failures[:show]:
            out_console.print(f"{cid}  {reason}")
        err_console.print(f"verified {fmt_count(report.checked)} credentials: "
                          + ("all decrypt" if report.ok else f"{len(report.failures)} fail"))
    if not report.ok:
        raise typer.Exit(EXIT_VERIFY)


def register(app: typer.Typer) -> None:
    app.add_typer(kek_app, name="kek")
    app.command()(reencrypt)
    app.command()(rekey)
    app.command()(verify)


__all__ = ["finish", "launch", "register"]
