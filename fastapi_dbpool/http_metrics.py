"""The HTTP metrics: prometheus-fastapi-instrumentator's, brought by DBPoolMiddleware.

:class:`HTTPMetrics` records each request as the instrumentator's middleware would (through
:class:`HTTPRecorder`, without that middleware's per-request cost), switched by
``DB_HTTP_METRICS``; :func:`http_instrumentation` makes the HTTP families once per
registry; :func:`registry_of` tells the lifespan which registry an app's middleware uses.
"""

from __future__ import annotations

import re
import threading
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from timeit import default_timer
from typing import Any, Literal, NamedTuple

from fastapi.routing import APIWebSocketRoute
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, Summary
from prometheus_fastapi_instrumentator import metrics, routing
from prometheus_fastapi_instrumentator import metrics as instrumentator_metrics
from starlette.convertors import (
    FloatConvertor,
    IntegerConvertor,
    PathConvertor,
    StringConvertor,
    UUIDConvertor,
)
from starlette.requests import Request
from starlette.routing import Mount, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import STATE_KEY
from .errors import ConfigurationError
from .health import matched_by_path
from .metrics import HTTP_DURATION, HTTP_REQUESTS, _registries_lock
from .metrics_multiprocess import multiprocess_dir
from .runtime import DBPoolRuntime, Refusal

#: An HTTP request's handler below the metrics, given the runtime the metrics looked up.
RuntimeApp = Callable[[DBPoolRuntime, Scope, Receive, Send], Awaitable[None]]

#: Where DBPoolMiddleware leaves its registry for the lifespan (``app.state``).
_REGISTRY_ATTR = "fastapi_dbpool_registry"

# One set of HTTP metrics per registry, however many apps or rebuilt stacks use it.
_http_sinks: weakref.WeakKeyDictionary[CollectorRegistry, HTTPSink] = weakref.WeakKeyDictionary()


def http_instrumentation(registry: CollectorRegistry) -> Callable[[Any], None]:
    """The instrumentator's default HTTP metrics in ``registry``, created once per registry.

    Raises:
        ConfigurationError: Another instrumentator already registered them there.
    """
    return http_sink(registry).instrumentation


def http_sink(registry: CollectorRegistry) -> HTTPSink:
    """Where requests are recorded into the HTTP families of ``registry`` (made once).

    Raises:
        ConfigurationError: Another instrumentator already registered them there.
    """
    multiprocess = multiprocess_dir() is not None
    if multiprocess:
        # Served from the files, not from a registry; one set per process (see the mirror).
        registry = _multiprocess_http_registry
    with _registries_lock:
        sink = _http_sinks.get(registry)
        if sink is None:
            instrumentation = instrumentator_metrics.default(registry=registry)
            if instrumentation is None:
                # The instrumentator swallows DuplicateTimeseries and returns None: say so
                # instead of serving no HTTP metrics.
                raise ConfigurationError(
                    f"the HTTP metrics ({HTTP_REQUESTS}, {HTTP_DURATION}) are already "
                    "registered in this CollectorRegistry, probably by Instrumentator()"
                    ".instrument(app): remove it, or set DB_HTTP_METRICS=false to keep it"
                )
            # Across processes the families are read from their files, never collected
            # here: nothing would add a batch to them.
            sink = HTTPSink(instrumentation, _Families.of(registry), batched=not multiprocess)
            _http_sinks[registry] = sink
        return sink


_multiprocess_http_registry = CollectorRegistry()


