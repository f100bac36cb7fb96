"""Benchmark: a warm ``resolve_credential(tenant_id, "encrypted://...")`` against its SQL floor.

What is measured
----------------
*resolve*: one call of :meth:`CredentialService.resolve_credential` for an ``encrypted://``
reference, end to end as a caller sees it: input checks, one transaction that reads the
credential row, checks the KEK version state, decrypts with the cached tenant key (AES-256-GCM),
appends the hash-chained audit event (PostgreSQL: advisory lock; tail read; HMAC; insert) and
commits. "Warm" means every tenant key is already derived and cached, as in a long-running
process; each operation picks a random credential of a random tenant.

*floor*: the least work any implementation of the same contract must do against the same
database, written with the raw DB-API driver (``sqlite3`` with the library's pragmas and
``BEGIN IMMEDIATE``; ``psycopg`` 3 for PostgreSQL): one indexed ``SELECT`` of the credential row
by ``credential_id``, one ``INSERT`` into a table with exactly the shape (columns, keys,
indexes, and a copy of the rows) of ``audit_events``, and ``COMMIT``. No crypto, no ORM.

Why: the resolve path runs right before every LLM call. The target is that it stays within
1.5x of the floor, i.e. that the library's own overhead (SQLAlchemy, extra statements, key
checks, the audit chain) is small next to the unavoidable cost of a durable audit write.

How noise is handled: both measurements use the same database file or server, and they run in
alternating blocks (``--block`` operations each) in ABBA order, so drift (page cache, WAL
growth, checkpoints, other load on the machine) hits both alike. Each operation is timed with
``time.perf_counter_ns``. This is a benchmark, not a test: it prints figures and never fails on
time. Besides wall-time percentiles it reports the process CPU time per op: the floor's cost is
mostly waiting (fsync, network), so CPU time shows the library's own overhead directly.

``--profile`` then shows where the resolve path spends its time: what each method sends to the
driver per op (SQLite: statements, from the ``sqlite3`` trace callback; PostgreSQL: round trips,
from libpq's protocol trace, pool pre-pings included) and cProfile's top 25 by cumulative time.

Usage::

    .venv/bin/python bench/resolve.py [--backend sqlite|postgresql|both] [--iterations 2000]
                                      [--json] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import math
import os
import pstats
import random
import sqlite3
import string
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg
from sqlalchemy import Engine, event

from cuscred.config import Settings
from cuscred.db.migrate import upgrade_to_head
from cuscred.db.session import SQLITE_BUSY_TIMEOUT_MS
from cuscred.factory import Runtime, build_runtime
from cuscred.kek.local import LocalKeyring
from cuscred.services.credentials import CredentialService

TARGET_RATIO = 1.5
ACTOR = "bench-health-checker"
FLOOR_TABLE = "bench_floor_audit"
PG_ADMIN_DSN = os.environ.get(
    "CUSCRED_BENCH_PG_DSN",
    os.environ.get("CUSCRED_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
)
_ROW_COLUMNS = (
    "pk, tenant_id, ciphertext, kek_version, key_generation, fingerprint, row_version, context_json"
)
_AUDIT_COLUMNS = (
    "seq, ts, actor, tenant_id, credential_id, ref_fingerprint, action, outcome, reason, "
    "key_version, prev_mac, mac"
)
_FAKE_MAC = "f" * 64  # same width as a real HMAC-SHA256 hex digest; the floor does no crypto
_URLSAFE = string.ascii_letters + string.digits + "-_"
_ALNUM = string.ascii_letters + string.digits


# --- test data ------------------------------------------------------------------------------


def fake_provider_key(rng: random.Random) -> str:
    """A random secret with the shape of a real provider key (mostly OpenAI project keys)."""
    kind = rng.choices(["openai", "anthropic", "google", "azure", "legacy"], [5, 3, 1, 1, 1])[0]
    if kind == "openai":
        return "sk-proj-" + "".join(rng.choices(_URLSAFE, k=156))
    if kind == "anthropic":
        return "sk-ant-api03-" + "".join(rng.choices(_URLSAFE, k=93)) + "AA"
    if kind == "google":
        return "AIza" + "".join(rng.choices(_URLSAFE, k=35))
    if kind == "azure":
        return "".join(rng.choices("0123456789abcdef", k=32))
    return "sk-" + "".join(rng.choices(_ALNUM, k=48))


@dataclass(frozen=True, slots=True)
class StoredCredential:
    tenant_id: str
    reference: str
    credential_id: str
    plaintext: str


def store_credentials(
    service: CredentialService, count: int, tenants: int, rng: random.Random
) -> list[StoredCredential]:
    """``count`` credentials spread round-robin over ``tenants`` tenants."""
    tenant_ids = [f"tenant-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}" for _ in range(tenants)]
    stored = []
    for i in range(count):
        tenant, secret = tenant_ids[i % tenants], fake_provider_key(rng)
        ref = service.encrypt_credential(tenant, secret, actor=ACTOR)
        stored.append(StoredCredential(tenant, ref, ref.removeprefix("encrypted://"), secret))
    return stored


def warm_up(service: CredentialService, creds: list[StoredCredential], rounds: int) -> None:
    """Resolve every credential ``rounds`` times (derives and caches every tenant key) and
    check the values, so a broken setup cannot produce pretty numbers."""
    for _ in range(rounds):
        for cred in creds:
            if service.resolve_credential(cred.tenant_id, cred.reference) != cred.plaintext:
                raise RuntimeError(f"resolve returned the wrong value for {cred.reference}")


# --- the floor: raw DB-API -------------------------------------------------------------------


class Floor(Protocol):
    """One indexed read of the credential row plus one audit insert, committed."""

    conn: Any  # the DB-API connection, for --profile's driver trace

    def op(self, cred: StoredCredential) -> None: ...

    def close(self) -> None: ...


def _audit_params(floor_seq: int, cred: StoredCredential, ts: object) -> tuple[object, ...]:
    return (
        floor_seq,
        ts,
        ACTOR,
        cred.tenant_id,
        cred.credential_id,
        None,
        "resolve",
        "success",
        None,
        1,
        _FAKE_MAC,
        _FAKE_MAC,
    )


class SqliteFloor:
    """``sqlite3`` with the library's pragmas (WAL, synchronous=FULL) and ``BEGIN IMMEDIATE``."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            "foreign_keys=ON",
            f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
        ):
            self.conn.execute(f"PRAGMA {pragma}")
        self._copy_audit_table()
        self.seq = self.conn.execute(f"SELECT max(seq) FROM {FLOOR_TABLE}").fetchone()[0] or 0
        self._select = f"SELECT {_ROW_COLUMNS} FROM credentials WHERE credential_id = ?"
        self._insert = (
            f"INSERT INTO {FLOOR_TABLE} ({_AUDIT_COLUMNS}) VALUES ({', '.join('?' * 12)})"
        )

    def _copy_audit_table(self) -> None:
        """The DDL of ``audit_events`` and its indexes, renamed; then a copy of its rows."""
        ddl = self.conn.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'audit_events' AND sql IS NOT NULL "
            "ORDER BY type DESC"  # 'table' before 'index'
        ).fetchall()
        self.conn.execute("BEGIN IMMEDIATE")
        for (sql,) in ddl:
            self.conn.execute(sql.replace("audit_events", FLOOR_TABLE))
        self.conn.execute(f"INSERT INTO {FLOOR_TABLE} SELECT * FROM audit_events")
        self.conn.execute("COMMIT")

    def op(self, cred: StoredCredential) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(self._select, (cred.credential_id,)).fetchone()
        if row is None or row[1] != cred.tenant_id:
            raise RuntimeError("floor: credential not found")
        self.seq += 1
        ts = datetime.now(UTC).replace(tzinfo=None).isoformat(" ")  # SQLAlchemy's SQLite form
        conn.execute(self._insert, _audit_params(self.seq, cred, ts))
        conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class PostgresFloor:
    """``psycopg`` 3, default settings (implicit BEGIN, server-side prepare after 5 uses)."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)
        with self.conn.transaction():
            self.conn.execute(f"CREATE TABLE {FLOOR_TABLE} (LIKE audit_events INCLUDING ALL)")
            self.conn.execute(f"INSERT INTO {FLOOR_TABLE} SELECT * FROM audit_events")
        row = self.conn.execute(f"SELECT max(seq) FROM {FLOOR_TABLE}").fetchone()
        self.conn.commit()
        self.seq = int(row[0] or 0) if row else 0
        self._select = f"SELECT {_ROW_COLUMNS} FROM credentials WHERE credential_id = %s"
        self._insert = (
            f"INSERT INTO {FLOOR_TABLE} ({_AUDIT_COLUMNS}) VALUES ({', '.join(['%s'] * 12)})"
        )

    def op(self, cred: StoredCredential) -> None:
        with self.conn.cursor() as cur:
            row = cur.execute(self._select, (cred.credential_id,)).fetchone()
            if row is None or row[1] != cred.tenant_id:
                raise RuntimeError("floor: credential not found")
            self.seq += 1
            cur.execute(self._insert, _audit_params(self.seq, cred, datetime.now(UTC)))
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


# --- databases ------------------------------------------------------------------------------


@dataclass
class Database:
    backend: str
    url: str
    detail: str
    open_floor: Callable[[], Floor]


@contextlib.contextmanager
def sqlite_database(workdir: Path) -> Iterator[Database]:
    path = workdir / "cuscred.db"
    detail = f"file {path} (WAL, synchronous=FULL, BEGIN IMMEDIATE)"
    yield Database("sqlite", f"sqlite:///{path}", detail, lambda: SqliteFloor(path))


@contextlib.contextmanager
def postgresql_database(admin_dsn: str) -> Iterator[Database]:
    """A throw-away database on the local cluster, dropped on the way out (even on error)."""
    name = f"cuscred_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = f"{admin_dsn.rsplit('/', 1)[0]}/{name}"
    try:
        yield Database(
            "postgresql",
            dsn,
            f"database {name} on {dsn.rsplit('@', 1)[-1]}",
            lambda: PostgresFloor(dsn),
        )
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def open_runtime(url: str, workdir: Path) -> Iterator[Runtime]:
    """Migrated schema, a fresh local keyring and the runtime built as a process would."""
    keyring = LocalKeyring.create(workdir / "keyring.json")
    settings = Settings.from_env(
        {"CUSCRED_DATABASE_URL": url, "CUSCRED_KEYRING_PATH": str(keyring.path)}
    )
    runtime = build_runtime(settings)
    try:
        upgrade_to_head(runtime.engine)
        yield runtime
    finally:
        runtime.engine.dispose()


# --- measurement ----------------------------------------------------------------------------


@dataclass
class Samples:
    """Wall time of each op (ns) and the process CPU time spent in all of them (s)."""

    wall_ns: list[int] = field(default_factory=list)
    cpu_s: float = 0.0


@dataclass(frozen=True)
class Stats:
    n: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    ops_per_s: float
    cpu_us_per_op: float

    @classmethod
    def of(cls, samples: Samples) -> Stats:
        ordered = sorted(samples.wall_ns)
        n = len(ordered)

        def pct(p: float) -> float:  # nearest-rank percentile
            return ordered[max(0, math.ceil(p / 100 * n) - 1)] / 1000

        mean = sum(ordered) / n / 1000
        figures = (pct(50), pct(90), pct(99), mean, 1e6 / mean, samples.cpu_s / n * 1e6)
        return cls(n, *(round(x, 1) for x in figures))


Op = Callable[[StoredCredential], object]


def timed_block(op: Op, picks: list[StoredCredential], out: Samples) -> None:
    clock = time.perf_counter_ns
    cpu_start = time.process_time()
    for cred in picks:
        start = clock()
        op(cred)
        out.wall_ns.append(clock() - start)
    out.cpu_s += time.process_time() - cpu_start


def measure_interleaved(
    resolve: Op, floor: Op, picks: list[StoredCredential], block: int
) -> tuple[Samples, Samples]:
    """Alternate blocks of ``block`` ops in ABBA order (resolve, floor, floor, resolve, ...).
    Both methods get the same credentials in the same order."""
    resolve_samples, floor_samples = Samples(), Samples()
    gc.collect()
    for index, start in enumerate(range(0, len(picks), block)):
        chunk = picks[start : start + block]
        order = [(resolve, resolve_samples), (floor, floor_samples)]
        for op, out in order if index % 2 == 0 else reversed(order):
            timed_block(op, chunk, out)
    return resolve_samples, floor_samples


# --- where the time goes (--profile) --------------------------------------------------------


class DriverTrace:
    """What reaches the driver, counted below SQLAlchemy: every SQL statement (SQLite's trace
    callback, so BEGIN and COMMIT count too) or every client->server round trip (libpq trace:
    each simple ``Query`` and each extended-protocol ``Sync``; pool pre-pings included)."""

    def __init__(self, backend: str, path: Path) -> None:
        self.path = path
        self.sqlite_lines: list[str] = []
        self._conns: list[Any] = []
        self._file = path.open("w") if backend == "postgresql" else None

    def add(self, dbapi_conn: Any) -> None:
        if any(conn is dbapi_conn for conn in self._conns):
            return
        self._conns.append(dbapi_conn)
        if self._file is None:
            dbapi_conn.set_trace_callback(self.sqlite_lines.append)
        else:
            dbapi_conn.pgconn.trace(self._file.fileno())

    def finish(self) -> Counter[str]:
        for conn in self._conns:
            if self._file is None:
                conn.set_trace_callback(None)
            else:
                conn.pgconn.untrace()
        if self._file is None:
            return Counter(line.split(None, 1)[0].upper() for line in self.sqlite_lines)
        self._file.close()
        labels = (_round_trip(line) for line in self.path.read_text().splitlines())
        return Counter(label for label in labels if label)


def _round_trip(trace_line: str) -> str:
    """The label of a libpq trace line that ends a round trip, or ''."""
    fields = trace_line.split("\t")
    if len(fields) < 4 or fields[1] != "F":
        return ""
    if fields[3] == "Query":
        text = fields[4].strip() if len(fields) > 4 else ""
        return 'Query ";" (pool pre-ping)' if text == '";"' else f"Query {text}"
    return "statement (Bind/Execute/Sync)" if fields[3] == "Sync" else ""


def trace_ops(
    backend: str,
    workdir: Path,
    engine: Engine,
    op: Op,
    dbapi_conn: Any | None,
    picks: list[StoredCredential],
) -> dict[str, float]:
    """Per-op counts of what ``op`` sends to the driver (library ops: through ``engine``'s
    pool; floor ops: on ``dbapi_conn``)."""
    trace = DriverTrace(backend, workdir / f"libpq-trace-{uuid.uuid4().hex[:6]}.txt")

    def on_checkout(conn: Any, _record: Any, _proxy: Any) -> None:
        trace.add(conn)

    event.listen(engine, "checkout", on_checkout)
    if dbapi_conn is not None:
        trace.add(dbapi_conn)
    try:
        for cred in picks:
            op(cred)
    finally:
        event.remove(engine, "checkout", on_checkout)
        counts = trace.finish()
    return {label: n / len(picks) for label, n in sorted(counts.items())}


def profile_resolves(op: Op, picks: list[StoredCredential], top: int = 25) -> str:
    """cProfile over ``picks`` resolves; the top ``top`` functions by cumulative time."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [op(cred) for cred in picks])
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(top)
    site = str(Path(psycopg.__file__).resolve().parents[1]) + "/"
    repo = str(Path(__file__).resolve().parents[1]) + "/"
    return buf.getvalue().replace(site, "").replace(repo, "")


