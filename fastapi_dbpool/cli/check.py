"""``fastapi-dbpool check``: what a PostgreSQL server allows, who is connected, and the
pool sizing the service would choose at startup.

It sizes the pool with the very functions the library runs at startup
(:func:`~fastapi_dbpool.engines.read_server`, :func:`~fastapi_dbpool.engines.decide_budget`,
hence :func:`~fastapi_dbpool.sizing.plan_pool`), so its answer is the service's answer.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.engine import URL

from ..engines import ServerInfo, decide_budget, read_server
from ..errors import ConfigurationError, DatabaseUnavailableError
from ..settings import DBPoolSettings, normalize_url, safe_url
from ..sizing import PoolBudget
from .common import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, CLIError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

#: application_name of the command's own connection, which is left out of the counts.
CLI_APPLICATION_NAME = "fastapi-dbpool-cli"


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
