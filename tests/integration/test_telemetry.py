"""OpenTelemetry: semconv pool metrics and spans, read from real pools on PostgreSQL.

Every test passes its own providers (``telemetry.instrument(runtime, ...)``) with the
SDK's in-memory reader and exporter; none sets the global providers, which OpenTelemetry
allows only once per process.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import db_attributes
from opentelemetry.semconv._incubating.metrics import db_metrics
from opentelemetry.trace import StatusCode
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool
from fastapi_dbpool import get_session, telemetry
from fastapi_dbpool.pool import WAIT_BUCKETS
from fastapi_dbpool.telemetry import POOL_NAME, STATE
from tests.helpers import wait_until
from tests.helpers.apps import client_for, holding_app, make_app, settings_for
from tests.helpers.proxy import FaultProxy


@dataclass
class Otel:
    meter_provider: MeterProvider
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter

    def metrics(self) -> dict[str, Metric]:
        data = self.reader.get_metrics_data()
        found: dict[str, Metric] = {}
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                if scope.scope.name == telemetry.SCOPE:
                    found.update({m.name: m for m in scope.metrics})
        return found

    def value(self, name: str, **attributes: str) -> float:
        points = [
            p
            for p in self.metrics()[name].data.data_points
            if all(p.attributes.get(k) == v for k, v in attributes.items())  # type: ignore[union-attr]
        ]
        assert len(points) == 1, (name, attributes, points)
        point = points[0]
        assert isinstance(point, NumberDataPoint)
        return point.value

    def histogram(self, name: str) -> HistogramDataPoint:
        (point,) = self.metrics()[name].data.data_points
        assert isinstance(point, HistogramDataPoint)
        return point

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def instrument(self, app: FastAPI) -> telemetry.Telemetry:
        return telemetry.instrument(
            dbpool.get_runtime(app),
            meter_provider=self.meter_provider,
            tracer_provider=self.tracer_provider,
        )


@pytest.fixture
def otel() -> Iterator[Otel]:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Otel(meter_provider, reader, tracer_provider, exporter)
    meter_provider.shutdown()
    tracer_provider.shutdown()


def traced(app: FastAPI, otel: Otel) -> FastAPI:
    """Instrument ``app`` with opentelemetry-instrumentation-fastapi (before it starts)."""
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    return app


@pytest.fixture
def sqlalchemy_instrumented(otel: Otel) -> Iterator[None]:
    """opentelemetry-instrumentation-sqlalchemy as a user turns it on: before engines exist."""
    instrumentor = SQLAlchemyInstrumentor()
    # It declares "sqlalchemy < 2.1" but works with 2.1 all the same.
    instrumentor.instrument(
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        skip_dep_check=True,
    )
    try:
        yield
    finally:
        instrumentor.uninstrument()


def server_span(otel: Otel, route: str) -> ReadableSpan:
    (span,) = [s for s in otel.spans() if s.kind is trace.SpanKind.SERVER and route in s.name]
    return span


def events(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


def assert_one_tree(otel: Otel) -> None:
    """Every exported span's parent was exported too, in the same trace (nothing broken)."""
    spans = otel.spans()
    by_id = {s.context.span_id: s for s in spans}
    assert len(by_id) == len(spans), "a span was exported twice"
    for span in spans:
        if span.parent is not None:
            parent = by_id.get(span.parent.span_id)
            assert parent is not None, f"{span.name}: parent not exported"
            assert parent.context.trace_id == span.context.trace_id


# -- metrics ---------------------------------------------------------------------------