class HTTPMetrics:
    """prometheus-fastapi-instrumentator's HTTP metrics, switched by ``DB_HTTP_METRICS``.

    DBPoolMiddleware puts it outside its own handling, so a request is recorded with the
    status the client got (a failed commit's 500, a 503 for no connection) and labelled
    with its route template. Built with every middleware stack, it registers nothing
    itself: the registry's HTTP families are made once (:func:`http_instrumentation`), so
    a rebuilt stack, or a second app, neither raises DuplicateTimeseries nor silently loses
    them. It also tells the lifespan which registry the app uses.

    It records what the instrumentator's middleware records, with its default
    instrumentation, into the families that instrumentation registered, but not the way
    that middleware does it (about 35 us per request on a slow machine: it matches the
    route against every route again, builds a request and a response object and an
    ``Info``, and resolves five label sets). Here the route template comes from the app's
    routes compiled once (:class:`RouteNames`), a label set's metric children are resolved
    once, a request adds to a batch (:class:`HTTPSink`); nothing else is built.

    Args:
        app: The ASGI app to instrument.
        registry: Default ``prometheus_client.REGISTRY``.
        http: What serves an HTTP request once it is timed (default ``app``): given the
            runtime too, so DBPoolMiddleware's request handling is called directly, not
            through another layer.
    """

    def __init__(
        self,
        app: ASGIApp,
        registry: CollectorRegistry | None = None,
        *,
        http: RuntimeApp | None = None,
    ) -> None:
        self.app = app
        self.registry = REGISTRY if registry is None else registry
        self._http = http or _ignoring_runtime(app)
        self._recorder: HTTPRecorder | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            runtime = _runtime_of(scope)
            if runtime is not None and runtime.http_metrics:
                await self.timed(runtime, scope, receive, send)
                return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def timed(
        self, runtime: DBPoolRuntime, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Serve an HTTP request and record it (for a caller that has its runtime)."""
        recorder = self._recorder or self._instrument()
        started = default_timer()
        # Before the app runs: the router adds to the scope (a mount's root_path).
        method: str = scope["method"]
        handler = recorder.handler(scope)
        if runtime.route_databases:
            refused = runtime.refuse_at_door(scope)
            if refused is not None:
                await self._refuse(
                    runtime, refused, scope, send, recorder, method, handler, started
                )
                return
        status: int = 500
        headers: Any = ()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
            await send(message)

        try:
            await self._http(runtime, scope, receive, send_wrapper)
        finally:
            recorder.record(scope, method, handler, status, _content_length(headers), started)

    def _instrument(self) -> HTTPRecorder:
        self._recorder = HTTPRecorder(self.registry)
        return self._recorder

    async def _refuse(
        self,
        runtime: DBPoolRuntime,
        refused: Refusal,
        scope: Scope,
        send: Send,
        recorder: HTTPRecorder,
        method: str,
        handler: str,
        started: float,
    ) -> None:
        """Answer a request refused at the door, and count it as any other request."""
        from .middleware import answer_refusal

        response = await answer_refusal(send, refused.error, runtime)
        recorder.record(scope, method, handler, response.status, len(response.body()), started)

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


class HTTPRecorder:
    """Records requests as the instrumentator's middleware and default metrics do.

    The same families (made by ``metrics.default()``), the same labels: ``handler`` is the
    route template the instrumentator's ``get_route_name`` finds (``none`` for a path no
    route matches), ``status`` the status group (``2xx``), ``method`` the request's; the
    same observations: the request's and the response's ``Content-Length`` (0 without
    one, and here also for one that is not a number, where the instrumentator raises
    after the response went out), the time from the request's arrival to its end.

    Route templates come from :class:`RouteNames` where the app's routes allow it (from
    the instrumentator's own matching where they do not), and the template of each
    (method, path, root_path) is kept, up to ``MAX_KEPT`` of them, all forgotten when the
    app's routes change in number (:class:`HTTPSink` keeps the metric children of each
    label set). Past that limit it works as the instrumentator does, uncached. Should
    an instrumentator version register other families than this one knows, it calls that
    instrumentator's instrumentation with an ``Info``, as its middleware does.
    """

    #: How many route templates are kept.
    MAX_KEPT = 4096

    def __init__(self, registry: CollectorRegistry) -> None:
        self._sink = http_sink(registry)
        self._handlers: dict[tuple[str, str, str], str] = {}
        self._app: Any = None
        self._routes: Any = ()
        self._routes_count = -1
        self._names: RouteNames | None = None

    def handler(self, scope: Scope) -> str:
        """The ``handler`` label of a request, from its scope as it arrived."""
        app = scope.get("app")
        if app is not self._app or len(self._routes) != self._routes_count:
            self._learn(app)
        method: str = scope["method"]
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        key = (method, path, root_path)
        handler = self._handlers.get(key)
        if handler is None:
            names = self._names
            name = (
                names.name(method, path, root_path)
                if names is not None
                else routing.get_route_name(Request(scope), should_include_root_path=False)
            )
            # The instrumentator groups untemplated paths.
            handler = "none" if name is None else name
            if names is not None and len(self._handlers) < self.MAX_KEPT:
                self._handlers[key] = handler
        return handler

    def _learn(self, app: Any) -> None:
        routes = getattr(app, "routes", None)
        self._app = app
        self._routes = routes if isinstance(routes, list) else ()
        self._routes_count = len(self._routes)
        self._names = RouteNames.of(app)
        self._handlers.clear()

    def record(
        self,
        scope: Scope,
        method: str,
        handler: str,
        status: int,
        response_length: int,
        started: float,
    ) -> None:
        """Record one finished request."""
        duration = max(default_timer() - started, 0.0)
        group = _STATUS_GROUPS.get(status) or str(int(status))[0] + "xx"
        self._sink.add(
            scope,
            method,
            group,
            handler,
            _content_length(scope["headers"]),
            response_length,
            duration,
        )


class HTTPSink:
    """The HTTP families of one registry, and the requests recorded since they were read.

    A request's five observations through prometheus_client cost ~5 us (a lock, a call
    and a check per value, a search per histogram, a label lookup per family). Here a
    request adds to a batch under one lock, in plain numbers per label set, and the batch
    goes into the families whenever one of them is read (a scrape, ``get_sample_value``,
    a restricted scrape of one family): what a reader sees is every request finished
    before the read, as with the instrumentator. The children of a label set are made at
    its first request (their ``_created`` time is that request's, as there).

    Recorded directly, as the instrumentator does, when the families' values live in
    files read by another process (``PROMETHEUS_MULTIPROC_DIR``), when more than
    ``MAX_PENDING`` label sets are waiting, and when prometheus_client's classes are not
    shaped as this code knows (then through the instrumentation itself).
    """

    #: Label sets kept with their children; label sets waiting in a batch.
    MAX_KEPT = 4096
    MAX_PENDING = 1024

    def __init__(
        self, instrumentation: Callable[[Any], None], families: _Families | None, *, batched: bool
    ) -> None:
        self.instrumentation = instrumentation
        self._families = families
        self._children: dict[tuple[str, str, str], _Children] = {}
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, str], list[Any]] = {}
        self._highr: list[Any] = []
        self._latency_bounds: list[float] = []
        self._highr_bounds: list[float] = []
        self._batched = batched and families is not None and self._shapes_known(families)
        if self._batched and families is not None:
            for family in families:
                _read_first(family, self.flush)

    def _shapes_known(self, families: _Families) -> bool:
        """Whether the families keep their values where :meth:`flush` adds to them."""
        if not _histogram_shaped(families.latency_highr) or not isinstance(
            getattr(families.latency, "_upper_bounds", None), list
        ):
            return False
        # Labelled children, of prometheus_client's classes as installed, registered nowhere.
        summary = Summary("dbpool_probe", "", ["label"], registry=None).labels("value")
        histogram = Histogram("dbpool_probe", "", ["label"], registry=None).labels("value")
        if not (_summary_shaped(summary) and _histogram_shaped(histogram)):
            return False
        self._latency_bounds = list(families.latency._upper_bounds)
        self._highr_bounds = list(families.latency_highr._upper_bounds)
        self._highr = [0.0] + [0] * len(self._highr_bounds)
        return True

    def add(
        self,
        scope: Scope,
        method: str,
        group: str,
        handler: str,
        request_length: int,
        response_length: int,
        duration: float,
    ) -> None:
        """Record one finished request."""
        families = self._families
        if families is None:
            _record_with_info(
                self.instrumentation, scope, method, handler, group, response_length, duration
            )
            return
        key = (method, group, handler)
        children = self._children.get(key)
        if children is None:
            children = self._bind(families, key)
        if self._batched:
            with self._lock:
                batch = self._pending.get(key)
                if batch is not None or len(self._pending) < self.MAX_PENDING:
                    if batch is None:
                        batch = [children, 0, 0, 0, 0.0, *([0] * len(self._latency_bounds))]
                        self._pending[key] = batch
                    batch[1] += 1
                    batch[2] += request_length
                    batch[3] += response_length
                    batch[4] += duration
                    batch[5 + bisect_left(self._latency_bounds, duration)] += 1
                    highr = self._highr
                    highr[0] += duration
                    highr[1 + bisect_left(self._highr_bounds, duration)] += 1
                    return
        children.total.inc()
        children.request_size.observe(request_length)
        children.response_size.observe(response_length)
        families.latency_highr.observe(duration)
        children.latency.observe(duration)

    def _bind(self, families: _Families, key: tuple[str, str, str]) -> _Children:
        method, group, handler = key
        children = _Children(
            families.total.labels(method, group, handler),
            families.request_size.labels(handler),
            families.response_size.labels(handler),
            families.latency.labels(method, handler),
        )
        if len(self._children) < self.MAX_KEPT:
            self._children[key] = children
        return children

    def flush(self) -> None:
        """Add the requests recorded since the last read to the families."""
        with self._lock:
            pending, self._pending = self._pending, {}
            highr = self._highr
            self._highr = [0.0] + [0] * len(self._highr_bounds)
        for children, count, request_bytes, response_bytes, seconds, *buckets in pending.values():
            children.total.inc(count)
            _add_to_summary(children.request_size, count, request_bytes)
            _add_to_summary(children.response_size, count, response_bytes)
            _add_to_histogram(children.latency, seconds, buckets)
        if self._families is not None and any(highr[1:]):
            _add_to_histogram(self._families.latency_highr, highr[0], highr[1:])


def _record_with_info(
    instrumentation: Callable[[Any], None],
    scope: Scope,
    method: str,
    handler: str,
    group: str,
    response_length: int,
    duration: float,
) -> None:
    info = metrics.Info(
        request=Request(scope),
        response=_SentResponse(response_length),  # type: ignore[arg-type]
        method=method,
        modified_handler=handler,
        modified_status=group,
        modified_duration=duration,
        modified_duration_without_streaming=duration,
    )
    instrumentation(info)


def _read_first(family: Any, flush: Callable[[], None]) -> None:
    """Make reading ``family`` (by any registry, restricted or not) add the batch first."""
    collect = family.collect

    def flushed_collect() -> Any:
        flush()
        return collect()

    family.collect = flushed_collect


def _histogram_shaped(histogram: Any) -> bool:
    return (
        isinstance(getattr(histogram, "_upper_bounds", None), list)
        and isinstance(getattr(histogram, "_buckets", None), list)
        and hasattr(getattr(histogram, "_sum", None), "inc")
    )


def _summary_shaped(summary: Any) -> bool:
    return hasattr(getattr(summary, "_count", None), "inc") and hasattr(
        getattr(summary, "_sum", None), "inc"
    )


def _add_to_summary(summary: Any, count: int, total: float) -> None:
    summary._count.inc(count)
    summary._sum.inc(total)


def _add_to_histogram(histogram: Any, total: float, buckets: list[int]) -> None:
    """Add observations to a histogram child: ``buckets[i]`` of them fell in bucket ``i``
    (the first whose bound they do not exceed), ``total`` their sum."""
    histogram._sum.inc(total)
    for value, bucket in zip(buckets, histogram._buckets, strict=True):
        if value:
            bucket.inc(value)


class _Children(NamedTuple):
    """The metric children of one (method, status group, handler)."""

    total: Any
    request_size: Any
    response_size: Any
    latency: Any


class _Families(NamedTuple):
    """The instrumentator's default families, as ``metrics.default()`` registered them."""

    total: Counter
    request_size: Summary
    response_size: Summary
    latency_highr: Histogram
    latency: Histogram

    @classmethod
    def of(cls, registry: CollectorRegistry) -> _Families | None:
        """Found by name in ``registry``; None unless each is of the expected kind and
        labels (another instrumentator version)."""
        collectors = getattr(registry, "_names_to_collectors", None)
        if not isinstance(collectors, dict):
            return None
        found: list[Any] = []
        for name, kind, labels in _DEFAULT_FAMILIES:
            collector = collectors.get(name)
            if type(collector) is not kind or getattr(collector, "_labelnames", None) != labels:
                return None
            found.append(collector)
        return cls(*found)


#: What ``metrics.default()`` registers: name, kind and label names (no custom labels).
_DEFAULT_FAMILIES: tuple[tuple[str, type, tuple[str, ...]], ...] = (
    ("http_requests_total", Counter, ("method", "status", "handler")),
    ("http_request_size_bytes", Summary, ("handler",)),
    ("http_response_size_bytes", Summary, ("handler",)),
    ("http_request_duration_highr_seconds", Histogram, ()),
    ("http_request_duration_seconds", Histogram, ("method", "handler")),
)


class RouteNames:
    """The instrumentator's ``get_route_name``, compiled once for an app's routes.

    The instrumentator matches a request against every route, as the router does, to find
    its template: ``route.matches()`` builds a child scope and converts the path
    parameters for each; for an app with a parameterized route that is ~9 us per request
    (a cache by path does not help when every item has its own path). Here each route is
    reduced to its path pattern, its methods and its template, in the order that matching
    visits them, and a request costs a regular-expression match per route until one
    matches, with the same outcome: the first route matching path and method, else the
    first matching the path only (a 405), else, with ``redirect_slashes``, the raw path
    when the path with its trailing slash toggled matches, else None.

    Only for apps whose every route matches on the method and the path alone, with
    Starlette's own parameter types: no ``Host`` route, no mounted app with routes of its
    own, no route class or convertor of the app's own (:meth:`of` returns None for any
    other, and the instrumentator's matching is used).
    """

    __slots__ = ("_entries", "_redirect_slashes")

    def __init__(
        self,
        entries: list[tuple[re.Pattern[str], frozenset[str] | None, str]],
        redirect_slashes: bool,
    ) -> None:
        self._entries = entries
        self._redirect_slashes = redirect_slashes

    @classmethod
    def of(cls, app: Any) -> RouteNames | None:
        """The compiled routes of ``app``, or None when they do not allow it."""
        routes = getattr(app, "routes", None)
        effective = getattr(routing, "_effective_routes", None)
        if not isinstance(routes, list) or not routes or effective is None:
            return None
        entries = []
        for route in effective(routes):
            entry = _entry(route)
            if entry is False:
                return None
            if entry is not None:
                entries.append(entry)
        router = getattr(app, "router", None)
        return cls(entries, bool(getattr(router, "redirect_slashes", False)))

    def name(self, method: str, path: str, root_path: str) -> str | None:
        """The template of a request's route, as ``get_route_name`` finds it."""
        name = self._match(method, path, root_path)
        if name is not None or not self._redirect_slashes:
            return name
        toggled = path[:-1] if path.endswith("/") else path + "/"
        if toggled and toggled != path and self._match(method, toggled, root_path) is not None:
            return path
        return None

    def _match(self, method: str, path: str, root_path: str) -> str | None:
        route_path = _route_path(path, root_path)
        partial = None
        for pattern, methods, name in self._entries:
            if pattern.match(route_path):
                if methods is None or method in methods:
                    return name
                if partial is None:
                    partial = name
        return partial


#: Starlette's own path parameter types (converting what their pattern matched cannot fail).
_CONVERTORS = (StringConvertor, PathConvertor, IntegerConvertor, FloatConvertor, UUIDConvertor)

#: The ``matches`` of the websocket routes: never a match for an HTTP request.
_WEBSOCKET_MATCHES = frozenset((WebSocketRoute.matches, APIWebSocketRoute.matches))


def _entry(
    route: Any,
) -> tuple[re.Pattern[str], frozenset[str] | None, str] | Literal[False] | None:
    """A route as (path pattern, methods, template); None for one that never matches an
    HTTP request; False for one whose match needs more than the method and the path."""
    if not matched_by_path(route):
        return False
    if getattr(type(route), "matches", None) in _WEBSOCKET_MATCHES:
        return None
    if isinstance(route, Mount):
        if route.routes:
            return False  # matched against the mounted app's routes, with its own scope
        return route.path_regex, None, route.path
    pattern = getattr(route, "path_regex", None)
    path = getattr(route, "path", None)
    convertors = getattr(route, "param_convertors", None)
    if (
        not isinstance(pattern, re.Pattern)
        or not isinstance(path, str)
        or not isinstance(convertors, dict)
        or not all(type(c) in _CONVERTORS for c in convertors.values())
    ):
        return False
    methods = getattr(route, "methods", None)
    return pattern, frozenset(methods) if methods else None, path


def _route_path(path: str, root_path: str) -> str:
    """Starlette's ``get_route_path``: the path below the app's root path."""
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    if path[len(root_path)] == "/":
        return path[len(root_path) :]
    return path


#: The instrumentator's status label (its first digit and "xx") of every valid status.
_STATUS_GROUPS = {status: f"{status // 100}xx" for status in range(100, 600)}


def _content_length(headers: Any) -> int:
    """A ``Content-Length`` header's value, 0 without one or for one that is no number."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _ignoring_runtime(app: ASGIApp) -> RuntimeApp:
    async def call(runtime: DBPoolRuntime, scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)

    return call


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
