"""Building and disposing the engines; the registry of named databases.

Each named database (``primary``, ``replica``) gets one :class:`Database`: its
SQLAlchemy ``AsyncEngine`` sized from the fleet budget, its session factory and the pool
events that validate idle connections and track what is checked out. Deadlines are set on
the connection when it is opened (``statement_timeout``, ``lock_timeout``,
``idle_in_transaction_session_timeout`` as server settings, ``command_timeout`` as the
client-side backstop), so a request pays no extra round trip for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import sqlalchemy.ext.asyncio
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool
from sqlalchemy.util import greenlet_spawn

from .breaker import CircuitBreaker, is_connection_failure
from .context import current_request
from .errors import ConfigurationError, DatabaseUnavailableError, DeadlineExceededError
from .failover import FailoverConnector
from .leaks import Checkout, LeakTracker
from .pool import (
    CLIENT_TIMEOUT_CHANGED,
    IDLE_SINCE,
    InstrumentedQueuePool,
    PoolStats,
    attach,
    idle_longer_than,
    ping,
)
from .sessions import READ_ONLY_KEY, DBPoolSyncSession, ReadOnlySyncSession
from .settings import DBPoolSettings, safe_url
from .sizing import BudgetError, PoolBudget, ServerLimits, plan_pool
from .telemetry import CLIENT_DEADLINE, LOCK_TIMEOUT, STATEMENT_TIMEOUT

logger = logging.getLogger("fastapi_dbpool")

#: Key of ``ConnectionPoolEntry.info``: ``time.monotonic()`` when it was opened.
_OPENED_AT = "dbpool_opened_at"

_LIMITS_QUERY = """
SELECT name, setting FROM pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')
"""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What startup learned of the server."""

    limits: ServerLimits
    version: str


