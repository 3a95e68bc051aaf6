"""The HTTP metrics' own parts, without a database: route templates and batched recording.

Both are checked against the instrumentator itself: RouteNames against its
``get_route_name`` over a grid of requests, the batched sink against the same
observations made one by one through prometheus_client.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_fastapi_instrumentator import routing
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.routing import Host, Match, Route
from starlette.types import Receive, Scope, Send

from fastapi_dbpool.http_metrics import HTTPSink, RouteNames, _Families, http_sink


async def plain_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app with no routes of its own (as StaticFiles)."""


def rich_app(*, redirect_slashes: bool = True) -> FastAPI:
    """Routes of every kind RouteNames compiles, in an order where it matters."""
    app = FastAPI(redirect_slashes=redirect_slashes)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> None: ...

    @app.post("/items/{item_id}")
    async def post_item(item_id: int) -> None: ...

    @app.get("/items/special")  # shadowed by /items/{item_id} for GET: first match wins
    async def special() -> None: ...

    @app.put("/items/special")
    async def put_special() -> None: ...

    @app.get("/files/{name:path}")
    async def files(name: str) -> None: ...

    @app.get("/ratio/{value:float}")
    async def ratio(value: float) -> None: ...

    @app.get("/id/{key:uuid}")
    async def by_uuid(key: str) -> None: ...

    @app.get("/count/{n:int}")
    async def count(n: int) -> None: ...

    @app.get("/plain")
    async def plain() -> None: ...

    @app.get("/slashed/")
    async def slashed() -> None: ...

    @app.api_route("/any", methods=["GET", "DELETE"])
    async def any_route() -> None: ...

    @app.websocket("/ws")
    async def ws() -> None: ...

    inner = APIRouter()

    @inner.get("/things/{thing}")
    async def thing(thing: str) -> None: ...

    deeper = APIRouter()

    @deeper.patch("/deep")
    async def deep() -> None: ...

    inner.include_router(deeper, prefix="/more")
    app.include_router(inner, prefix="/api")
    app.mount("/static", plain_app)
    app.router.routes.append(Route("/starlette/{x}", plain_app, methods=["GET"]))
    return app


PATHS = [
    "/",
    "",
    "/items/1",
    "/items/abc",
    "/items/special",
    "/items/",
    "/items",
    "/items/1/",
    "/files/a/b/c.txt",
    "/files/",
    "/ratio/1.5",
    "/ratio/x",
    "/id/9f1e4b8a-7c1d-4f5e-9a3b-2d6c8e0f1a2b",
    "/id/not-a-uuid",
    "/count/12",
    "/count/-1",
    "/plain",
    "/plain/",
    "/slashed",
    "/slashed/",
    "/any",
    "/ws",
    "/api/things/7",
    "/api/things/",
    "/api/more/deep",
    "/api/more/deep/",
    "/static",
    "/static/",
    "/static/app.js",
    "/starlette/1",
    "/nope",
    "/root/items/1",
    "/rootitems/1",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
ROOT_PATHS = ["", "/root"]


def instrumentator_name(app: Any, method: str, path: str, root_path: str) -> str | None:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": root_path,
        "app": app,
        "headers": [],
        "query_string": b"",
    }
    return routing.get_route_name(Request(scope), should_include_root_path=False)


@pytest.mark.parametrize("redirect_slashes", [True, False])
def test_route_names_agree_with_the_instrumentator(redirect_slashes: bool) -> None:
    app = rich_app(redirect_slashes=redirect_slashes)
    names = RouteNames.of(app)
    assert names is not None
    checked = disagreements = 0
    found = set()
    for root_path in ROOT_PATHS:
        for path in PATHS:
            for method in METHODS:
                expected = instrumentator_name(app, method, path, root_path)
                got = names.name(method, path, root_path)
                checked += 1
                found.add(expected)
                if got != expected:
                    disagreements += 1
                    print(f"{method} {path!r} root {root_path!r}: {got!r} != {expected!r}")
    assert disagreements == 0, f"{disagreements} of {checked} differ"
    # The grid reaches every kind of answer: templates, a partial match's, a mount's, a
    # toggled-slash raw path (with redirect_slashes), none.
    assert {"/items/{item_id}", "/items/special", "/api/more/deep", "/static", None} <= found
    assert ("/plain/" in found) is redirect_slashes


