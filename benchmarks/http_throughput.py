"""1. HTTP throughput: uvicorn (uvloop + httptools), one worker per variant, wrk.

Each variant runs in its own uvicorn process, all of them started once and kept up for
the whole comparison; the load generator is another process (wrk, one thread, or the
Python generator of :mod:`benchmarks.loadgen`). Each round runs every (route,
concurrency) case against every variant in rotated order. Throughput counts served (2xx)
requests only: a variant that refuses with 503 (admission control) is not faster for it.
Besides that and wrk's p50/p99, the server process's CPU time per served request is read
from ``/proc`` (steadier than requests/s when something else on the machine takes a core
for a moment), and the connections its pool opened during the run (``/bench/opened``),
which shows pool churn: SQLAlchemy's queue pool closes an overflow connection that comes
back to a full queue, and opens another for the next checkout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .apps import LABELS, READ_ONLY_VARIANTS, VARIANTS, AppConfig
from .common import (
    READ_ONLY_GOAL,
    REPO_ROOT,
    BenchContext,
    Report,
    Spread,
    Table,
    Target,
    deltas,
    fmt_float,
    fmt_int,
    ratios,
    rotated,
)
from .loadgen import LoadResult, run_python, run_wrk

ROUTES = {"select1": "/select1", "pk": "/items/{id}"}
ROUTE_TITLES = {"select1": "SELECT 1", "pk": "primary-key lookup"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class UvicornServer:
    """One variant served by ``uvicorn --factory benchmarks.apps:app_from_env``."""

    def __init__(
        self,
        variant: str,
        config: AppConfig,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
        command_prefix: list[str] | None = None,
    ) -> None:
        self.variant = variant
        self.config = config
        self.extra_env = extra_env or {}
        #: What runs the interpreter (2c: valgrind and its options).
        self.command_prefix = command_prefix or []
        self.port = free_port()
        self.log_path = log_dir / f"{variant}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.interrupted = False

    def start(self) -> None:
        env = {
            **os.environ,
            "BENCH_VARIANT": self.variant,
            "BENCH_DATABASE_URL": self.config.url,
            "BENCH_POOL_SIZE": str(self.config.pool_size),
            "BENCH_MAX_OVERFLOW": str(self.config.max_overflow),
            "BENCH_CHECKOUT_TIMEOUT": str(self.config.checkout_timeout),
            **self.extra_env,
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    *self.command_prefix,
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "benchmarks.apps:app_from_env",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--loop",
                    "uvloop",
                    "--http",
                    "httptools",
                    "--no-access-log",
                    "--log-level",
                    "warning",
                    "--backlog",
                    "4096",
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/health/live"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.variant} server exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.variant} server not ready in {timeout} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def connections_opened(self) -> float:
        """Database connections the server's pool has opened so far (``/bench/opened``)."""
        url = f"http://127.0.0.1:{self.port}/bench/opened"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return float(json.loads(response.read())["connections"])
        except (OSError, ValueError, KeyError):
            return math.nan

    def rss_mib(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return math.nan

    def interrupt(self) -> None:
        """Ask the server to shut down (SIGINT, as Ctrl-C); :meth:`stop` waits for it.

        Once only: a second SIGINT makes uvicorn skip the lifespan shutdown.
        """
        if self.interrupted or self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        self.interrupted = True

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.interrupt()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


@contextlib.contextmanager
def servers(variants: list[str], config: AppConfig) -> Iterator[dict[str, UvicornServer]]:
    with tempfile.TemporaryDirectory(prefix="dbpool-bench-http-") as tmp:
        started = {v: UvicornServer(v, config, Path(tmp)) for v in variants}
        try:
            for server in started.values():
                server.start()
            for server in started.values():
                server.wait_ready()
            yield started
        finally:
            # All at once: each takes a few hundred milliseconds to shut down.
            for server in started.values():
                server.interrupt()
            for server in started.values():
                server.stop()


@dataclass(frozen=True)
class Run:
    """One load run against one variant."""

    load: LoadResult
    server_cpu_us: float
    """The server's CPU per *served* (2xx) request: refusals are part of what serving cost."""
    opened: float
    """Database connections the server's pool opened during the run."""

    @property
    def served(self) -> int:
        return self.load.requests - self.load.non_2xx

    @property
    def rps(self) -> float:
        """Served (2xx) requests per second: a cheap 503 is not throughput."""
        duration = self.load.duration_s
        return self.served / duration if duration > 0 else math.nan

    @property
    def opened_per_1k(self) -> float:
        """Connections opened per 1,000 answered requests (pool churn)."""
        return self.opened / self.load.requests * 1000 if self.load.requests else math.nan


def load(
    ctx: BenchContext, server: UvicornServer, path: str, connections: int, duration: float
) -> Run:
    generate = run_wrk if ctx.use_wrk else run_python
    opened0 = server.connections_opened()
    cpu0 = server.cpu_seconds()
    result = generate(
        server.port,
        path,
        connections=connections,
        duration=duration,
        max_id=ctx.profile.items,
    )
    cpu1 = server.cpu_seconds()
    opened1 = server.connections_opened()
    served = result.requests - result.non_2xx
    per_request = (cpu1 - cpu0) / served * 1e6 if served else math.nan
    return Run(result, per_request, opened1 - opened0)


def run(ctx: BenchContext) -> Report:
    profile = ctx.profile
    config = AppConfig(
        url=ctx.database_url, pool_size=profile.pool_size, max_overflow=profile.max_overflow
    )
    cases = [(route, c) for route in ROUTES for c in profile.http_concurrency]
    results: dict[tuple[str, int], dict[str, list[Run]]] = {
        case: {v: [] for v in VARIANTS} for case in cases
    }
    rss: dict[str, float] = {}
    ctx.log(f"http: starting {len(VARIANTS)} uvicorn servers")
    with servers(list(VARIANTS), config) as running:
        instrumented = _http_metrics_served(running["dbpool_instr"].port)
        if profile.http_warmup > 0:
            for server in running.values():
                for route in ROUTES.values():
                    load(ctx, server, route, max(profile.http_concurrency), profile.http_warmup)
        for round_index in range(ctx.rounds):
            for route, concurrency in cases:
                for variant in rotated(list(VARIANTS), round_index):
                    results[(route, concurrency)][variant].append(
                        load(
                            ctx,
                            running[variant],
                            ROUTES[route],
                            concurrency,
                            profile.http_duration,
                        )
                    )
            ctx.log(f"http: round {round_index + 1}/{ctx.rounds} done")
        rss = {v: s.rss_mib() for v, s in running.items()}
    report = Report("http", "1. HTTP throughput (uvicorn + uvloop + httptools, 1 worker)")
    generator = "wrk -t1" if ctx.use_wrk else "Python load generator"
    for route, concurrency in cases:
        report.tables.append(
            http_table(
                f"{ROUTE_TITLES[route]}, {concurrency} connections, {generator}, "
                f"{profile.http_duration:g} s x {ctx.rounds} rounds, pool "
                f"{profile.pool_size}+{profile.max_overflow}",
                results[(route, concurrency)],
            )
        )
        report.targets.extend(http_targets(route, concurrency, results[(route, concurrency)]))
    report.notes.append(
        "served req/s = 2xx answers per second (a 503 is not throughput); speed = variant "
        "served req/s / baseline served req/s within each round: median (lowest-highest); "
        "server CPU = the uvicorn process's user+system CPU per served request; p50/p99 = "
        "wrk's latency over every answer, refusals included; new conns/1k req = database "
        "connections the server's pool opened per 1,000 answers (pool churn)."
    )
    report.notes.append(
        "instrumentator HTTP metrics on /metrics of the dbpool_instr server: "
        + ("present" if instrumented else "ABSENT (DB_HTTP_METRICS not wired?)")
    )
    report.notes.append(
        "server RSS after the runs (MiB): "
        + ", ".join(f"{v} {fmt_float(m, 0)}" for v, m in rss.items())
    )
    report.data = {
        "generator": generator,
        "instrumentator_metrics_present": instrumented,
        "server_rss_mib": rss,
        "runs": runs_data(results),
    }
    return report


def runs_data(results: dict[tuple[str, int], dict[str, list[Run]]]) -> dict[str, Any]:
    """Every run of every case and variant, as the JSON results keep them."""
    return {
        f"{route}@{c}": {
            v: [
                {
                    **r.load.__dict__,
                    "served_rps": r.rps,
                    "server_cpu_us_per_served": r.server_cpu_us,
                    "connections_opened": r.opened,
                }
                for r in rs
            ]
            for v, rs in by_variant.items()
        }
        for (route, c), by_variant in results.items()
    }


def _http_metrics_served(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return b"http_requests_total" in response.read()
    except OSError:
        return False


def http_table(title: str, by_variant: dict[str, list[Run]]) -> Table:
    table = Table(
        title,
        [
            "variant",
            "served req/s",
            "p50 ms",
            "p99 ms",
            "server CPU us/req",
            "speed vs bare",
            "speed vs production",
            "non-2xx/errors",
            "new conns/1k req",
        ],
    )
    bare = [r.rps for r in by_variant["bare"]]
    production = [r.rps for r in by_variant["production"]]
    for variant, runs in by_variant.items():
        rps = [r.rps for r in runs]
        table.add(
            LABELS[variant],
            fmt_int(Spread.of(rps).median),
            fmt_float(Spread.of([r.load.p50_ms for r in runs]).median),
            fmt_float(Spread.of([r.load.p99_ms for r in runs]).median),
            fmt_int(Spread.of([r.server_cpu_us for r in runs]).median),
            ratios(rps, bare).ratio_text(),
            ratios(rps, production).ratio_text(),
            f"{sum(r.load.non_2xx for r in runs)}/{sum(r.load.socket_errors for r in runs)}",
            fmt_float(Spread.of([r.opened_per_1k for r in runs]).median, 1),
        )
    for name in READ_ONLY_VARIANTS:
        if name in by_variant and "dbpool" in by_variant:
            ro = [r.rps for r in by_variant[name]]
            ro_cpu = [r.server_cpu_us for r in by_variant[name]]
            features_cpu = [r.server_cpu_us for r in by_variant["dbpool"]]
            table.notes.append(
                f"{LABELS[name]} vs {LABELS['dbpool']}: speed "
                f"{ratios(ro, [r.rps for r in by_variant['dbpool']]).ratio_text()}, server CPU "
                f"{deltas(ro_cpu, features_cpu).delta_text(' us')}"
            )
    return table


def http_targets(route: str, concurrency: int, by_variant: dict[str, list[Run]]) -> list[Target]:
    bare = [r.rps for r in by_variant["bare"]]
    production = [r.rps for r in by_variant["production"]]
    targets = []
    for variant in ("dbpool", "dbpool_instr"):
        rps = [r.rps for r in by_variant[variant]]
        vs_bare, vs_prod = ratios(rps, bare), ratios(rps, production)
        errors = sum(r.load.non_2xx + r.load.socket_errors for r in by_variant[variant])
        # Judged in 1b (http_pairs.py): a few rounds of eight variants, each ratio from
        # runs up to half a minute apart, cannot tell a few percent from noise here.
        targets.append(
            Target(
                f"HTTP req/s, {ROUTE_TITLES[route]} @{concurrency}, {LABELS[variant]}",
                ">= 1.00x bare and > 1.00x production (judged head to head: 1b)",
                f"{vs_bare.ratio_text()} bare, {vs_prod.ratio_text()} production"
                + (f", {errors} non-2xx/errors" if errors else ""),
                False if errors else None,
            )
        )
    targets.extend(read_only_target(route, concurrency, by_variant, v) for v in READ_ONLY_VARIANTS)
    return targets


def read_only_target(
    route: str, concurrency: int, by_variant: dict[str, list[Run]], variant: str
) -> Target:
    """Read-only routes: at least 1.5x the production baseline's requests/s."""
    name = f"HTTP req/s, {ROUTE_TITLES[route]} @{concurrency}, {LABELS[variant]}"
    goal = f">= {READ_ONLY_GOAL:.2f}x production"
    if variant not in by_variant:
        return Target(name, goal, "not in this run (or this checkout)", None)
    rps = [r.rps for r in by_variant[variant]]
    vs_bare = ratios(rps, [r.rps for r in by_variant["bare"]])
    vs_prod = ratios(rps, [r.rps for r in by_variant["production"]])
    errors = sum(r.load.non_2xx + r.load.socket_errors for r in by_variant[variant])
    return Target(
        name,
        goal,
        f"{vs_prod.ratio_text()} production, {vs_bare.ratio_text()} bare"
        + (f", {errors} non-2xx/errors" if errors else ""),
        vs_prod.median >= READ_ONLY_GOAL and errors == 0,
    )
