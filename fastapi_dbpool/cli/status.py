"""``fastapi-dbpool status`` and ``watch``: a running service's ``/health/database``,
fetched with httpx and rendered as a table with rich (once, or refreshed live).
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ..settings import mask_url
from .common import EXIT_OK, EXIT_PROBLEM, CLIError

if TYPE_CHECKING:
    import httpx
    from rich.console import Console, JustifyMethod, RenderableType
    from rich.text import Text

HEALTH_PATH = "/health/database"
#: /health/database statuses in which the service can use its database.
SERVING = frozenset({"ok", "degraded"})


@dataclass(frozen=True, slots=True)
class Health:
    """One answer of ``/health/database``."""

    url: str
    http_status: int
    body: dict[str, Any]

    @property
    def status(self) -> str:
        """The overall status: ``ok``, ``degraded``, ``unavailable`` or ``draining``."""
        return str(self.body.get("status"))

    @property
    def exit_code(self) -> int:
        """0 while the service can use its database, 3 otherwise."""
        return EXIT_OK if self.status in SERVING else EXIT_PROBLEM


def health_url(text: str) -> str:
    """The ``/health/database`` URL of a service, from its base URL or the full one.

    Raises:
        CLIError: Not an http(s) URL.
    """
    raw = text.strip()
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise CLIError(f"not a valid URL: {mask_url(text)!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CLIError(f"not an http:// or https:// URL of a service: {mask_url(text)!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(HEALTH_PATH):
        path += HEALTH_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def fetch_health(client: httpx.Client, url: str) -> Health:
    """GET ``/health/database``.

    Raises:
        CLIError: The service cannot be reached or does not answer like fastapi_dbpool.
    """
    import httpx

    shown = mask_url(url)
    try:
        response = client.get(url)
    except httpx.ConnectError as exc:
        raise CLIError(f"cannot reach {shown}: {_connect_reason(exc, _host(url))}") from None
    except httpx.TimeoutException:
        raise CLIError(f"cannot reach {shown}: no answer in time") from None
    except httpx.HTTPError as exc:
        raise CLIError(f"cannot reach {shown}: {exc or type(exc).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "status" not in body or "databases" not in body:
        raise CLIError(
            f"{shown} answered HTTP {response.status_code}, not a fastapi_dbpool "
            "/health/database body (is the URL right, and dbpool.router included?)"
        )
    return Health(url, response.status_code, body)


def _host(url: str) -> str:
    return urlsplit(url).hostname or ""


def _connect_reason(exc: BaseException, host: str) -> str:
    # httpx keeps the socket error as the cause (through httpcore's own ConnectError).
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return f"unknown host {host!r}"
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    if "name or service not known" in text.lower() or "nodename nor servname" in text.lower():
        return f"unknown host {host!r}"
    return text or type(exc).__name__


_STATUS_STYLE = {"ok": "green", "degraded": "yellow", "unavailable": "red", "draining": "red"}


def _styled(status: str) -> Text:
    from rich.text import Text

    return Text(status, style=_STATUS_STYLE.get(status, "red"))


def _breaker(data: Mapping[str, Any]) -> tuple[str, str | None]:
    """The breaker's table cell, and a note when it is not simply closed."""
    state = str(data.get("state", "?"))
    failures = data.get("consecutive_failures", 0)
    cell = f"{state} {failures}/{data.get('failure_threshold', '?')}" if failures else state
    note = None
    if state != "closed":
        retry = data.get("retry_after")
        trial = f"next trial in {retry:.1f} s" if isinstance(retry, int | float) else state
        note = f"{state}, {trial}; rejected calls: {data.get('rejected_calls', '?')}"
    return cell, note


def _probe(data: Mapping[str, Any]) -> tuple[str, str | None]:
    """The probe's table cell, and a note with the error when it failed."""
    if data.get("ok") is None:
        return "not yet", None
    if data.get("ok"):
        latency = data.get("latency_ms")
        return ("ok" if latency is None else f"ok {latency:g} ms"), None
    interval = data.get("interval")
    every = f" (probed every {interval:g} s)" if isinstance(interval, int | float) else ""
    return "failed", f"failed: {data.get('error')}{every}"


def _sizing(data: Mapping[str, Any]) -> str:
    how = "derived" if data.get("derived") else "explicit"
    if data.get("capped"):
        how += ", capped"
    text = (
        f"pool_size={data.get('pool_size')} max_overflow={data.get('max_overflow')} ({how}); "
        f"{data.get('processes')} processes ({data.get('pods')} pods + {data.get('surge')} "
        f"surge x {data.get('workers')} workers); budget {data.get('budget')} "
        f"({data.get('budget_source')}); fleet peak {data.get('fleet_peak')}"
    )
    if data.get("oversubscribed"):
        text += " - OVERSUBSCRIBED"
    return text