def test_route_names_are_not_compiled_where_matching_needs_more_than_method_and_path() -> None:
    with_host = FastAPI()
    with_host.router.routes.append(Host("api.example.com", plain_app))
    assert RouteNames.of(with_host) is None

    sub = FastAPI()

    @sub.get("/inside")
    async def inside() -> None: ...

    with_sub_app = FastAPI()
    with_sub_app.mount("/sub", sub)
    assert RouteNames.of(with_sub_app) is None

    class HeaderRoute(Route):
        def matches(self, scope: Scope) -> tuple[Match, Scope]:
            return Match.NONE, {}

    with_own_class = FastAPI()
    with_own_class.router.routes.append(HeaderRoute("/h", plain_app))
    assert RouteNames.of(with_own_class) is None

    class EvenConvertor(Convertor[int]):
        regex = "[0-9]+"

        def convert(self, value: str) -> int:
            return int(value)

        def to_string(self, value: int) -> str:
            return str(value)

    register_url_convertor("dbpool_even", EvenConvertor())
    with_own_convertor = FastAPI()
    with_own_convertor.router.routes.append(Route("/e/{n:dbpool_even}", plain_app))
    assert RouteNames.of(with_own_convertor) is None

    assert RouteNames.of(FastAPI()) is not None  # its docs routes
    assert RouteNames.of(plain_app) is None
    assert RouteNames.of(rich_app()) is not None


# -- the sink: batched against one by one -------------------------------------------------

#: (method, status group, handler, request bytes, response bytes, seconds): bucket bounds
#: exactly, just above and below them, past the last, zero.
OBSERVATIONS = [
    ("GET", "2xx", "/items/{item_id}", 0, 13, 0.0),
    ("GET", "2xx", "/items/{item_id}", 0, 13, 0.01),
    ("GET", "2xx", "/items/{item_id}", 0, 15, 0.0100001),
    ("GET", "2xx", "/items/{item_id}", 0, 13, 0.1),
    ("GET", "5xx", "/items/{item_id}", 0, 21, 0.5),
    ("POST", "2xx", "/items/{item_id}", 11, 2, 0.49999),
    ("POST", "4xx", "/items/{item_id}", 4096, 90, 1.0),
    ("GET", "4xx", "none", 0, 22, 1.5),
    ("GET", "2xx", "/health/live", 0, 15, 60.0),
    ("GET", "2xx", "/health/live", 0, 15, 61.0),
    ("DELETE", "3xx", "/plain/", 0, 0, 7.5),
]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def record(sink: HTTPSink, observations: list[tuple[str, str, str, int, int, float]]) -> None:
    scope: Scope = {"type": "http", "headers": []}
    for method, group, handler, request_bytes, response_bytes, seconds in observations:
        sink.add(scope, method, group, handler, request_bytes, response_bytes, seconds)


def assert_same(batched: dict[Any, float], direct: dict[Any, float]) -> None:
    assert batched.keys() == direct.keys()
    for key, value in direct.items():
        # Sums are added in another order: equal up to rounding.
        assert math.isclose(batched[key], value, rel_tol=1e-12, abs_tol=1e-12), key


def test_a_batch_adds_up_to_the_same_samples_as_one_by_one() -> None:
    one_by_one = CollectorRegistry()
    direct = HTTPSink(
        http_sink(one_by_one).instrumentation, _Families.of(one_by_one), batched=False
    )
    batched_registry = CollectorRegistry()
    batched = http_sink(batched_registry)
    assert batched._batched and not direct._batched

    record(direct, OBSERVATIONS)
    record(batched, OBSERVATIONS)
    expected = samples(one_by_one)
    get = (("handler", "/items/{item_id}"), ("method", "GET"), ("status", "2xx"))
    assert expected[("http_requests_total", get)] == 4
    assert_same(samples(batched_registry), expected)

    # Read again with nothing new: nothing added twice; then more, read through one family.
    assert_same(samples(batched_registry), expected)
    record(direct, OBSERVATIONS[:3])
    record(batched, OBSERVATIONS[:3])
    only = batched_registry.restricted_registry(["http_request_duration_highr_seconds_bucket"])
    highr = generate_latest(only).decode()
    assert 'http_request_duration_highr_seconds_bucket{le="+Inf"} 14.0' in highr
    assert_same(samples(batched_registry), samples(one_by_one))


def test_a_batch_is_read_by_any_family_and_only_once() -> None:
    registry = CollectorRegistry()
    sink = http_sink(registry)
    record(sink, OBSERVATIONS[:2])
    assert (
        registry.get_sample_value("http_request_size_bytes_count", {"handler": "/items/{item_id}"})
        == 2
    )
    # The read took the whole batch: the other families have it too, once.
    assert (
        registry.get_sample_value(
            "http_requests_total",
            {"method": "GET", "status": "2xx", "handler": "/items/{item_id}"},
        )
        == 2
    )
    assert registry.get_sample_value("http_request_duration_highr_seconds_count") == 2


def test_past_the_pending_limit_requests_are_recorded_directly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    sink = http_sink(registry)
    monkeypatch.setattr(HTTPSink, "MAX_PENDING", 2)
    many = [("GET", "2xx", f"/h{i}", 0, 1, 0.001) for i in range(5)]
    record(sink, many)
    assert len(sink._pending) == 2
    for i in range(5):
        assert (
            registry.get_sample_value(
                "http_requests_total", {"method": "GET", "status": "2xx", "handler": f"/h{i}"}
            )
            == 1
        )
