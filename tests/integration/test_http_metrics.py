"""The HTTP metrics DBPoolMiddleware records, against prometheus-fastapi-instrumentator's own.

The same requests go to two apps with the same routes: one with fastapi_dbpool (its HTTP
metrics on, the default), one with nothing but the instrumentator's middleware and default
metrics. Every series of the five families must come out the same: labels, counts, sizes,
duration counts (durations themselves differ run to run).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator.middleware import PrometheusInstrumentatorMiddleware
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Receive, Scope, Send

import fastapi_dbpool as dbpool
from tests.helpers.apps import client_for, settings_for

FAMILIES = (
    "http_requests_total",
    "http_request_size_bytes",
    "http_response_size_bytes",
    "http_request_duration_highr_seconds",
    "http_request_duration_seconds",
)


async def static_files(scope: Scope, receive: Receive, send: Send) -> None:
    body = b"static body"
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def add_routes(app: FastAPI, *, with_database: bool) -> None:
    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    @app.get("/plain")
    async def plain() -> str:
        return "plain"

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"one"
            yield b"two"

        return StreamingResponse(chunks())

    router = APIRouter()

    @router.get("/things/{thing}")
    async def thing(thing: str) -> dict[str, str]:
        return {"thing": thing}

    app.include_router(router, prefix="/api")
    app.mount("/static", static_files)

    if with_database:

        @app.get("/db")
        async def db(session: AsyncSession = Depends(dbpool.get_session)) -> int:
            return int((await session.execute(text("SELECT 1"))).scalar_one())

    else:

        @app.get("/db")
        async def no_db() -> int:
            return 1


REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/items/1", {}),
    ("GET", "/items/2", {}),
    ("GET", "/items/2", {}),
    ("GET", "/items/abc", {}),  # 422, labelled with the template
    ("POST", "/items/1", {}),  # 405: the route matched by path only
    ("HEAD", "/items/1", {}),
    ("POST", "/echo", {"content": b"x" * 1000}),
    ("POST", "/echo", {"content": b"hello"}),
    ("GET", "/plain", {}),
    ("GET", "/plain/", {}),  # redirected: the instrumentator labels it with the raw path
    ("GET", "/nope", {}),  # 404: "none"
    ("GET", "/nope/either", {}),
    ("GET", "/boom", {}),  # 500
    ("GET", "/stream", {}),  # no Content-Length
    ("GET", "/api/things/7", {}),
    ("GET", "/static/app.js", {}),
    ("GET", "/db", {}),
    ("DELETE", "/db", {}),
]


def series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The five families' samples, but durations: their sums and buckets vary run to run."""
    found = {}
    for family in registry.collect():
        if family.name not in {f.removesuffix("_total") for f in FAMILIES}:
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            if "duration" in s.name and not s.name.endswith("_count"):
                continue
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


async def send_all(client: httpx.AsyncClient) -> list[int]:
    statuses = []
    for method, path, extra in REQUESTS:
        statuses.append((await client.request(method, path, **extra)).status_code)
    return statuses


async def test_the_same_series_as_the_instrumentators_own_middleware(database_url: str) -> None:
    ours = CollectorRegistry()
    app = FastAPI()
    dbpool.install(app, settings=settings_for(database_url), registry=ours)
    add_routes(app, with_database=True)

    theirs = CollectorRegistry()
    reference = FastAPI()
    reference.add_middleware(PrometheusInstrumentatorMiddleware, registry=theirs)
    add_routes(reference, with_database=False)

    async with client_for(app, raise_app_exceptions=False) as client:
        got = await send_all(client)
        # Read between requests too: what a read takes is not counted again.
        middle = series(ours)
        assert (
            middle[
                (
                    "http_requests_total",
                    (("handler", "/db"), ("method", "DELETE"), ("status", "4xx")),
                )
            ]
            == 1
        )
        again = await send_all(client)
    reference_transport = httpx.ASGITransport(app=reference, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=reference_transport, base_url="http://test") as plain:
        expected = await send_all(plain)
        await send_all(plain)
    assert got == expected == again
    assert {404, 405, 307, 422, 500} <= set(got)

    assert series(ours) == series(theirs)
    # And the series are there: every request, counted twice.
    assert sum(
        v for (name, _), v in series(ours).items() if name == "http_requests_total"
    ) == 2 * len(REQUESTS)
