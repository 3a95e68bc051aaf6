"""The ``fastapi-dbpool`` argument parser: the commands, their options, and the
argument types that check them."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from ..sizing import surge_pods


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