def where_time_goes(
    backend: str,
    workdir: Path,
    runtime: Runtime,
    resolve: Op,
    floor: Floor,
    picks: list[StoredCredential],
) -> dict[str, Any]:
    sample = picks[:50]
    return {
        "driver_calls_per_op": {
            "resolve": trace_ops(backend, workdir, runtime.engine, resolve, None, sample),
            "floor": trace_ops(backend, workdir, runtime.engine, floor.op, floor.conn, sample),
        },
        "cprofile_top25_cumulative": profile_resolves(resolve, picks),
    }


# --- one backend ----------------------------------------------------------------------------


def _open_database(backend: str, workdir: Path) -> contextlib.AbstractContextManager[Database]:
    return sqlite_database(workdir) if backend == "sqlite" else postgresql_database(PG_ADMIN_DSN)


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with contextlib.ExitStack() as stack:
        workdir = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="cuscred-bench-", dir=args.tmpdir)
            )
        )
        db = stack.enter_context(_open_database(backend, workdir))
        runtime = stack.enter_context(open_runtime(db.url, workdir))
        service = runtime.credential_service(actor=ACTOR)
        log(args, f"[{backend}] storing {args.credentials} credentials / {args.tenants} tenants")
        creds = store_credentials(service, args.credentials, args.tenants, rng)
        log(args, f"[{backend}] warming up ({args.warmup} resolves per credential)")
        warm_up(service, creds, args.warmup)
        floor = db.open_floor()
        stack.callback(floor.close)

        def resolve(cred: StoredCredential) -> object:
            return service.resolve_credential(cred.tenant_id, cred.reference)

        timed_block(floor.op, rng.choices(creds, k=200), Samples())  # warm the floor too
        picks = rng.choices(creds, k=args.iterations)
        log(args, f"[{backend}] measuring {args.iterations} ops per method")
        resolve_samples, floor_samples = measure_interleaved(resolve, floor.op, picks, args.block)
        result = summarise(db, args, Stats.of(resolve_samples), Stats.of(floor_samples))
        if args.profile:
            log(args, f"[{backend}] tracing driver calls and profiling {len(picks)} resolves")
            result.update(where_time_goes(backend, workdir, runtime, resolve, floor, picks))
        return result


