"""4. A burst of 10,000 concurrent requests on a 10 + 10 pool with a short checkout timeout.

Each variant's burst runs in a fresh process (``python -m benchmarks.burst --worker``), so
its peak memory is its own. In that process the app is served in-process through a bare
ASGI driver (:func:`benchmarks.common.asgi_get`: microseconds per request, where httpx's
transport costs ~170 us, so the numbers are the server's, not a client library's). All
requests are created at once; each holds its connection for ``burst_hold`` seconds on the
server (``pg_sleep``). Meanwhile a prober asks ``/health/live`` every 10 ms on a fixed
schedule; its latency is counted from the moment each probe was due, so event-loop lag
shows in full.

As uvicorn would, the driver logs an exception that escapes the app to ``uvicorn.error``
(stderr), and the library's own log records go where an unconfigured ``logging`` sends
them (stderr): the burst pays for its logging as it would in production. The parent
counts those lines.

A request is *answered* when it got a response: 200, or 503 with ``Retry-After``; any
other status or an exception with no response is an error. The deadline is
``DB_CHECKOUT_TIMEOUT + 1 s``, measured from the moment the request reached the app and,
stricter, from the start of the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .apps import AppConfig, build_app
from .common import (
    REPO_ROOT,
    Answer,
    BenchContext,
    Report,
    Spread,
    Table,
    Target,
    asgi_get,
    fmt_float,
    fmt_int,
    percentile,
    rotated,
    run_async,
    running,
)

VARIANTS = ("dbpool", "bare", "floor")
LABELS = {
    "dbpool": "fastapi_dbpool (defaults: instrumentator on)",
    "bare": "plain pattern (pool_timeout = same)",
    "floor": "FastAPI alone, no database (floor: /hold sleeps)",
}
#: The library variant runs with its defaults: the instrumentator is on unless turned off.
APP_VARIANT = {"dbpool": "dbpool_instr", "bare": "bare", "floor": "fastapi_only"}
PROBE_EVERY = 0.01
DEADLINE_GRACE = 1.0


@dataclass
class BurstResult:
    """What one burst did (the worker's JSON)."""

    variant: str
    requests: int
    served: int = 0
    shed_503: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    within_deadline_own: int = 0
    within_deadline_burst: int = 0
    last_answer_s: float = 0.0
    latency_own_p50_s: float = 0.0
    latency_own_p99_s: float = 0.0
    latency_own_max_s: float = 0.0
    probe_count: int = 0
    probe_p50_ms: float = 0.0
    probe_p99_ms: float = 0.0
    probe_max_ms: float = 0.0
    rss_before_mib: float = 0.0
    peak_rss_mib: float = 0.0
    cpu_s: float = 0.0
    checked_out_after: int = -1
    leaks: float | None = None
    log_lines: int = 0


def _status_kib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return float(line.split()[1])
    return math.nan


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def _leaks_from_metrics(body: bytes) -> float | None:
    text = body.decode(errors="replace")
    if "dbpool_leaks_total" not in text:
        return None
    total = 0.0
    for match in re.finditer(r"^dbpool_leaks_total\{[^}]*\} ([0-9.e+-]+)$", text, re.MULTILINE):
        total += float(match.group(1))
    return total


def _checked_out(app: Any, variant: str) -> int:
    if variant == "floor":
        return 0
    if variant == "bare":
        return int(app.state.engine.sync_engine.pool.checkedout())
    import fastapi_dbpool as dbpool

    return int(dbpool.get_runtime(app).database("primary").pool.checkedout())


async def burst(
    variant: str, url: str, requests: int, timeout: float, hold: float, size: int, overflow: int
) -> BurstResult:
    config = AppConfig(url=url, pool_size=size, max_overflow=overflow, checkout_timeout=timeout)
    app = build_app(APP_VARIANT[variant], config)
    result = BurstResult(variant=variant, requests=requests)
    error_log = logging.getLogger("uvicorn.error")
    async with running(app) as served:
        # Every connection opened once: the burst meets a warm pool in both variants.
        await asyncio.gather(*(asgi_get(served, "/hold?seconds=0") for _ in range(size)))
        gc.collect()
        result.rss_before_mib = _status_kib("VmRSS") / 1024
        _reset_peak_rss()
        own: list[float] = []
        probes: list[float] = []
        done = asyncio.Event()
        deadline = timeout + DEADLINE_GRACE

        async def probe(due: float) -> None:
            answer = await asgi_get(served, "/health/live")
            if answer.status == 200:
                probes.append(time.perf_counter() - due)

        async def prober() -> None:
            pending: list[asyncio.Task[None]] = []
            due = time.perf_counter()
            while not done.is_set():
                pending.append(asyncio.create_task(probe(due)))
                due += PROBE_EVERY
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await asyncio.gather(*pending)

        def classify(answer: Answer, latency_own: float, latency_burst: float) -> None:
            if answer.status == 200:
                result.served += 1
            elif answer.status == 503 and b"retry-after" in answer.headers:
                result.shed_503 += 1
            else:
                kind = f"{answer.status} {type(answer.error).__name__ if answer.error else ''}"
                result.error_kinds[kind.strip()] = result.error_kinds.get(kind.strip(), 0) + 1
                result.errors += 1
                if answer.error is not None:
                    # What uvicorn does with an exception that escapes the app.
                    error_log.error("Exception in ASGI application\n", exc_info=answer.error)
                return
            if latency_own <= deadline:
                result.within_deadline_own += 1
            if latency_burst <= deadline:
                result.within_deadline_burst += 1

        async def one(started: float) -> None:
            arrived = time.perf_counter()
            answer = await asgi_get(served, f"/hold?seconds={hold}")
            now = time.perf_counter()
            own.append(now - arrived)
            classify(answer, now - arrived, now - started)

        watch = asyncio.create_task(prober())
        await asyncio.sleep(0.05)  # the prober's baseline
        cpu0 = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(one(started) for _ in range(requests)))
        result.last_answer_s = time.perf_counter() - started
        result.cpu_s = time.process_time() - cpu0
        await asyncio.sleep(0.05)
        done.set()
        await watch
        result.peak_rss_mib = _status_kib("VmHWM") / 1024
        result.latency_own_p50_s = percentile(own, 50)
        result.latency_own_p99_s = percentile(own, 99)
        result.latency_own_max_s = max(own, default=math.nan)
        result.probe_count = len(probes)
        result.probe_p50_ms = percentile(probes, 50) * 1e3
        result.probe_p99_ms = percentile(probes, 99) * 1e3
        result.probe_max_ms = max(probes, default=math.nan) * 1e3
        result.checked_out_after = _checked_out(app, variant)
        if variant == "dbpool":
            result.leaks = _leaks_from_metrics((await asgi_get(served, "/metrics")).body)
    return result


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.burst --worker")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--hold", type=float, required=True)
    parser.add_argument("--pool-size", type=int, required=True)
    parser.add_argument("--max-overflow", type=int, required=True)
    args = parser.parse_args(argv)
    # uvicorn's default logging: its error logger writes to stderr.
    error_log = logging.getLogger("uvicorn.error")
    error_log.addHandler(logging.StreamHandler(sys.stderr))
    error_log.propagate = False
    result = run_async(
        lambda: burst(
            args.variant,
            args.url,
            args.requests,
            args.timeout,
            args.hold,
            args.pool_size,
            args.max_overflow,
        )
    )
    print("BURSTJSON " + json.dumps(asdict(result)), flush=True)


