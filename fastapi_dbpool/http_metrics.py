"""The HTTP metrics: prometheus-fastapi-instrumentator's, brought by DBPoolMiddleware.

:class:`HTTPMetrics` wraps the instrumentator's middleware, switched by
``DB_HTTP_METRICS``; :func:`http_instrumentation` makes the HTTP families once per
registry; :func:`registry_of` tells the lifespan which registry an app's middleware uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from timeit import default_timer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_fastapi_instrumentator import metrics
from prometheus_fastapi_instrumentator import metrics as instrumentator_metrics
from prometheus_fastapi_instrumentator.middleware import PrometheusInstrumentatorMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import STATE_KEY
from .errors import ConfigurationError
from .metrics import HTTP_DURATION, HTTP_REQUESTS, _registries_lock
from .metrics_multiprocess import multiprocess_dir
from .runtime import DBPoolRuntime, Refusal

#: Where DBPoolMiddleware leaves its registry for the lifespan (``app.state``).
_REGISTRY_ATTR = "fastapi_dbpool_registry"

# One set of HTTP metrics per registry, however many apps or rebuilt stacks use it.
_http_instrumentations: weakref.WeakKeyDictionary[CollectorRegistry, Callable[[Any], None]] = (
    weakref.WeakKeyDictionary()
)


def http_instrumentation(registry: CollectorRegistry) -> Callable[[Any], None]:
    """The instrumentator's default HTTP metrics in ``registry``, created once per registry.

    Raises:
        ConfigurationError: Another instrumentator already registered them there.
    """
    if multiprocess_dir() is not None:
        # Served from the files, not from a registry; one set per process (see the mirror).
        registry = _multiprocess_http_registry
    with _registries_lock:
        instrumentation = _http_instrumentations.get(registry)
        if instrumentation is None:
            instrumentation = instrumentator_metrics.default(registry=registry)
            if instrumentation is None:
                # The instrumentator swallows DuplicateTimeseries and returns None: say so
                # instead of serving no HTTP metrics.
                raise ConfigurationError(
                    f"the HTTP metrics ({HTTP_REQUESTS}, {HTTP_DURATION}) are already "
                    "registered in this CollectorRegistry, probably by Instrumentator()"
                    ".instrument(app): remove it, or set DB_HTTP_METRICS=false to keep it"
                )
            _http_instrumentations[registry] = instrumentation
        return instrumentation


_multiprocess_http_registry = CollectorRegistry()


class HTTPMetrics:
    """prometheus-fastapi-instrumentator's middleware, switched by ``DB_HTTP_METRICS``.

    DBPoolMiddleware puts it outside its own handling, so a request is recorded with the
    status the client got (a failed commit's 500, a 503 for no connection) and labelled
    with its route template. Built with every middleware stack, it registers nothing
    itself: the registry's HTTP families are made once (:func:`http_instrumentation`), so
    a rebuilt stack, or a second app, neither raises DuplicateTimeseries nor silently loses
    them. It also tells the lifespan which registry the app uses.

    Args:
        app: The ASGI app to instrument.
        registry: Default ``prometheus_client.REGISTRY``.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry | None = None) -> None:
        self.app = app
        self.registry = REGISTRY if registry is None else registry
        self._instrumented: PrometheusInstrumentatorMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            runtime = _runtime_of(scope)
            if runtime is not None and runtime.http_metrics:
                instrumented = self._instrumented or self._instrument()
                if runtime.route_databases:
                    started = default_timer()
                    refused = runtime.refuse_at_door(scope)
                    if refused is not None:
                        await self._refuse(runtime, refused, scope, send, instrumented, started)
                        return
                await instrumented(scope, receive, send)
                return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _instrument(self) -> PrometheusInstrumentatorMiddleware:
        instrumentation = http_instrumentation(self.registry)
        self._instrumented = PrometheusInstrumentatorMiddleware(
            self.app, instrumentations=[instrumentation], registry=self.registry
        )
        return self._instrumented

    async def _refuse(
        self,
        runtime: DBPoolRuntime,
        refused: Refusal,
        scope: Scope,
        send: Send,
        instrumented: PrometheusInstrumentatorMiddleware,
        started: float,
    ) -> None:
        """Answer a request refused at the door, and count it as the instrumentator would.

        The instrumentator's middleware costs about as much as the refusal itself (it
        wraps the request, builds a response object, matches the route again); under a
        burst of thousands of refusals that is the difference between answering them all
        by the deadline and not. Its own label logic and instrumentation are used, so the
        request is counted exactly as if it had gone through it.
        """
        from .middleware import answer_refusal

        response = await answer_refusal(send, refused.error, runtime)
        request = Request(scope)
        # A route of the app itself (refuse_at_door matches no other): its template is
        # what the instrumentator's own lookup would find, without matching again.
        path = getattr(refused.route, "path", None)
        if isinstance(path, str):
            handler, templated = path, True
        else:
            handler, templated = instrumented._get_handler(request)
        if instrumented._is_handler_excluded(handler, templated):
            return
        if not templated and instrumented.should_group_untemplated:
            handler = "none"
        status = str(response.status)
        if instrumented.should_group_status_codes:
            status = status[0] + "xx"
        duration = max(default_timer() - started, 0.0)
        info = metrics.Info(
            request=request,
            response=_SentResponse(len(response.body())),  # type: ignore[arg-type]
            method=request.method,
            modified_handler=handler,
            modified_status=status,
            modified_duration=duration,
            modified_duration_without_streaming=duration,
        )
        for instrumentation in instrumented.instrumentations:
            instrumentation(info)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        if state is not None:
            setattr(state, _REGISTRY_ATTR, self.registry)

        async def started(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                runtime = _runtime_of(scope)
                if runtime is not None and runtime.http_metrics:
                    # A clash with another instrumentator stops startup, not a request.
                    self._instrument()
            await send(message)

        await self.app(scope, receive, started)


class _SentResponse:
    """What the instrumentation reads of a response: its headers' Content-Length."""

    __slots__ = ("headers",)

    def __init__(self, length: int) -> None:
        self.headers = {"Content-Length": str(length)}


def _runtime_of(scope: Scope) -> DBPoolRuntime | None:
    state = scope.get("state")
    runtime = state.get(STATE_KEY) if state else None
    return runtime if isinstance(runtime, DBPoolRuntime) else None


def registry_of(app: Any) -> CollectorRegistry:
    """The registry DBPoolMiddleware of ``app`` uses (``prometheus_client.REGISTRY``
    unless it was given one)."""
    registry = getattr(getattr(app, "state", None), _REGISTRY_ATTR, None)
    return registry if isinstance(registry, CollectorRegistry) else REGISTRY
