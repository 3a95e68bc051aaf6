"""Leak tracking, fed by the pool's checkout and checkin events.

Every checkout records who took the connection: the request being served (from the
``current_request`` ContextVar), the task, and with ``DB_LEAK_TRACK_STACK`` the user's
frames. Three kinds of leak are reported, each once:

- ``outlived_request``: still checked out when the request that took it has completed
  (a task the handler spawned and did not await, a session it never closed);
- ``used_after_request``: checked out by a request that had already completed (its
  session captured by a fire-and-forget task);
- ``held_too_long``: checked out outside any request for longer than
  ``DB_LEAK_THRESHOLD``.

A request that simply runs long is not a leak: its connection is reported as ``slow``
(an INFO record), not counted as leaked. When a reported connection comes back, that is
logged too, as HikariCP does ("previously reported leak returned after N s").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import greenlet

if TYPE_CHECKING:
    from .engines import Database
    from .requests import RequestContext

logger = logging.getLogger("fastapi_dbpool")

OUTLIVED_REQUEST = "outlived_request"
USED_AFTER_REQUEST = "used_after_request"
HELD_TOO_LONG = "held_too_long"
LEAK_KINDS = (OUTLIVED_REQUEST, USED_AFTER_REQUEST, HELD_TOO_LONG)

LEAK_MESSAGE = "connection leak (%s) on the %s database: held %.1fs by %s%s"
RETURNED_MESSAGE = "previously reported leak returned after %.1fs (%s database, %s)"
RECLAIM_MESSAGE = "reclaimed leaked connection of the %s database after %.1fs (%s)"
SLOW_MESSAGE = "slow request holds a %s connection for %.1fs: %s"

#: Frames from these folders are not the user's and are trimmed from leak stacks.
_LIBRARY_DIRS = tuple(
    {os.path.dirname(os.__file__), os.path.dirname(__file__) + os.sep}
    | {p for p in sys.path if p.endswith("site-packages")}
    | {sys.prefix + os.sep, sys.base_prefix + os.sep}
)
_STACK_LIMIT = 8


@dataclass(frozen=True, slots=True)
class LeakReport:
    """One reported leak, as logged, counted and listed in /health/database."""

    kind: str
    database: str
    held_for: float
    route: str | None
    method: str | None
    request_id: str | None
    task: str | None
    stack: tuple[str, ...] = ()
    at: float = field(default_factory=time.time)

    def as_dict(self, *, with_stack: bool = True) -> dict[str, Any]:
        """JSON-able form."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "database": self.database,
            "held_for": round(self.held_for, 3),
            "route": self.route,
            "method": self.method,
            "request_id": self.request_id,
            "task": self.task,
            "at": self.at,
        }
        if with_stack:
            out["stack"] = list(self.stack)
        return out

    def describe(self) -> str:
        """Who held it, in words."""
        if self.route is not None:
            who = f"{self.method} {self.route}"
            if self.request_id:
                who += f" (request {self.request_id})"
        else:
            who = "code outside any request"
        if self.task:
            who += f", task {self.task}"
        return who


class Checkout:
    """One connection while it is checked out of the pool."""

    __slots__ = ("owner", "record", "reported", "slow", "stack", "started", "task")

    def __init__(
        self,
        record: Any,
        started: float,
        owner: RequestContext | None,
        task: asyncio.Task[Any] | None,
        stack: tuple[str, ...],
    ) -> None:
        self.record = record
        self.started = started
        self.owner = owner
        self.task = task
        self.stack = stack
        self.reported: str | None = None
        self.slow = False


