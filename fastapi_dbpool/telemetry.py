"""OpenTelemetry metrics and spans; a no-op when OpenTelemetry is off or not installed.

Metrics follow the semantic conventions for database client connection pools
(``db.client.connection.*``, attribute ``db.client.connection.pool.name`` = the database's
name). Pool state (connections by state, max, idle bounds, pending requests, timeouts) is
read by callbacks when the SDK collects; only the three duration histograms are recorded
per observation, from the pool's hot path, behind one ``stats.otel is not None`` check.

Spans: every checkout inside a trace becomes a ``dbpool.checkout`` span whose duration is
the wait (or, when opentelemetry-instrumentation-sqlalchemy already wraps the checkout in
its ``connect`` span, that span gets the pool's attributes instead, so no span is
duplicated). Breaker rejections and transitions, deadline hits and leak reports are span
events on the current span, or short spans of their own when nothing records.

The decision is made once, at startup (:func:`from_settings`): with ``DB_OTEL=auto`` (the
default) a signal is on when its global provider is one an SDK (or a vendor) installed,
not the API's own proxy or no-op default. Off, nothing here is imported or called.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .pool import USE_BUCKETS, WAIT_BUCKETS

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Histogram, Meter, MeterProvider
    from opentelemetry.metrics import Observation as ObservationType
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from .breaker import BreakerState
    from .engines import Database
    from .leaks import LeakReport
    from .runtime import DBPoolRuntime
    from .settings import DBPoolSettings

#: Instrumentation scope (meter and tracer name).
SCOPE = "fastapi_dbpool"

# Semantic-convention names (opentelemetry.semconv._incubating, "development" stability);
# spelled out here so that the API alone, without the semconv package, is enough.
CONNECTION_COUNT = "db.client.connection.count"
CONNECTION_MAX = "db.client.connection.max"
CONNECTION_IDLE_MAX = "db.client.connection.idle.max"
CONNECTION_IDLE_MIN = "db.client.connection.idle.min"
CONNECTION_PENDING_REQUESTS = "db.client.connection.pending_requests"
CONNECTION_TIMEOUTS = "db.client.connection.timeouts"
CONNECTION_CREATE_TIME = "db.client.connection.create_time"
CONNECTION_WAIT_TIME = "db.client.connection.wait_time"
CONNECTION_USE_TIME = "db.client.connection.use_time"

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
STATE_IDLE = "idle"
STATE_USED = "used"
DB_SYSTEM_NAME = "db.system.name"
DB_SYSTEM = "postgresql"
ERROR_TYPE = "error.type"

#: The span of one checkout; its duration is the wait for a connection.
CHECKOUT_SPAN = "dbpool.checkout"
#: Attribute with the wait, set on opentelemetry-instrumentation-sqlalchemy's ``connect``.
WAIT_ATTRIBUTE = "dbpool.checkout.wait_time"

BREAKER_REJECTED_EVENT = "dbpool.circuit_breaker.rejected"
BREAKER_TRANSITION_EVENT = "dbpool.circuit_breaker.transition"
DEADLINE_EVENT = "dbpool.deadline_exceeded"
LEAK_EVENT = "dbpool.leak"

BREAKER_STATE = "dbpool.circuit_breaker.state"
BREAKER_FROM = "dbpool.circuit_breaker.from"
BREAKER_TO = "dbpool.circuit_breaker.to"
RETRY_AFTER = "dbpool.retry_after"
DEADLINE_KIND = "dbpool.deadline.kind"
DEADLINE_TIMEOUT = "dbpool.deadline.timeout"
LEAK_KIND = "dbpool.leak.kind"
LEAK_HELD_FOR = "dbpool.leak.held_for"
LEAK_TASK = "dbpool.leak.task"
LEAK_REQUEST_ID = "dbpool.leak.request_id"
HTTP_ROUTE = "http.route"
HTTP_METHOD = "http.request.method"
CODE_STACKTRACE = "code.stacktrace"

#: Values of ``dbpool.deadline.kind``.
STATEMENT_TIMEOUT = "statement_timeout"
LOCK_TIMEOUT = "lock_timeout"
CLIENT_DEADLINE = "client_deadline"

#: ``DB_OTEL`` values.
OTEL_MODES = ("auto", "on", "off")

_SQLALCHEMY_SCOPE = "opentelemetry.instrumentation.sqlalchemy"


def provider_configured(provider: object) -> bool:
    """Whether ``provider`` was installed by an SDK or vendor, not the API's default.

    The API's own classes (the proxy handed out before anything is configured, and the
    no-op) live in ``opentelemetry.metrics`` / ``opentelemetry.trace``; anything else is a
    real provider.
    """
    module = type(provider).__module__
    return not (
        module.startswith("opentelemetry.metrics") or module.startswith("opentelemetry.trace")
    )


def from_settings(settings: DBPoolSettings) -> Telemetry | None:
    """The telemetry startup decides on, or None when OpenTelemetry is off.

    ``DB_OTEL=auto`` (default): on when the global MeterProvider or TracerProvider is
    configured (see :func:`provider_configured`); only the configured signals are
    emitted. ``on``: always, through the global providers (the API's proxies forward to
    providers set later). ``off``: never. Without the ``opentelemetry-api`` package it is
    always off.
    """
    # DBPoolSettings.otel (DB_OTEL) may not exist yet; auto is its default.
    mode = settings.otel
    if mode == "off":
        return None
    try:
        from opentelemetry import metrics, trace
    except ImportError:
        return None
    if mode == "on":
        return Telemetry()
    meter_provider = metrics.get_meter_provider()
    tracer_provider = trace.get_tracer_provider()
    metrics_on = provider_configured(meter_provider)
    traces_on = provider_configured(tracer_provider)
    if not (metrics_on or traces_on):
        return None
    return Telemetry(
        meter_provider=meter_provider if metrics_on else metrics.NoOpMeterProvider(),
        tracer_provider=tracer_provider if traces_on else trace.NoOpTracerProvider(),
    )


def instrument(
    runtime: DBPoolRuntime,
    *,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    pool_name_prefix: str = "",
) -> Telemetry:
    """Emit a running runtime's metrics and spans through the given providers.

    For providers set up after the app started (in the app's own lifespan), or other
    than the global ones (tests). Replaces whatever telemetry the runtime had::

        telemetry.instrument(dbpool.get_runtime(app), meter_provider=mp, tracer_provider=tp)

    Args:
        runtime: The app's runtime (``dbpool.get_runtime(app)``).
        meter_provider: Default: the global one. ``NoOpMeterProvider()`` turns metrics off.
        tracer_provider: Default: the global one. ``NoOpTracerProvider()`` turns spans off.
        pool_name_prefix: Put before each database's name in ``db.client.connection.pool.name``
            (for several apps in one process sharing one provider).
    """
    if runtime.telemetry is not None:
        runtime.telemetry.detach()
    telemetry = Telemetry(
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        pool_name_prefix=pool_name_prefix,
    )
    telemetry.attach(runtime)
    return telemetry


class Telemetry:
    """OpenTelemetry of one runtime: its pools' instruments, its tracer and hooks.

    Args:
        meter_provider: Default: the global one. ``NoOpMeterProvider()`` turns metrics off.
        tracer_provider: Default: the global one. ``NoOpTracerProvider()`` turns spans off.
        pool_name_prefix: Put before each database's name in ``db.client.connection.pool.name``.
    """

    def __init__(
        self,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        pool_name_prefix: str = "",
    ) -> None:
        from opentelemetry import metrics, trace

        self.meter_provider = meter_provider or metrics.get_meter_provider()
        self.tracer_provider = tracer_provider or trace.get_tracer_provider()
        self.pool_name_prefix = pool_name_prefix
        self.metrics_enabled = not isinstance(self.meter_provider, metrics.NoOpMeterProvider)
        self.tracer: Tracer | None = None
        if not isinstance(self.tracer_provider, trace.NoOpTracerProvider):
            self.tracer = self.tracer_provider.get_tracer(SCOPE, _version())
        self.pools: dict[str, PoolTelemetry] = {}
        self._runtime: DBPoolRuntime | None = None
        self._hooks = contextlib.ExitStack()

    def attach(self, runtime: DBPoolRuntime) -> None:
        """Start emitting for ``runtime``'s databases.

        Raises:
            RuntimeError: Already attached.
        """
        if self._runtime is not None:
            raise RuntimeError("this Telemetry is already attached to a runtime")
        instruments = _instruments_for(self.meter_provider) if self.metrics_enabled else None
        for db in runtime.databases.values():
            pool = PoolTelemetry(self, db, instruments)
            self.pools[db.name] = pool
            db.stats.otel = pool
            self._hooks.callback(_unset, db, pool)
            if instruments is not None:
                instruments.add(pool)
                self._hooks.callback(instruments.discard, pool)
            self._hooks.enter_context(_breaker_hook(db, pool.on_transition))
        self._hooks.enter_context(runtime.leaks.listen(self._on_leak))
        self._runtime = runtime
        runtime.telemetry = self

    def detach(self) -> None:
        """Stop emitting: hooks removed, pools no longer reported at collection."""
        runtime, self._runtime = self._runtime, None
        self._hooks.close()
        self.pools.clear()
        if runtime is not None and runtime.telemetry is self:
            runtime.telemetry = None

    def rejected(self, db: Database) -> None:
        """The breaker refused a call to ``db`` (503)."""
        pool = self.pools.get(db.name)
        if pool is not None:
            breaker = db.breaker
            pool.emit(
                BREAKER_REJECTED_EVENT,
                {BREAKER_STATE: breaker.state.value, RETRY_AFTER: breaker.retry_after()},
            )

    def _on_leak(self, report: LeakReport) -> None:
        pool = self.pools.get(report.database)
        if pool is None:
            return
        attributes: dict[str, Any] = {LEAK_KIND: report.kind, LEAK_HELD_FOR: report.held_for}
        if report.route is not None:
            attributes[HTTP_ROUTE] = report.route
        if report.method is not None:
            attributes[HTTP_METHOD] = report.method
        if report.request_id is not None:
            attributes[LEAK_REQUEST_ID] = report.request_id
        if report.task is not None:
            attributes[LEAK_TASK] = report.task
        if report.stack:
            attributes[CODE_STACKTRACE] = "\n".join(report.stack)
        pool.emit(LEAK_EVENT, attributes)


class PoolTelemetry:
    """One database's instruments and span helpers: ``db.stats.otel`` while attached."""

    __slots__ = (
        "__weakref__",
        "_get_current_span",
        "attributes",
        "create_time",
        "db",
        "span_attributes",
        "tracer",
        "use_time",
        "wait_time",
    )

    def __init__(
        self, telemetry: Telemetry, db: Database, instruments: _Instruments | None
    ) -> None:
        from opentelemetry import trace

        self.db = db
        self.attributes: dict[str, Any] = {POOL_NAME: telemetry.pool_name_prefix + db.name}
        self.span_attributes: dict[str, Any] = {**self.attributes, DB_SYSTEM_NAME: DB_SYSTEM}
        self.tracer = telemetry.tracer
        self._get_current_span: Callable[[], Span] = trace.get_current_span
        self.wait_time: Histogram | None = None
        self.create_time: Histogram | None = None
        self.use_time: Histogram | None = None
        if instruments is not None:
            self.wait_time = instruments.wait_time
            self.create_time = instruments.create_time
            self.use_time = instruments.use_time

    # -- the hot path: called by the pool and its events -------------------------------

    def checked_out(self, wait: float) -> None:
        """A checkout got its connection after ``wait`` seconds."""
        if self.wait_time is not None:
            self.wait_time.record(wait, self.attributes)
        if self.tracer is not None:
            self._checkout_span(wait, None)

    def checkout_failed(self, elapsed: float, error: BaseException) -> None:
        """A checkout gave up (timeout) or failed to open a connection."""
        if self.tracer is not None:
            self._checkout_span(elapsed, error)

    def connection_created(self, seconds: float) -> None:
        """A new connection took ``seconds`` to open."""
        if self.create_time is not None:
            self.create_time.record(seconds, self.attributes)

    def checked_in(self, held: float) -> None:
        """A connection came back after ``held`` seconds of use."""
        if self.use_time is not None:
            self.use_time.record(held, self.attributes)

    def _checkout_span(self, wait: float, error: BaseException | None) -> None:
        parent = self._get_current_span()
        if not parent.get_span_context().is_valid:
            # Not inside any trace (a background job, the warm-up): no root span per
            # checkout; the histogram has the number.
            return
        if _is_sqlalchemy_connect(parent):
            # opentelemetry-instrumentation-sqlalchemy's "connect" span already covers this
            # checkout (and records its error): say which pool and how long, add no span.
            if parent.is_recording():
                parent.set_attributes({**self.span_attributes, WAIT_ATTRIBUTE: wait})
            return
        assert self.tracer is not None
        end = time.time_ns()
        span = self.tracer.start_span(
            CHECKOUT_SPAN,
            attributes=self.span_attributes,
            start_time=end - int(wait * 1e9),
            record_exception=False,
        )
        if error is not None and span.is_recording():
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute(ERROR_TYPE, type(error).__name__)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end(end_time=end)

    # -- rare events ------------------------------------------------------------------

    def deadline(self, kind: str, timeout: float | None) -> None:
        """A statement timeout, lock timeout or client deadline fired (504)."""
        attributes: dict[str, Any] = {DEADLINE_KIND: kind}
        if timeout is not None:
            attributes[DEADLINE_TIMEOUT] = timeout
        self.emit(DEADLINE_EVENT, attributes)

    def on_transition(self, old: BreakerState, new: BreakerState) -> None:
        """The database's circuit breaker changed state."""
        self.emit(BREAKER_TRANSITION_EVENT, {BREAKER_FROM: old.value, BREAKER_TO: new.value})

    def emit(self, name: str, attributes: dict[str, Any]) -> None:
        """An event on the current span; a short span of its own when nothing records.

        Inside a request the current span is the request's (the server span of
        opentelemetry-instrumentation-fastapi). A task that outlived its request still
        carries that request's context, so its span lands in the request's trace; in a
        background task (probe, leak scan) it is a trace of its own.
        """
        if self.tracer is None:
            return
        attributes = {**self.span_attributes, **attributes}
        current = self._get_current_span()
        if current.is_recording():
            current.add_event(name, attributes)
            return
        if (
            current.get_span_context().is_valid
            and not current.get_span_context().trace_flags.sampled
        ):
            return  # The trace was sampled out.
        span = self.tracer.start_span(name, attributes=attributes)
        span.add_event(name, attributes)
        span.end()


def _is_sqlalchemy_connect(span: Span) -> bool:
    scope = getattr(span, "instrumentation_scope", None)
    return (
        getattr(scope, "name", None) == _SQLALCHEMY_SCOPE
        and getattr(span, "name", None) == "connect"
    )


def _unset(db: Database, pool: PoolTelemetry) -> None:
    if db.stats.otel is pool:
        db.stats.otel = None


@contextlib.contextmanager
def _breaker_hook(
    db: Database, hook: Callable[[BreakerState, BreakerState], None]
) -> Iterator[None]:
    breaker = db.breaker
    previous = breaker.on_transition

    def chained(old: BreakerState, new: BreakerState) -> None:
        if previous is not None:
            previous(old, new)
        hook(old, new)

    breaker.on_transition = chained
    try:
        yield
    finally:
        if breaker.on_transition is chained:
            breaker.on_transition = previous


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastapi-dbpool")
    except PackageNotFoundError:
        return "0"


class _Instruments:
    """The instruments of one MeterProvider, observing every pool attached to it.

    OpenTelemetry instruments are per provider and cannot be removed, and a second
    ``create_observable_*`` of a name returns the first instrument without the new
    callback. So each provider gets one set, whose callbacks read the pools attached now;
    a runtime that closes (or is collected) simply stops being observed.
    """

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._pools: weakref.WeakSet[PoolTelemetry] = weakref.WeakSet()
        self.wait_time = meter.create_histogram(
            CONNECTION_WAIT_TIME,
            unit="s",
            description="The time it took to obtain an open connection from the pool.",
            explicit_bucket_boundaries_advisory=list(WAIT_BUCKETS),
        )
        self.create_time = meter.create_histogram(
            CONNECTION_CREATE_TIME,
            unit="s",
            description="The time it took to create a new connection.",
            explicit_bucket_boundaries_advisory=list(WAIT_BUCKETS),
        )
        self.use_time = meter.create_histogram(
            CONNECTION_USE_TIME,
            unit="s",
            description="The time between borrowing a connection and returning it to the pool.",
            explicit_bucket_boundaries_advisory=list(USE_BUCKETS),
        )
        meter.create_observable_up_down_counter(
            CONNECTION_COUNT,
            [self._count],
            unit="{connection}",
            description="The number of connections that are currently in the state described "
            "by the state attribute.",
        )
        meter.create_observable_up_down_counter(
            CONNECTION_MAX,
            [self._max],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            CONNECTION_IDLE_MAX,
            [self._idle_max],
            unit="{connection}",
            description="The maximum number of idle open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            CONNECTION_IDLE_MIN,
            [self._idle_min],
            unit="{connection}",
            description="The minimum number of idle open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            CONNECTION_PENDING_REQUESTS,
            [self._pending],
            unit="{request}",
            description="The number of current pending requests for an open connection.",
        )
        meter.create_observable_counter(
            CONNECTION_TIMEOUTS,
            [self._timeouts],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )

    def add(self, pool: PoolTelemetry) -> None:
        with self._lock:
            self._pools.add(pool)

    def discard(self, pool: PoolTelemetry) -> None:
        with self._lock:
            self._pools.discard(pool)

    def _snapshot(self) -> list[PoolTelemetry]:
        # Collection may run on the exporter's thread; attach/detach run on the loop.
        with self._lock:
            return list(self._pools)

    def _count(self, options: CallbackOptions) -> Iterable[ObservationType]:
        from opentelemetry.metrics import Observation

        for pool in self._snapshot():
            queue = pool.db.pool
            yield Observation(queue.checkedin(), {**pool.attributes, STATE: STATE_IDLE})
            yield Observation(queue.checkedout(), {**pool.attributes, STATE: STATE_USED})

    def _max(self, options: CallbackOptions) -> Iterable[ObservationType]:
        from opentelemetry.metrics import Observation

        for pool in self._snapshot():
            yield Observation(pool.db.budget.max_size, pool.attributes)

    def _idle_max(self, options: CallbackOptions) -> Iterable[ObservationType]:
        from opentelemetry.metrics import Observation

        # A QueuePool keeps at most pool_size connections; overflow ones close on checkin.
        for pool in self._snapshot():
            yield Observation(pool.db.pool.size(), pool.attributes)

    def _idle_min(self, options: CallbackOptions) -> Iterable[ObservationType]:
        from opentelemetry.metrics import Observation

        # Connections are opened on demand (and warmed once at startup); nothing keeps a
        # minimum of idle ones open.
        for pool in self._snapshot():
            yield Observation(0, pool.attributes)

    def _pending(self, options: CallbackOptions) -> Iterable[ObservationType]:
        from opentelemetry.metrics import Observation

        for pool in self._snapshot():
            yield Observation(pool.db.stats.waiting, pool.attributes)

    def _timeouts(self, options: CallbackOptions) -> Iterable[ObservationType]:
        from opentelemetry.metrics import Observation

        for pool in self._snapshot():
            yield Observation(pool.db.stats.checkout_timeouts, pool.attributes)


_lock = threading.Lock()
#: One set of instruments per MeterProvider (see :class:`_Instruments`).
_by_provider: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = weakref.WeakKeyDictionary()


def _instruments_for(provider: MeterProvider) -> _Instruments:
    with _lock:
        found = _by_provider.get(provider)
        if found is None:
            found = _by_provider[provider] = _Instruments(provider.get_meter(SCOPE, _version()))
        return found
