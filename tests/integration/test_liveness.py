"""The liveness port: answered by a thread from the event loop's heartbeat."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import fastapi_dbpool as dbpool
from fastapi_dbpool.liveness import HEARTBEAT
from tests.helpers import wait_until
from tests.helpers.apps import client_for, make_app, settings_for


def probe(port: int, path: str = "/health/live") -> tuple[int, dict[str, Any], float]:
    """GET the liveness port from this thread: status, body, seconds it took."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = json.loads(response.read())
        return response.status, body, time.monotonic() - started
    finally:
        conn.close()


async def test_the_liveness_port_answers_while_the_event_loop_is_blocked(
    database_url: str,
) -> None:
    app = make_app(settings_for(database_url, liveness_port=0, liveness_max_lag=0.5))
    blocking = threading.Event()
    seen: list[tuple[int, dict[str, Any], float]] = []

    @app.get("/block")
    async def block() -> dict[str, str]:
        blocking.set()
        time.sleep(1.5)  # noqa: ASYNC251 (the fault: a call that blocks the event loop)
        return {"status": "unblocked"}

    def watch(port: int) -> None:
        # From the moment the loop blocks, probe until the port reports the stall.
        assert blocking.wait(10)
        deadline = time.monotonic() + 1.4
        while time.monotonic() < deadline:
            seen.append(probe(port))
            if seen[-1][0] == 503:
                return

    async with client_for(app) as client:
        port = dbpool.get_runtime(app).liveness.port  # type: ignore[union-attr]
        assert port
        status, body, _ = await asyncio.to_thread(probe, port)
        assert status == 200 and body["status"] == "ok"
        assert body["event_loop_lag"] < 0.5
        watcher = threading.Thread(target=watch, args=(port,))
        watcher.start()
        response = await client.get("/block")
        watcher.join(10)

        async def alive_again() -> tuple[int, dict[str, Any], float] | None:
            answer = await asyncio.to_thread(probe, port)
            return answer if answer[0] == 200 else None

        # The loop runs again: the next heartbeat makes it alive again.
        after = await wait_until(alive_again, 2, message="liveness 200 again")
    assert response.status_code == 200
    # While the loop was blocked, every probe was answered at once, the last one 503.
    assert seen and max(took for _, _, took in seen) < 0.25
    status, body, _ = seen[-1]
    assert status == 503 and body["status"] == "stalled"
    assert body["event_loop_lag"] >= 0.5
    assert all(s == 200 for s, _, _ in seen[:-1])
    assert after[1]["event_loop_lag"] < 0.5


async def test_the_port_answers_200_while_requests_run(database_url: str) -> None:
    # A loop that serves requests (CPU-bound ones here, one after another) still runs its
    # callbacks: every probe meanwhile says alive.
    app = make_app(settings_for(database_url, liveness_port=0))

    @app.get("/spin")
    async def spin() -> dict[str, int]:
        total = 0
        for i in range(20_000):
            total += i
        return {"total": total}

    async with client_for(app) as client:
        port = dbpool.get_runtime(app).liveness.port  # type: ignore[union-attr]
        answers: list[tuple[int, dict[str, Any], float]] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                answers.append(probe(port))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for _ in range(100):
                assert (await client.get("/spin")).status_code == 200
        finally:
            done.set()
            watcher.join(10)
    assert answers and all(status == 200 for status, _, _ in answers)


async def test_other_paths_are_404_and_the_port_closes_at_shutdown(database_url: str) -> None:
    app = make_app(settings_for(database_url, liveness_port=0))
    async with client_for(app):
        port = dbpool.get_runtime(app).liveness.port  # type: ignore[union-attr]
        status, body, _ = await asyncio.to_thread(probe, port, "/health/database")
        assert status == 404 and body == {"detail": "not found"}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_a_port_in_use_stops_startup_naming_the_setting(database_url: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        app = make_app(settings_for(database_url, liveness_port=port, liveness_host="127.0.0.1"))
        with pytest.raises(dbpool.ConfigurationError) as info:
            async with client_for(app):
                pass
    finally:
        taken.close()
    assert f"DB_LIVENESS_PORT ({port})" in str(info.value)


def test_liveness_settings_are_validated() -> None:
    with pytest.raises(dbpool.ConfigurationError, match="DB_LIVENESS_PORT"):
        dbpool.DBPoolSettings.from_env({"DB_LIVENESS_PORT": "70000"})
    with pytest.raises(dbpool.ConfigurationError, match="DB_LIVENESS_PORT"):
        dbpool.DBPoolSettings.from_env({"DB_LIVENESS_PORT": "http"})
    with pytest.raises(dbpool.ConfigurationError, match="DB_LIVENESS_MAX_LAG"):
        dbpool.DBPoolSettings.from_env({"DB_LIVENESS_MAX_LAG": "0"})
    settings = dbpool.DBPoolSettings.from_env({"DB_LIVENESS_PORT": "8081"})
    assert settings.liveness_port == 8081 and settings.liveness_max_lag == 10.0
    assert settings.liveness_max_lag > HEARTBEAT


_HOLDER = """
import asyncio, sys
from fastapi_dbpool.liveness import LivenessServer, LoopHeartbeat

async def main() -> None:
    server = LivenessServer("127.0.0.1", 0, LoopHeartbeat(asyncio.get_running_loop()), 10.0)
    server.start()
    print(server.port, server._process.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_the_liveness_process_exits_when_the_app_process_dies() -> None:
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, stdout=asyncio.subprocess.PIPE
    )
    assert holder.stdout is not None
    line = await asyncio.wait_for(holder.stdout.readline(), 30)
    port, child = (int(x) for x in line.split())
    status, _, _ = await asyncio.to_thread(probe, port)
    assert status == 200
    holder.kill()  # SIGKILL: no shutdown code runs in the app's process
    await holder.wait()

    def child_gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # Still there: a zombie of the dead parent counts as gone once reaped by init.
        return Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"

    try:
        await wait_until(child_gone, 5, message="liveness process exited")
    finally:
        if not child_gone():
            os.kill(child, signal.SIGKILL)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