class Database:
    """One named database: engine, session factory, sizing and checkout bookkeeping.

    Attributes:
        name: ``"primary"``, ``"replica"``, ...
        engine: The SQLAlchemy async engine.
        sessionmaker: Factory of ``AsyncSession`` bound to the engine.
        budget: The sizing decision.
        server: What startup read from the server, or None if it could not.
        checked_out: Connections currently checked out, by pool entry id.
    """

    def __init__(
        self,
        *,
        name: str,
        url: URL,
        settings: DBPoolSettings,
        budget: PoolBudget,
        server: ServerInfo | None,
        session_class: type[Any],
    ) -> None:
        self.name = name
        self.url = url
        self.safe_url = safe_url(url)
        self.settings = settings
        self.budget = budget
        self.server = server
        self.checked_out: dict[int, Checkout] = {}
        #: Record the user's frames with each checkout (DB_LEAK_TRACK_STACK).
        self.track_stack = settings.leak_track_stack
        self.max_waiting = settings.max_waiting or 20 * budget.max_size
        #: Set by the runtime: where leaks are reported.
        self.leaks: LeakTracker | None = None
        self.stats = PoolStats()
        self.breaker = CircuitBreaker(
            name,
            failure_threshold=settings.circuit_failure_threshold,
            recovery_timeout=settings.circuit_recovery_timeout,
        )
        self.failover: FailoverConnector | None = None
        #: ``time.monotonic()`` of the last connection loss the breaker counted.
        self._last_loss = float("-inf")
        extra: dict[str, Any] = {}
        if name == "primary" and settings.failover_urls:
            self.failover = FailoverConnector(
                name, url, settings.failover(), connect_args(settings)
            )
            extra["async_creator"] = self.failover
        # Looked up at call time: opentelemetry-instrumentation-sqlalchemy wraps the module's
        # function when it is turned on, which may be after this module was imported.
        self.engine: AsyncEngine = sqlalchemy.ext.asyncio.create_async_engine(
            url,
            pool_size=budget.pool_size,
            max_overflow=budget.max_overflow,
            pool_timeout=settings.checkout_timeout,
            pool_recycle=settings.pool_recycle,
            # Validation is ours: only connections idle longer than pre_ping_idle.
            pool_pre_ping=False,
            # LIFO keeps the most recently used connections busy, so fewer of them sit
            # idle long enough to need validation.
            pool_use_lifo=True,
            poolclass=InstrumentedQueuePool,
            connect_args=connect_args(settings),
            **extra,
        )
        attach(self.engine.sync_engine.pool, self)
        self.sessionmaker: async_sessionmaker[Any] = async_sessionmaker(
            self.engine,
            class_=session_class,
            sync_session_class=DBPoolSyncSession,
            expire_on_commit=False,
        )
        # Read-only routes: each statement is its own implicit transaction, so a request
        # costs the statement's round trip alone, not BEGIN + statement + ROLLBACK.
        # (sessions.py switches the connection's driver to autocommit when such a session
        # begins; the pool switches it back at checkin.)
        self.read_only_sessionmaker: async_sessionmaker[Any] = async_sessionmaker(
            self.engine,
            class_=session_class,
            sync_session_class=ReadOnlySyncSession,
            expire_on_commit=False,
            info={READ_ONLY_KEY: True},
        )
        self._install_pool_events()
        if self.failover is not None:
            self.failover.attach(self.engine.sync_engine)

    @property
    def pool(self) -> QueuePool:
        """The engine's queue pool."""
        pool = self.engine.sync_engine.pool
        assert isinstance(pool, QueuePool)
        return pool

    def pool_status(self) -> dict[str, int]:
        """Pool numbers as the contract names them (read, never blocking)."""
        pool = self.pool
        checked_out = pool.checkedout()
        return {
            "size": pool.size(),
            "checked_out": checked_out,
            "idle": pool.checkedin(),
            # SQLAlchemy's overflow() starts at -pool_size; the contract means the
            # overflow connections that exist now.
            "overflow": max(0, pool.overflow()),
            "max": self.budget.max_size,
            "waiting": self.waiting(),
        }

    def waiting(self) -> int:
        """Tasks inside a checkout right now (waiting for, or opening, a connection)."""
        return self.stats.waiting

    def count_lost(self, opened: float | None, *, deadline: bool) -> None:
        """Tell the breaker a connection was lost, once per event.

        A restart or failover kills every pooled connection at once; those losses are
        one event, not pool_size failures, or the breaker would open on a database that
        is back already: a connection opened (``opened``, its ``time.monotonic()``)
        before the last counted loss is stale news. A client-side deadline
        (``deadline``) is per-connection evidence that the server stopped answering, so
        each of those counts.
        """
        if deadline or opened is None or opened > self._last_loss:
            self._last_loss = time.monotonic()
            self.breaker.record_failure()

    def count_lost_connection(self, info: dict[Any, Any], *, deadline: bool) -> None:
        """:meth:`count_lost` for a checked-out connection's ``info``."""
        opened = info.get(_OPENED_AT)
        self.count_lost(opened if isinstance(opened, float) else None, deadline=deadline)

    def set_client_timeout(self, conn: Connection, timeout: float) -> None:
        """Give one checked-out connection a per-route client-side deadline.

        asyncpg reads ``command_timeout`` from the connection's config at each call, so
        replacing it here moves the client's backstop with the route's statement timeout;
        the default comes back when the connection is checked in.
        """
        self.set_client_timeout_of(conn.connection, timeout)

    def set_client_timeout_of(self, fairy: PoolProxiedConnection, timeout: float) -> None:
        """:meth:`set_client_timeout` for a connection checked out of the pool directly."""
        driver: Any = fairy.driver_connection
        config = getattr(driver, "_config", None)
        if config is None or not hasattr(config, "_replace"):
            return
        driver._config = config._replace(
            command_timeout=timeout + self.settings.client_timeout_grace
        )
        fairy.info[CLIENT_TIMEOUT_CHANGED] = True

    async def warm(self) -> None:
        """Open ``pool_size`` connections now so the first requests pay no connect."""
        conns = await asyncio.gather(
            *(self.engine.connect() for _ in range(self.budget.pool_size)),
            return_exceptions=True,
        )
        for conn in conns:
            if not isinstance(conn, BaseException):
                await conn.close()
        failures = [c for c in conns if isinstance(c, BaseException)]
        if failures:
            logger.warning(
                "could not warm the %s pool: %d of %d connections failed (%s)",
                self.name,
                len(failures),
                len(conns),
                type(failures[0]).__name__,
            )

    async def close_idle_overflow(self) -> int:
        """Close the connections beyond ``pool_size`` idle ``DB_POOL_OVERFLOW_IDLE`` seconds.

        The pool does this when a connection comes back; this covers a pool that went
        quiet. Returns how many it closed.
        """
        pool = self.pool
        if not isinstance(pool, InstrumentedQueuePool) or pool.checkedin() <= pool.size():
            return 0
        return await greenlet_spawn(pool.close_idle_overflow)

    async def dispose(self) -> None:
        """Close every connection: pooled ones, and any still checked out."""
        await self.engine.dispose()
        stragglers = list(self.checked_out.values())
        self.checked_out.clear()
        for checkout in stragglers:
            # Held past shutdown (a leak, or a task that ignored the drain): close the
            # socket so the server frees the backend now instead of at GC time.
            driver = getattr(checkout.record.dbapi_connection, "driver_connection", None)
            if driver is not None:
                driver.terminate()
        if stragglers:
            logger.warning(
                "%s: closed %d connections still checked out at shutdown",
                self.name,
                len(stragglers),
                extra={"database": self.name, "connections": len(stragglers)},
            )

    def _install_pool_events(self) -> None:
        pre_ping = self.settings.pool_pre_ping
        idle_limit = self.settings.pre_ping_idle
        monotonic = time.monotonic

        breaker = self.breaker

        def on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            now = monotonic()
            record.info[IDLE_SINCE] = now
            record.info[_OPENED_AT] = now
            # A new connection reached the server: evidence the database is up.
            if breaker.failures or not breaker.is_closed:
                breaker.record_success()

        def on_checkout(
            dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
        ) -> None:
            if idle_longer_than(record, idle_limit):
                self.stats.validations += 1
                failure = ping(dbapi_connection)
                if failure is not None:
                    # The pool discards this connection and tries a fresh one.
                    raise DisconnectionError(
                        f"idle connection failed validation: {type(failure).__name__}"
                    ) from failure

        name = self.name
        client_deadline = self.settings.command_timeout + self.settings.client_timeout_grace

        stats = self.stats
        breaker = self.breaker

        failover = self.failover
        db = self

        def on_error(context: ExceptionContext) -> None:
            original = context.original_exception
            if not isinstance(original, Exception):
                # The task was cancelled mid-statement (the client left, a deadline of the
                # app's, shutdown): SQLAlchemy discards the connection, whose protocol
                # state is unknown, but the database did nothing wrong. Counting these
                # would open the breaker on a healthy database when clients give up.
                return
            if context.is_disconnect or is_connection_failure(original):
                ctx = current_request.get()
                if ctx is not None:
                    ctx.failed = True
                # Counted once per event (count_lost); failures to connect are counted by
                # the pool.
                opened = _opened_at(context)
                if failover is not None and failover.failed_on_left_target(context):
                    # A connection to a target failover has left: no news of the active one.
                    pass
                else:
                    db.count_lost(opened, deadline=isinstance(original, TimeoutError))
            # SQLAlchemy hands us its adapted DBAPI error, not asyncpg's; both carry the
            # SQLSTATE. 57014 is also a user's pg_cancel_backend(): the text tells them apart.
            sqlstate = getattr(original, "sqlstate", None)
            if sqlstate == "57014" and "statement timeout" in str(original):
                stats.statement_timeouts += 1
                if stats.otel is not None:
                    stats.otel.deadline(STATEMENT_TIMEOUT, None)
            elif sqlstate == "55P03" and stats.otel is not None and "lock timeout" in str(original):
                stats.otel.deadline(LOCK_TIMEOUT, None)
            if isinstance(original, TimeoutError):
                stats.statement_timeouts += 1
                if stats.otel is not None:
                    stats.otel.deadline(CLIENT_DEADLINE, client_deadline)
                # Only this connection is suspect; keep the rest of the pool. Abort its
                # socket now: a graceful close would wait on a server that does not answer.
                context.invalidate_pool_on_disconnect = False
                fairy = getattr(context.connection, "connection", None)
                driver = getattr(fairy, "driver_connection", None)
                if driver is not None:
                    driver.terminate()
                # asyncpg's client-side command_timeout: the server did not answer in time
                # (it may be unreachable). The connection's state is unknown, so it is
                # discarded rather than reused.
                context.is_disconnect = True
                raise DeadlineExceededError(
                    f"the {name} database did not answer within its deadline",
                    database=name,
                    timeout=client_deadline,
                ) from context.original_exception

        event.listen(self.engine.sync_engine, "handle_error", on_error)
        pool = self.engine.sync_engine.pool
        event.listen(pool, "connect", on_connect)
        if pre_ping and self.failover is not None:
            # After failover's own checkout listener, which replaces a connection to a
            # server it moved away from before anything is sent on it; without failover
            # the pool validates idle connections itself (pool.py, no event per checkout).
            event.listen(pool, "checkout", on_checkout)


