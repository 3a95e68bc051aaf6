"""Failover of the primary to DATABASE_FAILOVER_URLS (placeholder: being implemented)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

from .settings import safe_url


class FailoverConnector:
    """Opens connections for the primary's pool, trying alternates when it is down.

    Args:
        name: The database's name.
        primary: The primary's URL.
        alternates: Failover URLs, in order.
        connect_args: asyncpg ``connect()`` keyword arguments (deadlines, settings).
    """

    def __init__(
        self,
        name: str,
        primary: URL,
        alternates: tuple[URL, ...],
        connect_args: Mapping[str, Any],
    ) -> None:
        self.name = name
        self.targets = (primary, *alternates)
        self.connect_args = dict(connect_args)
        self.active = 0

    async def __call__(self) -> Any:
        url = self.targets[self.active]
        return await asyncpg.connect(
            dsn=url.set(drivername="postgresql").render_as_string(hide_password=False),
            **self.connect_args,
        )

    def snapshot(self) -> dict[str, Any]:
        """The failover state for /health/database (URLs without passwords)."""
        return {
            "active": safe_url(self.targets[self.active]),
            "targets": [safe_url(t) for t in self.targets],
        }
