"""DBPoolRuntime: the one object per application that owns everything app-long.

The lifespan builds it and yields it in the lifespan state; middleware, dependencies and
routes reach it through the request scope. Nothing here is module-level, so two apps (or
two tests) in one process never share a pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from .engines import Database, build_databases
from .errors import CheckoutTimeoutError, CircuitOpenError
from .leaks import LeakTracker
from .probe import DatabaseProbe
from .requests import unknown_database
from .sessions import RequestSession
from .settings import DBPoolSettings
from .telemetry import Telemetry, from_settings

logger = logging.getLogger("fastapi_dbpool")


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
        self.databases = dict(databases)
        self.draining = False
        self.in_flight = 0
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
        databases = await build_databases(settings, RequestSession)
        runtime = cls(settings, databases)
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
        if any(db.budget.max_overflow for db in runtime.databases.values()):
            runtime._overflow_trim = loop.create_task(
                runtime._close_idle_overflow(), name="fastapi_dbpool.overflow"
            )
        return runtime

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
        for task in (self._leak_scan, self._overflow_trim):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for db in self.databases.values():
            await db.dispose()
        if self.telemetry is not None:
            self.telemetry.detach()
        logger.info("engines disposed: %s", ", ".join(self.databases))
