"""``get_session`` and the session dependency factories; the request session's guard.

Every ``Depends(get_session)`` of one request gets the same :class:`RequestSession`; the
middleware gives its connection back to the pool before the response's first byte (or
when a streamed body ends). Deadlines live on the connection (see ``engines.py``); a
per-route statement timeout, ``Depends(session(timeout=2.5))``, adds a ``SET LOCAL
statement_timeout`` to the transaction of that request only.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar, cast

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, UOWTransaction

from .context import current_request
from .errors import ConcurrentSessionUseError, NotInstalledError, ReadOnlySessionError
from .greenlets import reusing_greenlets

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: Keys of ``AsyncSession.info`` this library owns.
TIMEOUT_KEY = "dbpool_timeout"
DATABASE_KEY = "dbpool_database"
READ_ONLY_KEY = "dbpool_read_only"
#: Key of ``ConnectionPoolEntry.info``: the driver was switched to autocommit.
AUTOCOMMIT_KEY = "dbpool_autocommit"

_MIDDLEWARE_MISSING = (
    "get_session needs DBPoolMiddleware: add `app.add_middleware(dbpool.DBPoolMiddleware)` "
    "(or call `dbpool.install(app)`)"
)


def _guarded(method: F) -> F:
    # SQLAlchemy's method, in reused greenlets (greenlets.py), refusing a second task.
    method = reusing_greenlets(method)

    @functools.wraps(method)
    async def wrapper(self: RequestSession, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        owner = self._dbpool_owner
        if owner is not None and owner is not task:
            raise ConcurrentSessionUseError(
                "the request's database session is already in use by another task "
                f"({owner.get_name()}); one AsyncSession cannot run two operations at "
                "once. Give each concurrent task its own session: "
                "`factory = Depends(dbpool.session_factory)`, then `async with factory() "
                "as s: ...`"
            )
        self._dbpool_depth += 1
        self._dbpool_owner = task
        try:
            return await method(self, *args, **kwargs)
        finally:
            self._dbpool_depth -= 1
            if self._dbpool_depth == 0:
                self._dbpool_owner = None
                if self._dbpool_idle is not None:
                    self._dbpool_idle.set()

    return cast(F, wrapper)


class RequestSession(AsyncSession):
    """The ``AsyncSession`` handed to requests: refuses concurrent use from two tasks.

    asyncpg allows one operation per connection at a time; without this guard two tasks
    sharing a session fail with asyncpg's "another operation is in progress" or corrupt
    the session's state. Its calls run in reused greenlets (``greenlets.py``): SQLAlchemy's
    code, without a new greenlet's frame stack mapped and unmapped per call.
    """

    _dbpool_owner: asyncio.Task[Any] | None = None
    _dbpool_depth: int = 0
    _dbpool_idle: asyncio.Event | None = None

    def busy_elsewhere(self) -> bool:
        """Whether another task than the current one is running an operation now."""
        owner = self._dbpool_owner
        return owner is not None and owner is not asyncio.current_task()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no task runs an operation on this session; False on timeout."""
        while self._dbpool_owner is not None:
            if self._dbpool_idle is None:
                self._dbpool_idle = asyncio.Event()
            self._dbpool_idle.clear()
            try:
                await asyncio.wait_for(self._dbpool_idle.wait(), timeout)
            except TimeoutError:
                return False
        return True

    execute = _guarded(AsyncSession.execute)
    scalar = _guarded(AsyncSession.scalar)  # type: ignore[assignment,arg-type]
    scalars = _guarded(AsyncSession.scalars)
    get = _guarded(AsyncSession.get)
    get_one = _guarded(AsyncSession.get_one)
    stream = _guarded(AsyncSession.stream)
    stream_scalars = _guarded(AsyncSession.stream_scalars)
    refresh = _guarded(AsyncSession.refresh)
    merge = _guarded(AsyncSession.merge)
    delete = _guarded(AsyncSession.delete)
    flush = _guarded(AsyncSession.flush)
    commit = _guarded(AsyncSession.commit)
    rollback = _guarded(AsyncSession.rollback)
    run_sync = _guarded(AsyncSession.run_sync)
    connection = _guarded(AsyncSession.connection)


def _reuse_greenlets(cls: type[AsyncSession]) -> None:
    # The other methods that spawn a greenlet (close, invalidate, reset...): unguarded,
    # as in AsyncSession; the release's close is one of them.
    for name, method in vars(AsyncSession).items():
        if name not in vars(cls):
            rebound = reusing_greenlets(method)
            if rebound is not method:
                setattr(cls, name, rebound)


_reuse_greenlets(RequestSession)


class DBPoolSyncSession(Session):
    """The ``Session`` under the library's ``AsyncSession``: its events are the library's.

    Listening on this class rather than on ``Session`` keeps the library's hooks off
    every other session of the process (an app's own sessionmaker, a migration tool's).
    """


class ReadOnlySyncSession(Session):
    """The ``Session`` under ``session(read_only=True)``: autocommit, writes refused."""


@event.listens_for(DBPoolSyncSession, "after_begin")
def _apply_route_timeout(
    session: Session, transaction: SessionTransaction, conn: Connection
) -> None:
    # Only sessions with a per-route timeout pay this round trip; the default
    # statement_timeout was set when the connection was opened.
    _set_route_timeout(session.info, conn)


