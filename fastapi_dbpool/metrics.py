"""Prometheus metrics: a collector read at scrape time, the /metrics route, HTTP metrics.

One process: one :class:`DBPoolCollector` per ``CollectorRegistry`` reads the pools,
breakers and counters of every runtime attached to it when the registry is scraped. A
checkout pays nothing for Prometheus: the numbers are the plain integers and histograms of
:mod:`fastapi_dbpool.pool`, kept anyway.

Several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set, e.g. gunicorn with uvicorn
workers): a custom collector only sees its own process, so each worker copies the same
numbers into prometheus_client's multiprocess metrics every :data:`SYNC_INTERVAL` seconds
(and the worker serving a scrape just before it), and ``/metrics`` serves the
``MultiProcessCollector`` of the whole directory: any worker reports the whole pod.

The HTTP metrics are prometheus-fastapi-instrumentator's, brought by DBPoolMiddleware
through :class:`HTTPMetrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_fastapi_instrumentator import metrics as instrumentator_metrics
from prometheus_fastapi_instrumentator.middleware import PrometheusInstrumentatorMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .breaker import BreakerState
from .context import STATE_KEY
from .errors import ConfigurationError, NotInstalledError
from .leaks import LEAK_KINDS, LeakTracker
from .pool import USE_BUCKETS, WAIT_BUCKETS
from .runtime import DBPoolRuntime

if TYPE_CHECKING:
    from .engines import Database
    from .probe import DatabaseProbe

logger = logging.getLogger("fastapi_dbpool")

# -- names: the contract's families first, then ours -------------------------------------

CONNECTIONS = "dbpool_connections"
CONNECTIONS_MAX = "dbpool_connections_max"
PENDING_REQUESTS = "dbpool_pending_requests"
CHECKOUT_WAIT = "dbpool_checkout_wait_seconds"
CHECKOUT_TIMEOUTS = "dbpool_checkout_timeouts_total"
STATEMENT_TIMEOUTS = "dbpool_statement_timeouts_total"
LEAKS = "dbpool_leaks_total"
LEAKS_RECLAIMED = "dbpool_leaks_reclaimed_total"
BREAKER_STATE = "dbpool_circuit_breaker_state"
BREAKER_TRANSITIONS = "dbpool_circuit_breaker_transitions_total"
BREAKER_REJECTIONS = "dbpool_circuit_breaker_rejections_total"
CONNECT_FAILURES = "dbpool_connect_failures_total"
CONNECTION_USE = "dbpool_connection_use_seconds"
CONNECTION_CREATE = "dbpool_connection_create_seconds"
PROBE_UP = "dbpool_probe_up"

#: The HTTP families of prometheus-fastapi-instrumentator that the contract names.
HTTP_REQUESTS = "http_requests_total"
HTTP_DURATION = "http_request_duration_seconds"

DATABASE = "database"
STATE = "state"
KIND = "kind"
FROM = "from"
TO = "to"

IDLE = "idle"
USED = "used"
BREAKER_STATES: tuple[str, ...] = tuple(s.value for s in BreakerState)
#: Transitions the breaker can make, exported at 0 from the start so that the first one
#: shows as an increase.
BREAKER_MOVES: tuple[tuple[str, str], ...] = (
    (BreakerState.CLOSED.value, BreakerState.OPEN.value),
    (BreakerState.OPEN.value, BreakerState.HALF_OPEN.value),
    (BreakerState.OPEN.value, BreakerState.CLOSED.value),
    (BreakerState.HALF_OPEN.value, BreakerState.CLOSED.value),
    (BreakerState.HALF_OPEN.value, BreakerState.OPEN.value),
)

HELP: dict[str, str] = {
    CONNECTIONS: "Pooled connections by state (idle in the pool, used: checked out).",
    CONNECTIONS_MAX: "Largest number of connections the pool may open (pool_size + max_overflow).",
    PENDING_REQUESTS: "Tasks waiting for a connection from the pool now.",
    CHECKOUT_WAIT: "Seconds a checkout took to get a connection.",
    CHECKOUT_TIMEOUTS: "Checkouts that gave up after DB_CHECKOUT_TIMEOUT (answered 503).",
    STATEMENT_TIMEOUTS: "Statements cancelled by their timeout (answered 504).",
    LEAKS: "Sessions or connections reported as leaked, by kind.",
    LEAKS_RECLAIMED: "Leaked connections taken back from their holder (DB_LEAK_RECLAIM_AFTER).",
    BREAKER_STATE: "1 for the circuit breaker's current state, 0 for the others.",
    BREAKER_TRANSITIONS: "Circuit breaker state changes.",
    BREAKER_REJECTIONS: "Calls the circuit breaker refused without trying the database.",
    CONNECT_FAILURES: "Attempts to open a connection that failed at the connection level.",
    CONNECTION_USE: "Seconds a connection stayed checked out.",
    CONNECTION_CREATE: "Seconds it took to open a new connection.",
    PROBE_UP: "1 when the last background probe of the database succeeded, else 0.",
}

#: Where DBPoolMiddleware leaves its registry for the lifespan (``app.state``), and where
#: the lifespan leaves the exporter for the /metrics route (the lifespan state).
_REGISTRY_ATTR = "fastapi_dbpool_registry"
EXPORTER_STATE_KEY = "fastapi_dbpool.metrics"

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Multiprocess mode: seconds between two copies of a worker's pool numbers into the
#: shared files. Another worker's scrape sees them at most this old; a scrape every
#: 15-60 s never notices, and the copy costs ~60 µs per database.
SYNC_INTERVAL = 1.0

# -- reading the numbers ------------------------------------------------------------------


@dataclass(slots=True)
class _Buckets:
    """A histogram read at one instant: cumulative (le, count) pairs and the sum."""

    cumulative: list[tuple[str, int]]
    sum: float

    def add(self, other: _Buckets) -> None:
        self.cumulative = [
            (le, n + m) for (le, n), (_, m) in zip(self.cumulative, other.cumulative, strict=True)
        ]
        self.sum += other.sum

    def per_bucket(self) -> list[int]:
        counts = [n for _, n in self.cumulative]
        return [n - prev for n, prev in zip(counts, [0, *counts[:-1]], strict=True)]


@dataclass(slots=True)
class _Reading:
    """One database's numbers at one instant; readings of the same name add up."""

    idle: int = 0
    used: int = 0
    max: int = 0
    pending: int = 0
    checkout_timeouts: int = 0
    statement_timeouts: int = 0
    connect_failures: int = 0
    rejections: int = 0
    leaks: dict[str, float] = field(default_factory=dict)
    reclaimed: int = 0
    moves: dict[tuple[str, str], int] = field(default_factory=dict)
    breaker: set[str] = field(default_factory=set)
    probe_up: int | None = None
    histograms: dict[str, _Buckets] = field(default_factory=dict)

    def add(self, other: _Reading) -> None:
        """Fold another runtime's reading of the same database name into this one."""
        self.idle += other.idle
        self.used += other.used
        self.max += other.max
        self.pending += other.pending
        self.checkout_timeouts += other.checkout_timeouts
        self.statement_timeouts += other.statement_timeouts
        self.connect_failures += other.connect_failures
        self.rejections += other.rejections
        for kind, n in other.leaks.items():
            self.leaks[kind] = self.leaks.get(kind, 0) + n
        self.reclaimed += other.reclaimed
        for move, n in other.moves.items():
            self.moves[move] = self.moves.get(move, 0) + n
        # Several pools under one name: every state some breaker is in reads 1.
        self.breaker |= other.breaker
        if other.probe_up is not None:
            self.probe_up = (
                other.probe_up if self.probe_up is None else min(self.probe_up, other.probe_up)
            )
        for name, buckets in other.histograms.items():
            mine = self.histograms.get(name)
            if mine is None:
                self.histograms[name] = _Buckets(list(buckets.cumulative), buckets.sum)
            else:
                mine.add(buckets)


