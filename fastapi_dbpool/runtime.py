"""DBPoolRuntime: the one object per application that owns everything app-long.

The lifespan builds it and yields it in the lifespan state; middleware, dependencies and
routes reach it through the request scope. Nothing here is module-level, so two apps (or
two tests) in one process never share a pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from starlette.routing import Match

from . import requests as _requests
from .breaker import BreakerState
from .engines import Database, build_databases
from .errors import CheckoutTimeoutError, CircuitOpenError, DatabaseUnavailableError
from .leaks import LeakTracker
from .liveness import LivenessServer, LoopHeartbeat
from .probe import DatabaseProbe
from .requests import RequestContext, unknown_database
from .sessions import RequestSession
from .settings import DBPoolSettings
from .telemetry import Telemetry, from_settings

logger = logging.getLogger("fastapi_dbpool")

#: Routes whose database use is remembered (a bound, for apps that add routes at runtime).
MAX_LEARNED_ROUTES = 10_000


class Refusal(NamedTuple):
    """A request refused at the door: why, and the route it asked for."""

    error: DatabaseUnavailableError
    route: Any


class DBPoolRuntime:
    """Engines by name and the app-long state around them.

    Attributes:
        settings: The validated settings.
        databases: Each named database.
        draining: True once shutdown has begun.
        in_flight: HTTP requests being served now.
    """

    def __init__(self, settings: DBPoolSettings, databases: Mapping[str, Database]) -> None:
        self.settings = settings
        #: Settings every request reads, one attribute lookup away.
        self.http_metrics = settings.http_metrics
        self.autocommit = settings.autocommit
        self.databases = dict(databases)
        self.draining = False
        self.in_flight = 0
        self._database_list = list(self.databases.values())
        #: id(route) -> the databases every request of that route used so far (learned as
        #: requests finish). A route whose requests always take a connection of a database
        #: that refuses everything now (pool saturated, breaker open) is refused at the
        #: door, before the framework, the app's dependencies and the body are processed.
        self.route_databases: dict[int, frozenset[str]] = {}
        #: (method, path) -> the route the router picks for it, for refuse_at_door.
        self._door_routes: dict[tuple[Any, Any], Any] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.leaks = LeakTracker(
            threshold=settings.leak_threshold,
            reclaim_after=settings.leak_reclaim_after,
            reclaim_unowned=settings.leak_reclaim_unowned,
        )
        for db in self.databases.values():
            db.leaks = self.leaks
        self._leak_scan: asyncio.Task[None] | None = None
        self._overflow_trim: asyncio.Task[None] | None = None
        #: Requests running with a database session: from their ``watch_due`` on, they
        #: watch for their client leaving (they leave the set as they finish).
        self.watching: set[RequestContext] = set()
        self._disconnect_sweep: asyncio.Task[None] | None = None
        #: The liveness port's server (DB_LIVENESS_PORT), or None.
        self.liveness: LivenessServer | None = None
        #: OpenTelemetry, when on (decided once, in :meth:`start`); None when off.
        self.telemetry: Telemetry | None = None
        timeout = min(settings.connect_timeout, settings.health_check_interval)
        self.probes = {
            name: DatabaseProbe(db, interval=settings.health_check_interval, timeout=timeout)
            for name, db in self.databases.items()
        }

    @classmethod
    async def start(cls, settings: DBPoolSettings) -> DBPoolRuntime:
        """Size, build and warm every engine.

        Raises:
            ConfigurationError: A setting or the budget is invalid.
        """
        liveness = None
        if settings.liveness_port is not None:
            # First: a port that cannot be bound stops startup before any connection opens.
            liveness = LivenessServer(
                settings.liveness_host,
                settings.liveness_port,
                LoopHeartbeat(asyncio.get_running_loop()),
                settings.liveness_max_lag,
            )
            liveness.start()
        try:
            databases = await build_databases(settings, RequestSession)
        except BaseException:
            if liveness is not None:
                await liveness.stop()
            raise
        runtime = cls(settings, databases)
        runtime.liveness = liveness
        telemetry = from_settings(settings)
        if telemetry is not None:
            telemetry.attach(runtime)
        # The first probe runs before the app takes traffic, so readiness is truthful
        # from the first request on.
        await asyncio.gather(*(probe.check() for probe in runtime.probes.values()))
        for probe in runtime.probes.values():
            probe.start()
        loop = asyncio.get_running_loop()
        runtime._leak_scan = loop.create_task(
            runtime.leaks.run(list(runtime.databases.values())), name="fastapi_dbpool.leaks"
        )
        runtime._disconnect_sweep = loop.create_task(
            runtime.watch_disconnects(), name="fastapi_dbpool.disconnects"
        )
        if any(db.budget.max_overflow for db in runtime.databases.values()):
            runtime._overflow_trim = loop.create_task(
                runtime._close_idle_overflow(), name="fastapi_dbpool.overflow"
            )
        return runtime

    async def watch_disconnects(self) -> None:
        """Start the disconnect watch of requests running past the delay, until cancelled.

        Requests join ``watching`` as they first use a database and leave it as they
        finish; each sweep starts the watch of those whose ``watch_due`` has come. A
        watch starts between ``DISCONNECT_WATCH_DELAY`` and 1.5 times it after a
        request's first use of the database.
        """
        watching = self.watching
        while True:
            await asyncio.sleep(max(0.01, _requests.DISCONNECT_WATCH_DELAY / 2))
            now = time.monotonic()
            for ctx in [c for c in watching if c.watch_due <= now]:
                ctx.start_watch()

    async def _close_idle_overflow(self) -> None:
        """Close idle overflow connections of pools that went quiet, until cancelled."""
        interval = min(5.0, max(0.05, self.settings.pool_overflow_idle / 2))
        while True:
            await asyncio.sleep(interval)
            for db in self.databases.values():
                try:
                    await db.close_idle_overflow()
                except Exception:  # a broken connection: the pool deals with it later
                    logger.debug("closing idle overflow connections failed", exc_info=True)

    def database(self, name: str) -> Database:
        """The named database.

        Raises:
            ConfigurationError: No database of that name is configured.
        """
        try:
            return self.databases[name]
        except KeyError:
            raise unknown_database(name, list(self.databases)) from None

    def engine(self, name: str = "primary") -> AsyncEngine:
        """The ``AsyncEngine`` of a named database (for startup code, jobs, scripts)."""
        return self.database(name).engine

    def sessionmaker(self, name: str = "primary") -> async_sessionmaker[Any]:
        """The session factory of a named database (for work outside requests)."""
        return self.database(name).sessionmaker

    def check_available(self, db: Database) -> None:
        """Raise at once when ``db`` must not be used now.

        Raises:
            CircuitOpenError: The database's circuit breaker is open (503).
            CheckoutTimeoutError: DB_MAX_WAITING requests already wait for a connection.
        """
        breaker = db.breaker
        if not (breaker.is_closed or breaker.allow()):
            if self.telemetry is not None:
                self.telemetry.rejected(db)
            raise CircuitOpenError(
                f"the {db.name} database is unavailable (circuit breaker {breaker.state.value})",
                database=db.name,
                retry_after=breaker.retry_after(),
            )
        stats = db.stats
        if stats.waiting >= db.max_waiting:
            # Admission control: a request that joins a queue this long will not get a
            # connection within DB_CHECKOUT_TIMEOUT anyway; refusing it now keeps memory,
            # garbage collection and the event loop free for the requests being served.
            stats.refused += 1
            stats.checkout_timeouts += 1
            raise CheckoutTimeoutError(
                f"the {db.name} pool is saturated: {stats.waiting} requests already wait "
                f"for a connection (DB_MAX_WAITING={db.max_waiting})",
                database=db.name,
                retry_after=self.settings.checkout_timeout,
            )

    def learn_route(self, route_id: int, used: frozenset[str]) -> None:
        """Record the databases one finished request of a route (by ``id``) used.

        Routes are keyed by ``id``: FastAPI's routes are not hashable, and they live as
        long as the app.
        """
        known = self.route_databases.get(route_id)
        if known is None:
            if len(self.route_databases) < MAX_LEARNED_ROUTES:
                self.route_databases[route_id] = used
        elif not known <= used:
            self.route_databases[route_id] = known & used

    def refusing(self) -> Database | None:
        """A database that refuses every request now, if any (no side effects)."""
        for db in self._database_list:
            if db.stats.waiting >= db.max_waiting:
                return db
            breaker = db.breaker
            if breaker.state is BreakerState.OPEN and breaker.retry_after() > 0:
                return db
        return None

    def refuse_at_door(self, scope: Mapping[str, Any]) -> Refusal | None:
        """The refusal of a request before the app runs, or None to let it in.

        Only while a database refuses everything, and only for a route every request of
        which so far needed that database; other requests go their normal way (they may
        not need that database at all).
        """
        db = self.refusing()
        if db is None:
            return None
        key = (scope.get("method"), scope.get("path"))
        route = self._door_routes.get(key)
        if route is None:
            app = scope.get("app")
            routes = getattr(getattr(app, "router", None), "routes", None)
            if not routes:
                return None
            # As the router does: the first full match (a path match with another
            # method is only partial; with no full match the app answers 405 or 404).
            route = next((r for r in routes if r.matches(scope)[0] is Match.FULL), None)
            if route is None:
                return None
            if len(self._door_routes) < MAX_LEARNED_ROUTES:
                # A burst asks for the same paths again and again: match each once.
                self._door_routes[key] = route
        if db.name not in self.route_databases.get(id(route), ()):
            return None
        try:
            self.check_available(db)
        except DatabaseUnavailableError as exc:
            return Refusal(exc, route)
        return None

    def request_started(self) -> None:
        """Count a request in flight."""
        self.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        """Count a request done."""
        self.in_flight -= 1
        if self.in_flight <= 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()

    async def close(self) -> None:
        """Drain in-flight requests (up to ``DB_DRAIN_TIMEOUT``), then dispose every engine."""
        self.draining = True
        if self.in_flight:
            logger.info(
                "draining: waiting up to %.1fs for %d requests in flight",
                self.settings.drain_timeout,
                self.in_flight,
                extra={"in_flight": self.in_flight},
            )
            try:
                await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
            except TimeoutError:
                logger.warning(
                    "drain timed out after %.1fs with %d requests still in flight",
                    self.settings.drain_timeout,
                    self.in_flight,
                    extra={"in_flight": self.in_flight},
                )
        await asyncio.gather(*(probe.stop() for probe in self.probes.values()))
        for task in (self._leak_scan, self._overflow_trim, self._disconnect_sweep):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for db in self.databases.values():
            await db.dispose()
        if self.telemetry is not None:
            self.telemetry.detach()
        if self.liveness is not None:
            # Last: the pod stays alive (and says so) while it drains.
            await self.liveness.stop()
        logger.info("engines disposed: %s", ", ".join(self.databases))
