"""Building and running test apps: in-process (httpx ASGI) or behind a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool
from fastapi_dbpool import get_session
from tests.helpers import wait_until


def settings_for(database_url: str, **overrides: Any) -> dbpool.DBPoolSettings:
    """Settings for a test app: small pool, explicit budget, fast deadlines."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "pool_size": 4,
        "max_overflow": 0,
        "checkout_timeout": 2.0,
        "application_name": "dbpool-test",
    }
    values.update(overrides)
    return dbpool.DBPoolSettings(**values)


def make_app(
    settings: dbpool.DBPoolSettings,
    *,
    registry: CollectorRegistry | None = None,
    **fastapi_kwargs: Any,
) -> FastAPI:
    """A FastAPI app wired with ``dbpool.install``, with its own metrics registry."""
    app = FastAPI(**fastapi_kwargs)
    dbpool.install(app, settings=settings, registry=registry or CollectorRegistry())
    return app


@asynccontextmanager
async def client_for(
    app: FastAPI, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give an in-process client (which raises what the app
    raises, unless told to answer it as a server would: 500)."""
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def serve(app: FastAPI, **config: Any) -> AsyncIterator[str]:
    """Serve the app with a real uvicorn in this event loop; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **config
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped during startup")
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(30):
            await task


async def leave_once(base_url: str, path: str, running: Callable[[], Awaitable[bool]]) -> None:
    """``GET path`` from a real client that gives up (closes its connection) as soon as
    ``running()`` holds: a client leaving mid-request."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        request = asyncio.create_task(client.get(path))
        await wait_until(running, 5, message=f"{path} running on the server")
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        assert request.cancelled(), f"{path} answered before the client left"


def holding_app(
    database_url: str, **overrides: Any
) -> tuple[FastAPI, asyncio.Event, asyncio.Event]:
    """An app with ``/hold`` (takes a connection, sets ``holding``, waits for ``release``)
    and ``/query`` (one ``SELECT 1``)."""
    app = make_app(settings_for(database_url, **overrides))
    holding = asyncio.Event()
    release = asyncio.Event()

    @app.get("/hold")
    async def hold(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        await session.execute(text("SELECT 1"))
        holding.set()
        await release.wait()
        return {"held": 1}

    @app.get("/query")
    async def query(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"value": (await session.execute(text("SELECT 1"))).scalar_one()}

    return app, holding, release
