"""2. In-process overhead: CPU per request through httpx's ASGI transport, no sockets.

Every variant's app runs in this one process (lifespans started once); each round sends
the same number of requests to each variant, in rotated order, with a few concurrent
callers. ``time.process_time()`` over the batch divided by the requests is the CPU one
request costs this process: httpx's client side (the same for every variant), the
framework, the dependency, the pool and the driver. PostgreSQL runs elsewhere and is not
counted. The difference to a baseline is what the library adds (or saves).
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from .apps import LABELS, READ_ONLY_VARIANTS, VARIANTS, AppConfig, build_app
from .common import (
    READ_ONLY_GOAL,
    BenchContext,
    Paired,
    Report,
    Spread,
    Table,
    Target,
    deltas,
    fmt_int,
    head_to_head_target,
    paired_ratios,
    ratios,
    rotated,
    run_async,
    running,
    validations,
)

#: Route name, path for request ``i``.
ROUTES: dict[str, Callable[[int, int], str]] = {
    "select1": lambda i, items: "/select1",
    "pk": lambda i, items: f"/items/{(i * 7919) % items + 1}",
}
ROUTE_TITLES = {"select1": "SELECT 1", "pk": "primary-key lookup"}


@dataclass(frozen=True)
class Batch:
    """One variant's batch in one round."""

    cpu_us: float
    wall_us: float
    errors: int
    #: Idle validations (a ping each) per request; the library's variants only.
    validations: float = 0.0


async def measure(
    client: httpx.AsyncClient,
    path: Callable[[int], str],
    requests: int,
    concurrency: int,
    validated: Callable[[], int] | None = None,
) -> Batch:
    """Send ``requests`` GETs from ``concurrency`` callers; CPU and wall time per request.

    ``validated`` (``common.validations``) counts the library's idle validations.
    """
    numbers = iter(range(requests))
    errors = 0

    async def caller() -> None:
        nonlocal errors
        for i in numbers:
            response = await client.get(path(i))
            if response.status_code != 200:
                errors += 1

    gc.collect()
    count = validated or _none_counted
    pings = count()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    cpu1, wall1 = time.process_time(), time.perf_counter()
    return Batch(
        cpu_us=(cpu1 - cpu0) / requests * 1e6,
        wall_us=(wall1 - wall0) / requests * 1e6,
        errors=errors,
        validations=(count() - pings) / requests,
    )


def _none_counted() -> int:
    return 0


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave what the process holds after the warm-up out of garbage collection meanwhile.

    ``measure`` collects before each batch, so that no batch pays for the garbage of
    another. A full collection of a process holding FastAPI, SQLAlchemy and the apps
    (~100,000 objects) takes ~50 ms, and the other variants sit idle meanwhile: long enough
    to push their idle time past DB_PRE_PING_IDLE. Frozen (``gc.freeze``, as servers that
    preload an app do before forking), the collection sees only what was made since:
    ~0.1 ms. The same for every variant.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: Each round's batch of a variant is measured in this many slices, interleaved with the
#: other variants' slices: this machine's speed drifts by 20-40% within minutes, and a
#: ratio of two batches measured seconds apart carried that drift (the same code measured
#: 0.79x and 1.14x bare in runs an hour apart with one batch per round). Each slice is
#: also a pair: the targets are judged on the median of the per-slice ratios (108 in a
#: full run) and its 95% interval, where the per-round ratios are three. Slices are short
#: (~41 requests, ~60 ms in a full run): each variant waits while the seven others run
#: theirs, and that wait stays below DB_PRE_PING_IDLE (0.5 s) only then; with 20 slices
#: (75 requests) it was ~0.7 s, and the library validated every connection of every slice
#: (0.11 validations per request), a round trip a service under load does not make.
SLICES = 36


def merged(slices: Sequence[Batch]) -> Batch:
    """One batch from equal-sized slices."""
    return Batch(
        cpu_us=sum(b.cpu_us for b in slices) / len(slices),
        wall_us=sum(b.wall_us for b in slices) / len(slices),
        errors=sum(b.errors for b in slices),
        validations=sum(b.validations for b in slices) / len(slices),
    )


def path_of(route: str, items: int, offset: int) -> Callable[[int], str]:
    """The path of request ``i`` of a batch: item ids differ from batch to batch."""
    make = ROUTES[route]

    def path(i: int) -> str:
        return make(i + offset, items)

    return path


