"""SIGTERM with requests in flight, against a real uvicorn process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from tests.faults.harness import report
from tests.helpers import wait_until
from tests.helpers.apps import free_port
from tests.helpers.pg import count_app_connections

pytestmark = pytest.mark.faults


@asynccontextmanager
async def uvicorn_process(
    database_url: str, application_name: str, **env: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "tests.faults.drain_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        "20",
        env={
            **os.environ,
            "DATABASE_URL": database_url,
            "DB_APPLICATION_NAME": application_name,
            "DB_POOL_SIZE": "5",
            "DB_CHECKOUT_TIMEOUT": "10",
            **env,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:

            async def live() -> bool:
                try:
                    return (await client.get("/health/live")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(live, 30, interval=0.05, message="uvicorn did not start")
        yield process, base
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_finishes_requests_in_flight_and_leaves_no_connection(
    database_url: str, admin_url: str
) -> None:
    name = "dbpool-drain"
    async with uvicorn_process(database_url, name) as (process, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            in_flight = [
                asyncio.create_task(client.get("/slow", params={"seconds": 1.5})) for _ in range(10)
            ]
            # Five run (the pool's size), five wait for a connection.
            await wait_until(
                lambda: _active_sleeps(admin_url, name, 5), 10, message="queries running"
            )
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*in_flight)
        code = await asyncio.wait_for(process.wait(), 30)
        exited = time.monotonic() - sent
        output = await _output(process)
    left = await count_app_connections(admin_url, name)
    report("sigterm", in_flight=len(responses), exit_after=exited, connections_left=left)
    assert [r.status_code for r in responses] == [200] * 10
    # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly.
    assert code in (0, -signal.SIGTERM), output
    assert "Traceback" not in output and "ERROR" not in output, output
    assert left == 0


async def test_shutdown_delay_reports_draining_while_still_serving(
    database_url: str, admin_url: str
) -> None:
    name = "dbpool-drain-delay"
    async with uvicorn_process(database_url, name, DB_SHUTDOWN_DELAY="1.0") as (process, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            before = await client.get("/health/database")
            in_flight = asyncio.create_task(client.get("/slow", params={"seconds": 1.2}))
            await wait_until(lambda: _active_sleeps(admin_url, name, 1), 10)
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                response = await client.get("/health/database")
                return response.status_code == 503 and response.json()["status"] == "draining"

            await wait_until(draining, 0.5, message="readiness did not turn 503 draining")
            turned = time.monotonic() - sent
            # Still serving new requests while draining.
            served = await client.get("/slow", params={"seconds": 0.01})
            slow = await in_flight
        code = await asyncio.wait_for(process.wait(), 30)
        exited = time.monotonic() - sent
        output = await _output(process)
    left = await count_app_connections(admin_url, name)
    report("shutdown delay", draining_after=turned, exit_after=exited, connections_left=left)
    assert before.status_code == 200
    assert served.status_code == 200
    assert slow.status_code == 200
    assert exited >= 1.0
    # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly.
    assert code in (0, -signal.SIGTERM), output
    assert "Traceback" not in output and "ERROR" not in output, output
    assert left == 0


async def _output(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    return (await process.stdout.read()).decode(errors="replace")


async def _active_sleeps(admin_url: str, application_name: str, at_least: int) -> bool:
    import asyncpg

    from tests.helpers.pg import asyncpg_dsn

    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND state = 'active' AND query LIKE '%pg_sleep%'",
            application_name,
        )
        return bool(n >= at_least)
    finally:
        await conn.close()
