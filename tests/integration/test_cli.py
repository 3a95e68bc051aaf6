"""The diagnostics CLI as a user runs it (a subprocess) against a real PostgreSQL and a real
served app: the numbers it prints, and its exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

import fastapi_dbpool as dbpool
from tests.helpers.apps import free_port, make_app, serve, settings_for
from tests.helpers.pg import asyncpg_dsn, with_database

# Variables of the service that would change what check computes.
SERVICE_ENV = ("DATABASE_URL", "POD_COUNT", "WEB_CONCURRENCY", "DB_ROLLOUT_SURGE")


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def run_cli(*args: str, timeout: float = 15) -> Run:
    """``python -m fastapi_dbpool ARGS`` in a subprocess; the event loop keeps serving."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV and not k.startswith("DB_")}
    env["COLUMNS"] = "200"  # one line per table row, whatever the terminal
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastapi_dbpool",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def available(limits: dict[str, int]) -> int:
    return (
        limits["max_connections"]
        - limits["superuser_reserved_connections"]
        - limits.get("reserved_connections", 0)
    )


async def server_limits(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch(
            "SELECT name, setting::int AS value FROM pg_settings WHERE name IN "
            "('max_connections', 'superuser_reserved_connections', 'reserved_connections')"
        )
        return {row["name"]: row["value"] for row in rows}
    finally:
        await conn.close()


@pytest.fixture
async def other_clients(database_url: str) -> AsyncIterator[int]:
    """Three connections held by another application for the test."""
    conns = [
        await asyncpg.connect(
            asyncpg_dsn(database_url), server_settings={"application_name": "billing-worker"}
        )
        for _ in range(3)
    ]
    try:
        yield len(conns)
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def test_check_prints_the_server_and_the_plan_that_fits(database_url: str) -> None:
    limits = await server_limits(database_url)
    run = await run_cli(
        "check", database_url, "--pods", "3", "--workers", "4", "--max-connections", "60"
    )
    assert run.code == 0, run.err
    version = await _server_version(database_url)
    assert f"PostgreSQL {version} at " in run.out
    shown = {line.split()[0]: line.split()[-1] for line in run.out.splitlines()[1:5]}
    assert shown == {
        "max_connections": str(limits["max_connections"]),
        "superuser_reserved_connections": str(limits["superuser_reserved_connections"]),
        "reserved_connections": str(limits.get("reserved_connections", "n/a")),
        "available": str(available(limits)),
    }
    # 60 over 3 pods x 4 workers = 12 processes: 5 each, one of them for the health probe
    assert "Pool sizing for 3 pods + 0 surge x 4 workers = 12 processes" in run.out
    assert "pool_size=4 max_overflow=0 (derived from the budget)" in run.out
    assert "budget: 60 connections (DB_MAX_CONNECTIONS)" in run.out
    assert "fits:" in run.out
    assert run.err == ""


async def test_check_json_uses_the_servers_budget_and_counts_other_clients(
    database_url: str, other_clients: int
) -> None:
    limits = await server_limits(database_url)
    run = await run_cli("check", database_url, "--pods", "3", "--workers", "4", "--json")
    data = run.json()
    slots = available(limits)
    assert data["server"]["max_connections"] == limits["max_connections"]
    assert data["server"]["available"] == slots
    assert data["connections"]["by_application"]["billing-worker"] == other_clients
    # the command's own connection is not counted
    assert "fastapi-dbpool-cli" not in data["connections"]["by_application"]
    plan = data["plan"]
    assert (plan["budget"], plan["processes"]) == (slots, 12)
    assert plan["pool_size"] == min(slots // 12 - 1, 20) and plan["max_overflow"] == 0
    others = data["connections"]["others"]
    assert others >= other_clients
    fits = plan["fleet_peak"] + others <= slots
    assert data["fits"] is fits
    assert run.code == (0 if fits else 3)


async def test_check_exits_3_when_explicit_sizes_oversubscribe_the_budget(
    database_url: str,
) -> None:
    run = await run_cli(
        "check", database_url, "--pods", "3", "--workers", "4", "--max-connections", "40",
        "--pool-size", "10",
    )  # fmt: skip
    assert run.code == 3, run.out + run.err
    assert "pool_size=10 max_overflow=0 (explicit)" in run.out
    assert "oversubscribed:" in run.out
    # 12 processes x (10 + 1 probe)
    assert "= 132 connections, more than the budget of 40 (DB_MAX_CONNECTIONS)" in run.out


async def test_check_exits_3_when_the_budget_is_more_than_the_server_allows(
    database_url: str,
) -> None:
    slots = available(await server_limits(database_url))
    run = await run_cli("check", database_url, "--max-connections", str(slots + 50))
    assert run.code == 3
    assert f"DB_MAX_CONNECTIONS={slots + 50} is more than the {slots} connections" in run.out
    # reported once, in the report: the library's own warning is not printed as well
    assert run.err == ""


async def test_check_exits_3_when_other_clients_leave_no_room_for_the_fleet(
    database_url: str, other_clients: int
) -> None:
    limits = await server_limits(database_url)
    slots = available(limits)
    # One process, uncapped, whose fleet peak is the whole budget: room for all but two of
    # the others.
    budget = slots - other_clients + 2
    run = await run_cli(
        "check", database_url, "--max-connections", str(budget), "--pool-size-cap", "1000",
        "--json",
    )  # fmt: skip
    data = run.json()
    assert run.code == 3
    assert data["plan"]["fleet_peak"] == budget
    others = data["connections"]["others"]
    problem = data["problems"][-1]
    assert f"other clients hold {others} now" in problem
    assert f"leave them room with DB_MAX_CONNECTIONS={slots - others} or less" in problem
    assert data["suggestion"]["fleet_peak"] + others <= slots


async def test_check_reports_a_missing_database_in_one_line(admin_url: str) -> None:
    url = make_url(with_database(admin_url, "no_such_db")).set(password="s3cret")
    run = await run_cli("check", url.render_as_string(hide_password=False))
    assert run.code == 1 and run.out == ""
    assert 'database "no_such_db" does not exist' in run.err
    assert "s3cret" not in run.err and run.err.count("\n") == 1


async def test_check_of_a_closed_port_exits_1_quickly_with_the_password_masked() -> None:
    url = f"postgresql://app:s3cret@127.0.0.1:{free_port()}/app"
    started = time.monotonic()
    run = await run_cli("check", url, "--timeout", "3")
    assert time.monotonic() - started < 5
    assert run.code == 1 and run.out == ""
    assert run.err == (
        f"fastapi-dbpool: error: cannot connect to postgresql://app:***@{url.split('@')[1]}: "
        "connection refused (is PostgreSQL running and listening there?)\n"
    )


async def test_status_and_watch_read_a_running_service(database_url: str) -> None:
    app = make_app(settings_for(database_url, pool_size=3, pod_count=2, web_concurrency=2))
    async with serve(app) as base:
        table, raw, watched = await asyncio.gather(
            run_cli("status", base),
            run_cli("status", f"{base}/health/database", "--json"),
            run_cli("watch", base, "--count", "2", "--interval", "0.2"),
        )
    assert table.code == 0, table.err
    assert f"{base}/health/database  ok (HTTP 200)" in table.out
    header, row = table.out.splitlines()[1:3]
    assert header.split() == [
        "database", "status", "breaker", "size", "checked_out", "overflow", "max", "waiting",
        "probe",
    ]  # fmt: skip
    assert row.split()[:8] == ["primary", "ok", "closed", "3", "0", "0", "3", "0"]
    assert "primary sizing: pool_size=3 max_overflow=0 (explicit); 4 processes" in table.out

    assert raw.code == 0
    body = raw.json()
    assert body["status"] == "ok"
    assert body["databases"]["primary"]["pool"]["max"] == 3

    assert watched.code == 0, watched.err
    assert watched.out.count("ok (HTTP 200)") == 2
    assert "refresh 1 of 2" in watched.out and "refresh 2 of 2" in watched.out


async def test_status_exits_3_while_the_service_is_draining(database_url: str) -> None:
    app = make_app(settings_for(database_url))
    async with serve(app) as base:
        dbpool.get_runtime(app).draining = True
        run = await run_cli("status", base)
    assert run.code == 3
    assert "draining (HTTP 503)" in run.out


async def test_status_exits_3_when_the_database_is_unavailable() -> None:
    # The pool is sized explicitly, so the app starts without its database; the first
    # probe has failed before it serves.
    closed = f"postgresql://app:s3cret@127.0.0.1:{free_port()}/app"
    app = make_app(settings_for(closed, warm_pool=False))
    async with serve(app) as base:
        run = await run_cli("status", base)
    assert run.code == 3, run.err
    assert "unavailable (HTTP 503)" in run.out
    assert "failed: " in run.out and "s3cret" not in run.out


async def _server_version(url: str) -> str:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


async def test_an_unprivileged_role_counts_the_same_clients(
    database_url: str, other_clients: int
) -> None:
    # Without pg_read_all_stats, other roles' processes hide their backend_type; the count
    # must still leave out the server's own processes (launchers, checkpointer, ...).
    role = f"cli_reader_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        as_role = make_url(database_url).set(username=role).render_as_string(hide_password=False)
        privileged = await run_cli("check", database_url, "--json")
        unprivileged = await run_cli("check", as_role, "--json")
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
    seen = privileged.json()["connections"]["by_application"]
    assert seen["billing-worker"] == other_clients
    assert unprivileged.json()["connections"]["by_application"] == seen
