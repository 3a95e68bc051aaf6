"""Helpers for users' own test suites."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from starlette.applications import Starlette

from .leaks import LeakReport
from .lifespan import get_runtime


@asynccontextmanager
async def assert_no_leaks(
    app: Starlette, *, settle_timeout: float = 5.0
) -> AsyncIterator[list[LeakReport]]:
    """Fail when a request made inside the block leaked a connection.

    Usage, with the app's lifespan running (e.g. under ``asgi_lifespan.LifespanManager``)::

        async with dbpool.testing.assert_no_leaks(app):
            await client.get("/items")

    On exit it waits (up to ``settle_timeout``) for requests still in flight to complete,
    scans for connections held too long outside requests, and raises AssertionError
    listing every leak reported meanwhile: kind, route, request id, task and stack.

    Args:
        app: The application under test.
        settle_timeout: Seconds to wait for requests in flight to complete.

    Raises:
        AssertionError: A leak was reported inside the block.
    """
    runtime = get_runtime(app)
    found: list[LeakReport] = []
    with runtime.leaks.listen(found.append):
        yield found
        with suppress(TimeoutError):
            await asyncio.wait_for(runtime.wait_idle(), settle_timeout)
        runtime.leaks.scan(list(runtime.databases.values()))
    if found:
        lines = [f"{len(found)} database connection leak(s):"]
        for report in found:
            lines.append(f"- {report.kind} on {report.database}: {report.describe()}")
            lines.extend(f"    {frame}" for frame in report.stack)
        raise AssertionError("\n".join(lines))
