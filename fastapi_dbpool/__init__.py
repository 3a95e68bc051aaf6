"""fastapi_dbpool: pod-sized, deadline-bound, observable PostgreSQL pools for FastAPI."""

from . import testing
from .drivers import DriverConnection, driver_connection
from .errors import (
    CheckoutTimeoutError,
    CircuitOpenError,
    ConcurrentSessionUseError,
    ConfigurationError,
    DatabaseUnavailableError,
    DBPoolError,
    DeadlineExceededError,
    DriverReleasedError,
    NotInstalledError,
    ReadOnlySessionError,
)
from .health import router
from .lifespan import get_runtime, install, lifespan
from .middleware import DBPoolMiddleware
from .runtime import DBPoolRuntime
from .sessions import (
    RequestSession,
    SessionFactory,
    get_session,
    session,
    session_factory,
    session_factory_for,
)
from .settings import DBPoolSettings
from .sizing import PoolBudget, ServerLimits, plan_pool

__all__ = [
    "CheckoutTimeoutError",
    "CircuitOpenError",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DBPoolError",
    "DBPoolMiddleware",
    "DBPoolRuntime",
    "DBPoolSettings",
    "DatabaseUnavailableError",
    "DeadlineExceededError",
    "DriverConnection",
    "DriverReleasedError",
    "NotInstalledError",
    "PoolBudget",
    "ReadOnlySessionError",
    "RequestSession",
    "ServerLimits",
    "SessionFactory",
    "driver_connection",
    "get_runtime",
    "get_session",
    "install",
    "lifespan",
    "plan_pool",
    "router",
    "session",
    "session_factory",
    "session_factory_for",
    "testing",
]
