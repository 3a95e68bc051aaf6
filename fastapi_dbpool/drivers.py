"""``driver_connection``: the request's asyncpg connection itself, for hot read paths.

``Depends(dbpool.driver_connection())`` hands a route the pooled connection's asyncpg
``Connection`` (through a proxy that refuses use once the request has let it go), taken
from the same pool as the sessions, with the same checkout timeout, circuit breaker, leak
tracking, metrics and server-side deadlines. What it skips is SQLAlchemy: no session, no
Core statement, no transaction. Statements run in autocommit, one round trip each.

Measured (docs/performance.md, 2b): a read-only ``AsyncSession`` costs ~520,000-860,000
instructions per request more than this dependency for the same statement (SELECT 1 /
a primary-key lookup), however few its round trips; this is the dependency for routes
where that matters.

The library gives the connection back at the response's start (a streamed body: at its
end), as it does a session's. It is discarded instead of reused when the request was
cancelled (a statement may be in flight), when the driver is closed or still cancelling
a statement (its client-side deadline ran out), or when a clean-up statement fails; a
transaction the route left open is rolled back first. A statement that failed on the
server (a timeout, a constraint) leaves the connection usable: it is kept.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.connection import _ConnectionProxy
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import PoolProxiedConnection

from .breaker import is_connection_failure
from .context import current_request
from .errors import DeadlineExceededError, DriverReleasedError, NotInstalledError
from .greenlets import greenlet_spawn
from .telemetry import CLIENT_DEADLINE, STATEMENT_TIMEOUT

if TYPE_CHECKING:
    from .engines import Database

logger = logging.getLogger("fastapi_dbpool")

#: Name of the task finishing a release a cancellation broke off (also requests.py's).
RELEASE_TASK = "fastapi_dbpool.release"

_MIDDLEWARE_MISSING = (
    "driver_connection needs DBPoolMiddleware: add `app.add_middleware("
    "dbpool.DBPoolMiddleware)` (or call `dbpool.install(app)`)"
)

_RELEASED = (
    "this database connection went back to the pool when the request's response "
    "started; it is no longer this request's (another request may be using it). Use it "
    "only inside the route; for work after the response, take a session in the task: "
    "`async with dbpool.get_runtime(app).database('primary').sessionmaker() as s: ...`"
)


class DriverConnection(_ConnectionProxy):  # type: ignore[misc]  # asyncpg is untyped
    """The request's asyncpg connection, until the request lets it go.

    Every attribute is the connection's own (``fetch``, ``fetchrow``, ``fetchval``,
    ``execute``, ``transaction``, ``prepare``, ...); ``isinstance(conn, asyncpg.Connection)``
    holds, as for asyncpg's own pool proxies. Once the library has given the connection
    back to the pool, any use raises :class:`~fastapi_dbpool.errors.DriverReleasedError`
    instead of reaching a connection another request may hold.
    """

    __slots__ = ("_dbpool_connection",)

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._dbpool_connection: asyncpg.Connection | None = connection

    def __getattr__(self, name: str) -> Any:
        connection = self._dbpool_connection
        if connection is None:
            raise DriverReleasedError(_RELEASED)
        return getattr(connection, name)

    def __repr__(self) -> str:
        state = "released" if self._dbpool_connection is None else "held"
        return f"<fastapi_dbpool.DriverConnection ({state})>"


class DriverLease:
    """One request's checkout of one database's connection, handed out as a driver."""

    __slots__ = ("abandon", "db", "driver", "fairy", "proxy", "settling", "timeout")

    def __init__(self, db: Database, fairy: PoolProxiedConnection) -> None:
        self.db = db
        self.fairy = fairy
        self.driver: asyncpg.Connection = fairy.driver_connection
        self.proxy = DriverConnection(self.driver)
        #: The route's statement timeout in force (seconds); None: DB_COMMAND_TIMEOUT.
        self.timeout: float | None = None
        #: The server stopped answering (client-side deadline): drop it, wait for nothing.
        self.abandon = False
        #: The task waiting for the server to acknowledge a cancel, once one is needed.
        self.settling: asyncio.Task[None] | None = None

    async def set_timeout(self, timeout: float) -> None:
        """Give this connection the route's statement timeout, until it is released.

        Outside a transaction ``SET LOCAL`` does nothing, so this is a session-level
        ``SET``, undone by ``RESET`` at release (one round trip each). The driver's
        client-side backstop moves with it, as for a session.
        """
        await self.driver.execute(f"SET statement_timeout = {max(1, round(timeout * 1000))}")
        self.timeout = timeout
        self.db.set_client_timeout_of(self.fairy, timeout)

    def cancelling(self) -> bool:
        """Whether asyncpg is cancelling a statement (a deadline ran out, a cancellation)."""
        is_cancelling = getattr(self.driver._protocol, "_is_cancelling", None)
        return bool(is_cancelling()) if is_cancelling is not None else False

    def broken(self) -> bool:
        """Whether the driver is closed, or still cancelling a statement."""
        return self.driver.is_closed() or self.cancelling()

    async def release(self, clean: bool) -> None:
        """Give the connection back to the pool, or discard it.

        ``clean`` is False when the request was cancelled: a statement may be in flight.
        """
        self.proxy._dbpool_connection = None
        fairy = self.fairy
        if fairy.dbapi_connection is None:
            return  # already given back (discarded)
        driver = self.driver
        if self.abandon or driver.is_closed():
            self.discard()
            return
        if self.cancelling():
            # asyncpg is asking the server to cancel the statement in flight. Closing the
            # socket now would drop that request (asyncpg's close cancels it), and the
            # statement would run on, holding its locks, until the server noticed. A task
            # the request's cancellation cannot reach waits for the server's answer.
            settle = asyncio.get_running_loop().create_task(self._settle(), name=RELEASE_TASK)
            self.settling = settle
            await asyncio.wait([settle])
            return
        if not clean:
            # Cancelled with no statement of ours in flight: a task the route spawned
            # may still use the connection. Not worth the risk of reusing it.
            self.discard()
            return
        try:
            if driver.is_in_transaction():
                # The route began a transaction and left it open.
                await driver.execute("ROLLBACK")
            if self.timeout is not None:
                await driver.execute("RESET statement_timeout")
        except asyncio.CancelledError:
            self.discard()
            raise
        except Exception as exc:
            logger.info(
                "could not release a connection cleanly (%s); discarding it",
                type(exc).__name__,
                extra={"error": type(exc).__name__},
            )
            self.discard()
            return
        # Nothing to await at checkin (no SQLAlchemy transaction on this connection):
        # no greenlet needed. Idle overflow connections are closed by the runtime's task.
        fairy.close()

    async def _settle(self) -> None:
        """Wait (bounded) for the server to acknowledge a cancel; keep the connection if it
        is then idle and clean, as asyncpg's own pool does."""
        settings = self.db.settings
        wait = self.driver._protocol._wait_for_cancellation
        try:
            await wait(settings.connect_timeout + settings.client_timeout_grace)
        except Exception:
            self.discard()  # asyncpg has already aborted it on a timeout
            return
        if self.fairy.dbapi_connection is None:
            return  # discarded meanwhile (the request was cancelled again)
        if self.driver.is_closed() or self.driver.is_in_transaction() or self.timeout is not None:
            self.discard()
            return
        self.fairy.close()

    def discard(self) -> None:
        """Drop the connection from the pool (its slot comes back for a new one)."""
        # Outside SQLAlchemy's greenlet the driver's socket is aborted, not closed
        # gracefully: nothing waits on a server that may not answer.
        fairy = self.fairy
        if fairy.dbapi_connection is None:
            return
        if fairy.is_valid:
            fairy.invalidate()
        else:
            fairy.close()


