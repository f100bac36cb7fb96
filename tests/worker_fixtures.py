"""pytest plugin: the rotation worker as real processes against a real Redis.

Fixtures:

* ``redis_server`` (session): a private ``redis-server`` on a free port, without persistence.
  The shared Redis on 6379 is never touched, so nothing here can disturb (or be disturbed by)
  another test run or a developer's worker.
* ``redis_factory`` (function): ``make() -> RedisServer`` for a test that stops or restarts
  Redis; each one is killed at teardown.
* ``broker_url`` (function): a Redis database of ``redis_server`` of this test's own, flushed
  before and after it.
* ``stack`` (function): a :class:`Stack` over the ``database`` fixture (SQLite or PostgreSQL),
  the local ``keyring`` and ``broker_url``: the ``CUSCRED_*`` environment every process of the
  test shares, and methods that start ``celery -A worker worker|beat|flower`` subprocesses (each
  in its own process group, its output in a log file) and build the test's own runtime. Every
  process is killed at teardown, before the database is emptied.

Helpers for the tests: :func:`seed`, :func:`wait_for`, :func:`assert_rows_readable`,
:func:`reencrypt_events`, :func:`assert_no_secrets` (any 12 characters of a secret's random part,
KEK material in base64 and hex).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import redis
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.pool import NullPool

from cuscred.config import ENV_PREFIX, Settings
from cuscred.datagen import generate
from cuscred.db.models import CREDENTIALS, ROTATION_CHUNKS, ROTATION_JOBS
from cuscred.factory import Runtime, build_runtime
from cuscred.jobs.celery_runner import CeleryRunner
from cuscred.jobs.control import JobControl
from cuscred.jobs.finalize import FINAL
from cuscred.kek.local import LocalKeyring
from cuscred.logging_redaction import REDACTED
from cuscred.masking import PUBLIC_JSON_FIELDS
from cuscred.providers import parse_json_object
from cuscred.services.sealing import context_from_json, open_row

if TYPE_CHECKING:
    from tests.conftest import Database

REPO = Path(__file__).resolve().parent.parent
REDIS_BINARY = shutil.which("redis-server")
#: Databases 1-15 of the private server go to tests in turn; 0 is left alone.
_DB_NUMBERS = itertools.cycle(range(1, 16))
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], *, timeout: float, what: str,
    details: Callable[[], str] = lambda: "", interval: float = 0.05,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``details()`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{details()}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- Redis ----------------------------------------------------------------------------------


class RedisServer:
    """One ``redis-server`` without persistence: a restart loses every queued message."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if REDIS_BINARY is None:
            raise FileNotFoundError("redis-server is not installed")
        self.workdir = workdir
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        assert REDIS_BINARY is not None and not self.running
        args = [REDIS_BINARY, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)]
        with (self.workdir / "redis.log").open("ab") as out:
            self._proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        wait_for(self._pings, timeout=timeout, what=f"redis-server on port {self.port}")

    def _pings(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crash; with no persistence every queued and unacknowledged message goes."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisServer]]:
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis-private"))
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def broker_url(redis_server: RedisServer) -> Iterator[str]:
    db = next(_DB_NUMBERS)
    client = redis_server.client(db)
    client.flushdb()
    yield redis_server.url(db)
    client.flushdb()
    client.close()


# --- Celery processes ------------------------------------------------------------------------


def process_env(values: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any ``CUSCRED_*`` variable, plus ``values``.

    Settings refuse unknown ``CUSCRED_*`` names, and the test runner's own (such as
    ``CUSCRED_TEST_PG_DSN``) must not leak into a worker.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(values)
    return env


class CeleryProcess:
    """``celery -A worker <command>`` in its own process group, output in ``log_path``."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_path: Path):
        self.name = name
        self.args = args
        self.env = dict(env)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<CeleryProcess {self.name} pid={self.pid}>"

    def start(self) -> CeleryProcess:
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", *self.args],
                cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def wait_for_log(self, pattern: str, *, count: int = 1, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if not self.running and self.count(pattern) < count:
                pytest.fail(f"{self.name} exited ({self.returncode}):\n{self.tail()}")
            return self.count(pattern) >= count

        wait_for(seen, timeout=timeout, what=f"{count}x /{pattern}/ in {self.name}'s log",
                 details=self.tail)

    def tail(self, lines: int = 60) -> str:
        return f"--- {self.log_path.name} ---\n" + "\n".join(self.log().splitlines()[-lines:])

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait(self, timeout: float) -> int:
        assert self._proc is not None
        return self._proc.wait(timeout=timeout)

    def group_pids(self) -> list[int]:
        """Every live process in this process's group: the main process and its pool."""
        return [] if self.pid is None else _live_group_members(self.pid)

    def pool_pids(self) -> list[int]:
        return [p for p in self.group_pids() if p != self.pid]

    def signal_group(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """``kill -9`` the whole group (main process and every pool process). Idempotent."""
        if self._proc is None:
            return
        self.signal_group(signal.SIGCONT)  # a stopped process still dies, but be explicit
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        wait_for(lambda: not self.group_pids(), timeout=10, what=f"{self.name}'s group to exit")


@dataclass
class Stack:
    """Everything one test runs: the database, the shared environment, the processes."""

    database: Database
    env: dict[str, str]
    workdir: Path
    procs: list[CeleryProcess] = field(default_factory=list)
    _observer: Engine | None = None

    @property
    def observer(self) -> Engine:
        """An engine for watching progress. On SQLite, cuscred's engine begins every
        transaction with ``BEGIN IMMEDIATE``, so a read would wait for a running chunk's whole
        transaction; a plain connection reads the last committed state (WAL) without a lock."""
        if self.database.backend != "sqlite":
            return self.database.engine
        if self._observer is None:
            self._observer = create_engine(self.database.url, poolclass=NullPool)
        return self._observer

    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def runtime(self) -> Runtime:
        """The test's own runtime (same settings as the workers; Celery runner)."""
        return build_runtime(self.settings(), engine=self.database.engine)

    def runner(self) -> CeleryRunner:
        return CeleryRunner.from_settings(self.settings())

    def control(self) -> JobControl:
        return self.runtime().job_control()

    def _spawn(self, kind: str, args: list[str], name: str | None) -> CeleryProcess:
        name = name or f"{kind}{len(self.procs) + 1}"
        proc = CeleryProcess(name, args, process_env(self.env), self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc.start()

    def worker(self, concurrency: int = 1, *, name: str | None = None,
               ready: bool = True) -> CeleryProcess:
        """A worker (prefork pool of ``concurrency``), by default waited for until ready."""
        node = f"{name or f'worker{len(self.procs) + 1}'}-{uuid.uuid4().hex[:6]}@%h"
        proc = self._spawn("worker", [
            "worker", "--pool", "prefork", "--concurrency", str(concurrency), "-Q", "cuscred",
            "--without-mingle", "--without-gossip", "-n", node, "-l", "INFO",
        ], name)
        if ready:
            proc.wait_for_log(r"\bready\.")
        return proc

    def workers(self, count: int, concurrency: int = 1) -> list[CeleryProcess]:
        """``count`` workers started together, then waited for."""
        procs = [self.worker(concurrency, ready=False) for _ in range(count)]
        for proc in procs:
            proc.wait_for_log(r"\bready\.")
        return procs

    def beat(self, *, name: str | None = None) -> CeleryProcess:
        name = name or f"beat{len(self.procs) + 1}"
        return self._spawn("beat", [
            "beat", "-l", "INFO", "-s", str(self.workdir / f"{name}-schedule"),
        ], name)

    def flower(self, *, port: int, auth: str) -> CeleryProcess:
        proc = self._spawn("flower", [
            "flower", "--address=127.0.0.1", f"--port={port}", f"--basic-auth={auth}",
        ], "flower")
        wait_for(lambda: _http_ok(f"http://127.0.0.1:{port}/healthcheck"), timeout=30,
                 what="Flower's healthcheck", details=proc.tail)
        return proc

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``celery -A worker <args>`` to completion (a process expected to exit by itself)."""
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker", *args], cwd=REPO,
            env=process_env(self.env), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )

    def logs(self) -> dict[str, str]:
        return {p.name: p.log() for p in self.procs}

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill()
        if self._observer is not None:
            self._observer.dispose()

    # --- jobs -----------------------------------------------------------------------------

    def job(self, job_id: int) -> Any:
        with self.observer.connect() as conn:
            return conn.execute(select(ROTATION_JOBS).where(ROTATION_JOBS.c.id == job_id)).one()

    def chunks(self, job_id: int) -> list[Any]:
        with self.observer.connect() as conn:
            return list(conn.execute(select(ROTATION_CHUNKS).where(
                ROTATION_CHUNKS.c.job_id == job_id).order_by(ROTATION_CHUNKS.c.chunk_no)).all())

    def wait_job(self, job_id: int, *, timeout: float = 60.0,
                 sweep_every: float | None = None) -> Any:
        """Poll until the job is final; with ``sweep_every``, run the sweeper here meanwhile
        (what beat does every minute), as a fault drill's recovery path."""
        control = self.control() if sweep_every else None
        last_sweep = time.monotonic()

        def final() -> Any:
            nonlocal last_sweep
            if control is not None and time.monotonic() - last_sweep >= (sweep_every or 0):
                control.sweep()
                last_sweep = time.monotonic()
            job = self.job(job_id)
            return job if job.status in FINAL else None

        return wait_for(final, timeout=timeout, what=f"job {job_id} to finish",
                        details=lambda: f"{self.job(job_id)}\n{self.chunks(job_id)}\n"
                                        + self.tails())

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.observer.connect() as conn:
            return conn.execute(text(sql), params).scalar_one()


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a killed pool process whose parent
    died waits for init to reap it; it is gone for every purpose here)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may contain spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return sorted(pids)


def _http_ok(url: str) -> bool:
    try:
        with _HTTP.open(url, timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


#: Settings every stack starts from: small chunks; the rest is each test's business.
BASE_ENV = {"CUSCRED_CHUNK_SIZE": "100"}


@pytest.fixture
def stack(
    database: Database, keyring: LocalKeyring, broker_url: str, tmp_path: Path
) -> Iterator[Stack]:
    env = {
        "CUSCRED_DATABASE_URL": database.url,
        "CUSCRED_KEYRING_PATH": str(keyring.path),
        "CUSCRED_BROKER_URL": broker_url,
        **BASE_ENV,
    }
    workdir = tmp_path / "procs"
    workdir.mkdir()
    st = Stack(database, env, workdir)
    yield st
    st.kill_all()


# --- data and checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """What a test stored: credential id -> (tenant, plaintext, context)."""

    rows: dict[str, tuple[str, str, dict[str, str]]]

    @property
    def plaintexts(self) -> list[str]:
        return [p for _, p, _ in self.rows.values()]

    def __len__(self) -> int:
        return len(self.rows)


def seed(runtime: Runtime, credentials: int, tenants: int, *, seed: int = 0) -> Seeded:
    """Store generated credentials, shuffled as a platform's tenants write them over time, so a
    chunk (a primary-key range) spans many tenants."""
    items = [(g.tenant_id, g.secret, {"provider": g.provider})
             for g in generate(credentials, tenants, seed=seed)]
    random.Random(seed).shuffle(items)
    refs = runtime.credential_service().import_credentials(items, batch_size=1000)
    return Seeded({ref.removeprefix("encrypted://"): item
                   for ref, item in zip(refs, items, strict=True)})


def assert_rows_readable(runtime: Runtime, data: Seeded, *, kek_version: int) -> None:
    """Every stored row is on ``kek_version`` and decrypts to the plaintext it was given."""
    c = CREDENTIALS.c
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(c.credential_id, c.tenant_id, c.ciphertext, c.kek_version,
                                   c.key_generation, c.context_json)).all()
        assert len(rows) == len(data)
        versions = {r.kek_version for r in rows}
        assert versions == {kek_version}, f"rows on KEK versions {sorted(versions)}"
        for r in rows:
            tenant, plaintext, _ = data.rows[r.credential_id]
            opened = open_row(runtime.keys, conn, tenant_id=r.tenant_id,
                              credential_id=r.credential_id, ciphertext=bytes(r.ciphertext),
                              kek_version=r.kek_version, key_generation=r.key_generation,
                              context=context_from_json(r.context_json))
            assert (r.tenant_id, opened) == (tenant, plaintext.encode()), r.credential_id


def reencrypt_events(runtime: Runtime, job_id: int) -> dict[str, int]:
    """Successful ``reencrypt`` audit events of one job, counted per credential id."""
    with runtime.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT credential_id, COUNT(*) FROM audit_events WHERE action = 'reencrypt' "
            "AND outcome = 'success' AND reason = :reason GROUP BY credential_id"
        ), {"reason": f"job={job_id}"}).all()
    return {str(cid): int(n) for cid, n in rows}


