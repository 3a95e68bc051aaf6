"""When the database fails: fail fast, report truthfully, heal without a restart.

A TCP proxy sits between the app and a private PostgreSQL that these tests may also stop
and start. Each test runs a steady concurrent load and prints its measured figures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool
from fastapi_dbpool import get_session
from fastapi_dbpool.embedded import EmbeddedPostgres
from tests.faults.harness import Load, Outcome, p99, report
from tests.helpers.apps import client_for, make_app, settings_for
from tests.helpers.proxy import FaultProxy

pytestmark = pytest.mark.faults

CONNECT_TIMEOUT = 1.0
CHECKOUT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 1.0
GRACE = 0.5
RECOVERY = 2.0
INTERVAL = 1.0
# The longest a request may take while the database is black-holed: a statement's
# client-side deadline, or a connect's, plus a margin for scheduling on a loaded machine.
REQUEST_DEADLINE = max(COMMAND_TIMEOUT + GRACE, CONNECT_TIMEOUT + CHECKOUT_TIMEOUT) + 0.5


def fault_settings(url: str, **overrides: Any) -> dbpool.DBPoolSettings:
    values: dict[str, Any] = {
        "pool_size": 5,
        "connect_timeout": CONNECT_TIMEOUT,
        "checkout_timeout": CHECKOUT_TIMEOUT,
        "command_timeout": COMMAND_TIMEOUT,
        "client_timeout_grace": GRACE,
        "circuit_failure_threshold": 3,
        "circuit_recovery_timeout": RECOVERY,
        "health_check_interval": INTERVAL,
        "application_name": "dbpool-fault",
    }
    values.update(overrides)
    return settings_for(url, **values)


def fault_app(url: str, **overrides: Any) -> FastAPI:
    app = make_app(fault_settings(url, **overrides))

    @app.get("/q")
    async def q(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        return {"v": (await session.execute(text("SELECT 1"))).scalar_one()}

    return app


@asynccontextmanager
async def proxied(private_pg: EmbeddedPostgres) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy("127.0.0.1", private_pg.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        proxy.passthrough()
        await proxy.stop()


async def readiness(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await client.get("/health/database")
    return response.status_code, response.json()


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


def assert_503s_are_clean(outcomes: list[Outcome]) -> None:
    for o in failures(outcomes):
        assert o.status in (503, 504), o
        assert o.content_type == "application/json", o
        if o.status == 503:
            assert o.retry_after is not None and int(o.retry_after) >= 1, o


async def test_black_hole_fails_fast_and_recovers(private_pg: EmbeddedPostgres) -> None:
    async with proxied(private_pg) as proxy:
        app = fault_app(proxy.url_for(private_pg.url()))
        async with client_for(app) as client:
            load = Load(client, clients=10)
            load.start()
            await load.wait_for(lambda o: len(o) >= 50, 10, "warm traffic")

            proxy.blackhole()
            t_fault = time.monotonic()
            first_503 = await load.wait_for(
                lambda o: any(x.status == 503 and x.started >= t_fault for x in o),
                REQUEST_DEADLINE + 2,
                "first 503",
            )
            # Readiness turns 503 within one probe interval plus the probe's timeout.
            t_unready = None
            deadline = time.monotonic() + INTERVAL + CONNECT_TIMEOUT + 1.5
            while time.monotonic() < deadline:
                code, body = await readiness(client)
                if code == 503:
                    t_unready = time.monotonic()
                    assert body["status"] == "unavailable"
                    break
                await asyncio.sleep(0.02)
            assert t_unready is not None, "readiness never turned 503"
            open_at = await load.wait_for(
                lambda o: (
                    dbpool.get_runtime(app).databases["primary"].breaker.state.value == "open"
                ),
                REQUEST_DEADLINE * 3,
                "breaker open",
            )
            # While open: failures are fast.
            await load.wait_for(
                lambda o: len([x for x in o if x.started > open_at + 0.1]) >= 100,
                5,
                "traffic while open",
            )
            during_open = [x for x in load.since(open_at + 0.1) if x.ended < time.monotonic()]

            proxy.passthrough()
            t_back = time.monotonic()
            recovered = await load.wait_for(
                lambda o: (
                    sum(1 for x in o if x.started > t_back and x.status == 200) >= 20
                    and all(x.status == 200 for x in o[-10:])
                ),
                RECOVERY + INTERVAL + REQUEST_DEADLINE + 2,
                "recovery",
            )
            await load.stop()
            code, body = await readiness(client)

    outcomes_in_fault = [x for x in load.outcomes if t_fault <= x.started < t_back]
    open_failures = [x.duration for x in during_open if x.status == 503]
    report(
        "black hole",
        time_to_first_503=first_503 - t_fault,
        time_to_unready=t_unready - t_fault,
        time_to_breaker_open=open_at - t_fault,
        p99_failure_while_open_ms=p99(open_failures) * 1000,
        recovery_after_restore=recovered - t_back,
        longest_request=max(x.duration for x in outcomes_in_fault),
        requests_during_fault=len(outcomes_in_fault),
    )
    assert first_503 - t_fault <= REQUEST_DEADLINE + 0.5
    assert t_unready - t_fault <= INTERVAL + CONNECT_TIMEOUT + 1.5
    assert all(x.duration <= REQUEST_DEADLINE for x in outcomes_in_fault), max(
        x.duration for x in outcomes_in_fault
    )
    assert len(open_failures) >= 50
    assert p99(open_failures) < 0.010
    assert_503s_are_clean(load.outcomes)
    assert recovered - t_back <= RECOVERY + INTERVAL + REQUEST_DEADLINE
    assert code == 200 and body["status"] == "ok"


async def test_refused_connections_open_the_breaker(private_pg: EmbeddedPostgres) -> None:
    async with proxied(private_pg) as proxy:
        app = fault_app(proxy.url_for(private_pg.url()))
        async with client_for(app) as client:
            load = Load(client, clients=10)
            load.start()
            await load.wait_for(lambda o: len(o) >= 50, 10, "warm traffic")
            proxy.refuse()
            proxy.reset_all()  # the database is gone: open connections die too
            t_fault = time.monotonic()
            open_at = await load.wait_for(
                lambda o: (
                    dbpool.get_runtime(app).databases["primary"].breaker.state.value == "open"
                ),
                5,
                "breaker open",
            )
            await load.wait_for(
                lambda o: len([x for x in o if x.started > open_at + 0.1]) >= 100,
                5,
                "traffic while open",
            )
            code, body = await readiness(client)
            proxy.passthrough()
            t_back = time.monotonic()
            recovered = await load.wait_for(
                lambda o: (
                    all(x.status == 200 for x in o[-10:])
                    and any(x.started > t_back and x.status == 200 for x in o)
                ),
                RECOVERY + INTERVAL + 3,
                "recovery",
            )
            await load.stop()
    during_open = [x for x in load.since(open_at + 0.1) if x.started < t_back]
    report(
        "refused",
        time_to_breaker_open=open_at - t_fault,
        failures_before_open=len([x for x in failures(load.since(t_fault)) if x.started < open_at]),
        p99_failure_while_open_ms=p99([x.duration for x in during_open]) * 1000,
        recovery_after_restore=recovered - t_back,
    )
    assert open_at - t_fault < 2.0
    assert code == 503 and body["databases"]["primary"]["circuit_breaker"]["state"] in (
        "open",
        "half_open",
    )
    assert all(x.status == 503 for x in during_open)
    assert p99([x.duration for x in during_open]) < 0.010
    assert_503s_are_clean(load.outcomes)
    assert recovered - t_back <= RECOVERY + INTERVAL + 3


async def test_all_connections_reset_costs_only_requests_in_flight(
    private_pg: EmbeddedPostgres,
) -> None:
    clients = 10
    async with proxied(private_pg) as proxy:
        app = fault_app(proxy.url_for(private_pg.url()))
        async with client_for(app) as client:
            load = Load(client, clients=clients)
            load.start()
            await load.wait_for(lambda o: len(o) >= 100, 10, "warm traffic")
            t_fault = time.monotonic()
            proxy.reset_all()
            await load.wait_for(
                lambda o: sum(1 for x in o if x.started > t_fault and x.status == 200) >= 200,
                10,
                "traffic after the reset",
            )
            await load.stop()
            breaker = dbpool.get_runtime(app).databases["primary"].breaker.state.value
    after = load.since(t_fault - 0.5)
    failed = failures(after)
    report("reset all", failed_requests=len(failed), requests_after=len(after))
    # At most the requests that were on the old connections (one per client, plus one per
    # pooled connection that had not yet been seen to be dead), never a burst.
    assert len(failed) <= clients + 5
    assert breaker == "closed"
    assert_503s_are_clean(after)


async def test_database_restart_heals_without_an_app_restart(
    private_pg: EmbeddedPostgres,
) -> None:
    app = fault_app(private_pg.url())
    async with client_for(app) as client:
        load = Load(client, clients=5)
        load.start()
        await load.wait_for(lambda o: len(o) >= 50, 10, "warm traffic")
        t_fault = time.monotonic()
        private_pg.stop(mode="fast")
        t_down = time.monotonic()
        await load.wait_for(
            lambda o: sum(1 for x in o if x.started > t_down and x.status == 503) >= 20,
            10,
            "503s while down",
        )
        private_pg.start()
        t_back = time.monotonic()
        recovered = await load.wait_for(
            lambda o: (
                all(x.status == 200 for x in o[-10:])
                and sum(1 for x in o if x.started > t_back and x.status == 200) >= 10
            ),
            RECOVERY + INTERVAL + REQUEST_DEADLINE + 3,
            "recovery",
        )
        await load.stop()
        code, _body = await readiness(client)
    during = [x for x in load.outcomes if t_fault <= x.started < t_back]
    report(
        "restart",
        failures_while_down=len(failures(during)),
        recovery_after_start=recovered - t_back,
        p99_while_down_ms=p99([x.duration for x in during]) * 1000,
    )
    assert_503s_are_clean(load.outcomes)
    assert recovered - t_back <= RECOVERY + INTERVAL + REQUEST_DEADLINE + 3
    assert code == 200
