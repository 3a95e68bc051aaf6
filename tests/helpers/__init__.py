"""Helpers shared by the test suite.

Import them by their full name, ``from tests.helpers import wait_until``,
``from tests.helpers.pg import count_app_connections``,
``from tests.helpers.proxy import FaultProxy`` (the project root is on ``sys.path``); never
as ``helpers...``, which would load a second copy of each module.

Tests never sleep to let things settle; they poll a condition with an explicit deadline
using :func:`wait_until`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["wait_until"]

T = TypeVar("T")


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,
    interval: float = 0.01,
    *,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.01,
    *,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.01,
    *,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``predicate`` until it returns a truthy value, at most ``timeout`` seconds.

    Args:
        predicate: A function or coroutine function; its truthy result ends the wait.
        timeout: The deadline in seconds, measured from the call.
        interval: Pause between two polls.
        message: What is being waited for, used in the failure message.
        ignore: Exception types raised by ``predicate`` that mean "not yet" (for example
            ``OSError`` while waiting for a server to accept connections). Other exceptions
            propagate at once.

    Returns:
        The first truthy value returned by ``predicate``.

    Raises:
        AssertionError: The deadline passed; the message names the condition, the last
            value returned and the last ignored exception.
    """
    started = time.monotonic()
    deadline = started + timeout
    last_value: object = None
    last_error: BaseException | None = None
    polls = 0
    while True:
        polls += 1
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
            last_value = result
            last_error = None
        now = time.monotonic()
        if now >= deadline:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            detail = f"last value {last_value!r}"
            if last_error is not None:
                detail = f"last error {type(last_error).__name__}: {last_error}"
            raise AssertionError(
                f"timed out after {now - started:.2f} s ({polls} polls) waiting for {what}; "
                f"{detail}"
            )
        await asyncio.sleep(min(interval, max(0.0, deadline - now)))
