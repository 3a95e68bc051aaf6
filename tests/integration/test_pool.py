"""The pool keeps its overflow connections while they are in use (real PostgreSQL).

SQLAlchemy's queue pool closes a connection that comes back while ``pool_size`` others
sit idle, so a pool whose connections come back in bunches closes its overflow and opens
it again for the next bunch. The library's pool keeps them until they have been idle
``DB_POOL_OVERFLOW_IDLE`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from fastapi_dbpool import get_runtime, get_session
from fastapi_dbpool.pool import InstrumentedQueuePool
from tests.helpers import wait_until
from tests.helpers.apps import client_for, make_app, settings_for
from tests.helpers.pg import asyncpg_dsn, count_app_connections
from tests.helpers.proxy import FaultProxy

pytestmark = pytest.mark.asyncio

POOL_SIZE = 4
MAX_OVERFLOW = 4
ROUNDS = 5


def _equals(read: Callable[[], Awaitable[int]], expected: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await read() == expected

    return check


def count_opened(engine: AsyncEngine) -> dict[str, int]:
    counts = {"opened": 0, "closed": 0}

    def opened(*_: Any) -> None:
        counts["opened"] += 1

    def closed(*_: Any) -> None:
        counts["closed"] += 1

    event.listen(engine.sync_engine.pool, "connect", opened)
    event.listen(engine.sync_engine.pool, "close", closed)
    return counts


async def in_bunches(engine: AsyncEngine, tasks: int, rounds: int) -> None:
    """``tasks`` tasks each take a connection, all give theirs back together, again.

    Every task holds its connection until all have one (so the pool's whole capacity is
    in use), and asks again only when all have given theirs back.
    """
    held = asyncio.Barrier(tasks)
    returned = asyncio.Barrier(tasks)

    async def worker() -> None:
        for _ in range(rounds):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                await held.wait()
            await returned.wait()

    async with asyncio.timeout(30):
        await asyncio.gather(*(worker() for _ in range(tasks)))


async def test_sqlalchemy_pool_reopens_its_overflow_each_bunch(database_url: str) -> None:
    """The control: the same load makes SQLAlchemy's own pool churn."""
    engine = create_async_engine(
        database_url,
        poolclass=AsyncAdaptedQueuePool,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_use_lifo=True,
    )
    counts = count_opened(engine)
    try:
        await in_bunches(engine, POOL_SIZE + MAX_OVERFLOW, ROUNDS)
    finally:
        await engine.dispose()
    assert counts["opened"] == POOL_SIZE + MAX_OVERFLOW * ROUNDS


