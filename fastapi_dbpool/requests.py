"""RequestContext: what one HTTP request holds of the database, and how it lets go.

The middleware makes one per request and puts it in the ``current_request`` ContextVar.
Sessions are made lazily, one per database; the context releases them (rollback, or
commit in autocommit mode, then the connection goes back to the pool) at the response's
start, or at the end of a streamed body, and always when the request's ASGI call ends.
Closing is shielded: a cancelled request still gives its connections back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Message, Receive, Scope

from .drivers import RELEASE_TASK, DriverConnection, DriverLease, checkout, learn_from_failure
from .errors import ConfigurationError
from .sessions import DATABASE_KEY, TIMEOUT_KEY, RequestSession, SessionFactory

if TYPE_CHECKING:
    from .breaker import CircuitBreaker
    from .runtime import DBPoolRuntime

logger = logging.getLogger("fastapi_dbpool")

_NOTHING: frozenset[str] = frozenset()

#: A request still running this long after it first used the database starts watching
#: for the client's disconnect (cheaper than watching every request from the start). The
#: runtime looks for such requests every ``DISCONNECT_WATCH_DELAY / 2`` seconds. A watch
#: costs a request ~44,000 instructions (a task, its cancellation): at 0.25 s most
#: requests of an overloaded service paid it for their wait in the pool's queue (at 256
#: connections on a 20-connection pool, the median request waits ~300 ms), at 1 s only
#: the slowest few do, and a client that left is still noticed within 1.5 s.
DISCONNECT_WATCH_DELAY = 1.0


class RequestContext:
    """The database side of one request. Internal: reached through ``get_session``."""

    __slots__ = (
        "_app_receiving",
        "_buffer",
        "_ready",
        "_receive",
        "_responded",
        "_watcher",
        "broken_off",
        "cancelled_on_disconnect",
        "drivers",
        "extra_sessions",
        "failed",
        "finished",
        "held",
        "runtime",
        "scope",
        "sessions",
        "task",
        "used",
        "watch_due",
    )

    def __init__(self, runtime: DBPoolRuntime, scope: Scope, receive: Receive) -> None:
        self.runtime = runtime
        self.scope = scope
        self.sessions: dict[str, RequestSession] | None = None
        self.extra_sessions: set[AsyncSession] | None = None
        #: Connections handed out as asyncpg connections (``driver_connection``).
        self.drivers: dict[str, DriverLease] | None = None
        self.finished = False
        self.failed = False
        #: The request was cancelled: its drivers may be mid-statement, and are discarded.
        self.broken_off = False
        #: Connections this request took that are not back in the pool yet.
        self.held = 0
        #: Databases this request asked for a session of (refused or not).
        self.used: set[str] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.cancelled_on_disconnect = False
        self._receive = receive
        #: ``time.monotonic()`` from which to watch for the client leaving; 0.0: not yet.
        self.watch_due = 0.0
        self._watcher: asyncio.Task[None] | None = None
        self._buffer: collections.deque[Message] | None = None
        self._ready: asyncio.Event | None = None
        self._app_receiving = False
        self._responded = False

    # -- sessions -------------------------------------------------------------------

    def session(
        self, database: str, timeout: float | None, read_only: bool = False
    ) -> RequestSession:
        """The request's session on ``database`` (its read-only one), made on first use."""
        sessions = self.sessions
        if sessions is None:
            sessions = self.sessions = {}
            self._arm_disconnect_watch()
        key = database + ":read_only" if read_only else database
        found = sessions.get(key)
        if found is None:
            db = self.runtime.database(database)
            self._asked(database)
            self.runtime.check_available(db)
            found = db.read_only_sessionmaker() if read_only else db.sessionmaker()
            found.info[DATABASE_KEY] = db
            sessions[key] = found
        if timeout is not None:
            current = found.info.get(TIMEOUT_KEY)
            found.info[TIMEOUT_KEY] = timeout if current is None else min(current, timeout)
        return found

    async def driver(self, database: str, timeout: float | None) -> DriverConnection:
        """The request's asyncpg connection on ``database``, checked out on first use."""
        drivers = self.drivers
        if drivers is None:
            drivers = self.drivers = {}
            self._arm_disconnect_watch()
        lease = drivers.get(database)
        if lease is None:
            db = self.runtime.database(database)
            self._asked(database)
            self.runtime.check_available(db)
            lease = drivers[database] = await checkout(db)
        if timeout is not None and (lease.timeout is None or timeout < lease.timeout):
            await lease.set_timeout(timeout)
        return lease.proxy

    def failure_answer(self, exc: BaseException) -> BaseException:
        """The route raised ``exc``: what to answer with (see ``learn_from_failure``)."""
        if not self.drivers:
            return exc
        leases = list(self.drivers.values())
        broken = [lease for lease in leases if lease.broken()]
        if broken:
            # Not a success for the breaker at release (a half-open trial stays unproven).
            self.failed = True
        replacement = learn_from_failure(leases, broken, exc)
        return exc if replacement is None else replacement

    def factory(self, database: str) -> SessionFactory:
        """A factory of independent sessions on ``database`` for this request."""
        db = self.runtime.database(database)
        if self.extra_sessions is None:
            self.extra_sessions = set()
            self._arm_disconnect_watch()
        extra = self.extra_sessions

        @asynccontextmanager
        async def open_session() -> AsyncIterator[AsyncSession]:
            self._asked(database)
            self.runtime.check_available(db)
            sess = db.sessionmaker()
            sess.info[DATABASE_KEY] = db
            extra.add(sess)
            try:
                yield sess
            finally:
                extra.discard(sess)
                await _close_shielded(sess)

        return open_session

    def _asked(self, database: str) -> None:
        if self.used is None:
            self.used = {database}
        else:
            self.used.add(database)

    @property
    def has_sessions(self) -> bool:
        """Whether this request made any session."""
        return bool(self.sessions) or bool(self.extra_sessions) or bool(self.drivers)

    async def commit(self) -> None:
        """Commit every request session (autocommit mode, before the status line)."""
        if self.sessions:
            for sess in self.sessions.values():
                if sess.in_transaction():
                    await sess.commit()

    async def release(self) -> None:
        """Roll back and return every connection of the request sessions to the pool."""
        if self.drivers:
            await self._release_drivers()
        if self.sessions:
            for sess in self.sessions.values():
                if not sess.in_transaction():
                    # Never used, or already released and not used since: nothing holds a
                    # connection, and a close would only cost a round of the event loop.
                    continue
                if not self.failed:
                    # It reached the database and nothing failed at the connection level:
                    # a success for the breaker (what closes it after a half-open trial).
                    _succeeded(sess.info[DATABASE_KEY].breaker)
                await _close_shielded(sess)

    async def _release_drivers(self) -> None:
        drivers = self.drivers
        assert drivers is not None
        self.drivers = None
        clean = not self.broken_off
        leases = list(drivers.values())
        try:
            while leases:
                lease = leases[0]
                if clean and not self.failed:
                    _succeeded(lease.db.breaker)
                await lease.release(clean)
                del leases[0]
        finally:
            # Cancelled during a clean-up statement: the rest are discarded, not kept (one
            # waiting for a cancel's answer is left to its task, which decides).
            for lease in leases:
                if lease.settling is None:
                    lease.discard()

    async def finish(self) -> None:
        """The request's ASGI call is over: release everything, stop watching.

        What the request's own sessions hold is given back here; anything else it
        took and still holds now (a spawned task's connection, a factory session left
        open) is reported as leaked before the factory sessions are closed.
        """
        if self.watch_due:
            self.runtime.watching.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()
        await self.release()
        self.finished = True
        route = self.scope.get("route")
        if route is not None:
            # What this route needs, for refusing its requests at the door while a
            # database refuses everything (DBPoolRuntime.refuse_at_door).
            known = self.runtime.route_databases.get(id(route))
            used = self.used or _NOTHING
            if known is None or not known <= used:
                self.runtime.learn_route(id(route), frozenset(used))
        if self.held:
            runtime = self.runtime
            runtime.leaks.request_finished(self, list(runtime.databases.values()))
        if self.extra_sessions:
            for sess in list(self.extra_sessions):
                await _close_shielded(sess)
        self._let_go(route)

    def _let_go(self, route: Any) -> None:
        """Drop what the finished request no longer needs; keep what leak reports read.

        asyncpg arms a timer for every statement (the client-side deadline) in the
        request's context; on asyncio's own event loop a cancelled timer stays queued,
        holding that context and so this object, until its deadline (uvloop lets go at
        once). Without this, each finished request's scope, sessions and the framework's
        per-request objects stayed alive for DB_COMMAND_TIMEOUT: several garbage
        collections per 100 requests, and old generations to scan.
        """
        scope = self.scope
        self.scope = {
            "type": scope["type"],
            "method": scope.get("method"),
            "route": route,
            "headers": scope.get("headers", ()),
        }
        self.sessions = None
        self.extra_sessions = None
        self.drivers = None
        self._receive = _disconnected
        self.task = None
        self._watcher = None
        self._buffer = None
        self._ready = None

    def route(self) -> str | None:
        """The route template that served this request (never the raw path)."""
        return scope_route(self.scope)

    def request_id(self) -> str | None:
        """The request's id from ``X-Request-ID`` (or ``X-Correlation-ID``), if any."""
        for name, value in self.scope.get("headers", ()):
            if name in (b"x-request-id", b"x-correlation-id"):
                text: str = value.decode("latin-1")[:128]
                return text
        return None

    # -- client disconnects ---------------------------------------------------------

    def response_complete(self) -> None:
        """The last byte of the response was handed to the server: stop watching."""
        self._responded = True

    def _arm_disconnect_watch(self) -> None:
        # Registered for the runtime's sweep (DBPoolRuntime.watch_disconnects) rather than
        # a timer per request: most requests are over long before the delay, and a
        # timer's arming and cancelling cost more than a set's add and discard. The set
        # lets go of the request as it finishes (a queue kept finished requests alive,
        # with their scope and sessions, until the sweep: more work for the collector).
        if not self.watch_due and not self._responded and self.scope["type"] == "http":
            self.task = asyncio.current_task()
            if DISCONNECT_WATCH_DELAY <= 0:
                self.watch_due = time.monotonic()
                self.start_watch()
                return
            self.watch_due = time.monotonic() + DISCONNECT_WATCH_DELAY
            self.runtime.watching.add(self)

    def start_watch(self) -> None:
        """Watch for the client leaving, if this request still runs (the runtime's sweep)."""
        if self._app_receiving and not (self.finished or self._responded):
            # The application is reading the body itself; look again later rather than
            # race it for the next message.
            self.watch_due = time.monotonic() + DISCONNECT_WATCH_DELAY
            return
        self.runtime.watching.discard(self)
        if self.finished or self._responded or self._watcher is not None:
            return
        self._buffer = collections.deque()
        self._ready = asyncio.Event()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(), name="fastapi_dbpool.disconnect_watch"
        )

    async def _watch(self) -> None:
        assert self._buffer is not None and self._ready is not None
        while True:
            message = await self._receive()
            self._buffer.append(message)
            self._ready.set()
            if message["type"] == "http.disconnect":
                break
        # The client is gone while the handler still works: cancel it, so the running
        # query is cancelled on the server and the connection goes back to the pool.
        if (
            not self.finished
            and not self._responded
            and self.task is not None
            and not self.task.done()
        ):
            self.cancelled_on_disconnect = True
            self.task.cancel()

    async def receive(self) -> Message:
        """The ``receive`` the application sees; shares messages with the watcher."""
        buffer = self._buffer
        if buffer is None:
            self._app_receiving = True
            try:
                return await self._receive()
            finally:
                self._app_receiving = False
        ready = self._ready
        assert ready is not None
        while not buffer:
            ready.clear()
            await ready.wait()
        message = buffer[0]
        if message["type"] != "http.disconnect":
            buffer.popleft()
        return message


