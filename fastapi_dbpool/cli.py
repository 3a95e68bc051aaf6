"""The diagnostics command: ``fastapi-dbpool check | status | watch``.

``check`` asks a PostgreSQL server what it allows and who is connected, and sizes the pool
with the very functions the library runs at startup (:func:`~.engines.read_server`,
:func:`~.engines.decide_budget`, hence :func:`~.sizing.plan_pool`), so its answer is the
service's answer. ``status`` and ``watch`` read a running service's ``/health/database``.

rich and httpx are the ``cli`` extra: they are imported inside the commands, so importing
:mod:`fastapi_dbpool` never needs them.

Exit codes: 0 fine; 1 nothing could be checked (bad URL, unreachable, unexpected answer);
2 usage or configuration error; 3 checked, and the answer is bad (the budget is
oversubscribed, or the service reports ``unavailable`` / ``draining``).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib
import itertools
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from sqlalchemy.engine import URL

from .engines import ServerInfo, decide_budget, read_server
from .errors import ConfigurationError, DatabaseUnavailableError
from .settings import DBPoolSettings, mask_url, normalize_url, safe_url
from .sizing import PoolBudget, surge_pods

if TYPE_CHECKING:
    import httpx
    from rich.console import Console, JustifyMethod, RenderableType
    from rich.text import Text

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PROBLEM = 3

INSTALL_HINT = "the fastapi-dbpool command needs rich and httpx: pip install 'fastapi-dbpool[cli]'"
#: application_name of the command's own connection, which is left out of the counts.
CLI_APPLICATION_NAME = "fastapi-dbpool-cli"
HEALTH_PATH = "/health/database"
#: /health/database statuses in which the service can use its database.
SERVING = frozenset({"ok", "degraded"})

# Client backends only: background workers, autovacuum and WAL senders do not take
# max_connections slots. Without pg_read_all_stats, other roles' processes show a NULL
# backend_type; of those, the ones with both a role and a database are client backends
# (system processes and launchers lack one or the other).
_ACTIVITY_QUERY = """
SELECT coalesce(application_name, '') AS name, count(*) AS n
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
  AND (
    backend_type = 'client backend'
    OR (backend_type IS NULL AND usesysid IS NOT NULL AND datid IS NOT NULL)
  )
GROUP BY 1
ORDER BY 2 DESC, 1
"""


class CLIError(Exception):
    """A one-line, password-free message for the user, and the exit code that goes with it."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        # One line, whatever the server or the network said.
        super().__init__(mask_url(" ".join(message.splitlines())))
        self.exit_code = exit_code


# --- check: what the server allows and what the service would do ------------------------


@dataclass(frozen=True, slots=True)
class ServerReport:
    """What ``check`` learned from the server."""

    info: ServerInfo
    #: False before PostgreSQL 16, which has no ``reserved_connections``.
    has_reserved_connections: bool
    #: Client connections by ``application_name``, the command's own left out.
    activity: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Assessment:
    """The sizing the service would choose and everything that does not fit.

    Attributes:
        plan: What the service would use, or None when no plan fits at all.
        own: Connections that carry the service's ``application_name`` now; the planned
            fleet replaces them, so they are not counted against it.
        others: Every other client connection now.
        problems: Why the plan does not fit; empty when it does.
        suggestion: With the budget lowered to leave room for ``others``, the plan the
            service would use instead (derived sizes only).
    """

    plan: PoolBudget | None
    own: int
    others: int
    problems: tuple[str, ...]
    suggestion: PoolBudget | None = None

    @property
    def fits(self) -> bool:
        """True when the planned fleet fits the budget and the server."""
        return not self.problems

    @property
    def exit_code(self) -> int:
        """0 when it fits, 3 when oversubscribed."""
        return EXIT_OK if self.fits else EXIT_PROBLEM


