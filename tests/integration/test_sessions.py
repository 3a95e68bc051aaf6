"""One session per request, released before the response, rolled back unless committed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from typing import Any

import anyio
import asyncpg
import greenlet
import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool
from fastapi_dbpool import get_session
from fastapi_dbpool.drivers import RELEASE_TASK
from fastapi_dbpool.sessions import DBPoolSyncSession
from tests.helpers import wait_until
from tests.helpers.apps import client_for, make_app, settings_for
from tests.helpers.pg import app_backends, statement_active
from tests.helpers.proxy import FaultProxy


def plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def create_items(url: str, *, deferred_unique: bool = False) -> None:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        unique = " UNIQUE DEFERRABLE INITIALLY DEFERRED" if deferred_unique else ""
        await conn.execute(f"CREATE TABLE items (id serial PRIMARY KEY, name text{unique})")
    finally:
        await conn.close()


async def item_names(url: str) -> list[str]:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        return [r["name"] for r in await conn.fetch("SELECT name FROM items ORDER BY id")]
    finally:
        await conn.close()


def checked_out(app: FastAPI, name: str = "primary") -> int:
    return dbpool.get_runtime(app).databases[name].pool_status()["checked_out"]


async def test_every_dependency_of_a_request_gets_the_same_session(database_url: str) -> None:
    app = make_app(settings_for(database_url))
    seen: list[AsyncSession] = []

    async def sub(session: AsyncSession = Depends(get_session)) -> AsyncSession:
        seen.append(session)
        return session

    @app.get("/same")
    async def same(
        a: AsyncSession = Depends(get_session),
        b: AsyncSession = Depends(sub),
        c: AsyncSession = Depends(dbpool.session()),
    ) -> dict[str, Any]:
        return {"same": a is b is c, "query": (await a.execute(text("SELECT 1"))).scalar()}

    async with client_for(app) as client:
        first = await client.get("/same")
        second = await client.get("/same")
    assert first.json() == {"same": True, "query": 1}
    assert second.json() == {"same": True, "query": 1}
    # A new request gets a new session.
    assert len(seen) == 2 and seen[0] is not seen[1]


async def test_connection_is_back_in_the_pool_before_background_tasks_run(
    database_url: str,
) -> None:
    app = make_app(settings_for(database_url))
    observed: list[int] = []

    @app.get("/query")
    async def query(
        background: BackgroundTasks, session: AsyncSession = Depends(get_session)
    ) -> dict[str, int]:
        await session.execute(text("SELECT 1"))
        assert checked_out(app) == 1  # the handler really holds a connection
        background.add_task(lambda: observed.append(checked_out(app)))
        return {"ok": 1}

    async with client_for(app) as client:
        response = await client.get("/query")
    assert response.status_code == 200
    assert observed == [0]


async def test_uncommitted_work_is_rolled_back_and_committed_work_kept(database_url: str) -> None:
    await create_items(database_url)
    app = make_app(settings_for(database_url))

    @app.post("/items/{name}")
    async def add(
        name: str, commit: bool, session: AsyncSession = Depends(get_session)
    ) -> dict[str, str]:
        await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        if commit:
            await session.commit()
        return {"name": name}

    async with client_for(app) as client:
        assert (await client.post("/items/kept", params={"commit": True})).status_code == 200
        assert (await client.post("/items/dropped", params={"commit": False})).status_code == 200
    assert await item_names(database_url) == ["kept"]


async def test_error_in_handler_rolls_back(database_url: str) -> None:
    await create_items(database_url)
    app = make_app(settings_for(database_url, autocommit=True))

    @app.post("/fail")
    async def fail(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("INSERT INTO items (name) VALUES ('never')"))
        raise HTTPException(status_code=422, detail="rejected")

    async with client_for(app) as client:
        response = await client.post("/fail")
        assert checked_out(app) == 0
    assert response.status_code == 422
    assert await item_names(database_url) == []


async def test_autocommit_commits_before_the_status_line(database_url: str) -> None:
    await create_items(database_url)
    app = make_app(settings_for(database_url, autocommit=True))
    committed_before_body: list[list[str]] = []

    @app.post("/items/{name}")
    async def add(
        name: str, background: BackgroundTasks, session: AsyncSession = Depends(get_session)
    ) -> dict[str, str]:
        await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})

        async def look() -> None:
            committed_before_body.append(await item_names(database_url))

        background.add_task(look)
        return {"name": name}

    async with client_for(app) as client:
        response = await client.post("/items/auto")
    assert response.status_code == 200
    # Another connection sees the row once the response has gone out.
    assert committed_before_body == [["auto"]]


async def test_autocommit_failure_is_never_a_2xx(database_url: str) -> None:
    # A deferred unique constraint fails at COMMIT, after the handler returned 201.
    await create_items(database_url, deferred_unique=True)
    app = make_app(settings_for(database_url, autocommit=True))

    @app.post("/dupes", status_code=201)
    async def dupes(session: AsyncSession = Depends(get_session)) -> dict[str, str]:
        await session.execute(text("INSERT INTO items (name) VALUES ('x'), ('x')"))
        return {"created": "x"}

    async with client_for(app) as client:
        response = await client.post("/dupes")
        assert response.status_code == 409
        assert "created" not in response.text
        assert response.json()["detail"]
        assert checked_out(app) == 0
    assert await item_names(database_url) == []


async def test_streaming_response_uses_the_session_until_the_stream_ends(
    database_url: str,
) -> None:
    app = make_app(settings_for(database_url))
    held_during_stream: list[int] = []
    observed_after: list[int] = []

    @app.get("/export")
    async def export(
        background: BackgroundTasks, session: AsyncSession = Depends(get_session)
    ) -> StreamingResponse:
        async def rows() -> Any:
            for i in range(3):
                value = (await session.execute(text("SELECT CAST(:i AS int)"), {"i": i})).scalar()
                held_during_stream.append(checked_out(app))
                yield f"{value}\n"

        background.add_task(lambda: observed_after.append(checked_out(app)))
        return StreamingResponse(rows(), media_type="text/plain", background=background)

    async with client_for(app) as client:
        response = await client.get("/export")
    assert response.text == "0\n1\n2\n"
    assert held_during_stream == [1, 1, 1]
    assert observed_after == [0]


async def test_concurrent_use_of_the_request_session_is_a_clear_error(database_url: str) -> None:
    app = make_app(settings_for(database_url))

    @app.get("/fanout-wrong")
    async def wrong(session: AsyncSession = Depends(get_session)) -> dict[str, Any]:
        results = await asyncio.gather(
            session.execute(text("SELECT pg_sleep(0.2)")),
            session.execute(text("SELECT pg_sleep(0.2)")),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        return {"errors": [f"{type(e).__name__}: {e}" for e in errors]}

    @app.get("/fanout-right")
    async def right(
        factory: dbpool.SessionFactory = Depends(dbpool.session_factory),
    ) -> dict[str, list[int]]:
        async def one(i: int) -> int:
            async with factory() as s:
                return int((await s.execute(text("SELECT CAST(:i AS int)"), {"i": i})).scalar_one())

        return {"values": list(await asyncio.gather(*(one(i) for i in range(3))))}

    async with client_for(app) as client:
        wrong_body = (await client.get("/fanout-wrong")).json()
        right_body = (await client.get("/fanout-right")).json()
        assert checked_out(app) == 0
    # One of the two ran; the other was refused with a message that says what to do.
    assert len(wrong_body["errors"]) == 1
    assert wrong_body["errors"][0].startswith("ConcurrentSessionUseError: ")
    assert "already in use by another task" in wrong_body["errors"][0]
    assert "session_factory" in wrong_body["errors"][0]
    assert right_body == {"values": [0, 1, 2]}


async def test_missing_middleware_names_the_line(database_url: str) -> None:
    app = FastAPI(lifespan=dbpool.lifespan)

    @app.get("/q")
    async def q(session: AsyncSession = Depends(get_session)) -> None:
        return None

    app.state.fastapi_dbpool_settings = settings_for(database_url)
    async with client_for(app) as client:
        with pytest.raises(
            dbpool.NotInstalledError, match=r"app.add_middleware\(dbpool.DBPoolMiddleware\)"
        ):
            await client.get("/q")


async def test_missing_lifespan_stops_startup_with_the_line_to_add() -> None:
    app = FastAPI()
    app.add_middleware(dbpool.DBPoolMiddleware)
    with pytest.raises(RuntimeError, match=r"FastAPI\(lifespan=dbpool.lifespan\)"):
        async with client_for(app):
            pass


async def test_replica_is_reached_by_name(database_url: str, admin_url: str) -> None:
    replica_db = "replica_" + database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(plain_dsn(admin_url))
    try:
        await admin.execute(f'CREATE DATABASE "{replica_db}"')
        replica_url = database_url.rsplit("/", 1)[0] + "/" + replica_db
        app = make_app(settings_for(database_url, replica_url=replica_url))

        @app.get("/which")
        async def which(
            primary: AsyncSession = Depends(get_session),
            replica: AsyncSession = Depends(dbpool.session("replica")),
        ) -> dict[str, str]:
            return {
                "primary": (await primary.execute(text("SELECT current_database()"))).scalar_one(),
                "replica": (await replica.execute(text("SELECT current_database()"))).scalar_one(),
            }

        async with client_for(app) as client:
            body = (await client.get("/which")).json()
            assert checked_out(app, "replica") == 0
        assert body == {"primary": database_url.rsplit("/", 1)[1], "replica": replica_db}
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{replica_db}" WITH (FORCE)')
        await admin.close()


async def test_unknown_database_name_is_a_clear_error(database_url: str) -> None:
    app = make_app(settings_for(database_url))

    @app.get("/r")
    async def r(session: AsyncSession = Depends(dbpool.session("replica"))) -> None:
        return None

    async with client_for(app) as client:
        with pytest.raises(dbpool.ConfigurationError, match="DATABASE_REPLICA_URL"):
            await client.get("/r")


async def test_stream_releases_its_connection_when_the_client_disconnects(
    database_url: str,
) -> None:
    from tests.helpers import wait_until
    from tests.helpers.apps import serve

    app = make_app(settings_for(database_url))
    streaming = asyncio.Event()

    @app.get("/export")
    async def export(session: AsyncSession = Depends(get_session)) -> StreamingResponse:
        async def rows() -> Any:
            i = 0
            while True:
                i += 1
                value = (await session.execute(text("SELECT CAST(:i AS int)"), {"i": i})).scalar()
                streaming.set()
                yield f"{value}\n" * 1000

        return StreamingResponse(rows(), media_type="text/plain")

    async with serve(app) as base_url:
        async with (
            httpx.AsyncClient(base_url=base_url) as client,
            client.stream("GET", "/export") as response,
        ):
            async for _ in response.aiter_bytes():
                break
            assert streaming.is_set()
            assert checked_out(app) == 1
        # The client is gone: the stream stops and its connection goes back.
        await wait_until(lambda: checked_out(app) == 0, 5)
        assert dbpool.get_runtime(app).leaks.total() == 0


async def test_background_task_survives_the_client_leaving_after_the_response(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers import wait_until
    from tests.helpers.apps import serve

    # Watch for disconnects from the first query on, so the watcher is surely running.
    monkeypatch.setattr("fastapi_dbpool.requests.DISCONNECT_WATCH_DELAY", 0.0)
    app = make_app(settings_for(database_url))
    outcome: list[str] = []

    @app.get("/then-work")
    async def then_work(
        background: BackgroundTasks, session: AsyncSession = Depends(get_session)
    ) -> dict[str, int]:
        async def work() -> None:
            try:
                await session.execute(text("SELECT pg_sleep(1.0)"))
                outcome.append("done")
            except BaseException as exc:
                outcome.append(type(exc).__name__)
                raise

        background.add_task(work)
        return {"v": (await session.execute(text("SELECT 1"))).scalar_one()}

    async with serve(app) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as client:
            assert (await client.get("/then-work")).json() == {"v": 1}
        # The client has closed its connection while the background task runs.
        await wait_until(lambda: bool(outcome), 5)
    assert outcome == ["done"]


async def test_read_only_session_costs_no_transaction_round_trips(database_url: str) -> None:
    await create_items(database_url)
    # One connection: the transactional request below reuses the read-only one's.
    app = make_app(settings_for(database_url, application_name="dbpool-ro", pool_size=1))
    admin = await asyncpg.connect(plain_dsn(database_url))
    await admin.execute("INSERT INTO items (name) VALUES ('a'), ('b')")

    @app.get("/count")
    async def count(
        session: AsyncSession = Depends(dbpool.session(read_only=True)),
    ) -> dict[str, Any]:
        n = (await session.execute(text("SELECT count(*) FROM items"))).scalar_one()
        # No transaction block: each statement is a transaction of its own.
        first = (await session.execute(text("SELECT txid_current()"))).scalar_one()
        second = (await session.execute(text("SELECT txid_current()"))).scalar_one()
        return {"n": n, "in_block": first == second}

    @app.get("/tx-count")
    async def tx_count(session: AsyncSession = Depends(get_session)) -> dict[str, Any]:
        first = (await session.execute(text("SELECT txid_current()"))).scalar_one()
        second = (await session.execute(text("SELECT txid_current()"))).scalar_one()
        return {"in_block": first == second}

    @app.post("/sneaky-write")
    async def sneaky(
        session: AsyncSession = Depends(dbpool.session(read_only=True)),
    ) -> None:
        from sqlalchemy import column, insert, table

        await session.execute(insert(table("items", column("name"))).values(name="x"))

    try:
        async with client_for(app) as client:
            assert (await client.get("/count")).json() == {"n": 2, "in_block": False}
            # The same connection, next user: back in a transaction block, where both
            # statements share one transaction.
            assert (await client.get("/tx-count")).json() == {"in_block": True}
            with pytest.raises(dbpool.ReadOnlySessionError, match="read-only"):
                await client.post("/sneaky-write")
            assert checked_out(app) == 0
        assert await item_names(database_url) == ["a", "b"]
    finally:
        await admin.close()


def test_read_only_and_timeout_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match="read_only=True"):
        dbpool.session(read_only=True, timeout=1.0)


async def test_library_hooks_stay_off_the_apps_own_sessions(database_url: str) -> None:
    """The library's session events fire for its sessions only, not every Session."""
    from sqlalchemy import column, insert, table
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from fastapi_dbpool.sessions import READ_ONLY_KEY, TIMEOUT_KEY

    await create_items(database_url)
    app = make_app(settings_for(database_url))
    async with client_for(app):
        engine = dbpool.get_runtime(app).engine()
        # An app's own sessionmaker on the same engine, whose info happens to carry the
        # library's keys: neither a 1 ms statement timeout nor the read-only refusal.
        own = async_sessionmaker(engine, info={TIMEOUT_KEY: 0.001, READ_ONLY_KEY: True})
        async with own() as session:
            await session.execute(text("SELECT pg_sleep(0.05)"))
            await session.execute(insert(table("items", column("name"))).values(name="own"))
            await session.commit()
        # The library's own read-only session still refuses the same write.
        async with dbpool.get_runtime(app).database("primary").read_only_sessionmaker() as ro:
            with pytest.raises(dbpool.ReadOnlySessionError):
                await ro.execute(insert(table("items", column("name"))).values(name="ro"))
    assert await item_names(database_url) == ["own"]


