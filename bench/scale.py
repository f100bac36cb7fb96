"""Scale check: a million generated credentials on PostgreSQL, rotated by two Celery workers.

What is measured (figures only; nothing is asserted):

* **census** (:meth:`KeyManager.census`, what ``keys status``, ``keys retire`` and the metrics
  scrape run): credentials per KEK version from the indexed header-version column, nothing
  decrypted. Timed on the seeded data (all rows on v1) and again after the rotation (all on
  v2), median of ``--repeat`` runs after one warm-up.
* **re-encryption**: the whole job (plan, every chunk, finalize) on Celery with ``--workers``
  prefork processes and Redis, from the call until the job row is ``completed``; rows/s.
* **memory**: the peak RSS (``VmHWM``) of each pool process for the million rows, next to the
  same job on ``--small-rows`` over the same tenants (a job's memory should follow the chunk
  size, not the row count).

The data are :func:`cuscred.datagen.generate` credentials (real provider key shapes, skewed
tenants), stored through the library (``import_credentials``), then a new KEK version is
created and promoted, as after steps 1-2 of a rotation. Seeding, runs and checks reuse
``bench/reencrypt.py`` (a fresh copy of the seeded template per run, fresh workers, every row
checked to be on the new version and a sample resolved to its generated value afterwards).

Usage::

    .venv/bin/python bench/scale.py [--rows 1000000] [--small-rows 100000] [--workers 2]
                                    [--repeat 7] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reencrypt as rx  # the sibling benchmark: seeding, workers, checks


def time_census(url: str, dataset: rx.Dataset, repeat: int) -> dict[str, Any]:
    runtime = rx.build_runtime(rx.settings_for(url, dataset.keyring))
    try:
        def census() -> dict[int, int]:
            with runtime.engine.connect() as conn:
                return runtime.keys.census(conn)

        counts = census()  # warm-up
        ms = []
        for _ in range(repeat):
            started = time.perf_counter()
            census()
            ms.append((time.perf_counter() - started) * 1000)
    finally:
        runtime.engine.dispose()
    return {"counts": {str(k): v for k, v in sorted(counts.items())},
            "median_ms": round(statistics.median(ms), 1), "min_ms": round(min(ms), 1),
            "max_ms": round(max(ms), 1)}


def rotate(dataset: rx.Dataset, args: argparse.Namespace, workdir: Path,
           census_repeat: int = 0) -> dict[str, Any]:
    """One job on a fresh copy; with ``census_repeat``, the census before and after too."""
    with rx.fresh_copy(dataset, workdir) as url:
        before = time_census(url, dataset, census_repeat) if census_repeat else None
        run = rx.run_celery_job(url, dataset, args, workdir)
        after = time_census(url, dataset, census_repeat) if census_repeat else None
    run["rows_per_s"] = round(run["rows"] / run["wall_s"], 1)
    return {"run": run, "census_before": before, "census_after": after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, help="memory baseline (default --rows / 10)")
    parser.add_argument("--tenants", type=int, help="tenants (default 3%% of --rows)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7, help="census runs (median reported)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    ours = parser.parse_args(argv)
    small = ours.small_rows or ours.rows // 10
    tenants = ours.tenants or max(1, ours.rows * 3 // 100)
    args = rx.parse_args([
        "--backend", "postgresql", "--rows", str(ours.rows), "--small-rows", str(small),
        "--tenants", str(tenants), "--workers", str(ours.workers),
        "--chunk-size", str(ours.chunk_size), *(["--quiet"] if ours.quiet else []),
    ])
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="cuscred-bench-scale-")))
        prefix = f"cuscred_bench_scale_{uuid.uuid4().hex[:8]}"
        datasets = {}
        for rows in (ours.rows, small):
            rx.log(args, f"[scale] seeding {rows:,} credentials over {tenants:,} tenants")
            datasets[rows] = rx.seed_dataset("postgresql", rows, tenants, workdir, prefix, args,
                                             stack)
        rx.log(args, f"[scale] rotating {ours.rows:,} credentials")
        big = rotate(datasets[ours.rows], args, workdir, census_repeat=ours.repeat)
        rx.log(args, f"[scale] rotating {small:,} credentials (memory baseline)")
        baseline = rotate(datasets[small], args, workdir)
    result = {"rows": ours.rows, "small_rows": small, "tenants": tenants,
              "workers": ours.workers, "seed_s": datasets[ours.rows].seed_s,
              "big": big, "small": baseline}
    print(json.dumps(result, indent=2) if ours.json else render(result))
    return 0


def render(result: dict[str, Any]) -> str:
    big, small = result["big"], result["small"]
    run, base = big["run"], small["run"]
    peak, peak_small = rx.peak_of(run), rx.peak_of(base)
    cb, ca = big["census_before"], big["census_after"]
    phases = run["breakdown"]
    return "\n".join([
        f"== scale: {result['rows']:,} credentials over {result['tenants']:,} tenants on "
        f"PostgreSQL (seeded in {result['seed_s']:.0f}s)",
        f"   census before: {cb['counts']} in {cb['median_ms']} ms median "
        f"(min {cb['min_ms']}, max {cb['max_ms']})",
        f"   re-encryption, Celery with {result['workers']} worker processes: "
        f"{run['rows']:,} rows in {run['wall_s']:.1f}s = {run['rows_per_s']:,.0f} rows/s "
        f"[plan {phases['created_to_planned_ms']} ms, {phases['chunks']} chunks "
        f"(mean {phases['chunk_ms_mean']} ms), finalize {phases['last_chunk_to_finished_ms']} ms]",
        f"   CPU: workers {run['client_cpu_s']} s, PostgreSQL {run['server_cpu_s']} s, "
        f"whole machine {run['machine_cpu_s']} s",
        f"   census after:  {ca['counts']} in {ca['median_ms']} ms median "
        f"(min {ca['min_ms']}, max {ca['max_ms']})",
        f"   peak worker RSS: {rx._mib(peak)} MiB for {result['rows']:,} rows, "
        f"{rx._mib(peak_small)} MiB for {result['small_rows']:,} "
        f"({base['rows_per_s']:,.0f} rows/s); ratio {peak / peak_small:.3f}",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
