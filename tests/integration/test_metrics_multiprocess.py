"""One scrape of any worker reports the whole pod: gunicorn, two uvicorn workers, real files.

The app below is what gunicorn serves (``create_app()``), wired in the contract's explicit
form with settings from the environment, the way a deployment runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import fastapi_dbpool as dbpool
from fastapi_dbpool import get_session
from tests.helpers.apps import free_port
from tests.helpers.pg import count_app_connections
from tests.integration.test_metrics import metric

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
POOL_SIZE = 2
WORKERS = 2
#: Pool connections each worker opens at startup (warm-up checkouts count as checkouts).
WARM = POOL_SIZE

#: What a deployment puts in its gunicorn.conf.py (see docs/metrics.md).
GUNICORN_CONF = """
from prometheus_client import multiprocess


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""


def create_app() -> FastAPI:
    """The served app: explicit wiring, settings from the environment."""
    app = FastAPI(lifespan=dbpool.lifespan)
    app.add_middleware(dbpool.DBPoolMiddleware)
    app.include_router(dbpool.router)

    @app.get("/pid")
    async def pid(session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        await session.execute(text("SELECT 1"))
        return {"pid": os.getpid()}

    @app.get("/slow")
    async def slow(session: AsyncSession = Depends(dbpool.session(timeout=0.05))) -> None:
        await session.execute(text("SELECT pg_sleep(5)"))

    return app


def _worker_class() -> str:
    if importlib.util.find_spec("uvicorn_worker") is not None:
        return "uvicorn_worker.UvicornWorker"
    return "uvicorn.workers.UvicornWorker"


@contextlib.asynccontextmanager
async def gunicorn(database_url: str, workdir: Path, app_name: str) -> AsyncIterator[str]:
    """Run gunicorn with two uvicorn workers sharing PROMETHEUS_MULTIPROC_DIR."""
    executable = Path(sys.executable).parent / "gunicorn"
    if not executable.exists() or importlib.util.find_spec("gunicorn") is None:
        pytest.skip("gunicorn is not installed: pip install 'fastapi-dbpool[test]'")
    prom_dir = workdir / "prometheus"
    prom_dir.mkdir()
    conf = workdir / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF)
    port = free_port()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(prom_dir),
        "DATABASE_URL": database_url,
        "DB_POOL_SIZE": str(POOL_SIZE),
        "DB_MAX_OVERFLOW": "0",
        "WEB_CONCURRENCY": str(WORKERS),
        "DB_APPLICATION_NAME": app_name,
        "PYTHONPATH": str(REPO),
    }
    log_path = workdir / "gunicorn.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(executable),
            "--config",
            str(conf),
            "--worker-class",
            _worker_class(),
            "--workers",
            str(WORKERS),
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "10",
            "tests.integration.test_metrics_multiprocess:create_app()",
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await _poll(lambda: _live(base, proc), lambda ok: ok, timeout=60, what="gunicorn to serve")
        yield base
    except BaseException:
        # The server's side of a failure, in the test's captured output.
        print(log_path.read_text(errors="replace")[-8000:])
        raise
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)
                raise


async def _live(base: str, proc: asyncio.subprocess.Process) -> bool:
    if proc.returncode is not None:
        raise RuntimeError(f"gunicorn exited with {proc.returncode}")
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{base}/health/live")).status_code == 200
    except httpx.TransportError:
        return False


T = TypeVar("T")


