"""What a client sees when the database fails: status, readable detail, headers.

Details are fixed sentences: never the exception's text, which may carry a URL, a
password or SQL parameters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import asyncpg
from sqlalchemy import exc as sa_exc

from .errors import DatabaseUnavailableError, DeadlineExceededError

_CONNECTION_LOST = (
    OSError,
    ConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # A write reached a demoted primary after failover: retry once connections move.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    # The driver lost track of the protocol: the connection is broken, not the request.
    asyncpg.exceptions.InternalClientError,
)


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """A mapped database failure."""

    status: int
    detail: str
    retry_after: float | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """ASGI headers of the response."""
        body_len = str(len(self.body())).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", body_len)]
        if self.retry_after is not None:
            seconds = max(1, math.ceil(self.retry_after))
            headers.append((b"retry-after", str(seconds).encode()))
        return headers

    def body(self) -> bytes:
        """The JSON body: ``{"detail": ...}``."""
        return json.dumps({"detail": self.detail}).encode()


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 8:
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            # A fan-out (asyncio.TaskGroup, anyio) wraps its tasks' failures.
            current = current.exceptions[0]
            continue
        seen.append(current)
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and orig not in seen:
            seen.append(orig)
        current = current.__cause__ or current.__context__
    return seen


def map_exception(exc: BaseException, *, checkout_timeout: float) -> ErrorResponse | None:
    """The response for a database failure, or None when ``exc`` is not one.

    Args:
        exc: The exception that escaped the application.
        checkout_timeout: ``DB_CHECKOUT_TIMEOUT``, for the pool-exhausted Retry-After.
    """
    for err in _chain(exc):
        if isinstance(err, DatabaseUnavailableError):
            return ErrorResponse(503, _unavailable_detail(err), err.retry_after)
        if isinstance(err, DeadlineExceededError):
            return ErrorResponse(504, str(err))
        if isinstance(err, sa_exc.TimeoutError):
            return ErrorResponse(
                503,
                "the service is busy: no database connection became free in time",
                checkout_timeout,
            )
        if isinstance(err, asyncpg.exceptions.QueryCanceledError):
            return ErrorResponse(504, "the database statement exceeded its time limit")
        if isinstance(err, asyncpg.exceptions.LockNotAvailableError):
            return ErrorResponse(504, "the database statement timed out waiting for a lock")
        if isinstance(err, _CONNECTION_LOST) or (
            isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated
        ):
            return ErrorResponse(503, "the database is unavailable", 1.0)
    return None


def _unavailable_detail(err: DatabaseUnavailableError) -> str:
    from .errors import CheckoutTimeoutError, CircuitOpenError

    if isinstance(err, CircuitOpenError):
        return f"the {err.database} database is unavailable; retry later"
    if isinstance(err, CheckoutTimeoutError):
        return "the service is busy: no database connection became free in time"
    return f"the {err.database} database is unavailable"