def _read(db: Database, probe: DatabaseProbe | None) -> _Reading:
    status = db.pool_status()
    stats = db.stats
    breaker = db.breaker
    moves = dict.fromkeys(BREAKER_MOVES, 0)
    moves.update(dict(breaker.transitions))
    ok = None if probe is None else probe.result.ok
    tracker = getattr(db, "leaks", None)
    return _Reading(
        idle=status["idle"],
        used=status["checked_out"],
        max=status["max"],
        pending=status["waiting"],
        checkout_timeouts=stats.checkout_timeouts,
        statement_timeouts=stats.statement_timeouts,
        connect_failures=stats.connect_failures,
        rejections=breaker.rejected,
        leaks=_leak_counts(db.name, tracker),
        reclaimed=tracker.reclaimed.get(db.name, 0) if isinstance(tracker, LeakTracker) else 0,
        moves=moves,
        breaker={breaker.state.value},
        probe_up=None if ok is None else int(ok),
        histograms={
            CHECKOUT_WAIT: _Buckets(stats.wait_time.cumulative(), stats.wait_time.sum),
            CONNECTION_USE: _Buckets(stats.use_time.cumulative(), stats.use_time.sum),
            CONNECTION_CREATE: _Buckets(stats.create_time.cumulative(), stats.create_time.sum),
        },
    )