async def checkout(db: Database) -> DriverLease:
    """Check a connection out of ``db``'s pool (its timeout, breaker and leak tracking)."""
    fairy = await greenlet_spawn(db.pool.connect)
    return DriverLease(db, fairy)


def learn_from_failure(
    leases: list[DriverLease], broken: list[DriverLease], exc: BaseException
) -> BaseException | None:
    """What the database side learns from ``exc``, escaped from a route holding ``leases``
    (``broken``: those whose driver is broken, see :meth:`DriverLease.broken`).

    The breaker counts a failure when the driver itself is broken (closed, or cancelling
    after its client-side deadline): a ``TimeoutError`` from anything else the route
    awaited proves nothing about the database. Errors SQLAlchemy raised were counted by
    the engine already. Returns the exception to answer with instead (a client-side
    deadline is a 504, as for a session), or None.
    """
    if isinstance(exc, sa_exc.StatementError):
        return None
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        if "statement timeout" in str(exc) and len(leases) == 1:
            stats = leases[0].db.stats
            stats.statement_timeouts += 1
            if stats.otel is not None:
                stats.otel.deadline(STATEMENT_TIMEOUT, leases[0].timeout)
        return None
    if not broken:
        return None
    replacement: BaseException | None = None
    for lease in broken:
        db = lease.db
        closed = lease.driver.is_closed()
        if isinstance(exc, TimeoutError) and not closed:
            # asyncpg's client-side command_timeout ran out (it is cancelling the
            # statement): the server did not answer in time.
            grace = db.settings.client_timeout_grace
            deadline = (lease.timeout or db.settings.command_timeout) + grace
            db.stats.statement_timeouts += 1
            if db.stats.otel is not None:
                db.stats.otel.deadline(CLIENT_DEADLINE, deadline)
            db.count_lost_connection(lease.fairy.info, deadline=True)
            lease.abandon = True
            replacement = DeadlineExceededError(
                f"the {db.name} database did not answer within its deadline",
                database=db.name,
                timeout=deadline,
            )
        elif closed or is_connection_failure(exc):
            # The server ended the connection (restart, failover, terminated backend).
            db.count_lost_connection(lease.fairy.info, deadline=False)
    return replacement