def _proxied_app(proxy: FaultProxy, database_url: str, name: str) -> FastAPI:
    return make_app(
        settings_for(
            proxy.url_for(database_url),
            pool_size=1,
            max_overflow=0,
            checkout_timeout=5,
            application_name=name,
        )
    )


def _get_in_a_cancel_scope(
    client: httpx.AsyncClient, path: str
) -> tuple[asyncio.Task[httpx.Response], anyio.CancelScope]:
    """``GET path`` in a task, inside an anyio cancel scope of its own."""
    scope = anyio.CancelScope()

    async def call() -> httpx.Response:
        with scope:
            return await client.get(path)
        raise AssertionError("cancelled")

    return asyncio.create_task(call()), scope


async def _cancel(request: asyncio.Task[Any], scope: anyio.CancelScope, cancellation: str) -> None:
    """Cancel ``request`` once (asyncio) or through its anyio scope (again at every await)."""
    if cancellation == "scope":
        scope.cancel()
    else:
        request.cancel()


@pytest.mark.parametrize("cancellation", ["once", "scope"])
async def test_a_request_cancelled_while_its_release_is_in_flight_gives_the_connection_back(
    database_url: str, cancellation: str
) -> None:
    # The release's ROLLBACK is held by the network when the request's task is cancelled:
    # once (asyncio: uvicorn's shutdown, a client gone) or by an anyio cancel scope, which
    # cancels every await inside it again until the scope is left. The pool's one
    # connection must come back, usable, and the breaker learns nothing from it.
    server = make_url(database_url)
    proxy = await FaultProxy(server.host or "127.0.0.1", server.port or 5432).start()
    app = _proxied_app(proxy, database_url, "dbpool-cancel-release")
    rolling_back = asyncio.Event()

    @app.get("/q")
    async def query(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"value": (await session.execute(text("SELECT 1"))).scalar_one()}

    try:
        async with client_for(app) as client:
            database = dbpool.get_runtime(app).databases["primary"]
            assert (await client.get("/q")).status_code == 200

            def hold_the_rollback(conn: Any) -> None:
                proxy.blackhole()  # the ROLLBACK about to be sent is held on the wire
                rolling_back.set()

            event.listen(database.engine.sync_engine, "rollback", hold_the_rollback)
            invalidated = asyncio.Event()
            event.listen(database.pool, "invalidate", lambda *_: invalidated.set())
            request, scope = _get_in_a_cancel_scope(client, "/q")
            await asyncio.wait_for(rolling_back.wait(), 5)
            event.remove(database.engine.sync_engine, "rollback", hold_the_rollback)
            await _cancel(request, scope, cancellation)
            # The cancellation reaches the request while the ROLLBACK's answer is held: the
            # connection, its state unknown, is discarded.
            await asyncio.wait_for(invalidated.wait(), 5)
            proxy.passthrough()
            with contextlib.suppress(asyncio.CancelledError, AssertionError):
                await asyncio.wait_for(request, 10)
            await wait_until(lambda: checked_out(app) == 0, 5, message="connection back")
            # The pool's only connection serves the next request.
            after = await client.get("/q")
            assert after.status_code == 200 and after.json() == {"value": 1}
            assert database.breaker.failures == 0
            rows = await app_backends(database_url, "dbpool-cancel-release")
            assert not [r for r in rows if r["state"] != "idle"]
    finally:
        await proxy.stop()