def _leak_counts(name: str, tracker: object) -> dict[str, float]:
    # Every kind from the start, at 0, so that the first leak shows as an increase.
    if not isinstance(tracker, LeakTracker):
        return {}
    counts = dict.fromkeys(LEAK_KINDS, 0.0)
    for (database, kind), n in dict(tracker.counts).items():
        if database == name:
            counts[kind] = counts.get(kind, 0.0) + n
    return counts


def _read_all(runtimes: list[DBPoolRuntime]) -> dict[str, _Reading]:
    readings: dict[str, _Reading] = {}
    for runtime in runtimes:
        for name, db in list(runtime.databases.items()):
            reading = _read(db, runtime.probes.get(name))
            if name in readings:
                readings[name].add(reading)
            else:
                readings[name] = reading
    return readings


def _render(readings: Mapping[str, _Reading]) -> list[Metric]:
    connections = GaugeMetricFamily(CONNECTIONS, HELP[CONNECTIONS], labels=[DATABASE, STATE])
    maximum = GaugeMetricFamily(CONNECTIONS_MAX, HELP[CONNECTIONS_MAX], labels=[DATABASE])
    pending = GaugeMetricFamily(PENDING_REQUESTS, HELP[PENDING_REQUESTS], labels=[DATABASE])
    histograms = {
        name: HistogramMetricFamily(name, HELP[name], labels=[DATABASE])
        for name in (CHECKOUT_WAIT, CONNECTION_USE, CONNECTION_CREATE)
    }
    checkout_timeouts = CounterMetricFamily(
        CHECKOUT_TIMEOUTS, HELP[CHECKOUT_TIMEOUTS], labels=[DATABASE]
    )
    statement_timeouts = CounterMetricFamily(
        STATEMENT_TIMEOUTS, HELP[STATEMENT_TIMEOUTS], labels=[DATABASE]
    )
    leaks = CounterMetricFamily(LEAKS, HELP[LEAKS], labels=[DATABASE, KIND])
    reclaimed = CounterMetricFamily(LEAKS_RECLAIMED, HELP[LEAKS_RECLAIMED], labels=[DATABASE])
    breaker = GaugeMetricFamily(BREAKER_STATE, HELP[BREAKER_STATE], labels=[DATABASE, STATE])
    moves = CounterMetricFamily(
        BREAKER_TRANSITIONS, HELP[BREAKER_TRANSITIONS], labels=[DATABASE, FROM, TO]
    )
    rejections = CounterMetricFamily(
        BREAKER_REJECTIONS, HELP[BREAKER_REJECTIONS], labels=[DATABASE]
    )
    connect_failures = CounterMetricFamily(
        CONNECT_FAILURES, HELP[CONNECT_FAILURES], labels=[DATABASE]
    )
    probe_up = GaugeMetricFamily(PROBE_UP, HELP[PROBE_UP], labels=[DATABASE])
    for name, r in sorted(readings.items()):
        connections.add_metric([name, IDLE], r.idle)
        connections.add_metric([name, USED], r.used)
        maximum.add_metric([name], r.max)
        pending.add_metric([name], r.pending)
        for family, buckets in histograms.items():
            hist = r.histograms[family]
            buckets.add_metric([name], hist.cumulative, sum_value=hist.sum)
        checkout_timeouts.add_metric([name], r.checkout_timeouts)
        statement_timeouts.add_metric([name], r.statement_timeouts)
        for kind, n in sorted(r.leaks.items()):
            leaks.add_metric([name, kind], n)
        reclaimed.add_metric([name], r.reclaimed)
        for state in BREAKER_STATES:
            breaker.add_metric([name, state], 1 if state in r.breaker else 0)
        for (old, new), n in sorted(r.moves.items()):
            moves.add_metric([name, old, new], n)
        rejections.add_metric([name], r.rejections)
        connect_failures.add_metric([name], r.connect_failures)
        if r.probe_up is not None:
            probe_up.add_metric([name], r.probe_up)
    return [
        connections,
        maximum,
        pending,
        histograms[CHECKOUT_WAIT],
        checkout_timeouts,
        statement_timeouts,
        leaks,
        breaker,
        reclaimed,
        moves,
        rejections,
        connect_failures,
        histograms[CONNECTION_USE],
        histograms[CONNECTION_CREATE],
        probe_up,
    ]


