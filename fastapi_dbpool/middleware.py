"""DBPoolMiddleware, pure ASGI: the request scope of the database.

Per HTTP request it sets the request context, releases the request's connections before
the response's first byte (or when a streamed body ends), commits first in autocommit
mode, turns database failures into 503/504 JSON responses, and cancels the handler when
the client disconnects mid-query. At startup it checks that the dbpool lifespan ran.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import STATE_KEY, current_request
from .errors import CheckoutTimeoutError, CircuitOpenError, NotInstalledError
from .http_metrics import HTTPMetrics
from .requests import RequestContext, scope_route
from .responses import ErrorResponse, map_exception
from .runtime import DBPoolRuntime

logger = logging.getLogger("fastapi_dbpool")

ANSWERED_MESSAGE = "database failure answered %d: %s (%s)"

LIFESPAN_MISSING = (
    "DBPoolMiddleware is installed but the fastapi_dbpool lifespan did not run: create the "
    "app with `FastAPI(lifespan=dbpool.lifespan)` or call `dbpool.install(app)`"
)


class DBPoolMiddleware:
    """Pure ASGI middleware giving each request its database scope.

    Add it with ``app.add_middleware(dbpool.DBPoolMiddleware)`` (``dbpool.install(app)``
    does it for you). It brings prometheus-fastapi-instrumentator's HTTP metrics
    (``DB_HTTP_METRICS=false`` turns them off).

    Args:
        app: The ASGI app to wrap.
        registry: The Prometheus registry of the app's metrics (pools and HTTP), served on
            ``/metrics``; default ``prometheus_client.REGISTRY``:
            ``app.add_middleware(dbpool.DBPoolMiddleware, registry=CollectorRegistry())``.
    """

    def __init__(self, app: ASGIApp, *, registry: CollectorRegistry | None = None) -> None:
        self.app = app
        # The HTTP metrics wrap our own handling so that they record the status the client
        # got (a failed commit's 500, a mapped 503/504). Nothing is registered here:
        # Starlette may build the middleware stack more than once.
        self._entry = HTTPMetrics(
            # HTTPMetrics checks the door itself, and calls the request handling directly.
            self._serve,
            registry,
            http=functools.partial(self._request, door=False),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            state = scope.get("state")
            runtime = state.get(STATE_KEY) if state else None
            if not isinstance(runtime, DBPoolRuntime):
                raise NotInstalledError(LIFESPAN_MISSING)
            # Straight to the request (through the HTTP metrics' timing if they are on):
            # every layer is passed through at each await of the request.
            if runtime.http_metrics:
                await self._entry.timed(runtime, scope, receive, send)
            else:
                await self._request(runtime, scope, receive, send)
            return
        await self._entry(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, _check_startup(scope, send))
            return
        state = scope.get("state")
        runtime = state.get(STATE_KEY) if state else None
        if not isinstance(runtime, DBPoolRuntime):
            raise NotInstalledError(LIFESPAN_MISSING)
        if kind == "http":
            # HTTP metrics turned off after the stack was built: an unrecorded request.
            await self._request(runtime, scope, receive, send)
            return
        ctx = RequestContext(runtime, scope, receive)
        token = current_request.set(ctx)
        runtime.request_started()
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            ctx.broken_off = True
            raise
        finally:
            try:
                await ctx.finish()
            finally:
                runtime.request_finished()
                current_request.reset(token)

    async def _request(
        self,
        runtime: DBPoolRuntime,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        door: bool = True,
    ) -> None:
        if door and runtime.route_databases:
            refused = runtime.refuse_at_door(scope)
            if refused is not None:
                await answer_refusal(send, refused.error, runtime)
                return
        ctx = RequestContext(runtime, scope, receive)
        token = current_request.set(ctx)
        runtime.request_started()
        try:
            started = False
            stream_open = False
            replaced = False
            autocommit = runtime.autocommit

            async def send_wrapper(message: Message) -> None:
                nonlocal started, stream_open, replaced
                if replaced:
                    return
                kind = message["type"]
                if kind == "http.response.start":
                    started = True
                    if ctx.has_sessions:
                        status = message["status"]
                        if autocommit and status < 400:
                            try:
                                await ctx.commit()
                            except Exception as exc:
                                # No 2xx for a write that did not commit.
                                replaced = True
                                await ctx.release()
                                await send_error(send, _commit_failure(exc, runtime))
                                return
                        if _has_content_length(message):
                            await ctx.release()
                        else:
                            stream_open = True
                elif kind == "http.response.body" and not message.get("more_body"):
                    # The response is complete: a disconnect from now on is the client leaving
                    # normally, not a reason to cancel what still runs (BackgroundTasks).
                    ctx.response_complete()
                    if stream_open:
                        stream_open = False
                        await ctx.release()
                await send(message)

            try:
                await self.app(ctx.scope, ctx.receive, send_wrapper)
            except asyncio.CancelledError:
                ctx.broken_off = True
                task = asyncio.current_task()
                if not ctx.cancelled_on_disconnect or task is None:
                    await ctx.finish()
                    raise
                # We cancelled the handler because the client left; nobody awaits a response.
                task.uncancel()
                await ctx.finish()
                return
            except Exception as exc:
                answer = ctx.failure_answer(exc)
                mapped = map_exception(answer, checkout_timeout=runtime.settings.checkout_timeout)
                await ctx.finish()
                if mapped is None or started:
                    raise
                # While the breaker is open, or the pool is saturated, many requests are refused
                # at once: they are counted in metrics and stay at DEBUG here rather than flood
                # the log.
                level = (
                    logging.DEBUG
                    if isinstance(exc, CircuitOpenError | CheckoutTimeoutError)
                    else logging.WARNING
                )
                logger.log(
                    level,
                    ANSWERED_MESSAGE,
                    mapped.status,
                    type(exc).__name__,
                    scope_route(ctx.scope),
                    extra={
                        "status": mapped.status,
                        "error": type(exc).__name__,
                        "route": scope_route(ctx.scope),
                    },
                )
                await send_error(send, mapped)
                return
            await ctx.finish()
        finally:
            runtime.request_finished()
            current_request.reset(token)


async def answer_refusal(send: Send, exc: Exception, runtime: DBPoolRuntime) -> ErrorResponse:
    """Answer a request refused at the door (``DBPoolRuntime.refuse_at_door``).

    The same answer get_session would give a moment later, without routing, dependencies
    and an exception through every layer, which under a burst of thousands keeps the
    event loop busy long enough for the requests being served to miss their deadlines.
    """
    mapped = map_exception(exc, checkout_timeout=runtime.settings.checkout_timeout)
    assert mapped is not None  # a DatabaseUnavailableError always maps
    logger.debug(
        ANSWERED_MESSAGE,
        mapped.status,
        type(exc).__name__,
        "at the door",
        extra={"status": mapped.status, "error": type(exc).__name__},
    )
    await send_error(send, mapped)
    return mapped


def _has_content_length(message: Message) -> bool:
    return any(name == b"content-length" for name, _ in message.get("headers", ()))


def _commit_failure(exc: Exception, runtime: DBPoolRuntime) -> ErrorResponse:
    mapped = map_exception(exc, checkout_timeout=runtime.settings.checkout_timeout)
    if mapped is not None:
        return mapped
    from sqlalchemy.exc import IntegrityError

    if isinstance(exc, IntegrityError):
        return ErrorResponse(409, "the change conflicts with existing data and was not saved")
    logger.error("commit failed: %s", type(exc).__name__, extra={"error": type(exc).__name__})
    return ErrorResponse(500, "the change could not be saved")


async def send_error(send: Send, error: ErrorResponse) -> None:
    """Send an error response: status line, headers and the JSON body."""
    await send({"type": "http.response.start", "status": error.status, "headers": error.headers()})
    await send({"type": "http.response.body", "body": error.body()})


def _check_startup(scope: Scope, send: Send) -> Send:
    async def checked(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            state = scope.get("state")
            if not state or STATE_KEY not in state:
                # Raised into the app's lifespan, which then reports startup.failed with
                # this message and runs the app's own shutdown code.
                raise NotInstalledError(LIFESPAN_MISSING)
        await send(message)

    return checked