@pytest.mark.parametrize("cancellation", ["once", "scope"])
async def test_a_request_cancelled_while_its_release_waits_for_a_spawned_statement(
    database_url: str, cancellation: str
) -> None:
    # The handler left a task running a statement on the request's session; the release
    # waits for that statement before closing the session, and the request is cancelled
    # meanwhile. Nothing has reached the driver yet, so nothing discards the connection
    # by itself: the release must still close the session once the statement is done.
    app = make_app(settings_for(database_url, pool_size=1, max_overflow=0, checkout_timeout=5))
    spawned: list[asyncio.Task[Any]] = []
    on_server = asyncio.Event()

    @app.get("/spawn")
    async def spawn(session: AsyncSession = Depends(get_session)) -> dict[str, str]:
        # Waits on a lock the test holds: the session is busy in that task.
        statement = session.execute(text("SELECT pg_advisory_xact_lock(4242)"))
        spawned.append(asyncio.ensure_future(statement))
        await on_server.wait()
        return {"status": "spawned"}

    @app.get("/q")
    async def query(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"value": (await session.execute(text("SELECT 1"))).scalar_one()}

    locker = await asyncpg.connect(plain_dsn(database_url))
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute("SELECT pg_advisory_xact_lock(4242)")
        async with client_for(app) as client:
            request, scope = _get_in_a_cancel_scope(client, "/spawn")

            async def waiting_on_the_lock() -> bool:
                return await statement_active(database_url, "dbpool-test", "4242")

            await wait_until(waiting_on_the_lock, 5, message="spawned statement waiting")
            on_server.set()
            # The release waits for the spawned statement: the request cannot end.
            done, _ = await asyncio.wait([request], timeout=0.2)
            assert not done and checked_out(app) == 1
            await _cancel(request, scope, cancellation)

            def finishing_in_a_task() -> bool:
                return any(t.get_name() == RELEASE_TASK for t in asyncio.all_tasks())

            # The cancellation reached the release while it waited: a task finishes it.
            await wait_until(finishing_in_a_task, 5, message="release continued in a task")
            await lock.rollback()  # the spawned statement gets its lock and ends
            with contextlib.suppress(asyncio.CancelledError, AssertionError):
                await asyncio.wait_for(request, 5)
            await asyncio.wait_for(spawned[0], 5)
            await wait_until(lambda: checked_out(app) == 0, 5, message="connection back")
            after = await client.get("/q")
            assert after.status_code == 200 and after.json() == {"value": 1}
    finally:
        await locker.close()


