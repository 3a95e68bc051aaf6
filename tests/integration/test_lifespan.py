"""Pod-sized engines at startup, composed lifespans, nothing left at shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from fastapi import Depends, FastAPI, Request
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool
from fastapi_dbpool import get_session
from tests.helpers.apps import client_for, make_app, settings_for
from tests.integration.test_sessions import plain_dsn


async def connections_named(url: str, application_name: str) -> int:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid()",
            application_name,
        )
        return count
    finally:
        await conn.close()


async def test_pool_is_warmed_at_startup_and_gone_after_shutdown(database_url: str) -> None:
    app = make_app(settings_for(database_url, pool_size=3, application_name="dbpool-life"))

    @app.get("/q")
    async def q(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"v": (await session.execute(text("SELECT 1"))).scalar_one()}

    async with client_for(app) as client:
        # pool_size pooled connections plus the health probe's own
        assert await connections_named(database_url, "dbpool-life") == 3 + 1
        assert (await client.get("/q")).json() == {"v": 1}
    assert await connections_named(database_url, "dbpool-life") == 0


async def test_connection_held_outside_requests_is_closed_at_shutdown(database_url: str) -> None:
    app = make_app(settings_for(database_url, pool_size=2, application_name="dbpool-held"))
    async with client_for(app):
        runtime = dbpool.get_runtime(app)
        held = await runtime.engine().connect()
        await held.execute(text("SELECT 1"))
        assert await connections_named(database_url, "dbpool-held") == 2 + 1
    assert await connections_named(database_url, "dbpool-held") == 0
    # The holder finds its connection closed under it, and can still let go cleanly.
    with pytest.raises(DBAPIError):
        await held.execute(text("SELECT 1"))
    await held.close()


async def test_pool_is_sized_from_the_server_budget_and_logged_once(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_dbpool")
    settings = settings_for(
        database_url, pool_size=None, max_overflow=None, pod_count=3, web_concurrency=4
    )
    app = make_app(settings)
    async with client_for(app) as client:
        body = (await client.get("/health/database")).json()
        db = dbpool.get_runtime(app).databases["primary"]
        assert db.server is not None
        available = db.server.limits.available
    sizing = body["databases"]["primary"]["sizing"]
    expected = available // 12 - 1
    assert sizing["pool_size"] == expected
    assert sizing["max_overflow"] == 0
    assert sizing["processes"] == 12
    assert sizing["fleet_peak"] <= available
    assert body["databases"]["primary"]["pool"]["max"] == expected
    lines = [r.getMessage() for r in caplog.records if "pool_size=" in r.getMessage()]
    assert len(lines) == 1
    assert f"pool_size={expected} max_overflow=0 (derived)" in lines[0]
    assert "3 pods + 0 surge x 4 workers = 12 processes" in lines[0]


async def test_install_wraps_the_apps_own_lifespan(database_url: str) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # The app's startup code can already use the engines.
        async with dbpool.get_runtime(app).engine().connect() as conn:
            events.append(f"startup saw {(await conn.execute(text('SELECT 41 + 1'))).scalar()}")
        yield {"greeting": "hello"}
        events.append("own shutdown")

    app = FastAPI(lifespan=own)
    dbpool.install(app, settings=settings_for(database_url))

    @app.get("/q")
    async def q(request: Request, session: AsyncSession = Depends(get_session)) -> dict[str, Any]:
        value = (await session.execute(text("SELECT 1"))).scalar_one()
        return {"greeting": request.state.greeting, "v": value}

    async with client_for(app) as client:
        assert (await client.get("/q")).json() == {"greeting": "hello", "v": 1}
        assert (await client.get("/health/live")).json() == {"status": "ok"}
    assert events == ["startup saw 42", "own shutdown"]


async def test_explicit_wiring_reads_the_environment(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url.replace("postgresql+asyncpg", "postgres"))
    monkeypatch.setenv("DB_POOL_SIZE", "2")
    monkeypatch.setenv("DB_APPLICATION_NAME", "dbpool-explicit")
    app = FastAPI(lifespan=dbpool.lifespan)
    app.add_middleware(dbpool.DBPoolMiddleware)
    app.include_router(dbpool.router)

    @app.get("/q")
    async def q(session: AsyncSession = Depends(get_session)) -> dict[str, str]:
        return {"name": (await session.execute(text("SHOW application_name"))).scalar_one()}

    async with client_for(app) as client:
        assert (await client.get("/q")).json() == {"name": "dbpool-explicit"}
        assert await connections_named(database_url, "dbpool-explicit") == 2 + 1


async def test_bad_setting_stops_startup_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw-secret@localhost/db")
    monkeypatch.setenv("DB_CHECKOUT_TIMEOUT", "0")
    app = FastAPI(lifespan=dbpool.lifespan)
    app.add_middleware(dbpool.DBPoolMiddleware)
    with pytest.raises(dbpool.ConfigurationError, match="DB_CHECKOUT_TIMEOUT") as info:
        async with client_for(app):
            pass
    assert "pw-secret" not in str(info.value)


async def test_no_database_url_stops_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    app = FastAPI(lifespan=dbpool.lifespan)
    app.add_middleware(dbpool.DBPoolMiddleware)
    with pytest.raises(dbpool.ConfigurationError, match="DATABASE_URL is not set"):
        async with client_for(app):
            pass