def kek_materials(runtime: Runtime, versions: Iterable[int]) -> list[str]:
    """The KEK versions' bytes as base64 and hex: text that must never appear anywhere."""
    out = []
    for version in versions:
        raw = runtime.keys.source.get(version).material()
        out += [base64.b64encode(raw).decode(), raw.hex(), base64.urlsafe_b64encode(raw).decode()]
    return out


def assert_no_secrets(
    texts: Mapping[str, str], plaintexts: Iterable[str], keks: Iterable[str] = (),
    *, window: int = 12,
) -> None:
    """No text contains a KEK, or any ``window``-character piece of a plaintext's random part.

    Pieces that are structure rather than secret are not looked for: those with a quote or
    whitespace (JSON syntax around a value) and those that also occur in credentials generated
    from another seed (``"type": "service_account"``, ``-----BEGIN PRIVATE KEY-----``).
    """
    pieces: set[str] = set()
    for name, body in texts.items():
        if any(kek in body for kek in keks):
            pytest.fail(f"KEK material in {name}")  # (not an assert: it would print the key)
        if REDACTED in body:
            # The worker's and the CLI's filter is the second line of defence: it must never
            # have had to act, or something of ours logged a secret-shaped value.
            pytest.fail(f"the redaction filter rewrote a line in {name}")
        pieces.update(body[i:i + window] for i in range(len(body) - window + 1))
    public = _public_pieces(window)
    for plaintext in (part for p in plaintexts for part in secret_parts(p)):
        for i in range(max(1, len(plaintext) - window + 1)):
            piece = plaintext[i:i + window]
            if piece in pieces and piece not in public and not _STRUCTURE.search(piece):
                where = [name for name, body in texts.items() if piece in body]
                pytest.fail(f"{window} characters of a secret in {', '.join(where)}")


def secret_parts(plaintext: str) -> list[str]:
    """What of a plaintext is secret: all of a key; of a JSON credential (a service-account
    file) the values of its non-identifying fields, since its ``project_id`` or
    ``client_email`` is shown in masks by design (:data:`cuscred.masking.PUBLIC_JSON_FIELDS`)."""
    doc = parse_json_object(plaintext)
    if doc is None:
        return [plaintext]
    return [str(v) for k, v in doc.items() if k not in PUBLIC_JSON_FIELDS]


_STRUCTURE = re.compile(r"[\s\"']")


@functools.cache
def _public_pieces(window: int) -> frozenset[str]:
    other = [g.secret for g in generate(400, 20, seed=982_451_653)]
    return frozenset(p[i:i + window] for p in other for i in range(len(p) - window + 1))


__all__ = [
    "BASE_ENV", "CeleryProcess", "RedisServer", "Seeded", "Stack", "assert_no_secrets",
    "assert_rows_readable", "free_port", "kek_materials", "process_env", "reencrypt_events",
    "seed", "wait_for",
]
