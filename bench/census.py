"""Benchmark: the key census at a million credentials, without decrypting anything.

The census ("how many credentials still sit under each KEK version and tenant key generation")
is what `cuscred keys status`, retirement and the metrics endpoint ask. It reads the header
versions copied into indexed columns, so it must stay fast as the table grows. This fills a
fresh database with N rows directly in SQL (random bytes stand in for ciphertexts: the census
never opens them; 90 % on KEK v1, 10 % on v2, over a skewed set of tenants), then times:

* ``census``: ``KeyManager.census`` (rows per KEK version), as `keys retire` runs it;
* ``metrics``: the state collector's scrape (census by KEK version and key generation, KEK
  states, unfinished jobs), as Prometheus runs it.

Prints min/median/max over ``--repeat`` runs, per backend. Not part of `make test`.

    .venv/bin/python bench/census.py                     # both backends, 1,000,000 rows
    .venv/bin/python bench/census.py --rows 100000 --backend sqlite
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
from prometheus_client import generate_latest

from cuscred.config import Settings
from cuscred.db.migrate import upgrade_to_head
from cuscred.factory import build_runtime
from cuscred.kek.local import LocalKeyring
from cuscred.metrics import state_registry

PG_ADMIN_DSN = os.environ.get(
    "CUSCRED_BENCH_PG_DSN",
    os.environ.get("CUSCRED_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
)
TENANTS = 3_000

_PG_FILL = """
INSERT INTO tenant_keys (tenant_id, generation, salt, kdf, iterations, state, created_at)
SELECT 'tenant-' || lpad(t::text, 5, '0'), 1, gen_random_bytes(32), 'hkdf-sha256', NULL,
       'active', now()
  FROM generate_series(0, %(tenants)s - 1) AS t;
INSERT INTO credentials (credential_id, tenant_id, provider, masked, context_json, ciphertext,
                         kek_version, key_generation, fingerprint, row_version, created_at)
SELECT 'cred_' || lpad(to_hex(n), 26, '0'),
       'tenant-' || lpad((floor(power(random(), 3) * %(tenants)s))::int::text, 5, '0'),
       'openai', 'sk-proj-…abcd', '{}', gen_random_bytes(120),
       CASE WHEN n %% 10 = 0 THEN 2 ELSE 1 END, 1, gen_random_bytes(32), 1, now()
  FROM generate_series(1, %(rows)s) AS n;
"""


def _fill_sqlite(path: Path, rows: int) -> None:
    import random
    import sqlite3

    rng = random.Random(7)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executemany(
        "INSERT INTO tenant_keys (tenant_id, generation, salt, kdf, iterations, state, "
        "created_at) VALUES (?, 1, ?, 'hkdf-sha256', NULL, 'active', '2026-01-01 00:00:00')",
        [(f"tenant-{t:05d}", os.urandom(32)) for t in range(TENANTS)])
    batch = []
    for n in range(1, rows + 1):
        tenant = f"tenant-{int(rng.random() ** 3 * TENANTS):05d}"
        batch.append((f"cred_{n:026x}", tenant, os.urandom(120), 2 if n % 10 == 0 else 1,
                      os.urandom(32)))
        if len(batch) == 50_000 or n == rows:
            conn.executemany(
                "INSERT INTO credentials (credential_id, tenant_id, provider, masked, "
                "context_json, ciphertext, kek_version, key_generation, fingerprint, "
                "row_version, created_at) VALUES (?, ?, 'openai', 'sk-proj-…abcd', '{}', ?, ?, "
                "1, ?, 1, '2026-01-01 00:00:00')", batch)
            batch.clear()
    conn.commit()
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _timed(call: Callable[[], object], repeat: int) -> list[float]:
    call()  # warm: the first run reads the index from disk into the page cache
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def run(backend: str, rows: int, repeat: int, workdir: Path) -> None:
    keyring = LocalKeyring.create(workdir / f"keyring-{backend}.json")
    name = f"cuscred_bench_census_{uuid.uuid4().hex[:8]}"
    if backend == "postgresql":
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        url = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    else:
        url = f"sqlite:///{workdir / 'census.db'}"
    try:
        runtime = build_runtime(Settings.from_env({"CUSCRED_DATABASE_URL": url,
                                                   "CUSCRED_KEYRING_PATH": str(keyring.path)}))
        upgrade_to_head(runtime.engine)
        runtime.credential_service().encrypt_credential("bench-seed", "sk-proj-" + "x" * 40)
        runtime.key_admin().create_version()
        started = time.perf_counter()
        if backend == "postgresql":
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
                for statement in _PG_FILL.split(";")[:2]:
                    conn.execute(statement, {"rows": rows, "tenants": TENANTS})  # type: ignore[arg-type]
                conn.execute("VACUUM (ANALYZE) credentials")
        else:
            _fill_sqlite(Path(url.removeprefix("sqlite:///")), rows)
        fill_s = time.perf_counter() - started

        def census() -> object:
            with runtime.engine.connect() as conn:
                return runtime.keys.census(conn)

        registry = state_registry(runtime.engine)
        counts = census()
        results = {"census": _timed(census, repeat),
                   "metrics": _timed(lambda: generate_latest(registry), repeat)}
        print(f"== {backend}: {sum(counts.values()):,} credentials "  # type: ignore[attr-defined]
              f"(filled in {fill_s:.1f}s), census {counts}")
        for what, ms in results.items():
            print(f"   {what:8} min {min(ms):8.1f} ms   median {statistics.median(ms):8.1f} ms"
                  f"   max {max(ms):8.1f} ms   ({repeat} runs)")
        runtime.engine.dispose()
    finally:
        if backend == "postgresql":
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tmpdir", help="where the SQLite file goes (a real disk)")
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    with tempfile.TemporaryDirectory(prefix="cuscred-bench-census-", dir=args.tmpdir) as tmp:
        for backend in backends:
            run(backend, args.rows, args.repeat, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