def assess(settings: DBPoolSettings, server: ServerInfo, activity: Mapping[str, int]) -> Assessment:
    """Size the pool as the service would at startup, then check it against the server.

    The plan is oversubscribed when no plan leaves each process a pooled connection, when
    ``DB_MAX_CONNECTIONS`` is more than the server allows, when explicit sizes exceed the
    budget, or when the fleet's peak plus the connections others hold now exceed the slots
    the server gives ordinary roles.

    Args:
        settings: The service's settings (``strict_budget`` off, to see the whole plan).
        server: The server's limits, as :func:`~.engines.read_server` reads them.
        activity: Client connections by ``application_name``.
    """
    available = server.limits.available
    own = activity.get(settings.application_name, 0)
    others = sum(activity.values()) - own
    try:
        plan = decide_budget("primary", settings, server)
    except ConfigurationError as exc:
        return Assessment(None, own, others, (str(exc),))
    problems: list[str] = []
    if settings.max_connections is not None and settings.max_connections > available:
        problems.append(
            f"DB_MAX_CONNECTIONS={settings.max_connections} is more than the {available} "
            "connections the server allows ordinary roles"
        )
    if plan.warning:
        problems.append(plan.warning)
    suggestion = None
    # With nobody else connected, a fleet above the server's limit is already one of the
    # problems above (explicit sizes above the budget, or a budget above the server's).
    if others > 0 and plan.fleet_peak + others > available:
        room = available - others
        problems.append(
            f"the fleet may hold {plan.fleet_peak} connections and other clients hold "
            f"{others} now: {plan.fleet_peak + others} is more than the {available} the "
            "server allows ordinary roles"
        )
        if plan.derived:
            problems[-1] += f"; leave them room with DB_MAX_CONNECTIONS={max(room, 0)} or less"
        if room > 0 and plan.derived:
            try:
                suggestion = decide_budget(
                    "primary", replace(settings, max_connections=room), server
                )
            except ConfigurationError:
                suggestion = None
    return Assessment(plan, own, others, tuple(problems), suggestion)


def database_url(text: str) -> URL:
    """Parse the URL given to ``check``.

    Raises:
        CLIError: The URL cannot be used (message masked).
    """
    try:
        return normalize_url(text, "DATABASE_URL")
    except ConfigurationError as exc:
        raise CLIError(str(exc)) from None


def shown_url(text: str) -> str:
    """The URL as the user gave it, for messages: password masked, query string dropped."""
    return safe_url(text)


async def inspect_server(url: URL, settings: DBPoolSettings) -> ServerReport:
    """Connect, count client connections, then read the limits as the library does.

    Raises:
        CLIError: The server cannot be reached or refuses the connection.
    """
    shown = shown_url(settings.database_url or "")
    timeout = settings.connect_timeout
    try:
        conn = await asyncpg.connect(
            dsn=url.set(drivername="postgresql").render_as_string(hide_password=False),
            timeout=timeout,
            server_settings={"application_name": CLI_APPLICATION_NAME},
        )
    except TimeoutError:
        raise CLIError(f"cannot connect to {shown}: no answer within {timeout:g} s") from None
    except socket.gaierror:
        raise CLIError(f"cannot connect to {shown}: unknown host {url.host!r}") from None
    except OSError as exc:
        raise CLIError(f"cannot connect to {shown}: {_os_reason(exc)}") from None
    except asyncpg.PostgresError as exc:
        raise CLIError(f"cannot connect to {shown}: {exc}") from None
    except (asyncpg.InterfaceError, ValueError, OverflowError) as exc:
        raise CLIError(f"cannot use {shown}: {exc}") from None
    try:
        has_reserved = conn.get_server_version().major >= 16
        rows = await conn.fetch(_ACTIVITY_QUERY, timeout=timeout)
    finally:
        await conn.close(timeout=timeout)
    try:
        info = await read_server(url, settings)
    except DatabaseUnavailableError as exc:
        raise CLIError(str(exc)) from None
    return ServerReport(info, has_reserved, {row["name"]: int(row["n"]) for row in rows})


def _os_reason(exc: OSError) -> str:
    # asyncio reports a host with several addresses as one OSError without an errno.
    refused = exc.errno == errno.ECONNREFUSED or "Connect call failed" in str(exc)
    if isinstance(exc, ConnectionRefusedError) or refused:
        return "connection refused (is PostgreSQL running and listening there?)"
    return exc.strerror or str(exc) or type(exc).__name__


def check_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> DBPoolSettings:
    """The service's settings: its environment, overridden by the command line.

    Raises:
        CLIError: A variable of the environment is invalid (exit code 2).
    """
    overrides: dict[str, Any] = {
        "database_url": args.database_url,
        # check sizes the primary only; other URLs must not stop it.
        "replica_url": None,
        "failover_urls": (),
        # See the whole plan and say what does not fit, instead of stopping at it.
        "strict_budget": False,
    }
    for name, value in (
        ("pod_count", args.pods),
        ("web_concurrency", args.workers),
        ("rollout_surge", args.surge),
        ("max_connections", args.max_connections),
        ("pool_size", args.pool_size),
        ("max_overflow", args.max_overflow),
        ("pool_size_cap", args.pool_size_cap),
        ("connect_timeout", args.timeout),
        ("application_name", args.application_name),
    ):
        if value is not None:
            overrides[name] = value
    try:
        return DBPoolSettings.from_env(environ, **overrides)
    except ConfigurationError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def check_json(shown: str, report: ServerReport, result: Assessment) -> dict[str, Any]:
    """The ``check --json`` document."""
    limits = report.info.limits
    plan = None
    if result.plan is not None:
        plan = {**result.plan.as_dict(), "warning": result.plan.warning}
    return {
        "url": shown,
        "server": {
            "version": report.info.version,
            "max_connections": limits.max_connections,
            "superuser_reserved_connections": limits.superuser_reserved_connections,
            "reserved_connections": (
                limits.reserved_connections if report.has_reserved_connections else None
            ),
            "available": limits.available,
        },
        "connections": {
            "by_application": dict(report.activity),
            "total": sum(report.activity.values()),
            "service": result.own,
            "others": result.others,
        },
        "plan": plan,
        "suggestion": None if result.suggestion is None else result.suggestion.as_dict(),
        "fits": result.fits,
        "problems": list(result.problems),
    }


