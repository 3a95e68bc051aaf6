"""The /health routes: liveness, and readiness answered from cached state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .context import STATE_KEY
from .errors import NotInstalledError
from .runtime import DBPoolRuntime

router = APIRouter(tags=["health"])


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
    return {"status": "ok"}


@router.get("/health/database", include_in_schema=False)
async def health_database(request: Request) -> JSONResponse:
    """Readiness: database state from the pool, never a checkout."""
    runtime = _runtime(request)
    databases: dict[str, Any] = {}
    overall = "ok"
    for name, db in runtime.databases.items():
        pool = db.pool_status()
        status = "ok"
        if pool["checked_out"] >= pool["max"] and pool["waiting"] > 0:
            status = "degraded"
            overall = "degraded"
        databases[name] = {"status": status, "pool": pool, "sizing": db.budget.as_dict()}
    if runtime.draining:
        return JSONResponse({"status": "draining", "databases": databases}, status_code=503)
    return JSONResponse({"status": overall, "databases": databases})
