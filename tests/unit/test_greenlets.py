"""Reused greenlets: SQLAlchemy's greenlet_spawn semantics, without a greenlet per call."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import traceback
import types
import weakref
from typing import Any

import pytest
from greenlet import getcurrent
from greenlet import greenlet as Greenlet
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util.concurrency import await_, in_greenlet
from sqlalchemy.util.concurrency import greenlet_spawn as sqlalchemy_greenlet_spawn

from fastapi_dbpool import greenlets
from fastapi_dbpool.greenlets import MAX_IDLE, greenlet_spawn
from fastapi_dbpool.sessions import RequestSession

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


@pytest.fixture(autouse=True)
def no_idle_runners() -> None:
    # Each test starts with this thread's free list empty.
    greenlets._idle.runners.clear()


def idle_count() -> int:
    """How many idle greenlets this thread keeps."""
    return len(greenlets._idle.runners)


async def answer(value: Any) -> Any:
    await asyncio.sleep(0)
    return value


def waits_then_returns(value: Any) -> tuple[Any, Greenlet]:
    return await_(answer(value)), getcurrent()


async def test_a_call_awaits_and_returns_in_a_greenlet_that_is_reused() -> None:
    first, runner = await greenlet_spawn(waits_then_returns, 1)
    second, again = await greenlet_spawn(waits_then_returns, value=2)
    assert (first, second) == (1, 2)
    assert runner is again and runner is not getcurrent()
    assert idle_count() == 1


async def test_the_greenlet_is_an_sqlalchemy_greenlet_provider() -> None:
    assert not in_greenlet()
    assert await greenlet_spawn(in_greenlet) is True


async def test_an_error_is_raised_with_its_traceback_and_the_greenlet_is_kept() -> None:
    def fails() -> None:
        await_(answer(None))
        raise ValueError("no such row")

    with pytest.raises(ValueError, match="no such row") as raised:
        await greenlet_spawn(fails)
    assert "fails" in [frame.name for frame in traceback.extract_tb(raised.tb)]
    assert idle_count() == 1
    assert (await greenlet_spawn(waits_then_returns, 3))[0] == 3
    assert idle_count() == 1


async def test_an_error_is_chained_as_sqlalchemy_chains_it() -> None:
    def fails() -> None:
        raise ValueError("inner")

    for spawn in (sqlalchemy_greenlet_spawn, greenlet_spawn):
        try:
            try:
                raise KeyError("outer")
            except KeyError:
                await spawn(fails)
        except ValueError as error:
            assert error.__context__ is None, spawn


async def test_an_error_raised_while_awaiting_is_thrown_into_the_call() -> None:
    async def refuse() -> None:
        raise ConnectionResetError("server closed the connection")

    def handles() -> str:
        try:
            await_(refuse())
        except ConnectionResetError as error:
            return f"handled: {error}"
        return "not raised"

    assert await greenlet_spawn(handles) == "handled: server closed the connection"


async def test_a_cancellation_reaches_the_call_and_ends_the_task() -> None:
    reached = asyncio.Event()
    seen: list[str] = []

    def waits_forever() -> None:
        reached.set()
        try:
            await_(asyncio.Event().wait())
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = asyncio.create_task(greenlet_spawn(waits_forever))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]
    assert idle_count() == 1


async def test_a_coroutine_closed_mid_call_closes_the_call() -> None:
    seen: list[str] = []

    def waits() -> None:
        try:
            await_(asyncio.Event().wait())
        except GeneratorExit:
            seen.append("closed")
            raise

    coroutine = greenlet_spawn(waits)
    coroutine.send(None)  # runs up to the first wait
    coroutine.close()
    assert seen == ["closed"]
    assert idle_count() == 1


async def test_a_call_runs_in_its_callers_context_and_keeps_none_after() -> None:
    def read() -> str:
        return await_(answer(REQUEST.get()))

    async def request(name: str) -> str:
        REQUEST.set(name)
        return await greenlet_spawn(read)

    assert await asyncio.create_task(request("a")) == "a"
    assert await asyncio.create_task(request("b")) == "b"
    assert REQUEST.get() == "none"
    # The idle greenlet does not hold the last task's context (nor what is in it).
    (idle,) = greenlets._idle.runners
    assert idle.gr_context is None


async def test_an_idle_greenlet_keeps_no_reference_to_its_call_or_result() -> None:
    class Session:
        def run(self) -> object:
            await_(answer(None))
            return Result()

    class Result:
        pass

    session = Session()
    result = await greenlet_spawn(session.run)
    assert isinstance(result, Result)
    refs = [weakref.ref(session), weakref.ref(result)]
    del session, result
    gc.collect()
    assert [ref() for ref in refs] == [None, None]

    class Gone(Exception):
        pass

    def fails() -> None:
        raise Gone

    with pytest.raises(Gone) as raised:
        await greenlet_spawn(fails)
    error = weakref.ref(raised.value)
    del raised
    gc.collect()
    assert error() is None


async def test_concurrent_calls_get_their_own_greenlets() -> None:
    both = asyncio.Barrier(2)

    def meet() -> Greenlet:
        await_(both.wait())
        return getcurrent()

    first, second = await asyncio.gather(greenlet_spawn(meet), greenlet_spawn(meet))
    assert first is not second
    assert idle_count() == 2


async def test_the_free_list_is_capped() -> None:
    everyone = asyncio.Barrier(MAX_IDLE + 5)

    def meet() -> None:
        await_(everyone.wait())

    await asyncio.gather(*(greenlet_spawn(meet) for _ in range(MAX_IDLE + 5)))
    assert idle_count() == MAX_IDLE


async def test_each_thread_has_its_own_greenlets() -> None:
    await greenlet_spawn(waits_then_returns, 1)
    results: list[Any] = []

    def other_thread() -> None:
        async def main() -> None:
            value, runner = await greenlet_spawn(waits_then_returns, "there")
            results.extend([value, runner, idle_count()])

        asyncio.run(main())

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    value, runner, idle_there = results
    assert value == "there" and idle_there == 1
    assert runner is not greenlets._idle.runners[0]
    assert idle_count() == 1


async def test_require_await_is_enforced_as_by_sqlalchemy() -> None:
    with pytest.raises(exc.AwaitRequired):
        await greenlet_spawn(lambda: 1, _require_await=True)
    assert await greenlet_spawn(waits_then_returns, 1, _require_await=True)


def test_every_session_method_that_spawns_a_greenlet_reuses_them() -> None:
    spawning = [
        name
        for name, method in vars(AsyncSession).items()
        if isinstance(method, types.FunctionType) and "greenlet_spawn" in method.__code__.co_names
    ]
    assert {"execute", "close", "commit", "rollback", "run_sync"} <= set(spawning)
    for name in spawning:
        method = getattr(RequestSession, name)
        while method.__globals__ is not greenlets._SESSION_GLOBALS:
            # Unwrap the concurrency guard; SQLAlchemy's own method ends the chain.
            assert hasattr(method, "__wrapped__"), f"RequestSession.{name} spawns greenlets"
            method = method.__wrapped__
        assert method.__code__ is getattr(AsyncSession, name).__code__