def _opened_at(context: ExceptionContext) -> float | None:
    conn = context.connection
    if conn is None or conn.invalidated:
        return None
    try:
        opened = conn.connection.info.get(_OPENED_AT)
    except Exception:
        return None
    return opened if isinstance(opened, float) else None


def connect_args(settings: DBPoolSettings) -> dict[str, Any]:
    """asyncpg ``connect()`` arguments that carry the deadlines and application_name."""
    return {
        "timeout": settings.connect_timeout,
        # The client-side backstop: the server's statement_timeout fires first; this one
        # holds when the server cannot answer at all (network black hole).
        "command_timeout": settings.command_timeout + settings.client_timeout_grace,
        "server_settings": {
            "application_name": settings.application_name,
            "statement_timeout": _ms(settings.command_timeout),
            "lock_timeout": _ms(settings.lock_timeout),
            "idle_in_transaction_session_timeout": _ms(settings.idle_in_transaction_timeout),
        },
    }


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


async def read_server(url: URL, settings: DBPoolSettings, name: str = "primary") -> ServerInfo:
    """Read the connection limits and version of the server behind ``url``.

    Raises:
        DatabaseUnavailableError: The server cannot be reached within
            ``DB_CONNECT_TIMEOUT``.
    """
    try:
        conn = await asyncpg.connect(
            dsn=url.set(drivername="postgresql").render_as_string(hide_password=False),
            timeout=settings.connect_timeout,
            server_settings={"application_name": settings.application_name},
        )
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailableError(
            f"cannot reach {safe_url(url)} to read max_connections: {type(exc).__name__}",
            database=name,
            retry_after=settings.connect_timeout,
        ) from None
    try:
        rows = await conn.fetch(_LIMITS_QUERY, timeout=settings.connect_timeout)
        version = await conn.fetchval("SHOW server_version", timeout=settings.connect_timeout)
    finally:
        await conn.close(timeout=settings.connect_timeout)
    values = {row["name"]: int(row["setting"]) for row in rows}
    return ServerInfo(
        limits=ServerLimits(
            max_connections=values["max_connections"],
            superuser_reserved_connections=values.get("superuser_reserved_connections", 3),
            reserved_connections=values.get("reserved_connections", 0),
        ),
        version=str(version),
    )


