"""Reused greenlets for the request session's SQLAlchemy calls.

SQLAlchemy's asyncio layer runs every ``AsyncSession`` call (``execute``, ``commit``,
``close``...) as sync code in a new greenlet (``greenlet_spawn``). On Python 3.11 and
later a new greenlet also gets a new frame stack: its first call maps a 16 KiB chunk
(``mmap``), touches it (a page fault), and its end unmaps it (``munmap``). That is
kernel time, which an instruction count does not see: measured here, a greenlet that
awaits once costs ~11 us against ~2.2 us for the same work in a greenlet that already
ran, 7 us of the difference in the kernel. A request through ``get_session`` makes
two such calls (its query and the release's close).

:func:`greenlet_spawn` is SQLAlchemy's ``greenlet_spawn`` with the greenlet taken from a
free list of the thread's idle ones instead of made anew. A greenlet belongs to the
thread that made it, so the free list is per thread, like a thread's event loop; it
keeps at most :data:`MAX_IDLE`. What the call runs, where it waits and what it raises
are SQLAlchemy's: the greenlet is an SQLAlchemy "greenlet provider", so
``await_``/``in_greenlet`` treat it as one of their own. It runs in the calling task's
context (``contextvars``), and an idle greenlet keeps no reference to what it ran, its
result or its context.

:func:`reusing_greenlets` gives an ``AsyncSession`` method that does the same with this
``greenlet_spawn``: SQLAlchemy's own code, so the library does not copy it.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

from greenlet import GreenletExit, getcurrent
from greenlet import greenlet as Greenlet
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import session as asyncio_session

F = TypeVar("F", bound=Callable[..., Any])

#: Idle greenlets kept per thread. Under load, about one per request awaiting inside a
#: session call; each holds its frame stack's chunk and a few KiB of saved C stack.
MAX_IDLE = 64


class _Finished:
    """What a runner switches to its caller when its call has returned or raised."""


_FINISHED: Final = _Finished()


class _Runner(Greenlet):  # type: ignore[misc]
    """A greenlet that runs one call after another, each in its caller's context."""

    # What SQLAlchemy's await_() and in_greenlet() look for.
    __sqlalchemy_greenlet_provider__ = True

    def __init__(self) -> None:
        super().__init__(self._serve)
        self.call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None = None
        self.value: Any = None
        self.error: BaseException | None = None

    def _serve(self) -> None:
        while True:
            self._run()
            self.parent.switch(_FINISHED)

    def _run(self) -> None:
        # A frame of its own: what the call used is gone once the runner waits again.
        assert self.call is not None
        fn, args, kwargs = self.call
        self.call = None
        try:
            self.value = fn(*args, **kwargs)
        except GreenletExit:
            # Killed (the runner was dropped mid-call): let it die.
            raise
        except BaseException as error:
            self.error = error


class _Idle(threading.local):
    def __init__(self) -> None:
        self.runners: list[_Runner] = []


_idle = _Idle()


async def greenlet_spawn(
    fn: Callable[..., Any], *args: Any, _require_await: bool = False, **kwargs: Any
) -> Any:
    """SQLAlchemy's ``greenlet_spawn``, in a reused greenlet of this thread."""
    idle = _idle.runners
    runner = idle.pop() if idle else _Runner()
    caller = getcurrent()
    runner.parent = caller
    runner.gr_context = caller.gr_context
    runner.call = (fn, args, kwargs)
    switched = False
    result = runner.switch()
    while result is not _FINISHED:
        switched = True
        try:
            # What the sync code awaits (await_), awaited here in the caller's task.
            value = await result
        except BaseException:
            result = runner.throw(*sys.exc_info())
        else:
            result = runner.switch(value)
    value, error = runner.value, runner.error
    runner.value = runner.error = None
    runner.gr_context = None
    if len(idle) < MAX_IDLE:
        idle.append(runner)
    if error is not None:
        # As from SQLAlchemy's greenlet: not chained to an exception the caller handles.
        context = error.__context__
        try:
            raise error
        finally:
            error.__context__ = context
            error = context = None
    if _require_await and not switched:
        raise exc.AwaitRequired(
            "The current operation required an async execution but none was "
            "detected. This will usually happen when using a non compatible "
            "DBAPI driver. Please ensure that an async DBAPI is used."
        )
    return value


#: The namespace of SQLAlchemy's AsyncSession methods, with this module's greenlet_spawn.
_SESSION_GLOBALS: Final = {**vars(asyncio_session), "greenlet_spawn": greenlet_spawn}


def reusing_greenlets(method: F) -> F:
    """``method`` (an ``AsyncSession`` function) with :func:`greenlet_spawn` for SQLAlchemy's.

    The same code object, run with a namespace where ``greenlet_spawn`` is this module's;
    a method that does not spawn a greenlet, or an SQLAlchemy whose session module no
    longer has ``greenlet_spawn``, is returned as it is.
    """
    if (
        not isinstance(method, types.FunctionType)
        or method.__globals__ is not vars(asyncio_session)
        or "greenlet_spawn" not in method.__code__.co_names
        or "greenlet_spawn" not in vars(asyncio_session)
    ):
        return method
    rebound = types.FunctionType(
        method.__code__,
        _SESSION_GLOBALS,
        method.__name__,
        method.__defaults__,
        method.__closure__,
    )
    rebound.__kwdefaults__ = method.__kwdefaults__
    rebound.__qualname__ = method.__qualname__
    rebound.__doc__ = method.__doc__
    rebound.__annotations__ = method.__annotations__
    rebound.__wrapped__ = method  # type: ignore[attr-defined]
    return cast(F, rebound)