# -- one process: a collector per registry ------------------------------------------------


class DBPoolCollector:
    """Reads the attached runtimes' pools when its registry is scraped.

    Runtimes with the same database name (two apps on one registry) add up, as the
    workers of a pod do; a runtime that is garbage-collected drops out by itself.
    """

    def __init__(self) -> None:
        self._runtimes: weakref.WeakSet[DBPoolRuntime] = weakref.WeakSet()
        # Scrapes may come from another thread (prometheus_client's own HTTP server).
        self._lock = threading.Lock()

    def attach(self, runtime: DBPoolRuntime) -> None:
        """Report ``runtime``'s databases from now on."""
        with self._lock:
            self._runtimes.add(runtime)

    def detach(self, runtime: DBPoolRuntime) -> None:
        """Stop reporting ``runtime``."""
        with self._lock:
            self._runtimes.discard(runtime)

    def describe(self) -> list[Metric]:
        """The families, without samples (the registry checks names against these)."""
        return _render({})

    def collect(self) -> list[Metric]:
        """Every family, read now; described but empty when nothing is attached."""
        with self._lock:
            runtimes = list(self._runtimes)
        return _render(_read_all(runtimes))


# A CollectorRegistry is process-wide by nature; keying on it (weakly) gives each one
# exactly one collector however many apps, lifespans or rebuilt stacks use it.
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, DBPoolCollector] = (
    weakref.WeakKeyDictionary()
)
_http_instrumentations: weakref.WeakKeyDictionary[CollectorRegistry, Callable[[Any], None]] = (
    weakref.WeakKeyDictionary()
)
_registries_lock = threading.Lock()


def collector_for(registry: CollectorRegistry) -> DBPoolCollector:
    """The registry's collector, registered on first use.

    Raises:
        ConfigurationError: Something else already registered a ``dbpool_*`` name there.
    """
    with _registries_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = DBPoolCollector()
            try:
                registry.register(collector)
            except ValueError as exc:
                raise ConfigurationError(
                    f"cannot register the fastapi_dbpool metrics in this CollectorRegistry: {exc}"
                ) from None
            _collectors[registry] = collector
        return collector


