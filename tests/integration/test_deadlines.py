"""Deadlines, each enforced by the real server (or, for a dead network, by the client)."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import pytest
from fastapi import Depends, Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool
import fastapi_dbpool.requests
from fastapi_dbpool import get_session
from tests.helpers import wait_until
from tests.helpers.apps import (
    client_for,
    holding_app,
    leave_once,
    make_app,
    serve,
    settings_for,
)
from tests.helpers.pg import app_backends, statement_active
from tests.integration.test_sessions import checked_out, create_items, plain_dsn


async def test_no_pooled_connection_within_checkout_timeout_is_503_with_retry_after(
    database_url: str,
) -> None:
    app, holding, release = holding_app(database_url, pool_size=1, checkout_timeout=0.5)

    async with client_for(app) as client:
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holding.wait(), 5)
        started = time.monotonic()
        response = await client.get("/query")
        waited = time.monotonic() - started
        release.set()
        assert (await holder).status_code == 200
        after = await client.get("/query")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/json"
    assert "busy" in response.json()["detail"]
    assert 0.45 <= waited < 2.0
    assert after.json() == {"value": 1}


async def test_statement_timeout_is_enforced_by_the_server_as_504(database_url: str) -> None:
    app = make_app(settings_for(database_url, command_timeout=0.5, application_name="dbpool-st"))

    @app.get("/slow")
    async def slow(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("SELECT pg_sleep(30)"))

    @app.get("/state")
    async def state(session: AsyncSession = Depends(get_session)) -> dict[str, str]:
        return {"tx": (await session.execute(text("SHOW statement_timeout"))).scalar_one()}

    async with client_for(app) as client:
        started = time.monotonic()
        response = await client.get("/slow")
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert response.json() == {"detail": "the database statement exceeded its time limit"}
        assert 0.45 <= elapsed < 2.0
        # The query is gone from the server and nothing is left idle in a transaction.
        rows = await app_backends(database_url, "dbpool-st")
        assert not [r for r in rows if "pg_sleep" in (r["query"] or "") and r["state"] == "active"]
        assert not [r for r in rows if r["state"] == "idle in transaction"]
        assert checked_out(app) == 0
        # The connection is clean: the next request on it works.
        assert (await client.get("/state")).json() == {"tx": "500ms"}


async def test_per_route_timeout_overrides_the_default_both_ways(database_url: str) -> None:
    app = make_app(settings_for(database_url, command_timeout=0.4, client_timeout_grace=0.3))

    @app.get("/strict")
    async def strict(session: AsyncSession = Depends(dbpool.session(timeout=0.2))) -> None:
        await session.execute(text("SELECT pg_sleep(5)"))

    @app.get("/report")
    async def report(
        session: AsyncSession = Depends(dbpool.session(timeout=3)),
    ) -> dict[str, str]:
        # Longer than both the default statement timeout and the client-side backstop.
        await session.execute(text("SELECT pg_sleep(1.0)"))
        return {"timeout": (await session.execute(text("SHOW statement_timeout"))).scalar_one()}

    @app.get("/default")
    async def default(session: AsyncSession = Depends(get_session)) -> dict[str, str]:
        return {"timeout": (await session.execute(text("SHOW statement_timeout"))).scalar_one()}

    async with client_for(app) as client:
        started = time.monotonic()
        strict_response = await client.get("/strict")
        strict_elapsed = time.monotonic() - started
        report_response = await client.get("/report")
        default_response = await client.get("/default")
    assert strict_response.status_code == 504
    assert strict_elapsed < 0.4 + 0.3  # the route's 0.2 s fired, not the default
    assert report_response.status_code == 200, report_response.text
    assert report_response.json() == {"timeout": "3s"}
    # The override was SET LOCAL: it did not leak to the next transaction.
    assert default_response.json() == {"timeout": "400ms"}


async def test_lock_timeout_is_enforced_by_the_server(database_url: str) -> None:
    await create_items(database_url)
    app = make_app(settings_for(database_url, lock_timeout=0.3))

    @app.put("/items/1")
    async def update(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("UPDATE items SET name = 'mine' WHERE id = 1"))
        await session.commit()

    blocker = await asyncpg.connect(plain_dsn(database_url))
    try:
        await blocker.execute("INSERT INTO items (name) VALUES ('a')")
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT * FROM items WHERE id = 1 FOR UPDATE")
        async with client_for(app) as client:
            started = time.monotonic()
            response = await client.put("/items/1")
            elapsed = time.monotonic() - started
        await tx.rollback()
    finally:
        await blocker.close()
    assert response.status_code == 504
    assert "lock" in response.json()["detail"]
    assert 0.25 <= elapsed < 2.0


async def test_client_disconnect_cancels_the_query_and_frees_the_connection(
    database_url: str,
) -> None:
    app = make_app(settings_for(database_url, application_name="dbpool-disc"))

    @app.get("/long")
    async def long(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("SELECT pg_sleep(60)"))

    async def query_running() -> bool:
        return await statement_active(database_url, "dbpool-disc", "pg_sleep")

    async def query_gone() -> bool:
        return not await query_running()

    async with serve(app) as base_url:
        await leave_once(base_url, "/long", query_running)
        cancelled_at = time.monotonic()
        await wait_until(query_gone, 3, message="query cancelled on the server")
        took = time.monotonic() - cancelled_at

        async def pool_free() -> bool:
            return checked_out(app) == 0

        await wait_until(pool_free, 3, message="connection back in the pool")
        rows = await app_backends(database_url, "dbpool-disc")
        assert not [r for r in rows if r["state"] in ("idle in transaction", "active")]
        # A client leaving is not a database failure: the breaker counted nothing.
        assert dbpool.get_runtime(app).databases["primary"].breaker.failures == 0
    # The watch starts 1-1.5 delays after the request's first use of the database.
    assert took < 1.5 * fastapi_dbpool.requests.DISCONNECT_WATCH_DELAY + 0.25


async def test_error_bodies_and_logs_carry_no_url_password_or_parameters(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-Pa55"
    url = database_url.replace("postgres@", f"postgres:{secret}@", 1)
    assert secret in url
    app = make_app(settings_for(url, pool_size=1, checkout_timeout=0.3, command_timeout=0.3))
    holding = asyncio.Event()
    release = asyncio.Event()

    @app.get("/hold")
    async def hold(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("SELECT 1"))
        holding.set()
        await release.wait()

    @app.get("/slow")
    async def slow(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("SELECT pg_sleep(:s), :tag"), {"s": 5, "tag": "param-XYZ"})

    caplog.set_level(logging.DEBUG, logger="fastapi_dbpool")
    async with client_for(app) as client:
        timeout_response = await client.get("/slow")
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holding.wait(), 5)
        busy_response = await client.get("/slow")
        release.set()
        await holder
    assert timeout_response.status_code == 504
    assert busy_response.status_code == 503
    host = database_url.split("@", 1)[1].split("/", 1)[0]
    for response in (timeout_response, busy_response):
        for forbidden in (secret, "param-XYZ", host, "pg_sleep"):
            assert forbidden not in response.text
            assert forbidden not in str(response.headers)
    assert secret not in caplog.text
    assert "param-XYZ" not in caplog.text


async def test_unreachable_server_error_masks_the_password(database_url: str) -> None:
    app = make_app(
        settings_for(
            "postgresql://app:hunter2-pw@127.0.0.1:1/nowhere", connect_timeout=0.5, pool_size=None
        )
    )
    with pytest.raises(dbpool.ConfigurationError) as info:
        async with client_for(app):
            pass
    assert "hunter2-pw" not in str(info.value)
    assert "DB_MAX_CONNECTIONS" in str(info.value)


async def test_timeout_inside_a_task_group_is_still_a_504(database_url: str) -> None:
    app = make_app(settings_for(database_url, command_timeout=0.3))

    @app.get("/fanout")
    async def fanout(factory: dbpool.SessionFactory = Depends(dbpool.session_factory)) -> None:
        async def slow() -> None:
            async with factory() as s:
                await s.execute(text("SELECT pg_sleep(5)"))

        async with asyncio.TaskGroup() as group:
            group.create_task(slow())
            group.create_task(slow())

    async with client_for(app) as client:
        response = await client.get("/fanout")
        assert checked_out(app) == 0
    assert response.status_code == 504
    assert response.json() == {"detail": "the database statement exceeded its time limit"}


async def test_route_timeout_applies_even_when_an_earlier_dependency_queried(
    database_url: str,
) -> None:
    app = make_app(settings_for(database_url, command_timeout=30))

    async def current_user(session: AsyncSession = Depends(get_session)) -> str:
        return str((await session.execute(text("SELECT current_user"))).scalar_one())

    @app.get("/report")
    async def report(
        user: str = Depends(current_user),
        session: AsyncSession = Depends(dbpool.session(timeout=0.5)),
    ) -> dict[str, str]:
        return {"timeout": (await session.execute(text("SHOW statement_timeout"))).scalar_one()}

    async with client_for(app) as client:
        body = (await client.get("/report")).json()
    assert body == {"timeout": "500ms"}


async def test_checkout_timeout_error_is_also_sqlalchemys(database_url: str) -> None:
    from sqlalchemy.exc import TimeoutError as SATimeoutError

    app = make_app(settings_for(database_url, pool_size=1, checkout_timeout=0.2))
    async with client_for(app):
        engine = dbpool.get_runtime(app).engine()
        async with engine.connect() as held:
            await held.execute(text("SELECT 1"))
            with pytest.raises(dbpool.CheckoutTimeoutError) as info:
                async with engine.connect():
                    pass
    assert isinstance(info.value, SATimeoutError)
    assert "primary pool" in str(info.value) and "0.2s" in str(info.value)


async def test_a_full_queue_answers_503_at_once_instead_of_waiting(database_url: str) -> None:
    app, holding, release = holding_app(
        database_url, pool_size=1, checkout_timeout=5.0, max_waiting=2
    )

    async with client_for(app) as client:
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holding.wait(), 5)
        db = dbpool.get_runtime(app).databases["primary"]
        queued = [asyncio.create_task(client.get("/query")) for _ in range(2)]
        await wait_until(lambda: db.stats.waiting == 2, 5, message="two requests queued")
        started = time.monotonic()
        refused = await client.get("/query")
        took = time.monotonic() - started
        release.set()
        served = await asyncio.gather(holder, *queued)
        refusals = db.stats.refused
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert "busy" in refused.json()["detail"]
    assert took < 0.5  # not the 5 s checkout timeout
    assert [r.status_code for r in served] == [200, 200, 200]
    assert refusals == 1


def http_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, ((label, value), ...)): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize("http_metrics", [True, False], ids=["metrics", "no-metrics"])
async def test_a_saturated_pool_refuses_database_routes_at_the_door(
    database_url: str, http_metrics: bool
) -> None:
    """While the queue is full, a route whose requests always needed the database is
    refused before any of the app's code runs; other routes are served as usual."""
    app, holding, release = holding_app(
        database_url,
        pool_size=1,
        checkout_timeout=5.0,
        max_waiting=1,
        http_metrics=http_metrics,
    )
    ran = {"auth": 0}

    async def auth() -> None:
        ran["auth"] += 1

    @app.get("/counted", dependencies=[Depends(auth)])
    async def counted(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"value": (await session.execute(text("SELECT 1"))).scalar_one()}

    @app.get("/maybe")
    async def maybe(request: Request) -> dict[str, int]:
        if request.query_params.get("db") != "yes":
            return {"value": 0}
        session = await dbpool.session()()
        return {"value": (await session.execute(text("SELECT 1"))).scalar_one()}

    @app.get("/nodb")
    async def nodb() -> dict[str, str]:
        return {"status": "fine"}

    # One path, two methods: GET (defined first) never uses the database, POST always.
    @app.get("/pair")
    async def pair_read() -> dict[str, str]:
        return {"status": "fine"}

    @app.post("/pair", dependencies=[Depends(auth)])
    async def pair_write(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"value": (await session.execute(text("SELECT 1"))).scalar_one()}

    async with client_for(app) as client:
        # Learn: /counted and POST /pair always ask for the database, /maybe not always.
        assert (await client.post("/pair")).status_code == 200
        ran["auth"] = 0
        assert (await client.get("/counted")).status_code == 200
        assert (await client.get("/maybe?db=yes")).status_code == 200
        assert (await client.get("/maybe")).status_code == 200
        assert ran["auth"] == 1

        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holding.wait(), 5)
        db = dbpool.get_runtime(app).databases["primary"]
        queued = asyncio.create_task(client.get("/query"))
        await wait_until(lambda: db.stats.waiting == 1, 5, message="one request queued")

        refused = await client.get("/counted")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        assert "busy" in refused.json()["detail"]
        assert ran["auth"] == 1  # the app's dependency never ran
        # Not always a database route: it runs, and is refused only when it asks.
        assert (await client.get("/maybe")).json() == {"value": 0}
        assert (await client.get("/maybe?db=yes")).status_code == 503
        assert (await client.get("/nodb")).json() == {"status": "fine"}
        assert (await client.get("/health/live")).status_code == 200
        # The same path's other method is matched as the router matches it.
        assert (await client.post("/pair")).status_code == 503
        assert (await client.get("/pair")).json() == {"status": "fine"}
        assert ran["auth"] == 1
        assert db.stats.refused == 3
        # Counted in the HTTP metrics exactly as the instrumentator counts the 503 of the
        # normal path (GET /maybe?db=yes, refused by get_session).
        samples = http_samples((await client.get("/metrics")).text)
        for handler, method in (("/counted", "GET"), ("/pair", "POST"), ("/maybe", "GET")):
            labels = {"handler": handler, "method": method}
            total = samples.get(("http_requests_total", (*labels.items(), ("status", "5xx"))))
            assert total == (1 if http_metrics else None)
            if http_metrics:
                durations = ("http_request_duration_seconds_count", tuple(labels.items()))
                assert samples[durations] >= 1
                assert samples[("http_response_size_bytes_count", (("handler", handler),))] >= 1

        release.set()
        assert [r.status_code for r in await asyncio.gather(holder, queued)] == [200, 200]
        # Saturation over: the same route is let in again.
        assert (await client.get("/counted")).status_code == 200
        assert ran["auth"] == 2

        # An open breaker refuses at the door too, with the breaker's Retry-After.
        for _ in range(db.breaker.failure_threshold):
            db.breaker.record_failure()
        refused = await client.get("/counted")
        assert refused.status_code == 503
        assert 1 <= int(refused.headers["retry-after"]) <= 10
        assert "unavailable" in refused.json()["detail"]
        assert ran["auth"] == 2
        assert (await client.get("/nodb")).status_code == 200