async def test_semconv_metrics_read_the_pool_at_collection(database_url: str, otel: Otel) -> None:
    app, holding, release = holding_app(database_url, warm_pool=False)
    async with client_for(app) as client:
        otel.instrument(app)
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holding.wait(), 5)
        # A request holds one connection right now: the callbacks see it.
        assert otel.value(telemetry.CONNECTION_COUNT, **{STATE: "used"}) == 1
        assert otel.value(telemetry.CONNECTION_COUNT, **{STATE: "idle"}) == 0
        assert otel.value(telemetry.CONNECTION_MAX) == 4
        assert otel.value(telemetry.CONNECTION_IDLE_MAX) == 4
        assert otel.value(telemetry.CONNECTION_IDLE_MIN) == 0
        assert otel.value(telemetry.CONNECTION_PENDING_REQUESTS) == 0
        assert otel.value(telemetry.CONNECTION_TIMEOUTS) == 0
        release.set()
        assert (await holder).status_code == 200
        assert (await client.get("/query")).status_code == 200
        assert otel.value(telemetry.CONNECTION_COUNT, **{STATE: "used"}) == 0
        assert otel.value(telemetry.CONNECTION_COUNT, **{STATE: "idle"}) == 1

        found = otel.metrics()
        assert {name: metric.unit for name, metric in found.items()} == {
            db_metrics.DB_CLIENT_CONNECTION_COUNT: "{connection}",
            db_metrics.DB_CLIENT_CONNECTION_MAX: "{connection}",
            db_metrics.DB_CLIENT_CONNECTION_IDLE_MAX: "{connection}",
            db_metrics.DB_CLIENT_CONNECTION_IDLE_MIN: "{connection}",
            db_metrics.DB_CLIENT_CONNECTION_PENDING_REQUESTS: "{request}",
            db_metrics.DB_CLIENT_CONNECTION_TIMEOUTS: "{timeout}",
            db_metrics.DB_CLIENT_CONNECTION_CREATE_TIME: "s",
            db_metrics.DB_CLIENT_CONNECTION_WAIT_TIME: "s",
            db_metrics.DB_CLIENT_CONNECTION_USE_TIME: "s",
        }
        for metric in found.values():
            for point in metric.data.data_points:
                assert point.attributes is not None
                assert point.attributes[db_attributes.DB_CLIENT_CONNECTION_POOL_NAME] == "primary"
        wait = otel.histogram(telemetry.CONNECTION_WAIT_TIME)
        use = otel.histogram(telemetry.CONNECTION_USE_TIME)
        create = otel.histogram(telemetry.CONNECTION_CREATE_TIME)
        assert wait.count == 2 and 0 <= wait.sum < 2
        assert use.count == 2 and 0 < use.sum < 10
        # One connection opened (the pool was not warmed), in well under a second.
        assert create.count == 1 and 0 < create.sum < 2
        # Buckets for seconds, not the SDK's default (milliseconds-sized) ones.
        assert tuple(wait.explicit_bounds) == WAIT_BUCKETS
    # The runtime closed: its pools are no longer observed.
    assert telemetry.CONNECTION_COUNT not in otel.metrics()


async def test_pending_requests_timeouts_and_a_failed_checkout_span(
    database_url: str, otel: Otel
) -> None:
    app, holding, release = holding_app(database_url, pool_size=1, checkout_timeout=0.3)
    traced(app, otel)
    async with client_for(app) as client:
        otel.instrument(app)
        db = dbpool.get_runtime(app).databases["primary"]
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holding.wait(), 5)
        waiter = asyncio.create_task(client.get("/query"))
        await wait_until(lambda: db.stats.waiting == 1, 2, message="a checkout waits")
        assert otel.value(telemetry.CONNECTION_PENDING_REQUESTS) == 1
        assert (await waiter).status_code == 503
        assert otel.value(telemetry.CONNECTION_PENDING_REQUESTS) == 0
        assert otel.value(telemetry.CONNECTION_TIMEOUTS) == 1
        release.set()
        assert (await holder).status_code == 200

    failed = [
        s for s in otel.spans(telemetry.CHECKOUT_SPAN) if s.status.status_code is StatusCode.ERROR
    ]
    (span,) = failed
    assert span.attributes is not None
    assert span.attributes[telemetry.ERROR_TYPE] == "CheckoutTimeoutError"
    assert span.end_time is not None and span.start_time is not None
    assert 0.25 <= (span.end_time - span.start_time) / 1e9 < 2
    assert [e.name for e in span.events] == ["exception"]
    query = server_span(otel, "/query")
    assert span.parent is not None and span.parent.span_id == query.context.span_id
    assert_one_tree(otel)


# -- spans -----------------------------------------------------------------------------


async def test_checkout_span_sits_inside_the_request_server_span(
    database_url: str, otel: Otel
) -> None:
    app, _, _ = holding_app(database_url)
    traced(app, otel)
    async with client_for(app) as client:
        otel.instrument(app)
        assert (await client.get("/query")).status_code == 200
        # Outside any trace (a job, a script) a checkout makes no span of its own.
        async with dbpool.get_runtime(app).sessionmaker()() as session:
            await session.execute(text("SELECT 1"))

    (checkout,) = otel.spans(telemetry.CHECKOUT_SPAN)
    request = server_span(otel, "/query")
    assert checkout.context.trace_id == request.context.trace_id
    assert checkout.parent is not None
    assert checkout.parent.span_id == request.context.span_id
    assert checkout.attributes == {POOL_NAME: "primary", "db.system.name": "postgresql"}
    assert checkout.status.status_code is StatusCode.UNSET
    assert request.start_time is not None and request.end_time is not None
    assert checkout.start_time is not None and checkout.end_time is not None
    assert request.start_time <= checkout.start_time <= checkout.end_time <= request.end_time
    assert_one_tree(otel)


