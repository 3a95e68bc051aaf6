"""2b. CPU per request as instructions, counted by valgrind: the same in every run.

CPU time per request on a shared 2-core machine moves by 10-20% between runs minutes
apart (see docs/performance.md), more than the differences this suite looks for.
Instructions executed do not depend on what else the machine does. One process runs every
variant in turn under ``valgrind --tool=callgrind``: for each variant and route it starts
the app, warms it, then marks the start and the end of a batch of requests (driven through
the bare ASGI driver, ``common.asgi_get``, a few microseconds per request, and the same
for every variant) with a call to ``os.getppid()``; ``--dump-before=getppid`` makes
callgrind write its counters at each mark, so the part between two marks is that batch
and nothing else: not the interpreter's start, not the imports, not the app's startup.

What is counted: the app, the framework, SQLAlchemy, the driver, the library, the event
loop and garbage collection in this process. PostgreSQL runs elsewhere and is not.
Instructions are not time (a cache miss costs more than an add), but for the same
interpreter running the same kind of code they track it closely, and a difference of 1%
is visible where CPU time needs a dozen rounds to show 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .apps import LABELS, READ_ONLY_VARIANTS, VARIANTS, AppConfig, build_app
from .common import (
    READ_ONLY_GOAL,
    REPO_ROOT,
    BenchContext,
    Report,
    Table,
    Target,
    asgi_get,
    fmt_int,
    run_async,
    running,
)
from .overhead import ROUTE_TITLES, ROUTES

#: Concurrent callers in a batch (as the in-process comparison).
CONCURRENCY = 8

#: How much slower a program runs under callgrind, roughly (50-100x measured here). The
#: library's time-based behaviour is scaled by it in the worker: a request that takes
#: 1 ms at full speed takes ~0.1 s under callgrind, so without scaling the disconnect
#: watch (armed after 1 s), idle validation (after 0.5 s idle) and the background
#: probe (every 5 s) would run for many requests that at full speed never trigger them,
#: and the count would be of a slowed-down world, not of this one.
SLOWDOWN = 100.0


@dataclass(frozen=True)
class Part:
    """One measured batch: a variant, a route, and what it cost."""

    variant: str
    route: str
    gc: bool
    requests: int
    instructions: int
    errors: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


# -- the worker: runs under valgrind ------------------------------------------------------


def _mark() -> None:
    """Where callgrind dumps its counters (``--dump-before=getppid``)."""
    os.getppid()


async def _batch(app: Any, route: str, items: int, requests: int, offset: int) -> int:
    numbers = iter(range(requests))
    errors = 0
    make = ROUTES[route]

    async def caller() -> None:
        nonlocal errors
        for i in numbers:
            answer = await asgi_get(app, make(i + offset, items))
            if answer.status != 200:
                errors += 1

    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return errors


def _scaled_settings() -> dict[str, Any]:
    """The library's time-based settings and constants, stretched by ``SLOWDOWN``."""
    import fastapi_dbpool.requests

    fastapi_dbpool.requests.DISCONNECT_WATCH_DELAY *= SLOWDOWN
    return {
        "pre_ping_idle": 0.5 * SLOWDOWN,
        "health_check_interval": 5.0 * SLOWDOWN,
        "leak_threshold": 30.0 * SLOWDOWN,
    }


