"""Failover under load: the primary behind a TCP proxy is lost, then comes back.

The primary is the module's private PostgreSQL behind a :class:`FaultProxy`; the alternate
is a fresh database on the shared server. A steady load asks which server answered each
request (``current_setting('port')``); each test prints its measured figures.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_dbpool import get_session
from fastapi_dbpool.embedded import EmbeddedPostgres
from fastapi_dbpool.engines import connect_args
from fastapi_dbpool.failover import FailoverConnector, TargetCheck
from tests.faults.harness import p99
from tests.helpers.apps import client_for, make_app, settings_for
from tests.helpers.proxy import FaultProxy

pytestmark = pytest.mark.faults

CONNECT_TIMEOUT = 1.0
CHECKOUT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 1.0
GRACE = 0.5
INTERVAL = 0.5
RECOVERY = 2.0
# The longest any request may take: a statement's client-side deadline, or a checkout
# wait plus a connect to the primary and one to the alternate, plus a scheduling margin.
REQUEST_DEADLINE = max(COMMAND_TIMEOUT + GRACE, CHECKOUT_TIMEOUT + 2 * CONNECT_TIMEOUT) + 0.5


@dataclass(frozen=True, slots=True)
class Served:
    started: float
    ended: float
    status: int  # 0: the client saw an exception
    port: int | None


@dataclass
class PortLoad:
    """``clients`` concurrent loops GETting /port back to back until stopped."""

    client: httpx.AsyncClient
    clients: int = 10
    outcomes: list[Served] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*self._tasks)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = await self.client.get("/port", timeout=30)
                status = response.status_code
                port = response.json()["port"] if status == 200 else None
            except httpx.HTTPError:
                status, port = 0, None
            self.outcomes.append(Served(started, time.monotonic(), status, port))
            await asyncio.sleep(0.005)

    async def until(
        self, predicate: Callable[[list[Served]], bool], timeout: float, what: str
    ) -> float:
        """Wait until ``predicate(outcomes)`` holds; return the seconds it took."""
        start = time.monotonic()
        while not predicate(self.outcomes):
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what}: not within {timeout}s")
            await asyncio.sleep(0.01)
        return time.monotonic() - start


def streak(port: int, after: float, length: int = 30) -> Callable[[list[Served]], bool]:
    """The last ``length`` requests started after ``after`` were all served by ``port``."""

    def check(outcomes: list[Served]) -> bool:
        recent = [o for o in outcomes if o.started >= after][-length:]
        return len(recent) == length and all(o.port == port for o in recent)

    return check


def first_from(port: int, after: float) -> Callable[[list[Served]], bool]:
    return lambda outcomes: any(o.port == port and o.started >= after for o in outcomes)


def fault_app(primary: str, alternate: str) -> FastAPI:
    settings = settings_for(
        primary,
        failover_urls=(alternate,),
        pool_size=5,
        connect_timeout=CONNECT_TIMEOUT,
        checkout_timeout=CHECKOUT_TIMEOUT,
        command_timeout=COMMAND_TIMEOUT,
        client_timeout_grace=GRACE,
        circuit_failure_threshold=3,
        circuit_recovery_timeout=RECOVERY,
        health_check_interval=INTERVAL,
        application_name=f"fo-fault-{uuid.uuid4().hex[:8]}",
    )
    app = make_app(settings)

    @app.get("/port")
    async def port(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        value = await session.execute(text("SELECT current_setting('port')::int"))
        return {"port": value.scalar_one()}

    return app


@asynccontextmanager
async def proxied(server: EmbeddedPostgres) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy("127.0.0.1", server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        proxy.passthrough()
        await proxy.stop()


async def failover_state(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/health/database")
    state: dict[str, Any] = response.json()["databases"]["primary"]["failover"]
    return state


def figures(title: str, **values: object) -> None:
    parts = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"\n[failover figures] {title}: {parts}")


async def test_asyncpg_connect_timeout_spans_every_host(
    private_pg: EmbeddedPostgres, database_url: str
) -> None:
    """What the driver does not cover: a black-holed first host takes the whole timeout,
    so asyncpg never tries the next one. The connector gives each target its own deadline
    and skips a target the probe found down."""
    alternate = make_url(database_url)
    async with proxied(private_pg) as proxy:
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncpg.connect(
                host=["127.0.0.1", str(alternate.host)],
                port=[proxy.port, int(alternate.port or 5432)],
                user="postgres",
                database="postgres",
                timeout=CONNECT_TIMEOUT,
            )
        multi_host = time.monotonic() - started

        primary = make_url(proxy.url_for(private_pg.url()))
        settings = settings_for(str(primary), connect_timeout=CONNECT_TIMEOUT)
        connector = FailoverConnector("primary", primary, (alternate,), connect_args(settings))
        timings = []
        for _ in range(3):
            started = time.monotonic()
            conn = await connector()
            timings.append(time.monotonic() - started)
            try:
                assert await conn.fetchval("SELECT current_setting('port')::int") == alternate.port
            finally:
                await conn.close()
        # What the probe knows: the primary is down, the alternate up.
        connector.update([TargetCheck(False, "TimeoutError"), TargetCheck(True)])
        started = time.monotonic()
        conn = await connector()
        told = time.monotonic() - started
        await conn.close()

    figures(
        "black-holed first host",
        asyncpg_multi_host=multi_host,
        connector_first=timings[0],
        connector_next=max(timings[1:]),
        connector_after_probe=told,
    )
    assert multi_host >= CONNECT_TIMEOUT * 0.9
    # The first connect pays the primary's deadline once, then fails over...
    assert CONNECT_TIMEOUT * 0.9 <= timings[0] <= CONNECT_TIMEOUT + 1.0
    assert connector.failovers == 1
    # ...and later ones go straight to the alternate.
    assert max(timings[1:]) < CONNECT_TIMEOUT / 2
    assert told < CONNECT_TIMEOUT / 2


async def test_primary_crash_under_load_moves_to_alternate_and_back(
    private_pg: EmbeddedPostgres, database_url: str
) -> None:
    alternate_port = make_url(database_url).port
    async with proxied(private_pg) as proxy:
        app = fault_app(proxy.url_for(private_pg.url()), database_url)
        async with client_for(app) as client:
            load = PortLoad(client)
            load.start()
            await load.until(streak(private_pg.port, 0.0), 10, "warm traffic on the primary")

            # The primary dies: open connections are reset, new ones refused.
            t_fault = time.monotonic()
            proxy.refuse()
            proxy.reset_all()
            first_alt = await load.until(first_from(alternate_port, t_fault), 5, "first on alt")
            all_alt = await load.until(streak(alternate_port, t_fault), 5, "all on alternate")
            t_settled = time.monotonic()
            during = [o for o in load.outcomes if o.ended >= t_fault and o.started < t_settled]
            failed = [o for o in during if o.status != 200]

            # It comes back: traffic returns within about one probe interval, no failures.
            t_back = time.monotonic()
            proxy.passthrough()
            first_primary = await load.until(
                first_from(private_pg.port, t_back), INTERVAL * 1.1 + 1.5, "first on primary"
            )
            all_primary = await load.until(
                streak(private_pg.port, t_back), INTERVAL * 1.1 + 2.5, "all on primary"
            )
            await load.stop()
            state = await failover_state(client)

    restoring = [o for o in load.outcomes if o.ended >= t_back]
    figures(
        "primary crash under load",
        requests_during_failover=len(during),
        failed_during_failover=len(failed),
        statuses={o.status for o in failed},
        first_on_alternate=first_alt,
        all_on_alternate=first_alt + all_alt,
        first_back_on_primary=first_primary,
        all_back_on_primary=first_primary + all_primary,
        failed_during_restoration=sum(o.status != 200 for o in restoring),
        longest_request=max(o.ended - o.started for o in load.outcomes),
    )
    # At most the requests in flight on the reset connections fail.
    assert len(failed) <= 5 + 2, failed
    assert sum(o.status != 200 for o in restoring) == 0
    assert (state["failovers"], state["restorations"]) == (1, 1)
    assert state["on_primary"] is True


async def test_black_holed_primary_under_load(
    private_pg: EmbeddedPostgres, database_url: str
) -> None:
    alternate_port = make_url(database_url).port
    async with proxied(private_pg) as proxy:
        app = fault_app(proxy.url_for(private_pg.url()), database_url)
        async with client_for(app) as client:
            load = PortLoad(client)
            load.start()
            await load.until(streak(private_pg.port, 0.0), 10, "warm traffic on the primary")

            t_fault = time.monotonic()
            proxy.blackhole()
            first_alt = await load.until(first_from(alternate_port, t_fault), 5, "first on alt")
            all_alt = await load.until(streak(alternate_port, t_fault), 10, "all on alternate")
            t_settled = time.monotonic()
            during = [o for o in load.outcomes if o.ended >= t_fault and o.started < t_settled]
            failed = [o for o in during if o.status != 200]

            t_back = time.monotonic()
            proxy.passthrough()
            first_primary = await load.until(
                first_from(private_pg.port, t_back), INTERVAL * 1.1 + 1.5, "first on primary"
            )
            await load.until(streak(private_pg.port, t_back), INTERVAL * 1.1 + 2.5, "all back")
            await load.stop()
            state = await failover_state(client)

    durations = [o.ended - o.started for o in load.outcomes]
    figures(
        "black-holed primary under load",
        requests_during_failover=len(during),
        failed_during_failover=len(failed),
        statuses=sorted({o.status for o in failed}),
        first_on_alternate=first_alt,
        all_on_alternate=first_alt + all_alt,
        p99_failure_ms=p99([o.ended - o.started for o in failed]) * 1000,
        first_back_on_primary=first_primary,
        longest_request=max(durations),
    )
    assert max(durations) <= REQUEST_DEADLINE, max(durations)
    assert all(o.status in (503, 504) for o in failed), failed
    assert state["failovers"] == 1
    assert state["on_primary"] is True
