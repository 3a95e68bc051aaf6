"""The apps under comparison: one factory per variant, the same routes in each.

* ``bare`` - the plain pattern the FastAPI and SQLAlchemy docs teach: an engine made with
  the app (``create_async_engine``), ``async_sessionmaker``, and ``async def
  get_session(): async with Session() as s: yield s``; ``pool_pre_ping=False``.
* ``production`` - the same with ``pool_pre_ping=True``, as deployment guides recommend.
* ``bare_instr`` - ``bare`` with prometheus-fastapi-instrumentator as its README wires it
  (``Instrumentator().instrument(app)``): what the plain pattern pays for HTTP metrics.
* ``dbpool`` - fastapi_dbpool with every feature on except the HTTP metrics.
* ``dbpool_instr`` - the same plus the HTTP metrics (``DB_HTTP_METRICS``, on by default):
  the instrumentator's families, recorded by the library's middleware.
* ``dbpool_ro`` - the ``dbpool`` variant with its routes declared read-only
  (``Depends(dbpool.session(read_only=True))``): statements in autocommit, no BEGIN or
  ROLLBACK round trips.
* ``dbpool_driver`` - the ``dbpool`` variant with its routes on the pooled connection's
  asyncpg ``Connection`` (``Depends(dbpool.driver_connection())``): autocommit, no
  SQLAlchemy session or statement on the request's path.
* ``asyncpg`` - the floor: FastAPI with a raw asyncpg pool, no SQLAlchemy.

Routes: ``/select1`` (``SELECT 1``), ``/items/{id}`` (a primary-key lookup),
``/hold?seconds=`` (holds its connection on the server, for the burst), ``/health/live``.
Every variant gets the same pool size; ``app_from_env`` builds one for ``uvicorn
--factory`` from ``BENCH_*`` environment variables, with ``/bench/opened`` (the database
connections the server's pool has opened so far: pool churn shows there);
``BENCH_LIVENESS_PORT`` turns on the library's liveness port (``DB_LIVENESS_PORT``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from fastapi import Depends, FastAPI, HTTPException
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import Pool

import fastapi_dbpool as dbpool

from .common import ITEMS_TABLE, asyncpg_dsn, dbpool_settings_fields

#: Whether this checkout of the library has read-only routes (``session(read_only=True)``).
READ_ONLY_ROUTES = "read_only" in inspect.signature(dbpool.session).parameters
#: Whether it has ``driver_connection()`` (routes on the asyncpg connection itself).
DRIVER_ROUTES = hasattr(dbpool, "driver_connection")

#: The variants of the HTTP and in-process comparisons; ``dbpool_ro`` only when the
#: library has read-only routes (a missing feature is reported, not faked).
VARIANTS: tuple[str, ...] = (
    "bare",
    "production",
    "bare_instr",
    "dbpool",
    "dbpool_instr",
    *(("dbpool_ro",) if READ_ONLY_ROUTES else ()),
    *(("dbpool_driver",) if DRIVER_ROUTES else ()),
    "asyncpg",
)

#: The variants held to the read-only target (>= 1.5x production), when present.
READ_ONLY_VARIANTS = ("dbpool_ro", "dbpool_driver")

LABELS = {
    "bare": "plain, bare (pre_ping off)",
    "production": "plain, production (pre_ping on)",
    "bare_instr": "plain, bare + instrumentator",
    "dbpool": "fastapi_dbpool, all features",
    "dbpool_instr": "fastapi_dbpool + HTTP metrics",
    "dbpool_ro": "fastapi_dbpool, read-only route",
    "dbpool_driver": "fastapi_dbpool, driver_connection route",
    "asyncpg": "raw asyncpg pool (floor)",
}

#: ``application_name`` of each variant's connections (counted in pg_stat_activity).
APPLICATION_NAME = "dbpool-bench"

#: Database connections opened in this process by the variants' pools (``/bench/opened``).
_opened = {"connections": 0}


def _count_connection(*_: Any) -> None:
    _opened["connections"] += 1


async def _count_asyncpg_connection(conn: Any) -> None:
    _count_connection()


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = ITEMS_TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    price_cents: Mapped[int]


@dataclass(frozen=True)
class AppConfig:
    """What every variant is built with."""

    url: str
    pool_size: int = 10
    max_overflow: int = 10
    checkout_timeout: float = 30.0
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Extra DBPoolSettings fields for the dbpool variants (ignored by the others)."""


SessionDependency = Callable[..., Any]


