"""The background probe: one connection of its own per database, checked every interval.

Readiness answers from what the probe last saw and the breaker, never from the request
pool, so Kubernetes can ask as often as it likes: the database sees at most one probe
query per interval per process. The probe also feeds the breaker (a failed probe is a
connection-level failure) and is its half-open trial when the breaker is ready to close.

With ``DATABASE_FAILOVER_URLS`` the probe checks every target (primary and alternates, one
connection of its own each, concurrently under the same timeout), asks each whether it
takes writes, and hands the results to the :class:`~fastapi_dbpool.failover.FailoverConnector`,
which fails over or restores. The database is then up when its active target is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg

from .breaker import BreakerState, is_connection_failure
from .failover import READ_ONLY, READ_ONLY_QUERY, FailoverConnector, TargetCheck, error_label

if TYPE_CHECKING:
    from .engines import Database

logger = logging.getLogger("fastapi_dbpool")

#: Interval jitter: each wait is the interval times a factor in [1 - JITTER, 1 + JITTER].
JITTER = 0.1


class ProbeResult:
    """What the last probe saw."""

    __slots__ = ("checked_at", "error", "latency", "ok")

    def __init__(
        self, ok: bool | None, checked_at: float | None, latency: float | None, error: str | None
    ) -> None:
        self.ok = ok
        self.checked_at = checked_at
        self.latency = latency
        self.error = error


class DatabaseProbe:
    """Checks one database every interval on a connection outside the request pool.

    Args:
        db: The database to probe.
        interval: Seconds between probes (jittered by ±10%).
        timeout: Seconds one probe may take, connect included.
        clock: Monotonic clock.
        rng: Random source for the jitter.
    """

    def __init__(
        self,
        db: Database,
        *,
        interval: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._db = weakref.ref(db)
        self.name = db.name
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.rng = rng or random.Random()
        self.result = ProbeResult(None, None, None, None)
        self.queries = 0
        self._conn: Any = None
        self._target_conns: dict[int, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        if db.failover is not None:
            # A failure under a request on the active target: check every target now.
            db.failover.verify = self.wake

    def start(self) -> None:
        """Start probing in the background."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"fastapi_dbpool.probe.{self.name}"
            )

    async def stop(self) -> None:
        """Stop probing and close the probe's connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, self.timeout + 1)
        await self._close()

    def next_wait(self) -> float:
        """Seconds until the next probe: the jittered interval, or sooner when the open
        breaker is ready for its trial."""
        wait = self.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
        db = self._db()
        if db is not None and db.breaker.state is BreakerState.OPEN:
            wait = min(wait, db.breaker.retry_after())
        return max(0.0, wait)

    async def check(self) -> ProbeResult:
        """Probe once now: connect if needed, ``SELECT 1``, record the outcome."""
        db = self._db()
        if db is None:
            return self.result
        breaker = db.breaker
        if breaker.state is BreakerState.OPEN and not breaker.allow():
            # Not yet time for a trial: keep the cached answer.
            return self.result
        if db.failover is not None:
            return await self._check_targets(db, db.failover)
        started = self.clock()
        self.queries += 1
        try:
            async with asyncio.timeout(self.timeout):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        dsn=db.url.set(drivername="postgresql").render_as_string(
                            hide_password=False
                        ),
                        timeout=self.timeout,
                        server_settings={"application_name": db.settings.application_name},
                    )
                await self._conn.fetchval("SELECT 1")
        except Exception as exc:
            await self._close()
            error = type(exc).__name__
            self.result = ProbeResult(False, self.clock(), None, error)
            if is_connection_failure(exc) or isinstance(exc, asyncpg.PostgresError):
                breaker.record_failure()
            logger.warning(
                "probe of the %s database failed: %s",
                self.name,
                error,
                extra={"database": self.name, "error": error},
            )
            return self.result
        was_failing = self.result.ok is False
        self.result = ProbeResult(True, self.clock(), self.clock() - started, None)
        breaker.record_success()
        if was_failing:
            logger.info("probe of the %s database succeeded again", self.name)
        return self.result

    async def _check_targets(self, db: Database, connector: FailoverConnector) -> ProbeResult:
        checks = await asyncio.gather(
            *(self._check_target(db, connector, i) for i in range(len(connector.targets)))
        )
        connector.update(checks)
        active = checks[connector.active]
        was_failing = self.result.ok is False
        if active.ok:
            self.result = ProbeResult(True, self.clock(), active.latency, None)
            db.breaker.record_success()
            if was_failing:
                logger.info("probe of the %s database succeeded again", self.name)
            return self.result
        # No target works: the database is down, as without failover.
        error = active.error or "unavailable"
        self.result = ProbeResult(False, self.clock(), None, error)
        db.breaker.record_failure()
        logger.warning(
            "probe of the %s database failed: %s (no failover target available either)",
            self.name,
            error,
            extra={"database": self.name, "error": error},
        )
        return self.result

    async def _check_target(
        self, db: Database, connector: FailoverConnector, index: int
    ) -> TargetCheck:
        started = self.clock()
        self.queries += 1
        try:
            async with asyncio.timeout(self.timeout):
                conn = self._target_conns.get(index)
                if conn is None or conn.is_closed():
                    conn = await connector.connect_target(
                        index,
                        timeout=self.timeout,
                        server_settings={"application_name": db.settings.application_name},
                    )
                    self._target_conns[index] = conn
                read_only = await conn.fetchval(READ_ONLY_QUERY)
        except Exception as exc:
            # A failed target's connection is broken or stuck: no graceful close.
            conn = self._target_conns.pop(index, None)
            if conn is not None:
                conn.terminate()
            return TargetCheck(False, error_label(exc))
        if read_only:
            # Keep the connection: it tells us cheaply when the server is promoted.
            return TargetCheck(False, READ_ONLY)
        return TargetCheck(True, None, self.clock() - started)

    async def _run(self) -> None:
        while True:
            # Cleared before the check: a wake() that arrives during it asks for another.
            self._wake.clear()
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.next_wait())

    def wake(self) -> None:
        """Probe now rather than at the next interval."""
        self._wake.set()

    async def _close(self) -> None:
        conns = [self._conn, *self._target_conns.values()]
        self._conn, self._target_conns = None, {}
        for conn in conns:
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), self.timeout)
                except Exception:
                    conn.terminate()
