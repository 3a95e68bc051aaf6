"""The circuit breaker state machine, one per database. Time comes in as an argument.

CLOSED counts consecutive connection-level failures; ``failure_threshold`` of them open
it. OPEN refuses every call until ``recovery_timeout`` has passed, then HALF_OPEN lets up
to ``half_open_max_calls`` calls through: one success closes the breaker, one failure
opens it again for another ``recovery_timeout``. Only failures that say the database
cannot be used count (see :func:`is_connection_failure`), never the application's own
SQL errors.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

import asyncpg

logger = logging.getLogger("fastapi_dbpool")


class BreakerState(enum.Enum):
    """States of a circuit breaker; values are the contract's label values."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: SQLSTATEs that mean "this server cannot serve us now", not "your SQL is wrong".
CONNECTION_SQLSTATES = frozenset(
    {
        "53300",  # too_many_connections
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "25006",  # read_only_sql_transaction: a demoted primary after failover
        "08000",  # connection_exception
        "08003",  # connection_does_not_exist
        "08006",  # connection_failure
        "08001",  # sqlclient_unable_to_establish_sqlconnection
        "08004",  # sqlserver_rejected_establishment_of_sqlconnection
    }
)


def is_connection_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the database itself is unusable."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        seen += 1
        if isinstance(current, OSError | TimeoutError):
            return True
        if isinstance(current, asyncpg.exceptions.ConnectionDoesNotExistError):
            return True
        if isinstance(current, asyncpg.exceptions.InterfaceError) and "connection" in str(current):
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate in CONNECTION_SQLSTATES:
            return True
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and orig is not current:
            current = orig
            continue
        current = current.__cause__ or current.__context__
    return False


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a bounded half-open trial.

    Args:
        name: The database's name, for logs.
        failure_threshold: Consecutive failures that open the breaker.
        recovery_timeout: Seconds the breaker stays open before a trial.
        half_open_max_calls: Calls let through while half-open.
        clock: Monotonic clock; tests pass a fake one.
        on_transition: Called with (old, new) on every state change.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        recovery_timeout: float,
        half_open_max_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if recovery_timeout <= 0:
            raise ValueError("recovery_timeout must be greater than 0")
        if half_open_max_calls < 1:
            raise ValueError("half_open_max_calls must be at least 1")
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.half_open_max_calls = half_open_max_calls
        self.clock = clock
        self.on_transition = on_transition
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_calls = 0
        self.transitions: dict[tuple[str, str], int] = {}
        self.rejected = 0

    @property
    def is_closed(self) -> bool:
        """Fast check for the hot path."""
        return self.state is BreakerState.CLOSED

    def allow(self, now: float | None = None) -> bool:
        """Whether a call may go to the database now (counts half-open trials)."""
        if self.state is BreakerState.CLOSED:
            return True
        now = self.clock() if now is None else now
        if self.state is BreakerState.OPEN:
            assert self.opened_at is not None
            if now - self.opened_at < self.recovery_timeout:
                self.rejected += 1
                return False
            self._move(BreakerState.HALF_OPEN)
            self.trial_calls = 0
        if self.trial_calls < self.half_open_max_calls:
            self.trial_calls += 1
            return True
        self.rejected += 1
        return False

    def retry_after(self, now: float | None = None) -> float:
        """Seconds until the breaker lets a trial call through (0 when closed)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        if self.state is BreakerState.HALF_OPEN or self.opened_at is None:
            return 1.0
        now = self.clock() if now is None else now
        return max(0.0, self.opened_at + self.recovery_timeout - now)

    def record_success(self, now: float | None = None) -> None:
        """A call (or probe) reached the database and came back.

        While OPEN a success is stale news (a call that began before the breaker
        opened): only a half-open trial may close the breaker.
        """
        if self.state is BreakerState.OPEN:
            return
        self.failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self.opened_at = None
            self._move(BreakerState.CLOSED)

    def record_failure(self, now: float | None = None) -> None:
        """A call (or probe) failed at the connection level."""
        now = self.clock() if now is None else now
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failures >= self.failure_threshold
        ):
            self.opened_at = now
            self._move(BreakerState.OPEN)
        elif self.state is BreakerState.OPEN:
            # Still failing while open (e.g. the probe): restart the wait.
            self.opened_at = now

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        """The breaker as JSON-able data for /health/database."""
        return {
            "state": self.state.value,
            "consecutive_failures": self.failures,
            "failure_threshold": self.failure_threshold,
            "retry_after": round(self.retry_after(now), 3),
            "rejected_calls": self.rejected,
        }

    def _move(self, new: BreakerState) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        key = (old.value, new.value)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        log = logger.warning if new is BreakerState.OPEN else logger.info
        log(
            "circuit breaker of the %s database: %s -> %s",
            self.name,
            old.value,
            new.value,
            extra={
                "database": self.name,
                "breaker_from": old.value,
                "breaker_to": new.value,
                "consecutive_failures": self.failures,
            },
        )
        if self.on_transition is not None:
            self.on_transition(old, new)
