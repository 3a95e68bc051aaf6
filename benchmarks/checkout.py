"""3. Checkout: latency uncontended, waits under contention, connections in use over time.

Engines compared, all ``pool_size + max_overflow`` of the profile (10 + 10):

* ``sqlalchemy`` - ``create_async_engine`` alone (``AsyncAdaptedQueuePool``), no pre-ping;
* ``sqlalchemy_pre_ping`` - the same with ``pool_pre_ping=True`` (a round trip per checkout);
* ``dbpool`` - the library's engine, as its lifespan builds it (``DBPoolRuntime.start``):
  instrumented pool, checkout/checkin events, idle-only validation, breaker.

Uncontended latency is timed two ways: ``await engine.connect()`` (what a session's first
statement waits for: pool checkout plus SQLAlchemy's ``Connection``) and the pool's own
``connect()`` run in SQLAlchemy's greenlet. Under contention, ``W`` tasks each loop over
checkout, ``SELECT 1``, release; the wait for the checkout is recorded. The timeline runs
``timeline_tasks`` tasks that hold each connection for a 20 ms ``pg_sleep`` and samples
``pool.checkedout()`` every 20 ms.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import greenlet_spawn

from fastapi_dbpool.runtime import DBPoolRuntime

from .apps import APPLICATION_NAME, AppConfig, dbpool_settings
from .common import (
    BenchContext,
    Report,
    Spread,
    Table,
    Target,
    deltas,
    fmt_float,
    fmt_int,
    percentile,
    rotated,
    run_async,
)

ENGINES = ("sqlalchemy", "sqlalchemy_pre_ping", "dbpool")
LABELS = {
    "sqlalchemy": "SQLAlchemy pool alone",
    "sqlalchemy_pre_ping": "SQLAlchemy, pool_pre_ping=True",
    "dbpool": "fastapi_dbpool engine",
    "dbpool_default": "fastapi_dbpool, default pool",
}

#: Seconds each timeline task holds its connection on the server.
HOLD = 0.02
#: Seconds between two samples of the connections in use.
SAMPLE_EVERY = 0.02


@asynccontextmanager
async def engine_for(name: str, config: AppConfig) -> AsyncIterator[AsyncEngine]:
    """One engine under comparison, disposed afterwards."""
    if name.startswith("sqlalchemy"):
        engine = create_async_engine(
            config.url,
            pool_size=config.pool_size,
            max_overflow=config.max_overflow,
            pool_timeout=config.checkout_timeout,
            pool_pre_ping=name == "sqlalchemy_pre_ping",
            connect_args={"server_settings": {"application_name": APPLICATION_NAME}},
        )
        try:
            yield engine
        finally:
            await engine.dispose()
        return
    overrides: dict[str, Any] = {}
    if name == "dbpool_default":
        overrides = {"pool_size": None, "max_overflow": None}
    runtime = await DBPoolRuntime.start(dbpool_settings(config, **overrides))
    try:
        yield runtime.engine()
    finally:
        await runtime.close()


def pool_of(engine: AsyncEngine) -> QueuePool:
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool


async def warm(engine: AsyncEngine, n: int) -> None:
    conns = [await engine.connect() for _ in range(n)]
    for conn in conns:
        await conn.close()


# -- uncontended --------------------------------------------------------------------------


async def uncontended_engine(engine: AsyncEngine, samples: int) -> list[float]:
    """Seconds for ``await engine.connect()``, one checkout at a time."""
    out = []
    perf = time.perf_counter
    for _ in range(samples):
        t0 = perf()
        conn = await engine.connect()
        t1 = perf()
        await conn.close()
        out.append(t1 - t0)
    return out


async def uncontended_pool(engine: AsyncEngine, samples: int) -> list[float]:
    """Seconds for the pool's own ``connect()`` (SQLAlchemy's greenlet included)."""
    pool = pool_of(engine)
    perf = time.perf_counter

    def once() -> float:
        t0 = perf()
        conn = pool.connect()
        t1 = perf()
        conn.close()
        return t1 - t0

    def many() -> list[float]:
        return [once() for _ in range(samples)]

    result: list[float] = await greenlet_spawn(many)
    return result


# -- contention ---------------------------------------------------------------------------


@dataclass
class Contention:
    waits: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    peak_in_use: int = 0
    errors: int = 0

    @property
    def rate(self) -> float:
        return len(self.waits) / self.elapsed if self.elapsed else math.nan


async def contend(engine: AsyncEngine, waiters: int, checkouts: int) -> Contention:
    """``waiters`` tasks share ``checkouts`` checkouts (at least 3 each), each running
    ``SELECT 1``."""
    pool = pool_of(engine)
    # At least 3 checkouts per task: a task's later checkouts meet a pool in steady state.
    per_task = max(3, math.ceil(checkouts / waiters))
    result = Contention()
    perf = time.perf_counter
    gate = asyncio.Event()

    async def task() -> None:
        await gate.wait()
        for _ in range(per_task):
            t0 = perf()
            try:
                conn = await engine.connect()
            except Exception:
                result.errors += 1
                continue
            result.waits.append(perf() - t0)
            result.peak_in_use = max(result.peak_in_use, pool.checkedout())
            try:
                await conn.exec_driver_sql("SELECT 1")
            finally:
                await conn.close()

    tasks = [asyncio.create_task(task()) for _ in range(waiters)]
    await asyncio.sleep(0)
    t0 = perf()
    gate.set()
    await asyncio.gather(*tasks)
    result.elapsed = perf() - t0
    return result


# -- connections in use over time ---------------------------------------------------------


@dataclass
class Timeline:
    samples: list[int] = field(default_factory=list)
    completed: int = 0
    seconds: float = 0.0
    opened: int = 0
    closed: int = 0
    capacity: str = ""

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else math.nan


async def sustained(engine: AsyncEngine, tasks: int, seconds: float) -> Timeline:
    """``tasks`` closed-loop tasks holding connections; ``pool.checkedout()`` over time."""
    pool = pool_of(engine)
    timeline = Timeline(capacity=f"{pool.size()}+{pool._max_overflow}")

    def opened(*_: Any) -> None:
        timeline.opened += 1

    def closed(*_: Any) -> None:
        timeline.closed += 1

    event.listen(pool, "connect", opened)
    event.listen(pool, "close", closed)
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            async with engine.connect() as conn:
                await conn.exec_driver_sql(f"SELECT pg_sleep({HOLD})")
            timeline.completed += 1

    async def sampler() -> None:
        while not stop.is_set():
            timeline.samples.append(pool.checkedout())
            await asyncio.sleep(SAMPLE_EVERY)

    try:
        workers = [asyncio.create_task(worker()) for _ in range(tasks)]
        watch = asyncio.create_task(sampler())
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        stop.set()
        timeline.seconds = time.perf_counter() - t0
        await asyncio.gather(*workers, watch)
    finally:
        event.remove(pool, "connect", opened)
        event.remove(pool, "close", closed)
    return timeline


async def oneshot(engine: AsyncEngine, tasks: int) -> Timeline:
    """``tasks`` tasks arrive at once, each checks out once and holds its connection.

    The waiters are all queued before the first connection comes back, and none arrives
    later: what a burst of requests does to a pool.
    """
    pool = pool_of(engine)
    timeline = Timeline(capacity=f"{pool.size()}+{pool._max_overflow}")

    def opened(*_: Any) -> None:
        timeline.opened += 1

    def closed(*_: Any) -> None:
        timeline.closed += 1

    event.listen(pool, "connect", opened)
    event.listen(pool, "close", closed)
    done = asyncio.Event()

    async def one() -> None:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(f"SELECT pg_sleep({HOLD})")
        timeline.completed += 1

    async def sampler() -> None:
        while not done.is_set():
            timeline.samples.append(pool.checkedout())
            await asyncio.sleep(SAMPLE_EVERY)

    try:
        watch = asyncio.create_task(sampler())
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(tasks)))
        timeline.seconds = time.perf_counter() - t0
        done.set()
        await watch
    finally:
        event.remove(pool, "connect", opened)
        event.remove(pool, "close", closed)
    return timeline


def sparkline(samples: list[int], buckets: int = 12) -> str:
    """Mean connections in use per slice of the run: ``10 10 11 10 ...``."""
    if not samples:
        return "-"
    size = max(1, len(samples) // buckets)
    means = [
        sum(samples[i : i + size]) / len(samples[i : i + size])
        for i in range(0, len(samples), size)
    ]
    return " ".join(f"{m:.0f}" for m in means[:buckets])


# -- the comparison -----------------------------------------------------------------------


def run(ctx: BenchContext) -> Report:
    profile = ctx.profile
    config = AppConfig(
        url=ctx.database_url, pool_size=profile.pool_size, max_overflow=profile.max_overflow
    )
    rounds = ctx.rounds
    engine_level: dict[str, list[list[float]]] = {e: [] for e in ENGINES}
    pool_level: dict[str, list[list[float]]] = {e: [] for e in ENGINES}
    contention: dict[int, dict[str, list[Contention]]] = {
        w: {e: [] for e in ENGINES} for w in profile.contention_waiters
    }
    timeline_engines = ("sqlalchemy", "dbpool_default", "dbpool")
    timelines: dict[str, list[Timeline]] = {e: [] for e in timeline_engines}
    oneshots: dict[str, list[Timeline]] = {e: [] for e in timeline_engines}

    async def main() -> None:
        async with AsyncExitStack() as stack:
            engines = {e: await stack.enter_async_context(engine_for(e, config)) for e in ENGINES}
            for engine in engines.values():
                await warm(engine, profile.pool_size)
                await uncontended_engine(engine, max(50, profile.checkout_samples // 10))
            for r in range(rounds):
                for name in rotated(list(ENGINES), r):
                    engine_level[name].append(
                        await uncontended_engine(engines[name], profile.checkout_samples)
                    )
                    pool_level[name].append(
                        await uncontended_pool(engines[name], profile.checkout_samples)
                    )
                for waiters in profile.contention_waiters:
                    for name in rotated(list(ENGINES), r):
                        contention[waiters][name].append(
                            await contend(engines[name], waiters, profile.contention_checkouts)
                        )
                ctx.log(f"checkout: round {r + 1}/{rounds} (latency, contention) done")
        # Each timeline engine starts fresh: what a pool does from its first minute on.
        for r in range(rounds):
            for name in rotated(list(timeline_engines), r):
                async with engine_for(name, config) as engine:
                    timelines[name].append(
                        await sustained(engine, profile.timeline_tasks, profile.timeline_seconds)
                    )
                async with engine_for(name, config) as engine:
                    oneshots[name].append(await oneshot(engine, profile.oneshot_tasks))
            ctx.log(f"checkout: round {r + 1}/{rounds} (connections in use) done")

    ctx.log("checkout: uncontended latency, contention, connections in use")
    run_async(main)
    report = Report("checkout", "3. Checkout latency, contention, connections in use")
    report.tables.append(latency_table("uncontended, await engine.connect()", engine_level, ctx))
    report.tables.append(latency_table("uncontended, pool.connect() alone", pool_level, ctx))
    report.tables.append(contention_table(contention, ctx))
    p = profile
    report.tables.append(
        timeline_table(
            f"connections in use under sustained load: {p.timeline_tasks} closed-loop tasks, "
            f"each holding its connection {HOLD * 1e3:.0f} ms (pg_sleep), "
            f"{p.timeline_seconds:g} s x {ctx.rounds} rounds, fresh engine each",
            timelines,
        )
    )
    report.tables.append(
        timeline_table(
            f"connections in use under a burst: {p.oneshot_tasks} tasks arrive at once, one "
            f"checkout each holding {HOLD * 1e3:.0f} ms, {ctx.rounds} rounds, fresh engine each",
            oneshots,
        )
    )
    report.targets.extend(checkout_targets(engine_level, pool_level))
    report.notes.append(
        "added = per-round difference of the median (p50) to 'SQLAlchemy pool alone'; "
        "p-values are medians over rounds of each round's percentile."
    )
    report.data = {
        "uncontended_engine_us": _summaries(engine_level),
        "uncontended_pool_us": _summaries(pool_level),
        "contention": {
            str(w): {
                e: [
                    {
                        "p50_ms": percentile(c.waits, 50) * 1e3,
                        "p95_ms": percentile(c.waits, 95) * 1e3,
                        "p99_ms": percentile(c.waits, 99) * 1e3,
                        "checkouts_per_s": c.rate,
                        "peak_in_use": c.peak_in_use,
                        "errors": c.errors,
                    }
                    for c in cs
                ]
                for e, cs in by_engine.items()
            }
            for w, by_engine in contention.items()
        },
        "oneshots": {
            e: [
                {
                    "capacity": t.capacity,
                    "samples": t.samples,
                    "sample_every_s": SAMPLE_EVERY,
                    "seconds": t.seconds,
                    "opened": t.opened,
                    "closed": t.closed,
                }
                for t in ts
            ]
            for e, ts in oneshots.items()
        },
        "timelines": {
            e: [
                {
                    "capacity": t.capacity,
                    "samples": t.samples,
                    "sample_every_s": SAMPLE_EVERY,
                    "checkouts_per_s": t.rate,
                    "opened": t.opened,
                    "closed": t.closed,
                }
                for t in ts
            ]
            for e, ts in timelines.items()
        },
    }
    return report


def _summaries(level: dict[str, list[list[float]]]) -> dict[str, list[dict[str, float]]]:
    return {
        e: [{q: percentile(s, float(q[1:])) * 1e6 for q in ("p50", "p95", "p99")} for s in rounds]
        for e, rounds in level.items()
    }


def _pct_us(rounds: list[list[float]], q: float) -> list[float]:
    return [percentile(samples, q) * 1e6 for samples in rounds]


def latency_table(title: str, level: dict[str, list[list[float]]], ctx: BenchContext) -> Table:
    table = Table(
        f"{title}: {ctx.profile.checkout_samples} checkouts x {ctx.rounds} rounds",
        ["engine", "p50 us", "p95 us", "p99 us", "added p50 vs SQLAlchemy"],
    )
    reference = _pct_us(level["sqlalchemy"], 50)
    for name, rounds in level.items():
        table.add(
            LABELS[name],
            fmt_float(Spread.of(_pct_us(rounds, 50)).median, 1),
            fmt_float(Spread.of(_pct_us(rounds, 95)).median, 1),
            fmt_float(Spread.of(_pct_us(rounds, 99)).median, 1),
            deltas(_pct_us(rounds, 50), reference).delta_text(" us", 1)
            if name != "sqlalchemy"
            else "-",
        )
    return table


def contention_table(
    contention: dict[int, dict[str, list[Contention]]], ctx: BenchContext
) -> Table:
    p = ctx.profile
    table = Table(
        f"contention: W tasks share {p.contention_checkouts} checkouts (>= 3 each, SELECT 1), "
        f"pool {p.pool_size}+{p.max_overflow}, {ctx.rounds} rounds",
        [
            "waiters",
            "engine",
            "wait p50 ms",
            "wait p95 ms",
            "wait p99 ms",
            "wait max ms",
            "checkouts/s",
            "peak in use",
            "errors",
        ],
    )
    for waiters, by_engine in contention.items():
        for name, runs in by_engine.items():

            def med(get: Callable[[Contention], float], runs: list[Contention] = runs) -> float:
                return Spread.of([get(c) for c in runs]).median

            table.add(
                waiters,
                LABELS[name],
                fmt_float(med(lambda c: percentile(c.waits, 50) * 1e3), 3),
                fmt_float(med(lambda c: percentile(c.waits, 95) * 1e3), 3),
                fmt_float(med(lambda c: percentile(c.waits, 99) * 1e3), 3),
                fmt_float(med(lambda c: max(c.waits, default=math.nan) * 1e3), 1),
                fmt_int(med(lambda c: c.rate)),
                fmt_int(med(lambda c: c.peak_in_use)),
                sum(c.errors for c in runs),
            )
    return table


def timeline_table(title: str, timelines: dict[str, list[Timeline]]) -> Table:
    table = Table(
        title,
        [
            "engine",
            "pool",
            "in use mean",
            "in use p50",
            "in use max",
            "completed/s",
            "opened",
            "closed",
            "in use over time (first round)",
        ],
    )
    for name, runs in timelines.items():
        if not runs:
            continue

        def med(get: Callable[[Timeline], float], runs: list[Timeline] = runs) -> float:
            return Spread.of([get(t) for t in runs]).median

        table.add(
            LABELS[name],
            runs[0].capacity,
            fmt_float(med(lambda t: sum(t.samples) / max(1, len(t.samples))), 1),
            fmt_int(med(lambda t: percentile(t.samples, 50))),
            fmt_int(med(lambda t: max(t.samples, default=0))),
            fmt_int(med(lambda t: t.rate)),
            fmt_int(med(lambda t: t.opened)),
            fmt_int(med(lambda t: t.closed)),
            sparkline(runs[0].samples),
        )
    table.notes.append(
        "opened/closed: connections the pool opened and closed during the run (churn)."
    )
    return table


def checkout_targets(
    engine_level: dict[str, list[list[float]]], pool_level: dict[str, list[list[float]]]
) -> list[Target]:
    p99 = Spread.of(_pct_us(engine_level["dbpool"], 99))
    added_engine = deltas(
        _pct_us(engine_level["dbpool"], 50), _pct_us(engine_level["sqlalchemy"], 50)
    )
    added_pool = deltas(_pct_us(pool_level["dbpool"], 50), _pct_us(pool_level["sqlalchemy"], 50))
    return [
        Target(
            "checkout p99 uncontended (engine.connect)",
            "< 200 us",
            f"{p99.median:.1f} us ({p99.low:.1f}-{p99.high:.1f})",
            p99.median < 200,
        ),
        Target(
            "library's addition to SQLAlchemy's checkout (p50, engine.connect)",
            "< 20 us",
            added_engine.delta_text(" us", 1),
            added_engine.median < 20,
        ),
        Target(
            "library's addition to SQLAlchemy's checkout (p50, pool.connect)",
            "< 20 us",
            added_pool.delta_text(" us", 1),
            added_pool.median < 20,
        ),
    ]
