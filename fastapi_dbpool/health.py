"""The /health routes: liveness, and readiness answered from cached state.

``/health/database`` reads what the background probe last saw, the breaker and the pool's
counters; it never checks out a connection, so it answers in microseconds however often
it is asked and whatever state the database is in.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .breaker import BreakerState
from .context import STATE_KEY
from .errors import NotInstalledError
from .leaks import LEAK_KINDS
from .metrics import metrics_endpoint
from .runtime import DBPoolRuntime

router = APIRouter(tags=["health"])
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
