"""Where the library's routes sit in the app's router, without a database.

``install`` adds /health/live, /health/database and /metrics before the app declares its
own routes; at startup they move after them unless that could change what answers.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Host, Match, Route
from starlette.types import Receive, Scope, Send

import fastapi_dbpool as dbpool
from fastapi_dbpool.health import LibraryRoute, router, try_library_routes_last

LIBRARY_PATHS = [getattr(route, "path", None) for route in router.routes]


async def plain_app(scope: Scope, receive: Receive, send: Send) -> None: ...


def installed() -> FastAPI:
    app = FastAPI()
    dbpool.install(app, settings=dbpool.DBPoolSettings(database_url="postgresql://db/test"))

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> None: ...

    @app.post("/items")
    async def create() -> None: ...

    return app


def paths(app: FastAPI) -> list[str]:
    return [getattr(route, "path", type(route).__name__) for route in app.router.routes]


def library_last(app: FastAPI) -> bool:
    return [getattr(r, "path", None) for r in app.router.routes[-3:]] == LIBRARY_PATHS


def test_moved_after_the_apps_routes_in_their_order() -> None:
    app = installed()
    before = paths(app)
    assert before.index("/health/live") < before.index("/items/{item_id}")
    assert try_library_routes_last(app)
    after = paths(app)
    assert library_last(app)
    assert [p for p in after if p not in LIBRARY_PATHS] == [
        p for p in before if p not in LIBRARY_PATHS
    ]
    # Once is enough: nothing more to move.
    assert not try_library_routes_last(app)
    assert paths(app) == after


def test_moved_past_an_included_router_that_does_not_answer_their_paths() -> None:
    app = installed()
    api = APIRouter()

    @api.get("/things/{thing}")
    async def thing(thing: str) -> None: ...

    app.include_router(api, prefix="/api")
    assert try_library_routes_last(app)
    assert library_last(app)


def catch_all(app: FastAPI) -> None:
    @app.get("/{path:path}")
    async def everything(path: str) -> None: ...


def static_at_root(app: FastAPI) -> None:
    app.mount("/", plain_app)


def own_metrics(app: FastAPI) -> None:
    @app.get("/metrics")
    async def metrics() -> None: ...


def post_only_health(app: FastAPI) -> None:
    @app.post("/health/live")
    async def post_live() -> None: ...


def host_route(app: FastAPI) -> None:
    app.router.routes.append(Host("api.example.com", plain_app))


def own_route_class(app: FastAPI) -> None:
    class Anything(Route):
        def matches(self, scope: Scope) -> tuple[Match, Scope]:
            return Match.NONE, {}

    app.router.routes.append(Anything("/x", plain_app))


def included_catch_all(app: FastAPI) -> None:
    api = APIRouter()

    @api.get("/{path:path}")
    async def everything(path: str) -> None: ...

    app.include_router(api)


@pytest.mark.parametrize(
    "declare",
    [
        catch_all,
        static_at_root,
        own_metrics,
        post_only_health,
        host_route,
        own_route_class,
        included_catch_all,
    ],
)
def test_kept_first_where_a_route_of_the_app_could_answer_their_paths(declare: Any) -> None:
    app = installed()
    declare(app)
    before = paths(app)
    assert not try_library_routes_last(app)
    assert paths(app) == before
    assert before.index("/health/live") < before.index("/items/{item_id}")
    assert not library_last(app)


def test_an_app_without_the_librarys_routes_is_left_alone() -> None:
    app = FastAPI()

    @app.get("/x")
    async def x() -> None: ...

    before = list(app.router.routes)
    assert not try_library_routes_last(app)
    assert app.router.routes == before


@pytest.mark.parametrize("path", LIBRARY_PATHS)
@pytest.mark.parametrize("root_path", ["", "/prefix"])
def test_a_library_route_answers_as_an_apiroute_would(path: str, root_path: str) -> None:
    ours = next(r for r in router.routes if getattr(r, "path", None) == path)
    assert isinstance(ours, LibraryRoute)
    theirs = APIRoute(path, ours.endpoint, methods=list(ours.methods or ()))
    for request_path in [path, path + "/", "/other", "/x" + path, root_path + path, "/", ""]:
        for method in ["GET", "POST", "HEAD"]:
            for kind in ["http", "websocket"]:
                scope = {
                    "type": kind,
                    "method": method,
                    "path": request_path,
                    "root_path": root_path,
                }
                assert ours.matches(scope)[0] == theirs.matches(scope)[0], scope