def decide_budget(name: str, settings: DBPoolSettings, server: ServerInfo | None) -> PoolBudget:
    """Size one database's pool from the settings and what the server allows.

    Raises:
        ConfigurationError: The budget cannot fit the fleet, or cannot be known.
    """
    explicit_budget = settings.max_connections if name == "primary" else None
    if explicit_budget is not None:
        budget, source = explicit_budget, "DB_MAX_CONNECTIONS"
        if server is not None and budget > server.limits.available:
            message = (
                f"DB_MAX_CONNECTIONS={budget} is more than the {server.limits.available} "
                f"connections the {name} server allows (max_connections="
                f"{server.limits.max_connections} minus reserved slots)"
            )
            if settings.strict_budget:
                raise ConfigurationError(message)
            logger.warning(message, extra={"database": name})
    elif server is not None:
        budget = server.limits.available
        source = (
            f"server max_connections={server.limits.max_connections} - "
            f"{server.limits.superuser_reserved_connections} superuser_reserved - "
            f"{server.limits.reserved_connections} reserved"
        )
    elif settings.pool_size is not None:
        # No server to ask and no budget given: trust the explicit sizes.
        budget, source = 10**6, "unknown: server unreachable at startup"
    else:
        hint = "DB_MAX_CONNECTIONS (or DB_POOL_SIZE)" if name == "primary" else "DB_POOL_SIZE"
        raise ConfigurationError(
            f"cannot size the {name} pool: the server could not be reached to read "
            f"max_connections; set {hint} to start without it"
        )
    try:
        return plan_pool(
            budget=budget,
            budget_source=source,
            pods=settings.pod_count,
            workers=settings.web_concurrency,
            surge=settings.surge(),
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            strict=settings.strict_budget,
            cap=settings.pool_size_cap,
        )
    except BudgetError as exc:
        raise ConfigurationError(f"{name} database: {exc}") from None


