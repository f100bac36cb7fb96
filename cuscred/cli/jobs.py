"""``cuscred jobs``: past and running re-encryption jobs, their chunks and failures; cancel and
resume. Everything shown is read from the job tables (nothing is decrypted), so it works the
same whether chunks run in workers or in-process."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from cuscred.cli.common import (
    EXIT_NOT_FOUND,
    err_console,
    fail,
    handled,
    out_console,
    print_json,
    state,
)
from cuscred.cli.progress import fmt_count, fmt_duration, fmt_rate
from cuscred.cli.rotation import Wait, launch
from cuscred.db.models import JobStatus
from cuscred.jobs.control import JobControl
from cuscred.jobs.service import RotationService
from cuscred.jobs.views import JobDetail, JobView, get_job, job_detail, list_jobs

Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
JobId = Annotated[int, typer.Argument(help="Job id (see `cuscred jobs`).", min=1)]

jobs_app = typer.Typer(
    help="Re-encryption jobs: `cuscred jobs` lists them; show, cancel, resume one.",
    invoke_without_command=True,
)


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context,
    json: Json = False,
    limit: Annotated[int, typer.Option(help="Newest N jobs.", min=1, max=10_000)] = 20,
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this state.")] = None,
) -> None:
    """Past and running jobs, newest first, with progress, rate and ETA."""
    if ctx.invoked_subcommand is not None:
        return
    with handled():
        views = list_jobs(state(ctx).runtime.engine, limit=limit,
                          status=None if status is None else status.value)
    if json:
        print_json([v.as_json() for v in views])
        return
    table = Table("id", "kind", "target", "tenant", "status", "done", "skipped", "failed",
                  "total", "progress", "rate", "ETA", "created", "started", "finished")
    for v in views:
        table.add_row(str(v.id), v.kind, _target(v), v.tenant_id or "(all)", v.status,
                      fmt_count(v.done), fmt_count(v.skipped), fmt_count(v.failed),
                      fmt_count(v.rows_total), _percent(v), fmt_rate(v.rate),
                      fmt_duration(v.eta_s), _ts(v.created_at, short=True),
                      _ts(v.started_at, short=True), _ts(v.finished_at, short=True))
    out_console.print(table)
    if not views:
        err_console.print("no jobs")


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: JobId,
    failures: Annotated[int, typer.Option(help="Failed credentials to list (0: all).",
                                          min=0)] = 100,
    json: Json = False,
) -> None:
    """One job: counts, chunk summary, and the credentials it could not move, with reasons."""
    with handled():
        detail = job_detail(state(ctx).runtime.engine, job_id, failures_limit=failures or None)
    if detail is None:
        fail(f"no job {job_id}", EXIT_NOT_FOUND)
    if json:
        print_json(detail.as_json())
        return
    _print_job(detail.job)
    _print_chunks(detail)
    _print_failures(detail)


def _print_job(v: JobView) -> None:
    lines = [
        ("job", f"{v.id} {v.kind} ({_target(v)}), tenant {v.tenant_id or '(all)'}"),
        ("status", v.status + (f" - {v.last_error}" if v.last_error else "")),
        ("requested by", v.requested_by),
        ("rows", f"done {fmt_count(v.done)}, skipped {fmt_count(v.skipped)}, failed "
                 f"{fmt_count(v.failed)} of {fmt_count(v.rows_total)} ({_percent(v)})"),
        ("rate", f"{fmt_rate(v.rate)} over {fmt_duration(v.elapsed_s)}"
                 + (f", ETA {fmt_duration(v.eta_s)}" if v.eta_s is not None else "")),
        ("created", _ts(v.created_at)), ("started", _ts(v.started_at)),
        ("finished", _ts(v.finished_at)), ("passes", str(v.passes)),
    ]
    if v.census is not None:  # recorded when the job completed
        lines.append(("census", "; ".join(
            f"KEK v{c['kek_version']} gen {c['key_generation']}: {fmt_count(c['credentials'])}"
            for c in v.census) or "no credentials in scope"))
    for name, value in lines:
        out_console.print(f"{name + ':':<14}{value}", markup=False)


def _print_chunks(d: JobDetail) -> None:
    c = d.chunks
    states = ", ".join(f"{n} {s}" for s, n in sorted(c.by_status.items())) or "none"
    out_console.print(f"{'chunks:':<14}{states}; {c.attempts} claims, {c.retried} retried, "
                      f"{c.crashes} crashes", markup=False)
    if c.duration_ms:
        ms = c.duration_ms
        out_console.print(f"{'chunk time:':<14}median {ms['median']} ms, min {ms['min']}, "
                          f"max {ms['max']}, total {fmt_duration(ms['total'] / 1000)}")
    for chunk_no, status, error in c.errors:
        out_console.print(f"  chunk {chunk_no} ({status}): {error}", markup=False)


def _print_failures(d: JobDetail) -> None:
    if not d.failure_count:
        return
    reasons = ", ".join(f"{n} {r}" for r, n in d.failure_reasons.items())
    out_console.print(f"{'failures:':<14}{d.failure_count} ({reasons})", markup=False)
    table = Table("credential id", "reason", "chunk", "recorded")
    for f in d.failures:
        table.add_row(f.credential_id, f.reason, str(f.chunk_no), _ts(f.created_at))
    out_console.print(table)
    if len(d.failures) < d.failure_count:
        err_console.print(f"{d.failure_count - len(d.failures)} more: --failures 0 lists all")


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: JobId) -> None:
    """Stop a job: pending chunks are cancelled, a running chunk finishes its transaction."""
    st = state(ctx)
    with handled():
        view = get_job(st.runtime.engine, job_id)
        if view is None:
            fail(f"no job {job_id}", EXIT_NOT_FOUND)
        if view.final:
            err_console.print(f"job {job_id} already ended ({view.status}); nothing to cancel")
            return
        status = st.runtime.job_control().cancel(job_id, actor=st.actor or "cli")
    err_console.print(f"job {job_id} {status}")


@jobs_app.command("resume")
def jobs_resume(ctx: typer.Context, job_id: JobId, wait: Wait = False) -> None:
    """Re-drive a job: cancelled and failed chunks go back to pending, open chunks are enqueued.

    Without a broker (CUSCRED_BROKER_URL unset) they run to the end in this process.
    """
    st = state(ctx)
    with handled():
        if get_job(st.runtime.engine, job_id) is None:
            fail(f"no job {job_id}", EXIT_NOT_FOUND)
        launch(st, lambda svc: _resume(svc, job_id, st.actor or "cli"),
               wait=wait, json=False, verb="resumed")


def _resume(svc: RotationService, job_id: int, actor: str) -> tuple[int, bool]:
    JobControl(svc).resume(job_id, actor=actor)
    return job_id, True


def _target(v: JobView) -> str:
    kek = "-" if v.target_kek_version is None else f"v{v.target_kek_version}"
    return kek if v.target_generation is None else f"{kek} gen {v.target_generation}"


def _percent(v: JobView) -> str:
    return "-" if v.fraction is None else f"{v.fraction:.0%}"


def _ts(when: datetime | None, *, short: bool = False) -> str:
    """UTC; the list drops the year to stay narrow."""
    if when is None:
        return "-"
    return f"{when:%m-%d %H:%M:%S}" if short else f"{when:%Y-%m-%d %H:%M:%S}"


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")


__all__ = ["register"]