def summarise(
    db: Database, args: argparse.Namespace, resolve: Stats, floor: Stats
) -> dict[str, Any]:
    ratio_p50, ratio_p99 = resolve.p50_us / floor.p50_us, resolve.p99_us / floor.p99_us
    return {
        "backend": db.backend,
        "database": db.detail,
        "credentials": args.credentials,
        "tenants": args.tenants,
        "method": f"interleaved blocks of {args.block} ops, ABBA order, same picks for both",
        "resolve": asdict(resolve),
        "floor": asdict(floor),
        "ratio_p50": round(ratio_p50, 3),
        "ratio_p99": round(ratio_p99, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio_p50 <= TARGET_RATIO and ratio_p99 <= TARGET_RATIO,
    }


# --- output ---------------------------------------------------------------------------------


def log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def render(result: dict[str, Any]) -> str:
    rows = [("resolve_credential", result["resolve"]), ("floor (raw SQL)", result["floor"])]
    head = ("p50 µs", "p90 µs", "p99 µs", "mean µs", "ops/s", "CPU µs/op")
    lines = [
        f"== {result['backend']}: {result['database']}",
        f"   {result['credentials']} credentials / {result['tenants']} tenants; "
        f"{result['resolve']['n']} ops each; {result['method']}",
        f"   {'':<20}" + "".join(f"{h:>11}" for h in head),
    ]
    for name, s in rows:
        values = (s["p50_us"], s["p90_us"], s["p99_us"], s["mean_us"], s["ops_per_s"])
        lines.append(
            f"   {name:<20}"
            + "".join(f"{v:>11.1f}" for v in values[:4])
            + f"{values[4]:>11.0f}{s['cpu_us_per_op']:>11.1f}"
        )
    verdict = "met" if result["meets_target"] else "NOT met"
    lines.append(
        f"   ratio resolve/floor: p50 {result['ratio_p50']:.2f}x, p99 {result['ratio_p99']:.2f}x"
        f"  (target: within {TARGET_RATIO}x of the floor -> {verdict})"
    )
    return "\n".join(lines)


def render_profile(result: dict[str, Any]) -> str:
    unit = "SQL statements" if result["backend"] == "sqlite" else "round trips to the server"
    lines = [f"\n-- {result['backend']}: {unit} per op, counted at the driver (50 ops each)"]
    for name, counts in result["driver_calls_per_op"].items():
        total = sum(counts.values())
        detail = ", ".join(f"{label}: {n:g}" for label, n in counts.items())
        lines.append(f"   {name:<8} {total:5.2f}  ({detail})")
    lines.append(
        f"\n-- {result['backend']}: cProfile of {result['resolve']['n']} resolves, "
        f"top 25 by cumulative time\n{result['cprofile_top25_cumulative']}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--iterations", type=int, default=2000, help="ops per method")
    parser.add_argument("--credentials", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3, help="resolves per credential first")
    parser.add_argument("--block", type=int, default=50, help="ops per interleaved block")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--tmpdir", help="where the SQLite file and keyring go (a real disk)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the resolve loop afterwards; top 25 by cumulative time",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.block < 1 or args.tenants < 1 or args.credentials < 1:
        parser.error("--iterations, --block, --tenants and --credentials must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = [run_backend(backend, args) for backend in backends]
    if args.json:
        print(json.dumps({"results": results}, indent=2))
        return 0
    for result in results:
        print(render(result))
        if "cprofile_top25_cumulative" in result:
            print(render_profile(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