def _succeeded(breaker: CircuitBreaker) -> None:
    # The common case (closed, no failures counted) costs two attribute reads.
    if breaker.failures or not breaker.is_closed:
        breaker.record_success()


async def _disconnected() -> Message:
    # The receive of a finished request: its server's is let go of (see _let_go).
    return {"type": "http.disconnect"}


def scope_route(scope: Scope) -> str | None:
    """The route template of a request (never its raw path)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else None


#: Key of ``AsyncSession.info``: the task finishing a close that a cancellation broke off.
_CLOSING_KEY = "dbpool_closing"
#: Name of that task: ``drivers.RELEASE_TASK``.


async def _close_shielded(sess: AsyncSession) -> None:
    """Close ``sess`` so that its connection goes back to the pool even if cancelled.

    The close runs in the request's own task: a task of its own for every close (what
    ``asyncio.shield`` needs) cost every request two more rounds of the event loop,
    about 5% of a request's CPU. The request task may be cancelled meanwhile (client
    gone, shutdown deadline, an anyio cancel scope that cancels every await again).
    Where the cancellation meets the driver (the ROLLBACK in flight), SQLAlchemy
    discards the connection and gives its slot back; where it meets the wait for a
    statement a spawned task still runs, the session still holds its connection, and a
    task the cancellation cannot reach finishes the close.
    """
    pending: asyncio.Future[None] | None = sess.info.get(_CLOSING_KEY)
    if pending is None:
        try:
            await _close_when_idle(sess)
            return
        except asyncio.CancelledError:
            if not sess.in_transaction():
                raise
            pending = sess.info[_CLOSING_KEY] = asyncio.get_running_loop().create_task(
                _close_when_idle(sess), name=RELEASE_TASK
            )
            pending.add_done_callback(lambda _: sess.info.pop(_CLOSING_KEY, None))
            # Cancelled again (an anyio scope): the task goes on by itself.
            await asyncio.wait([pending])
            raise
    # A close broken off by a cancellation is still being finished: wait for it.
    await asyncio.wait([pending])


async def _close_when_idle(sess: AsyncSession) -> None:
    if isinstance(sess, RequestSession) and sess.busy_elsewhere():
        # A task the handler spawned still runs a statement on this session: closing now
        # would break it mid-protocol. Its statement ends by the session's deadline.
        db = sess.info.get(DATABASE_KEY)
        settings = getattr(db, "settings", None)
        limit = settings.command_timeout + settings.client_timeout_grace if settings else 30.0
        if not await sess.wait_idle(limit):
            await sess.invalidate()
            return
    try:
        await sess.close()
    except Exception as exc:
        # The rollback could not reach the server (connection lost, server restarting):
        # the server rolls the transaction back by itself; discard the connection and
        # let the response the application produced stand.
        logger.info(
            "could not release a connection cleanly (%s); discarding it",
            type(exc).__name__,
            extra={"error": type(exc).__name__},
        )
        with contextlib.suppress(Exception):
            await sess.invalidate()


def unknown_database(name: str, known: list[str]) -> ConfigurationError:
    """The error for a session on a database that is not configured."""
    hint = " (set DATABASE_REPLICA_URL)" if name == "replica" else ""
    return ConfigurationError(
        f"no database named {name!r}{hint}; configured: {', '.join(sorted(known))}"
    )
