"""The /health routes: liveness, and readiness answered from cached state.

``/health/database`` reads what the background probe last saw, the breaker and the pool's
counters; it never checks out a connection, so it answers in microseconds however often
it is asked and whatever state the database is in.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, APIWebSocketRoute
from prometheus_fastapi_instrumentator import routing as instrumentator_routing
from starlette.routing import Match, Mount, Route, WebSocketRoute
from starlette.types import Scope

from .breaker import BreakerState
from .context import STATE_KEY
from .errors import NotInstalledError
from .leaks import LEAK_KINDS
from .metrics import metrics_endpoint
from .runtime import DBPoolRuntime


class LibraryRoute(APIRoute):
    """An APIRoute that is quick to tell a request is not for it.

    The router tries its routes in order, and ``install`` adds these before the app's own
    routes (so a catch-all of the app's, a static mount at ``/``, cannot hide the probes):
    every request the app serves tries them first. ``APIRoute.matches`` costs about a
    microsecond even for a path it cannot match. These paths have no parameters, and the
    path a route matches against is the request's path or a suffix of it (below the root
    path, below an ``include_router`` prefix): a path that does not end with the route's
    cannot match, and anything else is matched by ``APIRoute`` itself, so the outcome is
    always APIRoute's.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path")
        if isinstance(path, str) and not path.endswith(self.path):
            return Match.NONE, {}
        return super().matches(scope)


router = APIRouter(tags=["health"], route_class=LibraryRoute)

#: The ``matches`` of route classes whose match depends on the request's type, method and
#: path alone (a mount: on the path's prefix).
_PATH_ONLY_MATCHES = frozenset(
    (
        Route.matches,
        APIRoute.matches,
        LibraryRoute.matches,
        WebSocketRoute.matches,
        APIWebSocketRoute.matches,
        Mount.matches,
    )
)


def try_library_routes_last(app: Any) -> bool:
    """Move the routes ``install`` added after the app's own, where that changes nothing.

    ``install`` adds them before the app's routes are declared, so they come first and
    every request the app serves is tried against them before its own route (~20,000
    instructions per request for the three, callgrind). After the app's routes they cost
    nothing to requests that match earlier. Moved only when no route of the app would
    answer their paths (a catch-all, a static mount at ``/``, a ``/metrics`` of its own:
    then the library's stay first, so the probes stay reachable) and every route of the
    app matches on the method and the path alone (no ``Host`` route, no route class of
    its own), so that the check tells. Called at startup, when the app's routes exist.

    Returns:
        Whether the routes were moved.
    """
    routes = getattr(getattr(app, "router", None), "routes", None)
    if not isinstance(routes, list):
        return False
    ours = [route for route in routes if any(route is own for own in router.routes)]
    others = [route for route in routes if all(route is not own for own in ours)]
    if not ours or routes[len(others) :] == ours:
        return False
    effective = getattr(instrumentator_routing, "_effective_routes", None)
    if effective is None:
        return False
    candidates = effective(others)
    if not all(matched_by_path(route) for route in candidates):
        return False
    for route in ours:
        for method in sorted(route.methods or ()):
            scope = {"type": "http", "method": method, "path": route.path, "root_path": ""}
            if any(other.matches(scope)[0] is not Match.NONE for other in candidates):
                return False
    routes[:] = [*others, *ours]
    mark_changed = getattr(app.router, "_mark_routes_changed", None)
    if callable(mark_changed):
        mark_changed()
    return True


def matched_by_path(route: Any) -> bool:
    """Whether a route's match depends on the request's type, method and path alone (a
    mount's: on the path's prefix), as :func:`try_library_routes_last` and the HTTP
    metrics' compiled routes need."""
    if getattr(type(route), "matches", None) in _PATH_ONLY_MATCHES:
        return True
    # An APIRoute of an included router, as FastAPI's effective route context.
    original = getattr(route, "original_route", None)
    return (
        type(route).__name__ == "_EffectiveRouteContext"
        and original is not None
        and getattr(type(original), "matches", None) in (APIRoute.matches, LibraryRoute.matches)
    )


router.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)

OK = "ok"
DEGRADED = "degraded"
UNAVAILABLE = "unavailable"
DRAINING = "draining"


def _runtime(request: Request) -> DBPoolRuntime:
    runtime = request.state._state.get(STATE_KEY)
    if not isinstance(runtime, DBPoolRuntime):
        raise NotInstalledError(
            "dbpool.router needs the fastapi_dbpool lifespan: use "
            "`FastAPI(lifespan=dbpool.lifespan)` or `dbpool.install(app)`"
        )
    return runtime


@router.get("/health/live", include_in_schema=False)
async def health_live() -> dict[str, str]:
    """Liveness: 200 whenever the process can serve; never touches the database."""
    return {"status": OK}


@router.get("/health/database", include_in_schema=False)
async def health_database(request: Request) -> JSONResponse:
    """Readiness: breaker, probe and pool state of every database (cached, no checkout)."""
    runtime = _runtime(request)
    body, code = readiness(runtime)
    return JSONResponse(body, status_code=code)


def readiness(runtime: DBPoolRuntime) -> tuple[dict[str, Any], int]:
    """The readiness body and status code from the runtime's cached state."""
    settings = runtime.settings
    databases: dict[str, Any] = {}
    overall = OK
    for name, db in runtime.databases.items():
        probe = runtime.probes[name].result
        breaker = db.breaker
        pool = db.pool_status()
        if breaker.state is BreakerState.OPEN or probe.ok is False:
            status = UNAVAILABLE
        elif breaker.state is BreakerState.HALF_OPEN or (
            pool["checked_out"] >= pool["max"] and pool["waiting"] > 0
        ):
            status = DEGRADED
        else:
            status = OK
        entry: dict[str, Any] = {
            "status": status,
            "circuit_breaker": breaker.snapshot(),
            "pool": pool,
            "probe": {
                "ok": probe.ok,
                "latency_ms": None if probe.latency is None else round(probe.latency * 1000, 3),
                "error": probe.error,
                "interval": settings.health_check_interval,
            },
            "sizing": db.budget.as_dict(),
        }
        entry["leaks"] = {kind: runtime.leaks.counts.get((name, kind), 0) for kind in LEAK_KINDS}
        if db.failover is not None:
            entry["failover"] = db.failover.snapshot()
        if settings.health_details:
            entry["server_version"] = db.server.version if db.server else None
            entry["url"] = db.safe_url
        databases[name] = entry
        if status == UNAVAILABLE and name == "primary":
            overall = UNAVAILABLE
        elif status != OK and overall == OK:
            overall = DEGRADED
    leaks = runtime.leaks.snapshot(with_stacks=settings.health_details)
    if runtime.draining:
        return {"status": DRAINING, "databases": databases, "leaks": leaks}, 503
    if overall == UNAVAILABLE:
        if settings.readiness_requires_database:
            return {"status": UNAVAILABLE, "databases": databases, "leaks": leaks}, 503
        overall = DEGRADED
    return {"status": overall, "databases": databases, "leaks": leaks}, 200
