"""2c. The server's instructions per request over real HTTP (callgrind, deterministic).

Requests/s over HTTP (1) cannot tell apart variants a few percent apart on a shared VM;
this counts what the server executes instead. Each variant's app is served by uvicorn
(uvloop, httptools, one worker) running under ``valgrind --tool=callgrind
--dump-before=getppid``; ``/bench/mark`` (``BENCH_MARK=1``) calls ``os.getppid()``, so the
client, an httpx process outside valgrind, marks the start and the end of the measured
requests: warm-up, mark, ``requests`` requests from ``CONCURRENCY`` keep-alive
connections, mark. The count is the uvicorn process's alone (HTTP parsing, the app, the
driver), not PostgreSQL's or the client's. The library's time-based settings are
stretched by ``SLOWDOWN`` as in 2b (``BENCH_SLOWDOWN``).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import httpx

from .apps import AppConfig
from .common import (
    BenchContext,
    Report,
    Table,
    Target,
    fmt_int,
)
from .http_throughput import UvicornServer
from .instructions import SLOWDOWN, _part_totals, valgrind_missing
from .overhead import ROUTE_TITLES, ROUTES

#: The variants counted: the baselines and the library with and without HTTP metrics.
VARIANTS = ("bare", "production", "dbpool", "dbpool_instr")
LABELS = {
    "bare": "plain, bare (pre_ping off)",
    "production": "plain, production (pre_ping on)",
    "dbpool": "fastapi_dbpool, all features",
    "dbpool_instr": "fastapi_dbpool + HTTP metrics",
}
#: Keep-alive connections of the client (as wrk's 32 in 1).
CONCURRENCY = 32
#: How long the server may take to start under valgrind, and a request to answer.
START_TIMEOUT = 240.0
REQUEST_TIMEOUT = 600.0


async def _drive(port: int, route: str, items: int, warmup: int, requests: int) -> int:
    """Warm up, mark, send ``requests`` requests from CONCURRENCY connections, mark.

    Returns how many answers were not 200.
    """
    make = ROUTES[route]
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    base = f"http://127.0.0.1:{port}"
    errors = 0
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=REQUEST_TIMEOUT) as client:

        async def batch(count: int, offset: int) -> None:
            numbers = iter(range(count))

            async def caller() -> None:
                nonlocal errors
                for i in numbers:
                    answer = await client.get(make(i + offset, items))
                    if answer.status_code != 200:
                        errors += 1

            await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))

        await batch(warmup, 0)
        errors = 0
        (await client.get("/bench/mark")).raise_for_status()
        await batch(requests, warmup)
        (await client.get("/bench/mark")).raise_for_status()
    return errors


def count(ctx: BenchContext, variant: str, route: str, requests: int) -> tuple[float, int]:
    """Instructions per request of ``variant``'s server on ``route``, and its non-200s."""
    config = AppConfig(
        url=ctx.database_url,
        pool_size=ctx.profile.pool_size,
        max_overflow=ctx.profile.max_overflow,
    )
    with tempfile.TemporaryDirectory(prefix="dbpool-bench-hcg-") as tmp:
        out = Path(tmp) / "callgrind.out"
        server = UvicornServer(
            variant,
            config,
            Path(tmp),
            extra_env={"PYTHONHASHSEED": "0", "BENCH_MARK": "1", "BENCH_SLOWDOWN": str(SLOWDOWN)},
            command_prefix=[
                "valgrind",
                "--tool=callgrind",
                "--dump-before=getppid",
                f"--callgrind-out-file={out}",
            ],
        )
        server.start()
        try:
            server.wait_ready(START_TIMEOUT)
            warmup = min(200, max(20, requests // 2))
            errors = asyncio.run(_drive(server.port, route, ctx.profile.items, warmup, requests))
        finally:
            server.stop(timeout=120)
        totals = _part_totals(Path(tmp), out.name)
        if 2 not in totals:
            raise RuntimeError(
                f"callgrind wrote no measured part; parts {sorted(totals)}\n{server.log_tail()}"
            )
        # Part 2 runs from the first mark to the second: the requests and one mark request.
        return totals[2] / requests, errors


def run(ctx: BenchContext) -> Report:
    report = Report(
        "http_instructions", "2c. The server's instructions per request over HTTP (callgrind)"
    )
    requests = ctx.profile.instructions_requests
    if valgrind_missing(report, "server instructions per request over HTTP"):
        return report
    variants = [v for v in VARIANTS if v in (ctx.profile.instructions_variants or VARIANTS)]
    ctx.log(
        f"http_instructions: {len(variants)} variants, {requests} "
        f"requests each from {CONCURRENCY} connections, uvicorn under callgrind"
    )
    data: list[dict[str, object]] = []
    # A smoke run (tiny sizes) counts one route: each count starts a server under valgrind.
    routes = list(ROUTES) if requests >= 100 else list(ROUTES)[:1]
    for route in routes:
        per: dict[str, float] = {}
        errors: dict[str, int] = {}
        for variant in variants:
            per[variant], errors[variant] = count(ctx, variant, route, requests)
            data.append(
                {
                    "route": route,
                    "variant": variant,
                    "per_request": per[variant],
                    "errors": errors[variant],
                }
            )
        bare, production = per["bare"], per["production"]
        table = Table(
            f"{ROUTE_TITLES[route]}: the server's instructions per request over HTTP, "
            f"{requests} requests, {CONCURRENCY} connections",
            [
                "variant",
                "instr/req",
                "speed vs bare",
                "speed vs production",
                "added vs bare",
                "non-200",
            ],
        )
        for variant in variants:
            table.add(
                LABELS[variant],
                fmt_int(per[variant]),
                f"{bare / per[variant]:.3f}x",
                f"{production / per[variant]:.3f}x",
                f"{per[variant] - bare:+,.0f}",
                errors[variant],
            )
        report.tables.append(table)
        for variant in ("dbpool", "dbpool_instr"):
            if variant not in per:
                continue
            report.targets.append(
                Target(
                    f"server instructions per request over HTTP, {ROUTE_TITLES[route]}, "
                    f"{LABELS[variant]}",
                    ">= 1.00x bare and > 1.00x production",
                    f"{bare / per[variant]:.3f}x bare, {production / per[variant]:.3f}x production",
                    bare / per[variant] >= 1.0
                    and production / per[variant] > 1.0
                    and errors[variant] == 0,
                )
            )
    report.data = {"requests": requests, "concurrency": CONCURRENCY, "counts": data}
    report.notes.append(
        "uvicorn (uvloop, httptools, 1 worker) under callgrind, one process per variant and "
        "route; an httpx client in another process; the count is the server's only "
        "(PostgreSQL's and the client's are not in it); the library's time-based settings "
        "stretched as in 2b; PYTHONHASHSEED=0."
    )
    return report
