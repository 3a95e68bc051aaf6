"""What every ``fastapi-dbpool`` command shares: exit codes, :class:`CLIError`, and the
check that the ``cli`` extra (rich, httpx) is installed before a command imports it.

Exit codes: 0 fine; 1 nothing could be checked (bad URL, unreachable, unexpected answer);
2 usage or configuration error; 3 checked, and the answer is bad (the budget is
oversubscribed, or the service reports ``unavailable`` / ``draining``).
"""

from __future__ import annotations

import importlib

from ..settings import mask_url

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PROBLEM = 3

INSTALL_HINT = "the fastapi-dbpool command needs rich and httpx: pip install 'fastapi-dbpool[cli]'"


class CLIError(Exception):
    """A one-line, password-free message for the user, and the exit code that goes with it."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        # One line, whatever the server or the network said.
        super().__init__(mask_url(" ".join(message.splitlines())))
        self.exit_code = exit_code


def require(*modules: str) -> None:
    """Import ``modules`` now, so that a missing extra is one clear message.

    Raises:
        CLIError: One of them is not installed (the message says how to install it).
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise CLIError(f"{INSTALL_HINT} ({module} is missing)") from None
