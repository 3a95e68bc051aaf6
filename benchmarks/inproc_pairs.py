"""2d. In-process CPU head to head: each variant alone in its own process, paired batches.

Comparison 2 runs eight apps in one process and alternates slices of ~75 requests
between them: each slice starts after seven other apps' work has gone through the same
caches, and every app's background tasks run in whichever slice is on. A service runs
one app per process. Here each of the four variants the target concerns (bare,
production, all features, all features + HTTP metrics) runs alone in a worker process
of its own, through httpx's ASGI transport as in 2. The parent asks the workers for one
batch at a time, back to back (forward order on even rounds, backward on odd ones), and
each worker measures its own ``time.process_time()`` over its batch; the others wait on
their event loops meanwhile (background tasks running, as in a service).

A process keeps its own speed for its lifetime: with one set of processes for a whole
run, the rounds' ratios agree with each other and not with the next run's. So the workers
are started afresh every ``GENERATION_ROUNDS`` rounds, each set gives its median ratio,
and the report gives the median of those over the sets, with its 95% interval
(``common.Paired``) and range. A fifth worker runs bare again: its speed against the first
bare is what two processes of the same code measure here (an A/A control).

The batches are short (``BATCH_REQUESTS``): a variant waits while the four others run
theirs, and that wait must stay below ``DB_PRE_PING_IDLE`` (0.5 s) or its connections come
back to it as idle ones, validated with a round trip each, which a service under load
does not pay. With 150-request batches and a full garbage collection (~50 ms) before each,
every connection of every batch was validated (~0.05 per request); with 50-request
batches still 0.15 per request. Each batch reports the library's idle validations per
request, so the report shows whether the waits stayed short.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable

import httpx

from .apps import LABELS, AppConfig, build_app
from .common import (
    REPO_ROOT,
    BenchContext,
    Paired,
    Report,
    Spread,
    Table,
    Target,
    fmt_int,
    head_to_head_target,
    run_async,
    running,
    validations,
)
from .http_pairs import PAIR_VARIANTS, TARGET_VARIANTS
from .overhead import (
    ROUTE_TITLES,
    ROUTES,
    Batch,
    frozen_heap,
    measure,
    path_of,
    slice_speed,
    validations_per_request,
)

#: The A/A control: a second worker running the bare variant.
CONTROL = "bare_again"
#: The workers of a set: the four variants of the targets and the control.
WORKERS: tuple[str, ...] = (*PAIR_VARIANTS, CONTROL)
#: Requests per batch (full profile): ~60 ms each, so a variant waits ~0.25-0.3 s while the
#: four others run theirs, below DB_PRE_PING_IDLE (0.5 s). The heap is frozen after the
#: warm-up (``overhead.frozen_heap``): the collection before each batch would add ~50 ms.
BATCH_REQUESTS = 40


def app_variant(worker: str) -> str:
    """The app a worker runs (the control runs bare)."""
    return "bare" if worker == CONTROL else worker


def label(worker: str) -> str:
    """The worker's row label."""
    if worker == CONTROL:
        return "plain, bare again (second process, A/A control)"
    return LABELS[worker]


def round_order(round_index: int) -> list[str]:
    """Forward on even rounds, backward on odd ones."""
    order = list(WORKERS)
    return order if round_index % 2 == 0 else order[::-1]


# -- the worker: one variant, commands on stdin, answers on stdout ------------------------


async def _serve(variant: str, url: str, items: int, concurrency: int) -> None:
    config = AppConfig(url=url)
    async with running(build_app(variant, config)) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for route in ROUTES:
                await measure(client, path_of(route, items, 0), 50, concurrency)
            with frozen_heap():
                await _answer(client, items, concurrency, validations(app))


async def _answer(
    client: httpx.AsyncClient, items: int, concurrency: int, validated: Callable[[], int] | None
) -> None:
    """Measure a batch for each command on stdin, until ``quit``."""
    loop = asyncio.get_running_loop()
    print("READY", flush=True)
    while True:
        # Read in a thread: the event loop keeps running the app's background tasks.
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            return
        route, requests, offset = line.split()
        batch = await measure(
            client, path_of(route, items, int(offset)), int(requests), concurrency, validated
        )
        print("BATCH " + json.dumps(batch.__dict__), flush=True)


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inproc_pairs --worker")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args(argv)
    run_async(lambda: _serve(args.variant, args.url, args.items, args.concurrency))


# -- the parent ---------------------------------------------------------------------------


class Worker:
    """One variant's worker process."""

    def __init__(self, ctx: BenchContext, name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.inproc_pairs",
                "--worker",
                "--variant",
                app_variant(name),
                "--url",
                ctx.database_url,
                "--items",
                str(ctx.profile.items),
                "--concurrency",
                str(ctx.profile.inproc_concurrency),
            ],
            cwd=REPO_ROOT,
            env={**os.environ},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _line(self, prefix: str) -> str:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.name} worker exited ({self.process.wait()})")
            if line.startswith(prefix):
                return line[len(prefix) :]

    def wait_ready(self) -> None:
        self._line("READY")

    def batch(self, route: str, requests: int, offset: int) -> Batch:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{route} {requests} {offset}\n")
        self.process.stdin.flush()
        return Batch(**json.loads(self._line("BATCH ")))

    def stop(self) -> None:
        if self.process.stdin is not None and self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


