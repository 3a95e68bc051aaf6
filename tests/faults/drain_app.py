"""The app the SIGTERM tests run under a real uvicorn process (settings from the env)."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool

app = FastAPI()
dbpool.install(app)


@app.get("/slow")
async def slow(
    seconds: float, session: AsyncSession = Depends(dbpool.get_session)
) -> dict[str, float]:
    await session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
    return {"slept": seconds}
