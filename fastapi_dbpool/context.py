"""The one ContextVar: the request being served, set by DBPoolMiddleware."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .requests import RequestContext

#: The request the current task serves; None outside any request.
current_request: ContextVar[RequestContext | None] = ContextVar(
    "fastapi_dbpool_request", default=None
)

#: Key of the per-app runtime in the lifespan state (``scope["state"]``).
STATE_KEY = "fastapi_dbpool"
