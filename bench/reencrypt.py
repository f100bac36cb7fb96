"""Benchmark: re-encrypting every credential onto a new KEK version, three ways.

What is measured
----------------
Every credential starts on KEK version 1 while version 2 is already ``active`` (steps 1-2 of a
KEK rotation done: DESIGN.md); each method moves rows to version 2 and is timed from its start
until every row it handles is committed on version 2.

*(a) job*: the library's re-encryption job, :meth:`RotationService.reencrypt`, from the call
until ``rotation_jobs.status`` is ``completed``. On PostgreSQL it runs on Celery: ``--workers``
prefork worker processes (``celery -A worker worker --concurrency 2 --pool prefork -Q cuscred
--without-mingle --without-gossip``, Redis broker), started and idle before the clock starts;
the benchmark process sends the job and polls the job row. On SQLite it runs with the embedded
default, the in-process runner (no broker), in a fresh child process. Either way it is the full
job: planning, claim / work / done per chunk (read the stale rows, decrypt, encrypt, one bulk
compare-and-swap statement, failures, chunk row, one audit event per row, one transaction),
finalize with its census.

*(b) floor*: the least work a correct bulk re-encryption does, in one process, no Celery: keyset
pagination by primary key over ``credentials`` (``pk > last AND kek_version <> target ORDER BY
pk LIMIT --chunk-size``), the library's own crypto (``open_row`` / ``seal_with`` with the
library's key manager and caches) and the job's own write statement
(:func:`cuscred.jobs.bulk.write_resealed`: one ``UPDATE … FROM`` compare-and-swap per batch),
one commit per batch. No audit events, no job or chunk bookkeeping, no claims: the floor does
strictly less work than the job, which also writes an audit event (an HMAC and a row) per
credential.

*(c) naive*: the loop most tools use: a SQLAlchemy ORM session, ``session.get(Credential, pk)``
for each row, decrypt and encrypt with the library, assign the attributes, ``commit()`` per row
(no compare-and-swap, no audit). It is slow, so it runs on a subset (the first ``--naive-rows``
stale rows by primary key) and reports rows/s over that subset.

Datasets: ``cuscred.datagen.generate(--rows, --tenants)`` (real key shapes, skewed tenants),
imported with :meth:`CredentialService.import_credentials`; plus a ``--small-rows`` dataset over
the same tenants for the memory comparison. Each is seeded once per backend into a template
(PostgreSQL: a database, then ``VACUUM ANALYZE``; SQLite: a file, WAL checkpointed), and every
measured run gets a fresh copy of it (``CREATE DATABASE … TEMPLATE`` then ``CHECKPOINT``; a file
copy), dropped afterwards: every method starts from the same bytes, with no dead tuples or WAL
left by the method before it, and its key caches cold (each run is a new process).

How noise is handled: ``--rounds`` rounds, methods in ABC order then CBA (ABBA-style), the
median per method is reported with every run's figure. Each run records the machine's CPU
busy fraction (``/proc/stat``), the client-side CPU (the child process, or the Celery pool
processes) and, on PostgreSQL, the server's (``postgres`` processes), so a run disturbed by
other load shows. Each run is checked afterwards (untimed): no row left on the old version
(naive: exactly the subset moved) and a sample of credentials resolves to its generated value.

Memory: the peak RSS (``VmHWM``) of each Celery pool process (SQLite: of the in-process
child, or of the helper process that prepares its chunks when the job is large enough for one,
``cuscred.jobs.local_pool``; the helper's CPU counts as the job's), for the full dataset and
for the small one, each in fresh processes. A job's memory should depend on the chunk size,
not on the number of rows.

Targets (printed, never asserted): (a) >= 70% of (b) rows/s; (a) >= 20x (c) rows/s; peak
worker RSS for ``--rows`` within 20% of that for ``--small-rows``.

Usage::

    .venv/bin/python bench/reencrypt.py [--backend sqlite|postgresql|both] [--rows 100000]
        [--tenants N] [--small-rows N] [--naive-rows 2000] [--skip-naive] [--quick]
        [--rounds 2] [--workers 2] [--chunk-size 2000] [--json] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import bindparam, func, select

from cuscred.config import Settings
from cuscred.datagen import generate
from cuscred.db.migrate import upgrade_to_head
from cuscred.db.models import (
    CREDENTIALS,
    ROTATION_CHUNKS,
    ROTATION_JOBS,
    TENANT_KEYS,
    Credential,
    JobStatus,
    KeyState,
    utcnow,
)
from cuscred.factory import Runtime, build_runtime
from cuscred.jobs.bulk import Reseal, write_resealed
from cuscred.jobs.finalize import FINAL
from cuscred.kek.local import LocalKeyring
from cuscred.services.sealing import TaskKeys, context_from_json, open_row, seal_with

REPO = Path(__file__).resolve().parents[1]
ACTOR = "bench-reencrypt"
PG_ADMIN_DSN = os.environ.get(
    "CUSCRED_BENCH_PG_DSN",
    os.environ.get("CUSCRED_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
)
REDIS_URL = os.environ.get("CUSCRED_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
TARGET_JOB_VS_FLOOR = 0.70
TARGET_JOB_VS_NAIVE = 20.0
TARGET_RSS_GROWTH = 0.20
SAMPLE_SIZE = 100  # credentials resolved after each run to check the values
JOB_TIMEOUT_S = 1800
CLK_TCK = os.sysconf("SC_CLK_TCK")
METHODS = ("job", "floor", "naive")
LABELS = {
    "job": "(a) job",
    "floor": "(b) floor",
    "naive": "(c) naive",
}

_C = CREDENTIALS
_TK = TENANT_KEYS
_J = ROTATION_JOBS
_CH = ROTATION_CHUNKS


# --- /proc: memory and CPU ------------------------------------------------------------------


def proc_status_kib(pid: int | str, field_name: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``: peak RSS; ``VmRSS``: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for pid {pid}")


def _stat_fields(pid: int | str) -> tuple[str, list[str]]:
    """(comm, fields after comm) of ``/proc/<pid>/stat``: fields[1] is ppid, [11]/[12] are
    utime/stime in clock ticks."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    return comm, raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int | str) -> float:
    _, fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(_stat_fields(entry.name)[1][1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every live ``postgres`` process (the server: backends and helpers)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                comm, fields = _stat_fields(entry.name)
                if comm == "postgres":
                    out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return sum(parts[:8]) - idle, sum(parts[:8])


@dataclass
class CpuWindow:
    """Machine CPU busy fraction and the PostgreSQL server's CPU over a measured interval."""

    postgres: bool
    _machine: tuple[int, int] = (0, 0)
    _pg: dict[int, float] = field(default_factory=dict)

    def start(self) -> None:
        self._pg = postgres_cpu() if self.postgres else {}
        self._machine = machine_ticks()

    def stop(self) -> dict[str, float | None]:
        busy, total = machine_ticks()
        pg_s = None
        if self.postgres:  # a backend that exited in the interval is not counted
            pg_s = sum(s - self._pg.get(pid, 0.0) for pid, s in postgres_cpu().items())
        d_total = max(1, total - self._machine[1])
        return {
            "machine_busy_pct": round(100 * (busy - self._machine[0]) / d_total, 1),
            "machine_cpu_s": round((busy - self._machine[0]) / CLK_TCK, 2),
            "server_cpu_s": None if pg_s is None else round(pg_s, 2),
        }


# --- datasets -------------------------------------------------------------------------------


@dataclass
class Dataset:
    """A seeded template: every credential on KEK v1, v2 active."""

    backend: str
    rows: int
    tenants: int
    template: str  # PostgreSQL: database name; SQLite: file path
    keyring: Path
    sample: Path  # JSON [[tenant, reference, secret], ...]: generated test data only
    target_kek: int
    seed_s: float


def settings_for(url: str, keyring: Path, **extra: str) -> Settings:
    env = {"CUSCRED_DATABASE_URL": url, "CUSCRED_KEYRING_PATH": str(keyring), **extra}
    return Settings.from_env(env)


def pg_url(name: str) -> str:
    return f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"


def pg_admin(*statements: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)  # type: ignore[arg-type]


def seed_dataset(
    backend: str,
    rows: int,
    tenants: int,
    workdir: Path,
    prefix: str,
    args: argparse.Namespace,
    cleanup: contextlib.ExitStack,
) -> Dataset:
    started = time.perf_counter()
    if backend == "postgresql":
        template = f"{prefix}_seed{rows}"
        pg_admin(f'CREATE DATABASE "{template}"')
        cleanup.callback(pg_admin, f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        url = pg_url(template)
    else:
        template = str(workdir / f"seed-{rows}.db")
        url = f"sqlite:///{template}"
    keyring = LocalKeyring.create(workdir / f"keyring-{rows}.json").path
    runtime = build_runtime(settings_for(url, keyring))
    try:
        upgrade_to_head(runtime.engine)
        rng = random.Random(args.seed)
        picks = set(rng.sample(range(rows), min(SAMPLE_SIZE, rows)))
        secrets_by_index: dict[int, tuple[str, str]] = {}

        def items() -> Iterator[tuple[str, str, None]]:
            for index, cred in enumerate(generate(rows, tenants, seed=args.seed)):
                if index in picks:
                    secrets_by_index[index] = (cred.tenant_id, cred.secret)
                yield cred.tenant_id, cred.secret, None

        service = runtime.credential_service(actor=ACTOR)
        refs = service.import_credentials(items(), batch_size=1000)
        admin = runtime.key_admin(actor=ACTOR)
        target = admin.create_version()
        admin.promote(target)
    finally:
        runtime.engine.dispose()
    sample = workdir / f"sample-{rows}.json"
    fd = os.open(sample, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump([[t, refs[i], s] for i, (t, s) in sorted(secrets_by_index.items())], fh)
    if backend == "postgresql":
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
    else:
        with contextlib.closing(sqlite3.connect(template)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return Dataset(
        backend,
        rows,
        tenants,
        template,
        keyring,
        sample,
        target,
        round(time.perf_counter() - started, 1),
    )


@contextlib.contextmanager
def fresh_copy(dataset: Dataset, workdir: Path) -> Iterator[str]:
    """A copy of the template for one run (its URL); dropped afterwards, also on error."""
    tag = uuid.uuid4().hex[:6]
    if dataset.backend == "postgresql":
        name = f"{dataset.template}_run_{tag}"
        pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{dataset.template}"', "CHECKPOINT")
        try:
            yield pg_url(name)
        finally:
            pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    path = workdir / f"run-{dataset.rows}-{tag}.db"
    shutil.copyfile(dataset.template, path)
    try:
        yield f"sqlite:///{path}"
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def check_run(runtime: Runtime, target: int, expected_stale: int, sample_path: Path) -> None:
    """No row left behind (or exactly the untouched rest) and sampled values still correct."""
    with runtime.engine.connect() as conn:
        stale = conn.execute(
            select(func.count()).select_from(_C).where(_C.c.kek_version != target)
        ).scalar_one()
    if stale != expected_stale:
        raise RuntimeError(f"check: {stale} rows off v{target}, expected {expected_stale}")
    service = runtime.credential_service(actor=ACTOR)
    for tenant, ref, secret in json.loads(sample_path.read_text()):
        if service.resolve_credential(tenant, ref) != secret:
            raise RuntimeError(f"check: {ref} no longer resolves to its value")


# --- the three methods (each runs in a fresh process) --------------------------------------


_FLOOR_READ = (
    select(
        _C.c.pk,
        _C.c.credential_id,
        _C.c.tenant_id,
        _C.c.ciphertext,
        _C.c.kek_version,
        _C.c.key_generation,
        _C.c.row_version,
        _C.c.context_json,
    )
    .where(_C.c.pk > bindparam("after"), _C.c.kek_version != bindparam("target"))
    .order_by(_C.c.pk)
    .limit(bindparam("n"))
)


def floor_pass(runtime: Runtime, target: int, batch: int) -> int:
    """(b): keyset pages, library crypto, the job's bulk CAS write, one commit per page."""
    keys, engine = runtime.keys, runtime.engine
    with engine.connect() as conn:
        active = dict(
            conn.execute(  # active generation per tenant, read once
                select(_TK.c.tenant_id, _TK.c.generation).where(_TK.c.state == KeyState.ACTIVE)
            ).all()
        )
    after, written = 0, 0
    while True:
        with engine.begin() as conn:
            rows = conn.execute(_FLOOR_READ, {"after": after, "target": target, "n": batch}).all()
            if not rows:
                return written
            items = []
            # The same per-page memos as a chunk (TaskKeys, parsed contexts): the floor must
            # not do more work than the job for the crypto part.
            page_keys = TaskKeys(keys)
            contexts: dict[str, dict[str, str]] = {}
            for r in rows:
                context = contexts.get(r.context_json)
                if context is None:
                    context = contexts[r.context_json] = context_from_json(r.context_json)
                plaintext = open_row(
                    page_keys,
                    conn,
                    tenant_id=r.tenant_id,
                    credential_id=r.credential_id,
                    ciphertext=bytes(r.ciphertext),
                    kek_version=r.kek_version,
                    key_generation=r.key_generation,
                    context=context,
                )
                key = page_keys.tenant_key(conn, r.tenant_id, active[r.tenant_id], target)
                sealed = seal_with(key, plaintext, credential_id=r.credential_id, context=context)
                items.append(
                    Reseal(
                        pk=r.pk,
                        row_version=r.row_version,
                        old_kek_version=r.kek_version,
                        old_generation=r.key_generation,
                        ciphertext=sealed.ciphertext,
                        kek_version=sealed.kek_version,
                        key_generation=sealed.key_generation,
                        fingerprint=sealed.fingerprint,
                    )
                )
            written += len(write_resealed(conn, items, utcnow()))
            after = rows[-1].pk


def naive_pass(runtime: Runtime, target: int, limit: int) -> int:
    """(c): ORM object per row, decrypt, encrypt, assign, commit per row."""
    keys = runtime.keys
    generations: dict[str, int] = {}
    moved = 0
    with runtime.sessions() as session:
        pks = session.scalars(
            select(Credential.pk)
            .where(Credential.kek_version != target)
            .order_by(Credential.pk)
            .limit(limit)
        ).all()
        session.commit()
        for pk in pks:
            cred = session.get(Credential, pk)
            assert cred is not None
            conn = session.connection()
            context = context_from_json(cred.context_json)
            plaintext = open_row(
                keys,
                conn,
                tenant_id=cred.tenant_id,
                credential_id=cred.credential_id,
                ciphertext=cred.ciphertext,
                kek_version=cred.kek_version,
                key_generation=cred.key_generation,
                context=context,
            )
            generation = generations.get(cred.tenant_id)
            if generation is None:
                generation = keys.active_generation(conn, cred.tenant_id, create=False)
                assert generation is not None
                generations[cred.tenant_id] = generation
            key = keys.tenant_key(conn, cred.tenant_id, generation, target)
            sealed = seal_with(key, plaintext, credential_id=cred.credential_id, context=context)
            cred.ciphertext = sealed.ciphertext
            cred.kek_version = sealed.kek_version
            cred.key_generation = sealed.key_generation
            cred.fingerprint = sealed.fingerprint
            cred.reencrypted_at = utcnow()
            session.commit()
            moved += 1
    return moved


def job_in_process(runtime: Runtime) -> int:
    """(a) without a broker: the embedded default runs every step here, in order."""
    job_id = runtime.rotation(actor="rotation-worker").reencrypt(requested_by=ACTOR)
    with runtime.engine.connect() as conn:
        job = conn.execute(select(_J).where(_J.c.id == job_id)).one()
    if job.status != JobStatus.COMPLETED:
        raise RuntimeError(f"job {job_id} ended {job.status}: {job.last_error}")
    return int(job.done)


def job_breakdown(runtime: Runtime, job_id: int | None = None) -> dict[str, Any]:
    """Where the job's wall time went, from its own rows (all timestamps from utcnow())."""
    with runtime.engine.connect() as conn:
        query = select(_J).order_by(_J.c.id.desc()).limit(1)
        job = conn.execute(query if job_id is None else select(_J).where(_J.c.id == job_id)).one()
        chunks = conn.execute(
            select(
                func.count(),
                func.min(_CH.c.started_at),
                func.max(_CH.c.finished_at),
                func.sum(_CH.c.duration_ms),
                func.max(_CH.c.duration_ms),
                func.sum(_CH.c.attempts),
            ).where(_CH.c.job_id == job.id)
        ).one()
    n, first_start, last_finish, busy_ms, max_ms, attempts = chunks

    def ms(a: Any, b: Any) -> float | None:
        return None if a is None or b is None else round((b - a).total_seconds() * 1000, 1)

    return {
        "job_id": int(job.id),
        "status": job.status,
        "done": int(job.done),
        "skipped": int(job.skipped),
        "failed": int(job.failed),
        "chunks": int(n),
        "chunk_attempts": int(attempts or 0),
        "passes": int(job.passes),
        "created_to_planned_ms": ms(job.created_at, job.started_at),
        "planned_to_first_chunk_ms": ms(job.started_at, first_start),
        "chunk_phase_ms": ms(first_start, last_finish),
        "last_chunk_to_finished_ms": ms(last_finish, job.finished_at),
        "chunk_busy_ms_sum": int(busy_ms or 0),
        "chunk_ms_mean": round(int(busy_ms or 0) / max(1, int(n)), 1),
        "chunk_ms_max": int(max_ms or 0),
    }


def child_main(spec: dict[str, Any]) -> int:
    """One measured method in this fresh process; prints one JSON line."""
    runtime = build_runtime(settings_for(spec["url"], Path(spec["keyring"])))
    method, target = spec["method"], spec["target"]
    calls: dict[str, Callable[[], int]] = {
        "job": lambda: job_in_process(runtime),
        "floor": lambda: floor_pass(runtime, target, spec["batch"]),
        "naive": lambda: naive_pass(runtime, target, spec["naive_rows"]),
    }
    gc.collect()
    busy_before = wait_for_quiet(argparse.Namespace(**spec["quiet"]))
    baseline_kib = proc_status_kib("self", "VmRSS")
    window = CpuWindow(postgres=spec["url"].startswith("postgresql"))
    profiler = cProfile.Profile() if spec.get("profile") else None
    window.start()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, t0 = time.process_time(), time.perf_counter()
    rows = calls[method]() if profiler is None else profiler.runcall(calls[method])
    wall = time.perf_counter() - t0
    # The job's helper processes (cuscred.jobs.local_pool) have exited and been reaped by
    # now: their CPU and peak RSS are the job's too.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    helpers_cpu = (children.ru_utime + children.ru_stime
                   - children0.ru_utime - children0.ru_stime)
    client_cpu = time.process_time() - cpu0 + helpers_cpu
    cpu = window.stop()
    peak_kib = proc_status_kib("self", "VmHWM")
    result: dict[str, Any] = {
        "rows": rows,
        "wall_s": wall,
        "busy_before_pct": busy_before,
        "client_cpu_s": round(client_cpu, 2),
        "helpers_cpu_s": round(helpers_cpu, 2),
        **cpu,
        "rss_kib": {"baseline": baseline_kib, "peak": peak_kib,
                    # ru_maxrss: KiB on Linux; 0 when no helper ran
                    "helper_peak": children.ru_maxrss if helpers_cpu else 0},
    }
    if method == "job":
        result["breakdown"] = job_breakdown(runtime)
    if profiler is not None:
        result["profile"] = profile_text(profiler)
    expected_stale = spec["rows_total"] - rows if method == "naive" else 0
    check_run(runtime, target, expected_stale, Path(spec["sample"]))
    runtime.engine.dispose()
    print(json.dumps(result))
    return 0


def profile_text(profiler: cProfile.Profile, top: int = 30) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    site = str(Path(psycopg.__file__).resolve().parents[1]) + "/"
    return buf.getvalue().replace(site, "").replace(str(REPO) + "/", "")


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSCRED_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_child(
    method: str, url: str, dataset: Dataset, args: argparse.Namespace, *, profile: bool = False
) -> dict[str, Any]:
    spec = {
        "method": method,
        "url": url,
        "keyring": str(dataset.keyring),
        "target": dataset.target_kek,
        "batch": args.chunk_size,
        "naive_rows": args.naive_rows,
        "rows_total": dataset.rows,
        "sample": str(dataset.sample),
        "profile": profile,
        "quiet": {"settle": args.settle, "quiet_below": args.quiet_below},
    }
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_child_env(),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{method} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["rss_kib"] = {"process": result["rss_kib"]}
    return result


# --- (a) on Celery ------------------------------------------------------------------------


class CeleryWorkers:
    """``celery -A worker worker`` with a prefork pool, in its own process group."""

    def __init__(self, env: dict[str, str], concurrency: int, log_path: Path) -> None:
        self.env = env
        self.concurrency = concurrency
        self.log_path = log_path
        self.node = f"bench-{uuid.uuid4().hex[:8]}@%h"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pool: list[int] = []
        self.baseline_kib: dict[int, int] = {}
        self._cpu0: dict[int, float] = {}

    def __enter__(self) -> CeleryWorkers:
        celery_bin = Path(sys.executable).with_name("celery")
        cmd = [
            str(celery_bin),
            "-A",
            "worker",
            "worker",
            "--concurrency",
            str(self.concurrency),
            "--pool",
            "prefork",
            "-Q",
            "cuscred",
            "--without-mingle",
            "--without-gossip",
            "-n",
            self.node,
            "--loglevel",
            "INFO",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float = 90.0) -> None:
        from celery import Celery

        assert self.proc is not None
        client = Celery(
            "cuscred-bench-ping", broker=self.env["CUSCRED_BROKER_URL"], set_as_current=False
        )
        node = self.node.replace("%h", os.uname().nodename)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"celery worker exited ({self.proc.returncode}):\n" + self.log_tail()
                    )
                if client.control.ping(destination=[node], timeout=0.5):
                    self.pool = children_of(self.proc.pid)
                    if len(self.pool) >= self.concurrency:
                        break
                time.sleep(0.2)
            else:
                raise RuntimeError("celery worker not ready in time:\n" + self.log_tail())
        finally:
            client.close()
        time.sleep(0.5)  # let the pool processes settle after start-up
        self.baseline_kib = {pid: proc_status_kib(pid, "VmRSS") for pid in self.pool}
        self._cpu0 = {pid: cpu_seconds(pid) for pid in [self.proc.pid, *self.pool]}

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def measure(self) -> dict[str, Any]:
        """Peak RSS per pool process (VmHWM) and CPU since ready; call before stopping."""
        assert self.proc is not None
        pids = [self.proc.pid, *self.pool]
        cpu = {pid: cpu_seconds(pid) - self._cpu0[pid] for pid in pids}
        return {
            "rss_kib": {
                "pool": [
                    {"baseline": self.baseline_kib[pid], "peak": proc_status_kib(pid, "VmHWM")}
                    for pid in self.pool
                ],
                "main": {"peak": proc_status_kib(self.proc.pid, "VmHWM")},
            },
            "client_cpu_s": round(sum(cpu[pid] for pid in self.pool), 2),
            "main_cpu_s": round(cpu[self.proc.pid], 2),
        }

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the worker's own process group."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this worker leads (its pool)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def __exit__(self, *_: object) -> None:
        self.stop()


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def run_celery_job(
    url: str, dataset: Dataset, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """(a) on PostgreSQL: fresh workers, then time ``reencrypt`` until the job row is final."""
    env = _child_env() | {
        "CUSCRED_DATABASE_URL": url,
        "CUSCRED_KEYRING_PATH": str(dataset.keyring),
        "CUSCRED_BROKER_URL": args.redis_url,
        "CUSCRED_CHUNK_SIZE": str(args.chunk_size),
    }
    settings = settings_for(
        url,
        dataset.keyring,
        CUSCRED_BROKER_URL=args.redis_url,
        CUSCRED_CHUNK_SIZE=str(args.chunk_size),
    )
    flush_redis(args.redis_url)
    runtime = build_runtime(settings)
    try:
        with CeleryWorkers(env, args.workers, workdir / "celery-worker.log") as workers:
            service = runtime.rotation(actor=ACTOR)  # a broker is set: CeleryRunner
            poll = select(_J.c.status).where(_J.c.id == bindparam("id"))
            busy_before = wait_for_quiet(args)
            window = CpuWindow(postgres=True)
            window.start()
            t0 = time.perf_counter()
            job_id = service.reencrypt(requested_by=ACTOR)
            while True:
                with runtime.engine.connect() as conn:
                    status = conn.execute(poll, {"id": job_id}).scalar_one()
                if status in FINAL:
                    break
                if time.perf_counter() - t0 > JOB_TIMEOUT_S:
                    raise RuntimeError(f"job {job_id} still {status} after {JOB_TIMEOUT_S}s")
                time.sleep(0.02)
            wall = time.perf_counter() - t0
            cpu = window.stop()
            measured = workers.measure()
        breakdown = job_breakdown(runtime, job_id)
        if status != JobStatus.COMPLETED:
            raise RuntimeError(f"job {job_id} ended {status}")
        check_run(runtime, dataset.target_kek, 0, dataset.sample)
    finally:
        runtime.engine.dispose()
        flush_redis(args.redis_url)
    return {
        "rows": breakdown["done"],
        "wall_s": wall,
        "busy_before_pct": busy_before,
        **cpu,
        **measured,
        "breakdown": breakdown,
    }


# --- one backend ----------------------------------------------------------------------------


def peak_of(run: dict[str, Any]) -> int:
    """The largest per-process peak RSS of a job run (pool processes, or the one process)."""
    rss = run["rss_kib"]
    if "pool" in rss:
        return max(p["peak"] for p in rss["pool"])
    return max(int(rss["process"]["peak"]), int(rss["process"].get("helper_peak", 0)))


def wait_for_quiet(args: argparse.Namespace) -> float:
    """The machine's busy % over the last second; with ``--settle S``, first wait up to S
    seconds for it to drop below ``--quiet-below`` (a shared machine: let other load pass)."""
    deadline = time.monotonic() + args.settle
    while True:
        busy0, total0 = machine_ticks()
        time.sleep(1.0)
        busy1, total1 = machine_ticks()
        busy = 100 * (busy1 - busy0) / max(1, total1 - total0)
        if busy < args.quiet_below or time.monotonic() >= deadline:
            return round(busy, 1)


def run_method(
    method: str, dataset: Dataset, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    with fresh_copy(dataset, workdir) as url:
        if method == "job" and dataset.backend == "postgresql":
            result = run_celery_job(url, dataset, args, workdir)
        else:
            result = run_child(method, url, dataset, args)
    result["rows_per_s"] = round(result["rows"] / result["wall_s"], 1)
    result["wall_s"] = round(result["wall_s"], 3)
    ours = result["client_cpu_s"] + result.get("main_cpu_s", 0) + (result["server_cpu_s"] or 0)
    # CPU the machine spent on anything else during the run: other load disturbing it.
    result["other_cpu_s"] = round(max(0.0, result["machine_cpu_s"] - ours), 2)
    return result


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    methods = [m for m in METHODS if not (m == "naive" and args.skip_naive)]
    with contextlib.ExitStack() as stack:
        workdir = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="cuscred-bench-reencrypt-", dir=args.tmpdir)
            )
        )
        prefix = f"cuscred_bench_{uuid.uuid4().hex[:8]}"
        datasets = {}
        for rows in (args.rows, args.small_rows):
            log(args, f"[{backend}] seeding {rows:,} credentials over {args.tenants:,} tenants")
            datasets[rows] = seed_dataset(backend, rows, args.tenants, workdir, prefix, args, stack)
        big, small = datasets[args.rows], datasets[args.small_rows]
        runs: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            order = methods if rnd % 2 == 0 else list(reversed(methods))
            for method in [*order, "job-small"]:
                name, dataset = ("job", small) if method == "job-small" else (method, big)
                log(args, f"[{backend}] round {rnd + 1}/{args.rounds}: {method}")
                result = run_method(name, dataset, args, workdir)
                result.update(method=method, round=rnd + 1)
                log(
                    args,
                    f"[{backend}]   {result['rows']:,} rows in {result['wall_s']:.2f}s "
                    f"= {result['rows_per_s']:,.0f} rows/s",
                )
                runs.append(result)
        result = summarise(backend, args, big, small, methods, runs)
        if args.profile:
            result["profiles"] = {}
            for method in ("job", "floor"):
                log(args, f"[{backend}] cProfile: {method} in one process")
                with fresh_copy(big, workdir) as url:
                    run = run_child(method, url, big, args, profile=True)
                result["profiles"][method] = {
                    "rows_per_s_under_profiler": round(run["rows"] / run["wall_s"], 1),
                    "text": run["profile"],
                }
        return result


def summarise(
    backend: str,
    args: argparse.Namespace,
    big: Dataset,
    small: Dataset,
    methods: list[str],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    def median_rate(method: str) -> float:
        return statistics.median(r["rows_per_s"] for r in runs if r["method"] == method)

    summary = {
        m: {
            "rows_per_s_median": round(median_rate(m), 1),
            "rows_per_s_runs": [r["rows_per_s"] for r in runs if r["method"] == m],
            "rows": next(r["rows"] for r in runs if r["method"] == m),
        }
        for m in [*methods, "job-small"]
    }
    job, floor = summary["job"]["rows_per_s_median"], summary["floor"]["rows_per_s_median"]
    rss_big = max(peak_of(r) for r in runs if r["method"] == "job")
    rss_small = max(peak_of(r) for r in runs if r["method"] == "job-small")
    rss_ratio = rss_big / rss_small
    targets: dict[str, dict[str, Any]] = {
        "job_over_floor": {
            "value": round(job / floor, 3),
            "target": f">= {TARGET_JOB_VS_FLOOR}",
            "met": job / floor >= TARGET_JOB_VS_FLOOR,
        },
        "rss_big_over_small": {
            "value": round(rss_ratio, 3),
            "target": f"within {TARGET_RSS_GROWTH:.0%}",
            "met": abs(rss_ratio - 1) <= TARGET_RSS_GROWTH,
        },
    }
    if "naive" in methods:
        naive = summary["naive"]["rows_per_s_median"]
        targets["job_over_naive"] = {
            "value": round(job / naive, 1),
            "target": f">= {TARGET_JOB_VS_NAIVE:g}",
            "met": job / naive >= TARGET_JOB_VS_NAIVE,
        }
    if backend == "postgresql":
        database = f"PostgreSQL {PG_ADMIN_DSN.rsplit('@', 1)[-1].rsplit('/', 1)[0]}"
        job_how = (
            f"Celery, {args.workers} prefork worker processes, Redis "
            f"{args.redis_url.rsplit('@', 1)[-1]}"
        )
    else:
        database = "SQLite file (WAL, synchronous=FULL)"
        job_how = ("in-process runner (no broker); a helper process prepares chunks of jobs "
                   "of CUSCRED_LOCAL_PREPARE_MIN_ROWS rows or more")
    return {
        "backend": backend,
        "database": database,
        "job_runs_on": job_how,
        "rows": args.rows,
        "small_rows": args.small_rows,
        "tenants": args.tenants,
        "naive_rows": None if args.skip_naive else min(args.naive_rows, args.rows),
        "chunk_size": args.chunk_size,
        "rounds": args.rounds,
        "order": "ABC then CBA per pair of rounds; each run on a fresh copy of the template",
        "seed_s": {str(big.rows): big.seed_s, str(small.rows): small.seed_s},
        "summary": summary,
        "peak_rss_kib": {str(big.rows): rss_big, str(small.rows): rss_small},
        "targets": targets,
        "runs": runs,
    }


# --- output ---------------------------------------------------------------------------------


def log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def render(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"== {result['backend']}: {result['database']}; (a) on {result['job_runs_on']}",
        f"   {result['rows']:,} credentials / {result['tenants']:,} tenants, chunk size "
        f"{result['chunk_size']:,}, {result['rounds']} rounds ({result['order']})",
        f"   {'method':<44}{'rows':>9}{'rows/s (median)':>17}   every run",
    ]
    desc = {
        "job": "(a) job " + ("(Celery)" if result["backend"] == "postgresql" else "(in-process)"),
        "floor": "(b) floor: 1 process, keyset + bulk CAS",
        "naive": "(c) naive: ORM, commit per row (subset)",
        "job-small": f"    (a) on {result['small_rows']:,} rows (memory baseline)",
    }
    for method, figures in s.items():
        every = ", ".join(f"{x:,.0f}" for x in figures["rows_per_s_runs"])
        lines.append(
            f"   {desc[method]:<44}{figures['rows']:>9,}"
            f"{figures['rows_per_s_median']:>17,.0f}   {every}"
        )
    lines.append("")
    lines.append(
        "   per run: wall time; job phases from its rows; CPU seconds of the client (the "
        "job or method process, or the Celery pool), the server and anything else "
        "on the machine; peak RSS"
    )
    for run in result["runs"]:
        cpu = (
            f"CPU client {run['client_cpu_s']}"
            + (f" (helpers {run['helpers_cpu_s']})" if run.get("helpers_cpu_s") else "")
            + (f" server {run['server_cpu_s']}" if run["server_cpu_s"] is not None else "")
            + f" other {run['other_cpu_s']} (busy {run['machine_busy_pct']:.0f}%, "
            f"{run['busy_before_pct']:.0f}% just before)"
        )
        rss = run["rss_kib"]
        if "pool" in rss:
            peak = "/".join(_mib(p["peak"]) for p in rss["pool"])
            peak += " (at start " + "/".join(_mib(p["baseline"]) for p in rss["pool"]) + ")"
        else:
            peak = f"{_mib(rss['process']['peak'])} (at start {_mib(rss['process']['baseline'])})"
            if rss["process"].get("helper_peak"):
                peak += f", helper {_mib(rss['process']['helper_peak'])}"
        phases = ""
        if "breakdown" in run:
            b = run["breakdown"]
            phases = (
                f" [plan {b['created_to_planned_ms']:.0f} ms, {b['chunks']} chunks in "
                f"{b['chunk_phase_ms']:.0f} ms (mean {b['chunk_ms_mean']:.0f} ms), "
                f"finalize {b['last_chunk_to_finished_ms']:.0f} ms]"
            )
        lines.append(
            f"   {run['round']} {run['method']:<9} {run['rows']:>7,} rows "
            f"{run['wall_s']:6.2f} s{phases}; {cpu}; peak RSS MiB {peak}"
        )
    lines.append("")
    t = result["targets"]
    rss = result["peak_rss_kib"]
    big, small = str(result["rows"]), str(result["small_rows"])

    def verdict(name: str) -> str:
        return "met" if t[name]["met"] else "NOT met"

    lines.append(
        f"   (a)/(b) = {t['job_over_floor']['value']:.2f}   "
        f"(target {t['job_over_floor']['target']}: {verdict('job_over_floor')})"
    )
    if "job_over_naive" in t:
        lines.append(
            f"   (a)/(c) = {t['job_over_naive']['value']:.1f}x  "
            f"(target {t['job_over_naive']['target']}x: {verdict('job_over_naive')}; "
            f"(c) measured on the first {result['naive_rows']:,} rows)"
        )
    who = ("per worker process" if result["backend"] == "postgresql"
           else "of the job process or its helper")
    lines.append(
        f"   peak RSS {who}: {int(big):,} rows {_mib(rss[big])} MiB, {int(small):,} rows "
        f"{_mib(rss[small])} MiB, ratio {t['rss_big_over_small']['value']:.3f} "
        f"(target {t['rss_big_over_small']['target']}: {verdict('rss_big_over_small')})"
    )
    for method, prof in result.get("profiles", {}).items():
        lines.append(
            f"\n-- {result['backend']}: cProfile of {method} in one process "
            f"({prof['rows_per_s_under_profiler']:,.0f} rows/s under the profiler)\n" + prof["text"]
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--rows", type=int, help="credentials (default 100,000; --quick 20,000)")
    parser.add_argument("--tenants", type=int, help="tenants (default 3%% of --rows)")
    parser.add_argument(
        "--small-rows", type=int, help="dataset for the memory comparison (default --rows / 10)"
    )
    parser.add_argument("--naive-rows", type=int, help="subset for (c) (default 2,000)")
    parser.add_argument("--skip-naive", action="store_true", help="leave out (c)")
    parser.add_argument(
        "--quick", action="store_true", help="20,000 rows, 1,000 naive rows: a smoke run"
    )
    parser.add_argument("--rounds", type=int, default=2, help="ABC/CBA rounds (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="Celery pool processes")
    parser.add_argument(
        "--chunk-size", type=int, default=2000, help="job chunk size and floor batch size"
    )
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument(
        "--redis-url",
        default=REDIS_URL,
        help="broker for (a) on PostgreSQL; the DB is flushed before and after",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the machine to be quiet",
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=20.0,
        help="busy %% (all CPUs, over 1 s) that counts as quiet for --settle (default 20)",
    )
    parser.add_argument("--tmpdir", help="where SQLite files and keyrings go (a real disk)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--profile", action="store_true", help="afterwards, cProfile (a) in-process and (b), top 30"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    args.rows = args.rows or (20_000 if args.quick else 100_000)
    args.naive_rows = args.naive_rows or (1_000 if args.quick else 2_000)
    args.tenants = args.tenants or max(1, args.rows * 3 // 100)
    args.small_rows = args.small_rows or max(1, args.rows // 10)
    if (
        min(
            args.rows,
            args.tenants,
            args.small_rows,
            args.naive_rows,
            args.rounds,
            args.workers,
            args.chunk_size,
        )
        < 1
    ):
        parser.error("counts must be positive")
    if args.small_rows < args.tenants or args.small_rows >= args.rows:
        parser.error("need --tenants <= --small-rows < --rows (same tenants in both datasets)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = [run_backend(backend, args) for backend in backends]
    if args.json:
        print(json.dumps({"results": results}, indent=2))
        return 0
    print("\n\n".join(render(result) for result in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