def _add_session_routes(app: FastAPI, get_session: SessionDependency) -> None:
    @app.get("/select1")
    async def select1(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        value = (await session.execute(text("SELECT 1"))).scalar_one()
        return {"value": value}

    @app.get("/items/{item_id}")
    async def read_item(
        item_id: int, session: AsyncSession = Depends(get_session)
    ) -> dict[str, Any]:
        item = await session.get(Item, item_id)
        if item is None:
            raise HTTPException(404, "no such item")
        return {"id": item.id, "name": item.name, "price_cents": item.price_cents}

    @app.get("/hold")
    async def hold(seconds: float, session: AsyncSession = Depends(get_session)) -> dict[str, str]:
        await session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
        return {"status": "done"}


def _add_live(app: FastAPI) -> None:
    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}


def plain_app(config: AppConfig, *, pre_ping: bool, instrumented: bool = False) -> FastAPI:
    """The plain pattern, as the docs teach it (the engine is module-level there);
    ``instrumented``: with prometheus-fastapi-instrumentator's middleware and default
    metrics, as its README adds them (in a registry of its own)."""
    engine = create_async_engine(
        config.url,
        pool_size=config.pool_size,
        max_overflow=config.max_overflow,
        pool_timeout=config.checkout_timeout,
        pool_pre_ping=pre_ping,
        connect_args={"server_settings": {"application_name": APPLICATION_NAME}},
    )
    session_maker = async_sessionmaker(engine, expire_on_commit=False)

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with session_maker() as session:
            yield session

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.state.engine = engine
    _add_session_routes(app, get_session)
    _add_live(app)
    if instrumented:
        Instrumentator(registry=CollectorRegistry()).instrument(app)
    return app


def dbpool_settings(config: AppConfig, **overrides: Any) -> dbpool.DBPoolSettings:
    """Settings of the dbpool variants: library defaults, the comparison's pool size.

    Fields this checkout of the library does not have are dropped (a benchmark of a
    feature still being built reports it as missing instead of failing).
    """
    values: dict[str, Any] = {
        "database_url": config.url,
        "pool_size": config.pool_size,
        "max_overflow": config.max_overflow,
        "checkout_timeout": config.checkout_timeout,
        "application_name": APPLICATION_NAME,
        "http_metrics": False,
    }
    values.update(config.settings)
    values.update(overrides)
    known = dbpool_settings_fields()
    return dbpool.DBPoolSettings(**{k: v for k, v in values.items() if k in known})


def dbpool_app(config: AppConfig, *, read_only: bool = False, **overrides: Any) -> FastAPI:
    """fastapi_dbpool wired with ``install``, its own Prometheus registry.

    ``read_only``: the routes take ``Depends(dbpool.session(read_only=True))`` instead of
    ``Depends(dbpool.get_session)``; everything else is the same.
    """
    app = FastAPI()
    dbpool.install(app, settings=dbpool_settings(config, **overrides), registry=CollectorRegistry())
    if read_only:
        if not READ_ONLY_ROUTES:
            raise RuntimeError("this checkout of fastapi_dbpool has no session(read_only=True)")
        _add_session_routes(app, dbpool.session(read_only=True))
    else:
        _add_session_routes(app, dbpool.get_session)
    return app


def _add_driver_routes(app: FastAPI, get_conn: Callable[..., Any]) -> None:
    """The same routes on an asyncpg connection (the floor's and the driver variant's)."""

    @app.get("/select1")
    async def select1(conn: Any = Depends(get_conn)) -> dict[str, int]:
        return {"value": await conn.fetchval("SELECT 1")}

    @app.get("/items/{item_id}")
    async def read_item(item_id: int, conn: Any = Depends(get_conn)) -> dict[str, Any]:
        row = await conn.fetchrow(
            f"SELECT id, name, price_cents FROM {ITEMS_TABLE} WHERE id = $1", item_id
        )
        if row is None:
            raise HTTPException(404, "no such item")
        return dict(row)

    @app.get("/hold")
    async def hold(seconds: float, conn: Any = Depends(get_conn)) -> dict[str, str]:
        await conn.execute("SELECT pg_sleep($1)", seconds)
        return {"status": "done"}


def dbpool_driver_app(config: AppConfig, **overrides: Any) -> FastAPI:
    """fastapi_dbpool with the routes on ``Depends(dbpool.driver_connection())``."""
    if not DRIVER_ROUTES:
        raise RuntimeError("this checkout of fastapi_dbpool has no driver_connection()")
    app = FastAPI()
    dbpool.install(app, settings=dbpool_settings(config, **overrides), registry=CollectorRegistry())
    _add_driver_routes(app, dbpool.driver_connection())
    return app


