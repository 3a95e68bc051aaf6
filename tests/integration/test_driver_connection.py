"""``driver_connection``: the request's asyncpg connection, with the pool's guarantees."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg
import greenlet
import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool
from fastapi_dbpool import get_session
from tests.helpers import wait_until
from tests.helpers.apps import client_for, leave_once, make_app, serve, settings_for
from tests.helpers.pg import statement_active
from tests.helpers.proxy import FaultProxy
from tests.integration.test_sessions import (
    _cancel,
    _get_in_a_cancel_scope,
    checked_out,
    create_items,
    item_names,
    plain_dsn,
)

driver = dbpool.driver_connection()


def _one_connection_app(database_url: str, **overrides: Any) -> FastAPI:
    values: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "checkout_timeout": 2.0}
    values.update(overrides)
    return make_app(settings_for(database_url, **values))


def _add_pid_route(app: FastAPI) -> None:
    """``GET /pid``: the server pid of the driver connection the request gets."""

    @app.get("/pid")
    async def pid(conn: asyncpg.Connection = Depends(driver)) -> dict[str, int]:
        return {"pid": await conn.fetchval("SELECT pg_backend_pid()")}


def _database(app: FastAPI) -> Any:
    return dbpool.get_runtime(app).databases["primary"]


async def test_statements_run_without_a_transaction_on_the_pools_connection(
    database_url: str,
) -> None:
    app = _one_connection_app(database_url)
    observed: list[int] = []
    seen: list[Any] = []

    async def sub(conn: asyncpg.Connection = Depends(driver)) -> asyncpg.Connection:
        seen.append(conn)
        return conn

    @app.get("/ids")
    async def ids(
        background: BackgroundTasks,
        a: asyncpg.Connection = Depends(driver),
        b: asyncpg.Connection = Depends(sub),
    ) -> dict[str, Any]:
        first = await a.fetchval("SELECT txid_current()")
        second = await b.fetchval("SELECT txid_current()")
        assert checked_out(app) == 1  # the handler really holds the pool's connection
        background.add_task(lambda: observed.append(checked_out(app)))
        return {
            "same": a is b,
            "is_connection": isinstance(a, asyncpg.Connection),
            "in_block": first == second,
            "pid": await a.fetchval("SELECT pg_backend_pid()"),
        }

    @app.get("/session-ids")
    async def session_ids(session: AsyncSession = Depends(get_session)) -> dict[str, Any]:
        first = (await session.execute(text("SELECT txid_current()"))).scalar_one()
        second = (await session.execute(text("SELECT txid_current()"))).scalar_one()
        pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        return {"in_block": first == second, "pid": pid}

    async with client_for(app) as client:
        raw = (await client.get("/ids")).json()
        after = (await client.get("/session-ids")).json()
    # Autocommit: each statement a transaction of its own; every dependency of the
    # request got the same connection, an asyncpg.Connection as far as isinstance goes.
    assert raw == {"same": True, "is_connection": True, "in_block": False, "pid": raw["pid"]}
    assert seen == [seen[0]]
    # Back in the pool before the response was sent.
    assert observed == [0]
    # The same connection serves the next request's session, in a transaction block as
    # usual: nothing of the driver's use was left on it.
    assert after == {"in_block": True, "pid": raw["pid"]}


async def test_using_the_connection_after_the_response_is_a_clear_error(
    database_url: str,
) -> None:
    app = _one_connection_app(database_url)
    outcome: list[BaseException] = []

    @app.get("/later")
    async def later(
        background: BackgroundTasks, conn: asyncpg.Connection = Depends(driver)
    ) -> dict[str, int]:
        async def use_again() -> None:
            try:
                await conn.fetchval("SELECT 1")
            except BaseException as exc:
                outcome.append(exc)

        background.add_task(use_again)
        return {"value": await conn.fetchval("SELECT 1")}

    async with client_for(app) as client:
        assert (await client.get("/later")).json() == {"value": 1}
    assert len(outcome) == 1 and isinstance(outcome[0], dbpool.DriverReleasedError)
    assert "went back to the pool" in str(outcome[0])


async def test_statement_timeout_is_the_servers_and_keeps_the_connection(
    database_url: str,
) -> None:
    app = _one_connection_app(database_url, command_timeout=0.5, application_name="dbpool-drv-st")

    @app.get("/slow")
    async def slow(conn: asyncpg.Connection = Depends(driver)) -> None:
        await conn.execute("SELECT pg_sleep(30)")

    @app.get("/state")
    async def state(conn: asyncpg.Connection = Depends(driver)) -> dict[str, Any]:
        return {
            "timeout": await conn.fetchval("SHOW statement_timeout"),
            "pid": await conn.fetchval("SELECT pg_backend_pid()"),
        }

    async with client_for(app) as client:
        before = (await client.get("/state")).json()
        started = time.monotonic()
        response = await client.get("/slow")
        elapsed = time.monotonic() - started
        after = (await client.get("/state")).json()
        database = _database(app)
        assert checked_out(app) == 0
    assert response.status_code == 504
    assert response.json() == {"detail": "the database statement exceeded its time limit"}
    assert 0.45 <= elapsed < 2.0
    assert database.stats.statement_timeouts == 1
    # A statement the server cancelled leaves the connection usable: it was kept.
    assert after == before == {"timeout": "500ms", "pid": before["pid"]}
    assert database.breaker.failures == 0


async def test_per_route_timeout_is_set_for_the_request_and_reset_after(
    database_url: str,
) -> None:
    app = _one_connection_app(database_url, command_timeout=0.4, client_timeout_grace=0.3)

    @app.get("/strict")
    async def strict(
        conn: asyncpg.Connection = Depends(dbpool.driver_connection(timeout=0.2)),
    ) -> None:
        await conn.execute("SELECT pg_sleep(5)")

    @app.get("/report")
    async def report(
        conn: asyncpg.Connection = Depends(dbpool.driver_connection(timeout=3)),
    ) -> dict[str, str]:
        # Longer than both the default statement timeout and the client-side backstop.
        await conn.execute("SELECT pg_sleep(1.0)")
        return {"timeout": await conn.fetchval("SHOW statement_timeout")}

    @app.get("/default")
    async def default(conn: asyncpg.Connection = Depends(driver)) -> dict[str, str]:
        return {"timeout": await conn.fetchval("SHOW statement_timeout")}

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
    # The pool's only connection is back at the default: the route's SET was undone.
    assert default_response.json() == {"timeout": "400ms"}


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        dbpool.driver_connection(timeout=0)


async def test_lock_timeout_is_a_504(database_url: str) -> None:
    await create_items(database_url)
    app = _one_connection_app(database_url, lock_timeout=0.3)

    @app.put("/items/1")
    async def update(conn: asyncpg.Connection = Depends(driver)) -> None:
        await conn.execute("UPDATE items SET name = 'mine' WHERE id = 1")

    blocker = await asyncpg.connect(plain_dsn(database_url))
    try:
        await blocker.execute("INSERT INTO items (name) VALUES ('a')")
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT * FROM items WHERE id = 1 FOR UPDATE")
        async with client_for(app) as client:
            response = await client.put("/items/1")
        await tx.rollback()
    finally:
        await blocker.close()
    assert response.status_code == 504
    assert "lock" in response.json()["detail"]


async def test_a_transaction_left_open_is_rolled_back_and_a_finished_one_kept(
    database_url: str,
) -> None:
    await create_items(database_url)
    app = _one_connection_app(database_url)

    @app.post("/left-open")
    async def left_open(conn: asyncpg.Connection = Depends(driver)) -> dict[str, bool]:
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO items (name) VALUES ('lost')")
        return {"in_transaction": conn.is_in_transaction()}

    @app.post("/committed")
    async def committed(conn: asyncpg.Connection = Depends(driver)) -> dict[str, bool]:
        async with conn.transaction():
            await conn.execute("INSERT INTO items (name) VALUES ('kept')")
        return {"in_transaction": conn.is_in_transaction()}

    async with client_for(app) as client:
        assert (await client.post("/left-open")).json() == {"in_transaction": True}
        # The same (only) connection, next request: no transaction carried over.
        assert (await client.post("/committed")).json() == {"in_transaction": False}
    assert await item_names(database_url) == ["kept"]


async def test_no_connection_within_the_checkout_timeout_is_a_503(database_url: str) -> None:
    app = _one_connection_app(database_url, checkout_timeout=0.5)
    holding = asyncio.Event()
    release = asyncio.Event()

    @app.get("/hold")
    async def hold(conn: asyncpg.Connection = Depends(driver)) -> dict[str, int]:
        holding.set()
        await release.wait()
        return {"value": await conn.fetchval("SELECT 1")}

    async with client_for(app) as client:
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holding.wait(), 5)
        started = time.monotonic()
        refused = await client.get("/hold")
        waited = time.monotonic() - started
        release.set()
        assert (await holder).json() == {"value": 1}
        assert _database(app).stats.checkout_timeouts == 1
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["detail"]
    assert 0.45 <= waited < 2.0


async def test_an_open_breaker_refuses_without_a_checkout(database_url: str) -> None:
    app = _one_connection_app(database_url, circuit_failure_threshold=2)

    @app.get("/q")
    async def query(conn: asyncpg.Connection = Depends(driver)) -> dict[str, int]:
        return {"value": await conn.fetchval("SELECT 1")}

    async with client_for(app) as client:
        assert (await client.get("/q")).status_code == 200
        database = _database(app)
        database.breaker.record_failure()
        database.breaker.record_failure()
        checkouts = database.stats.checkouts
        refused = await client.get("/q")
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json() == {"detail": "the primary database is unavailable; retry later"}
    assert database.stats.checkouts == checkouts


async def test_a_killed_connection_is_a_503_counted_by_the_breaker_and_replaced(
    database_url: str,
) -> None:
    app = _one_connection_app(database_url)
    admin = await asyncpg.connect(plain_dsn(database_url))

    _add_pid_route(app)

    @app.get("/killed")
    async def killed(conn: asyncpg.Connection = Depends(driver)) -> None:
        await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        await conn.fetchval("SELECT 1")

    try:
        async with client_for(app) as client:
            first = (await client.get("/pid")).json()["pid"]
            response = await client.get("/killed")
            database = _database(app)
            failures = database.breaker.failures
            after = await client.get("/pid")
            assert checked_out(app) == 0
    finally:
        await admin.close()
    assert response.status_code == 503
    assert response.json() == {"detail": "the database is unavailable"}
    assert failures == 1
    # The next request's success closes the count again.
    assert database.breaker.failures == 0
    # The dead connection was discarded: the next request got a new one.
    assert after.status_code == 200 and after.json()["pid"] != first


async def test_a_server_that_stops_answering_is_a_504_and_the_connection_discarded(
    database_url: str,
) -> None:
    server = make_url(database_url)
    proxy = await FaultProxy(server.host or "127.0.0.1", server.port or 5432).start()
    app = _one_connection_app(
        proxy.url_for(database_url), command_timeout=0.3, client_timeout_grace=0.2
    )

    @app.get("/q")
    async def query(conn: asyncpg.Connection = Depends(driver)) -> dict[str, int]:
        return {"value": await conn.fetchval("SELECT 1")}

    try:
        async with client_for(app) as client:
            database = _database(app)
            assert (await client.get("/q")).status_code == 200
            invalidated = asyncio.Event()
            event.listen(database.pool, "invalidate", lambda *_: invalidated.set())
            proxy.blackhole()
            started = time.monotonic()
            response = await client.get("/q")
            elapsed = time.monotonic() - started
            # The answer is not waited for: the connection is dropped at once.
            assert invalidated.is_set()
            failures = database.breaker.failures
            proxy.passthrough()
            after = await client.get("/q")
    finally:
        await proxy.stop()
    assert response.status_code == 504
    assert response.json() == {"detail": "the primary database did not answer within its deadline"}
    assert 0.45 <= elapsed < 2.0
    assert failures == 1
    assert database.stats.statement_timeouts == 1
    assert after.status_code == 200 and after.json() == {"value": 1}


async def test_a_client_leaving_cancels_the_statement_and_frees_the_connection(
    database_url: str,
) -> None:
    app = make_app(settings_for(database_url, application_name="dbpool-drv-disc"))

    @app.get("/long")
    async def long(conn: asyncpg.Connection = Depends(driver)) -> None:
        await conn.execute("SELECT pg_sleep(60)")

    async def query_running() -> bool:
        return await statement_active(database_url, "dbpool-drv-disc", "pg_sleep")

    async def query_gone() -> bool:
        return not await query_running()

    async with serve(app) as base_url:
        await leave_once(base_url, "/long", query_running)
        await wait_until(query_gone, 3, message="query cancelled on the server")
        await wait_until(lambda: checked_out(app) == 0, 3, message="connection back")
        # A client leaving is not a database failure.
        assert _database(app).breaker.failures == 0


async def test_a_streamed_body_holds_the_connection_until_it_ends(database_url: str) -> None:
    app = _one_connection_app(database_url)
    during: list[int] = []

    @app.get("/export")
    async def export(conn: asyncpg.Connection = Depends(driver)) -> StreamingResponse:
        async def rows() -> Any:
            for i in range(3):
                yield f"{await conn.fetchval('SELECT $1::int', i)}\n"
                during.append(checked_out(app))

        return StreamingResponse(rows(), media_type="text/plain")

    async with client_for(app) as client:
        response = await client.get("/export")
        assert checked_out(app) == 0
    assert response.text == "0\n1\n2\n"
    assert during == [1, 1, 1]


async def test_an_error_in_the_route_keeps_a_clean_connection(database_url: str) -> None:
    app = _one_connection_app(database_url)

    _add_pid_route(app)

    @app.get("/bad-sql")
    async def bad_sql(conn: asyncpg.Connection = Depends(driver)) -> None:
        await conn.execute("SELECT * FROM no_such_table")

    async with client_for(app, raise_app_exceptions=False) as client:
        first = (await client.get("/pid")).json()["pid"]
        failed = await client.get("/bad-sql")
        after = (await client.get("/pid")).json()["pid"]
        assert _database(app).breaker.failures == 0
    assert failed.status_code == 500
    assert after == first


async def test_wiring_mistakes_are_clear_errors(database_url: str) -> None:
    no_middleware = FastAPI()

    @no_middleware.get("/q")
    async def query(conn: asyncpg.Connection = Depends(driver)) -> None:
        pass

    transport = httpx.ASGITransport(app=no_middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(dbpool.NotInstalledError, match="DBPoolMiddleware"):
            await client.get("/q")

    app = _one_connection_app(database_url)

    @app.get("/replica")
    async def replica(
        conn: asyncpg.Connection = Depends(dbpool.driver_connection("replica")),
    ) -> None:
        pass

    async with client_for(app) as client:
        with pytest.raises(dbpool.ConfigurationError, match="DATABASE_REPLICA_URL"):
            await client.get("/replica")


async def test_the_replica_is_reached_by_name(database_url: str) -> None:
    app = make_app(
        settings_for(database_url, replica_url=database_url, application_name="dbpool-drv-rep")
    )

    @app.get("/both")
    async def both(
        primary: asyncpg.Connection = Depends(driver),
        replica: asyncpg.Connection = Depends(dbpool.driver_connection("replica")),
    ) -> dict[str, bool]:
        one = await primary.fetchval("SELECT pg_backend_pid()")
        two = await replica.fetchval("SELECT pg_backend_pid()")
        return {"different": one != two}

    async with client_for(app) as client:
        replica_stats = dbpool.get_runtime(app).databases["replica"].stats
        before = replica_stats.checkouts
        assert (await client.get("/both")).json() == {"different": True}
        assert replica_stats.checkouts == before + 1
        assert checked_out(app, "replica") == 0


async def test_a_timeout_of_something_else_is_not_blamed_on_the_database(
    database_url: str,
) -> None:
    # A TimeoutError from another service the route awaited, while it holds a healthy
    # driver: nothing for the breaker, and the connection is kept.
    app = _one_connection_app(database_url)

    _add_pid_route(app)

    @app.get("/upstream")
    async def upstream(conn: asyncpg.Connection = Depends(driver)) -> None:
        await conn.fetchval("SELECT 1")
        raise TimeoutError("the pricing service did not answer")

    async with client_for(app, raise_app_exceptions=False) as client:
        first = (await client.get("/pid")).json()["pid"]
        await client.get("/upstream")
        database = _database(app)
        failures = database.breaker.failures
        timeouts = database.stats.statement_timeouts
        after = (await client.get("/pid")).json()["pid"]
    assert failures == 0 and timeouts == 0
    assert after == first


@pytest.mark.parametrize("cancellation", ["once", "scope"])
async def test_a_cancelled_request_cancels_its_statement_before_the_connection_returns(
    database_url: str, cancellation: str
) -> None:
    # Cancelled once (asyncio: shutdown, a client gone) or through an anyio cancel scope
    # (which cancels every await inside it again): the statement in flight is cancelled
    # on the server, and the pool's only connection comes back and serves again.
    app = _one_connection_app(database_url, application_name="dbpool-drv-cancel")
    started = asyncio.Event()

    @app.get("/long")
    async def long(conn: asyncpg.Connection = Depends(driver)) -> None:
        started.set()
        await conn.execute("SELECT pg_sleep(60)")

    @app.get("/q")
    async def query(conn: asyncpg.Connection = Depends(driver)) -> dict[str, int]:
        return {"value": await conn.fetchval("SELECT 1")}

    async def sleeping() -> bool:
        return await statement_active(database_url, "dbpool-drv-cancel", "pg_sleep")

    async def not_sleeping() -> bool:
        return not await sleeping()

    async with client_for(app) as client:
        request, scope = _get_in_a_cancel_scope(client, "/long")
        await asyncio.wait_for(started.wait(), 5)
        await wait_until(sleeping, 5, message="pg_sleep running on the server")
        await _cancel(request, scope, cancellation)
        with contextlib.suppress(asyncio.CancelledError, AssertionError):
            await asyncio.wait_for(request, 10)
        await wait_until(not_sleeping, 5, message="statement cancelled on the server")
        await wait_until(lambda: checked_out(app) == 0, 5, message="connection back")
        after = await client.get("/q")
        assert after.status_code == 200 and after.json() == {"value": 1}
        assert _database(app).breaker.failures == 0


async def test_a_driver_route_is_refused_at_the_door_while_the_queue_is_full(
    database_url: str,
) -> None:
    # Like a session route: once learned to always need the database, a driver route is
    # answered 503 before any of the app's code runs while the pool's queue is full.
    app = _one_connection_app(database_url, checkout_timeout=5.0, max_waiting=1)
    holding = asyncio.Event()
    release = asyncio.Event()
    ran = {"auth": 0}

    async def auth() -> None:
        ran["auth"] += 1

    @app.get("/hold")
    async def hold(conn: asyncpg.Connection = Depends(driver)) -> dict[str, int]:
        holding.set()
        await release.wait()
        return {"value": await conn.fetchval("SELECT 1")}

    @app.get("/counted", dependencies=[Depends(auth)])
    async def counted(conn: asyncpg.Connection = Depends(driver)) -> dict[str, int]:
        return {"value": await conn.fetchval("SELECT 1")}

    async with client_for(app) as client:
        assert (await client.get("/counted")).json() == {"value": 1}  # learned
        assert ran["auth"] == 1
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holding.wait(), 5)
        database = _database(app)
        queued = asyncio.create_task(client.get("/counted"))
        await wait_until(lambda: database.stats.waiting == 1, 5, message="one request queued")
        refused = await client.get("/counted")
        release.set()
        assert (await holder).status_code == 200
        assert (await queued).json() == {"value": 1}
    assert refused.status_code == 503
    assert "busy" in refused.json()["detail"]
    # The refused request never reached the route's dependencies: 1 learned + 1 queued.
    assert ran["auth"] == 2


async def test_checkout_runs_in_a_reused_greenlet(database_url: str) -> None:
    # The pool's checkout runs in SQLAlchemy's greenlet context: a reused one
    # (greenlets.py), not one made, mapped and unmapped per request.
    app = _one_connection_app(database_url)
    _add_pid_route(app)
    seen: list[Any] = []

    async with client_for(app) as client:
        engine = _database(app).engine.sync_engine

        def checkout(*_: Any) -> None:
            seen.append(greenlet.getcurrent())

        event.listen(engine, "checkout", checkout)
        try:
            pids = {(await client.get("/pid")).json()["pid"] for _ in range(5)}
        finally:
            event.remove(engine, "checkout", checkout)
    assert len(pids) == 1
    # Kept alive by the list: distinct greenlets would be distinct objects.
    assert len(seen) == 5 and len({id(g) for g in seen}) == 1
    assert seen[0] is not greenlet.getcurrent()