async def test_with_sqlalchemy_instrumentation_its_connect_span_carries_the_pool(
    database_url: str, otel: Otel, sqlalchemy_instrumented: None
) -> None:
    app, _, _ = holding_app(database_url)
    traced(app, otel)
    async with client_for(app) as client:
        otel.instrument(app)
        otel.exporter.clear()  # startup's own connects (warm-up) are not this request's
        assert (await client.get("/query")).status_code == 200

    request = server_span(otel, "/query")
    in_request = [s for s in otel.spans() if s.context.trace_id == request.context.trace_id]
    names = sorted(s.name for s in in_request)
    # One span per thing that happened: no dbpool.checkout next to sqlalchemy's connect.
    assert telemetry.CHECKOUT_SPAN not in names
    (connect,) = [s for s in in_request if s.name == "connect"]
    assert connect.attributes is not None
    assert connect.attributes[POOL_NAME] == "primary"
    assert 0 <= connect.attributes[telemetry.WAIT_ATTRIBUTE] < 1  # type: ignore[operator]
    assert connect.parent is not None and connect.parent.span_id == request.context.span_id
    assert [s for s in in_request if s.name.startswith("SELECT")], names
    assert_one_tree(otel)


async def test_breaker_rejection_and_transition_are_in_the_trace(
    database_url: str, otel: Otel
) -> None:
    app, _, _ = holding_app(database_url, circuit_failure_threshold=1, circuit_recovery_timeout=30)
    traced(app, otel)
    async with client_for(app) as client:
        otel.instrument(app)
        breaker = dbpool.get_runtime(app).databases["primary"].breaker
        breaker.record_failure()  # outside any request: a trace of its own
        response = await client.get("/query")
        assert response.status_code == 503

    request = server_span(otel, "/query")
    (rejected,) = events(request, telemetry.BREAKER_REJECTED_EVENT)
    assert rejected[POOL_NAME] == "primary"
    assert rejected[telemetry.BREAKER_STATE] == "open"
    assert 0 < rejected[telemetry.RETRY_AFTER] <= 30
    (transition,) = otel.spans(telemetry.BREAKER_TRANSITION_EVENT)
    assert transition.parent is None
    assert transition.attributes is not None
    assert transition.attributes[telemetry.BREAKER_FROM] == "closed"
    assert transition.attributes[telemetry.BREAKER_TO] == "open"
    assert not otel.spans(telemetry.CHECKOUT_SPAN)  # rejected before any checkout
    assert_one_tree(otel)


async def test_statement_timeout_is_an_event_of_the_request(database_url: str, otel: Otel) -> None:
    app = traced(make_app(settings_for(database_url, command_timeout=0.3)), otel)

    @app.get("/slow")
    async def slow(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("SELECT pg_sleep(5)"))

    async with client_for(app) as client:
        otel.instrument(app)
        assert (await client.get("/slow")).status_code == 504

    (hit,) = events(server_span(otel, "/slow"), telemetry.DEADLINE_EVENT)
    assert hit[telemetry.DEADLINE_KIND] == telemetry.STATEMENT_TIMEOUT
    assert hit[POOL_NAME] == "primary"