@event.listens_for(ReadOnlySyncSession, "after_begin")
def _begin_read_only(session: Session, transaction: SessionTransaction, conn: Connection) -> None:
    # No BEGIN, no ROLLBACK: the driver sends a statement in a transaction block only
    # when it is not in autocommit; the pool's checkin switches it back, so the
    # connection's next user gets a transaction as usual. Cheaper than an AUTOCOMMIT
    # execution option, which SQLAlchemy sets and resets at every checkout through its
    # option engine.
    fairy = conn.connection
    fairy.dbapi_connection.autocommit = True  # type: ignore[union-attr]
    fairy.info[AUTOCOMMIT_KEY] = True


def _set_route_timeout(info: dict[Any, Any], conn: Connection) -> None:
    timeout = info.get(TIMEOUT_KEY)
    if timeout is None:
        return
    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(timeout * 1000))}")
    database = info.get(DATABASE_KEY)
    if database is not None:
        database.set_client_timeout(conn, timeout)


_READ_ONLY_WRITE = (
    "this session is read-only (dbpool.session(read_only=True)): its statements run "
    "without a transaction, so a write would be committed at once; use get_session for "
    "routes that write"
)


@event.listens_for(ReadOnlySyncSession, "do_orm_execute")
def _refuse_dml_when_read_only(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        raise ReadOnlySessionError(_READ_ONLY_WRITE)


@event.listens_for(ReadOnlySyncSession, "before_flush")
def _refuse_flush_when_read_only(session: Session, flush: UOWTransaction, instances: Any) -> None:
    if session.new or session.dirty or session.deleted:
        raise ReadOnlySessionError(_READ_ONLY_WRITE)


async def get_session() -> AsyncSession:
    """FastAPI dependency: the request's session on the primary database.

    Use as ``session: AsyncSession = Depends(get_session)``. All uses within one request
    share one session; its connection goes back to the pool before the response is sent.

    Raises:
        NotInstalledError: DBPoolMiddleware is not installed.
        CircuitOpenError: The primary's circuit breaker is open (503).
    """
    ctx = current_request.get()
    if ctx is None:
        raise NotInstalledError(_MIDDLEWARE_MISSING)
    return ctx.session("primary", None)


@functools.cache
def session(
    database: str = "primary", *, timeout: float | None = None, read_only: bool = False
) -> Callable[[], Awaitable[AsyncSession]]:
    """A dependency for a named database, a per-route statement timeout, or reads only.

    ``Depends(dbpool.session("replica"))`` reaches the read replica;
    ``Depends(dbpool.session(timeout=2.5))`` gives this route's statements 2.5 s on the
    server (504 when exceeded) instead of ``DB_COMMAND_TIMEOUT``. Within one request, all
    dependencies on one database share one session; when several routes' timeouts meet in
    one request, the shortest applies.

    ``Depends(dbpool.session(read_only=True))`` is for routes that only read: its
    statements run without a transaction (autocommit), so a request costs one round trip
    per statement instead of BEGIN + statements + ROLLBACK. Each statement sees its own
    snapshot; ORM writes and ``insert()``/``update()``/``delete()`` through it raise
    :class:`~fastapi_dbpool.errors.ReadOnlySessionError`. It is a session of its own,
    separate from the request's ``get_session`` session.

    Args:
        database: Name of the database: ``"primary"`` or ``"replica"``.
        timeout: Statement timeout in seconds for this route, enforced by PostgreSQL.
        read_only: Run the statements without a transaction (reads only).

    Raises:
        ValueError: ``timeout`` is not greater than 0, or is combined with ``read_only``
            (the server applies a per-route timeout to a transaction, and a read-only
            session has none).
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be greater than 0, got {timeout!r}")
    if timeout is not None and read_only:
        raise ValueError(
            "session(read_only=True) cannot take a timeout: its statements run outside a "
            "transaction, where SET LOCAL statement_timeout has no effect; use "
            "session(timeout=...) for a read route that needs its own deadline"
        )

    async def dependency() -> AsyncSession:
        ctx = current_request.get()
        if ctx is None:
            raise NotInstalledError(_MIDDLEWARE_MISSING)
        sess = ctx.session(database, timeout, read_only)
        if timeout is not None and sess.in_transaction():
            # An earlier dependency already began the transaction, so after_begin has
            # passed: apply the route's timeout to the transaction in progress.
            conn = await sess.connection()
            info = sess.info
            await conn.run_sync(lambda sync_conn: _set_route_timeout(info, sync_conn))
        return sess

    dependency.__name__ = (
        f"session_{database}"
        + (f"_{timeout}s" if timeout else "")
        + ("_read_only" if read_only else "")
    )
    return dependency


#: What ``Depends(dbpool.session_factory)`` gives: ``async with factory() as s: ...``.
SessionFactory = Callable[[], AbstractAsyncContextManager[AsyncSession]]


def session_factory_for(database: str = "primary") -> Callable[[], Awaitable[SessionFactory]]:
    """A dependency that returns a factory of independent sessions (for fan-out).

    Each ``async with factory() as s:`` block gets its own session and connection, so
    concurrent tasks of one handler can query in parallel. Sessions still open when the
    request completes are closed by the middleware and reported as leaks.

    Args:
        database: Name of the database.
    """

    async def dependency() -> SessionFactory:
        ctx = current_request.get()
        if ctx is None:
            raise NotInstalledError(_MIDDLEWARE_MISSING)
        return ctx.factory(database)

    return dependency


#: ``Depends(dbpool.session_factory)``: independent sessions on the primary for fan-out.
session_factory = session_factory_for("primary")
