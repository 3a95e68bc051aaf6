"""One error tree for everything fastapi_dbpool raises.

Runtime errors that stand for a database being unavailable subclass SQLAlchemy's
``OperationalError`` family where that helps existing handlers, but every error here
also derives from :class:`DBPoolError`, so ``except dbpool.DBPoolError`` catches all.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc


class DBPoolError(Exception):
    """Base class of every error raised by fastapi_dbpool."""


class ConfigurationError(DBPoolError, ValueError):
    """A setting is missing or invalid; raised at startup, naming the setting."""


class NotInstalledError(DBPoolError, RuntimeError):
    """A required part of the wiring (lifespan or middleware) is missing."""


class DatabaseUnavailableError(DBPoolError):
    """The database cannot be used right now; the client should retry later (503).

    Attributes:
        database: Name of the database (``"primary"``, ``"replica"``, ...).
        retry_after: Seconds the client should wait before retrying.
    """

    status_code = 503

    def __init__(self, message: str, *, database: str, retry_after: float) -> None:
        super().__init__(message)
        self.database = database
        self.retry_after = retry_after


class CheckoutTimeoutError(DatabaseUnavailableError, sa_exc.TimeoutError):
    """No pooled connection became free within ``DB_CHECKOUT_TIMEOUT``.

    Also a ``sqlalchemy.exc.TimeoutError``, so handlers written for SQLAlchemy's
    "QueuePool limit ... reached" keep working.
    """


class CircuitOpenError(DatabaseUnavailableError):
    """The circuit breaker of the database is open; the call was not attempted."""


class DeadlineExceededError(DBPoolError):
    """A statement or the request's database deadline ran out (504).

    Attributes:
        database: Name of the database.
        timeout: The deadline that ran out, in seconds, when known.
    """

    status_code = 504

    def __init__(self, message: str, *, database: str, timeout: float | None = None) -> None:
        super().__init__(message)
        self.database = database
        self.timeout = timeout


class ConcurrentSessionUseError(DBPoolError, RuntimeError):
    """The request's session was used by two tasks at once."""


class DriverReleasedError(DBPoolError, RuntimeError):
    """A ``driver_connection`` was used after its request gave it back to the pool."""


class ReadOnlySessionError(DBPoolError, RuntimeError):
    """A write was attempted through a ``read_only=True`` session."""
