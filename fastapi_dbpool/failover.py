"""Failover of the primary to ``DATABASE_FAILOVER_URLS``, and restoration when it is back.

The primary's engine opens its connections through a :class:`FailoverConnector` (its
``async_creator``). The work is split between the driver and us:

* asyncpg does what it does well inside one URL: it tries each host of a multi-host URL
  in turn, and with ``target_session_attrs="read-write"`` it rejects a server that would
  refuse writes (a demoted primary, a standby, ``default_transaction_read_only=on``).
* We add what it does not: a deadline per target (asyncpg's ``timeout`` spans every host
  of one ``connect()``, so a black-holed first host leaves none for the others), memory of
  which target is down (so a dead primary does not cost every new connection a timeout),
  restoration when the background probe sees the primary writable again, the recycling of
  pooled connections to a target we have moved away from, and the counters, log records
  and health data that make each move visible.

Targets are the primary (index 0) and the alternates, in order. ``active`` is where new
connections go. It moves to the first healthy alternate when the active target fails (a
connect fails at the connection level, or the probe finds it down or read-only), and back
to the primary as soon as the primary is known healthy again; it does not move between
alternates while the active one works. Decisions are synchronous (one event loop, no
awaits in between), so concurrent connects that fail together cause one transition.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from .breaker import is_connection_failure
from .settings import safe_url

logger = logging.getLogger("fastapi_dbpool")

#: Every target must take writes: a demoted primary or a standby is not a primary.
TARGET_SESSION_ATTRS = "read-write"

#: One round trip that tells whether the server would refuse a write (SQLSTATE 25006).
#: Run on the probe's long-lived connections, which asyncpg checked only when they opened.
READ_ONLY_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
)

#: Values of the ``failover_event`` log field and of ``last_transition.event``.
FAILOVER = "failover"
RESTORATION = "restoration"

#: Error label of a target that answers but would refuse writes.
READ_ONLY = "read_only"

_FAILED_OVER = "%s database failed over: new connections go to %s (was %s: %s)"
_RESTORED = "%s database restored: new connections go to its primary %s again (was %s)"
_TARGET_DOWN = "%s database: failover target %s is unavailable: %s"
_TARGET_UP = "%s database: failover target %s is available again"


def error_label(exc: BaseException) -> str:
    """A short, password-free name for why a target could not be used."""
    if isinstance(
        exc,
        asyncpg.exceptions.TargetServerAttributeNotMatched
        | asyncpg.exceptions.ReadOnlySQLTransactionError,
    ):
        return READ_ONLY
    return type(exc).__name__


#: SQLSTATEs that do not make a target unusable for failover: a full server
#: (too_many_connections) is up, and our own probe connection would keep saying so, so
#: failing over on it would flap at every probe interval. The breaker still counts it.
_NOT_AN_OUTAGE = frozenset({"53300"})


def _is_outage(exc: BaseException) -> bool:
    # Unreachable, shutting down or starting, or read-only: move on. Anything else (a wrong
    # password, a missing database, a full server) is raised as it is.
    if getattr(exc, "sqlstate", None) in _NOT_AN_OUTAGE:
        return False
    return is_connection_failure(exc) or error_label(exc) == READ_ONLY


def _driver_of(context: ExceptionContext) -> Any:
    conn = context.connection
    if conn is None or conn.invalidated:
        return None
    try:
        return conn.connection.driver_connection
    except Exception:  # closed or detached meanwhile: nothing to learn from it
        return None


@dataclass(frozen=True, slots=True)
class TargetCheck:
    """What one probe of one target saw.

    Attributes:
        ok: The target answered and takes writes.
        error: Why not (an exception's class name, or ``"read_only"``).
        latency: Seconds the check took, when it succeeded.
    """

    ok: bool
    error: str | None = None
    latency: float | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """One move of ``active``: a failover or a restoration."""

    event: str
    source: int
    target: int
    reason: str
    at: float


class _Target:
    __slots__ = (
        "checked_at",
        "connect_failures",
        "connections",
        "dsn",
        "error",
        "healthy",
        "latency",
        "safe_url",
    )

    def __init__(self, url: URL) -> None:
        # The DSN carries the password: it never leaves this object.
        self.dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.safe_url = safe_url(url)
        self.healthy: bool | None = None
        self.error: str | None = None
        self.latency: float | None = None
        self.checked_at: float | None = None
        self.connections = 0
        self.connect_failures = 0


class FailoverConnector:
    """Opens connections for the primary's pool, moving to an alternate while it is down.

    Args:
        name: The database's name.
        primary: The primary's URL.
        alternates: Failover URLs, in order of preference.
        connect_args: asyncpg ``connect()`` keyword arguments (deadlines, settings);
            ``timeout`` is the deadline of each target's attempt.
        clock: Monotonic clock.

    Attributes:
        active: Index of the target new connections go to (0 is the primary).
        failovers: Moves away from the active target since startup.
        restorations: Moves back to the primary since startup.
        recycled: Pooled connections replaced at checkout because their target was left.
        dropped: Idle pooled connections closed when their target was left.
        last_transition: The most recent failover or restoration, if any.
        verify: Called when a pooled connection to the active target fails at the
            connection level, to have the targets checked now rather than at the next
            probe interval (the probe sets it to its ``wake``).
    """

    def __init__(
        self,
        name: str,
        primary: URL,
        alternates: tuple[URL, ...],
        connect_args: Mapping[str, Any],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.targets = (primary, *alternates)
        self.connect_args = dict(connect_args)
        self.clock = clock
        self.active = 0
        self.failovers = 0
        self.restorations = 0
        self.recycled = 0
        self.dropped = 0
        self.last_transition: Transition | None = None
        self.verify: Callable[[], None] | None = None
        self._targets = [_Target(url) for url in self.targets]
        # Which target each pooled connection went to, and which are checked out; weak,
        # so a connection the pool dropped is forgotten with it.
        self._target_of: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._in_use: weakref.WeakSet[Any] = weakref.WeakSet()
        self._pool_attached = False
        self._verify_pending = False

    # ------------------------------------------------------------------ connecting

    async def __call__(self) -> Any:
        """Open one connection for the pool: the active target first, then the others
        not known to be down, in order; each attempt has the full connect deadline.

        Raises:
            Exception: The active target's error when no target could be used.
        """
        errors: list[Exception] = []
        for index in self._candidates():
            try:
                conn = await self.connect_target(index)
            except Exception as exc:
                if not errors and not _is_outage(exc):
                    raise
                self._connect_failed(index, exc)
                errors.append(exc)
                continue
            self._connected(index, conn)
            return conn
        raise errors[0]

    async def connect_target(self, index: int, **overrides: Any) -> Any:
        """Open an asyncpg connection to one target, requiring a writable server.

        Args:
            index: The target (0 is the primary).
            **overrides: ``connect()`` arguments that replace the pool's (the probe's
                own deadline and ``server_settings``).

        Raises:
            asyncpg.exceptions.TargetServerAttributeNotMatched: The server is read-only.
        """
        kwargs = {**self.connect_args, **overrides}
        kwargs["target_session_attrs"] = TARGET_SESSION_ATTRS
        return await asyncpg.connect(dsn=self._targets[index].dsn, **kwargs)

    def _candidates(self) -> list[int]:
        # Targets the probe or a connect found down are skipped: the probe retries them
        # every interval, so a black-holed one costs its timeout there, not here.
        rest = [
            i
            for i, target in enumerate(self._targets)
            if i != self.active and target.healthy is not False
        ]
        return [self.active, *rest]

    def _connected(self, index: int, conn: Any) -> None:
        target = self._targets[index]
        target.connections += 1
        self._target_of[conn] = index
        if target.healthy is not True:
            target.healthy, target.error = True, None
            self._reconcile()

    def _connect_failed(self, index: int, exc: Exception) -> None:
        target = self._targets[index]
        target.connect_failures += 1
        target.error = error_label(exc)
        if target.healthy is not False:
            target.healthy = False
            self._reconcile()

    # ------------------------------------------------------------------ probe input

    def update(self, checks: Sequence[TargetCheck]) -> None:
        """Record one probe of every target, then move ``active`` if that is due.

        Args:
            checks: One check per target, in the order of :attr:`targets`.

        Raises:
            ValueError: Not one check per target.
        """
        if len(checks) != len(self._targets):
            raise ValueError(f"expected {len(self._targets)} checks, got {len(checks)}")
        now = self.clock()
        self._verify_pending = False
        for index, (target, check) in enumerate(zip(self._targets, checks, strict=True)):
            was = target.healthy
            target.healthy, target.error = check.ok, check.error
            target.latency, target.checked_at = check.latency, now
            if index not in (0, self.active) and was is not None and was != check.ok:
                # The primary's and the active target's changes are told by the failover
                # or restoration they cause (or, when none is possible, by the probe).
                if check.ok:
                    logger.info(
                        _TARGET_UP,
                        self.name,
                        target.safe_url,
                        extra={"database": self.name, "failover_target": target.safe_url},
                    )
                else:
                    logger.info(
                        _TARGET_DOWN,
                        self.name,
                        target.safe_url,
                        check.error,
                        extra={
                            "database": self.name,
                            "failover_target": target.safe_url,
                            "error": check.error,
                        },
                    )
        self._reconcile()

    @property
    def usable(self) -> bool:
        """Whether the active target is known to work."""
        return self._targets[self.active].healthy is True

    @property
    def primary_healthy(self) -> bool:
        """Whether the primary is known to be up and writable."""
        return self._targets[0].healthy is True

    def error_of(self, index: int) -> str | None:
        """Why a target was last found unusable (None when it was not)."""
        return self._targets[index].error

    # ------------------------------------------------------------------ transitions

    def _reconcile(self) -> None:
        active = self.active
        if active != 0 and self._targets[0].healthy:
            self._move(0, RESTORATION, "primary is up and writable")
            return
        if self._targets[active].healthy is not False:
            return
        for index, target in enumerate(self._targets):
            if index != active and target.healthy:
                self._move(index, FAILOVER, self._targets[active].error or "unavailable")
                return

    def _move(self, index: int, kind: str, reason: str) -> None:
        source = self.active
        self.active = index
        self.last_transition = Transition(kind, source, index, reason, self.clock())
        old, new = self._targets[source].safe_url, self._targets[index].safe_url
        extra = {
            "database": self.name,
            "failover_event": kind,
            "failover_from": old,
            "failover_to": new,
            "reason": reason,
        }
        if kind == FAILOVER:
            self.failovers += 1
            logger.warning(
                _FAILED_OVER, self.name, new, old, reason, extra={**extra, "count": self.failovers}
            )
        else:
            self.restorations += 1
            logger.info(_RESTORED, self.name, new, old, extra={**extra, "count": self.restorations})
        self._drop_idle()

    # ------------------------------------------------------------------ the pool

    def attach(self, engine: Engine) -> None:
        """Watch the primary engine: recycle connections to targets no longer active, and
        have the targets checked at once when the active one fails under a request.

        At checkout, a connection to a target we moved away from is replaced (SQLAlchemy
        reconnects when a checkout listener raises ``DisconnectionError``) before anything
        runs on it, so no request uses a dead or demoted server's connection and traffic
        returns to the primary as soon as it is restored. On each move, idle connections
        to the old target are closed at once; checked-out ones finish their work and are
        replaced at their next checkout, so requests in flight are not failed.

        Args:
            engine: The primary's (sync) engine; pool events carry over to a recreated
                pool.
        """
        if self._pool_attached:
            return
        self._pool_attached = True
        pool = engine.pool
        # First among the listeners: a stale connection must not be pinged (a black-holed
        # server would hold the ping until its deadline), and a listener that raises (the
        # deadline translation) must not hide an error from us.
        event.listen(pool, "checkout", self._on_checkout, insert=True)
        event.listen(pool, "checkin", self._on_checkin)
        event.listen(pool, "close", self._on_checkin)
        event.listen(engine, "handle_error", self._on_error, insert=True)

    @property
    def attached(self) -> bool:
        """Whether :meth:`attach` watches the engine (recycling needs it)."""
        return self._pool_attached

    def _on_error(self, context: ExceptionContext) -> None:
        if self.verify is None:
            return
        if not (context.is_disconnect or _is_outage(context.original_exception)):
            return
        driver = _driver_of(context)
        index = None if driver is None else self._target_of.get(driver)
        if (index is None or index == self.active) and not self._verify_pending:
            # Perhaps a demotion (25006) or an outage: the probe tells which, at once. One
            # early check per probe result, however many requests fail meanwhile.
            self._verify_pending = True
            self.verify()

    def _on_checkout(
        self, dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        driver = dbapi_connection.driver_connection
        index = self._target_of.get(driver)
        if driver.is_closed() or (index is not None and index != self.active):
            self.recycled += 1
            raise DisconnectionError(
                f"{self.name} database: connection to a target no longer in use, replaced"
            )
        self._in_use.add(driver)

    def _on_checkin(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        if dbapi_connection is not None:
            self._in_use.discard(dbapi_connection.driver_connection)

    def _drop_idle(self) -> None:
        if not self._pool_attached:
            return  # without checkout tracking, idle cannot be told from in use
        for conn, index in list(self._target_of.items()):
            if index != self.active and conn not in self._in_use and not conn.is_closed():
                # terminate(): the old target may not answer a graceful close.
                conn.terminate()
                self.dropped += 1

    def is_stale(self, connection: Any) -> bool:
        """Whether a pooled connection goes to a target new connections no longer use.

        Args:
            connection: The asyncpg connection, or a wrapper with ``driver_connection``
                (SQLAlchemy's pooled connection or its DBAPI adapter).
        """
        driver = getattr(connection, "driver_connection", connection)
        index = None if driver is None else self._target_of.get(driver)
        return index is not None and index != self.active

    def failed_on_left_target(self, context: ExceptionContext) -> bool:
        """Whether an engine error happened on a connection to a target already left.

        Such a failure says nothing about the active target, so the circuit breaker
        should not count it (e.g. statements stuck on a black-holed old primary that
        time out after the failover).
        """
        return self.is_stale(_driver_of(context))

    # ------------------------------------------------------------------ reporting

    def snapshot(self) -> dict[str, Any]:
        """The failover state for /health/database (URLs without password or query)."""
        now = self.clock()
        last = self.last_transition
        return {
            "active": self._targets[self.active].safe_url,
            "on_primary": self.active == 0,
            "primary_healthy": self.primary_healthy,
            "failovers": self.failovers,
            "restorations": self.restorations,
            "recycled_connections": self.recycled,
            "dropped_connections": self.dropped,
            "last_transition": None
            if last is None
            else {
                "event": last.event,
                "from": self._targets[last.source].safe_url,
                "to": self._targets[last.target].safe_url,
                "reason": last.reason,
                "seconds_ago": round(now - last.at, 3),
            },
            "targets": [
                {
                    "url": t.safe_url,
                    "role": "primary" if i == 0 else "alternate",
                    "healthy": t.healthy,
                    "error": t.error,
                    "latency_ms": None if t.latency is None else round(t.latency * 1000, 3),
                    "checked_seconds_ago": None
                    if t.checked_at is None
                    else round(now - t.checked_at, 3),
                    "connections_opened": t.connections,
                    "connect_failures": t.connect_failures,
                }
                for i, t in enumerate(self._targets)
            ],
        }
