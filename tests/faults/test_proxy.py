"""The fault-injection proxy really does what each mode says (asyncpg through the proxy)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.helpers import wait_until
from tests.helpers.pg import asyncpg_dsn, count_app_connections
from tests.helpers.proxy import FaultProxy

pytestmark = pytest.mark.faults

# Errors asyncpg raises when the connection under a query goes away.
CONNECTION_ERRORS = (ConnectionError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


@pytest.fixture
async def proxy(admin_url: str) -> AsyncIterator[FaultProxy]:
    url = make_url(admin_url)
    assert url.host is not None and url.port is not None
    proxy = FaultProxy(url.host, url.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
def proxied_dsn(proxy: FaultProxy, admin_url: str) -> str:
    return asyncpg_dsn(proxy.url_for(admin_url))


async def connect(dsn: str, *, timeout: float = 5.0, app: str = "dbpool-proxy-test") -> Any:
    return await asyncpg.connect(dsn, timeout=timeout, server_settings={"application_name": app})


async def assert_service(dsn: str) -> None:
    """A new connection through the proxy works."""
    conn = await connect(dsn)
    try:
        assert await conn.fetchval("SELECT 41 + 1", timeout=5) == 42
    finally:
        await conn.close(timeout=5)


async def round_trip(conn: Any) -> float:
    started = time.monotonic()
    assert await conn.fetchval("SELECT 1", timeout=5) == 1
    return time.monotonic() - started


async def test_passthrough_forwards_and_counts_connections(
    proxy: FaultProxy, proxied_dsn: str
) -> None:
    assert proxy.mode == "passthrough"
    conn = await connect(proxied_dsn)
    try:
        assert await conn.fetchval("SELECT current_setting('application_name')") == (
            "dbpool-proxy-test"
        )
        assert proxy.connections_accepted == 1
        assert proxy.connections_open == 1
    finally:
        await conn.close(timeout=5)
    await wait_until(lambda: proxy.connections_open == 0, 2.0, message="the proxy to see the close")
    assert proxy.connections_accepted == 1


async def test_url_for_rewrites_only_host_and_port(proxy: FaultProxy) -> None:
    url = proxy.url_for("postgresql+asyncpg://app:s3cret@db.example:5432/orders?ssl=disable")
    assert url == f"postgresql+asyncpg://app:s3cret@127.0.0.1:{proxy.port}/orders?ssl=disable"


async def test_refuse_refuses_new_connects_quickly_and_keeps_open_ones(
    proxy: FaultProxy, proxied_dsn: str
) -> None:
    survivor = await connect(proxied_dsn)
    try:
        proxy.refuse()
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            await connect(proxied_dsn, timeout=5.0)
        assert time.monotonic() - started < 1.0
        assert await survivor.fetchval("SELECT 1", timeout=5) == 1

        port = proxy.port
        proxy.passthrough()
        assert proxy.port == port
        await assert_service(proxied_dsn)
    finally:
        await survivor.close(timeout=5)


async def test_blackhole_swallows_queries_and_connects_until_passthrough(
    proxy: FaultProxy, proxied_dsn: str
) -> None:
    conn = await connect(proxied_dsn)
    try:
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1", timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 2.0

        accepted = proxy.connections_accepted
        with pytest.raises(TimeoutError):
            await connect(proxied_dsn, timeout=0.5)
        assert proxy.connections_accepted > accepted  # accepted, never answered

        proxy.passthrough()
        await assert_service(proxied_dsn)
    finally:
        conn.terminate()


async def test_reset_all_kills_open_connections_on_both_sides(
    proxy: FaultProxy, proxied_dsn: str, admin_url: str
) -> None:
    app = "dbpool-proxy-reset"
    conns = [await connect(proxied_dsn, app=app) for _ in range(2)]
    try:
        assert await count_app_connections(admin_url, app) == 2
        proxy.reset_all()
        for conn in conns:
            with pytest.raises(CONNECTION_ERRORS):
                await conn.fetchval("SELECT 1", timeout=2)
        await wait_until(lambda: proxy.connections_open == 0, 2.0, message="proxy connections gone")
        # PostgreSQL got the RST too: its backends end.
        await wait_until(
            lambda: _count_is(admin_url, app, 0), 5.0, message="server backends to end"
        )
        assert proxy.mode == "passthrough"
        await assert_service(proxied_dsn)
    finally:
        for conn in conns:
            conn.terminate()


async def test_reset_all_sends_a_tcp_reset_not_a_fin(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        await wait_until(lambda: proxy.connections_open == 1, 2.0, message="the proxy to accept")
        proxy.reset_all()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 2.0)
    finally:
        writer.close()


async def _count_is(admin_url: str, app: str, expected: int) -> bool:
    return await count_app_connections(admin_url, app) == expected


async def test_delay_adds_latency_each_way_until_passthrough(
    proxy: FaultProxy, proxied_dsn: str
) -> None:
    conn = await connect(proxied_dsn)
    try:
        baseline = min([await round_trip(conn) for _ in range(5)])
        proxy.delay(0.1)
        delayed = await round_trip(conn)
        assert delayed >= baseline + 0.1
        assert delayed >= 0.2  # one chunk each way
        proxy.passthrough()
        restored = min([await round_trip(conn) for _ in range(3)])
        assert restored < 0.1
    finally:
        await conn.close(timeout=5)


async def test_stop_resets_connections_and_stops_listening(admin_url: str) -> None:
    url = make_url(admin_url)
    assert url.host is not None and url.port is not None
    proxy = FaultProxy(url.host, url.port)
    await proxy.start()
    dsn = asyncpg_dsn(proxy.url_for(admin_url))
    conn = await connect(dsn)
    try:
        await proxy.stop()
        assert proxy.connections_open == 0
        with pytest.raises(CONNECTION_ERRORS):
            await conn.fetchval("SELECT 1", timeout=2)
        with pytest.raises(ConnectionRefusedError):
            await connect(dsn, timeout=2)
    finally:
        conn.terminate()