#: Rounds per set of worker processes. A process keeps its own speed for its lifetime
#: (two runs of 60 rounds with one set of processes each measured the library at 1.09x-1.13x
#: and at 0.95x-0.97x bare, each with a narrow interval): fresh processes every this many
#: rounds, and the targets judged on each set's median.
GENERATION_ROUNDS = 10
#: Rounds per run, in units of the profile's ``pair_rounds`` (full: 180 rounds, 18 sets).
ROUNDS_PER_PAIR_ROUND = 6


def run(ctx: BenchContext) -> Report:
    profile = ctx.profile
    rounds = ROUNDS_PER_PAIR_ROUND * profile.pair_rounds
    generations = max(1, rounds // GENERATION_ROUNDS)
    per_generation = max(1, rounds // generations)
    requests = max(10, min(BATCH_REQUESTS, profile.inproc_requests // 10))
    ctx.log(
        f"in-process head to head: {generations} sets of {len(WORKERS)} worker processes, "
        f"{per_generation} rounds each, {requests} requests per variant and route"
    )
    results: list[dict[str, dict[str, list[Batch]]]] = []
    for generation in range(generations):
        results.append(_generation(ctx, per_generation, requests, generation))
        ctx.log(f"in-process head to head: set {generation + 1}/{generations} done")
    report = Report("inproc_pairs", "2d. In-process CPU head to head (one process per variant)")
    for route in ROUTES:
        by_generation = [g[route] for g in results]
        report.tables.append(pairs_table(route, by_generation, requests, per_generation))
        report.targets.extend(pairs_targets(route, by_generation))
    report.notes.append(
        "each variant alone in a worker process, httpx's ASGI transport as in 2; CPU = the "
        "worker's time.process_time() over its batch, per request; a set's speed = the median "
        "of baseline CPU / variant CPU per round; shown over the sets: median [95% interval "
        "of the median, from 6 sets on] (lowest-highest, sets where the variant was faster "
        "/ sets). The A/A control runs bare in a second process: its speed vs bare is what "
        "this measure reads for the same code. Idle validations per request: pings of "
        "connections idle longer than DB_PRE_PING_IDLE between batches (0 at load)."
    )
    report.data = {
        "requests_per_batch": requests,
        "generations": generations,
        "rounds_per_generation": per_generation,
        "concurrency": profile.inproc_concurrency,
        "batches": [
            {
                route: {v: [b.__dict__ for b in batches] for v, batches in by_variant.items()}
                for route, by_variant in generation.items()
            }
            for generation in results
        ],
    }
    return report


def _generation(
    ctx: BenchContext, rounds: int, requests: int, generation: int
) -> dict[str, dict[str, list[Batch]]]:
    """``rounds`` paired rounds on a fresh set of worker processes."""
    results: dict[str, dict[str, list[Batch]]] = {r: {v: [] for v in WORKERS} for r in ROUTES}
    workers = {v: Worker(ctx, v) for v in WORKERS}
    try:
        for w in workers.values():
            w.wait_ready()
        for round_index in range(rounds):
            offset = (generation * rounds + round_index) * requests
            for route in ROUTES:
                for variant in round_order(round_index):
                    results[route][variant].append(workers[variant].batch(route, requests, offset))
    finally:
        for w in workers.values():
            w.stop()
    return results


def generation_speed(
    by_generation: list[dict[str, list[Batch]]], variant: str, baseline: str
) -> Paired:
    """The median speed of each set of processes, summarised over the sets."""
    return Paired.of([slice_speed(g, variant, baseline).median for g in by_generation])


def pairs_table(
    route: str, by_generation: list[dict[str, list[Batch]]], requests: int, rounds: int
) -> Table:
    table = Table(
        f"{ROUTE_TITLES[route]}: {requests} requests x {rounds} rounds per variant, one process "
        f"each, {len(by_generation)} sets of processes",
        [
            "variant",
            "CPU us/req",
            "speed vs bare",
            "speed vs production",
            "idle validations/req",
            "errors",
        ],
    )
    for variant in WORKERS:
        batches = [b for g in by_generation for b in g[variant]]
        table.add(
            label(variant),
            fmt_int(Spread.of([b.cpu_us for b in batches]).median),
            "1.00x"
            if variant == "bare"
            else generation_speed(by_generation, variant, "bare").ratio_text(),
            "1.00x"
            if variant == "production"
            else generation_speed(by_generation, variant, "production").ratio_text(),
            f"{validations_per_request(batches):.3f}",
            sum(b.errors for b in batches),
        )
    for variant in (*TARGET_VARIANTS, CONTROL):
        table.notes.append(
            f"{label(variant)}, each set's median speed vs bare: "
            + ", ".join(f"{slice_speed(g, variant, 'bare').median:.2f}x" for g in by_generation)
        )
    return table


def pairs_targets(route: str, by_generation: list[dict[str, list[Batch]]]) -> list[Target]:
    targets = []
    for variant in TARGET_VARIANTS:
        vs_bare = generation_speed(by_generation, variant, "bare")
        vs_prod = generation_speed(by_generation, variant, "production")
        errors = sum(b.errors for g in by_generation for b in g[variant])
        targets.append(
            head_to_head_target(
                f"in-process CPU head to head, {ROUTE_TITLES[route]}, {LABELS[variant]}",
                "median over sets of processes",
                vs_bare,
                vs_prod,
                f"{errors} errors" if errors else "",
            )
        )
    return targets


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        raise SystemExit("run it through `python -m benchmarks --only inproc_pairs`")