# -- several processes: each worker's numbers in the shared files -------------------------


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when prometheus_client runs in multiprocess mode.

    Raises:
        ConfigurationError: The variable names no directory, or was set only after
            prometheus_client was imported (it picks its mode once, at import).
    """
    path = os.environ.get(_MULTIPROC_ENV)
    if not path:
        return None
    if not os.path.isdir(path):
        raise ConfigurationError(f"{_MULTIPROC_ENV} is not a directory: {path!r}")
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise ConfigurationError(
            f"{_MULTIPROC_ENV} is set, but prometheus_client was imported before it was and "
            "runs in single-process mode: set it in the server's environment, not in code"
        )
    return path


class _ProcessMirror:
    """This worker's pool numbers as prometheus_client multiprocess metrics.

    Gauges are ``livesum`` (connections, max and waiters add up over the pod's live
    workers; a dead worker's drop out once ``mark_process_dead`` ran) or ``livemax``
    (breaker state: 1 when any worker's breaker is in that state; probe: 1 when any
    worker's probe succeeds). Counters and histograms grow by what the pools counted
    since the last sync and keep a dead worker's share, as counters should.
    """

    def __init__(self) -> None:
        self._runtimes: weakref.WeakSet[DBPoolRuntime] = weakref.WeakSet()
        self._last: weakref.WeakKeyDictionary[Database, _Reading] = weakref.WeakKeyDictionary()
        self._names: set[str] = set()
        self._lock = threading.Lock()

        def gauge(name: str, labels: list[str], mode: Literal["livesum", "livemax"]) -> Gauge:
            return Gauge(name, HELP[name], labels, registry=None, multiprocess_mode=mode)

        def counter(name: str, labels: list[str]) -> Counter:
            return Counter(name, HELP[name], labels, registry=None)

        def histogram(name: str, bounds: tuple[float, ...]) -> Histogram:
            return Histogram(name, HELP[name], [DATABASE], registry=None, buckets=bounds)

        self.connections = gauge(CONNECTIONS, [DATABASE, STATE], "livesum")
        self.maximum = gauge(CONNECTIONS_MAX, [DATABASE], "livesum")
        self.pending = gauge(PENDING_REQUESTS, [DATABASE], "livesum")
        self.breaker = gauge(BREAKER_STATE, [DATABASE, STATE], "livemax")
        self.probe_up = gauge(PROBE_UP, [DATABASE], "livemax")
        self.checkout_timeouts = counter(CHECKOUT_TIMEOUTS, [DATABASE])
        self.statement_timeouts = counter(STATEMENT_TIMEOUTS, [DATABASE])
        self.leaks = counter(LEAKS, [DATABASE, KIND])
        self.reclaimed = counter(LEAKS_RECLAIMED, [DATABASE])
        self.moves = counter(BREAKER_TRANSITIONS, [DATABASE, FROM, TO])
        self.rejections = counter(BREAKER_REJECTIONS, [DATABASE])
        self.connect_failures = counter(CONNECT_FAILURES, [DATABASE])
        self.histograms = {
            CHECKOUT_WAIT: histogram(CHECKOUT_WAIT, WAIT_BUCKETS),
            CONNECTION_USE: histogram(CONNECTION_USE, USE_BUCKETS),
            CONNECTION_CREATE: histogram(CONNECTION_CREATE, WAIT_BUCKETS),
        }

    def attach(self, runtime: DBPoolRuntime) -> None:
        with self._lock:
            self._runtimes.add(runtime)

    def detach(self, runtime: DBPoolRuntime) -> None:
        with self._lock:
            self._runtimes.discard(runtime)

    def sync(self) -> None:
        """Write this worker's current numbers to its files."""
        with self._lock:
            current: dict[str, _Reading] = {}
            for runtime in list(self._runtimes):
                for name, db in list(runtime.databases.items()):
                    reading = _read(db, runtime.probes.get(name))
                    self._grow(name, reading, self._last.get(db))
                    self._last[db] = reading
                    if name in current:
                        current[name].add(reading)
                    else:
                        current[name] = reading
            for name in sorted(self._names | current.keys()):
                # A name no attached runtime has any more reads 0: a file cannot forget.
                self._set_gauges(name, current.get(name))
            self._names |= current.keys()

    def _grow(self, name: str, now: _Reading, before: _Reading | None) -> None:
        was = before or _Reading()

        def grow(counter: Counter, labels: tuple[str, ...], new: float, old: float) -> None:
            child = counter.labels(*labels)  # made (at 0) the first time: series exist early
            if new > old:
                child.inc(new - old)

        grow(self.checkout_timeouts, (name,), now.checkout_timeouts, was.checkout_timeouts)
        grow(self.statement_timeouts, (name,), now.statement_timeouts, was.statement_timeouts)
        grow(self.rejections, (name,), now.rejections, was.rejections)
        grow(self.reclaimed, (name,), now.reclaimed, was.reclaimed)
        grow(self.connect_failures, (name,), now.connect_failures, was.connect_failures)
        for kind, n in now.leaks.items():
            grow(self.leaks, (name, kind), n, was.leaks.get(kind, 0))
        for (old, new), n in now.moves.items():
            grow(self.moves, (name, old, new), n, was.moves.get((old, new), 0))
        for family, buckets in now.histograms.items():
            previous = was.histograms.get(family)
            counts = buckets.per_bucket()
            before_counts = previous.per_bucket() if previous else [0] * len(counts)
            _add_observations(
                self.histograms[family].labels(name),
                [n - m for n, m in zip(counts, before_counts, strict=True)],
                buckets.sum - (previous.sum if previous else 0.0),
            )

    def _set_gauges(self, name: str, reading: _Reading | None) -> None:
        r = reading or _Reading()
        self.connections.labels(name, IDLE).set(r.idle)
        self.connections.labels(name, USED).set(r.used)
        self.maximum.labels(name).set(r.max)
        self.pending.labels(name).set(r.pending)
        for state in BREAKER_STATES:
            self.breaker.labels(name, state).set(1 if state in r.breaker else 0)
        if reading is None:
            self.probe_up.labels(name).set(0)
        elif r.probe_up is not None:
            self.probe_up.labels(name).set(r.probe_up)


def _add_observations(child: Histogram, per_bucket: list[int], sum_delta: float) -> None:
    # prometheus_client cannot add n observations to a bucket at once (observe() takes one
    # value); its Histogram keeps one non-cumulative value per bucket plus the sum, which
    # is exactly what the pool's histogram counted since the last sync.
    bucket_values: list[Any] = child._buckets
    if len(bucket_values) != len(per_bucket):
        raise RuntimeError("prometheus_client's Histogram layout changed; cannot mirror")
    for value, n in zip(bucket_values, per_bucket, strict=True):
        if n > 0:
            value.inc(n)
    if sum_delta > 0:
        child._sum.inc(sum_delta)


_mirror: _ProcessMirror | None = None


def _process_mirror() -> _ProcessMirror:
    # One per process: prometheus_client keys the files by metric name and labels, so a
    # second set of the same metrics in this process would overwrite the first.
    global _mirror
    with _registries_lock:
        if _mirror is None:
            _mirror = _ProcessMirror()
        return _mirror


# -- one app's metrics while it runs ------------------------------------------------------


class MetricsExporter:
    """One runtime's metrics for as long as its app runs; the lifespan starts and stops it.

    Attributes:
        registry: Where the pool collector and the HTTP metrics live.
        multiprocess: True under ``PROMETHEUS_MULTIPROC_DIR``: /metrics serves the pod.
    """

    def __init__(self, runtime: DBPoolRuntime, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.multiprocess = multiprocess_dir() is not None
        self._runtime = runtime
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def start(
        cls,
        runtime: DBPoolRuntime,
        registry: CollectorRegistry,
        *,
        sync_interval: float = SYNC_INTERVAL,
    ) -> MetricsExporter:
        """Attach ``runtime`` to ``registry``'s collector, or in multiprocess mode to this
        worker's mirror, synced now and every ``sync_interval`` seconds.

        Raises:
            ConfigurationError: The registry or ``PROMETHEUS_MULTIPROC_DIR`` cannot be used.
        """
        exporter = cls(runtime, registry)
        if not exporter.multiprocess:
            collector_for(registry).attach(runtime)
            return exporter
        mirror = _process_mirror()
        mirror.attach(runtime)
        mirror.sync()
        exporter._task = asyncio.get_running_loop().create_task(
            _sync_every(mirror, sync_interval),
            name="fastapi_dbpool.metrics.sync",
        )
        return exporter

    def sync(self) -> None:
        """Bring this worker's multiprocess files up to date (a no-op in one process)."""
        if self.multiprocess:
            _process_mirror().sync()

    async def stop(self) -> None:
        """Detach the runtime; in multiprocess mode, write its final numbers first."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.multiprocess:
            mirror = _process_mirror()
            mirror.sync()
            mirror.detach(self._runtime)
            mirror.sync()
        else:
            collector_for(self.registry).detach(self._runtime)


async def _sync_every(mirror: _ProcessMirror, interval: float) -> None:
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            mirror.sync()
        except Exception:
            if not failing:
                logger.exception("could not write the pool metrics to %s", _MULTIPROC_ENV)
            failing = True
        else:
            failing = False


# -- HTTP metrics -------------------------------------------------------------------------


def http_instrumentation(registry: CollectorRegistry) -> Callable[[Any], None]:
    """The instrumentator's default HTTP metrics in ``registry``, created once per registry.

    Raises:
        ConfigurationError: Another instrumentator already registered them there.
    """
    if multiprocess_dir() is not None:
        # Served from the files, not from a registry; one set per process (see the mirror).
        registry = _multiprocess_http_registry
    with _registries_lock:
        instrumentation = _http_instrumentations.get(registry)
        if instrumentation is None:
            instrumentation = instrumentator_metrics.default(registry=registry)
            if instrumentation is None:
                # The instrumentator swallows DuplicateTimeseries and returns None: say so
                # instead of serving no HTTP metrics.
                raise ConfigurationError(
                    f"the HTTP metrics ({HTTP_REQUESTS}, {HTTP_DURATION}) are already "
                    "registered in this CollectorRegistry, probably by Instrumentator()"
                    ".instrument(app): remove it, or set DB_HTTP_METRICS=false to keep it"
                )
            _http_instrumentations[registry] = instrumentation
        return instrumentation


_multiprocess_http_registry = CollectorRegistry()


class HTTPMetrics:
    """prometheus-fastapi-instrumentator's middleware, switched by ``DB_HTTP_METRICS``.

    DBPoolMiddleware puts it outside its own handling, so a request is recorded with the
    status the client got (a failed commit's 500, a 503 for no connection) and labelled
    with its route template. Built with every middleware stack, it registers nothing
    itself: the registry's HTTP families are made once (:func:`http_instrumentation`), so
    a rebuilt stack, or a second app, neither raises DuplicateTimeseries nor silently loses
    them. It also tells the lifespan which registry the app uses.

    Args:
        app: The ASGI app to instrument.
        registry: Default ``prometheus_client.REGISTRY``.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry | None = None) -> None:
        self.app = app
        self.registry = REGISTRY if registry is None else registry
        self._instrumented: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            runtime = _runtime_of(scope)
            if runtime is not None and runtime.settings.http_metrics:
                await (self._instrumented or self._instrument())(scope, receive, send)
                return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _instrument(self) -> ASGIApp:
        instrumentation = http_instrumentation(self.registry)
        self._instrumented = PrometheusInstrumentatorMiddleware(
            self.app, instrumentations=[instrumentation], registry=self.registry
        )
        return self._instrumented

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        if state is not None:
            setattr(state, _REGISTRY_ATTR, self.registry)

        async def started(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                runtime = _runtime_of(scope)
                if runtime is not None and runtime.settings.http_metrics:
                    # A clash with another instrumentator stops startup, not a request.
                    self._instrument()
            await send(message)

        await self.app(scope, receive, started)


def _runtime_of(scope: Scope) -> DBPoolRuntime | None:
    state = scope.get("state")
    runtime = state.get(STATE_KEY) if state else None
    return runtime if isinstance(runtime, DBPoolRuntime) else None


def registry_of(app: Any) -> CollectorRegistry:
    """The registry DBPoolMiddleware of ``app`` uses (``prometheus_client.REGISTRY``
    unless it was given one)."""
    registry = getattr(getattr(app, "state", None), _REGISTRY_ATTR, None)
    return registry if isinstance(registry, CollectorRegistry) else REGISTRY


# -- the route ----------------------------------------------------------------------------


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: Prometheus text (or OpenMetrics, when asked for).

    One process: the app's registry, its pools read now. Multiprocess mode: the whole
    pod, from the shared directory.

    Raises:
        NotInstalledError: The fastapi_dbpool lifespan is not running.
    """
    exporter = request.scope.get("state", {}).get(EXPORTER_STATE_KEY)
    if not isinstance(exporter, MetricsExporter):
        raise NotInstalledError(
            "dbpool.router's /metrics needs the fastapi_dbpool lifespan: use "
            "`FastAPI(lifespan=dbpool.lifespan)` or `dbpool.install(app)`"
        )
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    if exporter.multiprocess:
        exporter.sync()
        body = await run_in_threadpool(_pod_exposition, encoder)
    else:
        # On the event loop: the pools are read without racing the requests that use them.
        body = encoder(exporter.registry)
    return Response(body, headers={"Content-Type": content_type})


def _pod_exposition(encoder: Callable[[Any], bytes]) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return encoder(registry)