def render_check(
    shown: str, report: ServerReport, result: Assessment, application_name: str
) -> RenderableType:
    """The ``check`` report for a person."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    limits = report.info.limits
    server = Table.grid(padding=(0, 2))
    server.add_column()
    server.add_column(justify="right")
    reserved = str(limits.reserved_connections) if report.has_reserved_connections else "n/a"
    server.add_row("max_connections", str(limits.max_connections))
    server.add_row("superuser_reserved_connections", str(limits.superuser_reserved_connections))
    server.add_row("reserved_connections", reserved)
    server.add_row(Text("available to ordinary roles", style="bold"), str(limits.available))

    activity = Table(title="Client connections now", title_justify="left", box=None)
    activity.add_column("application_name")
    activity.add_column("connections", justify="right")
    for name, count in report.activity.items():
        label = Text(name or "(unnamed)")
        if name == application_name:
            label.append(" (this service)", style="dim")
        activity.add_row(label, str(count))
    if not report.activity:
        activity.add_row(Text("(none besides this command)", style="dim"), "")
    activity.add_row(Text("other clients", style="bold"), str(result.others), end_section=True)

    parts: list[RenderableType] = [
        Text.assemble(("PostgreSQL ", "bold"), (report.info.version, "bold"), f" at {shown}"),
        server,
        Text(),
        activity,
        Text(),
    ]
    plan = result.plan
    if plan is not None:
        how = "derived from the budget" if plan.derived else "explicit"
        if plan.capped:
            how += f", capped by DB_POOL_SIZE_CAP={plan.pool_size}"
        parts += [
            Text(
                f"Pool sizing for {plan.pods} pods + {plan.surge} surge x {plan.workers} "
                f"workers = {plan.processes} processes",
                style="bold",
            ),
            Text(
                f"  each process: pool_size={plan.pool_size} max_overflow={plan.max_overflow}"
                f" ({how}) + {plan.probe_connections} health probe connection"
            ),
            Text(f"  budget: {plan.budget} connections ({plan.budget_source})"),
            Text(
                f"  fleet peak: {plan.fleet_peak} connections (+ {result.others} held by other "
                f"clients = {plan.fleet_peak + result.others} of {limits.available} available)"
            ),
        ]
    else:
        parts.append(Text("Pool sizing: no pool fits this fleet", style="bold"))
    if result.suggestion is not None:
        s = result.suggestion
        parts.append(
            Text(
                f"  with DB_MAX_CONNECTIONS={s.budget}: pool_size={s.pool_size} "
                f"max_overflow={s.max_overflow}, fleet peak {s.fleet_peak}",
                style="cyan",
            )
        )
    parts.append(Text())
    if result.fits:
        parts.append(Text("fits: the planned fleet fits the budget and the server", "bold green"))
    else:
        parts.append(Text("oversubscribed:", "bold red"))
        problems = Table.grid(padding=(0, 1))
        problems.add_column(style="red")
        problems.add_column(style="red")
        for problem in result.problems:
            problems.add_row(" -", problem)
        parts.append(problems)
    return Group(*parts)


def run_check(args: argparse.Namespace, console: Console, environ: Mapping[str, str]) -> int:
    """``fastapi-dbpool check``."""
    url = database_url(args.database_url)
    settings = check_settings(args, environ)
    report = asyncio.run(inspect_server(url, settings))
    shown = shown_url(args.database_url)
    # decide_budget logs what the report says anyway (a budget above the server's); without
    # a handler of the user's, Python's last-resort handler would print it to stderr.
    library_logger = logging.getLogger("fastapi_dbpool")
    silencer = logging.NullHandler()
    library_logger.addHandler(silencer)
    try:
        result = assess(settings, report.info, report.activity)
    finally:
        library_logger.removeHandler(silencer)
    if args.json:
        console.out(json.dumps(check_json(shown, report, result), indent=2), highlight=False)
    else:
        console.print(render_check(shown, report, result, settings.application_name))
    return result.exit_code


# --- status and watch: a running service's /health/database -------------------------------


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


def run_status(args: argparse.Namespace, console: Console) -> int:
    """``fastapi-dbpool status``."""
    url = health_url(args.url)
    with _client(args) as client:
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


def run_watch(args: argparse.Namespace, console: Console) -> int:
    """``fastapi-dbpool watch``."""
    url = health_url(args.url)
    with _client(args) as client:
        return watch(
            console, client, url, interval=args.interval, count=args.count, as_json=args.json
        )


# --- the command line -------------------------------------------------------------------


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _surge(text: str) -> str:
    try:
        value = surge_pods(100, text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a pod count or a percentage such as 25%, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``fastapi-dbpool`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fastapi-dbpool",
        description="Diagnostics for fastapi_dbpool: size a pool against a PostgreSQL "
        "server, or read a running service's /health/database.",
        epilog="exit codes: 0 fine, 1 cannot check (bad URL, unreachable), 2 usage, "
        "3 oversubscribed / unavailable / draining",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="server limits, current connections and the pool sizing for a fleet",
        description="Connect to PostgreSQL, show its connection limits and who is connected, "
        "and size the pool as the service would at startup. Options not given come from "
        "the service's environment variables (shown in brackets), as at startup.",
    )
    check.add_argument(
        "database_url",
        metavar="DATABASE_URL",
        nargs="?",
        help="postgresql:// or postgresql+asyncpg:// URL [DATABASE_URL]",
    )
    check.add_argument(
        "--pods", type=_whole(1), metavar="N", help="pods sharing the database [POD_COUNT]"
    )
    check.add_argument(
        "--workers", type=_whole(1), metavar="N", help="worker processes per pod [WEB_CONCURRENCY]"
    )
    check.add_argument(
        "--surge", type=_surge, metavar="N|P%", help="extra pods in a rollout [DB_ROLLOUT_SURGE]"
    )
    check.add_argument(
        "--max-connections",
        type=_whole(1),
        metavar="BUDGET",
        help="connections the service may use [DB_MAX_CONNECTIONS; default: what the server "
        "allows ordinary roles]",
    )
    check.add_argument(
        "--pool-size", type=_whole(1), metavar="N", help="explicit pool size [DB_POOL_SIZE]"
    )
    check.add_argument(
        "--max-overflow", type=_whole(0), metavar="N", help="explicit overflow [DB_MAX_OVERFLOW]"
    )
    check.add_argument(
        "--pool-size-cap",
        type=_whole(1),
        metavar="N",
        help="largest derived pool per process [DB_POOL_SIZE_CAP, 20]",
    )
    check.add_argument(
        "--application-name",
        metavar="NAME",
        help="the service's application_name, whose connections the fleet replaces "
        "[DB_APPLICATION_NAME]",
    )
    check.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="seconds to connect [DB_CONNECT_TIMEOUT, 5]",
    )
    check.add_argument("--json", action="store_true", help="print JSON for scripts")
    check.set_defaults(handler="check")

    for name, help_text in (
        ("status", "print a running service's /health/database as a table"),
        ("watch", "refresh a running service's /health/database live until Ctrl-C"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("url", metavar="URL", help="the service's base URL, or the full URL")
        sub.add_argument(
            "--timeout",
            type=_seconds,
            default=5.0,
            metavar="SECONDS",
            help="seconds to wait for an answer [5]",
        )
        sub.add_argument("--json", action="store_true", help="print the JSON body instead")
        if name == "watch":
            sub.add_argument(
                "--interval",
                type=_seconds,
                default=2.0,
                metavar="SECONDS",
                help="seconds between refreshes [2]",
            )
            sub.add_argument("--count", type=_whole(1), metavar="N", help="stop after N refreshes")
        sub.set_defaults(handler=name)
    return parser


def _require(*modules: str) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise CLIError(f"{INSTALL_HINT} ({module} is missing)") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Args:
        argv: The arguments, without the program name; default ``sys.argv[1:]``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if args.handler == "check" and not args.database_url:
        args.database_url = os.environ.get("DATABASE_URL")
        if not args.database_url:
            sys.stderr.write(
                "fastapi-dbpool: error: check needs a DATABASE_URL argument or $DATABASE_URL\n"
            )
            return EXIT_USAGE
    try:
        _require("rich", *(() if args.handler == "check" else ("httpx",)))
        from rich.console import Console

        console = Console()
        if args.handler == "check":
            return run_check(args, console, os.environ)
        if args.handler == "status":
            return run_status(args, console)
        return run_watch(args, console)
    except CLIError as exc:
        sys.stderr.write(f"fastapi-dbpool: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