def asyncpg_app(config: AppConfig) -> FastAPI:
    """The floor: the same routes on a raw asyncpg pool, no SQLAlchemy."""
    holder: dict[str, asyncpg.Pool] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder["pool"] = await asyncpg.create_pool(
            asyncpg_dsn(config.url),
            min_size=config.pool_size,
            max_size=config.pool_size + config.max_overflow,
            server_settings={"application_name": APPLICATION_NAME},
            init=_count_asyncpg_connection,
        )
        try:
            yield
        finally:
            await holder["pool"].close()

    async def get_conn() -> AsyncIterator[Any]:
        async with holder["pool"].acquire(timeout=config.checkout_timeout) as conn:
            yield conn

    app = FastAPI(lifespan=lifespan)
    _add_driver_routes(app, get_conn)
    _add_live(app)
    return app


def fastapi_only_app() -> FastAPI:
    """A floor for event-loop lag: the same routes with no database at all.

    ``/hold`` sleeps instead of holding a connection; ``/select1`` answers a constant.
    What a burst costs this app is what FastAPI and the event loop cost, whatever the
    database layer does.
    """
    app = FastAPI()

    @app.get("/select1")
    async def select1() -> dict[str, int]:
        return {"value": 1}

    @app.get("/hold")
    async def hold(seconds: float) -> dict[str, str]:
        await asyncio.sleep(seconds)
        return {"status": "done"}

    _add_live(app)
    return app


def build_app(variant: str, config: AppConfig, **overrides: Any) -> FastAPI:
    """The app of one variant; ``overrides`` are DBPoolSettings fields (dbpool only)."""
    if variant == "bare":
        return plain_app(config, pre_ping=False)
    if variant == "production":
        return plain_app(config, pre_ping=True)
    if variant == "bare_instr":
        return plain_app(config, pre_ping=False, instrumented=True)
    if variant == "dbpool":
        return dbpool_app(config, **overrides)
    if variant == "dbpool_instr":
        return dbpool_app(config, **{"http_metrics": True, **overrides})
    if variant == "dbpool_ro":
        return dbpool_app(config, read_only=True, **overrides)
    if variant == "dbpool_driver":
        return dbpool_driver_app(config, **overrides)
    if variant == "asyncpg":
        return asyncpg_app(config)
    if variant == "fastapi_only":
        return fastapi_only_app()
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def app_from_env() -> FastAPI:
    """``uvicorn --factory benchmarks.apps:app_from_env``: the variant ``BENCH_VARIANT``."""
    env = os.environ
    config = AppConfig(
        url=env["BENCH_DATABASE_URL"],
        pool_size=int(env.get("BENCH_POOL_SIZE", "10")),
        max_overflow=int(env.get("BENCH_MAX_OVERFLOW", "10")),
        checkout_timeout=float(env.get("BENCH_CHECKOUT_TIMEOUT", "30")),
        settings=(
            {"liveness_port": int(env["BENCH_LIVENESS_PORT"]), "liveness_host": "127.0.0.1"}
            if env.get("BENCH_LIVENESS_PORT")
            else {}
        ),
    )
    # Every SQLAlchemy pool of this process (one variant per server process).
    event.listen(Pool, "connect", _count_connection)
    overrides: dict[str, Any] = {}
    slowdown = float(env.get("BENCH_SLOWDOWN", "1"))
    if slowdown != 1:
        # Under callgrind (2c): the library's time-based behaviour stretched as in 2b.
        import fastapi_dbpool.requests

        fastapi_dbpool.requests.DISCONNECT_WATCH_DELAY *= slowdown
        overrides = {
            "pre_ping_idle": 0.5 * slowdown,
            "health_check_interval": 5.0 * slowdown,
            "leak_threshold": 30.0 * slowdown,
        }
    app = build_app(env["BENCH_VARIANT"], config, **overrides)

    # After the app's own routes: routing to those costs nothing more.
    @app.get("/bench/opened")
    async def connections_opened() -> dict[str, int]:
        return dict(_opened)

    if env.get("BENCH_MARK"):

        @app.get("/bench/mark")
        async def mark() -> dict[str, int]:
            # Where callgrind dumps its counters (--dump-before=getppid), for 2c.
            os.getppid()
            return {"marked": 1}

    return app