async def test_library_pool_keeps_its_overflow_under_load(database_url: str) -> None:
    settings = settings_for(database_url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
    app = make_app(settings)
    async with client_for(app):
        runtime = get_runtime(app)
        engine = runtime.engine()
        assert isinstance(engine.sync_engine.pool, InstrumentedQueuePool)
        counts = count_opened(engine)
        await in_bunches(engine, POOL_SIZE + MAX_OVERFLOW, ROUNDS)
        status = runtime.database("primary").pool_status()
        # The warm pool had POOL_SIZE open: the overflow opened once, then stayed.
        assert counts == {"opened": MAX_OVERFLOW, "closed": 0}
        assert status["idle"] == POOL_SIZE + MAX_OVERFLOW
        assert status["checked_out"] == 0
        assert status["overflow"] == MAX_OVERFLOW
        assert status["size"] == POOL_SIZE


async def test_idle_overflow_is_closed_after_overflow_idle(
    database_url: str, admin_url: str
) -> None:
    settings = settings_for(
        database_url,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_overflow_idle=0.3,
        application_name="dbpool-overflow-idle",
    )
    app = make_app(settings)
    async with client_for(app):
        runtime = get_runtime(app)
        engine = runtime.engine()
        counts = count_opened(engine)
        started = time.monotonic()  # before any connection came back
        await in_bunches(engine, POOL_SIZE + MAX_OVERFLOW, 1)
        assert runtime.database("primary").pool_status()["idle"] == POOL_SIZE + MAX_OVERFLOW

        # Nothing comes back any more: the runtime's own task closes them, not before
        # they have been idle 0.3 s.
        def settled() -> bool:
            status = runtime.database("primary").pool_status()
            return (status["idle"], status["overflow"], status["checked_out"]) == (POOL_SIZE, 0, 0)

        await wait_until(settled, timeout=10, message="back to pool_size idle connections")
        assert time.monotonic() - started >= 0.3
        # The close events fire as each close begins; the last one may still be under way.
        await wait_until(lambda: counts["closed"] == MAX_OVERFLOW, timeout=5)
        # The server's side: the pool's connections plus the readiness probe's own one
        # (a backend exits a moment after its client closed the connection).
        await wait_until(
            _equals(
                lambda: count_app_connections(admin_url, "dbpool-overflow-idle"), POOL_SIZE + 1
            ),
            timeout=5,
            message="the closed overflow connections' backends are gone",
        )

        # The pool still opens overflow again when it needs it, and serves.
        await in_bunches(engine, POOL_SIZE + MAX_OVERFLOW, 2)
        assert counts["opened"] == 2 * MAX_OVERFLOW


async def test_connection_coming_back_closes_the_longest_idle_overflow(database_url: str) -> None:
    settings = settings_for(
        database_url, pool_size=1, max_overflow=2, pool_overflow_idle=0.2, warm_pool=False
    )
    app = make_app(settings)
    async with client_for(app):
        engine = get_runtime(app).engine()
        pool = engine.sync_engine.pool
        assert isinstance(pool, InstrumentedQueuePool)
        counts = count_opened(engine)
        await in_bunches(engine, 3, 1)
        pids: list[int] = []
        # Three idle connections; keep one busy past overflow_idle while the others idle.
        async with engine.connect() as busy:
            pids.append((await busy.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            await wait_until(lambda: counts["closed"] == 1, timeout=10)
        # The busy one came back: it stays, the longest idle ones went (by the check on
        # return or by the runtime's task, whichever came first).
        await wait_until(lambda: counts["closed"] == 2, timeout=10)
        assert pool.checkedin() == 1
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert pid == pids[0]


async def test_fixed_pool_is_sqlalchemys_own_queue(database_url: str) -> None:
    """Without overflow there is nothing to keep: SQLAlchemy's queue as it is."""
    app = make_app(settings_for(database_url, pool_size=2, max_overflow=0))
    async with client_for(app):
        pool = get_runtime(app).engine().sync_engine.pool
        assert isinstance(pool, InstrumentedQueuePool)
        assert type(pool._pool).__name__ == "AsyncAdaptedQueue"
        assert pool.close_idle_overflow() == 0


async def _terminate(admin_url: str, pid: int) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
        # Terminated means gone: wait for the backend to leave pg_stat_activity.
        await wait_until(
            lambda: conn.fetchval("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", pid),
            timeout=5,
        )
    finally:
        await conn.close()


def pid_app(database_url: str, **overrides: Any) -> FastAPI:
    app = make_app(settings_for(database_url, pool_size=1, max_overflow=0, **overrides))

    @app.get("/pid")
    async def pid(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"pid": (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()}

    return app


async def test_a_connection_idle_past_pre_ping_idle_is_validated(
    database_url: str, admin_url: str
) -> None:
    """Its server side died while it sat idle: the checkout notices and opens a new one."""
    app = pid_app(database_url, pre_ping_idle=0.05)
    async with client_for(app) as client:
        first = (await client.get("/pid")).json()["pid"]
        returned = time.monotonic()
        await _terminate(admin_url, first)
        await wait_until(lambda: time.monotonic() - returned > 0.05, timeout=5)
        response = await client.get("/pid")
    assert response.status_code == 200
    assert response.json()["pid"] != first


async def test_validations_are_counted_only_for_connections_that_sat_idle(
    database_url: str,
) -> None:
    """The pool's ``validations`` counts the round trips idle validation made: none for a
    connection back from use within DB_PRE_PING_IDLE, one for each checkout after that."""
    app = pid_app(database_url, pre_ping_idle=1.0)
    async with client_for(app) as client:
        stats = get_runtime(app).databases["primary"].stats
        first = await client.get("/pid")
        returned = time.monotonic()
        again = await client.get("/pid")
        # Back to back: well within 1 s of the connection's return.
        back_to_back = stats.validations
        assert time.monotonic() - returned < 1.0, "the second request took a second"
        await wait_until(lambda: time.monotonic() - returned > 1.05, timeout=5)
        after_idle = await client.get("/pid")
        validated = stats.validations
    assert first.status_code == again.status_code == after_idle.status_code == 200
    assert after_idle.json()["pid"] == first.json()["pid"]  # validated and kept
    assert (back_to_back, validated) == (0, 1)


async def test_a_connection_used_recently_is_not_validated(
    database_url: str, admin_url: str
) -> None:
    """No round trip for a connection back from use a moment ago: a dead one is found by
    the request itself (503), which is the price of not pinging busy connections."""
    app = pid_app(database_url, pre_ping_idle=60.0)
    async with client_for(app) as client:
        first = (await client.get("/pid")).json()["pid"]
        await _terminate(admin_url, first)
        response = await client.get("/pid")
        after = await client.get("/pid")
    assert response.status_code == 503
    assert after.status_code == 200 and after.json()["pid"] != first


async def test_a_checkout_cancelled_while_validating_keeps_the_pool_whole(
    database_url: str,
) -> None:
    """The request is cancelled while its idle connection's ping is held by the network:
    the pool's only slot must come back (a lost record would shrink the pool for good)."""
    server = make_url(database_url)
    proxy = await FaultProxy(server.host or "127.0.0.1", server.port or 5432).start()
    try:
        app = pid_app(proxy.url_for(database_url), pre_ping_idle=0.05, checkout_timeout=3)
        async with client_for(app) as client:
            database = get_runtime(app).databases["primary"]
            first = await client.get("/pid")
            assert first.status_code == 200
            returned = time.monotonic()
            await wait_until(lambda: time.monotonic() - returned > 0.05, timeout=5)
            proxy.blackhole()
            request = asyncio.create_task(client.get("/pid"))
            # Inside the checkout with a connection idle long enough to be pinged: the
            # ping is on the wire, held.
            await wait_until(lambda: database.stats.waiting == 1, timeout=5)
            done, _ = await asyncio.wait([request], timeout=0.1)
            assert not done
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            proxy.passthrough()
            after = await client.get("/pid")
            assert after.status_code == 200
            assert database.pool_status()["checked_out"] == 0
            assert database.stats.waiting == 0
    finally:
        await proxy.stop()
