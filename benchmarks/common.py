"""What every comparison shares: sizes, the database, statistics, tables and results.

Absolute numbers on a shared 2-core machine move by 10% or more from run to run, so every
comparison runs its variants side by side in alternating rounds, and reports each
variant's ratio to a reference computed *within* a round: the median of those ratios and
their spread (lowest-highest) over the rounds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: The environment variable naming an existing database to benchmark against.
DATABASE_URL_ENV = "DBPOOL_BENCH_DATABASE_URL"

#: The table of the primary-key lookup route, created (once) by :func:`prepare_database`.
ITEMS_TABLE = "dbpool_bench_items"

#: ``application_name`` of the benchmarks' own admin connections.
ADMIN_APPLICATION_NAME = "dbpool-bench-admin"

#: Issue 5's target for read-only routes: this many times the production baseline.
READ_ONLY_GOAL = 1.5


# -- sizes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How big each comparison is. ``full`` takes about 55 minutes on 2 cores."""

    name: str
    rounds: int
    pool_size: int
    max_overflow: int
    items: int
    # 1. HTTP throughput
    http_duration: float
    http_warmup: float
    http_concurrency: tuple[int, ...]
    # 1b. HTTP head to head: rounds and seconds per run (its own, many short rounds)
    pair_rounds: int
    pair_duration: float
    # 2. in-process overhead and 6. feature costs
    inproc_requests: int
    inproc_concurrency: int
    # 2b. instructions (callgrind): requests per batch; variants (empty: all of them)
    instructions_requests: int
    instructions_variants: tuple[str, ...]
    # 3. checkout
    checkout_samples: int
    contention_waiters: tuple[int, ...]
    contention_checkouts: int
    timeline_seconds: float
    timeline_tasks: int
    oneshot_tasks: int
    # 4. burst
    burst_requests: int
    burst_checkout_timeout: float
    burst_hold: float
    # 5. memory
    memory_connections: int


PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        rounds=3,
        pool_size=10,
        max_overflow=10,
        items=10_000,
        http_duration=4.0,
        http_warmup=1.0,
        http_concurrency=(32, 256),
        pair_rounds=30,
        pair_duration=2.0,
        inproc_requests=1500,
        inproc_concurrency=8,
        instructions_requests=400,
        instructions_variants=(),
        checkout_samples=3000,
        contention_waiters=(10, 100, 1000),
        contention_checkouts=3000,
        timeline_seconds=4.0,
        timeline_tasks=100,
        oneshot_tasks=2000,
        burst_requests=10_000,
        burst_checkout_timeout=2.0,
        burst_hold=0.1,
        memory_connections=50,
    ),
    "quick": Profile(
        name="quick",
        rounds=3,
        pool_size=10,
        max_overflow=10,
        items=10_000,
        http_duration=2.0,
        http_warmup=0.5,
        http_concurrency=(32, 256),
        pair_rounds=8,
        pair_duration=1.0,
        inproc_requests=400,
        inproc_concurrency=8,
        instructions_requests=150,
        instructions_variants=(),
        checkout_samples=1000,
        contention_waiters=(10, 100, 1000),
        contention_checkouts=1200,
        timeline_seconds=1.5,
        timeline_tasks=100,
        oneshot_tasks=1000,
        burst_requests=2000,
        burst_checkout_timeout=1.0,
        burst_hold=0.1,
        memory_connections=20,
    ),
    "smoke": Profile(
        name="smoke",
        rounds=1,
        pool_size=2,
        max_overflow=2,
        items=100,
        http_duration=0.3,
        http_warmup=0.0,
        http_concurrency=(4,),
        pair_rounds=1,
        pair_duration=0.3,
        inproc_requests=10,
        inproc_concurrency=2,
        instructions_requests=20,
        instructions_variants=("bare", "production", "dbpool"),
        checkout_samples=20,
        contention_waiters=(4, 20),
        contention_checkouts=40,
        timeline_seconds=0.3,
        timeline_tasks=10,
        oneshot_tasks=20,
        burst_requests=60,
        burst_checkout_timeout=0.3,
        burst_hold=0.05,
        memory_connections=3,
    ),
}


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = math.ceil(pos)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Spread:
    """The median of per-round values and their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan)
        return cls(statistics.median(finite), min(finite), max(finite))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "low": self.low, "high": self.high}

    def ratio_text(self) -> str:
        """``1.07x (1.02-1.10)``."""
        if not math.isfinite(self.median):
            return "-"
        if self.low == self.high:
            return f"{self.median:.2f}x"
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"

    def delta_text(self, unit: str = "", digits: int = 0) -> str:
        """``+12 us (+8..+15)`` for differences."""
        if not math.isfinite(self.median):
            return "-"
        d = digits
        if self.low == self.high:
            return f"{self.median:+.{d}f}{unit}"
        return f"{self.median:+.{d}f}{unit} ({self.low:+.{d}f}..{self.high:+.{d}f})"


def ratios(values: Sequence[float], reference: Sequence[float]) -> Spread:
    """Per-round ``values[r] / reference[r]``, summarised."""
    return Spread.of([v / r if r else math.nan for v, r in zip(values, reference, strict=True)])


def deltas(values: Sequence[float], reference: Sequence[float]) -> Spread:
    """Per-round ``values[r] - reference[r]``, summarised."""
    return Spread.of([v - r for v, r in zip(values, reference, strict=True)])


@dataclass(frozen=True)
class Paired:
    """Many paired ratios (each measured back to back): median, its 95% interval, range.

    The interval is distribution-free: order statistics of the ratios chosen by the
    binomial distribution (the median lies between the k-th lowest and k-th highest
    ratio with at least 95% probability, whatever the noise's shape). It narrows with
    the number of pairs, where the range only widens: it says whether a difference of a
    few percent is there at all on a machine whose runs move by 15%.
    """

    median: float
    low: float
    high: float
    interval: tuple[float, float]
    wins: int
    pairs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Paired:
        finite = sorted(v for v in values if math.isfinite(v))
        if not finite:
            return cls(math.nan, math.nan, math.nan, (math.nan, math.nan), 0, 0)
        return cls(
            statistics.median(finite),
            finite[0],
            finite[-1],
            median_interval(finite),
            sum(v > 1.0 for v in finite),
            len(finite),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "low": self.low,
            "high": self.high,
            "interval95": list(self.interval),
            "above_1": self.wins,
            "pairs": self.pairs,
        }

    def ratio_text(self) -> str:
        """``1.07x [1.03-1.12] (0.85-1.40, 21/30 > 1)``: median [95% interval] (range)."""
        if not math.isfinite(self.median):
            return "-"
        lo, hi = self.interval
        interval = f" [{lo:.2f}-{hi:.2f}]" if math.isfinite(lo) else ""
        return (
            f"{self.median:.2f}x{interval} ({self.low:.2f}-{self.high:.2f}, "
            f"{self.wins}/{self.pairs} > 1)"
        )


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free ``confidence`` interval of the median of ``values``.

    ``(x[k], x[n-1-k])`` of the sorted values, with the largest ``k`` for which
    P(Binomial(n, 1/2) <= k) <= (1 - confidence) / 2 (NaNs when there are too few values
    for any such k: fewer than 6 at 95%).
    """
    ordered = sorted(values)
    n = len(ordered)
    tail = (1.0 - confidence) / 2.0
    k = -1
    below = 0.0
    for i in range(n // 2):
        below += math.comb(n, i) / 2.0**n
        if below > tail:
            break
        k = i
    if k < 0:
        return (math.nan, math.nan)
    return (ordered[k], ordered[n - 1 - k])


def paired_ratios(values: Sequence[float], reference: Sequence[float]) -> Paired:
    """Per-pair ``values[i] / reference[i]`` with their median's 95% interval."""
    return Paired.of([v / r if r else math.nan for v, r in zip(values, reference, strict=True)])


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    """``items`` rotated by the round number: no variant always runs first (or last)."""
    if not items:
        return []
    k = round_index % len(items)
    return [*items[k:], *items[:k]]


def fmt_int(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.0f}"


def fmt_float(value: float, digits: int = 2) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.{digits}f}"


# -- reporting ----------------------------------------------------------------------------


@dataclass
class Table:
    """A titled table of strings, printed with aligned columns."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))

        def line(cells: Sequence[str]) -> str:
            parts = [
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(cells)
            ]
            return "  ".join(parts).rstrip()

        out = [self.title, line(self.columns), line(["-" * w for w in widths])]
        out.extend(line(row) for row in self.rows)
        out.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |"]
        out.append("| " + " | ".join(["---"] + ["---:"] * (len(self.columns) - 1)) + " |")
        out.extend("| " + " | ".join(row) + " |" for row in self.rows)
        if self.notes:
            out.append("")
            out.extend(f"- {n}" for n in self.notes)
        return "\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Target:
    """One target of the issue, checked against this run: met, missed or not measurable."""

    name: str
    goal: str
    measured: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return {True: "MET", False: "MISSED", None: "n/a"}[self.met]


def head_to_head_target(
    name: str, judged_on: str, vs_bare: Paired, vs_production: Paired, errors: str = ""
) -> Target:
    """The issue's "at least as fast as bare, ahead of production" target, from paired speeds.

    ``errors`` names failed requests (``"3 errors"``); any makes the target missed.
    """
    return Target(
        name,
        f">= 1.00x bare and > 1.00x production ({judged_on})",
        f"{vs_bare.ratio_text()} bare, {vs_production.ratio_text()} production"
        + (f", {errors}" if errors else ""),
        vs_bare.median >= 1.0 and vs_production.median > 1.0 and not errors,
    )


@dataclass
class Report:
    """What one comparison found."""

    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def render(self) -> str:
        out = [f"== {self.title} ==", ""]
        for table in self.tables:
            out += [table.render(), ""]
        if self.targets:
            t = Table("targets", ["target", "goal", "measured", "verdict"])
            for target in self.targets:
                t.add(target.name, target.goal, target.measured, target.verdict)
            out += [t.render(), ""]
        out.extend(f"* {n}" for n in self.notes)
        return "\n".join(out).rstrip() + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "seconds": round(self.seconds, 1),
            "tables": [t.as_dict() for t in self.tables],
            "targets": [{**dataclasses.asdict(t), "verdict": t.verdict} for t in self.targets],
            "notes": self.notes,
            "data": self.data,
        }


@dataclass
class BenchContext:
    """What a comparison needs: its sizes, the database and where to say what it does."""

    profile: Profile
    database_url: str
    """SQLAlchemy URL (``postgresql+asyncpg://``) of the benchmark database."""
    use_wrk: bool = True
    verbose: bool = True

    @property
    def rounds(self) -> int:
        return self.profile.rounds

    @property
    def asyncpg_dsn(self) -> str:
        return asyncpg_dsn(self.database_url)

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(report: Report, results_dir: Path, stamp: str, extra: dict[str, Any]) -> Path:
    """Write one comparison's results as ``<results_dir>/<stamp>-<name>.json``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stamp}-{report.name}.json"
    path.write_text(json.dumps({**extra, **report.as_dict()}, indent=2, default=str) + "\n")
    return path


# -- the database -------------------------------------------------------------------------


def sqlalchemy_url(url: str) -> str:
    """``url`` with the asyncpg driver, password kept."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> str:
    """``url`` as a plain ``postgresql://`` DSN for asyncpg."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def bench_database(url: str | None, max_connections: int = 400) -> Iterator[str]:
    """The database to benchmark: ``url``, or an embedded PostgreSQL started for the run.

    The embedded server is ephemeral (no fsync) and lives in a temporary directory that is
    removed afterwards; it allows ``max_connections`` so several variants' pools fit.
    """
    if url:
        yield sqlalchemy_url(url)
        return
    from fastapi_dbpool.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="dbpool-bench-") as tmp:
        # The server may run as an unprivileged user: it must be able to enter the dir.
        os.chmod(tmp, 0o755)
        server = EmbeddedPostgres(
            Path(tmp) / "data", ephemeral=True, max_connections=max_connections
        )
        server.start()
        try:
            yield server.url()
        finally:
            server.stop()


async def prepare_database(url: str, items: int) -> str:
    """Create and fill the items table when needed; return the server version."""
    conn = await asyncpg.connect(
        asyncpg_dsn(url), server_settings={"application_name": ADMIN_APPLICATION_NAME}
    )
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {ITEMS_TABLE} ("
            " id integer PRIMARY KEY, name text NOT NULL, price_cents integer NOT NULL)"
        )
        count = await conn.fetchval(f"SELECT count(*) FROM {ITEMS_TABLE}")
        if count < items:
            await conn.execute(
                f"INSERT INTO {ITEMS_TABLE} (id, name, price_cents)"
                " SELECT g, 'item ' || g, (g * 7919) % 10000 FROM generate_series(1, $1) g"
                " ON CONFLICT (id) DO NOTHING",
                items,
            )
            await conn.execute(f"ANALYZE {ITEMS_TABLE}")
        version = await conn.fetchval("SHOW server_version")
        return str(version)
    finally:
        await conn.close()


async def backend_count(url: str, application_name: str | None = None) -> int:
    """Connections to the server now (of one ``application_name``, when given)."""
    conn = await asyncpg.connect(
        asyncpg_dsn(url), server_settings={"application_name": ADMIN_APPLICATION_NAME}
    )
    try:
        if application_name is None:
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            )
        else:
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                application_name,
            )
        return int(n)
    finally:
        await conn.close()


# -- the library's optional features, detected rather than assumed ------------------------


def feature_status() -> dict[str, str]:
    """Which optional features of fastapi_dbpool this checkout has.

    Features still being built are reported as such instead of benchmarked as if they
    existed: a settings field alone is not the feature.
    """
    import inspect

    import fastapi_dbpool as dbpool

    fields = {f.name for f in dataclasses.fields(dbpool.DBPoolSettings)}
    status: dict[str, str] = {}
    has_leaks_module = importlib.util.find_spec("fastapi_dbpool.leaks") is not None
    if "leak_track_stack" in fields and has_leaks_module:
        status["leak_tracking"] = "implemented"
    elif "leak_track_stack" in fields:
        status["leak_tracking"] = (
            "not implemented yet (settings field leak_track_stack exists, "
            "no fastapi_dbpool.leaks module)"
        )
    else:
        status["leak_tracking"] = "not implemented yet (no leak_track_stack setting)"
    status["http_metrics"] = (
        "implemented (DB_HTTP_METRICS)" if "http_metrics" in fields else "not implemented yet"
    )
    # The documented dependency is Depends(dbpool.session(read_only=True)); an exported
    # error class or a settings field alone is not the feature.
    if "read_only" in inspect.signature(dbpool.session).parameters:
        status["read_only_routes"] = "implemented (read_only)"
    else:
        status["read_only_routes"] = "not implemented yet (no dbpool.session(read_only=...))"
    status["opentelemetry"] = (
        "implemented"
        if importlib.util.find_spec("fastapi_dbpool.telemetry") is not None
        else "not implemented yet (no fastapi_dbpool.telemetry module)"
    )
    return status


def dbpool_settings_fields() -> set[str]:
    import fastapi_dbpool as dbpool

    return {f.name for f in dataclasses.fields(dbpool.DBPoolSettings)}


# -- the machine --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages = {}
    for name in (
        "fastapi-dbpool",
        "fastapi",
        "starlette",
        "SQLAlchemy",
        "asyncpg",
        "uvicorn",
        "uvloop",
        "httptools",
        "httpx",
        "prometheus-fastapi-instrumentator",
        "prometheus-client",
        "greenlet",
    ):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "not installed"
    try:
        mem_kib = int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
    except (OSError, StopIteration, ValueError):
        mem_kib = 0
    return {
        "library_revision": _revision(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": packages,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _revision() -> str:
    """The library's git commit, and whether its files differ from it."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fastapi_dbpool"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


# -- running ASGI apps in process ---------------------------------------------------------


ASGIApp = Callable[..., Any]


@asynccontextmanager
async def running(app: ASGIApp) -> AsyncIterator[ASGIApp]:
    """Run ``app``'s lifespan; yield an ASGI app that gives requests the lifespan state.

    What uvicorn does for the lifespan ``state``, without a server: each request gets a
    shallow copy of it in ``scope["state"]``.
    """
    state: dict[str, Any] = {}
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: dict[str, Any]) -> None:
        await outbox.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    await inbox.put({"type": "lifespan.startup"})
    message = await _lifespan_reply(outbox, task)
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"startup failed: {message.get('message')}")

    async def with_state(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "state": dict(state)}
        await app(scope, receive, send)

    # Where validations() finds the library's runtime, when the app is the library's.
    setattr(with_state, "lifespan_state", state)  # noqa: B010 (a function's attribute)
    try:
        yield with_state
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        message = await _lifespan_reply(outbox, task)
        await task
        if message["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"shutdown failed: {message.get('message')}")


def validations(app: ASGIApp) -> Callable[[], int] | None:
    """For an app from ``running``: how many idle validations its pools have made so far.

    None for an app that is not the library's. Idle validation (``DB_PRE_PING_IDLE``,
    0.5 s by default) pings a connection that sat idle that long before handing it out: a
    benchmark that leaves a variant idle between its batches makes it pay that round trip
    where a service under load does not, and reports how often it did.
    """
    from fastapi_dbpool.context import STATE_KEY

    state = getattr(app, "lifespan_state", None) or {}
    runtime = state.get(STATE_KEY)
    if runtime is None:
        return None
    pools = [db.stats for db in runtime.databases.values()]
    return lambda: sum(stats.validations for stats in pools)


async def _lifespan_reply(
    outbox: asyncio.Queue[dict[str, Any]], task: asyncio.Task[Any]
) -> dict[str, Any]:
    getter = asyncio.ensure_future(outbox.get())
    done, _ = await asyncio.wait({getter, task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    if task in done:
        task.result()
        raise RuntimeError("the app's lifespan ended without answering")
    raise TimeoutError("the app's lifespan did not answer within 60 s")


@dataclass
class Answer:
    """One in-process response."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    error: BaseException | None = None


async def asgi_get(app: ASGIApp, path: str) -> Answer:
    """GET ``path`` from ``app`` directly through ASGI: no client library, no socket.

    Costs a few microseconds, where httpx's ASGI transport costs ~170: the burst uses it
    so that the 10,000 requests measure the server side, not the client. ``receive``
    blocks after the request body until the response is complete, as a connected client
    does. An exception after the response started (Starlette re-raises after its 500)
    keeps the status that was sent.
    """
    query = b""
    if "?" in path:
        path, _, q = path.partition("?")
        query = q.encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 50000),
        "server": ("bench", 80),
    }
    done = asyncio.Event()
    sent_request = False
    answer = Answer(0, {}, b"")
    body: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = dict(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    try:
        await app(scope, receive, send)
    except Exception as exc:
        answer.error = exc
    finally:
        done.set()
    answer.body = b"".join(body)
    return answer


def run_async(main: Callable[[], Any]) -> Any:
    """Run ``main()`` on uvloop, as uvicorn[standard] serves production (asyncio without it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())
