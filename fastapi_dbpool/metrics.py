"""Prometheus metrics of the pools: their names, the collector read at scrape time, and
the /metrics route.

One process: one :class:`DBPoolCollector` per ``CollectorRegistry`` reads the pools,
breakers and counters of every runtime attached to it when the registry is scraped. A
checkout pays nothing for Prometheus: the numbers are the plain integers and histograms of
:mod:`fastapi_dbpool.pool`, kept anyway.

Several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set): each worker copies the same
readings into prometheus_client's multiprocess files, and ``/metrics`` serves the whole
pod; that, and the :class:`~fastapi_dbpool.metrics_multiprocess.MetricsExporter` the
lifespan starts in either mode, is :mod:`fastapi_dbpool.metrics_multiprocess`. The HTTP
metrics are :mod:`fastapi_dbpool.http_metrics`. Both modules build on the names and
readings here; what moved there can still be imported from here.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from .breaker import BreakerState
from .errors import ConfigurationError, NotInstalledError
from .leaks import LEAK_KINDS, LeakTracker
from .runtime import DBPoolRuntime

if TYPE_CHECKING:
    from .engines import Database
    from .probe import DatabaseProbe

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

#: Where the lifespan leaves the exporter for the /metrics route (the lifespan state).
EXPORTER_STATE_KEY = "fastapi_dbpool.metrics"

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


# -- the route ----------------------------------------------------------------------------


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: Prometheus text (or OpenMetrics, when asked for).

    One process: the app's registry, its pools read now. Multiprocess mode: the whole
    pod, from the shared directory.

    Raises:
        NotInstalledError: The fastapi_dbpool lifespan is not running.
    """
    # Imported here, not at the top: metrics_multiprocess builds on this module.
    from .metrics_multiprocess import MetricsExporter

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


# -- names that moved ---------------------------------------------------------------------

#: Names of the modules that build on this one, still importable from here; looked up on
#: first use, since importing those modules at the top of this one would be a cycle.
_MOVED = {
    "HTTPMetrics": "http_metrics",
    "http_instrumentation": "http_metrics",
    "registry_of": "http_metrics",
    "MetricsExporter": "metrics_multiprocess",
    "SYNC_INTERVAL": "metrics_multiprocess",
    "multiprocess_dir": "metrics_multiprocess",
    "_ProcessMirror": "metrics_multiprocess",
    "_add_observations": "metrics_multiprocess",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __package__), name)
