"""Leaks planted for real against PostgreSQL: each kind reported exactly once, named."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, WebSocket
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool
from fastapi_dbpool import get_session
from fastapi_dbpool.leaks import LeakReport
from tests.helpers import wait_until
from tests.helpers.apps import client_for, make_app, serve, settings_for
from tests.integration.test_sessions import checked_out


def line_of(marker: str) -> int:
    """The line number in this file of the line containing ``marker``."""
    source, start = inspect.getsourcelines(inspect.getmodule(line_of))  # type: ignore[arg-type]
    for offset, line in enumerate(source):
        if marker in line and "line_of(" not in line:
            return start + offset if start else offset + 1
    raise AssertionError(marker)


def leak_app(database_url: str, **overrides: Any) -> tuple[FastAPI, list[asyncio.Task[Any]]]:
    values: dict[str, Any] = {"leak_track_stack": True, "leak_threshold": 0.3}
    values.update(overrides)
    app = make_app(settings_for(database_url, **values))
    tasks: list[asyncio.Task[Any]] = []
    return app, tasks


def reports(app: FastAPI) -> list[LeakReport]:
    return list(dbpool.get_runtime(app).leaks.recent)


async def test_connection_held_by_a_spawned_task_outlives_its_request(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, tasks = leak_app(database_url)
    release = asyncio.Event()

    @app.get("/orders/{order_id}/spawn")
    async def spawn(
        order_id: int, factory: dbpool.SessionFactory = Depends(dbpool.session_factory)
    ) -> dict[str, int]:
        started = asyncio.Event()

        async def hold() -> None:
            async with factory() as s:
                await s.execute(text("SELECT 1"))  # PLANT-OUTLIVED
                started.set()
                await release.wait()

        tasks.append(asyncio.create_task(hold(), name="order-syncer"))
        await started.wait()
        return {"order": order_id}

    caplog.set_level(logging.INFO, logger="fastapi_dbpool")
    async with client_for(app) as client:
        response = await client.get("/orders/7/spawn", headers={"X-Request-ID": "req-abc"})
        assert response.status_code == 200
        found = reports(app)
        release.set()
        await asyncio.gather(*tasks)
        await wait_until(lambda: checked_out(app) == 0, 5)
        later = reports(app)
    assert len(found) == 1, found
    leak = found[0]
    assert leak.kind == "outlived_request"
    assert (leak.route, leak.method, leak.request_id) == (
        "/orders/{order_id}/spawn",
        "GET",
        "req-abc",
    )
    assert leak.task == "order-syncer"
    assert leak.database == "primary"
    assert leak.stack and leak.stack[0].endswith(
        f"test_leaks.py:{line_of('PLANT-OUTLIVED')} in hold"
    ), leak.stack
    assert later == found  # reported once, not once per scan
    records = [
        r for r in caplog.records if r.levelno == logging.WARNING and "leak" in r.getMessage()
    ]
    assert len(records) == 1
    assert records[0].leak["route"] == "/orders/{order_id}/spawn"  # type: ignore[attr-defined]
    assert any("previously reported leak returned" in r.getMessage() for r in caplog.records)


async def test_request_session_used_after_its_request_completed(database_url: str) -> None:
    app, tasks = leak_app(database_url)
    go = asyncio.Event()

    @app.get("/fire-and-forget")
    async def fire(session: AsyncSession = Depends(get_session)) -> dict[str, str]:
        async def later() -> None:
            await go.wait()
            await session.execute(text("SELECT 1"))  # PLANT-AFTER
            await session.close()

        tasks.append(asyncio.create_task(later(), name="forgotten"))
        return {"ok": "yes"}

    async with client_for(app) as client:
        assert (await client.get("/fire-and-forget")).status_code == 200
        assert reports(app) == []
        go.set()
        await asyncio.gather(*tasks)
        found = reports(app)
        assert checked_out(app) == 0
    assert [r.kind for r in found] == ["used_after_request"]
    assert found[0].route == "/fire-and-forget"
    assert found[0].task == "forgotten"
    assert found[0].stack[0].endswith(f"test_leaks.py:{line_of('PLANT-AFTER')} in later")


async def test_connection_held_too_long_outside_requests(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = leak_app(database_url, leak_threshold=0.3)
    caplog.set_level(logging.INFO, logger="fastapi_dbpool")
    async with client_for(app):
        engine = dbpool.get_runtime(app).engine()
        conn = await engine.connect()  # PLANT-UNOWNED
        await conn.execute(text("SELECT 1"))
        started = time.monotonic()
        await wait_until(lambda: len(reports(app)) == 1, 5)
        reported_after = time.monotonic() - started
        await conn.close()
        await wait_until(
            lambda: any(
                "previously reported leak returned" in r.getMessage() for r in caplog.records
            ),
            5,
        )
        found = reports(app)
    assert [r.kind for r in found] == ["held_too_long"]
    assert found[0].route is None
    planted = f"test_leaks.py:{line_of('PLANT-UNOWNED')}"
    assert (
        found[0].stack[0].endswith(f"{planted} in test_connection_held_too_long_outside_requests")
    )
    assert 0.25 <= reported_after < 2.0


async def test_reclaim_gives_the_pool_its_capacity_back(database_url: str) -> None:
    app, tasks = leak_app(database_url, pool_size=2, checkout_timeout=0.3, leak_reclaim_after=0.5)
    forever = asyncio.Event()

    @app.get("/leak")
    async def leak() -> None:
        started = asyncio.Event()

        async def hold() -> None:
            # Straight from the engine: nothing of the request's to close it.
            async with dbpool.get_runtime(app).engine().connect() as conn:
                await conn.execute(text("SELECT 1"))
                started.set()
                await forever.wait()

        tasks.append(asyncio.create_task(hold()))
        await started.wait()

    hold_both = asyncio.Barrier(3)

    @app.get("/hold")
    async def hold(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        value = (await session.execute(text("SELECT 1"))).scalar_one()
        async with asyncio.timeout(5):
            await hold_both.wait()
        return {"v": value}

    async with client_for(app) as client:
        await client.get("/leak")
        await client.get("/leak")
        assert checked_out(app) == 2
        starved = await client.get("/hold")
        assert starved.status_code == 503
        runtime = dbpool.get_runtime(app)
        await wait_until(lambda: runtime.leaks.reclaimed.get("primary", 0) == 2, 5)
        # Full capacity again: two requests hold a connection each, at the same time.
        both = [asyncio.create_task(client.get("/hold")) for _ in range(2)]
        async with asyncio.timeout(5):
            await hold_both.wait()
        responses = await asyncio.gather(*both)
        kinds = [r.kind for r in reports(app)]
        forever.set()
        # The holders find their connections gone; closing them is still clean.
        await asyncio.gather(*tasks, return_exceptions=True)
        assert checked_out(app) == 0
    assert [r.status_code for r in responses] == [200, 200]
    assert kinds == ["outlived_request", "outlived_request"]


async def test_assert_no_leaks_fails_a_leaking_test_and_passes_a_clean_one(
    database_url: str,
) -> None:
    app, tasks = leak_app(database_url)
    release = asyncio.Event()

    @app.get("/clean")
    async def clean(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("SELECT 1"))

    @app.get("/dirty")
    async def dirty(factory: dbpool.SessionFactory = Depends(dbpool.session_factory)) -> None:
        started = asyncio.Event()

        async def hold() -> None:
            async with factory() as s:
                await s.execute(text("SELECT 1"))
                started.set()
                await release.wait()

        tasks.append(asyncio.create_task(hold(), name="dirty-task"))
        await started.wait()

    async with client_for(app) as client:
        async with dbpool.testing.assert_no_leaks(app):
            await client.get("/clean")
        with pytest.raises(AssertionError) as info:
            async with dbpool.testing.assert_no_leaks(app):
                await client.get("/dirty")
        release.set()
        await asyncio.gather(*tasks)
    assert "1 database connection leak(s)" in str(info.value)
    assert "outlived_request on primary: GET /dirty" in str(info.value)
    assert "dirty-task" in str(info.value)


async def test_no_false_positives_over_thousands_of_requests(database_url: str) -> None:
    app, _ = leak_app(database_url, leak_threshold=0.2, pool_size=4)

    @app.get("/plain/{n}")
    async def plain(n: int, session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"v": (await session.execute(text("SELECT CAST(:n AS int)"), {"n": n})).scalar_one()}

    @app.get("/stream")
    async def stream(session: AsyncSession = Depends(get_session)) -> StreamingResponse:
        async def rows() -> Any:
            for i in range(3):
                result = await session.execute(text("SELECT CAST(:i AS int)"), {"i": i})
                yield f"{result.scalar()}\n"

        return StreamingResponse(rows(), media_type="text/plain")

    @app.get("/background")
    async def background(
        tasks: BackgroundTasks, session: AsyncSession = Depends(get_session)
    ) -> None:
        async def after() -> None:
            await session.execute(text("SELECT 1"))

        tasks.add_task(after)

    @app.get("/raises")
    async def raises(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("SELECT 1"))
        raise HTTPException(status_code=409, detail="conflict")

    @app.get("/fanout")
    async def fanout(factory: dbpool.SessionFactory = Depends(dbpool.session_factory)) -> None:
        async def one() -> None:
            async with factory() as s:
                await s.execute(text("SELECT 1"))

        await asyncio.gather(one(), one())

    @app.get("/slow")
    async def slow(session: AsyncSession = Depends(get_session)) -> None:
        await session.execute(text("SELECT pg_sleep(0.5)"))

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, session: AsyncSession = Depends(get_session)) -> None:
        await websocket.accept()
        value = (await session.execute(text("SELECT 42"))).scalar_one()
        await websocket.send_json({"v": value})
        await websocket.close()

    paths = ["/plain/1", "/stream", "/background", "/raises", "/fanout"]
    async with client_for(app) as client:
        async with dbpool.testing.assert_no_leaks(app):
            for round_ in range(60):
                results = await asyncio.gather(*(client.get(p) for p in paths for _ in range(7)))
                assert {r.status_code for r in results} <= {200, 409}, round_
            runtime = dbpool.get_runtime(app)
            # On a loaded machine some of the requests above may already count as slow.
            slow_before = runtime.leaks.slow_holds.get("primary", 0)
            slow_response = await client.get("/slow")
            assert slow_response.status_code == 200
        assert checked_out(app) == 0
        assert runtime.leaks.slow_holds.get("primary", 0) == slow_before + 1  # slow, not leaked
    # 60 rounds x 35 requests.
    assert runtime.leaks.total() == 0

    # Websockets and client disconnects, through a real server.
    async with serve(app) as base_url:
        async with dbpool.testing.assert_no_leaks(app):
            from websockets.asyncio.client import connect

            for _ in range(20):
                async with connect(base_url.replace("http", "ws") + "/ws") as sock:
                    assert await sock.recv() == '{"v":42}'
            async with httpx.AsyncClient(base_url=base_url) as http:
                for _ in range(5):
                    request = asyncio.create_task(http.get("/slow"))
                    await wait_until(lambda: checked_out(app) >= 1, 5)
                    request.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await request
                await wait_until(lambda: checked_out(app) == 0, 5)
        assert dbpool.get_runtime(app).leaks.total() == 0
