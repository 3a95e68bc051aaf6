"""The test rig itself: per-test databases, the private embedded server, wait_until."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fastapi_dbpool import embedded
from fastapi_dbpool.embedded import EmbeddedPostgres
from tests.helpers import wait_until
from tests.helpers.pg import TEMPLATE_DATABASE, asyncpg_dsn, count_app_connections

CONNECTION_ERRORS = (ConnectionError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)

_seen_databases: list[str] = []


async def connect(url: str, *, timeout: float = 5.0, app: str = "dbpool-rig-test") -> Any:
    return await asyncpg.connect(
        asyncpg_dsn(url), timeout=timeout, server_settings={"application_name": app}
    )


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_its_own_empty_database(
    run: int, database_url: str, admin_url: str
) -> None:
    assert database_url.startswith("postgresql+asyncpg://")
    conn = await connect(database_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        assert name.startswith("test_")
        # Whichever run goes second would see the first run's table if databases were shared.
        assert await conn.fetchval("SELECT to_regclass('public.rig_marker')") is None
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public'"
            )
            == 0
        )
        await conn.execute("CREATE TABLE rig_marker (run int)")
        await conn.execute("INSERT INTO rig_marker VALUES ($1)", run)
    finally:
        await conn.close()

    admin = await connect(admin_url)
    try:
        databases = {r["datname"] for r in await admin.fetch("SELECT datname FROM pg_database")}
    finally:
        await admin.close()
    assert name in databases
    assert TEMPLATE_DATABASE in databases
    # Databases of earlier tests are dropped at their teardown.
    assert not databases.intersection(_seen_databases)
    _seen_databases.append(name)


async def test_count_app_connections_sees_only_that_application(
    database_url: str, admin_url: str
) -> None:
    assert await count_app_connections(admin_url, "dbpool-rig-count") == 0
    conns = [await connect(database_url, app="dbpool-rig-count") for _ in range(3)]
    try:
        assert await count_app_connections(admin_url, "dbpool-rig-count") == 3
    finally:
        for conn in conns:
            await conn.close()
    await wait_until(
        lambda: _count_is(admin_url, "dbpool-rig-count", 0), 5.0, message="backends to end"
    )


async def _count_is(admin_url: str, app: str, expected: int) -> bool:
    return await count_app_connections(admin_url, app) == expected


async def test_wait_until_returns_the_value_or_fails_with_a_message() -> None:
    values = iter([0, None, "", 7])
    assert await wait_until(lambda: next(values), 1.0, interval=0) == 7

    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"waiting for the impossible; last value False"):
        await wait_until(lambda: False, 0.05, message="the impossible")
    assert time.monotonic() - started < 1.0

    def boom() -> bool:
        raise OSError("not yet")

    with pytest.raises(AssertionError, match="last error OSError: not yet"):
        await wait_until(boom, 0.05, ignore=(OSError,))
    with pytest.raises(ValueError):
        await wait_until(_raise_value_error, 1.0, ignore=(OSError,))


async def _raise_value_error() -> bool:
    raise ValueError("propagates")


@pytest.mark.faults
async def test_private_server_stops_refuses_and_starts_again(private_pg: EmbeddedPostgres) -> None:
    url = private_pg.url()
    assert url == f"postgresql+asyncpg://postgres@127.0.0.1:{private_pg.port}/postgres"
    port = private_pg.port

    conn = await connect(url)
    assert await conn.fetchval("SELECT 1") == 1

    private_pg.stop()
    assert not private_pg.is_running
    with pytest.raises(CONNECTION_ERRORS):
        await conn.fetchval("SELECT 1", timeout=2)
    conn.terminate()
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        await connect(url, timeout=5)
    assert time.monotonic() - started < 1.0

    private_pg.start()
    assert private_pg.is_running
    assert private_pg.port == port
    conn = await connect(url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


@pytest.mark.faults
async def test_private_server_survives_kill_and_keeps_its_data(
    private_pg: EmbeddedPostgres,
) -> None:
    url = private_pg.url()
    conn = await connect(url)
    await conn.execute("DROP TABLE IF EXISTS rig_crash; CREATE TABLE rig_crash (v int)")
    await conn.execute("INSERT INTO rig_crash VALUES (1)")

    private_pg.kill()
    assert not private_pg.is_running
    with pytest.raises(CONNECTION_ERRORS):
        await conn.fetchval("SELECT 1", timeout=2)
    conn.terminate()
    with pytest.raises(ConnectionRefusedError):
        await connect(url, timeout=5)

    private_pg.start()  # crash recovery
    conn = await connect(url)
    try:
        assert await conn.fetchval("SELECT sum(v) FROM rig_crash") == 1
    finally:
        await conn.close()


@pytest.mark.faults
async def test_start_takes_over_a_postmaster_left_by_an_earlier_process(
    private_pg: EmbeddedPostgres,
) -> None:
    # A second handle on the same data directory plays the process that comes back after
    # the first one died without stopping its server.
    leftover_pid = private_pg.pid
    successor = EmbeddedPostgres(private_pg.data_dir, port=private_pg.port, ephemeral=True)
    successor.start()
    try:
        assert successor.pid != leftover_pid
        assert not private_pg.is_running
        conn = await connect(successor.url())
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    finally:
        successor.stop()
    assert not successor.is_running
    private_pg.start()
    assert private_pg.is_running


def test_missing_pgserver_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded, "_bin_dir_cache", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    server = EmbeddedPostgres(tmp_path / "data", port=5999)
    assert server.url(driver="postgresql") == "postgresql://postgres@127.0.0.1:5999/postgres"
    with pytest.raises(RuntimeError, match=r"pip install 'fastapi-dbpool\[embedded\]'"):
        server.start()
    assert not server.is_running
