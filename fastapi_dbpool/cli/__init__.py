"""The diagnostics command: ``fastapi-dbpool check | status | watch``.

``check`` asks a PostgreSQL server what it allows and who is connected, and sizes the pool
as the service would at startup (:mod:`.check`). ``status`` and ``watch`` read a running
service's ``/health/database`` (:mod:`.status`). The arguments are :mod:`.parser`'s; exit
codes, :class:`CLIError` and the check for the ``cli`` extra are :mod:`.common`'s. This
module runs the command (:func:`main`) and re-exports what the others define.

rich and httpx are the ``cli`` extra: they are imported inside the commands, so importing
:mod:`fastapi_dbpool` never needs them.

Exit codes: 0 fine; 1 nothing could be checked (bad URL, unreachable, unexpected answer);
2 usage or configuration error; 3 checked, and the answer is bad (the budget is
oversubscribed, or the service reports ``unavailable`` / ``draining``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .check import (
    CLI_APPLICATION_NAME,
    Assessment,
    ServerReport,
    assess,
    check_json,
    check_settings,
    database_url,
    inspect_server,
    render_check,
    run_check,
    shown_url,
)
from .common import EXIT_ERROR, EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, INSTALL_HINT, CLIError, require
from .parser import build_parser
from .status import (
    HEALTH_PATH,
    SERVING,
    Health,
    _client,
    fetch_health,
    health_url,
    render_health,
    run_status,
    run_watch,
    watch,
)

__all__ = [
    "CLI_APPLICATION_NAME",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "HEALTH_PATH",
    "INSTALL_HINT",
    "SERVING",
    "Assessment",
    "CLIError",
    "Health",
    "ServerReport",
    "assess",
    "build_parser",
    "check_json",
    "check_settings",
    "database_url",
    "fetch_health",
    "health_url",
    "inspect_server",
    "main",
    "render_check",
    "render_health",
    "run_check",
    "run_status",
    "run_watch",
    "shown_url",
    "watch",
]


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
        require("rich", *(() if args.handler == "check" else ("httpx",)))
        from rich.console import Console

        console = Console()
        if args.handler == "check":
            return run_check(args, console, os.environ)
        # Looked up here, in the package, when the command runs: replacing
        # fastapi_dbpool.cli._client (as the tests do) replaces both commands' HTTP client.
        if args.handler == "status":
            return run_status(args, console, _client)
        return run_watch(args, console, _client)
    except CLIError as exc:
        sys.stderr.write(f"fastapi-dbpool: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
