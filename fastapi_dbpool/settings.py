"""DBPoolSettings: every setting, its default, its environment variable and its validation.

Settings come from the environment (:meth:`DBPoolSettings.from_env`, names exactly as in
the contract) or are passed programmatically; either way they are validated at once and
a bad value raises :class:`~fastapi_dbpool.errors.ConfigurationError` naming the
environment variable and the value, with any password masked.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError

_ACCEPTED_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg", "postgres+asyncpg"}
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^\s]*@")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def mask_url(text: str) -> str:
    """Hide the password of any ``scheme://user:password@`` URL inside ``text``."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***@", text)


def _mask_unparsable(text: str) -> str:
    """Mask text that is not a URL: hide what lies between the user's ':' and the last '@'."""
    head, at, tail = text.rpartition("@")
    if not at:
        return text
    slashes = head.find("//")
    colon = head.find(":", 0 if slashes < 0 else slashes + 2)
    return text if colon < 0 else f"{head[: colon + 1]}***@{tail}"


def safe_url(url: URL | str) -> str:
    """A URL rendered for logs and responses: password masked, query string dropped."""
    if isinstance(url, str):
        text = url
        try:
            url = make_url(text)
        except (ArgumentError, ValueError):
            return _mask_unparsable(mask_url(text))
    if url.host and "@" in url.host:
        # An unencoded "@" in the password: the parser took part of it for the host.
        return _mask_unparsable(url.set(query={}).render_as_string(hide_password=False))
    return url.set(query={}).render_as_string(hide_password=True)


def normalize_url(value: str, env: str) -> URL:
    """Parse a PostgreSQL URL and switch it to the asyncpg driver.

    Raises:
        ConfigurationError: The URL cannot be parsed or is not a PostgreSQL URL.
    """
    masked = mask_url(value)
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        shown = _mask_unparsable(masked)
        raise ConfigurationError(f"{env} is not a valid database URL: {shown!r}") from None
    if url.drivername not in _ACCEPTED_SCHEMES:
        raise ConfigurationError(
            f"{env} must be a postgresql:// or postgresql+asyncpg:// URL, got {masked!r}"
        )
    if not url.host and "host" not in url.query:
        raise ConfigurationError(f"{env} has no host: {masked!r}")
    if url.host and "@" in url.host:
        raise ConfigurationError(
            f"{env} has an '@' in its password: percent-encode it as %40, got {masked!r}"
        )
    query = dict(url.query)
    if "sslmode" in query and "ssl" not in query:
        query["ssl"] = query.pop("sslmode")  # libpq's name; asyncpg takes the same modes
    return url.set(drivername="postgresql+asyncpg", query=query)


@dataclass(frozen=True, slots=True)
class _Spec:
    env: str
    parse: Callable[[str], Any]


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected true/false, 1/0, yes/no or on/off")