async def test_client_deadline_is_an_event_of_the_request(
    database_url: str, admin_url: str, otel: Otel, sqlalchemy_instrumented: None
) -> None:
    from sqlalchemy.engine import make_url

    server = make_url(admin_url)
    assert server.host is not None and server.port is not None
    proxy = FaultProxy(server.host, server.port)
    await proxy.start()
    try:
        app = traced(
            make_app(
                settings_for(
                    proxy.url_for(database_url),
                    pool_size=1,
                    command_timeout=0.3,
                    client_timeout_grace=0.3,
                )
            ),
            otel,
        )

        @app.get("/q")
        async def q(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
            return {"v": (await session.execute(text("SELECT 1"))).scalar_one()}

        async with client_for(app) as client:
            otel.instrument(app)
            proxy.blackhole()
            assert (await client.get("/q")).status_code == 504
            proxy.passthrough()
    finally:
        proxy.passthrough()
        await proxy.stop()

    request = server_span(otel, "/q")
    (hit,) = events(request, telemetry.DEADLINE_EVENT)
    assert hit[telemetry.DEADLINE_KIND] == telemetry.CLIENT_DEADLINE
    assert hit[telemetry.DEADLINE_TIMEOUT] == pytest.approx(0.6)
    # The 504 we raise from SQLAlchemy's error hook still lets the SQLAlchemy
    # instrumentation end its statement span.
    (statement,) = [
        s
        for s in otel.spans()
        if s.name.startswith("SELECT") and s.context.trace_id == request.context.trace_id
    ]
    assert statement.status.status_code is StatusCode.ERROR
    assert_one_tree(otel)


async def test_leaks_are_in_the_request_trace_or_a_trace_of_their_own(
    database_url: str, otel: Otel
) -> None:
    app = traced(make_app(settings_for(database_url, leak_threshold=0.2)), otel)
    spawned: list[asyncio.Task[None]] = []
    done = asyncio.Event()

    @app.get("/spawn")
    async def spawn(factory: dbpool.SessionFactory = Depends(dbpool.session_factory)) -> None:
        held = asyncio.Event()

        async def hold() -> None:
            async with factory() as s:
                await s.execute(text("SELECT 1"))
                held.set()
                await done.wait()

        spawned.append(asyncio.create_task(hold()))
        await held.wait()

    async with client_for(app) as client:
        runtime = dbpool.get_runtime(app)
        otel.instrument(app)
        assert (await client.get("/spawn")).status_code == 200
        done.set()
        await asyncio.gather(*spawned, return_exceptions=True)
        # Outside any request, held past DB_LEAK_THRESHOLD: found by the scan.
        async with runtime.sessionmaker()() as session:
            await session.execute(text("SELECT 1"))
            await wait_until(lambda: runtime.leaks.total("held_too_long") == 1, 3)

    # The server span ends with the response's last byte, before the leak can be seen:
    # the report is a span of its own, a child of the request's.
    request = server_span(otel, "/spawn")
    (outlived,) = [s for s in otel.spans(telemetry.LEAK_EVENT) if s.parent is not None]
    assert outlived.parent is not None
    assert outlived.parent.span_id == request.context.span_id
    (event,) = events(outlived, telemetry.LEAK_EVENT)
    assert event == outlived.attributes
    assert event[telemetry.LEAK_KIND] == "outlived_request"
    assert event[telemetry.HTTP_ROUTE] == "/spawn"
    assert event[telemetry.HTTP_METHOD] == "GET"
    assert event[POOL_NAME] == "primary"
    # Outside any request: a trace of its own.
    (unowned,) = [s for s in otel.spans(telemetry.LEAK_EVENT) if s.parent is None]
    assert unowned.attributes is not None
    assert unowned.attributes[telemetry.LEAK_KIND] == "held_too_long"
    assert unowned.attributes[telemetry.LEAK_HELD_FOR] > 0.2  # type: ignore[operator]


# -- off -------------------------------------------------------------------------------


async def test_off_by_default_nothing_is_attached_or_recorded(database_url: str) -> None:
    # No provider configured in this process: the API's proxies are the globals.
    assert not telemetry.provider_configured(metrics.get_meter_provider())
    assert not telemetry.provider_configured(trace.get_tracer_provider())
    app, _, _ = holding_app(database_url)
    async with client_for(app) as client:
        runtime = dbpool.get_runtime(app)
        assert runtime.telemetry is None
        assert all(db.stats.otel is None for db in runtime.databases.values())
        assert (await client.get("/query")).status_code == 200


async def test_instrumenting_again_replaces_and_closing_detaches(
    database_url: str, otel: Otel
) -> None:
    app, _, _ = holding_app(database_url)
    async with client_for(app) as client:
        runtime = dbpool.get_runtime(app)
        db = runtime.databases["primary"]
        first = otel.instrument(app)
        second = otel.instrument(app)
        assert runtime.telemetry is second and first.pools == {}
        assert db.stats.otel is second.pools["primary"]
        assert (await client.get("/query")).status_code == 200
        # One observation per pool and state, although two Telemetry objects were made.
        assert otel.value(telemetry.CONNECTION_COUNT, **{STATE: "used"}) == 0
    assert runtime.telemetry is None and db.stats.otel is None
    assert db.breaker.on_transition is None


def test_startup_rule_reads_the_global_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = types.SimpleNamespace(otel="auto")
    assert telemetry.from_settings(settings) is None  # type: ignore[arg-type]
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: provider)
    found = telemetry.from_settings(settings)  # type: ignore[arg-type]
    assert found is not None
    assert found.meter_provider is provider and found.metrics_enabled
    assert found.tracer is None  # no TracerProvider configured: no spans
    assert telemetry.from_settings(types.SimpleNamespace(otel="off")) is None  # type: ignore[arg-type]
    provider.shutdown()
    monkeypatch.undo()
    # "on": the global providers whatever they are (the API's proxies forward later).
    forced = telemetry.from_settings(types.SimpleNamespace(otel="on"))  # type: ignore[arg-type]
    assert forced is not None and forced.metrics_enabled and forced.tracer is not None
    assert not telemetry.provider_configured(forced.meter_provider)
