"""Start a job and follow it with a progress bar read from the tables.

The bar never listens to the runner: it polls :func:`cuscred.jobs.views.get_job`, so it shows
the same thing whether Celery workers run the chunks or this process does. In the embedded
default (no broker) the in-process runner does all the work inside the call that starts the
job; :func:`run_in_background` runs that call in a thread and hands back the job id as soon as
the job is committed, while the main thread draws the bar. ``cuscred kek rotate --wait`` and
``make demo`` share this module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from rich.console import Console
from sqlalchemy import Engine

from cuscred.jobs.runner import InProcessRunner
from cuscred.jobs.views import JobView, get_job, reader_engine

if TYPE_CHECKING:  # rich.progress costs ~75 ms to import: only commands that draw a bar load it
    from rich.progress import Progress, TaskID

T = TypeVar("T")
POLL_S = 0.2


class AnnouncingRunner(InProcessRunner):
    """The in-process runner, telling another thread which job it is about to drive."""

    def __init__(self) -> None:
        super().__init__()
        self.job_id: int | None = None
        self.announced = threading.Event()

    def _announce(self, job_id: int) -> None:
        if self.job_id is None:
            self.job_id = job_id
            self.announced.set()

    def advance_rotation(self, job_id: int) -> None:
        self._announce(job_id)
        super().advance_rotation(job_id)

    def start(self, job_id: int) -> None:
        self._announce(job_id)
        super().start(job_id)

    def chunk(self, job_id: int, chunk_no: int) -> None:
        self._announce(job_id)
        super().chunk(job_id, chunk_no)

    def finalize(self, job_id: int) -> None:
        self._announce(job_id)
        super().finalize(job_id)


class Background(Generic[T]):
    """``call()`` in a daemon thread, keeping its result or exception for :meth:`result`.

    Daemon, so an interrupted CLI exits at once: the chunk transaction in flight rolls back and
    the job can be continued with ``cuscred jobs resume``.
    """

    def __init__(self, call: Callable[[], T]) -> None:
        self._call = call
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cuscred-job", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._call()
        except BaseException as exc:  # re-raised in the caller's thread by result()
            self._error = exc

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]  # set when no error was raised

    def announced_job(self, runner: AnnouncingRunner) -> int | None:
        """The job id once the runner is handed its first step; ``None`` if the call ended
        without handing it any (then :meth:`result` says why)."""
        while not runner.announced.wait(0.02):
            if self.finished:
                return runner.job_id
        return runner.job_id


def fmt_count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}/s"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _show(progress: Progress, task: TaskID, view: JobView) -> None:
    planned = view.fraction is not None
    progress.update(
        task, completed=view.fraction or 0.0, status=view.status,
        rows=f"{fmt_count(view.processed)}/{fmt_count(view.rows_total)} rows" if planned
        else "planning",
        rate=fmt_rate(view.rate) if planned else "",
        eta="" if view.final or not planned else f"ETA {fmt_duration(view.eta_s)}",
    )


def watch(
    engine: Engine, job_id: int, console: Console, *,
    stop: Callable[[], bool] | None = None, poll_s: float = POLL_S,
) -> JobView:
    """Draw a bar for ``job_id`` until it is final (or ``stop()`` says the driving thread
    ended); return the last view. The bar goes to ``console`` (the CLI uses stderr)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    progress = Progress(
        TextColumn("job {task.fields[job]} {task.fields[status]:<9}"), BarColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[rows]}  {task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"), console=console, transient=False,
    )
    reader = reader_engine(engine)
    try:
        return _follow(progress, reader, job_id, stop, poll_s)
    finally:
        if reader is not engine:
            reader.dispose()


def _follow(progress: Progress, engine: Engine, job_id: int,
            stop: Callable[[], bool] | None, poll_s: float) -> JobView:
    view = _must_get(engine, job_id)
    with progress:
        task = progress.add_task("", total=1.0, job=job_id, status="", rows="", rate="", eta="")
        while True:
            _show(progress, task, view)
            if view.final or (stop is not None and stop()):
                break
            time.sleep(poll_s)
            view = _must_get(engine, job_id)
        view = _must_get(engine, job_id)  # the state the driver left, after it stopped
        _show(progress, task, view)
    return view


def _must_get(engine: Engine, job_id: int) -> JobView:
    view = get_job(engine, job_id)
    if view is None:
        raise LookupError(f"job {job_id} disappeared")  # only by someone deleting the row
    return view


__all__ = [
    "AnnouncingRunner",
    "Background",
    "fmt_count",
    "fmt_duration",
    "fmt_rate",
    "watch",
]