async def compare(
    ctx: BenchContext,
    apps: dict[str, Any],
    routes: Sequence[str],
    requests: int,
    sliced: dict[str, dict[str, list[Batch]]] | None = None,
) -> dict[str, dict[str, list[Batch]]]:
    """Alternating rounds over ``apps`` (name -> ASGI app, already running).

    Returns each round's batch per route and variant; ``sliced``, when given, gets every
    slice (``sliced[route][variant][i]``: slice ``i`` of the run, measured next to the
    other variants' slice ``i``).
    """
    profile = ctx.profile
    items = profile.items
    results: dict[str, dict[str, list[Batch]]] = {r: {v: [] for v in apps} for r in routes}
    async with AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")
            )
            for name, app in apps.items()
        }
        counters = {name: validations(app) for name, app in apps.items()}
        warmup = max(20, requests // 10)
        for route in routes:
            for client in clients.values():
                await measure(client, path_of(route, items, 0), warmup, profile.inproc_concurrency)
        slices = SLICES if requests >= SLICES * profile.inproc_concurrency else 1
        size = requests // slices
        stack.enter_context(frozen_heap())
        for round_index in range(ctx.rounds):
            for route in routes:
                parts: dict[str, list[Batch]] = {name: [] for name in apps}
                for part in range(slices):
                    offset = (round_index * slices + part) * size
                    for name in rotated(list(apps), round_index * slices + part):
                        parts[name].append(
                            await measure(
                                clients[name],
                                path_of(route, items, offset),
                                size,
                                profile.inproc_concurrency,
                                counters[name],
                            )
                        )
                for name, measured in parts.items():
                    results[route][name].append(merged(measured))
                    if sliced is not None:
                        sliced.setdefault(route, {}).setdefault(name, []).extend(measured)
            ctx.log(f"overhead: round {round_index + 1}/{ctx.rounds} done")
    return results


def run(ctx: BenchContext) -> Report:
    profile = ctx.profile
    config = AppConfig(
        url=ctx.database_url, pool_size=profile.pool_size, max_overflow=profile.max_overflow
    )

    sliced: dict[str, dict[str, list[Batch]]] = {}

    async def main() -> dict[str, dict[str, list[Batch]]]:
        async with AsyncExitStack() as stack:
            apps = {
                v: await stack.enter_async_context(running(build_app(v, config))) for v in VARIANTS
            }
            return await compare(ctx, apps, list(ROUTES), profile.inproc_requests, sliced)

    ctx.log(f"overhead: {len(VARIANTS)} variants, {profile.inproc_requests} requests per batch")
    results = run_async(main)
    report = Report(
        "overhead",
        "2. In-process overhead (httpx ASGI transport, CPU per request)",
    )
    for route in ROUTES:
        table = overhead_table(route, results[route], profile.inproc_requests, ctx)
        table.notes.extend(paired_notes(sliced.get(route, results[route])))
        report.tables.append(table)
    report.targets.extend(overhead_targets(results, sliced))
    report.data = {
        "requests_per_batch": profile.inproc_requests,
        "concurrency": profile.inproc_concurrency,
        "rounds": ctx.rounds,
        "batches": {
            route: {v: [b.__dict__ for b in batches] for v, batches in by_variant.items()}
            for route, by_variant in results.items()
        },
        "slices": {
            route: {v: [b.__dict__ for b in batches] for v, batches in by_variant.items()}
            for route, by_variant in sliced.items()
        },
    }
    report.notes.append(
        "CPU is this process only (client + app + driver); PostgreSQL's CPU is not counted. "
        "'speed' = bare CPU / variant CPU per round (>= 1.00 is as fast as bare); "
        "'added' = variant CPU - baseline CPU per round, in microseconds."
    )
    return report


def overhead_table(
    route: str, by_variant: dict[str, list[Batch]], requests: int, ctx: BenchContext
) -> Table:
    """One route's table: CPU per request and the differences to both baselines."""
    table = Table(
        f"{ROUTE_TITLES.get(route, route)}: {requests} requests x {ctx.rounds} rounds, "
        f"{ctx.profile.inproc_concurrency} concurrent callers",
        [
            "variant",
            "CPU us/req",
            "wall us/req",
            "speed vs bare",
            "speed vs production",
            "added vs bare",
            "added vs production",
            "errors",
        ],
    )
    bare = [b.cpu_us for b in by_variant["bare"]]
    production = [b.cpu_us for b in by_variant["production"]]
    for name, batches in by_variant.items():
        cpu = [b.cpu_us for b in batches]
        table.add(
            LABELS.get(name, name),
            fmt_int(Spread.of(cpu).median),
            fmt_int(Spread.of([b.wall_us for b in batches]).median),
            ratios(bare, cpu).ratio_text(),
            ratios(production, cpu).ratio_text(),
            deltas(cpu, bare).delta_text(" us"),
            deltas(cpu, production).delta_text(" us"),
            sum(b.errors for b in batches),
        )
    for name in READ_ONLY_VARIANTS:
        if name in by_variant and "dbpool" in by_variant:
            ro = [b.cpu_us for b in by_variant[name]]
            features = [b.cpu_us for b in by_variant["dbpool"]]
            table.notes.append(
                f"{LABELS[name]} vs {LABELS['dbpool']}: speed "
                f"{ratios(features, ro).ratio_text()}, {deltas(ro, features).delta_text(' us')}"
            )
    return table


def slice_speed(by_variant: dict[str, list[Batch]], name: str, baseline: str) -> Paired:
    """``name``'s speed against ``baseline``, slice by slice (baseline CPU / variant CPU)."""
    return paired_ratios(
        [b.cpu_us for b in by_variant[baseline]], [b.cpu_us for b in by_variant[name]]
    )


def paired_notes(by_variant: dict[str, list[Batch]]) -> list[str]:
    """Per-slice speeds of the variants with every feature on, and their idle validations."""
    return [
        f"{LABELS[name]}, per slice ({len(by_variant[name])} pairs): "
        f"{slice_speed(by_variant, name, 'bare').ratio_text()} bare, "
        f"{slice_speed(by_variant, name, 'production').ratio_text()} production; "
        f"{validations_per_request(by_variant[name]):.3f} idle validations per request"
        for name in ("dbpool", "dbpool_instr")
        if name in by_variant
    ]


def validations_per_request(batches: Sequence[Batch]) -> float:
    """Idle validations (DB_PRE_PING_IDLE) per request over equal-sized batches."""
    return sum(b.validations for b in batches) / len(batches) if batches else 0.0


def overhead_targets(
    results: dict[str, dict[str, list[Batch]]],
    sliced: dict[str, dict[str, list[Batch]]] | None = None,
) -> list[Target]:
    """CPU per request with every feature on: at least as fast as bare, ahead of production.

    Judged on the per-slice ratios when there are slices (median and 95% interval of
    many pairs), else on the per-round ones.
    """
    targets = []
    for route, by_variant in results.items():
        pairs = (sliced or {}).get(route)
        judged_on = "median of paired slices" if pairs else "median of paired rounds"
        for name in ("dbpool", "dbpool_instr"):
            errors = sum(b.errors for b in by_variant[name])
            targets.append(
                head_to_head_target(
                    f"in-process CPU, {ROUTE_TITLES[route]}, {LABELS[name]}",
                    judged_on,
                    slice_speed(pairs or by_variant, name, "bare"),
                    slice_speed(pairs or by_variant, name, "production"),
                    f"{errors} errors" if errors else "",
                )
            )
        targets.extend(read_only_target(route, by_variant, v) for v in READ_ONLY_VARIANTS)
    return targets


def read_only_target(route: str, by_variant: dict[str, list[Batch]], variant: str) -> Target:
    """Read-only routes: at least 1.5x the production baseline (CPU per request)."""
    name = f"in-process CPU, {ROUTE_TITLES[route]}, {LABELS[variant]}"
    goal = f">= {READ_ONLY_GOAL:.2f}x production"
    if variant not in by_variant:
        return Target(name, goal, "not in this run (or this checkout)", None)
    cpu = [b.cpu_us for b in by_variant[variant]]
    vs_bare = ratios([b.cpu_us for b in by_variant["bare"]], cpu)
    vs_prod = ratios([b.cpu_us for b in by_variant["production"]], cpu)
    errors = sum(b.errors for b in by_variant[variant])
    return Target(
        name,
        goal,
        f"{vs_prod.ratio_text()} production, {vs_bare.ratio_text()} bare"
        + (f", {errors} errors" if errors else ""),
        None
        if not math.isfinite(vs_prod.median)
        else (vs_prod.median >= READ_ONLY_GOAL and errors == 0),
    )
