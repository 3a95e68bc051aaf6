"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from fastapi_dbpool.breaker import BreakerState, CircuitBreaker, is_connection_failure


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    threshold: int = 3, recovery: float = 10.0, trials: int = 1
) -> tuple[CircuitBreaker, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    moves: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        "primary",
        failure_threshold=threshold,
        recovery_timeout=recovery,
        half_open_max_calls=trials,
        clock=clock,
        on_transition=lambda old, new: moves.append((old.value, new.value)),
    )
    return breaker, clock, moves


def test_opens_after_threshold_consecutive_failures_only() -> None:
    breaker, _, moves = make(threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # not consecutive any more
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert moves == [("closed", "open")]


def test_open_rejects_until_recovery_timeout_then_lets_one_trial_through() -> None:
    breaker, clock, moves = make(threshold=1, recovery=10.0)
    breaker.record_failure()
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(10.0)
    clock.now += 9.5
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(0.5)
    clock.now += 0.5
    assert breaker.allow()  # the trial
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one trial at a time
    assert breaker.rejected == 3
    assert moves == [("closed", "open"), ("open", "half_open")]


def test_trial_success_closes_and_failure_reopens_for_a_full_wait() -> None:
    breaker, clock, moves = make(threshold=1, recovery=5.0, trials=2)
    breaker.record_failure()
    clock.now += 5.0
    assert breaker.allow() and breaker.allow() and not breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == pytest.approx(5.0)
    clock.now += 5.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failures == 0
    assert breaker.allow()
    assert moves == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert breaker.transitions[("open", "half_open")] == 2


def test_failure_while_open_restarts_the_wait() -> None:
    breaker, clock, _ = make(threshold=1, recovery=10.0)
    breaker.record_failure()
    clock.now += 8
    breaker.record_failure()
    assert breaker.retry_after() == pytest.approx(10.0)


def test_snapshot_reports_state_and_retry_after() -> None:
    breaker, clock, _ = make(threshold=2, recovery=4.0)
    breaker.record_failure()
    assert breaker.snapshot()["state"] == "closed"
    assert breaker.snapshot()["consecutive_failures"] == 1
    breaker.record_failure()
    clock.now += 1
    snap = breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["retry_after"] == pytest.approx(3.0)


@pytest.mark.parametrize("bad", [{"threshold": 0}, {"recovery": 0.0}, {"trials": 0}])
def test_invalid_configuration_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make(**bad)  # type: ignore[arg-type]


def _pg_error(cls: type[asyncpg.PostgresError]) -> asyncpg.PostgresError:
    return cls("boom")


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError(), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), True),
        (_pg_error(asyncpg.exceptions.TooManyConnectionsError), True),
        (_pg_error(asyncpg.exceptions.AdminShutdownError), True),
        (_pg_error(asyncpg.exceptions.CannotConnectNowError), True),
        (_pg_error(asyncpg.exceptions.ReadOnlySQLTransactionError), True),
        (_pg_error(asyncpg.exceptions.PostgresSyntaxError), False),
        (_pg_error(asyncpg.exceptions.UniqueViolationError), False),
        (_pg_error(asyncpg.exceptions.QueryCanceledError), False),
        (ValueError("app bug"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_only_connection_level_failures_count(error: BaseException, counts: bool) -> None:
    assert is_connection_failure(error) is counts
    # Also when SQLAlchemy wraps it.
    wrapped = sa_exc.DBAPIError("SELECT 1", None, error)  # type: ignore[arg-type]
    assert is_connection_failure(wrapped) is counts


def test_late_success_from_before_the_opening_does_not_close_it() -> None:
    breaker, _clock, _ = make(threshold=1, recovery=10.0)
    breaker.record_failure()
    breaker.record_success()  # a request that started before the failure, finishing now
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
