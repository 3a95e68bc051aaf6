"""The pool metrics across worker processes, and the exporter the lifespan starts.

Several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set, e.g. gunicorn with uvicorn
workers): a custom collector only sees its own process, so each worker copies the same
numbers into prometheus_client's multiprocess metrics every :data:`SYNC_INTERVAL` seconds
(and the worker serving a scrape just before it), and ``/metrics`` serves the
``MultiProcessCollector`` of the whole directory: any worker reports the whole pod.

:class:`MetricsExporter` is one app's metrics while it runs: in one process its runtime is
attached to the registry's :class:`~fastapi_dbpool.metrics.DBPoolCollector`; in several, to
this worker's mirror, synced by a background task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from .errors import ConfigurationError
from .metrics import (
    BREAKER_REJECTIONS,
    BREAKER_STATE,
    BREAKER_STATES,
    BREAKER_TRANSITIONS,
    CHECKOUT_TIMEOUTS,
    CHECKOUT_WAIT,
    CONNECT_FAILURES,
    CONNECTION_CREATE,
    CONNECTION_USE,
    CONNECTIONS,
    CONNECTIONS_MAX,
    DATABASE,
    FROM,
    HELP,
    IDLE,
    KIND,
    LEAKS,
    LEAKS_RECLAIMED,
    PENDING_REQUESTS,
    PROBE_UP,
    STATE,
    STATEMENT_TIMEOUTS,
    TO,
    USED,
    _read,
    _Reading,
    _registries_lock,
    collector_for,
)
from .pool import USE_BUCKETS, WAIT_BUCKETS
from .runtime import DBPoolRuntime

if TYPE_CHECKING:
    from .engines import Database

logger = logging.getLogger("fastapi_dbpool")

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Multiprocess mode: seconds between two copies of a worker's pool numbers into the
#: shared files. Another worker's scrape sees them at most this old; a scrape every
#: 15-60 s never notices, and the copy costs ~60 µs per database.
SYNC_INTERVAL = 1.0

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
