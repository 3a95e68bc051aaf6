"""5. Memory per pooled connection: the app's RSS growth over N pooled connections.

Each variant runs in a fresh process (``python -m benchmarks.memory --worker``): it builds
its pool, uses one connection (so imports, the dialect's first-connect queries and caches
are paid before the baseline), then checks out N more at once, runs ``SELECT 1`` on each
and gives them back, so the pool keeps N + 1 open connections. RSS growth / N is the
app's cost of one pooled connection. The PostgreSQL backends' proportional set size
(PSS) is read too when the server runs on this machine: each connection also costs the
server that much.

The library's pool is built with ``warm_pool=False`` here, so that it opens its
connections when the measurement does, like the others.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg

from .apps import AppConfig, dbpool_settings
from .common import (
    REPO_ROOT,
    BenchContext,
    Report,
    Spread,
    Table,
    Target,
    asyncpg_dsn,
    fmt_float,
    rotated,
    run_async,
)

VARIANTS = ("asyncpg", "sqlalchemy", "dbpool")
LABELS = {
    "asyncpg": "raw asyncpg pool",
    "sqlalchemy": "SQLAlchemy engine (plain pattern)",
    "dbpool": "fastapi_dbpool engine",
}
APPLICATION_NAME = "dbpool-bench-memory"
TARGET_KIB = 500


@dataclass
class MemoryResult:
    variant: str
    connections: int
    rss_before_kib: float
    rss_after_kib: float
    backend_pss_kib: float

    @property
    def per_connection_kib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.connections


def _rss_kib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    return math.nan


async def _backend_pss_kib(url: str) -> float:
    """Median PSS of this process's backends, or NaN when they cannot be read."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return math.nan
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", APPLICATION_NAME
        )
    finally:
        await conn.close()
    sizes = []
    for row in pids:
        try:
            sizes.append(psutil.Process(row["pid"]).memory_full_info().pss / 1024)
        except (psutil.Error, OSError, AttributeError):
            return math.nan
    return statistics.median(sizes) if sizes else math.nan


async def measure(variant: str, url: str, n: int) -> MemoryResult:
    config = AppConfig(url=url, pool_size=n + 1, max_overflow=0)
    server_settings = {"application_name": APPLICATION_NAME}
    if variant == "asyncpg":
        pool = await asyncpg.create_pool(
            asyncpg_dsn(url), min_size=0, max_size=n + 1, server_settings=server_settings
        )

        async def use_asyncpg(count: int) -> None:
            conns = [await pool.acquire() for _ in range(count)]
            for c in conns:
                await c.fetchval("SELECT 1")
            for c in conns:
                await pool.release(c)

        use: Any = use_asyncpg
        close: Any = pool.close
    else:
        from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

        runtime: Any = None
        if variant == "sqlalchemy":
            engine: AsyncEngine = create_async_engine(
                url,
                pool_size=n + 1,
                max_overflow=0,
                connect_args={"server_settings": server_settings},
            )
        else:
            from fastapi_dbpool.runtime import DBPoolRuntime

            settings = dbpool_settings(config, warm_pool=False, application_name=APPLICATION_NAME)
            runtime = await DBPoolRuntime.start(settings)
            engine = runtime.engine()

        async def use_engine(count: int) -> None:
            conns = [await engine.connect() for _ in range(count)]
            for c in conns:
                await c.exec_driver_sql("SELECT 1")
            for c in conns:
                await c.close()

        async def close_engine() -> None:
            if runtime is not None:
                await runtime.close()
            else:
                await engine.dispose()

        use = use_engine
        close = close_engine
    try:
        await use(1)
        gc.collect()
        before = _rss_kib()
        await use(n + 1)
        gc.collect()
        after = _rss_kib()
        pss = await _backend_pss_kib(url)
    finally:
        await close()
    return MemoryResult(variant, n, before, after, pss)


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory --worker")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, required=True)
    args = parser.parse_args(argv)
    result = run_async(lambda: measure(args.variant, args.url, args.connections))
    print("MEMJSON " + json.dumps(asdict(result)), flush=True)


def run_one(ctx: BenchContext, variant: str) -> MemoryResult:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.memory",
            "--worker",
            "--variant",
            variant,
            "--url",
            ctx.database_url,
            "--connections",
            str(ctx.profile.memory_connections),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("MEMJSON "):
            return MemoryResult(**json.loads(line[len("MEMJSON ") :]))
    raise RuntimeError(f"memory worker ({variant}) failed:\n{proc.stderr[-3000:]}")


def run(ctx: BenchContext) -> Report:
    n = ctx.profile.memory_connections
    results: dict[str, list[MemoryResult]] = {v: [] for v in VARIANTS}
    ctx.log(f"memory: {n} pooled connections per variant")
    for r in range(ctx.rounds):
        for variant in rotated(list(VARIANTS), r):
            results[variant].append(run_one(ctx, variant))
        ctx.log(f"memory: round {r + 1}/{ctx.rounds} done")
    report = Report("memory", "5. Memory per pooled connection")
    table = Table(
        f"RSS growth over {n} pooled connections (each used once), fresh process per "
        f"variant, {ctx.rounds} rounds",
        ["pool", "app KiB/connection", "lowest-highest", "PostgreSQL backend PSS KiB"],
    )
    for variant, runs in results.items():
        per = Spread.of([m.per_connection_kib for m in runs])
        table.add(
            LABELS[variant],
            fmt_float(per.median, 1),
            f"{fmt_float(per.low, 1)}-{fmt_float(per.high, 1)}",
            fmt_float(Spread.of([m.backend_pss_kib for m in runs]).median, 0),
        )
    report.tables.append(table)
    ours = Spread.of([m.per_connection_kib for m in results["dbpool"]])
    report.targets.append(
        Target(
            "memory per pooled connection (app side)",
            f"< {TARGET_KIB} KB",
            f"{ours.median:.1f} KiB ({ours.low:.1f}-{ours.high:.1f})",
            ours.median < TARGET_KIB,
        )
    )
    report.notes.append(
        "The server's backend (PSS) is the larger cost of a connection and the same for "
        "every pool: size pools by what the database can afford, not by the app's memory."
    )
    report.data = {
        v: [{**asdict(m), "per_connection_kib": m.per_connection_kib} for m in ms]
        for v, ms in results.items()
    }
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        raise SystemExit("run through `python -m benchmarks --only memory`")