async def test_a_finished_request_is_not_kept_alive_by_its_statement_timers(
    database_url: str,
) -> None:
    # asyncpg arms a timer per statement (the client-side deadline) in the request's
    # context; asyncio's own loop keeps a cancelled timer queued until its deadline, and
    # with it that context. What the request made must still be freed when it finishes,
    # by reference counting alone (each kept alive meant garbage collections under load).
    assert "uvloop" not in type(asyncio.get_running_loop()).__module__
    app = make_app(settings_for(database_url, command_timeout=60))
    made: weakref.WeakSet[AsyncSession] = weakref.WeakSet()

    @app.get("/q")
    async def query(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        made.add(session)
        return {"value": (await session.execute(text("SELECT 1"))).scalar_one()}

    gc.disable()
    try:
        async with client_for(app) as client:
            for _ in range(20):
                assert (await client.get("/q")).status_code == 200
            assert checked_out(app) == 0
            alive = len(made)
    finally:
        gc.enable()
    assert alive == 0


async def test_request_sessions_run_in_reused_greenlets(database_url: str) -> None:
    # A new greenlet per session call maps and unmaps a frame stack chunk (greenlets.py);
    # the request session's calls, its query and the release's close, reuse idle ones.
    app = make_app(settings_for(database_url))
    seen: list[Any] = []
    released: list[Any] = []

    @event.listens_for(DBPoolSyncSession, "after_transaction_end")
    def closing(session: Any, transaction: Any) -> None:
        released.append(greenlet.getcurrent())

    @app.get("/greenlet")
    async def which(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        seen.append(await session.run_sync(lambda _: greenlet.getcurrent()))
        return {"one": (await session.execute(text("SELECT 1"))).scalar_one()}

    try:
        async with client_for(app) as client:
            for _ in range(5):
                assert (await client.get("/greenlet")).json() == {"one": 1}
    finally:
        event.remove(DBPoolSyncSession, "after_transaction_end", closing)
    # Each is kept alive by the lists: distinct greenlets would be distinct objects.
    assert len(seen) == 5 and len({id(g) for g in seen}) == 1
    assert seen[0] is not greenlet.getcurrent()
    assert released and {id(g) for g in released} == {id(seen[0])}
