"""PostgreSQL helpers for the test rig: URL conversions and small admin operations.

URLs handed to tests are SQLAlchemy URLs (``postgresql+asyncpg://...``); asyncpg wants a plain
``postgresql://`` DSN, see :func:`asyncpg_dsn`. Every helper here opens its own short-lived
asyncpg connection, so it is safe to call from any event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from sqlalchemy.engine import URL, make_url

if TYPE_CHECKING:
    from fastapi_dbpool.embedded import EmbeddedPostgres

__all__ = [
    "ADMIN_APPLICATION_NAME",
    "TEMPLATE_DATABASE",
    "PgServer",
    "asyncpg_dsn",
    "count_app_connections",
    "create_database",
    "drop_database",
    "ensure_template_database",
    "quote_ident",
    "run_in_new_loop",
    "sqlalchemy_url",
    "with_database",
]

TEMPLATE_DATABASE = "dbpool_template"
"""Name of the empty template every per-test database is cloned from."""

ADMIN_APPLICATION_NAME = "dbpool-test-admin"
"""``application_name`` of the rig's own admin connections."""

T = TypeVar("T")


@dataclass(frozen=True)
class PgServer:
    """The PostgreSQL server shared by the whole test session.

    Attributes:
        admin_url: SQLAlchemy URL (``postgresql+asyncpg``) of the maintenance database.
        embedded: The embedded server when the rig started one, ``None`` when the server
            comes from ``DBPOOL_TEST_DATABASE_URL`` (never stop or kill it then).
    """

    admin_url: str
    embedded: EmbeddedPostgres | None


def sqlalchemy_url(url: str | URL, driver: str = "postgresql+asyncpg") -> str:
    """Return ``url`` with its scheme replaced by ``driver``, password kept."""
    return make_url(url).set(drivername=driver).render_as_string(hide_password=False)


def asyncpg_dsn(url: str | URL) -> str:
    """Return a ``postgresql://`` DSN for asyncpg from a SQLAlchemy or libpq URL."""
    return sqlalchemy_url(url, driver="postgresql")


def with_database(url: str | URL, database: str) -> str:
    """Return ``url`` pointing at another database (scheme and password kept)."""
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def quote_ident(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


async def _admin_connect(url: str | URL, connect_timeout: float = 10.0) -> Any:
    return await asyncpg.connect(
        asyncpg_dsn(url),
        timeout=connect_timeout,
        server_settings={"application_name": ADMIN_APPLICATION_NAME},
    )


async def statement_active(url: str | URL, application_name: str, needle: str) -> bool:
    """Whether a backend named ``application_name`` is running a statement containing ``needle``."""
    rows = await app_backends(url, application_name)
    return any(needle in (r["query"] or "") and r["state"] == "active" for r in rows)


async def app_backends(url: str | URL, application_name: str) -> list[Any]:
    """The ``state`` and ``query`` of the server's backends named ``application_name``.

    The connection used to ask is not included.
    """
    conn = await _admin_connect(url)
    try:
        return list(
            await conn.fetch(
                "SELECT state, query FROM pg_stat_activity "
                "WHERE application_name = $1 AND pid <> pg_backend_pid()",
                application_name,
            )
        )
    finally:
        await conn.close()


async def count_app_connections(admin_url: str | URL, application_name: str) -> int:
    """Count the server's backends whose ``application_name`` is ``application_name``.

    The connection used to ask is not counted.

    Args:
        admin_url: Any URL of the server (typically the ``admin_url`` fixture).
        application_name: The ``application_name`` to look for.

    Returns:
        The number of matching rows of ``pg_stat_activity``.
    """
    conn = await _admin_connect(admin_url)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid()",
            application_name,
        )
    finally:
        await conn.close()
    return int(count)


async def create_database(admin_url: str | URL, name: str, *, template: str | None = None) -> None:
    """``CREATE DATABASE name [TEMPLATE template]``."""
    sql = f"CREATE DATABASE {quote_ident(name)}"
    if template is not None:
        sql += f" TEMPLATE {quote_ident(template)}"
    conn = await _admin_connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def drop_database(admin_url: str | URL, name: str) -> None:
    """``DROP DATABASE IF EXISTS name WITH (FORCE)`` (terminates leftover sessions)."""
    conn = await _admin_connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


async def ensure_template_database(admin_url: str | URL, name: str = TEMPLATE_DATABASE) -> str:
    """Create the empty template database unless it exists; return its name.

    The template refuses connections (``ALLOW_CONNECTIONS false``) so that nothing can
    connect to it and block ``CREATE DATABASE ... TEMPLATE``.
    """
    conn = await _admin_connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Another test session may create it concurrently.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
        await conn.execute(
            f"ALTER DATABASE {quote_ident(name)} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
        )
    finally:
        await conn.close()
    return name


def run_in_new_loop(func: Callable[[], Awaitable[T]]) -> T:
    """Run ``func()`` to completion in a fresh event loop on a separate thread.

    For synchronous (for example session-scoped) fixtures: it never touches the event loop
    pytest-asyncio manages for the tests.
    """
    results: list[T] = []
    errors: list[BaseException] = []

    async def main() -> T:
        return await func()

    def target() -> None:
        try:
            results.append(asyncio.run(main()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="dbpool-test-admin")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]
