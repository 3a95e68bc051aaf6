"""6. Feature costs: what each optional feature of the library adds to a request.

Like the in-process comparison (:mod:`benchmarks.overhead`, same method: httpx's ASGI
transport, ``time.process_time()`` per request, alternating rounds), on the ``SELECT 1``
route, for the library with its defaults (everything on) and with one feature switched
at a time:

* HTTP metrics (prometheus-fastapi-instrumentator, ``DB_HTTP_METRICS``) off;
* leak tracking with stack capture (``DB_LEAK_TRACK_STACK``) on;
* idle-connection validation (``DB_POOL_PRE_PING``) off.

Features the library does not have yet are reported as such, not measured. The cost of
a ``/metrics`` scrape (read at scrape time, nothing paid per checkout) is measured too.
"""

from __future__ import annotations

import math
import time
from contextlib import AsyncExitStack
from typing import Any

import httpx

from .apps import AppConfig, build_app
from .common import (
    BenchContext,
    Report,
    Spread,
    Table,
    dbpool_settings_fields,
    deltas,
    feature_status,
    fmt_int,
    ratios,
    run_async,
    running,
)
from .overhead import Batch, compare

#: Name -> (label, app variant, DBPoolSettings overrides, settings field that must exist).
VARIANTS: dict[str, tuple[str, str, dict[str, Any], str | None]] = {
    "defaults": ("fastapi_dbpool defaults (all on)", "dbpool_instr", {}, None),
    "no_http_metrics": (
        "HTTP metrics off (DB_HTTP_METRICS=false)",
        "dbpool",
        {},
        "http_metrics",
    ),
    "leak_stack": (
        "leak tracking + stack capture (DB_LEAK_TRACK_STACK=true)",
        "dbpool_instr",
        {"leak_track_stack": True},
        "leak_track_stack",
    ),
    "no_pre_ping": (
        "idle validation off (DB_POOL_PRE_PING=false)",
        "dbpool_instr",
        {"pool_pre_ping": False},
        "pool_pre_ping",
    ),
    "bare": ("plain pattern, bare (reference)", "bare", {}, None),
}


def run(ctx: BenchContext) -> Report:
    profile = ctx.profile
    config = AppConfig(
        url=ctx.database_url, pool_size=profile.pool_size, max_overflow=profile.max_overflow
    )
    status = feature_status()
    fields = dbpool_settings_fields()
    skipped: dict[str, str] = {}
    chosen: dict[str, tuple[str, str, dict[str, Any], str | None]] = {}
    for name, spec in VARIANTS.items():
        required = spec[3]
        if required is not None and required not in fields:
            skipped[name] = f"not implemented yet (no {required} setting)"
        elif name == "leak_stack" and not status["leak_tracking"].startswith("implemented"):
            skipped[name] = status["leak_tracking"]
        else:
            chosen[name] = spec
    scrape: dict[str, list[float]] = {"defaults": [], "no_http_metrics": []}

    async def main() -> dict[str, dict[str, list[Batch]]]:
        async with AsyncExitStack() as stack:
            apps = {
                name: await stack.enter_async_context(
                    running(build_app(variant, config, **overrides))
                )
                for name, (_, variant, overrides, _) in chosen.items()
            }
            results = await compare(ctx, apps, ["select1"], profile.inproc_requests)
            for name in scrape:
                if name in apps:
                    scrape[name] = await scrape_cost(apps[name], ctx.rounds)
            return results

    ctx.log(f"features: {', '.join(chosen)}")
    results = run_async(main)["select1"]
    report = Report("features", "6. Feature costs (in-process CPU per request, SELECT 1)")
    table = Table(
        f"SELECT 1: {profile.inproc_requests} requests x {ctx.rounds} rounds, "
        f"{profile.inproc_concurrency} concurrent callers",
        ["variant", "CPU us/req", "vs defaults", "speed vs defaults", "errors"],
    )
    reference = [b.cpu_us for b in results["defaults"]]
    for name, batches in results.items():
        cpu = [b.cpu_us for b in batches]
        table.add(
            chosen[name][0],
            fmt_int(Spread.of(cpu).median),
            deltas(cpu, reference).delta_text(" us") if name != "defaults" else "-",
            ratios(reference, cpu).ratio_text(),
            sum(b.errors for b in batches),
        )
    for name, why in skipped.items():
        table.add(VARIANTS[name][0], "-", why, "-", "-")
    table.notes.append(
        "'vs defaults' = this variant's CPU minus the defaults' per round: a negative number "
        "is what switching the feature off saves, a positive one what switching it on costs."
    )
    report.tables.append(table)
    scrape_table = Table(
        "GET /metrics (one database, after the runs above)",
        ["variant", "CPU us/scrape"],
    )
    for name, samples in scrape.items():
        if samples:
            scrape_table.add(VARIANTS[name][0], fmt_int(Spread.of(samples).median))
    report.tables.append(scrape_table)
    report.notes.append(
        "Pool metrics cost nothing per request: counters are plain integers updated by the "
        "pool at checkout and checkin and read when /metrics is scraped; there is no switch "
        "to turn them off."
    )
    report.notes.extend(f"{VARIANTS[n][0]}: {why}" for n, why in skipped.items())
    report.data = {
        "features": status,
        "skipped": skipped,
        "batches": {n: [b.__dict__ for b in bs] for n, bs in results.items()},
        "scrape_cpu_us": scrape,
    }
    return report


async def scrape_cost(app: Any, rounds: int, scrapes: int = 50) -> list[float]:
    """CPU microseconds per ``GET /metrics``, one figure per round."""
    out = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bench"
    ) as client:
        for _ in range(rounds):
            t0 = time.process_time()
            for _ in range(scrapes):
                response = await client.get("/metrics")
                if response.status_code != 200:
                    return [math.nan]
            out.append((time.process_time() - t0) / scrapes * 1e6)
    return out