def _parse_urls(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _setting(
    default: Any, env: str, parse: Callable[[str], Any], doc: str, *, secret: bool = False
) -> Any:
    # URL fields carry passwords: keep them out of repr(), which ends up in logs and
    # error trackers.
    return field(default=default, repr=not secret, metadata={"spec": _Spec(env, parse), "doc": doc})


@dataclass(frozen=True)
class DBPoolSettings:
    """Settings of fastapi_dbpool; each field documents its environment variable.

    Raises:
        ConfigurationError: At construction, for any invalid value.
    """

    database_url: str | None = _setting(
        None, "DATABASE_URL", str, "primary database URL", secret=True
    )
    """Primary database. ``postgresql+asyncpg://``, ``postgresql://`` or ``postgres://``."""

    replica_url: str | None = _setting(
        None, "DATABASE_REPLICA_URL", str, "read replica URL", secret=True
    )
    """Optional read replica, reached as the database named ``replica``."""

    failover_urls: tuple[str, ...] = _setting(
        (),
        "DATABASE_FAILOVER_URLS",
        _parse_urls,
        "comma-separated alternates for the primary",
        secret=True,
    )
    """Alternates for the primary, tried in order when it is unreachable."""

    pod_count: int = _setting(1, "POD_COUNT", int, "pods sharing the database")
    """Pods that share the database: use the HPA maximum."""

    web_concurrency: int = _setting(1, "WEB_CONCURRENCY", int, "worker processes per pod")
    """Worker processes per pod (uvicorn/gunicorn workers)."""

    rollout_surge: str = _setting(
        "0", "DB_ROLLOUT_SURGE", str, "extra pods during a rolling update: count or percent"
    )
    """Extra pods that run during a rolling update (``maxSurge``): ``"1"`` or ``"25%"``."""

    max_connections: int | None = _setting(
        None, "DB_MAX_CONNECTIONS", int, "connections the service may use on the server"
    )
    """Connections the whole service may use on the server; default: what the server
    allows ordinary roles (``max_connections`` minus both reserved settings)."""

    strict_budget: bool = _setting(
        False, "DB_STRICT_BUDGET", _parse_bool, "oversubscription stops startup"
    )
    """When true, explicit pool sizes that oversubscribe the budget stop startup."""

    pool_size: int | None = _setting(None, "DB_POOL_SIZE", int, "explicit pool size")
    """Explicit per-process pool size; default derived from the budget."""

    max_overflow: int | None = _setting(None, "DB_MAX_OVERFLOW", int, "explicit overflow")
    """Explicit per-process overflow; default derived from the budget (0)."""

    pool_size_cap: int = _setting(20, "DB_POOL_SIZE_CAP", int, "largest derived pool per process")
    """Largest pool a process derives from its share of the budget: one event-loop process
    rarely keeps more than ~20 connections busy, and a pool that takes a large server's
    whole share opens many connections that only sit idle. Explicit DB_POOL_SIZE wins."""

    max_waiting: int | None = _setting(
        None, "DB_MAX_WAITING", int, "requests that may wait for a connection at once"
    )
    """Requests that may wait for a pooled connection at once; one more is answered 503 at
    once instead of joining a queue it cannot get through in DB_CHECKOUT_TIMEOUT. Default:
    20 x (pool_size + max_overflow). Under a burst of thousands, an unbounded queue costs
    memory and garbage-collection time until nothing is served in time."""

    connect_timeout: float = _setting(5.0, "DB_CONNECT_TIMEOUT", float, "seconds to connect")
    """Seconds to open one connection, TCP and authentication included."""

    checkout_timeout: float = _setting(
        5.0, "DB_CHECKOUT_TIMEOUT", float, "seconds to wait for a pooled connection"
    )
    """Seconds a request waits for a pooled connection before answering 503."""

    command_timeout: float = _setting(
        30.0, "DB_COMMAND_TIMEOUT", float, "statement timeout (server-enforced)"
    )
    """Default statement timeout in seconds, enforced by PostgreSQL
    (``statement_timeout``); the client gives up ``client_timeout_grace`` later."""

    lock_timeout: float = _setting(10.0, "DB_LOCK_TIMEOUT", float, "lock wait timeout")
    """Seconds a statement may wait for a lock, enforced by PostgreSQL (``lock_timeout``)."""

    idle_in_transaction_timeout: float = _setting(
        60.0,
        "DB_IDLE_IN_TRANSACTION_TIMEOUT",
        float,
        "server closes sessions idle in a transaction this long",
    )
    """PostgreSQL's ``idle_in_transaction_session_timeout``: a backstop for a transaction
    left open by a stuck or leaked holder."""

    client_timeout_grace: float = _setting(
        2.0, "DB_CLIENT_TIMEOUT_GRACE", float, "client-side margin over the statement timeout"
    )
    """Seconds the client waits past the server's statement timeout before it gives up on
    its own: the deadline that still holds when the network stops answering."""

    application_name: str = _setting(
        "fastapi-dbpool", "DB_APPLICATION_NAME", str, "application_name of every connection"
    )
    """PostgreSQL ``application_name`` of every connection (count them in
    ``pg_stat_activity``)."""

    pool_recycle: float = _setting(1800.0, "DB_POOL_RECYCLE", float, "connection max age")
    """Seconds after which a connection is replaced when next checked out."""

    pool_pre_ping: bool = _setting(True, "DB_POOL_PRE_PING", _parse_bool, "validate idle")
    """Validate a connection before use when it sat idle longer than
    ``pre_ping_idle`` (HikariCP's rule), instead of on every checkout."""

    pre_ping_idle: float = _setting(
        0.5, "DB_PRE_PING_IDLE", float, "idle seconds after which a connection is validated"
    )
    """Idle seconds after which a connection is validated before use."""

    pool_overflow_idle: float = _setting(
        30.0,
        "DB_POOL_OVERFLOW_IDLE",
        float,
        "idle seconds after which a connection beyond pool_size is closed",
    )
    """Seconds a connection beyond ``pool_size`` (an overflow connection) may sit idle
    before it is closed. SQLAlchemy's queue pool closes one as soon as it comes back while
    ``pool_size`` others are idle, which under steady load closes and reopens connections
    many times a second; keeping it until it has been idle this long lets a pool under
    load use its whole capacity."""

    warm_pool: bool = _setting(True, "DB_WARM_POOL", _parse_bool, "open pool_size at startup")
    """Open ``pool_size`` connections at startup, so the first requests pay no connect."""

    autocommit: bool = _setting(False, "DB_AUTOCOMMIT", _parse_bool, "commit on success")
    """Commit the request's session before a response with status < 400 is sent; a failed
    commit becomes an error response. Off: uncommitted work is rolled back."""

    leak_threshold: float = _setting(
        30.0, "DB_LEAK_THRESHOLD", float, "seconds a non-request checkout may be held"
    )
    """Seconds a connection checked out outside any request may be held before it is
    reported as leaked."""

    leak_track_stack: bool = _setting(
        False, "DB_LEAK_TRACK_STACK", _parse_bool, "record where sessions were taken"
    )
    """Record the stack where each session or connection was taken (costs a few µs)."""

    leak_reclaim_after: float = _setting(
        60.0, "DB_LEAK_RECLAIM_AFTER", float, "seconds after which a leaked connection is reclaimed"
    )
    """Seconds after which a connection leaked by a completed request is invalidated, so
    the pool gets its capacity back (the holder gets an error on its next use)."""

    leak_reclaim_unowned: bool = _setting(
        False,
        "DB_LEAK_RECLAIM_UNOWNED",
        _parse_bool,
        "also reclaim connections held too long outside requests",
    )
    """Also reclaim connections held past DB_LEAK_RECLAIM_AFTER outside any request. Off by
    default: a job or migration may hold one connection for a long time on purpose, and
    closing it under them would abort their work."""

    circuit_failure_threshold: int = _setting(
        5, "DB_CIRCUIT_FAILURE_THRESHOLD", int, "consecutive failures that open the breaker"
    )
    """Consecutive connection-level failures that open the circuit breaker."""

    circuit_recovery_timeout: float = _setting(
        10.0, "DB_CIRCUIT_RECOVERY_TIMEOUT", float, "seconds the breaker stays open"
    )
    """Seconds the breaker stays open before it lets a probe through."""

    health_check_interval: float = _setting(
        5.0, "DB_HEALTH_CHECK_INTERVAL", float, "seconds between background probes"
    )
    """Seconds between background database probes (jittered ±10%)."""

    readiness_requires_database: bool = _setting(
        True,
        "DB_READINESS_REQUIRES_DATABASE",
        _parse_bool,
        "readiness fails while the primary is unavailable",
    )
    """When false, /health/database stays 200 (status ``degraded``) while the database is
    unavailable, and requests fail fast with 503 instead: for services whose pods all share
    one database, where failing readiness everywhere only turns 503s into refused
    connections."""

    health_details: bool = _setting(
        False, "DB_HEALTH_DETAILS", _parse_bool, "show server version and host in health"
    )
    """Show the server version and the (password-free) host in /health/database."""

    shutdown_delay: float = _setting(
        0.0, "DB_SHUTDOWN_DELAY", float, "seconds to report draining before shutting down"
    )
    """Seconds between SIGTERM and the server's own shutdown, during which
    /health/database answers 503 ``draining`` while requests are still served, so
    Kubernetes takes the pod out of its endpoints before it stops accepting connections
    (what a ``preStop: sleep`` hook does, without needing a shell in the image). 0: off."""

    drain_timeout: float = _setting(
        20.0, "DB_DRAIN_TIMEOUT", float, "seconds in-flight requests get at shutdown"
    )
    """Seconds requests in flight may take to finish once shutdown has begun."""

    otel: str = _setting(
        "auto", "DB_OTEL", lambda t: t.strip().lower(), "OpenTelemetry: auto, on or off"
    )
    """OpenTelemetry metrics and spans: ``auto`` (on when an SDK's global MeterProvider or
    TracerProvider is configured at startup), ``on`` (always, through the global providers)
    or ``off``. See docs/opentelemetry.md."""

    http_metrics: bool = _setting(True, "DB_HTTP_METRICS", _parse_bool, "instrumentator on")
    """Expose prometheus-fastapi-instrumentator's HTTP metrics on ``/metrics``."""

    liveness_port: int | None = _setting(
        None, "DB_LIVENESS_PORT", int, "port of the liveness probe answered off the event loop"
    )
    """Serve ``GET /health/live`` on this port from a small process of its own, answered
    from the event loop's heartbeat: fast however busy the loop is, 503 once the loop has not run
    for ``DB_LIVENESS_MAX_LAG`` seconds. Unset: off (the app's own ``/health/live`` route
    is there either way). 0 picks a free port (tests). See docs/health-and-kubernetes.md."""

    liveness_host: str = _setting(
        "0.0.0.0", "DB_LIVENESS_HOST", str, "address the liveness port listens on"
    )
    """Address the liveness port listens on (the kubelet probes the pod's IP)."""

    liveness_max_lag: float = _setting(
        10.0, "DB_LIVENESS_MAX_LAG", float, "event-loop lag that fails the liveness probe"
    )
    """Seconds the event loop may go without running before the liveness port answers 503
    (a blocking call or a deadlock). Under the benchmark's burst of 10,000 requests every
    probe answered 200 with the default; a lower value risks restarting busy pods."""

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> DBPoolSettings:
        """Read the settings from environment variables.

        Args:
            environ: The environment to read; default ``os.environ``.
            **overrides: Field values that win over the environment.

        Raises:
            ConfigurationError: A variable cannot be parsed or is out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            spec: _Spec = f.metadata["spec"]
            raw = env.get(spec.env)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[f.name] = spec.parse(raw.strip())
            except ValueError as exc:
                raise ConfigurationError(
                    f"{spec.env} has an invalid value {mask_url(raw)!r}: {_reason(exc)}"
                ) from None
        values.update(overrides)
        return cls(**values)

    def urls(self) -> dict[str, URL]:
        """The normalized URL of each named database (``primary``, ``replica``)."""
        result: dict[str, URL] = {}
        if self.database_url:
            result["primary"] = normalize_url(self.database_url, "DATABASE_URL")
        if self.replica_url:
            result["replica"] = normalize_url(self.replica_url, "DATABASE_REPLICA_URL")
        return result

    def failover(self) -> tuple[URL, ...]:
        """The normalized failover URLs of the primary, in order."""
        return tuple(normalize_url(u, "DATABASE_FAILOVER_URLS") for u in self.failover_urls)

    def surge(self) -> int:
        """Extra pods during a rollout, resolved against ``pod_count``."""
        from .sizing import surge_pods

        return surge_pods(self.pod_count, self.rollout_surge)


def env_name(field_name: str) -> str:
    """The environment variable of a settings field."""
    for f in dataclasses.fields(DBPoolSettings):
        if f.name == field_name:
            spec: _Spec = f.metadata["spec"]
            return spec.env
    raise KeyError(field_name)


def _reason(exc: ValueError) -> str:
    text = str(exc)
    if text.startswith("invalid literal") or text.startswith("could not convert"):
        return "not a number"
    return text


def _fail(name: str, value: object, rule: str) -> ConfigurationError:
    shown = mask_url(value) if isinstance(value, str) else value
    return ConfigurationError(f"{env_name(name)} ({name}) {rule}, got {shown!r}")


def _validate(s: DBPoolSettings) -> None:
    for name in ("pod_count", "web_concurrency"):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(name, value, "must be a whole number of at least 1")
    for name in ("max_connections", "pool_size", "pool_size_cap", "max_waiting"):
        value = getattr(s, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise _fail(name, value, "must be a whole number of at least 1")
    if s.max_overflow is not None and (not isinstance(s.max_overflow, int) or s.max_overflow < 0):
        raise _fail("max_overflow", s.max_overflow, "must be a whole number of at least 0")
    if not isinstance(s.shutdown_delay, int | float) or not 0 <= s.shutdown_delay < math.inf:
        raise _fail("shutdown_delay", s.shutdown_delay, "must be a number of seconds, 0 or more")
    if s.liveness_port is not None and (
        not isinstance(s.liveness_port, int)
        or isinstance(s.liveness_port, bool)
        or not 0 <= s.liveness_port <= 65535
    ):
        raise _fail("liveness_port", s.liveness_port, "must be a port number, 0 to 65535")
    if not s.liveness_host:
        raise _fail("liveness_host", s.liveness_host, "must be an address to listen on")
    if s.otel not in ("auto", "on", "off"):
        raise _fail("otel", s.otel, "must be auto, on or off")
    if s.circuit_failure_threshold < 1:
        raise _fail("circuit_failure_threshold", s.circuit_failure_threshold, "must be at least 1")
    for name in (
        "connect_timeout",
        "checkout_timeout",
        "command_timeout",
        "lock_timeout",
        "idle_in_transaction_timeout",
        "client_timeout_grace",
        "pool_recycle",
        "pre_ping_idle",
        "pool_overflow_idle",
        "leak_threshold",
        "leak_reclaim_after",
        "circuit_recovery_timeout",
        "health_check_interval",
        "drain_timeout",
        "liveness_max_lag",
    ):
        value = getattr(s, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise _fail(name, value, "must be a number of seconds greater than 0")
    name_bytes = s.application_name.encode("utf-8", "replace")
    if not s.application_name or len(name_bytes) > 63 or not s.application_name.isprintable():
        raise _fail("application_name", s.application_name, "must be 1 to 63 printable characters")
    try:
        surge = s.surge()
    except ValueError:
        raise _fail(
            "rollout_surge", s.rollout_surge, "must be a pod count or a percentage"
        ) from None
    if surge < 0:
        raise _fail("rollout_surge", s.rollout_surge, "must not be negative")
    # Parse the URLs now so a bad one stops startup with the variable's name.
    s.urls()
    s.failover()
