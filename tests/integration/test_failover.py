"""Failover to DATABASE_FAILOVER_URLS against real PostgreSQL servers.

Each test runs a primary and an alternate (separate servers; the alternate is a fresh
database on the shared server) and asks the app which server answered
(``current_setting('port')``). Timing is checked by polling with explicit deadlines.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_dbpool import get_runtime, get_session
from fastapi_dbpool.embedded import EmbeddedPostgres
from fastapi_dbpool.engines import build_databases
from fastapi_dbpool.failover import FAILOVER, RESTORATION, FailoverConnector, TargetCheck
from fastapi_dbpool.sessions import RequestSession
from tests.helpers import wait_until
from tests.helpers.apps import client_for, free_port, make_app, settings_for
from tests.helpers.pg import asyncpg_dsn

INTERVAL = 0.5
SECRET = "s3cr3t-failover-pw"

SETUP = "CREATE TABLE IF NOT EXISTS writes (port int NOT NULL)"


def with_password(url: str) -> str:
    """The URL with a password (trust authentication ignores it; logs must never show it)."""
    return make_url(url).set(password=SECRET).render_as_string(hide_password=False)


def failover_app(primary: str, alternate: str, app_name: str, **overrides: Any) -> FastAPI:
    values: dict[str, Any] = {
        "failover_urls": (with_password(alternate),),
        "health_check_interval": INTERVAL,
        "connect_timeout": 1.0,
        "circuit_failure_threshold": 5,
        "application_name": app_name,
        "autocommit": True,
    }
    values.update(overrides)
    app = make_app(settings_for(with_password(primary), **values))

    @app.get("/port")
    async def port(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        value = await session.execute(text("SELECT current_setting('port')::int"))
        return {"port": value.scalar_one()}

    @app.post("/write")
    async def write(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        value = await session.execute(
            text("INSERT INTO writes VALUES (current_setting('port')::int) RETURNING port")
        )
        return {"port": value.scalar_one()}

    return app


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll ``check`` until it holds; return the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def served_by(client: httpx.AsyncClient, path: str = "/port") -> int | None:
    """The port of the server that answered, or None when the request failed."""
    method = client.post if path == "/write" else client.get
    try:
        response = await method(path)
    except DBAPIError:
        # A write on a demoted server (25006) is not mapped to an HTTP status yet, and the
        # in-process transport re-raises it.
        return None
    return response.json()["port"] if response.status_code == 200 else None


async def failover_state(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/health/database")
    state: dict[str, Any] = response.json()["databases"]["primary"]["failover"]
    return state


async def app_connections(url: str, app_name: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        return count
    finally:
        await conn.close()


async def execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def failover_records(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "failover_event", None) == kind]


def assert_no_secret(caplog: pytest.LogCaptureFixture, *bodies: str) -> None:
    for body in bodies:
        assert SECRET not in body
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(vars(record))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_transitions_on_a_fake_clock(caplog: pytest.LogCaptureFixture) -> None:
    """The state machine alone: who becomes active, what is counted and logged (once)."""
    caplog.set_level(logging.INFO, logger="fastapi_dbpool")
    urls = [
        make_url(f"postgresql+asyncpg://app:{SECRET}@db-{i}:5432/app?sslmode=require")
        for i in range(3)
    ]
    clock = FakeClock()
    connector = FailoverConnector("primary", urls[0], (urls[1], urls[2]), {}, clock=clock)
    up, down, read_only = (
        TargetCheck(True),
        TargetCheck(False, "TimeoutError"),
        TargetCheck(False, "read_only"),
    )

    def moves() -> list[tuple[str, int]]:
        return [
            (vars(r)["failover_event"], r.levelno)
            for r in caplog.records
            if "failover_event" in vars(r)
        ]

    connector.update([up, up, up])
    assert (connector.active, moves()) == (0, [])

    # The primary stops answering: the first healthy alternate, logged once.
    connector.update([down, up, up])
    connector.update([down, up, up])
    assert connector.active == 1
    assert moves() == [(FAILOVER, logging.WARNING)]

    # The active alternate fails too: the next one. It stays while it works, even when
    # the first alternate is back (no churn between alternates).
    connector.update([down, read_only, up])
    connector.update([down, up, up])
    assert (connector.active, connector.failovers) == (2, 2)

    # The primary is back: restoration, logged once.
    clock.now += 7.5
    connector.update([up, up, up])
    connector.update([up, up, up])
    assert (connector.active, connector.restorations) == (0, 1)
    assert moves() == [
        (FAILOVER, logging.WARNING),
        (FAILOVER, logging.WARNING),
        (RESTORATION, logging.INFO),
    ]

    # Everything down: nowhere better to go, so no transition (the probe reports it).
    connector.update([down, down, down])
    assert (connector.active, connector.usable, connector.failovers) == (0, False, 2)

    clock.now += 2.0
    state = connector.snapshot()
    assert state["last_transition"] == {
        "event": RESTORATION,
        "from": "postgresql+asyncpg://app:***@db-2:5432/app",
        "to": "postgresql+asyncpg://app:***@db-0:5432/app",
        "reason": "primary is up and writable",
        "seconds_ago": 2.0,
    }
    assert [t["url"] for t in state["targets"]] == [
        f"postgresql+asyncpg://app:***@db-{i}:5432/app" for i in range(3)
    ]
    assert_no_secret(caplog, repr(state))
    with pytest.raises(ValueError, match="expected 3 checks"):
        connector.update([up])


async def test_primary_engine_is_wired_to_the_connector(database_url: str) -> None:
    primary = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"
    settings = settings_for(primary, failover_urls=(database_url,), warm_pool=False)
    databases = await build_databases(settings, RequestSession)
    try:
        connector = databases["primary"].failover
        assert connector is not None
        assert connector.attached, (
            "engines.py must call FailoverConnector.attach(engine) for the primary: without "
            "it, pooled connections stay on the old target after a failover or restoration"
        )
    finally:
        await databases["primary"].dispose()


async def test_asyncpg_multi_host_skips_refused_and_read_only_hosts(
    database_url: str, embedded_pg_factory: Callable[..., EmbeddedPostgres]
) -> None:
    """What the driver does for us: next host on refusal, and on a read-only server."""
    read_only = embedded_pg_factory(extra_settings={"default_transaction_read_only": "on"})
    good = make_url(database_url)
    refused = free_port()
    hosts = ["127.0.0.1", "127.0.0.1", str(good.host)]
    ports = [refused, read_only.port, int(good.port or 5432)]

    # One user and one database name for every host: a host lacking them ends the search.
    conn = await asyncpg.connect(
        host=hosts,
        port=ports,
        user=good.username,
        database="postgres",
        timeout=2,
        target_session_attrs="read-write",
    )
    try:
        assert await conn.fetchval("SELECT current_setting('port')::int") == good.port
    finally:
        await conn.close()

    # Without a writable host, asyncpg refuses to hand out a read-only session.
    with pytest.raises(asyncpg.exceptions.TargetServerAttributeNotMatched):
        await asyncpg.connect(
            read_only.url(driver="postgresql"), timeout=2, target_session_attrs="read-write"
        )


async def test_primary_down_at_startup_then_restored(
    database_url: str,
    embedded_pg_factory: Callable[..., EmbeddedPostgres],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_dbpool")
    app_name = f"fo-{uuid.uuid4().hex[:8]}"
    primary_port = free_port()  # nothing listens: connections are refused
    primary_url = f"postgresql+asyncpg://postgres@127.0.0.1:{primary_port}/postgres"
    alternate_port = make_url(database_url).port

    async with client_for(failover_app(primary_url, database_url, app_name)) as client:
        assert await served_by(client) == alternate_port
        health = await client.get("/health/database")
        assert health.status_code == 200, health.text
        state = health.json()["databases"]["primary"]["failover"]
        assert state["on_primary"] is False
        assert state["primary_healthy"] is False
        assert state["failovers"] == 1
        assert state["active"] == make_url(database_url).set(password="***").render_as_string()
        assert [t["role"] for t in state["targets"]] == ["primary", "alternate"]
        assert state["targets"][0]["error"] == "ConnectionRefusedError"

        # The primary comes up on its port: traffic returns within about one interval.
        await asyncio.to_thread(embedded_pg_factory, port=primary_port)

        async def on_primary() -> bool:
            return await served_by(client) == primary_port

        restored = await until(on_primary, INTERVAL * 1.1 + 1.0, "traffic back on the primary")
        for _ in range(20):
            assert await served_by(client) == primary_port

        # The pool's connections to the alternate are closed; the probe keeps its own one.
        async def alternate_released() -> bool:
            return await app_connections(database_url, app_name) <= 1

        released = await until(alternate_released, 2.0, "alternate connections closed")
        state = await failover_state(client)
        assert state["on_primary"] is True
        assert (state["failovers"], state["restorations"]) == (1, 1)
        assert state["last_transition"]["event"] == "restoration"
        body = (await client.get("/health/database")).text

    print(
        f"\n[failover figures] primary down at startup: first response from the primary "
        f"{restored:.3f}s after it accepted connections (interval {INTERVAL}s); pool's "
        f"alternate connections closed {released:.3f}s after that"
    )
    # One record per transition, with structured fields; no password anywhere.
    (failover,) = failover_records(caplog, "failover")
    (restoration,) = failover_records(caplog, "restoration")
    assert failover.levelno == logging.WARNING
    assert restoration.levelno == logging.INFO
    assert vars(failover)["failover_to"] == state["targets"][1]["url"]
    assert vars(restoration)["failover_to"] == state["targets"][0]["url"]
    assert_no_secret(caplog, body)


async def test_demoted_primary_is_left_and_promoted_one_restored(
    database_url: str,
    embedded_pg_factory: Callable[..., EmbeddedPostgres],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_dbpool")
    app_name = f"fo-{uuid.uuid4().hex[:8]}"
    server = embedded_pg_factory()
    primary_url = server.url()
    await execute(primary_url, SETUP)
    await execute(database_url, SETUP)
    alternate_port = make_url(database_url).port

    async with client_for(failover_app(primary_url, database_url, app_name)) as client:
        assert await served_by(client, "/write") == server.port

        # Demote: the server still answers, but refuses writes (SQLSTATE 25006).
        await execute(
            primary_url,
            "ALTER SYSTEM SET default_transaction_read_only = on",
            "SELECT pg_reload_conf()",
        )
        demoted = time.monotonic()
        failed = 0

        async def writes_on_alternate() -> bool:
            nonlocal failed
            port = await served_by(client, "/write")
            failed += port is None
            return port == alternate_port

        moved = await until(writes_on_alternate, INTERVAL * 1.1 + 1.5, "writes on the alternate")
        for _ in range(20):
            assert await served_by(client, "/write") == alternate_port
        state = await failover_state(client)
        assert state["targets"][0]["error"] == "read_only"
        assert state["primary_healthy"] is False

        # Promote it again: writes come back to it.
        await execute(
            primary_url,
            "ALTER SYSTEM RESET default_transaction_read_only",
            "SELECT pg_reload_conf()",
        )

        async def writes_on_primary() -> bool:
            return await served_by(client, "/write") == server.port

        back = await until(writes_on_primary, INTERVAL * 1.1 + 1.5, "writes back on the primary")
        for _ in range(20):
            assert await served_by(client, "/write") == server.port
        state = await failover_state(client)
        assert (state["failovers"], state["restorations"]) == (1, 1)

    print(
        f"\n[failover figures] demoted primary: writes moved {moved:.3f}s after demotion "
        f"({failed} failed writes meanwhile), back {back:.3f}s after promotion "
        f"(interval {INTERVAL}s); {time.monotonic() - demoted:.3f}s in all"
    )
    assert len(failover_records(caplog, "failover")) == 1
    assert len(failover_records(caplog, "restoration")) == 1
    assert_no_secret(caplog)


async def test_read_only_primary_at_startup_is_skipped(
    database_url: str, embedded_pg_factory: Callable[..., EmbeddedPostgres]
) -> None:
    server = embedded_pg_factory(extra_settings={"default_transaction_read_only": "on"})
    await execute(database_url, SETUP)
    app = failover_app(server.url(), database_url, f"fo-{uuid.uuid4().hex[:8]}")
    async with client_for(app) as client:
        for _ in range(10):
            assert await served_by(client, "/write") == make_url(database_url).port
        state = await failover_state(client)
        assert state["targets"][0]["healthy"] is False
        assert state["targets"][0]["error"] == "read_only"
        assert state["targets"][0]["connections_opened"] == 0


async def test_idle_validation_with_failover_is_counted_only_after_idle(
    database_url: str,
) -> None:
    """With DATABASE_FAILOVER_URLS, idle validation runs in the pool's checkout event (not
    in the pool's own method): the same rule, one round trip only for a connection idle
    past DB_PRE_PING_IDLE, and the same counter."""
    app = failover_app(
        database_url,
        database_url,
        f"dbpool-fo-{uuid.uuid4().hex[:8]}",
        pre_ping_idle=1.0,
        pool_size=1,
        max_overflow=0,
    )
    async with client_for(app) as client:
        stats = get_runtime(app).databases["primary"].stats
        assert get_runtime(app).databases["primary"].failover is not None
        first = await client.get("/port")
        returned = time.monotonic()
        again = await client.get("/port")
        back_to_back = stats.validations
        assert time.monotonic() - returned < 1.0, "the second request took a second"
        await wait_until(lambda: time.monotonic() - returned > 1.05, timeout=5)
        after_idle = await client.get("/port")
        validated = stats.validations
    assert first.status_code == again.status_code == after_idle.status_code == 200
    assert (back_to_back, validated) == (0, 1)