@functools.cache
def driver_connection(
    database: str = "primary", *, timeout: float | None = None
) -> Callable[[], Awaitable[asyncpg.Connection]]:
    """A dependency: the request's asyncpg connection on ``database``, no SQLAlchemy.

    ``conn: asyncpg.Connection = Depends(dbpool.driver_connection())`` for routes where
    the ORM's cost per request matters more than its conveniences (hot read paths).
    Within one request, every ``driver_connection`` dependency on one database gets the
    same connection (a session of the same request holds a connection of its own).

    - Statements run in autocommit: each is a transaction of its own, one round trip,
      no BEGIN or ROLLBACK. ``async with conn.transaction():`` makes a transaction
      where several statements must see one snapshot or write together; one left open
      is rolled back at release.
    - The checkout waits at most ``DB_CHECKOUT_TIMEOUT`` (503); an open circuit breaker
      refuses at once (503); ``DB_COMMAND_TIMEOUT`` and ``DB_LOCK_TIMEOUT`` hold as for
      sessions (504); the connection is in the pool's metrics and leak tracking.
    - The connection goes back to the pool before the response's first byte; using it
      after that (a background task) raises
      :class:`~fastapi_dbpool.errors.DriverReleasedError`.
    - Leave the connection's session state as you found it: ``SET`` (without ``LOCAL``),
      ``LISTEN`` or type codecs would outlive the request on a pooled connection.

    Args:
        database: Name of the database: ``"primary"`` or ``"replica"``.
        timeout: Statement timeout in seconds for this route, enforced by PostgreSQL.
            It costs two round trips (``SET`` at checkout, ``RESET`` at release).

    Raises:
        ValueError: ``timeout`` is not greater than 0.
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be greater than 0, got {timeout!r}")

    async def dependency() -> asyncpg.Connection:
        ctx = current_request.get()
        if ctx is None:
            raise NotInstalledError(_MIDDLEWARE_MISSING)
        return await ctx.driver(database, timeout)

    dependency.__name__ = f"driver_connection_{database}" + (f"_{timeout}s" if timeout else "")
    return dependency
