"""Steady concurrent load against an in-process app, recording every request's outcome."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True, slots=True)
class Outcome:
    started: float
    ended: float
    status: int  # 0 when the client saw an exception instead of a response
    retry_after: str | None
    content_type: str | None

    @property
    def duration(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """``clients`` concurrent loops, each GETting ``path`` back to back (with a small
    pause so the rate stays bounded), until stopped."""

    client: httpx.AsyncClient
    path: str = "/q"
    clients: int = 10
    pause: float = 0.005
    outcomes: list[Outcome] = field(default_factory=list)
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
                response = await self.client.get(self.path, timeout=60)
                status = response.status_code
                retry_after = response.headers.get("retry-after")
                content_type = response.headers.get("content-type")
            except httpx.HTTPError:
                status, retry_after, content_type = 0, None, None
            self.outcomes.append(
                Outcome(started, time.monotonic(), status, retry_after, content_type)
            )
            await asyncio.sleep(self.pause)

    def since(self, t: float) -> list[Outcome]:
        """Outcomes of requests that started at or after ``t``."""
        return [o for o in self.outcomes if o.started >= t]

    async def wait_for(self, predicate, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
        """Wait until ``predicate(outcomes)`` holds; return when it first did."""
        start = time.monotonic()
        while not predicate(self.outcomes):
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what}: not seen within {timeout}s")
            await asyncio.sleep(0.01)
        return time.monotonic()


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def report(title: str, **figures: object) -> None:
    """Print measured figures into the test output (pytest -s or -rA shows them)."""
    parts = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"\n[fault figures] {title}: {parts}")