def render_health(health: Health) -> RenderableType:
    """The ``status`` table for a person."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("database", "left"),
        ("status", "left"),
        ("breaker", "left"),
        ("size", "right"),
        ("checked_out", "right"),
        ("overflow", "right"),
        ("max", "right"),
        ("waiting", "right"),
        ("probe", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=justify == "right")
    notes = Table.grid(padding=(0, 1))
    notes.add_column(no_wrap=True)
    notes.add_column()
    databases: Mapping[str, Any] = health.body.get("databases") or {}
    for name, db in databases.items():
        pool = db.get("pool", {})
        breaker, breaker_note = _breaker(db.get("circuit_breaker", {}))
        probe, probe_note = _probe(db.get("probe", {}))
        table.add_row(
            name,
            _styled(str(db.get("status"))),
            breaker,
            *(str(pool.get(k, "?")) for k in ("size", "checked_out", "overflow", "max", "waiting")),
            probe,
        )
        if breaker_note:
            notes.add_row(f"{name} breaker:", Text(breaker_note, style="red"))
        if probe_note:
            notes.add_row(f"{name} probe:", Text(probe_note, style="red"))
        if db.get("server_version") or db.get("url"):
            server = f"PostgreSQL {db.get('server_version', '?')} at {db.get('url', '?')}"
            notes.add_row(f"{name} server:", Text(mask_url(server), style="dim"))
        if "sizing" in db:
            notes.add_row(f"{name} sizing:", Text(_sizing(db["sizing"]), style="dim"))
    leaks = health.body.get("leaks")
    if isinstance(leaks, Mapping) and leaks.get("total"):
        by_kind = leaks.get("by_kind") or {}
        counts = ", ".join(f"{kind} {n}" for kind, n in by_kind.items() if n)
        notes.add_row(
            "leaks:",
            Text(
                f"{leaks['total']} reported ({counts}); reclaimed {leaks.get('reclaimed', 0)}",
                style="yellow",
            ),
        )
        for leak in (leaks.get("recent") or [])[-5:]:
            who = (
                f"{leak.get('method')} {leak.get('route')}"
                if leak.get("route")
                else "outside any request"
            )
            task = f", task {leak['task']}" if leak.get("task") else ""
            notes.add_row(
                "",
                Text(
                    f"{leak.get('kind')} on {leak.get('database')}: held "
                    f"{leak.get('held_for', 0):.1f}s by {who}{task}",
                    style="yellow",
                ),
            )
    header = Text.assemble(
        (mask_url(health.url), "bold"),
        "  ",
        _styled(health.status),
        f" (HTTP {health.http_status})",
    )
    return Group(header, table, notes)


def _client(args: argparse.Namespace) -> httpx.Client:
    import httpx

    return httpx.Client(timeout=args.timeout, follow_redirects=True)


def run_status(
    args: argparse.Namespace,
    console: Console,
    make_client: Callable[[argparse.Namespace], httpx.Client] = _client,
) -> int:
    """``fastapi-dbpool status``; ``make_client`` builds the HTTP client from ``args``."""
    url = health_url(args.url)
    with make_client(args) as client:
        health = fetch_health(client, url)
    if args.json:
        console.out(json.dumps(health.body, indent=2), highlight=False)
    else:
        console.print(render_health(health))
    return health.exit_code


def watch(
    console: Console,
    client: httpx.Client,
    url: str,
    *,
    interval: float,
    count: int | None,
    as_json: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Poll ``url`` every ``interval`` seconds, ``count`` times or until Ctrl-C.

    On a terminal the table is redrawn in place (rich ``Live``); otherwise, and with
    ``as_json`` (one JSON line per refresh), each refresh is printed after the last.
    An unreachable service is shown and polled again, not fatal.

    Returns:
        The exit code of the last refresh.
    """
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    def poll(n: int) -> tuple[RenderableType, str, int]:
        stamp = time.strftime("%H:%M:%S")
        footer = Text(
            f"refresh {n}{'' if count is None else f' of {count}'} at {stamp}, "
            f"every {interval:g} s; Ctrl-C to stop",
            style="dim",
        )
        try:
            health = fetch_health(client, url)
        except CLIError as exc:
            line = json.dumps({"status": "unreachable", "error": str(exc)})
            return Group(Text(str(exc), style="bold red"), footer), line, exc.exit_code
        line = json.dumps(health.body, separators=(",", ":"))
        return Group(render_health(health), footer), line, health.exit_code

    code = EXIT_OK
    live = (
        Live(console=console, auto_refresh=False) if console.is_terminal and not as_json else None
    )
    try:
        if live is not None:
            live.start()
        for n in itertools.count(1):
            started = clock()
            view, line, code = poll(n)
            if as_json:
                console.out(line, highlight=False)
            elif live is not None:
                live.update(view, refresh=True)
            else:
                console.print(view)
            if count is not None and n >= count:
                break
            sleep(max(0.0, interval - (clock() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return code


def run_watch(
    args: argparse.Namespace,
    console: Console,
    make_client: Callable[[argparse.Namespace], httpx.Client] = _client,
) -> int:
    """``fastapi-dbpool watch``; ``make_client`` builds the HTTP client from ``args``."""
    url = health_url(args.url)
    with make_client(args) as client:
        return watch(
            console, client, url, interval=args.interval, count=args.count, as_json=args.json
        )
