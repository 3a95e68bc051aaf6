"""1b. HTTP throughput head to head: the library against the plain pattern, many short rounds.

Comparison 1 serves eight variants and runs each (route, concurrency) case against each
of them in turn for several seconds, three rounds: a ratio compares runs up to half a
minute apart, and three ratios cannot tell 1.05x from 1.00x on this machine, where one
server's CPU per request moves by 15-20% from one run to the next, even with the other
variant loaded at the same moment (measured: docs/performance.md, "Variance").

This comparison answers only the issue's question for the two variants with every
feature on: is the library at least as fast as bare, and faster than production? Four
variants (bare, production, all features, all features + HTTP metrics) are served by
uvicorn as in comparison 1. Each round runs every case against the four back to back,
for ``pair_duration`` seconds each, in forward order on even rounds and backward on odd
ones (no variant always first, and each pair's neighbours are as close as they can be).
Every round gives one ratio per variant and baseline; over ``pair_rounds`` rounds the
report gives the median ratio, its distribution-free 95% interval (``common.Paired``),
the range, and in how many rounds the variant was the faster one.
"""

from __future__ import annotations

from .apps import LABELS, AppConfig
from .common import (
    BenchContext,
    Paired,
    Report,
    Spread,
    Table,
    Target,
    fmt_int,
    head_to_head_target,
    paired_ratios,
)
from .http_throughput import ROUTE_TITLES, ROUTES, Run, load, runs_data, servers

#: The baselines and the two variants the targets are about.
PAIR_VARIANTS: tuple[str, ...] = ("bare", "production", "dbpool", "dbpool_instr")
TARGET_VARIANTS: tuple[str, ...] = ("dbpool", "dbpool_instr")


def round_order(round_index: int) -> list[str]:
    """Forward on even rounds, backward on odd ones."""
    order = list(PAIR_VARIANTS)
    return order if round_index % 2 == 0 else order[::-1]


def run(ctx: BenchContext) -> Report:
    profile = ctx.profile
    config = AppConfig(
        url=ctx.database_url, pool_size=profile.pool_size, max_overflow=profile.max_overflow
    )
    cases = [(route, c) for route in ROUTES for c in profile.http_concurrency]
    results: dict[tuple[str, int], dict[str, list[Run]]] = {
        case: {v: [] for v in PAIR_VARIANTS} for case in cases
    }
    rounds = profile.pair_rounds
    ctx.log(
        f"http head to head: {len(PAIR_VARIANTS)} servers, {len(cases)} cases, {rounds} rounds "
        f"of {profile.pair_duration:g} s per variant (~{_minutes(ctx, len(cases)):.0f} min)"
    )
    with servers(list(PAIR_VARIANTS), config) as running:
        if profile.http_warmup > 0:
            for server in running.values():
                for route, concurrency in cases:
                    load(ctx, server, ROUTES[route], concurrency, profile.http_warmup)
        for round_index in range(rounds):
            for route, concurrency in cases:
                for variant in round_order(round_index):
                    results[(route, concurrency)][variant].append(
                        load(
                            ctx,
                            running[variant],
                            ROUTES[route],
                            concurrency,
                            profile.pair_duration,
                        )
                    )
            if (round_index + 1) % 5 == 0 or round_index + 1 == rounds:
                ctx.log(f"http head to head: round {round_index + 1}/{rounds} done")
    report = Report("http_pairs", "1b. HTTP throughput head to head (many short rounds)")
    generator = "wrk -t1" if ctx.use_wrk else "Python load generator"
    for route, concurrency in cases:
        by_variant = results[(route, concurrency)]
        report.tables.append(
            pairs_table(
                f"{ROUTE_TITLES[route]}, {concurrency} connections, {generator}, "
                f"{profile.pair_duration:g} s x {rounds} rounds, pool "
                f"{profile.pool_size}+{profile.max_overflow}",
                by_variant,
            )
        )
        report.targets.extend(pairs_targets(route, concurrency, by_variant))
    report.notes.append(
        "speed = the variant's served req/s / the baseline's in the same round; shown as "
        "median [95% interval of the median] (lowest-highest, rounds where the variant "
        "was faster / rounds). The interval is distribution-free (order statistics); an "
        "interval above 1.00 says the difference is there, not only the median. server "
        "CPU = the uvicorn process's user+system CPU per served request, median."
    )
    report.data = {
        "generator": generator,
        "rounds": rounds,
        "duration_s": profile.pair_duration,
        "runs": runs_data(results),
        "speed": {
            f"{route}@{c}": {
                v: {
                    "vs_bare": _speed(by_variant, v, "bare").as_dict(),
                    "vs_production": _speed(by_variant, v, "production").as_dict(),
                }
                for v in PAIR_VARIANTS
            }
            for (route, c), by_variant in results.items()
        },
    }
    return report


def _minutes(ctx: BenchContext, cases: int) -> float:
    profile = ctx.profile
    # wrk runs whole seconds, plus ~0.3 s to start and read the server's numbers.
    per_run = max(1, round(profile.pair_duration)) + 0.3
    return profile.pair_rounds * cases * len(PAIR_VARIANTS) * per_run / 60


def _speed(by_variant: dict[str, list[Run]], variant: str, baseline: str) -> Paired:
    return paired_ratios(
        [r.rps for r in by_variant[variant]], [r.rps for r in by_variant[baseline]]
    )


def pairs_table(title: str, by_variant: dict[str, list[Run]]) -> Table:
    table = Table(
        title,
        [
            "variant",
            "served req/s",
            "server CPU us/req",
            "speed vs bare",
            "speed vs production",
            "non-2xx/errors",
        ],
    )
    for variant, runs in by_variant.items():
        table.add(
            LABELS[variant],
            fmt_int(Spread.of([r.rps for r in runs]).median),
            fmt_int(Spread.of([r.server_cpu_us for r in runs]).median),
            "1.00x" if variant == "bare" else _speed(by_variant, variant, "bare").ratio_text(),
            "1.00x"
            if variant == "production"
            else _speed(by_variant, variant, "production").ratio_text(),
            f"{sum(r.load.non_2xx for r in runs)}/{sum(r.load.socket_errors for r in runs)}",
        )
    return table


def pairs_targets(route: str, concurrency: int, by_variant: dict[str, list[Run]]) -> list[Target]:
    """The issue's HTTP target, judged on the median of many paired rounds."""
    targets = []
    for variant in TARGET_VARIANTS:
        vs_bare = _speed(by_variant, variant, "bare")
        vs_prod = _speed(by_variant, variant, "production")
        errors = sum(r.load.non_2xx + r.load.socket_errors for r in by_variant[variant])
        targets.append(
            head_to_head_target(
                f"HTTP req/s head to head, {ROUTE_TITLES[route]} @{concurrency}, {LABELS[variant]}",
                "median of paired rounds",
                vs_bare,
                vs_prod,
                f"{errors} non-2xx/errors" if errors else "",
            )
        )
    return targets
