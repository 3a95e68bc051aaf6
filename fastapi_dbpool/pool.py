"""The instrumented queue pool and the plain numbers it keeps.

Counters and histograms here are plain integers and lists updated on the hot path (an
increment and a bisect, no lock: the pool lives on one event loop). Prometheus and
OpenTelemetry read them at scrape/collection time, so a checkout never pays for an
exporter, and two apps in one process never share a number. Only OpenTelemetry's
duration histograms (and checkout spans) need a call per observation: ``stats.otel``,
None unless OpenTelemetry is on (see ``telemetry.py``).

The pool also records who holds each checked-out connection (leak tracking, see
``leaks.py``) and puts a connection's per-checkout state back at checkin, in its own
``connect`` and ``_do_return_conn``: SQLAlchemy's checkout and checkin events would do
the same at the price of an event dispatch each, on every request.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import await_, memoized_property
from sqlalchemy.util.concurrency import in_greenlet
from sqlalchemy.util.queue import AsyncAdaptedQueue, Full

from .breaker import CircuitBreaker, is_connection_failure
from .context import current_request
from .errors import CheckoutTimeoutError
from .leaks import USED_AFTER_REQUEST, Checkout, capture_stack
from .sessions import AUTOCOMMIT_KEY

if TYPE_CHECKING:
    from .engines import Database
    from .telemetry import PoolTelemetry

#: Bucket upper bounds (seconds) of the checkout-wait and connection-time histograms.
WAIT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
USE_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)


class Histogram:
    """A cumulative-at-read histogram: per-bucket counts, a sum and a count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one value."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Buckets as Prometheus wants them: (upper bound, cumulative count), +Inf last."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out

    def quantile(self, q: float) -> float | None:
        """An upper-bound estimate of quantile ``q`` (for health output and tests)."""
        if self.count == 0:
            return None
        target = q * self.count
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            if running >= target:
                return bound
        return float("inf")


class PoolStats:
    """What one database's pool has done since startup."""

    __slots__ = (
        "checkout_timeouts",
        "checkouts",
        "connect_failures",
        "create_time",
        "otel",
        "refused",
        "statement_timeouts",
        "use_time",
        "validations",
        "wait_time",
        "waiting",
    )

    def __init__(self) -> None:
        self.waiting = 0
        self.checkouts = 0
        self.checkout_timeouts = 0
        self.statement_timeouts = 0
        self.connect_failures = 0
        #: Requests answered 503 at once because DB_MAX_WAITING requests already waited.
        self.refused = 0
        #: Idle connections validated at checkout (``DB_PRE_PING_IDLE``): one round trip each.
        self.validations = 0
        self.wait_time = Histogram(WAIT_BUCKETS)
        self.create_time = Histogram(WAIT_BUCKETS)
        self.use_time = Histogram(USE_BUCKETS)
        #: OpenTelemetry's hooks while it is on; None (one attribute check) when off.
        self.otel: PoolTelemetry | None = None


#: Key of ``ConnectionPoolEntry.info``: ``time.monotonic()`` when it was last returned.
IDLE_SINCE = "dbpool_idle_since"
#: Key of ``ConnectionPoolEntry.info``: a route changed the driver's client-side deadline.
CLIENT_TIMEOUT_CHANGED = "dbpool_client_timeout_changed"

#: Default of ``DB_POOL_OVERFLOW_IDLE``.
OVERFLOW_IDLE = 30.0


class _RoomyQueue(AsyncAdaptedQueue[Any]):
    """SQLAlchemy's asyncio queue with room for the overflow connections too.

    ``maxsize`` stays ``pool_size`` (SQLAlchemy's ``size()``, ``checkedout()`` and
    ``recreate()`` read it); the asyncio queue underneath holds up to ``capacity``.
    """

    def __init__(self, maxsize: int, use_lifo: bool, capacity: int) -> None:
        super().__init__(maxsize, use_lifo)
        self.capacity = capacity

    @memoized_property
    def _queue(self) -> asyncio.Queue[Any]:
        # Made on first use, inside the event loop (as SQLAlchemy's own queue is).
        if self.use_lifo:
            return asyncio.LifoQueue(maxsize=self.capacity)
        return asyncio.Queue(maxsize=self.capacity)

    def qsize(self) -> int:
        return self._queue.qsize()

    def pop_oldest(self, older_than: float) -> ConnectionPoolEntry | None:
        """Take the least recently returned entry if it was returned before ``older_than``."""
        items = self._queue._queue  # type: ignore[attr-defined]  # list (LIFO) or deque
        if not items or items[0].info.get(IDLE_SINCE, older_than) >= older_than:
            return None
        entry: ConnectionPoolEntry = items[0]
        del items[0]
        return entry


# The base class's methods, called directly on the per-checkout path (cheaper than super()).
_queue_pool_get = AsyncAdaptedQueuePool._do_get
_pool_connect = AsyncAdaptedQueuePool.connect