async def _read_first_alternate(settings: DBPoolSettings) -> ServerInfo | None:
    for url in settings.failover():
        try:
            return await read_server(url, settings, "primary")
        except DatabaseUnavailableError:
            continue
    return None


async def build_databases(
    settings: DBPoolSettings, session_class: type[Any]
) -> Mapping[str, Database]:
    """Read each server, size its pool, build its engine, warm it; log the decision.

    Raises:
        ConfigurationError: No DATABASE_URL, or a pool cannot be sized.
    """
    urls = settings.urls()
    if "primary" not in urls:
        raise ConfigurationError(
            "DATABASE_URL is not set: fastapi_dbpool needs the primary database's URL "
            "(environment variable DATABASE_URL or DBPoolSettings(database_url=...))"
        )
    databases: dict[str, Database] = {}
    try:
        for name, url in urls.items():
            try:
                server: ServerInfo | None = await read_server(url, settings, name)
            except DatabaseUnavailableError as exc:
                logger.warning("%s database: %s", name, exc, extra={"database": name})
                server = None
                if name == "primary":
                    # New connections will go to an alternate: size the pool from it.
                    server = await _read_first_alternate(settings)
            budget = decide_budget(name, settings, server)
            if budget.warning:
                logger.warning(
                    "%s pool oversubscribes its budget: %s",
                    name,
                    budget.warning,
                    extra={"database": name},
                )
            database = Database(
                name=name,
                url=url,
                settings=settings,
                budget=budget,
                server=server,
                session_class=session_class,
            )
            databases[name] = database
            logger.info(
                "%s pool: %s",
                name,
                budget.describe(),
                extra={"database": name, "sizing": budget.as_dict()},
            )
            if settings.warm_pool and server is not None:
                await database.warm()
    except BaseException:
        await asyncio.gather(*(d.dispose() for d in databases.values()), return_exceptions=True)
        raise
    return databases
