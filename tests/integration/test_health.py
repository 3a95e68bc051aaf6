"""Readiness answered from cached state; liveness never touches the database."""

from __future__ import annotations

import asyncio

import pytest

import fastapi_dbpool as dbpool
from fastapi_dbpool.embedded import EmbeddedPostgres
from tests.helpers import wait_until
from tests.helpers.apps import client_for, make_app, settings_for
from tests.helpers.proxy import FaultProxy


async def test_readiness_costs_at_most_one_probe_query_per_interval(database_url: str) -> None:
    app = make_app(settings_for(database_url, health_check_interval=1.0))
    async with client_for(app) as client:
        probe = dbpool.get_runtime(app).probes["primary"]
        pool = dbpool.get_runtime(app).databases["primary"]
        before = probe.queries
        checkouts_before = pool.stats.checkouts
        # Kubernetes (or a storm of scrapers) asking far more often than the interval.
        loop = asyncio.get_running_loop()
        started = loop.time()
        responses = await asyncio.gather(*(client.get("/health/database") for _ in range(500)))
        elapsed = loop.time() - started
        queries = probe.queries - before
        checkouts = pool.stats.checkouts - checkouts_before
    assert {r.status_code for r in responses} == {200}
    assert checkouts == 0  # never from the request pool
    # The startup probe ran before; at most one more per started interval.
    assert queries <= int(elapsed / (1.0 * 0.9)) + 1


async def test_details_that_help_an_attacker_only_when_enabled(database_url: str) -> None:
    secret = "pw-Not-For-Health"
    url = database_url.replace("postgres@", f"postgres:{secret}@", 1)
    for details in (False, True):
        app = make_app(settings_for(url, health_details=details))
        async with client_for(app) as client:
            response = await client.get("/health/database")
        primary = response.json()["databases"]["primary"]
        assert secret not in response.text
        if details:
            assert primary["server_version"]
            assert primary["url"].endswith(database_url.rsplit("/", 1)[1])
            assert "***" in primary["url"]
        else:
            assert "server_version" not in primary and "url" not in primary
            host = database_url.split("@", 1)[1].split("/", 1)[0]
            assert host not in response.text


@pytest.mark.faults
async def test_liveness_and_the_stay_ready_setting_while_the_database_is_down(
    private_pg: EmbeddedPostgres,
) -> None:
    proxy = FaultProxy("127.0.0.1", private_pg.port)
    await proxy.start()
    try:
        common = {
            "connect_timeout": 0.5,
            "health_check_interval": 0.5,
            "circuit_failure_threshold": 1,
            "circuit_recovery_timeout": 30.0,
        }
        strict = make_app(settings_for(proxy.url_for(private_pg.url()), **common))
        lenient = make_app(
            settings_for(
                proxy.url_for(private_pg.url()), readiness_requires_database=False, **common
            )
        )
        async with client_for(strict) as s_client, client_for(lenient) as l_client:
            proxy.refuse()
            proxy.reset_all()
            for app in (strict, lenient):
                breaker = dbpool.get_runtime(app).databases["primary"].breaker
                await wait_until(lambda b=breaker: b.state.value == "open", 5)
            s_ready = await s_client.get("/health/database")
            l_ready = await l_client.get("/health/database")
            loop = asyncio.get_running_loop()
            started = loop.time()
            live = await s_client.get("/health/live")
            live_took = loop.time() - started
    finally:
        proxy.passthrough()
        await proxy.stop()
    assert s_ready.status_code == 503 and s_ready.json()["status"] == "unavailable"
    assert l_ready.status_code == 200 and l_ready.json()["status"] == "degraded"
    assert l_ready.json()["databases"]["primary"]["status"] == "unavailable"
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert live_took < 0.1


@pytest.mark.parametrize("catch_all", [False, True])
async def test_the_probes_answer_wherever_startup_put_their_routes(
    database_url: str, catch_all: bool
) -> None:
    app = make_app(settings_for(database_url))

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    if catch_all:

        @app.get("/{path:path}")
        async def everything(path: str) -> dict[str, str]:
            return {"caught": path}

    async with client_for(app) as client:
        order = [getattr(route, "path", None) for route in app.router.routes]
        live = await client.get("/health/live")
        ready = await client.get("/health/database")
        scraped = await client.get("/metrics")
        wrong_method = await client.post("/health/live")
        own = await client.get("/items/3")
    # Behind the app's own routes unless one of them could answer the probes' paths.
    assert (order.index("/health/live") > order.index("/items/{item_id}")) is not catch_all
    assert live.json() == {"status": "ok"}
    assert ready.status_code == 200 and ready.json()["status"] == "ok"
    assert scraped.status_code == 200 and "dbpool_connections" in scraped.text
    assert wrong_method.status_code == 405
    assert own.json() == {"id": 3}