def run_one(ctx: BenchContext, variant: str) -> BurstResult:
    p = ctx.profile
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.burst",
            "--worker",
            "--variant",
            variant,
            "--url",
            ctx.database_url,
            "--requests",
            str(p.burst_requests),
            "--timeout",
            str(p.burst_checkout_timeout),
            "--hold",
            str(p.burst_hold),
            "--pool-size",
            str(p.pool_size),
            "--max-overflow",
            str(p.max_overflow),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BURSTJSON "):
            result = BurstResult(**json.loads(line[len("BURSTJSON ") :]))
            result.log_lines = len(proc.stderr.splitlines())
            return result
    raise RuntimeError(
        f"burst worker ({variant}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )


def run(ctx: BenchContext) -> Report:
    p = ctx.profile
    results: dict[str, list[BurstResult]] = {v: [] for v in VARIANTS}
    ctx.log(
        f"burst: {p.burst_requests} requests, pool {p.pool_size}+{p.max_overflow}, "
        f"checkout timeout {p.burst_checkout_timeout:g} s"
    )
    for r in range(ctx.rounds):
        for variant in rotated(list(VARIANTS), r):
            results[variant].append(run_one(ctx, variant))
        ctx.log(f"burst: round {r + 1}/{ctx.rounds} done")
    report = Report("burst", f"4. Burst of {p.burst_requests:,} concurrent requests")
    report.tables.append(burst_table(results, ctx))
    report.targets.extend(burst_targets(results["dbpool"], ctx, results["floor"]))
    report.data = {v: [asdict(b) for b in bs] for v, bs in results.items()}
    report.notes.append(
        "in-process ASGI (no sockets); each request holds its connection "
        f"{p.burst_hold * 1e3:.0f} ms; deadline = checkout timeout + {DEADLINE_GRACE:g} s; "
        "'own' latency counts from the moment the request reached the app, 'burst' from "
        "the start of the burst; values are medians over rounds."
    )
    report.notes.append(
        "the floor is FastAPI with the same routes and no database (/hold sleeps): all "
        "requests are created in one event-loop iteration, so a /health/live probe waits "
        "behind every request's first step whatever the database layer does; the HTTP "
        "burst (burst_http) measures arrivals through sockets, as in production."
    )
    return report


def _med(runs: Sequence[Any], get: Any) -> float:
    return Spread.of([float(get(b)) for b in runs]).median


def errors_cell(runs: Sequence[Any]) -> str:
    """The median of a burst's errors over rounds, and every kind seen in any round."""
    kinds: dict[str, int] = {}
    for b in runs:
        for k, v in b.error_kinds.items():
            kinds[k] = kinds.get(k, 0) + v
    text = fmt_int(_med(runs, lambda b: b.errors))
    if kinds:
        text += f" (all rounds: {', '.join(f'{k} x{v}' for k, v in kinds.items())})"
    return text


def burst_table(results: dict[str, list[BurstResult]], ctx: BenchContext) -> Table:
    p = ctx.profile
    table = Table(
        f"{p.burst_requests:,} requests at once, pool {p.pool_size}+{p.max_overflow}, "
        f"checkout timeout {p.burst_checkout_timeout:g} s, {ctx.rounds} rounds (medians)",
        [
            "variant",
            "served",
            "503+Retry-After",
            "other errors",
            "by deadline (own)",
            "by deadline (burst)",
            "last answer s",
            "own p99 s",
            "/health/live p50/p99/max ms",
            "peak RSS +MiB",
            "CPU s",
            "log lines",
            "held after",
            "leaks",
        ],
    )
    for variant, runs in results.items():
        n = p.burst_requests
        leaks = [b.leaks for b in runs if b.leaks is not None]
        table.add(
            LABELS[variant],
            fmt_int(_med(runs, lambda b: b.served)),
            fmt_int(_med(runs, lambda b: b.shed_503)),
            errors_cell(runs),
            f"{_med(runs, lambda b: b.within_deadline_own) / n:.1%}",
            f"{_med(runs, lambda b: b.within_deadline_burst) / n:.1%}",
            fmt_float(_med(runs, lambda b: b.last_answer_s), 1),
            fmt_float(_med(runs, lambda b: b.latency_own_p99_s), 2),
            f"{_med(runs, lambda b: b.probe_p50_ms):.0f}/{_med(runs, lambda b: b.probe_p99_ms):.0f}"
            f"/{_med(runs, lambda b: b.probe_max_ms):.0f}",
            fmt_float(_med(runs, lambda b: b.peak_rss_mib - b.rss_before_mib), 1),
            fmt_float(_med(runs, lambda b: b.cpu_s), 1),
            fmt_int(_med(runs, lambda b: b.log_lines)),
            fmt_int(max(b.checked_out_after for b in runs)),
            fmt_int(max(leaks)) if leaks else "-",
        )
    return table


def burst_targets(
    runs: list[BurstResult], ctx: BenchContext, floor: list[BurstResult] | None = None
) -> list[Target]:
    p = ctx.profile
    n = p.burst_requests
    deadline = p.burst_checkout_timeout + DEADLINE_GRACE
    worst_own = min(b.within_deadline_own for b in runs)
    worst_burst = min(b.within_deadline_burst for b in runs)
    errors = sum(b.errors for b in runs)
    leaks = [b.leaks for b in runs]
    probe_p99 = Spread.of([b.probe_p99_ms for b in runs])
    floor_text = ""
    if floor:
        floor_p99 = Spread.of([b.probe_p99_ms for b in floor])
        floor_text = f"; FastAPI with no database at all: {floor_p99.median:.0f} ms"
    return [
        Target(
            "burst: answered by timeout + 1 s, from arrival",
            f"100% by {deadline:g} s",
            f"{worst_own / n:.1%} (worst round)",
            worst_own == n,
        ),
        Target(
            "burst: answered by timeout + 1 s, from burst start",
            f"100% by {deadline:g} s",
            f"{worst_burst / n:.1%} (worst round)",
            worst_burst == n,
        ),
        Target("burst: errors other than 503", "0", str(errors), errors == 0),
        Target(
            "burst: leaks, connections held after",
            "0",
            f"leaks {leaks}, held {[b.checked_out_after for b in runs]}",
            all(b.checked_out_after == 0 for b in runs) and all(not x for x in leaks),
        ),
        Target(
            "burst: /health/live p99 during the burst",
            "< 100 ms",
            f"{probe_p99.median:.0f} ms ({probe_p99.low:.0f}-{probe_p99.high:.0f}){floor_text}",
            probe_p99.median < 100,
        ),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        raise SystemExit("run the burst through `python -m benchmarks --only burst`")
