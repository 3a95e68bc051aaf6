"""The example service: a small item catalogue on PostgreSQL, wired with fastapi_dbpool.

It uses only the public API. Each route shows one pattern:

* ``/items`` CRUD: the request's session (``Depends(dbpool.get_session)``), an explicit
  commit before a write answers; ``GET /items/{id}`` reads through a read-only session
  (``dbpool.session(read_only=True)``: no transaction round trips);
* ``GET /items/{id}/price``: a hot read path on the pooled asyncpg connection itself
  (``dbpool.driver_connection()``: no SQLAlchemy on the request's path);
* ``GET /items/export.csv``: a streamed body that reads the database while it streams;
* ``GET /reports/slow``: a route with its own statement timeout (2 s, then 504);
* ``GET /reports/summary``: independent queries in parallel (``dbpool.session_factory``);
* ``POST /items/{id}/touch``: a background task with its own short-lived session;
* ``/health/live``, ``/health/database``: from ``dbpool.install``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.sql.elements import ColumnElement

import fastapi_dbpool as dbpool

from .models import Base, Item

logger = logging.getLogger("example_app")

#: Statement timeout of the slow report: longer than this answers 504.
SLOW_REPORT_TIMEOUT = 2.0

SEED_ITEMS: list[dict[str, Any]] = [
    {"name": "Espresso", "price_cents": 250},
    {"name": "Croissant", "price_cents": 320},
    {"name": "Baguette", "price_cents": 180},
    {"name": "Pain au chocolat", "price_cents": 350},
]

# Any constant works: it only has to be the same in every worker of this service.
_SCHEMA_LOCK_KEY = 0x64627031


# -- response and request bodies ---------------------------------------------------------


class ItemIn(BaseModel):
    """What a client sends to create or replace an item."""

    name: str = Field(min_length=1, max_length=200)
    price_cents: int = Field(ge=0)


class ItemOut(BaseModel):
    """An item as the API returns it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    price_cents: int
    created_at: datetime
    touched_at: datetime | None


class TouchScheduled(BaseModel):
    """The answer of ``POST /items/{id}/touch``: the update runs after the response."""

    item_id: int
    status: Literal["scheduled"] = "scheduled"


class SlowReport(BaseModel):
    """The result of the slow report."""

    seconds: float
    item_count: int
    total_price_cents: int


class Summary(BaseModel):
    """Catalogue figures gathered by parallel queries."""

    item_count: int
    total_price_cents: int
    cheapest: ItemOut | None
    newest: ItemOut | None


# -- schema and seed data, in the app's own lifespan --------------------------------------


async def prepare_database(engine: AsyncEngine) -> None:
    """Create the table and seed it on first start; a no-op on later starts."""
    async with engine.begin() as conn:
        # Several workers may start at once: the first prepares, the others wait here
        # and then find the table created and seeded.
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        await conn.run_sync(Base.metadata.create_all)
        if await conn.scalar(select(func.count()).select_from(Item)) == 0:
            await conn.execute(insert(Item), SEED_ITEMS)
            logger.info("seeded the items table with %d rows", len(SEED_ITEMS))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # dbpool.install wraps this lifespan and starts first, so the engine exists here.
    await prepare_database(dbpool.get_runtime(app).engine())
    yield


app = FastAPI(title="fastapi-dbpool example", lifespan=lifespan)
dbpool.install(app)

DBSession = Annotated[AsyncSession, Depends(dbpool.get_session)]
# Reads of one row need no transaction: one round trip instead of BEGIN/SELECT/ROLLBACK.
ReadSession = Annotated[AsyncSession, Depends(dbpool.session(read_only=True))]
ReportSession = Annotated[AsyncSession, Depends(dbpool.session(timeout=SLOW_REPORT_TIMEOUT))]
SessionFactory = Annotated[dbpool.SessionFactory, Depends(dbpool.session_factory)]
# A hot read path: the pooled connection's asyncpg Connection, SQL written by hand.
Driver = Annotated[asyncpg.Connection, Depends(dbpool.driver_connection())]


def _not_found(item_id: int) -> HTTPException:
    return HTTPException(status_code=404, detail=f"item {item_id} not found")


# -- items --------------------------------------------------------------------------------


