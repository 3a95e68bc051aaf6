"""/metrics: the contract's families read from real pools, HTTP metrics, registries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import httpx
import pytest
from fastapi import Depends, FastAPI
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

import fastapi_dbpool as dbpool
from fastapi_dbpool import get_session
from fastapi_dbpool.settings import env_name
from tests.helpers.apps import client_for, settings_for

Form = Literal["install", "explicit"]
FORMS: list[Form] = ["install", "explicit"]

#: The contract's families, as ``# TYPE`` lines name them, and their types.
CONTRACT_FAMILIES = {
    "dbpool_connections": "gauge",
    "dbpool_connections_max": "gauge",
    "dbpool_pending_requests": "gauge",
    "dbpool_checkout_wait_seconds": "histogram",
    "dbpool_checkout_timeouts": "counter",
    "dbpool_statement_timeouts": "counter",
    "dbpool_leaks": "counter",
    "dbpool_circuit_breaker_state": "gauge",
    "http_requests": "counter",
    "http_request_duration_seconds": "histogram",
}


# -- reading an exposition (also used by the other metrics tests) ------------------------


def family_types(exposition: str) -> dict[str, str]:
    """Family name -> type, for every family the text describes."""
    return {f.name: f.type for f in text_string_to_metric_families(exposition)}


def sample_names(exposition: str) -> set[str]:
    """Every sample name with at least one sample in the text."""
    return {s.name for f in text_string_to_metric_families(exposition) for s in f.samples}


def metric(exposition: str, name: str, **labels: str) -> float | None:
    """The sum of the samples called ``name`` whose labels include ``labels``; None if none."""
    found = [
        s.value
        for f in text_string_to_metric_families(exposition)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(found) if found else None


def duplicate_series(exposition: str) -> list[str]:
    """Series the text gives twice (Prometheus rejects such a scrape)."""
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    duplicates = []
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            if key in seen:
                duplicates.append(f"{s.name}{dict(key[1])}")
            seen.add(key)
    return duplicates


async def poll(
    probe: Callable[[], Awaitable[str]], done: Callable[[str], bool], *, timeout: float = 5
) -> str:
    """Scrape until ``done`` holds for the text; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        seen = await probe()
        if done(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s; last scrape:\n{seen}")
        await asyncio.sleep(0.01)


# -- apps ---------------------------------------------------------------------------------


def build(
    form: Form,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    registry: CollectorRegistry | None,
    **overrides: Any,
) -> FastAPI:
    """An app wired in one of the contract's two forms, with a few routes."""
    settings = settings_for(database_url, **overrides)
    if form == "install":
        app = FastAPI()
        dbpool.install(app, settings=settings, registry=registry)
    else:
        fields = (
            "database_url",
            "pool_size",
            "max_overflow",
            "checkout_timeout",
            "application_name",
        )
        for field in (*fields, *overrides):
            value = getattr(settings, field)
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            monkeypatch.setenv(env_name(field), shown)
        app = FastAPI(lifespan=dbpool.lifespan)
        if registry is None:
            app.add_middleware(dbpool.DBPoolMiddleware)
        else:
            app.add_middleware(dbpool.DBPoolMiddleware, registry=registry)
        app.include_router(dbpool.router)

    held = asyncio.Event()
    release = asyncio.Event()
    app.state.held, app.state.release = held, release

    @app.get("/items/{item_id}")
    async def item(item_id: int, session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"id": item_id, "one": (await session.execute(text("SELECT 1"))).scalar_one()}

    @app.get("/hold")
    async def hold(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        await session.execute(text("SELECT 1"))
        held.set()
        await release.wait()
        return {"held": 1}

    @app.get("/slow")
    async def slow(session: AsyncSession = Depends(dbpool.session(timeout=0.05))) -> None:
        await session.execute(text("SELECT pg_sleep(5)"))

    return app


async def scrape(client: httpx.AsyncClient, **headers: str) -> str:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return response.text


# -- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
async def test_every_contract_family_with_either_wiring(
    form: Form, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build(form, database_url, monkeypatch, CollectorRegistry(), pool_size=4)
    async with client_for(app) as client:
        for item_id in (42, 43):
            assert (await client.get(f"/items/{item_id}")).status_code == 200
        response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    exposition = response.text
    assert duplicate_series(exposition) == []
    types = family_types(exposition)
    for name, kind in CONTRACT_FAMILIES.items():
        assert types.get(name) == kind, name

    def primary(name: str, **labels: str) -> float | None:
        return metric(exposition, name, database="primary", **labels)

    assert primary("dbpool_connections", state="idle") == 4
    assert primary("dbpool_connections", state="used") == 0
    assert primary("dbpool_connections_max") == 4
    assert primary("dbpool_pending_requests") == 0
    # Four warm-up checkouts at startup, one per request.
    assert primary("dbpool_checkout_wait_seconds_count") == 4 + 2
    assert primary("dbpool_checkout_wait_seconds_bucket", le="+Inf") == 6
    assert primary("dbpool_checkout_timeouts_total") == 0
    assert primary("dbpool_statement_timeouts_total") == 0
    assert primary("dbpool_circuit_breaker_state", state="closed") == 1
    assert primary("dbpool_circuit_breaker_state", state="open") == 0
    assert primary("dbpool_circuit_breaker_state", state="half_open") == 0
    assert primary("dbpool_probe_up") == 1
    for kind in ("outlived_request", "used_after_request", "held_too_long"):
        assert primary("dbpool_leaks_total", kind=kind) == 0
    # Route templates, never raw paths.
    template = {"handler": "/items/{item_id}", "method": "GET"}
    assert metric(exposition, "http_requests_total", status="2xx", **template) == 2
    assert metric(exposition, "http_request_duration_seconds_count", **template) == 2
    assert metric(exposition, "http_requests_total", handler="/items/42") is None


async def test_gauges_and_counters_follow_the_pool(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build(
        "install", database_url, monkeypatch, CollectorRegistry(), pool_size=1,
        checkout_timeout=0.3,
    )  # fmt: skip
    async with client_for(app) as client:
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(app.state.held.wait(), 5)
        exposition = await scrape(client)
        assert metric(exposition, "dbpool_connections", state="used") == 1
        assert metric(exposition, "dbpool_connections", state="idle") == 0

        waiter = asyncio.create_task(client.get("/items/1"))
        await poll(lambda: scrape(client), lambda t: metric(t, "dbpool_pending_requests") == 1)
        assert (await waiter).status_code == 503
        exposition = await scrape(client)
        assert metric(exposition, "dbpool_checkout_timeouts_total") == 1
        assert metric(exposition, "dbpool_pending_requests") == 0

        app.state.release.set()
        assert (await holder).status_code == 200
        assert (await client.get("/slow")).status_code == 504
        exposition = await scrape(client)
    assert metric(exposition, "dbpool_connections", state="used") == 0
    assert metric(exposition, "dbpool_connections", state="idle") == 1
    assert metric(exposition, "dbpool_statement_timeouts_total") == 1
    # warm-up, /hold and /slow got a connection; the timed-out checkout did not.
    assert metric(exposition, "dbpool_checkout_wait_seconds_count") == 3
    # The HTTP metrics see the status the client got, including the middleware's own.
    assert metric(exposition, "http_requests_total", handler="/items/{item_id}") == 1
    assert metric(exposition, "http_requests_total", handler="/items/{item_id}", status="5xx")
    assert metric(exposition, "http_requests_total", handler="/slow", status="5xx") == 1


async def test_breaker_state_is_one_hot_and_its_transitions_count(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build(
        "install", database_url, monkeypatch, CollectorRegistry(), health_check_interval=60.0,
        circuit_recovery_timeout=60.0,
    )  # fmt: skip
    async with client_for(app) as client:
        breaker = dbpool.get_runtime(app).databases["primary"].breaker
        for _ in range(breaker.failure_threshold):
            breaker.record_failure()
        opened = await scrape(client)
        # Time for a trial: the next call goes through, half-open; its success closes.
        assert breaker.allow(now=breaker.clock() + breaker.recovery_timeout)
        half_open = await scrape(client)
        breaker.record_success()
        closed = await scrape(client)

    def state(exposition: str) -> dict[str, float | None]:
        return {
            s: metric(exposition, "dbpool_circuit_breaker_state", state=s)
            for s in ("closed", "open", "half_open")
        }

    assert state(opened) == {"closed": 0, "open": 1, "half_open": 0}
    assert state(half_open) == {"closed": 0, "open": 0, "half_open": 1}
    assert state(closed) == {"closed": 1, "open": 0, "half_open": 0}
    moves = "dbpool_circuit_breaker_transitions_total"
    assert metric(closed, moves, **{"from": "closed", "to": "open"}) == 1
    assert metric(closed, moves, **{"from": "open", "to": "half_open"}) == 1
    assert metric(closed, moves, **{"from": "half_open", "to": "closed"}) == 1
    assert metric(closed, moves, **{"from": "half_open", "to": "open"}) == 0
    assert metric(opened, "dbpool_circuit_breaker_rejections_total") == 0


async def test_a_leak_is_counted_by_kind(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build("install", database_url, monkeypatch, CollectorRegistry())
    kept: list[AsyncConnection] = []

    @app.get("/leak")
    async def leak() -> dict[str, int]:
        # Taken under the request and never given back: it outlives the request.
        kept.append(await dbpool.get_runtime(app).engine().connect())
        return {"kept": len(kept)}

    async with client_for(app) as client:
        assert (await client.get("/leak")).status_code == 200
        exposition = await poll(
            lambda: scrape(client),
            lambda t: metric(t, "dbpool_leaks_total", kind="outlived_request") == 1,
        )
        for conn in kept:
            await conn.close()
    assert metric(exposition, "dbpool_leaks_total", kind="held_too_long") == 0
    assert metric(exposition, "dbpool_connections", state="used") == 1


@pytest.mark.parametrize("form", FORMS)
async def test_http_metrics_off_by_the_setting(
    form: Form, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = CollectorRegistry()
    app = build(form, database_url, monkeypatch, registry, http_metrics=False)
    async with client_for(app) as client:
        assert (await client.get("/items/1")).status_code == 200
        exposition = await scrape(client)
    types = family_types(exposition)
    assert "dbpool_connections" in types
    assert not {name for name in types if name.startswith("http_")}
    assert metric(exposition, "dbpool_checkout_wait_seconds_count") == 4 + 1


async def test_rebuilt_middleware_stack_neither_fails_nor_double_counts(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = CollectorRegistry()
    app = build("install", database_url, monkeypatch, registry)
    # Starlette builds the stack on first call; anything may build it again (tests,
    # frameworks on top). Each build makes a new DBPoolMiddleware.
    app.build_middleware_stack()
    app.build_middleware_stack()
    async with client_for(app) as client:
        assert (await client.get("/items/1")).status_code == 200
        app.middleware_stack = app.build_middleware_stack()
        assert (await client.get("/items/2")).status_code == 200
        app.middleware_stack = app.build_middleware_stack()
        assert (await client.get("/items/3")).status_code == 200
        exposition = await scrape(client)
    assert metric(exposition, "http_requests_total", handler="/items/{item_id}") == 3
    assert metric(exposition, "http_request_duration_seconds_count") == 3
    assert metric(exposition, "dbpool_connections_max") == 4


async def test_two_apps_with_their_own_registries_see_only_their_own(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry_a, registry_b = CollectorRegistry(), CollectorRegistry()
    app_a = build("install", database_url, monkeypatch, registry_a, pool_size=2)
    app_b = build("install", database_url, monkeypatch, registry_b, pool_size=3)
    async with client_for(app_a) as a, client_for(app_b) as b:
        await a.get("/items/1")
        for _ in range(2):
            await b.get("/items/1")
        seen_a, seen_b = await scrape(a), await scrape(b)
    assert metric(seen_a, "dbpool_connections_max") == 2
    assert metric(seen_b, "dbpool_connections_max") == 3
    assert metric(seen_a, "http_requests_total", handler="/items/{item_id}") == 1
    assert metric(seen_b, "http_requests_total", handler="/items/{item_id}") == 2
    # Stopped apps leave their families described and empty.
    after = generate_latest(registry_a).decode()
    assert "dbpool_connections" in family_types(after)
    assert metric(after, "dbpool_connections") is None


async def test_two_apps_on_the_default_registry_add_up(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def default(name: str, **labels: str) -> float:
        return metric(generate_latest(REGISTRY).decode(), name, **labels) or 0.0

    template = {"handler": "/items/{item_id}"}
    max_before = default("dbpool_connections_max", database="primary")
    http_before = default("http_requests_total", **template)
    app_a = build("install", database_url, monkeypatch, None, pool_size=2)
    app_b = build("explicit", database_url, monkeypatch, None, pool_size=3)
    async with client_for(app_a) as a, client_for(app_b) as b:
        await a.get("/items/1")
        for _ in range(2):
            await b.get("/items/1")
        seen = await scrape(a)
        also_seen = await scrape(b)
    # One process, one registry: the two pools add up, as a pod's workers do.
    assert duplicate_series(seen) == []
    assert metric(seen, "dbpool_connections_max", database="primary") == max_before + 5
    assert metric(also_seen, "dbpool_connections_max", database="primary") == max_before + 5
    assert metric(seen, "http_requests_total", **template) == http_before + 3
    assert default("dbpool_connections_max", database="primary") == max_before


async def test_openmetrics_when_the_scraper_asks_for_it(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build("install", database_url, monkeypatch, CollectorRegistry())
    async with client_for(app) as client:
        response = await client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "dbpool_checkout_timeouts_total" in response.text


async def test_an_instrumentator_of_its_own_on_the_same_registry_stops_startup(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = CollectorRegistry()
    app = build("install", database_url, monkeypatch, registry)
    Instrumentator(registry=registry).instrument(app)
    with pytest.raises(dbpool.ConfigurationError, match="DB_HTTP_METRICS=false"):
        async with client_for(app):
            pass


async def test_metrics_without_the_lifespan_names_the_missing_line() -> None:
    app = FastAPI()
    app.include_router(dbpool.router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(dbpool.NotInstalledError, match=r"FastAPI\(lifespan=dbpool.lifespan\)"):
            await client.get("/metrics")