class InstrumentedQueuePool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio queue pool, timing checkouts and counting waiters.

    It also keeps its overflow connections while they are in use: SQLAlchemy's queue
    holds ``pool_size`` idle connections and closes any connection that comes back to a
    full queue, so under steady load (connections coming back in bunches, new requests
    right behind them) it closes and reopens overflow connections many times a second.
    Here a returned connection always goes back to the queue, and connections beyond
    ``pool_size`` are closed once they have sat idle ``overflow_idle`` seconds
    (``DB_POOL_OVERFLOW_IDLE``), checked when a connection comes back and by
    :meth:`close_idle_overflow`.
    """

    # Keep SQLAlchemy's own pool log records under "sqlalchemy.pool", where users'
    # logging configuration expects them, not under our logger.
    _sqla_logger_namespace = "sqlalchemy.pool.impl.AsyncAdaptedQueuePool"

    #: Set by ``attach``: the database this pool serves, its numbers and its breaker.
    dbpool_db: Database
    dbpool_stats: PoolStats
    dbpool_breaker: CircuitBreaker
    #: Seconds an overflow connection may sit idle (set by ``attach``).
    overflow_idle: float = OVERFLOW_IDLE
    #: The driver's client-side deadline, put back at checkin when a route changed it.
    dbpool_client_timeout: float = 0.0
    #: Validate a connection that sat idle longer than this (seconds) before handing it
    #: out; None: here never (off, or done by a checkout listener after failover's own).
    dbpool_ping_idle: float | None = None

    def __init__(
        self,
        creator: Any,
        pool_size: int = 5,
        max_overflow: int = 10,
        timeout: float = 30.0,
        use_lifo: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(
            creator,
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=timeout,
            use_lifo=use_lifo,
            **kw,
        )
        if pool_size > 0 and max_overflow != 0:
            # max_overflow -1 (no limit): no limit on idle connections either.
            capacity = pool_size + max_overflow if max_overflow > 0 else 0
            self._pool = _RoomyQueue(pool_size, use_lifo, capacity)

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        # Every checkin comes here (and a detached connection's record, never to be seen
        # again as it was).
        now = time.monotonic()
        checkout = self.dbpool_db.checked_out.pop(id(record), None)
        if checkout is not None:
            held = now - checkout.started
            stats = self.dbpool_stats
            stats.use_time.observe(held)
            if checkout.owner is not None:
                checkout.owner.held -= 1
            if stats.otel is not None:
                stats.otel.checked_in(held)
            if checkout.reported is not None:
                self._returned_leak(checkout, now)
        info = record.info
        if AUTOCOMMIT_KEY in info or CLIENT_TIMEOUT_CHANGED in info:
            self._reset_connection(record, info)
        # The one idle stamp: idle validation at checkout (engines.py) reads it too.
        info[IDLE_SINCE] = now
        queue = self._pool
        if not isinstance(queue, _RoomyQueue):
            super()._do_return_conn(record)
            return
        try:
            queue.put(record, False)
        except Full:  # cannot happen: the queue has room for every connection
            try:
                record.close()
            finally:
                self._dec_overflow()
            return
        if queue.qsize() > queue.maxsize and in_greenlet():
            # Closing awaits the driver: only where SQLAlchemy can await (not when the
            # garbage collector returns an abandoned connection); the runtime's task
            # closes the rest.
            self.close_idle_overflow(now)

    def _do_get(self) -> ConnectionPoolEntry:
        record = _queue_pool_get(self)
        limit = self.dbpool_ping_idle
        if limit is not None and idle_longer_than(record, limit):
            dbapi_connection: Any = record.dbapi_connection
            if dbapi_connection is not None:  # None: invalidated, SQLAlchemy reconnects it
                self.dbpool_stats.validations += 1
                try:
                    failure = ping(dbapi_connection)
                    if failure is not None:
                        # Dead: discard it; SQLAlchemy opens a new one for this checkout
                        # (a failure to open that one is the checkout's, seen by the breaker).
                        record.invalidate(failure)
                except BaseException as err:
                    # Cancelled mid-ping: what SQLAlchemy does when a checkout fails.
                    record._checkin_failed(err, _fairy_was_created=False)  # type: ignore[attr-defined]
                    raise
        return record

    def _returned_leak(self, checkout: Checkout, now: float) -> None:
        db = self.dbpool_db
        if db.leaks is not None:
            db.leaks.returned(db, checkout, now)

    def _reset_connection(self, record: ConnectionPoolEntry, info: dict[Any, Any]) -> None:
        """Undo what a checkout changed on the driver (read-only autocommit, a deadline)."""
        dbapi_connection: Any = record.dbapi_connection
        if info.pop(AUTOCOMMIT_KEY, False) and dbapi_connection is not None:
            dbapi_connection.autocommit = False
        if info.pop(CLIENT_TIMEOUT_CHANGED, False) and dbapi_connection is not None:
            driver = dbapi_connection.driver_connection
            driver._config = driver._config._replace(command_timeout=self.dbpool_client_timeout)

    def close_idle_overflow(self, now: float | None = None) -> int:
        """Close idle connections beyond ``pool_size`` idle ``overflow_idle`` seconds.

        Runs in SQLAlchemy's greenlet context (closing a connection awaits the driver):
        on checkin, and from the runtime's maintenance task through ``greenlet_spawn``.
        Returns how many it closed.
        """
        queue = self._pool
        if not isinstance(queue, _RoomyQueue):
            return 0
        cutoff = (time.monotonic() if now is None else now) - self.overflow_idle
        closed = 0
        while queue.qsize() > queue.maxsize:
            entry = queue.pop_oldest(cutoff)
            if entry is None:
                break
            # Counted out before the close awaits the driver: meanwhile the connection is
            # neither idle nor checked out, and the pool's numbers must not say it is.
            self._dec_overflow()
            entry.close()
            closed += 1
        return closed

    def connect(self) -> PoolProxiedConnection:
        stats = self.dbpool_stats
        stats.waiting += 1
        started = time.monotonic()
        try:
            conn = _pool_connect(self)
        except sa_exc.TimeoutError:
            stats.checkout_timeouts += 1
            error = CheckoutTimeoutError(
                f"no connection of the {self.dbpool_breaker.name} pool became free within "
                f"{self._timeout:g}s (pool_size={self.size()}, "
                f"max_overflow={self._max_overflow})",
                database=self.dbpool_breaker.name,
                retry_after=self._timeout,
            )
            if stats.otel is not None:
                stats.otel.checkout_failed(time.monotonic() - started, error)
            raise error from None
        except Exception as exc:
            if stats.otel is not None:
                stats.otel.checkout_failed(time.monotonic() - started, exc)
            # Opening (or reopening) a connection failed: SQLAlchemy's handle_error never
            # sees these (they are not DBAPI errors), so the breaker learns of them here.
            if is_connection_failure(exc):
                stats.connect_failures += 1
                self.dbpool_breaker.record_failure()
                ctx = current_request.get()
                if ctx is not None:
                    ctx.failed = True
            raise
        finally:
            stats.waiting -= 1
        stats.checkouts += 1
        now = time.monotonic()
        wait = now - started
        stats.wait_time.observe(wait)
        if stats.otel is not None:
            stats.otel.checked_out(wait)
        # Who holds it, for leak tracking (see leaks.py).
        record: ConnectionPoolEntry = conn._connection_record
        owner = current_request.get()
        db = self.dbpool_db
        checkout = Checkout(
            record,
            now,
            owner,
            asyncio.current_task(),
            capture_stack() if db.track_stack else (),
        )
        db.checked_out[id(record)] = checkout
        if owner is not None:
            owner.held += 1
            if owner.finished and db.leaks is not None:
                # The request is over, yet something it handed out took a connection.
                db.leaks.report(db, checkout, USED_AFTER_REQUEST, now)
        return conn

    def _create_connection(self) -> ConnectionPoolEntry:
        started = time.perf_counter()
        entry = super()._create_connection()
        took = time.perf_counter() - started
        stats = self.dbpool_stats
        stats.create_time.observe(took)
        if stats.otel is not None:
            stats.otel.connection_created(took)
        return entry

    def recreate(self) -> InstrumentedQueuePool:
        pool = super().recreate()
        assert isinstance(pool, InstrumentedQueuePool)
        attach(pool, self.dbpool_db)
        return pool


def idle_longer_than(record: ConnectionPoolEntry, seconds: float) -> bool:
    """Whether the connection has sat idle in the pool longer than ``seconds``.

    Reads the stamp the pool puts on a returned connection (and ``engines.py`` on a new
    one); a connection without one counts as just used.
    """
    now = time.monotonic()
    idle: float = now - record.info.get(IDLE_SINCE, now)
    return idle > seconds


def ping(dbapi_connection: Any) -> Exception | None:
    """Validate a connection with one round trip (";"); the error if it is dead.

    Not SQLAlchemy's pre-ping (BEGIN, ping, ROLLBACK on every checkout): the library
    validates only connections idle longer than ``DB_PRE_PING_IDLE``.
    """
    try:
        await_(dbapi_connection.driver_connection.fetchrow(";"))
    except Exception as exc:
        return exc
    return None


def attach(pool: Any, db: Database) -> None:
    """Give a freshly built pool its database: numbers, breaker, settings, checkouts."""
    pool.dbpool_db = db
    pool.dbpool_stats = db.stats
    pool.dbpool_breaker = db.breaker
    pool.overflow_idle = db.settings.pool_overflow_idle
    pool.dbpool_client_timeout = db.settings.command_timeout + db.settings.client_timeout_grace
    if db.settings.pool_pre_ping and db.failover is None:
        pool.dbpool_ping_idle = db.settings.pre_ping_idle