@app.get("/items")
async def list_items(
    session: DBSession,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[ItemOut]:
    """List items by id."""
    items = await session.scalars(select(Item).order_by(Item.id).limit(limit).offset(offset))
    return [ItemOut.model_validate(item) for item in items]


# Declared before /items/{item_id}, which would otherwise match "export.csv" and answer 422.
@app.get("/items/export.csv", response_class=StreamingResponse)
async def export_items(session: DBSession) -> StreamingResponse:
    """Every item as CSV, read from a server-side cursor while the body streams.

    The query starts here, so a database failure still answers a clean 503/504; the
    connection goes back to the pool when the last row has been sent.
    """
    result = await session.stream_scalars(
        select(Item).order_by(Item.id).execution_options(yield_per=500)
    )

    async def rows() -> AsyncIterator[str]:
        yield _csv_line("id", "name", "price_cents", "created_at", "touched_at")
        async for item in result:
            touched = item.touched_at.isoformat() if item.touched_at else ""
            yield _csv_line(
                item.id, item.name, item.price_cents, item.created_at.isoformat(), touched
            )

    return StreamingResponse(
        rows(),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="items.csv"'},
    )


@app.get("/items/{item_id}")
async def read_item(item_id: int, session: ReadSession) -> ItemOut:
    """One item; 404 when it does not exist (a read-only session)."""
    item = await session.get(Item, item_id)
    if item is None:
        raise _not_found(item_id)
    return ItemOut.model_validate(item)


class PriceOut(BaseModel):
    """An item's price."""

    id: int
    price_cents: int


@app.get("/items/{item_id}/price")
async def item_price(item_id: int, conn: Driver) -> PriceOut:
    """One item's price, read with asyncpg directly; 404 when it does not exist."""
    row = await conn.fetchrow("SELECT id, price_cents FROM items WHERE id = $1", item_id)
    if row is None:
        raise _not_found(item_id)
    return PriceOut(id=row["id"], price_cents=row["price_cents"])


@app.post("/items", status_code=201)
async def create_item(body: ItemIn, session: DBSession, response: Response) -> ItemOut:
    """Create an item; committed before the 201 goes out."""
    item = Item(name=body.name, price_cents=body.price_cents)
    session.add(item)
    await session.flush()  # INSERT ... RETURNING id, created_at
    created = ItemOut.model_validate(item)
    # Without this commit the insert is rolled back when the response starts.
    await session.commit()
    response.headers["Location"] = f"/items/{created.id}"
    return created


@app.put("/items/{item_id}")
async def replace_item(item_id: int, body: ItemIn, session: DBSession) -> ItemOut:
    """Replace an item's name and price; 404 when it does not exist."""
    item = await session.get(Item, item_id, with_for_update=True)
    if item is None:
        raise _not_found(item_id)
    item.name = body.name
    item.price_cents = body.price_cents
    await session.flush()
    replaced = ItemOut.model_validate(item)
    await session.commit()
    return replaced


@app.delete("/items/{item_id}", status_code=204)
async def delete_item(item_id: int, session: DBSession) -> None:
    """Delete an item; 404 when it does not exist."""
    item = await session.get(Item, item_id)
    if item is None:
        raise _not_found(item_id)
    await session.delete(item)
    await session.commit()


@app.post("/items/{item_id}/touch", status_code=202)
async def touch_item(
    item_id: int, request: Request, session: DBSession, background: BackgroundTasks
) -> TouchScheduled:
    """Record, after the response, that the item was touched (sets ``touched_at``).

    The background task runs once the request's connection is back in the pool; it must
    not use the request's session, so it opens (and closes) a session of its own.
    """
    if await session.get(Item, item_id) is None:
        raise _not_found(item_id)
    sessionmaker = dbpool.get_runtime(request.app).sessionmaker()
    background.add_task(_mark_touched, sessionmaker, item_id)
    return TouchScheduled(item_id=item_id)


async def _mark_touched(sessionmaker: async_sessionmaker[Any], item_id: int) -> None:
    try:
        async with sessionmaker() as session, session.begin():
            await session.execute(
                update(Item).where(Item.id == item_id).values(touched_at=func.now())
            )
    except Exception:
        # The client already has its 202; the log is the only place this can go.
        logger.exception("touching item %d failed", item_id)


# -- reports ------------------------------------------------------------------------------


@app.get("/reports/slow")
async def slow_report(
    session: ReportSession,
    seconds: Annotated[float, Query(gt=0, le=10)] = 1.0,
) -> SlowReport:
    """A report that takes ``seconds``; beyond 2 s PostgreSQL cancels it and this is 504."""
    await session.execute(select(func.pg_sleep(seconds)))
    count, total = (
        await session.execute(
            select(func.count(Item.id), func.coalesce(func.sum(Item.price_cents), 0))
        )
    ).one()
    return SlowReport(seconds=seconds, item_count=count, total_price_cents=total)


@app.get("/reports/summary")
async def summary(sessions: SessionFactory) -> Summary:
    """Three queries at once, each on its own session and connection.

    One session runs one statement at a time, so parallel queries each take a session
    from ``dbpool.session_factory`` rather than share the request's.
    """

    async def totals() -> tuple[int, int]:
        async with sessions() as session:
            count, total = (
                await session.execute(
                    select(func.count(Item.id), func.coalesce(func.sum(Item.price_cents), 0))
                )
            ).one()
            return int(count), int(total)

    async def first_by(order: ColumnElement[Any]) -> ItemOut | None:
        async with sessions() as session:
            item = await session.scalar(select(Item).order_by(order, Item.id).limit(1))
            return ItemOut.model_validate(item) if item is not None else None

    # A TaskGroup, not gather(): when one query fails the others are cancelled, so no
    # task still holds a session once the request is over.
    async with asyncio.TaskGroup() as group:
        figures = group.create_task(totals())
        cheapest = group.create_task(first_by(Item.price_cents.asc()))
        newest = group.create_task(first_by(Item.created_at.desc()))
    count, total = figures.result()
    return Summary(
        item_count=count,
        total_price_cents=total,
        cheapest=cheapest.result(),
        newest=newest.result(),
    )


def _csv_line(*fields: object) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(fields)
    return buffer.getvalue()