def capture_stack() -> tuple[str, ...]:
    """The user's frames at this point, innermost first ("file:line in function")."""
    frame: FrameType | None
    current = greenlet.getcurrent()
    parent = current.parent
    # Inside SQLAlchemy's greenlet the interesting frames are the suspended caller's:
    # the task that awaited session.execute() / engine.connect().
    frame = parent.gr_frame if parent is not None and parent.gr_frame is not None else None
    if frame is None:
        frame = sys._getframe(1)
    lines: list[str] = []
    while frame is not None and len(lines) < _STACK_LIMIT:
        filename = frame.f_code.co_filename
        if not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<"):
            lines.append(f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return tuple(lines)


class LeakTracker:
    """Reports, counts and remembers leaks of one application; reclaims when told to.

    Args:
        threshold: ``DB_LEAK_THRESHOLD``: seconds an unowned checkout may be held, and
            how long a request may hold one before it is reported as slow.
        reclaim_after: Seconds after which a leaked connection of a completed request is
            invalidated (None: never).
        reclaim_unowned: Also reclaim ``held_too_long`` connections.
        recent: How many recent leaks to keep for /health/database.
        clock: Monotonic clock.
    """

    def __init__(
        self,
        *,
        threshold: float,
        reclaim_after: float | None,
        reclaim_unowned: bool = False,
        recent: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.reclaim_after = reclaim_after
        self.reclaim_unowned = reclaim_unowned
        self.clock = clock
        self.recent: collections.deque[LeakReport] = collections.deque(maxlen=recent)
        self.counts: dict[tuple[str, str], int] = {}
        self.reclaimed: dict[str, int] = {}
        self.slow_holds: dict[str, int] = {}
        self._listeners: list[Callable[[LeakReport], None]] = []

    # -- reporting --------------------------------------------------------------------

    def report(self, db: Database, checkout: Checkout, kind: str, now: float) -> LeakReport:
        """Report one leak (log, count, remember) and mark the checkout reported."""
        checkout.reported = kind
        owner = checkout.owner
        report = LeakReport(
            kind=kind,
            database=db.name,
            held_for=now - checkout.started,
            route=owner.route() if owner is not None else None,
            method=owner.scope.get("method") if owner is not None else None,
            request_id=owner.request_id() if owner is not None else None,
            task=checkout.task.get_name() if checkout.task is not None else None,
            stack=checkout.stack,
        )
        key = (db.name, kind)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.recent.append(report)
        stack_text = ("\n  " + "\n  ".join(report.stack)) if report.stack else ""
        logger.warning(
            LEAK_MESSAGE,
            kind,
            db.name,
            report.held_for,
            report.describe(),
            stack_text,
            extra={"leak": report.as_dict()},
        )
        for listener in list(self._listeners):
            listener(report)
        return report

    def returned(self, db: Database, checkout: Checkout, now: float) -> None:
        """A reported connection came back to the pool."""
        logger.info(
            RETURNED_MESSAGE,
            now - checkout.started,
            db.name,
            checkout.reported,
            extra={
                "database": db.name,
                "kind": checkout.reported,
                "held_for": now - checkout.started,
            },
        )

    def total(self, kind: str | None = None) -> int:
        """Leaks reported so far (of one kind, or all)."""
        return sum(n for (_, k), n in self.counts.items() if kind is None or k == kind)

    @contextlib.contextmanager
    def listen(self, listener: Callable[[LeakReport], None]) -> Iterator[None]:
        """Call ``listener`` with every report made inside the block."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    # -- the checks ---------------------------------------------------------------------

    def request_finished(self, ctx: RequestContext, databases: list[Database]) -> None:
        """The request's ASGI call completed: what it still holds has leaked."""
        now = self.clock()
        for db in databases:
            for checkout in list(db.checked_out.values()):
                if checkout.owner is ctx and checkout.reported is None:
                    self.report(db, checkout, OUTLIVED_REQUEST, now)

    def scan(self, databases: list[Database], now: float | None = None) -> None:
        """Find unowned connections held too long, slow requests, and reclaim leaks."""
        now = self.clock() if now is None else now
        for db in databases:
            for checkout in list(db.checked_out.values()):
                held = now - checkout.started
                owner = checkout.owner
                if checkout.reported is None:
                    if owner is None and held > self.threshold:
                        self.report(db, checkout, HELD_TOO_LONG, now)
                    elif owner is not None and not owner.finished and held > self.threshold:
                        if not checkout.slow:
                            checkout.slow = True
                            self.slow_holds[db.name] = self.slow_holds.get(db.name, 0) + 1
                            logger.info(
                                SLOW_MESSAGE,
                                db.name,
                                held,
                                f"{owner.scope.get('method')} {owner.route()}",
                                extra={"database": db.name, "held_for": held},
                            )
                        continue
                    else:
                        continue
                if self.reclaim_after is None or held < self.reclaim_after:
                    continue
                if checkout.reported == HELD_TOO_LONG and not self.reclaim_unowned:
                    continue
                self._reclaim(db, checkout, held)

    def _reclaim(self, db: Database, checkout: Checkout, held: float) -> None:
        # The record's holder now (SQLAlchemy keeps a weak reference to it while the
        # connection is out; this checkout is the current one: checkins remove theirs).
        fairy_ref = checkout.record.fairy_ref
        fairy = fairy_ref() if fairy_ref is not None else None
        db.checked_out.pop(id(checkout.record), None)
        if fairy is None:
            return
        with contextlib.suppress(Exception):
            # Closes the socket and gives the slot back to the pool; the holder gets an
            # error on its next use of the connection.
            fairy.invalidate()
        self.reclaimed[db.name] = self.reclaimed.get(db.name, 0) + 1
        logger.warning(
            RECLAIM_MESSAGE,
            db.name,
            held,
            checkout.reported,
            extra={"database": db.name, "kind": checkout.reported, "held_for": held},
        )

    async def run(self, databases: list[Database]) -> None:
        """Scan periodically until cancelled."""
        interval = max(0.05, min(1.0, self.threshold / 4))
        if self.reclaim_after is not None:
            interval = min(interval, max(0.05, self.reclaim_after / 4))
        while True:
            await asyncio.sleep(interval)
            self.scan(databases)

    def snapshot(self, *, with_stacks: bool) -> dict[str, Any]:
        """Leak counts and recent reports for /health/database."""
        by_kind = {kind: self.total(kind) for kind in LEAK_KINDS}
        return {
            "total": self.total(),
            "by_kind": by_kind,
            "reclaimed": sum(self.reclaimed.values()),
            "slow_holds": sum(self.slow_holds.values()),
            "recent": [r.as_dict(with_stack=with_stacks) for r in list(self.recent)[-10:]],
        }