async def _poll(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, timeout: float, what: str
) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if done(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


class Traffic:
    """Requests to the pod, on fresh TCP connections so that both workers get some."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.pid_requests = 0
        self.slow_requests = 0
        self.pids: list[int] = []

    async def pids_served(self, batch: int = 8) -> set[int]:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.base, limits=limits, timeout=10) as client:
            responses = await asyncio.gather(*(client.get("/pid") for _ in range(batch)))
        self.pid_requests += batch
        for response in responses:
            assert response.status_code == 200, response.text
            self.pids.append(response.json()["pid"])
        return set(self.pids)

    async def slow(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=10) as client:
            response = await client.get("/slow")
        assert response.status_code == 504, response.text
        self.slow_requests += 1

    async def scrape(self) -> str:
        async with httpx.AsyncClient(base_url=self.base, timeout=10) as client:
            response = await client.get("/metrics")
        assert response.status_code == 200
        return response.text


def pod_view(text_: str) -> dict[str, float | None]:
    return {
        "connections": metric(text_, "dbpool_connections", database="primary"),
        "used": metric(text_, "dbpool_connections", database="primary", state="used"),
        "max": metric(text_, "dbpool_connections_max", database="primary"),
        "pending": metric(text_, "dbpool_pending_requests", database="primary"),
        "checkouts": metric(text_, "dbpool_checkout_wait_seconds_count", database="primary"),
        "statement_timeouts": metric(text_, "dbpool_statement_timeouts_total", database="primary"),
        "breaker_closed": metric(
            text_, "dbpool_circuit_breaker_state", database="primary", state="closed"
        ),
        "http_pid": metric(text_, "http_requests_total", handler="/pid", status="2xx"),
        "http_slow": metric(text_, "http_requests_total", handler="/slow", status="5xx"),
    }


async def test_any_worker_reports_the_whole_pod_and_dead_workers_drop_out(
    database_url: str, admin_url: str, tmp_path: Path
) -> None:
    app_name = f"dbpool-mp-{uuid.uuid4().hex[:8]}"
    async with gunicorn(database_url, tmp_path, app_name) as base:
        traffic = Traffic(base)
        served = await _poll(
            traffic.pids_served, lambda pids: len(pids) == WORKERS, timeout=30, what="2 workers"
        )
        for _ in range(3):
            await traffic.slow()

        def expected(workers_started: int) -> dict[str, float | None]:
            return {
                "connections": WORKERS * POOL_SIZE,
                "used": 0,
                "max": WORKERS * POOL_SIZE,
                "pending": 0,
                # Counters add up over every worker that ever ran, the dead one included.
                "checkouts": traffic.pid_requests + traffic.slow_requests + workers_started * WARM,
                "statement_timeouts": traffic.slow_requests,
                # livemax: 1 when some live worker's breaker is closed.
                "breaker_closed": 1,
                "http_pid": traffic.pid_requests,
                "http_slow": traffic.slow_requests,
            }

        want = expected(workers_started=WORKERS)
        await _poll(
            lambda: _pod_view(traffic), lambda seen: seen == want, timeout=15, what=str(want)
        )
        # Whichever worker answers, it answers for the pod.
        for _ in range(6):
            assert pod_view(await traffic.scrape()) == want
        # The gauges match what the server sees: both pools, plus each worker's probe.
        assert await count_app_connections(admin_url, app_name) == WORKERS * POOL_SIZE + WORKERS

        # A worker dies without any shutdown; gunicorn's child_exit marks it dead and
        # starts another.
        dead = traffic.pids[0]
        survivor = next(pid for pid in served if pid != dead)
        os.kill(dead, signal.SIGKILL)
        prom_dir = tmp_path / "prometheus"
        await _poll(
            _gone(prom_dir / f"gauge_livesum_{dead}.db"),
            lambda gone: gone,
            timeout=15,
            what="mark_process_dead",
        )
        assert not (prom_dir / f"gauge_livemax_{dead}.db").exists()
        await _poll(
            traffic.pids_served,
            lambda pids: bool(pids - {dead, survivor}),
            timeout=30,
            what="the replacement worker",
        )
        # The dead worker's pool is gone from the gauges (not 3 pools' worth), its counts
        # are not.
        want = expected(workers_started=WORKERS + 1)
        await _poll(
            lambda: _pod_view(traffic), lambda seen: seen == want, timeout=15, what=str(want)
        )


async def _pod_view(traffic: Traffic) -> dict[str, float | None]:
    return pod_view(await traffic.scrape())


def _gone(path: Path) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not await asyncio.to_thread(path.exists)

    return check