async def _work(url: str, variants: list[str], requests: int, items: int) -> list[dict[str, Any]]:
    config = AppConfig(url=url)
    scaled = _scaled_settings()
    phases: list[dict[str, Any]] = []
    for variant in variants:
        async with running(build_app(variant, config, **scaled)) as app:
            for route in ROUTES:
                await _batch(app, route, items, max(50, requests // 4), 0)
                for collect in (False, True):
                    gc.collect()
                    if not collect:
                        gc.disable()
                    _mark()
                    errors = await _batch(app, route, items, requests, requests)
                    _mark()
                    gc.enable()
                    phases.append(
                        {
                            "variant": variant,
                            "route": route,
                            "gc": collect,
                            "requests": requests,
                            "errors": errors,
                        }
                    )
    return phases


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions --worker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--variants", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    args = parser.parse_args(argv)
    phases = run_async(lambda: _work(args.url, args.variants.split(","), args.requests, args.items))
    print("PHASESJSON " + json.dumps(phases), flush=True)


# -- the parent ---------------------------------------------------------------------------


def _part_totals(out_dir: Path, base: str) -> dict[int, int]:
    """Instructions of each dumped part: ``{part number: Ir}``."""
    totals: dict[int, int] = {}
    for path in out_dir.glob(base + "*"):
        part = total = None
        with path.open() as handle:
            for line in handle:
                if line.startswith("part:"):
                    part = int(line.split()[1])
                elif line.startswith("totals:"):
                    total = int(line.split()[1])
                    break
        if part is not None and total is not None:
            totals[part] = total
    return totals


def measure(ctx: BenchContext, variants: list[str], requests: int) -> list[Part]:
    """Run the worker under callgrind; the instructions of each measured batch."""
    with tempfile.TemporaryDirectory(prefix="dbpool-bench-cg-") as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--dump-before=getppid",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "benchmarks.instructions",
                "--worker",
                "--url",
                ctx.database_url,
                "--variants",
                ",".join(variants),
                "--requests",
                str(requests),
                "--items",
                str(ctx.profile.items),
            ],
            cwd=REPO_ROOT,
            # Fixed string hashing: the same dict layouts, so the same counts, run to run.
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            timeout=1800,
        )
        phases: list[dict[str, Any]] | None = None
        for line in proc.stdout.splitlines():
            if line.startswith("PHASESJSON "):
                phases = json.loads(line[len("PHASESJSON ") :])
        if proc.returncode != 0 or phases is None:
            raise RuntimeError(
                f"instructions worker failed ({proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            )
        totals = _part_totals(Path(tmp), out.name)
    # Part 1 runs up to the first mark; each batch is the part after its first mark:
    # batch k (from 0) is part 2k + 2.
    parts = []
    for k, phase in enumerate(phases):
        number = 2 * k + 2
        if number not in totals:
            raise RuntimeError(f"callgrind wrote no part {number}; parts: {sorted(totals)}")
        parts.append(
            Part(
                phase["variant"],
                phase["route"],
                phase["gc"],
                phase["requests"],
                totals[number],
                phase["errors"],
            )
        )
    return parts


def valgrind_missing(report: Report, target: str) -> bool:
    """Without valgrind: say so in ``report`` (``target`` not measurable) and return True."""
    if shutil.which("valgrind") is not None:
        return False
    report.notes.append("valgrind is not installed: not measured (apt-get install valgrind)")
    report.targets.append(Target(target, "measured", "valgrind missing", None))
    return True


def run(ctx: BenchContext) -> Report:
    report = Report("instructions", "2b. Instructions per request (callgrind, deterministic)")
    variants = list(ctx.profile.instructions_variants or VARIANTS)
    requests = ctx.profile.instructions_requests
    if valgrind_missing(report, "instructions per request"):
        return report
    ctx.log(
        f"instructions: {len(variants)} variants x {len(ROUTES)} routes, {requests} requests "
        "each, under callgrind (a few minutes)"
    )
    parts = measure(ctx, variants, requests)
    by_route: dict[str, dict[str, dict[bool, Part]]] = {}
    for part in parts:
        by_route.setdefault(part.route, {}).setdefault(part.variant, {})[part.gc] = part
    for route, by_variant in by_route.items():
        report.tables.append(instructions_table(route, by_variant, requests))
        report.targets.extend(instructions_targets(route, by_variant))
    report.data = {
        "requests": requests,
        "concurrency": CONCURRENCY,
        "slowdown": SLOWDOWN,
        "parts": [{**p.__dict__, "per_request": p.per_request} for p in parts],
    }
    report.notes.append(
        "one run: the counts repeat within ~1% (PYTHONHASHSEED=0); 'speed' = bare "
        "instructions / variant instructions; PostgreSQL's instructions are not counted. "
        "Each batch ran twice, with the garbage collector off and on; the targets use the "
        "count with it off, the code path itself. The two agree when the library keeps "
        "nothing alive past a request (earlier versions did, and paid in collections: "
        "docs/performance.md)."
    )
    return report


def _per(by_variant: dict[str, dict[bool, Part]], name: str, gc_on: bool) -> float:
    return by_variant[name][gc_on].per_request


def instructions_table(route: str, by_variant: dict[str, dict[bool, Part]], requests: int) -> Table:
    table = Table(
        f"{ROUTE_TITLES.get(route, route)}: instructions per request, {requests} requests, "
        f"{CONCURRENCY} concurrent callers",
        [
            "variant",
            "instr/req (GC off)",
            "speed vs bare",
            "speed vs production",
            "added vs bare",
            "instr/req (GC on)",
            "speed vs bare (GC on)",
            "errors",
        ],
    )
    bare = _per(by_variant, "bare", False)
    production = _per(by_variant, "production", False)
    bare_gc = _per(by_variant, "bare", True)
    for name, runs in by_variant.items():
        per = runs[False].per_request
        per_gc = runs[True].per_request
        table.add(
            LABELS.get(name, name),
            fmt_int(per),
            f"{bare / per:.3f}x",
            f"{production / per:.3f}x",
            f"{per - bare:+,.0f}",
            fmt_int(per_gc),
            f"{bare_gc / per_gc:.3f}x",
            runs[False].errors + runs[True].errors,
        )
    return table


def instructions_targets(route: str, by_variant: dict[str, dict[bool, Part]]) -> list[Target]:
    bare = _per(by_variant, "bare", False)
    production = _per(by_variant, "production", False)
    targets = []
    for name in ("dbpool", "dbpool_instr"):
        if name not in by_variant:
            continue
        per = _per(by_variant, name, False)
        errors = sum(p.errors for p in by_variant[name].values())
        targets.append(
            Target(
                f"in-process instructions (GC off), {ROUTE_TITLES[route]}, {LABELS[name]}",
                ">= 1.00x bare and > 1.00x production",
                f"{bare / per:.3f}x bare, {production / per:.3f}x production",
                bare / per >= 1.0 and production / per > 1.0 and errors == 0,
            )
        )
    for name in READ_ONLY_VARIANTS:
        if name not in by_variant:
            continue
        per = _per(by_variant, name, False)
        errors = sum(p.errors for p in by_variant[name].values())
        targets.append(
            Target(
                f"in-process instructions (GC off), {ROUTE_TITLES[route]}, {LABELS[name]}",
                f">= {READ_ONLY_GOAL:.2f}x production",
                f"{production / per:.3f}x production, {bare / per:.3f}x bare",
                production / per >= READ_ONLY_GOAL and errors == 0,
            )
        )
    return targets


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        raise SystemExit("run it through `python -m benchmarks --only instructions`")
